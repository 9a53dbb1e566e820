//! Who may see and act on what: one place for the API and the web UI alike.
//!
//! | thing            | read                  | act (cancel, rerun, overwrite)      | use      |
//! |------------------|-----------------------|-------------------------------------|----------|
//! | job, its logs and artifacts, group | its owner, admins | its owner, admins (`submit` scope) | |
//! | schedule         | its owner, admins     | its owner, admins (`submit` scope); another user's name answers `409 taken` (names are one namespace: it tells that the name exists, not whose or what) | |
//! | secret           | nobody through the API (`vmfarm server secret list`: names only) | the operator's CLI | jobs of its owner and of the users it is shared with |
//! | token, user      | the operator's CLI    | the operator's CLI                  |          |
//!
//! What a caller may not reach answers as if it did not exist (`404`, the same words as a
//! missing one), so that ids do not tell what exists.

use crate::db::{Arg, Db, Query};
use crate::error::{AppError, AppResult};

/// Whose things a caller reaches: everyone's (an admin) or its own user's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reach {
    All,
    Own(String),
}

impl Reach {
    /// Whether a thing owned by `owner` is within reach.
    pub fn covers(&self, owner: &str) -> bool {
        match self {
            Reach::All => true,
            Reach::Own(user) => user == owner,
        }
    }

    /// A condition on the `owner` column limiting a query to what is within reach (its argument
    /// pushed on `args`), or `None` for everything.
    pub fn owner_clause<'a>(&'a self, column: &str, args: &mut Vec<Arg<'a>>) -> Option<String> {
        match self {
            Reach::All => None,
            Reach::Own(user) => {
                args.push(user.as_str().into());
                Some(format!("{column} = ${}", args.len()))
            }
        }
    }
}

/// Who a job being submitted belongs to, and the highest priority it may ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Submitter {
    pub user: String,
    pub max_priority: Option<i64>,
}

impl Submitter {
    /// `user`, with no priority cap: a schedule's owner (its cap was checked when it was saved),
    /// or the operator's own submissions.
    pub fn uncapped(user: &str) -> Submitter {
        Submitter {
            user: user.to_owned(),
            max_priority: None,
        }
    }
}

/// Refuses job `id` when it does not exist or is out of `reach`, in the same words.
pub async fn job(db: &Db, reach: &Reach, id: i64) -> AppResult<()> {
    let row = db
        .read()
        .fetch_optional("SELECT owner FROM jobs WHERE id = $1", &[id.into()])
        .await?;
    match row {
        Some(row) if reach.covers(&row.text(0)?) => Ok(()),
        _ => Err(AppError::NotFound(format!("no job {id}"))),
    }
}

#[cfg(test)]
mod tests {
    use crate::secrets::{self, NewSecret};
    use crate::test_utils::{
        ADMIN, ALICE, Answer, BOB, Database, READER, TestApp, on_both_databases,
    };
    use axum::body::Body;
    use axum::http::{Method, StatusCode, header};
    use serde_json::{Value, json};

    on_both_databases!(
        test_each_user_reaches_only_their_own_jobs,
        test_secrets_are_usable_only_by_whom_their_owner_says,
        test_schedules_belong_to_their_owner,
        test_a_priority_above_the_tokens_cap_is_refused_where_it_is_written,
        test_a_revoked_token_and_its_web_sessions_stop_at_once,
    );

    fn one_task(image: &str) -> String {
        format!("image = \"{image}\"\n[[tasks]]\nname = \"t\"\nscript = \"true\"\n")
    }

    fn ids(list: &Answer) -> Vec<String> {
        list.body["jobs"]
            .as_array()
            .expect("jobs")
            .iter()
            .map(|j| j["id"].as_str().unwrap_or_default().to_owned())
            .collect()
    }

    async fn store_secret(app: &TestApp, name: &str, owner: &str, shared: &[&str], value: &str) {
        let shared: Vec<String> = shared.iter().map(|s| s.to_string()).collect();
        let new = NewSecret {
            name,
            owner,
            shared_with: &shared,
            value: value.as_bytes(),
        };
        secrets::set(&app.state.db, &app.state.secret_key, &new)
            .await
            .expect("the secret is stored");
    }

