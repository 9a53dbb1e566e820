//! What users do to jobs: submit them and cancel them. Reading them is [`crate::job_views`].

use crate::access::{Reach, Submitter};
use crate::db::{Query, WriteTx, now_ms};
use crate::error::{AppError, AppResult};
use crate::job_end::{End, Ended, EndedBy, Seen, end_job};
use crate::state::AppState;
use vmfarm_proto::api::{JobView, SubmitResponse, SubmittedJob};
use vmfarm_proto::manifest::PACKAGES_TASK;
use vmfarm_proto::network::HostPattern;
use vmfarm_proto::{JobState, Manifest, ManifestError, ManifestErrors, TaskState};

/// Validates and enqueues a manifest for `submitter`: one job per image, in one group.
pub async fn submit(
    state: &AppState,
    text: &str,
    schedule: Option<&str>,
    submitter: &Submitter,
) -> AppResult<SubmitResponse> {
    let new = prepare(state, text, schedule, submitter)?;
    let mut response = state
        .db
        .write(move |tx| Box::pin(async move { new.insert(tx, &Origin::default()).await }))
        .await?;
    queued(state, response.jobs.len());
    crate::workers::say_waiting(&state.db, &mut response.jobs).await;
    Ok(response)
}

/// Reruns job `id` (within `reach`) for `submitter`: its manifest again, on its image, in a
/// group of its own, from the same push (repository, commit and file) when a push made it, and
/// linked to it (`rerun_of`).
pub async fn rerun(
    state: &AppState,
    id: i64,
    reach: &Reach,
    submitter: &Submitter,
) -> AppResult<SubmitResponse> {
    crate::access::job(&state.db, reach, id).await?;
    let row = state
        .db
        .read()
        .fetch_optional(
            "SELECT manifest, image, push_id, manifest_file FROM jobs WHERE id = $1",
            &[id.into()],
        )
        .await?
        .ok_or_else(|| AppError::NotFound(format!("no job {id}")))?;
    let mut new = prepare(state, &row.text(0)?, None, submitter)?;
    new.images = vec![row.text(1)?];
    let origin = Origin {
        push: match (row.opt_int(2)?, row.opt_text(3)?) {
            (Some(push_id), Some(file)) => Some((push_id, file)),
            _ => None,
        },
        rerun_of: Some(id),
    };
    let mut response = state
        .db
        .write(move |tx| Box::pin(async move { new.insert(tx, &origin).await }))
        .await?;
    queued(state, response.jobs.len());
    crate::workers::say_waiting(&state.db, &mut response.jobs).await;
    // A pushed job's rerun reports its status too.
    crate::outbox::wake(state);
    Ok(response)
}

/// After jobs were queued and committed: counted, and the workers waiting for work woken.
pub fn queued(state: &AppState, jobs: usize) {
    state.metrics.jobs_submitted(jobs);
    state.events.new_work();
}

/// Checks a manifest for `submitter` and makes the group it would queue (written by
/// [`NewGroup::insert`]).
pub fn prepare(
    state: &AppState,
    text: &str,
    schedule: Option<&str>,
    submitter: &Submitter,
) -> AppResult<NewGroup> {
    let limit = state.config.limits.max_manifest_size;
    if text.len() as u64 > limit.0 {
        return Err(AppError::TooLarge(format!(
            "the manifest is {} bytes; the limit is {limit}",
            text.len()
        )));
    }
    let mut manifest = parse_manifest(state, text, submitter)?;
    if let Some(name) = schedule {
        let tag = format!("scheduled:{name}");
        if !manifest.tags.contains(&tag) {
            manifest.tags.push(tag);
        }
    }
    let timeout = manifest
        .timeout
        .unwrap_or(state.config.limits.default_job_timeout.0);
    Ok(NewGroup {
        text: text.to_owned(),
        owner: submitter.user.clone(),
        max_queued: state.config.limits.max_queued_per_user,
        lock_owner_sql: lock_owner_sql(&state.db),
        schedule: schedule.map(str::to_owned),
        tags_json: serde_json::to_string(&manifest.tags).map_err(AppError::internal)?,
        // The secrets' names and the triggers are kept beside the manifest, so that a lease and
        // the job's end need not parse it again.
        secrets_json: serde_json::to_string(&manifest.secret_names())
            .map_err(AppError::internal)?,
        triggers_json: serde_json::to_string(&manifest.triggers).map_err(AppError::internal)?,
        caches: manifest
            .caches
            .iter()
            .map(|c| c.name.as_str())
            .collect::<Vec<_>>()
            .join(" "),
        timeout_ms: i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX),
        images: manifest.images.clone(),
        manifest,
    })
}

