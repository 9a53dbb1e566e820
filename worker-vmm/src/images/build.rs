//! `vmfarm images build`: the rootfs and initramfs stages, each cached under the cache folder
//! by its inputs, then the image installed into `<images dir>/<name>/<version>/` by a rename.
//!
//! The rootfs stage (slow: mmdebstrap, mkfs) is keyed by the recipe alone and the initramfs
//! stage by the rootfs key and the agent, so a new agent rebuilds only the initramfs.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use sha2::{Digest as _, Sha256};

use super::manifest::{
    DISK, FileEntry, INITRD, ImageManifest, InstalledImage, KERNEL, MANIFEST, ROOTFS, SystemInfo,
    make_current,
};
use super::recipe::{BootMethod, Recipe};
use super::tools::{self, STRIP};
use super::{ImageError, firmware_disk, initrd, rootfs};

/// Bump when a stage's output changes for the same inputs.
const ROOTFS_FORMAT: &str = "vmfarm-rootfs-1";
const INITRD_FORMAT: &str = "vmfarm-initrd-1";
const DISK_FORMAT: &str = "vmfarm-firmware-disk-1";

#[derive(Debug, Clone)]
pub struct BuildOptions {
    pub images_dir: PathBuf,
    pub cache_dir: PathBuf,
    /// The static vmfarm-agent binary that becomes the initramfs's /init.
    pub agent: PathBuf,
}

#[derive(Debug, Clone)]
pub struct BuildReport {
    pub image: InstalledImage,
    /// The image was already installed: nothing was done.
    pub reused: bool,
    pub rootfs_cached: bool,
    pub initrd_cached: bool,
    pub seconds: f64,
}

pub fn sha256_file(path: &Path) -> Result<FileEntry, ImageError> {
    let mut file = File::open(path).map_err(|e| ImageError::io(path, e))?;
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf).map_err(|e| ImageError::io(path, e))?;
        if n == 0 {
            break;
        }
        size += n as u64;
        hash.update(&buf[..n]);
    }
    Ok(FileEntry {
        sha256: hex::encode(hash.finalize()),
        size,
    })
}

/// Whether this process's effective uid is 0 (from /proc/self/status, no libc call).
fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|l| l.starts_with("Uid:"))?;
            line.split_whitespace().nth(2).map(|euid| euid == "0")
        })
        .unwrap_or(false)
}

/// The sha256 and size of a file in a stage folder (which never changes once made), computed
/// once and kept beside it as `<file>.sha256`.
fn stage_file_entry(path: &Path) -> Result<FileEntry, ImageError> {
    let mut memo = path.as_os_str().to_owned();
    memo.push(".sha256");
    let memo = PathBuf::from(memo);
    if let Ok(text) = std::fs::read_to_string(&memo)
        && let Some((sha256, size)) = text.trim().split_once(' ')
        && let Ok(size) = size.parse()
    {
        return Ok(FileEntry {
            sha256: sha256.to_owned(),
            size,
        });
    }
    let entry = sha256_file(path)?;
    std::fs::write(&memo, format!("{} {}\n", entry.sha256, entry.size))
        .map_err(|e| ImageError::io(&memo, e))?;
    Ok(entry)
}

pub(super) fn key(parts: &[&str]) -> String {
    let mut hash = Sha256::new();
    for part in parts {
        hash.update(part.as_bytes());
        hash.update(b"\n");
    }
    hex::encode(hash.finalize())
}

/// The root filesystem stage's key (the recipe without `[package_manager]`), the initramfs
/// stage's (that and the agent) and the image's version (both, and the recipe's
/// `[package_manager]` when it has one, which the installed image's manifest carries).
fn keys(recipe: &Recipe, agent_sha256: &str) -> Result<(String, String, String), ImageError> {
    let rootfs_key = key(&[ROOTFS_FORMAT, &recipe_text(recipe)?]);
    let initrd_key = key(&[INITRD_FORMAT, &rootfs_key, agent_sha256]);
    let version = version(recipe, &[&rootfs_key, &initrd_key])?;
    Ok((rootfs_key, initrd_key, version))
}

/// The recipe as it keys its first stage (without `[package_manager]`).
fn recipe_text(recipe: &Recipe) -> Result<String, ImageError> {
    toml::to_string(&recipe.rootfs_inputs())
        .map_err(|e| ImageError::Rootfs(format!("encoding the recipe: {e}")))
}

