//! The relay: rewriting a unit for the server connection it runs on (prepared-statement names, Parses the connection lacks), sending it, and relaying the answers with the responses each message owes.

use super::*;
use crate::clock::Coarse;
use crate::recycled::{give_spare, take_spare, Spares};

/// Runs of server answers relayed as bytes (see `plain_step`): visible to tests, which show
/// the shortcut is taken.
pub static RELAYED_RUNS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Output held back from a replica (so a failed read can be retried invisibly).
pub(super) const MAX_HELD_OUTPUT: usize = 256 * 1024;

/// What one message sent to the server will produce, in order.
#[derive(Debug)]
pub(super) enum Exp {
    Parse {
        visible: bool,
        register: Option<String>,
    },
    Bind,
    Describe,
    /// A Describe of a client's named statement, by its shared name: the shape the server
    /// gives is noted (`App::note_described_shape`).
    DescribeStmt(String),
    Execute,
    Close,
    Sync,
    Query,
    Func,
    /// tidemark's own `SELECT pg_current_wal_insert_lsn()` (see `Internal`), pipelined after
    /// a unit that ends a writing transaction; its responses are read, never relayed.
    Capture(Internal),
    /// tidemark's own `SELECT pg_last_wal_replay_lsn()`, sent to a replica in the same write
    /// as the read it gates (see `Speculation`): if the replica reports less than this, the
    /// read's answers are read and dropped, never relayed.
    Check(Lsn),
    /// A response tidemark makes itself (e.g. ParseComplete for a statement the server
    /// connection already has), emitted in its place in the stream.
    Synth(Frame),
    /// The CommandComplete of the BEGIN tidemark put in front of a transaction's first
    /// statement (see `Session::begin_prefix`): read, never relayed.
    Begin,
}

/// How a unit's relay ended.
pub(super) enum RelayOutcome {
    /// The unit's last ReadyForQuery was relayed.
    Done {
        status: TxStatus,
        /// The unit had an error.
        errored: bool,
        /// The commit position read in the same pipeline, if any.
        captured: Option<Captured>,
        /// The connection was lost after the ReadyForQuery, before the pipelined
        /// commit-position read was answered: the unit committed, its position is unknown.
        capture_lost: bool,
    },
    /// Flushed unit: all responses so far are relayed, the unit stays open.
    Open,
    /// Nothing reached the client (a read held back from a replica failed): run the unit
    /// again on the primary. The reason, with its SQLSTATE first when the server gave one.
    RetryOnPrimary(String),
    /// The replica, asked in the same round trip as the read, had not replayed what the read
    /// depends on: the read ran there but nothing reached the client; the connection is
    /// clean (its ReadyForQuery was read).
    NotCaughtUp,
}

/// Why a relay failed: the client's side or the server's.
pub(super) enum RelayError {
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

/// One unit's relay: what it reads and writes while server responses are relayed to the
/// client for the messages in `exp` (client input — COPY data, pipelined messages — is read at
/// the same time).
pub(super) struct Relay<'a> {
    pub(super) watch: NodeWatch<'a>,
    pub(super) io: &'a mut ClientIo,
    pub(super) conn: &'a mut crate::server::ServerConn,
    pub(super) exp: &'a mut VecDeque<Exp>,
    pub(super) pending: &'a mut VecDeque<Frame>,
    pub(super) pending_bytes: &'a mut usize,
    pub(super) copy_in: &'a mut bool,
    pub(super) skipping: &'a mut bool,
    /// Output held back from a replica so that a failed read can be retried invisibly.
    pub(super) hold: bool,
    /// Raised by `pg_terminate_backend` on this client.
    pub(super) kill: &'a ClientSignal,
    /// The pid the client was given, for its own notifications (transaction pooling).
    pub(super) notify_pid: Option<i32>,
    /// The session's node-check timer (see [`NodeWatch`]), kept across units.
    pub(super) check: std::pin::Pin<&'a mut tokio::time::Sleep>,
    /// An optimistic transaction on a replica: every answer relayed is folded into it.
    pub(super) hash: Option<&'a mut u64>,
    /// Characters tidemark put in front of the client's query text (a deferred BEGIN):
    /// error and notice positions are moved back by as many.
    pub(super) shift: u32,
    /// Set when that BEGIN did not run (see `Session::begin_failed`).
    pub(super) begin_failed: &'a mut bool,
}

