//! Read-your-writes across HTTP requests for Rust web apps behind
//! [tidemark](https://github.com/) (a PostgreSQL proxy that sends a read to a replica only
//! once the replica has replayed what the reader depends on).
//!
//! The failure this fixes: a user creates a record, is redirected to it, and the redirect's
//! request draws *another* pooled connection, whose read goes to a replica that has not
//! replayed the insert yet: 404. tidemark tracks each connection's own writes, but not what
//! another connection of the same user did. A **causality token** carries it:
//!
//! 1. [`TidemarkLayer`] reads the request's token — a signed cookie (`tidemark_lsn`) or
//!    header (`x-tidemark-lsn`); anything that does not verify is ignored — and gives the
//!    handler a [`Causality`] (an axum extractor).
//! 2. [`Causality::acquire`] draws a connection from a sqlx `PgPool` and sets
//!    `tidemark.min_lsn` on it to the token (tidemark answers that itself, no round trip to
//!    PostgreSQL): every read on it sees the user's earlier writes, on a replica that has
//!    them or on the primary.
//! 3. When the handler's connections committed something (`SHOW tidemark.commit_lsn` when a
//!    [`TrackedConn`] is released or dropped), the response carries the new token in a
//!    `Set-Cookie` and in the header; the browser brings it to the redirect.
//!
//! Cost: per connection drawn, three small queries that tidemark answers itself (the `SET`
//! and a `SHOW` when drawn, a `SHOW` when released), none reaching PostgreSQL.
//!
//! A token is only an upper bound of "what this user has written": an old one costs nothing
//! (every replica has replayed it), a forged one is rejected (HMAC-SHA256 with your key).
//!
//! ```no_run
//! use axum::{extract::{Form, Path, State}, response::Redirect, routing::{get, post}, Router};
//! use sqlx::PgPool;
//! use tidemark_tower::{Causality, TidemarkLayer};
//!
//! #[derive(serde::Deserialize)]
//! struct NewNote { text: String }
//!
//! async fn create(State(pool): State<PgPool>, cx: Causality, Form(n): Form<NewNote>)
//!     -> Result<Redirect, String> {
//!     let mut db = cx.acquire(&pool).await.map_err(|e| e.to_string())?;
//!     let (id,): (i64,) = sqlx::query_as("INSERT INTO notes (text) VALUES ($1) RETURNING id")
//!         .bind(&n.text)
//!         .fetch_one(&mut *db)
//!         .await
//!         .map_err(|e| e.to_string())?;
//!     db.release().await.map_err(|e| e.to_string())?; // or just drop it
//!     Ok(Redirect::to(&format!("/notes/{id}")))   // 303, with the new token
//! }
//!
//! async fn show(State(pool): State<PgPool>, cx: Causality, Path(id): Path<i64>)
//!     -> Result<String, String> {
//!     let mut db = cx.acquire(&pool).await.map_err(|e| e.to_string())?; // carries the token
//!     let (text,): (String,) = sqlx::query_as("SELECT text FROM notes WHERE id = $1")
//!         .bind(id)
//!         .fetch_one(&mut *db)
//!         .await
//!         .map_err(|e| e.to_string())?;                   // never a stale 404
//!     Ok(text)
//! }
//!
//! # async fn run(pool: PgPool) {
//! let app: Router = Router::new()
//!     .route("/notes", post(create))
//!     .route("/notes/{id}", get(show))
//!     .layer(TidemarkLayer::new(std::env::var("TOKEN_KEY").unwrap_or_default()))
//!     .with_state(pool);
//! # let _ = app;
//! # }
//! ```
//!
//! A complete app, with the cache-invalidation pattern (a cache refill carries the writer's
//! token), is `examples/projects`. See also `docs/patterns.md` in the tidemark repository.
//!
//! Features: `axum` (the extractor) and `sqlx` (`acquire`, [`TrackedConn`]), both default;
//! `deadpool-postgres` (`Causality::acquire_client`, `TrackedClient`: the same for a
//! deadpool-postgres pool, with the `SET` and first `SHOW` pipelined in one round trip).
//! Without `sqlx`, run `SET tidemark.min_lsn = '<Causality::floor()>'` on the connections
//! yourself and pass `SHOW tidemark.commit_lsn` to [`Causality::record`].

#[cfg(feature = "deadpool-postgres")]
mod deadpool;
mod layer;
#[cfg(feature = "sqlx")]
mod sqlx;
mod token;

#[cfg(feature = "deadpool-postgres")]
pub use crate::deadpool::{acquire_client, ClientError, TrackedClient};
#[cfg(feature = "sqlx")]
pub use crate::sqlx::{acquire, TrackedConn};
pub use layer::{Causality, TidemarkLayer, TidemarkService, DEFAULT_COOKIE, DEFAULT_HEADER};
pub use tidemark_core::Lsn;
pub use token::TokenKey;
