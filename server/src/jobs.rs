//! Jobs as users see them: submit, read, list, cancel.

use crate::db::{WriteTx, now_ms};
use crate::error::{AppError, AppResult};
use crate::state::AppState;
use sqlx::Row;
use sqlx::any::AnyRow;
use std::collections::HashMap;
use vmfarm_proto::api::{GroupView, JobList, JobView, SubmitResponse, SubmittedJob, TaskView};
use vmfarm_proto::{JobState, Manifest, TaskState};

/// Parses a job or group id from a path.
pub fn parse_id(text: &str, what: &str) -> AppResult<i64> {
    text.parse::<i64>()
        .ok()
        .filter(|id| *id > 0)
        .ok_or_else(|| AppError::NotFound(format!("no {what} `{text}`: ids are positive numbers")))
}

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
        // The secrets' names are kept beside the manifest so that a lease need not parse it again.
        secrets_json: serde_json::to_string(&manifest.secrets).map_err(AppError::internal)?,
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
                    "INSERT INTO jobs (group_id, image, state, priority, manifest, tags, secrets, timeout_ms, created_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING id",
                    &[
                        group_id.into(),
                        image.into(),
                        JobState::Queued.as_str().into(),
                        self.manifest.priority.into(),
                        (&self.text).into(),
                        (&self.tags_json).into(),
                        (&self.secrets_json).into(),
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

const JOB_COLUMNS: &str = "id, group_id, image, state, attempt, priority, tags, created_at, started_at, \
                           finished_at, image_version, reason";

fn job_from_row(row: &AnyRow) -> AppResult<JobView> {
    let state: String = row.try_get("state")?;
    let tags: String = row.try_get("tags")?;
    Ok(JobView {
        id: row.try_get::<i64, _>("id")?.to_string(),
        group_id: row.try_get::<i64, _>("group_id")?.to_string(),
        image: row.try_get("image")?,
        state: state.parse().map_err(AppError::internal)?,
        attempt: u32::try_from(row.try_get::<i64, _>("attempt")?).unwrap_or(u32::MAX),
        priority: row.try_get("priority")?,
        tags: serde_json::from_str(&tags).map_err(AppError::internal)?,
        created_at: row.try_get("created_at")?,
        started_at: row.try_get("started_at")?,
        finished_at: row.try_get("finished_at")?,
        image_version: row.try_get("image_version")?,
        reason: row.try_get("reason")?,
        tasks: Vec::new(),
    })
}

/// Fills in the tasks of `jobs` with one query.
async fn attach_tasks(state: &AppState, jobs: &mut [JobView]) -> AppResult<()> {
    if jobs.is_empty() {
        return Ok(());
    }
    let placeholders: Vec<String> = (1..=jobs.len()).map(|i| format!("${i}")).collect();
    let sql = format!(
        "SELECT job_id, name, state, exit_code FROM tasks WHERE job_id IN ({}) ORDER BY job_id, idx",
        placeholders.join(", ")
    );
    let mut query = sqlx::query(&sql);
    for job in jobs.iter() {
        query = query.bind(job.id.parse::<i64>().map_err(AppError::internal)?);
    }
    let rows = query.fetch_all(&state.db.pool).await?;
    let mut by_job: HashMap<String, Vec<TaskView>> = HashMap::new();
    for row in rows {
        let state: String = row.try_get("state")?;
        by_job
            .entry(row.try_get::<i64, _>("job_id")?.to_string())
            .or_default()
            .push(TaskView {
                name: row.try_get("name")?,
                state: state.parse().map_err(AppError::internal)?,
                exit_code: row
                    .try_get::<Option<i64>, _>("exit_code")?
                    .and_then(|c| i32::try_from(c).ok()),
            });
    }
    for job in jobs.iter_mut() {
        job.tasks = by_job.remove(&job.id).unwrap_or_default();
    }
    Ok(())
}

pub async fn get(state: &AppState, id: i64) -> AppResult<JobView> {
    let row = sqlx::query(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1"))
        .bind(id)
        .fetch_optional(&state.db.pool)
        .await?
        .ok_or_else(|| AppError::NotFound(format!("no job {id}")))?;
    let mut jobs = vec![job_from_row(&row)?];
    attach_tasks(state, &mut jobs).await?;
    Ok(jobs.remove(0))
}

/// Filters of `GET /api/jobs`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    pub state: Option<String>,
    pub image: Option<String>,
    pub tag: Option<String>,
    /// Only jobs with a smaller id (the `next_before` of the previous page).
    pub before: Option<String>,
    pub limit: Option<u32>,
}

pub const MAX_PAGE: u32 = 200;

pub async fn list(state: &AppState, q: &ListQuery) -> AppResult<JobList> {
    let limit = q.limit.unwrap_or(50);
    if limit == 0 || limit > MAX_PAGE {
        return Err(AppError::BadRequest(format!(
            "limit must be between 1 and {MAX_PAGE}"
        )));
    }
    let mut clauses = Vec::new();
    let mut binds: Vec<Bind> = Vec::new();
    if let Some(s) = &q.state {
        let parsed: JobState = s
            .parse()
            .map_err(|e: vmfarm_proto::state::UnknownState| AppError::BadRequest(e.to_string()))?;
        binds.push(Bind::Text(parsed.as_str().to_owned()));
        clauses.push(format!("state = ${}", binds.len()));
    }
    if let Some(image) = &q.image {
        binds.push(Bind::Text(image.clone()));
        clauses.push(format!("image = ${}", binds.len()));
    }
    if let Some(tag) = &q.tag {
        binds.push(Bind::Text(tag.clone()));
        clauses.push(format!(
            "id IN (SELECT job_id FROM job_tags WHERE tag = ${})",
            binds.len()
        ));
    }
    if let Some(before) = &q.before {
        let id = before
            .parse::<i64>()
            .map_err(|_| AppError::BadRequest(format!("before `{before}` is not a job id")))?;
        binds.push(Bind::Int(id));
        clauses.push(format!("id < ${}", binds.len()));
    }
    let filter = if clauses.is_empty() {
        String::new()
    } else {
        format!("WHERE {}", clauses.join(" AND "))
    };
    binds.push(Bind::Int(i64::from(limit) + 1));
    let sql = format!(
        "SELECT {JOB_COLUMNS} FROM jobs {filter} ORDER BY id DESC LIMIT ${}",
        binds.len()
    );
    let mut query = sqlx::query(&sql);
    for b in binds {
        query = match b {
            Bind::Text(t) => query.bind(t),
            Bind::Int(i) => query.bind(i),
        };
    }
    let rows = query.fetch_all(&state.db.pool).await?;
    let mut jobs = rows
        .iter()
        .map(job_from_row)
        .collect::<AppResult<Vec<_>>>()?;
    let next_before = if jobs.len() > limit as usize {
        jobs.truncate(limit as usize);
        jobs.last().map(|j| j.id.clone())
    } else {
        None
    };
    attach_tasks(state, &mut jobs).await?;
    Ok(JobList { jobs, next_before })
}

enum Bind {
    Text(String),
    Int(i64),
}

pub async fn group(state: &AppState, id: i64) -> AppResult<GroupView> {
    let row: Option<(i64, Option<String>)> =
        sqlx::query_as("SELECT created_at, schedule FROM job_groups WHERE id = $1")
            .bind(id)
            .fetch_optional(&state.db.pool)
            .await?;
    let (created_at, schedule) = row.ok_or_else(|| AppError::NotFound(format!("no group {id}")))?;
    let rows = sqlx::query(&format!(
        "SELECT {JOB_COLUMNS} FROM jobs WHERE group_id = $1 ORDER BY id"
    ))
    .bind(id)
    .fetch_all(&state.db.pool)
    .await?;
    let mut jobs = rows
        .iter()
        .map(job_from_row)
        .collect::<AppResult<Vec<_>>>()?;
    attach_tasks(state, &mut jobs).await?;
    Ok(GroupView {
        id: id.to_string(),
        created_at,
        schedule,
        jobs,
    })
}

/// Cancels a job: a queued one ends at once; a leased or running one is told at its worker's
/// next heartbeat; a finished one cannot be cancelled.
pub async fn cancel(state: &AppState, id: i64) -> AppResult<JobView> {
    let now = now_ms();
    let was = state
        .db
        .write(move |tx| Box::pin(async move { cancel_in(tx, id, now).await }))
        .await?;
    state.events.job_changed(id);
    if was == JobState::Queued {
        crate::triggers::wake(state);
    }
    get(state, id).await
}

/// [`cancel`] in its transaction: the state the job was in.
async fn cancel_in(tx: &mut WriteTx, id: i64, now: i64) -> AppResult<JobState> {
    let current: JobState = tx
        .fetch_optional("SELECT state FROM jobs WHERE id = $1", &[id.into()])
        .await?
        .ok_or_else(|| AppError::NotFound(format!("no job {id}")))?
        .text(0)?
        .parse()
        .map_err(AppError::internal)?;
    match current {
        JobState::Queued => {
            let done = tx
                .execute(
                    "UPDATE jobs SET state = $1, finished_at = $2, reason = $3 WHERE id = $4 AND state = $5",
                    &[
                        JobState::Cancelled.as_str().into(),
                        now.into(),
                        "cancelled before it started".into(),
                        id.into(),
                        JobState::Queued.as_str().into(),
                    ],
                )
                .await?;
            if done == 1 {
                tx.execute(
                    "UPDATE tasks SET state = $1 WHERE job_id = $2 AND state = $3",
                    &[
                        TaskState::Skipped.as_str().into(),
                        id.into(),
                        TaskState::Pending.as_str().into(),
                    ],
                )
                .await?;
                crate::triggers::queue_in(tx, id, JobState::Cancelled, now).await?;
            }
        }
        s if s.is_terminal() => {
            return Err(AppError::Conflict(format!(
                "job {id} has already ended ({s})"
            )));
        }
        _ => {
            tx.execute(
                "UPDATE jobs SET cancel_requested = 1 WHERE id = $1",
                &[id.into()],
            )
            .await?;
        }
    }
    Ok(current)
}
