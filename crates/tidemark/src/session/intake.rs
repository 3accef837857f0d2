//! Client input: the one place client frames are decoded (`next_unit`), a held server
//! connection's asynchronous messages and failures between units, shutdown and
//! `pg_terminate_backend` while idle, and collecting a routing unit (`next_unit`).

use super::*;

impl Session {
    /// Keeps a decoded message that ends the unit being collected for the next one.
    fn hold_for_next_unit(&mut self, m: ClientMessage) {
        debug_assert!(self.held.is_none());
        self.held = Some(m);
    }

    pub(super) async fn next_frame(&mut self) -> SResult<Option<Frame>> {
        if let Some(f) = self.pending.pop_front() {
            self.pending_bytes -= f.len();
            return Ok(Some(f));
        }
        loop {
            if let Some(f) = self.io.try_frame()? {
                return Ok(Some(f));
            }
            let idle = self.attached.is_none() && self.tx_status == TxStatus::Idle;
            // Between units a held server connection (open transaction, pinned session) is
            // idle: whatever it sends now (LISTEN notifications, notices, a FATAL on
            // timeout or termination) goes to the client at once.
            let watch_server = !self.unit_open;
            let io = &mut self.io;
            let server = self.attached.as_mut().map(|a| &mut a.conn.conn);
            enum Event {
                Client(Result<(), ClientError>),
                Server(Result<Frame, ServerError>),
                Shutdown,
                Killed,
            }
            let signal = &self.signal;
            let mask = if idle {
                ClientSignal::KILL | ClientSignal::SHUTDOWN
            } else {
                ClientSignal::KILL
            };
            // Biased: the order below is the priority, and an unbiased select draws a random
            // number on every poll (it showed in the per-statement profile).
            let ev = tokio::select! {
                biased;
                f = signal.wait(mask) => if f & ClientSignal::KILL != 0 {
                    Event::Killed
                } else {
                    Event::Shutdown
                },
                r = io.fill() => Event::Client(r),
                r = async {
                    match server {
                        Some(c) => c.recv().await,
                        None => std::future::pending().await,
                    }
                }, if watch_server => Event::Server(r),
            };
            match ev {
                Event::Client(r) => r?,
                Event::Killed => {
                    self.io.send(&terminated().to_error()).await?;
                    return Err(ClientError::Closed);
                }
                Event::Shutdown => {
                    let f = ErrorFields::fatal(
                        "57P01",
                        "terminating connection: tidemark is shutting down",
                    );
                    self.io.send(&f.to_error()).await?;
                    return Ok(None);
                }
                Event::Server(Ok(f)) if matches!(f.tag(), b'A' | b'N' | b'S') => {
                    if f.tag() == b'S' {
                        // The held connection's own record of its parameters.
                        if let (Ok((k, v)), Some(a)) =
                            (be::parse_parameter_status(&f), self.attached.as_mut())
                        {
                            upsert(&mut a.conn.conn.params, k, v);
                        }
                    }
                    let f = match &self.attached {
                        Some(a) if f.tag() == b'A' && !self.real_pid => {
                            own_notification(&f, a.conn.conn.backend_pid, self.pid)
                        }
                        _ => f,
                    };
                    self.io.send(&f).await?;
                }
                Event::Server(r) => {
                    // The held connection failed or ended (terminated backend,
                    // idle_in_transaction_session_timeout, crash): its transaction and session
                    // state are gone. As PostgreSQL does, the client's session ends with the
                    // server's FATAL (or 08006 when the server said nothing).
                    let mut e = match r {
                        Ok(f) => match ErrorFields::parse(&f) {
                            Ok(e) => e,
                            Err(_) => ErrorFields::error(
                                "08006",
                                "the server connection sent an unexpected message",
                            ),
                        },
                        Err(e) => {
                            ErrorFields::error("08006", format!("server connection lost: {e}"))
                        }
                    };
                    e.severity = "FATAL".into();
                    if let Some(mut a) = self.attached.take() {
                        a.conn.conn.broken = true;
                    }
                    tracing::warn!(client = self.pid, sqlstate = %e.code, message = %e.message, "held server connection ended between statements; ending the client session");
                    crate::metrics::error(&e.code);
                    self.io.send(&e.to_error()).await?;
                    return Err(ClientError::Closed);
                }
            }
        }
    }

    /// Collects the next routing unit.
    pub(super) async fn next_unit(&mut self) -> SResult<Option<Unit>> {
        let mut msgs: Vec<ClientMessage> = Vec::new();
        let mut bytes = 0;
        loop {
            // The next client message, decoded (the one place client messages are decoded:
            // malformed input ends this client only). Decoded here rather than returned by
            // an async helper: each message then moves once less (measured with callgrind).
            let m = match self.held.take() {
                Some(m) => m,
                None => match self.next_frame().await? {
                    Some(f) => ClientMessage::decode(f)?,
                    None => return Ok(None),
                },
            };
            bytes += m.frame.len();
            let end = match &m.msg {
                FrontendMessage::Terminate => {
                    if msgs.is_empty() {
                        return Ok(None);
                    }
                    // Run what came before, then stop.
                    self.hold_for_next_unit(m);
                    return Ok(Some(Unit {
                        msgs,
                        end: UnitEnd::Size,
                    }));
                }
                FrontendMessage::Query(_) | FrontendMessage::NonUtf8 { simple: true, .. }
                    if msgs.is_empty() =>
                {
                    Some(UnitEnd::Query)
                }
                FrontendMessage::FunctionCall if msgs.is_empty() => Some(UnitEnd::Func),
                FrontendMessage::Query(_)
                | FrontendMessage::NonUtf8 { simple: true, .. }
                | FrontendMessage::FunctionCall => {
                    // A simple query after unsynced extended messages: finish those first.
                    self.hold_for_next_unit(m);
                    return Ok(Some(Unit {
                        msgs,
                        end: UnitEnd::Size,
                    }));
                }
                FrontendMessage::Sync => Some(UnitEnd::Sync),
                FrontendMessage::Flush => Some(UnitEnd::Flush),
                FrontendMessage::Password => {
                    return Err(ClientError::Protocol(tidemark_wire::WireError::Malformed {
                        tag: 'p',
                        what: "password message outside authentication",
                    }))
                }
                _ => None,
            };
            if msgs.capacity() == 0 {
                // Taken only now: an idle client waiting in this loop holds no list.
                msgs = crate::recycled::take_spare(&super::UNIT_MSGS);
            }
            msgs.push(m);
            if let Some(end) = end {
                return Ok(Some(Unit { msgs, end }));
            }
            if bytes > MAX_UNIT_BYTES {
                return Ok(Some(Unit {
                    msgs,
                    end: UnitEnd::Size,
                }));
            }
        }
    }
}
