//! Issue 20: read-your-writes across an application's connection pool, with no application
//! code — the `causal` consistency level (every write this instance acknowledged before a read
//! arrived is visible to it) and keys carried in sqlcommenter comments. Each check has a
//! control showing the same workload *is* stale without the mechanism, so the checks can fail.

mod common;

use std::time::Duration;

use common::*;
use tokio_postgres::Client;

/// The replica's apply delay: a read it serves right after a write never sees that write.
const DELAY: Duration = Duration::from_millis(200);

/// `SELECT count(*), pg_is_in_recovery() FROM {table} WHERE id = {id}` with `prefix` before and
/// `suffix` after. Returns (row found, served by a replica).
async fn read_back(c: &Client, prefix: &str, table: &str, id: i64, suffix: &str) -> (bool, bool) {
    let sql = format!(
        "{prefix}SELECT count(*), pg_is_in_recovery() FROM {table} WHERE id = {id}{suffix}"
    );
    found_where(c, &sql).await
}

async fn pool(env: &Env, n: usize) -> Vec<Client> {
    let mut v = Vec::new();
    for _ in 0..n {
        v.push(env.client().await);
    }
    v
}

async fn set_all(conns: &[Client], sql: &str) {
    for c in conns {
        exec(c, sql).await;
    }
}

/// Writes row `i` on connection `i % 4` and reads it back on the next one, as a web app does
/// when a redirect draws another connection from its pool.
async fn rounds(conns: &[Client], table: &str, ids: std::ops::Range<i64>, hint: &str) -> Tally {
    let mut t = Tally::default();
    for i in ids {
        let n = conns.len() as i64;
        let w = &conns[(i % n) as usize];
        let r = &conns[((i + 1) % n) as usize];
        exec(w, &format!("INSERT INTO {table} VALUES ({i}, 'x')")).await;
        t.add(read_back(r, hint, table, i, "").await);
    }
    t
}

