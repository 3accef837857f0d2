//! Read-your-writes on a real primary + replicas (one delayed): zero stale reads with
//! tracking, and proof that the same workload *is* stale without it.

mod common;

use std::time::Duration;

use common::*;

/// Runs `n` rounds of (INSERT row i, immediately read it back) in one session.
/// Returns (stale reads, reads served by replicas).
async fn rounds(c: &tokio_postgres::Client, table: &str, n: i32, extended: bool) -> (u32, u32) {
    let mut stale = 0;
    let mut on_replica = 0;
    let ins = format!("INSERT INTO {table} VALUES ($1, 'x')");
    let sel = format!("SELECT count(*), pg_is_in_recovery() FROM {table} WHERE id = $1");
    for i in 0..n {
        let (count, rec): (i64, bool) = if extended {
            c.execute(&ins, &[&i]).await.expect("insert");
            let r = c.query_one(&sel, &[&i]).await.expect("select");
            (r.get(0), r.get(1))
        } else {
            c.simple_query(&format!("INSERT INTO {table} VALUES ({i}, 'x')"))
                .await
                .expect("insert");
            let msgs = c
                .simple_query(&format!(
                    "SELECT count(*), pg_is_in_recovery() FROM {table} WHERE id = {i}"
                ))
                .await
                .expect("select");
            let row = msgs
                .iter()
                .find_map(|m| match m {
                    tokio_postgres::SimpleQueryMessage::Row(r) => Some(r),
                    _ => None,
                })
                .expect("a row");
            (
                row.get(0).unwrap_or("0").parse().unwrap_or(0),
                row.get(1) == Some("t"),
            )
        };
        if count != 1 {
            stale += 1;
        }
        if rec {
            on_replica += 1;
        }
    }
    (stale, on_replica)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_reads_its_writes_and_mostly_uses_replicas() {
    let env = start_rr(&[None, Some(Duration::from_millis(200))], |_| {}).await;
    let c = env.client().await;
    c.batch_execute("CREATE TABLE ryw_s (id int PRIMARY KEY, v text); CREATE TABLE ryw_e (id int PRIMARY KEY, v text)")
        .await
        .unwrap();
    let n = 1000;
    let (stale, replica) = rounds(&c, "ryw_s", n, false).await;
    println!("simple protocol: {stale} stale of {n}, {replica} reads on replicas");
    assert_eq!(stale, 0, "stale reads through tidemark (simple protocol)");
    let (stale_e, replica_e) = rounds(&c, "ryw_e", n, true).await;
    println!("extended protocol: {stale_e} stale of {n}, {replica_e} reads on replicas");
    assert_eq!(
        stale_e, 0,
        "stale reads through tidemark (extended protocol)"
    );
    // Most reads still go to a replica: the undelayed one catches up within the wait.
    assert!(
        replica + replica_e > n as u32,
        "only {} of {} reads were served by replicas",
        replica + replica_e,
        2 * n
    );
}

/// The control: the same workload with commit tracking off must see stale reads,
/// otherwise the test above could not fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_tracking_the_same_workload_is_stale() {
    let env = start_rr(&[None, Some(Duration::from_millis(200))], |c| {
        c.routing.track_writes = false;
    })
    .await;
    let c = env.client().await;
    c.batch_execute("CREATE TABLE ryw_n (id int PRIMARY KEY, v text)")
        .await
        .unwrap();
    // The table must exist on both replicas before the rounds: otherwise the untracked
    // reads fail with 42P01 rather than coming back stale.
    tokio::task::block_in_place(|| wait_all_replayed(&env.cluster));
    let (stale, _) = rounds(&c, "ryw_n", 100, false).await;
    println!("tracking off: {stale} stale of 100");
    assert!(
        stale > 10,
        "expected stale reads without tracking, got {stale}"
    );
}

