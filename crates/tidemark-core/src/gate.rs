//! The lag gate: decides whether a replica is in rotation from its lag samples, with hysteresis
//! (leave after K consecutive samples over `max_lag`, return after K consecutive samples under the
//! lower `return_below`) so a replica hovering around the threshold does not flap.

use std::time::Duration;

/// Lag gate thresholds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GateConfig {
    /// Leave rotation when time lag is above this for `samples` consecutive samples.
    pub max_lag: Duration,
    /// Return to rotation when time lag is below this for `samples` consecutive samples.
    pub return_below: Duration,
    /// Also leave rotation when byte lag is above this; return only when under half of it.
    pub max_lag_bytes: Option<u64>,
    /// K: consecutive samples needed for either transition (>= 1).
    pub samples: u32,
}

impl Default for GateConfig {
    /// `max_lag` 5s, `return_below` 1s, K = 3, no byte limit.
    fn default() -> Self {
        GateConfig {
            max_lag: Duration::from_secs(5),
            return_below: Duration::from_secs(1),
            max_lag_bytes: None,
            samples: 3,
        }
    }
}

impl GateConfig {
    /// Check the thresholds make sense; the error names the problem and the fix.
    pub fn validate(&self) -> Result<(), String> {
        if self.samples == 0 {
            return Err("lag gate samples must be at least 1 (consecutive samples needed to leave or return to rotation)".into());
        }
        if self.return_below > self.max_lag {
            return Err(format!(
                "lag gate return_below ({}) must not be greater than max_lag ({}); set return_below to a lower value",
                humantime::format_duration(self.return_below),
                humantime::format_duration(self.max_lag)
            ));
        }
        if self.max_lag_bytes == Some(0) {
            return Err("lag gate max_lag_bytes must be greater than 0 (or unset to disable the byte limit)".into());
        }
        Ok(())
    }
}

/// One replica's rotation state.
#[derive(Clone, Debug)]
pub struct LagGate {
    cfg: GateConfig,
    in_rotation: bool,
    /// Consecutive samples meeting the condition for leaving the current state.
    streak: u32,
}

impl LagGate {
    /// A gate in rotation. `samples` of 0 is treated as 1 (call `GateConfig::validate` first).
    pub fn new(mut cfg: GateConfig) -> Self {
        cfg.samples = cfg.samples.max(1);
        LagGate {
            cfg,
            in_rotation: true,
            streak: 0,
        }
    }

    /// The configuration in use.
    pub fn config(&self) -> &GateConfig {
        &self.cfg
    }

    fn over(&self, lag: Duration, lag_bytes: u64) -> bool {
        lag > self.cfg.max_lag || self.cfg.max_lag_bytes.is_some_and(|max| lag_bytes > max)
    }

    fn under(&self, lag: Duration, lag_bytes: u64) -> bool {
        lag < self.cfg.return_below && self.cfg.max_lag_bytes.is_none_or(|max| lag_bytes < max / 2)
    }

    /// Feed one sample; returns whether the replica is in rotation after it.
    pub fn observe(&mut self, lag: Duration, lag_bytes: u64) -> bool {
        let toward_change = if self.in_rotation {
            self.over(lag, lag_bytes)
        } else {
            self.under(lag, lag_bytes)
        };
        if toward_change {
            self.streak += 1;
            if self.streak >= self.cfg.samples {
                self.in_rotation = !self.in_rotation;
                self.streak = 0;
            }
        } else {
            self.streak = 0;
        }
        self.in_rotation
    }

    /// Current state.
    pub fn in_rotation(&self) -> bool {
        self.in_rotation
    }

