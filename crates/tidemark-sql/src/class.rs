//! The result types of classification (`Class`, `TxControl`, `SessionKind`, `TidemarkCommand`,
//! `Analysis`) and the rule that combines the classes of several statements sent in one text.

use crate::hints::Hints;

/// What a statement (or a whole query text) does, as far as routing is concerned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Class {
    /// Only reads; may go to a replica.
    Read,
    /// May write or otherwise change the primary: always the primary.
    Write,
    /// Transaction control (`BEGIN`, `COMMIT`, `SAVEPOINT`, `SET TRANSACTION` …).
    Transaction(TxControl),
    /// Changes per-connection state the proxy must track or re-establish.
    SessionState(SessionKind),
    /// `SET tidemark.x = v`, `RESET tidemark.x`, `SHOW tidemark.x` — handled by the proxy, never
    /// sent to a server.
    Tidemark(TidemarkCommand),
    /// Unparsable or not recognised; route as if it wrote.
    Unknown,
}

/// Transaction control statements.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TxControl {
    /// `BEGIN` / `START TRANSACTION` with its options. `read_only` is `Some` when the
    /// statement names an access mode (`READ ONLY`: `Some(true)`, `READ WRITE`: `Some(false)`);
    /// `None` takes the session's `default_transaction_read_only`. `isolation` is lowercase,
    /// e.g. `"repeatable read"`; `None` takes `default_transaction_isolation`.
    Begin {
        read_only: Option<bool>,
        isolation: Option<String>,
        deferrable: bool,
    },
    /// `COMMIT` / `END` (also `COMMIT AND CHAIN`).
    Commit,
    /// `ROLLBACK` / `ABORT`.
    Rollback,
    /// `SAVEPOINT x`.
    Savepoint,
    /// `RELEASE [SAVEPOINT] x`.
    Release,
    /// `ROLLBACK TO [SAVEPOINT] x`.
    RollbackTo,
    /// `PREPARE TRANSACTION 'gid'`.
    PrepareTransaction,
    /// `COMMIT PREPARED 'gid'`.
    CommitPrepared,
    /// `ROLLBACK PREPARED 'gid'`.
    RollbackPrepared,
    /// `SET TRANSACTION …` inside a transaction.
    SetTransaction { read_only: bool },
}

/// Statements that change per-connection state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SessionKind {
    /// `SET [SESSION|LOCAL] name = value`. `name` is lowercase (`SET TIME ZONE` is `timezone`,
    /// `SET NAMES` is `client_encoding`, `SET SCHEMA` is `search_path`, `SET ROLE` is `role`,
    /// `SET SESSION AUTHORIZATION` is `session_authorization`). `value_sql` is SQL that can follow
    /// `SET name TO ` to re-establish the value on another connection (string constants quoted,
    /// identifiers and numbers bare); `None` means `SET name TO DEFAULT`.
    ///
    /// `SET SESSION CHARACTERISTICS AS TRANSACTION <one option>` is reported as the equivalent
    /// `default_transaction_read_only` / `default_transaction_isolation` /
    /// `default_transaction_deferrable` setting; with several options it is `SetSeveral`.
    Set {
        local: bool,
        name: String,
        value_sql: Option<String>,
    },
    /// `SET SESSION CHARACTERISTICS AS TRANSACTION` with several options: the equivalent
    /// settings `(name, value_sql)` in the order written (see `Set`).
    SetSeveral {
        local: bool,
        sets: Vec<(String, String)>,
    },
    /// `RESET name` (`Some`, lowercase) or `RESET ALL` (`None`).
    Reset { name: Option<String> },
    /// `LISTEN channel` (pins the session).
    Listen,
    /// `UNLISTEN channel` / `UNLISTEN *`.
    Unlisten,
    /// SQL-level `PREPARE name AS …` (pins the session).
    Prepare,
    /// `DEALLOCATE [PREPARE] name` (`Some`, as written) or `DEALLOCATE ALL` (`None`).
    Deallocate { name: Option<String> },
    /// `DECLARE … CURSOR WITH HOLD FOR …` (pins the session).
    DeclareWithHold,
    /// `DECLARE … CURSOR FOR …` without HOLD (lives in the transaction).
    Declare,
    /// `DISCARD ALL` (`all`) or `DISCARD PLANS|SEQUENCES|TEMP`.
    Discard { all: bool },
    /// Creates a temporary relation: `CREATE TEMP TABLE`, `CREATE TEMP TABLE … AS`,
    /// `SELECT … INTO TEMP`, `CREATE TEMP VIEW`, `CREATE TEMP SEQUENCE` (pins the session).
    CreateTempTable,
    /// Anything else tied to the connection or the current transaction: `FETCH`, `MOVE`,
    /// `CLOSE`, `SET CONSTRAINTS`, `LOAD`, `SET … FROM CURRENT`.
    Other,
}

