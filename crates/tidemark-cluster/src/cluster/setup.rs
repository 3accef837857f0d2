//! Creating a cluster: the base directory, initdb of the primary, base backups of the replicas.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::process::{start_with_port_retry, stop_node_hard};
use super::{
    remove_contents, Cleanup, Cluster, Node, HOST, MARKER_FILE, STREAM_TIMEOUT, SUPERUSER,
};
use crate::config::{ClusterConfig, ReplicaConfig};
use crate::env::Env;
use crate::{bindir, os, pgconf, ClusterError};

impl Cluster {
    /// Creates and starts the cluster, returning once every replica is streaming.
    ///
    /// See [`ClusterConfig::data_dir`] for what happens to an existing directory.
    pub fn start(cfg: ClusterConfig) -> Result<Cluster, ClusterError> {
        let bindir = bindir::find_bindir()?;
        let major = bindir::check_version(&bindir)?;
        let run_as = os::run_as()?;
        let (base, created) = prepare_base(cfg.data_dir.as_deref(), &bindir, run_as)?;
        let cleanup = match (cfg.keep, created) {
            (true, _) => Cleanup::Keep,
            (false, true) => Cleanup::RemoveDir,
            (false, false) => Cleanup::RemoveContents,
        };
        // From here on, dropping `cluster` tears down whatever was started.
        let mut cluster = Cluster {
            env: Env {
                bindir,
                major,
                run_as,
                base,
            },
            nodes: Vec::new(),
            cleanup,
        };
        let started = Instant::now();
        cluster.boot(&cfg)?;
        tracing::info!(
            base = %cluster.env.base.display(),
            nodes = cluster.nodes.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "local PostgreSQL cluster started"
        );
        Ok(cluster)
    }

