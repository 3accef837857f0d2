//! `Classifier`: the shared, thread-safe entry point. Holds the function rules (policy + catalog)
//! and a bounded LRU cache of analyses keyed by a 64-bit hash of the full query text; a hit is
//! only served after comparing the stored text, so a hash collision costs a parse, never a wrong
//! answer.

use std::hash::BuildHasher;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use lru::LruCache;
use parking_lot::{Mutex, RwLock};

use crate::analyze::analyze;
use crate::class::{Analysis, Class, SessionKind};
use crate::comment::{
    merge_trailing, scan_sqlcommenter, split_trailing_comment, DEFAULT_KEY_ATTRIBUTE,
};
use crate::functions::{FunctionCatalog, FunctionPolicy, FunctionRules};
use crate::normalize::normalize_in;

/// Texts longer than this are classified but not cached (typically one-off bulk statements).
pub const MAX_CACHED_TEXT: usize = 64 * 1024;
/// The cache holds at most this many bytes of text (besides its bound in entries), so
/// 10,000 entries of 64 KiB cannot take 640 MiB.
pub const MAX_CACHED_BYTES: usize = 16 * 1024 * 1024;

struct Entry {
    text: Box<str>,
    analysis: Arc<Analysis>,
}

struct Inner {
    /// Bumped by `set_catalog`; an analysis computed with older rules is not cached.
    generation: u64,
    rules: Arc<FunctionRules>,
    cache: Option<LruCache<u64, Entry>>,
    /// Bytes of text held by `cache`.
    bytes: usize,
}

impl Inner {
    /// Stores an entry, then evicts least recently used ones while over `MAX_CACHED_BYTES`.
    fn put(&mut self, key: u64, entry: Entry) {
        let Some(cache) = self.cache.as_mut() else {
            return;
        };
        self.bytes += entry.text.len();
        if let Some((_, old)) = cache.push(key, entry) {
            self.bytes -= old.text.len();
        }
        while self.bytes > MAX_CACHED_BYTES {
            match cache.pop_lru() {
                Some((_, old)) => self.bytes -= old.text.len(),
                None => break,
            }
        }
    }
}

/// Classifies query texts. `Send + Sync`; share one per process behind an `Arc`.
pub struct Classifier {
    policy: FunctionPolicy,
    inner: Mutex<Inner>,
    hits: AtomicU64,
    misses: AtomicU64,
    key_attribute: RwLock<Arc<str>>,
    /// `Inner::generation`, readable without the lock (see [`Classifier::generation`]).
    generation: AtomicU64,
}

impl std::fmt::Debug for Classifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (hits, misses) = self.cache_stats();
        f.debug_struct("Classifier")
            .field("policy", &self.policy)
            .field("cached", &self.cached_len())
            .field("hits", &hits)
            .field("misses", &misses)
            .finish()
    }
}

/// Keeps shape keys and exact-text keys apart in the one cache.
const SHAPE_SALT: u64 = 0x9e37_79b9_7f4a_7c15;

/// True when no constant in the text can change the analysis: everything but `SET` (whose
/// value is replayed on other connections) and tidemark commands (whose value is the point).
fn constant_blind(a: &Analysis, sql: &str) -> bool {
    // Whether `set_config` pins depends on its literal third argument (a plain text search:
    // a false positive only costs the shape cache).
    let set_config = sql
        .as_bytes()
        .windows(10)
        .any(|w| w.eq_ignore_ascii_case(b"set_config"));
    !set_config
        && !a.statements.iter().any(|c| {
            matches!(
                c,
                Class::Tidemark(_)
                    | Class::SessionState(SessionKind::Set { .. } | SessionKind::SetSeveral { .. })
            )
        })
        && !matches!(a.class, Class::Tidemark(_))
}

/// The cache key of a text: foldhash with a seed chosen at random per process (SipHash showed
/// in the per-statement profile; a random seed keeps clients from choosing texts that collide,
/// which would only cost parses anyway, since a hit compares the text).
fn text_hash(sql: &str) -> u64 {
    static STATE: std::sync::OnceLock<foldhash::quality::RandomState> = std::sync::OnceLock::new();
    STATE.get_or_init(Default::default).hash_one(sql)
}

