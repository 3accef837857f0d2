//! Issue 6, "Tests on the real cluster", items 2–9 (item 1 is in `ryw.rs`): paused replay,
//! keys and causality tokens across connections, the extended protocol and pipelining,
//! transactions and consistency levels, the lag gate end to end, lag on an idle primary,
//! and `synchronous_commit = off`. Every stale-read check comes with a control showing the
//! same workload *is* stale without the mechanism under test, so the checks can fail.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::raw::{data_rows, param_status, Raw};
use common::*;
use tidemark_cluster::{ClusterConfig, ReplicaConfig};
use tokio_postgres::Client;

/// Apply delay of the "certainly stale" replica: a read it serves right after a write
/// never sees that write.
const DELAY: Duration = Duration::from_millis(150);

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// `SELECT count(*), pg_is_in_recovery() FROM {table} WHERE id = {id}` with an optional
/// leading hint comment. Returns (row found, served by a replica).
async fn read_back(c: &Client, hint: &str, table: &str, id: i64) -> (bool, bool) {
    let sql = format!("{hint}SELECT count(*), pg_is_in_recovery() FROM {table} WHERE id = {id}");
    found_where(c, &sql).await
}

async fn insert(c: &Client, table: &str, id: i64) {
    exec(c, &format!("INSERT INTO {table} VALUES ({id}, 'x')")).await;
}

/// tidemark spreads reads over replicas round robin, one step per routing decision; a
/// control loop that makes the same number of decisions per round would always meet the
/// same replica. One extra read on odd rounds makes half of the control reads meet the
/// delayed replica, where they are certainly stale.
async fn alternate(c: &Client, round: i64) {
    if round % 2 == 1 {
        scalar(c, "SELECT 1").await;
    }
}

