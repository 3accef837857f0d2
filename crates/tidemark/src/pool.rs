//! Server connection pools, one per (node, database, user): bounded size, checkout
//! timeout (53300 naming the pool), idle timeout and server lifetime.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

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

/// One server connection as SHOW SERVERS shows it.
#[derive(Clone, Debug)]
pub struct ServerInfo {
    pub pid: i32,
    pub active: bool,
    pub created: Instant,
    /// Checked out at (active) or last used at (idle).
    pub since: Instant,
}

pub struct Pool {
    pub key: PoolKey,
    pub name: String,
    target: ServerTarget,
    settings: Mutex<PoolConfig>,
    /// Boxed: a connection moves through several futures per checkout, and moving the
    /// struct itself showed as memcpy in the per-statement profile.
    #[allow(clippy::vec_box)]
    idle: Mutex<Vec<Box<ServerConn>>>,
    /// Checked-out connections by backend pid: (connected at, checked out at).
    /// (Fx hashing: SipHash of the pid showed in the per-statement profile; pids are not
    /// chosen by clients.)
    active: Mutex<rustc_hash::FxHashMap<i32, (Instant, Instant)>>,
    sem: Arc<Semaphore>,
    max: AtomicUsize,
    pub stats: PoolStats,
    /// The checkout-wait histogram's handle, once a metrics recorder exists.
    wait_histogram: std::sync::OnceLock<metrics::Histogram>,
    /// Checkouts that did not wait, not yet in the histogram: recording each one showed in the
    /// per-statement profile (~150 instructions), so they go in as one `record_many(0)` at
    /// the next scrape or reaper round ([`Pool::flush_waits`]).
    unwaited: AtomicU64,
    /// Its node was removed or moved by a RELOAD: the pool is no longer in [`Pools`], its
    /// idle connections are closed and connections in use are closed when they come back.
    draining: AtomicBool,
}

/// A checked-out server connection. Dropping it without [`Pool::release`] closes the
/// connection (the safe default after an error).
pub struct Checked {
    pub conn: Box<ServerConn>,
    _permit: OwnedSemaphorePermit,
    guard: InUse,
}

/// Counts a connection as in use for as long as it is checked out, and as closed when it
/// is dropped without going back to the pool.
struct InUse(Arc<Pool>, bool, i32);

impl InUse {
    fn new(pool: &Arc<Pool>, conn: &ServerConn, now: Instant) -> InUse {
        pool.stats.in_use.fetch_add(1, Ordering::Relaxed);
        pool.active
            .lock()
            .insert(conn.backend_pid, (conn.created, now));
        InUse(pool.clone(), false, conn.backend_pid)
    }
}

