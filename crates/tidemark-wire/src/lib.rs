//! PostgreSQL protocol v3 framing and the few typed messages tidemark must look at.
//!
//! The codec knows nothing about connections, pools or routing: it turns bytes into
//! [`Frame`]s (tag + body, kept as one contiguous buffer so a frame can be relayed
//! untouched) and gives borrowed, typed views of the frontend messages the proxy
//! inspects ([`frontend`]). [`backend`] builds the messages tidemark itself sends to
//! clients (errors, authentication, result sets of the admin console and `SHOW`).
//!
//! Everything a client or a server sends is untrusted: every parser returns a
//! [`WireError`] instead of panicking, and frame lengths are bounded.

pub mod backend;
pub mod frame;
pub mod frontend;
pub mod startup;
pub mod state;

pub use frame::{Frame, FrameCodec};
pub use startup::{StartupPacket, StartupParams};
pub use state::{Phase, ServerState, TxStatus};

/// A malformed or oversized protocol message.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("invalid message length {len} for message type '{tag}'")]
    BadLength { tag: char, len: i64 },
    #[error("message of type '{tag}' is {len} bytes, over the limit of {max} bytes")]
    TooLarge { tag: char, len: usize, max: usize },
    #[error("malformed '{tag}' message: {what}")]
    Malformed { tag: char, what: &'static str },
    #[error("unsupported protocol version {major}.{minor} (tidemark speaks 3.0)")]
    UnsupportedProtocol { major: u16, minor: u16 },
    #[error("startup packet of {0} bytes is invalid")]
    BadStartup(i64),
    #[error("invalid UTF-8 in '{tag}' message field")]
    NotUtf8 { tag: char },
}
