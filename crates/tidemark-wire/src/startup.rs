//! The untagged first message of a connection: StartupMessage, SSLRequest,
//! GSSENCRequest or CancelRequest.

use bytes::{Buf, BytesMut};

use crate::WireError;

const SSL_REQUEST: i32 = 80877103;
const GSSENC_REQUEST: i32 = 80877104;
const CANCEL_REQUEST: i32 = 80877102;
const PROTOCOL_3_0: i32 = 196608;
/// PostgreSQL itself refuses startup packets over 10000 bytes.
const MAX_STARTUP: i64 = 10_000;

/// Startup parameters in the order the client sent them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StartupParams(pub Vec<(String, String)>);

impl StartupParams {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StartupPacket {
    Ssl,
    GssEnc,
    Cancel { pid: i32, secret: i32 },
    Startup(StartupParams),
}

impl StartupPacket {
    /// Takes one startup packet off `buf`, or `None` if more bytes are needed.
    pub fn decode(buf: &mut BytesMut) -> Result<Option<StartupPacket>, WireError> {
        if buf.len() < 4 {
            return Ok(None);
        }
        let len = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as i64;
        if !(8..=MAX_STARTUP).contains(&len) {
            return Err(WireError::BadStartup(len));
        }
        if (buf.len() as i64) < len {
            return Ok(None);
        }
        let packet = buf.split_to(len as usize);
        let mut body = &packet[4..];
        let code = body.get_i32();
        match code {
            SSL_REQUEST => Ok(Some(StartupPacket::Ssl)),
            GSSENC_REQUEST => Ok(Some(StartupPacket::GssEnc)),
            CANCEL_REQUEST => {
                if body.len() < 8 {
                    return Err(WireError::BadStartup(len));
                }
                let pid = body.get_i32();
                let secret = body.get_i32();
                Ok(Some(StartupPacket::Cancel { pid, secret }))
            }
            v if v >> 16 == 3 => {
                let _ = PROTOCOL_3_0;
                let mut params = Vec::new();
                loop {
                    let key = crate::frame::read_cstr(&mut body, 0)
                        .map_err(|_| WireError::BadStartup(len))?;
                    if key.is_empty() {
                        break;
                    }
                    let value = crate::frame::read_cstr(&mut body, 0)
                        .map_err(|_| WireError::BadStartup(len))?;
                    params.push((key.to_string(), value.to_string()));
                }
                Ok(Some(StartupPacket::Startup(StartupParams(params))))
            }
            v => Err(WireError::UnsupportedProtocol {
                major: (v >> 16) as u16,
                minor: (v & 0xffff) as u16,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(code: i32, rest: &[u8]) -> BytesMut {
        let mut b = BytesMut::new();
        b.extend_from_slice(&((8 + rest.len()) as i32).to_be_bytes());
        b.extend_from_slice(&code.to_be_bytes());
        b.extend_from_slice(rest);
        b
    }

    #[test]
    fn parses_startup_params() {
        let mut b = packet(PROTOCOL_3_0, b"user\0alice\0database\0app\0\0");
        let p = StartupPacket::decode(&mut b).unwrap().unwrap();
        let StartupPacket::Startup(params) = p else {
            panic!("not a startup")
        };
        assert_eq!(params.get("user"), Some("alice"));
        assert_eq!(params.get("database"), Some("app"));
    }

    #[test]
    fn ssl_cancel_and_garbage() {
        assert_eq!(
            StartupPacket::decode(&mut packet(SSL_REQUEST, b"")).unwrap(),
            Some(StartupPacket::Ssl)
        );
        let mut c = packet(CANCEL_REQUEST, &[0, 0, 0, 7, 0, 0, 0, 9]);
        assert_eq!(
            StartupPacket::decode(&mut c).unwrap(),
            Some(StartupPacket::Cancel { pid: 7, secret: 9 })
        );
        assert!(StartupPacket::decode(&mut packet(PROTOCOL_3_0, b"user\0al")).is_err());
        assert!(StartupPacket::decode(&mut packet(0x0002_0000, b"\0")).is_err());
        let mut huge = BytesMut::from(&[0x7f, 0, 0, 0][..]);
        assert!(StartupPacket::decode(&mut huge).is_err());
        let mut short = BytesMut::from(&[0, 0][..]);
        assert_eq!(StartupPacket::decode(&mut short).unwrap(), None);
    }
}
