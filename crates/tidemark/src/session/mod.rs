//! One client session: reads routing units from the client (a simple Query, or extended
//! protocol messages up to Sync/Flush), asks `tidemark-sql` what they are and
//! `tidemark-core` where they may go, checks out a server connection, re-establishes the
//! client's session state and prepared statements on it, relays the responses, and after
//! a write captures the commit LSN the client's later reads depend on.
//!
//! Routing rules live in `tidemark_core::route`; the session only carries them out.
//!
//! This file is the client loop (`run`, `run_unit`, `execute`). One part per concern beside it:
//! - `intake`: client input, decoded once as a unit is collected (`next_unit`);
//! - `statements`: classifying a unit, the client's prepared statements;
//! - `settings`: SETs and startup parameters replayed per client, `SET/SHOW tidemark.*`;
//! - `signals`: `pg_terminate_backend`/`pg_cancel_backend` on tidemark pids;
//! - `placement`: which node, waiting for a replica, checkout and session-state sync;
//! - `rewrite`: a unit as sent to one server connection (shared statement names, the
//!   Parses it lacks) and the answers it owes;
//! - `relay`: sending a rewritten unit and relaying the answers;
//! - `commit`: after ReadyForQuery: transaction state, commit positions, lost connections;
//! - `abandon`: a client that leaves with its server connection busy.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tidemark_core::{
    caught_up, fallback_after_wait, route, wait_budget, Applied, Consistency, Lsn, NodeId, NodeSet,
    Reason, Role, Route, RouteRequest, TargetHint, Unavailable,
};
use tidemark_sql::{
    Analysis, Class, HintTarget, SessionKind, SessionsOf, TidemarkCommand, TxControl, TxDefaults,
};
use tidemark_wire::backend::{self as be, BackendMessage, ErrorFields};
use tidemark_wire::frontend::{self as fe, ClientMessage, FrontendMessage, Target};
use tidemark_wire::{Frame, StartupParams, TxStatus};

use crate::app::{App, CancelSlot, CancelTarget, ClientInfo, ClientSignal};
use crate::client::{ClientError, ClientIo};
use crate::config::{Balance, PoolMode};
use crate::pool::{Checked, PoolError};
use crate::server::ServerError;

mod abandon;
mod commit;
mod databases;
mod fast;
mod intake;
mod optimistic;
mod placement;
mod relay;
mod rewrite;
mod settings;
mod signals;
mod statements;

use crate::config::TxMode;
use crate::tx_shapes::TxOutcome;
use commit::*;
use databases::*;
use fast::Fast;
pub use fast::FAST_READS;
use optimistic::*;
use placement::{CheckoutFailure, Routed, Speculation};
use relay::*;
pub use relay::{BEGINS_CARRIED, RELAYED_RUNS};
use rewrite::*;
pub use settings::startup_to_sets;
use settings::*;
use signals::*;
use statements::*;

/// A unit without Sync/Flush larger than this is sent on without waiting for its end.
const MAX_UNIT_BYTES: usize = 1 << 20;
/// Client messages read ahead while a unit runs.
const MAX_PENDING_BYTES: usize = 4 << 20;
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum UnitEnd {
    Sync,
    Query,
    Func,
    Flush,
    Size,
}

/// A client's prepared statements by name (looked up for every Bind; see `server::Names`).
type Statements = HashMap<String, Arc<Stmt>, foldhash::fast::RandomState>;

/// A routing unit: client messages decoded once at intake, and what ended the unit.
struct Unit {
    msgs: Vec<ClientMessage>,
    end: UnitEnd,
}

thread_local! {
    /// Message lists of finished units, for the next ones (see `recycled::Spares`).
    static UNIT_MSGS: crate::recycled::Spares<Vec<ClientMessage>> =
        const { crate::recycled::Spares::new() };
}

