//! Issue 20, parts 4 and 5: tidemark-tower's example app (`crates/tidemark-tower/examples/
//! projects`) driven in-process through tidemark, with a replica delayed 200 ms and a pool of
//! several connections (each request draws its own).
//!
//! - create → 303 → show: with causality tokens, 0 stale shows over hundreds of redirects;
//!   the same app without tokens shows 404s for rows it just created.
//! - the cache in front of show: rename → invalidate → 303 → the refill (by the writer or by
//!   another user) carries the writer's position, 0 stale cache entries; without tokens the
//!   refill caches the old row, which then stays for the TTL.
//!
//! A control can only be stale when the show draws another connection than the write (on
//! the same one, tidemark's per-connection tracking covers it): its stale reads also show
//! that requests do land on different pooled connections.

mod common;

#[path = "../../tidemark-tower/examples/projects/app.rs"]
#[allow(dead_code)]
mod app;

use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, Request, Response, StatusCode};
use axum::routing::post;
use axum::Router;
use common::*;
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use tidemark_tower::{Causality, Lsn, TidemarkLayer};
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

/// `n` rounds of create → 303 → show by one user, `pause` between rounds.
async fn create_redirect_show(router: &Router, tag: &str, n: u32, pause: Duration) -> Run {
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
        tokio::time::sleep(pause).await;
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
    let (_, without) = app(pool.clone(), false, Duration::ZERO);
    // Back to back: many writes in flight on every pooled connection. Then paced: when a
    // round starts the replica has replayed all but that round's insert, as for a show drawn
    // on a connection that has not written lately. (Back to back, tidemark's per-connection
    // tracking sends the control's shows to the primary by chance more or less often,
    // depending on how the pool hands out its connections; paced, the control is stale
    // whenever the show draws another connection than the insert.)
    let paced = DELAY + Duration::from_millis(20);
    let run = create_redirect_show(&with, "tok", 300, Duration::ZERO).await;
    let run_paced = create_redirect_show(&with, "tokp", 50, paced).await;
    println!("with tokens: back to back {run:?}; paced {run_paced:?}");
    let ctl = create_redirect_show(&without, "ctl", 300, Duration::ZERO).await;
    let ctl_paced = create_redirect_show(&without, "ctlp", 50, paced).await;
    println!("control, no tokens: back to back {ctl:?}; paced {ctl_paced:?}");

    assert_eq!(
        run.stale + run_paced.stale,
        0,
        "stale shows with causality tokens"
    );
    assert!(
        ctl_paced.stale > 0,
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

    // A handler that drops its connection instead of releasing it: the response waits for
    // the connection's commit position, and the token it carries covers the insert.
    let dropper = Router::new()
        .route("/drop", post(insert_and_drop))
        .layer(TidemarkLayer::new(KEY.to_vec()))
        .with_state(pool.clone());
    let mut stale = 0;
    for _ in 0..20 {
        let mut b = Browser::default();
        let r = b.post(&dropper, "/drop", "").await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        assert!(
            r.header.is_some(),
            "a dropped connection's write returned no token"
        );
        let s = b.get(&with, &format!("/projects/{}", r.body)).await;
        stale += u32::from(s.status == StatusCode::NOT_FOUND);
    }
    assert_eq!(
        stale, 0,
        "stale shows after a handler dropped its connection"
    );
}

async fn insert_and_drop(State(pool): State<PgPool>, cx: Causality) -> String {
    let mut db = cx.acquire(&pool).await.unwrap();
    let (id,): (i64,) =
        sqlx::query_as("INSERT INTO projects (name) VALUES ('dropped') RETURNING id")
            .fetch_one(&mut *db)
            .await
            .unwrap();
    id.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_refills_carry_the_writers_token() {
    let env = start(&[Some(DELAY)], |_| {}).await;
    let pool = pool(&env).await;
    app::migrate(&pool).await.unwrap();
    let primary = env.node(0).await;
    let ttl = Duration::from_secs(600);
    let n = 60;

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
            // Paced: when the next round's refill runs, the replica has replayed everything
            // but that round's rename, as when the refilling connection is one that has not
            // written lately. (Unpaced, every pooled connection wrote within the replica's
            // delay, and tidemark's per-connection tracking hides most staleness from the
            // control by chance.)
            tokio::time::sleep(DELAY + Duration::from_millis(20)).await;
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

/// The deadpool-postgres support: a write on one pooled client, the read on the next (as
/// two requests would), with the token the first request would have returned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadpool_clients_carry_the_token() {
    let env = start(&[Some(DELAY)], |_| {}).await;
    let cfg: tokio_postgres::Config = env.proxy_dsn().parse().unwrap();
    let mgr = deadpool_postgres::Manager::new(cfg, tokio_postgres::NoTls);
    let pool = deadpool_postgres::Pool::builder(mgr)
        .max_size(POOL as usize)
        .build()
        .unwrap();
    // Open every connection (the pool hands them out first in, first out).
    let mut all = Vec::new();
    for _ in 0..POOL {
        all.push(pool.get().await.unwrap());
    }
    all[0]
        .simple_query("CREATE TABLE dp (id int PRIMARY KEY)")
        .await
        .unwrap();
    drop(all);
    tokio::task::block_in_place(|| wait_all_replayed(&env.cluster));

    let n = 150;
    let mut stale = [0u32; 2];
    for (k, tokens) in [true, false].into_iter().enumerate() {
        let mut token: Option<Lsn> = None;
        let draw = |cx: Causality| {
            let pool = pool.clone();
            async move {
                if tokens {
                    cx.acquire_client(&pool).await
                } else {
                    tidemark_tower::acquire_client(&pool, None).await
                }
                .unwrap()
            }
        };
        for i in 0..n {
            let id = (k * 1000 + i) as i32;
            let cx = Causality::new(token);
            let c = draw(cx.clone()).await;
            c.execute("INSERT INTO dp VALUES ($1)", &[&id])
                .await
                .unwrap();
            let wrote = c.release().await.unwrap();
            assert!(wrote.is_some(), "an insert reports its commit position");
            if tokens {
                token = cx.new_token().or(token);
            }
            let c = draw(Causality::new(token)).await;
            let found: i64 = c
                .query_one("SELECT count(*) FROM dp WHERE id = $1", &[&id])
                .await
                .unwrap()
                .get(0);
            stale[k] += u32::from(found == 0);
            assert_eq!(c.release().await.unwrap(), None, "a read reports no write");
        }
    }
    println!(
        "deadpool-postgres: {} stale of {n} with tokens, {} stale of {n} without",
        stale[0], stale[1]
    );
    assert_eq!(stale[0], 0, "stale reads with tokens");
    assert!(
        stale[1] > 0,
        "the control was never stale: the test cannot fail"
    );
}
