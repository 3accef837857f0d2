//! Owns [`Cluster`]: creating the primary and replicas, starting/stopping/killing/promoting nodes,
//! SQL helpers for replay control, and guaranteed teardown on drop.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::config::{ClusterConfig, ReplicaConfig};
use crate::env::{log_since, Env};
use crate::{bindir, os, pgconf, ClusterError};

/// Name of the marker file in every base directory we create.
pub const MARKER_FILE: &str = "tidemark-cluster.toml";

const HOST: &str = "127.0.0.1";
const SUPERUSER: &str = "postgres";
const START_TIMEOUT_SECS: u32 = 60;
const STREAM_TIMEOUT: Duration = Duration::from_secs(30);
const PORT_ATTEMPTS: usize = 5;

#[derive(Debug)]
struct Node {
    name: String,
    port: u16,
    dir: PathBuf,
    log: PathBuf,
    /// Postmaster pid from the last start we did (kept after the pid file is gone).
    pid: Option<i32>,
}

/// What to remove on drop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cleanup {
    /// `keep` was set: leave everything.
    Keep,
    /// We created the directory: remove it.
    RemoveDir,
    /// The caller gave an existing (empty or ours) directory: remove its contents only.
    RemoveContents,
}

/// A running local PostgreSQL primary (node 0) with streaming replicas (nodes 1..=N).
///
/// Servers listen on `127.0.0.1` on free ports, trust the `postgres` superuser, and require an
/// md5/SCRAM password from every other user. When the process is root, servers run as the
/// `postgres` account (or a created `tidemark-pg` one). Dropping the cluster stops every server
/// (immediate shutdown, then SIGKILL of leftovers) and removes the directory unless
/// [`ClusterConfig::keep`] was set — also while a test panics.
///
/// Methods taking a node index panic if it is out of range (`0..node_count()`).
#[derive(Debug)]
pub struct Cluster {
    env: Env,
    nodes: Vec<Node>,
    cleanup: Cleanup,
}

impl Cluster {
    /// Creates and starts the cluster, returning once every replica is streaming.
    ///
    /// See [`ClusterConfig::data_dir`] for what happens to an existing directory.
    pub fn start(cfg: ClusterConfig) -> Result<Cluster, ClusterError> {
        let bindir = bindir::find_bindir()?;
        let major = bindir::check_version(&bindir)?;
        let run_as = os::run_as()?;
        let (base, created) = prepare_base(cfg.data_dir.as_deref(), &bindir, run_as)?;
        let cleanup = match (cfg.keep, created) {
            (true, _) => Cleanup::Keep,
            (false, true) => Cleanup::RemoveDir,
            (false, false) => Cleanup::RemoveContents,
        };
        // From here on, dropping `cluster` tears down whatever was started.
        let mut cluster = Cluster {
            env: Env {
                bindir,
                major,
                run_as,
                base,
            },
            nodes: Vec::new(),
            cleanup,
        };
        let started = Instant::now();
        cluster.boot(&cfg)?;
        tracing::info!(
            base = %cluster.env.base.display(),
            nodes = cluster.nodes.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "local PostgreSQL cluster started"
        );
        Ok(cluster)
    }

