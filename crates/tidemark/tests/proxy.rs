//! The proxy core against a real primary + replica: protocol coverage, routing of writes
//! and transactions, prepared statements in transaction pooling, session state, errors.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tidemark::config::TxMode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A cluster of a primary and one replica behind tidemark with a pool of 4 connections per
/// node, and a client with a table `items (id int PRIMARY KEY, name text)`.
async fn with_items() -> (Env, tokio_postgres::Client) {
    let env = start(&[None], |c| c.pool.max_size = 4).await;
    let c = env.client().await;
    c.batch_execute("CREATE TABLE items (id int PRIMARY KEY, name text)")
        .await
        .unwrap();
    (env, c)
}

/// A read with no prior write goes to the replica; writes and transactions to the primary,
/// and an explicit transaction stays there across statements.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_read_goes_to_the_replica_and_a_writing_transaction_to_the_primary() {
    let env = start(&[None], |c| c.pool.max_size = 4).await;
    let c = env.client().await;

    let r = rows(&c.simple_query("SELECT pg_is_in_recovery()").await.unwrap());
    assert_eq!(
        r[0][0].as_deref(),
        Some("t"),
        "a plain read should run on the replica"
    );
    c.batch_execute("CREATE TABLE items (id int PRIMARY KEY, name text)")
        .await
        .unwrap();
    let r = rows(
        &c.simple_query("BEGIN; INSERT INTO items VALUES (1, 'a'); SELECT pg_is_in_recovery(), count(*) FROM items; COMMIT")
            .await
            .unwrap(),
    );
    assert_eq!(r[0], vec![Some("f".into()), Some("1".into())]);
    // An explicit transaction stays on the primary across statements.
    c.batch_execute("BEGIN").await.unwrap();
    c.execute("INSERT INTO items VALUES (2, 'b')", &[])
        .await
        .unwrap();
    let row = c
        .query_one("SELECT pg_is_in_recovery(), count(*) FROM items", &[])
        .await
        .unwrap();
    assert!(!row.get::<_, bool>(0));
    assert_eq!(row.get::<_, i64>(1), 2);
    c.batch_execute("COMMIT").await.unwrap();
}