    async fn test_each_user_reaches_only_their_own_jobs(db: Database) {
        let app = TestApp::new(db).await;
        let a = app.submit_as(ALICE, &one_task("a")).await[0];
        let b = app.submit_as(BOB, &one_task("a")).await[0];
        assert_eq!(
            app.job(a).await["owner"],
            "alice",
            "the submitter is recorded"
        );
        assert_eq!(app.job(b).await["owner"], "bob");

        assert_eq!(ids(&app.get("/api/jobs", ALICE).await), [a.to_string()]);
        assert_eq!(ids(&app.get("/api/jobs", BOB).await), [b.to_string()]);
        let all = [b.to_string(), a.to_string()];
        assert_eq!(
            ids(&app.get("/api/jobs", ADMIN).await),
            all,
            "the admin sees all"
        );
        assert_eq!(
            ids(&app.get("/api/jobs", READER).await),
            all,
            "so does a read-only token of an admin user"
        );

        // Bob's job is, for Alice, exactly like a job that does not exist.
        let missing = 1_000_000;
        for (path, what) in [
            ("", "job"),
            ("/log", "job"),
            ("/log/stream", "job"),
            ("/artifacts", "job"),
        ] {
            let theirs = app.get(&format!("/api/jobs/{b}{path}"), ALICE).await;
            let absent = app.get(&format!("/api/jobs/{missing}{path}"), ALICE).await;
            assert_eq!(
                theirs.status,
                StatusCode::NOT_FOUND,
                "{path}: {:?}",
                theirs.body
            );
            assert_eq!(theirs.error(), format!("no {what} {b}"), "{path}");
            assert_eq!(absent.error(), format!("no {what} {missing}"), "{path}");
        }
        let group = app.job(b).await["group_id"].as_str().unwrap().to_owned();
        let theirs = app.get(&format!("/api/groups/{group}"), ALICE).await;
        assert_eq!(theirs.status, StatusCode::NOT_FOUND);
        assert_eq!(theirs.error(), format!("no group {group}"));
        assert_eq!(
            app.get(&format!("/api/groups/{group}"), BOB).await.status,
            StatusCode::OK
        );

        let cancel = app.post(&format!("/api/jobs/{b}/cancel"), ALICE, "").await;
        assert_eq!(cancel.status, StatusCode::NOT_FOUND, "{:?}", cancel.body);
        assert_eq!(
            app.job(b).await["state"],
            "queued",
            "Alice could not cancel it"
        );
        let cancel = app.post(&format!("/api/jobs/{a}/cancel"), ALICE, "").await;
        assert_eq!(cancel.status, StatusCode::OK, "{:?}", cancel.body);
        assert_eq!(cancel.body["state"], "cancelled");
        let cancel = app.post(&format!("/api/jobs/{b}/cancel"), ADMIN, "").await;
        assert_eq!(cancel.body["state"], "cancelled", "the admin acts on all");
    }

