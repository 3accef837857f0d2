//! Isolation between clients and honest outcomes (issue 14): a client that vanishes
//! mid-statement, mid-COPY or mid-pipeline leaves nothing behind for the next one; no session
//! state of one client reaches another through a pool of one connection; the pid a client is
//! given works with `pg_terminate_backend`/`pg_cancel_backend`; a lost server connection ends
//! the session the way PostgreSQL does; a COMMIT whose outcome is unknown says so.

mod common;

use std::time::{Duration, Instant};

use bytes::BytesMut;
use common::raw::{data_rows, field, sqlstate, Raw};
use common::*;
use postgres_protocol::message::frontend;
use tidemark_cluster::{ClusterConfig, FaultProxy};

async fn one(c: &tokio_postgres::Client, sql: &str) -> Option<String> {
    let r = rows(
        &c.simple_query(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}")),
    );
    r.first().and_then(|row| row.first().cloned()).flatten()
}

/// Connects a client whose connection task can be aborted to make it vanish.
async fn vanishing_client(dsn: &str) -> (tokio_postgres::Client, tokio::task::JoinHandle<()>) {
    let (client, conn) = tokio_postgres::connect(dsn, tokio_postgres::NoTls)
        .await
        .expect("connect");
    let h = tokio::spawn(async move {
        let _ = conn.await;
    });
    (client, h)
}

