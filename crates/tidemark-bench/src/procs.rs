//! Owns the processes the benchmarks start besides the PostgreSQL cluster: tidemark, PgBouncer
//! and Pgpool-II. Each runs in its own process group behind a [`ProcGuard`] that stops the whole
//! group on drop (also when a benchmark fails half-way), plus the helpers they need: free ports,
//! the unprivileged account, config files, readiness checks and memory readings from `/proc`.

use std::fs;
use std::os::unix::fs::chown;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tidemark_cluster::Cluster;
use tokio_postgres::NoTls;

/// A started process (the leader of its own process group). Dropping it sends SIGTERM to the
/// group, waits up to 3 s, then SIGKILLs whatever is left.
pub struct ProcGuard {
    pub name: String,
    child: Option<Child>,
    pub log: PathBuf,
}

impl ProcGuard {
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Fails with the tail of the log if the process has already exited.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(c) = self.child.as_mut() {
            if let Some(status) = c.try_wait().context("waiting for a child process")? {
                bail!(
                    "{} exited early ({status}); last log lines:\n{}",
                    self.name,
                    tail(&self.log, 15)
                );
            }
        }
        Ok(())
    }

    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pgid = child.id() as i32;
        // SAFETY: kill(2) with a negative pid signals the process group we created for this
        // child (process_group(0) at spawn); it has no memory-safety preconditions.
        unsafe {
            libc::kill(-pgid, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // Leftovers in the group (e.g. Pgpool-II children) and a leader that ignored SIGTERM.
        // SAFETY: as above.
        unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for ProcGuard {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Spawns `cmd` in a new process group, stdout and stderr to `log`.
pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> Result<ProcGuard> {
    let out = fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let err = out.try_clone().context("duplicating a log file handle")?;
    cmd.stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0);
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {name} ({cmd:?})"))?;
    Ok(ProcGuard {
        name: name.to_string(),
        child: Some(child),
        log: log.to_path_buf(),
    })
}

pub fn tail(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A free TCP port on 127.0.0.1 (bound and released; fine for a benchmark).
pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("binding a free port")?;
    Ok(l.local_addr().context("reading a bound port")?.port())
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// uid and gid of `name` from /etc/passwd.
pub fn lookup_account(name: &str) -> Option<(u32, u32)> {
    let text = fs::read_to_string("/etc/passwd").ok()?;
    text.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        if f.len() > 3 && f[0] == name {
            Some((f[2].parse().ok()?, f[3].parse().ok()?))
        } else {
            None
        }
    })
}

/// A scratch directory for a proxy's files, owned by `owner` when given.
pub fn scratch_dir(prefix: &str, owner: Option<(u32, u32)>) -> Result<tempfile::TempDir> {
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .context("creating a temporary directory")?;
    if let Some((u, g)) = owner {
        chown(dir.path(), Some(u), Some(g))
            .with_context(|| format!("chown {}", dir.path().display()))?;
    }
    Ok(dir)
}

pub fn write_file(path: &Path, text: &str, owner: Option<(u32, u32)>) -> Result<()> {
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    if let Some((u, g)) = owner {
        chown(path, Some(u), Some(g)).with_context(|| format!("chown {}", path.display()))?;
    }
    Ok(())
}

/// Finds a program in PATH or the sbin directories Debian installs daemons to.
pub fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/sbin", "/usr/bin", "/sbin", "/usr/local/sbin"])
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file());
    found
}

