//! The cache disks of jobs' `[[caches]]` (issue 18, part 2), kept per owner, image and name in
//! `[caches] dir`:
//!
//! ```text
//! DIR/.lock                       held (flock) by every change
//! DIR/OWNER/IMAGE/NAME/current    "N": the newest version
//! DIR/OWNER/IMAGE/NAME/used       its modification time: when a job last took the cache
//! DIR/OWNER/IMAGE/NAME/vN.qcow2   a version: a qcow2 overlay on an older one, or a whole disk
//! ```
//!
//! A job checks a cache out: its own overlay on the newest version (or on a new, empty ext4
//! disk of the asked size). When it succeeds, [`Caches::commit`] moves its overlay in as the
//! next version and then points `current` at it; each step is a rename after a sync, so a
//! worker killed at any point leaves `current` naming a version whose whole chain is there (the
//! previous one, or the new). A failed or cancelled job commits nothing. Two jobs that succeed
//! together each commit a whole disk: the last to commit wins, and the other's version is
//! dropped. Versions no longer in the newest's chain (and used by no running job) are removed;
//! a chain deeper than [`FLATTEN_AT`] is copied into one whole disk.

mod disk;

use crate::config::CachesConfig;
use crate::vmm::qcow2::header::Header;
use anyhow::{Context as _, Result, bail};
use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::io::Write as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use vmfarm_proto::units::ByteSize;
use vmfarm_proto::wire::{HeldCache, MAX_HELD_CACHES};

/// A chain this deep (versions) is copied into one whole disk after a commit.
pub const FLATTEN_AT: usize = 8;

/// Which cache: the owner's cache `name` for jobs of `image`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CacheKey {
    pub owner: String,
    pub image: String,
    pub name: String,
}

impl std::fmt::Display for CacheKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/{}", self.owner, self.image, self.name)
    }
}

impl std::str::FromStr for CacheKey {
    type Err = String;
    fn from_str(text: &str) -> Result<CacheKey, String> {
        let parts: Vec<&str> = text.split('/').collect();
        let [owner, image, name] = parts[..] else {
            return Err(format!("`{text}` is not OWNER/IMAGE/NAME"));
        };
        let key = CacheKey {
            owner: owner.into(),
            image: image.into(),
            name: name.into(),
        };
        key.check()?;
        Ok(key)
    }
}

impl CacheKey {
    /// Each part names one folder: not empty, no `/`, not starting with `.`.
    fn check(&self) -> Result<(), String> {
        for part in [&self.owner, &self.image, &self.name] {
            if part.is_empty() || part.starts_with('.') || part.contains(['/', '\0']) {
                return Err(format!("`{part}` cannot name a cache's folder"));
            }
        }
        Ok(())
    }
}

/// The worker's caches.
#[derive(Debug)]
pub struct Caches {
    dir: PathBuf,
    config: CachesConfig,
    /// Version files running jobs' overlays stand on, and how many jobs each.
    pinned: Mutex<HashMap<PathBuf, usize>>,
    /// [`Caches::held`]'s last answer and when it was read: the worker asks before each lease
    /// request; a change of this worker's forgets it, another process's shows within
    /// [`HELD_FOR`].
    held: Mutex<Option<(Instant, Vec<HeldCache>)>>,
}

/// How long [`Caches::held`]'s answer is kept.
const HELD_FOR: Duration = Duration::from_secs(10);

/// A job's copy of a cache: its overlay, and the version under it.
#[derive(Debug)]
pub struct CheckedOut {
    pub key: CacheKey,
    /// The job's overlay (a qcow2 file the worker made, given to the guest as a disk).
    pub overlay: PathBuf,
    /// The version the job started on; `None`: a new, empty disk.
    pub started_on: Option<u64>,
    pub size: ByteSize,
    /// Why the cache starts empty, when it does.
    pub why_empty: Option<String>,
    base: PathBuf,
    /// The base's device and inode: a cache dropped and made again meanwhile has another.
    base_id: (u64, u64),
    /// Every file of the base's chain, kept by [`Caches::tidy`] while the job runs.
    pins: Vec<PathBuf>,
    caches: Arc<Caches>,
}

