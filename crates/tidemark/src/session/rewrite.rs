//! Rewriting a unit for the server connection it runs on. Pure: a unit, the client's
//! prepared statements and what the connection has prepared in, the bytes to send and the
//! responses each message owes out (in order, as [`Exp`]s for the relay).
//!
//! Server connections are shared, so a client's statement names are replaced by tidemark's
//! shared names (`tm_<hash of text, types and session state>`); a statement the connection
//! lacks is parsed first, invisibly; a Close of a named statement is answered here (the
//! server keeps it for other clients with the same text).

use bytes::BytesMut;
use tidemark_wire::frontend::Target;
use tidemark_wire::WireError;

use super::*;

/// What is prepared where: the client's statements and the server connection's.
pub(super) struct Prepared<'a> {
    pub(super) statements: &'a Statements,
    /// The client's unnamed statement, parsed in an earlier unit (maybe on another
    /// connection).
    pub(super) unnamed: Option<&'a Stmt>,
    /// Shared names the server connection has prepared.
    pub(super) on_server: &'a crate::server::Names,
}

/// A unit as sent to one server connection.
#[derive(Debug)]
pub(super) struct Rewritten {
    pub(super) out: BytesMut,
    pub(super) exp: VecDeque<Exp>,
    /// A client statement is prepared on the connection on the way (`ensure_prepared`).
    pub(super) prepares_copies: bool,
}

/// Rewrites `unit` for a connection. `skipping`: after an error in an open unit the server
/// skips everything up to Sync and owes nothing for it.
pub(super) fn rewrite(
    unit: &Unit,
    prepared: &Prepared<'_>,
    skipping: bool,
) -> Result<Rewritten, WireError> {
    // Sized once: grown message by message it was reallocated twice per statement (the
    // largest allocator cost of the prepared-statement path). Renamed statements and
    // re-sent Parses may still need more.
    let size: usize = unit.msgs.iter().map(|m| m.frame.len()).sum();
    let mut out = crate::recycled::take_spare(&super::relay::OUT_SPARES);
    out.reserve(size + 64);
    let mut exp: VecDeque<Exp> = crate::recycled::take_spare(&super::relay::EXP_SPARES);
    exp.reserve(unit.msgs.len() + 1);
    let mut prepares_copies = false;
    // The portal the last Bind made, and the named statement it was bound to.
    let mut bound: Option<(&str, &Stmt)> = None;
    let push_exp = |e: Exp, exp: &mut VecDeque<Exp>| {
        if !skipping || matches!(e, Exp::Sync) {
            exp.push_back(e);
        }
    };
    let relayed = |visible: bool| Exp::Parse {
        visible,
        register: None,
    };
    for m in &unit.msgs {
        let raw = m.frame.raw();
        match &m.msg {
            FrontendMessage::Parse { name, .. }
            | FrontendMessage::NonUtf8 {
                simple: false,
                name,
                ..
            } if !name.is_empty() => match prepared.statements.get(&**name) {
                // Not recorded (over a limit, reported by the server): sent as it is.
                None => {
                    out.extend_from_slice(raw);
                    push_exp(relayed(true), &mut exp);
                }
                Some(stmt) if prepared.on_server.contains(&stmt.global) => {
                    push_exp(Exp::Synth(be::simple(be::PARSE_COMPLETE)), &mut exp);
                }
                Some(stmt) => {
                    out.extend_from_slice(stmt.parse_frame(&stmt.global).raw());
                    push_exp(
                        Exp::Parse {
                            visible: true,
                            register: Some(stmt.global.clone()),
                        },
                        &mut exp,
                    );
                }
            },
            FrontendMessage::Bind {
                portal, statement, ..
            } => {
                let stmt = if statement.is_empty() {
                    None
                } else {
                    prepared.statements.get(&**statement)
                };
                bound = stmt.map(|s| (&**portal, &**s));
                match stmt {
                    Some(stmt) => {
                        prepares_copies |=
                            ensure_prepared(stmt, prepared.on_server, &mut out, &mut exp, skipping);
                        fe::put_renamed_bind(&mut out, &m.frame, &stmt.global)?;
                    }
                    None => {
                        if statement.is_empty() && !unit_parses_unnamed(unit) {
                            // The unnamed statement was parsed in an earlier unit, maybe on
                            // another connection: parse it again here.
                            if let Some(u) = prepared.unnamed {
                                out.extend_from_slice(u.parse_frame("").raw());
                                push_exp(relayed(false), &mut exp);
                            }
                        }
                        out.extend_from_slice(raw);
                    }
                }
                push_exp(Exp::Bind, &mut exp);
            }
            FrontendMessage::Describe {
                target: Target::Statement,
                name,
            } if !name.is_empty() => match prepared.statements.get(&**name) {
                Some(stmt) => {
                    prepares_copies |=
                        ensure_prepared(stmt, prepared.on_server, &mut out, &mut exp, skipping);
                    out.extend_from_slice(
                        fe::describe_or_close(b'D', Target::Statement, &stmt.global).raw(),
                    );
                    push_exp(describe_noting(stmt), &mut exp);
                }
                None => {
                    out.extend_from_slice(raw);
                    push_exp(Exp::Describe, &mut exp);
                }
            },
            FrontendMessage::Close {
                target: Target::Statement,
                name,
            } if !name.is_empty() => {
                // The server keeps the statement for other clients with the same text.
                push_exp(Exp::Synth(be::simple(be::CLOSE_COMPLETE)), &mut exp);
            }
            FrontendMessage::Parse { .. } | FrontendMessage::NonUtf8 { simple: false, .. } => {
                out.extend_from_slice(raw);
                push_exp(relayed(true), &mut exp);
            }
            FrontendMessage::Describe {
                target: Target::Portal,
                name,
            } => {
                out.extend_from_slice(raw);
                // A portal bound in this unit to a named statement: its description is the
                // statement's shape too (libpq's `PQexecPrepared` describes only the portal).
                match bound {
                    Some((portal, stmt)) if portal == &**name => {
                        push_exp(describe_noting(stmt), &mut exp)
                    }
                    _ => push_exp(Exp::Describe, &mut exp),
                }
            }
            FrontendMessage::Describe { .. } => {
                out.extend_from_slice(raw);
                push_exp(Exp::Describe, &mut exp);
            }
            FrontendMessage::Close { .. } => {
                out.extend_from_slice(raw);
                push_exp(Exp::Close, &mut exp);
            }
            FrontendMessage::Execute { .. } => {
                out.extend_from_slice(raw);
                push_exp(Exp::Execute, &mut exp);
            }
            FrontendMessage::Sync => {
                out.extend_from_slice(raw);
                push_exp(Exp::Sync, &mut exp);
            }
            FrontendMessage::Query(_) | FrontendMessage::NonUtf8 { simple: true, .. } => {
                out.extend_from_slice(raw);
                push_exp(Exp::Query, &mut exp);
            }
            FrontendMessage::FunctionCall => {
                out.extend_from_slice(raw);
                push_exp(Exp::Func, &mut exp);
            }
            FrontendMessage::Flush
            | FrontendMessage::CopyData
            | FrontendMessage::CopyDone
            | FrontendMessage::CopyFail => out.extend_from_slice(raw),
            FrontendMessage::Terminate | FrontendMessage::Password => {}
        }
    }
    Ok(Rewritten {
        out,
        exp,
        prepares_copies,
    })
}

