//! `auth_query`: users that are not in `[[users]]` are looked up on the primary (their SCRAM
//! verifier, as PgBouncer's `auth_query` does), cached, authenticated against it, and then
//! logged in to the servers by SCRAM pass-through ([`crate::passthrough`]).
//!
//! The lookup runs on one dedicated server connection (the `[auth]` user's), with the user
//! name sent as a bind parameter of the extended protocol: it is never spliced into SQL.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use parking_lot::Mutex;
use serde::Deserialize;
use tidemark_wire::backend::{data_row_values, BackendMessage};

use crate::app::App;
use crate::auth::ScramSecret;
use crate::server::{server_error, ServerConn, ServerError, ServerTarget};

/// Cached answers (positive and negative) at most; beyond it expired ones are dropped first,
/// then arbitrary ones.
pub const MAX_CACHED: usize = 10_000;

/// `[auth]`: looking up users that are not in `[[users]]`. Off unless `user` is set.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthQueryConfig {
    /// Returns (name, verifier) for the user name in `$1`.
    pub query: String,
    /// The role tidemark runs `query` as (it must be able to read `pg_shadow`/`pg_authid`, e.g.
    /// a superuser or a SECURITY DEFINER function's caller). auth_query is off when unset.
    pub user: Option<String>,
    /// Its password (plain) when the server asks for one.
    pub password: Option<String>,
    /// Read `password` from this file instead.
    pub password_file: Option<std::path::PathBuf>,
    /// Read `password` from this environment variable instead.
    pub password_env: Option<String>,
    /// The database tidemark connects to for the lookup (pg_shadow is the same in every one).
    pub database: String,
    /// How long a looked-up verifier, or the absence of the user, is remembered.
    #[serde(with = "crate::config::humantime_serde_compat")]
    pub cache_ttl: Duration,
}

impl Default for AuthQueryConfig {
    fn default() -> Self {
        AuthQueryConfig {
            query: "SELECT usename, passwd FROM pg_shadow WHERE usename = $1".into(),
            user: None,
            password: None,
            password_file: None,
            password_env: None,
            database: "postgres".into(),
            cache_ttl: Duration::from_secs(60),
        }
    }
}

impl AuthQueryConfig {
    pub fn enabled(&self) -> bool {
        self.user.is_some()
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        if self.enabled() && !self.query.contains("$1") {
            anyhow::bail!(
                "auth.query: must take the user name as $1 (e.g. \"SELECT usename, passwd FROM pg_shadow WHERE usename = $1\")"
            );
        }
        Ok(())
    }
}

/// What the lookup found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Found {
    Verifier(Arc<ScramSecret>),
    /// No such user, or no password tidemark can check (NULL, md5, plaintext): the client
    /// gets the decoy exchange and 28P01, like PostgreSQL, which logs the reason only.
    Refused(&'static str),
}

/// The lookup's cache and its server connection.
#[derive(Default)]
pub struct AuthQuery {
    cache: Mutex<HashMap<String, (Instant, Found)>>,
    conn: tokio::sync::Mutex<Option<ServerConn>>,
    /// Bumped by [`AuthQuery::clear`]: a lookup that started before does not keep its
    /// connection.
    generation: std::sync::atomic::AtomicU64,
}