/// A read right after the session's write goes to the replica with the check of its replay
/// position in the same round trip. When the replica has replayed the write (an undelayed
/// replica), the read is answered from it; when it has not (replay paused), the read's
/// answers there are dropped unseen — rows, an error for a table it lacks, output larger than
/// what tidemark holds back, a statement prepared in the unit — and the client gets exactly
/// the primary's answer, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_replica_check_rides_with_the_read_and_a_behind_replica_shows_nothing() {
    use std::sync::atomic::Ordering;
    let env = start(&[None], |c| {
        c.routing.wait = tidemark::config::WaitMode::Fixed;
        c.routing.max_wait = Duration::from_millis(50);
    })
    .await;
    let checks = |i: usize| env.proxy.app.replica_checks[i].load(Ordering::Relaxed);
    let c = env.client().await;
    exec(&c, "CREATE TABLE spec (id int PRIMARY KEY, v text)").await;
    // Caught up: 0 stale, and the checks that rode with the reads mostly found it so.
    let (stale, on_replica) = rounds(&c, "spec", 200, false).await;
    let (stale_e, on_replica_e) = {
        exec(&c, "CREATE TABLE spec_e (id int PRIMARY KEY, v text)").await;
        rounds(&c, "spec_e", 200, true).await
    };
    println!(
        "undelayed replica: {stale}+{stale_e} stale of 400, {} on the replica; checks with the read: {} caught up, {} behind",
        on_replica + on_replica_e,
        checks(0),
        checks(1)
    );
    assert_eq!(stale + stale_e, 0);
    assert!(checks(0) > 0, "no check rode with a read");
    assert!(on_replica + on_replica_e > 200);
    // A replica that answered the check serves the session's next reads without another
    // check, until the session writes again.
    exec(&c, "INSERT INTO spec VALUES (500, 'again')").await;
    let asked = checks(0) + checks(1);
    let mut served = 0;
    for _ in 0..20 {
        let m = c
            .simple_query("SELECT v, pg_is_in_recovery() FROM spec WHERE id = 500")
            .await
            .expect("read");
        let r = rows(&m);
        assert_eq!(r[0][0].as_deref(), Some("again"));
        served += usize::from(r[0][1].as_deref() == Some("t"));
    }
    let asked = checks(0) + checks(1) - asked;
    println!("20 reads after one write: {served} on the replica, {asked} checks");
    assert!(asked <= 2, "{asked} checks for 20 reads of one write");
    assert!(served >= 19, "{served} of 20 on the replica");

    // Replay paused: every read after a write is checked, found behind, answered by the
    // primary.
    let replica = connect(&env.cluster.dsn(1)).await;
    exec(&replica, "SELECT pg_wal_replay_pause()").await;
    let behind_before = checks(1);
    for i in 0..5 {
        exec(&c, &format!("INSERT INTO spec VALUES ({}, 'p')", 1000 + i)).await;
        // Rows the replica lacks.
        let n = scalar(
            &c,
            &format!("SELECT count(*) FROM spec WHERE id = {}", 1000 + i),
        )
        .await;
        assert_eq!(n, "1", "round {i}");
        // A table the replica lacks: its 42P01 there is not the client's.
        exec(&c, &format!("CREATE TABLE spec_new_{i} (id int)")).await;
        assert_eq!(
            scalar(&c, &format!("SELECT count(*) FROM spec_new_{i}")).await,
            "0",
            "round {i}"
        );
        // Over 256 KiB of rows: dropped there, relayed once from the primary.
        exec(&c, &format!("INSERT INTO spec VALUES ({}, 'q')", 2000 + i)).await;
        let big = c
            .query(
                "SELECT g, repeat('x', 1000), (SELECT count(*) FROM spec WHERE id = $1) FROM generate_series(1, 1000) g",
                &[&(2000 + i)],
            )
            .await
            .expect("a large read");
        assert_eq!(big.len(), 1000, "round {i}");
        assert!(big.iter().all(|r| r.get::<_, i64>(2) == 1), "round {i}");
        // A named statement prepared in a unit that ran on the behind replica, used again.
        exec(&c, &format!("INSERT INTO spec VALUES ({}, 'r')", 3000 + i)).await;
        let st = c
            .prepare(&format!("SELECT v FROM spec WHERE id = {}", 3000 + i))
            .await
            .expect("prepare");
        for _ in 0..3 {
            let r = c.query_one(&st, &[]).await.expect("the prepared read");
            assert_eq!(r.get::<_, String>(0), "r", "round {i}");
        }
    }
    assert!(
        checks(1) > behind_before,
        "no check found the paused replica behind"
    );
    exec(&replica, "SELECT pg_wal_replay_resume()").await;
}

