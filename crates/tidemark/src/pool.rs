//! Server connection pools, one per (node, database, user): bounded size, checkout
//! timeout (53300 naming the pool), idle timeout and server lifetime.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::clock::Coarse;

use parking_lot::Mutex;
use tidemark_core::NodeId;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::PoolConfig;
use crate::server::{ServerConn, ServerError, ServerTarget};

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub node: NodeId,
    pub database: String,
    pub user: String,
}

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("no server connection available in pool {pool} within {waited:?} (all {max} in use)")]
    Exhausted {
        pool: String,
        waited: Duration,
        max: usize,
    },
    #[error("{0}")]
    Server(#[from] ServerError),
}

#[derive(Default, Debug)]
pub struct PoolStats {
    pub open: AtomicUsize,
    pub in_use: AtomicUsize,
    pub waiting: AtomicUsize,
    pub checkouts: AtomicU64,
    pub wait_micros: AtomicU64,
    pub timeouts: AtomicU64,
}

/// Upper bounds (seconds) of the checkout-wait histogram's buckets.
pub const WAIT_BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// A pool's checkout-wait histogram as Prometheus shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct WaitHistogram {
    /// Cumulative counts per bound of [`WAIT_BUCKETS`].
    pub buckets: [u64; WAIT_BUCKETS.len()],
    pub count: u64,
    pub sum_seconds: f64,
}

/// Cumulative bucket counts of `count` checkouts of which `waited[i]` waited up to
/// `WAIT_BUCKETS[i]` (the last entry: longer) and the rest did not wait.
fn cumulative_waits(
    count: u64,
    waited: &[u64; WAIT_BUCKETS.len() + 1],
) -> [u64; WAIT_BUCKETS.len()] {
    let mut cumulative = count.saturating_sub(waited.iter().sum());
    let mut buckets = [0; WAIT_BUCKETS.len()];
    for (b, w) in buckets.iter_mut().zip(waited) {
        cumulative += w;
        *b = cumulative.min(count);
    }
    buckets
}

/// One server connection as SHOW SERVERS shows it.
#[derive(Clone, Debug)]
pub struct ServerInfo {
    pub pid: i32,
    pub active: bool,
    pub created: Coarse,
    /// Checked out at (active) or last used at (idle).
    pub since: Coarse,
}

pub struct Pool {
    pub key: PoolKey,
    pub name: String,
    target: ServerTarget,
    settings: Mutex<PoolConfig>,
    conns: Mutex<Conns>,
    sem: Arc<Semaphore>,
    max: AtomicUsize,
    pub stats: PoolStats,
    /// Checkouts that waited, by bucket of [`WAIT_BUCKETS`] (the last one: longer). Those
    /// that did not wait are `stats.checkouts` minus these. The pool keeps its checkout-wait
    /// histogram itself ([`Pool::wait_histogram`], rendered by `metrics::render_pool_waits`):
    /// a histogram of the metrics recorder costs ~150 instructions per recorded value
    /// (`record_many` records them one by one), which showed in the per-statement profile,
    /// while a checkout that did not wait, the common case, only counts here in `checkouts`.
    waited: [AtomicU64; WAIT_BUCKETS.len() + 1],
    /// Its node was removed or moved by a RELOAD: the pool is no longer in [`Pools`], its
    /// idle connections are closed and connections in use are closed when they come back.
    draining: AtomicBool,
}

/// The pool's connections and the limits a checkout applies to them, under one lock: a
/// checkout and a release take it once each (separate locks for the idle list, the in-use list
/// and the settings showed in the per-statement profile).
struct Conns {
    /// Boxed: a connection moves through several futures per checkout, and moving the
    /// struct itself showed as memcpy in the per-statement profile.
    #[allow(clippy::vec_box)]
    idle: Vec<Box<ServerConn>>,
    /// Checked-out connections: (backend pid, connected at, checked out at), in slots a
    /// checkout takes and its release frees (a hash map's insert and remove per statement
    /// showed in the per-statement profile).
    active: slab::Slab<(i32, Coarse, Coarse)>,
    /// `server_lifetime` and `idle_timeout` of the settings.
    lifetime: Duration,
    idle_timeout: Duration,
}

/// A checked-out server connection. Dropping it without [`Pool::release`] closes the
/// connection (the safe default after an error).
pub struct Checked {
    pub conn: Box<ServerConn>,
    _permit: OwnedSemaphorePermit,
    guard: InUse,
}

