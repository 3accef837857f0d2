//! Owns `tidemark-bench pgbench`: throughput and latency of `pgbench` against the primary
//! directly, through tidemark (session, eventual, write tracking off), PgBouncer and Pgpool-II,
//! interleaved over repetitions in one run on one cluster, reported as medians and ratios to
//! direct; plus the memory each proxy needs per idle client connection.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Serialize;
use tidemark_cluster::{Cluster, ClusterConfig};
use tokio_postgres::NoTls;

use crate::parse_duration;
use crate::procs::{self, ProcGuard, TidemarkOpts, PGPOOL_CHILDREN};
use crate::report::{self, f0, f1, f2, median, percentile, Table};

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
    /// Clients for the TPC-B-like default script (0 to skip it).
    #[arg(long, default_value_t = 8)]
    pub tpcb_clients: u32,
    /// pgbench scale factor for `pgbench -i`.
    #[arg(long, default_value_t = 10)]
    pub scale: u32,
    /// Targets: direct, tidemark-session, tidemark-eventual, tidemark-notrack, pgbouncer, pgpool.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "direct,tidemark-session,tidemark-eventual,tidemark-notrack,pgbouncer,pgpool"
    )]
    pub targets: Vec<String>,
    /// Idle client connections opened to each proxy for the memory figure (0 to skip).
    #[arg(long, default_value_t = 1000)]
    pub idle_clients: usize,
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
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Target {
    Direct,
    TidemarkSession,
    TidemarkEventual,
    TidemarkNotrack,
    Pgbouncer,
    Pgpool,
}

impl Target {
    fn parse(s: &str) -> Result<Target> {
        Ok(match s {
            "direct" => Target::Direct,
            "tidemark-session" | "tidemark" => Target::TidemarkSession,
            "tidemark-eventual" => Target::TidemarkEventual,
            "tidemark-notrack" => Target::TidemarkNotrack,
            "pgbouncer" => Target::Pgbouncer,
            "pgpool" => Target::Pgpool,
            _ => bail!(
                "--targets: unknown target '{s}' (direct, tidemark-session, tidemark-eventual, \
                 tidemark-notrack, pgbouncer, pgpool)"
            ),
        })
    }

