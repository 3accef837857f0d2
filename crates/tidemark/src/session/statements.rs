//! Statements: classifying a unit's texts (long ones off the event loop), the client's prepared statements and the analyses they carry.

use super::*;

/// A client's named prepared statement.
#[derive(Debug)]
pub(super) struct Stmt {
    /// The statement text (for a text that is not UTF-8, a lossy copy; see `wire`).
    pub(super) query: String,
    /// The text's bytes as the client sent them when they are not UTF-8 (a non-UTF-8
    /// `client_encoding`): what is sent to servers.
    pub(super) wire: Option<Vec<u8>>,
    pub(super) param_types: Vec<u32>,
    /// Name used on server connections (shared by every client with the same text).
    pub(super) global: String,
    pub(super) analysis: Arc<Analysis>,
    /// The session state (`Session::state_key`) `global` was made under, and the classifier
    /// generation `analysis` was judged with: an unnamed Parse of the same text is answered
    /// with this statement only while both are unchanged (see `Session::analyse`).
    pub(super) state_key: u64,
    pub(super) generation: u64,
    /// A Describe of it (or of a portal bound to it) has been sent with its answer to be
    /// noted as the shape clients were given (`App::note_described_shape`): once is enough.
    pub(super) shape_noted: std::sync::atomic::AtomicBool,
}

impl Stmt {
    /// Whether an unnamed Parse of `query` with `param_types` may reuse this statement.
    fn same_unnamed(
        &self,
        query: &str,
        param_types: &[u32],
        state_key: u64,
        generation: u64,
    ) -> bool {
        self.wire.is_none()
            && self.state_key == state_key
            && self.generation == generation
            && self.param_types == param_types
            && self.query == query
    }

    /// A Parse of this statement under `name` (tidemark's shared name, or "").
    pub(super) fn parse_frame(&self, name: &str) -> Frame {
        match &self.wire {
            Some(bytes) => fe::parse_bytes(name, bytes, &self.param_types),
            None => fe::parse(name, &self.query, &self.param_types),
        }
    }
}

/// A unit's combined analysis and the prepared statements it defines or closes (see
/// `Session::analyse`), or the error that refuses it.
pub(super) type Analysed = Result<(Arc<Analysis>, StmtUpdates), ErrorFields>;

/// Analyses of a unit's long texts, made on the blocking pool, by message index.
pub(super) type LongTexts = smallvec::SmallVec<[(usize, Arc<Analysis>); 1]>;

/// What [`Session::analyse_now`] made of a unit.
pub(super) enum Analysing<'u> {
    Done(Analysed),
    /// The text of message `.0` must be classified on the blocking pool first.
    Long(usize, &'u str),
}

/// Unnamed statements remembered besides the current one (see `Session::set_unnamed`).
pub(super) const RECENT_UNNAMED: usize = 3;
/// Longer unnamed texts are not remembered (memory per client stays small).
pub(super) const MAX_RECENT_UNNAMED_TEXT: usize = 4096;

/// The prepared statements a unit defines (`Some`) or closes (`None`), by name: inline for
/// the usual one or two, so a unit with a Parse allocates no list.
pub(super) type StmtUpdates = smallvec::SmallVec<[(String, Option<Arc<Stmt>>); 2]>;

/// What tidemark knows of a statement it cannot read (text in a non-UTF-8 client encoding, a
/// protocol-level function call): it may do anything, so it goes to the primary and the
/// connection's session state is unknown afterwards.
pub(super) fn opaque_analysis() -> Arc<Analysis> {
    opaque_analysis_of(true)
}

/// [`opaque_analysis`], saying whether the text may be a COPY (a protocol-level function
/// call cannot be).
fn opaque_analysis_of(copy: bool) -> Arc<Analysis> {
    Arc::new(Analysis {
        class: Class::Unknown,
        statements: vec![Class::Unknown],
        pins_session: false,
        opaque_state: true,
        signal_call: false,
        ends_sessions: None,
        hints: Default::default(),
        copy,
    })
}

