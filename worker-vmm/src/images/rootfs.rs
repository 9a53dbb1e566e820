//! The root filesystem stage: a Debian system (mmdebstrap) or a busybox userland, its kernel
//! and initramfs modules, as an ext4 file system in a qcow2 base.
//!
//! Output in the stage folder: `rootfs.qcow2`, `kernel`, `modules/*.ko` + `modules/load.order`;
//! the returned [`SystemInfo`] describes it.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use super::manifest::{KERNEL, ROOTFS, SystemInfo};
use super::recipe::{Recipe, RootfsBuilder};
use super::tools::{self, DEPMOD, MKFS_EXT4, MMDEBSTRAP, QEMU_IMG, XZ, ZSTD};
use super::{ImageError, kmod};

/// The host tools this stage needs for `recipe`.
pub fn tools_for(recipe: &Recipe) -> Vec<tools::Tool> {
    let mut tools = vec![MMDEBSTRAP, MKFS_EXT4, QEMU_IMG, DEPMOD, XZ, ZSTD];
    if recipe.rootfs.builder == RootfsBuilder::Busybox {
        tools.retain(|t| t.name != XZ.name && t.name != ZSTD.name);
    }
    tools
}

pub fn build(
    recipe: &Recipe,
    out: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<SystemInfo, ImageError> {
    let work = out.join("work");
    let root = work.join("root");
    std::fs::create_dir_all(&work).map_err(|e| ImageError::io(&work, e))?;
    let info = match recipe.rootfs.builder {
        RootfsBuilder::Mmdebstrap => {
            progress(&format!(
                "mmdebstrap {} into {}",
                recipe.rootfs.suite,
                root.display()
            ));
            debian(recipe, &root, &work)?;
            let kernel_version = kernel_version(&root)?;
            progress(&format!(
                "kernel {kernel_version}: copying it and the initramfs modules"
            ));
            take_kernel(recipe, &root, &kernel_version, out, &work)?;
            remove_boot_initrds(&root)?;
            let os = os_release(&root)?;
            let mut wanted = recipe.rootfs.packages.clone();
            wanted.push(recipe.kernel.package.clone());
            let packages = installed_versions(&root, &wanted)?;
            system_info(os, kernel_version, packages)
        }
        RootfsBuilder::Busybox => {
            let extract = work.join("extract");
            progress(&format!(
                "extracting busybox-static and {} from {}",
                recipe.kernel.package, recipe.rootfs.suite
            ));
            let include = format!("--include=busybox-static,{}", recipe.kernel.package);
            let mut args: Vec<&OsStr> = vec![
                "--variant=extract".as_ref(),
                include.as_ref(),
                recipe.rootfs.suite.as_ref(),
                extract.as_os_str(),
            ];
            if let Some(mirror) = &recipe.rootfs.mirror {
                args.push(mirror.as_ref());
            }
            tools::run(MMDEBSTRAP, &args, &work.join("mmdebstrap.log"))?;
            let kernel_version = kernel_version(&extract)?;
            take_kernel(recipe, &extract, &kernel_version, out, &work)?;
            let busybox_version = busybox(&extract, &root)?;
            let os = os_release(&root)?;
            let packages = BTreeMap::from([
                ("busybox-static".to_owned(), busybox_version),
                (
                    format!("linux-image-{kernel_version}"),
                    kernel_version.clone(),
                ),
            ]);
            system_info(os, kernel_version, packages)
        }
    };
    progress("making the ext4 file system and its qcow2 base");
    let ext4 = work.join("rootfs.ext4");
    make_ext4(&root, recipe.rootfs.free_mib, &ext4, &work)?;
    let qcow2 = out.join(ROOTFS);
    let args: [&OsStr; 5] = [
        "convert".as_ref(),
        "-O".as_ref(),
        "qcow2".as_ref(),
        ext4.as_os_str(),
        qcow2.as_os_str(),
    ];
    tools::run(QEMU_IMG, &args, &work.join("qemu-img.log"))?;
    std::fs::remove_dir_all(&work).map_err(|e| ImageError::io(&work, e))?;
    Ok(info)
}

/// The ext4 file system `ext4` (labelled `vmfarm-root`) holding the tree `root`, with
/// `free_mib` free for builds.
pub(super) fn make_ext4(
    root: &Path,
    free_mib: u64,
    ext4: &Path,
    work: &Path,
) -> Result<(), ImageError> {
    let size_mib = du_mib(root) * 115 / 100 + 64 + free_mib;
    let size = format!("{size_mib}M");
    let args: [&OsStr; 8] = [
        "-q".as_ref(),
        "-F".as_ref(),
        "-L".as_ref(),
        ROOT_LABEL.as_ref(),
        "-d".as_ref(),
        root.as_os_str(),
        ext4.as_os_str(),
        size.as_ref(),
    ];
    tools::run(MKFS_EXT4, &args, &work.join("mkfs.log"))
}

/// The root file system's label, which firmware-booted disks find it by.
pub(super) const ROOT_LABEL: &str = "vmfarm-root";

pub(super) fn debian(recipe: &Recipe, root: &Path, work: &Path) -> Result<(), ImageError> {
    let rootfs = &recipe.rootfs;
    let variant = format!(
        "--variant={}",
        rootfs.variant.as_deref().unwrap_or("minbase")
    );
    let mut include = rootfs.packages.clone();
    include.push(recipe.kernel.package.clone());
    let include = format!("--include={}", include.join(","));
    let mut args: Vec<&OsStr> = vec![
        variant.as_ref(),
        include.as_ref(),
        // Guests need no manuals or translations.
        "--dpkgopt=path-exclude=/usr/share/man/*".as_ref(),
        "--dpkgopt=path-exclude=/usr/share/locale/*".as_ref(),
        "--dpkgopt=path-exclude=/usr/share/doc/*".as_ref(),
        "--dpkgopt=path-include=/usr/share/doc/*/copyright".as_ref(),
        rootfs.suite.as_ref(),
        root.as_os_str(),
    ];
    if let Some(mirror) = &rootfs.mirror {
        args.push(mirror.as_ref());
    }
    tools::run(MMDEBSTRAP, &args, &work.join("mmdebstrap.log"))
}

fn modules_dir(root: &Path) -> PathBuf {
    let lib = root.join("lib/modules");
    if lib.is_dir() {
        lib
    } else {
        root.join("usr/lib/modules")
    }
}

pub(super) fn kernel_version(root: &Path) -> Result<String, ImageError> {
    let dir = modules_dir(root);
    let mut versions: Vec<String> = std::fs::read_dir(&dir)
        .map_err(|e| ImageError::io(&dir, e))?
        .flatten()
        .filter(|e| e.path().join("kernel").is_dir())
        .filter_map(|e| e.file_name().to_str().map(str::to_owned))
        .collect();
    versions.sort();
    match versions.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(ImageError::Rootfs(format!(
            "no kernel modules under {}: is the kernel package installed?",
            dir.display()
        ))),
        many => Err(ImageError::Rootfs(format!(
            "several kernels in the root filesystem: {}",
            many.join(", ")
        ))),
    }
}

