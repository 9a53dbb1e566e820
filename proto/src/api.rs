//! What the server's public API returns to the CLI and the web UI.

use crate::state::{JobState, TaskState};
use serde::{Deserialize, Serialize};

/// One job created by a submission.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SubmittedJob {
    pub id: String,
    pub image: String,
    /// Why it may wait with no end in sight: no worker offers its image now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<String>,
}

/// Answer to `POST /api/jobs`: one job per image, grouped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SubmitResponse {
    pub group_id: String,
    pub jobs: Vec<SubmittedJob>,
}

/// A task of a job as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TaskView {
    pub name: String,
    pub state: TaskState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
}

/// A job as the API shows it. Times are unix milliseconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct JobView {
    pub id: String,
    pub group_id: String,
    pub image: String,
    /// The user who submitted it (or whose schedule made it).
    pub owner: String,
    pub state: JobState,
    pub attempt: u32,
    pub priority: i64,
    pub tags: Vec<String>,
    pub created_at: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When its logs and artifacts were set to go by the server's retention (unix ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expired_at: Option<i64>,
    /// The push that made it (or the job it reruns).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push: Option<JobPush>,
    /// The job it is a rerun of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rerun_of: Option<String>,
    /// While it is queued: why it may wait with no end in sight (no worker offers its image).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<String>,
    #[serde(default)]
    pub tasks: Vec<TaskView>,
}

/// Where a pushed job comes from: the push, its repository, ref and commit, and the manifest
/// file of that commit it runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct JobPush {
    pub push_id: String,
    pub repository: String,
    pub git_ref: String,
    pub commit: String,
    pub file: String,
}

/// `POST /api/pushes`: a ref of a repository configured on the server moved (what a git
/// server's post-receive hook sends for each updated ref).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PushRequest {
    /// The repository's name in the server's `[[repositories]]`.
    pub repository: String,
    /// The full ref name: `refs/heads/main`, `refs/tags/v1`.
    pub git_ref: String,
    /// The commit it points to now (all zeros: the ref was deleted).
    pub after: String,
}

/// What a push (from a hook or a forge) did: built (`push`), or why not (`ignored`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PushAnswer {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push: Option<PushView>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ignored: Option<String>,
}

/// A push and what each manifest file of its commit became.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PushView {
    pub id: String,
    pub repository: String,
    pub git_ref: String,
    pub commit: String,
    pub owner: String,
    /// `hook`, `github`, `gitlab` or `forgejo`.
    pub via: String,
    pub created_at: i64,
    /// The manifest files, in path order; none when the commit has no `.vmfarm/*.toml` and no
    /// `.vmfarm.toml`.
    pub files: Vec<PushFileView>,
}

/// One manifest file of a push: the group it made, or the errors that kept it from building.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PushFileView {
    pub file: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_id: Option<String>,
    #[serde(default)]
    pub jobs: Vec<SubmittedJob>,
    #[serde(default)]
    pub errors: Vec<ManifestErrorView>,
}

/// A page of jobs, newest first; `next_before` asks for the page after it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct JobList {
    pub jobs: Vec<JobView>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_before: Option<String>,
}

/// A group: the jobs one submission (or one schedule run) made, one per image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct GroupView {
    pub id: String,
    pub owner: String,
    pub created_at: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
    pub jobs: Vec<JobView>,
}

/// An artifact of a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ArtifactView {
    /// Its path relative to the guest's build directory.
    pub name: String,
    pub size: u64,
    pub sha256: String,
}

/// One manifest error, as `POST /api/jobs` returns it with status 400.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ManifestErrorView {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl From<crate::ManifestError> for ManifestErrorView {
    fn from(e: crate::ManifestError) -> Self {
        ManifestErrorView {
            line: e.line,
            column: e.column,
            message: e.message,
        }
    }
}

/// The body of every error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorBody {
    pub error: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub manifest_errors: Vec<ManifestErrorView>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_job_view_round_trips() {
        let job = JobView {
            id: "j1".into(),
            group_id: "g1".into(),
            image: "tiny".into(),
            owner: "admin".into(),
            expired_at: None,
            state: JobState::Running,
            attempt: 1,
            priority: 0,
            tags: vec!["nightly".into()],
            created_at: 10,
            started_at: Some(11),
            finished_at: None,
            image_version: None,
            reason: None,
            push: Some(JobPush {
                push_id: "3".into(),
                repository: "acme/app".into(),
                git_ref: "refs/heads/main".into(),
                commit: "0123456789abcdef0123456789abcdef01234567".into(),
                file: ".vmfarm/build.toml".into(),
            }),
            rerun_of: Some("2".into()),
            waiting: Some(
                "no worker offers image `tiny` (workers offer: debian-12); it waits until one does"
                    .into(),
            ),
            tasks: vec![TaskView {
                name: "build".into(),
                state: TaskState::Running,
                exit_code: None,
            }],
        };
        let json = serde_json::to_string(&job).unwrap();
        assert!(json.contains("\"state\":\"running\""));
        assert_eq!(serde_json::from_str::<JobView>(&json).unwrap(), job);

        let err = ErrorBody {
            error: "invalid manifest".into(),
            manifest_errors: vec![ManifestErrorView {
                line: 3,
                column: 1,
                message: "unknown key".into(),
            }],
        };
        let json = serde_json::to_string(&err).unwrap();
        assert_eq!(serde_json::from_str::<ErrorBody>(&json).unwrap(), err);
        let plain = serde_json::to_string(&ErrorBody {
            error: "no such job".into(),
            manifest_errors: vec![],
        })
        .unwrap();
        assert_eq!(plain, r#"{"error":"no such job"}"#);
    }
}
