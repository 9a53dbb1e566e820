//! Image recipes: `configs/images/<name>.toml`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vmfarm_proto::network::HostPattern;

/// How a guest of this image boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BootMethod {
    /// Direct kernel boot: kernel + initramfs (the agent as /init) + ext4 root disk.
    Linux,
    /// A whole disk (partition table, boot loader) booted by firmware; the guest is reached
    /// through its own OpenSSH, set up by cloud-init from a NoCloud seed the worker makes.
    Firmware,
}

/// The firmware that boots a [`BootMethod::Firmware`] disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Firmware {
    /// UEFI: OVMF (Debian package `ovmf`).
    Uefi,
    /// BIOS: SeaBIOS, QEMU's own default firmware.
    Bios,
}

/// `[disk]` of a `boot = "firmware"` recipe: the disk the recipe's system is installed on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskRecipe {
    /// Recipes build UEFI disks (an EFI system partition with systemd-boot); a BIOS disk comes
    /// in with `vmfarm images import --firmware bios`.
    pub firmware: Firmware,
    /// The kernel's command line in the boot loader's entry (besides the root file system).
    pub cmdline: String,
}

/// What makes the root filesystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RootfsBuilder {
    /// A Debian system made by mmdebstrap, the kernel package installed in it.
    Mmdebstrap,
    /// A busybox userland; busybox-static and the kernel package come from the suite.
    Busybox,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    /// The image's name (`[a-z0-9][a-z0-9_-]{0,63}`), as jobs name it.
    pub name: String,
    pub boot: BootMethod,
    pub rootfs: RootfsRecipe,
    pub kernel: KernelRecipe,
    /// How jobs' `packages` are installed in its guests; `None`: the image has no package
    /// manager (a job with `packages` cannot run on it). Last, and left out when `None`, so that
    /// the recipe's text (which keys the root filesystem stage) is what it was before this key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub package_manager: Option<PackageManager>,
    /// `[disk]`: for `boot = "firmware"` only (left out otherwise, so that the text of the
    /// other recipes, which keys their root filesystem stage, is as it was).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<DiskRecipe>,
}

/// `[package_manager]`: how a job's `packages` are installed in a guest of the image, and the
/// hosts that step may reach. Carried into the installed image's `image.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PackageManager {
    pub kind: PackageManagerKind,
    /// The package mirrors (host patterns, as in a manifest's `[network] allow`): the packages
    /// step may reach them whatever the job's `[network] allow` says. Never empty.
    pub mirrors: Vec<HostPattern>,
}

/// Which package manager the guest has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PackageManagerKind {
    /// Debian's apt (`apt-get update`, then `apt-get install`).
    Apt,
}

impl PackageManager {
    /// The commands that install `packages` (each `NAME` or `NAME=VERSION`, as a manifest's
    /// `packages` are checked), as argv lists to run as root in the guest, in order, each to
    /// succeed before the next. They read nothing from a terminal.
    pub fn install_commands(&self, packages: &[String]) -> Vec<Vec<String>> {
        let argv = |words: &[&str]| words.iter().map(|w| (*w).to_owned()).collect::<Vec<_>>();
        match self.kind {
            PackageManagerKind::Apt => {
                let apt = [
                    "env",
                    "DEBIAN_FRONTEND=noninteractive",
                    "apt-get",
                    "-q",
                    "-y",
                    "-o",
                    "Dpkg::Use-Pty=0",
                ];
                let update = [&apt[..], &["update"]].concat();
                let mut install =
                    argv(&[&apt[..], &["install", "--no-install-recommends"]].concat());
                install.extend(packages.iter().cloned());
                vec![argv(&update), install]
            }
        }
    }

