//! Borrowed, typed views of the frontend (client → server) messages tidemark inspects.
//! Anything else is relayed as an opaque [`Frame`].

use crate::frame::{read_cbytes, read_cstr, read_i16, read_i32, Frame};
use crate::WireError;
use bytes::{BufMut, BytesMut};

/// UTF-8 text that shares the frame's buffer: decoding a message copies no strings.
pub type Text = bytestring::ByteString;

/// What a Describe or Close message names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Statement,
    Portal,
}

impl Target {
    pub fn byte(self) -> u8 {
        match self {
            Target::Statement => b'S',
            Target::Portal => b'P',
        }
    }
}

/// A Parse message's parameter types: inline up to four (statements seldom declare more), so
/// decoding a Parse allocates nothing.
pub type ParamTypes = smallvec::SmallVec<[u32; 4]>;

/// A decoded frontend message. Its strings share the frame's buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrontendMessage {
    Query(Text),
    Parse {
        name: Text,
        query: Text,
        param_types: ParamTypes,
    },
    Bind {
        portal: Text,
        statement: Text,
    },
    Describe {
        target: Target,
        name: Text,
    },
    Execute {
        portal: Text,
        max_rows: i32,
    },
    Close {
        target: Target,
        name: Text,
    },
    Sync,
    Flush,
    Terminate,
    CopyData,
    CopyDone,
    CopyFail,
    /// PasswordMessage / SASLInitialResponse / SASLResponse (all tagged 'p').
    Password,
    FunctionCall,
    /// A Query (`simple`) or Parse (with its statement `name`) whose statement text is not
    /// UTF-8: the client set a non-UTF-8 `client_encoding`. Its bytes are relayed untouched;
    /// it cannot be classified.
    NonUtf8 {
        simple: bool,
        name: Text,
        param_types: ParamTypes,
    },
}

/// A client message decoded once, at intake: the frame as received (relayed untouched when
/// nothing must change) and its typed form, which every later step reads.
#[derive(Debug, Clone)]
pub struct ClientMessage {
    pub frame: Frame,
    pub msg: FrontendMessage,
}

impl ClientMessage {
    pub fn decode(frame: Frame) -> Result<ClientMessage, WireError> {
        let msg = FrontendMessage::parse(&frame)?;
        Ok(ClientMessage { frame, msg })
    }
}

/// A NUL-terminated UTF-8 string of `frame`, sharing its buffer.
fn read_text(frame: &Frame, b: &mut &[u8], tag: u8) -> Result<Text, WireError> {
    // The empty name of the unnamed statement or portal (most names an extended unit
    // carries): no search for its terminator, no check, no share of the buffer.
    if let [0, rest @ ..] = *b {
        *b = rest;
        return Ok(Text::new());
    }
    let bytes = read_cbytes(b, tag)?;
    Text::try_from(frame.raw().slice_ref(bytes))
        .map_err(|_| WireError::NotUtf8 { tag: tag as char })
}

impl FrontendMessage {
    pub fn parse(frame: &Frame) -> Result<FrontendMessage, WireError> {
        let tag = frame.tag();
        let mut b = frame.body();
        let msg = match tag {
            b'Q' => match read_text(frame, &mut b, tag) {
                Ok(sql) => FrontendMessage::Query(sql),
                Err(WireError::NotUtf8 { .. }) => FrontendMessage::NonUtf8 {
                    simple: true,
                    name: Text::new(),
                    param_types: ParamTypes::new(),
                },
                Err(e) => return Err(e),
            },
            b'P' => {
                let name = read_text(frame, &mut b, tag)?;
                let query = match read_text(frame, &mut b, tag) {
                    Ok(q) => Some(q),
                    Err(WireError::NotUtf8 { .. }) => None,
                    Err(e) => return Err(e),
                };
                let n = read_i16(&mut b, tag)?;
                if n < 0 || b.len() < n as usize * 4 {
                    return Err(WireError::Malformed {
                        tag: 'P',
                        what: "bad parameter type count",
                    });
                }
                let mut param_types = ParamTypes::with_capacity(n as usize);
                for _ in 0..n {
                    param_types.push(read_i32(&mut b, tag)? as u32);
                }
                match query {
                    Some(query) => FrontendMessage::Parse {
                        name,
                        query,
                        param_types,
                    },
                    None => FrontendMessage::NonUtf8 {
                        simple: false,
                        name,
                        param_types,
                    },
                }
            }
            b'B' => {
                let portal = read_text(frame, &mut b, tag)?;
                let statement = read_text(frame, &mut b, tag)?;
                FrontendMessage::Bind { portal, statement }
            }
            b'D' | b'C' => {
                let target = match b.first() {
                    Some(b'S') => Target::Statement,
                    Some(b'P') => Target::Portal,
                    Some(_) => {
                        return Err(WireError::Malformed {
                            tag: tag as char,
                            what: "kind must be 'S' or 'P'",
                        })
                    }
                    None => {
                        return Err(WireError::Malformed {
                            tag: tag as char,
                            what: "missing kind byte",
                        })
                    }
                };
                b = &b[1..];
                let name = read_text(frame, &mut b, tag)?;
                if tag == b'D' {
                    FrontendMessage::Describe { target, name }
                } else {
                    FrontendMessage::Close { target, name }
                }
            }
            b'E' => {
                let portal = read_text(frame, &mut b, tag)?;
                let max_rows = read_i32(&mut b, tag)?;
                FrontendMessage::Execute { portal, max_rows }
            }
            b'S' => FrontendMessage::Sync,
            b'H' => FrontendMessage::Flush,
            b'X' => FrontendMessage::Terminate,
            b'd' => FrontendMessage::CopyData,
            b'c' => FrontendMessage::CopyDone,
            b'f' => FrontendMessage::CopyFail,
            b'p' => FrontendMessage::Password,
            b'F' => FrontendMessage::FunctionCall,
            other => {
                return Err(WireError::Malformed {
                    tag: other as char,
                    what: "unknown frontend message type",
                })
            }
        };
        Ok(msg)
    }

