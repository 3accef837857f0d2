//! Deferred BEGIN and optimistic transactions (issue 22, `routing.transactions = optimistic`).
//!
//! A plain `BEGIN` outside a transaction is answered by tidemark itself and remembered
//! (`Phase::Deferred`); the transaction's first unit decides the node. (A declared read-only
//! `BEGIN` is deferred the same way in `read_only` mode too, only to be placed with its first
//! statement; a first unit the replica cannot answer runs again, the transaction begun anew,
//! on the primary: `Session::begin_again_on_primary`.) A first unit that reads
//! runs as `BEGIN READ ONLY` (same isolation) on a replica chosen like any read
//! (`Phase::OnReplica`); every unit the client sends is recorded (within
//! `routing.replay_budget_bytes`) and every answer relayed is folded into a running hash. At
//! the first unit that is not a read, the replica's transaction is rolled back, the primary's
//! is begun, the recorded units are replayed there (answers read, hashed, not relayed) and the
//! hashes compared after each unit: equal, the transaction goes on on the primary as any
//! other; different (or the replay failed), the primary's is rolled back and the client gets
//! 40001 in a failed transaction (`Phase::Failed`, answered here until it ends). Nothing the
//! client sent after the divergence is written.

use super::*;
use crate::clock::Coarse;

/// Where a deferred or optimistic transaction is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    /// `BEGIN` answered by tidemark; no server chosen yet.
    Deferred,
    /// Running read-only on a replica, recording.
    OnReplica,
    /// Failed by tidemark (divergence, or a server error before the transaction had a
    /// server): every statement is answered 25P02 until COMMIT/ROLLBACK.
    Failed,
}

/// One unit run on the replica, kept for the replay.
pub(super) struct Recorded {
    unit: Unit,
    /// The client's statements the unit names, as they were when it ran (a later Close must
    /// not break the replay).
    stmts: Statements,
    unnamed: Option<Arc<Stmt>>,
    /// The running hash of the answers once this unit was answered.
    pub(super) hash_after: u64,
}

pub(super) struct Optx {
    pub(super) phase: Phase,
    /// The client's BEGIN, sent as it is to the primary.
    begin_sql: String,
    /// The same transaction, read-only, for a replica.
    replica_begin: String,
    pub(super) recorded: Vec<Recorded>,
    bytes: usize,
    /// Declared read-only (`BEGIN READ ONLY`, `default_transaction_read_only`): deferred only
    /// to be placed with its first statement; never recorded or moved (a write in it is
    /// refused by any server, as directly).
    declared: bool,
    /// A unit was not recorded (over budget while failed on the replica): no replay possible.
    overflow: bool,
    pub(super) hash: u64,
    /// Deferred only to go to the primary with its first statement (a plain BEGIN under
    /// `routing.transactions = read_only`): never placed on a replica.
    primary_only: bool,
    /// The BEGIN rebuilt from its parsed modes, for sending in front of the first statement
    /// in the same query text (see `Session::begin_prefix`); `None` when it cannot be.
    canonical: Option<String>,
}

impl Optx {
    fn new(phase: Phase, begin_sql: String, replica_begin: String, declared: bool) -> Optx {
        Optx {
            phase,
            begin_sql,
            replica_begin,
            recorded: Vec::new(),
            bytes: 0,
            declared,
            overflow: false,
            hash: HASH_START,
            primary_only: false,
            canonical: None,
        }
    }

    /// A transaction that failed before any server held it, answered here until it ends.
    pub(super) fn failed() -> Optx {
        Optx::new(Phase::Failed, String::new(), String::new(), false)
    }
}

/// `BEGIN` with the modes tidemark parsed from a client's BEGIN, from a fixed vocabulary
/// (never the client's text: a trailing `--` comment in it would swallow the statement
/// appended after it). `None` for an isolation level outside PostgreSQL's four.
fn canonical_begin(
    read_only: Option<bool>,
    isolation: Option<&str>,
    deferrable: bool,
) -> Option<String> {
    let mut b = String::from("BEGIN");
    if let Some(i) = isolation {
        let level = match i.to_ascii_lowercase().as_str() {
            "serializable" => "SERIALIZABLE",
            "repeatable read" => "REPEATABLE READ",
            "read committed" => "READ COMMITTED",
            "read uncommitted" => "READ UNCOMMITTED",
            _ => return None,
        };
        b.push_str(" ISOLATION LEVEL ");
        b.push_str(level);
    }
    match read_only {
        Some(true) => b.push_str(" READ ONLY"),
        Some(false) => b.push_str(" READ WRITE"),
        None => {}
    }
    if deferrable {
        b.push_str(" DEFERRABLE");
    }
    Some(b)
}

/// Whether a transaction's first unit can carry its deferred BEGIN in front of it, in one
/// query text (`BEGIN;<the client's text>`): one simple query of one statement that neither
/// controls the transaction nor copies. A server parses such a text as a whole before it runs
/// any of it, and stops at the first error: the statement never runs outside the
/// transaction.
pub(super) fn carries_begin(unit: &Unit, a: &Analysis) -> bool {
    unit.end == UnitEnd::Query
        && matches!(unit.msgs.as_slice(), [m] if matches!(m.msg, FrontendMessage::Query(_)))
        && a.statements.len() == 1
        && !matches!(a.class, Class::Transaction(_))
        && !a.copy
}

pub(super) enum OptStep {
    /// Answered here.
    Handled,
    /// Run the unit the ordinary way (on the connection now attached, if any).
    Normal,
}

const HASH_START: u64 = 0x7469_6465_6d61_726b;