/// Where a group's jobs come from beyond their manifest.
#[derive(Debug, Clone, Default)]
pub struct Origin {
    /// The push and the manifest file of its commit.
    pub push: Option<(i64, String)>,
    /// The job they rerun.
    pub rerun_of: Option<i64>,
}

/// Parses and validates a manifest, and checks it against this server's policy (its `[network]
/// allow`) and what `submitter` may ask for (its priority cap): what submit and a schedule's
/// creation accept. Whether it may name its secrets is checked where it is stored.
pub fn parse_manifest(state: &AppState, text: &str, submitter: &Submitter) -> AppResult<Manifest> {
    let manifest = Manifest::parse(text).map_err(AppError::Manifest)?;
    check_network_policy(&manifest, &state.config.network.allow).map_err(AppError::Manifest)?;
    check_priority_cap(&manifest, submitter.max_priority).map_err(AppError::Manifest)?;
    Ok(manifest)
}

/// Refuses a priority above the submitter's cap, where the manifest writes it (at its top when
/// it writes none and the cap is below the default 0).
fn check_priority_cap(manifest: &Manifest, cap: Option<i64>) -> Result<(), ManifestErrors> {
    let Some(cap) = cap.filter(|cap| manifest.priority > *cap) else {
        return Ok(());
    };
    let (at, written) = match manifest.priority_at {
        Some(at) => (at, String::new()),
        None => (
            vmfarm_proto::manifest::At { line: 1, column: 1 },
            " (not written: the default)".to_owned(),
        ),
    };
    Err(ManifestErrors(vec![ManifestError {
        line: at.line,
        column: at.column,
        message: format!(
            "`priority` is {}{written}; your token allows at most {cap}: write `priority = {cap}` or lower, or ask the operator",
            manifest.priority
        ),
    }]))
}

/// Refuses each `[network] allow` pattern of `manifest` that no pattern of the operator's
/// `policy` covers, at the pattern's line and column.
fn check_network_policy(manifest: &Manifest, policy: &[HostPattern]) -> Result<(), ManifestErrors> {
    let Some(network) = &manifest.network else {
        return Ok(());
    };
    let errors: Vec<ManifestError> = network
        .allow
        .iter()
        .filter(|wanted| !policy.iter().any(|p| p.covers(&wanted.pattern)))
        .map(|wanted| ManifestError {
            line: wanted.line,
            column: wanted.column,
            message: format!(
                "`{}` is not allowed by this server's network policy (allow = {}): ask the operator or remove it",
                wanted.pattern,
                policy_text(policy)
            ),
        })
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(ManifestErrors(errors))
    }
}

/// The operator's `allow` as written in the server's config: `["*.internal.example"]`.
fn policy_text(policy: &[HostPattern]) -> String {
    let quoted: Vec<String> = policy.iter().map(|p| format!("\"{p}\"")).collect();
    format!("[{}]", quoted.join(", "))
}

/// The statement that reads an owner's (`$1`) `job_owners` row and, where the database can,
/// holds it to the end of the transaction: what the per-user limits count under.
pub(crate) fn lock_owner_sql(db: &crate::db::Db) -> String {
    format!(
        "SELECT owner FROM job_owners WHERE owner = $1{}",
        db.for_update()
    )
}

/// A valid manifest about to be queued: one job per image, in one group.
pub struct NewGroup {
    text: String,
    owner: String,
    /// The per-user queue limit (`None`: none).
    max_queued: Option<u64>,
    /// Reads the owner's `job_owners` row, held to the end of the transaction where the
    /// database can.
    lock_owner_sql: String,
    schedule: Option<String>,
    manifest: Manifest,
    /// The images it runs on: the manifest's, or the one a rerun takes.
    images: Vec<String>,
    tags_json: String,
    secrets_json: String,
    triggers_json: String,
    /// The names of its `[[caches]]`, space-separated ([`crate::leases::affinity`]).
    caches: String,
    timeout_ms: i64,
}

impl NewGroup {
    /// The names of each job's task rows, in order: the packages step first when the manifest
    /// has `packages` (the worker reports it like a task), then the manifest's tasks.
    fn task_rows(&self) -> impl Iterator<Item = &str> {
        let packages = (!self.manifest.packages.is_empty()).then_some(PACKAGES_TASK);
        packages
            .into_iter()
            .chain(self.manifest.tasks.iter().map(|t| t.name.as_str()))
    }

