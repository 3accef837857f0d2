//! Backend (server → client) messages: builders for what tidemark itself says to clients,
//! and small parsers for the server messages the proxy must read (ReadyForQuery status,
//! ErrorResponse fields, ParameterStatus, single-column DataRows).

use bytes::{BufMut, BytesMut};

use crate::frame::{read_cstr, read_i16, read_i32, Frame};
use crate::frontend::put_cstr;
use crate::WireError;

pub const PARSE_COMPLETE: u8 = b'1';
pub const BIND_COMPLETE: u8 = b'2';
pub const CLOSE_COMPLETE: u8 = b'3';

/// The kind of a backend (server → client) message, named after the protocol
/// documentation, so code that relays server answers matches names, not tag bytes.
/// The body stays in the [`Frame`]; the few bodies the proxy reads have parsers below.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendMessage {
    Authentication,
    BackendKeyData,
    BindComplete,
    CloseComplete,
    CommandComplete,
    CopyData,
    CopyDone,
    CopyInResponse,
    CopyOutResponse,
    CopyBothResponse,
    DataRow,
    EmptyQueryResponse,
    ErrorResponse,
    FunctionCallResponse,
    NegotiateProtocolVersion,
    NoData,
    NoticeResponse,
    NotificationResponse,
    ParameterDescription,
    ParameterStatus,
    ParseComplete,
    PortalSuspended,
    ReadyForQuery,
    RowDescription,
    /// A tag the protocol does not define: a broken or hostile server.
    Unknown(u8),
}

impl BackendMessage {
    pub const fn of(tag: u8) -> BackendMessage {
        use BackendMessage::*;
        match tag {
            b'R' => Authentication,
            b'K' => BackendKeyData,
            b'2' => BindComplete,
            b'3' => CloseComplete,
            b'C' => CommandComplete,
            b'd' => CopyData,
            b'c' => CopyDone,
            b'G' => CopyInResponse,
            b'H' => CopyOutResponse,
            b'W' => CopyBothResponse,
            b'D' => DataRow,
            b'I' => EmptyQueryResponse,
            b'E' => ErrorResponse,
            b'V' => FunctionCallResponse,
            b'v' => NegotiateProtocolVersion,
            b'n' => NoData,
            b'N' => NoticeResponse,
            b'A' => NotificationResponse,
            b't' => ParameterDescription,
            b'S' => ParameterStatus,
            b'1' => ParseComplete,
            b's' => PortalSuspended,
            b'Z' => ReadyForQuery,
            b'T' => RowDescription,
            other => Unknown(other),
        }
    }

    pub const fn tag(self) -> u8 {
        use BackendMessage::*;
        match self {
            Authentication => b'R',
            BackendKeyData => b'K',
            BindComplete => b'2',
            CloseComplete => b'3',
            CommandComplete => b'C',
            CopyData => b'd',
            CopyDone => b'c',
            CopyInResponse => b'G',
            CopyOutResponse => b'H',
            CopyBothResponse => b'W',
            DataRow => b'D',
            EmptyQueryResponse => b'I',
            ErrorResponse => b'E',
            FunctionCallResponse => b'V',
            NegotiateProtocolVersion => b'v',
            NoData => b'n',
            NoticeResponse => b'N',
            NotificationResponse => b'A',
            ParameterDescription => b't',
            ParameterStatus => b'S',
            ParseComplete => b'1',
            PortalSuspended => b's',
            ReadyForQuery => b'Z',
            RowDescription => b'T',
            Unknown(t) => t,
        }
    }

    /// Sent by the server at any time, not as an answer to a client message.
    pub const fn is_asynchronous(self) -> bool {
        matches!(
            self,
            BackendMessage::NoticeResponse
                | BackendMessage::NotificationResponse
                | BackendMessage::ParameterStatus
        )
    }
}

impl Frame {
    /// What kind of backend message this frame is (only meaningful for server frames).
    pub fn backend(&self) -> BackendMessage {
        BackendMessage::of(self.tag())
    }
}

/// Severity and SQLSTATE plus message parts of an ErrorResponse / NoticeResponse.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ErrorFields {
    pub severity: String,
    pub code: String,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

impl ErrorFields {
    pub fn error(code: &str, message: impl Into<String>) -> ErrorFields {
        ErrorFields {
            severity: "ERROR".into(),
            code: code.into(),
            message: message.into(),
            detail: None,
            hint: None,
        }
    }

