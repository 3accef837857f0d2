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
