//! `vmfarm ssh` end to end: a real server, a real worker and guest (QEMU backend), the CLI under
//! a real terminal (tmux): commands typed in a running job's guest, a resize, exit; a command
//! with its exit status; a failed job's guest kept for its time and gone after it; another
//! user refused.

mod common;

use common::farm::{TestWorker, images};
use common::{ADMIN_TOKEN, Backend, TestServer, log_of, wait_ended, wait_state, wait_task_running};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const WORKER: &str = "[slots]\ncpus = 2\nmemory = \"2GiB\"\n[guest]\ndefault_cpus = 1\ndefault_memory = \"512MiB\"\nboot_timeout = \"120s\"\nkeep_failed = \"15s\"\n";

/// `vmfarm ssh ARGS` with `token`, no terminal.
fn ssh(server: &TestServer, token: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vmfarm"))
        .arg("ssh")
        .args(args)
        .env("VMFARM_SERVER", &server.url)
        .env("VMFARM_TOKEN", token)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap()
}

/// A tmux server of this test's own.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn run(&self, args: &[&str]) -> Output {
        Command::new("tmux")
            .args(["-L", &self.socket])
            .args(args)
            .output()
            .unwrap()
    }

    /// The pane's text.
    fn screen(&self) -> String {
        String::from_utf8_lossy(&self.run(&["capture-pane", "-p", "-t", "ssh"]).stdout).into_owned()
    }

    /// Types `keys` and Enter.
    fn type_line(&self, keys: &str) {
        assert!(
            self.run(&["send-keys", "-t", "ssh", "-l", keys])
                .status
                .success()
        );
        assert!(
            self.run(&["send-keys", "-t", "ssh", "Enter"])
                .status
                .success()
        );
    }

    /// Waits until the screen shows `text`.
    fn wait_for(&self, text: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let screen = self.screen();
            if screen.contains(text) {
                return screen;
            }
            assert!(
                Instant::now() < deadline,
                "the terminal never showed {text:?}:\n{screen}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn alive(&self) -> bool {
        self.run(&["has-session", "-t", "ssh"]).status.success()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.run(&["kill-server"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_ssh_into_a_running_job_and_a_failed_jobs_kept_guest() {
    let dir = images(&["tiny"]);
    let hash = vmfarm_server::web::session::hash_password("bob's password").unwrap();
    let server = TestServer::start_with(
        Backend::Sqlite,
        &format!("[[users]]\nname = \"bob\"\npassword_hash = \"{hash}\"\n"),
    );
    let worker = TestWorker::start(&server, 0, &dir, WORKER);
    let api = server.admin();
    let running = api
        .submit(
            "image = \"tiny\"\n[[tasks]]\nname = \"wait\"\nscript = \"echo waiting; sleep 300\"\n",
        )
        .await
        .jobs[0]
        .id
        .clone();
    wait_task_running(&api, &running).await;

    // A command, without a terminal: its output and its exit status.
    let out = ssh(
        &server,
        ADMIN_TOKEN,
        &[&running, "--", "echo in-$(hostname); exit 3"],
    );
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        worker.log()
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("in-job-{running}\n")
    );

    // Someone else's job answers like a missing one.
    let bob = server.create_token("bob-ci", "bob", "submit,read");
    let out = ssh(&server, &bob, &[&running]);
    assert_eq!(out.status.code(), Some(1));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains(&format!("no job {running}")), "{said}");

    // A shell under a real terminal: commands, a resize, exit.
    let tmux = Tmux {
        socket: format!("vmfarm-ssh-{}", std::process::id()),
    };
    let command = format!(
        "env VMFARM_SERVER={} VMFARM_TOKEN={ADMIN_TOKEN} {} ssh {running}; echo ssh-exited-$?; sleep 30",
        server.url,
        env!("CARGO_BIN_EXE_vmfarm")
    );
    let started = tmux.run(&[
        "new-session",
        "-d",
        "-s",
        "ssh",
        "-x",
        "80",
        "-y",
        "24",
        &command,
    ]);
    assert!(
        started.status.success(),
        "{}",
        String::from_utf8_lossy(&started.stderr)
    );
    tmux.type_line("echo answer-$((6*7))");
    tmux.wait_for("answer-42");
    tmux.type_line("stty size");
    tmux.wait_for("24 80");
    assert!(
        tmux.run(&["resize-window", "-t", "ssh", "-x", "100", "-y", "30"])
            .status
            .success()
    );
    std::thread::sleep(Duration::from_millis(500));
    tmux.type_line("stty size");
    tmux.wait_for("30 100");
    tmux.type_line("exit 0");
    // The CLI returns (with the shell's status) and the pane's own shell goes on.
    tmux.wait_for("ssh-exited-0");
    let deadline = Instant::now() + Duration::from_secs(30);
    while log_of(&api, &running)
        .await
        .matches("session closed after")
        .count()
        < 2
    {
        assert!(
            Instant::now() < deadline,
            "{}",
            log_of(&api, &running).await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(tmux.alive());
    let log = log_of(&api, &running).await;
    assert_eq!(
        log.matches("ssh: admin opened a session").count(),
        2,
        "{log}"
    );
    api.req(
        reqwest::Method::POST,
        &format!("/api/jobs/{running}/cancel"),
    )
    .send()
    .await
    .unwrap();
    wait_state(&api, &running, "cancelled").await;

    // A failed job's guest stays for keep_failed, and is gone after it.
    let failed = api
        .submit("image = \"tiny\"\n[[tasks]]\nname = \"fail\"\nscript = \"echo broken > /tmp/why; exit 1\"\n")
        .await
        .jobs[0]
        .id
        .clone();
    let job = wait_ended(&api, &failed).await;
    assert_eq!(job["state"], "failed");
    let ended = Instant::now();
    let out = ssh(&server, ADMIN_TOKEN, &[&failed, "--", "cat /tmp/why"]);
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        worker.log()
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "broken\n");
    let log = log_of(&api, &failed).await;
    assert!(log.contains("guest is kept for 15s"), "{log}");
    // After its keep time (and the worker's word that it is gone) nothing answers.
    loop {
        let out = ssh(&server, ADMIN_TOKEN, &[&failed, "--", "true"]);
        if !out.status.success() {
            let said = String::from_utf8_lossy(&out.stderr);
            assert!(said.contains("its guest is gone"), "{said}");
            assert!(
                ended.elapsed() >= Duration::from_secs(14),
                "gone early: {:?}",
                ended.elapsed()
            );
            break;
        }
        assert!(
            ended.elapsed() < Duration::from_secs(60),
            "the kept guest never went"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while !worker.guest_processes().is_empty() {
        assert!(Instant::now() < deadline, "{:?}", worker.guest_processes());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
