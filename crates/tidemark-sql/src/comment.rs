//! Trailing sqlcommenter comments (`SELECT … /*tidemark_key='user%3A42',controller='show'*/`),
//! as Rails query logs, Django/Flask sqlcommenter, Spring, knex and OpenTelemetry append them
//! per request.
//!
//! [`split_trailing_comment`] separates a trailing block comment from the statement, so the
//! classification cache is keyed by the statement alone (per-request values in the comment do
//! not defeat it); [`scan_sqlcommenter`] reads tidemark's attributes from the comment:
//! the key (attribute name configurable, default `tidemark_key`), `tidemark_min_lsn` and
//! `tidemark_consistency`. Names and values are URL-encoded (`%3A` for `:`), values quoted with
//! `'` (a `'` inside written `\'`).
//!
//! What is ours: a comment naming one of tidemark's attributes. A comment that is not
//! sqlcommenter-shaped and names none of them is someone else's and is ignored. One that names
//! them but cannot be read (malformed, bad percent-encoding, a bad LSN or consistency level)
//! yields an error in [`Hints::errors`]: the statement goes to the primary with a warning, as
//! for a bad leading hint — a typo never silently routes a read to a stale replica.

use tidemark_core::{Consistency, Lsn};

use crate::hints::Hints;
use crate::lex::{block_comment_end, dollar, is_ident, quoted_ident_end, string_end, Dollar};

/// The default sqlcommenter attribute carrying the key (`routing.comment_key_attribute`).
pub const DEFAULT_KEY_ATTRIBUTE: &str = "tidemark_key";
/// The sqlcommenter attribute carrying a causality token.
pub const MIN_LSN_ATTRIBUTE: &str = "tidemark_min_lsn";
/// The sqlcommenter attribute carrying a consistency level.
pub const CONSISTENCY_ATTRIBUTE: &str = "tidemark_consistency";

/// Splits `sql` into the statement (without trailing whitespace) and the body of a trailing block comment (the last token of
/// the text, optionally followed by `;` and whitespace), when one follows some statement text.
/// Comment openers inside string literals, quoted identifiers, dollar quotes and line comments
/// are not comments. Returns `(sql, None)` when there is no such comment.
pub fn split_trailing_comment(sql: &str) -> (&str, Option<&str>) {
    // Most statements carry no comment at their end: they are told by their last bytes, without
    // the scan below (which showed in the per-statement profile).
    let tail = sql.trim_end_matches([' ', '\t', '\n', '\r', '\x0c', ';']);
    if !tail.ends_with("*/") {
        return (sql, None);
    }
    let s = sql.as_bytes();
    let n = s.len();
    let mut i = 0;
    let mut seen_token = false;
    // (start of `/*`, body start, body end) of the last token if it is a block comment.
    let mut last: Option<(usize, usize, usize)> = None;
    while i < n {
        let b = s[i];
        match b {
            b' ' | b'\t' | b'\n' | b'\r' | b'\x0c' | b';' => i += 1,
            b'-' if s.get(i + 1) == Some(&b'-') => {
                while i < n && s[i] != b'\n' {
                    i += 1;
                }
                last = None;
            }
            b'/' if s.get(i + 1) == Some(&b'*') => {
                let Some(end) = block_comment_end(s, i) else {
                    return (sql, None); // unterminated: a syntax error, not ours
                };
                last = seen_token.then_some((i, i + 2, end - 2));
                i = end;
            }
            b'\'' | b'"' => {
                let end = if b == b'"' {
                    quoted_ident_end(s, i)
                } else {
                    string_end(s, i)
                };
                let Some(end) = end else {
                    return (sql, None);
                };
                i = end;
                seen_token = true;
                last = None;
            }
            b'$' if i == 0 || !is_ident(s[i - 1]) => {
                i = match dollar(s, i) {
                    Dollar::Param(end) | Dollar::Quote(end) => end,
                    Dollar::Unterminated => return (sql, None),
                    Dollar::Other => i + 1,
                };
                seen_token = true;
                last = None;
            }
            _ => {
                i += 1;
                seen_token = true;
                last = None;
            }
        }
    }
    match last {
        // Slicing at ASCII delimiters always lands on char boundaries.
        Some((start, bs, be)) => (sql[..start].trim_end(), Some(&sql[bs..be])),
        None => (sql, None),
    }
}

