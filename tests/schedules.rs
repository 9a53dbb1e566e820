//! Schedules driven by an injected clock (`schedules::tick(state, now)`), on SQLite and
//! PostgreSQL; and webhook triggers delivered to a tiny HTTP receiver on loopback, through a real
//! `vmfarm server`.

#[macro_use]
mod common;

use chrono::DateTime;
use common::worker::FakeWorker;
use common::{Backend, TestServer};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use vmfarm_proto::JobState;
use vmfarm_server::access::{Reach, Submitter};
use vmfarm_server::config::ServerConfig;
use vmfarm_server::db::{Db, SqliteSync};
use vmfarm_server::schedules::{self, NewSchedule, Source};
use vmfarm_server::state::AppState;

on_both_databases!(
    schedule_runs_on_time_and_once_after_downtime,
    webhook_is_retried_until_delivered_and_shown,
    cancelling_a_queued_job_fires_its_failure_hook,
);

fn ms(text: &str) -> i64 {
    DateTime::parse_from_rfc3339(text)
        .unwrap()
        .timestamp_millis()
}

/// The server's state in this process, without a listener: the scheduler is called directly.
async fn state(backend: Backend, dir: &std::path::Path) -> AppState {
    let url = match backend {
        Backend::Sqlite => format!("sqlite://{}/vmfarm.db", dir.display()),
        Backend::Postgres => common::postgres::fresh_database(),
    };
    let config = ServerConfig {
        data_dir: dir.to_owned(),
        database_url: url.clone(),
        ..ServerConfig::default()
    };
    let store = vmfarm_server::store::ArtifactStore::open(&config)
        .await
        .unwrap();
    AppState::new(
        Db::open(&url, SqliteSync::default()).await.unwrap(),
        config,
        store,
        vmfarm_server::secrets::SecretKey::load(dir, true).unwrap(),
    )
}

async fn group_states(state: &AppState, name: &str) -> Vec<Vec<(String, JobState)>> {
    schedules::runs(state, name, 100, &Reach::All)
        .await
        .unwrap()
        .into_iter()
        .map(|g| {
            assert_eq!(g.schedule.as_deref(), Some(name));
            g.jobs.into_iter().map(|j| (j.image, j.state)).collect()
        })
        .collect()
}

