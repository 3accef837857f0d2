//! Credentials without plaintext against real PostgreSQL nodes that require SCRAM over TCP:
//! SCRAM pass-through (a verifier copied from pg_authid, no server_password) and auth_query
//! (users not in `[[users]]` looked up on the primary).

mod common;

use common::*;
use tidemark::config::{AuthMethod, UserConfig};
use tidemark_cluster::{Cluster, ClusterConfig};
use tokio_postgres::error::SqlState;

/// A primary and one replica whose pg_hba.conf asks every TCP login but the harness's
/// superuser for SCRAM-SHA-256 (unix sockets and the superuser keep trust, for the harness
/// and the monitor).
async fn scram_cluster() -> Cluster {
    let cluster = start_cluster(ClusterConfig::with_replicas(1)).await;
    let hba = [
        "local   all          all                     trust",
        "host    all          postgres  127.0.0.1/32  trust",
        "host    replication  all       127.0.0.1/32  trust",
        "host    all          all       127.0.0.1/32  scram-sha-256",
        "",
    ]
    .join("\n");
    for i in 0..cluster.node_count() {
        // Truncates the existing file: its owner and mode stay the server's.
        std::fs::write(cluster.data_dir(i).join("pg_hba.conf"), &hba).expect("write pg_hba");
        let c = connect(&cluster.dsn(i)).await;
        exec(&c, "SELECT pg_reload_conf()").await;
    }
    let p = connect(&cluster.dsn(0)).await;
    exec(
        &p,
        "SET password_encryption = 'scram-sha-256';
         CREATE ROLE app LOGIN PASSWORD 'secret';
         CREATE TABLE notes (id int PRIMARY KEY, body text);
         GRANT ALL ON notes TO PUBLIC",
    )
    .await;
    let cluster = tokio::task::spawn_blocking(move || {
        wait_all_replayed(&cluster);
        cluster
    })
    .await
    .unwrap();
    // A direct login without the password is refused: the nodes really require SCRAM.
    let direct = format!(
        "host=127.0.0.1 port={} user=app dbname=postgres",
        cluster.port(0)
    );
    assert!(tokio_postgres::connect(&direct, tokio_postgres::NoTls)
        .await
        .is_err());
    cluster
}

fn dsn(p: &tidemark::listener::Proxy, user: &str, password: &str) -> String {
    // libpq-style quoting: the user name may hold a quote.
    let user = user.replace('\\', "\\\\").replace('\'', "\\'");
    format!(
        "host={} port={} user='{user}' password='{password}' dbname=postgres",
        p.addr.ip(),
        p.addr.port()
    )
}

async fn login(dsn: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, conn) = tokio_postgres::connect(dsn, tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

fn code(e: &tokio_postgres::Error) -> Option<&SqlState> {
    e.code()
}

/// Reads on the replica and writes through the primary (both through pass-through server
/// logins), and checks that the servers see `user` logged in over TCP.
async fn reads_and_writes(cluster: &Cluster, c: &tokio_postgres::Client, user: &str, id: i32) {
    // A session's first read (nothing written yet) goes to the replica.
    assert_eq!(scalar(c, "SELECT pg_is_in_recovery()").await, "t");
    c.execute(
        "INSERT INTO notes VALUES ($1, $2)",
        &[&id, &format!("by {user}")],
    )
    .await
    .unwrap();
    let body: String = c
        .query_one("SELECT body FROM notes WHERE id = $1", &[&id])
        .await
        .unwrap()
        .get(0);
    assert_eq!(body, format!("by {user}"));
    let me = scalar(c, "SELECT current_user").await;
    assert_eq!(me, user);
    let su = connect(&cluster.dsn(0)).await;
    let n: i64 = su
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = $1 AND client_addr IS NOT NULL",
            &[&user],
        )
        .await
        .unwrap()
        .get(0);
    assert!(n >= 1, "tidemark holds a TCP server connection as {user}");
}

