//! Session settings: the client's SETs and startup parameters replayed on server connections (pure text building), and tidemark's own `SET/SHOW/RESET tidemark.*` commands over both protocols.

use super::*;

/// Resets every setting a client can change with SET, including the two `RESET ALL` leaves
/// alone (`role` and `session_authorization` are GUC_NO_RESET_ALL in PostgreSQL).
pub(super) const RESET_SQL: &str = "RESET SESSION AUTHORIZATION; RESET ROLE; RESET ALL";
/// `ServerConn::state_key` of a connection whose session state is unknown (see
/// `Analysis::opaque_state`); session keys are 0 or odd, so none matches it.
pub(super) const STATE_UNKNOWN: u64 = 2;
/// `ServerConn::state_key` while a SET runs: reset (without DISCARD) before the next use.
pub(super) const STATE_DIRTY: u64 = 4;
/// A string literal that means the same whatever `standard_conforming_strings` says: an
/// escape string (`E'…'`) with backslashes and quotes doubled.
pub(super) fn quote_literal(v: &str) -> String {
    format!("E'{}'", v.replace('\\', "\\\\").replace('\'', "''"))
}

pub(super) fn is_ident(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
}

/// Turns startup parameters (including `options=-c a=b`) into SET statements.
pub fn startup_to_sets(params: &StartupParams) -> Result<Vec<(String, String)>, String> {
    let mut out: Vec<(String, String)> = Vec::new();
    let mut put = |name: &str, value: &str| -> Result<(), String> {
        if !is_ident(name) {
            return Err(format!(
                "invalid parameter name \"{name}\" in startup packet"
            ));
        }
        let name = name.to_ascii_lowercase();
        out.retain(|(n, _)| *n != name);
        out.push((
            name.clone(),
            format!("SET {name} TO {}", quote_literal(value)),
        ));
        Ok(())
    };
    for (k, v) in &params.0 {
        match k.as_str() {
            "user" | "database" | "replication" => {}
            "options" => {
                let mut words = v.split_whitespace();
                while let Some(w) = words.next() {
                    let kv = if w == "-c" {
                        words.next().unwrap_or_default()
                    } else if let Some(r) = w.strip_prefix("-c") {
                        r
                    } else if let Some(r) = w.strip_prefix("--") {
                        r
                    } else {
                        return Err(format!(
                            "unsupported startup option \"{w}\" (use -c name=value)"
                        ));
                    };
                    let Some((n, val)) = kv.split_once('=') else {
                        return Err(format!("startup option \"{kv}\" is not name=value"));
                    };
                    put(&n.replace('-', "_"), val)?;
                }
            }
            _ => put(k, v)?,
        }
    }
    Ok(out)
}

/// What a tidemark command answers.
pub(super) enum TidemarkAnswer {
    /// A command tag (`SET`, `RESET`).
    Tag(&'static str),
    /// One row of one text column.
    Show { column: String, value: String },
}

pub(super) fn key_too_long(len: usize, max: usize) -> ErrorFields {
    ErrorFields::error(
        "54000",
        format!("tidemark key of {len} bytes is longer than the limit of {max} bytes"),
    )
    .with_hint("use a shorter key (limits.max_key_length)")
}

pub(super) fn unknown_setting(name: &str) -> ErrorFields {
    ErrorFields::error(
        "42704",
        format!("unrecognized configuration parameter \"tidemark.{name}\""),
    )
    .with_hint("tidemark settings: consistency, key, min_lsn, report_lsn, transactions (SET), commit_lsn, last_route (SHOW)")
}

impl Session {
    pub(super) fn state_sql(&self) -> String {
        let mut sql = String::from(RESET_SQL);
        for s in self
            .startup_sets
            .iter()
            .chain(self.sets.iter().map(|(_, s)| s))
        {
            sql.push_str("; ");
            sql.push_str(s);
        }
        sql
    }

    pub(super) fn recompute_state_key(&mut self) {
        self.state_key = if self.startup_sets.is_empty() && self.sets.is_empty() {
            0
        } else {
            hash_of(&self.state_sql()) | 1
        };
        self.tx_defaults = self.compute_tx_defaults();
    }

