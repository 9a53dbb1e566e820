//! Boots every image of configs/images under the `qemu` backend (TCG) and drives the agent
//! through `Guest::ssh`: the boot contract end to end.
//!
//! Images are built on first use and cached under $VMFARM_CACHE (~/.cache/vmfarm), so later
//! runs only boot. The agent is built for x86_64-unknown-linux-musl by the test itself unless
//! VMFARM_AGENT names one.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use sha2::{Digest as _, Sha256};
use vmfarm_worker::backend::qemu::{Accel, QemuBackend};
use vmfarm_worker::backend::{Backend, Boot, BootSpec, SealedMemory, Snapshot, Vm};
use vmfarm_worker::guest::cloud_init::Seed;
use vmfarm_worker::guest::{
    Announcer, ExecLimits, Guest, HostFingerprint, JobKey, OutputStream, SshError, SshOptions,
    Start, identity, introduce, wait_ready,
};
use vmfarm_worker::images::{self, BuildOptions, InstalledImage, Recipe};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The static agent: $VMFARM_AGENT, or built here with cargo.
fn agent() -> PathBuf {
    static AGENT: OnceLock<PathBuf> = OnceLock::new();
    AGENT
        .get_or_init(|| {
            if let Some(path) = std::env::var_os("VMFARM_AGENT") {
                return PathBuf::from(path);
            }
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            let status = std::process::Command::new(cargo)
                .args([
                    "build",
                    "-q",
                    "-p",
                    "vmfarm-agent",
                    "--release",
                    "--target",
                    "x86_64-unknown-linux-musl",
                ])
                .current_dir(workspace())
                .status()
                .expect("running cargo");
            assert!(status.success(), "building the agent failed");
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map_or_else(|| workspace().join("target"), PathBuf::from);
            target.join("x86_64-unknown-linux-musl/release/vmfarm-agent")
        })
        .clone()
}

/// One image, built once per test process.
type ImageSlot = std::sync::Arc<Mutex<Option<InstalledImage>>>;

/// Builds (or reuses) image `name`, once per test process.
fn image(name: &str) -> InstalledImage {
    static SLOTS: OnceLock<Mutex<HashMap<String, ImageSlot>>> = OnceLock::new();
    let slot = SLOTS
        .get_or_init(Default::default)
        .lock()
        .unwrap()
        .entry(name.into())
        .or_default()
        .clone();
    let mut slot = slot.lock().unwrap();
    if let Some(image) = slot.as_ref() {
        return image.clone();
    }
    let recipe = Recipe::load(name, &workspace().join("configs/images")).unwrap();
    let cache_dir = images::cache_dir();
    let options = BuildOptions {
        images_dir: cache_dir.join("test-images"),
        cache_dir,
        agent: agent(),
    };
    let report =
        images::build(&recipe, &options, &mut |step| eprintln!("[{name}] {step}")).unwrap();
    let sizes: Vec<String> = report
        .image
        .manifest
        .files
        .iter()
        .map(|(file, entry)| format!("{file} {:.1} MiB", entry.size as f64 / 1048576.0))
        .collect();
    eprintln!(
        "[{name}] image {} in {:.1} s (reused {}, rootfs cached {}, initrd cached {}): {}",
        report.image.manifest.version,
        report.seconds,
        report.reused,
        report.rootfs_cached,
        report.initrd_cached,
        sizes.join(", ")
    );
    let again = images::build(&recipe, &options, &mut |_| {}).unwrap();
    assert!(
        again.reused,
        "a rebuild of an unchanged recipe reuses the image"
    );
    assert_eq!(again.image.manifest, report.image.manifest);
    // Whatever else the cache holds, the version just built or found is the one jobs run.
    let current = images::current(&options.images_dir).unwrap();
    assert_eq!(current[name].manifest, report.image.manifest);
    *slot = Some(report.image.clone());
    report.image
}

struct Booted {
    vm: Box<dyn Vm>,
    stream_key: JobKey,
    fingerprint: vmfarm_worker::guest::HostFingerprint,
    console: std::sync::Arc<Mutex<Vec<u8>>>,
}

