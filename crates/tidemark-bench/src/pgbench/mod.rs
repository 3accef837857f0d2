//! Owns `tidemark-bench pgbench`: throughput and latency of `pgbench` against the primary
//! directly, through tidemark (session, eventual, write tracking off), PgBouncer and Pgpool-II,
//! interleaved over repetitions in one run on one cluster, reported as medians and ratios to
//! direct; plus the memory each proxy needs per idle client connection.
//!
//! Parts: `runs` (starting targets, pgbench runs, idle-client memory) and `results`
//! (summaries, comparison tables and the files written).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Serialize;
use tidemark_cluster::{Cluster, ClusterConfig};

use crate::parse_duration;
use crate::procs::{self, TidemarkOpts};

mod results;
mod runs;

use results::report_results;
use runs::run_all;

#[derive(Args, Debug)]
pub struct PgbenchArgs {
    /// Length of each pgbench run (whole seconds).
    #[arg(long, default_value = "4s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Repetitions; targets are interleaved within each one and results are medians.
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
    /// Client counts for `pgbench -S`.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    pub clients: Vec<u32>,
    /// Protocols for `pgbench -S` (`-M`): simple, extended (unnamed Parse/Bind/Execute per
    /// statement) and prepared (named statements, prepared once per connection); `connect`
    /// adds `-S -C` (simple, a new connection per transaction: the login's cost).
    #[arg(long, value_delimiter = ',', default_value = "simple,extended,prepared",
          value_parser = ["simple", "extended", "prepared", "connect"])]
    pub protocols: Vec<String>,
    /// Clients for the TPC-B-like default script (0 to skip it).
    #[arg(long, default_value_t = 8)]
    pub tpcb_clients: u32,
    /// pgbench scale factor for `pgbench -i`.
    #[arg(long, default_value_t = 10)]
    pub scale: u32,
    /// Targets: direct, direct-replicas (the clients split over the replicas, one pgbench
    /// per replica, no proxy: where tidemark's `session` reads run, without a proxy), tidemark-session, tidemark-eventual, tidemark-notrack, tidemark-strong
    /// (every statement to the primary), tidemark-alt, pgbouncer, pgpool, pipe (a byte pipe:
    /// what any proxy process costs here).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "direct,direct-replicas,tidemark-session,tidemark-eventual,tidemark-notrack,pgbouncer,pgpool"
    )]
    pub targets: Vec<String>,
    /// Idle client connections opened to each proxy for the memory figure (0 to skip).
    #[arg(long, default_value_t = 1000)]
    pub idle_clients: usize,
    /// Streaming replicas beside the primary (tidemark's reads go to them; PgBouncer and
    /// `tidemark-strong` use the primary only). Every node shares this machine's cores.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=4))]
    pub replicas: u32,
    /// Directory for pgbench.csv, pgbench.json and pgbench.md.
    #[arg(long, default_value = "target/bench")]
    pub out: PathBuf,
    /// Short run: 1 repetition of 2 s, 100 idle clients.
    #[arg(long)]
    pub quick: bool,
    /// The tidemark binary (default: next to this one, rebuilt with cargo first).
    #[arg(long)]
    pub tidemark_bin: Option<PathBuf>,
    /// Don't run `cargo build -p tidemark` before starting.
    #[arg(long)]
    pub no_build: bool,
    /// A second tidemark binary, run as target `tidemark-alt` (session consistency, as
    /// `tidemark-session`): two builds compared in one run, interleaved like every target.
    #[arg(long)]
    pub tidemark_alt_bin: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Target {
    Direct,
    /// No proxy: the clients split over the replicas, one pgbench per replica, at once (read
    /// workloads only). The servers' share of `tidemark-session`'s reads without a proxy:
    /// on a machine whose cores the nodes share, several replicas cost more per statement
    /// than one primary.
    DirectReplicas,
    TidemarkSession,
    TidemarkEventual,
    TidemarkNotrack,
    /// `strong` consistency: every statement to the primary, as PgBouncer sends them (the
    /// proxy's own cost without the replicas' share of the work).
    TidemarkStrong,
    /// `--tidemark-alt-bin` in session consistency.
    TidemarkAlt,
    Pgbouncer,
    Pgpool,
    /// A byte pipe (`tidemark-bench pipe`): one server connection per client, bytes copied
    /// both ways, nothing decoded. The ceiling of any proxy process on this machine.
    Pipe,
}

