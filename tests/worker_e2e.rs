//! Jobs end to end on the host: a real server, real `vmfarm worker` processes, real guests
//! under the QEMU backend (TCG here: /dev/kvm is PVM), the agent answering SSH.

mod common;

use common::farm::{TestWorker, images};
use common::{Backend, TestServer, log_of, wait_ended, wait_for, wait_state, wait_task_running};
use reqwest::Method;
use serde_json::Value;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use vmfarm_server::s3_test_server::S3TestServer;

const WORKER: &str = "[slots]\ncpus = 2\nmemory = \"2GiB\"\n[guest]\ndefault_cpus = 1\ndefault_memory = \"512MiB\"\nboot_timeout = \"120s\"\n";
const FAST_LEASES: &str = "[leases]\nttl = \"4s\"\nmax_attempts = 3\nlong_poll = \"2s\"\n";

fn cli(server: &TestServer, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_vmfarm"))
        .args(args)
        .env("VMFARM_SERVER", &server.url)
        .env("VMFARM_TOKEN", common::ADMIN_TOKEN)
        .output()
        .unwrap()
}

fn example(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("configs/examples")
        .join(name)
        .display()
        .to_string()
}

/// A secret the task prints, whole or in two writes that reach the worker apart, is masked in
/// the log; the task itself had the value.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_secrets_never_reach_the_log() {
    let dir = images(&["tiny"]);
    let server = TestServer::start(Backend::Sqlite);
    let _worker = TestWorker::start(&server, 0, &dir, WORKER);
    let value = "hunter2-s3cr3t-value";
    server.set_secret("db-password", value.as_bytes());
    let manifest = r#"image = "tiny"
secrets = ["db-password"]

[[tasks]]
name = "leak"
script = '''
pw=$(cat ~/.secrets/db-password)
echo "whole: $pw"
printf 'split: %s' "$(echo "$pw" | cut -c1-7)"
sleep 0.5
printf '%s end\n' "$(echo "$pw" | cut -c8-)"
echo "length ${#pw}"
'''
"#;
    let api = server.admin();
    let id = api.submit(manifest).await.jobs[0].id.clone();
    let job = wait_ended(&api, &id).await;
    let log = log_of(&api, &id).await;
    assert_eq!(job["state"], "succeeded", "{job}\n{log}");
    assert!(log.contains("length 20"), "the task read the secret: {log}");
    assert!(log.contains("whole: ***"), "{log}");
    assert!(log.contains("split: *** end"), "{log}");
    for part in [value, "hunter2", "s3cr3t-value"] {
        assert!(!log.contains(part), "`{part}` reached the log: {log}");
    }
}

/// The first job of an image boots cold and has the image's template snapshot made; the next
/// jobs start from it, each with its own host name, random stream and clock, and their artifact
/// comes back; a snapshot made from another image version is refused, and one that fails to
/// restore is given up: those jobs boot cold.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_jobs_start_from_the_template_snapshot_or_boot_cold_saying_why() {
    let dir = images(&["tiny"]);
    let server = TestServer::start(Backend::Sqlite);
    let config = format!("{WORKER}[warm_start]\nenabled = true\n");
    let worker = TestWorker::start(&server, 0, &dir, &config);
    let template = worker
        .work_dir
        .path()
        .join("vmfarm-data/templates/tiny-1cpu-512mib");
    let manifest = r#"image = "tiny"

[[tasks]]
name = "who"
script = "(hostname; head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; date +%s) | tee who"