    /// Whether the packages step may reach `host:port` (one of the mirrors matches it).
    pub fn allows(&self, host: &str, port: u16) -> bool {
        self.mirrors.iter().any(|m| m.matches(host, port))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RootfsRecipe {
    pub builder: RootfsBuilder,
    /// The Debian suite (bookworm, trixie, ...).
    pub suite: String,
    /// mmdebstrap's --variant (minbase, apt, ...); only for mmdebstrap.
    #[serde(default)]
    pub variant: Option<String>,
    /// Packages installed on top of the variant.
    #[serde(default)]
    pub packages: Vec<String>,
    /// A mirror URL; mmdebstrap's default when absent.
    #[serde(default)]
    pub mirror: Option<String>,
    /// Free space left in the root filesystem for builds, in MiB.
    pub free_mib: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KernelRecipe {
    /// The Debian kernel package (a metapackage is fine).
    pub package: String,
    /// Modules the initramfs loads (their dependencies are added); built-in ones are skipped.
    pub modules: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum RecipeError {
    #[error("no recipe {name:?} in {dir} (recipes there: {available})")]
    NotFound {
        name: String,
        dir: PathBuf,
        available: String,
    },
    #[error("reading recipe {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("recipe {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

pub(super) fn valid_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && name.len() <= 64
        && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

fn valid_word(word: &str) -> bool {
    !word.is_empty()
        && !word.starts_with('-')
        && word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+-._:".contains(&b))
}

impl Recipe {
    pub fn parse(text: &str, path: &Path) -> Result<Recipe, RecipeError> {
        let invalid = |message: String| RecipeError::Invalid {
            path: path.to_owned(),
            message,
        };
        let recipe: Recipe =
            toml::from_str(text).map_err(|e| invalid(e.to_string().trim().to_owned()))?;
        if !valid_name(&recipe.name) {
            return Err(invalid(format!(
                "name {:?}: expected [a-z0-9][a-z0-9_-]{{0,63}}",
                recipe.name
            )));
        }
        let words = [&recipe.rootfs.suite, &recipe.kernel.package]
            .into_iter()
            .chain(recipe.rootfs.variant.iter())
            .chain(recipe.rootfs.packages.iter())
            .chain(recipe.kernel.modules.iter());
        for word in words {
            if !valid_word(word) {
                return Err(invalid(format!(
                    "{word:?} is not a valid suite, package or module name"
                )));
            }
        }
        if recipe.rootfs.builder == RootfsBuilder::Busybox
            && (recipe.rootfs.variant.is_some() || !recipe.rootfs.packages.is_empty())
        {
            return Err(invalid(
                "a busybox root filesystem takes no variant or packages".into(),
            ));
        }
        if let Some(manager) = &recipe.package_manager {
            check_package_manager(&recipe, manager).map_err(invalid)?;
        }
        check_disk(&recipe).map_err(invalid)?;
        Ok(recipe)
    }

    /// The recipe as it keys the root filesystem stage: without `[package_manager]`, which only
    /// tells the worker how to use the image, so that adding it reuses a built root filesystem.
    pub fn rootfs_inputs(&self) -> Recipe {
        Recipe {
            package_manager: None,
            ..self.clone()
        }
    }

    /// `name_or_path` is a path to a .toml file, or a recipe name in `dir`.
    pub fn load(name_or_path: &str, dir: &Path) -> Result<Recipe, RecipeError> {
        let path = if name_or_path.ends_with(".toml") || name_or_path.contains('/') {
            PathBuf::from(name_or_path)
        } else {
            dir.join(format!("{name_or_path}.toml"))
        };
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e)
                if e.kind() == std::io::ErrorKind::NotFound && !name_or_path.ends_with(".toml") =>
            {
                return Err(RecipeError::NotFound {
                    name: name_or_path.to_owned(),
                    dir: dir.to_owned(),
                    available: available(dir).join(", "),
                });
            }
            Err(source) => return Err(RecipeError::Read { path, source }),
        };
        let recipe = Recipe::parse(&text, &path)?;
        let by_name = !name_or_path.ends_with(".toml") && !name_or_path.contains('/');
        if by_name && recipe.name != name_or_path {
            return Err(RecipeError::Invalid {
                path,
                message: format!(
                    "name {:?}: the recipe found as `{name_or_path}` must make image \
                     `{name_or_path}` (name a recipe's file after its image)",
                    recipe.name
                ),
            });
        }
        Ok(recipe)
    }
}

/// `boot = "firmware"` comes with `[disk]` (and `[disk]` only with it), on a Debian system
/// that boots by UEFI; the command line is one line of printable characters.
fn check_disk(recipe: &Recipe) -> Result<(), String> {
    match (recipe.boot, &recipe.disk) {
        (BootMethod::Linux, None) => Ok(()),
        (BootMethod::Linux, Some(_)) => {
            Err("[disk] is for boot = \"firmware\" recipes; remove it, or boot by firmware".into())
        }
        (BootMethod::Firmware, None) => Err(
            "boot = \"firmware\" needs [disk] with firmware = \"uefi\" and the kernel's cmdline"
                .into(),
        ),
        (BootMethod::Firmware, Some(disk)) => {
            if recipe.rootfs.builder != RootfsBuilder::Mmdebstrap {
                return Err(
                    "a firmware disk holds a Debian system: use builder = \"mmdebstrap\"".into(),
                );
            }
            if disk.firmware != Firmware::Uefi {
                return Err(
                    "recipes build UEFI disks: set [disk] firmware = \"uefi\" (a BIOS disk \
                            comes in with `vmfarm images import NAME DISK --firmware bios`)"
                        .into(),
                );
            }
            if disk.cmdline.len() > 1024 || disk.cmdline.chars().any(|c| c.is_control()) {
                return Err("[disk] cmdline: one line of at most 1024 characters".into());
            }
            Ok(())
        }
    }
}

/// `[package_manager]` fits the image: a Debian root filesystem for apt, at least one mirror,
/// and the recipe's own `rootfs.mirror` (when it is an http(s) URL) among the mirrors.
fn check_package_manager(recipe: &Recipe, manager: &PackageManager) -> Result<(), String> {
    match (manager.kind, recipe.rootfs.builder) {
        (PackageManagerKind::Apt, RootfsBuilder::Mmdebstrap) => {}
        (PackageManagerKind::Apt, RootfsBuilder::Busybox) => {
            return Err(
                "package_manager: a busybox root filesystem has no apt: remove [package_manager]"
                    .into(),
            );
        }
    }
    if manager.mirrors.is_empty() {
        return Err(
            "package_manager.mirrors is empty: name the hosts the packages come from, like mirrors = [\"deb.debian.org\"]"
                .into(),
        );
    }
    if let Some(url) = &recipe.rootfs.mirror
        && let Some((host, port)) = url_host(url)
        && !manager.allows(&host, port)
    {
        return Err(format!(
            "rootfs.mirror {url:?} is not among package_manager.mirrors: add \"{host}\" to them"
        ));
    }
    Ok(())
}

/// The host and port of an `http://` or `https://` URL (`None` for anything else).
fn url_host(url: &str) -> Option<(String, u16)> {
    let (rest, default_port) = if let Some(rest) = url.strip_prefix("http://") {
        (rest, 80)
    } else {
        (url.strip_prefix("https://")?, 443)
    };
    let authority = rest.split(['/', '?', '#']).next()?;
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
    match authority.rsplit_once(':') {
        Some((host, port)) if !port.contains(']') => Some((host.to_owned(), port.parse().ok()?)),
        _ => Some((authority.to_owned(), default_port)),
    }
}

fn available(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_suffix(".toml")
                .map(str::to_owned)
        })
        .collect();
    names.sort();
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recipes_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/images")
    }