    pub fn fatal(code: &str, message: impl Into<String>) -> ErrorFields {
        ErrorFields {
            severity: "FATAL".into(),
            ..ErrorFields::error(code, message)
        }
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> ErrorFields {
        self.hint = Some(hint.into());
        self
    }

    pub fn with_detail(mut self, detail: impl Into<String>) -> ErrorFields {
        self.detail = Some(detail.into());
        self
    }

    fn encode(&self, tag: u8) -> Frame {
        let mut b = BytesMut::new();
        for (field, value) in [
            (b'S', Some(self.severity.as_str())),
            (b'V', Some(self.severity.as_str())),
            (b'C', Some(self.code.as_str())),
            (b'M', Some(self.message.as_str())),
            (b'D', self.detail.as_deref()),
            (b'H', self.hint.as_deref()),
        ] {
            if let Some(v) = value {
                b.put_u8(field);
                put_cstr(&mut b, v);
            }
        }
        b.put_u8(0);
        Frame::new(tag, &b)
    }

    /// Encodes an ErrorResponse.
    pub fn to_error(&self) -> Frame {
        self.encode(b'E')
    }

    /// Encodes a NoticeResponse.
    pub fn to_notice(&self) -> Frame {
        self.encode(b'N')
    }

    /// Parses the body of an ErrorResponse or NoticeResponse.
    pub fn parse(frame: &Frame) -> Result<ErrorFields, WireError> {
        let tag = frame.tag();
        let mut b = frame.body();
        let mut f = ErrorFields::default();
        loop {
            let Some((&kind, rest)) = b.split_first() else {
                return Err(WireError::Malformed {
                    tag: tag as char,
                    what: "missing terminator",
                });
            };
            b = rest;
            if kind == 0 {
                break;
            }
            let v = read_cstr(&mut b, tag)?;
            match kind {
                b'S' => f.severity = v.to_string(),
                b'C' => f.code = v.to_string(),
                b'M' => f.message = v.to_string(),
                b'D' => f.detail = Some(v.to_string()),
                b'H' => f.hint = Some(v.to_string()),
                _ => {}
            }
        }
        Ok(f)
    }
}

/// The field `kind` of an ErrorResponse or NoticeResponse (`R`: the server routine that
/// raised it, which unlike the message is never translated); `None` if absent or malformed.
pub fn error_field(frame: &Frame, kind: u8) -> Option<&str> {
    let tag = frame.tag();
    let mut b = frame.body();
    loop {
        let (&k, rest) = b.split_first()?;
        b = rest;
        if k == 0 {
            return None;
        }
        let v = read_cstr(&mut b, tag).ok()?;
        if k == kind {
            return Some(v);
        }
    }
}

/// An ErrorResponse or NoticeResponse with its statement position (field `P`, characters
/// from 1) moved `by` characters back: the answer to a query text tidemark prefixed with
/// `by` characters of its own, as the client's text alone would have it. Every other field
/// is kept byte for byte. `None` when the frame has no position past the prefix (nothing to
/// change) or is malformed.
pub fn shift_position(frame: &Frame, by: u32) -> Option<Frame> {
    let tag = frame.tag();
    let mut out = Vec::with_capacity(frame.body().len());
    let mut moved = false;
    let mut b = frame.body();
    loop {
        let (&k, rest) = b.split_first()?;
        b = rest;
        out.push(k);
        if k == 0 {
            // (Fields are copied as bytes: messages in a client encoding other than UTF-8
            // keep theirs.)
            return moved.then(|| Frame::new(tag, &out));
        }
        let v = crate::frame::read_cbytes(&mut b, tag).ok()?;
        let shifted = (k == b'P')
            .then(|| std::str::from_utf8(v).ok()?.parse::<u32>().ok())
            .flatten()
            .and_then(|at| at.checked_sub(by))
            .filter(|at| *at >= 1);
        match shifted {
            Some(at) => {
                out.extend_from_slice(at.to_string().as_bytes());
                moved = true;
            }
            None => out.extend_from_slice(v),
        }
        out.push(0);
    }
}

/// A statement's result shape as a server described it: a RowDescription's column count and
/// each column's name, type and type modifier (what PostgreSQL compares before it refuses a
/// prepared statement with "cached plan must not change result type"), hashed; NoData (no
/// result) has a shape of its own. `None` for other messages or a malformed description.
pub fn row_shape(frame: &Frame) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    match frame.tag() {
        b'n' => return Some(0x6e),
        b'T' => {}
        _ => return None,
    }
    let mut b = frame.body();
    let n = read_i16(&mut b, b'T').ok()?;
    n.hash(&mut h);
    for _ in 0..n {
        read_cstr(&mut b, b'T').ok()?.hash(&mut h);
        let _table = read_i32(&mut b, b'T').ok()?;
        let _column = read_i16(&mut b, b'T').ok()?;
        read_i32(&mut b, b'T').ok()?.hash(&mut h);
        let _len = read_i16(&mut b, b'T').ok()?;
        read_i32(&mut b, b'T').ok()?.hash(&mut h);
        let _format = read_i16(&mut b, b'T').ok()?;
    }
    Some(h.finish())
}

