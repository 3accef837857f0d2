//! `Lsn`: a PostgreSQL WAL position, its text form (`16/B374D848`) and the page-boundary
//! normalisation applied to `pg_current_wal_insert_lsn()` results.

use std::fmt;
use std::str::FromStr;

/// A WAL position (log sequence number) as a byte offset into the WAL stream.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(pub u64);

/// Size of a WAL segment with PostgreSQL's default `wal_segment_size` (16 MiB).
pub const WAL_SEGMENT_SIZE: u64 = 16 * 1024 * 1024;
/// Size of a WAL page (`XLOG_BLCKSZ`, 8 KiB).
pub const WAL_PAGE_SIZE: u64 = 8192;
/// Length of the long page header at the start of each segment.
pub const LONG_PAGE_HEADER: u64 = 40;
/// Length of the short page header at the start of every other page.
pub const SHORT_PAGE_HEADER: u64 = 24;

impl Lsn {
    /// The invalid / "no requirement" position `0/0`.
    pub const ZERO: Lsn = Lsn(0);

    /// Page-boundary rule for `pg_current_wal_insert_lsn()`: the insert position may sit just past
    /// a page header that a replica's `pg_last_wal_replay_lsn()` never reaches until more WAL
    /// arrives. If `lsn % 16MiB == 40` subtract 40, else if `lsn % 8192 == 24` subtract 24.
    pub fn normalize_insert_position(self) -> Lsn {
        if self.0 % WAL_SEGMENT_SIZE == LONG_PAGE_HEADER {
            Lsn(self.0 - LONG_PAGE_HEADER)
        } else if self.0 % WAL_PAGE_SIZE == SHORT_PAGE_HEADER {
            Lsn(self.0 - SHORT_PAGE_HEADER)
        } else {
            self
        }
    }

    /// `self - other` in bytes, or 0 if `other` is ahead.
    pub fn saturating_sub(self, other: Lsn) -> u64 {
        self.0.saturating_sub(other.0)
    }

    /// True for `0/0`.
    pub fn is_zero(self) -> bool {
        self.0 == 0
    }
}

impl From<u64> for Lsn {
    fn from(v: u64) -> Self {
        Lsn(v)
    }
}

impl From<Lsn> for u64 {
    fn from(l: Lsn) -> Self {
        l.0
    }
}

/// A string that is not an LSN in PostgreSQL's `XXXXXXXX/XXXXXXXX` text form.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid LSN {text:?}: expected PostgreSQL form HIGH/LOW with 1-8 hex digits on each side, e.g. \"16/B374D848\"")]
pub struct LsnParseError {
    /// The text that failed to parse.
    pub text: String,
}

fn parse_half(s: &str) -> Option<u32> {
    if s.is_empty() || s.len() > 8 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u32::from_str_radix(s, 16).ok()
}

impl FromStr for Lsn {
    type Err = LsnParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || LsnParseError {
            text: s.to_string(),
        };
        let (hi, lo) = s.trim().split_once('/').ok_or_else(err)?;
        let hi = parse_half(hi).ok_or_else(err)?;
        let lo = parse_half(lo).ok_or_else(err)?;
        Ok(Lsn((u64::from(hi) << 32) | u64::from(lo)))
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_and_displays() {
        let l: Lsn = "16/B374D848".parse().unwrap();
        assert_eq!(l, Lsn(0x16_B374_D848));
        assert_eq!(l.to_string(), "16/B374D848");
        assert_eq!("0/0".parse::<Lsn>().unwrap(), Lsn::ZERO);
        assert_eq!("0/3000060".parse::<Lsn>().unwrap(), Lsn(0x300_0060));
        assert_eq!("ffffffff/ffffffff".parse::<Lsn>().unwrap(), Lsn(u64::MAX));
        assert_eq!(Lsn(0x1_0000_00AB).to_string(), "1/AB");
        assert_eq!(Lsn::ZERO.to_string(), "0/0");
    }

    #[test]
    fn rejects_bad_text() {
        for bad in [
            "",
            "/",
            "1/",
            "/1",
            "12",
            "1/2/3",
            "g/1",
            "1/123456789",
            "-1/2",
            "+1/2",
            "1 /2",
        ] {
            let e = bad.parse::<Lsn>().unwrap_err();
            assert_eq!(e.text, bad);
            let msg = e.to_string();
            assert!(msg.contains("16/B374D848"), "{msg}");
        }
    }

    #[test]
    fn normalize_rule() {
        let seg = WAL_SEGMENT_SIZE;
        assert_eq!(Lsn(3 * seg + 40).normalize_insert_position(), Lsn(3 * seg));
        assert_eq!(
            Lsn(8192 * 5 + 24).normalize_insert_position(),
            Lsn(8192 * 5)
        );
        // The rule is applied literally: segment start + 24 matches the page rule (it lies inside
        // the 40-byte long header, so it never is a real insert position).
        assert_eq!(Lsn(seg + 24).normalize_insert_position(), Lsn(seg));
        assert_eq!(Lsn(8192 + 40).normalize_insert_position(), Lsn(8192 + 40));
        assert_eq!(Lsn(40).normalize_insert_position(), Lsn(0));
        assert_eq!(Lsn(12345).normalize_insert_position(), Lsn(12345));
        assert_eq!(Lsn::ZERO.normalize_insert_position(), Lsn::ZERO);
    }

    #[test]
    fn saturating_sub_bytes() {
        assert_eq!(Lsn(100).saturating_sub(Lsn(40)), 60);
        assert_eq!(Lsn(40).saturating_sub(Lsn(100)), 0);
    }

    proptest! {
        #[test]
        fn display_fromstr_round_trip(v in any::<u64>()) {
            let l = Lsn(v);
            prop_assert_eq!(l.to_string().parse::<Lsn>().unwrap(), l);
            prop_assert_eq!(l.to_string().to_lowercase().parse::<Lsn>().unwrap(), l);
        }

        #[test]
        fn normalize_subtracts_0_24_or_40(v in any::<u64>()) {
            let l = Lsn(v);
            let d = l.0 - l.normalize_insert_position().0;
            prop_assert!(d == 0 || d == 24 || d == 40);
        }

        #[test]
        fn normalize_near_boundaries(page in 0u64..1_000_000, off in 0u64..64) {
            let l = Lsn(page * WAL_PAGE_SIZE + off);
            let d = l.0 - l.normalize_insert_position().0;
            prop_assert!(d == 0 || d == 24 || d == 40);
        }
    }
}