impl Unit {
    /// Whether the unit runs a statement, or may have one run later. A whole unit (Sync-ended,
    /// not the rest of one left open by Flush) that only parses, describes, binds the unnamed
    /// portal or closes writes nothing, even for an INSERT: drivers that prepare before they
    /// execute (tokio-postgres, sqlx) send one before every such write, and it needs no
    /// commit position read after it. A named portal outlives its unit inside a transaction
    /// and is executed by a later one, whose own analysis does not know the statement: its
    /// Bind counts as the write (test `a_portal_bound_in_one_unit_and_executed_in_the_next_is_a_write`).
    fn executes(&self) -> bool {
        self.msgs.iter().any(|m| match &m.msg {
            FrontendMessage::Query(_)
            | FrontendMessage::Execute { .. }
            | FrontendMessage::FunctionCall
            | FrontendMessage::NonUtf8 { simple: true, .. } => true,
            FrontendMessage::Bind { portal, .. } => !portal.is_empty(),
            _ => false,
        })
    }
}

impl Drop for Unit {
    fn drop(&mut self) {
        crate::recycled::give_spare(&UNIT_MSGS, std::mem::take(&mut self.msgs));
    }
}

/// The server connection a session holds across units (transaction, pinned session, or a
/// unit left open by Flush).
struct Attached {
    conn: Checked,
    node: NodeId,
    role: Role,
}

/// What `execute` worked out about a unit before its relay, for what follows it
/// (`Session::finish_unit`).
#[derive(Clone, Copy)]
struct RunFacts {
    /// The unit may write (its commit position is recorded).
    may_write: bool,
    /// The unit may commit a transaction (a lost server then answers 08007).
    may_commit: bool,
    /// The commit-position read was pipelined behind it.
    pipeline: bool,
    /// A read nothing of reached the client may run again on the primary.
    retryable: bool,
}

type SResult<T> = Result<T, ClientError>;

/// A future behind a pointer to `dyn Future`, for the paths a unit rarely takes (errors,
/// tidemark's own commands, retries, a replica that was behind): its poll function is then a
/// separate one the compiler cannot inline, so its code stays out of the unit's state
/// machine. The unit's poll function had grown to 57 KB with every such path inlined, and the
/// per-statement path crosses it: more code than the instruction cache holds
/// (docs/benchmarks.md, stop 22). One allocation, only when the path is taken.
type Cold<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

fn cold<'a, T>(f: impl std::future::Future<Output = T> + Send + 'a) -> Cold<'a, T> {
    Box::pin(f)
}

