//! Owns [`Cluster`]: creating the primary and replicas, starting/stopping/killing/promoting nodes,
//! SQL helpers for replay control, and guaranteed teardown on drop.
//!
//! Parts: `setup` (base directory, initdb, base backups), `process` (pg_ctl start/stop/kill,
//! postmaster pids), `replication` (replay control, promotion, rejoin, LSN waits).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::env::Env;
use crate::{os, ClusterError};

mod process;
mod replication;
mod setup;

use process::stop_node_hard;

/// Name of the marker file in every base directory we create.
pub const MARKER_FILE: &str = "tidemark-cluster.toml";

const HOST: &str = "127.0.0.1";
const SUPERUSER: &str = "postgres";
const START_TIMEOUT_SECS: u32 = 60;
const STREAM_TIMEOUT: Duration = Duration::from_secs(30);

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
/// [`ClusterConfig::keep`](crate::ClusterConfig::keep) was set — also while a test panics.
///
/// Methods taking a node index panic if it is out of range (`0..node_count()`).
#[derive(Debug)]
pub struct Cluster {
    env: Env,
    nodes: Vec<Node>,
    cleanup: Cleanup,
}

impl Cluster {
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
