//! Cluster view types: what the monitor knows about each node (role, health, replay LSN, lag,
//! rotation) and which node is the primary. The monitor publishes snapshots; sessions read them.

use std::time::Duration;

use crate::lsn::Lsn;

/// Index of a node in the configured node list.
pub type NodeId = usize;

/// What a node reported at its last poll.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Role {
    /// `pg_is_in_recovery() = false`.
    Primary,
    /// `pg_is_in_recovery() = true`.
    Replica,
    /// Not polled successfully yet.
    Unknown,
}

impl Role {
    /// Lower-case label for metrics and the admin console.
    pub fn as_str(&self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Replica => "replica",
            Role::Unknown => "unknown",
        }
    }
}

/// The monitor's knowledge of one node.
#[derive(Clone, Debug)]
pub struct NodeStatus {
    pub id: NodeId,
    pub name: String,
    pub role: Role,
    /// Reachable at last poll and not banned.
    pub healthy: bool,
    /// Lag gate state (replicas); primaries: true.
    pub in_rotation: bool,
    /// Replicas: last sampled `pg_last_wal_replay_lsn()`; primary: current insert LSN.
    pub replay_lsn: Lsn,
    pub lag_bytes: u64,
    /// Time lag (see [`crate::LagClock`]).
    pub lag: Duration,
    /// How the primary's `pg_stat_replication` lists this replica (`sync_state`); display only.
    pub sync_state: SyncState,
    /// Pid of the primary's walsender streaming to this replica, as last seen by the monitor
    /// (how a per-commit report of walsender positions is mapped to nodes).
    pub walsender_pid: Option<i32>,
    /// The primary lists this replica as a `sync` standby and its `synchronous_commit` default
    /// is `remote_apply`: writes committed under that setting are visible here when the commit
    /// returns. Shown to operators; routing does not trust it (the setting can differ per
    /// role, session and transaction), it trusts [`crate::Applied`], which is measured for
    /// each commit.
    pub synchronous_apply: bool,
    /// The current primary streams to this replica (it has a walsender for it, not in
    /// `startup`/`stopping`). A replica that is not streaming from the current primary — still
    /// pointed at a dead one, or left past the fork point of a promotion on the old timeline —
    /// can report a replay LSN that numerically covers commits it does not have (LSNs of two
    /// timelines are not comparable), so it serves no reads. The monitor sets it; `new` starts
    /// it true.
    pub follows_primary: bool,
}

/// `pg_stat_replication.sync_state` of a standby as the primary reports it.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Default)]
pub enum SyncState {
    /// Not listed by the primary (or not a replica).
    #[default]
    Unknown,
    Async,
    Potential,
    Sync,
    Quorum,
}

impl SyncState {
    /// Parses a `sync_state` value; anything else is `Unknown`.
    pub fn parse(s: &str) -> SyncState {
        match s {
            "async" => SyncState::Async,
            "potential" => SyncState::Potential,
            "sync" => SyncState::Sync,
            "quorum" => SyncState::Quorum,
            _ => SyncState::Unknown,
        }
    }

    /// Lower-case label for the admin console and metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            SyncState::Unknown => "-",
            SyncState::Async => "async",
            SyncState::Potential => "potential",
            SyncState::Sync => "sync",
            SyncState::Quorum => "quorum",
        }
    }
}

/// A small set of node ids (ids below 64; larger ids are never members).
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeSet(u64);

impl NodeSet {
    pub const EMPTY: NodeSet = NodeSet(0);

    pub fn insert(&mut self, id: NodeId) {
        if id < 64 {
            self.0 |= 1 << id;
        }
    }

    pub fn contains(&self, id: NodeId) -> bool {
        id < 64 && self.0 & (1 << id) != 0
    }

    pub fn is_empty(&self) -> bool {
        self.0 == 0
    }
}

impl FromIterator<NodeId> for NodeSet {
    fn from_iter<I: IntoIterator<Item = NodeId>>(iter: I) -> Self {
        let mut s = NodeSet::EMPTY;
        for id in iter {
            s.insert(id);
        }
        s
    }
}

impl NodeStatus {
    /// A node nothing is known about yet: unhealthy, role unknown.
    pub fn new(id: NodeId, name: impl Into<String>) -> Self {
        NodeStatus {
            id,
            name: name.into(),
            role: Role::Unknown,
            healthy: false,
            in_rotation: true,
            replay_lsn: Lsn::ZERO,
            lag_bytes: 0,
            lag: Duration::ZERO,
            sync_state: SyncState::Unknown,
            walsender_pid: None,
            synchronous_apply: false,
            follows_primary: true,
        }
    }

    /// Healthy and reporting `Role::Replica`.
    pub fn is_healthy_replica(&self) -> bool {
        self.healthy && self.role == Role::Replica
    }
}

/// Which node takes writes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum PrimaryState {
    /// No healthy node reports being a primary (or the configured one does not).
    #[default]
    Unknown,
    /// Exactly one primary.
    One(NodeId),
    /// Two or more healthy nodes report being primary: writes are refused.
    SplitBrain(Vec<NodeId>),
}

/// A snapshot of the cluster as published by the monitor.
#[derive(Clone, Debug, Default)]
pub struct ClusterView {
    pub nodes: Vec<NodeStatus>,
    pub primary: PrimaryState,
    pub primary_lsn: Lsn,
    /// Incremented by the monitor on every publish.
    pub generation: u64,
    /// The primary's current latency: an average of the monitor's round trips to it
    /// ([`crate::LatencyAverage`]); `None` before the first. The adaptive wait budget.
    pub primary_latency: Option<std::time::Duration>,
}

