//! A connection from tidemark to one PostgreSQL server: connecting, authenticating
//! (trust, cleartext, md5, SCRAM-SHA-256 via postgres-protocol's client side), reading and
//! writing frames, and running tidemark's own small internal queries on it.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use postgres_protocol::authentication::sasl::SCRAM_SHA_256;
use postgres_protocol::message::{backend, frontend as pgfe};
use tidemark_core::NodeId;
use tidemark_wire::backend::{
    data_row_values, parse_parameter_status, BackendMessage, ErrorFields,
};
use tidemark_wire::{Frame, FrameCodec, TxStatus};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::config::SslMode;
use crate::server_tls::{NodeTls, ServerStream};

/// A set of statement names (looked up for every Bind: foldhash, as the classification cache's
/// keys, rather than SipHash, which showed in the per-statement profile).
pub type Names = HashSet<String, foldhash::fast::RandomState>;

/// Where and as whom to connect.
#[derive(Clone, Debug)]
pub struct ServerTarget {
    pub node: NodeId,
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: Option<String>,
    pub database: String,
    /// The node's TLS settings (`server_tls`), shared by its connections.
    pub tls: Arc<NodeTls>,
    /// SCRAM pass-through (no password configured): the user's last ClientKey.
    pub keys: Option<std::sync::Arc<crate::passthrough::KeySlot>>,
}

/// What went wrong talking to a server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("connecting to {0} timed out")]
    ConnectTimeout(String),
    #[error("server connection lost: {0}")]
    Io(#[from] std::io::Error),
    #[error("server closed the connection")]
    Closed,
    /// TLS could not be set up as `server_tls.sslmode` asks (the message names the node).
    #[error("{0}")]
    Tls(String),
    #[error("protocol error from server: {0}")]
    Protocol(String),
    #[error("server authentication failed: {0}")]
    Auth(String),
    /// The server answered with an ErrorResponse.
    #[error("server error {}: {}", .0.code, .0.message)]
    Server(ErrorFields),
}

impl ServerError {
    /// SQLSTATE to give a client when this error ends its statement.
    pub fn sqlstate(&self) -> &str {
        match self {
            ServerError::Server(f) => &f.code,
            ServerError::Auth(_) => "28000",
            _ => "08006",
        }
    }
}

pub struct ServerConn {
    pub node: NodeId,
    stream: ServerStream,
    /// Where this connection goes and how (cancel requests reuse it).
    pub endpoint: Arc<NodeTls>,
    rbuf: BytesMut,
    codec: FrameCodec,
    /// ParameterStatus values reported at startup.
    pub params: Vec<(String, String)>,
    pub backend_pid: i32,
    pub backend_secret: i32,
    /// Statement names (tidemark's global names) prepared on this connection.
    pub prepared: Names,
    /// Hash of the session state (SETs) last applied; 0 = pristine.
    pub state_key: u64,
    pub created: crate::clock::Coarse,
    pub last_used: crate::clock::Coarse,
    /// Set when the connection must not go back to a pool.
    pub broken: bool,
    /// The server refused a statement of the last unit because its plan's result shape
    /// changed (0A000 from `RevalidateCachedQuery`): the session retires the unit's shared
    /// statement names (see `App::retire_shared_name`).
    pub stale_plan_seen: bool,
    /// What the server owes and whether it is idle, from every frame sent and received: a
    /// connection goes back to a pool only when this says idle (see `Pool::put_back`).
    pub proto: tidemark_wire::ServerState,
}

impl ServerConn {
    pub async fn connect(t: &ServerTarget, timeout: Duration) -> Result<ServerConn, ServerError> {
        let addr = format!("{}:{}", t.host, t.port);
        match tokio::time::timeout(timeout, Self::connect_inner(t)).await {
            Ok(r) => r,
            Err(_) => Err(ServerError::ConnectTimeout(addr)),
        }
    }

