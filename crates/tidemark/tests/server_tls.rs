//! TLS from tidemark to PostgreSQL against real nodes that accept TLS only (`ssl = on`,
//! `hostssl` lines only in pg_hba.conf): pools, the monitor and the catalog connect over TLS
//! (`pg_stat_ssl` proves it), `sslmode = disable` is refused with a clear error, and
//! `verify-full` checks the host name while `verify-ca` does not.

mod common;

use std::time::Duration;

use common::*;
use tidemark::config::{Config, ServerTlsConfig, SslMode};
use tidemark::listener::Proxy;
use tidemark_cluster::{ClusterConfig, SslFiles};

/// `SELECT ssl FROM pg_stat_ssl` for the server connection the statement ran on, and whether
/// that server is in recovery.
async fn ssl_and_recovery(c: &tokio_postgres::Client, hint: &str) -> (String, String) {
    let r = rows(
        &c.simple_query(&format!(
            "{hint} SELECT ssl::text, pg_is_in_recovery()::text FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
        ))
        .await
        .expect("pg_stat_ssl query"),
    );
    (
        r[0][0].clone().expect("ssl"),
        r[0][1].clone().expect("recovery"),
    )
}

/// A proxy for `cluster` that is not waited for (its nodes may be unreachable).
async fn proxy_unchecked(cluster: &tidemark_cluster::Cluster, tls: ServerTlsConfig) -> Proxy {
    let mut cfg: Config = tidemark::dev::config_for(cluster, "127.0.0.1:0");
    cfg.server_tls = tls;
    cfg.validate().expect("valid test config");
    Proxy::start(cfg).await.expect("proxy start")
}

