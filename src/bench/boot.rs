//! `vmfarm bench boot`: process start → guest marker, and the memory the VMM uses besides guest
//! RAM, for `vmfarm vm run` and for QEMU's microvm booting the same kernel, initramfs, disk,
//! vCPUs and memory, alternating run by run; medians and the ratio. For vmfarm also the
//! breakdown: process start → vCPUs in KVM_RUN (`vm run --timings`) → first kernel line on the console →
//! marker. Lines `vmfarm-bench KEY VALUE` that the guest prints (e.g. its virtio-blk throughput)
//! are collected per VMM and set side by side too.
//!
//! It needs hardware KVM; where the host's /dev/kvm cannot boot stock kernels (PVM), run it in
//! the KVM lab: `tests/kvm-lab/lab.sh bench-boot`.

use super::rss::{Outside, outside_guest_ram};
use super::stats::quantile;
use anyhow::{Context, bail};
use clap::Args;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use vmfarm_proto::units::parse_size;
use vmfarm_worker::vmm::qcow2::header::Header;
use vmfarm_worker::vmm::timing::{monotonic_ns, parse_vcpus_start};
use vmfarm_worker::worker::backend_choice::{KvmHost, probe_kvm};

/// What the guest prints to hand the bench a figure: `vmfarm-bench KEY VALUE`.
const FIGURE_PREFIX: &str = "vmfarm-bench ";

/// How often the VMM's memory is sampled.
const RSS_EVERY: Duration = Duration::from_millis(50);

#[derive(Debug, Args)]
pub struct BootBenchArgs {
    /// The guest kernel (bzImage), the same for both VMMs.
    #[arg(long, value_name = "PATH")]
    pub kernel: PathBuf,
    /// The initramfs.
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// A disk image (raw, or qcow2) both VMMs give the guest as a virtio-blk device (/dev/vda).
    #[arg(long, value_name = "PATH")]
    pub disk: Option<PathBuf>,
    #[arg(long, default_value_t = 2)]
    pub cpus: u8,
    #[arg(long, default_value = "512MiB")]
    pub memory: String,
    /// The kernel command line, the same for both.
    #[arg(long, default_value = "console=ttyS0 reboot=k panic=-1")]
    pub cmdline: String,
    /// The console line that says the guest is up (its init ran).
    #[arg(long, default_value = "L2-INIT")]
    pub marker: String,
    /// The console line after which a run has nothing more to say; the VMM is then given 10 s
    /// to exit before it is killed. Without it a run ends when the VMM exits.
    #[arg(long)]
    pub end: Option<String>,
    /// Runs per VMM (they alternate).
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// The QEMU binary of the reference.
    #[arg(long, default_value = "qemu-system-x86_64")]
    pub qemu: PathBuf,
    /// One more QEMU argument, e.g. `--qemu-arg=-L --qemu-arg=/payload/share/qemu`.
    #[arg(long = "qemu-arg", value_name = "ARG", allow_hyphen_values = true)]
    pub qemu_args: Vec<String>,
    /// Longest a single run may take.
    #[arg(long, default_value_t = 120)]
    pub timeout_secs: u64,
    /// Also boot vmfarm jailed (`vm run --jail`, as the worker starts it; needs root) in each
    /// round, and set the jail's cost beside the unjailed VMM.
    #[arg(long)]
    pub jail: bool,
}

/// The user the jailed runs take.
const BENCH_JAIL_UID: u32 = 969_999;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Vmm {
    Vmfarm,
    VmfarmJailed,
    Qemu,
}

impl Vmm {
    fn label(self) -> &'static str {
        match self {
            Vmm::Vmfarm => "vmfarm",
            Vmm::VmfarmJailed => "vmfarm jailed",
            Vmm::Qemu => "qemu microvm",
        }
    }
}

/// What one boot showed, times from the moment before the process was spawned.
#[derive(Debug, Default)]
struct Sample {
    vcpus_start: Option<Duration>,
    /// The first line the guest kernel printed (`[    0.000000] ...`): QEMU's firmware and the
    /// bzImage's real-mode setup print lines of their own before it.
    first_kernel_line: Option<Duration>,
    /// How the VMM ended ("killed" when it was, after its grace time).
    status: String,
    marker: Option<Duration>,
    exit: Option<Duration>,
    /// The most resident memory outside guest RAM seen (sampled every 50 ms).
    outside: Option<Outside>,
    /// Jailed runs: the most memory the jail's waiting process (the parent of the VMM) holds
    /// alone, in KiB: its private pages. The pages it shares with the VMM (copy-on-write since
    /// the fork, and the binary) are counted once, in the VMM's figure.
    jailer_private_kib: Option<u64>,
    figures: BTreeMap<String, f64>,
}

