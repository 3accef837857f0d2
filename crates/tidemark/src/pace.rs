//! The monitor's poll pace, shared by the monitor (which keeps it) and sessions (a commit,
//! and a read that may go to a replica, speed it up). Its own module so that neither depends on the other through it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How long after the last sign of WAL activity (a node's position moved, a replica behind
/// the primary, a commit through tidemark), and after the last read that could have gone to a
/// replica, the monitor keeps polling at `monitor.interval` before it slows to
/// `monitor.idle_interval`.
const ACTIVE_FOR: Duration = Duration::from_secs(1);

/// The monitor's poll pace: `monitor.interval` while WAL moves *and* reads may go to
/// replicas, `monitor.idle_interval` otherwise.
///
/// - Nothing a session depends on can change on a replica while the primary writes nothing,
///   so the slow pace loses no freshness then.
/// - While nothing reads from replicas (a write-only workload, or reads that all go to the
///   primary: inside read-write transactions, `strong` consistency, a primary hint), no
///   routing decision uses the replicas' positions, and polling every node every
///   `monitor.interval` would only cost the proxy and the servers: the monitor keeps the
///   slow pace (lag is still sampled, once per idle interval, for the lag gate and the
///   metrics). The first such read marks demand ([`Pace::demand`]); a read that finds the
///   view's positions old is still exact, it asks the replica in its own round trip.
/// - A commit through tidemark ([`Pace::wake`]) marks activity and, when reads may go to
///   replicas, wakes every node's poll at once; writes from elsewhere are seen within one
///   idle interval.
pub struct Pace {
    epoch: Instant,
    /// When WAL activity was last seen, in ms since `epoch`.
    last_activity_ms: AtomicU64,
    /// When the monitor last found [`Pace::demand`]'s mark, in ms since `epoch`.
    last_demand_ms: AtomicU64,
    /// Set by a read that may go to a replica; taken by the monitor after each poll. One
    /// relaxed load per such read while it is set (a store at most once per poll).
    demanded: AtomicBool,
    /// Set while the monitor polls at the idle pace: only then does a commit need to wake it.
    quiet: AtomicBool,
    pub(crate) kick: tokio::sync::Notify,
    /// When a write's commit position was last left unread ([`Pace::unread_write`]), in ms
    /// since `epoch` plus one (0: never). A primary poll sent later covers it.
    unread_ms: AtomicU64,
    /// Set while the primary's poll waits the idle interval: only then does an unread write
    /// need to wake it.
    primary_quiet: AtomicBool,
    /// Wakes the primary's poll alone.
    pub(crate) kick_primary: tokio::sync::Notify,
}

impl Default for Pace {
    fn default() -> Self {
        Pace {
            epoch: Instant::now(),
            last_activity_ms: AtomicU64::new(0),
            last_demand_ms: AtomicU64::new(0),
            demanded: AtomicBool::new(false),
            quiet: AtomicBool::new(false),
            kick: tokio::sync::Notify::new(),
            unread_ms: AtomicU64::new(0),
            primary_quiet: AtomicBool::new(false),
            kick_primary: tokio::sync::Notify::new(),
        }
    }
}

impl Pace {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn recent(&self, at_ms: &AtomicU64, now_ms: u64) -> bool {
        Duration::from_millis(now_ms.saturating_sub(at_ms.load(Ordering::Relaxed))) < ACTIVE_FOR
    }

    /// Notes WAL activity: every node is polled at `monitor.interval` for [`ACTIVE_FOR`] if
    /// reads may go to replicas meanwhile. (The pace itself, and `quiet`, change when the
    /// monitor next picks its interval, or when something wakes it.)
    pub(crate) fn activity(&self) {
        self.last_activity_ms
            .store(self.now_ms(), Ordering::Relaxed);
    }

    /// Whether a read that may go to a replica was seen within [`ACTIVE_FOR`] (or since the
    /// monitor's last poll).
    fn demand_recent(&self, now_ms: u64) -> bool {
        self.demanded.load(Ordering::Relaxed) || self.recent(&self.last_demand_ms, now_ms)
    }

    /// Wakes every node's poll now (it will pick the fast pace: see `next_after`).
    fn kick_now(&self) {
        self.quiet.store(false, Ordering::Relaxed);
        self.kick.notify_waiters();
    }

    /// A write was committed through tidemark. One atomic load per commit unless the monitor
    /// is idle; then the activity is recorded before any wake-up, so a node task busy with a
    /// poll (not waiting for the kick) still picks the fast pace afterwards. The monitor is
    /// woken only when reads may go to replicas.
    pub fn wake(&self) {
        if self.quiet.load(Ordering::Relaxed) {
            let now = self.now_ms();
            self.last_activity_ms.store(now, Ordering::Relaxed);
            if self.demand_recent(now) {
                self.kick_now();
            }
        }
    }

