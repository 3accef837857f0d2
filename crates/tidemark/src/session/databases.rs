//! Databases and roles dropped or renamed through tidemark (`DROP DATABASE`, `ALTER DATABASE …
//! RENAME`, `DROP ROLE`, `ALTER ROLE … RENAME`): tidemark's own idle server connections to
//! them would make PostgreSQL refuse the statement ("database is being accessed by other
//! users") or outlive a dropped role, so they are closed on every node first; tidemark's other
//! clients of a database count as the sessions PostgreSQL would see.

use super::*;

/// How long tidemark waits for its other clients of a database to leave and for its busy
/// server connections to it to come back — PostgreSQL's own wait for other sessions before it
/// refuses `DROP DATABASE` (`CountOtherDBBackends`: 5 s).
pub(super) const LEAVE_WAIT: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(10);

/// PostgreSQL's error for a database other sessions use (`errdetail_busy_db`).
pub(super) fn busy_database(name: &str, sessions: usize) -> ErrorFields {
    let detail = if sessions == 1 {
        "There is 1 other session using the database.".to_string()
    } else {
        format!("There are {sessions} other sessions using the database.")
    };
    ErrorFields::error(
        "55006",
        format!("database \"{name}\" is being accessed by other users"),
    )
    .with_detail(detail)
}

/// True when the unit runs its statement (a simple Query, or an Execute): a unit that only
/// prepares `DROP DATABASE` ends nobody's sessions.
pub(super) fn unit_executes(unit: &Unit) -> bool {
    unit.msgs.iter().any(|m| {
        matches!(
            m.msg,
            FrontendMessage::Query(_) | FrontendMessage::Execute { .. }
        )
    })
}

impl Session {
    /// Before a statement that drops or renames a database or role: for a database, waits up
    /// to [`LEAVE_WAIT`] for tidemark's other clients of it to leave (without `FORCE`: still
    /// there → PostgreSQL's 55006, the statement is not run), then closes every idle server
    /// connection to it on every node and waits (within the same bound) for busy ones to come
    /// back, closed. For roles, closes their pooled connections on every node (PostgreSQL lets
    /// other sessions of a dropped role go on; busy ones close when they come back).
    /// Returns the error to answer instead of running the statement.
    pub(super) async fn end_sessions_of(&mut self, target: &SessionsOf) -> Option<ErrorFields> {
        match target {
            SessionsOf::Database { name, force } => {
                let deadline = Instant::now() + LEAVE_WAIT;
                if !force {
                    loop {
                        let others = self.app.clients_in_database(name, self.pid).len();
                        if others == 0 {
                            break;
                        }
                        if Instant::now() >= deadline {
                            return Some(busy_database(name, others));
                        }
                        tokio::time::sleep(POLL).await;
                    }
                }
                let drained = self.app.pools.drain_where(|k| k.database == *name);
                for p in &drained {
                    tracing::info!(pool = %p.name, in_use = p.stats.in_use.load(Ordering::Relaxed), "pool closed before its database is dropped or renamed");
                }
                while drained
                    .iter()
                    .any(|p| p.stats.in_use.load(Ordering::Relaxed) > 0)
                    && Instant::now() < deadline
                {
                    tokio::time::sleep(POLL).await;
                }
                None
            }
            SessionsOf::Roles(names) => {
                let drained = self.app.pools.drain_where(|k| names.contains(&k.user));
                for p in &drained {
                    tracing::info!(pool = %p.name, in_use = p.stats.in_use.load(Ordering::Relaxed), "pool closed before its role is dropped or renamed");
                }
                None
            }
        }
    }

    /// After `DROP DATABASE … WITH (FORCE)` succeeded: tidemark's other clients of that
    /// database end as PostgreSQL ends the sessions it terminates (57P01).
    pub(super) fn terminate_clients_of(&self, database: &str) {
        for kill in self.app.clients_in_database(database, self.pid) {
            kill.raise(ClientSignal::KILL);
        }
    }
}
