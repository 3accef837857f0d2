//! Databases and roles created, dropped and renamed through tidemark, on a real primary + a
//! replica delayed 200 ms — what test runners and migration tools do (Django's test runner,
//! Rails db:create/db:drop, pytest-postgresql): a new database is usable at once, and
//! `DROP DATABASE` / `ALTER DATABASE … RENAME` / `DROP ROLE` are not blocked (or left with
//! sessions behind) by tidemark's own pooled server connections.

mod common;

use std::time::Duration;

use common::*;
use tidemark::config::WaitMode;
use tokio_postgres::Client;

const DELAY: Duration = Duration::from_millis(200);

fn dsn_for(env: &Env, user: &str, db: &str) -> String {
    format!(
        "host={} port={} user={user} dbname={db}",
        env.proxy.addr.ip(),
        env.proxy.addr.port()
    )
}

/// Backend pids of `user` (or of `database`) on node `i`, tidemark's pooled connections
/// among them.
async fn backends(env: &Env, i: usize, column: &str, name: &str) -> Vec<String> {
    let n = env.node(i).await;
    rows(
        &n.simple_query(&format!(
            "SELECT pid FROM pg_stat_activity WHERE {column} = '{name}' ORDER BY pid"
        ))
        .await
        .unwrap(),
    )
    .into_iter()
    .filter_map(|r| r[0].clone())
    .collect()
}

