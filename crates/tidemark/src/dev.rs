//! `tidemark dev`: boots a local primary and replicas with tidemark-cluster and runs the
//! proxy in front of them until Ctrl-C.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use tidemark_cluster::{Cluster, ClusterConfig, ReplicaConfig, SslFiles};

use crate::config::{AuthMethod, Config, NodeConfig, ServerTlsConfig, SslMode, UserConfig};
use crate::listener::Proxy;

pub struct DevOptions {
    pub listen: String,
    pub replicas: usize,
    pub replica_delay: Duration,
    pub data_dir: Option<PathBuf>,
    pub keep: bool,
    pub metrics_listen: Option<String>,
    /// Nodes serve TLS only (`ssl = on`, `hostssl` in pg_hba) and tidemark connects to them
    /// with `sslmode = verify-full` against a throwaway certificate authority.
    pub server_tls: bool,
    /// `routing.transactions` (the config's default when `None`).
    pub transactions: Option<crate::config::TxMode>,
}

/// Certificates for nodes that accept TLS only: a new CA and a server certificate for
/// `localhost` / `127.0.0.1` written into `dir`, set on `ccfg`. Returns the CA for
/// `server_tls.sslrootcert`.
pub fn tls_only_nodes(
    ccfg: &mut ClusterConfig,
    dir: &std::path::Path,
) -> anyhow::Result<crate::tls::DevCerts> {
    let certs = crate::tls::dev_ca_and_server_cert(dir, &["localhost", "127.0.0.1"])?;
    ccfg.ssl = Some(SslFiles {
        cert_file: certs.cert.clone(),
        key_file: certs.key.clone(),
    });
    Ok(certs)
}

/// `server_tls` settings that verify the nodes fully against `ca`.
pub fn verify_full(ca: PathBuf) -> ServerTlsConfig {
    ServerTlsConfig {
        sslmode: Some(SslMode::VerifyFull),
        sslrootcert: Some(ca),
        ..Default::default()
    }
}

/// A proxy config for a cluster started by tidemark-cluster: superuser `postgres`, trust.
pub fn config_for(cluster: &Cluster, listen: &str) -> Config {
    let nodes = (0..cluster.node_count())
        .map(|i| NodeConfig {
            name: cluster.node_name(i).to_string(),
            host: cluster.host().to_string(),
            port: cluster.port(i),
            // The harness names each standby after the node in primary_conninfo.
            application_name: None,
            server_tls: Default::default(),
            retired: false,
        })
        .collect();
    let mut cfg =
        Config::parse("nodes = [{ name = \"x\", port = 1 }]").unwrap_or_else(|_| unreachable!());
    cfg.listen = listen.to_string();
    cfg.nodes = nodes;
    cfg.users = vec![UserConfig {
        name: cluster.superuser().to_string(),
        password: None,
        auth: AuthMethod::Trust,
        server_password: None,
        consistency: None,
        transactions: None,
        password_file: None,
        password_env: None,
        server_password_file: None,
        server_password_env: None,
    }];
    cfg.admin_users = vec![cluster.superuser().to_string()];
    cfg
}

pub async fn run(opts: DevOptions) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut replicas = vec![ReplicaConfig::default(); opts.replicas];
    if opts.replicas >= 2 && !opts.replica_delay.is_zero() {
        replicas[1].apply_delay = Some(opts.replica_delay);
    }
    let mut ccfg = ClusterConfig {
        replicas,
        data_dir: opts.data_dir.clone(),
        keep: opts.keep,
        ..ClusterConfig::default()
    };
    // The nodes' certificates must exist before the cluster (and its directory) does: made
    // in a scratch directory, the CA then kept in the cluster's.
    let scratch = std::env::temp_dir().join(format!("tidemark-dev-tls-{}", std::process::id()));
    let server_certs = if opts.server_tls {
        std::fs::create_dir_all(&scratch)?;
        Some(tls_only_nodes(&mut ccfg, &scratch)?)
    } else {
        None
    };
    eprintln!(
        "tidemark dev: starting a primary and {} replica(s){}...",
        opts.replicas,
        if opts.server_tls {
            " (TLS-only: ssl = on, hostssl)"
        } else {
            ""
        }
    );
    let started_cluster = tokio::task::spawn_blocking(move || Cluster::start(ccfg)).await?;
    let ca = match (&server_certs, &started_cluster) {
        (Some(c), Ok(cluster)) => {
            let ca = cluster.base_dir().join("tidemark-dev-server-ca.crt");
            std::fs::copy(&c.ca_cert, &ca)?;
            Some(ca)
        }
        _ => None,
    };
    if server_certs.is_some() {
        let _ = std::fs::remove_dir_all(&scratch);
    }
    let cluster = started_cluster?;
    let mut cfg = config_for(&cluster, &opts.listen);
    cfg.metrics.listen = opts.metrics_listen.clone();
    if let Some(t) = opts.transactions {
        cfg.routing.transactions = t;
    }
    if let Some(ca) = &ca {
        cfg.server_tls = verify_full(ca.clone());
    }
    // TLS with a throwaway self-signed certificate, so clients can try sslmode=require.
    let (cert, key) = crate::tls::self_signed(cluster.base_dir())?;
    cfg.tls.cert_file = Some(cert.clone());
    cfg.tls.key_file = Some(key);
    cfg.validate()?;
    let proxy = Proxy::start(cfg).await?;
    proxy.wait_ready(Duration::from_secs(10)).await;
    println!(
        "tidemark dev is ready in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    println!();
    println!(
        "  proxy:    psql \"host={} port={} user=postgres dbname=postgres\"",
        proxy.addr.ip(),
        proxy.addr.port()
    );
    println!(
        "  console:  psql \"host={} port={} user=postgres dbname=tidemark\"   (SHOW NODES)",
        proxy.addr.ip(),
        proxy.addr.port()
    );
    println!(
        "  TLS:      psql \"host=localhost port={} user=postgres dbname=postgres sslmode=verify-full sslrootcert={}\"",
        proxy.addr.port(),
        cert.display()
    );
    for i in 0..cluster.node_count() {
        let extra = if i >= 1 && i == 2 && !opts.replica_delay.is_zero() {
            format!(
                "   (apply delay {})",
                humantime::format_duration(opts.replica_delay)
            )
        } else {
            String::new()
        };
        println!(
            "  {:<9} psql \"{}\"{extra}",
            format!("{}:", cluster.node_name(i)),
            cluster.dsn(i)
        );
    }
    if let Some(ca) = &ca {
        println!(
            "  nodes:    TLS only (hostssl); tidemark uses server_tls.sslmode = verify-full, sslrootcert = {}",
            ca.display()
        );
    }
    if let Some(m) = proxy.metrics_addr {
        println!("  metrics:  http://{m}/metrics   status page: http://{m}/");
    }
    println!(
        "  data:     {}{}",
        cluster.base_dir().display(),
        if opts.keep {
            " (kept on exit)"
        } else {
            " (removed on exit)"
        }
    );
    println!();
    println!("Press Ctrl-C to stop.");
    wait_for_signal().await;
    eprintln!("tidemark dev: shutting down...");
    proxy.shutdown().await;
    tokio::task::spawn_blocking(move || drop(cluster)).await?;
    eprintln!("tidemark dev: stopped.");
    Ok(())
}

pub use crate::signals::wait_for_signal;