/// The hash that compares a replica's answers with the primary's: keyed with a random key per
/// process, so that data a client controls cannot be crafted to make two different answers
/// hash alike (SipHash with the fixed key of `DefaultHasher::new` is not keyed).
fn answer_hash<T: std::hash::Hash>(t: &T) -> u64 {
    use std::hash::BuildHasher;
    static KEY: std::sync::OnceLock<std::collections::hash_map::RandomState> =
        std::sync::OnceLock::new();
    KEY.get_or_init(std::collections::hash_map::RandomState::new)
        .hash_one(t)
}

/// Folds one server answer into the running hash: rows, their descriptions, command tags, and
/// an error's SQLSTATE (its message may name a server detail). Notices and parameter reports
/// are not answers.
pub(super) fn fold_reply(h: &mut u64, kind: BackendMessage, f: &Frame) {
    match kind {
        BackendMessage::RowDescription
        | BackendMessage::DataRow
        | BackendMessage::CommandComplete
        | BackendMessage::EmptyQueryResponse => {
            *h = answer_hash(&(*h, f.tag(), &f.raw()[..]));
        }
        BackendMessage::ErrorResponse => {
            let code = ErrorFields::parse(f).map(|e| e.code).unwrap_or_default();
            *h = answer_hash(&(*h, b'E', code));
        }
        _ => {}
    }
}

/// The shape of a statement text: constants blanked, a trailing comment dropped.
fn text_shape(q: &str) -> u64 {
    let (stmt, _) = tidemark_sql::split_trailing_comment(q);
    hash_of(&&*tidemark_sql::normalize(stmt.trim()))
}

fn contains_ci(t: &str, word: &str) -> bool {
    t.as_bytes()
        .windows(word.len())
        .any(|w| w.eq_ignore_ascii_case(word.as_bytes()))
}

/// The command tag PostgreSQL answers a `BEGIN` with: `START TRANSACTION` when the statement
/// is written that way (after any leading comments), `BEGIN` otherwise.
fn begin_tag(sql: &str) -> &'static str {
    let mut t = sql.trim_start();
    loop {
        if let Some(rest) = t.strip_prefix("--") {
            t = rest.split_once('\n').map_or("", |(_, r)| r).trim_start();
        } else if let Some(rest) = t.strip_prefix("/*") {
            t = rest.split_once("*/").map_or("", |(_, r)| r).trim_start();
        } else {
            break;
        }
    }
    let starts = t.get(..5).is_some_and(|w| w.eq_ignore_ascii_case("start"));
    if starts {
        "START TRANSACTION"
    } else {
        "BEGIN"
    }
}

fn aborted(msg: String) -> ErrorFields {
    ErrorFields::error("40001", msg)
        .with_hint("the transaction was rolled back; retry it from BEGIN")
}

fn in_failed_tx() -> ErrorFields {
    ErrorFields::error(
        "25P02",
        "current transaction is aborted, commands ignored until end of transaction block",
    )
}

/// The first statement of a unit, for messages (at most 120 characters).
fn unit_text(r: &Recorded) -> String {
    let t = r
        .unit
        .msgs
        .iter()
        .find_map(|m| match &m.msg {
            FrontendMessage::Query(q) => Some(q.to_string()),
            FrontendMessage::Parse { query, .. } => Some(query.to_string()),
            FrontendMessage::Bind { statement, .. } => {
                let s = if statement.is_empty() {
                    r.unnamed.clone()
                } else {
                    r.stmts.get(&**statement).cloned()
                };
                s.map(|s| s.query.clone())
            }
            _ => None,
        })
        .unwrap_or_default();
    let t = t.split_whitespace().collect::<Vec<_>>().join(" ");
    if t.chars().count() > 120 {
        format!("{}…", t.chars().take(120).collect::<String>())
    } else {
        t
    }
}

/// Replays one recorded unit on `conn`: sends it, reads every answer up to its last
/// ReadyForQuery, folds them into `h`. An error the server answers is an answer (hashed);
/// a lost connection, a FATAL or a COPY from the client is a failure.
async fn replay_unit(
    conn: &mut crate::server::ServerConn,
    r: &Recorded,
    h: &mut u64,
    watch: &NodeWatch<'_>,
) -> Result<(), String> {
    let mut last = Coarse::now();
    let Rewritten { out, mut exp, .. } = rewrite(
        &r.unit,
        &Prepared {
            statements: &r.stmts,
            unnamed: r.unnamed.as_deref(),
            on_server: &conn.prepared,
        },
        false,
    )
    .map_err(|e| e.to_string())?;
    if !out.is_empty() {
        conn.send(&out).await.map_err(|e| e.to_string())?;
    }
    use BackendMessage as B;
    loop {
        while matches!(exp.front(), Some(Exp::Synth(_))) {
            exp.pop_front();
        }
        if exp.is_empty() {
            return Ok(());
        }
        let f = recv_watched(conn, watch, &mut last)
            .await
            .map_err(|e| e.to_string())?;
        let kind = f.backend();
        match kind {
            B::NoticeResponse | B::NotificationResponse => continue,
            B::ParameterStatus => {
                if let Ok((k, v)) = be::parse_parameter_status(&f) {
                    upsert(&mut conn.params, k, v);
                }
                continue;
            }
            _ => {}
        }
        fold_reply(h, kind, &f);
        if kind == B::ErrorResponse {
            if let Ok(e) = ErrorFields::parse(&f) {
                if e.severity == "FATAL" || e.severity == "PANIC" {
                    conn.broken = true;
                    return Err(format!("{} {}", e.code, e.message));
                }
            }
            if !matches!(exp.front(), Some(Exp::Query | Exp::Func)) {
                void_until_sync(&mut exp);
            }
            continue;
        }
        let Some(front) = exp.front() else {
            return Err(format!("unexpected message {kind:?} from the primary"));
        };
        let pop = match (front, kind) {
            (Exp::Parse { register, .. }, B::ParseComplete) => {
                if let Some(g) = register {
                    conn.prepared.insert(g.clone());
                }
                true
            }
            (Exp::Bind, B::BindComplete)
            | (Exp::Close, B::CloseComplete)
            | (Exp::Describe | Exp::DescribeStmt(_), B::RowDescription | B::NoData)
            | (Exp::Execute, B::CommandComplete | B::EmptyQueryResponse | B::PortalSuspended)
            | (Exp::Sync | Exp::Query | Exp::Func, B::ReadyForQuery) => true,
            (_, B::CopyInResponse) => {
                conn.broken = true;
                return Err("COPY FROM STDIN cannot be replayed".into());
            }
            _ => false,
        };
        if pop {
            exp.pop_front();
        }
    }
}

