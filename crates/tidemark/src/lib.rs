//! tidemark: a PostgreSQL proxy that sends a read to a replica only once that replica has
//! replayed the WAL the reader depends on.
//!
//! Module map (one concern each):
//! - [`config`]: the TOML config and its validation
//! - [`config_file`]: secrets from files/environment, file permissions, error key paths
//! - [`app`]: process-wide shared state
//! - [`listener`]: accepting clients, startup, authentication hand-off, shutdown
//! - [`session`]: one client's routing units, relaying, LSN capture
//! - [`client`] / [`server`]: the two sockets of a session
//! - [`server_tls`]: TLS towards PostgreSQL (`sslmode`), the plain-or-TLS server stream
//! - [`pool`]: server connection pools
//! - [`reload`]: how a RELOAD changes the node list (stable node ids, retired nodes)
//! - [`auth`]: client authentication (SCRAM, md5, trust)
//! - [`check`]: `tidemark check-config`
//! - [`passthrough`]: SCRAM pass-through to the servers with a client's ClientKey
//! - [`auth_query`]: looking up users not in `[[users]]` on the primary
//! - [`monitor`]: node polling and the published cluster view
//! - [`pace`]: the monitor's poll pace, which a commit speeds up
//! - [`metrics`]: Prometheus metrics and the last minute's per-second counters
//! - [`http`] / [`status`]: `/metrics`, the status page and its JSON
//! - [`admin`]: the admin console (database `tidemark`)
//! - [`slots`]: replication slot retained-WAL polling
//! - [`dev`]: `tidemark dev`, the embedded local cluster (feature `dev`, on by default)
//! - [`tx_shapes`]: what optimistic transactions learned per shape, and their outcomes
//! - [`signals`]: SIGTERM / Ctrl-C (stop) and SIGHUP (reload)

pub mod admin;
pub mod app;
pub mod auth;
pub mod auth_query;
pub mod check;
pub mod client;
pub mod clock;
pub mod config;
pub mod config_file;
#[cfg(feature = "dev")]
pub mod dev;
pub mod http;
pub mod listener;
pub mod metrics;
pub mod monitor;
pub mod pace;
pub mod passthrough;
pub mod pool;
pub mod recycled;
pub mod reload;
pub mod server;
pub mod server_tls;
pub mod session;
pub mod shared;
pub mod signals;
pub mod slots;
pub mod status;
pub mod tls;
pub mod tx_shapes;
