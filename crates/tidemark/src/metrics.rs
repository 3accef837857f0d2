//! Prometheus metrics: names, labels and the recording helpers every other module calls.
//! Labels are bounded sets (class, target role, reason, node name, pool name, slot name,
//! SQLSTATE) — never a client, statement or key.
//!
//! The helpers also feed [`recent`], an in-process ring of per-second counters that the
//! status page reads ("the last minute"), so callers record once and both stay in step.
//! Without a recorder (no `metrics.listen`) the `metrics` macros are no-ops and only the
//! ring is kept.

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Counter,
    Gauge, Histogram,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tidemark_core::route::Reason;

/// Fallback reasons that do not come from [`Reason`].
pub const EXTRA_FALLBACK_REASONS: [&str; 1] = ["replica_error"];

const LAG_SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];
const LAG_BYTES_BUCKETS: &[f64] = &[
    0.0,
    128.0,
    1024.0,
    8192.0,
    65536.0,
    262144.0,
    1048576.0,
    4194304.0,
    16777216.0,
    67108864.0,
    268435456.0,
    1073741824.0,
    4294967296.0,
];

/// Installs the global recorder and its upkeep thread; returns the handle that renders
/// `/metrics`.
pub fn install() -> Option<PrometheusHandle> {
    let b = PrometheusBuilder::new()
        .set_buckets(&[
            0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
            2.5, 5.0, 10.0,
        ])
        .ok()?
        .set_buckets_for_metric(
            Matcher::Full("tidemark_replica_lag_sample_seconds".into()),
            LAG_SECONDS_BUCKETS,
        )
        .ok()?
        .set_buckets_for_metric(
            Matcher::Full("tidemark_replica_lag_sample_bytes".into()),
            LAG_BYTES_BUCKETS,
        )
        .ok()?;
    let handle = b.install_recorder().ok()?;
    INSTALLED.store(true, Ordering::Relaxed);
    // Histogram samples are buffered until upkeep (or a render) folds them in: without a
    // scraper they would grow without bound.
    let h2 = handle.clone();
    let _ = std::thread::Builder::new()
        .name("tidemark-metrics-upkeep".into())
        .spawn(move || loop {
            std::thread::sleep(Duration::from_secs(5));
            h2.run_upkeep();
        });
    describe();
    preregister();
    Some(handle)
}

