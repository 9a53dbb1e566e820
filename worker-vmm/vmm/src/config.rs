//! A VM's configuration, checked once from the command line.

use std::path::PathBuf;
use std::time::Duration;

use super::cli::VmRunArgs;

/// Most vCPUs a VM may have (the MP table must fit the EBDA; APIC ids are one byte).
pub const MAX_CPUS: u8 = 32;
/// Least guest RAM accepted.
pub const MIN_MEMORY: u64 = 16 << 20;
/// Most guest RAM accepted (1 TiB).
pub const MAX_MEMORY: u64 = 1 << 40;
/// The guest's vsock context id.
pub const GUEST_CID: u64 = 3;

/// A virtio-blk disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    /// Image file (raw or qcow2).
    pub path: PathBuf,
    /// Refuse guest writes.
    pub read_only: bool,
}

/// Where the console goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleConfig {
    /// The VMM's stdout.
    Stdout,
    /// A file (created or truncated).
    File(PathBuf),
}

/// Everything `build_vm` needs, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    /// Kernel image.
    pub kernel: PathBuf,
    /// Initial ramdisk.
    pub initrd: Option<PathBuf>,
    /// Disks, in /dev/vda, vdb... order.
    pub disks: Vec<DiskConfig>,
    /// Host socket of the vsock device, if any.
    pub vsock: Option<PathBuf>,
    /// Attach a virtio-rng device.
    pub rng: bool,
    /// vCPUs.
    pub cpus: u8,
    /// RAM in bytes.
    pub memory: u64,
    /// Kernel command line as given.
    pub cmdline: String,
    /// Also declare virtio-mmio devices on the command line.
    pub virtio_mmio_cmdline: bool,
    /// Console destination.
    pub console: ConsoleConfig,
    /// Give up after this long.
    pub timeout: Option<Duration>,
}

/// The command line asked for something that cannot be.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// Bad `--cpus`.
    #[error("--cpus {0}: a VM has 1 to {MAX_CPUS} vCPUs")]
    Cpus(u8),
    /// Bad `--memory`.
    #[error("--memory {0:?}: give a size such as 512MiB or 2GiB, between 16MiB and 1TiB")]
    Memory(String),
    /// Bad `--timeout`.
    #[error("--timeout {0:?}: give a duration such as 60s, 5m or 1h")]
    Timeout(String),
    /// Bad `--disk`.
    #[error("--disk {0:?}: give PATH or PATH,ro")]
    Disk(String),
}

/// Parses a size: a number with an optional binary suffix (K, KiB, M, MiB, G, GiB, T, TiB;
/// B for bytes); a bare number means MiB.
pub fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().ok()?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "b" => 0,
        "k" | "kb" | "kib" => 10,
        "" | "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return None,
    };
    number.checked_mul(1 << shift)
}

/// Parses a duration: a number with ms, s, m or h; a bare number means seconds.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().ok()?;
    match unit.trim() {
        "ms" => Some(Duration::from_millis(number)),
        "" | "s" => Some(Duration::from_secs(number)),
        "m" | "min" => number.checked_mul(60).map(Duration::from_secs),
        "h" => number.checked_mul(3600).map(Duration::from_secs),
        _ => None,
    }
}

fn parse_disk(text: &str) -> Result<DiskConfig, ConfigError> {
    let (path, read_only) = match text.rsplit_once(',') {
        Some((path, "ro")) => (path, true),
        Some((path, "rw")) => (path, false),
        Some(_) => return Err(ConfigError::Disk(text.to_owned())),
        None => (text, false),
    };
    if path.is_empty() {
        return Err(ConfigError::Disk(text.to_owned()));
    }
    Ok(DiskConfig {
        path: PathBuf::from(path),
        read_only,
    })
}

impl TryFrom<&VmRunArgs> for VmConfig {
    type Error = ConfigError;

