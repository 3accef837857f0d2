//! A raw protocol client for tests that need what drivers hide: the BackendKeyData, a
//! connection dropped mid-statement, mid-COPY or mid-pipeline.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub struct Raw {
    pub stream: TcpStream,
    buf: BytesMut,
    pub pid: i32,
    pub secret: i32,
}

/// One backend message: its tag and body.
pub type Msg = (u8, Vec<u8>);

impl Raw {
    /// Connects with trust authentication and reads up to the first ReadyForQuery.
    pub async fn connect(addr: SocketAddr, user: &str) -> Raw {
        let stream = TcpStream::connect(addr).await.expect("raw connect");
        let mut r = Raw {
            stream,
            buf: BytesMut::new(),
            pid: 0,
            secret: 0,
        };
        let mut b = BytesMut::new();
        frontend::startup_message([("user", user), ("database", "postgres")], &mut b)
            .expect("startup");
        r.send(&b).await;
        loop {
            let (tag, body) = r.recv().await.expect("login answer");
            match tag {
                b'K' => {
                    r.pid = i32::from_be_bytes(body[0..4].try_into().unwrap());
                    r.secret = i32::from_be_bytes(body[4..8].try_into().unwrap());
                }
                b'Z' => return r,
                b'E' => panic!("login failed: {}", String::from_utf8_lossy(&body)),
                _ => {}
            }
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("raw send");
    }

    /// The next message, or `None` when the connection closed.
    pub async fn recv(&mut self) -> Option<Msg> {
        loop {
            if self.buf.len() >= 5 {
                let len = u32::from_be_bytes(self.buf[1..5].try_into().unwrap()) as usize;
                if self.buf.len() > len {
                    let tag = self.buf[0];
                    self.buf.advance(5);
                    let body = self.buf.split_to(len - 4).to_vec();
                    return Some((tag, body));
                }
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

    pub async fn query(&mut self, sql: &str) -> Vec<Msg> {
        let mut b = BytesMut::new();
        frontend::query(sql, &mut b).expect("query");
        self.send(&b).await;
        self.until_ready().await
    }
}

/// Parse (unnamed), Bind (no parameters, text results), Describe portal and Execute of `sql`,
/// without a Sync: one statement of an extended-protocol unit or pipeline.
pub fn unnamed_statement(sql: &str, describe: bool, buf: &mut BytesMut) {
    frontend::parse("", sql, std::iter::empty(), buf).expect("parse");
    frontend::bind(
        "",
        "",
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
    if describe {
        frontend::describe(b'P', "", buf).expect("describe");
    }
    frontend::execute("", 0, buf).expect("execute");
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
        .map(|(_, body)| {
            let n = u16::from_be_bytes([body[0], body[1]]) as usize;
            let mut at = 2;
            let mut row = Vec::with_capacity(n);
            for _ in 0..n {
                let len = i32::from_be_bytes(body[at..at + 4].try_into().unwrap());
                at += 4;
                if len < 0 {
                    row.push(None);
                } else {
                    let l = len as usize;
                    row.push(Some(
                        String::from_utf8_lossy(&body[at..at + l]).into_owned(),
                    ));
                    at += l;
                }
            }
            row
        })
        .collect()
}
