//! One client session: reads routing units from the client (a simple Query, or extended
//! protocol messages up to Sync/Flush), asks `tidemark-sql` what they are and
//! `tidemark-core` where they may go, checks out a server connection, re-establishes the
//! client's session state and prepared statements on it, relays the responses, and after
//! a write captures the commit LSN the client's later reads depend on.
//!
//! Routing rules live in `tidemark_core::route`; this file only carries them out.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tidemark_core::{
    caught_up, fallback_after_wait, route, Applied, Consistency, Lsn, NodeId, NodeSet, Reason,
    Role, Route, RouteRequest, TargetHint, Unavailable,
};
use tidemark_sql::{Analysis, Class, HintTarget, SessionKind, TidemarkCommand, TxControl};
use tidemark_wire::backend::{self as be, ErrorFields};
use tidemark_wire::frontend::{self as fe, FrontendMessage};
use tidemark_wire::{Frame, StartupParams};

use crate::app::{App, CancelTarget, ClientInfo};
use crate::client::{ClientError, ClientIo};
use crate::config::{Balance, PoolMode};
use crate::pool::{Checked, PoolError};
use crate::server::ServerError;

/// Resets every setting a client can change with SET, including the two `RESET ALL` leaves
/// alone (`role` and `session_authorization` are GUC_NO_RESET_ALL in PostgreSQL).
const RESET_SQL: &str = "RESET SESSION AUTHORIZATION; RESET ROLE; RESET ALL";
/// `ServerConn::state_key` of a connection whose session state is unknown (see
/// `Analysis::opaque_state`); session keys are 0 or odd, so none matches it.
const STATE_UNKNOWN: u64 = 2;
/// `ServerConn::state_key` while a SET runs: reset (without DISCARD) before the next use.
const STATE_DIRTY: u64 = 4;
/// Most prepared statements one server connection keeps before tidemark deallocates them.
const MAX_PREPARED_PER_SERVER: usize = 5000;
/// A unit without Sync/Flush larger than this is sent on without waiting for its end.
const MAX_UNIT_BYTES: usize = 1 << 20;
/// Client messages read ahead while a unit runs.
const MAX_PENDING_BYTES: usize = 4 << 20;
/// Output held back from a replica (so a failed read can be retried invisibly).
const MAX_HELD_OUTPUT: usize = 256 * 1024;

/// A client's named prepared statement.
#[derive(Debug)]
struct Stmt {
    /// The statement text (for a text that is not UTF-8, a lossy copy; see `wire`).
    query: String,
    /// The text's bytes as the client sent them when they are not UTF-8 (a non-UTF-8
    /// `client_encoding`): what is sent to servers.
    wire: Option<Vec<u8>>,
    param_types: Vec<u32>,
    /// Name used on server connections (shared by every client with the same text).
    global: String,
    analysis: Arc<Analysis>,
}

impl Stmt {
    /// A Parse of this statement under `name` (tidemark's shared name, or "").
    fn parse_frame(&self, name: &str) -> Frame {
        match &self.wire {
            Some(bytes) => fe::parse_bytes(name, bytes, &self.param_types),
            None => fe::parse(name, &self.query, &self.param_types),
        }
    }
}

/// What tidemark knows of a statement it cannot read (text in a non-UTF-8 client encoding, a
/// protocol-level function call): it may do anything, so it goes to the primary and the
/// connection's session state is unknown afterwards.
fn opaque_analysis() -> Arc<Analysis> {
    Arc::new(Analysis {
        class: Class::Unknown,
        statements: vec![Class::Unknown],
        pins_session: false,
        opaque_state: true,
        hints: Default::default(),
    })
}

/// Classifies a statement text. Long texts (whose parse can take milliseconds) are classified
/// on tokio's blocking pool, so they never stall the event loop other clients share.
async fn classify(app: &Arc<App>, sql: &str) -> Arc<Analysis> {
    if sql.len() <= tidemark_sql::INLINE_PARSE_LIMIT {
        return app.classifier.classify(sql);
    }
    let app = app.clone();
    let text = sql.to_string();
    tokio::task::spawn_blocking(move || app.classifier.classify(&text))
        .await
        .unwrap_or_else(|_| opaque_analysis())
}

/// What one message sent to the server will produce, in order.
#[derive(Debug)]
enum Exp {
    Parse {
        visible: bool,
        register: Option<String>,
    },
    Bind,
    Describe,
    Execute,
    Close,
    Sync,
    Query,
    Func,
    /// tidemark's own `SELECT pg_current_wal_insert_lsn()`, pipelined after a unit that
    /// ends a writing transaction; its responses are read, never relayed.
    Capture,
    /// A response tidemark makes itself (e.g. ParseComplete for a statement the server
    /// connection already has), emitted in its place in the stream.
    Synth(Frame),
}

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum UnitEnd {
    Sync,
    Query,
    Func,
    Flush,
    Size,
}

struct Unit {
    frames: Vec<Frame>,
    end: UnitEnd,
}

/// The server connection a session holds across units (transaction, pinned session, or a
/// unit left open by Flush).
struct Attached {
    conn: Checked,
    node: NodeId,
    role: Role,
}

/// How a relay ended.
enum RelayEnd {
    /// ReadyForQuery with this status; `true` if the unit had an error; the commit LSN if
    /// it was captured in the same pipeline.
    Ready(u8, bool, Option<Captured>),
    /// Flushed unit: all responses so far are relayed, the unit stays open.
    Open,
    /// ReadyForQuery with this status was relayed, then the connection was lost before the
    /// pipelined commit-position read was answered: the unit committed, its position is unknown.
    CaptureLost(u8, bool),
}

enum RelayError {
    Client(ClientError),
    Server(ServerError),
}

impl From<ClientError> for RelayError {
    fn from(e: ClientError) -> Self {
        RelayError::Client(e)
    }
}
impl From<ServerError> for RelayError {
    fn from(e: ServerError) -> Self {
        RelayError::Server(e)
    }
}

type SResult<T> = Result<T, ClientError>;

pub struct Session {
    app: Arc<App>,
    io: ClientIo,
    user: String,
    database: String,
    pid: i32,
    secret: i32,
    cancel_slot: Arc<Mutex<Option<CancelTarget>>>,
    info: Arc<Mutex<ClientInfo>>,
    /// Woken by `pg_terminate_backend` on this client's pid.
    kill: Arc<tokio::sync::Notify>,
    /// Session pooling: the client was given its server's own pid and key.
    real_pid: bool,
    /// SET statements from the startup packet, then from the client, by parameter name.
    startup_sets: Vec<String>,
    sets: Vec<(String, String)>,
    state_key: u64,
    consistency: Consistency,
    key: Option<String>,
    token: Lsn,
    report_lsn: bool,
    last_write_lsn: Lsn,
    /// Replicas the primary (this node id) reported at or past the last commit.
    applied: Option<(Applied, NodeId)>,
    /// Where the last routing decision sent a unit, and why (`SHOW tidemark.last_route`).
    last_route: Option<(NodeId, Reason)>,
    /// This session's spreading seed: sessions are spread over eligible replicas round-robin,
    /// and one session's reads stay on one replica while it stays eligible (see `decide`).
    balance: u64,
    statements: HashMap<String, Arc<Stmt>>,
    unnamed: Option<Arc<Stmt>>,
    attached: Option<Attached>,
    /// The client must stay on one primary connection (LISTEN, temp tables, ...).
    pinned: bool,
    tx_status: u8,
    tx_wrote: bool,
    /// A Flush-ended unit is open on `attached` until its Sync.
    unit_open: bool,
    /// After an error inside an open unit, the server skips until Sync.
    server_skipping: bool,
    pending: VecDeque<Frame>,
    pending_bytes: usize,
    copy_in: bool,
    /// Key of a keyed write in the current transaction.
    tx_key: Option<String>,
    /// Session-state statements run inside the current transaction (applied at COMMIT).
    tx_session_state: Vec<Class>,
    /// A write's commit position could not be read (the connection was lost after the
    /// commit): the session's next read first learns the primary's current position.
    write_unknown: bool,
    /// After tidemark itself failed a Flush-ended unit: ignore messages until Sync.
    skip_until_sync: bool,
    /// The unit being run executes `DISCARD ALL` or `DEALLOCATE ALL` (set by `analyse`).
    unit_clears_statements: bool,
    /// Something run in the current transaction may have changed session state invisibly:
    /// the connection is marked unknown when it is released.
    conn_state_unknown: bool,
    /// Params reported to the client.
    params: HashMap<String, String>,
    max_prepared: usize,
    /// This client's pool on each node, looked up once (pools live as long as the process).
    pools: Vec<Option<Arc<crate::pool::Pool>>>,
}

/// A string literal that means the same whatever `standard_conforming_strings` says: an
/// escape string (`E'…'`) with backslashes and quotes doubled.
fn quote_literal(v: &str) -> String {
    format!("E'{}'", v.replace('\\', "\\\\").replace('\'', "''"))
}

fn is_ident(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
}

/// Turns startup parameters (including `options=-c a=b`) into SET statements.
pub fn startup_to_sets(params: &StartupParams) -> Result<Vec<(String, String)>, String> {
    let mut out: Vec<(String, String)> = Vec::new();
    let mut put = |name: &str, value: &str| -> Result<(), String> {
        if !is_ident(name) {
            return Err(format!(
                "invalid parameter name \"{name}\" in startup packet"
            ));
        }
        let name = name.to_ascii_lowercase();
        out.retain(|(n, _)| *n != name);
        out.push((
            name.clone(),
            format!("SET {name} TO {}", quote_literal(value)),
        ));
        Ok(())
    };
    for (k, v) in &params.0 {
        match k.as_str() {
            "user" | "database" | "replication" => {}
            "options" => {
                let mut words = v.split_whitespace();
                while let Some(w) = words.next() {
                    let kv = if w == "-c" {
                        words.next().unwrap_or_default()
                    } else if let Some(r) = w.strip_prefix("-c") {
                        r
                    } else if let Some(r) = w.strip_prefix("--") {
                        r
                    } else {
                        return Err(format!(
                            "unsupported startup option \"{w}\" (use -c name=value)"
                        ));
                    };
                    let Some((n, val)) = kv.split_once('=') else {
                        return Err(format!("startup option \"{kv}\" is not name=value"));
                    };
                    put(&n.replace('-', "_"), val)?;
                }
            }
            _ => put(k, v)?,
        }
    }
    Ok(out)
}

fn hash_of<T: Hash>(t: &T) -> u64 {
    let mut h = DefaultHasher::new();
    t.hash(&mut h);
    h.finish()
}

fn class_label(c: &Class) -> &'static str {
    match c {
        Class::Read => "read",
        Class::Write => "write",
        Class::Transaction(_) => "transaction",
        Class::SessionState(_) => "session_state",
        Class::Tidemark(_) => "tidemark",
        Class::Unknown => "unknown",
    }
}

impl Session {
    /// `startup` comes from [`startup_to_sets`] of the client's startup parameters.
    pub fn new(
        app: Arc<App>,
        io: ClientIo,
        user: String,
        database: String,
        startup: Vec<(String, String)>,
        addr: String,
    ) -> Session {
        let cfg = app.config.load();
        let consistency = cfg.default_consistency(&user);
        let max_prepared = cfg.limits.max_prepared_per_client;
        let pinned = cfg.pool.mode == PoolMode::Session;
        drop(cfg);
        let cancel_slot = Arc::new(Mutex::new(None));
        let info = Arc::new(Mutex::new(ClientInfo {
            user: user.clone(),
            database: database.clone(),
            addr,
            state: "idle",
            node: None,
            consistency: consistency.to_string(),
        }));
        let kill = Arc::new(tokio::sync::Notify::new());
        let (pid, secret) = app.register_client(cancel_slot.clone(), info.clone(), kill.clone());
        let balance = app.balance.fetch_add(1, Ordering::Relaxed);
        let mut s = Session {
            app,
            io,
            user,
            database,
            pid,
            secret,
            cancel_slot,
            info,
            kill,
            real_pid: false,
            startup_sets: startup.into_iter().map(|(_, s)| s).collect(),
            sets: Vec::new(),
            state_key: 0,
            consistency,
            key: None,
            token: Lsn::ZERO,
            report_lsn: false,
            last_write_lsn: Lsn::ZERO,
            applied: None,
            last_route: None,
            balance,
            statements: HashMap::new(),
            unnamed: None,
            attached: None,
            pinned,
            tx_status: b'I',
            tx_wrote: false,
            unit_open: false,
            server_skipping: false,
            pending: VecDeque::new(),
            pending_bytes: 0,
            copy_in: false,
            tx_key: None,
            tx_session_state: Vec::new(),
            skip_until_sync: false,
            write_unknown: false,
            conn_state_unknown: false,
            unit_clears_statements: false,
            params: HashMap::new(),
            max_prepared,
            pools: Vec::new(),
        };
        s.recompute_state_key();
        s
    }

