//! `vmfarm hook post-receive`: a plain git server's way to start builds (no forge needed). Git
//! runs it after a push with one `OLD NEW REF` line per updated ref on its standard input; each
//! goes to the server (`POST /api/pushes`), which reads the manifests of the new commit and
//! queues them. What each built, or why not, is printed for the one who pushed (git shows a
//! hook's output as `remote:` lines).

use crate::cli::PostReceiveArgs;
use crate::client::Client;
use anyhow::Context;
use reqwest::Method;
use std::io::BufRead;
use std::process::ExitCode;
use vmfarm_proto::api::{PushAnswer, PushRequest, PushView};

/// Most ref lines one push may carry (git sends one per updated ref).
const MAX_REFS: usize = 1000;

pub async fn post_receive(args: PostReceiveArgs) -> anyhow::Result<ExitCode> {
    let client = Client::new(&args.client)?;
    let mut all_ok = true;
    for (i, line) in std::io::stdin().lock().lines().enumerate() {
        let line = line.context("reading the ref updates git gives on standard input")?;
        if i == MAX_REFS {
            eprintln!("vmfarm: more than {MAX_REFS} refs in one push: the rest are not built");
            all_ok = false;
            break;
        }
        let Some((_, after, git_ref)) = parse_update(&line) else {
            eprintln!(
                "vmfarm: not a ref update (`OLD NEW REF`): {}",
                line.escape_debug()
            );
            all_ok = false;
            continue;
        };
        let request = PushRequest {
            repository: args.repository.clone(),
            git_ref: git_ref.to_owned(),
            after: after.to_owned(),
        };
        let answer = client
            .send(client.request(Method::POST, "/api/pushes").json(&request))
            .await;
        match answer {
            Ok(response) => {
                let answer: PushAnswer = response.json().await?;
                if args.json {
                    println!("{}", serde_json::to_string(&answer)?);
                    all_ok &= answer
                        .push
                        .iter()
                        .all(|push| push.files.iter().all(|f| f.errors.is_empty()));
                } else {
                    all_ok &= report(&client, git_ref, &answer);
                }
            }
            Err(e) => {
                eprintln!("vmfarm: {git_ref}: {e:#}");
                all_ok = false;
            }
        }
    }
    Ok(if all_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `OLD NEW REF` as git writes it.
fn parse_update(line: &str) -> Option<(&str, &str, &str)> {
    let mut parts = line.split(' ');
    let update = (parts.next()?, parts.next()?, parts.next()?);
    parts.next().is_none().then_some(update)
}

/// Prints what a push built; whether every manifest built.
fn report(client: &Client, git_ref: &str, answer: &PushAnswer) -> bool {
    match answer {
        PushAnswer {
            push: Some(push), ..
        } => print_push(client, push),
        PushAnswer {
            ignored: Some(why), ..
        } => {
            println!("vmfarm: {git_ref}: {why}");
            true
        }
        _ => true,
    }
}

fn print_push(client: &Client, push: &PushView) -> bool {
    let short = push.commit.get(..12).unwrap_or(&push.commit);
    if push.files.is_empty() {
        println!(
            "vmfarm: {} {short}: no .vmfarm/*.toml or .vmfarm.toml in this commit: nothing to build",
            push.git_ref
        );
        return true;
    }
    println!("vmfarm: {} {short}: push {}", push.git_ref, push.id);
    let mut all_ok = true;
    for file in &push.files {
        for job in &file.jobs {
            println!(
                "  {}: job {} ({}) {}",
                file.file,
                job.id,
                job.image,
                client.url(&format!("/jobs/{}", job.id))
            );
            if let Some(waiting) = &job.waiting {
                println!("    waits: {waiting}");
            }
        }
        for e in &file.errors {
            println!("  {}:{}:{}: {}", file.file, e.line, e.column, e.message);
            all_ok = false;
        }
    }
    all_ok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_ref_update_lines_are_old_new_ref() {
        let line = format!("{} {} refs/heads/main", "0".repeat(40), "a".repeat(40));
        assert_eq!(
            parse_update(&line),
            Some((
                "0".repeat(40).as_str(),
                "a".repeat(40).as_str(),
                "refs/heads/main"
            ))
        );
        assert_eq!(parse_update("a b"), None);
        assert_eq!(parse_update("a b c d"), None);
    }
}
