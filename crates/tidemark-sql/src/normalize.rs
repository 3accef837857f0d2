//! Literal-blind cache keys: a fast lexical pass that replaces string, dollar-quoted and
//! numeric constants with `?`, keeping comments (hints live there), quoted identifiers and
//! `$n` parameters. `SELECT v FROM t WHERE id = 42` and `... id = 43` share one key, so an
//! application that inlines values (pgbench -S, many ORMs in simple-protocol mode) pays
//! PostgreSQL's parser once per statement shape instead of once per statement.
//!
//! Only analyses that cannot depend on a literal's value are cached under this key (see
//! `Classifier::classify`): `SET` values and tidemark commands carry literals and are cached
//! by exact text.

use std::borrow::Cow;

use crate::lex::{block_comment_end, dollar, is_ident, quoted_ident_end, string_end, Dollar};

/// Byte classes for the scan (a table: the per-byte `match` showed in the per-statement
/// profile). Most bytes need no look; an identifier is skipped whole, digits and `$` in it
/// included, which is what the byte-wise rules did to them.
const PLAIN: u8 = 0;
const IDENT_START: u8 = 1;
const SPECIAL: u8 = 2;
static CLASS: [u8; 256] = {
    let mut t = [PLAIN; 256];
    let mut i = 0;
    while i < 256 {
        let b = i as u8;
        t[i] = if b.is_ascii_alphabetic() || b == b'_' || b >= 0x80 {
            IDENT_START
        } else if matches!(b, b'-' | b'/' | b'"' | b'\'' | b'$' | b'.' | b'0'..=b'9') {
            SPECIAL
        } else {
            PLAIN
        };
        i += 1;
    }
    t
};

/// The text with constants replaced by `?`; borrowed when there is none.
pub fn normalize(sql: &str) -> Cow<'_, str> {
    let mut buf = Vec::new();
    match normalize_in(sql, &mut buf) {
        None => Cow::Borrowed(sql),
        Some(_) => {
            // SAFETY: `normalize_in` returned `Some`, so `buf` holds valid UTF-8 (see there).
            Cow::Owned(unsafe { String::from_utf8_unchecked(buf) })
        }
    }
}

/// [`normalize`] into a buffer the caller keeps (the per-statement path allocates nothing):
/// `Some(text)` (in `buf`) when there was a constant, `None` when `sql` is its own shape.
pub fn normalize_in<'b>(sql: &str, buf: &'b mut Vec<u8>) -> Option<&'b str> {
    if !scan(sql, buf) {
        return None;
    }
    debug_assert!(std::str::from_utf8(buf).is_ok());
    // SAFETY: `buf` is `sql` (valid UTF-8) with some byte ranges replaced by `?`. Every range
    // starts at an ASCII byte (a quote, a digit, `$` or `.`) and ends after an ASCII byte or
    // where a run of identifier bytes (every non-ASCII byte is one) meets an ASCII byte or the
    // end: each cut is at a character boundary, so the result is valid UTF-8. (Validating it
    // again cost ~1 instruction per byte of every statement; the property tests compare the
    // scan against a checked reference.)
    Some(unsafe { std::str::from_utf8_unchecked(buf) })
}