/// Classifies a statement text. Long texts (whose parse can take milliseconds) are classified
/// on tokio's blocking pool, so they never stall the event loop other clients share.
pub(super) async fn classify(app: &Arc<App>, sql: &str) -> Arc<Analysis> {
    if let Some(a) = classify_inline(app, sql) {
        return a;
    }
    let app = app.clone();
    let text = sql.to_string();
    tokio::task::spawn_blocking(move || app.classifier.classify(&text))
        .await
        .unwrap_or_else(|_| opaque_analysis())
}

/// [`classify`] for a text short enough to parse on the event loop, without a future (the
/// per-statement case); `None` for a long one, which [`classify`] sends to the blocking pool.
pub(super) fn classify_inline(app: &App, sql: &str) -> Option<Arc<Analysis>> {
    (sql.len() <= tidemark_sql::INLINE_PARSE_LIMIT).then(|| app.classifier.classify(sql))
}

/// Whether a text runs `DISCARD ALL` or `DEALLOCATE ALL` (the server then drops every
/// prepared statement of the connection).
fn clears(a: &Analysis) -> bool {
    a.statements.iter().any(|c| {
        matches!(
            c,
            Class::SessionState(
                SessionKind::Discard { all: true } | SessionKind::Deallocate { name: None }
            )
        )
    })
}

impl Session {
    /// Makes `s` the unnamed statement. The one it replaces is remembered (a few, newest
    /// first, texts of at most [`MAX_RECENT_UNNAMED_TEXT`] bytes), so that drivers cycling
    /// through a handful of unnamed statements (a write, then its reads) find theirs again.
    fn set_unnamed(&mut self, s: Arc<Stmt>) {
        let Some(old) = self.unnamed.replace(s.clone()) else {
            return;
        };
        if Arc::ptr_eq(&old, &s) {
            return;
        }
        let memo = &mut self.recent_unnamed;
        // `s` leaves the memo (it is the current one now), or the oldest entry does.
        let end = memo
            .iter()
            .position(|m| m.as_ref().is_some_and(|m| Arc::ptr_eq(m, &s)))
            .unwrap_or(RECENT_UNNAMED - 1);
        memo[..=end].rotate_right(1);
        memo[0] = (old.wire.is_none() && old.query.len() <= MAX_RECENT_UNNAMED_TEXT).then_some(old);
    }

    pub(super) fn apply_statement_updates(&mut self, updates: StmtUpdates) {
        if updates.is_empty() {
            // (Most units: dropping an empty list's iterator showed in the profile.)
            return;
        }
        for (name, stmt) in updates {
            match stmt {
                Some(s) if name.is_empty() => self.set_unnamed(s),
                Some(s) => {
                    self.statements.insert(name, s);
                }
                None => {
                    self.statements.remove(&name);
                }
            }
        }
    }

    /// Classifies a unit; returns its combined analysis and the prepared statements it
    /// defines (`Some`) or closes (`None`). Texts too long to parse on the event loop are
    /// classified on the blocking pool first (see [`classify`]).
    pub(super) async fn analyse(&mut self, unit: &Unit) -> Analysed {
        let mut long = LongTexts::new();
        loop {
            match self.analyse_now(unit, &long) {
                Analysing::Done(r) => return r,
                Analysing::Long(i, text) => {
                    let a = classify(&self.app, text).await;
                    long.push((i, a));
                }
            }
        }
    }

