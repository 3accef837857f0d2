//! Owns `tidemark-bench ryw`: the read-after-write workload. Simulated users each write their
//! own row, read it back at once, then read feed rows with a think time in between (every page
//! also shows the user's own row). Every mode (where reads go) runs under every lag profile
//! (made real on the replicas with `recovery_min_apply_delay` or paused replay) against one
//! cluster; a read is stale exactly when the version of the user's own row it returns is lower
//! than the version that user last wrote.
//!
//! The think time matters for the time-pin modes: a user who writes more often than the pin
//! lasts never reads a replica at all. With the defaults a user writes about every 3 s.
//!
//! Parts: `cell` (one mode × profile cell: its proxy, users, their connections and loop) and
//! `results` (the table, files and chart).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Serialize;
use tidemark_cluster::{Cluster, ClusterConfig};

use crate::{parse_duration, procs};

mod cell;
mod results;

use cell::run_cell;
use results::{report_results, result_table, table_row};

#[derive(Args, Debug)]
pub struct RywArgs {
    /// Measured time per mode × profile cell.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Concurrent simulated users.
    #[arg(long, default_value_t = 16)]
    pub users: usize,
    /// Feed reads (another row plus the user's own) after each read-back of the user's own row.
    #[arg(long, default_value_t = 12)]
    pub feed_reads: usize,
    /// Pause before each feed read (0 = a closed loop: as fast as the target serves).
    #[arg(long, default_value = "250ms", value_parser = parse_duration)]
    pub think: Duration,
    /// Lag profiles: apply delays (0, 10ms, 1s, ...) and/or `paused` (replay paused on both
    /// replicas for the middle 60 % of the cell).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "0,10ms,100ms,1s,3s,paused"
    )]
    pub profiles: Vec<String>,
    /// Modes: primary, naive, pin-<duration> (e.g. pin-2s), tidemark (`session` consistency,
    /// one connection and a key per user), tidemark-causal (`causal`, no key, each user's
    /// reads on a second connection: an application's pool), pgbouncer (everything through
    /// PgBouncer to the primary: the cost of a forwarding hop), naive-pgbouncer (naive
    /// splitting behind PgBouncer, one pool per node: what `naive` costs with a pooler in
    /// between, as it is deployed), pgpool-<setting>.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "primary,naive,pin-2s,pin-5s,tidemark,tidemark-causal"
    )]
    pub modes: Vec<String>,
    /// tidemark's routing.max_wait (how long a read waits for a replica before the primary).
    #[arg(long, default_value = "20ms")]
    pub max_wait: String,
    /// tidemark's routing.wait: `adaptive` (wait only while a replica beats the primary) or
    /// `fixed` (up to max_wait).
    #[arg(long, default_value = "adaptive", value_parser = ["adaptive", "fixed"])]
    pub wait: String,
    /// ORM-style requests: every read is `BEGIN; SELECT …; COMMIT` and every write
    /// `BEGIN; SELECT own row; UPDATE; COMMIT` (load, modify, save), as psycopg's default
    /// connections, SQLAlchemy's Session and Django's ATOMIC_REQUESTS send them.
    #[arg(long)]
    pub orm: bool,
    /// tidemark's routing.transactions: `read_only` (plain transactions on the primary),
    /// `optimistic` (on a replica until their first write) or `primary`.
    #[arg(long, default_value = "read_only", value_parser = ["read_only", "optimistic", "primary"])]
    pub transactions: String,
    /// Directory for ryw.csv, ryw.json and ryw.md.
    #[arg(long, default_value = "target/bench")]
    pub out: PathBuf,
    /// Where to write the SVG chart (default: docs/bench-ryw.svg in the workspace).
    #[arg(long)]
    pub svg: Option<PathBuf>,
    /// Short run: 4 s cells, profiles 0,100ms,3s,paused.
    #[arg(long)]
    pub quick: bool,
    /// The tidemark binary (default: next to this one, rebuilt with cargo first).
    #[arg(long)]
    pub tidemark_bin: Option<PathBuf>,
    /// Don't run `cargo build -p tidemark` before starting.
    #[arg(long)]
    pub no_build: bool,
    /// Send every statement unnamed (one Parse/Bind/Execute per statement) instead of as a named
    /// prepared statement. Pgpool-II modes always run unnamed (see `Statements::for_mode`).
    #[arg(long)]
    pub unnamed: bool,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Primary,
    Naive,
    Pin(Duration),
    Tidemark,
    /// Through tidemark at `causal` consistency, without a key: each user writes on one
    /// connection and reads on another, as through an application's connection pool.
    TidemarkCausal,
    /// Everything through PgBouncer (transaction pooling) to the primary: what one proxy hop
    /// that only forwards costs in the loop (no routing, no replica), beside `primary`.
    Pgbouncer,
    /// `naive` behind PgBouncer (transaction pooling, one database entry per node): writes to
    /// the primary's pool, reads round-robin over the replicas' pools. The same proxy hop as
    /// tidemark's, without read-your-writes: the like-for-like ceiling of the closed loop.
    NaivePgbouncer,
    /// Through Pgpool-II (streaming replication, load balancing) with this
    /// `disable_load_balance_on_write` setting.
    Pgpool(&'static str),
}