/// Runs a blocking cluster operation (psql) without stalling the runtime.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// Parses `X/Y` into a byte position.
fn lsn(s: &str) -> u64 {
    let (hi, lo) = s
        .split_once('/')
        .unwrap_or_else(|| panic!("{s:?} is not an LSN"));
    (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap()
}

async fn env_with(cfg: ClusterConfig, tweak: impl FnOnce(&mut tidemark::config::Config)) -> Env {
    let cluster = start_cluster(cfg).await;
    let proxy = proxy_rr(&cluster, tweak).await;
    Env { proxy, cluster }
}

fn replicas(delays: &[Option<Duration>]) -> Vec<ReplicaConfig> {
    delays
        .iter()
        .map(|d| ReplicaConfig {
            apply_delay: *d,
            ..Default::default()
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// 2. Replay paused on every replica
// ---------------------------------------------------------------------------------------

/// Both replicas paused: every read that depends on a write waits `max_wait`, then reads
/// the primary — never a stale replica. After resume, reads return to the replicas.
/// Control: a proxy with tracking off on the same cluster reads stale rows from the
/// paused replicas.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_replicas_fall_back_to_the_primary_then_return() {
    let max_wait = Duration::from_millis(20);
    let env = start_rr(&[None, None], |c| {
        c.routing.max_wait = max_wait;
        // Keep the lag gate out of this test: reads must fall back because of the LSN
        // wait, not because the paused replicas left rotation.
        c.monitor.max_lag = Duration::from_secs(600);
        c.monitor.return_below = Duration::from_secs(300);
    })
    .await;
    let c = env.client().await;
    exec(&c, "CREATE TABLE paused (id bigint PRIMARY KEY, v text)").await;
    blocking(|| wait_all_replayed(&env.cluster));
    blocking(|| {
        env.cluster.pause_replay(1).unwrap();
        env.cluster.pause_replay(2).unwrap();
    });

    let n = 200;
    let mut t = Tally::default();
    let mut waits = Vec::new();
    for i in 0..n {
        insert(&c, "paused", i).await;
        let started = Instant::now();
        t.add(read_back(&c, "", "paused", i).await);
        waits.push(started.elapsed());
    }
    waits.sort();
    t.show("replay paused on both replicas");
    println!(
        "  read latency while paused: min {:?}, median {:?}, max {:?} (max_wait {max_wait:?})",
        waits[0],
        waits[waits.len() / 2],
        waits[waits.len() - 1]
    );
    assert_eq!(t.stale, 0, "stale reads while replay was paused");
    assert_eq!(
        t.on_replica, 0,
        "a paused replica cannot have the row: every read must fall back to the primary"
    );
    // Once the monitor sees the paused replicas lagging by more than max_wait, tidemark
    // does not wait for them at all: most fallbacks are immediate.
    assert!(
        waits[waits.len() / 2] < max_wait,
        "reads waited for replicas known to lag more than max_wait: median {:?}",
        waits[waits.len() / 2]
    );
    assert!(
        waits[waits.len() / 2] < max_wait + Duration::from_millis(100),
        "fallback reads take far longer than max_wait: median {:?}",
        waits[waits.len() / 2]
    );

    // Control: the same rows read through a proxy that does not track writes come from
    // the paused replicas, without them.
    let off = proxy_rr(&env.cluster, |c| c.routing.track_writes = false).await;
    let oc = connect(&proxy_dsn_of(&off, "postgres")).await;
    let mut ctl = Tally::default();
    for i in n..n + 50 {
        insert(&oc, "paused", i).await;
        ctl.add(read_back(&oc, "", "paused", i).await);
    }
    ctl.show("control, tracking off, replay paused");
    assert!(
        ctl.stale >= 45,
        "without tracking, reads of paused replicas should be stale"
    );

    blocking(|| {
        env.cluster.resume_replay(1).unwrap();
        env.cluster.resume_replay(2).unwrap();
        wait_all_replayed(&env.cluster);
    });
    let mut after = Tally::default();
    for i in 1000..1100 {
        insert(&c, "paused", i).await;
        after.add(read_back(&c, "", "paused", i).await);
    }
    after.show("after resume");
    assert_eq!(after.stale, 0, "stale reads after resume");
    assert!(
        after.on_replica > after.reads / 2,
        "reads did not return to the replicas after resume"
    );
}

// ---------------------------------------------------------------------------------------
// 3. A key across connections
// ---------------------------------------------------------------------------------------

/// Connection A writes under `tidemark.key = 'user:42'`; a fresh connection B reads with
/// the key hint right after each write and always sees it. B under another key (or none)
/// reads a replica — and, as the control, sees stale rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_carries_a_write_to_another_connection() {
    let env = start_rr(&[None, Some(DELAY)], |_| {}).await;
    let a = env.client().await;
    exec(&a, "CREATE TABLE keyed (id bigint PRIMARY KEY, v text)").await;
    exec(&a, "SET tidemark.key = 'user:42'").await;
    assert_eq!(scalar(&a, "SHOW tidemark.key").await, "user:42");
    blocking(|| wait_all_replayed(&env.cluster));
    let b = env.client().await;

    let n = 500;
    let mut t = Tally::default();
    for i in 0..n {
        insert(&a, "keyed", i).await;
        t.add(read_back(&b, "/* tidemark: key=user:42 */ ", "keyed", i).await);
    }
    t.show("key user:42, reader on another connection");
    assert_eq!(t.stale, 0, "stale reads under the writer's key");
    assert_eq!(
        scalar(&b, "SHOW tidemark.commit_lsn").await,
        "0/0",
        "B never wrote: it must owe its freshness to the key alone"
    );

    // Control: the same reads under another key, or none, are not held back: they go to
    // replicas and see stale rows.
    let c = env.client().await;
    let mut other = Tally::default();
    let mut none = Tally::default();
    for i in n..n + 200 {
        alternate(&c, i).await;
        insert(&a, "keyed", i).await;
        if i % 2 == 0 {
            other.add(read_back(&c, "/* tidemark: key=user:7 */ ", "keyed", i).await);
        } else {
            none.add(read_back(&c, "", "keyed", i).await);
        }
    }
    other.show("control, key user:7");
    none.show("control, no key");
    assert_eq!(
        other.on_replica, other.reads,
        "a read under a key nobody wrote should go to a replica"
    );
    assert_eq!(
        none.on_replica, none.reads,
        "a read without key from a session that never wrote should go to a replica"
    );
    assert!(
        other.stale + none.stale > (other.reads + none.reads) / 4,
        "without the key the reads should often be stale"
    );
}

// ---------------------------------------------------------------------------------------
// 4. A causality token across connections
// ---------------------------------------------------------------------------------------

/// A writes and reads `SHOW tidemark.commit_lsn`; B passes it as `SET tidemark.min_lsn`
/// (even rounds) or as the `min_lsn` hint (odd rounds) and always sees the write.
/// Control: a reader without the token sees stale rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_carries_a_write_to_another_connection() {
    let env = start_rr(&[None, Some(DELAY)], |_| {}).await;
    let a = env.client().await;
    exec(&a, "CREATE TABLE tokens (id bigint PRIMARY KEY, v text)").await;
    blocking(|| wait_all_replayed(&env.cluster));
    let b = env.client().await;

    let n = 500;
    let mut t = Tally::default();
    let mut prev = 0;
    for i in 0..n {
        insert(&a, "tokens", i).await;
        let token = scalar(&a, "SHOW tidemark.commit_lsn").await;
        assert!(
            lsn(&token) > prev,
            "the token moves forward with each write"
        );
        prev = lsn(&token);
        let hint = if i % 2 == 0 {
            exec(&b, &format!("SET tidemark.min_lsn = '{token}'")).await;
            String::new()
        } else {
            exec(&b, "RESET tidemark.min_lsn").await;
            format!("/* tidemark: min_lsn={token} */ ")
        };
        t.add(read_back(&b, &hint, "tokens", i).await);
    }
    t.show("token via SET tidemark.min_lsn / min_lsn hint");
    assert_eq!(t.stale, 0, "stale reads with the writer's token");

    // Control: no token, stale.
    let c = env.client().await;
    let mut ctl = Tally::default();
    for i in n..n + 100 {
        alternate(&c, i).await;
        insert(&a, "tokens", i).await;
        let _ = scalar(&a, "SHOW tidemark.commit_lsn").await;
        ctl.add(read_back(&c, "", "tokens", i).await);
    }
    ctl.show("control, no token");
    assert!(
        ctl.stale > ctl.reads / 4,
        "without the token the reads should often be stale"
    );
}

/// `SET tidemark.report_lsn = on`: after each write the client gets a ParameterStatus
/// `tidemark.commit_lsn` (before ReadyForQuery) equal to `SHOW tidemark.commit_lsn`, and
/// that value works as a token on another connection. Off (the default): no such message.
/// (A raw protocol client: tokio-postgres does not expose ParameterStatus messages.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_lsn_sends_the_token_as_a_parameter_status() {
    let env = start_rr(&[None, Some(DELAY)], |_| {}).await;
    let mut a = Raw::connect(env.proxy.addr, "postgres").await;
    a.query_ok("CREATE TABLE reported (id bigint PRIMARY KEY, v text)")
        .await;
    let m = a.query_ok("INSERT INTO reported VALUES (-1, 'x')").await;
    assert!(
        param_status(&m, "tidemark.commit_lsn").is_empty(),
        "report_lsn is off by default: no ParameterStatus expected"
    );
    a.query_ok("SET tidemark.report_lsn = on").await;
    let b = env.client().await;

    let n = 200;
    let mut t = Tally::default();
    let mut prev = 0;
    for i in 0..n {
        let msgs = if i % 2 == 0 {
            a.query_ok(&format!("INSERT INTO reported VALUES ({i}, 'x')"))
                .await
        } else {
            a.extended_unit(&[&format!("INSERT INTO reported VALUES ({i}, 'x')")])
                .await
        };
        let reported = param_status(&msgs, "tidemark.commit_lsn");
        assert_eq!(
            reported.len(),
            1,
            "one ParameterStatus tidemark.commit_lsn per write (round {i})"
        );
        let z = msgs.iter().position(|(t, _)| *t == b'Z').unwrap();
        let s = msgs.iter().position(|(t, _)| *t == b'S').unwrap();
        assert!(s < z, "the token comes before ReadyForQuery");
        let token = &reported[0];
        assert!(lsn(token) > prev, "reported tokens move forward");
        prev = lsn(token);
        let shown = data_rows(&a.query_ok("SHOW tidemark.commit_lsn").await);
        assert_eq!(shown[0][0].as_deref(), Some(token.as_str()));
        t.add(
            read_back(
                &b,
                &format!("/* tidemark: min_lsn={token} */ "),
                "reported",
                i,
            )
            .await,
        );
    }
    t.show("token from ParameterStatus");
    assert_eq!(t.stale, 0, "stale reads with the reported token");
}

