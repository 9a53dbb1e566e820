//! `vmfarm vm run`'s command line, which `main` parses on its own (without the rest of the CLI):
//! help, usage errors and bad values read as the subcommand's, and the whole CLI still lists it.

use std::process::{Command, Output};

fn vmfarm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vmfarm"))
        .args(args)
        .output()
        .expect("run vmfarm")
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn test_help_is_the_subcommands() {
    let out = vmfarm(&["vm", "run", "--help"]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(
        stdout.contains("Usage: vmfarm vm run [OPTIONS] --kernel <PATH>"),
        "{stdout}"
    );
    assert!(stdout.contains("--vsock <SOCKET>"), "{stdout}");
}

#[test]
fn test_missing_kernel_is_a_usage_error_naming_the_flag() {
    let out = vmfarm(&["vm", "run", "--cpus", "2"]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--kernel <PATH>"), "{stderr}");
    assert!(stderr.contains("Usage: vmfarm vm run"), "{stderr}");
}

#[test]
fn test_bad_values_name_the_flag_and_the_value() {
    let out = vmfarm(&["vm", "run", "--kernel", "/k", "--cpus", "many"]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--cpus"), "{stderr}");
    assert!(stderr.contains("many"), "{stderr}");

    let out = vmfarm(&["vm", "run", "--kernel", "/k", "--memory", "lots"]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("vmfarm vm run: --memory \"lots\""),
        "{stderr}"
    );
}

#[test]
fn test_sizes_and_durations_are_written_as_in_a_manifest() {
    for (flag, value, reason) in [
        ("--memory", "512M", "write \"512MiB\""),
        ("--memory", "512", "has no unit"),
        ("--memory", "8MiB", "16MiB to 1TiB"),
        ("--timeout", "60", "has no unit"),
        ("--timeout", "250ms", "unknown unit `ms`"),
    ] {
        let out = vmfarm(&["vm", "run", "--kernel", "/k", flag, value]);
        let (_, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(1), "{flag} {value}: {stderr}");
        assert!(
            stderr.contains(&format!("vmfarm vm run: {flag} \"{value}\""))
                && stderr.contains(reason),
            "{flag} {value}: {stderr}"
        );
    }
}

#[test]
fn test_the_whole_cli_still_lists_vm_run() {
    let out = vmfarm(&["vm", "--help"]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(
        stdout
            .lines()
            .any(|l| l.trim_start().starts_with("run ")
                && l.contains("Boot one guest in this process")),
        "{stdout}"
    );
}

#[test]
fn test_an_unreadable_vmfarm_log_is_reported_and_info_is_used() {
    let out = Command::new(env!("CARGO_BIN_EXE_vmfarm"))
        .args(["vm", "run", "--kernel", "/k", "--memory", "lots"])
        .env("VMFARM_LOG", "vmfarm_vmm=loud")
        .output()
        .expect("run vmfarm");
    let (_, stderr) = text(&out);
    assert!(
        stderr.contains("VMFARM_LOG=\"vmfarm_vmm=loud\" is neither a level"),
        "{stderr}"
    );
    assert!(stderr.contains("logging at info"), "{stderr}");
    // The run itself goes on to its own verdict.
    assert!(stderr.contains("--memory \"lots\""), "{stderr}");
}

/// `--save` and `--restore` are exclusive, `--restore-memory` needs `--restore`; a snapshot
/// folder without a state, or with one another VMM wrote, is refused saying so before any VM
/// is built.
#[test]
fn test_snapshot_flags_and_unusable_snapshots_are_refused_with_the_reason() {
    let out = vmfarm(&[
        "vm",
        "run",
        "--kernel",
        "/k",
        "--save",
        "/a",
        "--restore",
        "/b",
    ]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--save <DIR>") && stderr.contains("--restore <DIR>"),
        "{stderr}"
    );
    let out = vmfarm(&["vm", "run", "--kernel", "/k", "--restore-memory", "/m"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out).1);

    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().to_str().unwrap();
    let out = vmfarm(&["vm", "run", "--kernel", "/k", "--restore", folder]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("--restore") && stderr.contains(&format!("{folder}/devices")),
        "{stderr}"
    );
    std::fs::write(
        dir.path().join("devices"),
        r#"{"vmm": "vmfarm-vmm 0.0.1 state 0", "shape": {}}"#,
    )
    .unwrap();
    let out = vmfarm(&["vm", "run", "--kernel", "/k", "--restore", folder]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("saved by vmfarm-vmm 0.0.1 state 0") && stderr.contains("boot the guest"),
        "{stderr}"
    );
}