/// `conn.recv()` for the exchanges tidemark runs on its own (a deferred BEGIN, a replay), with
/// the relay's node watch: given up, the connection marked broken, once the node has been
/// silent for longer than the monitor timeout and the monitor cannot reach it (a blackholed
/// or hung server closes no connection).
async fn recv_watched(
    conn: &mut crate::server::ServerConn,
    watch: &NodeWatch<'_>,
    last: &mut Coarse,
) -> Result<Frame, ServerError> {
    loop {
        match tokio::time::timeout(NODE_CHECK_INTERVAL, conn.recv()).await {
            Ok(r) => {
                *last = Coarse::now();
                return r;
            }
            Err(_) if watch.looks_dead(*last) => {
                conn.broken = true;
                return Err(ServerError::Protocol(format!(
                    "node {} stopped answering (no response for {:?} and the monitor cannot reach it)",
                    watch.app.node_name(watch.node),
                    last.elapsed()
                )));
            }
            Err(_) => {}
        }
    }
}

/// Sends a `BEGIN …` and reads its answer (not relayed). Not `ServerConn::simple_query`, which
/// takes a connection left in a transaction for broken (it is, here, on purpose). An empty
/// `sql` sends nothing: the transaction's first unit carries its own BEGIN.
async fn begin_on(
    conn: &mut crate::server::ServerConn,
    sql: &str,
    watch: &NodeWatch<'_>,
) -> Result<(), ServerError> {
    if sql.is_empty() {
        return Ok(());
    }
    conn.send(fe::query(sql).raw()).await?;
    let mut err = None;
    let mut last = Coarse::now();
    loop {
        let f = recv_watched(conn, watch, &mut last).await?;
        match f.backend() {
            BackendMessage::ErrorResponse => {
                err = Some(match ErrorFields::parse(&f) {
                    Ok(e) => ServerError::Server(e),
                    Err(e) => ServerError::Protocol(e.to_string()),
                })
            }
            BackendMessage::ParameterStatus => {
                if let Ok((k, v)) = be::parse_parameter_status(&f) {
                    upsert(&mut conn.params, k, v);
                }
            }
            BackendMessage::ReadyForQuery => {
                return match err {
                    Some(e) => Err(e),
                    None => Ok(()),
                }
            }
            _ => {}
        }
    }
}

/// Rolls back `c`'s transaction and gives it back, in the background (the client does not
/// wait for it, and a server that stopped answering cannot hold it); closes it if that fails
/// or takes longer than `within`.
fn roll_back_and_release(mut c: Checked, within: Duration) {
    if c.conn.broken {
        return;
    }
    tokio::spawn(async move {
        match tokio::time::timeout(within, c.conn.simple_query("ROLLBACK")).await {
            Ok(Ok(_)) => c.release(),
            _ => c.conn.broken = true,
        }
    });
}

impl Session {
    /// Whether a unit may run inside an optimistic transaction on a replica: reads, savepoints,
    /// `SET LOCAL`, COMMIT/ROLLBACK (not `AND CHAIN`), a redundant BEGIN, ended by Sync or a
    /// simple query. Anything `is_read_in` would not send to a replica (a write, `FOR UPDATE`,
    /// a volatile or unknown function, `LOCK`, `nextval`, advisory locks, `SET TRANSACTION`,
    /// session SETs, hints naming the primary) is not.
    fn optx_reads(&self, unit: &Unit, a: &Analysis) -> bool {
        if !matches!(unit.end, UnitEnd::Sync | UnitEnd::Query)
            || a.hints.target == Some(HintTarget::Primary)
            || !a.hints.errors.is_empty()
            || a.pins_session
            || a.opaque_state
            || a.signal_call
            || a.ends_sessions.is_some()
        {
            return false;
        }
        let mut chain = false;
        for m in &unit.msgs {
            match &m.msg {
                FrontendMessage::FunctionCall | FrontendMessage::NonUtf8 { .. } => return false,
                FrontendMessage::Query(q) => chain |= contains_ci(q, "chain"),
                FrontendMessage::Parse { query, .. } => chain |= contains_ci(query, "chain"),
                _ => {}
            }
        }
        a.statements.iter().all(|c| match c {
            // The transaction is not SERIALIZABLE (`defer_begin` keeps those on the
            // primary), whatever the session's default.
            Class::Read => true,
            Class::Transaction(
                TxControl::Savepoint | TxControl::Release | TxControl::RollbackTo,
            ) => true,
            Class::Transaction(TxControl::Commit | TxControl::Rollback) => !chain,
            // A BEGIN inside the transaction only warns (25001), wherever it runs.
            Class::Transaction(TxControl::Begin { .. }) => true,
            Class::SessionState(SessionKind::Set { local: true, .. }) => true,
            _ => false,
        })
    }

