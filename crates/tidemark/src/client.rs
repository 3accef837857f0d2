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

    /// Queues a ParameterStatus, encoded straight into the output buffer.
    pub fn push_parameter_status(&mut self, name: &str, value: &str) {
        tidemark_wire::backend::put_parameter_status(self.out_buf(), name, value);
    }

    pub fn push_raw(&mut self, b: &[u8]) {
        self.out_buf().extend_from_slice(b);
    }

    /// The output buffer, taken from the spare buffers when the client had none (idle
    /// clients hold no buffer).
    fn out_buf(&mut self) -> &mut BytesMut {
        if self.out.capacity() == 0 {
            self.out = buffers::take();
        }
        &mut self.out
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

    /// Writes what is pending without a future when the client's socket takes all of it at
    /// once (the end of nearly every unit): `true` when nothing is left for
    /// [`ClientIo::finish_flush`]. A socket that takes part or nothing keeps the rest pending.
    pub fn flush_now(&mut self) -> Result<bool, ClientError> {
        use bytes::Buf;
        use std::task::{Context, Poll, Waker};
        if self.out.is_empty() {
            return Ok(true);
        }
        // A no-op waker: when the socket is not ready, `flush` polls again with the task's.
        let mut cx = Context::from_waker(Waker::noop());
        if let Poll::Ready(r) = std::pin::Pin::new(&mut self.wr).poll_write(&mut cx, &self.out) {
            let n = r?;
            if n == 0 {
                return Err(ClientError::Io(std::io::ErrorKind::WriteZero.into()));
            }
            if n >= self.out.len() {
                // (Cleared, not advanced: the buffer keeps its whole capacity.)
                self.out.clear();
            } else {
                self.out.advance(n);
            }
        }
        if !self.out.is_empty() {
            return Ok(false);
        }
        // A TLS stream may keep records buffered until flushed (a no-op for TCP).
        match std::pin::Pin::new(&mut self.wr).poll_flush(&mut cx) {
            Poll::Ready(r) => r.map(|()| true).map_err(ClientError::Io),
            Poll::Pending => Ok(false),
        }
    }

    pub async fn flush(&mut self) -> Result<(), ClientError> {
        if !self.out.is_empty() {
            self.finish_flush().await?;
        }
        Ok(())
    }

    /// Writes what is pending and flushes the writer: [`ClientIo::flush`], and what is left
    /// after [`ClientIo::flush_now`] returned `false` (maybe only a TLS flush).
    pub async fn finish_flush(&mut self) -> Result<(), ClientError> {
        self.wr.write_all(&self.out).await?;
        // A TLS stream may keep records buffered until flushed (a no-op for TCP).
        self.wr.flush().await?;
        self.out.clear();
        Ok(())
    }

    /// Sends a frame right away.
    pub async fn send(&mut self, f: &Frame) -> Result<(), ClientError> {
        self.push(f);
        self.flush().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::Pin;
    use std::sync::{Arc, Mutex};
    use std::task::{Context, Poll};

    /// A writer that takes at most `take` bytes per call (0: not ready) and whose flush is
    /// pending `pending_flushes` times; what it took goes to `got`.
    struct Stingy {
        take: usize,
        pending_flushes: usize,
        got: Arc<Mutex<Vec<u8>>>,
    }

    impl AsyncWrite for Stingy {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            if self.take == 0 {
                // Ready on the next poll, as a socket that drained.
                self.take = 3;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            let n = buf.len().min(self.take);
            self.got.lock().unwrap().extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            if self.pending_flushes > 0 {
                self.pending_flushes -= 1;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn io(take: usize, pending_flushes: usize) -> (ClientIo, Arc<Mutex<Vec<u8>>>) {
        let got = Arc::new(Mutex::new(Vec::new()));
        let wr = Stingy {
            take,
            pending_flushes,
            got: got.clone(),
        };
        let rd = ClientRead::Other(Box::new(tokio::io::empty()));
        (
            ClientIo::new(rd, Box::new(wr), BytesMut::new(), 1 << 20),
            got,
        )
    }

    #[tokio::test]
    async fn flush_now_writes_what_the_socket_takes_and_leaves_the_rest_in_order() {
        // Everything at once.
        let (mut c, got) = io(usize::MAX, 0);
        c.push_raw(b"hello");
        assert!(c.flush_now().unwrap());
        assert_eq!(c.pending_out(), 0);
        assert_eq!(&*got.lock().unwrap(), b"hello");

        // Part of it: the rest stays pending, and `finish_flush` sends it after, in order.
        let (mut c, got) = io(2, 0);
        c.push_raw(b"abcdef");
        assert!(!c.flush_now().unwrap());
        assert_eq!(c.pending_out(), 4);
        c.push_raw(b"gh");
        c.finish_flush().await.unwrap();
        assert_eq!(&*got.lock().unwrap(), b"abcdefgh");
        assert_eq!(c.pending_out(), 0);

        // Not ready at all: nothing is lost.
        let (mut c, got) = io(0, 0);
        c.push_raw(b"xyz");
        assert!(!c.flush_now().unwrap());
        assert_eq!(c.pending_out(), 3);
        c.finish_flush().await.unwrap();
        assert_eq!(&*got.lock().unwrap(), b"xyz");

        // Written, but the writer's flush is pending (TLS records): not done until flushed.
        let (mut c, got) = io(usize::MAX, 1);
        c.push_raw(b"tls");
        assert!(!c.flush_now().unwrap());
        assert_eq!(c.pending_out(), 0);
        c.finish_flush().await.unwrap();
        assert_eq!(&*got.lock().unwrap(), b"tls");

        // Nothing pending: nothing to do.
        let (mut c, _) = io(0, 5);
        assert!(c.flush_now().unwrap());
    }
}
