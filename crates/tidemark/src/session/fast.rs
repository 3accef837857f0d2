//! The per-statement path of the commonest unit (issue 18): an autocommit read (a simple
//! query, or extended messages up to Sync, prepared or not) that depends on nothing to be
//! looked up first (no key, no causal floor, no unknown write position), routed to a node
//! without waiting and served from an idle pooled connection. It makes the same decisions
//! as `run_unit` → `analyse` → `execute` → `decide` → `attach` → `settle`, with the same
//! helpers (`analyse_now`, `route_request`, `attach_now`, `send_and_relay`), and skips only
//! their steps that cannot apply to such a unit. How the relay ends, unless it is the plain
//! end of a read (an error, a retry on the primary, a lost server), is carried out by the
//! general path (`Session::finish_unit`).
//!
//! `fast_read` decides synchronously and changes nothing it would have to undo: a unit it
//! declines runs the general path, with the analysis it made.

use super::*;

/// Units run by [`Session::run_fast`]: visible to tests, which show the path is taken.
pub static FAST_READS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// A unit [`Session::run_fast`] runs: its analysis, and the connection routing chose.
pub(super) struct FastRead {
    analysis: Arc<Analysis>,
    conn: Checked,
    node: NodeId,
    role: Role,
    reason: Reason,
}

/// What [`Session::fast_read`] made of a unit.
pub(super) enum Fast {
    Run(FastRead),
    /// The general path, with the unit's analysis when it was made here, and its route when
    /// that was computed too (`execute` then carries it out instead of routing again).
    General(Option<Analysed>, Option<Routed>),
}

/// Whether an analysis is that of one plain read with nothing about it to act on.
fn plain_read(a: &Analysis) -> bool {
    matches!(a.class, Class::Read)
        && a.statements.len() == 1
        && !a.pins_session
        && !a.opaque_state
        && !a.signal_call
        && a.ends_sessions.is_none()
        && !a.copy
        && a.hints.is_empty()
}

impl Session {
    /// Nothing of the session's state asks for more than the fast path does: no connection
    /// held, no transaction, nothing pending from an earlier unit, no key, no write whose
    /// position must be learned first, no PAUSE.
    fn fast_state(&self) -> bool {
        self.attached.is_none()
            && self.tx_status == TxStatus::Idle
            && !self.unit_open
            && !self.pinned
            && !self.skip_until_sync
            && !self.server_skipping
            && !self.copy_in
            && !self.write_unknown
            && !self.tx_wrote
            && !self.conn_state_unknown
            && self.optx.is_none()
            && self.first_unit_retry.is_none()
            && self.speculation.is_none()
            && self.key.is_none()
            && !self.tx_defaults.serializable
            && !matches!(self.consistency, Consistency::Causal)
            && !self.app.is_paused()
    }

    /// Decides whether `unit` takes the fast path, and where it goes (see the module's
    /// comment).
    pub(super) fn fast_read(&mut self, unit: &Unit) -> Fast {
        // A read runs on a replica only as a whole unit: a simple query, or extended messages
        // up to Sync (what follows a Flush may write on the same connection).
        if !matches!(unit.end, UnitEnd::Query | UnitEnd::Sync) || !self.fast_state() {
            return Fast::General(None, None);
        }
        let (analysis, updates) = match self.analyse_now(unit, &LongTexts::new()) {
            Analysing::Done(Ok(a)) => a,
            Analysing::Done(Err(e)) => return Fast::General(Some(Err(e)), None),
            Analysing::Long(..) => return Fast::General(None, None),
        };
        if !plain_read(&analysis) {
            return Fast::General(Some(Ok((analysis, updates))), None);
        }
        // As `decide` does for a read that depends on the session's own positions only.
        let consistency = self.consistency;
        let required = self.required_lsn(&analysis);
        if consistency != Consistency::Strong {
            self.app.monitor_pace.demand();
            if consistency != Consistency::Eventual {
                self.captures_unread = 0;
            }
        }
        let view = self.app.view.load_full();
        let req = self.route_request(
            true,
            consistency,
            required,
            TargetHint::Any,
            Some(Lsn::ZERO),
            false,
            &view,
        );
        let routed = |route| Routed {
            route,
            budget: req.max_wait.unwrap_or_default(),
            view: view.clone(),
            required,
        };
        let route = route(&req, &view);
        let (node, role, reason) = match route {
            Route::Node { node, role, reason } => (node, role, reason),
            _ => return Fast::General(Some(Ok((analysis, updates))), Some(routed(route))),
        };
        let Some(conn) = self.try_checkout_idle(node) else {
            return Fast::General(Some(Ok((analysis, updates))), Some(routed(route)));
        };
        // Committed to the fast path: the statements the unit defines or closes are the
        // client's from now on, as `run_unit` records them before it runs a unit.
        self.apply_statement_updates(updates);
        if role == Role::Primary {
            crate::metrics::fallback(reason.as_str());
            tracing::debug!(client = self.pid, reason = reason.as_str(), required_lsn = %required, "read routed to the primary");
        }
        Fast::Run(FastRead {
            analysis,
            conn,
            node,
            role,
            reason,
        })
    }

    /// Runs a unit [`Session::fast_read`] placed.
    pub(super) async fn run_fast(&mut self, unit: Unit, f: FastRead) -> SResult<()> {
        let FastRead {
            analysis,
            conn,
            node,
            role,
            reason,
        } = f;
        FAST_READS.fetch_add(1, Ordering::Relaxed);
        let label = analysis.class.label();
        let decision = (conn, node, role, reason);
        if !self.needs_sync(&decision.0) {
            self.attach_now(decision, label, true, true);
        } else if !cold(self.attach(Ok(decision), unit.end, label, true, true)).await? {
            return Ok(());
        }
        let outcome = self.send_and_relay(&unit, true, false).await;
        if let Ok(RelayOutcome::Done {
            status: TxStatus::Idle,
            errored: false,
            captured: None,
            capture_lost: false,
        }) = outcome
        {
            // What `settle` and `after_ready` do at the end of a read outside a transaction
            // (no write, no session state changed, nothing to capture).
            self.unit_errored = false;
            self.unit_open = false;
            if self.tx_shape.is_some() {
                self.optx_ended(false);
            }
            if let Some(att) = self.attached.as_mut() {
                att.conn.conn.state_key = self.state_key;
            }
            if !self.io.flush_now()? {
                self.io.finish_flush().await?;
            }
            self.out_of_transaction();
            return Ok(());
        }
        let facts = RunFacts {
            may_write: false,
            may_commit: false,
            pipeline: false,
            retryable: true,
        };
        cold(self.finish_unit(unit, analysis, outcome, facts, None)).await
    }
}
