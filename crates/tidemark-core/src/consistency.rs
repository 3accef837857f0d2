//! `Consistency`: the read consistency levels (`strong`, `causal`, `session`, `bounded(d)`,
//! `eventual`),
//! their text form as used in config, `SET tidemark.consistency` and hint comments.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// How fresh a read must be.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Default)]
pub enum Consistency {
    /// Primary only.
    Strong,
    /// Read-your-writes: a replica must have replayed everything the reader depends on.
    #[default]
    Session,
    /// `Session`, and the replica must also have replayed every write this tidemark instance
    /// (or, with `[shared]`, any instance sharing the Redis store) acknowledged before the read
    /// arrived: the causal floor. Any pooled connection then sees what another one wrote.
    Causal,
    /// Read-your-writes, and the replica's time lag must be at most this.
    Bounded(Duration),
    /// Any replica in rotation; ignores the reader's LSN requirement.
    Eventual,
}

impl Consistency {
    /// True if this level may ever be served by a replica.
    pub fn allows_replica(&self) -> bool {
        !matches!(self, Consistency::Strong)
    }
}

/// Text that is not a consistency level.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid consistency {text:?}{detail}: expected one of strong, causal, session, eventual, bounded(DURATION), bounded:DURATION or bounded=DURATION with a duration such as 200ms, 2s or 1m")]
pub struct ConsistencyParseError {
    /// The text that failed to parse.
    pub text: String,
    detail: String,
}

impl FromStr for Consistency {
    type Err = ConsistencyParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |detail: String| ConsistencyParseError {
            text: s.to_string(),
            detail,
        };
        let t = s.trim();
        let lower = t.to_ascii_lowercase();
        match lower.as_str() {
            "strong" => return Ok(Consistency::Strong),
            "session" => return Ok(Consistency::Session),
            "causal" => return Ok(Consistency::Causal),
            "eventual" => return Ok(Consistency::Eventual),
            _ => {}
        }
        let Some(rest) = lower.strip_prefix("bounded") else {
            return Err(err(String::new()));
        };
        let rest = rest.trim_start();
        let dur = if let Some(inner) = rest.strip_prefix('(') {
            inner
                .strip_suffix(')')
                .ok_or_else(|| err(" (missing closing parenthesis)".into()))?
        } else if let Some(d) = rest.strip_prefix(':').or_else(|| rest.strip_prefix('=')) {
            d
        } else {
            return Err(err(" (bounded needs a duration)".into()));
        };
        let dur = dur.trim();
        if dur.is_empty() {
            return Err(err(" (bounded needs a duration)".into()));
        }
        humantime::parse_duration(dur)
            .map(Consistency::Bounded)
            .map_err(|e| err(format!(" (bad duration {dur:?}: {e})")))
    }
}

impl fmt::Display for Consistency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Consistency::Strong => f.write_str("strong"),
            Consistency::Session => f.write_str("session"),
            Consistency::Causal => f.write_str("causal"),
            Consistency::Bounded(d) => write!(f, "bounded({})", humantime::format_duration(*d)),
            Consistency::Eventual => f.write_str("eventual"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_all_forms() {
        assert_eq!("strong".parse(), Ok(Consistency::Strong));
        assert_eq!("SESSION".parse(), Ok(Consistency::Session));
        assert_eq!("causal".parse(), Ok(Consistency::Causal));
        assert_eq!(" Eventual ".parse(), Ok(Consistency::Eventual));
        let ms200 = Consistency::Bounded(Duration::from_millis(200));
        assert_eq!("bounded(200ms)".parse(), Ok(ms200));
        assert_eq!("BOUNDED( 200ms )".parse(), Ok(ms200));
        assert_eq!(
            "bounded:2s".parse(),
            Ok(Consistency::Bounded(Duration::from_secs(2)))
        );
        assert_eq!(
            "bounded=1s".parse(),
            Ok(Consistency::Bounded(Duration::from_secs(1)))
        );
        assert_eq!(
            "bounded(1m)".parse(),
            Ok(Consistency::Bounded(Duration::from_secs(60)))
        );
    }

    #[test]
    fn rejects_with_helpful_error() {
        for bad in [
            "",
            "strongish",
            "bounded",
            "bounded()",
            "bounded(2s",
            "bounded:fast",
            "bounded-2s",
        ] {
            let e = bad.parse::<Consistency>().unwrap_err();
            let msg = e.to_string();
            assert!(msg.contains("strong, causal, session, eventual"), "{msg}");
            assert!(msg.contains("200ms"), "{msg}");
            assert_eq!(e.text, bad);
        }
    }

    #[test]
    fn display_round_trips() {
        for c in [
            Consistency::Strong,
            Consistency::Session,
            Consistency::Causal,
            Consistency::Eventual,
            Consistency::Bounded(Duration::from_millis(200)),
            Consistency::Bounded(Duration::from_millis(1500)),
            Consistency::Bounded(Duration::from_secs(90)),
        ] {
            assert_eq!(c.to_string().parse::<Consistency>().unwrap(), c);
        }
        assert_eq!(
            Consistency::Bounded(Duration::from_millis(200)).to_string(),
            "bounded(200ms)"
        );
        assert_eq!(Consistency::default(), Consistency::Session);
    }
}
