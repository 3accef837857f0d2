//! Owns running the PostgreSQL programs: the bin directory, the account they run as, the base
//! directory they run in, and turning a failed run into a [`ClusterError`] with a useful hint.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use crate::os::RunAs;
use crate::ClusterError;

/// Everything needed to run PostgreSQL programs for one cluster. Cheap to share across threads.
#[derive(Clone, Debug)]
pub(crate) struct Env {
    pub bindir: PathBuf,
    pub major: u32,
    pub run_as: Option<RunAs>,
    pub base: PathBuf,
}

impl Env {
    /// A command for a server-side program (`initdb`, `pg_ctl`, `pg_basebackup`): runs as the
    /// unprivileged account when we are root, in the base directory, with a clean environment.
    pub fn server_cmd(&self, program: &str) -> Command {
        let mut cmd = self.client_cmd(program);
        cmd.current_dir(&self.base);
        if let Some(who) = self.run_as {
            who.apply(&mut cmd);
        }
        cmd
    }

    /// A command for a client program (`psql`), run as the current user.
    pub fn client_cmd(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.bindir.join(program));
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("PG") {
                cmd.env_remove(key);
            }
        }
        cmd.env("LC_ALL", "C").env("LANG", "C").stdin(Stdio::null());
        // No client certificate: libpq would otherwise look in ~/.postgresql/, which a server
        // user run as another uid (root's HOME) may not read — an error, not "none", for TLS
        // connections (pg_basebackup, walreceivers, psql to nodes with `ssl`). Absent files.
        cmd.env("PGSSLCERT", self.base.join(".no-client-cert.crt"))
            .env("PGSSLKEY", self.base.join(".no-client-cert.key"));
        cmd
    }

    /// Runs `cmd` to completion; a non-zero exit becomes [`ClusterError::Command`] carrying its
    /// output, `extra` (e.g. the server log tail) and `hint`.
    pub fn run(
        &self,
        mut cmd: Command,
        hint: &str,
        extra: impl FnOnce() -> String,
    ) -> Result<Output, ClusterError> {
        let shown = show(&cmd);
        let out = cmd.output().map_err(|e| {
            ClusterError::io(
                format!("could not run `{shown}` (check PG_BINDIR / the postgresql install)"),
                e,
            )
        })?;
        if out.status.success() {
            return Ok(out);
        }
        let mut output = String::new();
        output.push_str(String::from_utf8_lossy(&out.stderr).trim());
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !stdout.trim().is_empty() {
            output.push_str("\nstdout: ");
            output.push_str(tail(stdout.trim(), 2000));
        }
        let extra = extra();
        if !extra.is_empty() {
            output.push('\n');
            output.push_str(&extra);
        }
        Err(ClusterError::Command {
            command: shown,
            status: out.status.to_string(),
            output,
            hint: hint.to_string(),
        })
    }

    /// Hint appended to failures of server-side programs.
    pub fn perm_hint(&self) -> String {
        match self.run_as {
            Some(who) => format!(
                "servers run as uid {} because PostgreSQL refuses root; {} and its parent \
                 directories must be reachable by that user",
                who.uid,
                self.base.display()
            ),
            None => format!("check that {} is writable", self.base.display()),
        }
    }
}

/// The command line, for messages.
fn show(cmd: &Command) -> String {
    let mut parts = vec![cmd.get_program().to_string_lossy().into_owned()];
    parts.extend(
        cmd.get_args()
            .map(|a: &OsStr| a.to_string_lossy().into_owned()),
    );
    parts.join(" ")
}

/// The last `n` bytes of `s` (on a char boundary).
pub(crate) fn tail(s: &str, n: usize) -> &str {
    if s.len() <= n {
        return s;
    }
    let mut start = s.len() - n;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

/// The text a log file gained after byte offset `from` (last 3000 bytes of it).
pub(crate) fn log_since(path: &Path, from: u64) -> String {
    let Ok(bytes) = std::fs::read(path) else {
        return String::new();
    };
    let from = usize::try_from(from).unwrap_or(0).min(bytes.len());
    let text = String::from_utf8_lossy(&bytes[from..]);
    tail(text.trim(), 3000).to_string()
}
