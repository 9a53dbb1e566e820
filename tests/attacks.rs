//! Builds that play the attacker (the guest is hostile): each runs beside an honest job on the
//! same worker. The attack ends with a clear state and message, the worker's memory and disk
//! stay bounded, and the honest job succeeds.

mod common;

use common::farm::{TestWorker, images};
use common::{Backend, TestServer, log_of, wait_ended};
use serde_json::Value;

/// Two jobs at once.
const WORKER: &str = "[slots]\ncpus = 2\nmemory = \"2GiB\"\n[guest]\ndefault_cpus = 1\n\
                      default_memory = \"512MiB\"\nboot_timeout = \"120s\"\n";
/// Small limits, so that hitting them is quick.
const SERVER: &str = "[limits]\nmax_log_size = \"16MiB\"\nmax_artifact_size = \"64MiB\"\n";
/// The worker's peak memory, whatever the guest does: its log buffer is 4 MiB, its SSH
/// channels' about as much, and the rest is the worker's own.
const RSS_BOUND_MIB: u64 = 160;
/// The worker's scratch folder: overlays of two guests and an artifact under its limit.
const DISK_BOUND: u64 = 1 << 30;

/// What became of an attack and of the honest job beside it.
struct Outcome {
    attack: Value,
    log: String,
}

/// Runs `script` as a task of the tiny image (with `extra` manifest text, and `timeout`) beside
/// an honest job.
async fn attack(script: &str, extra: &str, timeout: &str) -> Outcome {
    let dir = images(&["tiny"]);
    let server = TestServer::start_with(Backend::Sqlite, SERVER);
    let worker = TestWorker::start(&server, 0, &dir, WORKER);
    let api = server.admin();
    // The reference: the worker's peak after a quiet job, alone.
    let quiet = api
        .submit("image = \"tiny\"\n[[tasks]]\nname = \"t\"\nscript = \"echo quiet\"\n")
        .await
        .jobs[0]
        .id
        .clone();
    assert_eq!(wait_ended(&api, &quiet).await["state"], "succeeded");
    let quiet_rss = worker.peak_rss_mib();
    let manifest = format!(
        "image = \"tiny\"\ntimeout = \"{timeout}\"\n{extra}[[tasks]]\nname = \"attack\"\nscript = '''\n{script}\n'''\n"
    );
    let attack = api.submit(&manifest).await.jobs[0].id.clone();
    let honest = api
        .submit("image = \"tiny\"\n[[tasks]]\nname = \"t\"\nscript = \"sleep 5; echo honest\"\n")
        .await
        .jobs[0]
        .id
        .clone();
    let mut peak_disk = 0;
    let ended = async {
        let honest = wait_ended(&api, &honest).await;
        (wait_ended(&api, &attack).await, honest)
    };
    tokio::pin!(ended);
    let (attack_job, honest_job) = loop {
        tokio::select! {
            jobs = &mut ended => break jobs,
            _ = tokio::time::sleep(std::time::Duration::from_millis(500)) => {
                peak_disk = peak_disk.max(worker.disk_use());
            }
        }
    };
    assert_eq!(
        honest_job["state"],
        "succeeded",
        "{honest_job}\n{}",
        worker.log()
    );
    let rss = worker.peak_rss_mib();
    eprintln!(
        "worker peak RSS {rss} MiB (after a quiet job alone: {quiet_rss} MiB), scratch folder peak {} MiB",
        peak_disk >> 20
    );
    assert!(rss < RSS_BOUND_MIB, "the worker grew to {rss} MiB");
    assert!(
        peak_disk < DISK_BOUND,
        "the worker's scratch folder grew to {peak_disk} bytes"
    );
    assert!(worker.guest_processes().is_empty(), "no guest is left");
    let log = log_of(&api, &attack).await;
    Outcome {
        attack: attack_job,
        log,
    }
}

fn reason(job: &Value) -> &str {
    job["reason"].as_str().unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_a_sparse_terabyte_artifact_is_refused() {
    let out = attack(
        "truncate -s 1099511627776 big.bin",
        "[[artifacts]]\npath = \"big.bin\"\n",
        "3m",
    )
    .await;
    assert_eq!(out.attack["state"], "failed", "{}", out.attack);
    assert!(
        reason(&out.attack).contains("big.bin is over the limit of 64MiB"),
        "{}",
        out.attack
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_a_link_to_dev_zero_is_not_an_artifact() {
    let out = attack(
        "ln -s /dev/zero big.bin",
        "[[artifacts]]\npath = \"big.bin\"\n",
        "3m",
    )
    .await;
    assert_eq!(out.attack["state"], "failed", "{}", out.attack);
    assert!(
        reason(&out.attack).contains("is a symbolic link: only regular files are collected"),
        "{}",
        out.attack
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_a_fifo_is_not_an_artifact() {
    let out = attack("mkfifo pipe", "[[artifacts]]\npath = \"pipe\"\n", "3m").await;
    assert_eq!(out.attack["state"], "failed", "{}", out.attack);
    assert!(
        reason(&out.attack).contains("is a FIFO, device or socket"),
        "{}",
        out.attack
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_yes_for_a_minute_is_cut_at_the_log_limit() {
    let out = attack("timeout 60 yes || true", "", "3m").await;
    assert_eq!(out.attack["state"], "succeeded", "{}", out.attack);
    assert!(
        out.log.contains("[vmfarm] the log is cut here"),
        "no cut note"
    );
    assert!(
        out.log.len() <= 16 << 20,
        "the log is {} bytes",
        out.log.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_a_ten_mebibyte_line_is_kept_whole() {
    let out = attack(
        "head -c 10485760 /dev/zero | tr '\\0' x; echo; echo after",
        "",
        "3m",
    )
    .await;
    assert_eq!(out.attack["state"], "succeeded", "{}", out.attack);
    assert!(
        out.log.contains(&"x".repeat(10 << 20)),
        "the long line is in the log"
    );
    assert!(out.log.contains("\nafter\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_a_fork_bomb_ends_at_the_timeout() {
    let out = attack("bomb() { bomb | bomb & }; bomb; sleep 600", "", "45s").await;
    assert!(
        ["timed_out", "error"].contains(&out.attack["state"].as_str().unwrap_or("")),
        "{}",
        out.attack
    );
}
