//! The initramfs stage: the agent (static, stripped) as `/init`, the image's modules and their
//! load order, and the few nodes the agent needs before it mounts /dev.

use std::path::Path;

use super::tools::{self, STRIP};
use super::{ImageError, cpio::Cpio};

/// Refuses an agent that is not a static x86-64 ELF executable (it must run before any
/// library exists).
pub fn check_agent(agent: &Path) -> Result<(), ImageError> {
    let bad = |reason: &str| ImageError::Agent {
        path: agent.to_owned(),
        reason: reason.to_owned(),
    };
    let elf = std::fs::read(agent).map_err(|e| ImageError::io(agent, e))?;
    if elf.len() < 64 || &elf[..4] != b"\x7fELF" || elf[4] != 2 || elf[18] != 62 {
        return Err(bad("not an x86-64 ELF executable"));
    }
    let u64_at = |at: usize| {
        elf.get(at..at + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    };
    let u16_at = |at: usize| {
        elf.get(at..at + 2)
            .and_then(|b| b.try_into().ok())
            .map(u16::from_le_bytes)
    };
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return Err(bad("truncated ELF header"));
    };
    for i in 0..usize::from(phnum) {
        let at = usize::try_from(phoff)
            .unwrap_or(usize::MAX)
            .saturating_add(i * usize::from(phentsize));
        let Some(kind) = elf.get(at..at + 4) else {
            return Err(bad("truncated program headers"));
        };
        if kind == 3u32.to_le_bytes() {
            return Err(bad(
                "dynamically linked; build it with `cargo build -p vmfarm-agent --release --target x86_64-unknown-linux-musl`",
            ));
        }
    }
    Ok(())
}

/// Writes `out` from the agent and the rootfs stage's `modules` folder.
pub fn build(agent: &Path, modules: &Path, out: &Path, work: &Path) -> Result<(), ImageError> {
    check_agent(agent)?;
    let init = work.join("init");
    tools::run(
        STRIP,
        &["-o".as_ref(), init.as_os_str(), agent.as_os_str()],
        &work.join("strip.log"),
    )?;
    let read = |p: &Path| std::fs::read(p).map_err(|e| ImageError::io(p, e));
    let file = std::fs::File::create(out).map_err(|e| ImageError::io(out, e))?;
    let mut cpio = Cpio::new(std::io::BufWriter::new(file));
    let io = |e| ImageError::io(out, e);
    for dir in ["dev", "proc", "sys", "run", "newroot", "lib", "lib/modules"] {
        cpio.dir(dir, 0o755).map_err(io)?;
    }
    // The kernel opens /dev/console for /init before anything is mounted.
    cpio.char_device("dev/console", 0o600, 5, 1).map_err(io)?;
    cpio.file("init", 0o755, &read(&init)?).map_err(io)?;
    let order_path = modules.join("load.order");
    let order = std::fs::read_to_string(&order_path).map_err(|e| ImageError::io(&order_path, e))?;
    for name in order.lines().filter(|l| !l.is_empty()) {
        cpio.file(
            &format!("lib/modules/{name}"),
            0o644,
            &read(&modules.join(name))?,
        )
        .map_err(io)?;
    }
    cpio.file("lib/modules/load.order", 0o644, order.as_bytes())
        .map_err(io)?;
    cpio.finish().map_err(io)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_check_agent_refuses_non_elf_and_dynamic_binaries() {
        let dir = std::env::temp_dir().join(format!("vmfarm-initrd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let text = dir.join("script");
        std::fs::write(&text, "#!/bin/sh\n").unwrap();
        assert!(
            check_agent(&text)
                .unwrap_err()
                .to_string()
                .contains("not an x86-64 ELF")
        );
        // The test binary itself is dynamically linked (glibc).
        let me = std::env::current_exe().unwrap();
        assert!(
            check_agent(&me)
                .unwrap_err()
                .to_string()
                .contains("dynamically linked")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
