//! Issue 20, parts 4 and 5: tidemark-tower's example app (`crates/tidemark-tower/examples/
//! projects`) driven in-process through tidemark, with a replica delayed 200 ms and a pool of
//! several connections (each request draws its own).
//!
//! - create → 303 → show: with causality tokens, 0 stale shows over hundreds of redirects;
//!   the same app without tokens shows 404s for rows it just created.
//! - the cache in front of show: rename → invalidate → 303 → the refill (by the writer or by
//!   another user) carries the writer's position, 0 stale cache entries; without tokens the
//!   refill caches the old row, which then stays for the TTL.

mod common;

#[path = "../../tidemark-tower/examples/projects/app.rs"]
#[allow(dead_code)]
mod app;

use std::time::Duration;

use axum::body::Body;
use axum::http::{header, Request, Response, StatusCode};
use axum::Router;
use common::*;
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use tower::ServiceExt;

const DELAY: Duration = Duration::from_millis(200);
const KEY: &[u8] = b"tidemark-tower test key, 32+ bytes long";
/// Connections in the app's pool: consecutive requests draw different ones.
const POOL: u32 = 4;

async fn pool(env: &Env) -> PgPool {
    let url = format!(
        "postgres://postgres@{}:{}/postgres",
        env.proxy.addr.ip(),
        env.proxy.addr.port()
    );
    PgPoolOptions::new()
        .max_connections(POOL)
        .min_connections(POOL)
        .connect(&url)
        .await
        .unwrap()
}

/// A user agent: keeps the `tidemark_lsn` cookie it is given, as a browser would.
#[derive(Default)]
struct Browser {
    cookie: Option<String>,
}

struct Answer {
    status: StatusCode,
    location: Option<String>,
    body: String,
    header: Option<String>,
    x_cache: Option<String>,
    on_replica: bool,
}

impl Browser {
    async fn send(&mut self, router: &Router, mut req: Request<Body>) -> Answer {
        if let Some(c) = &self.cookie {
            req.headers_mut().insert(header::COOKIE, c.parse().unwrap());
        }
        let res: Response<Body> = router.clone().oneshot(req).await.unwrap();
        for v in res.headers().get_all(header::SET_COOKIE) {
            let pair = v.to_str().unwrap().split(';').next().unwrap().to_string();
            assert!(pair.starts_with("tidemark_lsn="), "{pair}");
            self.cookie = Some(pair);
        }
        let h = |n: &str| {
            res.headers()
                .get(n)
                .map(|v| v.to_str().unwrap().to_string())
        };
        let (status, location, header, x_cache) = (
            res.status(),
            h("location"),
            h("x-tidemark-lsn"),
            h("x-cache"),
        );
        let on_replica = h("x-replica").as_deref() == Some("true");
        let body = axum::body::to_bytes(res.into_body(), usize::MAX)
            .await
            .unwrap();
        Answer {
            status,
            location,
            body: String::from_utf8(body.to_vec()).unwrap(),
            header,
            x_cache,
            on_replica,
        }
    }

    async fn post(&mut self, router: &Router, path: &str, form: &str) -> Answer {
        let req = Request::post(path)
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(Body::from(form.to_string()))
            .unwrap();
        self.send(router, req).await
    }

    async fn get(&mut self, router: &Router, path: &str) -> Answer {
        self.send(router, Request::get(path).body(Body::empty()).unwrap())
            .await
    }
}

/// Counts of one run of create → redirect → show.
#[derive(Debug, Default)]
struct Run {
    shows: u32,
    stale: u32,
    on_replica: u32,
}

async fn create_redirect_show(router: &Router, tag: &str, n: u32) -> Run {
    let mut run = Run::default();
    let mut b = Browser::default();
    for i in 0..n {
        let name = format!("{tag}-{i}");
        let posted = b.post(router, "/projects", &format!("name={name}")).await;
        assert_eq!(posted.status, StatusCode::SEE_OTHER, "{}", posted.body);
        let show = b.get(router, &posted.location.unwrap()).await;
        run.shows += 1;
        match show.status {
            StatusCode::OK => assert_eq!(show.body, name),
            StatusCode::NOT_FOUND => run.stale += 1,
            s => panic!("show answered {s}: {}", show.body),
        }
        if show.on_replica {
            run.on_replica += 1;
        }
    }
    run
}