/// (a) A verifier copied from pg_authid, no server_password: the client logs in with its
/// password, its statements run on server connections tidemark authenticated with the
/// ClientKey from its proof; a wrong password gets 28P01; a verifier with another salt than
/// the server's fails server logins with 08004 naming the user.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_pass_through_with_a_verifier_copied_from_pg_authid() {
    let cluster = scram_cluster().await;
    let su = connect(&cluster.dsn(0)).await;
    let verifier = scalar(
        &su,
        "SELECT rolpassword FROM pg_authid WHERE rolname = 'app'",
    )
    .await;
    assert!(verifier.starts_with("SCRAM-SHA-256$"), "{verifier}");
    exec(
        &su,
        "CREATE ROLE other LOGIN PASSWORD 'pw2'; CREATE ROLE nokey LOGIN PASSWORD 'pw3'",
    )
    .await;
    let nokey_verifier = scalar(
        &su,
        "SELECT rolpassword FROM pg_authid WHERE rolname = 'nokey'",
    )
    .await;
    // tidemark's verifier for `other` is the right password with another salt.
    let other = tidemark::auth::ScramSecret::from_password("pw2");
    let other_verifier = {
        use base64::Engine;
        let b = base64::engine::general_purpose::STANDARD;
        format!(
            "SCRAM-SHA-256${}:{}${}:{}",
            other.iterations,
            b.encode(&other.salt),
            b.encode(other.stored_key),
            b.encode(other.server_key)
        )
    };
    let user = |name: &str, v: &str| UserConfig {
        name: name.into(),
        password: Some(v.into()),
        auth: AuthMethod::ScramSha256,
        server_password: None,
        consistency: None,
        transactions: None,
        password_file: None,
        password_env: None,
        server_password_file: None,
        server_password_env: None,
    };
    let proxy = proxy_for(&cluster, |c| {
        c.users.push(user("app", &verifier));
        c.users.push(user("other", &other_verifier));
        // Logs in to tidemark without SCRAM, so tidemark never learns a ClientKey for it.
        c.users.push(UserConfig {
            auth: AuthMethod::Trust,
            ..user("nokey", &nokey_verifier)
        });
        c.pool.max_size = 4;
        // Pre-warming skips pools that have no key yet, and fills the others.
        c.pool.min_size = 1;
    })
    .await;
    wait_all_replayed(&cluster);

    let c = login(&dsn(&proxy, "app", "secret"))
        .await
        .expect("app logs in");
    reads_and_writes(&cluster, &c, "app", 1).await;
    // A second client of the same user shares the pool (and the key).
    let c2 = login(&dsn(&proxy, "app", "secret")).await.unwrap();
    assert_eq!(scalar(&c2, "SELECT current_user").await, "app");

    let e = login(&dsn(&proxy, "app", "wrong")).await.err().unwrap();
    assert_eq!(code(&e), Some(&SqlState::INVALID_PASSWORD), "{e}");

    // tidemark accepts the password against its own verifier, then the session's first
    // server login fails.
    let e = login(&dsn(&proxy, "other", "pw2")).await.err().unwrap();
    let db = e.as_db_error().expect("an error from tidemark");
    assert_eq!(db.code().code(), "08004", "{db:?}");
    assert!(
        db.message().contains("\"other\"") && db.message().contains("verifier differs"),
        "{}",
        db.message()
    );

    // No SCRAM login of nokey since start: its server logins fail, clearly.
    let e = login(&dsn(&proxy, "nokey", "")).await.err().unwrap();
    let db = e.as_db_error().expect("an error from tidemark");
    assert_eq!(db.code().code(), "08004", "{db:?}");
    assert!(
        db.message()
            .contains("no credentials for user \"nokey\" yet"),
        "{}",
        db.message()
    );
    // Another reaper round (min_size top-ups) later, app still works.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    assert_eq!(scalar(&c, "SELECT count(*) FROM notes").await, "1");
    proxy.shutdown().await;
}