/// Copies the kernel to `out/kernel` and the recipe's modules, decompressed, to `out/modules`.
fn take_kernel(
    recipe: &Recipe,
    root: &Path,
    version: &str,
    out: &Path,
    work: &Path,
) -> Result<(), ImageError> {
    let vmlinuz = root.join(format!("boot/vmlinuz-{version}"));
    std::fs::copy(&vmlinuz, out.join(KERNEL)).map_err(|e| ImageError::io(&vmlinuz, e))?;
    let dir = modules_dir(root).join(version);
    if !dir.join("modules.dep").exists() {
        let base = root.as_os_str();
        tools::run(
            DEPMOD,
            &["-b".as_ref(), base, version.as_ref()],
            &work.join("depmod.log"),
        )?;
    }
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read_to_string(&path).map_err(|e| ImageError::io(&path, e))
    };
    let order = kmod::load_order(
        &read("modules.dep")?,
        &read("modules.builtin")?,
        &recipe.kernel.modules,
    )?;
    let target = out.join("modules");
    std::fs::create_dir_all(&target).map_err(|e| ImageError::io(&target, e))?;
    let mut names = String::new();
    for rel in order {
        let src = dir.join(&rel);
        let name = format!(
            "{}.ko",
            rel.rsplit('/')
                .next()
                .unwrap_or(&rel)
                .split(".ko")
                .next()
                .unwrap_or(&rel)
        );
        let dest = target.join(&name);
        let data = if rel.ends_with(".ko.xz") {
            tools::output(XZ, &["-dc".as_ref(), src.as_os_str()])?
        } else if rel.ends_with(".ko.zst") {
            tools::output(ZSTD, &["-dcq".as_ref(), src.as_os_str()])?
        } else {
            std::fs::read(&src).map_err(|e| ImageError::io(&src, e))?
        };
        std::fs::write(&dest, data).map_err(|e| ImageError::io(&dest, e))?;
        names.push_str(&name);
        names.push('\n');
    }
    let order_file = target.join("load.order");
    std::fs::write(&order_file, names).map_err(|e| ImageError::io(&order_file, e))
}

