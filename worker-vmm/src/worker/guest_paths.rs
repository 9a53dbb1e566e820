//! Where things are in a guest (CONTRACTS.md "Worker <-> guest") and the commands the worker runs there.

pub use vmfarm_proto::guest::{BUILD_DIR, FARM_DIR, SECRETS_DIR};

/// Single-quotes `text` for a POSIX shell.
pub fn quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// The command that runs a task's script from the build directory with `bash -e` where bash
/// exists, else `sh -e`.
pub fn task_command(script_path: &str) -> String {
    let script = quote(script_path);
    format!(
        "cd {BUILD_DIR} && if command -v bash >/dev/null 2>&1; then exec bash -e {script}; else exec sh -e {script}; fi"
    )
}

/// Unpacks an uploaded source archive at `path` under the build directory.
pub fn unpack_command(archive: &str, path: &str) -> String {
    let dest = quote(&format!("{BUILD_DIR}/{path}"));
    format!(
        "mkdir -p {dest} && tar -xf {} -C {dest} && rm -f {}",
        quote(archive),
        quote(archive)
    )
}

/// The command that packs the directory `path` of the build directory into the tar file
/// `archive` (links kept as links: the tar is collected as bytes, never unpacked here).
pub fn pack_command(path: &str, archive: &str) -> String {
    format!(
        "tar -cf {} -C {BUILD_DIR} -- {}",
        quote(archive),
        quote(path)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_quote_survives_quotes() {
        assert_eq!(quote("a b"), "'a b'");
        assert_eq!(quote("it's"), r"'it'\''s'");
    }

    #[test]
    fn test_commands() {
        assert!(
            task_command("/home/build/.vmfarm/tasks/build.sh")
                .contains("exec bash -e '/home/build/.vmfarm/tasks/build.sh'")
        );
        assert_eq!(
            unpack_command("/tmp/s.tar", "my proj"),
            "mkdir -p '/home/build/work/my proj' && tar -xf '/tmp/s.tar' -C '/home/build/work/my proj' && rm -f '/tmp/s.tar'"
        );
    }
}