async fn schedule_runs_on_time_and_once_after_downtime(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let state = state(backend, dir.path()).await;
    let nightly = NewSchedule {
        name: "nightly".into(),
        cron: "0 3 * * *".into(),
        timezone: None,
        manifest: "images = [\"debian-12\", \"alpine-3\"]\n[[tasks]]\nname = \"build\"\nscript = \"make\"\n"
            .into(),
    };
    schedules::save(
        &state,
        &nightly,
        Source::Config,
        ms("2026-11-20T12:00:00Z"),
        &Submitter::uncapped(vmfarm_server::users::ADMIN),
        &Reach::All,
    )
    .await
    .unwrap();

    // Not yet; then at 03:00 one group with a job per image, tagged; not again in that minute.
    let made = schedules::tick(&state, ms("2026-11-21T02:59:59Z"))
        .await
        .unwrap();
    assert!(made.is_empty(), "{made:?}");
    let made = schedules::tick(&state, ms("2026-11-21T03:00:00Z"))
        .await
        .unwrap();
    assert_eq!(made.len(), 1);
    let group = vmfarm_server::job_views::group(&state.db, made[0].parse().unwrap(), &Reach::All)
        .await
        .unwrap();
    let images: Vec<_> = group.jobs.iter().map(|j| j.image.as_str()).collect();
    assert_eq!(images, ["debian-12", "alpine-3"]);
    for job in &group.jobs {
        assert_eq!(job.tags, ["scheduled:nightly"]);
        assert_eq!(job.state, JobState::Queued);
    }
    let made = schedules::tick(&state, ms("2026-11-21T03:00:40Z"))
        .await
        .unwrap();
    assert!(made.is_empty(), "ran twice in one minute: {made:?}");

    // The server was down for three nights: one run at start, not three.
    let made = schedules::tick(&state, ms("2026-11-24T09:30:00Z"))
        .await
        .unwrap();
    assert_eq!(made.len(), 1);
    let made = schedules::tick(&state, ms("2026-11-24T09:31:00Z"))
        .await
        .unwrap();
    assert!(made.is_empty(), "{made:?}");
    let view = schedules::get(&state, "nightly", &Reach::All)
        .await
        .unwrap();
    assert_eq!(view.last_run_at, ms("2026-11-24T03:00:00Z"));
    assert_eq!(view.next_run_at, Some(ms("2026-11-25T03:00:00Z")));

    // The schedule's page data: its past runs, newest first, with their jobs' states.
    let runs = group_states(&state, "nightly").await;
    assert_eq!(runs.len(), 2);
    assert!(runs.iter().all(|g| g.len() == 2));

    // A named time zone: 03:00 in Paris is 02:00 UTC in November.
    let paris = NewSchedule {
        name: "paris".into(),
        timezone: Some("Europe/Paris".into()),
        ..nightly.clone()
    };
    schedules::save(
        &state,
        &paris,
        Source::Ui,
        ms("2026-11-24T12:00:00Z"),
        &Submitter::uncapped(vmfarm_server::users::ADMIN),
        &Reach::All,
    )
    .await
    .unwrap();
    assert!(
        schedules::tick(&state, ms("2026-11-25T01:59:00Z"))
            .await
            .unwrap()
            .is_empty()
    );
    let made = schedules::tick(&state, ms("2026-11-25T02:00:00Z"))
        .await
        .unwrap();
    assert_eq!(made.len(), 1, "paris runs; nightly waits for 03:00 UTC");
    assert_eq!(group_states(&state, "paris").await.len(), 1);

    // Bad input is refused with what is wrong, and stores nothing.
    for (bad, want) in [
        (
            NewSchedule {
                cron: "0 25 * * *".into(),
                ..nightly.clone()
            },
            "invalid cron expression",
        ),
        (
            NewSchedule {
                timezone: Some("Mars/Base".into()),
                ..nightly.clone()
            },
            "unknown time zone",
        ),
        (
            NewSchedule {
                name: "Bad Name".into(),
                ..nightly.clone()
            },
            "schedule name",
        ),
        (
            NewSchedule {
                manifest: "image = 3\n".into(),
                ..nightly.clone()
            },
            "invalid manifest",
        ),
    ] {
        let err = schedules::save(
            &state,
            &bad,
            Source::Ui,
            ms("2026-11-25T12:00:00Z"),
            &Submitter::uncapped(vmfarm_server::users::ADMIN),
            &Reach::All,
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(err.contains(want), "{err}");
    }
    assert_eq!(
        schedules::get(&state, "nightly", &Reach::All)
            .await
            .unwrap()
            .cron,
        "0 3 * * *"
    );
}

/// A webhook receiver on loopback: answers each POST with the next status of `statuses`
/// (then 200), and sends each request's body on the channel.
async fn receiver(
    statuses: Vec<u16>,
) -> (String, mpsc::UnboundedReceiver<(u16, serde_json::Value)>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut statuses = statuses.into_iter();
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                return;
            };
            let mut buf = Vec::new();
            let body = loop {
                let mut chunk = [0u8; 4096];
                let n = conn.read(&mut chunk).await.unwrap();
                assert!(n > 0, "connection closed mid-request");
                buf.extend_from_slice(&chunk[..n]);
                let text = String::from_utf8_lossy(&buf).to_string();
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let length: usize = head
                        .lines()
                        .find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case("content-length")
                                .then(|| v.trim().parse().ok())?
                        })
                        .unwrap_or(0);
                    if body.len() >= length {
                        break body.to_owned();
                    }
                }
            };
            let status = statuses.next().unwrap_or(200);
            let reply =
                format!("HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
            conn.write_all(reply.as_bytes()).await.unwrap();
            let _ = tx.send((status, serde_json::from_str(&body).unwrap()));
        }
    });
    (url, rx)
}

