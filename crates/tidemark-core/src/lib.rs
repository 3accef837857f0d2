//! tidemark-core: the pure routing core of tidemark — WAL positions (`Lsn`), consistency levels,
//! the cluster view, the routing decision, the lag gate, the time-lag clock and the key store.
//! No I/O, no threads, no clock reads: time is always passed in.

pub mod causal;
pub mod consistency;
pub mod gate;
pub mod keys;
pub mod lagclock;
pub mod lsn;
pub mod route;
pub mod view;
pub mod wait;

pub use causal::CausalFloor;
pub use consistency::{Consistency, ConsistencyParseError};
pub use gate::{GateConfig, LagGate};
pub use keys::{KeyStore, MemoryKeyStore};
pub use lagclock::LagClock;
pub use lsn::{Lsn, LsnParseError};
pub use route::{
    after_unreachable_replica, caught_up, fallback_after_wait, route, Applied, Reason, Route,
    RouteRequest, TargetHint, Unavailable,
};
pub use view::{
    decide_primary, ClusterView, NodeId, NodeSet, NodeStatus, PrimaryState, Role, SyncState,
};
pub use wait::{expected_catch_up, wait_budget, LatencyAverage, WaitPolicy};
