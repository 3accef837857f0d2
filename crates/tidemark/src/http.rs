//! The HTTP endpoint on `metrics.listen`: `GET /metrics` (Prometheus text format) and
//! `GET /` (a small status page). Hand-written on tokio: two fixed routes do not justify
//! an HTTP framework dependency.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use metrics_exporter_prometheus::PrometheusHandle;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::app::App;

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
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                continue;
            };
            let app = app.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let n =
                    match tokio::time::timeout(std::time::Duration::from_secs(5), s.read(&mut buf))
                        .await
                    {
                        Ok(Ok(n)) => n,
                        _ => return,
                    };
                let req = String::from_utf8_lossy(&buf[..n]);
                let path = req.split_whitespace().nth(1).unwrap_or("/");
                let (status, ctype, body) = match path {
                    "/metrics" => (
                        "200 OK",
                        "text/plain; version=0.0.4",
                        handle().map(|h| h.render()).unwrap_or_default(),
                    ),
                    "/" => ("200 OK", "text/html; charset=utf-8", status_page(&app)),
                    _ => ("404 Not Found", "text/plain", "not found\n".to_string()),
                };
                let resp = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });
    Ok(addr)
}

fn status_page(app: &App) -> String {
    let v = app.view.load();
    let mut rows = String::new();
    for n in &v.nodes {
        rows.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.1}</td><td>{}</td></tr>",
            html_escape(&n.name),
            n.role.as_str(),
            if n.healthy { "up" } else { "down" },
            if n.in_rotation { "in" } else { "out" },
            n.replay_lsn,
            n.lag.as_secs_f64() * 1000.0,
            n.lag_bytes
        ));
    }
    format!(
        "<!doctype html><html><head><meta charset=utf-8><meta http-equiv=refresh content=1><title>tidemark</title>\
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 10px}}</style></head>\
<body><h1>tidemark</h1><p>clients: {}</p><table><tr><th>node</th><th>role</th><th>health</th><th>rotation</th><th>LSN</th><th>lag ms</th><th>lag bytes</th></tr>{rows}</table></body></html>",
        app.client_count()
    )
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
