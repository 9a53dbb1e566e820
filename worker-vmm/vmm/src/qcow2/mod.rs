//! qcow2 images: everything vmfarm knows of the format, for both backends.
//!
//! - [`header`]: the one reader (and writer) of the qcow2 header.
//! - [`overlay`]: the one maker of a job's overlay, a copy-on-write qcow2 image over a qcow2
//!   base; QEMU (the `qemu` backend) and the integrated VMM (the `kvm` backend) boot from it.
//! - [`top`]: vmfarm's own engine for a writable overlay, as virtio-blk serves it.
//! - [`chain`]: images through qcow2-rs: the read-only chain below the engine, and whole images
//!   the engine does not take; `image_file` is how qcow2-rs reaches their files.
//!
//! The modules depend one way: `header` <- `overlay`, `top`, `chain`; `top` and `chain` meet
//! only through the [`Below`] trait here. virtio-blk (`crate::virtio::block`) picks the engine
//! for an image and uses these modules; nothing here uses virtio.

pub mod chain;
#[cfg(feature = "fuzzing")]
pub mod fuzz;
pub mod header;
mod image_file;
pub mod overlay;
pub mod top;

#[cfg(test)]
pub mod test_utils;

use std::path::PathBuf;

use self::header::HeaderError;

/// How deep a backing chain may be.
pub const MAX_BACKING_DEPTH: usize = 16;

/// Why a qcow2 image cannot be opened, read or written.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("cannot open {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: cannot read its qcow2 header")]
    Header {
        path: PathBuf,
        #[source]
        source: HeaderError,
    },
    #[error("{path}: backing file {backing:?} must be an absolute path")]
    RelativeBacking { path: PathBuf, backing: String },
    #[error("{path}: backing file {backing} is not a qcow2 image")]
    BackingNotQcow2 { path: PathBuf, backing: PathBuf },
    #[error("{path}: backing chain deeper than {MAX_BACKING_DEPTH}")]
    BackingTooDeep { path: PathBuf },
    /// qcow2-rs refused to open the image or its chain.
    #[error("cannot open the qcow2 image {path}")]
    Qcow2Rs {
        path: PathBuf,
        #[source]
        source: qcow2_rs::error::Qcow2Error,
    },
    /// The current-thread runtime that drives qcow2-rs could not be built.
    #[error("cannot start the qcow2-rs runtime")]
    Runtime(#[source] std::io::Error),
    #[error("qcow2 I/O failed")]
    Qcow2RsIo(#[source] qcow2_rs::error::Qcow2Error),
    #[error("short read: {got} of {want} bytes")]
    ShortRead { got: usize, want: usize },
    /// vmfarm's engine ([`top::Qcow2Top`]) failed: I/O on the image, or tables that make no
    /// sense (an `InvalidData` source).
    #[error("qcow2 image {path}: {what}")]
    Top {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// Reads of the part of the disk the writable top does not hold: the engine ([`top`]) reads
/// through this, the backing chain ([`chain::BackingChain`]) serves it.
pub trait Below {
    /// Fill `buf` with the disk's bytes at `offset` (zeros past the lower image's end).
    fn read_below(&mut self, buf: &mut [u8], offset: u64) -> Result<(), ImageError>;
}
