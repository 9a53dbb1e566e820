//! Template snapshots (`[warm_start]`): per image and job size, a guest saved when its agent
//! waited for a job, from which jobs' guests are restored instead of booted.
//!
//! Each lives in a folder of its own under the configured one, `<image>-<cpus>cpu-<MiB>mib`,
//! with `stamp.json`, what it was made from ([`Stamp`]); a job restores it only when its own
//! stamp is the same. The first job that finds none (or one made from another image version,
//! agent, VMM or command line) boots cold and has a new one made in the background, in a hidden
//! folder renamed into place once whole, so that a worker killed meanwhile leaves the previous
//! one (or none), never half of one.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

use super::budget::Budget;
use crate::backend::{Backend, BootSpec, SealedMemory, Snapshot};

const STAMP: &str = "stamp.json";
/// Its modification time: when a job was last restored from the snapshot.
const USED: &str = "used";

/// A snapshot unused this long makes room for a new one when the worker keeps
/// `max_templates` already (sooner, jobs of alternating sizes would have snapshots remade
/// again and again).
const UNUSED_FOR: Duration = Duration::from_secs(600);

/// What a snapshot was made from: a job restores it only if its own is the same.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stamp {
    pub image: String,
    pub image_version: String,
    /// The sha256 of the image's initramfs, which carries the agent.
    pub initrd_sha256: String,
    /// The backend's [`Backend::snapshot_version`].
    pub vmm: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// The kernel command line.
    pub cmdline: String,
}

impl Stamp {
    /// Why a snapshot stamped `self` is not the one `wanted`, in words.
    fn differs(&self, wanted: &Stamp) -> Option<String> {
        let field = |name: &str, made: &str, needed: &str| {
            (made != needed)
                .then(|| format!("it was made from {name} {made}, this job needs {needed}"))
        };
        field("image version", &self.image_version, &wanted.image_version)
            .or_else(|| {
                field(
                    "the initramfs (agent)",
                    &self.initrd_sha256,
                    &wanted.initrd_sha256,
                )
            })
            .or_else(|| field("the VMM", &self.vmm, &wanted.vmm))
            .or_else(|| field("the command line", &self.cmdline, &wanted.cmdline))
            .or_else(|| (self != wanted).then(|| "it was made for another guest".to_owned()))
    }
}

/// The worker's template snapshots.
pub struct Templates {
    dir: PathBuf,
    /// The worker's slots: a template's guest takes its size from them while it is made.
    budget: Arc<Budget>,
    /// The most snapshots kept (`warm_start.max_templates`).
    max: usize,
    state: Mutex<State>,
    /// Held (shared) by a restore from finding its snapshot until its VMM has opened all of it;
    /// held alone while a snapshot is replaced, so that no restore takes files of two.
    replacing: Arc<tokio::sync::RwLock<()>>,
}

#[derive(Default)]
struct State {
    /// The folders whose snapshot is being made.
    making: HashSet<String>,
    /// The snapshots whose making failed twice in a row, with the stamp they were for: not
    /// tried again for that stamp until the worker restarts.
    failed: HashMap<String, Stamp>,
    /// The sealed copies of the snapshots' memory that restores map, loaded once each.
    sealed: HashMap<String, Arc<SealedMemory>>,
    /// Whether the log said that no more snapshots are made.
    said_full: bool,
}

/// A snapshot to restore: its files, its memory's sealed copy, and the hold that keeps it from
/// being replaced until this is dropped.
pub struct Found {
    pub snapshot: Snapshot,
    pub memory: Arc<SealedMemory>,
    _held: tokio::sync::OwnedRwLockReadGuard<()>,
}