    pub fn backend_key(&self) -> i32 {
        self.pid
    }

    fn state_sql(&self) -> String {
        let mut sql = String::from(RESET_SQL);
        for s in self
            .startup_sets
            .iter()
            .chain(self.sets.iter().map(|(_, s)| s))
        {
            sql.push_str("; ");
            sql.push_str(s);
        }
        sql
    }

    fn recompute_state_key(&mut self) {
        self.state_key = if self.startup_sets.is_empty() && self.sets.is_empty() {
            0
        } else {
            hash_of(&self.state_sql()) | 1
        };
    }

    /// Finishes the login: reports server parameters, BackendKeyData and ReadyForQuery.
    pub async fn start(&mut self) -> SResult<bool> {
        let secret = self.secret;
        // The primary tells the server parameters (tidemark presents itself as the primary:
        // `in_hot_standby`, `default_transaction_read_only` as it has them); any healthy node
        // if there is none.
        let req = RouteRequest {
            read_only: true,
            pinned: None,
            consistency: Consistency::Eventual,
            required_lsn: Lsn::ZERO,
            hint: TargetHint::Any,
            balance: self.balance,
            applied: None,
        };
        let view = self.app.view.load_full();
        // Session pooling: the client owns one primary connection for its whole life, from
        // the start, and is given that server's pid and key.
        let session_mode = self.pinned;
        let any = match route(&req, &view) {
            Route::Node { node, .. } => Some(node),
            _ => view
                .primary_id()
                .or_else(|| view.nodes.iter().find(|n| n.healthy).map(|n| n.id)),
        };
        let first = if session_mode || view.primary_id().is_some() {
            view.primary_id()
        } else {
            any
        };
        let node = first.unwrap_or(0);
        // Only wait for the primary's pool when nothing else can answer.
        let wait = session_mode || any.is_none_or(|a| a == node);
        let (mut conn, node) = match self.checkout_with(node, wait).await {
            Ok(c) => (c, node),
            // The primary's pool is saturated or it cannot be reached: a login does not wait
            // for it; a replica tells the parameters (as the primary's, below).
            Err(_) if !session_mode && any.is_some_and(|a| a != node) => {
                let other = any.unwrap_or(node);
                match self.checkout(other).await {
                    Ok(c) => (c, other),
                    Err(mut f) => {
                        f.severity = "FATAL".into();
                        self.io.send(&f.to_error()).await?;
                        return Ok(false);
                    }
                }
            }
            Err(mut f) => {
                f.severity = "FATAL".into();
                self.io.send(&f.to_error()).await?;
                return Ok(false);
            }
        };
        let from_replica = view.primary_id().is_some_and(|p| p != node);
        if let Err(e) = self.sync_state(&mut conn).await {
            let f = match e {
                ServerError::Server(f) => ErrorFields::fatal(&f.code, f.message),
                other => ErrorFields::fatal("08006", other.to_string()),
            };
            self.io.send(&f.to_error()).await?;
            return Ok(false);
        }
        // The connection's parameters after the client's startup settings were applied
        // (`ServerConn` records the ParameterStatus messages they caused).
        for (k, v) in &conn.conn.params {
            // tidemark presents itself as the primary (writes go there).
            let v = if from_replica && k == "in_hot_standby" {
                "off"
            } else {
                v.as_str()
            };
            self.params.insert(k.clone(), v.to_string());
            self.io.push(&be::parameter_status(k, v));
        }
        let mut secret = secret;
        if session_mode {
            let (sp, ss) = (conn.conn.backend_pid, conn.conn.backend_secret);
            if self.app.rekey_client(self.pid, sp, ss) {
                self.pid = sp;
                self.secret = ss;
                secret = ss;
                self.real_pid = true;
            }
            self.attached = Some(Attached {
                conn,
                node,
                role: Role::Primary,
            });
        } else {
            conn.release();
        }
        self.io.push(&be::backend_key_data(self.pid, secret));
        self.io.push(&be::ready_for_query(b'I'));
        self.io.flush().await?;
        Ok(true)
    }

    /// The session loop. Returns when the client leaves or must be disconnected.
    pub async fn run(&mut self) {
        let r = self.run_inner().await;
        match r {
            Ok(()) | Err(ClientError::Closed) => {}
            Err(ClientError::Protocol(e)) => {
                let f = ErrorFields::fatal("08P01", e.to_string());
                crate::metrics::error("08P01");
                let _ = self.io.send(&f.to_error()).await;
            }
            Err(ClientError::Io(e)) => tracing::debug!(error = %e, "client connection ended"),
        }
        self.detach_close().await;
        self.app.unregister_client(self.pid);
    }

    async fn run_inner(&mut self) -> SResult<()> {
        let mut shutdown = self.app.shutting_down.subscribe();
        loop {
            let unit = match self.next_unit(&mut shutdown).await? {
                Some(u) => u,
                None => return Ok(()),
            };
            self.run_unit(unit).await?;
        }
    }

    fn push_pending(&mut self, f: Frame) {
        self.pending_bytes += f.len();
        self.pending.push_back(f);
    }

    async fn next_frame(
        &mut self,
        shutdown: &mut tokio::sync::watch::Receiver<bool>,
    ) -> SResult<Option<Frame>> {
        if let Some(f) = self.pending.pop_front() {
            self.pending_bytes -= f.len();
            return Ok(Some(f));
        }
        loop {
            if let Some(f) = self.io.try_frame()? {
                return Ok(Some(f));
            }
            let idle = self.attached.is_none() && self.tx_status == b'I';
            // Between units a held server connection (open transaction, pinned session) is
            // idle: whatever it sends now (LISTEN notifications, notices, a FATAL on
            // timeout or termination) goes to the client at once.
            let watch_server = !self.unit_open;
            let io = &mut self.io;
            let server = self.attached.as_mut().map(|a| &mut a.conn.conn);
            enum Event {
                Client(Result<(), ClientError>),
                Server(Result<Frame, ServerError>),
                Shutdown,
                Killed,
            }
            let kill = self.kill.clone();
            let ev = tokio::select! {
                _ = kill.notified() => Event::Killed,
                r = io.fill() => Event::Client(r),
                r = async {
                    match server {
                        Some(c) => c.recv().await,
                        None => std::future::pending().await,
                    }
                }, if watch_server => Event::Server(r),
                _ = shutdown.changed(), if idle => Event::Shutdown,
            };
            match ev {
                Event::Client(r) => r?,
                Event::Killed => {
                    self.io.send(&terminated().to_error()).await?;
                    return Err(ClientError::Closed);
                }
                Event::Shutdown => {
                    let f = ErrorFields::fatal(
                        "57P01",
                        "terminating connection: tidemark is shutting down",
                    );
                    self.io.send(&f.to_error()).await?;
                    return Ok(None);
                }
                Event::Server(Ok(f)) if matches!(f.tag(), b'A' | b'N' | b'S') => {
                    if f.tag() == b'S' {
                        if let Ok((k, v)) = be::parse_parameter_status(&f) {
                            self.params.insert(k, v);
                        }
                    }
                    let f = match &self.attached {
                        Some(a) if f.tag() == b'A' && !self.real_pid => {
                            own_notification(&f, a.conn.conn.backend_pid, self.pid)
                        }
                        _ => f,
                    };
                    self.io.send(&f).await?;
                }
                Event::Server(r) => {
                    // The held connection failed or ended (terminated backend,
                    // idle_in_transaction_session_timeout, crash): its transaction and session
                    // state are gone. As PostgreSQL does, the client's session ends with the
                    // server's FATAL (or 08006 when the server said nothing).
                    let mut e = match r {
                        Ok(f) => match ErrorFields::parse(&f) {
                            Ok(e) => e,
                            Err(_) => ErrorFields::error(
                                "08006",
                                "the server connection sent an unexpected message",
                            ),
                        },
                        Err(e) => {
                            ErrorFields::error("08006", format!("server connection lost: {e}"))
                        }
                    };
                    e.severity = "FATAL".into();
                    if let Some(mut a) = self.attached.take() {
                        a.conn.conn.broken = true;
                    }
                    tracing::warn!(client = self.pid, sqlstate = %e.code, message = %e.message, "held server connection ended between statements; ending the client session");
                    crate::metrics::error(&e.code);
                    self.io.send(&e.to_error()).await?;
                    return Err(ClientError::Closed);
                }
            }
        }
    }

    /// Collects the next routing unit.
    async fn next_unit(
        &mut self,
        shutdown: &mut tokio::sync::watch::Receiver<bool>,
    ) -> SResult<Option<Unit>> {
        let mut frames = Vec::new();
        let mut bytes = 0;
        loop {
            let Some(f) = self.next_frame(shutdown).await? else {
                return Ok(None);
            };
            // Validate every message up front: malformed input ends this client only.
            FrontendMessage::parse(&f)?;
            bytes += f.len();
            let end = match f.tag() {
                b'X' => {
                    if frames.is_empty() {
                        return Ok(None);
                    }
                    // Run what came before, then stop.
                    self.push_pending(f);
                    return Ok(Some(Unit {
                        frames,
                        end: UnitEnd::Size,
                    }));
                }
                b'Q' if frames.is_empty() => Some(UnitEnd::Query),
                b'F' if frames.is_empty() => Some(UnitEnd::Func),
                b'Q' | b'F' => {
                    // A simple query after unsynced extended messages: finish those first.
                    self.push_pending(f);
                    return Ok(Some(Unit {
                        frames,
                        end: UnitEnd::Size,
                    }));
                }
                b'S' => Some(UnitEnd::Sync),
                b'H' => Some(UnitEnd::Flush),
                b'p' => {
                    return Err(ClientError::Protocol(tidemark_wire::WireError::Malformed {
                        tag: 'p',
                        what: "password message outside authentication",
                    }))
                }
                _ => None,
            };
            frames.push(f);
            if let Some(end) = end {
                return Ok(Some(Unit { frames, end }));
            }
            if bytes > MAX_UNIT_BYTES {
                return Ok(Some(Unit {
                    frames,
                    end: UnitEnd::Size,
                }));
            }
        }
    }

    async fn send_error_ready(&mut self, e: ErrorFields, end: UnitEnd) -> SResult<()> {
        crate::metrics::error(&e.code);
        tracing::warn!(client = self.pid, user = %self.user, sqlstate = %e.code, message = %e.message, "error sent to client");
        self.io.push(&e.to_error());
        match end {
            UnitEnd::Sync | UnitEnd::Query | UnitEnd::Func => {
                self.io.push(&be::ready_for_query(self.tx_status));
            }
            UnitEnd::Flush | UnitEnd::Size => {
                // Like PostgreSQL after an error: ignore messages until Sync.
                self.skip_until_sync = true;
            }
        }
        self.io.flush().await
    }

    async fn run_unit(&mut self, unit: Unit) -> SResult<()> {
        if unit.end == UnitEnd::Flush && unit.frames.iter().all(|f| f.tag() == b'H') {
            // A Flush with nothing before it (drivers send one after Sync): every response
            // to earlier messages was already relayed; there is nothing to route.
            return self.io.flush().await;
        }
        if self.skip_until_sync {
            if unit.end == UnitEnd::Sync {
                self.skip_until_sync = false;
                self.io.push(&be::ready_for_query(self.tx_status));
                self.io.flush().await?;
            }
            return Ok(());
        }
        // What is this unit?
        let (analysis, stmt_updates) = match self.analyse(&unit).await {
            Ok(a) => a,
            Err(e) => return self.send_error_ready(e, unit.end).await,
        };
        if let Class::Tidemark(cmd) = &analysis.class {
            if unit.end == UnitEnd::Query {
                return self.tidemark_command(cmd.clone()).await;
            }
        }
        let all_tidemark = !analysis.statements.is_empty()
            && analysis
                .statements
                .iter()
                .all(|c| matches!(c, Class::Tidemark(_)));
        if all_tidemark && unit.end != UnitEnd::Query {
            // Extended protocol (prepared, or several in one pipeline): record the statements
            // the unit defines (a prepared SET/SHOW tidemark.* is answered here each time it
            // is executed), then answer message by message.
            self.apply_statement_updates(stmt_updates);
            return self.tidemark_command_extended(&unit).await;
        }
        if analysis.statements.len() > 1
            && analysis
                .statements
                .iter()
                .any(|c| matches!(c, Class::Tidemark(_)))
        {
            let e = if unit.end == UnitEnd::Query {
                ErrorFields::error(
                    "0A000",
                    "tidemark commands (SET/SHOW tidemark.*) must be sent alone, not with other statements",
                )
            } else {
                ErrorFields::error(
                    "0A000",
                    "tidemark commands (SET/SHOW tidemark.*) must be sent with the simple query protocol",
                )
                .with_hint("use the driver's simple-query call (psql, simple_query, exec without parameters), or the /* tidemark: ... */ hints")
            };
            return self.send_error_ready(e, unit.end).await;
        }
        self.apply_statement_updates(stmt_updates);
        if unit.end == UnitEnd::Query && self.tx_status != b'E' {
            if let [Class::SessionState(SessionKind::Deallocate { name: Some(n) })] =
                analysis.statements.as_slice()
            {
                // A protocol-level statement of this client (drivers deallocate theirs with
                // SQL): the server connections only know tidemark's shared names for it.
                if self.statements.remove(n).is_some() {
                    self.io.push(&be::command_complete("DEALLOCATE"));
                    self.io.push(&be::ready_for_query(self.tx_status));
                    return self.io.flush().await;
                }
            }
        }
        if !self.real_pid && self.answer_backend_signal(&unit).await? {
            return Ok(());
        }
        if let Some(k) = &analysis.hints.key {
            let max = self.app.config.load().limits.max_key_length;
            if k.len() > max {
                return self
                    .send_error_ready(key_too_long(k.len(), max), unit.end)
                    .await;
            }
        }
        for err in &analysis.hints.errors {
            let n = ErrorFields {
                severity: "WARNING".into(),
                ..ErrorFields::error("01000", format!("{err}; the statement goes to the primary"))
            };
            self.io.push(&n.to_notice());
        }
        if analysis.pins_session && !self.pinned {
            self.pinned = true;
            tracing::debug!(
                client = self.pid,
                "session pinned to one primary connection"
            );
        }
        self.execute(unit, analysis).await
    }