/// The Debian initramfs the kernel package made is of no use: the agent brings its own.
fn remove_boot_initrds(root: &Path) -> Result<(), ImageError> {
    let boot = root.join("boot");
    for entry in std::fs::read_dir(&boot)
        .map_err(|e| ImageError::io(&boot, e))?
        .flatten()
    {
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with("initrd.img")
        {
            std::fs::remove_file(entry.path()).map_err(|e| ImageError::io(&entry.path(), e))?;
        }
    }
    Ok(())
}

/// Fields of the guest's os-release (inside `root`, whatever its symlinks say).
pub(super) fn os_release(root: &Path) -> Result<BTreeMap<String, String>, ImageError> {
    let mut path = root.join("etc/os-release");
    if let Ok(target) = std::fs::read_link(&path) {
        path = if target.is_absolute() {
            root.join(target.strip_prefix("/").unwrap_or(&target))
        } else {
            root.join("etc").join(target)
        };
    }
    let text = std::fs::read_to_string(&path).map_err(|e| ImageError::io(&path, e))?;
    Ok(parse_os_release(&text))
}

fn parse_os_release(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().trim_matches('"').to_owned()))
        .collect()
}

pub(super) fn system_info(
    os: BTreeMap<String, String>,
    kernel_version: String,
    packages: BTreeMap<String, String>,
) -> SystemInfo {
    let field = |k: &str| os.get(k).cloned().unwrap_or_default();
    SystemInfo {
        os: field("ID"),
        release: field("VERSION_ID"),
        pretty_name: field("PRETTY_NAME"),
        kernel_version,
        packages,
    }
}

/// Installed versions of `wanted` (and of the real packages behind kernel metapackages).
pub(super) fn installed_versions(
    root: &Path,
    wanted: &[String],
) -> Result<BTreeMap<String, String>, ImageError> {
    let path = root.join("var/lib/dpkg/status");
    let text = std::fs::read_to_string(&path).map_err(|e| ImageError::io(&path, e))?;
    Ok(parse_dpkg_status(&text, wanted))
}

fn parse_dpkg_status(text: &str, wanted: &[String]) -> BTreeMap<String, String> {
    let mut found = BTreeMap::new();
    for stanza in text.split("\n\n") {
        let field = |name: &str| {
            stanza.lines().find_map(|l| {
                l.strip_prefix(name)
                    .and_then(|r| r.strip_prefix(": "))
                    .map(str::trim)
            })
        };
        let (Some(name), Some(version), Some(status)) =
            (field("Package"), field("Version"), field("Status"))
        else {
            continue;
        };
        let kernel = name.starts_with("linux-image-");
        if status.ends_with(" installed") && (kernel || wanted.iter().any(|w| w == name)) {
            found.insert(name.to_owned(), version.to_owned());
        }
    }
    found
}

