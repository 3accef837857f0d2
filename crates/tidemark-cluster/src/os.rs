//! Owns the operating-system plumbing: which account runs the servers (PostgreSQL refuses root),
//! file ownership, free ports, and finding/killing postgres processes through `/proc`.

use std::ffi::CString;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::ClusterError;

/// The unprivileged account servers run as when we are root.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RunAs {
    pub uid: u32,
    pub gid: u32,
}

impl RunAs {
    /// Makes `cmd` run as this account.
    pub fn apply(&self, cmd: &mut Command) {
        cmd.uid(self.uid).gid(self.gid);
    }
}

/// `None` when we are not root; otherwise the `postgres` account, or `tidemark-pg` (created with
/// `useradd` if needed).
pub(crate) fn run_as() -> Result<Option<RunAs>, ClusterError> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    static ACCOUNT: OnceLock<Result<RunAs, String>> = OnceLock::new();
    ACCOUNT
        .get_or_init(find_or_create_account)
        .clone()
        .map(Some)
        .map_err(ClusterError::RunAs)
}

fn find_or_create_account() -> Result<RunAs, String> {
    for name in ["postgres", "tidemark-pg"] {
        if let Some(acct) = lookup_user(name) {
            return Ok(acct);
        }
    }
    let out = Command::new("useradd")
        .args([
            "--system",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            "tidemark-pg",
        ])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("no `postgres` account and running useradd failed: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "no `postgres` account and `useradd --system tidemark-pg` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    lookup_user("tidemark-pg").ok_or_else(|| {
        "useradd tidemark-pg succeeded but the account cannot be looked up".to_string()
    })
}

fn lookup_user(name: &str) -> Option<RunAs> {
    let cname = CString::new(name).ok()?;
    let mut buf = vec![0u8; 16 * 1024];
    // SAFETY: passwd is plain old data; zeroed is a valid initial value for getpwnam_r to fill.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: all pointers are valid for the duration of the call; buf outlives its use.
    let rc = unsafe {
        libc::getpwnam_r(
            cname.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut result,
        )
    };
    if rc != 0 || result.is_null() {
        return None;
    }
    Some(RunAs {
        uid: pwd.pw_uid,
        gid: pwd.pw_gid,
    })
}

/// Gives `path` (recursively) to the run-as account, if there is one.
pub(crate) fn chown_tree(path: &Path, who: Option<RunAs>) -> Result<(), ClusterError> {
    let Some(who) = who else { return Ok(()) };
    std::os::unix::fs::lchown(path, Some(who.uid), Some(who.gid))
        .map_err(|e| ClusterError::io(format!("chown {} to uid {}", path.display(), who.uid), e))?;
    let meta = std::fs::symlink_metadata(path)
        .map_err(|e| ClusterError::io(format!("stat {}", path.display()), e))?;
    if meta.is_dir() {
        let entries = std::fs::read_dir(path)
            .map_err(|e| ClusterError::io(format!("list {}", path.display()), e))?;
        for entry in entries {
            let entry =
                entry.map_err(|e| ClusterError::io(format!("list {}", path.display()), e))?;
            chown_tree(&entry.path(), Some(who))?;
        }
    }
    Ok(())
}

/// `chmod 0700`.
pub(crate) fn chmod_700(path: &Path) -> Result<(), ClusterError> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| ClusterError::io(format!("chmod 0700 {}", path.display()), e))
}

/// Writes a file and hands it to the run-as account.
pub(crate) fn write_owned(path: &Path, text: &str, who: Option<RunAs>) -> Result<(), ClusterError> {
    std::fs::write(path, text)
        .map_err(|e| ClusterError::io(format!("write {}", path.display()), e))?;
    chown_tree(path, who)
}

/// Writes `bytes` to `path` readable by its owner only (mode 0600), owned by `who`.
pub(crate) fn write_private(
    path: &Path,
    bytes: &[u8],
    who: Option<RunAs>,
) -> Result<(), ClusterError> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let err = |e| ClusterError::io(format!("write {}", path.display()), e);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(err)?;
    f.write_all(bytes).map_err(err)?;
    // An existing file keeps its mode on open: set it.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    chown_tree(path, who)
}

/// A port that was free a moment ago on 127.0.0.1.
pub(crate) fn free_port() -> Result<u16, ClusterError> {
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0))
        .map_err(|e| ClusterError::io("binding 127.0.0.1:0 to find a free port", e))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| ClusterError::io("reading the port of a bound socket", e))
}

/// Whether a process with this pid exists and is not a zombie.
pub fn pid_alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    // SAFETY: kill with signal 0 only checks for existence and permission.
    let rc = unsafe { libc::kill(pid, 0) };
    if rc != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH) {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !matches!(stat_fields(&stat).first(), Some(&"Z") | Some(&"X")),
        Err(_) => rc == 0,
    }
}

/// Fields of `/proc/<pid>/stat` after the `(comm)` part: state, ppid, ...
fn stat_fields(stat: &str) -> Vec<&str> {
    match stat.rfind(')') {
        Some(i) => stat[i + 1..].split_whitespace().collect(),
        None => Vec::new(),
    }
}

/// Direct children of `pid` (postgres backends and auxiliary processes of a postmaster).
pub(crate) fn children_of(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in entries.flatten() {
        let Some(child) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) {
            if stat_fields(&stat)
                .get(1)
                .and_then(|p| p.parse::<i32>().ok())
                == Some(pid)
            {
                out.push(child);
            }
        }
    }
    out
}

/// Pids of live processes whose command line contains `needle` (e.g. a cluster's base dir).
pub fn processes_mentioning(needle: &str) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    // SAFETY: getpid cannot fail.
    let me = unsafe { libc::getpid() };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        if let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) {
            let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
            if cmdline.contains(needle) && pid_alive(pid) {
                out.push(pid);
            }
        }
    }
    out
}

/// Whether `pid` still looks like a postgres process (guards against pid reuse before SIGKILL).
fn is_postgres(pid: i32) -> bool {
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    comm.starts_with("postgres") || String::from_utf8_lossy(&cmdline).contains("postgres")
}

/// SIGKILL `pid` if it is a live postgres process.
pub(crate) fn sigkill(pid: i32) {
    if pid_alive(pid) && is_postgres(pid) {
        // SAFETY: sending a signal has no memory-safety preconditions.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
    }
}

/// Waits until none of `pids` is alive; returns whether that happened within `timeout`.
pub(crate) fn wait_gone(pids: &[i32], timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if pids.iter().all(|&p| !pid_alive(p)) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Kills a postmaster and its children for good: SIGKILL the postmaster, give the children a
/// moment to notice its death and exit, then SIGKILL whatever is left. Returns whether the
/// postmaster died. It may linger as a zombie until its parent (init) reaps it, which can take
/// seconds; [`crate::cluster`] removes lock files naming dead pids before the next start.
pub(crate) fn kill_tree(postmaster: i32, children: &[i32]) -> bool {
    sigkill(postmaster);
    let gone = wait_gone(&[postmaster], Duration::from_secs(5));
    if !wait_gone(children, Duration::from_secs(2)) {
        for &c in children {
            sigkill(c);
        }
        wait_gone(children, Duration::from_secs(2));
    }
    gone
}