impl Relay<'_> {
    /// Relays until the unit's last ReadyForQuery (or, for a Flush-ended unit, until every
    /// answer owed so far). A failure after the unit's own ReadyForQuery was relayed (while
    /// reading the pipelined commit-position read) does not fail the unit, which the client
    /// was already told about; it ends as `RelayOutcome::Done` with `capture_lost`.
    pub(super) async fn run(self) -> Result<RelayOutcome, RelayError> {
        let Relay {
            watch,
            io,
            conn,
            exp,
            pending,
            pending_bytes,
            copy_in,
            skipping,
            hold,
            kill,
            notify_pid,
            mut check,
            mut hash,
            shift,
            begin_failed,
        } = self;
        let watch = &watch;
        let mut unit_ready_slot: Option<(TxStatus, bool)> = None;
        let unit_ready = &mut unit_ready_slot;
        let r: Result<RelayOutcome, RelayError> = async {
    let start_out = io.pending_out();
    let mut flushed = false;
    let mut copy = CopyState::default();
    // When the server was last heard, as the node check sees it: set when the check fires
    // (first at the unit's first check, then if anything was read since the one before), so a
    // unit reads no clock unless a check comes due. Silence is so measured in steps of
    // NODE_CHECK_INTERVAL, against a monitor timeout of seconds.
    let mut last_heard: Option<Coarse> = None;
    let mut heard = false;
    let mut errored = false;
    let mut captured: Option<Captured> = None;
    // The replica check before the unit said "behind": the unit's answers are dropped.
    let mut behind = false;
    let mut check_ok = false;
    // One timer per session, re-armed only once it has fired: arming a fresh timer for every
    // unit showed in the per-statement profile. The first check of a unit may so come sooner
    // than NODE_CHECK_INTERVAL; `looks_dead` measures silence from `last_heard`, not from it.
    if check.is_elapsed() {
        check.as_mut().reset(tokio::time::Instant::now() + NODE_CHECK_INTERVAL);
    }
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
            io.flush().await.map_err(RelayError::Client)?;
            return Ok(RelayOutcome::Open);
        }
        // Answers that are only copied to the client (rows, and the completions that only
        // pop their expectation) go as one slice, decoding only their headers; anything
        // else ends the run and goes through the loop below (see `plain_step`).
        if hash.is_none() && conn.take_run(|tag| plain_step(exp, tag), |b| io.push_raw(b)) {
            RELAYED_RUNS.fetch_add(1, Ordering::Relaxed);
            if exp.is_empty() || matches!(exp.front(), Some(Exp::Synth(_))) {
                continue;
            }
        }
        // The unit's last answer right behind its run, a ReadyForQuery, goes as bytes too: the
        // common end of a unit without making a frame of it (what the `ReadyForQuery` arm
        // below does with it when it is the last thing owed).
        if hash.is_none() && !behind && !*begin_failed && exp.len() == 1 {
            if let Some(Exp::Sync | Exp::Query) = exp.front() {
                if let Some(status) = conn.take_ready(|b| io.push_raw(b)) {
                    exp.pop_front();
                    *skipping = false;
                    *copy_in = false;
                    return Ok(RelayOutcome::Done {
                        status,
                        errored,
                        captured: None,
                        capture_lost: false,
                    });
                }
            }
        }
        // Process everything already buffered before waiting.
        let frame = match conn.try_buffered() {
            Ok(Some(f)) => f,
            Ok(None) => {
                // A write's acknowledgement (its ReadyForQuery) waits for the pipelined commit
                // position, which arrives right behind it: the causal floor is raised before
                // the client can act on the acknowledgement (see `after_ready`).
                let awaiting_capture = matches!(exp.front(), Some(Exp::Capture(_)));
                if behind {
                    // Nothing of it will be sent: keep no more than nothing.
                    io.truncate_out(start_out);
                } else if io.pending_out() > 0
                    && !awaiting_capture
                    && (!hold || io.pending_out() - start_out > MAX_HELD_OUTPUT)
                {
                    io.flush().await.map_err(RelayError::Client)?;
                    flushed = true;
                }
                let read_client = *copy_in || *pending_bytes < MAX_PENDING_BYTES;
                tokio::select! {
                    biased;
                    _ = kill.wait(ClientSignal::KILL) => {
                        // pg_terminate_backend on this client: end its session now.
                        io.truncate_out(start_out);
                        io.push(&terminated().to_error());
                        io.flush().await.map_err(RelayError::Client)?;
                        return Err(RelayError::Client(ClientError::Closed));
                    }
                    // Bytes only: what arrived is taken at the top of the loop, in runs
                    // where it can be (see `plain_step`).
                    r = conn.read_more() => match r {
                        Ok(()) => {
                            heard = true;
                            continue;
                        }
                        Err(e) => return retry_held_or_fail(hold && !flushed, io, start_out, e),
                    },
                    _ = check.as_mut() => {
                        check.as_mut().reset(tokio::time::Instant::now() + NODE_CHECK_INTERVAL);
                        let last_heard = match last_heard {
                            Some(at) if !heard => at,
                            _ => {
                                heard = false;
                                *last_heard.insert(Coarse::now())
                            }
                        };
                        if watch.looks_dead(last_heard) {
                            let e = ServerError::Protocol(format!(
                                "node {} stopped answering (no response for {:?} and the monitor cannot reach it)",
                                watch.app.node_name(watch.node),
                                last_heard.elapsed()
                            ));
                            conn.broken = true;
                            return retry_held_or_fail(hold && !flushed, io, start_out, e);
                        }
                        continue;
                    }
                    r = io.fill_active(), if read_client => {
                        r.map_err(RelayError::Client)?;
                        take_client_frames(io, conn, &mut copy, copy_in, pending, pending_bytes).await?;
                        continue;
                    }
                }
            }
            Err(e) => {
                // A malformed message: as when it arrives while waiting (the select reads
                // bytes only, so that is where it used to be found), a held read is retried.
                return retry_held_or_fail(hold && !flushed, io, start_out, e);
            }
        };
        let kind = frame.backend();
        tracing::trace!(?kind, front = ?exp.front().map(|e| format!("{e:?}").chars().take(20).collect::<String>()), "server frame");
        match kind {
            BackendMessage::NoticeResponse => {
                push_shifted(io, &frame, shift);
                continue;
            }
            BackendMessage::NotificationResponse => {
                match notify_pid {
                    Some(p) => io.push(&own_notification(&frame, conn.backend_pid, p)),
                    None => io.push(&frame),
                }
                continue;
            }
            BackendMessage::ParameterStatus => {
                if let Ok((k, v)) = be::parse_parameter_status(&frame) {
                    upsert(&mut conn.params, k, v);
                }
                io.push(&frame);
                continue;
            }
            _ => {}
        }
        if let Some(Exp::Begin) = exp.front() {
            match kind {
                BackendMessage::CommandComplete => {
                    exp.pop_front();
                    continue;
                }
                BackendMessage::ErrorResponse => {
                    // Before the BEGIN ran: the text failed as a whole (PostgreSQL parses all
                    // of it first), the server is outside a transaction. The error is the
                    // client's statement's, relayed below.
                    exp.pop_front();
                    *begin_failed = true;
                }
                _ => {
                    return Err(RelayError::Server(ServerError::Protocol(format!(
                        "unexpected message {kind:?} from server in answer to BEGIN"
                    ))))
                }
            }
        }
        if let Some(Exp::Check(required)) = exp.front() {
            // The replica's answer to the check, read before anything of the unit.
            match kind {
                BackendMessage::DataRow => {
                    check_ok = be::data_row_values(&frame)
                        .ok()
                        .and_then(|r| r.into_iter().next().flatten())
                        .and_then(|v| v.parse::<Lsn>().ok())
                        .is_some_and(|at| at >= *required);
                }
                BackendMessage::ReadyForQuery => {
                    exp.pop_front();
                    behind = !check_ok;
                }
                BackendMessage::ErrorResponse => Internal::ReplayCheck.failed(&mut conn.prepared),
                _ => {}
            }
            continue;
        }
        if let Some(h) = hash.as_deref_mut() {
            fold_reply(h, kind, &frame);
        }
        if let Some(&Exp::Capture(stmt)) = exp.front() {
            // The unit's ReadyForQuery is held (not flushed) until its commit position is
            // read; read the pipelined capture.
            match kind {
                BackendMessage::DataRow => {
                    captured = be::data_row_values(&frame)
                        .ok()
                        .and_then(|r| Captured::parse(&r));
                }
                BackendMessage::ReadyForQuery => {
                    exp.pop_front();
                    let (status, e) = unit_ready.unwrap_or((TxStatus::Idle, errored));
                    if exp.is_empty() {
                        return Ok(RelayOutcome::Done {
                            status,
                            errored: e,
                            captured,
                            capture_lost: false,
                        });
                    }
                }
                BackendMessage::ErrorResponse => {
                    captured = None;
                    stmt.failed(&mut conn.prepared);
                }
                _ => {}
            }
            continue;
        }
        if kind == BackendMessage::ErrorResponse {
            if let Ok(f) = ErrorFields::parse(&frame) {
                if f.severity == "FATAL" || f.severity == "PANIC" {
                    // The server connection is ending (terminated backend, shutdown): the
                    // client's connection to tidemark is not. Report it once, as an ERROR.
                    conn.broken = true;
                    if hold && !flushed {
                        io.truncate_out(start_out);
                        return Ok(RelayOutcome::RetryOnPrimary(format!("{} {}", f.code, f.message)));
                    }
                    return Err(RelayError::Server(ServerError::Server(f)));
                }
                // Also "cannot use serializable mode in a hot standby": a default isolation
                // tidemark cannot see (ALTER ROLE/DATABASE … SET, postgresql.conf).
                let recovery_only = f.code == "0A000"
                    && (f.message.contains("during recovery")
                        || f.message.contains("in a hot standby"));
                if hold && !flushed && !behind && not_replayed_yet(&f.code) {
                    // An object the replica does not have (yet): a table, column, schema,
                    // function or type another session just created. The primary answers —
                    // with PostgreSQL's own error if the object exists nowhere.
                    io.truncate_out(start_out);
                    cold(drain_to_ready(conn, exp)).await.map_err(RelayError::Server)?;
                    return Ok(RelayOutcome::RetryOnPrimary(format!("{} {}", f.code, f.message)));
                }
                if hold && !flushed && !behind && (f.code == "25006" || recovery_only) {
                    // A replica refused a write it was sent, or a relation it cannot read
                    // (unlogged, temporary): retry on the primary.
                    io.truncate_out(start_out);
                    cold(drain_to_ready(conn, exp)).await.map_err(RelayError::Server)?;
                    let code = if f.message.contains("in a hot standby") {
                        "0A000"
                    } else {
                        "25006"
                    };
                    return Ok(RelayOutcome::RetryOnPrimary(format!("{code} {}", f.message)));
                }
                if f.code == "0A000"
                    && be::error_field(&frame, b'R') == Some("RevalidateCachedQuery")
                {
                    conn.stale_plan_seen = true;
                }
                if !behind {
                    crate::metrics::error(&f.code);
                }
            }
            push_shifted(io, &frame, shift);
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
            return Err(RelayError::Server(ServerError::Protocol(format!(
                "unexpected message {kind:?} from server"
            ))));
        };
        let mut pop = false;
        use BackendMessage as B;
        match (front, kind) {
            (Exp::Parse { visible, register }, B::ParseComplete) => {
                if *visible {
                    io.push(&frame);
                }
                if let Some(g) = register {
                    conn.prepared.insert(g.clone());
                }
                pop = true;
            }
            (Exp::Bind, B::BindComplete) | (Exp::Close, B::CloseComplete) => {
                io.push(&frame);
                pop = true;
            }
            (Exp::Describe, B::RowDescription | B::NoData) => {
                io.push(&frame);
                pop = true;
            }
            (Exp::DescribeStmt(g), B::RowDescription | B::NoData) => {
                if let Some(shape) = be::row_shape(&frame) {
                    watch.app.note_described_shape(g, shape);
                }
                io.push(&frame);
                pop = true;
            }
            (Exp::Execute, B::CommandComplete | B::EmptyQueryResponse | B::PortalSuspended) => {
                io.push(&frame);
                pop = true;
            }
            (Exp::Sync | Exp::Query | Exp::Func, B::ReadyForQuery) => {
                if *begin_failed {
                    // The client's BEGIN was answered and its first statement failed: a
                    // failed transaction, as on a direct connection.
                    io.push(&be::ready_for_query(b'E'));
                } else {
                    io.push(&frame);
                }
                exp.pop_front();
                *skipping = false;
                *copy_in = false;
                let status = be::ready_status(&frame)
                    .ok()
                    .and_then(TxStatus::from_byte)
                    .ok_or_else(|| {
                        RelayError::Server(ServerError::Protocol(
                            "ReadyForQuery with an unknown transaction status".into(),
                        ))
                    })?;
                *unit_ready = Some((status, errored));
                if exp.is_empty() {
                    if behind {
                        io.truncate_out(start_out);
                        return Ok(RelayOutcome::NotCaughtUp);
                    }
                    return Ok(RelayOutcome::Done {
                        status,
                        errored,
                        captured: None,
                        capture_lost: false,
                    });
                }
                continue;
            }
            (front, B::CopyInResponse) => {
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
                    conn.send(f.raw()).await.map_err(RelayError::Server)?;
                    if copy.done_by(&f) {
                        *copy_in = false;
                    }
                }
                // And copy data read with the COPY statement itself, before the server asked
                // for it (asyncpg sends it without waiting): no more bytes may come from the
                // client until it is answered.
                take_client_frames(io, conn, &mut copy, copy_in, pending, pending_bytes).await?;
                io.flush().await.map_err(RelayError::Client)?;
                flushed = true;
            }
            _ => io.push(&frame),
        }
        if pop {
            exp.pop_front();
        }
    }
        }
        .await;
        match (r, unit_ready_slot) {
            (Err(RelayError::Server(e)), Some((status, errored)))
                if matches!(exp.front(), Some(Exp::Capture(_))) =>
            {
                tracing::warn!(error = %e, "server connection lost after a commit, before its position was read");
                conn.broken = true;
                // The acknowledgement stays held: `after_ready` marks the causal floor
                // unknown before releasing it.
                Ok(RelayOutcome::Done {
                    status,
                    errored,
                    captured: None,
                    capture_lost: true,
                })
            }
            (r, _) => r,
        }
    }
}

