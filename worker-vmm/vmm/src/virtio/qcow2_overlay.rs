//! Copy-on-write qcow2 overlays over a qcow2 base, written directly (no qemu-img): a v3
//! header naming the base and its format, an empty L1 table and one refcount block. Its
//! size depends only on the base's virtual size through the L1 table (8 bytes per 512 MiB).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 4] = b"QFI\xfb";
const CLUSTER_BITS: u32 = 16;
const CLUSTER_SIZE: u64 = 1 << CLUSTER_BITS;
const REFCOUNT_ORDER: u32 = 4; // 16-bit refcounts
const HEADER_LENGTH: u32 = 112;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_END: u32 = 0;

/// Why an overlay cannot be created.
#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    #[error("the base {0} must be an absolute path")]
    RelativeBase(PathBuf),
    #[error("the base path {0} is longer than qcow2 allows")]
    BaseNameTooLong(PathBuf),
    #[error("cannot read the base {path}")]
    ReadBase {
        path: PathBuf,
        #[source]
        source: std::io::Error,
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
pub fn create_overlay(base: &Path, overlay: &Path) -> Result<(), OverlayError> {
    if !base.is_absolute() {
        return Err(OverlayError::RelativeBase(base.to_owned()));
    }
    let base_name = base.as_os_str().as_encoded_bytes();
    if base_name.len() > 1023 {
        return Err(OverlayError::BaseNameTooLong(base.to_owned()));
    }
    let size = base_virtual_size(base)?;
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
    let read_err = |source| OverlayError::ReadBase {
        path: base.to_owned(),
        source,
    };
    let file = File::open(base).map_err(read_err)?;
    let mut head = [0u8; 32];
    file.read_exact_at(&mut head, 0)
        .map_err(|_| OverlayError::BaseNotQcow2(base.to_owned()))?;
    let version = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
    if &head[..4] != MAGIC || !(2..=3).contains(&version) {
        return Err(OverlayError::BaseNotQcow2(base.to_owned()));
    }
    let mut size = [0u8; 8];
    size.copy_from_slice(&head[24..32]);
    Ok(u64::from_be_bytes(size))
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
    if l1_entries > u64::from(u32::MAX) || clusters > CLUSTER_SIZE / 2 {
        return Err(OverlayError::TooLarge(size));
    }

    let mut h = Vec::with_capacity(CLUSTER_SIZE as usize);
    let ext_start = u64::from(HEADER_LENGTH);
    let format = b"qcow2";
    // header extension: backing format, padded to 8 bytes; then the end marker.
    let backing_offset = ext_start + 8 + 8 + 8;
    h.extend_from_slice(MAGIC);
    h.extend_from_slice(&3u32.to_be_bytes()); // version
    h.extend_from_slice(&backing_offset.to_be_bytes());
    h.extend_from_slice(&(base_name.len() as u32).to_be_bytes());
    h.extend_from_slice(&CLUSTER_BITS.to_be_bytes());
    h.extend_from_slice(&size.to_be_bytes());
    h.extend_from_slice(&0u32.to_be_bytes()); // crypt_method
    h.extend_from_slice(&(l1_entries as u32).to_be_bytes());
    h.extend_from_slice(&(3 * CLUSTER_SIZE).to_be_bytes()); // l1_table_offset
    h.extend_from_slice(&CLUSTER_SIZE.to_be_bytes()); // refcount_table_offset
    h.extend_from_slice(&1u32.to_be_bytes()); // refcount_table_clusters
    h.extend_from_slice(&0u32.to_be_bytes()); // nb_snapshots
    h.extend_from_slice(&0u64.to_be_bytes()); // snapshots_offset
    h.extend_from_slice(&0u64.to_be_bytes()); // incompatible_features
    h.extend_from_slice(&0u64.to_be_bytes()); // compatible_features
    h.extend_from_slice(&0u64.to_be_bytes()); // autoclear_features
    h.extend_from_slice(&REFCOUNT_ORDER.to_be_bytes());
    h.extend_from_slice(&HEADER_LENGTH.to_be_bytes());
    h.push(0); // compression_type: zlib
    h.resize(HEADER_LENGTH as usize, 0);
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
    use crate::virtio::test_utils::{TempDir, checked_contents, pattern, qcow2_from, qemu_img};

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
    fn test_overlay_refuses_relative_or_raw_base() {
        let dir = TempDir::new("overlay");
        let raw = dir.path().join("base.raw");
        std::fs::write(&raw, [0u8; 4096]).unwrap();
        let top = dir.path().join("top.qcow2");
        assert!(matches!(
            create_overlay(Path::new("base.qcow2"), &top),
            Err(OverlayError::RelativeBase(_))
        ));
        assert!(matches!(
            create_overlay(&raw, &top),
            Err(OverlayError::BaseNotQcow2(_))
        ));
        assert!(!top.exists());
    }
}