/// Writes the text with constants replaced into `out` (cleared first); `false` when there is
/// no constant to replace (or the text is not one a server would accept) and `out` is unused.
fn scan(sql: &str, out: &mut Vec<u8>) -> bool {
    let s = sql.as_bytes();
    let n = s.len();
    out.clear();
    let mut changed = false;
    let mut copied = 0; // bytes of `s` already accounted for in `out`
    let mut i = 0;
    // Replaces s[start..end] by '?'.
    let mut replace = |out: &mut Vec<u8>, copied: &mut usize, start: usize, end: usize| {
        if !changed {
            out.reserve(n);
            changed = true;
        }
        out.extend_from_slice(&s[*copied..start]);
        out.push(b'?');
        *copied = end;
    };
    while i < n {
        let b = s[i];
        match CLASS[b as usize] {
            PLAIN => {
                i += 1;
                continue;
            }
            IDENT_START => {
                // As an iterator: no bounds check per byte (the loop is most of the scan).
                i += 1 + s[i + 1..].iter().take_while(|&&c| is_ident(c)).count();
                continue;
            }
            _ => {}
        }
        let prev_ident = i > 0 && is_ident(s[i - 1]);
        match b {
            b'-' if s.get(i + 1) == Some(&b'-') => {
                while i < n && s[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if s.get(i + 1) == Some(&b'*') => {
                // Kept as it is (hints live there); an unterminated one runs to the end.
                i = block_comment_end(s, i).unwrap_or(n);
            }
            b'"' => {
                // A quoted identifier is kept; unterminated, it runs to the end.
                i = quoted_ident_end(s, i).unwrap_or(n + 1);
            }
            b'\'' => {
                let Some(end) = string_end(s, i) else {
                    // Unterminated: not a constant of a valid statement; key by exact text.
                    return false;
                };
                replace(out, &mut copied, i, end);
                i = end;
            }
            b'$' if !prev_ident => match dollar(s, i) {
                Dollar::Param(end) => i = end,
                Dollar::Quote(end) => {
                    replace(out, &mut copied, i, end);
                    i = end;
                }
                Dollar::Unterminated => return false,
                Dollar::Other => i += 1,
            },
            b'0'..=b'9' if !prev_ident => {
                let start = i;
                while i < n && (is_ident(s[i]) || s[i] == b'.') {
                    i += 1;
                }
                replace(out, &mut copied, start, i);
            }
            b'.' if !prev_ident && s.get(i + 1).is_some_and(|c| c.is_ascii_digit()) => {
                let start = i;
                i += 1;
                while i < n && (is_ident(s[i]) || s[i] == b'.') {
                    i += 1;
                }
                replace(out, &mut copied, start, i);
            }
            _ => i += 1,
        }
    }
    if !changed {
        return false;
    }
    out.extend_from_slice(&s[copied.min(n)..]);
    true
}

#[cfg(test)]
mod tests {
    use super::normalize;
    use proptest::prelude::*;
    use std::borrow::Cow;

    /// The rule the tables encode, written out.
    fn is_ident(b: u8) -> bool {
        b.is_ascii_alphanumeric() || b == b'_' || b == b'$' || b >= 0x80
    }

    #[test]
    fn tables_follow_the_rule() {
        for b in 0..=255u8 {
            assert_eq!(super::is_ident(b), is_ident(b), "{b}");
        }
    }

    /// The byte-at-a-time scan the table-driven one replaced: both must agree on every text.
    fn reference(sql: &str) -> Cow<'_, str> {
        let s = sql.as_bytes();
        let n = s.len();
        let mut out: Option<Vec<u8>> = None;
        let mut copied = 0; // bytes of `s` already accounted for in `out`
        let mut i = 0;
        // Replaces s[start..end] by '?'.
        let replace = |out: &mut Option<Vec<u8>>, copied: &mut usize, start: usize, end: usize| {
            let o = out.get_or_insert_with(|| Vec::with_capacity(n));
            o.extend_from_slice(&s[*copied..start]);
            o.push(b'?');
            *copied = end;
        };
        while i < n {
            let b = s[i];
            let prev_ident = i > 0 && is_ident(s[i - 1]);
            match b {
                b'-' if s.get(i + 1) == Some(&b'-') => {
                    while i < n && s[i] != b'\n' {
                        i += 1;
                    }
                }
                b'/' if s.get(i + 1) == Some(&b'*') => {
                    let mut depth = 0usize;
                    while i < n {
                        if s[i] == b'/' && s.get(i + 1) == Some(&b'*') {
                            depth += 1;
                            i += 2;
                        } else if s[i] == b'*' && s.get(i + 1) == Some(&b'/') {
                            depth -= 1;
                            i += 2;
                            if depth == 0 {
                                break;
                            }
                        } else {
                            i += 1;
                        }
                    }
                }
                b'"' => {
                    i += 1;
                    while i < n {
                        if s[i] == b'"' {
                            if s.get(i + 1) == Some(&b'"') {
                                i += 2;
                                continue;
                            }
                            break;
                        }
                        i += 1;
                    }
                    i += 1;
                }
                b'\'' => {
                    // E'...' strings take backslash escapes.
                    let escapes =
                        i > 0 && matches!(s[i - 1], b'e' | b'E') && (i < 2 || !is_ident(s[i - 2]));
                    let start = i;
                    i += 1;
                    while i < n {
                        if escapes && s[i] == b'\\' {
                            i += 2;
                            continue;
                        }
                        if s[i] == b'\'' {
                            if s.get(i + 1) == Some(&b'\'') {
                                i += 2;
                                continue;
                            }
                            break;
                        }
                        i += 1;
                    }
                    if i >= n {
                        // Unterminated: not a constant of a valid statement; key by exact text.
                        return Cow::Borrowed(sql);
                    }
                    i += 1;
                    replace(&mut out, &mut copied, start, i);
                }
                b'$' if !prev_ident => {
                    // $n parameter, or a dollar-quoted constant $tag$...$tag$.
                    let mut j = i + 1;
                    if s.get(j).is_some_and(|c| c.is_ascii_digit()) {
                        while j < n && s[j].is_ascii_digit() {
                            j += 1;
                        }
                        i = j;
                        continue;
                    }
                    while j < n && (s[j].is_ascii_alphanumeric() || s[j] == b'_' || s[j] >= 0x80) {
                        j += 1;
                    }
                    if s.get(j) == Some(&b'$') {
                        let tag = &s[i..=j];
                        let body = j + 1;
                        let Some(end) = s[body..]
                            .windows(tag.len())
                            .position(|w| w == tag)
                            .map(|p| body + p + tag.len())
                        else {
                            return Cow::Borrowed(sql);
                        };
                        replace(&mut out, &mut copied, i, end);
                        i = end;
                    } else {
                        i += 1;
                    }
                }
                b'0'..=b'9' if !prev_ident => {
                    let start = i;
                    while i < n && (is_ident(s[i]) || s[i] == b'.') {
                        i += 1;
                    }
                    replace(&mut out, &mut copied, start, i);
                }
                b'.' if !prev_ident && s.get(i + 1).is_some_and(|c| c.is_ascii_digit()) => {
                    let start = i;
                    i += 1;
                    while i < n && (is_ident(s[i]) || s[i] == b'.') {
                        i += 1;
                    }
                    replace(&mut out, &mut copied, start, i);
                }
                _ => i += 1,
            }
        }
        match out {
            None => Cow::Borrowed(sql),
            Some(mut o) => {
                o.extend_from_slice(&s[copied.min(n)..]);
                // Only ASCII bytes were replaced by ASCII, at ASCII boundaries.
                Cow::Owned(
                    String::from_utf8(o)
                        .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()),
                )
            }
        }
    }

    proptest! {
        #[test]
        fn table_scan_matches_the_reference(
            parts in proptest::collection::vec(prop_oneof![
                Just("SELECT "), Just("a1"), Just("$1"), Just("$$"), Just("$t$"), Just("'"),
                Just("''"), Just("E'"), Just("\\"), Just("\""), Just("-- c\n"), Just("/*"),
                Just("*/"), Just("."), Just("1.5e3"), Just("42"), Just(" "), Just("x$"),
                Just("é"), Just("_9"), Just("\n"), Just("="), Just("e"),
            ], 0..24)
        ) {
            let text: String = parts.concat();
            prop_assert_eq!(normalize(&text), reference(&text));
        }
    }

    #[test]
    fn constants_become_placeholders() {
        let cases = [
            (
                "SELECT v FROM t WHERE id = 42",
                "SELECT v FROM t WHERE id = ?",
            ),
            ("SELECT 'a''b', E'x\\'y', 1.5e3, .5", "SELECT ?, E?, ?, ?"),
            ("SELECT $1, $$body$$, $f$ a $f$", "SELECT $1, ?, ?"),
            ("SELECT t1.c2 FROM t1", "SELECT t1.c2 FROM t1"),
            ("SELECT \"x 1\" FROM a$1", "SELECT \"x 1\" FROM a$1"),
            (
                "/* tidemark: min_lsn=0/3000060 */ SELECT 7",
                "/* tidemark: min_lsn=0/3000060 */ SELECT ?",
            ),
            ("SELECT 1 -- 22\n", "SELECT ? -- 22\n"),
            ("SELECT 'unterminated", "SELECT 'unterminated"),
            ("SELECT $q$ open", "SELECT $q$ open"),
            ("SELECT 'é', 3", "SELECT ?, ?"),
        ];
        for (input, want) in cases {
            assert_eq!(normalize(input), want, "{input}");
        }
    }

    #[test]
    fn no_constants_borrows() {
        assert!(matches!(
            normalize("SELECT a FROM t"),
            std::borrow::Cow::Borrowed(_)
        ));
    }

    #[test]
    fn a_reused_buffer_gives_the_same_shapes() {
        let mut buf = Vec::new();
        for text in [
            "SELECT v FROM t WHERE id = 123456789 AND s = 'long string constant'",
            "SELECT 1",
            "SELECT a FROM t",
            "SELECT é FROM t WHERE x = E'\\é' AND y = $q$é$q$",
            "SELECT 'unterminated",
        ] {
            let want = normalize(text);
            match super::normalize_in(text, &mut buf) {
                Some(got) => assert_eq!(got, want, "{text}"),
                None => assert!(matches!(want, Cow::Borrowed(_)), "{text}"),
            }
        }
    }
}