/// A server failure during the relay. A read still held back from a replica (`held`: nothing
/// of it reached the client) drops what was queued and runs again on the primary; anything
/// else fails the unit.
fn retry_held_or_fail(
    held: bool,
    io: &mut ClientIo,
    start_out: usize,
    e: ServerError,
) -> Result<RelayOutcome, RelayError> {
    if held {
        io.truncate_out(start_out);
        return Ok(RelayOutcome::RetryOnPrimary(e.to_string()));
    }
    Err(RelayError::Server(e))
}

/// Whether the relay loop would only copy a server message with `tag` to the client (and pop
/// the expectation it answers, which this does): such messages are relayed as bytes, in runs,
/// without decoding each. Everything else stops the run and goes through the loop: ReadyForQuery,
/// ErrorResponse, notices, ParameterStatus, notifications, COPY, ParseComplete when it is hidden
/// or registers a statement, anything while a commit position is read, anything unexpected.
/// None of the messages taken changes the connection's protocol state
/// (`tidemark_wire::state::ServerState::received`).
fn plain_step(exp: &mut VecDeque<Exp>, tag: u8) -> bool {
    let pop = match (exp.front(), tag) {
        // tidemark's own exchanges are read, not relayed.
        (None | Some(Exp::Capture(_) | Exp::Check(_) | Exp::Synth(_) | Exp::Begin), _) => {
            return false
        }
        (Some(_), b'D') => false,
        (Some(Exp::Query), b'T' | b'C' | b'I') => false,
        (Some(Exp::Describe | Exp::DescribeStmt(_)), b't') => false,
        (Some(Exp::Bind), b'2') | (Some(Exp::Close), b'3') => true,
        (Some(Exp::Describe), b'T' | b'n') => true,
        (Some(Exp::Execute), b'C' | b'I' | b's') => true,
        (
            Some(Exp::Parse {
                visible: true,
                register: None,
            }),
            b'1',
        ) => true,
        _ => return false,
    };
    if pop {
        exp.pop_front();
    }
    true
}

