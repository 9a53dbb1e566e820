//! vmfarm's own engine for the writable top image of a qcow2 chain (a job's overlay). The
//! read-only images below it stay with qcow2-rs ([`super::chain`]).
//!
//! qcow2-rs serves a write to a cluster the top does not hold yet by first reading the whole
//! cluster from the backing image (even when the write covers all of it), then writing the
//! refcount block and the L2 table right away: per 64 KiB of guest data, a 64 KiB read, two
//! metadata writes and two copies. In L1 of the KVM lab that made overlay writes 0.3–0.5× as fast
//! as QEMU's. Here:
//! - new clusters are appended to the file, so a write over whole clusters is one pwrite;
//! - the backing image is read only for the part of a cluster the write leaves uncovered;
//! - a request whose bytes lie in the file (or fill whole new clusters) moves straight between
//!   guest buffers and the file, without the bounce buffer;
//! - the L1, L2 and refcount tables live in memory and are written back when the queue goes
//!   idle, on FLUSH, reset and shutdown (refcounts first, then L2 tables, then L1), as the
//!   qcow2-rs path did for its own cache.
//!
//! As with the qcow2-rs path, the file is synced only on the guest's FLUSH: a host crash between
//! flushes can leave the overlay inconsistent; overlays die with their job.
//!
//! Images this engine takes: qcow2 v3 with 16-bit refcounts, no snapshots, no encryption, no
//! incompatible or autoclear feature bits, and every cluster of the top owned by it alone (the
//! COPIED flag on every L1 and L2 entry in use, nothing compressed). [`Qcow2Top::open`] says
//! `None` for anything else, which then goes to qcow2-rs.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::header::Header;
use super::{Below, ImageError};

/// The L1 or L2 entry's cluster is referenced only from here (refcount 1).
const COPIED: u64 = 1 << 63;
const COMPRESSED: u64 = 1 << 62;
/// The L2 entry's cluster reads as zeros (v3).
const ZERO: u64 = 1;
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bits of an L1 entry that must be zero.
const L1_RESERVED: u64 = !(COPIED | OFFSET_MASK);
/// Bits of a standard L2 entry that must be zero.
const L2_RESERVED: u64 = !(COPIED | COMPRESSED | OFFSET_MASK | ZERO);
/// qemu's own limits on the tables, which also bound what an image can make us allocate.
const MAX_L1_BYTES: u64 = 32 << 20;
const MAX_REFCOUNT_TABLE_BYTES: u64 = 8 << 20;

/// Where the bytes of a write that skips the bounce buffer go.
pub struct DirectWrite<'a> {
    pub file: &'a File,
    /// (offset in the file, length), in the order of the write's bytes.
    pub runs: Vec<(u64, u64)>,
}

/// A table of entries read from the image, and whether it differs from the file.
struct Table<T> {
    entries: Vec<T>,
    dirty: bool,
}

impl<T> Table<T> {
    fn clean(entries: Vec<T>) -> Self {
        Table {
            entries,
            dirty: false,
        }
    }
}

/// The writable top of a qcow2 chain, with its tables in memory.
pub struct Qcow2Top {
    path: PathBuf,
    file: File,
    cluster_bits: u32,
    /// The virtual size.
    size: u64,
    /// Whether the header names a backing file (else unallocated clusters read as zeros).
    has_backing: bool,
    l1_offset: u64,
    l1: Table<u64>,
    /// Every L2 table in use, by L1 index.
    l2: HashMap<usize, Table<u64>>,
    refcount_table_offset: u64,
    refcount_table: Table<u64>,
    /// The refcount blocks read or made so far, by refcount table index.
    refcount_blocks: HashMap<usize, Table<u16>>,
    /// The first cluster index past everything in use: where the next cluster goes.
    next_free: u64,
    /// One cluster, for partial writes to clusters the top did not hold.
    scratch: Vec<u8>,
}

/// How one cluster's bytes are found.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mapping {
    /// In the top's file at this offset.
    Data(u64),
    /// Zeros (a v3 zero cluster); a host cluster may already be set aside for it.
    Zero(Option<u64>),
    /// Below the top.
    Below,
}

