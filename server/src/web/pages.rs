//! The pages: dashboard, submit, job, group, history, schedules.

use super::session::CsrfForm;
use super::{WebResult, WebUser, render, see_other};
use crate::config::Scope;
use crate::db::{Query as _, now_ms};
use crate::error::AppError;
use crate::job_views::{self, ListQuery, parse_id};
use crate::jobs;
use crate::schedules::{self, NewSchedule, Source};
use crate::state::AppState;
use crate::{store, triggers, workers};
use axum::Form;
use axum::extract::{Multipart, Path, Query, State};
use axum::http::HeaderMap;
use axum::response::{Html, IntoResponse, Response};
use minijinja::context;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use vmfarm_proto::JobState;
use vmfarm_proto::api::{GroupView, SubmitResponse};

#[derive(Serialize)]
struct GroupSummary {
    id: String,
    created_at: i64,
    schedule: Option<String>,
    /// `state -> count`.
    states: BTreeMap<String, usize>,
    images: Vec<String>,
}

fn summarize(group: &GroupView) -> GroupSummary {
    let mut states = BTreeMap::new();
    for job in &group.jobs {
        *states.entry(job.state.as_str().to_owned()).or_insert(0) += 1;
    }
    GroupSummary {
        id: group.id.clone(),
        created_at: group.created_at,
        schedule: group.schedule.clone(),
        states,
        images: group.jobs.iter().map(|j| j.image.clone()).collect(),
    }
}

#[derive(Serialize)]
struct WorkerRow {
    name: String,
    last_seen: i64,
    slots: i64,
    images: Vec<String>,
    version: String,
}

/// The workers that have called in, each image as `name (version)`.
async fn worker_rows(state: &AppState) -> WebResult<Vec<WorkerRow>> {
    Ok(workers::list(&state.db)
        .await?
        .into_iter()
        .map(|w| WorkerRow {
            name: w.name,
            last_seen: w.last_seen,
            slots: w.slots,
            images: w
                .images
                .iter()
                .map(|i| format!("{} ({})", i.name, i.version))
                .collect(),
            version: w.version,
        })
        .collect())
}

pub async fn dashboard(State(state): State<AppState>, user: WebUser) -> WebResult<Html<String>> {
    let queue = job_views::queue_depth(&state.db).await?;
    let reach = user.api.reach();
    let mut running = Vec::new();
    for s in [JobState::Running, JobState::Booting, JobState::Leased] {
        let page = job_views::list(
            &state.db,
            &ListQuery {
                state: Some(s.as_str().to_owned()),
                limit: Some(job_views::MAX_PAGE),
                ..ListQuery::default()
            },
            &reach,
        )
        .await?;
        running.extend(page.jobs);
    }
    let mut groups = Vec::new();
    for id in job_views::newest_groups(&state.db, None, 10, &reach).await? {
        groups.push(summarize(&job_views::group(&state.db, id, &reach).await?));
    }
    render(
        "dashboard.html",
        context! {
            user => user.name, csrf => user.csrf, now => now_ms(),
            queue => queue, running => running, workers => worker_rows(&state).await?, groups => groups,
        },
    )
}

fn submit_form(
    user: &WebUser,
    images: Vec<String>,
    manifest: &str,
    errors: Vec<String>,
) -> WebResult<Html<String>> {
    render(
        "submit.html",
        context! {
            user => user.name, csrf => user.csrf, images => images, manifest => manifest,
            errors => errors,
        },
    )
}

pub async fn submit_page(State(state): State<AppState>, user: WebUser) -> WebResult<Html<String>> {
    let images = workers::offered_images(&state.db).await?;
    submit_form(&user, images, "", Vec::new())
}

/// Where to go after a submit: the job, or the group when there are several.
fn submitted_location(response: &SubmitResponse) -> String {
    match response.jobs.as_slice() {
        [one] => format!("/jobs/{}", one.id),
        _ => format!("/groups/{}", response.group_id),
    }
}

