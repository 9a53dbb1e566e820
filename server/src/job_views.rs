//! Jobs as they are read: one job, a page of them, a group, and the queue's figures. The API,
//! the web UI, webhooks and `/metrics` all read them here.

use crate::access::Reach;
use crate::db::{Arg, Db, Query, Row, where_all};
use crate::error::{AppError, AppResult};
use std::collections::HashMap;
use vmfarm_proto::JobState;
use vmfarm_proto::api::{GroupView, JobList, JobPush, JobView, TaskView};

/// Parses a job or group id from a path.
pub fn parse_id(text: &str, what: &str) -> AppResult<i64> {
    text.parse::<i64>()
        .ok()
        .filter(|id| *id > 0)
        .ok_or_else(|| AppError::NotFound(format!("no {what} `{text}`: ids are positive numbers")))
}

const JOB_COLUMNS: &str = "id, group_id, image, state, attempt, priority, tags, created_at, started_at, \
                           finished_at, image_version, reason, owner, expired_at, push_id, manifest_file, rerun_of";

fn job_from_row(row: &Row) -> AppResult<JobView> {
    Ok(JobView {
        id: row.int(0)?.to_string(),
        group_id: row.int(1)?.to_string(),
        image: row.text(2)?,
        owner: row.text(12)?,
        state: row.parsed(3)?,
        attempt: u32::try_from(row.int(4)?).unwrap_or(u32::MAX),
        priority: row.int(5)?,
        tags: serde_json::from_str(&row.text(6)?).map_err(AppError::internal)?,
        created_at: row.int(7)?,
        started_at: row.opt_int(8)?,
        finished_at: row.opt_int(9)?,
        image_version: row.opt_text(10)?,
        reason: row.opt_text(11)?,
        expired_at: row.opt_int(13)?,
        // The push's repository, ref and commit are filled in by `attach_pushes`.
        push: match (row.opt_int(14)?, row.opt_text(15)?) {
            (Some(push_id), Some(file)) => Some(JobPush {
                push_id: push_id.to_string(),
                repository: String::new(),
                git_ref: String::new(),
                commit: String::new(),
                file,
            }),
            _ => None,
        },
        rerun_of: row.opt_int(16)?.map(|id| id.to_string()),
        // Filled in by `attach_waiting`.
        waiting: None,
        tasks: Vec::new(),
    })
}

/// Fills in the tasks of `jobs` with one query.
async fn attach_tasks(db: &Db, jobs: &mut [JobView]) -> AppResult<()> {
    if jobs.is_empty() {
        return Ok(());
    }
    let ids = jobs
        .iter()
        .map(|job| job.id.parse::<i64>().map_err(AppError::internal))
        .collect::<AppResult<Vec<_>>>()?;
    let placeholders: Vec<String> = (1..=ids.len()).map(|i| format!("${i}")).collect();
    let sql = format!(
        "SELECT job_id, name, state, exit_code FROM tasks WHERE job_id IN ({}) ORDER BY job_id, idx",
        placeholders.join(", ")
    );
    let args: Vec<Arg> = ids.iter().map(|id| (*id).into()).collect();
    let rows = db.read().fetch_all(&sql, &args).await?;
    let mut by_job: HashMap<String, Vec<TaskView>> = HashMap::new();
    for row in rows {
        by_job
            .entry(row.int(0)?.to_string())
            .or_default()
            .push(TaskView {
                name: row.text(1)?,
                state: row.parsed(2)?,
                exit_code: row.opt_int(3)?.and_then(|c| i32::try_from(c).ok()),
            });
    }
    for job in jobs.iter_mut() {
        job.tasks = by_job.remove(&job.id).unwrap_or_default();
    }
    Ok(())
}

/// Fills in the repository, ref and commit of the pushed ones of `jobs` with one query.
async fn attach_pushes(db: &Db, jobs: &mut [JobView]) -> AppResult<()> {
    let mut ids: Vec<i64> = jobs
        .iter()
        .filter_map(|job| job.push.as_ref()?.push_id.parse().ok())
        .collect();
    ids.sort_unstable();
    ids.dedup();
    let pushes: HashMap<String, (String, String, String)> = crate::pushes::summaries(db, &ids)
        .await?
        .into_iter()
        .map(|(id, repository, git_ref, commit)| (id.to_string(), (repository, git_ref, commit)))
        .collect();
    for push in jobs.iter_mut().filter_map(|job| job.push.as_mut()) {
        if let Some((repository, git_ref, commit)) = pushes.get(&push.push_id) {
            push.repository = repository.clone();
            push.git_ref = git_ref.clone();
            push.commit = commit.clone();
        }
    }
    Ok(())
}

/// Says why each queued job of an image that no worker offers waits.
async fn attach_waiting(db: &Db, jobs: &mut [JobView]) -> AppResult<()> {
    if !jobs.iter().any(|job| job.state == JobState::Queued) {
        return Ok(());
    }
    let offer = crate::workers::offer(db).await?;
    for job in jobs.iter_mut().filter(|job| job.state == JobState::Queued) {
        job.waiting = crate::workers::unoffered(&job.image, &offer);
    }
    Ok(())
}

/// What a job view holds besides its row: its tasks, its push, why it waits.
async fn attach_all(db: &Db, jobs: &mut [JobView]) -> AppResult<()> {
    attach_tasks(db, jobs).await?;
    attach_pushes(db, jobs).await?;
    attach_waiting(db, jobs).await
}

