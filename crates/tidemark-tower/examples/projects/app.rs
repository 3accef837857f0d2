//! The example app as a library module (the integration test in
//! `crates/tidemark/tests/tower.rs` runs this router in-process against tidemark).
//!
//! - `POST /projects` (form `name`) inserts a project and answers 303 → `/projects/{id}`.
//! - `GET /projects/{id}` shows it (404 if the read does not find it), from a cache with a TTL
//!   in front of the database.
//! - `POST /projects/{id}/rename` (form `name`) updates it, invalidates the cache entry and
//!   answers 303 → `/projects/{id}`.
//!
//! Every request draws a connection from a pool of several. With `tokens: true` the
//! connections carry the user's causality token (`tidemark_tower::Causality`), and a cache
//! invalidation records the writer's commit position so that whichever request refills the
//! entry reads at least that far. With `tokens: false` it is the same app without them: the
//! redirect may read a replica that lacks the write (404), and a refill may cache the old
//! row for the whole TTL.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::extract::{Form, Path, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use sqlx::PgPool;
use tidemark_tower::{Causality, Lsn, TidemarkLayer, TrackedConn};

/// How the app is built.
#[derive(Clone, Debug)]
pub struct Options {
    /// Carry causality tokens (the point of the example); `false` is the control.
    pub tokens: bool,
    /// How long a cached project lives.
    pub cache_ttl: Duration,
}

/// The app's shared state.
#[derive(Clone)]
pub struct App {
    pool: PgPool,
    opts: Options,
    cache: Arc<Cache>,
}

impl App {
    pub fn new(pool: PgPool, opts: Options) -> Self {
        App {
            pool,
            opts,
            cache: Arc::new(Cache::default()),
        }
    }

    /// The show cache (tests look into it).
    pub fn cache(&self) -> &Cache {
        &self.cache
    }

    /// A connection for this request. With tokens it reads nothing older than the user's
    /// token and `floor`; without, it is a plain pooled connection (the floor an earlier
    /// user left on it is reset, so the control is not helped by accident).
    async fn conn(&self, cx: &Causality, floor: Option<Lsn>) -> sqlx::Result<TrackedConn> {
        if self.opts.tokens {
            if let Some(f) = floor {
                cx.require(f);
            }
            cx.acquire(&self.pool).await
        } else {
            tidemark_tower::acquire(&self.pool, None).await
        }
    }
}

/// Creates the table.
pub async fn migrate(pool: &PgPool) -> sqlx::Result<()> {
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS projects (id bigserial PRIMARY KEY, name text NOT NULL)",
    )
    .execute(pool)
    .await?;
    Ok(())
}

/// The router, with the token layer signing with `key`.
pub fn router(app: App, key: &[u8]) -> Router {
    Router::new()
        .route("/projects", post(create))
        .route("/projects/{id}", get(show))
        .route("/projects/{id}/rename", post(rename))
        .layer(TidemarkLayer::new(key.to_vec()))
        .with_state(app)
}

#[derive(serde::Deserialize)]
pub struct NameForm {
    pub name: String,
}

/// An error answer (500 with the database error).
pub struct AppError(sqlx::Error);

impl From<sqlx::Error> for AppError {
    fn from(e: sqlx::Error) -> Self {
        AppError(e)
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        (StatusCode::INTERNAL_SERVER_ERROR, self.0.to_string()).into_response()
    }
}

async fn create(
    State(app): State<App>,
    cx: Causality,
    Form(f): Form<NameForm>,
) -> Result<Redirect, AppError> {
    let mut db = app.conn(&cx, None).await?;
    let (id,): (i64,) = sqlx::query_as("INSERT INTO projects (name) VALUES ($1) RETURNING id")
        .bind(&f.name)
        .fetch_one(&mut *db)
        .await?;
    // Released here rather than dropped: the commit position is then known now. (Dropping
    // works too; the response waits for the position.)
    db.release().await?;
    Ok(Redirect::to(&format!("/projects/{id}")))
}

async fn rename(
    State(app): State<App>,
    cx: Causality,
    Path(id): Path<i64>,
    Form(f): Form<NameForm>,
) -> Result<Response, AppError> {
    let mut db = app.conn(&cx, None).await?;
    let done = sqlx::query("UPDATE projects SET name = $1 WHERE id = $2")
        .bind(&f.name)
        .bind(id)
        .execute(&mut *db)
        .await?;
    let lsn = db.release().await?;
    if done.rows_affected() == 0 {
        return Ok(StatusCode::NOT_FOUND.into_response());
    }
    // The invalidation remembers the write's position: whoever refills the entry (this user
    // after the redirect, or anyone else, without a token) reads at least that far.
    app.cache
        .invalidate(id, if app.opts.tokens { lsn } else { None });
    Ok(Redirect::to(&format!("/projects/{id}")).into_response())
}