/// Decodes `%XX` escapes (nothing else: `+` stays `+`); the result must be UTF-8.
fn percent_decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok());
            match hex {
                Some(v) => out.push(v),
                None => {
                    return Err(format!(
                        "bad percent-encoding at {:?}",
                        String::from_utf8_lossy(&b[i..b.len().min(i + 3)])
                    ))
                }
            }
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "percent-encoding does not decode to UTF-8".to_string())
}

/// `name=value` pairs of a sqlcommenter comment body, names and values still encoded.
fn pairs(body: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    let mut rest = body.trim();
    while !rest.is_empty() {
        let (name, after) = rest
            .split_once('=')
            .ok_or_else(|| format!("expected name='value' at {:?}", truncate(rest)))?;
        let name = name.trim();
        if name.is_empty() || name.contains(',') {
            return Err(format!("expected name='value' at {:?}", truncate(rest)));
        }
        let after = after.trim_start();
        let (value, tail) = if let Some(q) = after.strip_prefix('\'') {
            let mut v = String::new();
            let mut chars = q.char_indices();
            let mut end = None;
            while let Some((k, c)) = chars.next() {
                match c {
                    '\\' => match chars.next() {
                        Some((_, e)) => v.push(e),
                        None => break,
                    },
                    '\'' => {
                        end = Some(k + 1);
                        break;
                    }
                    c => v.push(c),
                }
            }
            let end = end.ok_or_else(|| format!("unterminated quote in {name}"))?;
            (v, &q[end..])
        } else {
            let e = after.find(',').unwrap_or(after.len());
            (after[..e].trim().to_string(), &after[e..])
        };
        out.push((name.to_string(), value));
        let tail = tail.trim_start();
        rest = match tail.strip_prefix(',') {
            Some(t) => t.trim_start(),
            None if tail.is_empty() => tail,
            None => return Err(format!("expected ',' at {:?}", truncate(tail))),
        };
    }
    Ok(out)
}

fn truncate(s: &str) -> String {
    s.chars().take(40).collect()
}

/// Reads tidemark's attributes (`key_attribute`, `tidemark_min_lsn`, `tidemark_consistency`)
/// from a sqlcommenter comment body. A comment that names none of them yields empty hints.
pub fn scan_sqlcommenter(body: &str, key_attribute: &str) -> Hints {
    let mut hints = Hints::default();
    let ours = |name: &str| {
        name.eq_ignore_ascii_case(key_attribute)
            || name.eq_ignore_ascii_case(MIN_LSN_ATTRIBUTE)
            || name.eq_ignore_ascii_case(CONSISTENCY_ATTRIBUTE)
    };
    let pairs = match pairs(body) {
        Ok(p) => p,
        Err(e) => {
            let lower = body.to_ascii_lowercase();
            let names_ours = [key_attribute, MIN_LSN_ATTRIBUTE, CONSISTENCY_ATTRIBUTE]
                .iter()
                .any(|a| lower.contains(&a.to_ascii_lowercase()));
            if names_ours {
                hints.errors.push(format!(
                    "malformed sqlcommenter comment naming a tidemark attribute: {e} (want /*{key_attribute}='user%3A42'*/)"
                ));
            }
            return hints;
        }
    };
    for (raw_name, raw_value) in pairs {
        let name = percent_decode(&raw_name).unwrap_or(raw_name);
        if !ours(&name) {
            continue;
        }
        let value = match percent_decode(&raw_value) {
            Ok(v) => v,
            Err(e) => {
                hints.errors.push(format!(
                    "bad sqlcommenter attribute {name}='{raw_value}': {e}"
                ));
                continue;
            }
        };
        if name.eq_ignore_ascii_case(key_attribute) {
            if value.is_empty() {
                hints.errors.push(format!(
                    "bad sqlcommenter attribute {name}='': the key is empty"
                ));
            } else {
                hints.key = Some(value);
            }
        } else if name.eq_ignore_ascii_case(MIN_LSN_ATTRIBUTE) {
            match value.parse::<Lsn>() {
                Ok(l) => hints.min_lsn = Some(l),
                Err(e) => hints
                    .errors
                    .push(format!("bad sqlcommenter attribute {name}='{value}': {e}")),
            }
        } else {
            match value.parse::<Consistency>() {
                Ok(c) => hints.consistency = Some(c),
                Err(e) => hints
                    .errors
                    .push(format!("bad sqlcommenter attribute {name}='{value}': {e}")),
            }
        }
    }
    hints
}

