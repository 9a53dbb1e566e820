//! Cache disks (a manifest's `[[caches]]`): where a cache's paths land in the guest, and the word
//! of the job's identity line that tells the agent to mount a cache disk there.
//!
//! A manifest writes a path as `~/REST` (under the build user's home) or `REST` (under the build
//! directory); [`guest_path`] turns it into the absolute path in the guest, the one rule the
//! manifest's check, the worker and the agent share. The agent mounts the disk whose virtio
//! serial is [`CacheMount::serial`] and bind-mounts a folder of it on each path.

use crate::guest::{BUILD_DIR, CmdlineError, FARM_DIR, HOME, SECRETS_DIR};
use std::fmt;

/// Longest cache path as written in a manifest, in bytes.
pub const MAX_PATH_BYTES: usize = 120;

/// Why a cache path was refused; the message follows "cache path `PATH`".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CachePathError {
    #[error(
        "is empty: write `~/.cache/pip` (under the home) or `target` (under the build directory)"
    )]
    Empty,
    #[error("is {0} bytes; the limit is {MAX_PATH_BYTES}")]
    TooLong(usize),
    #[error(
        "is absolute: write it under the build user's home as `~/{0}`, or relative to the build directory"
    )]
    Absolute(String),
    #[error("is the whole home: name a folder in it, like `~/.cache/pip`")]
    WholeHome,
    #[error("has a `..`, `.` or empty component: write it plainly, like `~/.cache/pip`")]
    Component,
    #[error(
        "may only hold letters, digits, '.', '_', '-', '+', '@' and '/' (the agent mounts it as written)"
    )]
    Characters,
    #[error(
        "is the build directory itself, where the sources land: name a folder in it, like `target`"
    )]
    BuildDir,
    #[error("is among the farm's own files ({0}): choose another folder")]
    FarmFiles(&'static str),
    #[error("is not under the build user's home ({HOME})")]
    NotUnderHome,
}

/// The absolute guest path of a cache path as a manifest writes it.
pub fn guest_path(written: &str) -> Result<String, CachePathError> {
    if written.is_empty() {
        return Err(CachePathError::Empty);
    }
    if written.len() > MAX_PATH_BYTES {
        return Err(CachePathError::TooLong(written.len()));
    }
    if let Some(rest) = written.strip_prefix('/') {
        return Err(CachePathError::Absolute(
            rest.strip_prefix("home/build/").unwrap_or(rest).to_owned(),
        ));
    }
    let (base, rest) = match written.strip_prefix('~') {
        Some("") | Some("/") => return Err(CachePathError::WholeHome),
        Some(rest) => match rest.strip_prefix('/') {
            Some(rest) => (HOME, rest),
            // `~user/...`: another user's home.
            None => return Err(CachePathError::Characters),
        },
        None => (BUILD_DIR, written),
    };
    let path = format!("{base}/{}", rest.trim_end_matches('/'));
    check_guest_path(&path)?;
    Ok(path)
}

/// Checks an absolute guest path of a cache: under the home, plain components of the allowed
/// characters, not the build directory and not among the farm's own files.
pub fn check_guest_path(path: &str) -> Result<(), CachePathError> {
    let rest = path
        .strip_prefix(HOME)
        .and_then(|r| r.strip_prefix('/'))
        .ok_or(CachePathError::NotUnderHome)?;
    if rest
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err(CachePathError::Component);
    }
    let allowed = |c: char| c.is_ascii_alphanumeric() || "._-+@/".contains(c);
    if !rest.chars().all(allowed) {
        return Err(CachePathError::Characters);
    }
    if path == BUILD_DIR {
        return Err(CachePathError::BuildDir);
    }
    for own in [FARM_DIR, SECRETS_DIR] {
        if overlap(path, own) {
            return Err(CachePathError::FarmFiles(own));
        }
    }
    Ok(())
}

/// Whether one of two absolute paths is the other or inside it.
pub fn overlap(a: &str, b: &str) -> bool {
    let inside = |x: &str, y: &str| x.strip_prefix(y).is_some_and(|r| r.starts_with('/'));
    a == b || inside(a, b) || inside(b, a)
}