    fn apply_statement_updates(&mut self, updates: Vec<(String, Option<Arc<Stmt>>)>) {
        for (name, stmt) in updates {
            match stmt {
                Some(s) if name.is_empty() => self.unnamed = Some(s),
                Some(s) => {
                    self.statements.insert(name, s);
                }
                None => {
                    self.statements.remove(&name);
                }
            }
        }
    }

    /// `SELECT pg_terminate_backend(pid)` / `pg_cancel_backend(pid)` where pid is one tidemark
    /// gave a client: acts on that client's session and answers like PostgreSQL (simple
    /// protocol, or a Parse/Bind/Describe/Execute/Sync unit). True when answered; any other
    /// pid goes to the server as usual.
    async fn answer_backend_signal(&mut self, unit: &Unit) -> SResult<bool> {
        let mut sql: Option<&str> = None;
        let mut stmt: Option<Arc<Stmt>> = None;
        let mut bind: Option<&Frame> = None;
        let mut parse = false;
        let mut describe = false;
        for f in &unit.frames {
            match FrontendMessage::parse(f)? {
                FrontendMessage::Query(q) if unit.frames.len() == 1 => sql = Some(q),
                FrontendMessage::Parse { query, .. } if !parse && bind.is_none() => {
                    parse = true;
                    sql = Some(query);
                }
                FrontendMessage::Bind { statement, .. } if bind.is_none() => {
                    if !parse {
                        stmt = if statement.is_empty() {
                            self.unnamed.clone()
                        } else {
                            self.statements.get(statement).cloned()
                        };
                    }
                    bind = Some(f);
                }
                FrontendMessage::Describe { kind: b'P', .. } if bind.is_some() && !describe => {
                    describe = true
                }
                FrontendMessage::Execute { .. } | FrontendMessage::Sync if bind.is_some() => {}
                _ => return Ok(false),
            }
        }
        let extended = bind.is_some();
        if extended && unit.end != UnitEnd::Sync {
            return Ok(false);
        }
        let text = sql.or(stmt.as_deref().map(|s| s.query.as_str()));
        let Some((kind, pid_ref)) = text.and_then(tidemark_sql::backend_signal) else {
            return Ok(false);
        };
        let values = match bind.map(fe::bind_values).transpose() {
            Ok(v) => v,
            Err(_) => return Ok(false),
        };
        let pid = match (pid_ref, &values) {
            (tidemark_sql::SignalPid::Literal(p), _) => Some(p),
            (tidemark_sql::SignalPid::Param(n), Some(v)) => v.int_param(n - 1),
            _ => None,
        };
        let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) else {
            return Ok(false);
        };
        let terminate = kind == tidemark_sql::BackendSignal::Terminate;
        let admin = self.app.config.load().admin_users.contains(&self.user);
        let result = self
            .app
            .signal_client(pid, terminate, &self.user, admin)
            .await;
        let column = if terminate {
            "pg_terminate_backend"
        } else {
            "pg_cancel_backend"
        };
        match result {
            crate::app::Signalled::NotOurs => return Ok(false),
            crate::app::Signalled::Denied => {
                let verb = if terminate { "terminate" } else { "cancel" };
                let e = ErrorFields::error("42501", format!("permission denied to {verb} process"))
                    .with_detail(format!("Only roles with privileges of the role whose process is being {verb}ed may {verb} this process (tidemark: the same user, or an admin user)."));
                self.send_error_ready(e, unit.end).await?;
                return Ok(true);
            }
            crate::app::Signalled::Done => {}
        }
        let format = values.as_ref().map(|v| v.result_format(0)).unwrap_or(0);
        if extended {
            if parse {
                self.io.push(&be::simple(be::PARSE_COMPLETE));
            }
            self.io.push(&be::simple(b'2'));
            if describe {
                self.io.push(&be::bool_row_description(column, format));
            }
        } else {
            self.io.push(&be::bool_row_description(column, 0));
        }
        self.io.push(&be::bool_data_row(true, format));
        self.io.push(&be::command_complete("SELECT 1"));
        self.io.push(&be::ready_for_query(self.tx_status));
        self.io.flush().await?;
        Ok(true)
    }

    /// Classifies a unit; returns its combined analysis and the prepared statements it
    /// defines (`Some`) or closes (`None`).
    #[allow(clippy::type_complexity)]
    async fn analyse(
        &mut self,
        unit: &Unit,
    ) -> Result<(Arc<Analysis>, Vec<(String, Option<Arc<Stmt>>)>), ErrorFields> {
        let mut parts: Vec<Arc<Analysis>> = Vec::new();
        let mut updates: Vec<(String, Option<Arc<Stmt>>)> = Vec::new();
        let mut new_named = 0usize;
        let clears = |a: &Analysis| {
            a.statements.iter().any(|c| {
                matches!(
                    c,
                    Class::SessionState(
                        SessionKind::Discard { all: true } | SessionKind::Deallocate { name: None }
                    )
                )
            })
        };
        self.unit_clears_statements = false;
        for f in &unit.frames {
            let msg = FrontendMessage::parse(f)
                .map_err(|e| ErrorFields::error("08P01", e.to_string()))?;
            match msg {
                FrontendMessage::Query(sql) => {
                    let a = classify(&self.app, sql).await;
                    self.unit_clears_statements |= clears(&a);
                    parts.push(a);
                }
                FrontendMessage::Parse {
                    name,
                    query,
                    param_types,
                } => {
                    let analysis = classify(&self.app, query).await;
                    let global = format!(
                        "tm_{:016x}",
                        hash_of(&(query, &param_types, self.state_key))
                    );
                    parts.push(analysis.clone());
                    if !name.is_empty() {
                        new_named += 1;
                        let max_bytes = self.app.config.load().max_prepared_bytes();
                        let used: usize = self.statements.values().map(|s| s.query.len()).sum();
                        if used + query.len() > max_bytes {
                            return Err(ErrorFields::error(
                                "54000",
                                format!(
                                    "prepared statements of this connection would hold {} bytes of text, over the limit of {max_bytes} (limits.max_prepared_bytes_per_client)",
                                    used + query.len()
                                ),
                            )
                            .with_hint("Close (DEALLOCATE) statements you no longer use"));
                        }
                        if self.statements.len() + new_named > self.max_prepared {
                            return Err(ErrorFields::error(
                                "53400",
                                format!(
                                    "too many prepared statements on this connection (limit {}, limits.max_prepared_per_client)",
                                    self.max_prepared
                                ),
                            ).with_hint("Close (DEALLOCATE) statements you no longer use"));
                        }
                    }
                    updates.push((
                        name.to_string(),
                        Some(Arc::new(Stmt {
                            query: query.to_string(),
                            wire: None,
                            param_types,
                            global,
                            analysis,
                        })),
                    ));
                }
                FrontendMessage::Bind { statement, .. } => {
                    if let Some(s) = self.lookup_stmt(statement, &updates) {
                        self.unit_clears_statements |= clears(&s.analysis);
                        parts.push(s.analysis.clone());
                    }
                }
                FrontendMessage::Describe { kind: b'S', name } => {
                    if let Some(s) = self.lookup_stmt(name, &updates) {
                        parts.push(s.analysis.clone());
                    }
                }
                FrontendMessage::Close { kind: b'S', name } if !name.is_empty() => {
                    updates.push((name.to_string(), None));
                }
                FrontendMessage::FunctionCall | FrontendMessage::NonUtf8 { tag: b'Q', .. } => {
                    parts.push(opaque_analysis())
                }
                FrontendMessage::NonUtf8 {
                    name, param_types, ..
                } => {
                    let bytes = fe::parse_query_bytes(f)
                        .map_err(|e| ErrorFields::error("08P01", e.to_string()))?;
                    let analysis = opaque_analysis();
                    let global = format!(
                        "tm_{:016x}",
                        hash_of(&(bytes, &param_types, self.state_key))
                    );
                    parts.push(analysis.clone());
                    if !name.is_empty() {
                        new_named += 1;
                    }
                    updates.push((
                        name.to_string(),
                        Some(Arc::new(Stmt {
                            query: String::from_utf8_lossy(bytes).into_owned(),
                            wire: Some(bytes.to_vec()),
                            param_types,
                            global,
                            analysis,
                        })),
                    ));
                }
                _ => {}
            }
        }
        // One statement parsed, described and bound in the same unit counts once.
        parts.dedup_by(|a, b| Arc::ptr_eq(a, b));
        Ok((combine_analyses(parts), updates))
    }

    fn lookup_stmt(
        &self,
        name: &str,
        updates: &[(String, Option<Arc<Stmt>>)],
    ) -> Option<Arc<Stmt>> {
        if let Some((_, s)) = updates.iter().rev().find(|(n, _)| n == name) {
            return s.clone();
        }
        if name.is_empty() {
            self.unnamed.clone()
        } else {
            self.statements.get(name).cloned()
        }
    }

    /// Carries out a tidemark command; what to answer, or the error.
    fn run_tidemark(&mut self, cmd: &TidemarkCommand) -> Result<TidemarkAnswer, ErrorFields> {
        let invalid = |name: &str, value: &str, what: &str| {
            ErrorFields::error(
                "22023",
                format!("invalid value for parameter \"tidemark.{name}\": \"{value}\""),
            )
            .with_hint(what.to_string())
        };
        match cmd {
            TidemarkCommand::Set { name, value } => {
                match name.as_str() {
                    "consistency" => match value.parse::<Consistency>() {
                        Ok(c) => {
                            self.consistency = c;
                            self.info.lock().consistency = c.to_string();
                        }
                        Err(e) => return Err(invalid(name, value, &e.to_string())),
                    },
                    "key" => {
                        let max = self.app.config.load().limits.max_key_length;
                        if value.len() > max {
                            return Err(key_too_long(value.len(), max));
                        }
                        self.key = if value.is_empty() {
                            None
                        } else {
                            Some(value.clone())
                        };
                    }
                    "min_lsn" => match value.parse::<Lsn>() {
                        Ok(l) => self.token = l,
                        Err(e) => return Err(invalid(name, value, &e.to_string())),
                    },
                    "report_lsn" => match value.to_ascii_lowercase().as_str() {
                        "on" | "true" | "1" | "yes" => self.report_lsn = true,
                        "off" | "false" | "0" | "no" => self.report_lsn = false,
                        _ => return Err(invalid(name, value, "use on or off")),
                    },
                    _ => return Err(unknown_setting(name)),
                }
                Ok(TidemarkAnswer::Tag("SET"))
            }
            TidemarkCommand::Reset { name } => {
                match name.as_str() {
                    "consistency" => {
                        self.consistency = self.app.config.load().default_consistency(&self.user);
                        self.info.lock().consistency = self.consistency.to_string();
                    }
                    "key" => self.key = None,
                    "min_lsn" => self.token = Lsn::ZERO,
                    "report_lsn" => self.report_lsn = false,
                    "all" => {
                        self.consistency = self.app.config.load().default_consistency(&self.user);
                        self.key = None;
                        self.token = Lsn::ZERO;
                        self.report_lsn = false;
                    }
                    _ => return Err(unknown_setting(name)),
                }
                Ok(TidemarkAnswer::Tag("RESET"))
            }
            TidemarkCommand::Show { name } => {
                let value = match name.as_str() {
                    "commit_lsn" => self.last_write_lsn.to_string(),
                    "consistency" => self.consistency.to_string(),
                    "key" => self.key.clone().unwrap_or_default(),
                    "min_lsn" => self.token.to_string(),
                    "report_lsn" => if self.report_lsn { "on" } else { "off" }.to_string(),
                    "last_route" => self
                        .last_route
                        .map(|(n, r)| format!("{} {}", self.app.node_name(n), r.as_str()))
                        .unwrap_or_default(),
                    _ => return Err(unknown_setting(name)),
                };
                Ok(TidemarkAnswer::Show {
                    column: format!("tidemark.{name}"),
                    value,
                })
            }
        }
    }

    /// A tidemark command sent as a simple Query.
    async fn tidemark_command(&mut self, cmd: TidemarkCommand) -> SResult<()> {
        match self.run_tidemark(&cmd) {
            Ok(TidemarkAnswer::Tag(tag)) => self.io.push(&be::command_complete(tag)),
            Ok(TidemarkAnswer::Show { column, value }) => {
                self.io.push(&be::row_description(&[column.as_str()]));
                self.io.push(&be::data_row(&[Some(value)]));
                self.io.push(&be::command_complete("SHOW"));
            }
            Err(e) => return self.send_error_ready(e, UnitEnd::Query).await,
        }
        self.io.push(&be::ready_for_query(self.tx_status));
        self.io.flush().await
    }

    /// A tidemark command sent with the extended protocol (drivers prepare statements they
    /// run often): Parse/Bind/Describe/Execute/Close/Sync answered here, as PostgreSQL would
    /// answer a `SET`/`SHOW` (no parameters; SHOW describes one text column).
    async fn tidemark_command_extended(&mut self, unit: &Unit) -> SResult<()> {
        // Which command each statement and the unnamed portal hold, in message order.
        let mut parsed: HashMap<String, TidemarkCommand> = HashMap::new();
        let mut portal: Option<TidemarkCommand> = None;
        let command_of = |a: &Analysis| match &a.class {
            Class::Tidemark(c) => Some(c.clone()),
            _ => None,
        };
        let describe = |io: &mut ClientIo, cmd: Option<&TidemarkCommand>| match cmd {
            Some(TidemarkCommand::Show { name }) => {
                io.push(&be::row_description(&[format!("tidemark.{name}").as_str()]))
            }
            _ => io.push(&be::no_data()),
        };
        let mut failed = false;
        for f in &unit.frames {
            let msg = FrontendMessage::parse(f)?;
            if failed && !matches!(msg, FrontendMessage::Sync) {
                continue;
            }
            let stmt_cmd = |name: &str, parsed: &HashMap<String, TidemarkCommand>| {
                parsed.get(name).cloned().or_else(|| {
                    let s = if name.is_empty() {
                        self.unnamed.clone()
                    } else {
                        self.statements.get(name).cloned()
                    };
                    s.and_then(|s| command_of(&s.analysis))
                })
            };
            match msg {
                FrontendMessage::Parse { name, query, .. } => {
                    if let Some(c) = command_of(&self.app.classifier.classify(query)) {
                        parsed.insert(name.to_string(), c);
                    }
                    self.io.push(&be::simple(be::PARSE_COMPLETE));
                }
                FrontendMessage::Bind { statement, .. } => {
                    portal = stmt_cmd(statement, &parsed);
                    self.io.push(&be::simple(b'2'));
                }
                FrontendMessage::Describe { kind: b'S', name } => {
                    let c = stmt_cmd(name, &parsed);
                    self.io.push(&be::parameter_description(&[]));
                    describe(&mut self.io, c.as_ref());
                }
                FrontendMessage::Describe { .. } => describe(&mut self.io, portal.as_ref()),
                FrontendMessage::Execute { .. } => {
                    let Some(cmd) = portal.clone() else {
                        let e = ErrorFields::error("34000", "portal \"\" does not exist");
                        self.io.push(&e.to_error());
                        failed = true;
                        continue;
                    };
                    match self.run_tidemark(&cmd) {
                        Ok(TidemarkAnswer::Tag(tag)) => self.io.push(&be::command_complete(tag)),
                        Ok(TidemarkAnswer::Show { value, .. }) => {
                            self.io.push(&be::data_row(&[Some(value)]));
                            self.io.push(&be::command_complete("SHOW"));
                        }
                        Err(e) => {
                            crate::metrics::error(&e.code);
                            self.io.push(&e.to_error());
                            failed = true;
                        }
                    }
                }
                FrontendMessage::Close { .. } => self.io.push(&be::simple(be::CLOSE_COMPLETE)),
                FrontendMessage::Sync => {
                    failed = false;
                    self.io.push(&be::ready_for_query(self.tx_status));
                }
                _ => {}
            }
        }
        if failed && unit.end != UnitEnd::Sync {
            self.skip_until_sync = true;
        }
        self.io.flush().await
    }

    /// The LSN this read depends on.
    fn required_lsn(&self, analysis: &Analysis) -> Lsn {
        let mut l = self.last_write_lsn.max(self.token);
        if let Some(m) = analysis.hints.min_lsn {
            l = l.max(m);
        }
        let key = analysis.hints.key.as_ref().or(self.key.as_ref());
        if let Some(k) = key {
            if let Some(kl) = self.app.keys.get(k) {
                l = l.max(kl);
            }
        }
        l
    }

    async fn checkout(&mut self, node: NodeId) -> Result<Checked, ErrorFields> {
        self.checkout_with(node, true).await
    }

    async fn checkout_with(&mut self, node: NodeId, wait: bool) -> Result<Checked, ErrorFields> {
        let cached = self.pools.get(node).cloned().flatten();
        let pool = match cached {
            Some(p) => p,
            None => {
                let Some(p) = self.app.pool(node, &self.database, &self.user) else {
                    return Err(ErrorFields::error(
                        "08006",
                        format!("node {node} is not configured"),
                    ));
                };
                if self.pools.len() <= node {
                    self.pools.resize(node + 1, None);
                }
                self.pools[node] = Some(p.clone());
                p
            }
        };
        let r = if wait {
            pool.checkout().await
        } else {
            pool.checkout_nowait().await
        };
        if let Err(PoolError::Server(
            ServerError::Auth(_) | ServerError::Server(_) | ServerError::Protocol(_),
        )) = &r
        {
            // The server refused the login (unknown database, role, password): no pool is
            // kept for it.
            if self.app.pools.remove_if_empty(&pool.key) {
                self.pools[node] = None;
            }
        }
        match r {
            Ok(c) => Ok(c),
            Err(PoolError::Exhausted { pool, waited, max }) => Err(ErrorFields::error(
                "53300",
                format!("no server connection available in pool {pool} after {waited:?} (all {max} in use)"),
            )
            .with_hint("raise pool.max_size or pool.checkout_timeout, or make transactions shorter")),
            Err(PoolError::Server(ServerError::Server(f))) => Err(f),
            Err(PoolError::Server(e)) => Err(ErrorFields::error(
                "08006",
                format!("cannot connect to node {}: {e}", self.app.node_name(node)),
            )),
        }
    }

    /// Brings a server connection to this session's SET state.
    async fn sync_state(&mut self, c: &mut Checked) -> Result<(), ServerError> {
        if c.conn.prepared.len() > MAX_PREPARED_PER_SERVER {
            c.conn.simple_query("DEALLOCATE ALL").await?;
            c.conn.prepared.clear();
        }
        if c.conn.state_key == self.state_key {
            return Ok(());
        }
        if c.conn.state_key == STATE_UNKNOWN {
            // The last client ran something whose effects on the session tidemark cannot see
            // (a DO block, a user function): reset everything, prepared statements included.
            c.conn.simple_query("DISCARD ALL").await?;
            c.conn.prepared.clear();
        }
        let sql = if self.state_key == 0 {
            RESET_SQL.to_string()
        } else {
            self.state_sql()
        };
        c.conn.simple_query(&sql).await?;
        c.conn.state_key = self.state_key;
        Ok(())
    }

    /// Decides where the unit goes and runs it there.
    async fn execute(&mut self, unit: Unit, analysis: Arc<Analysis>) -> SResult<()> {
        // A unit is everything up to Sync, and runs on one node (one implicit transaction).
        // What follows a Flush may write, so a unit ended by Flush (or by size) that will go on
        // on the same connection goes to the primary.
        let read_only = self.unit_read_only(&analysis)
            && matches!(unit.end, UnitEnd::Sync | UnitEnd::Query | UnitEnd::Func);
        if self.attached.is_none() {
            self.wait_while_paused().await;
            let decision = self.decide(&analysis, read_only).await;
            let (mut conn, node, role, reason) = match decision {
                Ok(d) => d,
                Err(e) => return self.send_error_ready(e, unit.end).await,
            };
            if let Err(e) = self.sync_state(&mut conn).await {
                let f = match e {
                    ServerError::Server(f) => f,
                    other => ErrorFields::error("08006", other.to_string()),
                };
                return self.send_error_ready(f, unit.end).await;
            }
            let target = if role == Role::Primary {
                "primary"
            } else {
                "replica"
            };
            crate::metrics::statement(class_label(&analysis.class), target);
            if read_only {
                crate::metrics::read_routed(target, reason.as_str());
            }
            self.last_route = Some((node, reason));
            self.attached = Some(Attached { conn, node, role });
        } else {
            crate::metrics::statement(class_label(&analysis.class), "pinned");
        }
        let may_write = analysis.class.may_write()
            || matches!(
                analysis.class,
                Class::Transaction(TxControl::CommitPrepared | TxControl::RollbackPrepared)
            );
        let retryable = read_only && self.tx_status == b'I' && !self.unit_open && !self.pinned;
        let may_commit = self.unit_may_commit(&analysis, may_write);
        let pipeline = self.pipeline_capture(&analysis, may_write) && !self.unit_may_copy(&unit);
        let frames_for_retry = if retryable {
            Some(unit.frames.clone())
        } else {
            None
        };
        // Until the unit's outcome is known (a client may vanish before it), the connection's
        // session state is not what its key says.
        if let Some(att) = self.attached.as_mut() {
            let key = &mut att.conn.conn.state_key;
            if analysis.opaque_state {
                *key = STATE_UNKNOWN;
            } else if *key != STATE_UNKNOWN
                && analysis
                    .statements
                    .iter()
                    .any(|c| matches!(c, Class::SessionState(_)))
            {
                *key = STATE_DIRTY;
            }
        }
        let outcome = self.send_and_relay(&unit, retryable, pipeline).await;
        match outcome {
            Ok(RelayOutcome::Done(status, errored, lsn, lost)) => {
                self.after_ready(status, errored, may_write, &analysis, lsn, lost)
                    .await?;
            }
            Ok(RelayOutcome::Open) => {
                self.unit_open = true;
                if may_write {
                    self.tx_wrote = true;
                }
            }
            Ok(RelayOutcome::RetryOnPrimary(why)) => {
                // Nothing reached the client: run the unit again on the primary. A replica
                // that refused a write (25006) proves the unit writes: its commit position is
                // recorded like any write's.
                tracing::info!(client = self.pid, reason = %why, "read retried on the primary");
                let may_write = may_write || why.starts_with("25006");
                let pipeline = pipeline
                    || (self.pipeline_capture(&analysis, may_write) && !self.unit_may_copy(&unit));
                crate::metrics::fallback("replica_error");
                let Some(frames) = frames_for_retry else {
                    return Ok(());
                };
                let view = self.app.view.load_full();
                let retry = match view.primary_id() {
                    Some(p) => self.checkout(p).await.map(|c| (c, p)),
                    None => Err(ErrorFields::error(
                        "08006",
                        format!("{why}; no primary is available to retry on"),
                    )),
                };
                match retry {
                    Ok((mut conn, p)) => {
                        if let Err(e) = self.sync_state(&mut conn).await {
                            return self
                                .send_error_ready(
                                    ErrorFields::error("08006", e.to_string()),
                                    unit.end,
                                )
                                .await;
                        }
                        self.attached = Some(Attached {
                            conn,
                            node: p,
                            role: Role::Primary,
                        });
                        let unit = Unit {
                            frames,
                            end: unit.end,
                        };
                        match self.send_and_relay(&unit, false, pipeline).await {
                            Ok(RelayOutcome::Done(status, errored, lsn, lost)) => {
                                self.after_ready(status, errored, may_write, &analysis, lsn, lost)
                                    .await?
                            }
                            Ok(RelayOutcome::Open) => self.unit_open = true,
                            Ok(RelayOutcome::RetryOnPrimary(_)) => {}
                            Err(RelayError::Client(e)) => return Err(e),
                            Err(RelayError::Server(e)) => self.server_failed(e, may_commit).await?,
                        }
                    }
                    Err(e) => return self.send_error_ready(e, unit.end).await,
                }
            }
            Err(RelayError::Client(e)) => return Err(e),
            Err(RelayError::Server(e)) => self.server_failed(e, may_commit).await?,
        }
        Ok(())
    }

    /// The server connection broke mid-unit: tell the client, drop the connection. Inside a
    /// transaction, or when the session holds state on that connection, the client's session
    /// ends as it would directly (FATAL, then the close); a unit that may have committed ends it
    /// with 08007, since nobody can say whether it did.
    async fn server_failed(&mut self, e: ServerError, may_commit: bool) -> SResult<()> {
        let node = self.attached.as_ref().map(|a| a.node);
        self.attached = None; // dropping closes it
        self.unit_open = false;
        self.copy_in = false;
        self.server_skipping = false;
        *self.cancel_slot.lock() = None;
        let name = node.map(|n| self.app.node_name(n)).unwrap_or_default();
        let was_in_tx = self.tx_status != b'I';
        self.tx_status = b'I';
        // A server that said why (an ErrorResponse) did not commit; a connection that just
        // ended leaves the outcome unknown.
        let unknown = may_commit && !matches!(e, ServerError::Server(_));
        if unknown {
            // Later reads (and keyed readers) must assume the write happened.
            let wrote = std::mem::take(&mut self.tx_wrote);
            self.write_unknown = true;
            if wrote || self.tx_key.is_some() || self.key.is_some() {
                self.resolve_unknown_write().await;
            }
            let f = ErrorFields::fatal(
                "08007",
                format!("the connection to node {name} was lost while the transaction was committing: {e}"),
            )
            .with_detail("whether the transaction committed is unknown; check before retrying it");
            crate::metrics::error(&f.code);
            tracing::warn!(
                client = self.pid,
                "connection lost during COMMIT; outcome unknown (08007)"
            );
            self.io.send(&f.to_error()).await?;
            return Err(ClientError::Closed);
        }
        self.tx_wrote = false;
        let mut f = match &e {
            ServerError::Server(f) => ErrorFields::error(&f.code, f.message.clone()),
            other => ErrorFields::error(
                "08006",
                format!("connection to node {name} was lost: {other}"),
            ),
        };
        if self.pinned || was_in_tx {
            // The transaction or session state lived on that connection.
            f.severity = "FATAL".into();
            crate::metrics::error(&f.code);
            tracing::warn!(client = self.pid, user = %self.user, sqlstate = %f.code, message = %f.message, "server connection lost inside a transaction or pinned session; ending the client session");
            self.io.send(&f.to_error()).await?;
            return Err(ClientError::Closed);
        }
        crate::metrics::error(&f.code);
        tracing::warn!(client = self.pid, user = %self.user, sqlstate = %f.code, message = %f.message, "server connection failed under a client");
        self.io.push(&f.to_error());
        self.io.push(&be::ready_for_query(b'I'));
        self.io.flush().await
    }

    /// Whether this unit may commit a write: an autocommit write, or the COMMIT of a
    /// transaction that wrote. If its connection is lost, its outcome is unknown.
    fn unit_may_commit(&self, analysis: &Analysis, may_write: bool) -> bool {
        let has = |f: fn(&Class) -> bool| analysis.statements.iter().any(f);
        let begins = has(|c| matches!(c, Class::Transaction(TxControl::Begin { .. })));
        let ends = has(|c| {
            matches!(
                c,
                Class::Transaction(TxControl::Commit | TxControl::CommitPrepared)
            )
        });
        if self.tx_status == b'I' {
            (may_write && (!begins || ends))
                || has(|c| matches!(c, Class::Transaction(TxControl::CommitPrepared)))
        } else {
            ends && (self.tx_wrote || may_write)
        }
    }

    /// After a write whose commit position is unknown: learns the primary's current position
    /// (every commit so far is at or below it) and makes this session's reads, and its key's
    /// readers, wait for it. Leaves `write_unknown` set if the primary cannot be asked (the
    /// next read then goes to the primary).
    async fn resolve_unknown_write(&mut self) {
        let view = self.app.view.load_full();
        let Some(p) = view.primary_id() else {
            return;
        };
        let Ok(mut c) = self.checkout(p).await else {
            return;
        };
        match c.conn.simple_query(CAPTURE_SQL).await {
            Ok(rows) => {
                if let Some(l) = rows
                    .first()
                    .cloned()
                    .flatten()
                    .and_then(|s| s.parse::<Lsn>().ok())
                {
                    let l = l.normalize_insert_position();
                    self.last_write_lsn = self.last_write_lsn.max(l);
                    self.applied = None;
                    if let Some(k) = self.tx_key.as_ref().or(self.key.as_ref()) {
                        self.app.keys.record(k, l);
                    }
                    self.write_unknown = false;
                }
                c.release();
            }
            Err(_) => c.conn.broken = true,
        }
    }

    fn unit_read_only(&self, analysis: &Analysis) -> bool {
        if analysis.hints.target == Some(HintTarget::Primary) || !analysis.hints.errors.is_empty() {
            return false;
        }
        match &analysis.class {
            Class::Read => true,
            Class::Transaction(TxControl::Begin { read_only, .. }) => *read_only,
            _ => false,
        }
    }

    /// While an operator has paused tidemark (admin `PAUSE`), new transactions wait.
    async fn wait_while_paused(&self) {
        let mut rx = self.app.paused.subscribe();
        while *rx.borrow_and_update() {
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// Routes a unit that is not bound to a connection yet, waiting for a replica to
    /// catch up when needed. Returns the checked-out connection.
    async fn decide(
        &mut self,
        analysis: &Analysis,
        read_only: bool,
    ) -> Result<(Checked, NodeId, Role, Reason), ErrorFields> {
        let consistency = analysis.hints.consistency.unwrap_or(self.consistency);
        if read_only && self.write_unknown {
            self.resolve_unknown_write().await;
        }
        let required = if read_only {
            self.required_lsn(analysis)
        } else {
            Lsn::ZERO
        };
        let hint = match analysis.hints.target {
            _ if read_only && self.write_unknown => TargetHint::Primary,
            Some(HintTarget::Primary) => TargetHint::Primary,
            Some(HintTarget::Replica) => TargetHint::Replica,
            None => TargetHint::Any,
        };
        let view = self.app.view.load_full();
        // Only while the primary that reported it is still the primary.
        let applied = self
            .applied
            .filter(|(_, p)| view.primary_id() == Some(*p))
            .map(|(a, _)| a);
        let req = RouteRequest {
            read_only: read_only && !self.pinned,
            pinned: None,
            consistency,
            required_lsn: required,
            hint,
            balance: match self.app.config.load().routing.balance {
                Balance::Session => self.balance,
                Balance::Statement => self.app.balance.fetch_add(1, Ordering::Relaxed),
            },
            applied,
        };
        match route(&req, &view) {
            Route::Node { node, role, reason } => {
                if read_only && role == Role::Primary {
                    crate::metrics::fallback(reason.as_str());
                    tracing::debug!(client = self.pid, reason = reason.as_str(), required_lsn = %required, "read routed to the primary");
                }
                match self.checkout(node).await {
                    Ok(c) => Ok((c, node, role, reason)),
                    // A replica that cannot be reached: the read goes to the primary
                    // (the monitor bans the replica on its next poll).
                    Err(e) if role == Role::Replica && e.code != "53300" => {
                        let Some(p) = view.primary_id() else {
                            return Err(e);
                        };
                        crate::metrics::fallback("replica_error");
                        tracing::info!(client = self.pid, node = %self.app.node_name(node), error = %e.message, "replica unreachable; read routed to the primary");
                        let c = self.checkout(p).await?;
                        Ok((c, p, Role::Primary, Reason::NoReplica))
                    }
                    Err(e) => Err(e),
                }
            }
            Route::CheckReplicas {
                candidates,
                required_lsn,
                fallback,
            } => {
                self.wait_for_replica(candidates, required_lsn, fallback)
                    .await
            }
            Route::Unavailable(u) => Err(unavailable_error(&u, &self.app)),
        }
    }

    /// Asks the most advanced replica for its replay position with a separate statement
    /// before the read, polling until it reaches `required` or `max_wait` passes.
    async fn wait_for_replica(
        &mut self,
        candidates: Vec<NodeId>,
        required: Lsn,
        fallback: Option<NodeId>,
    ) -> Result<(Checked, NodeId, Role, Reason), ErrorFields> {
        let start = Instant::now();
        let max_wait = self.app.config.load().routing.max_wait;
        let deadline = start + max_wait;
        // A replica whose time lag is over max_wait will not replay a write made just now
        // within max_wait: don't wait for it.
        let view = self.app.view.load_full();
        let candidates: Vec<NodeId> = candidates
            .into_iter()
            .filter(|c| view.node(*c).is_some_and(|n| n.lag <= max_wait))
            .collect();
        let mut conns: Vec<(NodeId, Checked)> = Vec::new();
        'outer: loop {
            if candidates.is_empty() {
                break 'outer;
            }
            for &cand in &candidates {
                let idx = conns.iter().position(|(n, _)| *n == cand);
                let idx = match idx {
                    Some(i) => i,
                    None => match self.checkout(cand).await {
                        Ok(c) => {
                            conns.push((cand, c));
                            conns.len() - 1
                        }
                        Err(_) => continue,
                    },
                };
                let r = conns[idx]
                    .1
                    .conn
                    .simple_query("SELECT pg_last_wal_replay_lsn()")
                    .await;
                let reported = match r {
                    Ok(rows) => rows
                        .first()
                        .cloned()
                        .flatten()
                        .and_then(|s| s.parse::<Lsn>().ok())
                        .unwrap_or(Lsn::ZERO),
                    Err(_) => {
                        conns.remove(idx);
                        continue;
                    }
                };
                if let Some(Route::Node { node, role, reason }) =
                    caught_up(cand, reported, required)
                {
                    let (_, c) = conns.remove(idx);
                    for (_, other) in conns {
                        other.release();
                    }
                    crate::metrics::lsn_wait(start.elapsed(), "replica");
                    return Ok((c, node, role, reason));
                }
            }
            if Instant::now() >= deadline || conns.is_empty() {
                break 'outer;
            }
            // Wait for the next monitor sample or a millisecond, whichever comes first.
            let notified = self.app.view_changed.notified();
            let _ = tokio::time::timeout(Duration::from_millis(1), notified).await;
            if Instant::now() >= deadline {
                break 'outer;
            }
        }
        for (_, c) in conns {
            c.release();
        }
        crate::metrics::lsn_wait(start.elapsed(), "fallback");
        match fallback_after_wait(fallback) {
            Route::Node { node, role, reason } => {
                crate::metrics::fallback(reason.as_str());
                tracing::debug!(client = self.pid, reason = reason.as_str(), required_lsn = %required, waited_ms = start.elapsed().as_millis() as u64, "no replica reached the required LSN in time; read routed to the primary");
                let c = self.checkout(node).await?;
                Ok((c, node, role, reason))
            }
            Route::Unavailable(u) => Err(unavailable_error(&u, &self.app)),
            Route::CheckReplicas { .. } => {
                Err(ErrorFields::error("XX000", "internal routing error"))
            }
        }
    }

    /// Rewrites the unit for the attached server connection, sends it and relays responses.
    async fn send_and_relay(
        &mut self,
        unit: &Unit,
        retryable: bool,
        pipeline_capture: bool,
    ) -> Result<RelayOutcome, RelayError> {
        let Some(att) = self.attached.as_mut() else {
            return Err(RelayError::Server(ServerError::Closed));
        };
        let mut out = bytes::BytesMut::new();
        let mut exp: VecDeque<Exp> = VecDeque::new();
        let skipping = self.server_skipping;
        let conn = &mut att.conn.conn;
        for f in &unit.frames {
            let msg = FrontendMessage::parse(f).map_err(|e| RelayError::Client(e.into()))?;
            let push_exp = |e: Exp, exp: &mut VecDeque<Exp>| {
                if !skipping || matches!(e, Exp::Sync) {
                    exp.push_back(e);
                }
            };
            match msg {
                FrontendMessage::Parse { name, .. }
                | FrontendMessage::NonUtf8 {
                    tag: b'P', name, ..
                } if !name.is_empty() => {
                    let Some(stmt) = self.statements.get(name).cloned() else {
                        out.extend_from_slice(f.raw());
                        push_exp(
                            Exp::Parse {
                                visible: true,
                                register: None,
                            },
                            &mut exp,
                        );
                        continue;
                    };
                    if conn.prepared.contains(&stmt.global) {
                        push_exp(Exp::Synth(be::simple(be::PARSE_COMPLETE)), &mut exp);
                    } else {
                        out.extend_from_slice(stmt.parse_frame(&stmt.global).raw());
                        push_exp(
                            Exp::Parse {
                                visible: true,
                                register: Some(stmt.global.clone()),
                            },
                            &mut exp,
                        );
                    }
                }
                FrontendMessage::Bind { statement, .. } => {
                    let stmt = if statement.is_empty() {
                        None
                    } else {
                        self.statements.get(statement).cloned()
                    };
                    match stmt {
                        Some(stmt) => {
                            if !conn.prepared.contains(&stmt.global)
                                && !exp_registers(&exp, &stmt.global)
                            {
                                out.extend_from_slice(stmt.parse_frame(&stmt.global).raw());
                                push_exp(
                                    Exp::Parse {
                                        visible: false,
                                        register: Some(stmt.global.clone()),
                                    },
                                    &mut exp,
                                );
                            }
                            let renamed = fe::rename_bind(f, &stmt.global)
                                .map_err(|e| RelayError::Client(e.into()))?;
                            out.extend_from_slice(renamed.raw());
                        }
                        None => {
                            if statement.is_empty() && !unit_parses_unnamed(&unit.frames) {
                                // The unnamed statement was parsed in an earlier unit, maybe on
                                // another connection: parse it again here.
                                if let Some(u) = &self.unnamed {
                                    out.extend_from_slice(u.parse_frame("").raw());
                                    push_exp(
                                        Exp::Parse {
                                            visible: false,
                                            register: None,
                                        },
                                        &mut exp,
                                    );
                                }
                            }
                            out.extend_from_slice(f.raw());
                        }
                    }
                    push_exp(Exp::Bind, &mut exp);
                }
                FrontendMessage::Describe { kind: b'S', name } if !name.is_empty() => {
                    match self.statements.get(name).cloned() {
                        Some(stmt) => {
                            if !conn.prepared.contains(&stmt.global)
                                && !exp_registers(&exp, &stmt.global)
                            {
                                out.extend_from_slice(stmt.parse_frame(&stmt.global).raw());
                                push_exp(
                                    Exp::Parse {
                                        visible: false,
                                        register: Some(stmt.global.clone()),
                                    },
                                    &mut exp,
                                );
                            }
                            out.extend_from_slice(
                                fe::describe_or_close(b'D', b'S', &stmt.global).raw(),
                            );
                        }
                        None => out.extend_from_slice(f.raw()),
                    }
                    push_exp(Exp::Describe, &mut exp);
                }
                FrontendMessage::Close { kind: b'S', name } if !name.is_empty() => {
                    // The server keeps the statement for other clients with the same text.
                    push_exp(Exp::Synth(be::simple(be::CLOSE_COMPLETE)), &mut exp);
                }
                FrontendMessage::Parse { .. } | FrontendMessage::NonUtf8 { tag: b'P', .. } => {
                    out.extend_from_slice(f.raw());
                    push_exp(
                        Exp::Parse {
                            visible: true,
                            register: None,
                        },
                        &mut exp,
                    );
                }
                FrontendMessage::Describe { .. } => {
                    out.extend_from_slice(f.raw());
                    push_exp(Exp::Describe, &mut exp);
                }
                FrontendMessage::Close { .. } => {
                    out.extend_from_slice(f.raw());
                    push_exp(Exp::Close, &mut exp);
                }
                FrontendMessage::Execute { .. } => {
                    out.extend_from_slice(f.raw());
                    push_exp(Exp::Execute, &mut exp);
                }
                FrontendMessage::Sync => {
                    out.extend_from_slice(f.raw());
                    push_exp(Exp::Sync, &mut exp);
                }
                FrontendMessage::Query(_) | FrontendMessage::NonUtf8 { .. } => {
                    out.extend_from_slice(f.raw());
                    push_exp(Exp::Query, &mut exp);
                }
                FrontendMessage::FunctionCall => {
                    out.extend_from_slice(f.raw());
                    push_exp(Exp::Func, &mut exp);
                }
                FrontendMessage::Flush
                | FrontendMessage::CopyData
                | FrontendMessage::CopyDone
                | FrontendMessage::CopyFail => out.extend_from_slice(f.raw()),
                FrontendMessage::Terminate | FrontendMessage::Password => {}
            }
        }
        *self.cancel_slot.lock() = Some(CancelTarget {
            host: self
                .app
                .config
                .load()
                .nodes
                .get(att.node)
                .map(|n| n.host.clone())
                .unwrap_or_default(),
            port: self
                .app
                .config
                .load()
                .nodes
                .get(att.node)
                .map(|n| n.port)
                .unwrap_or_default(),
            pid: conn.backend_pid,
            secret: conn.backend_secret,
        });
        {
            let mut info = self.info.lock();
            info.state = "active";
            info.node = Some(att.node);
        }
        if pipeline_capture
            && att.role == Role::Primary
            && matches!(unit.end, UnitEnd::Sync | UnitEnd::Query)
            && !skipping
        {
            out.extend_from_slice(fe::query(capture_sql(&self.app)).raw());
            exp.push_back(Exp::Capture);
        }
        if !out.is_empty() {
            conn.send(&out).await?;
        }
        let hold = retryable && att.role == Role::Replica;
        let watch = NodeWatch {
            app: &self.app,
            node: att.node,
            timeout: self.app.config.load().monitor.timeout,
        };
        let notify_pid = (!self.real_pid).then_some(self.pid);
        let kill = self.kill.clone();
        let r = relay(
            &watch,
            &mut self.io,
            conn,
            &mut exp,
            &mut self.pending,
            &mut self.pending_bytes,
            &mut self.copy_in,
            &mut self.server_skipping,
            &mut self.params,
            hold,
            (&kill, notify_pid),
        )
        .await;
        *self.cancel_slot.lock() = None;
        self.info.lock().state = "idle";
        match r {
            Ok(RelayEnd::Ready(s, e, l)) => Ok(RelayOutcome::Done(s, e, l, false)),
            Ok(RelayEnd::CaptureLost(s, e)) => Ok(RelayOutcome::Done(s, e, None, true)),
            Ok(RelayEnd::Open) => Ok(RelayOutcome::Open),
            Err(RelayFail::Retry(why)) => {
                // Drop the replica connection (it may be mid-response) and retry.
                self.attached = None;
                self.server_skipping = false;
                self.copy_in = false;
                Ok(RelayOutcome::RetryOnPrimary(why))
            }
            Err(RelayFail::Client(e)) => Err(RelayError::Client(e)),
            Err(RelayFail::Server(e)) => Err(RelayError::Server(e)),
        }
    }

    /// After ReadyForQuery: track transaction state, capture the commit LSN after writes,
    /// record session state, and release the connection when the client is idle.
    async fn after_ready(
        &mut self,
        status: u8,
        errored: bool,
        may_write: bool,
        analysis: &Analysis,
        captured: Option<Captured>,
        capture_lost: bool,
    ) -> SResult<()> {
        let prev = std::mem::replace(&mut self.tx_status, status);
        self.unit_open = false;
        if may_write {
            self.tx_wrote = true;
            if let Some(k) = &analysis.hints.key {
                // A keyed write inside a transaction is recorded at its COMMIT.
                self.tx_key = Some(k.clone());
            }
        }
        self.track_session_state(prev, status, errored, analysis);
        let Some(att) = self.attached.as_mut() else {
            return self.io.flush().await;
        };
        if self.unit_clears_statements {
            // DISCARD ALL / DEALLOCATE ALL ran: the server dropped every prepared statement on
            // this connection, and the client's protocol-level statements are gone too, as on
            // a direct connection. If the unit failed, whether it ran is unknown: make sure.
            if errored && att.conn.conn.simple_query("DEALLOCATE ALL").await.is_err() {
                att.conn.conn.broken = true;
            }
            att.conn.conn.prepared.clear();
            if !errored {
                self.statements.clear();
                self.unnamed = None;
            }
        }
        att.conn.conn.state_key = if analysis.opaque_state || self.conn_state_unknown {
            self.conn_state_unknown = status != b'I';
            STATE_UNKNOWN
        } else {
            self.state_key
        };
        let capture = status == b'I'
            && att.role == Role::Primary
            && self.tx_wrote
            && self.app.config.load().routing.track_writes;
        // A write under a key must be in the key store before the client learns it is
        // done: readers on other connections only wait for what the store holds.
        let keyed = self.tx_key.is_some() || self.key.is_some();
        if capture && capture_lost {
            // Committed, and the connection was lost before its position was read.
            self.io.flush().await?;
            self.write_unknown = true;
            self.applied = None;
            self.resolve_unknown_write().await;
        } else if let (true, Some(c)) = (capture, captured) {
            // Captured in the same pipeline as the commit: no extra round trip.
            self.io.flush().await?;
            self.record_commit(c);
        } else if capture {
            if self.report_lsn || keyed {
                // The client asked for the token with the result, or other connections
                // depend on it through the key: capture before ReadyForQuery.
                let z = self.io.take_trailing_ready();
                self.capture_lsn().await;
                if let Some(z) = z {
                    if self.report_lsn {
                        self.io.push(&be::parameter_status(
                            "tidemark.commit_lsn",
                            &self.last_write_lsn.to_string(),
                        ));
                    }
                    self.io.push(&z);
                }
                self.io.flush().await?;
            } else {
                // Let the client go on; the session's next routing decision waits for this.
                self.io.flush().await?;
                self.capture_lsn().await;
            }
        } else {
            self.io.flush().await?;
        }
        if status == b'I' {
            self.tx_wrote = false;
            self.tx_key = None;
            if !self.pinned {
                if let Some(att) = self.attached.take() {
                    att.conn.release();
                }
            }
        }
        Ok(())
    }

    /// Whether to pipeline the commit-LSN read right behind this unit: it ends a writing
    /// transaction (or is an autocommit write) and nobody needs the position before the
    /// client's ReadyForQuery (keys and `report_lsn` need it first, so they don't pipeline).
    fn pipeline_capture(&self, analysis: &Analysis, may_write: bool) -> bool {
        if !self.app.config.load().routing.track_writes
            || self.report_lsn
            || self.key.is_some()
            || self.tx_key.is_some()
            || analysis.hints.key.is_some()
            || self.unit_open
        {
            return false;
        }
        let has = |f: fn(&Class) -> bool| analysis.statements.iter().any(f);
        let begins = has(|c| matches!(c, Class::Transaction(TxControl::Begin { .. })));
        let ends = has(|c| {
            matches!(
                c,
                Class::Transaction(TxControl::Commit | TxControl::Rollback)
            )
        });
        if self.tx_status == b'I' {
            may_write && !begins
        } else {
            (self.tx_wrote || may_write) && ends
        }
    }

    /// A COPY FROM in the unit would read a pipelined query as copy data: such units are
    /// captured the ordinary way. (A plain text search: false positives only cost the
    /// pipelining.)
    fn unit_may_copy(&self, unit: &Unit) -> bool {
        let mentions = |t: &str| {
            t.as_bytes()
                .windows(4)
                .any(|w| w.eq_ignore_ascii_case(b"copy"))
        };
        unit.frames.iter().any(|f| match FrontendMessage::parse(f) {
            Ok(FrontendMessage::Query(q)) => mentions(q),
            // Text tidemark cannot read may be a COPY.
            Ok(FrontendMessage::NonUtf8 { .. }) => true,
            Ok(FrontendMessage::Parse { query, .. }) => mentions(query),
            Ok(FrontendMessage::Bind { statement, .. }) => {
                let stmt = if statement.is_empty() {
                    self.unnamed.as_ref()
                } else {
                    self.statements.get(statement)
                };
                stmt.is_some_and(|s| mentions(&s.query))
            }
            _ => false,
        })
    }

    fn record_commit(&mut self, c: Captured) {
        let l = c.lsn.normalize_insert_position();
        crate::metrics::lsn_captured();
        self.app.monitor_pace.wake();
        if l > self.last_write_lsn {
            self.last_write_lsn = l;
        }
        // Standbys the primary saw at or past this position right after the commit.
        let view = self.app.view.load();
        let nodes: NodeSet = c
            .applied_on
            .iter()
            .filter_map(|pid| view.node_by_walsender(*pid))
            .collect();
        self.applied = self
            .attached
            .as_ref()
            .map(|att| (Applied { lsn: l, nodes }, att.node));
        if let Some(k) = self.tx_key.as_ref().or(self.key.as_ref()) {
            self.app.keys.record(k, l);
        }
    }

    async fn capture_lsn(&mut self) {
        let Some(att) = self.attached.as_mut() else {
            return;
        };
        match att
            .conn
            .conn
            .simple_query_rows(capture_sql(&self.app))
            .await
        {
            Ok(rows) => {
                if let Some(c) = rows.first().and_then(|r| Captured::parse(r)) {
                    self.record_commit(c);
                }
            }
            Err(e) => {
                // Without the position no replica can be proven to have this write: learn the
                // primary's current position instead (at or past the commit).
                tracing::warn!(error = %e, "could not read the commit LSN; using the primary's current position");
                att.conn.conn.broken = true;
                self.write_unknown = true;
                self.applied = None;
                self.resolve_unknown_write().await;
            }
        }
    }

    /// Session SETs take effect when they succeed outside a transaction, or when the
    /// transaction they ran in commits; a failed unit or a rollback records nothing.
    /// Statements are walked in order, so `BEGIN; SET ...; ROLLBACK` in one query counts
    /// as rolled back.
    fn track_session_state(&mut self, prev: u8, status: u8, errored: bool, analysis: &Analysis) {
        if errored {
            if status == b'I' {
                self.tx_session_state.clear();
            }
            return;
        }
        let mut in_tx = prev != b'I';
        for c in &analysis.statements {
            match c {
                Class::Transaction(TxControl::Begin { .. }) => in_tx = true,
                Class::Transaction(TxControl::Commit) => {
                    let pending = std::mem::take(&mut self.tx_session_state);
                    self.record_session_state(&pending);
                    in_tx = false;
                }
                Class::Transaction(TxControl::Rollback) => {
                    self.tx_session_state.clear();
                    in_tx = false;
                }
                Class::SessionState(_) if in_tx => self.tx_session_state.push(c.clone()),
                Class::SessionState(_) => self.record_session_state(std::slice::from_ref(c)),
                _ => {}
            }
        }
        if status == b'I' {
            self.tx_session_state.clear();
        }
    }

    fn record_session_state(&mut self, statements: &[Class]) {
        let mut changed = false;
        for c in statements.iter() {
            match c {
                Class::SessionState(SessionKind::Set {
                    local: false,
                    name,
                    value_sql,
                }) => {
                    self.sets.retain(|(n, _)| n != name);
                    let stmt = match value_sql {
                        Some(v) => format!("SET {name} TO {v}"),
                        None => format!("SET {name} TO DEFAULT"),
                    };
                    self.sets.push((name.clone(), stmt));
                    changed = true;
                }
                Class::SessionState(SessionKind::Reset { name: Some(name) }) => {
                    self.sets.retain(|(n, _)| n != name);
                    self.startup_sets
                        .retain(|s| !s.starts_with(&format!("SET {name} TO ")));
                    changed = true;
                }
                Class::SessionState(SessionKind::Reset { name: None })
                | Class::SessionState(SessionKind::Discard { all: true }) => {
                    self.sets.clear();
                    self.startup_sets.clear();
                    changed = true;
                }
                _ => {}
            }
        }
        if changed {
            self.recompute_state_key();
        }
    }

    async fn detach_close(&mut self) {
        let Some(mut att) = self.attached.take() else {
            return;
        };
        if self.pinned {
            // Session state (LISTEN, temp tables, ...) lives on it: close it.
            att.conn.conn.broken = true;
            return;
        }
        if !att.conn.conn.proto.is_idle() {
            // The client left while its statement ran, mid-COPY, mid-pipeline or inside a
            // transaction: cancel what runs, read what is owed and roll back, within a bound;
            // the pool only takes the connection back if that leaves it idle.
            let phase = att.conn.conn.proto.phase();
            let node = att.node;
            let ok = tokio::time::timeout(
                ABANDON_DRAIN,
                recover_abandoned(&self.app, node, &mut att.conn.conn),
            )
            .await
            .unwrap_or(false);
            tracing::debug!(
                client = self.pid,
                ?phase,
                recovered = ok,
                "client left with its server connection busy"
            );
            if !ok {
                att.conn.conn.broken = true;
                return;
            }
        }
        att.conn.release();
    }
}