    /// The shape of a transaction: its first statement's text, constants blanked.
    fn shape_of(&self, unit: &Unit) -> u64 {
        for m in &unit.msgs {
            match &m.msg {
                FrontendMessage::Query(q) => return text_shape(q),
                FrontendMessage::Parse { query, .. } => return text_shape(query),
                FrontendMessage::Bind { statement, .. } => {
                    if let Some(s) = self.lookup_stmt(statement, &[]) {
                        return text_shape(&s.query);
                    }
                }
                _ => {}
            }
        }
        0
    }

    /// The unit is one statement tidemark can answer for itself: a simple query of one
    /// statement, or an extended-protocol unit ended by Sync that runs one statement (Parse,
    /// Bind, Describe, Execute, Close of it, one Execute). Its text and class.
    fn single_statement(&self, unit: &Unit, a: &Analysis) -> Option<(String, Class)> {
        let [first, rest @ ..] = a.statements.as_slice() else {
            return None;
        };
        match (unit.end, unit.msgs.as_slice()) {
            (UnitEnd::Query, [m]) if rest.is_empty() => match &m.msg {
                FrontendMessage::Query(q) => Some((q.to_string(), first.clone())),
                _ => None,
            },
            (UnitEnd::Sync, msgs) => {
                if rest.iter().any(|c| c != first) {
                    return None;
                }
                let mut text: Option<String> = None;
                let mut executes = 0;
                for m in msgs {
                    match &m.msg {
                        FrontendMessage::Parse { query, .. } => {
                            text.get_or_insert_with(|| query.to_string());
                        }
                        FrontendMessage::Bind { statement, .. } => {
                            let s = self.lookup_stmt(statement, &[])?;
                            text.get_or_insert_with(|| s.query.clone());
                        }
                        FrontendMessage::Execute { .. } => executes += 1,
                        FrontendMessage::Describe { .. }
                        | FrontendMessage::Close { .. }
                        | FrontendMessage::Sync => {}
                        _ => return None,
                    }
                }
                (executes == 1).then_some(())?;
                Some((text?, first.clone()))
            }
            _ => None,
        }
    }

    /// Answers a unit of one transaction-control statement (see [`Self::single_statement`])
    /// as PostgreSQL would: its command tag (after `notice`, if any) and the protocol's
    /// acknowledgements, then ReadyForQuery with `status`.
    async fn answer_here(
        &mut self,
        unit: &Unit,
        tag: &str,
        notice: Option<ErrorFields>,
        status: TxStatus,
    ) -> SResult<OptStep> {
        self.tx_status = status;
        for m in &unit.msgs {
            match &m.msg {
                FrontendMessage::Query(_) | FrontendMessage::Execute { .. } => {
                    if let Some(n) = &notice {
                        self.io.push(&n.to_notice());
                    }
                    self.io.push(&be::command_complete(tag));
                }
                FrontendMessage::Parse { .. } => self.io.push(&be::simple(be::PARSE_COMPLETE)),
                FrontendMessage::Bind { .. } => self.io.push(&be::simple(be::BIND_COMPLETE)),
                FrontendMessage::Describe {
                    target: Target::Statement,
                    ..
                } => {
                    self.io.push(&be::parameter_description(&[]));
                    self.io.push(&be::no_data());
                }
                FrontendMessage::Describe { .. } => self.io.push(&be::no_data()),
                FrontendMessage::Close { .. } => self.io.push(&be::simple(be::CLOSE_COMPLETE)),
                _ => {}
            }
        }
        self.io.push(&be::ready_for_query(status.byte()));
        self.io.flush().await?;
        Ok(OptStep::Handled)
    }

    /// Records a unit about to run on the replica.
    fn record(&mut self, unit: &Unit) {
        let mut stmts = Statements::default();
        let mut unnamed = None;
        for m in &unit.msgs {
            let name = match &m.msg {
                FrontendMessage::Parse { name, .. } => name,
                FrontendMessage::Bind { statement, .. } => statement,
                FrontendMessage::Describe {
                    target: Target::Statement,
                    name,
                }
                | FrontendMessage::Close {
                    target: Target::Statement,
                    name,
                } => name,
                _ => continue,
            };
            if name.is_empty() {
                unnamed = self.unnamed.clone();
            } else if let Some(s) = self.statements.get(&**name) {
                stmts.insert(name.to_string(), s.clone());
            }
        }
        let bytes: usize = unit.msgs.iter().map(|m| m.frame.len()).sum();
        let Some(o) = self.optx.as_mut() else { return };
        let hash_after = o.hash;
        o.bytes += bytes;
        o.recorded.push(Recorded {
            unit: Unit {
                msgs: unit.msgs.clone(),
                end: unit.end,
            },
            stmts,
            unnamed,
            hash_after,
        });
    }

    /// After a unit ran on the replica: the hash of the answers so far belongs to it.
    pub(super) fn optx_answered(&mut self) {
        if let Some(o) = self.optx.as_mut() {
            if o.phase == Phase::OnReplica {
                if let Some(r) = o.recorded.last_mut() {
                    r.hash_after = o.hash;
                }
            }
        }
    }

    /// A transaction started by a deferred BEGIN ended (COMMIT, ROLLBACK, or on error):
    /// learn whether its shape wrote, count a replica run.
    pub(super) fn optx_ended(&mut self, wrote: bool) {
        if let Some(shape) = self.tx_shape.take() {
            self.app.transactions.record(shape, wrote);
        }
        if let Some(o) = self.optx.take() {
            if o.phase == Phase::OnReplica {
                self.app.transactions.outcome(TxOutcome::Replica);
            }
        }
    }

