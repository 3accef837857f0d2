//! What optimistic transactions learned (issue 22): per transaction shape (the fingerprint of
//! its first statement, constants blanked), a decayed count of how often it ended up writing.
//! A shape that usually writes starts on the primary (no replica round, no replay); decay lets
//! it come back once its transactions stop writing. Also the per-outcome counts behind
//! `SHOW TRANSACTIONS` and `tidemark_transactions_total`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

/// Shapes remembered at most; past it, an arbitrary one is forgotten for each new one.
pub const MAX_SHAPES: usize = 10_000;
/// Weight of the past in the decayed count (each new transaction of the shape multiplies it).
const DECAY: f32 = 0.7;
/// A shape whose decayed count of writing transactions reaches this starts on the primary:
/// two writing transactions in a row (1 + 0.7), or three of the last four or so.
const PRIMARY_AT: f32 = 1.5;

/// How an optimistic-mode transaction (or one that could have been) ran.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TxOutcome {
    /// Ran on a replica from BEGIN to its end, never wrote.
    Replica,
    /// Started on a replica, replayed on the primary at its first write (same answers), went on there.
    Replayed,
    /// Started on a replica; at its first write the primary answered differently: 40001.
    Diverged,
    /// Declared where it goes (`READ WRITE`, or `routing.transactions = primary`).
    PrimaryDeclared,
    /// Its shape usually writes: started on the primary.
    PrimaryLearned,
    /// SERIALIZABLE (a hot standby refuses it): on the primary.
    PrimaryLevel,
    /// Its first statement writes: on the primary from the start.
    PrimaryWrite,
    /// Its first read was routed to the primary (no replica had what the session depends on).
    PrimaryRouted,
}

impl TxOutcome {
    pub const ALL: [TxOutcome; 8] = [
        TxOutcome::Replica,
        TxOutcome::Replayed,
        TxOutcome::Diverged,
        TxOutcome::PrimaryDeclared,
        TxOutcome::PrimaryLearned,
        TxOutcome::PrimaryLevel,
        TxOutcome::PrimaryWrite,
        TxOutcome::PrimaryRouted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TxOutcome::Replica => "replica",
            TxOutcome::Replayed => "replayed",
            TxOutcome::Diverged => "diverged",
            TxOutcome::PrimaryDeclared => "primary_declared",
            TxOutcome::PrimaryLearned => "primary_learned",
            TxOutcome::PrimaryLevel => "primary_level",
            TxOutcome::PrimaryWrite => "primary_write",
            TxOutcome::PrimaryRouted => "primary_routed",
        }
    }

    fn index(self) -> usize {
        TxOutcome::ALL
            .iter()
            .position(|o| *o == self)
            .unwrap_or_default()
    }
}

#[derive(Default)]
pub struct TxShapes {
    shapes: Mutex<HashMap<u64, f32>>,
    outcomes: [AtomicU64; 8],
    replays: AtomicU64,
    replay_bytes: AtomicU64,
}

/// A snapshot of the counts (`SHOW TRANSACTIONS`, tests).
#[derive(Clone, Debug, Default)]
pub struct TxCounts {
    pub outcomes: Vec<(&'static str, u64)>,
    pub replays: u64,
    pub replay_bytes: u64,
    pub shapes: usize,
    pub shapes_on_primary: usize,
}

impl TxCounts {
    pub fn get(&self, outcome: &str) -> u64 {
        self.outcomes
            .iter()
            .find(|(o, _)| *o == outcome)
            .map(|(_, n)| *n)
            .unwrap_or(0)
    }
}

impl TxShapes {
    /// Whether transactions of this shape start on the primary (they usually write).
    pub fn starts_on_primary(&self, shape: u64) -> bool {
        self.shapes
            .lock()
            .get(&shape)
            .is_some_and(|s| *s >= PRIMARY_AT)
    }

    /// A transaction of this shape ended: it wrote (or was about to) or not.
    pub fn record(&self, shape: u64, wrote: bool) {
        let mut m = self.shapes.lock();
        if !m.contains_key(&shape) && m.len() >= MAX_SHAPES {
            if let Some(k) = m.keys().next().copied() {
                m.remove(&k);
            }
        }
        let e = m.entry(shape).or_insert(0.0);
        *e = *e * DECAY + if wrote { 1.0 } else { 0.0 };
        if *e < 0.01 {
            // Forgotten: it reads.
            m.remove(&shape);
        }
    }

    pub fn outcome(&self, o: TxOutcome) {
        self.outcomes[o.index()].fetch_add(1, Ordering::Relaxed);
        crate::metrics::transaction(o.as_str());
    }

    pub fn replayed(&self, bytes: usize) {
        self.replays.fetch_add(1, Ordering::Relaxed);
        self.replay_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        crate::metrics::transaction_replay(bytes);
    }

    pub fn counts(&self) -> TxCounts {
        let m = self.shapes.lock();
        TxCounts {
            outcomes: TxOutcome::ALL
                .iter()
                .map(|o| (o.as_str(), self.outcomes[o.index()].load(Ordering::Relaxed)))
                .collect(),
            replays: self.replays.load(Ordering::Relaxed),
            replay_bytes: self.replay_bytes.load(Ordering::Relaxed),
            shapes: m.len(),
            shapes_on_primary: m.values().filter(|s| **s >= PRIMARY_AT).count(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shape_that_writes_starts_on_the_primary_and_comes_back() {
        let t = TxShapes::default();
        assert!(!t.starts_on_primary(1));
        t.record(1, true);
        assert!(!t.starts_on_primary(1), "one write is not a habit");
        t.record(1, true);
        assert!(t.starts_on_primary(1));
        // Reads only: decays back.
        for _ in 0..3 {
            t.record(1, false);
        }
        assert!(!t.starts_on_primary(1));
        // Other shapes are not affected.
        t.record(2, false);
        assert!(!t.starts_on_primary(2));
        assert_eq!(t.counts().shapes_on_primary, 0);
    }

    #[test]
    fn the_map_is_bounded() {
        let t = TxShapes::default();
        for s in 0..(MAX_SHAPES as u64 + 50) {
            t.record(s, true);
        }
        assert!(t.counts().shapes <= MAX_SHAPES);
    }
}
