//! Disk images behind virtio-blk: raw files, and qcow2. A writable qcow2 image of the usual
//! kind (a job's overlay) goes to vmfarm's own engine ([`Qcow2Top`]), with the read-only chain
//! below it through qcow2-rs ([`BackingChain`]); any other qcow2 image goes wholly through
//! qcow2-rs ([`Chain`]). qcow2-rs's futures are not Send: a disk lives on its device's own
//! thread.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::qcow2::ImageError;
use crate::qcow2::chain::{BackingChain, Chain, check_backing_chain};
use crate::qcow2::header::Header;
pub use crate::qcow2::top::DirectWrite;
use crate::qcow2::top::Qcow2Top;

/// The sector size of the virtio-blk protocol.
pub const SECTOR_SIZE: u64 = 512;

/// Why a disk image cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("cannot open {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("disk I/O failed")]
    Io(#[source] std::io::Error),
    #[error(transparent)]
    Qcow2(#[from] ImageError),
}

/// The image formats virtio-blk serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Raw,
    Qcow2,
}

/// What `probe` learned about an image without keeping it open.
#[derive(Debug)]
pub struct Probe {
    pub format: Format,
    /// Virtual size in bytes, a multiple of the sector size.
    pub size: u64,
}

/// Check an image and, for qcow2, its whole backing chain (each backing file qcow2, absolute).
pub fn probe(path: &Path, read_only: bool) -> Result<Probe, DiskError> {
    let open_err = |source| DiskError::Open {
        path: path.to_owned(),
        source,
    };
    let file = OpenOptions::new()
        .read(true)
        .write(!read_only)
        .open(path)
        .map_err(open_err)?;
    let header = Header::read(&file).map_err(|source| ImageError::Header {
        path: path.to_owned(),
        source,
    })?;
    let (format, size) = match header {
        None => (Format::Raw, file.metadata().map_err(open_err)?.len()),
        Some(header) => {
            check_backing_chain(path, &file, &header)?;
            (Format::Qcow2, header.size)
        }
    };
    Ok(Probe {
        format,
        size: size / SECTOR_SIZE * SECTOR_SIZE,
    })
}

/// An open image, usable only on the thread that opened it.
pub enum Disk {
    Raw(File),
    /// A writable qcow2 image vmfarm's own engine takes (see [`Qcow2Top`]), over its backing
    /// chain if it has one.
    Overlay {
        top: Box<Qcow2Top>,
        backing: Option<BackingChain>,
    },
    /// Any other qcow2 image, through qcow2-rs.
    Qcow2(Chain),
}

impl Disk {
    /// Open an image `probe` accepted.
    pub fn open(path: &Path, format: Format, read_only: bool) -> Result<Disk, DiskError> {
        match format {
            Format::Raw => {
                let file = OpenOptions::new()
                    .read(true)
                    .write(!read_only)
                    .open(path)
                    .map_err(|source| DiskError::Open {
                        path: path.to_owned(),
                        source,
                    })?;
                Ok(Disk::Raw(file))
            }
            Format::Qcow2 if !read_only => match Qcow2Top::open(path)? {
                Some(top) => Ok(Disk::Overlay {
                    top: Box::new(top),
                    backing: BackingChain::of(path)?,
                }),
                None => Ok(Disk::Qcow2(Chain::open(path, read_only)?)),
            },
            Format::Qcow2 => Ok(Disk::Qcow2(Chain::open(path, read_only)?)),
        }
    }

    /// Where a read of `len` bytes at `offset` can move straight from the file into guest
    /// buffers: the file and the offset in it, when all of it lies there in one piece.
    pub fn direct_read(&self, offset: u64, len: u64) -> Option<(&File, u64)> {
        match self {
            Disk::Raw(file) => Some((file, offset)),
            Disk::Overlay { top, .. } => top.direct_read(offset, len),
            Disk::Qcow2(_) => None,
        }
    }

    /// Where a write of `len` bytes at `offset` can move straight from guest buffers into the
    /// file: the file and the runs (offset in the file, length) its bytes go to, in order. The
    /// caller writes every run. `None` when it needs the bounce buffer ([`Disk::write_at`]).
    pub fn direct_write(
        &mut self,
        offset: u64,
        len: u64,
    ) -> Result<Option<DirectWrite<'_>>, DiskError> {
        match self {
            Disk::Raw(file) => Ok(Some(DirectWrite {
                file,
                runs: vec![(offset, len)],
            })),
            Disk::Overlay { top, .. } => Ok(top.direct_write(offset, len)?),
            Disk::Qcow2(_) => Ok(None),
        }
    }

    /// Read `buf.len()` bytes (a multiple of the sector size) at byte `offset`.
    pub fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        match self {
            Disk::Raw(file) => file.read_exact_at(buf, offset).map_err(DiskError::Io),
            Disk::Overlay { top, backing } => Ok(top.read_at(buf, offset, backing)?),
            Disk::Qcow2(chain) => Ok(chain.read_at(buf, offset)?),
        }
    }

    /// Write `buf` (a multiple of the sector size) at byte `offset`.
    pub fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<(), DiskError> {
        match self {
            Disk::Raw(file) => file.write_all_at(buf, offset).map_err(DiskError::Io),
            Disk::Overlay { top, backing } => Ok(top.write_at(buf, offset, backing)?),
            Disk::Qcow2(chain) => Ok(chain.write_at(buf, offset)?),
        }
    }

    /// Write qcow2 metadata kept in memory (cheap when nothing changed).
    pub fn flush_metadata(&mut self) -> Result<(), DiskError> {
        match self {
            Disk::Raw(_) => Ok(()),
            Disk::Overlay { top, .. } => Ok(top.flush_metadata()?),
            Disk::Qcow2(chain) => Ok(chain.flush_metadata()?),
        }
    }

    /// Make everything written so far durable.
    pub fn flush(&mut self) -> Result<(), DiskError> {
        match self {
            Disk::Raw(file) => file.sync_data().map_err(DiskError::Io),
            Disk::Overlay { top, .. } => Ok(top.flush()?),
            Disk::Qcow2(chain) => Ok(chain.flush()?),
        }
    }
}
