//! Writes the generated part of the seed corpus: the virtio-blk, vsock and qcow2 inputs the
//! VMM's fuzzing entry points build with its tests' fixtures.
//!
//!     cargo +nightly run --manifest-path fuzz/Cargo.toml --example seeds
//!
//! The manifest and command-line seeds are plain text files, written by hand.

use std::path::Path;

fn main() -> std::io::Result<()> {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let sets = [
        ("virtio_blk", vmfarm_vmm::fuzzing::virtio_blk_seeds()),
        ("vsock", vmfarm_vmm::fuzzing::vsock_seeds()),
        ("qcow2", vmfarm_vmm::fuzzing::qcow2_seeds()),
    ];
    for (target, seeds) in sets {
        let dir = corpus.join(target);
        std::fs::create_dir_all(&dir)?;
        for (name, bytes) in seeds {
            let path = dir.join(format!("seed-{name}"));
            std::fs::write(&path, &bytes)?;
            println!("{} ({} bytes)", path.display(), bytes.len());
        }
    }
    Ok(())
}