    /// A read that may go to a replica is being routed: the replicas' positions matter. One
    /// relaxed load while the mark is set; once per poll, a store (and, when the monitor is
    /// idle while WAL moves, a wake-up).
    #[inline]
    pub fn demand(&self) {
        if !self.demanded.load(Ordering::Relaxed) {
            self.demand_slow();
        }
    }

    #[cold]
    fn demand_slow(&self) {
        self.demanded.store(true, Ordering::Relaxed);
        if self.quiet.load(Ordering::Relaxed) && self.recent(&self.last_activity_ms, self.now_ms())
        {
            self.kick_now();
        }
    }

    /// A write committed and its position was left unread (see
    /// `Session::may_leave_position_unread`): the primary is polled within `monitor.interval`,
    /// so a sample asked after the write soon stands in for its position (`App::last_primary_poll`:
    /// the session's next read needs no round trip of its own, and a primary that dies right
    /// after still leaves a position its reads can wait for on the replicas). Under a steady
    /// stream of such writes that is one poll of the primary per interval (200/s at 5 ms),
    /// where reading every position cost one per commit; sparse ones get one poll each.
    pub fn unread_write(&self) {
        self.unread_ms.store(self.now_ms() + 1, Ordering::Relaxed);
        if self.primary_quiet.load(Ordering::Relaxed) {
            self.primary_quiet.store(false, Ordering::Relaxed);
            self.kick_primary.notify_waiters();
        }
    }

    /// The time from the start of the primary's poll (sent `asked` ago) to its next: the fast
    /// pace while a write left unread is not covered by a poll sent after it, else as
    /// [`Pace::next_after`]. (A write in the poll's own millisecond counts as not covered.)
    pub(crate) fn next_after_primary(
        &self,
        asked: Duration,
        interval: Duration,
        idle_interval: Duration,
    ) -> Duration {
        let asked_ms = self.now_ms().saturating_sub(asked.as_millis() as u64);
        let unread = self.unread_ms.load(Ordering::Relaxed) > asked_ms;
        let d = self.next_after(interval, idle_interval);
        if unread {
            self.primary_quiet.store(false, Ordering::Relaxed);
            interval
        } else {
            self.primary_quiet.store(d > interval, Ordering::Relaxed);
            d
        }
    }

    /// Whether the monitor is polling at `monitor.idle_interval`.
    pub fn is_quiet(&self) -> bool {
        self.quiet.load(Ordering::Relaxed)
    }