/// The error a client gets for `SELECT 1` through `p` (at login or at the statement); it
/// must be an ErrorResponse, not a dropped connection.
async fn client_error(p: &Proxy) -> String {
    let dsn = proxy_dsn_of(p, "postgres");
    let e = match tokio_postgres::connect(&dsn, tokio_postgres::NoTls).await {
        Err(e) => e,
        Ok((c, conn)) => {
            tokio::spawn(async move {
                let _ = conn.await;
            });
            c.simple_query("SELECT 1")
                .await
                .expect_err("the statement must fail")
        }
    };
    let db = e
        .as_db_error()
        .unwrap_or_else(|| panic!("an ErrorResponse, not a dropped connection: {e:?}"));
    format!("{} {}", db.message(), db.detail().unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostssl_only_nodes_are_served_over_tls_and_disable_is_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let mut ccfg = ClusterConfig::with_replicas(1);
    let certs = tidemark::dev::tls_only_nodes(&mut ccfg, dir.path()).unwrap();
    let cluster = start_cluster(ccfg).await;

    // verify-full against the CA: the monitor finds both nodes, writes and reads work, and
    // every server connection is TLS.
    let proxy = proxy_for(&cluster, |c| {
        c.server_tls = tidemark::dev::verify_full(certs.ca_cert.clone())
    })
    .await;
    let c = connect(&proxy_dsn_of(&proxy, "postgres")).await;
    c.batch_execute("CREATE TABLE t (id int primary key, v text); INSERT INTO t VALUES (1, 'one')")
        .await
        .unwrap();
    let r = rows(
        &c.simple_query("SELECT v FROM t WHERE id = 1")
            .await
            .unwrap(),
    );
    assert_eq!(r[0][0].as_deref(), Some("one"));
    assert_eq!(
        ssl_and_recovery(&c, "/* tidemark: primary */").await,
        ("true".to_string(), "false".to_string()),
        "the primary's connection is TLS"
    );
    wait_all_replayed(&cluster);
    let mut on_replica = false;
    for _ in 0..50 {
        let (ssl, recovery) = ssl_and_recovery(&c, "/* tidemark: replica */").await;
        assert_eq!(ssl, "true", "a replica's connection is TLS");
        if recovery == "true" {
            on_replica = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(on_replica, "a replica-hinted read never ran on the replica");
    let r = rows(
        &c.simple_query("/* tidemark: replica */ SELECT count(*) FROM t")
            .await
            .unwrap(),
    );
    assert_eq!(r[0][0].as_deref(), Some("1"));
    // A cancel request reaches the server (over a new TLS connection).
    let token = c.cancel_token();
    let started = std::time::Instant::now();
    let sleeper = tokio::spawn(async move {
        let e = c
            .simple_query("SELECT pg_sleep(30)")
            .await
            .expect_err("cancelled");
        (c, e)
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    token
        .cancel_query(tokio_postgres::NoTls)
        .await
        .expect("cancel request");
    let (c, e) = sleeper.await.unwrap();
    assert_eq!(
        e.code(),
        Some(&tokio_postgres::error::SqlState::QUERY_CANCELED),
        "{e:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    drop(c);
    proxy.shutdown().await;

    // sslmode = require (no certificate check) works too.
    let proxy = proxy_for(&cluster, |c| {
        c.server_tls.sslmode = Some(SslMode::Require);
    })
    .await;
    let c = connect(&proxy_dsn_of(&proxy, "postgres")).await;
    assert_eq!(ssl_and_recovery(&c, "").await.0, "true");
    drop(c);
    proxy.shutdown().await;

    // sslmode = disable: pg_hba refuses every node; the monitor reports them down and a
    // client gets an ErrorResponse that says why.
    let proxy = proxy_unchecked(
        &cluster,
        ServerTlsConfig {
            sslmode: Some(SslMode::Disable),
            ..Default::default()
        },
    )
    .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let errors = proxy.app.node_errors.lock().len();
        let view = proxy.app.view.load();
        if errors == cluster.node_count() && view.nodes.iter().all(|n| !n.healthy) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the monitor never reported every node down: {:?}",
            view.nodes
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let e = client_error(&proxy).await;
    assert!(e.contains("sslmode is disable"), "{e}");
    assert!(e.contains("no encryption"), "{e}");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_checks_the_host_name_and_verify_ca_does_not() {
    let dir = tempfile::tempdir().unwrap();
    // A certificate for another name than the 127.0.0.1 tidemark connects to.
    let certs = tidemark::tls::dev_ca_and_server_cert(dir.path(), &["db.example.invalid"])
        .expect("certificates");
    let cluster = start_cluster(ClusterConfig {
        ssl: Some(SslFiles {
            cert_file: certs.cert.clone(),
            key_file: certs.key.clone(),
        }),
        ..ClusterConfig::with_replicas(0)
    })
    .await;

    let proxy = proxy_for(&cluster, |c| {
        c.server_tls = ServerTlsConfig {
            sslmode: Some(SslMode::VerifyCa),
            sslrootcert: Some(certs.ca_cert.clone()),
            ..Default::default()
        }
    })
    .await;
    let c = connect(&proxy_dsn_of(&proxy, "postgres")).await;
    assert_eq!(ssl_and_recovery(&c, "").await.0, "true");
    drop(c);
    proxy.shutdown().await;

    // A CA that did not sign the server's certificate: verify-ca fails too.
    let other = tempfile::tempdir().unwrap();
    let stranger = tidemark::tls::dev_ca_and_server_cert(other.path(), &["localhost"]).unwrap();
    for (mode, ca) in [
        (SslMode::VerifyFull, certs.ca_cert.clone()),
        (SslMode::VerifyCa, stranger.ca_cert.clone()),
    ] {
        let proxy = proxy_unchecked(
            &cluster,
            ServerTlsConfig {
                sslmode: Some(mode),
                sslrootcert: Some(ca),
                ..Default::default()
            },
        )
        .await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let why = loop {
            if let Some(e) = proxy.app.node_errors.lock().get(&0).cloned() {
                break e;
            }
            assert!(tokio::time::Instant::now() < deadline, "no monitor error");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(why.contains("certificate"), "{mode}: {why}");
        assert!(why.contains(&format!("sslmode is {mode}")), "{why}");
        let e = client_error(&proxy).await;
        assert!(e.contains("certificate"), "{mode}: {e}");
        proxy.shutdown().await;
    }
}

/// `tidemark dev --server-tls`, the real binary: its nodes refuse plain TCP, and reads and
/// writes through it run over TLS on the primary and on a replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tidemark_dev_with_server_tls_serves_reads_and_writes_over_tls() {
    let dev =
        common::dev::Dev::start(&["--server-tls", "--replicas", "1", "--replica-delay", "0"]).await;
    let port = dev.port;
    let lines = dev.banner.clone();
    let text = lines.join("\n");
    assert!(text.contains("tidemark dev is ready"), "{text}");
    assert!(text.contains("TLS only (hostssl)"), "{text}");
    // A node's own address refuses a plain connection (pg_hba has hostssl lines only).
    let node_dsn = lines
        .iter()
        .find(|l| l.trim_start().starts_with("primary:"))
        .and_then(|l| l.split('"').nth(1))
        .expect("primary dsn")
        .to_string();
    let plain = tokio_postgres::connect(
        &format!("{node_dsn} sslmode=disable"),
        tokio_postgres::NoTls,
    )
    .await;
    assert!(plain.is_err(), "the primary accepted plain TCP");

    let c = connect(&format!(
        "host=127.0.0.1 port={port} user=postgres dbname=postgres"
    ))
    .await;
    c.batch_execute("CREATE TABLE dev_tls (id int PRIMARY KEY); INSERT INTO dev_tls VALUES (1)")
        .await
        .expect("write through tidemark dev");
    // (A plain read may go to a replica that has caught up: ask for the primary.)
    let (ssl, recovery) = ssl_and_recovery(&c, "/* tidemark: primary */").await;
    assert_eq!((ssl.as_str(), recovery.as_str()), ("true", "false"));
    // The replica serves reads once the monitor has it in rotation.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let (ssl, recovery) = ssl_and_recovery(&c, "/* tidemark: consistency=eventual */").await;
        assert_eq!(ssl, "true", "a read's server connection is not TLS");
        if recovery == "true" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no read reached the replica"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(dev);
}