/// Named prepared statements survive transaction pooling across server connections:
/// several clients, more statements than pool connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_prepared_statements_survive_transaction_pooling() {
    let (env, c) = with_items().await;
    // Other sessions do not depend on this one's writes unless told: pass the token.
    let token = rows(&c.simple_query("SHOW tidemark.commit_lsn").await.unwrap())[0][0]
        .clone()
        .unwrap();
    let mut handles = Vec::new();
    for k in 0..6 {
        let dsn = env.proxy_dsn();
        let token = token.clone();
        handles.push(tokio::spawn(async move {
            let c = connect(&dsn).await;
            c.batch_execute(&format!("SET tidemark.min_lsn = '{token}'"))
                .await
                .unwrap();
            let sel = c
                .prepare("SELECT name FROM items WHERE id = $1")
                .await
                .unwrap();
            let ins = c
                .prepare("INSERT INTO items VALUES ($1, $2)")
                .await
                .unwrap();
            for i in 0..50 {
                let id = 1000 + k * 100 + i;
                c.execute(&ins, &[&id, &format!("n{id}")]).await.unwrap();
                let r = c.query_one(&sel, &[&id]).await.unwrap();
                assert_eq!(r.get::<_, String>(0), format!("n{id}"));
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
}

/// Pipelined extended-protocol queries (tokio-postgres pipelines concurrent futures): every
/// insert of the pipeline is visible to the read after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_inserts_are_all_visible_to_the_next_read() {
    let (_env, c) = with_items().await;
    let ins = c
        .prepare("INSERT INTO items VALUES ($1, 'p')")
        .await
        .unwrap();
    let ids: Vec<i32> = (5000..5020).collect();
    let params: Vec<[&(dyn tokio_postgres::types::ToSql + Sync); 1]> = ids
        .iter()
        .map(|i| [i as &(dyn tokio_postgres::types::ToSql + Sync)])
        .collect();
    let futs: Vec<_> = params.iter().map(|p| c.execute(&ins, p)).collect();
    for f in futures_util::future::join_all(futs).await {
        assert_eq!(f.unwrap(), 1);
    }
    let n: i64 = c
        .query_one("SELECT count(*) FROM items WHERE name = 'p'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 20, "every pipelined insert is visible to the next read");
}

/// COPY FROM STDIN through tidemark, then a read of the copied rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_in_is_visible_to_the_next_read() {
    let (_env, c) = with_items().await;
    let sink = c
        .copy_in::<_, bytes::Bytes>("COPY items (id, name) FROM STDIN")
        .await
        .unwrap();
    let mut sink = Box::pin(sink);
    use futures_util::SinkExt;
    sink.send(bytes::Bytes::from_static(b"9001\tc1\n9002\tc2\n"))
        .await
        .unwrap();
    sink.as_mut().finish().await.unwrap();
    let n: i64 = c
        .query_one("SELECT count(*) FROM items WHERE id > 9000", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2);
}

/// Session SETs follow the client to whichever connection serves it and do not leak to
/// other clients. A SET that fails, or that runs in a transaction rolled back, is not
/// replayed; one in a committed transaction is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_sets_that_took_effect_follow_the_client_and_never_other_clients() {
    let env = start(&[None], |c| c.pool.max_size = 4).await;
    let c = env.client().await;
    c.batch_execute("SET application_name = 'tm-test'; SET statement_timeout = '12s'")
        .await
        .unwrap();
    for _ in 0..5 {
        let r = rows(&c.simple_query("SHOW statement_timeout").await.unwrap());
        assert_eq!(r[0][0].as_deref(), Some("12s"));
        let r = rows(
            &c.simple_query("SELECT current_setting('application_name')")
                .await
                .unwrap(),
        );
        assert_eq!(r[0][0].as_deref(), Some("tm-test"));
    }
    // ... and do not leak to other clients.
    let other = env.client().await;
    for _ in 0..5 {
        let r = rows(&other.simple_query("SHOW statement_timeout").await.unwrap());
        assert_eq!(r[0][0].as_deref(), Some("0"));
    }

    // A SET that fails, or that runs in a transaction rolled back, is not replayed; one in
    // a committed transaction is.
    assert!(c
        .batch_execute("SET statement_timeout = 'soon'")
        .await
        .is_err());
    c.batch_execute("BEGIN; SET work_mem = '7MB'; ROLLBACK")
        .await
        .unwrap();
    c.batch_execute("BEGIN; SET lock_timeout = '3s'; COMMIT")
        .await
        .unwrap();
    for _ in 0..5 {
        let r = rows(
            &c.simple_query("SELECT current_setting('statement_timeout'), current_setting('work_mem'), current_setting('lock_timeout')")
                .await
                .unwrap(),
        );
        assert_eq!(
            r[0],
            vec![Some("12s".into()), Some("4MB".into()), Some("3s".into())]
        );
    }
}

/// tidemark's own settings are answered by tidemark (an invalid value 22023, an unknown
/// name 42704); a SQL error keeps the session usable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tidemark_answers_its_own_settings_and_errors_leave_the_session_usable() {
    let env = start(&[None], |c| c.pool.max_size = 4).await;
    let c = env.client().await;
    let r = rows(&c.simple_query("SHOW tidemark.consistency").await.unwrap());
    assert_eq!(r[0][0].as_deref(), Some("session"));
    let e = c
        .simple_query("SET tidemark.consistency = 'sometimes'")
        .await
        .unwrap_err();
    assert_eq!(e.code().map(|c| c.code()), Some("22023"));
    let e = c.simple_query("SHOW tidemark.nope").await.unwrap_err();
    assert_eq!(e.code().map(|c| c.code()), Some("42704"));

    // A SQL error keeps the session usable.
    let e = c.simple_query("SELEC 1").await.unwrap_err();
    assert_eq!(e.code().map(|c| c.code()), Some("42601"));
    assert_eq!(
        rows(&c.simple_query("SELECT 1").await.unwrap())[0][0].as_deref(),
        Some("1")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_reported_not_dropped() {
    let env = start(&[None], |c| {
        c.pool.max_size = 1;
        c.pool.checkout_timeout = Duration::from_millis(300);
    })
    .await;
    // Pool exhaustion: one client holds the only primary connection in a transaction.
    let a = env.client().await;
    a.batch_execute("BEGIN; CREATE TABLE x (i int)")
        .await
        .unwrap();
    let b = env.client().await;
    let t = Instant::now();
    let e = b.batch_execute("CREATE TABLE y (i int)").await.unwrap_err();
    assert_eq!(e.code().map(|c| c.code()), Some("53300"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(3));
    a.batch_execute("COMMIT").await.unwrap();
    b.batch_execute("CREATE TABLE y (i int)").await.unwrap();

    // Cancel of a running statement reaches the right server connection.
    let token = a.cancel_token();
    let t = Instant::now();
    let sleeper = tokio::spawn(async move { a.batch_execute("SELECT pg_sleep(20)").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let e = sleeper.await.unwrap().unwrap_err();
    assert_eq!(e.code().map(|c| c.code()), Some("57014"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(5));

    // The server backend is terminated inside the client's transaction: as directly, the
    // client's session ends (FATAL 57P01, then the close); a new session works.
    let c = env.client().await;
    c.batch_execute("BEGIN").await.unwrap();
    let pid: i32 = c
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let admin = env.node(0).await;
    admin
        // The timeout makes the call wait until the backend is gone (PostgreSQL 14+).
        .execute("SELECT pg_terminate_backend($1, 10000)", &[&pid])
        .await
        .unwrap();
    let e = tokio::time::timeout(Duration::from_secs(5), c.query("SELECT 1", &[]))
        .await
        .expect("no hang after the server connection died")
        .unwrap_err();
    let code = e.code().map(|c| c.code().to_string());
    assert!(matches!(code.as_deref(), Some("57P01") | None), "got {e:?}");
    assert!(c.is_closed(), "the session ends with its server session");
    env.client().await.batch_execute("SELECT 1").await.unwrap();

    // Unknown user: refused exactly as a wrong password is (no user enumeration).
    let e = tokio_postgres::connect(
        &format!("{} password=guess", proxy_dsn_of(&env.proxy, "nobody")),
        tokio_postgres::NoTls,
    )
    .await
    .err()
    .expect("unknown user refused");
    assert_eq!(e.code().map(|c| c.code()), Some("28P01"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwords_and_bad_input() {
    let cluster = start_cluster(tidemark_cluster::ClusterConfig::with_replicas(1)).await;
    cluster
        .psql(0, "CREATE ROLE app LOGIN PASSWORD 'app-secret'; CREATE ROLE app5 LOGIN PASSWORD 'md5-secret'")
        .unwrap();
    let proxy = proxy_for(&cluster, |c| {
        use tidemark::config::{AuthMethod, UserConfig};
        c.users.push(UserConfig {
            name: "app".into(),
            password: Some("app-secret".into()),
            auth: AuthMethod::ScramSha256,
            server_password: None,
            consistency: None,
            transactions: None,
            password_file: None,
            password_env: None,
            server_password_file: None,
            server_password_env: None,
        });
        c.users.push(UserConfig {
            name: "app5".into(),
            password: Some("md5-secret".into()),
            auth: AuthMethod::Md5,
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
    let dsn = |u: &str, p: &str| format!("{} password={p}", proxy_dsn_of(&proxy, u));
    let ok = connect(&dsn("app", "app-secret")).await;
    ok.batch_execute("SELECT 1").await.unwrap();
    let ok5 = connect(&dsn("app5", "md5-secret")).await;
    ok5.batch_execute("SELECT 1").await.unwrap();
    for (u, p) in [("app", "wrong"), ("app5", "wrong")] {
        let e = tokio_postgres::connect(&dsn(u, p), tokio_postgres::NoTls)
            .await
            .err()
            .expect("wrong password refused");
        assert_eq!(e.code().map(|c| c.code()), Some("28P01"), "{u}: {e}");
    }

    // Malformed frames get 08P01 and end that client only; another keeps working.
    let bystander = connect(&dsn("app", "app-secret")).await;
    for garbage in [
        &b"Q\x00\x00\x00\x02"[..],           // length below 4
        &b"Q\x7f\xff\xff\xff"[..],           // huge length
        &b"?\x00\x00\x00\x04"[..],           // unknown message type
        &b"P\x00\x00\x00\x08s\x00q\x00"[..], // truncated Parse
    ] {
        let mut s = raw::Raw::connect(proxy.addr, "postgres").await;
        s.send(garbage).await;
        let (tag, body) = s
            .recv_within(Duration::from_secs(5))
            .await
            .unwrap_or_else(|| panic!("no answer to {garbage:?}"));
        assert_eq!(tag, b'E', "error response for {garbage:?}");
        assert_eq!(
            raw::sqlstate(&body),
            "08P01",
            "SQLSTATE 08P01 for {garbage:?}"
        );
        bystander.batch_execute("SELECT 1").await.unwrap();
    }
}

/// A statement classified as a read that writes after all gets 25006 on the replica; the
/// client never sees it: tidemark retries it on the primary before any byte went out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_refusal_on_replica_is_retried_on_primary() {
    let env = start(&[None], |c| {
        c.routing.read_only_functions = vec!["bump".into()];
    })
    .await;
    let c = env.client().await;
    c.batch_execute(
        "CREATE TABLE bumps (i int); CREATE FUNCTION bump() RETURNS int LANGUAGE sql AS 'INSERT INTO bumps VALUES (1) RETURNING 1'",
    )
    .await
    .unwrap();
    let lsn = env.cluster.current_lsn(0).unwrap();
    env.cluster
        .wait_replayed(1, &lsn, Duration::from_secs(10))
        .unwrap();
    // A fresh session has no writes of its own, so the "read" is sent to the replica.
    let fresh = env.client().await;
    for _ in 0..5 {
        let r = rows(&fresh.simple_query("SELECT bump()").await.unwrap());
        assert_eq!(r[0][0].as_deref(), Some("1"));
    }
    let n: i64 = env
        .node(0)
        .await
        .query_one("SELECT count(*) FROM bumps", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 5, "each call ran exactly once, on the primary");
}

/// Shutdown tells idle clients 57P01 instead of dropping them silently.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_tells_idle_clients() {
    let env = start(&[None], |_| {}).await;
    let (client, conn) = tokio_postgres::connect(&env.proxy_dsn(), tokio_postgres::NoTls)
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    client.batch_execute("SELECT 1").await.unwrap();
    let Env { proxy, cluster } = env;
    tokio::time::timeout(Duration::from_secs(10), proxy.shutdown())
        .await
        .expect("shutdown finishes");
    let r = tokio::time::timeout(Duration::from_secs(5), conn)
        .await
        .expect("connection ends")
        .unwrap();
    let e = r.expect_err("the connection reports an error");
    assert_eq!(e.code().map(|c| c.code()), Some("57P01"), "{e}");
    drop(cluster);
}

/// RELOAD re-reads the config file: a new pool size takes effect without dropping clients.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_applies_a_new_pool_size() {
    let cluster = start_cluster(tidemark_cluster::ClusterConfig::with_replicas(1)).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tidemark.toml");
    let write = |size: usize| {
        let text = format!(
            "listen = \"127.0.0.1:0\"\nadmin_users = [\"postgres\"]\n\
             [[nodes]]\nname = \"primary\"\nport = {}\n[[nodes]]\nname = \"replica_1\"\nport = {}\n\
             [[users]]\nname = \"postgres\"\nauth = \"trust\"\n[pool]\nmax_size = {size}\n",
            cluster.port(0),
            cluster.port(1)
        );
        std::fs::write(&path, text).unwrap();
    };
    write(3);
    tidemark::app::set_config_path(path.clone());
    let cfg = tidemark::config::Config::load(&path).unwrap();
    let proxy = tidemark::listener::Proxy::start(cfg).await.unwrap();
    assert!(proxy.wait_ready(Duration::from_secs(10)).await);
    let c = connect(&proxy_dsn_of(&proxy, "postgres")).await;
    c.batch_execute("CREATE TABLE r (i int)").await.unwrap();
    let admin_dsn = format!(
        "host=127.0.0.1 port={} user=postgres dbname=tidemark",
        proxy.addr.port()
    );
    let admin = connect(&admin_dsn).await;
    let pool_size = |msgs: Vec<tokio_postgres::SimpleQueryMessage>| -> Vec<String> {
        rows(&msgs)
            .into_iter()
            .filter(|r| r[2].as_deref() == Some("primary"))
            .map(|r| r[6].clone().unwrap_or_default())
            .collect()
    };
    let before = pool_size(admin.simple_query("SHOW POOLS").await.unwrap());
    assert_eq!(before, vec!["3".to_string()]);
    write(7);
    admin.simple_query("RELOAD").await.unwrap();
    let after = pool_size(admin.simple_query("SHOW POOLS").await.unwrap());
    assert_eq!(after, vec!["7".to_string()]);
    // The client connected before the reload keeps working.
    c.batch_execute("INSERT INTO r VALUES (1)").await.unwrap();
    // A broken config is refused with a clear error and changes nothing.
    std::fs::write(&path, "nodes = 3").unwrap();
    let e = admin.simple_query("RELOAD").await.unwrap_err();
    assert!(
        e.as_db_error()
            .is_some_and(|d| d.message().contains("config not reloaded")),
        "{e:?}"
    );
    let still = pool_size(admin.simple_query("SHOW POOLS").await.unwrap());
    assert_eq!(still, vec!["7".to_string()]);
    // A node whose address changed is applied: its pools are drained and the monitor polls
    // the new address (nothing listens there: it goes down); the primary's clients go on.
    // tests/reload_nodes.rs covers added, removed and moved nodes in full.
    let moved = format!(
        "listen = \"127.0.0.1:0\"\nadmin_users = [\"postgres\"]\n\
         [[nodes]]\nname = \"primary\"\nport = {}\n[[nodes]]\nname = \"replica_1\"\nport = {}\n\
         [[users]]\nname = \"postgres\"\nauth = \"trust\"\n",
        cluster.port(0),
        cluster.port(1) + 1
    );
    std::fs::write(&path, moved).unwrap();
    admin.simple_query("RELOAD").await.unwrap();
    c.batch_execute("INSERT INTO r VALUES (2)").await.unwrap();
}

/// PAUSE holds new transactions until RESUME; running ones finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_holds_new_transactions_until_resume() {
    let env = start(&[None], |_| {}).await;
    let admin = connect(&format!(
        "host=127.0.0.1 port={} user=postgres dbname=tidemark",
        env.proxy.addr.port()
    ))
    .await;
    let c = env.client().await;
    c.batch_execute("SELECT 1").await.unwrap();
    admin.simple_query("PAUSE").await.unwrap();
    // Timed from here: under load the spawned task may start late.
    let t = Instant::now();
    let q = tokio::spawn(async move {
        c.batch_execute("SELECT 1").await.unwrap();
        t.elapsed()
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!q.is_finished(), "a new statement ran while paused");
    admin.simple_query("RESUME").await.unwrap();
    let waited = tokio::time::timeout(Duration::from_secs(5), q)
        .await
        .expect("the held statement runs after RESUME")
        .unwrap();
    assert!(waited >= Duration::from_millis(500));
}

/// LISTEN pins the client to one primary connection; notifications reach it while idle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_pins_and_notifications_arrive() {
    let env = start(&[None], |_| {}).await;
    let (client, mut conn) = tokio_postgres::connect(&env.proxy_dsn(), tokio_postgres::NoTls)
        .await
        .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let m = std::future::poll_fn(|cx| conn.poll_message(cx)).await;
            match m {
                Some(Ok(tokio_postgres::AsyncMessage::Notification(n))) => {
                    let _ = tx.send(n.payload().to_string());
                }
                Some(Ok(_)) => {}
                _ => break,
            }
        }
    });
    client.batch_execute("LISTEN jobs").await.unwrap();
    // After LISTEN even plain reads stay on the pinned primary connection.
    let pid1: i32 = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let rec: bool = client
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .unwrap()
        .get(0);
    assert!(!rec, "a pinned session reads from its primary connection");
    let other = env.client().await;
    other.batch_execute("NOTIFY jobs, 'first'").await.unwrap();
    // The listener is idle: the notification must arrive without it sending anything.
    let got = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("notification delivered to an idle client")
        .unwrap();
    assert_eq!(got, "first");
    let pid2: i32 = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(pid1, pid2, "the pinned session keeps its server connection");
}

/// psql, a real client, through tidemark.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_works_through_tidemark() {
    let env = start(&[None], |_| {}).await;
    let out = std::process::Command::new(env.cluster.bindir().join("psql"))
        .args([
            "-XAtq",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            "127.0.0.1",
            "-p",
            &env.proxy.addr.port().to_string(),
            "-U",
            "postgres",
            "-d",
            "postgres",
        ])
        .args([
            "-c",
            "CREATE TABLE p (i int)",
            "-c",
            "INSERT INTO p SELECT generate_series(1, 3)",
            "-c",
            "SELECT sum(i), pg_is_in_recovery() FROM p",
            "-c",
            "\\copy p from stdin",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(b"10\n20\n\\.\n")?;
            child.wait_with_output()
        })
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.lines().next().is_some_and(|l| l.starts_with("6|")),
        "read-your-writes through psql: {text}"
    );
    let n: i64 = env
        .node(0)
        .await
        .query_one("SELECT count(*) FROM p", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 5);
}

/// `routing.balance`: by default a session keeps to one replica while it is eligible and
/// sessions are spread round robin; with `statement` one session's reads alternate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_keep_to_one_replica_per_session_unless_balance_is_statement() {
    let env = start(&[None, None], |_| {}).await;
    async fn ports(c: &tokio_postgres::Client) -> std::collections::BTreeSet<u16> {
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..10 {
            seen.insert(served_by(c).await.unwrap());
        }
        seen
    }
    let replicas: std::collections::BTreeSet<u16> =
        [env.cluster.port(1), env.cluster.port(2)].into();
    let mut all = std::collections::BTreeSet::new();
    for _ in 0..4 {
        let c = env.client().await;
        let seen = ports(&c).await;
        assert_eq!(seen.len(), 1, "one session's reads went to {seen:?}");
        all.extend(seen);
    }
    assert_eq!(all, replicas, "sessions were not spread over both replicas");

    let rr = proxy_rr(&env.cluster, |_| {}).await;
    let c = connect(&proxy_dsn_of(&rr, "postgres")).await;
    assert_eq!(
        ports(&c).await,
        replicas,
        "balance = statement alternates replicas"
    );
}

/// `set_config(name, value, false)` changes the server session, which tidemark cannot replay:
/// the client is pinned to its connection, so the setting never reaches other clients through
/// the pool, and the client itself keeps it. A transaction-local `set_config` does not pin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_set_config_pins_and_never_leaks_through_the_pool() {
    let env = start(&[None], |c| c.pool.max_size = 2).await;
    let probe =
        "/* tidemark: primary */ SELECT coalesce(current_setting('tidemark_test.x', true), '')";
    let value = |msgs: Vec<tokio_postgres::SimpleQueryMessage>| -> String {
        rows(&msgs)
            .first()
            .and_then(|r| r[0].clone())
            .unwrap_or_default()
    };
    // Transaction-local: no pin, nothing outlives the statement.
    let b = env.client().await;
    b.simple_query("SELECT set_config('tidemark_test.x', 'local', true)")
        .await
        .unwrap();
    assert_eq!(value(b.simple_query(probe).await.unwrap()), "");

    let a = env.client().await;
    a.simple_query("SELECT set_config('tidemark_test.x', 'leak', false)")
        .await
        .unwrap();
    // The client keeps its setting on later statements...
    for _ in 0..5 {
        assert_eq!(value(a.simple_query(probe).await.unwrap()), "leak");
    }
    // ...and no other client ever sees it (a pool of 2: without the pin the next client
    // would get the same server connection back).
    for _ in 0..10 {
        assert_eq!(value(b.simple_query(probe).await.unwrap()), "");
    }
    drop(a);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let c = env.client().await;
    for _ in 0..5 {
        assert_eq!(value(c.simple_query(probe).await.unwrap()), "");
    }
}

/// TLS from clients: with `[tls]` set, `sslmode=verify-full` against the certificate works and
/// sessions run as usual; plain clients still work in `allow` mode and are refused with 28000
/// in `require` mode; without `[tls]`, `sslmode=require` is told the proxy has no TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_from_clients() {
    let cluster = start_cluster(tidemark_cluster::ClusterConfig::with_replicas(1)).await;
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = tidemark::tls::self_signed(dir.path()).unwrap();
    let psql = cluster.bindir().join("psql");
    let run = |port: u16, ssl: &str, sql: &str| {
        let out = std::process::Command::new(&psql)
            .arg(format!(
                "host=localhost port={port} user=postgres dbname=postgres {ssl} connect_timeout=5"
            ))
            .args(["-X", "-At", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .env("PGSSLROOTCERT", &cert)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (cert2, key2) = (cert.clone(), key.clone());
    let allow = proxy_for(&cluster, move |c| {
        c.tls.cert_file = Some(cert2);
        c.tls.key_file = Some(key2);
    })
    .await;
    let port = allow.addr.port();
    let (ok, out, err) = tokio::task::block_in_place(|| {
        run(
            port,
            "sslmode=verify-full",
            "CREATE TABLE tl (i int); INSERT INTO tl VALUES (1), (2); SELECT count(*) FROM tl",
        )
    });
    assert!(ok, "psql over TLS failed: {err}");
    assert_eq!(out.lines().last(), Some("2"), "{out}");
    let (ok, out, err) =
        tokio::task::block_in_place(|| run(port, "sslmode=disable", "SELECT 40 + 2"));
    assert!(ok, "plain psql failed in allow mode: {err}");
    assert_eq!(out, "42");
    // Plain bytes sent right behind the SSLRequest, before the handshake, are refused
    // (they would otherwise be read as if they had come through TLS).
    let mut raw = tokio::net::TcpStream::connect(allow.addr).await.unwrap();
    let mut req = vec![0u8, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
    req.extend_from_slice(b"injected");
    raw.write_all(&req).await.unwrap();
    let mut first = [0u8; 1];
    raw.read_exact(&mut first).await.unwrap();
    assert_eq!(
        first[0], b'E',
        "expected an ErrorResponse, got {:?}",
        first[0] as char
    );

    let (c3, k3) = (cert.clone(), key.clone());
    let require = proxy_for(&cluster, move |c| {
        c.tls.cert_file = Some(c3);
        c.tls.key_file = Some(k3);
        c.tls.mode = tidemark::config::TlsMode::Require;
    })
    .await;
    let port = require.addr.port();
    let (ok, _, err) = tokio::task::block_in_place(|| run(port, "sslmode=disable", "SELECT 1"));
    assert!(!ok);
    assert!(err.contains("requires TLS"), "{err}");
    let (ok, out, err) =
        tokio::task::block_in_place(|| run(port, "sslmode=require", "SELECT 'over tls'"));
    assert!(ok, "{err}");
    assert_eq!(out, "over tls");

    let plain = proxy_for(&cluster, |_| {}).await;
    let port = plain.addr.port();
    let (ok, _, err) = tokio::task::block_in_place(|| run(port, "sslmode=require", "SELECT 1"));
    assert!(!ok);
    assert!(err.contains("does not support SSL"), "{err}");
}

/// Startup parameters are replayed as escape-string literals: a value ending in a backslash
/// reaches the server intact even on a connection another client left with
/// `standard_conforming_strings=off` (where a plain literal's backslash would escape its quote).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_values_survive_any_string_setting() {
    let env = start(&[], |c| c.pool.max_size = 1).await;
    let mut a: tokio_postgres::Config = env.proxy_dsn().parse().unwrap();
    a.options("-c standard_conforming_strings=off");
    let (a, conn) = a.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let r = rows(
        &a.simple_query("SHOW standard_conforming_strings")
            .await
            .unwrap(),
    );
    assert_eq!(r[0][0].as_deref(), Some("off"));
    let mut b: tokio_postgres::Config = env.proxy_dsn().parse().unwrap();
    b.application_name("it's\\");
    let (b, conn) = b.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    for _ in 0..3 {
        let r = rows(&b.simple_query("SHOW application_name").await.unwrap());
        assert_eq!(r[0][0].as_deref(), Some("it's\\"));
        let r = rows(
            &a.simple_query("SHOW standard_conforming_strings")
                .await
                .unwrap(),
        );
        assert_eq!(r[0][0].as_deref(), Some("off"));
    }
}

/// `DISCARD PLANS/SEQUENCES/TEMP` leave the client's SETs in place (only `DISCARD ALL` drops
/// them), on whichever server connection serves the client next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_discard_keeps_the_clients_settings() {
    let env = start(&[], |c| c.pool.max_size = 1).await;
    let a = env.client().await;
    a.batch_execute("SET work_mem = '7MB'").await.unwrap();
    for d in ["DISCARD PLANS", "DISCARD SEQUENCES", "DISCARD TEMP"] {
        a.batch_execute(d).await.unwrap();
        // Another client takes the only connection, so `a`'s settings must be replayed.
        let b = env.client().await;
        let r = rows(&b.simple_query("SHOW work_mem").await.unwrap());
        assert_eq!(r[0][0].as_deref(), Some("4MB"));
        drop(b);
        let r = rows(&a.simple_query("SHOW work_mem").await.unwrap());
        assert_eq!(r[0][0].as_deref(), Some("7MB"), "after {d}");
    }
    a.batch_execute("DISCARD ALL").await.unwrap();
    let r = rows(&a.simple_query("SHOW work_mem").await.unwrap());
    assert_eq!(r[0][0].as_deref(), Some("4MB"));
}

/// COPY FROM STDIN with the data sent right behind the COPY statement, in the same write,
/// without waiting for CopyInResponse (asyncpg's `copy_records_to_table` does this), then a
/// read pipelined behind the CopyDone: once as a simple query, once over the extended
/// protocol (Sync before the data, another after the CopyDone). The data may reach tidemark in
/// the same read as the statement; it must still go to the server (a fresh-clone CI run hung
/// here for 15 s). The answers must be PostgreSQL's own, message for message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_data_sent_with_the_copy_statement_is_not_left_behind() {
    use bytes::BytesMut;
    use postgres_protocol::message::frontend;
    async fn rounds(addr: std::net::SocketAddr, table: &str) -> Vec<String> {
        let mut r = raw::Raw::connect(addr, "postgres").await;
        r.query_ok(&format!(
            "CREATE TABLE {table} (id int PRIMARY KEY, name text)"
        ))
        .await;
        let mut seen = Vec::new();
        for extended in [false, true] {
            let mut b = BytesMut::new();
            let copy = format!("COPY {table} (id, name) FROM STDIN");
            if extended {
                raw::unnamed_statement(&copy, false, &mut b);
                frontend::sync(&mut b);
            } else {
                frontend::query(&copy, &mut b).unwrap();
            }
            let first = if extended { 200 } else { 100 };
            let data = format!("{first}\ta\n{}\tb\n", first + 1);
            frontend::CopyData::new(data.as_bytes())
                .unwrap()
                .write(&mut b);
            frontend::copy_done(&mut b);
            if extended {
                frontend::sync(&mut b);
            }
            frontend::query(&format!("SELECT count(*) FROM {table}"), &mut b).unwrap();
            r.send(&b).await;
            // The COPY's answer, then the count's.
            for _ in 0..2 {
                for (tag, body) in r.until_ready_ok().await {
                    let text = match tag {
                        b'C' | b'D' => String::from_utf8_lossy(&body).replace('\0', ""),
                        _ => String::new(),
                    };
                    seen.push(format!("{} {}", tag as char, text.trim()));
                }
            }
        }
        seen
    }
    let env = start(&[None], |c| c.pool.max_size = 4).await;
    let at = format!("{}:{}", env.cluster.host(), env.cluster.port(0));
    let direct = rounds(at.parse().unwrap(), "copied_direct").await;
    let proxied = rounds(env.proxy.addr, "copied_proxied").await;
    assert!(
        direct.iter().filter(|m| m.contains("COPY 2")).count() == 2,
        "{direct:?}"
    );
    assert_eq!(proxied, direct);
}

/// Answers relayed as bytes in runs (rows, RowDescription, CommandComplete, the extended
/// protocol's completions: `session::relay::plain_step`) are PostgreSQL's own, message for
/// message, directly and through tidemark (reads on the replica), and whatever the shortcut
/// does not take goes through the per-message relay: an error after rows, a notice, a
/// ParameterStatus change, an empty query, a suspended portal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_relayed_in_runs_are_the_servers_own() {
    use bytes::BytesMut;
    use postgres_protocol::message::frontend;
    async fn rounds(addr: std::net::SocketAddr) -> Vec<(u8, Vec<u8>)> {
        let mut r = raw::Raw::connect(addr, "postgres").await;
        let mut seen = Vec::new();
        for sql in [
            "SELECT g, repeat('x', g * 100) FROM generate_series(1, 200) g",
            "SELECT 1; SELECT 2 WHERE false;; SELECT 'a' AS b",
            "",
            "SELECT 10 / (3 - g) FROM generate_series(1, 5) g",
            "SELECT g FROM generate_series(1, 3) g; SELECT 1 / 0; SELECT 4",
            "DO $$BEGIN RAISE NOTICE 'between rows'; END$$",
            "SET application_name = 'runs'",
            "SELECT current_setting('application_name')",
        ] {
            seen.extend(r.query(sql).await);
        }
        // Extended: two statements described and executed, a suspended portal, an error
        // after rows, each unit ended by Sync.
        let mut b = BytesMut::new();
        raw::unnamed_statement("SELECT g FROM generate_series(1, 5) g", true, &mut b);
        raw::unnamed_statement("SELECT 'two'", false, &mut b);
        frontend::sync(&mut b);
        r.send(&b).await;
        seen.extend(r.until_ready().await);
        let mut b = BytesMut::new();
        raw::parse_bind("SELECT g FROM generate_series(1, 5) g", &mut b);
        frontend::describe(b'S', "", &mut b).unwrap();
        frontend::execute("", 2, &mut b).unwrap();
        frontend::execute("", 2, &mut b).unwrap();
        frontend::execute("", 0, &mut b).unwrap();
        frontend::sync(&mut b);
        r.send(&b).await;
        seen.extend(r.until_ready().await);
        let mut b = BytesMut::new();
        raw::unnamed_statement(
            "SELECT 10 / (3 - g) FROM generate_series(1, 5) g",
            true,
            &mut b,
        );
        raw::unnamed_statement("SELECT 'skipped'", true, &mut b);
        frontend::sync(&mut b);
        r.send(&b).await;
        seen.extend(r.until_ready().await);
        // The error's position in the server's source differs by nothing here, but its
        // routine and line are the server's: both answers come from the same version.
        seen
    }
    let env = start(&[None], |c| c.pool.max_size = 4).await;
    let at = format!("{}:{}", env.cluster.host(), env.cluster.port(0));
    let direct = rounds(at.parse().unwrap()).await;
    let before = relayed_runs();
    let proxied = rounds(env.proxy.addr).await;
    let after = relayed_runs();
    assert!(after > before, "no answer was relayed in runs");
    for (tag, what) in [
        (b'E', "the errors were answered"),
        (b'N', "the notice was answered"),
        (b's', "the portal was suspended"),
        (b'I', "the empty query was answered"),
    ] {
        assert!(direct.iter().any(|m| m.0 == tag), "{what}");
    }
    assert_eq!(tags(&proxied), tags(&direct));
    assert_eq!(proxied, direct);

    fn tags(m: &[(u8, Vec<u8>)]) -> String {
        m.iter().map(|m| m.0 as char).collect()
    }
}

/// A read whose rows were already relayed (as a run) when the replica reports a table it has
/// not replayed yet: the rows are taken back and the whole unit runs again on the primary, so
/// the client sees the primary's answer once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_relayed_in_a_run_are_taken_back_when_the_read_moves_to_the_primary() {
    let env = start(&[Some(Duration::from_secs(30))], |c| c.pool.max_size = 4).await;
    let primary = env.node(0).await;
    primary
        .batch_execute(
            "CREATE TABLE made_on_primary (id int); INSERT INTO made_on_primary VALUES (7)",
        )
        .await
        .unwrap();
    let mut r = raw::Raw::connect(env.proxy.addr, "postgres").await;
    let sql = "SELECT g FROM generate_series(1, 3) g; SELECT id, pg_is_in_recovery() FROM made_on_primary";
    let before = relayed_runs();
    let msgs = r.query_ok(sql).await;
    let after = relayed_runs();
    assert!(after > before, "no answer was relayed in runs");
    assert_eq!(
        raw::data_rows(&msgs),
        vec![
            vec![Some("1".to_string())],
            vec![Some("2".to_string())],
            vec![Some("3".to_string())],
            vec![Some("7".to_string()), Some("f".to_string())],
        ],
        "{msgs:?}"
    );
    let mut d = raw::Raw::connect(
        format!("{}:{}", env.cluster.host(), env.cluster.port(0))
            .parse()
            .unwrap(),
        "postgres",
    )
    .await;
    assert_eq!(d.query_ok(sql).await, msgs);
}

/// Units run by the short path for autocommit reads (`session::fast`) so far, process-wide.
fn fast_reads() -> u64 {
    tidemark::session::FAST_READS.load(std::sync::atomic::Ordering::Relaxed)
}

/// An autocommit read takes the short path (`session::fast`) whether it comes as a simple
/// query, an unnamed extended statement or a named prepared one, and answers as the general
/// path does: on the replica once it has what the session wrote, the session's own writes
/// read back at once, an error answered with its SQLSTATE and the session usable after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn autocommit_reads_take_the_short_path_and_read_what_the_session_wrote() {
    use tokio_postgres::types::Type;
    let (env, c) = with_items().await;
    c.batch_execute("INSERT INTO items VALUES (1, 'a')")
        .await
        .unwrap();
    wait_all_replayed(&env.cluster);
    wait_view_caught_up(&env.proxy).await;
    let before = fast_reads();
    let simple = rows(
        &c.simple_query("SELECT name, pg_is_in_recovery() FROM items WHERE id = 1")
            .await
            .unwrap(),
    );
    assert_eq!(simple, vec![vec![Some("a".into()), Some("t".into())]]);
    let read = "SELECT name, pg_is_in_recovery() FROM items WHERE id = $1";
    let unnamed = c.query_typed(read, &[(&1i32, Type::INT4)]).await.unwrap();
    assert_eq!(unnamed[0].get::<_, &str>(0), "a");
    assert!(unnamed[0].get::<_, bool>(1), "on the replica");
    let st = c.prepare(read).await.unwrap();
    let prepared = c.query_one(&st, &[&1i32]).await.unwrap();
    assert_eq!(prepared.get::<_, &str>(0), "a");
    assert!(prepared.get::<_, bool>(1), "on the replica");
    // (Other tests of this binary run beside this one: the count only grows.)
    assert!(
        fast_reads() >= before + 3,
        "the three reads took the short path"
    );
    // Each write is read back by the next read, whichever path and node serve it.
    for i in 0..30 {
        let name = format!("v{i}");
        c.execute("UPDATE items SET name = $1 WHERE id = 1", &[&name])
            .await
            .unwrap();
        let r = c.query_one(&st, &[&1i32]).await.unwrap();
        assert_eq!(
            r.get::<_, &str>(0),
            name,
            "read {i} sees the write before it"
        );
        let r = rows(
            &c.simple_query("SELECT name FROM items WHERE id = 1")
                .await
                .unwrap(),
        );
        assert_eq!(r[0][0].as_deref(), Some(name.as_str()));
    }
    // An error on the short path: the server's SQLSTATE, and the session goes on.
    let e = c
        .simple_query("SELECT name FROM no_such_table")
        .await
        .unwrap_err();
    assert_eq!(
        e.as_db_error().map(|d| d.code().code()),
        Some("42P01"),
        "{e:?}"
    );
    let e = c.query_one(&st, &[&1i32]).await.map(|_| ()).and(
        c.query_typed("SELECT 1 / $1", &[(&0i32, Type::INT4)])
            .await
            .map(|_| ()),
    );
    let e = e.unwrap_err();
    assert_eq!(
        e.as_db_error().map(|d| d.code().code()),
        Some("22012"),
        "{e:?}"
    );
    let r = c.query_one(&st, &[&1i32]).await.unwrap();
    assert_eq!(r.get::<_, &str>(0), "v29");
}

