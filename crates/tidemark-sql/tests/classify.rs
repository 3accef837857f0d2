//! Table-driven tests of statement classification: one row per rule of the classification spec.

use tidemark_sql::{
    Class, Classifier, FunctionCatalog, FunctionPolicy, SessionKind, TidemarkCommand, TxControl,
    Volatility,
};

const R: Class = Class::Read;
const W: Class = Class::Write;
const U: Class = Class::Unknown;

fn ss(k: SessionKind) -> Class {
    Class::SessionState(k)
}
fn tx(t: TxControl) -> Class {
    Class::Transaction(t)
}
fn begin(read_only: bool, isolation: Option<&str>, deferrable: bool) -> Class {
    tx(TxControl::Begin {
        read_only,
        isolation: isolation.map(str::to_string),
        deferrable,
    })
}
fn set(local: bool, name: &str, value: Option<&str>) -> Class {
    ss(SessionKind::Set {
        local,
        name: name.into(),
        value_sql: value.map(str::to_string),
    })
}

/// (sql, class, pins_session)
fn table() -> Vec<(&'static str, Class, bool)> {
    vec![
        // --- reads
        ("SELECT 1", R, false),
        ("select * from users where id = $1", R, false),
        ("SELECT u.name, o.total FROM users u JOIN orders o ON o.user_id = u.id WHERE u.id = $1", R, false),
        ("VALUES (1, 'a'), (2, 'b')", R, false),
        ("TABLE users", R, false),
        ("SHOW search_path", R, false),
        ("SHOW ALL", R, false),
        ("EXPLAIN SELECT 1", R, false),
        ("EXPLAIN DELETE FROM t", R, false),
        ("EXPLAIN ANALYZE SELECT * FROM t", R, false),
        ("EXPLAIN (ANALYZE false) DELETE FROM t", R, false),
        ("COPY t TO STDOUT", R, false),
        ("COPY (SELECT * FROM t WHERE x > 1) TO STDOUT WITH (FORMAT csv)", R, false),
        ("SELECT count(*), max(x), string_agg(s, ',') FROM t GROUP BY y HAVING sum(z) > 1", R, false),
        ("SELECT random()", R, false),
        ("SELECT now(), lower('A'), coalesce(a, b), greatest(1, 2) FROM t", R, false),
        ("SELECT * FROM generate_series(1, 10)", R, false),
        ("SELECT row_number() OVER (PARTITION BY a ORDER BY b) FROM t", R, false),
        ("WITH x AS (SELECT 1 AS a) SELECT * FROM x", R, false),
        ("SELECT * FROM t WHERE id IN (SELECT id FROM u WHERE v = $1)", R, false),
        ("SELECT 1 UNION ALL SELECT 2", R, false),
        ("SELECT CASE WHEN a THEN 1 ELSE 2 END, a::int, b IS NULL FROM t", R, false),
        ("SELECT pg_sleep(0.1)", R, false),
        ("SELECT current_setting('work_mem'), version(), pg_backend_pid()", R, false),
        ("SELECT extract(year FROM now()), position('a' in 'abc'), substring('abc' from 2)", R, false),
        ("SELECT jsonb_build_object('a', 1), json_agg(t) FROM t", R, false),
        ("SELECT $1::int + $2", R, false),
        ("", R, false),
        ("  ;  ", R, false),
        ("-- just a comment", R, false),
        // --- writes: DML
        ("INSERT INTO t VALUES (1)", W, false),
        ("INSERT INTO t (a) VALUES ($1) ON CONFLICT (a) DO UPDATE SET a = excluded.a RETURNING id", W, false),
        ("UPDATE t SET a = 1 WHERE id = $1", W, false),
        ("DELETE FROM t WHERE id = 1", W, false),
        ("MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN UPDATE SET a = s.a WHEN NOT MATCHED THEN INSERT VALUES (s.id, s.a)", W, false),
        // --- writes: DDL and maintenance
        ("CREATE TABLE t (id int)", W, false),
        ("CREATE UNLOGGED TABLE t2 (id int)", W, false),
        ("ALTER TABLE t ADD COLUMN b int", W, false),
        ("DROP TABLE t", W, false),
        ("COMMENT ON TABLE t IS 'x'", W, false),
        ("GRANT SELECT ON t TO bob", W, false),
        ("REVOKE SELECT ON t FROM bob", W, false),
        ("CREATE INDEX CONCURRENTLY i ON t (a)", W, false),
        ("CREATE VIEW v AS SELECT 1", W, false),
        ("CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'SELECT 1'", W, false),
        ("CREATE TABLE t3 AS SELECT * FROM t", W, false),
        ("CREATE SEQUENCE s", W, false),
        ("TRUNCATE t", W, false),
        ("VACUUM t", W, false),
        ("ANALYZE t", W, false),
        ("CLUSTER t USING i", W, false),
        ("REINDEX TABLE t", W, false),
        ("LOCK TABLE t IN ACCESS EXCLUSIVE MODE", W, false),
        ("REFRESH MATERIALIZED VIEW mv", W, false),
        ("CALL p(1)", W, false),
        ("DO $$ BEGIN PERFORM 1; END $$", W, false),
        ("CHECKPOINT", W, false),
        ("NOTIFY chan, 'payload'", W, false),
        ("ALTER SYSTEM SET work_mem = '64MB'", W, false),
        ("CREATE DATABASE d", W, false),
        // --- COPY
        ("COPY t FROM STDIN", W, false),
        ("COPY t (a, b) FROM STDIN WITH (FORMAT csv)", W, false),
        ("COPY t TO '/tmp/out.csv'", W, false),
        ("COPY (INSERT INTO t VALUES (1) RETURNING *) TO STDOUT", W, false),
        ("COPY (SELECT nextval('s')) TO STDOUT", W, false),
        // --- reads that write
        ("SELECT * FROM t FOR UPDATE", W, false),
        ("SELECT * FROM t FOR NO KEY UPDATE SKIP LOCKED", W, false),
        ("SELECT * FROM t FOR SHARE", W, false),
        ("SELECT * FROM t FOR KEY SHARE", W, false),
        ("SELECT * FROM (SELECT * FROM t FOR UPDATE) s", W, false),
        ("SELECT * FROM t WHERE id IN (SELECT id FROM u FOR UPDATE)", W, false),
        ("SELECT * INTO t2 FROM t", W, false),
        ("WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d", W, false),
        ("WITH a AS (SELECT 1), b AS (WITH c AS (INSERT INTO t VALUES (1) RETURNING id) SELECT * FROM c) SELECT * FROM b", W, false),
        ("WITH u AS (UPDATE t SET a = 1 RETURNING *) SELECT count(*) FROM u", W, false),
        ("SELECT * FROM t WHERE x IN (WITH m AS (DELETE FROM q RETURNING id) SELECT id FROM m)", W, false),
        ("EXPLAIN ANALYZE DELETE FROM t", W, false),
        ("EXPLAIN (ANALYZE, BUFFERS) INSERT INTO t VALUES (1)", W, false),
        ("EXPLAIN ANALYZE SELECT nextval('s')", W, false),
        // --- writing functions
        ("SELECT nextval('s')", W, false),
        ("SELECT setval('s', 10)", W, false),
        ("SELECT currval('s'), nextval('s')", W, false),
        ("SELECT pg_catalog.nextval('s')", W, false),
        ("SELECT NEXTVAL('s')", W, false),
        ("SELECT * FROM t WHERE id = nextval('s')", W, false),
        ("SELECT * FROM nextval('s')", W, false),
        ("SELECT (SELECT nextval('s'))", W, false),
        ("SELECT count(*) FILTER (WHERE nextval('s') > 0) FROM t", W, false),
        ("SELECT pg_advisory_lock(1)", W, true),
        ("SELECT pg_try_advisory_lock(1)", W, true),
        ("SELECT pg_advisory_lock_shared(1)", W, true),
        ("SELECT pg_advisory_unlock(1)", W, true),
        ("SELECT pg_advisory_xact_lock(1)", W, false),
        ("SELECT pg_try_advisory_xact_lock(1)", W, false),
        ("SELECT lo_create(0)", W, false),
        ("SELECT lo_import('/tmp/x')", W, false),
        ("SELECT lowrite(0, 'x')", W, false),
        ("SELECT pg_notify('c', 'p')", W, false),
        ("SELECT txid_current()", W, false),
        ("SELECT pg_current_xact_id()", W, false),
        ("SELECT set_config('work_mem', '1MB', false)", W, false),
        ("SELECT pg_terminate_backend(123)", W, false),
        ("SELECT pg_cancel_backend(123)", W, false),
        ("SELECT pg_switch_wal()", W, false),
        ("SELECT pg_create_physical_replication_slot('s')", W, false),
        ("SELECT pg_drop_replication_slot('s')", W, false),
        ("SELECT pg_reload_conf()", W, false),
        ("SELECT dblink_exec('c', 'DELETE FROM t')", W, false),
        ("SELECT my_unknown_function(1)", W, false),
        ("SELECT public.count(*) FROM t", W, false),
        // --- transaction control
        ("BEGIN", begin(false, None, false), false),
        ("BEGIN READ ONLY", begin(true, None, false), false),
        ("BEGIN READ WRITE", begin(false, None, false), false),
        ("START TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY", begin(true, Some("repeatable read"), false), false),
        ("BEGIN ISOLATION LEVEL SERIALIZABLE READ ONLY DEFERRABLE", begin(true, Some("serializable"), true), false),
        ("COMMIT", tx(TxControl::Commit), false),
        ("END", tx(TxControl::Commit), false),
        ("COMMIT AND CHAIN", tx(TxControl::Commit), false),
        ("ROLLBACK", tx(TxControl::Rollback), false),
        ("ABORT", tx(TxControl::Rollback), false),
        ("SAVEPOINT sp1", tx(TxControl::Savepoint), false),
        ("RELEASE SAVEPOINT sp1", tx(TxControl::Release), false),
        ("RELEASE sp1", tx(TxControl::Release), false),
        ("ROLLBACK TO SAVEPOINT sp1", tx(TxControl::RollbackTo), false),
        ("ROLLBACK TO sp1", tx(TxControl::RollbackTo), false),
        ("PREPARE TRANSACTION 'g1'", tx(TxControl::PrepareTransaction), false),
        ("COMMIT PREPARED 'g1'", tx(TxControl::CommitPrepared), false),
        ("ROLLBACK PREPARED 'g1'", tx(TxControl::RollbackPrepared), false),
        ("SET TRANSACTION READ ONLY", tx(TxControl::SetTransaction { read_only: true }), false),
        ("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", tx(TxControl::SetTransaction { read_only: false }), false),
        ("SET TRANSACTION READ WRITE", tx(TxControl::SetTransaction { read_only: false }), false),
        // --- session state
        ("SET search_path = app, public", set(false, "search_path", Some("'app', 'public'")), false),
        ("SET statement_timeout TO 5000", set(false, "statement_timeout", Some("5000")), false),
        ("SET LOCAL statement_timeout = '1s'", set(true, "statement_timeout", Some("'1s'")), false),
        ("SET SESSION work_mem = '64MB'", set(false, "work_mem", Some("'64MB'")), false),
        ("SET application_name = 'it''s'", set(false, "application_name", Some("'it''s'")), false),
        ("SET TIME ZONE 'UTC'", set(false, "timezone", Some("'UTC'")), false),
        ("SET NAMES 'UTF8'", set(false, "client_encoding", Some("'UTF8'")), false),
        ("SET random_page_cost = 1.5", set(false, "random_page_cost", Some("1.5")), false),
        ("SET work_mem TO DEFAULT", set(false, "work_mem", None), false),
        ("SET TIME ZONE INTERVAL '-08:00' HOUR TO MINUTE", set(false, "timezone", Some("INTERVAL '-08:00' HOUR TO MINUTE")), false),
        ("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY", set(false, "default_transaction_read_only", Some("on")), false),
        ("SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE", set(false, "default_transaction_isolation", Some("'serializable'")), false),
        ("RESET work_mem", ss(SessionKind::Reset { name: Some("work_mem".into()) }), false),
        ("RESET ALL", ss(SessionKind::Reset { name: None }), false),
        ("LISTEN chan", ss(SessionKind::Listen), true),
        ("UNLISTEN chan", ss(SessionKind::Unlisten), false),
        ("UNLISTEN *", ss(SessionKind::Unlisten), false),
        ("PREPARE p (int) AS SELECT $1", ss(SessionKind::Prepare), true),
        ("DEALLOCATE p", ss(SessionKind::Deallocate), false),
        ("DEALLOCATE ALL", ss(SessionKind::Deallocate), false),
        ("DECLARE c CURSOR FOR SELECT * FROM t", ss(SessionKind::Declare), false),
        ("DECLARE c CURSOR WITH HOLD FOR SELECT * FROM t", ss(SessionKind::DeclareWithHold), true),
        ("FETCH 10 FROM c", ss(SessionKind::Other), false),
        ("MOVE NEXT IN c", ss(SessionKind::Other), false),
        ("CLOSE c", ss(SessionKind::Other), false),
        ("DISCARD ALL", ss(SessionKind::Discard), false),
        ("DISCARD TEMP", ss(SessionKind::Discard), false),
        ("CREATE TEMP TABLE tt (id int)", ss(SessionKind::CreateTempTable), true),
        ("CREATE TEMPORARY TABLE tt (id int) ON COMMIT DROP", ss(SessionKind::CreateTempTable), true),
        ("CREATE TEMP TABLE tt AS SELECT 1", ss(SessionKind::CreateTempTable), true),
        ("SELECT * INTO TEMP tt FROM t", ss(SessionKind::CreateTempTable), true),
        ("CREATE TEMP VIEW tv AS SELECT 1", ss(SessionKind::CreateTempTable), true),
        ("SET CONSTRAINTS ALL DEFERRED", ss(SessionKind::Other), false),
        // --- tidemark commands
        ("SET tidemark.consistency = 'eventual'", Class::Tidemark(TidemarkCommand::Set { name: "consistency".into(), value: "eventual".into() }), false),
        ("SET tidemark.consistency TO eventual", Class::Tidemark(TidemarkCommand::Set { name: "consistency".into(), value: "eventual".into() }), false),
        ("set TIDEMARK.Consistency = 'bounded(200ms)'", Class::Tidemark(TidemarkCommand::Set { name: "consistency".into(), value: "bounded(200ms)".into() }), false),
        ("SET tidemark.report_lsn = on", Class::Tidemark(TidemarkCommand::Set { name: "report_lsn".into(), value: "on".into() }), false),
        ("SET tidemark.max_wait = 200", Class::Tidemark(TidemarkCommand::Set { name: "max_wait".into(), value: "200".into() }), false),
        ("RESET tidemark.consistency", Class::Tidemark(TidemarkCommand::Reset { name: "consistency".into() }), false),
        ("SET tidemark.consistency TO DEFAULT", Class::Tidemark(TidemarkCommand::Reset { name: "consistency".into() }), false),
        ("SHOW tidemark.commit_lsn", Class::Tidemark(TidemarkCommand::Show { name: "commit_lsn".into() }), false),
        ("SHOW \"tidemark.commit_lsn\"", Class::Tidemark(TidemarkCommand::Show { name: "commit_lsn".into() }), false),
        // --- multi-statement
        ("SELECT 1; SELECT 2", R, false),
        ("SELECT 1; INSERT INTO t VALUES (1)", W, false),
        ("BEGIN; INSERT INTO t VALUES (1); COMMIT", W, false),
        ("SELECT 1; SELEC 2", U, false),
        ("SELECT 1; EXECUTE p", U, false),
        ("SET work_mem = 1; SELECT 1", set(false, "work_mem", Some("1")), false),
        ("BEGIN; SELECT 1; COMMIT", begin(false, None, false), false),
        ("SHOW tidemark.commit_lsn; SELECT 1", U, false),
        ("SELECT 1; LISTEN c", ss(SessionKind::Listen), true),
        // --- unknown
        ("SELEC 1", U, false),
        ("SELECT 'unterminated", U, false),
        ("EXECUTE p(1)", U, false),
        ("\0SELECT 1", U, false),
    ]
}

