//! qcow2 images through qcow2-rs: the read-only backing chain below vmfarm's engine
//! ([`BackingChain`]), and whole images the engine does not take ([`Chain`]). qcow2-rs's
//! futures are not Send: a chain lives on its disk's own thread and drives them on a
//! current-thread runtime.

use std::cell::Cell;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use qcow2_rs::dev::{Qcow2Dev, Qcow2DevParams};
use qcow2_rs::error::Qcow2Result;
use qcow2_rs::utils::qcow2_alloc_dev_sync;

use super::header::Header;
use super::image_file::ImageFile;
use super::{Below, ImageError, MAX_BACKING_DEPTH};

/// The header of the image at `path`, opened as `file`; `None` if it is not qcow2.
fn read_header(file: &File, path: &Path) -> Result<Option<Header>, ImageError> {
    Header::read(file).map_err(|source| ImageError::Header {
        path: path.to_owned(),
        source,
    })
}

/// The backing file the header of `file` (the image at `path`) names, if any.
fn backing_file(file: &File, path: &Path, header: &Header) -> Result<Option<String>, ImageError> {
    header
        .backing_file(file)
        .map_err(|source| ImageError::Header {
            path: path.to_owned(),
            source,
        })
}

fn open_file(path: &Path) -> Result<File, ImageError> {
    File::open(path).map_err(|source| ImageError::Open {
        path: path.to_owned(),
        source,
    })
}

/// Checks the backing chain below the qcow2 image at `path` (opened as `file`, with `header`):
/// each backing file named by an absolute path, qcow2, and the chain at most
/// [`MAX_BACKING_DEPTH`] deep.
pub fn check_backing_chain(path: &Path, file: &File, header: &Header) -> Result<(), ImageError> {
    let mut current = path.to_owned();
    let mut backing = backing_file(file, path, header)?;
    let mut depth = 0;
    while let Some(name) = backing {
        depth += 1;
        if depth > MAX_BACKING_DEPTH {
            return Err(ImageError::BackingTooDeep {
                path: path.to_owned(),
            });
        }
        let next = PathBuf::from(&name);
        if !next.is_absolute() {
            return Err(ImageError::RelativeBacking {
                path: current,
                backing: name,
            });
        }
        let file = open_file(&next)?;
        let Some(h) = read_header(&file, &next)? else {
            return Err(ImageError::BackingNotQcow2 {
                path: current,
                backing: next,
            });
        };
        backing = backing_file(&file, &next, &h)?;
        current = next;
    }
    Ok(())
}

/// A qcow2 image and its backing chain, opened through qcow2-rs; usable only on the thread
/// that opened it.
pub struct Chain {
    dev: Box<Qcow2Dev<ImageFile>>,
    rt: tokio::runtime::Runtime,
    /// Shared with every file of the chain (see [`ImageFile`]).
    guest_flush: Rc<Cell<bool>>,
}

impl Chain {
    /// Opens the qcow2 image `path` and its chain, ready for I/O; backing files are opened
    /// read-only.
    pub fn open(path: &Path, read_only: bool) -> Result<Chain, ImageError> {
        Self::open_as(path, read_only, false)
    }

    /// Opens `path` as [`Chain::open`] does; `backing` marks the image itself as a backing
    /// image (read-only, below another).
    fn open_as(path: &Path, read_only: bool, backing: bool) -> Result<Chain, ImageError> {
        let q_err = |source| ImageError::Qcow2Rs {
            path: path.to_owned(),
            source,
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .map_err(ImageError::Runtime)?;
        let guest_flush = Rc::new(Cell::new(false));
        let dev = setup_qcow2(path, read_only, backing, &guest_flush).map_err(q_err)?;
        rt.block_on(dev.qcow2_prep_io()).map_err(q_err)?;
        Ok(Chain {
            dev: Box::new(dev),
            rt,
            guest_flush,
        })
    }

    /// Fills `buf` from virtual `offset`.
    pub fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<(), ImageError> {
        let n = self
            .rt
            .block_on(self.dev.read_at(buf, offset))
            .map_err(ImageError::Qcow2RsIo)?;
        if n == buf.len() {
            Ok(())
        } else {
            Err(ImageError::ShortRead {
                got: n,
                want: buf.len(),
            })
        }
    }

    /// Writes `buf` at virtual `offset`.
    pub fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<(), ImageError> {
        self.rt
            .block_on(self.dev.write_at(buf, offset))
            .map_err(ImageError::Qcow2RsIo)
    }

    /// Writes the metadata qcow2-rs keeps in memory (cheap when nothing changed).
    pub fn flush_metadata(&mut self) -> Result<(), ImageError> {
        if self.dev.need_flush_meta() {
            self.rt
                .block_on(self.dev.flush_meta())
                .map_err(ImageError::Qcow2RsIo)?;
        }
        Ok(())
    }

    /// Makes everything written so far durable (the guest's FLUSH).
    pub fn flush(&mut self) -> Result<(), ImageError> {
        self.flush_metadata()?;
        self.guest_flush.set(true);
        let synced = self.rt.block_on(self.dev.fsync_range(0, 0));
        self.guest_flush.set(false);
        synced.map_err(ImageError::Qcow2RsIo)
    }
}

/// The read-only images under an overlay, through qcow2-rs.
pub struct BackingChain {
    chain: Chain,
    /// The chain's virtual size: below an overlay, it may end before the overlay does.
    size: u64,
}

impl BackingChain {
    /// The backing chain the qcow2 image `path` names, if it names one.
    pub fn of(path: &Path) -> Result<Option<Self>, ImageError> {
        let file = open_file(path)?;
        let Some(header) = read_header(&file, path)? else {
            return Ok(None);
        };
        let Some(name) = backing_file(&file, path, &header)? else {
            return Ok(None);
        };
        let base = PathBuf::from(name);
        let base_file = open_file(&base)?;
        let Some(base_header) = read_header(&base_file, &base)? else {
            return Err(ImageError::BackingNotQcow2 {
                path: path.to_owned(),
                backing: base,
            });
        };
        Ok(Some(BackingChain {
            chain: Chain::open_as(&base, true, true)?,
            size: base_header.size,
        }))
    }
}

/// Without a backing chain, what the overlay does not hold reads as zeros.
impl Below for Option<BackingChain> {
    fn read_below(&mut self, buf: &mut [u8], offset: u64) -> Result<(), ImageError> {
        let Some(below) = self else {
            buf.fill(0);
            return Ok(());
        };
        let avail = below.size.saturating_sub(offset).min(buf.len() as u64) as usize;
        let (inside, past) = buf.split_at_mut(avail);
        past.fill(0);
        if inside.is_empty() {
            return Ok(());
        }
        below.chain.read_at(inside, offset)
    }
}

/// Opens a qcow2 image and its backing chain through qcow2-rs; backing files are opened
/// read-only.
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
