//! The node monitor: one task per node polls role and WAL positions on a dedicated
//! connection, and every sample republishes the immutable cluster view (lag in bytes and
//! time, lag gate with hysteresis, primary discovery, split brain). The monitor is the
//! only writer of `App::view`; sessions read snapshots and never block on it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tidemark_core::{
    decide_primary, ClusterView, LagClock, LagGate, LatencyAverage, Lsn, NodeId, NodeStatus,
    PrimaryState, Role, SyncState,
};

use crate::app::App;
use crate::metrics::NodeMetrics;

/// Role and position, every `monitor.interval`.
const POLL_SQL: &str = "SELECT pg_is_in_recovery(), \
     (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_insert_lsn() END)::text";

/// On a primary, less often (see [`SYNC_EVERY`]): its `synchronous_commit` default and each
/// walsender's standby name and sync state (`sync_state` needs `pg_monitor` or
/// `pg_read_all_stats`; without it the states are NULL and nodes show `-`).
///
/// The walsender list is also how a replica is known to follow this primary: a replica the
/// primary does not stream to (in `streaming` or `catchup` state; the state is NULL without
/// those privileges and then not required) serves no reads (`NodeStatus::follows_primary`).
const SYNC_SQL: &str =
    "SELECT current_setting('synchronous_commit'), s.names, s.states, s.pids, s.wstates \
     FROM (SELECT array_agg(a.application_name ORDER BY w.pid) AS names, \
                  array_agg(w.sync_state ORDER BY w.pid) AS states, \
                  array_agg(w.pid ORDER BY w.pid) AS pids, \
                  array_agg(w.state ORDER BY w.pid) AS wstates \
           FROM pg_stat_get_wal_senders() w, pg_stat_get_activity(w.pid) a) s";

/// One walsender of a primary, as `SYNC_SQL` lists it.
#[derive(Clone, Debug)]
struct Standby {
    /// The standby's `application_name`.
    name: String,
    /// `sync_state` (NULL without `pg_monitor`/`pg_read_all_stats`).
    sync_state: Option<String>,
    pid: i32,
    /// The walsender's `state` (NULL without those privileges).
    state: Option<String>,
}

/// How often the synchronous-standby state is read: it is for display (routing measures what
/// each commit reached), so every 100 ms is plenty and keeps the frequent poll trivial.
const SYNC_EVERY: Duration = Duration::from_millis(100);

#[derive(Clone, Debug)]
struct Sample {
    ok: bool,
    role: Role,
    lsn: Lsn,
    system_id: String,
    /// Primaries: `synchronous_commit` default is `remote_apply`.
    remote_apply: bool,
    /// Primaries: one entry per walsender.
    standbys: Vec<Standby>,
    at: Instant,
    /// When the poll was sent: a primary's position is at or past every commit acknowledged
    /// before then (see `App::last_primary_poll`).
    asked: Instant,
    /// How long the poll's round trip took (the position query alone).
    rtt: Duration,
}

struct NodeTrack {
    sample: Option<Sample>,
    gate: LagGate,
    failures: u32,
    banned_until: Option<Instant>,
    system_id: Option<String>,
    metrics: Option<NodeMetrics>,
    /// The average round trip of its polls: for the primary, the adaptive wait budget
    /// (tidemark_core::wait).
    latency: LatencyAverage,
    /// The address its samples are from (a RELOAD that moves the node starts it afresh).
    addr: (String, u16),
}

impl NodeTrack {
    fn new(cfg: &crate::config::Config, i: NodeId) -> NodeTrack {
        NodeTrack {
            sample: None,
            gate: LagGate::new(cfg.gate()),
            failures: 0,
            banned_until: None,
            system_id: None,
            metrics: None,
            latency: LatencyAverage::default(),
            addr: cfg
                .nodes
                .get(i)
                .map(|n| (n.host.clone(), n.port))
                .unwrap_or_default(),
        }
    }
}

/// How often the task of a node a RELOAD removed looks whether it was added back.
const RETIRED_RECHECK: Duration = Duration::from_millis(250);

pub struct Monitor {
    app: Arc<App>,
    nodes: Mutex<Vec<NodeTrack>>,
    clock: Mutex<LagClock>,
    generation: std::sync::atomic::AtomicU64,
}

