//! `LagClock`: time lag of a replica derived from a ring buffer of (time, primary LSN) samples —
//! how long ago the primary was where the replica is now. Unlike
//! `now() - pg_last_xact_replay_timestamp()`, it stays zero while the primary is idle.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::lsn::Lsn;

/// Default number of samples kept.
pub const DEFAULT_CAPACITY: usize = 4096;
/// Default age after which samples are dropped (the newest one is always kept).
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(60);

/// Ring buffer of primary positions over time. LSNs in the buffer strictly increase.
#[derive(Clone, Debug)]
pub struct LagClock {
    samples: VecDeque<(Instant, Lsn)>,
    capacity: usize,
    max_age: Duration,
}

impl LagClock {
    /// A clock keeping at most `capacity` samples (at least 1) for up to [`DEFAULT_MAX_AGE`].
    pub fn new(capacity: usize) -> Self {
        Self::with_max_age(capacity, DEFAULT_MAX_AGE)
    }

    /// A clock keeping at most `capacity` samples (at least 1), none older than `max_age`
    /// except the newest.
    pub fn with_max_age(capacity: usize, max_age: Duration) -> Self {
        let capacity = capacity.max(1);
        LagClock {
            samples: VecDeque::with_capacity(capacity.min(DEFAULT_CAPACITY)),
            capacity,
            max_age,
        }
    }

    /// Record that the primary was at `primary_lsn` at `at`. A repeated LSN is not stored (the
    /// earliest time the primary reached it is what matters). An LSN lower than the newest one
    /// (e.g. a new primary) resets the buffer first. A sample older than the newest is ignored.
    pub fn record(&mut self, at: Instant, primary_lsn: Lsn) {
        if let Some(&(last_at, last_lsn)) = self.samples.back() {
            if at < last_at {
                return;
            }
            if primary_lsn < last_lsn {
                self.samples.clear();
            } else if primary_lsn == last_lsn {
                self.expire(at);
                return;
            }
        }
        if self.samples.len() >= self.capacity {
            self.samples.pop_front();
        }
        self.samples.push_back((at, primary_lsn));
        self.expire(at);
    }

    /// Drop samples older than `max_age` before `now`, always keeping the newest.
    fn expire(&mut self, now: Instant) {
        while self.samples.len() > 1 {
            let (t, _) = self.samples[0];
            if now.saturating_duration_since(t) > self.max_age {
                self.samples.pop_front();
            } else {
                break;
            }
        }
    }

    /// Time lag of a replica that has replayed up to `replay`: `now` minus the earliest sample
    /// time at which the primary was already past `replay`. Zero if `replay` is at or past the
    /// newest primary LSN (or nothing was recorded). If the buffer does not go back far enough,
    /// `now` minus the oldest sample time (a lower bound).
    pub fn lag(&self, replay: Lsn, now: Instant) -> Duration {
        let Some(&(_, newest)) = self.samples.back() else {
            return Duration::ZERO;
        };
        if replay >= newest {
            return Duration::ZERO;
        }
        let idx = self.samples.partition_point(|&(_, lsn)| lsn <= replay);
        let (t, _) = self.samples[idx];
        now.saturating_duration_since(t)
    }

    /// Forget all samples (e.g. after a failover).
    pub fn reset(&mut self) {
        self.samples.clear();
    }

    /// The newest sample.
    pub fn latest(&self) -> Option<(Instant, Lsn)> {
        self.samples.back().copied()
    }

    /// Number of samples held.
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// True when nothing is recorded.
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }
}

