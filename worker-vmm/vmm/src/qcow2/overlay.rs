//! Copy-on-write qcow2 overlays over a qcow2 base, written directly (no qemu-img): a v3
//! header naming the base and its format, an empty L1 table and one refcount block. Its
//! size depends only on the base's virtual size through the L1 table (8 bytes per 512 MiB).
//! Both backends boot a guest from such an overlay: QEMU, and vmfarm's own engine
//! ([`super::top`]).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::header::{Header, HeaderError, MAX_BACKING_NAME};

const CLUSTER_BITS: u32 = 16;
const CLUSTER_SIZE: u64 = 1 << CLUSTER_BITS;
const REFCOUNT_ORDER: u32 = 4; // 16-bit refcounts
const HEADER_LENGTH: u32 = 112;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_END: u32 = 0;

/// Why an overlay cannot be created.
#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    #[error("cannot make the base path {path} absolute")]
    BasePath {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the base path {0} is longer than qcow2 allows")]
    BaseNameTooLong(PathBuf),
    #[error("cannot read the base {path}")]
    ReadBase {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the base {path} has a bad qcow2 header")]
    BaseHeader {
        path: PathBuf,
        #[source]
        source: HeaderError,
    },
    #[error("the base {0} is not a qcow2 image")]
    BaseNotQcow2(PathBuf),
    #[error("the base's virtual size {0} is too large")]
    TooLarge(u64),
    #[error("cannot write the overlay {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Create `overlay` (which must not exist) as a copy-on-write qcow2 image over the qcow2 image
/// `base`, with the base's virtual size; writes go to the overlay, the base is never written.
/// The overlay names the base by its absolute path (a relative `base` is taken from the
/// current directory).
pub fn create_overlay(base: &Path, overlay: &Path) -> Result<(), OverlayError> {
    let base = std::path::absolute(base).map_err(|source| OverlayError::BasePath {
        path: base.to_owned(),
        source,
    })?;
    let base_name = base.as_os_str().as_encoded_bytes();
    if base_name.len() > MAX_BACKING_NAME {
        return Err(OverlayError::BaseNameTooLong(base));
    }
    let size = base_virtual_size(&base)?;
    let image = layout(size, base_name)?;
    let write_err = |source| OverlayError::Write {
        path: overlay.to_owned(),
        source,
    };
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(overlay)
        .map_err(write_err)?;
    file.set_len(image.file_len).map_err(write_err)?;
    file.write_all(&image.cluster0).map_err(write_err)?;
    file.write_all_at(&image.refcount_table, CLUSTER_SIZE)
        .map_err(write_err)?;
    file.write_all_at(&image.refcount_block, 2 * CLUSTER_SIZE)
        .map_err(write_err)?;
    file.sync_all().map_err(write_err)
}

fn base_virtual_size(base: &Path) -> Result<u64, OverlayError> {
    let file = File::open(base).map_err(|source| OverlayError::ReadBase {
        path: base.to_owned(),
        source,
    })?;
    match Header::read(&file) {
        Ok(Some(header)) => Ok(header.size),
        Ok(None) => Err(OverlayError::BaseNotQcow2(base.to_owned())),
        Err(source) => Err(OverlayError::BaseHeader {
            path: base.to_owned(),
            source,
        }),
    }
}

struct Image {
    cluster0: Vec<u8>,
    refcount_table: Vec<u8>,
    refcount_block: Vec<u8>,
    file_len: u64,
}

/// Cluster 0: header, extensions, backing name; 1: refcount table; 2: refcount block;
/// 3..: the L1 table, all zero (every cluster reads from the base).
fn layout(size: u64, base_name: &[u8]) -> Result<Image, OverlayError> {
    let l2_coverage = CLUSTER_SIZE * (CLUSTER_SIZE / 8);
    let l1_entries = size.div_ceil(l2_coverage);
    let l1_clusters = (l1_entries * 8).div_ceil(CLUSTER_SIZE).max(1);
    let clusters = 3 + l1_clusters;
    // One refcount block of 16-bit entries covers 32768 clusters (2 GiB of overlay file).
    let l1_size = u32::try_from(l1_entries).map_err(|_| OverlayError::TooLarge(size))?;
    if clusters > CLUSTER_SIZE / 2 {
        return Err(OverlayError::TooLarge(size));
    }

    let format = b"qcow2";
    // header extension: backing format, padded to 8 bytes; then the end marker.
    let backing_offset = u64::from(HEADER_LENGTH) + 8 + 8 + 8;
    let header = Header {
        version: 3,
        backing_file_offset: backing_offset,
        // At most MAX_BACKING_NAME (checked by the caller).
        backing_file_size: base_name.len() as u32,
        cluster_bits: CLUSTER_BITS,
        size,
        crypt_method: 0,
        l1_size,
        l1_table_offset: 3 * CLUSTER_SIZE,
        refcount_table_offset: CLUSTER_SIZE,
        refcount_table_clusters: 1,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible_features: 0,
        compatible_features: 0,
        autoclear_features: 0,
        refcount_order: REFCOUNT_ORDER,
        header_length: HEADER_LENGTH,
    };
    let mut h = header.to_bytes();
    h.extend_from_slice(&EXT_BACKING_FORMAT.to_be_bytes());
    h.extend_from_slice(&(format.len() as u32).to_be_bytes());
    h.extend_from_slice(format);
    h.resize(h.len().next_multiple_of(8), 0);
    h.extend_from_slice(&EXT_END.to_be_bytes());
    h.extend_from_slice(&0u32.to_be_bytes());
    debug_assert_eq!(h.len() as u64, backing_offset);
    h.extend_from_slice(base_name);

    let mut refcount_table = vec![0u8; CLUSTER_SIZE as usize];
    refcount_table[..8].copy_from_slice(&(2 * CLUSTER_SIZE).to_be_bytes());
    let mut refcount_block = vec![0u8; CLUSTER_SIZE as usize];
    for cluster in 0..clusters as usize {
        refcount_block[2 * cluster..2 * cluster + 2].copy_from_slice(&1u16.to_be_bytes());
    }
    Ok(Image {
        cluster0: h,
        refcount_table,
        refcount_block,
        file_len: clusters * CLUSTER_SIZE,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qcow2::test_utils::{checked_contents, qcow2_from, qemu_img};
    use crate::test_utils::{TempDir, pattern};

    fn info(path: &Path) -> serde_json::Value {
        serde_json::from_str(&qemu_img(&[
            "info",
            "--output=json",
            path.to_str().unwrap(),
        ]))
        .unwrap()
    }

    #[test]
    fn test_overlay_matches_qemu_img_reference() {
        let dir = TempDir::new("overlay");
        let base = dir.path().join("base.qcow2");
        let b = base.to_str().unwrap();
        qemu_img(&["create", "-q", "-f", "qcow2", b, "3G"]);
        let ours = dir.path().join("ours.qcow2");
        create_overlay(&base, &ours).unwrap();
        let reference = dir.path().join("ref.qcow2");
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            b,
            "-F",
            "qcow2",
            reference.to_str().unwrap(),
        ]);
        let (ours_info, ref_info) = (info(&ours), info(&reference));
        for key in [
            "format",
            "virtual-size",
            "cluster-size",
            "backing-filename",
            "backing-filename-format",
            "full-backing-filename",
        ] {
            assert_eq!(ours_info[key], ref_info[key], "{key}");
        }
        assert_eq!(ours_info["format-specific"]["data"]["compat"], "1.1");
        assert_eq!(ours_info["format-specific"]["data"]["refcount-bits"], 16);
        qemu_img(&["check", ours.to_str().unwrap()]);
    }

    #[test]
    fn test_overlay_size_does_not_grow_with_the_base() {
        let dir = TempDir::new("overlay");
        let base = dir.path().join("huge.qcow2");
        qemu_img(&["create", "-q", "-f", "qcow2", base.to_str().unwrap(), "4T"]);
        let ours = dir.path().join("ours.qcow2");
        let started = std::time::Instant::now();
        create_overlay(&base, &ours).unwrap();
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        assert_eq!(std::fs::metadata(&ours).unwrap().len(), 4 * CLUSTER_SIZE);
        assert_eq!(info(&ours)["virtual-size"], 4u64 << 40);
        qemu_img(&["check", ours.to_str().unwrap()]);
    }

    #[test]
    fn test_overlay_reads_back_through_our_header_and_qemu_img_check() {
        let dir = TempDir::new("overlay");
        let base = dir.path().join("base.qcow2");
        qemu_img(&["create", "-q", "-f", "qcow2", base.to_str().unwrap(), "5G"]);
        let overlay = dir.path().join("top.qcow2");
        create_overlay(&base, &overlay).unwrap();
        qemu_img(&["check", overlay.to_str().unwrap()]);
        let file = File::open(&overlay).unwrap();
        let header = Header::read(&file).unwrap().expect("a qcow2 header");
        assert_eq!(
            (header.version, header.size, header.l1_size),
            (3, 5 << 30, 10)
        );
        assert_eq!(
            (
                header.cluster_bits,
                header.refcount_order,
                header.header_length
            ),
            (CLUSTER_BITS, REFCOUNT_ORDER, HEADER_LENGTH)
        );
        assert_eq!(
            header.backing_file(&file).unwrap().as_deref(),
            base.to_str()
        );
    }

    #[test]
    fn test_overlay_takes_qemus_writes_and_keeps_base() {
        // The qemu backend's guests write to these overlays through QEMU's block layer.
        let dir = TempDir::new("overlay");
        let base = qcow2_from(dir.path(), "base.qcow2", &pattern(2 << 20, 2));
        let before = std::fs::read(&base).unwrap();
        let overlay = dir.path().join("top.qcow2");
        create_overlay(&base, &overlay).unwrap();
        let out = std::process::Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", "write -P 0x5a 65024 70k"])
            .arg(&overlay)
            .output()
            .expect("qemu-io runs");
        assert!(out.status.success(), "qemu-io: {out:?}");
        assert_eq!(std::fs::read(&base).unwrap(), before);
        let mut expect = pattern(2 << 20, 2);
        expect[65024..65024 + (70 << 10)].fill(0x5a);
        assert!(checked_contents(dir.path(), &overlay) == expect);
    }

    #[test]
    fn test_overlay_written_through_qcow2_rs_keeps_base() {
        let dir = TempDir::new("overlay");
        let base = qcow2_from(dir.path(), "base.qcow2", &pattern(2 << 20, 1));
        let before = std::fs::read(&base).unwrap();
        let overlay = dir.path().join("top.qcow2");
        create_overlay(&base, &overlay).unwrap();
        {
            use qcow2_rs::dev::Qcow2DevParams;
            use qcow2_rs::utils::qcow2_setup_dev_tokio;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let params = Qcow2DevParams::new(9, None, None, false, false);
                let dev = qcow2_setup_dev_tokio(&overlay, &params).await.unwrap();
                dev.write_at(&pattern(128 << 10, 50), 1 << 20)
                    .await
                    .unwrap();
                dev.flush_meta().await.unwrap();
                let mut buf = vec![0u8; 4096];
                dev.read_at(&mut buf, 0).await.unwrap();
                assert_eq!(buf, pattern(2 << 20, 1)[..4096]);
            });
        }
        assert_eq!(std::fs::read(&base).unwrap(), before);
        let image = checked_contents(dir.path(), &overlay);
        let mut expect = pattern(2 << 20, 1);
        expect[1 << 20..(1 << 20) + (128 << 10)].copy_from_slice(&pattern(128 << 10, 50));
        assert!(image == expect);
    }

    #[test]
    fn test_overlay_over_a_relative_base_names_it_absolutely() {
        let dir = TempDir::new("overlay");
        let base = dir.path().join("base.qcow2");
        qemu_img(&["create", "-q", "-f", "qcow2", base.to_str().unwrap(), "1M"]);
        // The same base, reached from the current directory by a relative path.
        let cwd = std::env::current_dir().unwrap();
        let up = "../".repeat(cwd.components().count());
        let relative = PathBuf::from(up).join(base.strip_prefix("/").unwrap());
        assert!(relative.is_relative());
        let top = dir.path().join("top.qcow2");
        create_overlay(&relative, &top).unwrap();
        let file = File::open(&top).unwrap();
        let header = Header::read(&file).unwrap().expect("a qcow2 header");
        let named = PathBuf::from(header.backing_file(&file).unwrap().unwrap());
        assert!(named.is_absolute(), "{}", named.display());
        assert_eq!(named, std::path::absolute(&relative).unwrap());
        qemu_img(&["check", top.to_str().unwrap()]);
    }

    #[test]
    fn test_overlay_refuses_raw_or_missing_base() {
        let dir = TempDir::new("overlay");
        let raw = dir.path().join("base.raw");
        std::fs::write(&raw, [0u8; 4096]).unwrap();
        let top = dir.path().join("top.qcow2");
        assert!(matches!(
            create_overlay(&raw, &top),
            Err(OverlayError::BaseNotQcow2(_))
        ));
        assert!(matches!(
            create_overlay(&dir.path().join("missing.qcow2"), &top),
            Err(OverlayError::ReadBase { .. })
        ));
        assert!(!top.exists());
    }
}
