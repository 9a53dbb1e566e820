//! The jailed VMM seen from outside while it runs: a tiny guest (a few instructions that print a
//! line on COM1 and spin) booted on the host's /dev/kvm through the worker's `kvm` backend with
//! the jail, then its uid, namespaces, root, environment, seccomp mode, limits and cgroup read
//! from /proc; and a system call outside the filter, which kills the VMM.
//!
//! The jail needs root and these tiny guests need a /dev/kvm that can create a VM (the host's
//! PVM can run them); without either the tests print why and pass, unless
//! `VMFARM_REQUIRE_KVM=1`, where they fail.

use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt as _;
use vmfarm_proto::units::ByteSize;
use vmfarm_worker::backend::jail::{Jailer, choose_jail};
use vmfarm_worker::backend::kvm::KvmBackend;
use vmfarm_worker::backend::{Backend, Boot, BootSpec, LinuxBoot};
use vmfarm_worker::config::{JailConfig, JailMode};

const VMFARM: &str = env!("CARGO_BIN_EXE_vmfarm");
const GREETING: &[u8] = b"jailed guest\n";

/// A minimal ELF64 "kernel" loaded at 1 MiB: prints [`GREETING`] on COM1, then spins.
fn spin_guest() -> Vec<u8> {
    const LOAD: u64 = 0x10_0000;
    let mut code = vec![
        0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0x48, 0x8d, 0x35, 0, 0, 0, 0, // lea rsi, [rip + message]
        0xb9, 0, 0, 0, 0,    // mov ecx, len
        0xac, // lodsb
        0xee, // out dx, al
        0xe2, 0xfc, // loop lodsb
        0xeb, 0xfe, // jmp $
    ];
    let disp = (code.len() - 11) as u32;
    code[7..11].copy_from_slice(&disp.to_le_bytes());
    code[12..16].copy_from_slice(&(GREETING.len() as u32).to_le_bytes());
    code.extend_from_slice(GREETING);
    let mut elf = b"\x7fELF\x02\x01\x01\x00".to_vec();
    elf.extend_from_slice(&[0; 8]);
    elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf.extend_from_slice(&62u16.to_le_bytes()); // x86-64
    elf.extend_from_slice(&1u32.to_le_bytes());
    for word in [LOAD, 64, 0] {
        elf.extend_from_slice(&word.to_le_bytes()); // entry, phoff, shoff
    }
    elf.extend_from_slice(&0u32.to_le_bytes());
    for half in [64u16, 56, 1, 64, 0, 0] {
        elf.extend_from_slice(&half.to_le_bytes());
    }
    elf.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    elf.extend_from_slice(&5u32.to_le_bytes()); // R+X
    let len = code.len() as u64;
    for word in [120, LOAD, LOAD, len, len, 0x1000] {
        elf.extend_from_slice(&word.to_le_bytes());
    }
    elf.extend_from_slice(&code);
    elf
}

/// False (after saying why) when the jail cannot be tried here; panics when KVM is required.
fn can_jail() -> bool {
    // SAFETY: geteuid takes no arguments and cannot fail.
    let why = if unsafe { libc::geteuid() } != 0 {
        "the jail needs root"
    } else if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        "no usable /dev/kvm"
    } else {
        return true;
    };
    assert!(
        std::env::var("VMFARM_REQUIRE_KVM").as_deref() != Ok("1"),
        "VMFARM_REQUIRE_KVM=1 but {why}"
    );
    eprintln!("skipped: {why} (set VMFARM_REQUIRE_KVM=1 to make this a failure)");
    false
}

/// A scratch folder with the tiny guest and a qcow2 base disk.
fn scratch() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("spin.elf");
    std::fs::write(&kernel, spin_guest()).unwrap();
    let base = dir.path().join("base.qcow2");
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&base)
        .arg("1M")
        .output()
        .expect("qemu-img (Debian package qemu-utils)");
    assert!(out.status.success(), "{out:?}");
    (dir, kernel, base)
}

/// The users this test binary's jails take: its own, so that tests running at once do not meet.
fn test_jail_config(cgroup_parent: &str) -> JailConfig {
    JailConfig {
        mode: JailMode::On,
        first_uid: 3_000_000 + (std::process::id() % 100_000) * 8,
        uid_count: 8,
        cgroup_parent: cgroup_parent.into(),
        ..JailConfig::default()
    }
}

fn status_field(pid: u32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
        .trim()
        .to_owned()
}

