//! Process-wide state shared by every session: the config, the published cluster view,
//! the statement classifier, the key store, the pools and the cancel registry. Sessions
//! only read the cluster view; the monitor is its only writer.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use tidemark_core::{ClusterView, KeyStore, Lsn, MemoryKeyStore, NodeId};
use tidemark_sql::{Classifier, FunctionPolicy};
use tokio::sync::Notify;

use crate::auth::{ClientKey, ScramSecret};
use crate::config::{Config, UserConfig};
use crate::passthrough::{KeySlot, ScramKeys};
use crate::pool::{Pool, PoolKey, Pools};
use crate::server::ServerTarget;

/// Where to send a cancel for the statement a client is running right now.
#[derive(Clone, Debug)]
pub struct CancelTarget {
    /// The node (address and TLS settings) the statement runs on.
    pub node: Arc<crate::server_tls::NodeTls>,
    pub pid: i32,
    pub secret: i32,
}

/// A client's cancel slot: the server statement it runs now, and the cancel requests for it
/// that are on their way to the server.
///
/// A cancel travels on a connection of its own and may reach the server after the statement
/// ended. PostgreSQL ignores a cancel that finds its backend idle, but if the server
/// connection had gone back to the pool and another client's statement started on it, that
/// statement would be canceled. So a unit that ends while a cancel for it is still on its way
/// ([`CancelSlot::clear`] says so) keeps its server connection from any other client: the
/// session closes it at release.
#[derive(Debug, Default)]
pub struct CancelSlot {
    target: Option<CancelTarget>,
    /// Counts [`CancelSlot::set`]s: a cancel that ends after its unit is not counted against
    /// a later one.
    unit: u64,
    /// Cancels forwarded for the current `target` whose delivery is not confirmed yet.
    in_flight: u32,
}

impl CancelSlot {
    /// A unit starts on `t`.
    pub fn set(&mut self, t: CancelTarget) {
        self.target = Some(t);
        self.unit = self.unit.wrapping_add(1);
        self.in_flight = 0;
    }

    /// The unit ended: whether a cancel forwarded for it may still reach its server connection
    /// (which then must not serve another client).
    pub fn clear(&mut self) -> bool {
        self.target = None;
        std::mem::take(&mut self.in_flight) > 0
    }

    /// A cancel for the current statement, if one runs: counted in flight until
    /// [`CancelSlot::delivered`].
    fn start_cancel(&mut self) -> Option<(CancelTarget, u64)> {
        let t = self.target.clone()?;
        self.in_flight += 1;
        Some((t, self.unit))
    }

    /// The server has the cancel started in `unit` (or it was never sent).
    fn delivered(&mut self, unit: u64) {
        if self.unit == unit && self.target.is_some() {
            self.in_flight = self.in_flight.saturating_sub(1);
        }
    }
}

/// Forwards a cancel for the statement in `slot`, if any, and waits until the server has it.
async fn forward_cancel(slot: &Mutex<CancelSlot>) {
    let Some((t, unit)) = slot.lock().start_cancel() else {
        return;
    };
    match crate::server::cancel(&t.node, t.pid, t.secret).await {
        // Not confirmed in time: it may still arrive, so it stays counted and the unit's
        // connection is not reused.
        Ok(false) => {}
        Ok(true) => slot.lock().delivered(unit),
        Err(e) => {
            tracing::warn!(error = %e, "forwarding cancel request failed");
            slot.lock().delivered(unit);
        }
    }
}

pub struct ClientEntry {
    pub secret: i32,
    pub slot: Arc<Mutex<CancelSlot>>,
    pub info: Arc<Mutex<ClientInfo>>,
    /// Raised to end the session (`pg_terminate_backend` on its pid) or at shutdown.
    pub signal: Arc<ClientSignal>,
}

/// What tidemark asks of one client session from outside it: end now
/// (`pg_terminate_backend`), or end when idle (shutdown). A pair of flags and one waker: the
/// session polls it beside its sockets on every wait, so it must cost no allocation and no
/// lock (a `Notify` or a `watch` registers and unregisters a waiter on each poll, which showed
/// in the per-statement profile).
#[derive(Default)]
pub struct ClientSignal {
    flags: std::sync::atomic::AtomicU8,
    waker: futures_util::task::AtomicWaker,
}

