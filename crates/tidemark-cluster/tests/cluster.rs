//! End-to-end tests of the local cluster harness against real PostgreSQL: replication, replay
//! pause, apply delay, crash and restart, promotion, teardown, and bad input.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use tidemark_cluster::{Cluster, ClusterConfig, ClusterError, ReplicaConfig, MARKER_FILE};

const WAIT: Duration = Duration::from_secs(10);

fn boot(cfg: ClusterConfig) -> Cluster {
    let t = Instant::now();
    let c = Cluster::start(cfg).expect("cluster starts");
    eprintln!(
        "booted {} nodes in {:?} at {}",
        c.node_count(),
        t.elapsed(),
        c.base_dir().display()
    );
    c
}

fn count(c: &Cluster, i: usize, table: &str, v: i32) -> String {
    c.psql(i, &format!("SELECT count(*) FROM {table} WHERE v = {v}"))
        .unwrap()
}

/// Whether a process exists and is not a zombie, judged from /proc.
fn process_exists(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat
                .rsplit(')')
                .next()
                .unwrap_or("")
                .split_whitespace()
                .next();
            !matches!(state, Some("Z") | Some("X"))
        }
        Err(_) => false,
    }
}

fn children(pid: i32) -> Vec<i32> {
    let mut out = vec![];
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) {
            let ppid = stat.rsplit(')').next().unwrap().split_whitespace().nth(1);
            if ppid == Some(&pid.to_string()) {
                out.push(p);
            }
        }
    }
    out
}

fn cmdline_mentions(needle: &str) -> Vec<i32> {
    let mut out = vec![];
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if let Ok(raw) = std::fs::read(format!("/proc/{p}/cmdline")) {
            if String::from_utf8_lossy(&raw).contains(needle) && process_exists(p) {
                out.push(p);
            }
        }
    }
    out
}

#[test]
fn replicates_to_both_replicas() {
    let c = boot(ClusterConfig::default());
    assert_eq!(c.node_count(), 3);
    assert_eq!(c.host(), "127.0.0.1");
    assert_eq!(c.superuser(), "postgres");
    assert_eq!(
        c.dsn(1),
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            c.port(1)
        )
    );
    assert_eq!(
        c.url(2),
        format!("postgres://postgres@127.0.0.1:{}/postgres", c.port(2))
    );
    assert!(c.data_dir(1).starts_with(c.base_dir()));
    assert!(c.base_dir().join(MARKER_FILE).is_file());

    assert_eq!(c.psql(0, "SELECT pg_is_in_recovery()").unwrap(), "f");
    for i in 1..=2 {
        assert_eq!(c.psql(i, "SELECT pg_is_in_recovery()").unwrap(), "t");
        assert_eq!(
            c.psql(i, "SELECT status FROM pg_stat_wal_receiver")
                .unwrap(),
            "streaming"
        );
    }
    c.psql(0, "CREATE TABLE t (v int); INSERT INTO t VALUES (42)")
        .unwrap();
    let lsn = c.current_lsn(0).unwrap();
    for i in 1..=2 {
        c.wait_replayed(i, &lsn, WAIT).unwrap();
        assert_eq!(c.psql(i, "SELECT v FROM t").unwrap(), "42");
        // A replica refuses writes.
        assert!(matches!(
            c.psql(i, "INSERT INTO t VALUES (1)"),
            Err(ClusterError::Sql { .. })
        ));
    }
    // Other users need a password (md5 rule) — the superuser is trusted.
    c.psql(0, "CREATE ROLE app LOGIN PASSWORD 'secret'")
        .unwrap();
    let hba = std::fs::read_to_string(c.data_dir(0).join("pg_hba.conf")).unwrap();
    assert!(hba.contains("127.0.0.1/32  md5"));
    // Replica names are visible on the primary.
    let names = c
        .psql(0, "SELECT string_agg(application_name, ',' ORDER BY application_name) FROM pg_stat_replication")
        .unwrap();
    assert_eq!(names, "replica_1,replica_2");
}

