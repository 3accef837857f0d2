//! Observability against a real primary + replicas: `/metrics` after known traffic (and
//! every metric the Grafana dashboard queries exists in it), the admin console, the status
//! page and its JSON.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use tidemark::config::{AuthMethod, UserConfig, WaitMode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_postgres::error::SqlState;
use tokio_postgres::Client;

/// GET over plain HTTP/1.1; returns (status line, body).
async fn get(addr: SocketAddr, path: &str) -> (String, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8(buf).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    (head.lines().next().unwrap().to_string(), body.to_string())
}

async fn metrics(addr: SocketAddr) -> String {
    let (status, body) = get(addr, "/metrics").await;
    assert!(status.contains("200"), "{status}");
    body
}

/// Sum of all samples of `name` whose label set contains every `k="v"` in `labels`.
fn sample_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, lbls) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            if n != name {
                return None;
            }
            labels
                .iter()
                .all(|(k, v)| lbls.split(',').any(|p| p == format!("{k}=\"{v}\"")))
                .then(|| value.parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

/// Sample names present in a Prometheus text exposition, and the declared types.
fn exposition(text: &str) -> (BTreeSet<String>, Vec<(String, String)>) {
    let mut names = BTreeSet::new();
    let mut types = Vec::new();
    for l in text.lines() {
        if let Some(rest) = l.strip_prefix("# TYPE ") {
            let mut it = rest.split_whitespace();
            if let (Some(n), Some(t)) = (it.next(), it.next()) {
                types.push((n.to_string(), t.to_string()));
            }
        } else if !l.starts_with('#') && !l.trim().is_empty() {
            let end = l.find(['{', ' ']).unwrap_or(l.len());
            names.insert(l[..end].to_string());
        }
    }
    (names, types)
}

/// Every `tidemark_*` metric name in the dashboard's queries (panel `expr`s and the
/// template variable queries).
fn dashboard_metric_names() -> BTreeSet<String> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../docs/grafana/tidemark.json"
    );
    let text = std::fs::read_to_string(path).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut exprs = Vec::new();
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("expr" | "definition", serde_json::Value::String(s)) => {
                            out.push(s.clone())
                        }
                        _ => walk(v, out),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    walk(&json, &mut exprs);
    assert!(exprs.len() >= 10, "the dashboard has queries: {exprs:?}");
    let mut names = BTreeSet::new();
    for e in &exprs {
        let mut rest = e.as_str();
        while let Some(i) = rest.find("tidemark_") {
            let tail = &rest[i..];
            let end = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(tail.len());
            names.insert(tail[..end].to_string());
            rest = &tail[end..];
        }
    }
    names
}

async fn stat(console: &Client, key: &str) -> String {
    let msgs = console.simple_query("SHOW STATS").await.unwrap();
    rows_by_name(&msgs)
        .into_iter()
        .find(|r| r.get("stat") == Some(key))
        .and_then(|r| r.get("value").map(str::to_string))
        .unwrap_or_else(|| panic!("SHOW STATS has no {key}"))
}