impl ClientSignal {
    /// `pg_terminate_backend`: the session ends at once, with 57P01.
    pub const KILL: u8 = 1;
    /// Shutdown: the session ends with 57P01 once it is idle.
    pub const SHUTDOWN: u8 = 2;

    pub fn raise(&self, flag: u8) {
        self.flags.fetch_or(flag, Ordering::SeqCst);
        self.waker.wake();
    }

    /// The raised flags among `mask` (0: none).
    pub fn raised(&self, mask: u8) -> u8 {
        self.flags.load(Ordering::SeqCst) & mask
    }

    /// Resolves with the raised flags among `mask` once one is raised.
    pub fn wait(&self, mask: u8) -> impl std::future::Future<Output = u8> + '_ {
        std::future::poll_fn(move |cx| {
            let f = self.raised(mask);
            if f != 0 {
                return std::task::Poll::Ready(f);
            }
            self.waker.register(cx.waker());
            match self.raised(mask) {
                0 => std::task::Poll::Pending,
                f => std::task::Poll::Ready(f),
            }
        })
    }
}

/// What `pg_terminate_backend`/`pg_cancel_backend` on a pid did.
#[derive(Debug, PartialEq, Eq)]
pub enum Signalled {
    /// No tidemark client has that pid (it may be a server's: the call goes to the server).
    NotOurs,
    /// The caller may not signal that client's session (another user).
    Denied,
    Done,
}

/// Pids tidemark gives clients start here: above any Linux pid (pid_max is at most 2^22), so a
/// pid a client was given is never also a server process's pid.
const FIRST_CLIENT_PID: i32 = 1 << 30;

/// What the admin console shows of a client.
#[derive(Clone, Debug, Default)]
pub struct ClientInfo {
    pub user: String,
    pub database: String,
    pub addr: String,
    pub state: &'static str,
    pub node: Option<NodeId>,
    pub consistency: String,
}

pub struct App {
    pub config: ArcSwap<Config>,
    pub view: ArcSwap<ClusterView>,
    /// Woken whenever the monitor publishes a new view.
    pub view_changed: Notify,
    pub classifier: Classifier,
    /// What optimistic transactions learned per shape, and their outcomes.
    pub transactions: crate::tx_shapes::TxShapes,
    /// Replica positions checked in the same round trip as the read they gate: [caught up,
    /// behind] (also `tidemark_replica_checks_total`).
    pub replica_checks: [std::sync::atomic::AtomicU64; 2],
    /// Writes whose commit position was left unread, nothing depending on it (see
    /// `Session::may_leave_position_unread`; also `tidemark_commit_lsn_captures_skipped_total`).
    pub captures_skipped: std::sync::atomic::AtomicU64,
    /// The current primary's position at its last successful poll, and when that poll was
    /// sent: at or past every commit acknowledged before then (kept while the primary is down).
    /// A session whose positions were left unread resolves them with it when the poll was sent
    /// after its last such write (`Session::resolve_unknown_write`).
    pub last_primary_poll: Mutex<Option<(Lsn, std::time::Instant)>>,
    /// Shared statement names whose server copies went stale (see `retire_shared_name`): the
    /// hash of the text, types and settings, and how many times its name was retired.
    retired_names: Mutex<HashMap<u64, u32>>,
    any_retired: std::sync::atomic::AtomicBool,
    /// The result shape (`tidemark_wire::backend::row_shape`) clients were first given for
    /// each shared statement name: a copy prepared later must have it (see `shape_of`).
    shapes: Mutex<HashMap<String, u64>>,
    pub keys: Arc<dyn KeyStore>,
    /// The highest commit position acknowledged to any client: `causal` reads depend on it.
    pub causal: tidemark_core::CausalFloor,
    /// The key store and causal floor shared with other instances (`[shared]`), if configured.
    pub shared: Option<Arc<crate::shared::Shared>>,
    pub pools: Pools,
    scram: Mutex<HashMap<String, Arc<ScramSecret>>>,
    /// SCRAM pass-through: each user's last ClientKey, shared with that user's pools.
    key_slots: Mutex<HashMap<String, Arc<KeySlot>>>,
    /// `[auth]` lookups of users not in `[[users]]` and their cache.
    pub auth_query: crate::auth_query::AuthQuery,
    clients: Mutex<HashMap<i32, ClientEntry>>,
    next_pid: AtomicI32,
    pub balance: AtomicU64,
    /// Admin `PAUSE`: sessions wait for it to be false (see `Session::wait_while_paused`).
    /// Set with [`App::set_paused`], which keeps `paused_now` the same.
    pub paused: tokio::sync::watch::Sender<bool>,
    /// `paused` as a plain flag for the per-statement check: reading the watch takes its
    /// lock, which showed in the per-statement profile.
    paused_now: std::sync::atomic::AtomicBool,
    pub shutting_down: tokio::sync::watch::Sender<bool>,
    /// TLS for clients (`[tls]`), rebuilt on RELOAD.
    pub tls: arc_swap::ArcSwapOption<tokio_rustls::TlsAcceptor>,
    /// Each node's address and TLS settings towards it (`server_tls`), in node order;
    /// rebuilt on RELOAD (pools made before keep theirs).
    pub server_tls: ArcSwap<Vec<Arc<crate::server_tls::NodeTls>>>,
    /// Why the monitor last failed to reach each node that is down (cleared when it is
    /// reachable again); told to clients that find no node.
    pub node_errors: Mutex<HashMap<NodeId, String>>,
    /// The monitor's poll pace, shared with sessions so a commit can speed it up.
    pub monitor_pace: crate::pace::Pace,
    /// Connections that have not finished logging in (see `listener::LoginSlot`).
    pub pending_logins: std::sync::atomic::AtomicUsize,
    /// Bumped by a RELOAD that added, removed or moved nodes (the monitor follows it).
    pub nodes_changed: tokio::sync::watch::Sender<u64>,
    /// Key of the decoy SCRAM secrets unknown users are challenged with (random per process).
    decoy_key: [u8; 32],
}