impl Templates {
    /// The snapshots in `dir`, at most `max` of them; what a previous run left half made there
    /// is removed.
    pub fn open(dir: &Path, max: usize, budget: Arc<Budget>) -> Templates {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if entry.file_name().to_string_lossy().starts_with('.') {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        Templates {
            dir: dir.to_owned(),
            budget,
            max,
            state: Mutex::default(),
            replacing: Arc::default(),
        }
    }

    fn name(stamp: &Stamp) -> String {
        format!("{}-{}cpu-{}mib", stamp.image, stamp.vcpus, stamp.memory_mib)
    }

    /// The snapshot to restore for a job stamped `wanted`, or why there is none.
    pub async fn find(&self, wanted: &Stamp) -> Result<Found, String> {
        let held = self.replacing.clone().read_owned().await;
        let name = Self::name(wanted);
        let snapshot = Snapshot {
            dir: self.dir.join(&name),
        };
        let described = format!(
            "the template snapshot of {} ({} vCPU, {} MiB)",
            wanted.image, wanted.vcpus, wanted.memory_mib
        );
        let text = match std::fs::read_to_string(snapshot.dir.join(STAMP)) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(format!("{described} is not made yet"));
            }
            Err(e) => return Err(format!("{described} cannot be read: {e}")),
        };
        let made: Stamp = serde_json::from_str(&text)
            .map_err(|e| format!("{described} has an unreadable {STAMP}: {e}"))?;
        if let Some(why) = made.differs(wanted) {
            return Err(format!("{described} is refused: {why}"));
        }
        let cached = self.lock().sealed.get(&name).cloned();
        let memory = match cached {
            Some(memory) => memory,
            None => {
                let memory = Arc::new(
                    load_sealed(snapshot.memory())
                        .await
                        .map_err(|e| format!("{described}'s memory cannot be read: {e}"))?,
                );
                self.lock().sealed.insert(name.clone(), memory.clone());
                memory
            }
        };
        // Its last use, kept across restarts (the eviction's order).
        let _ = std::fs::File::create(snapshot.dir.join(USED))
            .and_then(|f| f.set_modified(SystemTime::now()));
        Ok(Found {
            snapshot,
            memory,
            _held: held,
        })
    }

    /// Drops the snapshot stamped `stamp` (a guest restored from it did not come up): the next
    /// jobs boot cold, and have a new one made.
    pub fn forget(&self, stamp: &Stamp) {
        let name = Self::name(stamp);
        let _ = std::fs::remove_file(self.dir.join(&name).join(STAMP));
        self.lock().sealed.remove(&name);
    }

    /// Has the snapshot for `stamp` made in the background from `spec`'s guest, replacing the
    /// one there, once the worker's slots have room for it; unless it is being made, or its
    /// making failed for this stamp before, or the worker keeps as many snapshots as it may and
    /// none of them is unused for [`UNUSED_FOR`] (the one used longest ago then goes). What
    /// happens, in words for the job's log.
    pub fn make(
        self: &Arc<Self>,
        backend: Arc<dyn Backend>,
        spec: BootSpec,
        stamp: Stamp,
        timeout: Duration,
    ) -> &'static str {
        let name = Self::name(&stamp);
        let evicted = {
            let mut state = self.lock();
            if state.making.contains(&name) {
                return "a new snapshot is being made";
            }
            if state.failed.get(&name) == Some(&stamp) {
                return "making its snapshot failed before: the worker's log says why";
            }
            let kept: Vec<(String, SystemTime)> = std::fs::read_dir(&self.dir)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| !n.starts_with('.') && *n != name && !state.making.contains(n))
                .map(|n| {
                    // Never restored from: as of when it was made.
                    let at = |file| {
                        std::fs::metadata(self.dir.join(&n).join(file)).and_then(|m| m.modified())
                    };
                    let used = at(USED)
                        .or_else(|_| at(STAMP))
                        .unwrap_or(SystemTime::UNIX_EPOCH);
                    (n, used)
                })
                .collect();
            let room = room(&kept, state.making.len(), self.max, SystemTime::now());
            let Room::Made(evicted) = room else {
                if !std::mem::replace(&mut state.said_full, true) {
                    tracing::warn!(
                        dir = %self.dir.display(),
                        max = self.max,
                        "the worker keeps as many template snapshots as warm_start.max_templates allows, each used lately; jobs of other images and sizes boot cold"
                    );
                }
                return "the worker keeps warm_start.max_templates snapshots already, each used lately";
            };
            state.making.insert(name.clone());
            if let Some(old) = &evicted {
                // Counted as being made until it is gone.
                state.making.insert(old.clone());
            }
            evicted
        };
        let templates = self.clone();
        tokio::spawn(async move {
            let size = (spec.vcpus, u64::from(spec.memory_mib));
            let _share = templates.budget.take(size).await;
            let started = Instant::now();
            let mut saved = templates
                .save(backend.as_ref(), spec.clone(), &stamp, &name, timeout)
                .await;
            // A guest can fail to boot once (a host under load); a second failure stands.
            if let Err(e) = &saved {
                tracing::warn!(
                    template = %name,
                    error = format!("{e:#}"),
                    "making the template snapshot failed; trying once more"
                );
                saved = templates
                    .save(backend.as_ref(), spec, &stamp, &name, timeout)
                    .await;
            }
            // The old one makes room once the new one is there (a failed making keeps it).
            if let Some(old) = &evicted {
                match saved {
                    Ok(()) => templates.evict(old).await,
                    Err(_) => {
                        templates.lock().making.remove(old);
                    }
                }
            }
            let mut state = templates.lock();
            match saved {
                Ok(()) => tracing::info!(
                    template = %name,
                    seconds = started.elapsed().as_secs_f64(),
                    "made the template snapshot"
                ),
                Err(e) => {
                    tracing::warn!(
                        template = %name,
                        error = format!("{e:#}"),
                        "making the template snapshot failed; its jobs boot cold"
                    );
                    state.failed.insert(name.clone(), stamp);
                }
            }
            state.making.remove(&name);
        });
        "a new snapshot is being made"
    }

    /// Removes the snapshot `name` to make room, once no restore reads it.
    async fn evict(&self, name: &str) {
        let _alone = self.replacing.write().await;
        let removed = std::fs::remove_dir_all(self.dir.join(name));
        let mut state = self.lock();
        state.sealed.remove(name);
        state.making.remove(name);
        tracing::info!(template = %name, removed = removed.is_ok(), "template snapshot dropped: used longest ago, it makes room for another");
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn save(
        &self,
        backend: &dyn Backend,
        spec: BootSpec,
        stamp: &Stamp,
        name: &str,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        use anyhow::Context as _;
        let scratch = self.dir.join(format!(".{name}.new"));
        let _ = std::fs::remove_dir_all(&scratch);
        std::fs::create_dir_all(&scratch)
            .with_context(|| format!("creating {}", scratch.display()))?;
        let snapshot = Snapshot {
            dir: scratch.join("snapshot"),
        };
        let spec = BootSpec {
            run_dir: scratch.join("run"),
            caches: Vec::new(),
            ..spec
        };
        let placed = async {
            backend.save(&spec, &snapshot, timeout).await?;
            // The stamp goes last, after the files it vouches for are on the disk.
            for file in [snapshot.memory(), snapshot.disk(), snapshot.devices()] {
                std::fs::File::open(&file)
                    .and_then(|f| f.sync_all())
                    .with_context(|| format!("syncing {}", file.display()))?;
            }
            let text = serde_json::to_string_pretty(stamp)?;
            write_synced(&snapshot.dir.join(STAMP), text.as_bytes())?;
            let memory = load_sealed(snapshot.memory()).await?;
            self.replace(&snapshot.dir, name).await?;
            self.lock().sealed.insert(name.to_owned(), Arc::new(memory));
            Ok(())
        }
        .await;
        let _ = std::fs::remove_dir_all(&scratch);
        placed
    }

    /// Puts the folder `made` in the place of `name`'s, once no restore is reading a snapshot;
    /// the old one's files stay open for the guests restored from it.
    async fn replace(&self, made: &Path, name: &str) -> anyhow::Result<()> {
        let _alone = self.replacing.write().await;
        let place = self.dir.join(name);
        let old = self.dir.join(format!(".{name}.old"));
        let _ = std::fs::remove_dir_all(&old);
        match std::fs::rename(&place, &old) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        std::fs::rename(made, &place)?;
        std::fs::File::open(&self.dir)?.sync_all()?;
        self.lock().sealed.remove(name);
        let _ = std::fs::remove_dir_all(&old);
        Ok(())
    }
}