// ---------------------------------------------------------------------------------------
// 5. Extended protocol and pipelining
// ---------------------------------------------------------------------------------------

/// Pipelined batches (tokio-postgres sends concurrent futures back to back): INSERTs of a
/// batch, then SELECTs of the same rows, each its own Sync unit, all in flight at once.
/// Returns the tally of the SELECTs.
async fn pipelined_rounds(c: &Client, table: &str, from: i64, batches: i64, size: i64) -> Tally {
    let ins = c
        .prepare(&format!("INSERT INTO {table} VALUES ($1, 'x')"))
        .await
        .unwrap();
    let sel = c
        .prepare(&format!(
            "SELECT count(*), pg_is_in_recovery() FROM {table} WHERE id = $1"
        ))
        .await
        .unwrap();
    let mut t = Tally::default();
    for k in 0..batches {
        let ids: Vec<i64> = (0..size).map(|j| from + k * size + j).collect();
        let writes = ids.iter().map(|id| {
            let (c, ins) = (c, &ins);
            async move {
                c.execute(ins, &[id]).await.unwrap();
                None
            }
        });
        let reads = ids.iter().map(|id| {
            let (c, sel) = (c, &sel);
            async move {
                let r = c.query_one(sel, &[id]).await.unwrap();
                Some((r.get::<_, i64>(0) == 1, r.get::<_, bool>(1)))
            }
        });
        let futs: Vec<std::pin::Pin<Box<dyn std::future::Future<Output = _> + Send>>> = writes
            .map(|f| Box::pin(f) as _)
            .chain(reads.map(|f| Box::pin(f) as _))
            .collect();
        for r in futures_util::future::join_all(futs)
            .await
            .into_iter()
            .flatten()
        {
            t.add(r);
        }
    }
    t
}