    /// A Parse message (UTF-8 or not) and the statement name it defines.
    pub fn parse_name(&self) -> Option<&str> {
        match self {
            FrontendMessage::Parse { name, .. }
            | FrontendMessage::NonUtf8 {
                simple: false,
                name,
                ..
            } => Some(name),
            _ => None,
        }
    }
}

/// The statement text of a Parse frame, as bytes (whatever the client encoding).
pub fn parse_query_bytes(frame: &Frame) -> Result<&[u8], WireError> {
    let mut b = frame.body();
    read_cbytes(&mut b, b'P')?;
    read_cbytes(&mut b, b'P')
}

/// A Parse message whose statement text is given as bytes (any client encoding).
pub fn parse_bytes(name: &str, query: &[u8], param_types: &[u32]) -> Frame {
    let mut b = BytesMut::with_capacity(name.len() + query.len() + 8 + param_types.len() * 4);
    put_cstr(&mut b, name);
    b.extend_from_slice(query);
    b.put_u8(0);
    b.put_i16(param_types.len() as i16);
    for t in param_types {
        b.put_u32(*t);
    }
    Frame::new(b'P', &b)
}

/// Encodes a Parse message.
pub fn parse(name: &str, query: &str, param_types: &[u32]) -> Frame {
    let mut b = BytesMut::with_capacity(name.len() + query.len() + 8 + param_types.len() * 4);
    put_cstr(&mut b, name);
    put_cstr(&mut b, query);
    b.put_i16(param_types.len() as i16);
    for t in param_types {
        b.put_u32(*t);
    }
    Frame::new(b'P', &b)
}

/// Encodes a simple Query message.
pub fn query(sql: &str) -> Frame {
    let mut b = BytesMut::with_capacity(sql.len() + 1);
    put_cstr(&mut b, sql);
    Frame::new(b'Q', &b)
}

/// Encodes Describe/Close of a statement or portal.
pub fn describe_or_close(tag: u8, target: Target, name: &str) -> Frame {
    let mut b = BytesMut::with_capacity(name.len() + 2);
    b.put_u8(target.byte());
    put_cstr(&mut b, name);
    Frame::new(tag, &b)
}

pub fn sync() -> Frame {
    Frame::new(b'S', b"")
}

/// Encodes a Bind of `statement` to `portal` with no parameters, results in text.
pub fn bind(portal: &str, statement: &str) -> Frame {
    let mut b = BytesMut::with_capacity(portal.len() + statement.len() + 8);
    put_cstr(&mut b, portal);
    put_cstr(&mut b, statement);
    // No parameter formats, no parameters, no result formats (all text).
    b.put_i16(0);
    b.put_i16(0);
    b.put_i16(0);
    Frame::new(b'B', &b)
}

/// Encodes an Execute of `portal` (`max_rows` 0: all rows).
pub fn execute(portal: &str, max_rows: i32) -> Frame {
    let mut b = BytesMut::with_capacity(portal.len() + 5);
    put_cstr(&mut b, portal);
    b.put_i32(max_rows);
    Frame::new(b'E', &b)
}