fn app(pool: PgPool, tokens: bool, cache_ttl: Duration) -> (app::App, Router) {
    let a = app::App::new(pool, app::Options { tokens, cache_ttl });
    let r = app::router(a.clone(), KEY);
    (a, r)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_redirect_show_is_never_stale_with_tokens() {
    let env = start(&[Some(DELAY)], |_| {}).await;
    let pool = pool(&env).await;
    app::migrate(&pool).await.unwrap();
    tokio::task::block_in_place(|| wait_all_replayed(&env.cluster));

    // No cache here (TTL 0): every show reads the database.
    let (_, with) = app(pool.clone(), true, Duration::ZERO);
    let n = 300;
    let run = create_redirect_show(&with, "tok", n).await;
    println!("with tokens: {run:?}");

    let (_, without) = app(pool.clone(), false, Duration::ZERO);
    let ctl = create_redirect_show(&without, "ctl", n).await;
    println!("control, no tokens: {ctl:?}");

    assert_eq!(run.stale, 0, "stale shows with causality tokens");
    assert!(
        ctl.stale > 0,
        "the control never read a stale replica: the test cannot tell tokens from luck"
    );

    // A token does not send reads to the primary for ever: once the replica has replayed
    // it, the same user's shows are served by the replica.
    let mut b = Browser::default();
    let posted = b.post(&with, "/projects", "name=later").await;
    let to = posted.location.unwrap();
    assert!(b.cookie.is_some(), "a write returns a token cookie");
    assert!(posted.header.is_some(), "a write returns the token header");
    tokio::time::sleep(DELAY * 3).await;
    tokio::task::block_in_place(|| wait_all_replayed(&env.cluster));
    let mut on_replica = 0;
    for _ in 0..10 {
        let s = b.get(&with, &to).await;
        assert_eq!((s.status, s.body.as_str()), (StatusCode::OK, "later"));
        assert!(s.header.is_none(), "a read returns no new token");
        on_replica += u32::from(s.on_replica);
    }
    println!("shows after the replica caught up: {on_replica}/10 on the replica");
    assert!(
        on_replica > 0,
        "an old token kept every read on the primary"
    );

    // A forged token is ignored (no error, no effect): the show still works.
    let mut forger = Browser {
        cookie: Some("tidemark_lsn=FFFFFFFF/FFFFFFFF.AAAA".into()),
    };
    let s = forger.get(&with, &to).await;
    assert_eq!(s.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_refills_carry_the_writers_token() {
    let env = start(&[Some(DELAY)], |_| {}).await;
    let pool = pool(&env).await;
    app::migrate(&pool).await.unwrap();
    let primary = env.node(0).await;
    let ttl = Duration::from_secs(600);
    let n = 100;

    let mut results = Vec::new();
    for tokens in [true, false] {
        let (a, router) = app(pool.clone(), tokens, ttl);
        // Projects exist and are cached before the renames (everything replayed).
        let mut writer = Browser::default();
        let mut ids = Vec::new();
        for i in 0..n {
            let r = writer
                .post(&router, "/projects", &format!("name=v0-{i}"))
                .await;
            ids.push(r.location.unwrap());
        }
        tokio::time::sleep(DELAY * 2).await;
        tokio::task::block_in_place(|| wait_all_replayed(&env.cluster));
        for path in &ids {
            let s = Browser::default().get(&router, path).await;
            assert_eq!(s.status, StatusCode::OK);
            assert_eq!(s.x_cache.as_deref(), Some("miss"));
        }

        // rename → invalidate → 303 → refill. Even rounds the writer follows the redirect
        // (with its cookie), odd rounds another user without a token refills the entry
        // first: only the invalidation's recorded position can protect that refill.
        for (i, path) in ids.iter().enumerate() {
            let renamed = writer
                .post(&router, &format!("{path}/rename"), &format!("name=v1-{i}"))
                .await;
            assert_eq!(renamed.status, StatusCode::SEE_OTHER, "{}", renamed.body);
            let to = renamed.location.unwrap();
            let s = if i % 2 == 0 {
                writer.get(&router, &to).await
            } else {
                Browser::default().get(&router, &to).await
            };
            assert_eq!(s.status, StatusCode::OK);
            assert_eq!(
                s.x_cache.as_deref(),
                Some("miss"),
                "the rename invalidated it"
            );
        }

        // Long after the replica caught up, what the cache still serves.
        tokio::time::sleep(DELAY * 2).await;
        tokio::task::block_in_place(|| wait_all_replayed(&env.cluster));
        let mut stale = 0;
        let mut served_stale = 0;
        for (i, path) in ids.iter().enumerate() {
            let id: i64 = path.rsplit('/').next().unwrap().parse().unwrap();
            let truth = scalar(
                &primary,
                &format!("SELECT name FROM projects WHERE id = {id}"),
            )
            .await;
            assert_eq!(truth, format!("v1-{i}"));
            let cached = a.cache().cached(id);
            if cached.as_deref() != Some(truth.as_str()) {
                stale += 1;
            }
            let s = Browser::default().get(&router, path).await;
            if s.body != truth {
                assert_eq!(s.x_cache.as_deref(), Some("hit"));
                served_stale += 1;
            }
        }
        println!(
            "tokens {tokens}: {stale} stale cache entries of {n}; {served_stale} shows still serve the old name after the replica caught up"
        );
        results.push((tokens, stale, served_stale));
    }
    assert_eq!(results[0].1, 0, "stale cache entries with tokens");
    assert_eq!(results[0].2, 0, "stale shows with tokens");
    assert!(
        results[1].1 > 0 && results[1].2 > 0,
        "the control cached no stale row: the test cannot tell tokens from luck"
    );
}
