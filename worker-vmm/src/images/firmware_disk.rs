//! The disk stage of a `boot = "firmware"` recipe: a Debian system (mmdebstrap) on a GPT disk
//! that boots by UEFI on its own, as any distribution's cloud image does: an EFI system
//! partition with systemd-boot, the kernel and its initramfs, and an ext4 root partition.
//!
//! Built without loop devices or mounts (so without privileges beyond mmdebstrap's): the FAT
//! file system by `mkfs.vfat` and `mcopy` on a file, the ext4 one by `mkfs.ext4 -d`, the
//! partition table by `sfdisk` on the raw disk, the partitions copied in at their offsets, then
//! `qemu-img convert` to qcow2. systemd-boot rather than GRUB: it is a file on the ESP, where
//! `grub-install` needs the disk attached as a block device.
//!
//! The guest's network comes up by DHCP through systemd-networkd (cloud-init's own network
//! configuration is off: what it renders depends on the tools each release has), cloud-init
//! reads only a NoCloud seed, and no SSH host key is in the image (cloud-init makes each
//! guest's own).
//!
//! Output in the stage folder: `disk.qcow2`; the returned [`SystemInfo`] describes it.

use std::ffi::OsStr;
use std::io::{Seek, SeekFrom};
use std::path::Path;

use super::manifest::{DISK, SystemInfo};
use super::recipe::Recipe;
use super::rootfs::{self, ROOT_LABEL};
use super::tools::{self, MCOPY, MKFS_VFAT, QEMU_IMG, SFDISK};
use super::{ImageError, rootfs::make_ext4};

/// The EFI system partition's size: the kernel, the initramfs and systemd-boot, with room.
const ESP_MIB: u64 = 256;
/// Where the first partition starts, and the room the backup GPT needs at the end.
const ALIGN_MIB: u64 = 1;
const MIB: u64 = 1024 * 1024;

/// The boot loader, as Debian's `systemd-boot-efi` installs it.
const SYSTEMD_BOOT: &str = "usr/lib/systemd/boot/efi/systemd-bootx64.efi";

/// The host tools this stage needs besides the root filesystem's.
pub const TOOLS: [tools::Tool; 3] = [MKFS_VFAT, MCOPY, SFDISK];

pub fn build(
    recipe: &Recipe,
    out: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<SystemInfo, ImageError> {
    let disk_recipe = recipe
        .disk
        .as_ref()
        .ok_or_else(|| ImageError::Rootfs("a firmware disk needs the recipe's [disk]".into()))?;
    let work = out.join("work");
    let root = work.join("root");
    std::fs::create_dir_all(&work).map_err(|e| ImageError::io(&work, e))?;
    progress(&format!(
        "mmdebstrap {} into {}",
        recipe.rootfs.suite,
        root.display()
    ));
    rootfs::debian(recipe, &root, &work)?;
    let kernel_version = rootfs::kernel_version(&root)?;
    let os = rootfs::os_release(&root)?;
    let mut wanted = recipe.rootfs.packages.clone();
    wanted.push(recipe.kernel.package.clone());
    let packages = rootfs::installed_versions(&root, &wanted)?;
    let info = rootfs::system_info(os, kernel_version.clone(), packages);

    progress("configuring the system for cloud-init and a NoCloud seed");
    configure(&root)?;
    progress(&format!(
        "EFI system partition: systemd-boot, kernel {kernel_version}"
    ));
    let esp = work.join("esp.img");
    make_esp(&root, &kernel_version, &disk_recipe.cmdline, &esp, &work)?;
    progress("root partition: ext4");
    let ext4 = work.join("root.ext4");
    make_ext4(&root, recipe.rootfs.free_mib, &ext4, &work)?;
    progress("the GPT disk and its qcow2 base");
    let raw = work.join("disk.raw");
    assemble(&esp, &ext4, &raw, &work)?;
    let qcow2 = out.join(DISK);
    let args: [&OsStr; 5] = [
        "convert".as_ref(),
        "-O".as_ref(),
        "qcow2".as_ref(),
        raw.as_os_str(),
        qcow2.as_os_str(),
    ];
    tools::run(QEMU_IMG, &args, &work.join("qemu-img.log"))?;
    std::fs::remove_dir_all(&work).map_err(|e| ImageError::io(&work, e))?;
    Ok(info)
}

/// Writes `text` to `root`/`path`, making its folders.
fn write(root: &Path, path: &str, text: &str) -> Result<(), ImageError> {
    let path = root.join(path);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| ImageError::io(parent, e))?;
    }
    std::fs::write(&path, text).map_err(|e| ImageError::io(&path, e))
}