/// How long a connection a client abandoned mid-statement may take to become idle again
/// (cancel, drain, roll back) before it is closed instead.
const ABANDON_DRAIN: Duration = Duration::from_secs(1);

/// Brings a connection whose client vanished back to idle: ends a COPY, syncs an open
/// extended unit, cancels a running statement (waiting until the server has the signal, so it
/// can never hit a later client's statement), reads everything owed, rolls back. False when
/// the connection cannot be reused.
async fn recover_abandoned(app: &App, node: NodeId, conn: &mut crate::server::ServerConn) -> bool {
    use tidemark_wire::Phase;
    if conn.proto.phase() == Phase::Lost || conn.broken {
        return false;
    }
    let mut out = bytes::BytesMut::new();
    if conn.proto.in_copy() {
        out.extend_from_slice(&copy_fail("client disconnected"));
    }
    if conn.proto.unsynced() {
        out.extend_from_slice(fe::sync().raw());
    }
    if !out.is_empty() && conn.send(&out).await.is_err() {
        return false;
    }
    if conn.proto.owed() > 0 {
        let target = {
            let cfg = app.config.load();
            cfg.nodes.get(node).map(|n| (n.host.clone(), n.port))
        };
        let Some((host, port)) = target else {
            return false;
        };
        if crate::server::cancel(&host, port, conn.backend_pid, conn.backend_secret)
            .await
            .is_err()
        {
            return false;
        }
        while conn.proto.owed() > 0 {
            if conn.recv().await.is_err() {
                return false;
            }
        }
    }
    if matches!(
        conn.proto.phase(),
        Phase::InTransaction | Phase::FailedTransaction
    ) && conn.simple_query("ROLLBACK").await.is_err()
    {
        return false;
    }
    conn.proto.is_idle()
}

