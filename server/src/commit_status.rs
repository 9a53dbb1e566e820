//! Commit statuses: each job a push made reports its state back to the pushed commit on the
//! forge (GitHub's statuses API, GitLab's commit status API, Forgejo's), `pending` when queued
//! and its result when it ends, with a link to its page. The token is a secret of the
//! repository's owner (`status_token` in `[[repositories]]`), read when a report is sent. Reports
//! are an outbox ([`crate::outbox`]): retried with backoff, and sent in order per status (a
//! result waits while an earlier report of the same status, its job's or a rerun's, is still
//! being tried).

use crate::config::Forge;
use crate::db::WriteTx;
use crate::error::AppResult;
use crate::outbox::{self, Caller, Outbox};
use crate::secrets::Withheld;
use crate::state::AppState;
use serde_json::json;
use vmfarm_proto::JobState;
use vmfarm_proto::api::JobPush;

/// A report waits while an earlier one of the same status (the same push, manifest file and
/// image: the job itself, or the job it reruns) is still being tried, so that the forge gets
/// them in order.
const OUTBOX: Outbox = Outbox {
    table: "status_reports",
    kind: "commit_status",
    columns: "o.report",
    wait_while: "EXISTS (SELECT 1 FROM status_reports e JOIN jobs ej ON ej.id = e.job_id \
                 JOIN jobs oj ON oj.id = o.job_id \
                 WHERE e.id < o.id AND e.state = 'pending' AND ej.push_id = oj.push_id \
                 AND ej.manifest_file = oj.manifest_file AND ej.image = oj.image)",
};

/// Queues a report of job `job_id`'s `state` (its queueing, or its end) in the transaction that
/// makes that state, when a push that reports statuses made the job.
pub async fn queue_in(tx: &mut WriteTx, job_id: i64, state: JobState, now: i64) -> AppResult<()> {
    tx.execute(
        "INSERT INTO status_reports (job_id, report, state, attempts, next_attempt_at, created_at) \
         SELECT j.id, $2, 'pending', 0, $3, $3 FROM jobs j JOIN pushes p ON p.id = j.push_id \
         WHERE j.id = $1 AND p.reports = 1",
        &[job_id.into(), state.as_str().into(), now.into()],
    )
    .await?;
    Ok(())
}

/// Sends every report that is due at `now`. Returns how many were tried.
pub async fn report_due(state: &AppState, caller: &Caller, now: i64) -> AppResult<usize> {
    outbox::deliver_due(state, &OUTBOX, now, |row| async move {
        let job_id = row.int(1)?;
        let reported: JobState = row.parsed(4)?;
        let job = crate::job_views::get(&state.db, job_id, &crate::access::Reach::All).await?;
        let Some(push) = &job.push else {
            return Ok((false, "the job was not pushed".to_owned()));
        };
        let Some(repo) = crate::pushes::repository(state, &push.repository) else {
            return Ok((
                false,
                format!("`{}` is no longer configured", push.repository),
            ));
        };
        let (Some(forge), Some(api), Some(token_name)) =
            (repo.forge, repo.status_api(), repo.status_token.as_deref())
        else {
            return Ok((
                false,
                "the repository no longer reports statuses".to_owned(),
            ));
        };
        let token = match crate::secrets::open_for(
            &mut state.db.read(),
            &state.secret_key,
            token_name,
            &repo.owner,
        )
        .await?
        {
            Ok(token) => String::from_utf8_lossy(&token).trim().to_owned(),
            Err(Withheld::NotUsable) => {
                return Ok((
                    false,
                    format!("`{token_name}` is not a secret of user `{}`", repo.owner),
                ));
            }
            Err(Withheld::Unopened) => {
                return Ok((
                    false,
                    format!("the secret `{token_name}` does not open with this server's key"),
                ));
            }
        };
        let call = StatusCall {
            forge,
            api,
            repository: &repo.name,
            commit: &push.commit,
            state: forge_state(forge, reported),
            description: format!("job {} {}", job.id, reported.as_str()),
            context: context(push, &job.image),
            link: state.config.public_link(&format!("/jobs/{job_id}")),
            token,
        };
        let (url, request) = call.request(caller);
        Ok(caller.send(&url, request).await)
    })
    .await
}

