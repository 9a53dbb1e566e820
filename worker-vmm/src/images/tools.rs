//! The host tools an image build runs, and how their failures become errors a user can act on.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::ImageError;

/// A host command and the Debian package that provides it.
#[derive(Debug, Clone, Copy)]
pub struct Tool {
    pub name: &'static str,
    pub package: &'static str,
}

pub const MMDEBSTRAP: Tool = Tool {
    name: "mmdebstrap",
    package: "mmdebstrap",
};
pub const MKFS_EXT4: Tool = Tool {
    name: "mkfs.ext4",
    package: "e2fsprogs",
};
pub const QEMU_IMG: Tool = Tool {
    name: "qemu-img",
    package: "qemu-utils",
};
pub const DEPMOD: Tool = Tool {
    name: "depmod",
    package: "kmod",
};
pub const XZ: Tool = Tool {
    name: "xz",
    package: "xz-utils",
};
pub const ZSTD: Tool = Tool {
    name: "zstd",
    package: "zstd",
};
pub const MKFS_VFAT: Tool = Tool {
    name: "mkfs.vfat",
    package: "dosfstools",
};
pub const MCOPY: Tool = Tool {
    name: "mcopy",
    package: "mtools",
};
pub const SFDISK: Tool = Tool {
    name: "sfdisk",
    package: "fdisk",
};
pub const STRIP: Tool = Tool {
    name: "strip",
    package: "binutils",
};

/// Where `tool` is: on PATH, or in the sbin folders a non-root PATH lacks.
pub fn find(tool: Tool) -> Result<PathBuf, ImageError> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(tool.name))
        .find(|p| p.is_file())
        .ok_or(ImageError::MissingTool {
            tool: tool.name,
            package: tool.package,
        })
}

/// Checks every tool up front, so that a build does not fail half-way for a missing one.
pub fn require(tools: &[Tool]) -> Result<(), ImageError> {
    tools.iter().try_for_each(|t| find(*t).map(drop))
}

/// Runs `tool` with `args`, its output going to `log`; a failure carries the log's tail.
pub fn run(tool: Tool, args: &[&std::ffi::OsStr], log: &Path) -> Result<(), ImageError> {
    let program = find(tool)?;
    let file = std::fs::File::create(log).map_err(|e| ImageError::io(log, e))?;
    let err_file = file.try_clone().map_err(|e| ImageError::io(log, e))?;
    let mut command = Command::new(&program);
    // A worker killed and started again must not find the last one's tool still writing.
    crate::backend::die_with_parent(&mut command);
    let status = command
        .args(args)
        .stdin(Stdio::null())
        .stdout(file)
        .stderr(err_file)
        .status()
        .map_err(|e| ImageError::io(&program, e))?;
    if status.success() {
        return Ok(());
    }
    let text = std::fs::read_to_string(log).unwrap_or_default();
    Err(classify(tool.name, &text))
}

/// Runs `tool` and returns its stdout.
pub fn output(tool: Tool, args: &[&std::ffi::OsStr]) -> Result<Vec<u8>, ImageError> {
    let program = find(tool)?;
    let out = Command::new(&program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| ImageError::io(&program, e))?;
    if !out.status.success() {
        return Err(classify(tool.name, &String::from_utf8_lossy(&out.stderr)));
    }
    Ok(out.stdout)
}

/// Turns a tool's failure output into the reason a user can act on.
pub fn classify(tool: &str, log: &str) -> ImageError {
    for line in log.lines() {
        if let Some(rest) = line.split("Unable to locate package ").nth(1) {
            return ImageError::UnknownPackage(rest.trim().to_owned());
        }
        if let Some(rest) = line
            .split("Package '")
            .nth(1)
            .filter(|_| line.contains("has no installation candidate"))
        {
            return ImageError::UnknownPackage(rest.split('\'').next().unwrap_or(rest).to_owned());
        }
        if line.contains("No space left on device") || line.contains("Could not allocate block") {
            return ImageError::NoSpace(line.trim().to_owned());
        }
    }
    let tail: Vec<&str> = log.lines().rev().take(15).collect();
    let tail: Vec<&str> = tail.into_iter().rev().collect();
    ImageError::ToolFailed {
        tool: tool.to_owned(),
        log: tail.join("\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_classify_names_the_unknown_package() {
        let log = "I: running apt-get update...\nE: Unable to locate package no-such-pkg\nE: apt-get failed";
        assert!(
            matches!(classify("mmdebstrap", log), ImageError::UnknownPackage(p) if p == "no-such-pkg")
        );
    }

    #[test]
    fn test_classify_reports_no_space() {
        let log = "dpkg: error processing archive x.deb: cannot copy extracted data: No space left on device";
        assert!(matches!(
            classify("mmdebstrap", log),
            ImageError::NoSpace(_)
        ));
    }

    #[test]
    fn test_classify_keeps_the_tail_of_other_failures() {
        let err = classify("mkfs.ext4", "one\ntwo\nbad things");
        assert!(err.to_string().contains("bad things"), "{err}");
    }

    #[test]
    fn test_missing_tools_name_their_package() {
        let err = find(Tool {
            name: "vmfarm-no-such-tool",
            package: "vmfarm-pkg",
        })
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "vmfarm-no-such-tool is not installed: install the Debian package vmfarm-pkg"
        );
    }
}