/// The client frames already read into `io`: COPY data (while the server copies in) goes to
/// the server, anything else is kept, in order, for after the unit.
async fn take_client_frames(
    io: &mut ClientIo,
    conn: &mut crate::server::ServerConn,
    copy: &mut CopyState,
    copy_in: &mut bool,
    pending: &mut VecDeque<Frame>,
    pending_bytes: &mut usize,
) -> Result<(), RelayError> {
    while let Some(f) = io.try_frame().map_err(RelayError::Client)? {
        if copy.takes(&f, *copy_in) {
            conn.send(f.raw()).await.map_err(RelayError::Server)?;
            if copy.done_by(&f) {
                *copy_in = false;
            }
        } else {
            *pending_bytes += f.len();
            pending.push_back(f);
        }
    }
    Ok(())
}

pub(super) const NODE_CHECK_INTERVAL: Duration = Duration::from_millis(250);

/// Lets a relay notice that the node it waits on is gone (blackholed or dead without a
/// TCP reset), so no client waits forever: the node must be silent for longer than the
/// monitor timeout *and* reported unreachable by the monitor.
pub(super) struct NodeWatch<'a> {
    pub(super) app: &'a App,
    pub(super) node: NodeId,
}

impl NodeWatch<'_> {
    pub(super) fn looks_dead(&self, last_heard: Coarse) -> bool {
        // The monitor timeout is read only here, when the timer fires (reading the
        // configuration per unit showed in the per-statement profile).
        last_heard.elapsed() > self.app.config.load().monitor.timeout
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
pub(super) struct CopyState {
    /// Started by Execute (extended protocol): the server ignored the unit's Sync while
    /// copying, so the Sync the client sends after CopyDone/CopyFail goes to it as well.
    pub(super) extended: bool,
    pub(super) sync_follows: bool,
}

impl CopyState {
    pub(super) fn takes(&mut self, f: &Frame, copy_in: bool) -> bool {
        match f.tag() {
            b'd' | b'c' | b'f' if copy_in => true,
            b'S' if self.sync_follows => {
                self.sync_follows = false;
                true
            }
            _ => false,
        }
    }

    pub(super) fn done_by(&mut self, f: &Frame) -> bool {
        let done = matches!(f.tag(), b'c' | b'f');
        if done && self.extended {
            self.sync_follows = true;
        }
        done
    }
}

pub(super) fn upsert(v: &mut Vec<(String, String)>, k: String, val: String) {
    if let Some(e) = v.iter_mut().find(|(n, _)| *n == k) {
        e.1 = val;
    } else {
        v.push((k, val));
    }
}

/// After an error, the server skips everything up to Sync: so do the expectations.
pub(super) fn void_until_sync(exp: &mut VecDeque<Exp>) {
    while let Some(e) = exp.front() {
        if matches!(e, Exp::Sync) {
            break;
        }
        exp.pop_front();
    }
}

/// Reads and drops server output up to the ReadyForQuery that ends `exp`.
pub(super) async fn drain_to_ready(
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
        if f.backend() == BackendMessage::ReadyForQuery {
            exp.clear();
            return Ok(());
        }
    }
}

