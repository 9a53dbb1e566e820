//! `vmfarm bench cache-build`: a real build's install step (a venv and a few packages from PyPI
//! through the job's proxy) with a cache disk holding pip's cache and the venv, beside the same
//! step without one, in the same run and on the same warm proxy cache. The qemu backend.

use super::farm::Farm;
use super::network::{allowed_private, whole_log};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use vmfarm_worker::config::BackendChoice;

/// The line the install task prints with its seconds.
const LINE: &str = "bench-install-seconds";
const REGISTRIES: [&str; 3] = ["deb.debian.org", "pypi.org", "files.pythonhosted.org"];

/// The build's manifest on `image`, with the cache disk or without.
fn manifest(image: &str, cache: bool) -> String {
    let cache = if cache {
        "[[caches]]\nname = \"pip\"\npaths = [\"~/.cache/pip\", \"venv\"]\nsize = \"1GiB\"\n"
    } else {
        ""
    };
    format!(
        "image = \"{image}\"\ntimeout = \"30m\"\npackages = [\"python3-venv\"]\n\
         [network]\nallow = [\"pypi.org\", \"files.pythonhosted.org\"]\n{cache}\
         [[tasks]]\nname = \"install\"\nscript = '''\n\
         start=$(date +%s.%N)\n\
         test -x venv/bin/python || python3 -m venv venv\n\
         venv/bin/pip install --disable-pip-version-check --quiet requests rich pyyaml six\n\
         venv/bin/python -c 'import requests, rich, yaml, six'\n\
         awk -v a=$start -v b=$(date +%s.%N) 'BEGIN {{ printf \"{LINE} %.2f\\n\", b - a }}'\n'''\n"
    )
}

pub async fn run(images_dir: PathBuf, image: &str) -> anyhow::Result<()> {
    let farm = Farm::start(
        &images_dir,
        BackendChoice::Qemu,
        |server| server.network.allow_private = allowed_private(&REGISTRIES),
        |_| {},
    )
    .await?;
    println!(
        "vmfarm bench cache-build: python3 -m venv + pip install requests rich pyyaml six on {image} (qemu backend)"
    );
    // Not measured: it fills the proxy's cache, so that every measured run fetches alike.
    build(&farm, image, false).await?;
    let runs = [
        ("no cache disk (reference)", false),
        ("cache disk, empty", true),
        ("cache disk, stored by the run above", true),
    ];
    println!(
        "{:<38} {:>16} {:>18}",
        "run", "install step", "submit to end"
    );
    let mut reference = None;
    for (label, cache) in runs {
        let (install, whole) = build(&farm, image, cache).await?;
        let base = *reference.get_or_insert(install);
        println!(
            "{label:<38} {:>14.2} s {:>16.1} s   {:.2} of the reference",
            install.as_secs_f64(),
            whole.as_secs_f64(),
            install.as_secs_f64() / base.as_secs_f64()
        );
    }
    Ok(())
}

/// One build: its install step's and its whole job's time.
async fn build(farm: &Farm, image: &str, cache: bool) -> anyhow::Result<(Duration, Duration)> {
    let started = Instant::now();
    let id = farm.submit(&manifest(image, cache)).await?;
    let job = farm.ended(id).await?;
    let whole = started.elapsed();
    let log = whole_log(farm, id).await?;
    anyhow::ensure!(
        job.state == vmfarm_proto::JobState::Succeeded,
        "job {id} ended {}: {log}",
        job.state
    );
    let seconds = log
        .lines()
        .find_map(|l| l.strip_prefix(LINE)?.trim().parse::<f64>().ok())
        .ok_or_else(|| anyhow::anyhow!("job {id} printed no `{LINE}` line: {log}"))?;
    if cache {
        anyhow::ensure!(
            log.contains("cache pip: stored as version"),
            "job {id} did not store its cache: {log}"
        );
    }
    Ok((Duration::from_secs_f64(seconds), whole))
}