/// Extended protocol with prepared statements: write then read, one at a time and
/// pipelined; and INSERT + SELECT in one Sync unit (must run together on the primary).
/// Control: the pipelined workload through a proxy without tracking is stale.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_protocol_and_pipelining_read_their_writes() {
    let env = start_rr(&[None, Some(DELAY)], |_| {}).await;
    let c = env.client().await;
    exec(&c, "CREATE TABLE ext (id bigint PRIMARY KEY, v text)").await;
    blocking(|| wait_all_replayed(&env.cluster));

    // One at a time, prepared statements.
    let ins = c.prepare("INSERT INTO ext VALUES ($1, 'x')").await.unwrap();
    let sel = c
        .prepare("SELECT count(*), pg_is_in_recovery() FROM ext WHERE id = $1")
        .await
        .unwrap();
    let mut seq = Tally::default();
    for i in 0..300i64 {
        c.execute(&ins, &[&i]).await.unwrap();
        let r = c.query_one(&sel, &[&i]).await.unwrap();
        seq.add((r.get::<_, i64>(0) == 1, r.get(1)));
    }
    seq.show("extended, write then read");
    assert_eq!(seq.stale, 0);

    // Pipelined: a write and its read in flight together (each its own Sync unit).
    let mut pair = Tally::default();
    for i in 1000..1300i64 {
        let (w, r) =
            futures_util::future::join(c.execute(&ins, &[&i]), c.query_one(&sel, &[&i])).await;
        w.unwrap();
        let r = r.unwrap();
        pair.add((r.get::<_, i64>(0) == 1, r.get(1)));
    }
    pair.show("pipelined write + read pairs");
    assert_eq!(pair.stale, 0);

    // Pipelined batches: 5 writes then their 5 reads, all in flight.
    let batch = pipelined_rounds(&c, "ext", 10_000, 60, 5).await;
    batch.show("pipelined batches of 5 writes + 5 reads");
    assert_eq!(batch.stale, 0);

    // INSERT and SELECT in one unit (one implicit transaction): the SELECT must run on the
    // primary in that same transaction.
    let mut raw = Raw::connect(env.proxy.addr, "postgres").await;
    let mut unit = Tally::default();
    for i in 20_000..20_100i64 {
        let msgs = raw
            .extended_unit(&[
                &format!("INSERT INTO ext VALUES ({i}, 'x')"),
                &format!("SELECT count(*), pg_is_in_recovery() FROM ext WHERE id = {i}"),
            ])
            .await;
        let r = data_rows(&msgs);
        unit.add((
            r[0][0].as_deref() == Some("1"),
            r[0][1].as_deref() == Some("t"),
        ));
    }
    unit.show("INSERT + SELECT in one Sync unit");
    assert_eq!(unit.stale, 0);
    assert_eq!(unit.on_replica, 0, "a unit that writes runs on the primary");

    // Control: the same pipelined batches without tracking.
    let off = proxy_rr(&env.cluster, |c| c.routing.track_writes = false).await;
    let oc = connect(&proxy_dsn_of(&off, "postgres")).await;
    let ctl = pipelined_rounds(&oc, "ext", 30_000, 20, 5).await;
    ctl.show("control, tracking off, pipelined batches");
    assert!(
        ctl.stale > ctl.reads / 4,
        "without tracking the pipelined reads should often be stale"
    );
}

// ---------------------------------------------------------------------------------------
// 6. Transactions and consistency levels
// ---------------------------------------------------------------------------------------

/// A cluster with an undelayed and a delayed replica, reads spread per statement, and an
/// empty table `txs` every replica has.
async fn with_txs() -> (Env, Client) {
    let env = start_rr(&[None, Some(DELAY)], |_| {}).await;
    let c = env.client().await;
    exec(&c, "CREATE TABLE txs (id bigint PRIMARY KEY, v text)").await;
    blocking(|| wait_all_replayed(&env.cluster));
    (env, c)
}

/// A transaction that writes then reads sees its write on the primary, statement by
/// statement and as one simple query; under `eventual` too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writing_transaction_reads_its_write_on_the_primary_even_under_eventual() {
    let (env, c) = with_txs().await;

    // A writing transaction, statement by statement, and as one simple query.
    let mut tx = Tally::default();
    for i in 0..100 {
        exec(&c, "BEGIN").await;
        insert(&c, "txs", i).await;
        tx.add(read_back(&c, "", "txs", i).await);
        exec(&c, "COMMIT").await;
        let id = 1000 + i;
        let r = rows(
            &c.simple_query(&format!(
                "BEGIN; INSERT INTO txs VALUES ({id}, 'x'); \
                 SELECT count(*), pg_is_in_recovery() FROM txs WHERE id = {id}; COMMIT"
            ))
            .await
            .unwrap(),
        );
        tx.add((
            r[0][0].as_deref() == Some("1"),
            r[0][1].as_deref() == Some("t"),
        ));
    }
    tx.show("read inside a writing transaction");
    assert_eq!(tx.stale, 0);
    assert_eq!(
        tx.on_replica, 0,
        "a writing transaction runs on the primary"
    );

    // Under eventual: a writing transaction still stays on the primary.
    let e = env.client().await;
    exec(&e, "SET tidemark.consistency = 'eventual'").await;
    assert_eq!(scalar(&e, "SHOW tidemark.consistency").await, "eventual");
    let mut etx = Tally::default();
    for i in 3000..3050 {
        exec(&e, "BEGIN").await;
        insert(&e, "txs", i).await;
        etx.add(read_back(&e, "", "txs", i).await);
        exec(&e, "COMMIT").await;
    }
    etx.show("eventual, read inside a writing transaction");
    assert_eq!(etx.stale, 0);
    assert_eq!(etx.on_replica, 0);
}