/// Waits until none of `pids` is alive on node `i` (closing a connection is asynchronous).
async fn gone(env: &Env, i: usize, pids: &[String]) -> bool {
    if pids.is_empty() {
        return true;
    }
    let n = env.node(i).await;
    let sql = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE pid IN ({})",
        pids.join(",")
    );
    for _ in 0..200 {
        if scalar(&n, &sql).await == "0" {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

/// A test runner's round: reads and writes from several connections, each reading its own
/// rows back, plus reads of rows other connections wrote (no error; content is each
/// connection's own business under `session` consistency).
async fn use_database(env: &Env, db: &str, round: usize) {
    let dsn = dsn_for(env, "postgres", db);
    let mut conns: Vec<Client> = Vec::new();
    for _ in 0..3 {
        conns.push(connect(&dsn).await);
    }
    let mut tasks = Vec::new();
    for (k, c) in conns.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            for j in 0..5 {
                let id = (k * 100 + j) as i32;
                c.execute(
                    "INSERT INTO items VALUES ($1, $2)",
                    &[&id, &format!("r{round}")],
                )
                .await
                .unwrap_or_else(|e| panic!("insert: {e}"));
                let n: i64 = c
                    .query_one("SELECT count(*) FROM items WHERE id = $1", &[&id])
                    .await
                    .unwrap_or_else(|e| panic!("read own row: {e}"))
                    .get(0);
                assert_eq!(n, 1, "a connection reads its own write");
                c.simple_query("SELECT count(*) FROM items")
                    .await
                    .unwrap_or_else(|e| panic!("read all rows: {e}"));
                c.simple_query("SELECT count(*) FROM other")
                    .await
                    .unwrap_or_else(|e| panic!("read a table another connection made: {e}"));
            }
            c.batch_execute("BEGIN; UPDATE items SET v = v || '!' WHERE id < 1000; COMMIT")
                .await
                .unwrap_or_else(|e| panic!("transaction: {e}"));
        }));
    }
    for t in tasks {
        t.await.expect("connection task");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_test_runners_database_lifecycle_twenty_times() {
    let env = start(&[Some(DELAY)], |_| {}).await;
    let admin = env.client().await;
    for round in 0..20 {
        let db = format!("test_runner_{round}");
        exec(&admin, &format!("CREATE DATABASE {db}")).await;
        // At once: connect, make the schema (as migrations do), and read it from another
        // connection right away (the replica knows neither the database nor the tables yet).
        let dsn = dsn_for(&env, "postgres", &db);
        let setup = connect(&dsn).await;
        exec(
            &setup,
            "CREATE TABLE items (id int PRIMARY KEY, v text); CREATE TABLE other (id int)",
        )
        .await;
        let reader = connect(&dsn).await;
        assert_eq!(scalar(&reader, "SELECT count(*) FROM items").await, "0");
        use_database(&env, &db, round).await;
        // Other connections' rows: `session` consistency does not order them after this
        // connection's reads, the primary has them all.
        assert_eq!(
            scalar(&setup, "/* tidemark: primary */ SELECT count(*) FROM items").await,
            "15"
        );
        drop(setup);
        drop(reader);
        exec(&admin, &format!("DROP DATABASE {db}")).await;
    }
    // Every round's pools were closed, on every node (a closed connection's backend exits a
    // moment later; a replica also ends its sessions when it replays the drop).
    for i in 0..2 {
        let n = env.node(i).await;
        let sql = "SELECT count(*) FROM pg_stat_activity WHERE datname LIKE 'test_runner_%'";
        let mut left = String::new();
        for _ in 0..200 {
            left = scalar(&n, sql).await;
            if left == "0" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(left, "0", "sessions of dropped databases left on node {i}");
    }
}

/// A replica that knows a database but not yet a table another connection just created: the
/// read is answered by the primary, never with "relation does not exist".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_the_replica_does_not_have_yet_is_read_on_the_primary() {
    let env = start(&[Some(DELAY)], |_| {}).await;
    let admin = env.client().await;
    exec(&admin, "CREATE DATABASE fresh").await;
    tokio::task::block_in_place(|| wait_all_replayed(&env.cluster));
    wait_view_caught_up(&env.proxy).await;
    let dsn = dsn_for(&env, "postgres", "fresh");
    let (a, b) = (connect(&dsn).await, connect(&dsn).await);
    assert_eq!(served_by(&b).await.unwrap(), env.cluster.port(1));
    for i in 0..10 {
        exec(&a, &format!("CREATE TABLE t{i} (id int)")).await;
        assert_eq!(scalar(&b, &format!("SELECT count(*) FROM t{i}")).await, "0");
        let r = b
            .query_one(&format!("SELECT count(*) FROM t{i}"), &[])
            .await
            .expect("extended protocol too");
        assert_eq!(r.get::<_, i64>(0), 0);
    }
    // A table that exists nowhere: the client gets PostgreSQL's own error.
    let e = b.simple_query("SELECT * FROM nowhere").await.unwrap_err();
    let db = e.as_db_error().expect("a server error");
    assert_eq!(db.code().code(), "42P01");
    assert_eq!(db.message(), "relation \"nowhere\" does not exist");
}

/// `DROP DATABASE` while a tidemark client is still inside it: PostgreSQL's own error (after
/// its own wait); `WITH (FORCE)` ends that client as PostgreSQL ends its sessions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_database_with_a_client_inside_answers_as_postgres() {
    let env = start(&[Some(DELAY)], |_| {}).await;
    let admin = env.client().await;
    exec(&admin, "CREATE DATABASE busy").await;
    // Directly: what PostgreSQL answers with one other session inside.
    let direct = env.node(0).await;
    let direct_inside =
        connect(&env.cluster.dsn(0).replace("dbname=postgres", "dbname=busy")).await;
    scalar(&direct_inside, "SELECT 1").await;
    let want = direct.simple_query("DROP DATABASE busy").await.unwrap_err();
    drop(direct_inside);
    let want = want.as_db_error().expect("server error").clone();
    let inside = connect(&dsn_for(&env, "postgres", "busy")).await;
    exec(&inside, "CREATE TABLE t (id int)").await;
    // Through tidemark, with the tidemark client idle (no server connection held).
    let got = admin.simple_query("DROP DATABASE busy").await.unwrap_err();
    let got = got.as_db_error().expect("server error");
    assert_eq!(got.code(), want.code());
    assert_eq!(got.message(), want.message());
    assert_eq!(got.detail(), want.detail());
    assert_eq!(got.severity(), want.severity());
    // Still usable.
    assert_eq!(scalar(&inside, "SELECT count(*) FROM t").await, "0");

    // Inside a transaction (a server connection held): the same.
    exec(&inside, "BEGIN").await;
    exec(&inside, "INSERT INTO t VALUES (1)").await;
    let got = admin.simple_query("DROP DATABASE busy").await.unwrap_err();
    assert_eq!(got.as_db_error().unwrap().code(), want.code());
    exec(&inside, "COMMIT").await;

    // WITH (FORCE): the client inside is ended with 57P01, the database dropped.
    exec(&admin, "DROP DATABASE busy WITH (FORCE)").await;
    let e = inside.simple_query("SELECT 1").await.unwrap_err();
    if let Some(db) = e.as_db_error() {
        assert_eq!(db.code().code(), "57P01", "{db:?}");
    }
    assert!(inside.is_closed() || inside.simple_query("SELECT 1").await.is_err());
    assert_eq!(
        scalar(
            &admin,
            "SELECT count(*) FROM pg_database WHERE datname = 'busy'"
        )
        .await,
        "0"
    );
}

