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

/// The bytes the scan looks at: quotes, `$`, `-`, `/`, `.` and digits. Every other byte is
/// skipped (an identifier's letters, spaces, operators); a digit or `$` inside an identifier
/// is told apart by the byte before it, as the byte-wise rules did.
static SPECIAL: [bool; 256] = {
    let mut t = [false; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = matches!(
            i as u8,
            b'-' | b'/' | b'"' | b'\'' | b'$' | b'.' | b'0'..=b'9'
        );
        i += 1;
    }
    t
};

/// The first index at or after `i` whose byte is in `0x22..=0x39` (every [`SPECIAL`] byte is;
/// so are `#%&()*+,`, which the caller steps over), or `s.len()`. Eight bytes per step: the
/// byte-at-a-time loop was most of the scan, and most of a statement's bytes are letters and
/// spaces. The word test is exact per byte (no carry or borrow crosses a byte): for the low
/// seven bits `v` of each byte, `(0xB9 - v)` has its high bit set when `v < 0x3A`, `(v + 0x5E)`
/// when `v > 0x21`, and `!x` when the byte is ASCII.
#[inline]
fn next_candidate(s: &[u8], mut i: usize) -> usize {
    const L: u64 = 0x0101_0101_0101_0101;
    const LOW7: u64 = L * 0x7F;
    const HIGH: u64 = L * 0x80;
    const BELOW: u64 = L * (0x7F + 0x3A);
    const ABOVE: u64 = L * (0x7F - 0x21);
    while let Some(w) = s.get(i..i + 8).and_then(|w| <[u8; 8]>::try_from(w).ok()) {
        let x = u64::from_le_bytes(w);
        let v = x & LOW7;
        let hit = (BELOW - v) & !x & (v + ABOVE) & HIGH;
        if hit != 0 {
            return i + (hit.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    while i < s.len() && !(0x22..=0x39).contains(&s[i]) {
        i += 1;
    }
    i
}

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
    loop {
        i = next_candidate(s, i);
        let Some(&b) = s.get(i) else {
            break;
        };
        if !SPECIAL[b as usize] {
            i += 1;
            continue;
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

    proptest! {
        #[test]
        fn the_word_test_finds_the_first_byte_in_range(
            bytes in proptest::collection::vec(any::<u8>(), 0..40),
            from in 0usize..45,
        ) {
            let want = (from..bytes.len())
                .find(|&i| (0x22..=0x39).contains(&bytes[i]))
                .unwrap_or(bytes.len().max(from));
            prop_assert_eq!(super::next_candidate(&bytes, from), want);
        }
    }

    #[test]
    fn every_special_byte_is_in_the_word_tests_range() {
        for b in 0..=255u8 {
            if super::SPECIAL[b as usize] {
                assert!((0x22..=0x39).contains(&b), "{b}");
            }
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
                // Runs longer than a word, and bytes the word test stops at but the scan
                // steps over.
                Just("pgbench_accounts"), Just("abcdefgh12"), Just("(#%&*+,)"),
                Just("        "), Just("日本語テキスト"),
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
