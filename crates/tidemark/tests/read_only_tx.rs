//! Declared read-only transactions on a real primary + a replica delayed 200 ms: every form of
//! "this transaction is read-only" (`BEGIN READ ONLY`, `SET SESSION CHARACTERISTICS AS
//! TRANSACTION READ ONLY`, `default_transaction_read_only` by `SET` or startup option) runs on
//! the replica once it has caught up, is gated like any read (a writer's own transaction
//! right after its write never reads stale rows), and `SERIALIZABLE` transactions — which a
//! hot standby refuses — run on the primary.

mod common;

use std::time::Duration;

use common::*;
use tidemark::config::WaitMode;
use tokio_postgres::Client;

const DELAY: Duration = Duration::from_millis(200);

/// The port of the server the open transaction on `c` runs on.
async fn tx_port(c: &Client) -> u16 {
    served_by(c)
        .await
        .expect("inet_server_port() in the transaction")
}

/// Starts a transaction with `begin`, reports where it ran, commits.
async fn where_tx_runs(c: &Client, begin: &str) -> u16 {
    exec(c, begin).await;
    let port = tx_port(c).await;
    exec(c, "COMMIT").await;
    port
}

/// Writes row `i` on `c`, then at once reads it back in a transaction started by `begin`:
/// true when the transaction saw the row.
async fn write_then_read_in_tx(c: &Client, begin: &str, i: i32) -> bool {
    // READ WRITE: the session's transactions may be read-only by default.
    exec(
        c,
        &format!("BEGIN READ WRITE; INSERT INTO rotx VALUES ({i}); COMMIT"),
    )
    .await;
    exec(c, begin).await;
    let n = scalar(c, &format!("SELECT count(*) FROM rotx WHERE id = {i}")).await;
    exec(c, "COMMIT").await;
    n == "1"
}

/// A session prepared by `setup` whose `begin` starts a read-only transaction: it runs on the
/// replica when the replica has caught up, and never reads stale rows right after its own
/// writes (20 write-then-read rounds).
async fn check_replica_form(env: &Env, client: &Client, setup: &[&str], begin: &str, base: i32) {
    for s in setup {
        exec(client, s).await;
    }
    let replica = env.cluster.port(1);
    let cluster = &env.cluster;
    let mut stale = 0;
    for i in base..base + 20 {
        if !write_then_read_in_tx(client, begin, i).await {
            stale += 1;
        }
    }
    assert_eq!(
        stale, 0,
        "{setup:?} + {begin}: stale reads after own writes"
    );
    tokio::task::block_in_place(|| wait_all_replayed(cluster));
    wait_view_caught_up(&env.proxy).await;
    // The replica has everything this session depends on: the transaction goes there.
    let mut on_replica = 0;
    for _ in 0..10 {
        if where_tx_runs(client, begin).await == replica {
            on_replica += 1;
        }
    }
    assert_eq!(
        on_replica, 10,
        "{setup:?} + {begin}: a declared read-only transaction runs on the caught-up replica"
    );
}