    fn try_from(args: &VmRunArgs) -> Result<Self, ConfigError> {
        if args.cpus == 0 || args.cpus > MAX_CPUS {
            return Err(ConfigError::Cpus(args.cpus));
        }
        let memory = parse_size(&args.memory)
            .filter(|m| (MIN_MEMORY..=MAX_MEMORY).contains(m))
            .ok_or_else(|| ConfigError::Memory(args.memory.clone()))?;
        // Whole pages only.
        let memory = memory & !0xfff;
        let timeout = args
            .timeout
            .as_deref()
            .map(|t| {
                parse_duration(t)
                    .filter(|d| !d.is_zero())
                    .ok_or_else(|| ConfigError::Timeout(t.to_owned()))
            })
            .transpose()?;
        let disks = args
            .disks
            .iter()
            .map(|d| parse_disk(d))
            .collect::<Result<_, _>>()?;
        Ok(VmConfig {
            kernel: args.kernel.clone(),
            initrd: args.initrd.clone(),
            disks,
            vsock: args.vsock.clone(),
            rng: true,
            cpus: args.cpus,
            memory,
            cmdline: args.cmdline.clone(),
            virtio_mmio_cmdline: args.virtio_mmio_cmdline,
            console: args
                .console
                .clone()
                .map_or(ConsoleConfig::Stdout, ConsoleConfig::File),
            timeout,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::VmRunCli;
    use clap::Parser;

    fn config(argv: &[&str]) -> Result<VmConfig, ConfigError> {
        let cli = VmRunCli::try_parse_from(std::iter::once("vm-run").chain(argv.iter().copied()))
            .expect("clap accepts the arguments");
        VmConfig::try_from(&cli.args)
    }

    #[test]
    fn test_full_command_line_becomes_a_config() {
        let c = config(&[
            "--kernel",
            "/k",
            "--initrd",
            "/i",
            "--disk",
            "/a.qcow2",
            "--disk",
            "/b.raw,ro",
            "--vsock",
            "/run/v.sock",
            "--cpus",
            "2",
            "--memory",
            "1GiB",
            "--cmdline",
            "console=ttyS0 reboot=k",
            "--console",
            "/tmp/c.log",
            "--timeout",
            "90s",
        ])
        .unwrap();
        assert_eq!(c.kernel, PathBuf::from("/k"));
        assert_eq!(c.initrd, Some(PathBuf::from("/i")));
        assert_eq!(
            c.disks,
            vec![
                DiskConfig {
                    path: "/a.qcow2".into(),
                    read_only: false
                },
                DiskConfig {
                    path: "/b.raw".into(),
                    read_only: true
                },
            ]
        );
        assert_eq!(c.vsock, Some(PathBuf::from("/run/v.sock")));
        assert_eq!((c.cpus, c.memory), (2, 1 << 30));
        assert_eq!(c.cmdline, "console=ttyS0 reboot=k");
        assert_eq!(c.console, ConsoleConfig::File("/tmp/c.log".into()));
        assert_eq!(c.timeout, Some(Duration::from_secs(90)));
        assert!(!c.virtio_mmio_cmdline);
    }

    #[test]
    fn test_defaults() {
        let c = config(&["--kernel", "/k"]).unwrap();
        assert_eq!((c.cpus, c.memory, c.timeout), (1, 512 << 20, None));
        assert_eq!(c.console, ConsoleConfig::Stdout);
        assert!(c.rng && c.disks.is_empty() && c.cmdline.is_empty());
    }

    #[test]
    fn test_bad_values_are_refused_with_the_flag_named() {
        for (argv, flag) in [
            (&["--kernel", "/k", "--cpus", "0"][..], "--cpus"),
            (&["--kernel", "/k", "--cpus", "33"][..], "--cpus"),
            (&["--kernel", "/k", "--memory", "1MiB"][..], "--memory"),
            (&["--kernel", "/k", "--memory", "lots"][..], "--memory"),
            (&["--kernel", "/k", "--timeout", "soon"][..], "--timeout"),
            (&["--kernel", "/k", "--timeout", "0"][..], "--timeout"),
            (&["--kernel", "/k", "--disk", "/a,rx"][..], "--disk"),
            (&["--kernel", "/k", "--disk", ",ro"][..], "--disk"),
        ] {
            let err = config(argv).unwrap_err();
            assert!(err.to_string().starts_with(flag), "{argv:?}: {err}");
        }
    }

    #[test]
    fn test_sizes_and_durations() {
        for (text, bytes) in [
            ("512MiB", 512 << 20),
            ("512M", 512 << 20),
            ("512", 512 << 20),
            ("2GiB", 2 << 30),
            ("2 G", 2 << 30),
            ("4096KiB", 4 << 20),
            ("1048576B", 1 << 20),
        ] {
            assert_eq!(parse_size(text), Some(bytes), "{text}");
        }
        assert_eq!(parse_size("99999999999999TiB"), None);
        assert_eq!(parse_size("1.5G"), None);
        for (text, d) in [
            ("60s", Duration::from_secs(60)),
            ("60", Duration::from_secs(60)),
            ("5m", Duration::from_secs(300)),
            ("1h", Duration::from_secs(3600)),
            ("250ms", Duration::from_millis(250)),
        ] {
            assert_eq!(parse_duration(text), Some(d), "{text}");
        }
        assert_eq!(parse_duration("1d"), None);
    }
}