pub fn run(args: &BootBenchArgs) -> anyhow::Result<()> {
    if args.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let memory = parse_size(&args.memory)
        .map_err(|e| anyhow::anyhow!("--memory {:?}: {e}", args.memory))?
        .0;
    match probe_kvm() {
        KvmHost::Hardware => {}
        other => bail!(
            "this host's /dev/kvm is {other:?}, which cannot boot stock kernels; run the benchmark in the \
             KVM lab: tests/kvm-lab/lab.sh bench-boot"
        ),
    }
    for path in [Some(&args.kernel), args.initrd.as_ref(), args.disk.as_ref()]
        .into_iter()
        .flatten()
    {
        std::fs::metadata(path).with_context(|| format!("{}", path.display()))?;
    }
    let vmfarm = std::env::current_exe().context("finding the vmfarm binary")?;
    println!(
        "vmfarm bench boot: {} vCPUs, {} MiB, kernel {}, initrd {}, disk {}; {} runs each, alternating",
        args.cpus,
        memory >> 20,
        args.kernel.display(),
        args.initrd
            .as_ref()
            .map_or("none".into(), |p| p.display().to_string()),
        args.disk
            .as_ref()
            .map_or("none".into(), |p| p.display().to_string()),
        args.runs
    );
    let mut samples: BTreeMap<&str, Vec<Sample>> = BTreeMap::new();
    let mut failed: BTreeMap<&str, usize> = BTreeMap::new();
    let vmms: &[Vmm] = if args.jail {
        &[Vmm::Vmfarm, Vmm::VmfarmJailed, Vmm::Qemu]
    } else {
        &[Vmm::Vmfarm, Vmm::Qemu]
    };
    for i in 1..=args.runs {
        for &vmm in vmms {
            // A jailed run's folder: its root, where its writable disk must be.
            let jail = (vmm == Vmm::VmfarmJailed)
                .then(|| JailDir::new(&args.kernel))
                .transpose()?;
            // Each run gets the disk as it was at the start: a run after another must not find
            // its clusters (qcow2) or its pages (a sparse file) already allocated.
            let disk = args
                .disk
                .as_deref()
                .map(|d| FreshCopy::of(d, jail.as_ref().map(|j| j.0.as_path())))
                .transpose()?;
            let disk_path = disk.as_ref().map(|d| d.0.as_path());
            let command = match vmm {
                Vmm::Vmfarm => vmfarm_command(&vmfarm, args, disk_path, memory),
                Vmm::VmfarmJailed => {
                    let mut command = vmfarm_command(&vmfarm, args, disk_path, memory);
                    let dir = jail
                        .as_ref()
                        .map(|j| j.0.as_path())
                        .unwrap_or(Path::new("."));
                    command
                        .arg("--jail")
                        .arg(dir)
                        .args(["--jail-uid", &BENCH_JAIL_UID.to_string()])
                        .env_clear()
                        .env("VMFARM_LOG", "warn");
                    command
                }
                Vmm::Qemu => qemu_command(args, disk_path, memory),
            };
            // A failed boot is reported and left out of the medians; the others still count.
            match boot_once(command, vmm, args, memory) {
                Ok(sample) => {
                    println!("run {i} {:<13} {}", vmm.label(), describe(&sample));
                    samples.entry(vmm.label()).or_default().push(sample);
                }
                Err(e) => {
                    println!("run {i} {:<13} FAILED: {e:#}", vmm.label());
                    *failed.entry(vmm.label()).or_default() += 1;
                }
            }
        }
    }
    let runs = |vmm: Vmm| samples.get(vmm.label()).map_or(&[][..], Vec::as_slice);
    report(runs(Vmm::Vmfarm), runs(Vmm::Qemu));
    if args.jail {
        report_jail(runs(Vmm::Vmfarm), runs(Vmm::VmfarmJailed));
    }
    if !failed.is_empty() {
        bail!("failed runs (left out of the medians): {failed:?}");
    }
    Ok(())
}