async fn setup() -> Env {
    // Placement after the session's own write is asserted: a replica that has not replayed
    // it at the first check is polled for up to max_wait (routing.wait = fixed), not read
    // around at once; the adaptive policy is tested in adaptive_wait.rs.
    let env = start(&[Some(DELAY)], |c| {
        trust_user(c, "ser");
        c.routing.wait = WaitMode::Fixed;
    })
    .await;
    let c = env.client().await;
    exec(&c, "CREATE TABLE rotx (id int PRIMARY KEY)").await;
    tokio::task::block_in_place(|| wait_all_replayed(&env.cluster));
    env
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_declared_read_only_form_runs_on_a_replica_and_reads_its_writes() {
    let env = setup().await;
    let c = env.client().await;
    // What already worked: the access mode written in the BEGIN.
    check_replica_form(&env, &c, &[], "BEGIN READ ONLY", 0).await;
    check_replica_form(
        &env,
        &c,
        &[],
        "START TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY",
        100,
    )
    .await;

    // SET SESSION CHARACTERISTICS, then a plain BEGIN.
    let c = env.client().await;
    check_replica_form(
        &env,
        &c,
        &["SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY"],
        "BEGIN",
        200,
    )
    .await;
    // Several characteristics at once (REPEATABLE READ works on a standby).
    let c = env.client().await;
    check_replica_form(
        &env,
        &c,
        &["SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY"],
        "START TRANSACTION",
        300,
    )
    .await;
    assert_eq!(
        scalar(&c, "SHOW default_transaction_isolation").await,
        "repeatable read"
    );

    // default_transaction_read_only by SET.
    let c = env.client().await;
    check_replica_form(
        &env,
        &c,
        &["SET default_transaction_read_only = on"],
        "BEGIN",
        400,
    )
    .await;

    // default_transaction_read_only by a startup option.
    let dsn = format!(
        "{} options='-c default_transaction_read_only=on'",
        env.proxy_dsn()
    );
    let s = connect(&dsn).await;
    assert_eq!(scalar(&s, "SHOW default_transaction_read_only").await, "on");
    check_replica_form(&env, &s, &[], "BEGIN", 500).await;

    // A SET inside a transaction counts once committed, not when rolled back.
    let c = env.client().await;
    exec(&c, "BEGIN").await;
    exec(&c, "SET default_transaction_read_only = on").await;
    exec(&c, "ROLLBACK").await;
    let primary = env.cluster.port(0);
    assert_eq!(where_tx_runs(&c, "BEGIN").await, primary);
    exec(&c, "BEGIN").await;
    exec(&c, "SET default_transaction_read_only = on").await;
    exec(&c, "COMMIT").await;
    assert_eq!(where_tx_runs(&c, "BEGIN").await, env.cluster.port(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_write_and_serializable_transactions_stay_on_the_primary() {
    let env = setup().await;
    let primary = env.cluster.port(0);
    let replica = env.cluster.port(1);

    // READ WRITE written in the BEGIN beats the session default; RESET ends the default.
    let c = env.client().await;
    exec(&c, "SET default_transaction_read_only = on").await;
    assert_eq!(where_tx_runs(&c, "BEGIN READ WRITE").await, primary);
    exec(&c, "BEGIN READ WRITE").await;
    exec(&c, "INSERT INTO rotx VALUES (-1)").await;
    exec(&c, "COMMIT").await;
    exec(&c, "RESET default_transaction_read_only").await;
    assert_eq!(where_tx_runs(&c, "BEGIN").await, primary);

    // SERIALIZABLE READ ONLY runs — on the primary (a hot standby refuses it).
    let c = env.client().await;
    for begin in [
        "BEGIN ISOLATION LEVEL SERIALIZABLE READ ONLY",
        "BEGIN ISOLATION LEVEL SERIALIZABLE READ ONLY DEFERRABLE",
        "START TRANSACTION READ ONLY, ISOLATION LEVEL SERIALIZABLE",
    ] {
        exec(&c, begin).await;
        assert_eq!(tx_port(&c).await, primary, "{begin}");
        assert_eq!(
            scalar(&c, "SHOW transaction_isolation").await,
            "serializable"
        );
        scalar(&c, "SELECT count(*) FROM rotx").await;
        exec(&c, "COMMIT").await;
    }
    // REPEATABLE READ READ ONLY runs on the replica.
    assert_eq!(
        where_tx_runs(&c, "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY").await,
        replica
    );

    // SERIALIZABLE as the session default, by SET or SET SESSION CHARACTERISTICS: read-only
    // transactions and plain reads run on the primary, and work.
    for setup in [
        vec![
            "SET default_transaction_isolation = 'serializable'",
            "SET default_transaction_read_only = on",
        ],
        vec!["SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ ONLY"],
        vec![
            "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE",
            "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
        ],
    ] {
        let c = env.client().await;
        for s in &setup {
            exec(&c, s).await;
        }
        for begin in ["BEGIN", "BEGIN READ ONLY"] {
            exec(&c, begin).await;
            assert_eq!(tx_port(&c).await, primary, "{setup:?} + {begin}");
            assert_eq!(
                scalar(&c, "SHOW transaction_isolation").await,
                "serializable"
            );
            assert_eq!(scalar(&c, "SHOW transaction_read_only").await, "on");
            scalar(&c, "SELECT count(*) FROM rotx").await;
            exec(&c, "COMMIT").await;
        }
        for _ in 0..5 {
            assert_eq!(
                served_by(&c).await.unwrap(),
                primary,
                "{setup:?}: a plain read"
            );
        }
        // An explicit REPEATABLE READ still goes to the replica.
        assert_eq!(
            where_tx_runs(&c, "BEGIN ISOLATION LEVEL REPEATABLE READ").await,
            replica,
            "{setup:?}"
        );
        // Back to the default: reads use the replica again.
        exec(&c, "RESET default_transaction_isolation").await;
        assert_eq!(
            served_by(&c).await.unwrap(),
            replica,
            "{setup:?}: after RESET"
        );
    }

    // A serializable default tidemark cannot see (set on the role): a read the replica
    // refuses is retried on the primary, the client sees its answer.
    let admin = env.client().await;
    exec(&admin, "CREATE ROLE ser LOGIN SUPERUSER PASSWORD 'pw'").await;
    exec(
        &admin,
        "ALTER ROLE ser SET default_transaction_isolation = 'serializable'",
    )
    .await;
    tokio::task::block_in_place(|| wait_all_replayed(&env.cluster));
    let (s, conn) =
        tokio_postgres::connect(&proxy_dsn_of(&env.proxy, "ser"), tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("login as ser: {:?}", e.as_db_error()));
    tokio::spawn(conn);
    for _ in 0..5 {
        assert_eq!(
            scalar(&s, "SHOW transaction_isolation").await,
            "serializable"
        );
        let msgs = s
            .simple_query("SELECT inet_server_port(), count(*) FROM rotx")
            .await
            .expect("a serializable read through tidemark works");
        assert_eq!(
            rows(&msgs)[0][0].as_deref(),
            Some(primary.to_string().as_str())
        );
        // And a declared read-only transaction: its first statement, refused by the replica,
        // runs on the primary with the transaction begun anew there.
        exec(&s, "BEGIN READ ONLY").await;
        let msgs = s
            .simple_query("SELECT inet_server_port(), count(*) FROM rotx")
            .await
            .expect("a serializable read-only transaction through tidemark works");
        assert_eq!(
            rows(&msgs)[0][0].as_deref(),
            Some(primary.to_string().as_str())
        );
        assert_eq!(scalar(&s, "SHOW transaction_read_only").await, "on");
        exec(&s, "COMMIT").await;
    }

    // `SET TRANSACTION READ WRITE` first in a transaction that is read-only by default: the
    // transaction is placed with its first statement, which is no read: on the primary,
    // which allows it, as directly.
    let c = env.client().await;
    exec(&c, "SET default_transaction_read_only = on").await;
    exec(&c, "BEGIN").await;
    exec(&c, "SET TRANSACTION READ WRITE").await;
    exec(&c, "INSERT INTO rotx VALUES (-2)").await;
    assert_eq!(tx_port(&c).await, primary);
    exec(&c, "COMMIT").await;
}

/// A transaction's first statement reads a table another connection created a moment ago,
/// which the replica (200 ms behind) has not replayed: PostgreSQL's answer is the table's
/// rows, not 42P01. The transaction's BEGIN is deferred to its first statement, so that
/// statement, answered "does not exist" by the replica, runs again — the transaction begun
/// anew — on the primary, unseen (as a plain read outside a transaction is). In every mode
/// and form that puts a transaction on a replica; once the replica has the table, the
/// transactions run there again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_reading_a_table_the_replica_lacks_yet_reads_it_on_the_primary() {
    use tidemark::config::TxMode;
    for mode in [TxMode::ReadOnly, TxMode::Optimistic] {
        let env = start(&[Some(DELAY)], |c| {
            c.routing.wait = WaitMode::Fixed;
            c.routing.transactions = mode;
        })
        .await;
        let creator = env.client().await;
        let reader = env.client().await;
        let begins: &[&str] = match mode {
            TxMode::Optimistic => &[
                "BEGIN",
                "BEGIN READ ONLY",
                "START TRANSACTION ISOLATION LEVEL REPEATABLE READ",
            ],
            _ => &[
                "BEGIN READ ONLY",
                "START TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY",
            ],
        };
        for (i, begin) in begins.iter().enumerate() {
            let t = format!("fresh_{i}");
            exec(
                &creator,
                &format!("CREATE TABLE {t} (id int); INSERT INTO {t} VALUES (1)"),
            )
            .await;
            exec(&reader, begin).await;
            let n = reader
                .simple_query(&format!("SELECT count(*) FROM {t}"))
                .await
                .map(|m| rows(&m)[0][0].clone());
            assert_eq!(
                n.as_ref().map_err(|e| e.to_string()),
                Ok(&Some("1".to_string())),
                "{mode:?}, {begin}: the transaction's first read"
            );
            // The transaction goes on where it began anew, with its options.
            let iso = scalar(&reader, "SHOW transaction_isolation").await;
            let want = if begin.contains("REPEATABLE") {
                "repeatable read"
            } else {
                "read committed"
            };
            assert_eq!(iso, want, "{mode:?}, {begin}");
            let ro = scalar(&reader, "SHOW transaction_read_only").await;
            let want_ro = if begin.contains("READ ONLY") {
                "on"
            } else {
                "off"
            };
            assert_eq!(ro, want_ro, "{mode:?}, {begin}");
            exec(&reader, "COMMIT").await;
        }
        tokio::task::block_in_place(|| wait_all_replayed(&env.cluster));
        wait_view_caught_up(&env.proxy).await;
        for begin in begins {
            assert_eq!(
                where_tx_runs(&reader, begin).await,
                env.cluster.port(1),
                "{mode:?}, {begin}: on the replica once it has the table"
            );
        }
    }
}