/// Whether the engine takes an image with `header`: the kind the module documentation names,
/// with tables of a size and place it can hold.
fn takes(header: &Header) -> bool {
    let simple = header.version == 3
        && (9..=21).contains(&header.cluster_bits)
        && header.crypt_method == 0
        && header.nb_snapshots == 0
        && header.incompatible_features == 0
        && header.autoclear_features == 0
        && header.refcount_order == 4; // 16-bit refcounts
    if !simple {
        return false;
    }
    let cluster = 1u64 << header.cluster_bits;
    let l1_entries = u64::from(header.l1_size);
    let refcount_table_clusters = u64::from(header.refcount_table_clusters);
    let l2_coverage = cluster * (cluster / 8);
    l1_entries * 8 <= MAX_L1_BYTES
        && l1_entries >= header.size.div_ceil(l2_coverage)
        && refcount_table_clusters * cluster <= MAX_REFCOUNT_TABLE_BYTES
        && refcount_table_clusters > 0
        && header.l1_table_offset.is_multiple_of(cluster)
        && header.refcount_table_offset.is_multiple_of(cluster)
}

/// The L2 tables the L1 table `l1` points at, by L1 index, if every one of them and every
/// cluster they map is owned by the top alone and nothing is compressed. `end` grows past
/// every cluster they use.
fn owned_l2_tables(
    file: &File,
    l1: &[u64],
    cluster: u64,
    end: &mut u64,
) -> std::io::Result<Option<HashMap<usize, Table<u64>>>> {
    let mut l2 = HashMap::new();
    for (index, &entry) in l1.iter().enumerate() {
        if entry == 0 {
            continue;
        }
        let offset = entry & OFFSET_MASK;
        if entry & L1_RESERVED != 0 || entry & COPIED == 0 || !offset.is_multiple_of(cluster) {
            return Ok(None);
        }
        *end = (*end).max(offset / cluster + 1);
        let table = read_u64s(file, offset, cluster / 8)?;
        for &e in &table {
            let data = e & OFFSET_MASK;
            let owned = e & COPIED != 0 && data.is_multiple_of(cluster);
            if e & (COMPRESSED | L2_RESERVED) != 0 || (data != 0 && !owned) {
                return Ok(None);
            }
            if data != 0 {
                *end = (*end).max(data / cluster + 1);
            }
        }
        l2.insert(index, Table::clean(table));
    }
    Ok(Some(l2))
}

