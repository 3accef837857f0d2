//! The lexical rules both byte scans of statement text need (`normalize`, the cache key, and
//! `comment`, the trailing sqlcommenter comment): where a quoted or commented token that
//! starts at a given byte ends, as PostgreSQL's lexer decides. Written by hand because the
//! scans run on every statement before any parser; a parser crate would parse the whole text.

/// Identifier bytes (and what follows a constant without a separator): letters, digits, `_`,
/// `$`, any non-ASCII byte.
#[inline]
pub(crate) fn is_ident(b: u8) -> bool {
    IDENT[b as usize]
}

/// `is_ident` as a table (the chain of comparisons showed in the per-statement profile).
static IDENT: [bool; 256] = {
    let mut t = [false; 256];
    let mut i = 0;
    while i < 256 {
        let b = i as u8;
        t[i] = b.is_ascii_alphanumeric() || b == b'_' || b == b'$' || b >= 0x80;
        i += 1;
    }
    t
};

/// The end (exclusive) of the block comment whose `/*` is at `i`; comments nest. `None`:
/// unterminated.
#[inline]
pub(crate) fn block_comment_end(s: &[u8], mut i: usize) -> Option<usize> {
    let n = s.len();
    let mut depth = 0usize;
    while i < n {
        if s[i] == b'/' && s.get(i + 1) == Some(&b'*') {
            depth += 1;
            i += 2;
        } else if s[i] == b'*' && s.get(i + 1) == Some(&b'/') {
            depth -= 1;
            i += 2;
            if depth == 0 {
                return Some(i);
            }
        } else {
            i += 1;
        }
    }
    None
}

/// The end (exclusive) of the string constant whose opening `'` is at `i`: `''` is a quote
/// inside it, and an `E'…'` string takes backslash escapes. `None`: unterminated.
#[inline]
pub(crate) fn string_end(s: &[u8], i: usize) -> Option<usize> {
    let escapes = i > 0 && matches!(s[i - 1], b'e' | b'E') && (i < 2 || !is_ident(s[i - 2]));
    closing_quote(s, i, b'\'', escapes)
}

/// The end (exclusive) of the quoted identifier whose opening `"` is at `i` (`""` is a quote
/// inside it). `None`: unterminated.
#[inline]
pub(crate) fn quoted_ident_end(s: &[u8], i: usize) -> Option<usize> {
    closing_quote(s, i, b'"', false)
}

/// The end (exclusive) of the text quoted by `q` that opens at `i`: a doubled `q` is one
/// inside it; with `escapes`, a backslash takes the next byte. `None`: unterminated.
#[inline]
fn closing_quote(s: &[u8], i: usize, q: u8, escapes: bool) -> Option<usize> {
    let n = s.len();
    let mut j = i + 1;
    while j < n {
        if escapes && s[j] == b'\\' {
            j += 2;
            continue;
        }
        if s[j] == q {
            if s.get(j + 1) == Some(&q) {
                j += 2;
                continue;
            }
            return Some(j + 1);
        }
        j += 1;
    }
    None
}

/// What starts at a `$` that does not follow an identifier byte.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Dollar {
    /// `$1`: a parameter, ending here (exclusive).
    Param(usize),
    /// `$tag$…$tag$`: a dollar-quoted constant, ending here (exclusive).
    Quote(usize),
    /// A dollar quote that is never closed.
    Unterminated,
    /// Neither (a lone `$`).
    Other,
}

/// Reads the token at `s[i] == b'$'` (see [`Dollar`]).
#[inline]
pub(crate) fn dollar(s: &[u8], i: usize) -> Dollar {
    let n = s.len();
    let mut j = i + 1;
    if s.get(j).is_some_and(|c| c.is_ascii_digit()) {
        while j < n && s[j].is_ascii_digit() {
            j += 1;
        }
        return Dollar::Param(j);
    }
    while j < n && (s[j].is_ascii_alphanumeric() || s[j] == b'_' || s[j] >= 0x80) {
        j += 1;
    }
    if s.get(j) != Some(&b'$') {
        return Dollar::Other;
    }
    let tag = &s[i..=j];
    let body = j + 1;
    match s[body..].windows(tag.len()).position(|w| w == tag) {
        Some(p) => Dollar::Quote(body + p + tag.len()),
        None => Dollar::Unterminated,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_ends() {
        let s = b"/* a /* b */ c */ x";
        assert_eq!(block_comment_end(s, 0), Some(17));
        assert_eq!(block_comment_end(b"/* open", 0), None);
        assert_eq!(string_end(b"'it''s' x", 0), Some(7));
        assert_eq!(string_end(br"E'a\'b' x", 1), Some(7));
        assert_eq!(string_end(br"'a\' x", 0), Some(4));
        assert_eq!(string_end(b"'open", 0), None);
        assert_eq!(quoted_ident_end(br#""a""b" x"#, 0), Some(6));
        assert_eq!(quoted_ident_end(br#""open"#, 0), None);
        assert_eq!(dollar(b"$12 x", 0), Dollar::Param(3));
        assert_eq!(dollar(b"$q$ a $ b $q$ x", 0), Dollar::Quote(13));
        assert_eq!(dollar(b"$$x$$", 0), Dollar::Quote(5));
        assert_eq!(dollar(b"$q$ open", 0), Dollar::Unterminated);
        assert_eq!(dollar(b"$ x", 0), Dollar::Other);
    }
}