impl App {
    /// Pauses (`true`) or resumes new transactions; returns the previous state.
    pub fn set_paused(&self, paused: bool) -> bool {
        self.paused_now.store(paused, Ordering::Relaxed);
        self.paused.send_replace(paused)
    }

    /// Whether new transactions are held (admin `PAUSE`); a unit that reads `false` while a
    /// PAUSE is being applied runs as one that arrived just before it.
    pub fn is_paused(&self) -> bool {
        self.paused_now.load(Ordering::Relaxed)
    }

    /// The shared state for `config`; fails when a `server_tls` file cannot be loaded.
    pub fn new(config: Config) -> anyhow::Result<Arc<App>> {
        let server_tls = crate::server_tls::NodeTls::build_all(&config)?;
        let classifier = Classifier::new(
            config.routing.classify_cache,
            FunctionPolicy {
                write_functions: config.routing.write_functions.clone(),
                read_only_functions: config.routing.read_only_functions.clone(),
            },
        );
        classifier.set_comment_key_attribute(&config.routing.comment_key_attribute);
        let keys = Arc::new(MemoryKeyStore::new(config.routing.key_store_capacity));
        let shared = crate::shared::Shared::new(&config.shared)?;
        let view = initial_view(&config);
        let app = App {
            config: ArcSwap::from_pointee(config),
            view: ArcSwap::from_pointee(view),
            view_changed: Notify::new(),
            classifier,
            transactions: Default::default(),
            replica_checks: Default::default(),
            captures_skipped: Default::default(),
            last_primary_poll: Mutex::new(None),
            retired_names: Mutex::new(HashMap::new()),
            any_retired: Default::default(),
            shapes: Mutex::new(HashMap::new()),
            keys,
            causal: tidemark_core::CausalFloor::new(),
            shared,
            pools: Pools::default(),
            scram: Mutex::new(HashMap::new()),
            key_slots: Mutex::new(HashMap::new()),
            auth_query: Default::default(),
            clients: Mutex::new(HashMap::new()),
            next_pid: AtomicI32::new(FIRST_CLIENT_PID),
            balance: AtomicU64::new(0),
            paused: tokio::sync::watch::channel(false).0,
            paused_now: std::sync::atomic::AtomicBool::new(false),
            shutting_down: tokio::sync::watch::channel(false).0,
            tls: arc_swap::ArcSwapOption::empty(),
            server_tls: ArcSwap::from_pointee(server_tls),
            node_errors: Mutex::new(HashMap::new()),
            monitor_pace: crate::pace::Pace::default(),
            pending_logins: std::sync::atomic::AtomicUsize::new(0),
            nodes_changed: tokio::sync::watch::channel(0).0,
            decoy_key: rand::random(),
        };
        app.refresh_secrets();
        Ok(Arc::new(app))
    }

