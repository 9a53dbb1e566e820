//! `vmfarm validate FILE...`: one summary line per valid manifest, `FILE:LINE:COL: message` per error.

use crate::cli::ValidateArgs;
use std::process::ExitCode;
use vmfarm_proto::Manifest;

pub fn run(args: &ValidateArgs) -> ExitCode {
    let mut ok = true;
    for path in &args.files {
        let shown = path.display().to_string();
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) => {
                eprintln!("{shown}: cannot read it: {e}");
                ok = false;
                continue;
            }
        };
        match Manifest::parse(&text) {
            Ok(manifest) => println!("{shown}: ok: {}", manifest.summary()),
            Err(errors) => {
                eprint!("{}", errors.render(&shown));
                ok = false;
            }
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
