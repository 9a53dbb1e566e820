//! The client subcommands: submit, status, logs, artifacts, cancel.

use crate::cli::{ArtifactsArgs, CancelArgs, LogsArgs, RerunArgs, StatusArgs, SubmitArgs};
use crate::client::{Client, read_sse};
use crate::exit_status;
use anyhow::{Context, bail};
use reqwest::Method;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::io::Write;
use std::process::ExitCode;
use vmfarm_proto::JobState;
use vmfarm_proto::api::{ArtifactView, JobView, SubmitResponse};
use vmfarm_proto::names::{check_artifact_path, encode_artifact_path};

pub async fn submit(args: SubmitArgs) -> anyhow::Result<ExitCode> {
    let client = Client::new(&args.client)?;
    let text = std::fs::read_to_string(&args.file)
        .with_context(|| format!("reading {}", args.file.display()))?;
    let request = client
        .request(Method::POST, "/api/jobs")
        .header("content-type", "application/toml")
        .body(text);
    let response = client
        .send(request)
        .await
        .map_err(|e| prefix_manifest_errors(e, &args.file.display().to_string()))?;
    let submitted: SubmitResponse = response.json().await?;
    print_and_follow(&client, &submitted, args.follow, args.json).await
}

/// Prints one line per submitted job (id, image), or the answer as JSON; with `follow`, streams
/// their logs (to stderr with `json`) and exits with the status their ends give.
async fn print_and_follow(
    client: &Client,
    submitted: &SubmitResponse,
    follow_logs: bool,
    json: bool,
) -> anyhow::Result<ExitCode> {
    if json {
        println!("{}", serde_json::to_string_pretty(submitted)?);
    } else {
        for job in &submitted.jobs {
            println!("{}\t{}", job.id, job.image);
            if let Some(waiting) = &job.waiting {
                eprintln!("job {} waits: {waiting}", job.id);
            }
        }
    }
    if !follow_logs {
        return Ok(ExitCode::SUCCESS);
    }
    let to = if json { LogTo::Stderr } else { LogTo::Stdout };
    let mut ends = Vec::new();
    for job in &submitted.jobs {
        ends.push(follow(client, &job.id, Some(&job.image), to).await?);
    }
    Ok(exit_status::of_states(ends))
}

/// Manifest errors come back as `LINE:COL: message` lines; name the file in front of each.
fn prefix_manifest_errors(e: anyhow::Error, file: &str) -> anyhow::Error {
    let text = e.to_string();
    let looks_positional = text
        .lines()
        .all(|l| l.split(':').take(2).all(|p| p.parse::<usize>().is_ok()));
    if looks_positional {
        anyhow::anyhow!(
            "{}",
            text.lines()
                .map(|l| format!("{file}:{l}"))
                .collect::<Vec<_>>()
                .join("\n")
        )
    } else {
        e
    }
}

#[derive(Deserialize)]
struct LogEvent {
    data: String,
}

#[derive(Deserialize)]
struct EndEvent {
    state: String,
}

/// Where a followed log goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LogTo {
    /// Its text, on stdout.
    Stdout,
    /// Its text, on stderr (stdout carries JSON).
    Stderr,
    /// Its chunks as JSON lines on stdout, as the server sends them.
    JsonLines,
}

/// Streams a job's log until it ends, as `to` says; returns its final state.
async fn follow(
    client: &Client,
    job: &str,
    label: Option<&str>,
    to: LogTo,
) -> anyhow::Result<JobState> {
    let response = client
        .send(client.request(Method::GET, &format!("/api/jobs/{job}/log/stream")))
        .await?;
    let mut final_state = None;
    let mut out: Box<dyn Write> = match to {
        LogTo::Stderr => Box::new(std::io::stderr()),
        LogTo::Stdout | LogTo::JsonLines => Box::new(std::io::stdout()),
    };
    read_sse(response, |event, data| {
        match event {
            "log" if to == LogTo::JsonLines => {
                // Checked to be JSON, then passed on as one line.
                let chunk: serde_json::Value = serde_json::from_str(data)?;
                writeln!(out, "{chunk}")?;
                out.flush()?;
            }
            "log" => {
                let chunk: LogEvent = serde_json::from_str(data)?;
                out.write_all(chunk.data.as_bytes())?;
                out.flush()?;
            }
            "end" => {
                let end: EndEvent = serde_json::from_str(data)?;
                final_state = Some(end.state.parse::<JobState>()?);
                return Ok(false);
            }
            _ => {}
        }
        Ok(true)
    })
    .await?;
    let state = final_state.context("the log stream ended without the job's state")?;
    if to == LogTo::JsonLines {
        println!("{}", serde_json::json!({ "state": state }));
    }
    match label {
        Some(image) => eprintln!("job {job} ({image}): {state}"),
        None => eprintln!("job {job}: {state}"),
    }
    Ok(state)
}

