//! Pushes: a ref of a repository in the server's `[[repositories]]` moved, as a forge's webhook
//! ([`crate::routes::hooks`]) or a git server's post-receive hook (`POST /api/pushes`) says. A
//! push that builds reads every manifest of the pushed commit ([`crate::commit_manifests`]) and
//! queues each as a group of the repository's owner, with the repository as the jobs' first
//! source at exactly that commit. A manifest with errors builds nothing and keeps its errors
//! (file, line, column) beside the push's other results.

use crate::access::{Reach, Submitter};
use crate::commit_manifests::{self, ManifestFile};
use crate::config::Repository;
use crate::db::{Arg, Db, Query, WriteTx, now_ms};
use crate::error::{AppError, AppResult};
use crate::jobs::{NewGroup, Origin};
use crate::state::AppState;
use vmfarm_proto::api::{ManifestErrorView, PushAnswer, PushFileView, PushView, SubmittedJob};
use vmfarm_proto::manifest::Checkout;
use vmfarm_proto::{ManifestError, ManifestErrors};

/// A ref that moved.
#[derive(Debug, Clone)]
pub struct Push<'a> {
    pub repository: &'a Repository,
    /// `refs/heads/NAME` or `refs/tags/NAME`.
    pub git_ref: String,
    /// The commit it points to now.
    pub commit: String,
    /// `hook`, or the forge's name.
    pub via: &'static str,
    /// The forge's delivery id: a second push with the same one builds nothing.
    pub delivery: Option<String>,
    /// The highest priority its manifests may ask for: the hook's token's cap (a forge's calls
    /// have none: the operator configured the repository).
    pub max_priority: Option<i64>,
}

/// Where pushes fetch their commits: a scratch folder of the data dir, emptied at start.
pub fn scratch_dir(config: &crate::config::ServerConfig) -> std::path::PathBuf {
    config.data_dir.join("tmp")
}

/// The repository named `name` in the server's config.
pub fn repository<'a>(state: &'a AppState, name: &str) -> Option<&'a Repository> {
    state.config.repositories.iter().find(|r| r.name == name)
}

/// Whether `git_ref` is a pull request's head (`refs/pull/N/head`, GitLab's
/// `refs/merge-requests/N/head`).
pub fn is_pull_request(git_ref: &str) -> bool {
    git_ref.starts_with("refs/pull/") || git_ref.starts_with("refs/merge-requests/")
}

/// Why `git_ref` at `commit` of `repo` does not build, or `None` when it does.
pub fn not_built(repo: &Repository, git_ref: &str, commit: &str) -> Option<String> {
    if commit.bytes().all(|b| b == b'0') {
        return Some(format!("{git_ref} was deleted: nothing to build"));
    }
    if is_pull_request(git_ref) {
        return (!repo.pull_requests).then(|| {
            format!("{git_ref} is a pull request, and the repository does not build them (pull_requests = false)")
        });
    }
    let (kind, name, patterns) = if let Some(branch) = git_ref.strip_prefix("refs/heads/") {
        ("branch", branch, &repo.branches)
    } else if let Some(tag) = git_ref.strip_prefix("refs/tags/") {
        ("tag", tag, &repo.tags)
    } else {
        return Some(format!(
            "{git_ref} is neither a branch (refs/heads/) nor a tag (refs/tags/): not built"
        ));
    };
    let matches = patterns
        .iter()
        .filter_map(|p| glob::Pattern::new(p).ok())
        .any(|p| p.matches(name));
    (!matches).then(|| {
        let plural = if kind == "branch" { "branches" } else { "tags" };
        format!(
            "the {kind} `{name}` matches none of the repository's {plural} ({}): not built",
            if patterns.is_empty() {
                "none are configured".to_owned()
            } else {
                patterns.join(", ")
            }
        )
    })
}

/// The HTTP answer of a push: `201` when it built, `200` when it says why not.
pub fn answer(answer: PushAnswer) -> (axum::http::StatusCode, axum::Json<PushAnswer>) {
    let status = if answer.push.is_some() {
        axum::http::StatusCode::CREATED
    } else {
        axum::http::StatusCode::OK
    };
    (status, axum::Json(answer))
}

/// The longest ref name a push may carry (what it stores and shows).
const MAX_REF_BYTES: usize = 255;