/// A statement addressed to tidemark itself. `name` is lowercase without the `tidemark.` prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TidemarkCommand {
    /// `SET tidemark.name = value` (`value` unquoted; several values joined with `,`).
    Set { name: String, value: String },
    /// `RESET tidemark.name` or `SET tidemark.name TO DEFAULT`.
    Reset { name: String },
    /// `SHOW tidemark.name`.
    Show { name: String },
}

/// A statement PostgreSQL refuses, or that leaves pooled sessions behind, while sessions of a
/// database or a role exist: tidemark first closes its own idle server connections to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SessionsOf {
    /// `DROP DATABASE name [WITH (FORCE)]`, `ALTER DATABASE name RENAME TO …`.
    Database { name: String, force: bool },
    /// `DROP ROLE|USER|GROUP a, b`, `ALTER ROLE|USER a RENAME TO …`.
    Roles(Vec<String>),
}

/// Everything tidemark needs to know about one query text.
#[derive(Clone, Debug, PartialEq)]
pub struct Analysis {
    /// The combined class of the whole text; see [`combine`].
    pub class: Class,
    /// The class of each statement, in order. Empty for an empty text (whose class is `Read`)
    /// and for unparsable text (whose class is `Unknown`).
    pub statements: Vec<Class>,
    /// The client must stay on one primary connection from now on: `LISTEN`, session-level
    /// advisory locks (`pg_advisory_lock`, not `pg_advisory_xact_lock`), temporary relations,
    /// `DECLARE … WITH HOLD`, SQL-level `PREPARE`.
    pub pins_session: bool,
    /// The text may change session state tidemark cannot follow: a `DO` block, `CALL`, or a
    /// call of a function that is not a known built-in (it may run `set_config`, `SET ROLE`,
    /// create temp tables, take advisory locks, `LISTEN`). A server connection that ran it is
    /// reset completely (`DISCARD ALL`) before anyone uses it again.
    pub opaque_state: bool,
    /// The text is `SELECT pg_terminate_backend(…)` / `pg_cancel_backend(…)` of one literal or
    /// parameter (see [`crate::backend_signal`]): the proxy looks at the pid it names.
    pub signal_call: bool,
    /// The text drops or renames a database or a role (the first such statement).
    pub ends_sessions: Option<SessionsOf>,
    /// `tidemark:` hints from the leading comments.
    pub hints: Hints,
    /// The text has a `COPY` statement, or cannot be read (and so may have one): its answers
    /// may ask the client for data or stream rows as CopyData.
    pub copy: bool,
}

impl Analysis {
    /// Combines the analyses of the statements of one routing unit (several Parse/Query
    /// messages up to Sync): the strongest class wins ([`combine`]), the statements are
    /// concatenated, any flag set by one part is set, hints come from the first part that has
    /// any. One part is returned as it is; none is an empty read.
    pub fn combine(parts: &[std::sync::Arc<Analysis>]) -> std::sync::Arc<Analysis> {
        use std::sync::Arc;
        if let [one] = parts {
            return one.clone();
        }
        if parts.is_empty() {
            return Arc::new(Analysis {
                class: Class::Read,
                statements: vec![],
                pins_session: false,
                opaque_state: false,
                signal_call: false,
                ends_sessions: None,
                hints: Default::default(),
                copy: false,
            });
        }
        let statements: Vec<Class> = parts
            .iter()
            .flat_map(|a| a.statements.iter().cloned())
            .collect();
        let classes: Vec<Class> = parts.iter().map(|a| a.class.clone()).collect();
        let hints = parts
            .iter()
            .find(|a| a.hints != Default::default())
            .map(|a| a.hints.clone())
            .unwrap_or_default();
        Arc::new(Analysis {
            class: combine(&classes),
            statements,
            pins_session: parts.iter().any(|a| a.pins_session),
            opaque_state: parts.iter().any(|a| a.opaque_state),
            signal_call: parts.iter().any(|a| a.signal_call),
            ends_sessions: parts.iter().find_map(|a| a.ends_sessions.clone()),
            hints,
            copy: parts.iter().any(|a| a.copy),
        })
    }
}