/// The submit form: `csrf`, `manifest` (the textarea) and `file` (an upload that wins over the
/// textarea when it is not empty).
pub async fn submit(
    State(state): State<AppState>,
    user: WebUser,
    mut form: Multipart,
) -> WebResult<Response> {
    user.caller().require(Scope::Submit)?;
    let limit = usize::try_from(state.config.limits.max_manifest_size.0).unwrap_or(usize::MAX);
    let mut csrf = String::new();
    let mut text = String::new();
    let mut file = String::new();
    while let Some(field) = form
        .next_field()
        .await
        .map_err(|e| AppError::BadRequest(format!("the form could not be read: {e}")))?
    {
        let name = field.name().unwrap_or("").to_owned();
        let bytes = field
            .bytes()
            .await
            .map_err(|e| AppError::BadRequest(format!("the form could not be read: {e}")))?;
        if bytes.len() > limit {
            return Err(AppError::TooLarge(format!(
                "the manifest is over the server's limit of {}",
                state.config.limits.max_manifest_size
            ))
            .into());
        }
        let value = String::from_utf8(bytes.to_vec()).map_err(|e| {
            AppError::BadRequest(format!(
                "the {name} is not UTF-8 text (bad byte at offset {})",
                e.utf8_error().valid_up_to()
            ))
        })?;
        match name.as_str() {
            "csrf" => csrf = value,
            "manifest" => text = value,
            "file" => file = value,
            _ => {}
        }
    }
    user.check_csrf(&csrf)?;
    if !file.trim().is_empty() {
        text = file;
    }
    match jobs::submit(&state, &text, None, &user.api.submitter()).await {
        Ok(response) => Ok(see_other(&submitted_location(&response))),
        Err(AppError::Manifest(errors)) => {
            let lines = errors
                .0
                .iter()
                .map(|e| format!("line {}, column {}: {}", e.line, e.column, e.message))
                .collect();
            let images = workers::offered_images(&state.db).await?;
            Ok(submit_form(&user, images, &text, lines)?.into_response())
        }
        Err(AppError::BadRequest(message)) => {
            let images = workers::offered_images(&state.db).await?;
            Ok(submit_form(&user, images, &text, vec![message])?.into_response())
        }
        Err(e) => Err(e.into()),
    }
}

#[derive(Serialize)]
struct TaskRow {
    name: String,
    state: String,
    exit_code: Option<i64>,
    started_at: Option<i64>,
    finished_at: Option<i64>,
}

pub async fn job(
    State(state): State<AppState>,
    user: WebUser,
    Path(id): Path<String>,
) -> WebResult<Html<String>> {
    let id = parse_id(&id, "job")?;
    let job = job_views::get(&state.db, id, &user.api.reach()).await?;
    let lease = state
        .db
        .read()
        .fetch_optional(
            "SELECT leased_at, worker, cancel_requested FROM jobs WHERE id = $1",
            &[id.into()],
        )
        .await?
        .ok_or_else(|| AppError::NotFound(format!("no job {id}")))?;
    let (leased_at, worker, cancel_requested) =
        (lease.opt_int(0)?, lease.opt_text(1)?, lease.int(2)?);
    let tasks = state
        .db
        .read()
        .fetch_all(
            "SELECT name, state, exit_code, started_at, finished_at FROM tasks WHERE job_id = $1 ORDER BY idx",
            &[id.into()],
        )
        .await?
        .iter()
        .map(|row| {
            Ok(TaskRow {
                name: row.text(0)?,
                state: row.text(1)?,
                exit_code: row.opt_int(2)?,
                started_at: row.opt_int(3)?,
                finished_at: row.opt_int(4)?,
            })
        })
        .collect::<Result<Vec<_>, crate::db::DbFailure>>()?;
    let artifacts = store::list(&state.db, id).await?;
    let deliveries = triggers::for_job(&state, id).await?;
    render(
        "job.html",
        context! {
            user => user.name, csrf => user.csrf, job => job, tasks => tasks,
            artifacts => artifacts, deliveries => deliveries, leased_at => leased_at,
            worker => worker, cancel_requested => cancel_requested != 0,
            terminal => job.state.is_terminal(),
        },
    )
}

