//! SET / RESET / SET TRANSACTION / BEGIN options: settings as session state or transaction control.

use pg_query::protobuf as pb;
use pg_query::NodeEnum as N;

use super::Cx;
use crate::class::{Class, SessionKind, TidemarkCommand, TxControl};

impl Cx<'_> {
    pub(super) fn set_stmt(&mut self, v: &pb::VariableSetStmt) -> Class {
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

#[derive(Default)]
struct TxOptions {
    /// `Some` when the options name an access mode (`READ ONLY` / `READ WRITE`).
    access: Option<bool>,
    read_only: bool,
    isolation: Option<String>,
    deferrable: bool,
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
        match d.defname.as_str() {
            "transaction_read_only" => {
                o.read_only = def_bool(d.arg.as_deref());
                o.access = Some(o.read_only);
            }
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

pub(super) fn tx_stmt(t: &pb::TransactionStmt) -> TxControl {
    use pb::TransactionStmtKind as K;
    match K::try_from(t.kind).unwrap_or(K::Undefined) {
        K::TransStmtBegin | K::TransStmtStart | K::Undefined => {
            let o = tx_options(&t.options);
            TxControl::Begin {
                read_only: o.access,
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
    let on_off = |b: bool| if b { "on" } else { "off" }.to_string();
    // One setting per option, in the order written (a repeated option: the last one wins,
    // as `SET` applies them in order).
    let mut sets: Vec<(String, String)> = Vec::new();
    for n in args {
        let Some(N::DefElem(d)) = n.node.as_ref() else {
            return Class::SessionState(SessionKind::Other);
        };
        let (name, value_sql) = match d.defname.as_str() {
            "transaction_isolation" => match d.arg.as_deref().and_then(const_text) {
                Some(iso) => (
                    "default_transaction_isolation",
                    quote_literal(&iso.to_lowercase()),
                ),
                None => return Class::SessionState(SessionKind::Other),
            },
            "transaction_read_only" => (
                "default_transaction_read_only",
                on_off(def_bool(d.arg.as_deref())),
            ),
            "transaction_deferrable" => (
                "default_transaction_deferrable",
                on_off(def_bool(d.arg.as_deref())),
            ),
            _ => return Class::SessionState(SessionKind::Other),
        };
        sets.push((name.to_string(), value_sql));
    }
    match sets.len() {
        0 => Class::SessionState(SessionKind::Other),
        1 => {
            let (name, value_sql) = sets.remove(0);
            Class::SessionState(SessionKind::Set {
                local,
                name,
                value_sql: Some(value_sql),
            })
        }
        _ => Class::SessionState(SessionKind::SetSeveral { local, sets }),
    }
}
