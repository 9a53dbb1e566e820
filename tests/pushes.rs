//! Builds from git pushes, end to end: a real bare repository whose `hooks/post-receive` is
//! `vmfarm hook post-receive`, a real `git push` from a clone, a real server and a real worker
//! running the pushed commit in a guest (QEMU backend).

mod common;

use common::farm::{TestWorker, images};
use common::{ADMIN_TOKEN, Backend, TestServer, log_of, wait_ended};
use std::path::Path;
use std::process::Command;

const WORKER: &str = "[slots]\ncpus = 2\nmemory = \"2GiB\"\n[guest]\ndefault_cpus = 1\ndefault_memory = \"512MiB\"\nboot_timeout = \"120s\"\n";

/// Runs git in `dir` as a test user; its stdout and stderr together.
fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["-c", "user.name=t", "-c", "user.email=t@t"])
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "git {args:?}: {text}");
    text
}

/// A bare repository `app.git` with the vmfarm hook installed for a server, and a clone of it.
struct Repos {
    clone: std::path::PathBuf,
}

fn repos(dir: &Path, server_url: &str) -> Repos {
    let bare = dir.join("app.git");
    let clone = dir.join("work");
    git(
        dir,
        &[
            "init",
            "--quiet",
            "--bare",
            "--initial-branch=main",
            "app.git",
        ],
    );
    let hook = bare.join("hooks/post-receive");
    std::fs::write(
        &hook,
        format!(
            "#!/bin/sh\nexec env VMFARM_SERVER={server_url} VMFARM_TOKEN={ADMIN_TOKEN} {} hook post-receive --repository app\n",
            env!("CARGO_BIN_EXE_vmfarm")
        ),
    )
    .unwrap();
    std::fs::set_permissions(&hook, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    git(dir, &["clone", "--quiet", bare.to_str().unwrap(), "work"]);
    Repos { clone }
}

/// Commits `files` (path, text) in the clone and pushes main; what the push printed.
fn commit_and_push(repos: &Repos, files: &[(&str, &str)]) -> (String, String) {
    for (path, text) in files {
        let path = repos.clone.join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }
    git(&repos.clone, &["add", "."]);
    git(&repos.clone, &["commit", "--quiet", "-m", "change"]);
    let commit = git(&repos.clone, &["rev-parse", "HEAD"]).trim().to_owned();
    let said = git(&repos.clone, &["push", "--quiet", "origin", "main"]);
    (commit, said)
}

/// The job ids a push printed (`remote:   FILE: job ID (IMAGE) URL`), in order.
fn job_ids(said: &str) -> Vec<String> {
    said.lines()
        .filter_map(|l| l.split(": job ").nth(1))
        .filter_map(|rest| rest.split(' ').next())
        .map(str::to_owned)
        .collect()
}

const BUILD: &str = "image = \"tiny\"\n[[tasks]]\nname = \"show\"\nscript = \"cat app/VERSION\"\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_a_git_push_builds_the_pushed_commit_with_the_repositorys_manifests() {
    let dir = images(&["tiny"]);
    let holder = tempfile::tempdir().unwrap();
    // The repository's path is known before the server starts: its config names it.
    let server = TestServer::start_with(
        Backend::Sqlite,
        &format!(
            "[[repositories]]\nname = \"app\"\nurl = \"{}/app.git\"\n",
            holder.path().display()
        ),
    );
    let repos = repos(holder.path(), &server.url);
    let _worker = TestWorker::start(
        &server,
        0,
        &dir,
        &format!(
            "allowed_local_sources = [\"{}\"]\n{WORKER}",
            holder.path().display()
        ),
    );
    let api = server.admin();

    let (first, said) = commit_and_push(
        &repos,
        &[(".vmfarm/build.toml", BUILD), ("VERSION", "version one\n")],
    );
    let ids = job_ids(&said);
    assert_eq!(ids.len(), 1, "the push names its job: {said}");
    assert!(
        said.contains(&format!("{}/jobs/{}", server.url, ids[0])),
        "{said}"
    );
    let job = wait_ended(&api, &ids[0]).await;
    let log = log_of(&api, &ids[0]).await;
    assert_eq!(job["state"], "succeeded", "{job}\n{log}");
    assert!(log.contains("version one"), "{log}");
    assert_eq!(job["push"]["repository"], "app");
    assert_eq!(job["push"]["git_ref"], "refs/heads/main");
    assert_eq!(job["push"]["commit"], first.as_str());
    assert_eq!(job["push"]["file"], ".vmfarm/build.toml");

    let (second, said) = commit_and_push(&repos, &[("VERSION", "version two\n")]);
    let next = job_ids(&said);
    assert_eq!(next.len(), 1, "{said}");
    let job = wait_ended(&api, &next[0]).await;
    let log = log_of(&api, &next[0]).await;
    assert_eq!(job["state"], "succeeded", "{job}\n{log}");
    assert!(
        log.contains("version two"),
        "the second push builds its own commit: {log}"
    );
    assert_eq!(job["push"]["commit"], second.as_str());

    // A rerun of the first job builds the first commit again, although main has moved on.
    let out = Command::new(env!("CARGO_BIN_EXE_vmfarm"))
        .args(["rerun", &ids[0]])
        .env("VMFARM_SERVER", &server.url)
        .env("VMFARM_TOKEN", ADMIN_TOKEN)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rerun = String::from_utf8_lossy(&out.stdout)
        .split('\t')
        .next()
        .unwrap()
        .to_owned();
    let job = wait_ended(&api, &rerun).await;
    let log = log_of(&api, &rerun).await;
    assert_eq!(job["state"], "succeeded", "{job}\n{log}");
    assert!(log.contains("version one"), "{log}");
    assert_eq!(job["rerun_of"], ids[0].as_str());
    assert_eq!(job["push"]["commit"], first.as_str());

    // A manifest with an error builds nothing, and says where, in the push and in its record.
    let (_, said) = commit_and_push(
        &repos,
        &[(
            ".vmfarm/broken.toml",
            "image = \"tiny\"\ntimeout = \"soon\"\n[[tasks]]\nname = \"t\"\nscript = \"true\"\n",
        )],
    );
    assert!(said.contains(".vmfarm/broken.toml:2:"), "{said}");
    assert_eq!(
        job_ids(&said).len(),
        1,
        "the good manifest still builds: {said}"
    );
    let push_id = said
        .lines()
        .find_map(|l| l.split(": push ").nth(1))
        .unwrap()
        .trim()
        .to_owned();
    let push = api.get_json(&format!("/api/pushes/{push_id}")).await;
    // The web UI shows the same: the push's page, and where a job comes from.
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let session = common::token_session(&http, &server.url).await;
    let page = |path: String| {
        let request = http
            .get(format!("{}{path}", server.url))
            .header("cookie", &session);
        async move { request.send().await.unwrap().text().await.unwrap() }
    };
    let push_page = page(format!("/pushes/{push_id}")).await;
    assert!(push_page.contains("broken.toml:2:"), "{push_page}");
    let job_page = page(format!("/jobs/{rerun}")).await;
    assert!(job_page.contains(&first[..12]), "{job_page}");
    assert!(
        job_page.contains(&format!("Rerun of <a href=\"/jobs/{}\"", ids[0])),
        "{job_page}"
    );
    let broken = &push["files"][0];
    assert_eq!(broken["file"], ".vmfarm/broken.toml", "{push}");
    assert_eq!(broken["errors"][0]["line"], 2, "{push}");
    assert!(broken["jobs"].as_array().unwrap().is_empty());
    assert_eq!(
        push["files"][1]["jobs"].as_array().unwrap().len(),
        1,
        "{push}"
    );
}