    async fn test_secrets_are_usable_only_by_whom_their_owner_says(db: Database) {
        let app = TestApp::new(db).await;
        store_secret(&app, "alice-key", "alice", &[], "alice-value").await;
        store_secret(&app, "team-key", "bob", &["alice"], "team-value").await;
        let naming = |names: &str| format!("secrets = [{names}]\n{}", one_task("a"));

        let refused = app
            .post("/api/jobs", BOB, naming("\"team-key\", \"alice-key\""))
            .await;
        assert_eq!(
            refused.status,
            StatusCode::BAD_REQUEST,
            "{:?}",
            refused.body
        );
        assert_eq!(refused.error(), "invalid manifest");
        let errors = refused.body["manifest_errors"].as_array().unwrap().clone();
        assert_eq!(errors.len(), 1, "bob owns team-key: {errors:?}");
        assert_eq!(
            (&errors[0]["line"], &errors[0]["column"]),
            (&json!(1), &json!(24))
        );
        let message = errors[0]["message"].as_str().unwrap();
        assert!(
            message.starts_with("`alice-key` is not a secret that jobs of user `bob` may use"),
            "{message}"
        );
        let unknown = app.post("/api/jobs", BOB, naming("\"no-such-key\"")).await;
        assert_eq!(
            unknown.body["manifest_errors"][0]["message"],
            json!(message.replace("alice-key", "no-such-key")),
            "a missing secret is refused in the same words"
        );
        let by_admin = app.post("/api/jobs", ADMIN, naming("\"alice-key\"")).await;
        assert_eq!(
            by_admin.status,
            StatusCode::BAD_REQUEST,
            "not even an admin's jobs may name another user's secret"
        );
        assert_eq!(
            app.get("/api/jobs", ADMIN).await.body["jobs"],
            json!([]),
            "nothing queued"
        );

        let first = app
            .submit_as(ALICE, &naming("\"alice-key\", \"team-key\""))
            .await[0];
        let second = app
            .submit_as(ALICE, &naming("\"alice-key\", \"team-key\""))
            .await[0];
        let lease = app.lease("w0", "a").await;
        assert_eq!(lease.job.id, first.to_string());
        use base64::Engine;
        let value = |name: &str| {
            base64::engine::general_purpose::STANDARD
                .decode(&lease.secrets[name])
                .unwrap()
        };
        assert_eq!(value("alice-key"), b"alice-value");
        assert_eq!(value("team-key"), b"team-value");

        // Bob stops sharing: Alice's job still queued gets no value, and its log says why.
        store_secret(&app, "team-key", "bob", &[], "team-value").await;
        let lease = app.lease("w0", "a").await;
        assert_eq!(lease.job.id, second.to_string());
        assert_eq!(lease.secrets.keys().collect::<Vec<_>>(), ["alice-key"]);
        assert!(
            app.log(second).await.contains(
                "[vmfarm] secret `team-key` is left out: it was removed, or it is no longer shared with user `alice`"
            ),
            "{}",
            app.log(second).await
        );
    }

    async fn test_schedules_belong_to_their_owner(db: Database) {
        let app = TestApp::new(db).await;
        let schedule = |manifest: String| {
            json!({"name": "nightly", "cron": "0 3 * * *", "manifest": manifest}).to_string()
        };
        let made = app
            .post("/api/schedules", ALICE, schedule(one_task("a")))
            .await;
        assert_eq!(made.status, StatusCode::CREATED, "{:?}", made.body);
        assert_eq!(made.body["owner"], "alice");

        let taken = app
            .post("/api/schedules", BOB, schedule(one_task("b")))
            .await;
        assert_eq!(taken.status, StatusCode::CONFLICT, "{:?}", taken.body);
        assert_eq!(
            taken.error(),
            "the schedule name `nightly` is taken: choose another"
        );
        let names = |answer: Answer| -> Vec<(Value, Value)> {
            answer
                .body
                .as_array()
                .unwrap()
                .iter()
                .map(|s| (s["name"].clone(), s["manifest"].clone()))
                .collect()
        };
        assert_eq!(names(app.get("/api/schedules", BOB).await), []);
        assert_eq!(
            names(app.get("/api/schedules", ALICE).await),
            [(json!("nightly"), json!(one_task("a")))],
            "Bob did not overwrite it"
        );

        let changed = app
            .post("/api/schedules", ADMIN, schedule(one_task("c")))
            .await;
        assert_eq!(changed.status, StatusCode::CREATED, "{:?}", changed.body);
        assert_eq!(
            changed.body["owner"], "alice",
            "an admin's change keeps the owner"
        );

        store_secret(&app, "bob-key", "bob", &[], "v").await;
        let naming = format!("secrets = [\"bob-key\"]\n{}", one_task("a"));
        let refused = app.post("/api/schedules", ALICE, schedule(naming)).await;
        assert_eq!(
            refused.status,
            StatusCode::BAD_REQUEST,
            "{:?}",
            refused.body
        );
        assert_eq!(refused.body["manifest_errors"][0]["line"], 1);
    }

    /// Stores `token`, Alice's, for submits of at most priority `cap`.
    async fn capped_token(app: &TestApp, token: &str, cap: i64) {
        let caller = crate::auth::Caller::Api(crate::auth::ApiCaller {
            name: token.into(),
            user: "alice".into(),
            admin: false,
            scopes: vec![crate::config::Scope::Submit],
            max_priority: Some(cap),
        });
        crate::auth::store_token(&app.state.db, token, &caller, crate::auth::TokenSource::Cli)
            .await
            .unwrap();
    }