async fn try_connect(dsn: &str) -> Result<Client, tokio_postgres::Error> {
    let (c, conn) = tokio_postgres::connect(dsn, tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(c)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_console_and_status_page_against_a_real_cluster() {
    let env = start(&[None, None], |cfg| {
        cfg.metrics.listen = Some("127.0.0.1:0".into());
        // Long enough that a loaded machine's replica lag (a replica lagging beyond the wait
        // budget is not waited for) never skips the wait this test counts. The fixed policy:
        // the adaptive one caps the budget at the primary's round trip (well under a
        // millisecond here), so any lag sample above that plus the monitor interval would
        // send the unreachable token straight to the primary without a wait to count.
        cfg.routing.max_wait = std::time::Duration::from_secs(1);
        cfg.routing.wait = WaitMode::Fixed;
        cfg.users.push(UserConfig {
            name: "viewer".into(),
            password: None,
            auth: AuthMethod::Trust,
            server_password: None,
            consistency: None,
            transactions: None,
            password_file: None,
            password_env: None,
            server_password_file: None,
            server_password_env: None,
        });
    })
    .await;
    let maddr = env.proxy.metrics_addr.expect("metrics listen address");
    let p = env.proxy.addr;
    let names: Vec<String> = (0..env.cluster.node_count())
        .map(|i| env.cluster.node_name(i).to_string())
        .collect();

    // --- traffic: writes, reads, a fallback, errors ---
    let c = env.client().await;
    c.batch_execute("CREATE TABLE obs (id int PRIMARY KEY, v text)")
        .await
        .unwrap();
    for i in 0..20 {
        c.simple_query(&format!("INSERT INTO obs VALUES ({i}, 'x')"))
            .await
            .unwrap();
        c.simple_query(&format!("SELECT v FROM obs WHERE id = {i}"))
            .await
            .unwrap();
    }
    // A causality token no replica has reached: waits routing.max_wait, then the primary.
    c.simple_query("/* tidemark: min_lsn=FF/0 */ SELECT 1")
        .await
        .unwrap();
    // An unknown user is refused as a wrong password is (28P01 after a SCRAM exchange).
    let Err(e) = try_connect(&format!(
        "host={} port={} user=nobody password=guess dbname=postgres",
        p.ip(),
        p.port()
    ))
    .await
    else {
        panic!("unknown user refused");
    };
    assert_eq!(e.code(), Some(&SqlState::INVALID_PASSWORD));

    // --- counters move by exactly the traffic: 50 eventual reads → 50 replica reads ---
    let before = metrics(maddr).await;
    let replica_before = sample_sum(&before, "tidemark_reads_total", &[("target", "replica")]);
    let r = env.client().await;
    for _ in 0..50 {
        r.simple_query("/* tidemark: consistency=eventual */ SELECT 1")
            .await
            .unwrap();
    }
    let after = metrics(maddr).await;
    let replica_after = sample_sum(&after, "tidemark_reads_total", &[("target", "replica")]);
    assert_eq!(
        replica_after - replica_before,
        50.0,
        "replica reads counter"
    );
    // A session whose statements take more label sets than its handle cache keeps (autocommit
    // writes and reads, then a transaction's first write, placed with its deferred BEGIN,
    // and a read, a write and the end on the held connection): every statement is counted
    // once, under its own class.
    let by_class =
        |t: &str, class: &str| sample_sum(t, "tidemark_statements_total", &[("class", class)]);
    for i in 0..3 {
        r.simple_query(&format!("INSERT INTO obs VALUES ({}, 'y')", 5000 + i))
            .await
            .unwrap();
        r.simple_query("SELECT v FROM obs WHERE id = 0")
            .await
            .unwrap();
        r.simple_query("BEGIN").await.unwrap();
        r.simple_query(&format!("UPDATE obs SET v = 'z' WHERE id = {}", 5000 + i))
            .await
            .unwrap();
        r.simple_query("SELECT v FROM obs WHERE id = 1")
            .await
            .unwrap();
        r.simple_query(&format!("UPDATE obs SET v = 'w' WHERE id = {}", 5000 + i))
            .await
            .unwrap();
        r.simple_query("COMMIT").await.unwrap();
    }
    let mixed = metrics(maddr).await;
    assert_eq!(
        by_class(&mixed, "write") - by_class(&after, "write"),
        9.0,
        "writes counted by class\n{mixed}"
    );
    assert_eq!(
        by_class(&mixed, "read") - by_class(&after, "read"),
        6.0,
        "reads counted by class\n{mixed}"
    );
    assert!(
        by_class(&mixed, "transaction") - by_class(&after, "transaction") >= 3.0,
        "the COMMITs counted\n{mixed}"
    );
    for class in ["write", "read"] {
        let held = |t: &str| {
            sample_sum(
                t,
                "tidemark_statements_total",
                &[("class", class), ("target", "pinned")],
            )
        };
        assert_eq!(
            held(&mixed) - held(&after),
            3.0,
            "{class}s on the transaction's connection\n{mixed}"
        );
    }
    assert!(
        sample_sum(
            &after,
            "tidemark_fallbacks_total",
            &[("reason", "replicas_behind")]
        ) >= 1.0,
        "the unreachable token counts as a fallback"
    );
    assert!(
        sample_sum(
            &after,
            "tidemark_lsn_wait_seconds_count",
            &[("outcome", "fallback")]
        ) >= 1.0
    );
    assert!(sample_sum(&after, "tidemark_errors_total", &[("sqlstate", "28P01")]) >= 1.0);
    assert!(sample_sum(&after, "tidemark_reads_replica_ratio", &[]) > 0.5);
    // Node gauges and the checkout-wait histogram are recorded through handles kept by the
    // monitor and the pools: they must reach the exposition with the right values.
    for (node, role) in [(&names[0], "primary"), (&names[1], "replica")] {
        for r in ["primary", "replica", "unknown"] {
            assert_eq!(
                sample_sum(&after, "tidemark_node_role", &[("node", node), ("role", r)]),
                if r == role { 1.0 } else { 0.0 },
                "tidemark_node_role of {node}, role {r}"
            );
        }
        assert_eq!(
            sample_sum(&after, "tidemark_node_healthy", &[("node", node)]),
            1.0
        );
    }
    assert!(
        sample_sum(
            &after,
            "tidemark_replica_lag_sample_seconds_count",
            &[("node", &names[1])]
        ) > 0.0
    );
    assert!(
        sample_sum(&after, "tidemark_pool_checkout_wait_seconds_count", &[]) >= 50.0,
        "every checkout is counted in the wait histogram"
    );

    // --- replication slots are polled from the primary (every 5 s, first at once) ---
    let deadline = Instant::now() + Duration::from_secs(15);
    let text = loop {
        let t = metrics(maddr).await;
        if t.contains("tidemark_replication_slot_retained_bytes{") {
            break t;
        }
        assert!(Instant::now() < deadline, "no slot metric in:\n{t}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    // --- every metric the dashboard queries exists ---
    let (present, types) = exposition(&text);
    let mut missing = Vec::new();
    for n in dashboard_metric_names() {
        if !present.contains(&n) {
            missing.push(n.clone());
            continue;
        }
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(base) = n.strip_suffix(suffix) {
                assert!(
                    types.iter().any(|(t, k)| t == base && k == "histogram"),
                    "{n}: the dashboard treats {base} as a histogram, /metrics does not"
                );
            }
        }
    }
    assert!(
        missing.is_empty(),
        "the dashboard queries metrics /metrics does not have: {missing:?}\n{text}"
    );
    // Bounded labels: nothing per client, statement or key.
    for l in text.lines().filter(|l| !l.starts_with('#')) {
        for bad in ["client=", "query=", "statement=", "key=", "pid="] {
            assert!(!l.contains(bad), "unbounded label in {l}");
        }
    }

    // --- admin console ---
    let console_dsn = format!(
        "host={} port={} user=postgres dbname=tidemark",
        p.ip(),
        p.port()
    );
    let console = connect(&console_dsn).await;
    let msgs = console.simple_query("SHOW NODES").await.unwrap();
    let nodes = rows_by_name(&msgs);
    assert_eq!(nodes.len(), names.len());
    for (r, n) in nodes.iter().zip(&names) {
        assert_eq!(r.get("node"), Some(n.as_str()));
        assert_eq!(r.get("health"), Some("up"));
    }
    assert_eq!(nodes[0].get("role"), Some("primary"));
    let msgs = console.simple_query("show   servers;").await.unwrap();
    let servers = rows_by_name(&msgs);
    assert!(
        !servers.is_empty(),
        "SHOW SERVERS lists the pooled connections"
    );
    assert!(servers.iter().all(|r| r.get("remote_pid").is_some()));
    // A connection held by an open transaction is listed as active, with its server pid,
    // and as idle once the transaction has ended.
    let holder = env.client().await;
    holder.batch_execute("BEGIN").await.unwrap();
    holder.batch_execute("SELECT 1").await.unwrap();
    let server_states = |msgs: &[tokio_postgres::SimpleQueryMessage]| -> Vec<(String, String)> {
        rows_by_name(msgs)
            .iter()
            .map(|r| {
                (
                    r.get("state").unwrap_or_default().to_string(),
                    r.get("remote_pid").unwrap_or_default().to_string(),
                )
            })
            .collect()
    };
    let during = server_states(&console.simple_query("SHOW SERVERS").await.unwrap());
    let active: Vec<&String> = during
        .iter()
        .filter(|(state, _)| state == "active")
        .map(|(_, pid)| pid)
        .collect();
    assert_eq!(active.len(), 1, "one connection in use: {during:?}");
    holder.batch_execute("COMMIT").await.unwrap();
    let after = server_states(&console.simple_query("SHOW SERVERS").await.unwrap());
    assert!(after.iter().all(|(state, _)| state == "idle"), "{after:?}");
    assert!(
        after.iter().any(|(_, pid)| pid == active[0]),
        "the connection went back to the pool: {after:?}"
    );
    for cmd in [
        "SHOW POOLS",
        "SHOW CLIENTS",
        "SHOW LAG",
        "SHOW CONFIG",
        "SHOW VERSION",
    ] {
        console.simple_query(cmd).await.unwrap();
    }
    let e = console.simple_query("SHOW BOGUS").await.unwrap_err();
    assert_eq!(e.code(), Some(&SqlState::SYNTAX_ERROR));
    let hint = e.as_db_error().and_then(|d| d.hint()).unwrap_or("");
    assert!(
        hint.contains("SHOW SERVERS") && hint.contains("PAUSE"),
        "{hint}"
    );
    // PAUSE / RESUME flip the shared flag and show in SHOW STATS and the metrics.
    assert_eq!(stat(&console, "paused").await, "false");
    console.simple_query("PAUSE").await.unwrap();
    assert!(*env.proxy.app.paused.borrow());
    assert_eq!(stat(&console, "paused").await, "true");
    assert_eq!(
        sample_sum(&metrics(maddr).await, "tidemark_paused", &[]),
        1.0
    );
    let e = console.simple_query("PAUSE").await.unwrap_err();
    assert_eq!(e.code(), Some(&SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE));
    console.simple_query("RESUME").await.unwrap();
    assert!(!*env.proxy.app.paused.borrow());
    assert_eq!(stat(&console, "paused").await, "false");
    // A user that is not in admin_users gets 42501.
    let Err(e) = try_connect(&format!(
        "host={} port={} user=viewer dbname=tidemark",
        p.ip(),
        p.port()
    ))
    .await
    else {
        panic!("non-admin refused");
    };
    assert_eq!(e.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE));

    // --- paused replay shows in SHOW NODES and in the lag gauge ---
    env.cluster.pause_replay(1).unwrap();
    c.simple_query("INSERT INTO obs SELECT g, 'y' FROM generate_series(100, 2000) g")
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let msgs = console.simple_query("SHOW NODES").await.unwrap();
        let lag: u64 = rows_by_name(&msgs)[1]
            .get("lag_bytes")
            .unwrap()
            .parse()
            .unwrap();
        let gauge = sample_sum(
            &metrics(maddr).await,
            "tidemark_replica_lag_bytes",
            &[("node", &names[1])],
        );
        if lag > 0 && gauge > 0.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "paused replay never showed as lag"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    env.cluster.resume_replay(1).unwrap();

    // --- status page and its JSON ---
    let (status, html) = get(maddr, "/").await;
    assert!(status.contains("200"));
    assert!(html.starts_with("<!doctype html>"));
    assert!(html.contains("/status.json"));
    assert!(!html.contains("src=\"http"), "no external assets");
    for n in &names {
        assert!(html.contains(n.as_str()), "status page names {n}");
    }
    let (status, body) = get(maddr, "/status.json").await;
    assert!(status.contains("200"));
    let j: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(j["nodes"].as_array().unwrap().len(), names.len());
    assert_eq!(j["primary"], names[0].as_str());
    assert!(j["routing"]["replica_reads"].as_u64().unwrap() >= 50);
    assert!(
        j["routing"]["fallbacks"]["replicas_behind"]
            .as_u64()
            .unwrap()
            >= 1
    );
    assert!(!j["pools"].as_array().unwrap().is_empty());
    assert!(!j["slots"].as_array().unwrap().is_empty());
    let (status, _) = get(maddr, "/nope").await;
    assert!(status.contains("404"));

    drop(console);
    env.proxy.shutdown().await;
}