/// The one-command farm takes the same config files: `vmfarm up --server-config` with a
/// repository and `--worker-config` allowing its local path builds a push, as README says.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_vmfarm_up_with_config_files_builds_a_push() {
    let images_dir = images(&["tiny"]);
    let holder = tempfile::tempdir().unwrap();
    let data = holder.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::os::unix::fs::symlink(&images_dir, data.join("images")).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let server_config = holder.path().join("server.toml");
    std::fs::write(
        &server_config,
        format!(
            "[[tokens]]\nname = \"admin\"\ntoken = \"{ADMIN_TOKEN}\"\nscopes = [\"admin\"]\n\
             [[repositories]]\nname = \"app\"\nurl = \"{}/app.git\"\n",
            holder.path().display()
        ),
    )
    .unwrap();
    let worker_config = holder.path().join("worker.toml");
    std::fs::write(
        &worker_config,
        format!(
            "allowed_local_sources = [\"{}\"]\n{WORKER}[jail]\nfirst_uid = {}\nuid_count = 4\n",
            holder.path().display(),
            2_500_000 + (std::process::id() % 100_000) * 128,
        ),
    )
    .unwrap();
    let log = std::fs::File::create(holder.path().join("up.log")).unwrap();
    let mut up = Command::new(env!("CARGO_BIN_EXE_vmfarm"))
        .args([
            "up",
            "--no-build",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--data",
        ])
        .arg(&data)
        .arg("--server-config")
        .arg(&server_config)
        .arg("--worker-config")
        .arg(&worker_config)
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let http = reqwest::Client::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while http.get(format!("{url}/healthz")).send().await.is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "vmfarm up never answered"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let repos = repos(holder.path(), &url);
    let (_, said) = commit_and_push(&repos, &[(".vmfarm.toml", BUILD), ("VERSION", "from up\n")]);
    let ids = job_ids(&said);
    assert_eq!(ids.len(), 1, "{said}");
    let api = common::Api {
        http: reqwest::Client::new(),
        base: url.clone(),
        token: ADMIN_TOKEN.to_owned(),
    };
    let job = wait_ended(&api, &ids[0]).await;
    let log = log_of(&api, &ids[0]).await;
    up.kill().unwrap();
    up.wait().unwrap();
    assert_eq!(
        job["state"],
        "succeeded",
        "{job}\n{log}\n{}",
        std::fs::read_to_string(holder.path().join("up.log")).unwrap()
    );
    assert!(log.contains("from up"), "{log}");
}