/// The session's transaction defaults, as far as routing cares: `default_transaction_read_only`
/// and whether `default_transaction_isolation` is `serializable` (set by `SET`, `SET SESSION
/// CHARACTERISTICS AS TRANSACTION` or a startup option). Fold the session's settings in with
/// [`TxDefaults::apply`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TxDefaults {
    pub read_only: bool,
    pub serializable: bool,
}

impl TxDefaults {
    /// Folds in one session setting `SET name TO value_sql` (`None`: `TO DEFAULT`, taken as
    /// PostgreSQL's built-in default). Other names are ignored.
    pub fn apply(&mut self, name: &str, value_sql: Option<&str>) {
        let value = value_sql.map(unquote);
        match name {
            "default_transaction_read_only" => {
                self.read_only = value.as_deref().and_then(parse_bool).unwrap_or(false);
            }
            "default_transaction_isolation" => {
                self.serializable = value
                    .as_deref()
                    .is_some_and(|v| v.trim().eq_ignore_ascii_case("serializable"));
            }
            _ => {}
        }
    }

    /// Folds in one statement's class (a `Set` or `SetSeveral` of session scope).
    pub fn apply_class(&mut self, c: &Class) {
        match c {
            Class::SessionState(SessionKind::Set {
                local: false,
                name,
                value_sql,
            }) => self.apply(name, value_sql.as_deref()),
            Class::SessionState(SessionKind::SetSeveral { local: false, sets }) => {
                for (name, value_sql) in sets {
                    self.apply(name, Some(value_sql));
                }
            }
            _ => {}
        }
    }
}

/// A SQL constant as its text: `'on'`, `E'on'` and `on` are all `on`.
fn unquote(v: &str) -> String {
    let v = v.trim();
    let body = v
        .strip_prefix(['E', 'e'])
        .filter(|r| r.starts_with('\''))
        .unwrap_or(v);
    match body.strip_prefix('\'').and_then(|r| r.strip_suffix('\'')) {
        Some(inner) => inner.replace("''", "'"),
        None => body.to_string(),
    }
}

/// PostgreSQL's boolean spellings (`parse_bool`): unique prefixes of `true`/`false`/`yes`/`no`,
/// `on`/`off` (at least `of`), `1`/`0`, any case.
fn parse_bool(v: &str) -> Option<bool> {
    let v = v.trim().to_ascii_lowercase();
    let prefix_of = |word: &str, min: usize| v.len() >= min && word.starts_with(v.as_str());
    if prefix_of("true", 1) || prefix_of("yes", 1) || v == "on" || v == "1" {
        Some(true)
    } else if prefix_of("false", 1) || prefix_of("no", 1) || prefix_of("off", 2) || v == "0" {
        Some(false)
    } else {
        None
    }
}

impl Analysis {
    /// What counts as a read with PostgreSQL's built-in transaction defaults; see
    /// [`Analysis::is_read_in`].
    pub fn is_read(&self) -> bool {
        self.is_read_in(TxDefaults::default())
    }

    /// What counts as a read: a text that may run on a replica, in a session with the
    /// transaction defaults `d`. A `Read`, or a `BEGIN` whose transaction is read-only (`READ
    /// ONLY`, or no access mode with `default_transaction_read_only` on) — but nothing that runs
    /// at `SERIALIZABLE` (written in the `BEGIN`, or the session's default), which a hot
    /// standby refuses ("cannot use serializable mode in a hot standby"). Never a text with a
    /// `tidemark: primary` hint, or with hints tidemark could not read (the statement goes to
    /// the primary, with a warning). The proxy adds the protocol's own condition: the unit
    /// must end with Sync or be a simple query, because what follows a Flush may write on the
    /// same connection.
    pub fn is_read_in(&self, d: TxDefaults) -> bool {
        if self.hints.target == Some(crate::HintTarget::Primary) || !self.hints.errors.is_empty() {
            return false;
        }
        match &self.class {
            Class::Read => !d.serializable,
            Class::Transaction(TxControl::Begin {
                read_only,
                isolation,
                ..
            }) => {
                let serializable = match isolation {
                    Some(i) => i == "serializable",
                    None => d.serializable,
                };
                read_only.unwrap_or(d.read_only) && !serializable
            }
            _ => false,
        }
    }
}