    /// Back to the initial state (in rotation, no streak), e.g. after a failover.
    pub fn reset(&mut self) {
        self.in_rotation = true;
        self.streak = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    fn gate(k: u32) -> LagGate {
        LagGate::new(GateConfig {
            max_lag: ms(500),
            return_below: ms(100),
            max_lag_bytes: None,
            samples: k,
        })
    }

    #[test]
    fn default_is_valid() {
        let d = GateConfig::default();
        assert_eq!(d.max_lag, Duration::from_secs(5));
        assert_eq!(d.return_below, Duration::from_secs(1));
        assert_eq!(d.samples, 3);
        assert!(d.validate().is_ok());
    }

    #[test]
    fn validate_rejects_bad_config() {
        let mut c = GateConfig {
            samples: 0,
            ..GateConfig::default()
        };
        assert!(c.validate().unwrap_err().contains("samples"));
        c.samples = 1;
        c.return_below = Duration::from_secs(10);
        let e = c.validate().unwrap_err();
        assert!(e.contains("return_below") && e.contains("10s"), "{e}");
        c.return_below = c.max_lag; // equal is allowed
        assert!(c.validate().is_ok());
        c.max_lag_bytes = Some(0);
        assert!(c.validate().is_err());
    }

    #[test]
    fn leaves_after_k_over_and_returns_after_k_under() {
        let mut g = gate(3);
        assert!(g.in_rotation());
        assert!(g.observe(ms(600), 0));
        assert!(g.observe(ms(600), 0));
        assert!(g.observe(ms(400), 0)); // streak broken
        assert!(g.observe(ms(600), 0));
        assert!(g.observe(ms(600), 0));
        assert!(!g.observe(ms(600), 0)); // third consecutive
                                         // Between thresholds: stays out.
        for _ in 0..10 {
            assert!(!g.observe(ms(300), 0));
        }
        assert!(!g.observe(ms(50), 0));
        assert!(!g.observe(ms(50), 0));
        assert!(g.observe(ms(50), 0));
        assert!(g.in_rotation());
    }

    #[test]
    fn exactly_at_thresholds() {
        let mut g = gate(1);
        assert!(g.observe(ms(500), 0)); // not > max_lag
        assert!(!g.observe(ms(501), 0));
        assert!(!g.observe(ms(100), 0)); // not < return_below
        assert!(g.observe(ms(99), 0));
    }

    #[test]
    fn byte_limit_with_half_return() {
        let mut g = LagGate::new(GateConfig {
            max_lag: ms(500),
            return_below: ms(100),
            max_lag_bytes: Some(1000),
            samples: 1,
        });
        assert!(g.observe(ms(0), 1000));
        assert!(!g.observe(ms(0), 1001));
        assert!(!g.observe(ms(0), 600)); // under max but not under half
        assert!(!g.observe(ms(200), 10)); // bytes fine, time not under return_below
        assert!(g.observe(ms(0), 499));
    }

    #[test]
    fn reset_returns_to_rotation() {
        let mut g = gate(1);
        assert!(!g.observe(ms(900), 0));
        g.reset();
        assert!(g.in_rotation());
        // Streak is cleared too.
        let mut g = gate(2);
        g.observe(ms(900), 0);
        g.reset();
        assert!(g.observe(ms(900), 0));
    }

    #[test]
    fn zero_samples_treated_as_one() {
        let mut g = gate(0);
        assert!(!g.observe(ms(900), 0));
    }

    proptest! {
        #[test]
        fn does_not_flap(
            k in 1u32..6,
            lags in prop::collection::vec(0u64..1000, 0..300),
            bytes in prop::collection::vec(0u64..3000, 300),
            byte_limit in prop::option::of(1u64..2000),
        ) {
            let mut g = LagGate::new(GateConfig {
                max_lag: ms(500),
                return_below: ms(100),
                max_lag_bytes: byte_limit,
                samples: k,
            });
            let mut state = g.in_rotation();
            let mut since_change: u64 = 0;
            for (i, lag) in lags.iter().enumerate() {
                let now = g.observe(ms(*lag), bytes[i]);
                since_change += 1;
                if now != state {
                    prop_assert!(since_change >= u64::from(k), "changed after {} samples, k={}", since_change, k);
                    // The last k samples all justified the change.
                    for j in (i + 1 - k as usize)..=i {
                        let l = ms(lags[j]);
                        if state {
                            prop_assert!(l > ms(500) || byte_limit.is_some_and(|m| bytes[j] > m));
                        } else {
                            prop_assert!(l < ms(100) && byte_limit.is_none_or(|m| bytes[j] < m / 2));
                        }
                    }
                    state = now;
                    since_change = 0;
                }
            }
        }
    }
}