/// At most the first 80 characters of `text`, escaped: what an error shows of an input.
fn shown(text: &str) -> String {
    let head: String = text.chars().take(80).collect();
    let more = if head.len() < text.len() { "..." } else { "" };
    format!("{}{more}", head.escape_debug())
}

/// Why `push` (its commit peeled to `commit`) was built already, if it was: its forge delivery
/// was taken, or its ref built that commit (a forge's redelivery under a new id is not a new
/// push; `vmfarm rerun` builds a job again).
async fn seen_before(state: &AppState, push: &Push<'_>, commit: &str) -> AppResult<Option<String>> {
    let mut reads = state.db.read();
    if let Some(delivery) = &push.delivery
        && let Some(row) = reads
            .fetch_optional(
                "SELECT id FROM pushes WHERE via = $1 AND delivery = $2",
                &[push.via.into(), delivery.as_str().into()],
            )
            .await?
    {
        return Ok(Some(format!(
            "delivery {delivery} was taken already (push {}): not built again",
            row.int(0)?
        )));
    }
    let built = reads
        .fetch_optional(
            "SELECT id FROM pushes WHERE repository = $1 AND git_ref = $2 AND git_commit = $3",
            &[
                push.repository.name.as_str().into(),
                push.git_ref.as_str().into(),
                commit.into(),
            ],
        )
        .await?;
    Ok(built.map(|row| {
        format!(
            "{} at {commit} was built already (push {}): not built again; `vmfarm rerun` builds a \
             job again",
            push.git_ref,
            row.int(0).unwrap_or_default()
        )
    }))
}

/// Builds `push`: every manifest of its commit, one group each, or the reason it builds
/// nothing.
pub async fn build(state: &AppState, push: Push<'_>) -> AppResult<PushAnswer> {
    let repo = push.repository;
    if !commit_manifests::is_commit_id(&push.commit) {
        return Err(AppError::BadRequest(format!(
            "`{}` is not a full commit id (40 or 64 lower-case hex digits)",
            shown(&push.commit)
        )));
    }
    if push.git_ref.is_empty()
        || push.git_ref.len() > MAX_REF_BYTES
        || push
            .git_ref
            .chars()
            .any(|c| c.is_control() || c.is_whitespace())
    {
        return Err(AppError::BadRequest(format!(
            "`{}` is not a ref name: 1 to {MAX_REF_BYTES} bytes, no spaces or control characters \
             (refs/heads/NAME, refs/tags/NAME)",
            shown(&push.git_ref)
        )));
    }
    if let Some(why) = not_built(repo, &push.git_ref, &push.commit) {
        return Ok(PushAnswer {
            push: None,
            ignored: Some(why),
        });
    }
    if let Some(why) = seen_before(state, &push, &push.commit).await? {
        return Ok(PushAnswer {
            push: None,
            ignored: Some(why),
        });
    }
    if crate::users::find(&state.db, &state.config, &repo.owner)
        .await?
        .is_none()
    {
        return Err(AppError::Conflict(format!(
            "the repository `{}` belongs to `{}`, who is not a user: the operator adds it with \
             `vmfarm server user add {}`",
            repo.name, repo.owner, repo.owner
        )));
    }
    let fetched = commit_manifests::read(
        &scratch_dir(&state.config),
        &repo.url,
        &push.commit,
        state.config.limits.max_manifest_size.0,
    )
    .await
    .map_err(|e| AppError::Upstream(e.to_string()))?;
    // An annotated tag's id names the tag: its commit is what builds and gets statuses.
    let commit = fetched.commit;
    let files = fetched.files;
    let checkout = Checkout {
        url: repo.url.clone(),
        commit: commit.clone(),
    };
    let submitter = Submitter {
        user: repo.owner.clone(),
        max_priority: push.max_priority,
    };
    let pull_request = is_pull_request(&push.git_ref);
    let mut planned = Vec::with_capacity(files.len());
    for file in files {
        planned.push(plan(state, file, &checkout, &submitter, pull_request)?);
    }
    let row = NewPush {
        repository: repo.name.clone(),
        url: repo.url.clone(),
        git_ref: push.git_ref.clone(),
        commit: commit.clone(),
        owner: repo.owner.clone(),
        via: push.via,
        delivery: push.delivery.clone(),
        reports: repo.status_api().is_some(),
    };
    let inserted = state
        .db
        .write(move |tx| Box::pin(async move { row.insert(tx, &planned).await }))
        .await?;
    let Some((push_id, jobs)) = inserted else {
        // The same delivery or ref and commit, built meanwhile by a call made at the same time.
        let why = seen_before(state, &push, &commit).await?;
        return Ok(PushAnswer {
            push: None,
            ignored: Some(why.unwrap_or_else(|| "built already".to_owned())),
        });
    };
    crate::jobs::queued(state, jobs);
    crate::outbox::wake(state);
    let mut view = get(&state.db, push_id, &Reach::All).await?;
    crate::workers::say_waiting(
        &state.db,
        view.files.iter_mut().flat_map(|file| file.jobs.iter_mut()),
    )
    .await;
    Ok(PushAnswer {
        push: Some(view),
        ignored: None,
    })
}