impl AuthQuery {
    /// The verifier of `user`, from the cache or the primary. `Err` when the lookup itself
    /// failed (no primary, connection or query error): the message says why.
    pub async fn lookup(&self, app: &App, user: &str) -> Result<Found, String> {
        let cfg = app.config.load_full();
        let ttl = cfg.auth.cache_ttl;
        if let Some(f) = self.cached(user, ttl) {
            return Ok(f);
        }
        // One lookup at a time on the one connection; a login waiting here for the same
        // user finds the answer cached.
        let mut slot = self.conn.lock().await;
        if let Some(f) = self.cached(user, ttl) {
            return Ok(f);
        }
        let generation = self.generation.load(std::sync::atomic::Ordering::Relaxed);
        let primary = app
            .view
            .load()
            .primary_id()
            .ok_or_else(|| "no primary is known".to_string())?;
        let timeout = cfg.pool.connect_timeout;
        // Taken out while in use: a lookup abandoned halfway (login deadline) drops it.
        let conn = match slot.take() {
            Some(c) if c.node == primary && !c.broken => Some(c),
            _ => None,
        };
        let mut conn = match conn {
            Some(c) => c,
            None => {
                let n = cfg
                    .nodes
                    .get(primary)
                    .ok_or_else(|| "the primary is not configured".to_string())?;
                let target = ServerTarget {
                    node: primary,
                    host: n.host.clone(),
                    port: n.port,
                    user: cfg.auth.user.clone().unwrap_or_default(),
                    password: cfg.auth.password.clone(),
                    database: cfg.auth.database.clone(),
                    keys: None,
                    tls: app
                        .node_tls(primary)
                        .ok_or_else(|| "the primary has no TLS settings".to_string())?,
                };
                ServerConn::connect(&target, timeout)
                    .await
                    .map_err(|e| format!("as auth.user: {e}"))?
            }
        };
        let row = tokio::time::timeout(timeout, query_one(&mut conn, &cfg.auth.query, user))
            .await
            .map_err(|_| format!("auth.query did not answer within {timeout:?}"))?
            .map_err(|e| format!("auth.query: {e}"))?;
        if generation == self.generation.load(std::sync::atomic::Ordering::Relaxed) {
            *slot = Some(conn);
        }
        drop(slot);
        let found = match row {
            None => Found::Refused("not found by auth.query"),
            Some(cols) => match cols.get(1).cloned().flatten() {
                None => Found::Refused("has no password (auth.query returned NULL)"),
                Some(p) => match ScramSecret::parse(&p) {
                    Some(s) => Found::Verifier(Arc::new(s)),
                    None if p.starts_with("md5") => Found::Refused(
                        "has an md5 password, and auth_query needs a SCRAM-SHA-256 verifier (set password_encryption = 'scram-sha-256' and set the password again)",
                    ),
                    None => Found::Refused(
                        "has no SCRAM-SHA-256 verifier (auth.query's second column is not one)",
                    ),
                },
            },
        };
        self.remember(user, found.clone());
        Ok(found)
    }

    fn cached(&self, user: &str, ttl: Duration) -> Option<Found> {
        let c = self.cache.lock();
        let (at, f) = c.get(user)?;
        (at.elapsed() < ttl).then(|| f.clone())
    }

    fn remember(&self, user: &str, found: Found) {
        let mut c = self.cache.lock();
        if c.len() >= MAX_CACHED && !c.contains_key(user) {
            let now = Instant::now();
            // Whatever is older than an hour (longer than any sensible TTL) goes first.
            c.retain(|_, (at, _)| now.duration_since(*at) < Duration::from_secs(3600));
            while c.len() >= MAX_CACHED {
                let Some(k) = c.keys().next().cloned() else {
                    break;
                };
                c.remove(&k);
            }
        }
        c.insert(user.to_string(), (Instant::now(), found));
    }

