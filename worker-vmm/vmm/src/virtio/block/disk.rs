//! Disk images behind virtio-blk: raw files, and qcow2. A writable qcow2 image of the usual
//! kind (a job's overlay) goes to vmfarm's own engine ([`Qcow2Top`]), with the read-only chain
//! below it through qcow2-rs; any other qcow2 image goes wholly through qcow2-rs. qcow2-rs's
//! futures are not Send: a disk lives on its device's own thread and drives them on a
//! current-thread runtime.

use std::cell::Cell;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use qcow2_rs::dev::{Qcow2Dev, Qcow2DevParams};
use qcow2_rs::error::{Qcow2Error, Qcow2Result};
use qcow2_rs::utils::qcow2_alloc_dev_sync;

use super::qcow2_file::ImageFile;
use super::qcow2_top::{Below, Qcow2Top};

/// The sector size of the virtio-blk protocol.
pub const SECTOR_SIZE: u64 = 512;
const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";
const MAX_BACKING_DEPTH: usize = 16;

/// Why a disk image cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("cannot open {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: backing file {backing:?} must be an absolute path")]
    RelativeBacking { path: PathBuf, backing: String },
    #[error("{path}: backing file {backing} is not a qcow2 image")]
    BackingNotQcow2 { path: PathBuf, backing: PathBuf },
    #[error("{path}: backing chain deeper than {MAX_BACKING_DEPTH}")]
    BackingTooDeep { path: PathBuf },
    #[error("{path}: malformed qcow2 header")]
    BadHeader { path: PathBuf },
    #[error("cannot open the qcow2 image {path}")]
    Qcow2 {
        path: PathBuf,
        #[source]
        source: Qcow2Error,
    },
    #[error("disk I/O failed")]
    Io(#[source] std::io::Error),
    #[error("qcow2 I/O failed")]
    Qcow2Io(#[source] Qcow2Error),
    #[error("short read: {got} of {want} bytes")]
    ShortRead { got: usize, want: usize },
    #[error("qcow2 image {path}: {what}")]
    Qcow2Top {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
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
    match qcow2_header(&file, path)? {
        None => {
            let len = file.metadata().map_err(open_err)?.len();
            Ok(Probe {
                format: Format::Raw,
                size: len / SECTOR_SIZE * SECTOR_SIZE,
            })
        }
        Some(header) => {
            let mut current = path.to_owned();
            let mut backing = header.backing.clone();
            let mut depth = 0;
            while let Some(name) = backing {
                depth += 1;
                if depth > MAX_BACKING_DEPTH {
                    return Err(DiskError::BackingTooDeep {
                        path: path.to_owned(),
                    });
                }
                let next = PathBuf::from(&name);
                if !next.is_absolute() {
                    return Err(DiskError::RelativeBacking {
                        path: current,
                        backing: name,
                    });
                }
                let file = File::open(&next).map_err(|source| DiskError::Open {
                    path: next.clone(),
                    source,
                })?;
                let Some(h) = qcow2_header(&file, &next)? else {
                    return Err(DiskError::BackingNotQcow2 {
                        path: current,
                        backing: next,
                    });
                };
                backing = h.backing;
                current = next;
            }
            Ok(Probe {
                format: Format::Qcow2,
                size: header.size / SECTOR_SIZE * SECTOR_SIZE,
            })
        }
    }
}

struct Header {
    size: u64,
    backing: Option<String>,
}

/// The parts of a qcow2 header `probe` needs; None for a file that is not qcow2.
fn qcow2_header(file: &File, path: &Path) -> Result<Option<Header>, DiskError> {
    let mut head = [0u8; 104];
    let mut n = 0;
    let mut reader = file;
    while n < head.len() {
        match reader.read(&mut head[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(source) => {
                return Err(DiskError::Open {
                    path: path.to_owned(),
                    source,
                });
            }
        }
    }
    if n < 4 || head[..4] != QCOW2_MAGIC {
        return Ok(None);
    }
    let bad = || DiskError::BadHeader {
        path: path.to_owned(),
    };
    if n < 72 {
        return Err(bad());
    }
    let be64 = |at: usize| u64::from_be_bytes(head[at..at + 8].try_into().unwrap_or_default());
    let be32 = |at: usize| u32::from_be_bytes(head[at..at + 4].try_into().unwrap_or_default());
    let (backing_offset, backing_len) = (be64(8), be32(16));
    let backing = if backing_offset == 0 || backing_len == 0 {
        None
    } else {
        if backing_len > 1023 {
            return Err(bad());
        }
        let mut name = vec![0u8; backing_len as usize];
        file.read_exact_at(&mut name, backing_offset)
            .map_err(|_| bad())?;
        Some(String::from_utf8(name).map_err(|_| bad())?)
    };
    Ok(Some(Header {
        size: be64(24),
        backing,
    }))
}

/// Where the bytes of a write that skips the bounce buffer go.
pub struct DirectWrite<'a> {
    pub file: &'a File,
    /// (offset in the file, length), in the order of the write's bytes.
    pub runs: Vec<(u64, u64)>,
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
    Qcow2 {
        dev: Box<Qcow2Dev<ImageFile>>,
        rt: tokio::runtime::Runtime,
        /// Shared with every file of the chain (see [`ImageFile`]).
        guest_flush: Rc<Cell<bool>>,
    },
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
                None => Self::open_qcow2(path, read_only),
            },
            Format::Qcow2 => Self::open_qcow2(path, read_only),
        }
    }

    /// Opens a qcow2 image and its chain through qcow2-rs.
    pub(super) fn open_qcow2(path: &Path, read_only: bool) -> Result<Disk, DiskError> {
        let guest_flush = Rc::new(Cell::new(false));
        let (dev, rt) = open_chain(path, read_only, false, &guest_flush)?;
        Ok(Disk::Qcow2 {
            dev: Box::new(dev),
            rt,
            guest_flush,
        })
    }

    /// Where a read of `len` bytes at `offset` can move straight from the file into guest
    /// buffers: the file and the offset in it, when all of it lies there in one piece.
    pub fn direct_read(&self, offset: u64, len: u64) -> Option<(&File, u64)> {
        match self {
            Disk::Raw(file) => Some((file, offset)),
            Disk::Overlay { top, .. } => top.direct_read(offset, len),
            Disk::Qcow2 { .. } => None,
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
            Disk::Overlay { top, .. } => top.direct_write(offset, len),
            Disk::Qcow2 { .. } => Ok(None),
        }
    }

    /// Read `buf.len()` bytes (a multiple of the sector size) at byte `offset`.
    pub fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        match self {
            Disk::Raw(file) => file.read_exact_at(buf, offset).map_err(DiskError::Io),
            Disk::Overlay { top, backing } => top.read_at(buf, offset, backing),
            Disk::Qcow2 { dev, rt, .. } => read_exact(dev, rt, buf, offset),
        }
    }

    /// Write `buf` (a multiple of the sector size) at byte `offset`.
    pub fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<(), DiskError> {
        match self {
            Disk::Raw(file) => file.write_all_at(buf, offset).map_err(DiskError::Io),
            Disk::Overlay { top, backing } => top.write_at(buf, offset, backing),
            Disk::Qcow2 { dev, rt, .. } => rt
                .block_on(dev.write_at(buf, offset))
                .map_err(DiskError::Qcow2Io),
        }
    }

    /// Write qcow2 metadata kept in memory (cheap when nothing changed).
    pub fn flush_metadata(&mut self) -> Result<(), DiskError> {
        match self {
            Disk::Raw(_) => Ok(()),
            Disk::Overlay { top, .. } => top.flush_metadata(),
            Disk::Qcow2 { dev, rt, .. } => {
                if dev.need_flush_meta() {
                    rt.block_on(dev.flush_meta()).map_err(DiskError::Qcow2Io)?;
                }
                Ok(())
            }
        }
    }

    /// Make everything written so far durable.
    pub fn flush(&mut self) -> Result<(), DiskError> {
        self.flush_metadata()?;
        match self {
            Disk::Raw(file) => file.sync_data().map_err(DiskError::Io),
            Disk::Overlay { top, .. } => top.flush(),
            Disk::Qcow2 {
                dev,
                rt,
                guest_flush,
            } => {
                guest_flush.set(true);
                let synced = rt.block_on(dev.fsync_range(0, 0));
                guest_flush.set(false);
                synced.map_err(DiskError::Qcow2Io)
            }
        }
    }
}

