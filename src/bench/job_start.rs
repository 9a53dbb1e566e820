//! `vmfarm bench job-start`: submit -> first line of the first task in the job's log, p50/p95
//! over 20 jobs (`--jobs`), for each backend usable on this host and each image (`--image`,
//! `tiny` by default), side by side; on QEMU, guests booted cold and guests restored from the
//! image's template snapshot (`[warm_start]`). In-process server and worker.

use super::farm::Farm;
use super::stats::{ms, quantile};
use anyhow::Context;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use vmfarm_server::state::AppState;
use vmfarm_worker::config::BackendChoice;
use vmfarm_worker::worker::backend_choice::{KvmHost, probe_kvm};

/// A job of `image` whose first task prints `first-line`.
fn manifest(image: &str) -> String {
    format!("image = \"{image}\"\n[[tasks]]\nname = \"hello\"\nscript = \"echo first-line\"\n")
}

pub async fn run(images_dir: PathBuf, images: &[String], jobs: usize) -> anyhow::Result<()> {
    anyhow::ensure!(jobs > 0, "--jobs 0: measure at least one job");
    let kvm = probe_kvm();
    let mut backends = vec![
        ("qemu, cold boot", BackendChoice::Qemu, Start::Cold),
        ("qemu, warm (snapshot)", BackendChoice::Qemu, Start::Warm),
    ];
    if kvm == KvmHost::Hardware {
        backends.insert(0, ("kvm (integrated VMM)", BackendChoice::Kvm, Start::Cold));
    } else {
        println!(
            "kvm (integrated VMM): not measured here — /dev/kvm is {kvm:?} (run it in the KVM lab)"
        );
    }
    println!(
        "vmfarm bench job-start: submit -> first task line, {jobs} jobs one after another, images {}",
        images.join(", ")
    );
    let mut rows = Vec::new();
    for (label, choice, start) in backends {
        for image in images {
            let mut m = measure(&images_dir, choice, start, image, jobs)
                .await
                .with_context(|| format!("backend {label}, image {image}"))?;
            let restore = match m.restores.is_empty() {
                true => "-".to_owned(),
                false => ms(quantile(&mut m.restores, 0.5)),
            };
            rows.push((
                label,
                image,
                quantile(&mut m.starts, 0.5),
                quantile(&mut m.starts, 0.95),
                restore,
                quantile(&mut m.readies, 0.5),
            ));
        }
    }
    println!(
        "{:<24} {:<12} {:>10} {:>10} {:>12} {:>26}",
        "backend", "image", "p50", "p95", "restore p50", "(re)start to SSH ready p50"
    );
    for (label, image, p50, p95, restore, ready) in rows {
        println!(
            "{:<24} {:<12} {:>10} {:>10} {:>12} {:>26}",
            label,
            image,
            ms(p50),
            ms(p95),
            restore,
            ms(ready)
        );
    }
    Ok(())
}

/// How the measured jobs' guests start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Start {
    /// Booted, with `[warm_start]` off.
    Cold,
    /// Restored from the template snapshot, made before the measured jobs by a first job.
    Warm,
}

/// Each job's submit -> first task line, its guest's restore (warm) and its boot or restore to
/// SSH ready, as its log says.
struct Measured {
    starts: Vec<Duration>,
    restores: Vec<Duration>,
    readies: Vec<Duration>,
}

/// Runs `jobs` jobs one after another on a farm of its own.
async fn measure(
    images_dir: &Path,
    choice: BackendChoice,
    start: Start,
    image: &str,
    jobs: usize,
) -> anyhow::Result<Measured> {
    let warm = start == Start::Warm;
    let farm = Farm::start(images_dir, choice, |_| {}, |w| w.warm_start.enabled = warm).await?;
    if warm {
        // The first job boots cold and has the snapshot made; it is not measured.
        let id = farm.submit(&manifest(image)).await?;
        farm.ended(id).await?;
        farm.template_made(Duration::from_secs(300)).await?;
    }
    let mut m = Measured {
        starts: Vec::with_capacity(jobs),
        restores: Vec::new(),
        readies: Vec::with_capacity(jobs),
    };
    for _ in 0..jobs {
        let started = Instant::now();
        let id = farm.submit(&manifest(image)).await?;
        m.starts
            .push(first_task_line(&farm.state, id, started).await?);
        farm.ended(id).await?;
        let ready = seconds_after(&farm.state, id, "guest ready in ").await?;
        m.readies
            .push(ready.with_context(|| format!("job {id}'s log has no ready time"))?);
        let restored = seconds_after(&farm.state, id, "template snapshot in ").await?;
        match (warm, restored) {
            (true, Some(restore)) => m.restores.push(restore),
            (true, None) => anyhow::bail!("job {id} was not restored from the snapshot"),
            (false, _) => {}
        }
    }
    Ok(m)
}

/// The seconds job `id`'s log gives after `words` (`guest ready in 1.2s`), if it does.
async fn seconds_after(state: &AppState, id: i64, words: &str) -> anyhow::Result<Option<Duration>> {
    let chunks = vmfarm_server::logs::read(&state.db, id, 0, i64::MAX).await?;
    Ok(chunks.iter().find_map(|c| {
        let rest = c.data.split(words).nth(1)?;
        let seconds: f64 = rest.split('s').next()?.parse().ok()?;
        Some(Duration::from_secs_f64(seconds))
    }))
}

/// Time from `started` until the job's log holds task output.
pub async fn first_task_line(
    state: &AppState,
    id: i64,
    started: Instant,
) -> anyhow::Result<Duration> {
    let deadline = started + Duration::from_secs(300);
    loop {
        let chunks = vmfarm_server::logs::read(&state.db, id, 0, i64::MAX).await?;
        if chunks
            .iter()
            .any(|c| c.stream == "task" && c.data.contains("first-line"))
        {
            return Ok(started.elapsed());
        }
        let (_, job_state) = vmfarm_server::logs::progress(&state.db, id).await?;
        anyhow::ensure!(
            !job_state.is_terminal() || job_state == vmfarm_proto::JobState::Succeeded,
            "job {id} ended {job_state} before its task printed"
        );
        anyhow::ensure!(
            Instant::now() < deadline,
            "job {id} printed nothing in 300 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
