//! `CausalFloor`: the highest commit LSN this tidemark instance has acknowledged to a client, the
//! requirement of every `causal` read (see [`crate::Consistency::Causal`]).
//!
//! Raised (max-merged, lock-free) by every write's commit position *before* the write's
//! acknowledgement is released to its client, so a read that arrives after the acknowledgement
//! sees it. When a write committed but its position could not be read, the floor is *unknown*
//! until a position read on the primary that started after that write succeeds (the primary's
//! insert position then is at or past the lost commit): causal reads meanwhile go to the
//! primary. Tickets order the two: [`CausalFloor::ticket`] is taken before such a read is sent.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::lsn::Lsn;

/// See the module documentation. Shared by all sessions of a process.
#[derive(Debug, Default)]
pub struct CausalFloor {
    lsn: AtomicU64,
    /// 0: known. Otherwise the ticket of the newest write whose position was lost.
    unknown: AtomicU64,
    tickets: AtomicU64,
    /// A `causal` read has depended on the floor in this process (see [`CausalFloor::note_reader`]).
    readers: AtomicBool,
}

impl CausalFloor {
    /// A known floor at `Lsn::ZERO`.
    pub fn new() -> Self {
        CausalFloor::default()
    }

    /// A write committed at `lsn` (and is about to be acknowledged).
    pub fn raise(&self, lsn: Lsn) {
        self.lsn.fetch_max(lsn.0, Ordering::SeqCst);
    }

    /// The floor, or `None` while a lost write's position is unresolved.
    pub fn get(&self) -> Option<Lsn> {
        if self.unknown.load(Ordering::SeqCst) != 0 {
            return None;
        }
        Some(Lsn(self.lsn.load(Ordering::SeqCst)))
    }

    /// The floor as far as it is known (ignoring an unresolved write).
    pub fn known(&self) -> Lsn {
        Lsn(self.lsn.load(Ordering::SeqCst))
    }

    /// Whether the floor is unknown.
    pub fn is_unknown(&self) -> bool {
        self.unknown.load(Ordering::SeqCst) != 0
    }

    /// A `causal` read is being routed. Once one has been, writers keep every commit position
    /// exact (they never leave the floor unknown to save a position read), so causal reads do
    /// not each have to ask the primary. One relaxed load after the first.
    pub fn note_reader(&self) {
        if !self.readers.load(Ordering::Relaxed) {
            self.readers.store(true, Ordering::Relaxed);
        }
    }

    /// Whether a `causal` read has been routed in this process.
    pub fn has_readers(&self) -> bool {
        self.readers.load(Ordering::Relaxed)
    }

    /// Take before sending a read of the primary's position that may resolve an unknown floor.
    pub fn ticket(&self) -> u64 {
        self.tickets.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// A write committed but its position is lost: the floor is unknown until [`resolve`]
    /// with a ticket taken after this call.
    ///
    /// [`resolve`]: CausalFloor::resolve
    pub fn mark_unknown(&self) {
        let t = self.ticket();
        self.unknown.fetch_max(t, Ordering::SeqCst);
    }

    /// The primary's position read with `ticket` was `lsn`: raises the floor, and makes it
    /// known again if every lost write was marked before `ticket` was taken.
    pub fn resolve(&self, lsn: Lsn, ticket: u64) {
        self.raise(lsn);
        let mut cur = self.unknown.load(Ordering::SeqCst);
        while cur != 0 && cur < ticket {
            match self
                .unknown
                .compare_exchange(cur, 0, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => break,
                Err(now) => cur = now,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_maximum() {
        let f = CausalFloor::new();
        assert_eq!(f.get(), Some(Lsn::ZERO));
        f.raise(Lsn(100));
        f.raise(Lsn(50));
        assert_eq!(f.get(), Some(Lsn(100)));
    }

    #[test]
    fn readers_are_noted_once_and_stay() {
        let f = CausalFloor::new();
        assert!(!f.has_readers());
        f.note_reader();
        f.note_reader();
        assert!(f.has_readers());
        // Noting a reader changes nothing about the floor.
        assert_eq!(f.get(), Some(Lsn::ZERO));
    }

    #[test]
    fn unknown_until_resolved_by_a_later_read() {
        let f = CausalFloor::new();
        f.raise(Lsn(10));
        let early = f.ticket();
        f.mark_unknown();
        assert_eq!(f.get(), None);
        // A read sent before the loss proves nothing about the lost write.
        f.resolve(Lsn(20), early);
        assert_eq!(f.get(), None);
        let late = f.ticket();
        f.mark_unknown(); // a second loss after `late` was taken
        f.resolve(Lsn(30), late);
        assert_eq!(f.get(), None);
        let last = f.ticket();
        f.resolve(Lsn(40), last);
        assert_eq!(f.get(), Some(Lsn(40)));
    }

    #[test]
    fn concurrent_raises_keep_the_maximum() {
        let f = std::sync::Arc::new(CausalFloor::new());
        let hs: Vec<_> = (0..4u64)
            .map(|t| {
                let f = f.clone();
                std::thread::spawn(move || {
                    for i in 0..1000 {
                        f.raise(Lsn(i * 4 + t));
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        assert_eq!(f.get(), Some(Lsn(3999)));
    }
}
