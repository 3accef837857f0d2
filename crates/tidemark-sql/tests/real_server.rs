//! The corpus checked against the real server: on a local primary + hot-standby replica
//! (tidemark-cluster), every `Write` example fails on the replica as a write during recovery,
//! unless the corpus marks it primary-only (with its reason), and every `Read` example runs on the
//! replica without error. So the classes are what PostgreSQL does, not what we believe it does.
//!
//! What is checked, by the corpus entry's class and [`corpus::Server`] mark:
//! - `Read`: runs on the replica (`psql -c`, one simple query, as a client would send it).
//! - `Write`: fails on the replica with SQLSTATE 25006 (read-only transaction) or an error
//!   mentioning recovery / read-only / hot standby (e.g. `txid_current()` raises an internal
//!   error "cannot assign TransactionIds during recovery"). Any other error means the statement
//!   is not valid against the fixture, which fails the test too: fix the fixture or the corpus.
//! - `Write` marked `PrimaryOnly(reason)`: a write the replica would run but that must go to the
//!   primary (advisory locks, per-node server controls, …); not asserted, listed with its reason
//!   and what the replica did.
//! - `Rejected(reason)`: PostgreSQL refuses it after parsing; the replica must fail it.
//! - Skipped: `Unknown` (unparsable, routed to the primary; some cannot even be passed to psql,
//!   e.g. a NUL byte), `Transaction` and `SessionState` (routed by the session's transaction and
//!   pinning state, not by the statement alone; several only make sense inside a transaction
//!   block), and `Tidemark` commands (answered by the proxy, never sent to a server).
//!
//! The corpus classes are those of a classifier without a function catalog (the proxy's state
//! before its first catalog load). The proxy normally classifies with the catalog loaded from
//! `pg_proc`, so every checked statement is classified again with the catalog read from this
//! cluster; where that changes the class to `Read`, the statement must run on the replica too.
//!
//! `$n` parameters are replaced by `NULL` for the run (psql has no parameter values).
//!
//! Run `cargo test -p tidemark-sql --test real_server -- --nocapture` to see the summary.

mod corpus;

use std::process::{Command, Stdio};
use std::time::Duration;

use corpus::{Case, Server};
use tidemark_cluster::{Cluster, ClusterConfig};
use tidemark_sql::{Class, Classifier, FunctionCatalog, FunctionPolicy, Volatility};

const PRIMARY: usize = 0;
const REPLICA: usize = 1;

/// Outcome of one statement on a node.
enum Outcome {
    Ok,
    /// SQLSTATE (from psql's verbose error report) and the error text.
    Err {
        sqlstate: String,
        message: String,
    },
}

/// Runs `sql` as one simple query on node `i` with psql, reporting the SQLSTATE on error.
fn run(cluster: &Cluster, i: usize, sql: &str) -> Outcome {
    let mut cmd = Command::new(cluster.bindir().join("psql"));
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("PG") {
            cmd.env_remove(key);
        }
    }
    let out = cmd
        .args(["-XAtq", "-v", "ON_ERROR_STOP=1", "-v", "VERBOSITY=verbose"])
        .args([
            "-h",
            cluster.host(),
            "-U",
            cluster.superuser(),
            "-d",
            "postgres",
        ])
        .args(["-p", &cluster.port(i).to_string(), "-c", sql])
        .env("LC_ALL", "C")
        .env("LANG", "C")
        .env("PGCONNECT_TIMEOUT", "10")
        .stdin(Stdio::null())
        .output()
        .expect("run psql");
    if out.status.success() {
        return Outcome::Ok;
    }
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    // Verbose reports start with "ERROR:  25006: cannot execute …".
    let sqlstate = stderr
        .lines()
        .find_map(|l| {
            let rest = l.trim_start_matches("psql:").split("ERROR:").nth(1)?;
            let code = rest.trim_start().split(':').next()?;
            (code.len() == 5 && code.chars().all(|c| c.is_ascii_alphanumeric()))
                .then(|| code.to_string())
        })
        .unwrap_or_default();
    Outcome::Err {
        sqlstate,
        message: stderr.trim().replace('\n', " | "),
    }
}