    /// The transaction defaults routing uses (`default_transaction_read_only`, serializable
    /// isolation), read from the very SETs this session replays on its server connections
    /// (startup options, then the client's SETs), so routing and the server agree.
    fn compute_tx_defaults(&self) -> TxDefaults {
        let mut d = TxDefaults::default();
        for s in self
            .startup_sets
            .iter()
            .chain(self.sets.iter().map(|(_, s)| s))
        {
            if s.starts_with("SET default_transaction_") {
                for c in &self.app.classifier.classify(s).statements {
                    d.apply_class(c);
                }
            }
        }
        d
    }

    /// Carries out a tidemark command; what to answer, or the error.
    pub(super) fn run_tidemark(
        &mut self,
        cmd: &TidemarkCommand,
    ) -> Result<TidemarkAnswer, ErrorFields> {
        let invalid = |name: &str, value: &str, what: &str| {
            ErrorFields::error(
                "22023",
                format!("invalid value for parameter \"tidemark.{name}\": \"{value}\""),
            )
            .with_hint(what.to_string())
        };
        match cmd {
            TidemarkCommand::Set { name, value } => {
                match name.as_str() {
                    "consistency" => match value.parse::<Consistency>() {
                        Ok(c) => {
                            self.consistency = c;
                            self.info.lock().consistency = c.to_string();
                        }
                        Err(e) => return Err(invalid(name, value, &e.to_string())),
                    },
                    "key" => {
                        let max = self.app.config.load().limits.max_key_length;
                        if value.len() > max {
                            return Err(key_too_long(value.len(), max));
                        }
                        self.key = if value.is_empty() {
                            None
                        } else {
                            Some(value.clone())
                        };
                    }
                    "min_lsn" => match value.parse::<Lsn>() {
                        Ok(l) => self.token = l,
                        Err(e) => return Err(invalid(name, value, &e.to_string())),
                    },
                    "report_lsn" => match value.to_ascii_lowercase().as_str() {
                        "on" | "true" | "1" | "yes" => self.report_lsn = true,
                        "off" | "false" | "0" | "no" => self.report_lsn = false,
                        _ => return Err(invalid(name, value, "use on or off")),
                    },
                    // Takes effect at the next transaction.
                    "transactions" => match value.parse::<TxMode>() {
                        Ok(m) => self.tx_mode = m,
                        Err(_) => {
                            return Err(invalid(
                                name,
                                value,
                                "use primary, read_only or optimistic",
                            ))
                        }
                    },
                    _ => return Err(unknown_setting(name)),
                }
                Ok(TidemarkAnswer::Tag("SET"))
            }
            TidemarkCommand::Reset { name } => {
                match name.as_str() {
                    "consistency" => {
                        self.consistency = self.app.config.load().default_consistency(&self.user);
                        self.info.lock().consistency = self.consistency.to_string();
                    }
                    "key" => self.key = None,
                    "min_lsn" => self.token = Lsn::ZERO,
                    "report_lsn" => self.report_lsn = false,
                    "transactions" => {
                        self.tx_mode = self.app.config.load().default_transactions(&self.user)
                    }
                    "all" => {
                        self.tx_mode = self.app.config.load().default_transactions(&self.user);
                        self.consistency = self.app.config.load().default_consistency(&self.user);
                        self.key = None;
                        self.token = Lsn::ZERO;
                        self.report_lsn = false;
                    }
                    _ => return Err(unknown_setting(name)),
                }
                Ok(TidemarkAnswer::Tag("RESET"))
            }
            TidemarkCommand::Show { name } => {
                let value = match name.as_str() {
                    "commit_lsn" if self.write_unknown => {
                        // The primary could not be asked for a position at or past the last
                        // write (see `tidemark_command`): a lower one would be a token that
                        // lets a reader see data older than that write.
                        return Err(ErrorFields::error(
                            "55000",
                            "the commit position of this session's last write is not known",
                        )
                        .with_hint(
                            "the primary could not be asked for its current position; try again",
                        ));
                    }
                    "commit_lsn" => {
                        // From now on every write's position is read (see
                        // `may_leave_position_unread`).
                        self.position_shown = true;
                        self.last_write_lsn.to_string()
                    }
                    "consistency" => self.consistency.to_string(),
                    "key" => self.key.clone().unwrap_or_default(),
                    "min_lsn" => self.token.to_string(),
                    "report_lsn" => if self.report_lsn { "on" } else { "off" }.to_string(),
                    "transactions" => self.tx_mode.to_string(),
                    "last_route" => self
                        .last_route
                        .map(|(n, r)| format!("{} {}", self.app.node_name(n), r.as_str()))
                        .unwrap_or_default(),
                    _ => return Err(unknown_setting(name)),
                };
                Ok(TidemarkAnswer::Show {
                    column: format!("tidemark.{name}"),
                    value,
                })
            }
        }
    }

