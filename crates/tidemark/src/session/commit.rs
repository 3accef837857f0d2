//! After a unit: transaction status, the commit position the session's later reads depend on (pipelined behind the commit, or read after), outcomes when the connection is lost.

use super::*;

/// Reads the commit position on the connection that just committed (see DESIGN.md: the
/// insert position after the commit is never below the commit's end).
/// The commit position after a write (`pg_current_wal_insert_lsn()`, see
/// `Lsn::normalize_insert_position`).
///
/// Every name in tidemark's own statements is schema-qualified: they run on connections that
/// carry the client's settings, and a client's `search_path` could otherwise put a function,
/// type or operator of its own in place of the catalog's and forge a position (test
/// `ryw::a_clients_search_path_cannot_stand_in_for_tidemarks_position_reads`).
pub(super) const CAPTURE_SQL: &str =
    "SELECT pg_catalog.pg_current_wal_insert_lsn()::pg_catalog.text";

/// The same, plus the pids of the primary's walsenders whose standby had replayed up to it at
/// that moment (mapped to nodes with the monitor's view). With `synchronous_commit =
/// remote_apply` a synchronous standby is among them whenever no other session wrote in
/// between (then the position read is past this commit and the list may be shorter, never
/// wrong); without `pg_read_all_stats` the positions are hidden and the list is empty (reads
/// then wait for replay as usual). Only asked when the primary has a synchronous standby: an
/// asynchronous one has practically never replayed a commit by the time it returns.
pub(super) const CAPTURE_APPLIED_SQL: &str = "SELECT l::pg_catalog.text, \
     (SELECT pg_catalog.array_agg(w.pid)::pg_catalog.text \
      FROM pg_catalog.pg_stat_get_wal_senders() w WHERE w.replay_lsn OPERATOR(pg_catalog.>=) l) \
     FROM pg_catalog.pg_current_wal_insert_lsn() l";

/// The commit-position read to pipeline behind a write on the current primary.
pub(super) fn capture_stmt(app: &App) -> Internal {
    if app.view.load().has_synchronous_standby() {
        Internal::CaptureApplied
    } else {
        Internal::Capture
    }
}

pub(super) fn capture_sql(app: &App) -> &'static str {
    capture_stmt(app).sql()
}

/// How many commit positions in a row a session's reads must not have depended on before its
/// next ones may be left unread (see `Session::may_leave_position_unread`). A session that
/// reads after fewer writes than this keeps every position; one that writes more between two
/// reads pays one round trip to the primary at that read for the positions it did not read.
pub(super) const UNREAD_BEFORE_SKIP: u32 = 16;

/// The replica's replay position, asked ahead of a read it gates.
pub(super) const REPLAY_CHECK_SQL: &str = "SELECT pg_catalog.pg_last_wal_replay_lsn()";

/// tidemark's own statements, pipelined with clients' units: the commit-position read behind
/// every write, the replica check ahead of a gated read. Each is prepared once per server
/// connection (a Parse the first time, then Bind and Execute): run as a simple query, the
/// server parsed and planned it every time, and pgbench ran 50 % more of the prepared form
/// on the same cores (docs/benchmarks.md, stop 24). Their names are not `tm_` + hex digits,
/// so no client statement's shared name is one of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Internal {
    Capture,
    CaptureApplied,
    ReplayCheck,
}

