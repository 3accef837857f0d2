//! tidemark-sql: what a query text does, as far as routing cares — read, write, transaction
//! control, session state, or a command for tidemark itself — decided with PostgreSQL's own
//! parser (`pg_query`) and cached by text; plus the `tidemark:` hint comments that lead a
//! statement. Pure: no I/O, no routing.
//!
//! ```
//! use tidemark_sql::{Class, Classifier, FunctionPolicy, HintTarget};
//!
//! let c = Classifier::new(1024, FunctionPolicy::default());
//! assert_eq!(c.classify("SELECT * FROM t WHERE id = $1").class, Class::Read);
//! assert_eq!(c.classify("SELECT * FROM t FOR UPDATE").class, Class::Write);
//! let a = c.classify("/* tidemark: primary */ SELECT 1");
//! assert_eq!(a.hints.target, Some(HintTarget::Primary));
//! ```
//!
//! Modules: [`class`] (result types and the multi-statement rule), [`classifier`] (shared entry
//! point and cache), [`functions`] (which function calls write), [`hints`] (hint comments);
//! [`analyze`] parses (guarding the stack) and walks the parse tree.

pub mod analyze;
pub mod class;
pub mod classifier;
pub mod comment;
pub mod functions;
pub mod hints;
mod lex;
mod normalize;

pub use analyze::{
    backend_signal, BackendSignal, SignalPid, INLINE_PARSE_LIMIT, MAX_OPERATOR_RUN, MAX_PARSE_TEXT,
};
pub use class::{
    combine, Analysis, Class, SessionKind, SessionsOf, TidemarkCommand, TxControl, TxDefaults,
};
pub use classifier::{Classifier, MAX_CACHED_TEXT};
pub use comment::{scan_sqlcommenter, split_trailing_comment, DEFAULT_KEY_ATTRIBUTE};
pub use functions::{FunctionCatalog, FunctionPolicy, Volatility};
pub use hints::{scan_hints, HintTarget, Hints};
pub use normalize::normalize;