/// What one manifest file of a push becomes: a group to queue, or its errors.
enum Planned {
    Group {
        file: String,
        group: Box<NewGroup>,
    },
    Refused {
        file: String,
        errors: Vec<ManifestErrorView>,
    },
}

/// Checks one manifest file as a submit would, and with the pushed repository as its first
/// source; a pull request's may name no secret.
fn plan(
    state: &AppState,
    file: ManifestFile,
    checkout: &Checkout,
    submitter: &Submitter,
    pull_request: bool,
) -> AppResult<Planned> {
    let refused = |errors: Vec<ManifestError>| Planned::Refused {
        file: file.path.clone(),
        errors: errors.into_iter().map(ManifestErrorView::from).collect(),
    };
    let at_top = |message: String| {
        vec![ManifestError {
            line: 1,
            column: 1,
            message,
        }]
    };
    let text = match &file.text {
        Ok(text) => text,
        Err(why) => return Ok(refused(at_top(why.clone()))),
    };
    let group = match crate::jobs::prepare(state, text, None, submitter) {
        Ok(group) => group,
        Err(AppError::Manifest(ManifestErrors(errors))) => return Ok(refused(errors)),
        Err(AppError::TooLarge(why)) => return Ok(refused(at_top(why))),
        Err(e) => return Err(e),
    };
    let mut checked = group.manifest().clone();
    if let Err(ManifestErrors(errors)) = checked.check_out(checkout) {
        return Ok(refused(errors));
    }
    if pull_request {
        let errors = pull_request_refusals(&checked);
        if !errors.is_empty() {
            return Ok(refused(errors));
        }
    }
    Ok(Planned::Group {
        file: file.path,
        group: Box::new(group),
    })
}

/// What a pull request's manifest (checked out: the pushed repository first) may not ask for,
/// its code not being the repository's yet (it may come from anyone's fork): the owner's secrets,
/// the worker's local folders besides the repository itself, webhooks of its choosing.
fn pull_request_refusals(manifest: &vmfarm_proto::Manifest) -> Vec<ManifestError> {
    let at_top = |message: String| ManifestError {
        line: 1,
        column: 1,
        message,
    };
    let mut errors: Vec<ManifestError> = manifest
        .secrets
        .iter()
        .map(|s| ManifestError {
            line: s.at.line,
            column: s.at.column,
            message: format!(
                "a pull request's build gets no secrets (its code is not the repository's yet): \
                 `{}` is not handed to it; build secrets on a branch",
                s.name
            ),
        })
        .collect();
    errors.extend(
        manifest
            .sources
            .iter()
            .skip(1)
            .filter(|s| s.url.starts_with('/') || s.url.starts_with("file://"))
            .map(|s| {
                at_top(format!(
                    "a pull request's build may not fetch the worker's local folder `{}`",
                    s.url
                ))
            }),
    );
    if !manifest.triggers.is_empty() {
        errors.push(at_top(
            "a pull request's build may not call [[triggers]] webhooks: build them on a branch"
                .to_owned(),
        ));
    }
    errors
}

/// A push about to be recorded.
struct NewPush {
    repository: String,
    url: String,
    git_ref: String,
    commit: String,
    owner: String,
    via: &'static str,
    delivery: Option<String>,
    /// Its jobs report their states to the forge.
    reports: bool,
}