impl Internal {
    pub(super) fn name(self) -> &'static str {
        match self {
            Internal::Capture => "tm_capture",
            Internal::CaptureApplied => "tm_capture_applied",
            Internal::ReplayCheck => "tm_replay_check",
        }
    }

    pub(super) fn sql(self) -> &'static str {
        match self {
            Internal::Capture => CAPTURE_SQL,
            Internal::CaptureApplied => CAPTURE_APPLIED_SQL,
            Internal::ReplayCheck => REPLAY_CHECK_SQL,
        }
    }

    /// The statement's messages, made once: 0, a simple Query; 1, Bind, Execute and Sync of
    /// the prepared statement; 2, the same after its Close and Parse.
    fn messages(self, form: usize) -> &'static [u8] {
        use std::sync::OnceLock;
        static MADE: [[OnceLock<Vec<u8>>; 3]; 3] = [const { [const { OnceLock::new() }; 3] }; 3];
        MADE[self as usize][form].get_or_init(|| {
            if form == 0 {
                return fe::query(self.sql()).raw().to_vec();
            }
            let mut b = Vec::new();
            if form == 2 {
                // Closed first: after an error the statement may still be there (a cancel or a
                // recovery conflict that hit its execution on a connection that is kept), and
                // a Parse of a name in use fails (42P05) every time. Closing a statement that
                // does not exist is not an error.
                b.extend_from_slice(
                    fe::describe_or_close(b'C', Target::Statement, self.name()).raw(),
                );
                b.extend_from_slice(fe::parse(self.name(), self.sql(), &[]).raw());
            }
            b.extend_from_slice(fe::bind("", self.name()).raw());
            b.extend_from_slice(fe::execute("", 0).raw());
            b.extend_from_slice(fe::sync().raw());
            b
        })
    }

    /// The messages that run the statement on a server connection that has prepared
    /// `prepared`: with its Parse the first time, after which it counts as prepared there.
    /// On the connection of a pinned session, a simple query: a client can prepare statements
    /// of its own (SQL `PREPARE`) only there, under any name, and such a connection is closed
    /// when its session ends; tidemark's statements are kept to connections where no client
    /// statement can take their names.
    pub(super) fn run_on(self, prepared: &mut crate::server::Names, pinned: bool) -> &'static [u8] {
        if pinned {
            return self.messages(0);
        }
        let with_parse = !prepared.contains(self.name());
        if with_parse {
            prepared.insert(self.name().to_string());
        }
        self.messages(1 + usize::from(with_parse))
    }

    /// The server answered the statement with an error: whether the connection still has it
    /// (a client's `DEALLOCATE` of it, a failed transaction) is unknown, so the next run parses
    /// it again. A Parse that failed is never followed by a Bind-only run.
    pub(super) fn failed(self, prepared: &mut crate::server::Names) {
        prepared.remove(self.name());
    }
}

/// A one-dimensional PostgreSQL integer array in text form (`{1,2,3}`); `None` if malformed.
pub(super) fn parse_int_array(s: &str) -> Option<Vec<i32>> {
    let inner = s.strip_prefix('{')?.strip_suffix('}')?;
    if inner.is_empty() {
        return Some(Vec::new());
    }
    inner.split(',').map(|p| p.trim().parse().ok()).collect()
}

/// What the commit-position read after a write returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Captured {
    pub(super) lsn: Lsn,
    /// Pids of walsenders whose standby had replayed up to `lsn`.
    pub(super) applied_on: Vec<i32>,
}

impl Captured {
    /// From a [`CAPTURE_SQL`] or [`CAPTURE_APPLIED_SQL`] row; `None` if the position is missing
    /// or malformed. A malformed pid list counts as empty (reads then wait for replay as usual).
    pub(super) fn parse(row: &[Option<String>]) -> Option<Captured> {
        let lsn = row.first()?.as_deref()?.parse::<Lsn>().ok()?;
        let applied_on = row
            .get(1)
            .and_then(|v| v.as_deref())
            .and_then(parse_int_array)
            .unwrap_or_default();
        Some(Captured { lsn, applied_on })
    }
}