pub fn ready_for_query(status: u8) -> Frame {
    Frame::new(b'Z', &[status])
}

/// The transaction status byte of a ReadyForQuery: `I`, `T` or `E`.
pub fn ready_status(frame: &Frame) -> Result<u8, WireError> {
    match frame.body() {
        [s @ (b'I' | b'T' | b'E')] => Ok(*s),
        _ => Err(WireError::Malformed {
            tag: 'Z',
            what: "bad transaction status",
        }),
    }
}

pub fn authentication(code: i32, extra: &[u8]) -> Frame {
    let mut b = BytesMut::with_capacity(4 + extra.len());
    b.put_i32(code);
    b.extend_from_slice(extra);
    Frame::new(b'R', &b)
}

pub fn auth_ok() -> Frame {
    authentication(0, &[])
}

pub fn parameter_status(name: &str, value: &str) -> Frame {
    let mut b = BytesMut::new();
    put_parameter_status(&mut b, name, value);
    Frame::from_encoded(b.freeze())
}

/// A ParameterStatus message appended to `out` as encoded bytes: no frame of its own (a
/// login sends a dozen of them; building each as a frame showed in the per-login profile).
pub fn put_parameter_status(out: &mut BytesMut, name: &str, value: &str) {
    let len = 4 + name.len() + 1 + value.len() + 1;
    out.reserve(1 + len);
    out.extend_from_slice(b"S");
    out.extend_from_slice(&(len as i32).to_be_bytes());
    put_cstr(out, name);
    put_cstr(out, value);
}

pub fn parse_parameter_status(frame: &Frame) -> Result<(String, String), WireError> {
    let mut b = frame.body();
    let k = read_cstr(&mut b, b'S')?;
    let v = read_cstr(&mut b, b'S')?;
    Ok((k.to_string(), v.to_string()))
}

pub fn backend_key_data(pid: i32, secret: i32) -> Frame {
    let mut b = BytesMut::with_capacity(8);
    b.put_i32(pid);
    b.put_i32(secret);
    Frame::new(b'K', &b)
}

pub fn parse_backend_key_data(frame: &Frame) -> Result<(i32, i32), WireError> {
    let mut b = frame.body();
    Ok((read_i32(&mut b, b'K')?, read_i32(&mut b, b'K')?))
}

/// RowDescription for text columns (type `text`, oid 25).
pub fn row_description(columns: &[&str]) -> Frame {
    let mut b = BytesMut::new();
    b.put_i16(columns.len() as i16);
    for c in columns {
        put_cstr(&mut b, c);
        b.put_i32(0); // table oid
        b.put_i16(0); // column number
        b.put_u32(25); // text
        b.put_i16(-1);
        b.put_i32(-1);
        b.put_i16(0); // text format
    }
    Frame::new(b'T', &b)
}

/// DataRow of text values (`None` = NULL).
pub fn data_row<S: AsRef<str>>(values: &[Option<S>]) -> Frame {
    let mut b = BytesMut::new();
    b.put_i16(values.len() as i16);
    for v in values {
        match v {
            Some(s) => {
                b.put_i32(s.as_ref().len() as i32);
                b.extend_from_slice(s.as_ref().as_bytes());
            }
            None => b.put_i32(-1),
        }
    }
    Frame::new(b'D', &b)
}

/// The first column of a DataRow as text (`None` = NULL).
pub fn data_row_first(frame: &Frame) -> Result<Option<String>, WireError> {
    let mut b = frame.body();
    let n = read_i16(&mut b, b'D')?;
    if n < 1 {
        return Err(WireError::Malformed {
            tag: 'D',
            what: "no columns",
        });
    }
    let len = read_i32(&mut b, b'D')?;
    if len < 0 {
        return Ok(None);
    }
    let v = b.get(..len as usize).ok_or(WireError::Malformed {
        tag: 'D',
        what: "truncated column",
    })?;
    Ok(Some(String::from_utf8_lossy(v).into_owned()))
}

