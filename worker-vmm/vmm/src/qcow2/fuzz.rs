//! For the fuzz targets only (feature `fuzzing`): a qcow2 image the fuzzer writes, read by the
//! header parser and opened by vmfarm's engine, which then serves a few reads and writes.
//!
//! The input is a count of operations (its low 4 bits), that many operations of 8 bytes
//! ([`Operation`]), then the image's bytes; the file is zero-extended to [`MIN_FILE`] bytes so
//! that small inputs can hold tables at their usual places. Operations run only on images the
//! engine takes, within the virtual size as virtio-blk keeps them.
//!
//! Beyond the absence of crashes: a version 3 header written back reads as the same header.

use std::os::unix::fs::FileExt;

use super::chain::BackingChain;
use super::header::Header;
use super::top::{DirectWrite, Qcow2Top};
use crate::fuzzing::{fd_path, scratch_dir, unnamed_file};

/// The file is at least this long (zeros past the input).
pub const MIN_FILE: u64 = 256 << 10;
const SECTOR: u64 = 512;

/// What one operation of the input does (its first byte, modulo 5).
#[derive(Clone, Copy, Debug)]
pub enum Kind {
    Read = 0,
    Write = 1,
    DirectRead = 2,
    DirectWrite = 3,
    FlushMetadata = 4,
}

/// One operation: 8 bytes, `[kind, sectors - 1, sector (u32 le), fill, 0]`.
#[derive(Clone, Copy, Debug)]
pub struct Operation {
    pub kind: Kind,
    /// 1 to 256 sectors.
    pub sectors: u16,
    /// The first sector, modulo the disk's sectors.
    pub sector: u32,
    /// The byte written.
    pub fill: u8,
}

impl Operation {
    fn decode(b: &[u8]) -> Operation {
        let kind = match b[0] % 5 {
            0 => Kind::Read,
            1 => Kind::Write,
            2 => Kind::DirectRead,
            3 => Kind::DirectWrite,
            _ => Kind::FlushMetadata,
        };
        Operation {
            kind,
            sectors: u16::from(b[1]) + 1,
            sector: u32::from_le_bytes([b[2], b[3], b[4], b[5]]),
            fill: b[6],
        }
    }

    fn encode(&self) -> [u8; 8] {
        let s = self.sector.to_le_bytes();
        let n = (self.sectors.clamp(1, 256) - 1) as u8;
        [self.kind as u8, n, s[0], s[1], s[2], s[3], self.fill, 0]
    }
}

/// Reads and opens the image `data` holds, and runs its operations (see the module docs).
pub fn image(data: &[u8]) {
    let Some((&count, rest)) = data.split_first() else {
        return;
    };
    let ops_len = (usize::from(count & 0xf) * 8).min(rest.len());
    let (ops, image) = rest.split_at(ops_len);
    let file = unnamed_file();
    file.write_all_at(image, 0).expect("write the image");
    file.set_len(MIN_FILE.max(image.len() as u64))
        .expect("size the image");

    let header = match Header::read(&file) {
        Ok(Some(header)) => header,
        Ok(None) | Err(_) => return,
    };
    let _ = header.backing_file(&file);
    // (`to_bytes` pads to `header_length`, which vmfarm sets only for headers it writes.)
    if header.version == 3 && header.header_length <= 4096 {
        let copy = unnamed_file();
        copy.write_all_at(&header.to_bytes(), 0)
            .expect("write the copy");
        let back = Header::read(&copy).expect("read the copy");
        assert_eq!(
            back.as_ref(),
            Some(&header),
            "a header written back differs"
        );
    }

    let Ok(Some(mut top)) = Qcow2Top::open(&fd_path(&file)) else {
        return;
    };
    let disk_sectors = header.size / SECTOR;
    if disk_sectors == 0 {
        return;
    }
    let mut below = None::<BackingChain>;
    for op in ops.chunks_exact(8).map(Operation::decode) {
        let start = u64::from(op.sector) % disk_sectors;
        let sectors = u64::from(op.sectors).min(disk_sectors - start);
        let (offset, len) = (start * SECTOR, sectors * SECTOR);
        let mut buf = vec![op.fill; len as usize];
        match op.kind {
            Kind::Read => {
                let _ = top.read_at(&mut buf, offset, &mut below);
            }
            Kind::Write => {
                let _ = top.write_at(&buf, offset, &mut below);
            }
            Kind::DirectRead => {
                if let Some((file, at)) = top.direct_read(offset, len) {
                    let _ = file.read_exact_at(&mut buf, at);
                }
            }
            Kind::DirectWrite => {
                if let Ok(Some(DirectWrite { file, runs })) = top.direct_write(offset, len) {
                    let mut done = 0;
                    for (at, n) in runs {
                        let _ = file.write_all_at(&buf[done..done + n as usize], at);
                        done += n as usize;
                    }
                    assert_eq!(done as u64, len, "the runs do not cover the write");
                }
            }
            Kind::FlushMetadata => {
                let _ = top.flush_metadata();
            }
        }
    }
}

