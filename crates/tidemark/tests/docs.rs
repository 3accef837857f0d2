//! The reference docs against the code: every key of the config structs is documented in
//! docs/configuration.md (and nothing documented there is unknown), and every TOML block
//! in README.md and docs/*.md loads with the real config loader.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use tidemark::config::Config;

const PROBE: &str = "zz_probe_unknown_key";

/// (section, key): the section as written in TOML (`pool`, `nodes`), "" for the top level.
type Keys = BTreeSet<(String, String)>;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The fields serde expects at `path` (a chain of table names; `true` = array of tables),
/// read off `deny_unknown_fields`' error for an unknown key; `None` when `path` is not a
/// struct. The key list comes from the structs themselves, aliases included.
fn fields_at(path: &[(String, bool)]) -> Option<Vec<String>> {
    let mut v = toml::Value::Table(toml::map::Map::from_iter([(
        PROBE.to_string(),
        toml::Value::Integer(1),
    )]));
    for (name, array) in path.iter().rev() {
        let inner = if *array {
            toml::Value::Array(vec![v])
        } else {
            v
        };
        v = toml::Value::Table(toml::map::Map::from_iter([(name.clone(), inner)]));
    }
    let e = v.try_into::<Config>().err()?.to_string();
    let rest = e.split_once(&format!("unknown field `{PROBE}`"))?.1;
    let rest = rest.split_once("expected")?.1;
    // toml appends where the error is, on the next line: "in `pool`".
    let rest = rest.lines().next().unwrap_or(rest);
    Some(
        rest.split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_string)
            .collect(),
    )
}

/// Every (section, key) of the config, sections written as in TOML (`pool`, `nodes`, ""
/// for the top level), found by walking the structs.
fn config_keys() -> Keys {
    let mut out = BTreeSet::new();
    let mut todo: Vec<Vec<(String, bool)>> = vec![vec![]];
    while let Some(path) = todo.pop() {
        let Some(fields) = fields_at(&path) else {
            continue;
        };
        let section = path
            .iter()
            .map(|(n, _)| n.as_str())
            .collect::<Vec<_>>()
            .join(".");
        for f in fields {
            for array in [false, true] {
                let mut p = path.clone();
                p.push((f.clone(), array));
                if fields_at(&p).is_some() {
                    todo.push(p);
                }
            }
            out.insert((section.clone(), f));
        }
    }
    out
}

/// (section, key) pairs of docs/configuration.md's reference tables: under a heading naming
/// a section (`` ## `[pool]` ``, `` ## `[[nodes]]` ``, `## Top level`), each table row whose
/// first cell is a `` `key` ``. Aliases are written in the row as `` alias: `name` ``.
fn documented_keys(doc: &str) -> (Keys, Keys) {
    let mut out = BTreeSet::new();
    let mut aliases = BTreeSet::new();
    let mut section: Option<String> = None;
    for line in doc.lines() {
        if line.starts_with('#') {
            section = if line.to_ascii_lowercase().contains("top level") {
                Some(String::new())
            } else {
                line.split('`')
                    .nth(1)
                    .filter(|s| s.starts_with('['))
                    .map(|s| s.trim_matches(|c| c == '[' || c == ']').to_string())
            };
            continue;
        }
        let (Some(sec), Some(row)) = (&section, line.strip_prefix('|')) else {
            continue;
        };
        let first = row.split('|').next().unwrap_or("").trim();
        let Some(key) = first.strip_prefix('`').and_then(|k| k.strip_suffix('`')) else {
            continue;
        };
        out.insert((sec.clone(), key.to_string()));
        for alias in row.split("alias: `").skip(1) {
            if let Some(a) = alias.split('`').next() {
                aliases.insert((sec.clone(), a.to_string()));
            }
        }
    }
    (out, aliases)
}

#[test]
fn the_key_walk_sees_the_structs() {
    let keys = config_keys();
    for (s, k) in [
        ("", "listen"),
        ("", "log_format"),
        ("nodes", "port"),
        ("users", "password_file"),
        ("pool", "max_size"),
        ("monitor", "password_env"),
        ("pool", "default_pool_size"),
        ("tls", "cert_file"),
    ] {
        assert!(
            keys.contains(&(s.to_string(), k.to_string())),
            "{s}.{k} not found in {keys:?}"
        );
    }
}

#[test]
fn every_config_key_is_documented() {
    let doc = std::fs::read_to_string(repo().join("docs/configuration.md"))
        .expect("docs/configuration.md");
    let (documented, aliases) = documented_keys(&doc);
    let keys = config_keys();
    let missing: Vec<String> = keys
        .iter()
        .filter(|k| !documented.contains(*k) && !aliases.contains(*k))
        .map(|(s, k)| {
            if s.is_empty() {
                k.clone()
            } else {
                format!("{s}.{k}")
            }
        })
        .collect();
    assert!(
        missing.is_empty(),
        "config keys missing from docs/configuration.md (add a row to the section's table): {missing:?}"
    );
    let unknown: Vec<String> = documented
        .difference(&keys)
        .map(|(s, k)| format!("[{s}] {k}"))
        .collect();
    assert!(
        unknown.is_empty(),
        "docs/configuration.md documents keys the config does not have: {unknown:?}"
    );
}

/// Environment variables the binary reads (`env::var("NAME")` in src/) are documented.
#[test]
fn environment_variables_are_documented() {
    let doc = std::fs::read_to_string(repo().join("docs/configuration.md"))
        .expect("docs/configuration.md");
    let mut dirs = vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("src")];
    let mut found = BTreeSet::new();
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).expect("src dir").flatten() {
            let p = e.path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                let text = std::fs::read_to_string(&p).expect("source");
                for part in text.split("env::var(\"").skip(1) {
                    if let Some(name) = part.split('"').next() {
                        found.insert(name.to_string());
                    }
                }
            }
        }
    }
    assert!(found.contains("TIDEMARK_WORKER_THREADS"), "{found:?}");
    let missing: Vec<&String> = found
        .iter()
        .filter(|v| !doc.contains(&format!("`{v}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "environment variables missing from docs/configuration.md: {missing:?}"
    );
}

/// ```toml blocks of a markdown file, with their line numbers.
fn toml_blocks(text: &str) -> Vec<(usize, String)> {
    let mut out = vec![];
    let mut current: Option<(usize, String)> = None;
    for (i, line) in text.lines().enumerate() {
        match &mut current {
            None if line.trim_start().starts_with("```toml") => {
                current = Some((i + 1, String::new()))
            }
            Some(_) if line.trim_start().starts_with("```") => out.extend(current.take()),
            Some((_, body)) => {
                body.push_str(line);
                body.push('\n');
            }
            None => {}
        }
    }
    out
}

#[test]
fn every_toml_block_in_the_docs_loads() {
    let mut files = vec![repo().join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(repo().join("docs"))
        .expect("docs/")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "md"))
        .collect();
    docs.sort();
    files.extend(docs);
    let mut checked = 0;
    for f in files {
        let text = std::fs::read_to_string(&f).expect("readable doc");
        for (line, block) in toml_blocks(&text) {
            // A block that is only part of a config says so on its first line.
            if block
                .lines()
                .next()
                .is_some_and(|l| l.trim() == "# fragment")
            {
                continue;
            }
            if let Err(e) = Config::parse(&block) {
                panic!(
                    "{}:{line}: this TOML block does not load: {e:#}",
                    f.display()
                );
            }
            checked += 1;
        }
    }
    assert!(checked >= 2, "only {checked} TOML blocks found");
}
