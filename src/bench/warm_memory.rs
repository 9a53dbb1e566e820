//! `vmfarm bench warm-memory`: N guests of one image (16 `tiny` ones by default) at once on the
//! QEMU backend, booted cold and then restored from one template snapshot; with every guest
//! ready and having answered a command over SSH, each QEMU's RSS and PSS (`smaps_rollup`) and
//! the host's MemAvailable drop, side by side.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use vmfarm_worker::backend::qemu::{Accel, QemuBackend};
use vmfarm_worker::backend::{Backend, BootSpec, SealedMemory, Snapshot, Vm};
use vmfarm_worker::guest::{ExecLimits, Guest, JobKey, SshOptions, Start, identity, introduce};
use vmfarm_worker::images::manifest::InstalledImage;
use vmfarm_worker::worker::backend_choice::{KvmHost, probe_kvm};

const READY_LIMIT: Duration = Duration::from_secs(600);

pub async fn run(
    images_dir: PathBuf,
    image: &str,
    guests: usize,
    memory_mib: u32,
) -> anyhow::Result<()> {
    anyhow::ensure!(guests > 0, "--guests 0: measure at least one guest");
    let image = vmfarm_worker::images::manifest::current(&images_dir)?
        .remove(image)
        .with_context(|| format!("no image {image} in {}", images_dir.display()))?;
    anyhow::ensure!(
        image.firmware().is_none(),
        "{} boots by firmware: only the agent's images are snapshotted",
        image.manifest.name
    );
    let accel = match probe_kvm() {
        KvmHost::Hardware => Accel::Kvm,
        KvmHost::Pvm | KvmHost::Absent => Accel::Tcg,
    };
    let backend = QemuBackend::new(accel);
    let scratch = tempfile::tempdir()?;
    println!(
        "vmfarm bench warm-memory: {guests} guests of {} ({memory_mib} MiB each) at once, QEMU {accel:?}",
        image.manifest.name
    );
    let cold = measure(&backend, &image, scratch.path(), None, guests, memory_mib).await?;
    let snapshot = Snapshot {
        dir: scratch.path().join("template"),
    };
    let template = spec(
        &image,
        &backend,
        &scratch.path().join("template-run"),
        memory_mib,
    );
    let saving = Instant::now();
    backend.save(&template, &snapshot, READY_LIMIT).await?;
    println!(
        "template snapshot saved in {:.2} s",
        saving.elapsed().as_secs_f64()
    );
    let memory = SealedMemory::load(&snapshot.memory())?;
    let from = Some((&snapshot, &memory));
    let warm = measure(&backend, &image, scratch.path(), from, guests, memory_mib).await?;
    println!(
        "{:<30} {:>12} {:>14} {:>14} {:>14} {:>16}",
        "guests", "all ready", "RSS per guest", "PSS per guest", "PSS, all", "host memory used"
    );
    for (label, m) in [
        ("booted cold (reference)", cold),
        ("restored from one snapshot", warm),
    ] {
        println!(
            "{:<30} {:>10.1} s {:>10.1} MiB {:>10.1} MiB {:>10.1} MiB {:>12.1} MiB",
            label,
            m.ready.as_secs_f64(),
            m.rss_kib as f64 / 1024.0 / guests as f64,
            m.pss_kib as f64 / 1024.0 / guests as f64,
            m.pss_kib as f64 / 1024.0,
            m.host_used_kib as f64 / 1024.0,
        );
    }
    Ok(())
}

fn spec(
    image: &InstalledImage,
    backend: &QemuBackend,
    run_dir: &Path,
    memory_mib: u32,
) -> BootSpec {
    BootSpec::with_agent(image, backend, (1, memory_mib), run_dir.to_owned())
}

struct Measured {
    /// From the first start to the last guest's answer.
    ready: Duration,
    rss_kib: u64,
    pss_kib: u64,
    /// MemAvailable before the guests, less MemAvailable with all of them up.
    host_used_kib: u64,
}

