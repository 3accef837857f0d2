//! The differential driver matrix (issue 15): each driver's scenario program runs twice, once
//! against the primary directly and once through tidemark (transaction pooling, two replicas,
//! one of them 300 ms behind; each driver once with `routing.transactions = read_only`, the
//! default, and once with `optimistic`), and the two JSON outputs must be equal, scenario by scenario,
//! except where docs/compatibility.md lists the difference with its reason (its table "Allowed
//! differences in the driver matrix").
//!
//! The drivers are installed by `scripts/install-deps` (pip, npm, apt); a missing one fails
//! its test with the command that installs it.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::Value;
use tidemark::config::TxMode;

fn drivers_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/drivers")
}

/// (driver, scenario) pairs docs/compatibility.md allows to differ.
fn allowed() -> Vec<(String, String)> {
    let doc = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/compatibility.md"),
    )
    .expect("docs/compatibility.md");
    let section = doc
        .split("## Allowed differences in the driver matrix")
        .nth(1)
        .expect("docs/compatibility.md has the allowed-differences section");
    let section = section.split("\n## ").next().unwrap_or_default();
    section
        .lines()
        .filter(|l| l.starts_with('|') && !l.contains("---"))
        .filter_map(|l| {
            let cells: Vec<&str> = l.trim_matches('|').split('|').map(str::trim).collect();
            match cells.as_slice() {
                [driver, scenario, reason, ..]
                    if *driver != "driver" && !reason.is_empty() && !scenario.is_empty() =>
                {
                    Some((
                        driver.trim_matches('`').to_string(),
                        scenario.trim_matches('`').to_string(),
                    ))
                }
                _ => None,
            }
        })
        .collect()
}