fn describe() {
    describe_gauge!(
        "tidemark_pending_logins",
        "Connections that have not finished logging in (startup, TLS, authentication)"
    );
    describe_counter!(
        "tidemark_logins_refused_total",
        "Connections closed at once because limits.max_pending_logins were logging in"
    );
    describe_counter!(
        "tidemark_statements_total",
        "Statements (routing units) by class and target role"
    );
    describe_counter!(
        "tidemark_reads_total",
        "Read-only statements by target role (replica|primary) and routing reason"
    );
    describe_counter!(
        "tidemark_fallbacks_total",
        "Reads that went to the primary instead of a replica, by reason"
    );
    describe_gauge!(
        "tidemark_reads_replica_ratio",
        "Share of reads sent to replicas over the last 60 seconds (0..1; 0 when no reads)"
    );
    describe_histogram!(
        "tidemark_lsn_wait_seconds",
        "Time a read waited for a replica to replay its required LSN, by outcome"
    );
    describe_counter!(
        "tidemark_errors_total",
        "Errors tidemark sent to clients, by SQLSTATE"
    );
    describe_counter!(
        "tidemark_transactions_total",
        "Transactions started with a plain BEGIN under routing.transactions = optimistic (and declared or serializable ones there), by outcome"
    );
    describe_counter!(
        "tidemark_transaction_replays_total",
        "Optimistic transactions replayed on the primary at their first write"
    );
    describe_counter!(
        "tidemark_transaction_replayed_bytes_total",
        "Bytes of client messages replayed on the primary by optimistic transactions"
    );
    describe_gauge!("tidemark_client_connections", "Connected clients");
    describe_counter!(
        "tidemark_commit_lsn_captures_total",
        "Commit LSNs captured after writes"
    );
    describe_counter!(
        "tidemark_commit_lsn_captures_skipped_total",
        "Writes whose commit LSN was left unread: nothing depended on it (the session's next replica-eligible read asks the primary's position first)"
    );
    describe_gauge!(
        "tidemark_replica_lag_seconds",
        "Replica replay lag in seconds (latest sample)"
    );
    describe_gauge!(
        "tidemark_replica_lag_bytes",
        "Replica replay lag in bytes of WAL (latest sample)"
    );
    describe_histogram!(
        "tidemark_replica_lag_sample_seconds",
        "Replica replay lag samples in seconds"
    );
    describe_histogram!(
        "tidemark_replica_lag_sample_bytes",
        "Replica replay lag samples in bytes of WAL"
    );
    describe_gauge!(
        "tidemark_node_role",
        "1 for the node's current role (primary|replica|unknown)"
    );
    describe_gauge!(
        "tidemark_node_healthy",
        "1 when the node answers the monitor"
    );
    describe_gauge!(
        "tidemark_node_in_rotation",
        "1 when the node may serve reads (lag gate open)"
    );
    describe_gauge!(
        "tidemark_split_brain",
        "1 while several nodes accept writes"
    );
    describe_gauge!(
        "tidemark_pool_server_connections",
        "Server connections of a pool by state (active|idle)"
    );
    describe_gauge!(
        "tidemark_pool_max_connections",
        "Configured maximum size of a pool"
    );
    describe_gauge!(
        "tidemark_pool_clients_waiting",
        "Clients waiting for a server connection from a pool"
    );
    describe_counter!(
        "tidemark_pool_checkout_timeouts_total",
        "Checkouts that gave up after pool.checkout_timeout"
    );
    describe_gauge!(
        "tidemark_replication_slot_retained_bytes",
        "WAL retained on the primary by a replication slot (pg_current_wal_lsn - restart_lsn)"
    );
    describe_gauge!(
        "tidemark_replication_slot_active",
        "1 when a replication slot has a connected consumer"
    );
    describe_gauge!(
        "tidemark_replica_sync_state",
        "1 for the primary's pg_stat_replication sync_state of each replica (async|potential|sync|quorum)"
    );
    describe_gauge!(
        "tidemark_replica_synchronous_apply",
        "1 if the replica is a sync standby and the primary's synchronous_commit default is remote_apply"
    );
    describe_counter!(
        "tidemark_shared_errors_total",
        "calls to the shared store (redis) that failed or timed out; keyed and causal reads went to the primary"
    );
    describe_gauge!(
        "tidemark_shared_up",
        "1 while the shared store (redis) answers, 0 after a failed call"
    );
    describe_gauge!(
        "tidemark_primary_latency_seconds",
        "average round trip of the monitor's polls of the primary: the adaptive wait budget (routing.wait)"
    );
    describe_gauge!(
        "tidemark_paused",
        "1 while the console PAUSE holds new transactions"
    );
}

/// Registers label sets known in advance so dashboards show zeros rather than "no data".
fn preregister() {
    // Reasons a read can end up on the primary for (not `eligible`, `write`, ...).
    for r in Reason::ALL.iter().filter(|r| {
        !matches!(
            r,
            Reason::Write
                | Reason::Pinned
                | Reason::Eligible
                | Reason::ReplicaCaughtUp
                | Reason::AppliedAtCommit
        )
    }) {
        counter!("tidemark_fallbacks_total", "reason" => r.as_str()).absolute(0);
    }
    for r in EXTRA_FALLBACK_REASONS {
        counter!("tidemark_fallbacks_total", "reason" => r).absolute(0);
    }
    for o in ["replica", "fallback"] {
        let _ = histogram!("tidemark_lsn_wait_seconds", "outcome" => o);
    }
    for o in crate::tx_shapes::TxOutcome::ALL {
        counter!("tidemark_transactions_total", "outcome" => o.as_str()).absolute(0);
    }
    counter!("tidemark_transaction_replays_total").absolute(0);
    counter!("tidemark_transaction_replayed_bytes_total").absolute(0);
    gauge!("tidemark_client_connections").increment(0.0);
    gauge!("tidemark_split_brain").increment(0.0);
    gauge!("tidemark_paused").set(0.0);
    for op in ["read", "publish", "raise", "prune"] {
        counter!("tidemark_shared_errors_total", "op" => op).absolute(0);
    }
    gauge!("tidemark_reads_replica_ratio").set(0.0);
}