/// Whether there is room for one more snapshot.
#[derive(Debug, PartialEq, Eq)]
enum Room {
    /// Yes; first removing this one (used longest ago, unused for [`UNUSED_FOR`]) if named.
    Made(Option<String>),
    Full,
}

/// Whether a new snapshot may be made beside the `kept` ones (name, last use) and `making` more,
/// at most `max` in all.
fn room(kept: &[(String, SystemTime)], making: usize, max: usize, now: SystemTime) -> Room {
    if kept.len() + making < max {
        return Room::Made(None);
    }
    match kept.iter().min_by_key(|(_, used)| *used) {
        Some((name, used)) if now.duration_since(*used).unwrap_or(Duration::ZERO) >= UNUSED_FOR => {
            Room::Made(Some(name.clone()))
        }
        _ => Room::Full,
    }
}

/// The sealed copy of the memory file at `file`, made off the async threads.
async fn load_sealed(file: PathBuf) -> std::io::Result<SealedMemory> {
    tokio::task::spawn_blocking(move || SealedMemory::load(&file))
        .await
        .map_err(std::io::Error::other)?
}

fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut file = std::fs::File::create(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp() -> Stamp {
        Stamp {
            image: "tiny".into(),
            image_version: "v1".into(),
            initrd_sha256: "aa".into(),
            vmm: "QEMU 7.2 (Tcg)".into(),
            vcpus: 1,
            memory_mib: 512,
            cmdline: "console=ttyS0".into(),
        }
    }

    fn templates(dir: &Path) -> Templates {
        Templates::open(dir, 8, Arc::new(Budget::new(2, 2048)))
    }

    #[test]
    fn test_a_full_worker_makes_room_only_by_a_snapshot_unused_for_a_while() {
        let now = SystemTime::now();
        let at = |ago: u64| now - Duration::from_secs(ago);
        let kept = vec![
            ("tiny-1cpu-512mib".to_owned(), at(5)),
            ("debian-12-2cpu-2048mib".to_owned(), at(3600)),
        ];
        assert_eq!(room(&kept, 0, 3, now), Room::Made(None));
        assert_eq!(
            room(&kept, 1, 3, now),
            Room::Made(Some("debian-12-2cpu-2048mib".into()))
        );
        let lately = vec![
            ("tiny-1cpu-512mib".to_owned(), at(5)),
            ("b".to_owned(), at(60)),
        ];
        assert_eq!(
            room(&lately, 0, 2, now),
            Room::Full,
            "both used lately: no thrashing"
        );
        assert_eq!(
            room(&[], 2, 2, now),
            Room::Full,
            "only snapshots being made"
        );
    }

    #[tokio::test]
    async fn test_only_a_snapshot_of_the_same_stamp_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let templates = templates(dir.path());
        let wanted = stamp();
        let err = templates.find(&wanted).await.err().unwrap();
        assert!(
            err.contains("tiny (1 vCPU, 512 MiB) is not made yet"),
            "{err}"
        );
        let place = dir.path().join("tiny-1cpu-512mib");
        std::fs::create_dir_all(&place).unwrap();
        let made = Stamp {
            image_version: "v0".into(),
            ..stamp()
        };
        std::fs::write(place.join(STAMP), serde_json::to_string(&made).unwrap()).unwrap();
        let err = templates.find(&wanted).await.err().unwrap();
        assert!(
            err.contains("refused: it was made from image version v0, this job needs v1"),
            "{err}"
        );
        std::fs::write(place.join(STAMP), serde_json::to_string(&wanted).unwrap()).unwrap();
        let err = templates.find(&wanted).await.err().unwrap();
        assert!(err.contains("memory cannot be read"), "{err}");
        std::fs::write(place.join("memory"), b"the guest's memory").unwrap();
        let found = templates.find(&wanted).await.unwrap();
        assert_eq!(found.snapshot.dir, place);
        drop(found);
        templates.forget(&wanted);
        let err = templates.find(&wanted).await.err().unwrap();
        assert!(
            err.contains("is not made yet"),
            "a forgotten snapshot: {err}"
        );
        std::fs::write(place.join(STAMP), serde_json::to_string(&wanted).unwrap()).unwrap();
        let bigger = Stamp {
            memory_mib: 1024,
            ..stamp()
        };
        assert!(
            templates.find(&bigger).await.is_err(),
            "another size has its own"
        );
        std::fs::write(place.join(STAMP), "{").unwrap();
        let err = templates.find(&wanted).await.err().unwrap();
        assert!(err.contains("unreadable"), "{err}");
    }

    #[tokio::test]
    async fn test_a_half_made_snapshot_is_removed_and_a_whole_one_kept() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join(".tiny-1cpu-512mib.new/snapshot")).unwrap();
        std::fs::create_dir_all(dir.path().join("tiny-1cpu-512mib")).unwrap();
        let templates = templates(dir.path());
        assert!(!dir.path().join(".tiny-1cpu-512mib.new").exists());
        let made = dir.path().join("made");
        std::fs::create_dir_all(&made).unwrap();
        std::fs::write(made.join(STAMP), "new").unwrap();
        templates.replace(&made, "tiny-1cpu-512mib").await.unwrap();
        let text = std::fs::read_to_string(dir.path().join("tiny-1cpu-512mib").join(STAMP));
        assert_eq!(text.unwrap(), "new");
        assert!(!dir.path().join(".tiny-1cpu-512mib.old").exists());
    }
}