#[test]
fn paused_replay_hides_new_rows_until_resumed() {
    let c = boot(ClusterConfig::default());
    c.psql(0, "CREATE TABLE p (v int)").unwrap();
    let lsn = c.current_lsn(0).unwrap();
    c.wait_replayed(1, &lsn, WAIT).unwrap();
    c.wait_replayed(2, &lsn, WAIT).unwrap();

    c.pause_replay(1).unwrap();
    c.psql(0, "INSERT INTO p VALUES (7)").unwrap();
    let lsn = c.current_lsn(0).unwrap();
    c.wait_replayed(2, &lsn, WAIT).unwrap();
    assert_eq!(count(&c, 2, "p", 7), "1");
    // Paused replica: give it ample time; the row must stay invisible.
    assert!(matches!(
        c.wait_replayed(1, &lsn, Duration::from_millis(300)),
        Err(ClusterError::Timeout { .. })
    ));
    assert_eq!(count(&c, 1, "p", 7), "0");

    c.resume_replay(1).unwrap();
    c.wait_replayed(1, &lsn, WAIT).unwrap();
    assert_eq!(count(&c, 1, "p", 7), "1");
}

#[test]
fn apply_delay_holds_back_rows() {
    let mut cfg = ClusterConfig::with_replicas(2);
    cfg.replicas[1] = ReplicaConfig {
        apply_delay: Some(Duration::from_millis(400)),
        hot_standby_feedback: true,
        synchronous: false,
    };
    let c = boot(cfg);
    assert_eq!(c.psql(2, "SHOW recovery_min_apply_delay").unwrap(), "400ms");
    assert_eq!(c.psql(2, "SHOW hot_standby_feedback").unwrap(), "on");

    c.set_apply_delay(1, Duration::from_millis(800)).unwrap();
    assert_eq!(c.psql(1, "SHOW recovery_min_apply_delay").unwrap(), "800ms");
    c.psql(0, "CREATE TABLE d (v int)").unwrap();
    let lsn = c.current_lsn(0).unwrap();
    c.wait_replayed(1, &lsn, WAIT).unwrap();
    c.wait_replayed(2, &lsn, WAIT).unwrap();

    let t = Instant::now();
    c.psql(0, "INSERT INTO d VALUES (1)").unwrap();
    let lsn = c.current_lsn(0).unwrap();
    assert_eq!(
        count(&c, 1, "d", 1),
        "0",
        "row visible before the apply delay"
    );
    assert_eq!(
        count(&c, 2, "d", 1),
        "0",
        "row visible before the apply delay"
    );
    c.wait_replayed(2, &lsn, WAIT).unwrap();
    let d2 = t.elapsed();
    c.wait_replayed(1, &lsn, WAIT).unwrap();
    let d1 = t.elapsed();
    eprintln!("replica 2 (400ms) applied after {d2:?}, replica 1 (800ms) after {d1:?}");
    assert_eq!(count(&c, 1, "d", 1), "1");
    assert_eq!(count(&c, 2, "d", 1), "1");
    assert!(d2 >= Duration::from_millis(350), "{d2:?}");
    assert!(d1 >= Duration::from_millis(750), "{d1:?}");
    assert!(d1 < Duration::from_secs(5), "{d1:?}");

    // Back to no delay: rows show up promptly.
    c.set_apply_delay(1, Duration::ZERO).unwrap();
    let t = Instant::now();
    c.psql(0, "INSERT INTO d VALUES (2)").unwrap();
    let lsn = c.current_lsn(0).unwrap();
    c.wait_replayed(1, &lsn, WAIT).unwrap();
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );
}

#[test]
fn killed_replica_restarts_and_catches_up() {
    let mut c = boot(ClusterConfig::default());
    let pid = c.postmaster_pid(2).expect("running");
    let kids = children(pid);
    assert!(!kids.is_empty());
    let t = Instant::now();
    c.kill(2).unwrap();
    eprintln!("kill took {:?}", t.elapsed());
    assert!(!c.is_running(2));
    assert!(!process_exists(pid), "postmaster {pid} survived kill");
    for k in kids {
        assert!(!process_exists(k), "child {k} survived kill");
    }
    assert!(c.psql(2, "SELECT 1").is_err());

    c.psql(0, "CREATE TABLE k (v int); INSERT INTO k VALUES (3)")
        .unwrap();
    let lsn = c.current_lsn(0).unwrap();
    if let Err(e) = c.start_node(2) {
        panic!("{e}\n{}", std::fs::read_to_string(c.log_path(2)).unwrap());
    }
    assert!(c.is_running(2));
    assert_ne!(c.postmaster_pid(2), Some(pid));
    c.wait_replayed(2, &lsn, WAIT).unwrap();
    c.wait_streaming(2, WAIT).unwrap();
    assert_eq!(count(&c, 2, "k", 3), "1");

    // Clean stop and start too.
    c.stop(1).unwrap();
    assert!(!c.is_running(1));
    c.start_node(1).unwrap();
    c.wait_streaming(1, WAIT).unwrap();
    assert_eq!(count(&c, 1, "k", 3), "1");
}