/// The replica check is tidemark's own prepared statement on the replica's connection. When
/// its execution fails there (here: the client's role may not call the replay-position
/// function; in production a recovery conflict or a cancel does the same), the read is
/// answered by the primary with nothing of the error shown and the check counts as behind,
/// never as caught up; once the function may be called again, the checks find the replica
/// caught up again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_replica_check_falls_back_unseen_and_the_checks_recover() {
    use std::sync::atomic::Ordering;
    let env = start(&[None], |c| {
        c.routing.wait = tidemark::config::WaitMode::Fixed;
        c.routing.max_wait = Duration::from_millis(50);
        trust_user(c, "lim");
    })
    .await;
    let checks = |i: usize| env.proxy.app.replica_checks[i].load(Ordering::Relaxed);
    let admin = env.node(0).await;
    exec(
        &admin,
        "CREATE ROLE lim LOGIN PASSWORD 'pw'; \
         CREATE TABLE rc (id int PRIMARY KEY, v text); GRANT SELECT, INSERT ON rc TO lim; \
         REVOKE EXECUTE ON FUNCTION pg_last_wal_replay_lsn() FROM PUBLIC",
    )
    .await;
    tokio::task::block_in_place(|| wait_all_replayed(&env.cluster));
    let c = connect(&proxy_dsn_of(&env.proxy, "lim")).await;
    let round = |i: i32| {
        let c = &c;
        async move {
            exec(c, &format!("INSERT INTO rc VALUES ({i}, 'x')")).await;
            let n = scalar(c, &format!("SELECT count(*) FROM rc WHERE id = {i}")).await;
            assert_eq!(n, "1", "read-back of write {i}");
        }
    };
    // The role may not ask the replica its position: every check fails, no read is stale and
    // none of the checks' errors reaches the client.
    let caught_up_before = checks(0);
    for i in 0..30 {
        round(i).await;
    }
    println!(
        "revoked: {} checks caught up, {} behind",
        checks(0) - caught_up_before,
        checks(1)
    );
    assert_eq!(
        checks(0),
        caught_up_before,
        "a failed check counted caught up"
    );
    assert!(checks(1) > 0, "no check rode with a read");
    // Allowed again: the checks find the replica caught up again.
    exec(
        &admin,
        "GRANT EXECUTE ON FUNCTION pg_last_wal_replay_lsn() TO PUBLIC",
    )
    .await;
    tokio::task::block_in_place(|| wait_all_replayed(&env.cluster));
    let caught_up_before = checks(0);
    for i in 100..130 {
        round(i).await;
    }
    let caught_up = checks(0) - caught_up_before;
    println!("granted again: {caught_up} checks caught up");
    assert!(
        caught_up > 0,
        "after the first failure no check ever succeeded"
    );
}

/// tidemark's position reads run on connections that carry the client's settings, so a
/// client's `search_path` reaches them. Functions of the client's own named like the ones
/// they call, found first on that path, must not change what tidemark learns: a replay
/// position that claims the paused replica is far ahead, or a commit position that claims the
/// write is older than it is, would each send the read-back to a replica without the write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clients_search_path_cannot_stand_in_for_tidemarks_position_reads() {
    let env = start(&[None], |c| {
        c.routing.wait = tidemark::config::WaitMode::Fixed;
        c.routing.max_wait = Duration::from_millis(50);
    })
    .await;
    let admin = env.node(0).await;
    exec(
        &admin,
        "CREATE SCHEMA decoy_check; CREATE SCHEMA decoy_commit; \
         CREATE FUNCTION decoy_check.pg_last_wal_replay_lsn() RETURNS pg_lsn \
           LANGUAGE sql AS $$ SELECT 'FFFFFFFF/FFFFFFF0'::pg_lsn $$; \
         CREATE FUNCTION decoy_commit.pg_current_wal_insert_lsn() RETURNS pg_lsn \
           LANGUAGE sql AS $$ SELECT '0/1'::pg_lsn $$; \
         CREATE TABLE hp (id int PRIMARY KEY, v text)",
    )
    .await;
    tokio::task::block_in_place(|| wait_all_replayed(&env.cluster));
    let replica = connect(&env.cluster.dsn(1)).await;
    exec(&replica, "SELECT pg_wal_replay_pause()").await;
    for (label, schema, first) in [
        ("replay check", "decoy_check", 0),
        ("commit position", "decoy_commit", 100),
    ] {
        // A new client each time: no earlier write of its own raises what it waits for.
        let c = env.client().await;
        exec(
            &c,
            &format!("SET search_path = {schema}, pg_catalog, public"),
        )
        .await;
        let mut on_replica = 0;
        for i in first..first + 10 {
            exec(&c, &format!("INSERT INTO hp VALUES ({i}, 'x')")).await;
            let r = rows(
                &c.simple_query(&format!(
                    "SELECT count(*), pg_catalog.pg_is_in_recovery() FROM hp WHERE id = {i}"
                ))
                .await
                .expect("read-back"),
            );
            on_replica += usize::from(r[0][1].as_deref() == Some("t"));
            assert_eq!(
                r[0][0].as_deref(),
                Some("1"),
                "{label}: read-back of write {i}"
            );
        }
        println!("{label}: {on_replica} of 10 read-backs on the paused replica (all fresh)");
    }
    exec(&replica, "SELECT pg_wal_replay_resume()").await;
}

