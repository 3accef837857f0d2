//! The routing decision: given what a routing unit needs (read or write, pinning, consistency,
//! required LSN, hint) and a cluster view snapshot, pick the node — or say which replicas to ask,
//! or why it cannot be served. Pure: no I/O, no clock.

use crate::consistency::Consistency;
use crate::lsn::Lsn;
use crate::view::{ClusterView, NodeId, NodeSet, NodeStatus, PrimaryState, Role};
use std::time::Duration;

/// Per-statement target hint (`/* tidemark: primary */`, `/* tidemark: replica */`).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Default)]
pub enum TargetHint {
    #[default]
    Any,
    /// Send to the primary even if it is a read.
    Primary,
    /// Prefer replicas. The LSN requirement of the consistency level still holds (correctness
    /// first); only `Consistency::Eventual` ignores it.
    Replica,
}

/// What the session knows about the routing unit it is about to send.
#[derive(Clone, Debug)]
pub struct RouteRequest {
    /// The routing unit was classified as a pure read.
    pub read_only: bool,
    /// Inside a transaction or a pinned session: must go to this node.
    pub pinned: Option<NodeId>,
    pub consistency: Consistency,
    /// max(session last write, key LSN, token) — `Lsn::ZERO` if none.
    pub required_lsn: Lsn,
    pub hint: TargetHint,
    /// Tiebreak seed for spreading reads across eligible replicas (a counter or random number).
    pub balance: u64,
    /// Replicas the primary reported as having replayed the session's last commit when it was
    /// acknowledged (measured per commit, see [`Applied`]).
    pub applied: Option<Applied>,
    /// How long the session may wait for a replica to catch up (the wait budget, see
    /// [`crate::wait`]); a replica not expected to replay the required position within it
    /// ([`crate::wait::expected_catch_up`]) is not worth asking. `None`: no limit.
    pub max_wait: Option<Duration>,
    /// How long ago the required position was committed (zero when unknown: assumed just
    /// now). A replica `lag` behind replays it after `lag − commit_age`.
    pub commit_age: Duration,
    /// How coarse the view's time lags are (the monitor's poll interval).
    pub lag_resolution: Duration,
    /// The causal floor (see [`crate::CausalFloor`]): the highest commit LSN acknowledged to any
    /// client before this read arrived. Only `Consistency::Causal` reads depend on it. `None`:
    /// it cannot be known right now (a write's position was lost, the shared store did not
    /// answer), so a causal read must go to the primary.
    pub causal_floor: Option<Lsn>,
    /// Part of what the read depends on could not be learned (its key is held in a shared store
    /// that did not answer): any read but `Eventual` goes to the primary.
    pub requirement_unknown: bool,
}

/// Replicas known to have replayed WAL up to `lsn`: the primary's `pg_stat_replication`
/// showed their `replay_lsn >= lsn` right after the commit (with `synchronous_commit =
/// remote_apply` a synchronous standby always does). Replay only moves forward, so they can
/// serve any read that depends on at most `lsn` without a check or a wait.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Applied {
    pub lsn: Lsn,
    pub nodes: NodeSet,
}

impl RouteRequest {
    /// An autocommit read with the given consistency and requirement, no hint, no pinning.
    pub fn read(consistency: Consistency, required_lsn: Lsn) -> Self {
        RouteRequest {
            read_only: true,
            pinned: None,
            consistency,
            required_lsn,
            hint: TargetHint::Any,
            balance: 0,
            applied: None,
            max_wait: None,
            commit_age: Duration::ZERO,
            lag_resolution: Duration::ZERO,
            causal_floor: Some(Lsn::ZERO),
            requirement_unknown: false,
        }
    }

    /// The LSN a replica must have replayed to serve this read: `required_lsn`, raised to the
    /// causal floor for `Consistency::Causal`. `None` when that cannot be known (see
    /// [`RouteRequest::causal_floor`], [`RouteRequest::requirement_unknown`]).
    pub fn effective_required(&self) -> Option<Lsn> {
        if self.requirement_unknown {
            return None;
        }
        match self.consistency {
            Consistency::Causal => self.causal_floor.map(|f| f.max(self.required_lsn)),
            _ => Some(self.required_lsn),
        }
    }

    /// A write (or anything that must run on the primary).
    pub fn write() -> Self {
        RouteRequest {
            read_only: false,
            ..RouteRequest::read(Consistency::Session, Lsn::ZERO)
        }
    }
}

/// Why a routing unit went where it went; label for metrics.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// Not a pure read.
    Write,
    /// Inside a transaction or pinned session.
    Pinned,
    /// Consistency `strong`.
    Strong,
    /// Hint `/* tidemark: primary */`.
    HintPrimary,
    /// A read went to the primary because no healthy in-rotation replica exists.
    NoReplica,
    /// A read went to the primary because replicas are behind: no replica reached the required
    /// LSN within `max_wait` (after `Route::CheckReplicas`), or all are over the `bounded` lag.
    ReplicasBehind,
    /// A read went to a replica that, asked directly after `Route::CheckReplicas`, had replayed
    /// up to the required LSN (see [`caught_up`]).
    ReplicaCaughtUp,
    /// A read went to a replica whose sampled state already satisfied the request.
    Eligible,
    /// A read went to a replica the primary reported as having replayed the session's last
    /// commit when it was acknowledged (see [`Applied`]); no check, no wait.
    AppliedAtCommit,
    /// A read had to fall back to the primary but no primary is known (the session answers
    /// with an error); label for counting those refusals (see [`fallback_after_wait`]).
    NoPrimaryForRead,
    /// A read went to the primary because what it depends on is unknown right now: the causal
    /// floor after a write whose position was lost, or a key or floor held in a shared store
    /// that did not answer in time.
    RequirementUnknown,
}