/// (b) auth_query: users not in [[users]] are looked up on the primary; unknown, md5 and
/// crafted names get 28P01; a failing lookup gets 08006.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_query_logs_in_users_that_are_not_configured() {
    let cluster = scram_cluster().await;
    let su = connect(&cluster.dsn(0)).await;
    exec(
        &su,
        r#"SET password_encryption = 'scram-sha-256';
           CREATE ROLE tidemark_auth LOGIN SUPERUSER PASSWORD 'authpw';
           CREATE ROLE aq LOGIN PASSWORD 'aqpw';
           CREATE ROLE "o'x" LOGIN PASSWORD 'qpw';
           CREATE ROLE tidemark_fn LOGIN PASSWORD 'fnpw';
           CREATE FUNCTION public.tidemark_lookup(i_user text, OUT usename name, OUT passwd text)
             RETURNS record LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog AS
             $$ SELECT usename, passwd FROM pg_catalog.pg_shadow WHERE usename = i_user $$;
           REVOKE ALL ON FUNCTION public.tidemark_lookup(text) FROM PUBLIC;
           GRANT EXECUTE ON FUNCTION public.tidemark_lookup(text) TO tidemark_fn;
           SET password_encryption = 'md5';
           CREATE ROLE old LOGIN PASSWORD 'oldpw'"#,
    )
    .await;
    wait_all_replayed(&cluster);
    let proxy = proxy_for(&cluster, |c| {
        c.auth.user = Some("tidemark_auth".into());
        c.auth.password = Some("authpw".into());
        c.pool.max_size = 4;
    })
    .await;

    let c = login(&dsn(&proxy, "aq", "aqpw")).await.expect("aq logs in");
    reads_and_writes(&cluster, &c, "aq", 10).await;
    // Cached: a second login needs no lookup and works the same.
    let c2 = login(&dsn(&proxy, "aq", "aqpw")).await.unwrap();
    assert_eq!(scalar(&c2, "SELECT current_user").await, "aq");
    let e = login(&dsn(&proxy, "aq", "nope")).await.err().unwrap();
    assert_eq!(code(&e), Some(&SqlState::INVALID_PASSWORD), "{e}");

    // A quote in the name is a name, not SQL.
    let q = login(&dsn(&proxy, "o'x", "qpw"))
        .await
        .expect("o'x logs in");
    assert_eq!(scalar(&q, "SELECT current_user").await, "o'x");
    for crafted in [
        "nobody",
        "x' OR usename = 'aq",
        "x' OR '1'='1",
        "'; DROP TABLE notes; --",
    ] {
        let e = login(&dsn(&proxy, crafted, "aqpw")).await.err().unwrap();
        assert_eq!(
            code(&e),
            Some(&SqlState::INVALID_PASSWORD),
            "{crafted}: {e}"
        );
    }
    assert_eq!(scalar(&su, "SELECT count(*) FROM notes").await, "1");
    // An md5 password cannot be checked by SCRAM: refused like an unknown user.
    let e = login(&dsn(&proxy, "old", "oldpw")).await.err().unwrap();
    assert_eq!(code(&e), Some(&SqlState::INVALID_PASSWORD), "{e}");
    proxy.shutdown().await;

    // The lookup itself failing (here: a wrong auth.password) is 08006, not 28P01.
    let broken = proxy_for(&cluster, |c| {
        c.auth.user = Some("tidemark_auth".into());
        c.auth.password = Some("wrong".into());
    })
    .await;
    let e = login(&dsn(&broken, "aq", "aqpw")).await.err().unwrap();
    let db = e.as_db_error().expect("an error from tidemark");
    assert_eq!(db.code(), &SqlState::CONNECTION_FAILURE, "{db:?}");
    assert!(db.message().contains("auth_query"), "{}", db.message());
    broken.shutdown().await;

    // docs/security.md's lookup role: no superuser, only a SECURITY DEFINER function.
    let least = proxy_for(&cluster, |c| {
        c.auth.user = Some("tidemark_fn".into());
        c.auth.password = Some("fnpw".into());
        c.auth.query = "SELECT usename, passwd FROM public.tidemark_lookup($1)".into();
    })
    .await;
    let c = login(&dsn(&least, "aq", "aqpw")).await.expect("aq logs in");
    assert_eq!(scalar(&c, "SELECT current_user").await, "aq");
    let e = login(&dsn(&least, "x' OR '1'='1", "aqpw"))
        .await
        .err()
        .unwrap();
    assert_eq!(code(&e), Some(&SqlState::INVALID_PASSWORD), "{e}");
    least.shutdown().await;
}