/// A role that may not call the commit-position function (a cluster that revoked it from
/// PUBLIC): every write's position read fails, pipelined and again on its own, and still no
/// read-back is stale and the client sees none of those errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_that_cannot_read_the_commit_position_still_reads_its_writes() {
    let env = start(&[None], |c| trust_user(c, "lim")).await;
    let admin = env.node(0).await;
    exec(
        &admin,
        "CREATE ROLE lim LOGIN PASSWORD 'pw'; \
         CREATE TABLE rp (id int PRIMARY KEY, v text); GRANT SELECT, INSERT ON rp TO lim; \
         REVOKE EXECUTE ON FUNCTION pg_current_wal_insert_lsn() FROM PUBLIC",
    )
    .await;
    tokio::task::block_in_place(|| wait_all_replayed(&env.cluster));
    // Replay paused: a read-back sent to the replica would miss its write.
    let replica = connect(&env.cluster.dsn(1)).await;
    exec(&replica, "SELECT pg_wal_replay_pause()").await;
    let c = connect(&proxy_dsn_of(&env.proxy, "lim")).await;
    let mut on_replica = 0;
    for i in 0..30 {
        exec(&c, &format!("INSERT INTO rp VALUES ({i}, 'x')")).await;
        let r = rows(
            &c.simple_query(&format!(
                "SELECT count(*), pg_is_in_recovery() FROM rp WHERE id = {i}"
            ))
            .await
            .expect("read-back"),
        );
        assert_eq!(r[0][0].as_deref(), Some("1"), "read-back of write {i}");
        on_replica += usize::from(r[0][1].as_deref() == Some("t"));
    }
    println!("position unreadable: {on_replica} of 30 read-backs on the replica, none stale");
    exec(&replica, "SELECT pg_wal_replay_resume()").await;
}

/// Writes rows `ids` in turn as an autocommit INSERT (simple protocol), a prepared INSERT
/// (extended protocol) and BEGIN / INSERT / COMMIT sent one by one, as the TPC-B script does.
async fn write_rows(c: &tokio_postgres::Client, table: &str, ids: std::ops::Range<i64>) {
    for id in ids {
        match id % 3 {
            0 => exec(c, &format!("INSERT INTO {table} VALUES ({id}, 'x')")).await,
            1 => {
                c.execute(&format!("INSERT INTO {table} VALUES ($1, 'x')"), &[&id])
                    .await
                    .expect("insert");
            }
            _ => {
                exec(c, "BEGIN").await;
                exec(c, &format!("INSERT INTO {table} VALUES ({id}, 'x')")).await;
                exec(c, "COMMIT").await;
            }
        }
    }
}

/// Writes rows `ids` into `lazy`, waits until the replica has replayed them and pauses its
/// replay, then writes row `last`: a write whose commit position must be left unread.
async fn one_unread_past_the_paused_replica(
    env: &Env,
    replica: &tokio_postgres::Client,
    c: &tokio_postgres::Client,
    ids: std::ops::Range<i64>,
    last: i64,
) {
    use std::sync::atomic::Ordering;
    write_rows(c, "lazy", ids).await;
    tokio::task::block_in_place(|| wait_all_replayed(&env.cluster));
    exec(replica, "SELECT pg_wal_replay_pause()").await;
    let before = env.proxy.app.captures_skipped.load(Ordering::Relaxed);
    write_rows(c, "lazy", last..last + 1).await;
    let after = env.proxy.app.captures_skipped.load(Ordering::Relaxed);
    assert_eq!(after, before + 1, "row {last}: the write after unread ones");
}