/// A CopyFail message.
fn copy_fail(why: &str) -> Vec<u8> {
    let mut v = vec![b'f'];
    v.extend_from_slice(&((why.len() + 5) as u32).to_be_bytes());
    v.extend_from_slice(why.as_bytes());
    v.push(0);
    v
}

/// What a tidemark command answers.
enum TidemarkAnswer {
    /// A command tag (`SET`, `RESET`).
    Tag(&'static str),
    /// One row of one text column.
    Show { column: String, value: String },
}

enum RelayOutcome {
    /// Status, errored, the captured commit position, whether the capture was lost.
    Done(u8, bool, Option<Captured>, bool),
    Open,
    RetryOnPrimary(String),
}

enum RelayFail {
    Client(ClientError),
    Server(ServerError),
    Retry(String),
}

fn exp_registers(exp: &VecDeque<Exp>, global: &str) -> bool {
    exp.iter()
        .any(|e| matches!(e, Exp::Parse { register: Some(g), .. } if g == global))
}

fn unit_parses_unnamed(frames: &[Frame]) -> bool {
    frames.iter().any(|f| {
        matches!(
            FrontendMessage::parse(f),
            Ok(FrontendMessage::Parse { name: "", .. })
                | Ok(FrontendMessage::NonUtf8 {
                    tag: b'P',
                    name: "",
                    ..
                })
        )
    })
}

/// What a session ended by `pg_terminate_backend` is told, as PostgreSQL words it.
fn terminated() -> ErrorFields {
    ErrorFields::fatal(
        "57P01",
        "terminating connection due to administrator command",
    )
}

/// A NotificationResponse sent by the client's own server backend carries the pid the client
/// was given (drivers compare it with their own to spot their own notifications).
fn own_notification(f: &Frame, server_pid: i32, client_pid: i32) -> Frame {
    let body = f.body();
    if body.len() < 4 || i32::from_be_bytes([body[0], body[1], body[2], body[3]]) != server_pid {
        return f.clone();
    }
    let mut b = client_pid.to_be_bytes().to_vec();
    b.extend_from_slice(&body[4..]);
    Frame::new(b'A', &b)
}

fn key_too_long(len: usize, max: usize) -> ErrorFields {
    ErrorFields::error(
        "54000",
        format!("tidemark key of {len} bytes is longer than the limit of {max} bytes"),
    )
    .with_hint("use a shorter key (limits.max_key_length)")
}

fn unknown_setting(name: &str) -> ErrorFields {
    ErrorFields::error(
        "42704",
        format!("unrecognized configuration parameter \"tidemark.{name}\""),
    )
    .with_hint("tidemark settings: consistency, key, min_lsn, report_lsn (SET), commit_lsn, last_route (SHOW)")
}

fn unavailable_error(u: &Unavailable, app: &App) -> ErrorFields {
    match u {
        Unavailable::SplitBrain(ids) => {
            let names: Vec<String> = ids.iter().map(|i| app.node_name(*i)).collect();
            ErrorFields::error(
                "25006",
                format!(
                    "writes are refused: several nodes accept writes ({}) — split brain",
                    names.join(", ")
                ),
            )
            .with_hint("demote or stop all but one primary, or name it in routing.primary")
        }
        Unavailable::NoPrimary => {
            ErrorFields::error("08006", "no primary is available for this statement").with_hint(
                "the primary is down or in recovery; reads that replicas can serve still work",
            )
        }
        Unavailable::NoHealthyNode => ErrorFields::error("08006", "no database node is reachable"),
        Unavailable::PinnedNodeDown(n) => ErrorFields::error(
            "08006",
            format!(
                "the node this session is bound to ({}) is down",
                app.node_name(*n)
            ),
        ),
    }
}

/// Combines the analyses of the statements of one unit: the strongest class wins, hints
/// come from the first statement that has any.
fn combine_analyses(parts: Vec<Arc<Analysis>>) -> Arc<Analysis> {
    if parts.len() == 1 {
        return parts.into_iter().next().unwrap_or_else(|| unreachable!());
    }
    if parts.is_empty() {
        return Arc::new(Analysis {
            class: Class::Read,
            statements: vec![],
            pins_session: false,
            opaque_state: false,
            hints: Default::default(),
        });
    }
    let statements: Vec<Class> = parts
        .iter()
        .flat_map(|a| a.statements.iter().cloned())
        .collect();
    let classes: Vec<Class> = parts.iter().map(|a| a.class.clone()).collect();
    let class = tidemark_sql::combine(&classes);
    let hints = parts
        .iter()
        .find(|a| a.hints != Default::default())
        .map(|a| a.hints.clone())
        .unwrap_or_default();
    Arc::new(Analysis {
        class,
        statements,
        pins_session: parts.iter().any(|a| a.pins_session),
        opaque_state: parts.iter().any(|a| a.opaque_state),
        hints,
    })
}

/// Relays server responses to the client for the messages in `exp`, reading client
/// input (COPY data, pipelined messages) at the same time.
/// [`relay_inner`], plus: a failure after the unit's own ReadyForQuery was relayed (while
/// reading the pipelined commit-position read) does not fail the unit, which the client was
/// already told about; it ends as [`RelayEnd::CaptureLost`].
#[allow(clippy::too_many_arguments)]
async fn relay(
    watch: &NodeWatch<'_>,
    io: &mut ClientIo,
    conn: &mut crate::server::ServerConn,
    exp: &mut VecDeque<Exp>,
    pending: &mut VecDeque<Frame>,
    pending_bytes: &mut usize,
    copy_in: &mut bool,
    skipping: &mut bool,
    params: &mut HashMap<String, String>,
    hold: bool,
    client: (&tokio::sync::Notify, Option<i32>),
) -> Result<RelayEnd, RelayFail> {
    let mut unit_ready = None;
    let r = relay_inner(
        watch,
        io,
        conn,
        exp,
        pending,
        pending_bytes,
        copy_in,
        skipping,
        params,
        hold,
        client,
        &mut unit_ready,
    )
    .await;
    match (r, unit_ready) {
        (Err(RelayFail::Server(e)), Some((status, errored)))
            if matches!(exp.front(), Some(Exp::Capture)) =>
        {
            tracing::warn!(error = %e, "server connection lost after a commit, before its position was read");
            conn.broken = true;
            io.flush().await.map_err(RelayFail::Client)?;
            Ok(RelayEnd::CaptureLost(status, errored))
        }
        (r, _) => r,
    }
}

#[allow(clippy::too_many_arguments)]
async fn relay_inner(
    watch: &NodeWatch<'_>,
    io: &mut ClientIo,
    conn: &mut crate::server::ServerConn,
    exp: &mut VecDeque<Exp>,
    pending: &mut VecDeque<Frame>,
    pending_bytes: &mut usize,
    copy_in: &mut bool,
    skipping: &mut bool,
    params: &mut HashMap<String, String>,
    hold: bool,
    (kill, notify_pid): (&tokio::sync::Notify, Option<i32>),
    unit_ready: &mut Option<(u8, bool)>,
) -> Result<RelayEnd, RelayFail> {
    let start_out = io.pending_out();
    let mut flushed = false;
    let mut copy = CopyState::default();
    let mut last_heard = Instant::now();
    let mut errored = false;
    let mut captured: Option<Captured> = None;
    let check = tokio::time::sleep(NODE_CHECK_INTERVAL);
    tokio::pin!(check);
    loop {
        // Emit leading synthesized responses.
        while let Some(front) = exp.front() {
            match front {
                Exp::Synth(_) => {
                    if let Some(Exp::Synth(f)) = exp.pop_front() {
                        io.push(&f);
                    }
                }
                _ => break,
            }
        }
        if exp.is_empty() {
            io.flush().await.map_err(RelayFail::Client)?;
            return Ok(RelayEnd::Open);
        }
        // Process everything already buffered before waiting.
        let frame = match conn.try_buffered() {
            Ok(Some(f)) => f,
            Ok(None) => {
                if io.pending_out() > 0 && (!hold || io.pending_out() - start_out > MAX_HELD_OUTPUT)
                {
                    io.flush().await.map_err(RelayFail::Client)?;
                    flushed = true;
                }
                let read_client = *copy_in || *pending_bytes < MAX_PENDING_BYTES;
                tokio::select! {
                    biased;
                    _ = kill.notified() => {
                        // pg_terminate_backend on this client: end its session now.
                        io.truncate_out(start_out);
                        io.push(&terminated().to_error());
                        io.flush().await.map_err(RelayFail::Client)?;
                        return Err(RelayFail::Client(ClientError::Closed));
                    }
                    r = conn.recv() => match r {
                        Ok(f) => {
                            // Frames already buffered were heard with this read: one clock
                            // read per socket read, not per message.
                            last_heard = Instant::now();
                            f
                        }
                        Err(e) => {
                            if hold && !flushed {
                                io.truncate_out(start_out);
                                return Err(RelayFail::Retry(e.to_string()));
                            }
                            return Err(RelayFail::Server(e));
                        }
                    },
                    _ = &mut check => {
                        check.as_mut().reset(tokio::time::Instant::now() + NODE_CHECK_INTERVAL);
                        if watch.looks_dead(last_heard) {
                            let e = ServerError::Protocol(format!(
                                "node {} stopped answering (no response for {:?} and the monitor cannot reach it)",
                                watch.app.node_name(watch.node),
                                last_heard.elapsed()
                            ));
                            conn.broken = true;
                            if hold && !flushed {
                                io.truncate_out(start_out);
                                return Err(RelayFail::Retry(e.to_string()));
                            }
                            return Err(RelayFail::Server(e));
                        }
                        continue;
                    }
                    r = io.fill(), if read_client => {
                        r.map_err(RelayFail::Client)?;
                        while let Some(f) = io.try_frame().map_err(RelayFail::Client)? {
                            if copy.takes(&f, *copy_in) {
                                conn.send(f.raw()).await.map_err(RelayFail::Server)?;
                                if copy.done_by(&f) {
                                    *copy_in = false;
                                }
                            } else {
                                *pending_bytes += f.len();
                                pending.push_back(f);
                            }
                        }
                        continue;
                    }
                }
            }
            Err(e) => return Err(RelayFail::Server(e)),
        };
        let tag = frame.tag();
        tracing::trace!(tag = %(tag as char), front = ?exp.front().map(|e| format!("{e:?}").chars().take(20).collect::<String>()), "server frame");
        match tag {
            b'N' => {
                io.push(&frame);
                continue;
            }
            b'A' => {
                match notify_pid {
                    Some(p) => io.push(&own_notification(&frame, conn.backend_pid, p)),
                    None => io.push(&frame),
                }
                continue;
            }
            b'S' => {
                if let Ok((k, v)) = be::parse_parameter_status(&frame) {
                    params.insert(k.clone(), v.clone());
                    upsert(&mut conn.params, k, v);
                }
                io.push(&frame);
                continue;
            }
            _ => {}
        }
        if matches!(exp.front(), Some(Exp::Capture)) {
            // The client already has its ReadyForQuery; read the pipelined capture.
            match tag {
                b'D' => {
                    captured = be::data_row_values(&frame)
                        .ok()
                        .and_then(|r| Captured::parse(&r));
                }
                b'Z' => {
                    exp.pop_front();
                    let (status, e) = unit_ready.unwrap_or((b'I', errored));
                    if exp.is_empty() {
                        return Ok(RelayEnd::Ready(status, e, captured));
                    }
                }
                b'E' => captured = None,
                _ => {}
            }
            continue;
        }
        if tag == b'E' {
            if let Ok(f) = ErrorFields::parse(&frame) {
                if f.severity == "FATAL" || f.severity == "PANIC" {
                    // The server connection is ending (terminated backend, shutdown): the
                    // client's connection to tidemark is not. Report it once, as an ERROR.
                    conn.broken = true;
                    if hold && !flushed {
                        io.truncate_out(start_out);
                        return Err(RelayFail::Retry(format!("{} {}", f.code, f.message)));
                    }
                    return Err(RelayFail::Server(ServerError::Server(f)));
                }
            }
            if hold && !flushed {
                if let Ok(f) = ErrorFields::parse(&frame) {
                    let recovery_only = f.code == "0A000" && f.message.contains("during recovery");
                    if f.code == "25006" || recovery_only {
                        // A replica refused a write it was sent, or a relation it cannot read
                        // (unlogged, temporary): retry on the primary.
                        io.truncate_out(start_out);
                        drain_to_ready(conn, exp).await.map_err(RelayFail::Server)?;
                        return Err(RelayFail::Retry(format!("25006 {}", f.message)));
                    }
                }
            }
            if let Ok(f) = ErrorFields::parse(&frame) {
                crate::metrics::error(&f.code);
            }
            io.push(&frame);
            errored = true;
            *copy_in = false;
            match exp.front() {
                Some(Exp::Query) | Some(Exp::Func) => {}
                _ => {
                    void_until_sync(exp);
                    *skipping = true;
                }
            }
            continue;
        }
        let Some(front) = exp.front() else {
            return Err(RelayFail::Server(ServerError::Protocol(format!(
                "unexpected message '{}' from server",
                tag as char
            ))));
        };
        let mut pop = false;
        match (front, tag) {
            (Exp::Parse { visible, register }, b'1') => {
                if *visible {
                    io.push(&frame);
                }
                if let Some(g) = register {
                    conn.prepared.insert(g.clone());
                }
                pop = true;
            }
            (Exp::Bind, b'2') | (Exp::Close, b'3') => {
                io.push(&frame);
                pop = true;
            }
            (Exp::Describe, b'T' | b'n') => {
                io.push(&frame);
                pop = true;
            }
            (Exp::Execute, b'C' | b'I' | b's') => {
                io.push(&frame);
                pop = true;
            }
            (Exp::Sync | Exp::Query | Exp::Func, b'Z') => {
                io.push(&frame);
                exp.pop_front();
                *skipping = false;
                *copy_in = false;
                let status = be::ready_status(&frame)
                    .map_err(|e| RelayFail::Server(ServerError::Protocol(e.to_string())))?;
                *unit_ready = Some((status, errored));
                if exp.is_empty() {
                    return Ok(RelayEnd::Ready(status, errored, None));
                }
                continue;
            }
            (front, b'G') => {
                io.push(&frame);
                *copy_in = true;
                copy.extended = matches!(front, Exp::Execute);
                // Copy data the client sent ahead goes to the server now.
                while let Some(f) = pending.front() {
                    if !copy.takes(f, *copy_in) {
                        break;
                    }
                    let f = pending.pop_front().unwrap_or_else(|| unreachable!());
                    *pending_bytes -= f.len();
                    conn.send(f.raw()).await.map_err(RelayFail::Server)?;
                    if copy.done_by(&f) {
                        *copy_in = false;
                    }
                }
                io.flush().await.map_err(RelayFail::Client)?;
                flushed = true;
            }
            _ => io.push(&frame),
        }
        if pop {
            exp.pop_front();
        }
    }
}

/// Reads the commit position on the connection that just committed (see DESIGN.md: the
/// insert position after the commit is never below the commit's end).
/// The commit position after a write (`pg_current_wal_insert_lsn()`, see
/// `Lsn::normalize_insert_position`).
const CAPTURE_SQL: &str = "SELECT pg_current_wal_insert_lsn()::text";

/// The same, plus the pids of the primary's walsenders whose standby had replayed up to it at
/// that moment (mapped to nodes with the monitor's view). With `synchronous_commit =
/// remote_apply` a synchronous standby is among them whenever no other session wrote in
/// between (then the position read is past this commit and the list may be shorter, never
/// wrong); without `pg_read_all_stats` the positions are hidden and the list is empty (reads
/// then wait for replay as usual). Only asked when the primary has a synchronous standby: an
/// asynchronous one has practically never replayed a commit by the time it returns.
const CAPTURE_APPLIED_SQL: &str = "SELECT l::text, \
     (SELECT array_agg(w.pid)::text FROM pg_stat_get_wal_senders() w WHERE w.replay_lsn >= l) \
     FROM pg_current_wal_insert_lsn() l";

fn capture_sql(app: &App) -> &'static str {
    if app.view.load().has_synchronous_standby() {
        CAPTURE_APPLIED_SQL
    } else {
        CAPTURE_SQL
    }
}