#[test]
fn classification_table() {
    let c = Classifier::new(1000, FunctionPolicy::default());
    let mut failures = Vec::new();
    let rows = table();
    assert!(rows.len() >= 60);
    for (sql, class, pins) in &rows {
        let a = c.classify(sql);
        if &a.class != class || a.pins_session != *pins {
            failures.push(format!(
                "{sql:?}: got {:?} pins={} (statements {:?}), want {class:?} pins={pins}",
                a.class, a.pins_session, a.statements
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} rows failed:\n{}",
        failures.len(),
        rows.len(),
        failures.join("\n")
    );
}

#[test]
fn per_statement_classes_in_order() {
    let c = Classifier::new(10, FunctionPolicy::default());
    let a = c.classify("BEGIN; SELECT 1; UPDATE t SET a = 1; COMMIT");
    assert_eq!(
        a.statements,
        vec![begin(false, None, false), R, W, tx(TxControl::Commit)]
    );
    assert!(c.classify("").statements.is_empty());
    let bad = c.classify("SELEC 1");
    assert!(bad.statements.is_empty());
}

#[test]
fn catalog_volatility_decides_user_functions() {
    let c = Classifier::new(100, FunctionPolicy::default());
    let mut cat = FunctionCatalog::new();
    cat.insert("public", "touch_user", Volatility::Volatile);
    cat.insert("public", "user_name", Volatility::Stable);
    cat.insert("app", "pure", Volatility::Immutable);
    cat.insert("pg_catalog", "random", Volatility::Volatile);
    cat.insert("pg_catalog", "count", Volatility::Immutable);
    cat.insert("pg_catalog", "nextval", Volatility::Volatile);
    cat.insert("pg_catalog", "txid_current", Volatility::Stable);
    c.set_catalog(cat);
    let cases = [
        ("SELECT touch_user(1)", W),
        ("SELECT public.touch_user(1)", W),
        ("SELECT user_name(1)", R),
        ("SELECT app.pure(1), count(*) FROM t", R),
        ("SELECT random()", R),
        ("SELECT nextval('s')", W),
        // STABLE in pg_proc but assigns a transaction id: the built-in list wins.
        ("SELECT txid_current()", W),
        // Loaded catalog, function not in it: unknown function, write.
        ("SELECT lower('A')", W),
        ("SELECT other.user_name(1)", W),
        ("SELECT * FROM t WHERE x = (SELECT touch_user(1))", W),
        ("SELECT * FROM touch_user(1)", W),
    ];
    for (sql, want) in cases {
        assert_eq!(c.classify(sql).class, want, "{sql}");
    }
}

#[test]
fn policy_overrides_catalog() {
    let policy = FunctionPolicy {
        write_functions: vec!["billing.charge".into(), "audit_read".into()],
        read_only_functions: vec!["Report_Refresh".into(), "nextval".into()],
    };
    let c = Classifier::new(100, policy);
    let mut cat = FunctionCatalog::new();
    cat.insert("billing", "charge", Volatility::Stable);
    cat.insert("public", "audit_read", Volatility::Immutable);
    cat.insert("public", "report_refresh", Volatility::Volatile);
    c.set_catalog(cat);
    assert_eq!(c.classify("SELECT billing.charge(1)").class, W);
    assert_eq!(c.classify("SELECT audit_read()").class, W);
    assert_eq!(c.classify("SELECT report_refresh()").class, R);
    // The operator may even declare a built-in writer read-only.
    assert_eq!(c.classify("SELECT nextval('s')").class, R);
    // Policy applies without a catalog too.
    let c2 = Classifier::new(
        10,
        FunctionPolicy {
            write_functions: vec![],
            read_only_functions: vec!["my_read".into()],
        },
    );
    assert_eq!(c2.classify("SELECT my_read()").class, R);
    assert_eq!(c2.classify("SELECT my_other()").class, W);
}

#[test]
fn hints_come_with_the_analysis() {
    let c = Classifier::new(10, FunctionPolicy::default());
    let a = c.classify("/* tidemark: replica, key=user:42 */ SELECT * FROM t WHERE id = $1");
    assert_eq!(a.class, R);
    assert_eq!(a.hints.target, Some(tidemark_sql::HintTarget::Replica));
    assert_eq!(a.hints.key.as_deref(), Some("user:42"));
    let a = c.classify("/* tidemark: min_lsn=0/3000060 */ SELECT 1");
    assert_eq!(a.hints.min_lsn, Some(tidemark_core::Lsn(0x300_0060)));
    // Hints on unparsable text are still reported.
    let a = c.classify("/* tidemark: primary */ SELEC 1");
    assert_eq!(a.class, U);
    assert_eq!(a.hints.target, Some(tidemark_sql::HintTarget::Primary));
}

#[test]
fn deep_nesting_does_not_crash() {
    let c = Classifier::new(10, FunctionPolicy::default());
    for n in [10usize, 150, 1000, 20_000] {
        let sql = format!("SELECT {}1{}", "(".repeat(n), ")".repeat(n));
        let _ = c.classify(&sql);
        let sql = format!("SELECT {}", vec!["1"; n].join(" + "));
        let _ = c.classify(&sql);
        let sql = format!("SELECT {}1{}", "ARRAY[".repeat(n), "]".repeat(n));
        let _ = c.classify(&sql);
        let sql = format!("SELECT {} 1", "(SELECT".repeat(n.min(2000)));
        let _ = c.classify(&sql);
    }
}

#[test]
fn worst_case_inline_parse_fits_a_tokio_sized_stack() {
    // The deepest tree a text of INLINE_PARSE_LIMIT bytes can produce, parsed on the caller's
    // stack, on a thread with tokio's default worker stack of 2 MiB.
    let terms = (tidemark_sql::INLINE_PARSE_LIMIT - "SELECT ".len()) / 2;
    let sql = format!("SELECT {}", vec!["1"; terms + 1].join("+"));
    assert!(sql.len() <= tidemark_sql::INLINE_PARSE_LIMIT + 1);
    let sql = sql[..tidemark_sql::INLINE_PARSE_LIMIT].to_string();
    std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(move || {
            let c = Classifier::new(10, FunctionPolicy::default());
            let _ = c.classify(&sql);
        })
        .unwrap()
        .join()
        .unwrap();
}

#[test]
fn text_over_parse_limit_is_unknown_with_hints() {
    let c = Classifier::new(10, FunctionPolicy::default());
    let sql = format!(
        "/* tidemark: primary */ SELECT '{}'",
        "x".repeat(tidemark_sql::MAX_PARSE_TEXT)
    );
    let a = c.classify(&sql);
    assert_eq!(a.class, U);
    assert_eq!(a.hints.target, Some(tidemark_sql::HintTarget::Primary));
    // Just under the limit: parsed on a big-stack thread.
    let sql = format!("SELECT '{}'", "x".repeat(tidemark_sql::MAX_PARSE_TEXT - 20));
    assert_eq!(c.classify(&sql).class, R);
}

#[test]
fn deep_expression_is_never_read_when_undecidable() {
    let c = Classifier::new(10, FunctionPolicy::default());
    let sql = format!("SELECT {} + nextval('s')", vec!["1"; 500].join(" + "));
    assert_ne!(c.classify(&sql).class, R);
}
