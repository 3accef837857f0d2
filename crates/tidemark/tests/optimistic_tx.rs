//! Optimistic transactions (issue 22) on a real primary + a replica delayed 200 ms, with
//! `routing.transactions = optimistic`: a plain `BEGIN` is answered by tidemark, a
//! transaction whose first statement reads runs read-only on a caught-up replica, a writer's
//! own transactions never read stale rows, a transaction that then writes is replayed on the
//! primary (and refused with 40001 when the primary's answers differ: no double charge), and
//! a shape that always writes learns to start on the primary.

mod common;

use std::time::Duration;

use common::raw::{sqlstate, Raw};
use common::*;
use tidemark::config::{TxMode, WaitMode};
use tokio_postgres::Client;

const DELAY: Duration = Duration::from_millis(200);

async fn setup() -> Env {
    // Placement after the session's own write is asserted: a replica that has not replayed
    // it at the first check is polled for up to max_wait (routing.wait = fixed), not read
    // around at once; the adaptive policy is tested in adaptive_wait.rs.
    let env = start(&[Some(DELAY)], |c| {
        c.routing.wait = WaitMode::Fixed;
        c.routing.transactions = TxMode::Optimistic;
    })
    .await;
    let c = env.client().await;
    exec(
        &c,
        "CREATE TABLE optx (id int PRIMARY KEY, v int NOT NULL DEFAULT 0);
         CREATE TABLE orders (id int PRIMARY KEY, paid bool NOT NULL DEFAULT false);
         CREATE TABLE charges (order_id int NOT NULL)",
    )
    .await;
    caught_up(&env).await;
    env
}

async fn caught_up(env: &Env) {
    tokio::task::block_in_place(|| wait_all_replayed(&env.cluster));
    wait_view_caught_up(&env.proxy).await;
}

fn code(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map(|d| d.code().code().to_string())
        .unwrap_or_else(|| format!("no SQLSTATE: {e}"))
}

fn count(env: &Env, outcome: &str) -> u64 {
    env.proxy.app.transactions.counts().get(outcome)
}