/// Runs of answers relayed as bytes so far (`session::relay::plain_step`), process-wide.
fn relayed_runs() -> u64 {
    tidemark::session::RELAYED_RUNS.load(std::sync::atomic::Ordering::Relaxed)
}

/// Drivers that do not prepare send the same few unnamed statements again and again: each is
/// judged once (the classifier is not asked again), and a different text, or the same text
/// with other parameter types or after a SET, is judged on its own: a write among reads still
/// goes to the primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_unnamed_statement_is_judged_once_and_a_new_one_anew() {
    use tokio_postgres::types::Type;
    let (env, c) = with_items().await;
    c.batch_execute("INSERT INTO items VALUES (1, 'a')")
        .await
        .unwrap();
    wait_all_replayed(&env.cluster);
    let read = "SELECT name, pg_is_in_recovery() FROM items WHERE id = $1";
    let asked = |env: &Env| {
        let (h, m) = env.proxy.app.classifier.cache_stats();
        h + m
    };
    c.query_typed(read, &[(&1i32, Type::INT4)]).await.unwrap();
    let before = asked(&env);
    for _ in 0..10 {
        let r = c.query_typed(read, &[(&1i32, Type::INT4)]).await.unwrap();
        assert_eq!(r[0].get::<_, &str>(0), "a");
    }
    assert_eq!(
        asked(&env),
        before,
        "the same unnamed text is not classified again"
    );
    // Another text in between (a write): judged anew, on the primary. The read after it is
    // the one remembered from before, and reads the write.
    let w = "UPDATE items SET name = $2 WHERE id = $1 RETURNING pg_is_in_recovery()";
    for (i, name) in ["b", "c", "d"].into_iter().enumerate() {
        let r = c
            .query_typed(w, &[(&1i32, Type::INT4), (&name, Type::TEXT)])
            .await
            .unwrap();
        assert!(!r[0].get::<_, bool>(0), "the write ran on the primary");
        let r = c.query_typed(read, &[(&1i32, Type::INT4)]).await.unwrap();
        assert_eq!(
            r[0].get::<_, &str>(0),
            name,
            "the session reads its own write"
        );
        if i == 0 {
            assert_eq!(asked(&env), before + 1, "only the new text was classified");
        }
    }
    assert_eq!(
        asked(&env),
        before + 1,
        "a write and a read taking turns: judged once each"
    );
    // The same text with other parameter types is judged anew.
    c.query_typed(read, &[(&1i64, Type::INT8)]).await.unwrap();
    assert_eq!(asked(&env), before + 2);
    // A few texts are remembered, not every one: with five taking turns, each is judged again.
    let texts: Vec<String> = (0..5)
        .map(|i| format!("SELECT {i} AS n, name FROM items WHERE id = $1"))
        .collect();
    for t in &texts {
        c.query_typed(t.as_str(), &[(&1i32, Type::INT4)])
            .await
            .unwrap();
    }
    let cycled = asked(&env);
    for t in &texts {
        c.query_typed(t.as_str(), &[(&1i32, Type::INT4)])
            .await
            .unwrap();
    }
    assert_eq!(
        asked(&env),
        cycled + 5,
        "at most four unnamed statements are remembered"
    );
    // After a SET (the session state changed), too: the same text, remembered just before,
    // is judged again.
    c.query_typed(read, &[(&1i64, Type::INT8)]).await.unwrap();
    let remembered = asked(&env);
    c.query_typed(read, &[(&1i64, Type::INT8)]).await.unwrap();
    assert_eq!(asked(&env), remembered, "remembered before the SET");
    c.batch_execute("SET application_name = 'x'").await.unwrap();
    let after_set = asked(&env);
    c.query_typed(read, &[(&1i64, Type::INT8)]).await.unwrap();
    assert_eq!(asked(&env), after_set + 1);
}