impl Reason {
    /// All reasons, for pre-registering metric labels.
    pub const ALL: [Reason; 11] = [
        Reason::Write,
        Reason::Pinned,
        Reason::Strong,
        Reason::HintPrimary,
        Reason::NoReplica,
        Reason::ReplicasBehind,
        Reason::ReplicaCaughtUp,
        Reason::Eligible,
        Reason::AppliedAtCommit,
        Reason::NoPrimaryForRead,
        Reason::RequirementUnknown,
    ];

    /// snake_case label for metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            Reason::Write => "write",
            Reason::Pinned => "pinned",
            Reason::Strong => "strong",
            Reason::HintPrimary => "hint_primary",
            Reason::NoReplica => "no_replica",
            Reason::ReplicasBehind => "replicas_behind",
            Reason::ReplicaCaughtUp => "replica_caught_up",
            Reason::Eligible => "eligible",
            Reason::AppliedAtCommit => "applied_at_commit",
            Reason::NoPrimaryForRead => "no_primary_for_read",
            Reason::RequirementUnknown => "requirement_unknown",
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The routing decision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// Send now to this node.
    Node {
        node: NodeId,
        role: Role,
        reason: Reason,
    },
    /// No replica's last SAMPLED replay LSN reaches `required_lsn`, but these healthy
    /// in-rotation replicas might by now: the session asks them directly (a separate
    /// `SELECT pg_last_wal_replay_lsn()` before the read), polls until `max_wait`, then falls
    /// back to `fallback` (the primary) with `Reason::ReplicasBehind`. Candidates are sorted by
    /// sampled replay LSN, most advanced first. `fallback` is `None` when no primary is known.
    CheckReplicas {
        candidates: Vec<NodeId>,
        required_lsn: Lsn,
        fallback: Option<NodeId>,
    },
    /// Cannot be served.
    Unavailable(Unavailable),
}

impl Route {
    /// The reason of a `Route::Node`, `None` otherwise.
    pub fn reason(&self) -> Option<Reason> {
        match self {
            Route::Node { reason, .. } => Some(*reason),
            _ => None,
        }
    }

    /// The node of a `Route::Node`, `None` otherwise.
    pub fn node(&self) -> Option<NodeId> {
        match self {
            Route::Node { node, .. } => Some(*node),
            _ => None,
        }
    }
}

/// Why a routing unit cannot be served.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Unavailable {
    /// No healthy node reports being the primary.
    #[error("no primary is available: no healthy node reports pg_is_in_recovery() = false; check the primary or promote a replica")]
    NoPrimary,
    /// Two or more healthy nodes report being the primary; writes are refused.
    #[error("split brain: nodes {0:?} all report being the primary; writes are refused until only one remains writable")]
    SplitBrain(Vec<NodeId>),
    /// No node is healthy.
    #[error("no healthy database node is available; check that the configured servers are running and reachable")]
    NoHealthyNode,
    /// The transaction or pinned session's node is down.
    #[error("the node {0} this transaction or session is pinned to is down; the transaction is lost, reconnect and retry")]
    PinnedNodeDown(NodeId),
}

/// The healthy primary, or why there is none.
fn primary_node(view: &ClusterView) -> Result<&NodeStatus, Unavailable> {
    match &view.primary {
        PrimaryState::One(id) => match view.node(*id) {
            Some(n) if n.healthy && n.role == Role::Primary => Ok(n),
            _ => Err(no_primary(view)),
        },
        PrimaryState::SplitBrain(ids) => Err(Unavailable::SplitBrain(ids.clone())),
        PrimaryState::Unknown => Err(no_primary(view)),
    }
}

fn no_primary(view: &ClusterView) -> Unavailable {
    if view.nodes.iter().any(|n| n.healthy) {
        Unavailable::NoPrimary
    } else {
        Unavailable::NoHealthyNode
    }
}

fn to_primary(view: &ClusterView, reason: Reason) -> Route {
    match primary_node(view) {
        Ok(p) => Route::Node {
            node: p.id,
            role: Role::Primary,
            reason,
        },
        Err(u) => Route::Unavailable(u),
    }
}

/// Has this replica (by its sampled state) replayed what the request depends on?
fn sampled_ok(n: &NodeStatus, required: Lsn) -> bool {
    n.replay_lsn >= required
}

/// Did the primary report this replica as having replayed what the request depends on?
fn applied_ok(n: &NodeStatus, req: &RouteRequest, required: Lsn) -> bool {
    req.applied
        .is_some_and(|a| a.lsn >= required && a.nodes.contains(n.id))
}

fn lsn_ok(n: &NodeStatus, req: &RouteRequest, required: Lsn) -> bool {
    sampled_ok(n, required) || applied_ok(n, req, required)
}

