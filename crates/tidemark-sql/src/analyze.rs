//! Turning one query text into an `Analysis`: parse with PostgreSQL's parser (`pg_query`), give
//! each statement a `Class`, and walk read statements' expression trees for things that write
//! (locking clauses, `SELECT INTO`, writable CTEs, writing function calls) or pin the session.
//!
//! The walker knows every node type that can appear in a raw `SELECT`; if it meets one it does
//! not know (a future PostgreSQL version), the statement is treated as a write.

use pg_query::protobuf as pb;
use pg_query::NodeEnum as N;

use crate::class::{combine, Analysis, Class, SessionKind, TidemarkCommand, TxControl};
use crate::functions::FunctionRules;
use crate::hints::scan_hints;

/// `CURSOR_OPT_HOLD` from PostgreSQL's `parsenodes.h`.
const CURSOR_OPT_HOLD: i32 = 0x0020;
/// Expression nesting beyond this is treated as a write rather than walked further. (prost's
/// decoder already refuses trees deeper than 100 messages, so this is a second fence.)
const MAX_DEPTH: usize = 400;

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
                hints,
            };
        }
    };
    let mut cx = Cx {
        rules,
        sql,
        pins: false,
        opaque: false,
        primary_only: false,
    };
    let statements: Vec<Class> = parsed
        .protobuf
        .stmts
        .iter()
        .map(
            |raw| match raw.stmt.as_deref().and_then(|n| n.node.as_ref()) {
                Some(node) => cx.statement(node),
                None => Class::Unknown,
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
        hints,
    }
}

struct Cx<'a> {
    rules: &'a FunctionRules,
    sql: &'a str,
    pins: bool,
    opaque: bool,
    /// A statement whose answer differs on a standby (`SHOW transaction_read_only`).
    primary_only: bool,
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