/// Finds `program`, installing the Debian `package` with apt-get when it is missing and we are
/// root. `None` (with a message) when it cannot be had.
pub fn ensure_program(program: &str, package: &str) -> Option<PathBuf> {
    if let Some(p) = find_program(program) {
        return Some(p);
    }
    if !is_root() {
        eprintln!(
            "  {program} not found and not root: skipping it (install with `sudo apt-get install -y {package}`)"
        );
        return None;
    }
    eprintln!("  {program} not found: apt-get install -y {package}");
    let ok = Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends", package])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        let _ = Command::new("apt-get").args(["update", "-qq"]).status();
        let _ = Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends", package])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status();
    }
    // Debian starts a default service for some packages; we run our own instances.
    let _ = Command::new("service")
        .args([package, "stop"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    let found = find_program(program);
    if found.is_none() {
        eprintln!("  installing {package} failed: skipping {program}");
    }
    found
}

/// Waits until a PostgreSQL-speaking server on `port` answers `SELECT 1` as `postgres`.
pub async fn wait_connectable(port: u16, timeout: Duration, guard: &mut ProcGuard) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let conninfo =
        format!("host=127.0.0.1 port={port} user=postgres dbname=postgres connect_timeout=2");
    loop {
        guard.check_alive()?;
        let attempt = async {
            let (client, conn) = tokio_postgres::connect(&conninfo, NoTls).await?;
            let h = tokio::spawn(conn);
            let r = client.simple_query("SELECT 1").await;
            drop(client);
            let _ = h.await;
            r.map(|_| ())
        };
        match tokio::time::timeout(Duration::from_secs(3), attempt).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) if Instant::now() >= deadline => {
                bail!(
                    "{} on port {port} not ready after {timeout:?}: {e}; log:\n{}",
                    guard.name,
                    tail(&guard.log, 15)
                )
            }
            Err(_) if Instant::now() >= deadline => bail!(
                "{} on port {port} not ready after {timeout:?} (connect timed out); log:\n{}",
                guard.name,
                tail(&guard.log, 15)
            ),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// How tidemark is configured for one benchmark target.
#[derive(Clone, Debug)]
pub struct TidemarkOpts {
    pub consistency: &'static str,
    pub track_writes: bool,
    pub max_wait: String,
    /// routing.wait: `adaptive` or `fixed`.
    pub wait: String,
    /// routing.transactions: `read_only`, `optimistic` or `primary`.
    pub transactions: String,
}

/// The tidemark binary: `--tidemark-bin`, else next to this executable. Unless told not to,
/// first runs `cargo build --release -p tidemark` so the binary matches the sources.
pub fn tidemark_binary(explicit: Option<&Path>, build: bool) -> Result<PathBuf> {
    if let Some(p) = explicit {
        if !p.is_file() {
            bail!("--tidemark-bin {}: no such file", p.display());
        }
        return Ok(p.to_path_buf());
    }
    let exe = std::env::current_exe().context("locating the tidemark-bench executable")?;
    let dir = exe
        .parent()
        .context("the tidemark-bench executable has no parent directory")?;
    let bin = dir.join("tidemark");
    if build {
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        if workspace.join("Cargo.toml").is_file() {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let profile_flag = if dir.ends_with("release") {
                vec!["--release"]
            } else {
                vec![]
            };
            eprintln!("building the tidemark binary (cargo build -p tidemark)...");
            let status = Command::new(&cargo)
                .arg("build")
                .args(&profile_flag)
                .args(["-p", "tidemark", "--bin", "tidemark"])
                .current_dir(&workspace)
                .status();
            match status {
                Ok(s) if s.success() => {}
                Ok(s) => bail!("cargo build -p tidemark failed ({s})"),
                Err(e) => eprintln!("  could not run cargo ({e}); using the existing binary"),
            }
        }
    }
    if !bin.is_file() {
        bail!(
            "{} not found: build it with `cargo build --release -p tidemark`, or pass --tidemark-bin",
            bin.display()
        );
    }
    Ok(bin)
}

/// Writes a tidemark config for `cluster` and starts tidemark on a free port; returns once it
/// answers queries and its monitor has had time to sample every node.
pub async fn start_tidemark(
    bin: &Path,
    cluster: &Cluster,
    opts: &TidemarkOpts,
    dir: &Path,
    tag: &str,
) -> Result<(ProcGuard, u16)> {
    let port = free_port()?;
    let mut toml = format!("listen = \"127.0.0.1:{port}\"\nadmin_users = [\"postgres\"]\n\n");
    for i in 0..cluster.node_count() {
        toml.push_str(&format!(
            "[[nodes]]\nname = \"{}\"\nhost = \"{}\"\nport = {}\n\n",
            cluster.node_name(i),
            cluster.host(),
            cluster.port(i)
        ));
    }
    toml.push_str(&format!(
        "[[users]]\nname = \"postgres\"\nauth = \"trust\"\n\n\
         [pool]\nmode = \"transaction\"\nmax_size = 40\n\n\
         [routing]\nconsistency = \"{}\"\ntrack_writes = {}\nmax_wait = \"{}\"\nwait = \"{}\"\ntransactions = \"{}\"\n\n\
         [limits]\nmax_clients = 12000\n\n\
         [metrics]\nlisten = \"127.0.0.1:{}\"\n",
        opts.consistency,
        opts.track_writes,
        opts.max_wait,
        opts.wait,
        opts.transactions,
        // Measured as deployed: with the Prometheus endpoint on.
        free_port()?
    ));
    let cfg = dir.join(format!("tidemark-{tag}.toml"));
    write_file(&cfg, &toml, None)?;
    let mut cmd = Command::new(bin);
    cmd.arg("--config").arg(&cfg);
    if std::env::var_os("RUST_LOG").is_none() {
        cmd.env("RUST_LOG", "warn");
    }
    let mut guard = spawn(
        &format!("tidemark ({tag})"),
        cmd,
        &dir.join(format!("tidemark-{tag}.log")),
    )?;
    wait_connectable(port, Duration::from_secs(20), &mut guard).await?;
    // Let the monitor take a few samples of every node before measuring.
    tokio::time::sleep(Duration::from_millis(500)).await;
    guard.check_alive()?;
    Ok((guard, port))
}

/// Starts `tidemark-bench pipe` (this binary) on a free port, piping every client to the
/// primary.
pub async fn start_pipe(cluster: &Cluster, dir: &Path) -> Result<(ProcGuard, u16)> {
    let port = free_port()?;
    let exe = std::env::current_exe().context("locating tidemark-bench itself")?;
    let mut cmd = Command::new(exe);
    cmd.arg("pipe")
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--server")
        .arg(format!("{}:{}", cluster.host(), cluster.port(0)));
    let mut guard = spawn("pipe", cmd, &dir.join("pipe.log"))?;
    wait_connectable(port, Duration::from_secs(15), &mut guard).await?;
    Ok((guard, port))
}

/// Starts PgBouncer (transaction pooling, primary only) on a free port, as the `postgres`
/// account when we are root (PgBouncer refuses to run as root).
pub async fn start_pgbouncer(
    bin: &Path,
    cluster: &Cluster,
    dir: &Path,
    owner: Option<(u32, u32)>,
) -> Result<(ProcGuard, u16)> {
    let port = free_port()?;
    let d = dir.display();
    // Besides the primary's two names, one entry per node (`pgbouncer_node_db`): the ryw
    // bench's `naive-pgbouncer` splits reads over the replicas' pools.
    let nodes: String = (0..cluster.node_count())
        .map(|i| {
            format!(
                "{} = host={} port={} dbname=postgres\n",
                pgbouncer_node_db(i),
                cluster.host(),
                cluster.port(i)
            )
        })
        .collect();
    let ini = format!(
        "[databases]\n\
         postgres = host={host} port={pport} dbname=postgres\n\
         pgbench = host={host} port={pport} dbname=postgres\n\
         {nodes}\n\
         [pgbouncer]\n\
         listen_addr = 127.0.0.1\n\
         listen_port = {port}\n\
         unix_socket_dir =\n\
         auth_type = trust\n\
         auth_file = {d}/userlist.txt\n\
         pool_mode = transaction\n\
         max_client_conn = 12000\n\
         default_pool_size = 40\n\
         logfile = {d}/pgbouncer.log\n\
         pidfile = {d}/pgbouncer.pid\n\
         admin_users = postgres\n\
         ignore_startup_parameters = extra_float_digits,options\n",
        host = cluster.host(),
        pport = cluster.port(0),
    );
    let ini_path = dir.join("pgbouncer.ini");
    write_file(&ini_path, &ini, owner)?;
    write_file(&dir.join("userlist.txt"), "\"postgres\" \"\"\n", owner)?;
    let mut cmd = Command::new(bin);
    cmd.arg(&ini_path);
    if let Some((u, g)) = owner {
        cmd.uid(u).gid(g);
    }
    let mut guard = spawn("pgbouncer", cmd, &dir.join("pgbouncer.stderr"))?;
    wait_connectable(port, Duration::from_secs(15), &mut guard).await?;
    Ok((guard, port))
}

/// The database name of node `i`'s pool in the PgBouncer that `start_pgbouncer` configures.
pub fn pgbouncer_node_db(i: usize) -> String {
    format!("node{i}")
}

/// Number of Pgpool-II child processes (= the most concurrent clients it serves).
pub const PGPOOL_CHILDREN: usize = 64;

/// Starts Pgpool-II in streaming-replication mode with load balancing over all nodes.
pub async fn start_pgpool(
    bin: &Path,
    cluster: &Cluster,
    dir: &Path,
    owner: Option<(u32, u32)>,
    disable_lb_on_write: &str,
) -> Result<(ProcGuard, u16)> {
    let port = free_port()?;
    let pcp_port = free_port()?;
    let d = dir.display();
    let mut conf = format!(
        "backend_clustering_mode = 'streaming_replication'\n\
         listen_addresses = '127.0.0.1'\n\
         port = {port}\n\
         unix_socket_directories = '{d}'\n\
         pcp_listen_addresses = ''\n\
         pcp_port = {pcp_port}\n\
         pcp_socket_dir = '{d}'\n\
         num_init_children = {PGPOOL_CHILDREN}\n\
         max_pool = 1\n\
         child_life_time = 0\n\
         child_max_connections = 0\n\
         connection_life_time = 0\n\
         client_idle_limit = 0\n\
         connection_cache = on\n\
         load_balance_mode = on\n\
         disable_load_balance_on_write = '{disable_lb_on_write}'\n\
         statement_level_load_balance = off\n\
         read_only_function_list = 'pg_is_in_recovery'\n\
         sr_check_period = 10\n\
         sr_check_user = 'postgres'\n\
         sr_check_password = ''\n\
         health_check_period = 0\n\
         failover_on_backend_error = off\n\
         enable_pool_hba = off\n\
         pool_passwd = ''\n\
         allow_clear_text_frontend_auth = off\n\
         use_watchdog = off\n\
         memory_cache_enabled = off\n\
         log_destination = 'stderr'\n\
         logging_collector = off\n\
         log_min_messages = warning\n\
         logdir = '{d}'\n\
         pid_file_name = '{d}/pgpool.pid'\n"
    );
    for i in 0..cluster.node_count() {
        conf.push_str(&format!(
            "backend_hostname{i} = '{}'\nbackend_port{i} = {}\nbackend_weight{i} = 1\n\
             backend_data_directory{i} = '{}'\nbackend_flag{i} = 'DISALLOW_TO_FAILOVER'\n\
             backend_application_name{i} = '{}'\n",
            cluster.host(),
            cluster.port(i),
            cluster.data_dir(i).display(),
            cluster.node_name(i)
        ));
    }
    let conf_path = dir.join("pgpool.conf");
    write_file(&conf_path, &conf, owner)?;
    let pcp = dir.join("pcp.conf");
    write_file(&pcp, "", owner)?;
    let hba = dir.join("pool_hba.conf");
    write_file(&hba, "host all all 127.0.0.1/32 trust\n", owner)?;
    let mut cmd = Command::new(bin);
    cmd.arg("-n")
        .arg("-D")
        .arg("-f")
        .arg(&conf_path)
        .arg("-F")
        .arg(&pcp)
        .arg("-a")
        .arg(&hba);
    if let Some((u, g)) = owner {
        cmd.uid(u).gid(g);
    }
    let mut guard = spawn(
        &format!("pgpool ({disable_lb_on_write})"),
        cmd,
        &dir.join("pgpool.log"),
    )?;
    wait_connectable(port, Duration::from_secs(30), &mut guard).await?;
    Ok((guard, port))
}

/// VmRSS of `pid` in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    field_kib(&text, "VmRSS:")
}