/// Writes rows `ids` into `lazy` (see `write_rows`) and checks that none of their commit
/// positions was left unread.
async fn none_left_unread(
    env: &Env,
    c: &tokio_postgres::Client,
    ids: std::ops::Range<i64>,
    when: &str,
) {
    use std::sync::atomic::Ordering;
    let before = env.proxy.app.captures_skipped.load(Ordering::Relaxed);
    write_rows(c, "lazy", ids).await;
    let after = env.proxy.app.captures_skipped.load(Ordering::Relaxed);
    assert_eq!(after, before, "positions left unread {when}");
}

/// A session that writes many times without reading stops paying for its commit positions
/// (after `UNREAD_BEFORE_SKIP` = 16 unread ones), and nothing goes stale by it. Each step: a
/// run of writes the replica replays, then its replay is paused and the session writes once
/// more — a write whose position is left unread. Then:
/// - the session's own read: it learns the primary's position first, so the paused replica,
///   which has every *earlier* position, does not serve it;
/// - the token it shows (`SHOW tidemark.commit_lsn`) is at or past that write;
/// - a `causal` read on another connection: the floor is unknown, so it too asks the primary;
/// - keyed writes are never left unread: another connection with the key sees them.
/// Without the lazy read the skip count stays 0; without the position learned at the read,
/// the first read here is stale (the replica has replayed everything up to the write before).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_that_does_not_read_leaves_positions_unread_and_nothing_goes_stale() {
    use std::sync::atomic::Ordering;
    let env = start_rr(&[None], |_| {}).await;
    let skipped = || env.proxy.app.captures_skipped.load(Ordering::Relaxed);
    let replica = env.node(1).await;
    let primary = env.node(0).await;
    let w = env.client().await;
    exec(&w, "CREATE TABLE lazy (id bigint PRIMARY KEY, v text)").await;
    let read = |id: i64| format!("SELECT count(*), pg_is_in_recovery() FROM lazy WHERE id = {id}");
    // Writes the replica has replayed, then replay paused and one more write.
    let mut next = 1i64;
    let mut run_then_pause = |n: i64| {
        let ids = next..next + n;
        next += n + 1;
        (ids, next - 1)
    };

    // 1. Own reads.
    let mut own = Tally::default();
    for _ in 0..4 {
        let (ids, last) = run_then_pause(24);
        one_unread_past_the_paused_replica(&env, &replica, &w, ids, last).await;
        own.add(found_where(&w, &read(last)).await);
        exec(&replica, "SELECT pg_wal_replay_resume()").await;
    }
    own.show("own reads after unread positions");
    println!("positions left unread: {}", skipped());
    assert_eq!(own.stale, 0, "a session missed its own write");

    // 2. The token: at or past the write whose position was left unread.
    let (ids, last) = run_then_pause(24);
    write_rows(&w, "lazy", ids).await;
    let floor: String = scalar(&primary, "SELECT pg_current_wal_insert_lsn()::text").await;
    let before = skipped();
    write_rows(&w, "lazy", last..last + 1).await;
    assert_eq!(skipped(), before + 1);
    let shown = scalar(&w, "SHOW tidemark.commit_lsn").await;
    let past: String = scalar(
        &primary,
        &format!("SELECT ('{shown}'::pg_lsn > '{floor}'::pg_lsn)::text"),
    )
    .await;
    println!("shown {shown}, the primary's position before the write {floor}");
    assert_eq!(past, "true", "the token {shown} is not past {floor}");
    // Having shown it, the session's positions are read from now on.
    let (ids, _) = run_then_pause(20);
    none_left_unread(&env, &w, ids, "after SHOW tidemark.commit_lsn").await;

    // 3. A causal reader on another connection, the first in this process.
    let w2 = env.client().await;
    let r = env.client().await;
    exec(&r, "SET tidemark.consistency = causal").await;
    let (ids, last) = run_then_pause(24);
    one_unread_past_the_paused_replica(&env, &replica, &w2, ids, last).await;
    let (found, _) = found_where(&r, &read(last)).await;
    exec(&replica, "SELECT pg_wal_replay_resume()").await;
    assert!(found, "a causal read missed a write acknowledged before it");
    // With causal readers about, no position is left unread.
    let (ids, _) = run_then_pause(20);
    none_left_unread(&env, &w2, ids, "with causal readers about").await;

    // 4. Keyed writes keep their positions (a fresh instance: no causal reader yet).
    drop((w, w2, r));
    let env2 = start_rr(&[None], |_| {}).await;
    let skipped2 = || env2.proxy.app.captures_skipped.load(Ordering::Relaxed);
    let kw = env2.client().await;
    let kr = env2.client().await;
    let replica2 = env2.node(1).await;
    exec(&kw, "CREATE TABLE lazy_k (id bigint PRIMARY KEY, v text)").await;
    exec(&kw, "SET tidemark.key = 'user-7'").await;
    exec(&kr, "SET tidemark.key = 'user-7'").await;
    write_rows(&kw, "lazy_k", 1..25).await;
    tokio::task::block_in_place(|| wait_all_replayed(&env2.cluster));
    exec(&replica2, "SELECT pg_wal_replay_pause()").await;
    write_rows(&kw, "lazy_k", 25..26).await;
    let (found, _) = found_where(
        &kr,
        "SELECT count(*), pg_is_in_recovery() FROM lazy_k WHERE id = 25",
    )
    .await;
    exec(&replica2, "SELECT pg_wal_replay_resume()").await;
    assert!(found, "a keyed read missed the key's last write");
    assert_eq!(skipped2(), 0, "a keyed write's position was left unread");
}