/// Adds what a trailing comment says to the leading hints: a leading `/* tidemark: … */` hint
/// wins where both set the same thing; errors of both are kept.
pub fn merge_trailing(leading: &mut Hints, trailing: Hints) {
    leading.key = leading.key.take().or(trailing.key);
    leading.min_lsn = leading.min_lsn.or(trailing.min_lsn);
    leading.consistency = leading.consistency.or(trailing.consistency);
    leading.errors.extend(trailing.errors);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_a_trailing_comment() {
        let (s, c) = split_trailing_comment("SELECT 1 /*a='b'*/");
        assert_eq!((s, c), ("SELECT 1", Some("a='b'")));
        let (s, c) = split_trailing_comment("SELECT 1 /*a='b'*/ ;\n");
        assert_eq!((s, c), ("SELECT 1", Some("a='b'")));
        // Not trailing, only a comment, inside literals: untouched.
        for sql in [
            "SELECT 1 /*a='b'*/ FROM t",
            "/* tidemark: primary */",
            "SELECT '/*a=1*/'",
            "SELECT 'x /*a=1*/",
            "SELECT $$ /*a=1*/ $$",
            "SELECT $q$ /*a=1*/ $q$",
            "SELECT \"/*a=1*/\"",
            "SELECT 1 -- /*a=1*/",
            "SELECT E'\\' /*a=1*/'",
            "SELECT 1 /*unterminated",
            "",
        ] {
            assert_eq!(split_trailing_comment(sql), (sql, None), "{sql}");
        }
        // A parameter is not a dollar quote.
        let (s, c) = split_trailing_comment("SELECT $1 /*k='v'*/");
        assert_eq!((s, c), ("SELECT $1", Some("k='v'")));
        // Nested comments end where they end.
        let (_, c) = split_trailing_comment("SELECT 1 /* a /* b */ c */");
        assert_eq!(c, Some(" a /* b */ c "));
    }

    #[test]
    fn reads_our_attributes() {
        let h = scan_sqlcommenter(
            "controller='show',tidemark_key='user%3A42',tidemark_min_lsn='0%2F3000060',tidemark_consistency='causal',traceparent='00-abc-01'",
            DEFAULT_KEY_ATTRIBUTE,
        );
        assert_eq!(h.key.as_deref(), Some("user:42"));
        assert_eq!(h.min_lsn, Some(Lsn(0x300_0060)));
        assert_eq!(h.consistency, Some(Consistency::Causal));
        assert!(h.errors.is_empty(), "{:?}", h.errors);
        // A configured attribute name; the default one is then someone else's.
        let h = scan_sqlcommenter("tenant='t%201',tidemark_key='x'", "tenant");
        assert_eq!(h.key.as_deref(), Some("t 1"));
        // Quotes inside values.
        let h = scan_sqlcommenter(r"tidemark_key='it\'s'", DEFAULT_KEY_ATTRIBUTE);
        assert_eq!(h.key.as_deref(), Some("it's"));
    }

    #[test]
    fn other_comments_are_ignored() {
        for body in [
            "controller='show',action='index'",
            "application:myapp,controller:users", // marginalia's format
            " just a note ",
            "traceparent='00-%ZZ-01'", // bad encoding, but not ours
        ] {
            assert!(
                scan_sqlcommenter(body, DEFAULT_KEY_ATTRIBUTE).is_empty(),
                "{body}"
            );
        }
    }

    #[test]
    fn bad_values_of_ours_are_errors() {
        for (body, what) in [
            ("tidemark_key='user%3'", "percent-encoding"),
            ("tidemark_key='%FF%FE'", "UTF-8"),
            ("tidemark_key=''", "empty"),
            ("tidemark_consistency='sometimes'", "sometimes"),
            ("tidemark_min_lsn='nope'", "nope"),
            ("tidemark_key='user:42", "malformed"),
            ("tidemark_key:'user:42'", "malformed"),
        ] {
            let h = scan_sqlcommenter(body, DEFAULT_KEY_ATTRIBUTE);
            assert_eq!(h.errors.len(), 1, "{body}: {:?}", h.errors);
            assert!(h.errors[0].contains(what), "{body}: {}", h.errors[0]);
            assert_eq!(h.key, None);
        }
    }

    #[test]
    fn leading_hints_win() {
        let mut lead = Hints {
            key: Some("a".into()),
            ..Hints::default()
        };
        merge_trailing(
            &mut lead,
            Hints {
                key: Some("b".into()),
                consistency: Some(Consistency::Causal),
                errors: vec!["e".into()],
                ..Hints::default()
            },
        );
        assert_eq!(lead.key.as_deref(), Some("a"));
        assert_eq!(lead.consistency, Some(Consistency::Causal));
        assert_eq!(lead.errors, vec!["e".to_string()]);
    }
}