impl Session {
    /// Rewrites the unit for the attached server connection, sends it and relays responses.
    pub(super) async fn send_and_relay(
        &mut self,
        unit: &Unit,
        retryable: bool,
        pipeline_capture: bool,
    ) -> Result<RelayOutcome, RelayError> {
        let Some(att) = self.attached.as_mut() else {
            return Err(RelayError::Server(ServerError::Closed));
        };
        let skipping = self.server_skipping;
        let conn = &mut att.conn.conn;
        let begin = self.begin_prefix.take();
        self.begin_failed = false;
        // A unit that is one simple query goes to the server as the client sent it, without
        // a rewrite buffer (what `rewrite` would make of it: the same bytes, one Query owed).
        let mut verbatim = match unit.msgs.as_slice() {
            [m] if !skipping
                && begin.is_none()
                && matches!(
                    m.msg,
                    FrontendMessage::Query(_) | FrontendMessage::NonUtf8 { simple: true, .. }
                ) =>
            {
                Some(m.frame.raw())
            }
            _ => None,
        };
        // Characters put in front of the client's text: `<BEGIN>;`.
        let shift = begin.as_ref().map_or(0, |b| b.len() as u32 + 1);
        let Rewritten {
            mut out,
            mut exp,
            prepares_copies,
        } = match (verbatim, begin) {
            (None, Some(begin)) => carried_begin(&begin, unit, skipping)?,
            (Some(_), _) => Rewritten {
                out: bytes::BytesMut::new(),
                exp: {
                    let mut exp = take_spare(&EXP_SPARES);
                    exp.push_back(Exp::Query);
                    exp
                },
                prepares_copies: false,
            },
            (None, None) => rewrite(
                unit,
                &Prepared {
                    statements: &self.statements,
                    unnamed: self.unnamed.as_deref(),
                    on_server: &conn.prepared,
                },
                skipping,
            )
            .map_err(|e| RelayError::Client(e.into()))?,
        };
        if prepares_copies
            && matches!(unit.end, UnitEnd::Sync)
            && matches!(
                conn.proto.phase(),
                tidemark_wire::Phase::Idle | tidemark_wire::Phase::InTransaction
            )
        {
            // Copies of client statements are prepared here for the first time: see that they
            // have the shape the clients were given before the unit runs on them.
            give_spare(&EXP_SPARES, exp);
            give_spare(&OUT_SPARES, out);
            let checked = cold(recheck_copies(
                &self.app,
                &self.statements,
                self.unnamed.as_deref(),
                conn,
                &mut self.io,
                unit,
                skipping,
            ))
            .await?;
            let r = match checked {
                Ok(r) => r,
                Err(status) => {
                    return Ok(RelayOutcome::Done {
                        status,
                        errored: true,
                        captured: None,
                        capture_lost: false,
                    })
                }
            };
            out = r.out;
            exp = r.exp;
        }
        self.cancel_slot.lock().set(CancelTarget {
            node: conn.endpoint.clone(),
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
            if let Some(raw) = verbatim.take() {
                out = take_spare(&OUT_SPARES);
                out.extend_from_slice(raw);
            }
            let stmt = capture_stmt(&self.app);
            out.extend_from_slice(stmt.run_on(&mut conn.prepared, self.pinned));
            exp.push_back(Exp::Capture(stmt));
        }
        if att.role == Role::Replica {
            if let Some(required) = self.speculation.as_ref().map(|s| s.required) {
                // The replica check goes in the same write, before the read (one round trip).
                let check = Internal::ReplayCheck.run_on(&mut conn.prepared, self.pinned);
                match verbatim.take() {
                    Some(raw) => {
                        out = take_spare(&OUT_SPARES);
                        out.extend_from_slice(check);
                        out.extend_from_slice(raw);
                    }
                    None => {
                        let mut with_check = take_spare(&OUT_SPARES);
                        with_check.extend_from_slice(check);
                        with_check.extend_from_slice(&out);
                        give_spare(&OUT_SPARES, std::mem::replace(&mut out, with_check));
                    }
                }
                exp.push_front(Exp::Check(required));
            }
        }
        let bytes: &[u8] = verbatim.map_or(&out[..], |b| &b[..]);
        if !bytes.is_empty() {
            // Without a future when the socket takes the unit at once (see `send_now`).
            let sent = conn.send_now(bytes)?;
            if sent < bytes.len() {
                conn.send_tail(&bytes[sent..]).await?;
            }
        }
        let hold = retryable && att.role == Role::Replica;
        let watch = NodeWatch {
            app: &self.app,
            node: att.node,
        };
        let notify_pid = (!self.real_pid).then_some(self.pid);
        let hash = if att.role == Role::Replica {
            self.optx
                .as_mut()
                .filter(|o| o.phase == Phase::OnReplica)
                .map(|o| &mut o.hash)
        } else {
            None
        };
        let r = Relay {
            watch,
            io: &mut self.io,
            conn,
            exp: &mut exp,
            pending: &mut self.pending,
            pending_bytes: &mut self.pending_bytes,
            copy_in: &mut self.copy_in,
            skipping: &mut self.server_skipping,
            hold,
            kill: &self.signal,
            notify_pid,
            check: self
                .node_check
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(NODE_CHECK_INTERVAL)))
                .as_mut(),
            hash,
            shift,
            begin_failed: &mut self.begin_failed,
        }
        .run()
        .await;
        give_spare(&EXP_SPARES, exp);
        give_spare(&OUT_SPARES, out);
        if let Some(a) = self
            .attached
            .as_mut()
            .filter(|a| a.conn.conn.stale_plan_seen)
        {
            a.conn.conn.stale_plan_seen = false;
            cold_retire_stale_names(&self.app, &self.statements, unit);
        }
        if self.cancel_slot.lock().clear() {
            // A cancel for this unit is still on its way to the server: it could cancel
            // whatever the connection runs next, so no other client gets it.
            if let Some(a) = self.attached.as_mut() {
                a.conn.conn.broken = true;
            }
        }
        self.info.lock().state = "idle";
        if let Ok(RelayOutcome::RetryOnPrimary(_)) = &r {
            // Drop the replica connection (it may be mid-response) and retry.
            self.attached = None;
            self.server_skipping = false;
            self.copy_in = false;
        }
        r
    }
}