/// Six clients one after another each get their own row at once.
async fn following_clients_see_only_their_own(dsn: &str, round: usize) {
    for k in 0..6 {
        let start = Instant::now();
        let c = connect(dsn).await;
        let who = one(&c, &format!("select 'B{k}' as who")).await;
        assert_eq!(
            who.as_deref(),
            Some(format!("B{k}").as_str()),
            "round {round}, client {k} received another client's row"
        );
        assert!(
            start.elapsed() < Duration::from_millis(900),
            "round {round}, client {k} waited {:?} behind an abandoned statement",
            start.elapsed()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_statement_never_reaches_another_client() {
    // One server connection per node: every client reuses the abandoned one.
    let env = start(&[None], |c| c.pool.max_size = 1).await;
    let dsn = env.proxy_dsn();
    for round in 0..5 {
        let (a, conn) = vanishing_client(&dsn).await;
        let q = tokio::spawn(async move {
            let _ = a
                .simple_query("select 'secret-of-A' as who from pg_sleep(1.5)")
                .await;
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        conn.abort();
        q.abort();
        following_clients_see_only_their_own(&dsn, round).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_leaving_mid_copy_or_mid_pipeline_leaves_nothing_behind() {
    let env = start(&[None], |c| c.pool.max_size = 1).await;
    let dsn = env.proxy_dsn();
    let c = env.client().await;
    c.batch_execute("CREATE TABLE copied (v text)")
        .await
        .unwrap();

    for round in 0..3 {
        // Mid-COPY: the COPY has started and one row was sent, then the client is gone.
        let mut a = Raw::connect(env.proxy.addr, "postgres").await;
        let mut b = BytesMut::new();
        frontend::query("COPY copied FROM STDIN", &mut b).unwrap();
        a.send(&b).await;
        let (tag, _) = a.recv().await.expect("copy in response");
        assert_eq!(tag, b'G', "COPY FROM STDIN starts copy-in");
        let row = b"from-A\n";
        let mut b = vec![b'd'];
        b.extend_from_slice(&((row.len() + 4) as u32).to_be_bytes());
        b.extend_from_slice(row);
        a.send(&b).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(a);
        let start = Instant::now();
        let c2 = connect(&dsn).await;
        c2.batch_execute("INSERT INTO copied VALUES ('from-B')")
            .await
            .unwrap();
        let n = one(&c2, "select count(*) from copied where v = 'from-A'").await;
        assert_eq!(
            n.as_deref(),
            Some("0"),
            "round {round}: the abandoned COPY committed"
        );
        assert!(start.elapsed() < Duration::from_secs(2));

        // Mid-pipeline: Parse/Bind/Execute of a slow statement, flushed, no Sync.
        let mut a = Raw::connect(env.proxy.addr, "postgres").await;
        let mut b = BytesMut::new();
        common::raw::unnamed_statement(
            "select 'secret-of-A' as who from pg_sleep(1.5)",
            false,
            &mut b,
        );
        frontend::flush(&mut b);
        a.send(&b).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        drop(a);
        following_clients_see_only_their_own(&dsn, round).await;

        // Mid-pipeline with a Sync: the answer is under way when the client goes.
        let mut a = Raw::connect(env.proxy.addr, "postgres").await;
        let mut b = BytesMut::new();
        for _ in 0..3 {
            frontend::query("select 'secret-of-A' as who from pg_sleep(0.5)", &mut b).unwrap();
        }
        a.send(&b).await;
        tokio::time::sleep(Duration::from_millis(700)).await;
        drop(a);
        following_clients_see_only_their_own(&dsn, round).await;
    }
}

/// What a client sees of the server session it is given: role, settings, prepared statements,
/// temp tables, advisory locks, LISTEN channels, cursors.
async fn server_state(c: &tokio_postgres::Client) -> Vec<Option<String>> {
    let r = rows(
        &c.simple_query(
            "select current_user, session_user, current_setting('app.leak', true), \
             (select count(*) from pg_prepared_statements where name not like 'tm\\_%'), \
             to_regclass('pg_temp.leaked_tmp')::text, \
             (select count(*) from pg_locks where locktype = 'advisory' and pid = pg_backend_pid()), \
             (select count(*) from pg_listening_channels()), \
             (select count(*) from pg_cursors), \
             current_setting('work_mem')",
        )
        .await
        .unwrap(),
    );
    // A custom setting once set reads as '' after a reset, never set as NULL: both are unset.
    r.into_iter()
        .next()
        .unwrap()
        .into_iter()
        .map(|v| v.filter(|s| !s.is_empty()))
        .collect()
}

fn pristine() -> Vec<Option<String>> {
    ["postgres", "postgres", "", "0", "", "0", "0", "0", "4MB"]
        .iter()
        .map(|s| {
            if s.is_empty() {
                None
            } else {
                Some(s.to_string())
            }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_session_state_reaches_the_next_client_through_a_pool_of_one() {
    let cluster = start_cluster(ClusterConfig::with_replicas(0)).await;
    let proxy = proxy_for(&cluster, |c| c.pool.max_size = 1).await;
    let dsn = proxy_dsn_of(&proxy, "postgres");
    let setup = connect(&dsn).await;
    setup
        .batch_execute(
            "CREATE ROLE tm_r1; CREATE ROLE tm_r2 SUPERUSER; \
             GRANT tm_r1 TO postgres; \
             CREATE FUNCTION leak_setting() RETURNS void LANGUAGE plpgsql AS \
               $$ BEGIN PERFORM set_config('app.leak', 'from-a-function', false); END $$",
        )
        .await
        .unwrap();
    assert_eq!(server_state(&setup).await, pristine());
    drop(setup);

    // (statement, does the client keep its server connection for the rest of its session)
    let cases: &[(&str, bool)] = &[
        ("SET ROLE tm_r1", false),
        ("SET SESSION AUTHORIZATION tm_r2", false),
        ("SET work_mem = '7MB'", false),
        (
            "DO $$ BEGIN PERFORM set_config('app.leak', 'from-a-do-block', false); END $$",
            false,
        ),
        ("SELECT leak_setting()", false),
        ("DO $$ BEGIN EXECUTE 'SET ROLE tm_r1'; END $$", false),
        (
            "DO $$ BEGIN EXECUTE 'SET SESSION AUTHORIZATION tm_r2'; END $$",
            false,
        ),
        (
            "DO $$ BEGIN CREATE TEMP TABLE leaked_tmp (x int); END $$",
            false,
        ),
        ("DO $$ BEGIN PERFORM pg_advisory_lock(42); END $$", false),
        ("DO $$ BEGIN EXECUTE 'LISTEN leaked_channel'; END $$", false),
        (
            "DO $$ BEGIN EXECUTE 'PREPARE leaked_stmt AS SELECT 1'; END $$",
            false,
        ),
        ("PREPARE leaked_stmt AS SELECT 1", true),
        ("CREATE TEMP TABLE leaked_tmp (x int)", true),
        ("SELECT pg_advisory_lock(42)", true),
        ("LISTEN leaked_channel", true),
        (
            "BEGIN; DECLARE leaked CURSOR WITH HOLD FOR SELECT 1; COMMIT",
            true,
        ),
        (
            "SELECT set_config('app.leak', 'from-set-config', false)",
            true,
        ),
    ];
    for (sql, pins) in cases {
        let a = connect(&dsn).await;
        a.batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        if *pins {
            // The client holds the only connection until it leaves.
            drop(a);
            tokio::time::sleep(Duration::from_millis(100)).await;
        } else {
            // The client stays; the next one gets the same server connection.
            let b = connect(&dsn).await;
            assert_eq!(
                server_state(&b).await,
                pristine(),
                "after another client ran {sql:?}"
            );
            drop(b);
            // The client still sees what it set where tidemark can replay it.
            if sql.starts_with("SET ROLE") {
                assert_eq!(
                    one(&a, "select current_user").await.as_deref(),
                    Some("tm_r1")
                );
            }
            if sql.starts_with("SET SESSION") {
                assert_eq!(
                    one(&a, "select session_user").await.as_deref(),
                    Some("tm_r2")
                );
            }
            if sql.starts_with("SET work_mem") {
                assert_eq!(one(&a, "show work_mem").await.as_deref(), Some("7MB"));
            }
            drop(a);
        }
        let b = connect(&dsn).await;
        assert_eq!(
            server_state(&b).await,
            pristine(),
            "after a client that ran {sql:?} left"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forty_role_switching_clients_leave_no_role_behind() {
    let cluster = start_cluster(ClusterConfig::with_replicas(0)).await;
    let proxy = proxy_for(&cluster, |c| c.pool.max_size = 2).await;
    let dsn = proxy_dsn_of(&proxy, "postgres");
    connect(&dsn)
        .await
        .batch_execute("CREATE ROLE tm_a; CREATE ROLE tm_b SUPERUSER")
        .await
        .unwrap();
    let mut handles = Vec::new();
    for i in 0..40 {
        let dsn = dsn.clone();
        handles.push(tokio::spawn(async move {
            let c = connect(&dsn).await;
            let (set, check, want) = if i % 2 == 0 {
                ("SET ROLE tm_a", "select current_user", "tm_a")
            } else {
                (
                    "SET SESSION AUTHORIZATION tm_b",
                    "select session_user",
                    "tm_b",
                )
            };
            c.batch_execute(set).await.unwrap();
            for _ in 0..5 {
                assert_eq!(one(&c, check).await.as_deref(), Some(want));
                // A fresh client between the switchers never inherits a role.
                let fresh = connect(&dsn).await;
                let r = rows(
                    &fresh
                        .simple_query("select current_user, session_user")
                        .await
                        .unwrap(),
                );
                assert_eq!(
                    r[0],
                    vec![Some("postgres".into()), Some("postgres".into())],
                    "a new client inherited a role"
                );
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    let c = connect(&dsn).await;
    for _ in 0..4 {
        let r = rows(
            &c.simple_query("select current_user, session_user")
                .await
                .unwrap(),
        );
        assert_eq!(r[0], vec![Some("postgres".into()), Some("postgres".into())]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminate_and_cancel_act_on_the_pid_the_client_was_given() {
    let env = start(&[None], |_| {}).await;
    let ctl = env.client().await;

    // pg_cancel_backend on the reported pid cancels the running statement; the session goes on.
    let mut victim = Raw::connect(env.proxy.addr, "postgres").await;
    let mut b = BytesMut::new();
    frontend::query("select pg_sleep(5)", &mut b).unwrap();
    victim.send(&b).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let r = one(&ctl, &format!("select pg_cancel_backend({})", victim.pid)).await;
    assert_eq!(r.as_deref(), Some("t"));
    let msgs = victim.until_ready().await;
    let err = msgs.iter().find(|m| m.0 == b'E').expect("an error");
    assert_eq!(sqlstate(&err.1), "57014", "{}", field(&err.1, b'M'));
    assert!(started.elapsed() < Duration::from_secs(2));
    let ok = victim.query("select 'still here'").await;
    assert_eq!(data_rows(&ok)[0][0].as_deref(), Some("still here"));

    // pg_terminate_backend, with the pid as a bound parameter: FATAL 57P01, then the close.
    let row = ctl
        .query_one("select pg_terminate_backend($1)", &[&victim.pid])
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0));
    let (tag, body) = victim
        .recv_within(Duration::from_secs(2))
        .await
        .expect("the victim is told");
    assert_eq!(tag, b'E');
    assert_eq!(sqlstate(&body), "57P01");
    assert_eq!(field(&body, b'S'), "FATAL");
    assert!(
        victim.recv_within(Duration::from_secs(2)).await.is_none(),
        "the connection is closed after the FATAL"
    );

    // An unknown pid answers as PostgreSQL does: false and a warning.
    let r = one(&ctl, "select pg_terminate_backend(2147483000)").await;
    assert_eq!(r.as_deref(), Some("f"));
    // The controller itself is unaffected.
    assert_eq!(one(&ctl, "select 1").await.as_deref(), Some("1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_reports_the_real_backend_and_passes_its_end_through() {
    let env = start(&[None], |c| {
        c.pool.mode = tidemark::config::PoolMode::Session
    })
    .await;
    let mut c = Raw::connect(env.proxy.addr, "postgres").await;
    let r = c
        .query("select pg_backend_pid(), pg_is_in_recovery()")
        .await;
    let rows = data_rows(&r);
    assert_eq!(
        rows[0][0].as_deref(),
        Some(c.pid.to_string().as_str()),
        "BackendKeyData carries the server's pid"
    );
    assert_eq!(rows[0][1].as_deref(), Some("f"));
    // A direct pg_terminate_backend of that server pid reaches the client as it would directly.
    let direct = env.node(0).await;
    direct
        .query_one("select pg_terminate_backend($1)", &[&c.pid])
        .await
        .unwrap();
    let (tag, body) = c
        .recv_within(Duration::from_secs(3))
        .await
        .expect("the client is told");
    assert_eq!(tag, b'E');
    assert_eq!(sqlstate(&body), "57P01");
    assert_eq!(field(&body, b'S'), "FATAL");
    assert!(c.recv_within(Duration::from_secs(2)).await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_server_inside_a_transaction_ends_the_session() {
    let env = start(&[None], |_| {}).await;
    let direct = env.node(0).await;
    direct
        .batch_execute("CREATE TABLE lost (id int)")
        .await
        .unwrap();

    // Between statements: the backend is terminated while the client is idle in a transaction.
    let mut c = Raw::connect(env.proxy.addr, "postgres").await;
    c.query("BEGIN").await;
    let r = c
        .query("INSERT INTO lost VALUES (1); SELECT pg_backend_pid()")
        .await;
    let server_pid: i32 = data_rows(&r)[0][0].as_deref().unwrap().parse().unwrap();
    direct
        .query_one("select pg_terminate_backend($1)", &[&server_pid])
        .await
        .unwrap();
    let (tag, body) = c
        .recv_within(Duration::from_secs(3))
        .await
        .expect("the client is told at once");
    assert_eq!(tag, b'E');
    assert_eq!(field(&body, b'S'), "FATAL");
    assert_eq!(sqlstate(&body), "57P01");
    assert!(c.recv_within(Duration::from_secs(2)).await.is_none());

    // During a statement inside a transaction.
    let mut c = Raw::connect(env.proxy.addr, "postgres").await;
    c.query("BEGIN").await;
    let r = c.query("SELECT pg_backend_pid()").await;
    let server_pid: i32 = data_rows(&r)[0][0].as_deref().unwrap().parse().unwrap();
    let mut b = BytesMut::new();
    frontend::query("select pg_sleep(5)", &mut b).unwrap();
    c.send(&b).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    direct
        .query_one("select pg_terminate_backend($1)", &[&server_pid])
        .await
        .unwrap();
    let mut saw_fatal = false;
    while let Some((tag, body)) = c.recv_within(Duration::from_secs(3)).await {
        assert_ne!(tag, b'Z', "no ReadyForQuery after the server session ended");
        if tag == b'E' {
            assert_eq!(field(&body, b'S'), "FATAL");
            saw_fatal = true;
        }
    }
    assert!(saw_fatal);
    let n: i64 = direct
        .query_one("select count(*) from lost", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_outcomes_are_honest_when_the_server_is_lost() {
    // The primary behind a fault proxy; a replica 400 ms behind, so a read that does not wait
    // for the write's position is stale.
    let cluster = start_cluster(ClusterConfig {
        replicas: vec![tidemark_cluster::ReplicaConfig {
            apply_delay: Some(Duration::from_millis(400)),
            ..Default::default()
        }],
        ..Default::default()
    })
    .await;
    let fault =
        FaultProxy::start(format!("127.0.0.1:{}", cluster.port(0)).parse().unwrap()).unwrap();
    let proxy = proxy_for(&cluster, |c| c.nodes[0].port = fault.port()).await;
    let dsn = proxy_dsn_of(&proxy, "postgres");
    let direct = connect(&cluster.dsn(0)).await;
    direct
        .batch_execute("CREATE TABLE outcome (id int)")
        .await
        .unwrap();
    wait_all_replayed(&cluster);

    // 1. The server is lost after the COMMIT's answer reached tidemark, before the pipelined
    //    commit-position read is answered: the client was told COMMIT and must see its row.
    for id in 0..3 {
        let c = connect(&dsn).await;
        fault.cut_on(b"pg_current_wal_insert_lsn", false);
        c.batch_execute(&format!("INSERT INTO outcome VALUES ({id})"))
            .await
            .unwrap();
        assert!(!fault.cut_pending(), "the cut happened");
        let n = one(&c, &format!("select count(*) from outcome where id = {id}")).await;
        assert_eq!(
            n.as_deref(),
            Some("1"),
            "stale read after a committed write"
        );
        // The session goes on normally afterwards.
        assert_eq!(one(&c, "select 2").await.as_deref(), Some("2"));
    }
    // ... and is not sent to the primary for good: once replicas have everything, reads of
    // this session go to the replica again.
    let c = connect(&dsn).await;
    fault.cut_on(b"pg_current_wal_insert_lsn", false);
    c.batch_execute("INSERT INTO outcome VALUES (10)")
        .await
        .unwrap();
    one(&c, "select 1").await;
    wait_all_replayed(&cluster);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        one(&c, "select pg_is_in_recovery()").await.as_deref(),
        Some("t"),
        "reads stay on the primary after one failed position read"
    );

    // 2. The COMMIT reached the server, its answer did not: 08007, the session ends.
    let mut r = Raw::connect(proxy.addr, "postgres").await;
    r.query("BEGIN").await;
    r.query("INSERT INTO outcome VALUES (100)").await;
    fault.cut_on(b"COMMIT", true);
    let mut b = BytesMut::new();
    frontend::query("COMMIT", &mut b).unwrap();
    r.send(&b).await;
    let mut codes = Vec::new();
    let mut readies = 0;
    while let Some((tag, body)) = r.recv_within(Duration::from_secs(5)).await {
        if tag == b'E' {
            codes.push((field(&body, b'S'), sqlstate(&body)));
        }
        if tag == b'Z' {
            readies += 1;
        }
    }
    assert_eq!(
        codes,
        vec![("FATAL".to_string(), "08007".to_string())],
        "one FATAL transaction_resolution_unknown"
    );
    assert_eq!(readies, 0, "no ReadyForQuery claims an outcome");
    let n: i64 = direct
        .query_one("select count(*) from outcome where id = 100", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1, "the COMMIT did commit on the server");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_retried_on_the_primary_records_its_commit_position() {
    // A function tidemark is told is read-only, but which writes: the replica refuses it
    // (25006), tidemark retries it on the primary, and the next read must see the write.
    let env = start(&[Some(Duration::from_millis(500))], |c| {
        c.routing.read_only_functions = vec!["sneaky_insert".into()]
    })
    .await;
    let direct = env.node(0).await;
    direct
        .batch_execute(
            "CREATE TABLE sneaky (id int); \
             CREATE FUNCTION sneaky_insert(i int) RETURNS int LANGUAGE sql AS \
               $$ INSERT INTO sneaky VALUES (i) RETURNING i $$",
        )
        .await
        .unwrap();
    wait_all_replayed(&env.cluster);
    let c = env.client().await;
    for id in 0..5 {
        let r = one(&c, &format!("select sneaky_insert({id})")).await;
        assert_eq!(r, Some(id.to_string()));
        let n = one(&c, &format!("select count(*) from sneaky where id = {id}")).await;
        assert_eq!(n.as_deref(), Some("1"), "stale read after a retried write");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_notifications_carry_the_pid_the_client_was_given() {
    let env = start(&[None], |_| {}).await;
    let mut c = Raw::connect(env.proxy.addr, "postgres").await;
    c.query("LISTEN tm_chan").await;
    let msgs = c.query("NOTIFY tm_chan, 'self'").await;
    let mut got = msgs.iter().find(|m| m.0 == b'A').cloned();
    if got.is_none() {
        got = c.recv_within(Duration::from_secs(2)).await;
    }
    let (tag, body) = got.expect("a notification");
    assert_eq!(tag, b'A');
    let pid = i32::from_be_bytes(body[0..4].try_into().unwrap());
    assert_eq!(pid, c.pid, "a self-notification names the client's own pid");
    // Another session's notification keeps its sender's server pid.
    let other = env.node(0).await;
    other
        .batch_execute("NOTIFY tm_chan, 'other'")
        .await
        .unwrap();
    let (tag, body) = c
        .recv_within(Duration::from_secs(2))
        .await
        .expect("the other notification");
    assert_eq!(tag, b'A');
    let pid = i32::from_be_bytes(body[0..4].try_into().unwrap());
    assert_ne!(pid, c.pid);
}

/// A pooled server connection the server ended while it sat idle in the pool (terminated,
/// `idle_session_timeout`, a restart) is never handed to the next statement: the checkout
/// finds it closed and opens another, and the client sees only its answer. With a pool of
/// one, the next statement can only run on a replacement.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_connection_ended_while_idle_is_not_handed_out() {
    let cluster = start_cluster(ClusterConfig::with_replicas(0)).await;
    let proxy = proxy_for(&cluster, |c| c.pool.max_size = 1).await;
    let c = connect(&proxy_dsn_of(&proxy, "postgres")).await;
    let direct = connect(&cluster.dsn(0)).await;
    let own: i32 = direct
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    for round in 0..3 {
        assert_eq!(one(&c, "SELECT 41 + 1").await.as_deref(), Some("42"));
        // The pool's one connection, idle between statements: ended by the server.
        let pooled: Vec<i32> = direct
            .query(
                "SELECT pid FROM pg_stat_activity WHERE backend_type = 'client backend' \
                 AND pid <> $1 AND state = 'idle'",
                &[&own],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert!(!pooled.is_empty(), "round {round}: a pooled connection");
        for pid in &pooled {
            // The timeout makes the call wait until the backend is gone (PostgreSQL 14+).
            direct
                .execute("SELECT pg_terminate_backend($1, 10000)", &[pid])
                .await
                .unwrap();
        }
        // Let the server's goodbye reach the idle socket.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let next: i32 = c
            .query_one(
                "SELECT count(*)::int FROM pg_stat_activity WHERE pid = ANY($1)",
                &[&pooled],
            )
            .await
            .expect("the next statement runs on a live connection")
            .get(0);
        assert_eq!(next, 0, "round {round}: the ended connections are gone");
    }
}

/// A client cancels its statement just as the statement ends. The cancel travels on a new
/// connection to the server (here held back 700 ms on the way, as a busy network or server
/// would); meanwhile the server connection the statement ran on goes back to the pool, and
/// the next client's statement starts on it. Directly, a late cancel can only ever hit the
/// canceling client's own next statement: through tidemark it must not cancel another
/// client's (57014 "canceling statement due to user request" for a statement nobody
/// canceled).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_cancel_never_reaches_the_next_clients_statement() {
    let cluster = start_cluster(ClusterConfig {
        replicas: vec![tidemark_cluster::ReplicaConfig::default()],
        ..Default::default()
    })
    .await;
    let fault =
        FaultProxy::start(format!("127.0.0.1:{}", cluster.port(0)).parse().unwrap()).unwrap();
    // One server connection to the primary: the next client's statement runs on the same
    // one unless tidemark keeps it from being reused.
    let proxy = proxy_for(&cluster, |c| {
        c.nodes[0].port = fault.port();
        c.pool.max_size = 1;
    })
    .await;
    let dsn = proxy_dsn_of(&proxy, "postgres");
    let a = std::sync::Arc::new(connect(&dsn).await);
    let b = connect(&dsn).await;
    for round in 0..3 {
        // The pooled connection is open before new connections are held.
        assert_eq!(
            one(&a, "/* tidemark: primary */ select 'warm'")
                .await
                .as_deref(),
            Some("warm")
        );
        fault.hold_new_connections(Duration::from_millis(700));
        let token = a.cancel_token();
        let a_run = {
            let a = a.clone();
            tokio::spawn(async move {
                a.simple_query("/* tidemark: primary */ select pg_sleep(0.3)")
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        let cancel = tokio::spawn(async move { token.cancel_query(tokio_postgres::NoTls).await });
        // A's statement ends before its cancel arrives: A got what it asked for.
        a_run
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("round {round}: the cancel arrived early: {e}"));
        // B's statement runs while A's cancel is still on its way to the server.
        let b_run = b
            .simple_query("/* tidemark: primary */ select pg_sleep(1), 'B'")
            .await;
        let _ = cancel.await;
        fault.hold_new_connections(Duration::ZERO);
        match b_run {
            Ok(m) => assert_eq!(rows(&m)[0][1].as_deref(), Some("B"), "round {round}"),
            Err(e) => {
                panic!(
                    "round {round}: client B's statement failed ({:?}) after client A's late cancel: {e}",
                    e.code().map(|c| c.code())
                )
            }
        }
    }
}
