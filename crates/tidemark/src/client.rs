//! The client side of a session's socket: reading frames (bounded size) and buffering
//! what tidemark writes back, flushed in batches.

use bytes::BytesMut;
use tidemark_wire::{Frame, FrameCodec, WireError};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The read side of a client connection: a TCP read half, or one half of a TLS stream.
pub type ClientRead = Box<dyn AsyncRead + Unpin + Send + Sync>;
/// The write side of a client connection.
pub type ClientWrite = Box<dyn AsyncWrite + Unpin + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("client connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("client closed the connection")]
    Closed,
    #[error("invalid message from client: {0}")]
    Protocol(#[from] WireError),
}

pub struct ClientIo {
    rd: ClientRead,
    wr: ClientWrite,
    pub rbuf: BytesMut,
    codec: FrameCodec,
    out: BytesMut,
}

impl ClientIo {
    pub fn new(rd: ClientRead, wr: ClientWrite, rbuf: BytesMut, max_message: usize) -> ClientIo {
        ClientIo {
            rd,
            wr,
            rbuf,
            codec: FrameCodec::new(max_message),
            out: BytesMut::with_capacity(16 * 1024),
        }
    }

    /// Changes the largest message accepted from the client (raised after login).
    pub fn set_max_message(&mut self, max: usize) {
        self.codec.set_max(max);
    }

    /// A frame that is already buffered, if any.
    pub fn try_frame(&mut self) -> Result<Option<Frame>, ClientError> {
        Ok(self.codec.decode(&mut self.rbuf)?)
    }

    /// Reads the next frame, waiting for bytes if needed.
    pub async fn recv(&mut self) -> Result<Frame, ClientError> {
        loop {
            if let Some(f) = self.try_frame()? {
                return Ok(f);
            }
            self.fill().await?;
        }
    }

    /// Reads more bytes into the buffer (cancel-safe).
    pub async fn fill(&mut self) -> Result<(), ClientError> {
        let n = self.rd.read_buf(&mut self.rbuf).await?;
        if n == 0 {
            return Err(ClientError::Closed);
        }
        Ok(())
    }

    /// Queues a frame for the client.
    pub fn push(&mut self, f: &Frame) {
        self.out.extend_from_slice(f.raw());
    }

    pub fn push_raw(&mut self, b: &[u8]) {
        self.out.extend_from_slice(b);
    }

    /// Drops output queued after `mark` (a held-back replica response being retried).
    pub fn truncate_out(&mut self, mark: usize) {
        self.out.truncate(mark);
    }

    /// Takes a ReadyForQuery off the end of the queued output, if it is the last message.
    pub fn take_trailing_ready(&mut self) -> Option<Frame> {
        let n = self.out.len();
        if n >= 6 && self.out[n - 6] == b'Z' && self.out[n - 5..n - 1] == [0, 0, 0, 5] {
            let z = self.out.split_off(n - 6).freeze();
            return Some(Frame::from_encoded(z));
        }
        None
    }

    pub fn pending_out(&self) -> usize {
        self.out.len()
    }

    pub async fn flush(&mut self) -> Result<(), ClientError> {
        if !self.out.is_empty() {
            self.wr.write_all(&self.out).await?;
            // A TLS stream may keep records buffered until flushed (a no-op for TCP).
            self.wr.flush().await?;
            self.out.clear();
        }
        Ok(())
    }

    /// Sends a frame right away.
    pub async fn send(&mut self, f: &Frame) -> Result<(), ClientError> {
        self.push(f);
        self.flush().await
    }
}