    /// `node A: why; node B: why` for the nodes the monitor cannot reach, if any.
    pub fn node_errors_detail(&self) -> Option<String> {
        let errs = self.node_errors.lock();
        if errs.is_empty() {
            return None;
        }
        let mut v: Vec<_> = errs.iter().collect();
        v.sort_by_key(|(i, _)| **i);
        Some(
            v.into_iter()
                .map(|(_, e)| e.as_str())
                .collect::<Vec<_>>()
                .join("; "),
        )
    }

    /// Node `node`'s address and TLS settings.
    pub fn node_tls(&self, node: NodeId) -> Option<Arc<crate::server_tls::NodeTls>> {
        self.server_tls.load().get(node).cloned()
    }

    /// Recomputes SCRAM secrets of configured users (at start and on RELOAD).
    pub fn refresh_secrets(&self) {
        let cfg = self.config.load();
        let mut m = self.scram.lock();
        m.retain(|name, _| cfg.user(name).is_some());
        for u in &cfg.users {
            if let Some(s) = ScramSecret::for_user(u) {
                m.insert(u.name.clone(), Arc::new(s));
            }
        }
        // A ClientKey is kept only while it still matches the user's verifier; a user that
        // left the config loses it (auth_query users keep theirs: the next login replaces it).
        for (name, slot) in self.key_slots.lock().iter() {
            if cfg.user(name).is_some() || !cfg.auth.enabled() {
                let keep = uses_passthrough(&cfg, name)
                    .then(|| m.get(name).cloned())
                    .flatten();
                slot.keep_only(keep.as_deref());
            }
        }
        self.auth_query.clear();
    }

    /// The pass-through key slot of `user` (created empty on first use).
    pub fn key_slot(&self, user: &str) -> Arc<KeySlot> {
        self.key_slots
            .lock()
            .entry(user.to_string())
            .or_default()
            .clone()
    }

    /// Keeps the ClientKey a SCRAM login revealed, if this user's server connections use
    /// pass-through (no plaintext password towards the servers); otherwise it is dropped.
    pub fn remember_client_key(&self, user: &str, secret: &ScramSecret, key: ClientKey) {
        if uses_passthrough(&self.config.load(), user) {
            self.key_slot(user).set(ScramKeys {
                secret: secret.clone(),
                client_key: key,
            });
        }
    }

    /// The SCRAM secret an unknown user is challenged with (no password matches it).
    pub fn decoy_secret(&self, user: &str) -> ScramSecret {
        ScramSecret::decoy(&self.decoy_key, user)
    }

    pub fn scram_secret(&self, user: &str) -> Option<Arc<ScramSecret>> {
        self.scram.lock().get(user).cloned()
    }

    pub fn pool(&self, node: NodeId, database: &str, user: &str) -> Option<Arc<Pool>> {
        let cfg = self.config.load();
        // A node a RELOAD removed gets no new server connections.
        let n = cfg.nodes.get(node).filter(|n| !n.retired)?;
        let tls = self.node_tls(node)?;
        let key = PoolKey {
            node,
            database: database.to_string(),
            user: user.to_string(),
        };
        let password = cfg.user(user).and_then(UserConfig::server_password);
        let keys = uses_passthrough(&cfg, user).then(|| self.key_slot(user));
        Some(self.pools.get_or_create(key.clone(), || {
            Pool::new(
                key,
                &n.name,
                ServerTarget {
                    node,
                    host: n.host.clone(),
                    port: n.port,
                    user: user.to_string(),
                    password,
                    database: database.to_string(),
                    tls,
                    keys,
                },
                cfg.pool.clone(),
            )
        }))
    }

