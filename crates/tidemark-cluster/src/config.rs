//! Owns the configuration types a caller fills in before [`crate::Cluster::start`].

use std::path::PathBuf;
use std::time::Duration;

/// How to build a local cluster: one primary (node 0) plus `replicas.len()` streaming replicas.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    /// One entry per replica; node `i` (1-based) is configured by `replicas[i - 1]`.
    pub replicas: Vec<ReplicaConfig>,
    /// `synchronous_commit` for every node, e.g. `"remote_apply"`; `None` keeps the default (`on`).
    pub synchronous_commit: Option<String>,
    /// Extra `postgresql.conf` lines written for every node (after ours, so they win).
    pub extra_conf: Vec<String>,
    /// Where to put the cluster. `None` creates a fresh temporary directory.
    ///
    /// A given directory must be absent, empty, or hold the `tidemark-cluster.toml` marker of a
    /// previous (kept) cluster, whose contents are then wiped and recreated (any server still
    /// running from it is stopped first). A non-empty directory without the marker is refused.
    ///
    /// On drop (unless `keep`), a directory we created or that held our marker is removed; an
    /// existing empty directory you passed is emptied but left in place.
    pub data_dir: Option<PathBuf>,
    /// Keep the directory (and its data) when the [`crate::Cluster`] is dropped. Servers are
    /// stopped either way.
    pub keep: bool,
    /// Serve TLS with this certificate and key, and accept TCP connections over TLS only
    /// (`hostssl` in `pg_hba.conf`; the unix-socket `local` lines stay). `None`: no TLS.
    pub ssl: Option<SslFiles>,
}

/// A server certificate and key (PEM files) each node serves TLS with. They are copied into
/// every data directory as `server.crt` / `server.key` (mode 0600, as PostgreSQL demands).
#[derive(Clone, Debug)]
pub struct SslFiles {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig::with_replicas(2)
    }
}

impl ClusterConfig {
    /// A primary plus `n` replicas with default settings.
    pub fn with_replicas(n: usize) -> Self {
        ClusterConfig {
            replicas: vec![ReplicaConfig::default(); n],
            synchronous_commit: None,
            extra_conf: Vec::new(),
            data_dir: None,
            keep: false,
            ssl: None,
        }
    }
}

/// Per-replica settings.
#[derive(Clone, Debug, Default)]
pub struct ReplicaConfig {
    /// `recovery_min_apply_delay` for this replica.
    pub apply_delay: Option<Duration>,
    /// `hot_standby_feedback = on`.
    pub hot_standby_feedback: bool,
    /// Name this replica in the primary's `synchronous_standby_names`.
    pub synchronous: bool,
}
