//! RELOAD (and SIGHUP) applies node-list changes without dropping clients: an added replica
//! is polled and serves reads, a removed one is drained (its open transactions finish) and
//! never routed to again, a moved one is polled at its new address.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tokio_postgres::Client;

/// Writes a config with these `(name, port)` nodes; reads round-robin over replicas.
fn write_config(path: &std::path::Path, nodes: &[(&str, u16)]) {
    let mut text = "listen = \"127.0.0.1:0\"\nadmin_users = [\"postgres\"]\n\
                    [routing]\nbalance = \"statement\"\n"
        .to_string();
    for (name, port) in nodes {
        text.push_str(&format!("[[nodes]]\nname = \"{name}\"\nport = {port}\n"));
    }
    text.push_str("[[users]]\nname = \"postgres\"\nauth = \"trust\"\n");
    std::fs::write(path, text).unwrap();
}

async fn eventual_port(c: &Client) -> u16 {
    let msgs = c
        .simple_query("/* tidemark: consistency=eventual */ SELECT inet_server_port()")
        .await
        .unwrap();
    rows(&msgs)[0][0].as_deref().unwrap().parse().unwrap()
}

/// SHOW NODES as (node, health) pairs.
async fn node_health(admin: &Client) -> Vec<(String, String)> {
    rows(&admin.simple_query("SHOW NODES").await.unwrap())
        .into_iter()
        .map(|r| (r[0].clone().unwrap(), r[2].clone().unwrap()))
        .collect()
}

async fn health_of(admin: &Client, node: &str) -> String {
    node_health(admin)
        .await
        .into_iter()
        .find(|(n, _)| n == node)
        .map(|(_, h)| h)
        .unwrap_or_else(|| "absent".into())
}

/// Client backends on a node other than the asking one (tidemark's pools and monitor).
async fn other_backends(dsn: &str) -> i64 {
    let c = connect(dsn).await;
    scalar(
        &c,
        "SELECT count(*) FROM pg_stat_activity \
         WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()",
    )
    .await
    .parse()
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_adds_removes_and_moves_nodes_without_dropping_clients() {
    let cluster = start_cluster(tidemark_cluster::ClusterConfig::with_replicas(2)).await;
    let (p, r1, r2) = (cluster.port(0), cluster.port(1), cluster.port(2));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tidemark.toml");
    write_config(&path, &[("primary", p), ("replica_1", r1)]);
    tidemark::app::set_config_path(path.clone());
    let cfg = tidemark::config::Config::load(&path).unwrap();
    let proxy = tidemark::listener::Proxy::start(cfg).await.unwrap();
    assert!(proxy.wait_ready(Duration::from_secs(10)).await);
    let dsn = proxy_dsn_of(&proxy, "postgres");
    let admin = connect(&format!(
        "host=127.0.0.1 port={} user=postgres dbname=tidemark",
        proxy.addr.port()
    ))
    .await;
    let c = connect(&dsn).await;
    c.batch_execute("CREATE TABLE t (i int)").await.unwrap();
    wait_all_replayed(&cluster);

    // A write transaction on the primary and a read-only one on replica_1 are open.
    let tx = connect(&dsn).await;
    tx.batch_execute("BEGIN; INSERT INTO t VALUES (1)")
        .await
        .unwrap();
    let ro = connect(&dsn).await;
    ro.batch_execute("SET tidemark.consistency = 'eventual'")
        .await
        .unwrap();
    ro.batch_execute("BEGIN READ ONLY").await.unwrap();
    assert_eq!(served_by(&ro).await.unwrap(), r1);
    let reads_before: Vec<u16> = futures_reads(&c, 10).await;
    assert!(
        reads_before.iter().all(|&port| port == r1),
        "{reads_before:?}"
    );

    // Added: replica_2 serves reads within seconds; the open transaction commits.
    write_config(
        &path,
        &[("primary", p), ("replica_1", r1), ("replica_2", r2)],
    );
    admin.simple_query("RELOAD").await.unwrap();
    tx.batch_execute("INSERT INTO t VALUES (2); COMMIT")
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if eventual_port(&c).await == r2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no read reached replica_2 after the reload; SHOW NODES: {:?}",
            node_health(&admin).await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(health_of(&admin, "replica_2").await, "up");

    // Removed: replica_1 gets no read any more; the transaction on it finishes there; the
    // clients connected before go on; its server connections close once released.
    write_config(&path, &[("primary", p), ("replica_2", r2)]);
    admin.simple_query("RELOAD").await.unwrap();
    assert_eq!(health_of(&admin, "replica_1").await, "retired");
    let after: Vec<u16> = futures_reads(&c, 40).await;
    assert!(after.iter().all(|&port| port != r1), "{after:?}");
    assert!(after.contains(&r2), "{after:?}");
    assert_eq!(
        served_by(&ro).await.unwrap(),
        r1,
        "the open transaction stays"
    );
    ro.batch_execute("COMMIT").await.unwrap();
    for _ in 0..20 {
        assert_ne!(served_by(&ro).await.unwrap(), r1);
    }
    c.batch_execute("INSERT INTO t VALUES (3)").await.unwrap();
    let r1_dsn = format!(
        "host={} port={r1} user={} dbname=postgres",
        cluster.host(),
        cluster.superuser()
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let n = other_backends(&r1_dsn).await;
        if n == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{n} connections to the removed replica_1 are still open"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let config_nodes = rows(&admin.simple_query("SHOW CONFIG").await.unwrap())
        .into_iter()
        .find(|r| r[0].as_deref() == Some("nodes"))
        .and_then(|r| r[1].clone())
        .unwrap();
    assert!(
        config_nodes.contains(&format!("replica_1=127.0.0.1:{r1} (retired)")),
        "{config_nodes}"
    );

    // Moved to a port where nothing listens: replica_2 goes down, reads go to the primary,
    // the primary's clients are not affected.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    write_config(&path, &[("primary", p), ("replica_2", dead)]);
    admin.simple_query("RELOAD").await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while health_of(&admin, "replica_2").await != "down" {
        assert!(Instant::now() < deadline, "{:?}", node_health(&admin).await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    c.batch_execute("INSERT INTO t VALUES (4)").await.unwrap();
    assert_eq!(scalar(&c, "SELECT count(*) FROM t").await, "4");
    let reads = futures_reads(&c, 10).await;
    assert!(reads.iter().all(|&port| port == p), "{reads:?}");
    assert_eq!(health_of(&admin, "primary").await, "up");

    // Back at its address: it serves reads again.
    write_config(&path, &[("primary", p), ("replica_2", r2)]);
    admin.simple_query("RELOAD").await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while eventual_port(&c).await != r2 {
        assert!(Instant::now() < deadline, "{:?}", node_health(&admin).await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A client that logs in now works too.
    let late = connect(&dsn).await;
    late.batch_execute("INSERT INTO t VALUES (5)")
        .await
        .unwrap();
}

/// `n` eventual reads through `c`, each the port of the node that served it.
async fn futures_reads(c: &Client, n: usize) -> Vec<u16> {
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        v.push(eventual_port(c).await);
    }
    v
}