impl Cx<'_> {
    fn statement(&mut self, node: &N) -> Class {
        use Class::{Read, Write};
        match node {
            N::SelectStmt(_) => {
                let s = self.scan(node);
                if s.temp {
                    self.pins = true;
                    Class::SessionState(SessionKind::CreateTempTable)
                } else if s.writes {
                    Write
                } else {
                    Read
                }
            }
            N::InsertStmt(_) | N::UpdateStmt(_) | N::DeleteStmt(_) | N::MergeStmt(_) => {
                self.scan(node);
                Write
            }
            N::ExplainStmt(e) => {
                if !explain_analyzes(&e.options) {
                    return Read;
                }
                match e.query.as_deref().and_then(|n| n.node.as_ref()) {
                    Some(inner) => match self.statement(inner) {
                        Read => Read,
                        c @ Class::SessionState(SessionKind::CreateTempTable) => c,
                        _ => Write,
                    },
                    None => Class::Unknown,
                }
            }
            N::CopyStmt(c) => {
                if c.is_from || c.is_program || !c.filename.is_empty() {
                    // COPY FROM writes; COPY TO a server file or program has effects on the server.
                    return Write;
                }
                match c.query.as_deref().and_then(|n| n.node.as_ref()) {
                    Some(q) => match self.statement(q) {
                        Read => Read,
                        _ => Write,
                    },
                    None => Read,
                }
            }
            N::VariableSetStmt(v) => self.set_stmt(v),
            N::VariableShowStmt(v) => {
                let name = v.name.to_lowercase();
                match name.strip_prefix("tidemark.") {
                    Some(rest) => Class::Tidemark(TidemarkCommand::Show {
                        name: rest.to_string(),
                    }),
                    None => {
                        // What a standby answers differently: asked through tidemark, which
                        // presents itself as the primary, the primary answers.
                        if matches!(
                            name.as_str(),
                            "transaction_read_only" | "in_hot_standby" | "all"
                        ) {
                            self.primary_only = true;
                        }
                        Read
                    }
                }
            }
            N::TransactionStmt(t) => Class::Transaction(tx_stmt(t)),
            N::DeclareCursorStmt(d) => {
                if d.options & CURSOR_OPT_HOLD != 0 {
                    self.pins = true;
                    Class::SessionState(SessionKind::DeclareWithHold)
                } else {
                    Class::SessionState(SessionKind::Declare)
                }
            }
            N::FetchStmt(_) | N::ClosePortalStmt(_) | N::ConstraintsSetStmt(_) | N::LoadStmt(_) => {
                Class::SessionState(SessionKind::Other)
            }
            N::ListenStmt(_) => {
                self.pins = true;
                Class::SessionState(SessionKind::Listen)
            }
            N::UnlistenStmt(_) => Class::SessionState(SessionKind::Unlisten),
            N::PrepareStmt(_) => {
                self.pins = true;
                Class::SessionState(SessionKind::Prepare)
            }
            N::DeallocateStmt(d) => Class::SessionState(SessionKind::Deallocate {
                name: (!d.isall && !d.name.is_empty()).then(|| d.name.clone()),
            }),
            N::DiscardStmt(d) => Class::SessionState(SessionKind::Discard {
                all: d.target == pb::DiscardMode::DiscardAll as i32,
            }),
            N::CreateStmt(c) => self.maybe_temp(is_temp(c.relation.as_ref())),
            N::CreateTableAsStmt(c) => {
                let temp = is_temp(c.into.as_ref().and_then(|i| i.rel.as_ref()));
                self.maybe_temp(temp)
            }
            N::ViewStmt(v) => self.maybe_temp(is_temp(v.view.as_ref())),
            N::CreateSeqStmt(s) => self.maybe_temp(is_temp(s.sequence.as_ref())),
            // EXECUTE runs a prepared statement we cannot see from here.
            N::ExecuteStmt(_) => Class::Unknown,
            N::DoStmt(_) | N::CallStmt(_) => {
                self.opaque = true;
                Write
            }
            N::CheckPointStmt(_)
            | N::NotifyStmt(_)
            | N::LockStmt(_)
            | N::RefreshMatViewStmt(_)
            | N::VacuumStmt(_)
            | N::ClusterStmt(_)
            | N::ReindexStmt(_)
            | N::TruncateStmt(_)
            | N::AlterTableStmt(_)
            | N::ReplicaIdentityStmt(_)
            | N::AlterCollationStmt(_)
            | N::AlterDomainStmt(_)
            | N::GrantStmt(_)
            | N::GrantRoleStmt(_)
            | N::AlterDefaultPrivilegesStmt(_)
            | N::CreateTableSpaceStmt(_)
            | N::DropTableSpaceStmt(_)
            | N::AlterTableSpaceOptionsStmt(_)
            | N::AlterTableMoveAllStmt(_)
            | N::CreateExtensionStmt(_)
            | N::AlterExtensionStmt(_)
            | N::AlterExtensionContentsStmt(_)
            | N::CreateFdwStmt(_)
            | N::AlterFdwStmt(_)
            | N::CreateForeignServerStmt(_)
            | N::AlterForeignServerStmt(_)
            | N::CreateForeignTableStmt(_)
            | N::CreateUserMappingStmt(_)
            | N::AlterUserMappingStmt(_)
            | N::DropUserMappingStmt(_)
            | N::ImportForeignSchemaStmt(_)
            | N::CreatePolicyStmt(_)
            | N::AlterPolicyStmt(_)
            | N::CreateAmStmt(_)
            | N::CreateTrigStmt(_)
            | N::CreateEventTrigStmt(_)
            | N::AlterEventTrigStmt(_)
            | N::CreatePlangStmt(_)
            | N::CreateRoleStmt(_)
            | N::AlterRoleStmt(_)
            | N::AlterRoleSetStmt(_)
            | N::DropRoleStmt(_)
            | N::AlterSeqStmt(_)
            | N::DefineStmt(_)
            | N::CreateDomainStmt(_)
            | N::CreateOpClassStmt(_)
            | N::CreateOpFamilyStmt(_)
            | N::AlterOpFamilyStmt(_)
            | N::DropStmt(_)
            | N::CommentStmt(_)
            | N::SecLabelStmt(_)
            | N::IndexStmt(_)
            | N::CreateStatsStmt(_)
            | N::AlterStatsStmt(_)
            | N::CreateFunctionStmt(_)
            | N::AlterFunctionStmt(_)
            | N::RenameStmt(_)
            | N::AlterObjectDependsStmt(_)
            | N::AlterObjectSchemaStmt(_)
            | N::AlterOwnerStmt(_)
            | N::AlterOperatorStmt(_)
            | N::AlterTypeStmt(_)
            | N::RuleStmt(_)
            | N::CompositeTypeStmt(_)
            | N::CreateEnumStmt(_)
            | N::CreateRangeStmt(_)
            | N::AlterEnumStmt(_)
            | N::CreatedbStmt(_)
            | N::AlterDatabaseStmt(_)
            | N::AlterDatabaseRefreshCollStmt(_)
            | N::AlterDatabaseSetStmt(_)
            | N::DropdbStmt(_)
            | N::AlterSystemStmt(_)
            | N::CreateConversionStmt(_)
            | N::CreateCastStmt(_)
            | N::CreateTransformStmt(_)
            | N::DropOwnedStmt(_)
            | N::ReassignOwnedStmt(_)
            | N::AlterTsdictionaryStmt(_)
            | N::AlterTsconfigurationStmt(_)
            | N::CreatePublicationStmt(_)
            | N::AlterPublicationStmt(_)
            | N::CreateSubscriptionStmt(_)
            | N::AlterSubscriptionStmt(_)
            | N::DropSubscriptionStmt(_)
            | N::CreateSchemaStmt(_) => Write,
            _ => Class::Unknown,
        }
    }

    fn maybe_temp(&mut self, temp: bool) -> Class {
        if temp {
            self.pins = true;
            Class::SessionState(SessionKind::CreateTempTable)
        } else {
            Class::Write
        }
    }

    fn scan(&mut self, node: &N) -> Scan {
        let mut w = Walker {
            rules: self.rules,
            found: Scan::default(),
        };
        w.node(node, 0);
        if w.found.pins {
            self.pins = true;
        }
        if w.found.opaque {
            self.opaque = true;
        }
        w.found
    }

    fn set_stmt(&mut self, v: &pb::VariableSetStmt) -> Class {
        use pb::VariableSetKind as K;
        let name = v.name.to_lowercase();
        let kind = K::try_from(v.kind).unwrap_or(K::Undefined);
        if let Some(short) = name.strip_prefix("tidemark.") {
            let name = short.to_string();
            return match kind {
                K::VarSetValue => Class::Tidemark(TidemarkCommand::Set {
                    name,
                    value: v
                        .args
                        .iter()
                        .map(const_text)
                        .collect::<Option<Vec<_>>>()
                        .map(|parts| parts.join(", "))
                        .unwrap_or_default(),
                }),
                K::VarSetDefault | K::VarReset => Class::Tidemark(TidemarkCommand::Reset { name }),
                _ => Class::Unknown,
            };
        }
        let local = v.is_local;
        match kind {
            K::VarSetValue => match self.value_sql(&v.args) {
                Some(value_sql) => Class::SessionState(SessionKind::Set {
                    local,
                    name,
                    value_sql: Some(value_sql),
                }),
                None => Class::SessionState(SessionKind::Other),
            },
            K::VarSetDefault => Class::SessionState(SessionKind::Set {
                local,
                name,
                value_sql: None,
            }),
            K::VarReset => Class::SessionState(SessionKind::Reset { name: Some(name) }),
            K::VarResetAll => Class::SessionState(SessionKind::Reset { name: None }),
            K::VarSetMulti if name == "transaction" => {
                let o = tx_options(&v.args);
                Class::Transaction(TxControl::SetTransaction {
                    read_only: o.read_only,
                })
            }
            K::VarSetMulti if name == "session characteristics" => {
                session_characteristics(local, &v.args)
            }
            _ => Class::SessionState(SessionKind::Other),
        }
    }

    /// SQL for the values of a `SET`: constants rendered canonically; anything else (e.g.
    /// `SET TIME ZONE INTERVAL '1' HOUR`) is the statement's source text from its first value on.
    /// `None` if neither works.
    fn value_sql(&self, args: &[pb::Node]) -> Option<String> {
        let rendered: Option<Vec<String>> = args.iter().map(const_sql).collect();
        if let Some(parts) = rendered {
            return Some(parts.join(", "));
        }
        let start = args.iter().filter_map(node_location).min()?;
        let tail = self.sql.get(start..)?;
        // The statement ends at the first top-level `;` — a SET value cannot contain one outside
        // a quoted string, and those render as constants above.
        let end = tail.find(';').unwrap_or(tail.len());
        Some(tail[..end].trim().to_string()).filter(|v| !v.is_empty())
    }
}