    /// The session's transaction fails here (no server holds it): the client is told `e`
    /// and gets 25P02 until COMMIT/ROLLBACK.
    async fn optx_fail(&mut self, e: ErrorFields, end: UnitEnd) -> SResult<OptStep> {
        self.optx = Some(Optx::failed());
        self.tx_status = TxStatus::Failed;
        self.send_error_ready(e, end).await?;
        Ok(OptStep::Handled)
    }

    /// Ends a transaction tidemark answers for itself (no server holds it).
    async fn optx_end_here(&mut self, unit: &Unit, tag: &str) -> SResult<OptStep> {
        self.optx = None;
        self.tx_shape = None;
        self.answer_here(unit, tag, None, TxStatus::Idle).await
    }

    /// Before a unit runs: deferred BEGIN, placing a deferred transaction, recording on the
    /// replica, moving to the primary, a failed transaction's answers.
    pub(super) async fn optx_step(&mut self, unit: &Unit, a: &Arc<Analysis>) -> SResult<OptStep> {
        let Some(phase) = self.optx.as_ref().map(|o| o.phase) else {
            return self.maybe_defer_begin(unit, a).await;
        };
        match phase {
            Phase::Deferred => self.place_deferred(unit, a).await,
            Phase::OnReplica => {
                if self.tx_status == TxStatus::Failed {
                    // The replica answers (25P02 or the ROLLBACK [TO]); kept for the replay.
                    let bytes: usize = unit.msgs.iter().map(|m| m.frame.len()).sum();
                    let budget = self.app.config.load().routing.replay_budget_bytes;
                    let over = self.optx.as_ref().is_some_and(|o| o.bytes + bytes > budget);
                    if over {
                        if let Some(o) = self.optx.as_mut() {
                            o.overflow = true;
                        }
                    } else {
                        self.record(unit);
                    }
                    return Ok(OptStep::Normal);
                }
                let bytes: usize = unit.msgs.iter().map(|m| m.frame.len()).sum();
                let budget = self.app.config.load().routing.replay_budget_bytes;
                let fits = self
                    .optx
                    .as_ref()
                    .is_some_and(|o| o.bytes + bytes <= budget);
                if fits && self.optx_reads(unit, a) {
                    self.record(unit);
                    return Ok(OptStep::Normal);
                }
                self.move_to_primary(unit).await
            }
            Phase::Failed => {
                if let Some((_, Class::Transaction(TxControl::Commit | TxControl::Rollback))) =
                    self.single_statement(unit, a)
                {
                    return self.optx_end_here(unit, "ROLLBACK").await;
                }
                self.send_error_ready(in_failed_tx(), unit.end).await?;
                Ok(OptStep::Handled)
            }
        }
    }

    /// Whether [`Session::optx_step`] has anything to do with a unit of analysis `a`: a
    /// transaction it placed is in progress, or the unit may begin one it defers (the first
    /// two conditions of `may_defer_begin`). Checked before it is called, so a unit outside
    /// such transactions (nearly all) does not enter it.
    pub(super) fn optx_concerns(&self, a: &Analysis) -> bool {
        self.optx.is_some()
            || (self.tx_mode != TxMode::Primary
                && matches!(a.class, Class::Transaction(TxControl::Begin { .. })))
    }

    /// A plain BEGIN outside a transaction, with no connection held: answered here.
    async fn maybe_defer_begin(&mut self, unit: &Unit, a: &Arc<Analysis>) -> SResult<OptStep> {
        if !self.may_defer_begin(a) {
            return Ok(OptStep::Normal);
        }
        let Some((sql, class)) = self.single_statement(unit, a) else {
            return self.begin_with_its_reads(unit, a).await;
        };
        let Some(tag) = self.defer_begin(sql, &class) else {
            return Ok(OptStep::Normal);
        };
        crate::metrics::routed_cached(&mut self.routed_cache, a.class.label(), "deferred", None);
        self.answer_here(unit, tag, None, TxStatus::InBlock).await
    }

    /// `BEGIN; SELECT …[; COMMIT]` sent as one simple query (`optimistic` mode): a plain BEGIN
    /// followed only by what may run in an optimistic transaction on a replica. The unit is
    /// placed like the first unit after a deferred BEGIN, and runs as it was sent (on a hot
    /// standby the client's own `BEGIN` is read-only): on a replica it is recorded, and a
    /// later write replays it — its BEGIN included — on the primary.
    async fn begin_with_its_reads(&mut self, unit: &Unit, a: &Arc<Analysis>) -> SResult<OptStep> {
        if self.tx_mode != TxMode::Optimistic || unit.end != UnitEnd::Query || unit.msgs.len() != 1
        {
            return Ok(OptStep::Normal);
        }
        let plain = match a.statements.first() {
            Some(Class::Transaction(TxControl::Begin {
                read_only: None,
                isolation,
                ..
            })) => match isolation {
                Some(i) => i != "serializable",
                None => !self.tx_defaults.serializable && !self.tx_defaults.read_only,
            },
            _ => false,
        };
        // A COMMIT or ROLLBACK only last: what follows it would run outside the transaction.
        let ends_inside = a.statements.iter().skip(1).rev().skip(1).all(|c| {
            !matches!(
                c,
                Class::Transaction(TxControl::Commit | TxControl::Rollback)
            )
        });
        if !plain || !ends_inside || !self.optx_reads(unit, a) {
            return Ok(OptStep::Normal);
        }
        // The unit carries the BEGIN: none to send before it.
        self.optx = Some(Optx::new(
            Phase::Deferred,
            String::new(),
            String::new(),
            false,
        ));
        self.place_deferred(unit, a).await
    }