    /// A tokio-postgres client on `node` with the monitor's credentials (for tidemark's own
    /// queries: catalog, replication slots), bounded by `monitor.timeout`.
    pub async fn monitor_client(
        &self,
        node: NodeId,
        application_name: &str,
    ) -> anyhow::Result<tokio_postgres::Client> {
        let cfg = self.config.load_full();
        let n = cfg
            .nodes
            .get(node)
            .filter(|n| !n.retired)
            .ok_or_else(|| anyhow::anyhow!("no node {node}"))?;
        let tls = self
            .node_tls(node)
            .ok_or_else(|| anyhow::anyhow!("no node {node}"))?;
        let pg = monitor_pg_config(&cfg, n, application_name);
        tokio::time::timeout(cfg.monitor.timeout, tls.pg_connect(pg))
            .await
            .map_err(|_| anyhow::anyhow!("connecting to node {} timed out", n.name))?
    }

    pub fn node_name(&self, node: NodeId) -> String {
        self.config
            .load()
            .nodes
            .get(node)
            .map(|n| n.name.clone())
            .unwrap_or_else(|| format!("node{node}"))
    }

    /// The name server connections know a client statement by: `tm_` and the hash of its
    /// text, parameter types and session settings, shared by every client with the same ones;
    /// with a suffix once that name was retired (the copies under it went stale).
    pub fn shared_name(&self, hash: u64) -> String {
        let epoch = if self.any_retired.load(Ordering::Relaxed) {
            self.retired_names.lock().get(&hash).copied().unwrap_or(0)
        } else {
            0
        };
        match epoch {
            0 => format!("tm_{hash:016x}"),
            e => format!("tm_{hash:016x}_{e}"),
        }
    }

    /// A server answered a statement under `name` with 0A000 "cached plan must not change
    /// result type": its result shape changed since that server's copy was prepared, and every
    /// copy prepared before the change is stale. Statements prepared from now on get a new
    /// name (a fresh copy on each connection); clients holding the old name keep getting the
    /// 0A000 they would get directly, until they prepare again. Retiring a name that was
    /// already retired since does nothing. At most 65,536 texts are remembered.
    pub fn retire_shared_name(&self, name: &str) {
        let Some(rest) = name.strip_prefix("tm_") else {
            return;
        };
        let (hex, epoch) = match rest.split_once('_') {
            Some((h, e)) => (h, e.parse::<u32>().unwrap_or(0)),
            None => (rest, 0),
        };
        let Ok(hash) = u64::from_str_radix(hex, 16) else {
            return;
        };
        let mut m = self.retired_names.lock();
        if m.len() >= 65_536 && !m.contains_key(&hash) {
            tracing::warn!(
                statement = name,
                "too many retired statement names to remember one more"
            );
            return;
        }
        let e = m.entry(hash).or_insert(0);
        if *e == epoch {
            *e = epoch.saturating_add(1);
            tracing::info!(statement = name, "a prepared statement's result shape changed on the server: statements prepared from now on get fresh server copies");
        }
        self.any_retired.store(true, Ordering::Relaxed);
    }

    /// A server described the statement under shared name `name` to a client with result
    /// shape `shape`. The first shape is kept: clients decode rows with it, and a copy of the
    /// statement prepared later on another connection must have it. A different shape means
    /// the statement's tables changed since: the name is retired, so statements prepared from
    /// now on get fresh copies. At most 65,536 names are remembered.
    pub fn note_described_shape(&self, name: &str, shape: u64) {
        let mut m = self.shapes.lock();
        match m.get(name) {
            Some(&known) if known != shape => {
                drop(m);
                self.retire_shared_name(name);
            }
            Some(_) => {}
            None if m.len() < 65_536 => {
                m.insert(name.to_string(), shape);
            }
            None => {}
        }
    }

    /// The result shape clients were given for shared statement name `name`, if known.
    pub fn shape_of(&self, name: &str) -> Option<u64> {
        self.shapes.lock().get(name).copied()
    }

