//! Retention: the logs and artifacts of jobs that ended long ago (or that the artifact store's
//! size cap pushes out) are deleted; the jobs themselves stay in the history, marked expired.
//!
//! A sweep is crash-safe by its order. It marks the chosen jobs expired (`expired_at`: from then
//! on the API shows none of their artifacts), deletes their files, then their artifact and log
//! rows, then marks them purged. A sweep killed anywhere is finished by the next one, which also
//! deletes any file that no row points at in the folder of a job that has ended (uploads only
//! land under live leases, so nothing in flight is touched).

use crate::config::Retention;
use crate::db::{Db, DbFailure, Query, now_ms};
use crate::store::{ArtifactStore, Place};
use std::collections::{HashMap, HashSet};
use vmfarm_proto::units::{ByteSize, format_duration};

#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    #[error("database error")]
    Db(#[from] DbFailure),
    #[error("the artifact store: {0}")]
    Store(#[from] crate::store::StoreError),
}

/// A job whose logs and artifacts are to go, and why.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Expiry {
    pub job: i64,
    pub artifact_bytes: u64,
    pub reason: String,
}

/// What a sweep would do now: the jobs to expire, oldest end first.
pub async fn plan(db: &Db, retention: &Retention, now: i64) -> Result<Vec<Expiry>, DbFailure> {
    if !retention.is_set() {
        return Ok(Vec::new());
    }
    let kept = kept_by_schedule(db, retention.keep_successful_per_schedule).await?;
    // Every ended job that still has its logs and artifacts, oldest end first, with its bytes.
    let rows = db
        .read()
        .fetch_all(
            "SELECT j.id, j.finished_at, CAST(COALESCE(SUM(a.size), 0) AS BIGINT) FROM jobs j \
             LEFT JOIN artifacts a ON a.job_id = j.id \
             WHERE j.expired_at IS NULL AND j.finished_at IS NOT NULL \
             GROUP BY j.id, j.finished_at ORDER BY j.finished_at, j.id",
            &[],
        )
        .await?;
    let mut ended = Vec::with_capacity(rows.len());
    let mut total: u64 = 0;
    for row in rows {
        let bytes = u64::try_from(row.int(2)?).unwrap_or(0);
        total += bytes;
        ended.push((row.int(0)?, row.int(1)?, bytes));
    }
    let mut out = Vec::new();
    for &(job, finished_at, bytes) in &ended {
        if kept.contains(&job) {
            continue;
        }
        let reason = match (retention.keep_for, retention.max_artifact_store) {
            (Some(keep), _) if now - finished_at > millis(keep.0) => {
                format!("ended more than {} ago", format_duration(keep.0))
            }
            (_, Some(cap)) if total > cap.0 && bytes > 0 => {
                format!("the artifact store is over {}", ByteSize(cap.0))
            }
            _ => continue,
        };
        total -= bytes;
        out.push(Expiry {
            job,
            artifact_bytes: bytes,
            reason,
        });
    }
    Ok(out)
}

fn millis(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// The newest `n` successful jobs of each schedule.
async fn kept_by_schedule(db: &Db, n: u32) -> Result<HashSet<i64>, DbFailure> {
    if n == 0 {
        return Ok(HashSet::new());
    }
    let rows = db
        .read()
        .fetch_all(
            "SELECT j.id, g.schedule FROM jobs j JOIN job_groups g ON g.id = j.group_id \
             WHERE g.schedule IS NOT NULL AND j.state = 'succeeded' ORDER BY j.id DESC",
            &[],
        )
        .await?;
    let mut per_schedule: HashMap<String, u32> = HashMap::new();
    let mut kept = HashSet::new();
    for row in rows {
        let count = per_schedule.entry(row.text(1)?).or_default();
        if *count < n {
            *count += 1;
            kept.insert(row.int(0)?);
        }
    }
    Ok(kept)
}

/// What a sweep did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Swept {
    pub expired: usize,
    pub purged: usize,
    pub orphans: usize,
}