/// Returns a copy of a Bind frame with its statement name replaced.
pub fn rename_bind(frame: &Frame, new_statement: &str) -> Result<Frame, WireError> {
    let mut b = BytesMut::with_capacity(frame.len() + new_statement.len() + 1);
    put_renamed_bind(&mut b, frame, new_statement)?;
    Ok(Frame::from_encoded(b.freeze()))
}

/// [`rename_bind`] written straight into `out` (the unit's outgoing bytes): no frame of its
/// own, no second copy.
pub fn put_renamed_bind(
    out: &mut BytesMut,
    frame: &Frame,
    new_statement: &str,
) -> Result<(), WireError> {
    let mut rest = frame.body();
    let portal = read_cstr(&mut rest, b'B')?;
    let _old = read_cstr(&mut rest, b'B')?;
    let len = 4 + portal.len() + 1 + new_statement.len() + 1 + rest.len();
    let len = i32::try_from(len).map_err(|_| WireError::Malformed {
        tag: 'B',
        what: "message too long after renaming its statement",
    })?;
    out.reserve(1 + len as usize);
    out.put_u8(b'B');
    out.put_i32(len);
    put_cstr(out, portal);
    put_cstr(out, new_statement);
    out.extend_from_slice(rest);
    Ok(())
}

pub(crate) fn put_cstr(b: &mut BytesMut, s: &str) {
    b.extend_from_slice(s.as_bytes());
    b.put_u8(0);
}

/// What a Bind message carries besides its names.
#[derive(Debug, PartialEq, Eq)]
pub struct BindValues<'a> {
    /// Format code of each parameter (0 text, 1 binary), expanded to one per parameter.
    pub param_formats: Vec<i16>,
    pub params: Vec<Option<&'a [u8]>>,
    /// Result-column format codes as sent (none: all text; one: for every column).
    pub result_formats: Vec<i16>,
}

impl BindValues<'_> {
    /// The format of result column `i`.
    pub fn result_format(&self, i: usize) -> i16 {
        match self.result_formats.as_slice() {
            [] => 0,
            [one] => *one,
            many => many.get(i).copied().unwrap_or(0),
        }
    }

    /// Parameter `i` (0-based) as an integer, text or binary int2/int4/int8.
    pub fn int_param(&self, i: usize) -> Option<i64> {
        let v = (*self.params.get(i)?)?;
        match self.param_formats.get(i).copied().unwrap_or(0) {
            0 => std::str::from_utf8(v).ok()?.trim().parse().ok(),
            1 => match v.len() {
                2 => Some(i64::from(i16::from_be_bytes([v[0], v[1]]))),
                4 => Some(i64::from(i32::from_be_bytes([v[0], v[1], v[2], v[3]]))),
                8 => Some(i64::from_be_bytes(v.try_into().ok()?)),
                _ => None,
            },
            _ => None,
        }
    }
}

/// Decodes a Bind message's parameter values and format codes.
pub fn bind_values(frame: &Frame) -> Result<BindValues<'_>, WireError> {
    let bad = |what| WireError::Malformed { tag: 'B', what };
    let mut b = frame.body();
    read_cstr(&mut b, b'B')?;
    read_cstr(&mut b, b'B')?;
    let nf = read_i16(&mut b, b'B')?;
    let mut formats = Vec::new();
    for _ in 0..nf.max(0) {
        formats.push(read_i16(&mut b, b'B')?);
    }
    let np = read_i16(&mut b, b'B')?.max(0) as usize;
    let param_formats = match formats.as_slice() {
        [] => vec![0; np],
        [one] => vec![*one; np],
        many if many.len() == np => many.to_vec(),
        _ => return Err(bad("parameter format count mismatch")),
    };
    let mut params = Vec::with_capacity(np);
    for _ in 0..np {
        let len = read_i32(&mut b, b'B')?;
        if len < 0 {
            params.push(None);
        } else {
            let l = len as usize;
            if b.len() < l {
                return Err(bad("parameter value past the end"));
            }
            params.push(Some(&b[..l]));
            b = &b[l..];
        }
    }
    let nr = read_i16(&mut b, b'B')?;
    let mut result_formats = Vec::new();
    for _ in 0..nr.max(0) {
        result_formats.push(read_i16(&mut b, b'B')?);
    }
    Ok(BindValues {
        param_formats,
        params,
        result_formats,
    })
}

#[cfg(test)]
mod tests {