/// Set once the Prometheus recorder is installed (it then stays for the life of the process).
static INSTALLED: AtomicBool = AtomicBool::new(false);

/// Identity of a `&'static str` label value: its address and length. The strings come from
/// a fixed set of literals, so equal identity means equal text; the same text at two
/// addresses only costs a second cached handle to the same registry counter.
type StaticId = (usize, usize);

fn id(s: &'static str) -> StaticId {
    (s.as_ptr() as usize, s.len())
}

thread_local! {
    /// Per-statement counter handles by (metric, label value, label value): the `counter!`
    /// macro builds the label list and looks the key up in the registry on every call, which
    /// showed in the per-statement profile. Handles are cached only once the recorder exists
    /// (a handle taken before would stay a no-op). Keyed by the strings' identity, not their
    /// text: hashing the text showed in the profile too.
    static COUNTERS: RefCell<Counters> = RefCell::new(Default::default());
}

type Counters = rustc_hash::FxHashMap<(StaticId, StaticId, StaticId), Counter>;

/// The handle of `counter!(name, k1 => v1, k2 => v2)`, cached in `c` per label values (call
/// only once the recorder is installed).
fn handle2<'c>(
    c: &'c mut Counters,
    name: &'static str,
    (k1, v1): (&'static str, &'static str),
    (k2, v2): (&'static str, &'static str),
) -> &'c Counter {
    c.entry((id(name), id(v1), id(v2)))
        .or_insert_with(|| counter!(name, k1 => v1, k2 => v2))
}

/// `counter!(name, k1 => v1, k2 => v2).increment(1)` with the handle cached per label values.
fn count2(
    c: &mut Counters,
    name: &'static str,
    (k1, v1): (&'static str, &'static str),
    (k2, v2): (&'static str, &'static str),
) {
    if !INSTALLED.load(Ordering::Relaxed) {
        return counter!(name, k1 => v1, k2 => v2).increment(1);
    }
    handle2(c, name, (k1, v1), (k2, v2)).increment(1)
}

/// The counter handles of a session's last few [`routed_cached`] label sets: a session's
/// units mostly route alike, and even the thread-local handle lookups of [`routed`] showed in
/// the per-statement profile. A transaction's statements take up to four sets (its first
/// statement on the primary, then writes, reads and its end on the held connection): with
/// one slot, every statement of a TPC-B-like transaction missed. Allocated at a session's
/// first statement, so an idle client costs one pointer.
#[derive(Default)]
pub struct RoutedCache(Option<Box<RoutedSlots>>);

#[derive(Default)]
struct RoutedSlots {
    slots: [Option<RoutedSlot>; ROUTED_SLOTS],
    /// The slot the next new label set replaces.
    next: usize,
}

const ROUTED_SLOTS: usize = 4;

type RoutedKey = (StaticId, StaticId, Option<StaticId>);

struct RoutedSlot {
    key: RoutedKey,
    statements: Counter,
    reads: Option<Counter>,
}

