//! Backend identity: `pg_terminate_backend`/`pg_cancel_backend` on the pids tidemark gives clients, and notifications carrying the client's own pid.

use super::*;

/// What a session ended by `pg_terminate_backend` is told, as PostgreSQL words it.
pub(super) fn terminated() -> ErrorFields {
    ErrorFields::fatal(
        "57P01",
        "terminating connection due to administrator command",
    )
}

/// A NotificationResponse sent by the client's own server backend carries the pid the client
/// was given (drivers compare it with their own to spot their own notifications).
pub(super) fn own_notification(f: &Frame, server_pid: i32, client_pid: i32) -> Frame {
    let body = f.body();
    if body.len() < 4 || i32::from_be_bytes([body[0], body[1], body[2], body[3]]) != server_pid {
        return f.clone();
    }
    let mut b = client_pid.to_be_bytes().to_vec();
    b.extend_from_slice(&body[4..]);
    Frame::new(b'A', &b)
}

impl Session {
    /// `SELECT pg_terminate_backend(pid)` / `pg_cancel_backend(pid)` where pid is one tidemark
    /// gave a client: acts on that client's session and answers like PostgreSQL (simple
    /// protocol, or a Parse/Bind/Describe/Execute/Sync unit). True when answered; any other
    /// pid goes to the server as usual.
    pub(super) async fn answer_backend_signal(&mut self, unit: &Unit) -> SResult<bool> {
        let mut sql: Option<&str> = None;
        let mut stmt: Option<Arc<Stmt>> = None;
        let mut bind: Option<&Frame> = None;
        let mut parse = false;
        let mut describe = false;
        for m in &unit.msgs {
            match &m.msg {
                FrontendMessage::Query(q) if unit.msgs.len() == 1 => sql = Some(q),
                FrontendMessage::Parse { query, .. } if !parse && bind.is_none() => {
                    parse = true;
                    sql = Some(query);
                }
                FrontendMessage::Bind { statement, .. } if bind.is_none() => {
                    if !parse {
                        stmt = if statement.is_empty() {
                            self.unnamed.clone()
                        } else {
                            self.statements.get(&**statement).cloned()
                        };
                    }
                    bind = Some(&m.frame);
                }
                FrontendMessage::Describe {
                    target: Target::Portal,
                    ..
                } if bind.is_some() && !describe => describe = true,
                FrontendMessage::Execute { .. } | FrontendMessage::Sync if bind.is_some() => {}
                _ => return Ok(false),
            }
        }
        let extended = bind.is_some();
        if extended && unit.end != UnitEnd::Sync {
            return Ok(false);
        }
        let text = sql.or(stmt.as_deref().map(|s| s.query.as_str()));
        let Some((kind, pid_ref)) = text.and_then(tidemark_sql::backend_signal) else {
            return Ok(false);
        };
        let values = match bind.map(fe::bind_values).transpose() {
            Ok(v) => v,
            Err(_) => return Ok(false),
        };
        let pid = match (pid_ref, &values) {
            (tidemark_sql::SignalPid::Literal(p), _) => Some(p),
            (tidemark_sql::SignalPid::Param(n), Some(v)) => v.int_param(n - 1),
            _ => None,
        };
        let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) else {
            return Ok(false);
        };
        let terminate = kind == tidemark_sql::BackendSignal::Terminate;
        let admin = self.app.config.load().admin_users.contains(&self.user);
        let result = self
            .app
            .signal_client(pid, terminate, &self.user, admin)
            .await;
        let column = if terminate {
            "pg_terminate_backend"
        } else {
            "pg_cancel_backend"
        };
        match result {
            crate::app::Signalled::NotOurs => return Ok(false),
            crate::app::Signalled::Denied => {
                let verb = if terminate { "terminate" } else { "cancel" };
                let e = ErrorFields::error("42501", format!("permission denied to {verb} process"))
                    .with_detail(format!("Only roles with privileges of the role whose process is being {verb}ed may {verb} this process (tidemark: the same user, or an admin user)."));
                self.send_error_ready(e, unit.end).await?;
                return Ok(true);
            }
            crate::app::Signalled::Done => {}
        }
        let format = values.as_ref().map(|v| v.result_format(0)).unwrap_or(0);
        if extended {
            if parse {
                self.io.push(&be::simple(be::PARSE_COMPLETE));
            }
            self.io.push(&be::simple(b'2'));
            if describe {
                self.io.push(&be::bool_row_description(column, format));
            }
        } else {
            self.io.push(&be::bool_row_description(column, 0));
        }
        self.io.push(&be::bool_data_row(true, format));
        self.io.push(&be::command_complete("SELECT 1"));
        self.io.push(&be::ready_for_query(self.tx_status.byte()));
        self.io.flush().await?;
        Ok(true)
    }
}
