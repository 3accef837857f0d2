//! Issue 20, part 3: two tidemark instances share the key store and the causal floor through a
//! real Redis (`[shared] redis_url`). A write through one instance is seen by a read through the
//! other; with Redis killed mid-run no read is stale and nothing hangs; a restarted (empty)
//! Redis is initialized from the primary's position. Controls show the same workload stale
//! without the mechanism.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use tidemark_cluster::{Cluster, ClusterConfig, ReplicaConfig};
use tokio_postgres::Client;

const DELAY: Duration = Duration::from_millis(200);

/// A redis-server of its own, on a unix socket in a temporary directory.
struct Redis {
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl Redis {
    fn start() -> Redis {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut r = Redis { child: None, dir };
        r.restart();
        r
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("redis.sock")
    }

    fn url(&self) -> String {
        format!("redis+unix://{}", self.socket().display())
    }

    /// Starts (again) an empty redis-server on the same socket.
    fn restart(&mut self) {
        let _ = std::fs::remove_file(self.socket());
        let child = Command::new("redis-server")
            .args(["--port", "0", "--save", "", "--appendonly", "no"])
            .arg("--unixsocket")
            .arg(self.socket())
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (scripts/install-deps installs it)");
        self.child = Some(child);
        wait_socket(&self.socket());
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

fn wait_socket(p: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::os::unix::net::UnixStream::connect(p).is_err() {
        assert!(Instant::now() < deadline, "redis-server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
}

struct Two {
    cluster: Cluster,
    a: tidemark::listener::Proxy,
    b: tidemark::listener::Proxy,
}

async fn two_instances(redis: &Redis) -> Two {
    let cluster = start_cluster(ClusterConfig {
        replicas: vec![ReplicaConfig {
            apply_delay: Some(DELAY),
            ..Default::default()
        }],
        ..Default::default()
    })
    .await;
    let url = redis.url();
    let tweak = |c: &mut tidemark::config::Config| {
        c.shared.redis_url = Some(url.clone());
        c.shared.timeout = Duration::from_millis(50);
    };
    let a = proxy_rr(&cluster, tweak).await;
    let b = proxy_rr(&cluster, tweak).await;
    Two { cluster, a, b }
}

/// (row found, served by a replica).
async fn read_back(c: &Client, hint: &str, id: i64) -> (bool, bool) {
    let sql = format!("{hint}SELECT count(*), pg_is_in_recovery() FROM s WHERE id = {id}");
    found_where(c, &sql).await
}

/// Writes through instance A, reads the row back through instance B.
async fn rounds(w: &Client, r: &Client, ids: std::ops::Range<i64>, hint: &str) -> Tally {
    let mut t = Tally::default();
    for i in ids {
        exec(w, &format!("INSERT INTO s VALUES ({i}, 'x')")).await;
        t.add(read_back(r, hint, i).await);
    }
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_through_one_instance_is_seen_through_the_other() {
    let redis = Redis::start();
    let env = two_instances(&redis).await;
    let a = connect(&proxy_dsn_of(&env.a, "postgres")).await;
    let b = connect(&proxy_dsn_of(&env.b, "postgres")).await;
    exec(&a, "CREATE TABLE s (id bigint PRIMARY KEY, v text)").await;
    tokio::task::block_in_place(|| wait_all_replayed(&env.cluster));

    // causal: B's reads see every write A acknowledged.
    exec(&b, "SET tidemark.consistency = 'causal'").await;
    let t = rounds(&a, &b, 0..150, "").await;
    println!("causal across instances: {t:?}");
    assert_eq!(t.stale, 0, "causal reads through B must see A's writes");

    // A key: A writes under it, B reads under it (at `session`).
    exec(&a, "SET tidemark.key = 'user:42'").await;
    exec(&b, "SET tidemark.consistency = 'session'").await;
    let k = rounds(&a, &b, 150..300, "/* tidemark: key=user:42 */ ").await;
    println!("key across instances: {k:?}");
    assert_eq!(
        k.stale, 0,
        "keyed reads through B must see A's keyed writes"
    );

    // Control: without causal or the key, B reads stale rows from the delayed replica.
    let c = rounds(&a, &b, 300..400, "/* tidemark: key=user:7 */ ").await;
    println!("control: {c:?}");
    assert!(c.stale > c.reads / 4, "the control should be stale");

    // Control: an instance without [shared] only knows its own writes: causal reads through
    // it of A's writes are stale.
    let lone = proxy_rr(&env.cluster, |_| {}).await;
    let l = connect(&proxy_dsn_of(&lone, "postgres")).await;
    exec(&l, "SET tidemark.consistency = 'causal'").await;
    let lc = rounds(&a, &l, 400..500, "").await;
    println!("control, causal through an instance without [shared]: {lc:?}");
    assert!(lc.stale > lc.reads / 4, "the control should be stale");

    // Writes stop: once the replica has replayed them, B's causal reads go to it.
    tokio::task::block_in_place(|| wait_all_replayed(&env.cluster));
    exec(&b, "SET tidemark.consistency = 'causal'").await;
    let idle = read_until_on_replica(|| read_back(&b, "", 0)).await;
    assert!(
        idle.on_replica > 0,
        "causal reads should return to the replica"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_mid_run_gives_no_stale_read_and_no_hang() {
    let mut redis = Redis::start();
    let env = two_instances(&redis).await;
    let a = connect(&proxy_dsn_of(&env.a, "postgres")).await;
    let b = connect(&proxy_dsn_of(&env.b, "postgres")).await;
    exec(&a, "CREATE TABLE s (id bigint PRIMARY KEY, v text)").await;
    tokio::task::block_in_place(|| wait_all_replayed(&env.cluster));
    exec(&a, "SET tidemark.key = 'user:42'").await;
    exec(&b, "SET tidemark.consistency = 'causal'").await;

    let mut total = Tally::default();
    let mut slowest = Duration::ZERO;
    let mut while_down = Tally::default();
    for i in 0..450i64 {
        match i {
            150 => redis.kill(),
            300 => tokio::task::block_in_place(|| redis.restart()),
            _ => {}
        }
        let start = Instant::now();
        exec(&a, &format!("INSERT INTO s VALUES ({i}, 'x')")).await;
        // Alternate the causal level and the key.
        let hint = if i % 2 == 0 {
            ""
        } else {
            "/* tidemark: key=user:42, consistency=session */ "
        };
        let r = read_back(&b, hint, i).await;
        slowest = slowest.max(start.elapsed());
        total.add(r);
        if (150..300).contains(&i) {
            while_down.add(r);
        }
    }
    println!("redis killed at 150, restarted at 300: {total:?}; while down: {while_down:?}; slowest round {slowest:?}");
    assert_eq!(
        total.stale, 0,
        "no stale read with redis killed or restarted"
    );
    assert_eq!(
        while_down.on_replica, 0,
        "with redis down, keyed and causal reads go to the primary"
    );
    assert!(
        slowest < Duration::from_secs(1),
        "a write and a read took {slowest:?}: something waited past shared.timeout"
    );

    // The restarted store was initialized; once the replica catches up reads return to it.
    tokio::task::block_in_place(|| wait_all_replayed(&env.cluster));
    let idle = read_until_on_replica(|| read_back(&b, "", 0)).await;
    assert!(
        idle.on_replica > 0,
        "reads should return to the replica after redis is back"
    );
}