/// The smallest source offset recorded in a SET value node (a type cast may only know its
/// type's or its argument's position).
fn node_location(n: &pb::Node) -> Option<usize> {
    let locs: Vec<i32> = match n.node.as_ref()? {
        N::AConst(c) => vec![c.location],
        N::TypeCast(c) => {
            let mut v = vec![c.location];
            if let Some(t) = &c.type_name {
                v.push(t.location);
            }
            if let Some(l) = c.arg.as_deref().and_then(node_location) {
                v.push(i32::try_from(l).unwrap_or(-1));
            }
            v
        }
        N::FuncCall(c) => vec![c.location],
        N::AExpr(c) => vec![c.location],
        _ => return None,
    };
    locs.into_iter()
        .filter_map(|l| usize::try_from(l).ok())
        .min()
}

/// A constant's value as plain text (for `SET tidemark.x`).
fn const_text(n: &pb::Node) -> Option<String> {
    use pb::a_const::Val;
    match n.node.as_ref()? {
        N::AConst(c) => match c.val.as_ref()? {
            Val::Ival(i) => Some(i.ival.to_string()),
            Val::Fval(f) => Some(f.fval.clone()),
            Val::Boolval(b) => Some(b.boolval.to_string()),
            Val::Sval(s) => Some(s.sval.clone()),
            Val::Bsval(b) => Some(b.bsval.clone()),
        },
        _ => None,
    }
}