impl ClusterView {
    /// The replica whose walsender on the primary has this pid.
    pub fn node_by_walsender(&self, pid: i32) -> Option<NodeId> {
        self.nodes
            .iter()
            .find(|n| n.walsender_pid == Some(pid))
            .map(|n| n.id)
    }

    /// Some replica is a synchronous (or quorum) standby: per-commit reports are worth asking.
    pub fn has_synchronous_standby(&self) -> bool {
        self.nodes
            .iter()
            .any(|n| matches!(n.sync_state, SyncState::Sync | SyncState::Quorum))
    }

    /// The node with this id (looked up by `id`, not by position).
    pub fn node(&self, id: NodeId) -> Option<&NodeStatus> {
        match self.nodes.get(id) {
            Some(n) if n.id == id => Some(n),
            _ => self.nodes.iter().find(|n| n.id == id),
        }
    }

    /// The primary's id if exactly one primary is known.
    pub fn primary_id(&self) -> Option<NodeId> {
        match self.primary {
            PrimaryState::One(id) => Some(id),
            _ => None,
        }
    }

    /// Nodes reporting `Role::Replica` (healthy or not).
    pub fn replicas(&self) -> impl Iterator<Item = &NodeStatus> {
        self.nodes.iter().filter(|n| n.role == Role::Replica)
    }

    /// The lowest sampled replay LSN over healthy replicas; `None` if there are none.
    /// Anything at or below it has been replayed by every healthy replica.
    pub fn min_replica_replay_lsn(&self) -> Option<Lsn> {
        self.replicas()
            .filter(|n| n.healthy)
            .map(|n| n.replay_lsn)
            .min()
    }
}

/// Decide the primary from the roles reported: exactly one healthy `Role::Primary` => `One`;
/// two or more => `SplitBrain` (ids ascending); none => `Unknown`. If `configured` is `Some`, it
/// overrides discovery, but only if that node is healthy and reports `Primary` (never route
/// writes to a node in recovery); otherwise `Unknown`.
pub fn decide_primary(nodes: &[NodeStatus], configured: Option<NodeId>) -> PrimaryState {
    if let Some(id) = configured {
        return match nodes.iter().find(|n| n.id == id) {
            Some(n) if n.healthy && n.role == Role::Primary => PrimaryState::One(id),
            _ => PrimaryState::Unknown,
        };
    }
    let mut primaries: Vec<NodeId> = nodes
        .iter()
        .filter(|n| n.healthy && n.role == Role::Primary)
        .map(|n| n.id)
        .collect();
    primaries.sort_unstable();
    match primaries.len() {
        0 => PrimaryState::Unknown,
        1 => PrimaryState::One(primaries[0]),
        _ => PrimaryState::SplitBrain(primaries),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: NodeId, role: Role, healthy: bool, lsn: u64) -> NodeStatus {
        NodeStatus {
            role,
            healthy,
            replay_lsn: Lsn(lsn),
            ..NodeStatus::new(id, format!("n{id}"))
        }
    }

    #[test]
    fn decide_primary_discovery() {
        let nodes = vec![
            node(0, Role::Primary, true, 0),
            node(1, Role::Replica, true, 0),
            node(2, Role::Replica, true, 0),
        ];
        assert_eq!(decide_primary(&nodes, None), PrimaryState::One(0));

        let mut none = nodes.clone();
        none[0].healthy = false;
        assert_eq!(decide_primary(&none, None), PrimaryState::Unknown);

        let mut two = nodes.clone();
        two[2].role = Role::Primary;
        assert_eq!(
            decide_primary(&two, None),
            PrimaryState::SplitBrain(vec![0, 2])
        );

        // An unhealthy old primary does not cause split brain after promotion.
        let mut failover = nodes.clone();
        failover[0].healthy = false;
        failover[1].role = Role::Primary;
        assert_eq!(decide_primary(&failover, None), PrimaryState::One(1));
    }

    #[test]
    fn decide_primary_configured() {
        let nodes = vec![
            node(0, Role::Primary, true, 0),
            node(1, Role::Replica, true, 0),
            node(2, Role::Primary, true, 0),
        ];
        assert_eq!(decide_primary(&nodes, Some(0)), PrimaryState::One(0));
        assert_eq!(decide_primary(&nodes, Some(2)), PrimaryState::One(2));
        // Configured node in recovery: never route writes there.
        assert_eq!(decide_primary(&nodes, Some(1)), PrimaryState::Unknown);
        assert_eq!(decide_primary(&nodes, Some(9)), PrimaryState::Unknown);
        let mut down = nodes.clone();
        down[0].healthy = false;
        assert_eq!(decide_primary(&down, Some(0)), PrimaryState::Unknown);
    }

    #[test]
    fn view_helpers() {
        let view = ClusterView {
            nodes: vec![
                node(0, Role::Primary, true, 500),
                node(1, Role::Replica, true, 300),
                node(2, Role::Replica, true, 200),
                node(3, Role::Replica, false, 100),
            ],
            primary: PrimaryState::One(0),
            primary_lsn: Lsn(500),
            generation: 1,
            primary_latency: None,
        };
        assert_eq!(view.primary_id(), Some(0));
        assert_eq!(view.node(2).unwrap().name, "n2");
        assert!(view.node(7).is_none());
        assert_eq!(view.replicas().count(), 3);
        assert_eq!(view.min_replica_replay_lsn(), Some(Lsn(200)));
        assert_eq!(ClusterView::default().min_replica_replay_lsn(), None);
        assert_eq!(ClusterView::default().primary_id(), None);
    }
}