/// Route one routing unit.
///
/// - `pinned` → that node if healthy, whatever the statement (a transaction stays on its node),
///   else `Unavailable::PinnedNodeDown`.
/// - not `read_only`, hint `Primary` or consistency `Strong` → the primary
///   (`Unavailable::NoPrimary` / `SplitBrain` if none: split brain refuses, never guesses).
/// - reads: eligible replicas are healthy, `Role::Replica`, in rotation and
///   - `Session`: `replay_lsn >= required_lsn`, or the node is in `applied` and
///     `applied.lsn >= required_lsn` (`Reason::AppliedAtCommit` when only that holds);
///   - `Causal`: the `Session` condition with `required_lsn` raised to `causal_floor`;
///   - `Bounded(d)`: `lag <= d` and the `Session` condition;
///   - `Eventual`: no further condition.
///
///   One is picked with `balance % len` over eligible replicas ordered by id (`Reason::Eligible`).
///   If none is eligible: `Session`/`Bounded` replicas that are only behind on LSN →
///   `CheckReplicas`; otherwise the primary (`NoReplica` if no healthy in-rotation replica
///   exists, `ReplicasBehind` if they all exceed the `bounded` lag); no primary → `Unavailable`.
/// - a read (not `Eventual`) whose requirement is unknown (`requirement_unknown`, or a `Causal`
///   read without a `causal_floor`) → the primary (`Reason::RequirementUnknown`): never stale.
pub fn route(req: &RouteRequest, view: &ClusterView) -> Route {
    if let Some(id) = req.pinned {
        return match view.node(id) {
            Some(n) if n.healthy => Route::Node {
                node: id,
                role: n.role,
                reason: Reason::Pinned,
            },
            _ => Route::Unavailable(Unavailable::PinnedNodeDown(id)),
        };
    }
    if !req.read_only {
        return to_primary(view, Reason::Write);
    }
    if req.hint == TargetHint::Primary {
        return to_primary(view, Reason::HintPrimary);
    }
    if req.consistency == Consistency::Strong {
        return to_primary(view, Reason::Strong);
    }
    let required = match req.effective_required() {
        Some(l) => l,
        None if req.consistency == Consistency::Eventual => req.required_lsn,
        None => return to_primary(view, Reason::RequirementUnknown),
    };

    // Replicas that could serve reads at all.
    let is_usable =
        |n: &NodeStatus| n.healthy && n.role == Role::Replica && n.in_rotation && n.follows_primary;
    let within_bound = |n: &NodeStatus| match req.consistency {
        Consistency::Bounded(d) => n.lag <= d,
        _ => true,
    };
    let is_eligible = |n: &NodeStatus| {
        is_usable(n)
            && match req.consistency {
                Consistency::Eventual => true,
                _ => within_bound(n) && lsn_ok(n, req, required),
            }
    };

    // The eligible replicas in stable id order, the `balance`-th of them picked — found by
    // rank rather than by collecting and sorting them (two vectors per read showed in the
    // per-statement profile; clusters have a handful of nodes).
    let count = view.nodes.iter().filter(|n| is_eligible(n)).count();
    let pick = (count > 0)
        .then(|| {
            let k = (req.balance % count as u64) as usize;
            let rank = |i: usize, n: &NodeStatus| {
                view.nodes
                    .iter()
                    .enumerate()
                    .filter(|(j, m)| is_eligible(m) && (m.id < n.id || (m.id == n.id && *j < i)))
                    .count()
            };
            view.nodes
                .iter()
                .enumerate()
                .find(|(i, n)| is_eligible(n) && rank(*i, n) == k)
                .map(|(_, n)| n)
        })
        .flatten();
    if let Some(pick) = pick {
        let reason = if req.consistency == Consistency::Eventual || sampled_ok(pick, required) {
            Reason::Eligible
        } else {
            Reason::AppliedAtCommit
        };
        return Route::Node {
            node: pick.id,
            role: Role::Replica,
            reason,
        };
    }

    // Nobody eligible. Replicas only lacking the LSN might have caught up since the last sample.
    let mut usable: Vec<&NodeStatus> = view.nodes.iter().filter(|n| is_usable(n)).collect();
    usable.sort_by_key(|n| n.id);
    let mut behind: Vec<&NodeStatus> = usable
        .iter()
        .copied()
        .filter(|n| within_bound(n) && !lsn_ok(n, req, required))
        .filter(|n| {
            req.max_wait.is_none_or(|w| {
                crate::wait::expected_catch_up(n.lag, req.commit_age, req.lag_resolution) <= w
            })
        })
        .collect();
    if !behind.is_empty() && req.consistency != Consistency::Eventual {
        behind.sort_by(|a, b| b.replay_lsn.cmp(&a.replay_lsn).then(a.id.cmp(&b.id)));
        return Route::CheckReplicas {
            candidates: behind.iter().map(|n| n.id).collect(),
            required_lsn: required,
            fallback: primary_node(view).ok().map(|p| p.id),
        };
    }

    let reason = if usable.is_empty() {
        Reason::NoReplica
    } else {
        Reason::ReplicasBehind
    };
    to_primary(view, reason)
}

/// After `Route::CheckReplicas`: the session asked `candidate` and it reported `reported` as its
/// replay LSN. Returns the route to that replica (`Reason::ReplicaCaughtUp`) if it has replayed
/// up to `required_lsn`, else `None` (keep polling until `max_wait`).
pub fn caught_up(candidate: NodeId, reported: Lsn, required_lsn: Lsn) -> Option<Route> {
    (reported >= required_lsn).then_some(Route::Node {
        node: candidate,
        role: Role::Replica,
        reason: Reason::ReplicaCaughtUp,
    })
}

/// A replica `route` chose could not be reached (its connection failed; the monitor takes it
/// out at its next poll): the read goes to the primary with `Reason::NoReplica`, or is
/// `Unavailable` without one. A replica whose pool is only exhausted is not unreachable: the
/// caller reports that instead of moving load to the primary.
pub fn after_unreachable_replica(view: &ClusterView) -> Route {
    to_primary(view, Reason::NoReplica)
}