/// The status's name on the forge: `vmfarm/FILE/IMAGE` (`vmfarm/IMAGE` for `.vmfarm.toml`).
fn context(push: &JobPush, image: &str) -> String {
    match push
        .file
        .strip_prefix(".vmfarm/")
        .and_then(|f| f.strip_suffix(".toml"))
    {
        Some(stem) => format!("vmfarm/{stem}/{image}"),
        None => format!("vmfarm/{image}"),
    }
}

/// The forge's word for a job's state.
fn forge_state(forge: Forge, state: JobState) -> &'static str {
    match (forge, state) {
        (_, JobState::Succeeded) => "success",
        (Forge::Gitlab, JobState::Cancelled) => "canceled",
        (Forge::Gitlab, s) if s.is_terminal() => "failed",
        (Forge::Gitlab, JobState::Running | JobState::Booting) => "running",
        (_, JobState::Failed | JobState::TimedOut) => "failure",
        (_, s) if s.is_terminal() => "error",
        _ => "pending",
    }
}

/// One status for the forge.
struct StatusCall<'a> {
    forge: Forge,
    api: &'a str,
    /// The repository as the forge names it.
    repository: &'a str,
    commit: &'a str,
    state: &'static str,
    description: String,
    context: String,
    link: String,
    token: String,
}

impl StatusCall<'_> {
    /// The call that sets the status: its URL and request.
    fn request(&self, caller: &Caller) -> (String, reqwest::RequestBuilder) {
        let (api, commit) = (self.api, self.commit);
        match self.forge {
            Forge::Github | Forge::Forgejo => {
                let url = format!("{api}/repos/{}/statuses/{commit}", self.repository);
                let auth = match self.forge {
                    Forge::Github => format!("Bearer {}", self.token),
                    _ => format!("token {}", self.token),
                };
                let body = json!({"state": self.state, "target_url": self.link,
                                  "description": self.description, "context": self.context});
                let request = caller
                    .http
                    .post(&url)
                    .header("authorization", auth)
                    .header("accept", "application/json")
                    .json(&body);
                (url, request)
            }
            Forge::Gitlab => {
                let url = format!(
                    "{api}/projects/{}/statuses/{commit}",
                    percent_encoded(self.repository)
                );
                let body = json!({"state": self.state, "target_url": self.link,
                                  "description": self.description, "name": self.context});
                let request = caller
                    .http
                    .post(&url)
                    .header("private-token", &self.token)
                    .json(&body);
                (url, request)
            }
        }
    }
}