impl Monitor {
    pub fn start(app: Arc<App>) -> Arc<Monitor> {
        let cfg = app.config.load_full();
        let m = Arc::new(Monitor {
            nodes: Mutex::new(
                (0..cfg.nodes.len())
                    .map(|i| NodeTrack::new(&cfg, i))
                    .collect(),
            ),
            clock: Mutex::new(LagClock::new(tidemark_core::lagclock::DEFAULT_CAPACITY)),
            generation: Default::default(),
            app,
        });
        for i in 0..cfg.nodes.len() {
            let m2 = m.clone();
            tokio::spawn(async move { m2.run_node(i).await });
        }
        let m2 = m.clone();
        let mut changed = m.app.nodes_changed.subscribe();
        tokio::spawn(async move {
            while changed.changed().await.is_ok() {
                m2.nodes_reloaded();
            }
        });
        m
    }

    /// After a RELOAD changed the node list: polls appended nodes, forgets what was sampled of
    /// retired and moved ones (their tasks drop their connections on their own, see
    /// [`Monitor::run_node`]) and republishes the view.
    fn nodes_reloaded(self: &Arc<Self>) {
        let cfg = self.app.config.load_full();
        let (from, to) = {
            let mut nodes = self.nodes.lock();
            for (i, t) in nodes.iter_mut().enumerate() {
                let Some(n) = cfg.nodes.get(i) else { continue };
                let addr = (n.host.clone(), n.port);
                if n.retired || t.addr != addr {
                    let metrics = t.metrics.take();
                    *t = NodeTrack::new(&cfg, i);
                    t.metrics = metrics;
                }
                if n.retired {
                    self.app.node_errors.lock().remove(&i);
                }
            }
            let from = nodes.len();
            while nodes.len() < cfg.nodes.len() {
                let i = nodes.len();
                nodes.push(NodeTrack::new(&cfg, i));
            }
            (from, nodes.len())
        };
        for i in from..to {
            tracing::info!(node = %self.app.node_name(i), "node added by a reload: polling it");
            let m2 = self.clone();
            tokio::spawn(async move { m2.run_node(i).await });
        }
        self.publish(None);
    }

    /// False once a RELOAD removed node `i` or moved it away from `node`'s address.
    fn still_at(&self, i: NodeId, node: &crate::config::NodeConfig) -> bool {
        self.app
            .config
            .load()
            .nodes
            .get(i)
            .is_some_and(|n| !n.retired && n.host == node.host && n.port == node.port)
    }

