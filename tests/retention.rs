//! Retention's crash safety with a real process: `vmfarm server gc` killed with SIGKILL at
//! several points of a sweep over hundreds of expired jobs loses nothing that should stay, and
//! the next run leaves no row pointing at a missing file and no file that no row points at.

#[macro_use]
mod common;

use common::{Backend, TestServer};
use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;
use vmfarm_server::db::{Db, Query, SqliteSync, now_ms};

const OLD: i64 = 300;
const KEPT: i64 = 30;
const FILES: i64 = 4;

/// Jobs 1..=OLD ended two hours ago, the next KEPT a minute ago, each with FILES artifacts.
async fn seed(db: &Db, artifacts: &Path) {
    let now = now_ms();
    db.write(move |tx| {
        Box::pin(async move {
            for id in 1..=OLD + KEPT {
                let ended = if id <= OLD {
                    now - 2 * 3600 * 1000
                } else {
                    now - 60_000
                };
                tx.execute(
                    "INSERT INTO job_groups (id, created_at, owner) VALUES ($1, 1, 'admin')",
                    &[id.into()],
                )
                .await?;
                tx.execute(
                    "INSERT INTO jobs (id, group_id, image, state, priority, manifest, tags, \
                     timeout_ms, created_at, finished_at) \
                     VALUES ($1, $1, 'a', 'succeeded', 0, 'image = \"a\"', '[]', 60000, 1, $2)",
                    &[id.into(), ended.into()],
                )
                .await?;
                for f in 0..FILES {
                    tx.execute(
                        "INSERT INTO artifacts (job_id, name, size, sha256, created_at, attempt) \
                         VALUES ($1, $2, 5, 'x', 1, 1)",
                        &[id.into(), format!("f{f}").as_str().into()],
                    )
                    .await?;
                }
            }
            Ok::<_, vmfarm_server::db::DbFailure>(())
        })
    })
    .await
    .unwrap();
    for id in 1..=OLD + KEPT {
        let dir = artifacts.join(format!("{id}/1"));
        std::fs::create_dir_all(&dir).unwrap();
        for f in 0..FILES {
            std::fs::write(dir.join(format!("f{f}")), b"bytes").unwrap();
        }
    }
}

/// The ids of the jobs whose artifact rows are there, and how many jobs are purged.
async fn rows(db: &Db) -> (HashSet<(i64, String)>, i64) {
    let rows = db
        .read()
        .fetch_all("SELECT job_id, name FROM artifacts", &[])
        .await
        .unwrap();
    let set = rows
        .iter()
        .map(|r| (r.int(0).unwrap(), r.text(1).unwrap()))
        .collect();
    let purged = db
        .read()
        .fetch_optional("SELECT COUNT(*) FROM jobs WHERE purged = 1", &[])
        .await
        .unwrap()
        .unwrap()
        .int(0)
        .unwrap();
    (set, purged)
}

/// What must hold whenever gc stops: the kept jobs have every row and file; every row of a job
/// not marked expired has its file.
async fn assert_nothing_that_stays_is_lost(db: &Db, artifacts: &Path) {
    let (set, _) = rows(db).await;
    for id in OLD + 1..=OLD + KEPT {
        for f in 0..FILES {
            assert!(
                set.contains(&(id, format!("f{f}"))),
                "kept job {id} lost a row"
            );
            assert!(
                artifacts.join(format!("{id}/1/f{f}")).exists(),
                "kept job {id} lost a file"
            );
        }
    }
    let unexpired = db
        .read()
        .fetch_all(
            "SELECT a.job_id, a.name FROM artifacts a JOIN jobs j ON j.id = a.job_id \
             WHERE j.expired_at IS NULL",
            &[],
        )
        .await
        .unwrap();
    for row in unexpired {
        let (id, name) = (row.int(0).unwrap(), row.text(1).unwrap());
        assert!(
            artifacts.join(format!("{id}/1/{name}")).exists(),
            "{id}/{name}: row without file"
        );
    }
}

fn gc(config: &Path) -> std::process::Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_vmfarm"))
        .args(["server", "--config"])
        .arg(config)
        .arg("gc")
        .env("VMFARM_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn gc_killed_midway_loses_nothing_and_the_next_run_leaves_nothing_orphaned() {
    let mut server = TestServer::start_with(
        Backend::Sqlite,
        "[retention]\nkeep_for = \"1h\"\nsweep_every = \"1d\"\n",
    );
    server.kill9(); // its schema is made; gc runs alone on its data
    let config = server.data_dir().join("server.toml");
    let artifacts = server.data_dir().join("artifacts");
    let db = Db::open(&server.database_url, SqliteSync::default())
        .await
        .unwrap();
    seed(&db, &artifacts).await;

    let dry = std::process::Command::new(env!("CARGO_BIN_EXE_vmfarm"))
        .args(["server", "--config"])
        .arg(&config)
        .args(["gc", "--dry-run"])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&dry.stdout);
    assert!(
        said.contains("job 1 would expire: ended more than 1h ago (20B of artifacts)"),
        "{said}"
    );
    assert!(
        said.ends_with(&format!(
            "{OLD} jobs would expire, 6000B of artifacts (dry run: nothing deleted)\n"
        )),
        "{said}"
    );
    assert_eq!(rows(&db).await, (rows(&db).await.0, 0));
    assert_eq!(
        rows(&db).await.0.len() as i64,
        (OLD + KEPT) * FILES,
        "a dry run deletes nothing"
    );

    let mut stopped_midway = 0;
    for delay_ms in [40, 120, 250, 400] {
        let mut child = gc(&config);
        std::thread::sleep(Duration::from_millis(delay_ms));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        assert_nothing_that_stays_is_lost(&db, &artifacts).await;
        let (_, purged) = rows(&db).await;
        if purged > 0 && purged < OLD {
            stopped_midway += 1;
        }
    }
    assert!(
        stopped_midway > 0,
        "no kill landed in the middle of a sweep"
    );

    let out = gc(&config).wait_with_output().unwrap();
    assert!(out.status.success());
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("purged"), "{said}");
    let (set, purged) = rows(&db).await;
    assert_eq!(purged, OLD, "every expired job is purged: {said}");
    assert_eq!(
        set.len() as i64,
        KEPT * FILES,
        "only the kept jobs' rows are left"
    );
    assert_nothing_that_stays_is_lost(&db, &artifacts).await;
    let mut files = 0;
    for entry in std::fs::read_dir(&artifacts).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        if let Ok(id) = name.parse::<i64>() {
            assert!(id > OLD, "folder of expired job {id} is left");
            for f in std::fs::read_dir(artifacts.join(&name).join("1")).unwrap() {
                let f = f.unwrap().file_name().to_string_lossy().into_owned();
                assert!(
                    set.contains(&(id, f.clone())),
                    "{id}/{f}: file without a row"
                );
                files += 1;
            }
        }
    }
    assert_eq!(files, KEPT * FILES);
}
