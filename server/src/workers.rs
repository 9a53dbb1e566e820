//! Workers as the server knows them: each lease call records the worker (at most once a
//! second), and the API, the dashboard and the submit form read them here.

use crate::db::{Db, Query, WriteTx, now_ms};
use crate::error::{AppError, AppResult};
use serde::Serialize;
use vmfarm_proto::api::SubmittedJob;
use vmfarm_proto::wire::{CacheStats, WorkerImage};

/// A worker as it last called in.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct WorkerView {
    pub name: String,
    /// Unix time in milliseconds.
    pub last_seen: i64,
    pub slots: i64,
    pub images: Vec<WorkerImage>,
    pub version: String,
    /// Its network proxy's cache.
    pub cache: CacheStats,
}

/// Records that `worker` called in.
pub async fn record(tx: &mut WriteTx, worker: &WorkerView) -> AppResult<()> {
    let images = serde_json::to_string(&worker.images).map_err(AppError::internal)?;
    let cache = serde_json::to_string(&worker.cache).map_err(AppError::internal)?;
    tx.execute(
        "INSERT INTO workers (name, last_seen, slots, images, version, cache) VALUES ($1, $2, $3, $4, $5, $6) \
         ON CONFLICT (name) DO UPDATE SET last_seen = excluded.last_seen, slots = excluded.slots, \
         images = excluded.images, version = excluded.version, cache = excluded.cache",
        &[
            (&worker.name).into(),
            now_ms().into(),
            worker.slots.into(),
            (&images).into(),
            (&worker.version).into(),
            (&cache).into(),
        ],
    )
    .await?;
    Ok(())
}

/// Every worker that has called in, by name.
pub async fn list(db: &Db) -> AppResult<Vec<WorkerView>> {
    let rows = db
        .read()
        .fetch_all(
            "SELECT name, last_seen, slots, images, version, cache FROM workers ORDER BY name",
            &[],
        )
        .await?;
    rows.iter()
        .map(|row| {
            Ok(WorkerView {
                name: row.text(0)?,
                last_seen: row.int(1)?,
                slots: row.int(2)?,
                images: serde_json::from_str(&row.text(3)?).map_err(AppError::internal)?,
                version: row.text(4)?,
                cache: serde_json::from_str(&row.text(5)?).map_err(AppError::internal)?,
            })
        })
        .collect()
}

/// How long a worker that runs no job may go without calling for work before it is taken as
/// gone. An idle worker calls at least once per long poll (at most [`MAX_LONG_POLL`]).
pub const GONE_AFTER_MS: i64 = 180_000;

/// The longest long poll the server may be configured with, so that [`GONE_AFTER_MS`] holds.
pub const MAX_LONG_POLL: std::time::Duration = std::time::Duration::from_secs(60);

/// What the workers present now offer: those that called for work in the last
/// [`GONE_AFTER_MS`], or hold a job (a worker whose slots are all taken does not call).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Offer {
    /// How many workers are present.
    pub workers: usize,
    /// Their images, sorted, each once.
    pub images: Vec<String>,
}

pub async fn offer(db: &Db) -> AppResult<Offer> {
    let busy: std::collections::BTreeSet<String> = db
        .read()
        .fetch_all(
            "SELECT DISTINCT worker FROM jobs WHERE state IN ('leased', 'booting', 'running') \
             AND worker IS NOT NULL",
            &[],
        )
        .await?
        .iter()
        .map(|row| row.text(0).map_err(AppError::from))
        .collect::<AppResult<_>>()?;
    let since = now_ms() - GONE_AFTER_MS;
    let present: Vec<WorkerView> = list(db)
        .await?
        .into_iter()
        .filter(|w| w.last_seen >= since || busy.contains(&w.name))
        .collect();
    let images: std::collections::BTreeSet<String> = present
        .iter()
        .flat_map(|w| w.images.iter().map(|i| i.name.clone()))
        .collect();
    Ok(Offer {
        workers: present.len(),
        images: images.into_iter().collect(),
    })
}

/// The images that workers offer now (see [`offer`]), sorted, each once.
pub async fn offered_images(db: &Db) -> AppResult<Vec<String>> {
    Ok(offer(db).await?.images)
}

