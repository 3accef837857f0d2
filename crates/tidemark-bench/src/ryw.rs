//! Owns `tidemark-bench ryw`: the read-after-write workload. Simulated users each write their
//! own row, read it back at once, then read feed rows with a think time in between (every page
//! also shows the user's own row). Every mode (where reads go) runs under every lag profile
//! (made real on the replicas with `recovery_min_apply_delay` or paused replay) against one
//! cluster; a read is stale exactly when the version of the user's own row it returns is lower
//! than the version that user last wrote.
//!
//! The think time matters for the time-pin modes: a user who writes more often than the pin
//! lasts never reads a replica at all. With the defaults a user writes about every 3 s.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde::Serialize;
use tidemark_cluster::{Cluster, ClusterConfig};
use tokio_postgres::types::Type;
use tokio_postgres::{Client, NoTls, Statement};

use crate::procs::{self, ProcGuard, TidemarkOpts};
use crate::report::{self, f1, f2, percentile, ChartPanel, Table};
use crate::{parse_duration, pg_error, workspace_path};

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
    /// Modes: primary, naive, pin-<duration> (e.g. pin-2s), tidemark.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "primary,naive,pin-2s,pin-5s,tidemark"
    )]
    pub modes: Vec<String>,
    /// tidemark's routing.max_wait (how long a read waits for a replica before the primary).
    #[arg(long, default_value = "20ms")]
    pub max_wait: String,
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
    /// Through Pgpool-II (streaming replication, load balancing) with this
    /// `disable_load_balance_on_write` setting.
    Pgpool(&'static str),
}