impl Qcow2Top {
    /// Opens `path` for writing if this engine takes it, `None` if it is a qcow2 image of a kind
    /// it leaves to qcow2-rs (see the module documentation).
    pub fn open(path: &Path) -> Result<Option<Self>, ImageError> {
        let io_err = |source| ImageError::Open {
            path: path.to_owned(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io_err)?;
        let file_len = file.metadata().map_err(io_err)?.len();
        let header = match Header::read(&file) {
            Ok(Some(header)) if takes(&header) => header,
            Ok(_) => return Ok(None),
            Err(source) => {
                return Err(ImageError::Header {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        let cluster = 1u64 << header.cluster_bits;
        let l1_entries = u64::from(header.l1_size);
        let refcount_table_clusters = u64::from(header.refcount_table_clusters);
        let read_err = |source| ImageError::Top {
            path: path.to_owned(),
            what: "cannot read its tables",
            source,
        };
        let l1 = read_u64s(&file, header.l1_table_offset, l1_entries).map_err(read_err)?;
        let refcount_table = read_u64s(
            &file,
            header.refcount_table_offset,
            refcount_table_clusters * cluster / 8,
        )
        .map_err(read_err)?;
        let mut end = file_len
            .div_ceil(cluster)
            .max(header.l1_table_offset / cluster + (l1_entries * 8).div_ceil(cluster))
            .max(header.refcount_table_offset / cluster + refcount_table_clusters);
        let Some(l2) = owned_l2_tables(&file, &l1, cluster, &mut end).map_err(read_err)? else {
            return Ok(None);
        };
        for &block in &refcount_table {
            if !block.is_multiple_of(cluster) {
                return Ok(None);
            }
            if block != 0 {
                end = end.max(block / cluster + 1);
            }
        }
        Ok(Some(Qcow2Top {
            path: path.to_owned(),
            file,
            cluster_bits: header.cluster_bits,
            size: header.size,
            has_backing: header.backing_file_offset != 0,
            l1_offset: header.l1_table_offset,
            l1: Table::clean(l1),
            l2,
            refcount_table_offset: header.refcount_table_offset,
            refcount_table: Table::clean(refcount_table),
            refcount_blocks: HashMap::new(),
            next_free: end,
            scratch: Vec::new(),
        }))
    }

    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    fn l2_entries(&self) -> u64 {
        self.cluster_size() / 8
    }

    fn io_err(&self, what: &'static str) -> impl FnOnce(std::io::Error) -> ImageError + '_ {
        move |source| ImageError::Top {
            path: self.path.clone(),
            what,
            source,
        }
    }

    fn corrupt(&self, what: &'static str) -> ImageError {
        ImageError::Top {
            path: self.path.clone(),
            what,
            source: std::io::Error::from(std::io::ErrorKind::InvalidData),
        }
    }

    /// The (L1 index, L2 index) of the cluster holding virtual byte `offset`.
    fn indices(&self, offset: u64) -> (usize, usize) {
        let cluster = offset >> self.cluster_bits;
        (
            (cluster / self.l2_entries()) as usize,
            (cluster % self.l2_entries()) as usize,
        )
    }

    fn l2_entry(&self, offset: u64) -> u64 {
        let (l1, l2) = self.indices(offset);
        self.l2.get(&l1).map_or(0, |table| table.entries[l2])
    }

    fn mapping(&self, offset: u64) -> Mapping {
        let entry = self.l2_entry(offset);
        let host = entry & OFFSET_MASK;
        if entry & ZERO != 0 {
            Mapping::Zero((host != 0).then_some(host))
        } else if host != 0 {
            Mapping::Data(host)
        } else if self.has_backing {
            Mapping::Below
        } else {
            Mapping::Zero(None)
        }
    }

    /// How `len` bytes at `offset` start: their mapping, and how many of them (whole clusters
    /// after the first) continue it (contiguous in the file, or all zeros, or all below).
    fn extent(&self, offset: u64, len: u64) -> (Mapping, u64) {
        let cluster = self.cluster_size();
        let first = self.mapping(offset);
        let mut run = (cluster - offset % cluster).min(len);
        while run < len {
            let next = self.mapping(offset + run);
            let continues = match (first, next) {
                (Mapping::Data(a), Mapping::Data(b)) => b == a + offset % cluster + run,
                (Mapping::Zero(_), Mapping::Zero(_)) | (Mapping::Below, Mapping::Below) => true,
                _ => false,
            };
            if !continues {
                break;
            }
            run = (run + cluster).min(len);
        }
        (first, run)
    }

    /// Reads `buf.len()` bytes at virtual `offset` (inside the disk).
    pub fn read_at(
        &mut self,
        buf: &mut [u8],
        offset: u64,
        below: &mut dyn Below,
    ) -> Result<(), ImageError> {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let (mapping, run) = self.extent(pos, (buf.len() - done) as u64);
            let part = &mut buf[done..done + run as usize];
            match mapping {
                Mapping::Data(host) => self
                    .file
                    .read_exact_at(part, host + pos % self.cluster_size())
                    .map_err(self.io_err("cannot read data"))?,
                Mapping::Zero(_) => part.fill(0),
                Mapping::Below => below.read_below(part, pos)?,
            }
            done += run as usize;
        }
        Ok(())
    }

    /// The file offset of `len` bytes at virtual `offset`, when they lie in the file in one
    /// piece.
    pub fn direct_read(&self, offset: u64, len: u64) -> Option<(&File, u64)> {
        match self.extent(offset, len) {
            (Mapping::Data(host), run) if run == len => {
                Some((&self.file, host + offset % self.cluster_size()))
            }
            _ => None,
        }
    }

    /// Maps the clusters of a write of `len` bytes at virtual `offset` and says where its bytes
    /// go in the file, when the write needs nothing from below: each cluster it touches is data
    /// already or is covered whole. `None` otherwise, or when the image might run out of room
    /// midway (then [`Qcow2Top::write_at`] serves it).
    pub fn direct_write(
        &mut self,
        offset: u64,
        len: u64,
    ) -> Result<Option<DirectWrite<'_>>, ImageError> {
        let cluster = self.cluster_size();
        let pieces = |offset: u64| {
            let mut at = offset;
            std::iter::from_fn(move || {
                (at < offset + len).then(|| {
                    let piece = (at, (cluster - at % cluster).min(offset + len - at));
                    at += piece.1;
                    piece
                })
            })
        };
        let mut new_clusters = 0;
        for (at, n) in pieces(offset) {
            if !matches!(self.mapping(at), Mapping::Data(_)) {
                if n < cluster {
                    return Ok(None);
                }
                new_clusters += 1;
            }
        }
        // Each new data cluster may bring a new L2 table or refcount block with it.
        let capacity = self.refcount_table.entries.len() as u64 * (cluster / 2);
        if self.next_free + 2 * new_clusters + 2 > capacity {
            return Ok(None);
        }
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for (at, n) in pieces(offset) {
            let host = match self.mapping(at) {
                Mapping::Data(host) | Mapping::Zero(Some(host)) => host,
                Mapping::Zero(None) | Mapping::Below => self.allocate_data(at)?,
            };
            self.set_data(at, host);
            let file_at = host + at % cluster;
            match runs.last_mut() {
                Some((start, run)) if *start + *run == file_at => *run += n,
                _ => runs.push((file_at, n)),
            }
        }
        Ok(Some(DirectWrite {
            file: &self.file,
            runs,
        }))
    }

    /// Writes `buf` at virtual `offset` (inside the disk).
    pub fn write_at(
        &mut self,
        buf: &[u8],
        offset: u64,
        below: &mut dyn Below,
    ) -> Result<(), ImageError> {
        // Consecutive pieces bound for consecutive file offsets go out as one pwrite, which
        // also happens when a later piece fails: the clusters mapped so far then hold their data.
        let mut pending = None;
        let placed = self.place_pieces(buf, offset, below, &mut pending);
        let written = self.write_pending(buf, pending);
        placed.and(written)
    }

    /// Maps each cluster-sized piece of the write `buf` at `offset`, writing partial clusters
    /// at once and gathering the rest in `pending` (file offset, start in `buf`, length).
    fn place_pieces(
        &mut self,
        buf: &[u8],
        offset: u64,
        below: &mut dyn Below,
        pending: &mut Option<(u64, usize, usize)>,
    ) -> Result<(), ImageError> {
        let cluster = self.cluster_size();
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let within = pos % cluster;
            let len = (cluster - within).min((buf.len() - done) as u64) as usize;
            let whole = len as u64 == cluster;
            let host = match self.mapping(pos) {
                Mapping::Data(host) => host,
                Mapping::Zero(reserved) if whole => match reserved {
                    Some(host) => host,
                    None => self.allocate_data(pos)?,
                },
                Mapping::Below if whole => self.allocate_data(pos)?,
                // A partial write to a cluster the top does not hold as data: the rest of the
                // cluster comes from below (or is zeros), and the whole cluster is written.
                mapping => {
                    self.write_pending(buf, pending.take())?;
                    let start = pos - within;
                    let mut scratch = std::mem::take(&mut self.scratch);
                    scratch.resize(cluster as usize, 0);
                    if mapping == Mapping::Below {
                        let avail = (self.size - start).min(cluster) as usize;
                        below.read_below(&mut scratch[..avail], start)?;
                        scratch[avail..].fill(0);
                    } else {
                        scratch.fill(0);
                    }
                    scratch[within as usize..within as usize + len]
                        .copy_from_slice(&buf[done..done + len]);
                    let host = match mapping {
                        Mapping::Zero(Some(host)) => host,
                        _ => self.allocate_data(pos)?,
                    };
                    let written = self
                        .file
                        .write_all_at(&scratch, host)
                        .map_err(self.io_err("cannot write data"));
                    self.scratch = scratch;
                    written?;
                    self.set_data(pos, host);
                    done += len;
                    continue;
                }
            };
            self.set_data(pos, host);
            let at = host + within;
            *pending = match pending.take() {
                Some((file_at, start, n)) if file_at + n as u64 == at => {
                    Some((file_at, start, n + len))
                }
                other => {
                    self.write_pending(buf, other)?;
                    Some((at, done, len))
                }
            };
            done += len;
        }
        Ok(())
    }

    fn write_pending(
        &self,
        buf: &[u8],
        pending: Option<(u64, usize, usize)>,
    ) -> Result<(), ImageError> {
        match pending {
            Some((at, start, len)) => self
                .file
                .write_all_at(&buf[start..start + len], at)
                .map_err(self.io_err("cannot write data")),
            None => Ok(()),
        }
    }

    /// Points the cluster at virtual `offset` at file offset `host`, as data owned by the top.
    fn set_data(&mut self, offset: u64, host: u64) {
        let (l1, l2) = self.indices(offset);
        if let Some(table) = self.l2.get_mut(&l1) {
            let entry = host | COPIED;
            if table.entries[l2] != entry {
                table.entries[l2] = entry;
                table.dirty = true;
            }
        }
    }

    /// A new cluster for the data at virtual `offset`, after making sure its L2 table exists.
    fn allocate_data(&mut self, offset: u64) -> Result<u64, ImageError> {
        let (l1, _) = self.indices(offset);
        if l1 >= self.l1.entries.len() {
            return Err(self.corrupt("a write past the L1 table"));
        }
        if !self.l2.contains_key(&l1) {
            let table = self.allocate_cluster()?;
            self.l2.insert(
                l1,
                Table {
                    entries: vec![0; self.l2_entries() as usize],
                    dirty: true,
                },
            );
            self.l1.entries[l1] = table | COPIED;
            self.l1.dirty = true;
        }
        self.allocate_cluster()
    }

    /// Takes the next free cluster of the file, counting it in its refcount block; a cluster
    /// not yet covered by a block becomes the block that covers it and the next ones.
    fn allocate_cluster(&mut self) -> Result<u64, ImageError> {
        let per_block = self.cluster_size() / 2;
        loop {
            let index = self.next_free;
            let table_index = (index / per_block) as usize;
            if table_index >= self.refcount_table.entries.len() {
                return Err(self.corrupt("the image is full (its refcount table has no room)"));
            }
            self.next_free += 1;
            let slot = (index % per_block) as usize;
            if self.refcount_table.entries[table_index] == 0 {
                let mut entries = vec![0u16; per_block as usize];
                entries[slot] = 1;
                self.refcount_blocks.insert(
                    table_index,
                    Table {
                        entries,
                        dirty: true,
                    },
                );
                self.refcount_table.entries[table_index] = index << self.cluster_bits;
                self.refcount_table.dirty = true;
                continue;
            }
            let block = self.refcount_block(table_index)?;
            if block.entries[slot] == 0 {
                block.entries[slot] = 1;
                block.dirty = true;
                return Ok(index << self.cluster_bits);
            }
        }
    }

    fn refcount_block(&mut self, table_index: usize) -> Result<&mut Table<u16>, ImageError> {
        match self.refcount_blocks.entry(table_index) {
            Entry::Occupied(block) => Ok(block.into_mut()),
            Entry::Vacant(slot) => {
                let at = self.refcount_table.entries[table_index] & OFFSET_MASK;
                let mut bytes = vec![0u8; 1 << self.cluster_bits];
                if let Err(source) = self.file.read_exact_at(&mut bytes, at) {
                    return Err(ImageError::Top {
                        path: self.path.clone(),
                        what: "cannot read a refcount block",
                        source,
                    });
                }
                let entries = bytes
                    .chunks_exact(2)
                    .map(|b| u16::from_be_bytes([b[0], b[1]]))
                    .collect();
                Ok(slot.insert(Table::clean(entries)))
            }
        }
    }

    /// Writes the tables that changed: refcounts first, then the L2 tables, then L1, so that
    /// a table is on disk before anything points at it.
    pub fn flush_metadata(&mut self) -> Result<(), ImageError> {
        let err = |what| {
            let path = self.path.clone();
            move |source| ImageError::Top { path, what, source }
        };
        for (&index, block) in self.refcount_blocks.iter_mut().filter(|(_, b)| b.dirty) {
            let bytes: Vec<u8> = block.entries.iter().flat_map(|e| e.to_be_bytes()).collect();
            let at = self.refcount_table.entries[index] & OFFSET_MASK;
            self.file
                .write_all_at(&bytes, at)
                .map_err(err("cannot write a refcount block"))?;
            block.dirty = false;
        }
        if self.refcount_table.dirty {
            write_u64s(
                &self.file,
                self.refcount_table_offset,
                &self.refcount_table.entries,
            )
            .map_err(err("cannot write the refcount table"))?;
            self.refcount_table.dirty = false;
        }
        for (&index, table) in self.l2.iter_mut().filter(|(_, t)| t.dirty) {
            write_u64s(
                &self.file,
                self.l1.entries[index] & OFFSET_MASK,
                &table.entries,
            )
            .map_err(err("cannot write an L2 table"))?;
            table.dirty = false;
        }
        if self.l1.dirty {
            write_u64s(&self.file, self.l1_offset, &self.l1.entries)
                .map_err(err("cannot write the L1 table"))?;
            self.l1.dirty = false;
        }
        Ok(())
    }

    /// Writes the tables and makes the whole file durable.
    pub fn flush(&mut self) -> Result<(), ImageError> {
        self.flush_metadata()?;
        self.file
            .sync_data()
            .map_err(self.io_err("cannot sync the image"))
    }
}

/// Tables still only in memory are written when the engine goes away, so that no mapping of
/// data already in the file is lost with it.
impl Drop for Qcow2Top {
    fn drop(&mut self) {
        if let Err(err) = self.flush_metadata() {
            tracing::error!(%err, "writing qcow2 tables on close failed");
        }
    }
}

fn read_u64s(file: &File, offset: u64, count: u64) -> std::io::Result<Vec<u64>> {
    let mut bytes = vec![0u8; (count * 8) as usize];
    file.read_exact_at(&mut bytes, offset)?;
    Ok(bytes
        .chunks_exact(8)
        .map(|b| {
            let mut word = [0u8; 8];
            word.copy_from_slice(b);
            u64::from_be_bytes(word)
        })
        .collect())
}

fn write_u64s(file: &File, offset: u64, entries: &[u64]) -> std::io::Result<()> {
    let bytes: Vec<u8> = entries.iter().flat_map(|e| e.to_be_bytes()).collect();
    file.write_all_at(&bytes, offset)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::qcow2::chain::{BackingChain, Chain};
    use crate::qcow2::overlay::create_overlay;
    use crate::qcow2::test_utils::{checked_contents, qcow2_from, qemu_img};
    use crate::test_utils::{TempDir, pattern};

    /// A small deterministic generator (xorshift64) for the random workloads.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }
    }

    /// The engine over the image's backing chain, as virtio-blk holds a writable overlay.
    struct Overlay {
        top: Qcow2Top,
        below: Option<BackingChain>,
    }

    impl Overlay {
        fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<(), ImageError> {
            self.top.read_at(buf, offset, &mut self.below)
        }

        fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<(), ImageError> {
            self.top.write_at(buf, offset, &mut self.below)
        }
    }

    fn open_overlay(path: &Path) -> Overlay {
        let top = Qcow2Top::open(path).expect("the overlay opens");
        let top = top.unwrap_or_else(|| panic!("{} goes to vmfarm's engine", path.display()));
        let below = BackingChain::of(path).expect("its backing chain opens");
        Overlay { top, below }
    }

    /// Random writes (partial and whole clusters, across cluster edges) and reads, checked
    /// against the same writes on a plain buffer; then qemu-img checks the image and sees the
    /// same bytes, and a second open (from the tables on disk) reads them too.
    fn random_workload(dir: &Path, overlay: &Path, mut model: Vec<u8>, seed: u64) {
        let size = model.len() as u64;
        let mut rng = Rng(seed);
        let mut disk = open_overlay(overlay);
        let mut direct = 0;
        for round in 0..400 {
            let (start, len) = if round % 4 == 0 {
                // Whole clusters (of the 64 KiB overlays), which may go the direct way.
                let clusters = 1 + rng.below(8);
                let start = rng.below(size / (64 << 10) - clusters + 1) * (64 << 10);
                (start, (clusters * (64 << 10)) as usize)
            } else {
                let sectors = 1 + rng.below(if round % 5 == 0 { 1024 } else { 160 });
                (
                    rng.below(size / 512 - sectors + 1) * 512,
                    (sectors * 512) as usize,
                )
            };
            let range = start as usize..start as usize + len;
            if rng.below(3) == 0 {
                let mut got = vec![0u8; len];
                match disk.top.direct_read(start, len as u64) {
                    Some((file, at)) => file.read_exact_at(&mut got, at).unwrap(),
                    None => disk.read_at(&mut got, start).unwrap(),
                }
                assert!(
                    got == model[range],
                    "round {round}: read of {len} at {start}"
                );
            } else {
                let data = pattern(len, round as u8);
                // As the device does: straight to the file when the engine says where.
                match disk.top.direct_write(start, len as u64).unwrap() {
                    Some(DirectWrite { file, runs }) => {
                        direct += 1;
                        let mut done = 0;
                        for (at, n) in runs {
                            file.write_all_at(&data[done..done + n as usize], at)
                                .unwrap();
                            done += n as usize;
                        }
                        assert_eq!(done, len);
                    }
                    None => disk.write_at(&data, start).unwrap(),
                }
                model[range].copy_from_slice(&data);
            }
            if rng.below(40) == 0 {
                disk.top.flush_metadata().unwrap();
            }
        }
        assert!(direct > 20, "only {direct} direct writes");
        disk.top.flush().unwrap();
        drop(disk);
        assert!(
            checked_contents(dir, overlay) == model,
            "qemu-img sees the writes"
        );
        let mut disk = open_overlay(overlay);
        let mut all = vec![0u8; size as usize];
        disk.read_at(&mut all, 0).unwrap();
        assert!(all == model, "a fresh open reads the writes back");
    }

    #[test]
    fn test_overlay_over_a_base_takes_random_writes() {
        let dir = TempDir::new("top");
        let seed = pattern(6 << 20, 9);
        let base = qcow2_from(dir.path(), "base.qcow2", &seed);
        let before = std::fs::read(&base).unwrap();
        let overlay = dir.path().join("job.qcow2");
        create_overlay(&base, &overlay).unwrap();
        random_workload(dir.path(), &overlay, seed, 0x9e37_79b9_7f4a_7c15);
        assert_eq!(
            std::fs::read(&base).unwrap(),
            before,
            "the base is unchanged"
        );
    }

    #[test]
    fn test_small_clusters_grow_refcount_blocks_until_the_image_is_full() {
        // 512-byte clusters: a refcount block covers 256 clusters (128 KiB of file), so a few
        // MiB of writes need new refcount blocks, and the one-cluster refcount table (64
        // blocks, 8 MiB of file) runs out.
        let dir = TempDir::new("top");
        let base = qcow2_from(dir.path(), "base.qcow2", &pattern(2 << 20, 5));
        let overlay = dir.path().join("small.qcow2");
        let (b, o) = (base.to_str().unwrap(), overlay.to_str().unwrap());
        let small = |rest: &[&str]| {
            let args = ["create", "-q", "-f", "qcow2", "-o", "cluster_size=512"];
            qemu_img(&[&args[..], rest].concat());
        };
        small(&["-b", b, "-F", "qcow2", o]);
        random_workload(dir.path(), &overlay, pattern(2 << 20, 5), 7);

        let big = dir.path().join("big.qcow2");
        let g = big.to_str().unwrap();
        small(&[g, "16M"]);
        let mut disk = open_overlay(&big);
        let chunk = pattern(1 << 20, 3);
        let failed = (0..16u64).find_map(|i| disk.write_at(&chunk, i << 20).err());
        let err = failed.expect("16 MiB of data does not fit 8 MiB of refcount coverage");
        assert!(err.to_string().contains("full"), "{err}");
        // What was written before stays a consistent image.
        disk.top.flush().unwrap();
        drop(disk);
        qemu_img(&["check", g]);
    }

    #[test]
    fn test_standalone_image_and_zero_clusters() {
        let dir = TempDir::new("top");
        let image = dir.path().join("plain.qcow2");
        let p = image.to_str().unwrap();
        qemu_img(&["create", "-q", "-f", "qcow2", p, "4M"]);
        // qemu-io leaves a data cluster, a zero cluster over it (offset kept) and an
        // unallocated zero cluster.
        let qemu_io = |cmd: &str| {
            let out = std::process::Command::new("qemu-io")
                .args(["-f", "qcow2", "-c", cmd, p])
                .output()
                .expect("qemu-io runs");
            assert!(out.status.success(), "qemu-io {cmd}: {out:?}");
        };
        qemu_io("write -P 0x11 0 128k");
        qemu_io("write -z 64k 64k");
        qemu_io("write -z 1M 64k");
        let mut model = vec![0u8; 4 << 20];
        model[..64 << 10].fill(0x11);
        let mut disk = open_overlay(&image);
        let mut got = vec![0u8; 256 << 10];
        disk.read_at(&mut got, 0).unwrap();
        assert!(got == model[..256 << 10]);
        // A partial write into each zero cluster keeps the rest of it zero.
        disk.write_at(&pattern(1024, 1), (64 << 10) + 512).unwrap();
        disk.write_at(&pattern(1024, 2), (1 << 20) + 4096).unwrap();
        model[(64 << 10) + 512..(64 << 10) + 1536].copy_from_slice(&pattern(1024, 1));
        model[(1 << 20) + 4096..(1 << 20) + 5120].copy_from_slice(&pattern(1024, 2));
        drop(disk);
        random_workload(dir.path(), &image, model, 99);
    }

    #[test]
    fn test_images_it_does_not_take_go_to_qcow2_rs() {
        let dir = TempDir::new("top");
        for (name, options) in [
            ("v2.qcow2", "compat=0.10"),
            ("extended.qcow2", "extended_l2=on"),
            ("refcount8.qcow2", "refcount_bits=8"),
            ("lazy.qcow2", "lazy_refcounts=on"),
        ] {
            let image = dir.path().join(name);
            let p = image.to_str().unwrap();
            qemu_img(&["create", "-q", "-f", "qcow2", "-o", options, p, "1M"]);
            if name != "lazy.qcow2" {
                assert!(Qcow2Top::open(&image).unwrap().is_none(), "{name}");
            }
            // Lazy refcounts leave nothing this engine minds in a clean image; what the engine
            // does not take, qcow2-rs opens.
            let opened = match Qcow2Top::open(&image).unwrap() {
                Some(_) => true,
                None => Chain::open(&image, false).is_ok(),
            };
            assert!(opened || name == "extended.qcow2", "{name}");
        }
        // A compressed cluster in the top.
        let raw = dir.path().join("seed.raw");
        std::fs::write(&raw, pattern(1 << 20, 4)).unwrap();
        let packed = dir.path().join("packed.qcow2");
        let (r, c) = (raw.to_str().unwrap(), packed.to_str().unwrap());
        qemu_img(&["convert", "-c", "-f", "raw", "-O", "qcow2", r, c]);
        assert!(Qcow2Top::open(&packed).unwrap().is_none());
    }

    #[test]
    fn test_malformed_tables_are_refused_without_panics() {
        let dir = TempDir::new("top");
        let image = dir.path().join("bad.qcow2");
        let p = image.to_str().unwrap();
        qemu_img(&["create", "-q", "-f", "qcow2", p, "1M"]);
        let good = std::fs::read(&image).unwrap();
        // An L1 table far past the end of the file, a misaligned one, a huge one.
        for (at, value) in [(40, !0xffff_u64), (40, 0x10001), (36, 0xffff_ffff)] {
            let mut bytes = good.clone();
            let field = if at == 36 { 4 } else { 8 };
            bytes[at..at + field].copy_from_slice(&value.to_be_bytes()[8 - field..]);
            std::fs::write(&image, &bytes).unwrap();
            match Qcow2Top::open(&image) {
                Ok(None) => {}
                Ok(Some(_)) => panic!("bad field at {at} accepted"),
                Err(e) => assert!(e.to_string().contains("bad.qcow2"), "{e}"),
            }
        }
    }

    #[test]
    fn test_corrupted_tables_give_errors_not_panics() {
        // An overlay with data, then words of its tables overwritten at random: opening it,
        // reading all of it and writing all over it may fail, but never panics or hangs.
        let dir = TempDir::new("top");
        let base = qcow2_from(dir.path(), "base.qcow2", &pattern(1 << 20, 8));
        let good = dir.path().join("good.qcow2");
        create_overlay(&base, &good).unwrap();
        let mut disk = open_overlay(&good);
        for i in 0..8u64 {
            disk.write_at(&pattern(96 << 10, i as u8), i * (128 << 10) + 4096)
                .unwrap();
        }
        disk.top.flush().unwrap();
        drop(disk);
        let bytes = std::fs::read(&good).unwrap();
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        let image = dir.path().join("bad.qcow2");
        let mut opened = 0;
        for round in 0..60 {
            let mut bad = bytes.clone();
            for _ in 0..1 + rng.below(4) {
                // Header fields past the magic, the refcount table and block, L1, an L2 table.
                let at = (rng.below(bad.len() as u64 / 8) * 8) as usize;
                let at = if round % 2 == 0 { at % (5 << 16) } else { at };
                let word = match rng.below(4) {
                    0 => u64::MAX,
                    1 => rng.below(u64::MAX),
                    2 => (1 << 63) | (rng.below(1 << 20) << 16),
                    _ => 0,
                };
                bad[at.max(8)..at.max(8) + 8].copy_from_slice(&word.to_be_bytes());
            }
            std::fs::write(&image, &bad).unwrap();
            let Ok(Some(mut top)) = Qcow2Top::open(&image) else {
                continue;
            };
            opened += 1;
            let mut below: Option<BackingChain> = None;
            let size = top.size.min(4 << 20);
            let mut buf = vec![0u8; 64 << 10];
            for at in (0..size).step_by(64 << 10) {
                let _ = top.read_at(&mut buf, at, &mut below);
                let _ = top.write_at(&pattern(4096, 1), at + 512, &mut below);
                let _ = top.direct_write(at, 64 << 10);
            }
            let _ = top.flush();
        }
        assert!(opened >= 15, "only {opened} corrupted images got past open");
    }
}
