//! create → 303 → show, on a pool of connections through tidemark, without stale 404s.
//!
//! ```sh
//! scripts/dev --replica-delay 500ms        # tidemark on 127.0.0.1:6432
//! DATABASE_URL=postgres://postgres@127.0.0.1:6432/postgres \
//! TOKEN_KEY=$(head -c 32 /dev/urandom | base64) \
//!   cargo run -p tidemark-tower --example projects
//! curl -i -c jar -b jar -L -d name=apollo http://127.0.0.1:3000/projects
//! ```
//!
//! `TIDEMARK_TOKENS=off` runs the same app without tokens (then the redirect sometimes 404s).

// The test uses parts of it this binary does not (the cache accessors).
#[allow(dead_code)]
mod app;

use std::time::Duration;

use sqlx::postgres::PgPoolOptions;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:6432/postgres".into());
    let key = std::env::var("TOKEN_KEY").map_err(|_| "set TOKEN_KEY (32+ random bytes)")?;
    let tokens = std::env::var("TIDEMARK_TOKENS").map_or(true, |v| v != "off");
    let listen = std::env::var("LISTEN").unwrap_or_else(|_| "127.0.0.1:3000".into());

    let pool = PgPoolOptions::new()
        .max_connections(8)
        .connect(&url)
        .await?;
    app::migrate(&pool).await?;
    let app = app::App::new(
        pool,
        app::Options {
            tokens,
            cache_ttl: Duration::from_secs(30),
        },
    );
    let router = app::router(app, key.as_bytes());
    let listener = tokio::net::TcpListener::bind(&listen).await?;
    println!(
        "listening on http://{listen} (tokens {})",
        if tokens { "on" } else { "off" }
    );
    axum::serve(listener, router).await?;
    Ok(())
}