/// After `Route::CheckReplicas` timed out (`max_wait` passed with no candidate caught up): the
/// fallback primary with `Reason::ReplicasBehind`, or `Unavailable::NoPrimary` if there is none
/// (count it as `Reason::NoPrimaryForRead`).
pub fn fallback_after_wait(fallback: Option<NodeId>) -> Route {
    match fallback {
        Some(node) => Route::Node {
            node,
            role: Role::Primary,
            reason: Reason::ReplicasBehind,
        },
        None => Route::Unavailable(Unavailable::NoPrimary),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view::decide_primary;
    use proptest::prelude::*;
    use std::collections::HashSet;
    use std::time::Duration;

    fn n(id: NodeId, role: Role, lsn: u64) -> NodeStatus {
        NodeStatus {
            id,
            name: format!("n{id}"),
            role,
            healthy: true,
            in_rotation: true,
            replay_lsn: Lsn(lsn),
            lag_bytes: 0,
            lag: Duration::ZERO,
            sync_state: crate::view::SyncState::Unknown,
            walsender_pid: None,
            synchronous_apply: false,
            follows_primary: true,
        }
    }

    /// A replica already lagging more than the session may wait is not asked to catch up.
    #[test]
    fn replicas_lagging_beyond_max_wait_are_not_waited_for() {
        let mut v = cluster();
        v.nodes[1].lag = Duration::from_millis(500);
        v.nodes[2].lag = Duration::from_millis(5);
        let mut r = RouteRequest::read(Consistency::Session, Lsn(950));
        r.max_wait = Some(Duration::from_millis(20));
        assert_eq!(
            route(&r, &v),
            Route::CheckReplicas {
                candidates: vec![2],
                required_lsn: Lsn(950),
                fallback: Some(0)
            }
        );
        v.nodes[2].lag = Duration::from_millis(50);
        assert_eq!(
            route(&r, &v),
            node(0, Role::Primary, Reason::ReplicasBehind)
        );
        r.max_wait = None;
        assert!(matches!(route(&r, &v), Route::CheckReplicas { .. }));
        assert_eq!(
            after_unreachable_replica(&v),
            node(0, Role::Primary, Reason::NoReplica)
        );
    }

    /// The wait is judged by when the replica is expected to replay the commit: a replica
    /// 50 ms behind replays a commit made 45 ms ago within 5 ms, one made just now after 50.
    #[test]
    fn commit_age_and_lag_resolution_shorten_the_expected_catch_up() {
        let mut v = cluster();
        v.nodes[1].lag = Duration::from_millis(500);
        v.nodes[2].lag = Duration::from_millis(50);
        let mut r = RouteRequest::read(Consistency::Session, Lsn(950));
        r.max_wait = Some(Duration::from_millis(5));
        assert_eq!(
            route(&r, &v),
            node(0, Role::Primary, Reason::ReplicasBehind)
        );
        r.commit_age = Duration::from_millis(45);
        let check = Route::CheckReplicas {
            candidates: vec![2],
            required_lsn: Lsn(950),
            fallback: Some(0),
        };
        assert_eq!(route(&r, &v), check);
        // Or the lag is only known to within 45 ms.
        r.commit_age = Duration::ZERO;
        r.lag_resolution = Duration::from_millis(45);
        assert_eq!(route(&r, &v), check);
        // A zero budget still asks a replica that may already have it.
        r.max_wait = Some(Duration::ZERO);
        r.lag_resolution = Duration::from_millis(50);
        assert_eq!(route(&r, &v), check);
        r.lag_resolution = Duration::from_millis(49);
        assert_eq!(
            route(&r, &v),
            node(0, Role::Primary, Reason::ReplicasBehind)
        );
    }

    /// A replica the primary does not stream to (on a dead primary, or forked off the old
    /// timeline with a replay LSN that looks ahead) serves no read, whatever its LSN.
    #[test]
    fn replicas_not_streaming_from_the_primary_serve_no_reads() {
        let mut v = cluster();
        // Replica 1 sits at 2000 on an old timeline: numerically past every commit.
        v.nodes[1].replay_lsn = Lsn(2000);
        v.nodes[1].follows_primary = false;
        for consistency in [Consistency::Session, Consistency::Eventual] {
            for balance in 0..4 {
                let mut r = RouteRequest::read(consistency, Lsn(1000));
                r.balance = balance;
                match route(&r, &v) {
                    Route::Node { node, .. } => assert_ne!(node, 1, "{consistency:?}"),
                    Route::CheckReplicas { candidates, .. } => assert!(!candidates.contains(&1)),
                    Route::Unavailable(u) => panic!("{u:?}"),
                }
            }
        }
        v.nodes[2].follows_primary = false;
        assert_eq!(
            route(&RouteRequest::read(Consistency::Eventual, Lsn::ZERO), &v),
            Route::Node {
                node: 0,
                role: Role::Primary,
                reason: Reason::NoReplica
            }
        );
    }

    /// Primary 0 at 1000, replicas 1 (at 900) and 2 (at 500).
    fn cluster() -> ClusterView {
        let nodes = vec![
            n(0, Role::Primary, 1000),
            n(1, Role::Replica, 900),
            n(2, Role::Replica, 500),
        ];
        view_of(nodes)
    }

    fn view_of(nodes: Vec<NodeStatus>) -> ClusterView {
        let primary = decide_primary(&nodes, None);
        ClusterView {
            nodes,
            primary,
            primary_lsn: Lsn(1000),
            generation: 1,
            primary_latency: None,
        }
    }

    fn read(c: Consistency, lsn: u64) -> RouteRequest {
        RouteRequest::read(c, Lsn(lsn))
    }

    fn node(node: NodeId, role: Role, reason: Reason) -> Route {
        Route::Node { node, role, reason }
    }

    #[test]
    fn causal_reads_wait_for_the_floor() {
        let v = cluster(); // replicas at 900 and 500
        let mut r = read(Consistency::Causal, 0);
        r.causal_floor = Some(Lsn(800));
        assert_eq!(route(&r, &v), node(1, Role::Replica, Reason::Eligible));
        // The same read at `session` ignores the floor.
        r.consistency = Consistency::Session;
        r.balance = 1;
        assert_eq!(route(&r, &v), node(2, Role::Replica, Reason::Eligible));
        // Floor above every replica: ask them, never serve it stale.
        let mut r = read(Consistency::Causal, 100);
        r.causal_floor = Some(Lsn(950));
        assert_eq!(
            route(&r, &v),
            Route::CheckReplicas {
                candidates: vec![1, 2],
                required_lsn: Lsn(950),
                fallback: Some(0)
            }
        );
        // The session's own requirement still counts when above the floor.
        let mut r = read(Consistency::Causal, 950);
        r.causal_floor = Some(Lsn(100));
        assert!(matches!(
            route(&r, &v),
            Route::CheckReplicas {
                required_lsn: Lsn(950),
                ..
            }
        ));
        // An applied-at-commit report only covers the floor if it reaches it.
        let mut r = read(Consistency::Causal, 950);
        r.causal_floor = Some(Lsn(990));
        r.applied = Some(Applied {
            lsn: Lsn(960),
            nodes: [2].into_iter().collect(),
        });
        assert!(matches!(route(&r, &v), Route::CheckReplicas { .. }));
        r.applied = Some(Applied {
            lsn: Lsn(990),
            nodes: [2].into_iter().collect(),
        });
        assert_eq!(
            route(&r, &v),
            node(2, Role::Replica, Reason::AppliedAtCommit)
        );
    }

    #[test]
    fn unknown_requirements_go_to_the_primary() {
        let v = cluster();
        let mut r = read(Consistency::Causal, 0);
        r.causal_floor = None;
        assert_eq!(
            route(&r, &v),
            node(0, Role::Primary, Reason::RequirementUnknown)
        );
        // Other levels do not depend on the floor.
        r.consistency = Consistency::Session;
        assert_eq!(route(&r, &v), node(1, Role::Replica, Reason::Eligible));
        // A key that could not be read: any level but eventual goes to the primary.
        for c in [
            Consistency::Session,
            Consistency::Causal,
            Consistency::Bounded(Duration::from_secs(9)),
        ] {
            let mut r = read(c, 0);
            r.requirement_unknown = true;
            assert_eq!(
                route(&r, &v),
                node(0, Role::Primary, Reason::RequirementUnknown)
            );
        }
        let mut r = read(Consistency::Eventual, 0);
        r.requirement_unknown = true;
        r.causal_floor = None;
        assert_eq!(route(&r, &v), node(1, Role::Replica, Reason::Eligible));
    }

    #[test]
    fn write_goes_to_primary() {
        assert_eq!(
            route(&RouteRequest::write(), &cluster()),
            node(0, Role::Primary, Reason::Write)
        );
    }

    #[test]
    fn write_without_primary_is_unavailable() {
        let mut v = cluster();
        v.nodes[0].healthy = false;
        v.primary = decide_primary(&v.nodes, None);
        assert_eq!(
            route(&RouteRequest::write(), &v),
            Route::Unavailable(Unavailable::NoPrimary)
        );
        for nd in &mut v.nodes {
            nd.healthy = false;
        }
        assert_eq!(
            route(&RouteRequest::write(), &v),
            Route::Unavailable(Unavailable::NoHealthyNode)
        );
    }

    #[test]
    fn inconsistent_view_never_writes_to_replica() {
        let mut v = cluster();
        v.primary = PrimaryState::One(1); // stale view claims a replica is primary
        assert_eq!(
            route(&RouteRequest::write(), &v),
            Route::Unavailable(Unavailable::NoPrimary)
        );
    }

    #[test]
    fn split_brain_refuses_writes_but_serves_eligible_reads() {
        let mut v = cluster();
        v.nodes[2].role = Role::Primary;
        v.primary = decide_primary(&v.nodes, None);
        assert_eq!(
            route(&RouteRequest::write(), &v),
            Route::Unavailable(Unavailable::SplitBrain(vec![0, 2]))
        );
        let mut strong = read(Consistency::Strong, 0);
        assert_eq!(
            route(&strong, &v),
            Route::Unavailable(Unavailable::SplitBrain(vec![0, 2]))
        );
        strong.consistency = Consistency::Session;
        assert_eq!(route(&strong, &v), node(1, Role::Replica, Reason::Eligible));
    }

    #[test]
    fn strong_and_hint_primary() {
        assert_eq!(
            route(&read(Consistency::Strong, 0), &cluster()),
            node(0, Role::Primary, Reason::Strong)
        );
        let mut r = read(Consistency::Eventual, 0);
        r.hint = TargetHint::Primary;
        assert_eq!(
            route(&r, &cluster()),
            node(0, Role::Primary, Reason::HintPrimary)
        );
        // Hint replica does not override strong.
        let mut r = read(Consistency::Strong, 0);
        r.hint = TargetHint::Replica;
        assert_eq!(
            route(&r, &cluster()),
            node(0, Role::Primary, Reason::Strong)
        );
    }

    #[test]
    fn pinned() {
        let mut r = RouteRequest::write();
        r.pinned = Some(1);
        assert_eq!(
            route(&r, &cluster()),
            node(1, Role::Replica, Reason::Pinned)
        );
        r.pinned = Some(0);
        r.read_only = true;
        assert_eq!(
            route(&r, &cluster()),
            node(0, Role::Primary, Reason::Pinned)
        );
        let mut v = cluster();
        v.nodes[1].healthy = false;
        r.pinned = Some(1);
        assert_eq!(
            route(&r, &v),
            Route::Unavailable(Unavailable::PinnedNodeDown(1))
        );
        r.pinned = Some(42);
        assert_eq!(
            route(&r, &v),
            Route::Unavailable(Unavailable::PinnedNodeDown(42))
        );
    }

    #[test]
    fn session_read_picks_caught_up_replica() {
        // required 700: only replica 1 (900) qualifies.
        for balance in 0..4 {
            let mut r = read(Consistency::Session, 700);
            r.balance = balance;
            assert_eq!(
                route(&r, &cluster()),
                node(1, Role::Replica, Reason::Eligible)
            );
        }
    }

    #[test]
    fn balance_spreads_over_eligible_replicas() {
        let mut seen = HashSet::new();
        for balance in 0..10 {
            let mut r = read(Consistency::Session, 0);
            r.balance = balance;
            seen.insert(route(&r, &cluster()).node().unwrap());
        }
        assert_eq!(seen, HashSet::from([1, 2]));
        // Stable order by id regardless of the order in the view.
        let mut v = cluster();
        v.nodes.reverse();
        let mut r = read(Consistency::Session, 0);
        r.balance = 0;
        assert_eq!(route(&r, &v).node(), Some(1));
        r.balance = 1;
        assert_eq!(route(&r, &v).node(), Some(2));
        r.balance = u64::MAX; // odd
        assert_eq!(route(&r, &v).node(), Some(2));
    }

    #[test]
    fn behind_replicas_are_checked_most_advanced_first() {
        let r = read(Consistency::Session, 950);
        assert_eq!(
            route(&r, &cluster()),
            Route::CheckReplicas {
                candidates: vec![1, 2],
                required_lsn: Lsn(950),
                fallback: Some(0),
            }
        );
        // Ties broken by id.
        let mut v = cluster();
        v.nodes.push(n(3, Role::Replica, 900));
        v.nodes.push(n(4, Role::Replica, 100));
        match route(&r, &v) {
            Route::CheckReplicas { candidates, .. } => assert_eq!(candidates, vec![1, 3, 2, 4]),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn check_replicas_skips_unhealthy_and_out_of_rotation() {
        let mut v = cluster();
        v.nodes[1].in_rotation = false;
        v.nodes.push(n(3, Role::Replica, 940));
        v.nodes[3].healthy = false;
        match route(&read(Consistency::Session, 950), &v) {
            Route::CheckReplicas { candidates, .. } => assert_eq!(candidates, vec![2]),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn synchronous_apply_flag_alone_is_not_trusted() {
        // The flag reflects the primary's default synchronous_commit; this session's commit
        // may have run with another setting. Without a per-commit report: check replicas.
        let mut v = cluster();
        v.nodes[2].synchronous_apply = true;
        assert!(matches!(
            route(&read(Consistency::Session, 999), &v),
            Route::CheckReplicas { .. }
        ));
    }

    #[test]
    fn replica_reported_applied_at_commit_serves_without_check() {
        let v = cluster();
        let mut req = read(Consistency::Session, 999);
        req.applied = Some(Applied {
            lsn: Lsn(999),
            nodes: [2].into_iter().collect(),
        });
        assert_eq!(
            route(&req, &v),
            node(2, Role::Replica, Reason::AppliedAtCommit)
        );
        // A requirement beyond what was reported (a key or token from elsewhere) is not covered.
        req.required_lsn = Lsn(1000);
        assert!(matches!(route(&req, &v), Route::CheckReplicas { .. }));
        // Bounded still applies its lag bound.
        req.required_lsn = Lsn(999);
        req.consistency = Consistency::Bounded(Duration::from_millis(10));
        let mut v2 = cluster();
        v2.nodes[2].lag = Duration::from_millis(50);
        v2.nodes[1].lag = Duration::from_millis(50);
        assert_eq!(
            route(&req, &v2),
            node(0, Role::Primary, Reason::ReplicasBehind)
        );
    }

    #[test]
    fn no_replica_falls_back_to_primary() {
        let v = view_of(vec![n(0, Role::Primary, 1000)]);
        assert_eq!(
            route(&read(Consistency::Session, 0), &v),
            node(0, Role::Primary, Reason::NoReplica)
        );
        let mut v = cluster();
        v.nodes[1].in_rotation = false;
        v.nodes[2].healthy = false;
        assert_eq!(
            route(&read(Consistency::Eventual, 0), &v),
            node(0, Role::Primary, Reason::NoReplica)
        );
    }

    #[test]
    fn bounded() {
        let mut v = cluster();
        v.nodes[1].lag = Duration::from_millis(300);
        v.nodes[2].lag = Duration::from_millis(100);
        let b = |ms| Consistency::Bounded(Duration::from_millis(ms));
        // Both within 500ms, required 0: spread.
        let mut r = read(b(500), 0);
        r.balance = 1;
        assert_eq!(route(&r, &v), node(2, Role::Replica, Reason::Eligible));
        // Within 200ms only replica 2.
        r.consistency = b(200);
        r.balance = 0;
        assert_eq!(route(&r, &v), node(2, Role::Replica, Reason::Eligible));
        // Lag bound AND LSN: replica 2 is within the bound but behind on LSN → check it only.
        let r = read(b(200), 700);
        assert_eq!(
            route(&r, &v),
            Route::CheckReplicas {
                candidates: vec![2],
                required_lsn: Lsn(700),
                fallback: Some(0)
            }
        );
        // Everybody over the bound → primary, replicas behind.
        let r = read(b(50), 0);
        assert_eq!(
            route(&r, &v),
            node(0, Role::Primary, Reason::ReplicasBehind)
        );
    }

    #[test]
    fn eventual_ignores_required_lsn() {
        let mut r = read(Consistency::Eventual, 5000);
        r.balance = 1;
        assert_eq!(
            route(&r, &cluster()),
            node(2, Role::Replica, Reason::Eligible)
        );
    }

    #[test]
    fn hint_replica_keeps_lsn_requirement() {
        let mut r = read(Consistency::Session, 950);
        r.hint = TargetHint::Replica;
        assert!(matches!(route(&r, &cluster()), Route::CheckReplicas { .. }));
        r.consistency = Consistency::Eventual;
        assert_eq!(route(&r, &cluster()).reason(), Some(Reason::Eligible));
    }

    #[test]
    fn primary_down_still_serves_eligible_reads() {
        let mut v = cluster();
        v.nodes[0].healthy = false;
        v.primary = decide_primary(&v.nodes, None);
        assert_eq!(v.primary, PrimaryState::Unknown);
        assert_eq!(
            route(&read(Consistency::Session, 800), &v),
            node(1, Role::Replica, Reason::Eligible)
        );
        assert_eq!(
            route(&read(Consistency::Session, 950), &v),
            Route::CheckReplicas {
                candidates: vec![1, 2],
                required_lsn: Lsn(950),
                fallback: None
            }
        );
        // Strong reads and writes have nowhere to go.
        assert_eq!(
            route(&read(Consistency::Strong, 0), &v),
            Route::Unavailable(Unavailable::NoPrimary)
        );
        // No replica usable either → unavailable.
        v.nodes[1].in_rotation = false;
        v.nodes[2].in_rotation = false;
        assert_eq!(
            route(&read(Consistency::Session, 0), &v),
            Route::Unavailable(Unavailable::NoPrimary)
        );
    }

    #[test]
    fn after_check_replicas() {
        assert_eq!(caught_up(2, Lsn(949), Lsn(950)), None);
        assert_eq!(
            caught_up(2, Lsn(950), Lsn(950)),
            Some(node(2, Role::Replica, Reason::ReplicaCaughtUp))
        );
        assert_eq!(
            fallback_after_wait(Some(0)),
            node(0, Role::Primary, Reason::ReplicasBehind)
        );
        assert_eq!(
            fallback_after_wait(None),
            Route::Unavailable(Unavailable::NoPrimary)
        );
    }

    #[test]
    fn reason_labels() {
        let labels: Vec<&str> = Reason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(
            labels,
            [
                "write",
                "pinned",
                "strong",
                "hint_primary",
                "no_replica",
                "replicas_behind",
                "replica_caught_up",
                "eligible",
                "applied_at_commit",
                "no_primary_for_read",
                "requirement_unknown"
            ]
        );
        assert_eq!(Reason::ReplicasBehind.to_string(), "replicas_behind");
    }

    #[test]
    fn unavailable_messages_say_what_to_do() {
        assert!(Unavailable::SplitBrain(vec![0, 2])
            .to_string()
            .contains("[0, 2]"));
        assert!(Unavailable::PinnedNodeDown(3)
            .to_string()
            .contains("node 3"));
    }

    // ---- properties ----

    fn arb_role() -> impl Strategy<Value = Role> {
        prop_oneof![
            1 => Just(Role::Primary),
            4 => Just(Role::Replica),
            1 => Just(Role::Unknown),
        ]
    }

    fn arb_view() -> impl Strategy<Value = ClusterView> {
        prop::collection::vec(
            (
                arb_role(),
                any::<bool>(),
                any::<bool>(),
                0u64..2000,
                0u64..3000,
                any::<bool>(),
            ),
            0..6,
        )
        .prop_flat_map(|specs| {
            let nodes: Vec<NodeStatus> = specs
                .into_iter()
                .enumerate()
                .map(|(id, (role, healthy, rot, lsn, lag_ms, sync))| NodeStatus {
                    id,
                    name: format!("n{id}"),
                    role,
                    healthy,
                    in_rotation: rot,
                    replay_lsn: Lsn(lsn),
                    lag_bytes: 0,
                    lag: Duration::from_millis(lag_ms),
                    sync_state: crate::view::SyncState::Unknown,
                    walsender_pid: None,
                    synchronous_apply: sync,
                    follows_primary: true,
                })
                .collect();
            let len = nodes.len();
            // Either a decided primary or an arbitrary (possibly inconsistent) state.
            let states = prop_oneof![
                Just(decide_primary(&nodes, None)),
                Just(PrimaryState::Unknown),
                (0..len.max(1)).prop_map(PrimaryState::One),
            ];
            (Just(nodes), states).prop_map(|(nodes, primary)| ClusterView {
                nodes,
                primary,
                primary_lsn: Lsn(2000),
                generation: 0,
                primary_latency: None,
            })
        })
    }

    /// The replica has the requirement by its sample, or by a per-commit report that covers
    /// it (independent of the route code; the `synchronous_apply` flag never counts).
    fn covered(n: &NodeStatus, req: &RouteRequest) -> bool {
        covers(n, req, req.required_lsn)
    }

    fn covers(n: &NodeStatus, req: &RouteRequest, need: Lsn) -> bool {
        n.replay_lsn >= need
            || req
                .applied
                .is_some_and(|a| a.lsn >= need && a.nodes.contains(n.id))
    }

    fn arb_consistency() -> impl Strategy<Value = Consistency> {
        prop_oneof![
            Just(Consistency::Strong),
            Just(Consistency::Session),
            Just(Consistency::Causal),
            Just(Consistency::Eventual),
            (0u64..3000).prop_map(|ms| Consistency::Bounded(Duration::from_millis(ms))),
        ]
    }

    fn arb_req() -> impl Strategy<Value = RouteRequest> {
        (
            any::<bool>(),
            arb_consistency(),
            0u64..2500,
            prop_oneof![
                Just(TargetHint::Any),
                Just(TargetHint::Primary),
                Just(TargetHint::Replica)
            ],
            any::<u64>(),
            proptest::option::of((0u64..2500, any::<u8>())),
            proptest::option::of(0u64..2500),
        )
            .prop_map(
                |(read_only, consistency, lsn, hint, balance, applied, floor)| RouteRequest {
                    read_only,
                    pinned: None,
                    max_wait: None,
                    commit_age: Duration::ZERO,
                    lag_resolution: Duration::ZERO,
                    consistency,
                    required_lsn: Lsn(lsn),
                    hint,
                    balance,
                    applied: applied.map(|(l, bits)| Applied {
                        lsn: Lsn(l),
                        nodes: (0..8).filter(|i| bits & (1 << i) != 0).collect(),
                    }),
                    causal_floor: floor.map(Lsn),
                    requirement_unknown: false,
                },
            )
    }

    proptest! {
        #[test]
        fn session_reads_never_go_to_a_replica_behind(view in arb_view(), mut req in arb_req()) {
            req.read_only = true;
            req.consistency = Consistency::Session;
            if let Route::Node { node, role, .. } = route(&req, &view) {
                let n = view.node(node).unwrap();
                prop_assert!(n.healthy);
                if role == Role::Replica {
                    prop_assert!(covered(n, &req));
                    prop_assert!(n.in_rotation);
                }
            }
        }

        #[test]
        fn non_eventual_replica_picks_meet_requirements(view in arb_view(), req in arb_req()) {
            if let Route::Node { node, role: Role::Replica, reason } = route(&req, &view) {
                prop_assert!(matches!(reason, Reason::Eligible | Reason::AppliedAtCommit));
                let n = view.node(node).unwrap();
                prop_assert!(req.read_only);
                match req.consistency {
                    Consistency::Strong => prop_assert!(false, "strong read went to a replica"),
                    Consistency::Session => prop_assert!(covered(n, &req)),
                    Consistency::Causal => {
                        // Never below the floor; never without a known floor.
                        let floor = req.causal_floor;
                        prop_assert!(floor.is_some());
                        let need = req.required_lsn.max(floor.unwrap_or(Lsn::ZERO));
                        prop_assert!(covers(n, &req, need));
                    }
                    Consistency::Bounded(d) => {
                        prop_assert!(n.lag <= d);
                        prop_assert!(covered(n, &req));
                    }
                    Consistency::Eventual => {}
                }
            }
        }

        #[test]
        fn the_pick_is_the_balance_th_eligible_replica_in_id_order(view in arb_view(), req in arb_req()) {
            // The reference: collect the eligible replicas, sort them by id, index by balance.
            if let Route::Node { node, role: Role::Replica, reason: Reason::Eligible | Reason::AppliedAtCommit } = route(&req, &view) {
                let required = req.effective_required().unwrap_or(req.required_lsn);
                let mut eligible: Vec<&NodeStatus> = view
                    .nodes
                    .iter()
                    .filter(|n| n.healthy && n.role == Role::Replica && n.in_rotation && n.follows_primary)
                    .filter(|n| match req.consistency {
                        Consistency::Eventual => true,
                        Consistency::Bounded(d) => n.lag <= d && lsn_ok(n, &req, required),
                        _ => lsn_ok(n, &req, required),
                    })
                    .collect();
                eligible.sort_by_key(|n| n.id);
                prop_assert!(!eligible.is_empty());
                prop_assert_eq!(node, eligible[(req.balance % eligible.len() as u64) as usize].id);
            }
        }

        #[test]
        fn writes_only_go_to_a_healthy_primary(view in arb_view(), mut req in arb_req()) {
            req.read_only = false;
            match route(&req, &view) {
                Route::Node { node, role, reason } => {
                    prop_assert_eq!(role, Role::Primary);
                    prop_assert_eq!(reason, Reason::Write);
                    let n = view.node(node).unwrap();
                    prop_assert_eq!(n.role, Role::Primary);
                    prop_assert!(n.healthy);
                    prop_assert_eq!(view.primary.clone(), PrimaryState::One(node));
                }
                Route::Unavailable(_) => {}
                other => prop_assert!(false, "write got {:?}", other),
            }
        }

        #[test]
        fn check_replicas_is_well_formed(view in arb_view(), req in arb_req()) {
            if let Route::CheckReplicas { candidates, required_lsn, fallback } = route(&req, &view) {
                prop_assert!(!candidates.is_empty());
                prop_assert_eq!(Some(required_lsn), req.effective_required());
                let lsns: Vec<Lsn> = candidates.iter().map(|id| view.node(*id).unwrap().replay_lsn).collect();
                prop_assert!(lsns.windows(2).all(|w| w[0] >= w[1]));
                for id in &candidates {
                    let n = view.node(*id).unwrap();
                    prop_assert!(n.healthy && n.in_rotation && n.role == Role::Replica);
                    prop_assert!(n.replay_lsn < required_lsn);
                }
                if let Some(p) = fallback {
                    let n = view.node(p).unwrap();
                    prop_assert!(n.healthy && n.role == Role::Primary);
                }
            }
        }
    }
}
