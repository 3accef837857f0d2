//! Framing: splitting a byte stream into tagged messages (`tag`, `i32` length, body).

use bytes::{Buf, Bytes, BytesMut};

use crate::WireError;

/// One protocol message: the whole encoded message (tag, length and body) in one buffer,
/// so it can be forwarded as is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    raw: Bytes,
}

impl Frame {
    /// Builds a frame from an already encoded message. The caller guarantees the encoding.
    pub fn from_encoded(raw: Bytes) -> Frame {
        debug_assert!(raw.len() >= 5);
        Frame { raw }
    }

    /// Encodes a message from its tag and body.
    pub fn new(tag: u8, body: &[u8]) -> Frame {
        let mut b = BytesMut::with_capacity(5 + body.len());
        b.extend_from_slice(&[tag]);
        b.extend_from_slice(&((body.len() as i32 + 4).to_be_bytes()));
        b.extend_from_slice(body);
        Frame { raw: b.freeze() }
    }

    pub fn tag(&self) -> u8 {
        self.raw[0]
    }

    /// The message body, without tag and length.
    pub fn body(&self) -> &[u8] {
        &self.raw[5..]
    }

    /// The whole encoded message.
    pub fn raw(&self) -> &Bytes {
        &self.raw
    }

    pub fn len(&self) -> usize {
        self.raw.len()
    }

    pub fn is_empty(&self) -> bool {
        false
    }
}

/// Incremental decoder for tagged messages, with a bound on the message size.
#[derive(Debug)]
pub struct FrameCodec {
    max_len: usize,
}

/// Default bound on one message: 1 GiB is PostgreSQL's own limit for a field; one
/// message above 256 MiB from a client is refused.
pub const DEFAULT_MAX_MESSAGE: usize = 256 * 1024 * 1024;

impl Default for FrameCodec {
    fn default() -> Self {
        FrameCodec {
            max_len: DEFAULT_MAX_MESSAGE,
        }
    }
}

/// The most a decode reserves ahead for a message still arriving.
const RESERVE_STEP: usize = 64 * 1024;

impl FrameCodec {
    pub fn new(max_len: usize) -> FrameCodec {
        FrameCodec { max_len }
    }

    /// Changes the largest message accepted (e.g. after login).
    pub fn set_max(&mut self, max_len: usize) {
        self.max_len = max_len;
    }

    /// The tag and total length (tag included) the header at the front of `buf` declares;
    /// `None` until the 5 header bytes are there. The one place a header is checked.
    #[inline]
    fn header(&self, buf: &[u8]) -> Result<Option<(u8, usize)>, WireError> {
        if buf.len() < 5 {
            return Ok(None);
        }
        let tag = buf[0];
        let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as i64;
        if len < 4 {
            return Err(WireError::BadLength {
                tag: tag as char,
                len,
            });
        }
        let total = len as usize + 1;
        if total > self.max_len {
            return Err(WireError::TooLarge {
                tag: tag as char,
                len: total,
                max: self.max_len,
            });
        }
        Ok(Some((tag, total)))
    }

    /// The tag and total length of the complete, valid message at the front of `buf` (only
    /// its header is read), or `None` when more bytes are needed or the header is one
    /// [`FrameCodec::decode`] rejects (it then reports the error).
    #[inline]
    pub fn peek(&self, buf: &[u8]) -> Option<(u8, usize)> {
        match self.header(buf) {
            Ok(Some((tag, total))) if buf.len() >= total => Some((tag, total)),
            _ => None,
        }
    }

    /// Takes one complete message off the front of `buf`, or `None` if more bytes are needed.
    pub fn decode(&self, buf: &mut BytesMut) -> Result<Option<Frame>, WireError> {
        let Some((_, total)) = self.header(buf)? else {
            return Ok(None);
        };
        if buf.len() < total {
            // Grow towards the declared length in steps, never reserving what has not
            // arrived (a peer may claim a large message and send nothing).
            buf.reserve((total - buf.len()).min(RESERVE_STEP));
            return Ok(None);
        }
        Ok(Some(Frame {
            raw: buf.split_to(total).freeze(),
        }))
    }
}

/// Reads a NUL-terminated UTF-8 string from the front of `buf`.
pub(crate) fn read_cstr<'a>(buf: &mut &'a [u8], tag: u8) -> Result<&'a str, WireError> {
    let bytes = read_cbytes(buf, tag)?;
    std::str::from_utf8(bytes).map_err(|_| WireError::NotUtf8 { tag: tag as char })
}

/// A NUL-terminated string as bytes (no UTF-8 check).
pub(crate) fn read_cbytes<'a>(buf: &mut &'a [u8], tag: u8) -> Result<&'a [u8], WireError> {
    let end = memchr::memchr(0, buf).ok_or(WireError::Malformed {
        tag: tag as char,
        what: "missing string terminator",
    })?;
    let s = &buf[..end];
    *buf = &buf[end + 1..];
    Ok(s)
}

pub(crate) fn read_i16(buf: &mut &[u8], tag: u8) -> Result<i16, WireError> {
    if buf.len() < 2 {
        return Err(WireError::Malformed {
            tag: tag as char,
            what: "truncated int16",
        });
    }
    Ok(buf.get_i16())
}

pub(crate) fn read_i32(buf: &mut &[u8], tag: u8) -> Result<i32, WireError> {
    if buf.len() < 4 {
        return Err(WireError::Malformed {
            tag: tag as char,
            what: "truncated int32",
        });
    }
    Ok(buf.get_i32())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_split_and_joined_messages() {
        let codec = FrameCodec::default();
        let a = Frame::new(b'Q', b"SELECT 1\0");
        let b = Frame::new(b'S', b"");
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&a.raw()[..3]);
        assert_eq!(codec.decode(&mut buf).unwrap(), None);
        buf.extend_from_slice(&a.raw()[3..]);
        buf.extend_from_slice(b.raw());
        assert_eq!(codec.decode(&mut buf).unwrap(), Some(a));
        assert_eq!(codec.decode(&mut buf).unwrap(), Some(b));
        assert!(buf.is_empty());
    }

    #[test]
    fn peek_agrees_with_decode() {
        let codec = FrameCodec::new(100);
        let a = Frame::new(b'D', b"abc");
        assert_eq!(codec.peek(a.raw()), Some((b'D', a.raw().len())));
        assert_eq!(codec.peek(&a.raw()[..a.raw().len() - 1]), None);
        assert_eq!(codec.peek(&[b'Q', 0, 0, 0, 2]), None);
        assert_eq!(codec.peek(&[b'Q', 0, 0, 1, 0]), None);
        assert_eq!(codec.peek(&[b'Q', 0xff, 0xff, 0xff, 0xff]), None);
        assert_eq!(codec.peek(&[b'Q', 0, 0]), None);
    }

    #[test]
    fn rejects_bad_lengths() {
        let codec = FrameCodec::new(100);
        let mut buf = BytesMut::from(&[b'Q', 0, 0, 0, 2][..]);
        assert!(matches!(
            codec.decode(&mut buf),
            Err(WireError::BadLength { .. })
        ));
        let mut buf = BytesMut::from(&[b'Q', 0, 0, 1, 0][..]);
        assert!(matches!(
            codec.decode(&mut buf),
            Err(WireError::TooLarge { .. })
        ));
        let mut buf = BytesMut::from(&[b'Q', 0xff, 0xff, 0xff, 0xff][..]);
        assert!(matches!(
            codec.decode(&mut buf),
            Err(WireError::BadLength { .. })
        ));
    }
}
