//! tidemark-cluster: starts a real local PostgreSQL primary plus N streaming replicas for
//! integration tests, benchmarks and `tidemark dev`.
//!
//! The API is synchronous (it runs `initdb`, `pg_ctl`, `pg_basebackup` and `psql`); call it from
//! async code through `spawn_blocking`.
//!
//! ```no_run
//! use std::time::Duration;
//! use tidemark_cluster::{Cluster, ClusterConfig};
//!
//! let cluster = Cluster::start(ClusterConfig::with_replicas(2))?;
//! cluster.psql(0, "CREATE TABLE t (x int)")?;
//! let lsn = cluster.current_lsn(0)?;
//! cluster.wait_replayed(1, &lsn, Duration::from_secs(5))?;
//! # Ok::<(), tidemark_cluster::ClusterError>(())
//! ```
//!
//! Modules: `config` (what to build), `bindir` (finding PostgreSQL), `cluster` (the running
//! cluster), `env` (running PostgreSQL programs), `pgconf` (config file text), `os` (accounts,
//! ports, processes), `fault` (a TCP fault proxy for network faults), `error`.

mod bindir;
mod cluster;
mod config;
mod env;
mod error;
mod fault;
mod os;
mod pgconf;

pub use bindir::{find_bindir, find_bindir_from};
pub use cluster::{Cluster, MARKER_FILE};
pub use config::{ClusterConfig, ReplicaConfig, SslFiles};
pub use error::ClusterError;
pub use fault::{Fault, FaultProxy};
pub use os::{pid_alive, processes_mentioning};