impl Drop for InUse {
    fn drop(&mut self) {
        self.0.stats.in_use.fetch_sub(1, Ordering::Relaxed);
        self.0.active.lock().remove(&self.2);
        if !self.1 {
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
        guard.0.clone().put_back(conn);
    }
}

impl Pool {
    pub fn new(key: PoolKey, node_name: &str, target: ServerTarget, settings: PoolConfig) -> Pool {
        let max = settings.max_size;
        Pool {
            name: format!("{}/{}@{}", key.database, key.user, node_name),
            key,
            target,
            settings: Mutex::new(settings),
            idle: Mutex::new(Vec::new()),
            active: Mutex::new(Default::default()),
            sem: Arc::new(Semaphore::new(max)),
            max: AtomicUsize::new(max),
            stats: PoolStats::default(),
            wait_histogram: std::sync::OnceLock::new(),
            unwaited: AtomicU64::new(0),
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
        self.idle.lock().len()
    }

    /// The pool's server connections for SHOW SERVERS, active ones first.
    pub fn servers(&self) -> Vec<ServerInfo> {
        let mut v: Vec<ServerInfo> = self
            .active
            .lock()
            .iter()
            .map(|(pid, (created, since))| ServerInfo {
                pid: *pid,
                active: true,
                created: *created,
                since: *since,
            })
            .collect();
        v.sort_by_key(|s| s.pid);
        v.extend(self.idle.lock().iter().map(|c| ServerInfo {
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
        *self.settings.lock() = s;
    }

    pub async fn checkout(self: &Arc<Self>) -> Result<Checked, PoolError> {
        self.checkout_with(true).await
    }

    /// A checkout that fails at once (`Exhausted`, waited 0) when every connection is in use.
    pub async fn checkout_nowait(self: &Arc<Self>) -> Result<Checked, PoolError> {
        self.checkout_with(false).await
    }

    async fn checkout_with(self: &Arc<Self>, wait: bool) -> Result<Checked, PoolError> {
        let (timeout, lifetime, idle_timeout, connect_timeout) = {
            let s = self.settings.lock();
            (
                s.checkout_timeout,
                s.server_lifetime,
                s.idle_timeout,
                s.connect_timeout,
            )
        };
        // A free slot is the common case: take it without arming a timer or reading the
        // clock (both showed in the per-statement profile).
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
        self.stats
            .wait_micros
            .fetch_add(waited.as_micros() as u64, Ordering::Relaxed);
        self.stats.checkouts.fetch_add(1, Ordering::Relaxed);
        if waited.is_zero() {
            self.unwaited.fetch_add(1, Ordering::Relaxed);
        } else if let Some(h) = self.wait_histogram() {
            h.record(waited.as_secs_f64());
        }
        loop {
            let candidate = self.idle.lock().pop();
            let Some(mut conn) = candidate else { break };
            let now = Instant::now();
            if now.duration_since(conn.created) > lifetime
                || now.duration_since(conn.last_used) > idle_timeout
                || conn.has_unexpected_input()
            {
                self.stats.open.fetch_sub(1, Ordering::Relaxed);
                continue;
            }
            conn.last_used = now;
            let guard = InUse::new(self, &conn, now);
            return Ok(Checked {
                conn,
                _permit: permit,
                guard,
            });
        }
        let conn = Box::new(ServerConn::connect(&self.target, connect_timeout).await?);
        self.stats.open.fetch_add(1, Ordering::Relaxed);
        let guard = InUse::new(self, &conn, Instant::now());
        Ok(Checked {
            conn,
            _permit: permit,
            guard,
        })
    }

    fn put_back(&self, mut conn: Box<ServerConn>) {
        // The one gate: a connection that still owes anything, is in a transaction or was
        // lost track of is closed, never handed to another client.
        if !conn.reusable() || conn.has_unexpected_input() {
            if !conn.broken && !conn.proto.is_idle() {
                tracing::debug!(pool = %self.name, phase = ?conn.proto.phase(), "server connection not idle at release: closed");
            }
            self.stats.open.fetch_sub(1, Ordering::Relaxed);
            return;
        }
        conn.last_used = Instant::now();
        // Checked under the idle lock, which `drain_node` takes after setting the flag.
        let mut idle = self.idle.lock();
        if self.is_draining() {
            drop(idle);
            tracing::debug!(pool = %self.name, "server connection of a drained pool closed at release");
            self.stats.open.fetch_sub(1, Ordering::Relaxed);
            return;
        }
        idle.push(conn);
    }

    fn wait_histogram(&self) -> Option<&metrics::Histogram> {
        if self.wait_histogram.get().is_none() {
            if let Some(h) = crate::metrics::pool_wait_histogram(&self.name) {
                let _ = self.wait_histogram.set(h);
            }
        }
        self.wait_histogram.get()
    }

    /// Puts the checkouts that did not wait into the wait histogram (as zero waits).
    pub fn flush_waits(&self) {
        let n = self.unwaited.swap(0, Ordering::Relaxed);
        if n > 0 {
            if let Some(h) = self.wait_histogram() {
                h.record_many(0.0, n as usize);
            }
        }
    }

    /// Closes idle connections past their idle timeout or lifetime.
    pub fn reap(&self) {
        self.flush_waits();
        let (lifetime, idle_timeout) = {
            let s = self.settings.lock();
            (s.server_lifetime, s.idle_timeout)
        };
        let now = Instant::now();
        let mut idle = self.idle.lock();
        let before = idle.len();
        idle.retain(|c| {
            now.duration_since(c.created) <= lifetime
                && now.duration_since(c.last_used) <= idle_timeout
        });
        let closed = before - idle.len();
        self.stats.open.fetch_sub(closed, Ordering::Relaxed);
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
                    self.put_back(Box::new(conn));
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
        let mut idle = self.idle.lock();
        self.stats.open.fetch_sub(idle.len(), Ordering::Relaxed);
        idle.clear();
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
                p.flush_waits();
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
            p.flush_waits();
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