    /// The time from one poll's start to the next.
    pub(crate) fn next_after(&self, interval: Duration, idle_interval: Duration) -> Duration {
        let now = self.now_ms();
        if self.demanded.swap(false, Ordering::Relaxed) {
            self.last_demand_ms.store(now, Ordering::Relaxed);
        }
        if self.recent(&self.last_activity_ms, now) && self.recent(&self.last_demand_ms, now) {
            if self.quiet.load(Ordering::Relaxed) {
                self.quiet.store(false, Ordering::Relaxed);
            }
            interval
        } else {
            self.quiet.store(true, Ordering::Relaxed);
            idle_interval.max(interval)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FAST: Duration = Duration::from_millis(5);
    const IDLE: Duration = Duration::from_millis(100);

    /// A pace whose first second (when everything counts as recent) is over.
    fn settled() -> Pace {
        let p = Pace::default();
        p.last_activity_ms.store(0, Ordering::Relaxed);
        p.last_demand_ms.store(0, Ordering::Relaxed);
        let Some(epoch) = Instant::now().checked_sub(Duration::from_secs(10)) else {
            return p;
        };
        Pace { epoch, ..p }
    }

    /// Whether `kick` wakes a waiter registered before `f` runs.
    async fn kicks(p: &Pace, f: impl FnOnce(&Pace)) -> bool {
        wakes(&p.kick, p, f).await
    }

    /// Whether `notify` wakes a waiter registered before `f` runs.
    async fn wakes(notify: &tokio::sync::Notify, p: &Pace, f: impl FnOnce(&Pace)) -> bool {
        let n = notify.notified();
        tokio::pin!(n);
        n.as_mut().enable();
        f(p);
        tokio::time::timeout(Duration::from_millis(20), n)
            .await
            .is_ok()
    }

    #[test]
    fn nothing_moving_and_nothing_reading_is_the_idle_pace() {
        let p = settled();
        assert_eq!(p.next_after(FAST, IDLE), IDLE);
        assert!(p.is_quiet());
    }

    #[test]
    fn writes_that_nobody_reads_from_replicas_keep_the_idle_pace() {
        let p = settled();
        p.activity();
        assert_eq!(p.next_after(FAST, IDLE), IDLE);
        p.wake();
        assert_eq!(p.next_after(FAST, IDLE), IDLE);
    }

    #[test]
    fn reads_while_nothing_moves_keep_the_idle_pace() {
        let p = settled();
        p.demand();
        assert_eq!(p.next_after(FAST, IDLE), IDLE);
        // The mark was taken: the demand is remembered for ACTIVE_FOR.
        assert!(!p.demanded.load(Ordering::Relaxed));
        assert!(p.demand_recent(p.now_ms()));
    }

    #[test]
    fn writes_with_replica_reads_are_the_fast_pace_and_it_lasts() {
        let p = settled();
        p.demand();
        p.activity();
        assert_eq!(p.next_after(FAST, IDLE), FAST);
        assert!(!p.is_quiet());
        // Still within ACTIVE_FOR of both, with no new mark.
        assert_eq!(p.next_after(FAST, IDLE), FAST);
    }

    #[test]
    fn the_idle_pace_is_never_faster_than_the_interval() {
        let p = settled();
        assert_eq!(p.next_after(IDLE, FAST), IDLE);
    }

    #[tokio::test]
    async fn a_commit_wakes_an_idle_monitor_only_when_reads_go_to_replicas() {
        let p = settled();
        p.next_after(FAST, IDLE);
        assert!(p.is_quiet());
        assert!(
            !kicks(&p, |p| p.wake()).await,
            "woken with no replica reads"
        );

        let p = settled();
        p.next_after(FAST, IDLE);
        p.demand();
        assert!(
            kicks(&p, |p| p.wake()).await,
            "not woken with replica reads"
        );
    }

    #[tokio::test]
    async fn a_replica_read_wakes_an_idle_monitor_only_while_wal_moves() {
        let p = settled();
        p.next_after(FAST, IDLE);
        assert!(
            !kicks(&p, |p| p.demand()).await,
            "woken with nothing moving"
        );

        let p = settled();
        p.next_after(FAST, IDLE);
        p.last_activity_ms.store(p.now_ms(), Ordering::Relaxed);
        assert!(kicks(&p, |p| p.demand()).await, "not woken while WAL moves");
        // Once per poll: the mark stays set until the monitor takes it.
        assert!(!kicks(&p, |p| p.demand()).await, "woken twice in one poll");
    }

    #[tokio::test]
    async fn after_unread_writes_the_first_replica_read_wakes_the_monitor() {
        let p = settled();
        p.next_after(FAST, IDLE);
        assert!(!kicks(&p, |p| p.wake()).await);
        assert!(!kicks(&p, |p| p.wake()).await);
        assert!(
            p.is_quiet(),
            "unread commits took the monitor off its idle pace"
        );
        assert!(kicks(&p, |p| p.demand()).await, "the read did not wake it");
        assert!(!p.is_quiet());
        assert_eq!(p.next_after(FAST, IDLE), FAST);
    }

    /// Whether `kick_primary` wakes a waiter registered before `f` runs.
    async fn kicks_primary(p: &Pace, f: impl FnOnce(&Pace)) -> bool {
        wakes(&p.kick_primary, p, f).await
    }

    #[tokio::test]
    async fn an_unread_write_polls_the_primary_soon_and_only_the_primary() {
        let ms = |n| Duration::from_millis(n);
        let p = settled();
        // Idle: nothing unread, the primary waits the idle interval.
        assert_eq!(p.next_after_primary(ms(1), FAST, IDLE), IDLE);
        // A write left unread wakes the primary's poll alone.
        let mut all = false;
        assert!(
            kicks_primary(&p, |p| {
                let n = p.kick.notified();
                tokio::pin!(n);
                all = n.as_mut().enable();
                p.unread_write();
            })
            .await,
            "the primary's poll was not woken"
        );
        assert!(!all, "the replicas' polls were woken too");
        // A poll sent before the write (its answer came after it) is followed at the fast
        // pace; one sent after it covers it, and the idle pace returns.
        tokio::time::sleep(ms(3)).await;
        assert_eq!(p.next_after_primary(ms(10), FAST, IDLE), FAST);
        assert_eq!(p.next_after_primary(ms(1), FAST, IDLE), IDLE);
        // Replicas keep the idle pace throughout.
        p.unread_write();
        assert_eq!(p.next_after(FAST, IDLE), IDLE);
        // While the primary polls at the fast pace, an unread write wakes nothing.
        assert_eq!(p.next_after_primary(ms(10), FAST, IDLE), FAST);
        assert!(!kicks_primary(&p, |p| p.unread_write()).await);
    }
}
