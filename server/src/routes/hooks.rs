//! `POST /api/hooks/{github,gitlab,forgejo}`: forges' webhooks. A call is read
//! ([`crate::forges::read`]), its repository looked up among those configured for that forge,
//! its signature checked with that repository's secret, and only then acted on: a push or pull
//! request builds ([`crate::pushes::build`]); a ping and events that build nothing are answered
//! with what was done (`200`, `ignored`). A delivery id seen before builds nothing.

use crate::config::Forge;
use crate::error::{AppError, AppResult};
use crate::forges::{self, Event, HookError};
use crate::pushes::{self, Push};
use crate::state::AppState;
use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use vmfarm_proto::api::{ErrorBody, PushAnswer};

/// The largest payload taken (GitHub caps its own at 25 MB; a push's is far smaller).
const MAX_PAYLOAD: usize = 5 << 20;

/// `POST /api/hooks/{forge}`: `github`, `gitlab` or `forgejo` (Forgejo's and Gitea's calls).
#[utoipa::path(
    post, path = "/api/hooks/{forge}", tag = "pushes",
    params(("forge" = String, Path, description = "`github`, `gitlab` or `forgejo` (Forgejo and Gitea)")),
    request_body(content = Object, content_type = "application/json", description = "The forge's push or pull request event, signed (GitHub, Forgejo: HMAC of the repository's webhook secret) or with the token (GitLab)"),
    responses(
        (status = 200, description = "Why the event built nothing (a branch that does not build, a deleted ref, another event)", body = PushAnswer),
        (status = 201, description = "What the event built: a group per manifest file of the commit", body = PushAnswer),
        (status = 400, description = "A payload that is not the forge's event", body = ErrorBody),
        (status = 401, description = "A bad signature or token", body = ErrorBody),
        (status = 404, description = "No such forge, or no repository of that name for it", body = ErrorBody),
        (status = 409, description = "The repository's owner is not a user of the server", body = ErrorBody),
        (status = 413, description = "A payload over the server's limit", body = ErrorBody),
        (status = 502, description = "The commit's manifests could not be fetched from the repository", body = ErrorBody),
    ),
    security(()),
)]
pub async fn take(
    State(state): State<AppState>,
    Path(forge): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> AppResult<(StatusCode, Json<PushAnswer>)> {
    let forge = match forge.as_str() {
        "github" => Forge::Github,
        "gitlab" => Forge::Gitlab,
        "forgejo" => Forge::Forgejo,
        other => {
            return Err(AppError::NotFound(format!(
                "no webhook for `{other}`: the forges are github, gitlab and forgejo (Gitea's too)"
            )));
        }
    };
    take_from(&state, forge, headers, body).await
}

async fn take_from(
    state: &AppState,
    forge: Forge,
    headers: HeaderMap,
    body: Body,
) -> AppResult<(StatusCode, Json<PushAnswer>)> {
    let body = axum::body::to_bytes(body, MAX_PAYLOAD).await.map_err(|_| {
        AppError::TooLarge(format!("the payload is over {} MiB", MAX_PAYLOAD >> 20))
    })?;
    let refused = |e: HookError| match e {
        HookError::Malformed(why) => AppError::BadRequest(why),
        other => AppError::BadSignature(other.to_string()),
    };
    let delivery = forges::read(forge, &headers, &body).map_err(refused)?;
    let repository = state
        .config
        .repositories
        .iter()
        .find(|r| r.name == delivery.repository && r.forge == Some(forge))
        .ok_or_else(|| {
            AppError::NotFound(format!(
                "no repository `{}` takes {} webhooks here: the server's [[repositories]] names \
                 it with forge = \"{}\"",
                delivery.repository,
                forge.as_str(),
                forge.as_str()
            ))
        })?;
    let secret = repository
        .webhook_secret
        .as_deref()
        .ok_or_else(|| AppError::internal("a forge repository without a webhook secret"))?;
    forges::verify(forge, &headers, &body, secret).map_err(refused)?;
    let (git_ref, commit) = match delivery.event {
        Event::Ping => {
            return Ok(answered(format!(
                "ping: this server builds pushes of {}",
                repository.name
            )));
        }
        Event::Other(what) => {
            return Ok(answered(format!("{what} events build nothing")));
        }
        Event::Push { git_ref, after } => (git_ref, after),
        Event::PullRequest { git_ref, head } => (git_ref, head),
    };
    let push = Push {
        repository,
        git_ref,
        commit,
        via: forge.as_str(),
        delivery: Some(delivery.id),
        max_priority: None,
    };
    Ok(pushes::answer(pushes::build(state, push).await?))
}

fn answered(why: String) -> (StatusCode, Json<PushAnswer>) {
    pushes::answer(PushAnswer {
        push: None,
        ignored: Some(why),
    })
}

#[cfg(test)]
mod tests {
    use crate::config::{Forge, Repository};
    use crate::forges::sign;
    use crate::test_utils::{ADMIN, Answer, Database, TestApp, on_both_databases};
    use axum::body::Body;
    use axum::http::{Method, StatusCode};
    use serde_json::Value;

    on_both_databases!(test_each_forges_documented_push_builds_once_and_only_when_signed);

    /// A payload from tests/fixtures/forges (each forge's published example).
    fn fixture(name: &str) -> Value {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/forges/");
        let text = std::fs::read_to_string(format!("{path}{name}")).unwrap();
        serde_json::from_str(&text).unwrap()
    }

    fn repository(name: &str, forge: Forge, secret: &str, url: &str) -> Repository {
        Repository {
            name: name.into(),
            url: url.into(),
            owner: "admin".into(),
            forge: Some(forge),
            webhook_secret: Some(secret.into()),
            branches: vec!["*".into()],
            tags: Vec::new(),
            pull_requests: true,
            status_token: None,
            status_api: None,
        }
    }

    /// A server taking webhooks for the repositories of the three forges' examples, all at
    /// `url`.
    async fn app(db: Database, url: &str) -> TestApp {
        let url = url.to_owned();
        TestApp::with_config(db, move |c| {
            c.repositories = vec![
                repository(
                    "Codertocat/Hello-World",
                    Forge::Github,
                    "github webhook secret",
                    &url,
                ),
                repository("mike/diaspora", Forge::Gitlab, "gitlab webhook token", &url),
                repository(
                    "forgejo/webhooks",
                    Forge::Forgejo,
                    "forgejo webhook secret",
                    &url,
                ),
            ];
        })
        .await
    }

    async fn send(app: &TestApp, path: &str, headers: &[(&str, String)], body: &[u8]) -> Answer {
        app.call(Method::POST, path, None, headers, Body::from(body.to_vec()))
            .await
    }

    /// `answer` is a 401 whose message says `words`.
    fn assert_refused(answer: &Answer, path: &str, words: &str) {
        assert_eq!(
            answer.status,
            StatusCode::UNAUTHORIZED,
            "{path}: {:?}",
            answer.body
        );
        assert!(answer.error().contains(words), "{path}: {}", answer.error());
    }

    async fn jobs(app: &TestApp) -> usize {
        app.get("/api/jobs", ADMIN).await.body["jobs"]
            .as_array()
            .map_or(0, Vec::len)
    }

    async fn test_each_forges_documented_push_builds_once_and_only_when_signed(db: Database) {
        let (repo, commit) = crate::pushes::tests::one_commit();
        let app = app(db, &repo.path().display().to_string()).await;
        // Each documented payload, pointed at the test repository's commit.
        let mut github = fixture("github-push-new-branch.json");
        github["after"] = commit.clone().into();
        let github = serde_json::to_vec(&github).unwrap();
        let mut gitlab = fixture("gitlab-push.json");
        gitlab["after"] = commit.clone().into();
        gitlab["checkout_sha"] = commit.clone().into();
        let gitlab = serde_json::to_vec(&gitlab).unwrap();
        let mut forgejo = fixture("forgejo-push.json");
        forgejo["after"] = commit.clone().into();
        let forgejo = serde_json::to_vec(&forgejo).unwrap();
        let signed = [
            (
                "/api/hooks/github",
                vec![
                    ("x-github-event", "push".to_owned()),
                    (
                        "x-github-delivery",
                        "72d3162e-cc78-11e3-81ab-4c9367dc0958".to_owned(),
                    ),
                    (
                        "x-hub-signature-256",
                        format!("sha256={}", sign(&github, "github webhook secret")),
                    ),
                ],
                github.clone(),
                "refs/heads/master",
            ),
            (
                "/api/hooks/gitlab",
                vec![
                    ("x-gitlab-event", "Push Hook".to_owned()),
                    (
                        "idempotency-key",
                        "f7d3e6a1-52c5-4a2f-9a4e-0d6c1b8e2f11".to_owned(),
                    ),
                    ("x-gitlab-token", "gitlab webhook token".to_owned()),
                ],
                gitlab.clone(),
                "refs/heads/master",
            ),
            (
                "/api/hooks/forgejo",
                vec![
                    ("x-forgejo-event", "push".to_owned()),
                    (
                        "x-forgejo-delivery",
                        "f6266f16-1bf3-46a5-9ea4-602e06ead473".to_owned(),
                    ),
                    (
                        "x-forgejo-signature",
                        sign(&forgejo, "forgejo webhook secret"),
                    ),
                ],
                forgejo.clone(),
                "refs/heads/develop",
            ),
        ];
        for (i, (path, headers, body, git_ref)) in signed.iter().enumerate() {
            // Unsigned, and signed with another secret: refused, nothing built.
            let unsigned: Vec<_> = headers[..2].to_vec();
            let answer = send(&app, path, &unsigned, body).await;
            assert_refused(&answer, path, "header is missing");
            let mut forged = unsigned.clone();
            forged.push(match *path {
                "/api/hooks/github" => (
                    "x-hub-signature-256",
                    format!("sha256={}", sign(body, "guess")),
                ),
                "/api/hooks/gitlab" => ("x-gitlab-token", "guess".to_owned()),
                _ => ("x-forgejo-signature", sign(body, "guess")),
            });
            let answer = send(&app, path, &forged, body).await;
            assert_refused(&answer, path, "does not match");
            assert_eq!(
                jobs(&app).await,
                i,
                "{path}: nothing built before a signed call"
            );

            let answer = send(&app, path, headers, body).await;
            assert_eq!(
                answer.status,
                StatusCode::CREATED,
                "{path}: {:?}",
                answer.body
            );
            assert_eq!(answer.body["push"]["git_ref"], *git_ref);
            assert_eq!(answer.body["push"]["commit"], commit.as_str());
            assert_eq!(
                answer.body["push"]["files"][0]["jobs"]
                    .as_array()
                    .unwrap()
                    .len(),
                1
            );
            assert_eq!(jobs(&app).await, i + 1);

            let replay = send(&app, path, headers, body).await;
            assert_eq!(replay.status, StatusCode::OK, "{path}: {:?}", replay.body);
            assert!(
                replay.body["ignored"]
                    .as_str()
                    .unwrap()
                    .contains("was taken already"),
                "{path}: {:?}",
                replay.body
            );
            assert_eq!(jobs(&app).await, i + 1, "{path}: a replay builds nothing");
            // The same signed body under another delivery id is no new push either.
            let mut renamed = headers.clone();
            renamed[1].1 = format!("{}-again", renamed[1].1);
            let again = send(&app, path, &renamed, body).await;
            assert_eq!(again.status, StatusCode::OK, "{path}: {:?}", again.body);
            assert!(
                again.body["ignored"]
                    .as_str()
                    .unwrap_or_default()
                    .contains("was built already"),
                "{path}: {:?}",
                again.body
            );
            assert_eq!(
                jobs(&app).await,
                i + 1,
                "{path}: a renamed replay builds nothing"
            );
        }
    }

    #[tokio::test]
    async fn test_pings_tag_deletions_and_pull_requests_are_answered_for_what_they_are() {
        let (repo, commit) = crate::pushes::tests::one_commit();
        let app = app(Database::Sqlite, &repo.path().display().to_string()).await;
        let github = |event: &str, delivery: &str, body: &[u8]| {
            vec![
                ("x-github-event", event.to_owned()),
                ("x-github-delivery", delivery.to_owned()),
                (
                    "x-hub-signature-256",
                    format!("sha256={}", sign(body, "github webhook secret")),
                ),
            ]
        };
        let mut ping = fixture("github-ping.json");
        // The documented ping is an organisation's repository; this one is configured.
        ping["repository"]["full_name"] = "Codertocat/Hello-World".into();
        let ping = serde_json::to_vec(&ping).unwrap();
        let answer = send(
            &app,
            "/api/hooks/github",
            &github("ping", "d1", &ping),
            &ping,
        )
        .await;
        assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
        assert!(answer.body["ignored"].as_str().unwrap().starts_with("ping"));

        let deletion = serde_json::to_vec(&fixture("github-push.json")).unwrap();
        let answer = send(
            &app,
            "/api/hooks/github",
            &github("push", "d2", &deletion),
            &deletion,
        )
        .await;
        assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
        assert!(
            answer.body["ignored"]
                .as_str()
                .unwrap()
                .contains("was deleted"),
            "{:?}",
            answer.body
        );

        let issues = br#"{"action":"opened","repository":{"full_name":"Codertocat/Hello-World"}}"#;
        let answer = send(
            &app,
            "/api/hooks/github",
            &github("issues", "d3", issues),
            issues,
        )
        .await;
        assert_eq!(answer.body["ignored"], "issues events build nothing");

        let mut pr = fixture("github-pull-request.json");
        pr["pull_request"]["head"]["sha"] = commit.clone().into();
        let pr = serde_json::to_vec(&pr).unwrap();
        let answer = send(
            &app,
            "/api/hooks/github",
            &github("pull_request", "d4", &pr),
            &pr,
        )
        .await;
        assert_eq!(answer.status, StatusCode::CREATED, "{:?}", answer.body);
        assert_eq!(answer.body["push"]["git_ref"], "refs/pull/2/head");
        assert_eq!(jobs(&app).await, 1);

        let unknown =
            br#"{"ref":"refs/heads/main","after":"0","repository":{"full_name":"someone/else"}}"#;
        let answer = send(
            &app,
            "/api/hooks/github",
            &github("push", "d5", unknown),
            unknown,
        )
        .await;
        assert_eq!(answer.status, StatusCode::NOT_FOUND);
        assert!(
            answer
                .error()
                .contains("no repository `someone/else` takes github webhooks")
        );
        let answer = send(&app, "/api/hooks/github", &github("push", "d6", b"{"), b"{").await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST);
        assert!(answer.error().contains("not JSON"), "{}", answer.error());
    }

    #[test]
    fn test_githubs_published_signature_example_checks_out() {
        // docs.github.com, "Validating webhook deliveries": the secret and payload of its
        // example, and the signature it gives.
        assert_eq!(
            sign(b"Hello, World!", "It's a Secret to Everybody"),
            "757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
        );
    }
}