    fn name(self) -> &'static str {
        match self {
            Target::Direct => "direct",
            Target::TidemarkSession => "tidemark (session)",
            Target::TidemarkEventual => "tidemark (eventual)",
            Target::TidemarkNotrack => "tidemark (track_writes off)",
            Target::Pgbouncer => "PgBouncer (transaction)",
            Target::Pgpool => "Pgpool-II (SR + LB)",
        }
    }

    fn tidemark(self) -> Option<TidemarkOpts> {
        let (consistency, track_writes) = match self {
            Target::TidemarkSession => ("session", true),
            Target::TidemarkEventual => ("eventual", true),
            Target::TidemarkNotrack => ("session", false),
            _ => return None,
        };
        Some(TidemarkOpts {
            consistency,
            track_writes,
            max_wait: "20ms".into(),
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
struct Workload {
    /// `select-simple`, `select-prepared` or `tpcb`.
    name: &'static str,
    clients: u32,
}

impl Workload {
    fn label(&self) -> String {
        match self.name {
            "select-simple" => "-S -M simple".into(),
            "select-prepared" => "-S -M prepared".into(),
            _ => "TPC-B-like (default)".into(),
        }
    }

    fn args(&self) -> Vec<String> {
        let mut a = vec![];
        match self.name {
            "select-simple" => a.extend(["-S".to_string(), "-M".into(), "simple".into()]),
            "select-prepared" => a.extend(["-S".to_string(), "-M".into(), "prepared".into()]),
            _ => a.extend(["-M".to_string(), "simple".into()]),
        }
        a
    }

    /// The TPC-B-like script is only run where it means something different.
    fn applies_to(&self, t: Target) -> bool {
        self.name != "tpcb" || t != Target::TidemarkEventual
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
    error: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
struct Summary {
    workload: String,
    clients: u32,
    target: Target,
    runs_ok: usize,
    tps: f64,
    tps_ratio_to_direct: f64,
    lat_avg_ms: f64,
    added_latency_us: f64,
    lat_p99_ms: f64,
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

/// Runs pgbench once and reads tps, average latency and (from the per-transaction log) p99.
async fn pgbench_once(
    pgbench: &Path,
    port: u16,
    w: &Workload,
    duration: Duration,
) -> Result<(f64, f64, f64)> {
    let logdir = tempfile::Builder::new()
        .prefix("tidemark-bench-pgbench")
        .tempdir()
        .context("creating a log directory")?;
    let prefix = logdir.path().join("log");
    let threads = if w.clients >= 2 { 2 } else { 1 };
    let out = tokio::process::Command::new(pgbench)
        .args(["-h", "127.0.0.1", "-U", "postgres", "-n"])
        .arg("-p")
        .arg(port.to_string())
        .arg("-T")
        .arg(duration.as_secs().max(1).to_string())
        .arg("-c")
        .arg(w.clients.to_string())
        .arg("-j")
        .arg(threads.to_string())
        .args(w.args())
        .arg("-l")
        .arg(format!("--log-prefix={}", prefix.display()))
        .arg("postgres")
        .env("PGCONNECT_TIMEOUT", "10")
        .kill_on_drop(true)
        .output()
        .await
        .context("running pgbench")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let tps = stdout
        .lines()
        .find(|l| l.starts_with("tps = "))
        .and_then(|l| l.split_whitespace().nth(2)?.parse::<f64>().ok());
    let lat = stdout
        .lines()
        .find(|l| l.starts_with("latency average = "))
        .and_then(|l| l.split_whitespace().nth(3)?.parse::<f64>().ok());
    let failed = stdout
        .lines()
        .find(|l| l.starts_with("number of failed transactions"))
        .and_then(|l| l.split_whitespace().nth(4)?.parse::<u64>().ok())
        .unwrap_or(0);
    if !out.status.success() || failed > 0 {
        let line = stderr
            .lines()
            .find(|l| l.contains("error") || l.contains("ERROR") || l.contains("FATAL"))
            .or_else(|| stderr.lines().next())
            .unwrap_or("no message");
        // Keep what the server or proxy said, not pgbench's prefixes.
        let msg = ["ERROR:", "FATAL:", "error:"]
            .iter()
            .find_map(|p| line.rfind(p).map(|i| &line[i + p.len()..]))
            .unwrap_or(line)
            .trim();
        bail!("{msg}");
    }
    let (Some(tps), Some(lat)) = (tps, lat) else {
        bail!("could not read tps/latency from pgbench output:\n{stdout}\n{stderr}");
    };
    let mut lats: Vec<u32> = Vec::new();
    let rd = std::fs::read_dir(logdir.path()).context("reading the pgbench logs")?;
    for e in rd.flatten() {
        let text = std::fs::read_to_string(e.path()).unwrap_or_default();
        lats.extend(
            text.lines()
                .filter_map(|l| l.split_whitespace().nth(2)?.parse::<u32>().ok()),
        );
    }
    lats.sort_unstable();
    Ok((tps, lat, percentile(&lats, 99.0) as f64 / 1000.0))
}

struct Bins {
    pgbench: PathBuf,
    tidemark: Option<PathBuf>,
    pgbouncer: Option<PathBuf>,
    pgpool: Option<PathBuf>,
    owner: Option<(u32, u32)>,
}

/// A running target: the process (none for direct) and its files. Fields drop in order: the
/// process stops before its directory is removed.
struct Running {
    guard: Option<ProcGuard>,
    _dir: Option<tempfile::TempDir>,
    port: u16,
}

/// Starts whatever serves `target`.
async fn start_target(t: Target, cluster: &Cluster, bins: &Bins, dir: &Path) -> Result<Running> {
    if let Some(opts) = t.tidemark() {
        let bin = bins.tidemark.as_deref().context("no tidemark binary")?;
        let tag = format!("{t:?}").to_lowercase();
        let (g, port) = procs::start_tidemark(bin, cluster, &opts, dir, &tag).await?;
        return Ok(Running {
            guard: Some(g),
            _dir: None,
            port,
        });
    }
    match t {
        Target::Direct => Ok(Running {
            guard: None,
            _dir: None,
            port: cluster.port(0),
        }),
        Target::Pgbouncer => {
            let bin = bins
                .pgbouncer
                .as_deref()
                .context("pgbouncer is not installed")?;
            let d = procs::scratch_dir("tidemark-bench-pgbouncer", bins.owner)?;
            let (g, port) = procs::start_pgbouncer(bin, cluster, d.path(), bins.owner).await?;
            Ok(Running {
                guard: Some(g),
                _dir: Some(d),
                port,
            })
        }
        Target::Pgpool => {
            let bin = bins.pgpool.as_deref().context("pgpool is not installed")?;
            let d = procs::scratch_dir("tidemark-bench-pgpool", bins.owner)?;
            let (g, port) =
                procs::start_pgpool(bin, cluster, d.path(), bins.owner, "transaction").await?;
            Ok(Running {
                guard: Some(g),
                _dir: Some(d),
                port,
            })
        }
        _ => bail!("unhandled target {t:?}"),
    }
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
    let needs_tidemark = targets.iter().any(|t| t.tidemark().is_some());
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
    eprintln!("starting a primary and 2 replicas...");
    let cluster = tokio::task::spawn_blocking(|| {
        let mut cfg = ClusterConfig::with_replicas(2);
        cfg.extra_conf.push("max_connections = 400".into());
        Cluster::start(cfg)
    })
    .await??;
    let cluster = Arc::new(cluster);
    let bins = Bins {
        pgbench: cluster.bindir().join("pgbench"),
        tidemark,
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
    for name in ["select-simple", "select-prepared"] {
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

async fn run_all(
    args: &PgbenchArgs,
    targets: &[Target],
    cluster: &Arc<Cluster>,
    bins: &Bins,
) -> Result<(Vec<RunResult>, Vec<Memory>)> {
    eprintln!("pgbench -i -s {} on the primary...", args.scale);
    let init = tokio::process::Command::new(&bins.pgbench)
        .args(["-i", "-q", "-h", "127.0.0.1", "-U", "postgres", "-s"])
        .arg(args.scale.to_string())
        .arg("-p")
        .arg(cluster.port(0).to_string())
        .arg("postgres")
        .output()
        .await
        .context("running pgbench -i")?;
    if !init.status.success() {
        bail!(
            "pgbench -i failed: {}",
            String::from_utf8_lossy(&init.stderr).trim()
        );
    }
    {
        let c = Arc::clone(cluster);
        tokio::task::spawn_blocking(move || -> Result<()> {
            let lsn = c.current_lsn(0)?;
            for r in 1..c.node_count() {
                c.wait_replayed(r, &lsn, Duration::from_secs(60))?;
            }
            Ok(())
        })
        .await??;
    }
    let scratch = procs::scratch_dir("tidemark-bench-pgbench", None)?;
    let wl = workloads(args);
    let runs_per_rep: usize = targets
        .iter()
        .map(|t| wl.iter().filter(|w| w.applies_to(*t)).count())
        .sum();
    eprintln!(
        "{} repetitions × {} runs of {} s (about {} s)",
        args.reps,
        runs_per_rep,
        args.duration.as_secs(),
        args.reps as u64 * (runs_per_rep as u64 * (args.duration.as_secs() + 1) + 8)
    );
    let mut runs = Vec::new();
    for rep in 0..args.reps {
        // Rotate the order so no target always runs first (or right after another).
        let mut order = targets.to_vec();
        order.rotate_left(rep % targets.len().max(1));
        for &t in &order {
            let running = start_target(t, cluster, bins, scratch.path())
                .await
                .with_context(|| format!("starting {}", t.name()))?;
            let port = running.port;
            for w in wl.iter().filter(|w| w.applies_to(t)) {
                let r = pgbench_once(&bins.pgbench, port, w, args.duration).await;
                let rr = match r {
                    Ok((tps, lat, p99)) => RunResult {
                        rep,
                        target: t,
                        workload: w.name.into(),
                        clients: w.clients,
                        tps,
                        lat_avg_ms: lat,
                        lat_p99_ms: p99,
                        error: None,
                    },
                    Err(e) => RunResult {
                        rep,
                        target: t,
                        workload: w.name.into(),
                        clients: w.clients,
                        tps: f64::NAN,
                        lat_avg_ms: f64::NAN,
                        lat_p99_ms: f64::NAN,
                        error: Some(format!("{e:#}")),
                    },
                };
                eprintln!(
                    "rep {} {:<28} {:<16} c={:<3} tps {:>9}  lat {:>7} ms  p99 {:>7} ms{}",
                    rep + 1,
                    t.name(),
                    w.label(),
                    w.clients,
                    f0(rr.tps),
                    f2(rr.lat_avg_ms),
                    f2(rr.lat_p99_ms),
                    rr.error
                        .as_deref()
                        .map(|e| format!("  {e}"))
                        .unwrap_or_default()
                );
                runs.push(rr);
            }
            drop(running);
        }
    }
    let mut memory = Vec::new();
    if args.idle_clients > 0 {
        for &t in targets {
            if matches!(
                t,
                Target::TidemarkSession | Target::Pgbouncer | Target::Pgpool
            ) {
                match measure_memory(t, cluster, bins, scratch.path(), args.idle_clients).await {
                    Ok(m) => {
                        eprintln!(
                            "memory {:<24} {} idle clients: {} -> {} KiB, {:.1} KiB per client {}",
                            m.proxy,
                            m.clients,
                            m.rss_before_kib,
                            m.rss_after_kib,
                            m.kib_per_client,
                            m.note
                        );
                        memory.push(m);
                    }
                    Err(e) => eprintln!("memory {}: {e:#}", t.name()),
                }
            }
        }
    }
    Ok((runs, memory))
}

/// Opens `n` idle client connections to the proxy serving `t` and reports its memory before
/// and after. Pgpool-II serves at most `num_init_children` clients, one process each, so it
/// gets that many at most and its figure is the whole process group's.
async fn measure_memory(
    t: Target,
    cluster: &Cluster,
    bins: &Bins,
    dir: &Path,
    n: usize,
) -> Result<Memory> {
    let running = start_target(t, cluster, bins, dir).await?;
    let port = running.port;
    let pid = running
        .guard
        .as_ref()
        .map(|g| g.pid())
        .context("no process to measure")?;
    let group = t == Target::Pgpool;
    let n = if group { n.min(PGPOOL_CHILDREN - 4) } else { n };
    let mem = |pid| {
        if group {
            procs::group_memory_kib(pid)
        } else {
            let r = procs::rss_kib(pid).unwrap_or(0);
            (r, r)
        }
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (before_rss, before_pss) = mem(pid);
    let conninfo =
        format!("host=127.0.0.1 port={port} user=postgres dbname=postgres connect_timeout=10");
    let mut clients = Vec::with_capacity(n);
    let mut tasks = Vec::with_capacity(n);
    let mut batch = tokio::task::JoinSet::new();
    let mut opened = 0;
    while opened < n {
        let k = (n - opened).min(25);
        for _ in 0..k {
            let ci = conninfo.clone();
            batch.spawn(async move { tokio_postgres::connect(&ci, NoTls).await });
        }
        while let Some(r) = batch.join_next().await {
            let (client, conn) = r
                .context("a connect task panicked")?
                .with_context(|| format!("opening idle client {} of {n}", opened + 1))?;
            tasks.push(tokio::spawn(async move {
                let _ = conn.await;
            }));
            clients.push(client);
        }
        opened += k;
    }
    // One round trip on each so the proxy has fully set the client up.
    for c in &clients {
        c.simple_query("SELECT 1")
            .await
            .context("SELECT 1 on an idle client")?;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (after_rss, after_pss) = mem(pid);
    drop(clients);
    for t in tasks {
        let _ = t.await;
    }
    drop(running);
    let (before, after, note) = if group {
        (
            before_pss,
            after_pss,
            format!(
                "sum of Pss over the process group ({PGPOOL_CHILDREN} pre-forked children; \
                 one process per client, so {n} clients at most here); RSS sum {before_rss} -> {after_rss} KiB"
            ),
        )
    } else {
        (before_rss, after_rss, "VmRSS of the process".to_string())
    };
    Ok(Memory {
        proxy: t.name().to_string(),
        clients: n,
        rss_before_kib: before,
        rss_after_kib: after,
        kib_per_client: (after as f64 - before as f64) / n as f64,
        note,
    })
}

fn summarize(targets: &[Target], wl: &[Workload], runs: &[RunResult]) -> Vec<Summary> {
    let mut out = vec![];
    for w in wl {
        let of = |t: Target| -> Vec<&RunResult> {
            runs.iter()
                .filter(|r| r.target == t && r.workload == w.name && r.clients == w.clients)
                .collect()
        };
        let direct = of(Target::Direct);
        for &t in targets {
            if !w.applies_to(t) {
                continue;
            }
            let mine = of(t);
            let ok: Vec<&&RunResult> = mine.iter().filter(|r| r.error.is_none()).collect();
            // Ratios and differences against direct in the same repetition.
            let paired = |f: &dyn Fn(&RunResult, &RunResult) -> f64| -> f64 {
                let v: Vec<f64> = ok
                    .iter()
                    .filter_map(|r| {
                        let d = direct
                            .iter()
                            .find(|d| d.rep == r.rep && d.error.is_none())?;
                        Some(f(r, d))
                    })
                    .collect();
                median(&v)
            };
            out.push(Summary {
                workload: w.label(),
                clients: w.clients,
                target: t,
                runs_ok: ok.len(),
                tps: median(&ok.iter().map(|r| r.tps).collect::<Vec<_>>()),
                tps_ratio_to_direct: paired(&|r, d| r.tps / d.tps),
                lat_avg_ms: median(&ok.iter().map(|r| r.lat_avg_ms).collect::<Vec<_>>()),
                added_latency_us: paired(&|r, d| (r.lat_avg_ms - d.lat_avg_ms) * 1000.0),
                lat_p99_ms: median(&ok.iter().map(|r| r.lat_p99_ms).collect::<Vec<_>>()),
                error: mine.iter().find_map(|r| r.error.clone()),
            });
        }
    }
    out
}

/// Median over repetitions of tps(a) / tps(b) − 1, for the same workload.
fn paired_cost(runs: &[RunResult], w: &Workload, a: Target, b: Target) -> f64 {
    let v: Vec<f64> = runs
        .iter()
        .filter(|r| r.target == a && r.workload == w.name && r.clients == w.clients)
        .filter(|r| r.error.is_none())
        .filter_map(|ra| {
            let rb = runs.iter().find(|r| {
                r.target == b
                    && r.workload == w.name
                    && r.clients == w.clients
                    && r.rep == ra.rep
                    && r.error.is_none()
            })?;
            Some(100.0 * (1.0 - ra.tps / rb.tps))
        })
        .collect();
    median(&v)
}

fn report_results(
    args: &PgbenchArgs,
    targets: &[Target],
    runs: &[RunResult],
    memory: &[Memory],
) -> Result<()> {
    let wl = workloads(args);
    let summary = summarize(targets, &wl, runs);
    let mut t = Table::new(
        &[
            "workload",
            "clients",
            "target",
            "tps",
            "tps / direct",
            "latency avg ms",
            "added µs",
            "p99 ms",
            "runs ok",
        ],
        3,
    );
    for s in &summary {
        let mut row = vec![
            s.workload.clone(),
            s.clients.to_string(),
            s.target.name().to_string(),
            f0(s.tps),
            f2(s.tps_ratio_to_direct),
            format!("{:.3}", s.lat_avg_ms),
            if s.target == Target::Direct {
                "–".into()
            } else {
                f0(s.added_latency_us)
            },
            format!("{:.3}", s.lat_p99_ms),
            format!("{}/{}", s.runs_ok, args.reps),
        ];
        if s.runs_ok == 0 {
            let e = s.error.clone().unwrap_or_default();
            let short: String = e.chars().take(70).collect();
            row[3] = format!("fails: {short}");
            for c in row.iter_mut().take(8).skip(4) {
                *c = "–".into();
            }
        }
        t.push(row);
    }
    let mut cmp = Table::new(&["comparison", "workload", "clients", "tps cost %"], 3);
    let pairs = [
        (
            Target::TidemarkSession,
            Target::TidemarkNotrack,
            "write tracking on vs off (issue 6: < 5 %)",
        ),
        (
            Target::TidemarkSession,
            Target::TidemarkEventual,
            "session vs eventual (issue 6: < 3 %)",
        ),
        (
            Target::TidemarkSession,
            Target::Pgbouncer,
            "tidemark (session) vs PgBouncer",
        ),
    ];
    for (a, b, label) in pairs {
        if !targets.contains(&a) || !targets.contains(&b) {
            continue;
        }
        for w in &wl {
            if !w.applies_to(a) || !w.applies_to(b) {
                continue;
            }
            // Tracking only differs when something writes; session vs eventual only on reads.
            if b == Target::TidemarkNotrack && w.name != "tpcb" {
                continue;
            }
            let c = paired_cost(runs, w, a, b);
            cmp.push(vec![label.into(), w.label(), w.clients.to_string(), f1(c)]);
        }
    }
    let mut mem = Table::new(
        &[
            "proxy",
            "idle clients",
            "before KiB",
            "after KiB",
            "KiB per client",
            "how",
        ],
        1,
    );
    for m in memory {
        mem.push(vec![
            m.proxy.clone(),
            m.clients.to_string(),
            m.rss_before_kib.to_string(),
            m.rss_after_kib.to_string(),
            f1(m.kib_per_client),
            m.note.clone(),
        ]);
    }
    println!();
    print!("{}", t.text());
    println!();
    print!("{}", cmp.text());
    println!();
    print!("{}", mem.text());
    let mut raw = Table::new(
        &[
            "rep",
            "target",
            "workload",
            "clients",
            "tps",
            "lat_avg_ms",
            "lat_p99_ms",
            "error",
        ],
        4,
    );
    for r in runs {
        raw.push(vec![
            (r.rep + 1).to_string(),
            r.target.name().into(),
            r.workload.clone(),
            r.clients.to_string(),
            format!("{:.1}", r.tps),
            format!("{:.4}", r.lat_avg_ms),
            format!("{:.4}", r.lat_p99_ms),
            r.error.clone().unwrap_or_default(),
        ]);
    }
    report::write(&args.out.join("pgbench-runs.csv"), &raw.csv())?;
    report::write(&args.out.join("pgbench.csv"), &t.csv())?;
    let json = serde_json::json!({
        "runs": runs,
        "summary": summary,
        "memory": memory,
    });
    report::write(
        &args.out.join("pgbench.json"),
        &serde_json::to_string_pretty(&json).context("encoding JSON")?,
    )?;
    let cmd: Vec<String> = std::env::args().skip(1).collect();
    let md = format!(
        "Command: `tidemark-bench {}` — {} repetitions of {} s per run, medians; ratios and \
         added latency against direct in the same repetition.\n\n{}\n{}\n{}",
        cmd.join(" "),
        args.reps,
        args.duration.as_secs(),
        t.markdown(),
        cmp.markdown(),
        mem.markdown()
    );
    report::write(&args.out.join("pgbench.md"), &md)?;
    eprintln!(
        "wrote {}/pgbench{{.csv,-runs.csv,.json,.md}}",
        args.out.display()
    );
    Ok(())
}
