//! Test fixtures for qcow2 images: qemu-img as the reference that makes, checks and reads them.

use std::path::{Path, PathBuf};

/// Run qemu-img; panics with its stderr when it fails.
pub fn qemu_img(args: &[&str]) -> String {
    let out = std::process::Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img runs");
    assert!(
        out.status.success(),
        "qemu-img {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A qcow2 image named `name` in `dir` holding `data`, made by `qemu-img convert` (the reference).
pub fn qcow2_from(dir: &Path, name: &str, data: &[u8]) -> PathBuf {
    let raw = dir.join(format!("{name}.raw"));
    std::fs::write(&raw, data).expect("write the raw seed");
    let image = dir.join(name);
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        path_str(&raw),
        path_str(&image),
    ]);
    image
}

/// What `image` holds, as `qemu-img` reads it, after `qemu-img check` accepts it.
pub fn checked_contents(dir: &Path, image: &Path) -> Vec<u8> {
    qemu_img(&["check", path_str(image)]);
    let out = dir.join("contents.raw");
    qemu_img(&["convert", "-O", "raw", path_str(image), path_str(&out)]);
    std::fs::read(&out).expect("read the converted image")
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("test paths are UTF-8")
}
