//! Owns [`ClusterError`]: every way starting or driving a local cluster can fail, each message
//! naming what went wrong and what to do about it.

use std::path::PathBuf;
use std::time::Duration;

/// Errors from finding PostgreSQL, creating, starting and driving a local cluster.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// No usable PostgreSQL server binaries were found.
    #[error(
        "PostgreSQL server binaries not found ({searched}); install the Debian package postgresql \
         (apt-get install postgresql) or set PG_BINDIR to the directory holding initdb, pg_ctl, \
         postgres, pg_basebackup and psql"
    )]
    BinariesNotFound {
        /// Where we looked and what was missing.
        searched: String,
    },

    /// The PostgreSQL found is older than the oldest supported major version (13).
    #[error(
        "PostgreSQL in {bindir} is version {version}, but tidemark-cluster needs 13 or newer; \
         install a newer postgresql package or point PG_BINDIR at a newer bin directory"
    )]
    UnsupportedVersion {
        /// The bin directory that was checked.
        bindir: PathBuf,
        /// The version string `postgres --version` printed.
        version: String,
    },

    /// A filesystem or process-spawn operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What we were doing, including the path involved and a hint.
        what: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// An external PostgreSQL program exited unsuccessfully.
    #[error("`{command}` failed ({status}): {output}\nhint: {hint}")]
    Command {
        /// The command line that was run.
        command: String,
        /// Its exit status.
        status: String,
        /// The tail of its stderr/stdout (and the server log where relevant).
        output: String,
        /// What to do about it.
        hint: String,
    },

    /// A server could not listen because its TCP port is taken by another process.
    #[error(
        "node {node} could not listen on 127.0.0.1:{port}: the port is in use by another process; \
         stop that process (see `ss -ltnp 'sport = :{port}'`) or start the cluster again to get a \
         fresh port"
    )]
    PortInUse {
        /// Node index.
        node: usize,
        /// The port that was taken.
        port: u16,
    },

    /// The given data directory exists, is not empty and was not created by tidemark-cluster.
    #[error(
        "data directory {path} is not empty and holds no tidemark-cluster marker file \
         ({marker}); refusing to touch it — pass an empty or non-existent directory, or omit \
         data_dir to use a fresh temporary directory"
    )]
    DataDirNotOurs {
        /// The directory given.
        path: PathBuf,
        /// The marker file name we looked for.
        marker: &'static str,
    },

    /// A SQL statement run through psql failed.
    #[error("SQL on node {node} (port {port}) failed: {sql:?}: {stderr}")]
    Sql {
        /// Node index.
        node: usize,
        /// Node port.
        port: u16,
        /// The statement.
        sql: String,
        /// psql's error output.
        stderr: String,
    },

    /// Waiting for a condition took longer than allowed.
    #[error("timed out after {waited:?} waiting for {what}; {hint}")]
    Timeout {
        /// The condition that never became true.
        what: String,
        /// How long we waited.
        waited: Duration,
        /// Last observed state and what to check.
        hint: String,
    },

    /// A node index outside `0..node_count()` or an argument that makes no sense.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// Running the servers as an unprivileged account (needed when we are root) failed.
    #[error(
        "cannot run PostgreSQL as an unprivileged user: {0}; PostgreSQL refuses to run as root, \
         so create the `postgres` account (apt-get install postgresql does) or run as a normal user"
    )]
    RunAs(String),
}

impl ClusterError {
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        ClusterError::Io {
            what: what.into(),
            source,
        }
    }
}