/// Queues an invisible Parse of `stmt` under its shared name before a Bind or Describe of it,
/// unless the server connection already has it or the unit parses it already.
/// What a Describe of `stmt` (or of a portal bound to it) owes: noting the shape from its
/// answer the first time (`App::note_described_shape`), a plain relay after that.
fn describe_noting(stmt: &Stmt) -> Exp {
    use std::sync::atomic::Ordering;
    // A load first: the swap (an atomic write) only the first time.
    if stmt.shape_noted.load(Ordering::Relaxed) || stmt.shape_noted.swap(true, Ordering::Relaxed) {
        Exp::Describe
    } else {
        Exp::DescribeStmt(stmt.global.clone())
    }
}

fn ensure_prepared(
    stmt: &Stmt,
    on_server: &crate::server::Names,
    out: &mut BytesMut,
    exp: &mut VecDeque<Exp>,
    skipping: bool,
) -> bool {
    let queued = exp
        .iter()
        .any(|e| matches!(e, Exp::Parse { register: Some(g), .. } if *g == stmt.global));
    if on_server.contains(&stmt.global) || queued {
        return false;
    }
    out.extend_from_slice(stmt.parse_frame(&stmt.global).raw());
    // After an error the server skips to Sync: it owes nothing for this Parse.
    if !skipping {
        exp.push_back(Exp::Parse {
            visible: false,
            register: Some(stmt.global.clone()),
        });
    }
    true
}

