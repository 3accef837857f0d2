//! Configuration: the TOML file, its defaults and its validation. Every error names the
//! field that is wrong and what to write instead.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use tidemark_core::{Consistency, GateConfig};

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address clients connect to.
    #[serde(default = "default_listen")]
    pub listen: String,
    pub nodes: Vec<NodeConfig>,
    #[serde(default)]
    pub users: Vec<UserConfig>,
    /// Users allowed to use the admin console (database `tidemark`).
    #[serde(default)]
    pub admin_users: Vec<String>,
    #[serde(default)]
    pub pool: PoolConfig,
    #[serde(default)]
    pub routing: RoutingConfig,
    #[serde(default)]
    pub monitor: MonitorConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// `[shared]`: state shared by several tidemark instances through Redis.
    #[serde(default)]
    pub shared: SharedConfig,
    #[serde(default)]
    pub tls: TlsConfig,
    /// TLS from tidemark to the PostgreSQL servers (pools, monitor, catalog, cancels); each
    /// node may override any of these keys in its own `server_tls` table.
    #[serde(default)]
    pub server_tls: ServerTlsConfig,
    /// `[auth]`: look up users not in `[[users]]` on the primary (auth_query).
    #[serde(default)]
    pub auth: crate::auth_query::AuthQueryConfig,
    /// Log filter (`info`, `debug`, `tidemark=debug,warn`, ...); `RUST_LOG` overrides it.
    #[serde(default)]
    pub log_level: Option<String>,
    /// Log line format on stderr: `text` (default) or `json` (one JSON object per line).
    #[serde(default)]
    pub log_format: LogFormat,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    pub name: String,
    #[serde(default = "default_host")]
    pub host: String,
    pub port: u16,
    /// The `application_name` this node uses in its `primary_conninfo` when it is a standby
    /// (how the primary's `pg_stat_replication` names it). Defaults to `name`.
    #[serde(default)]
    pub application_name: Option<String>,
    /// Per-node override of the global `[server_tls]` keys (each key set here wins).
    #[serde(default)]
    pub server_tls: ServerTlsConfig,
    /// Removed from the config file by a RELOAD: the node keeps its place (node ids are
    /// indices into `nodes` for the life of the process) but is never routed to, polled or
    /// given new server connections. Never read from the file.
    #[serde(skip)]
    pub retired: bool,
}

impl NodeConfig {
    /// How the primary's `pg_stat_replication` names this node when it streams from it.
    pub fn standby_name(&self) -> &str {
        self.application_name.as_deref().unwrap_or(&self.name)
    }
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum AuthMethod {
    /// `scram-sha-256`, as pg_hba.conf spells it (`scram-sha256` is accepted too).
    #[serde(rename = "scram-sha-256", alias = "scram-sha256")]
    ScramSha256,
    Md5,
    Trust,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    pub name: String,
    /// Plain password, or a PostgreSQL SCRAM verifier (`SCRAM-SHA-256$4096:salt$stored:server`).
    #[serde(default)]
    pub password: Option<String>,
    /// How clients authenticate to tidemark.
    #[serde(default = "default_auth", alias = "auth_type")]
    pub auth: AuthMethod,
    /// Password tidemark uses towards the servers; defaults to `password` when that is plain.
    #[serde(default)]
    pub server_password: Option<String>,
    /// Default consistency for this user's sessions (overrides `routing.consistency`).
    #[serde(default)]
    pub consistency: Option<String>,
    /// Where this user's transactions run (overrides `routing.transactions`).
    #[serde(default)]
    pub transactions: Option<TxMode>,
    /// `password` read from this file (trailing newline dropped) / this environment variable.
    #[serde(default)]
    pub password_file: Option<std::path::PathBuf>,
    #[serde(default)]
    pub password_env: Option<String>,
    /// `server_password` read from this file / this environment variable.
    #[serde(default)]
    pub server_password_file: Option<std::path::PathBuf>,
    #[serde(default)]
    pub server_password_env: Option<String>,
}

impl UserConfig {
    /// `password` is a SCRAM verifier, not a plain password.
    pub fn has_verifier(&self) -> bool {
        self.password
            .as_deref()
            .is_some_and(|p| p.starts_with("SCRAM-SHA-256$"))
    }