/// Runs a scenario program and parses its one JSON object.
fn run(driver: &str, mut cmd: Command) -> BTreeMap<String, Value> {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{driver}: cannot run {cmd:?}: {e} (run scripts/install-deps)"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{driver} scenario program failed ({}):\n{stdout}\n{}\n(run scripts/install-deps)",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "{driver}: output is not one JSON object ({e}):\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Compares the two runs; panics listing every difference not allowed by the docs.
fn compare(driver: &str, direct: &BTreeMap<String, Value>, proxied: &BTreeMap<String, Value>) {
    assert!(!direct.is_empty(), "{driver}: no scenario ran");
    let allowed = allowed();
    let mut bad = Vec::new();
    for (name, want) in direct {
        let got = proxied.get(name).unwrap_or(&Value::Null);
        if got == want {
            continue;
        }
        if allowed.iter().any(|(d, s)| d == driver && s == name) {
            println!("{driver}/{name}: differs as docs/compatibility.md allows");
            continue;
        }
        bad.push(format!(
            "{driver}/{name}:\n  directly:        {want}\n  through tidemark: {got}"
        ));
    }
    for name in proxied.keys() {
        if !direct.contains_key(name) {
            bad.push(format!("{driver}/{name}: only through tidemark"));
        }
    }
    println!(
        "{driver}: {} scenarios, {} differ unexpectedly",
        direct.len(),
        bad.len()
    );
    assert!(
        bad.is_empty(),
        "differences from PostgreSQL not listed in docs/compatibility.md:\n{}",
        bad.join("\n")
    );
}

/// The matrix's cluster: two replicas, one 300 ms behind; `transactions` is
/// `routing.transactions` (each driver runs in the default `read_only` and in `optimistic`,
/// where its transactions start on replicas and move to the primary at their first write).
async fn matrix_env(transactions: TxMode) -> Env {
    start(&[None, Some(Duration::from_millis(300))], |c| {
        c.routing.balance = tidemark::config::Balance::Statement;
        c.routing.transactions = transactions;
    })
    .await
}

fn python() -> Command {
    Command::new(std::env::var("PYTHON").unwrap_or_else(|_| "python3".into()))
}

/// Django's test runner (`manage.py test`: create the test database, migrate, run the tests,
/// drop it), directly and through tidemark, with the replica delayed: it passes both ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn django_manage_py_test() {
    let env = start(&[Some(Duration::from_millis(200))], |_| {}).await;
    let project = drivers_dir().join("django");
    let run_tests = |host: String, port: u16, db: &str| {
        let out = python()
            .current_dir(&project)
            .args(["manage.py", "test", "--noinput", "-v", "2"])
            .env("PGHOST", host)
            .env("PGPORT", port.to_string())
            .env("TEST_DB_NAME", db)
            .output()
            .expect("run python3 manage.py test (scripts/install-deps installs Django)");
        let log = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(out.status.success(), "manage.py test ({db}) failed:\n{log}");
        assert!(log.contains("Ran 5 tests"), "{log}");
        assert!(log.contains("Destroying test database"), "{log}");
    };
    tokio::task::block_in_place(|| {
        run_tests(
            env.cluster.host().to_string(),
            env.cluster.port(0),
            "test_direct",
        );
        // Through tidemark, three times in a row (create, migrate, run, destroy each time).
        for _ in 0..3 {
            run_tests(
                env.proxy.addr.ip().to_string(),
                env.proxy.addr.port(),
                "test_proxied",
            );
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg_matrix() {
    psycopg(TxMode::ReadOnly).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg_matrix_optimistic() {
    psycopg(TxMode::Optimistic).await;
}

async fn psycopg(transactions: TxMode) {
    let env = matrix_env(transactions).await;
    let script = drivers_dir().join("psycopg_matrix.py");
    let dsn =
        |host: String, port: u16| format!("host={host} port={port} user=postgres dbname=postgres");
    let direct_dsn = dsn(env.cluster.host().to_string(), env.cluster.port(0));
    let proxy_dsn = dsn(env.proxy.addr.ip().to_string(), env.proxy.addr.port());
    let (direct, proxied) = tokio::task::block_in_place(|| {
        let mut a = python();
        a.arg(&script).arg(&direct_dsn).arg("d");
        let direct = run("psycopg", a);
        let mut b = python();
        b.arg(&script).arg(&proxy_dsn).arg("p");
        (direct, run("psycopg", b))
    });
    compare("psycopg", &direct, &proxied);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_postgres_matrix() {
    node_postgres(TxMode::ReadOnly).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_postgres_matrix_optimistic() {
    node_postgres(TxMode::Optimistic).await;
}

async fn node_postgres(transactions: TxMode) {
    let env = matrix_env(transactions).await;
    let dir = drivers_dir().join("node");
    assert!(
        dir.join("node_modules/pg").is_dir(),
        "node-postgres is not installed in {} (run scripts/install-deps)",
        dir.display()
    );
    let run_at = |host: String, port: u16, suffix: &str| {
        let mut c = Command::new("node");
        c.current_dir(&dir)
            .arg("matrix.js")
            .arg(host)
            .arg(port.to_string())
            .arg("postgres")
            .arg("postgres")
            .arg(suffix);
        run("node-postgres", c)
    };
    let (direct, proxied) = tokio::task::block_in_place(|| {
        (
            run_at(env.cluster.host().to_string(), env.cluster.port(0), "d"),
            run_at(env.proxy.addr.ip().to_string(), env.proxy.addr.port(), "p"),
        )
    });
    compare("node-postgres", &direct, &proxied);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asyncpg_matrix() {
    asyncpg(TxMode::ReadOnly).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asyncpg_matrix_optimistic() {
    asyncpg(TxMode::Optimistic).await;
}

async fn asyncpg(transactions: TxMode) {
    let env = matrix_env(transactions).await;
    let script = drivers_dir().join("asyncpg_matrix.py");
    let url = |host: String, port: u16| format!("postgresql://postgres@{host}:{port}/postgres");
    let (direct, proxied) = tokio::task::block_in_place(|| {
        let mut a = python();
        a.arg(&script)
            .arg(url(env.cluster.host().to_string(), env.cluster.port(0)))
            .arg("d");
        let direct = run("asyncpg", a);
        let mut b = python();
        b.arg(&script)
            .arg(url(env.proxy.addr.ip().to_string(), env.proxy.addr.port()))
            .arg("p");
        (direct, run("asyncpg", b))
    });
    compare("asyncpg", &direct, &proxied);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgjdbc_matrix() {
    pgjdbc(TxMode::ReadOnly).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgjdbc_matrix_optimistic() {
    pgjdbc(TxMode::Optimistic).await;
}

async fn pgjdbc(transactions: TxMode) {
    let env = matrix_env(transactions).await;
    let jar = Path::new("/usr/share/java/postgresql.jar");
    assert!(
        jar.exists(),
        "pgjdbc is not installed at {} (run scripts/install-deps)",
        jar.display()
    );
    let dir = drivers_dir().join("jdbc");
    let run_at = |host: String, port: u16, suffix: &str| {
        let mut c = Command::new("java");
        c.current_dir(&dir)
            .arg("-cp")
            .arg(jar)
            .arg("Matrix.java")
            .arg(format!(
                "jdbc:postgresql://{host}:{port}/postgres?user=postgres"
            ))
            .arg(suffix);
        run("pgjdbc", c)
    };
    let (direct, proxied) = tokio::task::block_in_place(|| {
        (
            run_at(env.cluster.host().to_string(), env.cluster.port(0), "d"),
            run_at(env.proxy.addr.ip().to_string(), env.proxy.addr.port(), "p"),
        )
    });
    compare("pgjdbc", &direct, &proxied);
}

/// tidemark's own commands work the way drivers send them: prepared (psycopg and pgjdbc
/// prepare any statement run five times), with Describe, unnamed or named; errors skip to Sync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tidemark_commands_over_the_extended_protocol() {
    let env = start(&[None], |_| {}).await;
    let c = env.client().await;
    c.batch_execute("CREATE TABLE ext_cmd (id int)")
        .await
        .unwrap();
    c.execute("INSERT INTO ext_cmd VALUES (1)", &[])
        .await
        .unwrap();
    let show = c.prepare("SHOW tidemark.commit_lsn").await.unwrap();
    assert_eq!(show.columns()[0].name(), "tidemark.commit_lsn");
    let mut seen = Vec::new();
    for _ in 0..7 {
        let row = c.query_one(&show, &[]).await.unwrap();
        seen.push(row.get::<_, String>(0));
    }
    assert!(seen.iter().all(|l| l != "0/0" && l == &seen[0]), "{seen:?}");
    // Unnamed (query with no statement cache), SET and RESET.
    c.execute("SET tidemark.consistency = 'eventual'", &[])
        .await
        .unwrap();
    let row = c.query_one("SHOW tidemark.consistency", &[]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "eventual");
    c.execute("RESET tidemark.consistency", &[]).await.unwrap();
    let row = c.query_one("SHOW tidemark.consistency", &[]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "session");
    // A bad value is an error (22023) and the session goes on.
    let e = c
        .execute("SET tidemark.consistency = 'sometimes'", &[])
        .await
        .unwrap_err();
    assert_eq!(e.code().map(|c| c.code()), Some("22023"), "{e}");
    assert_eq!(
        c.query_one("SELECT count(*) FROM ext_cmd", &[])
            .await
            .unwrap()
            .get::<_, i64>(0),
        1
    );

    // Several tidemark commands in one pipeline (psycopg's pipeline mode, one Sync).
    let mut r = common::raw::Raw::connect(env.proxy.addr, "postgres").await;
    let mut b = bytes::BytesMut::new();
    use postgres_protocol::message::frontend as pf;
    for sql in ["SET tidemark.key = 'user:7'", "SHOW tidemark.key"] {
        common::raw::unnamed_statement(sql, true, &mut b);
    }
    pf::sync(&mut b);
    r.send(&b).await;
    let msgs = r.until_ready().await;
    let tags: Vec<char> = msgs.iter().map(|m| m.0 as char).collect();
    assert_eq!(
        tags,
        vec!['1', '2', 'n', 'C', '1', '2', 'T', 'D', 'C', 'Z'],
        "{msgs:?}"
    );
    assert_eq!(
        common::raw::data_rows(&msgs)[0][0].as_deref(),
        Some("user:7")
    );
}

/// A Terminate sent before the startup packet (node-postgres closing at once) is closed
/// silently, as PostgreSQL does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminate_before_startup_closes_silently() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let env = start(&[], |_| {}).await;
    let mut s = tokio::net::TcpStream::connect(env.proxy.addr)
        .await
        .unwrap();
    s.write_all(&[b'X', 0, 0, 0, 4]).await.unwrap();
    let mut buf = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut buf))
        .await
        .expect("closed")
        .unwrap_or(0);
    assert_eq!(n, 0, "nothing is sent back: {buf:?}");
}

/// A scenario's result, or its error as the matrix records errors.
fn outcome<T: serde::Serialize, E: std::fmt::Display>(
    r: Result<T, E>,
    code: Option<String>,
) -> Value {
    match r {
        Ok(v) => serde_json::to_value(v).unwrap_or(Value::Null),
        Err(e) => serde_json::json!({ "error": code.unwrap_or_else(|| e.to_string()) }),
    }
}

fn pg_code(e: &tokio_postgres::Error) -> Option<String> {
    e.code().map(|c| c.code().to_string())
}

/// tokio-postgres scenarios: explicit prepared statements reused, pipelined concurrent
/// queries, a transaction, COPY IN, simple queries, errors, read-your-writes.
async fn tokio_postgres_scenarios(dsn: &str, suffix: &str) -> BTreeMap<String, Value> {
    use futures_util::SinkExt;
    let mut out = BTreeMap::new();
    let c = connect(dsn).await;
    let t = format!("tp_{suffix}");
    c.batch_execute(&format!("CREATE TABLE {t} (id int PRIMARY KEY, v text)"))
        .await
        .unwrap();

    let st = c.prepare("SELECT $1::int * 2, $2::text").await.unwrap();
    let mut vals = Vec::new();
    for i in 0..8 {
        let r = c.query_one(&st, &[&i, &format!("x{i}")]).await;
        vals.push(outcome(
            r.map(|r| (r.get::<_, i32>(0), r.get::<_, String>(1))),
            None,
        ));
    }
    out.insert("prepared_reused".into(), Value::Array(vals));

    let ins = c
        .prepare(&format!("INSERT INTO {t} VALUES ($1, 'p')"))
        .await
        .unwrap();
    let ids: Vec<i32> = (0..20).collect();
    let params: Vec<[&(dyn tokio_postgres::types::ToSql + Sync); 1]> = ids
        .iter()
        .map(|i| [i as &(dyn tokio_postgres::types::ToSql + Sync)])
        .collect();
    let futs: Vec<_> = params.iter().map(|p| c.execute(&ins, p)).collect();
    let done: Vec<Value> = futures_util::future::join_all(futs)
        .await
        .into_iter()
        .map(|r| {
            let code = r.as_ref().err().and_then(pg_code);
            outcome(r, code)
        })
        .collect();
    out.insert("pipelined_inserts".into(), Value::Array(done));
    let n = c
        .query_one(&format!("SELECT count(*) FROM {t}"), &[])
        .await
        .map(|r| r.get::<_, i64>(0));
    let code = n.as_ref().err().and_then(pg_code);
    out.insert("pipelined_then_count".into(), outcome(n, code));

    let mut c2 = connect(dsn).await;
    let tx = c2.transaction().await.unwrap();
    tx.execute(&format!("INSERT INTO {t} VALUES (100, 'tx')"), &[])
        .await
        .unwrap();
    let inside = tx
        .query_one(&format!("SELECT v FROM {t} WHERE id = 100"), &[])
        .await
        .map(|r| r.get::<_, String>(0));
    let code = inside.as_ref().err().and_then(pg_code);
    out.insert("transaction_read_own".into(), outcome(inside, code));
    tx.commit().await.unwrap();

    let sink = c.copy_in(&format!("COPY {t} FROM STDIN")).await.unwrap();
    let mut sink = Box::pin(sink);
    let mut data = String::new();
    for i in 200..250 {
        data.push_str(&format!("{i}\tc{i}\n"));
    }
    sink.send(bytes::Bytes::from(data)).await.unwrap();
    let copied = sink.as_mut().finish().await;
    let code = copied.as_ref().err().and_then(pg_code);
    out.insert("copy_in".into(), outcome(copied, code));

    let simple = c
        .simple_query("SELECT 1::text; SELECT 'two'")
        .await
        .map(|m| rows(&m));
    let code = simple.as_ref().err().and_then(pg_code);
    out.insert("simple_multi".into(), outcome(simple, code));

    let mut errs = Vec::new();
    for sql in ["SELECT 1/0", "SELECT * FROM no_such_tp", "SELEC 1"] {
        let r = c.simple_query(sql).await.map(|_| ());
        let code = r.as_ref().err().and_then(pg_code);
        errs.push(outcome(r, code));
    }
    out.insert("errors".into(), Value::Array(errs));

    let mut seen = Vec::new();
    for i in 300..320 {
        c.execute(&format!("INSERT INTO {t} VALUES ($1, 'ryw')"), &[&i])
            .await
            .unwrap();
        let r = c
            .query_opt(&format!("SELECT id FROM {t} WHERE id = $1"), &[&i])
            .await
            .unwrap();
        seen.push(r.map(|r| r.get::<_, i32>(0)));
    }
    out.insert("read_your_writes".into(), serde_json::json!(seen));
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres_matrix() {
    tokio_postgres(TxMode::ReadOnly).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres_matrix_optimistic() {
    tokio_postgres(TxMode::Optimistic).await;
}

async fn tokio_postgres(transactions: TxMode) {
    let env = matrix_env(transactions).await;
    let direct = tokio_postgres_scenarios(&env.cluster.dsn(0), "d").await;
    let proxied = tokio_postgres_scenarios(&env.proxy_dsn(), "p").await;
    compare("tokio-postgres", &direct, &proxied);
}

/// sqlx scenarios: its statement cache (every query a named statement, reused), bound
/// parameters, a transaction, errors, read-your-writes.
async fn sqlx_scenarios(url: &str, suffix: &str) -> BTreeMap<String, Value> {
    use sqlx::{Connection, Row};
    let mut out = BTreeMap::new();
    let code = |e: &sqlx::Error| match e {
        sqlx::Error::Database(d) => d.code().map(|c| c.to_string()),
        _ => None,
    };
    let mut c = sqlx::PgConnection::connect(url).await.unwrap();
    let t = format!("sx_{suffix}");
    sqlx::query(&format!("CREATE TABLE {t} (id int PRIMARY KEY, v text)"))
        .execute(&mut c)
        .await
        .unwrap();
    let mut vals = Vec::new();
    for i in 0..10i32 {
        let r = sqlx::query("SELECT $1::int + 1 AS n")
            .bind(i)
            .fetch_one(&mut c)
            .await
            .map(|r| r.get::<i32, _>("n"));
        let cd = r.as_ref().err().and_then(code);
        vals.push(outcome(r, cd));
    }
    out.insert("statement_cache".into(), Value::Array(vals));

    let mut tx = c.begin().await.unwrap();
    sqlx::query(&format!("INSERT INTO {t} VALUES ($1, $2)"))
        .bind(1i32)
        .bind("tx")
        .execute(&mut *tx)
        .await
        .unwrap();
    let inside = sqlx::query(&format!("SELECT v FROM {t} WHERE id = $1"))
        .bind(1i32)
        .fetch_one(&mut *tx)
        .await
        .map(|r| r.get::<String, _>(0));
    let cd = inside.as_ref().err().and_then(code);
    out.insert("transaction_read_own".into(), outcome(inside, cd));
    tx.commit().await.unwrap();

    let mut errs = Vec::new();
    for sql in ["SELECT 1/0", "SELECT * FROM no_such_sx"] {
        let r = sqlx::query(sql).execute(&mut c).await.map(|_| ());
        let cd = r.as_ref().err().and_then(code);
        errs.push(outcome(r, cd));
    }
    out.insert("errors".into(), Value::Array(errs));

    let mut seen = Vec::new();
    for i in 10..30i32 {
        sqlx::query(&format!("INSERT INTO {t} VALUES ($1, 'ryw')"))
            .bind(i)
            .execute(&mut c)
            .await
            .unwrap();
        let r: Option<i32> = sqlx::query_scalar(&format!("SELECT id FROM {t} WHERE id = $1"))
            .bind(i)
            .fetch_optional(&mut c)
            .await
            .unwrap();
        seen.push(r);
    }
    out.insert("read_your_writes".into(), serde_json::json!(seen));
    c.close().await.unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlx_matrix() {
    sqlx(TxMode::ReadOnly).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlx_matrix_optimistic() {
    sqlx(TxMode::Optimistic).await;
}

async fn sqlx(transactions: TxMode) {
    let env = matrix_env(transactions).await;
    let direct_url = format!(
        "postgres://postgres@{}:{}/postgres",
        env.cluster.host(),
        env.cluster.port(0)
    );
    let proxy_url = format!(
        "postgres://postgres@{}:{}/postgres",
        env.proxy.addr.ip(),
        env.proxy.addr.port()
    );
    let direct = sqlx_scenarios(&direct_url, "d").await;
    let proxied = sqlx_scenarios(&proxy_url, "p").await;
    compare("sqlx", &direct, &proxied);
}

/// What a new user runs: `tidemark dev --transactions optimistic` (two replicas, the second
/// 200 ms behind) and psycopg in its default mode, every request's statements in a
/// transaction. The connection that writes reads its own rows in its next transaction, 500 of
/// 500; once writes stop, at least 90 % of the write-free requests run on a replica. (With
/// `--transactions read_only`, the default, 0 of 200 do.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg_default_mode_requests_through_tidemark_dev() {
    let dev = common::dev::Dev::start(&[
        "--replicas",
        "2",
        "--replica-delay",
        "200ms",
        "--transactions",
        "optimistic",
    ])
    .await;
    let dsn = format!(
        "host=127.0.0.1 port={} user=postgres dbname=postgres",
        dev.port
    );
    let out = tokio::task::block_in_place(|| {
        let mut c = python();
        c.arg(drivers_dir().join("psycopg_requests.py"))
            .arg(&dsn)
            .arg("500");
        run("psycopg", c)
    });
    println!("psycopg default mode through tidemark dev: {out:?}");
    let n = |k: &str| out.get(k).and_then(Value::as_u64).unwrap_or(u64::MAX);
    assert_eq!(
        n("stale"),
        0,
        "the writer's own transactions read stale rows"
    );
    assert_eq!(n("wrong_counts"), 0);
    assert_eq!(n("requests"), 200);
    assert!(
        n("on_replica") >= 180,
        "{} of 200 write-free requests on a replica",
        n("on_replica")
    );
    drop(dev);
}
