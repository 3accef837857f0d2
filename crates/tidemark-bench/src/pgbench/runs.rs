//! Running the benchmark: starting each target, pgbench runs over repetitions, idle-client memory.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tidemark_cluster::Cluster;
use tokio_postgres::NoTls;

use super::{workloads, Bins, Memory, PgbenchArgs, RunResult, Target, Workload};
use crate::procs::{self, ProcGuard, PGPOOL_CHILDREN};
use crate::report::{f0, f2, percentile};

/// Runs pgbench once and reads tps, average latency and (from the per-transaction log) p99.
/// With several ports (target `direct-replicas`) one pgbench per port runs at the same time,
/// the clients split between them: tps adds up, latency is weighted by each one's tps, p99 is
/// taken over every transaction logged.
async fn pgbench_once(
    pgbench: &Path,
    ports: &[u16],
    w: &Workload,
    duration: Duration,
) -> Result<(f64, f64, f64)> {
    let parts = split_clients(w.clients, ports.len());
    // Two pgbench threads in all (one per core here), however many processes share them.
    let threads = (2 / parts.len() as u32).max(1);
    let mut runs = tokio::task::JoinSet::new();
    for (&clients, &port) in parts.iter().zip(ports) {
        let (pgbench, w) = (pgbench.to_path_buf(), w.clone());
        let threads = threads.min(clients);
        runs.spawn(
            async move { pgbench_part(&pgbench, port, &w, clients, threads, duration).await },
        );
    }
    let mut tps = 0.0;
    let mut weighted = 0.0;
    let mut lats: Vec<u32> = Vec::new();
    while let Some(r) = runs.join_next().await {
        let (t, lat, mut l) = r.context("a pgbench task panicked")??;
        tps += t;
        weighted += t * lat;
        lats.append(&mut l);
    }
    lats.sort_unstable();
    let lat = if tps > 0.0 { weighted / tps } else { f64::NAN };
    Ok((tps, lat, percentile(&lats, 99.0) as f64 / 1000.0))
}

/// `clients` split as evenly as they go over `n` pgbench processes (none gets 0).
fn split_clients(clients: u32, n: usize) -> Vec<u32> {
    let n = (n as u32).clamp(1, clients.max(1));
    (0..n)
        .map(|i| clients / n + u32::from(i < clients % n))
        .collect()
}

/// One pgbench process: tps, average latency and every transaction's latency (µs).
async fn pgbench_part(
    pgbench: &Path,
    port: u16,
    w: &Workload,
    clients: u32,
    threads: u32,
    duration: Duration,
) -> Result<(f64, f64, Vec<u32>)> {
    let logdir = tempfile::Builder::new()
        .prefix("tidemark-bench-pgbench")
        .tempdir()
        .context("creating a log directory")?;
    let prefix = logdir.path().join("log");
    let out = tokio::process::Command::new(pgbench)
        .args(["-h", "127.0.0.1", "-U", "postgres", "-n"])
        .arg("-p")
        .arg(port.to_string())
        .arg("-T")
        .arg(duration.as_secs().max(1).to_string())
        .arg("-c")
        .arg(clients.to_string())
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
    Ok((tps, lat, lats))
}

/// A running target: the process (none for direct) and its files. Fields drop in order: the
/// process stops before its directory is removed.
struct Running {
    guard: Option<ProcGuard>,
    _dir: Option<tempfile::TempDir>,
    /// Where pgbench connects: one port, or (`direct-replicas`) one per replica.
    ports: Vec<u16>,
}

