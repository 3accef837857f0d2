//! The packaging files against the code they package: no Docker engine or cargo-deb runs
//! here, so these check what can go stale without anyone noticing — paths the .deb takes
//! files from, the production build the Dockerfile and the .deb make, the example config
//! (it must load), the systemd unit's commands, the licenses.

use std::path::{Path, PathBuf};

use tidemark::config::Config;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn deb_metadata() -> toml::Value {
    let manifest: toml::Value = read("crates/tidemark/Cargo.toml")
        .parse()
        .expect("manifest");
    manifest["package"]["metadata"]["deb"].clone()
}

#[test]
fn every_file_the_deb_installs_exists_except_the_binary_it_builds() {
    let deb = deb_metadata();
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let assets = deb["assets"].as_array().expect("assets");
    assert!(!assets.is_empty());
    let mut binary = false;
    for a in assets {
        let src = a[0].as_str().expect("asset source");
        if src == "target/release/tidemark" {
            assert_eq!(a[1].as_str(), Some("usr/bin/"));
            binary = true;
            continue;
        }
        assert!(crate_dir.join(src).is_file(), "deb asset {src} is missing");
    }
    assert!(binary, "the deb installs the tidemark binary");
    let scripts = deb["maintainer-scripts"]
        .as_str()
        .expect("maintainer-scripts");
    let postinst = crate_dir.join(scripts).join("postinst");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&postinst)
            .expect("postinst")
            .permissions(),
    );
    assert!(mode & 0o111 != 0, "postinst must be executable");
    let units = deb["systemd-units"]["unit-scripts"]
        .as_str()
        .expect("systemd-units");
    assert!(crate_dir.join(units).join("tidemark.service").is_file());
    // A production build: the dev harness (tidemark dev, tidemark-cluster, rcgen) stays out.
    assert_eq!(deb["default-features"].as_bool(), Some(false));
}

#[test]
fn the_container_builds_the_production_binary_and_runs_it_unprivileged() {
    let docker = read("Dockerfile");
    assert!(docker.contains("cargo build --release -p tidemark --no-default-features --locked"));
    assert!(docker.contains("USER tidemark"));
    assert!(docker.contains("ENTRYPOINT [\"tidemark\"]"));
    // The ports it exposes are the defaults the docs give.
    assert!(docker.contains("EXPOSE 6432 9187"));
    let cfg = Config::parse("[[nodes]]\nname = \"p\"\nport = 5432\n").expect("minimal config");
    assert!(cfg.listen.ends_with(":6432"), "{}", cfg.listen);
    let ignore = read(".dockerignore");
    assert!(ignore
        .lines()
        .any(|l| l.trim().trim_matches('/') == "target"));
}

#[test]
fn the_example_config_loads_and_the_unit_starts_and_reloads_it() {
    let example = read("packaging/tidemark.toml");
    let cfg = Config::parse(&example).unwrap_or_else(|e| panic!("packaging/tidemark.toml: {e:#}"));
    assert!(cfg.nodes.len() >= 2);
    let unit = read("packaging/tidemark.service");
    let line = |key: &str| {
        unit.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("{key}= missing from the unit"))
            .to_string()
    };
    assert_eq!(
        line("ExecStart"),
        "/usr/bin/tidemark --config /etc/tidemark/tidemark.toml"
    );
    // SIGHUP is the console's RELOAD (tests/ops.rs proves the process stays up).
    assert_eq!(line("ExecReload"), "/bin/kill -HUP $MAINPID");
    assert_eq!(line("User"), "tidemark");
    // Where the deb puts the example config is where the unit reads it.
    let deb = deb_metadata();
    assert!(deb["assets"]
        .as_array()
        .expect("assets")
        .iter()
        .any(|a| a[1].as_str() == Some("etc/tidemark/tidemark.toml")));
}

#[test]
fn licenses_are_the_ones_the_manifest_names() {
    let root: toml::Value = read("Cargo.toml").parse().expect("workspace manifest");
    assert_eq!(
        root["workspace"]["package"]["license"].as_str(),
        Some("MIT OR Apache-2.0")
    );
    assert!(read("LICENSE-MIT").contains("Permission is hereby granted"));
    assert!(read("LICENSE-APACHE").contains("Apache License"));
}
