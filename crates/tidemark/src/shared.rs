//! What several tidemark instances share through Redis (`[shared] redis_url`): the key store
//! (key → highest commit LSN written under it) and the causal floor (highest commit LSN any
//! instance acknowledged). See docs/architecture.md, "Several instances", for the reasoning.
//!
//! Layout under `prefix` (LSNs as 16 hex digits, so Lua compares them exactly as strings —
//! Redis' Lua numbers are doubles):
//!
//! - `{prefix}:floor` — the shared causal floor. Its existence marks an initialized store.
//! - `{prefix}:base` — the requirement of every key without an entry: the primary's position
//!   when the store was (re)initialized, so keys lost with a Redis restart stay covered.
//! - `{prefix}:keys` — hash key → LSN; `{prefix}:idx` — the same keys scored by LSN (as a
//!   double, approximate) to find prune candidates; each is checked exactly before removal.
//!
//! Every call is bounded by `[shared] timeout`. A failed or late call is *unknown*: keyed and
//! causal reads then go to the primary (`Reason::RequirementUnknown`), and a write whose
//! position could not be published is folded into `pending`, published (raising the floor and
//! the base, so every key is covered) as soon as Redis answers again.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::Script;
use tidemark_core::Lsn;

use crate::config::SharedConfig;

/// Reads the floor and, when a key is given, the key's requirement (at least the base).
const READ_LUA: &str = r"
local f = redis.call('GET', KEYS[1])
if not f then return {'uninit'} end
local k = ''
if ARGV[1] ~= '' then
  k = redis.call('GET', KEYS[2]) or '0000000000000000'
  local v = redis.call('HGET', KEYS[3], ARGV[1])
  if v and v > k then k = v end
end
return {'ok', f, k}
";

/// Max-merges a commit position into the floor and, when a key is given, into the key.
const PUBLISH_LUA: &str = r"
local f = redis.call('GET', KEYS[1])
if not f then return 'uninit' end
if ARGV[1] > f then redis.call('SET', KEYS[1], ARGV[1]) end
if ARGV[3] ~= '' then
  local v = redis.call('HGET', KEYS[3], ARGV[3])
  if (not v) or ARGV[1] > v then
    redis.call('HSET', KEYS[3], ARGV[3], ARGV[1])
    redis.call('ZADD', KEYS[4], ARGV[2], ARGV[3])
  end
end
return 'ok'
";

/// Max-merges a position into the floor and the base (every key): a fresh store's starting
/// point, or writes published late (their keys unknown).
const RAISE_ALL_LUA: &str = r"
local f = redis.call('GET', KEYS[1])
if (not f) and ARGV[2] ~= 'init' then return 'uninit' end
if (not f) or ARGV[1] > f then redis.call('SET', KEYS[1], ARGV[1]) end
local b = redis.call('GET', KEYS[2])
if (not b) or ARGV[1] > b then redis.call('SET', KEYS[2], ARGV[1]) end
return 'ok'
";

/// Removes keys whose LSN every replica has replayed (candidates by score, checked exactly).
const PRUNE_LUA: &str = r"
local c = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[2], 'LIMIT', 0, 1000)
local n = 0
for _, k in ipairs(c) do
  local v = redis.call('HGET', KEYS[1], k)
  if not v then
    redis.call('ZREM', KEYS[2], k)
  elseif v <= ARGV[1] then
    redis.call('HDEL', KEYS[1], k)
    redis.call('ZREM', KEYS[2], k)
    n = n + 1
  end
end
return n
";

fn hex(l: Lsn) -> String {
    format!("{:016X}", l.0)
}

fn unhex(s: &str) -> Option<Lsn> {
    u64::from_str_radix(s, 16).ok().map(Lsn)
}

/// Why a shared-store call has no answer.
#[derive(Debug, thiserror::Error)]
pub enum SharedError {
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("the shared store is empty (new or restarted redis): it must be initialized from the primary's position")]
    Uninit,
    #[error("unexpected answer from redis: {0}")]
    Answer(String),
}

/// What a read learned.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct SharedRead {
    /// The shared causal floor.
    pub floor: Lsn,
    /// The key's requirement, when a key was asked for.
    pub key: Option<Lsn>,
}

