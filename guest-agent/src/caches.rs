//! The job's cache disks (the identity's `cache=` words): each disk, found by its virtio serial,
//! is mounted under /run/vmfarm-caches, and a folder of it is bind-mounted on each of its paths,
//! owned by the build user. A path's folder on the disk is the path itself below the disk's root,
//! so a cache keeps each path's files across jobs whatever the order of its `paths`.
//!
//! The disk holds what earlier jobs of the same owner wrote: nothing on it is followed (a
//! symbolic link where a folder is expected fails the mount), and it is mounted nosuid, nodev.

use crate::sys;
use crate::user::{GID, UID};
use anyhow::{Context, Result, bail};
use std::os::unix::fs::DirBuilderExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;
use vmfarm_proto::cache::CacheMount;

const MOUNTS: &str = "/run/vmfarm-caches";

/// Mounts every cache of the job on its paths.
pub fn mount_all(caches: &[CacheMount]) -> Result<()> {
    for cache in caches {
        mount(cache).with_context(|| format!("mounting the cache disk {}", cache.serial))?;
    }
    Ok(())
}

fn mount(cache: &CacheMount) -> Result<()> {
    let device = device_of(&cache.serial)?;
    let root = Path::new(MOUNTS).join(&cache.serial);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&root)?;
    sys::mount(
        &device.display().to_string(),
        &root,
        "ext4",
        libc::MS_NOSUID | libc::MS_NODEV,
        "",
    )
    .with_context(|| format!("mounting {} (ext4)", device.display()))?;
    for path in &cache.paths {
        let on_disk = folder(&root, path.trim_start_matches('/'))
            .with_context(|| format!("the disk's folder for {path}"))?;
        let target = folder(Path::new("/"), path.trim_start_matches('/'))
            .with_context(|| format!("the folder {path}"))?;
        sys::mount(
            &on_disk.display().to_string(),
            &target,
            "",
            libc::MS_BIND,
            "",
        )
        .with_context(|| format!("mounting the cache on {path}"))?;
    }
    Ok(())
}

/// The block device whose virtio serial is `serial`; the disk may take a moment to appear.
fn device_of(serial: &str) -> Result<PathBuf> {
    for _ in 0..100 {
        for entry in std::fs::read_dir("/sys/block")?.flatten() {
            let named = std::fs::read_to_string(entry.path().join("serial"));
            if named.is_ok_and(|s| s.trim_end_matches(['\n', '\0']) == serial) {
                return Ok(Path::new("/dev").join(entry.file_name()));
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("no disk has the serial {serial}")
}

/// `base`/`relative`, each missing folder made and given to the build user; a component that is
/// anything but a folder (a symbolic link above all) is refused.
fn folder(base: &Path, relative: &str) -> Result<PathBuf> {
    let mut at = base.to_path_buf();
    for part in relative.split('/') {
        at.push(part);
        match std::fs::symlink_metadata(&at) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => bail!("{} is not a folder", at.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::DirBuilder::new().mode(0o755).create(&at)?;
                std::os::unix::fs::lchown(&at, Some(UID), Some(GID))?;
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(at)
}