fn parse_mode(s: &str) -> Result<Mode> {
    Ok(match s {
        "primary" => Mode::Primary,
        "naive" => Mode::Naive,
        "tidemark" => Mode::Tidemark,
        "pgpool-transaction" => Mode::Pgpool("transaction"),
        "pgpool-always" => Mode::Pgpool("always"),
        "pgpool-dml_adaptive" => Mode::Pgpool("dml_adaptive"),
        "pgpool-off" => Mode::Pgpool("off"),
        _ => match s.strip_prefix("pin-") {
            Some(d) => {
                Mode::Pin(parse_duration(d).map_err(|e| anyhow::anyhow!("--modes {s}: {e}"))?)
            }
            None => bail!(
                "--modes: unknown mode '{s}' (primary, naive, pin-2s, pin-5s, tidemark, \
                 pgpool-transaction, pgpool-always, pgpool-dml_adaptive, pgpool-off)"
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

const UPDATE_SQL: &str = "UPDATE ryw SET version = version + 1 WHERE id = $1 RETURNING version";
const SELECT_SQL: &str = "SELECT version, pg_is_in_recovery(), \
                          (SELECT version FROM ryw WHERE id = $2) FROM ryw WHERE id = $1";

/// How a connection sends the workload's two statements.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Statements {
    /// Named prepared statements (Parse once, then Bind/Execute): what most drivers do.
    Prepared,
    /// An unnamed statement per execution (Parse/Bind/Describe/Execute/Sync in one round trip,
    /// tokio-postgres' `query_typed`).
    Unnamed,
}

impl Statements {
    /// The form `mode` runs with. Every Pgpool-II mode runs unnamed: Pgpool (4.3) routes a
    /// *named* statement by where its Parse went and, outside an explicit transaction, `Bind()`
    /// keeps that destination, so `disable_load_balance_on_write` does not act per statement
    /// (a SELECT prepared before any write keeps reading a replica under `always`). With
    /// `dml_adaptive` it is worse: the Parse of every named statement goes to both the primary
    /// and the session's load-balance node (`pool_setall_node_to_be_sent` in `Parse()`), the
    /// UPDATE then executes on the standby too, fails there ("cannot execute UPDATE in a
    /// read-only transaction") and Pgpool ends the session with FATAL "kind mismatch among
    /// backends". Unnamed statements are routed per statement, as Pgpool documents.
    fn for_mode(mode: Mode, unnamed: bool) -> Statements {
        if unnamed || matches!(mode, Mode::Pgpool(_)) {
            Statements::Unnamed
        } else {
            Statements::Prepared
        }
    }

    fn name(self) -> &'static str {
        match self {
            Statements::Prepared => "prepared",
            Statements::Unnamed => "unnamed",
        }
    }
}

struct Pg {
    client: Client,
    /// The prepared UPDATE and SELECT; `None` with unnamed statements.
    prepared: Option<(Statement, Statement)>,
}

impl Pg {
    /// Bumps the version of row `id`; returns the new version.
    async fn write(&self, id: i32) -> Result<i64, tokio_postgres::Error> {
        let row = match &self.prepared {
            Some((upd, _)) => self.client.query_one(upd, &[&id]).await?,
            None => {
                self.client
                    .query_typed_one(UPDATE_SQL, &[(&id, Type::INT4)])
                    .await?
            }
        };
        Ok(row.get(0))
    }

    /// The version of row `id` and whether the server is a replica (row `other` is read too).
    async fn read(&self, id: i32, other: i32) -> Result<(i64, bool), tokio_postgres::Error> {
        let row = match &self.prepared {
            Some((_, sel)) => self.client.query_one(sel, &[&id, &other]).await?,
            None => {
                self.client
                    .query_typed_one(SELECT_SQL, &[(&id, Type::INT4), (&other, Type::INT4)])
                    .await?
            }
        };
        Ok((row.get(0), row.get(1)))
    }
}

async fn connect(port: u16, key: Option<i32>, statements: Statements) -> Result<Pg> {
    let conninfo =
        format!("host=127.0.0.1 port={port} user=postgres dbname=postgres connect_timeout=10");
    let (client, conn) = tokio_postgres::connect(&conninfo, NoTls)
        .await
        .map_err(|e| anyhow::anyhow!("connecting to port {port}: {}", pg_error(&e)))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    if let Some(id) = key {
        client
            .simple_query(&format!("SET tidemark.key = 'user:{id}'"))
            .await
            .map_err(|e| anyhow::anyhow!("SET tidemark.key: {}", pg_error(&e)))?;
    }
    let prepared = match statements {
        Statements::Unnamed => None,
        Statements::Prepared => {
            let upd = client
                .prepare(UPDATE_SQL)
                .await
                .map_err(|e| anyhow::anyhow!("preparing the UPDATE: {}", pg_error(&e)))?;
            let sel = client
                .prepare(SELECT_SQL)
                .await
                .map_err(|e| anyhow::anyhow!("preparing the SELECT: {}", pg_error(&e)))?;
            Some((upd, sel))
        }
    };
    Ok(Pg { client, prepared })
}

#[derive(Default)]
struct UserStats {
    writes: u64,
    reads: u64,
    stale: u64,
    read_backs: u64,
    stale_read_backs: u64,
    replica_reads: u64,
    errors: u64,
    first_error: Option<String>,
    lat_us: Vec<u32>,
}

impl UserStats {
    fn error(&mut self, e: impl std::fmt::Display) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(e.to_string());
        }
    }
}

/// One user's connections: `primary` for writes (and reads in some modes), `replicas` for
/// direct replica reads, or a single `proxy` connection through tidemark.
struct UserConns {
    id: i32,
    primary: Option<Pg>,
    replicas: Vec<Pg>,
    proxy: Option<Pg>,
}

async fn user_loop(
    mode: Mode,
    u: UserConns,
    feed_reads: usize,
    think: Duration,
    rows: i32,
    deadline: Instant,
) -> UserStats {
    let mut st = UserStats {
        lat_us: Vec::with_capacity(1 << 14),
        ..UserStats::default()
    };
    let mut rng = StdRng::seed_from_u64(u.id as u64 * 7919);
    let mut rr = u.id as usize;
    let Some(writer) = u.proxy.as_ref().or(u.primary.as_ref()) else {
        st.error("no connection");
        return st;
    };
    while Instant::now() < deadline {
        if writer.client.is_closed() {
            st.error("connection closed");
            break;
        }
        let written = match writer.write(u.id).await {
            Ok(v) => v,
            Err(e) => {
                st.error(format!("write: {}", pg_error(&e)));
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let wrote_at = Instant::now();
        st.writes += 1;
        for k in 0..=feed_reads {
            if k > 0 && !think.is_zero() {
                tokio::time::sleep(think).await;
            }
            if Instant::now() >= deadline {
                break;
            }
            let other = if k == 0 {
                u.id
            } else {
                rng.gen_range(1..=rows)
            };
            let conn = match mode {
                Mode::Tidemark | Mode::Pgpool(_) => writer,
                Mode::Primary => writer,
                Mode::Pin(d) if wrote_at.elapsed() < d => writer,
                Mode::Naive | Mode::Pin(_) => {
                    rr += 1;
                    &u.replicas[rr % u.replicas.len()]
                }
            };
            let t = Instant::now();
            match conn.read(u.id, other).await {
                Ok((version, in_recovery)) => {
                    st.lat_us
                        .push(t.elapsed().as_micros().min(u32::MAX as u128) as u32);
                    st.reads += 1;
                    if in_recovery {
                        st.replica_reads += 1;
                    }
                    let stale = version < written;
                    st.stale += stale as u64;
                    if k == 0 {
                        st.read_backs += 1;
                        st.stale_read_backs += stale as u64;
                    }
                }
                Err(e) => st.error(format!("read: {}", pg_error(&e))),
            }
        }
    }
    st
}

struct Ctx {
    cluster: Arc<Cluster>,
    tidemark_bin: Option<PathBuf>,
    scratch: tempfile::TempDir,
    max_wait: String,
}

async fn run_cell(
    ctx: &Ctx,
    args: &RywArgs,
    mode: Mode,
    mode_name: &str,
    profile: Profile,
    duration: Duration,
) -> Result<CellResult> {
    let c = &ctx.cluster;
    let mut proxy: Option<(ProcGuard, u16)> = None;
    if mode == Mode::Tidemark {
        let bin = ctx
            .tidemark_bin
            .as_deref()
            .context("the tidemark binary is needed for mode tidemark")?;
        let opts = TidemarkOpts {
            consistency: "session",
            track_writes: true,
            max_wait: ctx.max_wait.clone(),
        };
        proxy = Some(procs::start_tidemark(bin, c, &opts, ctx.scratch.path(), "ryw").await?);
    }
    let mut _pgpool_dir = None;
    if let Mode::Pgpool(which) = mode {
        let bin = procs::ensure_program("pgpool", "pgpool2")
            .context("Pgpool-II is not installed (apt-get install pgpool2)")?;
        let owner = if procs::is_root() {
            procs::lookup_account("postgres")
        } else {
            None
        };
        let d = procs::scratch_dir("tidemark-bench-pgpool", owner)?;
        proxy = Some(procs::start_pgpool(&bin, c, d.path(), owner, which).await?);
        _pgpool_dir = Some(d);
    }
    let statements = Statements::for_mode(mode, args.unnamed);
    let mut users = Vec::with_capacity(args.users);
    for i in 0..args.users {
        let id = i as i32 + 1;
        let mut u = UserConns {
            id,
            primary: None,
            replicas: vec![],
            proxy: None,
        };
        match mode {
            Mode::Tidemark => {
                let port = proxy.as_ref().map(|p| p.1).context("no proxy port")?;
                u.proxy = Some(connect(port, Some(id), statements).await?);
            }
            Mode::Pgpool(_) => {
                let port = proxy.as_ref().map(|p| p.1).context("no proxy port")?;
                u.proxy = Some(connect(port, None, statements).await?);
            }
            Mode::Primary => u.primary = Some(connect(c.port(0), None, statements).await?),
            Mode::Naive | Mode::Pin(_) => {
                u.primary = Some(connect(c.port(0), None, statements).await?);
                for r in 1..c.node_count() {
                    u.replicas.push(connect(c.port(r), None, statements).await?);
                }
            }
        }
        users.push(u);
    }
    let start = Instant::now();
    let deadline = start + duration;
    let pauser = if profile == Profile::Paused {
        let cl = Arc::clone(c);
        Some(tokio::spawn(async move {
            tokio::time::sleep(duration.mul_f64(0.2)).await;
            let cl2 = Arc::clone(&cl);
            tokio::task::spawn_blocking(move || -> Result<()> {
                for r in 1..cl2.node_count() {
                    cl2.pause_replay(r)?;
                }
                Ok(())
            })
            .await??;
            tokio::time::sleep(duration.mul_f64(0.6)).await;
            tokio::task::spawn_blocking(move || -> Result<()> {
                for r in 1..cl.node_count() {
                    cl.resume_replay(r)?;
                }
                Ok(())
            })
            .await??;
            Ok::<(), anyhow::Error>(())
        }))
    } else {
        None
    };
    let handles: Vec<_> = users
        .into_iter()
        .map(|u| {
            tokio::spawn(user_loop(
                mode,
                u,
                args.feed_reads,
                args.think,
                FEED_ROWS,
                deadline,
            ))
        })
        .collect();
    let mut all = UserStats::default();
    for h in handles {
        let s = h.await.context("a user task panicked")?;
        all.writes += s.writes;
        all.reads += s.reads;
        all.stale += s.stale;
        all.read_backs += s.read_backs;
        all.stale_read_backs += s.stale_read_backs;
        all.replica_reads += s.replica_reads;
        all.errors += s.errors;
        if all.first_error.is_none() {
            all.first_error = s.first_error;
        }
        all.lat_us.extend(s.lat_us);
    }
    let secs = start.elapsed().as_secs_f64();
    if let Some(p) = pauser {
        p.await.context("the pause task panicked")??;
    }
    drop(proxy);
    all.lat_us.sort_unstable();
    let pct = |a: u64, b: u64| {
        if b == 0 {
            f64::NAN
        } else {
            100.0 * a as f64 / b as f64
        }
    };
    Ok(CellResult {
        profile: profile_name(profile),
        mode: mode_name.to_string(),
        statements: statements.name(),
        seconds: secs,
        users: args.users,
        writes: all.writes,
        reads: all.reads,
        stale: all.stale,
        stale_pct: pct(all.stale, all.reads),
        read_backs: all.read_backs,
        stale_read_backs: all.stale_read_backs,
        replica_reads: all.replica_reads,
        replica_pct: pct(all.replica_reads, all.reads),
        read_p50_us: percentile(&all.lat_us, 50.0),
        read_p99_us: percentile(&all.lat_us, 99.0),
        reads_per_s: all.reads as f64 / secs,
        writes_per_s: all.writes as f64 / secs,
        errors: all.errors,
        first_error: all.first_error,
    })
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
    let tidemark_bin = if modes.iter().any(|m| m.0 == Mode::Tidemark) {
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

fn result_table() -> Table {
    Table::new(
        &[
            "profile",
            "mode",
            "stale reads",
            "stale %",
            "stale read-backs",
            "reads on replicas %",
            "read p50 ms",
            "read p99 ms",
            "reads/s",
            "writes/s",
            "errors",
        ],
        2,
    )
}

fn table_row(r: &CellResult) -> Vec<String> {
    vec![
        r.profile.clone(),
        r.mode.clone(),
        r.stale.to_string(),
        f2(r.stale_pct),
        format!("{}/{}", r.stale_read_backs, r.read_backs),
        f1(r.replica_pct),
        f2(r.read_p50_us as f64 / 1000.0),
        f2(r.read_p99_us as f64 / 1000.0),
        format!("{:.0}", r.reads_per_s),
        format!("{:.0}", r.writes_per_s),
        r.errors.to_string(),
    ]
}

fn report_results(
    args: &RywArgs,
    modes: &[(Mode, String)],
    profiles: &[Profile],
    results: &[CellResult],
) -> Result<()> {
    let mut table = result_table();
    for r in results {
        table.push(table_row(r));
    }
    println!();
    print!("{}", table.text());
    report::write(&args.out.join("ryw.csv"), &table.csv())?;
    report::write(
        &args.out.join("ryw.json"),
        &serde_json::to_string_pretty(results).context("encoding JSON")?,
    )?;
    let cmd: Vec<String> = std::env::args().skip(1).collect();
    let unnamed: Vec<&str> = modes
        .iter()
        .filter(|m| Statements::for_mode(m.0, args.unnamed) == Statements::Unnamed)
        .map(|m| m.1.as_str())
        .collect();
    let statements = match unnamed.len() {
        0 => "named prepared statements".to_string(),
        n if n == modes.len() => "unnamed statements".to_string(),
        _ => format!(
            "named prepared statements (unnamed in {})",
            unnamed.join(", ")
        ),
    };
    let md = format!(
        "Command: `tidemark-bench {}` — {} users, {} feed reads per write, think time {}, {} per cell, {statements}.\n\n{}",
        cmd.join(" "),
        args.users,
        args.feed_reads,
        humantime::format_duration(args.think),
        humantime::format_duration(args.duration),
        table.markdown()
    );
    report::write(&args.out.join("ryw.md"), &md)?;
    let mode_names: Vec<String> = modes.iter().map(|m| m.1.clone()).collect();
    let panel = |title: &'static str, f: fn(&CellResult) -> f64| ChartPanel {
        title,
        groups: profiles
            .iter()
            .map(|p| {
                let pn = profile_name(*p);
                let vals = mode_names
                    .iter()
                    .map(|m| {
                        results
                            .iter()
                            .find(|r| r.profile == pn && &r.mode == m)
                            .map(f)
                            .unwrap_or(f64::NAN)
                    })
                    .collect();
                (pn, vals)
            })
            .collect(),
    };
    let svg = report::svg_chart(
        &format!(
            "Read-after-write: {} users, {} feed reads per write, think {}, {} per cell",
            args.users,
            args.feed_reads,
            humantime::format_duration(args.think),
            humantime::format_duration(args.duration)
        ),
        &mode_names,
        &[
            panel(
                "Stale reads: the user's own row older than the user's last write (% of reads)",
                |r| r.stale_pct,
            ),
            panel("Reads served by replicas (%)", |r| r.replica_pct),
        ],
    );
    let svg_path = args
        .svg
        .clone()
        .unwrap_or_else(|| workspace_path("docs/bench-ryw.svg"));
    report::write(&svg_path, &svg)?;
    eprintln!(
        "wrote {}/ryw.{{csv,json,md}} and {}",
        args.out.display(),
        svg_path.display()
    );
    Ok(())
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
        assert!(parse_mode("fast").is_err());
        assert_eq!(parse_profile("0").unwrap(), Profile::Delay(Duration::ZERO));
        assert_eq!(parse_profile("paused").unwrap(), Profile::Paused);
        assert_eq!(
            profile_name(Profile::Delay(Duration::from_millis(10))),
            "lag 10ms"
        );
        assert_eq!(profile_name(Profile::Delay(Duration::ZERO)), "lag 0");
    }

    #[test]
    fn pgpool_modes_run_unnamed() {
        for m in ["pgpool-dml_adaptive", "pgpool-transaction", "pgpool-always"] {
            let m = parse_mode(m).unwrap();
            assert_eq!(Statements::for_mode(m, false), Statements::Unnamed);
        }
        for m in [Mode::Tidemark, parse_mode("naive").unwrap()] {
            assert_eq!(Statements::for_mode(m, false), Statements::Prepared);
            assert_eq!(Statements::for_mode(m, true), Statements::Unnamed);
        }
    }
}
