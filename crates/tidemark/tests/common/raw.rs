//! A raw protocol client for tests that need what drivers hide: the BackendKeyData,
//! ParameterStatus messages, several statements in one extended-protocol unit, a connection
//! dropped mid-statement, mid-COPY or mid-pipeline. Messages are encoded with
//! `postgres_protocol` and decoded with `tidemark_wire`.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use postgres_protocol::message::frontend;
use tidemark_wire::{backend, Frame, FrameCodec};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub struct Raw {
    pub stream: TcpStream,
    buf: BytesMut,
    codec: FrameCodec,
    pub pid: i32,
    pub secret: i32,
    /// The login's answer up to and including ReadyForQuery: AuthenticationOk, the
    /// ParameterStatus messages, BackendKeyData.
    pub login: Vec<Msg>,
}

/// One backend message: its tag and body.
pub type Msg = (u8, Vec<u8>);

impl Raw {
    /// Connects with trust authentication and reads up to the first ReadyForQuery (kept in
    /// `login`).
    pub async fn connect(addr: SocketAddr, user: &str) -> Raw {
        let stream = TcpStream::connect(addr).await.expect("raw connect");
        let mut r = Raw {
            stream,
            buf: BytesMut::new(),
            codec: FrameCodec::default(),
            pid: 0,
            secret: 0,
            login: Vec::new(),
        };
        let mut b = BytesMut::new();
        frontend::startup_message([("user", user), ("database", "postgres")], &mut b)
            .expect("startup");
        r.send(&b).await;
        loop {
            let (tag, body) = r.recv().await.expect("login answer");
            match tag {
                b'R' => assert_eq!(
                    body[..],
                    [0, 0, 0, 0],
                    "trust login expected (AuthenticationOk)"
                ),
                b'K' => {
                    (r.pid, r.secret) = backend::parse_backend_key_data(&Frame::new(tag, &body))
                        .expect("BackendKeyData");
                }
                b'E' => panic!("login failed: {}", String::from_utf8_lossy(&body)),
                _ => {}
            }
            let done = tag == b'Z';
            r.login.push((tag, body));
            if done {
                return r;
            }
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("raw send");
    }

    /// The next message, or `None` when the connection closed.
    pub async fn recv(&mut self) -> Option<Msg> {
        loop {
            if let Some(f) = self.codec.decode(&mut self.buf).expect("backend framing") {
                return Some((f.tag(), f.body().to_vec()));
            }
            match self.stream.read_buf(&mut self.buf).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }

    /// `recv` with a deadline; `None` on timeout or close.
    pub async fn recv_within(&mut self, d: Duration) -> Option<Msg> {
        tokio::time::timeout(d, self.recv()).await.ok().flatten()
    }

    /// Messages up to and including ReadyForQuery (or up to the close).
    pub async fn until_ready(&mut self) -> Vec<Msg> {
        let mut out = Vec::new();
        while let Some(m) = self.recv().await {
            let done = m.0 == b'Z';
            out.push(m);
            if done {
                break;
            }
        }
        out
    }

    /// Messages up to and including ReadyForQuery, which must come within 10 s; panics on
    /// an ErrorResponse or a close.
    pub async fn until_ready_ok(&mut self) -> Vec<Msg> {
        let msgs = tokio::time::timeout(Duration::from_secs(10), self.until_ready())
            .await
            .expect("server answers within 10 s");
        if let Some((_, body)) = msgs.iter().find(|m| m.0 == b'E') {
            panic!("server error: {}", String::from_utf8_lossy(body));
        }
        assert!(
            msgs.last().is_some_and(|m| m.0 == b'Z'),
            "the connection closed before ReadyForQuery"
        );
        msgs
    }

    async fn send_query(&mut self, sql: &str) {
        let mut b = BytesMut::new();
        frontend::query(sql, &mut b).expect("query");
        self.send(&b).await;
    }

    /// A simple query; the answer up to ReadyForQuery, whatever it is.
    pub async fn query(&mut self, sql: &str) -> Vec<Msg> {
        self.send_query(sql).await;
        self.until_ready().await
    }

    /// A simple query that must succeed (see [`Raw::until_ready_ok`]).
    pub async fn query_ok(&mut self, sql: &str) -> Vec<Msg> {
        self.send_query(sql).await;
        self.until_ready_ok().await
    }

    /// Parse/Bind/Execute of every statement (no parameters), then one Sync: a single
    /// routing unit, one implicit transaction on the server. Must succeed.
    pub async fn extended_unit(&mut self, stmts: &[&str]) -> Vec<Msg> {
        let mut b = BytesMut::new();
        for sql in stmts {
            unnamed_statement(sql, false, &mut b);
        }
        frontend::sync(&mut b);
        self.send(&b).await;
        self.until_ready_ok().await
    }
}

/// Parse (unnamed), Bind (no parameters, text results), Describe portal and Execute of `sql`,
/// without a Sync: one statement of an extended-protocol unit or pipeline.
pub fn unnamed_statement(sql: &str, describe: bool, buf: &mut BytesMut) {
    parse_bind(sql, buf);
    if describe {
        frontend::describe(b'P', "", buf).expect("describe");
    }
    frontend::execute("", 0, buf).expect("execute");
}

/// Parse (unnamed) and Bind (no parameters, text results) of `sql` into the unnamed portal.
pub fn parse_bind(sql: &str, buf: &mut BytesMut) {
    frontend::parse("", sql, std::iter::empty(), buf).expect("parse");
    bind("", buf);
}

/// Bind (no parameters, text results) of `statement` into the unnamed portal.
pub fn bind(statement: &str, buf: &mut BytesMut) {
    frontend::bind(
        "",
        statement,
        std::iter::empty(),
        std::iter::empty::<()>(),
        |_, _| -> Result<postgres_protocol::IsNull, Box<dyn std::error::Error + Sync + Send>> {
            Ok(postgres_protocol::IsNull::Yes)
        },
        Some(0),
        buf,
    )
    .map_err(|_| ())
    .expect("bind");
}

/// The SQLSTATE of an ErrorResponse/NoticeResponse body.
pub fn sqlstate(body: &[u8]) -> String {
    field(body, b'C')
}

/// One field of an ErrorResponse/NoticeResponse body.
pub fn field(body: &[u8], code: u8) -> String {
    let mut i = 0;
    while i < body.len() && body[i] != 0 {
        let t = body[i];
        let end = body[i + 1..]
            .iter()
            .position(|&c| c == 0)
            .map(|p| i + 1 + p)
            .unwrap_or(body.len());
        if t == code {
            return String::from_utf8_lossy(&body[i + 1..end]).into_owned();
        }
        i = end + 1;
    }
    String::new()
}

/// The text values of the DataRows among `msgs`.
pub fn data_rows(msgs: &[Msg]) -> Vec<Vec<Option<String>>> {
    msgs.iter()
        .filter(|m| m.0 == b'D')
        .map(|(tag, body)| backend::data_row_values(&Frame::new(*tag, body)).expect("DataRow"))
        .collect()
}

/// The values of the ParameterStatus messages named `name` among `msgs`.
pub fn param_status(msgs: &[Msg], name: &str) -> Vec<String> {
    msgs.iter()
        .filter(|m| m.0 == b'S')
        .map(|(tag, body)| {
            backend::parse_parameter_status(&Frame::new(*tag, body)).expect("ParameterStatus")
        })
        .filter(|(k, _)| k == name)
        .map(|(_, v)| v)
        .collect()
}
