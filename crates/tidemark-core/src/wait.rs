//! How long a read may wait for a replica to replay the position it depends on.
//!
//! A read that depends on a commit no replica is known to have replayed can wait for one, or
//! go to the primary at once. Waiting only pays when a replica will have replayed the commit
//! sooner than the primary would answer the read: otherwise the read is slower than on the
//! primary and the primary does the work anyway (docs/routing.md, "Waiting for a replica").
//!
//! * **Expected catch-up.** A replica whose time lag is `lag` replays, now, what the primary
//!   wrote `lag` ago; a commit made `age` ago is expected on it after `lag − age`. The lag is
//!   known from the monitor's last sample of that replica, which is up to one poll interval
//!   (`resolution`) old and measured in steps of it, so the estimate is lowered by one
//!   resolution: a replica that may already have replayed the commit is asked.
//! * **Budget.** `fixed`: `max_wait`, whatever the primary's latency (the behaviour before
//!   issue 18). `adaptive` (the default): the primary's current latency (an average of the
//!   monitor's round trips to it), never more than `max_wait`. A slow, loaded primary makes
//!   waiting for a replica worth more; a quick one makes it worth less.
//!
//! A replica is asked only if its expected catch-up is within the budget, and the read stops
//! waiting once the budget is spent. No clock reads here: the caller passes every duration.

use std::time::Duration;

/// `routing.wait`: how the wait budget is chosen.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Default)]
pub enum WaitPolicy {
    /// Wait up to `max_wait` for any replica whose expected catch-up is within it.
    Fixed,
    /// Wait only as long as the primary would take to answer, capped by `max_wait`.
    #[default]
    Adaptive,
}

impl WaitPolicy {
    pub fn as_str(&self) -> &'static str {
        match self {
            WaitPolicy::Fixed => "fixed",
            WaitPolicy::Adaptive => "adaptive",
        }
    }

    pub fn parse(s: &str) -> Option<WaitPolicy> {
        match s.trim().to_ascii_lowercase().as_str() {
            "fixed" => Some(WaitPolicy::Fixed),
            "adaptive" => Some(WaitPolicy::Adaptive),
            _ => None,
        }
    }
}

/// Expected time until a replica with time lag `lag` (sampled at a `resolution`) replays a
/// commit made `age` ago. Zero: it may have replayed it already.
pub fn expected_catch_up(lag: Duration, age: Duration, resolution: Duration) -> Duration {
    lag.saturating_sub(age.saturating_add(resolution))
}

/// How long a read may wait for a replica in total (see the module docs). Without a measured
/// primary latency (no sample yet), `adaptive` waits as `fixed` would not: it does not wait
/// beyond one check.
pub fn wait_budget(
    policy: WaitPolicy,
    max_wait: Duration,
    primary_latency: Option<Duration>,
) -> Duration {
    match policy {
        WaitPolicy::Fixed => max_wait,
        WaitPolicy::Adaptive => primary_latency.unwrap_or(Duration::ZERO).min(max_wait),
    }
}

/// An exponentially weighted average of round-trip times (the monitor's polls of the
/// primary): `alpha` = 1/8 of each new sample, as TCP's smoothed RTT does.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct LatencyAverage {
    avg: Option<Duration>,
}

impl LatencyAverage {
    /// Folds in one sample; the first sample is taken as it is.
    pub fn observe(&mut self, sample: Duration) {
        self.avg = Some(match self.avg {
            None => sample,
            Some(a) => (a * 7 + sample) / 8,
        });
    }

    pub fn get(&self) -> Option<Duration> {
        self.avg
    }

    /// Forget (a new primary).
    pub fn reset(&mut self) {
        self.avg = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn catch_up_is_lag_minus_age_and_resolution() {
        // A replica 10 ms behind, a commit made just now, sampled every 5 ms: ~5 ms.
        assert_eq!(expected_catch_up(10 * MS, Duration::ZERO, 5 * MS), 5 * MS);
        // The commit was made 20 ms ago: it is already replayed.
        assert_eq!(expected_catch_up(10 * MS, 20 * MS, 5 * MS), Duration::ZERO);
        // A lag within one sampling step may be no lag at all.
        assert_eq!(
            expected_catch_up(4 * MS, Duration::ZERO, 5 * MS),
            Duration::ZERO
        );
        // 3 s behind: nearly 3 s to go.
        assert_eq!(
            expected_catch_up(3000 * MS, MS, 5 * MS),
            Duration::from_millis(2994)
        );
    }

    #[test]
    fn budgets() {
        let max = 20 * MS;
        assert_eq!(wait_budget(WaitPolicy::Fixed, max, Some(MS)), max);
        assert_eq!(wait_budget(WaitPolicy::Fixed, max, None), max);
        assert_eq!(wait_budget(WaitPolicy::Adaptive, max, Some(MS)), MS);
        // A primary slower than max_wait: capped.
        assert_eq!(wait_budget(WaitPolicy::Adaptive, max, Some(50 * MS)), max);
        assert_eq!(wait_budget(WaitPolicy::Adaptive, max, None), Duration::ZERO);
        assert_eq!(WaitPolicy::default(), WaitPolicy::Adaptive);
        for p in [WaitPolicy::Fixed, WaitPolicy::Adaptive] {
            assert_eq!(WaitPolicy::parse(p.as_str()), Some(p));
        }
        assert_eq!(WaitPolicy::parse(" Adaptive "), Some(WaitPolicy::Adaptive));
        assert_eq!(WaitPolicy::parse("sometimes"), None);
    }

    #[test]
    fn average_follows_samples() {
        let mut a = LatencyAverage::default();
        assert_eq!(a.get(), None);
        a.observe(8 * MS);
        assert_eq!(a.get(), Some(8 * MS));
        a.observe(16 * MS);
        assert_eq!(a.get(), Some(9 * MS));
        for _ in 0..100 {
            a.observe(MS);
        }
        assert!(a.get().is_some_and(|d| d < MS + MS / 100));
        a.reset();
        assert_eq!(a.get(), None);
    }

    proptest! {
        /// Never more than the lag; never more than max_wait.
        #[test]
        fn bounds(lag in 0u64..10_000_000, age in 0u64..10_000_000, res in 0u64..100_000,
                  max in 0u64..1_000_000, lat in proptest::option::of(0u64..1_000_000)) {
            let us = Duration::from_micros;
            let e = expected_catch_up(us(lag), us(age), us(res));
            prop_assert!(e <= us(lag));
            // Monotone: older commits are expected sooner.
            prop_assert!(expected_catch_up(us(lag), us(age) + MS, us(res)) <= e);
            for p in [WaitPolicy::Fixed, WaitPolicy::Adaptive] {
                prop_assert!(wait_budget(p, us(max), lat.map(us)) <= us(max));
            }
            let mut a = LatencyAverage::default();
            a.observe(us(lag));
            a.observe(us(age));
            let v = a.get().unwrap_or_default();
            prop_assert!(v >= us(lag.min(age)) && v <= us(lag.max(age)));
        }
    }
}