/// A jailed run's folder, beside the kernel; removed on drop.
struct JailDir(PathBuf);

impl JailDir {
    fn new(kernel: &Path) -> anyhow::Result<JailDir> {
        let dir = kernel.with_file_name("bench-jail");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).with_context(|| format!("making {}", dir.display()))?;
        Ok(JailDir(dir))
    }
}

impl Drop for JailDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A copy of the benchmark's disk beside it (or in `dir`), removed on drop.
struct FreshCopy(PathBuf);

impl FreshCopy {
    fn of(disk: &Path, dir: Option<&Path>) -> anyhow::Result<FreshCopy> {
        let mut name = disk.file_name().unwrap_or_default().to_owned();
        name.push(".bench-run");
        let copy = match dir {
            Some(dir) => dir.join(name),
            None => disk.with_file_name(name),
        };
        std::fs::copy(disk, &copy)
            .with_context(|| format!("copying {} for a run", disk.display()))?;
        Ok(FreshCopy(copy))
    }
}

impl Drop for FreshCopy {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn vmfarm_command(
    vmfarm: &Path,
    args: &BootBenchArgs,
    disk: Option<&Path>,
    memory: u64,
) -> Command {
    let mut command = Command::new(vmfarm);
    command
        .args(["vm", "run", "--timings", "--kernel"])
        .arg(&args.kernel);
    if let Some(initrd) = &args.initrd {
        command.arg("--initrd").arg(initrd);
    }
    if let Some(disk) = disk {
        command.arg("--disk").arg(disk);
    }
    command
        .args(["--cpus", &args.cpus.to_string()])
        .args(["--memory", &format!("{}MiB", memory >> 20)])
        .args(["--cmdline", &args.cmdline])
        .env("VMFARM_LOG", "warn");
    command
}

/// QEMU's microvm with the same devices: 16550 console, virtio-mmio blk and rng (found by the
/// guest through ACPI, as with vmfarm), in-kernel irqchip; no firmware menus, no network.
fn qemu_command(args: &BootBenchArgs, disk: Option<&Path>, memory: u64) -> Command {
    let mut command = Command::new(&args.qemu);
    command
        .args(&args.qemu_args)
        .args(["-M", "microvm", "-accel", "kvm", "-cpu", "host"])
        .args(["-smp", &args.cpus.to_string()])
        .args(["-m", &format!("{}M", memory >> 20)])
        .args(["-nodefaults", "-no-user-config", "-display", "none"])
        .args(["-serial", "stdio", "-no-reboot"])
        .arg("-kernel")
        .arg(&args.kernel)
        .args(["-append", &args.cmdline])
        .args(["-object", "rng-random,id=rng0,filename=/dev/urandom"])
        .args(["-device", "virtio-rng-device,rng=rng0"]);
    if let Some(initrd) = &args.initrd {
        command.arg("-initrd").arg(initrd);
    }
    if let Some(disk) = disk {
        command
            .arg("-drive")
            .arg(format!(
                "id=disk0,if=none,format={},file={}",
                disk_format(disk),
                disk.display()
            ))
            .args(["-device", "virtio-blk-device,drive=disk0"]);
    }
    command
}

/// `qcow2` or `raw`, as QEMU is to read the disk (vmfarm finds out by itself).
fn disk_format(disk: &Path) -> &'static str {
    let header = std::fs::File::open(disk).map(|file| Header::read(&file));
    if matches!(header, Ok(Ok(Some(_)))) {
        "qcow2"
    } else {
        "raw"
    }
}

/// One console line and when it arrived.
type Line = (Instant, String);