    /// Refuses (429) a group that would take its owner past the per-user queue limit. The
    /// owner's row is held first, so that concurrent submits (PostgreSQL) count one after the
    /// other.
    async fn check_queue_room(&self, tx: &mut WriteTx) -> AppResult<()> {
        let Some(limit) = self.max_queued else {
            return Ok(());
        };
        tx.fetch_optional(&self.lock_owner_sql, &[(&self.owner).into()])
            .await?;
        let queued = tx
            .fetch_optional(
                "SELECT COUNT(*) FROM jobs WHERE state = 'queued' AND owner = $1",
                &[(&self.owner).into()],
            )
            .await?
            .map(|row| row.int(0))
            .transpose()?
            .unwrap_or(0);
        let adding = self.images.len() as u64;
        if u64::try_from(queued).unwrap_or(0) + adding > limit {
            return Err(AppError::TooMany(format!(
                "user `{}` has {queued} jobs queued and this adds {adding}; the limit is {limit} \
                 (max_queued_per_user): wait for some to start",
                self.owner
            )));
        }
        Ok(())
    }

    /// The manifest it queues, as parsed.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Writes the group and its jobs in `tx`; a manifest naming secrets its owner may not use
    /// is refused here ([`AppError::Manifest`]) before anything is written.
    pub async fn insert(&self, tx: &mut WriteTx, origin: &Origin) -> AppResult<SubmitResponse> {
        crate::secrets::check_usable(tx, &self.manifest.secrets, &self.owner).await?;
        // The owner takes part in the lease's turns from its first job on.
        tx.execute(
            "INSERT INTO job_owners (owner) VALUES ($1) ON CONFLICT (owner) DO NOTHING",
            &[(&self.owner).into()],
        )
        .await?;
        self.check_queue_room(tx).await?;
        let now = now_ms();
        let group_id = tx
            .fetch_optional(
                "INSERT INTO job_groups (created_at, schedule, owner) VALUES ($1, $2, $3) RETURNING id",
                &[now.into(), self.schedule.as_deref().into(), (&self.owner).into()],
            )
            .await?
            .ok_or_else(|| AppError::internal("INSERT ... RETURNING gave no row"))?
            .int(0)?;
        let mut jobs = Vec::with_capacity(self.images.len());
        let (push_id, file) = match &origin.push {
            Some((id, file)) => (Some(*id), Some(file.as_str())),
            None => (None, None),
        };
        for image in &self.images {
            let id = tx
                .fetch_optional(
                    "INSERT INTO jobs (group_id, image, state, priority, manifest, tags, secrets, triggers, \
                     timeout_ms, created_at, owner, push_id, manifest_file, rerun_of, caches) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15) \
                     RETURNING id",
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
                        (&self.owner).into(),
                        push_id.into(),
                        file.into(),
                        origin.rerun_of.into(),
                        (&self.caches).into(),
                    ],
                )
                .await?
                .ok_or_else(|| AppError::internal("INSERT ... RETURNING gave no row"))?
                .int(0)?;
            if push_id.is_some() {
                crate::commit_status::queue_in(tx, id, JobState::Queued, now).await?;
            }
            for tag in &self.manifest.tags {
                tx.execute(
                    "INSERT INTO job_tags (job_id, tag) VALUES ($1, $2)",
                    &[id.into(), tag.into()],
                )
                .await?;
            }
            for (idx, name) in self.task_rows().enumerate() {
                tx.execute(
                    "INSERT INTO tasks (job_id, idx, name, state) VALUES ($1, $2, $3, $4)",
                    &[
                        id.into(),
                        (idx as i64).into(),
                        name.into(),
                        TaskState::Pending.as_str().into(),
                    ],
                )
                .await?;
            }
            jobs.push(SubmittedJob {
                id: id.to_string(),
                image: image.clone(),
                waiting: None,
            });
        }
        Ok(SubmitResponse {
            group_id: group_id.to_string(),
            jobs,
        })
    }
}

/// Cancels a job within `reach`: a queued one ends at once; a leased or running one is told at
/// its worker's next heartbeat; a finished one cannot be cancelled.
pub async fn cancel(state: &AppState, id: i64, reach: &Reach) -> AppResult<JobView> {
    crate::access::job(&state.db, reach, id).await?;
    let now = now_ms();
    let ended = state
        .db
        .write(move |tx| Box::pin(async move { cancel_in(tx, id, now).await }))
        .await?;
    if let Some(ended) = ended {
        crate::job_end::ended(state, &ended);
    }
    state.events.job_changed(id);
    crate::job_views::get(&state.db, id, reach).await
}