/// The commit-position read behind each write runs as tidemark's own prepared statement
/// (`tm_capture`, parsed once per server connection). A client that deallocates it leaves
/// its next write acknowledged and readable as always (the position is read the other way),
/// and the statement is parsed again after that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_commit_position_read_is_prepared_once_and_survives_a_deallocate() {
    // One server connection per node: every unit of the client runs on the same ones.
    let env = start(&[None], |c| c.pool.max_size = 1).await;
    let c = env.client().await;
    c.batch_execute("CREATE TABLE items (id int PRIMARY KEY, name text)")
        .await
        .unwrap();
    let on_primary = "BEGIN; SELECT pg_is_in_recovery(), count(*) FROM pg_prepared_statements \
                      WHERE name = 'tm_capture'; COMMIT";
    let prepared_there = |r: Vec<Vec<Option<String>>>| {
        assert_eq!(r[0][0].as_deref(), Some("f"), "asked on the primary");
        r[0][1].clone()
    };
    for (i, name) in [(1, "a"), (2, "b"), (3, "c")] {
        c.batch_execute(&format!("INSERT INTO items VALUES ({i}, '{name}')"))
            .await
            .unwrap();
        let seen = rows(
            &c.simple_query(&format!("SELECT name FROM items WHERE id = {i}"))
                .await
                .unwrap(),
        );
        assert_eq!(seen[0][0].as_deref(), Some(name), "write {i} read back");
        let r = rows(&c.simple_query(on_primary).await.unwrap());
        match i {
            // Prepared by the first write; then dropped by the client.
            1 => {
                assert_eq!(prepared_there(r).as_deref(), Some("1"));
                c.batch_execute("BEGIN; DEALLOCATE tm_capture; COMMIT")
                    .await
                    .unwrap();
            }
            // Write 2 found it gone (its position was read the other way): not there yet.
            2 => assert_eq!(prepared_there(r).as_deref(), Some("0")),
            // Write 3 parsed it again.
            _ => assert_eq!(prepared_there(r).as_deref(), Some("1")),
        }
    }
}

