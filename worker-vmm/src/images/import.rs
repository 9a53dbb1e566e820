//! `vmfarm images import NAME DISK`: an existing disk image that boots by firmware (a
//! distribution's cloud image, or a disk of one's own) becomes image NAME.
//!
//! Everything about the file is checked before anything is written: it is a disk image QEMU
//! reads (qcow2 or raw) with no backing file and no external data file (either would make the
//! import, run as root, read a file of the host that the image names), its size is sane, and
//! its first sector carries a partition table's boot signature (a raw file of any other kind is
//! not a disk). It is then converted to a qcow2 of its own in the images directory, read-only,
//! as a new version (of the disk, the firmware and the user); a file that fails the checks
//! leaves nothing there.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::ImageError;
use super::build::{Scratch, install, lock, sha256_file};
use super::manifest::{DISK, ImageManifest, InstalledImage, SystemInfo};
use super::recipe::{BootMethod, Firmware, valid_name};
use super::tools::{self, QEMU_IMG};

/// The smallest and largest virtual disk an import takes.
const MIN_SIZE: u64 = 1 << 20;
const MAX_SIZE: u64 = 2 << 40;

#[derive(Debug, clap::Args)]
pub struct ImportArgs {
    /// The image's name, as jobs name it: [a-z0-9][a-z0-9_-]{0,63}.
    pub name: String,
    /// The disk image: qcow2 or raw, with its partition table and boot loader.
    pub disk: PathBuf,
    /// The firmware that boots it.
    #[arg(long, value_enum, default_value = "uefi")]
    pub firmware: Firmware,
    /// The build user cloud-init makes in its guests (home /home/build whatever its name).
    #[arg(long, default_value = super::manifest::DEFAULT_USER)]
    pub user: String,
    #[command(flatten)]
    pub dir: super::ImagesDirArg,
}

/// What `qemu-img info --output=json` says of a file.
#[derive(Debug, Deserialize)]
struct Info {
    format: String,
    #[serde(rename = "virtual-size")]
    virtual_size: u64,
    #[serde(rename = "backing-filename")]
    backing_filename: Option<String>,
    /// qcow2's own header fields (`data-file`: an external data file).
    #[serde(rename = "format-specific", default)]
    format_specific: Option<FormatSpecific>,
}

#[derive(Debug, Default, Deserialize)]
struct FormatSpecific {
    #[serde(default)]
    data: serde_json::Map<String, serde_json::Value>,
}

/// A build user's name: a login name most systems take.
fn valid_user(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
        && name.len() <= 32
        && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
        && name != "root"
}

/// Checks `disk` as [the module](self) says; what qemu-img read of it.
fn check(disk: &Path, work: &Path) -> Result<Info, ImageError> {
    let bad = |why: String| ImageError::Rootfs(format!("{}: {why}", disk.display()));
    let meta = std::fs::metadata(disk).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => bad("no such file".into()),
        _ => ImageError::io(disk, e),
    })?;
    if !meta.is_file() {
        return Err(bad("not a regular file".into()));
    }
    let args: [&OsStr; 4] = [
        "info".as_ref(),
        "--output=json".as_ref(),
        "--force-share".as_ref(),
        disk.as_os_str(),
    ];
    let out = tools::output(QEMU_IMG, &args)
        .map_err(|e| bad(format!("qemu-img cannot read it as a disk image: {e}")))?;
    let info: Info = serde_json::from_slice(&out)
        .map_err(|e| bad(format!("qemu-img's description of it: {e}")))?;
    if info.format != "qcow2" && info.format != "raw" {
        return Err(bad(format!(
            "a {} image: convert it to qcow2 or raw first (qemu-img convert -O qcow2)",
            info.format
        )));
    }
    if let Some(backing) = &info.backing_filename {
        return Err(bad(format!(
            "it has a backing file ({backing}): flatten it first (qemu-img convert -O qcow2 {} flat.qcow2)",
            disk.display()
        )));
    }
    let data_file = info
        .format_specific
        .as_ref()
        .and_then(|f| f.data.get("data-file"));
    if let Some(data_file) = data_file {
        return Err(bad(format!(
            "its data lives in an external file ({data_file}): convert it to a self-contained \
             qcow2 first (qemu-img convert -O qcow2)"
        )));
    }
    if !(MIN_SIZE..=MAX_SIZE).contains(&info.virtual_size) {
        return Err(bad(format!(
            "its virtual size is {} bytes: a disk image takes 1 MiB to 2 TiB",
            info.virtual_size
        )));
    }
    if info.format == "qcow2" {
        let args: [&OsStr; 5] = [
            "check".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            "--force-share".as_ref(),
            disk.as_os_str(),
        ];
        tools::run(QEMU_IMG, &args, &work.join("check.log"))
            .map_err(|e| bad(format!("the qcow2 file is damaged: {e}")))?;
    }
    let sector = work.join("sector0");
    let (input, output) = (
        format!("if={}", disk.display()),
        format!("of={}", sector.display()),
    );
    let args: [&OsStr; 9] = [
        "dd".as_ref(),
        "-f".as_ref(),
        info.format.as_ref(),
        "-O".as_ref(),
        "raw".as_ref(),
        "bs=512".as_ref(),
        "count=1".as_ref(),
        input.as_ref(),
        output.as_ref(),
    ];
    tools::run(QEMU_IMG, &args, &work.join("dd.log"))
        .map_err(|e| bad(format!("its first sector cannot be read: {e}")))?;
    let first = std::fs::read(&sector).map_err(|e| ImageError::io(&sector, e))?;
    if first.get(510..512) != Some(&[0x55, 0xAA][..]) {
        return Err(bad(
            "its first sector has no partition table (no MBR or protective GPT boot signature): \
             not a bootable disk image"
                .into(),
        ));
    }
    Ok(info)
}