/// [`cancel`] in its transaction: the job's end, if it ended now (it was queued).
async fn cancel_in(tx: &mut WriteTx, id: i64, now: i64) -> AppResult<Option<Ended>> {
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
            Ok(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::schedules::{NewSchedule, Source};
    use crate::test_utils::{ADMIN, Answer, Database, TestApp, on_both_databases};
    use axum::body::Body;
    use axum::http::{Method, StatusCode};
    use serde_json::{Value, json};
    use vmfarm_proto::network::AddressRange;
    use vmfarm_proto::{JobState, TaskState};

    on_both_databases!(
        test_a_pattern_outside_the_policy_is_refused_where_it_is_written,
        test_the_default_policy_allows_public_hosts_on_80_and_443,
        test_a_schedule_outside_the_policy_is_refused,
        test_packages_are_the_first_task_row,
        test_a_failed_packages_step_skips_the_tasks,
        test_the_lease_carries_the_operators_private_ranges,
    );

    /// A manifest asking for `pypi.org` (line 4, column 10) and `build.internal.example` (line 4,
    /// column 22), with packages.
    const NETWORK: &str = "image = \"a\"\npackages = [\"zlib1g-dev\"]\n[network]\n\
                           allow = [\"pypi.org\", \"build.internal.example\"]\n\
                           [[tasks]]\nname = \"build\"\nscript = \"true\"\n\
                           [[tasks]]\nname = \"test\"\nscript = \"true\"\n";

    async fn post(app: &TestApp, manifest: &str) -> Answer {
        app.call(
            Method::POST,
            "/api/jobs",
            Some(ADMIN),
            &[],
            Body::from(manifest.to_owned()),
        )
        .await
    }

    fn task_names(job: &Value) -> Vec<(String, String)> {
        job["tasks"]
            .as_array()
            .expect("tasks")
            .iter()
            .map(|t| {
                (
                    t["name"].as_str().unwrap_or_default().to_owned(),
                    t["state"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect()
    }

    async fn test_a_pattern_outside_the_policy_is_refused_where_it_is_written(db: Database) {
        let app = TestApp::with_config(db, |c| {
            c.network.allow = vec!["*.internal.example".parse().unwrap()];
        })
        .await;
        let answer = post(&app, NETWORK).await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{:?}", answer.body);
        assert_eq!(answer.error(), "invalid manifest");
        assert_eq!(
            answer.body["manifest_errors"],
            json!([{
                "line": 4,
                "column": 10,
                "message": "`pypi.org` is not allowed by this server's network policy \
                            (allow = [\"*.internal.example\"]): ask the operator or remove it",
            }]),
            "only pypi.org is outside; build.internal.example is under *.internal.example"
        );
        let listed = app.get("/api/jobs", ADMIN).await;
        assert_eq!(listed.body["jobs"], json!([]), "nothing was queued");

        let allowed = NETWORK.replace("\"pypi.org\", ", "");
        assert_eq!(app.submit(&allowed).await.len(), 1);

        let closed = TestApp::with_config(db, |c| c.network.allow = Vec::new()).await;
        let answer = post(&closed, NETWORK).await;
        let errors = answer.body["manifest_errors"].as_array().unwrap().clone();
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert_eq!(
            (&errors[1]["line"], &errors[1]["column"]),
            (&json!(4), &json!(22))
        );
        assert!(
            errors[1]["message"]
                .as_str()
                .unwrap()
                .contains("`build.internal.example` is not allowed by this server's network policy (allow = [])"),
            "{errors:?}"
        );
        let no_network = "image = \"a\"\n[[tasks]]\nname = \"t\"\nscript = \"true\"\n";
        assert_eq!(
            closed.submit(no_network).await.len(),
            1,
            "a job without [network] needs no policy"
        );
    }

    async fn test_the_default_policy_allows_public_hosts_on_80_and_443(db: Database) {
        let app = TestApp::new(db).await;
        let any = "image = \"a\"\n[network]\nallow = [\"*\", \"pypi.org\", \"*.crates.io:443\"]\n\
                   [[tasks]]\nname = \"t\"\nscript = \"true\"\n";
        assert_eq!(app.submit(any).await.len(), 1);
        let port = "image = \"a\"\n[network]\nallow = [\"git.example.org:8080\"]\n\
                    [[tasks]]\nname = \"t\"\nscript = \"true\"\n";
        let answer = post(&app, port).await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST);
        let error = &answer.body["manifest_errors"][0];
        assert_eq!((&error["line"], &error["column"]), (&json!(3), &json!(10)));
        assert!(
            error["message"]
                .as_str()
                .unwrap()
                .contains("`git.example.org:8080` is not allowed by this server's network policy (allow = [\"*\"])"),
            "{error}"
        );
    }

    async fn test_a_schedule_outside_the_policy_is_refused(db: Database) {
        let app = TestApp::with_config(db, |c| {
            c.network.allow = vec!["*.internal.example".parse().unwrap()];
        })
        .await;
        let schedule = NewSchedule {
            name: "nightly".into(),
            cron: "0 3 * * *".into(),
            timezone: None,
            manifest: NETWORK.into(),
        };
        let admin = crate::access::Submitter::uncapped("admin");
        let reach = crate::access::Reach::All;
        let err = crate::schedules::save(&app.state, &schedule, Source::Ui, 0, &admin, &reach)
            .await
            .unwrap_err();
        match err {
            crate::error::AppError::Manifest(errors) => {
                assert_eq!((errors.0[0].line, errors.0[0].column), (4, 10));
            }
            other => panic!("expected a manifest error, got {other:?}"),
        }
    }

    async fn test_packages_are_the_first_task_row(db: Database) {
        let app = TestApp::new(db).await;
        let id = app.submit(NETWORK).await[0];
        let pending = |names: &[&str]| -> Vec<(String, String)> {
            names
                .iter()
                .map(|n| (n.to_string(), "pending".to_owned()))
                .collect()
        };
        assert_eq!(
            task_names(&app.job(id).await),
            pending(&["packages", "build", "test"])
        );
        let lease = app.lease("w0", "a").await;
        app.start("w0", &lease).await;
        for name in ["packages", "build", "test"] {
            app.move_task("w0", &lease, name, TaskState::Running, None)
                .await;
            app.move_task("w0", &lease, name, TaskState::Succeeded, Some(0))
                .await;
        }
        app.move_job("w0", &lease, JobState::Succeeded).await;
        let job = app.job(id).await;
        assert_eq!(job["state"], "succeeded");
        assert_eq!(task_names(&job)[0], ("packages".into(), "succeeded".into()));

        let plain = app
            .submit("image = \"a\"\npackages = []\n[[tasks]]\nname = \"t\"\nscript = \"true\"\n")
            .await[0];
        assert_eq!(
            task_names(&app.job(plain).await),
            pending(&["t"]),
            "no packages, no packages step"
        );
    }

    async fn test_a_failed_packages_step_skips_the_tasks(db: Database) {
        let app = TestApp::new(db).await;
        let id = app.submit(NETWORK).await[0];
        let lease = app.lease("w0", "a").await;
        app.start("w0", &lease).await;
        app.move_task("w0", &lease, "packages", TaskState::Running, None)
            .await;
        app.move_task("w0", &lease, "packages", TaskState::Failed, Some(100))
            .await;
        app.move_job("w0", &lease, JobState::Failed).await;
        let job = app.job(id).await;
        assert_eq!(job["state"], "failed");
        assert_eq!(
            task_names(&job),
            [
                ("packages".to_owned(), "failed".to_owned()),
                ("build".to_owned(), "skipped".to_owned()),
                ("test".to_owned(), "skipped".to_owned()),
            ]
        );
        assert_eq!(job["tasks"][0]["exit_code"], 100);
    }

    async fn test_the_lease_carries_the_operators_private_ranges(db: Database) {
        let app = TestApp::with_config(db, |c| {
            c.network.allow_private =
                vec!["127.0.0.0/8".parse().unwrap(), "fd00::/8".parse().unwrap()];
        })
        .await;
        app.submit(NETWORK).await;
        let lease = app.lease("w0", "a").await;
        let want: Vec<AddressRange> =
            vec!["127.0.0.0/8".parse().unwrap(), "fd00::/8".parse().unwrap()];
        assert_eq!(lease.network.allow_private, want);

        let plain = TestApp::new(db).await;
        plain.submit(NETWORK).await;
        let lease = plain.lease("w0", "a").await;
        assert!(
            lease.network.allow_private.is_empty(),
            "none by default: {:?}",
            lease.network
        );
    }
}