/// What the system needs to boot from the disk and be set up by a NoCloud seed alone.
fn configure(root: &Path) -> Result<(), ImageError> {
    write(
        root,
        "etc/fstab",
        &format!("LABEL={ROOT_LABEL} / ext4 defaults,discard 0 1\n"),
    )?;
    // Each guest gets its own machine id at its first boot.
    write(root, "etc/machine-id", "")?;
    write(
        root,
        "etc/cloud/cloud.cfg.d/90-vmfarm.cfg",
        "# vmfarm: the worker's NoCloud seed is the only source; the network is systemd-networkd's.\n\
         datasource_list: [ NoCloud, None ]\n\
         network: {config: disabled}\n",
    )?;
    write(
        root,
        "etc/systemd/network/80-vmfarm-dhcp.network",
        "[Match]\nName=en* eth*\n\n[Network]\nDHCP=yes\n",
    )?;
    let wants = root.join("etc/systemd/system/multi-user.target.wants");
    std::fs::create_dir_all(&wants).map_err(|e| ImageError::io(&wants, e))?;
    let link = wants.join("systemd-networkd.service");
    if !link.exists() {
        std::os::unix::fs::symlink("/lib/systemd/system/systemd-networkd.service", &link)
            .map_err(|e| ImageError::io(&link, e))?;
    }
    // No host key is shared by the guests of the image: cloud-init makes each guest's own.
    let ssh = root.join("etc/ssh");
    if let Ok(entries) = std::fs::read_dir(&ssh) {
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with("ssh_host_") {
                let path = entry.path();
                std::fs::remove_file(&path).map_err(|e| ImageError::io(&path, e))?;
            }
        }
    }
    Ok(())
}

/// The EFI system partition `esp`: systemd-boot as the removable-media boot loader
/// (`\EFI\BOOT\BOOTX64.EFI`, which any UEFI firmware boots without a boot entry), one loader
/// entry, the kernel and its initramfs.
fn make_esp(
    root: &Path,
    kernel_version: &str,
    cmdline: &str,
    esp: &Path,
    work: &Path,
) -> Result<(), ImageError> {
    let boot = root.join(SYSTEMD_BOOT);
    if !boot.is_file() {
        return Err(ImageError::Rootfs(format!(
            "{SYSTEMD_BOOT} is not in the system: add `systemd-boot-efi` to the recipe's packages"
        )));
    }
    let kernel = root.join(format!("boot/vmlinuz-{kernel_version}"));
    let initrd = root.join(format!("boot/initrd.img-{kernel_version}"));
    for needed in [&kernel, &initrd] {
        if !needed.is_file() {
            return Err(ImageError::Rootfs(format!(
                "{} is missing: the kernel package and initramfs-tools should have made it",
                needed.display()
            )));
        }
    }
    let tree = work.join("esp");
    let copy = |from: &Path, to: &str| -> Result<(), ImageError> {
        let to = tree.join(to);
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent).map_err(|e| ImageError::io(parent, e))?;
        }
        std::fs::copy(from, &to)
            .map(drop)
            .map_err(|e| ImageError::io(&to, e))
    };
    copy(&boot, "EFI/BOOT/BOOTX64.EFI")?;
    copy(&kernel, "vmlinuz")?;
    copy(&initrd, "initrd.img")?;
    write(
        &tree,
        "loader/loader.conf",
        "default vmfarm.conf\ntimeout 0\n",
    )?;
    write(
        &tree,
        "loader/entries/vmfarm.conf",
        &format!(
            "title {kernel_version}\nlinux /vmlinuz\ninitrd /initrd.img\noptions root=LABEL={ROOT_LABEL} ro {cmdline}\n"
        ),
    )?;
    let size_kib = (ESP_MIB * 1024).to_string();
    let args: [&OsStr; 7] = [
        "-C".as_ref(),
        "-F".as_ref(),
        "32".as_ref(),
        "-n".as_ref(),
        "ESP".as_ref(),
        esp.as_os_str(),
        size_kib.as_ref(),
    ];
    tools::run(MKFS_VFAT, &args, &work.join("mkfs.vfat.log"))?;
    let image = esp.as_os_str();
    let mut args: Vec<&OsStr> = vec!["-i".as_ref(), image, "-s".as_ref()];
    let entries: Vec<std::path::PathBuf> = ["EFI", "loader", "vmlinuz", "initrd.img"]
        .iter()
        .map(|name| tree.join(name))
        .collect();
    args.extend(entries.iter().map(|p| p.as_os_str()));
    args.push("::/".as_ref());
    tools::run(MCOPY, &args, &work.join("mcopy.log"))
}