    /// Registers a client for cancel requests and signals; returns its (pid, secret).
    pub fn register_client(
        &self,
        slot: Arc<Mutex<CancelSlot>>,
        info: Arc<Mutex<ClientInfo>>,
        signal: Arc<ClientSignal>,
    ) -> (i32, i32) {
        let secret = rand::random::<i32>();
        let mut clients = self.clients.lock();
        let pid = loop {
            let p = self.next_pid.fetch_add(1, Ordering::Relaxed);
            if p < FIRST_CLIENT_PID {
                // Wrapped around after 2^31 - 2^30 clients: start again.
                self.next_pid.store(FIRST_CLIENT_PID, Ordering::Relaxed);
                continue;
            }
            if !clients.contains_key(&p) {
                break p;
            }
        };
        clients.insert(
            pid,
            ClientEntry {
                secret,
                slot,
                info,
                signal,
            },
        );
        crate::metrics::clients(1.0);
        (pid, secret)
    }

    /// Moves a client's registration to another (pid, secret) — in session pooling, the
    /// server's own. False (nothing changes) if that pid is taken.
    pub fn rekey_client(&self, pid: i32, new_pid: i32, new_secret: i32) -> bool {
        let mut clients = self.clients.lock();
        if clients.contains_key(&new_pid) {
            return false;
        }
        let Some(mut e) = clients.remove(&pid) else {
            return false;
        };
        e.secret = new_secret;
        clients.insert(new_pid, e);
        true
    }

    /// `pg_terminate_backend(pid)` / `pg_cancel_backend(pid)` for a pid tidemark gave a
    /// client: allowed on the caller's own user's sessions, or for an admin user.
    pub async fn signal_client(
        &self,
        pid: i32,
        terminate: bool,
        caller: &str,
        caller_is_admin: bool,
    ) -> Signalled {
        let (kill, slot) = {
            let clients = self.clients.lock();
            let Some(e) = clients.get(&pid) else {
                return Signalled::NotOurs;
            };
            if !caller_is_admin && e.info.lock().user != caller {
                return Signalled::Denied;
            }
            (e.signal.clone(), e.slot.clone())
        };
        if terminate {
            kill.raise(ClientSignal::KILL);
        } else {
            forward_cancel(&slot).await;
        }
        Signalled::Done
    }

    /// Shutdown: every client session ends once idle (57P01).
    pub fn shut_down_clients(&self) {
        for e in self.clients.lock().values() {
            e.signal.raise(ClientSignal::SHUTDOWN);
        }
    }

    pub fn unregister_client(&self, pid: i32) {
        if self.clients.lock().remove(&pid).is_some() {
            crate::metrics::clients(-1.0);
        }
    }

    pub fn client_infos(&self) -> Vec<(i32, ClientInfo)> {
        let mut v: Vec<_> = self
            .clients
            .lock()
            .iter()
            .map(|(pid, e)| (*pid, e.info.lock().clone()))
            .collect();
        v.sort_by_key(|(p, _)| *p);
        v
    }

    /// The kill handles of the clients connected to `database`, but `except`.
    pub fn clients_in_database(&self, database: &str, except: i32) -> Vec<Arc<ClientSignal>> {
        self.clients
            .lock()
            .iter()
            .filter(|(pid, e)| **pid != except && e.info.lock().database == database)
            .map(|(_, e)| e.signal.clone())
            .collect()
    }

    pub fn client_count(&self) -> usize {
        self.clients.lock().len()
    }

    /// Forwards a CancelRequest to the server connection serving that client now, if any.
    pub async fn cancel(&self, pid: i32, secret: i32) {
        let slot = {
            let clients = self.clients.lock();
            match clients.get(&pid) {
                Some(e) if e.secret == secret => e.slot.clone(),
                _ => return,
            }
        };
        forward_cancel(&slot).await;
    }
}

/// tokio-postgres settings for the monitor's credentials on node `n` (TLS is set by
/// [`crate::server_tls::NodeTls::pg_connect`]).
pub fn monitor_pg_config(
    cfg: &Config,
    n: &crate::config::NodeConfig,
    application_name: &str,
) -> tokio_postgres::Config {
    let mut pg = tokio_postgres::Config::new();
    pg.host(&n.host)
        .port(n.port)
        .user(&cfg.monitor.user)
        .dbname(&cfg.monitor.database)
        .application_name(application_name)
        .connect_timeout(cfg.monitor.timeout);
    if let Some(p) = &cfg.monitor.password {
        pg.password(p);
    }
    pg
}