    /// [`Session::analyse`] without waiting: `Long` names the first text too long to parse
    /// inline that `long` (texts classified on the blocking pool, by message index) lacks.
    /// It changes nothing but `unit_clears_statements`, so it may run again.
    pub(super) fn analyse_now<'u>(&mut self, unit: &'u Unit, long: &LongTexts) -> Analysing<'u> {
        let classify_at =
            |app: &App, i: usize, sql: &'u str| -> Result<Arc<Analysis>, Analysing<'u>> {
                if let Some(a) = classify_inline(app, sql) {
                    return Ok(a);
                }
                match long.iter().find(|(j, _)| *j == i) {
                    Some((_, a)) => Ok(a.clone()),
                    None => Err(Analysing::Long(i, sql)),
                }
            };
        // Inline: a unit of one statement (nearly all of them) allocates nothing for its parts.
        let mut parts: smallvec::SmallVec<[Arc<Analysis>; 4]> = smallvec::SmallVec::new();
        let mut updates = StmtUpdates::new();
        let mut new_named = 0usize;
        self.unit_clears_statements = false;
        for (i, m) in unit.msgs.iter().enumerate() {
            match &m.msg {
                FrontendMessage::Query(sql) => {
                    let a = match classify_at(&self.app, i, sql) {
                        Ok(a) => a,
                        Err(long) => return long,
                    };
                    self.unit_clears_statements |= clears(&a);
                    parts.push(a);
                }
                FrontendMessage::Parse {
                    name,
                    query,
                    param_types,
                } => {
                    let query: &str = query;
                    let generation = self.app.classifier.generation();
                    if name.is_empty() {
                        // Drivers that do not prepare (pgbench -M extended, psycopg and
                        // asyncpg for one-off statements, JDBC below its prepare threshold)
                        // send the same unnamed text again and again: the previous unnamed
                        // statement answers it, without classifying, naming and allocating
                        // it anew (a third of the extended protocol's per-statement work).
                        let state_key = self.state_key;
                        if let Some(s) = std::iter::once(&self.unnamed)
                            .chain(&self.recent_unnamed)
                            .flatten()
                            .find(|s| s.same_unnamed(query, param_types, state_key, generation))
                        {
                            parts.push(s.analysis.clone());
                            updates.push((String::new(), Some(s.clone())));
                            continue;
                        }
                    }
                    let analysis = match classify_at(&self.app, i, query) {
                        Ok(a) => a,
                        Err(long) => return long,
                    };
                    let global =
                        self.app
                            .shared_name(hash_of(&(query, param_types, self.state_key)));
                    parts.push(analysis.clone());
                    if !name.is_empty() {
                        new_named += 1;
                        let max_bytes = self.app.config.load().max_prepared_bytes();
                        let used: usize = self.statements.values().map(|s| s.query.len()).sum();
                        if used + query.len() > max_bytes {
                            return Analysing::Done(Err(ErrorFields::error(
                                "54000",
                                format!(
                                    "prepared statements of this connection would hold {} bytes of text, over the limit of {max_bytes} (limits.max_prepared_bytes_per_client)",
                                    used + query.len()
                                ),
                            )
                            .with_hint("Close (DEALLOCATE) statements you no longer use")));
                        }
                        if self.statements.len() + new_named > self.max_prepared {
                            return Analysing::Done(Err(ErrorFields::error(
                                "53400",
                                format!(
                                    "too many prepared statements on this connection (limit {}, limits.max_prepared_per_client)",
                                    self.max_prepared
                                ),
                            ).with_hint("Close (DEALLOCATE) statements you no longer use")));
                        }
                    }
                    updates.push((
                        name.to_string(),
                        Some(Arc::new(Stmt {
                            query: query.to_string(),
                            wire: None,
                            param_types: param_types.to_vec(),
                            global,
                            analysis,
                            state_key: self.state_key,
                            generation,
                            shape_noted: Default::default(),
                        })),
                    ));
                }
                FrontendMessage::Bind { statement, .. } => {
                    if let Some(s) = self.lookup_stmt(statement, &updates) {
                        self.unit_clears_statements |= clears(&s.analysis);
                        parts.push(s.analysis.clone());
                    }
                }
                FrontendMessage::Describe {
                    target: Target::Statement,
                    name,
                } => {
                    if let Some(s) = self.lookup_stmt(name, &updates) {
                        parts.push(s.analysis.clone());
                    }
                }
                FrontendMessage::Close {
                    target: Target::Statement,
                    name,
                } if !name.is_empty() => {
                    updates.push((name.to_string(), None));
                }
                FrontendMessage::FunctionCall => parts.push(opaque_analysis_of(false)),
                FrontendMessage::NonUtf8 { simple: true, .. } => parts.push(opaque_analysis()),
                FrontendMessage::NonUtf8 {
                    name, param_types, ..
                } => {
                    let bytes = match fe::parse_query_bytes(&m.frame) {
                        Ok(b) => b,
                        Err(e) => {
                            return Analysing::Done(Err(ErrorFields::error("08P01", e.to_string())))
                        }
                    };
                    let analysis = opaque_analysis();
                    let global =
                        self.app
                            .shared_name(hash_of(&(bytes, param_types, self.state_key)));
                    parts.push(analysis.clone());
                    if !name.is_empty() {
                        new_named += 1;
                    }
                    updates.push((
                        name.to_string(),
                        Some(Arc::new(Stmt {
                            query: String::from_utf8_lossy(bytes).into_owned(),
                            wire: Some(bytes.to_vec()),
                            param_types: param_types.to_vec(),
                            global,
                            analysis,
                            state_key: self.state_key,
                            generation: self.app.classifier.generation(),
                            shape_noted: Default::default(),
                        })),
                    ));
                }
                _ => {}
            }
        }
        // One statement parsed, described and bound in the same unit counts once.
        parts.dedup_by(|a, b| Arc::ptr_eq(a, b));
        Analysing::Done(Ok((Analysis::combine(&parts), updates)))
    }

    pub(super) fn lookup_stmt(
        &self,
        name: &str,
        updates: &[(String, Option<Arc<Stmt>>)],
    ) -> Option<Arc<Stmt>> {
        if let Some((_, s)) = updates.iter().rev().find(|(n, _)| n == name) {
            return s.clone();
        }
        if name.is_empty() {
            self.unnamed.clone()
        } else {
            self.statements.get(name).cloned()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unnamed_statement_is_reused_only_for_the_same_text_types_state_and_rules() {
        let s = Stmt {
            query: "SELECT v FROM t WHERE id = $1".into(),
            wire: None,
            param_types: vec![23],
            global: "tm_0".into(),
            analysis: opaque_analysis(),
            state_key: 7,
            generation: 2,
            shape_noted: Default::default(),
        };
        assert!(s.same_unnamed("SELECT v FROM t WHERE id = $1", &[23], 7, 2));
        // Another text (even one byte, even a prefix), other parameter types, another
        // session state or a new function catalog: classified and named anew.
        assert!(!s.same_unnamed("SELECT v FROM t WHERE id = $2", &[23], 7, 2));
        assert!(!s.same_unnamed("SELECT v FROM t WHERE id = ", &[23], 7, 2));
        assert!(!s.same_unnamed("DELETE FROM t WHERE id = $1", &[23], 7, 2));
        assert!(!s.same_unnamed("SELECT v FROM t WHERE id = $1", &[20], 7, 2));
        assert!(!s.same_unnamed("SELECT v FROM t WHERE id = $1", &[], 7, 2));
        assert!(!s.same_unnamed("SELECT v FROM t WHERE id = $1", &[23], 8, 2));
        assert!(!s.same_unnamed("SELECT v FROM t WHERE id = $1", &[23], 7, 3));
        // A text that is not UTF-8 is never reused (its analysis is opaque by construction).
        let raw = Stmt {
            wire: Some(b"SELECT v FROM t WHERE id = $1".to_vec()),
            ..s
        };
        assert!(!raw.same_unnamed("SELECT v FROM t WHERE id = $1", &[23], 7, 2));
    }
}
