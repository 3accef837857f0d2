//! The expression-tree walker: finds writes, session pins and temp relations inside a statement.

use pg_query::protobuf as pb;
use pg_query::NodeEnum as N;

use super::{is_temp, Cx, Scan};
use crate::functions::FunctionRules;

/// Expression nesting beyond this is treated as a write rather than walked further. (prost's
/// decoder already refuses trees deeper than 100 messages, so this is a second fence.)
const MAX_DEPTH: usize = 400;

impl Cx<'_> {
    pub(super) fn scan(&mut self, node: &N) -> Scan {
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
