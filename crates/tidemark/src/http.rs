//! The HTTP endpoint on `metrics.listen`: `GET /metrics` (Prometheus text format),
//! `GET /` (the status page), `GET /status.json` (its data, see [`crate::status`]),
//! `GET /healthz` (200 while the process is up) and `GET /readyz` (200 when a primary is
//! known, else 503). Hand-written on tokio: a few fixed routes do not justify an HTTP framework dependency.
//! Starting it also starts the replication slot poller ([`crate::slots`]), whose only
//! consumers are the metrics and the status page.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use metrics_exporter_prometheus::PrometheusHandle;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::app::App;
use crate::status;

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// The process-wide Prometheus recorder (installed on first use).
pub fn handle() -> Option<&'static PrometheusHandle> {
    HANDLE.get_or_init(crate::metrics::install).as_ref()
}

pub async fn start(app: Arc<App>, listen: &str) -> anyhow::Result<SocketAddr> {
    handle();
    let l = TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on metrics.listen {listen}: {e}"))?;
    let addr = l.local_addr()?;
    tokio::spawn(crate::slots::run(app.clone()));
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            };
            let app = app.clone();
            tokio::spawn(serve(app, s));
        }
    });
    Ok(addr)
}

async fn serve(app: Arc<App>, mut s: tokio::net::TcpStream) {
    let mut buf = vec![0u8; 4096];
    let n = match tokio::time::timeout(std::time::Duration::from_secs(5), s.read(&mut buf)).await {
        Ok(Ok(n)) => n,
        _ => return,
    };
    let req = String::from_utf8_lossy(&buf[..n]);
    let mut words = req.split_whitespace();
    let method = words.next().unwrap_or("");
    let target = words.next().unwrap_or("/");
    let path = target.split('?').next().unwrap_or("/");
    let (status, ctype, body) = if method != "GET" && method != "HEAD" {
        (
            "405 Method Not Allowed",
            "text/plain",
            "only GET\n".to_string(),
        )
    } else {
        match path {
            "/metrics" => {
                refresh_from(&app);
                (
                    "200 OK",
                    "text/plain; version=0.0.4",
                    handle()
                        .map(|h| {
                            let mut text = h.render();
                            crate::metrics::render_pool_waits(&app.pools.all(), &mut text);
                            text
                        })
                        .unwrap_or_default(),
                )
            }
            "/" => ("200 OK", "text/html; charset=utf-8", status::page(&app)),
            "/status.json" => ("200 OK", "application/json", status::json(&app).to_string()),
            "/healthz" => ("200 OK", "text/plain", "ok\n".to_string()),
            "/readyz" => readyz(&app),
            _ => ("404 Not Found", "text/plain", "not found\n".to_string()),
        }
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = s.write_all(head.as_bytes()).await;
    if method != "HEAD" {
        let _ = s.write_all(body.as_bytes()).await;
    }
    let _ = s.shutdown().await;
}

/// `/readyz`: ready when the cluster view has a primary (writes can be served).
fn readyz(app: &App) -> (&'static str, &'static str, String) {
    let view = app.view.load();
    match view.primary_id() {
        Some(id) => (
            "200 OK",
            "text/plain",
            format!("ready: primary is {}\n", app.node_name(id)),
        ),
        None => (
            "503 Service Unavailable",
            "text/plain",
            "not ready: no primary known\n".to_string(),
        ),
    }
}

/// Refreshes the gauges that are read off shared state rather than recorded as events:
/// per-pool connection counts and the last minute's routing split. Called before each
/// `/metrics` render.
pub fn refresh_from(app: &App) {
    for p in app.pools.all() {
        let s = &p.stats;
        let active = s.in_use.load(std::sync::atomic::Ordering::Relaxed);
        let idle = p.idle_count();
        let name = p.name.clone();
        metrics::gauge!("tidemark_pool_server_connections", "pool" => name.clone(), "state" => "active")
            .set(active as f64);
        metrics::gauge!("tidemark_pool_server_connections", "pool" => name.clone(), "state" => "idle")
            .set(idle as f64);
        metrics::gauge!("tidemark_pool_max_connections", "pool" => name.clone())
            .set(p.max_size() as f64);
        metrics::gauge!("tidemark_pool_clients_waiting", "pool" => name.clone())
            .set(s.waiting.load(std::sync::atomic::Ordering::Relaxed) as f64);
        metrics::counter!("tidemark_pool_checkout_timeouts_total", "pool" => name)
            .absolute(s.timeouts.load(std::sync::atomic::Ordering::Relaxed));
    }
    let m = crate::metrics::recent::summary(60);
    let reads = m.replica_reads + m.primary_reads;
    metrics::gauge!("tidemark_reads_replica_ratio").set(if reads == 0 {
        0.0
    } else {
        m.replica_reads as f64 / reads as f64
    });
    crate::metrics::paused(*app.paused.borrow());
}