/// The read-only images under an overlay, through qcow2-rs.
pub struct BackingChain {
    dev: Box<Qcow2Dev<ImageFile>>,
    rt: tokio::runtime::Runtime,
    /// The chain's virtual size: below an overlay, it may end before the overlay does.
    size: u64,
}

impl BackingChain {
    /// The backing chain the qcow2 image `path` names, if it names one.
    fn of(path: &Path) -> Result<Option<Self>, DiskError> {
        let file = File::open(path).map_err(|source| DiskError::Open {
            path: path.to_owned(),
            source,
        })?;
        let Some(Header {
            backing: Some(name),
            ..
        }) = qcow2_header(&file, path)?
        else {
            return Ok(None);
        };
        let base = PathBuf::from(name);
        let base_file = File::open(&base).map_err(|source| DiskError::Open {
            path: base.clone(),
            source,
        })?;
        let Some(header) = qcow2_header(&base_file, &base)? else {
            return Err(DiskError::BackingNotQcow2 {
                path: path.to_owned(),
                backing: base,
            });
        };
        let (dev, rt) = open_chain(&base, true, true, &Rc::new(Cell::new(false)))?;
        Ok(Some(BackingChain {
            dev: Box::new(dev),
            rt,
            size: header.size,
        }))
    }
}