/// The process whose real uid is `uid` (each jailed VMM has a user of its own).
fn process_of(uid: u32) -> Option<u32> {
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .find(|&pid| {
            std::fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|s| {
                s.lines()
                    .any(|l| l.split_whitespace().take(2).eq(["Uid:", &uid.to_string()]))
            })
        })
}

fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_jailed_vmm_seen_from_proc() {
    if !can_jail() {
        return;
    }
    let (dir, kernel, base) = scratch();
    let parent = format!("vmfarm-test-{}", std::process::id());
    let config = test_jail_config(&parent);
    let (jailer, why): (Option<Arc<Jailer>>, String) = choose_jail(&config).unwrap();
    eprintln!("{why}");
    let backend = KvmBackend::new(VMFARM.into(), jailer);
    let run_dir = dir.path().join("run").join("vm");
    let spec = BootSpec {
        boot: Boot::Linux(LinuxBoot {
            kernel: kernel.clone(),
            initrd: None,
            cmdline: "console=ttyS0".into(),
        }),
        base_disk: base.clone(),
        vcpus: 1,
        memory_mib: 64,
        run_dir: run_dir.clone(),
        caches: Vec::new(),
    };
    let started = Instant::now();
    let mut vm = backend.boot(&spec).await.unwrap();
    let mut console = vm.take_console().unwrap();
    let mut seen = vec![0u8; GREETING.len()];
    tokio::time::timeout(Duration::from_secs(30), console.read_exact(&mut seen))
        .await
        .expect("the guest's line within 30 s")
        .unwrap();
    assert_eq!(seen, GREETING);
    eprintln!("guest running {:?} after boot()", started.elapsed());

    let uid = config.first_uid;
    let pid = process_of(uid).expect("a process of the jail's user");
    // The user, alone, with no capability; PID 1 of its own PID namespace.
    for field in ["Uid", "Gid"] {
        let ids: Vec<String> = status_field(pid, field)
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        assert_eq!(ids, vec![uid.to_string(); 4], "{field}");
    }
    assert_eq!(status_field(pid, "Groups"), "");
    assert_eq!(status_field(pid, "CapEff"), "0000000000000000");
    assert_eq!(status_field(pid, "CapPrm"), "0000000000000000");
    let nspid = status_field(pid, "NSpid");
    assert_eq!(nspid, format!("{pid}\t1"), "PID 1 of its namespace");
    // seccomp mode 2 (filter), two filters (clone3 -> ENOSYS, the allow-list); no_new_privs.
    assert_eq!(status_field(pid, "Seccomp"), "2");
    assert_eq!(status_field(pid, "Seccomp_filters"), "2");
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");
    // Namespaces of its own.
    for ns in ["mnt", "pid", "ipc", "uts", "net"] {
        let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap();
        let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
        assert_ne!(theirs, ours, "{ns} namespace");
    }
    // Its root is the run folder: the overlay, the vsock socket, /dev with kvm alone, and the
    // files it reads shown at their paths (here under /tmp), nothing else of the host.
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    let top = names(&root);
    let first = kernel
        .components()
        .nth(1)
        .unwrap()
        .as_os_str()
        .to_string_lossy()
        .into_owned();
    let mut expected = vec![
        "dev".to_owned(),
        "overlay.qcow2".into(),
        "vsock.sock".into(),
        first,
    ];
    expected.sort();
    assert_eq!(top, expected);
    assert_eq!(names(&root.join("dev")), ["kvm"]);
    let jailed_kernel = root.join(kernel.strip_prefix("/").unwrap());
    assert_eq!(std::fs::read(&jailed_kernel).unwrap(), spin_guest());
    let jailed_base = root.join(base.strip_prefix("/").unwrap());
    assert!(jailed_base.exists(), "the base disk in the jail");
    // No environment at all (the worker's holds its token).
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    assert!(
        environ.is_empty() || std::env::var_os("VMFARM_LOG").is_some(),
        "environment: {}",
        String::from_utf8_lossy(&environ)
    );
    // Limits, and the guest's own cgroup (v1 here: memory, cpu, pids) with its limits.
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    for (name, value) in [
        ("Max open files", "1024"),
        ("Max processes", "128"),
        ("Max core file size", "0"),
    ] {
        let line = limits.lines().find(|l| l.starts_with(name)).unwrap();
        let soft = line[name.len()..].split_whitespace().next().unwrap();
        assert_eq!(soft, value, "{line}");
    }
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let mine = format!("{parent}/worker-{}", std::process::id());
    let guest = format!("/{mine}/guest-{uid}");
    let in_guest_cgroup = cgroups.lines().filter(|l| l.ends_with(&guest)).count();
    assert!(in_guest_cgroup >= 1, "{cgroups}");
    let memory_limit = (64u64 << 20) + config.memory_overhead.0;
    let cg_root = &config.cgroup_root;
    let limit_file = [
        cg_root.join(format!("{mine}/guest-{uid}/memory.max")),
        cg_root.join(format!("memory/{mine}/guest-{uid}/memory.limit_in_bytes")),
    ]
    .into_iter()
    .find(|p| p.exists())
    .expect("the guest's memory cgroup");
    assert_eq!(
        std::fs::read_to_string(&limit_file).unwrap().trim(),
        memory_limit.to_string()
    );

    vm.kill().await.unwrap();
    drop(vm);
    assert!(
        !limit_file.exists(),
        "the guest's cgroup is removed with it"
    );
    assert!(!run_dir.exists(), "the run folder is removed with it");
    remove_test_cgroups(&config, &parent);
}

