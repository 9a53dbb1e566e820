//! The qcow2 header (QEMU's docs/interop/qcow2.txt), read and written here alone: every other
//! part of vmfarm that looks at a qcow2 image's header goes through [`Header`].

use std::fs::File;
use std::os::unix::fs::FileExt;

/// The first four bytes of every qcow2 image.
pub const MAGIC: [u8; 4] = *b"QFI\xfb";
/// The longest backing file name qcow2 allows.
pub const MAX_BACKING_NAME: usize = 1023;
/// The length of a version 2 header.
const V2_LENGTH: usize = 72;
/// The length of a version 3 header's fields up to and with `header_length`.
const V3_LENGTH: usize = 104;

/// Why a qcow2 header cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    #[error("cannot read the qcow2 header")]
    Read(#[source] std::io::Error),
    #[error("malformed qcow2 header: {0}")]
    Malformed(&'static str),
}

/// The fields of a qcow2 header, by the specification's names. A version 2 header has the
/// fields from `incompatible_features` on implicitly: zero features, 16-bit refcounts and a
/// 72-byte header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    /// Where the backing file's name lies in the image (0: no backing file).
    pub backing_file_offset: u64,
    /// The length of the backing file's name in bytes.
    pub backing_file_size: u32,
    pub cluster_bits: u32,
    /// The virtual size in bytes.
    pub size: u64,
    pub crypt_method: u32,
    /// The number of entries of the L1 table.
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible_features: u64,
    pub compatible_features: u64,
    pub autoclear_features: u64,
    /// Refcounts are `1 << refcount_order` bits wide.
    pub refcount_order: u32,
    /// Where the header extensions start.
    pub header_length: u32,
}

fn be32(bytes: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&bytes[at..at + 4]);
    u32::from_be_bytes(b)
}

fn be64(bytes: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&bytes[at..at + 8]);
    u64::from_be_bytes(b)
}

impl Header {
    /// A version 3 header of an image of `size` bytes with 64 KiB clusters and no tables yet:
    /// the start of the base images that tests and fuzz seeds make.
    #[cfg(any(test, feature = "fuzzing"))]
    pub fn empty_v3(size: u64) -> Header {
        Header {
            version: 3,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits: 16,
            size,
            crypt_method: 0,
            l1_size: 1,
            l1_table_offset: 0,
            refcount_table_offset: 0,
            refcount_table_clusters: 0,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: 104,
        }
    }