impl Drop for CheckedOut {
    fn drop(&mut self) {
        let mut pinned = self.caches.pinned.lock().unwrap_or_else(|e| e.into_inner());
        for pin in &self.pins {
            if let Some(n) = pinned.get_mut(pin) {
                *n -= 1;
                if *n == 0 {
                    pinned.remove(pin);
                }
            }
        }
    }
}

/// One cache as `vmfarm caches list` shows it.
#[derive(Debug, Clone)]
pub struct CacheInfo {
    pub key: CacheKey,
    pub version: u64,
    pub size: ByteSize,
    /// What its files take on the host's disk.
    pub bytes: u64,
    pub used: SystemTime,
    /// Versions in its chain.
    pub depth: usize,
}

/// The exclusive lock on the whole store, held while anything changes.
struct Locked {
    _flock: nix::fcntl::Flock<File>,
}

impl Caches {
    /// Opens (making it if need be) the store of `config`.
    pub fn open(config: &CachesConfig) -> Result<Arc<Caches>> {
        std::fs::create_dir_all(&config.dir)
            .with_context(|| format!("creating {}", config.dir.display()))?;
        let dir = std::fs::canonicalize(&config.dir)?;
        Ok(Arc::new(Caches {
            dir,
            config: config.clone(),
            pinned: Mutex::new(HashMap::new()),
            held: Mutex::new(None),
        }))
    }

    /// The store of the worker `config` is for, tidied as the worker starts (it alone may: it
    /// knows which files its jobs use): what a killed worker left half done goes, and so do
    /// caches past their age or beyond the total size.
    pub fn open_for_worker(config: &CachesConfig) -> Result<Arc<Caches>> {
        let caches = Self::open(config)?;
        let _lock = caches.lock()?;
        for key in caches.keys()? {
            if let Err(e) = caches.tidy(&key) {
                tracing::warn!(cache = %key, error = %format!("{e:#}"), "dropping a cache that cannot be read");
                std::fs::remove_dir_all(caches.folder(&key))?;
            }
        }
        caches.evict_locked(None)?;
        Ok(caches)
    }