/// A constant as SQL text: strings quoted, numbers bare.
fn const_sql(n: &pb::Node) -> Option<String> {
    use pb::a_const::Val;
    match n.node.as_ref()? {
        N::AConst(c) => match c.val.as_ref()? {
            Val::Ival(i) => Some(i.ival.to_string()),
            Val::Fval(f) => Some(f.fval.clone()),
            Val::Boolval(b) => Some(b.boolval.to_string()),
            Val::Sval(s) => Some(quote_literal(&s.sval)),
            Val::Bsval(_) => None,
        },
        _ => None,
    }
}

fn quote_literal(s: &str) -> String {
    if s.contains('\\') {
        format!("E'{}'", s.replace('\\', "\\\\").replace('\'', "''"))
    } else {
        format!("'{}'", s.replace('\'', "''"))
    }
}

fn explain_analyzes(options: &[pb::Node]) -> bool {
    options.iter().any(|o| match o.node.as_ref() {
        Some(N::DefElem(d)) if d.defname.eq_ignore_ascii_case("analyze") => {
            match d.arg.as_deref().and_then(|a| a.node.as_ref()) {
                None => true,
                Some(N::String(s)) => !matches!(
                    s.sval.to_ascii_lowercase().as_str(),
                    "false" | "off" | "0" | "no"
                ),
                Some(N::Integer(i)) => i.ival != 0,
                Some(N::Boolean(b)) => b.boolval,
                Some(N::AConst(c)) => !matches!(
                    c.val,
                    Some(pb::a_const::Val::Ival(pb::Integer { ival: 0 }))
                        | Some(pb::a_const::Val::Boolval(pb::Boolean { boolval: false }))
                ),
                Some(_) => true,
            }
        }
        _ => false,
    })
}

#[derive(Default)]
struct TxOptions {
    read_only: bool,
    isolation: Option<String>,
    deferrable: bool,
    count: usize,
}

/// A literal boolean `true` (`true`, `'t'`, `'on'`, `1`, ... as PostgreSQL spells booleans),
/// possibly with a `::boolean` cast.
fn is_constant_true(arg: Option<&pb::Node>) -> bool {
    use pb::a_const::Val;
    match arg.and_then(|a| a.node.as_ref()) {
        Some(N::AConst(c)) => match &c.val {
            Some(Val::Boolval(b)) => b.boolval,
            Some(Val::Ival(i)) => i.ival == 1,
            Some(Val::Sval(s)) => matches!(
                s.sval.to_ascii_lowercase().trim(),
                "t" | "true" | "y" | "yes" | "on" | "1"
            ),
            _ => false,
        },
        Some(N::TypeCast(t)) => is_constant_true(t.arg.as_deref()),
        _ => false,
    }
}

fn def_bool(arg: Option<&pb::Node>) -> bool {
    use pb::a_const::Val;
    match arg.and_then(|a| a.node.as_ref()) {
        Some(N::AConst(c)) => match &c.val {
            Some(Val::Ival(i)) => i.ival != 0,
            Some(Val::Boolval(b)) => b.boolval,
            Some(Val::Sval(s)) => matches!(s.sval.as_str(), "true" | "on" | "1"),
            _ => false,
        },
        Some(N::Integer(i)) => i.ival != 0,
        Some(N::Boolean(b)) => b.boolval,
        None => true,
        _ => false,
    }
}

fn tx_options(options: &[pb::Node]) -> TxOptions {
    let mut o = TxOptions::default();
    for n in options {
        let Some(N::DefElem(d)) = n.node.as_ref() else {
            continue;
        };
        o.count += 1;
        match d.defname.as_str() {
            "transaction_read_only" => o.read_only = def_bool(d.arg.as_deref()),
            "transaction_deferrable" => o.deferrable = def_bool(d.arg.as_deref()),
            "transaction_isolation" => {
                o.isolation = d
                    .arg
                    .as_deref()
                    .and_then(const_text)
                    .map(|s| s.to_lowercase())
            }
            _ => {}
        }
    }
    o
}

