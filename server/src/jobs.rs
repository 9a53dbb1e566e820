//! What users do to jobs: submit them and cancel them. Reading them is [`crate::job_views`].

use crate::db::{Query, WriteTx, now_ms};
use crate::error::{AppError, AppResult};
use crate::job_end::{End, EndedBy, Seen, end_job};
use crate::state::AppState;
use vmfarm_proto::api::{JobView, SubmitResponse, SubmittedJob};
use vmfarm_proto::{JobState, Manifest, TaskState};

/// Validates and enqueues a manifest: one job per image, in one group.
pub async fn submit(
    state: &AppState,
    text: &str,
    schedule: Option<&str>,
) -> AppResult<SubmitResponse> {
    let limit = state.config.limits.max_manifest_size;
    if text.len() as u64 > limit.0 {
        return Err(AppError::TooLarge(format!(
            "the manifest is {} bytes; the limit is {limit}",
            text.len()
        )));
    }
    let mut manifest = Manifest::parse(text).map_err(AppError::Manifest)?;
    if let Some(name) = schedule {
        let tag = format!("scheduled:{name}");
        if !manifest.tags.contains(&tag) {
            manifest.tags.push(tag);
        }
    }
    let timeout = manifest
        .timeout
        .unwrap_or(state.config.limits.default_job_timeout.0);
    let new = NewGroup {
        text: text.to_owned(),
        schedule: schedule.map(str::to_owned),
        tags_json: serde_json::to_string(&manifest.tags).map_err(AppError::internal)?,
        // The secrets' names and the triggers are kept beside the manifest, so that a lease and
        // the job's end need not parse it again.
        secrets_json: serde_json::to_string(&manifest.secrets).map_err(AppError::internal)?,
        triggers_json: serde_json::to_string(&manifest.triggers).map_err(AppError::internal)?,
        timeout_ms: i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX),
        manifest,
    };
    let response = state
        .db
        .write(move |tx| Box::pin(async move { new.insert(tx).await }))
        .await?;
    state.metrics.jobs_submitted(response.jobs.len());
    state.events.work.notify_waiters();
    Ok(response)
}

/// A valid manifest about to be queued: one job per image, in one group.
struct NewGroup {
    text: String,
    schedule: Option<String>,
    manifest: Manifest,
    tags_json: String,
    secrets_json: String,
    triggers_json: String,
    timeout_ms: i64,
}

impl NewGroup {
    async fn insert(&self, tx: &mut WriteTx) -> AppResult<SubmitResponse> {
        for name in &self.manifest.secrets {
            let found = tx
                .fetch_optional("SELECT name FROM secrets WHERE name = $1", &[name.into()])
                .await?;
            if found.is_none() {
                return Err(AppError::BadRequest(format!(
                    "the manifest names secret `{name}`, which the server does not have: store it with `vmfarm server secret set {name}`"
                )));
            }
        }
        let now = now_ms();
        let group_id = tx
            .fetch_optional(
                "INSERT INTO job_groups (created_at, schedule) VALUES ($1, $2) RETURNING id",
                &[now.into(), self.schedule.as_deref().into()],
            )
            .await?
            .ok_or_else(|| AppError::internal("INSERT ... RETURNING gave no row"))?
            .int(0)?;
        let mut jobs = Vec::with_capacity(self.manifest.images.len());
        for image in &self.manifest.images {
            let id = tx
                .fetch_optional(
                    "INSERT INTO jobs (group_id, image, state, priority, manifest, tags, secrets, triggers, \
                     timeout_ms, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) RETURNING id",
                    &[
                        group_id.into(),
                        image.into(),
                        JobState::Queued.as_str().into(),
                        self.manifest.priority.into(),
                        (&self.text).into(),
                        (&self.tags_json).into(),
                        (&self.secrets_json).into(),
                        (&self.triggers_json).into(),
                        self.timeout_ms.into(),
                        now.into(),
                    ],
                )
                .await?
                .ok_or_else(|| AppError::internal("INSERT ... RETURNING gave no row"))?
                .int(0)?;
            for tag in &self.manifest.tags {
                tx.execute(
                    "INSERT INTO job_tags (job_id, tag) VALUES ($1, $2)",
                    &[id.into(), tag.into()],
                )
                .await?;
            }
            for (idx, task) in self.manifest.tasks.iter().enumerate() {
                tx.execute(
                    "INSERT INTO tasks (job_id, idx, name, state) VALUES ($1, $2, $3, $4)",
                    &[
                        id.into(),
                        (idx as i64).into(),
                        (&task.name).into(),
                        TaskState::Pending.as_str().into(),
                    ],
                )
                .await?;
            }
            jobs.push(SubmittedJob {
                id: id.to_string(),
                image: image.clone(),
            });
        }
        Ok(SubmitResponse {
            group_id: group_id.to_string(),
            jobs,
        })
    }
}

/// Cancels a job: a queued one ends at once; a leased or running one is told at its worker's
/// next heartbeat; a finished one cannot be cancelled.
pub async fn cancel(state: &AppState, id: i64) -> AppResult<JobView> {
    let now = now_ms();
    let ended = state
        .db
        .write(move |tx| Box::pin(async move { cancel_in(tx, id, now).await }))
        .await?;
    if ended {
        crate::job_end::ended(state, JobState::Cancelled);
    }
    state.events.job_changed(id);
    crate::job_views::get(&state.db, id).await
}

/// [`cancel`] in its transaction: whether the job ended now (it was queued).
async fn cancel_in(tx: &mut WriteTx, id: i64, now: i64) -> AppResult<bool> {
    let seen = Seen::read(tx, id).await?;
    match seen.state {
        JobState::Queued => {
            let end = End {
                state: JobState::Cancelled,
                reason: Some("cancelled before it started"),
                by: EndedBy::User,
                now,
            };
            end_job(tx, &seen, &end).await
        }
        s if s.is_terminal() => Err(AppError::Conflict(format!(
            "job {id} has already ended ({s})"
        ))),
        _ => {
            tx.execute(
                "UPDATE jobs SET cancel_requested = 1 WHERE id = $1",
                &[id.into()],
            )
            .await?;
            Ok(false)
        }
    }
}
