//! `vmfarm bench push`: `git push` to a bare repository whose post-receive hook is `vmfarm hook
//! post-receive` -> first line of the pushed commit's first task, p50/p95 over 10 pushes, beside
//! submit -> first task line (what `bench job-start` measures) in the same run, on the same
//! in-process farm (qemu backend, the `tiny` image). Also how long `git push` itself takes (the
//! hook waits for the server to fetch the commit and queue its jobs), and `vmfarm ssh JOB --
//! echo` into a running job's guest, start to output, beside `vmfarm status JOB` (the CLI's
//! start and one API call) in the same run.

use super::farm::Farm;
use super::job_start::first_task_line;
use super::stats::{ms, quantile};
use anyhow::{Context, bail};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use vmfarm_server::auth::{ApiCaller, Caller};
use vmfarm_server::config::{Repository, Scope};
use vmfarm_worker::config::BackendChoice;

const PUSHES: usize = 10;
const MANIFEST: &str =
    "image = \"tiny\"\n[[tasks]]\nname = \"hello\"\nscript = \"echo first-line\"\n";

pub async fn run(images_dir: PathBuf) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let bare = dir.path().join("bench.git");
    let url = bare.display().to_string();
    let allowed = dir.path().to_owned();
    let farm = Farm::start(
        &images_dir,
        BackendChoice::Qemu,
        |server| {
            server.repositories = vec![Repository {
                name: "bench".into(),
                url,
                owner: vmfarm_server::users::ADMIN.into(),
                forge: None,
                webhook_secret: None,
                branches: vec!["*".into()],
                tags: Vec::new(),
                pull_requests: false,
                status_token: None,
                status_api: None,
            }];
        },
        |worker| worker.allowed_local_sources = vec![allowed],
    )
    .await?;
    let token = vmfarm_server::admin::create_token(
        &farm.state.db,
        &farm.state.config,
        &Caller::Api(ApiCaller {
            name: "bench-push".into(),
            user: vmfarm_server::users::ADMIN.into(),
            admin: true,
            scopes: vec![Scope::Submit, Scope::Read],
            max_priority: None,
        }),
    )
    .await?;
    let vmfarm = std::env::current_exe().context("finding this vmfarm binary")?;
    git(
        dir.path(),
        &[
            "init",
            "--quiet",
            "--bare",
            "--initial-branch=main",
            "bench.git",
        ],
    )?;
    let hook = bare.join("hooks/post-receive");
    std::fs::write(
        &hook,
        format!(
            "#!/bin/sh\nexec env VMFARM_SERVER={} VMFARM_TOKEN={token} {} hook post-receive --repository bench\n",
            farm.url,
            vmfarm.display()
        ),
    )?;
    std::fs::set_permissions(&hook, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    git(
        dir.path(),
        &["clone", "--quiet", &bare.display().to_string(), "work"],
    )?;
    let work = dir.path().join("work");
    std::fs::write(work.join(".vmfarm.toml"), MANIFEST)?;

    println!(
        "vmfarm bench push: git push -> first task line, {PUSHES} pushes one after another, \
         beside submit -> first task line, qemu backend, image tiny"
    );
    let (mut pushed, mut push_calls, mut submitted) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..PUSHES {
        // Alternate, so that both see the same warm-up and the same host load.
        std::fs::write(work.join("VERSION"), format!("{i}\n"))?;
        git(&work, &["add", "."])?;
        git(&work, &["commit", "--quiet", "-m", &format!("change {i}")])?;
        let started = Instant::now();
        let said = git(&work, &["push", "--quiet", "origin", "main"])?;
        let returned = Instant::now();
        push_calls.push(returned - started);
        let id: i64 = said
            .lines()
            .find_map(|l| l.split(": job ").nth(1))
            .and_then(|rest| rest.split(' ').next())
            .with_context(|| format!("the push named no job: {said}"))?
            .parse()?;
        pushed.push(first_task_line(&farm.state, id, returned).await?);
        farm.ended(id).await?;

        let started = Instant::now();
        let id = farm.submit(MANIFEST).await?;
        submitted.push(first_task_line(&farm.state, id, started).await?);
        farm.ended(id).await?;
    }
    let (mut ssh, mut status) = (Vec::new(), Vec::new());
    let waiting = farm
        .submit("image = \"tiny\"\n[[tasks]]\nname = \"wait\"\nscript = \"echo first-line; sleep 600\"\n")
        .await?;
    first_task_line(&farm.state, waiting, Instant::now()).await?;
    let cli = |args: &[&str]| {
        let mut command = Command::new(&vmfarm);
        command
            .args(args)
            .env("VMFARM_SERVER", &farm.url)
            .env("VMFARM_TOKEN", &token)
            .stdin(std::process::Stdio::null());
        command
    };
    let job = waiting.to_string();
    for _ in 0..PUSHES {
        let started = Instant::now();
        let out = cli(&["ssh", &job, "--", "echo ready"]).output()?;
        ssh.push(started.elapsed());
        if String::from_utf8_lossy(&out.stdout) != "ready\n" {
            bail!("vmfarm ssh said: {}", String::from_utf8_lossy(&out.stderr));
        }
        let started = Instant::now();
        let out = cli(&["status", &job]).output()?;
        status.push(started.elapsed());
        anyhow::ensure!(out.status.success(), "vmfarm status failed");
    }
    println!("{:<40} {:>12} {:>12}", "", "p50", "p95");
    let row = |label: &str, samples: &mut Vec<Duration>| {
        let (p50, p95) = (quantile(samples, 0.5), quantile(samples, 0.95));
        println!("{label:<40} {:>12} {:>12}", ms(p50), ms(p95));
    };
    row("git push returned -> first task line", &mut pushed);
    row("submit -> first task line (reference)", &mut submitted);
    row("git push itself (hook included)", &mut push_calls);
    row("vmfarm ssh JOB -- echo: start -> output", &mut ssh);
    row("vmfarm status JOB (reference)", &mut status);
    Ok(())
}

/// Runs git in `dir` as a bench user; its output (stdout and stderr).
fn git(dir: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["-c", "user.name=bench", "-c", "user.email=bench@vmfarm"])
        .args(args)
        .output()
        .context("running git")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        bail!("git {args:?} failed: {text}");
    }
    Ok(text)
}
