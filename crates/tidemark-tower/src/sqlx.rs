//! sqlx: connections drawn for a request carry its token, and report what they committed.

use std::future::Future;
use std::ops::{Deref, DerefMut};
use std::pin::Pin;

use sqlx::pool::PoolConnection;
use sqlx::{Executor, PgConnection, PgPool, Postgres, Row};
use tidemark_core::Lsn;

use crate::Causality;

/// A pooled connection drawn through [`Causality::acquire`] (or [`acquire`]). Use it as a
/// `PgConnection` (`&mut *conn`).
///
/// Give it back with [`release`](Self::release) to learn what it committed; if it is just
/// dropped, a task reads the position and the response waits for it (up to
/// [`TidemarkLayer::settle_timeout`](crate::TidemarkLayer::settle_timeout)).
pub struct TrackedConn {
    conn: Option<PoolConnection<Postgres>>,
    /// `SHOW tidemark.commit_lsn` when drawn: a higher value later means this use wrote.
    before: Lsn,
    request: Option<Causality>,
}

/// Draws a connection from `pool` that reads nothing older than `min_lsn` (none: resets a
/// floor an earlier user of the pooled connection left). For work outside a request;
/// in a handler use [`Causality::acquire`].
pub async fn acquire(pool: &PgPool, min_lsn: Option<Lsn>) -> Result<TrackedConn, sqlx::Error> {
    let mut conn = pool.acquire().await?;
    // tidemark answers both itself: no round trip to PostgreSQL. (It takes its own commands
    // one per query, hence two.)
    let set = match min_lsn {
        Some(l) if !l.is_zero() => format!("SET tidemark.min_lsn = '{l}'"),
        _ => "RESET tidemark.min_lsn".to_string(),
    };
    conn.execute(set.as_str()).await?;
    let before = commit_lsn(&mut conn).await?;
    Ok(TrackedConn {
        conn: Some(conn),
        before,
        request: None,
    })
}

/// `SHOW tidemark.commit_lsn`: the last commit position of this tidemark session.
///
/// Boxed: a future borrowing the connection through sqlx's `Executor` must be made `Send`
/// here, at a concrete lifetime, to be spawned from `Drop`.
fn commit_lsn(conn: &mut PgConnection) -> BoxFuture<'_, Result<Lsn, sqlx::Error>> {
    Box::pin(async move {
        // A `&str` without arguments goes as a simple query.
        let row = conn.fetch_one("SHOW tidemark.commit_lsn").await?;
        let text: String = row.try_get(0)?;
        text.parse::<Lsn>().map_err(|e| {
            sqlx::Error::Protocol(format!(
                "SHOW tidemark.commit_lsn: {e} (is this connection going through tidemark?)"
            ))
        })
    })
}

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

impl Causality {
    /// Draws a connection from `pool` that reads nothing older than this request's
    /// [`floor`](Self::floor) (its token, and what it required or committed so far); what
    /// the connection commits goes into the response's token.
    pub async fn acquire(&self, pool: &PgPool) -> Result<TrackedConn, sqlx::Error> {
        let mut c = acquire(pool, self.floor()).await?;
        c.request = Some(self.clone());
        Ok(c)
    }
}

impl TrackedConn {
    /// Gives the connection back to the pool; returns its commit position if this use
    /// wrote (and records it in the request, which then returns it as the new token).
    pub async fn release(mut self) -> Result<Option<Lsn>, sqlx::Error> {
        let Some(mut conn) = self.conn.take() else {
            return Ok(None);
        };
        let after = commit_lsn(&mut conn).await?;
        Ok(match &self.request {
            Some(r) => r.report(self.before, after),
            None => (after > self.before).then_some(after),
        })
    }
}

impl Drop for TrackedConn {
    fn drop(&mut self) {
        let Some(mut conn) = self.conn.take() else {
            return;
        };
        let Some(request) = self.request.take() else {
            return;
        };
        request.report_later(self.before, async move { commit_lsn(&mut conn).await.ok() });
    }
}

impl Deref for TrackedConn {
    type Target = PgConnection;

    fn deref(&self) -> &PgConnection {
        match &self.conn {
            Some(c) => c,
            // `conn` is only taken by `release` (which consumes self) and `drop`.
            None => unreachable!("TrackedConn used after release"),
        }
    }
}

impl DerefMut for TrackedConn {
    fn deref_mut(&mut self) -> &mut PgConnection {
        match &mut self.conn {
            Some(c) => c,
            None => unreachable!("TrackedConn used after release"),
        }
    }
}