    async fn run_node(self: Arc<Self>, i: NodeId) {
        loop {
            let cfg = self.app.config.load_full();
            let Some(node) = cfg.nodes.get(i).cloned() else {
                return;
            };
            if node.retired {
                // Removed by a RELOAD: not polled unless a later one adds it back.
                tokio::time::sleep(RETIRED_RECHECK).await;
                continue;
            }
            let Some(tls) = self.app.node_tls(i) else {
                return;
            };
            let pg = crate::app::monitor_pg_config(&cfg, &node, "tidemark-monitor");
            let conn = tokio::time::timeout(cfg.monitor.timeout, tls.pg_connect(pg)).await;
            let client = match conn {
                Ok(Ok(client)) => client,
                Ok(Err(e)) => {
                    self.failed(i, &format!("{e:#}"));
                    self.backoff(i).await;
                    continue;
                }
                Err(_) => {
                    self.failed(i, "connect timed out");
                    self.backoff(i).await;
                    continue;
                }
            };
            // The system identifier cannot change while this connection lives (it reads the
            // control file, so it is not part of every poll).
            let sys = async {
                let row = client
                    .query_one(
                        "SELECT system_identifier::text FROM pg_control_system()",
                        &[],
                    )
                    .await?;
                let stmt = client.prepare(POLL_SQL).await?;
                let sync = client.prepare(SYNC_SQL).await?;
                Ok::<_, tokio_postgres::Error>((row.get::<_, Option<String>>(0), stmt, sync))
            };
            let (system_id, stmt, sync_stmt) =
                match tokio::time::timeout(cfg.monitor.timeout, sys).await {
                    Ok(Ok((id, s, y))) => (id.unwrap_or_default(), s, y),
                    Ok(Err(e)) => {
                        self.failed(i, &e.to_string());
                        self.backoff(i).await;
                        continue;
                    }
                    Err(_) => {
                        self.failed(i, "first poll timed out");
                        self.backoff(i).await;
                        continue;
                    }
                };
            let mut next = tokio::time::Instant::now();
            let mut prev_lsn: Option<Lsn> = None;
            let mut sync_read: Option<Instant> = None;
            let (mut remote_apply, mut standbys) = (false, Vec::new());
            let mut was_primary = false;
            loop {
                // A kick sent while this task polls is not waited for here: `Pace::wake`
                // has already recorded the activity, so `next` is the fast pace.
                tokio::select! {
                    _ = tokio::time::sleep_until(next) => {}
                    _ = self.app.monitor_pace.kick.notified() => {}
                    _ = self.app.monitor_pace.kick_primary.notified(), if was_primary => {}
                }
                if !self.still_at(i, &node) {
                    break;
                }
                let started = tokio::time::Instant::now();
                let timeout = self.app.config.load().monitor.timeout;
                let r = tokio::time::timeout(timeout, client.query_one(&stmt, &[])).await;
                let rtt = started.elapsed();
                let row = match r {
                    Ok(Ok(row)) => row,
                    Ok(Err(e)) => {
                        self.failed(i, &e.to_string());
                        break;
                    }
                    Err(_) => {
                        self.failed(i, "poll timed out");
                        break;
                    }
                };
                let in_recovery: bool = row.get(0);
                let lsn: Option<String> = row.get(1);
                if in_recovery {
                    (remote_apply, standbys) = (false, Vec::new());
                    sync_read = None;
                } else if sync_read.is_none_or(|t| t.elapsed() >= SYNC_EVERY) {
                    let r = tokio::time::timeout(timeout, client.query_one(&sync_stmt, &[])).await;
                    match r {
                        Ok(Ok(row)) => {
                            let sync_commit: Option<String> = row.get(0);
                            let names: Option<Vec<Option<String>>> = row.get(1);
                            let states: Option<Vec<Option<String>>> = row.get(2);
                            let pids: Option<Vec<Option<i32>>> = row.get(3);
                            let wstates: Option<Vec<Option<String>>> = row.get(4);
                            remote_apply = sync_commit.as_deref() == Some("remote_apply");
                            let names = names.unwrap_or_default();
                            let n = names.len();
                            let mut states = states.unwrap_or_default();
                            let mut wstates = wstates.unwrap_or_default();
                            states.resize(n, None);
                            wstates.resize(n, None);
                            standbys = names
                                .into_iter()
                                .zip(states)
                                .zip(pids.unwrap_or_default())
                                .zip(wstates)
                                .filter_map(|(((name, sync_state), pid), state)| {
                                    Some(Standby {
                                        name: name?,
                                        sync_state,
                                        pid: pid?,
                                        state,
                                    })
                                })
                                .collect();
                            sync_read = Some(Instant::now());
                        }
                        Ok(Err(e)) => {
                            self.failed(i, &e.to_string());
                            break;
                        }
                        Err(_) => {
                            self.failed(i, "poll timed out");
                            break;
                        }
                    }
                }
                let lsn = lsn.and_then(|s| s.parse::<Lsn>().ok()).unwrap_or(Lsn::ZERO);
                let role = if in_recovery {
                    Role::Replica
                } else {
                    Role::Primary
                };
                let lsn = if role == Role::Primary {
                    lsn.normalize_insert_position()
                } else {
                    lsn
                };
                let behind = role == Role::Replica && lsn < self.app.view.load().primary_lsn;
                if behind || prev_lsn.is_some_and(|p| p != lsn) {
                    self.app.monitor_pace.activity();
                }
                prev_lsn = Some(lsn);
                if !self.still_at(i, &node) {
                    // Moved or removed by a RELOAD while this poll ran: not its sample.
                    break;
                }
                self.sampled(
                    i,
                    Sample {
                        ok: true,
                        role,
                        lsn,
                        system_id: system_id.clone(),
                        remote_apply,
                        standbys: standbys.clone(),
                        at: Instant::now(),
                        asked: started.into_std(),
                        rtt,
                    },
                );
                let m = &self.app.config.load().monitor;
                was_primary = role == Role::Primary;
                let pace = &self.app.monitor_pace;
                next = started
                    + if was_primary {
                        pace.next_after_primary(started.elapsed(), m.interval, m.idle_interval)
                    } else {
                        pace.next_after(m.interval, m.idle_interval)
                    };
            }
            self.backoff(i).await;
        }
    }