/// One cache disk of a job, as the identity line hands it to the agent: `cache=SERIAL:P1,P2`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheMount {
    /// The disk's virtio-blk serial ([`CacheMount::serial`]).
    pub serial: String,
    /// Absolute guest paths ([`check_guest_path`]), never empty.
    pub paths: Vec<String>,
}

impl CacheMount {
    /// Most cache disks of one job.
    pub const MAX: usize = 4;
    /// Most paths of one cache.
    pub const MAX_PATHS: usize = 8;

    /// The serial (and, for the integrated VMM, which reports the file's name, the file name in
    /// the guest's folder) of the job's `index`th cache disk.
    pub fn serial(index: usize) -> String {
        format!("cache-{index}.qcow2")
    }

    /// Parses the value of a `cache=` word.
    pub fn parse(value: &str) -> Result<CacheMount, CmdlineError> {
        let bad = || CmdlineError::BadCache(value.chars().take(200).collect());
        let (serial, paths) = value.split_once(':').ok_or_else(bad)?;
        let index = serial
            .strip_prefix("cache-")
            .and_then(|s| s.strip_suffix(".qcow2"))
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(bad)?;
        if index >= Self::MAX || serial != Self::serial(index) {
            return Err(bad());
        }
        let paths: Vec<String> = paths.split(',').map(str::to_owned).collect();
        if paths.len() > Self::MAX_PATHS || paths.iter().any(|p| check_guest_path(p).is_err()) {
            return Err(bad());
        }
        Ok(CacheMount {
            serial: serial.to_owned(),
            paths,
        })
    }
}

impl fmt::Display for CacheMount {
    /// The value of the `cache=` word.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.serial, self.paths.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_paths_land_under_the_home_or_the_build_directory() {
        assert_eq!(
            guest_path("~/.cache/pip").unwrap(),
            "/home/build/.cache/pip"
        );
        assert_eq!(guest_path("target/").unwrap(), "/home/build/work/target");
        assert_eq!(
            guest_path("~/work/target").unwrap(),
            "/home/build/work/target"
        );
        for (written, error) in [
            ("", CachePathError::Empty),
            ("~", CachePathError::WholeHome),
            ("~/", CachePathError::WholeHome),
            ("~root/x", CachePathError::Characters),
            ("/home/build/x", CachePathError::Absolute("x".into())),
            ("/var/cache", CachePathError::Absolute("var/cache".into())),
            ("~/a/../b", CachePathError::Component),
            ("a//b", CachePathError::Component),
            ("my dir", CachePathError::Characters),
            ("a,b", CachePathError::Characters),
            ("~/work", CachePathError::BuildDir),
            ("~/.secrets/x", CachePathError::FarmFiles(SECRETS_DIR)),
            ("~/.vmfarm", CachePathError::FarmFiles(FARM_DIR)),
        ] {
            assert_eq!(guest_path(written), Err(error), "{written:?}");
        }
        assert_eq!(
            guest_path(&"a".repeat(MAX_PATH_BYTES + 1)),
            Err(CachePathError::TooLong(MAX_PATH_BYTES + 1))
        );
    }

    #[test]
    fn test_overlap() {
        assert!(overlap("/home/build/a", "/home/build/a"));
        assert!(overlap("/home/build/a", "/home/build/a/b"));
        assert!(overlap("/home/build/a/b", "/home/build/a"));
        assert!(!overlap("/home/build/a", "/home/build/ab"));
    }

    #[test]
    fn test_mount_words_round_trip_and_refuse_what_the_agent_must_not_mount() {
        let mount = CacheMount {
            serial: CacheMount::serial(1),
            paths: vec!["/home/build/.cache/pip".into(), "/home/build/work/t".into()],
        };
        let word = mount.to_string();
        assert_eq!(
            word,
            "cache-1.qcow2:/home/build/.cache/pip,/home/build/work/t"
        );
        assert_eq!(CacheMount::parse(&word).unwrap(), mount);
        for bad in [
            "cache-1.qcow2",
            "cache-9.qcow2:/home/build/x",
            "cache-01.qcow2:/home/build/x",
            "vda:/home/build/x",
            "cache-0.qcow2:/etc",
            "cache-0.qcow2:/home/build/../../etc",
            "cache-0.qcow2:/home/build/x,",
            "cache-0.qcow2:/home/build/.secrets",
        ] {
            assert!(CacheMount::parse(bad).is_err(), "{bad}");
        }
    }
}