    pub(super) fn boot(&mut self, cfg: &ClusterConfig) -> Result<(), ClusterError> {
        let env = self.env.clone();
        os::write_owned(
            &env.base.join(MARKER_FILE),
            &format!(
                "# Created by tidemark-cluster; tidemark-cluster may wipe this directory.\n\
                 nodes = {}\n",
                1 + cfg.replicas.len()
            ),
            env.run_as,
        )?;
        check_reachable(&env)?;

        // Primary.
        let mut primary = new_node(&env, 0, "primary".to_string())?;
        let mut initdb = env.server_cmd("initdb");
        initdb.arg("-D").arg(&primary.dir).args([
            "-U",
            SUPERUSER,
            "--auth=trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ]);
        env.run(initdb, &env.perm_hint(), String::new)?;
        let conf_path = primary.dir.join("postgresql.conf");
        let mut conf = std::fs::read_to_string(&conf_path)
            .map_err(|e| ClusterError::io(format!("read {}", conf_path.display()), e))?;
        conf.push_str(&pgconf::shared_conf(cfg, &env.base));
        os::write_owned(&conf_path, &conf, env.run_as)?;
        os::write_owned(
            &primary.dir.join("pg_hba.conf"),
            &pgconf::hba_conf(cfg.ssl.is_some()),
            env.run_as,
        )?;
        install_ssl_files(cfg, &primary.dir, env.run_as)?;
        start_with_port_retry(&env, 0, &mut primary, None)?;
        let primary_port = primary.port;
        self.nodes.push(primary);

        if cfg.replicas.is_empty() {
            return Ok(());
        }
        let names: Vec<String> = (1..=cfg.replicas.len())
            .map(|i| format!("replica_{i}"))
            .collect();
        let slots: Vec<String> = names
            .iter()
            .map(|n| format!("pg_create_physical_replication_slot('{n}', true)"))
            .collect();
        self.psql(0, &format!("SELECT {}", slots.join(", ")))?;

        // Replicas, in parallel: base backup, configure, start.
        let results: Vec<Result<Node, ClusterError>> = std::thread::scope(|scope| {
            let handles: Vec<_> = cfg
                .replicas
                .iter()
                .zip(&names)
                .enumerate()
                .map(|(k, (rcfg, name))| {
                    let env = &env;
                    scope.spawn(move || make_replica(env, cfg, k + 1, name, rcfg, primary_port))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(ClusterError::InvalidArgument(
                            "a replica setup thread panicked".to_string(),
                        ))
                    })
                })
                .collect()
        });
        let mut first_err = None;
        for r in results {
            match r {
                Ok(node) if first_err.is_none() => self.nodes.push(node),
                Ok(node) => {
                    // Keep node indexes dense; still make sure it gets torn down.
                    stop_node_hard(&env, &node);
                }
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first_err {
            return Err(e);
        }

        let sync: Vec<String> = cfg
            .replicas
            .iter()
            .zip(&names)
            .filter(|(r, _)| r.synchronous)
            .map(|(_, n)| n.clone())
            .collect();
        if let Some(value) = pgconf::sync_standby_names(&sync) {
            self.psql(
                0,
                &format!(
                    "ALTER SYSTEM SET synchronous_standby_names = {}",
                    pgconf::quote(&value)
                ),
            )?;
            self.psql(0, "SELECT pg_reload_conf()")?;
        }
        self.wait_all_streaming(&names, STREAM_TIMEOUT)
    }

    fn wait_all_streaming(&self, names: &[String], timeout: Duration) -> Result<(), ClusterError> {
        let list: Vec<String> = names.iter().map(|n| pgconf::quote(n)).collect();
        let sql = format!(
            "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming' \
             AND application_name IN ({})",
            list.join(", ")
        );
        let want = names.len().to_string();
        self.poll(
            0,
            &sql,
            |v| v == want,
            timeout,
            &format!("{} replica(s) to stream from the primary", names.len()),
        )
    }
}

fn new_node(env: &Env, i: usize, name: String) -> Result<Node, ClusterError> {
    Ok(Node {
        name,
        port: os::free_port()?,
        dir: env.base.join(format!("node{i}")),
        log: env.base.join(format!("node{i}.log")),
        pid: None,
    })
}

/// Base backup of the primary into node `i`, configured as a streaming replica and started.
fn make_replica(
    env: &Env,
    cfg: &ClusterConfig,
    i: usize,
    name: &str,
    rcfg: &ReplicaConfig,
    primary_port: u16,
) -> Result<Node, ClusterError> {
    let mut node = new_node(env, i, name.to_string())?;
    let mut cmd = env.server_cmd("pg_basebackup");
    cmd.args(["-h", HOST, "-p"])
        .arg(primary_port.to_string())
        .args(["-U", SUPERUSER, "-D"])
        .arg(&node.dir)
        .args([
            "-R",
            "-X",
            "stream",
            "-S",
            name,
            "--checkpoint=fast",
            "--no-sync",
        ]);
    env.run(cmd, &env.perm_hint(), String::new)?;
    let auto = node.dir.join("postgresql.auto.conf");
    let text = std::fs::read_to_string(&auto)
        .map_err(|e| ClusterError::io(format!("read {}", auto.display()), e))?;
    os::write_owned(
        &auto,
        &pgconf::rewrite_auto_conf(&text, primary_port, name),
        env.run_as,
    )?;
    os::chmod_700(&node.dir)?;
    // pg_basebackup copied them; written again so the key's mode is certainly 0600.
    install_ssl_files(cfg, &node.dir, env.run_as)?;
    start_with_port_retry(env, i, &mut node, Some(rcfg))?;
    Ok(node)
}

/// Copies the configured TLS certificate and key into a data directory (mode 0600).
fn install_ssl_files(
    cfg: &ClusterConfig,
    dir: &Path,
    run_as: Option<os::RunAs>,
) -> Result<(), ClusterError> {
    let Some(ssl) = &cfg.ssl else {
        return Ok(());
    };
    for (from, name) in [
        (&ssl.cert_file, pgconf::SSL_CERT),
        (&ssl.key_file, pgconf::SSL_KEY),
    ] {
        let bytes = std::fs::read(from)
            .map_err(|e| ClusterError::io(format!("read {}", from.display()), e))?;
        os::write_private(&dir.join(name), &bytes, run_as)?;
    }
    Ok(())
}

/// Creates or validates the base directory; returns it (absolute) and whether we created it.
fn prepare_base(
    given: Option<&Path>,
    bindir: &Path,
    run_as: Option<os::RunAs>,
) -> Result<(PathBuf, bool), ClusterError> {
    let (base, created) = match given {
        None => {
            let tmp = tempfile::Builder::new()
                .prefix("tidemark-cluster-")
                .tempdir()
                .map_err(|e| {
                    ClusterError::io(
                        "creating a temporary directory (check TMPDIR and free space)",
                        e,
                    )
                })?;
            (tmp.keep(), true)
        }
        Some(dir) if dir.exists() => {
            if !dir.is_dir() {
                return Err(ClusterError::InvalidArgument(format!(
                    "data_dir {} exists and is not a directory; pass a directory path",
                    dir.display()
                )));
            }
            let mut entries = std::fs::read_dir(dir)
                .map_err(|e| ClusterError::io(format!("list {}", dir.display()), e))?;
            if entries.next().is_some() {
                if !dir.join(MARKER_FILE).is_file() {
                    return Err(ClusterError::DataDirNotOurs {
                        path: dir.to_path_buf(),
                        marker: MARKER_FILE,
                    });
                }
                wipe_previous(dir, bindir, run_as)?;
                // It holds our marker, so the directory itself is ours to remove.
                (dir.to_path_buf(), true)
            } else {
                (dir.to_path_buf(), false)
            }
        }
        Some(dir) => {
            std::fs::create_dir_all(dir)
                .map_err(|e| ClusterError::io(format!("create data_dir {}", dir.display()), e))?;
            (dir.to_path_buf(), true)
        }
    };
    let base = base
        .canonicalize()
        .map_err(|e| ClusterError::io(format!("resolve {}", base.display()), e))?;
    os::chmod_700(&base)?;
    os::chown_tree(&base, run_as)?;
    Ok((base, created))
}

/// Stops servers still running from a previous kept cluster in `dir`, then empties it.
fn wipe_previous(dir: &Path, bindir: &Path, run_as: Option<os::RunAs>) -> Result<(), ClusterError> {
    let env = Env {
        bindir: bindir.to_path_buf(),
        major: 0,
        run_as,
        base: dir.to_path_buf(),
    };
    let entries = std::fs::read_dir(dir)
        .map_err(|e| ClusterError::io(format!("list {}", dir.display()), e))?;
    for entry in entries.flatten() {
        let path = entry.path();
        if path.join("postmaster.pid").is_file() {
            let node = Node {
                name: String::new(),
                port: 0,
                dir: path,
                log: PathBuf::new(),
                pid: None,
            };
            stop_node_hard(&env, &node);
        }
    }
    remove_contents(dir)
        .map_err(|e| ClusterError::io(format!("wipe previous cluster in {}", dir.display()), e))
}

/// When servers run as another account, make sure it can reach and write the base directory.
fn check_reachable(env: &Env) -> Result<(), ClusterError> {
    let Some(who) = env.run_as else {
        return Ok(());
    };
    let mut cmd = std::process::Command::new("test");
    cmd.arg("-w")
        .arg(&env.base)
        .stdin(std::process::Stdio::null());
    who.apply(&mut cmd);
    let ok = cmd.status().map(|s| s.success()).unwrap_or(true);
    if ok {
        Ok(())
    } else {
        Err(ClusterError::RunAs(format!(
            "uid {} cannot write {}; use a data_dir outside root-only directories (e.g. under /tmp) \
             or make its parents traversable (chmod o+x)",
            who.uid,
            env.base.display()
        )))
    }
}