/// All columns of a DataRow as text (`None` for NULL).
pub fn data_row_values(frame: &Frame) -> Result<Vec<Option<String>>, WireError> {
    let mut b = frame.body();
    let n = read_i16(&mut b, b'D')?;
    let mut out = Vec::with_capacity(n.max(0) as usize);
    for _ in 0..n {
        let len = read_i32(&mut b, b'D')?;
        if len < 0 {
            out.push(None);
            continue;
        }
        let v = b.get(..len as usize).ok_or(WireError::Malformed {
            tag: 'D',
            what: "truncated column",
        })?;
        out.push(Some(String::from_utf8_lossy(v).into_owned()));
        b = &b[len as usize..];
    }
    Ok(out)
}

pub fn command_complete(tag: &str) -> Frame {
    let mut b = BytesMut::new();
    put_cstr(&mut b, tag);
    Frame::new(b'C', &b)
}

pub fn empty_query() -> Frame {
    Frame::new(b'I', b"")
}

pub fn no_data() -> Frame {
    Frame::new(b'n', b"")
}

pub fn simple(tag: u8) -> Frame {
    Frame::new(tag, b"")
}

/// ParameterDescription with these parameter type oids.
pub fn parameter_description(types: &[u32]) -> Frame {
    let mut b = BytesMut::new();
    b.put_i16(types.len() as i16);
    for t in types {
        b.put_u32(*t);
    }
    Frame::new(b't', &b)
}

/// RowDescription of one `bool` column (oid 16) in the given format (0 text, 1 binary), as
/// PostgreSQL describes a function result column.
pub fn bool_row_description(column: &str, format: i16) -> Frame {
    let mut b = BytesMut::new();
    b.put_i16(1);
    put_cstr(&mut b, column);
    b.put_i32(0);
    b.put_i16(0);
    b.put_u32(16);
    b.put_i16(1);
    b.put_i32(-1);
    b.put_i16(format);
    Frame::new(b'T', &b)
}