/// Starts `guests` guests at once (restored from `from`, or booted), introduces each, runs a
/// command in each over SSH, then reads their memory and the host's.
async fn measure(
    backend: &QemuBackend,
    image: &InstalledImage,
    scratch: &Path,
    from: Option<(&Snapshot, &SealedMemory)>,
    guests: usize,
    memory_mib: u32,
) -> anyhow::Result<Measured> {
    let before = mem_available_kib()?;
    let kind = if from.is_some() { "warm" } else { "cold" };
    let started = Instant::now();
    let mut starting = Vec::new();
    for i in 0..guests {
        let spec = spec(
            image,
            backend,
            &scratch.join(format!("{kind}-{i}")),
            memory_mib,
        );
        starting.push(async move {
            let mut vm = match from {
                Some((snapshot, memory)) => backend.restore(&spec, snapshot, memory).await?,
                None => backend.boot(&spec).await?,
            };
            let start = if from.is_some() {
                Start::Restored
            } else {
                Start::Cold
            };
            let guest = answer(vm.as_mut(), start, i).await?;
            Ok::<_, anyhow::Error>((vm, guest))
        });
    }
    let up = futures_util::future::try_join_all(starting).await?;
    let ready = started.elapsed();
    let (mut rss_kib, mut pss_kib) = (0, 0);
    for pid in qemu_pids(scratch, kind)? {
        let (rss, pss) = rollup(pid)?;
        rss_kib += rss;
        pss_kib += pss;
    }
    let host_used_kib = before.saturating_sub(mem_available_kib()?);
    for (mut vm, guest) in up {
        drop(guest);
        let _ = vm.kill().await;
    }
    Ok(Measured {
        ready,
        rss_kib,
        pss_kib,
        host_used_kib,
    })
}

/// Sends guest `i` its identity and has it answer a command over SSH.
async fn answer(vm: &mut dyn Vm, start: Start, i: usize) -> anyhow::Result<Guest> {
    let key = JobKey::generate()?;
    let mut console = vm.take_console().context("the guest's console")?;
    let identity = identity(&key, &format!("guest-{i}"), Vec::new())?;
    let fingerprint =
        introduce(vm, &mut console, &mut |_| {}, READY_LIMIT, &identity, start).await?;
    tokio::spawn(async move {
        use tokio::io::AsyncReadExt as _;
        let mut buf = vec![0u8; 4096];
        while matches!(console.read(&mut buf).await, Ok(n) if n > 0) {}
    });
    let stream = vm.connect().await?;
    let guest = Guest::ssh(stream, &key, &fingerprint, &SshOptions::default()).await?;
    let out = guest
        .exec_collect("hostname", ExecLimits::timeout(Duration::from_secs(60)))
        .await?;
    anyhow::ensure!(
        out.exit_status == 0 && String::from_utf8_lossy(&out.stdout).trim() == format!("guest-{i}"),
        "guest {i} did not answer"
    );
    Ok(guest)
}

/// The QEMU processes whose command line names a guest folder `<scratch>/<kind>-N`.
fn qemu_pids(scratch: &Path, kind: &str) -> anyhow::Result<Vec<u32>> {
    let needle = scratch.join(format!("{kind}-")).display().to_string();
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc")?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline);
        if cmdline.starts_with("qemu-system") && cmdline.contains(&needle) {
            pids.push(pid);
        }
    }
    Ok(pids)
}

/// A process's RSS and PSS in KiB.
fn rollup(pid: u32) -> anyhow::Result<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))?;
    Ok((field_kib(&text, "Rss:")?, field_kib(&text, "Pss:")?))
}

fn mem_available_kib() -> anyhow::Result<u64> {
    field_kib(&std::fs::read_to_string("/proc/meminfo")?, "MemAvailable:")
}

/// The KiB of the line starting with `name` (`Rss:   1234 kB`).
fn field_kib(text: &str, name: &str) -> anyhow::Result<u64> {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(name)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .with_context(|| format!("no {name} line"))
}
