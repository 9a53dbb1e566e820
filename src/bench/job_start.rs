//! `vmfarm bench job-start`: submit -> first line of the first task in the job's log, p50/p95
//! over 20 jobs (`--jobs`), for each backend usable on this host and each image (`--image`,
//! `tiny` by default), side by side. In-process server and worker.

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
    let mut backends = vec![("qemu", BackendChoice::Qemu)];
    if kvm == KvmHost::Hardware {
        backends.insert(0, ("kvm (integrated VMM)", BackendChoice::Kvm));
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
    for (label, choice) in backends {
        for image in images {
            let (mut starts, mut readies) = measure(&images_dir, choice, image, jobs)
                .await
                .with_context(|| format!("backend {label}, image {image}"))?;
            rows.push((
                label,
                image,
                quantile(&mut starts, 0.5),
                quantile(&mut starts, 0.95),
                quantile(&mut readies, 0.5),
            ));
        }
    }
    println!(
        "{:<24} {:<20} {:>12} {:>12} {:>22}",
        "backend", "image", "p50", "p95", "boot to SSH ready p50"
    );
    for (label, image, p50, p95, ready) in rows {
        println!(
            "{:<24} {:<20} {:>12} {:>12} {:>22}",
            label,
            image,
            ms(p50),
            ms(p95),
            ms(ready)
        );
    }
    Ok(())
}

/// Each job's submit -> first task line, and its guest's boot to SSH ready as its log says
/// (`guest ready in 1.2s`).
async fn measure(
    images_dir: &Path,
    choice: BackendChoice,
    image: &str,
    jobs: usize,
) -> anyhow::Result<(Vec<Duration>, Vec<Duration>)> {
    let farm = Farm::start(images_dir, choice, |_| {}, |_| {}).await?;
    let mut starts = Vec::with_capacity(jobs);
    let mut readies = Vec::with_capacity(jobs);
    for _ in 0..jobs {
        let started = Instant::now();
        let id = farm.submit(&manifest(image)).await?;
        starts.push(first_task_line(&farm.state, id, started).await?);
        farm.ended(id).await?;
        readies.push(guest_ready(&farm.state, id).await?);
    }
    Ok((starts, readies))
}

/// The boot to SSH ready of job `id`'s guest, from its log.
async fn guest_ready(state: &AppState, id: i64) -> anyhow::Result<Duration> {
    let chunks = vmfarm_server::logs::read(&state.db, id, 0, i64::MAX).await?;
    chunks
        .iter()
        .find_map(|c| {
            let rest = c.data.split("guest ready in ").nth(1)?;
            let seconds: f64 = rest.split('s').next()?.parse().ok()?;
            Some(Duration::from_secs_f64(seconds))
        })
        .with_context(|| format!("job {id}'s log does not say when its guest was ready"))
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
