//! Process-level setup: the signals that stop tidemark (SIGTERM, SIGINT) or reload its
//! config (SIGHUP), and the open-file limit.

use std::sync::Arc;

use crate::app::App;

/// SIGTERM/SIGINT/SIGHUP handlers, installed when created (from then on SIGHUP no longer
/// kills the process).
pub struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    pub fn install() -> std::io::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    /// Returns on SIGTERM or SIGINT; each SIGHUP reloads the config file as the admin
    /// console's RELOAD does (a refused reload is logged and the old config stays).
    pub async fn serve(&mut self, app: &Arc<App>) {
        loop {
            tokio::select! {
                _ = self.term.recv() => return,
                _ = self.int.recv() => return,
                _ = self.hup.recv() => match crate::admin::apply_reload(app) {
                    Ok(()) => tracing::info!("SIGHUP: config reloaded"),
                    Err(e) => tracing::warn!(sqlstate = %e.code, "SIGHUP: {}", e.message),
                },
            }
        }
    }
}

/// Returns on SIGTERM or Ctrl-C (SIGINT).
pub async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
    }
}

/// Raises the soft limit on open files to the hard limit: every client and every server
/// connection is a socket, and the common default soft limit (1,024) would cap tidemark far
/// below `limits.max_clients`. Returns the soft limit now in force.
pub fn raise_open_file_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed to them.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim = raised;
            }
        }
    }
    lim.rlim_cur
}