    #[test]
    fn statement_text_in_another_encoding_is_kept_as_bytes() {
        // 'café' in LATIN9: not UTF-8.
        let mut body = b"select 'caf\xe9'".to_vec();
        body.push(0);
        let q = Frame::new(b'Q', &body);
        assert!(matches!(
            FrontendMessage::parse(&q),
            Ok(FrontendMessage::NonUtf8 { simple: true, ref name, .. }) if name.is_empty()
        ));
        let p = parse_bytes("s1", b"select '\xe9'", &[25]);
        match FrontendMessage::parse(&p) {
            Ok(FrontendMessage::NonUtf8 {
                simple: false,
                name,
                param_types,
            }) if name == "s1" => assert_eq!(&param_types[..], &[25]),
            other => panic!("{other:?}"),
        }
        assert_eq!(parse_query_bytes(&p).unwrap(), b"select '\xe9'");
        // UTF-8 text still parses as text.
        let p = parse("s2", "select 'é'", &[]);
        assert!(matches!(
            FrontendMessage::parse(&p),
            Ok(FrontendMessage::Parse { ref query, .. }) if query == "select 'é'"
        ));
    }

    use super::*;

    #[test]
    fn parse_round_trip() {
        let f = parse("s1", "SELECT $1", &[23]);
        assert_eq!(
            FrontendMessage::parse(&f).unwrap(),
            FrontendMessage::Parse {
                name: "s1".into(),
                query: "SELECT $1".into(),
                param_types: ParamTypes::from_slice(&[23])
            }
        );
    }

    #[test]
    fn bind_and_execute_round_trip() {
        assert_eq!(
            FrontendMessage::parse(&bind("", "tm_x")).unwrap(),
            FrontendMessage::Bind {
                portal: "".into(),
                statement: "tm_x".into()
            }
        );
        let b = bind("p", "s");
        let v = bind_values(&b).unwrap();
        assert!(v.params.is_empty() && v.param_formats.is_empty() && v.result_formats.is_empty());
        assert_eq!(
            FrontendMessage::parse(&execute("", 0)).unwrap(),
            FrontendMessage::Execute {
                portal: "".into(),
                max_rows: 0
            }
        );
    }

    #[test]
    fn bind_rename_keeps_parameters() {
        let mut body = BytesMut::new();
        put_cstr(&mut body, "");
        put_cstr(&mut body, "s1");
        body.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 1, b'7', 0, 0]);
        let f = Frame::new(b'B', &body);
        let r = rename_bind(&f, "tm_abc").unwrap();
        assert_eq!(
            FrontendMessage::parse(&r).unwrap(),
            FrontendMessage::Bind {
                portal: "".into(),
                statement: "tm_abc".into()
            }
        );
        assert!(r.body().ends_with(&[0, 0, 0, 1, 0, 0, 0, 1, b'7', 0, 0]));
    }

    #[test]
    fn unnamed_statements_and_portals_have_empty_names() {
        let cases = [
            (b'P', &b"\0SELECT 1\0\0\0"[..]),
            (b'B', &b"\0\0\0\0\0\0\0\0"[..]),
            (b'D', &b"P\0"[..]),
            (b'E', &b"\0\0\0\0\0"[..]),
            (b'C', &b"S\0"[..]),
        ];
        for (tag, body) in cases {
            let m = FrontendMessage::parse(&Frame::new(tag, body)).unwrap();
            let names: Vec<&str> = match &m {
                FrontendMessage::Parse { name, query, .. } => {
                    assert_eq!(&**query, "SELECT 1");
                    vec![name]
                }
                FrontendMessage::Bind { portal, statement } => vec![portal, statement],
                FrontendMessage::Describe { name, .. } | FrontendMessage::Close { name, .. } => {
                    vec![name]
                }
                FrontendMessage::Execute { portal, max_rows } => {
                    assert_eq!(*max_rows, 0);
                    vec![portal]
                }
                other => panic!("{other:?}"),
            };
            assert!(names.iter().all(|n| n.is_empty()), "{m:?}");
        }
        // An empty Query is an empty text, not a missing one.
        assert_eq!(
            FrontendMessage::parse(&Frame::new(b'Q', b"\0")).unwrap(),
            FrontendMessage::Query("".into())
        );
    }

    #[test]
    fn malformed_messages_are_errors() {
        for (tag, body) in [
            (b'Q', &b"no terminator"[..]),
            (b'Q', &b""[..]),
            (b'B', &b"\0"[..]),
            (b'B', &b"\0s1"[..]),
            (b'E', &b"\0"[..]),
            (b'P', &b"s\0q\0\xff\xff"[..]),
            (b'P', &b"s\0q\0\0\x05"[..]),
            (b'D', &b"Xname\0"[..]),
            (b'E', &b"\0\0"[..]),
            (b'?', &b""[..]),
        ] {
            let f = Frame::new(tag, body);
            assert!(FrontendMessage::parse(&f).is_err(), "{}", tag as char);
        }
    }
}
