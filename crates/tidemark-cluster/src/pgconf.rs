//! Owns the text of the configuration files we write: the shared `postgresql.conf` block, each
//! node's own `tidemark.node.conf`, `pg_hba.conf`, and quoting of values.

use std::path::Path;
use std::time::Duration;

use crate::config::{ClusterConfig, ReplicaConfig};

/// File with the per-node settings, included at the end of `postgresql.conf`.
pub(crate) const NODE_CONF: &str = "tidemark.node.conf";

/// Unix socket paths longer than this don't fit `sun_path` once `/.s.PGSQL.NNNNN` is appended.
const MAX_SOCKET_DIR_LEN: usize = 90;

/// Quotes a value for postgresql.conf.
pub(crate) fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "''"))
}

/// Lines appended to the primary's `postgresql.conf` (copied to replicas by pg_basebackup).
pub(crate) fn shared_conf(cfg: &ClusterConfig, socket_dir: &Path) -> String {
    let socket = socket_dir.to_string_lossy();
    let socket = if socket.len() <= MAX_SOCKET_DIR_LEN {
        quote(&socket)
    } else {
        // Too long for a unix socket path: TCP only.
        "''".to_string()
    };
    let mut lines = vec![
        String::new(),
        "# --- written by tidemark-cluster ---".to_string(),
        "listen_addresses = '127.0.0.1'".to_string(),
        format!("unix_socket_directories = {socket}"),
        "wal_level = replica".to_string(),
        "max_wal_senders = 10".to_string(),
        "max_replication_slots = 10".to_string(),
        "hot_standby = on".to_string(),
        "fsync = off".to_string(),
        "synchronous_commit = on".to_string(),
        // pg_rewind (Cluster::rejoin_as_replica) needs full_page_writes on the source and
        // wal_log_hints (or data checksums) on the target.
        "full_page_writes = on".to_string(),
        "wal_log_hints = on".to_string(),
        "shared_buffers = 32MB".to_string(),
        "max_connections = 200".to_string(),
        "wal_keep_size = 256MB".to_string(),
        "logging_collector = off".to_string(),
        "log_line_prefix = '%m [%p] %q%a '".to_string(),
        "wal_receiver_status_interval = 1s".to_string(),
        "wal_retrieve_retry_interval = 200ms".to_string(),
    ];
    if cfg.ssl.is_some() {
        // Relative to the data directory, where `install_ssl_files` puts them.
        lines.push("ssl = on".to_string());
        lines.push(format!("ssl_cert_file = {}", quote(SSL_CERT)));
        lines.push(format!("ssl_key_file = {}", quote(SSL_KEY)));
    }
    if let Some(sc) = &cfg.synchronous_commit {
        lines.push(format!("synchronous_commit = {}", quote(sc)));
    }
    lines.extend(cfg.extra_conf.iter().cloned());
    lines.push(format!("include_if_exists = {}", quote(NODE_CONF)));
    lines.push(String::new());
    lines.join("\n")
}

/// Contents of a node's own `tidemark.node.conf`.
pub(crate) fn node_conf(name: &str, port: u16, replica: Option<&ReplicaConfig>) -> String {
    let mut lines = vec![
        "# per-node settings written by tidemark-cluster".to_string(),
        format!("port = {port}"),
        format!("cluster_name = {}", quote(name)),
    ];
    if let Some(r) = replica {
        if let Some(d) = r.apply_delay {
            lines.push(format!("recovery_min_apply_delay = '{}ms'", d.as_millis()));
        }
        lines.push(format!(
            "hot_standby_feedback = {}",
            if r.hot_standby_feedback { "on" } else { "off" }
        ));
    }
    lines.push(String::new());
    lines.join("\n")
}

/// Names of the certificate and key in each data directory when TLS is on.
pub(crate) const SSL_CERT: &str = "server.crt";
pub(crate) const SSL_KEY: &str = "server.key";

/// `pg_hba.conf`: trust for the superuser and replication on loopback, md5 for everyone else.
/// With `ssl_only`, every TCP line is `hostssl` (plain TCP is refused); unix sockets stay
/// `local ... trust`.
pub(crate) fn hba_conf(ssl_only: bool) -> String {
    let host = if ssl_only { "hostssl" } else { "host   " };
    let mut lines = vec![
        "# written by tidemark-cluster".to_string(),
        "local   all          all                     trust".to_string(),
    ];
    for rest in [
        "all          postgres  127.0.0.1/32  trust",
        "all          postgres  ::1/128       trust",
        "replication  all       127.0.0.1/32  trust",
        "replication  all       ::1/128       trust",
        "all          all       127.0.0.1/32  md5",
        "all          all       ::1/128       md5",
    ] {
        lines.push(format!("{host} {rest}"));
    }
    lines.push(String::new());
    lines.join("\n")
}