pub struct Session {
    app: Arc<App>,
    io: ClientIo,
    user: String,
    database: String,
    pid: i32,
    secret: i32,
    cancel_slot: Arc<Mutex<CancelSlot>>,
    info: Arc<Mutex<ClientInfo>>,
    /// `pg_terminate_backend` on this client's pid, and shutdown.
    signal: Arc<ClientSignal>,
    /// The relay's node-check timer, made at the first unit and kept (see `relay::Relay`).
    node_check: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    /// The metric handles of this session's last routing (see `metrics::routed_cached`).
    routed_cache: crate::metrics::RoutedCache,
    /// A deferred BEGIN that goes to the server in front of the transaction's first
    /// statement, in the same query text (`BEGIN;<statement>`), set by `place_deferred` and
    /// taken by `send_and_relay`: one round trip less per transaction. The relay drops the
    /// BEGIN's CommandComplete, and moves error positions back to the client's text.
    begin_prefix: Option<String>,
    /// The text carrying `begin_prefix` failed before its BEGIN ran (a syntax error is found
    /// before anything in the text runs): the server is outside a transaction, the client is
    /// in a failed one, which `after_ready` then answers here (`Optx::failed`).
    begin_failed: bool,
    /// Session pooling: the client was given its server's own pid and key.
    real_pid: bool,
    /// SET statements from the startup packet, then from the client, by parameter name.
    startup_sets: Vec<String>,
    sets: Vec<(String, String)>,
    state_key: u64,
    /// `default_transaction_read_only` / serializable default of `startup_sets` and `sets`
    /// (recomputed with `state_key`): decides whether a plain `BEGIN` is a read.
    tx_defaults: TxDefaults,
    consistency: Consistency,
    key: Option<String>,
    token: Lsn,
    report_lsn: bool,
    last_write_lsn: Lsn,
    /// When `last_write_lsn` was acknowledged (how long a replica still needs for it).
    last_write_at: Option<Instant>,
    /// Replicas the primary (this node id) reported at or past the last commit.
    applied: Option<(Applied, NodeId)>,
    /// Where the last routing decision sent a unit, and why (`SHOW tidemark.last_route`).
    last_route: Option<(NodeId, Reason)>,
    /// This session's spreading seed: sessions are spread over eligible replicas round-robin,
    /// and one session's reads stay on one replica while it stays eligible (see `decide`).
    balance: u64,
    /// `routing.balance = "statement"`: the unit's draw, once made (see `route_request`).
    unit_balance: Option<u64>,
    statements: Statements,
    unnamed: Option<Arc<Stmt>>,
    /// Unnamed statements before `unnamed`, newest first (see `Session::set_unnamed`).
    recent_unnamed: [Option<Arc<Stmt>>; RECENT_UNNAMED],
    attached: Option<Attached>,
    /// The client must stay on one primary connection (LISTEN, temp tables, ...).
    pinned: bool,
    tx_status: TxStatus,
    tx_wrote: bool,
    /// A Flush-ended unit is open on `attached` until its Sync.
    unit_open: bool,
    /// After an error inside an open unit, the server skips until Sync.
    server_skipping: bool,
    /// Client frames read ahead while a unit ran (decoded when their unit is collected).
    pending: VecDeque<Frame>,
    pending_bytes: usize,
    /// A decoded message that ended the previous unit's collection and starts the next.
    held: Option<ClientMessage>,
    copy_in: bool,
    /// Key of a keyed write in the current transaction.
    tx_key: Option<String>,
    /// Session-state statements run inside the current transaction (applied at COMMIT).
    tx_session_state: Vec<Class>,
    /// A write's commit position is not known (the connection was lost after the commit, or
    /// it was left unread: see `may_leave_position_unread`): the session's next read that may
    /// go to a replica first learns the primary's current position.
    write_unknown: bool,
    /// Commit positions read for this session since one of its reads last depended on one.
    captures_unread: u32,
    /// When the last write whose position was left unread was acknowledged; `None` when the
    /// unknown position is a lost one (it is then asked of the primary, never taken from the
    /// monitor's poll).
    unread_since: Option<Instant>,
    /// The client asked for its commit position (`SHOW tidemark.commit_lsn`): every write's
    /// position is read from then on.
    position_shown: bool,
    /// After tidemark itself failed a Flush-ended unit: ignore messages until Sync.
    skip_until_sync: bool,
    /// The last unit run on a server ended with an error (or did not end).
    unit_errored: bool,
    /// The unit being run executes `DISCARD ALL` or `DEALLOCATE ALL` (set by `analyse`).
    unit_clears_statements: bool,
    /// Something run in the current transaction may have changed session state invisibly:
    /// the connection is marked unknown when it is released.
    conn_state_unknown: bool,
    max_prepared: usize,
    /// Where this session's transactions run (`routing.transactions`, `SET tidemark.transactions`).
    tx_mode: TxMode,
    /// A deferred BEGIN or an optimistic transaction in progress (see `optimistic`).
    optx: Option<Optx>,
    /// The shape of the transaction a deferred BEGIN started, learned from when it ends.
    tx_shape: Option<u64>,
    /// The BEGIN of a deferred transaction just placed on a replica, for its first unit: if
    /// the replica answers that unit "does not exist (yet)" or refuses it, before anything
    /// reached the client, the transaction begins anew on the primary with it and the unit
    /// runs there (as a plain read would be retried).
    first_unit_retry: Option<String>,
    /// A read sent to a replica with its check in the same round trip (see [`Speculation`]).
    speculation: Option<Speculation>,
    /// This client's pool on each node, looked up once (pools live as long as the process).
    pools: Vec<Option<Arc<crate::pool::Pool>>>,
}