/// True when `user`'s server connections log in with its ClientKey: a configured user whose
/// password is a SCRAM verifier and who has no `server_password`, or (auth_query) a user
/// not in `[[users]]`.
pub fn uses_passthrough(cfg: &Config, user: &str) -> bool {
    match cfg.user(user) {
        Some(u) => u.server_password.is_none() && u.has_verifier(),
        None => cfg.auth.enabled(),
    }
}

fn initial_view(cfg: &Config) -> ClusterView {
    ClusterView {
        nodes: cfg
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| tidemark_core::NodeStatus::new(i, n.name.clone()))
            .collect(),
        ..Default::default()
    }
}

static CONFIG_PATH: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();

/// Remembers the config file for RELOAD.
pub fn set_config_path(p: std::path::PathBuf) {
    let _ = CONFIG_PATH.set(p);
}

pub fn config_path() -> Option<std::path::PathBuf> {
    CONFIG_PATH.get().cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one_node() -> crate::config::Config {
        crate::config::Config::parse("[[nodes]]\nname = \"p\"\nhost = \"127.0.0.1\"\nport = 5432\n")
            .expect("config")
    }

    fn target() -> CancelTarget {
        let cfg = one_node();
        CancelTarget {
            node: Arc::new(crate::server_tls::NodeTls::build(&cfg, &cfg.nodes[0]).expect("tls")),
            pid: 1,
            secret: 2,
        }
    }

    #[test]
    fn a_retired_shared_name_is_replaced_once_per_retirement() {
        let app = App::new(one_node()).expect("app");
        let n0 = app.shared_name(0xabc);
        assert_eq!(n0, "tm_0000000000000abc");
        assert_eq!(app.shared_name(0xdef), "tm_0000000000000def");
        app.retire_shared_name(&n0);
        let n1 = app.shared_name(0xabc);
        assert_eq!(n1, "tm_0000000000000abc_1");
        // Other texts keep their names.
        assert_eq!(app.shared_name(0xdef), "tm_0000000000000def");
        // Failures of copies under the old name (other connections, other clients) do not
        // retire the new one.
        app.retire_shared_name(&n0);
        assert_eq!(app.shared_name(0xabc), n1);
        app.retire_shared_name(&n1);
        assert_eq!(app.shared_name(0xabc), "tm_0000000000000abc_2");
        // Names that are not shared statement names are ignored.
        for other in ["tm_capture", "s0", "tm_", "tm_zz", ""] {
            app.retire_shared_name(other);
        }
        assert_eq!(app.shared_name(0xdef), "tm_0000000000000def");
    }

    #[test]
    fn a_cancel_still_on_its_way_when_the_unit_ends_is_reported_once() {
        let mut s = CancelSlot::default();
        // No statement: nothing to cancel.
        assert!(s.start_cancel().is_none());
        assert!(!s.clear());
        // Delivered while the unit ran: the unit ends clean.
        s.set(target());
        let (_, unit) = s.start_cancel().expect("a statement runs");
        s.delivered(unit);
        assert!(!s.clear());
        // Still on its way at the end: reported, and only for that unit.
        s.set(target());
        let (_, unit) = s.start_cancel().expect("a statement runs");
        assert!(s.clear());
        s.delivered(unit);
        s.set(target());
        assert!(
            !s.clear(),
            "a cancel of the unit before counted against this one"
        );
        // Two on their way, one confirmed: still reported.
        s.set(target());
        let (_, u1) = s.start_cancel().expect("runs");
        let (_, _u2) = s.start_cancel().expect("runs");
        s.delivered(u1);
        assert!(s.clear());
        // A confirmation from an earlier unit does not hide this unit's cancel.
        s.set(target());
        let (_, u3) = s.start_cancel().expect("runs");
        s.set(target());
        let (_, _u4) = s.start_cancel().expect("runs");
        s.delivered(u3);
        assert!(s.clear());
    }
}
