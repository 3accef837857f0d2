//! Owns finding the PostgreSQL server binaries (`PG_BINDIR`, `pg_config --bindir`, or the newest
//! `/usr/lib/postgresql/*/bin`) and checking their version.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::ClusterError;

/// Programs a cluster needs from the bin directory.
const REQUIRED: [&str; 5] = ["initdb", "pg_ctl", "postgres", "pg_basebackup", "psql"];

/// Oldest supported major version.
const MIN_MAJOR: u32 = 13;

/// Finds the directory holding `initdb`, `pg_ctl`, `postgres`, `pg_basebackup` and `psql`.
///
/// Order: the `PG_BINDIR` environment variable if set (it must then be right — no fallback),
/// else `pg_config --bindir` if that directory has `initdb` (on Debian `pg_config` may point to
/// `/usr/bin`, which lacks it), else the newest `/usr/lib/postgresql/<version>/bin`.
/// PostgreSQL 13 or newer is required.
pub fn find_bindir() -> Result<PathBuf, ClusterError> {
    find_bindir_from(std::env::var_os("PG_BINDIR"))
}

/// [`find_bindir`] with an explicit value for `PG_BINDIR` (so tests need not mutate the process
/// environment).
pub fn find_bindir_from(pg_bindir: Option<OsString>) -> Result<PathBuf, ClusterError> {
    if let Some(dir) = pg_bindir.filter(|d| !d.is_empty()) {
        let dir = PathBuf::from(dir);
        let missing = missing_programs(&dir);
        if !missing.is_empty() {
            return Err(ClusterError::BinariesNotFound {
                searched: format!("PG_BINDIR={} lacks {}", dir.display(), missing.join(", ")),
            });
        }
        check_version(&dir)?;
        return Ok(dir);
    }

    let mut searched = Vec::new();
    if let Some(dir) = pg_config_bindir() {
        let missing = missing_programs(&dir);
        if missing.is_empty() {
            check_version(&dir)?;
            return Ok(dir);
        }
        searched.push(format!(
            "pg_config --bindir gave {} which lacks {}",
            dir.display(),
            missing.join(", ")
        ));
    } else {
        searched.push("no pg_config on PATH".to_string());
    }

    let mut candidates: Vec<(Vec<u32>, PathBuf)> = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/usr/lib/postgresql") {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let key: Vec<u32> = name.split('.').filter_map(|p| p.parse().ok()).collect();
            if key.is_empty() {
                continue;
            }
            let bin = entry.path().join("bin");
            if missing_programs(&bin).is_empty() {
                candidates.push((key, bin));
            }
        }
    }
    candidates.sort();
    if let Some((_, dir)) = candidates.pop() {
        check_version(&dir)?;
        return Ok(dir);
    }
    searched.push("no complete /usr/lib/postgresql/*/bin".to_string());
    Err(ClusterError::BinariesNotFound {
        searched: searched.join("; "),
    })
}

fn missing_programs(dir: &Path) -> Vec<&'static str> {
    REQUIRED
        .iter()
        .copied()
        .filter(|p| !dir.join(p).is_file())
        .collect()
}

fn pg_config_bindir() -> Option<PathBuf> {
    let out = Command::new("pg_config")
        .arg("--bindir")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let s = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (!s.is_empty()).then(|| PathBuf::from(s))
}

/// Runs `postgres --version` and returns the major version, failing below [`MIN_MAJOR`].
pub(crate) fn check_version(dir: &Path) -> Result<u32, ClusterError> {
    let postgres = dir.join("postgres");
    let out = Command::new(&postgres)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| {
            ClusterError::io(
                format!(
                    "running {} --version (is it executable? reinstall postgresql or fix PG_BINDIR)",
                    postgres.display()
                ),
                e,
            )
        })?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    match parse_major(&text) {
        Some(major) if major >= MIN_MAJOR => Ok(major),
        _ => Err(ClusterError::UnsupportedVersion {
            bindir: dir.to_path_buf(),
            version: text,
        }),
    }
}

/// Parses the major version from e.g. `postgres (PostgreSQL) 15.6 (Debian 15.6-0+deb12u1)`.
pub(crate) fn parse_major(text: &str) -> Option<u32> {
    let after = text.split(')').nth(1).unwrap_or(text);
    let token = after.split_whitespace().next()?;
    let digits: String = token.chars().take_while(|c| c.is_ascii_digit()).collect();
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_versions() {
        assert_eq!(
            parse_major("postgres (PostgreSQL) 15.6 (Debian 15.6-0+deb12u1)"),
            Some(15)
        );
        assert_eq!(parse_major("postgres (PostgreSQL) 17beta1"), Some(17));
        assert_eq!(parse_major("postgres (PostgreSQL) 9.6.24"), Some(9));
        assert_eq!(parse_major("garbage"), None);
    }
}
