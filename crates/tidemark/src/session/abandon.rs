//! A client that leaves with its server connection busy: cancel, drain and roll back within a bound, or close.

use super::*;

/// How long a connection a client abandoned mid-statement may take to become idle again
/// (cancel, drain, roll back) before it is closed instead.
pub(super) const ABANDON_DRAIN: Duration = Duration::from_secs(1);

/// Brings a connection whose client vanished back to idle: ends a COPY, syncs an open
/// extended unit, cancels a running statement (waiting until the server has the signal, so it
/// can never hit a later client's statement), reads everything owed, rolls back. False when
/// the connection cannot be reused.
pub(super) async fn recover_abandoned(conn: &mut crate::server::ServerConn) -> bool {
    use tidemark_wire::Phase;
    if conn.proto.phase() == Phase::Lost || conn.broken {
        return false;
    }
    let mut out = bytes::BytesMut::new();
    if conn.proto.in_copy() {
        out.extend_from_slice(&copy_fail("client disconnected"));
    }
    if conn.proto.unsynced() {
        out.extend_from_slice(fe::sync().raw());
    }
    if !out.is_empty() && conn.send(&out).await.is_err() {
        return false;
    }
    if conn.proto.owed() > 0 {
        let ep = conn.endpoint.clone();
        // Not confirmed: the cancel may still arrive, and hit the connection's next client.
        if !matches!(
            crate::server::cancel(&ep, conn.backend_pid, conn.backend_secret).await,
            Ok(true)
        ) {
            return false;
        }
        while conn.proto.owed() > 0 {
            if conn.recv().await.is_err() {
                return false;
            }
        }
    }
    if matches!(
        conn.proto.phase(),
        Phase::InTransaction | Phase::FailedTransaction
    ) && conn.simple_query("ROLLBACK").await.is_err()
    {
        return false;
    }
    conn.proto.is_idle()
}

/// A CopyFail message.
pub(super) fn copy_fail(why: &str) -> Vec<u8> {
    let mut v = vec![b'f'];
    v.extend_from_slice(&((why.len() + 5) as u32).to_be_bytes());
    v.extend_from_slice(why.as_bytes());
    v.push(0);
    v
}

impl Session {
    pub(super) async fn detach_close(&mut self) {
        let Some(mut att) = self.attached.take() else {
            return;
        };
        if self.pinned {
            // Session state (LISTEN, temp tables, ...) lives on it: close it.
            att.conn.conn.broken = true;
            return;
        }
        if !att.conn.conn.proto.is_idle() {
            // The client left while its statement ran, mid-COPY, mid-pipeline or inside a
            // transaction: cancel what runs, read what is owed and roll back, within a bound;
            // the pool only takes the connection back if that leaves it idle.
            let phase = att.conn.conn.proto.phase();
            let ok = tokio::time::timeout(ABANDON_DRAIN, recover_abandoned(&mut att.conn.conn))
                .await
                .unwrap_or(false);
            tracing::debug!(
                client = self.pid,
                ?phase,
                recovered = ok,
                "client left with its server connection busy"
            );
            if !ok {
                att.conn.conn.broken = true;
                return;
            }
        }
        att.conn.release();
    }
}