/// `group/project` as one path segment (`group%2Fproject`), as GitLab's API names projects.
fn percent_encoded(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            other => format!("%{other:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Repository;
    use crate::forges::sign;
    use crate::secrets::{self, NewSecret};
    use crate::test_utils::{ADMIN, Database, TestApp, on_both_databases};
    use axum::body::Body;
    use axum::http::Method;
    use serde_json::Value;
    use std::sync::{Arc, Mutex};

    on_both_databases!(test_a_pushed_job_reports_pending_then_its_result_to_the_commit);

    /// A stand-in for the forge's API on loopback: records each call (path, authorization,
    /// body), answering `statuses` in turn (then 201).
    async fn forge_api(statuses: Vec<u16>) -> (String, Arc<Mutex<Vec<(String, String, Value)>>>) {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let seen = calls.clone();
        let answers = Arc::new(Mutex::new(statuses));
        let app = axum::Router::new().fallback(
            move |uri: axum::http::Uri, headers: axum::http::HeaderMap, body: String| {
                let seen = seen.clone();
                let answers = answers.clone();
                async move {
                    let auth = headers
                        .get("authorization")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_owned();
                    let body = serde_json::from_str(&body).unwrap_or(Value::Null);
                    seen.lock()
                        .unwrap()
                        .push((uri.path().to_owned(), auth, body));
                    let mut answers = answers.lock().unwrap();
                    let status = if answers.is_empty() {
                        201
                    } else {
                        answers.remove(0)
                    };
                    axum::http::StatusCode::from_u16(status).unwrap()
                }
            },
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move { axum::serve(listener, app).await });
        (format!("http://127.0.0.1:{port}/api/v3"), calls)
    }

    async fn test_a_pushed_job_reports_pending_then_its_result_to_the_commit(db: Database) {
        let (repo, commit) = crate::pushes::tests::one_commit();
        // The forge fails the first call: the report is tried again, and the result waits for it.
        let (api, calls) = forge_api(vec![502]).await;
        let url = repo.path().display().to_string();
        let app = TestApp::with_config(db, |c| {
            c.public_url = Some("https://farm.example.org/".into());
            c.triggers.allow_private = vec!["127.0.0.0/8".parse().unwrap()];
            c.triggers.first_retry = vmfarm_proto::units::HumanDuration(std::time::Duration::ZERO);
            c.repositories = vec![Repository {
                name: "acme/app".into(),
                url,
                owner: "admin".into(),
                forge: Some(Forge::Github),
                webhook_secret: Some("the hook secret of acme".into()),
                branches: vec!["*".into()],
                tags: Vec::new(),
                pull_requests: false,
                status_token: Some("github-status".into()),
                status_api: Some(api.clone()),
            }];
        })
        .await;
        let new = NewSecret {
            name: "github-status",
            owner: "admin",
            shared_with: &[],
            value: b"ghp_token\n",
        };
        secrets::set(&app.state.db, &app.state.secret_key, &new)
            .await
            .unwrap();
        let payload = serde_json::json!({"ref": "refs/heads/main", "after": commit,
                                         "repository": {"full_name": "acme/app"}});
        let body = payload.to_string();
        let answer = app
            .call(
                Method::POST,
                "/api/hooks/github",
                None,
                &[
                    ("x-github-event", "push".to_owned()),
                    ("x-github-delivery", "1".to_owned()),
                    (
                        "x-hub-signature-256",
                        format!(
                            "sha256={}",
                            sign(body.as_bytes(), "the hook secret of acme")
                        ),
                    ),
                ],
                Body::from(body),
            )
            .await;
        let id = answer.body["push"]["files"][0]["jobs"][0]["id"]
            .as_str()
            .unwrap()
            .to_owned();
        app.post(&format!("/api/jobs/{id}/cancel"), ADMIN, "").await;
        let caller = Caller::new(&app.state.config.triggers).unwrap();
        // The pending report fails once; the cancelled one waits behind it, then both go.
        for _ in 0..3 {
            report_due(&app.state, &caller, crate::db::now_ms() + 1)
                .await
                .unwrap();
        }
        let calls = calls.lock().unwrap().clone();
        let path = format!("/api/v3/repos/acme/app/statuses/{commit}");
        let states: Vec<&str> = calls
            .iter()
            .map(|c| c.2["state"].as_str().unwrap())
            .collect();
        assert_eq!(states, ["pending", "pending", "error"], "{calls:?}");
        for (called, auth, body) in &calls {
            assert_eq!(called, &path);
            assert_eq!(auth, "Bearer ghp_token");
            assert_eq!(body["context"], "vmfarm/a");
            assert_eq!(
                body["target_url"],
                format!("https://farm.example.org/jobs/{id}")
            );
        }
        assert_eq!(calls[2].2["description"], format!("job {id} cancelled"));
    }

    #[test]
    fn test_each_forge_gets_its_own_words_for_a_result() {
        assert_eq!(forge_state(Forge::Github, JobState::Succeeded), "success");
        assert_eq!(forge_state(Forge::Github, JobState::TimedOut), "failure");
        assert_eq!(forge_state(Forge::Forgejo, JobState::Error), "error");
        assert_eq!(forge_state(Forge::Gitlab, JobState::Cancelled), "canceled");
        assert_eq!(forge_state(Forge::Gitlab, JobState::Failed), "failed");
        assert_eq!(forge_state(Forge::Gitlab, JobState::Queued), "pending");
        assert_eq!(percent_encoded("group/sub.project"), "group%2Fsub.project");
    }
}
