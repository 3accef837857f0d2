//! Prometheus metrics: names, labels and the recording helpers every other module calls.
//! Labels are bounded sets (class, target role, reason, node name, pool name, SQLSTATE) —
//! never a client, statement or key.

use std::time::Duration;

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// Installs the global recorder; returns the handle that renders `/metrics`.
pub fn install() -> Option<PrometheusHandle> {
    let b = PrometheusBuilder::new()
        .set_buckets(&[
            0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
            2.5, 5.0, 10.0,
        ])
        .ok()?;
    b.install_recorder().ok()
}

pub fn statement(class: &'static str, target: &'static str) {
    counter!("tidemark_statements_total", "class" => class, "target" => target).increment(1);
}

pub fn read_routed(target: &'static str, reason: &'static str) {
    counter!("tidemark_reads_total", "target" => target, "reason" => reason).increment(1);
}

pub fn fallback(reason: &'static str) {
    counter!("tidemark_fallbacks_total", "reason" => reason).increment(1);
}

pub fn lsn_wait(d: Duration, outcome: &'static str) {
    histogram!("tidemark_lsn_wait_seconds", "outcome" => outcome).record(d.as_secs_f64());
}

pub fn pool_wait(pool: &str, d: Duration) {
    histogram!("tidemark_pool_checkout_wait_seconds", "pool" => pool.to_string())
        .record(d.as_secs_f64());
}

pub fn error(sqlstate: &str) {
    counter!("tidemark_errors_total", "sqlstate" => sqlstate.to_string()).increment(1);
}

pub fn clients(delta: f64) {
    gauge!("tidemark_client_connections").increment(delta);
}

pub fn lsn_captured() {
    counter!("tidemark_commit_lsn_captures_total").increment(1);
}

pub fn replica_lag(node: &str, lag: Duration, bytes: u64) {
    gauge!("tidemark_replica_lag_seconds", "node" => node.to_string()).set(lag.as_secs_f64());
    gauge!("tidemark_replica_lag_bytes", "node" => node.to_string()).set(bytes as f64);
    histogram!("tidemark_replica_lag_seconds_histogram", "node" => node.to_string())
        .record(lag.as_secs_f64());
    histogram!("tidemark_replica_lag_bytes_histogram", "node" => node.to_string())
        .record(bytes as f64);
}

pub fn node_state(node: &str, role: &'static str, healthy: bool, in_rotation: bool) {
    for r in ["primary", "replica", "unknown"] {
        gauge!("tidemark_node_role", "node" => node.to_string(), "role" => r).set(if r == role {
            1.0
        } else {
            0.0
        });
    }
    gauge!("tidemark_node_healthy", "node" => node.to_string()).set(healthy as u8 as f64);
    gauge!("tidemark_node_in_rotation", "node" => node.to_string()).set(in_rotation as u8 as f64);
}

pub fn split_brain(active: bool) {
    gauge!("tidemark_split_brain").set(active as u8 as f64);
}
