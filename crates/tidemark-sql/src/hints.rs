//! `tidemark:` hint comments: finding them in the comments that lead a statement (without
//! parsing it) and turning their words into `Hints`, with a readable error for each bad word.
//!
//! Grammar: a block comment `/* tidemark: WORD[, WORD]... */` or a line comment
//! `-- tidemark: WORD ...` before the first token of the text. WORDs are separated by commas
//! and/or whitespace and are one of `primary`, `replica`, `consistency=LEVEL`, `min_lsn=X/Y`,
//! `key=VALUE` (`VALUE` may be quoted with `'` or `"` to contain spaces or commas). Comments that
//! do not start with `tidemark:` are skipped; comments after the first token are never read, so a
//! string literal that contains `/* tidemark: … */` has no effect.

use tidemark_core::{Consistency, Lsn};

/// Where a hint asks the statement to go.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum HintTarget {
    /// `/* tidemark: primary */`
    Primary,
    /// `/* tidemark: replica */`
    Replica,
}

/// The hints found in a statement's leading comments. When a word repeats, the last one wins.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Hints {
    /// `primary` or `replica`.
    pub target: Option<HintTarget>,
    /// `consistency=strong|session|eventual|bounded(200ms)`.
    pub consistency: Option<Consistency>,
    /// `min_lsn=16/B374D848`: the read must see at least this WAL position.
    pub min_lsn: Option<Lsn>,
    /// `key=user:42`: a session key whose last write the read must see.
    pub key: Option<String>,
    /// One human-readable message per bad word; the good words still apply.
    pub errors: Vec<String>,
}

impl Hints {
    /// True when no hint (and no error) was found.
    pub fn is_empty(&self) -> bool {
        self == &Hints::default()
    }
}

const VALID: &str = "valid: primary, replica, consistency=..., min_lsn=..., key=...";

/// Scans the comments leading `sql` for `tidemark:` hints. Never fails: bad words are reported in
/// [`Hints::errors`].
pub fn scan_hints(sql: &str) -> Hints {
    let mut hints = Hints::default();
    let b = sql.as_bytes();
    let mut i = 0;
    loop {
        while i < b.len() && (b[i].is_ascii_whitespace()) {
            i += 1;
        }
        if b[i..].starts_with(b"/*") {
            let start = i + 2;
            let mut depth = 1;
            let mut j = start;
            let mut end = None;
            while j < b.len() {
                if b[j..].starts_with(b"/*") {
                    depth += 1;
                    j += 2;
                } else if b[j..].starts_with(b"*/") {
                    depth -= 1;
                    if depth == 0 {
                        end = Some(j);
                        break;
                    }
                    j += 2;
                } else {
                    j += 1;
                }
            }
            // An unterminated comment is a syntax error; ignore what it says.
            let Some(end) = end else { break };
            apply_comment(&sql[start..end], &mut hints);
            i = end + 2;
        } else if b[i..].starts_with(b"--") {
            let start = i + 2;
            let end = b[start..]
                .iter()
                .position(|&c| c == b'\n' || c == b'\r')
                .map_or(b.len(), |p| start + p);
            apply_comment(&sql[start..end], &mut hints);
            i = end;
        } else {
            break;
        }
    }
    hints
}

/// If `body` (the text between the comment delimiters) starts with `tidemark:`, applies its words.
fn apply_comment(body: &str, hints: &mut Hints) {
    let body = body.trim_start();
    const PREFIX: &str = "tidemark:";
    if body.len() < PREFIX.len()
        || !body.is_char_boundary(PREFIX.len())
        || !body[..PREFIX.len()].eq_ignore_ascii_case(PREFIX)
    {
        return;
    }
    for word in split_words(&body[PREFIX.len()..]) {
        apply_word(&word, hints);
    }
}

/// Splits on commas and whitespace, keeping quoted parts (`key='a b'`) together and unquoted.
fn split_words(s: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut quote: Option<char> = None;
    let mut quoted = false;
    for c in s.chars() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => cur.push(c),
            None if c == '\'' || c == '"' => {
                quote = Some(c);
                quoted = true;
            }
            None if c == ',' || c.is_whitespace() => {
                if !cur.is_empty() || quoted {
                    words.push(std::mem::take(&mut cur));
                }
                quoted = false;
            }
            None => cur.push(c),
        }
    }
    if !cur.is_empty() || quoted {
        words.push(cur);
    }
    words
}

