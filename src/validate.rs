//! `vmfarm validate FILE...`: one summary line per valid manifest, `FILE:LINE:COL: message` per
//! error; with `--json`, an array of the files' verdicts.

use crate::cli::ValidateArgs;
use serde::Serialize;
use std::process::ExitCode;
use vmfarm_proto::Manifest;
use vmfarm_proto::api::ManifestErrorView;

/// One file's verdict, as `--json` prints it.
#[derive(Serialize)]
struct Verdict {
    file: String,
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    summary: Option<String>,
    /// A file that could not be read.
    #[serde(skip_serializing_if = "Option::is_none")]
    unreadable: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    errors: Vec<ManifestErrorView>,
}

pub fn run(args: &ValidateArgs) -> ExitCode {
    let mut ok = true;
    let mut verdicts = Vec::new();
    for path in &args.files {
        let shown = path.display().to_string();
        let mut verdict = Verdict {
            file: shown.clone(),
            ok: false,
            summary: None,
            unreadable: None,
            errors: Vec::new(),
        };
        match std::fs::read_to_string(path) {
            Err(e) => {
                if !args.json {
                    eprintln!("{shown}: cannot read it: {e}");
                }
                verdict.unreadable = Some(e.to_string());
            }
            Ok(text) => match Manifest::parse(&text) {
                Ok(manifest) => {
                    if !args.json {
                        println!("{shown}: ok: {}", manifest.summary());
                    }
                    verdict.ok = true;
                    verdict.summary = Some(manifest.summary());
                }
                Err(errors) => {
                    if !args.json {
                        eprint!("{}", errors.render(&shown));
                    }
                    verdict.errors = errors.0.into_iter().map(Into::into).collect();
                }
            },
        }
        ok &= verdict.ok;
        verdicts.push(verdict);
    }
    if args.json {
        match serde_json::to_string_pretty(&verdicts) {
            Ok(text) => println!("{text}"),
            Err(e) => {
                eprintln!("vmfarm: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