/// `$1`, `$2`, … → `NULL`, outside string constants and dollar quotes.
fn bind_nulls(sql: &str) -> String {
    let b = sql.as_bytes();
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b'$' || c >= 0x80;
    let mut out = String::with_capacity(sql.len());
    let mut i = 0;
    let mut copied = 0;
    while i < b.len() {
        let after_ident = i > 0 && ident(b[i - 1]);
        if b[i] == b'\'' {
            i += 1 + sql[i + 1..].find('\'').map_or(sql.len() - i - 1, |n| n + 1);
        } else if b[i] == b'$' && !after_ident && b.get(i + 1).is_some_and(u8::is_ascii_digit) {
            out.push_str(&sql[copied..i]);
            out.push_str("NULL");
            i += 1;
            while b.get(i).is_some_and(u8::is_ascii_digit) {
                i += 1;
            }
            copied = i;
        } else if b[i] == b'$' && !after_ident {
            // A dollar quote `$tag$ … $tag$`: skip to its end.
            let tag_len = sql[i + 1..]
                .bytes()
                .take_while(|&c| c.is_ascii_alphanumeric() || c == b'_' || c >= 0x80)
                .count();
            if b.get(i + 1 + tag_len) == Some(&b'$') {
                let tag = &sql[i..i + tag_len + 2];
                let body = i + tag.len();
                i = sql[body..]
                    .find(tag)
                    .map_or(sql.len(), |n| body + n + tag.len());
            } else {
                i += 1;
            }
        } else {
            i += 1;
        }
    }
    out.push_str(&sql[copied..]);
    out
}

/// An error a write gets on a hot standby.
fn is_recovery_error(sqlstate: &str, message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    sqlstate == "25006"
        || m.contains("recovery")
        || m.contains("read-only")
        || m.contains("hot standby")
}

