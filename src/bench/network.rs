//! `vmfarm bench network`: a 64 MiB file served on this host's loopback, downloaded in a guest
//! through the job's proxy (its time from the proxy's own log line) beside the same download
//! made directly on the host in the same run, and beside the same bytes through a pipe inside the
//! guest (what the guest's emulated CPU can move at all); and the packages step of a few packages
//! with the proxy's cache cold, then warm. The qemu backend, the debian-13 image.

use super::farm::Farm;
use anyhow::Context;
use std::net::ToSocketAddrs;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use vmfarm_proto::network::AddressRange;
use vmfarm_proto::network::non_public;
use vmfarm_worker::config::BackendChoice;

const FILE_BYTES: usize = 64 << 20;
/// The line the download job's `pipe` task prints with its seconds.
const PIPE_LINE: &str = "bench-pipe-seconds";
const PACKAGES: &str = "[\"zlib1g-dev\", \"libssl-dev\", \"pkg-config\"]";

pub async fn run(images_dir: PathBuf) -> anyhow::Result<()> {
    let port = serve_file().await?;
    let url = format!("http://127.0.0.1:{port}/file");
    let started = Instant::now();
    let bytes = reqwest::get(&url).await?.bytes().await?.len();
    let host = started.elapsed();
    anyhow::ensure!(bytes == FILE_BYTES, "the host got {bytes} bytes");

    let farm = Farm::start(
        &images_dir,
        BackendChoice::Qemu,
        |server| {
            server
                .network
                .allow
                .push(format!("*:{port}").parse().expect("a port pattern parses"));
            server.network.allow_private = allowed_private(&["deb.debian.org"]);
        },
        |_| {},
    )
    .await?;
    let download = format!(
        "image = \"debian-13\"\ntimeout = \"20m\"\n[network]\nallow = [\"localhost:{port}\"]\n\
         [[tasks]]\nname = \"get\"\nscript = '''\n\
         exec 3<>/dev/tcp/127.0.0.1/${{http_proxy##*:}}\n\
         printf 'GET http://localhost:{port}/file HTTP/1.1\\r\\nHost: localhost:{port}\\r\\nConnection: close\\r\\n\\r\\n' >&3\n\
         cat <&3 | wc -c\n'''\n\
         [[tasks]]\nname = \"pipe\"\nscript = '''\n\
         start=$(date +%s.%N)\n\
         head -c {FILE_BYTES} /dev/zero | cat | wc -c\n\
         awk -v a=$start -v b=$(date +%s.%N) 'BEGIN {{ printf \"{PIPE_LINE} %.3f\\n\", b - a }}'\n'''\n"
    );
    let id = farm.submit(&download).await?;
    let job = farm.ended(id).await?;
    let log = whole_log(&farm, id).await?;
    anyhow::ensure!(
        job.state == vmfarm_proto::JobState::Succeeded,
        "the download job ended {}: {log}",
        job.state
    );
    let guest = proxied_seconds(&log, port).context("the proxy's line for the download")?;
    let pipe = pipe_seconds(&log).context("the guest's pipe line")?;
    let mib = FILE_BYTES as f64 / f64::from(1 << 20);
    println!("vmfarm bench network: {mib:.0} MiB over loopback, qemu backend, debian-13");
    println!("{:<44} {:>10} {:>12}", "download", "seconds", "MiB/s");
    let host = host.as_secs_f64();
    println!(
        "{:<44} {host:>10.2} {:>12.1}",
        "host, direct (reference)",
        mib / host
    );
    println!(
        "{:<44} {guest:>10.2} {:>12.1}",
        "guest, through the job's proxy",
        mib / guest
    );
    println!(
        "{:<44} {pipe:>10.2} {:>12.1}",
        "guest, a pipe inside it (its own ceiling)",
        mib / pipe
    );
    println!(
        "{:<44} {:>10.2}",
        "ratio guest/host throughput",
        host / guest
    );
    println!(
        "{:<44} {:>10.2}",
        "ratio guest through the proxy / its own pipe",
        pipe / guest
    );

    let packages = format!(
        "image = \"debian-13\"\ntimeout = \"20m\"\npackages = {PACKAGES}\n\
         [[tasks]]\nname = \"t\"\nscript = \"true\"\n"
    );
    let mut seconds = Vec::new();
    for _ in 0..2 {
        let id = farm.submit(&packages).await?;
        let job = farm.ended(id).await?;
        anyhow::ensure!(
            job.state == vmfarm_proto::JobState::Succeeded,
            "the packages job ended {}",
            job.state
        );
        seconds.push(packages_seconds(&farm, id).await?);
    }
    println!("\npackages step of {PACKAGES}");
    println!("{:<44} {:>10.1}", "cold cache (reference), s", seconds[0]);
    println!("{:<44} {:>10.1}", "warm cache, s", seconds[1]);
    println!(
        "{:<44} {:>10.2}",
        "ratio warm/cold",
        seconds[1] / seconds[0]
    );
    Ok(())
}