fn tx_stmt(t: &pb::TransactionStmt) -> TxControl {
    use pb::TransactionStmtKind as K;
    match K::try_from(t.kind).unwrap_or(K::Undefined) {
        K::TransStmtBegin | K::TransStmtStart | K::Undefined => {
            let o = tx_options(&t.options);
            TxControl::Begin {
                read_only: o.read_only,
                isolation: o.isolation,
                deferrable: o.deferrable,
            }
        }
        K::TransStmtCommit => TxControl::Commit,
        K::TransStmtRollback => TxControl::Rollback,
        K::TransStmtSavepoint => TxControl::Savepoint,
        K::TransStmtRelease => TxControl::Release,
        K::TransStmtRollbackTo => TxControl::RollbackTo,
        K::TransStmtPrepare => TxControl::PrepareTransaction,
        K::TransStmtCommitPrepared => TxControl::CommitPrepared,
        K::TransStmtRollbackPrepared => TxControl::RollbackPrepared,
    }
}

fn session_characteristics(local: bool, args: &[pb::Node]) -> Class {
    let o = tx_options(args);
    if o.count != 1 {
        return Class::SessionState(SessionKind::Other);
    }
    let on_off = |b: bool| if b { "on" } else { "off" }.to_string();
    let (name, value_sql) = if let Some(iso) = o.isolation {
        ("default_transaction_isolation", quote_literal(&iso))
    } else if args.iter().any(
        |n| matches!(n.node.as_ref(), Some(N::DefElem(d)) if d.defname == "transaction_deferrable"),
    ) {
        ("default_transaction_deferrable", on_off(o.deferrable))
    } else {
        ("default_transaction_read_only", on_off(o.read_only))
    };
    Class::SessionState(SessionKind::Set {
        local,
        name: name.to_string(),
        value_sql: Some(value_sql),
    })
}

/// Walks an expression / query tree and records writes, pins and temporary relations.
struct Walker<'a> {
    rules: &'a FunctionRules,
    found: Scan,
}