[[artifacts]]
path = "who"
"#;
    let api = server.admin();
    let run = async |expect: &str| {
        let id = api.submit(manifest).await.jobs[0].id.clone();
        let job = wait_ended(&api, &id).await;
        let log = log_of(&api, &id).await;
        assert_eq!(job["state"], "succeeded", "{job}\n{log}\n{}", worker.log());
        assert!(log.contains(expect), "`{expect}` in:\n{log}");
        let who = api
            .get_bytes(&format!("/api/jobs/{id}/artifacts/who"))
            .await;
        let who = String::from_utf8(who).unwrap();
        let lines: Vec<String> = who.lines().map(str::to_owned).collect();
        assert_eq!(lines.len(), 3, "{who}");
        assert_eq!(lines[0], format!("job-{id}"), "the guest's own host name");
        let host_now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let guest_now: u64 = lines[2].parse().unwrap();
        assert!(host_now.abs_diff(guest_now) < 120, "the job's clock: {who}");
        lines[1].clone()
    };
    let cold =
        run("(1 vCPU, 512 MiB) is not made yet; booting cold (a new snapshot is being made)").await;
    let made = Instant::now();
    while !template.join("stamp.json").exists() {
        assert!(
            made.elapsed() < Duration::from_secs(180),
            "no template snapshot: {}",
            worker.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let restored = "restored the guest from its image's template snapshot";
    let first = run(restored).await;
    let second = run(restored).await;
    assert_ne!(
        first, second,
        "guests restored from one snapshot share no random stream"
    );
    assert_ne!(first, cold);

    let stamp_file = template.join("stamp.json");
    let stamp: Value =
        serde_json::from_str(&std::fs::read_to_string(&stamp_file).unwrap()).unwrap();
    let mut older = stamp.clone();
    older["image_version"] = "000000000000".into();
    std::fs::write(&stamp_file, older.to_string()).unwrap();
    run(&format!(
        "is refused: it was made from image version 000000000000, this job needs {}; booting cold",
        stamp["image_version"].as_str().unwrap()
    ))
    .await;

    // That job had a new snapshot made; one whose devices' state is damaged fails to restore,
    // and the job boots cold.
    let remade = Instant::now();
    while std::fs::read_to_string(&stamp_file).map_or(true, |t| t.contains("000000000000")) {
        assert!(
            remade.elapsed() < Duration::from_secs(180),
            "no new template snapshot: {}",
            worker.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    std::fs::write(template.join("devices"), b"not QEMU's migration stream").unwrap();
    run("restoring the template snapshot failed: ").await;
}

/// A cache disk keeps what a successful job stored for the owner's next job of the image, and
/// nothing of a failed one; `vmfarm caches list` and `drop` show and remove it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_a_cache_keeps_what_a_successful_job_stored_and_nothing_of_a_failed_one() {
    let dir = images(&["tiny"]);
    let server = TestServer::start(Backend::Sqlite);
    let config = format!("{WORKER}[warm_start]\nenabled = true\n");
    let worker = TestWorker::start(&server, 0, &dir, &config);
    let manifest = |script: &str| {
        format!(
            "image = \"tiny\"\n\n[[caches]]\nname = \"deps\"\npaths = [\"~/.cache/deps\", \"target\"]\nsize = \"128MiB\"\n\n[[tasks]]\nname = \"build\"\nscript = \"\"\"\n{script}\n\"\"\"\n"
        )
    };
    let api = server.admin();
    let run = async |script: &str, state: &str| {
        let id = api.submit(&manifest(script)).await.jobs[0].id.clone();
        let job = wait_ended(&api, &id).await;
        let log = log_of(&api, &id).await;
        assert_eq!(job["state"], state, "{job}\n{log}\n{}", worker.log());
        log
    };
    let first = run(
        "test ! -e ~/.cache/deps/wheel\necho fetched > ~/.cache/deps/wheel\necho built > target/obj",
        "succeeded",
    )
    .await;
    for said in [
        "cache deps (128MiB): there is none yet: it starts empty",
        "booting cold: the job has cache disks",
        "cache deps: stored as version 2",
    ] {
        assert!(first.contains(said), "`{said}` in:\n{first}");
    }
    let failed = run(
        "cat ~/.cache/deps/wheel target/obj\necho spoiled > ~/.cache/deps/wheel\nexit 3",
        "failed",
    )
    .await;
    for said in [
        "cache deps (128MiB): version 2, mounted on /home/build/.cache/deps, /home/build/work/target",
        "fetched\nbuilt",
        "the caches are not stored: the job did not succeed",
    ] {
        assert!(failed.contains(said), "`{said}` in:\n{failed}");
    }
    let third = run(
        "cat ~/.cache/deps/wheel\ntouch ~/.cache/deps/mine\ngrep ' /home/build/.cache/deps ' /proc/mounts",
        "succeeded",
    )
    .await;
    let mounted = third
        .lines()
        .find(|l| l.contains(" /home/build/.cache/deps ext4"))
        .unwrap_or_else(|| panic!("the cache's mount in:\n{third}"));
    assert!(
        mounted.contains("nosuid") && mounted.contains("nodev"),
        "what earlier jobs wrote runs no setuid program: {mounted}"
    );
    assert!(third.contains("fetched"), "{third}");
    assert!(
        !third.contains("spoiled"),
        "a failed job stores nothing: {third}"
    );
    assert!(third.contains("cache deps: stored as version 3"), "{third}");

    let caches = worker.work_dir.path().join("vmfarm-data/caches");
    let caches = caches.to_str().unwrap();
    let listed = cli(&server, &["caches", "list", "--dir", caches]);
    let listed = String::from_utf8_lossy(&listed.stdout).into_owned();
    assert!(listed.contains("admin/tiny/deps\t3\t128MiB\t"), "{listed}");
    let dropped = cli(
        &server,
        &["caches", "drop", "--dir", caches, "admin/tiny/deps"],
    );
    assert!(dropped.status.success(), "{dropped:?}");
    let again = run("test ! -e ~/.cache/deps/wheel", "succeeded").await;
    assert!(again.contains("there is none yet"), "{again}");
}

/// Sixteen jobs of the tiny image at once on one worker of this 2-core host, their guests
/// restored from one template snapshot: all succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_sixteen_jobs_at_once_start_from_one_snapshot() {
    let dir = images(&["tiny"]);
    let server = TestServer::start(Backend::Sqlite);
    let config = "[slots]\ncpus = 16\nmemory = \"8GiB\"\n[guest]\ndefault_cpus = 1\n\
                  default_memory = \"256MiB\"\nboot_timeout = \"120s\"\n\
                  [warm_start]\nenabled = true\n";
    let worker = TestWorker::start(&server, 0, &dir, config);
    let manifest =
        "image = \"tiny\"\n[[tasks]]\nname = \"hello\"\nscript = \"echo hello from $(hostname)\"\n";
    let api = server.admin();
    let first = api.submit(manifest).await.jobs[0].id.clone();
    assert_eq!(wait_ended(&api, &first).await["state"], "succeeded");
    let stamp = worker
        .work_dir
        .path()
        .join("vmfarm-data/templates/tiny-1cpu-256mib/stamp.json");
    let made = Instant::now();
    while !stamp.exists() {
        assert!(
            made.elapsed() < Duration::from_secs(180),
            "{}",
            worker.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut ids = Vec::new();
    for _ in 0..16 {
        ids.push(api.submit(manifest).await.jobs[0].id.clone());
    }
    for id in &ids {
        let job = wait_ended(&api, id).await;
        let log = log_of(&api, id).await;
        assert_eq!(job["state"], "succeeded", "{job}\n{log}");
        assert!(
            log.contains("template snapshot in"),
            "job {id} was restored: {log}"
        );
        assert!(log.contains(&format!("hello from job-{id}")), "{log}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_artifacts_come_back_through_the_cli() {
    let dir = images(&["tiny"]);
    let server = TestServer::start(Backend::Sqlite);
    let worker = TestWorker::start(&server, 0, &dir, WORKER);
    let out = cli(&server, &["submit", "--follow", &example("artifacts.toml")]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        worker.log()
    );
    let id = stdout.split_whitespace().next().unwrap().to_owned();
    assert!(
        stdout.contains("[vmfarm] task produce"),
        "the log streamed: {stdout}"
    );

    let outdir = tempfile::tempdir().unwrap();
    let out = cli(
        &server,
        &["artifacts", &id, "--out", outdir.path().to_str().unwrap()],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sums = std::fs::read_to_string(outdir.path().join("out/SHA256SUMS")).unwrap();
    let tarball = outdir.path().join("out/parts.tar.gz");
    let check = Command::new("sha256sum").arg(&tarball).output().unwrap();
    let ours = String::from_utf8_lossy(&check.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned();
    assert!(
        sums.starts_with(&ours),
        "the guest's sha256 {sums} matches ours {ours}"
    );
    let list = Command::new("tar")
        .arg("-tzf")
        .arg(&tarball)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&list.stdout).lines().count(), 3);

    let api = server.admin();
    let job = api.get_json(&format!("/api/jobs/{id}")).await;
    assert_eq!(job["state"], "succeeded");
    assert!(job["image_version"].is_string());
    let log = log_of(&api, &id).await;
    assert!(
        log.contains("vmfarm-agent ready SHA256:"),
        "the console is in the log"
    );
    assert!(
        worker.guest_processes().is_empty(),
        "{:?}",
        worker.guest_processes()
    );
    assert!(worker.leftovers().is_empty(), "{:?}", worker.leftovers());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_failure_timeout_and_cancel_end_as_they_should() {
    let dir = images(&["tiny"]);
    let server = TestServer::start(Backend::Sqlite);
    let _worker = TestWorker::start(&server, 0, &dir, WORKER);
    let api = server.admin();

    let failing = api
        .submit(&std::fs::read_to_string(example("failing-task.toml")).unwrap())
        .await
        .jobs[0]
        .id
        .clone();
    let slow = api
        .submit("image = \"tiny\"\n[[tasks]]\nname = \"sleepy\"\ntimeout = \"3s\"\nscript = \"echo start; sleep 60\"\n")
        .await
        .jobs[0]
        .id
        .clone();

    let job = wait_ended(&api, &failing).await;
    assert_eq!(job["state"], "failed", "{job}");
    let tasks: Vec<(&str, &str)> = job["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["name"].as_str().unwrap(), t["state"].as_str().unwrap()))
        .collect();
    assert_eq!(
        tasks,
        [
            ("ok", "succeeded"),
            ("fails", "failed"),
            ("never-runs", "skipped")
        ]
    );
    assert_eq!(job["tasks"][1]["exit_code"], 3);
    let log = log_of(&api, &failing).await;
    assert!(
        log.contains("this one works") && log.contains("about to fail"),
        "{log}"
    );
    assert!(!log.contains("you should not see this"));
    // Its `when = "always"` artifacts came back: the folder as a tar, the glob's file by itself.
    let artifacts = api
        .get_json(&format!("/api/jobs/{failing}/artifacts"))
        .await;
    let names: Vec<&str> = artifacts
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["logs.tar", "logs/b.txt"], "{log}");
    let tar = api
        .get_ok(&format!("/api/jobs/{failing}/artifacts/logs.tar"))
        .await
        .bytes()
        .await
        .unwrap();
    let unpacked = tempfile::tempdir().unwrap();
    std::fs::write(unpacked.path().join("logs.tar"), &tar).unwrap();
    let listed = Command::new("tar")
        .arg("-tf")
        .arg(unpacked.path().join("logs.tar"))
        .output()
        .unwrap();
    let mut entries: Vec<String> = String::from_utf8_lossy(&listed.stdout)
        .lines()
        .map(|l| l.trim_end_matches('/').to_owned())
        .collect();
    entries.sort();
    assert_eq!(
        entries,
        ["logs", "logs/b.txt", "logs/run", "logs/run/a.txt"]
    );

    let job = wait_ended(&api, &slow).await;
    assert_eq!(job["state"], "timed_out", "{job}");
    assert_eq!(job["tasks"][0]["state"], "timed_out");
    assert!(log_of(&api, &slow).await.contains("start"));

    let cancelled = api
        .submit(
            "image = \"tiny\"\n[[tasks]]\nname = \"forever\"\nscript = \"echo going; sleep 600\"\n",
        )
        .await
        .jobs[0]
        .id
        .clone();
    wait_task_running(&api, &cancelled).await;
    let asked = Instant::now();
    api.req(Method::POST, &format!("/api/jobs/{cancelled}/cancel"))
        .send()
        .await
        .unwrap();
    let job = wait_ended(&api, &cancelled).await;
    assert_eq!(job["state"], "cancelled", "{job}");
    assert_eq!(job["tasks"][0]["state"], "cancelled");
    assert!(
        asked.elapsed() < Duration::from_secs(30),
        "cancelled within seconds, took {:?}",
        asked.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_a_guest_that_never_gets_ready_ends_in_error_with_its_console() {
    let tiny = images(&["tiny"]);
    // An image whose initramfs is not one: the kernel boots, finds no init, and panics.
    let scratch = tempfile::tempdir().unwrap();
    let newest = std::fs::read_dir(tiny.join("tiny"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .max()
        .unwrap();
    let broken = scratch.path().join("broken/1");
    std::fs::create_dir_all(&broken).unwrap();
    for file in ["kernel", "rootfs.qcow2"] {
        std::os::unix::fs::symlink(newest.join(file), broken.join(file)).unwrap();
    }
    std::fs::write(broken.join("initrd"), b"this is not a cpio archive").unwrap();
    let manifest = std::fs::read_to_string(newest.join("image.toml")).unwrap();
    let manifest = manifest.replacen("name = \"tiny\"", "name = \"broken\"", 1);
    std::fs::write(broken.join("image.toml"), manifest).unwrap();

    let server = TestServer::start(Backend::Sqlite);
    let worker = TestWorker::start(&server, 0, scratch.path(), &WORKER.replace("120s", "60s"));
    let api = server.admin();
    let id = api
        .submit("image = \"broken\"\n[[tasks]]\nname = \"t\"\nscript = \"true\"\n")
        .await
        .jobs[0]
        .id
        .clone();
    let job = wait_ended(&api, &id).await;
    assert_eq!(job["state"], "error", "{job}");
    assert!(
        job["reason"]
            .as_str()
            .unwrap()
            .contains("waiting for the guest agent"),
        "{job}"
    );
    let log = log_of(&api, &id).await;
    assert!(
        log.contains("Kernel panic") || log.contains("Linux version"),
        "the console is in the log: {log}"
    );
    assert!(worker.guest_processes().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_two_slots_run_two_jobs_and_the_third_waits() {
    let dir = images(&["tiny"]);
    let server = TestServer::start(Backend::Sqlite);
    let _worker = TestWorker::start(&server, 0, &dir, WORKER);
    let api = server.admin();
    let mut ids = Vec::new();
    for i in 0..3 {
        let text = format!(
            "image = \"tiny\"\n[[tasks]]\nname = \"t\"\nscript = \"echo job {i}; sleep 8\"\n"
        );
        ids.push(api.submit(&text).await.jobs[0].id.clone());
    }
    // While two run, the third is still queued.
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut seen_two_running_one_queued = false;
    while Instant::now() < deadline && !seen_two_running_one_queued {
        let mut running = 0;
        let mut queued = 0;
        for id in &ids {
            let job = api.get_json(&format!("/api/jobs/{id}")).await;
            running += usize::from(job["tasks"][0]["state"] == "running");
            queued += usize::from(job["state"] == "queued");
        }
        assert!(running <= 2, "never more than two at once");
        seen_two_running_one_queued = running == 2 && queued == 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        seen_two_running_one_queued,
        "two ran while the third waited"
    );
    for id in &ids {
        assert_eq!(wait_ended(&api, id).await["state"], "succeeded");
    }
}

/// A job leased while the worker has no room for it yet keeps its lease while it waits, however
/// long that is beside the lease's time to live.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_a_job_that_waits_for_room_keeps_its_lease() {
    let dir = images(&["tiny"]);
    let server = TestServer::start_with(Backend::Sqlite, FAST_LEASES);
    let _worker = TestWorker::start(&server, 0, &dir, WORKER);
    let api = server.admin();
    let first = api
        .submit("image = \"tiny\"\n[[tasks]]\nname = \"t\"\nscript = \"sleep 15\"\n")
        .await
        .jobs[0]
        .id
        .clone();
    wait_task_running(&api, &first).await;
    let whole = api
        .submit(
            "image = \"tiny\"\n[resources]\ncpus = 2\n[[tasks]]\nname = \"t\"\nscript = \"echo whole\"\n",
        )
        .await
        .jobs[0]
        .id
        .clone();
    assert_eq!(wait_ended(&api, &first).await["state"], "succeeded");
    let job = wait_ended(&api, &whole).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(
        job["attempt"], 1,
        "its first lease lasted through the wait: {job}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_a_killed_worker_loses_nothing() {
    let dir = images(&["tiny"]);
    let server = TestServer::start_with(Backend::Sqlite, FAST_LEASES);
    let mut worker = TestWorker::start(&server, 0, &dir, WORKER);
    let api = server.admin();
    let id = api
        .submit("image = \"tiny\"\n[[tasks]]\nname = \"t\"\nscript = \"echo attempt; sleep 5; echo done\"\n")
        .await
        .jobs[0]
        .id
        .clone();
    wait_task_running(&api, &id).await;
    worker.kill9();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        worker.guest_processes().is_empty(),
        "the guest died with its worker: {:?}",
        worker.guest_processes()
    );
    let job = wait_state(&api, &id, "queued").await;
    assert_eq!(job["attempt"], 2);
    worker.restart();
    let job = wait_ended(&api, &id).await;
    assert_eq!(job["state"], "succeeded", "{job}\n{}", worker.log());
    assert!(log_of(&api, &id).await.contains("attempt 1 lost"));
    assert!(worker.leftovers().is_empty(), "{:?}", worker.leftovers());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_a_killed_server_loses_nothing() {
    let dir = images(&["tiny"]);
    let mut server = TestServer::start_with(
        Backend::Sqlite,
        "[leases]\nttl = \"60s\"\nmax_attempts = 3\nlong_poll = \"2s\"\n",
    );
    let worker = TestWorker::start(&server, 0, &dir, WORKER);
    let api = server.admin();
    let id = api
        .submit("image = \"tiny\"\n[[tasks]]\nname = \"t\"\nscript = \"for i in 1 2 3 4 5 6; do echo tick $i; sleep 1; done\"\n")
        .await
        .jobs[0]
        .id
        .clone();
    wait_task_running(&api, &id).await;
    server.kill9();
    tokio::time::sleep(Duration::from_secs(4)).await;
    server.crash_and_restart();
    let api = server.admin();
    let job = wait_ended(&api, &id).await;
    assert_eq!(job["state"], "succeeded", "{job}\n{}", worker.log());
    assert_eq!(job["attempt"], 1, "the same attempt finished");
    let log = log_of(&api, &id).await;
    for i in 1..=6 {
        assert_eq!(
            log.matches(&format!("tick {i}\n")).count(),
            1,
            "tick {i} exactly once: {log}"
        );
    }
}

/// Two server replicas on one PostgreSQL; the worker knows both. The one it leased the job from
/// is killed mid-job and never comes back: the worker goes on through the other, and the job
/// ends there with every line and its artifact, in its first attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_a_killed_replica_loses_nothing() {
    let dir = images(&["tiny"]);
    // The replicas keep artifacts in one bucket of a real S3-compatible server.
    let bucket_root = tempfile::tempdir().unwrap();
    let s3 = S3TestServer::start(bucket_root.path()).expect("s3s-fs starts");
    let mut a = TestServer::start_with(
        Backend::Postgres,
        &format!(
            "[leases]\nttl = \"60s\"\nmax_attempts = 3\nlong_poll = \"2s\"\n{}",
            s3.toml("farm")
        ),
    );
    let b = a.replica();
    let worker = TestWorker::start_on(&[&a, &b], 0, &dir, WORKER);
    let api = b.admin();
    let manifest = "image = \"tiny\"\n[[tasks]]\nname = \"t\"\n\
        script = \"for i in 1 2 3 4 5 6; do echo tick $i; echo $i >> out.txt; sleep 1; done\"\n\
        [[artifacts]]\npath = \"out.txt\"\n";
    let id = api.submit(manifest).await.jobs[0].id.clone();
    wait_task_running(&api, &id).await;
    let before = log_of(&api, &id).await;
    a.kill9();
    let job = wait_ended(&api, &id).await;
    assert_eq!(job["state"], "succeeded", "{job}\n{}", worker.log());
    assert_eq!(job["attempt"], 1, "the same attempt finished");
    let log = log_of(&api, &id).await;
    assert!(
        log.starts_with(&before),
        "what A acknowledged is kept:\n{before}\n---\n{log}"
    );
    for i in 1..=6 {
        assert_eq!(
            log.matches(&format!("tick {i}\n")).count(),
            1,
            "tick {i} exactly once: {log}"
        );
    }
    let out = api
        .get_bytes(&format!("/api/jobs/{id}/artifacts/out.txt"))
        .await;
    assert_eq!(out, b"1\n2\n3\n4\n5\n6\n");
    let object = s3.bucket_dir.join(format!("farm/{id}/1/out.txt"));
    assert_eq!(std::fs::read(&object).unwrap(), out, "the bucket holds it");
    assert!(!a.data_dir().join("artifacts").exists(), "not the folder");
    assert!(
        worker.log().contains("moving on to the next replica"),
        "{}",
        worker.log()
    );
}

/// A small C project with a Makefile, in a local git repository.
fn c_project() -> tempfile::TempDir {
    let repo = tempfile::tempdir().unwrap();
    std::fs::write(
        repo.path().join("hello.c"),
        "#include <stdio.h>\nint main(void) { printf(\"hello from vmfarm, built by %s\\n\", COMPILER); return 0; }\n",
    )
    .unwrap();
    std::fs::write(
        repo.path().join("Makefile"),
        "hello: hello.c\n\t$(CC) -O2 -DCOMPILER='\"'\"$$($(CC) -dumpversion)\"'\"' -o $@ hello.c\n",
    )
    .unwrap();
    let git = |args: &[&str]| {
        let ok = Command::new("git")
            .arg("-C")
            .arg(repo.path())
            .args(["-c", "user.name=t", "-c", "user.email=t@t"])
            .args(args)
            .status()
            .unwrap()
            .success();
        assert!(ok, "git {args:?}");
    };
    git(&["init", "--quiet", "--initial-branch=main"]);
    git(&["add", "."]);
    git(&["commit", "--quiet", "-m", "hello"]);
    repo
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_a_c_project_builds_on_debian_11_12_and_13_and_a_cloud_image_in_one_group() {
    // Three releases, each with its own kernel (the prefix of its `uname -r`) and gcc, and a
    // disk that boots by UEFI with cloud-init and its own OpenSSH (Debian 12's system).
    let releases = [
        ("debian-11", "5.10."),
        ("debian-12", "6.1."),
        ("debian-13", "6.12."),
        ("debian-12-cloud", "6.1."),
    ];
    let names = releases.map(|(name, _)| name);
    let dir = images(&names);
    let repo = c_project();
    // What the guests try to reach, and must not: a port of the host, on every address.
    let host_port = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    host_port.set_nonblocking(true).unwrap();
    let port = host_port.local_addr().unwrap().port();
    let host_address = host_addresses()
        .into_iter()
        .next()
        .expect("the host has an address besides loopback");
    let server = TestServer::start(Backend::Sqlite);
    let extra = format!(
        "allowed_local_sources = [\"{}\"]\n{}",
        repo.path().display(),
        WORKER.replace("default_memory = \"512MiB\"", "default_memory = \"1GiB\"")
    );
    let worker = TestWorker::start(&server, 0, &dir, &extra);
    let manifest = format!(
        "images = {names:?}\ntimeout = \"20m\"\n[environment]\nCC = \"gcc\"\n\
         HOST = \"{host_address}\"\nPORT = \"{port}\"\n\
         [[sources]]\nurl = \"file://{}\"\nref = \"main\"\npath = \"project\"\n\
         [[tasks]]\nname = \"build\"\nscript = \"\"\"\necho kernel $(uname -r) user $(id -un) job $VMFARM_JOB_ID\n\
         for to in $HOST 10.0.2.2 127.0.0.1; do\n\
           if timeout 5 bash -c \"exec 3<>/dev/tcp/$to/$PORT\" 2>/dev/null; then echo REACHED $to; else echo unreachable $to; fi\n\
         done\ncd project\nmake\n./hello\n\"\"\"\n\
         [[artifacts]]\npath = \"project/hello\"\n",
        repo.path().display()
    );
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), manifest).unwrap();
    let out = cli(
        &server,
        &["submit", "--follow", file.path().to_str().unwrap()],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        worker.log()
    );
    let jobs: Vec<(String, String)> = stdout
        .lines()
        .take(names.len())
        .map(|l| {
            let mut parts = l.split('\t');
            (
                parts.next().unwrap().to_owned(),
                parts.next().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(jobs.iter().map(|j| j.1.as_str()).collect::<Vec<_>>(), names);
    let api = server.admin();
    let group = api.get_json(&format!("/api/jobs/{}", jobs[0].0)).await["group_id"].clone();
    let group = api
        .get_json(&format!("/api/groups/{}", group.as_str().unwrap()))
        .await;
    assert_eq!(group["jobs"].as_array().unwrap().len(), names.len());
    let mut compilers = std::collections::BTreeMap::new();
    for (id, image) in &jobs {
        let outdir = tempfile::tempdir().unwrap();
        let out = cli(
            &server,
            &["artifacts", id, "--out", outdir.path().to_str().unwrap()],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let binary = outdir.path().join("project/hello");
        std::fs::set_permissions(&binary, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let ran = Command::new(&binary).output().unwrap();
        let said = String::from_utf8_lossy(&ran.stdout).to_string();
        assert!(
            said.starts_with("hello from vmfarm, built by "),
            "{image}: {said}"
        );
        compilers.insert(image.clone(), said);
        let log = log_of(&api, id).await;
        assert!(
            log.contains("hello from vmfarm"),
            "the task's own run is in the log"
        );
        let kernel = releases.iter().find(|r| r.0 == image).unwrap().1;
        assert!(
            log.contains(&format!("kernel {kernel}"))
                && log.contains(&format!("user build job {id}")),
            "{image} booted its own kernel {kernel} and ran the task as build with the job's variables: {log}"
        );
        assert!(!log.contains("REACHED"), "{image} reached the host: {log}");
        assert_eq!(log.matches("unreachable ").count(), 3, "{log}");
    }
    assert!(
        host_port.accept().is_err(),
        "no guest connected to the host's port"
    );
    let releases: std::collections::HashSet<_> = ["debian-11", "debian-12", "debian-13"]
        .iter()
        .map(|r| &compilers[*r])
        .collect();
    assert_eq!(
        releases.len(),
        3,
        "each release built it with its own gcc: {compilers:?}"
    );
    let cloud = log_of(&api, &jobs[3].0).await;
    assert!(
        cloud.contains("-----BEGIN SSH HOST KEY FINGERPRINTS-----")
            && cloud.contains("guest ready in"),
        "the cloud image's console, with cloud-init's host keys: {cloud}"
    );
}

/// The host's IPv4 addresses besides loopback (`ip -4 -o addr`).
fn host_addresses() -> Vec<String> {
    let out = Command::new("ip")
        .args(["-4", "-o", "addr", "show"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().nth(3))
        .filter_map(|cidr| cidr.split('/').next())
        .filter(|a| !a.starts_with("127."))
        .map(str::to_owned)
        .collect()
}

/// A git server over http that accepts connections and never answers: a fetch from it (through
/// the job's proxy) hangs. Returns its URL and the connections it holds, to see them closed.
fn stuck_git_server() -> (
    String,
    std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!(
        "http://127.0.0.1:{}/stuck.git",
        listener.local_addr().unwrap().port()
    );
    let held = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let holder = held.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            holder.lock().unwrap().push(stream);
        }
    });
    (url, held)
}

/// Whether the peer of `stream` closes it within `limit`.
fn closed_by_peer(stream: &std::net::TcpStream, limit: Duration) -> bool {
    use std::io::Read;
    let deadline = Instant::now() + limit;
    let mut stream = stream.try_clone().unwrap();
    stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut buf = [0u8; 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            // The client's request, or nothing yet.
            Ok(_) | Err(_) => {}
        }
        if Instant::now() >= deadline {
            return false;
        }
    }
}

/// The job's deadline and a cancel stop a job outside its tasks too: here both jobs hang
/// fetching a source from a git server that never answers. The one without a `timeout` gets
/// the server's `default_job_timeout` and ends `timed_out`, saying what it was doing; the
/// other is cancelled. Either way the fetch is stopped (git is killed: its connection closes)
/// and nothing is left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_the_deadline_and_a_cancel_stop_a_job_outside_its_tasks() {
    let dir = images(&["tiny"]);
    // The git server is on loopback, which sources reach only where the operator allows it.
    let server = TestServer::start_with(
        Backend::Sqlite,
        "[limits]\ndefault_job_timeout = \"25s\"\n[network]\nallow_private = [\"127.0.0.0/8\"]\n",
    );
    let worker = TestWorker::start(&server, 0, &dir, WORKER);
    let api = server.admin();
    let (url, held) = stuck_git_server();
    let manifest = |timeout: &str| {
        format!(
            "image = \"tiny\"\n{timeout}[[sources]]\nurl = \"{url}\"\npath = \"stuck\"\n\
             [[tasks]]\nname = \"never-runs\"\nscript = \"echo you should not see this\"\n"
        )
    };
    let timed = api.submit(&manifest("")).await.jobs[0].id.clone();
    let cancelled = api.submit(&manifest("timeout = \"10m\"\n")).await.jobs[0]
        .id
        .clone();

    // Once running, the guest is up: the only step left before the tasks is the fetch.
    let is_end = |j: &Value| {
        ["succeeded", "failed", "timed_out", "cancelled", "error"]
            .contains(&j["state"].as_str().unwrap_or(""))
    };
    let running_or_ended = |j: &Value| j["state"] == "running" || is_end(j);
    let limit = Duration::from_secs(300);
    let first = wait_for(&api, &timed, "running", running_or_ended, limit).await;
    let seen_running = first["state"] == "running";

    wait_state(&api, &cancelled, "running").await;
    api.req(Method::POST, &format!("/api/jobs/{cancelled}/cancel"))
        .send()
        .await
        .unwrap();
    let job = wait_ended(&api, &cancelled).await;
    assert_eq!(job["state"], "cancelled", "{job}\n{}", worker.log());
    assert_eq!(
        job["reason"], "cancelled by a user while fetching the sources",
        "{job}"
    );
    assert_eq!(job["tasks"][0]["state"], "skipped", "it never ran: {job}");

    let job = wait_ended(&api, &timed).await;
    assert_eq!(job["state"], "timed_out", "{job}\n{}", worker.log());
    let reason = job["reason"].as_str().unwrap();
    // On a slow host the deadline may come while the guest still boots: that ends the job too.
    if seen_running {
        assert_eq!(
            reason,
            "the job ran past its timeout of 25s while fetching the sources"
        );
    } else {
        assert!(
            reason.starts_with("the job ran past its timeout of 25s while "),
            "{reason}"
        );
    }
    assert_eq!(job["tasks"][0]["state"], "skipped", "{job}");
    let log = log_of(&api, &timed).await;
    assert!(log.contains(reason), "the reason is in the log: {log}");
    assert!(!log.contains("you should not see this"), "{log}");

    let held = held.lock().unwrap();
    assert_eq!(held.len(), 2, "one fetch per job");
    for stream in held.iter() {
        assert!(
            closed_by_peer(stream, Duration::from_secs(10)),
            "a stopped job's fetch is ended"
        );
    }
    assert!(worker.guest_processes().is_empty());
    assert!(worker.leftovers().is_empty(), "{:?}", worker.leftovers());
}

/// README's one-command farm builds tiny and debian-12; a job for another image must not wait
/// with no word. `vmfarm up` builds a recipe's image when a queued job names it (saying so in
/// the job's log) and the job runs; a job whose recipe is broken ends in `error` saying why; a
/// job for an image no recipe makes stays queued, and the submit answer, `vmfarm status` and
/// the API say that no worker offers it and which images workers do offer.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_vmfarm_up_builds_the_image_a_queued_job_names() {
    let holder = tempfile::tempdir().unwrap();
    let data = holder.path().join("data");
    let recipes = holder.path().join("recipes");
    std::fs::create_dir_all(&recipes).unwrap();
    let tiny = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/images/tiny.toml"),
    )
    .unwrap();
    std::fs::write(recipes.join("tiny.toml"), &tiny).unwrap();
    let demand = tiny.replace("name = \"tiny\"", "name = \"tiny-demand\"");
    assert_ne!(demand, tiny);
    std::fs::write(recipes.join("tiny-demand.toml"), demand).unwrap();
    std::fs::write(
        recipes.join("broken.toml"),
        "name = \"broken\"\nboot = \"linux\"\n",
    )
    .unwrap();
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
            "[[tokens]]\nname = \"admin\"\ntoken = \"{}\"\nscopes = [\"admin\"]\n\
             [leases]\nlong_poll = \"2s\"\n",
            common::ADMIN_TOKEN
        ),
    )
    .unwrap();
    let worker_config = holder.path().join("worker.toml");
    std::fs::write(
        &worker_config,
        format!(
            "{WORKER}[jail]\nfirst_uid = {}\nuid_count = 4\n",
            2_600_000 + (std::process::id() % 100_000) * 128,
        ),
    )
    .unwrap();
    let up_log = holder.path().join("up.log");
    let mut up = Command::new(env!("CARGO_BIN_EXE_vmfarm"))
        .args(["up", "--listen", &format!("127.0.0.1:{port}"), "--data"])
        .arg(&data)
        .arg("--server-config")
        .arg(&server_config)
        .arg("--worker-config")
        .arg(&worker_config)
        .env("VMFARM_RECIPES", &recipes)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&up_log).unwrap())
        .spawn()
        .unwrap();
    let api = common::Api {
        http: reqwest::Client::new(),
        base: url.clone(),
        token: common::ADMIN_TOKEN.to_owned(),
    };
    let up_said = || std::fs::read_to_string(&up_log).unwrap_or_default();
    // The worker offers tiny once up has built it.
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        if let Ok(r) = api.req(Method::GET, "/api/workers").send().await
            && let Ok(workers) = r.json::<Value>().await
            && workers.to_string().contains("\"tiny\"")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no worker offers tiny: {}",
            up_said()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    let job = |image: &str| {
        format!(
            "image = \"{image}\"\n[[tasks]]\nname = \"hello\"\nscript = \"echo hello from $(uname -n)\"\n"
        )
    };
    let submitted = api.submit(&job("tiny-demand")).await;
    assert_eq!(
        submitted.jobs[0].waiting.as_deref(),
        Some("no worker offers image `tiny-demand` (workers offer: tiny); it waits until one does"),
        "{submitted:?}"
    );
    let demanded = submitted.jobs[0].id.clone();
    let broken = api.submit(&job("broken")).await.jobs[0].id.clone();
    let nope = api.submit(&job("nope")).await;
    assert!(
        nope.jobs[0]
            .waiting
            .as_deref()
            .is_some_and(|w| w.contains("no worker offers image `nope`")),
        "{nope:?}"
    );
    let nope = nope.jobs[0].id.clone();

    let ended = wait_ended(&api, &demanded).await;
    let log = log_of(&api, &demanded).await;
    assert_eq!(ended["state"], "succeeded", "{ended}\n{log}\n{}", up_said());
    assert!(
        log.contains("[vmfarm] vmfarm up is building image `tiny-demand` for this job"),
        "{log}"
    );
    assert!(
        log.contains("[vmfarm] image `tiny-demand` is built (version "),
        "{log}"
    );
    assert!(log.contains("hello from "), "{log}");

    let ended = wait_ended(&api, &broken).await;
    assert_eq!(ended["state"], "error", "{ended}");
    let reason = ended["reason"].as_str().unwrap_or_default();
    assert!(
        reason.starts_with("image `broken` cannot be built: recipe ")
            && reason.contains("broken.toml"),
        "{ended}"
    );
    assert!(log_of(&api, &broken).await.contains(reason));

    // The job no recipe makes waits, and says so: the API, its log, `vmfarm status`.
    let waiting = wait_for(
        &api,
        &nope,
        "the demanded image among those offered",
        |j| {
            j["waiting"]
                .as_str()
                .is_some_and(|w| w.contains("workers offer: tiny, tiny-demand"))
        },
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(waiting["state"], "queued", "{waiting}");
    let log = log_of(&api, &nope).await;
    assert!(
        log.contains("[vmfarm] vmfarm up cannot build image `nope`: no recipe \"nope\""),
        "{log}"
    );
    let status = Command::new(env!("CARGO_BIN_EXE_vmfarm"))
        .args(["status", &nope])
        .env("VMFARM_SERVER", &url)
        .env("VMFARM_TOKEN", common::ADMIN_TOKEN)
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&status.stdout);
    assert!(
        printed.contains(&format!(
            "job {nope} waits: no worker offers image `nope` (workers offer: tiny, tiny-demand)"
        )),
        "{printed}"
    );
    up.kill().unwrap();
    up.wait().unwrap();
}

/// `vmfarm images import` checks the file before it writes anything: a missing file, a file
/// that is not a disk image and a damaged qcow2 each get a clear error and leave nothing in the
/// images directory. A disk that boots to nothing (its firmware finds no boot loader) ends its
/// job in `error` within the worker's boot timeout, the guest's console in the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_images_import_checks_the_disk_and_a_silent_guest_ends_in_error() {
    let holder = tempfile::tempdir().unwrap();
    let images_dir = holder.path().join("images");
    let import = |name: &str, file: &Path| {
        Command::new(env!("CARGO_BIN_EXE_vmfarm"))
            .args(["images", "import", name])
            .arg(file)
            .arg("--images-dir")
            .arg(&images_dir)
            .output()
            .unwrap()
    };
    let text = holder.path().join("notes.txt");
    std::fs::write(&text, "just some text, not a disk\n".repeat(100_000)).unwrap();
    let damaged = holder.path().join("damaged.qcow2");
    let made = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&damaged)
        .arg("64M")
        .status()
        .unwrap();
    assert!(made.success());
    // The header's cluster_bits (bytes 20..24) made nonsense.
    let mut header = std::fs::read(&damaged).unwrap();
    header[20..24].copy_from_slice(&[0, 0, 0, 99]);
    std::fs::write(&damaged, header).unwrap();
    for (file, says) in [
        (holder.path().join("no-such.qcow2"), "no such file"),
        (text, "no partition table"),
        (damaged, "cannot read it as a disk image"),
    ] {
        let out = import("bad", &file);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{}: {stderr}", file.display());
        assert!(
            stderr.contains(&file.display().to_string()) && stderr.contains(says),
            "{}: {stderr}",
            file.display()
        );
        let left: Vec<_> = std::fs::read_dir(&images_dir)
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "{left:?}");
    }

    // A disk with a partition table's boot signature and nothing to boot.
    let blank = holder.path().join("blank.raw");
    let mut sectors = vec![0u8; 4 << 20];
    sectors[510..512].copy_from_slice(&[0x55, 0xAA]);
    std::fs::write(&blank, sectors).unwrap();
    let out = import("blank", &blank);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("blank.raw (imported) by Uefi firmware"),
        "{said}"
    );

    let server = TestServer::start(Backend::Sqlite);
    let worker = TestWorker::start(
        &server,
        0,
        &images_dir,
        &format!("{WORKER}firmware_boot_timeout = \"30s\"\n"),
    );
    let api = server.admin();
    let submitted = Instant::now();
    let id = api
        .submit(&common::manifest("blank", &["build"]))
        .await
        .jobs[0]
        .id
        .clone();
    let job = wait_ended(&api, &id).await;
    let log = log_of(&api, &id).await;
    assert_eq!(job["state"], "error", "{job}\n{log}\n{}", worker.log());
    let reason = job["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("within 30s"), "{job}");
    assert!(
        log.contains("BdsDxe"),
        "the firmware's console is in the log: {log}"
    );
    assert!(
        submitted.elapsed() < Duration::from_secs(30 + 60),
        "the job ended {:?} after its submit; the boot timeout is 30 s",
        submitted.elapsed()
    );
}