impl Mode {
    fn is_tidemark(self) -> bool {
        matches!(self, Mode::Tidemark | Mode::TidemarkCausal)
    }
}

fn parse_mode(s: &str) -> Result<Mode> {
    Ok(match s {
        "primary" => Mode::Primary,
        "naive" => Mode::Naive,
        "tidemark" => Mode::Tidemark,
        "tidemark-causal" => Mode::TidemarkCausal,
        "pgbouncer" => Mode::Pgbouncer,
        "naive-pgbouncer" => Mode::NaivePgbouncer,
        "pgpool-transaction" => Mode::Pgpool("transaction"),
        "pgpool-always" => Mode::Pgpool("always"),
        "pgpool-dml_adaptive" => Mode::Pgpool("dml_adaptive"),
        "pgpool-off" => Mode::Pgpool("off"),
        _ => match s.strip_prefix("pin-") {
            Some(d) => {
                Mode::Pin(parse_duration(d).map_err(|e| anyhow::anyhow!("--modes {s}: {e}"))?)
            }
            None => bail!(
                "--modes: unknown mode '{s}' (primary, naive, pin-2s, pin-5s, tidemark, tidemark-causal, \
                 pgbouncer, naive-pgbouncer, pgpool-transaction, pgpool-always, pgpool-dml_adaptive, pgpool-off)"
            ),
        },
    })
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Profile {
    Delay(Duration),
    Paused,
}

fn parse_profile(s: &str) -> Result<Profile> {
    if s == "paused" {
        return Ok(Profile::Paused);
    }
    parse_duration(s)
        .map(Profile::Delay)
        .map_err(|e| anyhow::anyhow!("--profiles {s}: {e} (or `paused`)"))
}

fn profile_name(p: Profile) -> String {
    match p {
        Profile::Delay(d) if d.is_zero() => "lag 0".into(),
        Profile::Delay(d) => format!("lag {}", humantime::format_duration(d)),
        Profile::Paused => "paused".into(),
    }
}

/// Rows in the table: one per user plus the feed.
const FEED_ROWS: i32 = 1000;

#[derive(Serialize, Clone, Debug)]
pub struct CellResult {
    pub profile: String,
    pub mode: String,
    /// `prepared` (named statements) or `unnamed`.
    pub statements: &'static str,
    pub seconds: f64,
    pub users: usize,
    pub writes: u64,
    pub reads: u64,
    /// Reads that returned an older version of the user's own row than the user last wrote.
    pub stale: u64,
    /// `stale` as a share of all reads.
    pub stale_pct: f64,
    /// Read-backs of the user's own row right after writing it...
    pub read_backs: u64,
    /// ...and how many of them were stale.
    pub stale_read_backs: u64,
    pub replica_reads: u64,
    pub replica_pct: f64,
    pub read_p50_us: u32,
    pub read_p99_us: u32,
    pub reads_per_s: f64,
    pub writes_per_s: f64,
    pub errors: u64,
    pub first_error: Option<String>,
}

struct Ctx {
    cluster: Arc<Cluster>,
    tidemark_bin: Option<PathBuf>,
    scratch: tempfile::TempDir,
    max_wait: String,
    wait: String,
    transactions: String,
}

/// Sets the apply delay on every replica and waits until they have replayed everything the
/// primary has written so far.
async fn settle(cluster: &Arc<Cluster>, delay: Duration) -> Result<()> {
    let c = Arc::clone(cluster);
    tokio::task::spawn_blocking(move || -> Result<()> {
        for r in 1..c.node_count() {
            c.set_apply_delay(r, delay)?;
        }
        let lsn = c.current_lsn(0)?;
        for r in 1..c.node_count() {
            c.wait_replayed(r, &lsn, delay + Duration::from_secs(30))?;
        }
        Ok(())
    })
    .await?
}

pub async fn run(mut args: RywArgs) -> Result<()> {
    if args.quick {
        args.duration = Duration::from_secs(4);
        if args.profiles == ["0", "10ms", "100ms", "1s", "3s", "paused"] {
            args.profiles = vec!["0".into(), "100ms".into(), "3s".into(), "paused".into()];
        }
    }
    let modes: Vec<(Mode, String)> = args
        .modes
        .iter()
        .map(|m| parse_mode(m).map(|p| (p, m.clone())))
        .collect::<Result<_>>()?;
    let profiles: Vec<Profile> = args
        .profiles
        .iter()
        .map(|p| parse_profile(p))
        .collect::<Result<_>>()?;
    if args.users == 0 {
        bail!("--users must be at least 1");
    }
    let started = Instant::now();
    let tidemark_bin = if modes.iter().any(|m| m.0.is_tidemark()) {
        Some(procs::tidemark_binary(
            args.tidemark_bin.as_deref(),
            !args.no_build,
        )?)
    } else {
        None
    };
    let cells = modes.len() * profiles.len();
    eprintln!(
        "ryw: {} users, {} feed reads per write, think {}, {} cells of {} (about {} s in all)",
        args.users,
        args.feed_reads,
        humantime::format_duration(args.think),
        cells,
        humantime::format_duration(args.duration),
        cells as u64 * (args.duration.as_secs() + 2) + 10
    );
    eprintln!("starting a primary and 2 replicas...");
    let cluster = tokio::task::spawn_blocking(|| {
        let mut cfg = ClusterConfig::with_replicas(2);
        cfg.extra_conf.push("max_connections = 300".into());
        Cluster::start(cfg)
    })
    .await??;
    let cluster = Arc::new(cluster);
    let result = run_all(&args, &modes, &profiles, Arc::clone(&cluster), tidemark_bin).await;
    // Tear the cluster down whatever happened.
    tokio::task::spawn_blocking(move || drop(cluster)).await?;
    let results = result?;
    report_results(&args, &modes, &profiles, &results)?;
    eprintln!("ryw finished in {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}

async fn run_all(
    args: &RywArgs,
    modes: &[(Mode, String)],
    profiles: &[Profile],
    cluster: Arc<Cluster>,
    tidemark_bin: Option<PathBuf>,
) -> Result<Vec<CellResult>> {
    {
        let c = Arc::clone(&cluster);
        let rows = FEED_ROWS.max(args.users as i32);
        tokio::task::spawn_blocking(move || -> Result<()> {
            c.psql(
                0,
                &format!(
                    "CREATE TABLE ryw (id int PRIMARY KEY, version bigint NOT NULL DEFAULT 0, \
                     body text NOT NULL DEFAULT repeat('x', 100)); \
                     INSERT INTO ryw (id) SELECT g FROM generate_series(1, {rows}) g"
                ),
            )?;
            c.psql(0, "VACUUM ANALYZE ryw")?;
            Ok(())
        })
        .await??;
    }
    let ctx = Ctx {
        cluster,
        tidemark_bin,
        scratch: procs::scratch_dir("tidemark-bench-ryw", None)?,
        max_wait: args.max_wait.clone(),
        wait: args.wait.clone(),
        transactions: args.transactions.clone(),
    };
    let mut results = Vec::new();
    let mut table = result_table();
    println!();
    for &profile in profiles {
        let delay = match profile {
            Profile::Delay(d) => d,
            Profile::Paused => Duration::ZERO,
        };
        for (mode, name) in modes {
            settle(&ctx.cluster, delay).await?;
            let r = run_cell(&ctx, args, *mode, name, profile, args.duration)
                .await
                .with_context(|| format!("cell {} / {name}", profile_name(profile)))?;
            let row = table_row(&r);
            println!(
                "{:<8} {:<9} stale {:>6} ({:>6}%, read-backs {:>9})  replicas {:>6}%  p50 {:>7} ms  p99 {:>7} ms  {:>7} reads/s{}",
                row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7], row[8],
                if r.errors > 0 {
                    format!("  errors {} ({})", r.errors, r.first_error.as_deref().unwrap_or(""))
                } else {
                    String::new()
                }
            );
            table.push(row);
            results.push(r);
        }
    }
    // Leave the cluster undelayed and replaying.
    let _ = settle(&ctx.cluster, Duration::ZERO).await;
    Ok(results)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_and_profiles_parse() {
        assert_eq!(
            parse_mode("pin-2s").unwrap(),
            Mode::Pin(Duration::from_secs(2))
        );
        assert_eq!(parse_mode("tidemark").unwrap(), Mode::Tidemark);
        assert_eq!(parse_mode("tidemark-causal").unwrap(), Mode::TidemarkCausal);
        assert_eq!(parse_mode("naive-pgbouncer").unwrap(), Mode::NaivePgbouncer);
        assert!(parse_mode("fast").is_err());
        assert_eq!(parse_profile("0").unwrap(), Profile::Delay(Duration::ZERO));
        assert_eq!(parse_profile("paused").unwrap(), Profile::Paused);
        assert_eq!(
            profile_name(Profile::Delay(Duration::from_millis(10))),
            "lag 10ms"
        );
        assert_eq!(profile_name(Profile::Delay(Duration::ZERO)), "lag 0");
    }
}