pub struct Shared {
    conn: ConnectionManager,
    timeout: Duration,
    names: [String; 4],
    read: Script,
    publish: Script,
    raise_all: Script,
    prune: Script,
    /// Highest commit position this instance acknowledged without publishing it (0: none).
    pending: AtomicU64,
    /// Whether the last call succeeded (a warning is logged on each change).
    up: AtomicBool,
}

impl Shared {
    /// The shared store of `[shared]`, `None` when no `redis_url` is set. Connects lazily.
    pub fn new(cfg: &SharedConfig) -> anyhow::Result<Option<Arc<Shared>>> {
        let Some(url) = cfg.redis_url.as_deref() else {
            return Ok(None);
        };
        let client =
            redis::Client::open(url).map_err(|e| anyhow::anyhow!("shared.redis_url: {e}"))?;
        let conf = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(cfg.timeout))
            .set_response_timeout(Some(cfg.timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(200));
        let conn = ConnectionManager::new_lazy_with_config(client, conf)
            .map_err(|e| anyhow::anyhow!("shared.redis_url: {e}"))?;
        let p = &cfg.prefix;
        Ok(Some(Arc::new(Shared {
            conn,
            timeout: cfg.timeout,
            names: [
                format!("{p}:floor"),
                format!("{p}:base"),
                format!("{p}:keys"),
                format!("{p}:idx"),
            ],
            read: Script::new(READ_LUA),
            publish: Script::new(PUBLISH_LUA),
            raise_all: Script::new(RAISE_ALL_LUA),
            prune: Script::new(PRUNE_LUA),
            pending: AtomicU64::new(0),
            up: AtomicBool::new(true),
        })))
    }

    async fn bounded<T>(
        &self,
        op: &'static str,
        f: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, SharedError> {
        let r = match tokio::time::timeout(self.timeout, f).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(SharedError::Redis(e)),
            Err(_) => Err(SharedError::Timeout(self.timeout)),
        };
        crate::metrics::shared_up(r.is_ok());
        match &r {
            Ok(_) => {
                if !self.up.swap(true, Ordering::Relaxed) {
                    tracing::warn!("the shared store (redis) answers again");
                }
            }
            Err(e) => {
                crate::metrics::shared_error(op);
                if self.up.swap(false, Ordering::Relaxed) {
                    tracing::warn!(op, error = %e, "the shared store (redis) failed; keyed and causal reads go to the primary until it answers");
                } else {
                    tracing::debug!(op, error = %e, "the shared store (redis) failed");
                }
            }
        }
        r
    }

    /// Whether the last call to Redis succeeded.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// The shared floor and, with `key`, the key's requirement. Publishes a pending position
    /// first: a read must not trust the store while this instance's own writes are missing
    /// from it.
    pub async fn read(&self, key: Option<&str>) -> Result<SharedRead, SharedError> {
        self.flush_pending().await?;
        let mut conn = self.conn.clone();
        let mut inv = self.read.prepare_invoke();
        inv.key(&self.names[0])
            .key(&self.names[1])
            .key(&self.names[2])
            .arg(key.unwrap_or(""));
        let v: Vec<String> = self.bounded("read", inv.invoke_async(&mut conn)).await?;
        match v.as_slice() {
            [s] if s == "uninit" => Err(SharedError::Uninit),
            [s, f, k] if s == "ok" => {
                let floor = unhex(f).ok_or_else(|| SharedError::Answer(f.clone()))?;
                let key = if key.is_some() {
                    Some(unhex(k).ok_or_else(|| SharedError::Answer(k.clone()))?)
                } else {
                    None
                };
                Ok(SharedRead { floor, key })
            }
            other => Err(SharedError::Answer(format!("{other:?}"))),
        }
    }

    /// A write committed at `lsn` (under `key`): max-merge it before its acknowledgement. On
    /// failure the position is kept as pending (see [`Shared::flush_pending`]).
    pub async fn publish(&self, lsn: Lsn, key: Option<&str>) -> Result<(), SharedError> {
        let r = self.publish_once(lsn, key).await;
        if r.is_err() {
            self.pending.fetch_max(lsn.0, Ordering::SeqCst);
        }
        r
    }

