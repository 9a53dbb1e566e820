//! The build user: uid 1000, home /home/build, build directory /home/build/work, passwordless sudo.

use std::fmt::Write as _;
use std::io;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

pub const UID: u32 = 1000;
pub const GID: u32 = 1000;

/// The user's home directory.
pub fn home(user: &str) -> PathBuf {
    Path::new("/home").join(user)
}

/// The user's login shell: bash where the image has it, else sh.
pub fn shell() -> &'static str {
    if Path::new("/bin/bash").exists() {
        "/bin/bash"
    } else {
        "/bin/sh"
    }
}

/// Creates the user (if missing), its home and build directory, and its sudo rule.
pub fn ensure(user: &str) -> io::Result<()> {
    let home = home(user);
    let shell = shell();
    append_line_unless(
        Path::new("/etc/passwd"),
        user,
        &format!(
            "{user}:x:{UID}:{GID}:vmfarm build user:{}:{shell}",
            home.display()
        ),
        Some("root:x:0:0:root:/root:/bin/sh"),
    )?;
    append_line_unless(
        Path::new("/etc/group"),
        user,
        &format!("{user}:x:{GID}:"),
        Some("root:x:0:"),
    )?;
    if Path::new("/etc/shadow").exists() {
        append_line_unless(
            Path::new("/etc/shadow"),
            user,
            &format!("{user}:*:20000:0:99999:7:::"),
            None,
        )?;
    }
    for dir in [home.clone(), home.join("work")] {
        std::fs::create_dir_all(&dir)?;
        std::os::unix::fs::chown(&dir, Some(UID), Some(GID))?;
    }
    if ["/usr/bin/sudo", "/bin/sudo"]
        .iter()
        .any(|p| Path::new(p).exists())
    {
        let rule = Path::new("/etc/sudoers.d/vmfarm-build");
        std::fs::create_dir_all("/etc/sudoers.d")?;
        std::fs::write(rule, format!("{user} ALL=(ALL) NOPASSWD:ALL\n"))?;
        std::fs::set_permissions(rule, std::fs::Permissions::from_mode(0o440))?;
    }
    Ok(())
}

/// Names the host in /etc/hosts (`127.0.1.1`), unless a line for that address is there.
pub fn name_host(hostname: &str) -> io::Result<()> {
    append_line_unless(
        Path::new("/etc/hosts"),
        "127.0.1.1",
        &format!("127.0.1.1\t{hostname}"),
        Some("127.0.0.1\tlocalhost"),
    )
}

/// Appends `line` to `path` unless a line already starts with `key` followed by `:` or
/// whitespace; a missing file is created with `first` (if any) before it.
fn append_line_unless(path: &Path, key: &str, line: &str, first: Option<&str>) -> io::Result<()> {
    let mut text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e),
    };
    let present = text.lines().any(|l| {
        l.strip_prefix(key)
            .is_some_and(|rest| rest.starts_with(':') || rest.starts_with(char::is_whitespace))
    });
    if present {
        return Ok(());
    }
    if text.is_empty() {
        if let Some(first) = first {
            let _ = writeln!(text, "{first}");
        }
    } else if !text.ends_with('\n') {
        text.push('\n');
    }
    let _ = writeln!(text, "{line}");
    std::fs::write(path, text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_append_line_unless_adds_once_and_keeps_others() {
        let dir = std::env::temp_dir().join(format!("vmfarm-agent-user-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let passwd = dir.join("passwd");
        std::fs::write(
            &passwd,
            "root:x:0:0::/root:/bin/sh\nbuilder:x:5:5::/:/bin/sh",
        )
        .unwrap();
        for _ in 0..2 {
            append_line_unless(
                &passwd,
                "build",
                "build:x:1000:1000::/home/build:/bin/sh",
                None,
            )
            .unwrap();
        }
        let text = std::fs::read_to_string(&passwd).unwrap();
        assert_eq!(text.matches("build:x:1000").count(), 1);
        assert!(text.starts_with("root:x:0:0::/root:/bin/sh\nbuilder:x:5:5"));

        let missing = dir.join("group");
        append_line_unless(&missing, "build", "build:x:1000:", Some("root:x:0:")).unwrap();
        assert_eq!(
            std::fs::read_to_string(&missing).unwrap(),
            "root:x:0:\nbuild:x:1000:\n"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
