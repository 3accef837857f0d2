//! The admin console: clients connecting to the virtual database `tidemark` as an admin
//! user get `SHOW NODES|POOLS|CLIENTS|STATS|LAG|CONFIG|VERSION`, `RELOAD`, `PAUSE`,
//! `RESUME` over the wire protocol, so psql works. Each command is one function.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tidemark_wire::backend::{self as be, ErrorFields};
use tidemark_wire::frontend::FrontendMessage;

use crate::app::App;
use crate::client::ClientIo;

const COMMANDS: &str =
    "SHOW NODES, SHOW POOLS, SHOW CLIENTS, SHOW STATS, SHOW LAG, SHOW CONFIG, SHOW VERSION, RELOAD";

type Table = (Vec<&'static str>, Vec<Vec<Option<String>>>);

pub async fn run(app: Arc<App>, mut io: ClientIo, user: String) {
    if !app.config.load().admin_users.contains(&user) {
        let e = ErrorFields::fatal(
            "42501",
            format!("user \"{user}\" is not an admin of the tidemark console"),
        )
        .with_hint("add the user to admin_users in the tidemark config");
        let _ = io.send(&e.to_error()).await;
        return;
    }
    io.push(&be::parameter_status(
        "server_version",
        "15.0 (tidemark admin)",
    ));
    io.push(&be::parameter_status("client_encoding", "UTF8"));
    io.push(&be::parameter_status("DateStyle", "ISO, MDY"));
    io.push(&be::parameter_status("standard_conforming_strings", "on"));
    io.push(&be::backend_key_data(0, 0));
    io.push(&be::ready_for_query(b'I'));
    if io.flush().await.is_err() {
        return;
    }
    loop {
        let f = match io.recv().await {
            Ok(f) => f,
            Err(_) => return,
        };
        match FrontendMessage::parse(&f) {
            Ok(FrontendMessage::Query(q)) => {
                let q = q.trim().trim_end_matches(';').trim().to_ascii_uppercase();
                if q.is_empty() {
                    io.push(&be::empty_query());
                } else {
                    match command(&app, &q).await {
                        Ok((cols, rows)) => {
                            if cols.is_empty() {
                                io.push(&be::command_complete(&q));
                            } else {
                                io.push(&be::row_description(&cols));
                                for r in &rows {
                                    io.push(&be::data_row(r));
                                }
                                io.push(&be::command_complete(&format!("SHOW {}", rows.len())));
                            }
                        }
                        Err(e) => io.push(&e.to_error()),
                    }
                }
                io.push(&be::ready_for_query(b'I'));
                if io.flush().await.is_err() {
                    return;
                }
            }
            Ok(FrontendMessage::Terminate) | Err(_) => return,
            Ok(FrontendMessage::Sync) => {
                io.push(&be::ready_for_query(b'I'));
                let _ = io.flush().await;
            }
            Ok(_) => {
                let e = ErrorFields::error(
                    "0A000",
                    "the tidemark console only speaks the simple query protocol",
                );
                io.push(&e.to_error());
            }
        }
    }
}

async fn command(app: &Arc<App>, q: &str) -> Result<Table, ErrorFields> {
    let words: Vec<&str> = q.split_whitespace().collect();
    match words.as_slice() {
        ["SHOW", "NODES"] => Ok(show_nodes(app)),
        ["SHOW", "LAG"] => Ok(show_lag(app)),
        ["SHOW", "POOLS"] => Ok(show_pools(app)),
        ["SHOW", "CLIENTS"] => Ok(show_clients(app)),
        ["SHOW", "STATS"] => Ok(show_stats(app)),
        ["SHOW", "CONFIG"] => Ok(show_config(app)),
        ["SHOW", "VERSION"] => Ok((
            vec!["version"],
            vec![vec![Some(format!(
                "tidemark {}",
                env!("CARGO_PKG_VERSION")
            ))]],
        )),
        ["RELOAD"] => reload(app).map(|_| (vec![], vec![])),
        _ => Err(
            ErrorFields::error("42601", format!("unknown tidemark console command \"{q}\""))
                .with_hint(format!("valid commands: {COMMANDS}")),
        ),
    }
}

fn show_nodes(app: &App) -> Table {
    let v = app.view.load();
    let rows = v
        .nodes
        .iter()
        .map(|n| {
            vec![
                Some(n.name.clone()),
                Some(n.role.as_str().to_string()),
                Some(if n.healthy { "up" } else { "down" }.to_string()),
                Some(if n.in_rotation { "in" } else { "out" }.to_string()),
                Some(n.replay_lsn.to_string()),
                Some(format!("{:.3}", n.lag.as_secs_f64() * 1000.0)),
                Some(n.lag_bytes.to_string()),
            ]
        })
        .collect();
    (
        vec![
            "node",
            "role",
            "health",
            "rotation",
            "lsn",
            "lag_ms",
            "lag_bytes",
        ],
        rows,
    )
}

fn show_lag(app: &App) -> Table {
    let v = app.view.load();
    let rows = v
        .replicas()
        .map(|n| {
            vec![
                Some(n.name.clone()),
                Some(format!("{:.3}", n.lag.as_secs_f64() * 1000.0)),
                Some(n.lag_bytes.to_string()),
                Some(n.replay_lsn.to_string()),
                Some(v.primary_lsn.to_string()),
            ]
        })
        .collect();
    (
        vec!["node", "lag_ms", "lag_bytes", "replay_lsn", "primary_lsn"],
        rows,
    )
}

fn show_pools(app: &App) -> Table {
    let rows = app
        .pools
        .all()
        .iter()
        .map(|p| {
            let s = &p.stats;
            let in_use = s.in_use.load(Ordering::Relaxed);
            let idle = p.idle_count();
            vec![
                Some(p.key.database.clone()),
                Some(p.key.user.clone()),
                Some(app.node_name(p.key.node)),
                Some(s.waiting.load(Ordering::Relaxed).to_string()),
                Some(in_use.to_string()),
                Some(idle.to_string()),
                Some(p.max_size().to_string()),
                Some(s.checkouts.load(Ordering::Relaxed).to_string()),
                Some(s.timeouts.load(Ordering::Relaxed).to_string()),
            ]
        })
        .collect();
    (
        vec![
            "database",
            "user",
            "node",
            "cl_waiting",
            "sv_active",
            "sv_idle",
            "pool_size",
            "checkouts",
            "timeouts",
        ],
        rows,
    )
}

fn show_clients(app: &App) -> Table {
    let rows = app
        .client_infos()
        .into_iter()
        .map(|(pid, c)| {
            vec![
                Some(pid.to_string()),
                Some(c.user),
                Some(c.database),
                Some(c.addr),
                Some(c.state.to_string()),
                c.node.map(|n| app.node_name(n)),
                Some(c.consistency),
            ]
        })
        .collect();
    (
        vec![
            "id",
            "user",
            "database",
            "addr",
            "state",
            "node",
            "consistency",
        ],
        rows,
    )
}

fn show_stats(app: &App) -> Table {
    let (hits, misses) = app.classifier.cache_stats();
    let rows = vec![
        vec![Some("clients".into()), Some(app.client_count().to_string())],
        vec![Some("classify_cache_hits".into()), Some(hits.to_string())],
        vec![
            Some("classify_cache_misses".into()),
            Some(misses.to_string()),
        ],
        vec![
            Some("key_store_entries".into()),
            Some(app.keys.len().to_string()),
        ],
        vec![
            Some("view_generation".into()),
            Some(app.view.load().generation.to_string()),
        ],
    ];
    (vec!["stat", "value"], rows)
}

fn show_config(app: &App) -> Table {
    let c = app.config.load();
    let rows = vec![
        ("listen", c.listen.clone()),
        ("pool.mode", format!("{:?}", c.pool.mode).to_lowercase()),
        ("pool.max_size", c.pool.max_size.to_string()),
        ("routing.consistency", c.routing.consistency.clone()),
        ("routing.max_wait", format!("{:?}", c.routing.max_wait)),
        ("monitor.interval", format!("{:?}", c.monitor.interval)),
        ("monitor.max_lag", format!("{:?}", c.monitor.max_lag)),
        (
            "nodes",
            c.nodes
                .iter()
                .map(|n| format!("{}={}:{}", n.name, n.host, n.port))
                .collect::<Vec<_>>()
                .join(","),
        ),
    ]
    .into_iter()
    .map(|(k, v)| vec![Some(k.to_string()), Some(v)])
    .collect();
    (vec!["key", "value"], rows)
}

fn reload(app: &App) -> Result<(), ErrorFields> {
    let Some(path) = crate::app::config_path() else {
        return Err(ErrorFields::error(
            "55000",
            "tidemark was started without a config file; nothing to reload",
        ));
    };
    let new = crate::config::Config::load(&path)
        .map_err(|e| ErrorFields::error("F0000", format!("config not reloaded: {e}")))?;
    let old = app.config.load_full();
    if new.nodes.len() != old.nodes.len()
        || new
            .nodes
            .iter()
            .zip(&old.nodes)
            .any(|(a, b)| a.name != b.name)
    {
        return Err(ErrorFields::error(
            "0A000",
            "config not reloaded: changing the node list needs a restart in this version",
        ));
    }
    for p in app.pools.all() {
        p.update_settings(new.pool.clone());
    }
    app.config.store(Arc::new(new));
    app.refresh_secrets();
    tracing::info!("config reloaded");
    Ok(())
}
