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
}

impl Stmt {
    /// A Parse of this statement under `name` (tidemark's shared name, or "").
    pub(super) fn parse_frame(&self, name: &str) -> Frame {
        match &self.wire {
            Some(bytes) => fe::parse_bytes(name, bytes, &self.param_types),
            None => fe::parse(name, &self.query, &self.param_types),
        }
    }
}

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
    if sql.len() <= tidemark_sql::INLINE_PARSE_LIMIT {
        return app.classifier.classify(sql);
    }
    let app = app.clone();
    let text = sql.to_string();
    tokio::task::spawn_blocking(move || app.classifier.classify(&text))
        .await
        .unwrap_or_else(|_| opaque_analysis())
}

impl Session {
    pub(super) fn apply_statement_updates(&mut self, updates: Vec<(String, Option<Arc<Stmt>>)>) {
        for (name, stmt) in updates {
            match stmt {
                Some(s) if name.is_empty() => self.unnamed = Some(s),
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
    /// defines (`Some`) or closes (`None`).
    #[allow(clippy::type_complexity)]
    pub(super) async fn analyse(
        &mut self,
        unit: &Unit,
    ) -> Result<(Arc<Analysis>, Vec<(String, Option<Arc<Stmt>>)>), ErrorFields> {
        // Inline: a unit of one statement (nearly all of them) allocates nothing for its parts.
        let mut parts: smallvec::SmallVec<[Arc<Analysis>; 4]> = smallvec::SmallVec::new();
        let mut updates: Vec<(String, Option<Arc<Stmt>>)> = Vec::new();
        let mut new_named = 0usize;
        let clears = |a: &Analysis| {
            a.statements.iter().any(|c| {
                matches!(
                    c,
                    Class::SessionState(
                        SessionKind::Discard { all: true } | SessionKind::Deallocate { name: None }
                    )
                )
            })
        };
        self.unit_clears_statements = false;
        for m in &unit.msgs {
            match &m.msg {
                FrontendMessage::Query(sql) => {
                    let a = classify(&self.app, sql).await;
                    self.unit_clears_statements |= clears(&a);
                    parts.push(a);
                }
                FrontendMessage::Parse {
                    name,
                    query,
                    param_types,
                } => {
                    let query: &str = query;
                    let analysis = classify(&self.app, query).await;
                    let global =
                        format!("tm_{:016x}", hash_of(&(query, param_types, self.state_key)));
                    parts.push(analysis.clone());
                    if !name.is_empty() {
                        new_named += 1;
                        let max_bytes = self.app.config.load().max_prepared_bytes();
                        let used: usize = self.statements.values().map(|s| s.query.len()).sum();
                        if used + query.len() > max_bytes {
                            return Err(ErrorFields::error(
                                "54000",
                                format!(
                                    "prepared statements of this connection would hold {} bytes of text, over the limit of {max_bytes} (limits.max_prepared_bytes_per_client)",
                                    used + query.len()
                                ),
                            )
                            .with_hint("Close (DEALLOCATE) statements you no longer use"));
                        }
                        if self.statements.len() + new_named > self.max_prepared {
                            return Err(ErrorFields::error(
                                "53400",
                                format!(
                                    "too many prepared statements on this connection (limit {}, limits.max_prepared_per_client)",
                                    self.max_prepared
                                ),
                            ).with_hint("Close (DEALLOCATE) statements you no longer use"));
                        }
                    }
                    updates.push((
                        name.to_string(),
                        Some(Arc::new(Stmt {
                            query: query.to_string(),
                            wire: None,
                            param_types: param_types.clone(),
                            global,
                            analysis,
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
                    let bytes = fe::parse_query_bytes(&m.frame)
                        .map_err(|e| ErrorFields::error("08P01", e.to_string()))?;
                    let analysis = opaque_analysis();
                    let global =
                        format!("tm_{:016x}", hash_of(&(bytes, param_types, self.state_key)));
                    parts.push(analysis.clone());
                    if !name.is_empty() {
                        new_named += 1;
                    }
                    updates.push((
                        name.to_string(),
                        Some(Arc::new(Stmt {
                            query: String::from_utf8_lossy(bytes).into_owned(),
                            wire: Some(bytes.to_vec()),
                            param_types: param_types.clone(),
                            global,
                            analysis,
                        })),
                    ));
                }
                _ => {}
            }
        }
        // One statement parsed, described and bound in the same unit counts once.
        parts.dedup_by(|a, b| Arc::ptr_eq(a, b));
        Ok((Analysis::combine(&parts), updates))
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