    async fn backoff(&self, i: NodeId) {
        let failures = self.nodes.lock()[i].failures.min(6);
        // 50 ms, 100 ms, ... up to 3.2 s between re-probes of a dead node.
        let d = Duration::from_millis(50 << failures);
        let until = Instant::now() + d;
        self.nodes.lock()[i].banned_until = Some(until);
        tokio::time::sleep(d).await;
    }

    fn failed(&self, i: NodeId, why: &str) {
        if self
            .app
            .config
            .load()
            .nodes
            .get(i)
            .is_some_and(|n| n.retired)
        {
            return;
        }
        self.app.node_errors.lock().insert(i, why.to_string());
        {
            let mut nodes = self.nodes.lock();
            let t = &mut nodes[i];
            t.failures = t.failures.saturating_add(1);
            if t.failures == 1 {
                tracing::warn!(node = %self.app.node_name(i), error = %why, "node unreachable; banned and re-probed with back-off");
            }
            if let Some(s) = &mut t.sample {
                s.ok = false;
            }
        }
        self.publish(None);
    }

    fn sampled(&self, i: NodeId, s: Sample) {
        self.app.node_errors.lock().remove(&i);
        {
            let mut nodes = self.nodes.lock();
            let t = &mut nodes[i];
            if t.failures > 0 {
                tracing::info!(node = %self.app.node_name(i), "node reachable again");
            }
            t.failures = 0;
            t.banned_until = None;
            if t.system_id.as_deref() != Some(s.system_id.as_str()) {
                // A different cluster behind the same address: its LSN history means nothing.
                t.system_id = Some(s.system_id.clone());
                t.gate.reset();
            }
            let was_primary = t.sample.as_ref().map(|p| p.role) == Some(Role::Primary);
            if s.role == Role::Primary {
                let mut clock = self.clock.lock();
                if !was_primary {
                    clock.reset();
                }
                clock.record(s.at, s.lsn);
            }
            t.latency.observe(s.rtt);
            t.sample = Some(s);
        }
        self.publish(Some(i));
    }