/// Reads jobs with `sql` (which selects [`JOB_COLUMNS`]) and all that their views hold.
async fn jobs_where(db: &Db, sql: &str, args: &[Arg<'_>]) -> AppResult<Vec<JobView>> {
    let rows = db.read().fetch_all(sql, args).await?;
    let mut jobs = rows
        .iter()
        .map(job_from_row)
        .collect::<AppResult<Vec<_>>>()?;
    attach_all(db, &mut jobs).await?;
    Ok(jobs)
}

/// Job `id`, when it is within `reach` (otherwise the same `404` as a missing one).
pub async fn get(db: &Db, id: i64, reach: &Reach) -> AppResult<JobView> {
    let sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1");
    jobs_where(db, &sql, &[id.into()])
        .await?
        .pop()
        .filter(|job| reach.covers(&job.owner))
        .ok_or_else(|| AppError::NotFound(format!("no job {id}")))
}

/// Filters of `GET /api/jobs`.
#[derive(Debug, Default, serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only jobs in this state (`queued`, `running`, `failed`, ...).
    pub state: Option<String>,
    /// Only jobs on this image.
    pub image: Option<String>,
    /// Only jobs with this tag.
    pub tag: Option<String>,
    /// Only jobs with a smaller id (the `next_before` of the previous page).
    pub before: Option<String>,
    /// Jobs per page: 1 to 200, 50 when not given.
    pub limit: Option<u32>,
}

pub const MAX_PAGE: u32 = 200;

/// A page of the jobs within `reach`, newest first.
pub async fn list(db: &Db, q: &ListQuery, reach: &Reach) -> AppResult<JobList> {
    let limit = q.limit.unwrap_or(50);
    if limit == 0 || limit > MAX_PAGE {
        return Err(AppError::BadRequest(format!(
            "limit must be between 1 and {MAX_PAGE}"
        )));
    }
    let state = q
        .state
        .as_deref()
        .map(|s| s.parse::<JobState>())
        .transpose()
        .map_err(|e| AppError::BadRequest(e.to_string()))?;
    let before = q
        .before
        .as_deref()
        .map(|b| {
            b.parse::<i64>()
                .map_err(|_| AppError::BadRequest(format!("before `{b}` is not a job id")))
        })
        .transpose()?;
    let mut clauses = Vec::new();
    let mut args: Vec<Arg> = Vec::new();
    clauses.extend(reach.owner_clause("owner", &mut args));
    if let Some(state) = state {
        args.push(state.as_str().into());
        clauses.push(format!("state = ${}", args.len()));
    }
    if let Some(image) = &q.image {
        args.push(image.into());
        clauses.push(format!("image = ${}", args.len()));
    }
    if let Some(tag) = &q.tag {
        args.push(tag.into());
        clauses.push(format!(
            "id IN (SELECT job_id FROM job_tags WHERE tag = ${})",
            args.len()
        ));
    }
    if let Some(before) = before {
        args.push(before.into());
        clauses.push(format!("id < ${}", args.len()));
    }
    let filter = where_all(&clauses);
    args.push((i64::from(limit) + 1).into());
    let sql = format!(
        "SELECT {JOB_COLUMNS} FROM jobs {filter} ORDER BY id DESC LIMIT ${}",
        args.len()
    );
    let rows = db.read().fetch_all(&sql, &args).await?;
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
    attach_all(db, &mut jobs).await?;
    Ok(JobList { jobs, next_before })
}

/// Group `id`, when it is within `reach` (otherwise the same `404` as a missing one).
pub async fn group(db: &Db, id: i64, reach: &Reach) -> AppResult<GroupView> {
    let row = db
        .read()
        .fetch_optional(
            "SELECT created_at, schedule, owner FROM job_groups WHERE id = $1",
            &[id.into()],
        )
        .await?
        .filter(|row| row.text(2).is_ok_and(|owner| reach.covers(&owner)))
        .ok_or_else(|| AppError::NotFound(format!("no group {id}")))?;
    let sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE group_id = $1 ORDER BY id");
    Ok(GroupView {
        id: id.to_string(),
        owner: row.text(2)?,
        created_at: row.int(0)?,
        schedule: row.opt_text(1)?,
        jobs: jobs_where(db, &sql, &[id.into()]).await?,
    })
}

/// The ids of the newest groups within `reach` (of `schedule` when given), newest first.
pub async fn newest_groups(
    db: &Db,
    schedule: Option<&str>,
    limit: i64,
    reach: &Reach,
) -> AppResult<Vec<i64>> {
    let mut args: Vec<Arg> = Vec::new();
    let mut clauses: Vec<String> = reach.owner_clause("owner", &mut args).into_iter().collect();
    if let Some(name) = schedule {
        args.push(name.into());
        clauses.push(format!("schedule = ${}", args.len()));
    }
    let filter = where_all(&clauses);
    args.push(limit.into());
    let sql = format!(
        "SELECT id FROM job_groups {filter} ORDER BY id DESC LIMIT ${}",
        args.len()
    );
    let rows = db.read().fetch_all(&sql, &args).await?;
    Ok(rows.iter().map(|r| r.int(0)).collect::<Result<_, _>>()?)
}

/// How many jobs are queued for each image that has any, by image name.
pub async fn queue_depth(db: &Db) -> AppResult<Vec<(String, i64)>> {
    count_by(
        db,
        "SELECT image, COUNT(*) FROM jobs WHERE state = 'queued' GROUP BY image ORDER BY image",
    )
    .await
}

/// How many jobs are in each state that has any.
pub async fn jobs_by_state(db: &Db) -> AppResult<Vec<(String, i64)>> {
    count_by(db, "SELECT state, COUNT(*) FROM jobs GROUP BY state").await
}

async fn count_by(db: &Db, sql: &str) -> AppResult<Vec<(String, i64)>> {
    let rows = db.read().fetch_all(sql, &[]).await?;
    Ok(rows
        .iter()
        .map(|r| Ok((r.text(0)?, r.int(1)?)))
        .collect::<Result<_, crate::db::DbFailure>>()?)
}
