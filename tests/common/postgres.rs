//! A real PostgreSQL server for tests: `VMFARM_TEST_POSTGRES` is the URL of a server on which a
//! test may create databases. scripts/test.sh starts one (scripts/test-postgres.sh) for the run.

use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A new, empty database on the test PostgreSQL server; returns its URL.
pub fn fresh_database() -> String {
    let base = std::env::var("VMFARM_TEST_POSTGRES").unwrap_or_else(|_| {
        panic!(
            "VMFARM_TEST_POSTGRES is not set: run the tests with scripts/test.sh, or start a server with \
             `eval $(bash scripts/test-postgres.sh start)`"
        )
    });
    // The clock too: a process id comes back in a later run against the same server.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let name = format!(
        "vmfarm_test_{}_{}_{nanos}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    );
    let status = Command::new("psql")
        .arg(&base)
        .args([
            "-v",
            "ON_ERROR_STOP=1",
            "-q",
            "-c",
            &format!("CREATE DATABASE {name}"),
        ])
        .status()
        .expect("psql must be installed: run scripts/install-deps.sh test");
    assert!(status.success(), "cannot create database {name} on {base}");
    let (prefix, _) = base.rsplit_once('/').expect("a postgres URL ends with /DB");
    format!("{prefix}/{name}")
}