    /// The header of the image `file`; `None` when the file does not start with the qcow2
    /// magic (a raw image, for instance).
    pub fn read(file: &File) -> Result<Option<Header>, HeaderError> {
        let mut head = [0u8; V3_LENGTH];
        let mut n = 0;
        while n < head.len() {
            match file.read_at(&mut head[n..], n as u64) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(HeaderError::Read(e)),
            }
        }
        if n < MAGIC.len() || head[..MAGIC.len()] != MAGIC {
            return Ok(None);
        }
        let version = be32(&head, 4);
        let length = match version {
            2 => V2_LENGTH,
            3 => V3_LENGTH,
            _ => return Err(HeaderError::Malformed("its version is neither 2 nor 3")),
        };
        if n < length {
            return Err(HeaderError::Malformed("it ends early"));
        }
        let v3 = version == 3;
        Ok(Some(Header {
            version,
            backing_file_offset: be64(&head, 8),
            backing_file_size: be32(&head, 16),
            cluster_bits: be32(&head, 20),
            size: be64(&head, 24),
            crypt_method: be32(&head, 32),
            l1_size: be32(&head, 36),
            l1_table_offset: be64(&head, 40),
            refcount_table_offset: be64(&head, 48),
            refcount_table_clusters: be32(&head, 56),
            nb_snapshots: be32(&head, 60),
            snapshots_offset: be64(&head, 64),
            incompatible_features: if v3 { be64(&head, 72) } else { 0 },
            compatible_features: if v3 { be64(&head, 80) } else { 0 },
            autoclear_features: if v3 { be64(&head, 88) } else { 0 },
            refcount_order: if v3 { be32(&head, 96) } else { 4 },
            header_length: if v3 {
                be32(&head, 100)
            } else {
                V2_LENGTH as u32
            },
        }))
    }

    /// The backing file's name, read from `file` (the image this header came from), if the
    /// header names one.
    pub fn backing_file(&self, file: &File) -> Result<Option<String>, HeaderError> {
        if self.backing_file_offset == 0 || self.backing_file_size == 0 {
            return Ok(None);
        }
        let len = self.backing_file_size as usize;
        if len > MAX_BACKING_NAME {
            return Err(HeaderError::Malformed("its backing file name is too long"));
        }
        let mut name = vec![0u8; len];
        file.read_exact_at(&mut name, self.backing_file_offset)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::UnexpectedEof => {
                    HeaderError::Malformed("its backing file name lies past the end of the image")
                }
                _ => HeaderError::Read(e),
            })?;
        String::from_utf8(name)
            .map(Some)
            .map_err(|_| HeaderError::Malformed("its backing file name is not UTF-8"))
    }

    /// The header as a version 3 image holds it: its fields, then zeros up to
    /// `header_length` (a compression type byte of 0, zlib, when that reaches past them).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut h = Vec::with_capacity((self.header_length as usize).max(V3_LENGTH));
        h.extend_from_slice(&MAGIC);
        h.extend_from_slice(&self.version.to_be_bytes());
        h.extend_from_slice(&self.backing_file_offset.to_be_bytes());
        h.extend_from_slice(&self.backing_file_size.to_be_bytes());
        h.extend_from_slice(&self.cluster_bits.to_be_bytes());
        h.extend_from_slice(&self.size.to_be_bytes());
        h.extend_from_slice(&self.crypt_method.to_be_bytes());
        h.extend_from_slice(&self.l1_size.to_be_bytes());
        h.extend_from_slice(&self.l1_table_offset.to_be_bytes());
        h.extend_from_slice(&self.refcount_table_offset.to_be_bytes());
        h.extend_from_slice(&self.refcount_table_clusters.to_be_bytes());
        h.extend_from_slice(&self.nb_snapshots.to_be_bytes());
        h.extend_from_slice(&self.snapshots_offset.to_be_bytes());
        h.extend_from_slice(&self.incompatible_features.to_be_bytes());
        h.extend_from_slice(&self.compatible_features.to_be_bytes());
        h.extend_from_slice(&self.autoclear_features.to_be_bytes());
        h.extend_from_slice(&self.refcount_order.to_be_bytes());
        h.extend_from_slice(&self.header_length.to_be_bytes());
        debug_assert_eq!(h.len(), V3_LENGTH);
        h.resize(h.len().max(self.header_length as usize), 0);
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qcow2::test_utils::qemu_img;
    use crate::test_utils::TempDir;

    fn read(path: &std::path::Path) -> Result<Option<Header>, HeaderError> {
        Header::read(&File::open(path).unwrap())
    }

    /// A version 3 header of a 1 MiB image with 64 KiB clusters, without tables.
    fn v3() -> Header {
        Header::empty_v3(1 << 20)
    }

    #[test]
    fn test_reads_what_qemu_img_writes() {
        let dir = TempDir::new("header");
        let base = dir.path().join("base.qcow2");
        let b = base.to_str().unwrap();
        qemu_img(&["create", "-q", "-f", "qcow2", b, "3G"]);
        let top = dir.path().join("top.qcow2");
        let t = top.to_str().unwrap();
        qemu_img(&["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", b, t]);
        for (path, backing) in [(&base, None), (&top, Some(b.to_owned()))] {
            let file = File::open(path).unwrap();
            let header = Header::read(&file).unwrap().expect("a qcow2 header");
            assert_eq!(header.version, 3);
            assert_eq!(header.size, 3 << 30);
            assert_eq!(header.cluster_bits, 16);
            assert_eq!(header.refcount_order, 4);
            assert_eq!(header.l1_size, 6, "one entry per 512 MiB");
            assert_eq!(header.backing_file(&file).unwrap(), backing);
        }
        let v2 = dir.path().join("v2.qcow2");
        let v = v2.to_str().unwrap();
        qemu_img(&["create", "-q", "-f", "qcow2", "-o", "compat=0.10", v, "1M"]);
        let header = read(&v2).unwrap().expect("a qcow2 header");
        assert_eq!(
            (header.version, header.refcount_order, header.header_length),
            (2, 4, 72)
        );
    }

    #[test]
    fn test_bytes_read_back_as_the_same_header() {
        let dir = TempDir::new("header");
        let header = Header {
            backing_file_offset: 512,
            backing_file_size: 5,
            size: 7 << 30,
            l1_size: 14,
            l1_table_offset: 3 << 16,
            refcount_table_offset: 1 << 16,
            refcount_table_clusters: 1,
            header_length: 112,
            ..v3()
        };
        let mut bytes = header.to_bytes();
        assert_eq!(bytes.len(), 112);
        bytes.resize(512, 0);
        bytes.extend_from_slice(b"/base");
        let path = dir.path().join("h.qcow2");
        std::fs::write(&path, &bytes).unwrap();
        let file = File::open(&path).unwrap();
        assert_eq!(Header::read(&file).unwrap(), Some(header.clone()));
        assert_eq!(
            header.backing_file(&file).unwrap().as_deref(),
            Some("/base")
        );
    }

    #[test]
    fn test_other_files_and_malformed_headers() {
        let dir = TempDir::new("header");
        let path = dir.path().join("f");
        let mut truncated = MAGIC.to_vec();
        truncated.extend_from_slice(&3u32.to_be_bytes());
        for (bytes, want) in [
            (&b""[..], "none"),
            (b"QFI", "none"),
            (&[0u8; 4096][..], "none"),
            (b"QFI\xfb\0\0\0\x04", "malformed"),
            (&truncated[..], "malformed"),
        ] {
            std::fs::write(&path, bytes).unwrap();
            match (read(&path), want) {
                (Ok(None), "none") | (Err(HeaderError::Malformed(_)), "malformed") => {}
                (got, _) => panic!("{bytes:?}: {got:?}, want {want}"),
            }
        }
        // A backing name past the end of the file, too long, not UTF-8.
        let mut header = v3();
        for (offset, size) in [(4096, 10), (104, 2000), (104, 2)] {
            header.backing_file_offset = offset;
            header.backing_file_size = size;
            let mut bytes = header.to_bytes();
            bytes.extend_from_slice(&[0xff; 16]);
            std::fs::write(&path, &bytes).unwrap();
            let file = File::open(&path).unwrap();
            let parsed = Header::read(&file).unwrap().expect("a qcow2 header");
            assert!(
                matches!(parsed.backing_file(&file), Err(HeaderError::Malformed(_))),
                "{offset} {size}"
            );
        }
    }
}