/// A one-dimensional PostgreSQL integer array in text form (`{1,2,3}`); `None` if malformed.
fn parse_int_array(s: &str) -> Option<Vec<i32>> {
    let inner = s.strip_prefix('{')?.strip_suffix('}')?;
    if inner.is_empty() {
        return Some(Vec::new());
    }
    inner.split(',').map(|p| p.trim().parse().ok()).collect()
}

/// What the commit-position read after a write returned.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Captured {
    lsn: Lsn,
    /// Pids of walsenders whose standby had replayed up to `lsn`.
    applied_on: Vec<i32>,
}

impl Captured {
    /// From a [`CAPTURE_SQL`] or [`CAPTURE_APPLIED_SQL`] row; `None` if the position is missing
    /// or malformed. A malformed pid list counts as empty (reads then wait for replay as usual).
    fn parse(row: &[Option<String>]) -> Option<Captured> {
        let lsn = row.first()?.as_deref()?.parse::<Lsn>().ok()?;
        let applied_on = row
            .get(1)
            .and_then(|v| v.as_deref())
            .and_then(parse_int_array)
            .unwrap_or_default();
        Some(Captured { lsn, applied_on })
    }
}

const NODE_CHECK_INTERVAL: Duration = Duration::from_millis(250);

/// Lets a relay notice that the node it waits on is gone (blackholed or dead without a
/// TCP reset), so no client waits forever: the node must be silent for longer than the
/// monitor timeout *and* reported unreachable by the monitor.
struct NodeWatch<'a> {
    app: &'a App,
    node: NodeId,
    timeout: Duration,
}