/// Relays an error or notice, its position moved back by the `shift` characters tidemark put
/// in front of the client's text (see `Relay::shift`).
fn push_shifted(io: &mut ClientIo, frame: &Frame, shift: u32) {
    match (shift > 0)
        .then(|| be::shift_position(frame, shift))
        .flatten()
    {
        Some(moved) => io.push(&moved),
        None => io.push(frame),
    }
}

/// The first unit of a deferred transaction with its BEGIN in front of its text (see
/// `Session::begin_prefix`): `<begin>;<text>` as one Query, the BEGIN's CommandComplete owed
/// before the unit's own answers. `place_deferred` sets the prefix only for a unit that
/// `carries_begin`; any other is refused rather than run outside its transaction.
fn carried_begin(begin: &str, unit: &Unit, skipping: bool) -> Result<Rewritten, RelayError> {
    let q = match (skipping, unit.msgs.as_slice()) {
        (false, [m]) => match &m.msg {
            FrontendMessage::Query(q) => Some(q),
            _ => None,
        },
        _ => None,
    };
    let Some(q) = q else {
        return Err(RelayError::Server(ServerError::Protocol(
            "a deferred BEGIN was to travel with a unit that cannot carry it".into(),
        )));
    };
    BEGINS_CARRIED.fetch_add(1, Ordering::Relaxed);
    let mut out = take_spare(&OUT_SPARES);
    // Q, length, `<begin>;<text>`, NUL.
    let len = 4 + begin.len() + 1 + q.len() + 1;
    out.reserve(1 + len);
    out.extend_from_slice(b"Q");
    out.extend_from_slice(&(len as i32).to_be_bytes());
    out.extend_from_slice(begin.as_bytes());
    out.extend_from_slice(b";");
    out.extend_from_slice(q.as_bytes());
    out.extend_from_slice(b"\0");
    let mut exp = take_spare(&EXP_SPARES);
    exp.push_back(Exp::Begin);
    exp.push_back(Exp::Query);
    Ok(Rewritten {
        out,
        exp,
        prepares_copies: false,
    })
}

