//! Test support: a real local cluster (tidemark-cluster) with tidemark in front of it,
//! running in the test's own runtime.
#![allow(dead_code)]

pub mod dev;
pub mod raw;

use std::time::Duration;

use tidemark::config::Config;
use tidemark::listener::Proxy;
use tidemark_cluster::{Cluster, ClusterConfig, ReplicaConfig};
use tokio_postgres::{Client, NoTls, SimpleQueryMessage, SimpleQueryRow};

pub struct Env {
    pub proxy: Proxy,
    pub cluster: Cluster,
}

pub async fn start_cluster(cfg: ClusterConfig) -> Cluster {
    tokio::task::spawn_blocking(move || Cluster::start(cfg))
        .await
        .expect("cluster thread")
        .expect("cluster start")
}

pub async fn proxy_for(cluster: &Cluster, tweak: impl FnOnce(&mut Config)) -> Proxy {
    // RUST_LOG=tidemark=debug shows the proxy's logs in a failing test.
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
    let mut cfg = tidemark::dev::config_for(cluster, "127.0.0.1:0");
    tweak(&mut cfg);
    cfg.validate().expect("valid test config");
    let p = Proxy::start(cfg).await.expect("proxy start");
    assert!(
        p.wait_ready(Duration::from_secs(10)).await,
        "proxy never saw the cluster"
    );
    p
}

/// Primary + replicas with the given apply delays (None = undelayed).
pub async fn start(delays: &[Option<Duration>], tweak: impl FnOnce(&mut Config)) -> Env {
    let replicas = delays
        .iter()
        .map(|d| ReplicaConfig {
            apply_delay: *d,
            ..Default::default()
        })
        .collect();
    let cluster = start_cluster(ClusterConfig {
        replicas,
        ..Default::default()
    })
    .await;
    let proxy = proxy_for(&cluster, tweak).await;
    Env { proxy, cluster }
}

/// `proxy_for` with reads spread per statement (`routing.balance = "statement"`): the
/// stale-read controls rely on consecutive reads of one session alternating replicas.
pub async fn proxy_rr(cluster: &Cluster, tweak: impl FnOnce(&mut Config)) -> Proxy {
    proxy_for(cluster, |c| {
        c.routing.balance = tidemark::config::Balance::Statement;
        tweak(c)
    })
    .await
}

/// `start` with reads spread per statement (see [`proxy_rr`]).
pub async fn start_rr(delays: &[Option<Duration>], tweak: impl FnOnce(&mut Config)) -> Env {
    start(delays, |c| {
        c.routing.balance = tidemark::config::Balance::Statement;
        tweak(c)
    })
    .await
}

pub async fn connect(dsn: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(dsn, NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect {dsn}: {e}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

pub fn proxy_dsn_of(p: &Proxy, user: &str) -> String {
    format!(
        "host={} port={} user={user} dbname=postgres",
        p.addr.ip(),
        p.addr.port()
    )
}

impl Env {
    pub fn proxy_dsn(&self) -> String {
        proxy_dsn_of(&self.proxy, "postgres")
    }

    pub async fn client(&self) -> Client {
        connect(&self.proxy_dsn()).await
    }

    pub async fn node(&self, i: usize) -> Client {
        connect(&self.cluster.dsn(i)).await
    }
}

/// `pgbench -i -s 1` directly on the primary, then waits until every replica has replayed it.
pub fn pgbench_init(cluster: &Cluster) {
    let init = std::process::Command::new(cluster.bindir().join("pgbench"))
        .args(["-i", "-s", "1", "-q", "-h", "127.0.0.1", "-p"])
        .arg(cluster.port(0).to_string())
        .args(["-U", "postgres", "postgres"])
        .output()
        .expect("run pgbench -i");
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    wait_all_replayed(cluster);
}

/// Waits (blocking) until every replica has replayed what the primary has written so far.
pub fn wait_all_replayed(cluster: &Cluster) {
    let lsn = cluster.current_lsn(0).expect("primary LSN");
    for i in 1..cluster.node_count() {
        cluster
            .wait_replayed(i, &lsn, Duration::from_secs(20))
            .expect("replica catches up");
    }
}

/// The rows of a simple-query answer, every column as text.
pub fn rows(msgs: &[SimpleQueryMessage]) -> Vec<Vec<Option<String>>> {
    rows_by_name(msgs)
        .into_iter()
        .map(|r| (0..r.len()).map(|i| r.get(i).map(str::to_string)).collect())
        .collect()
}

/// The rows of a simple-query answer as they came, for lookups by column name.
pub fn rows_by_name(msgs: &[SimpleQueryMessage]) -> Vec<&SimpleQueryRow> {
    msgs.iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r),
            _ => None,
        })
        .collect()
}