impl NodeWatch<'_> {
    fn looks_dead(&self, last_heard: Instant) -> bool {
        last_heard.elapsed() > self.timeout
            && !self
                .app
                .view
                .load()
                .node(self.node)
                .is_some_and(|n| n.healthy)
    }
}

/// COPY FROM STDIN in progress: which client messages go straight to the server.
#[derive(Default)]
struct CopyState {
    /// Started by Execute (extended protocol): the server ignored the unit's Sync while
    /// copying, so the Sync the client sends after CopyDone/CopyFail goes to it as well.
    extended: bool,
    sync_follows: bool,
}

impl CopyState {
    fn takes(&mut self, f: &Frame, copy_in: bool) -> bool {
        match f.tag() {
            b'd' | b'c' | b'f' if copy_in => true,
            b'S' if self.sync_follows => {
                self.sync_follows = false;
                true
            }
            _ => false,
        }
    }

    fn done_by(&mut self, f: &Frame) -> bool {
        let done = matches!(f.tag(), b'c' | b'f');
        if done && self.extended {
            self.sync_follows = true;
        }
        done
    }
}

fn upsert(v: &mut Vec<(String, String)>, k: String, val: String) {
    if let Some(e) = v.iter_mut().find(|(n, _)| *n == k) {
        e.1 = val;
    } else {
        v.push((k, val));
    }
}