/// Without a backing chain, what the overlay does not hold reads as zeros.
impl Below for Option<BackingChain> {
    fn read_below(&mut self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        let Some(chain) = self else {
            buf.fill(0);
            return Ok(());
        };
        chain.read_below(buf, offset)
    }
}

impl BackingChain {
    fn read_below(&mut self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        let avail = self.size.saturating_sub(offset).min(buf.len() as u64) as usize;
        let (inside, past) = buf.split_at_mut(avail);
        past.fill(0);
        if inside.is_empty() {
            return Ok(());
        }
        read_exact(&self.dev, &self.rt, inside, offset)
    }
}

/// Fills `buf` from the qcow2-rs image `dev` at virtual `offset`.
fn read_exact(
    dev: &Qcow2Dev<ImageFile>,
    rt: &tokio::runtime::Runtime,
    buf: &mut [u8],
    offset: u64,
) -> Result<(), DiskError> {
    let n = rt
        .block_on(dev.read_at(buf, offset))
        .map_err(DiskError::Qcow2Io)?;
    if n == buf.len() {
        Ok(())
    } else {
        Err(DiskError::ShortRead {
            got: n,
            want: buf.len(),
        })
    }
}

/// Opens a qcow2 image and its backing chain through qcow2-rs, ready for I/O on the returned
/// current-thread runtime.
fn open_chain(
    path: &Path,
    read_only: bool,
    backing: bool,
    guest_flush: &Rc<Cell<bool>>,
) -> Result<(Qcow2Dev<ImageFile>, tokio::runtime::Runtime), DiskError> {
    let q_err = |source| DiskError::Qcow2 {
        path: path.to_owned(),
        source,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .map_err(DiskError::Io)?;
    let dev = setup_qcow2(path, read_only, backing, guest_flush).map_err(q_err)?;
    rt.block_on(dev.qcow2_prep_io()).map_err(q_err)?;
    Ok((dev, rt))
}

/// Open a qcow2 image and its backing chain; backing files are opened read-only.
fn setup_qcow2(
    path: &Path,
    read_only: bool,
    backing: bool,
    guest_flush: &Rc<Cell<bool>>,
) -> Qcow2Result<Qcow2Dev<ImageFile>> {
    let params = Qcow2DevParams::new(9, None, None, read_only, false);
    if backing {
        params.mark_backing_dev(Some(true));
    }
    let io = ImageFile::open(path, read_only, guest_flush.clone())?;
    let (mut dev, backing_path) = qcow2_alloc_dev_sync(path, io, &params)?;
    if let Some(backing_path) = backing_path {
        dev.set_backing_dev(Box::new(setup_qcow2(
            &backing_path,
            true,
            true,
            guest_flush,
        )?));
    }
    Ok(dev)
}