/// An image's version: its stages' keys and the recipe's `[package_manager]` (which the
/// installed image's manifest carries), hashed, 12 hex digits.
fn version(recipe: &Recipe, stage_keys: &[&str]) -> Result<String, ImageError> {
    let mut parts = stage_keys.to_vec();
    let manager = match &recipe.package_manager {
        None => None,
        Some(manager) => Some(
            toml::to_string(manager)
                .map_err(|e| ImageError::Rootfs(format!("encoding the recipe: {e}")))?,
        ),
    };
    parts.extend(manager.as_deref());
    Ok(key(&parts)[..12].to_owned())
}

/// Removes a folder when dropped, unless disarmed.
pub(super) struct Scratch(Option<PathBuf>);

impl Scratch {
    pub(super) fn new(path: PathBuf) -> Result<Scratch, ImageError> {
        if path.exists() {
            std::fs::remove_dir_all(&path).map_err(|e| ImageError::io(&path, e))?;
        }
        std::fs::create_dir_all(&path).map_err(|e| ImageError::io(&path, e))?;
        Ok(Scratch(Some(path)))
    }
    pub(super) fn path(&self) -> &Path {
        self.0.as_deref().unwrap_or(Path::new(""))
    }
    /// Renames the folder to `to` and keeps it.
    fn keep_as(mut self, to: &Path) -> Result<(), ImageError> {
        let from = self.0.take().unwrap_or_default();
        std::fs::rename(&from, to).map_err(|e| ImageError::io(to, e))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = std::fs::remove_dir_all(path);
        }
    }
}

/// Holds an exclusive lock on `path` (created if missing) while alive.
pub(super) fn lock(path: &Path) -> Result<File, ImageError> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| ImageError::io(parent, e))?;
    }
    let file = File::create(path).map_err(|e| ImageError::io(path, e))?;
    file.lock().map_err(|e| ImageError::io(path, e))?;
    Ok(file)
}

/// `<cache>/<kind>/<key>`, made by `make` in a scratch folder unless it is there; returns it
/// and whether it was cached.
fn stage(
    cache: &Path,
    kind: &str,
    key: &str,
    make: impl FnOnce(&Path) -> Result<(), ImageError>,
) -> Result<(PathBuf, bool), ImageError> {
    let dir = cache.join(kind).join(key);
    let _lock = lock(&cache.join(kind).join(format!("{key}.lock")))?;
    if dir.is_dir() {
        return Ok((dir, true));
    }
    let scratch = Scratch::new(cache.join(kind).join(format!(".tmp-{key}")))?;
    make(scratch.path())?;
    scratch.keep_as(&dir)?;
    Ok((dir, false))
}

fn link_or_copy(from: &Path, to: &Path) -> Result<(), ImageError> {
    if std::fs::hard_link(from, to).is_ok() {
        return Ok(());
    }
    std::fs::copy(from, to)
        .map(drop)
        .map_err(|e| ImageError::io(to, e))
}

