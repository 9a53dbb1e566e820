//! `image.toml`, the manifest of an installed image, and the listing of an images directory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::ImageError;
use super::recipe::{BootMethod, Firmware, PackageManager};

pub const MANIFEST: &str = "image.toml";
pub const KERNEL: &str = "kernel";
pub const INITRD: &str = "initrd";
pub const ROOTFS: &str = "rootfs.qcow2";
/// A firmware-booted image's whole disk.
pub const DISK: &str = "disk.qcow2";
/// The user a firmware-booted image's guest runs the build as, unless its manifest names one.
pub const DEFAULT_USER: &str = "build";

/// What the guest system is, read from the built root filesystem.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SystemInfo {
    /// `ID` of the guest's /etc/os-release.
    pub os: String,
    /// `VERSION_ID` of the guest's /etc/os-release.
    pub release: String,
    pub pretty_name: String,
    /// The kernel's release (`uname -r`).
    pub kernel_version: String,
    /// The recipe's packages (and the kernel's) with their installed versions.
    pub packages: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub sha256: String,
    pub size: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageManifest {
    pub name: String,
    pub version: String,
    pub boot: BootMethod,
    /// Unix seconds.
    pub built_at: u64,
    #[serde(flatten)]
    pub system: SystemInfo,
    /// kernel, initrd, rootfs.qcow2 (booted by Linux); disk.qcow2 (booted by firmware).
    pub files: BTreeMap<String, FileEntry>,
    /// The recipe's `[package_manager]`: how a job's `packages` are installed in this image and
    /// which hosts that step may reach. `None` (also in images built before the key existed):
    /// the image has no package manager.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub package_manager: Option<PackageManager>,
    /// The firmware that boots it (`boot = "firmware"` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware: Option<Firmware>,
    /// The build user cloud-init makes in its guests (`boot = "firmware"` only; `build` when
    /// absent). Its home is /home/build whatever its name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

/// An image in an images directory: `<dir>/<name>/<version>/`.
#[derive(Debug, Clone)]
pub struct InstalledImage {
    pub dir: PathBuf,
    pub manifest: ImageManifest,
}

impl InstalledImage {
    pub fn kernel(&self) -> PathBuf {
        self.dir.join(KERNEL)
    }
    pub fn initrd(&self) -> PathBuf {
        self.dir.join(INITRD)
    }
    pub fn rootfs(&self) -> PathBuf {
        self.dir.join(ROOTFS)
    }
    /// The disk the guest's overlay goes on: the root file system, or the whole disk.
    pub fn base_disk(&self) -> PathBuf {
        match self.manifest.boot {
            BootMethod::Linux => self.rootfs(),
            BootMethod::Firmware => self.dir.join(DISK),
        }
    }
    /// The firmware that boots it, when it boots by firmware.
    pub fn firmware(&self) -> Option<Firmware> {
        match self.manifest.boot {
            BootMethod::Linux => None,
            BootMethod::Firmware => Some(self.manifest.firmware.unwrap_or(Firmware::Uefi)),
        }
    }
    /// The user the build runs as in a firmware-booted guest.
    pub fn user(&self) -> &str {
        self.manifest.user.as_deref().unwrap_or(DEFAULT_USER)
    }

    /// How a job's `packages` are installed in this image, or why they cannot be: a message for
    /// the job's log that names the image.
    pub fn package_manager(&self) -> Result<&PackageManager, String> {
        self.manifest.package_manager.as_ref().ok_or_else(|| {
            format!(
                "image {} ({}) has no package manager, so it cannot install the manifest's `packages`: \
                 run the job on an image whose recipe has [package_manager] (like debian-12), \
                 or remove `packages`",
                self.manifest.name, self.manifest.version
            )
        })
    }

    pub fn read(dir: &Path) -> Result<InstalledImage, ImageError> {
        let path = dir.join(MANIFEST);
        let text = std::fs::read_to_string(&path).map_err(|e| ImageError::io(&path, e))?;
        let manifest = toml::from_str(&text).map_err(|e| ImageError::BadManifest {
            path,
            message: e.to_string(),
        })?;
        Ok(InstalledImage {
            dir: dir.to_owned(),
            manifest,
        })
    }
}

/// Every image in `images_dir`, by name, oldest build first. Folders being built (dot names)
/// and folders without a readable manifest are skipped.
pub fn list(images_dir: &Path) -> Result<Vec<InstalledImage>, ImageError> {
    let mut images = Vec::new();
    let names = match std::fs::read_dir(images_dir) {
        Ok(names) => names,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(images),
        Err(e) => return Err(ImageError::io(images_dir, e)),
    };
    for name in names.flatten() {
        let Ok(versions) = std::fs::read_dir(name.path()) else {
            continue;
        };
        for version in versions.flatten() {
            if version.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            if let Ok(image) = InstalledImage::read(&version.path()) {
                images.push(image);
            }
        }
    }
    images.sort_by(|a, b| {
        (&a.manifest.name, a.manifest.built_at, &a.manifest.version).cmp(&(
            &b.manifest.name,
            b.manifest.built_at,
            &b.manifest.version,
        ))
    });
    Ok(images)
}

/// The file in an image's folder that names the version jobs run.
const CURRENT: &str = ".current";

/// The version of each image that jobs run (CONTRACTS.md "Names"): the one `vmfarm images
/// build` built or found installed last, as its folder's `.current` names it; the one built
/// last where there is no such file (images installed before it existed, or copied by hand).
pub fn current(images_dir: &Path) -> Result<BTreeMap<String, InstalledImage>, ImageError> {
    let mut chosen: BTreeMap<String, InstalledImage> = BTreeMap::new();
    let mut named: BTreeMap<String, String> = BTreeMap::new();
    // `list` is sorted oldest first: a later version replaces an earlier one, unless the
    // earlier one is named current.
    for image in list(images_dir)? {
        let name = image.manifest.name.clone();
        let current = named.entry(name.clone()).or_insert_with(|| {
            std::fs::read_to_string(images_dir.join(&name).join(CURRENT))
                .map(|text| text.trim().to_owned())
                .unwrap_or_default()
        });
        if chosen
            .get(&name)
            .is_none_or(|kept| kept.manifest.version != *current)
        {
            chosen.insert(name, image);
        }
    }
    Ok(chosen)
}

/// Makes `version` of image `name` the one jobs run (written whole or not at all).
pub fn make_current(images_dir: &Path, name: &str, version: &str) -> Result<(), ImageError> {
    let dir = images_dir.join(name);
    let temp = dir.join(".current.tmp");
    std::fs::write(&temp, format!("{version}\n")).map_err(|e| ImageError::io(&temp, e))?;
    let path = dir.join(CURRENT);
    std::fs::rename(&temp, &path).map_err(|e| ImageError::io(&path, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::images::recipe::PackageManagerKind;

    fn manifest(name: &str, version: &str, built_at: u64) -> ImageManifest {
        ImageManifest {
            name: name.into(),
            version: version.into(),
            boot: BootMethod::Linux,
            built_at,
            system: SystemInfo {
                os: "debian".into(),
                release: "12".into(),
                pretty_name: "Debian GNU/Linux 12 (bookworm)".into(),
                kernel_version: "6.1.0-56-cloud-amd64".into(),
                packages: BTreeMap::from([("git".into(), "1:2.39.5-0+deb12u2".into())]),
            },
            firmware: None,
            user: None,
            files: BTreeMap::from([(
                "kernel".into(),
                FileEntry {
                    sha256: "ab".into(),
                    size: 1,
                },
            )]),
            package_manager: None,
        }
    }

    #[test]
    fn test_list_and_current_read_installed_manifests() {
        let dir = std::env::temp_dir().join(format!("vmfarm-images-list-{}", std::process::id()));
        for (version, at) in [("aaa", 10), ("bbb", 20)] {
            let d = dir.join("debian-12").join(version);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(
                d.join(MANIFEST),
                toml::to_string(&manifest("debian-12", version, at)).unwrap(),
            )
            .unwrap();
        }
        std::fs::create_dir_all(dir.join("debian-12/.tmp-ccc")).unwrap();
        let all = list(&dir).unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].manifest, manifest("debian-12", "aaa", 10));
        let version = |dir: &Path| current(dir).unwrap()["debian-12"].manifest.version.clone();
        // Without `.current`, the one built last.
        assert_eq!(version(&dir), "bbb");
        assert!(!current(&dir).unwrap().contains_key("tiny"));
        // An older version built again (found installed) is the one jobs run.
        make_current(&dir, "debian-12", "aaa").unwrap();
        assert_eq!(version(&dir), "aaa");
        assert_eq!(list(&dir).unwrap().len(), 2, "`.current` is no image");
        // A name that is not an installed version is passed over.
        for bad in ["gone", "../debian-12/bbb", ".tmp-ccc", ""] {
            std::fs::write(dir.join("debian-12/.current"), bad).unwrap();
            assert_eq!(version(&dir), "bbb", "{bad:?}");
        }
        assert!(current(&dir.join("missing")).unwrap().is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn test_the_package_manager_is_carried_and_optional() {
        let dir = std::env::temp_dir().join(format!("vmfarm-images-pm-{}", std::process::id()));
        let old = dir.join("debian-12/old");
        let new = dir.join("debian-12/new");
        for d in [&old, &new] {
            std::fs::create_dir_all(d).unwrap();
        }
        // An image built before [package_manager] existed: still valid, with none.
        let before = manifest("debian-12", "old", 10);
        let text = toml::to_string(&before).unwrap();
        assert!(!text.contains("package_manager"), "{text}");
        std::fs::write(old.join(MANIFEST), &text).unwrap();
        let image = InstalledImage::read(&old).unwrap();
        assert_eq!(image.manifest, before);
        let err = image.package_manager().unwrap_err();
        assert!(
            err.contains("image debian-12 (old) has no package manager")
                && err.contains("or remove `packages`"),
            "{err}"
        );

        let mut after = manifest("debian-12", "new", 20);
        after.package_manager = Some(PackageManager {
            kind: PackageManagerKind::Apt,
            mirrors: vec!["deb.debian.org".parse().unwrap()],
        });
        let text = toml::to_string(&after).unwrap();
        assert!(
            text.contains("[package_manager]\nkind = \"apt\"\nmirrors = [\"deb.debian.org\"]"),
            "{text}"
        );
        std::fs::write(new.join(MANIFEST), &text).unwrap();
        let image = current(&dir).unwrap().remove("debian-12").unwrap();
        assert_eq!(image.manifest, after);
        let manager = image.package_manager().unwrap();
        assert!(manager.allows("deb.debian.org", 80));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
