//! Around the config file (kept apart from [`crate::config`]'s structs): secrets read from
//! files or environment variables (`password_file`, `password_env`), the warning for a file
//! with passwords that others can read, and naming the key a TOML error is about.

use std::ops::Range;
use std::path::Path;

use crate::config::Config;

/// `section.key` of the line a TOML error points at (`pool.max_size` for `max_size = -3`
/// under `[pool]`), when the error is about one `key = value` line.
pub fn key_at(text: &str, span: Option<Range<usize>>) -> Option<String> {
    let span = span?;
    let start = span.start.min(text.len());
    let end = span.end.min(text.len());
    if text.get(start..end)?.contains('\n') {
        return None;
    }
    let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
    let line_end = text[start..].find('\n').map_or(text.len(), |i| start + i);
    let line = &text[line_start..line_end];
    let (key, _) = line.split_once('=')?;
    let key = key.trim().trim_matches('"');
    if key.is_empty()
        || !key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
    {
        return None;
    }
    let section = text[..line_start].lines().rev().find_map(|l| {
        let l = l.split('#').next().unwrap_or("").trim();
        l.starts_with('[')
            .then(|| l.trim_start_matches('[').trim_end_matches(']').trim())
    });
    Some(match section {
        Some(s) if !s.is_empty() => format!("{s}.{key}"),
        _ => key.to_string(),
    })
}

/// Fills `password`/`server_password` from `*_file` / `*_env` references. Errors name the key.
pub fn resolve_secrets(cfg: &mut Config) -> anyhow::Result<()> {
    for u in &mut cfg.users {
        let at = format!("users.{}", u.name);
        resolve(
            &format!("{at}.password"),
            &mut u.password,
            u.password_file.as_deref(),
            u.password_env.as_deref(),
        )?;
        resolve(
            &format!("{at}.server_password"),
            &mut u.server_password,
            u.server_password_file.as_deref(),
            u.server_password_env.as_deref(),
        )?;
    }
    let a = &mut cfg.auth;
    resolve(
        "auth.password",
        &mut a.password,
        a.password_file.as_deref(),
        a.password_env.as_deref(),
    )?;
    let m = &mut cfg.monitor;
    resolve(
        "monitor.password",
        &mut m.password,
        m.password_file.as_deref(),
        m.password_env.as_deref(),
    )
}

fn resolve(
    key: &str,
    value: &mut Option<String>,
    file: Option<&Path>,
    env: Option<&str>,
) -> anyhow::Result<()> {
    let given = [value.is_some(), file.is_some(), env.is_some()];
    if given.iter().filter(|g| **g).count() > 1 {
        anyhow::bail!("{key}: give only one of {key}, {key}_file and {key}_env");
    }
    if let Some(f) = file {
        let text = std::fs::read_to_string(f)
            .map_err(|e| anyhow::anyhow!("{key}_file: cannot read {}: {e}", f.display()))?;
        let secret = text.trim_end_matches(['\n', '\r']);
        if secret.is_empty() {
            anyhow::bail!("{key}_file: {} is empty", f.display());
        }
        *value = Some(secret.to_string());
    } else if let Some(var) = env {
        let secret = std::env::var(var).map_err(|e| {
            anyhow::anyhow!("{key}_env: environment variable {var} is not usable ({e})")
        })?;
        if secret.is_empty() {
            anyhow::bail!("{key}_env: environment variable {var} is empty");
        }
        *value = Some(secret);
    }
    Ok(())
}

/// Whether the config text holds a password in clear (a `password` or `server_password` key
/// with a string value, at any depth).
pub fn has_inline_passwords(text: &str) -> bool {
    fn walk(v: &toml::Value) -> bool {
        match v {
            toml::Value::Table(t) => t.iter().any(|(k, v)| {
                (matches!(k.as_str(), "password" | "server_password") && v.is_str()) || walk(v)
            }),
            toml::Value::Array(a) => a.iter().any(walk),
            _ => false,
        }
    }
    toml::from_str::<toml::Value>(text).is_ok_and(|v| walk(&v))
}

