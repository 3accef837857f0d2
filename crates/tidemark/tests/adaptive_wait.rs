//! Issue 18, waiting for a replica (`routing.wait`): on a real primary and a replica whose
//! replay is delayed 80 ms, a read right after its session's write
//! - with `wait = "fixed"` (and a generous `max_wait`) waits for the replica and reads there;
//! - with `wait = "adaptive"` goes to the primary at once, because the replica is expected to
//!   replay the write later than the primary answers;
//! - with `wait = "adaptive"`, a read made long enough after the write (the commit has aged past
//!   the replica's lag) still reads the replica.
//!
//! No read is stale in any of them. Timings are printed, not asserted (benchmarks measure
//! speed: docs/benchmarks.md); what is asserted is where reads went.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tidemark::config::WaitMode;
use tokio_postgres::Client;

const DELAY: Duration = Duration::from_millis(80);
const ROUNDS: i64 = 20;

/// Inserts row `id`, optionally waits `pause`, reads it back: (found, on a replica), and how
/// long the read took.
async fn write_then_read(c: &Client, id: i64, pause: Duration) -> ((bool, bool), Duration) {
    exec(c, &format!("INSERT INTO aw VALUES ({id})")).await;
    if !pause.is_zero() {
        tokio::time::sleep(pause).await;
    }
    let t = Instant::now();
    let r = found_where(
        c,
        &format!("SELECT count(*), pg_is_in_recovery() FROM aw WHERE id = {id}"),
    )
    .await;
    (r, t.elapsed())
}

async fn series(c: &Client, base: i64, pause: Duration, what: &str) -> Tally {
    let mut t = Tally::default();
    let mut took = Vec::new();
    for i in base..base + ROUNDS {
        let (r, d) = write_then_read(c, i, pause).await;
        t.add(r);
        took.push(d);
    }
    took.sort();
    t.show(what);
    println!(
        "  read latency: median {:?}, max {:?}",
        took[took.len() / 2],
        took[took.len() - 1]
    );
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adaptive_wait_reads_the_primary_instead_of_waiting_for_a_slower_replica() {
    let env = start(&[Some(DELAY)], |c| {
        c.routing.wait = WaitMode::Adaptive;
        c.routing.max_wait = Duration::from_secs(1);
    })
    .await;
    let fixed = proxy_for(&env.cluster, |c| {
        c.routing.wait = WaitMode::Fixed;
        c.routing.max_wait = Duration::from_secs(1);
    })
    .await;
    let c = env.client().await;
    exec(&c, "CREATE TABLE aw (id bigint PRIMARY KEY)").await;
    tokio::task::block_in_place(|| wait_all_replayed(&env.cluster));
    wait_view_caught_up(&env.proxy).await;
    wait_view_caught_up(&fixed).await;

    // The primary's latency is measured (the adaptive budget), and far below the delay.
    let latency = env.proxy.app.view.load().primary_latency;
    println!("primary latency seen by the monitor: {latency:?}");
    assert!(
        latency.is_some(),
        "the monitor measures the primary's latency"
    );

    // fixed: the replica is expected within max_wait, so the read waits for it.
    let f = connect(&proxy_dsn_of(&fixed, "postgres")).await;
    let t = series(
        &f,
        0,
        Duration::ZERO,
        "wait = fixed, read right after the write",
    )
    .await;
    assert_eq!(t.stale, 0, "stale reads with wait = fixed");
    assert!(
        t.on_replica >= ROUNDS as u32 * 3 / 4,
        "wait = fixed: reads waited for the replica and read there ({} of {ROUNDS})",
        t.on_replica
    );

    // adaptive: the replica needs ~80 ms, the primary answers in well under that.
    let t = series(
        &c,
        1000,
        Duration::ZERO,
        "wait = adaptive, read right after the write",
    )
    .await;
    assert_eq!(t.stale, 0, "stale reads with wait = adaptive");
    assert!(
        t.on_replica <= ROUNDS as u32 / 4,
        "wait = adaptive: reads should go to the primary rather than wait ~{DELAY:?} for \
         the replica ({} of {ROUNDS} waited)",
        t.on_replica
    );

    // adaptive, a read 250 ms after the write: the replica has it (or is asked and has it).
    let t = series(
        &c,
        2000,
        Duration::from_millis(250),
        "wait = adaptive, read 250 ms after the write",
    )
    .await;
    assert_eq!(t.stale, 0, "stale reads with wait = adaptive after a pause");
    assert!(
        t.on_replica >= ROUNDS as u32 * 3 / 4,
        "wait = adaptive: reads long after the write belong on the replica ({} of {ROUNDS})",
        t.on_replica
    );
}