/// DataRow of one `bool` value in the given format.
pub fn bool_data_row(v: bool, format: i16) -> Frame {
    let mut b = BytesMut::new();
    b.put_i16(1);
    b.put_i32(1);
    if format == 1 {
        b.put_u8(u8::from(v));
    } else {
        b.put_u8(if v { b't' } else { b'f' });
    }
    Frame::new(b'D', &b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_parameter_status_appended_in_place_is_the_same_message() {
        let mut out = BytesMut::from(&b"xyz"[..]);
        put_parameter_status(&mut out, "application_name", "");
        put_parameter_status(&mut out, "TimeZone", "Europe/Zürich");
        let mut want = BytesMut::from(&b"xyz"[..]);
        want.extend_from_slice(parameter_status("application_name", "").raw());
        want.extend_from_slice(parameter_status("TimeZone", "Europe/Zürich").raw());
        assert_eq!(out, want);
        assert_eq!(&out[3..26], &b"S\0\0\0\x16application_name\0\0"[..]);
        let f = Frame::new(b'S', &want[3 + 5..3 + 23]);
        assert_eq!(
            parse_parameter_status(&f).expect("parses"),
            ("application_name".to_string(), String::new())
        );
    }

    #[test]
    fn a_shifted_position_moves_only_the_position_field() {
        let f = Frame::new(b'E', b"SERROR\0C42601\0Msyntax error\0P15\0Fscan.l\0\0");
        let g = shift_position(&f, 6).expect("a position past the prefix");
        assert_eq!(g.body(), b"SERROR\0C42601\0Msyntax error\0P9\0Fscan.l\0\0");
        assert_eq!(g.tag(), b'E');
        let n = Frame::new(b'N', b"SNOTICE\0P7\0\0");
        assert_eq!(
            shift_position(&n, 6).expect("shifted").body(),
            b"SNOTICE\0P1\0\0"
        );
        // No position, or none past the prefix: nothing to change.
        assert!(shift_position(&ErrorFields::error("22012", "x").to_error(), 6).is_none());
        assert!(shift_position(&Frame::new(b'E', b"P6\0\0"), 6).is_none());
        // A field that is not UTF-8 (a LATIN1 client) is copied as it is.
        let g = shift_position(&Frame::new(b'E', b"SERROR\0Mcaf\xe9\0P12\0\0"), 6);
        assert_eq!(g.expect("shifted").body(), b"SERROR\0Mcaf\xe9\0P6\0\0");
        // Malformed (no terminator): left alone.
        assert!(shift_position(&Frame::new(b'E', b"P12"), 6).is_none());
    }

    #[test]
    fn a_row_shape_is_its_columns_names_types_and_modifiers() {
        fn desc(cols: &[(&str, i32, i32, i16)]) -> Frame {
            let mut b = Vec::new();
            b.extend_from_slice(&(cols.len() as i16).to_be_bytes());
            for (name, ty, typmod, format) in cols {
                b.extend_from_slice(name.as_bytes());
                b.push(0);
                b.extend_from_slice(&16384i32.to_be_bytes());
                b.extend_from_slice(&1i16.to_be_bytes());
                b.extend_from_slice(&ty.to_be_bytes());
                b.extend_from_slice(&4i16.to_be_bytes());
                b.extend_from_slice(&typmod.to_be_bytes());
                b.extend_from_slice(&format.to_be_bytes());
            }
            Frame::new(b'T', &b)
        }
        let base = row_shape(&desc(&[("id", 23, -1, 0), ("b", 23, -1, 0)]));
        assert!(base.is_some());
        // The result format is the portal's, not the statement's shape.
        assert_eq!(
            base,
            row_shape(&desc(&[("id", 23, -1, 1), ("b", 23, -1, 0)]))
        );
        for other in [
            desc(&[("id", 23, -1, 0)]),
            desc(&[("id", 23, -1, 0), ("b", 20, -1, 0)]),
            desc(&[("id", 23, -1, 0), ("c", 23, -1, 0)]),
            desc(&[("id", 23, -1, 0), ("b", 23, 14, 0)]),
            Frame::new(b'n', b""),
        ] {
            assert_ne!(row_shape(&other), base);
        }
        assert_eq!(row_shape(&Frame::new(b'n', b"")), Some(0x6e));
        assert_eq!(row_shape(&Frame::new(b'T', b"\x00\x02id\x00")), None);
        assert_eq!(row_shape(&Frame::new(b'1', b"")), None);
    }

    #[test]
    fn an_error_field_is_found_by_its_kind() {
        let f = Frame::new(
            b'E',
            b"SERROR\0C0A000\0Mcached plan must not change result type\0RRevalidateCachedQuery\0\0",
        );
        assert_eq!(error_field(&f, b'R'), Some("RevalidateCachedQuery"));
        assert_eq!(error_field(&f, b'C'), Some("0A000"));
        assert_eq!(error_field(&f, b'D'), None);
        // Cut short or unterminated: nothing, never a panic.
        assert_eq!(
            error_field(&Frame::new(b'E', b"SERROR\0RRevalid"), b'R'),
            None
        );
        assert_eq!(error_field(&Frame::new(b'E', b""), b'R'), None);
    }

    #[test]
    fn error_round_trip() {
        let e = ErrorFields::error("53300", "pool full").with_hint("raise max_size");
        let f = e.to_error();
        assert_eq!(f.tag(), b'E');
        let back = ErrorFields::parse(&f).unwrap();
        assert_eq!(back.code, "53300");
        assert_eq!(back.message, "pool full");
        assert_eq!(back.hint.as_deref(), Some("raise max_size"));
        assert!(ErrorFields::parse(&Frame::new(b'E', b"Cabc")).is_err());
    }

    #[test]
    fn data_row_round_trip() {
        let f = data_row(&[Some("0/3000060"), None]);
        assert_eq!(data_row_first(&f).unwrap().as_deref(), Some("0/3000060"));
        let f = data_row::<&str>(&[None]);
        assert_eq!(data_row_first(&f).unwrap(), None);
        assert!(data_row_first(&Frame::new(b'D', &[0, 1, 0, 0, 0, 9, b'x'])).is_err());
        let f = data_row(&[Some("0/3000060"), None, Some("")]);
        assert_eq!(
            data_row_values(&f).unwrap(),
            vec![Some("0/3000060".to_string()), None, Some(String::new())]
        );
        assert!(data_row_values(&Frame::new(b'D', &[0, 2, 0, 0, 0, 1, b'x'])).is_err());
        assert!(data_row_values(&Frame::new(b'D', &[0, 1, 0, 0, 0, 9, b'x'])).is_err());
    }

    #[test]
    fn ready_status_checks_byte() {
        assert_eq!(ready_status(&ready_for_query(b'T')).unwrap(), b'T');
        assert!(ready_status(&Frame::new(b'Z', b"")).is_err());
        assert!(ready_status(&Frame::new(b'Z', b"Q")).is_err());
    }

    #[test]
    fn every_backend_tag_maps_back_to_itself() {
        for tag in 0..=255u8 {
            assert_eq!(BackendMessage::of(tag).tag(), tag);
        }
        assert_eq!(BackendMessage::of(b'Z'), BackendMessage::ReadyForQuery);
        assert_eq!(BackendMessage::of(b'x'), BackendMessage::Unknown(b'x'));
    }
}