/// A read-only transaction after an autocommit write sees the write (session level).
/// Control: under `eventual`, the read-only transaction right after a write does not wait
/// for it and is often stale.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_transaction_after_a_write_sees_it_unless_consistency_is_eventual() {
    let (env, c) = with_txs().await;
    let mut ro = Tally::default();
    for i in 2000..2200 {
        insert(&c, "txs", i).await;
        exec(&c, "BEGIN READ ONLY").await;
        ro.add(read_back(&c, "", "txs", i).await);
        exec(&c, "COMMIT").await;
    }
    ro.show("session level, BEGIN READ ONLY after a write");
    assert_eq!(ro.stale, 0);

    // Control: under eventual, the read-only transaction right after a write does not wait
    // for it, so the session-level check above could fail.
    let e = env.client().await;
    exec(&e, "SET tidemark.consistency = 'eventual'").await;
    assert_eq!(scalar(&e, "SHOW tidemark.consistency").await, "eventual");
    let mut ctl = Tally::default();
    for i in 4000..4100 {
        alternate(&e, i).await;
        insert(&e, "txs", i).await;
        exec(&e, "BEGIN READ ONLY").await;
        ctl.add(read_back(&e, "", "txs", i).await);
        exec(&e, "COMMIT").await;
    }
    ctl.show("control, eventual, BEGIN READ ONLY after a write");
    assert!(
        ctl.stale > ctl.reads / 4,
        "under eventual, read-only transactions right after a write should often be stale"
    );
}

/// `BEGIN READ ONLY` under `eventual` runs on a replica, statement by statement and as one
/// simple query, even in a session that has written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_transaction_under_eventual_runs_on_a_replica() {
    let (env, _) = with_txs().await;
    let e = env.client().await;
    exec(&e, "SET tidemark.consistency = 'eventual'").await;
    assert_eq!(scalar(&e, "SHOW tidemark.consistency").await, "eventual");
    for i in 3000..3050 {
        exec(&e, "BEGIN").await;
        insert(&e, "txs", i).await;
        exec(&e, "COMMIT").await;
    }
    let mut on_replica = 0;
    for k in 0..40 {
        let r = if k % 2 == 0 {
            exec(&e, "BEGIN READ ONLY").await;
            let v = scalar(&e, "SELECT pg_is_in_recovery()").await;
            exec(&e, "COMMIT").await;
            v
        } else {
            let r = rows(
                &e.simple_query("BEGIN READ ONLY; SELECT pg_is_in_recovery(); COMMIT")
                    .await
                    .unwrap(),
            );
            r[0][0].clone().unwrap()
        };
        if r == "t" {
            on_replica += 1;
        }
    }
    println!("eventual, BEGIN READ ONLY: {on_replica} of 40 on replicas");
    assert_eq!(
        on_replica, 40,
        "read-only transactions under eventual use replicas"
    );
}

// ---------------------------------------------------------------------------------------
// 7. The lag gate end to end
// ---------------------------------------------------------------------------------------

/// View samples of node 1 taken every 5 ms: (time since start, in rotation, lag).
type Samples = Vec<(Duration, bool, Duration)>;

/// Samples `app`'s view of node `node` every 5 ms until `stop` is set.
fn sample_view(
    app: Arc<tidemark::app::App>,
    node: usize,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Samples> {
    tokio::spawn(async move {
        let t0 = Instant::now();
        let mut out = Vec::new();
        let mut tick = tokio::time::interval(Duration::from_millis(5));
        while !stop.load(Ordering::Relaxed) {
            tick.tick().await;
            let v = app.view.load();
            let n = &v.nodes[node];
            out.push((t0.elapsed(), n.in_rotation, n.lag));
        }
        out
    })
}

fn transitions(s: &Samples) -> usize {
    s.windows(2).filter(|w| w[0].1 != w[1].1).count()
}

/// Eventual reads through `c`: how many of `n` ran on the server listening on `port`.
async fn reads_on_port(c: &Client, n: usize, port: u16) -> usize {
    let mut hits = 0;
    for _ in 0..n {
        if served_by(c).await.unwrap() == port {
            hits += 1;
        }
    }
    hits
}

async fn wait_rotation(
    app: &tidemark::app::App,
    node: usize,
    want: bool,
    limit: Duration,
) -> Duration {
    let t0 = Instant::now();
    while app.view.load().nodes[node].in_rotation != want {
        assert!(
            t0.elapsed() < limit,
            "node {node} did not {} rotation within {limit:?} (lag {:?})",
            if want { "return to" } else { "leave" },
            app.view.load().nodes[node].lag
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    t0.elapsed()
}

/// The lag gate's threshold in these tests.
const MAX_LAG: Duration = Duration::from_millis(300);

/// A writer on the primary, one row every ~5 ms until stopped.
struct Writer {
    stop: Arc<AtomicBool>,
    handle: tokio::task::JoinHandle<u64>,
}

impl Writer {
    /// Stops the writer; prints how many rows it wrote.
    async fn finish(self) {
        self.stop.store(true, Ordering::Relaxed);
        let writes = self.handle.await.unwrap();
        println!("lag gate: {writes} background writes");
    }
}

/// Two undelayed replicas behind a lag gate at [`MAX_LAG`] (back below 100 ms, 3 samples),
/// reads spread per statement, and a [`Writer`] running for the whole test.
async fn lag_gate_env() -> (Env, Writer) {
    let env = start_rr(&[None, None], |c| {
        c.monitor.max_lag = MAX_LAG;
        c.monitor.return_below = Duration::from_millis(100);
        c.monitor.samples = 3;
    })
    .await;
    let w = env.node(0).await;
    w.batch_execute("CREATE TABLE gate (id bigserial PRIMARY KEY, at timestamptz DEFAULT now())")
        .await
        .unwrap();
    blocking(|| wait_all_replayed(&env.cluster));
    let stop = Arc::new(AtomicBool::new(false));
    let handle = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                w.batch_execute("INSERT INTO gate DEFAULT VALUES")
                    .await
                    .unwrap();
                n += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            n
        })
    };
    (env, Writer { stop, handle })
}

