//! Property tests: classification and hint scanning never panic, whatever the input.

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
    }

    #[test]
    fn classify_lossy_bytes(s in bytes_lossy()) {
        let c = Classifier::new(16, FunctionPolicy::default());
        let _ = c.classify(&s);
        let _ = scan_hints(&s);
    }

    #[test]
    fn classify_token_soup(s in token_soup()) {
        let c = Classifier::new(16, FunctionPolicy::default());
        let a = c.classify(&s);
        if s.contains('\0') {
            prop_assert_eq!(&a.class, &Class::Unknown);
        }
        let _ = scan_hints(&s);
    }

    #[test]
    fn hints_any_comment(body in ".{0,80}") {
        let _ = scan_hints(&format!("/* tidemark: {body} */ SELECT 1"));
        let _ = scan_hints(&format!("-- tidemark: {body}"));
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