#[test]
fn promoted_replica_accepts_writes() {
    let c = boot(ClusterConfig::with_replicas(1));
    assert_eq!(c.node_count(), 2);
    let timeline = |i: usize| -> u32 {
        c.psql(i, "SELECT timeline_id FROM pg_control_checkpoint()")
            .unwrap()
            .parse()
            .unwrap()
    };
    let before = timeline(1);
    let t = Instant::now();
    c.promote(1).unwrap();
    eprintln!("promotion took {:?}", t.elapsed());
    assert_eq!(c.psql(1, "SELECT pg_is_in_recovery()").unwrap(), "f");
    // Promotion starts a new timeline (the end-of-recovery checkpoint records it).
    c.psql(1, "CHECKPOINT").unwrap();
    assert_eq!(
        timeline(1),
        before + 1,
        "a promoted replica is on a new timeline"
    );
    c.psql(1, "CREATE TABLE w (v int); INSERT INTO w VALUES (9)")
        .unwrap();
    assert_eq!(count(&c, 1, "w", 9), "1");
    // current_lsn now reports the insert position of the new primary.
    let lsn = c.current_lsn(1).unwrap();
    c.wait_replayed(1, &lsn, WAIT).unwrap();
}

#[test]
fn rejoin_killed_primary_as_replica_with_pg_rewind() {
    let mut c = boot(ClusterConfig::with_replicas(1));
    c.psql(0, "CREATE TABLE r (v int); INSERT INTO r VALUES (1)")
        .unwrap();
    let lsn = c.current_lsn(0).unwrap();
    c.wait_replayed(1, &lsn, WAIT).unwrap();
    // A write the replica never sees: the old primary diverges before it dies.
    c.stop(1).unwrap();
    c.psql(0, "INSERT INTO r VALUES (99)").unwrap();
    c.kill(0).unwrap();
    c.start_node(1).unwrap();
    c.promote(1).unwrap();
    c.psql(1, "INSERT INTO r VALUES (2)").unwrap();

    let t = Instant::now();
    c.rejoin_as_replica(0, 1).unwrap();
    eprintln!("rejoin took {:?}", t.elapsed());
    assert!(c.is_running(0));
    assert_eq!(c.psql(0, "SELECT pg_is_in_recovery()").unwrap(), "t");
    assert_eq!(
        c.psql(
            1,
            "SELECT state FROM pg_stat_replication WHERE application_name = 'primary'"
        )
        .unwrap(),
        "streaming"
    );
    assert_eq!(
        c.psql(
            1,
            "SELECT active FROM pg_replication_slots WHERE slot_name = 'primary'"
        )
        .unwrap(),
        "t"
    );

    // Rows written on the new primary after the promotion reach the rejoined node.
    let lsn = c.current_lsn(1).unwrap();
    c.wait_replayed(0, &lsn, WAIT).unwrap();
    assert_eq!(count(&c, 0, "r", 1), "1");
    assert_eq!(count(&c, 0, "r", 2), "1");
    assert_eq!(count(&c, 0, "r", 99), "0", "the diverged write was rewound");
    c.psql(1, "INSERT INTO r VALUES (3)").unwrap();
    let lsn = c.current_lsn(1).unwrap();
    c.wait_replayed(0, &lsn, WAIT).unwrap();
    assert_eq!(count(&c, 0, "r", 3), "1");
    // current_lsn on the rejoined node is its replay position.
    let replayed = c.current_lsn(0).unwrap();
    assert_eq!(
        c.psql(
            0,
            &format!("SELECT pg_last_wal_replay_lsn() >= '{replayed}'::pg_lsn")
        )
        .unwrap(),
        "t"
    );
    assert!(
        c.psql(0, "INSERT INTO r VALUES (4)").is_err(),
        "a replica refuses writes"
    );
}

