//! The web UI in a real browser (headless Chromium over WebDriver) against a real server:
//! log in, see a manifest's errors with line and column, watch a job's log arrive live, download
//! an artifact, cancel a running job, and save screenshots of the main pages.

#[path = "common/browser.rs"]
mod browser;
#[macro_use]
mod common;

use browser::Browser;
use common::worker::{FakeWorker, sha256_hex};
use common::{Backend, TestServer};
use vmfarm_proto::{JobState, TaskState};

const IMAGES: [&str; 2] = ["debian-12", "alpine-3"];

fn server_with_user(backend: Backend) -> TestServer {
    let hash = vmfarm_server::web::session::hash_password("alice-password").unwrap();
    TestServer::start_with(
        backend,
        &format!(
            "[leases]\nlong_poll = \"1s\"\n[[users]]\nname = \"alice\"\npassword_hash = \"{hash}\"\n"
        ),
    )
}

async fn log_in(browser: &Browser, server: &TestServer, user: &str, password: &str) {
    browser.goto(&format!("{}/", server.url)).await;
    assert_eq!(
        browser.path().await,
        "/login",
        "the dashboard needs a login"
    );
    browser.fill("#user", user).await;
    browser.fill("#password", password).await;
    browser.click("#login-submit").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn web_login_submit_watch_download_cancel() {
    let server = server_with_user(Backend::Sqlite);
    let worker = FakeWorker::new(&server, 0);
    // The worker calls in once, so the dashboard and the image picker know its images.
    assert!(worker.lease(&IMAGES).await.is_none());
    let browser = Browser::start().await;

    // A wrong password is refused on the login page; the right one opens the dashboard.
    log_in(&browser, &server, "alice", "wrong-password").await;
    browser.wait_text("#login-error", "wrong password").await;
    log_in(&browser, &server, "alice", "alice-password").await;
    browser.wait_text("h1", "Dashboard").await;
    browser.wait_text("#workers", "debian-12").await;

    // An invalid manifest: its errors show with line and column, and nothing is queued.
    browser.goto(&format!("{}/submit", server.url)).await;
    let picker = browser.text("#image-picker").await;
    assert!(
        picker.contains("alpine-3") && picker.contains("debian-12"),
        "{picker}"
    );
    browser
        .set_value(
            "#manifest",
            "image = \"debian-12\"\n\n[[tasks]]\nname = \"build\"\nscrpt = \"make\"\n",
        )
        .await;
    browser.click("#submit-button").await;
    let errors = browser
        .wait_text("#manifest-errors", "line 5, column 1")
        .await;
    assert!(errors.contains("nothing was queued"), "{errors}");
    let jobs = server.admin().get_json("/api/jobs").await;
    assert_eq!(jobs["jobs"].as_array().unwrap().len(), 0, "{jobs}");

    // A valid one is queued and its page opens.
    let manifest = "image = \"debian-12\"\n\n[[tasks]]\nname = \"build\"\nscript = \"make\"\n\n\
                    [[artifacts]]\npath = \"out/hello.txt\"\n";
    browser.set_value("#manifest", manifest).await;
    browser.click("#submit-button").await;
    browser.wait_text("#job-state", "queued").await;
    let job_path = browser.path().await;
    assert_eq!(job_path, "/jobs/1");

    // The worker runs it: log lines appear on the open page without a reload.
    browser
        .client
        .execute("window.notReloaded = true;", vec![])
        .await
        .unwrap();
    let lease = worker.lease(&IMAGES).await.expect("the job is leased");
    worker.start(&lease).await;
    worker
        .task_state(&lease, "build", TaskState::Running, None)
        .await;
    worker.log(&lease, 1, "cc -o hello hello.c\n").await;
    worker
        .log(&lease, 2, "\u{1b}[32mOK\u{1b}[0m hello built\n")
        .await;
    let log = browser.wait_text("#log", "hello built").await;
    assert!(log.contains("cc -o hello hello.c"), "{log}");
    let green = browser.text("#log .fg32").await;
    assert_eq!(green, "OK", "ANSI green is rendered as a coloured span");
    // Auto-scroll follows new lines, and stops once the user scrolls up.
    let many: String = (1..=200).map(|i| format!("line {i}\n")).collect();
    worker.log(&lease, 3, &many).await;
    browser.wait_text("#log", "line 200").await;
    let at_end = "const l = document.getElementById('log'); \
                  return l.scrollTop + l.clientHeight >= l.scrollHeight - 4;";
    assert_eq!(browser.client.execute(at_end, vec![]).await.unwrap(), true);
    browser
        .client
        .execute("document.getElementById('log').scrollTop = 0;", vec![])
        .await
        .unwrap();
    let follow = "return document.getElementById('follow').checked;";
    let started = std::time::Instant::now();
    while browser.client.execute(follow, vec![]).await.unwrap() != false {
        assert!(
            started.elapsed().as_secs() < 10,
            "scrolling up kept following"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    worker.log(&lease, 4, "after scrolling up\n").await;
    browser.wait_text("#log", "after scrolling up").await;
    let top = "return document.getElementById('log').scrollTop;";
    assert_eq!(browser.client.execute(top, vec![]).await.unwrap(), 0);
    let still_same_page = browser
        .client
        .execute("return window.notReloaded === true;", vec![])
        .await
        .unwrap();
    assert_eq!(
        still_same_page,
        serde_json::json!(true),
        "the page reloaded"
    );

    // It produces an artifact and succeeds; the page shows the end and the artifact.
    let artifact = b"hello, world\n".repeat(100);
    let r = worker
        .put_artifact(
            &lease,
            "out/hello.txt",
            artifact.clone(),
            &sha256_hex(&artifact),
        )
        .await;
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    worker
        .task_state(&lease, "build", TaskState::Succeeded, Some(0))
        .await;
    worker.job_state(&lease, JobState::Succeeded).await;
    browser.wait_text("#job-state", "succeeded").await;
    let table = browser.wait_text("#artifacts", "out/hello.txt").await;
    assert!(table.contains(&sha256_hex(&artifact)), "{table}");
    browser.wait_text("#log", "hello built").await;
    let shot = browser.screenshot("job-page").await;
    println!("screenshot: {}", shot.display());

    // Downloading it from the page gives the same bytes.
    browser.click("#artifacts a").await;
    let downloaded = browser.downloaded("hello.txt").await;
    assert_eq!(sha256_hex(&downloaded), sha256_hex(&artifact));

    // A multi-OS group of Alice's (from her API token): one job runs and is cancelled from its
    // page.
    let submitted = server
        .client(&server.create_token("alice-ci", "alice", "submit,read"))
        .submit("images = [\"debian-12\", \"alpine-3\"]\ntags = [\"nightly\"]\n\n[[tasks]]\nname = \"build\"\nscript = \"make\"\n")
        .await;
    let lease = worker.lease(&["debian-12"]).await.expect("leased");
    worker.start(&lease).await;
    worker.log(&lease, 1, "building for a while\n").await;
    browser
        .goto(&format!("{}/jobs/{}", server.url, lease.job.id))
        .await;
    browser.wait_text("#job-state", "running").await;
    browser.wait_text("#log", "building for a while").await;

    // The dashboard meanwhile: the queue per image, the running job, the workers, the groups.
    browser.goto(&format!("{}/", server.url)).await;
    browser.wait_text("#queue", "alpine-3").await;
    browser.wait_text("#running", "debian-12").await;
    browser.wait_text("#groups", "1 succeeded").await;
    browser.screenshot("dashboard").await;

    browser
        .goto(&format!("{}/jobs/{}", server.url, lease.job.id))
        .await;
    browser.click("#cancel").await;
    browser
        .wait_text("#cancel-requested", "Cancel requested")
        .await;
    let beat: serde_json::Value = worker.heartbeat(&lease).await.json().await.unwrap();
    assert_eq!(beat["cancel"], true, "{beat}");
    worker.job_state(&lease, JobState::Cancelled).await;
    browser.wait_text("#job-state", "cancelled").await;

    // The group's matrix links each job in its state's column.
    browser
        .goto(&format!("{}/groups/{}", server.url, submitted.group_id))
        .await;
    let matrix = browser.wait_text("#matrix", "alpine-3").await;
    assert!(matrix.contains(&format!("#{}", lease.job.id)), "{matrix}");
    browser.screenshot("group-page").await;

    // History filters by tag and by state.
    browser
        .goto(&format!("{}/history?state=succeeded", server.url))
        .await;
    let history = browser.wait_text("#history", "#1").await;
    assert!(!history.contains("cancelled"), "{history}");

    // Rerun queues the finished job's manifest again, as a new job linked to it.
    browser.goto(&format!("{}{job_path}", server.url)).await;
    browser.click("#resubmit").await;
    browser.wait_text("#job-state", "queued").await;
    let again = browser.path().await;
    assert_eq!(again, "/jobs/4", "jobs 2 and 3 are the group's");
    let original = job_path.trim_start_matches("/jobs/");
    browser
        .wait_text("#rerun-of", &format!("Rerun of #{original}"))
        .await;
    browser.wait_text("#artifacts", "No artifacts yet").await;

    // A job for an image that no worker offers says so on its page, and which images they do.
    browser.goto(&format!("{}/submit", server.url)).await;
    browser
        .set_value(
            "#manifest",
            "image = \"fedora-41\"\n[[tasks]]\nname = \"t\"\nscript = \"true\"\n",
        )
        .await;
    browser.click("#submit-button").await;
    browser.wait_text("#job-state", "queued").await;
    // (The fake worker last called in with debian-12 alone.)
    browser
        .wait_text(
            "#job-waiting",
            "no worker offers image `fedora-41` (workers offer: debian-12); it waits until one does",
        )
        .await;

    browser.close().await;
}

// Sessions, users, history and schedules on both databases.
on_both_databases!(web_admin_token_logs_in_and_forms_need_csrf);

async fn web_admin_token_logs_in_and_forms_need_csrf(backend: Backend) {
    let server = server_with_user(backend);
    let browser = Browser::start().await;
    log_in(&browser, &server, "", common::ADMIN_TOKEN).await;
    browser.wait_text("h1", "Dashboard").await;
    browser.wait_text(".who", "token admin").await;
    // A form posted without this session's CSRF token is refused.
    browser.goto(&format!("{}/submit", server.url)).await;
    browser
        .set_value("#submit-form input[name=csrf]", "forged")
        .await;
    browser
        .set_value(
            "#manifest",
            "image = \"debian-12\"\n[[tasks]]\nname = \"b\"\nscript = \"true\"\n",
        )
        .await;
    browser.click("#submit-button").await;
    browser
        .wait_text("#error", "did not come from this site")
        .await;
    let jobs = server.admin().get_json("/api/jobs").await;
    assert_eq!(jobs["jobs"].as_array().unwrap().len(), 0, "{jobs}");

    // History pages through many jobs, newest first, keeping its filters.
    for _ in 0..30 {
        server
            .admin()
            .submit("image = \"debian-12\"\ntags = [\"many\"]\n[[tasks]]\nname = \"b\"\nscript = \"true\"\n")
            .await;
    }
    browser
        .goto(&format!("{}/history?tag=many&state=queued", server.url))
        .await;
    let first = browser.wait_text("#history", "#30").await;
    assert!(!first.contains("#5 "), "{first}");
    browser.click("#older").await;
    let second = browser.wait_text("#history", "#5 ").await;
    assert!(!second.contains("#30"), "{second}");
    let url = browser.client.current_url().await.unwrap();
    assert!(url.as_str().contains("tag=many"), "{url}");

    // A schedule made in the UI: a bad cron is explained, a good one gets its page.
    browser.goto(&format!("{}/schedules", server.url)).await;
    browser
        .fill("#schedule-form input[name=name]", "nightly")
        .await;
    browser
        .fill("#schedule-form input[name=cron]", "0 3 * * 9")
        .await;
    browser
        .set_value(
            "#schedule-form textarea",
            "images = [\"debian-12\", \"alpine-3\"]\n[[tasks]]\nname = \"b\"\nscript = \"true\"\n",
        )
        .await;
    browser.click("#schedule-form button").await;
    browser
        .wait_text("#schedule-error", "invalid cron expression")
        .await;
    browser
        .fill("#schedule-form input[name=cron]", "0 3 * * *")
        .await;
    browser
        .fill("#schedule-form input[name=timezone]", "Europe/Paris")
        .await;
    browser.click("#schedule-form button").await;
    browser.wait_text("h1", "Schedule nightly").await;
    browser.wait_text("#runs", "No run yet").await;
    browser.goto(&format!("{}/schedules", server.url)).await;
    browser.wait_text("#schedules", "Europe/Paris").await;
    browser.close().await;
}

/// `vmfarm server user add NAME [--admin]` with `password` on its standard input; what it printed.
fn add_user(server: &TestServer, name: &str, password: &str, admin: bool) -> String {
    use std::io::Write;
    let mut args = vec![
        "server",
        "user",
        "add",
        name,
        "--database-url",
        &server.database_url,
    ];
    if admin {
        args.push("--admin");
    }
    let mut add = std::process::Command::new(env!("CARGO_BIN_EXE_vmfarm"))
        .args(&args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    add.stdin
        .take()
        .unwrap()
        .write_all(format!("{password}\n").as_bytes())
        .unwrap();
    let out = add.wait_with_output().unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout).into_owned()
}

// Two users and an admin, each in the browser: each sees only their own jobs and the admin all.
on_both_databases!(web_users_see_only_their_own_jobs);

async fn web_users_see_only_their_own_jobs(backend: Backend) {
    let server = server_with_user(backend);
    assert_eq!(
        add_user(&server, "bob", "bob-password", false),
        "user bob can log in to the web UI\n"
    );
    assert_eq!(
        add_user(&server, "carol", "carol-password", true),
        "user carol (an admin) can log in to the web UI\n"
    );
    let by_admin = server
        .admin()
        .submit("image = \"debian-12\"\n[[tasks]]\nname = \"b\"\nscript = \"true\"\n")
        .await
        .jobs[0]
        .id
        .clone();
    let browser = Browser::start().await;

    // Alice submits in the page: the job is hers, and says so.
    log_in(&browser, &server, "alice", "alice-password").await;
    browser.wait_text(".who", "alice").await;
    browser.goto(&format!("{}/submit", server.url)).await;
    browser
        .set_value(
            "#manifest",
            "image = \"debian-12\"\n[[tasks]]\nname = \"mine\"\nscript = \"true\"\n",
        )
        .await;
    browser.click("#submit-button").await;
    browser.wait_text("#owner", "alice").await;
    let path = browser.path().await;
    let hers = path.trim_start_matches("/jobs/").to_owned();
    assert!(hers.parse::<u64>().is_ok(), "on the job's page: {path}");
    browser.goto(&format!("{}/history", server.url)).await;
    let history = browser.wait_text("#history", &format!("#{hers}")).await;
    assert!(!history.contains(&format!("#{by_admin}")), "{history}");
    browser
        .goto(&format!("{}/jobs/{by_admin}", server.url))
        .await;
    browser
        .wait_text("#error", &format!("no job {by_admin}"))
        .await;

    // Bob sees none of it: her job is a missing one for him.
    browser.client.delete_all_cookies().await.unwrap();
    log_in(&browser, &server, "bob", "bob-password").await;
    browser.wait_text(".who", "bob").await;
    browser.goto(&format!("{}/jobs/{hers}", server.url)).await;
    browser.wait_text("#error", &format!("no job {hers}")).await;
    browser.goto(&format!("{}/history", server.url)).await;
    browser.wait_text("#history", "No job matches").await;

    // Carol is an admin: she sees both, with their owners.
    browser.client.delete_all_cookies().await.unwrap();
    log_in(&browser, &server, "carol", "carol-password").await;
    browser.wait_text(".who", "carol").await;
    browser.goto(&format!("{}/history", server.url)).await;
    let all = browser.wait_text("#history", &format!("#{by_admin}")).await;
    assert!(all.contains(&format!("#{hers}")), "{all}");
    assert!(all.contains("alice") && all.contains("admin"), "{all}");
    browser.goto(&format!("{}/jobs/{hers}", server.url)).await;
    browser.wait_text("#owner", "alice").await;
    browser.close().await;
}
