//! Operating the real binary: SIGHUP reloads, `tidemark check-config`, `/healthz` and
//! `/readyz`, JSON logs with a line per client connect and disconnect.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BIN: &str = env!("CARGO_BIN_EXE_tidemark");

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// The tidemark binary serving `config`, its stderr in `log`; SIGTERMed on drop.
struct Served {
    child: Child,
    log: PathBuf,
}

impl Served {
    fn start(config: &Path, log: &Path) -> Served {
        let child = Command::new(BIN)
            .arg("--config")
            .arg(config)
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).expect("log file"))
            .spawn()
            .expect("tidemark runs");
        Served {
            child,
            log: log.to_path_buf(),
        }
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on the pid of a child this test started.
        let r = unsafe { libc::kill(self.child.id() as i32, sig) };
        assert_eq!(r, 0, "kill failed");
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if self.alive() {
            self.signal(libc::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(15);
            while self.alive() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// Connects to the admin console, retrying while the process starts.
async fn admin(port: u16) -> tokio_postgres::Client {
    let dsn = format!("host=127.0.0.1 port={port} user=postgres dbname=tidemark");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match tokio_postgres::connect(&dsn, tokio_postgres::NoTls).await {
            Ok((c, conn)) => {
                tokio::spawn(conn);
                return c;
            }
            Err(e) if Instant::now() > deadline => panic!("admin console unreachable: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

async fn config_value(c: &tokio_postgres::Client, key: &str) -> Option<String> {
    let msgs = c.simple_query("SHOW CONFIG").await.expect("SHOW CONFIG");
    rows(&msgs)
        .into_iter()
        .find(|r| r[0].as_deref() == Some(key))
        .and_then(|r| r[1].clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_and_the_process_stays_up() {
    let cluster = start_cluster(tidemark_cluster::ClusterConfig::with_replicas(1)).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tidemark.toml");
    let port = free_port();
    let write = |size: usize| {
        let text = format!(
            "listen = \"127.0.0.1:{port}\"\nadmin_users = [\"postgres\"]\n\
             [[nodes]]\nname = \"primary\"\nport = {}\n[[nodes]]\nname = \"replica_1\"\nport = {}\n\
             [[users]]\nname = \"postgres\"\nauth = \"trust\"\n[pool]\nmax_size = {size}\n",
            cluster.port(0),
            cluster.port(1)
        );
        std::fs::write(&path, text).unwrap();
    };
    write(3);
    let mut served = Served::start(&path, &dir.path().join("stderr.log"));
    let c = admin(port).await;
    assert_eq!(
        config_value(&c, "pool.max_size").await.as_deref(),
        Some("3")
    );

    write(7);
    served.signal(libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(10);
    while config_value(&c, "pool.max_size").await.as_deref() != Some("7") {
        assert!(Instant::now() < deadline, "SIGHUP did not reload");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(served.alive(), "SIGHUP killed tidemark");

    // A broken file is refused: the process stays up with the old config, and says why.
    std::fs::write(&path, "nodes = 3").unwrap();
    served.signal(libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !served.log().contains("config not reloaded") {
        assert!(
            Instant::now() < deadline,
            "no warning logged:\n{}",
            served.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(served.alive(), "a refused reload stopped tidemark");
    assert_eq!(
        config_value(&c, "pool.max_size").await.as_deref(),
        Some("7")
    );
    assert!(
        served.log().contains("SIGHUP: config reloaded"),
        "{}",
        served.log()
    );
    // stderr is a file here, not a terminal: plain text lines, no colour codes.
    assert!(
        !served.log().contains('\u{1b}'),
        "colour codes in a log file:\n{}",
        served.log()
    );
}

/// The first ```toml block of README.md's "## Configuration" section.
fn readme_config() -> String {
    let readme = include_str!("../../../README.md");
    let section = readme
        .split_once("\n## Configuration")
        .expect("README has a Configuration section")
        .1;
    let start = section.find("```toml\n").expect("a toml block") + 8;
    let len = section[start..].find("```").expect("its end");
    section[start..start + len].to_string()
}

fn check_config(path: &Path, connect: bool) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.arg("check-config").arg(path);
    if connect {
        cmd.arg("--connect");
    }
    cmd.output().expect("tidemark runs")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn check_config_accepts_the_readme_and_names_bad_fields() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("readme.toml");
    std::fs::write(&good, readme_config()).unwrap();
    let o = check_config(&good, false);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).lines().any(|l| l == "ok"), "{}", text(&o));

    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[[nodes]]\nname = \"p\"\nport = 5432\n[pool]\nmax_size = -3\n",
    )
    .unwrap();
    let o = check_config(&bad, false);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("pool.max_size"), "{}", text(&o));

    let invalid = dir.path().join("invalid.toml");
    std::fs::write(
        &invalid,
        "[[nodes]]\nname = \"p\"\nport = 5432\n[routing]\nconsistency = \"sometimes\"\n",
    )
    .unwrap();
    let o = check_config(&invalid, false);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("routing.consistency"), "{}", text(&o));

    let o = check_config(&dir.path().join("missing.toml"), false);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_connect_reports_each_node() {
    let cluster = start_cluster(tidemark_cluster::ClusterConfig::with_replicas(1)).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tidemark.toml");
    let cfg = |replica_port: u16| {
        format!(
            "[[nodes]]\nname = \"primary\"\nport = {}\n[[nodes]]\nname = \"replica_1\"\nport = {replica_port}\n\
             [[users]]\nname = \"postgres\"\nauth = \"trust\"\n",
            cluster.port(0)
        )
    };
    std::fs::write(&path, cfg(cluster.port(1))).unwrap();
    let o = tokio::task::spawn_blocking({
        let path = path.clone();
        move || check_config(&path, true)
    })
    .await
    .unwrap();
    let out = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert!(out.contains("node primary"), "{out}");
    assert!(out.contains("node replica_1"), "{out}");
    assert!(!out.contains("failed"), "{out}");

    // A node nobody listens on is reported by name, with the reason.
    std::fs::write(&path, cfg(free_port())).unwrap();
    let o = tokio::task::spawn_blocking(move || check_config(&path, true))
        .await
        .unwrap();
    let out = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    let line = out
        .lines()
        .find(|l| l.starts_with("node replica_1") && l.contains("failed"))
        .unwrap_or_else(|| panic!("no failure line for replica_1:\n{out}"));
    assert!(line.contains("connect"), "{line}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("node primary") && l.ends_with(": ok")),
        "{out}"
    );
}

async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.unwrap();
    let code = buf
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = buf.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
    (code, body.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_and_readyz_follow_the_primary() {
    let mut env = start(&[None], |c| c.metrics.listen = Some("127.0.0.1:0".into())).await;
    let addr = env.proxy.metrics_addr.expect("metrics listener");
    assert_eq!(get(addr, "/healthz").await.0, 200);
    let (code, body) = get(addr, "/readyz").await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body.lines().count(), 1, "{body}");

    tokio::task::block_in_place(|| env.cluster.stop(0)).expect("primary stops");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (code, body) = get(addr, "/readyz").await;
        if code == 503 {
            assert!(body.contains("no primary"), "{body}");
            assert_eq!(body.lines().count(), 1, "{body}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz still {code} with the primary stopped"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The process is still up.
    assert_eq!(get(addr, "/healthz").await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_with_a_line_per_client_connect_and_close() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tidemark.toml");
    let port = free_port();
    // No server is needed: the admin console answers without one.
    std::fs::write(
        &path,
        format!(
            "listen = \"127.0.0.1:{port}\"\nlog_format = \"json\"\nadmin_users = [\"postgres\"]\n\
             [[nodes]]\nname = \"p\"\nport = {}\n[[users]]\nname = \"postgres\"\nauth = \"trust\"\n\
             [[users]]\nname = \"app\"\npassword = \"in-clear\"\n",
            free_port()
        ),
    )
    .unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let served = Served::start(&path, &dir.path().join("stderr.log"));
    {
        let c = admin(port).await;
        c.simple_query("SHOW VERSION").await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let closed = loop {
        let log = served.log();
        let lines: Vec<serde_json::Value> = log
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect();
        let find = |msg: &str| {
            lines
                .iter()
                .find(|v| v["fields"]["message"] == msg)
                .cloned()
        };
        if let (Some(open), Some(closed)) = (find("client connected"), find("client disconnected"))
        {
            assert_eq!(open["level"], "INFO", "{open}");
            assert_eq!(open["fields"]["user"], "postgres", "{open}");
            assert_eq!(open["fields"]["database"], "tidemark", "{open}");
            break closed;
        }
        assert!(Instant::now() < deadline, "no connect/close lines:\n{log}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(closed["fields"]["user"], "postgres", "{closed}");
    assert!(
        closed["fields"]["client"]
            .as_str()
            .is_some_and(|a| a.starts_with("127.0.0.1:")),
        "{closed}"
    );
    assert!(closed["fields"]["duration_ms"].is_u64(), "{closed}");
    // The file holds a password and others can read it: a warning at startup.
    let log = served.log();
    assert!(
        log.lines()
            .any(|l| l.contains("\"WARN\"") && l.contains("readable by group or others")),
        "no permission warning:\n{log}"
    );
}

/// `tidemark dev` makes its own config: a `--config` given with it is refused with a clear
/// message, not silently ignored (before, the global flag was accepted and unused).
#[test]
fn dev_refuses_a_config_file_it_would_not_read() {
    let o = Command::new(BIN)
        .args(["dev", "--config", "/nonexistent/tidemark.toml"])
        .output()
        .expect("tidemark runs");
    assert!(!o.status.success(), "{}", text(&o));
    let t = text(&o);
    assert!(
        t.contains("does not read /nonexistent/tidemark.toml"),
        "{t}"
    );
}
