//! `tidemark-bench`: the benchmarks behind docs/benchmarks.md. Each subcommand starts its own
//! local primary + 2 replicas (tidemark-cluster) and whatever proxies it compares, and stops
//! all of them when it ends, also on error or Ctrl-C.
//!
//! - `ryw` ([`ryw`]): stale reads and replica offload of read-after-write traffic, per routing
//!   mode and lag profile.
//! - `pgbench` ([`pgbench`]): throughput and latency vs direct, PgBouncer and Pgpool-II, and
//!   memory per idle client.
//!
//! Shared pieces: [`procs`] (the processes we start) and [`report`] (tables, files, chart).

mod pgbench;
mod pipe;
mod procs;
mod report;
mod ryw;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "tidemark-bench",
    about = "Benchmarks: stale reads and replica offload (ryw), throughput and latency vs direct and peer proxies (pgbench)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Read-after-write workload: stale reads and replica share per mode and lag profile.
    Ryw(ryw::RywArgs),
    /// pgbench through tidemark, PgBouncer and Pgpool-II vs direct; memory per idle client.
    Pgbench(pgbench::PgbenchArgs),
    /// A byte pipe to one server, one connection per client (the `pipe` target of
    /// `pgbench`: what any proxy process costs on this machine).
    #[command(hide = true)]
    Pipe(pipe::PipeArgs),
}

/// Durations written as `200ms`, `2s`, `1m`; a bare `0` is zero.
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    if s.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(s.trim()).map_err(|e| format!("{e} (write e.g. 200ms, 2s, 1m)"))
}

/// The whole text of a tokio-postgres error, on one line. Its `Display` alone says only
/// "db error" for a server error; this gives severity, SQLSTATE, message, detail, hint and
/// context, and for other errors the chain of causes (e.g. the I/O error behind "error
/// communicating with the server").
pub(crate) fn pg_error(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let mut s = format!("{} {}: {}", db.severity(), db.code().code(), db.message());
        if let Some(d) = db.detail() {
            s.push_str(&format!("; DETAIL: {d}"));
        }
        if let Some(h) = db.hint() {
            s.push_str(&format!("; HINT: {h}"));
        }
        if let Some(w) = db.where_() {
            s.push_str(&format!("; CONTEXT: {w}"));
        }
        return s.replace('\n', " ");
    }
    let mut s = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        s.push_str(&format!(": {c}"));
        cause = c.source();
    }
    s
}

/// A path inside the workspace this binary was built from (falls back to the current
/// directory when the sources are not there).
pub(crate) fn workspace_path(rel: &str) -> PathBuf {
    let ws = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    if ws.join("Cargo.toml").is_file() {
        ws.join(rel)
    } else {
        PathBuf::from(rel)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let cli = match cli.cmd {
        Cmd::Pipe(a) => {
            return match pipe::run(a) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("tidemark-bench pipe: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        cmd => Cli { cmd },
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tidemark-bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let r = rt.block_on(async move {
        let work = async move {
            match cli.cmd {
                Cmd::Ryw(a) => ryw::run(a).await,
                Cmd::Pgbench(a) => pgbench::run(a).await,
                Cmd::Pipe(_) => Err(anyhow::anyhow!("pipe runs without the benchmark runtime")),
            }
        };
        // On Ctrl-C the benchmark future is dropped, which stops every process it started.
        tokio::select! {
            r = work => r,
            _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
        }
    });
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tidemark-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
