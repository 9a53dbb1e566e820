//! Tests on a real KVM, in the KVM lab (tests/kvm-lab/README.md).
//!
//! The host's /dev/kvm may not run stock Linux guests (PVM), so the lab boots an L1 Debian cloud
//! kernel under QEMU TCG whose own KVM (kvm-amd, nested SVM) is real; `tests/kvm-lab/lab.sh` builds
//! it, runs a payload's `run.sh` in it and hands back the console. Each check in L1 prints
//! `LAB-CHECK <name> ok|FAIL <detail>`; these tests assert on those lines.
//!
//! Without the tools the lab needs, the tests skip with the reason; with `VMFARM_REQUIRE_KVM=1` they
//! fail instead. The `vmfarm` in L1 is, in order: `VMFARM_LAB_VMFARM=/path/to/vmfarm` (e.g. the static
//! musl build, `tests/kvm-lab/lab.sh build-vmfarm`), else the `vmfarm` this test run built. A dynamic
//! binary takes its shared libraries along (lab.sh copies them); binaries are stripped on the way in.

mod common;

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::thread::sleep;
use std::time::{Duration, Instant};

const LAB_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/kvm-lab");

/// Host tools the lab script needs (checked up front so that a missing one is a clear skip/fail).
const LAB_TOOLS: &[&str] = &[
    "qemu-system-x86_64",
    "qemu-img",
    "timeout",
    "cpio",
    "depmod",
    "gcc",
    "lz4",
    "readelf",
    "file",
    "flock",
    "apt-get",
    "dpkg-deb",
];

/// Sections of checks/vm-suite.sh that run (each test below asserts on its own section's checks).
/// A section whose test is `#[ignore]`d stays out of this list so that it costs no lab time;
/// `VMFARM_LAB_VM_SECTIONS="basic disk vsock panic"` overrides it.
const VM_SECTIONS: &[&str] = &["basic", "disk", "vsock", "panic"];

/// One lab run at a time: L1 is a 2-vCPU TCG guest and the machine is shared.
static LAB_LOCK: Mutex<()> = Mutex::new(());

struct LabRun {
    /// Exit status of `lab.sh run`: run.sh's status, 124 timeout, 125 no result line, 2 setup error.
    status: i32,
    console: String,
    stderr: String,
    elapsed: Duration,
    /// What run.sh left in /out.
    out: PathBuf,
    /// Holds `out` and the console log.
    _scratch: Scratch,
}

impl LabRun {
    /// The `LAB-CHECK name ...` line, as (passed, detail).
    fn check(&self, name: &str) -> Option<(bool, String)> {
        let prefix = format!("LAB-CHECK {name} ");
        self.console.lines().find_map(|line| {
            let rest = line.strip_prefix(&prefix)?;
            let (verdict, detail) = rest.split_once(' ').unwrap_or((rest, ""));
            Some((verdict == "ok", detail.to_string()))
        })
    }

    fn assert_checks(&self, names: &[&str]) {
        let mut problems = Vec::new();
        for name in names {
            match self.check(name) {
                Some((true, _)) => {}
                Some((false, detail)) => problems.push(format!("{name} failed: {detail}")),
                None => problems.push(format!("{name} did not run")),
            }
        }
        assert!(
            problems.is_empty(),
            "lab checks: {}\n--- lab.sh stderr ---\n{}\n--- L1 console ({:.1} s, status {}) ---\n{}",
            problems.join("; "),
            self.stderr,
            self.elapsed.as_secs_f64(),
            self.status,
            self.console
        );
    }

    fn lines_with(&self, needle: &str) -> Vec<&str> {
        self.console
            .lines()
            .filter(|l| l.contains(needle))
            .collect()
    }
}

/// Why the lab cannot run on this machine, if it cannot.
fn lab_unavailable() -> Option<String> {
    let missing: Vec<&str> = LAB_TOOLS
        .iter()
        .copied()
        .filter(|tool| {
            !Command::new("sh")
                .args(["-c", "command -v \"$1\" >/dev/null", "sh", tool])
                .status()
                .is_ok_and(|s| s.success())
        })
        .collect();
    if !missing.is_empty() {
        return Some(format!(
            "missing host tools: {} (run scripts/install-deps.sh)",
            missing.join(", ")
        ));
    }
    if !["/bin/busybox", "/usr/bin/busybox"]
        .iter()
        .any(|b| Path::new(b).exists())
    {
        return Some("no busybox (apt-get install busybox-static)".into());
    }
    None
}

fn kvm_required() -> bool {
    std::env::var("VMFARM_REQUIRE_KVM").is_ok_and(|v| v == "1")
}