impl Target {
    fn parse(s: &str) -> Result<Target> {
        Ok(match s {
            "direct" => Target::Direct,
            "direct-replicas" => Target::DirectReplicas,
            "tidemark-session" | "tidemark" => Target::TidemarkSession,
            "tidemark-eventual" => Target::TidemarkEventual,
            "tidemark-notrack" => Target::TidemarkNotrack,
            "tidemark-strong" => Target::TidemarkStrong,
            "tidemark-alt" => Target::TidemarkAlt,
            "pgbouncer" => Target::Pgbouncer,
            "pgpool" => Target::Pgpool,
            "pipe" => Target::Pipe,
            _ => bail!(
                "--targets: unknown target '{s}' (direct, direct-replicas, tidemark-session, tidemark-eventual, \
                 tidemark-notrack, tidemark-strong, tidemark-alt, pgbouncer, pgpool, pipe)"
            ),
        })
    }

    fn name(self) -> &'static str {
        match self {
            Target::Direct => "direct",
            Target::DirectReplicas => "direct to the replicas (no proxy)",
            Target::TidemarkSession => "tidemark (session)",
            Target::TidemarkEventual => "tidemark (eventual)",
            Target::TidemarkNotrack => "tidemark (track_writes off)",
            Target::TidemarkStrong => "tidemark (strong, primary only)",
            Target::TidemarkAlt => "tidemark (alt build, session)",
            Target::Pgbouncer => "PgBouncer (transaction)",
            Target::Pgpool => "Pgpool-II (SR + LB)",
            Target::Pipe => "byte pipe (no proxy logic)",
        }
    }

    fn tidemark(self) -> Option<TidemarkOpts> {
        let (consistency, track_writes) = match self {
            Target::TidemarkSession | Target::TidemarkAlt => ("session", true),
            Target::TidemarkEventual => ("eventual", true),
            Target::TidemarkNotrack => ("session", false),
            Target::TidemarkStrong => ("strong", true),
            _ => return None,
        };
        Some(TidemarkOpts {
            consistency,
            track_writes,
            max_wait: "20ms".into(),
            wait: "adaptive".into(),
            transactions: "read_only".into(),
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
struct Workload {
    /// `select-simple`, `select-extended`, `select-prepared`, `select-connect` or `tpcb`.
    name: &'static str,
    clients: u32,
}

impl Workload {
    fn label(&self) -> String {
        match self.name {
            "select-simple" => "-S -M simple".into(),
            "select-extended" => "-S -M extended".into(),
            "select-prepared" => "-S -M prepared".into(),
            "select-connect" => "-S -C (connection per tx)".into(),
            _ => "TPC-B-like (default)".into(),
        }
    }

    /// Statements per pgbench transaction: one `SELECT`, or the TPC-B-like script's seven
    /// (BEGIN, three UPDATEs, a SELECT, an INSERT, END).
    fn statements(&self) -> f64 {
        if self.name == "tpcb" {
            7.0
        } else {
            1.0
        }
    }

    fn args(&self) -> Vec<String> {
        let mut a = vec![];
        match self.name {
            "select-simple" => a.extend(["-S".to_string(), "-M".into(), "simple".into()]),
            "select-extended" => a.extend(["-S".to_string(), "-M".into(), "extended".into()]),
            "select-prepared" => a.extend(["-S".to_string(), "-M".into(), "prepared".into()]),
            "select-connect" => {
                a.extend(["-S".to_string(), "-C".into(), "-M".into(), "simple".into()])
            }
            _ => a.extend(["-M".to_string(), "simple".into()]),
        }
        a
    }

    /// The TPC-B-like script is only run where it means something different (and writes
    /// cannot run on a replica).
    fn applies_to(&self, t: Target) -> bool {
        self.name != "tpcb" || !matches!(t, Target::TidemarkEventual | Target::DirectReplicas)
    }
}

#[derive(Clone, Debug, Serialize)]
struct RunResult {
    rep: usize,
    target: Target,
    workload: String,
    clients: u32,
    tps: f64,
    lat_avg_ms: f64,
    lat_p99_ms: f64,
    /// The proxy process's user and system CPU per statement in the run (µs; NaN for direct
    /// and for Pgpool-II, whose clients are served by many processes). tidemark's include
    /// its node monitor.
    cpu_user_us: f64,
    cpu_sys_us: f64,
    /// The whole machine's busy CPU per statement in the run (µs): pgbench, the proxy, every
    /// PostgreSQL server and the kernel's share; and the share of the machine left idle (%).
    /// On a machine where all of them share the cores this is what throughput is made of.
    machine_us: f64,
    idle_pct: f64,
    error: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
struct Memory {
    proxy: String,
    clients: usize,
    rss_before_kib: u64,
    rss_after_kib: u64,
    kib_per_client: f64,
    note: String,
}

struct Bins {
    pgbench: PathBuf,
    tidemark: Option<PathBuf>,
    /// `--tidemark-alt-bin`.
    tidemark_alt: Option<PathBuf>,
    pgbouncer: Option<PathBuf>,
    pgpool: Option<PathBuf>,
    owner: Option<(u32, u32)>,
}

pub async fn run(mut args: PgbenchArgs) -> Result<()> {
    if args.quick {
        args.duration = Duration::from_secs(2);
        args.reps = 1;
        args.idle_clients = args.idle_clients.min(100);
    }
    if args.reps == 0 {
        bail!("--reps must be at least 1");
    }
    let targets: Vec<Target> = args
        .targets
        .iter()
        .map(|t| Target::parse(t))
        .collect::<Result<_>>()?;
    let started = Instant::now();
    let tidemark_alt = match (
        targets.contains(&Target::TidemarkAlt),
        &args.tidemark_alt_bin,
    ) {
        (true, None) => bail!("--targets tidemark-alt needs --tidemark-alt-bin"),
        (true, Some(b)) if !b.is_file() => {
            bail!("--tidemark-alt-bin: {} is not a file", b.display())
        }
        (true, Some(b)) => Some(b.clone()),
        (false, _) => None,
    };
    let needs_tidemark = targets
        .iter()
        .any(|t| t.tidemark().is_some() && *t != Target::TidemarkAlt);
    let tidemark = if needs_tidemark {
        Some(procs::tidemark_binary(
            args.tidemark_bin.as_deref(),
            !args.no_build,
        )?)
    } else {
        None
    };
    let pgbouncer = if targets.contains(&Target::Pgbouncer) {
        procs::ensure_program("pgbouncer", "pgbouncer")
    } else {
        None
    };
    let pgpool = if targets.contains(&Target::Pgpool) {
        procs::ensure_program("pgpool", "pgpool2")
    } else {
        None
    };
    let targets: Vec<Target> = targets
        .into_iter()
        .filter(|t| match t {
            Target::Pgbouncer => pgbouncer.is_some(),
            Target::Pgpool => pgpool.is_some(),
            _ => true,
        })
        .collect();
    let owner = if procs::is_root() {
        Some(procs::lookup_account("postgres").context(
            "running as root, and PgBouncer/Pgpool-II must not: create a `postgres` account \
             (apt-get install postgresql does)",
        )?)
    } else {
        None
    };
    let replicas = args.replicas as usize;
    eprintln!("starting a primary and {replicas} replica(s)...");
    let cluster = tokio::task::spawn_blocking(move || {
        let mut cfg = ClusterConfig::with_replicas(replicas);
        cfg.extra_conf.push("max_connections = 400".into());
        Cluster::start(cfg)
    })
    .await??;
    let cluster = Arc::new(cluster);
    let bins = Bins {
        pgbench: cluster.bindir().join("pgbench"),
        tidemark,
        tidemark_alt,
        pgbouncer,
        pgpool,
        owner,
    };
    let result = run_all(&args, &targets, &cluster, &bins).await;
    tokio::task::spawn_blocking(move || drop(cluster)).await?;
    let (runs, memory) = result?;
    report_results(&args, &targets, &runs, &memory)?;
    eprintln!(
        "pgbench finished in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn workloads(args: &PgbenchArgs) -> Vec<Workload> {
    let mut w = vec![];
    for (protocol, name) in [
        ("simple", "select-simple"),
        ("extended", "select-extended"),
        ("prepared", "select-prepared"),
        ("connect", "select-connect"),
    ] {
        if !args.protocols.iter().any(|p| p == protocol) {
            continue;
        }
        for &clients in &args.clients {
            w.push(Workload { name, clients });
        }
    }
    if args.tpcb_clients > 0 {
        w.push(Workload {
            name: "tpcb",
            clients: args.tpcb_clients,
        });
    }
    w
}