impl Walker<'_> {
    fn list(&mut self, nodes: &[pb::Node], depth: usize) {
        for n in nodes {
            self.opt(Some(n), depth);
        }
    }

    fn opt(&mut self, n: Option<&pb::Node>, depth: usize) {
        if let Some(inner) = n.and_then(|n| n.node.as_ref()) {
            self.node(inner, depth + 1);
        }
    }

    fn boxed(&mut self, n: &Option<Box<pb::Node>>, depth: usize) {
        self.opt(n.as_deref(), depth);
    }

    fn with(&mut self, w: Option<&pb::WithClause>, depth: usize) {
        if let Some(w) = w {
            self.list(&w.ctes, depth);
        }
    }

    fn select(&mut self, s: &pb::SelectStmt, depth: usize) {
        if let Some(into) = &s.into_clause {
            self.found.writes = true;
            if is_temp(into.rel.as_ref()) {
                self.found.temp = true;
            }
        }
        if !s.locking_clause.is_empty() {
            self.found.writes = true;
        }
        self.with(s.with_clause.as_ref(), depth);
        self.list(&s.distinct_clause, depth);
        self.list(&s.target_list, depth);
        self.list(&s.from_clause, depth);
        self.boxed(&s.where_clause, depth);
        self.list(&s.group_clause, depth);
        self.boxed(&s.having_clause, depth);
        self.list(&s.window_clause, depth);
        self.list(&s.values_lists, depth);
        self.list(&s.sort_clause, depth);
        self.boxed(&s.limit_offset, depth);
        self.boxed(&s.limit_count, depth);
        if let Some(l) = &s.larg {
            self.select(l, depth + 1);
        }
        if let Some(r) = &s.rarg {
            self.select(r, depth + 1);
        }
    }

    fn func_call(&mut self, f: &pb::FuncCall, depth: usize) {
        let names: Vec<String> = f
            .funcname
            .iter()
            .filter_map(|n| match n.node.as_ref() {
                Some(N::String(s)) => Some(s.sval.to_lowercase()),
                _ => None,
            })
            .collect();
        let (schema, name) = match names.as_slice() {
            [name] => ("", name.as_str()),
            [.., schema, name] => (schema.as_str(), name.as_str()),
            [] => ("", ""),
        };
        let effect = self.rules.effect(schema, name);
        self.found.writes |= effect.writes;
        self.found.opaque |= self.rules.may_change_session(schema, name);
        self.found.pins |= effect.pins_session;
        if name == "set_config" && (schema.is_empty() || schema == "pg_catalog") {
            // `set_config(name, value, false)` changes the setting for the rest of the server
            // session, which tidemark cannot replay on another connection (the value may be an
            // expression): pin, so it never leaks to other clients through the pool (a pinned
            // connection is closed, not pooled, when the client leaves). Only a constant `true`
            // (transaction-local) is known not to outlive the transaction.
            self.found.pins |= !is_constant_true(f.args.get(2));
        }
        self.list(&f.args, depth);
        self.list(&f.agg_order, depth);
        self.boxed(&f.agg_filter, depth);
        if let Some(w) = &f.over {
            self.window_def(w, depth);
        }
    }

    fn window_def(&mut self, w: &pb::WindowDef, depth: usize) {
        self.list(&w.partition_clause, depth);
        self.list(&w.order_clause, depth);
        self.boxed(&w.start_offset, depth);
        self.boxed(&w.end_offset, depth);
    }

    fn json_value(&mut self, v: Option<&pb::JsonValueExpr>, depth: usize) {
        if let Some(v) = v {
            self.boxed(&v.raw_expr, depth);
            self.boxed(&v.formatted_expr, depth);
        }
    }

    fn json_behavior(&mut self, b: Option<&pb::JsonBehavior>, depth: usize) {
        if let Some(b) = b {
            self.boxed(&b.expr, depth);
        }
    }

    fn json_path_spec(&mut self, p: Option<&pb::JsonTablePathSpec>, depth: usize) {
        if let Some(p) = p {
            self.boxed(&p.string, depth);
        }
    }

    fn json_agg(&mut self, c: Option<&pb::JsonAggConstructor>, depth: usize) {
        if let Some(c) = c {
            self.boxed(&c.agg_filter, depth);
            self.list(&c.agg_order, depth);
            if let Some(w) = &c.over {
                self.window_def(w, depth);
            }
        }
    }

    fn node(&mut self, node: &N, depth: usize) {
        if depth > MAX_DEPTH {
            self.found.writes = true;
            return;
        }
        let d = depth;
        match node {
            N::SelectStmt(s) => self.select(s, d),
            N::InsertStmt(s) => {
                self.found.writes = true;
                self.with(s.with_clause.as_ref(), d);
                self.boxed(&s.select_stmt, d);
                if let Some(oc) = &s.on_conflict_clause {
                    self.list(&oc.target_list, d);
                    self.boxed(&oc.where_clause, d);
                }
                self.list(&s.returning_list, d);
            }
            N::UpdateStmt(s) => {
                self.found.writes = true;
                self.with(s.with_clause.as_ref(), d);
                self.list(&s.target_list, d);
                self.list(&s.from_clause, d);
                self.boxed(&s.where_clause, d);
                self.list(&s.returning_list, d);
            }
            N::DeleteStmt(s) => {
                self.found.writes = true;
                self.with(s.with_clause.as_ref(), d);
                self.list(&s.using_clause, d);
                self.boxed(&s.where_clause, d);
                self.list(&s.returning_list, d);
            }
            N::MergeStmt(s) => {
                self.found.writes = true;
                self.with(s.with_clause.as_ref(), d);
                self.boxed(&s.source_relation, d);
                self.boxed(&s.join_condition, d);
                self.list(&s.merge_when_clauses, d);
                self.list(&s.returning_list, d);
            }
            N::MergeWhenClause(m) => {
                self.boxed(&m.condition, d);
                self.list(&m.target_list, d);
                self.list(&m.values, d);
            }
            N::WithClause(w) => self.list(&w.ctes, d),
            N::CommonTableExpr(c) => {
                self.boxed(&c.ctequery, d);
                if let Some(cy) = &c.cycle_clause {
                    self.boxed(&cy.cycle_mark_value, d);
                    self.boxed(&cy.cycle_mark_default, d);
                }
            }
            N::IntoClause(_) | N::LockingClause(_) => self.found.writes = true,
            N::List(l) => self.list(&l.items, d),
            N::ResTarget(r) => {
                self.list(&r.indirection, d);
                self.boxed(&r.val, d);
            }
            N::FuncCall(f) => self.func_call(f, d),
            N::AExpr(e) => {
                self.boxed(&e.lexpr, d);
                self.boxed(&e.rexpr, d);
            }
            N::BoolExpr(e) => self.list(&e.args, d),
            N::SubLink(s) => {
                self.boxed(&s.testexpr, d);
                self.boxed(&s.subselect, d);
            }
            N::TypeCast(c) => self.boxed(&c.arg, d),
            N::CollateClause(c) => self.boxed(&c.arg, d),
            N::AIndirection(a) => {
                self.boxed(&a.arg, d);
                self.list(&a.indirection, d);
            }
            N::AIndices(a) => {
                self.boxed(&a.lidx, d);
                self.boxed(&a.uidx, d);
            }
            N::AArrayExpr(a) => self.list(&a.elements, d),
            N::MultiAssignRef(m) => self.boxed(&m.source, d),
            N::SortBy(s) => self.boxed(&s.node, d),
            N::WindowDef(w) => self.window_def(w, d),
            N::RangeSubselect(r) => self.boxed(&r.subquery, d),
            N::RangeFunction(r) => {
                self.list(&r.functions, d);
                self.list(&r.coldeflist, d);
            }
            N::RangeTableFunc(r) => {
                self.boxed(&r.docexpr, d);
                self.boxed(&r.rowexpr, d);
                self.list(&r.namespaces, d);
                self.list(&r.columns, d);
            }
            N::RangeTableFuncCol(c) => {
                self.boxed(&c.colexpr, d);
                self.boxed(&c.coldefexpr, d);
            }
            N::RangeTableSample(r) => {
                self.boxed(&r.relation, d);
                self.list(&r.args, d);
                self.boxed(&r.repeatable, d);
            }
            N::JoinExpr(j) => {
                self.boxed(&j.larg, d);
                self.boxed(&j.rarg, d);
                self.boxed(&j.quals, d);
            }
            N::CaseExpr(c) => {
                self.boxed(&c.arg, d);
                self.list(&c.args, d);
                self.boxed(&c.defresult, d);
            }
            N::CaseWhen(c) => {
                self.boxed(&c.expr, d);
                self.boxed(&c.result, d);
            }
            N::CoalesceExpr(c) => self.list(&c.args, d),
            N::MinMaxExpr(m) => self.list(&m.args, d),
            N::XmlExpr(x) => {
                self.list(&x.named_args, d);
                self.list(&x.args, d);
            }
            N::XmlSerialize(x) => self.boxed(&x.expr, d),
            N::NullTest(n) => self.boxed(&n.arg, d),
            N::BooleanTest(b) => self.boxed(&b.arg, d),
            N::RowExpr(r) => self.list(&r.args, d),
            N::GroupingSet(g) => self.list(&g.content, d),
            N::GroupingFunc(g) => self.list(&g.args, d),
            N::NamedArgExpr(n) => self.boxed(&n.arg, d),
            N::ColumnDef(c) => self.boxed(&c.raw_default, d),
            N::JsonValueExpr(v) => self.json_value(Some(v), d),
            N::JsonObjectConstructor(c) => self.list(&c.exprs, d),
            N::JsonArrayConstructor(c) => self.list(&c.exprs, d),
            N::JsonArrayQueryConstructor(c) => self.boxed(&c.query, d),
            N::JsonAggConstructor(c) => self.json_agg(Some(c), d),
            N::JsonObjectAgg(a) => {
                self.json_agg(a.constructor.as_deref(), d);
                if let Some(kv) = &a.arg {
                    self.boxed(&kv.key, d);
                    self.json_value(kv.value.as_deref(), d);
                }
            }
            N::JsonArrayAgg(a) => {
                self.json_agg(a.constructor.as_deref(), d);
                self.json_value(a.arg.as_deref(), d);
            }
            N::JsonFuncExpr(f) => {
                self.json_value(f.context_item.as_deref(), d);
                self.boxed(&f.pathspec, d);
                self.list(&f.passing, d);
                self.json_behavior(f.on_empty.as_deref(), d);
                self.json_behavior(f.on_error.as_deref(), d);
            }
            N::JsonTable(t) => {
                self.json_value(t.context_item.as_deref(), d);
                self.json_path_spec(t.pathspec.as_deref(), d);
                self.list(&t.passing, d);
                self.list(&t.columns, d);
                self.json_behavior(t.on_error.as_deref(), d);
            }
            N::JsonTableColumn(c) => {
                self.json_path_spec(c.pathspec.as_deref(), d);
                self.list(&c.columns, d);
                self.json_behavior(c.on_empty.as_deref(), d);
                self.json_behavior(c.on_error.as_deref(), d);
            }
            N::JsonTablePathSpec(p) => self.json_path_spec(Some(p), d),
            N::JsonIsPredicate(p) => self.boxed(&p.expr, d),
            N::JsonParseExpr(p) => self.json_value(p.expr.as_deref(), d),
            N::JsonScalarExpr(s) => self.boxed(&s.expr, d),
            N::JsonSerializeExpr(s) => self.json_value(s.expr.as_deref(), d),
            N::JsonKeyValue(kv) => {
                self.boxed(&kv.key, d);
                self.json_value(kv.value.as_deref(), d);
            }
            N::JsonArgument(a) => self.json_value(a.val.as_deref(), d),
            N::JsonBehavior(b) => self.json_behavior(Some(b), d),
            // Leaves: no expressions below.
            N::ColumnRef(_)
            | N::ParamRef(_)
            | N::AConst(_)
            | N::AStar(_)
            | N::SqlvalueFunction(_)
            | N::RangeVar(_)
            | N::TypeName(_)
            | N::String(_)
            | N::Integer(_)
            | N::Float(_)
            | N::Boolean(_)
            | N::BitString(_)
            | N::Alias(_)
            | N::SetToDefault(_)
            | N::CurrentOfExpr(_)
            | N::JsonFormat(_)
            | N::JsonOutput(_)
            | N::JsonReturning(_)
            | N::CtesearchClause(_)
            | N::RoleSpec(_) => {}
            // A node this walker does not know: assume the worst.
            _ => self.found.writes = true,
        }
    }
}