fn boot_once(
    mut command: Command,
    vmm: Vmm,
    args: &BootBenchArgs,
    memory: u64,
) -> anyhow::Result<Sample> {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let spawned_mono = monotonic_ns();
    let spawned = Instant::now();
    let mut child = command
        .spawn()
        .with_context(|| format!("starting {:?}", command.get_program()))?;
    let lines = read_lines(child.stdout.take().expect("stdout is piped"));
    let stderr = collect(child.stderr.take().expect("stderr is piped"));
    let deadline = spawned + Duration::from_secs(args.timeout_secs);
    let mut sample = Sample::default();
    let mut console = Vec::new();
    let mut ended = false;
    let mut sampled = spawned;
    while !ended {
        if sampled.elapsed() >= RSS_EVERY {
            sampled = Instant::now();
            // Jailed, the VMM is the child of the process spawned, which only waits.
            let vmm_pid = match vmm {
                Vmm::VmfarmJailed => {
                    if let Some(private) = private_kib(child.id()) {
                        let most = sample.jailer_private_kib.unwrap_or_default().max(private);
                        sample.jailer_private_kib = Some(most);
                    }
                    first_child(child.id())
                }
                _ => Some(child.id()),
            };
            if let Some(Ok(now)) = vmm_pid.map(|pid| outside_guest_ram(pid, memory)) {
                sample.outside = Some(sample.outside.unwrap_or_default().max(now));
            }
        }
        let (at, line) = match lines.recv_timeout(RSS_EVERY) {
            Ok(line) => line,
            Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() < deadline => continue,
            // The VMM closed its console (it exited), or the run is over time.
            Err(_) => break,
        };
        let since = at - spawned;
        if line.starts_with('[') {
            sample.first_kernel_line.get_or_insert(since);
        }
        if sample.marker.is_none() && line.contains(&args.marker) {
            sample.marker = Some(since);
        }
        if let Some(figure) = line.trim().strip_prefix(FIGURE_PREFIX)
            && let Some((key, value)) = figure.split_once(' ')
            && let Ok(value) = value.trim().parse::<f64>()
        {
            sample.figures.insert(key.to_owned(), value);
        }
        ended = args.end.as_ref().is_some_and(|end| line.contains(end));
        console.push(line);
    }
    let grace = if ended {
        Duration::from_secs(10)
    } else {
        deadline.saturating_duration_since(Instant::now())
    };
    let (exit, status) = wait_exit(&mut child, spawned, grace)?;
    sample.exit = exit;
    sample.status = status;
    let stderr = stderr.join().unwrap_or_default();
    if vmm != Vmm::Qemu {
        sample.vcpus_start = stderr
            .lines()
            .find_map(parse_vcpus_start)
            .map(|at| Duration::from_nanos(at.saturating_sub(spawned_mono)));
    }
    let missing = if sample.marker.is_none() {
        Some(format!("the marker {:?}", args.marker))
    } else {
        args.end
            .as_ref()
            .filter(|_| !ended)
            .map(|end| format!("the end line {end:?}"))
    };
    if let Some(missing) = missing {
        bail!(
            "the guest never printed {missing} ({} after {:.1} s).\n--- console (last 30 lines) ---\n{}\n--- stderr ---\n{}",
            sample.status,
            spawned.elapsed().as_secs_f64(),
            console[console.len().saturating_sub(30)..].join("\n"),
            stderr.trim_end()
        );
    }
    Ok(sample)
}

/// The first child of process `pid`.
fn first_child(pid: u32) -> Option<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The memory process `pid` holds alone (private clean and dirty pages), in KiB.
fn private_kib(pid: u32) -> Option<u64> {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let field = |name: &str| -> Option<u64> {
        rollup
            .lines()
            .find_map(|l| l.strip_prefix(name))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()
    };
    Some(field("Private_Clean:")? + field("Private_Dirty:")?)
}

/// Lines of `out` with the moment each arrived, on a channel that closes at EOF.
fn read_lines(out: impl Read + Send + 'static) -> mpsc::Receiver<Line> {
    let (send, receive) = mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(out);
        let mut buf = Vec::new();
        while matches!(reader.read_until(b'\n', &mut buf), Ok(n) if n > 0) {
            let line = String::from_utf8_lossy(&buf).trim_end().to_owned();
            if send.send((Instant::now(), line)).is_err() {
                break;
            }
            buf.clear();
        }
    });
    receive
}

fn collect(mut err: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut text = Vec::new();
        let _ = err.read_to_end(&mut text);
        String::from_utf8_lossy(&text).into_owned()
    })
}