/// Creates `table (id int PRIMARY KEY, a text, b int)` with the row (1, 'x', 7) on the
/// primary, waits until the replicas and tidemark's view have it; the primary's connection.
async fn three_columns(env: &Env, table: &str) -> tokio_postgres::Client {
    let admin = env.node(0).await;
    exec(
        &admin,
        &format!(
            "CREATE TABLE {table} (id int PRIMARY KEY, a text, b int); \
             INSERT INTO {table} VALUES (1, 'x', 7)"
        ),
    )
    .await;
    tokio::task::block_in_place(|| wait_all_replayed(&env.cluster));
    wait_view_caught_up(&env.proxy).await;
    admin
}

/// A table's columns change while clients hold prepared statements on it (a migration under
/// traffic). Directly, a statement prepared before the change fails with 0A000 "cached plan
/// must not change result type" and one prepared after it works. Server copies of statements
/// are shared between clients, so the copy a connection holds can predate the change while
/// the client's prepare does not: the first such prepare may get the 0A000 (a known
/// difference, docs/compatibility.md), but preparing again must work, and so must every
/// prepare after that, on the same server connection. The statement prepared before the
/// change keeps failing as it does directly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_column_change_preparing_again_gets_a_fresh_statement() {
    // One server connection per node: every client's statement runs on the same copy.
    let env = start(&[None], |c| c.pool.max_size = 1).await;
    let admin = three_columns(&env, "shape2").await;
    let sql = "SELECT * FROM shape2 WHERE id = $1";
    let before = env.client().await;
    let old = before.prepare(sql).await.unwrap();
    assert_eq!(before.query_one(&old, &[&1i32]).await.unwrap().len(), 3);
    exec(&admin, "ALTER TABLE shape2 DROP COLUMN a").await;
    tokio::task::block_in_place(|| wait_all_replayed(&env.cluster));

    let after = env.client().await;
    let mut refused = 0;
    let fresh = loop {
        match after.prepare(sql).await {
            Ok(st) => break st,
            Err(e) => {
                assert_eq!(e.code().map(|c| c.code()), Some("0A000"), "{e}");
                refused += 1;
                assert!(refused < 3, "preparing again got 0A000 {refused} times");
            }
        }
    };
    println!("prepare after the change refused {refused} time(s)");
    let r = after.query_one(&fresh, &[&1i32]).await.unwrap();
    assert_eq!((r.len(), r.get::<_, i32>(1)), (2, 7));
    // A later client prepares it at once.
    let later = env.client().await;
    let st = later.prepare(sql).await.unwrap();
    assert_eq!(later.query_one(&st, &[&1i32]).await.unwrap().len(), 2);
    // The statement prepared before the change fails as it does directly.
    let e = before.query(&old, &[&1i32]).await.unwrap_err();
    assert_eq!(e.code().map(|c| c.code()), Some("0A000"), "{e}");
}

