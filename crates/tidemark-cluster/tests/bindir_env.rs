//! PG_BINDIR handling; alone in its own test binary because it sets a process environment
//! variable.

use tidemark_cluster::{find_bindir, find_bindir_from, ClusterError};

#[test]
fn pg_bindir_pointing_to_empty_dir_is_a_clear_error() {
    let good = find_bindir_from(None).expect("PostgreSQL is installed on this machine");
    assert!(good.join("initdb").is_file());

    let empty = tempfile::tempdir().unwrap();
    std::env::set_var("PG_BINDIR", empty.path());
    let err = find_bindir().unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, ClusterError::BinariesNotFound { .. }),
        "{msg}"
    );
    assert!(msg.contains("apt-get install postgresql"), "{msg}");
    assert!(msg.contains("PG_BINDIR"), "{msg}");
    assert!(msg.contains(&empty.path().display().to_string()), "{msg}");
    assert!(msg.contains("initdb"), "{msg}");

    std::env::set_var("PG_BINDIR", &good);
    assert_eq!(find_bindir().unwrap(), good);
}