    fn boot(&mut self, cfg: &ClusterConfig) -> Result<(), ClusterError> {
        let env = self.env.clone();
        os::write_owned(
            &env.base.join(MARKER_FILE),
            &format!(
                "# Created by tidemark-cluster; tidemark-cluster may wipe this directory.\n\
                 nodes = {}\n",
                1 + cfg.replicas.len()
            ),
            env.run_as,
        )?;
        check_reachable(&env)?;

        // Primary.
        let mut primary = new_node(&env, 0, "primary".to_string())?;
        let mut initdb = env.server_cmd("initdb");
        initdb.arg("-D").arg(&primary.dir).args([
            "-U",
            SUPERUSER,
            "--auth=trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ]);
        env.run(initdb, &env.perm_hint(), String::new)?;
        let conf_path = primary.dir.join("postgresql.conf");
        let mut conf = std::fs::read_to_string(&conf_path)
            .map_err(|e| ClusterError::io(format!("read {}", conf_path.display()), e))?;
        conf.push_str(&pgconf::shared_conf(cfg, &env.base));
        os::write_owned(&conf_path, &conf, env.run_as)?;
        os::write_owned(
            &primary.dir.join("pg_hba.conf"),
            &pgconf::hba_conf(),
            env.run_as,
        )?;
        start_with_port_retry(&env, 0, &mut primary, None)?;
        let primary_port = primary.port;
        self.nodes.push(primary);

        if cfg.replicas.is_empty() {
            return Ok(());
        }
        let names: Vec<String> = (1..=cfg.replicas.len())
            .map(|i| format!("replica_{i}"))
            .collect();
        let slots: Vec<String> = names
            .iter()
            .map(|n| format!("pg_create_physical_replication_slot('{n}', true)"))
            .collect();
        self.psql(0, &format!("SELECT {}", slots.join(", ")))?;

        // Replicas, in parallel: base backup, configure, start.
        let results: Vec<Result<Node, ClusterError>> = std::thread::scope(|scope| {
            let handles: Vec<_> = cfg
                .replicas
                .iter()
                .zip(&names)
                .enumerate()
                .map(|(k, (rcfg, name))| {
                    let env = &env;
                    scope.spawn(move || make_replica(env, k + 1, name, rcfg, primary_port))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(ClusterError::InvalidArgument(
                            "a replica setup thread panicked".to_string(),
                        ))
                    })
                })
                .collect()
        });
        let mut first_err = None;
        for r in results {
            match r {
                Ok(node) if first_err.is_none() => self.nodes.push(node),
                Ok(node) => {
                    // Keep node indexes dense; still make sure it gets torn down.
                    stop_node_hard(&env, &node);
                }
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first_err {
            return Err(e);
        }

        let sync: Vec<String> = cfg
            .replicas
            .iter()
            .zip(&names)
            .filter(|(r, _)| r.synchronous)
            .map(|(_, n)| n.clone())
            .collect();
        if let Some(value) = pgconf::sync_standby_names(&sync) {
            self.psql(
                0,
                &format!(
                    "ALTER SYSTEM SET synchronous_standby_names = {}",
                    pgconf::quote(&value)
                ),
            )?;
            self.psql(0, "SELECT pg_reload_conf()")?;
        }
        self.wait_all_streaming(&names, STREAM_TIMEOUT)
    }

    fn wait_all_streaming(&self, names: &[String], timeout: Duration) -> Result<(), ClusterError> {
        let list: Vec<String> = names.iter().map(|n| pgconf::quote(n)).collect();
        let sql = format!(
            "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming' \
             AND application_name IN ({})",
            list.join(", ")
        );
        let want = names.len().to_string();
        self.poll(
            0,
            &sql,
            |v| v == want,
            timeout,
            &format!("{} replica(s) to stream from the primary", names.len()),
        )
    }

    /// Number of nodes: 1 + replicas. Node 0 is the initial primary.
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// The address every server listens on: `127.0.0.1`.
    pub fn host(&self) -> &str {
        HOST
    }

    /// TCP port of node `i`.
    pub fn port(&self, i: usize) -> u16 {
        self.node(i).port
    }

    /// The superuser name, `postgres` (trusted from 127.0.0.1, no password).
    pub fn superuser(&self) -> &str {
        SUPERUSER
    }

    /// libpq key=value connection string for node `i` as the superuser.
    pub fn dsn(&self, i: usize) -> String {
        format!(
            "host={HOST} port={} user={SUPERUSER} dbname=postgres",
            self.port(i)
        )
    }

    /// `postgres://` URL for node `i` as the superuser.
    pub fn url(&self, i: usize) -> String {
        format!("postgres://{SUPERUSER}@{HOST}:{}/postgres", self.port(i))
    }

    /// Data directory of node `i`.
    pub fn data_dir(&self, i: usize) -> PathBuf {
        self.node(i).dir.clone()
    }

    /// Server log file of node `i`.
    pub fn log_path(&self, i: usize) -> PathBuf {
        self.node(i).log.clone()
    }

    /// `cluster_name` / `application_name` of node `i`: `primary` or `replica_<i>`.
    pub fn node_name(&self, i: usize) -> &str {
        &self.node(i).name
    }

    /// The base directory holding all nodes, logs and unix sockets.
    pub fn base_dir(&self) -> &Path {
        &self.env.base
    }

    /// The PostgreSQL bin directory in use.
    pub fn bindir(&self) -> &Path {
        &self.env.bindir
    }

    /// Runs `sql` on node `i` with `psql -XAtq -v ON_ERROR_STOP=1 -c` as the superuser and
    /// returns its trimmed stdout (rows on lines, columns separated by `|`).
    pub fn psql(&self, i: usize, sql: &str) -> Result<String, ClusterError> {
        let port = self.port(i);
        let mut cmd = self.env.client_cmd("psql");
        cmd.args([
            "-XAtq",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            HOST,
            "-U",
            SUPERUSER,
        ])
        .args(["-d", "postgres", "-p"])
        .arg(port.to_string())
        .arg("-c")
        .arg(sql)
        .env("PGCONNECT_TIMEOUT", "10");
        let out = cmd.output().map_err(|e| {
            ClusterError::io(
                format!(
                    "could not run {} (check PG_BINDIR / the postgresql install)",
                    self.env.bindir.join("psql").display()
                ),
                e,
            )
        })?;
        if !out.status.success() {
            return Err(ClusterError::Sql {
                node: i,
                port,
                sql: sql.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Pauses WAL replay on replica `i` and waits until it has actually paused.
    pub fn pause_replay(&self, i: usize) -> Result<(), ClusterError> {
        self.psql(i, "SELECT pg_wal_replay_pause()")?;
        let (sql, want) = if self.env.major >= 14 {
            ("SELECT pg_get_wal_replay_pause_state()", "paused")
        } else {
            ("SELECT pg_is_wal_replay_paused()", "t")
        };
        self.poll(
            i,
            sql,
            |v| v == want,
            Duration::from_secs(10),
            "WAL replay to pause",
        )
    }

    /// Resumes WAL replay on replica `i`.
    pub fn resume_replay(&self, i: usize) -> Result<(), ClusterError> {
        self.psql(i, "SELECT pg_wal_replay_resume()")?;
        let (sql, want) = if self.env.major >= 14 {
            ("SELECT pg_get_wal_replay_pause_state()", "not paused")
        } else {
            ("SELECT pg_is_wal_replay_paused()", "f")
        };
        self.poll(
            i,
            sql,
            |v| v == want,
            Duration::from_secs(10),
            "WAL replay to resume",
        )
    }

    /// Sets `recovery_min_apply_delay` on replica `i` (ALTER SYSTEM + reload) and waits until
    /// the server reports the new value.
    pub fn set_apply_delay(&self, i: usize, d: Duration) -> Result<(), ClusterError> {
        let ms = pgconf::delay_ms(d);
        if ms > i32::MAX as u128 {
            return Err(ClusterError::InvalidArgument(format!(
                "apply delay {d:?} is too large; recovery_min_apply_delay is at most {} ms",
                i32::MAX
            )));
        }
        self.psql(
            i,
            &format!("ALTER SYSTEM SET recovery_min_apply_delay = '{ms}ms'"),
        )?;
        self.psql(i, "SELECT pg_reload_conf()")?;
        let want = ms.to_string();
        self.poll(
            i,
            "SELECT setting FROM pg_settings WHERE name = 'recovery_min_apply_delay'",
            |v| v == want,
            Duration::from_secs(10),
            "the new recovery_min_apply_delay to take effect",
        )
    }

    /// SIGKILLs node `i`'s postmaster (a crash), waits until it is gone, and kills any of its
    /// children that do not exit on their own. A no-op if the node is not running.
    pub fn kill(&mut self, i: usize) -> Result<(), ClusterError> {
        let node = self.node(i);
        let Some(pid) = running_pid(node) else {
            return Ok(());
        };
        let children = os::children_of(pid);
        if !os::kill_tree(pid, &children) {
            return Err(ClusterError::Timeout {
                what: format!("postmaster {pid} of node {i} to die after SIGKILL"),
                waited: Duration::from_secs(5),
                hint: format!("check `ps -p {pid}` and kill it by hand"),
            });
        }
        Ok(())
    }

    /// Stops node `i` with `pg_ctl stop -m fast`. A no-op if it is not running.
    pub fn stop(&mut self, i: usize) -> Result<(), ClusterError> {
        let node = self.node(i);
        let Some(pid) = running_pid(node) else {
            return Ok(());
        };
        let children = os::children_of(pid);
        let mut cmd = self.env.server_cmd("pg_ctl");
        cmd.args(["stop", "-m", "fast", "-w", "-t"])
            .arg(START_TIMEOUT_SECS.to_string())
            .arg("-D")
            .arg(&node.dir);
        let log = node.log.clone();
        self.env
            .run(cmd, "see the server log", || log_since(&log, 0))?;
        os::wait_gone(&children, Duration::from_secs(5));
        Ok(())
    }

    /// Starts node `i` again after [`kill`](Self::kill) or [`stop`](Self::stop)
    /// (`pg_ctl start -w`), on the same port. A no-op if it is already running.
    pub fn start_node(&mut self, i: usize) -> Result<(), ClusterError> {
        let env = self.env.clone();
        let node = self.node_mut(i);
        if running_pid(node).is_some() {
            return Ok(());
        }
        pg_ctl_start(&env, i, node)
    }

    /// Promotes replica `i` (`pg_ctl promote -w`) and waits until it has left recovery.
    pub fn promote(&self, i: usize) -> Result<(), ClusterError> {
        let node = self.node(i);
        let mut cmd = self.env.server_cmd("pg_ctl");
        cmd.args(["promote", "-w", "-t"])
            .arg(START_TIMEOUT_SECS.to_string())
            .arg("-D")
            .arg(&node.dir);
        let log = node.log.clone();
        self.env.run(
            cmd,
            "only a running replica can be promoted; see the server log",
            || log_since(&log, 0),
        )?;
        self.poll(
            i,
            "SELECT pg_is_in_recovery()",
            |v| v == "f",
            Duration::from_secs(30),
            "the promoted node to leave recovery",
        )
    }

    /// Turns node `i` (e.g. the old primary after node `primary` was promoted) into a streaming
    /// replica of node `primary` with `pg_rewind`, and returns once it streams.
    ///
    /// Stops node `i` (`-m fast`) if it runs; if it crashed (e.g. after [`kill`](Self::kill)),
    /// it is first recovered and shut down cleanly in single-user mode, as pg_rewind requires.
    /// Then rewinds it from `primary`, writes `standby.signal`, `primary_conninfo` (with
    /// `application_name` = [`node_name`](Self::node_name)`(i)`) and `primary_slot_name` (a
    /// physical slot of that name is created on `primary` if missing), and starts it on its
    /// own port. Afterwards [`current_lsn`](Self::current_lsn)`(i)` etc. use replica semantics
    /// (they ask the server whether it is in recovery).
    pub fn rejoin_as_replica(&mut self, i: usize, primary: usize) -> Result<(), ClusterError> {
        if i == primary {
            return Err(ClusterError::InvalidArgument(format!(
                "cannot rejoin node {i} as a replica of itself; pass the index of the new primary"
            )));
        }
        let count = self.nodes.len();
        if primary >= count {
            panic!("node index {primary} out of range: this cluster has {count} node(s)");
        }
        let in_recovery = self.psql(primary, "SELECT pg_is_in_recovery()")?;
        if in_recovery != "f" {
            return Err(ClusterError::InvalidArgument(format!(
                "node {primary} is not a primary (pg_is_in_recovery() = {in_recovery}); \
                 promote it first"
            )));
        }

        // pg_rewind wants a cleanly shut down target.
        if self.is_running(i) {
            self.stop(i)?;
        } else if !self.cleanly_shut_down(i)? {
            if self.node(i).dir.join("standby.signal").exists() {
                // Single-user mode refuses standby mode: start normally, then stop cleanly.
                self.start_node(i)?;
                self.stop(i)?;
            } else {
                self.single_user_recovery(i)?;
            }
        }

        // A slot on the new primary, reserved before the rewind so it holds every WAL
        // segment the rejoined node will ask for.
        let name = self.node(i).name.clone();
        let slot_exists = self.psql(
            primary,
            &format!(
                "SELECT count(*) FROM pg_replication_slots WHERE slot_name = {}",
                pgconf::quote(&name)
            ),
        )?;
        if slot_exists == "0" {
            self.psql(
                primary,
                &format!(
                    "SELECT pg_create_physical_replication_slot({}, true)",
                    pgconf::quote(&name)
                ),
            )?;
        }

        // A just-promoted node records its new timeline in pg_control only at its next
        // checkpoint; without one pg_rewind sees the old timeline and rewinds nothing.
        self.psql(primary, "CHECKPOINT")?;

        let primary_port = self.port(primary);
        let node = self.node(i);
        let mut cmd = self.env.server_cmd("pg_rewind");
        cmd.arg(format!("--target-pgdata={}", node.dir.display()))
            .arg(format!(
                "--source-server=host={HOST} port={primary_port} user={SUPERUSER} dbname=postgres"
            ));
        if self.env.major >= 12 {
            cmd.arg("--no-sync");
        }
        self.env.run(
            cmd,
            "pg_rewind needs wal_log_hints = on on the target, full_page_writes = on on the \
             source, and a cleanly shut down target",
            String::new,
        )?;

        // pg_rewind copied the source's configuration: make it this node's again.
        let env = self.env.clone();
        let node = self.node(i);
        os::write_owned(
            &node.dir.join(pgconf::NODE_CONF),
            &pgconf::node_conf(&node.name, node.port, None),
            env.run_as,
        )?;
        let auto = node.dir.join("postgresql.auto.conf");
        let text = match std::fs::read_to_string(&auto) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(ClusterError::io(format!("read {}", auto.display()), e)),
        };
        os::write_owned(
            &auto,
            &pgconf::rejoin_auto_conf(&text, primary_port, &node.name, Some(&node.name)),
            env.run_as,
        )?;
        let recovery_signal = node.dir.join("recovery.signal");
        if recovery_signal.exists() {
            std::fs::remove_file(&recovery_signal).map_err(|e| {
                ClusterError::io(format!("remove {}", recovery_signal.display()), e)
            })?;
        }
        os::write_owned(&node.dir.join("standby.signal"), "", env.run_as)?;

        pg_ctl_start(&env, i, self.node_mut(i))?;
        self.wait_streaming(i, STREAM_TIMEOUT)?;
        // The receiver reports "streaming" as soon as it connects; the sender on the new
        // primary reaches that state only once the node follows the primary's timeline.
        self.poll(
            primary,
            &format!(
                "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming' \
                 AND application_name = {}",
                pgconf::quote(&name)
            ),
            |v| v == "1",
            STREAM_TIMEOUT,
            &format!("node {i} to stream from node {primary}"),
        )
    }

    /// Whether `pg_controldata` reports node `i` as cleanly shut down.
    fn cleanly_shut_down(&self, i: usize) -> Result<bool, ClusterError> {
        let mut cmd = self.env.server_cmd("pg_controldata");
        cmd.arg("-D").arg(&self.node(i).dir);
        let out = self.env.run(cmd, &self.env.perm_hint(), String::new)?;
        let text = String::from_utf8_lossy(&out.stdout);
        let state = text
            .lines()
            .find_map(|l| l.strip_prefix("Database cluster state:"))
            .map(str::trim)
            .unwrap_or("");
        Ok(matches!(state, "shut down" | "shut down in recovery"))
    }

    /// Runs crash recovery on stopped node `i` in single-user mode, leaving it cleanly shut down.
    fn single_user_recovery(&self, i: usize) -> Result<(), ClusterError> {
        let node = self.node(i);
        remove_stale_lock_file(&node.dir.join("postmaster.pid"));
        let mut cmd = self.env.server_cmd("postgres");
        cmd.args(["--single", "-F", "-c", "exit_on_error=false", "-D"])
            .arg(&node.dir)
            .arg("template1");
        self.env.run(
            cmd,
            "single-user crash recovery before pg_rewind failed",
            String::new,
        )?;
        Ok(())
    }

    /// Node `i`'s WAL position: `pg_current_wal_insert_lsn()` on a primary,
    /// `pg_last_wal_replay_lsn()` on a replica.
    pub fn current_lsn(&self, i: usize) -> Result<String, ClusterError> {
        self.psql(
            i,
            "SELECT CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() \
             ELSE pg_current_wal_insert_lsn() END",
        )
    }

    /// Waits until node `i` has replayed WAL up to `lsn` (e.g. from
    /// [`current_lsn`](Self::current_lsn) on the primary). On a node not in recovery, compares
    /// against its flushed WAL instead.
    pub fn wait_replayed(
        &self,
        i: usize,
        lsn: &str,
        timeout: Duration,
    ) -> Result<(), ClusterError> {
        let lsn = lsn.trim();
        let valid = lsn.split_once('/').is_some_and(|(a, b)| {
            !a.is_empty()
                && !b.is_empty()
                && a.chars().chain(b.chars()).all(|c| c.is_ascii_hexdigit())
        });
        if !valid {
            return Err(ClusterError::InvalidArgument(format!(
                "{lsn:?} is not an LSN; pass a value like 0/3000148 from current_lsn()"
            )));
        }
        let sql = format!(
            "SELECT CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() \
             ELSE pg_current_wal_flush_lsn() END >= '{lsn}'::pg_lsn"
        );
        self.poll(
            i,
            &sql,
            |v| v == "t",
            timeout,
            &format!("node {i} to replay up to {lsn}"),
        )
    }

    /// Waits until replica `i`'s WAL receiver is streaming (e.g. after
    /// [`start_node`](Self::start_node)).
    pub fn wait_streaming(&self, i: usize, timeout: Duration) -> Result<(), ClusterError> {
        self.poll(
            i,
            "SELECT count(*) FROM pg_stat_wal_receiver WHERE status = 'streaming'",
            |v| v == "1",
            timeout,
            &format!("replica {i} to stream"),
        )
    }

    /// Whether node `i`'s postmaster is alive.
    pub fn is_running(&self, i: usize) -> bool {
        running_pid(self.node(i)).is_some()
    }

    /// Postmaster pid of node `i`, if it is running.
    pub fn postmaster_pid(&self, i: usize) -> Option<i32> {
        running_pid(self.node(i))
    }

    /// Stops every server (immediate shutdown, then SIGKILL of leftovers). The directory stays
    /// until drop; nodes can be started again with [`start_node`](Self::start_node).
    pub fn shutdown(&mut self) {
        for node in self.nodes.iter().rev() {
            stop_node_hard(&self.env, node);
        }
        // Anything else started from our directory (e.g. by hand) goes too.
        let base = self.env.base.to_string_lossy().into_owned();
        let strays = os::processes_mentioning(&base);
        for &pid in &strays {
            let children = os::children_of(pid);
            os::kill_tree(pid, &children);
        }
    }

    fn node(&self, i: usize) -> &Node {
        match self.nodes.get(i) {
            Some(n) => n,
            None => panic!(
                "node index {i} out of range: this cluster has {} node(s)",
                self.nodes.len()
            ),
        }
    }

    fn node_mut(&mut self, i: usize) -> &mut Node {
        let count = self.nodes.len();
        match self.nodes.get_mut(i) {
            Some(n) => n,
            None => panic!("node index {i} out of range: this cluster has {count} node(s)"),
        }
    }

    /// Polls `sql` on node `i` until `ok(output)` or `timeout`; errors keep polling.
    fn poll(
        &self,
        i: usize,
        sql: &str,
        ok: impl Fn(&str) -> bool,
        timeout: Duration,
        what: &str,
    ) -> Result<(), ClusterError> {
        let start = Instant::now();
        loop {
            let last = match self.psql(i, sql) {
                Ok(v) if ok(&v) => return Ok(()),
                Ok(v) => format!("last value {v:?}"),
                Err(e) => format!("last error: {e}"),
            };
            if start.elapsed() >= timeout {
                return Err(ClusterError::Timeout {
                    what: what.to_string(),
                    waited: start.elapsed(),
                    hint: format!(
                        "{last}; check the server log {}",
                        self.node(i).log.display()
                    ),
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.shutdown();
        let base = &self.env.base;
        let result = match self.cleanup {
            Cleanup::Keep => {
                tracing::info!(dir = %base.display(), "keeping local cluster directory");
                Ok(())
            }
            Cleanup::RemoveDir => std::fs::remove_dir_all(base),
            Cleanup::RemoveContents => remove_contents(base),
        };
        if let Err(e) = result {
            tracing::warn!(dir = %base.display(), error = %e, "could not remove local cluster directory; remove it by hand");
        }
    }
}

/// The pid in `<dir>/postmaster.pid` if that process is alive, else the pid of our last start if
/// that is still alive.
fn running_pid(node: &Node) -> Option<i32> {
    let from_file = std::fs::read_to_string(node.dir.join("postmaster.pid"))
        .ok()
        .and_then(|s| s.lines().next().and_then(|l| l.trim().parse::<i32>().ok()));
    from_file
        .into_iter()
        .chain(node.pid)
        .find(|&p| os::pid_alive(p))
}

/// Removes `path` (a postmaster or socket lock file) if the pid it names is dead or a zombie.
/// PostgreSQL itself treats a lock file as live while `kill(pid, 0)` succeeds, which includes an
/// unreaped zombie of a killed postmaster, and would then refuse to start.
fn remove_stale_lock_file(path: &Path) {
    let pid = std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.lines().next().and_then(|l| l.trim().parse::<i32>().ok()));
    if let Some(pid) = pid {
        if !os::pid_alive(pid) {
            if let Err(e) = std::fs::remove_file(path) {
                tracing::debug!(error = %e, path = %path.display(), "could not remove stale lock file");
            }
        }
    }
}

/// Immediate shutdown, then SIGKILL of the postmaster and its children if still there.
fn stop_node_hard(env: &Env, node: &Node) {
    let Some(pid) = running_pid(node) else { return };
    let children = os::children_of(pid);
    let mut cmd = env.server_cmd("pg_ctl");
    cmd.args(["stop", "-m", "immediate", "-w", "-t", "10", "-D"])
        .arg(&node.dir);
    if let Err(e) = env.run(cmd, "", String::new) {
        tracing::debug!(error = %e, "pg_ctl stop -m immediate failed; killing");
    }
    os::kill_tree(pid, &children);
}

fn new_node(env: &Env, i: usize, name: String) -> Result<Node, ClusterError> {
    Ok(Node {
        name,
        port: os::free_port()?,
        dir: env.base.join(format!("node{i}")),
        log: env.base.join(format!("node{i}.log")),
        pid: None,
    })
}

/// Writes the node's own conf file and starts it; on "port in use" picks a new port and retries.
fn start_with_port_retry(
    env: &Env,
    i: usize,
    node: &mut Node,
    replica: Option<&ReplicaConfig>,
) -> Result<(), ClusterError> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        os::write_owned(
            &node.dir.join(pgconf::NODE_CONF),
            &pgconf::node_conf(&node.name, node.port, replica),
            env.run_as,
        )?;
        match pg_ctl_start(env, i, node) {
            Err(ClusterError::PortInUse { .. }) if attempt < PORT_ATTEMPTS => {
                tracing::debug!(
                    node = i,
                    port = node.port,
                    "port taken; retrying with another"
                );
                node.port = os::free_port()?;
            }
            other => return other,
        }
    }
}

/// `pg_ctl start -w`, recording the postmaster pid.
fn pg_ctl_start(env: &Env, i: usize, node: &mut Node) -> Result<(), ClusterError> {
    remove_stale_lock_file(&node.dir.join("postmaster.pid"));
    remove_stale_lock_file(&env.base.join(format!(".s.PGSQL.{}.lock", node.port)));
    let log_len = std::fs::metadata(&node.log).map(|m| m.len()).unwrap_or(0);
    let mut cmd = env.server_cmd("pg_ctl");
    cmd.args(["start", "-w", "-t"])
        .arg(START_TIMEOUT_SECS.to_string())
        .arg("-D")
        .arg(&node.dir)
        .arg("-l")
        .arg(&node.log);
    let log = node.log.clone();
    let result = env.run(
        cmd,
        &format!("see the server log {}", node.log.display()),
        || format!("server log:\n{}", log_since(&log, log_len)),
    );
    if let Err(e) = result {
        let since = log_since(&node.log, log_len);
        if since.contains("Address already in use")
            || since.contains("could not bind")
            || (since.contains("lock file") && since.contains("already exists"))
        {
            return Err(ClusterError::PortInUse {
                node: i,
                port: node.port,
            });
        }
        // pg_ctl may give up while the postmaster lives on: don't leak it.
        stop_node_hard(env, node);
        return Err(e);
    }
    node.pid = std::fs::read_to_string(node.dir.join("postmaster.pid"))
        .ok()
        .and_then(|s| s.lines().next().and_then(|l| l.trim().parse().ok()));
    Ok(())
}

/// Base backup of the primary into node `i`, configured as a streaming replica and started.
fn make_replica(
    env: &Env,
    i: usize,
    name: &str,
    rcfg: &ReplicaConfig,
    primary_port: u16,
) -> Result<Node, ClusterError> {
    let mut node = new_node(env, i, name.to_string())?;
    let mut cmd = env.server_cmd("pg_basebackup");
    cmd.args(["-h", HOST, "-p"])
        .arg(primary_port.to_string())
        .args(["-U", SUPERUSER, "-D"])
        .arg(&node.dir)
        .args([
            "-R",
            "-X",
            "stream",
            "-S",
            name,
            "--checkpoint=fast",
            "--no-sync",
        ]);
    env.run(cmd, &env.perm_hint(), String::new)?;
    let auto = node.dir.join("postgresql.auto.conf");
    let text = std::fs::read_to_string(&auto)
        .map_err(|e| ClusterError::io(format!("read {}", auto.display()), e))?;
    os::write_owned(
        &auto,
        &pgconf::rewrite_auto_conf(&text, primary_port, name),
        env.run_as,
    )?;
    os::chmod_700(&node.dir)?;
    start_with_port_retry(env, i, &mut node, Some(rcfg))?;
    Ok(node)
}

/// Creates or validates the base directory; returns it (absolute) and whether we created it.
fn prepare_base(
    given: Option<&Path>,
    bindir: &Path,
    run_as: Option<os::RunAs>,
) -> Result<(PathBuf, bool), ClusterError> {
    let (base, created) = match given {
        None => {
            let tmp = tempfile::Builder::new()
                .prefix("tidemark-cluster-")
                .tempdir()
                .map_err(|e| {
                    ClusterError::io(
                        "creating a temporary directory (check TMPDIR and free space)",
                        e,
                    )
                })?;
            (tmp.keep(), true)
        }
        Some(dir) if dir.exists() => {
            if !dir.is_dir() {
                return Err(ClusterError::InvalidArgument(format!(
                    "data_dir {} exists and is not a directory; pass a directory path",
                    dir.display()
                )));
            }
            let mut entries = std::fs::read_dir(dir)
                .map_err(|e| ClusterError::io(format!("list {}", dir.display()), e))?;
            if entries.next().is_some() {
                if !dir.join(MARKER_FILE).is_file() {
                    return Err(ClusterError::DataDirNotOurs {
                        path: dir.to_path_buf(),
                        marker: MARKER_FILE,
                    });
                }
                wipe_previous(dir, bindir, run_as)?;
                // It holds our marker, so the directory itself is ours to remove.
                (dir.to_path_buf(), true)
            } else {
                (dir.to_path_buf(), false)
            }
        }
        Some(dir) => {
            std::fs::create_dir_all(dir)
                .map_err(|e| ClusterError::io(format!("create data_dir {}", dir.display()), e))?;
            (dir.to_path_buf(), true)
        }
    };
    let base = base
        .canonicalize()
        .map_err(|e| ClusterError::io(format!("resolve {}", base.display()), e))?;
    os::chmod_700(&base)?;
    os::chown_tree(&base, run_as)?;
    Ok((base, created))
}

/// Stops servers still running from a previous kept cluster in `dir`, then empties it.
fn wipe_previous(dir: &Path, bindir: &Path, run_as: Option<os::RunAs>) -> Result<(), ClusterError> {
    let env = Env {
        bindir: bindir.to_path_buf(),
        major: 0,
        run_as,
        base: dir.to_path_buf(),
    };
    let entries = std::fs::read_dir(dir)
        .map_err(|e| ClusterError::io(format!("list {}", dir.display()), e))?;
    for entry in entries.flatten() {
        let path = entry.path();
        if path.join("postmaster.pid").is_file() {
            let node = Node {
                name: String::new(),
                port: 0,
                dir: path,
                log: PathBuf::new(),
                pid: None,
            };
            stop_node_hard(&env, &node);
        }
    }
    remove_contents(dir)
        .map_err(|e| ClusterError::io(format!("wipe previous cluster in {}", dir.display()), e))
}

fn remove_contents(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() && !path.is_symlink() {
            std::fs::remove_dir_all(&path)?;
        } else {
            std::fs::remove_file(&path)?;
        }
    }
    Ok(())
}

/// When servers run as another account, make sure it can reach and write the base directory.
fn check_reachable(env: &Env) -> Result<(), ClusterError> {
    let Some(who) = env.run_as else {
        return Ok(());
    };
    let mut cmd = std::process::Command::new("test");
    cmd.arg("-w")
        .arg(&env.base)
        .stdin(std::process::Stdio::null());
    who.apply(&mut cmd);
    let ok = cmd.status().map(|s| s.success()).unwrap_or(true);
    if ok {
        Ok(())
    } else {
        Err(ClusterError::RunAs(format!(
            "uid {} cannot write {}; use a data_dir outside root-only directories (e.g. under /tmp) \
             or make its parents traversable (chmod o+x)",
            who.uid,
            env.base.display()
        )))
    }
}