    /// No transaction, connection, pinning or hint stands in the way of deferring a BEGIN.
    fn may_defer_begin(&self, a: &Analysis) -> bool {
        self.tx_mode != TxMode::Primary
            && matches!(a.class, Class::Transaction(TxControl::Begin { .. }))
            && self.optx.is_none()
            && self.tx_status == TxStatus::Idle
            && self.attached.is_none()
            && !self.pinned
            && !self.unit_open
            && a.hints == Default::default()
    }

    /// The cheap part of [`Session::split_pipelined_begin`]'s test, checked before making its
    /// future (most units fail it): an extended unit, not under `transactions = primary`,
    /// that starts with an unnamed Parse.
    pub(super) fn may_split_pipelined_begin(&self, unit: &Unit) -> bool {
        self.tx_mode != TxMode::Primary
            && unit.end == UnitEnd::Sync
            && matches!(unit.msgs.first().map(|m| &m.msg), Some(FrontendMessage::Parse { name, .. }) if name.is_empty())
    }

    /// A BEGIN pipelined before the transaction's first statement in one unit, as pgjdbc
    /// sends it with autocommit off (Parse/Bind/[Describe]/Execute of `BEGIN`, then the
    /// statement, then Sync): the BEGIN is answered here (ParseComplete, BindComplete,
    /// [NoData], CommandComplete, no ReadyForQuery: the unit goes on) and taken off the unit,
    /// which then runs as the first unit of a deferred transaction. Returns the rest of the
    /// unit, or the unit unchanged when its BEGIN is not deferred.
    pub(super) async fn split_pipelined_begin(&mut self, unit: Unit) -> Unit {
        if !self.may_split_pipelined_begin(&unit) {
            return unit;
        }
        // The prefix: Parse "" (the BEGIN), Bind "" "", optionally Describe portal "",
        // Execute "" — and more than a Sync after it.
        let msgs = &unit.msgs;
        // (The text is copied only once the unit has that shape: an ordinary extended unit,
        // Parse/Bind/Describe/Execute/Sync of one statement, is looked at without a copy.)
        let query = match msgs.first().map(|m| &m.msg) {
            Some(FrontendMessage::Parse { name, query, .. }) if name.is_empty() => query,
            _ => return unit,
        };
        if !matches!(msgs.get(1).map(|m| &m.msg), Some(FrontendMessage::Bind { portal, statement }) if portal.is_empty() && statement.is_empty())
        {
            return unit;
        }
        let mut i = 2;
        let describe = matches!(msgs.get(i).map(|m| &m.msg), Some(FrontendMessage::Describe { target: Target::Portal, name }) if name.is_empty());
        if describe {
            i += 1;
        }
        if !matches!(msgs.get(i).map(|m| &m.msg), Some(FrontendMessage::Execute { portal, .. }) if portal.is_empty())
        {
            return unit;
        }
        let rest = i + 1;
        // Something to run after the BEGIN besides the Sync.
        if msgs.len() <= rest + 1 {
            return unit;
        }
        let sql = query.to_string();
        let a = statements::classify(&self.app, &sql).await;
        if a.statements.len() != 1 || !self.may_defer_begin(&a) {
            return unit;
        }
        let class = a.class.clone();
        let Some(tag) = self.defer_begin(sql, &class) else {
            return unit;
        };
        crate::metrics::routed_cached(&mut self.routed_cache, a.class.label(), "deferred", None);
        self.tx_status = TxStatus::InBlock;
        self.io.push(&be::simple(be::PARSE_COMPLETE));
        self.io.push(&be::simple(be::BIND_COMPLETE));
        if describe {
            self.io.push(&be::no_data());
        }
        self.io.push(&be::command_complete(tag));
        let mut unit = unit;
        unit.msgs.drain(..rest);
        unit
    }

