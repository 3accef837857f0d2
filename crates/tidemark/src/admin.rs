//! The admin console: clients connecting to the virtual database `tidemark` as an admin
//! user get `SHOW NODES|POOLS|SERVERS|CLIENTS|STATS|LAG|TRANSACTIONS|CONFIG|VERSION`, `RELOAD`, `PAUSE`,
//! `RESUME` over the wire protocol, so psql works.
//!
//! Every command is one function registered in [`COMMANDS`]: adding `SHOW X` is one row
//! there and one function. The error for an unknown command lists the table.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tidemark_wire::backend::{self as be, ErrorFields};
use tidemark_wire::frontend::FrontendMessage;

use crate::app::App;
use crate::client::ClientIo;

type Row = Vec<Option<String>>;

/// What a command answers: a result set, or just a command tag.
pub enum Output {
    Rows(Vec<&'static str>, Vec<Row>),
    Done(&'static str),
}

/// One console command.
pub struct Command {
    /// The command as typed (upper case, single spaces), e.g. `SHOW NODES`.
    pub name: &'static str,
    pub help: &'static str,
    pub run: fn(&App) -> Result<Output, ErrorFields>,
}

/// Every console command, in the order the help lists them.
pub const COMMANDS: &[Command] = &[
    Command {
        name: "SHOW NODES",
        help: "role, health, gate, replay LSN and lag of every node",
        run: show_nodes,
    },
    Command {
        name: "SHOW LAG",
        help: "replica lag in ms and bytes",
        run: show_lag,
    },
    Command {
        name: "SHOW POOLS",
        help: "one row per pool: clients waiting, server connections, checkouts",
        run: show_pools,
    },
    Command {
        name: "SHOW SERVERS",
        help: "one row per server connection",
        run: show_servers,
    },
    Command {
        name: "SHOW CLIENTS",
        help: "one row per client connection",
        run: show_clients,
    },
    Command {
        name: "SHOW STATS",
        help: "counters of the last minute and process state",
        run: show_stats,
    },
    Command {
        name: "SHOW TRANSACTIONS",
        help: "optimistic transactions: outcomes, replays, learned shapes",
        run: show_transactions,
    },
    Command {
        name: "SHOW CONFIG",
        help: "the effective configuration",
        run: show_config,
    },
    Command {
        name: "SHOW VERSION",
        help: "tidemark's version",
        run: show_version,
    },
    Command {
        name: "RELOAD",
        help: "re-read the config file",
        run: reload,
    },
    Command {
        name: "PAUSE",
        help: "hold new transactions until RESUME",
        run: pause,
    },
    Command {
        name: "RESUME",
        help: "let held transactions run",
        run: resume,
    },
];

fn command_list() -> String {
    COMMANDS
        .iter()
        .map(|c| c.name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Finds a command by what the client typed (case and spacing do not matter).
pub fn lookup(q: &str) -> Option<&'static Command> {
    let words = q.split_whitespace().collect::<Vec<_>>().join(" ");
    COMMANDS
        .iter()
        .find(|c| c.name.eq_ignore_ascii_case(&words))
}

pub async fn run(app: Arc<App>, mut io: ClientIo, user: String) {
    if !app.config.load().admin_users.contains(&user) {
        let e = ErrorFields::fatal(
            "42501",
            format!("user \"{user}\" is not an admin of the tidemark console"),
        )
        .with_hint("add the user to admin_users in the tidemark config");
        crate::metrics::error(&e.code);
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
                let q = q.trim().trim_end_matches(';').trim().to_string();
                if q.is_empty() {
                    io.push(&be::empty_query());
                } else {
                    match command(&app, &q) {
                        Ok(Output::Done(tag)) => io.push(&be::command_complete(tag)),
                        Ok(Output::Rows(cols, rows)) => {
                            io.push(&be::row_description(&cols));
                            for r in &rows {
                                io.push(&be::data_row(r));
                            }
                            io.push(&be::command_complete(&format!("SHOW {}", rows.len())));
                        }
                        Err(e) => {
                            crate::metrics::error(&e.code);
                            io.push(&e.to_error());
                        }
                    }
                }
                io.push(&be::ready_for_query(b'I'));
                if io.flush().await.is_err() {
                    return;
                }
            }
            Ok(FrontendMessage::Terminate) | Err(_) => return,
            Ok(FrontendMessage::NonUtf8 { simple: true, .. }) => {
                let e = ErrorFields::error(
                    "22021",
                    "the tidemark console reads commands in UTF-8 (ASCII) only",
                );
                io.push(&e.to_error());
                io.push(&be::ready_for_query(b'I'));
                if io.flush().await.is_err() {
                    return;
                }
            }
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

fn command(app: &App, q: &str) -> Result<Output, ErrorFields> {
    match lookup(q) {
        Some(c) => (c.run)(app),
        None => Err(ErrorFields::error(
            "42601",
            format!("unknown tidemark console command \"{q}\""),
        )
        .with_hint(format!("valid commands: {}", command_list()))),
    }
}

fn s(v: impl ToString) -> Option<String> {
    Some(v.to_string())
}

fn ms(d: std::time::Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1000.0)
}

fn show_nodes(app: &App) -> Result<Output, ErrorFields> {
    let v = app.view.load();
    let cfg = app.config.load();
    let rows = v
        .nodes
        .iter()
        .map(|n| {
            let retired = cfg.nodes.get(n.id).is_some_and(|c| c.retired);
            vec![
                s(&n.name),
                s(n.role.as_str()),
                // A node a RELOAD removed keeps its place, out of service.
                s(if retired {
                    "retired"
                } else if n.healthy {
                    "up"
                } else {
                    "down"
                }),
                s(if n.in_rotation { "in" } else { "out" }),
                s(n.replay_lsn),
                s(ms(n.lag)),
                s(n.lag_bytes),
                s(n.sync_state.as_str()),
                s(if n.synchronous_apply { "yes" } else { "no" }),
            ]
        })
        .collect();
    Ok(Output::Rows(
        vec![
            "node",
            "role",
            "health",
            "rotation",
            "lsn",
            "lag_ms",
            "lag_bytes",
            "sync_state",
            "remote_apply",
        ],
        rows,
    ))
}

fn show_lag(app: &App) -> Result<Output, ErrorFields> {
    let v = app.view.load();
    let rows = v
        .replicas()
        .map(|n| {
            vec![
                s(&n.name),
                s(ms(n.lag)),
                s(n.lag_bytes),
                s(n.replay_lsn),
                s(v.primary_lsn),
            ]
        })
        .collect();
    Ok(Output::Rows(
        vec!["node", "lag_ms", "lag_bytes", "replay_lsn", "primary_lsn"],
        rows,
    ))
}

fn show_pools(app: &App) -> Result<Output, ErrorFields> {
    let rows = app
        .pools
        .all()
        .iter()
        .map(|p| {
            let st = &p.stats;
            let checkouts = st.checkouts.load(Ordering::Relaxed);
            let wait_us = st.wait_micros.load(Ordering::Relaxed);
            vec![
                s(&p.key.database),
                s(&p.key.user),
                s(app.node_name(p.key.node)),
                s(st.waiting.load(Ordering::Relaxed)),
                s(st.in_use.load(Ordering::Relaxed)),
                s(p.idle_count()),
                s(p.max_size()),
                s(checkouts),
                s(wait_us.checked_div(checkouts).unwrap_or(0)),
                s(st.timeouts.load(Ordering::Relaxed)),
            ]
        })
        .collect();
    Ok(Output::Rows(
        vec![
            "database",
            "user",
            "node",
            "cl_waiting",
            "sv_active",
            "sv_idle",
            "pool_size",
            "checkouts",
            "avg_wait_us",
            "timeouts",
        ],
        rows,
    ))
}

/// PgBouncer's SHOW SERVERS columns where they mean something here; times are ages in
/// seconds rather than timestamps.
fn show_servers(app: &App) -> Result<Output, ErrorFields> {
    let cfg = app.config.load();
    let now = crate::clock::Coarse::now();
    let mut rows = Vec::new();
    for p in app.pools.all() {
        let (host, port) = cfg
            .nodes
            .get(p.key.node)
            .map(|n| (n.host.clone(), n.port.to_string()))
            .unwrap_or_default();
        for sv in p.servers() {
            rows.push(vec![
                s("S"),
                s(&p.key.user),
                s(&p.key.database),
                s(app.node_name(p.key.node)),
                s(if sv.active { "active" } else { "idle" }),
                s(&host),
                s(&port),
                s(format!(
                    "{:.1}",
                    now.duration_since(sv.created).as_secs_f64()
                )),
                s(format!("{:.1}", now.duration_since(sv.since).as_secs_f64())),
                s(sv.pid),
                s(&p.name),
            ]);
        }
    }
    Ok(Output::Rows(
        vec![
            "type",
            "user",
            "database",
            "node",
            "state",
            "addr",
            "port",
            "connect_age_s",
            "state_age_s",
            "remote_pid",
            "pool",
        ],
        rows,
    ))
}

fn show_clients(app: &App) -> Result<Output, ErrorFields> {
    let rows = app
        .client_infos()
        .into_iter()
        .map(|(pid, c)| {
            vec![
                s(pid),
                Some(c.user),
                Some(c.database),
                Some(c.addr),
                s(c.state),
                c.node.map(|n| app.node_name(n)),
                Some(c.consistency),
            ]
        })
        .collect();
    Ok(Output::Rows(
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
    ))
}

fn show_stats(app: &App) -> Result<Output, ErrorFields> {
    let (hits, misses) = app.classifier.cache_stats();
    let m = crate::metrics::recent::summary(60);
    let reads = m.replica_reads + m.primary_reads;
    let share = if reads == 0 {
        "-".to_string()
    } else {
        format!("{:.1}%", 100.0 * m.replica_reads as f64 / reads as f64)
    };
    let fallbacks = m.fallbacks.iter().map(|(_, n)| n).sum::<u64>();
    let mut rows: Vec<(String, Option<String>)> = [
        ("paused", s(*app.paused.borrow())),
        ("clients", s(app.client_count())),
        ("statements_last_minute", s(m.statements)),
        ("replica_reads_last_minute", s(m.replica_reads)),
        ("primary_reads_last_minute", s(m.primary_reads)),
        ("replica_read_share_last_minute", s(share)),
        ("fallbacks_last_minute", s(fallbacks)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    for (reason, n) in &m.fallbacks {
        rows.push((format!("fallbacks_last_minute.{reason}"), s(n)));
    }
    rows.extend(
        [
            ("errors_last_minute", s(m.errors)),
            ("classify_cache_hits", s(hits)),
            ("classify_cache_misses", s(misses)),
            ("key_store_entries", s(app.keys.len())),
            ("view_generation", s(app.view.load().generation)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v)),
    );
    let rows = rows.into_iter().map(|(k, v)| vec![Some(k), v]).collect();
    Ok(Output::Rows(vec!["stat", "value"], rows))
}

/// `routing.transactions` outcomes since start (one row each), replays, and what was learned.
fn show_transactions(app: &App) -> Result<Output, ErrorFields> {
    let c = app.transactions.counts();
    let mut rows: Vec<Row> = c
        .outcomes
        .iter()
        .map(|(o, n)| vec![s(format!("outcome.{o}")), s(n)])
        .collect();
    rows.push(vec![s("replays"), s(c.replays)]);
    rows.push(vec![s("replayed_bytes"), s(c.replay_bytes)]);
    rows.push(vec![s("shapes"), s(c.shapes)]);
    rows.push(vec![
        s("shapes_starting_on_primary"),
        s(c.shapes_on_primary),
    ]);
    Ok(Output::Rows(vec!["stat", "value"], rows))
}

fn show_config(app: &App) -> Result<Output, ErrorFields> {
    let c = app.config.load();
    let rows = vec![
        ("listen", c.listen.clone()),
        ("pool.mode", format!("{:?}", c.pool.mode).to_lowercase()),
        ("pool.max_size", c.pool.max_size.to_string()),
        ("routing.consistency", c.routing.consistency.clone()),
        ("routing.max_wait", format!("{:?}", c.routing.max_wait)),
        ("routing.wait", c.routing.wait.policy().as_str().to_string()),
        ("routing.transactions", c.routing.transactions.to_string()),
        (
            "routing.replay_budget_bytes",
            c.routing.replay_budget_bytes.to_string(),
        ),
        ("monitor.interval", format!("{:?}", c.monitor.interval)),
        (
            "monitor.idle_interval",
            format!("{:?}", c.monitor.idle_interval),
        ),
        ("monitor.max_lag", format!("{:?}", c.monitor.max_lag)),
        (
            "metrics.listen",
            c.metrics.listen.clone().unwrap_or_else(|| "off".into()),
        ),
        (
            "nodes",
            c.nodes
                .iter()
                .map(|n| {
                    let retired = if n.retired { " (retired)" } else { "" };
                    format!("{}={}:{}{retired}", n.name, n.host, n.port)
                })
                .collect::<Vec<_>>()
                .join(","),
        ),
    ]
    .into_iter()
    .map(|(k, v)| vec![s(k), Some(v)])
    .collect();
    Ok(Output::Rows(vec!["key", "value"], rows))
}

fn show_version(_app: &App) -> Result<Output, ErrorFields> {
    Ok(Output::Rows(
        vec!["version"],
        vec![vec![s(format!("tidemark {}", env!("CARGO_PKG_VERSION")))]],
    ))
}

/// Holds new transactions (sessions wait while `app.paused` is true); running ones finish.
fn pause(app: &App) -> Result<Output, ErrorFields> {
    if app.set_paused(true) {
        return Err(ErrorFields::error("55000", "tidemark is already paused")
            .with_hint("RESUME lets held transactions run"));
    }
    crate::metrics::paused(true);
    tracing::info!("paused from the console: new transactions are held");
    Ok(Output::Done("PAUSE"))
}

fn resume(app: &App) -> Result<Output, ErrorFields> {
    if !app.set_paused(false) {
        return Err(ErrorFields::error("55000", "tidemark is not paused"));
    }
    crate::metrics::paused(false);
    tracing::info!("resumed from the console");
    Ok(Output::Done("RESUME"))
}

fn reload(app: &App) -> Result<Output, ErrorFields> {
    apply_reload(app)?;
    Ok(Output::Done("RELOAD"))
}

/// Re-reads the config file and applies it (the console's RELOAD and SIGHUP). A refused
/// reload changes nothing: the old config stays in force.
pub fn apply_reload(app: &App) -> Result<(), ErrorFields> {
    let Some(path) = crate::app::config_path() else {
        return Err(ErrorFields::error(
            "55000",
            "tidemark was started without a config file; nothing to reload",
        ));
    };
    let new = crate::config::Config::load(&path)
        .map_err(|e| ErrorFields::error("F0000", format!("config not reloaded: {e}")))?;
    let mut new = new;
    let old = app.config.load_full();
    // Node ids are indices into `nodes` for the life of the process: keep each node's index
    // by name, append new names, keep removed nodes as retired.
    let nodes = crate::reload::reconcile(&old.nodes, &new.nodes);
    new.nodes = nodes.nodes.clone();
    let tls = crate::tls::acceptor(&new.tls)
        .map_err(|e| ErrorFields::error("F0000", format!("config not reloaded: {e}")))?;
    // A retired node keeps the settings it had (its files may be gone).
    let old_tls = app.server_tls.load_full();
    let server_tls = new
        .nodes
        .iter()
        .enumerate()
        .map(|(i, n)| match old_tls.get(i) {
            Some(t) if n.retired => Ok(t.clone()),
            _ => crate::server_tls::NodeTls::build(&new, n).map(Arc::new),
        })
        .collect::<anyhow::Result<Vec<_>>>()
        .map_err(|e| ErrorFields::error("F0000", format!("config not reloaded: {e}")))?;
    for p in app.pools.all() {
        p.update_settings(new.pool.clone());
    }
    app.tls.store(tls.map(Arc::new));
    // Addresses first: a session that sees a new node in the config finds its address.
    app.server_tls.store(Arc::new(server_tls));
    app.classifier
        .set_comment_key_attribute(&new.routing.comment_key_attribute);
    app.config.store(Arc::new(new));
    app.refresh_secrets();
    if nodes.changes_nodes() {
        apply_node_changes(app, &nodes);
    }
    tracing::info!("config reloaded");
    Ok(())
}

/// The node-list part of a RELOAD, once the reconciled config is installed: retired nodes
/// leave the view at once, pools of retired and moved nodes are drained (a transaction on
/// one of their connections finishes there; the connection is closed when it comes back)
/// and the monitor polls added nodes, stops polling retired ones and reconnects moved ones.
fn apply_node_changes(app: &App, r: &crate::reload::Reconciled) {
    let cfg = app.config.load();
    let name = |i: usize| cfg.nodes[i].name.clone();
    for &i in &r.added {
        let n = &cfg.nodes[i];
        tracing::info!(node = %n.name, host = %n.host, port = n.port, "reload adds a node");
    }
    for &i in &r.retired {
        tracing::info!(node = %name(i), "reload removes a node: no new reads or connections go to it; open transactions on it finish");
    }
    for &i in &r.moved {
        let n = &cfg.nodes[i];
        tracing::info!(node = %n.name, host = %n.host, port = n.port, "reload moves a node: its pools are drained and it is polled at the new address");
    }
    // Retired nodes are out of the view before anything can route to them; the monitor
    // republishes it in full once it has followed the change.
    let view = app.view.load_full();
    let mut v = (*view).clone();
    for st in v.nodes.iter_mut() {
        if cfg.nodes.get(st.id).is_some_and(|n| n.retired) || r.moved.contains(&st.id) {
            st.healthy = false;
            st.in_rotation = false;
        }
    }
    if matches!(v.primary, tidemark_core::PrimaryState::One(p) if !v.nodes.get(p).is_some_and(|n| n.healthy))
    {
        v.primary = tidemark_core::PrimaryState::Unknown;
    }
    while v.nodes.len() < cfg.nodes.len() {
        let i = v.nodes.len();
        v.nodes.push(tidemark_core::NodeStatus::new(i, name(i)));
    }
    app.view.store(Arc::new(v));
    app.view_changed.notify_waiters();
    for &i in r.retired.iter().chain(&r.moved) {
        app.pools.drain_node(i);
        app.node_errors.lock().remove(&i);
    }
    app.nodes_changed.send_modify(|g| *g += 1);
}