    /// Before a tidemark command (it may be `SHOW tidemark.commit_lsn`): a write whose position
    /// was left unread, or lost, is resolved with the primary's current position. Tidemark
    /// commands are rare; this costs a round trip only after such a write.
    async fn know_last_write(&mut self) {
        if self.write_unknown {
            cold(self.resolve_unknown_write()).await;
        }
    }

    /// A tidemark command sent as a simple Query.
    pub(super) async fn tidemark_command(&mut self, cmd: TidemarkCommand) -> SResult<()> {
        self.know_last_write().await;
        match self.run_tidemark(&cmd) {
            Ok(TidemarkAnswer::Tag(tag)) => self.io.push(&be::command_complete(tag)),
            Ok(TidemarkAnswer::Show { column, value }) => {
                self.io.push(&be::row_description(&[column.as_str()]));
                self.io.push(&be::data_row(&[Some(value)]));
                self.io.push(&be::command_complete("SHOW"));
            }
            Err(e) => return self.send_error_ready(e, UnitEnd::Query).await,
        }
        self.io.push(&be::ready_for_query(self.tx_status.byte()));
        self.io.flush().await
    }

    /// A tidemark command sent with the extended protocol (drivers prepare statements they
    /// run often): Parse/Bind/Describe/Execute/Close/Sync answered here, as PostgreSQL would
    /// answer a `SET`/`SHOW` (no parameters; SHOW describes one text column).
    pub(super) async fn tidemark_command_extended(&mut self, unit: &Unit) -> SResult<()> {
        self.know_last_write().await;
        // Which command each statement and the unnamed portal hold, in message order.
        let mut parsed: HashMap<String, TidemarkCommand> = HashMap::new();
        let mut portal: Option<TidemarkCommand> = None;
        let command_of = |a: &Analysis| match &a.class {
            Class::Tidemark(c) => Some(c.clone()),
            _ => None,
        };
        let describe = |io: &mut ClientIo, cmd: Option<&TidemarkCommand>| match cmd {
            Some(TidemarkCommand::Show { name }) => {
                io.push(&be::row_description(&[format!("tidemark.{name}").as_str()]))
            }
            _ => io.push(&be::no_data()),
        };
        let mut failed = false;
        for m in &unit.msgs {
            let msg = &m.msg;
            if failed && !matches!(msg, FrontendMessage::Sync) {
                continue;
            }
            let stmt_cmd = |name: &str, parsed: &HashMap<String, TidemarkCommand>| {
                parsed.get(name).cloned().or_else(|| {
                    let s = if name.is_empty() {
                        self.unnamed.clone()
                    } else {
                        self.statements.get(name).cloned()
                    };
                    s.and_then(|s| command_of(&s.analysis))
                })
            };
            match msg {
                FrontendMessage::Parse { name, query, .. } => {
                    if let Some(c) = command_of(&self.app.classifier.classify(query)) {
                        parsed.insert(name.to_string(), c);
                    }
                    self.io.push(&be::simple(be::PARSE_COMPLETE));
                }
                FrontendMessage::Bind { statement, .. } => {
                    portal = stmt_cmd(statement, &parsed);
                    self.io.push(&be::simple(be::BIND_COMPLETE));
                }
                FrontendMessage::Describe {
                    target: Target::Statement,
                    name,
                } => {
                    let c = stmt_cmd(name, &parsed);
                    self.io.push(&be::parameter_description(&[]));
                    describe(&mut self.io, c.as_ref());
                }
                FrontendMessage::Describe { .. } => describe(&mut self.io, portal.as_ref()),
                FrontendMessage::Execute { .. } => {
                    let Some(cmd) = portal.clone() else {
                        let e = ErrorFields::error("34000", "portal \"\" does not exist");
                        self.io.push(&e.to_error());
                        failed = true;
                        continue;
                    };
                    match self.run_tidemark(&cmd) {
                        Ok(TidemarkAnswer::Tag(tag)) => self.io.push(&be::command_complete(tag)),
                        Ok(TidemarkAnswer::Show { value, .. }) => {
                            self.io.push(&be::data_row(&[Some(value)]));
                            self.io.push(&be::command_complete("SHOW"));
                        }
                        Err(e) => {
                            crate::metrics::error(&e.code);
                            self.io.push(&e.to_error());
                            failed = true;
                        }
                    }
                }
                FrontendMessage::Close { .. } => self.io.push(&be::simple(be::CLOSE_COMPLETE)),
                FrontendMessage::Sync => {
                    failed = false;
                    self.io.push(&be::ready_for_query(self.tx_status.byte()));
                }
                _ => {}
            }
        }
        if failed && unit.end != UnitEnd::Sync {
            self.skip_until_sync = true;
        }
        self.io.flush().await
    }

