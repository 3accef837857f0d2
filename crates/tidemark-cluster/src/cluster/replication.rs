//! Replica control: WAL replay pause/resume and delay, promotion, pg_rewind rejoin, LSN waits.

use std::time::Duration;

use super::process::{pg_ctl_start, remove_stale_lock_file};
use super::{Cluster, HOST, START_TIMEOUT_SECS, STREAM_TIMEOUT, SUPERUSER};
use crate::env::log_since;
use crate::{os, pgconf, ClusterError};

impl Cluster {
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
}
