//! One parsed statement to its `Class`: the statement-kind table, temp tables, EXPLAIN and COPY.

use pg_query::protobuf as pb;
use pg_query::NodeEnum as N;

use super::session::tx_stmt;
use super::{is_temp, Cx};
use crate::class::{Class, SessionKind, SessionsOf, TidemarkCommand};

/// `CURSOR_OPT_HOLD` from PostgreSQL's `parsenodes.h`.
const CURSOR_OPT_HOLD: i32 = 0x0020;

impl Cx<'_> {
    pub(super) fn statement(&mut self, node: &N) -> Class {
        use Class::{Read, Write};
        if self.ends_sessions.is_none() {
            self.ends_sessions = ends_sessions(node);
        }
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
                self.copy = true;
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

/// What a `DROP DATABASE`, `ALTER DATABASE … RENAME`, `DROP ROLE` or `ALTER ROLE … RENAME`
/// names (see [`SessionsOf`]).
fn ends_sessions(node: &N) -> Option<SessionsOf> {
    match node {
        N::DropdbStmt(d) => Some(SessionsOf::Database {
            name: d.dbname.clone(),
            force: d.options.iter().any(|o| {
                matches!(o.node.as_ref(), Some(N::DefElem(e)) if e.defname.eq_ignore_ascii_case("force"))
            }),
        }),
        N::RenameStmt(r) if r.rename_type == pb::ObjectType::ObjectDatabase as i32 => {
            Some(SessionsOf::Database {
                name: r.subname.clone(),
                force: false,
            })
        }
        N::RenameStmt(r) if r.rename_type == pb::ObjectType::ObjectRole as i32 => {
            Some(SessionsOf::Roles(vec![r.subname.clone()]))
        }
        N::DropRoleStmt(d) => {
            let names: Vec<String> = d
                .roles
                .iter()
                .filter_map(|n| match n.node.as_ref() {
                    Some(N::RoleSpec(r)) if !r.rolename.is_empty() => Some(r.rolename.clone()),
                    _ => None,
                })
                .collect();
            (!names.is_empty()).then_some(SessionsOf::Roles(names))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_that_end_sessions() {
        let c = crate::Classifier::new(0, crate::FunctionPolicy::default());
        let db = |name: &str, force: bool| {
            Some(SessionsOf::Database {
                name: name.into(),
                force,
            })
        };
        let roles = |n: &[&str]| Some(SessionsOf::Roles(n.iter().map(|s| s.to_string()).collect()));
        for (sql, want) in [
            ("DROP DATABASE x", db("x", false)),
            ("DROP DATABASE IF EXISTS \"My Db\"", db("My Db", false)),
            ("DROP DATABASE Test_X WITH (FORCE)", db("test_x", true)),
            ("DROP DATABASE x (force)", db("x", true)),
            ("ALTER DATABASE a RENAME TO b", db("a", false)),
            ("DROP ROLE r", roles(&["r"])),
            ("DROP USER IF EXISTS a, \"B\"", roles(&["a", "B"])),
            ("DROP GROUP g", roles(&["g"])),
            ("ALTER ROLE a RENAME TO b", roles(&["a"])),
            ("ALTER DATABASE a SET search_path = x", None),
            ("ALTER TABLE a RENAME TO b", None),
            ("CREATE DATABASE x", None),
            ("SELECT 1", None),
        ] {
            assert_eq!(c.classify(sql).ends_sessions, want, "{sql}");
        }
    }
}