/// Removes this test process's worker cgroup and the test's parent, in each hierarchy.
fn remove_test_cgroups(config: &JailConfig, parent: &str) {
    let mine = format!("{parent}/worker-{}", std::process::id());
    for hierarchy in ["", "memory", "cpu", "pids"] {
        let _ = std::fs::remove_dir(config.cgroup_root.join(hierarchy).join(&mine));
        let _ = std::fs::remove_dir(config.cgroup_root.join(hierarchy).join(parent));
    }
}

/// A process of a guest's cgroups that the kernel kills at the cgroup's memory limit (as it
/// would kill a VMM that outgrew its guest's memory + overhead) is what the jail reports, so
/// that the job's error says why the guest went away.
#[test]
fn test_a_kill_at_the_memory_limit_is_reported() {
    if !can_jail() {
        return;
    }
    let parent = format!("vmfarm-test-oom-{}", std::process::id());
    let config = JailConfig {
        memory_overhead: ByteSize(0),
        ..test_jail_config(&parent)
    };
    let (jailer, why) = choose_jail(&config).unwrap();
    let jail = jailer.expect(&why).guest(1, 16).unwrap();
    assert_eq!(jail.memory_exhausted(), None);
    // Joins the guest's cgroups, then holds 64 MB in a shell variable.
    let join: String = jail
        .cgroups
        .iter()
        .map(|dir| format!("echo $$ > {}/cgroup.procs; ", dir.display()))
        .collect();
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "{join}x=$(head -c 64000000 /dev/zero | tr '\\0' a); echo ${{#x}}"
        ))
        .status()
        .unwrap();
    assert!(!status.success(), "{status:?}");
    let why = jail.memory_exhausted().expect("the kill is counted");
    assert!(why.contains("memory limit of 16MiB"), "{why}");
    drop(jail);
    remove_test_cgroups(&config, &parent);
}

/// A system call outside the filter kills the VMM with SIGSYS: unjailed (the filter alone) and
/// jailed (the jail's parent reports it).
#[test]
fn test_forbidden_system_call_kills_the_vmm() {
    if !can_jail() {
        return;
    }
    let (dir, kernel, _) = scratch();
    let run = |extra: &[&str]| {
        Command::new(VMFARM)
            .args([
                "vm",
                "run",
                "--memory",
                "32MiB",
                "--test-forbidden-syscall",
                "--kernel",
            ])
            .arg(&kernel)
            .args(extra)
            .env_clear()
            .output()
            .unwrap()
    };
    let out = run(&[]);
    assert_eq!(out.status.signal(), Some(libc::SIGSYS), "{out:?}");

    let jail = dir.path().join("jail");
    std::fs::create_dir(&jail).unwrap();
    let uid = (test_jail_config("").first_uid + 7).to_string();
    let out = run(&["--jail", jail.to_str().unwrap(), "--jail-uid", &uid]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(128 + libc::SIGSYS), "{stderr}");
    assert!(
        stderr
            .contains("killed by SIGSYS: it made a system call its seccomp filter does not allow"),
        "{stderr}"
    );

    // With the filter off, the same call goes through and `vm run` says so.
    let out = run(&["--seccomp", "off"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("let open(\"/\") through"), "{stderr}");
}
