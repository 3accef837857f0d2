//! pgbench (a real client, simple/extended/prepared protocols, 16 clients) through
//! tidemark's transaction pooling on a real primary + 2 replicas.

mod common;

use std::process::Command;

use common::*;

fn pgbench(env: &Env, args: &[&str]) -> String {
    let bin = env.cluster.bindir().join("pgbench");
    let out = Command::new(bin)
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &env.proxy.addr.port().to_string(),
            "-U",
            "postgres",
            "-n",
        ])
        .args(args)
        .arg("postgres")
        .output()
        .expect("run pgbench");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "pgbench {args:?} failed:\n{text}");
    text
}

fn field(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.trim().strip_prefix(name))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no '{name}' in pgbench output:\n{text}"))
}

/// Executions of pgbench's select-only statement on a node, from pg_stat_statements.
async fn selects(env: &Env, node: usize) -> i64 {
    let c = env.node(node).await;
    c.query_one(
        "SELECT coalesce(sum(calls), 0)::bigint FROM pg_stat_statements WHERE query LIKE 'SELECT abalance FROM pgbench_accounts%'",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_through_tidemark() {
    let cluster = start_cluster(tidemark_cluster::ClusterConfig {
        extra_conf: vec!["shared_preload_libraries = 'pg_stat_statements'".into()],
        ..tidemark_cluster::ClusterConfig::with_replicas(2)
    })
    .await;
    cluster
        .psql(0, "CREATE EXTENSION pg_stat_statements")
        .unwrap();
    let proxy = proxy_for(&cluster, |c| c.pool.max_size = 8).await;
    let env = Env { proxy, cluster };
    tokio::task::block_in_place(|| pgbench_init(&env.cluster));

    for mode in ["simple", "extended", "prepared"] {
        let before: i64 = selects(&env, 1).await + selects(&env, 2).await;
        let before_primary = selects(&env, 0).await;
        let out = pgbench(&env, &["-S", "-M", mode, "-c", "16", "-j", "2", "-T", "3"]);
        let done = field(&out, "number of transactions actually processed:");
        let failed = out
            .lines()
            .find_map(|l| l.trim().strip_prefix("number of failed transactions:"))
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0);
        let after: i64 = selects(&env, 1).await + selects(&env, 2).await;
        let on_replicas = (after - before).max(0) as u64;
        let on_primary = (selects(&env, 0).await - before_primary).max(0) as u64;
        println!(
            "pgbench -S -M {mode}: {done} transactions, {failed} failed; selects on replicas {on_replicas}, on the primary {on_primary}"
        );
        assert!(done > 100, "too few transactions: {done}");
        assert_eq!(failed, 0);
        // Read-only pgbench transactions must be served by the replicas.
        assert!(
            on_replicas >= done && on_primary == 0,
            "{on_replicas} of {done} read transactions ran on replicas, {on_primary} on the primary"
        );
    }

    // The TPC-B-like write script (transactions) through the proxy, then a consistency check.
    for mode in ["extended", "prepared"] {
        let out = pgbench(&env, &["-M", mode, "-c", "8", "-j", "2", "-T", "3"]);
        let done = field(&out, "number of transactions actually processed:");
        println!("pgbench tpcb -M {mode}: {done} transactions");
        assert!(done > 50);
    }
    let c = env.node(0).await;
    let row = c
        .query_one(
            "SELECT (SELECT sum(abalance) FROM pgbench_accounts), (SELECT coalesce(sum(delta),0) FROM pgbench_history)",
            &[],
        )
        .await
        .unwrap();
    let (a, h): (i64, i64) = (row.get(0), row.get(1));
    assert_eq!(
        a, h,
        "balances must equal the history: no lost or doubled writes"
    );
}