/// A named portal bound in one unit of a transaction and executed in the next (what pgjdbc
/// does with a fetch size): the unit with the Bind runs nothing, yet the transaction writes
/// once its portal is executed, and the COMMIT must be followed by a position read. The
/// replica has replayed the table and then paused: a read of the row served there is stale.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_portal_bound_in_one_unit_and_executed_in_the_next_is_a_write() {
    use bytes::BytesMut;
    use common::raw::{data_rows, Raw};
    use postgres_protocol::message::frontend;
    let env = start_rr(&[None], |_| {}).await;
    let c = env.client().await;
    let replica = env.node(1).await;
    exec(&c, "CREATE TABLE portal_w (id int PRIMARY KEY, v text)").await;
    tokio::task::block_in_place(|| wait_all_replayed(&env.cluster));
    wait_view_caught_up(&env.proxy).await;
    exec(&replica, "SELECT pg_wal_replay_pause()").await;
    let mut raw = Raw::connect(env.proxy.addr, "postgres").await;
    raw.query_ok("BEGIN").await;
    let mut b = BytesMut::new();
    frontend::parse(
        "",
        "INSERT INTO portal_w VALUES (1, 'x')",
        std::iter::empty(),
        &mut b,
    )
    .expect("parse");
    frontend::bind(
        "p",
        "",
        std::iter::empty(),
        std::iter::empty::<()>(),
        |_, _| -> Result<postgres_protocol::IsNull, Box<dyn std::error::Error + Sync + Send>> {
            Ok(postgres_protocol::IsNull::Yes)
        },
        Some(0),
        &mut b,
    )
    .map_err(|_| ())
    .expect("bind");
    frontend::sync(&mut b);
    raw.send(&b).await;
    raw.until_ready_ok().await;
    let mut b = BytesMut::new();
    frontend::execute("p", 0, &mut b).expect("execute");
    frontend::sync(&mut b);
    raw.send(&b).await;
    let done = raw.until_ready_ok().await;
    assert!(done.iter().any(|m| m.0 == b'C'), "the portal ran: {done:?}");
    raw.query_ok("COMMIT").await;
    let rows = data_rows(
        &raw.query_ok("SELECT count(*), pg_is_in_recovery() FROM portal_w WHERE id = 1")
            .await,
    );
    exec(&replica, "SELECT pg_wal_replay_resume()").await;
    println!("read after the commit: {rows:?}");
    assert_eq!(
        rows[0][0].as_deref(),
        Some("1"),
        "the write through a portal executed in a later unit was not seen"
    );
}
