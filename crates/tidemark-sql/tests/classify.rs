//! Table-driven tests of statement classification: one row per rule of the classification spec.

use tidemark_sql::{Classifier, FunctionCatalog, FunctionPolicy, TxControl, Volatility};

mod corpus;

use corpus::{begin, tx, R, U, W};

#[test]
fn classification_table() {
    let c = Classifier::new(1000, FunctionPolicy::default());
    let mut failures = Vec::new();
    let rows = corpus::corpus();
    for case in &rows {
        let (sql, class, pins) = (case.sql, &case.class, case.pins);
        let a = c.classify(sql);
        if &a.class != class || a.pins_session != pins {
            failures.push(format!(
                "{sql:?}: got {:?} pins={} (statements {:?}), want {class:?} pins={pins}",
                a.class, a.pins_session, a.statements
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} rows failed:\n{}",
        failures.len(),
        rows.len(),
        failures.join("\n")
    );
}

/// Whether `set_config` pins depends on a literal: texts that differ only there must never
/// share the statement-shape cache entry.
#[test]
fn set_config_literal_is_never_merged_by_shape() {
    let c = Classifier::new(1000, FunctionPolicy::default());
    assert!(
        !c.classify("SELECT set_config('a.b', 'x', true)")
            .pins_session
    );
    assert!(
        c.classify("SELECT set_config('a.b', 'y', false)")
            .pins_session
    );
    assert!(
        !c.classify("SELECT set_config('a.b', 'z', true)")
            .pins_session
    );
    assert!(
        c.classify("select SET_CONFIG('a.b', 'w', false)")
            .pins_session
    );
}

#[test]
fn corpus_covers_the_spec() {
    let rows = corpus::corpus();
    assert!(rows.len() >= 150, "{} statements", rows.len());
    let mut seen = std::collections::HashSet::new();
    for case in &rows {
        assert!(
            seen.insert(case.sql),
            "duplicate corpus entry {:?}",
            case.sql
        );
    }
    let count = |f: &dyn Fn(&corpus::Case) -> bool| rows.iter().filter(|c| f(c)).count();
    let comments = count(&|c| c.sql.contains("/*") || c.sql.contains("--"));
    let dollar =
        count(&|c| c.sql.contains("$$") || c.sql.contains("$q$") || c.sql.contains("$body$"));
    let mixed_case = count(&|c| {
        let letters: Vec<char> = c
            .sql
            .chars()
            .filter(|ch| ch.is_ascii_alphabetic())
            .collect();
        let kw = c.sql.split_whitespace().next().unwrap_or("");
        kw.chars().any(|ch| ch.is_ascii_lowercase()) && !letters.is_empty()
    });
    let rejected = count(&|c| c.class == U || matches!(c.server, corpus::Server::Rejected(_)));
    assert!(comments >= 8, "{comments} statements with comments");
    assert!(dollar >= 5, "{dollar} statements with dollar quoting");
    assert!(
        mixed_case >= 5,
        "{mixed_case} statements in lower or mixed case"
    );
    assert!(rejected >= 10, "{rejected} statements PostgreSQL rejects");
}

#[test]
fn per_statement_classes_in_order() {
    let c = Classifier::new(10, FunctionPolicy::default());
    let a = c.classify("BEGIN; SELECT 1; UPDATE t SET a = 1; COMMIT");
    assert_eq!(
        a.statements,
        vec![begin(None, None, false), R, W, tx(TxControl::Commit)]
    );
    assert!(c.classify("").statements.is_empty());
    let bad = c.classify("SELEC 1");
    assert!(bad.statements.is_empty());
}

#[test]
fn catalog_volatility_decides_user_functions() {
    let c = Classifier::new(100, FunctionPolicy::default());
    let mut cat = FunctionCatalog::new();
    cat.insert("public", "touch_user", Volatility::Volatile);
    cat.insert("public", "user_name", Volatility::Stable);
    cat.insert("app", "pure", Volatility::Immutable);
    cat.insert("pg_catalog", "random", Volatility::Volatile);
    cat.insert("pg_catalog", "count", Volatility::Immutable);
    cat.insert("pg_catalog", "nextval", Volatility::Volatile);
    cat.insert("pg_catalog", "txid_current", Volatility::Stable);
    c.set_catalog(cat);
    let cases = [
        ("SELECT touch_user(1)", W),
        ("SELECT public.touch_user(1)", W),
        ("SELECT user_name(1)", R),
        ("SELECT app.pure(1), count(*) FROM t", R),
        ("SELECT random()", R),
        ("SELECT nextval('s')", W),
        // STABLE in pg_proc but assigns a transaction id: the built-in list wins.
        ("SELECT txid_current()", W),
        // Loaded catalog, function not in it: unknown function, write.
        ("SELECT lower('A')", W),
        ("SELECT other.user_name(1)", W),
        ("SELECT * FROM t WHERE x = (SELECT touch_user(1))", W),
        ("SELECT * FROM touch_user(1)", W),
    ];
    for (sql, want) in cases {
        assert_eq!(c.classify(sql).class, want, "{sql}");
    }
}

#[test]
fn policy_overrides_catalog() {
    let policy = FunctionPolicy {
        write_functions: vec!["billing.charge".into(), "audit_read".into()],
        read_only_functions: vec!["Report_Refresh".into(), "nextval".into()],
    };
    let c = Classifier::new(100, policy);
    let mut cat = FunctionCatalog::new();
    cat.insert("billing", "charge", Volatility::Stable);
    cat.insert("public", "audit_read", Volatility::Immutable);
    cat.insert("public", "report_refresh", Volatility::Volatile);
    c.set_catalog(cat);
    assert_eq!(c.classify("SELECT billing.charge(1)").class, W);
    assert_eq!(c.classify("SELECT audit_read()").class, W);
    assert_eq!(c.classify("SELECT report_refresh()").class, R);
    // The operator may even declare a built-in writer read-only.
    assert_eq!(c.classify("SELECT nextval('s')").class, R);
    // Policy applies without a catalog too.
    let c2 = Classifier::new(
        10,
        FunctionPolicy {
            write_functions: vec![],
            read_only_functions: vec!["my_read".into()],
        },
    );
    assert_eq!(c2.classify("SELECT my_read()").class, R);
    assert_eq!(c2.classify("SELECT my_other()").class, W);
}

#[test]
fn hints_come_with_the_analysis() {
    let c = Classifier::new(10, FunctionPolicy::default());
    let a = c.classify("/* tidemark: replica, key=user:42 */ SELECT * FROM t WHERE id = $1");
    assert_eq!(a.class, R);
    assert_eq!(a.hints.target, Some(tidemark_sql::HintTarget::Replica));
    assert_eq!(a.hints.key.as_deref(), Some("user:42"));
    let a = c.classify("/* tidemark: min_lsn=0/3000060 */ SELECT 1");
    assert_eq!(a.hints.min_lsn, Some(tidemark_core::Lsn(0x300_0060)));
    // Hints on unparsable text are still reported.
    let a = c.classify("/* tidemark: primary */ SELEC 1");
    assert_eq!(a.class, U);
    assert_eq!(a.hints.target, Some(tidemark_sql::HintTarget::Primary));
}

#[test]
fn deep_nesting_does_not_crash() {
    let c = Classifier::new(10, FunctionPolicy::default());
    for n in [10usize, 150, 1000, 20_000] {
        let sql = format!("SELECT {}1{}", "(".repeat(n), ")".repeat(n));
        let _ = c.classify(&sql);
        let sql = format!("SELECT {}", vec!["1"; n].join(" + "));
        let _ = c.classify(&sql);
        let sql = format!("SELECT {}1{}", "ARRAY[".repeat(n), "]".repeat(n));
        let _ = c.classify(&sql);
        let sql = format!("SELECT {} 1", "(SELECT".repeat(n.min(2000)));
        let _ = c.classify(&sql);
    }
}

#[test]
fn worst_case_inline_parse_fits_a_tokio_sized_stack() {
    // The deepest tree a text of INLINE_PARSE_LIMIT bytes can produce, parsed on the caller's
    // stack, on a thread with tokio's default worker stack of 2 MiB.
    let terms = (tidemark_sql::INLINE_PARSE_LIMIT - "SELECT ".len()) / 2;
    let sql = format!("SELECT {}", vec!["1"; terms + 1].join("+"));
    assert!(sql.len() <= tidemark_sql::INLINE_PARSE_LIMIT + 1);
    let sql = sql[..tidemark_sql::INLINE_PARSE_LIMIT].to_string();
    std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(move || {
            let c = Classifier::new(10, FunctionPolicy::default());
            let _ = c.classify(&sql);
        })
        .unwrap()
        .join()
        .unwrap();
}

#[test]
fn text_over_parse_limit_is_unknown_with_hints() {
    let c = Classifier::new(10, FunctionPolicy::default());
    let sql = format!(
        "/* tidemark: primary */ SELECT '{}'",
        "x".repeat(tidemark_sql::MAX_PARSE_TEXT)
    );
    let a = c.classify(&sql);
    assert_eq!(a.class, U);
    assert_eq!(a.hints.target, Some(tidemark_sql::HintTarget::Primary));
    // Just under the limit: parsed on a big-stack thread.
    let sql = format!("SELECT '{}'", "x".repeat(tidemark_sql::MAX_PARSE_TEXT - 20));
    assert_eq!(c.classify(&sql).class, R);
}

#[test]
fn deep_expression_is_never_read_when_undecidable() {
    let c = Classifier::new(10, FunctionPolicy::default());
    let sql = format!("SELECT {} + nextval('s')", vec!["1"; 500].join(" + "));
    assert_ne!(c.classify(&sql).class, R);
}

/// The COPY flag (the proxy sends no pipelined query behind a unit that may be a COPY, and
/// does not ride a replica check with it): set by a COPY at any position and by text that
/// cannot be read, not by the word in a name or a string.
#[test]
fn copy_is_flagged_from_the_parse_not_the_text() {
    let c = Classifier::new(100, FunctionPolicy::default());
    for sql in [
        "COPY t FROM STDIN",
        "copy t to stdout",
        "COPY (SELECT 1) TO STDOUT",
        "SELECT 1; COPY t FROM STDIN",
        "SELEC nonsense (",
    ] {
        assert!(c.classify(sql).copy, "{sql}");
    }
    for sql in [
        "SELECT copy_count FROM copies WHERE note = 'copy'",
        "INSERT INTO t VALUES (1)",
        "SELECT 1",
    ] {
        assert!(!c.classify(sql).copy, "{sql}");
    }
}
