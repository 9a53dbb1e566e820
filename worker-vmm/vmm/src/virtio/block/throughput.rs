//! Host-side throughput of the disk engine virtio-blk serves an image with, for
//! `vmfarm bench disk`: sequential passes in guest-sized requests, one at a time, each moved as
//! the device moves it (straight to the file where the engine says where, else through a buffer
//! as the bounce path does).

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use super::disk::{self, DirectWrite, Disk, DiskError};
use crate::qcow2::chain::Chain;

/// How long each pass over the image took.
#[derive(Debug, Clone, Copy)]
pub struct Passes {
    /// Writing every byte once, on a fresh image (a qcow2 overlay allocates as it goes).
    pub first_write: Duration,
    /// Reading it all back.
    pub read: Duration,
    /// Writing it all again, over what the first pass wrote.
    pub rewrite: Duration,
}

/// Which engine serves `path` when a VM gets it writable.
pub fn engine_name(path: &Path) -> Result<&'static str, DiskError> {
    let probe = disk::probe(path, false)?;
    Ok(match Disk::open(path, probe.format, false)? {
        Disk::Raw(_) => "raw file",
        Disk::Overlay { .. } => "vmfarm's qcow2 engine",
        Disk::Qcow2(_) => "qcow2-rs",
    })
}

/// Which engine a measurement goes through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// The one a VM's disk gets ([`engine_name`]).
    AsVm,
    /// qcow2-rs for the whole chain, as writable overlays were served before vmfarm's own
    /// engine (a qcow2 image only).
    Qcow2Rs,
}

/// Passes of `total` bytes in `request`-byte requests over the start of the image `path`,
/// opened writable. Metadata the engine keeps in memory is written after the timed passes (as
/// `qemu-img bench` leaves its own to the close).
pub fn measure(
    path: &Path,
    total: u64,
    request: usize,
    engine: Engine,
) -> Result<Passes, DiskError> {
    let probe = disk::probe(path, false)?;
    let mut disk = match engine {
        Engine::AsVm => Disk::open(path, probe.format, false)?,
        Engine::Qcow2Rs => Disk::Qcow2(Chain::open(path, false)?),
    };
    let mut data: Vec<u8> = (0..request).map(|i| (i % 251) as u8).collect();
    let first_write = timed(total, request, |offset| write(&mut disk, &data, offset))?;
    let read = timed(total, request, |offset| read(&mut disk, &mut data, offset))?;
    let rewrite = timed(total, request, |offset| write(&mut disk, &data, offset))?;
    disk.flush()?;
    Ok(Passes {
        first_write,
        read,
        rewrite,
    })
}

fn timed(
    total: u64,
    request: usize,
    mut one: impl FnMut(u64) -> Result<(), DiskError>,
) -> Result<Duration, DiskError> {
    let started = Instant::now();
    for offset in (0..total).step_by(request) {
        one(offset)?;
    }
    Ok(started.elapsed())
}

fn write(disk: &mut Disk, data: &[u8], offset: u64) -> Result<(), DiskError> {
    match disk.direct_write(offset, data.len() as u64)? {
        Some(DirectWrite { file, runs }) => {
            let mut done = 0;
            for (at, len) in runs {
                let len = len as usize;
                file.write_all_at(&data[done..done + len], at)
                    .map_err(DiskError::Io)?;
                done += len;
            }
            Ok(())
        }
        None => disk.write_at(data, offset),
    }
}

fn read(disk: &mut Disk, data: &mut [u8], offset: u64) -> Result<(), DiskError> {
    match disk.direct_read(offset, data.len() as u64) {
        Some((file, at)) => file.read_exact_at(data, at).map_err(DiskError::Io),
        None => disk.read_at(data, offset),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qcow2::overlay::create_overlay;
    use crate::qcow2::test_utils::{checked_contents, qemu_img};
    use crate::test_utils::TempDir;

    #[test]
    fn test_passes_leave_the_image_written_and_consistent() {
        let dir = TempDir::new("throughput");
        let base = dir.path().join("base.qcow2");
        qemu_img(&["create", "-q", "-f", "qcow2", base.to_str().unwrap(), "8M"]);
        let overlay = dir.path().join("job.qcow2");
        create_overlay(&base, &overlay).unwrap();
        assert_eq!(engine_name(&overlay).unwrap(), "vmfarm's qcow2 engine");
        let want: Vec<u8> = (0..256 << 10).map(|i| (i % 251) as u8).collect();
        for engine in [Engine::AsVm, Engine::Qcow2Rs] {
            std::fs::remove_file(&overlay).unwrap();
            create_overlay(&base, &overlay).unwrap();
            measure(&overlay, 4 << 20, 256 << 10, engine).unwrap();
            let image = checked_contents(dir.path(), &overlay);
            for chunk in image[..4 << 20].chunks(256 << 10) {
                assert!(chunk == want.as_slice(), "{engine:?}");
            }
            assert!(image[4 << 20..].iter().all(|&b| b == 0), "{engine:?}");
        }
        let raw = dir.path().join("disk.raw");
        std::fs::File::create(&raw)
            .unwrap()
            .set_len(8 << 20)
            .unwrap();
        assert_eq!(engine_name(&raw).unwrap(), "raw file");
    }
}
