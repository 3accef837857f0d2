//! A coarse monotonic clock for bookkeeping that needs seconds, not nanoseconds (the status
//! page's per-second ring). `Instant::now()` reads the precise clock; on the per-statement
//! path its cost showed in the instruction profile (docs/benchmarks.md), while Linux's
//! `CLOCK_MONOTONIC_COARSE` is a plain load from the vDSO (resolution: one scheduler tick).
//! Written by hand because std has no coarse clock and no crate offers just this.

/// Whole seconds of a monotonic clock (an arbitrary, fixed origin).
pub fn coarse_secs() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; clock_gettime only writes to it.
    let r = unsafe { libc::clock_gettime(COARSE, &mut ts) };
    if r != 0 {
        // Not expected on Linux; a precise clock keeps the figures right elsewhere.
        return precise_secs();
    }
    ts.tv_sec.max(0) as u64
}

#[cfg(target_os = "linux")]
const COARSE: libc::clockid_t = libc::CLOCK_MONOTONIC_COARSE;
#[cfg(not(target_os = "linux"))]
const COARSE: libc::clockid_t = libc::CLOCK_MONOTONIC;

fn precise_secs() -> u64 {
    use std::sync::OnceLock;
    use std::time::Instant;
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    ORIGIN.get_or_init(Instant::now).elapsed().as_secs()
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
}