/// [`routed`], with the handles kept in the session's `cache` while the label values stay
/// among its last few.
pub fn routed_cached(
    cache: &mut RoutedCache,
    class: &'static str,
    target: &'static str,
    read: Option<&'static str>,
) {
    if !INSTALLED.load(Ordering::Relaxed) {
        return routed(class, target, read);
    }
    let key = (id(class), id(target), read.map(id));
    let cache = cache.0.get_or_insert_with(Default::default);
    let hit = cache.slots.iter().flatten().find(|slot| slot.key == key);
    let slot = match hit {
        Some(slot) => slot,
        None => {
            let slot = COUNTERS.with(|c| {
                let mut c = c.borrow_mut();
                RoutedSlot {
                    key,
                    statements: handle2(
                        &mut c,
                        "tidemark_statements_total",
                        ("class", class),
                        ("target", target),
                    )
                    .clone(),
                    reads: read.map(|reason| {
                        handle2(
                            &mut c,
                            "tidemark_reads_total",
                            ("target", target),
                            ("reason", reason),
                        )
                        .clone()
                    }),
                }
            });
            let at = cache.next;
            cache.next = (at + 1) % ROUTED_SLOTS;
            cache.slots[at].insert(slot)
        }
    };
    slot.statements.increment(1);
    if let Some(c) = &slot.reads {
        c.increment(1);
    }
    recent_routed(target, read.is_some());
}

/// The status page's ring: a statement, and whether it was a read on a replica or the primary.
fn recent_routed(target: &'static str, read: bool) {
    let read = read.then(|| {
        if target == "replica" {
            recent::Event::ReplicaRead
        } else {
            recent::Event::PrimaryRead
        }
    });
    recent::add2(recent::Event::Statement, read);
}

/// One routed unit: `tidemark_statements_total` by class and target, and for a read also
/// `tidemark_reads_total` by target and reason (`read`), in one pass (the per-statement path).
pub fn routed(class: &'static str, target: &'static str, read: Option<&'static str>) {
    COUNTERS.with(|c| {
        let mut c = c.borrow_mut();
        count2(
            &mut c,
            "tidemark_statements_total",
            ("class", class),
            ("target", target),
        );
        if let Some(reason) = read {
            count2(
                &mut c,
                "tidemark_reads_total",
                ("target", target),
                ("reason", reason),
            );
        }
    });
    recent_routed(target, read.is_some());
}

pub fn fallback(reason: &'static str) {
    counter!("tidemark_fallbacks_total", "reason" => reason).increment(1);
    recent::add(recent::Event::Fallback(reason));
}

/// One transaction's outcome (`tidemark_transactions_total`).
pub fn transaction(outcome: &'static str) {
    counter!("tidemark_transactions_total", "outcome" => outcome).increment(1);
}

/// One optimistic transaction replayed on the primary, and the bytes it replayed.
pub fn transaction_replay(bytes: usize) {
    counter!("tidemark_transaction_replays_total").increment(1);
    counter!("tidemark_transaction_replayed_bytes_total").increment(bytes as u64);
}

/// A replica's position checked in the same round trip as the read it gates
/// (`tidemark_replica_checks_total{result="caught_up"|"behind"}`).
pub fn replica_check(result: &'static str) {
    counter!("tidemark_replica_checks_total", "result" => result).increment(1);
}

pub fn lsn_wait(d: Duration, outcome: &'static str) {
    histogram!("tidemark_lsn_wait_seconds", "outcome" => outcome).record(d.as_secs_f64());
}

/// Appends the pools' checkout-wait histograms (`tidemark_pool_checkout_wait_seconds`, kept
/// by each pool: see `Pool::wait_histogram`) to a Prometheus text render.
pub fn render_pool_waits(pools: &[std::sync::Arc<crate::pool::Pool>], out: &mut String) {
    use std::fmt::Write;
    const NAME: &str = "tidemark_pool_checkout_wait_seconds";
    if pools.is_empty() {
        return;
    }
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    let _ = writeln!(
        out,
        "# HELP {NAME} Time waiting for a server connection from a pool\n# TYPE {NAME} histogram"
    );
    for p in pools {
        let h = p.wait_histogram();
        let pool = label_value(&p.name);
        for (bound, n) in crate::pool::WAIT_BUCKETS.iter().zip(h.buckets) {
            let _ = writeln!(out, "{NAME}_bucket{{pool=\"{pool}\",le=\"{bound}\"}} {n}");
        }
        let _ = writeln!(
            out,
            "{NAME}_bucket{{pool=\"{pool}\",le=\"+Inf\"}} {count}\n{NAME}_sum{{pool=\"{pool}\"}} {sum}\n{NAME}_count{{pool=\"{pool}\"}} {count}",
            count = h.count,
            sum = h.sum_seconds
        );
    }
}