    fn lock(&self) -> Result<Locked> {
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.dir.join(".lock"))?;
        nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
            .map(|flock| Locked { _flock: flock })
            .map_err(|(_, e)| anyhow::Error::from(e).context("locking the caches"))
    }

    fn folder(&self, key: &CacheKey) -> PathBuf {
        self.dir.join(&key.owner).join(&key.image).join(&key.name)
    }

    /// Checks `key` out for a job whose manifest asks for `size`: makes the job's overlay at
    /// `overlay` on the newest version, or on a new empty disk when there is none (or the
    /// newest has another size). Blocking.
    pub fn check_out(
        self: &Arc<Self>,
        key: &CacheKey,
        size: ByteSize,
        overlay: &Path,
    ) -> Result<CheckedOut> {
        key.check().map_err(anyhow::Error::msg)?;
        if size.0 > self.config.max_size.0 {
            bail!(
                "the cache `{}` asks for {size}; this worker keeps caches of at most {} ([caches] max_size)",
                key.name,
                self.config.max_size
            );
        }
        let _lock = self.lock()?;
        let folder = self.folder(key);
        std::fs::create_dir_all(&folder)?;
        // What failed jobs left (a new disk no job stored on) goes first.
        self.tidy(key)?;
        let newest = current(&folder)?;
        let (base, started_on, why_empty) = match newest {
            Some(n) => {
                let file = version_file(&folder, n);
                let has = virtual_size(&file)?;
                if has == size.0 {
                    (file, Some(n), None)
                } else {
                    let why = format!(
                        "it was {}, the manifest asks for {size}: it starts empty",
                        ByteSize(has)
                    );
                    (self.new_disk(&folder, size)?, None, Some(why))
                }
            }
            None => (
                self.new_disk(&folder, size)?,
                None,
                Some("there is none yet: it starts empty".to_owned()),
            ),
        };
        crate::vmm::qcow2::overlay::create_overlay(&base, overlay)
            .context("making the job's overlay on the cache")?;
        touch(&folder.join("used"))?;
        let pins = chain(&base)?;
        let mut pinned = self.pinned.lock().unwrap_or_else(|e| e.into_inner());
        for pin in &pins {
            *pinned.entry(pin.clone()).or_default() += 1;
        }
        drop(pinned);
        let meta = std::fs::metadata(&base)?;
        Ok(CheckedOut {
            base_id: (meta.dev(), meta.ino()),
            pins,
            key: key.clone(),
            overlay: overlay.to_owned(),
            started_on,
            size,
            why_empty,
            base,
            caches: self.clone(),
        })
    }

    /// A new, empty disk of `size` in `folder`, as its next version file (not yet current).
    fn new_disk(&self, folder: &Path, size: ByteSize) -> Result<PathBuf> {
        let file = version_file(folder, next_version(folder)?);
        disk::make_empty(&file, size)?;
        Ok(file)
    }

    /// Makes what `job` wrote the newest version of its cache, after its guest has ended; says
    /// what became of it. Blocking.
    pub fn commit(&self, job: CheckedOut) -> Result<String> {
        let _lock = self.lock()?;
        let folder = self.folder(&job.key);
        let same_base =
            std::fs::metadata(&job.base).is_ok_and(|m| (m.dev(), m.ino()) == job.base_id);
        if !folder.is_dir() || !same_base {
            bail!("the cache was dropped while the job ran: not stored");
        }
        let newest = current(&folder)?;
        let next = next_version(&folder)?;
        // A copy, checked as copied: what the VMM may still write to its file changes nothing.
        check_length(&job.overlay, job.size)?;
        let incoming = folder.join("incoming.tmp");
        std::fs::copy(&job.overlay, &incoming)?;
        if let Err(e) = check_overlay(&incoming, &job.base, job.size) {
            std::fs::remove_file(&incoming)?;
            return Err(e);
        }
        set_mode(&incoming, 0o644)?;
        File::open(&incoming)?.sync_all()?;
        let file = version_file(&folder, next);
        std::fs::rename(&incoming, &file)?;
        sync_dir(&folder)?;
        // `current` names a version only once its whole chain opens.
        let mut top = (next, chain(&file)?.len());
        if top.1 >= FLATTEN_AT {
            let whole = version_file(&folder, next + 1);
            disk::flatten(&file, &whole)?;
            top = (next + 1, chain(&whole)?.len());
        }
        set_current(&folder, top.0)?;
        let mut said = format!("stored as version {}", top.0);
        if top.0 != next {
            said.push_str(" (its chain copied into one disk)");
        }
        if job.started_on.is_some() && newest != job.started_on {
            said.push_str(&format!(
                " (version {} was stored by another job while this one ran: the last job to succeed wins)",
                newest.unwrap_or(0)
            ));
        }
        let key = job.key.clone();
        drop(job);
        self.tidy(&key)?;
        self.changed();
        self.evict_locked(Some(&key))?;
        Ok(said)
    }

    /// Removes what the newest version does not stand on and no running job uses.
    fn tidy(&self, key: &CacheKey) -> Result<()> {
        let folder = self.folder(key);
        let mut keep: BTreeSet<PathBuf> = match current(&folder)? {
            Some(n) => chain(&version_file(&folder, n))?.into_iter().collect(),
            None => BTreeSet::new(),
        };
        for chained in &keep {
            if chained.parent() != Some(folder.as_path()) {
                bail!("its chain leaves its folder ({})", chained.display());
            }
        }
        keep.extend(
            self.pinned
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .keys()
                .cloned(),
        );
        for entry in std::fs::read_dir(&folder)?.flatten() {
            let path = entry.path();
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let version = name.starts_with('v') && name.ends_with(".qcow2");
            if (version || name.ends_with(".tmp")) && !keep.contains(&path) {
                std::fs::remove_file(&path)?;
            }
        }
        Ok(())
    }

    /// Every cache in the store.
    fn keys(&self) -> Result<Vec<CacheKey>> {
        let mut keys = Vec::new();
        for owner in subfolders(&self.dir)? {
            for image in subfolders(&self.dir.join(&owner))? {
                for name in subfolders(&self.dir.join(&owner).join(&image))? {
                    keys.push(CacheKey {
                        owner: owner.clone(),
                        image: image.clone(),
                        name,
                    });
                }
            }
        }
        Ok(keys)
    }

    /// The caches with a version, as a lease reports them: at most
    /// [`MAX_HELD_CACHES`], those used last first.
    pub fn held(&self) -> Result<Vec<HeldCache>> {
        let mut kept = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((read, held)) = kept.as_ref()
            && read.elapsed() < HELD_FOR
        {
            return Ok(held.clone());
        }
        let held = self.read_held()?;
        *kept = Some((Instant::now(), held.clone()));
        Ok(held)
    }

    /// Forgets [`Caches::held`]'s answer: a cache was stored or dropped.
    fn changed(&self) {
        *self.held.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    fn read_held(&self) -> Result<Vec<HeldCache>> {
        let mut held = Vec::new();
        for key in self.keys()? {
            let folder = self.folder(&key);
            if folder.join("current").exists() {
                let used = std::fs::metadata(folder.join("used")).and_then(|m| m.modified());
                held.push((used.unwrap_or(SystemTime::UNIX_EPOCH), key));
            }
        }
        held.sort_by_key(|(used, _)| std::cmp::Reverse(*used));
        Ok(held
            .into_iter()
            .take(MAX_HELD_CACHES)
            .map(|(_, key)| HeldCache {
                owner: key.owner,
                image: key.image,
                name: key.name,
            })
            .collect())
    }

    /// Every cache with a version, oldest use first.
    pub fn list(&self) -> Result<Vec<CacheInfo>> {
        let mut out = Vec::new();
        for key in self.keys()? {
            let folder = self.folder(&key);
            let Some(version) = current(&folder)? else {
                continue;
            };
            let file = version_file(&folder, version);
            let found = virtual_size(&file).and_then(|size| Ok((size, chain(&file)?.len())));
            let (size, depth) = match found {
                Ok(found) => found,
                Err(e) => {
                    tracing::warn!(cache = %key, error = %format!("{e:#}"), "a cache cannot be read");
                    continue;
                }
            };
            let bytes = std::fs::read_dir(&folder)?
                .flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.blocks() * 512)
                .sum();
            out.push(CacheInfo {
                size: ByteSize(size),
                depth,
                used: std::fs::metadata(folder.join("used"))
                    .and_then(|m| m.modified())
                    .unwrap_or(SystemTime::UNIX_EPOCH),
                key,
                version,
                bytes,
            });
        }
        out.sort_by_key(|c| c.used);
        Ok(out)
    }

    /// Drops a cache whole; whether there was one. A job running on it keeps its files until
    /// it ends, and stores nothing.
    pub fn drop_cache(&self, key: &CacheKey) -> Result<bool> {
        key.check().map_err(anyhow::Error::msg)?;
        let _lock = self.lock()?;
        let folder = self.folder(key);
        if !folder.exists() {
            return Ok(false);
        }
        std::fs::remove_dir_all(&folder)?;
        self.changed();
        Ok(true)
    }

    /// Drops caches unused for `max_age`, then those used longest ago while all take more than
    /// `total_size`; never one a running job uses, nor `stored` (just stored). Each is said in
    /// the worker's log.
    fn evict_locked(&self, stored: Option<&CacheKey>) -> Result<()> {
        let in_use: BTreeSet<PathBuf> = self
            .pinned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .filter_map(|p| p.parent().map(Path::to_path_buf))
            .collect();
        let mut listed = self.list()?;
        let mut total: u64 = listed.iter().map(|c| c.bytes).sum();
        listed.retain(|c| !in_use.contains(&self.folder(&c.key)) && Some(&c.key) != stored);
        let now = SystemTime::now();
        for cache in listed {
            let age = now.duration_since(cache.used).unwrap_or(Duration::ZERO);
            let why = if age > self.config.max_age.0 {
                "unused for longer than [caches] max_age"
            } else if total > self.config.total_size.0 {
                "the caches took more than [caches] total_size; it was used longest ago"
            } else {
                continue;
            };
            std::fs::remove_dir_all(self.folder(&cache.key))?;
            tracing::info!(cache = %cache.key, why, "cache dropped");
            total = total.saturating_sub(cache.bytes);
            self.changed();
        }
        Ok(())
    }
}