impl Session {
    /// The server connection broke mid-unit: tell the client, drop the connection. Inside a
    /// transaction, or when the session holds state on that connection, the client's session
    /// ends as it would directly (FATAL, then the close); a unit that may have committed ends it
    /// with 08007, since nobody can say whether it did.
    pub(super) async fn server_failed(&mut self, e: ServerError, may_commit: bool) -> SResult<()> {
        let node = self.attached.as_ref().map(|a| a.node);
        self.attached = None; // dropping closes it
        self.unit_open = false;
        self.copy_in = false;
        self.server_skipping = false;
        // The connection is dropped above: a cancel still on its way finds no backend.
        self.cancel_slot.lock().clear();
        let name = node.map(|n| self.app.node_name(n)).unwrap_or_default();
        let was_in_tx = self.tx_status != TxStatus::Idle;
        self.tx_status = TxStatus::Idle;
        // An optimistic transaction's replica died: no replay, the client gets the error.
        self.optx = None;
        self.tx_shape = None;
        // A server that said why (an ErrorResponse) did not commit; a connection that just
        // ended leaves the outcome unknown.
        let unknown = may_commit && !matches!(e, ServerError::Server(_));
        if unknown {
            // Later reads (and keyed readers) must assume the write happened.
            let wrote = std::mem::take(&mut self.tx_wrote);
            self.position_unknown(None);
            if wrote {
                // Causal readers cannot know whether to wait for it until it is resolved.
                self.app.causal.mark_unknown();
            }
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
    pub(super) fn unit_may_commit(&self, analysis: &Analysis, may_write: bool) -> bool {
        let tx = TxEffects::of(analysis);
        let ends = tx.commits || tx.commits_prepared;
        if self.tx_status == TxStatus::Idle {
            (may_write && (!tx.begins || ends)) || tx.commits_prepared
        } else {
            ends && (self.tx_wrote || may_write)
        }
    }

    /// A write committed and its position is not known: lost (`unread_since` `None`: only
    /// the primary, asked from now on, can tell a position at or past it) or left unread at
    /// `unread_since` (a monitor poll of the primary sent after then can too). Replicas the
    /// primary reported at an earlier commit say nothing about it. The session's next read
    /// that may go to a replica resolves it first (`resolve_unknown_write`); `causal` readers
    /// are the caller's to tell (`CausalFloor::mark_unknown`).
    fn position_unknown(&mut self, unread_since: Option<Instant>) {
        self.write_unknown = true;
        self.unread_since = unread_since;
        self.applied = None;
    }

    /// After a write whose commit position is unknown: learns the primary's current position
    /// (every commit so far is at or below it) and makes this session's reads, and its key's
    /// readers, wait for it. Leaves `write_unknown` set if the primary cannot be asked (the
    /// next read then goes to the primary).
    pub(super) async fn resolve_unknown_write(&mut self) {
        // Positions left unread: a poll of the primary sent after the last of them read a
        // position at or past it (the monitor polls the primary soon after such a write, see
        // `Pace::unread_write`). No round trip, and it works while the primary is down.
        let polled = self.unread_since.and_then(|since| {
            self.app
                .last_primary_poll
                .lock()
                .filter(|(_, asked)| *asked > since)
                .map(|(l, _)| l)
        });
        let known = match polled {
            Some(l) => Some(l),
            None => self.primary_position().await,
        };
        if let Some(l) = known {
            self.unread_since = None;
            self.last_write_lsn = self.last_write_lsn.max(l);
            // The position may be newer than the write (a commit of another session): for
            // the adaptive wait it is as young as a commit made now.
            self.last_write_at = Some(Instant::now());
            self.applied = None;
            if let Some(k) = self.tx_key.as_ref().or(self.key.as_ref()) {
                self.app.keys.record(k, l);
            }
            self.write_unknown = false;
        }
    }

    /// The primary's current insert position (at or past every commit acknowledged so far),
    /// read on a primary connection; it also resolves an unknown causal floor. `None` if the
    /// primary cannot be asked.
    pub(super) async fn primary_position(&mut self) -> Option<Lsn> {
        let view = self.app.view.load_full();
        let p = view.primary_id()?;
        let mut c = self.checkout(p).await.ok()?;
        // Taken before the read: a position read after a lost write covers it.
        let ticket = self.app.causal.ticket();
        match c.conn.simple_query(CAPTURE_SQL).await {
            Ok(rows) => {
                c.release();
                let l = rows
                    .first()
                    .cloned()
                    .flatten()
                    .and_then(|s| s.parse::<Lsn>().ok())?
                    .normalize_insert_position();
                self.app.causal.resolve(l, ticket);
                Some(l)
            }
            Err(_) => {
                c.conn.broken = true;
                None
            }
        }
    }

    /// After ReadyForQuery: track transaction state, capture the commit LSN after writes,
    /// record session state, and release the connection when the client is idle.
    pub(super) async fn after_ready(
        &mut self,
        status: TxStatus,
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
        if status == TxStatus::Idle {
            self.optx_ended(self.tx_wrote);
        }
        let Some(att) = self.attached.as_mut() else {
            return self.io.flush().await;
        };
        if self.unit_clears_statements {
            // DISCARD ALL / DEALLOCATE ALL ran: the server dropped every prepared statement on
            // this connection, and the client's protocol-level statements are gone too, as on
            // a direct connection. If the unit failed, whether it ran is unknown: make sure.
            if errored
                && cold(att.conn.conn.simple_query("DEALLOCATE ALL"))
                    .await
                    .is_err()
            {
                att.conn.conn.broken = true;
            }
            att.conn.conn.prepared.clear();
            if !errored {
                self.statements.clear();
                self.unnamed = None;
                self.recent_unnamed = Default::default();
            }
        }
        att.conn.conn.state_key = if analysis.opaque_state || self.conn_state_unknown {
            self.conn_state_unknown = status != TxStatus::Idle;
            STATE_UNKNOWN
        } else {
            self.state_key
        };
        let capture = status == TxStatus::Idle
            && att.role == Role::Primary
            && self.tx_wrote
            && self.app.config.load().routing.track_writes;
        // A write under a key must be in the key store before the client learns it is
        // done: readers on other connections only wait for what the store holds.
        // Every acknowledged write raises the causal floor (or marks it unknown) before the
        // client gets its ReadyForQuery: a `causal` read on any connection that arrives after
        // the acknowledgement then waits for it.
        if capture && capture_lost {
            // Committed, and the connection was lost before its position was read.
            self.position_unknown(None);
            self.app.causal.mark_unknown();
            if self.app.shared.is_some() || self.tx_key.is_some() || self.key.is_some() {
                // Other instances learn it only through the shared store, readers of the key
                // only through the key store: resolve first.
                cold(self.resolve_unknown_write()).await;
                self.publish_shared().await;
                self.io.flush().await?;
            } else {
                self.io.flush().await?;
                cold(self.resolve_unknown_write()).await;
            }
        } else if let (true, Some(c)) = (capture, captured) {
            // Captured in the same pipeline as the commit (no extra round trip); the relay
            // held the acknowledgement until the position arrived, so the key store, the
            // causal floor and the token are all set before the client hears of it.
            self.record_commit(c);
            if self.report_lsn {
                if let Some(z) = self.io.take_trailing_ready() {
                    self.io.push(&be::parameter_status(
                        "tidemark.commit_lsn",
                        &self.last_write_lsn.to_string(),
                    ));
                    self.io.push(&z);
                }
            }
            self.publish_shared().await;
            self.io.flush().await?;
        } else if capture && self.may_leave_position_unread(analysis) {
            self.leave_position_unread();
            if !self.io.flush_now()? {
                self.io.finish_flush().await?;
            }
        } else if capture {
            // The client may ask for the token with the result, other connections depend on
            // it through a key or the causal floor: capture before ReadyForQuery.
            let z = self.io.take_trailing_ready();
            cold(self.capture_lsn()).await;
            if let Some(z) = z {
                if self.report_lsn {
                    self.io.push(&be::parameter_status(
                        "tidemark.commit_lsn",
                        &self.last_write_lsn.to_string(),
                    ));
                }
                self.io.push(&z);
            }
            self.publish_shared().await;
            self.io.flush().await?;
        } else if !self.io.flush_now()? {
            self.io.finish_flush().await?;
        }
        if status == TxStatus::Idle {
            self.out_of_transaction();
            if std::mem::take(&mut self.begin_failed) {
                // The first statement's text failed before the BEGIN in front of it ran (see
                // `Session::begin_prefix`): the server is outside a transaction, and the
                // connection went back to its pool; the client, told ReadyForQuery `E`, is in
                // a failed transaction, answered here until it ends.
                self.tx_status = TxStatus::Failed;
                self.optx = Some(Optx::failed());
            }
        }
        Ok(())
    }

    /// The end of a unit that leaves the session outside a transaction, once the client has
    /// its answer: nothing written is pending, and the connection goes back to its pool
    /// (unless the session is pinned to it). Also the end of `run_fast`.
    pub(super) fn out_of_transaction(&mut self) {
        self.tx_wrote = false;
        self.tx_key = None;
        if !self.pinned {
            if let Some(att) = self.attached.take() {
                att.conn.release();
            }
        }
    }

    /// Whether to pipeline the commit-LSN read right behind this unit: it ends a writing
    /// transaction (or is an autocommit write). The relay holds the unit's ReadyForQuery until
    /// the position is read, so what needs it before the client hears of the commit (a key,
    /// the causal floor, `report_lsn`'s ParameterStatus) still has it first. A COPY FROM in
    /// the unit would read a pipelined query as copy data: such units are captured the
    /// ordinary way.
    pub(super) fn pipeline_capture(&self, analysis: &Analysis, may_write: bool) -> bool {
        if self.unit_open || analysis.copy {
            return false;
        }
        let tx = TxEffects::of(analysis);
        let wanted = if self.tx_status == TxStatus::Idle {
            may_write && !tx.begins
        } else {
            (self.tx_wrote || may_write) && (tx.commits || tx.rolls_back)
        };
        // The configuration last: a read never needs it (its load showed in the
        // per-statement profile).
        wanted
            && !self.may_leave_position_unread(analysis)
            && self.app.config.load().routing.track_writes
    }

    /// Whether this write's commit position may be left unread. Only this session's own
    /// later reads could depend on it: no key (this unit's, the transaction's or the
    /// session's), no shared store, no report or `SHOW` of the position, no `causal` read in
    /// this process so far. And the last [`UNREAD_BEFORE_SKIP`] positions read for this
    /// session were never depended on by one of its reads (a writer that does not read, such
    /// as a batch job or the TPC-B script, whose reads are all inside its writing
    /// transactions). The read costs the server a statement and tidemark a reply to take
    /// apart on every commit (4.9 % of TPC-B, docs/benchmarks.md, stop 25).
    ///
    /// Nothing becomes stale by it: the write is marked unknown (`leave_position_unread`),
    /// so the session's next read that may go to a replica first learns the primary's
    /// current position (at or past this commit) in one round trip, and positions are read
    /// again from then on; a `causal` read anywhere finds the floor unknown and does the same.
    pub(super) fn may_leave_position_unread(&self, analysis: &Analysis) -> bool {
        self.captures_unread >= UNREAD_BEFORE_SKIP
            && !self.report_lsn
            && !self.position_shown
            && analysis.hints.key.is_none()
            && self.tx_key.is_none()
            && self.key.is_none()
            && self.app.shared.is_none()
            && !self.app.causal.has_readers()
    }

    /// A write committed and its position is left unread (see `may_leave_position_unread`);
    /// done before the client's acknowledgement is flushed, as a read position would be.
    fn leave_position_unread(&mut self) {
        let now = Instant::now();
        self.position_unknown(Some(now));
        self.last_write_at = Some(now);
        self.app.causal.mark_unknown();
        self.app.monitor_pace.wake();
        self.app.monitor_pace.unread_write();
        self.app.captures_skipped.fetch_add(1, Ordering::Relaxed);
        crate::metrics::lsn_capture_skipped();
    }

    pub(super) fn record_commit(&mut self, c: Captured) {
        let l = c.lsn.normalize_insert_position();
        crate::metrics::lsn_captured();
        self.captures_unread = self.captures_unread.saturating_add(1);
        self.app.monitor_pace.wake();
        if l > self.last_write_lsn {
            self.last_write_lsn = l;
            self.last_write_at = Some(Instant::now());
        }
        self.app.causal.raise(l);
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

    /// Publishes this session's last commit position (and its key) to the shared store before
    /// the write is acknowledged: a read through another instance then waits for it. A failure
    /// is kept as pending by the store (published, raising every key, once Redis answers) and
    /// reported by its metric and warning; the acknowledgement is not held longer than
    /// `shared.timeout` (twice when the store must first be initialized).
    pub(super) async fn publish_shared(&mut self) {
        let Some(shared) = self.app.shared.clone() else {
            return;
        };
        if self.write_unknown {
            // The position could not be learned (the primary did not answer): nothing exact to
            // publish; readers elsewhere depend on the primary's position when they ask it.
            return;
        }
        let key = self.tx_key.clone().or_else(|| self.key.clone());
        let l = self.last_write_lsn;
        if let Err(crate::shared::SharedError::Uninit) = shared.publish(l, key.as_deref()).await {
            // A new or restarted Redis: start it at the primary's position (at or past this
            // commit); the pending position is merged right after.
            if let Some(p) = self.primary_position().await {
                if shared.init(p).await.is_ok() {
                    let _ = shared.flush_pending().await;
                }
            }
        }
    }

    pub(super) async fn capture_lsn(&mut self) {
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
                self.position_unknown(None);
                self.app.causal.mark_unknown();
                self.resolve_unknown_write().await;
            }
        }
    }
}

/// What a unit's statements do to its transaction, found in one pass over them (the
/// per-statement path asks twice per unit: `unit_may_commit`, `pipeline_capture`).
#[derive(Default, Debug, PartialEq)]
struct TxEffects {
    /// `BEGIN` / `START TRANSACTION`.
    begins: bool,
    /// `COMMIT` / `END`.
    commits: bool,
    /// `COMMIT PREPARED`.
    commits_prepared: bool,
    /// `ROLLBACK` / `ABORT` (not `ROLLBACK TO`, not `ROLLBACK PREPARED`).
    rolls_back: bool,
}

impl TxEffects {
    fn of(analysis: &Analysis) -> TxEffects {
        let mut e = TxEffects::default();
        for c in &analysis.statements {
            match c {
                Class::Transaction(TxControl::Begin { .. }) => e.begins = true,
                Class::Transaction(TxControl::Commit) => e.commits = true,
                Class::Transaction(TxControl::CommitPrepared) => e.commits_prepared = true,
                Class::Transaction(TxControl::Rollback) => e.rolls_back = true,
                _ => {}
            }
        }
        e
    }
}

#[cfg(test)]
mod tests {
    use super::{Internal, TxEffects};
    use tidemark_sql::{Classifier, FunctionPolicy};
    use tidemark_wire::frontend::FrontendMessage;
    use tidemark_wire::FrameCodec;