impl Classifier {
    /// A classifier caching up to `cache_capacity` texts (0 disables the cache), with the
    /// operator's function policy and an empty catalog (see [`Classifier::set_catalog`]).
    pub fn new(cache_capacity: usize, policy: FunctionPolicy) -> Self {
        let rules = Arc::new(FunctionRules::new(&policy, FunctionCatalog::new()));
        Classifier {
            policy,
            inner: Mutex::new(Inner {
                generation: 0,
                rules,
                cache: NonZeroUsize::new(cache_capacity).map(LruCache::new),
                bytes: 0,
            }),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            key_attribute: RwLock::new(Arc::from(DEFAULT_KEY_ATTRIBUTE)),
            generation: AtomicU64::new(0),
        }
    }

    /// Replaces the function catalog (loaded from the primary with
    /// [`FunctionCatalog::LOAD_SQL`]) and empties the cache, whose entries were judged with the
    /// old catalog.
    pub fn set_catalog(&self, catalog: FunctionCatalog) {
        let rules = Arc::new(FunctionRules::new(&self.policy, catalog));
        let mut inner = self.inner.lock();
        inner.generation += 1;
        self.generation.store(inner.generation, Ordering::Release);
        inner.rules = rules;
        if let Some(c) = inner.cache.as_mut() {
            c.clear();
        }
        inner.bytes = 0;
    }

    /// Which function catalog answers are judged with: it changes whenever
    /// [`Classifier::set_catalog`] replaces it. An analysis kept outside the cache (a
    /// session's last unnamed statement) is only reused while this is unchanged.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The sqlcommenter attribute that carries a key (`routing.comment_key_attribute`; default
    /// [`DEFAULT_KEY_ATTRIBUTE`]).
    pub fn set_comment_key_attribute(&self, name: &str) {
        *self.key_attribute.write() = Arc::from(name);
    }

    /// The analysis of `sql`: its class, per-statement classes, whether it pins the session, and
    /// its hints. Cached; never fails and never panics (unparsable text is `Class::Unknown`).
    ///
    /// A trailing block comment (sqlcommenter: `/*tidemark_key='user%3A42',…*/`) is split off
    /// first: the statement is classified and cached without it, so per-request values in the
    /// comment share the statement's cache entry; tidemark's attributes in it are added to the
    /// hints of the answer (see [`crate::comment`]).
    pub fn classify(&self, sql: &str) -> Arc<Analysis> {
        let (stmt, comment) = split_trailing_comment(sql);
        let analysis = self.classify_statement(stmt);
        self.with_comment(analysis, comment)
    }

    /// Adds a trailing comment's attributes to a (shared) analysis; the same analysis when the
    /// comment names none.
    fn with_comment(&self, analysis: Arc<Analysis>, comment: Option<&str>) -> Arc<Analysis> {
        let Some(body) = comment else {
            return analysis;
        };
        let attr = self.key_attribute.read().clone();
        let trailing = scan_sqlcommenter(body, &attr);
        if trailing.is_empty() {
            return analysis;
        }
        let mut a = (*analysis).clone();
        merge_trailing(&mut a.hints, trailing);
        Arc::new(a)
    }

    fn classify_statement(&self, sql: &str) -> Arc<Analysis> {
        // Two keys: the text with constants blanked (shared by every statement of the same
        // shape, used only for analyses no constant can change) and the exact text.
        // The shape is written into a per-thread buffer (no allocation per statement); the
        // buffer is taken out while in use, so a nested call would only allocate its own.
        let mut buf = ShapeBuf::take();
        let shaped = if sql.len() <= MAX_CACHED_TEXT {
            normalize_in(sql, &mut buf.0)
        } else {
            None
        };
        let norm: &str = shaped.unwrap_or(sql);
        let shape_key = text_hash(norm) ^ SHAPE_SALT;
        // A text without constants is its own shape: one hash serves both keys. Otherwise the
        // exact text is hashed only when its shape is not cached (the common hit needs one).
        let exact_key_of = || match shaped {
            None => shape_key ^ SHAPE_SALT,
            Some(_) => text_hash(sql),
        };
        let (generation, rules, exact_key) = {
            let mut inner = self.inner.lock();
            let mut exact = None;
            if let Some(cache) = inner.cache.as_mut() {
                if let Some(e) = cache.get(&shape_key) {
                    if *e.text == *norm {
                        self.hits.fetch_add(1, Ordering::Relaxed);
                        return e.analysis.clone();
                    }
                }
                let key = exact_key_of();
                exact = Some(key);
                if let Some(e) = cache.get(&key) {
                    if &*e.text == sql {
                        self.hits.fetch_add(1, Ordering::Relaxed);
                        return e.analysis.clone();
                    }
                }
            }
            (inner.generation, inner.rules.clone(), exact)
        };
        self.misses.fetch_add(1, Ordering::Relaxed);
        let analysis = Arc::new(analyze(sql, &rules));
        if sql.len() <= MAX_CACHED_TEXT {
            let (key, text) = if constant_blind(&analysis, sql) {
                (shape_key, norm)
            } else {
                (exact_key.unwrap_or_else(exact_key_of), sql)
            };
            let mut inner = self.inner.lock();
            if inner.generation == generation {
                inner.put(
                    key,
                    Entry {
                        text: text.into(),
                        analysis: analysis.clone(),
                    },
                );
            }
        }
        analysis
    }