/// After an error, the server skips everything up to Sync: so do the expectations.
fn void_until_sync(exp: &mut VecDeque<Exp>) {
    while let Some(e) = exp.front() {
        if matches!(e, Exp::Sync) {
            break;
        }
        exp.pop_front();
    }
}

/// Reads and drops server output up to the ReadyForQuery that ends `exp`.
async fn drain_to_ready(
    conn: &mut crate::server::ServerConn,
    exp: &mut VecDeque<Exp>,
) -> Result<(), ServerError> {
    let needs = exp
        .iter()
        .any(|e| matches!(e, Exp::Sync | Exp::Query | Exp::Func));
    if !needs {
        conn.broken = true;
        return Ok(());
    }
    loop {
        let f = conn.recv().await?;
        if f.tag() == b'Z' {
            exp.clear();
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &str) -> Option<String> {
        Some(v.to_string())
    }

    #[test]
    fn captured_row_parses_position_and_walsenders() {
        let c = Captured::parse(&[s("0/3000060"), s("{4242,17}")]).unwrap();
        assert_eq!(c.lsn, "0/3000060".parse::<Lsn>().unwrap());
        assert_eq!(c.applied_on, vec![4242, 17]);
        // The plain capture, or no standby at the position (or no privilege to see it).
        assert!(Captured::parse(&[s("0/10")]).unwrap().applied_on.is_empty());
        assert!(Captured::parse(&[s("0/10"), None])
            .unwrap()
            .applied_on
            .is_empty());
        assert!(Captured::parse(&[s("0/10"), s("{}")])
            .unwrap()
            .applied_on
            .is_empty());
        // A malformed list is an empty list, never a guess.
        for bad in ["{4242", "4242}", "{42,x}", "{,}", "[1]"] {
            let c = Captured::parse(&[s("0/10"), s(bad)]).unwrap();
            assert!(c.applied_on.is_empty(), "{bad}");
        }
        // The position is required.
        assert_eq!(Captured::parse(&[None, s("{}")]), None);
        assert_eq!(Captured::parse(&[s("zz")]), None);
        assert_eq!(Captured::parse(&[]), None);
    }
}