/// Starts whatever serves `target`.
async fn start_target(t: Target, cluster: &Cluster, bins: &Bins, dir: &Path) -> Result<Running> {
    if let Some(opts) = t.tidemark() {
        let bin = if t == Target::TidemarkAlt {
            bins.tidemark_alt.as_deref()
        } else {
            bins.tidemark.as_deref()
        }
        .context("no tidemark binary")?;
        let tag = format!("{t:?}").to_lowercase();
        let (g, port) = procs::start_tidemark(bin, cluster, &opts, dir, &tag).await?;
        return Ok(Running {
            guard: Some(g),
            _dir: None,
            ports: vec![port],
        });
    }
    match t {
        Target::Direct => Ok(Running {
            guard: None,
            _dir: None,
            ports: vec![cluster.port(0)],
        }),
        Target::DirectReplicas => Ok(Running {
            guard: None,
            _dir: None,
            ports: (1..cluster.node_count()).map(|i| cluster.port(i)).collect(),
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
                ports: vec![port],
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
                ports: vec![port],
            })
        }
        Target::Pipe => {
            let (g, port) = procs::start_pipe(cluster, dir).await?;
            Ok(Running {
                guard: Some(g),
                _dir: None,
                ports: vec![port],
            })
        }
        _ => bail!("unhandled target {t:?}"),
    }
}

pub(super) async fn run_all(
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
            let ports = running.ports.clone();
            // The proxy's own CPU per statement (one process: tidemark, PgBouncer).
            let pid = match t {
                Target::Direct | Target::DirectReplicas | Target::Pgpool => None,
                _ => running.guard.as_ref().map(|g| g.pid()),
            };
            for w in wl.iter().filter(|w| w.applies_to(t)) {
                let cpu_before = pid.and_then(procs::cpu_us);
                let machine_before = procs::machine_cpu_us();
                let r = pgbench_once(&bins.pgbench, &ports, w, args.duration).await;
                let machine_after = procs::machine_cpu_us();
                let cpu_after = pid.and_then(procs::cpu_us);
                let rr = match r {
                    Ok((tps, lat, p99)) => {
                        let statements = tps * args.duration.as_secs_f64() * w.statements();
                        let per = |a: u64, b: u64| {
                            if statements > 0.0 {
                                b.saturating_sub(a) as f64 / statements
                            } else {
                                f64::NAN
                            }
                        };
                        let (cpu_user_us, cpu_sys_us) = match (cpu_before, cpu_after) {
                            (Some((u0, s0)), Some((u1, s1))) => (per(u0, u1), per(s0, s1)),
                            _ => (f64::NAN, f64::NAN),
                        };
                        // (The samples span pgbench's whole run, connecting included: the
                        // same for every target.)
                        let (machine_us, idle_pct) = match (machine_before, machine_after) {
                            (Some((b0, i0)), Some((b1, i1))) => {
                                let (busy, idle) = (b1.saturating_sub(b0), i1.saturating_sub(i0));
                                let all = (busy + idle) as f64;
                                (
                                    per(b0, b1),
                                    if all > 0.0 {
                                        100.0 * idle as f64 / all
                                    } else {
                                        f64::NAN
                                    },
                                )
                            }
                            _ => (f64::NAN, f64::NAN),
                        };
                        RunResult {
                            rep,
                            target: t,
                            workload: w.name.into(),
                            clients: w.clients,
                            tps,
                            lat_avg_ms: lat,
                            lat_p99_ms: p99,
                            cpu_user_us,
                            cpu_sys_us,
                            machine_us,
                            idle_pct,
                            error: None,
                        }
                    }
                    Err(e) => RunResult {
                        rep,
                        target: t,
                        workload: w.name.into(),
                        clients: w.clients,
                        tps: f64::NAN,
                        lat_avg_ms: f64::NAN,
                        lat_p99_ms: f64::NAN,
                        cpu_user_us: f64::NAN,
                        cpu_sys_us: f64::NAN,
                        machine_us: f64::NAN,
                        idle_pct: f64::NAN,
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
                Target::TidemarkSession | Target::TidemarkAlt | Target::Pgbouncer | Target::Pgpool
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
    let port = running.ports[0];
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

#[cfg(test)]
mod tests {
    use super::split_clients;

    #[test]
    fn clients_are_split_evenly_and_none_gets_zero() {
        assert_eq!(split_clients(8, 2), vec![4, 4]);
        assert_eq!(split_clients(9, 2), vec![5, 4]);
        assert_eq!(split_clients(32, 3), vec![11, 11, 10]);
        // Fewer clients than replicas: one each, not a pgbench with none.
        assert_eq!(split_clients(1, 2), vec![1]);
        assert_eq!(split_clients(8, 1), vec![8]);
    }
}
