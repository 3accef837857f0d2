//! Placement: which node a unit runs on (tidemark_core::route, waiting for a replica to catch up), checking out a connection and bringing it to the client's session state.

use super::*;

/// Most prepared statements one server connection keeps before tidemark deallocates them.
pub(super) const MAX_PREPARED_PER_SERVER: usize = 5000;
pub(super) fn unavailable_error(u: &Unavailable, app: &App) -> ErrorFields {
    let e = unavailable_error_fields(u, app);
    match (u, app.node_errors_detail()) {
        (Unavailable::SplitBrain(_), _) | (_, None) => e,
        (_, Some(why)) if e.detail.is_none() => e.with_detail(why),
        (_, Some(_)) => e,
    }
}

fn unavailable_error_fields(u: &Unavailable, app: &App) -> ErrorFields {
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

/// A unit's route, as [`Session::decide`] computed it (or `fast_read`, which hands it over
/// when it declines a unit it routed), with what [`Session::place`] needs to carry it out.
pub(super) struct Routed {
    pub(super) route: Route,
    /// How long a read may wait for a replica.
    pub(super) budget: Duration,
    pub(super) view: Arc<tidemark_core::ClusterView>,
    /// The position the read depends on (for the log line of a read sent to the primary).
    pub(super) required: Lsn,
}

impl Session {
    /// The LSN this read depends on.
    pub(super) fn required_lsn(&self, analysis: &Analysis) -> Lsn {
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

    /// The causal floor a `causal` read depends on; `None` if it cannot be known (a write's
    /// position was lost and the primary cannot be asked for its current one).
    pub(super) async fn causal_floor(&mut self) -> Option<Lsn> {
        if let Some(f) = self.app.causal.get() {
            return Some(f);
        }
        // A write's position was lost: the primary's current position covers it.
        self.primary_position().await;
        self.app.causal.get()
    }

    /// The shared store's floor and key requirement; `None` when it cannot be read in time
    /// (the read then goes to the primary). An empty store (new or restarted Redis) is first
    /// initialized with the primary's current position.
    pub(super) async fn shared_view(
        &mut self,
        key: Option<&str>,
    ) -> Option<crate::shared::SharedRead> {
        let shared = self.app.shared.clone()?;
        match shared.read(key).await {
            Ok(r) => Some(r),
            Err(crate::shared::SharedError::Uninit) => {
                let p = self.primary_position().await?;
                shared.init(p).await.ok()?;
                shared.read(key).await.ok()
            }
            Err(_) => None,
        }
    }

    pub(super) async fn checkout(&mut self, node: NodeId) -> Result<Checked, ErrorFields> {
        self.checkout_with(node, true).await
    }

    pub(super) async fn checkout_with(
        &mut self,
        node: NodeId,
        wait: bool,
    ) -> Result<Checked, ErrorFields> {
        self.checkout_typed(node, wait)
            .await
            .map_err(CheckoutFailure::into_error)
    }

    /// The common checkout without a future (see [`crate::pool::Pool::try_checkout_idle`]):
    /// the session's pool for `node` has a free slot and an idle connection. `None`: take
    /// the full [`Session::checkout_typed`].
    pub(super) fn try_checkout_idle(&self, node: NodeId) -> Option<Checked> {
        self.pools.get(node)?.as_ref()?.try_checkout_idle()
    }

    /// A checkout whose failure says what failed (see [`CheckoutFailure`]).
    pub(super) async fn checkout_typed(
        &mut self,
        node: NodeId,
        wait: bool,
    ) -> Result<Checked, CheckoutFailure> {
        // A pool drained by a RELOAD (its node removed or moved) is not used again.
        let cached = self
            .pools
            .get(node)
            .cloned()
            .flatten()
            .filter(|p| !p.is_draining());
        let pool = match cached {
            Some(p) => p,
            None => {
                let Some(p) = self.app.pool(node, &self.database, &self.user) else {
                    return Err(CheckoutFailure::Unreachable(ErrorFields::error(
                        "08006",
                        format!("node {node} is not configured"),
                    )));
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
            Err(PoolError::Exhausted { pool, waited, max }) => Err(CheckoutFailure::Exhausted(ErrorFields::error(
                "53300",
                format!("no server connection available in pool {pool} after {waited:?} (all {max} in use)"),
            )
            .with_hint("raise pool.max_size or pool.checkout_timeout, or make transactions shorter"))),
            Err(PoolError::Server(ServerError::Server(f))) => Err(CheckoutFailure::Refused(f)),
            // The server refused the login while authenticating (a role that does not exist
            // there, a wrong password): refused, not unreachable.
            Err(PoolError::Server(e @ ServerError::Auth(_))) => {
                Err(CheckoutFailure::Refused(ErrorFields::error(
                    "08006",
                    format!("cannot connect to node {}: {e}", self.app.node_name(node)),
                )))
            }
            Err(PoolError::Server(e)) => Err(CheckoutFailure::Unreachable(ErrorFields::error(
                "08006",
                format!("cannot connect to node {}: {e}", self.app.node_name(node)),
            ))),
        }
    }

    /// Whether [`Session::sync_state`] has anything to do for `c` (the per-statement check,
    /// without making its future).
    pub(super) fn needs_sync(&self, c: &Checked) -> bool {
        c.conn.prepared.len() > MAX_PREPARED_PER_SERVER || c.conn.state_key != self.state_key
    }

    /// Brings a server connection to this session's SET state.
    pub(super) async fn sync_state(&mut self, c: &mut Checked) -> Result<(), ServerError> {
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

    /// While an operator has paused tidemark (admin `PAUSE`), new transactions wait.
    pub(super) async fn wait_while_paused(&self) {
        let mut rx = self.app.paused.subscribe();
        while *rx.borrow_and_update() {
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// The routing request for a unit, once what it depends on is known (`decide`, and
    /// `fast_read` for the units that need nothing looked up first).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn route_request(
        &mut self,
        read_only: bool,
        consistency: Consistency,
        required: Lsn,
        hint: TargetHint,
        causal_floor: Option<Lsn>,
        requirement_unknown: bool,
        view: &tidemark_core::ClusterView,
    ) -> RouteRequest {
        // Only while the primary that reported it is still the primary.
        let applied = self
            .applied
            .filter(|(_, p)| view.primary_id() == Some(*p))
            .map(|(a, _)| a);
        let matters = !matches!(consistency, Consistency::Strong | Consistency::Eventual)
            && hint != TargetHint::Primary;
        // Everything this read depends on was committed no later than the session's own last
        // write when that is the newest of it: a replica needs that much less to catch up.
        let commit_age = match self.last_write_at {
            Some(at)
                if read_only
                    && matters
                    && required <= self.last_write_lsn
                    && causal_floor.is_some_and(|f| f <= self.last_write_lsn) =>
            {
                at.elapsed()
            }
            _ => Duration::ZERO,
        };
        let cfg = self.app.config.load();
        let budget = wait_budget(
            cfg.routing.wait.policy(),
            cfg.routing.max_wait,
            view.primary_latency,
        );
        RouteRequest {
            read_only: read_only && !self.pinned,
            pinned: None,
            consistency,
            required_lsn: required,
            hint,
            balance: match cfg.routing.balance {
                Balance::Session => self.balance,
                // Drawn once per unit: `fast_read` and `decide` may both route one unit, and
                // a second draw would skip a replica every time.
                Balance::Statement => *self
                    .unit_balance
                    .get_or_insert_with(|| self.app.balance.fetch_add(1, Ordering::Relaxed)),
            },
            applied,
            max_wait: Some(budget),
            commit_age,
            lag_resolution: cfg.monitor.interval,
            causal_floor,
            requirement_unknown,
        }
    }

    /// Routes a unit that is not bound to a connection yet, waiting for a replica to
    /// catch up when needed. Returns the checked-out connection. `speculate`: a read that
    /// must check a replica's position may instead be answered with that replica, the check
    /// to be sent with the read (see [`Speculation`]).
    pub(super) async fn decide(
        &mut self,
        analysis: &Analysis,
        read_only: bool,
        speculate: bool,
    ) -> Result<(Checked, NodeId, Role, Reason), ErrorFields> {
        let consistency = analysis.hints.consistency.unwrap_or(self.consistency);
        // A pinned session's reads run on its primary connection, and a unit without
        // statements (a driver's Close and Sync) reads nothing: they need no position.
        if read_only && self.write_unknown && !self.pinned && !analysis.statements.is_empty() {
            cold(self.resolve_unknown_write()).await;
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
        if read_only
            && !self.pinned
            && consistency != Consistency::Strong
            && !matches!(hint, TargetHint::Primary)
        {
            // The replicas' positions matter to this read: the monitor keeps its fast pace
            // while WAL moves (see `Pace`).
            self.app.monitor_pace.demand();
            if consistency != Consistency::Eventual && !analysis.statements.is_empty() {
                // It depends on the session's commit positions: keep reading them. (A unit
                // without statements, such as a driver's Close and Sync, depends on none.)
                self.captures_unread = 0;
            }
        }
        let wants_floor = read_only && consistency == Consistency::Causal;
        if wants_floor {
            self.app.causal.note_reader();
        }
        let mut causal_floor = if wants_floor {
            self.causal_floor().await
        } else {
            Some(Lsn::ZERO)
        };
        let mut required = required;
        let mut requirement_unknown = false;
        let has_key = analysis.hints.key.is_some() || self.key.is_some();
        let matters = !matches!(consistency, Consistency::Strong | Consistency::Eventual)
            && analysis.hints.target != Some(HintTarget::Primary);
        if read_only && matters && self.app.shared.is_some() && (wants_floor || has_key) {
            // What other instances acknowledged: the shared floor and the key's last write.
            // (The key is copied only here: most reads of a keyed session need no copy.)
            let key = analysis.hints.key.as_ref().or(self.key.as_ref()).cloned();
            match self.shared_view(key.as_deref()).await {
                Some(r) => {
                    if wants_floor {
                        causal_floor = causal_floor.map(|f| f.max(r.floor));
                    }
                    if let Some(k) = r.key {
                        required = required.max(k);
                    }
                }
                None => {
                    requirement_unknown = has_key;
                    if wants_floor {
                        causal_floor = None;
                    }
                }
            }
        }
        let view = self.app.view.load_full();
        let req = self.route_request(
            read_only,
            consistency,
            required,
            hint,
            causal_floor,
            requirement_unknown,
            &view,
        );
        let routed = Routed {
            route: route(&req, &view),
            // How long a read may wait for a replica (`routing.wait`, `routing.max_wait`).
            budget: req.max_wait.unwrap_or_default(),
            view,
            required,
        };
        self.place(routed, read_only, speculate).await
    }

    /// The end of [`Session::decide`]: carries out a route (checks a connection out, moves a
    /// read off an unreachable replica, waits for a replica or speculates).
    pub(super) async fn place(
        &mut self,
        Routed {
            route,
            budget,
            view,
            required,
        }: Routed,
        read_only: bool,
        speculate: bool,
    ) -> Result<(Checked, NodeId, Role, Reason), ErrorFields> {
        match route {
            Route::Node { node, role, reason } => {
                if read_only && role == Role::Primary {
                    crate::metrics::fallback(reason.as_str());
                    tracing::debug!(client = self.pid, reason = reason.as_str(), required_lsn = %required, "read routed to the primary");
                }
                let checked = match self.try_checkout_idle(node) {
                    Some(c) => Ok(c),
                    None => self.checkout_typed(node, true).await,
                };
                match checked {
                    Ok(c) => Ok((c, node, role, reason)),
                    // Not reachable, or refusing logins (starting up, shutting down): the
                    // read goes to the primary; an exhausted pool is reported, not moved.
                    Err(CheckoutFailure::Unreachable(e) | CheckoutFailure::Refused(e))
                        if role == Role::Replica =>
                    {
                        match tidemark_core::after_unreachable_replica(&view) {
                            Route::Node {
                                node: p,
                                role,
                                reason,
                            } => {
                                crate::metrics::fallback("replica_error");
                                tracing::info!(client = self.pid, node = %self.app.node_name(node), error = %e.message, "replica unreachable; read routed to the primary");
                                let c = self.checkout(p).await?;
                                Ok((c, p, role, reason))
                            }
                            _ => Err(e),
                        }
                    }
                    Err(f) => Err(f.into_error()),
                }
            }
            Route::CheckReplicas {
                candidates,
                required_lsn,
                fallback,
            } => {
                if speculate {
                    if let Some(cand) = candidates.first().copied() {
                        if let Ok(c) = self.checkout(cand).await {
                            self.speculation = Some(Speculation {
                                candidates,
                                required: required_lsn,
                                fallback,
                                budget,
                                start: Instant::now(),
                            });
                            return Ok((c, cand, Role::Replica, Reason::ReplicaCaughtUp));
                        }
                    }
                }
                self.wait_for_replica(candidates, required_lsn, fallback, budget)
                    .await
            }
            Route::Unavailable(u) => Err(unavailable_error(&u, &self.app)),
        }
    }

    /// `node` answered that it has replayed at least `at`: the session's later reads that
    /// depend on no more than its last write go there without asking again (replay only moves
    /// forward), as for a replica the primary reported at the commit (`Applied`). Kept while
    /// the same primary is; the session's next write starts a new set.
    pub(super) fn note_replayed(&mut self, node: NodeId, at: Lsn) {
        let Some(p) = self.app.view.load().primary_id() else {
            return;
        };
        match &mut self.applied {
            Some((a, ap)) if *ap == p => {
                if a.lsn <= at {
                    a.nodes.insert(node);
                }
            }
            _ => {
                let mut nodes = NodeSet::EMPTY;
                nodes.insert(node);
                self.applied = Some((Applied { lsn: at, nodes }, p));
            }
        }
    }

    /// Asks the most advanced replica for its replay position with a separate statement
    /// before the read, polling until it reaches `required` or the wait `budget` (see
    /// tidemark_core::wait) is spent. Every candidate is asked at least once.
    pub(super) async fn wait_for_replica(
        &mut self,
        candidates: Vec<NodeId>,
        required: Lsn,
        fallback: Option<NodeId>,
        budget: Duration,
    ) -> Result<(Checked, NodeId, Role, Reason), ErrorFields> {
        let start = Instant::now();
        let deadline = start + budget;
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
                    .simple_query(super::commit::REPLAY_CHECK_SQL)
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
                    self.note_replayed(node, reported);
                    return Ok((c, node, role, reason));
                }
            }
            if Instant::now() >= deadline || conns.is_empty() {
                break 'outer;
            }
            // Wait for the next monitor sample or a millisecond, whichever comes first; with
            // less than a millisecond left (the timer's granularity), ask again at once (each
            // question is a round trip to the replica).
            let left = deadline.saturating_duration_since(Instant::now());
            if left >= Duration::from_millis(1) {
                let notified = self.app.view_changed.notified();
                let _ = tokio::time::timeout(Duration::from_millis(1), notified).await;
            } else {
                tokio::task::yield_now().await;
            }
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
}

/// A read sent to the most advanced replica candidate together with the check of its
/// position, in one write (`SELECT pg_last_wal_replay_lsn()`, then the read): when the
/// replica has replayed what the read depends on — the common case a moment after a write at
/// low lag — the read costs one round trip instead of two (a check, then the read). When it
/// has not, the read's answers are dropped unseen (it is a read: running it changed nothing)
/// and routing goes on as it would have: polling the candidates within what is left of the
/// wait budget, then the fallback.
pub(super) struct Speculation {
    pub(super) candidates: Vec<NodeId>,
    pub(super) required: Lsn,
    pub(super) fallback: Option<NodeId>,
    pub(super) budget: Duration,
    pub(super) start: Instant,
}

/// Why a checkout failed: what routing may do next depends on it (an unreachable replica's
/// read goes to the primary; an exhausted pool or a refused login is the client's answer).
pub(super) enum CheckoutFailure {
    /// Every connection of the pool is in use (53300).
    Exhausted(ErrorFields),
    /// The node could not be reached (08006).
    Unreachable(ErrorFields),
    /// The server answered the login with an error (unknown database, role, password).
    Refused(ErrorFields),
}

impl CheckoutFailure {
    pub(super) fn into_error(self) -> ErrorFields {
        match self {
            CheckoutFailure::Exhausted(e)
            | CheckoutFailure::Unreachable(e)
            | CheckoutFailure::Refused(e) => e,
        }
    }
}