    #[test]
    fn test_the_shipped_recipes_parse() {
        for name in ["debian-11", "debian-12", "debian-13", "tiny"] {
            let recipe = Recipe::load(name, &recipes_dir()).unwrap();
            assert_eq!(recipe.name, name);
            assert_eq!(recipe.boot, BootMethod::Linux);
        }
        let cloud = Recipe::load("debian-12-cloud", &recipes_dir()).unwrap();
        assert_eq!(cloud.boot, BootMethod::Firmware);
        assert_eq!(cloud.disk.map(|d| d.firmware), Some(Firmware::Uefi));
    }

    #[test]
    fn test_firmware_recipes_need_their_disk_and_build_uefi_disks() {
        let text = std::fs::read_to_string(recipes_dir().join("debian-12-cloud.toml")).unwrap();
        let start = text.find("\n[disk]").unwrap();
        let end = start + text[start..].find("\n[package_manager]").unwrap();
        let without = format!("{}{}", &text[..start], &text[end..]);
        let err = Recipe::parse(&without, Path::new("x.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("boot = \"firmware\" needs [disk]"), "{err}");
        let bios = text.replace("firmware = \"uefi\"", "firmware = \"bios\"");
        let err = Recipe::parse(&bios, Path::new("x.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("vmfarm images import NAME DISK --firmware bios"),
            "{err}"
        );
        let linux = text.replace("boot = \"firmware\"", "boot = \"linux\"");
        let err = Recipe::parse(&linux, Path::new("x.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("[disk] is for boot = \"firmware\""), "{err}");
    }

    #[test]
    fn test_unknown_keys_are_refused_with_their_name() {
        let text = std::fs::read_to_string(recipes_dir().join("tiny.toml")).unwrap();
        let text = text.replace("[kernel]", "[kernel]\nflavour = \"big\"");
        let err = Recipe::parse(&text, Path::new("x.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `flavour`"), "{err}");
    }

    #[test]
    fn test_bad_names_and_missing_recipes_are_refused() {
        let text = std::fs::read_to_string(recipes_dir().join("debian-12.toml")).unwrap();
        let bad = text.replace("\"git\"", "\"git; rm -rf /\"");
        assert!(Recipe::parse(&bad, Path::new("x.toml")).is_err());
        let err = Recipe::load("no-such", &recipes_dir())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("debian-11, debian-12, debian-12-cloud, debian-13, tiny"),
            "{err}"
        );
    }