/// One sweep: expires the jobs `chosen` (by [`plan`]), purges every expired job not yet purged
/// (these and any a killed sweep left), and removes files no row points at.
pub async fn sweep(
    db: &Db,
    store: &ArtifactStore,
    chosen: &[Expiry],
    now: i64,
) -> Result<Swept, SweepError> {
    let ids: Vec<i64> = chosen.iter().map(|e| e.job).collect();
    db.write(move |tx| {
        Box::pin(async move {
            for id in &ids {
                tx.execute(
                    "UPDATE jobs SET expired_at = $1 WHERE id = $2 AND expired_at IS NULL",
                    &[now.into(), (*id).into()],
                )
                .await?;
            }
            Ok::<_, DbFailure>(())
        })
    })
    .await?;
    let pending = db
        .read()
        .fetch_all(
            "SELECT id FROM jobs WHERE purged = 0 AND expired_at IS NOT NULL ORDER BY id",
            &[],
        )
        .await?;
    let mut purged = 0;
    for row in pending {
        let job = row.int(0)?;
        store.remove_job(job).await?;
        db.write(move |tx| {
            Box::pin(async move {
                let id = [job.into()];
                tx.execute("DELETE FROM artifacts WHERE job_id = $1", &id)
                    .await?;
                tx.execute("DELETE FROM log_chunks WHERE job_id = $1", &id)
                    .await?;
                tx.execute("UPDATE jobs SET purged = 1 WHERE id = $1", &id)
                    .await
            })
        })
        .await?;
        purged += 1;
    }
    let orphans = remove_orphans(db, store).await?;
    Ok(Swept {
        expired: chosen.len(),
        purged,
        orphans,
    })
}

/// Removes the files that no row points at, in the folders of jobs that have ended (or that
/// have no row, or are purged). Returns how many files went.
async fn remove_orphans(db: &Db, store: &ArtifactStore) -> Result<usize, SweepError> {
    let mut removed = 0;
    for job in store.job_ids().await? {
        let row = db
            .read()
            .fetch_optional(
                "SELECT finished_at, purged FROM jobs WHERE id = $1",
                &[job.into()],
            )
            .await?;
        match row {
            Some(row) if row.int(1)? == 0 => {
                if row.opt_int(0)?.is_none() {
                    continue; // not ended: its uploads may be in flight
                }
                let rows = db
                    .read()
                    .fetch_all(
                        "SELECT name, attempt FROM artifacts WHERE job_id = $1",
                        &[job.into()],
                    )
                    .await?;
                let mut known = HashSet::new();
                for row in rows {
                    known.insert(Place {
                        job,
                        attempt: row.opt_int(1)?,
                        name: row.text(0)?,
                    });
                }
                removed += store.keep_only(job, &known).await?;
            }
            _ => removed += store.remove_job(job).await?,
        }
    }
    Ok(removed)
}