pub async fn status(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let client = Client::new(&args.client)?;
    let jobs: Vec<JobView> = if args.jobs.is_empty() {
        let list: vmfarm_proto::api::JobList = client
            .send(client.request(Method::GET, "/api/jobs"))
            .await?
            .json()
            .await?;
        list.jobs
    } else {
        let mut out = Vec::new();
        for id in &args.jobs {
            out.push(
                client
                    .send(client.request(Method::GET, &format!("/api/jobs/{id}")))
                    .await?
                    .json()
                    .await?,
            );
        }
        out
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&jobs)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<8} {:<16} {:<12} {:<10} {:<8} {:<32} TASKS",
        "ID", "IMAGE", "OWNER", "STATE", "ATTEMPT", "FROM"
    );
    for job in &jobs {
        let tasks: Vec<String> = job
            .tasks
            .iter()
            .map(|t| format!("{}:{}", t.name, t.state))
            .collect();
        println!(
            "{:<8} {:<16} {:<12} {:<10} {:<8} {:<32} {}",
            job.id,
            job.image,
            job.owner,
            job.state.as_str(),
            job.attempt,
            origin(job),
            tasks.join(" ")
        );
    }
    for job in &jobs {
        if let Some(waiting) = &job.waiting {
            println!("job {} waits: {waiting}", job.id);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Where a job comes from, in a few words: `acme/app main@0123456789ab`, `rerun of 7`, or `-`.
fn origin(job: &JobView) -> String {
    let mut parts = Vec::new();
    if let Some(push) = &job.push {
        let name = push
            .git_ref
            .strip_prefix("refs/heads/")
            .or_else(|| push.git_ref.strip_prefix("refs/tags/"))
            .unwrap_or(&push.git_ref);
        let short = push.commit.get(..12).unwrap_or(&push.commit);
        parts.push(format!("{} {name}@{short}", push.repository));
    }
    if let Some(original) = &job.rerun_of {
        parts.push(format!("rerun of {original}"));
    }
    if parts.is_empty() {
        "-".to_owned()
    } else {
        parts.join(", ")
    }
}

pub async fn logs(args: LogsArgs) -> anyhow::Result<ExitCode> {
    let client = Client::new(&args.client)?;
    if args.follow {
        let to = if args.json {
            LogTo::JsonLines
        } else {
            LogTo::Stdout
        };
        let state = follow(&client, &args.job, None, to).await?;
        return Ok(exit_status::of_states([state]));
    }
    let format = if args.json { "&format=json" } else { "" };
    let mut from: u64 = 0;
    let mut stdout = std::io::stdout();
    loop {
        let response = client
            .send(client.request(
                Method::GET,
                &format!("/api/jobs/{}/log?from={from}{format}", args.job),
            ))
            .await?;
        let size: u64 = response
            .headers()
            .get("x-vmfarm-log-size")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let read = if args.json {
            // `[{offset, stream, task, ts_ms, data}]`, passed on a line each.
            let chunks: Vec<serde_json::Value> = response.json().await?;
            let mut read = 0;
            for chunk in &chunks {
                writeln!(stdout, "{chunk}")?;
                read += chunk["data"].as_str().map_or(0, |d| d.len() as u64);
            }
            read
        } else {
            let bytes = response.bytes().await?;
            stdout.write_all(&bytes)?;
            bytes.len() as u64
        };
        from += read;
        if read == 0 || from >= size {
            break;
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn artifacts(args: ArtifactsArgs) -> anyhow::Result<ExitCode> {
    let client = Client::new(&args.client)?;
    let list: Vec<ArtifactView> = client
        .send(client.request(Method::GET, &format!("/api/jobs/{}/artifacts", args.job)))
        .await?
        .json()
        .await?;
    if list.is_empty() {
        eprintln!("job {} has no artifacts", args.job);
    }
    let mut downloaded = Vec::new();
    for artifact in &list {
        if let Err(e) = check_artifact_path(&artifact.name) {
            bail!(
                "the server sent the artifact name `{}`, which {e}",
                artifact.name.escape_debug()
            );
        }
        let dest = args.out.join(&artifact.name);
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        let path = format!(
            "/api/jobs/{}/artifacts/{}",
            args.job,
            encode_artifact_path(&artifact.name)
        );
        let response = client.send(client.request(Method::GET, &path)).await?;
        let bytes = response.bytes().await?;
        let got = hex::encode(Sha256::digest(&bytes));
        if got != artifact.sha256 {
            bail!(
                "{} arrived damaged: sha256 {got}, expected {}",
                artifact.name,
                artifact.sha256
            );
        }
        std::fs::write(&dest, &bytes).with_context(|| format!("writing {}", dest.display()))?;
        if !args.json {
            println!(
                "{}\t{} bytes\tsha256:{}",
                dest.display(),
                artifact.size,
                artifact.sha256
            );
        }
        downloaded.push(serde_json::json!({
            "name": artifact.name, "path": dest, "size": artifact.size, "sha256": artifact.sha256,
        }));
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&downloaded)?);
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn cancel(args: CancelArgs) -> anyhow::Result<ExitCode> {
    let client = Client::new(&args.client)?;
    let job: JobView = client
        .send(client.request(Method::POST, &format!("/api/jobs/{}/cancel", args.job)))
        .await?
        .json()
        .await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&job)?);
    } else {
        println!("{}\t{}", job.id, job.state);
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn rerun(args: RerunArgs) -> anyhow::Result<ExitCode> {
    let client = Client::new(&args.client)?;
    let submitted: SubmitResponse = client
        .send(client.request(Method::POST, &format!("/api/jobs/{}/rerun", args.job)))
        .await?
        .json()
        .await?;
    print_and_follow(&client, &submitted, args.follow, args.json).await
}