/// psycopg's default: every request is `BEGIN`, the reads, `COMMIT`, as separate simple
/// queries. Whether the transaction ran on the replica, and the server backend that ran it.
async fn simple_tx_on_replica(env: &Env, c: &Client) -> (bool, String) {
    exec(c, "BEGIN").await;
    let m = c
        .simple_query("SELECT inet_server_port(), pg_backend_pid()")
        .await
        .expect("in the tx");
    let r = rows(&m);
    scalar(c, "SELECT count(*) FROM optx").await;
    exec(c, "COMMIT").await;
    (
        r[0][0].as_deref() == Some(env.cluster.port(1).to_string().as_str()),
        r[0][1].clone().unwrap_or_default(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_transactions_that_read_run_on_the_replica_and_read_their_writes() {
    let env = setup().await;
    let replica = env.cluster.port(1);

    // The connection that writes: its next transaction sees the row, every time.
    let c = env.client().await;
    let mut stale = 0;
    for i in 0..100 {
        exec(&c, &format!("INSERT INTO optx (id) VALUES ({i})")).await;
        exec(&c, "BEGIN").await;
        let n = scalar(&c, &format!("SELECT count(*) FROM optx WHERE id = {i}")).await;
        exec(&c, "COMMIT").await;
        if n != "1" {
            stale += 1;
        }
    }
    println!("write, then BEGIN; SELECT the row; COMMIT: {stale} stale of 100");
    assert_eq!(stale, 0, "a writer's own transactions read stale rows");

    // Writes stopped, the replica caught up: transactions that only read go there.
    caught_up(&env).await;
    let mut on_replica = 0;
    let mut backends = std::collections::HashSet::new();
    for _ in 0..100 {
        let (replica, pid) = simple_tx_on_replica(&env, &c).await;
        if replica {
            on_replica += 1;
        }
        backends.insert(pid);
    }
    println!(
        "simple-protocol BEGIN/SELECT/COMMIT: {on_replica} of 100 on the replica, {} server backends",
        backends.len()
    );
    assert!(on_replica >= 90, "{on_replica} of 100 on the replica");
    // The replica's connection goes back to the pool after each transaction (not closed).
    assert!(
        backends.len() <= 3,
        "{} backends for 100 transactions",
        backends.len()
    );

    // The extended protocol (tokio-postgres' Transaction: BEGIN, prepared statements, COMMIT).
    let mut e = env.client().await;
    let mut on_replica = 0;
    for _ in 0..100 {
        let tx = e.transaction().await.expect("BEGIN");
        let port: i32 = tx
            .query_one("SELECT inet_server_port()", &[])
            .await
            .expect("read in the tx")
            .get(0);
        let n: i64 = tx
            .query_one("SELECT count(*) FROM optx WHERE id >= $1", &[&0i32])
            .await
            .expect("read in the tx")
            .get(0);
        assert_eq!(n, 100);
        tx.commit().await.expect("COMMIT");
        if port == i32::from(replica) {
            on_replica += 1;
        }
    }
    println!("tokio-postgres transaction(): {on_replica} of 100 on the replica");
    assert!(on_replica >= 90, "{on_replica} of 100 on the replica");
    assert!(count(&env, "replica") >= 180);
    assert_eq!(count(&env, "replayed") + count(&env, "diverged"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_that_writes_moves_to_the_primary_or_gets_40001() {
    let env = setup().await;
    let primary = env.node(0).await;
    let c = env.client().await;
    exec(&c, "INSERT INTO orders VALUES (1), (2), (3)").await;
    caught_up(&env).await;

    // Read, then write, data unchanged: replayed on the primary, committed.
    exec(&c, "BEGIN").await;
    assert_eq!(
        scalar(&c, "SELECT paid FROM orders WHERE id = 1").await,
        "f"
    );
    // SET LOCAL, a savepoint, an error and ROLLBACK TO on the replica are replayed too.
    exec(&c, "SET LOCAL statement_timeout = '5s'").await;
    exec(&c, "SAVEPOINT s1").await;
    let e = c
        .simple_query("SELECT 1 / 0")
        .await
        .expect_err("division by zero");
    assert_eq!(code(&e), "22012");
    exec(&c, "ROLLBACK TO SAVEPOINT s1").await;
    assert_eq!(scalar(&c, "SELECT count(*) FROM charges").await, "0");
    exec(&c, "UPDATE orders SET paid = true WHERE id = 1").await;
    assert_eq!(scalar(&c, "SHOW statement_timeout").await, "5s");
    assert_eq!(scalar(&c, "SHOW transaction_read_only").await, "off");
    exec(&c, "INSERT INTO charges VALUES (1)").await;
    assert_eq!(
        scalar(&c, "SELECT paid FROM orders WHERE id = 1").await,
        "t"
    );
    exec(&c, "COMMIT").await;
    assert_eq!(
        count(&env, "replayed"),
        1,
        "the transaction started on the replica"
    );
    assert_eq!(
        scalar(&primary, "SELECT count(*) FROM charges WHERE order_id = 1").await,
        "1"
    );
    assert_eq!(
        scalar(&primary, "SELECT paid FROM orders WHERE id = 1").await,
        "t"
    );
    // Its commit is this session's: the next read sees it.
    assert_eq!(
        scalar(&c, "SELECT paid FROM orders WHERE id = 1").await,
        "t"
    );

    // The same through the extended protocol (prepared statements made on the replica's
    // connection are prepared again on the primary's for the replay).
    exec(&c, "INSERT INTO orders VALUES (10)").await;
    caught_up(&env).await;
    let mut x = env.client().await;
    let tx = x.transaction().await.expect("BEGIN");
    let paid: bool = tx
        .query_one(
            "SELECT paid FROM orders WHERE id = $1 AND $2::int > 0",
            &[&10i32, &1i32],
        )
        .await
        .expect("read")
        .get(0);
    assert!(!paid);
    let n: i64 = tx
        .query_one(
            "SELECT count(*) FROM charges WHERE order_id = $1",
            &[&10i32],
        )
        .await
        .expect("read")
        .get(0);
    assert_eq!(n, 0);
    tx.execute("UPDATE orders SET paid = true WHERE id = $1", &[&10i32])
        .await
        .expect("replayed, then the write");
    tx.execute("INSERT INTO charges VALUES ($1)", &[&10i32])
        .await
        .expect("write");
    tx.commit().await.expect("COMMIT");
    assert_eq!(count(&env, "replayed"), 2);
    assert_eq!(
        scalar(&primary, "SELECT count(*) FROM charges WHERE order_id = 10").await,
        "1"
    );

    // Past the replay budget, the transaction moves to the primary at once.
    let mut cfg = (**env.proxy.app.config.load()).clone();
    cfg.routing.replay_budget_bytes = 300;
    env.proxy.app.config.store(std::sync::Arc::new(cfg));
    caught_up(&env).await;
    exec(&c, "BEGIN").await;
    scalar(&c, "SELECT count(*) FROM orders").await;
    assert_eq!(
        scalar(&c, "SHOW tidemark.last_route")
            .await
            .split(' ')
            .next()
            .map(str::to_string),
        Some(env.cluster.node_name(1).to_string()),
        "started on the replica"
    );
    let long = format!("SELECT inet_server_port() /* {} */", "x".repeat(400));
    assert_eq!(
        scalar(&c, &long).await,
        env.cluster.port(0).to_string(),
        "over the budget: on the primary"
    );
    exec(&c, "COMMIT").await;
    assert_eq!(count(&env, "replayed"), 3);
    let mut cfg = (**env.proxy.app.config.load()).clone();
    cfg.routing.replay_budget_bytes = 64 * 1024;
    env.proxy.app.config.store(std::sync::Arc::new(cfg));

    // Divergence: B read on the replica, A paid on the primary meanwhile (the replica is
    // 200 ms behind), B writes: 40001, nothing of B written, ROLLBACK works.
    caught_up(&env).await;
    let b = env.client().await;
    exec(&b, "BEGIN").await;
    assert_eq!(
        scalar(&b, "SELECT paid FROM orders WHERE id = 2").await,
        "f"
    );
    assert_eq!(
        scalar(&b, "SHOW tidemark.last_route")
            .await
            .split(' ')
            .next()
            .map(str::to_string),
        Some(env.cluster.node_name(1).to_string()),
        "B's transaction started on the replica"
    );
    exec(&primary, "UPDATE orders SET paid = true WHERE id = 2").await;
    let e = b
        .simple_query("UPDATE orders SET paid = true WHERE id = 2")
        .await
        .expect_err("the primary's answer differs");
    assert_eq!(code(&e), "40001", "{e:?}");
    let msg = e
        .as_db_error()
        .map(|d| d.message().to_string())
        .unwrap_or_default();
    assert!(
        msg.contains("tidemark") && msg.contains("SELECT paid FROM orders"),
        "{msg}"
    );
    let e = b
        .simple_query("INSERT INTO charges VALUES (2)")
        .await
        .expect_err("the transaction is aborted");
    assert_eq!(code(&e), "25P02");
    exec(&b, "ROLLBACK").await;
    assert_eq!(count(&env, "diverged"), 1);
    assert_eq!(
        scalar(&primary, "SELECT count(*) FROM charges WHERE order_id = 2").await,
        "0"
    );
    // COMMIT of the failed transaction answers ROLLBACK, like PostgreSQL.
    caught_up(&env).await;
    exec(&b, "BEGIN").await;
    // (Another shape: the one above has written twice and now starts on the primary.)
    scalar(&b, "SELECT id, paid FROM orders WHERE id = 3").await;
    exec(&primary, "UPDATE orders SET paid = true WHERE id = 3").await;
    b.simple_query("UPDATE orders SET paid = true WHERE id = 3")
        .await
        .expect_err("40001 again");
    let msgs = b
        .simple_query("COMMIT")
        .await
        .expect("COMMIT of a failed tx");
    assert!(msgs
        .iter()
        .any(|m| matches!(m, tokio_postgres::SimpleQueryMessage::CommandComplete(_))));
    // The session works on.
    assert_eq!(scalar(&b, "SELECT 1").await, "1");

    // The replica's server connection dies mid-transaction: the client's session ends with
    // the error, as with a dead primary; nothing is replayed, nothing written.
    caught_up(&env).await;
    let replays = env.proxy.app.transactions.counts().replays;
    let d = env.client().await;
    exec(&d, "BEGIN").await;
    scalar(&d, "SELECT count(*) FROM charges").await;
    let replica = env.node(1).await;
    exec(
        &replica,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE state LIKE 'idle in transaction%'",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let e = d
        .simple_query("INSERT INTO charges VALUES (99)")
        .await
        .expect_err("the transaction's server is gone");
    println!("after the replica's backend died: {e:?}");
    assert!(d.is_closed() || d.simple_query("SELECT 1").await.is_err());
    assert_eq!(env.proxy.app.transactions.counts().replays, replays);
    assert_eq!(
        scalar(&primary, "SELECT count(*) FROM charges WHERE order_id = 99").await,
        "0"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_double_charge_race_never_charges_twice() {
    let env = setup().await;
    let a = env.node(0).await; // A pays directly on the primary.
    let rounds = 200;
    exec(
        &a,
        &format!(
            "INSERT INTO orders SELECT g FROM generate_series(1, {}) g",
            2 * rounds
        ),
    )
    .await;
    caught_up(&env).await;
    let b = env.client().await;
    // First one shape (learning takes it to the primary after two writes, decay brings it
    // back), then a new shape every round (B's reads always start on the replica).
    for (phase, first) in [("one shape", 1), ("a new shape per round", rounds + 1)] {
        let (mut read_true, mut refused, mut charged) = (0, 0, 0);
        let before = env.proxy.app.transactions.counts();
        for i in first..first + rounds {
            exec(
                &a,
                &format!("BEGIN; UPDATE orders SET paid = true WHERE id = {i}; INSERT INTO charges VALUES ({i}); COMMIT"),
            )
            .await;
            // B, after A's commit: reads whether the order is paid, charges if not.
            exec(&b, "BEGIN").await;
            let read = if first == 1 {
                format!("SELECT paid FROM orders WHERE id = {i}")
            } else {
                format!("SELECT paid AS paid_{i} FROM orders WHERE id = {i}")
            };
            let paid = b.simple_query(&read).await.expect("B's read");
            let paid = rows(&paid).first().and_then(|r| r[0].clone());
            if paid.as_deref() == Some("t") {
                exec(&b, "COMMIT").await;
                read_true += 1;
                continue;
            }
            match b
                .simple_query(&format!("UPDATE orders SET paid = true WHERE id = {i}"))
                .await
            {
                Err(e) => {
                    assert_eq!(code(&e), "40001", "{e:?}");
                    exec(&b, "ROLLBACK").await;
                    refused += 1;
                }
                Ok(_) => {
                    exec(&b, &format!("INSERT INTO charges VALUES ({i})")).await;
                    exec(&b, "COMMIT").await;
                    charged += 1;
                }
            }
        }
        let doubles = scalar(
            &a,
            "SELECT count(*) FROM (SELECT order_id FROM charges GROUP BY order_id HAVING count(*) > 1) d",
        )
        .await;
        let after = env.proxy.app.transactions.counts();
        let delta = |o: &str| after.get(o) - before.get(o);
        println!(
            "double-charge race, {phase}, {rounds} rounds: B read paid {read_true}, got 40001 {refused}, charged {charged}; double charges {doubles}; diverged {}, primary_learned {}, primary_routed {}",
            delta("diverged"),
            delta("primary_learned"),
            delta("primary_routed"),
        );
        assert_eq!(charged, 0, "{phase}: B charged an order A had paid");
        assert_eq!(doubles, "0");
        assert_eq!(read_true + refused, rounds);
    }
    assert_eq!(
        scalar(&a, "SELECT count(*) FROM charges").await,
        (2 * rounds).to_string()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn begin_forms_settings_and_learning() {
    let env = setup().await;
    let primary = env.cluster.port(0);
    let replica = env.cluster.port(1);
    let c = env.client().await;

    // BEGIN; COMMIT and BEGIN; ROLLBACK with nothing in between.
    exec(&c, "BEGIN").await;
    exec(&c, "COMMIT").await;
    exec(&c, "BEGIN").await;
    exec(&c, "ROLLBACK").await;
    assert_eq!(scalar(&c, "SELECT 1").await, "1");

    // BEGIN twice: PostgreSQL's warning, the transaction goes on.
    let mut r = Raw::connect(env.proxy.addr, "postgres").await;
    let m = r.query_ok("BEGIN").await;
    assert!(m.iter().any(|(t, b)| *t == b'C' && b.starts_with(b"BEGIN")));
    assert_eq!(
        m.last().map(|(t, b)| (*t, b.clone())),
        Some((b'Z', b"T".to_vec()))
    );
    let m = r.query_ok("BEGIN").await;
    assert!(
        m.iter().any(|(t, b)| *t == b'N' && sqlstate(b) == "25001"),
        "{m:?}"
    );
    assert_eq!(
        m.last().map(|(t, b)| (*t, b.clone())),
        Some((b'Z', b"T".to_vec()))
    );
    r.query_ok("SELECT 1").await;
    let m = r.query_ok("COMMIT").await;
    assert_eq!(
        m.last().map(|(t, b)| (*t, b.clone())),
        Some((b'Z', b"I".to_vec()))
    );

    // The extended protocol: BEGIN and COMMIT as Parse/Bind/Execute/Sync units, answered
    // with what the client asked for; a failed transaction's COMMIT answers ROLLBACK.
    let tag = |m: &[(u8, Vec<u8>)], t: &[u8]| m.iter().any(|(k, b)| *k == b'C' && b.starts_with(t));
    let last = |m: &[(u8, Vec<u8>)]| m.last().map(|(t, b)| (*t, b.clone()));
    let m = r.extended_unit(&["BEGIN"]).await;
    assert!(
        tag(&m, b"BEGIN") && m.iter().any(|(t, _)| *t == b'1') && m.iter().any(|(t, _)| *t == b'2'),
        "{m:?}"
    );
    assert_eq!(last(&m), Some((b'Z', b"T".to_vec())));
    let m = r.extended_unit(&["COMMIT"]).await;
    assert!(tag(&m, b"COMMIT"), "{m:?}");
    assert_eq!(last(&m), Some((b'Z', b"I".to_vec())));
    exec(&c, "INSERT INTO orders VALUES (7)").await;
    caught_up(&env).await;
    r.extended_unit(&["BEGIN"]).await;
    r.query_ok("SELECT id, paid FROM orders WHERE id = 7").await;
    exec(
        &env.node(0).await,
        "UPDATE orders SET paid = true WHERE id = 7",
    )
    .await;
    let m = r.query("UPDATE orders SET paid = true WHERE id = 7").await;
    assert!(
        m.iter().any(|(t, b)| *t == b'E' && sqlstate(b) == "40001"),
        "{m:?}"
    );
    assert_eq!(last(&m), Some((b'Z', b"E".to_vec())));
    let m = r.query("SELECT 1").await;
    assert!(
        m.iter().any(|(t, b)| *t == b'E' && sqlstate(b) == "25P02"),
        "{m:?}"
    );
    let m = r.extended_unit(&["COMMIT"]).await;
    assert!(tag(&m, b"ROLLBACK"), "{m:?}");
    assert_eq!(last(&m), Some((b'Z', b"I".to_vec())));

    // SERIALIZABLE stays on the primary and works; REPEATABLE READ reads on the replica.
    exec(&c, "BEGIN ISOLATION LEVEL SERIALIZABLE").await;
    assert_eq!(served_by(&c).await.unwrap(), primary);
    assert_eq!(
        scalar(&c, "SHOW transaction_isolation").await,
        "serializable"
    );
    exec(&c, "INSERT INTO optx (id) VALUES (1000)").await;
    exec(&c, "COMMIT").await;
    caught_up(&env).await;
    exec(&c, "BEGIN ISOLATION LEVEL REPEATABLE READ").await;
    assert_eq!(served_by(&c).await.unwrap(), replica);
    assert_eq!(
        scalar(&c, "SHOW transaction_isolation").await,
        "repeatable read"
    );
    exec(&c, "COMMIT").await;
    assert!(count(&env, "primary_level") >= 1);

    // An invalid BEGIN gives PostgreSQL's own error.
    let direct = env.node(0).await;
    for bad in ["BEGIN ISOLATION LEVEL sometimes", "BEGIN READ SOMETIMES"] {
        let d = direct
            .simple_query(bad)
            .await
            .expect_err("invalid directly");
        let t = c
            .simple_query(bad)
            .await
            .expect_err("invalid through tidemark");
        assert_eq!(code(&t), code(&d), "{bad}");
        assert_eq!(scalar(&c, "SELECT 1").await, "1");
    }

    // SET tidemark.transactions.
    assert_eq!(scalar(&c, "SHOW tidemark.transactions").await, "optimistic");
    let e = c
        .simple_query("SET tidemark.transactions = 'sometimes'")
        .await
        .expect_err("a bad value");
    assert_eq!(code(&e), "22023");
    // PRIMARY is a reserved word: quoted, as in any SET.
    exec(&c, "SET tidemark.transactions = 'primary'").await;
    caught_up(&env).await;
    for begin in ["BEGIN", "BEGIN READ ONLY"] {
        exec(&c, begin).await;
        assert_eq!(served_by(&c).await.unwrap(), primary, "{begin}");
        exec(&c, "COMMIT").await;
    }
    exec(&c, "SET tidemark.transactions = read_only").await;
    exec(&c, "BEGIN").await;
    assert_eq!(served_by(&c).await.unwrap(), primary);
    exec(&c, "COMMIT").await;
    exec(&c, "BEGIN READ ONLY").await;
    assert_eq!(served_by(&c).await.unwrap(), replica);
    exec(&c, "COMMIT").await;
    exec(&c, "RESET tidemark.transactions").await;
    assert_eq!(scalar(&c, "SHOW tidemark.transactions").await, "optimistic");

    // Learning: a shape that always writes after its first read stops being replayed. New
    // connections each time (as a pool hands them out): no session waits for its own write.
    caught_up(&env).await;
    let before_replays = env.proxy.app.transactions.counts().replays;
    let before_diverged = count(&env, "diverged");
    let before_learned = count(&env, "primary_learned");
    for i in 0..10 {
        let w = env.client().await;
        exec(&w, "BEGIN").await;
        let v = w
            .simple_query(&format!("SELECT v FROM optx WHERE id = {}", 1000))
            .await;
        match v {
            Ok(_) => match w
                .simple_query("UPDATE optx SET v = v + 1 WHERE id = 1000")
                .await
            {
                Ok(_) => exec(&w, "COMMIT").await,
                Err(e) => {
                    assert_eq!(code(&e), "40001", "round {i}: {e:?}");
                    exec(&w, "ROLLBACK").await;
                }
            },
            Err(e) => panic!("round {i}: {e}"),
        }
    }
    let counts = env.proxy.app.transactions.counts();
    let moved = counts.replays - before_replays + count(&env, "diverged") - before_diverged;
    let learned = count(&env, "primary_learned") - before_learned;
    println!("a shape that always writes, 10 transactions: {moved} moved from the replica, {learned} started on the primary");
    assert!(moved <= 2, "{moved} transactions moved to the primary");
    assert!(learned >= 8, "{learned} started on the primary");
    assert!(counts.shapes_on_primary >= 1);

    // The admin console shows the same counts.
    let admin = connect(&format!(
        "host={} port={} user=postgres dbname=tidemark",
        env.proxy.addr.ip(),
        env.proxy.addr.port()
    ))
    .await;
    let shown = rows(&admin.simple_query("SHOW TRANSACTIONS").await.unwrap());
    let value = |k: &str| {
        shown
            .iter()
            .find(|r| r[0].as_deref() == Some(k))
            .and_then(|r| r[1].clone())
            .unwrap_or_else(|| panic!("{k} in SHOW TRANSACTIONS: {shown:?}"))
    };
    assert_eq!(
        value("outcome.primary_learned"),
        count(&env, "primary_learned").to_string()
    );
    assert_eq!(
        value("replays"),
        env.proxy.app.transactions.counts().replays.to_string()
    );
    assert!(value("shapes_starting_on_primary").parse::<u64>().unwrap() >= 1);
    let config = rows(&admin.simple_query("SHOW CONFIG").await.unwrap());
    assert!(config
        .iter()
        .any(|r| r[0].as_deref() == Some("routing.transactions")
            && r[1].as_deref() == Some("optimistic")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_keeps_plain_transactions_on_the_primary() {
    let env = start(&[Some(DELAY)], |_| {}).await;
    let c = env.client().await;
    assert_eq!(scalar(&c, "SHOW tidemark.transactions").await, "read_only");
    caught_up(&env).await;
    exec(&c, "BEGIN").await;
    assert_eq!(served_by(&c).await.unwrap(), env.cluster.port(0));
    exec(&c, "COMMIT").await;
    exec(&c, "SET tidemark.transactions = optimistic").await;
    exec(&c, "BEGIN").await;
    assert_eq!(served_by(&c).await.unwrap(), env.cluster.port(1));
    exec(&c, "COMMIT").await;

    // What a read-only transaction costs in each mode (printed, not asserted: a debug build
    // on a shared machine), and where it ran.
    for (mode, begin) in [
        ("read_only", "BEGIN"),
        ("read_only", "BEGIN READ ONLY"),
        ("optimistic", "BEGIN"),
    ] {
        exec(&c, &format!("SET tidemark.transactions = {mode}")).await;
        let start = std::time::Instant::now();
        let mut on_replica = 0;
        for _ in 0..200 {
            exec(&c, begin).await;
            if served_by(&c).await.unwrap() == env.cluster.port(1) {
                on_replica += 1;
            }
            exec(&c, "COMMIT").await;
        }
        println!(
            "{mode}: {begin}; SELECT; COMMIT x200: {:.2} ms per transaction, {on_replica} on the replica",
            start.elapsed().as_secs_f64() * 1000.0 / 200.0
        );
    }
}

/// pgjdbc with autocommit off sends `BEGIN` pipelined before the transaction's first statement,
/// in one unit (Parse/Bind/Execute of `BEGIN`, then the statement, then Sync). Under
/// `optimistic` that BEGIN is deferred like a BEGIN sent alone: the transaction reads on the
/// replica, the client gets the same messages as from PostgreSQL directly, and a write later
/// in the transaction is replayed on the primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_begin_pipelined_with_the_first_statement_is_deferred_too() {
    use bytes::BytesMut;
    use common::raw::{data_rows, unnamed_statement};
    use postgres_protocol::message::frontend;

    let env = setup().await;
    exec(
        &env.client().await,
        "INSERT INTO optx (id, v) VALUES (7, 70)",
    )
    .await;
    caught_up(&env).await;
    // BEGIN without Describe, the statement with it: as pgjdbc sends them.
    let unit = |stmts: &[(&str, bool)]| {
        let mut b = BytesMut::new();
        for (sql, describe) in stmts {
            unnamed_statement(sql, *describe, &mut b);
        }
        frontend::sync(&mut b);
        b
    };
    let first = unit(&[
        ("BEGIN", false),
        ("SELECT v, inet_server_port() FROM optx WHERE id = 7", true),
    ]);
    let kinds = |m: &[common::raw::Msg]| m.iter().map(|(t, _)| *t).collect::<Vec<u8>>();

    // Directly on the primary: the reference.
    let mut d = common::raw::Raw::connect(
        format!("127.0.0.1:{}", env.cluster.port(0))
            .parse()
            .unwrap(),
        "postgres",
    )
    .await;
    d.send(&first).await;
    let direct = d.until_ready_ok().await;
    d.query_ok("ROLLBACK").await;

    let before = count(&env, "replica");
    let mut r = common::raw::Raw::connect(env.proxy.addr, "postgres").await;
    r.send(&first).await;
    let got = r.until_ready_ok().await;
    assert_eq!(kinds(&got), kinds(&direct), "{got:?}\nagainst\n{direct:?}");
    assert!(
        got.iter()
            .any(|(t, b)| *t == b'C' && b.starts_with(b"BEGIN")),
        "{got:?}"
    );
    assert_eq!(got.last().map(|(_, b)| b.clone()), Some(b"T".to_vec()));
    let rows = data_rows(&got);
    assert_eq!(rows[0][0].as_deref(), Some("70"));
    assert_eq!(
        rows[0][1].as_deref(),
        Some(env.cluster.port(1).to_string().as_str()),
        "the transaction reads on the replica"
    );
    let m = r.extended_unit(&["COMMIT"]).await;
    assert_eq!(m.last().map(|(_, b)| b.clone()), Some(b"I".to_vec()));
    assert!(count(&env, "replica") > before, "it ended on the replica");

    // Reads, then a write in the same transaction: replayed on the primary (the reads must
    // not ask for server-specific values, which differ there by design), committed there.
    let replayed = count(&env, "replayed");
    r.send(&unit(&[
        ("BEGIN", false),
        ("SELECT v FROM optx WHERE id = 7", true),
    ]))
    .await;
    let got = r.until_ready_ok().await;
    assert_eq!(data_rows(&got)[0][0].as_deref(), Some("70"));
    let m = r
        .extended_unit(&["UPDATE optx SET v = 71 WHERE id = 7"])
        .await;
    assert!(
        m.iter()
            .any(|(t, b)| *t == b'C' && b.starts_with(b"UPDATE 1")),
        "{m:?}"
    );
    let m = r.extended_unit(&["COMMIT"]).await;
    assert_eq!(m.last().map(|(_, b)| b.clone()), Some(b"I".to_vec()));
    let p = env.node(0).await;
    assert_eq!(scalar(&p, "SELECT v FROM optx WHERE id = 7").await, "71");
    assert_eq!(count(&env, "replayed"), replayed + 1);

    // A READ WRITE BEGIN pipelined the same way is not deferred: the primary.
    let rw = unit(&[
        ("BEGIN READ WRITE", false),
        ("SELECT inet_server_port()", true),
    ]);
    r.send(&rw).await;
    let got = r.until_ready_ok().await;
    assert_eq!(
        data_rows(&got)[0][0].as_deref(),
        Some(env.cluster.port(0).to_string().as_str())
    );
    r.extended_unit(&["COMMIT"]).await;
}

/// The primary stops answering (blackholed: its connections stay open, nothing comes back)
/// just as an optimistic transaction on the replica writes and must move there: the client
/// is answered within seconds (40001, as for any move that cannot complete), not held; nothing
/// is written; and once the primary answers again the session goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_that_stops_answering_during_the_move_does_not_hold_the_client() {
    use std::time::Instant;
    use tidemark_cluster::{ClusterConfig, Fault, FaultProxy};
    let cluster = start_cluster(ClusterConfig::with_replicas(1)).await;
    let fault =
        FaultProxy::start(format!("127.0.0.1:{}", cluster.port(0)).parse().unwrap()).unwrap();
    let proxy = proxy_for(&cluster, |c| {
        c.nodes[0].port = fault.port();
        c.monitor.timeout = Duration::from_millis(500);
        c.pool.connect_timeout = Duration::from_millis(500);
        c.routing.transactions = TxMode::Optimistic;
        c.routing.wait = WaitMode::Fixed;
    })
    .await;
    let c = connect(&proxy_dsn_of(&proxy, "postgres")).await;
    exec(
        &c,
        "CREATE TABLE hung (id int PRIMARY KEY, v int); INSERT INTO hung VALUES (1, 0)",
    )
    .await;
    tokio::task::block_in_place(|| wait_all_replayed(&cluster));
    wait_view_caught_up(&proxy).await;
    exec(&c, "BEGIN").await;
    assert_eq!(scalar(&c, "SELECT v FROM hung WHERE id = 1").await, "0");
    assert_eq!(
        served_by(&c).await.unwrap(),
        cluster.port(1),
        "the transaction reads on the replica"
    );
    fault.set(Fault::Blackhole);
    let t = Instant::now();
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        c.simple_query("UPDATE hung SET v = 1 WHERE id = 1"),
    )
    .await
    .expect("the client is answered, not held by the silent primary");
    let e = r.expect_err("the transaction cannot move to a primary that does not answer");
    assert_eq!(code(&e), "40001", "{e:?}");
    println!("answered in {:?}: {e:?}", t.elapsed());
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    exec(&c, "ROLLBACK").await;
    fault.set(Fault::Pass);
    // Once the primary answers again: nothing was written, and writes work.
    let t = Instant::now();
    loop {
        match c
            .simple_query("UPDATE hung SET v = v + 10 WHERE id = 1")
            .await
        {
            Ok(_) => break,
            Err(e) if t.elapsed() < Duration::from_secs(15) => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("writes did not come back: {e:?}"),
        }
    }
    let c2 = connect(&cluster.dsn(0)).await;
    assert_eq!(scalar(&c2, "SELECT v FROM hung WHERE id = 1").await, "10");
}

/// `BEGIN; SELECT …` sent as one simple query (node-postgres users write this; so do
/// scripts): the transaction starts on the replica all the same, and a later write replays
/// the whole query — its BEGIN included — on the primary. `BEGIN; SELECT …; COMMIT` in one
/// query runs on the replica from end to end. Both answer what PostgreSQL answers directly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn begin_and_reads_in_one_query_start_on_the_replica() {
    let env = setup().await;
    let primary = env.node(0).await;
    let replica = env.cluster.port(1).to_string();
    let c = env.client().await;
    exec(&c, "INSERT INTO orders VALUES (7)").await;
    caught_up(&env).await;
    let direct = env.node(0).await;

    // Complete, read-only: on the replica, the same rows and tags as directly.
    let sql =
        "BEGIN; SELECT id, paid FROM orders WHERE id = 7; SELECT count(*) FROM charges; COMMIT";
    let shape = |m: &[tokio_postgres::SimpleQueryMessage]| -> Vec<String> {
        m.iter()
            .map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => (0..r.len())
                    .map(|i| r.get(i).unwrap_or("NULL").to_string())
                    .collect::<Vec<_>>()
                    .join(","),
                tokio_postgres::SimpleQueryMessage::CommandComplete(n) => format!("complete {n}"),
                _ => "other".to_string(),
            })
            .collect()
    };
    let replica_runs = count(&env, "replica");
    let through = c.simple_query(sql).await.expect("through tidemark");
    let want = direct.simple_query(sql).await.expect("directly");
    assert_eq!(shape(&through), shape(&want));
    assert_eq!(
        count(&env, "replica"),
        replica_runs + 1,
        "ran on the replica"
    );
    let ports = rows(
        &c.simple_query("BEGIN; SELECT inet_server_port(); COMMIT")
            .await
            .unwrap(),
    );
    assert_eq!(ports[0][0].as_deref(), Some(replica.as_str()));

    // Open: on the replica, then a write moves it (the query replayed with its BEGIN).
    let replayed = count(&env, "replayed");
    let m = c
        .simple_query("BEGIN; SELECT paid FROM orders WHERE id = 7")
        .await
        .expect("BEGIN and a read");
    assert_eq!(rows(&m)[0][0].as_deref(), Some("f"));
    // (Not `inet_server_port()` here: the replay would answer the primary's, and diverge.)
    exec(&c, "UPDATE orders SET paid = true WHERE id = 7").await;
    exec(&c, "INSERT INTO charges VALUES (7)").await;
    exec(&c, "COMMIT").await;
    assert_eq!(count(&env, "replayed"), replayed + 1);
    assert_eq!(
        scalar(&primary, "SELECT count(*) FROM charges WHERE order_id = 7").await,
        "1"
    );
    assert_eq!(
        scalar(&primary, "SELECT paid FROM orders WHERE id = 7").await,
        "t"
    );

    // The data changed between the replica's read and the write: 40001, nothing written.
    caught_up(&env).await;
    let m = c
        .simple_query("BEGIN; SELECT paid FROM orders WHERE id = 7")
        .await
        .unwrap();
    assert_eq!(rows(&m)[0][0].as_deref(), Some("t"));
    exec(&primary, "UPDATE orders SET paid = false WHERE id = 7").await;
    let e = c
        .simple_query("INSERT INTO charges VALUES (8)")
        .await
        .expect_err("the primary's answer differs");
    assert_eq!(code(&e), "40001", "{e:?}");
    exec(&c, "ROLLBACK").await;
    assert_eq!(
        scalar(&primary, "SELECT count(*) FROM charges WHERE order_id = 8").await,
        "0"
    );
}