fn field_kib(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// User and system CPU time `pid` has used so far, in microseconds (`/proc/<pid>/stat`).
pub fn cpu_us(pid: u32) -> Option<(u64, u64)> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command start with the state (field 3); utime and
    // stime are fields 14 and 15, in clock ticks.
    let rest = &s[s.rfind(')')? + 2..];
    let mut f = rest.split_whitespace().skip(11);
    let user: u64 = f.next()?.parse().ok()?;
    let sys: u64 = f.next()?.parse().ok()?;
    let us = ticks_to_us()?;
    Some((us(user), us(sys)))
}

/// Converts the kernel's clock ticks (`/proc` CPU times) to microseconds.
fn ticks_to_us() -> Option<impl Fn(u64) -> u64> {
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = u64::try_from(hz).ok().filter(|h| *h > 0)?;
    Some(move |t: u64| t * 1_000_000 / hz)
}

/// The whole machine's busy and idle CPU time so far, summed over its cores, in microseconds
/// (the `cpu` line of `/proc/stat`: busy is user, nice, system, irq, softirq and steal; idle is
/// idle and iowait).
pub fn machine_cpu_us() -> Option<(u64, u64)> {
    let s = fs::read_to_string("/proc/stat").ok()?;
    parse_machine_cpu(s.lines().next()?)
}