impl Class {
    /// The class as a metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Class::Read => "read",
            Class::Write => "write",
            Class::Transaction(_) => "transaction",
            Class::SessionState(_) => "session_state",
            Class::Tidemark(_) => "tidemark",
            Class::Unknown => "unknown",
        }
    }

    /// True for classes that must run on the primary when outside a transaction: `Write` and
    /// `Unknown`.
    pub fn may_write(&self) -> bool {
        matches!(self, Class::Write | Class::Unknown)
    }

    fn rank(&self) -> u8 {
        match self {
            Class::Read => 0,
            Class::Transaction(_) | Class::SessionState(_) => 1,
            Class::Unknown => 2,
            Class::Write => 3,
            Class::Tidemark(_) => 4,
        }
    }
}

/// The class of a text made of `statements`:
///
/// - no statement: `Read` (an empty query is harmless);
/// - one statement: its class;
/// - several statements and any of them is a `Tidemark` command: `Unknown` — tidemark commands
///   must be sent alone, the proxy rejects the mix with an error;
/// - otherwise the strongest class by the precedence `Write > Unknown > SessionState /
///   Transaction > Read`; among several `SessionState`/`Transaction` statements of the strongest
///   rank, the first one. A multi-statement text that is not all `Read` goes to the primary as
///   a whole.
pub fn combine(statements: &[Class]) -> Class {
    match statements {
        [] => Class::Read,
        [one] => one.clone(),
        many => {
            if many.iter().any(|c| matches!(c, Class::Tidemark(_))) {
                return Class::Unknown;
            }
            let mut best = &many[0];
            for c in &many[1..] {
                if c.rank() > best.rank() {
                    best = c;
                }
            }
            best.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_counts_as_a_read() {
        let c = crate::Classifier::new(10, crate::FunctionPolicy::default());
        for (sql, read) in [
            ("SELECT 1", true),
            ("SELECT * FROM t WHERE id = $1", true),
            ("BEGIN READ ONLY", true),
            (
                "START TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY",
                true,
            ),
            ("BEGIN", false),
            ("BEGIN READ WRITE", false),
            ("BEGIN ISOLATION LEVEL SERIALIZABLE READ ONLY", false),
            (
                "BEGIN ISOLATION LEVEL SERIALIZABLE, READ ONLY, DEFERRABLE",
                false,
            ),
            ("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY", true),
            ("INSERT INTO t VALUES (1)", false),
            ("SELECT 1; INSERT INTO t VALUES (1)", false),
            ("SELECT nextval('s')", false),
            ("SET search_path = a", false),
            ("/* tidemark: primary */ SELECT 1", false),
            ("/* tidemark: no-such-hint */ SELECT 1", false),
            ("/* tidemark: replica */ SELECT 1", true),
            ("not sql at all", false),
        ] {
            assert_eq!(c.classify(sql).is_read(), read, "{sql}");
        }
    }

    #[test]
    fn reads_under_the_sessions_transaction_defaults() {
        let c = crate::Classifier::new(10, crate::FunctionPolicy::default());
        let ro = TxDefaults {
            read_only: true,
            serializable: false,
        };
        let ser = TxDefaults {
            read_only: false,
            serializable: true,
        };
        let both = TxDefaults {
            read_only: true,
            serializable: true,
        };
        for (sql, d, read) in [
            ("BEGIN", ro, true),
            ("START TRANSACTION", ro, true),
            ("BEGIN; SELECT 1; COMMIT", ro, true),
            ("BEGIN READ WRITE", ro, false),
            ("BEGIN ISOLATION LEVEL REPEATABLE READ", ro, true),
            ("BEGIN ISOLATION LEVEL SERIALIZABLE", ro, false),
            // A hot standby refuses serializable, in a transaction or not.
            ("BEGIN", both, false),
            ("SELECT 1", ser, false),
            ("BEGIN READ ONLY", ser, false),
            ("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY", ser, true),
            ("BEGIN ISOLATION LEVEL REPEATABLE READ", both, true),
            ("SELECT 1", ro, true),
            ("/* tidemark: primary */ BEGIN", ro, false),
        ] {
            assert_eq!(c.classify(sql).is_read_in(d), read, "{sql} with {d:?}");
        }
    }

    #[test]
    fn transaction_defaults_from_settings() {
        let c = crate::Classifier::new(10, crate::FunctionPolicy::default());
        let fold = |sqls: &[&str]| {
            let mut d = TxDefaults::default();
            for s in sqls {
                for st in &c.classify(s).statements {
                    d.apply_class(st);
                }
            }
            d
        };
        assert!(fold(&["SET default_transaction_read_only = on"]).read_only);
        assert!(fold(&["SET default_transaction_read_only TO E'on'"]).read_only);
        assert!(fold(&["SET default_transaction_read_only = true"]).read_only);
        assert!(fold(&["SET default_transaction_read_only = 1"]).read_only);
        assert!(fold(&["SET default_transaction_read_only = 'yes'"]).read_only);
        assert!(!fold(&["SET default_transaction_read_only = 'of'"]).read_only);
        assert!(
            !fold(&[
                "SET default_transaction_read_only = on",
                "SET default_transaction_read_only TO DEFAULT"
            ])
            .read_only
        );
        // SET LOCAL lasts one transaction: not a session default.
        assert!(!fold(&["SET LOCAL default_transaction_read_only = on"]).read_only);
        assert!(fold(&["SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY"]).read_only);
        let d = fold(&[
            "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ ONLY",
        ]);
        assert!(d.read_only && d.serializable);
        assert!(fold(&["SET default_transaction_isolation = 'serializable'"]).serializable);
        assert!(fold(&["SET default_transaction_isolation TO E'SERIALIZABLE'"]).serializable);
        assert!(!fold(&["SET default_transaction_isolation = 'repeatable read'"]).serializable);
        assert_eq!(
            c.classify("SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ ONLY").class,
            Class::SessionState(SessionKind::SetSeveral {
                local: false,
                sets: vec![
                    ("default_transaction_isolation".into(), "'serializable'".into()),
                    ("default_transaction_read_only".into(), "on".into()),
                ],
            })
        );
    }

    fn set() -> Class {
        Class::SessionState(SessionKind::Set {
            local: false,
            name: "a".into(),
            value_sql: Some("1".into()),
        })
    }

    #[test]
    fn analyses_of_a_unit_combine() {
        use std::sync::Arc;
        let a = |class: Class, pins: bool| {
            Arc::new(Analysis {
                class: class.clone(),
                statements: vec![class],
                pins_session: pins,
                opaque_state: false,
                signal_call: false,
                ends_sessions: None,
                hints: Default::default(),
                copy: false,
            })
        };
        let one = a(Class::Read, false);
        assert!(Arc::ptr_eq(
            &Analysis::combine(std::slice::from_ref(&one)),
            &one
        ));
        let c = Analysis::combine(&[a(Class::Read, false), a(Class::Write, true)]);
        assert_eq!(c.class, Class::Write);
        assert_eq!(c.statements, vec![Class::Read, Class::Write]);
        assert!(c.pins_session);
        let empty = Analysis::combine(&[]);
        assert_eq!(empty.class, Class::Read);
        assert!(empty.statements.is_empty());
        assert_eq!(Class::Write.label(), "write");
    }

    #[test]
    fn precedence() {
        let begin = Class::Transaction(TxControl::Begin {
            read_only: None,
            isolation: None,
            deferrable: false,
        });
        assert_eq!(combine(&[]), Class::Read);
        assert_eq!(combine(&[Class::Read, Class::Read]), Class::Read);
        assert_eq!(combine(&[Class::Read, Class::Write]), Class::Write);
        assert_eq!(combine(&[Class::Unknown, Class::Write]), Class::Write);
        assert_eq!(combine(&[Class::Read, Class::Unknown]), Class::Unknown);
        assert_eq!(combine(&[set(), Class::Unknown]), Class::Unknown);
        assert_eq!(combine(&[Class::Read, set(), begin.clone()]), set());
        assert_eq!(combine(&[begin.clone(), Class::Read, set()]), begin);
        let show = Class::Tidemark(TidemarkCommand::Show { name: "x".into() });
        assert_eq!(combine(std::slice::from_ref(&show)), show);
        assert_eq!(combine(&[show, Class::Read]), Class::Unknown);
    }
}