impl NewPush {
    /// Records the push and queues its groups; a file whose secrets its owner may not use, or
    /// that would pass the owner's queue limit, is recorded with that error instead. Returns the
    /// push's id and how many jobs it queued; `None` when the push is there already (its
    /// delivery, or its ref and commit).
    async fn insert(
        &self,
        tx: &mut WriteTx,
        planned: &[Planned],
    ) -> AppResult<Option<(i64, usize)>> {
        let push_id = tx
            .fetch_optional(
                "INSERT INTO pushes (repository, url, git_ref, git_commit, owner, via, delivery, \
                 reports, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
                 ON CONFLICT DO NOTHING RETURNING id",
                &[
                    (&self.repository).into(),
                    (&self.url).into(),
                    (&self.git_ref).into(),
                    (&self.commit).into(),
                    (&self.owner).into(),
                    self.via.into(),
                    self.delivery.as_deref().into(),
                    i64::from(self.reports).into(),
                    now_ms().into(),
                ],
            )
            .await?;
        let Some(push_id) = push_id else {
            return Ok(None);
        };
        let push_id = push_id.int(0)?;
        let mut jobs = 0;
        for planned in planned {
            let (file, group_id, errors) = match planned {
                Planned::Group { file, group } => {
                    let origin = Origin {
                        push: Some((push_id, file.clone())),
                        rerun_of: None,
                    };
                    match group.insert(tx, &origin).await {
                        Ok(response) => {
                            jobs += response.jobs.len();
                            let id: i64 = response.group_id.parse().map_err(AppError::internal)?;
                            (file, Some(id), None)
                        }
                        Err(AppError::Manifest(ManifestErrors(errors))) => (
                            file,
                            None,
                            Some(errors.into_iter().map(ManifestErrorView::from).collect()),
                        ),
                        Err(AppError::TooMany(why)) => (
                            file,
                            None,
                            Some(vec![ManifestErrorView {
                                line: 1,
                                column: 1,
                                message: why,
                            }]),
                        ),
                        Err(e) => return Err(e),
                    }
                }
                Planned::Refused { file, errors } => (file, None, Some(errors.clone())),
            };
            let errors_json = errors
                .map(|errors| serde_json::to_string(&errors).map_err(AppError::internal))
                .transpose()?;
            tx.execute(
                "INSERT INTO push_files (push_id, file, group_id, errors) VALUES ($1, $2, $3, $4)",
                &[
                    push_id.into(),
                    file.as_str().into(),
                    group_id.into(),
                    errors_json.as_deref().into(),
                ],
            )
            .await?;
        }
        Ok(Some((push_id, jobs)))
    }
}

/// The repository and commit a pushed job checks out: what its lease carries.
pub async fn checkout(tx: &mut WriteTx, push_id: i64) -> AppResult<Checkout> {
    let row = tx
        .fetch_optional(
            "SELECT url, git_commit FROM pushes WHERE id = $1",
            &[push_id.into()],
        )
        .await?
        .ok_or_else(|| AppError::internal(format!("push {push_id} of a job is missing")))?;
    Ok(Checkout {
        url: row.text(0)?,
        commit: row.text(1)?,
    })
}

/// Push `id`, when within `reach` (otherwise the same `404` as a missing one).
pub async fn get(db: &Db, id: i64, reach: &Reach) -> AppResult<PushView> {
    let missing = || AppError::NotFound(format!("no push {id}"));
    let row = db
        .read()
        .fetch_optional(
            "SELECT repository, git_ref, git_commit, owner, via, created_at FROM pushes WHERE id = $1",
            &[id.into()],
        )
        .await?
        .ok_or_else(missing)?;
    let owner = row.text(3)?;
    if !reach.covers(&owner) {
        return Err(missing());
    }
    let file_rows = db
        .read()
        .fetch_all(
            "SELECT file, group_id, errors FROM push_files WHERE push_id = $1 ORDER BY file",
            &[id.into()],
        )
        .await?;
    let mut files = Vec::with_capacity(file_rows.len());
    for file in file_rows {
        let group_id = file.opt_int(1)?;
        let errors: Vec<ManifestErrorView> = match file.opt_text(2)? {
            Some(json) => serde_json::from_str(&json).map_err(AppError::internal)?,
            None => Vec::new(),
        };
        let jobs = match group_id {
            Some(group) => db
                .read()
                .fetch_all(
                    "SELECT id, image FROM jobs WHERE group_id = $1 ORDER BY id",
                    &[group.into()],
                )
                .await?
                .iter()
                .map(|j| {
                    Ok(SubmittedJob {
                        id: j.int(0)?.to_string(),
                        image: j.text(1)?,
                        waiting: None,
                    })
                })
                .collect::<AppResult<Vec<_>>>()?,
            None => Vec::new(),
        };
        files.push(PushFileView {
            file: file.text(0)?,
            group_id: group_id.map(|g| g.to_string()),
            jobs,
            errors,
        });
    }
    Ok(PushView {
        id: id.to_string(),
        repository: row.text(0)?,
        git_ref: row.text(1)?,
        commit: row.text(2)?,
        owner,
        via: row.text(4)?,
        created_at: row.int(5)?,
        files,
    })
}

