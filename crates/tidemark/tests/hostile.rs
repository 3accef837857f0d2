//! Hostile input before and around login (issue 16): oversized claims are refused at once
//! without reserving memory, silent sockets are closed by one login deadline and never slow
//! a real client, the number of connections logging in is capped, an unknown user cannot be
//! told from a wrong password, and per-client caps answer with 54000.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// This process's resident memory (the proxy runs in the test's process), in KiB.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Reads until the peer closes; true if it closed within `d`.
async fn closed_within(s: &mut TcpStream, d: Duration) -> bool {
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + d;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

fn startup(user: &str) -> Vec<u8> {
    let mut b = bytes::BytesMut::new();
    postgres_protocol::message::frontend::startup_message(
        [("user", user), ("database", "postgres")],
        &mut b,
    )
    .unwrap();
    b.to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_claims_before_login_are_refused_at_once() {
    let env = start(&[], |c| {
        c.users[0].auth = tidemark::config::AuthMethod::ScramSha256;
        c.users[0].password = Some("pw".into());
    })
    .await;
    let before = rss_kib();
    let mut socks = Vec::new();
    // 20 startup packets claiming 200 MiB.
    for _ in 0..20 {
        let mut s = TcpStream::connect(env.proxy.addr).await.unwrap();
        s.write_all(&(200u32 << 20).to_be_bytes()).await.unwrap();
        s.write_all(&[0, 3, 0, 0]).await.unwrap();
        socks.push(s);
    }
    // 20 logins whose SASL message claims 200 MiB.
    for _ in 0..20 {
        let mut s = TcpStream::connect(env.proxy.addr).await.unwrap();
        s.write_all(&startup("postgres")).await.unwrap();
        let mut tag = [0u8; 1];
        s.read_exact(&mut tag).await.unwrap();
        assert_eq!(tag[0], b'R', "a SCRAM challenge");
        let mut msg = vec![b'p'];
        msg.extend_from_slice(&(200u32 << 20).to_be_bytes());
        msg.extend_from_slice(b"SCRAM-SHA-256\0");
        s.write_all(&msg).await.unwrap();
        socks.push(s);
    }
    let t = Instant::now();
    for s in &mut socks {
        assert!(
            closed_within(s, Duration::from_secs(1)).await,
            "an oversized claim was not closed within a second"
        );
    }
    assert!(t.elapsed() < Duration::from_secs(2));
    let grew = rss_kib().saturating_sub(before);
    println!("RSS grew by {grew} KiB for 40 oversized claims");
    assert!(grew < 8 * 1024, "RSS grew by {grew} KiB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_sockets_are_closed_by_the_login_deadline_and_never_slow_a_client() {
    let env = start(&[], |c| {
        c.limits.login_timeout = Duration::from_secs(2);
    })
    .await;
    // 1,000 sockets here and 1,000 in the proxy (same process): raise the open-file limit.
    tidemark::signals::raise_open_file_limit();
    let mut silent = Vec::new();
    for i in 0..1000 {
        let mut s = TcpStream::connect(env.proxy.addr).await.unwrap();
        if i % 2 == 0 {
            // Half send a byte now and then, which a per-read timeout would not catch.
            s.write_all(&[0]).await.unwrap();
        }
        silent.push(s);
    }
    // A real client is not slowed by them.
    let t = Instant::now();
    let c = env.client().await;
    for _ in 0..20 {
        c.simple_query("SELECT 1").await.unwrap();
    }
    let took = t.elapsed();
    println!("login + 20 statements beside 1000 silent sockets: {took:?}");
    assert!(took < Duration::from_secs(1), "{took:?}");
    // Trickle one more byte into the half that started, well before the deadline.
    tokio::time::sleep(Duration::from_millis(800)).await;
    for s in silent.iter_mut().step_by(2) {
        let _ = s.write_all(&[0]).await;
    }
    let t = Instant::now();
    for s in &mut silent {
        assert!(
            closed_within(s, Duration::from_secs(3)).await,
            "a silent socket outlived the login deadline"
        );
    }
    println!("all 1000 closed {:?} after the last trickle", t.elapsed());
    assert_eq!(
        env.proxy
            .app
            .pending_logins
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_logging_in_are_capped() {
    let env = start(&[], |c| {
        c.limits.max_pending_logins = 10;
        c.limits.login_timeout = Duration::from_secs(2);
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..10 {
        held.push(TcpStream::connect(env.proxy.addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut over = TcpStream::connect(env.proxy.addr).await.unwrap();
    assert!(
        closed_within(&mut over, Duration::from_millis(500)).await,
        "the 11th connection logging in is closed at once"
    );
    drop(held);
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Slots come back: a real client logs in.
    env.client().await.simple_query("SELECT 1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_user_is_refused_exactly_like_a_wrong_password() {
    let env = start(&[], |c| {
        c.users[0].auth = tidemark::config::AuthMethod::ScramSha256;
        c.users[0].password = Some("right".into());
    })
    .await;
    let dsn = |user: &str, pw: &str| {
        format!(
            "host={} port={} user={user} password={pw} dbname=postgres",
            env.proxy.addr.ip(),
            env.proxy.addr.port()
        )
    };
    let err = |r: Result<_, tokio_postgres::Error>| match r {
        Ok(_) => panic!("login accepted"),
        Err(e) => {
            let db = e.as_db_error().expect("a server error").clone();
            (
                db.severity().to_string(),
                db.code().code().to_string(),
                db.message().to_string(),
            )
        }
    };
    let wrong = err(
        tokio_postgres::connect(&dsn("postgres", "wrong"), tokio_postgres::NoTls)
            .await
            .map(|_| ()),
    );
    let unknown = err(
        tokio_postgres::connect(&dsn("nobody", "wrong"), tokio_postgres::NoTls)
            .await
            .map(|_| ()),
    );
    assert_eq!(wrong.0, unknown.0);
    assert_eq!(wrong.1, "28P01");
    assert_eq!(unknown.1, "28P01");
    assert_eq!(
        wrong.2.replace("\"postgres\"", "\"U\""),
        unknown.2.replace("\"nobody\"", "\"U\""),
        "the messages differ only by the user name"
    );
    // The right password still works.
    let (c, conn) = tokio_postgres::connect(&dsn("postgres", "right"), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    c.simple_query("SELECT 1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_client_caps_answer_54000_and_the_session_goes_on() {
    let env = start(&[], |c| {
        c.limits.max_key_length = 16;
        c.limits.max_prepared_bytes_per_client = "2KB".into();
    })
    .await;
    let c = env.client().await;
    let long = "k".repeat(17);
    let e = c
        .simple_query(&format!("SET tidemark.key = '{long}'"))
        .await
        .unwrap_err();
    assert_eq!(e.code().map(|c| c.code()), Some("54000"), "{e}");
    let e = c
        .simple_query(&format!("/* tidemark: key={long} */ SELECT 1"))
        .await
        .unwrap_err();
    assert_eq!(e.code().map(|c| c.code()), Some("54000"), "{e}");
    c.simple_query("SET tidemark.key = 'short'").await.unwrap();
    // Named statements up to 2 KB of text, then 54000.
    let mut kept = Vec::new();
    let mut refused = None;
    for i in 0..40 {
        let sql = format!("SELECT {i} AS n, '{}'::text AS pad", "x".repeat(100));
        match c.prepare(&sql).await {
            Ok(s) => kept.push(s),
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    let e = refused.expect("the cap is reached");
    assert_eq!(e.code().map(|c| c.code()), Some("54000"), "{e}");
    assert!(kept.len() >= 10, "{} statements kept", kept.len());
    // The statements kept still run, and the session goes on.
    let row = c.query_one(&kept[0], &[]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_logins_and_idle_pools_leave_no_pool_behind() {
    let env = start(&[], |c| c.pool.idle_timeout = Duration::from_secs(1)).await;
    for db in ["nope_a", "nope_b", "nope_c"] {
        let e = tokio_postgres::connect(
            &format!(
                "host={} port={} user=postgres dbname={db}",
                env.proxy.addr.ip(),
                env.proxy.addr.port()
            ),
            tokio_postgres::NoTls,
        )
        .await
        .err()
        .expect("a missing database is refused");
        assert_eq!(e.code().map(|c| c.code()), Some("3D000"), "{e}");
    }
    let names = |app: &tidemark::app::App| -> Vec<String> {
        app.pools
            .all()
            .iter()
            .map(|p| p.key.database.clone())
            .collect()
    };
    assert!(
        !names(&env.proxy.app).iter().any(|d| d.starts_with("nope_")),
        "{:?}",
        names(&env.proxy.app)
    );
    // A pool nobody uses any more goes away once its connections have.
    let c = env.client().await;
    c.simple_query("SELECT 1").await.unwrap();
    drop(c);
    let t = Instant::now();
    while !names(&env.proxy.app).is_empty() {
        assert!(
            t.elapsed() < Duration::from_secs(8),
            "idle pools kept: {:?}",
            names(&env.proxy.app)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
