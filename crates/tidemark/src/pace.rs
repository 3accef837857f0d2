//! The monitor's poll pace, shared by the monitor (which keeps it) and sessions (a commit
//! speeds it up). Its own module so that neither depends on the other through it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How long after the last sign of WAL activity (a node's position moved, a replica behind
/// the primary, a commit through tidemark) the monitor keeps polling at `monitor.interval`
/// before it slows to `monitor.idle_interval`.
const ACTIVE_FOR: Duration = Duration::from_secs(1);

/// The monitor's poll pace: `monitor.interval` while WAL moves, `monitor.idle_interval`
/// once nothing has moved for [`ACTIVE_FOR`]. Nothing a session depends on can change on a
/// replica while the primary writes nothing, so the slow pace loses no freshness; a commit
/// through tidemark ([`Pace::wake`]) marks activity and wakes every node's poll at once, and
/// writes from elsewhere are seen within one idle interval.
pub struct Pace {
    epoch: Instant,
    /// When WAL activity was last seen, in ms since `epoch`.
    last_activity_ms: AtomicU64,
    /// Set while the monitor polls at the idle pace: only then does a commit need to wake it.
    quiet: AtomicBool,
    pub(crate) kick: tokio::sync::Notify,
}

impl Default for Pace {
    fn default() -> Self {
        Pace {
            epoch: Instant::now(),
            last_activity_ms: AtomicU64::new(0),
            quiet: AtomicBool::new(false),
            kick: tokio::sync::Notify::new(),
        }
    }
}

impl Pace {
    /// Notes WAL activity: every node is polled at `monitor.interval` for [`ACTIVE_FOR`].
    pub(crate) fn activity(&self) {
        let now = self.epoch.elapsed().as_millis() as u64;
        self.last_activity_ms.store(now, Ordering::Relaxed);
        self.quiet.store(false, Ordering::Relaxed);
    }

    /// A write was committed through tidemark. One atomic load per commit unless the monitor
    /// is idle; then the activity is recorded before the wake-up, so a node task busy with a
    /// poll (not waiting for the kick) still picks the fast pace afterwards.
    pub fn wake(&self) {
        if self.quiet.load(Ordering::Relaxed) {
            self.activity();
            self.kick.notify_waiters();
        }
    }

    /// Whether the monitor is polling at `monitor.idle_interval`.
    pub fn is_quiet(&self) -> bool {
        self.quiet.load(Ordering::Relaxed)
    }

    /// The time from one poll's start to the next.
    pub(crate) fn next_after(&self, interval: Duration, idle_interval: Duration) -> Duration {
        let last = self.last_activity_ms.load(Ordering::Relaxed);
        let idle_ms = (self.epoch.elapsed().as_millis() as u64).saturating_sub(last);
        if Duration::from_millis(idle_ms) < ACTIVE_FOR {
            interval
        } else {
            self.quiet.store(true, Ordering::Relaxed);
            idle_interval.max(interval)
        }
    }
}