    #[test]
    fn test_the_debian_recipes_name_apt_and_its_mirrors() {
        for name in ["debian-11", "debian-12", "debian-13", "debian-12-cloud"] {
            let recipe = Recipe::load(name, &recipes_dir()).unwrap();
            let manager = recipe.package_manager.expect("a [package_manager]");
            assert_eq!(manager.kind, PackageManagerKind::Apt);
            assert!(manager.allows("deb.debian.org", 80), "{name}");
            assert!(manager.allows("deb.debian.org", 443), "{name}");
            assert!(!manager.allows("pypi.org", 443), "{name}");
        }
        let tiny = Recipe::load("tiny", &recipes_dir()).unwrap();
        assert_eq!(tiny.package_manager, None, "busybox has no package manager");
    }

    #[test]
    fn test_the_package_manager_leaves_the_rootfs_inputs_alone() {
        let text = std::fs::read_to_string(recipes_dir().join("debian-13.toml")).unwrap();
        let with = Recipe::parse(&text, Path::new("x.toml")).unwrap();
        let start = text.find("\n# How a job's `packages`").unwrap();
        let without = Recipe::parse(&text[..start], Path::new("x.toml")).unwrap();
        assert_eq!(without.package_manager, None);
        assert_eq!(
            toml::to_string(&with.rootfs_inputs()).unwrap(),
            toml::to_string(&without).unwrap(),
            "a recipe's root filesystem is keyed as it was before [package_manager]"
        );
    }

    #[test]
    fn test_bad_package_managers_are_refused() {
        let debian = std::fs::read_to_string(recipes_dir().join("debian-12.toml")).unwrap();
        let tiny = std::fs::read_to_string(recipes_dir().join("tiny.toml")).unwrap();
        let section = "[package_manager]\nkind = \"apt\"\nmirrors = [\"deb.debian.org\", \"security.debian.org\"]";
        assert!(debian.contains(section));
        let cases = [
            (
                debian.replace("kind = \"apt\"", "kind = \"yum\""),
                "unknown variant `yum`",
            ),
            (
                debian.replace(section, "[package_manager]\nkind = \"apt\"\nmirrors = []"),
                "mirrors is empty",
            ),
            (
                debian.replace("\"deb.debian.org\", ", "\"http://deb.debian.org/debian\", "),
                "write the host alone, like `deb.debian.org`",
            ),
            (
                debian.replace(section, &format!("{section}\nproxy = \"x\"")),
                "unknown field `proxy`",
            ),
            (
                debian.replace(section, "[package_manager]\nkind = \"apt\""),
                "missing field `mirrors`",
            ),
            (
                debian.replace(
                    "free_mib",
                    "mirror = \"http://ftp.fr.debian.org/debian\"\nfree_mib",
                ),
                "rootfs.mirror \"http://ftp.fr.debian.org/debian\" is not among package_manager.mirrors: add \"ftp.fr.debian.org\"",
            ),
            (
                format!("{tiny}\n{section}\n"),
                "a busybox root filesystem has no apt",
            ),
        ];
        for (text, want) in cases {
            let err = Recipe::parse(&text, Path::new("x.toml"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{want:?}: {err}");
        }
        let covered = debian.replace(
            "free_mib",
            "mirror = \"http://deb.debian.org/debian\"\nfree_mib",
        );
        assert!(Recipe::parse(&covered, Path::new("x.toml")).is_ok());
    }

    #[test]
    fn test_url_hosts() {
        assert_eq!(
            url_host("http://deb.debian.org/debian"),
            Some(("deb.debian.org".into(), 80))
        );
        assert_eq!(
            url_host("https://u:p@mirror.example.org:8443/debian"),
            Some(("mirror.example.org".into(), 8443))
        );
        assert_eq!(url_host("http://[::1]/x"), Some(("[::1]".into(), 80)));
        assert_eq!(url_host("http://[::1]:8080"), Some(("[::1]".into(), 8080)));
        assert_eq!(url_host("deb http://x/ bookworm main"), None);
        assert_eq!(url_host("http://h:port/"), None);
    }

    #[test]
    fn test_apt_installs_noninteractively_with_argv_lists() {
        let manager = PackageManager {
            kind: PackageManagerKind::Apt,
            mirrors: vec!["deb.debian.org".parse().unwrap()],
        };
        let commands = manager.install_commands(&["zlib1g-dev".into(), "git=1:2.39".into()]);
        let joined: Vec<String> = commands.iter().map(|c| c.join(" ")).collect();
        assert_eq!(
            joined,
            [
                "env DEBIAN_FRONTEND=noninteractive apt-get -q -y -o Dpkg::Use-Pty=0 update",
                "env DEBIAN_FRONTEND=noninteractive apt-get -q -y -o Dpkg::Use-Pty=0 install \
                 --no-install-recommends zlib1g-dev git=1:2.39",
            ]
        );
    }
}
