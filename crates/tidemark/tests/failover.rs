//! Failures on a real cluster: a replica killed under load, the primary killed and a
//! replica promoted, split brain, synchronous replication across a failover, and a
//! blackholed replica behind the fault proxy.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use tidemark_cluster::{ClusterConfig, Fault, FaultProxy, ReplicaConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_killed_and_restarted_under_pgbench() {
    let mut env = start(&[None, None], |c| c.pool.max_size = 10).await;
    tokio::task::block_in_place(|| pgbench_init(&env.cluster));
    let port = env.proxy.addr.port().to_string();
    let bin = env.cluster.bindir().join("pgbench");
    let bench = std::thread::spawn(move || {
        Command::new(bin)
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-U",
                "postgres",
                "-n",
                "-S",
                "-c",
                "8",
                "-j",
                "2",
                "-T",
                "12",
                "postgres",
            ])
            .output()
            .unwrap()
    });
    tokio::time::sleep(Duration::from_secs(3)).await;
    env.cluster.kill(1).unwrap();
    tokio::time::sleep(Duration::from_secs(4)).await;
    tokio::task::block_in_place(|| env.cluster.start_node(1)).unwrap();
    let out = tokio::task::spawn_blocking(move || bench.join().unwrap())
        .await
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}");
    assert!(
        out.status.success(),
        "pgbench failed while a replica was killed:\n{text}"
    );
    assert!(
        !text.contains("aborted"),
        "a pgbench client was aborted:\n{text}"
    );
    // The replica is back in rotation and serves reads again. Each session keeps to one
    // replica (routing.balance = session) and sessions are spread round robin: fresh
    // sessions meet both replicas.
    let deadline = Instant::now() + Duration::from_secs(10);
    let replica1 = env.cluster.port(1);
    let mut seen = false;
    while Instant::now() < deadline && !seen {
        for _ in 0..4 {
            let c = env.client().await;
            c.batch_execute("SET tidemark.consistency = 'eventual'")
                .await
                .unwrap();
            if served_by(&c).await.unwrap() == replica1 {
                seen = true;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(seen, "the restarted replica never served reads again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_killed_promotion_split_brain_and_no_stale_reads() {
    let mut env = start(&[None, None], |c| {
        c.pool.connect_timeout = Duration::from_secs(2);
    })
    .await;
    let c = env.client().await;
    c.batch_execute("CREATE TABLE f (id int PRIMARY KEY)")
        .await
        .unwrap();
    let lsn = env.cluster.current_lsn(0).unwrap();
    env.cluster
        .wait_replayed(1, &lsn, Duration::from_secs(10))
        .unwrap();
    for i in 0..50 {
        c.execute("INSERT INTO f VALUES ($1)", &[&i]).await.unwrap();
    }
    let lsn = env.cluster.current_lsn(0).unwrap();
    env.cluster
        .wait_replayed(1, &lsn, Duration::from_secs(10))
        .unwrap();

    // The primary dies: writes fail quickly with an error, never hang.
    env.cluster.kill(0).unwrap();
    for i in 50..55 {
        let t = Instant::now();
        let r = tokio::time::timeout(
            Duration::from_secs(10),
            c.execute("INSERT INTO f VALUES ($1)", &[&i]),
        )
        .await
        .expect("a write hung after the primary died");
        let e = r.expect_err("no primary: the write must fail");
        println!(
            "write without a primary: {:?} after {:?}",
            e.code(),
            t.elapsed()
        );
        assert!(t.elapsed() < Duration::from_secs(5));
    }
    // Reads the replicas can serve keep working (this session's writes are replayed).
    let n: i64 = c
        .query_one("SELECT count(*) FROM f", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 50);

    // Promote replica 1: writes follow it within 2 s, on the same client connection.
    let promoted_at = Instant::now();
    env.cluster.promote(1).unwrap();
    let mut ok_after = None;
    while promoted_at.elapsed() < Duration::from_secs(10) {
        if c.execute("INSERT INTO f VALUES (1000)", &[]).await.is_ok() {
            ok_after = Some(promoted_at.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ok_after = ok_after.expect("writes never reached the promoted replica");
    println!("first write on the new primary {ok_after:?} after promotion");
    assert!(ok_after < Duration::from_secs(2));
    let port: i32 = c
        .query_one(
            "INSERT INTO f VALUES (1001) RETURNING inet_server_port()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        port,
        env.cluster.port(1) as i32,
        "writes go to the promoted node"
    );

    // Read-your-writes across the failover: replica 2 still follows the dead primary.
    let mut stale = 0;
    for i in 2000..2200 {
        c.execute("INSERT INTO f VALUES ($1)", &[&i]).await.unwrap();
        let n: i64 = c
            .query_one("SELECT count(*) FROM f WHERE id = $1", &[&i])
            .await
            .unwrap()
            .get(0);
        if n != 1 {
            stale += 1;
        }
    }
    assert_eq!(stale, 0, "stale reads after the failover");

    // The old primary comes back as a primary: split brain, writes are refused.
    tokio::task::block_in_place(|| env.cluster.start_node(0)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut refused = None;
    while Instant::now() < deadline {
        match c.execute("INSERT INTO f VALUES (3000)", &[]).await {
            Err(e)
                if e.as_db_error()
                    .is_some_and(|d| d.message().contains("split brain")) =>
            {
                refused = Some(e);
                break;
            }
            Ok(_) => {
                c.execute("DELETE FROM f WHERE id = 3000", &[]).await.ok();
            }
            Err(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let e = refused.expect("writes were not refused during split brain");
    println!("split brain: {:?}", e.as_db_error().map(|d| d.message()));
    // Once the old primary is gone again, writes resume.
    env.cluster.kill(0).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut resumed = false;
    while Instant::now() < deadline {
        if c.execute("INSERT INTO f VALUES (3001)", &[]).await.is_ok() {
            resumed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(resumed, "writes did not resume after the split brain ended");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synchronous_replica_keeps_every_acknowledged_write() {
    let mut cluster = start_cluster(ClusterConfig {
        replicas: vec![
            ReplicaConfig {
                synchronous: true,
                ..Default::default()
            },
            ReplicaConfig::default(),
        ],
        synchronous_commit: Some("on".into()),
        ..Default::default()
    })
    .await;
    let proxy = proxy_for(&cluster, |_| {}).await;
    let c = connect(&proxy_dsn_of(&proxy, "postgres")).await;
    c.batch_execute("CREATE TABLE s (id int PRIMARY KEY)")
        .await
        .unwrap();
    let writer = {
        let dsn = proxy_dsn_of(&proxy, "postgres");
        tokio::spawn(async move {
            let c = connect(&dsn).await;
            let mut acked = 0i32;
            for i in 0..100_000 {
                match tokio::time::timeout(
                    Duration::from_secs(5),
                    c.execute("INSERT INTO s VALUES ($1)", &[&i]),
                )
                .await
                {
                    Ok(Ok(_)) => acked = i + 1,
                    _ => break,
                }
            }
            acked
        })
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    cluster.kill(0).unwrap();
    let acked = writer.await.unwrap();
    cluster.promote(1).unwrap();
    let n: i64 = cluster
        .psql(1, "SELECT count(*) FROM s")
        .unwrap()
        .parse()
        .unwrap();
    println!("acknowledged {acked} writes; the promoted synchronous replica has {n}");
    assert!(acked > 10);
    assert!(
        n >= acked as i64,
        "an acknowledged write is missing on the synchronous replica"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blackholed_replica_is_routed_around() {
    let cluster = start_cluster(ClusterConfig::with_replicas(2)).await;
    let fault =
        FaultProxy::start(format!("127.0.0.1:{}", cluster.port(1)).parse().unwrap()).unwrap();
    // Round robin per statement, so this one session keeps meeting replica 1.
    let proxy = proxy_rr(&cluster, |c| {
        c.nodes[1].port = fault.port();
        c.monitor.timeout = Duration::from_millis(500);
        c.pool.connect_timeout = Duration::from_millis(500);
    })
    .await;
    let c = connect(&proxy_dsn_of(&proxy, "postgres")).await;
    c.batch_execute("SET tidemark.consistency = 'eventual'")
        .await
        .unwrap();
    let r1 = cluster.port(1);
    let mut before = 0;
    for _ in 0..20 {
        if served_by(&c).await.unwrap() == r1 {
            before += 1;
        }
    }
    assert!(before > 0, "replica 1 served no reads before the fault");
    fault.set(Fault::Blackhole);
    let t = Instant::now();
    let mut worst = Duration::ZERO;
    let mut late_hits = 0;
    while t.elapsed() < Duration::from_secs(4) {
        let s = Instant::now();
        let port = tokio::time::timeout(Duration::from_secs(5), served_by(&c))
            .await
            .expect("a read hung on the blackholed replica")
            .expect("reads keep working");
        worst = worst.max(s.elapsed());
        if port == r1 && t.elapsed() > Duration::from_secs(2) {
            late_hits += 1;
        }
    }
    println!(
        "blackhole: slowest read {worst:?}; reads on the blackholed replica after 2 s: {late_hits}"
    );
    assert!(worst < Duration::from_secs(3), "a read waited {worst:?}");
    assert_eq!(late_hits, 0);
    fault.set(Fault::Pass);
    drop(proxy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejoined_old_primary_serves_reads_as_replica() {
    let mut env = start(&[None], |c| {
        c.pool.connect_timeout = Duration::from_secs(2);
    })
    .await;
    let c = env.client().await;
    c.batch_execute("CREATE TABLE rj (id int PRIMARY KEY); INSERT INTO rj VALUES (1)")
        .await
        .unwrap();
    let lsn = env.cluster.current_lsn(0).unwrap();
    env.cluster
        .wait_replayed(1, &lsn, Duration::from_secs(10))
        .unwrap();

    // Fail over to node 1, write there, then bring the old primary back as its replica.
    tokio::task::block_in_place(|| {
        env.cluster.kill(0)?;
        env.cluster.promote(1)?;
        env.cluster.psql(1, "INSERT INTO rj VALUES (2)")?;
        let t = Instant::now();
        env.cluster.rejoin_as_replica(0, 1)?;
        println!("rejoin took {:?}", t.elapsed());
        Ok::<_, tidemark_cluster::ClusterError>(())
    })
    .unwrap();

    // tidemark sees node 0 as a healthy replica.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let view = env.proxy.app.view.load();
        let n0 = &view.nodes[0];
        if n0.role == tidemark_core::Role::Replica && n0.healthy {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "tidemark never saw node 0 as a healthy replica: {n0:?}"
        );
        drop(view);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Writes go to node 1 (retry briefly while the proxy settles on the new primary).
    let c = env.client().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let port: i32 = loop {
        match c
            .query_one(
                "INSERT INTO rj VALUES (3) RETURNING inet_server_port()",
                &[],
            )
            .await
        {
            Ok(r) => break r.get(0),
            Err(e) => {
                assert!(Instant::now() < deadline, "writes never succeeded: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    assert_eq!(port, env.cluster.port(1) as i32, "writes go to node 1");

    // Eventual reads are spread over both nodes, including the rejoined one.
    c.batch_execute("SET tidemark.consistency = 'eventual'")
        .await
        .unwrap();
    let node0 = env.cluster.port(0);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = false;
    while Instant::now() < deadline && !seen {
        for _ in 0..20 {
            if served_by(&c).await.unwrap() == node0 {
                seen = true;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(seen, "the rejoined node never served a read");
    // And it has the rows written on node 1, including those after the promotion.
    let n: i64 = env
        .node(0)
        .await
        .query_one("SELECT count(*) FROM rj WHERE id IN (1, 2)", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2);
}

/// `SHOW NODES` on the admin console as (node, sync_state, remote_apply) triples.
async fn sync_columns(console: &tokio_postgres::Client) -> Vec<(String, String, String)> {
    let msgs = console.simple_query("SHOW NODES").await.unwrap();
    msgs.iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some((
                r.get("node").unwrap_or_default().to_string(),
                r.get("sync_state").unwrap_or_default().to_string(),
                r.get("remote_apply").unwrap_or_default().to_string(),
            )),
            _ => None,
        })
        .collect()
}

/// The node and reason of the session's last routing decision (`SHOW tidemark.last_route`).
async fn last_route(c: &tokio_postgres::Client) -> (String, String) {
    let msgs = c.simple_query("SHOW tidemark.last_route").await.unwrap();
    let v = msgs
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        })
        .unwrap_or_default();
    let (node, reason) = v.split_once(' ').unwrap_or((v.as_str(), ""));
    (node.to_string(), reason.to_string())
}

/// Issue 8, `synchronous_commit = remote_apply`: tidemark knows replica_1 is a remote_apply
/// synchronous standby, and a read right after a write runs there with no replay check and
/// no wait (`applied_at_commit`: the primary reported replica_1 at the commit's position
/// right after the commit), never stale. Control: the same session with
/// `synchronous_commit = local` and replica_1's replay paused — tidemark must not trust
/// the standby's synchronous status for commits that did not wait for it (a proxy that did
/// would serve every read below stale).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_apply_standby_serves_reads_of_a_write_without_waiting() {
    let cluster = start_cluster(ClusterConfig {
        replicas: vec![
            ReplicaConfig {
                synchronous: true,
                ..Default::default()
            },
            // An asynchronous replica that is certainly stale right after a write.
            ReplicaConfig {
                apply_delay: Some(Duration::from_millis(300)),
                ..Default::default()
            },
        ],
        synchronous_commit: Some("remote_apply".into()),
        ..Default::default()
    })
    .await;
    let proxy = proxy_for(&cluster, |cfg| {
        // Samples this sparse never show a write made just before the read: any read that
        // reaches a replica without a check does so through the per-commit report.
        cfg.monitor.interval = Duration::from_millis(700);
        cfg.monitor.timeout = Duration::from_secs(3);
        cfg.routing.max_wait = Duration::from_millis(30);
    })
    .await;
    let p = proxy.addr;
    let console = connect(&format!(
        "host={} port={} user=postgres dbname=tidemark",
        p.ip(),
        p.port()
    ))
    .await;
    // tidemark knows which replica is a remote_apply synchronous standby.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let cols = sync_columns(&console).await;
        let want = vec![
            ("primary".to_string(), "-".to_string(), "no".to_string()),
            (
                "replica_1".to_string(),
                "sync".to_string(),
                "yes".to_string(),
            ),
            (
                "replica_2".to_string(),
                "async".to_string(),
                "no".to_string(),
            ),
        ];
        if cols == want {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "SHOW NODES never showed {want:?}: {cols:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let c = connect(&proxy_dsn_of(&proxy, "postgres")).await;
    c.batch_execute("CREATE TABLE ra (id int PRIMARY KEY, v int); INSERT INTO ra VALUES (1, 0)")
        .await
        .unwrap();
    let update = c
        .prepare("UPDATE ra SET v = $1 WHERE id = 1")
        .await
        .unwrap();
    let read = c
        .prepare("SELECT v, pg_is_in_recovery() FROM ra WHERE id = 1")
        .await
        .unwrap();
    let n = 300;
    let (mut stale, mut applied, mut sampled, mut checked) = (0, 0, 0, 0);
    let mut slowest = Duration::ZERO;
    for i in 1..=n {
        c.execute(&update, &[&i]).await.unwrap();
        let t = Instant::now();
        let row = c.query_one(&read, &[]).await.unwrap();
        slowest = slowest.max(t.elapsed());
        let (v, on_replica): (i32, bool) = (row.get(0), row.get(1));
        if v != i {
            stale += 1;
        }
        assert!(on_replica, "read {i} ran on the primary");
        let (node, reason) = last_route(&c).await;
        assert_eq!(node, "replica_1", "read {i} went to {node} ({reason})");
        match reason.as_str() {
            "applied_at_commit" => applied += 1,
            "eligible" => sampled += 1,
            // The position read after the commit can be past it when the server wrote other
            // WAL in between (a background record): then the report does not cover it and
            // the read checks the replica, as without the report.
            "replica_caught_up" => checked += 1,
            other => panic!("read {i}: reason {other}"),
        }
    }
    println!(
        "remote_apply: {n} reads after writes: {stale} stale, {applied} applied_at_commit, \
         {sampled} eligible by the monitor's sample, {checked} after a replay check, \
         slowest read {slowest:?}"
    );
    assert_eq!(stale, 0);
    assert!(
        applied >= n * 9 / 10,
        "only {applied} of {n} reads used the per-commit report"
    );

    // Control: commits that do not wait for the standby are not trusted on it.
    c.batch_execute("SET synchronous_commit = local")
        .await
        .unwrap();
    cluster.pause_replay(1).unwrap();
    let (mut stale, mut on_r1) = (0, 0);
    for i in (n + 1)..=(n + 100) {
        c.execute(&update, &[&i]).await.unwrap();
        let row = c.query_one(&read, &[]).await.unwrap();
        let v: i32 = row.get(0);
        if v != i {
            stale += 1;
        }
        let (node, reason) = last_route(&c).await;
        assert_ne!(
            reason, "applied_at_commit",
            "read {i} trusted a commit that did not wait"
        );
        if node == "replica_1" {
            on_r1 += 1;
        }
    }
    cluster.resume_replay(1).unwrap();
    println!(
        "synchronous_commit = local, replica_1 paused: {stale} stale of 100, {on_r1} on replica_1"
    );
    assert_eq!(stale, 0);
    assert_eq!(on_r1, 0);
}

/// A replica left past the fork point of a promotion (it replayed WAL the promoted replica
/// never received) reports a replay LSN that numerically covers the new primary's commits
/// without having them. It is not streaming from the new primary, so it serves no reads:
/// read-your-writes holds across such a failover, and even `eventual` reads avoid it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_left_on_the_old_timeline_serves_no_reads() {
    let mut env = start(&[None, None], |c| {
        c.pool.connect_timeout = Duration::from_secs(2);
    })
    .await;
    let direct = env.node(0).await;
    direct
        .batch_execute("CREATE TABLE forked (id int PRIMARY KEY, pad text)")
        .await
        .unwrap();
    tokio::task::block_in_place(|| wait_all_replayed(&env.cluster));
    // Replica 1 stops; replica 2 replays a lot more of timeline 1.
    tokio::task::block_in_place(|| env.cluster.stop(1)).unwrap();
    direct
        .batch_execute(
            "INSERT INTO forked SELECT g, repeat('x', 200) FROM generate_series(-3000, -1) g",
        )
        .await
        .unwrap();
    let lsn = env.cluster.current_lsn(0).unwrap();
    env.cluster
        .wait_replayed(2, &lsn, Duration::from_secs(20))
        .unwrap();
    drop(direct);
    // The primary dies; replica 1 (behind) is promoted: timeline 2 forks before replica 2's
    // position, and replica 2 cannot follow it.
    env.cluster.kill(0).unwrap();
    tokio::task::block_in_place(|| env.cluster.start_node(1)).unwrap();
    env.cluster.promote(1).unwrap();
    let c = env.client().await;
    let t = Instant::now();
    loop {
        match c
            .execute("INSERT INTO forked VALUES (0, 'first')", &[])
            .await
        {
            Ok(_) => break,
            Err(_) if t.elapsed() < Duration::from_secs(15) => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("writes never reached the promoted replica: {e}"),
        }
    }
    let replica2 = env.cluster.port(2) as i32;
    let mut stale = 0;
    let mut on_forked = 0;
    for i in 1..200 {
        c.execute("INSERT INTO forked VALUES ($1, 'new')", &[&i])
            .await
            .unwrap();
        let row = c
            .query_one(
                "SELECT count(*), inet_server_port() FROM forked WHERE id = $1",
                &[&i],
            )
            .await
            .unwrap();
        if row.get::<_, i64>(0) != 1 {
            stale += 1;
        }
        if row.get::<_, i32>(1) == replica2 {
            on_forked += 1;
        }
    }
    let e = env.client().await;
    e.batch_execute("SET tidemark.consistency = 'eventual'")
        .await
        .unwrap();
    for _ in 0..50 {
        if served_by(&e).await.unwrap() == env.cluster.port(2) {
            on_forked += 1;
        }
    }
    assert_eq!(stale, 0, "stale reads served by the forked replica");
    assert_eq!(on_forked, 0, "the forked replica served reads");
}