pub fn build(
    recipe: &Recipe,
    options: &BuildOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<BuildReport, ImageError> {
    if recipe.boot == BootMethod::Firmware {
        return build_firmware(recipe, options, progress);
    }
    let start = Instant::now();
    let mut needed = rootfs::tools_for(recipe);
    needed.push(STRIP);
    tools::require(&needed)?;
    if !running_as_root() {
        return Err(ImageError::NotRoot);
    }
    initrd::check_agent(&options.agent)?;
    let agent = sha256_file(&options.agent)?;
    let (rootfs_key, initrd_key, version) = keys(recipe, &agent.sha256)?;

    let image_dir = options.images_dir.join(&recipe.name);
    let final_dir = image_dir.join(&version);
    let _lock = lock(&image_dir.join(".lock"))?;
    if let Some(report) = reuse(&final_dir, &options.images_dir, &recipe.name, start)? {
        return Ok(report);
    }

    let (rootfs_dir, rootfs_cached) = stage(&options.cache_dir, "rootfs", &rootfs_key, |out| {
        write_system(out, &rootfs::build(recipe, out, progress)?)
    })?;
    if rootfs_cached {
        progress(&format!(
            "root filesystem: cached ({})",
            rootfs_dir.display()
        ));
    }
    let system = read_system(&rootfs_dir)?;

    let (initrd_dir, initrd_cached) = stage(&options.cache_dir, "initrd", &initrd_key, |out| {
        progress("initramfs: the agent and the modules");
        initrd::build(
            &options.agent,
            &rootfs_dir.join("modules"),
            &out.join(INITRD),
            out,
        )?;
        let init = out.join("init");
        std::fs::remove_file(&init).map_err(|e| ImageError::io(&init, e))
    })?;

    progress(&format!("installing {}/{version}", recipe.name));
    let scratch = Scratch::new(image_dir.join(format!(".tmp-{version}")))?;
    let mut files = BTreeMap::new();
    for (name, from) in [
        (KERNEL, rootfs_dir.join(KERNEL)),
        (INITRD, initrd_dir.join(INITRD)),
        (ROOTFS, rootfs_dir.join(ROOTFS)),
    ] {
        let to = scratch.path().join(name);
        link_or_copy(&from, &to)?;
        files.insert(name.to_owned(), stage_file_entry(&from)?);
    }
    let manifest = ImageManifest {
        name: recipe.name.clone(),
        version: version.clone(),
        boot: recipe.boot,
        built_at: now_secs(),
        system,
        files,
        package_manager: recipe.package_manager.clone(),
        firmware: None,
        user: None,
    };
    install(scratch, manifest, &options.images_dir, &final_dir).map(|image| BuildReport {
        image,
        reused: false,
        rootfs_cached,
        initrd_cached,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// A `boot = "firmware"` recipe: its disk stage ([`firmware_disk`], keyed by the recipe
/// alone: no agent goes into such an image), installed as `disk.qcow2`.
fn build_firmware(
    recipe: &Recipe,
    options: &BuildOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<BuildReport, ImageError> {
    let start = Instant::now();
    let mut needed = rootfs::tools_for(recipe);
    needed.extend(firmware_disk::TOOLS);
    tools::require(&needed)?;
    if !running_as_root() {
        return Err(ImageError::NotRoot);
    }
    let disk_key = key(&[DISK_FORMAT, &recipe_text(recipe)?]);
    let version = version(recipe, &[&disk_key])?;
    let image_dir = options.images_dir.join(&recipe.name);
    let final_dir = image_dir.join(&version);
    let _lock = lock(&image_dir.join(".lock"))?;
    if let Some(report) = reuse(&final_dir, &options.images_dir, &recipe.name, start)? {
        return Ok(report);
    }
    let (disk_dir, cached) = stage(&options.cache_dir, "disk", &disk_key, |out| {
        write_system(out, &firmware_disk::build(recipe, out, progress)?)
    })?;
    if cached {
        progress(&format!("disk: cached ({})", disk_dir.display()));
    }
    let system = read_system(&disk_dir)?;
    progress(&format!("installing {}/{version}", recipe.name));
    let scratch = Scratch::new(image_dir.join(format!(".tmp-{version}")))?;
    let from = disk_dir.join(DISK);
    link_or_copy(&from, &scratch.path().join(DISK))?;
    let files = BTreeMap::from([(DISK.to_owned(), stage_file_entry(&from)?)]);
    let manifest = ImageManifest {
        name: recipe.name.clone(),
        version: version.clone(),
        boot: recipe.boot,
        built_at: now_secs(),
        system,
        files,
        package_manager: recipe.package_manager.clone(),
        firmware: recipe.disk.as_ref().map(|d| d.firmware),
        user: None,
    };
    install(scratch, manifest, &options.images_dir, &final_dir).map(|image| BuildReport {
        image,
        reused: false,
        rootfs_cached: cached,
        initrd_cached: cached,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Writes `info` as `system.toml` beside a stage's output.
fn write_system(out: &Path, info: &SystemInfo) -> Result<(), ImageError> {
    let path = out.join("system.toml");
    let text = toml::to_string(info)
        .map_err(|e| ImageError::Rootfs(format!("encoding system.toml: {e}")))?;
    std::fs::write(&path, text).map_err(|e| ImageError::io(&path, e))
}

/// The image installed at `final_dir` already, made the one jobs run: the report of a build
/// that had nothing to do; `None` when it is not there.
pub(super) fn reuse(
    final_dir: &Path,
    images_dir: &Path,
    name: &str,
    start: Instant,
) -> Result<Option<BuildReport>, ImageError> {
    if !final_dir.join(MANIFEST).is_file() {
        return Ok(None);
    }
    let image = InstalledImage::read(final_dir)?;
    make_current(images_dir, name, &image.manifest.version)?;
    Ok(Some(BuildReport {
        image,
        reused: true,
        rootfs_cached: true,
        initrd_cached: true,
        seconds: start.elapsed().as_secs_f64(),
    }))
}

/// The `system.toml` a stage wrote beside its output.
fn read_system(stage_dir: &Path) -> Result<SystemInfo, ImageError> {
    let path = stage_dir.join("system.toml");
    let text = std::fs::read_to_string(&path).map_err(|e| ImageError::io(&path, e))?;
    toml::from_str(&text).map_err(|e| ImageError::BadManifest {
        path: path.clone(),
        message: e.to_string(),
    })
}

pub(super) fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Writes `manifest` into `scratch`, renames it to `final_dir` and makes it the version jobs
/// run.
pub(super) fn install(
    scratch: Scratch,
    manifest: ImageManifest,
    images_dir: &Path,
    final_dir: &Path,
) -> Result<InstalledImage, ImageError> {
    let text = toml::to_string(&manifest)
        .map_err(|e| ImageError::Rootfs(format!("encoding image.toml: {e}")))?;
    let path = scratch.path().join(MANIFEST);
    std::fs::write(&path, text).map_err(|e| ImageError::io(&path, e))?;
    scratch.keep_as(final_dir)?;
    make_current(images_dir, &manifest.name, &manifest.version)?;
    Ok(InstalledImage {
        dir: final_dir.to_owned(),
        manifest,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_stage_is_made_once_and_failures_leave_nothing() {
        let cache = std::env::temp_dir().join(format!("vmfarm-stage-{}", std::process::id()));
        let err = stage(&cache, "rootfs", "k1", |out| {
            std::fs::write(out.join("half"), "x").unwrap();
            Err(ImageError::NoSpace("test".into()))
        });
        assert!(matches!(err, Err(ImageError::NoSpace(_))));
        let left: Vec<_> = std::fs::read_dir(cache.join("rootfs"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(
            left,
            vec![std::ffi::OsString::from("k1.lock")],
            "no half-made stage is left"
        );

        let mut runs = 0;
        for expect_cached in [false, true] {
            let (dir, cached) = stage(&cache, "rootfs", "k1", |out| {
                runs += 1;
                std::fs::write(out.join("done"), "x").map_err(|e| ImageError::io(out, e))
            })
            .unwrap();
            assert_eq!(cached, expect_cached);
            assert!(dir.join("done").is_file());
        }
        assert_eq!(runs, 1);
        std::fs::remove_dir_all(&cache).unwrap();
    }

    #[test]
    fn test_stage_file_hashes_are_computed_once() {
        let dir = std::env::temp_dir().join(format!("vmfarm-stage-hash-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("kernel");
        std::fs::write(&file, "abc").unwrap();
        let first = stage_file_entry(&file).unwrap();
        assert_eq!(
            first.sha256,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(first.size, 3);
        std::fs::write(dir.join("kernel.sha256"), "memo 7\n").unwrap();
        assert_eq!(
            stage_file_entry(&file).unwrap(),
            FileEntry {
                sha256: "memo".into(),
                size: 7
            }
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn test_keys_depend_on_every_part() {
        assert_ne!(key(&["a", "bc"]), key(&["ab", "c"]));
        assert_eq!(key(&["a"]), key(&["a"]));
    }

    #[test]
    fn test_a_package_manager_changes_the_version_not_the_stages() {
        let recipes = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/images");
        let debian = Recipe::load("debian-12", &recipes).unwrap();
        let bare = Recipe {
            package_manager: None,
            ..debian.clone()
        };
        let (rootfs, initrd, version) = keys(&debian, "agent").unwrap();
        let (bare_rootfs, bare_initrd, bare_version) = keys(&bare, "agent").unwrap();
        assert_eq!(
            (&rootfs, &initrd),
            (&bare_rootfs, &bare_initrd),
            "the stages are reused"
        );
        assert_ne!(version, bare_version, "the image's manifest differs");
        // Without [package_manager] the version is what it always was.
        assert_eq!(bare_version, key(&[&bare_rootfs, &bare_initrd])[..12]);
        let text = toml::to_string(&bare).unwrap();
        assert_eq!(bare_rootfs, key(&[ROOTFS_FORMAT, &text]));
    }
}
