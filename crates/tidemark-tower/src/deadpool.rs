//! deadpool-postgres: connections drawn for a request carry its token, and report what they
//! committed (the same as the sqlx support, for a tokio-postgres pool).

use std::ops::{Deref, DerefMut};

use deadpool_postgres::{Object, Pool, PoolError};
use tidemark_core::Lsn;
use tokio_postgres::{Client, SimpleQueryMessage};

use crate::Causality;

/// What drawing or releasing a [`TrackedClient`] can fail with.
#[derive(Debug)]
pub enum ClientError {
    /// The pool gave no connection.
    Pool(PoolError),
    /// A query failed.
    Query(tokio_postgres::Error),
    /// `SHOW tidemark.commit_lsn` did not answer an LSN: the pool does not go through tidemark.
    NotTidemark(String),
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientError::Pool(e) => write!(f, "pool: {e}"),
            ClientError::Query(e) => write!(f, "{e}"),
            ClientError::NotTidemark(what) => write!(
                f,
                "SHOW tidemark.commit_lsn answered {what}: is this pool going through tidemark?"
            ),
        }
    }
}

impl std::error::Error for ClientError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ClientError::Pool(e) => Some(e),
            ClientError::Query(e) => Some(e),
            ClientError::NotTidemark(_) => None,
        }
    }
}

impl From<tokio_postgres::Error> for ClientError {
    fn from(e: tokio_postgres::Error) -> Self {
        ClientError::Query(e)
    }
}

/// A pooled client drawn through [`Causality::acquire_client`] (or [`acquire_client`]);
/// derefs to deadpool's [`Object`] (and so to `tokio_postgres::Client`).
///
/// Give it back with [`release`](Self::release) to learn what it committed; if it is just
/// dropped, a task reads the position and the response waits for it.
pub struct TrackedClient {
    client: Option<Object>,
    before: Lsn,
    request: Option<Causality>,
}

/// Draws a client from `pool` that reads nothing older than `min_lsn` (none: resets a floor
/// an earlier user left). For work outside a request; in a handler use
/// [`Causality::acquire_client`].
pub async fn acquire_client(
    pool: &Pool,
    min_lsn: Option<Lsn>,
) -> Result<TrackedClient, ClientError> {
    let client = pool.get().await.map_err(ClientError::Pool)?;
    let set = match min_lsn {
        Some(l) if !l.is_zero() => format!("SET tidemark.min_lsn = '{l}'"),
        _ => "RESET tidemark.min_lsn".to_string(),
    };
    // Pipelined: tokio-postgres sends both before reading either answer, and tidemark
    // answers both itself — one round trip, none to PostgreSQL.
    let (_, before) = tokio::try_join!(
        async { client.simple_query(&set).await.map_err(ClientError::from) },
        commit_lsn(&client)
    )?;
    Ok(TrackedClient {
        client: Some(client),
        before,
        request: None,
    })
}

/// `SHOW tidemark.commit_lsn`: the last commit position of this tidemark session.
async fn commit_lsn(client: &Client) -> Result<Lsn, ClientError> {
    let msgs = client.simple_query("SHOW tidemark.commit_lsn").await?;
    let text = msgs.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(r) => r.get(0),
        _ => None,
    });
    let text = text.ok_or_else(|| ClientError::NotTidemark("no row".into()))?;
    text.parse::<Lsn>()
        .map_err(|_| ClientError::NotTidemark(format!("{text:?}")))
}

impl Causality {
    /// Draws a client from a deadpool-postgres `pool` that reads nothing older than this
    /// request's [`floor`](Self::floor); what it commits goes into the response's token.
    pub async fn acquire_client(&self, pool: &Pool) -> Result<TrackedClient, ClientError> {
        let mut c = acquire_client(pool, self.floor()).await?;
        c.request = Some(self.clone());
        Ok(c)
    }
}

impl TrackedClient {
    /// Gives the client back to the pool; returns its commit position if this use wrote
    /// (and records it in the request, which then returns it as the new token).
    pub async fn release(mut self) -> Result<Option<Lsn>, ClientError> {
        let Some(client) = self.client.take() else {
            return Ok(None);
        };
        let after = commit_lsn(&client).await?;
        Ok(match &self.request {
            Some(r) => r.report(self.before, after),
            None => (after > self.before).then_some(after),
        })
    }
}

impl Drop for TrackedClient {
    fn drop(&mut self) {
        let Some(client) = self.client.take() else {
            return;
        };
        let Some(request) = self.request.take() else {
            return;
        };
        request.report_later(self.before, async move { commit_lsn(&client).await.ok() });
    }
}

impl Deref for TrackedClient {
    type Target = Object;

    fn deref(&self) -> &Object {
        match &self.client {
            Some(c) => c,
            // `client` is only taken by `release` (which consumes self) and `drop`.
            None => unreachable!("TrackedClient used after release"),
        }
    }
}

impl DerefMut for TrackedClient {
    fn deref_mut(&mut self) -> &mut Object {
        match &mut self.client {
            Some(c) => c,
            None => unreachable!("TrackedClient used after release"),
        }
    }
}