/// Says, of each job just queued, whether it may wait with no end in sight. Best effort: the
/// jobs are queued already, so a failed read only leaves this out (an error would make the
/// caller retry and queue them twice).
pub async fn say_waiting<'a>(db: &Db, jobs: impl IntoIterator<Item = &'a mut SubmittedJob>) {
    match offer(db).await {
        Ok(offer) => {
            for job in jobs {
                job.waiting = unoffered(&job.image, &offer);
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot tell whether workers offer the jobs' images"),
    }
}

/// Why a queued job of `image` waits with no end in sight, when no worker offers `image`.
pub fn unoffered(image: &str, offer: &Offer) -> Option<String> {
    if offer.images.iter().any(|o| o == image) {
        return None;
    }
    Some(if offer.workers == 0 {
        format!(
            "no worker offers image `{image}`: no worker has called in for the last {} minutes; \
             it waits until one that has the image does",
            GONE_AFTER_MS / 60_000
        )
    } else if offer.images.is_empty() {
        format!(
            "no worker offers image `{image}`: the workers that called in have no image yet; it \
             waits until one has it"
        )
    } else {
        format!(
            "no worker offers image `{image}` (workers offer: {}); it waits until one does",
            offer.images.join(", ")
        )
    })
}

#[cfg(test)]
mod tests {
    use super::GONE_AFTER_MS;
    use crate::db::now_ms;
    use crate::test_utils::{ADMIN, Database, TestApp, on_both_databases};
    use axum::http::StatusCode;

    on_both_databases!(test_a_job_says_when_no_worker_offers_its_image);

    /// A worker offers its images while it calls for work or runs a job; a job for an image
    /// no worker offers says so in the submit answer, the job and the job list, and stops
    /// saying so once a worker offers the image.
    async fn test_a_job_says_when_no_worker_offers_its_image(database: Database) {
        let app = TestApp::new(database).await;
        let job = |image: &str| {
            format!("image = \"{image}\"\n[[tasks]]\nname = \"t\"\nscript = \"true\"\n")
        };
        let answer = app.post("/api/jobs", ADMIN, job("a")).await;
        assert_eq!(answer.status, StatusCode::CREATED, "{:?}", answer.body);
        assert_eq!(
            answer.body["jobs"][0]["waiting"],
            "no worker offers image `a`: no worker has called in for the last 3 minutes; it waits \
             until one that has the image does"
        );
        // w0 takes it: it is busy, and offers `a`.
        let lease = app.lease("w0", "a").await;
        let answer = app.post("/api/jobs", ADMIN, job("b")).await;
        assert_eq!(
            answer.body["jobs"][0]["waiting"],
            "no worker offers image `b` (workers offer: a); it waits until one does"
        );
        let b: i64 = answer.body["jobs"][0]["id"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        let answer = app.post("/api/jobs", ADMIN, job("a")).await;
        assert!(
            answer.body["jobs"][0].get("waiting").is_none(),
            "{:?}",
            answer.body
        );
        let second_a: i64 = answer.body["jobs"][0]["id"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();

        // Long silent, it still offers `a` while it runs a job ...
        let long_ago = now_ms() - GONE_AFTER_MS - 1000;
        app.state
            .db
            .write(move |tx| {
                Box::pin(async move {
                    tx.execute("UPDATE workers SET last_seen = $1", &[long_ago.into()])
                        .await
                })
            })
            .await
            .unwrap();
        assert!(app.job(second_a).await.get("waiting").is_none());
        assert_eq!(
            app.job(b).await["waiting"],
            "no worker offers image `b` (workers offer: a); it waits until one does"
        );
        // ... and is gone once it runs none.
        app.start("w0", &lease).await;
        app.move_job("w0", &lease, vmfarm_proto::JobState::Succeeded)
            .await;
        let gone = "no worker offers image `a`: no worker has called in for the last 3 minutes; \
                    it waits until one that has the image does";
        assert_eq!(app.job(second_a).await["waiting"], gone);
        let list = app.get("/api/jobs", ADMIN).await.body;
        let listed = list["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|j| j["id"].as_str() == Some(&second_a.to_string()))
            .unwrap()
            .clone();
        assert_eq!(listed["waiting"], gone, "{list}");
        // A job that is not queued never waits for a worker.
        assert!(
            app.job(lease.job.id.parse().unwrap())
                .await
                .get("waiting")
                .is_none()
        );

        // A worker with `a` calls in again (and takes the queued job of `a`): it offers `a`.
        let _ = app.lease("w1", "a").await;
        assert!(
            app.job(b).await["waiting"]
                .as_str()
                .unwrap()
                .contains("(workers offer: a)")
        );
    }
}