    /// Forgets every cached answer and the connection (RELOAD: the query, the user or its
    /// password may have changed; a lookup running now drops its connection at its end).
    pub fn clear(&self) {
        self.cache.lock().clear();
        if let Ok(mut c) = self.conn.try_lock() {
            *c = None;
        }
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn cached_count(&self) -> usize {
        self.cache.lock().len()
    }
}

/// Runs `sql` with one text parameter through the extended protocol (Parse, Bind, Execute,
/// Sync) and returns its first row.
async fn query_one(
    conn: &mut ServerConn,
    sql: &str,
    param: &str,
) -> Result<Option<Vec<Option<String>>>, ServerError> {
    let mut buf = BytesMut::new();
    buf.extend_from_slice(tidemark_wire::frontend::parse("", sql, &[25]).raw());
    buf.extend_from_slice(&bind_one_text("", param));
    // Execute the unnamed portal, all rows; then Sync.
    buf.extend_from_slice(&[b'E', 0, 0, 0, 9, 0, 0, 0, 0, 0]);
    buf.extend_from_slice(tidemark_wire::frontend::sync().raw());
    conn.send(&buf).await?;
    let mut first = None;
    let mut err = None;
    loop {
        let f = conn.recv().await?;
        match f.backend() {
            BackendMessage::DataRow if first.is_none() => {
                first =
                    Some(data_row_values(&f).map_err(|e| ServerError::Protocol(e.to_string()))?);
            }
            BackendMessage::ErrorResponse => err = Some(server_error(&f)),
            BackendMessage::ReadyForQuery => {
                if tidemark_wire::backend::ready_status(&f) != Ok(b'I') {
                    conn.broken = true;
                }
                return match err {
                    Some(e) => Err(e),
                    None => Ok(first),
                };
            }
            _ => {}
        }
    }
}

/// A Bind of the unnamed statement to portal `portal` with one text parameter and text
/// results.
fn bind_one_text(portal: &str, value: &str) -> Vec<u8> {
    let mut body = BytesMut::new();
    body.put_slice(portal.as_bytes());
    body.put_u8(0);
    body.put_u8(0); // the unnamed statement
    body.put_i16(1);
    body.put_i16(0); // parameter format: text
    body.put_i16(1);
    body.put_i32(value.len() as i32);
    body.put_slice(value.as_bytes());
    body.put_i16(0); // result formats: all text
    let mut out = Vec::with_capacity(body.len() + 5);
    out.push(b'B');
    out.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bind_carries_the_name_as_a_parameter_untouched() {
        let b = bind_one_text("", "o'x\"; DROP TABLE t; --");
        assert_eq!(b[0], b'B');
        let len = i32::from_be_bytes([b[1], b[2], b[3], b[4]]) as usize;
        assert_eq!(len + 1, b.len());
        let v = b"o'x\"; DROP TABLE t; --";
        assert!(b.windows(v.len()).any(|w| w == v));
    }

    #[test]
    fn the_cache_is_bounded_and_expires() {
        let q = AuthQuery::default();
        for i in 0..MAX_CACHED + 50 {
            q.remember(&format!("u{i}"), Found::Refused("x"));
        }
        assert!(q.cached_count() <= MAX_CACHED);
        q.remember("a", Found::Refused("x"));
        assert!(q.cached("a", Duration::from_secs(60)).is_some());
        assert!(q.cached("a", Duration::ZERO).is_none());
    }

    /// The README's credentials example loads as it is.
    #[test]
    fn readme_credentials_example_loads() {
        let readme = include_str!("../../../README.md");
        let section = &readme[readme
            .find("### Credentials without plaintext passwords")
            .expect("the README section")..];
        let start = section.find("```toml\n").expect("its toml block") + 8;
        let len = section[start..].find("```").expect("its end");
        let c = crate::config::Config::parse(&section[start..start + len])
            .expect("the README's credentials example parses");
        assert_eq!(c.auth.user.as_deref(), Some("tidemark_auth"));
        assert_eq!(c.auth.cache_ttl, Duration::from_secs(60));
        assert!(crate::app::uses_passthrough(&c, "app"));
        assert!(crate::app::uses_passthrough(&c, "someone_else"));
        assert!(ScramSecret::parse(c.users[0].password.as_deref().unwrap_or_default()).is_some());
    }

    #[test]
    fn the_query_must_take_the_user_as_1() {
        let mut c = AuthQueryConfig {
            user: Some("a".into()),
            ..Default::default()
        };
        assert!(c.validate().is_ok());
        c.query = "SELECT 1".into();
        assert!(c.validate().unwrap_err().to_string().contains("auth.query"));
    }
}
