//! `tidemark check-config FILE [--connect]`: parse and validate a config file as startup
//! does; with `--connect`, log in to every node with the monitor's credentials and with
//! each configured user's server credentials, and report each attempt.

use std::path::Path;
use std::time::Duration;

use crate::app::App;
use crate::config::Config;
use crate::server::{ServerConn, ServerTarget};

/// Exit codes: 0 valid (and, with `--connect`, every login worked), 1 invalid config or a
/// failed login, 2 the file cannot be read.
pub async fn run(path: &Path, connect: bool) -> u8 {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            println!("{}: cannot read: {e}", path.display());
            return 2;
        }
    };
    let cfg = match Config::parse(&text) {
        Ok(c) => c,
        Err(e) => {
            println!("{}: invalid config\n{e:#}", path.display());
            return 1;
        }
    };
    if let Some(w) = crate::config_file::permission_warning(path, &text) {
        println!("warning: {w}");
    }
    // Startup also reads the TLS files; they may exist only on the target host.
    if let Err(e) = crate::tls::acceptor(&cfg.tls) {
        println!("warning: {e:#} (startup fails unless this is readable where tidemark runs)");
    }
    if !connect {
        println!("ok");
        return 0;
    }
    let failed = connect_all(cfg).await;
    if failed == 0 {
        println!("ok");
        0
    } else {
        println!("{failed} connection check(s) failed");
        1
    }
}

/// Tries every node with the monitor's credentials and every user's server credentials
/// (database `monitor.database`); prints one line per attempt, returns how many failed.
async fn connect_all(cfg: Config) -> usize {
    let timeout = cfg.pool.connect_timeout.max(Duration::from_millis(100));
    let app = match App::new(cfg.clone()) {
        Ok(app) => app,
        Err(e) => {
            println!("failed: {e:#}");
            return 1;
        }
    };
    let mut failed = 0;
    for (i, n) in cfg.nodes.iter().enumerate() {
        let at = format!("node {} ({}:{})", n.name, n.host, n.port);
        match app.monitor_client(i, "tidemark check-config").await {
            Ok(c) => match c.simple_query("SELECT 1").await {
                Ok(_) => println!("{at} monitor user {}: ok", cfg.monitor.user),
                Err(e) => {
                    failed += 1;
                    println!("{at} monitor user {}: failed: {e}", cfg.monitor.user);
                }
            },
            Err(e) => {
                failed += 1;
                println!("{at} monitor user {}: failed: {e:#}", cfg.monitor.user);
            }
        }
        for u in &cfg.users {
            let password = u.server_password();
            if password.is_none() && u.password.is_some() {
                println!(
                    "{at} user {}: skipped (only a SCRAM verifier, no server_password)",
                    u.name
                );
                continue;
            }
            let target = ServerTarget {
                node: i,
                host: n.host.clone(),
                port: n.port,
                user: u.name.clone(),
                password,
                database: cfg.monitor.database.clone(),
                keys: None,
                tls: match app.node_tls(i) {
                    Some(t) => t,
                    None => {
                        failed += 1;
                        println!("{at} user {}: failed: no TLS settings for the node", u.name);
                        continue;
                    }
                },
            };
            match ServerConn::connect(&target, timeout).await {
                Ok(conn) => {
                    conn.terminate().await;
                    println!(
                        "{at} user {} (database {}): ok",
                        u.name, cfg.monitor.database
                    );
                }
                Err(e) => {
                    failed += 1;
                    println!(
                        "{at} user {} (database {}): failed: {e}",
                        u.name, cfg.monitor.database
                    );
                }
            }
        }
    }
    failed
}