#[test]
fn corpus_against_a_real_replica() {
    let cluster = Cluster::start(ClusterConfig::with_replicas(1)).expect("cluster start");
    cluster
        .psql(PRIMARY, corpus::FIXTURE)
        .expect("create the fixture on the primary");
    let lsn = cluster.current_lsn(PRIMARY).expect("primary lsn");
    cluster
        .wait_replayed(REPLICA, &lsn, Duration::from_secs(30))
        .expect("replica replays the fixture");
    assert_eq!(
        cluster.psql(REPLICA, "SELECT pg_is_in_recovery()").unwrap(),
        "t"
    );

    let cases = corpus::corpus();
    let mut failures: Vec<String> = Vec::new();
    let (mut reads, mut writes, mut rejected) = (0usize, 0usize, 0usize);
    let mut primary_only: Vec<String> = Vec::new();
    let mut skipped: Vec<(&str, usize)> = vec![
        ("Unknown: unparsable, routed to the primary", 0),
        ("Transaction: routed by transaction state", 0),
        ("SessionState: routed by session state / pinning", 0),
        ("Tidemark: answered by the proxy", 0),
    ];
    for Case {
        sql, class, server, ..
    } in &cases
    {
        let text = bind_nulls(sql);
        match (class, server) {
            (Class::Unknown, _) => skipped[0].1 += 1,
            (Class::Transaction(_), _) => skipped[1].1 += 1,
            (Class::SessionState(_), _) => skipped[2].1 += 1,
            (Class::Tidemark(_), _) => skipped[3].1 += 1,
            (_, Server::Rejected(reason)) => {
                rejected += 1;
                if let Outcome::Ok = run(&cluster, REPLICA, &text) {
                    failures.push(format!(
                        "{sql:?}: marked rejected ({reason}) but the replica ran it"
                    ));
                }
            }
            (Class::Read, Server::Check) => {
                reads += 1;
                if let Outcome::Err { sqlstate, message } = run(&cluster, REPLICA, &text) {
                    failures.push(format!(
                        "{sql:?}: classified Read but failed on the replica ({sqlstate}): {message}"
                    ));
                }
            }
            (Class::Write, Server::Check) => {
                writes += 1;
                match run(&cluster, REPLICA, &text) {
                    Outcome::Ok => failures.push(format!(
                        "{sql:?}: classified Write but the replica ran it; if it must still go \
                         to the primary, mark it primary-only with the reason"
                    )),
                    Outcome::Err { sqlstate, message } => {
                        if !is_recovery_error(&sqlstate, &message) {
                            failures.push(format!(
                                "{sql:?}: failed on the replica, but not as a write during \
                                 recovery ({sqlstate}): {message} — fix the fixture or the corpus"
                            ));
                        }
                    }
                }
            }
            (Class::Write, Server::PrimaryOnly(reason)) => {
                let did = match run(&cluster, REPLICA, &text) {
                    Outcome::Ok => "the replica runs it".to_string(),
                    Outcome::Err { sqlstate, message } => {
                        format!("the replica fails it ({sqlstate}): {message}")
                    }
                };
                primary_only.push(format!("  {sql:?}\n      reason: {reason}\n      ({did})"));
            }
            (other, Server::PrimaryOnly(_)) => {
                failures.push(format!("{sql:?}: {other:?} marked primary-only"))
            }
        }
    }

    // The same statements classified with the function catalog loaded, as the proxy does.
    let rows = cluster
        .psql(REPLICA, FunctionCatalog::LOAD_SQL)
        .expect("load the function catalog");
    let mut catalog = FunctionCatalog::new();
    for row in rows.lines() {
        let mut cols = row.split('|');
        let (Some(schema), Some(name), Some(v)) = (cols.next(), cols.next(), cols.next()) else {
            panic!("catalog row {row:?}");
        };
        catalog.insert(schema, name, Volatility::from_provolatile(v).expect(row));
    }
    assert!(catalog.len() > 1000, "{} functions", catalog.len());
    let with_catalog = Classifier::new(1000, FunctionPolicy::default());
    with_catalog.set_catalog(catalog);
    let mut catalog_reads = 0usize;
    let mut catalog_changes: Vec<String> = Vec::new();
    for case in cases.iter().filter(|c| c.server == Server::Check) {
        let class = with_catalog.classify(case.sql).class.clone();
        if class == case.class {
            continue;
        }
        catalog_changes.push(format!("  {:?}: {:?} -> {class:?}", case.sql, case.class));
        if class == Class::Read {
            catalog_reads += 1;
            if let Outcome::Err { sqlstate, message } =
                run(&cluster, REPLICA, &bind_nulls(case.sql))
            {
                failures.push(format!(
                    "{:?}: classified Read with the catalog loaded but failed on the replica \
                     ({sqlstate}): {message}",
                    case.sql
                ));
            }
        }
    }

    println!("real-server corpus check on PostgreSQL replica (node {REPLICA}):");
    println!("  {reads} reads checked (ran on the replica)");
    println!("  {writes} writes checked (failed on the replica as writes during recovery)");
    println!("  {rejected} statements PostgreSQL rejects after parsing checked (failed)");
    println!(
        "  {} writes primary-only, not checked, with reasons:",
        primary_only.len()
    );
    for p in &primary_only {
        println!("{p}");
    }
    println!(
        "  {} classes change with the function catalog loaded ({catalog_reads} new reads checked; \
         Read -> Write is the conservative direction: an unqualified name takes the most volatile \
         function of that name in any schema, e.g. the fixture's writing public.count aggregate):",
        catalog_changes.len()
    );
    for c in &catalog_changes {
        println!("  {c}");
    }
    let n_skipped: usize = skipped.iter().map(|(_, n)| n).sum();
    println!("  {n_skipped} skipped:");
    for (why, n) in &skipped {
        println!("    {n} {why}");
    }
    assert_eq!(
        reads + writes + rejected + primary_only.len() + n_skipped,
        cases.len()
    );
    assert!(
        failures.is_empty(),
        "{} corpus statements disagree with the real server:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn bind_nulls_replaces_parameters_only() {
    assert_eq!(bind_nulls("SELECT $1::int + $2"), "SELECT NULL::int + NULL");
    assert_eq!(
        bind_nulls("SELECT $$1$$, $q$ $1 $q$"),
        "SELECT $$1$$, $q$ $1 $q$"
    );
    assert_eq!(bind_nulls("SELECT a$1 FROM t"), "SELECT a$1 FROM t");
    assert_eq!(bind_nulls("SELECT '$1', $1"), "SELECT '$1', NULL");
    assert_eq!(
        bind_nulls("SELECT 'it''s $1' || $2"),
        "SELECT 'it''s $1' || NULL"
    );
}