    /// The messages in `bytes`, decoded.
    fn decoded(bytes: &[u8]) -> Vec<FrontendMessage> {
        let mut buf = bytes::BytesMut::from(bytes);
        let codec = FrameCodec::default();
        let mut out = Vec::new();
        while let Some(f) = codec.decode(&mut buf).unwrap() {
            out.push(FrontendMessage::parse(&f).unwrap());
        }
        assert!(buf.is_empty(), "whole messages only");
        out
    }

    #[test]
    fn internal_statements_are_parsed_once_per_connection_and_again_after_an_error() {
        let mut prepared = crate::server::Names::default();
        for stmt in [
            Internal::Capture,
            Internal::CaptureApplied,
            Internal::ReplayCheck,
        ] {
            let name = stmt.name();
            assert!(name.starts_with("tm_") && !name[3..].chars().all(|c| c.is_ascii_hexdigit()));
            let first = decoded(stmt.run_on(&mut prepared, false));
            assert_eq!(first.len(), 5, "{first:?}");
            // Closed before it is parsed: a copy left on the server after an error that did
            // not remove it would make every later Parse fail.
            assert!(matches!(&first[0],
                FrontendMessage::Close { target: tidemark_wire::frontend::Target::Statement, name: n } if n == name));
            assert!(matches!(&first[1],
                FrontendMessage::Parse { name: n, query, param_types } if n == name && query == stmt.sql() && param_types.is_empty()));
            assert!(matches!(&first[2],
                FrontendMessage::Bind { portal, statement } if portal.is_empty() && statement == name));
            assert!(matches!(
                &first[3],
                FrontendMessage::Execute { max_rows: 0, .. }
            ));
            assert_eq!(first[4], FrontendMessage::Sync);
            assert!(prepared.contains(name));
            // Prepared now: no Close, no Parse.
            let again = decoded(stmt.run_on(&mut prepared, false));
            assert_eq!(again[..], first[2..]);
            // An error: parsed again next time.
            stmt.failed(&mut prepared);
            assert!(!prepared.contains(name));
            assert_eq!(decoded(stmt.run_on(&mut prepared, false)), first);
            // A pinned session's connection: a simple query, nothing recorded.
            let mut none = crate::server::Names::default();
            assert_eq!(
                decoded(stmt.run_on(&mut none, true)),
                vec![FrontendMessage::Query(stmt.sql().into())]
            );
            assert!(none.is_empty());
        }
    }

