//! `vmfarm validate` as a user runs it, on the shipped examples.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn vmfarm(args: &[&Path]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vmfarm"))
        .arg("validate")
        .args(args)
        .output()
        .expect("run vmfarm")
}

fn manifests(dir: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    files
}

#[test]
fn test_examples_are_valid_with_one_summary_line_each() {
    let files = manifests("configs/examples");
    assert!(
        files.len() >= 5,
        "expected at least five examples, found {files:?}"
    );
    let refs: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
    let out = vmfarm(&refs);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout.lines().count(), files.len(), "{stdout}");
    for (file, line) in files.iter().zip(stdout.lines()) {
        assert!(
            line.starts_with(&format!("{}: ok: ", file.display())),
            "{line}"
        );
        assert!(line.contains("image"), "{line}");
    }
}

#[test]
fn test_each_invalid_example_is_refused_with_a_position_and_a_fix() {
    let files = manifests("configs/examples/invalid");
    assert!(files.len() >= 5, "{files:?}");
    for file in &files {
        let out = vmfarm(&[file]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{}: {stderr}", file.display());
        let first = stderr.lines().next().unwrap_or_default();
        let rest = first
            .strip_prefix(&format!("{}:", file.display()))
            .unwrap_or_else(|| panic!("{first:?} does not start with the file name"));
        let mut parts = rest.splitn(3, ':');
        let line: usize = parts.next().unwrap().parse().expect("line number");
        let column: usize = parts.next().unwrap().parse().expect("column number");
        let message = parts.next().unwrap().trim();
        assert!(line >= 1 && column >= 1, "{first}");
        assert!(message.len() > 20, "message too thin: {first}");
    }
}

/// The line `# expect: LINE:COL: message` of an invalid example: the first error
/// `vmfarm validate` must print for it.
fn expected_error(file: &Path) -> String {
    let text = std::fs::read_to_string(file).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("# expect: "))
        .unwrap_or_else(|| {
            panic!(
                "{} has no `# expect: LINE:COL: message` line",
                file.display()
            )
        })
        .to_owned()
}

#[test]
fn test_each_invalid_example_gets_the_error_it_expects() {
    let files = manifests("configs/examples/invalid");
    for file in &files {
        let out = vmfarm(&[file]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let first = stderr.lines().next().unwrap_or_default();
        let want = format!("{}:{}", file.display(), expected_error(file));
        assert_eq!(first, want, "{}", file.display());
    }
    for name in [
        "network-glued-wildcard",
        "network-url",
        "network-bad-port",
        "network-unknown-key",
        "network-allow-private",
        "packages-not-a-list",
        "packages-bad-name",
        "task-named-packages",
    ] {
        assert!(
            files.iter().any(|f| f.ends_with(format!("{name}.toml"))),
            "no invalid example {name}.toml"
        );
    }
}

#[test]
fn test_mixed_files_fail_but_report_each() {
    let good = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/examples/artifacts.toml");
    let bad =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/examples/invalid/unknown-key.toml");
    let missing = Path::new("/nonexistent/job.toml");
    let out = vmfarm(&[&good, &bad, missing]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stdout.contains("artifacts.toml: ok"), "{stdout}");
    assert!(
        stderr.contains("unknown-key.toml:2:1: unknown key `timout`"),
        "{stderr}"
    );
    assert!(stderr.contains("did you mean `timeout`?"), "{stderr}");
    assert!(
        stderr.contains("/nonexistent/job.toml: cannot read it"),
        "{stderr}"
    );
}