/// Replay paused on replica 1 while writes go on: it leaves rotation (once, no flapping
/// while held over the threshold) and eventual reads stop going to it; after resume it
/// returns and serves eventual reads again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_replica_leaves_rotation_once_and_returns_after_resume() {
    let (env, writer) = lag_gate_env().await;
    let app = env.proxy.app.clone();
    let port1 = env.cluster.port(1);
    let e = env.client().await;
    exec(&e, "SET tidemark.consistency = 'eventual'").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = reads_on_port(&e, 40, port1).await;
    println!("lag gate: before the pause, {before} of 40 eventual reads on replica 1");
    assert!(before > 0, "replica 1 serves eventual reads while healthy");
    assert!(app.view.load().nodes[1].in_rotation);

    // Pause: out of rotation once, and stays out while the lag keeps growing.
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = sample_view(app.clone(), 1, stop.clone());
    let paused_at = Instant::now();
    blocking(|| env.cluster.pause_replay(1).unwrap());
    wait_rotation(&app, 1, false, Duration::from_secs(5)).await;
    let left = paused_at.elapsed();
    println!(
        "lag gate: replica 1 left rotation {:?} after the pause began (lag {:?})",
        left,
        app.view.load().nodes[1].lag
    );
    let during = reads_on_port(&e, 40, port1).await;
    println!("lag gate: while out, {during} of 40 eventual reads on replica 1");
    assert_eq!(
        during, 0,
        "eventual reads must not go to a replica out of rotation"
    );
    let hold = Duration::from_millis(2200).saturating_sub(paused_at.elapsed());
    tokio::time::sleep(hold).await;
    stop.store(true, Ordering::Relaxed);
    let s = sampler.await.unwrap();
    let max_seen = s.iter().map(|x| x.2).max().unwrap_or_default();
    println!(
        "lag gate: held paused {:?}: {} view samples, {} transition(s), lag up to {max_seen:?}",
        paused_at.elapsed(),
        s.len(),
        transitions(&s)
    );
    assert_eq!(
        transitions(&s),
        1,
        "exactly one transition (out) while lag stays above max_lag"
    );
    assert!(!s.last().unwrap().1);
    assert!(
        app.view.load().nodes[2].in_rotation,
        "replica 2 stays in rotation"
    );

    // Resume: back in rotation, and eventual reads reach it again.
    let resumed_at = Instant::now();
    blocking(|| env.cluster.resume_replay(1).unwrap());
    wait_rotation(&app, 1, true, Duration::from_secs(5)).await;
    println!(
        "lag gate: replica 1 back in rotation {:?} after resume",
        resumed_at.elapsed()
    );
    let back = reads_on_port(&e, 40, port1).await;
    println!("lag gate: after resume, {back} of 40 eventual reads on replica 1");
    assert!(back > 0, "replica 1 serves eventual reads again");

    writer.finish().await;
}