impl Default for LagClock {
    fn default() -> Self {
        Self::new(DEFAULT_CAPACITY)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn empty_clock_reports_zero() {
        let c = LagClock::new(16);
        assert_eq!(c.lag(Lsn(5), Instant::now()), Duration::ZERO);
        assert!(c.is_empty());
    }

    #[test]
    fn idle_primary_means_zero_lag() {
        let t0 = Instant::now();
        let mut c = LagClock::new(16);
        for i in 0..1000 {
            c.record(t0 + ms(10 * i), Lsn(500));
        }
        assert_eq!(c.len(), 1);
        // Replica has replayed everything: no lag, however long the primary has been idle.
        assert_eq!(c.lag(Lsn(500), t0 + ms(120_000)), Duration::ZERO);
        assert_eq!(c.latest(), Some((t0, Lsn(500))));
    }

    #[test]
    fn known_scenario() {
        let t0 = Instant::now();
        let mut c = LagClock::new(16);
        c.record(t0, Lsn(100));
        c.record(t0 + ms(100), Lsn(200));
        c.record(t0 + ms(200), Lsn(300));
        c.record(t0 + ms(300), Lsn(300)); // idle
        c.record(t0 + ms(400), Lsn(400));
        let now = t0 + ms(450);
        assert_eq!(c.lag(Lsn(400), now), ms(0));
        assert_eq!(c.lag(Lsn(500), now), ms(0));
        // At 300: primary passed 300 first at t0+400.
        assert_eq!(c.lag(Lsn(300), now), ms(50));
        // At 250: primary was past it at t0+200.
        assert_eq!(c.lag(Lsn(250), now), ms(250));
        assert_eq!(c.lag(Lsn(200), now), ms(250));
        assert_eq!(c.lag(Lsn(199), now), ms(350));
        // Older than the buffer: lower bound from the oldest sample.
        assert_eq!(c.lag(Lsn(50), now), ms(450));
        assert_eq!(c.lag(Lsn::ZERO, now), ms(450));
    }

    #[test]
    fn lag_resumes_growing_after_idle_then_write() {
        let t0 = Instant::now();
        let mut c = LagClock::new(16);
        c.record(t0, Lsn(100));
        c.record(t0 + ms(10_000), Lsn(100));
        c.record(t0 + ms(10_010), Lsn(150)); // a write after 10 s idle
                                             // Replica still at 100: it is 40 ms behind, not 10 s.
        assert_eq!(c.lag(Lsn(100), t0 + ms(10_050)), ms(40));
    }

    #[test]
    fn capacity_bound_gives_lower_bound() {
        let t0 = Instant::now();
        let mut c = LagClock::new(3);
        for i in 0..10u64 {
            c.record(t0 + ms(i * 10), Lsn(i * 100));
        }
        assert_eq!(c.len(), 3);
        // Samples kept: 700@70, 800@80, 900@90.
        assert_eq!(c.lag(Lsn(0), t0 + ms(100)), ms(30));
        assert_eq!(c.lag(Lsn(750), t0 + ms(100)), ms(20));
    }

    #[test]
    fn max_age_drops_old_samples_but_keeps_newest() {
        let t0 = Instant::now();
        let mut c = LagClock::with_max_age(100, ms(1000));
        c.record(t0, Lsn(100));
        c.record(t0 + ms(500), Lsn(200));
        c.record(t0 + ms(1200), Lsn(300));
        assert_eq!(c.len(), 2); // the t0 sample expired
        c.record(t0 + ms(5000), Lsn(300)); // idle: expire all but the newest
        assert_eq!(c.len(), 1);
        assert_eq!(c.lag(Lsn(250), t0 + ms(5000)), ms(3800));
        assert_eq!(c.lag(Lsn(300), t0 + ms(5000)), ms(0));
    }

    #[test]
    fn lsn_going_backwards_resets() {
        let t0 = Instant::now();
        let mut c = LagClock::new(16);
        c.record(t0, Lsn(1000));
        c.record(t0 + ms(10), Lsn(2000));
        c.record(t0 + ms(20), Lsn(500)); // new primary
        assert_eq!(c.len(), 1);
        assert_eq!(c.lag(Lsn(500), t0 + ms(30)), ms(0));
        assert_eq!(c.lag(Lsn(400), t0 + ms(30)), ms(10));
        c.reset();
        assert!(c.is_empty());
    }

    #[test]
    fn out_of_order_time_ignored() {
        let t0 = Instant::now() + ms(1000);
        let mut c = LagClock::new(16);
        c.record(t0, Lsn(100));
        c.record(t0 - ms(10), Lsn(200));
        assert_eq!(c.latest(), Some((t0, Lsn(100))));
    }

    proptest! {
        #[test]
        fn lag_is_monotonic_in_replay_and_zero_when_caught_up(
            steps in prop::collection::vec((0u64..50, 0u64..100), 1..200),
            replays in prop::collection::vec(0u64..6000, 2),
        ) {
            let t0 = Instant::now();
            let mut c = LagClock::new(64);
            let (mut t, mut l) = (0u64, 0u64);
            for (dt, dl) in steps {
                t += dt;
                l += dl;
                c.record(t0 + ms(t), Lsn(l));
            }
            let now = t0 + ms(t + 5);
            prop_assert_eq!(c.lag(Lsn(l), now), Duration::ZERO);
            let (a, b) = (replays[0].min(replays[1]), replays[0].max(replays[1]));
            // Further behind never means less lag.
            prop_assert!(c.lag(Lsn(a), now) >= c.lag(Lsn(b), now));
            prop_assert!(c.lag(Lsn(a), now) <= ms(t + 5));
        }
    }
}