/// A statement prepared before a table's columns change: directly, its next execution fails
/// with 0A000 "cached plan must not change result type" (PostgreSQL never returns rows in a
/// shape other than the one the statement was described with). Through tidemark the
/// statement may next run on a server connection that has not prepared it yet, where
/// tidemark prepares it anew, after the change: that must fail the same way, not return rows
/// of the new shape to a client decoding the old one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_prepared_before_a_column_change_fails_as_directly() {
    let env = start(&[None], |_| {}).await;
    let admin = three_columns(&env, "shape").await;
    let sql = "SELECT * FROM shape WHERE id = $1";
    // Directly on the primary: prepared, columns changed, executed.
    let direct = env.node(0).await;
    let d = direct.prepare(sql).await.unwrap();
    // Through tidemark: prepared and run (a read: on the replica).
    let c = env.client().await;
    let st = c.prepare(sql).await.unwrap();
    let r = c.query_one(&st, &[&1i32]).await.unwrap();
    assert_eq!(r.get::<_, i32>(2), 7);
    exec(&admin, "ALTER TABLE shape DROP COLUMN a").await;
    tokio::task::block_in_place(|| wait_all_replayed(&env.cluster));
    let e = direct.query(&d, &[&1i32]).await.unwrap_err();
    assert_eq!(e.code().map(|c| c.code()), Some("0A000"), "directly: {e}");
    // Now run where the statement was never prepared: on the primary.
    exec(&c, "SET tidemark.consistency = 'strong'").await;
    match c.query(&st, &[&1i32]).await {
        Err(e) => assert_eq!(e.code().map(|c| c.code()), Some("0A000"), "{e}"),
        Ok(rows) => panic!(
            "rows of the new shape returned to a statement described with the old one: {} columns, statement has {}",
            rows.first().map_or(0, |r| r.len()),
            st.columns().len()
        ),
    }
    // Prepared again (as a driver does after this error), it runs with the new shape.
    let st = c.prepare(sql).await.unwrap();
    let r = c.query_one(&st, &[&1i32]).await.unwrap();
    assert_eq!(r.len(), 2);
    assert_eq!(r.get::<_, i32>(1), 7);
}