/// A kernel boot of `image` with the agent, as the worker composes it.
fn linux_spec(
    image: &InstalledImage,
    backend: &QemuBackend,
    run_dir: &Path,
    memory_mib: u32,
) -> BootSpec {
    BootSpec::with_agent(image, backend, (2, memory_mib), run_dir.to_owned())
}

async fn boot(image: &InstalledImage, run_dir: &Path) -> Booted {
    let backend = QemuBackend::new(Accel::Tcg);
    let spec = linux_spec(image, &backend, run_dir, 1024);
    let start = Instant::now();
    let vm = backend.boot(&spec).await.unwrap();
    let booted = introduce_guest(vm, Start::Cold, &format!("job-{}", image.manifest.name)).await;
    eprintln!(
        "[{}] boot to ready: {:.2} s",
        image.manifest.name,
        start.elapsed().as_secs_f64()
    );
    booted
}

/// Sends a booted or restored guest its identity (a fresh key, `hostname`) and waits for its
/// agent's host key, the console kept meanwhile and after.
async fn introduce_guest(mut vm: Box<dyn Vm>, start: Start, hostname: &str) -> Booted {
    let key = JobKey::generate().unwrap();
    let mut console = vm.take_console().unwrap();
    let log = std::sync::Arc::new(Mutex::new(Vec::new()));
    let sink_log = log.clone();
    let mut sink = move |b: &[u8]| sink_log.lock().unwrap().extend_from_slice(b);
    let identity = identity(&key, hostname, Vec::new()).unwrap();
    let ready = introduce(
        vm.as_mut(),
        &mut console,
        &mut sink,
        Duration::from_secs(180),
        &identity,
        start,
    )
    .await;
    let fingerprint = match ready {
        Ok(fp) => fp,
        Err(e) => panic!(
            "{e}; console:\n{}",
            String::from_utf8_lossy(&log.lock().unwrap())
        ),
    };
    // Keep draining the console so the guest never blocks on it.
    let keep = log.clone();
    tokio::spawn(async move {
        use tokio::io::AsyncReadExt as _;
        let mut buf = vec![0u8; 4096];
        while let Ok(n) = console.read(&mut buf).await {
            if n == 0 {
                break;
            }
            keep.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    });
    Booted {
        vm,
        stream_key: key,
        fingerprint,
        console: log,
    }
}

async fn ssh(booted: &mut Booted, key: &JobKey) -> Result<Guest, SshError> {
    let stream = booted.vm.connect().await.unwrap();
    Guest::ssh(stream, key, &booted.fingerprint, &SshOptions::default()).await
}

async fn run(guest: &Guest, command: &str) -> (String, String, u32) {
    let out = guest
        .exec_collect(command, ExecLimits::timeout(Duration::from_secs(300)))
        .await
        .unwrap();
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        out.exit_status,
    )
}

