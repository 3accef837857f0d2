//! The client side of a session's socket: reading frames (bounded size) and buffering
//! what tidemark writes back, flushed in batches.

use std::cell::RefCell;

use bytes::BytesMut;
use tidemark_wire::{Frame, FrameCodec, WireError};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The read side of a client connection: a plain TCP read half (which can wait for readability
/// without a buffer), or anything else (one half of a TLS stream).
pub enum ClientRead {
    Tcp(tokio::net::tcp::OwnedReadHalf),
    Other(Box<dyn AsyncRead + Unpin + Send + Sync>),
}

/// Buffers of idle clients go back to a per-thread free list, so an idle client holds no
/// buffer (memory per idle client) while a busy one takes one without calling the allocator.
/// Written by hand: a free list of `BytesMut` of one size is a few lines, and the pooling
/// crates are built for objects shared across threads, which these are not.
mod buffers {
    use super::*;

    /// Size of a pooled buffer.
    pub const SIZE: usize = 8 * 1024;
    /// Buffers that grew past this (a large result) go back to the allocator instead.
    const MAX_POOLED: usize = 64 * 1024;
    /// Free buffers kept per thread.
    const KEEP: usize = 256;

    thread_local! {
        static FREE: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
    }

    pub fn take() -> BytesMut {
        FREE.with(|f| f.borrow_mut().pop())
            .unwrap_or_else(|| BytesMut::with_capacity(SIZE))
    }

    /// Returns an empty buffer to the free list (or to the allocator).
    pub fn give(mut b: BytesMut) {
        // Frames split off the front leave a read buffer shorter: it is pooled as it is (no
        // reserve here, which showed in the profile) until less than half is left.
        let cap = b.capacity();
        if !b.is_empty() || !(SIZE / 2..=MAX_POOLED).contains(&cap) {
            return;
        }
        b.clear();
        FREE.with(|f| {
            let mut f = f.borrow_mut();
            if f.len() < KEEP {
                f.push(b);
            }
        });
    }
}
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
            out: BytesMut::new(),
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

    /// Reads more bytes into the buffer (cancel-safe). A plain TCP client with nothing
    /// buffered in either direction waits for readability holding no buffer: its buffers go
    /// back to the thread's free list until bytes arrive (an idle client costs only its
    /// state).
    pub async fn fill(&mut self) -> Result<(), ClientError> {
        self.fill_with(true).await
    }

    /// [`ClientIo::fill`] while a unit runs: the buffers stay (the unit's answers are about to
    /// be queued in the write buffer; giving it back and taking one again showed in the
    /// per-statement profile). Between units the session waits with [`ClientIo::fill`].
    pub async fn fill_active(&mut self) -> Result<(), ClientError> {
        self.fill_with(false).await
    }

    async fn fill_with(&mut self, release: bool) -> Result<(), ClientError> {
        match &mut self.rd {
            ClientRead::Tcp(tcp) => {
                if release && self.rbuf.is_empty() && self.out.is_empty() {
                    buffers::give(std::mem::take(&mut self.rbuf));
                    buffers::give(std::mem::take(&mut self.out));
                }
                let rbuf = &mut self.rbuf;
                std::future::poll_fn(|cx| {
                    if rbuf.capacity() == rbuf.len() {
                        // Take a buffer only once there is something to read.
                        std::task::ready!(tcp.as_ref().poll_read_ready(cx))?;
                        if rbuf.capacity() == 0 {
                            *rbuf = buffers::take();
                        } else {
                            rbuf.reserve(buffers::SIZE);
                        }
                    }
                    // `poll_read` (not `try_read_buf`): a read shorter than the space offered
                    // clears the socket's readiness, so the next fill waits for epoll instead
                    // of first paying a `recvfrom` that returns EAGAIN (one per statement).
                    match std::task::ready!(tokio_util::io::poll_read_buf(
                        std::pin::Pin::new(&mut *tcp),
                        cx,
                        rbuf
                    )) {
                        Ok(0) => std::task::Poll::Ready(Err(ClientError::Closed)),
                        Ok(_) => std::task::Poll::Ready(Ok(())),
                        Err(e) => std::task::Poll::Ready(Err(e.into())),
                    }
                })
                .await
            }
            ClientRead::Other(rd) => {
                if self.rbuf.capacity() == self.rbuf.len() {
                    self.rbuf.reserve(buffers::SIZE);
                }
                let n = rd.read_buf(&mut self.rbuf).await?;
                if n == 0 {
                    return Err(ClientError::Closed);
                }
                Ok(())
            }
        }
    }

    /// Queues a frame for the client.
    pub fn push(&mut self, f: &Frame) {
        self.push_raw(f.raw());
    }

    pub fn push_raw(&mut self, b: &[u8]) {
        if self.out.capacity() == 0 {
            self.out = buffers::take();
        }
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