/// Reads on every connection until one lands on the replica (or 5 s pass).
async fn replica_share_after_writes_stop(env: &Env, conns: &[Client], table: &str) -> Tally {
    tokio::task::block_in_place(|| wait_all_replayed(&env.cluster));
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut t = Tally::default();
    loop {
        for c in conns {
            t.add(read_back(c, "", table, 0, "").await);
        }
        if t.on_replica > 0 || std::time::Instant::now() > deadline {
            return t;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The done-when of issue 20, part 1: 4 pooled connections with `causal`, writing on one and
/// reading on the next: no stale read; once writes stop, reads go to the replica again.
/// Control: the same under `session` is stale.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn causal_reads_see_writes_made_on_other_pooled_connections() {
    let env = start_rr(&[Some(DELAY)], |c| c.routing.consistency = "causal".into()).await;
    let conns = pool(&env, 4).await;
    exec(&conns[0], "CREATE TABLE c (id bigint PRIMARY KEY, v text)").await;
    assert_eq!(
        scalar(&conns[1], "SHOW tidemark.consistency").await,
        "causal"
    );

    let t = rounds(&conns, "c", 0..200, "").await;
    t.show("causal (config), write on one pooled connection, read on the next");
    assert_eq!(t.stale, 0, "causal reads must see every acknowledged write");

    // Per statement: sessions at `session`, the read names `causal` in a hint.
    set_all(&conns, "SET tidemark.consistency = 'session'").await;
    let h = rounds(&conns, "c", 200..300, "/* tidemark: consistency=causal */ ").await;
    h.show("causal (hint)");
    assert_eq!(
        h.stale, 0,
        "a causal hint must see every acknowledged write"
    );

    // Control: under `session`, a pooled connection that has not written lately reads stale
    // rows from the delayed replica (each of the 4 above wrote 3 rounds before it read, so its
    // own last write kept it on the primary; here the readers never write).
    let readers = pool(&env, 2).await;
    set_all(&readers, "SET tidemark.consistency = 'session'").await;
    let mut s = Tally::default();
    for i in 300..400 {
        exec(
            &conns[(i % 4) as usize],
            &format!("INSERT INTO c VALUES ({i}, 'x')"),
        )
        .await;
        s.add(read_back(&readers[(i % 2) as usize], "", "c", i, "").await);
    }
    s.show("control, session, readers that never write");
    assert!(
        s.stale > s.reads / 4,
        "without causal, reads on another connection should often be stale"
    );
    // The same readers at `causal`: never stale.
    set_all(&readers, "SET tidemark.consistency = 'causal'").await;
    let mut rc = Tally::default();
    for i in 400..500 {
        exec(
            &conns[(i % 4) as usize],
            &format!("INSERT INTO c VALUES ({i}, 'x')"),
        )
        .await;
        rc.add(read_back(&readers[(i % 2) as usize], "", "c", i, "").await);
    }
    rc.show("causal, readers that never write");
    assert_eq!(rc.stale, 0);

    // Writes stop: once the replica has replayed them, causal reads go to it again.
    set_all(&conns, "SET tidemark.consistency = 'causal'").await;
    let idle = replica_share_after_writes_stop(&env, &conns, "c").await;
    idle.show("causal, writes stopped");
    assert!(
        idle.on_replica > 0,
        "causal reads should go to the replica once it has replayed every write"
    );
    assert_eq!(idle.stale, 0);
}

/// Issue 20, part 2: a key carried only in a trailing sqlcommenter comment (as frameworks
/// append them per request) carries a write to a read on another connection. Control: the same
/// reads under another key are stale. A bad value of ours sends the read to the primary with a
/// warning; a comment that is not ours changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_in_a_trailing_sqlcommenter_comment_carries_a_write_across_connections() {
    let env = start_rr(&[Some(DELAY)], |_| {}).await;
    let a = env.client().await;
    let b = env.client().await;
    exec(&a, "CREATE TABLE sc (id bigint PRIMARY KEY, v text)").await;
    tokio::task::block_in_place(|| wait_all_replayed(&env.cluster));

    let comment = |key: &str| {
        format!(" /*controller='projects',action='show',tidemark_key='{key}',traceparent='00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01'*/")
    };
    let mut t = Tally::default();
    for i in 0..200 {
        exec(
            &a,
            &format!("INSERT INTO sc VALUES ({i}, 'x'){}", comment("user%3A42")),
        )
        .await;
        t.add(read_back(&b, "", "sc", i, &comment("user%3A42")).await);
    }
    t.show("key in a trailing sqlcommenter comment");
    assert_eq!(t.stale, 0, "stale reads under the writer's key");
    assert_eq!(
        scalar(&b, "SHOW tidemark.commit_lsn").await,
        "0/0",
        "B never wrote: it must owe its freshness to the key alone"
    );

    // Control: another key in the same place is not held back, and is stale.
    let mut other = Tally::default();
    for i in 200..300 {
        exec(
            &a,
            &format!("INSERT INTO sc VALUES ({i}, 'x'){}", comment("user%3A42")),
        )
        .await;
        other.add(read_back(&b, "", "sc", i, &comment("user%3A7")).await);
    }
    other.show("control, another key");
    assert!(
        other.stale > other.reads / 4,
        "without the writer's key the reads should often be stale"
    );

    // A bad value of ours: the primary, with a warning naming it.
    tokio::task::block_in_place(|| wait_all_replayed(&env.cluster));
    let bad = "SELECT pg_is_in_recovery() /*tidemark_consistency='often'*/";
    assert_eq!(scalar(&b, bad).await, "f");
    let bad = "SELECT pg_is_in_recovery() /*tidemark_key='user%3'*/";
    assert_eq!(scalar(&b, bad).await, "f");
    // Someone else's comment: routed as without it (the replica has everything by now).
    let mut on_replica = 0;
    for _ in 0..10 {
        if scalar(
            &b,
            "SELECT pg_is_in_recovery() /*controller='x',traceparent='%ZZ'*/",
        )
        .await
            == "t"
        {
            on_replica += 1;
        }
    }
    assert!(
        on_replica > 0,
        "a comment that is not ours must not change routing"
    );
}