/// Imports `args.disk` as image `args.name`; the installed image.
pub fn import(
    args: &ImportArgs,
    progress: &mut dyn FnMut(&str),
) -> Result<InstalledImage, ImageError> {
    if !valid_name(&args.name) {
        return Err(ImageError::Rootfs(format!(
            "image name {:?}: expected [a-z0-9][a-z0-9_-]{{0,63}}",
            args.name
        )));
    }
    if !valid_user(&args.user) {
        return Err(ImageError::Rootfs(format!(
            "--user {:?}: expected a login name ([a-z_][a-z0-9_-]{{0,31}}, not root)",
            args.user
        )));
    }
    tools::require(&[QEMU_IMG])?;
    // The checks' scratch files: a private folder of its own, outside the images directory.
    let work = tempfile::Builder::new()
        .prefix("vmfarm-import-")
        .tempdir()
        .map_err(|e| ImageError::io(&std::env::temp_dir(), e))?;
    let info = check(&args.disk, work.path())?;
    progress(&format!(
        "{}: {} disk of {} MiB",
        args.disk.display(),
        info.format,
        info.virtual_size >> 20
    ));
    let source = sha256_file(&args.disk)?;
    let version = super::build::key(&[&source.sha256, &format!("{:?}", args.firmware), &args.user])
        [..12]
        .to_owned();
    let images_dir = args.dir.resolve();
    let image_dir = images_dir.join(&args.name);
    let final_dir = image_dir.join(&version);
    let _lock = lock(&image_dir.join(".lock"))?;
    let now = std::time::Instant::now();
    if let Some(found) = super::build::reuse(&final_dir, &images_dir, &args.name, now)? {
        return Ok(found.image);
    }
    progress(&format!("copying it into {}", final_dir.display()));
    let scratch = Scratch::new(image_dir.join(format!(".tmp-{version}")))?;
    let disk = scratch.path().join(DISK);
    let args_convert: [&OsStr; 7] = [
        "convert".as_ref(),
        "-f".as_ref(),
        info.format.as_ref(),
        "-O".as_ref(),
        "qcow2".as_ref(),
        args.disk.as_os_str(),
        disk.as_os_str(),
    ];
    tools::run(QEMU_IMG, &args_convert, &work.path().join("convert.log"))?;
    let read_only = std::os::unix::fs::PermissionsExt::from_mode(0o444);
    std::fs::set_permissions(&disk, read_only).map_err(|e| ImageError::io(&disk, e))?;
    let entry = sha256_file(&disk)?;
    let shown = args.disk.file_name().map_or_else(
        || args.disk.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    let manifest = ImageManifest {
        name: args.name.clone(),
        version: version.clone(),
        boot: BootMethod::Firmware,
        built_at: super::build::now_secs(),
        system: SystemInfo {
            os: "imported".into(),
            release: String::new(),
            pretty_name: format!("{shown} (imported)"),
            kernel_version: String::new(),
            packages: BTreeMap::new(),
        },
        files: BTreeMap::from([(DISK.to_owned(), entry)]),
        package_manager: None,
        firmware: Some(args.firmware),
        user: Some(args.user.clone()),
    };
    install(scratch, manifest, &images_dir, &final_dir)
}