    /// Builds and publishes a new view from the latest samples.
    fn publish(&self, fresh: Option<NodeId>) {
        let cfg = self.app.config.load();
        let now = Instant::now();
        let stale_after = cfg.monitor.timeout;
        let mut nodes = self.nodes.lock();
        let clock = self.clock.lock();
        let mut statuses: Vec<NodeStatus> = Vec::with_capacity(nodes.len());
        for (i, t) in nodes.iter().enumerate() {
            let name = cfg.nodes.get(i).map(|n| n.name.clone()).unwrap_or_default();
            let mut st = NodeStatus::new(i, name);
            let retired = cfg.nodes.get(i).is_some_and(|n| n.retired);
            if let Some(s) = t.sample.as_ref().filter(|_| !retired) {
                st.role = s.role;
                st.healthy = s.ok && now.duration_since(s.at) <= stale_after;
                st.replay_lsn = s.lsn;
            }
            statuses.push(st);
        }
        let primary = decide_primary(&statuses, cfg.primary_index());
        // A replica serves reads only while the current primary streams to it (see SYNC_SQL).
        // Without a primary (it is down and nobody was promoted yet) no timeline is newer
        // than the replicas', and they go on serving reads.
        if let PrimaryState::One(_) = &primary {
            for st in statuses.iter_mut() {
                st.follows_primary = false;
            }
        }
        if let PrimaryState::One(p) = &primary {
            if let Some(s) = &nodes[*p].sample {
                for sb in &s.standbys {
                    let Some(i) = cfg
                        .nodes
                        .iter()
                        .position(|n| !n.retired && n.standby_name() == sb.name)
                    else {
                        continue;
                    };
                    if let Some(st) = statuses.get_mut(i).filter(|st| st.role == Role::Replica) {
                        st.sync_state = sb
                            .sync_state
                            .as_deref()
                            .map(SyncState::parse)
                            .unwrap_or(SyncState::Unknown);
                        st.walsender_pid = Some(sb.pid);
                        st.synchronous_apply = s.remote_apply && st.sync_state == SyncState::Sync;
                        st.follows_primary = sb
                            .state
                            .as_deref()
                            .is_none_or(|w| w == "streaming" || w == "catchup");
                    }
                }
            }
        }
        let primary_lsn = match &primary {
            PrimaryState::One(p) => statuses[*p].replay_lsn,
            _ => statuses
                .iter()
                .filter(|s| s.healthy)
                .map(|s| s.replay_lsn)
                .max()
                .unwrap_or(Lsn::ZERO),
        };
        for (st, t) in statuses.iter_mut().zip(nodes.iter_mut()) {
            if st.role == Role::Replica && st.healthy {
                st.lag_bytes = primary_lsn.saturating_sub(st.replay_lsn);
                st.lag = clock.lag(st.replay_lsn, now);
                // The gate moves only on fresh samples of this node.
                st.in_rotation = if fresh == Some(st.id) {
                    let before = t.gate.in_rotation();
                    let after = t.gate.observe(st.lag, st.lag_bytes);
                    if before != after {
                        tracing::info!(
                            node = %st.name,
                            lag_ms = st.lag.as_millis() as u64,
                            lag_bytes = st.lag_bytes,
                            "replica {} rotation",
                            if after { "returns to" } else { "leaves" }
                        );
                    }
                    after
                } else {
                    t.gate.in_rotation()
                };
                if fresh == Some(st.id) || fresh == view_primary(&primary) {
                    metrics_node(&mut t.metrics, st);
                }
            } else {
                st.in_rotation = st.role == Role::Primary || t.gate.in_rotation();
                if cfg.nodes.get(st.id).is_some_and(|n| n.retired) {
                    // Removed by a RELOAD: never routed to.
                    st.in_rotation = false;
                }
                if fresh == Some(st.id) || fresh.is_none() {
                    metrics_node(&mut t.metrics, st);
                }
            }
        }
        let primary_track = view_primary(&primary).and_then(|p| nodes.get(p));
        if let Some(s) = primary_track
            .and_then(|t| t.sample.as_ref())
            .filter(|s| s.ok && s.role == Role::Primary)
        {
            // Kept while the primary is down (nobody is promoted yet): its last position.
            let mut last = self.app.last_primary_poll.lock();
            if last.is_none_or(|(_, asked)| s.asked > asked) {
                *last = Some((s.lsn, s.asked));
            }
        }
        let primary_latency = primary_track.and_then(|t| t.latency.get());
        if let Some(d) =
            primary_latency.filter(|_| fresh.is_some() && fresh == view_primary(&primary))
        {
            crate::metrics::primary_latency(d);
        }
        let generation = self
            .generation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let prev = self.app.view.load();
        if prev.primary != primary {
            crate::metrics::split_brain(matches!(primary, PrimaryState::SplitBrain(_)));
            match &primary {
                PrimaryState::One(p) => {
                    tracing::info!(primary = %statuses[*p].name, "primary is now known")
                }
                PrimaryState::SplitBrain(ids) => {
                    tracing::error!(nodes = ?ids, "split brain: several nodes accept writes; writes are refused until one is gone")
                }
                PrimaryState::Unknown => tracing::warn!("no primary is known; writes are refused"),
            }
        }
        drop(clock);
        drop(nodes);
        let view = ClusterView {
            nodes: statuses,
            primary,
            primary_lsn,
            generation,
            primary_latency,
        };
        let min = view.min_replica_replay_lsn();
        self.app.view.store(Arc::new(view));
        self.app.view_changed.notify_waiters();
        if let Some(min) = min {
            self.app.keys.prune_replayed(min);
        }
    }
}

fn view_primary(p: &PrimaryState) -> Option<NodeId> {
    match p {
        PrimaryState::One(id) => Some(*id),
        _ => None,
    }
}

/// Records a node's state in its metric handles (made on first use, remade if the node was
/// renamed by a reload).
fn metrics_node(handles: &mut Option<NodeMetrics>, st: &NodeStatus) {
    if handles.as_ref().is_none_or(|h| h.name() != st.name) {
        *handles = NodeMetrics::new(&st.name);
    }
    let Some(h) = handles else { return };
    h.state(st.role.as_str(), st.healthy, st.in_rotation);
    if st.role == Role::Replica && st.healthy {
        h.lag(st.lag, st.lag_bytes);
        h.sync(st.sync_state.as_str(), st.synchronous_apply);
    }
}