fn version_file(folder: &Path, n: u64) -> PathBuf {
    folder.join(format!("v{n}.qcow2"))
}

/// The newest version, as `current` names it.
fn current(folder: &Path) -> Result<Option<u64>> {
    match std::fs::read_to_string(folder.join("current")) {
        Ok(text) => Ok(Some(text.trim().parse().with_context(|| {
            format!("{}/current does not hold a version", folder.display())
        })?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Points `current` at version `n`: written beside, synced, renamed over, the folder synced.
fn set_current(folder: &Path, n: u64) -> Result<()> {
    let tmp = folder.join("current.tmp");
    let mut file = File::create(&tmp)?;
    writeln!(file, "{n}")?;
    file.sync_all()?;
    std::fs::rename(&tmp, folder.join("current"))?;
    sync_dir(folder)
}

/// One past the highest version file in `folder`.
fn next_version(folder: &Path) -> Result<u64> {
    let mut highest = 0;
    for entry in std::fs::read_dir(folder)?.flatten() {
        let name = entry.file_name();
        let n = name
            .to_str()
            .and_then(|n| n.strip_prefix('v'))
            .and_then(|n| n.strip_suffix(".qcow2"))
            .and_then(|n| n.parse::<u64>().ok());
        highest = highest.max(n.unwrap_or(0));
    }
    Ok(highest + 1)
}

/// `file` and the files under it, top first.
fn chain(file: &Path) -> Result<Vec<PathBuf>> {
    let mut out = vec![file.to_owned()];
    while out.len() <= crate::vmm::qcow2::MAX_BACKING_DEPTH {
        let at = out.last().expect("not empty");
        let opened = File::open(at).with_context(|| format!("opening {}", at.display()))?;
        let header = Header::read(&opened)?
            .with_context(|| format!("{} is not a qcow2 file", at.display()))?;
        match header.backing_file(&opened)? {
            Some(name) => out.push(PathBuf::from(name)),
            None => return Ok(out),
        }
    }
    bail!("{}: its chain is too deep", file.display())
}

fn virtual_size(file: &Path) -> Result<u64> {
    let opened = File::open(file).with_context(|| format!("opening {}", file.display()))?;
    Ok(Header::read(&opened)?
        .with_context(|| format!("{} is not a qcow2 file", file.display()))?
        .size)
}

/// Refuses an overlay that is not the one the worker made on `base` (the guest's VMM wrote it:
/// a header naming another backing file would hand later jobs a file of the host).
fn check_overlay(overlay: &Path, base: &Path, size: ByteSize) -> Result<()> {
    check_length(overlay, size)?;
    let opened = File::open(overlay)?;
    let header = Header::read(&opened)?.context("the job's cache disk is not a qcow2 file")?;
    let backing = header.backing_file(&opened)?;
    // No feature the worker's overlay does not have: an external data file above all.
    if backing.as_deref() != base.to_str()
        || header.size != size.0
        || header.incompatible_features != 0
        || header.autoclear_features != 0
    {
        bail!(
            "the job's cache disk is not the overlay the worker made (its header changed): not stored"
        );
    }
    Ok(())
}

/// Refuses a disk file longer than a whole `size` disk and its metadata could be.
fn check_length(overlay: &Path, size: ByteSize) -> Result<()> {
    let len = std::fs::metadata(overlay)?.len();
    if len > size.0 + size.0 / 16 + 16 * (1 << 20) {
        bail!(
            "the job's cache disk file is {}, more than a {size} disk can take: not stored",
            ByteSize(len)
        );
    }
    Ok(())
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

fn touch(path: &Path) -> Result<()> {
    File::create(path)?.set_modified(SystemTime::now())?;
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)?.sync_all()?;
    Ok(())
}

/// The folders in `dir` (none when it is gone: a cache dropped meanwhile).
fn subfolders(dir: &Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e.into()),
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with('.') && entry.file_type()?.is_dir() {
            out.push(name);
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests;