pub async fn cancel(
    State(state): State<AppState>,
    user: WebUser,
    Path(id): Path<String>,
    Form(form): Form<CsrfForm>,
) -> WebResult<Response> {
    user.check_csrf(&form.csrf)?;
    let reach = user.caller().require(Scope::Submit)?.reach();
    let id = parse_id(&id, "job")?;
    jobs::cancel(&state, id, &reach).await?;
    Ok(see_other(&format!("/jobs/{id}")))
}

pub async fn resubmit(
    State(state): State<AppState>,
    user: WebUser,
    Path(id): Path<String>,
    Form(form): Form<CsrfForm>,
) -> WebResult<Response> {
    user.check_csrf(&form.csrf)?;
    let caller = user.caller();
    let api = caller.require(Scope::Submit)?;
    let id = parse_id(&id, "job")?;
    let response = jobs::rerun(&state, id, &api.reach(), &api.submitter()).await?;
    Ok(see_other(&submitted_location(&response)))
}

/// The job's live log for the page, over the API's SSE route with the session's rights.
pub async fn log_stream(
    state: State<AppState>,
    user: WebUser,
    id: Path<String>,
    query: Query<crate::routes::logs::LogQuery>,
) -> Response {
    match crate::routes::logs::stream(state, user.caller(), id, query).await {
        Ok(sse) => sse.into_response(),
        Err(e) => e.into_response(),
    }
}

/// An artifact download for the page, through the API's route (Range, ETag) with the session.
pub async fn artifact(
    state: State<AppState>,
    user: WebUser,
    path: Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    match crate::routes::artifacts::download(state, user.caller(), path, headers).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

pub async fn push(
    State(state): State<AppState>,
    user: WebUser,
    Path(id): Path<String>,
) -> WebResult<Html<String>> {
    let push = crate::pushes::get(&state.db, parse_id(&id, "push")?, &user.api.reach()).await?;
    render(
        "push.html",
        context! { user => user.name, csrf => user.csrf, push => push },
    )
}

pub async fn group(
    State(state): State<AppState>,
    user: WebUser,
    Path(id): Path<String>,
) -> WebResult<Html<String>> {
    let group = job_views::group(&state.db, parse_id(&id, "group")?, &user.api.reach()).await?;
    // The matrix: one row per image, one column per state, each cell the jobs in it.
    let images: BTreeSet<&str> = group.jobs.iter().map(|j| j.image.as_str()).collect();
    let states: Vec<&str> = JobState::ALL.iter().map(|s| s.as_str()).collect();
    let rows: Vec<_> = images
        .iter()
        .map(|image| {
            let cells: Vec<Vec<&str>> = states
                .iter()
                .map(|s| {
                    group
                        .jobs
                        .iter()
                        .filter(|j| j.image == *image && j.state.as_str() == *s)
                        .map(|j| j.id.as_str())
                        .collect()
                })
                .collect();
            context! { image => image, cells => cells }
        })
        .collect();
    render(
        "group.html",
        context! {
            user => user.name, csrf => user.csrf, group => group, states => states, rows => rows,
        },
    )
}

/// The history's filters, as the form sends them (empty means any).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HistoryQuery {
    #[serde(default)]
    state: String,
    #[serde(default)]
    image: String,
    #[serde(default)]
    tag: String,
    #[serde(default)]
    schedule: String,
    #[serde(default)]
    before: String,
}

fn non_empty(s: &str) -> Option<String> {
    Some(s.trim().to_owned()).filter(|s| !s.is_empty())
}

const HISTORY_PAGE: u32 = 25;