/// The pushes with ids in `ids`, as `(id, repository, ref, commit)`.
pub async fn summaries(db: &Db, ids: &[i64]) -> AppResult<Vec<(i64, String, String, String)>> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let placeholders: Vec<String> = (1..=ids.len()).map(|i| format!("${i}")).collect();
    let sql = format!(
        "SELECT id, repository, git_ref, git_commit FROM pushes WHERE id IN ({})",
        placeholders.join(", ")
    );
    let args: Vec<Arg> = ids.iter().map(|id| (*id).into()).collect();
    db.read()
        .fetch_all(&sql, &args)
        .await?
        .iter()
        .map(|r| Ok((r.int(0)?, r.text(1)?, r.text(2)?, r.text(3)?)))
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::test_utils::{ALICE, BOB, Database, TestApp, on_both_databases};
    use axum::http::StatusCode;
    use serde_json::{Value, json};

    on_both_databases!(
        test_a_push_builds_each_manifest_of_its_commit_and_keeps_the_errors_of_the_others,
        test_a_rerun_keeps_its_push_and_names_its_original,
        test_a_push_recorded_meanwhile_is_not_recorded_twice,
    );

    /// Two calls for one push that both passed the check before the fetch: the second insert
    /// records nothing and queues nothing (it answers "built already").
    async fn test_a_push_recorded_meanwhile_is_not_recorded_twice(db: Database) {
        let app = TestApp::new(db).await;
        let push = |delivery: &str| NewPush {
            repository: "acme/app".into(),
            url: "/srv/git/app.git".into(),
            git_ref: "refs/heads/main".into(),
            commit: "a".repeat(40),
            owner: "admin".into(),
            via: "github",
            delivery: Some(delivery.into()),
            reports: false,
        };
        for (delivery, recorded) in [("d1", true), ("d1", false), ("d2", false)] {
            let row = push(delivery);
            let inserted = app
                .state
                .db
                .write(move |tx| Box::pin(async move { row.insert(tx, &[]).await }))
                .await
                .unwrap();
            assert_eq!(inserted.is_some(), recorded, "delivery {delivery}");
        }
    }

    /// A repository with `files` committed on main; its path and the commit.
    pub(crate) fn repository(files: &[(&str, &str)]) -> (tempfile::TempDir, String) {
        let dir = tempfile::tempdir().unwrap();
        let git = |args: &[&str]| crate::test_utils::git(dir.path(), args);
        git(&["init", "--quiet", "--initial-branch=main"]);
        for (path, text) in files {
            let path = dir.path().join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        }
        git(&["add", "."]);
        git(&["commit", "--quiet", "-m", "c"]);
        let commit = git(&["rev-parse", "HEAD"]);
        (dir, commit)
    }

    /// A repository whose one commit has a `.vmfarm.toml` (image `a`); its path and the commit.
    pub(crate) fn one_commit() -> (tempfile::TempDir, String) {
        repository(&[(".vmfarm.toml", GOOD)])
    }

    /// A server that builds pushes of `repo` (as `acme/app`, main and release/* branches) for
    /// user alice.
    async fn app_with(db: Database, repo: &std::path::Path) -> TestApp {
        let url = repo.display().to_string();
        let app = TestApp::with_config(db, |config| {
            config.repositories = vec![Repository {
                name: "acme/app".into(),
                url,
                owner: "alice".into(),
                forge: None,
                webhook_secret: None,
                branches: vec!["main".into(), "release/*".into()],
                tags: Vec::new(),
                pull_requests: true,
                status_token: None,
                status_api: None,
            }];
        })
        .await;
        crate::users::add(&app.state.db, "alice", "a long password", false)
            .await
            .unwrap();
        app
    }

    fn push(git_ref: &str, after: &str) -> String {
        json!({"repository": "acme/app", "git_ref": git_ref, "after": after}).to_string()
    }

    const GOOD: &str = "image = \"a\"\n[[tasks]]\nname = \"t\"\nscript = \"true\"\n";

    async fn test_a_push_builds_each_manifest_of_its_commit_and_keeps_the_errors_of_the_others(
        db: Database,
    ) {
        let (repo, commit) = repository(&[
            (".vmfarm/a.toml", GOOD),
            (
                ".vmfarm/b.toml",
                "image = \"a\"\nsecrets = [\"deploy\"]\n[[tasks]]\nname = \"t\"\nscript = \"true\"\n",
            ),
            (".vmfarm.toml", "image = \"a\"\ntasks = 3\n"),
            (".vmfarm/notes.md", "not a manifest"),
        ]);
        let app = app_with(db, repo.path()).await;

        let other = app
            .post("/api/pushes", BOB, push("refs/heads/main", &commit))
            .await;
        assert_eq!(other.status, StatusCode::NOT_FOUND, "{:?}", other.body);
        assert!(other.error().contains("no repository `acme/app`"));

        let built = app
            .post("/api/pushes", ALICE, push("refs/heads/main", &commit))
            .await;
        assert_eq!(built.status, StatusCode::CREATED, "{:?}", built.body);
        let files = built.body["push"]["files"].as_array().unwrap().clone();
        let names: Vec<&str> = files.iter().map(|f| f["file"].as_str().unwrap()).collect();
        assert_eq!(names, [".vmfarm.toml", ".vmfarm/a.toml", ".vmfarm/b.toml"]);
        assert_eq!(files[0]["errors"][0]["line"], 2, "{files:?}");
        assert_eq!(files[1]["jobs"][0]["image"], "a");
        assert!(files[1]["errors"].as_array().unwrap().is_empty());
        assert_eq!(
            (
                &files[2]["errors"][0]["line"],
                &files[2]["errors"][0]["column"]
            ),
            (&json!(2), &json!(12)),
            "the secret its owner may not use, where it is named: {files:?}"
        );
        assert!(files[2]["jobs"].as_array().unwrap().is_empty());

        let id: i64 = files[1]["jobs"][0]["id"].as_str().unwrap().parse().unwrap();
        let job = app.job(id).await;
        assert_eq!(job["owner"], "alice", "the repository's owner's job");
        assert_eq!(
            job["push"],
            json!({"push_id": built.body["push"]["id"], "repository": "acme/app",
                   "git_ref": "refs/heads/main", "commit": commit, "file": ".vmfarm/a.toml"})
        );
        let lease = app.lease("w0", "a").await;
        let checkout = lease.job.checkout.expect("the lease carries the commit");
        assert_eq!(checkout.url, repo.path().display().to_string());
        assert_eq!(checkout.commit, commit);

        for (git_ref, after, why) in [
            (
                "refs/heads/feature",
                commit.as_str(),
                "matches none of the repository's branches (main, release/*)",
            ),
            (
                "refs/tags/v1",
                commit.as_str(),
                "matches none of the repository's tags (none are configured)",
            ),
            ("refs/heads/main", &"0".repeat(40), "was deleted"),
        ] {
            let answer = app.post("/api/pushes", ALICE, push(git_ref, after)).await;
            assert_eq!(
                answer.status,
                StatusCode::OK,
                "{git_ref}: {:?}",
                answer.body
            );
            assert!(answer.body["push"].is_null());
            let ignored = answer.body["ignored"].as_str().unwrap_or_default();
            assert!(ignored.contains(why), "{git_ref}: {ignored}");
        }
        let long = format!("refs/heads/{}", "x".repeat(300));
        let answer = app.post("/api/pushes", ALICE, push(&long, &commit)).await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{:?}", answer.body);
        assert!(
            answer.error().contains("is not a ref name: 1 to 255 bytes"),
            "{}",
            answer.error()
        );
        assert!(
            answer.error().len() < 300,
            "the error shows only the start of the ref"
        );
        let bad = app
            .post("/api/pushes", ALICE, push("refs/heads/main", "main"))
            .await;
        assert_eq!(bad.status, StatusCode::BAD_REQUEST);
        assert!(
            bad.error().contains("not a full commit id"),
            "{}",
            bad.error()
        );
        let missing = app
            .post(
                "/api/pushes",
                ALICE,
                push("refs/heads/release/2", &"e".repeat(40)),
            )
            .await;
        assert_eq!(
            missing.status,
            StatusCode::BAD_GATEWAY,
            "{:?}",
            missing.body
        );
        assert!(
            missing.error().contains("cannot fetch commit"),
            "{}",
            missing.error()
        );
        let jobs = app.get("/api/jobs", ALICE).await;
        assert_eq!(
            jobs.body["jobs"].as_array().unwrap().len(),
            1,
            "nothing else was queued"
        );
    }

    #[test]
    fn test_a_pull_requests_manifest_may_not_name_secrets_local_folders_or_webhooks() {
        let mut manifest = vmfarm_proto::Manifest::parse(
            "image = \"a\"\nsecrets = [\"deploy\"]\n\
             [[sources]]\nurl = \"/srv/private\"\n\
             [[tasks]]\nname = \"t\"\nscript = \"true\"\n\
             [[triggers]]\non = \"always\"\nwebhook = \"https://example.org/hook\"\n",
        )
        .unwrap();
        manifest
            .check_out(&Checkout {
                url: "/srv/git/app.git".into(),
                commit: "a".repeat(40),
            })
            .unwrap();
        let errors = pull_request_refusals(&manifest);
        let messages: Vec<&str> = errors.iter().map(|e| e.message.as_str()).collect();
        assert_eq!(errors.len(), 3, "{messages:?}");
        assert_eq!((errors[0].line, errors[0].column), (2, 12), "at the secret");
        assert!(
            messages[1].contains("local folder `/srv/private`"),
            "{messages:?}"
        );
        assert!(messages[2].contains("[[triggers]]"), "{messages:?}");
        assert!(
            !messages.iter().any(|m| m.contains("app.git")),
            "the pushed repository itself is fine"
        );
    }

    /// The badge of acme/app's main branch, as SVG text.
    async fn badge(app: &TestApp) -> String {
        let answer = app.get("/badge/acme/app.svg?branch=main", ALICE).await;
        assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
        assert_eq!(answer.headers["content-type"], "image/svg+xml");
        answer.body.as_str().unwrap_or_default().to_owned()
    }

    #[tokio::test]
    async fn test_a_branchs_badge_shows_its_newest_push() {
        let (repo, commit) = one_commit();
        let app = app_with(Database::Sqlite, repo.path()).await;
        assert!(badge(&app).await.contains("vmfarm: no builds"));
        let built = app
            .post("/api/pushes", ALICE, push("refs/heads/main", &commit))
            .await;
        assert!(badge(&app).await.contains("vmfarm: running"));
        let id = built.body["push"]["files"][0]["jobs"][0]["id"]
            .as_str()
            .unwrap()
            .to_owned();
        app.post(&format!("/api/jobs/{id}/cancel"), ALICE, "").await;
        assert!(badge(&app).await.contains("vmfarm: cancelled"));
        // A rerun stands for the job it reruns.
        app.post(&format!("/api/jobs/{id}/rerun"), ALICE, "").await;
        assert!(badge(&app).await.contains("vmfarm: running"));
        let unknown = app.get("/badge/acme/other.svg", ALICE).await;
        assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    }

    async fn test_a_rerun_keeps_its_push_and_names_its_original(db: Database) {
        let (repo, commit) = one_commit();
        let app = app_with(db, repo.path()).await;
        let built = app
            .post("/api/pushes", ALICE, push("refs/heads/main", &commit))
            .await;
        let first = built.body["push"]["files"][0]["jobs"][0]["id"]
            .as_str()
            .unwrap()
            .to_owned();

        let theirs = app.post(&format!("/api/jobs/{first}/rerun"), BOB, "").await;
        assert_eq!(theirs.status, StatusCode::NOT_FOUND, "{:?}", theirs.body);
        assert_eq!(theirs.error(), format!("no job {first}"));

        let rerun = app
            .post(&format!("/api/jobs/{first}/rerun"), ALICE, "")
            .await;
        assert_eq!(rerun.status, StatusCode::CREATED, "{:?}", rerun.body);
        let id: i64 = rerun.body["jobs"][0]["id"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        let job: Value = app.job(id).await;
        assert_eq!(job["rerun_of"], first.as_str());
        assert_eq!(job["push"]["commit"], commit.as_str());
        assert_eq!(job["push"]["file"], ".vmfarm.toml");
        assert_ne!(
            job["group_id"],
            app.job(first.parse().unwrap()).await["group_id"]
        );
    }
}
