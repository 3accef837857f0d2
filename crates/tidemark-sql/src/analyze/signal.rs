//! Recognising `SELECT pg_terminate_backend(<pid>)` / `pg_cancel_backend(<pid>)` calls.

use pg_query::protobuf as pb;
use pg_query::NodeEnum as N;

use super::parse_guarded;

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