/// `pg_terminate_backend` or `pg_cancel_backend`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendSignal {
    Terminate,
    Cancel,
}

/// Where the pid of a [`BackendSignal`] call comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SignalPid {
    Literal(i64),
    /// `$n` (1-based).
    Param(usize),
}

/// Recognises `SELECT pg_terminate_backend(<pid>)` / `SELECT pg_cancel_backend(<pid>)` (one
/// target, no FROM; the pid a literal or a parameter, maybe cast; terminate's timeout argument
/// allowed): the shape a client uses to end or cancel a session whose pid it was given. Only
/// texts mentioning `_backend` are parsed.
pub fn backend_signal(sql: &str) -> Option<(BackendSignal, SignalPid)> {
    if !sql
        .as_bytes()
        .windows(8)
        .any(|w| w.eq_ignore_ascii_case(b"_backend"))
    {
        return None;
    }
    let parsed = parse_guarded(sql)?;
    let [raw] = parsed.protobuf.stmts.as_slice() else {
        return None;
    };
    let N::SelectStmt(sel) = raw.stmt.as_deref()?.node.as_ref()? else {
        return None;
    };
    if !sel.from_clause.is_empty()
        || sel.where_clause.is_some()
        || sel.larg.is_some()
        || sel.target_list.len() != 1
        || sel.with_clause.is_some()
    {
        return None;
    }
    let N::ResTarget(t) = sel.target_list[0].node.as_ref()? else {
        return None;
    };
    let N::FuncCall(f) = t.val.as_deref()?.node.as_ref()? else {
        return None;
    };
    let names: Vec<&str> = f
        .funcname
        .iter()
        .filter_map(|n| match n.node.as_ref() {
            Some(N::String(s)) => Some(s.sval.as_str()),
            _ => None,
        })
        .collect();
    let kind = match names.as_slice() {
        [name] | ["pg_catalog", name] => match name.to_ascii_lowercase().as_str() {
            "pg_terminate_backend" => BackendSignal::Terminate,
            "pg_cancel_backend" => BackendSignal::Cancel,
            _ => return None,
        },
        _ => return None,
    };
    let max_args = if kind == BackendSignal::Terminate {
        2
    } else {
        1
    };
    if f.args.is_empty() || f.args.len() > max_args {
        return None;
    }
    let mut arg = f.args[0].node.as_ref()?;
    if let N::TypeCast(c) = arg {
        arg = c.arg.as_deref()?.node.as_ref()?;
    }
    let pid = match arg {
        N::AConst(c) => match c.val.as_ref()? {
            pb::a_const::Val::Ival(i) => SignalPid::Literal(i64::from(i.ival)),
            pb::a_const::Val::Fval(f) => SignalPid::Literal(f.fval.parse().ok()?),
            _ => return None,
        },
        N::ParamRef(p) if p.number >= 1 => SignalPid::Param(p.number as usize),
        _ => return None,
    };
    Some((kind, pid))
}

#[cfg(test)]
mod signal_tests {
    use super::*;

    #[test]
    fn recognises_signal_calls() {
        use BackendSignal::*;
        use SignalPid::*;
        let cases = [
            (
                "select pg_terminate_backend(42)",
                Some((Terminate, Literal(42))),
            ),
            (
                "SELECT pg_catalog.pg_cancel_backend($1)",
                Some((Cancel, Param(1))),
            ),
            (
                "select pg_terminate_backend($1::int, 1000)",
                Some((Terminate, Param(1))),
            ),
            (
                "select pg_terminate_backend(pid) from pg_stat_activity",
                None,
            ),
            ("select pg_cancel_backend(1, 2)", None),
            ("select pg_terminate_backend(42), 1", None),
            ("select my.pg_terminate_backend(42)", None),
            ("select 1", None),
            ("select pg_terminate_backend(", None),
        ];
        for (sql, want) in cases {
            assert_eq!(backend_signal(sql), want, "{sql}");
        }
    }
}