    fn effects(sql: &str) -> TxEffects {
        TxEffects::of(&Classifier::new(0, FunctionPolicy::default()).classify_uncached(sql))
    }

    #[test]
    fn a_units_transaction_effects_are_found_in_one_pass() {
        assert_eq!(effects("SELECT 1"), TxEffects::default());
        assert_eq!(effects("INSERT INTO t VALUES (1)"), TxEffects::default());
        let e = effects("BEGIN; INSERT INTO t VALUES (1); COMMIT");
        assert!(e.begins && e.commits && !e.rolls_back && !e.commits_prepared);
        assert_eq!(
            effects("START TRANSACTION READ ONLY"),
            TxEffects {
                begins: true,
                ..Default::default()
            }
        );
        assert_eq!(
            effects("END"),
            TxEffects {
                commits: true,
                ..Default::default()
            }
        );
        assert_eq!(
            effects("ABORT"),
            TxEffects {
                rolls_back: true,
                ..Default::default()
            }
        );
        // Neither a savepoint's rollback nor a prepared transaction's is the transaction's.
        assert_eq!(effects("ROLLBACK TO SAVEPOINT s"), TxEffects::default());
        assert_eq!(effects("ROLLBACK PREPARED 'g'"), TxEffects::default());
        assert_eq!(
            effects("COMMIT PREPARED 'g'"),
            TxEffects {
                commits_prepared: true,
                ..Default::default()
            }
        );
    }
}