/// The raw GPT disk `raw`: the ESP `esp` then the root file system `ext4`, each copied in at
/// its partition's offset.
fn assemble(esp: &Path, ext4: &Path, raw: &Path, work: &Path) -> Result<(), ImageError> {
    let size_of = |path: &Path| {
        std::fs::metadata(path)
            .map(|m| m.len())
            .map_err(|e| ImageError::io(path, e))
    };
    let root_mib = size_of(ext4)?.div_ceil(MIB);
    let total = (ALIGN_MIB + ESP_MIB + root_mib + ALIGN_MIB) * MIB;
    let file = std::fs::File::create(raw).map_err(|e| ImageError::io(raw, e))?;
    file.set_len(total).map_err(|e| ImageError::io(raw, e))?;
    drop(file);
    let table = format!(
        "label: gpt\n\
         start={}MiB, size={ESP_MIB}MiB, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name=\"esp\"\n\
         start={}MiB, size={root_mib}MiB, type=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709, name=\"root\"\n",
        ALIGN_MIB,
        ALIGN_MIB + ESP_MIB,
    );
    let script = work.join("sfdisk.script");
    std::fs::write(&script, &table).map_err(|e| ImageError::io(&script, e))?;
    let log = work.join("sfdisk.log");
    let status = std::process::Command::new(tools::find(SFDISK)?)
        .args(["--quiet", "--no-reread", "--no-tell-kernel"])
        .arg(raw)
        .stdin(std::fs::File::open(&script).map_err(|e| ImageError::io(&script, e))?)
        .stdout(std::fs::File::create(&log).map_err(|e| ImageError::io(&log, e))?)
        .stderr(std::process::Stdio::piped())
        .output()
        .map_err(|e| ImageError::io(raw, e))?;
    if !status.status.success() {
        return Err(ImageError::Rootfs(format!(
            "sfdisk could not write the partition table: {}",
            String::from_utf8_lossy(&status.stderr).trim()
        )));
    }
    copy_at(esp, raw, ALIGN_MIB * MIB)?;
    copy_at(ext4, raw, (ALIGN_MIB + ESP_MIB) * MIB)
}

/// Copies the file `from` into `to` at byte `offset`.
fn copy_at(from: &Path, to: &Path, offset: u64) -> Result<(), ImageError> {
    let mut source = std::fs::File::open(from).map_err(|e| ImageError::io(from, e))?;
    let mut dest = std::fs::OpenOptions::new()
        .write(true)
        .open(to)
        .map_err(|e| ImageError::io(to, e))?;
    dest.seek(SeekFrom::Start(offset))
        .map_err(|e| ImageError::io(to, e))?;
    std::io::copy(&mut source, &mut dest).map_err(|e| ImageError::io(to, e))?;
    Ok(())
}