/// Sweeps every `sweep_every`, for as long as the server runs, when retention is configured
/// (without it nothing expires, and what a crash left is for `vmfarm server gc`).
pub async fn run(db: Db, store: ArtifactStore, retention: Retention) {
    if !retention.is_set() {
        return;
    }
    loop {
        let now = now_ms();
        let swept = match plan(&db, &retention, now).await {
            Ok(chosen) => sweep(&db, &store, &chosen, now).await,
            Err(e) => Err(e.into()),
        };
        match swept {
            Ok(swept) if swept != Swept::default() => tracing::info!(
                expired = swept.expired,
                purged = swept.purged,
                orphans = swept.orphans,
                "retention sweep"
            ),
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "retention sweep failed; trying again later"),
        }
        tokio::time::sleep(retention.sweep_every.0).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::access::Submitter;
    use crate::db::Query;
    use crate::test_utils::{ADMIN, Database, TestApp, on_both_databases};
    use vmfarm_proto::JobState;
    use vmfarm_proto::units::HumanDuration;

    on_both_databases!(
        test_expired_logs_and_artifacts_go_and_the_job_stays,
        test_the_size_cap_expires_the_jobs_that_ended_first,
        test_a_sweep_stopped_at_any_step_is_finished_by_the_next,
    );

    const HOUR: i64 = 3600 * 1000;

    /// Runs a job of `schedule` (if any) to `state` with artifact `out.txt` of `bytes` bytes and
    /// a log line, and makes it look `ended_ago` ms old; its id.
    async fn ended_job(
        app: &TestApp,
        schedule: Option<&str>,
        state: JobState,
        bytes: usize,
        ended_ago: i64,
    ) -> i64 {
        let manifest = "image = \"a\"\n[[tasks]]\nname = \"t\"\nscript = \"true\"\n";
        let admin = Submitter::uncapped("admin");
        let submitted = crate::jobs::submit(&app.state, manifest, schedule, &admin)
            .await
            .unwrap();
        let id: i64 = submitted.jobs[0].id.parse().unwrap();
        let lease = app.lease("w0", "a").await;
        app.start("w0", &lease).await;
        let log = serde_json::json!({"seq": 1, "chunks": [{"stream": "task", "task": "t", "ts_ms": 1, "data": "hello\n"}]});
        let logged = app.lease_post("w0", &lease, "log", &log).await;
        assert_eq!(logged.body["stored"], true, "{:?}", logged.body);
        if bytes > 0 {
            app.upload("w0", &lease, "out.txt", &vec![7u8; bytes]).await;
        }
        app.move_job("w0", &lease, state).await;
        app.state
            .db
            .execute(
                "UPDATE jobs SET finished_at = $1 WHERE id = $2",
                &[(now_ms() - ended_ago).into(), id.into()],
            )
            .await
            .unwrap();
        id
    }

    /// A sweep now, of what the plan for `retention` chooses.
    async fn sweep_now(app: &TestApp, retention: &Retention) -> Swept {
        let now = now_ms();
        let chosen = plan(&app.state.db, retention, now).await.unwrap();
        sweep(&app.state.db, &app.state.store, &chosen, now)
            .await
            .unwrap()
    }

    fn keep(hours: u64) -> Option<HumanDuration> {
        Some(HumanDuration(std::time::Duration::from_secs(hours * 3600)))
    }

    async fn artifact_count(app: &TestApp, job: i64) -> usize {
        app.get(&format!("/api/jobs/{job}/artifacts"), ADMIN)
            .await
            .body
            .as_array()
            .map_or(0, Vec::len)
    }

    async fn test_expired_logs_and_artifacts_go_and_the_job_stays(db: Database) {
        let app = TestApp::new(db).await;
        let old = ended_job(&app, None, JobState::Failed, 10, 2 * HOUR).await;
        let recent = ended_job(&app, None, JobState::Succeeded, 10, HOUR / 6).await;
        let nightly_old = ended_job(&app, Some("nightly"), JobState::Succeeded, 10, 4 * HOUR).await;
        let nightly_new = ended_job(&app, Some("nightly"), JobState::Succeeded, 10, 3 * HOUR).await;
        let retention = Retention {
            keep_for: keep(1),
            keep_successful_per_schedule: 1,
            ..Retention::default()
        };
        let planned = plan(&app.state.db, &retention, now_ms()).await.unwrap();
        let jobs: Vec<(i64, &str)> = planned.iter().map(|e| (e.job, e.reason.as_str())).collect();
        assert_eq!(
            jobs,
            [
                (nightly_old, "ended more than 1h ago"),
                (old, "ended more than 1h ago")
            ],
            "oldest end first; the newest successful run of the schedule is kept"
        );
        assert!(
            app.log(old).await.contains("hello"),
            "a plan deletes nothing"
        );

        let swept = sweep_now(&app, &retention).await;
        assert_eq!((swept.expired, swept.purged, swept.orphans), (2, 2, 0));
        for gone in [old, nightly_old] {
            let job = app.job(gone).await;
            assert!(
                job["expired_at"].as_i64().is_some(),
                "marked expired: {job}"
            );
            assert_ne!(
                job["state"], "queued",
                "still in the history with its state"
            );
            assert_eq!(artifact_count(&app, gone).await, 0);
            assert_eq!(app.log(gone).await, "");
            assert!(!app.dir.path().join(format!("artifacts/{gone}")).exists());
        }
        for kept in [recent, nightly_new] {
            assert_eq!(app.job(kept).await.get("expired_at"), None);
            assert_eq!(artifact_count(&app, kept).await, 1);
            assert!(app.log(kept).await.contains("hello"));
        }
        let again = sweep_now(&app, &retention).await;
        assert_eq!(
            again,
            Swept::default(),
            "a second sweep finds nothing to do"
        );
    }

    async fn test_the_size_cap_expires_the_jobs_that_ended_first(db: Database) {
        let app = TestApp::new(db).await;
        let first = ended_job(&app, None, JobState::Succeeded, 100, 3 * HOUR).await;
        let logs_only = ended_job(&app, None, JobState::Succeeded, 0, 3 * HOUR).await;
        let second = ended_job(&app, None, JobState::Succeeded, 100, 2 * HOUR).await;
        let third = ended_job(&app, None, JobState::Succeeded, 100, HOUR).await;
        let retention = Retention {
            max_artifact_store: Some(ByteSize(150)),
            ..Retention::default()
        };
        let planned = plan(&app.state.db, &retention, now_ms()).await.unwrap();
        let jobs: Vec<(i64, u64)> = planned.iter().map(|e| (e.job, e.artifact_bytes)).collect();
        assert_eq!(
            jobs,
            [(first, 100), (second, 100)],
            "300 bytes over a cap of 150: the two that ended first; a job without artifacts frees nothing"
        );
        assert_eq!(planned[0].reason, "the artifact store is over 150B");
        sweep_now(&app, &retention).await;
        assert_eq!(artifact_count(&app, third).await, 1);
        assert!(app.log(logs_only).await.contains("hello"));
    }

    /// Every artifact row has its file and every file its row, but in the folders of jobs still
    /// running.
    async fn assert_consistent(app: &TestApp) {
        let rows = app
            .state
            .db
            .read()
            .fetch_all("SELECT job_id, attempt, name FROM artifacts", &[])
            .await
            .unwrap();
        let mut known = HashSet::new();
        for row in rows {
            let (job, attempt, name) = (
                row.int(0).unwrap(),
                row.int(1).unwrap(),
                row.text(2).unwrap(),
            );
            let path = format!("{attempt}/{name}");
            let file = app.dir.path().join(format!("artifacts/{job}/{path}"));
            assert!(file.exists(), "row without its file: {}", file.display());
            known.insert((job, path));
        }
        let root = app.dir.path().join("artifacts");
        let mut todo = vec![root.clone()];
        while let Some(dir) = todo.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() && path.file_name() != Some(".uploads".as_ref()) {
                    todo.push(path);
                } else if path.is_file() {
                    let rel = path.strip_prefix(&root).unwrap().to_str().unwrap();
                    let (job, path) = rel.split_once('/').unwrap();
                    assert!(
                        known.contains(&(job.parse().unwrap(), path.to_owned())),
                        "file without a row: {rel}"
                    );
                }
            }
        }
    }

    async fn test_a_sweep_stopped_at_any_step_is_finished_by_the_next(db: Database) {
        let app = TestApp::new(db).await;
        let retention = Retention {
            keep_for: keep(1),
            ..Retention::default()
        };
        // Stopped after the mark: nothing deleted yet.
        let marked = ended_job(&app, None, JobState::Succeeded, 10, 2 * HOUR).await;
        // Stopped after the files went, before the rows.
        let files_gone = ended_job(&app, None, JobState::Succeeded, 10, 2 * HOUR).await;
        // Kept, but with a file a crash left without its row, and a folder of a job with no row.
        let kept = ended_job(&app, None, JobState::Succeeded, 10, HOUR / 6).await;
        for (id, time) in [(marked, now_ms()), (files_gone, now_ms())] {
            app.state
                .db
                .execute(
                    "UPDATE jobs SET expired_at = $1 WHERE id = $2",
                    &[time.into(), id.into()],
                )
                .await
                .unwrap();
        }
        app.state.store.remove_job(files_gone).await.unwrap();
        let stray = app.dir.path().join(format!("artifacts/{kept}/1/stray.bin"));
        std::fs::write(&stray, b"no row").unwrap();
        let no_row = app.dir.path().join("artifacts/999999/1/x");
        std::fs::create_dir_all(no_row.parent().unwrap()).unwrap();
        std::fs::write(&no_row, b"no job").unwrap();
        // A running job's file without a row yet is an upload landing: left alone.
        app.submit("image = \"a\"\n[[tasks]]\nname = \"t\"\nscript = \"true\"\n")
            .await;
        let lease = app.lease("w0", "a").await;
        let landing = app
            .dir
            .path()
            .join(format!("artifacts/{}/1/landing", lease.job.id));
        std::fs::create_dir_all(landing.parent().unwrap()).unwrap();
        std::fs::write(&landing, b"in flight").unwrap();
        assert_eq!(
            artifact_count(&app, marked).await,
            0,
            "a marked job shows no artifact"
        );

        let swept = sweep_now(&app, &retention).await;
        assert_eq!((swept.expired, swept.purged, swept.orphans), (0, 2, 2));
        assert!(!stray.exists() && !no_row.exists() && landing.exists());
        std::fs::remove_file(&landing).unwrap();
        assert_consistent(&app).await;
        assert_eq!(
            artifact_count(&app, kept).await,
            1,
            "what should stay stays"
        );
        for id in [marked, files_gone] {
            assert_eq!(app.log(id).await, "");
        }
    }
}