/// Runs `sql` as a simple query; panics naming the statement if it fails.
pub async fn exec(c: &Client, sql: &str) {
    c.simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// First column of the first row of a simple-query answer, if any and not NULL.
fn first_value(msgs: &[SimpleQueryMessage]) -> Option<String> {
    rows_by_name(msgs)
        .first()?
        .try_get(0)
        .ok()?
        .map(str::to_string)
}

/// First column of the first row of a simple query.
pub async fn scalar(c: &Client, sql: &str) -> String {
    let msgs = c
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    first_value(&msgs).unwrap_or_else(|| panic!("{sql}: no value"))
}

/// Which node served a read through `c`: the port of the server that answered
/// `SELECT inet_server_port()` (compare with `Cluster::port`).
pub async fn served_by(c: &Client) -> Result<u16, tokio_postgres::Error> {
    let msgs = c.simple_query("SELECT inet_server_port()").await?;
    let port = first_value(&msgs).expect("inet_server_port() answers a port");
    Ok(port.parse().expect("a port number"))
}

/// Whether `c`'s reads reach the server on `port` within 5 s (one read every 20 ms). For a
/// session that wrote, a read may fall back to the primary while tidemark's view trails the
/// servers or the replica is not worth waiting for (`routing.wait`), so tests that need a
/// connection on a replica ask until they get one rather than once.
pub async fn reaches(c: &Client, port: u16) -> bool {
    for _ in 0..250 {
        if served_by(c).await.ok() == Some(port) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// Repeats `read` (a read-back: found, on a replica) every 20 ms until one is served by a
/// replica or 5 s pass; the tally of all of them.
pub async fn read_until_on_replica<F, Fut>(mut read: F) -> Tally
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = (bool, bool)>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut t = Tally::default();
    while t.on_replica == 0 && tokio::time::Instant::now() < deadline {
        t.add(read().await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    t
}

/// Runs `sql`, a query whose first row is `(count(*), pg_is_in_recovery())` for the row a
/// read-back looks for: (the row was found, a replica served it).
pub async fn found_where(c: &Client, sql: &str) -> (bool, bool) {
    let msgs = c
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    let r = rows(&msgs);
    let row = r.first().unwrap_or_else(|| panic!("{sql}: no row"));
    (
        row[0].as_deref() == Some("1"),
        row[1].as_deref() == Some("t"),
    )
}

/// Counts of one measured series of reads.
#[derive(Default, Debug, Clone, Copy)]
pub struct Tally {
    pub reads: u32,
    pub stale: u32,
    pub on_replica: u32,
}

impl Tally {
    pub fn add(&mut self, (found, replica): (bool, bool)) {
        self.reads += 1;
        if !found {
            self.stale += 1;
        }
        if replica {
            self.on_replica += 1;
        }
    }

    pub fn fallbacks(&self) -> u32 {
        self.reads - self.on_replica
    }

    pub fn show(&self, what: &str) {
        println!(
            "{what}: {} stale of {} reads; {} on replicas ({:.0} %), {} on the primary",
            self.stale,
            self.reads,
            self.on_replica,
            100.0 * self.on_replica as f64 / self.reads.max(1) as f64,
            self.fallbacks()
        );
    }
}

/// Lets `name` log in to tidemark like the superuser (trust): a role the test creates with
/// `PASSWORD 'pw'` (the nodes want md5 from roles other than `postgres`).
pub fn trust_user(c: &mut tidemark::config::Config, name: &str) {
    let mut u = c.users[0].clone();
    u.name = name.to_string();
    u.server_password = Some("pw".into());
    c.users.push(u);
}

/// Waits (up to 10 s) until tidemark's own view has every replica caught up with the primary
/// (healthy, in rotation, no time lag, replay position at the primary's): what routing sees,
/// which trails the servers by up to a monitor poll. Call after `wait_all_replayed` when a test
/// then expects reads on replicas.
pub async fn wait_view_caught_up(p: &Proxy) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let view = p.app.view.load_full();
        let primary_lsn = view
            .primary_id()
            .and_then(|id| view.node(id))
            .map(|n| n.replay_lsn);
        let caught_up = primary_lsn.is_some_and(|pl| {
            view.nodes
                .iter()
                .filter(|n| n.role == tidemark_core::Role::Replica)
                .all(|n| n.healthy && n.in_rotation && n.lag.is_zero() && n.replay_lsn >= pl)
        });
        if caught_up || tokio::time::Instant::now() > deadline {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