pub async fn history(
    State(state): State<AppState>,
    user: WebUser,
    Query(q): Query<HistoryQuery>,
) -> WebResult<Html<String>> {
    let schedule_tag = non_empty(&q.schedule).map(|s| format!("scheduled:{s}"));
    if schedule_tag.is_some() && non_empty(&q.tag).is_some() {
        return Err(
            AppError::BadRequest("filter by a tag or by a schedule, not both".into()).into(),
        );
    }
    let list = job_views::list(
        &state.db,
        &ListQuery {
            state: non_empty(&q.state),
            image: non_empty(&q.image),
            tag: schedule_tag.or_else(|| non_empty(&q.tag)),
            before: non_empty(&q.before),
            limit: Some(HISTORY_PAGE),
        },
        &user.api.reach(),
    )
    .await?;
    let filters = [
        ("state", &q.state),
        ("image", &q.image),
        ("tag", &q.tag),
        ("schedule", &q.schedule),
    ];
    let mut query: Vec<String> = filters
        .iter()
        .filter(|(_, v)| !v.trim().is_empty())
        .map(|(k, v)| format!("{k}={}", percent_encode(v.trim())))
        .collect();
    let first_page = format!("/history?{}", query.join("&"));
    let next_page = list.next_before.as_ref().map(|before| {
        query.push(format!("before={before}"));
        format!("/history?{}", query.join("&"))
    });
    let schedules: Vec<String> = schedules::list(&state, &user.api.reach())
        .await?
        .into_iter()
        .map(|s| s.name)
        .collect();
    let states: Vec<&str> = JobState::ALL.iter().map(|s| s.as_str()).collect();
    render(
        "history.html",
        context! {
            user => user.name, csrf => user.csrf, jobs => list.jobs, next_page => next_page,
            first_page => first_page, paged => !q.before.is_empty(), f => context! {
                state => q.state, image => q.image, tag => q.tag, schedule => q.schedule,
            },
            states => states, images => workers::offered_images(&state.db).await?, schedules => schedules,
        },
    )
}

/// Escapes a query value (everything but unreserved characters).
fn percent_encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn schedules_page(
    user: &WebUser,
    list: Vec<schedules::ScheduleView>,
    form: &NewScheduleForm,
    error: Option<String>,
) -> WebResult<Html<String>> {
    render(
        "schedules.html",
        context! {
            user => user.name, csrf => user.csrf, schedules => list, form => form, error => error,
        },
    )
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct NewScheduleForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    cron: String,
    #[serde(default)]
    timezone: String,
    #[serde(default)]
    manifest: String,
}

pub async fn schedules(State(state): State<AppState>, user: WebUser) -> WebResult<Html<String>> {
    let form = NewScheduleForm {
        cron: "0 3 * * *".into(),
        timezone: "UTC".into(),
        ..NewScheduleForm::default()
    };
    schedules_page(
        &user,
        schedules::list(&state, &user.api.reach()).await?,
        &form,
        None,
    )
}

pub async fn create_schedule(
    State(state): State<AppState>,
    user: WebUser,
    Form(form): Form<NewScheduleForm>,
) -> WebResult<Response> {
    user.check_csrf(&form.csrf)?;
    let caller = user.caller();
    let api = caller.require(Scope::Submit)?;
    let new = NewSchedule {
        name: form.name.trim().to_owned(),
        cron: form.cron.clone(),
        timezone: non_empty(&form.timezone),
        manifest: form.manifest.clone(),
    };
    let (submitter, reach) = (api.submitter(), api.reach());
    let saved = schedules::save(&state, &new, Source::Ui, now_ms(), &submitter, &reach);
    let error = match saved.await {
        Ok(()) => return Ok(see_other(&format!("/schedules/{}", new.name))),
        Err(AppError::Manifest(errors)) => errors
            .0
            .iter()
            .map(|e| {
                format!(
                    "manifest line {}, column {}: {}",
                    e.line, e.column, e.message
                )
            })
            .collect::<Vec<_>>()
            .join("; "),
        Err(AppError::BadRequest(message) | AppError::Conflict(message)) => message,
        Err(e) => return Err(e.into()),
    };
    let list = schedules::list(&state, &reach).await?;
    Ok(schedules_page(&user, list, &form, Some(error))?.into_response())
}

pub async fn schedule(
    State(state): State<AppState>,
    user: WebUser,
    Path(name): Path<String>,
) -> WebResult<Html<String>> {
    let reach = user.api.reach();
    let schedule = schedules::get(&state, &name, &reach).await?;
    let runs: Vec<GroupSummary> = schedules::runs(&state, &name, 50, &reach)
        .await?
        .iter()
        .map(summarize)
        .collect();
    render(
        "schedule.html",
        context! { user => user.name, csrf => user.csrf, schedule => schedule, runs => runs },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_query_values_are_escaped() {
        assert_eq!(percent_encode("scheduled:nightly"), "scheduled%3Anightly");
        assert_eq!(percent_encode("a b&c"), "a%20b%26c");
    }
}