#[test]
fn synchronous_replica_is_named_on_primary() {
    let mut cfg = ClusterConfig::with_replicas(1);
    cfg.replicas[0].synchronous = true;
    cfg.synchronous_commit = Some("remote_apply".into());
    let c = boot(cfg);
    assert_eq!(
        c.psql(0, "SHOW synchronous_standby_names").unwrap(),
        "FIRST 1 (replica_1)"
    );
    assert_eq!(
        c.psql(0, "SELECT sync_state FROM pg_stat_replication")
            .unwrap(),
        "sync"
    );
    // remote_apply: visible on the replica as soon as the commit returns.
    c.psql(0, "CREATE TABLE s (v int); INSERT INTO s VALUES (5)")
        .unwrap();
    assert_eq!(count(&c, 1, "s", 5), "1");
}

struct Snapshot {
    pids: Vec<i32>,
    base: PathBuf,
}

fn snapshot(c: &Cluster) -> Snapshot {
    let mut pids = vec![];
    for i in 0..c.node_count() {
        let text = std::fs::read_to_string(c.data_dir(i).join("postmaster.pid")).unwrap();
        let pid: i32 = text.lines().next().unwrap().trim().parse().unwrap();
        assert!(process_exists(pid));
        pids.push(pid);
        pids.extend(children(pid));
    }
    let base = c.base_dir().to_path_buf();
    assert!(!cmdline_mentions(&base.to_string_lossy()).is_empty());
    Snapshot { pids, base }
}

fn assert_nothing_left(s: &Snapshot) {
    for &pid in &s.pids {
        assert!(!process_exists(pid), "process {pid} outlived the cluster");
    }
    let left = cmdline_mentions(&s.base.to_string_lossy());
    assert!(
        left.is_empty(),
        "processes still mention {}: {left:?}",
        s.base.display()
    );
    assert!(!s.base.exists(), "{} not removed", s.base.display());
}

#[test]
fn drop_leaves_nothing_behind() {
    let c = boot(ClusterConfig::with_replicas(1));
    let s = snapshot(&c);
    let t = Instant::now();
    drop(c);
    eprintln!("drop took {:?}", t.elapsed());
    assert_nothing_left(&s);
}

#[test]
fn drop_during_panic_leaves_nothing_behind() {
    let mut seen: Option<Snapshot> = None;
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let c = boot(ClusterConfig::with_replicas(1));
        seen = Some(snapshot(&c));
        panic!("test body fails while holding the cluster");
    }));
    assert!(result.is_err());
    assert_nothing_left(seen.as_ref().unwrap());
}

#[test]
fn refuses_foreign_non_empty_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("precious.txt"), "do not delete").unwrap();
    let mut cfg = ClusterConfig::with_replicas(0);
    cfg.data_dir = Some(dir.path().to_path_buf());
    let err = Cluster::start(cfg).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, ClusterError::DataDirNotOurs { .. }), "{msg}");
    assert!(msg.contains(&dir.path().display().to_string()), "{msg}");
    assert!(msg.contains("not empty"), "{msg}");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("precious.txt")).unwrap(),
        "do not delete"
    );
}

#[test]
fn kept_data_dir_is_reused() {
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("cluster");
    let mut cfg = ClusterConfig::with_replicas(0);
    cfg.data_dir = Some(dir.clone());
    cfg.keep = true;
    let c = boot(cfg.clone());
    c.psql(0, "CREATE TABLE kept (v int)").unwrap();
    let pid = c.postmaster_pid(0).unwrap();
    drop(c);
    assert!(!process_exists(pid));
    assert!(dir.join(MARKER_FILE).is_file());
    assert!(dir.join("node0").join("PG_VERSION").is_file());

    // A second start over our own kept directory wipes and recreates it.
    cfg.keep = false;
    let c = boot(cfg);
    assert_eq!(
        c.psql(0, "SELECT count(*) FROM pg_class WHERE relname = 'kept'")
            .unwrap(),
        "0"
    );
    drop(c);
    assert!(!dir.exists());
}
