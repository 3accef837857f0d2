//! A coarse monotonic clock for bookkeeping that needs seconds, not nanoseconds (the status
//! page's per-second ring). `Instant::now()` reads the precise clock; on the per-statement
//! path its cost showed in the instruction profile (docs/benchmarks.md), while Linux's
//! `CLOCK_MONOTONIC_COARSE` is a plain load from the vDSO (resolution: one scheduler tick).
//! Written by hand because std has no coarse clock and no crate offers just this.
//!
//! [`Coarse`] is an instant of the same clock, for timestamps that are compared against
//! timeouts of seconds (server connection age and idleness, a node's silence): it replaced
//! `Instant::now()` on the per-statement path (four precise reads per statement, ~32 ns each
//! on this VM's TSC against ~11 ns for the coarse one).

use std::time::Duration;

/// An instant of the coarse monotonic clock (resolution: one scheduler tick, a few ms).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Coarse(Duration);

impl Coarse {
    pub fn now() -> Coarse {
        Coarse(coarse_now())
    }

    /// Time since `earlier` (zero if `earlier` is later).
    pub fn duration_since(self, earlier: Coarse) -> Duration {
        self.0.saturating_sub(earlier.0)
    }

    pub fn elapsed(self) -> Duration {
        Coarse::now().duration_since(self)
    }
}

fn coarse_now() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; clock_gettime only writes to it.
    let r = unsafe { libc::clock_gettime(COARSE, &mut ts) };
    if r != 0 {
        // Not expected on Linux; a precise clock keeps the figures right elsewhere.
        return precise_now();
    }
    Duration::new(
        ts.tv_sec.max(0) as u64,
        ts.tv_nsec.clamp(0, 999_999_999) as u32,
    )
}

/// Whole seconds of a monotonic clock (an arbitrary, fixed origin).
pub fn coarse_secs() -> u64 {
    coarse_now().as_secs()
}

#[cfg(target_os = "linux")]
const COARSE: libc::clockid_t = libc::CLOCK_MONOTONIC_COARSE;
#[cfg(not(target_os = "linux"))]
const COARSE: libc::clockid_t = libc::CLOCK_MONOTONIC;

fn precise_now() -> Duration {
    use std::sync::OnceLock;
    use std::time::Instant;
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    ORIGIN.get_or_init(Instant::now).elapsed()
}

#[cfg(test)]
mod tests {
    #[test]
    fn coarse_seconds_move_forward() {
        let a = super::coarse_secs();
        std::thread::sleep(std::time::Duration::from_millis(1100));
        let b = super::coarse_secs();
        assert!(b > a, "{a} -> {b}");
        assert!(b - a <= 2, "{a} -> {b}");
    }

    #[test]
    fn coarse_instants_measure_time() {
        let a = super::Coarse::now();
        std::thread::sleep(std::time::Duration::from_millis(120));
        let b = super::Coarse::now();
        let d = b.duration_since(a);
        // One tick of resolution either side.
        assert!(d >= std::time::Duration::from_millis(80), "{d:?}");
        assert!(d <= std::time::Duration::from_secs(2), "{d:?}");
        assert_eq!(a.duration_since(b), std::time::Duration::ZERO);
        assert!(a.elapsed() >= d);
    }
}