async fn webhook_is_retried_until_delivered_and_shown(backend: Backend) {
    let server = TestServer::start_with(
        backend,
        "[leases]\nlong_poll = \"1s\"\n[triggers]\nfirst_retry = \"1s\"\nmax_attempts = 4\n\
         allow_private = [\"127.0.0.0/8\"]\n",
    );
    let (on_success, mut hits) = receiver(vec![500, 503]).await;
    let (on_failure, mut never) = receiver(vec![]).await;
    let manifest = format!(
        "image = \"debian-12\"\n[[tasks]]\nname = \"build\"\nscript = \"make\"\n\
         [[triggers]]\non = \"success\"\nwebhook = \"{on_success}\"\n\
         [[triggers]]\non = \"failure\"\nwebhook = \"{on_failure}\"\n"
    );
    let submitted = server.admin().submit(&manifest).await;
    let worker = FakeWorker::new(&server, 0);
    let lease = worker.lease(&["debian-12"]).await.unwrap();
    worker.start(&lease).await;
    worker.job_state(&lease, JobState::Succeeded).await;

    // Refused twice, then delivered: the job's JSON each time.
    let wait = Duration::from_secs(20);
    for want in [500, 503, 200] {
        let (status, body) = tokio::time::timeout(wait, hits.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(status, want);
        assert_eq!(body["id"], submitted.jobs[0].id.as_str());
        assert_eq!(body["state"], "succeeded");
    }
    assert!(
        never.try_recv().is_err(),
        "the failure hook fired for a success"
    );

    // The job page shows the delivery (read here through the UI's HTML with a token login).
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let session = common::token_session(&http, &server.url).await;
    let page = loop {
        let page = http
            .get(format!("{}/jobs/{}", server.url, submitted.jobs[0].id))
            .header("cookie", &session)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if page.contains("delivered") {
            break page;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let row = page
        .split("<tr>")
        .find(|row| row.contains("s-delivered"))
        .unwrap_or_else(|| panic!("no delivered row: {page}"));
    // HTML escapes the URL's slashes.
    assert!(row.contains(&on_success.replace('/', "&#x2f;")), "{row}");
    assert!(
        row.contains("<td class=\"num\">3</td><td>200 OK</td>"),
        "{row}"
    );
}

/// A job cancelled before any worker took it ends there and then: its failure hook fires (queued
/// in the same transaction as the cancel), its success hook does not.
async fn cancelling_a_queued_job_fires_its_failure_hook(backend: Backend) {
    let server = TestServer::start_with(
        backend,
        "[triggers]\nfirst_retry = \"1s\"\nallow_private = [\"127.0.0.0/8\"]\n",
    );
    let (on_success, mut never) = receiver(vec![]).await;
    let (on_failure, mut hits) = receiver(vec![]).await;
    let manifest = format!(
        "image = \"debian-12\"\n[[tasks]]\nname = \"build\"\nscript = \"make\"\n\
         [[triggers]]\non = \"success\"\nwebhook = \"{on_success}\"\n\
         [[triggers]]\non = \"failure\"\nwebhook = \"{on_failure}\"\n"
    );
    let api = server.admin();
    let submitted = api.submit(&manifest).await;
    let id = submitted.jobs[0].id.as_str();
    let cancelled = api
        .req(reqwest::Method::POST, &format!("/api/jobs/{id}/cancel"))
        .send()
        .await
        .unwrap();
    assert!(cancelled.status().is_success(), "{}", cancelled.status());
    let (status, body) = tokio::time::timeout(Duration::from_secs(20), hits.recv())
        .await
        .expect("the failure hook is called")
        .unwrap();
    assert_eq!(status, 200);
    assert_eq!(body["id"], id);
    assert_eq!(body["state"], "cancelled");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        never.try_recv().is_err(),
        "the success hook fired for a cancel"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schedules_from_the_config_and_the_api() {
    // The config's manifest path is relative to the config file's folder (the data dir here).
    let dir = tempfile::tempdir().unwrap();
    let manifest =
        "images = [\"debian-12\", \"alpine-3\"]\n[[tasks]]\nname = \"b\"\nscript = \"true\"\n";
    let path = dir.path().join("nightly.toml");
    std::fs::write(&path, manifest).unwrap();
    let server = TestServer::start_with(
        Backend::Sqlite,
        &format!(
            "[[schedules]]\nname = \"nightly\"\ncron = \"0 3 * * *\"\ntimezone = \"Europe/Paris\"\nmanifest = \"{}\"\n",
            path.display()
        ),
    );
    let api = server.admin();
    let list = api.get_json("/api/schedules").await;
    assert_eq!(list[0]["name"], "nightly");
    assert_eq!(list[0]["source"], "config");
    assert_eq!(list[0]["timezone"], "Europe/Paris");
    assert_eq!(list[0]["manifest"], manifest);

    let create = |body: serde_json::Value| {
        api.req(reqwest::Method::POST, "/api/schedules")
            .json(&body)
            .send()
    };
    let r = create(serde_json::json!({"name": "hourly", "cron": "0 * * *", "manifest": manifest}))
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: serde_json::Value = r.json().await.unwrap();
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("invalid cron expression `0 * * *`"),
        "{body}"
    );
    let r =
        create(serde_json::json!({"name": "hourly", "cron": "0 * * * *", "manifest": manifest}))
            .await
            .unwrap();
    assert_eq!(r.status(), 201);
    let view: serde_json::Value = r.json().await.unwrap();
    assert_eq!(view["timezone"], "UTC");
    assert!(view["next_run_at"].as_i64().unwrap() > view["last_run_at"].as_i64().unwrap());
    let reader = server.client(common::READER_TOKEN);
    let r = reader
        .req(reqwest::Method::POST, "/api/schedules")
        .json(&serde_json::json!({"name": "x", "cron": "0 * * * *", "manifest": manifest}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "a read token cannot make schedules");
    assert_eq!(
        reader
            .get_json("/api/schedules")
            .await
            .as_array()
            .unwrap()
            .len(),
        2
    );
}