/// `primary_conninfo` for a replica streaming from `primary_port`.
pub(crate) fn primary_conninfo(primary_port: u16, name: &str) -> String {
    format!(
        "primary_conninfo = {}",
        quote(&format!(
            "host=127.0.0.1 port={primary_port} user=postgres application_name={name}"
        ))
    )
}

/// Replaces pg_basebackup's `primary_conninfo` line in `postgresql.auto.conf` with ours.
pub(crate) fn rewrite_auto_conf(auto_conf: &str, primary_port: u16, name: &str) -> String {
    let mut out: Vec<String> = auto_conf
        .lines()
        .filter(|l| !l.trim_start().starts_with("primary_conninfo"))
        .map(str::to_string)
        .collect();
    out.push(primary_conninfo(primary_port, name));
    out.push(String::new());
    out.join("\n")
}

/// `postgresql.auto.conf` of a node rejoining as a replica of `primary_port`: drops any
/// `primary_conninfo` / `primary_slot_name` (e.g. copied from the source by pg_rewind) and
/// appends ours.
pub(crate) fn rejoin_auto_conf(
    auto_conf: &str,
    primary_port: u16,
    name: &str,
    slot: Option<&str>,
) -> String {
    let mut out: Vec<String> = auto_conf
        .lines()
        .filter(|l| {
            let l = l.trim_start();
            !l.starts_with("primary_conninfo") && !l.starts_with("primary_slot_name")
        })
        .map(str::to_string)
        .collect();
    out.push(primary_conninfo(primary_port, name));
    if let Some(slot) = slot {
        out.push(format!("primary_slot_name = {}", quote(slot)));
    }
    out.push(String::new());
    out.join("\n")
}

/// `synchronous_standby_names` value naming the synchronous replicas, if any.
pub(crate) fn sync_standby_names(names: &[String]) -> Option<String> {
    if names.is_empty() {
        return None;
    }
    Some(format!("FIRST {} ({})", names.len(), names.join(", ")))
}

/// Milliseconds for `recovery_min_apply_delay`.
pub(crate) fn delay_ms(d: Duration) -> u128 {
    d.as_millis()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hba_ssl_only_has_no_plain_tcp_line() {
        let plain = hba_conf(false);
        assert!(plain.lines().any(|l| l.starts_with("host ")));
        let ssl = hba_conf(true);
        assert!(!ssl.lines().any(|l| l.starts_with("host ")));
        assert_eq!(ssl.lines().filter(|l| l.starts_with("hostssl")).count(), 6);
        assert!(ssl.contains("local   all          all                     trust"));
    }

    #[test]
    fn quoting() {
        assert_eq!(quote("a'b"), "'a''b'");
        assert_eq!(quote("/tmp/x"), "'/tmp/x'");
    }

    #[test]
    fn auto_conf_rewrite_replaces_conninfo() {
        let before = "# Do not edit\nprimary_conninfo = 'user=postgres port=1'\nprimary_slot_name = 'replica_1'\n";
        let after = rewrite_auto_conf(before, 5432, "replica_1");
        assert!(after.contains("primary_slot_name = 'replica_1'"));
        assert!(after.contains("application_name=replica_1"));
        assert_eq!(after.matches("primary_conninfo").count(), 1);
        assert!(after.contains("port=5432"));
    }

    #[test]
    fn rejoin_conf_replaces_conninfo_and_slot() {
        let before = "# Do not edit\nprimary_conninfo = 'port=1 application_name=replica_1'\nprimary_slot_name = 'replica_1'\nwork_mem = '8MB'\n";
        let after = rejoin_auto_conf(before, 6000, "primary", Some("primary"));
        assert_eq!(after.matches("primary_conninfo").count(), 1);
        assert!(after.contains("application_name=primary"));
        assert!(after.contains("port=6000"));
        assert!(after.contains("primary_slot_name = 'primary'"));
        assert!(!after.contains("replica_1"));
        assert!(after.contains("work_mem"));
        let no_slot = rejoin_auto_conf(before, 6000, "primary", None);
        assert!(!no_slot.contains("primary_slot_name"));
    }

    #[test]
    fn sync_names() {
        assert_eq!(sync_standby_names(&[]), None);
        assert_eq!(
            sync_standby_names(&["replica_1".into(), "replica_2".into()]).as_deref(),
            Some("FIRST 2 (replica_1, replica_2)")
        );
    }

    #[test]
    fn node_conf_has_delay_and_feedback() {
        let r = ReplicaConfig {
            apply_delay: Some(Duration::from_millis(1500)),
            hot_standby_feedback: true,
            synchronous: false,
        };
        let text = node_conf("replica_1", 6000, Some(&r));
        assert!(text.contains("port = 6000"));
        assert!(text.contains("recovery_min_apply_delay = '1500ms'"));
        assert!(text.contains("hot_standby_feedback = on"));
        assert!(!node_conf("primary", 6001, None).contains("hot_standby_feedback"));
    }
}
