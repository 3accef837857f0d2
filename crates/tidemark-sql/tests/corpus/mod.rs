//! The statement corpus shared by `classify.rs` (expected classes) and `real_server.rs` (the
//! same statements run on a real hot-standby replica): one [`Case`] per statement.
//!
//! Table names refer to the schema fixture in [`FIXTURE`], so that every statement PostgreSQL
//! accepts is also valid there.
#![allow(dead_code)]

use tidemark_sql::{Class, SessionKind, TidemarkCommand, TxControl};

pub const R: Class = Class::Read;
pub const W: Class = Class::Write;
pub const U: Class = Class::Unknown;

pub fn ss(k: SessionKind) -> Class {
    Class::SessionState(k)
}
pub fn tx(t: TxControl) -> Class {
    Class::Transaction(t)
}
pub fn begin(read_only: Option<bool>, isolation: Option<&str>, deferrable: bool) -> Class {
    tx(TxControl::Begin {
        read_only,
        isolation: isolation.map(str::to_string),
        deferrable,
    })
}
pub fn set(local: bool, name: &str, value: Option<&str>) -> Class {
    ss(SessionKind::Set {
        local,
        name: name.into(),
        value_sql: value.map(str::to_string),
    })
}

/// What the real-server check does with a case (see `real_server.rs`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Server {
    /// Checked by class: a `Read` must run on the replica, a `Write` must fail there as a write
    /// during recovery (SQLSTATE 25006, or a message about recovery / read-only / hot standby).
    Check,
    /// A `Write` the replica would run, routed to the primary anyway, for this reason (e.g.
    /// advisory locks coordinate clients, so they must all take them on the same server).
    PrimaryOnly(&'static str),
    /// PostgreSQL rejects the statement (beyond the grammar, which `Unknown` already covers);
    /// the classifier must still route it safely. The replica must fail it with some error.
    Rejected(&'static str),
}

/// One corpus statement.
#[derive(Clone, Debug)]
pub struct Case {
    pub sql: &'static str,
    pub class: Class,
    /// Expected `Analysis::pins_session`.
    pub pins: bool,
    pub server: Server,
}

impl Case {
    fn primary_only(mut self, reason: &'static str) -> Case {
        assert_eq!(self.class, W, "{}: only writes are primary-only", self.sql);
        self.server = Server::PrimaryOnly(reason);
        self
    }
    fn rejected(mut self, reason: &'static str) -> Case {
        self.server = Server::Rejected(reason);
        self
    }
}

fn c(sql: &'static str, class: Class, pins: bool) -> Case {
    Case {
        sql,
        class,
        pins,
        server: Server::Check,
    }
}

/// Created on the primary before the corpus runs on the replica: every object the corpus names.
pub const FIXTURE: &str = "
CREATE TABLE t (id int PRIMARY KEY, a int, b int, x int, y int, z int, s text);
CREATE UNIQUE INDEX i ON t (a);
INSERT INTO t SELECT g, g, g, g, g % 2, g, 's' || g FROM generate_series(1, 3) g;
CREATE TABLE u (id int, v int);
CREATE TABLE q (id int);
CREATE TABLE src (id int, a int);
CREATE TABLE users (id int PRIMARY KEY, name text);
CREATE TABLE orders (id int PRIMARY KEY, user_id int, total numeric);
CREATE SEQUENCE s;
CREATE MATERIALIZED VIEW mv AS SELECT count(*) AS n FROM t;
CREATE PROCEDURE p(n int) LANGUAGE sql AS $$ INSERT INTO q VALUES (n) $$;
-- Stand-ins for functions the classifier cannot know about: they write, as such functions may.
CREATE FUNCTION my_unknown_function(n int) RETURNS int LANGUAGE sql
    AS $$ INSERT INTO q VALUES (n) RETURNING id $$;
CREATE FUNCTION count_and_log(n bigint) RETURNS bigint LANGUAGE sql
    AS $$ INSERT INTO q VALUES (0); SELECT n + 1 $$;
CREATE AGGREGATE public.count(*) (SFUNC = count_and_log, STYPE = bigint, INITCOND = '0');
-- dblink_exec runs SQL somewhere else; this stand-in runs it locally (no dblink extension).
CREATE FUNCTION dblink_exec(conn text, cmd text) RETURNS text LANGUAGE plpgsql
    AS $$ BEGIN EXECUTE cmd; RETURN 'OK'; END $$;
CREATE ROLE bob;
SELECT lo_create(4242);
";

/// Reason for advisory locks.
const ADVISORY: &str =
    "advisory locks coordinate clients: all sessions must take them on one server, \
     the primary (a standby has its own lock table)";
/// Reason for functions acting on the server they run on.
const SERVER_CONTROL: &str =
    "server control: acts on the node it runs on (its backends, its configuration); meant for the primary";
/// Reason for replication slot management.
const SLOTS: &str =
    "replication slots are per node (a standby can hold physical slots for cascading); \
     clients manage the primary's";

/// The corpus.
pub fn corpus() -> Vec<Case> {
    vec![
        // --- reads
        c("SELECT 1", R, false),
        c("select * from users where id = $1", R, false),
        c("SELECT u.name, o.total FROM users u JOIN orders o ON o.user_id = u.id WHERE u.id = $1", R, false),
        c("VALUES (1, 'a'), (2, 'b')", R, false),
        c("TABLE users", R, false),
        c("SHOW search_path", R, false),
        c("SHOW ALL", R, false),
        c("EXPLAIN SELECT 1", R, false),
        c("EXPLAIN DELETE FROM t", R, false),
        c("EXPLAIN ANALYZE SELECT * FROM t", R, false),
        c("EXPLAIN (ANALYZE false) DELETE FROM t", R, false),
        c("COPY t TO STDOUT", R, false),
        c("COPY (SELECT * FROM t WHERE x > 1) TO STDOUT WITH (FORMAT csv)", R, false),
        c("SELECT count(*), max(x), string_agg(s, ',') FROM t GROUP BY y HAVING sum(z) > 1", R, false),
        c("SELECT random()", R, false),
        c("SELECT now(), lower('A'), coalesce(a, b), greatest(1, 2) FROM t", R, false),
        c("SELECT * FROM generate_series(1, 10)", R, false),
        c("SELECT row_number() OVER (PARTITION BY a ORDER BY b) FROM t", R, false),
        c("WITH x AS (SELECT 1 AS a) SELECT * FROM x", R, false),
        c("SELECT * FROM t WHERE id IN (SELECT id FROM u WHERE v = $1)", R, false),
        c("SELECT 1 UNION ALL SELECT 2", R, false),
        c("SELECT CASE WHEN a > 0 THEN 1 ELSE 2 END, a::text, b IS NULL FROM t", R, false),
        c("SELECT pg_sleep(0.1)", R, false),
        c("SELECT current_setting('work_mem'), version(), pg_backend_pid()", R, false),
        c("SELECT extract(year FROM now()), position('a' in 'abc'), substring('abc' from 2)", R, false),
        c("SELECT jsonb_build_object('a', 1), json_agg(t) FROM t", R, false),
        c("SELECT $1::int + $2", R, false),
        c("", R, false),
        c("  ;  ", R, false),
        c("-- just a comment", R, false),
        // --- writes: DML
        c("INSERT INTO t VALUES (1)", W, false),
        c("INSERT INTO t (a) VALUES ($1) ON CONFLICT (a) DO UPDATE SET a = excluded.a RETURNING id", W, false),
        c("UPDATE t SET a = 1 WHERE id = $1", W, false),
        c("DELETE FROM t WHERE id = 1", W, false),
        c("MERGE INTO t USING src s ON t.id = s.id WHEN MATCHED THEN UPDATE SET a = s.a WHEN NOT MATCHED THEN INSERT VALUES (s.id, s.a)", W, false),
        // --- writes: DDL and maintenance
        c("CREATE TABLE t (id int)", W, false),
        c("CREATE UNLOGGED TABLE t2 (id int)", W, false),
        c("ALTER TABLE t ADD COLUMN b int", W, false),
        c("DROP TABLE t", W, false),
        c("COMMENT ON TABLE t IS 'x'", W, false),
        c("GRANT SELECT ON t TO bob", W, false),
        c("REVOKE SELECT ON t FROM bob", W, false),
        c("CREATE INDEX CONCURRENTLY i ON t (a)", W, false),
        c("CREATE VIEW v AS SELECT 1", W, false),
        c("CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'SELECT 1'", W, false),
        c("CREATE TABLE t3 AS SELECT * FROM t", W, false),
        c("CREATE SEQUENCE s", W, false),
        c("TRUNCATE t", W, false),
        c("VACUUM t", W, false),
        c("ANALYZE t", W, false),
        c("CLUSTER t USING i", W, false),
        c("REINDEX TABLE t", W, false),
        c("LOCK TABLE t IN ACCESS EXCLUSIVE MODE", W, false),
        c("REFRESH MATERIALIZED VIEW mv", W, false),
        c("CALL p(1)", W, false),
        c("DO $$ BEGIN PERFORM 1; END $$", W, false)
            .primary_only("a DO body is not analysed and may write (as the DO $do$ row does)"),
        c("CHECKPOINT", W, false)
            .primary_only("server control: checkpoints the node it runs on (a restartpoint on a standby); meant for the primary"),
        c("NOTIFY chan, 'payload'", W, false),
        c("ALTER SYSTEM SET work_mem = '64MB'", W, false)
            .primary_only("writes the postgresql.auto.conf of the node it runs on (no WAL); meant for the primary"),
        c("CREATE DATABASE d", W, false),
        // --- COPY
        c("COPY t FROM STDIN", W, false),
        c("COPY t (a, b) FROM STDIN WITH (FORMAT csv)", W, false),
        c("COPY t TO '/dev/null'", W, false)
            .primary_only("writes a file on the server host; meant for the primary's"),
        c("COPY (INSERT INTO t VALUES (1) RETURNING *) TO STDOUT", W, false),
        c("COPY (SELECT nextval('s')) TO STDOUT", W, false),
        // --- reads that write
        c("SELECT * FROM t FOR UPDATE", W, false),
        c("SELECT * FROM t FOR NO KEY UPDATE SKIP LOCKED", W, false),
        c("SELECT * FROM t FOR SHARE", W, false),
        c("SELECT * FROM t FOR KEY SHARE", W, false),
        c("SELECT * FROM (SELECT * FROM t FOR UPDATE) s", W, false),
        c("SELECT * FROM t WHERE id IN (SELECT id FROM u FOR UPDATE)", W, false),
        c("SELECT * INTO t2 FROM t", W, false),
        c("WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d", W, false),
        c("WITH a AS (SELECT 1), b AS (WITH c AS (INSERT INTO t VALUES (1) RETURNING id) SELECT * FROM c) SELECT * FROM b", W, false)
            .rejected("a data-modifying WITH must be at the top level (0A000)"),
        c("WITH u AS (UPDATE t SET a = 1 RETURNING *) SELECT count(*) FROM u", W, false),
        c("SELECT * FROM t WHERE x IN (WITH m AS (DELETE FROM q RETURNING id) SELECT id FROM m)", W, false)
            .rejected("a data-modifying WITH must be at the top level (0A000)"),
        c("EXPLAIN ANALYZE DELETE FROM t", W, false),
        c("EXPLAIN (ANALYZE, BUFFERS) INSERT INTO t VALUES (1)", W, false),
        c("EXPLAIN ANALYZE SELECT nextval('s')", W, false),
        // --- writing functions
        c("SELECT nextval('s')", W, false),
        c("SELECT setval('s', 10)", W, false),
        c("SELECT nextval('s'), currval('s')", W, false),
        c("SELECT pg_catalog.nextval('s')", W, false),
        c("SELECT NEXTVAL('s')", W, false),
        c("SELECT * FROM t WHERE id = nextval('s')", W, false),
        c("SELECT * FROM nextval('s')", W, false),
        c("SELECT (SELECT nextval('s'))", W, false),
        c("SELECT count(*) FILTER (WHERE nextval('s') > 0) FROM t", W, false),
        c("SELECT pg_advisory_lock(1)", W, true)
            .primary_only(ADVISORY),
        c("SELECT pg_try_advisory_lock(1)", W, true)
            .primary_only(ADVISORY),
        c("SELECT pg_advisory_lock_shared(1)", W, true)
            .primary_only(ADVISORY),
        c("SELECT pg_advisory_unlock(1)", W, true)
            .primary_only(ADVISORY),
        c("SELECT pg_advisory_xact_lock(1)", W, false)
            .primary_only(ADVISORY),
        c("SELECT pg_try_advisory_xact_lock(1)", W, false)
            .primary_only(ADVISORY),
        c("SELECT lo_create(0)", W, false),
        c("SELECT lo_import('/dev/null')", W, false),
        c("SELECT lowrite(lo_open(4242, 131072), 'x')", W, false),
        c("SELECT pg_notify('c', 'p')", W, false),
        c("SELECT txid_current()", W, false),
        c("SELECT pg_current_xact_id()", W, false),
        c("SELECT set_config('work_mem', '1MB', false)", W, true)
            .primary_only("changes a session setting from inside a query, where the proxy cannot replay it: the session is pinned to its connection"),
        c("SELECT pg_catalog.set_config('work_mem', '2MB', $1)", W, true)
            .primary_only("is_local not a literal: pinned"),
        c("SELECT set_config('work_mem', '1MB', true)", W, false)
            .primary_only("transaction-local setting: gone when the transaction ends, no pin"),
        c("SELECT set_config('work_mem', '1MB', 'on'::boolean)", W, false)
            .primary_only("transaction-local setting: gone when the transaction ends, no pin"),
        c("SELECT pg_terminate_backend(123)", W, false)
            .primary_only(SERVER_CONTROL),
        c("SELECT pg_cancel_backend(123)", W, false)
            .primary_only(SERVER_CONTROL),
        c("SELECT pg_switch_wal()", W, false),
        c("SELECT pg_create_physical_replication_slot('s')", W, false)
            .primary_only(SLOTS),
        c("SELECT pg_drop_replication_slot('s')", W, false)
            .primary_only(SLOTS),
        c("SELECT pg_reload_conf()", W, false)
            .primary_only(SERVER_CONTROL),
        c("SELECT dblink_exec('c', 'DELETE FROM t')", W, false),
        c("SELECT my_unknown_function(1)", W, false),
        c("SELECT public.count(*) FROM t", W, false),
        // --- server functions: which work on a hot standby
        c("SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn(), pg_last_wal_receive_lsn(), pg_last_xact_replay_timestamp()", R, false),
        c("SELECT txid_current_snapshot(), pg_current_snapshot(), txid_current_if_assigned(), pg_current_xact_id_if_assigned()", R, false),
        c("SELECT pg_is_wal_replay_paused(), pg_get_wal_replay_pause_state()", R, false),
        c("SELECT count(*) FROM pg_stat_activity", R, false),
        c("SELECT pid, state FROM pg_stat_get_activity(NULL)", R, false),
        c("SELECT pg_stat_clear_snapshot(), pg_stat_force_next_flush()", R, false),
        c("SELECT pg_ls_dir('.'), pg_stat_file('PG_VERSION'), pg_read_file('PG_VERSION')", R, false),
        c("SELECT * FROM pg_ls_waldir() UNION ALL SELECT * FROM pg_ls_tmpdir() UNION ALL SELECT * FROM pg_ls_archive_statusdir()", R, false),
        c("SELECT count(*) FROM pg_get_keywords()", R, false),
        c("SELECT count(*) FROM pg_lock_status()", R, false),
        c("SELECT pg_blocking_pids(pg_backend_pid()), pg_safe_snapshot_blocking_pids(pg_backend_pid())", R, false),
        c("SELECT pg_postmaster_start_time(), pg_conf_load_time(), inet_client_addr(), inet_client_port(), inet_server_addr(), inet_server_port(), pg_trigger_depth()", R, false),
        c("SELECT * FROM pg_tablespace_databases(1663)", R, false),
        c("SELECT * FROM pg_stat_get_wal_receiver()", R, false),
        c("SELECT count(*) FROM pg_stat_get_wal_senders()", R, false),
        c("SELECT count(*) FROM pg_get_replication_slots()", R, false),
        c("SELECT count(*) FROM pg_show_all_settings()", R, false),
        c("SELECT count(*) FROM pg_get_backend_memory_contexts()", R, false),
        c("SELECT gen_random_uuid(), clock_timestamp(), statement_timestamp(), timeofday()", R, false),
        c("SELECT pg_size_pretty(pg_database_size(current_database())), pg_relation_size('t'), pg_total_relation_size('t')", R, false),
        c("SELECT pg_get_viewdef('mv'::regclass), pg_get_serial_sequence('t', 'id'), has_table_privilege('t', 'SELECT'), to_regclass('t')", R, false),
        c("SELECT to_tsvector('english', s) @@ to_tsquery('english', 'x') FROM t", R, false),
        c("SELECT CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() END", R, false),
        // Primary-only: they fail during recovery ("recovery is in progress").
        c("SELECT pg_current_wal_lsn()", W, false),
        c("SELECT pg_current_wal_insert_lsn(), pg_current_wal_flush_lsn()", W, false),
        c("SELECT pg_walfile_name(pg_last_wal_replay_lsn())", W, false),
        c("SELECT * FROM pg_walfile_name_offset(pg_last_wal_replay_lsn())", W, false),
        c("SELECT pg_create_restore_point('r')", W, false),
        // --- transaction control
        c("BEGIN", begin(None, None, false), false),
        c("BEGIN READ ONLY", begin(Some(true), None, false), false),
        c("BEGIN READ WRITE", begin(Some(false), None, false), false),
        c("START TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY", begin(Some(true), Some("repeatable read"), false), false),
        c("BEGIN ISOLATION LEVEL SERIALIZABLE READ ONLY DEFERRABLE", begin(Some(true), Some("serializable"), true), false),
        c("COMMIT", tx(TxControl::Commit), false),
        c("END", tx(TxControl::Commit), false),
        c("COMMIT AND CHAIN", tx(TxControl::Commit), false),
        c("ROLLBACK", tx(TxControl::Rollback), false),
        c("ABORT", tx(TxControl::Rollback), false),
        c("SAVEPOINT sp1", tx(TxControl::Savepoint), false),
        c("RELEASE SAVEPOINT sp1", tx(TxControl::Release), false),
        c("RELEASE sp1", tx(TxControl::Release), false),
        c("ROLLBACK TO SAVEPOINT sp1", tx(TxControl::RollbackTo), false),
        c("ROLLBACK TO sp1", tx(TxControl::RollbackTo), false),
        c("PREPARE TRANSACTION 'g1'", tx(TxControl::PrepareTransaction), false),
        c("COMMIT PREPARED 'g1'", tx(TxControl::CommitPrepared), false),
        c("ROLLBACK PREPARED 'g1'", tx(TxControl::RollbackPrepared), false),
        c("SET TRANSACTION READ ONLY", tx(TxControl::SetTransaction { read_only: true }), false),
        c("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", tx(TxControl::SetTransaction { read_only: false }), false),
        c("SET TRANSACTION READ WRITE", tx(TxControl::SetTransaction { read_only: false }), false),
        // --- session state
        c("SET search_path = app, public", set(false, "search_path", Some("'app', 'public'")), false),
        c("SET statement_timeout TO 5000", set(false, "statement_timeout", Some("5000")), false),
        c("SET LOCAL statement_timeout = '1s'", set(true, "statement_timeout", Some("'1s'")), false),
        c("SET SESSION work_mem = '64MB'", set(false, "work_mem", Some("'64MB'")), false),
        c("SET application_name = 'it''s'", set(false, "application_name", Some("'it''s'")), false),
        c("SET TIME ZONE 'UTC'", set(false, "timezone", Some("'UTC'")), false),
        c("SET NAMES 'UTF8'", set(false, "client_encoding", Some("'UTF8'")), false),
        c("SET random_page_cost = 1.5", set(false, "random_page_cost", Some("1.5")), false),
        c("SET work_mem TO DEFAULT", set(false, "work_mem", None), false),
        c("SET TIME ZONE INTERVAL '-08:00' HOUR TO MINUTE", set(false, "timezone", Some("INTERVAL '-08:00' HOUR TO MINUTE")), false),
        c("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY", set(false, "default_transaction_read_only", Some("on")), false),
        c("SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE", set(false, "default_transaction_isolation", Some("'serializable'")), false),
        c("RESET work_mem", ss(SessionKind::Reset { name: Some("work_mem".into()) }), false),
        c("RESET ALL", ss(SessionKind::Reset { name: None }), false),
        c("LISTEN chan", ss(SessionKind::Listen), true),
        c("UNLISTEN chan", ss(SessionKind::Unlisten), false),
        c("UNLISTEN *", ss(SessionKind::Unlisten), false),
        c("PREPARE p (int) AS SELECT $1", ss(SessionKind::Prepare), true),
        c("DEALLOCATE p", ss(SessionKind::Deallocate { name: Some("p".into()) }), false),
        c("DEALLOCATE ALL", ss(SessionKind::Deallocate { name: None }), false),
        c("DECLARE c CURSOR FOR SELECT * FROM t", ss(SessionKind::Declare), false),
        c("DECLARE c CURSOR WITH HOLD FOR SELECT * FROM t", ss(SessionKind::DeclareWithHold), true),
        c("FETCH 10 FROM c", ss(SessionKind::Other), false),
        c("MOVE NEXT IN c", ss(SessionKind::Other), false),
        c("CLOSE c", ss(SessionKind::Other), false),
        c("DISCARD ALL", ss(SessionKind::Discard { all: true }), false),
        c("DISCARD TEMP", ss(SessionKind::Discard { all: false }), false),
        c("CREATE TEMP TABLE tt (id int)", ss(SessionKind::CreateTempTable), true),
        c("CREATE TEMPORARY TABLE tt (id int) ON COMMIT DROP", ss(SessionKind::CreateTempTable), true),
        c("CREATE TEMP TABLE tt AS SELECT 1", ss(SessionKind::CreateTempTable), true),
        c("SELECT * INTO TEMP tt FROM t", ss(SessionKind::CreateTempTable), true),
        c("CREATE TEMP VIEW tv AS SELECT 1", ss(SessionKind::CreateTempTable), true),
        c("SET CONSTRAINTS ALL DEFERRED", ss(SessionKind::Other), false),
        // --- tidemark commands
        c("SET tidemark.consistency = 'eventual'", Class::Tidemark(TidemarkCommand::Set { name: "consistency".into(), value: "eventual".into() }), false),
        c("SET tidemark.consistency TO eventual", Class::Tidemark(TidemarkCommand::Set { name: "consistency".into(), value: "eventual".into() }), false),
        c("set TIDEMARK.Consistency = 'bounded(200ms)'", Class::Tidemark(TidemarkCommand::Set { name: "consistency".into(), value: "bounded(200ms)".into() }), false),
        c("SET tidemark.report_lsn = on", Class::Tidemark(TidemarkCommand::Set { name: "report_lsn".into(), value: "on".into() }), false),
        c("SET tidemark.max_wait = 200", Class::Tidemark(TidemarkCommand::Set { name: "max_wait".into(), value: "200".into() }), false),
        c("RESET tidemark.consistency", Class::Tidemark(TidemarkCommand::Reset { name: "consistency".into() }), false),
        c("SET tidemark.consistency TO DEFAULT", Class::Tidemark(TidemarkCommand::Reset { name: "consistency".into() }), false),
        c("SHOW tidemark.commit_lsn", Class::Tidemark(TidemarkCommand::Show { name: "commit_lsn".into() }), false),
        c("SHOW \"tidemark.commit_lsn\"", Class::Tidemark(TidemarkCommand::Show { name: "commit_lsn".into() }), false),
        // --- comments
        c("/* DELETE FROM t */ SELECT * FROM t", R, false),
        c("SELECT * FROM t -- FOR UPDATE", R, false),
        c("SELECT /* ; INSERT INTO t VALUES (1); */ 1", R, false),
        c("/* outer /* nested; DELETE FROM t */ still a comment */ SELECT 1", R, false),
        c("SELECT * FROM t\n-- WHERE id = 1; DROP TABLE t\n", R, false),
        c("-- leading comment\nDELETE FROM t WHERE id = 1", W, false),
        c("SELECT 1 /* trailing */; /* x */ UPDATE t SET a = a WHERE id = 0", W, false),
        c("/* tidemark: replica */ INSERT INTO q VALUES (1)", W, false),
        c("SELECT 1 -- ; SELECT nextval('s')\n, 2", R, false),
        c("SELECT * FROM t /* unterminated", U, false),
        // --- dollar quoting and string constants
        c("SELECT $$DELETE FROM t$$", R, false),
        c("SELECT $q$ it's; DROP TABLE t; $q$ AS s", R, false),
        c("SELECT length($x$a'b$x$) FROM t", R, false),
        c("SELECT 'nextval(''s'')', 'FOR UPDATE'", R, false),
        c("SELECT E'\\'; DELETE FROM t; --'", R, false),
        c("SELECT '\\'; DELETE FROM q WHERE id = 0; --'", W, false),
        c("SELECT $a$ $$ nested $$ $a$, nextval('s')", W, false),
        c("CREATE FUNCTION f2() RETURNS int LANGUAGE plpgsql AS $body$ BEGIN RETURN 1; END $body$", W, false),
        c("DO $do$ BEGIN INSERT INTO q VALUES (1); END $do$", W, false),
        c("SELECT $$unterminated", U, false),
        // --- case variations
        c("sElEcT * fRoM t fOr UpDaTe", W, false),
        c("insert into T values (9)", W, false),
        c("Select NextVal('S')", W, false),
        c("explain analyze delete from t", W, false),
        c("with d as (delete from q returning id) select * from d", W, false),
        c("copy t from stdin", W, false),
        c("SELECT * FROM \"t\" WHERE \"id\" = 1", R, false),
        c("TaBlE users", R, false),
        c("Begin Read Only", begin(Some(true), None, false), false),
        // --- accepted by the grammar, rejected by PostgreSQL's analysis
        c("SELECT * FROM no_such_table", R, false).rejected("relation does not exist (42P01)"),
        c("SELECT no_such_column FROM t", R, false).rejected("column does not exist (42703)"),
        c("INSERT INTO t VALUES ('not a number')", W, false)
            .rejected("invalid input syntax for type integer (22P02), raised before the read-only check"),
        // --- multi-statement
        c("SELECT 1; SELECT 2", R, false),
        c("SELECT 1; INSERT INTO t VALUES (1)", W, false),
        c("BEGIN; INSERT INTO t VALUES (1); COMMIT", W, false),
        c("SELECT 1; SELEC 2", U, false),
        c("SELECT 1; EXECUTE p", U, false),
        c("SET work_mem = 1; SELECT 1", set(false, "work_mem", Some("1")), false),
        c("BEGIN; SELECT 1; COMMIT", begin(None, None, false), false),
        c("SHOW tidemark.commit_lsn; SELECT 1", U, false),
        c("SELECT 1; LISTEN c", ss(SessionKind::Listen), true),
        // --- unknown: rejected by the grammar
        c("SELECT * FROM", U, false),
        c("INSERT t VALUES (1)", U, false),
        c("UPDATE t SET", U, false),
        c("delete t where id = 1", U, false),
        c("SELECT 1 +", U, false),
        c("CREATE TABLE (id int)", U, false),
        c("DROP", U, false),
        c("SELECT * FROM t WHERE", U, false),
        c("SELEC 1", U, false),
        c("SELECT 'unterminated", U, false),
        c("EXECUTE p(1)", U, false),
        c("\0SELECT 1", U, false),
    ]
}