/// A prepared statement run inside a transaction block, as JDBC with autocommit off runs
/// every statement: BEGIN, the statement, `SELECT 1`, ROLLBACK. The SQLSTATEs (or what ran).
async fn run_in_a_block(c: &tokio_postgres::Client, st: &tokio_postgres::Statement) -> Vec<String> {
    let code = |e: tokio_postgres::Error| {
        e.code().map_or_else(
            || format!("not a server error: {e}"),
            |c| c.code().to_string(),
        )
    };
    exec(c, "BEGIN").await;
    let mut seen = vec![match c.query(st, &[&1i32]).await {
        Ok(rows) => format!("rows of {} columns", rows.first().map_or(0, |r| r.len())),
        Err(e) => code(e),
    }];
    seen.push(match c.simple_query("SELECT 1").await {
        Ok(_) => "SELECT 1 ran".into(),
        Err(e) => code(e),
    });
    exec(c, "ROLLBACK").await;
    seen
}

/// `a_statement_prepared_before_a_column_change_fails_as_directly` inside a transaction block:
/// the 0A000 fails the block, and the next statement gets 25P02 until ROLLBACK, as directly.
/// And a statement whose table was dropped fails there with the server's own error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_prepared_before_a_column_change_fails_as_directly_in_a_transaction() {
    let env = start(&[None], |_| {}).await;
    let admin = three_columns(&env, "shape4").await;
    exec(&admin, "CREATE TABLE gone4 (id int)").await;
    tokio::task::block_in_place(|| wait_all_replayed(&env.cluster));
    let sql = "SELECT * FROM shape4 WHERE id = $1";
    let gone_sql = "SELECT id FROM gone4 WHERE id = $1";
    let direct = env.node(0).await;
    let d = direct.prepare(sql).await.unwrap();
    let d_gone = direct.prepare(gone_sql).await.unwrap();
    // Through tidemark: prepared and run (reads: on the replica).
    let c = env.client().await;
    let st = c.prepare(sql).await.unwrap();
    assert_eq!(c.query_one(&st, &[&1i32]).await.unwrap().len(), 3);
    let st_gone = c.prepare(gone_sql).await.unwrap();
    assert!(c.query(&st_gone, &[&1i32]).await.unwrap().is_empty());
    exec(&admin, "ALTER TABLE shape4 DROP COLUMN a; DROP TABLE gone4").await;
    tokio::task::block_in_place(|| wait_all_replayed(&env.cluster));
    let direct_seen = run_in_a_block(&direct, &d).await;
    assert_eq!(direct_seen, ["0A000", "25P02"], "directly");
    let direct_gone = run_in_a_block(&direct, &d_gone).await;
    assert_eq!(direct_gone, ["42P01", "25P02"], "directly");
    // Now in blocks on the primary, where the statements were never prepared.
    exec(&c, "SET tidemark.consistency = 'strong'").await;
    assert_eq!(run_in_a_block(&c, &st).await, direct_seen);
    assert_eq!(run_in_a_block(&c, &st_gone).await, direct_gone);
    // The session goes on: prepared again, the statement runs with the new shape, in a block
    // too.
    let st = c.prepare(sql).await.unwrap();
    exec(&c, "BEGIN").await;
    let r = c.query_one(&st, &[&1i32]).await.unwrap();
    exec(&c, "COMMIT").await;
    assert_eq!(r.len(), 2);
    assert_eq!(r.get::<_, i32>(1), 7);
}