/// Serves a file of [`FILE_BYTES`] to every GET on a loopback port; the port.
async fn serve_file() -> anyhow::Result<u16> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move {
        let block = vec![b'x'; 1 << 20];
        while let Ok((mut conn, _)) = listener.accept().await {
            let block = block.clone();
            tokio::spawn(async move {
                let mut request = [0u8; 4096];
                let _ = tokio::io::AsyncReadExt::read(&mut conn, &mut request).await;
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {FILE_BYTES}\r\nconnection: close\r\n\r\n"
                );
                if conn.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                for _ in 0..FILE_BYTES / block.len() {
                    if conn.write_all(&block).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    Ok(port)
}

/// Loopback (a file served here), and the non-public addresses `hosts` resolve to here (an
/// egress gateway, on these machines).
pub(super) fn allowed_private(hosts: &[&str]) -> Vec<AddressRange> {
    let mut ranges: Vec<AddressRange> = vec!["127.0.0.0/8".parse().expect("a range parses")];
    let addrs = hosts
        .iter()
        .flat_map(|host| (*host, 80).to_socket_addrs().into_iter().flatten());
    for addr in addrs {
        if non_public(addr.ip()).is_some()
            && let Ok(range) = addr.ip().to_string().parse()
        {
            ranges.push(range);
        }
    }
    ranges
}

pub(super) async fn whole_log(farm: &Farm, id: i64) -> anyhow::Result<String> {
    let chunks = vmfarm_server::logs::read(&farm.state.db, id, 0, i64::MAX).await?;
    Ok(chunks.iter().map(|c| c.data.as_str()).collect())
}

/// The seconds the proxy's line for `localhost:PORT` gives (`... in 1.2s`).
fn proxied_seconds(log: &str, port: u16) -> Option<f64> {
    let line = log
        .lines()
        .find(|l| l.contains(&format!("network localhost:{port}:")))?;
    let after = line.rsplit(" in ").next()?;
    after
        .split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .next()?
        .parse()
        .ok()
}

/// The seconds the guest's pipe task printed.
fn pipe_seconds(log: &str) -> Option<f64> {
    log.lines()
        .find_map(|l| l.trim().strip_prefix(PIPE_LINE))?
        .trim()
        .parse()
        .ok()
}

/// How long job `id`'s packages step took.
async fn packages_seconds(farm: &Farm, id: i64) -> anyhow::Result<f64> {
    let row = vmfarm_server::db::Query::fetch_optional(
        &mut farm.state.db.read(),
        "SELECT started_at, finished_at FROM tasks WHERE job_id = $1 AND name = 'packages'",
        &[id.into()],
    )
    .await?
    .context("no packages step")?;
    let (start, end) = (row.int(0)?, row.int(1)?);
    Ok(Duration::from_millis(u64::try_from(end - start).unwrap_or(0)).as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_the_proxys_line_gives_the_download_time() {
        let log = "[vmfarm] network localhost:8080: 1 request, none from the cache; \
                   the guest sent 90 B, received 64.0 MiB in 2.5s\n";
        assert_eq!(proxied_seconds(log, 8080), Some(2.5));
        assert_eq!(proxied_seconds(log, 9090), None);
        assert_eq!(
            pipe_seconds("67108864\nbench-pipe-seconds 1.250\n"),
            Some(1.25)
        );
        assert_eq!(pipe_seconds(log), None);
    }
}