    async fn test_a_priority_above_the_tokens_cap_is_refused_where_it_is_written(db: Database) {
        let app = TestApp::new(db).await;
        capped_token(&app, "capped-token", 5).await;
        let at = |p: i64| {
            format!("image = \"a\"\npriority = {p}\n[[tasks]]\nname = \"t\"\nscript = \"true\"\n")
        };
        let refused = app.post("/api/jobs", "capped-token", at(9)).await;
        assert_eq!(
            refused.status,
            StatusCode::BAD_REQUEST,
            "{:?}",
            refused.body
        );
        assert_eq!(
            refused.body["manifest_errors"],
            json!([{"line": 2, "column": 12,
                    "message": "`priority` is 9; your token allows at most 5: write `priority = 5` or lower, or ask the operator"}])
        );
        assert_eq!(app.submit_as("capped-token", &at(5)).await.len(), 1);
        capped_token(&app, "low-token", -1).await;
        let unwritten = app.post("/api/jobs", "low-token", one_task("a")).await;
        assert_eq!(
            unwritten.body["manifest_errors"],
            json!([{"line": 1, "column": 1,
                    "message": "`priority` is 0 (not written: the default); your token allows at most -1: write `priority = -1` or lower, or ask the operator"}])
        );
        assert_eq!(
            app.submit_as(ALICE, &at(9)).await.len(),
            1,
            "alice's other token has no cap"
        );
    }

    /// Logs in to the web UI with `token`; the session cookie.
    async fn web_login(app: &TestApp, token: &str) -> String {
        let form = format!("user=&password={token}&csrf=c5rf");
        let answer = app
            .call(
                Method::POST,
                "/login",
                None,
                &[
                    ("content-type", "application/x-www-form-urlencoded".into()),
                    ("cookie", "vmfarm_login=c5rf".into()),
                ],
                Body::from(form),
            )
            .await;
        assert_eq!(answer.status, StatusCode::SEE_OTHER, "{:?}", answer.body);
        answer
            .headers
            .get_all(header::SET_COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find(|v| v.starts_with("vmfarm_session=") && !v.starts_with("vmfarm_session=;"))
            .and_then(|v| v.split(';').next())
            .expect("a session cookie")
            .to_owned()
    }

    async fn web_page(app: &TestApp, cookie: &str) -> Answer {
        app.call(
            Method::GET,
            "/history",
            None,
            &[("cookie", cookie.into())],
            Body::empty(),
        )
        .await
    }

    async fn test_a_revoked_token_and_its_web_sessions_stop_at_once(db: Database) {
        let app = TestApp::new(db).await;
        let mine = app.submit_as(ALICE, &one_task("a")).await[0];
        let theirs = app.submit_as(BOB, &one_task("a")).await[0];
        let session = web_login(&app, ALICE).await;
        let page = web_page(&app, &session).await;
        assert_eq!(page.status, StatusCode::OK);
        let html = page.body.as_str().unwrap();
        assert!(html.contains(&format!("/jobs/{mine}")), "her job is listed");
        assert!(!html.contains(&format!("/jobs/{theirs}\"")), "Bob's is not");
        let other = app
            .call(
                Method::GET,
                &format!("/jobs/{theirs}"),
                None,
                &[("cookie", session.clone())],
                Body::empty(),
            )
            .await;
        assert_eq!(
            other.status,
            StatusCode::NOT_FOUND,
            "the web UI applies the same rule"
        );

        assert_eq!(app.get("/api/jobs", ALICE).await.status, StatusCode::OK);
        let revoked = crate::admin::revoke_token(&app.state.db, "alice")
            .await
            .unwrap();
        assert_eq!((revoked.count, revoked.from_config), (1, false));
        let after = app.get("/api/jobs", ALICE).await;
        assert_eq!(after.status, StatusCode::UNAUTHORIZED, "{:?}", after.body);
        let page = web_page(&app, &session).await;
        assert_eq!(
            page.status,
            StatusCode::SEE_OTHER,
            "the session ended with its token"
        );
        assert_eq!(page.headers[header::LOCATION], "/login");
        assert_eq!(
            app.get("/api/jobs", BOB).await.status,
            StatusCode::OK,
            "others work on"
        );
        let again = crate::admin::revoke_token(&app.state.db, "alice")
            .await
            .unwrap_err();
        assert!(
            again.to_string().contains("no token has that name"),
            "{again}"
        );
    }
}