/// Deferred BEGINs sent in front of their transaction's first statement (see
/// `Session::begin_prefix`): visible to tests, which show the path is taken.
pub static BEGINS_CARRIED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

thread_local! {
    /// Lists of expected answers and rewritten bytes of finished units, for the next ones
    /// (see `recycled::Spares`).
    pub(super) static EXP_SPARES: Spares<VecDeque<Exp>> = const { Spares::new() };
    pub(super) static OUT_SPARES: Spares<bytes::BytesMut> = const { Spares::new() };
}

/// SQLSTATEs a replica answers for an object it has not replayed yet (and the primary may
/// have): undefined table, column, function, object (type, ...), schema.
pub(super) fn not_replayed_yet(code: &str) -> bool {
    matches!(code, "42P01" | "42703" | "42883" | "42704" | "3F000")
}

/// The named client statement a Bind or a Describe of a statement uses.
fn used_statement(msg: &FrontendMessage) -> Option<&str> {
    let name = match msg {
        FrontendMessage::Bind { statement, .. } => statement,
        FrontendMessage::Describe {
            target: Target::Statement,
            name,
        } => name,
        _ => return None,
    };
    Some(&**name).filter(|n| !n.is_empty())
}

/// A statement of `unit` was refused because its result shape changed since the server copy
/// was prepared (a column added, dropped or retyped). The copies stay where they are: a
/// client that prepared the statement before the change gets the same 0A000 from them, as it
/// would directly. Statements prepared from now on get new shared names, so a client that
/// prepares again (as drivers do after this error) gets a fresh copy instead of the stale
/// one again on every connection that holds it.
#[cold]
fn cold_retire_stale_names(app: &App, statements: &Statements, unit: &Unit) {
    for m in &unit.msgs {
        if let Some(stmt) = used_statement(&m.msg).and_then(|n| statements.get(n)) {
            app.retire_shared_name(&stmt.global);
        }
    }
}

/// [`prepare_copies_and_compare`], then the unit rewritten for the connection that now has
/// the copies; `Err(status)` when the unit was refused and not sent (its error and
/// ReadyForQuery, with that transaction status, are queued for the client):
/// - a copy's shape differs: 0A000, as PostgreSQL answers. Inside a transaction block that
///   error aborts the transaction there, so the server's transaction is made to fail too
///   (see [`fail_transaction`]) and the client's next statements get the server's own 25P02;
/// - inside a transaction block, preparing a copy failed (its table is gone, say): that
///   error, which aborted the transaction as the client's statement would have. (Outside
///   one the unit runs and meets the same error itself.)
async fn recheck_copies(
    app: &App,
    statements: &Statements,
    unnamed: Option<&Stmt>,
    conn: &mut crate::server::ServerConn,
    io: &mut ClientIo,
    unit: &Unit,
    skipping: bool,
) -> Result<Result<Rewritten, TxStatus>, RelayError> {
    let in_block = conn.proto.phase() == tidemark_wire::Phase::InTransaction;
    match prepare_copies_and_compare(app, statements, unit, conn)
        .await
        .map_err(RelayError::Server)?
    {
        CopyCheck::Fine => {}
        CopyCheck::Stale(e) => {
            let status = if in_block {
                fail_transaction(conn).await.map_err(RelayError::Server)?;
                TxStatus::Failed
            } else {
                TxStatus::Idle
            };
            io.push(&e.to_error());
            io.push(&be::ready_for_query(status.byte()));
            return Ok(Err(status));
        }
        CopyCheck::Failed(error) if in_block => {
            io.push(&error);
            io.push(&be::ready_for_query(TxStatus::Failed.byte()));
            return Ok(Err(TxStatus::Failed));
        }
        CopyCheck::Failed(_) => {}
    }
    rewrite(
        unit,
        &Prepared {
            statements,
            unnamed,
            on_server: &conn.prepared,
        },
        skipping,
    )
    .map(Ok)
    .map_err(|e| RelayError::Client(e.into()))
}