    /// Classifies without touching the cache or the counters.
    pub fn classify_uncached(&self, sql: &str) -> Analysis {
        let rules = self.inner.lock().rules.clone();
        let (stmt, comment) = split_trailing_comment(sql);
        let a = Arc::new(analyze(stmt, &rules));
        let a = self.with_comment(a, comment);
        Arc::try_unwrap(a).unwrap_or_else(|a| (*a).clone())
    }

    /// `(hits, misses)` of [`Classifier::classify`] since creation.
    pub fn cache_stats(&self) -> (u64, u64) {
        (
            self.hits.load(Ordering::Relaxed),
            self.misses.load(Ordering::Relaxed),
        )
    }

    /// Number of texts currently cached.
    pub fn cached_len(&self) -> usize {
        self.inner.lock().cache.as_ref().map_or(0, |c| c.len())
    }

    /// Test hook: store `analysis` for `sql` under the cache key of `under` (simulates a hash
    /// collision between two texts).
    #[cfg(test)]
    pub(crate) fn force_entry(&self, under: &str, sql: &str, analysis: Analysis) {
        let mut inner = self.inner.lock();
        inner.put(
            text_hash(under),
            Entry {
                text: sql.into(),
                analysis: Arc::new(analysis),
            },
        );
    }

    /// Bytes of text the cache holds.
    pub fn cached_bytes(&self) -> usize {
        self.inner.lock().bytes
    }
}

thread_local! {
    static SHAPE_BUF: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
}

/// The per-thread buffer a statement's shape is written into, given back when dropped (kept
/// only while small: one very long statement does not pin its size).
struct ShapeBuf(Vec<u8>);

impl ShapeBuf {
    fn take() -> ShapeBuf {
        ShapeBuf(SHAPE_BUF.try_with(|b| b.take()).unwrap_or_default())
    }
}