    async fn connect_inner(t: &ServerTarget) -> Result<ServerConn, ServerError> {
        let stream = t.tls.open().await?;
        let now = crate::clock::Coarse::now();
        let mut c = ServerConn {
            node: t.node,
            stream,
            endpoint: t.tls.clone(),
            rbuf: BytesMut::with_capacity(16 * 1024),
            codec: FrameCodec::new(1 << 30),
            params: Vec::new(),
            backend_pid: 0,
            backend_secret: 0,
            prepared: Names::default(),
            state_key: 0,
            created: now,
            last_used: now,
            broken: false,
            stale_plan_seen: false,
            proto: tidemark_wire::ServerState::default(),
        };
        let mut buf = BytesMut::new();
        pgfe::startup_message(
            [
                ("user", t.user.as_str()),
                ("database", t.database.as_str()),
                ("client_encoding", "UTF8"),
            ],
            &mut buf,
        )?;
        c.stream.write_all(&buf).await?;
        if let Err(e) = c.authenticate(t).await {
            return Err(c.explain_auth_error(e));
        }
        loop {
            let f = c.recv().await?;
            match f.backend() {
                BackendMessage::ParameterStatus => {
                    let kv = parse_parameter_status(&f)
                        .map_err(|e| ServerError::Protocol(e.to_string()))?;
                    c.params.push(kv);
                }
                BackendMessage::BackendKeyData => {
                    let (pid, secret) = tidemark_wire::backend::parse_backend_key_data(&f)
                        .map_err(|e| ServerError::Protocol(e.to_string()))?;
                    c.backend_pid = pid;
                    c.backend_secret = secret;
                }
                BackendMessage::ReadyForQuery => {
                    // The startup exchange is not part of what is owed.
                    c.proto = tidemark_wire::ServerState::default();
                    return Ok(c);
                }
                BackendMessage::ErrorResponse => return Err(server_error(&f)),
                BackendMessage::NoticeResponse => {}
                other => {
                    return Err(ServerError::Protocol(format!(
                        "unexpected message {other:?} during startup"
                    )))
                }
            }
        }
    }

    /// A pg_hba refusal of an unencrypted connection names the sslmode that caused it.
    fn explain_auth_error(&self, e: ServerError) -> ServerError {
        match e {
            ServerError::Auth(m) if !self.stream.is_tls() && m.contains("no encryption") => {
                let ep = &self.endpoint;
                let why = match ep.mode {
                    SslMode::Disable => "server_tls.sslmode is disable".to_string(),
                    mode => format!("the server did not offer TLS (server_tls.sslmode is {mode})"),
                };
                ServerError::Auth(format!(
                    "{m}: {} accepts only TLS connections but {why}",
                    ep.label()
                ))
            }
            e => e,
        }
    }

    /// True when this connection runs over TLS.
    pub fn is_tls(&self) -> bool {
        self.stream.is_tls()
    }

    async fn authenticate(&mut self, t: &ServerTarget) -> Result<(), ServerError> {
        let mut scram: Option<crate::passthrough::ServerScram> = None;
        loop {
            let f = self.recv().await?;
            if f.backend() == BackendMessage::ErrorResponse {
                return Err(match server_error(&f) {
                    ServerError::Server(e) => {
                        ServerError::Auth(format!("{} ({})", e.message, e.code))
                    }
                    other => other,
                });
            }
            let mut raw = BytesMut::from(&f.raw()[..]);
            let msg = backend::Message::parse(&mut raw)
                .map_err(|e| ServerError::Protocol(e.to_string()))?
                .ok_or_else(|| ServerError::Protocol("truncated authentication message".into()))?;
            let password = || {
                t.password.as_deref().ok_or_else(|| {
                    ServerError::Auth(format!(
                        "server {}:{} asks for a password for user '{}' but none is configured (set users.server_password){}",
                        t.host, t.port, t.user, crate::passthrough::needs_scram_hint(t)
                    ))
                })
            };
            let mut out = BytesMut::new();
            match msg {
                backend::Message::AuthenticationOk => return Ok(()),
                backend::Message::AuthenticationCleartextPassword => {
                    pgfe::password_message(password()?.as_bytes(), &mut out)?;
                }
                backend::Message::AuthenticationMd5Password(body) => {
                    let hash = postgres_protocol::authentication::md5_hash(
                        t.user.as_bytes(),
                        password()?.as_bytes(),
                        body.salt(),
                    );
                    pgfe::password_message(hash.as_bytes(), &mut out)?;
                }
                backend::Message::AuthenticationSasl(body) => {
                    let mut mechs = body.mechanisms();
                    let mut ok = false;
                    while let Some(m) = fallible_next(&mut mechs)? {
                        ok |= m == SCRAM_SHA_256;
                    }
                    if !ok {
                        return Err(ServerError::Auth(
                            "server offers no SASL mechanism tidemark supports".into(),
                        ));
                    }
                    let s = crate::passthrough::ServerScram::start(t, password)?;
                    pgfe::sasl_initial_response(SCRAM_SHA_256, s.message(), &mut out)?;
                    scram = Some(s);
                }
                backend::Message::AuthenticationSaslContinue(body) => {
                    let s = scram
                        .as_mut()
                        .ok_or_else(|| ServerError::Protocol("unexpected SASL continue".into()))?;
                    s.update(body.data())?;
                    pgfe::sasl_response(s.message(), &mut out)?;
                }
                backend::Message::AuthenticationSaslFinal(body) => {
                    let mut s = scram
                        .take()
                        .ok_or_else(|| ServerError::Protocol("unexpected SASL final".into()))?;
                    s.finish(body.data())?;
                    continue;
                }
                _ => {
                    return Err(ServerError::Auth(
                        "server asks for an authentication method tidemark does not support".into(),
                    ))
                }
            }
            self.stream.write_all(&out).await?;
        }
    }