    /// Session SETs take effect when they succeed outside a transaction, or when the
    /// transaction they ran in commits; a failed unit or a rollback records nothing.
    /// Statements are walked in order, so `BEGIN; SET ...; ROLLBACK` in one query counts
    /// as rolled back.
    pub(super) fn track_session_state(
        &mut self,
        prev: TxStatus,
        status: TxStatus,
        errored: bool,
        analysis: &Analysis,
    ) {
        if errored {
            if status == TxStatus::Idle {
                self.tx_session_state.clear();
            }
            return;
        }
        let mut in_tx = prev != TxStatus::Idle;
        for c in &analysis.statements {
            match c {
                Class::Transaction(TxControl::Begin { .. }) => in_tx = true,
                Class::Transaction(TxControl::Commit) => {
                    let pending = std::mem::take(&mut self.tx_session_state);
                    self.record_session_state(&pending);
                    in_tx = false;
                }
                Class::Transaction(TxControl::Rollback) => {
                    self.tx_session_state.clear();
                    in_tx = false;
                }
                Class::SessionState(_) if in_tx => self.tx_session_state.push(c.clone()),
                Class::SessionState(_) => self.record_session_state(std::slice::from_ref(c)),
                _ => {}
            }
        }
        if status == TxStatus::Idle {
            self.tx_session_state.clear();
        }
    }

    pub(super) fn record_session_state(&mut self, statements: &[Class]) {
        let mut changed = false;
        for c in statements.iter() {
            match c {
                Class::SessionState(SessionKind::Set {
                    local: false,
                    name,
                    value_sql,
                }) => {
                    self.sets.retain(|(n, _)| n != name);
                    let stmt = match value_sql {
                        Some(v) => format!("SET {name} TO {v}"),
                        None => format!("SET {name} TO DEFAULT"),
                    };
                    self.sets.push((name.clone(), stmt));
                    changed = true;
                }
                Class::SessionState(SessionKind::SetSeveral { local: false, sets }) => {
                    for (name, v) in sets {
                        self.sets.retain(|(n, _)| n != name);
                        self.sets.push((name.clone(), format!("SET {name} TO {v}")));
                    }
                    changed = true;
                }
                Class::SessionState(SessionKind::Reset { name: Some(name) }) => {
                    self.sets.retain(|(n, _)| n != name);
                    self.startup_sets
                        .retain(|s| !s.starts_with(&format!("SET {name} TO ")));
                    changed = true;
                }
                Class::SessionState(SessionKind::Reset { name: None })
                | Class::SessionState(SessionKind::Discard { all: true }) => {
                    self.sets.clear();
                    self.startup_sets.clear();
                    changed = true;
                }
                _ => {}
            }
        }
        if changed {
            self.recompute_state_key();
        }
    }
}