/// A warning when the config file holds passwords and its mode lets group or others read
/// it (`mode & 0o077`); `None` when all is well.
pub fn permission_warning(path: &Path, text: &str) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).ok()?.permissions().mode();
    (mode & 0o077 != 0 && has_inline_passwords(text)).then(|| {
        format!(
            "{} contains passwords and is readable by group or others (mode {:o}); run chmod 600 on it, or use password_file / password_env",
            path.display(),
            mode & 0o777
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const NODE: &str = "[[nodes]]\nname = \"p\"\nport = 5432\n";

    #[test]
    fn errors_name_the_key_path() {
        let text = format!("{NODE}[pool]\nmax_size = -3\n");
        let e = Config::parse(&text).unwrap_err().to_string();
        assert!(e.starts_with("pool.max_size: "), "{e}");
        let text = format!("{NODE}[limits]\nmax_clients = \"many\"\n");
        let e = Config::parse(&text).unwrap_err().to_string();
        assert!(e.starts_with("limits.max_clients: "), "{e}");
        let text = format!("{NODE}[routing]\nwait = \"sometimes\"\n");
        let e = Config::parse(&text).unwrap_err().to_string();
        assert!(
            e.starts_with("routing.wait: ") && e.contains("adaptive") && e.contains("fixed"),
            "{e}"
        );
        let c = Config::parse(&format!("{NODE}[routing]\nwait = \"fixed\"\n")).unwrap();
        assert_eq!(c.routing.wait, crate::config::WaitMode::Fixed);
        let c = Config::parse(NODE).unwrap();
        assert_eq!(c.routing.wait, crate::config::WaitMode::Adaptive);
    }

    #[test]
    fn passwords_from_files_and_environment() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pw");
        std::fs::write(&f, "from-file\n").unwrap();
        std::env::set_var("TIDEMARK_TEST_MONITOR_PW", "from-env");
        let text = format!(
            "{NODE}[[users]]\nname = \"app\"\npassword_file = \"{}\"\nserver_password_env = \"TIDEMARK_TEST_MONITOR_PW\"\n[monitor]\npassword_env = \"TIDEMARK_TEST_MONITOR_PW\"\n",
            f.display()
        );
        let c = Config::parse(&text).unwrap();
        assert_eq!(c.users[0].password.as_deref(), Some("from-file"));
        assert_eq!(c.users[0].server_password.as_deref(), Some("from-env"));
        assert_eq!(c.monitor.password.as_deref(), Some("from-env"));
        assert!(!has_inline_passwords(&text));

        let both = format!("{NODE}[monitor]\npassword = \"x\"\npassword_env = \"Y\"\n");
        let e = Config::parse(&both).unwrap_err().to_string();
        assert!(e.contains("monitor.password"), "{e}");
        let unset = format!("{NODE}[monitor]\npassword_env = \"TIDEMARK_TEST_SURELY_UNSET\"\n");
        let e = Config::parse(&unset).unwrap_err().to_string();
        assert!(e.contains("monitor.password_env"), "{e}");
        let auth_missing =
            format!("{NODE}[auth]\nuser = \"a\"\npassword_file = \"/nonexistent/pw\"\n");
        let e = Config::parse(&auth_missing).unwrap_err().to_string();
        assert!(e.contains("auth.password_file"), "{e}");
        let missing = format!("{NODE}[monitor]\npassword_file = \"/nonexistent/pw\"\n");
        let e = Config::parse(&missing).unwrap_err().to_string();
        assert!(e.contains("monitor.password_file"), "{e}");
    }

    #[test]
    fn readable_config_with_passwords_is_warned_about() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.toml");
        let text = format!("{NODE}[[users]]\nname = \"app\"\npassword = \"secret\"\n");
        std::fs::write(&path, &text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(permission_warning(&path, &text).is_some());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(permission_warning(&path, &text).is_none());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(permission_warning(&path, NODE).is_none());
    }

    #[test]
    fn log_format_and_pgbouncer_aliases() {
        use crate::config::{LogFormat, PoolMode};
        assert_eq!(Config::parse(NODE).unwrap().log_format, LogFormat::Text);
        let c = Config::parse(&format!("log_format = \"json\"\n{NODE}")).unwrap();
        assert_eq!(c.log_format, LogFormat::Json);
        let e = Config::parse(&format!("log_format = \"xml\"\n{NODE}")).unwrap_err();
        assert!(e.to_string().contains("log_format"), "{e}");
        let c = Config::parse(&format!(
            "{NODE}[pool]\npool_mode = \"session\"\ndefault_pool_size = 7\n[limits]\nmax_client_conn = 9\n"
        ))
        .unwrap();
        assert_eq!(c.pool.mode, PoolMode::Session);
        assert_eq!(c.pool.max_size, 7);
        assert_eq!(c.limits.max_clients, 9);
    }
}