    /// Reads one frame.
    pub async fn recv(&mut self) -> Result<Frame, ServerError> {
        loop {
            if let Some(f) = self.try_buffered()? {
                return Ok(f);
            }
            self.read_more().await?;
        }
    }

    /// The leading run of complete messages already buffered that `take` accepts (it sees
    /// each message's tag, in order, and stops the run by returning false), removed from the
    /// buffer and given to `sink` as one slice. Only headers are read: `take` must accept
    /// only messages the protocol state ignores (see [`Self::observe`]), never
    /// ReadyForQuery, ErrorResponse, CopyInResponse or CopyBothResponse.
    /// True when a run was taken.
    pub fn take_run(&mut self, mut take: impl FnMut(u8) -> bool, sink: impl FnOnce(&[u8])) -> bool {
        let mut n = 0;
        while let Some((tag, total)) = self.codec.peek(&self.rbuf[n..]) {
            if !take(tag) {
                break;
            }
            debug_assert!(!matches!(tag, b'Z' | b'E' | b'G' | b'W'));
            n += total;
        }
        if n == 0 {
            return false;
        }
        sink(&self.rbuf[..n]);
        self.rbuf.advance(n);
        true
    }

    /// The ReadyForQuery at the front of the buffer, taken as bytes (`sink`) without making a
    /// frame of it: its status, after the protocol state has seen it. `None` (and nothing
    /// taken) when the front is anything else, incomplete, or a ReadyForQuery with a status
    /// PostgreSQL never sends (the decoding path reports those).
    pub fn take_ready(&mut self, sink: impl FnOnce(&[u8])) -> Option<TxStatus> {
        const LEN: usize = 6;
        match self.codec.peek(&self.rbuf) {
            Some((b'Z', LEN)) => {}
            _ => return None,
        }
        let byte = self.rbuf[LEN - 1];
        let status = TxStatus::from_byte(byte)?;
        self.proto.received(BackendMessage::ReadyForQuery, byte);
        sink(&self.rbuf[..LEN]);
        self.rbuf.advance(LEN);
        Some(status)
    }

    /// Reads more bytes from the server into the buffer, decoding nothing (cancel-safe).
    pub async fn read_more(&mut self) -> Result<(), ServerError> {
        let n = match self.stream.read_buf(&mut self.rbuf).await {
            Ok(n) => n,
            Err(e) => {
                self.proto.set_lost();
                return Err(e.into());
            }
        };
        if n == 0 {
            self.proto.set_lost();
            return Err(ServerError::Closed);
        }
        Ok(())
    }

    /// Takes a frame that is already buffered, without reading.
    pub fn try_buffered(&mut self) -> Result<Option<Frame>, ServerError> {
        match self.codec.decode(&mut self.rbuf) {
            Ok(Some(f)) => {
                self.observe(&f);
                Ok(Some(f))
            }
            Ok(None) => Ok(None),
            Err(e) => {
                self.proto.set_lost();
                Err(ServerError::Protocol(e.to_string()))
            }
        }
    }

    /// Feeds a received frame to the protocol state.
    fn observe(&mut self, f: &Frame) {
        let kind = f.backend();
        let extra = match kind {
            BackendMessage::ReadyForQuery => tidemark_wire::backend::ready_status(f).unwrap_or(0),
            BackendMessage::ErrorResponse => match ErrorFields::parse(f) {
                Ok(e) if e.severity == "FATAL" || e.severity == "PANIC" => 1,
                Ok(_) => 0,
                Err(_) => 1,
            },
            _ => 0,
        };
        self.proto.received(kind, extra);
    }

    /// Writes whole frontend frames.
    pub async fn send(&mut self, bytes: &[u8]) -> Result<(), ServerError> {
        self.proto.sent(bytes);
        self.send_tail(bytes).await
    }

    /// [`ServerConn::send`] without a future for what the socket takes at once (a unit's
    /// bytes, nearly always all of them): returns how many it took, and the caller sends the
    /// rest with [`ServerConn::send_tail`]. The protocol state records all of `bytes` here.
    pub fn send_now(&mut self, bytes: &[u8]) -> Result<usize, ServerError> {
        self.proto.sent(bytes);
        self.stream.try_write_now(bytes).map_err(|e| {
            self.proto.set_lost();
            e.into()
        })
    }

