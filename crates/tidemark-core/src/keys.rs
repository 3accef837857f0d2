//! Key store for cross-connection read-your-writes: the highest commit LSN written under a
//! session key (`/* tidemark: key=user:42 */`), so another connection reading under that key
//! waits for a replica that has replayed it.

use std::num::NonZeroUsize;
use std::sync::{Mutex, MutexGuard};

use lru::LruCache;

use crate::lsn::Lsn;

/// Where key → LSN requirements live. Implementations are shared by all sessions.
pub trait KeyStore: Send + Sync {
    /// A write under `key` committed at `lsn`; keeps the maximum per key.
    fn record(&self, key: &str, lsn: Lsn);
    /// The LSN a read under `key` must wait for, if any.
    fn get(&self, key: &str) -> Option<Lsn>;
    /// Drop requirements every replica has already replayed (`lsn <= min_replica_lsn`).
    fn prune_replayed(&self, min_replica_lsn: Lsn);
    /// Number of keys held.
    fn len(&self) -> usize;
    /// True when no key is held.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Debug)]
struct Inner {
    map: LruCache<String, Lsn>,
    /// Highest LSN of an entry evicted before every replica had replayed it.
    floor: Lsn,
}

/// Bounded in-memory LRU key store.
///
/// Eviction must never produce a stale read: when the LRU drops a key, its requirement is
/// folded into a floor, and `get` returns at least that floor for every key (known or not) until
/// `prune_replayed` sees every replica past it. Evicting thus costs some replica offload
/// (reads wait for, or fall back from, a higher LSN than needed) but never correctness.
#[derive(Debug)]
pub struct MemoryKeyStore {
    inner: Mutex<Inner>,
}

impl MemoryKeyStore {
    /// A store holding at most `capacity` keys (at least 1).
    pub fn new(capacity: usize) -> Self {
        let cap = NonZeroUsize::new(capacity).unwrap_or(NonZeroUsize::MIN);
        MemoryKeyStore {
            inner: Mutex::new(Inner {
                map: LruCache::new(cap),
                floor: Lsn::ZERO,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every critical section leaves `Inner` consistent, so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The eviction floor (`Lsn::ZERO` when nothing unreplayed has been evicted).
    pub fn floor(&self) -> Lsn {
        self.lock().floor
    }
}

impl KeyStore for MemoryKeyStore {
    fn record(&self, key: &str, lsn: Lsn) {
        let mut inner = self.lock();
        if let Some(v) = inner.map.get_mut(key) {
            *v = (*v).max(lsn);
            return;
        }
        if let Some((_, evicted)) = inner.map.push(key.to_string(), lsn) {
            inner.floor = inner.floor.max(evicted);
        }
    }

    fn get(&self, key: &str) -> Option<Lsn> {
        let mut inner = self.lock();
        let floor = inner.floor;
        match inner.map.get(key) {
            Some(v) => Some((*v).max(floor)),
            None if floor > Lsn::ZERO => Some(floor),
            None => None,
        }
    }

    fn prune_replayed(&self, min_replica_lsn: Lsn) {
        let mut inner = self.lock();
        let stale: Vec<String> = inner
            .map
            .iter()
            .filter(|(_, v)| **v <= min_replica_lsn)
            .map(|(k, _)| k.clone())
            .collect();
        for k in stale {
            inner.map.pop(&k);
        }
        if min_replica_lsn >= inner.floor {
            inner.floor = Lsn::ZERO;
        }
    }

    fn len(&self) -> usize {
        self.lock().map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_max_per_key() {
        let s = MemoryKeyStore::new(10);
        assert_eq!(s.get("a"), None);
        assert!(s.is_empty());
        s.record("a", Lsn(100));
        s.record("a", Lsn(50));
        assert_eq!(s.get("a"), Some(Lsn(100)));
        s.record("a", Lsn(150));
        assert_eq!(s.get("a"), Some(Lsn(150)));
        assert_eq!(s.get("b"), None);
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn prune_drops_replayed_entries() {
        let s = MemoryKeyStore::new(10);
        s.record("a", Lsn(100));
        s.record("b", Lsn(200));
        s.prune_replayed(Lsn(100));
        assert_eq!(s.get("a"), None);
        assert_eq!(s.get("b"), Some(Lsn(200)));
        s.prune_replayed(Lsn(250));
        assert_eq!(s.len(), 0);
    }

    #[test]
    fn eviction_never_loses_a_requirement() {
        let s = MemoryKeyStore::new(2);
        s.record("a", Lsn(300));
        s.record("b", Lsn(100));
        s.record("c", Lsn(200)); // evicts "a" (least recently used)
        assert_eq!(s.len(), 2);
        assert_eq!(s.floor(), Lsn(300));
        // The evicted key still waits for its write.
        assert_eq!(s.get("a"), Some(Lsn(300)));
        // Other keys (known or not) are raised to the floor: conservative, never stale.
        assert_eq!(s.get("b"), Some(Lsn(300)));
        assert_eq!(s.get("zzz"), Some(Lsn(300)));
        // Replicas not yet past the floor: floor stays.
        s.prune_replayed(Lsn(250));
        assert_eq!(s.floor(), Lsn(300));
        assert_eq!(s.get("a"), Some(Lsn(300)));
        // Every replica past the floor: floor cleared.
        s.prune_replayed(Lsn(300));
        assert_eq!(s.floor(), Lsn::ZERO);
        assert_eq!(s.get("a"), None);
        assert_eq!(s.len(), 0);
    }

    #[test]
    fn zero_capacity_is_one() {
        let s = MemoryKeyStore::new(0);
        s.record("a", Lsn(1));
        s.record("b", Lsn(2));
        assert_eq!(s.len(), 1);
        assert_eq!(s.get("a"), Some(Lsn(1)));
    }

    #[test]
    fn shared_across_threads() {
        let s: std::sync::Arc<dyn KeyStore> = std::sync::Arc::new(MemoryKeyStore::new(8));
        let s2 = s.clone();
        std::thread::spawn(move || s2.record("k", Lsn(7)))
            .join()
            .unwrap();
        assert_eq!(s.get("k"), Some(Lsn(7)));
    }
}