    /// The password tidemark uses towards the servers: `server_password`, else `password`
    /// when it is plain.
    pub fn server_password(&self) -> Option<String> {
        self.server_password.clone().or_else(|| {
            (!self.has_verifier())
                .then(|| self.password.clone())
                .flatten()
        })
    }
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum PoolMode {
    #[default]
    Transaction,
    Session,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolConfig {
    // The aliases are PgBouncer's names (docs/configuration.md, "Coming from PgBouncer").
    #[serde(alias = "pool_mode")]
    pub mode: PoolMode,
    #[serde(alias = "min_pool_size")]
    pub min_size: usize,
    #[serde(alias = "default_pool_size")]
    pub max_size: usize,
    #[serde(with = "humantime_serde_compat", alias = "server_idle_timeout")]
    pub idle_timeout: Duration,
    #[serde(with = "humantime_serde_compat")]
    pub server_lifetime: Duration,
    #[serde(with = "humantime_serde_compat", alias = "query_wait_timeout")]
    pub checkout_timeout: Duration,
    #[serde(with = "humantime_serde_compat", alias = "server_connect_timeout")]
    pub connect_timeout: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            mode: PoolMode::Transaction,
            min_size: 0,
            max_size: 40,
            idle_timeout: Duration::from_secs(600),
            server_lifetime: Duration::from_secs(3600),
            checkout_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(3),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingConfig {
    /// Default consistency level: strong, causal, session, bounded(200ms), eventual.
    pub consistency: String,
    /// How long a read waits for a replica to replay what it depends on before going to the primary.
    #[serde(with = "humantime_serde_compat")]
    pub max_wait: Duration,
    /// How long a read waits within `max_wait`: `adaptive` (default: only while a replica is
    /// expected to replay the position sooner than the primary would answer) or `fixed` (up to
    /// `max_wait` for any replica expected to catch up within it). See tidemark_core::wait.
    pub wait: WaitMode,
    /// Name of the node that is the primary; overrides discovery (never routes writes to a node in recovery).
    pub primary: Option<String>,
    /// Track commit LSNs after writes (read-your-writes). Turning it off is for benchmarks only.
    pub track_writes: bool,
    /// Capacity of the cross-connection key store.
    pub key_store_capacity: usize,
    /// Capacity of the statement classification cache.
    pub classify_cache: usize,
    pub write_functions: Vec<String>,
    pub read_only_functions: Vec<String>,
    /// How reads are spread over eligible replicas: `session` (default: each client
    /// connection keeps to one replica while it is eligible — warm server connections and
    /// caches, and reads within a session never step back in time from one replica to a more
    /// lagging one) or `statement` (round robin per routing decision).
    pub balance: Balance,
    /// The sqlcommenter attribute of a trailing comment that carries a key
    /// (`/*tidemark_key='user%3A42'*/`).
    pub comment_key_attribute: String,
    /// Where transactions run: `primary` (every transaction, declared read-only included),
    /// `read_only` (declared read-only transactions on replicas, the rest on the primary) or
    /// `optimistic` (a plain `BEGIN` whose first statement reads starts on a replica and is
    /// replayed on the primary at its first write; see docs/routing.md).
    pub transactions: TxMode,
    /// Most bytes of client messages an optimistic transaction records for its replay; a
    /// transaction that would record more moves to the primary at once.
    pub replay_budget_bytes: usize,
}

/// `routing.transactions`: where transactions run.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum TxMode {
    /// Every transaction on the primary, declared read-only ones included.
    Primary,
    /// Declared read-only transactions on replicas (gated like reads), the rest on the primary.
    #[default]
    ReadOnly,
    /// Plain transactions start on a replica when their first statement reads, and move to the
    /// primary (replaying what they read, checked) at their first write.
    Optimistic,
}

impl TxMode {
    pub fn as_str(self) -> &'static str {
        match self {
            TxMode::Primary => "primary",
            TxMode::ReadOnly => "read_only",
            TxMode::Optimistic => "optimistic",
        }
    }
}

impl std::fmt::Display for TxMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for TxMode {
    type Err = String;
    fn from_str(s: &str) -> Result<TxMode, String> {
        match s.trim().to_ascii_lowercase().replace('-', "_").as_str() {
            "primary" => Ok(TxMode::Primary),
            "read_only" | "readonly" => Ok(TxMode::ReadOnly),
            "optimistic" => Ok(TxMode::Optimistic),
            _ => Err(format!(
                "unknown transactions mode \"{s}\" (use primary, read_only or optimistic)"
            )),
        }
    }
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum WaitMode {
    #[default]
    Adaptive,
    Fixed,
}

impl WaitMode {
    pub fn policy(self) -> tidemark_core::WaitPolicy {
        match self {
            WaitMode::Adaptive => tidemark_core::WaitPolicy::Adaptive,
            WaitMode::Fixed => tidemark_core::WaitPolicy::Fixed,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Balance {
    #[default]
    Session,
    Statement,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        RoutingConfig {
            consistency: "session".into(),
            max_wait: Duration::from_millis(20),
            wait: WaitMode::Adaptive,
            primary: None,
            track_writes: true,
            key_store_capacity: 100_000,
            classify_cache: 10_000,
            write_functions: vec![],
            read_only_functions: vec![],
            balance: Balance::Session,
            comment_key_attribute: tidemark_sql::DEFAULT_KEY_ATTRIBUTE.to_string(),
            transactions: TxMode::ReadOnly,
            replay_budget_bytes: 64 * 1024,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MonitorConfig {
    /// Poll interval while WAL is moving (writes, replicas catching up).
    #[serde(with = "humantime_serde_compat")]
    pub interval: Duration,
    /// Poll interval once no node's WAL position has moved for a second: nothing can go
    /// stale then, and a write through tidemark switches back to `interval` at once.
    /// Never shorter than `interval`.
    #[serde(with = "humantime_serde_compat")]
    pub idle_interval: Duration,
    pub user: String,
    pub password: Option<String>,
    /// `password` read from this file / this environment variable.
    pub password_file: Option<std::path::PathBuf>,
    pub password_env: Option<String>,
    pub database: String,
    #[serde(with = "humantime_serde_compat")]
    pub max_lag: Duration,
    #[serde(with = "humantime_serde_compat")]
    pub return_below: Duration,
    pub max_lag_bytes: Option<u64>,
    pub samples: u32,
    #[serde(with = "humantime_serde_compat")]
    pub timeout: Duration,
}

impl Default for MonitorConfig {
    fn default() -> Self {
        MonitorConfig {
            interval: Duration::from_millis(5),
            idle_interval: Duration::from_millis(100),
            user: "postgres".into(),
            password: None,
            password_file: None,
            password_env: None,
            database: "postgres".into(),
            max_lag: Duration::from_secs(5),
            return_below: Duration::from_secs(1),
            max_lag_bytes: None,
            samples: 3,
            timeout: Duration::from_secs(2),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest single protocol message accepted from a client, e.g. "256MB".
    pub max_message_size: String,
    /// Named prepared statements remembered per client.
    pub max_prepared_per_client: usize,
    #[serde(alias = "max_client_conn")]
    pub max_clients: usize,
    /// How long shutdown waits for running transactions.
    #[serde(with = "humantime_serde_compat")]
    pub shutdown_timeout: Duration,
    /// Connections that have not finished logging in (startup, TLS, authentication); beyond
    /// this, new sockets are closed at once (`tidemark_logins_refused_total`).
    pub max_pending_logins: usize,
    /// One deadline for the whole login: startup packet, TLS handshake, authentication.
    #[serde(with = "humantime_serde_compat")]
    pub login_timeout: Duration,
    /// Total bytes of statement text a client's named prepared statements may hold.
    pub max_prepared_bytes_per_client: String,
    /// Longest key a client may name (`SET tidemark.key`, a `key=` hint), in bytes.
    pub max_key_length: usize,
}

/// Largest message accepted before login (password, SASL): PostgreSQL's own startup packet
/// limit is 10,000 bytes, and no authentication message needs more.
pub const MAX_LOGIN_MESSAGE: usize = 10_000;

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_message_size: "256MB".into(),
            max_prepared_per_client: 2000,
            max_clients: 10_000,
            shutdown_timeout: Duration::from_secs(10),
            max_pending_logins: 1024,
            login_timeout: Duration::from_secs(15),
            max_prepared_bytes_per_client: "16MB".into(),
            max_key_length: 256,
        }
    }
}

/// TLS between clients and tidemark (towards PostgreSQL, see [`ServerTlsConfig`]).
#[derive(Clone, Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM certificate chain (leaf first). With `key_file`, clients that ask for TLS get it.
    pub cert_file: Option<std::path::PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: Option<std::path::PathBuf>,
    /// `allow` (default): TLS for clients that ask (`sslmode=prefer`/`require`), plain for the
    /// others; `require`: plain connections are refused (28000).
    pub mode: TlsMode,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    #[default]
    Allow,
    Require,
}

/// TLS from tidemark to PostgreSQL, as libpq's `sslmode` family: `[server_tls]` globally,
/// `[nodes.server_tls]` per node (key by key).
#[derive(Clone, Debug, Deserialize, Default, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerTlsConfig {
    /// `disable`, `prefer` (default), `require`, `verify-ca` or `verify-full`.
    pub sslmode: Option<SslMode>,
    /// PEM file of the certificate authorities to trust (needed by `verify-ca` and
    /// `verify-full`; with `require`, as in libpq, the chain is then verified too).
    pub sslrootcert: Option<std::path::PathBuf>,
    /// PEM client certificate chain, for servers that ask for one (`clientcert` in pg_hba).
    pub sslcert: Option<std::path::PathBuf>,
    /// PEM private key of `sslcert`.
    pub sslkey: Option<std::path::PathBuf>,
}

/// libpq's `sslmode` values (`allow` is not offered: it only differs from `prefer` in
/// trying plain first).
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum SslMode {
    /// Plain TCP only.
    Disable,
    /// TLS when the server offers it, plain otherwise; the certificate is not checked.
    #[default]
    Prefer,
    /// TLS or fail; the certificate is not checked (unless `sslrootcert` is set).
    Require,
    /// TLS, and the certificate chain must lead to `sslrootcert`.
    VerifyCa,
    /// `verify-ca`, and the certificate must name the node's `host`.
    VerifyFull,
}

impl SslMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

impl std::fmt::Display for SslMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A node's effective server TLS settings (its own keys over the global ones), with the
/// config path each came from for error messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvedServerTls {
    pub sslmode: SslMode,
    pub sslrootcert: Option<std::path::PathBuf>,
    pub sslcert: Option<std::path::PathBuf>,
    pub sslkey: Option<std::path::PathBuf>,
    /// `server_tls` or `nodes.<name>.server_tls`: where a key of this node is set.
    pub field: String,
}

#[derive(Clone, Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Address of the Prometheus endpoint; off when unset.
    pub listen: Option<String>,
}

/// `[shared]`: the key store and the causal floor shared by several tidemark instances
/// through Redis.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SharedConfig {
    /// `redis://host:port/db` or `redis+unix:///path/to/socket`; off when unset.
    pub redis_url: Option<String>,
    /// Longest any Redis call may take; a later answer counts as a failure.
    #[serde(with = "humantime_serde_compat")]
    pub timeout: Duration,
    /// Prefix of the Redis keys (instances sharing a cluster use the same one).
    pub prefix: String,
}

impl Default for SharedConfig {
    fn default() -> Self {
        SharedConfig {
            redis_url: None,
            timeout: Duration::from_millis(50),
            prefix: "tidemark".into(),
        }
    }
}

fn default_listen() -> String {
    "127.0.0.1:6432".into()
}
fn default_host() -> String {
    "127.0.0.1".into()
}
fn default_auth() -> AuthMethod {
    AuthMethod::ScramSha256
}

/// Durations written as `200ms`, `2s`, `1m`.
pub(crate) mod humantime_serde_compat {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(|e| {
            serde::de::Error::custom(format!(
                "invalid duration '{s}': {e} (write e.g. \"200ms\", \"2s\", \"1m\")"
            ))
        })
    }
}

/// Parses sizes such as `16MB`, `512kB`, `1GB` or a plain number of bytes.
pub fn parse_size(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: usize = num
        .parse()
        .map_err(|_| format!("invalid size '{s}' (write e.g. \"16MB\")"))?;
    let mul = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" | "k" => 1024,
        "mb" | "m" => 1024 * 1024,
        "gb" | "g" => 1024 * 1024 * 1024,
        _ => return Err(format!("invalid size unit in '{s}' (use B, kB, MB or GB)")),
    };
    n.checked_mul(mul)
        .ok_or_else(|| format!("size '{s}' is too large"))
}