/// Waits up to `grace` for the VMM to exit, and kills it after that: when it exited (if it did
/// on its own), and how it ended.
fn wait_exit(
    child: &mut Child,
    spawned: Instant,
    grace: Duration,
) -> anyhow::Result<(Option<Duration>, String)> {
    let until = Instant::now() + grace;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok((Some(spawned.elapsed()), status.to_string()));
        }
        if Instant::now() >= until {
            let _ = child.kill();
            child.wait()?;
            return Ok((None, "killed".into()));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn secs(d: Option<Duration>) -> String {
    d.map_or("-".into(), |d| format!("{:.3} s", d.as_secs_f64()))
}

fn describe(s: &Sample) -> String {
    let mut text = format!(
        "vCPUs start {}, first kernel line {}, marker {}, exit {} ({})",
        s.vcpus_start
            .map_or("-".into(), |d| format!("{:.1} ms", d.as_secs_f64() * 1e3)),
        secs(s.first_kernel_line),
        secs(s.marker),
        secs(s.exit),
        s.status,
    );
    if let Some(o) = s.outside {
        text += &format!(
            ", RSS outside guest RAM {:.1} MiB ({:.1} MiB anonymous)",
            o.rss_kib as f64 / 1024.0,
            o.anon_kib as f64 / 1024.0
        );
    }
    if let Some(kib) = s.jailer_private_kib {
        text += &format!(
            ", jail's waiting process {:.1} MiB of its own",
            kib as f64 / 1024.0
        );
    }
    for (key, value) in &s.figures {
        text += &format!(", {key} {value}");
    }
    text
}

/// One of a run's times.
type Pick = fn(&Sample) -> Option<Duration>;

/// The median of the durations `pick` finds, if any run had one.
fn median_of(samples: &[Sample], pick: impl Fn(&Sample) -> Option<Duration>) -> Option<Duration> {
    let mut all: Vec<Duration> = samples.iter().filter_map(pick).collect();
    (!all.is_empty()).then(|| quantile(&mut all, 0.5))
}

fn median_f64(samples: &[Sample], pick: impl Fn(&Sample) -> Option<f64>) -> Option<f64> {
    let mut all: Vec<f64> = samples.iter().filter_map(pick).collect();
    if all.is_empty() {
        return None;
    }
    all.sort_by(f64::total_cmp);
    Some(all[all.len() / 2])
}

/// The boot's moments that both VMMs report, as the tables show them.
const BOOT_TIMES: [(&str, Pick); 3] = [
    ("start -> first kernel line", |x| x.first_kernel_line),
    ("start -> marker", |x| x.marker),
    ("start -> exit", |x| x.exit),
];

/// A table's row: what, the two figures, their unit.
type Row<'r> = &'r dyn Fn(&str, Option<f64>, Option<f64>, &str);

/// The VMM's memory outside guest RAM, runs `a` beside runs `b`, in a table's `row`.
fn memory_rows(row: Row, a: &[Sample], b: &[Sample]) {
    let mib = |kib: u64| kib as f64 / 1024.0;
    row(
        "peak RSS outside guest RAM",
        median_f64(a, |x| x.outside.map(|o| mib(o.rss_kib))),
        median_f64(b, |x| x.outside.map(|o| mib(o.rss_kib))),
        "MiB",
    );
    row(
        "  of which anonymous",
        median_f64(a, |x| x.outside.map(|o| mib(o.anon_kib))),
        median_f64(b, |x| x.outside.map(|o| mib(o.anon_kib))),
        "MiB",
    );
}

fn report(vmfarm: &[Sample], qemu: &[Sample]) {
    println!();
    println!(
        "medians ({} + {} runs)            {:>14} {:>14} {:>8}",
        vmfarm.len(),
        qemu.len(),
        "vmfarm",
        "qemu microvm",
        "ratio"
    );
    let row = |what: &str, a: Option<f64>, b: Option<f64>, unit: &str| {
        let cell = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.3} {unit}"));
        let ratio = match (a, b) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
            _ => "-".into(),
        };
        println!("{what:<32} {:>14} {:>14} {ratio:>8}", cell(a), cell(b));
    };
    row(
        "start -> vCPUs in KVM_RUN",
        median_of(vmfarm, |x| x.vcpus_start).map(|d| d.as_secs_f64() * 1e3),
        None,
        "ms",
    );
    for (what, pick) in BOOT_TIMES {
        let secs = |runs: &[Sample]| median_of(runs, pick).map(|d| d.as_secs_f64());
        row(what, secs(vmfarm), secs(qemu), "s");
    }
    memory_rows(&row, vmfarm, qemu);
    let keys: std::collections::BTreeSet<&String> = vmfarm
        .iter()
        .chain(qemu)
        .flat_map(|x| x.figures.keys())
        .collect();
    for key in keys {
        row(
            &format!("guest: {key}"),
            median_f64(vmfarm, |x| x.figures.get(key).copied()),
            median_f64(qemu, |x| x.figures.get(key).copied()),
            "",
        );
    }
}