    /// Sets up a deferred transaction for a BEGIN (`sql`, classified `class`); its command
    /// tag, or `None` when the BEGIN runs as it is sent (SERIALIZABLE and `READ WRITE` on the
    /// primary; a plain BEGIN on the primary unless `optimistic`). A declared read-only
    /// transaction is deferred in `read_only` and `optimistic` mode, to be placed (and, if
    /// the replica lacks what its first statement reads, begun anew on the primary) with its
    /// first statement.
    fn defer_begin(&mut self, sql: String, class: &Class) -> Option<&'static str> {
        let Class::Transaction(TxControl::Begin {
            read_only,
            isolation,
            deferrable,
        }) = class
        else {
            return None;
        };
        let (read_only, deferrable) = (*read_only, *deferrable);
        let serializable = match isolation {
            Some(i) => i == "serializable",
            None => self.tx_defaults.serializable,
        };
        let optimistic = self.tx_mode == TxMode::Optimistic;
        if serializable {
            if optimistic {
                self.app.transactions.outcome(TxOutcome::PrimaryLevel);
            }
            return None;
        }
        if read_only == Some(false) {
            if optimistic {
                self.app.transactions.outcome(TxOutcome::PrimaryDeclared);
            }
            return None;
        }
        let tag = begin_tag(&sql);
        let canonical = canonical_begin(read_only, isolation.as_deref(), deferrable);
        if read_only.unwrap_or(self.tx_defaults.read_only) {
            // Declared read-only: sent as it is, wherever it goes.
            let mut o = Optx::new(Phase::Deferred, sql.clone(), sql, true);
            o.canonical = canonical;
            self.optx = Some(o);
            return Some(tag);
        }
        if !optimistic {
            // It runs on the primary; deferred so that it travels with its first statement
            // (one round trip less per transaction), and holds no connection until then.
            let mut o = Optx::new(Phase::Deferred, sql, String::new(), false);
            o.primary_only = true;
            o.canonical = canonical;
            self.optx = Some(o);
            return Some(tag);
        }
        // On a replica the same transaction, read-only. (The parser gives one of the four
        // isolation levels; anything else is not deferred: the server answers it.)
        let replica_begin = canonical_begin(Some(true), isolation.as_deref(), deferrable)?;
        let mut o = Optx::new(Phase::Deferred, sql, replica_begin, false);
        o.canonical = canonical;
        self.optx = Some(o);
        Some(tag)
    }

    /// The first unit after a deferred BEGIN: where the transaction runs.
    async fn place_deferred(&mut self, unit: &Unit, a: &Arc<Analysis>) -> SResult<OptStep> {
        match self.single_statement(unit, a) {
            Some((q, Class::Transaction(TxControl::Begin { .. }))) => {
                let w = ErrorFields {
                    severity: "WARNING".into(),
                    ..ErrorFields::error("25001", "there is already a transaction in progress")
                };
                return self
                    .answer_here(unit, begin_tag(&q), Some(w), TxStatus::InBlock)
                    .await;
            }
            Some((q, Class::Transaction(TxControl::Commit))) if !contains_ci(&q, "chain") => {
                return self.optx_end_here(unit, "COMMIT").await;
            }
            Some((q, Class::Transaction(TxControl::Rollback))) if !contains_ci(&q, "chain") => {
                return self.optx_end_here(unit, "ROLLBACK").await;
            }
            _ => {}
        }
        let declared = self.optx.as_ref().is_some_and(|o| o.declared);
        let primary_only = self.optx.as_ref().is_some_and(|o| o.primary_only);
        // (Shapes are learned for optimistic transactions only; hashing the text showed in
        // the per-transaction profile.)
        let shape = if primary_only { 0 } else { self.shape_of(unit) };
        let reads = !primary_only && self.optx_reads(unit, a);
        let learned = reads && !declared && self.app.transactions.starts_on_primary(shape);
        let to_replica = reads && !learned;
        if self.app.is_paused() {
            self.wait_while_paused().await;
        }
        let (mut conn, node, role, reason) = match self.decide(a, to_replica, false).await {
            Ok(d) => d,
            Err(e) => return self.optx_fail(e, unit.end).await,
        };
        if let Err(e) = self.sync_state(&mut conn).await {
            let f = match e {
                ServerError::Server(f) => ErrorFields::error(&f.code, f.message),
                other => ErrorFields::error("08006", other.to_string()),
            };
            conn.conn.broken = true;
            return self.optx_fail(f, unit.end).await;
        }
        let Some(o) = self.optx.as_mut() else {
            return Ok(OptStep::Normal);
        };
        if role == Role::Primary && carries_begin(unit, a) {
            // The BEGIN goes in front of the statement, in one query text (see
            // `Session::begin_prefix`), not in a round trip of its own.
            self.begin_prefix = o.canonical.clone();
        }
        let begin = if self.begin_prefix.is_some() {
            String::new()
        } else if role == Role::Replica {
            o.replica_begin.clone()
        } else {
            o.begin_sql.clone()
        };
        let app = self.app.clone();
        let watch = NodeWatch { app: &app, node };
        if let Err(e) = begin_on(&mut conn.conn, &begin, &watch).await {
            let f = match e {
                ServerError::Server(f) => {
                    conn.release();
                    ErrorFields::error(&f.code, f.message)
                }
                other => {
                    conn.conn.broken = true;
                    ErrorFields::error("08006", other.to_string())
                }
            };
            return self.optx_fail(f, unit.end).await;
        }
        let target = if role == Role::Primary {
            "primary"
        } else {
            "replica"
        };
        crate::metrics::routed_cached(
            &mut self.routed_cache,
            a.class.label(),
            target,
            to_replica.then(|| reason.as_str()),
        );
        self.last_route = Some((node, reason));
        self.attached = Some(Attached { conn, node, role });
        if role == Role::Replica {
            self.first_unit_retry = self.optx.as_ref().map(|o| o.begin_sql.clone());
        }
        if declared || primary_only {
            // Placed: from here on an ordinary transaction on that server.
            self.optx = None;
        } else if role == Role::Replica {
            self.tx_shape = Some(shape);
            if let Some(o) = self.optx.as_mut() {
                o.phase = Phase::OnReplica;
            }
            self.record(unit);
        } else {
            self.tx_shape = Some(shape);
            self.optx = None;
            self.app.transactions.outcome(if learned {
                TxOutcome::PrimaryLearned
            } else if !reads {
                TxOutcome::PrimaryWrite
            } else {
                TxOutcome::PrimaryRouted
            });
        }
        Ok(OptStep::Normal)
    }

    /// The first unit of a transaction placed on a replica must run on the primary instead
    /// (see `first_unit_retry`): begins the transaction there with the client's BEGIN; an
    /// optimistic transaction is from now on an ordinary one on the primary. On failure the
    /// client has been told (the transaction failed here) and the connection is given up.
    pub(super) async fn begin_again_on_primary(
        &mut self,
        conn: &mut Checked,
        node: NodeId,
        begin: &str,
        end: UnitEnd,
    ) -> SResult<Result<(), ()>> {
        let app = self.app.clone();
        if let Err(e) = begin_on(&mut conn.conn, begin, &NodeWatch { app: &app, node }).await {
            conn.conn.broken = true;
            let f = match e {
                ServerError::Server(f) => ErrorFields::error(&f.code, f.message),
                other => ErrorFields::error("08006", other.to_string()),
            };
            self.optx_fail(f, end).await?;
            return Ok(Err(()));
        }
        if self.optx.take().is_some() {
            self.app.transactions.outcome(TxOutcome::PrimaryRouted);
        }
        Ok(Ok(()))
    }

    /// The transaction on the replica is about to write: roll it back, replay it on the
    /// primary, compare. `Normal` with the primary attached, or `Handled` (40001 sent).
    async fn move_to_primary(&mut self, unit: &Unit) -> SResult<OptStep> {
        let Some(o) = self.optx.take() else {
            return Ok(OptStep::Normal);
        };
        if let Some(att) = self.attached.take() {
            roll_back_and_release(att.conn, self.app.config.load().monitor.timeout);
        }
        match self.replay_on_primary(&o).await {
            Ok((conn, p)) => {
                self.app.transactions.outcome(TxOutcome::Replayed);
                self.app.transactions.replayed(o.bytes);
                tracing::debug!(
                    client = self.pid,
                    units = o.recorded.len(),
                    bytes = o.bytes,
                    "optimistic transaction replayed on the primary"
                );
                self.last_route = Some((p, Reason::Write));
                self.attached = Some(Attached {
                    conn,
                    node: p,
                    role: Role::Primary,
                });
                Ok(OptStep::Normal)
            }
            Err(e) => {
                self.app.transactions.outcome(TxOutcome::Diverged);
                if let Some(shape) = self.tx_shape.take() {
                    self.app.transactions.record(shape, true);
                }
                tracing::info!(client = self.pid, message = %e.message, "optimistic transaction could not move to the primary (40001)");
                self.optx_fail(e, unit.end).await
            }
        }
    }

    async fn replay_on_primary(&mut self, o: &Optx) -> Result<(Checked, NodeId), ErrorFields> {
        if o.overflow {
            return Err(aborted(format!(
                "tidemark could not move this transaction to the primary to write: it read more than routing.replay_budget_bytes ({} bytes) on a replica",
                self.app.config.load().routing.replay_budget_bytes
            )));
        }
        let view = self.app.view.load_full();
        let Some(p) = view.primary_id() else {
            return Err(aborted(
                "tidemark could not move this transaction to the primary to write: no primary is available".into(),
            ));
        };
        let mut conn = self.checkout(p).await.map_err(|e| {
            aborted(format!(
                "tidemark could not move this transaction to the primary to write: {}",
                e.message
            ))
        })?;
        let fail = |what: String| {
            aborted(format!(
                "tidemark could not move this transaction to the primary to write: {what}"
            ))
        };
        if let Err(e) = self.sync_state(&mut conn).await {
            conn.conn.broken = true;
            return Err(fail(e.to_string()));
        }
        let app = self.app.clone();
        let watch = NodeWatch { app: &app, node: p };
        let within = app.config.load().monitor.timeout;
        if let Err(e) = begin_on(&mut conn.conn, &o.begin_sql, &watch).await {
            roll_back_and_release(conn, within);
            return Err(fail(e.to_string()));
        }
        let mut h = HASH_START;
        for (i, r) in o.recorded.iter().enumerate() {
            if let Err(e) = replay_unit(&mut conn.conn, r, &mut h, &watch).await {
                roll_back_and_release(conn, within);
                return Err(fail(format!(
                    "replaying statement {} ({}) failed: {e}",
                    i + 1,
                    unit_text(r)
                )));
            }
            if h != r.hash_after {
                roll_back_and_release(conn, within);
                return Err(aborted(format!(
                    "tidemark ran this transaction's reads on a replica; moving it to the primary to write, statement {} ({}) answered differently there (the data changed since the replica's snapshot)",
                    i + 1,
                    unit_text(r)
                ))
                .with_detail("nothing of this transaction was written"));
            }
        }
        Ok((conn, p))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_ignore_constants_and_trailing_comments() {
        assert_eq!(
            text_shape("SELECT paid FROM orders WHERE id = 1"),
            text_shape("SELECT paid FROM orders WHERE id = 42 /*tidemark_key='a'*/")
        );
        assert_ne!(
            text_shape("SELECT paid FROM orders WHERE id = 1"),
            text_shape("SELECT total FROM orders WHERE id = 1")
        );
    }

    #[test]
    fn begin_is_answered_with_the_tag_postgresql_uses() {
        assert_eq!(begin_tag("BEGIN"), "BEGIN");
        assert_eq!(begin_tag("begin isolation level repeatable read"), "BEGIN");
        assert_eq!(begin_tag("START TRANSACTION"), "START TRANSACTION");
        assert_eq!(
            begin_tag("  /* app */ -- x\n start transaction isolation level read committed"),
            "START TRANSACTION"
        );
        assert_eq!(begin_tag("BEGIN TRANSACTION"), "BEGIN");
    }

    #[test]
    fn the_hash_sees_rows_tags_and_error_codes_only() {
        let mut a = HASH_START;
        let mut b = HASH_START;
        fold_reply(&mut a, BackendMessage::DataRow, &be::data_row(&[Some("f")]));
        fold_reply(&mut b, BackendMessage::DataRow, &be::data_row(&[Some("t")]));
        assert_ne!(a, b);
        let mut c = HASH_START;
        let mut d = HASH_START;
        fold_reply(
            &mut c,
            BackendMessage::ErrorResponse,
            &ErrorFields::error("42P01", "one message").to_error(),
        );
        fold_reply(
            &mut d,
            BackendMessage::ErrorResponse,
            &ErrorFields::error("42P01", "another message").to_error(),
        );
        assert_eq!(c, d);
        fold_reply(
            &mut d,
            BackendMessage::NoticeResponse,
            &ErrorFields::error("01000", "n").to_notice(),
        );
        assert_eq!(c, d);
    }
}