impl Config {
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read config file {}: {e}", path.display()))?;
        Config::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }

    pub fn parse(text: &str) -> anyhow::Result<Config> {
        let mut cfg: Config =
            toml::from_str(text).map_err(|e| match crate::config_file::key_at(text, e.span()) {
                Some(key) => anyhow::anyhow!("{key}: {}\n{e}", e.message()),
                None => anyhow::anyhow!("{e}"),
            })?;
        crate::config_file::resolve_secrets(&mut cfg)?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        use anyhow::bail;
        self.listen
            .parse::<SocketAddr>()
            .map_err(|e| anyhow::anyhow!("listen: '{}' is not host:port ({e})", self.listen))?;
        if self.nodes.is_empty() {
            bail!("nodes: at least one node is needed ([[nodes]] name, host, port)");
        }
        let mut names = std::collections::HashSet::new();
        let mut standby_names = std::collections::HashSet::new();
        for n in &self.nodes {
            if !names.insert(n.name.as_str()) {
                bail!("nodes: the name '{}' is used twice", n.name);
            }
            if !standby_names.insert(n.standby_name()) {
                bail!(
                    "nodes.{}: application_name '{}' is used by another node; each standby needs its own to be told apart in pg_stat_replication",
                    n.name,
                    n.standby_name()
                );
            }
            if n.port == 0 {
                bail!("nodes.{}: port 0 is not a valid port", n.name);
            }
        }
        for n in &self.nodes {
            self.validate_server_tls(n)?;
        }
        match (&self.tls.cert_file, &self.tls.key_file) {
            (Some(_), None) | (None, Some(_)) => {
                bail!("tls: cert_file and key_file go together (both or neither)")
            }
            (None, None) if self.tls.mode == TlsMode::Require => {
                bail!("tls.mode = \"require\" needs tls.cert_file and tls.key_file")
            }
            _ => {}
        }
        if let Some(p) = &self.routing.primary {
            if !names.contains(p.as_str()) {
                bail!("routing.primary: '{p}' is not one of the [[nodes]] names");
            }
        }
        if self.shared.timeout.is_zero() {
            bail!("shared.timeout must be more than 0");
        }
        if let Some(u) = &self.shared.redis_url {
            redis::Client::open(u.as_str())
                .map_err(|e| anyhow::anyhow!("shared.redis_url: {e}"))?;
        }
        let attr = &self.routing.comment_key_attribute;
        if attr.is_empty()
            || attr.contains(['=', ',', '\'', '*', '/'])
            || attr.contains(char::is_whitespace)
        {
            bail!("routing.comment_key_attribute: {attr:?} is not a sqlcommenter attribute name (e.g. \"tidemark_key\")");
        }
        self.routing
            .consistency
            .parse::<Consistency>()
            .map_err(|e| anyhow::anyhow!("routing.consistency: {e}"))?;
        for u in &self.users {
            if let Some(c) = &u.consistency {
                c.parse::<Consistency>()
                    .map_err(|e| anyhow::anyhow!("users.{}.consistency: {e}", u.name))?;
            }
            if u.auth != AuthMethod::Trust && u.password.is_none() {
                bail!(
                    "users.{}: auth = {:?} needs a password (or set auth = \"trust\")",
                    u.name,
                    u.auth
                );
            }
            if let Some(p) = u.password.as_deref() {
                if p.starts_with("SCRAM-SHA-256$") && crate::auth::ScramSecret::parse(p).is_none() {
                    bail!(
                        "users.{}: password looks like a SCRAM verifier but does not parse (want SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>, base64)",
                        u.name
                    );
                }
            }
            if u.auth == AuthMethod::Md5 && u.has_verifier() {
                bail!(
                    "users.{}: md5 authentication needs the plain password, not a SCRAM verifier",
                    u.name
                );
            }
        }
        self.auth.validate()?;
        for a in &self.admin_users {
            if self.user(a).is_none() {
                bail!("admin_users: '{a}' is not one of the [[users]]");
            }
        }
        if self.limits.max_pending_logins == 0 {
            bail!("limits.max_pending_logins: must be at least 1");
        }
        if self.limits.login_timeout.is_zero() {
            bail!("limits.login_timeout: must be more than 0 (e.g. \"15s\")");
        }
        parse_size(&self.limits.max_prepared_bytes_per_client)
            .map_err(|e| anyhow::anyhow!("limits.max_prepared_bytes_per_client: {e}"))?;
        if self.pool.max_size == 0 {
            bail!("pool.max_size: must be at least 1");
        }
        if self.pool.min_size > self.pool.max_size {
            bail!("pool.min_size: must not exceed pool.max_size");
        }
        parse_size(&self.limits.max_message_size)
            .map_err(|e| anyhow::anyhow!("limits.max_message_size: {e}"))?;
        self.gate()
            .validate()
            .map_err(|e| anyhow::anyhow!("monitor: {e}"))?;
        let m = &self.monitor;
        if m.interval.is_zero() {
            bail!("monitor.interval: must be more than 0 (e.g. \"5ms\")");
        }
        if m.idle_interval.max(m.interval) >= m.timeout {
            bail!("monitor.interval and monitor.idle_interval: must be shorter than monitor.timeout (a node polled that rarely would look stale between polls)");
        }
        if let Some(l) = &self.log_level {
            tracing_subscriber::EnvFilter::try_new(l).map_err(|e| {
                anyhow::anyhow!("log_level: '{l}' is not a log filter ({e}); write e.g. \"info\" or \"tidemark=debug\"")
            })?;
        }
        if let Some(m) = &self.metrics.listen {
            m.parse::<SocketAddr>()
                .map_err(|e| anyhow::anyhow!("metrics.listen: '{m}' is not host:port ({e})"))?;
        }
        Ok(())
    }

    /// The effective `server_tls` settings of `node`: its own keys, else the global ones.
    pub fn server_tls_for(&self, node: &NodeConfig) -> ResolvedServerTls {
        let (g, n) = (&self.server_tls, &node.server_tls);
        let field = if *n == ServerTlsConfig::default() {
            "server_tls".to_string()
        } else {
            format!("nodes.{}.server_tls", node.name)
        };
        ResolvedServerTls {
            sslmode: n.sslmode.or(g.sslmode).unwrap_or_default(),
            sslrootcert: n.sslrootcert.clone().or_else(|| g.sslrootcert.clone()),
            sslcert: n.sslcert.clone().or_else(|| g.sslcert.clone()),
            sslkey: n.sslkey.clone().or_else(|| g.sslkey.clone()),
            field,
        }
    }

    fn validate_server_tls(&self, node: &NodeConfig) -> anyhow::Result<()> {
        let t = self.server_tls_for(node);
        if matches!(t.sslmode, SslMode::VerifyCa | SslMode::VerifyFull) && t.sslrootcert.is_none() {
            anyhow::bail!(
                "{}.sslrootcert: sslmode = \"{}\" (node {}) needs the PEM file of the certificate authority to trust; set sslrootcert, or use sslmode = \"require\" to encrypt without verifying",
                t.field,
                t.sslmode,
                node.name
            );
        }
        if t.sslcert.is_some() != t.sslkey.is_some() {
            anyhow::bail!(
                "{}.sslcert and {}.sslkey: a client certificate needs both (node {})",
                t.field,
                t.field,
                node.name
            );
        }
        if t.sslmode == SslMode::Disable
            && (t.sslrootcert.is_some() || t.sslcert.is_some())
            && t.field != "server_tls"
        {
            anyhow::bail!(
                "{}.sslmode: \"disable\" with certificate files set for node {} (remove them or pick another sslmode)",
                t.field,
                node.name
            );
        }
        Ok(())
    }

    pub fn gate(&self) -> GateConfig {
        GateConfig {
            max_lag: self.monitor.max_lag,
            return_below: self.monitor.return_below,
            max_lag_bytes: self.monitor.max_lag_bytes,
            samples: self.monitor.samples,
        }
    }

    pub fn user(&self, name: &str) -> Option<&UserConfig> {
        self.users.iter().find(|u| u.name == name)
    }

    pub fn default_consistency(&self, user: &str) -> Consistency {
        self.user(user)
            .and_then(|u| u.consistency.as_deref())
            .unwrap_or(&self.routing.consistency)
            .parse()
            .unwrap_or_default()
    }

    /// Where this user's transactions run: the user's `transactions`, else `routing.transactions`.
    pub fn default_transactions(&self, user: &str) -> TxMode {
        self.user(user)
            .and_then(|u| u.transactions)
            .unwrap_or(self.routing.transactions)
    }

    pub fn max_prepared_bytes(&self) -> usize {
        parse_size(&self.limits.max_prepared_bytes_per_client).unwrap_or(16 * 1024 * 1024)
    }

    pub fn max_message_size(&self) -> usize {
        parse_size(&self.limits.max_message_size).unwrap_or(256 * 1024 * 1024)
    }

    pub fn primary_index(&self) -> Option<usize> {
        let p = self.routing.primary.as_ref()?;
        self.nodes.iter().position(|n| &n.name == p && !n.retired)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = r#"
[[nodes]]
name = "p"
port = 5432
"#;

    /// The configuration the README shows loads and validates as it is.
    #[test]
    fn readme_config_loads() {
        let readme = include_str!("../../../README.md");
        let start = readme
            .find("```toml\n")
            .expect("a toml block in the README")
            + 8;
        let len = readme[start..].find("```").expect("its end");
        let c = Config::parse(&readme[start..start + len]).expect("README config parses");
        c.validate().expect("README config validates");
        assert_eq!(c.users[0].auth, AuthMethod::ScramSha256);
    }

    #[test]
    fn bad_verifiers_and_unknown_admins_are_refused_by_name() {
        let bad = format!(
            "{MIN}\n[[users]]\nname = \"app\"\npassword = \"SCRAM-SHA-256$4096:abc$notbase64\"\n"
        );
        let e = Config::parse(&bad).and_then(|c| c.validate()).unwrap_err();
        assert!(e.to_string().contains("users.app"), "{e}");
        let bad = format!("admin_users = [\"root\"]\n{MIN}");
        let e = Config::parse(&bad).and_then(|c| c.validate()).unwrap_err();
        assert!(e.to_string().contains("admin_users: 'root'"), "{e}");
        for spelling in ["scram-sha-256", "scram-sha256"] {
            let ok = format!(
                "{MIN}\n[[users]]\nname = \"app\"\npassword = \"x\"\nauth = \"{spelling}\"\n"
            );
            let c = Config::parse(&ok).unwrap();
            assert_eq!(c.users[0].auth, AuthMethod::ScramSha256);
        }
    }

    #[test]
    fn minimal_config_has_defaults() {
        let c = Config::parse(MIN).unwrap();
        assert_eq!(c.listen, "127.0.0.1:6432");
        assert_eq!(c.pool.mode, PoolMode::Transaction);
        assert_eq!(c.routing.max_wait, Duration::from_millis(20));
    }

    #[test]
    fn transactions_mode_per_routing_and_user() {
        let c = Config::parse(MIN).unwrap();
        assert_eq!(c.routing.transactions, TxMode::ReadOnly);
        assert_eq!(c.routing.replay_budget_bytes, 64 * 1024);
        assert_eq!(c.default_transactions("anyone"), TxMode::ReadOnly);
        let text = format!(
            "{MIN}\n[routing]\ntransactions = \"optimistic\"\nreplay_budget_bytes = 1000\n[[users]]\nname = \"a\"\npassword = \"x\"\ntransactions = \"primary\"\n"
        );
        let c = Config::parse(&text).unwrap();
        c.validate().unwrap();
        assert_eq!(c.default_transactions("a"), TxMode::Primary);
        assert_eq!(c.default_transactions("b"), TxMode::Optimistic);
        assert_eq!(c.routing.replay_budget_bytes, 1000);
        let e = Config::parse(&format!("{MIN}\n[routing]\ntransactions = \"sometimes\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("transactions"), "{e}");
        for (text, mode) in [
            ("primary", TxMode::Primary),
            ("READ_ONLY", TxMode::ReadOnly),
            ("read-only", TxMode::ReadOnly),
            ("optimistic", TxMode::Optimistic),
        ] {
            assert_eq!(text.parse::<TxMode>(), Ok(mode));
        }
        assert!("sometimes".parse::<TxMode>().is_err());
    }

    #[test]
    fn errors_name_the_field() {
        let bad = [
            ("listen = \"nope\"\n[[nodes]]\nname=\"p\"\nport=1", "listen"),
            ("nodes = []", "nodes"),
            (
                "[[nodes]]\nname=\"p\"\nport=1\n[routing]\nconsistency=\"sometimes\"",
                "routing.consistency",
            ),
            (
                "[[nodes]]\nname=\"p\"\nport=1\n[pool]\nidle_timeout=\"soon\"",
                "invalid duration",
            ),
            ("[[nodes]]\nname=\"p\"\nport=1\nbogus=1", "bogus"),
            (
                "[[nodes]]\nname=\"p\"\nport=1\n[[users]]\nname=\"a\"",
                "needs a password",
            ),
            (
                "[[nodes]]\nname=\"p\"\nport=1\n[routing]\nprimary=\"q\"",
                "routing.primary",
            ),
            (
                "[[nodes]]\nname=\"p\"\nport=1\n[monitor]\ninterval=\"0ms\"",
                "monitor.interval",
            ),
            (
                "[[nodes]]\nname=\"p\"\nport=1\n[monitor]\nidle_interval=\"5s\"",
                "monitor.idle_interval",
            ),
        ];
        for (text, needle) in bad {
            let e = Config::parse(text).unwrap_err().to_string();
            assert!(e.contains(needle), "{e} should mention {needle}");
        }
    }

    #[test]
    fn server_tls_modes_parse_and_validate() {
        // Default: prefer, like libpq.
        let c = Config::parse(MIN).unwrap();
        assert_eq!(c.server_tls_for(&c.nodes[0]).sslmode, SslMode::Prefer);
        for (text, mode) in [
            ("disable", SslMode::Disable),
            ("prefer", SslMode::Prefer),
            ("require", SslMode::Require),
            ("verify-ca", SslMode::VerifyCa),
            ("verify-full", SslMode::VerifyFull),
        ] {
            let t =
                format!("{MIN}[server_tls]\nsslmode = \"{text}\"\nsslrootcert = \"/etc/ca.pem\"\n");
            let c = Config::parse(&t).unwrap();
            assert_eq!(c.server_tls_for(&c.nodes[0]).sslmode, mode);
            assert_eq!(mode.as_str(), text);
        }
        let e = Config::parse(&format!("{MIN}[server_tls]\nsslmode = \"always\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("verify-full"), "{e}");
        // verify-* without a root certificate is refused at load, naming the field.
        let e = Config::parse(&format!("{MIN}[server_tls]\nsslmode = \"verify-ca\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("server_tls.sslrootcert"), "{e}");
        // A per-node override wins key by key, and its errors name the node's table.
        let t = "[server_tls]\nsslmode = \"require\"\n\n[[nodes]]\nname = \"p\"\nport = 5432\n\n[[nodes]]\nname = \"r1\"\nport = 5433\nserver_tls = { sslmode = \"verify-full\" }\n";
        let e = Config::parse(t).unwrap_err().to_string();
        assert!(e.contains("nodes.r1.server_tls.sslrootcert"), "{e}");
        let t = t.replace(
            "{ sslmode = \"verify-full\" }",
            "{ sslmode = \"verify-full\", sslrootcert = \"/ca.pem\" }",
        );
        let c = Config::parse(&t).unwrap();
        assert_eq!(c.server_tls_for(&c.nodes[0]).sslmode, SslMode::Require);
        let r1 = c.server_tls_for(&c.nodes[1]);
        assert_eq!(r1.sslmode, SslMode::VerifyFull);
        assert_eq!(r1.sslrootcert.as_deref(), Some(Path::new("/ca.pem")));
        // A client certificate needs its key.
        let e = Config::parse(&format!("{MIN}[server_tls]\nsslcert = \"/c.pem\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("server_tls.sslkey"), "{e}");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("16MB").unwrap(), 16 << 20);
        assert_eq!(parse_size("100").unwrap(), 100);
        assert!(parse_size("12 parsecs").is_err());
    }
}