/// Skips (returns false) or, under VMFARM_REQUIRE_KVM=1, fails when the lab cannot run here.
fn lab_can_run(test: &str) -> bool {
    match lab_unavailable() {
        None => true,
        Some(why) if kvm_required() => {
            panic!("{test}: VMFARM_REQUIRE_KVM=1 but the KVM lab cannot run here: {why}")
        }
        Some(why) => {
            eprintln!(
                "skipping {test}: the KVM lab cannot run here: {why} (VMFARM_REQUIRE_KVM=1 makes this a failure)"
            );
            false
        }
    }
}

/// A scratch directory removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        // target/tmp: what a run leaves behind (the shared suite's run is never dropped) stays there.
        let base = option_env!("CARGO_TARGET_TMPDIR")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir = base.join(format!("kvm-lab-{tag}-{}-{nanos}", std::process::id()));
        fs::create_dir_all(&dir).expect("create scratch dir");
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Kills a child's whole process group (lab.sh, QEMU, helpers) unless disarmed.
struct GroupKiller(u32);

impl Drop for GroupKiller {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.0)])
            .stderr(Stdio::null())
            .status();
    }
}

/// Runs `lab.sh ARGS` in its own process group, killed as a whole after `limit`.
fn lab_sh(args: &[&str], limit: Duration) -> (i32, String, String) {
    let scratch = Scratch::new("sh");
    let (out_path, err_path) = (scratch.0.join("stdout"), scratch.0.join("stderr"));
    let mut child = Command::new("bash")
        .arg(Path::new(LAB_DIR).join("lab.sh"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(fs::File::create(&out_path).expect("stdout file"))
        .stderr(fs::File::create(&err_path).expect("stderr file"))
        .process_group(0)
        .spawn()
        .expect("spawn tests/kvm-lab/lab.sh");
    let _killer = GroupKiller(child.id());
    let start = Instant::now();
    let status = loop {
        match child.try_wait().expect("wait for lab.sh") {
            Some(status) => break status.code().unwrap_or(-1),
            None if start.elapsed() > limit => {
                let _ = child.kill();
                let _ = child.wait();
                break -1;
            }
            None => sleep(Duration::from_millis(100)),
        }
    };
    let stdout = fs::read_to_string(&out_path).unwrap_or_default();
    let mut stderr = fs::read_to_string(&err_path).unwrap_or_default();
    if status == -1 {
        stderr.push_str(&format!("\nlab.sh killed after {limit:?}"));
    }
    (status, stdout, stderr)
}

/// The lab's cache dir (kernel, modules, helpers), prepared on first use; None if it cannot be.
fn lab_cache(test: &str) -> Option<PathBuf> {
    static CACHE: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let cache = CACHE.get_or_init(|| {
        let _guard = LAB_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let (status, stdout, stderr) = lab_sh(&["prepare"], Duration::from_secs(900));
        match stdout.lines().last() {
            Some(dir) if status == 0 => Ok(PathBuf::from(dir.trim())),
            _ => Err(format!(
                "lab.sh prepare failed (status {status}):\n{stderr}"
            )),
        }
    });
    match cache {
        Ok(dir) => Some(dir.clone()),
        Err(why) if kvm_required() => panic!("{test}: VMFARM_REQUIRE_KVM=1 but {why}"),
        Err(why) => {
            eprintln!("skipping {test}: {why}");
            None
        }
    }
}

/// Boots L1 with `payload` (which must hold run.sh) and returns what came back.
fn run_lab(payload: &Path, timeout_secs: u32) -> LabRun {
    let scratch = Scratch::new("run");
    let log = scratch.0.join("console.log");
    let out = scratch.0.join("out");
    let _guard = LAB_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let start = Instant::now();
    let timeout = timeout_secs.to_string();
    let (status, _, stderr) = lab_sh(
        &[
            "run",
            "--payload",
            &payload.to_string_lossy(),
            "--out",
            &out.to_string_lossy(),
            "--log",
            &log.to_string_lossy(),
            "--timeout",
            &timeout,
        ],
        Duration::from_secs(u64::from(timeout_secs) + 120),
    );
    let elapsed = start.elapsed();
    let console = fs::read_to_string(&log).unwrap_or_default();
    eprintln!(
        "lab run: status {status} in {:.1} s; L1 console:\n{console}",
        elapsed.as_secs_f64()
    );
    LabRun {
        status,
        console,
        stderr,
        elapsed,
        out,
        _scratch: scratch,
    }
}

fn copy_check(name: &str, dest: &Path) {
    fs::copy(Path::new(LAB_DIR).join("checks").join(name), dest)
        .unwrap_or_else(|e| panic!("copy checks/{name}: {e}"));
}

fn lab_sh_ok(args: &[&str]) {
    let (status, stdout, stderr) = lab_sh(args, Duration::from_secs(300));
    assert_eq!(status, 0, "lab.sh {args:?} failed:\n{stdout}\n{stderr}");
}

fn run_ok(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn l1_has_a_working_kvm_and_no_qemu() {
    let test = "l1_has_a_working_kvm_and_no_qemu";
    if !lab_can_run(test) || lab_cache(test).is_none() {
        return;
    }
    let payload = Scratch::new("l1");
    copy_check("l1-kvm.sh", &payload.0.join("run.sh"));
    let run = run_lab(&payload.0, 180);
    run.assert_checks(&[
        "kvm-amd-loaded",
        "nested-paging",
        "dev-kvm",
        "kvmcheck",
        "no-qemu-in-l1",
    ]);
    assert_eq!(run.status, 0, "run.sh status");
    assert!(
        !run.lines_with("KVMCHECK-OK").is_empty(),
        "kvmcheck ran a VM in L1"
    );
}

/// The payload for `vmfarm vm run` in L2: binary, stock kernel, L2 initramfs, disks, the suite.
fn vm_payload(cache: &Path, dir: &Path) {
    let bin = dir.join("bin");
    let l2 = dir.join("l2");
    let disks = dir.join("disks");
    for d in [&bin, &l2, &disks] {
        fs::create_dir_all(d).expect("payload dirs");
    }
    put_vmfarm(&bin);
    fs::copy(cache.join("vmlinuz"), l2.join("vmlinuz")).expect("copy the L2 kernel");
    copy_check("vm-suite.sh", &dir.join("run.sh"));
    lab_sh_ok(&[
        "l2-initrd",
        "--init",
        &Path::new(LAB_DIR)
            .join("checks/l2-guest.sh")
            .to_string_lossy(),
        "--out",
        &l2.join("initrd.cpio").to_string_lossy(),
    ]);
    // raw.img: 8 MiB of zeros. base.qcow2: 16 MiB whose first MiB is the pattern "base" (as
    // l2-guest.sh makes it). overlay.qcow2: empty, over the base's path inside L1.
    let raw = fs::File::create(disks.join("raw.img")).expect("raw.img");
    raw.set_len(8 << 20).expect("size raw.img");
    let base_raw = dir.join("base.raw");
    let mut pattern = Vec::with_capacity(1 << 20);
    for i in 0..100_000 {
        pattern.extend_from_slice(format!("base-{i:010}\n").as_bytes());
    }
    pattern.truncate(1 << 20);
    pattern.resize(16 << 20, 0);
    fs::write(&base_raw, &pattern).expect("base.raw");
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
            .arg(&base_raw)
            .arg(disks.join("base.qcow2")),
    );
    fs::remove_file(&base_raw).expect("remove base.raw");
    run_ok(
        Command::new("qemu-img")
            .args([
                "create",
                "-q",
                "-f",
                "qcow2",
                "-F",
                "qcow2",
                "-u",
                "-b",
                "/payload/disks/base.qcow2",
            ])
            .arg(disks.join("overlay.qcow2"))
            .arg("16M"),
    );
    // VMFARM_LAB_VM_SECTIONS="basic disk" tries sections that are not enabled yet.
    let sections = std::env::var("VMFARM_LAB_VM_SECTIONS")
        .map(|s| s.split_whitespace().map(str::to_string).collect::<Vec<_>>())
        .unwrap_or_else(|_| VM_SECTIONS.iter().map(|s| s.to_string()).collect());
    fs::write(dir.join("sections"), sections.join("\n") + "\n").expect("sections");
}

/// Puts the `vmfarm` for L1 into `bin`, stripped when it can be.
fn put_vmfarm(bin: &Path) {
    let vmfarm = vmfarm_for_lab();
    let dest = bin.join("vmfarm");
    let stripped = Command::new("strip")
        .arg("-o")
        .arg(&dest)
        .arg(&vmfarm)
        .status()
        .is_ok_and(|s| s.success());
    if !stripped {
        fs::copy(&vmfarm, &dest).unwrap_or_else(|e| panic!("copy {vmfarm:?}: {e}"));
    }
}

/// The binary that plays `vmfarm` in L1: `VMFARM_LAB_VMFARM`, else the `vmfarm` this run built.
fn vmfarm_for_lab() -> PathBuf {
    std::env::var_os("VMFARM_LAB_VMFARM").map_or_else(
        || PathBuf::from(env!("CARGO_BIN_EXE_vmfarm")),
        PathBuf::from,
    )
}

/// One lab run of checks/vm-suite.sh: one L1 boot, then each L2 guest of the VMM's checks.
/// One test, because each nextest test is its own process and an L1 boot is not free.
#[test]
fn vm_runs_stock_debian_guests_with_every_device() {
    let test = "vm_runs_stock_debian_guests_with_every_device";
    if !lab_can_run(test) {
        return;
    }
    let Some(cache) = lab_cache(test) else { return };
    let payload = Scratch::new("vm");
    vm_payload(&cache, &payload.0);
    let run = run_lab(&payload.0, 600);
    // Boot to the guest's init with two vCPUs; entropy from virtio-rng; reboot ends the VMM with 0.
    run.assert_checks(&["boot-marker", "nproc-2", "rng", "reboot-exit-0"]);
    // Raw and qcow2-overlay disks keep writes across a guest reboot; the base is unchanged.
    run.assert_checks(&[
        "disk-write",
        "disk-raw-persists",
        "disk-overlay-persists",
        "disk-base-through-overlay",
        "disk-base-unchanged",
    ]);
    // The overlay came back from L1; its backing file only exists there, so check it alone.
    let overlay = run.out.join("overlay.qcow2");
    assert!(overlay.exists(), "the overlay did not come back from L1");
    let spec = format!(
        r#"json:{{"driver":"qcow2","file":{{"driver":"file","filename":"{}"}},"backing":null}}"#,
        overlay.display()
    );
    run_ok(Command::new("qemu-img").args(["check", &spec]));
    let info = Command::new("qemu-img")
        .args(["info", "-U"])
        .arg(&spec)
        .output()
        .expect("qemu-img info");
    let info = String::from_utf8_lossy(&info.stdout);
    assert!(info.contains("file format: qcow2"), "qemu-img info: {info}");
    // vsock both ways, 10 MiB each, intact; a guest panic ends the VMM non-zero, saying so.
    run.assert_checks(&[
        "vsock-host-to-guest",
        "vsock-guest-to-host",
        "panic-exit-nonzero",
    ]);
}

/// One job end to end through the worker's `kvm` backend, the farm's production path on a real
/// KVM: `vmfarm up` in L1 on the tiny image, the integrated VMM, the agent's SSH over vsock, an
/// HTTP server in L1 reached through the worker's proxy, `vmfarm ssh` into the running guest, and
/// the job's artifacts back through the CLI (checks/job-kvm.sh).
#[test]
fn farm_runs_a_job_through_the_integrated_vmm() {
    let test = "farm_runs_a_job_through_the_integrated_vmm";
    if !lab_can_run(test) || lab_cache(test).is_none() {
        return;
    }
    let image = common::farm::image_version_dir("tiny");
    let payload = Scratch::new("job");
    let bin = payload.0.join("bin");
    let version = payload
        .0
        .join("images/tiny")
        .join(image.file_name().expect("the image's version folder"));
    for d in [&bin, &version] {
        fs::create_dir_all(d).expect("payload dirs");
    }
    put_vmfarm(&bin);
    // The worker makes the job's cache disk with the image tools (their libraries follow).
    for tool in ["mkfs.ext4", "qemu-img"] {
        let found = ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
            .iter()
            .map(|d| Path::new(d).join(tool))
            .find(|p| p.exists())
            .unwrap_or_else(|| panic!("{tool} is not installed (e2fsprogs, qemu-utils)"));
        fs::copy(&found, bin.join(tool)).unwrap_or_else(|e| panic!("copy {found:?}: {e}"));
    }
    for entry in fs::read_dir(&image).expect("read the image's folder") {
        let path = entry.expect("image folder entry").path();
        if path.is_file() {
            fs::copy(&path, version.join(path.file_name().unwrap()))
                .unwrap_or_else(|e| panic!("copy {path:?}: {e}"));
        }
    }
    copy_check("job-kvm.sh", &payload.0.join("run.sh"));
    copy_check("kvm-job.toml", &payload.0.join("kvm-job.toml"));
    copy_check("kvm-warm-job.toml", &payload.0.join("kvm-warm-job.toml"));
    let run = run_lab(&payload.0, 900);
    run.assert_checks(&[
        "farm-up",
        "backend-kvm",
        "job-succeeded",
        "job-log-streamed",
        "job-network",
        "ssh-session",
        "job-ssh-seen",
        "job-cache",
        "artifact-intact",
        "guest-cleaned-up",
        "jail-on",
        "vmm-jailed",
    ]);
    // Warm starts through the integrated VMM: a template snapshot made after the first job
    // without caches booted cold; two jobs restored from it at once, each with its own random
    // stream, host key and host name (and a new VM generation ID, announced through the ACPI
    // GED), their logs and artifacts as a booted guest's.
    run.assert_checks(&[
        "template-made",
        "warm-first-cold",
        "warm-restored",
        "warm-identity",
        "warm-vmgenid",
        "warm-artifact",
    ]);
    assert_eq!(run.status, 0, "run.sh status");
}
