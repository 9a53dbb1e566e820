//! `GET /badge/{repository}.svg?branch=NAME`: an SVG badge with the result of the newest push
//! of a branch of a configured repository (`passing`, `failing`, `running`, `cancelled`, `no
//! builds`; a rerun of one of its jobs stands for that job), for a README. Public like every CI
//! badge (it says no more than that result); cached by browsers and proxies for 30 s.

use crate::db::Query;
use crate::error::{AppError, AppResult};
use crate::state::AppState;
use axum::extract::{Path, Query as UrlQuery, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use vmfarm_proto::JobState;
use vmfarm_proto::api::ErrorBody;

#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct BadgeQuery {
    /// Default: the repository's first branch pattern when it is a plain name, else `main`.
    pub branch: Option<String>,
}

#[utoipa::path(
    get, path = "/badge/{path}", tag = "pushes",
    params(("path" = String, Path, description = "A repository of the server's config and `.svg`: `/badge/acme/app.svg`"), BadgeQuery),
    responses(
        (status = 200, description = "An SVG badge with the state of the branch's newest pushed jobs", content_type = "image/svg+xml", body = String),
        (status = 404, description = "No such repository", body = ErrorBody),
    ),
    security(()),
)]
pub async fn badge(
    State(state): State<AppState>,
    Path(path): Path<String>,
    UrlQuery(q): UrlQuery<BadgeQuery>,
) -> AppResult<Response> {
    let missing =
        || AppError::NotFound(format!("no badge `{path}`: ask for /badge/REPOSITORY.svg"));
    let name = path.strip_suffix(".svg").ok_or_else(missing)?;
    let repo = crate::pushes::repository(&state, name).ok_or_else(missing)?;
    let branch = q.branch.unwrap_or_else(|| {
        repo.branches
            .first()
            .filter(|b| !vmfarm_proto::manifest::is_glob(b))
            .cloned()
            .unwrap_or_else(|| "main".to_owned())
    });
    let result = newest_result(&state, name, &format!("refs/heads/{branch}")).await?;
    Ok((
        [
            (header::CONTENT_TYPE, "image/svg+xml"),
            (header::CACHE_CONTROL, "public, max-age=30"),
        ],
        svg("vmfarm", result.word(), result.color()),
    )
        .into_response())
}

/// What a branch's newest push came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BranchResult {
    NoBuilds,
    Running,
    Passing,
    Failing,
    Cancelled,
}

impl BranchResult {
    fn word(self) -> &'static str {
        match self {
            BranchResult::NoBuilds => "no builds",
            BranchResult::Running => "running",
            BranchResult::Passing => "passing",
            BranchResult::Failing => "failing",
            BranchResult::Cancelled => "cancelled",
        }
    }

    fn color(self) -> &'static str {
        match self {
            BranchResult::Passing => "#2e7d32",
            BranchResult::Failing => "#c62828",
            BranchResult::Running => "#1565c0",
            BranchResult::NoBuilds | BranchResult::Cancelled => "#757575",
        }
    }

    /// The result of a push whose jobs (the newest of each manifest file and image: a rerun
    /// stands for its original) are in `states`, and whether one of its manifests had errors.
    pub fn of(states: &[JobState], manifest_errors: bool) -> BranchResult {
        let failed =
            |s: &JobState| matches!(s, JobState::Failed | JobState::TimedOut | JobState::Error);
        if states.iter().any(|s| !s.is_terminal()) {
            BranchResult::Running
        } else if manifest_errors || states.iter().any(failed) {
            BranchResult::Failing
        } else if states.is_empty() {
            BranchResult::NoBuilds
        } else if states.iter().all(|s| *s == JobState::Succeeded) {
            BranchResult::Passing
        } else {
            BranchResult::Cancelled
        }
    }
}

/// The result of the newest push of `git_ref` of `repository`.
async fn newest_result(
    state: &AppState,
    repository: &str,
    git_ref: &str,
) -> AppResult<BranchResult> {
    let mut reads = state.db.read();
    let Some(push) = reads
        .fetch_optional(
            "SELECT id FROM pushes WHERE repository = $1 AND git_ref = $2 ORDER BY id DESC LIMIT 1",
            &[repository.into(), git_ref.into()],
        )
        .await?
    else {
        return Ok(BranchResult::NoBuilds);
    };
    let push_id = push.int(0)?;
    let states = reads
        .fetch_all(
            "SELECT j.state FROM jobs j WHERE j.push_id = $1 AND j.id = \
             (SELECT MAX(k.id) FROM jobs k WHERE k.push_id = j.push_id \
              AND k.manifest_file = j.manifest_file AND k.image = j.image)",
            &[push_id.into()],
        )
        .await?
        .iter()
        .map(|r| r.parsed(0))
        .collect::<Result<Vec<JobState>, _>>()?;
    let errors = reads
        .fetch_optional(
            "SELECT COUNT(*) FROM push_files WHERE push_id = $1 AND errors IS NOT NULL",
            &[push_id.into()],
        )
        .await?
        .map_or(Ok(0), |r| r.int(0))?;
    Ok(BranchResult::of(&states, errors > 0))
}

/// A flat two-part badge: `label` on grey, `message` on `color`.
fn svg(label: &str, message: &str, color: &str) -> String {
    // About 7 px per character of 11 px Verdana, and 10 px of margin.
    let width = |text: &str| 10 + 7 * text.chars().count();
    let (left, right) = (width(label), width(message));
    let total = left + right;
    let (lx, rx) = (left / 2, left + right / 2);
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{total}\" height=\"20\" role=\"img\" \
         aria-label=\"{label}: {message}\"><title>{label}: {message}</title>\
         <rect width=\"{left}\" height=\"20\" fill=\"#555\"/>\
         <rect x=\"{left}\" width=\"{right}\" height=\"20\" fill=\"{color}\"/>\
         <g fill=\"#fff\" text-anchor=\"middle\" font-family=\"Verdana,DejaVu Sans,sans-serif\" font-size=\"11\">\
         <text x=\"{lx}\" y=\"14\">{label}</text><text x=\"{rx}\" y=\"14\">{message}</text></g></svg>"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use JobState::*;

    #[test]
    fn test_a_push_passes_only_when_all_its_jobs_succeeded() {
        assert_eq!(
            BranchResult::of(&[Succeeded, Succeeded], false),
            BranchResult::Passing
        );
        assert_eq!(
            BranchResult::of(&[Succeeded, Failed], false),
            BranchResult::Failing
        );
        assert_eq!(
            BranchResult::of(&[Succeeded, Running], false),
            BranchResult::Running
        );
        assert_eq!(
            BranchResult::of(&[Succeeded, Cancelled], false),
            BranchResult::Cancelled
        );
        assert_eq!(BranchResult::of(&[Succeeded], true), BranchResult::Failing);
        assert_eq!(BranchResult::of(&[], false), BranchResult::NoBuilds);
    }
}
