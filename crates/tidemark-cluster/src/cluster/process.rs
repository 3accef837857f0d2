//! Server processes: pg_ctl start/stop, killing, postmaster pids and stale lock files.

use std::path::Path;
use std::time::Duration;

use super::{Cluster, Node, START_TIMEOUT_SECS};
use crate::config::ReplicaConfig;
use crate::env::{log_since, Env};
use crate::{os, pgconf, ClusterError};

const PORT_ATTEMPTS: usize = 5;

impl Cluster {
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

    /// Whether node `i`'s postmaster is alive.
    pub fn is_running(&self, i: usize) -> bool {
        running_pid(self.node(i)).is_some()
    }

    /// Postmaster pid of node `i`, if it is running.
    pub fn postmaster_pid(&self, i: usize) -> Option<i32> {
        running_pid(self.node(i))
    }
}

/// The pid in `<dir>/postmaster.pid` if that process is alive, else the pid of our last start if
/// that is still alive.
pub(super) fn running_pid(node: &Node) -> Option<i32> {
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
pub(super) fn remove_stale_lock_file(path: &Path) {
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
pub(super) fn stop_node_hard(env: &Env, node: &Node) {
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

/// Writes the node's own conf file and starts it; on "port in use" picks a new port and retries.
pub(super) fn start_with_port_retry(
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
pub(super) fn pg_ctl_start(env: &Env, i: usize, node: &mut Node) -> Result<(), ClusterError> {
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