impl Drop for ShapeBuf {
    fn drop(&mut self) {
        if self.0.capacity() <= 16 * 1024 {
            let b = std::mem::take(&mut self.0);
            let _ = SHAPE_BUF.try_with(|c| c.set(b));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::class::Class;
    use crate::functions::Volatility;

    #[test]
    fn counts_hits_and_misses() {
        let c = Classifier::new(10, FunctionPolicy::default());
        let a = c.classify("SELECT 1");
        let b = c.classify("SELECT 1");
        assert!(Arc::ptr_eq(&a, &b));
        c.classify("SELECT 2 AS two");
        assert_eq!(c.cache_stats(), (1, 2));
    }

    #[test]
    fn statements_differing_in_constants_share_one_parse() {
        let c = Classifier::new(10, FunctionPolicy::default());
        let a = c.classify("SELECT v FROM t WHERE id = 1 AND name = 'x'");
        let b = c.classify("SELECT v FROM t WHERE id = 2 AND name = 'y'");
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(c.cache_stats(), (1, 1));
        // SET values are replayed on other connections: never merged.
        let s1 = c.classify("SET search_path = 'a'");
        let s2 = c.classify("SET search_path = 'b'");
        assert_ne!(s1.statements, s2.statements);
        let t1 = c.classify("SET tidemark.key = 'user:1'");
        let t2 = c.classify("SET tidemark.key = 'user:2'");
        assert_ne!(t1.class, t2.class);
    }

    #[test]
    fn statements_differing_only_in_a_trailing_comment_share_one_entry() {
        let c = Classifier::new(10, FunctionPolicy::default());
        let a = c.classify(
            "SELECT v FROM t WHERE id = $1 /*controller='show',tidemark_key='user%3A1',traceparent='00-aa-01'*/",
        );
        let b = c.classify(
            "SELECT v FROM t WHERE id = $1 /*controller='show',tidemark_key='user%3A2',traceparent='00-bb-01'*/",
        );
        let plain = c.classify("SELECT v FROM t WHERE id = $1 /*controller='index'*/");
        assert_eq!(c.cache_stats(), (2, 1));
        assert_eq!(c.cached_len(), 1);
        assert_eq!(a.hints.key.as_deref(), Some("user:1"));
        assert_eq!(b.hints.key.as_deref(), Some("user:2"));
        assert_eq!(plain.hints.key, None);
        assert_eq!(a.class, Class::Read);
        // Not ours: the shared analysis itself.
        assert!(Arc::ptr_eq(
            &plain,
            &c.classify("SELECT v FROM t WHERE id = $1")
        ));
        // A configured attribute name.
        c.set_comment_key_attribute("tenant");
        let t = c.classify("SELECT v FROM t WHERE id = $1 /*tenant='acme',tidemark_key='x'*/");
        assert_eq!(t.hints.key.as_deref(), Some("acme"));
        // A bad value of ours: an error, so the statement goes to the primary.
        let bad = c.classify("SELECT v FROM t WHERE id = $1 /*tidemark_consistency='often'*/");
        assert_eq!(bad.hints.errors.len(), 1);
        assert!(!bad.is_read());
        assert_eq!(c.cached_len(), 1);
    }

    #[test]
    fn eviction_keeps_the_bound() {
        let c = Classifier::new(3, FunctionPolicy::default());
        for i in 0..10 {
            c.classify(&format!("SELECT {i} AS c{i}"));
        }
        assert_eq!(c.cached_len(), 3);
        // Most recent three are hits, the oldest was evicted.
        c.classify("SELECT 9 AS c9");
        c.classify("SELECT 0 AS c0");
        assert_eq!(c.cache_stats(), (1, 11));
    }

    #[test]
    fn zero_capacity_disables_cache() {
        let c = Classifier::new(0, FunctionPolicy::default());
        c.classify("SELECT 1");
        c.classify("SELECT 1");
        assert_eq!(c.cache_stats(), (0, 2));
        assert_eq!(c.cached_len(), 0);
    }

    #[test]
    fn colliding_hash_with_different_text_is_a_miss() {
        let c = Classifier::new(10, FunctionPolicy::default());
        // Pretend "DELETE FROM t" collides with a cached read.
        let read = c.classify_uncached("SELECT 1");
        assert_eq!(read.class, Class::Read);
        c.force_entry("DELETE FROM t", "SELECT 1", read);
        let a = c.classify("DELETE FROM t");
        assert_eq!(a.class, Class::Write);
        assert_eq!(c.cache_stats(), (0, 1));
        // The real entry replaced the colliding one.
        assert_eq!(c.classify("DELETE FROM t").class, Class::Write);
        assert_eq!(c.cache_stats(), (1, 1));
    }

    #[test]
    fn set_catalog_clears_cache_and_changes_answers() {
        let c = Classifier::new(10, FunctionPolicy::default());
        assert_eq!(c.classify("SELECT my_read()").class, Class::Write);
        let before = c.generation();
        let mut cat = FunctionCatalog::new();
        cat.insert("public", "my_read", Volatility::Stable);
        c.set_catalog(cat);
        // What sessions keep outside the cache (their last unnamed statement) is judged anew.
        assert_ne!(c.generation(), before);
        assert_eq!(c.cached_len(), 0);
        assert_eq!(c.classify("SELECT my_read()").class, Class::Read);
    }

    #[test]
    fn cache_is_bounded_in_bytes() {
        let c = Classifier::new(100_000, FunctionPolicy::default());
        // 350 distinct ~60 KB texts: 21 MB if entries were the only bound.
        for i in 0..350 {
            let sql = format!("SELECT {} /* {i} */ FROM t{i}", "x, ".repeat(20_000));
            c.classify(&sql);
            assert!(c.cached_bytes() <= MAX_CACHED_BYTES);
        }
        assert!(c.cached_bytes() > MAX_CACHED_BYTES / 2);
        assert!(c.cached_len() < 350);
    }

    #[test]
    fn huge_text_not_cached() {
        let c = Classifier::new(10, FunctionPolicy::default());
        let sql = format!("SELECT '{}'", "x".repeat(MAX_CACHED_TEXT));
        assert_eq!(c.classify(&sql).class, Class::Read);
        assert_eq!(c.cached_len(), 0);
    }

    #[test]
    fn is_send_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Classifier>();
    }
}