    async fn publish_once(&self, lsn: Lsn, key: Option<&str>) -> Result<(), SharedError> {
        self.flush_pending().await?;
        let mut conn = self.conn.clone();
        let mut inv = self.publish.prepare_invoke();
        inv.key(&self.names[0])
            .key(&self.names[1])
            .key(&self.names[2])
            .key(&self.names[3])
            .arg(hex(lsn))
            .arg(lsn.0 as f64)
            .arg(key.unwrap_or(""));
        let v: String = self.bounded("publish", inv.invoke_async(&mut conn)).await?;
        match v.as_str() {
            "ok" => Ok(()),
            "uninit" => Err(SharedError::Uninit),
            other => Err(SharedError::Answer(other.to_string())),
        }
    }

    /// Publishes positions acknowledged while Redis did not answer, raising the floor and every
    /// key (their keys are not kept: conservative, never stale).
    pub async fn flush_pending(&self) -> Result<(), SharedError> {
        let p = self.pending.load(Ordering::SeqCst);
        if p == 0 {
            return Ok(());
        }
        self.raise_all(Lsn(p), false).await?;
        // Only clear what was published: a later failure may have raised it meanwhile.
        let _ = self
            .pending
            .compare_exchange(p, 0, Ordering::SeqCst, Ordering::SeqCst);
        Ok(())
    }

    /// Initializes an empty store (new or restarted Redis) with the primary's current
    /// position, at or past every commit acknowledged so far: keys and floor lost with the
    /// old store are covered by it.
    pub async fn init(&self, primary_position: Lsn) -> Result<(), SharedError> {
        self.raise_all(primary_position, true).await
    }

    async fn raise_all(&self, lsn: Lsn, init: bool) -> Result<(), SharedError> {
        let mut conn = self.conn.clone();
        let mut inv = self.raise_all.prepare_invoke();
        inv.key(&self.names[0])
            .key(&self.names[1])
            .arg(hex(lsn))
            .arg(if init { "init" } else { "" });
        let v: String = self.bounded("raise", inv.invoke_async(&mut conn)).await?;
        match v.as_str() {
            "ok" => Ok(()),
            "uninit" => Err(SharedError::Uninit),
            other => Err(SharedError::Answer(other.to_string())),
        }
    }

    /// Drops keys every replica has replayed (`lsn <= min_replica_lsn`); returns how many.
    pub async fn prune_replayed(&self, min_replica_lsn: Lsn) -> Result<u64, SharedError> {
        let mut conn = self.conn.clone();
        let mut inv = self.prune.prepare_invoke();
        inv.key(&self.names[2])
            .key(&self.names[3])
            .arg(hex(min_replica_lsn))
            .arg(min_replica_lsn.0 as f64);
        self.bounded("prune", inv.invoke_async(&mut conn)).await
    }
}

/// Background upkeep: prunes replayed keys once a second, and while a position is pending
/// retries publishing it every 20 ms, so Redis coming back (with its data) learns this
/// instance's unpublished writes within about one retry even if no client calls.
pub async fn upkeep(app: Arc<crate::app::App>) {
    let Some(shared) = app.shared.clone() else {
        return;
    };
    let mut last_prune = tokio::time::Instant::now();
    loop {
        let pending = shared.pending.load(Ordering::SeqCst) != 0;
        tokio::time::sleep(if pending {
            Duration::from_millis(20)
        } else {
            Duration::from_millis(200)
        })
        .await;
        if shared.flush_pending().await.is_err() {
            continue;
        }
        if last_prune.elapsed() >= Duration::from_secs(1) {
            last_prune = tokio::time::Instant::now();
            let min = app.view.load().min_replica_replay_lsn();
            if let Some(min) = min {
                let _ = shared.prune_replayed(min).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_orders_like_lsns() {
        let a = Lsn(0x1_0000_0000);
        let b = Lsn(0xFFFF_FFFF);
        assert!(hex(a) > hex(b));
        assert_eq!(hex(Lsn(0x16_B374_D848)), "00000016B374D848");
        assert_eq!(unhex(&hex(Lsn(u64::MAX))), Some(Lsn(u64::MAX)));
    }
}