/// The jail's cost: the jailed VMM beside the unjailed one of the same rounds.
fn report_jail(plain: &[Sample], jailed: &[Sample]) {
    println!();
    println!(
        "the jail's cost ({} + {} runs)     {:>14} {:>14} {:>10}",
        plain.len(),
        jailed.len(),
        "vmfarm",
        "jailed",
        "jailed - vmfarm"
    );
    let row = |what: &str, a: Option<f64>, b: Option<f64>, unit: &str| {
        let cell = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.3} {unit}"));
        let diff = match (a, b) {
            (Some(a), Some(b)) => format!("{:+.3} {unit}", b - a),
            _ => "-".into(),
        };
        println!("{what:<32} {:>14} {:>14} {diff:>10}", cell(a), cell(b));
    };
    let ms = |runs: &[Sample], pick: Pick| median_of(runs, pick).map(|d| d.as_secs_f64() * 1e3);
    let vcpus: (&str, Pick) = ("start -> vCPUs in KVM_RUN", |x| x.vcpus_start);
    for (what, pick) in std::iter::once(vcpus).chain(BOOT_TIMES) {
        row(what, ms(plain, pick), ms(jailed, pick), "ms");
    }
    memory_rows(&row, plain, jailed);
    row(
        "jail's waiting process, private",
        Some(0.0),
        median_f64(jailed, |x| {
            x.jailer_private_kib.map(|kib| kib as f64 / 1024.0)
        }),
        "MiB",
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(marker_ms: u64, figure: f64) -> Sample {
        Sample {
            marker: Some(Duration::from_millis(marker_ms)),
            figures: BTreeMap::from([("blk".to_owned(), figure)]),
            ..Sample::default()
        }
    }

    #[test]
    fn test_medians_skip_runs_without_the_figure() {
        let runs = [
            sample(300, 5.0),
            sample(100, 1.0),
            sample(200, 3.0),
            Sample::default(),
        ];
        assert_eq!(
            median_of(&runs, |s| s.marker),
            Some(Duration::from_millis(200))
        );
        assert_eq!(
            median_f64(&runs, |s| s.figures.get("blk").copied()),
            Some(3.0)
        );
        assert_eq!(median_of(&runs, |s| s.exit), None);
    }

    #[test]
    fn test_both_vmms_get_the_same_guest() {
        let args = BootBenchArgs {
            kernel: "/k".into(),
            initrd: Some("/i".into()),
            disk: Some("/d.img".into()),
            cpus: 2,
            memory: "512MiB".into(),
            cmdline: "console=ttyS0 quiet".into(),
            marker: "UP".into(),
            end: None,
            runs: 1,
            qemu: "qemu-system-x86_64".into(),
            qemu_args: vec!["-L".into(), "/fw".into()],
            timeout_secs: 10,
            jail: false,
        };
        let words = |c: &Command| {
            c.get_args()
                .map(|a| a.to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        };
        let disk = Some(Path::new("/d.img"));
        let ours = words(&vmfarm_command("/vmfarm".as_ref(), &args, disk, 512 << 20));
        let theirs = words(&qemu_command(&args, disk, 512 << 20));
        for part in [
            "--kernel /k",
            "--initrd /i",
            "--disk /d.img",
            "--cpus 2",
            "--memory 512MiB",
        ] {
            assert!(ours.contains(part), "{part} in {ours}");
        }
        for part in [
            "-L /fw",
            "-kernel /k",
            "-initrd /i",
            "format=raw,file=/d.img",
            "-smp 2",
            "-m 512M",
            "-append console=ttyS0 quiet",
        ] {
            assert!(theirs.contains(part), "{part} in {theirs}");
        }
    }
}
