//! Property tests: classification and hint scanning never panic, whatever the input, and a text
//! is never `Read` unless PostgreSQL's parser accepts it.

mod corpus;

use proptest::prelude::*;
use tidemark_sql::{scan_hints, Class, Classifier, FunctionPolicy};

const TOKENS: &[&str] = &[
    "SELECT",
    "INSERT",
    "INTO",
    "VALUES",
    "UPDATE",
    "SET",
    "DELETE",
    "FROM",
    "WHERE",
    "WITH",
    "AS",
    "(",
    ")",
    ",",
    ";",
    "*",
    "1",
    "$1",
    "'x'",
    "t",
    "nextval('s')",
    "FOR UPDATE",
    "RETURNING",
    "BEGIN",
    "COMMIT",
    "tidemark.consistency",
    "=",
    "SHOW",
    "RESET",
    "EXPLAIN",
    "ANALYZE",
    "COPY",
    "TO",
    "STDOUT",
    "/*",
    "*/",
    "--",
    "\n",
    "tidemark:",
    "primary",
    "key=a",
    "min_lsn=0/1",
    "E'\\\\'",
    "$$",
    "::int",
    "[",
    "]",
    "ARRAY",
    "CASE",
    "WHEN",
    "THEN",
    "END",
    "\0",
    "é",
    "\u{feff}",
    "LISTEN",
    "DECLARE",
    "CURSOR",
    "HOLD",
    "TEMP",
    "TABLE",
    "CREATE",
];

/// A `Read` must be a text PostgreSQL's parser accepts (`pg_query::parse`, the same grammar).
fn read_only_if_it_parses(s: &str, class: &Class) -> Result<(), TestCaseError> {
    if *class == Class::Read {
        prop_assert!(
            pg_query::parse(s).is_ok(),
            "classified Read but does not parse: {:?}",
            s
        );
    }
    Ok(())
}

/// A corpus statement with one random edit: a cut, a deletion or an inserted character —
/// texts close to valid SQL, where "parses or not" is decided by a single character.
fn edited_corpus() -> impl Strategy<Value = String> {
    let sqls: Vec<&'static str> = corpus::corpus().iter().map(|c| c.sql).collect();
    (
        prop::sample::select(sqls),
        any::<prop::sample::Index>(),
        any::<prop::sample::Index>(),
        prop::char::any(),
        0..3u8,
    )
        .prop_map(|(sql, at, len, ch, op)| {
            let chars: Vec<char> = sql.chars().collect();
            let at = at.index(chars.len() + 1);
            let mut out = chars.clone();
            match op {
                0 => out.truncate(at),
                1 => {
                    let end = (at + 1 + len.index(8)).min(chars.len());
                    out.drain(at.min(end)..end);
                }
                _ => out.insert(at, ch),
            }
            out.into_iter().collect()
        })
}

fn token_soup() -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(TOKENS), 0..40).prop_map(|v| v.join(" "))
}

fn bytes_lossy() -> impl Strategy<Value = String> {
    prop::collection::vec(any::<u8>(), 0..300)
        .prop_map(|b| String::from_utf8_lossy(&b).into_owned())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn classify_any_string(s in ".{0,200}") {
        let c = Classifier::new(16, FunctionPolicy::default());
        let a = c.classify(&s);
        // Determinism through the cache.
        prop_assert_eq!(&*c.classify(&s), &*a);
        read_only_if_it_parses(&s, &a.class)?;
    }

    #[test]
    fn classify_lossy_bytes(s in bytes_lossy()) {
        let c = Classifier::new(16, FunctionPolicy::default());
        let a = c.classify(&s);
        read_only_if_it_parses(&s, &a.class)?;
        let _ = scan_hints(&s);
    }

    #[test]
    fn classify_token_soup(s in token_soup()) {
        let c = Classifier::new(16, FunctionPolicy::default());
        let a = c.classify(&s);
        if s.contains('\0') {
            prop_assert_eq!(&a.class, &Class::Unknown);
        }
        read_only_if_it_parses(&s, &a.class)?;
        let _ = scan_hints(&s);
    }

    #[test]
    fn classify_edited_corpus(s in edited_corpus()) {
        let c = Classifier::new(16, FunctionPolicy::default());
        let a = c.classify(&s);
        read_only_if_it_parses(&s, &a.class)?;
    }

    #[test]
    fn hints_any_comment(body in ".{0,80}") {
        let _ = scan_hints(&format!("/* tidemark: {body} */ SELECT 1"));
        let _ = scan_hints(&format!("-- tidemark: {body}"));
    }
}

#[test]
fn truncated_corpus_is_never_read_unless_it_parses() {
    let c = Classifier::new(16, FunctionPolicy::default());
    for case in corpus::corpus() {
        for (at, _) in case.sql.char_indices().chain([(case.sql.len(), ' ')]) {
            let s = &case.sql[..at];
            if c.classify(s).class == Class::Read {
                assert!(
                    pg_query::parse(s).is_ok(),
                    "classified Read but does not parse: {s:?}"
                );
            }
        }
    }
}

#[test]
fn huge_and_repetitive_inputs() {
    let c = Classifier::new(4, FunctionPolicy::default());
    for s in [
        "/*".repeat(100_000),
        format!("SELECT 1 {} 1", "+-".repeat(100_000)),
        format!("SELECT 1 /* {} */", "/*-".repeat(80)),
        "--".repeat(100_000),
        "'".repeat(100_001),
        "SELECT 1;".repeat(20_000),
        format!("SELECT {}", "a,".repeat(100_000) + "a"),
        "\0".repeat(1000),
    ] {
        let t = std::time::Instant::now();
        let _ = c.classify(&s);
        let _ = scan_hints(&s);
        // PostgreSQL's lexer is quadratic in operator runs; the guard keeps this bounded.
        assert!(
            t.elapsed() < std::time::Duration::from_secs(5),
            "{} bytes took {:?}",
            s.len(),
            t.elapsed()
        );
    }
}
