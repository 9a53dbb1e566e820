//! The server's API against a real `vmfarm server` process on loopback, each scenario on a real
//! SQLite file and on a real PostgreSQL server.

#[macro_use]
mod common;

use common::worker::{FakeWorker, sha256_hex};
use common::{Backend, READER_TOKEN, TestServer, manifest, worker_token};
use reqwest::{Method, StatusCode};
use serde_json::Value;
use std::collections::HashSet;
use std::time::{Duration, Instant};
use vmfarm_proto::{JobState, TaskState};

on_both_databases!(
    submit_read_and_list,
    bad_input_is_refused_and_changes_nothing,
    lease_run_and_finish,
    artifacts_upload_and_download,
    expired_leases_requeue_then_error,
    cancel_queued_and_running,
    log_stream_is_live,
    concurrent_workers_never_share_a_job,
    crash_loses_nothing_acknowledged,
    long_poll_wakes_on_submit,
    secrets_reach_only_the_lease,
    tokens_are_listed_and_revoked_on_a_running_server,
);

const SHORT_POLL: &str = "[leases]\nttl = \"30s\"\nmax_attempts = 3\nlong_poll = \"1s\"\n";

async fn submit_read_and_list(backend: Backend) {
    let server = TestServer::start_with(backend, SHORT_POLL);
    let api = server.admin();
    let text = "images = [\"debian-12\", \"debian-13\"]\ntags = [\"nightly\"]\npriority = 3\n\
                [[tasks]]\nname = \"build\"\nscript = \"make\"\n[[tasks]]\nname = \"test\"\nscript = \"make check\"\n";
    let submitted = api.submit(text).await;
    assert_eq!(submitted.jobs.len(), 2);
    assert_eq!(submitted.jobs[0].image, "debian-12");
    let group = api
        .get_json(&format!("/api/groups/{}", submitted.group_id))
        .await;
    let jobs = group["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 2);
    for job in jobs {
        assert_eq!(job["state"], "queued");
        assert_eq!(job["priority"], 3);
        assert_eq!(job["tags"], serde_json::json!(["nightly"]));
        let tasks: Vec<(&str, &str)> = job["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| (t["name"].as_str().unwrap(), t["state"].as_str().unwrap()))
            .collect();
        assert_eq!(tasks, [("build", "pending"), ("test", "pending")]);
    }
    api.submit(&manifest("tiny", &["t"])).await;

    let count = |v: Value| v["jobs"].as_array().unwrap().len();
    assert_eq!(count(api.get_json("/api/jobs").await), 3);
    assert_eq!(count(api.get_json("/api/jobs?image=debian-13").await), 1);
    assert_eq!(count(api.get_json("/api/jobs?tag=nightly").await), 2);
    assert_eq!(
        count(api.get_json("/api/jobs?state=queued&image=tiny").await),
        1
    );
    assert_eq!(count(api.get_json("/api/jobs?state=running").await), 0);
    let page = api.get_json("/api/jobs?limit=2").await;
    assert_eq!(count(page.clone()), 2);
    let next = page["next_before"].as_str().unwrap();
    let rest = api
        .get_json(&format!("/api/jobs?limit=2&before={next}"))
        .await;
    assert_eq!(count(rest.clone()), 1);
    assert!(rest.get("next_before").is_none());

    // A reader may read, not submit.
    let reader = server.client(READER_TOKEN);
    assert_eq!(count(reader.get_json("/api/jobs").await), 3);
    let r = reader
        .req(Method::POST, "/api/jobs")
        .body(manifest("tiny", &["t"]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
}

async fn bad_input_is_refused_and_changes_nothing(backend: Backend) {
    let server = TestServer::start_with(backend, SHORT_POLL);
    let api = server.admin();
    api.submit(&manifest("tiny", &["t"])).await;

    let r = api
        .req(Method::POST, "/api/jobs")
        .body("image = \"tiny\"\ntimout = \"5m\"\n[[tasks]]\nname = \"t\"\nscript = \"x\"\n")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["manifest_errors"][0]["line"], 2);
    assert_eq!(body["manifest_errors"][0]["column"], 1);
    assert!(
        body["manifest_errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("did you mean `timeout`?")
    );

    let huge = format!("{}# {}\n", manifest("tiny", &["t"]), "x".repeat(300 * 1024));
    let r = api
        .req(Method::POST, "/api/jobs")
        .body(huge)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let r = api
        .req(Method::POST, "/api/jobs")
        .body(vec![0xff, 0xfe, b'a'])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);

    for token in [None, Some("wrong")] {
        let mut req = server.admin().http.get(format!("{}/api/jobs", server.url));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        assert_eq!(req.send().await.unwrap().status(), StatusCode::UNAUTHORIZED);
    }
    let as_worker = server.client(&worker_token(0));
    assert_eq!(
        as_worker
            .req(Method::GET, "/api/jobs")
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::FORBIDDEN
    );
    let r = api
        .req(Method::POST, "/api/workers/lease")
        .json(&serde_json::json!({}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_client_error(), "{}", r.status());

    for path in [
        "/api/jobs/999",
        "/api/jobs/abc",
        "/api/jobs/-1",
        "/api/groups/77",
    ] {
        assert_eq!(
            api.req(Method::GET, path).send().await.unwrap().status(),
            StatusCode::NOT_FOUND,
            "{path}"
        );
    }
    assert_eq!(
        api.req(Method::GET, "/api/jobs?state=done")
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::BAD_REQUEST
    );

    // Malformed worker JSON and a lease for someone else's name.
    let worker = FakeWorker::new(&server, 0);
    let r = worker
        .api
        .req(Method::POST, "/api/workers/lease")
        .header("content-type", "application/json")
        .body("{\"name\": ")
        .send()
        .await
        .unwrap();
    assert!(r.status().is_client_error());
    let r = worker
        .api
        .req(Method::POST, "/api/workers/lease")
        .json(&serde_json::json!({"name": "w5", "images": [], "slots": 1, "version": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);

    // Nothing above changed the one job.
    let list = api.get_json("/api/jobs").await;
    assert_eq!(list["jobs"].as_array().unwrap().len(), 1);
    assert_eq!(list["jobs"][0]["state"], "queued");
}

async fn lease_run_and_finish(backend: Backend) {
    let server = TestServer::start_with(backend, SHORT_POLL);
    let api = server.admin();
    let low = api.submit(&manifest("a", &["build", "test"])).await.jobs[0]
        .id
        .clone();
    let high = api
        .submit(&format!("priority = 5\n{}", manifest("a", &["build"])))
        .await
        .jobs[0]
        .id
        .clone();
    let other = api.submit(&manifest("b", &["build"])).await.jobs[0]
        .id
        .clone();

    let w0 = FakeWorker::new(&server, 0);
    let w1 = FakeWorker::new(&server, 1);
    let first = w0.lease(&["a"]).await.expect("a job for a");
    assert_eq!(first.job.id, high, "the highest priority goes first");
    assert_eq!(first.job.attempt, 1);
    assert!(first.job.manifest.contains("priority = 5"));
    let second = w0.lease(&["a"]).await.expect("another job for a");
    assert_eq!(second.job.id, low);
    assert!(w0.lease(&["a"]).await.is_none(), "no third job for a");
    assert_eq!(w1.lease(&["b", "c"]).await.unwrap().job.id, other);

    let lease = second;
    let hb: Value = w0.heartbeat(&lease).await.json().await.unwrap();
    assert_eq!(hb["cancel"], false);
    assert!(hb["expires_at"].as_i64().unwrap() > 0);
    // Someone else's lease, or a stale fence, is refused.
    let r = w1.heartbeat(&lease).await;
    assert!(
        r.status() == StatusCode::CONFLICT || r.status() == StatusCode::FORBIDDEN,
        "{}",
        r.status()
    );
    assert_eq!(
        w0.heartbeat_fenced(&lease, lease.fence + 1).await.status(),
        StatusCode::CONFLICT
    );

    w0.start(&lease).await;
    assert_eq!(
        w0.task_state(&lease, "build", TaskState::Running, None)
            .await
            .status(),
        204
    );
    let r: Value = w0.log(&lease, 1, "compiling\n").await.json().await.unwrap();
    assert_eq!(r["stored"], true);
    let r: Value = w0.log(&lease, 2, "linking ✓\n").await.json().await.unwrap();
    assert_eq!(r["stored"], true);
    let replay: Value = w0.log(&lease, 2, "linking ✓\n").await.json().await.unwrap();
    assert_eq!(
        replay["stored"], false,
        "a replayed seq is acknowledged, not stored"
    );
    assert_eq!(
        w0.log(&lease, 5, "gap\n").await.status(),
        StatusCode::CONFLICT
    );
    assert_eq!(
        w0.task_state(&lease, "build", TaskState::Succeeded, Some(0))
            .await
            .status(),
        204
    );
    assert_eq!(
        w0.task_state(&lease, "nope", TaskState::Running, None)
            .await
            .status(),
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        w0.task_state(&lease, "build", TaskState::Running, None)
            .await
            .status(),
        StatusCode::CONFLICT,
        "a finished task does not run again"
    );

    let log = api
        .req(Method::GET, &format!("/api/jobs/{low}/log"))
        .send()
        .await
        .unwrap();
    assert_eq!(log.headers()["x-vmfarm-log-size"], "22");
    assert_eq!(log.text().await.unwrap(), "compiling\nlinking ✓\n");
    let tail = api
        .req(Method::GET, &format!("/api/jobs/{low}/log?from=10"))
        .send()
        .await
        .unwrap();
    assert_eq!(tail.text().await.unwrap(), "linking ✓\n");
    let chunks = api
        .get_json(&format!("/api/jobs/{low}/log?format=json"))
        .await;
    assert_eq!(chunks[1]["offset"], 10);
    assert_eq!(chunks[1]["stream"], "task");
    assert_eq!(chunks[1]["task"], "build");

    assert_eq!(
        w0.job_state(&lease, JobState::Succeeded).await.status(),
        204
    );
    let job = api.get_json(&format!("/api/jobs/{low}")).await;
    assert_eq!(job["state"], "succeeded");
    assert!(job["finished_at"].as_i64().unwrap() >= job["started_at"].as_i64().unwrap());
    assert_eq!(job["tasks"][0]["state"], "succeeded");
    assert_eq!(job["tasks"][0]["exit_code"], 0);
    assert_eq!(job["tasks"][1]["state"], "skipped");
    // The same final state again is fine (a retried write); another one is not.
    assert_eq!(
        w0.job_state(&lease, JobState::Succeeded).await.status(),
        204
    );
    assert_eq!(
        w0.job_state(&lease, JobState::Failed).await.status(),
        StatusCode::CONFLICT
    );
    assert_eq!(w0.heartbeat(&lease).await.status(), StatusCode::CONFLICT);

    let metrics = api
        .req(Method::GET, "/metrics")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("vmfarm_jobs{state=\"succeeded\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("vmfarm_jobs{state=\"leased\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("vmfarm_lease_duration_seconds_count 3"),
        "{metrics}"
    );
    for series in [
        "vmfarm_http_request_duration_seconds_count{method=\"POST\",route=\"/api/workers/lease\",status=\"200\"} 3",
        "vmfarm_queue_wait_seconds_count{image=\"a\"} 2",
        "vmfarm_queue_wait_seconds_count{image=\"b\"} 1",
        "vmfarm_job_duration_seconds_count{state=\"succeeded\"} 1",
        "vmfarm_jobs_finished_total{state=\"succeeded\"} 1",
        "vmfarm_jobs_submitted_total 3",
    ] {
        assert!(metrics.contains(series), "{series} in:\n{metrics}");
    }
    let openapi = api.get_json("/api/openapi.json").await;
    assert!(openapi["paths"]["/api/leases/{id}/log"]["post"].is_object());
    assert!(openapi["paths"]["/api/schedules"]["post"].is_object());
    for path in ["/api/pushes", "/api/hooks/{forge}", "/api/jobs/{id}/rerun"] {
        assert!(openapi["paths"][path]["post"].is_object(), "{path}");
    }
}

async fn artifacts_upload_and_download(backend: Backend) {
    let server = TestServer::start_with(backend, "[limits]\nmax_artifact_size = \"64KiB\"\n");
    let api = server.admin();
    let id = api.submit(&manifest("a", &["build"])).await.jobs[0]
        .id
        .clone();
    let w = FakeWorker::new(&server, 0);
    let lease = w.lease(&["a"]).await.unwrap();
    w.start(&lease).await;

    let data: Vec<u8> = (0..40_000u32).map(|i| (i % 251) as u8).collect();
    let sha = sha256_hex(&data);
    let r = w
        .put_artifact(&lease, "out/app.bin", data.clone(), &sha)
        .await;
    assert_eq!(
        r.status(),
        StatusCode::CREATED,
        "{}",
        r.text().await.unwrap()
    );
    let r = w
        .put_artifact(&lease, "out/bad", b"abc".to_vec(), &sha)
        .await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST, "sha256 mismatch");
    for name in ["..%2F..%2Fetc%2Fpasswd", "a/../../x", "%2Fetc%2Fpasswd"] {
        let r = w
            .put_artifact(&lease, name, b"abc".to_vec(), &sha256_hex(b"abc"))
            .await;
        assert!(r.status().is_client_error(), "{name}: {}", r.status());
    }
    let big = vec![7u8; 70 * 1024];
    let r = w
        .put_artifact(&lease, "big", big.clone(), &sha256_hex(&big))
        .await;
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);

    let list = api.get_json(&format!("/api/jobs/{id}/artifacts")).await;
    assert_eq!(
        list,
        serde_json::json!([{"name": "out/app.bin", "size": 40_000, "sha256": sha}])
    );
    let leftovers: Vec<_> = walk(&server.data_dir().join("artifacts"));
    assert_eq!(
        leftovers.len(),
        1,
        "only the good artifact is on disk: {leftovers:?}"
    );

    let path = format!("/api/jobs/{id}/artifacts/out/app.bin");
    let full = api.req(Method::GET, &path).send().await.unwrap();
    assert_eq!(full.status(), 200);
    let etag = full.headers()["etag"].to_str().unwrap().to_owned();
    assert_eq!(etag, format!("\"{sha}\""));
    assert_eq!(sha256_hex(&full.bytes().await.unwrap()), sha);
    let part = api
        .req(Method::GET, &path)
        .header("range", "bytes=100-199")
        .send()
        .await
        .unwrap();
    assert_eq!(part.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(part.headers()["content-range"], "bytes 100-199/40000");
    assert_eq!(part.bytes().await.unwrap().as_ref(), &data[100..200]);
    let suffix = api
        .req(Method::GET, &path)
        .header("range", "bytes=-10")
        .send()
        .await
        .unwrap();
    assert_eq!(suffix.bytes().await.unwrap().as_ref(), &data[39_990..]);
    let past = api
        .req(Method::GET, &path)
        .header("range", "bytes=50000-")
        .send()
        .await
        .unwrap();
    assert_eq!(past.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    let cached = api
        .req(Method::GET, &path)
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(cached.status(), StatusCode::NOT_MODIFIED);
    let missing = api
        .req(Method::GET, &format!("/api/jobs/{id}/artifacts/out/none"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

async fn expired_leases_requeue_then_error(backend: Backend) {
    let server = TestServer::start_with(
        backend,
        "[leases]\nttl = \"1s\"\nmax_attempts = 2\nlong_poll = \"1s\"\n",
    );
    let api = server.admin();
    let id = api.submit(&manifest("a", &["build"])).await.jobs[0]
        .id
        .clone();
    let w = FakeWorker::new(&server, 0);
    let first = w.lease(&["a"]).await.unwrap();
    w.start(&first).await;
    assert_eq!(w.log(&first, 1, "before the crash\n").await.status(), 200);
    assert_eq!(
        w.task_state(&first, "build", TaskState::Running, None)
            .await
            .status(),
        204
    );

    let job = wait_for_state(&api, &id, "queued").await;
    assert_eq!(job["attempt"], 2);
    assert_eq!(job["tasks"][0]["state"], "pending");
    // Every write with the old lease is refused and changes nothing.
    assert_eq!(w.heartbeat(&first).await.status(), StatusCode::CONFLICT);
    assert_eq!(
        w.log(&first, 2, "zombie\n").await.status(),
        StatusCode::CONFLICT
    );
    assert_eq!(
        w.job_state(&first, JobState::Succeeded).await.status(),
        StatusCode::CONFLICT
    );
    let log = api
        .req(Method::GET, &format!("/api/jobs/{id}/log"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(log.starts_with("before the crash\n"), "{log}");
    assert!(log.contains("attempt 1 lost"), "{log}");
    assert!(!log.contains("zombie"));

    let second = w.lease(&["a"]).await.expect("the job is leased again");
    assert_eq!(second.job.id, id);
    assert_eq!(second.job.attempt, 2);
    assert!(second.fence > first.fence);
    let job = wait_for_state(&api, &id, "error").await;
    assert!(
        job["reason"]
            .as_str()
            .unwrap()
            .contains("giving up after 2 attempts"),
        "{job}"
    );
    assert!(w.lease(&["a"]).await.is_none());
}

async fn wait_for_state(api: &common::Api, id: &str, state: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let job = api.get_json(&format!("/api/jobs/{id}")).await;
        if job["state"] == state {
            return job;
        }
        assert!(
            Instant::now() < deadline,
            "job {id} never reached {state}: {job}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn cancel_queued_and_running(backend: Backend) {
    let server = TestServer::start_with(backend, SHORT_POLL);
    let api = server.admin();
    let queued = api.submit(&manifest("a", &["x", "y"])).await.jobs[0]
        .id
        .clone();
    let r: Value = api
        .req(Method::POST, &format!("/api/jobs/{queued}/cancel"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["state"], "cancelled");
    assert_eq!(r["tasks"][1]["state"], "skipped");
    let again = api
        .req(Method::POST, &format!("/api/jobs/{queued}/cancel"))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), StatusCode::CONFLICT);

    let running = api.submit(&manifest("a", &["x", "y"])).await.jobs[0]
        .id
        .clone();
    let w = FakeWorker::new(&server, 0);
    let lease = w.lease(&["a"]).await.unwrap();
    assert_eq!(lease.job.id, running, "a cancelled job is never leased");
    w.start(&lease).await;
    w.task_state(&lease, "x", TaskState::Running, None).await;
    let r: Value = api
        .req(Method::POST, &format!("/api/jobs/{running}/cancel"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        r["state"], "running",
        "a running job stops when its worker hears of it"
    );
    let hb: Value = w.heartbeat(&lease).await.json().await.unwrap();
    assert_eq!(hb["cancel"], true);
    assert_eq!(w.job_state(&lease, JobState::Cancelled).await.status(), 204);
    let job = api.get_json(&format!("/api/jobs/{running}")).await;
    assert_eq!(job["state"], "cancelled");
    assert_eq!(job["tasks"][0]["state"], "cancelled");
    assert_eq!(
        job["tasks"][1]["state"], "skipped",
        "a task after a cancelled one never ran"
    );
}

/// The named events of a Server-Sent Events answer, with their JSON data, as they come.
fn sse_events(
    response: reqwest::Response,
) -> tokio::sync::mpsc::UnboundedReceiver<(String, Value)> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<(String, Value)>();
    tokio::spawn(async move {
        use futures_util::StreamExt;
        let mut body = response.bytes_stream();
        let mut buf = String::new();
        while let Some(Ok(piece)) = body.next().await {
            buf.push_str(&String::from_utf8_lossy(&piece));
            while let Some(end) = buf.find("\n\n") {
                let block: String = buf.drain(..end + 2).collect();
                let event = block
                    .lines()
                    .find_map(|l| l.strip_prefix("event: "))
                    .unwrap_or("")
                    .to_owned();
                let data = block
                    .lines()
                    .find_map(|l| l.strip_prefix("data: "))
                    .unwrap_or("null");
                if !event.is_empty() {
                    let _ = tx.send((event, serde_json::from_str(data).unwrap()));
                }
            }
        }
    });
    rx
}

/// Two replicas on one PostgreSQL: lines a worker appends through replica B reach a live-log
/// reader of replica A (LISTEN/NOTIFY, not its once-a-second look), and a submit through A
/// wakes a worker long-polling B.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_hear_each_other() {
    let a = TestServer::start(Backend::Postgres);
    let b = a.replica();
    let (api_a, api_b) = (a.admin(), b.admin());
    let mut worker = FakeWorker::new(&b, 0);
    // A worker long-polling B, woken by a submit through A (B's own look comes every 500 ms:
    // the median of five wakes is well under it only if A's news reaches B).
    let mut woken = Vec::new();
    let mut last = None;
    for _ in 0..5 {
        let polling = tokio::spawn(async move {
            let lease = worker.lease(&["a"]).await;
            (worker, lease)
        });
        tokio::time::sleep(Duration::from_millis(700)).await;
        let submitted = Instant::now();
        let id = api_a.submit(&manifest("a", &["build"])).await.jobs[0]
            .id
            .clone();
        let (back, lease) = polling.await.unwrap();
        woken.push(submitted.elapsed());
        worker = back;
        let lease = lease.expect("the job submitted through A, leased through B");
        assert_eq!(lease.job.id, id);
        last = Some((id, lease));
    }
    woken.sort();
    eprintln!("across replicas: a long-polling worker woken {woken:?} after a submit");
    assert!(woken[2] < Duration::from_millis(120), "{woken:?}");
    let (id, lease) = last.unwrap();
    worker.start(&lease).await;
    assert_eq!(
        api_b.get_json(&format!("/api/jobs/{id}")).await["state"],
        "running"
    );

    let response = api_a
        .req(Method::GET, &format!("/api/jobs/{id}/log/stream"))
        .timeout(Duration::from_secs(120))
        .send()
        .await
        .unwrap();
    let mut rx = sse_events(response);
    let mut took = Vec::new();
    for seq in 1..=30u64 {
        // Away from the reader's once-a-second look, so that it cannot be what wakes it.
        tokio::time::sleep(Duration::from_millis(137)).await;
        let line = format!("line {seq}\n");
        let sent = Instant::now();
        assert!(worker.log(&lease, seq, &line).await.status().is_success());
        let (event, data) = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("the line in time")
            .expect("stream open");
        assert_eq!(
            (event.as_str(), data["data"].as_str()),
            ("log", Some(line.as_str()))
        );
        took.push(sent.elapsed());
    }
    took.sort();
    let (p50, p99) = (took[took.len() / 2], took[took.len() * 99 / 100]);
    eprintln!(
        "across replicas: live log p50 {p50:?}, p99 {p99:?} ({} lines)",
        took.len()
    );
    assert!(p50 < Duration::from_millis(200), "p50 {p50:?}");
}

async fn log_stream_is_live(backend: Backend) {
    let server = TestServer::start_with(backend, SHORT_POLL);
    let api = server.admin();
    let id = api.submit(&manifest("a", &["build"])).await.jobs[0]
        .id
        .clone();
    let w = FakeWorker::new(&server, 0);
    let lease = w.lease(&["a"]).await.unwrap();
    w.start(&lease).await;
    w.log(&lease, 1, "first\n").await;

    let response = api
        .req(Method::GET, &format!("/api/jobs/{id}/log/stream"))
        .timeout(Duration::from_secs(60))
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut rx = sse_events(response);
    let next = async |rx: &mut tokio::sync::mpsc::UnboundedReceiver<(String, Value)>| {
        tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("an event in time")
            .expect("stream open")
    };
    let (event, data) = next(&mut rx).await;
    assert_eq!(
        (event.as_str(), data["data"].as_str()),
        ("log", Some("first\n"))
    );
    w.log(&lease, 2, "second\n").await;
    let (event, data) = next(&mut rx).await;
    assert_eq!(
        (
            event.as_str(),
            data["data"].as_str(),
            data["offset"].as_i64()
        ),
        ("log", Some("second\n"), Some(6))
    );
    w.job_state(&lease, JobState::Failed).await;
    let (event, data) = next(&mut rx).await;
    assert_eq!(event, "end");
    assert_eq!(data["state"], "failed");
}

async fn concurrent_workers_never_share_a_job(backend: Backend) {
    let server = TestServer::start_with(backend, SHORT_POLL);
    let api = server.admin();
    let mut submitted = HashSet::new();
    for i in 0..60 {
        let image = if i % 2 == 0 { "a" } else { "b" };
        submitted.insert(
            api.submit(&manifest(image, &["t"])).await.jobs[0]
                .id
                .clone(),
        );
    }
    let mut handles = Vec::new();
    for i in 0..12 {
        let w = FakeWorker::new(&server, i);
        handles.push(tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(lease) = w.lease(&["a", "b"]).await {
                got.push(lease.job.id);
            }
            got
        }));
    }
    let mut all = Vec::new();
    for h in handles {
        all.extend(h.await.unwrap());
    }
    let unique: HashSet<_> = all.iter().cloned().collect();
    assert_eq!(all.len(), unique.len(), "a job was leased twice: {all:?}");
    assert_eq!(unique, submitted);
}

async fn crash_loses_nothing_acknowledged(backend: Backend) {
    let mut server = TestServer::start_with(
        backend,
        "[leases]\nttl = \"2s\"\nmax_attempts = 3\nlong_poll = \"1s\"\n",
    );
    let api = server.admin();
    let ids: Vec<String> = {
        let mut ids = Vec::new();
        for _ in 0..3 {
            ids.push(
                api.submit(&manifest("a", &["build"])).await.jobs[0]
                    .id
                    .clone(),
            );
        }
        ids
    };
    let w = FakeWorker::new(&server, 0);
    let lease = w.lease(&["a"]).await.unwrap();
    w.start(&lease).await;
    for seq in 1..=20 {
        assert_eq!(
            w.log(&lease, seq, &format!("line {seq}\n")).await.status(),
            200
        );
    }
    let artifact = b"the build's output".to_vec();
    let sha = sha256_hex(&artifact);
    assert_eq!(
        w.put_artifact(&lease, "out/result", artifact.clone(), &sha)
            .await
            .status(),
        201
    );

    server.crash_and_restart();
    let api = server.admin();
    let w = FakeWorker {
        name: w.name.clone(),
        api: server.client(&worker_token(0)),
    };
    let list = api.get_json("/api/jobs").await;
    let states: Vec<(&str, &str)> = list["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| (j["id"].as_str().unwrap(), j["state"].as_str().unwrap()))
        .collect();
    assert_eq!(states.len(), 3);
    for (id, state) in &states {
        let want = if *id == lease.job.id {
            "running"
        } else {
            "queued"
        };
        assert!(ids.contains(&id.to_string()));
        assert_eq!(*state, want, "job {id}");
    }
    let log = api
        .req(Method::GET, &format!("/api/jobs/{}/log", lease.job.id))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let want: String = (1..=20).map(|s| format!("line {s}\n")).collect();
    assert_eq!(log, want);
    let got = api
        .get_bytes(&format!("/api/jobs/{}/artifacts/out/result", lease.job.id))
        .await;
    assert_eq!(got, artifact);
    // A retried append after the restart is recognised.
    let replay: Value = w.log(&lease, 20, "line 20\n").await.json().await.unwrap();
    assert_eq!(replay["stored"], false);

    // The worker died with the server: its lease expires and the job is queued again.
    let job = wait_for_state(&api, &lease.job.id, "queued").await;
    assert_eq!(job["attempt"], 2);
    assert_eq!(w.heartbeat(&lease).await.status(), StatusCode::CONFLICT);
}

async fn long_poll_wakes_on_submit(backend: Backend) {
    let server = TestServer::start_with(
        backend,
        "[leases]\nttl = \"30s\"\nmax_attempts = 3\nlong_poll = \"5s\"\n",
    );
    let api = server.admin();
    let w = FakeWorker::new(&server, 0);
    let started = Instant::now();
    let waiter = tokio::spawn(async move { w.lease(&["a"]).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let id = api.submit(&manifest("a", &["t"])).await.jobs[0].id.clone();
    let lease = waiter
        .await
        .unwrap()
        .expect("the waiting worker gets the new job");
    assert_eq!(lease.job.id, id);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "answered before the long poll ran out"
    );

    let w = FakeWorker::new(&server, 1);
    let started = Instant::now();
    assert!(w.lease(&["a"]).await.is_none());
    assert!(
        started.elapsed() >= Duration::from_secs(4),
        "with no work the call waits the long poll out"
    );
}

async fn secrets_reach_only_the_lease(backend: Backend) {
    let server = TestServer::start_with(backend, SHORT_POLL);
    let api = server.admin();
    let text = format!("secrets = [\"deploy-key\"]\n{}", manifest("a", &["t"]));
    let r = api
        .req(Method::POST, "/api/jobs")
        .body(text.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::BAD_REQUEST,
        "an unknown secret is refused at submit"
    );
    assert!(
        r.text()
            .await
            .unwrap()
            .contains("vmfarm server secret set deploy-key --user admin")
    );

    let said = server.set_secret("deploy-key", b"s3cr3t-value");
    assert!(
        said.contains("secret deploy-key stored (12 bytes, sealed), owned by admin"),
        "{said}"
    );
    let listed = std::process::Command::new(env!("CARGO_BIN_EXE_vmfarm"))
        .args(["server", "--config"])
        .arg(server.data_dir().join("server.toml"))
        .args(["secret", "list", "--json"])
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&listed.stdout);
    let secrets: Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(
        (
            &secrets[0]["name"],
            &secrets[0]["owner"],
            &secrets[0]["shared_with"]
        ),
        (
            &"deploy-key".into(),
            &"admin".into(),
            &serde_json::json!([])
        ),
        "{listed}"
    );
    assert!(
        !listed.contains("s3cr3t"),
        "names, owners and sharing, never values"
    );
    if backend == Backend::Sqlite {
        // The database alone reveals no value: not the file, not its write-ahead log.
        let mut files = 0;
        for entry in std::fs::read_dir(server.data_dir()).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if name.starts_with("vmfarm.db") {
                let bytes = std::fs::read(&path).unwrap();
                assert!(
                    !bytes.windows(12).any(|w| w == b"s3cr3t-value"),
                    "{name} holds the secret's value"
                );
                files += 1;
            }
        }
        assert!(
            files >= 2,
            "the database and its WAL were read ({files} files)"
        );
    }

    let id = api.submit(&text).await.jobs[0].id.clone();
    let job = api
        .req(Method::GET, &format!("/api/jobs/{id}"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!job.contains("s3cr3t"));
    let lease = FakeWorker::new(&server, 0).lease(&["a"]).await.unwrap();
    use base64::Engine;
    let value = base64::engine::general_purpose::STANDARD
        .decode(&lease.secrets["deploy-key"])
        .unwrap();
    assert_eq!(value, b"s3cr3t-value");
}

/// `vmfarm server token ...` against a running server's database.
fn token_cli(server: &TestServer, args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vmfarm"))
        .args(["server", "--config"])
        .arg(server.data_dir().join("server.toml"))
        .arg("token")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "vmfarm server token {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn tokens_are_listed_and_revoked_on_a_running_server(backend: Backend) {
    let server = TestServer::start(backend);
    let token = server.create_token("ci", "admin", "submit,read");
    let ci = server.client(&token);
    assert_eq!(
        ci.req(Method::GET, "/api/jobs")
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );

    let listed = token_cli(&server, &["list", "--json"]);
    let tokens: Value = serde_json::from_str(&listed).unwrap();
    let ci_row = tokens
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "ci")
        .expect("the new token is listed");
    assert_eq!(
        (&ci_row["user"], &ci_row["scopes"], &ci_row["source"]),
        (&"admin".into(), &"submit,read".into(), &"cli".into())
    );
    assert!(!listed.contains(&token), "the token itself is never shown");
    let table = token_cli(&server, &["list"]);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("admin ") && l.ends_with("config")),
        "{table}"
    );

    assert_eq!(
        token_cli(&server, &["revoke", "ci"]),
        "revoked 1 token(s) named ci\n"
    );
    let after = ci.req(Method::GET, "/api/jobs").send().await.unwrap();
    assert_eq!(
        after.status(),
        StatusCode::UNAUTHORIZED,
        "at once, on the running server"
    );
    assert_eq!(
        server
            .admin()
            .req(Method::GET, "/api/jobs")
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
}

/// `vmfarm` with `args` against `server` as the admin.
fn vmfarm(server: &TestServer, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_vmfarm"))
        .args(args)
        .env("VMFARM_SERVER", &server.url)
        .env("VMFARM_TOKEN", common::ADMIN_TOKEN)
        .output()
        .unwrap()
}

/// Scripts tell a job's end apart by the exit status of `logs --follow` (and `submit
/// --follow`): failed 2, timed out 3, cancelled 4, error 5; a usage or connection error is 1;
/// `--json` prints what a script parses.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cli_exit_statuses_and_json() {
    let server = TestServer::start_with(Backend::Sqlite, SHORT_POLL);
    let api = server.admin();
    let worker = FakeWorker::new(&server, 0);
    for (end, status) in [
        (JobState::Succeeded, 0),
        (JobState::Failed, 2),
        (JobState::TimedOut, 3),
        (JobState::Cancelled, 4),
        (JobState::Error, 5),
    ] {
        let id = api.submit(&manifest("a", &["build"])).await.jobs[0]
            .id
            .clone();
        let follower = std::process::Command::new(env!("CARGO_BIN_EXE_vmfarm"))
            .args(["logs", "--follow", "--json", &id])
            .env("VMFARM_SERVER", &server.url)
            .env("VMFARM_TOKEN", common::ADMIN_TOKEN)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let lease = worker.lease(&["a"]).await.unwrap();
        worker.start(&lease).await;
        worker.log(&lease, 1, "compiling\n").await;
        let r = worker.job_state(&lease, end).await;
        assert_eq!(r.status(), 204, "{}", r.text().await.unwrap());
        let out = tokio::task::spawn_blocking(move || follower.wait_with_output())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(status),
            "{end}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert!(
            lines
                .iter()
                .any(|l| l["data"] == "compiling\n" && l["task"] == "build"),
            "{lines:?}"
        );
        assert_eq!(lines.last().unwrap(), &serde_json::json!({ "state": end }));
        // The log without --follow, as JSON lines too.
        let out = vmfarm(&server, &["logs", "--json", &id]);
        assert!(out.status.success());
        let first: Value =
            serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().next().unwrap())
                .unwrap();
        assert_eq!(first["offset"], 0, "{first}");
    }

    // submit --json and status --json and cancel --json parse; the job waits for an image no
    // worker offers, and says so.
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), manifest("zz", &["build"])).unwrap();
    let out = vmfarm(
        &server,
        &["submit", "--json", &file.path().display().to_string()],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let submitted: Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = submitted["jobs"][0]["id"].as_str().unwrap().to_owned();
    assert_eq!(
        submitted["jobs"][0]["waiting"],
        "no worker offers image `zz` (workers offer: a); it waits until one does"
    );
    let out = vmfarm(&server, &["cancel", "--json", &id]);
    let cancelled: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(cancelled["state"], "cancelled");

    // Usage and connection errors are 1; help says what each status means.
    let out = vmfarm(&server, &["submit"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("FILE"));
    let out = vmfarm(&server, &["status", "--server", "http://127.0.0.1:9"]);
    assert_eq!(out.status.code(), Some(1));
    let out = vmfarm(&server, &["logs", "--help"]);
    assert_eq!(out.status.code(), Some(0));
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("4  a followed job was cancelled"), "{help}");

    // validate --json: each file's verdict, errors with line and column.
    let bad = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        bad.path(),
        "image = \"a\"\n[[tasks]]\nname = \"t\"\nscrpt = \"x\"\n",
    )
    .unwrap();
    let out = vmfarm(
        &server,
        &[
            "validate",
            "--json",
            &file.path().display().to_string(),
            &bad.path().display().to_string(),
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    let verdicts: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(verdicts[0]["ok"], true, "{verdicts}");
    assert_eq!(verdicts[1]["ok"], false, "{verdicts}");
    assert_eq!(
        (
            &verdicts[1]["errors"][1]["line"],
            &verdicts[1]["errors"][1]["column"]
        ),
        (&4.into(), &1.into()),
        "{verdicts}"
    );

    // Completions and man pages come from the same definitions.
    let out = vmfarm(&server, &["completions", "bash"]);
    let script = String::from_utf8_lossy(&out.stdout);
    assert!(
        script.contains("_vmfarm") && script.contains("--follow"),
        "{script}"
    );
    let pages = tempfile::tempdir().unwrap();
    let out = vmfarm(&server, &["man-pages", &pages.path().display().to_string()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let submit_page = std::fs::read_to_string(pages.path().join("vmfarm-submit.1")).unwrap();
    assert!(
        submit_page.contains(".TH") && submit_page.contains("follow"),
        "{submit_page}"
    );
    assert!(pages.path().join("vmfarm-server-token-create.1").is_file());
    let top = std::fs::read_to_string(pages.path().join("vmfarm.1")).unwrap();
    assert!(top.contains("Exit status"), "{top}");
}

/// Each request has an id, the caller's when it is short and plain, else a new one: in the
/// answer's `x-request-id` and in its line of the access log; `VMFARM_LOG_FORMAT=json` makes
/// every log line a JSON object, as log shippers read them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_lines_are_json_with_request_ids() {
    use std::io::BufRead as _;
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = dir.path().join("server.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:{port}\"\ndata_dir = \"{}\"\n\
             [[tokens]]\nname = \"admin\"\ntoken = \"{}\"\nscopes = [\"admin\"]\n",
            dir.path().display(),
            common::ADMIN_TOKEN
        ),
    )
    .unwrap();
    let log = dir.path().join("server.log");
    let mut server = std::process::Command::new(env!("CARGO_BIN_EXE_vmfarm"))
        .args(["server", "--config"])
        .arg(&config)
        .env("VMFARM_LOG", "info")
        .env("VMFARM_LOG_FORMAT", "json")
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut first = String::new();
    std::io::BufReader::new(server.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(first.starts_with("vmfarm server listening on"), "{first}");
    let http = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}");
    let id_of = |r: &reqwest::Response| {
        r.headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let kept = http
        .get(format!("{url}/healthz"))
        .header("x-request-id", "ci-run-42.a_b")
        .send()
        .await
        .unwrap();
    assert_eq!(id_of(&kept), "ci-run-42.a_b");
    let replaced = http
        .get(format!("{url}/api/jobs/no-such"))
        .bearer_auth(common::ADMIN_TOKEN)
        .header("x-request-id", "two words {and} more")
        .send()
        .await
        .unwrap();
    let made = id_of(&replaced);
    assert!(
        made.len() == 16 && made.bytes().all(|b| b.is_ascii_hexdigit()),
        "{made:?}"
    );
    let status = replaced.status().as_u16();
    server.kill().unwrap();
    server.wait().unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let access: Vec<&Value> = lines
        .iter()
        .filter(|l| l["target"] == "vmfarm::access")
        .collect();
    let line_of = |id: &str| {
        access
            .iter()
            .find(|l| l["fields"]["request_id"] == id)
            .unwrap_or_else(|| panic!("no access line for {id}: {text}"))
    };
    let health = line_of("ci-run-42.a_b");
    assert_eq!(
        (
            &health["fields"]["method"],
            &health["fields"]["path"],
            &health["fields"]["status"]
        ),
        (&"GET".into(), &"/healthz".into(), &200.into()),
        "{health}"
    );
    assert!(
        health["fields"]["duration_ms"].as_f64().is_some(),
        "{health}"
    );
    let other = line_of(&made);
    assert_eq!(other["fields"]["status"], status, "{other}");
    assert_eq!(other["fields"]["route"], "/api/jobs/{id}", "{other}");
}