async fn show(
    State(app): State<App>,
    cx: Causality,
    Path(id): Path<i64>,
) -> Result<Response, AppError> {
    let (floor, generation) = match app.cache.get(id) {
        Lookup::Hit(name) => return Ok(answer(name, "hit", false)),
        Lookup::Miss { floor, generation } => (floor, generation),
    };
    let mut db = app.conn(&cx, floor).await?;
    let (name, on_replica): (Option<String>, bool) =
        sqlx::query_as("SELECT (SELECT name FROM projects WHERE id = $1), pg_is_in_recovery()")
            .bind(id)
            .fetch_one(&mut *db)
            .await?;
    db.release().await?;
    let Some(name) = name else {
        let mut r = (StatusCode::NOT_FOUND, "no such project").into_response();
        r.headers_mut()
            .insert("x-replica", replica_header(on_replica));
        return Ok(r);
    };
    app.cache.fill(
        id,
        generation,
        name.clone(),
        Instant::now() + app.opts.cache_ttl,
    );
    Ok(answer(name, "miss", on_replica))
}

/// 200 with the name; `x-cache: hit|miss` and `x-replica: true|false` (where the read ran;
/// a 404 says it too).
fn answer(name: String, cache: &'static str, on_replica: bool) -> Response {
    let mut r = name.into_response();
    let h = r.headers_mut();
    h.insert("x-cache", HeaderValue::from_static(cache));
    h.insert("x-replica", replica_header(on_replica));
    r
}

fn replica_header(on_replica: bool) -> HeaderValue {
    HeaderValue::from_static(if on_replica { "true" } else { "false" })
}

/// A project cache with a TTL; an invalidation leaves a marker with the writer's commit
/// position, which the refill must read past.
#[derive(Default)]
pub struct Cache {
    entries: Mutex<HashMap<i64, Entry>>,
}

#[derive(Clone, Debug)]
enum Entry {
    Value {
        name: String,
        expires: Instant,
        generation: u64,
    },
    Invalidated {
        min_lsn: Option<Lsn>,
        generation: u64,
    },
}

impl Entry {
    fn generation(&self) -> u64 {
        match self {
            Entry::Value { generation, .. } | Entry::Invalidated { generation, .. } => *generation,
        }
    }
}

/// What a cache lookup found.
pub enum Lookup {
    Hit(String),
    /// Read the database at `floor` or later, then [`Cache::fill`] with `generation`.
    Miss {
        floor: Option<Lsn>,
        generation: u64,
    },
}

impl Cache {
    fn lock(&self) -> MutexGuard<'_, HashMap<i64, Entry>> {
        // A panic while holding the lock leaves a usable map (every update is one insert).
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn get(&self, id: i64) -> Lookup {
        match self.lock().get(&id) {
            Some(Entry::Value {
                name,
                expires,
                generation,
            }) => {
                if *expires > Instant::now() {
                    Lookup::Hit(name.clone())
                } else {
                    Lookup::Miss {
                        floor: None,
                        generation: *generation,
                    }
                }
            }
            Some(Entry::Invalidated {
                min_lsn,
                generation,
            }) => Lookup::Miss {
                floor: *min_lsn,
                generation: *generation,
            },
            None => Lookup::Miss {
                floor: None,
                generation: 0,
            },
        }
    }

    /// Drops the entry; a refill must read at least `min_lsn`.
    pub fn invalidate(&self, id: i64, min_lsn: Option<Lsn>) {
        let mut m = self.lock();
        let (generation, prev) = match m.get(&id) {
            Some(Entry::Invalidated {
                min_lsn,
                generation,
                ..
            }) => (*generation, *min_lsn),
            Some(e) => (e.generation(), None),
            None => (0, None),
        };
        m.insert(
            id,
            Entry::Invalidated {
                min_lsn: prev.max(min_lsn),
                generation: generation + 1,
            },
        );
    }

    /// Stores a refill, unless the entry was invalidated since the lookup that started it
    /// (that read may predate the newer write).
    pub fn fill(&self, id: i64, generation: u64, name: String, expires: Instant) {
        let mut m = self.lock();
        let current = m.get(&id).map_or(0, Entry::generation);
        if current == generation {
            m.insert(
                id,
                Entry::Value {
                    name,
                    expires,
                    generation,
                },
            );
        }
    }

    /// The cached name of `id`, if any and fresh.
    pub fn cached(&self, id: i64) -> Option<String> {
        match self.get(id) {
            Lookup::Hit(n) => Some(n),
            Lookup::Miss { .. } => None,
        }
    }
}