/// The same as `a_statement_prepared_before_a_column_change_fails_as_directly`, in the
/// messages libpq sends for `PQprepare` and `PQexecPrepared`: the statement is never
/// described as a statement, only the portal bound to it is, at each execution.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_only_its_portals_were_described_for_fails_as_directly_after_a_column_change() {
    use common::raw::{bind, data_rows, sqlstate, Raw};
    use postgres_protocol::message::frontend;
    let env = start(&[None], |_| {}).await;
    let admin = three_columns(&env, "shape3").await;
    let mut raw = Raw::connect(env.proxy.addr, "postgres").await;
    let exec_prepared = |buf: &mut bytes::BytesMut| {
        bind("s1", buf);
        frontend::describe(b'P', "", buf).expect("describe");
        frontend::execute("", 0, buf).expect("execute");
        frontend::sync(buf);
    };
    let mut b = bytes::BytesMut::new();
    frontend::parse(
        "s1",
        "SELECT * FROM shape3 WHERE id = 1",
        std::iter::empty(),
        &mut b,
    )
    .expect("parse");
    frontend::sync(&mut b);
    raw.send(&b).await;
    raw.until_ready_ok().await;
    let mut b = bytes::BytesMut::new();
    exec_prepared(&mut b);
    raw.send(&b).await;
    let rows = data_rows(&raw.until_ready_ok().await);
    assert_eq!(rows[0].len(), 3);
    exec(&admin, "ALTER TABLE shape3 DROP COLUMN a").await;
    tokio::task::block_in_place(|| wait_all_replayed(&env.cluster));
    // Run where the statement has no copy yet: the primary.
    raw.query_ok("SET tidemark.consistency = 'strong'").await;
    let mut b = bytes::BytesMut::new();
    exec_prepared(&mut b);
    raw.send(&b).await;
    let msgs = raw.until_ready().await;
    let error = msgs.iter().find(|m| m.0 == b'E');
    assert_eq!(
        error.map(|(_, body)| sqlstate(body)).as_deref(),
        Some("0A000"),
        "rows instead of PostgreSQL's 0A000: {:?}",
        data_rows(&msgs)
    );
    assert!(data_rows(&msgs).is_empty());
}

fn begins_carried() -> u64 {
    tidemark::session::BEGINS_CARRIED.load(std::sync::atomic::Ordering::Relaxed)
}

/// What a client sees of a simple query, to compare two servers: rows, command tags, errors
/// and notices (SQLSTATE, message, position) and ReadyForQuery's transaction status.
fn seen(msgs: &[raw::Msg]) -> Vec<String> {
    msgs.iter()
        .filter_map(|(tag, body)| match tag {
            b'D' | b'C' | b'Z' => Some(format!(
                "{} {:?}",
                *tag as char,
                String::from_utf8_lossy(body)
            )),
            b'E' | b'N' => Some(format!(
                "{} {} {} at {}",
                *tag as char,
                raw::sqlstate(body),
                raw::field(body, b'M'),
                raw::field(body, b'P')
            )),
            _ => None,
        })
        .collect()
}

/// A deferred BEGIN travels in front of its transaction's first statement (one query text,
/// one round trip less), and the client cannot tell: run against the primary directly and
/// through tidemark (`read_only`, the default, and `optimistic`), the same script gives the
/// same rows, tags, SQLSTATEs, error positions and transaction statuses. It covers a first
/// statement that fails to parse (the BEGIN in front of it then never ran: the client is in
/// a failed transaction all the same), fails when it runs, cannot run in a transaction, or
/// reads after a multibyte character; a rolled-back first statement leaves nothing; a BEGIN
/// with a trailing comment, an isolation level, and `START TRANSACTION`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deferred_begin_travels_with_the_first_statement_and_the_client_cannot_tell() {
    let script: &[&str] = &[
        "BEGIN",
        "INSERT INTO {t} VALUES (1)",
        "SELECT count(*) FROM {t}",
        "ROLLBACK",
        "SELECT count(*) FROM {t}",
        "BEGIN",
        "SELEC 1",
        "SELECT 1",
        "COMMIT",
        // PostgreSQL 16's syntax: tidemark's parser (17) reads one statement, a PostgreSQL 15
        // server refuses the whole text before its BEGIN runs. (On a server of 16 or later
        // this step runs, alike on both sides.)
        "BEGIN",
        "SELECT '1' IS JSON",
        "SELECT 1",
        "COMMIT",
        "SELECT 1",
        "BEGIN",
        "SELECT 'é', x FROM nosuch_{t}",
        "ROLLBACK",
        "BEGIN",
        "SELECT 1/0",
        "SELECT 1",
        "ROLLBACK",
        "BEGIN ISOLATION LEVEL REPEATABLE READ",
        "SHOW transaction_isolation",
        "COMMIT",
        "BEGIN",
        "COMMIT",
        "BEGIN",
        "VACUUM {t}",
        "ROLLBACK",
        "BEGIN -- a comment that must not swallow the statement",
        "INSERT INTO {t} VALUES (3)",
        "ROLLBACK",
        "START TRANSACTION READ WRITE",
        "INSERT INTO {t} VALUES (2)",
        "UPDATE {t} SET id = id WHERE id = 2",
        "COMMIT",
        "BEGIN",
        "SELECT 1; SELECT 2",
        "COMMIT",
        "SELECT id FROM {t} ORDER BY id",
    ];
    for mode in [TxMode::ReadOnly, TxMode::Optimistic] {
        let env = start(&[None], |c| c.routing.transactions = mode).await;
        let primary = std::net::SocketAddr::from(([127, 0, 0, 1], env.cluster.port(0)));
        let setup = env.client().await;
        // Same-length names: error positions count the table's name.
        setup
            .batch_execute("CREATE TABLE dbx_d (id int); CREATE TABLE dbx_p (id int)")
            .await
            .unwrap();
        wait_all_replayed(&env.cluster);
        let mut direct = raw::Raw::connect(primary, "postgres").await;
        let mut proxied = raw::Raw::connect(env.proxy.addr, "postgres").await;
        let before = begins_carried();
        for step in script {
            let d = seen(&direct.query(&step.replace("{t}", "dbx_d")).await);
            let p = seen(&proxied.query(&step.replace("{t}", "dbx_p")).await);
            let d: Vec<String> = d.iter().map(|s| s.replace("dbx_d", "dbx_p")).collect();
            assert_eq!(p, d, "{mode:?}: `{step}` through tidemark, then directly");
        }
        // Under `read_only`, every transaction above whose BEGIN was deferred and whose first
        // statement is one simple statement: its BEGIN travelled with it (7: not the
        // unparsable one, `START TRANSACTION READ WRITE`, sent at once, or the two-statement
        // text). Under `optimistic`, at least those that start with a write (a read starts
        // on the replica when it has caught up). Other tests of this binary run beside this
        // one: the count only grows.
        let least = if mode == TxMode::ReadOnly { 7 } else { 2 };
        assert!(
            begins_carried() >= before + least,
            "{mode:?}: BEGINs carried: {}",
            begins_carried() - before
        );
    }
}