fn parse_machine_cpu(line: &str) -> Option<(u64, u64)> {
    let mut f = line.split_whitespace();
    if f.next()? != "cpu" {
        return None;
    }
    let v: Vec<u64> = f.take(8).map(|x| x.parse().ok()).collect::<Option<_>>()?;
    let [user, nice, system, idle, iowait, irq, softirq, steal] = v[..] else {
        return None;
    };
    let us = ticks_to_us()?;
    Some((
        us(user + nice + system + irq + softirq + steal),
        us(idle + iowait),
    ))
}

/// Pids of every process in process group `pgid`.
pub fn group_pids(pgid: u32) -> Vec<u32> {
    let Ok(rd) = fs::read_dir("/proc") else {
        return vec![];
    };
    rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| {
                    // Fields after the parenthesised command: state ppid pgrp ...
                    let rest = &s[s.rfind(')')? + 2..];
                    rest.split_whitespace().nth(2)?.parse::<u32>().ok()
                })
                == Some(pgid)
        })
        .collect()
}

/// Sum of VmRSS and of Pss (proportional: shared pages divided among sharers) over a process
/// group, in KiB.
pub fn group_memory_kib(pgid: u32) -> (u64, u64) {
    let mut rss = 0;
    let mut pss = 0;
    for pid in group_pids(pgid) {
        rss += rss_kib(pid).unwrap_or(0);
        if let Ok(t) = fs::read_to_string(format!("/proc/{pid}/smaps_rollup")) {
            pss += field_kib(&t, "Pss:").unwrap_or(0);
        }
    }
    (rss, pss)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_cpu_line() {
        // SAFETY: sysconf only reads a configuration value.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
        let (busy, idle) =
            parse_machine_cpu("cpu  100 5 50 1000 20 3 2 10 0 0").expect("a cpu line");
        assert_eq!(busy, (100 + 5 + 50 + 3 + 2 + 10) * 1_000_000 / hz);
        assert_eq!(idle, (1000 + 20) * 1_000_000 / hz);
        assert_eq!(parse_machine_cpu("cpu0 1 2 3 4 5 6 7 8"), None);
        assert_eq!(parse_machine_cpu("cpu 1 2 x 4 5 6 7 8"), None);
        assert_eq!(parse_machine_cpu("cpu 1 2 3"), None);
        assert!(machine_cpu_us().is_some());
    }
}