fn apply_word(word: &str, hints: &mut Hints) {
    let (name, value) = match word.split_once('=') {
        Some((n, v)) => (n.trim(), Some(v.trim())),
        None => (word.trim(), None),
    };
    let lname = name.to_ascii_lowercase();
    match (lname.as_str(), value) {
        ("primary", None) => hints.target = Some(HintTarget::Primary),
        ("replica", None) => hints.target = Some(HintTarget::Replica),
        ("consistency", Some(v)) => match v.parse::<Consistency>() {
            Ok(c) => hints.consistency = Some(c),
            Err(e) => hints
                .errors
                .push(format!("bad tidemark hint 'consistency={v}': {e}")),
        },
        ("min_lsn", Some(v)) => match v.parse::<Lsn>() {
            Ok(l) => hints.min_lsn = Some(l),
            Err(e) => hints
                .errors
                .push(format!("bad tidemark hint 'min_lsn={v}': {e}")),
        },
        ("key", Some(v)) if !v.is_empty() => hints.key = Some(v.to_string()),
        ("key", Some(_)) => hints.errors.push(
            "bad tidemark hint 'key=': the key is empty; write key=VALUE, e.g. key=user:42"
                .to_string(),
        ),
        ("primary" | "replica", Some(v)) => hints.errors.push(format!(
            "bad tidemark hint '{word}': '{name}' takes no value (drop '={v}')"
        )),
        ("consistency" | "min_lsn" | "key", None) => hints.errors.push(format!(
            "bad tidemark hint '{word}': '{name}' needs a value, e.g. {}",
            match lname.as_str() {
                "consistency" => "consistency=eventual",
                "min_lsn" => "min_lsn=0/3000060",
                _ => "key=user:42",
            }
        )),
        _ => hints
            .errors
            .push(format!("unknown tidemark hint '{word}' ({VALID})")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn single_block_hint() {
        let h = scan_hints("/* tidemark: primary */ SELECT 1");
        assert_eq!(h.target, Some(HintTarget::Primary));
        assert!(h.errors.is_empty());
    }

    #[test]
    fn several_hints_commas_and_spaces() {
        let h =
            scan_hints("/* tidemark: replica, key=user:42 consistency=bounded(200ms) */ SELECT 1");
        assert_eq!(h.target, Some(HintTarget::Replica));
        assert_eq!(h.key.as_deref(), Some("user:42"));
        assert_eq!(
            h.consistency,
            Some(Consistency::Bounded(Duration::from_millis(200)))
        );
        assert!(h.errors.is_empty(), "{:?}", h.errors);
    }

    #[test]
    fn line_comment_hint() {
        let h = scan_hints("-- tidemark: key=user:42\nSELECT 1");
        assert_eq!(h.key.as_deref(), Some("user:42"));
        let h = scan_hints("  -- unrelated\n--tidemark: min_lsn=0/3000060\r\nSELECT 1");
        assert_eq!(h.min_lsn, Some(Lsn(0x300_0060)));
    }

    #[test]
    fn min_lsn_parses_and_malformed_is_an_error() {
        let h = scan_hints("/* tidemark: min_lsn=16/B374D848 */ SELECT 1");
        assert_eq!(h.min_lsn, Some(Lsn(0x16_B374_D848)));
        let h = scan_hints("/* tidemark: min_lsn=16-B374D848 */ SELECT 1");
        assert_eq!(h.min_lsn, None);
        assert_eq!(h.errors.len(), 1);
        assert!(
            h.errors[0].contains("min_lsn=16-B374D848"),
            "{}",
            h.errors[0]
        );
    }

    #[test]
    fn unknown_word_is_named() {
        let h = scan_hints("/* tidemark: replcia */ SELECT 1");
        assert_eq!(h.target, None);
        assert_eq!(
            h.errors,
            vec!["unknown tidemark hint 'replcia' (valid: primary, replica, consistency=..., min_lsn=..., key=...)".to_string()]
        );
    }

    #[test]
    fn bad_consistency_and_missing_values() {
        let h = scan_hints("/* tidemark: consistency=sometimes key min_lsn primary=1 */");
        assert_eq!(h.errors.len(), 4, "{:?}", h.errors);
        assert!(h.errors[0].contains("consistency=sometimes"));
        assert!(h.errors[1].contains("'key' needs a value"));
    }

    #[test]
    fn good_words_apply_next_to_bad_ones() {
        let h = scan_hints("/* tidemark: bogus, primary */ SELECT 1");
        assert_eq!(h.target, Some(HintTarget::Primary));
        assert_eq!(h.errors.len(), 1);
    }

    #[test]
    fn non_leading_comment_is_ignored() {
        let h = scan_hints("SELECT 1 /* tidemark: primary */");
        assert!(h.is_empty());
        let h = scan_hints("SELECT '/* tidemark: primary */'");
        assert!(h.is_empty());
    }

    #[test]
    fn string_literal_with_comment_opener_after_hint() {
        let h = scan_hints("/* tidemark: replica */ SELECT '/* tidemark: primary */', '/*'");
        assert_eq!(h.target, Some(HintTarget::Replica));
        assert!(h.errors.is_empty());
    }

    #[test]
    fn other_comments_skipped_and_nested_comments() {
        let h = scan_hints(
            "/* app: checkout */ /* outer /* inner */ still */ /* TIDEMARK: primary */ SELECT 1",
        );
        assert_eq!(h.target, Some(HintTarget::Primary));
        let h = scan_hints("/* note tidemark: primary */ SELECT 1");
        assert!(h.is_empty());
    }

    #[test]
    fn quoted_key_and_unterminated_comment() {
        let h = scan_hints("/* tidemark: key='user 42, eu' */ SELECT 1");
        assert_eq!(h.key.as_deref(), Some("user 42, eu"));
        let h = scan_hints("/* tidemark: primary");
        assert!(h.is_empty());
        assert!(scan_hints("").is_empty());
        assert!(scan_hints("--").is_empty());
        assert!(scan_hints("/*").is_empty());
    }

    #[test]
    fn last_word_wins() {
        let h = scan_hints("/* tidemark: primary */ -- tidemark: replica\nSELECT 1");
        assert_eq!(h.target, Some(HintTarget::Replica));
    }
}