/// The seed corpus: the overlay the worker makes, and images of other shapes the engine
/// takes or refuses, made by the header writer.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let ops = [
        Operation {
            kind: Kind::Write,
            sectors: 8,
            sector: 3,
            fill: 0x11,
        },
        Operation {
            kind: Kind::DirectWrite,
            sectors: 256,
            sector: 256,
            fill: 0x22,
        },
        Operation {
            kind: Kind::Read,
            sectors: 16,
            sector: 0,
            fill: 0,
        },
        Operation {
            kind: Kind::DirectRead,
            sectors: 128,
            sector: 256,
            fill: 0,
        },
        Operation {
            kind: Kind::FlushMetadata,
            sectors: 1,
            sector: 0,
            fill: 0,
        },
    ];
    let with_ops = |image: &[u8]| {
        let mut out = vec![ops.len() as u8];
        for op in &ops {
            out.extend(op.encode());
        }
        // Trailing zeros are what the harness adds anyway.
        let end = image.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
        out.extend_from_slice(&image[..end]);
        out
    };

    let mut seeds = Vec::new();
    // The worker's overlay over a 64 MiB base.
    let dir = scratch_dir().join(format!("vmfarm-fuzz-qcow2-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a scratch directory");
    let base = dir.join("base.qcow2");
    let overlay = dir.join("overlay.qcow2");
    let _ = std::fs::remove_file(&overlay);
    let mut header = Header::empty_v3(64 << 20);
    std::fs::write(&base, header.to_bytes()).expect("write the base");
    super::overlay::create_overlay(&base, &overlay).expect("make the overlay");
    let bytes = std::fs::read(&overlay).expect("read the overlay");
    let _ = std::fs::remove_dir_all(&dir);
    // Its first cluster (header, extensions, backing name): the refcount table and L1 table
    // read as zeros, as the engine takes them too.
    let end = bytes[..1 << 16]
        .iter()
        .rposition(|&b| b != 0)
        .map_or(0, |i| i + 1);
    seeds.push(("overlay", with_ops(&bytes[..end])));

    // A standalone image of 512-byte clusters: header, refcount table, refcount block, L1,
    // one L2 table mapping one data cluster (clusters 0 to 5).
    header.cluster_bits = 9;
    header.size = 1 << 20;
    header.l1_size = 32; // 64 L2 entries of 512 bytes each per table: 32 KiB per entry
    header.refcount_table_offset = 512;
    header.refcount_table_clusters = 1;
    header.l1_table_offset = 3 * 512;
    let mut image = vec![0u8; 6 * 512];
    image[..104].copy_from_slice(&header.to_bytes());
    image[512..520].copy_from_slice(&(2 * 512u64).to_be_bytes());
    for cluster in 0..6 {
        image[1024 + 2 * cluster..1024 + 2 * cluster + 2].copy_from_slice(&1u16.to_be_bytes());
    }
    const COPIED: u64 = 1 << 63;
    image[1536..1544].copy_from_slice(&(COPIED | (4 * 512)).to_be_bytes());
    image[2048..2056].copy_from_slice(&(COPIED | (5 * 512)).to_be_bytes());
    image[2056..2064].copy_from_slice(&1u64.to_be_bytes()); // a zero cluster
    image[5 * 512..].fill(0x33);
    seeds.push(("small-clusters", with_ops(&image)));

    // A version 2 header (left to qcow2-rs), and a header that ends early.
    header.version = 2;
    seeds.push(("v2", with_ops(&header.to_bytes()[..72])));
    seeds.push(("short", with_ops(&bytes[..40])));
    seeds
}