fn unit_parses_unnamed(unit: &Unit) -> bool {
    unit.msgs
        .iter()
        .any(|m| m.msg.parse_name().is_some_and(str::is_empty))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidemark_wire::frame::Frame;

    fn unit(frames: &[Frame], end: UnitEnd) -> Unit {
        Unit {
            msgs: frames
                .iter()
                .map(|f| ClientMessage::decode(f.clone()).unwrap())
                .collect(),
            end,
        }
    }

    fn stmt(query: &str) -> Arc<Stmt> {
        Arc::new(Stmt {
            query: query.into(),
            wire: None,
            param_types: vec![],
            global: format!("tm_{}", query.len()),
            analysis: opaque_analysis(),
            state_key: 0,
            generation: 0,
            shape_noted: Default::default(),
        })
    }

    /// A client's statement `s1` of `query`, and a server connection that has its copy.
    fn s1_on_the_server(query: &str) -> (Statements, crate::server::Names, Arc<Stmt>) {
        let s = stmt(query);
        let mut statements = Statements::default();
        statements.insert("s1".to_string(), s.clone());
        let on_server = [s.global.clone()].into_iter().collect();
        (statements, on_server, s)
    }

    fn bind(statement: &str) -> Frame {
        let mut b = BytesMut::new();
        b.extend_from_slice(b"\0");
        b.extend_from_slice(statement.as_bytes());
        b.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0]);
        Frame::new(b'B', &b)
    }

    fn execute() -> Frame {
        Frame::new(b'E', &[0, 0, 0, 0, 0])
    }

    /// The messages in `out`, as (tag, statement or portal name) pairs.
    fn sent(out: &BytesMut) -> Vec<(char, String)> {
        let codec = tidemark_wire::FrameCodec::new(1 << 20);
        let mut buf = out.clone();
        let mut v = Vec::new();
        while let Some(f) = codec.decode(&mut buf).unwrap() {
            let name = match FrontendMessage::parse(&f).unwrap() {
                FrontendMessage::Parse { name, .. } => name.to_string(),
                FrontendMessage::Bind { statement, .. } => statement.to_string(),
                FrontendMessage::Describe { name, .. } => name.to_string(),
                _ => String::new(),
            };
            v.push((f.tag() as char, name));
        }
        v
    }

    fn kinds(exp: &VecDeque<Exp>) -> Vec<String> {
        exp.iter()
            .map(|e| match e {
                Exp::Parse { visible, register } => {
                    format!("Parse(visible={visible}, {})", register.is_some())
                }
                Exp::Synth(f) => format!("Synth({})", f.tag() as char),
                other => format!("{other:?}"),
            })
            .collect()
    }

    /// `send_and_relay` sends a unit of one simple query as the client sent it, owing one
    /// Query, without calling `rewrite` (unless the server is skipping to Sync): that is what
    /// `rewrite` makes of it.
    #[test]
    fn a_single_simple_query_is_sent_as_it_came() {
        let statements = Statements::default();
        let none = crate::server::Names::default();
        let p = Prepared {
            statements: &statements,
            unnamed: None,
            on_server: &none,
        };
        let q = fe::query("SELECT abalance FROM pgbench_accounts WHERE aid = 7");
        let r = rewrite(&unit(std::slice::from_ref(&q), UnitEnd::Query), &p, false).unwrap();
        assert_eq!(&r.out[..], q.raw());
        assert_eq!(kinds(&r.exp), ["Query"]);
    }

    #[test]
    fn a_bound_statement_the_connection_lacks_is_parsed_first_invisibly_and_once() {
        let mut statements = Statements::default();
        statements.insert("s1".to_string(), stmt("select 1"));
        let none = crate::server::Names::default();
        let p = Prepared {
            statements: &statements,
            unnamed: None,
            on_server: &none,
        };
        let u = unit(
            &[bind("s1"), execute(), bind("s1"), execute(), fe::sync()],
            UnitEnd::Sync,
        );
        let r = rewrite(&u, &p, false).unwrap();
        let global = statements["s1"].global.clone();
        assert_eq!(
            sent(&r.out),
            vec![
                ('P', global.clone()),
                ('B', global.clone()),
                ('E', String::new()),
                ('B', global),
                ('E', String::new()),
                ('S', String::new()),
            ]
        );
        assert_eq!(
            kinds(&r.exp),
            [
                "Parse(visible=false, true)",
                "Bind",
                "Execute",
                "Bind",
                "Execute",
                "Sync"
            ]
        );
        // The relay then checks the copy's shape before the unit runs on it.
        assert!(r.prepares_copies);
    }

    #[test]
    fn the_shape_of_a_statement_is_noted_from_its_first_describe_or_its_portals() {
        let (mut statements, on_server, s) = s1_on_the_server("select 4444");
        let p = Prepared {
            statements: &statements,
            unnamed: None,
            on_server: &on_server,
        };
        let portal = |name: &str| fe::describe_or_close(b'D', Target::Portal, name);
        let noting = format!("DescribeStmt({:?})", s.global);
        // libpq's PQexecPrepared: Bind, Describe of the portal, Execute. The first time the
        // answer is noted; after that it is relayed.
        let u = unit(
            &[bind("s1"), portal(""), execute(), fe::sync()],
            UnitEnd::Sync,
        );
        let first = rewrite(&u, &p, false).unwrap();
        assert_eq!(
            kinds(&first.exp),
            ["Bind", noting.as_str(), "Execute", "Sync"]
        );
        let again = rewrite(&u, &p, false).unwrap();
        assert_eq!(kinds(&again.exp), ["Bind", "Describe", "Execute", "Sync"]);
        // A portal bound to something else, or another portal: relayed.
        let other = stmt("select 55555");
        statements.insert("s2".to_string(), other.clone());
        let p = Prepared {
            statements: &statements,
            unnamed: None,
            on_server: &on_server,
        };
        let u = unit(&[bind("s1"), portal("p9"), fe::sync()], UnitEnd::Sync);
        assert_eq!(
            kinds(&rewrite(&u, &p, false).unwrap().exp),
            ["Bind", "Describe", "Sync"]
        );
        // A Describe of the statement itself, the first time for that statement.
        let u = unit(
            &[
                fe::describe_or_close(b'D', Target::Statement, "s2"),
                fe::sync(),
            ],
            UnitEnd::Sync,
        );
        let r = rewrite(&u, &p, false).unwrap();
        assert_eq!(
            kinds(&r.exp),
            [
                "Parse(visible=false, true)".to_string(),
                format!("DescribeStmt({:?})", other.global),
                "Sync".to_string()
            ]
        );
    }

    #[test]
    fn a_statement_the_connection_has_is_not_parsed_again_and_its_parse_is_answered_here() {
        let (statements, on_server, s) = s1_on_the_server("select 22");
        let p = Prepared {
            statements: &statements,
            unnamed: None,
            on_server: &on_server,
        };
        let u = unit(
            &[
                fe::parse("s1", "select 22", &[]),
                bind("s1"),
                execute(),
                fe::describe_or_close(b'C', Target::Statement, "s1"),
                fe::sync(),
            ],
            UnitEnd::Sync,
        );
        let r = rewrite(&u, &p, false).unwrap();
        assert_eq!(
            sent(&r.out),
            vec![
                ('B', s.global.clone()),
                ('E', String::new()),
                ('S', String::new())
            ]
        );
        assert_eq!(
            kinds(&r.exp),
            ["Synth(1)", "Bind", "Execute", "Synth(3)", "Sync"]
        );
        assert!(!r.prepares_copies);
    }

    #[test]
    fn the_unnamed_statement_of_an_earlier_unit_is_parsed_again_before_its_bind() {
        let statements = Statements::default();
        let earlier = stmt("select 333");
        let none = crate::server::Names::default();
        let p = Prepared {
            statements: &statements,
            unnamed: Some(&earlier),
            on_server: &none,
        };
        let r = rewrite(
            &unit(&[bind(""), execute(), fe::sync()], UnitEnd::Sync),
            &p,
            false,
        )
        .unwrap();
        assert_eq!(sent(&r.out)[0], ('P', String::new()));
        assert_eq!(kinds(&r.exp)[0], "Parse(visible=false, false)");
        // Parsed in the same unit: not again.
        let r = rewrite(
            &unit(
                &[fe::parse("", "select 4", &[]), bind(""), fe::sync()],
                UnitEnd::Sync,
            ),
            &p,
            false,
        )
        .unwrap();
        assert_eq!(sent(&r.out).len(), 3);
    }

    #[test]
    fn after_an_error_the_server_owes_nothing_but_the_ready_for_sync() {
        let mut statements = Statements::default();
        statements.insert("s1".to_string(), stmt("select 1"));
        let none = crate::server::Names::default();
        let p = Prepared {
            statements: &statements,
            unnamed: None,
            on_server: &none,
        };
        let r = rewrite(
            &unit(&[bind("s1"), execute(), fe::sync()], UnitEnd::Sync),
            &p,
            true,
        )
        .unwrap();
        assert_eq!(sent(&r.out).len(), 4, "the messages still go to the server");
        assert_eq!(kinds(&r.exp), ["Sync"]);
    }
}
