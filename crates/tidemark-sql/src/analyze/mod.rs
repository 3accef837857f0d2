//! Turning one query text into an `Analysis`: parse with PostgreSQL's parser (`pg_query`), give
//! each statement a `Class`, and walk read statements' expression trees for things that write
//! (locking clauses, `SELECT INTO`, writable CTEs, writing function calls) or pin the session.
//!
//! The walker knows every node type that can appear in a raw `SELECT`; if it meets one it does
//! not know (a future PostgreSQL version), the statement is treated as a write.
//!
//! Parts: `statement` gives each statement its `Class`, `session` reads SET / transaction
//! options, `walk` walks expression trees, `signal` recognises backend-signal calls.

use pg_query::protobuf as pb;

use crate::class::{combine, Analysis, Class};
use crate::functions::FunctionRules;
use crate::hints::scan_hints;

mod session;
mod signal;
mod statement;
mod walk;

pub use signal::{backend_signal, BackendSignal, SignalPid};

/// Texts up to this size are parsed on the caller's stack. PostgreSQL's parser and
/// libpg_query's tree serialiser recurse once per nesting level (about 400 bytes of stack each,
/// measured), and a text of `n` bytes nests at most `n / 2` levels (`1+1+1…`), so 2 KiB needs at
/// most ~400 KiB — safe on a 2 MiB tokio worker thread.
pub const INLINE_PARSE_LIMIT: usize = 2 * 1024;
/// Longer texts are parsed on a short-lived thread whose stack grows with the text
/// (`8 MiB + 512 bytes per byte of text`); texts longer than this are not parsed at all and
/// classify as `Unknown` (the primary), because a 1 MiB text may already need 256 MiB of stack.
pub const MAX_PARSE_TEXT: usize = 1024 * 1024;

/// PostgreSQL's lexer is quadratic in the length of a run of operator characters outside
/// string literals (`/*/*/*…`: it matches the whole run, then backs up; 200 KB took 54 s).
/// Texts containing a longer run of such characters (anywhere, even inside a literal) are not
/// parsed and classify as `Unknown` (the primary).
pub const MAX_OPERATOR_RUN: usize = 256;

fn longest_operator_run(sql: &str) -> usize {
    let mut longest = 0;
    let mut run = 0;
    for &b in sql.as_bytes() {
        if matches!(
            b,
            b'~' | b'!'
                | b'@'
                | b'#'
                | b'^'
                | b'&'
                | b'|'
                | b'`'
                | b'?'
                | b'+'
                | b'-'
                | b'*'
                | b'/'
                | b'%'
                | b'<'
                | b'>'
                | b'='
        ) {
            run += 1;
            longest = longest.max(run);
        } else {
            run = 0;
        }
    }
    longest
}

/// Parses `sql` without risking the caller's stack or CPU. `None` for syntax errors, texts over
/// [`MAX_PARSE_TEXT`], texts with an operator run over [`MAX_OPERATOR_RUN`], NUL bytes, or if
/// the parse could not run.
fn parse_guarded(sql: &str) -> Option<pg_query::ParseResult> {
    let parse = || std::panic::catch_unwind(|| pg_query::parse(sql)).ok()?.ok();
    if sql.len() > MAX_PARSE_TEXT || longest_operator_run(sql) > MAX_OPERATOR_RUN {
        return None;
    }
    if sql.len() <= INLINE_PARSE_LIMIT {
        return parse();
    }
    let stack = (8 << 20) + sql.len() * 512;
    std::thread::scope(|s| {
        std::thread::Builder::new()
            .name("tidemark-sql-parse".into())
            .stack_size(stack)
            .spawn_scoped(s, parse)
            .ok()?
            .join()
            .ok()?
    })
}

/// Parses and classifies `sql`. Never panics; unparsable text is `Class::Unknown`.
pub(crate) fn analyze(sql: &str, rules: &FunctionRules) -> Analysis {
    let hints = scan_hints(sql);
    let parsed = match parse_guarded(sql) {
        Some(p) => p,
        None => {
            return Analysis {
                class: Class::Unknown,
                statements: Vec::new(),
                pins_session: false,
                // Unparsable: nothing is known about what it does.
                opaque_state: true,
                signal_call: false,
                ends_sessions: None,
                hints,
                copy: true,
            };
        }
    };
    let mut cx = Cx {
        rules,
        sql,
        pins: false,
        opaque: false,
        primary_only: false,
        ends_sessions: None,
        copy: false,
    };
    let statements: Vec<Class> = parsed
        .protobuf
        .stmts
        .iter()
        .map(
            |raw| match raw.stmt.as_deref().and_then(|n| n.node.as_ref()) {
                Some(node) => cx.statement(node),
                None => {
                    cx.copy = true;
                    Class::Unknown
                }
            },
        )
        .collect();
    let signal_call = statements.len() == 1 && backend_signal(sql).is_some();
    let mut hints = hints;
    if cx.primary_only && hints.target.is_none() {
        hints.target = Some(crate::hints::HintTarget::Primary);
    }
    Analysis {
        class: combine(&statements),
        statements,
        pins_session: cx.pins,
        opaque_state: cx.opaque,
        signal_call,
        ends_sessions: cx.ends_sessions,
        hints,
        copy: cx.copy,
    }
}

struct Cx<'a> {
    rules: &'a FunctionRules,
    sql: &'a str,
    pins: bool,
    opaque: bool,
    /// A statement whose answer differs on a standby (`SHOW transaction_read_only`).
    primary_only: bool,
    /// The first statement that drops or renames a database or role.
    ends_sessions: Option<crate::class::SessionsOf>,
    /// A `COPY` statement (at any depth the parser allows: `EXPLAIN` cannot hold one).
    copy: bool,
}

/// What a walk over an expression tree found.
#[derive(Default)]
struct Scan {
    writes: bool,
    pins: bool,
    temp: bool,
    /// Calls a function that is not a known built-in.
    opaque: bool,
}

fn is_temp(rel: Option<&pb::RangeVar>) -> bool {
    rel.is_some_and(|r| r.relpersistence == "t")
}