fn hash_of<T: Hash>(t: &T) -> u64 {
    let mut h = DefaultHasher::new();
    t.hash(&mut h);
    h.finish()
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
        let tx_mode = cfg.default_transactions(&user);
        let pinned = cfg.pool.mode == PoolMode::Session;
        drop(cfg);
        let cancel_slot = Arc::new(Mutex::new(CancelSlot::default()));
        let info = Arc::new(Mutex::new(ClientInfo {
            user: user.clone(),
            database: database.clone(),
            addr,
            state: "idle",
            node: None,
            consistency: consistency.to_string(),
        }));
        let signal = Arc::new(ClientSignal::default());
        let (pid, secret) = app.register_client(cancel_slot.clone(), info.clone(), signal.clone());
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
            signal,
            node_check: None,
            routed_cache: Default::default(),
            begin_prefix: None,
            begin_failed: false,
            real_pid: false,
            startup_sets: startup.into_iter().map(|(_, s)| s).collect(),
            sets: Vec::new(),
            state_key: 0,
            tx_defaults: TxDefaults::default(),
            consistency,
            key: None,
            token: Lsn::ZERO,
            report_lsn: false,
            last_write_lsn: Lsn::ZERO,
            last_write_at: None,
            applied: None,
            last_route: None,
            balance,
            unit_balance: None,
            statements: Statements::default(),
            unnamed: None,
            recent_unnamed: Default::default(),
            attached: None,
            pinned,
            tx_status: TxStatus::Idle,
            tx_wrote: false,
            unit_open: false,
            server_skipping: false,
            pending: VecDeque::new(),
            pending_bytes: 0,
            held: None,
            copy_in: false,
            tx_key: None,
            tx_session_state: Vec::new(),
            skip_until_sync: false,
            write_unknown: false,
            captures_unread: 0,
            unread_since: None,
            position_shown: false,
            conn_state_unknown: false,
            unit_clears_statements: false,
            unit_errored: false,
            max_prepared,
            tx_mode,
            optx: None,
            tx_shape: None,
            first_unit_retry: None,
            speculation: None,
            pools: Vec::new(),
        };
        s.recompute_state_key();
        s
    }

    pub fn backend_key(&self) -> i32 {
        self.pid
    }

    /// Finishes the login: reports server parameters, BackendKeyData and ReadyForQuery.
    pub async fn start(&mut self) -> SResult<bool> {
        let secret = self.secret;
        // The primary tells the server parameters (tidemark presents itself as the primary:
        // `in_hot_standby`, `default_transaction_read_only` as it has them); any healthy node
        // if there is none.
        let req = RouteRequest {
            balance: self.balance,
            ..RouteRequest::read(Consistency::Eventual, Lsn::ZERO)
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
        let (mut conn, node) = match self.checkout_typed(node, wait).await {
            Ok(c) => (c, node),
            // The primary's pool is saturated or it cannot be reached: a login does not wait
            // for it; a replica tells the parameters (as the primary's, below). A login the
            // primary refused (a role or database dropped a moment ago) is the answer: a
            // replica that has not replayed the drop yet must not let the client in.
            Err(CheckoutFailure::Exhausted(_) | CheckoutFailure::Unreachable(_))
                if !session_mode && any.is_some_and(|a| a != node) =>
            {
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
            Err(f) => {
                let mut f = f.into_error();
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
            self.io.push_parameter_status(k, v);
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
        // The ending is boxed like each unit: its future would otherwise size every idle
        // client's task; `cold` keeps its code (the abandoned-connection recovery) out of the
        // session loop's.
        let this = &mut *self;
        cold(async move {
            match r {
                Ok(()) | Err(ClientError::Closed) => {}
                Err(ClientError::Protocol(e)) => {
                    let f = ErrorFields::fatal("08P01", e.to_string());
                    crate::metrics::error("08P01");
                    let _ = this.io.send(&f.to_error()).await;
                }
                Err(ClientError::Io(e)) => tracing::debug!(error = %e, "client connection ended"),
            }
            this.detach_close().await;
        })
        .await;
        self.app.unregister_client(self.pid);
    }

    async fn run_inner(&mut self) -> SResult<()> {
        // Registered before this check: a shutdown that began earlier is seen here, a later one
        // raises the session's signal.
        if *self.app.shutting_down.borrow() {
            self.signal.raise(ClientSignal::SHUTDOWN);
        }
        loop {
            let unit = match self.next_unit().await? {
                Some(u) => u,
                None => return Ok(()),
            };
            // On the heap: the future of a unit is several KiB, and kept inline it would make
            // every idle client's task that large (memory per idle client). The allocation is
            // recycled from unit to unit (see `recycled`), so the heap costs no malloc/free per
            // statement either.
            crate::recycled::Recycled::new(|| self.run_unit(unit)).await?;
        }
    }

    /// [`Session::send_error_ready`] behind `cold`: the unit's error paths keep their code out
    /// of the per-statement path's.
    fn error_ready(&mut self, e: ErrorFields, end: UnitEnd) -> Cold<'_, SResult<()>> {
        cold(self.send_error_ready(e, end))
    }

    async fn send_error_ready(&mut self, e: ErrorFields, end: UnitEnd) -> SResult<()> {
        crate::metrics::error(&e.code);
        tracing::warn!(client = self.pid, user = %self.user, sqlstate = %e.code, message = %e.message, "error sent to client");
        self.io.push(&e.to_error());
        match end {
            UnitEnd::Sync | UnitEnd::Query | UnitEnd::Func => {
                self.io.push(&be::ready_for_query(self.tx_status.byte()));
            }
            UnitEnd::Flush | UnitEnd::Size => {
                // Like PostgreSQL after an error: ignore messages until Sync.
                self.skip_until_sync = true;
            }
        }
        self.io.flush().await
    }

    async fn run_unit(&mut self, unit: Unit) -> SResult<()> {
        if unit.end == UnitEnd::Flush && unit.msgs.iter().all(|m| m.msg == FrontendMessage::Flush) {
            // A Flush with nothing before it (drivers send one after Sync): every response
            // to earlier messages was already relayed; there is nothing to route.
            return self.io.flush().await;
        }
        if self.skip_until_sync {
            if unit.end == UnitEnd::Sync {
                self.skip_until_sync = false;
                self.io.push(&be::ready_for_query(self.tx_status.byte()));
                self.io.flush().await?;
            }
            return Ok(());
        }
        // pgjdbc's BEGIN pipelined before the first statement, under `optimistic`.
        let unit = if self.may_split_pipelined_begin(&unit) {
            self.split_pipelined_begin(unit).await
        } else {
            unit
        };
        self.unit_balance = None;
        // The commonest unit, an autocommit read, takes the short way (see `fast`).
        let (classified, routed) = match self.fast_read(&unit) {
            Fast::Run(f) => return self.run_fast(unit, f).await,
            Fast::General(a, r) => (a, r),
        };
        // What is this unit?
        let analysed = match classified {
            Some(a) => a,
            // Without a future unless a text must be classified on the blocking pool.
            None => match self.analyse_now(&unit, &LongTexts::new()) {
                Analysing::Done(a) => a,
                Analysing::Long(..) => cold(self.analyse(&unit)).await,
            },
        };
        let (analysis, stmt_updates) = match analysed {
            Ok(a) => a,
            Err(e) => return self.error_ready(e, unit.end).await,
        };
        if let Class::Tidemark(cmd) = &analysis.class {
            if unit.end == UnitEnd::Query {
                return cold(self.tidemark_command(cmd.clone())).await;
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
            return cold(self.tidemark_command_extended(&unit)).await;
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
            return self.error_ready(e, unit.end).await;
        }
        self.apply_statement_updates(stmt_updates);
        if unit.end == UnitEnd::Query && self.tx_status != TxStatus::Failed {
            if let [Class::SessionState(SessionKind::Deallocate { name: Some(n) })] =
                analysis.statements.as_slice()
            {
                // A protocol-level statement of this client (drivers deallocate theirs with
                // SQL): the server connections only know tidemark's shared names for it.
                if self.statements.remove(n).is_some() {
                    self.io.push(&be::command_complete("DEALLOCATE"));
                    self.io.push(&be::ready_for_query(self.tx_status.byte()));
                    return self.io.flush().await;
                }
            }
        }
        if analysis.signal_call && !self.real_pid && cold(self.answer_backend_signal(&unit)).await?
        {
            return Ok(());
        }
        if let Some(k) = &analysis.hints.key {
            let max = self.app.config.load().limits.max_key_length;
            if k.len() > max {
                return self.error_ready(key_too_long(k.len(), max), unit.end).await;
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
        let ends = match &analysis.ends_sessions {
            Some(target) if unit_executes(&unit) => Some(target.clone()),
            _ => None,
        };
        if let Some(target) = &ends {
            if let Some(e) = cold(self.end_sessions_of(target)).await {
                return self.error_ready(e, unit.end).await;
            }
            // Until a server answers the unit (it may fail before it is sent).
            self.unit_errored = true;
        }
        self.execute(unit, analysis, routed).await?;
        if let Some(SessionsOf::Database { name, force: true }) = &ends {
            if !self.unit_errored {
                self.terminate_clients_of(name);
            }
        }
        Ok(())
    }

    /// Carries out how a unit's relay ended. A read to retry on the primary comes back as its
    /// reason.
    async fn settle(
        &mut self,
        outcome: Result<RelayOutcome, RelayError>,
        may_write: bool,
        may_commit: bool,
        analysis: &Analysis,
    ) -> SResult<Option<String>> {
        self.unit_errored = !matches!(outcome, Ok(RelayOutcome::Done { errored: false, .. }));
        match outcome {
            Ok(RelayOutcome::Done {
                status,
                errored,
                captured,
                capture_lost,
            }) => {
                self.after_ready(status, errored, may_write, analysis, captured, capture_lost)
                    .await?
            }
            Ok(RelayOutcome::Open) => {
                self.unit_open = true;
                if may_write {
                    self.tx_wrote = true;
                }
            }
            Ok(RelayOutcome::RetryOnPrimary(why)) => return Ok(Some(why)),
            // (`execute` handles it; should it come here, the primary answers.)
            Ok(RelayOutcome::NotCaughtUp) => {
                return Ok(Some(
                    "the replica had not replayed what the read depends on".into(),
                ))
            }
            Err(RelayError::Client(e)) => return Err(e),
            Err(RelayError::Server(e)) => cold(self.server_failed(e, may_commit)).await?,
        }
        Ok(None)
    }

    /// Counts a replica check that rode with its read (the metric, and `App::replica_checks`).
    fn replica_checked(&self, caught_up: bool) {
        crate::metrics::replica_check(if caught_up { "caught_up" } else { "behind" });
        self.app.replica_checks[usize::from(!caught_up)].fetch_add(1, Ordering::Relaxed);
    }

    /// Attaches the connection routing chose, brought to the session's state, and (`count`)
    /// counts the route; `false` when it failed and the client has the error.
    async fn attach(
        &mut self,
        decision: Result<(Checked, NodeId, Role, Reason), ErrorFields>,
        end: UnitEnd,
        class: &'static str,
        read: bool,
        count: bool,
    ) -> SResult<bool> {
        let (mut conn, node, role, reason) = match decision {
            Ok(d) => d,
            Err(e) => {
                self.speculation = None;
                self.error_ready(e, end).await?;
                return Ok(false);
            }
        };
        if self.needs_sync(&conn) {
            if let Err(e) = self.sync_state(&mut conn).await {
                self.speculation = None;
                let f = match e {
                    ServerError::Server(f) => f,
                    other => ErrorFields::error("08006", other.to_string()),
                };
                self.error_ready(f, end).await?;
                return Ok(false);
            }
        }
        self.attach_now((conn, node, role, reason), class, read, count);
        Ok(true)
    }

    /// The end of [`Session::attach`], for a connection already in the session's state.
    #[inline]
    fn attach_now(
        &mut self,
        (conn, node, role, reason): (Checked, NodeId, Role, Reason),
        class: &'static str,
        read: bool,
        count: bool,
    ) {
        if count {
            let target = if role == Role::Primary {
                "primary"
            } else {
                "replica"
            };
            crate::metrics::routed_cached(
                &mut self.routed_cache,
                class,
                target,
                read.then(|| reason.as_str()),
            );
        }
        self.last_route = Some((node, reason));
        self.attached = Some(Attached { conn, node, role });
    }

    /// Decides where the unit goes and runs it there.
    /// `routed`: the unit's route when `fast_read` computed it (an autocommit read it
    /// declined), carried out here instead of routing again.
    async fn execute(
        &mut self,
        unit: Unit,
        analysis: Arc<Analysis>,
        mut routed: Option<Routed>,
    ) -> SResult<()> {
        // (A unit `place_deferred` attaches is counted where it is placed.)
        let held_before = self.attached.is_some();
        // A deferred BEGIN, an optimistic transaction's placement, recording and move.
        if self.optx_concerns(&analysis)
            && matches!(
                cold(self.optx_step(&unit, &analysis)).await?,
                OptStep::Handled
            )
        {
            return Ok(());
        }
        // A unit is everything up to Sync, and runs on one node (one implicit transaction).
        // What follows a Flush may write, so a unit ended by Flush (or by size) that will go on
        // on the same connection goes to the primary. `routing.transactions = primary`: a
        // declared read-only transaction too.
        let read_only = analysis.is_read_in(self.tx_defaults)
            && matches!(unit.end, UnitEnd::Sync | UnitEnd::Query | UnitEnd::Func)
            && !(self.tx_mode == TxMode::Primary
                && matches!(analysis.class, Class::Transaction(TxControl::Begin { .. })));
        if self.attached.is_none() {
            if self.app.is_paused() {
                self.wait_while_paused().await;
                // The cluster may have changed while the session waited.
                routed = None;
            }
            // A read outside a transaction, ended by Sync or a simple query, may be sent to a
            // replica together with the check of its position (one round trip, not two).
            let speculate = read_only
                && self.tx_status == TxStatus::Idle
                && !self.unit_open
                && !self.pinned
                && !analysis.copy;
            let decision = match routed {
                // What `decide` would compute: `fast_read` routes only an autocommit read
                // that depends on the session's own positions, as `decide` would route it.
                Some(r) if read_only && speculate => self.place(r, read_only, speculate).await,
                _ => self.decide(&analysis, read_only, speculate).await,
            };
            // (A speculative read is counted where it ends up.)
            let count = self.speculation.is_none();
            if !self
                .attach(decision, unit.end, analysis.class.label(), read_only, count)
                .await?
            {
                return Ok(());
            }
        } else if held_before {
            crate::metrics::routed_cached(
                &mut self.routed_cache,
                analysis.class.label(),
                "pinned",
                None,
            );
        }
        let may_write = (analysis.class.may_write()
            || matches!(
                analysis.class,
                Class::Transaction(TxControl::CommitPrepared | TxControl::RollbackPrepared)
            ))
            && (self.unit_open || unit.end != UnitEnd::Sync || unit.executes());
        // The first unit of a transaction placed on a replica by a deferred BEGIN may be
        // retried too: the BEGIN is sent again on the primary first.
        let first_unit = self.first_unit_retry.take().filter(|_| {
            self.attached
                .as_ref()
                .is_some_and(|a| a.role == Role::Replica)
        });
        let retryable =
            (read_only && self.tx_status == TxStatus::Idle && !self.unit_open && !self.pinned)
                || first_unit.is_some();
        let may_commit = self.unit_may_commit(&analysis, may_write);
        let pipeline = self.pipeline_capture(&analysis, may_write);
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
        let mut outcome = self.send_and_relay(&unit, retryable, pipeline).await;
        if let Some(spec) = self.speculation.take() {
            if matches!(outcome, Ok(RelayOutcome::NotCaughtUp)) {
                // The replica had not replayed it: wait and route as without the speculation.
                self.replica_checked(false);
                if let Some(att) = self.attached.take() {
                    att.conn.release();
                }
                let left = spec.budget.saturating_sub(spec.start.elapsed());
                let decision = cold(self.wait_for_replica(
                    spec.candidates,
                    spec.required,
                    spec.fallback,
                    left,
                ))
                .await;
                if !cold(self.attach(decision, unit.end, analysis.class.label(), true, true))
                    .await?
                {
                    return Ok(());
                }
                outcome = cold(self.send_and_relay(&unit, retryable, pipeline)).await;
            } else {
                crate::metrics::routed_cached(
                    &mut self.routed_cache,
                    analysis.class.label(),
                    "replica",
                    Some(Reason::ReplicaCaughtUp.as_str()),
                );
                if matches!(outcome, Ok(RelayOutcome::Done { .. })) {
                    if let Some(att) = &self.attached {
                        let node = att.node;
                        self.note_replayed(node, spec.required);
                    }
                    self.replica_checked(true);
                    crate::metrics::lsn_wait(spec.start.elapsed(), "replica");
                }
            }
        }
        self.optx_answered();
        let Some(why) = self
            .settle(outcome, may_write, may_commit, &analysis)
            .await?
        else {
            return Ok(());
        };
        let facts = RunFacts {
            may_write,
            may_commit,
            pipeline,
            retryable,
        };
        cold(self.read_again(unit, analysis, why, facts, first_unit)).await
    }

    /// After a unit's relay: carries out how it ended (`settle`) and runs a read that a
    /// replica could not answer again on the primary (`read_again`). `execute` does the same
    /// inline.
    async fn finish_unit(
        &mut self,
        unit: Unit,
        analysis: Arc<Analysis>,
        outcome: Result<RelayOutcome, RelayError>,
        facts: RunFacts,
        first_unit: Option<String>,
    ) -> SResult<()> {
        let Some(why) = self
            .settle(outcome, facts.may_write, facts.may_commit, &analysis)
            .await?
        else {
            return Ok(());
        };
        self.read_again(unit, analysis, why, facts, first_unit)
            .await
    }

    /// A read a replica could not answer, and that nothing of reached the client (`why`):
    /// it runs again on the primary, when it may.
    async fn read_again(
        &mut self,
        unit: Unit,
        analysis: Arc<Analysis>,
        why: String,
        facts: RunFacts,
        first_unit: Option<String>,
    ) -> SResult<()> {
        let RunFacts {
            may_write,
            may_commit,
            pipeline,
            retryable,
        } = facts;
        // A replica that refused a write (25006) proves the unit writes: its commit position
        // is recorded like any write's.
        tracing::info!(client = self.pid, reason = %why, "read retried on the primary");
        let may_write = may_write || why.starts_with("25006");
        let pipeline = pipeline || self.pipeline_capture(&analysis, may_write);
        crate::metrics::fallback("replica_error");
        if !retryable {
            return Ok(());
        }
        self.retry_on_primary(
            unit, analysis, why, first_unit, may_write, may_commit, pipeline,
        )
        .await
    }

    /// The end of [`Session::execute`] for a read that a replica could not answer and that
    /// nothing of reached the client: the unit runs again on the primary (behind `cold`, out of
    /// the per-statement path's code).
    #[allow(clippy::too_many_arguments)]
    async fn retry_on_primary(
        &mut self,
        unit: Unit,
        analysis: Arc<Analysis>,
        why: String,
        first_unit: Option<String>,
        may_write: bool,
        may_commit: bool,
        pipeline: bool,
    ) -> SResult<()> {
        let view = self.app.view.load_full();
        let retry = match view.primary_id() {
            Some(p) => self.checkout(p).await.map(|c| (c, p)),
            None => Err(ErrorFields::error(
                "08006",
                format!("{why}; no primary is available to retry on"),
            )),
        };
        let (mut conn, p) = match retry {
            Ok(r) => r,
            Err(e) => return self.error_ready(e, unit.end).await,
        };
        if let Err(e) = self.sync_state(&mut conn).await {
            return self
                .error_ready(ErrorFields::error("08006", e.to_string()), unit.end)
                .await;
        }
        if let Some(begin) = &first_unit {
            if self
                .begin_again_on_primary(&mut conn, p, begin, unit.end)
                .await?
                .is_err()
            {
                return Ok(());
            }
        }
        self.attached = Some(Attached {
            conn,
            node: p,
            role: Role::Primary,
        });
        let outcome = self.send_and_relay(&unit, false, pipeline).await;
        // The primary does not ask for a retry.
        self.settle(outcome, may_write, may_commit, &analysis)
            .await?;
        Ok(())
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