    /// Writes bytes whose protocol state was already recorded (the rest after
    /// [`ServerConn::send_now`]).
    pub async fn send_tail(&mut self, bytes: &[u8]) -> Result<(), ServerError> {
        if let Err(e) = self.stream.write_all(bytes).await {
            self.proto.set_lost();
            return Err(e.into());
        }
        Ok(())
    }

    /// True when the connection may be given to another client: nothing owed, no
    /// transaction, nothing unread, not marked broken.
    pub fn reusable(&self) -> bool {
        !self.broken && self.proto.is_idle() && self.rbuf.is_empty()
    }

    /// True when the server sent something while the connection was idle (e.g. it is
    /// closing after `pg_terminate_backend`), or the socket is closed.
    pub fn has_unexpected_input(&mut self) -> bool {
        if !self.rbuf.is_empty() {
            return true;
        }
        self.stream.poll_unexpected(&mut self.rbuf)
    }

    /// Runs an internal simple query and returns the first column of each row, swallowing
    /// every response. Fails on an ErrorResponse (after reading up to ReadyForQuery).
    pub async fn simple_query(&mut self, sql: &str) -> Result<Vec<Option<String>>, ServerError> {
        let rows = self.simple_query_rows(sql).await?;
        Ok(rows
            .into_iter()
            .map(|r| r.into_iter().next().flatten())
            .collect())
    }

    /// Runs one simple query; every row's columns as text.
    pub async fn simple_query_rows(
        &mut self,
        sql: &str,
    ) -> Result<Vec<Vec<Option<String>>>, ServerError> {
        let q = tidemark_wire::frontend::query(sql);
        self.send(q.raw()).await?;
        let mut rows = Vec::new();
        let mut err = None;
        loop {
            let f = self.recv().await?;
            match f.backend() {
                BackendMessage::DataRow => rows
                    .push(data_row_values(&f).map_err(|e| ServerError::Protocol(e.to_string()))?),
                BackendMessage::ParameterStatus => {
                    if let Ok((k, v)) = parse_parameter_status(&f) {
                        match self.params.iter_mut().find(|(n, _)| *n == k) {
                            Some(e) => e.1 = v,
                            None => self.params.push((k, v)),
                        }
                    }
                }
                BackendMessage::ErrorResponse => err = Some(server_error(&f)),
                BackendMessage::ReadyForQuery => {
                    if tidemark_wire::backend::ready_status(&f) != Ok(b'I') {
                        self.broken = true;
                    }
                    return match err {
                        Some(e) => Err(e),
                        None => Ok(rows),
                    };
                }
                _ => {}
            }
        }
    }

    /// Bytes buffered from the server and not yet consumed.
    pub fn buffered(&self) -> usize {
        self.rbuf.len()
    }

    pub fn discard_buffer(&mut self) {
        self.rbuf.advance(self.rbuf.len());
    }

    pub async fn terminate(mut self) {
        let _ = self.stream.write_all(&[b'X', 0, 0, 0, 4]).await;
    }
}

fn fallible_next<'a>(
    it: &mut postgres_protocol::message::backend::SaslMechanisms<'a>,
) -> Result<Option<&'a str>, ServerError> {
    use fallible_iterator::FallibleIterator;
    it.next().map_err(|e| ServerError::Protocol(e.to_string()))
}

pub fn server_error(f: &Frame) -> ServerError {
    match ErrorFields::parse(f) {
        Ok(e) => ServerError::Server(e),
        Err(e) => ServerError::Protocol(e.to_string()),
    }
}

/// Sends a CancelRequest for a backend, over a new connection that negotiates TLS as the
/// node's `server_tls.sslmode` says (PostgreSQL accepts a cancel either way: pg_hba does not
/// apply to it, but `require` means nothing goes over the network in clear).
///
/// `Ok(true)` once the server has closed the cancel's connection (it has signalled the backend
/// by then), `Ok(false)` when it did not within 2 s (the cancel may still arrive).
pub async fn cancel(node: &NodeTls, pid: i32, secret: i32) -> Result<bool, ServerError> {
    let mut s = node.open().await?;
    let mut b = BytesMut::new();
    pgfe::cancel_request(pid, secret, &mut b);
    s.write_all(&b).await?;
    let mut sink = [0u8; 1];
    Ok(
        tokio::time::timeout(Duration::from_secs(2), s.read(&mut sink))
            .await
            .is_ok(),
    )
}