/// `DROP ROLE` after the role's pooled connections: it runs, and no server session of the
/// dropped role is left on any node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_role_closes_the_roles_pooled_connections() {
    // Placement after the session's own write is asserted: a replica that has not replayed
    // it at the first check is polled for up to max_wait (routing.wait = fixed), not read
    // around at once; the adaptive policy is tested in adaptive_wait.rs.
    let env = start(&[Some(DELAY)], |c| {
        trust_user(c, "temp_user");
        c.routing.wait = WaitMode::Fixed;
    })
    .await;
    let admin = env.client().await;
    exec(
        &admin,
        "CREATE ROLE temp_user LOGIN SUPERUSER PASSWORD 'pw'",
    )
    .await;
    exec(&admin, "CREATE TABLE role_t (id int)").await;
    tokio::task::block_in_place(|| wait_all_replayed(&env.cluster));
    {
        let u = connect(&dsn_for(&env, "temp_user", "postgres")).await;
        exec(&u, "INSERT INTO role_t VALUES (1)").await;
        tokio::task::block_in_place(|| wait_all_replayed(&env.cluster));
        wait_view_caught_up(&env.proxy).await;
        assert!(
            reaches(&u, env.cluster.port(1)).await,
            "the session's reads reach the caught-up replica"
        );
        assert_eq!(scalar(&u, "SELECT count(*) FROM role_t").await, "1");
    }
    let on_primary = backends(&env, 0, "usename", "temp_user").await;
    let on_replica = backends(&env, 1, "usename", "temp_user").await;
    assert!(
        !on_primary.is_empty() && !on_replica.is_empty(),
        "tidemark pooled the role's connections on both nodes"
    );
    exec(&admin, "DROP ROLE temp_user").await;
    assert!(
        gone(&env, 0, &on_primary).await,
        "primary sessions of the dropped role"
    );
    assert!(
        gone(&env, 1, &on_replica).await,
        "replica sessions of the dropped role"
    );
    // The role is gone for new logins too, at once: the primary refuses it, and a replica
    // that has not replayed the drop yet is not asked instead.
    let e = tokio_postgres::connect(
        &dsn_for(&env, "temp_user", "postgres"),
        tokio_postgres::NoTls,
    )
    .await
    .err();
    let e = match e {
        Some(e) => e,
        None => panic!("a dropped role cannot log in"),
    };
    let db = e.as_db_error().expect("a server error");
    assert_eq!(db.severity(), "FATAL");
    assert!(db.message().contains("temp_user"), "{db:?}");
}

/// `ALTER DATABASE … RENAME` after clients used the database through tidemark.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rename_database_after_it_was_used() {
    // Placement after the session's own write is asserted: a replica that has not replayed
    // it at the first check is polled for up to max_wait (routing.wait = fixed), not read
    // around at once; the adaptive policy is tested in adaptive_wait.rs.
    let env = start(&[Some(DELAY)], |c| c.routing.wait = WaitMode::Fixed).await;
    let admin = env.client().await;
    exec(&admin, "CREATE DATABASE before_name").await;
    {
        let c = connect(&dsn_for(&env, "postgres", "before_name")).await;
        exec(&c, "CREATE TABLE t (id int); INSERT INTO t VALUES (1)").await;
        tokio::task::block_in_place(|| wait_all_replayed(&env.cluster));
        wait_view_caught_up(&env.proxy).await;
        assert!(
            reaches(&c, env.cluster.port(1)).await,
            "the session's reads reach the caught-up replica"
        );
        assert_eq!(scalar(&c, "SELECT count(*) FROM t").await, "1");
    }
    assert!(!backends(&env, 0, "datname", "before_name").await.is_empty());
    exec(&admin, "ALTER DATABASE before_name RENAME TO after_name").await;
    let c = connect(&dsn_for(&env, "postgres", "after_name")).await;
    assert_eq!(scalar(&c, "SELECT count(*) FROM t").await, "1");
    drop(c);
    exec(&admin, "DROP DATABASE after_name").await;
    for i in 0..2 {
        assert!(backends(&env, i, "datname", "after_name").await.is_empty());
    }
}