/// Everything the issue asks of a booted guest; `debian` adds the C toolchain.
async fn exercise(name: &str, expect_os_release: &str, debian: bool) {
    let image = image(name);
    let run_dir = std::env::temp_dir().join(format!("vmfarm-test-{name}-{}", std::process::id()));
    let mut booted = boot(&image, &run_dir).await;

    // A key other than the job's is refused.
    let wrong = JobKey::generate().unwrap();
    match ssh(&mut booted, &wrong).await {
        Err(SshError::AuthRefused(user)) => assert_eq!(user, "build"),
        Err(e) => panic!("expected the wrong key to be refused, got {e}"),
        Ok(_) => panic!("a wrong key was accepted"),
    }

    let key = booted.stream_key.clone();
    let guest = ssh(&mut booted, &key).await.unwrap();

    let (uname, _, status) = run(&guest, "uname -a").await;
    assert_eq!(status, 0);
    assert!(
        uname.contains(&image.manifest.system.kernel_version),
        "{uname}"
    );
    assert!(
        uname.contains(&format!("job-{name}")),
        "hostname from the identity: {uname}"
    );

    let (os_release, _, _) = run(&guest, "cat /etc/os-release").await;
    assert!(os_release.contains(expect_os_release), "{os_release}");

    let (clock, _, _) = run(&guest, "date +%s").await;
    let host_now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let guest_now: u64 = clock.trim().parse().unwrap();
    assert!(
        host_now.abs_diff(guest_now) < 300,
        "clock from the identity: guest {guest_now}, host {host_now}"
    );

    let (who, _, _) = run(&guest, "id -u; id -un; pwd; echo $HOME").await;
    assert_eq!(who, "1000\nbuild\n/home/build/work\n/home/build\n");

    let mut seen = Vec::new();
    let env = [("GREETING".to_owned(), "hello from the worker".to_owned())];
    let status = guest
        .exec(
            "echo \"$GREETING\"; echo oops >&2; exit 7",
            &env,
            &mut |s: OutputStream, d: &[u8]| seen.push((s, d.to_vec())),
            ExecLimits::default(),
        )
        .await
        .unwrap();
    assert_eq!(status, 7, "a non-zero exit status is reported");
    let stdout: Vec<u8> = seen
        .iter()
        .filter(|(s, _)| *s == OutputStream::Stdout)
        .flat_map(|(_, d)| d.clone())
        .collect();
    let stderr: Vec<u8> = seen
        .iter()
        .filter(|(s, _)| *s == OutputStream::Stderr)
        .flat_map(|(_, d)| d.clone())
        .collect();
    assert_eq!(stdout, b"hello from the worker\n");
    assert_eq!(stderr, b"oops\n");

    if debian {
        let program =
            "#include <stdio.h>\nint main(void) { printf(\"built %d\\n\", 6 * 7); return 0; }\n";
        let command = format!(
            "printf '%s' '{program}' > hello.c && cc -O2 -o hello hello.c && ./hello && sudo -n id -u"
        );
        let (out, err, status) = run(&guest, &command).await;
        assert_eq!(
            (status, out.as_str()),
            (0, "built 42\n0\n"),
            "stderr: {err}"
        );
    }

    // 50 MiB to stdout, streamed without loss.
    let start = Instant::now();
    let mut count = 0usize;
    let mut hash = Sha256::new();
    let status = guest
        .exec(
            "head -c 52428800 /dev/zero",
            &[],
            &mut |_: OutputStream, d: &[u8]| {
                count += d.len();
                hash.update(d);
            },
            ExecLimits::timeout(Duration::from_secs(600)),
        )
        .await
        .unwrap();
    assert_eq!((status, count), (0, 50 << 20));
    assert_eq!(
        hex::encode(hash.finalize()),
        hex::encode(Sha256::digest(vec![0u8; 50 << 20]))
    );
    eprintln!(
        "[{name}] 50 MiB stdout in {:.1} s",
        start.elapsed().as_secs_f64()
    );

    // SFTP round trip of 10 MiB.
    let local = run_dir.join("upload.bin");
    let data: Vec<u8> = (0..10u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(&local, &data).unwrap();
    let start = Instant::now();
    let sent = guest
        .upload(&local, "/home/build/work/upload.bin")
        .await
        .unwrap();
    let (remote_sum, _, _) = run(&guest, "sha256sum upload.bin").await;
    assert!(
        remote_sum.starts_with(&sent),
        "guest: {remote_sum} host: {sent}"
    );
    let back = run_dir.join("download.bin");
    let got = guest
        .download("/home/build/work/upload.bin", &back, 1 << 30)
        .await
        .unwrap();
    assert_eq!(got.sha256, sent);
    assert_eq!(std::fs::read(&back).unwrap(), data);
    eprintln!(
        "[{name}] 10 MiB SFTP round trip in {:.1} s",
        start.elapsed().as_secs_f64()
    );

    // A command that outlives its timeout.
    let err = guest
        .exec_collect("sleep 100", ExecLimits::timeout(Duration::from_secs(1)))
        .await
        .unwrap_err();
    assert!(matches!(err, SshError::Timeout { .. }), "{err}");

    // A cancelled command ends at once, its processes with it.
    let (cancel, cancelled) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let _ = cancel.send(true);
    });
    let limits = ExecLimits {
        timeout: None,
        cancel: Some(cancelled),
    };
    let err = guest
        .exec_collect("sleep 101 & sleep 102; wait", limits)
        .await
        .unwrap_err();
    assert!(matches!(err, SshError::Cancelled), "{err}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (left, _, _) = run(&guest, "ps -o args 2>/dev/null || ps ax").await;
    assert!(
        !left.contains("sleep 10"),
        "killed commands leave no process: {left}"
    );

    // A port forwarded to the worker (the network proxy's way in): a connection made in the
    // guest arrives here, over the same SSH connection.
    let (port, mut forwarded) = guest.forward().await.unwrap();
    let answered = tokio::spawn(async move {
        let mut stream = forwarded.recv().await.expect("a forwarded connection");
        let mut got = [0u8; 5];
        stream.read_exact(&mut got).await.unwrap();
        stream.write_all(b"pong\n").await.unwrap();
        stream.shutdown().await.unwrap();
        got
    });
    let dial = format!(
        "if command -v nc >/dev/null 2>&1; then printf 'ping\\n' | nc 127.0.0.1 {port}; \
         else bash -c 'exec 3<>/dev/tcp/127.0.0.1/{port}; printf \"ping\\n\" >&3; cat <&3'; fi"
    );
    let (reply, err, status) = run(&guest, &dial).await;
    assert_eq!((status, reply.as_str()), (0, "pong\n"), "stderr: {err}");
    assert_eq!(&answered.await.unwrap(), b"ping\n");

    guest.shutdown().await.unwrap();
    let exit = tokio::time::timeout(Duration::from_secs(30), booted.vm.wait()).await;
    let console = String::from_utf8_lossy(&booted.console.lock().unwrap()).into_owned();
    assert!(
        exit.is_ok(),
        "the guest did not end after shutdown; console:\n{console}"
    );
    assert!(console.contains("vmfarm-agent: shutting down"), "{console}");
    drop(booted);
    assert!(
        !run_dir.join("overlay.qcow2").exists(),
        "the overlay is removed with the VM"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_tiny_boots_and_serves_the_agent() {
    exercise("tiny", "ID=tiny", false).await;
}

/// Two guests restored at once from one template snapshot of the tiny image: each takes its own
/// identity (host name, host key, random stream), runs commands, and writes its own disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_guests_restored_from_one_snapshot_share_no_identity() {
    let image = image("tiny");
    let scratch = tempfile::tempdir().unwrap();
    let backend = QemuBackend::new(Accel::Tcg);
    let snapshot = Snapshot {
        dir: scratch.path().join("template"),
    };
    let saving = Instant::now();
    let spec = linux_spec(&image, &backend, &scratch.path().join("template-run"), 256);
    backend
        .save(&spec, &snapshot, Duration::from_secs(180))
        .await
        .unwrap();
    eprintln!(
        "[tiny] template saved in {:.2} s",
        saving.elapsed().as_secs_f64()
    );
    let memory = SealedMemory::load(&snapshot.memory()).unwrap();
    let mut vms = Vec::new();
    for i in 0..2 {
        let restoring = Instant::now();
        let spec = linux_spec(
            &image,
            &backend,
            &scratch.path().join(format!("guest-{i}")),
            256,
        );
        vms.push(backend.restore(&spec, &snapshot, &memory).await.unwrap());
        eprintln!(
            "[tiny] restore {i} started in {:.3} s",
            restoring.elapsed().as_secs_f64()
        );
    }
    let mut seen = Vec::new();
    for (i, vm) in vms.into_iter().enumerate() {
        let hostname = format!("job-restored-{i}");
        let mut booted = introduce_guest(vm, Start::Restored, &hostname).await;
        let key = booted.stream_key.clone();
        let guest = ssh(&mut booted, &key).await.unwrap();
        let script = format!(
            "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; hostname; \
             touch ~/from-{i}; ls ~"
        );
        let (out, err, status) = run(&guest, &script).await;
        assert_eq!(status, 0, "{out}{err}");
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0].len(), 64, "{out}");
        assert_eq!(lines[1], hostname, "{out}");
        let own = format!("from-{i}");
        assert_eq!(
            lines[2..],
            [own.as_str(), "work"],
            "each guest has its own disk: {out}"
        );
        eprintln!(
            "[tiny] restored guest {i}: random {} host key {}",
            lines[0], booted.fingerprint
        );
        seen.push((lines[0].to_owned(), booted.fingerprint.clone(), booted));
    }
    assert_ne!(seen[0].0, seen[1].0, "the random streams differ");
    assert_ne!(seen[0].1, seen[1].1, "the host keys differ");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_debian_12_boots_and_builds_c() {
    exercise("debian-12", "VERSION_ID=\"12\"", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_debian_13_boots_and_builds_c() {
    exercise("debian-13", "VERSION_ID=\"13\"", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_debian_11_boots_and_builds_c() {
    exercise("debian-11", "VERSION_ID=\"11\"", true).await;
}

/// A disk that boots by firmware, reached through its own OpenSSH: the host key cloud-init
/// prints on the console is the only one taken (a server that presents another is refused,
/// naming both), the seed's build user has the job's key and sudo, and the ACPI power button
/// ends the guest. Unjailed here: the SSH port is forwarded from the host's loopback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_a_cloud_image_is_pinned_to_the_host_key_cloud_init_prints() {
    let image = image("debian-12-cloud");
    let scratch = tempfile::tempdir().unwrap();
    let key = JobKey::generate().unwrap();
    let seed = Seed {
        hostname: "job-pinned",
        user: image.user(),
        public_key: &key.public_openssh(),
    }
    .write(&scratch.path().join("seed"))
    .unwrap();
    let spec = BootSpec {
        boot: Boot::Firmware {
            firmware: image.firmware().expect("a firmware image"),
            seed,
        },
        base_disk: image.base_disk(),
        vcpus: 2,
        memory_mib: 1024,
        run_dir: scratch.path().join("vm"),
        caches: Vec::new(),
    };
    let mut vm = QemuBackend::new(Accel::Tcg).boot(&spec).await.unwrap();
    let mut console = vm.take_console().unwrap();
    let mut seen = Vec::new();
    let printed = wait_ready(
        &mut console,
        &mut |b: &[u8]| seen.extend_from_slice(b),
        Duration::from_secs(300),
        Announcer::cloud_init(),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&seen)));
    let other = HostFingerprint("SHA256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU".into());
    let refused = Guest::ssh(
        vm.connect().await.unwrap(),
        &key,
        &other,
        &SshOptions::default(),
    )
    .await;
    match refused {
        Err(e @ SshError::HostKeyMismatch { .. }) => {
            let said = e.to_string();
            assert!(
                said.contains(&other.0) && said.contains(&printed.0),
                "{said}"
            );
        }
        Err(e) => panic!("expected a host key mismatch, got {e}"),
        Ok(_) => panic!("a server with another host key than the pinned one was taken"),
    }
    let guest = Guest::ssh(
        vm.connect().await.unwrap(),
        &key,
        &printed,
        &SshOptions::default(),
    )
    .await
    .unwrap();
    let (out, err, status) = run(&guest, "id -un; sudo -n id -u; hostname").await;
    assert_eq!(
        (out.as_str(), status),
        ("build\n0\njob-pinned\n", 0),
        "{err}"
    );
    guest.disconnect().await;
    assert!(
        vm.power_off().await.unwrap(),
        "the guest has an ACPI button"
    );
    let ended = tokio::time::timeout(Duration::from_secs(120), vm.wait()).await;
    assert!(
        matches!(ended, Ok(Ok(_))),
        "the guest powered off by its ACPI button: {ended:?}"
    );
}

#[test]
fn test_images_build_refuses_an_unknown_package() {
    let text = std::fs::read_to_string(workspace().join("configs/images/debian-12.toml")).unwrap();
    let text = text
        .replace("\"git\"", "\"git\", \"vmfarm-no-such-package\"")
        .replace("name = \"debian-12\"", "name = \"broken\"");
    let recipe = Recipe::parse(&text, Path::new("broken.toml")).unwrap();
    let dir = std::env::temp_dir().join(format!("vmfarm-broken-{}", std::process::id()));
    let options = BuildOptions {
        images_dir: dir.join("images"),
        cache_dir: dir.join("cache"),
        agent: agent(),
    };
    let err = images::build(&recipe, &options, &mut |_| {}).unwrap_err();
    assert!(
        matches!(&err, images::ImageError::UnknownPackage(p) if p == "vmfarm-no-such-package"),
        "{err}"
    );
    let left: Vec<_> = std::fs::read_dir(dir.join("images/broken"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(
        left,
        vec![std::ffi::OsString::from(".lock")],
        "no half-written image is left"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
