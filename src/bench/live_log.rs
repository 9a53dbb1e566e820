//! `vmfarm bench live-log`: how soon a follower has a line the guest printed. A job on
//! debian-12 prints a numbered line every 200 ms; a follower of the live stream (what `logs
//! --follow` and the web UI read) notes when each line arrives, against when the worker read it
//! from the guest (the chunk's `ts_ms`: the same host's clock; the guest to the worker over
//! SSH adds a millisecond or so). Beside it, in the same run, a follower that polls `GET
//! /api/jobs/ID/log` once a second.

use super::farm::Farm;
use super::stats::{ms, quantile};
use crate::client::read_sse;
use anyhow::Context;
use std::path::PathBuf;
use std::time::Duration;
use vmfarm_server::auth::{ApiCaller, Caller};
use vmfarm_server::config::Scope;
use vmfarm_worker::config::BackendChoice;

/// Lines the guest prints, one every 200 ms.
const LINES: usize = 100;

/// Milliseconds since the epoch, as `ts_ms` counts.
fn now_ms() -> i64 {
    vmfarm_server::db::now_ms()
}

/// The delays of the `tick` lines in `chunk` (a JSON log chunk) as of now.
fn delays(chunk: &serde_json::Value) -> Vec<Duration> {
    let (Some(data), Some(ts)) = (chunk["data"].as_str(), chunk["ts_ms"].as_i64()) else {
        return Vec::new();
    };
    let late = Duration::from_millis(u64::try_from(now_ms() - ts).unwrap_or(0));
    data.lines()
        .filter(|l| l.starts_with("tick "))
        .map(|_| late)
        .collect()
}

pub async fn run(images_dir: PathBuf) -> anyhow::Result<()> {
    let farm = Farm::start(&images_dir, BackendChoice::Auto, |_| {}, |_| {}).await?;
    let token = vmfarm_server::admin::create_token(
        &farm.state.db,
        &farm.state.config,
        &Caller::Api(ApiCaller {
            name: "bench-live-log".into(),
            user: vmfarm_server::users::ADMIN.into(),
            admin: true,
            scopes: vec![Scope::Read],
            max_priority: None,
        }),
    )
    .await?;
    let manifest = format!(
        "image = \"debian-12\"\n[[tasks]]\nname = \"ticks\"\n\
         script = \"for i in $(seq 1 {LINES}); do echo tick $i; sleep 0.2; done\"\n"
    );
    let id = farm.submit(&manifest).await?;
    let http = reqwest::Client::new();

    let stream = {
        let (http, url, token) = (http.clone(), farm.url.clone(), token.clone());
        tokio::spawn(async move {
            let response = http
                .get(format!("{url}/api/jobs/{id}/log/stream"))
                .bearer_auth(&token)
                .send()
                .await?
                .error_for_status()?;
            let mut seen = Vec::new();
            read_sse(response, |event, data| {
                match event {
                    "log" => seen.extend(delays(&serde_json::from_str(data)?)),
                    "end" => return Ok(false),
                    _ => {}
                }
                Ok(true)
            })
            .await?;
            anyhow::Ok(seen)
        })
    };
    let polled = {
        let (http, url, token) = (http.clone(), farm.url.clone(), token.clone());
        tokio::spawn(async move {
            let mut seen = Vec::new();
            let mut from = 0u64;
            loop {
                let ended = http
                    .get(format!("{url}/api/jobs/{id}"))
                    .bearer_auth(&token)
                    .send()
                    .await?
                    .json::<vmfarm_proto::api::JobView>()
                    .await?
                    .state
                    .is_terminal();
                let chunks: Vec<serde_json::Value> = http
                    .get(format!("{url}/api/jobs/{id}/log?from={from}&format=json"))
                    .bearer_auth(&token)
                    .send()
                    .await?
                    .error_for_status()?
                    .json()
                    .await?;
                for chunk in &chunks {
                    seen.extend(delays(chunk));
                    from += chunk["data"].as_str().map_or(0, |d| d.len() as u64);
                }
                if ended && chunks.is_empty() {
                    return anyhow::Ok(seen);
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    };
    let mut streamed = stream.await.context("the stream follower")??;
    let mut polled = polled.await.context("the polling follower")??;
    let job = farm.ended(id).await?;
    anyhow::ensure!(
        job.state == vmfarm_proto::JobState::Succeeded && streamed.len() == LINES,
        "job {id} ended {} with {} of {LINES} lines streamed",
        job.state,
        streamed.len()
    );
    println!(
        "vmfarm bench live-log: a debian-12 guest prints a line every 200 ms ({LINES} lines); \
         from the worker reading it to a follower having it"
    );
    println!(
        "{:<36} {:>6} {:>12} {:>12}",
        "follower", "lines", "p50", "p99"
    );
    for (label, samples) in [
        ("live stream (SSE, logs --follow)", &mut streamed),
        ("polling once a second (reference)", &mut polled),
    ] {
        println!(
            "{:<36} {:>6} {:>12} {:>12}",
            label,
            samples.len(),
            ms(quantile(samples, 0.5)),
            ms(quantile(samples, 0.99))
        );
    }
    Ok(())
}