/// Makes a busybox userland in `root` from the extracted package; returns busybox's version.
fn busybox(extract: &Path, root: &Path) -> Result<String, ImageError> {
    let src = [extract.join("bin/busybox"), extract.join("usr/bin/busybox")]
        .into_iter()
        .find(|p| p.is_file())
        .ok_or_else(|| ImageError::Rootfs("busybox-static did not provide bin/busybox".into()))?;
    for dir in [
        "bin", "sbin", "usr/bin", "usr/sbin", "etc", "dev", "proc", "sys", "run", "tmp", "root",
        "home", "var/tmp",
    ] {
        let d = root.join(dir);
        std::fs::create_dir_all(&d).map_err(|e| ImageError::io(&d, e))?;
    }
    let dest = root.join("bin/busybox");
    std::fs::copy(&src, &dest).map_err(|e| ImageError::io(&dest, e))?;
    let list = std::process::Command::new(&src)
        .arg("--list-full")
        .output()
        .map_err(|e| ImageError::io(&src, e))?;
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        let link = root.join(applet.trim_start_matches('/'));
        if applet.is_empty() || applet.contains("..") || link.exists() {
            continue;
        }
        std::os::unix::fs::symlink("/bin/busybox", &link).map_err(|e| ImageError::io(&link, e))?;
    }
    let banner = std::process::Command::new(&src)
        .output()
        .map_err(|e| ImageError::io(&src, e))?;
    let banner = String::from_utf8_lossy(&banner.stdout);
    // "BusyBox v1.35.0 (Debian 1:1.35.0-4+b3) multi-call binary."
    let upstream = banner
        .split_whitespace()
        .nth(1)
        .unwrap_or("v0")
        .trim_start_matches('v')
        .to_owned();
    let debian = banner
        .split_once("(Debian ")
        .and_then(|(_, r)| r.split(')').next())
        .unwrap_or(&upstream)
        .to_owned();
    let files = [
        (
            "etc/os-release",
            format!(
                "NAME=\"vmfarm tiny\"\nID=tiny\nVERSION_ID=\"{upstream}\"\nPRETTY_NAME=\"vmfarm tiny (BusyBox {upstream})\"\n"
            ),
        ),
        ("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n".to_owned()),
        ("etc/group", "root:x:0:\n".to_owned()),
        ("etc/hosts", "127.0.0.1\tlocalhost\n".to_owned()),
        ("etc/hostname", "tiny\n".to_owned()),
    ];
    for (name, text) in files {
        let path = root.join(name);
        std::fs::write(&path, text).map_err(|e| ImageError::io(&path, e))?;
    }
    Ok(debian)
}

/// Disk use of a tree in MiB (4 KiB blocks, symlinks not followed).
fn du_mib(root: &Path) -> u64 {
    fn walk(dir: &Path) -> u64 {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return 0;
        };
        entries
            .flatten()
            .map(|e| match e.file_type() {
                Ok(t) if t.is_dir() => 4096 + walk(&e.path()),
                Ok(t) if t.is_file() => e.metadata().map_or(0, |m| m.len().div_ceil(4096) * 4096),
                _ => 4096,
            })
            .sum()
    }
    walk(root).div_ceil(1024 * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_os_release_fields() {
        let os = parse_os_release(
            "PRETTY_NAME=\"Debian GNU/Linux 13 (trixie)\"\nID=debian\nVERSION_ID=\"13\"\n",
        );
        let info = system_info(os, "6.12.0-1-cloud-amd64".into(), BTreeMap::new());
        assert_eq!((info.os.as_str(), info.release.as_str()), ("debian", "13"));
        assert_eq!(info.pretty_name, "Debian GNU/Linux 13 (trixie)");
    }

    #[test]
    fn test_dpkg_status_keeps_wanted_installed_packages_and_kernels() {
        let status = "Package: git\nStatus: install ok installed\nVersion: 1:2.39.5-0+deb12u2\n\n\
                      Package: gone\nStatus: deinstall ok config-files\nVersion: 1\n\n\
                      Package: linux-image-6.1.0-56-cloud-amd64\nStatus: install ok installed\nVersion: 6.1.192-2\n\n\
                      Package: zlib1g\nStatus: install ok installed\nVersion: 1\n";
        let found = parse_dpkg_status(status, &["git".into(), "gone".into()]);
        assert_eq!(
            found,
            BTreeMap::from([
                ("git".to_owned(), "1:2.39.5-0+deb12u2".to_owned()),
                (
                    "linux-image-6.1.0-56-cloud-amd64".to_owned(),
                    "6.1.192-2".to_owned()
                ),
            ])
        );
    }
}