/// Makes the transaction block open on `conn` fail, as the client was told it did (a 0A000
/// that tidemark found before the statement ran, where PostgreSQL finds it as the statement
/// runs): a statement that is bound to fail (a cast whose message names the reason, for the
/// server's log), answered here and not relayed. The block is then in the server's own failed
/// state, so what follows (25P02 for statements, ROLLBACK, ROLLBACK TO SAVEPOINT) is the
/// server's answer, as directly.
async fn fail_transaction(conn: &mut crate::server::ServerConn) -> Result<(), ServerError> {
    const FAIL: &str =
        "SELECT 'tidemark: cached plan must not change result type (0A000)'::pg_catalog.int4";
    conn.send(fe::query(FAIL).raw()).await?;
    loop {
        let f = conn.recv().await?;
        if f.backend() == BackendMessage::ReadyForQuery {
            return match be::ready_status(&f) {
                Ok(b'E') => Ok(()),
                _ => Err(ServerError::Protocol(
                    "a statement meant to fail the transaction did not".into(),
                )),
            };
        }
    }
}

/// What [`prepare_copies_and_compare`] found.
enum CopyCheck {
    /// Nothing to prepare, or every copy has the shape clients were given.
    Fine,
    /// A copy's shape differs from what clients were given: PostgreSQL's 0A000.
    Stale(ErrorFields),
    /// Preparing a copy failed: the server's ErrorResponse.
    Failed(Frame),
}

/// Prepares on `conn`, in a round trip of their own, the copies of the unit's client
/// statements it lacks whose result shape clients were given (`App::shape_of`), and describes
/// them. A copy prepared after the statement's tables changed has another shape, and running
/// the unit on it would give the client rows it decodes with the old one; PostgreSQL refuses
/// such a statement with 0A000 "cached plan must not change result type", and so does this
/// (`Some`: the unit is answered with that error and not sent; the name is retired, so
/// preparing again gets a fresh copy). The copies that were prepared are recorded on `conn`
/// either way. Only on a connection that owes nothing, outside a transaction block or inside
/// one that has not failed: the round trip's Sync ends no transaction block (it ends the
/// implicit transaction of its own messages outside one).
async fn prepare_copies_and_compare(
    app: &App,
    statements: &Statements,
    unit: &Unit,
    conn: &mut crate::server::ServerConn,
) -> Result<CopyCheck, ServerError> {
    let mut copies: Vec<(&Stmt, u64)> = Vec::new();
    for m in &unit.msgs {
        if matches!(
            m.msg,
            FrontendMessage::Parse { .. } | FrontendMessage::NonUtf8 { simple: false, .. }
        ) {
            // A Parse in the unit makes the client's statement new: it is prepared as sent.
            return Ok(CopyCheck::Fine);
        }
        let Some(stmt) = used_statement(&m.msg).and_then(|n| statements.get(n)) else {
            continue;
        };
        if conn.prepared.contains(&stmt.global)
            || copies.iter().any(|(c, _)| c.global == stmt.global)
        {
            continue;
        }
        if let Some(shape) = app.shape_of(&stmt.global) {
            copies.push((stmt, shape));
        }
    }
    if copies.is_empty() {
        return Ok(CopyCheck::Fine);
    }
    let mut out = Vec::new();
    for (stmt, _) in &copies {
        out.extend_from_slice(stmt.parse_frame(&stmt.global).raw());
        out.extend_from_slice(fe::describe_or_close(b'D', Target::Statement, &stmt.global).raw());
    }
    out.extend_from_slice(fe::sync().raw());
    conn.send(&out).await?;
    // Answers in order: per copy ParseComplete, ParameterDescription, RowDescription or
    // NoData; after an error, nothing more until ReadyForQuery.
    let mut parsed = 0;
    let mut shapes = Vec::with_capacity(copies.len());
    let mut error = None;
    loop {
        let f = conn.recv().await?;
        match f.backend() {
            BackendMessage::ParseComplete => parsed += 1,
            BackendMessage::RowDescription | BackendMessage::NoData => {
                shapes.push(be::row_shape(&f));
            }
            BackendMessage::ErrorResponse => error = Some(f),
            BackendMessage::ReadyForQuery => break,
            _ => {}
        }
    }
    for (stmt, _) in copies.iter().take(parsed) {
        conn.prepared.insert(stmt.global.clone());
    }
    for ((stmt, known), now) in copies.iter().zip(&shapes) {
        if now.is_some_and(|now| now != *known) {
            tracing::info!(statement = %stmt.global, "a prepared statement's result shape changed since clients were given it: 0A000, as PostgreSQL answers");
            app.retire_shared_name(&stmt.global);
            return Ok(CopyCheck::Stale(ErrorFields::error(
                "0A000",
                "cached plan must not change result type",
            )));
        }
    }
    Ok(error.map_or(CopyCheck::Fine, CopyCheck::Failed))
}