/// With lag hovering at the threshold (apply delay = max_lag), hysteresis allows at most
/// one transition; the control — a gate without hysteresis (1 sample, return threshold =
/// max_lag) watching the same replica — flaps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hysteresis_keeps_a_replica_hovering_at_max_lag_from_flapping() {
    let (env, writer) = lag_gate_env().await;
    let app = env.proxy.app.clone();
    let max_lag = MAX_LAG;
    wait_rotation(&app, 1, true, Duration::from_secs(5)).await;

    // Hovering at the threshold: apply delay = max_lag keeps the lag around 300 ms.
    // The control proxy watches the same replica with a gate without hysteresis, set at the
    // median lag measured first: the lag saw-tooths by a few ms around it with every write,
    // so such a gate must flap (a fixed 300 ms could sit just above or below the band).
    blocking(|| env.cluster.set_apply_delay(1, max_lag).unwrap());
    // Until the lag has risen to the delay: a probe taken while it still rises gives the
    // control a threshold the lag then leaves for good, and the control cannot flap (seen
    // on a slow machine, where a fixed 800 ms was not enough).
    let deadline = Instant::now() + Duration::from_secs(10);
    while app.view.load().nodes[1].lag < max_lag * 9 / 10 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let probe_stop = Arc::new(AtomicBool::new(false));
    let probe = sample_view(app.clone(), 1, probe_stop.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;
    probe_stop.store(true, Ordering::Relaxed);
    let mut probe_lags: Vec<Duration> = probe.await.unwrap().iter().map(|x| x.2).collect();
    probe_lags.sort();
    let level = probe_lags[probe_lags.len() / 2];
    println!("lag gate, hovering: median lag {level:?} (the control's threshold)");
    let flappy = proxy_rr(&env.cluster, |c| {
        c.monitor.max_lag = level;
        c.monitor.return_below = level;
        c.monitor.samples = 1;
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stop = Arc::new(AtomicBool::new(false));
    let ours = sample_view(app.clone(), 1, stop.clone());
    let theirs = sample_view(flappy.app.clone(), 1, stop.clone());
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let (ours, theirs) = (ours.await.unwrap(), theirs.await.unwrap());
    let lags: Vec<Duration> = ours.iter().map(|x| x.2).collect();
    let over = lags.iter().filter(|l| **l > max_lag).count();
    println!(
        "lag gate, hovering: lag {:?}..{:?}, {over} of {} samples over max_lag; \
         transitions: {} with hysteresis, {} without (control)",
        lags.iter().min().unwrap(),
        lags.iter().max().unwrap(),
        lags.len(),
        transitions(&ours),
        transitions(&theirs)
    );
    assert!(
        transitions(&ours) <= 1,
        "the gate flapped while lag hovered at the threshold"
    );
    assert!(
        transitions(&theirs) > 2,
        "control: without hysteresis a gate at the level the lag hovers around should flap \
         (otherwise the lag did not hover and this check proves nothing)"
    );

    writer.finish().await;
}

// ---------------------------------------------------------------------------------------
// 8. Idle primary
// ---------------------------------------------------------------------------------------

/// With no writes, the reported time lag of healthy replicas stays near zero (it is
/// derived from primary LSN samples, not from the last replayed commit's timestamp).
/// The issue asks for 30 s; 5 s is used here to keep CI time down — the lag clock itself
/// is unit-tested with an injected clock over long idle periods in tidemark-core, so this
/// end-to-end check only has to show the monitor wires it up. Control: the naive measure,
/// `now() - pg_last_xact_replay_timestamp()`, grows over the same idle period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_primary_reports_no_lag() {
    let env = start_rr(&[None, None], |_| {}).await;
    let c = env.client().await;
    exec(&c, "CREATE TABLE idle (id int PRIMARY KEY)").await;
    exec(&c, "INSERT INTO idle VALUES (1)").await;
    blocking(|| wait_all_replayed(&env.cluster));
    let idle = Duration::from_secs(5);
    let t0 = Instant::now();
    let mut max = [Duration::ZERO; 3];
    let mut samples = 0;
    while t0.elapsed() < idle {
        let v = env.proxy.app.view.load();
        for (i, m) in max.iter_mut().enumerate().skip(1) {
            let n = &v.nodes[i];
            assert!(
                n.healthy && n.in_rotation,
                "replica {i} healthy and in rotation"
            );
            *m = (*m).max(n.lag);
        }
        samples += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r1 = env.node(1).await;
    let naive: f64 = r1
        .query_one(
            "SELECT extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    println!(
        "idle {idle:?}: max reported lag replica 1 {:?}, replica 2 {:?} over {samples} samples; \
         naive now() - pg_last_xact_replay_timestamp() = {naive:.2} s",
        max[1], max[2]
    );
    for (i, m) in max.iter().enumerate().skip(1) {
        assert!(
            *m < Duration::from_millis(100),
            "replica {i} reported {m:?} of lag on an idle primary"
        );
    }
    assert!(
        naive > 2.0,
        "control: the timestamp-based lag should have grown while idle ({naive} s)"
    );
}

// ---------------------------------------------------------------------------------------
// 9. synchronous_commit = off
// ---------------------------------------------------------------------------------------

/// With `synchronous_commit = off` the commit returns before its WAL is flushed (and
/// `pg_current_wal_lsn()` lags behind it); read-your-writes still holds. Control: the same
/// workload without tracking is stale.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synchronous_commit_off_still_reads_its_writes() {
    let env = env_with(
        ClusterConfig {
            replicas: replicas(&[None, Some(DELAY)]),
            synchronous_commit: Some("off".into()),
            // An async commit reaches replicas only once the WAL writer flushes it (default
            // every 200 ms, longer than max_wait): most reads would then simply fall back.
            // Flushing every 10 ms lets replicas serve many of these reads, so a too-low
            // captured position would show up as stale reads rather than hide behind
            // fallbacks.
            extra_conf: vec!["wal_writer_delay = '10ms'".into()],
            ..ClusterConfig::with_replicas(0)
        },
        |_| {},
    )
    .await;
    let c = env.client().await;
    assert_eq!(
        scalar(&c, "/* tidemark: primary */ SHOW synchronous_commit").await,
        "off"
    );
    exec(&c, "CREATE TABLE async (id bigint PRIMARY KEY, v text)").await;
    blocking(|| wait_all_replayed(&env.cluster));

    let n = 500;
    let mut t = Tally::default();
    for i in 0..n {
        insert(&c, "async", i).await;
        t.add(read_back(&c, "", "async", i).await);
    }
    t.show("synchronous_commit = off, same session");
    assert_eq!(t.stale, 0, "stale reads with synchronous_commit = off");

    // Across connections with the token, too.
    let b = env.client().await;
    let mut tok = Tally::default();
    for i in n..n + 100 {
        insert(&c, "async", i).await;
        let token = scalar(&c, "SHOW tidemark.commit_lsn").await;
        tok.add(read_back(&b, &format!("/* tidemark: min_lsn={token} */ "), "async", i).await);
    }
    tok.show("synchronous_commit = off, token");
    assert_eq!(tok.stale, 0);

    let off = proxy_rr(&env.cluster, |c| c.routing.track_writes = false).await;
    let oc = connect(&proxy_dsn_of(&off, "postgres")).await;
    let mut ctl = Tally::default();
    for i in 10_000..10_100 {
        alternate(&oc, i).await;
        insert(&oc, "async", i).await;
        ctl.add(read_back(&oc, "", "async", i).await);
    }
    ctl.show("control, tracking off, synchronous_commit = off");
    assert!(
        ctl.stale > ctl.reads / 4,
        "without tracking the reads should often be stale"
    );
}

/// The monitor polls at `monitor.idle_interval` while no WAL moves, and also while WAL moves
/// but no read may go to a replica (nothing it would learn is used); at `monitor.interval`
/// while WAL moves and reads go to replicas, and a commit or such a read wakes it at once:
/// the view shows the replica at the commit's position long before the next idle poll would
/// have.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monitor_slows_down_when_idle_or_unread_and_wakes_on_a_commit() {
    let idle_interval = Duration::from_millis(2500);
    let env = start(&[None], |c| {
        c.monitor.interval = Duration::from_millis(5);
        c.monitor.idle_interval = idle_interval;
        c.monitor.timeout = Duration::from_secs(5);
    })
    .await;
    let app = env.proxy.app.clone();
    let c = env.client().await;
    exec(&c, "CREATE TABLE pace (id int)").await;
    let quiet = || app.monitor_pace.is_quiet();

    // Idle: once the activity window has passed, both nodes are polled about once per
    // idle interval. A background WAL record (checkpoint, running-xacts snapshot) may wake
    // the monitor for a second: such a window is taken again.
    let mut idle_polls = None;
    for _ in 0..5 {
        let t = Instant::now();
        while !quiet() {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "the monitor never slowed down"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let g0 = app.view.load().generation;
        let mut stayed = true;
        for _ in 0..60 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            stayed &= quiet();
        }
        if stayed {
            idle_polls = Some(app.view.load().generation - g0);
            break;
        }
    }
    let idle_polls = idle_polls.expect("WAL kept moving on an idle cluster");
    println!("idle: {idle_polls} polls of 2 nodes in 3 s");
    // At the 5 ms pace this would be ~1,200.
    assert!(idle_polls <= 10, "{idle_polls} polls in 3 s while idle");

    // Writes that no read follows to a replica: WAL moves, but the monitor keeps the idle
    // pace (at the 5 ms pace, 1.5 s would be ~600 polls of 2 nodes). Once the session's
    // positions are left unread (after 16), each such write asks for one poll of the primary
    // (`Pace::unread_write`), and of the primary only.
    let g0 = app.view.load().generation;
    let s0 = app
        .captures_skipped
        .load(std::sync::atomic::Ordering::Relaxed);
    for i in 0..30 {
        exec(&c, &format!("INSERT INTO pace VALUES ({i})")).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let unread = app.view.load().generation - g0;
    let skipped = app
        .captures_skipped
        .load(std::sync::atomic::Ordering::Relaxed)
        - s0;
    println!(
        "writes, no replica reads: {unread} polls of 2 nodes in 1.5 s; {skipped} positions left unread"
    );
    assert!(skipped > 0, "no position was left unread");
    assert!(
        unread <= 10 + skipped,
        "{unread} polls in 1.5 s of writes nobody read ({skipped} left unread)"
    );

    // A read that may go to a replica, then a commit through tidemark: the monitor looks at
    // once, and the view has the replica at the commit's position within milliseconds, not
    // at the next idle poll (up to 2.5 s).
    let _ = scalar(&c, "SELECT count(*)::text FROM pace").await;
    exec(&c, "INSERT INTO pace VALUES (1)").await;
    let commit: tidemark_core::Lsn = scalar(&c, "SHOW tidemark.commit_lsn")
        .await
        .parse()
        .expect("commit LSN");
    let t = Instant::now();
    while app.view.load().nodes[1].replay_lsn < commit {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the view never showed the replica at the commit"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let seen = t.elapsed();
    println!("after a commit: view caught up in {seen:?}");
    assert!(
        seen < Duration::from_millis(700),
        "the view caught up only after {seen:?}: the commit did not wake the monitor"
    );
    // And it polls at the fast pace for a while.
    let g0 = app.view.load().generation;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let busy = app.view.load().generation - g0;
    println!("after a commit: {busy} polls in 0.5 s");
    assert!(busy >= 40, "only {busy} polls in 0.5 s after a commit");
}
