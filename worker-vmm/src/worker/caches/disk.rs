//! A cache's disks, made on the host with the image tools: a new empty one (ext4, as `mkfs.ext4`
//! makes it, in a qcow2 file), and a chain copied into one whole disk.

use crate::images::tools::{self, MKFS_EXT4, QEMU_IMG};
use anyhow::{Context as _, Result};
use std::ffi::OsStr;
use std::path::Path;
use vmfarm_proto::units::ByteSize;

/// The label of a cache's file system.
const LABEL: &str = "vmfarm-cache";

/// Makes `file` (a qcow2) an empty ext4 file system of `size`: made beside it, then renamed.
pub(super) fn make_empty(file: &Path, size: ByteSize) -> Result<()> {
    let raw = file.with_extension("raw.tmp");
    let made = (|| {
        std::fs::File::create(&raw)?.set_len(size.0)?;
        let log = file.with_extension("log.tmp");
        // No blocks kept for root: the build user fills it.
        let args: [&OsStr; 6] = [
            "-q".as_ref(),
            "-F".as_ref(),
            "-m0".as_ref(),
            "-L".as_ref(),
            LABEL.as_ref(),
            raw.as_os_str(),
        ];
        tools::run(MKFS_EXT4, &args, &log)?;
        let _ = std::fs::remove_file(&log);
        convert(&raw, "raw", file)
    })();
    let _ = std::fs::remove_file(&raw);
    made.with_context(|| format!("making the empty cache disk {}", file.display()))
}

/// Copies the chain under `top` into the one whole disk `whole`.
pub(super) fn flatten(top: &Path, whole: &Path) -> Result<()> {
    convert(top, "qcow2", whole).with_context(|| format!("copying {} into one disk", top.display()))
}

/// `qemu-img convert` of `from` (of format `format`, its chain read through) to the qcow2 `to`:
/// written beside it, synced, renamed into place; zeros stay unallocated.
fn convert(from: &Path, format: &str, to: &Path) -> Result<()> {
    let tmp = to.with_extension("qcow2.tmp");
    let log = to.with_extension("convert.log.tmp");
    let args: [&OsStr; 7] = [
        "convert".as_ref(),
        "-f".as_ref(),
        format.as_ref(),
        "-O".as_ref(),
        "qcow2".as_ref(),
        from.as_os_str(),
        tmp.as_os_str(),
    ];
    tools::run(QEMU_IMG, &args, &log)?;
    let _ = std::fs::remove_file(&log);
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, to)?;
    Ok(())
}
