//! `vmfarm bench disk`: on this host, the throughput of the engines `vmfarm vm run` serves a
//! guest's disk with — a raw file, and a qcow2 overlay over a qcow2 base as a job's disk is —
//! beside `qemu-img bench` (QEMU's block layer) on identical fresh images in the same run, and
//! for the overlay, qcow2-rs serving the whole chain (what vmfarm's own engine replaced).
//! Sequential passes in guest-sized requests, one at a time, through the page cache.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use vmfarm_worker::vmm::qcow2::overlay::create_overlay;
use vmfarm_worker::vmm::virtio::block::throughput::{Engine, Passes, engine_name, measure};

#[derive(Debug, clap::Args)]
pub struct DiskBenchArgs {
    /// MiB written, read and rewritten per pass.
    #[arg(long, default_value_t = 256)]
    pub mib: u64,
    /// Request size in KiB.
    #[arg(long, default_value_t = 256)]
    pub request_kib: u64,
    /// Runs of each engine (they alternate); medians are reported.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Where the images go: its filesystem is part of what is measured (default: the temp dir).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// The qemu-img of the reference.
    #[arg(long, default_value = "qemu-img")]
    pub qemu_img: String,
}

/// Picks one pass's time.
type Pick = fn(&Passes) -> Duration;

const PASSES: [(&str, Pick); 3] = [
    ("first write", |p| p.first_write),
    ("read", |p| p.read),
    ("rewrite", |p| p.rewrite),
];

#[derive(Clone, Copy)]
enum Kind {
    Raw,
    Overlay,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Raw => "raw file",
            Kind::Overlay => "qcow2 overlay over a qcow2 base",
        }
    }

    fn format(self) -> &'static str {
        match self {
            Kind::Raw => "raw",
            Kind::Overlay => "qcow2",
        }
    }
}

pub fn run(args: &DiskBenchArgs) -> anyhow::Result<()> {
    if args.mib == 0 || args.request_kib == 0 || args.runs == 0 {
        bail!("--mib, --request-kib and --runs must be at least 1");
    }
    let total = args.mib << 20;
    let request = args.request_kib << 10;
    if !total.is_multiple_of(request) {
        bail!("--mib must be a whole number of --request-kib requests");
    }
    let parent = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    let dir = tempfile::tempdir_in(&parent)
        .with_context(|| format!("making a scratch dir in {}", parent.display()))?;
    println!(
        "vmfarm bench disk: {} MiB per pass in {} KiB requests, one at a time, through the page cache, in {}; {} runs each, alternating; medians",
        args.mib,
        args.request_kib,
        parent.display(),
        args.runs
    );
    for kind in [Kind::Raw, Kind::Overlay] {
        let mut ours = Vec::new();
        let mut qcow2_rs = Vec::new();
        let mut reference = Vec::new();
        let mut engine = "";
        for run in 0..args.runs {
            let image = fresh_image(kind, dir.path(), total, run, &args.qemu_img)?;
            engine = engine_name(&image)?;
            ours.push(measure(&image, total, request as usize, Engine::AsVm)?);
            if matches!(kind, Kind::Overlay) {
                let image = fresh_image(kind, dir.path(), total, run, &args.qemu_img)?;
                qcow2_rs.push(measure(&image, total, request as usize, Engine::Qcow2Rs)?);
            }
            let image = fresh_image(kind, dir.path(), total, run, &args.qemu_img)?;
            reference.push(qemu_img_passes(
                &args.qemu_img,
                kind,
                &image,
                total,
                request,
            )?);
        }
        println!("\n{} (vmfarm: {engine})", kind.label());
        println!(
            "  {:<14} {:>14} {:>16} {:>20} {:>7}",
            "pass", "vmfarm", "qcow2-rs alone", "qemu-img bench", "ratio"
        );
        for (name, pick) in PASSES {
            let a = median_rate(&ours, pick, total);
            let b = median_rate(&reference, pick, total);
            let alone = if qcow2_rs.is_empty() {
                "-".to_owned()
            } else {
                format!("{:.0} MiB/s", median_rate(&qcow2_rs, pick, total))
            };
            println!(
                "  {name:<14} {:>9.0} MiB/s {alone:>16} {:>15.0} MiB/s {:>7.2}",
                a,
                b,
                a / b.max(f64::EPSILON)
            );
        }
    }
    Ok(())
}

/// A new image of `kind` with `size` bytes of disk, nothing written to it yet.
fn fresh_image(
    kind: Kind,
    dir: &Path,
    size: u64,
    run: usize,
    qemu_img: &str,
) -> anyhow::Result<PathBuf> {
    for leftover in std::fs::read_dir(dir)? {
        std::fs::remove_file(leftover?.path())?;
    }
    let image = dir.join(format!("disk-{run}.{}", kind.format()));
    match kind {
        Kind::Raw => std::fs::File::create(&image)?.set_len(size)?,
        Kind::Overlay => {
            let base = dir.join("base.qcow2");
            let out = Command::new(qemu_img)
                .args(["create", "-q", "-f", "qcow2"])
                .arg(&base)
                .arg(size.to_string())
                .output()
                .with_context(|| format!("running {qemu_img}"))?;
            if !out.status.success() {
                bail!(
                    "{qemu_img} create failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            create_overlay(&base, &image)?;
        }
    }
    Ok(image)
}

/// The same three passes by `qemu-img bench`, which reports each one's time.
fn qemu_img_passes(
    qemu_img: &str,
    kind: Kind,
    image: &Path,
    total: u64,
    request: u64,
) -> anyhow::Result<Passes> {
    let pass = |write: bool| -> anyhow::Result<Duration> {
        let mut cmd = Command::new(qemu_img);
        cmd.arg("bench");
        if write {
            cmd.arg("-w");
        }
        let out = cmd
            .args(["-c", &(total / request).to_string()])
            .args(["-s", &request.to_string()])
            .args(["-d", "1", "-t", "writeback", "-f", kind.format()])
            .arg(image)
            .output()
            .with_context(|| format!("running {qemu_img} bench"))?;
        let text = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            bail!(
                "{qemu_img} bench failed: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        parse_completed(&text)
            .with_context(|| format!("no \"Run completed in N seconds\" in: {text}"))
    };
    Ok(Passes {
        first_write: pass(true)?,
        read: pass(false)?,
        rewrite: pass(true)?,
    })
}

/// The time in `qemu-img bench`'s "Run completed in 0.123 seconds." line.
fn parse_completed(output: &str) -> Option<Duration> {
    output.lines().find_map(|line| {
        let secs = line
            .trim()
            .strip_prefix("Run completed in ")?
            .strip_suffix(" seconds.")?;
        Duration::try_from_secs_f64(secs.parse().ok()?).ok()
    })
}

/// The median rate in MiB/s of `total` bytes in the durations `pick` takes from `runs`.
fn median_rate(runs: &[Passes], pick: Pick, total: u64) -> f64 {
    let mut rates: Vec<f64> = runs
        .iter()
        .map(|p| (total >> 20) as f64 / pick(p).as_secs_f64().max(1e-9))
        .collect();
    rates.sort_by(f64::total_cmp);
    rates[rates.len() / 2]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_reads_qemu_img_bench_output() {
        let out = "Sending 128 write requests, 262144 bytes each, 1 in parallel (starting at offset 0, step size 262144)\nRun completed in 0.016 seconds.\n";
        assert_eq!(parse_completed(out), Some(Duration::from_millis(16)));
        assert_eq!(parse_completed("Run completed in soon seconds."), None);
        assert_eq!(parse_completed(""), None);
    }
}
