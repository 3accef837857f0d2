//! Replication slots on the primary: how much WAL each one retains
//! (`pg_current_wal_lsn() - restart_lsn`), the disk-filling risk of a consumer that went
//! away. A small task polls the current primary with the monitor's credentials every
//! [`INTERVAL`] and publishes gauges and a snapshot for the status page.

use std::collections::BTreeSet;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use parking_lot::Mutex;
use tidemark_core::NodeId;
use tokio_postgres::{Client, SimpleQueryMessage};

use crate::app::App;

pub const INTERVAL: Duration = Duration::from_secs(5);

const SLOTS_SQL: &str = "SELECT slot_name::text, slot_type, active::text, \
     COALESCE(pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn), 0)::float8::text \
     FROM pg_replication_slots ORDER BY slot_name";

#[derive(Clone, Debug)]
pub struct SlotInfo {
    pub name: String,
    pub kind: String,
    pub active: bool,
    pub retained_bytes: f64,
}

fn latest() -> &'static Mutex<Vec<SlotInfo>> {
    static L: OnceLock<Mutex<Vec<SlotInfo>>> = OnceLock::new();
    L.get_or_init(|| Mutex::new(Vec::new()))
}

/// The slots seen at the last successful poll.
pub fn snapshot() -> Vec<SlotInfo> {
    latest().lock().clone()
}

/// Polls forever; waits for a known primary and reconnects when it changes or fails.
pub async fn run(app: Arc<App>) {
    let mut conn: Option<(NodeId, Client)> = None;
    let mut known: BTreeSet<String> = BTreeSet::new();
    loop {
        let primary = app.view.load().primary_id();
        let Some(p) = primary else {
            conn = None;
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        if conn.as_ref().is_none_or(|(n, c)| *n != p || c.is_closed()) {
            conn = match connect(&app, p).await {
                Ok(c) => Some((p, c)),
                Err(e) => {
                    tracing::debug!(error = %e, "replication slot poll: cannot connect to the primary");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
        }
        let Some((_, client)) = conn.as_ref() else {
            continue;
        };
        let timeout = app.config.load().monitor.timeout;
        match tokio::time::timeout(timeout, client.simple_query(SLOTS_SQL)).await {
            Ok(Ok(msgs)) => {
                let slots = parse(&msgs);
                let now: BTreeSet<String> = slots.iter().map(|s| s.name.clone()).collect();
                for s in &slots {
                    crate::metrics::replication_slot(&s.name, s.retained_bytes, s.active);
                }
                // A dropped slot retains nothing any more.
                for gone in known.difference(&now) {
                    crate::metrics::replication_slot(gone, 0.0, false);
                }
                known = now;
                *latest().lock() = slots;
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "replication slot poll failed");
                conn = None;
            }
            Err(_) => {
                tracing::debug!("replication slot poll timed out");
                conn = None;
            }
        }
        tokio::time::sleep(INTERVAL).await;
    }
}

async fn connect(app: &App, node: NodeId) -> anyhow::Result<Client> {
    app.monitor_client(node, "tidemark-slots").await
}

fn parse(msgs: &[SimpleQueryMessage]) -> Vec<SlotInfo> {
    msgs.iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(SlotInfo {
                name: r.get(0)?.to_string(),
                kind: r.get(1).unwrap_or("").to_string(),
                active: r.get(2) == Some("true"),
                retained_bytes: r.get(3).and_then(|v| v.parse().ok()).unwrap_or(0.0),
            }),
            _ => None,
        })
        .collect()
}