/// A Prometheus label value, escaped (pool names hold database and user names).
fn label_value(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

pub fn error(sqlstate: &str) {
    // SQLSTATEs are five characters from a fixed alphabet; anything else is folded so a
    // misbehaving server cannot mint label values.
    let code = if sqlstate.len() == 5 && sqlstate.bytes().all(|b| b.is_ascii_alphanumeric()) {
        sqlstate.to_string()
    } else {
        "XXXXX".to_string()
    };
    counter!("tidemark_errors_total", "sqlstate" => code).increment(1);
    recent::add(recent::Event::Error);
}

pub fn pending_logins(delta: f64) {
    gauge!("tidemark_pending_logins").increment(delta);
}

pub fn login_refused() {
    counter!("tidemark_logins_refused_total").increment(1);
}

pub fn clients(delta: f64) {
    gauge!("tidemark_client_connections").increment(delta);
}

/// A call to the shared store (Redis) failed or timed out (`op`: read, publish, raise, prune).
pub fn shared_error(op: &'static str) {
    counter!("tidemark_shared_errors_total", "op" => op).increment(1);
}

/// The primary's average poll round trip (the adaptive wait budget).
pub fn primary_latency(d: Duration) {
    gauge!("tidemark_primary_latency_seconds").set(d.as_secs_f64());
}

/// 1 while the shared store (Redis) answers, 0 after a failed call.
pub fn shared_up(up: bool) {
    gauge!("tidemark_shared_up").set(if up { 1.0 } else { 0.0 });
}

pub fn lsn_captured() {
    counter!("tidemark_commit_lsn_captures_total").increment(1);
}

pub fn lsn_capture_skipped() {
    counter!("tidemark_commit_lsn_captures_skipped_total").increment(1);
}

/// One node's gauges and lag histograms as handles, made once: the monitor records them on
/// every sample (every few milliseconds per node), and building the label set and looking
/// the key up in the registry each time cost more than the poll itself.
pub struct NodeMetrics {
    name: String,
    role: [(&'static str, Gauge); 3],
    healthy: Gauge,
    in_rotation: Gauge,
    lag_seconds: Gauge,
    lag_bytes: Gauge,
    lag_sample_seconds: Histogram,
    lag_sample_bytes: Histogram,
    sync_state: [(&'static str, Gauge); 4],
    synchronous_apply: Gauge,
}

impl NodeMetrics {
    /// Handles for `node`, or `None` while no recorder is installed (a handle taken before
    /// would stay a no-op for good).
    pub fn new(node: &str) -> Option<NodeMetrics> {
        if !INSTALLED.load(Ordering::Relaxed) {
            return None;
        }
        let n = || node.to_string();
        let role = |r: &'static str| (r, gauge!("tidemark_node_role", "node" => n(), "role" => r));
        let sync = |s: &'static str| {
            (
                s,
                gauge!("tidemark_replica_sync_state", "node" => n(), "state" => s),
            )
        };
        Some(NodeMetrics {
            name: n(),
            role: [role("primary"), role("replica"), role("unknown")],
            healthy: gauge!("tidemark_node_healthy", "node" => n()),
            in_rotation: gauge!("tidemark_node_in_rotation", "node" => n()),
            lag_seconds: gauge!("tidemark_replica_lag_seconds", "node" => n()),
            lag_bytes: gauge!("tidemark_replica_lag_bytes", "node" => n()),
            lag_sample_seconds: histogram!("tidemark_replica_lag_sample_seconds", "node" => n()),
            lag_sample_bytes: histogram!("tidemark_replica_lag_sample_bytes", "node" => n()),
            sync_state: [
                sync("async"),
                sync("potential"),
                sync("sync"),
                sync("quorum"),
            ],
            synchronous_apply: gauge!("tidemark_replica_synchronous_apply", "node" => n()),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Role (one of primary/replica/unknown is 1), health and rotation.
    pub fn state(&self, role: &str, healthy: bool, in_rotation: bool) {
        for (r, g) in &self.role {
            g.set(if *r == role { 1.0 } else { 0.0 });
        }
        self.healthy.set(healthy as u8 as f64);
        self.in_rotation.set(in_rotation as u8 as f64);
    }

    /// A replica's lag in time and bytes (gauges, and one sample for the histograms).
    pub fn lag(&self, lag: Duration, bytes: u64) {
        self.lag_seconds.set(lag.as_secs_f64());
        self.lag_bytes.set(bytes as f64);
        self.lag_sample_seconds.record(lag.as_secs_f64());
        self.lag_sample_bytes.record(bytes as f64);
    }

    /// How the primary lists the replica in `pg_stat_replication`, and whether tidemark
    /// considers it a `remote_apply` synchronous standby.
    pub fn sync(&self, sync_state: &str, synchronous_apply: bool) {
        for (s, g) in &self.sync_state {
            g.set(if *s == sync_state { 1.0 } else { 0.0 });
        }
        self.synchronous_apply.set(synchronous_apply as u8 as f64);
    }
}

pub fn split_brain(active: bool) {
    gauge!("tidemark_split_brain").set(active as u8 as f64);
}

pub fn paused(on: bool) {
    gauge!("tidemark_paused").set(on as u8 as f64);
}

pub fn replication_slot(slot: &str, retained_bytes: f64, active: bool) {
    gauge!("tidemark_replication_slot_retained_bytes", "slot" => slot.to_string())
        .set(retained_bytes);
    gauge!("tidemark_replication_slot_active", "slot" => slot.to_string()).set(active as u8 as f64);
}

/// The last minute, second by second, for the status page.
pub mod recent {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;

    use parking_lot::Mutex;

    /// Seconds kept (one more than the window, so the current partial second is extra).
    const SLOTS: usize = 61;

    pub enum Event {
        Statement,
        ReplicaRead,
        PrimaryRead,
        Fallback(&'static str),
        Error,
    }

    /// One second's counts. The per-statement events are atomics (a lock per statement
    /// showed in the per-statement profile); a slot is reset for a new second, and fallback
    /// reasons are counted, under the ring's lock.
    #[derive(Default)]
    struct Slot {
        sec: AtomicU64,
        statements: AtomicU64,
        replica_reads: AtomicU64,
        primary_reads: AtomicU64,
        errors: AtomicU64,
    }

    struct Ring {
        slots: Vec<Slot>,
        /// Per slot: fallback reasons (from a fixed set of `&'static str`, so small).
        fallbacks: Mutex<Vec<Vec<(&'static str, u64)>>>,
    }

    /// The coarse clock's second when the process first recorded anything.
    fn start() -> u64 {
        static START: OnceLock<u64> = OnceLock::new();
        *START.get_or_init(crate::clock::coarse_secs)
    }

    fn ring() -> &'static Ring {
        static RING: OnceLock<Ring> = OnceLock::new();
        RING.get_or_init(|| Ring {
            slots: (0..SLOTS).map(|_| Slot::default()).collect(),
            fallbacks: Mutex::new(vec![Vec::new(); SLOTS]),
        })
    }

    /// Seconds since the process first recorded anything (plus one, so 0 means "never").
    fn now_sec() -> u64 {
        crate::clock::coarse_secs().saturating_sub(start()) + 1
    }

    pub fn add(e: Event) {
        add2(e, None)
    }

    /// Records one or two events (the per-statement path).
    pub fn add2(e: Event, more: Option<Event>) {
        let sec = now_sec();
        let r = ring();
        let i = (sec as usize) % SLOTS;
        let s = &r.slots[i];
        if s.sec.load(Ordering::Acquire) != sec {
            let mut fb = r.fallbacks.lock();
            if s.sec.load(Ordering::Relaxed) != sec {
                for c in [&s.statements, &s.replica_reads, &s.primary_reads, &s.errors] {
                    c.store(0, Ordering::Relaxed);
                }
                fb[i].clear();
                s.sec.store(sec, Ordering::Release);
            }
        }
        r.count(i, e);
        if let Some(e) = more {
            r.count(i, e);
        }
    }

    impl Ring {
        fn count(&self, i: usize, e: Event) {
            let s = &self.slots[i];
            let c = match e {
                Event::Statement => &s.statements,
                Event::ReplicaRead => &s.replica_reads,
                Event::PrimaryRead => &s.primary_reads,
                Event::Error => &s.errors,
                Event::Fallback(reason) => {
                    let mut fb = self.fallbacks.lock();
                    match fb[i].iter_mut().find(|(r, _)| *r == reason) {
                        Some((_, n)) => *n += 1,
                        None => fb[i].push((reason, 1)),
                    }
                    return;
                }
            };
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Totals and a per-second series over the last `window` completed seconds plus the
    /// current one.
    #[derive(Clone, Debug, Default)]
    pub struct Summary {
        pub window_seconds: u64,
        pub statements: u64,
        pub replica_reads: u64,
        pub primary_reads: u64,
        pub errors: u64,
        pub fallbacks: Vec<(&'static str, u64)>,
        /// Oldest first: (replica reads, primary reads, fallbacks) per second.
        pub per_second: Vec<(u64, u64, u64)>,
    }

    pub fn summary(window: u64) -> Summary {
        let window = window.min(SLOTS as u64 - 1);
        let now = now_sec();
        let r = ring();
        let fallbacks = r.fallbacks.lock();
        let mut out = Summary {
            window_seconds: window,
            ..Summary::default()
        };
        // Always `window` entries ending with the current second; seconds before the
        // process started are empty.
        for i in 0..window {
            let Some(sec) = (now + 1 + i).checked_sub(window).filter(|s| *s > 0) else {
                out.per_second.push((0, 0, 0));
                continue;
            };
            let i = (sec as usize) % SLOTS;
            let s = &r.slots[i];
            if s.sec.load(Ordering::Acquire) != sec {
                out.per_second.push((0, 0, 0));
                continue;
            }
            let replica_reads = s.replica_reads.load(Ordering::Relaxed);
            let primary_reads = s.primary_reads.load(Ordering::Relaxed);
            out.statements += s.statements.load(Ordering::Relaxed);
            out.replica_reads += replica_reads;
            out.primary_reads += primary_reads;
            out.errors += s.errors.load(Ordering::Relaxed);
            let mut fb = 0;
            for (reason, n) in &fallbacks[i] {
                fb += n;
                match out.fallbacks.iter_mut().find(|(r, _)| r == reason) {
                    Some((_, t)) => *t += n,
                    None => out.fallbacks.push((reason, *n)),
                }
            }
            out.per_second.push((replica_reads, primary_reads, fb));
        }
        out.fallbacks
            .sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        out
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn counts_land_in_the_current_second() {
            let before = summary(60);
            add(Event::ReplicaRead);
            add(Event::ReplicaRead);
            add(Event::PrimaryRead);
            add(Event::Fallback("replicas_behind"));
            let after = summary(60);
            // Other tests in this process may record too; ours are at least there.
            assert!(after.replica_reads >= before.replica_reads + 2);
            assert!(after.primary_reads > before.primary_reads);
            assert!(after
                .fallbacks
                .iter()
                .any(|(r, n)| *r == "replicas_behind" && *n >= 1));
            assert_eq!(after.per_second.len(), 60);
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn label_values_are_escaped() {
        assert_eq!(super::label_value("db/user@node"), "db/user@node");
        assert_eq!(
            super::label_value("a\"b\\c\nd"),
            "a\\\"b\\\\c\\nd".to_string()
        );
    }
}