/// Counts a connection as in use for as long as it is checked out (it is in the pool's
/// `active` list from checkout), and as closed when it is dropped without going back to the
/// pool (`.1`: it went back, and `put_back` took it off the list; `.2`: its `active` slot).
struct InUse(Arc<Pool>, bool, usize);

impl InUse {
    /// For a connection already entered in `active`, at `slot`.
    fn entered(pool: &Arc<Pool>, slot: usize) -> InUse {
        pool.stats.in_use.fetch_add(1, Ordering::Relaxed);
        InUse(pool.clone(), false, slot)
    }
}

impl Drop for InUse {
    fn drop(&mut self) {
        self.0.stats.in_use.fetch_sub(1, Ordering::Relaxed);
        if !self.1 {
            self.0.conns.lock().active.try_remove(self.2);
            self.0.stats.open.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Checked {
    pub fn pool(&self) -> &Arc<Pool> {
        &self.guard.0
    }

    /// Gives the connection back to its pool (a broken one is closed instead).
    pub fn release(self) {
        let Checked {
            conn, mut guard, ..
        } = self;
        guard.1 = true;
        guard.0.put_back(conn, Some(guard.2));
    }
}

/// Whether an idle connection may serve another client at `now`: within its lifetime and
/// idle timeout, and nothing arrived from the server while it was idle. (The probe reads the
/// socket's readiness; it makes a system call only when the server did send something.)
fn fit_to_serve(
    conn: &mut ServerConn,
    now: Coarse,
    lifetime: Duration,
    idle_timeout: Duration,
) -> bool {
    now.duration_since(conn.created) <= lifetime
        && now.duration_since(conn.last_used) <= idle_timeout
        && !conn.has_unexpected_input()
}

impl Pool {
    pub fn new(key: PoolKey, node_name: &str, target: ServerTarget, settings: PoolConfig) -> Pool {
        let max = settings.max_size;
        Pool {
            name: format!("{}/{}@{}", key.database, key.user, node_name),
            key,
            target,
            conns: Mutex::new(Conns {
                idle: Vec::new(),
                active: Default::default(),
                lifetime: settings.server_lifetime,
                idle_timeout: settings.idle_timeout,
            }),
            settings: Mutex::new(settings),
            sem: Arc::new(Semaphore::new(max)),
            max: AtomicUsize::new(max),
            stats: PoolStats::default(),
            waited: Default::default(),
            draining: AtomicBool::new(false),
        }
    }

    /// True once a RELOAD removed or moved its node (see [`Pools::drain_node`]).
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    pub fn max_size(&self) -> usize {
        self.max.load(Ordering::Relaxed)
    }

    pub fn idle_count(&self) -> usize {
        self.conns.lock().idle.len()
    }

    /// The pool's server connections for SHOW SERVERS, active ones first.
    pub fn servers(&self) -> Vec<ServerInfo> {
        let conns = self.conns.lock();
        let mut v: Vec<ServerInfo> = conns
            .active
            .iter()
            .map(|(_, (pid, created, since))| ServerInfo {
                pid: *pid,
                active: true,
                created: *created,
                since: *since,
            })
            .collect();
        v.sort_by_key(|s| s.pid);
        v.extend(conns.idle.iter().map(|c| ServerInfo {
            pid: c.backend_pid,
            active: false,
            created: c.created,
            since: c.last_used,
        }));
        v
    }

    /// Applies new settings (RELOAD); a larger max takes effect at once, a smaller one as
    /// connections come back.
    pub fn update_settings(&self, s: PoolConfig) {
        let old = self.max.swap(s.max_size, Ordering::Relaxed);
        if s.max_size > old {
            self.sem.add_permits(s.max_size - old);
        } else if s.max_size < old {
            let sem = self.sem.clone();
            let n = (old - s.max_size) as u32;
            tokio::spawn(async move {
                if let Ok(p) = sem.acquire_many(n).await {
                    p.forget();
                }
            });
        }
        {
            let mut c = self.conns.lock();
            c.lifetime = s.server_lifetime;
            c.idle_timeout = s.idle_timeout;
        }
        *self.settings.lock() = s;
    }

    pub async fn checkout(self: &Arc<Self>) -> Result<Checked, PoolError> {
        self.checkout_with(true).await
    }

    /// A checkout that fails at once (`Exhausted`, waited 0) when every connection is in use.
    pub async fn checkout_nowait(self: &Arc<Self>) -> Result<Checked, PoolError> {
        self.checkout_with(false).await
    }

    /// The common checkout, without a future: a free slot and an idle connection fit to
    /// serve. `None` when the pool would have to wait or connect (then [`Pool::checkout`]),
    /// and for a draining pool. Three nested futures around what is a few loads and a
    /// lock in the common case showed in the per-statement profile.
    pub fn try_checkout_idle(self: &Arc<Self>) -> Option<Checked> {
        if self.is_draining() {
            return None;
        }
        let permit = self.sem.clone().try_acquire_owned().ok()?;
        let now = Coarse::now();
        let mut conns = self.conns.lock();
        let (lifetime, idle_timeout) = (conns.lifetime, conns.idle_timeout);
        if !fit_to_serve(conns.idle.last_mut()?, now, lifetime, idle_timeout) {
            // Closing it is the full checkout's part.
            return None;
        }
        let conn = conns.idle.pop()?;
        self.stats.checkouts.fetch_add(1, Ordering::Release);
        Some(self.hand_out(conns, conn, now, permit))
    }

    /// Enters `conn` as checked out at `now` under the pool's lock (`conns`, released here)
    /// and gives it to the caller.
    fn hand_out(
        self: &Arc<Self>,
        mut conns: parking_lot::MutexGuard<'_, Conns>,
        mut conn: Box<ServerConn>,
        now: Coarse,
        permit: OwnedSemaphorePermit,
    ) -> Checked {
        conn.last_used = now;
        let slot = conns.active.insert((conn.backend_pid, conn.created, now));
        drop(conns);
        Checked {
            guard: InUse::entered(self, slot),
            conn,
            _permit: permit,
        }
    }

    async fn checkout_with(self: &Arc<Self>, wait: bool) -> Result<Checked, PoolError> {
        // A free slot is the common case: take it without arming a timer, reading the clock
        // or the settings (all showed in the per-statement profile).
        let (permit, waited) = match self.sem.clone().try_acquire_owned() {
            Ok(p) => (p, Duration::ZERO),
            Err(_) if !wait => {
                return Err(PoolError::Exhausted {
                    pool: self.name.clone(),
                    waited: Duration::ZERO,
                    max: self.max_size(),
                })
            }
            Err(_) => {
                let timeout = self.settings.lock().checkout_timeout;
                let start = Instant::now();
                self.stats.waiting.fetch_add(1, Ordering::Relaxed);
                let permit = tokio::time::timeout(timeout, self.sem.clone().acquire_owned()).await;
                self.stats.waiting.fetch_sub(1, Ordering::Relaxed);
                match permit {
                    Ok(Ok(p)) => (p, start.elapsed()),
                    _ => {
                        self.stats.timeouts.fetch_add(1, Ordering::Relaxed);
                        return Err(PoolError::Exhausted {
                            pool: self.name.clone(),
                            waited: timeout,
                            max: self.max_size(),
                        });
                    }
                }
            }
        };
        if !waited.is_zero() {
            self.stats
                .wait_micros
                .fetch_add(waited.as_micros() as u64, Ordering::Relaxed);
            let secs = waited.as_secs_f64();
            let i = WAIT_BUCKETS.partition_point(|b| *b < secs);
            // Before `checkouts` (Release), which `wait_histogram` reads first (Acquire): a
            // render never counts this checkout as one that did not wait.
            self.waited[i].fetch_add(1, Ordering::Relaxed);
        }
        self.stats.checkouts.fetch_add(1, Ordering::Release);
        let now = Coarse::now();
        loop {
            let mut conns = self.conns.lock();
            let Some(mut conn) = conns.idle.pop() else {
                break;
            };
            if !fit_to_serve(&mut conn, now, conns.lifetime, conns.idle_timeout) {
                drop(conns);
                // Closed outside the lock.
                drop(conn);
                self.stats.open.fetch_sub(1, Ordering::Relaxed);
                continue;
            }
            return Ok(self.hand_out(conns, conn, now, permit));
        }
        let connect_timeout = self.settings.lock().connect_timeout;
        let conn = Box::new(ServerConn::connect(&self.target, connect_timeout).await?);
        self.stats.open.fetch_add(1, Ordering::Relaxed);
        Ok(self.hand_out(self.conns.lock(), conn, Coarse::now(), permit))
    }

    /// Takes a connection back (off the `active` list, from its `slot` there): kept idle if
    /// it can serve another client, closed otherwise.
    fn put_back(&self, mut conn: Box<ServerConn>, slot: Option<usize>) {
        // The one gate: a connection that still owes anything, is in a transaction or was
        // lost track of is closed, never handed to another client.
        // (What the server sends while the connection is idle is looked for at its next
        // checkout: probing the socket here too cost a readiness poll per statement.)
        let reusable = conn.reusable();
        if !reusable && !conn.broken && !conn.proto.is_idle() {
            tracing::debug!(pool = %self.name, phase = ?conn.proto.phase(), "server connection not idle at release: closed");
        }
        conn.last_used = Coarse::now();
        let mut conns = self.conns.lock();
        if let Some(i) = slot {
            conns.active.try_remove(i);
        }
        // Draining is checked under this lock, which `drain_idle` takes after the flag is set.
        let draining = self.is_draining();
        if reusable && !draining {
            conns.idle.push(conn);
            return;
        }
        drop(conns);
        if reusable {
            tracing::debug!(pool = %self.name, "server connection of a drained pool closed at release");
        }
        // Closed outside the lock.
        drop(conn);
        self.stats.open.fetch_sub(1, Ordering::Relaxed);
    }

    /// The checkout-wait histogram: every successful checkout, by time waited.
    pub fn wait_histogram(&self) -> WaitHistogram {
        let count = self.stats.checkouts.load(Ordering::Acquire);
        let waited = self.waited.each_ref().map(|w| w.load(Ordering::Relaxed));
        WaitHistogram {
            buckets: cumulative_waits(count, &waited),
            count,
            sum_seconds: self.stats.wait_micros.load(Ordering::Relaxed) as f64 / 1e6,
        }
    }

    /// Closes idle connections past their idle timeout or lifetime.
    pub fn reap(&self) {
        let now = Coarse::now();
        let closed: Vec<Box<ServerConn>> = {
            let mut conns = self.conns.lock();
            let (lifetime, idle_timeout) = (conns.lifetime, conns.idle_timeout);
            let (keep, closed) = std::mem::take(&mut conns.idle).into_iter().partition(|c| {
                now.duration_since(c.created) <= lifetime
                    && now.duration_since(c.last_used) <= idle_timeout
            });
            conns.idle = keep;
            closed
        };
        self.stats.open.fetch_sub(closed.len(), Ordering::Relaxed);
    }

    /// Opens connections until `min` are open (best effort: failures wait for the next round).
    pub async fn top_up(self: &Arc<Self>, min: usize) {
        if crate::passthrough::lacks_keys(&self.target) {
            // SCRAM pass-through with no ClientKey yet: nothing to log in with until a client
            // of this user logs in (then the next round opens them).
            return;
        }
        while self.stats.open.load(Ordering::Relaxed) < min.min(self.max_size()) {
            let Ok(permit) = self.sem.clone().try_acquire_owned() else {
                return;
            };
            let timeout = self.settings.lock().connect_timeout;
            match ServerConn::connect(&self.target, timeout).await {
                Ok(conn) => {
                    self.stats.open.fetch_add(1, Ordering::Relaxed);
                    self.put_back(Box::new(conn), None);
                    drop(permit);
                }
                Err(e) => {
                    tracing::debug!(pool = %self.name, error = %e, "could not open a min_size connection");
                    return;
                }
            }
        }
    }

    /// Closes every idle connection (e.g. after a failover).
    pub fn drain_idle(&self) {
        let idle = std::mem::take(&mut self.conns.lock().idle);
        self.stats.open.fetch_sub(idle.len(), Ordering::Relaxed);
    }
}

/// All pools, created on first use.
#[derive(Default)]
pub struct Pools {
    map: Mutex<HashMap<PoolKey, Arc<Pool>>>,
}

impl Pools {
    pub fn get_or_create(&self, key: PoolKey, make: impl FnOnce() -> Pool) -> Arc<Pool> {
        let mut m = self.map.lock();
        m.entry(key).or_insert_with(|| Arc::new(make())).clone()
    }

    /// Forgets a pool that holds no connection (a login the server refused: an unknown
    /// database or role must not leave a pool, metric series and reaper work behind).
    pub fn remove_if_empty(&self, key: &PoolKey) -> bool {
        let mut m = self.map.lock();
        let empty = m.get(key).is_some_and(|p| {
            p.stats.open.load(Ordering::Relaxed) == 0 && p.stats.in_use.load(Ordering::Relaxed) == 0
        });
        if empty {
            m.remove(key);
        }
        empty
    }

    /// Forgets pools that have had no checkout and no connection for `idle` (the reaper calls
    /// this every second with what it saw last time: checkouts count and since when).
    pub fn drop_idle(
        &self,
        seen: &mut HashMap<PoolKey, (u64, Instant)>,
        idle: Duration,
        now: Instant,
    ) {
        let mut m = self.map.lock();
        m.retain(|key, p| {
            let checkouts = p.stats.checkouts.load(Ordering::Relaxed);
            let busy = p.stats.open.load(Ordering::Relaxed) > 0
                || p.stats.in_use.load(Ordering::Relaxed) > 0
                || p.stats.waiting.load(Ordering::Relaxed) > 0;
            let entry = seen.entry(key.clone()).or_insert((checkouts, now));
            if busy || entry.0 != checkouts {
                *entry = (checkouts, now);
                return true;
            }
            let keep = now.duration_since(entry.1) < idle;
            if !keep {
                tracing::debug!(pool = %p.name, "idle pool dropped");
                seen.remove(key);
            }
            keep
        });
    }

    /// Takes every pool of `node` out of service (its node was removed or moved by a RELOAD):
    /// they are forgotten, so the next checkout on that node makes a new pool (for a moved
    /// node, at its new address), their idle connections are closed and connections in use
    /// are closed when they come back; a transaction running on one finishes first.
    /// Returns how many pools were drained.
    pub fn drain_node(&self, node: NodeId) -> usize {
        let drained = self.drain_where(|k| k.node == node);
        for p in &drained {
            tracing::info!(pool = %p.name, in_use = p.stats.in_use.load(Ordering::Relaxed), "pool drained: its node was removed or moved");
        }
        drained.len()
    }

    /// Takes every pool whose key matches out of service (as [`Pools::drain_node`]): forgotten,
    /// idle connections closed now, connections in use closed when they come back. Returns
    /// the drained pools (their `stats.in_use` tells when the last connection came back).
    pub fn drain_where(&self, matches: impl Fn(&PoolKey) -> bool) -> Vec<Arc<Pool>> {
        let drained: Vec<Arc<Pool>> = {
            let mut m = self.map.lock();
            let keys: Vec<PoolKey> = m.keys().filter(|k| matches(k)).cloned().collect();
            keys.iter().filter_map(|k| m.remove(k)).collect()
        };
        for p in &drained {
            p.draining.store(true, Ordering::Relaxed);
            p.drain_idle();
        }
        drained
    }

    pub fn all(&self) -> Vec<Arc<Pool>> {
        let mut v: Vec<_> = self.map.lock().values().cloned().collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkouts_that_did_not_wait_fill_the_first_bucket() {
        let mut waited = [0; WAIT_BUCKETS.len() + 1];
        assert_eq!(cumulative_waits(0, &waited), [0; WAIT_BUCKETS.len()]);
        assert_eq!(cumulative_waits(7, &waited), [7; WAIT_BUCKETS.len()]);
        // 10 checkouts: 2 waited up to 1 ms (bucket 3), 1 more than the last bound.
        waited[3] = 2;
        waited[WAIT_BUCKETS.len()] = 1;
        let b = cumulative_waits(10, &waited);
        assert_eq!(b[0], 7);
        assert_eq!(b[2], 7);
        assert_eq!(b[3], 9);
        assert_eq!(b[WAIT_BUCKETS.len() - 1], 9);
        // A render that saw a waited checkout before its `checkouts` increment never
        // counts more than `count`, and stays cumulative.
        let b = cumulative_waits(2, &waited);
        assert!(b.windows(2).all(|w| w[0] <= w[1]));
        assert!(b.iter().all(|n| *n <= 2));
    }

    #[test]
    fn a_wait_lands_in_the_first_bucket_at_or_above_it() {
        let i = |secs: f64| WAIT_BUCKETS.partition_point(|b| *b < secs);
        assert_eq!(i(0.00005), 0);
        assert_eq!(i(0.0001), 0);
        assert_eq!(i(0.0002), 1);
        assert_eq!(i(10.0), WAIT_BUCKETS.len() - 1);
        assert_eq!(i(11.0), WAIT_BUCKETS.len());
    }
}
