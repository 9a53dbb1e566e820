//! A VM's configuration, checked once from the command line.

use std::path::PathBuf;
use std::time::Duration;

use vmfarm_proto::units::{ByteSize, DurationError, SizeError, parse_duration, parse_size};

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
    /// `--memory` is not a size (the grammar of the job manifest's, `vmfarm_proto::units`).
    #[error("--memory {0:?}: give a size such as 512MiB or 2GiB")]
    Memory(String, #[source] SizeError),
    /// `--memory` is too small or too large.
    #[error(
        "--memory {0:?}: a VM has {min} to {max} of RAM",
        min = ByteSize(MIN_MEMORY),
        max = ByteSize(MAX_MEMORY)
    )]
    MemoryRange(String),
    /// `--timeout` is not a duration (the grammar of the job manifest's, `vmfarm_proto::units`).
    #[error("--timeout {0:?}: give a duration such as 90s, 5m or 1h30m")]
    Timeout(String, #[source] DurationError),
    /// `--timeout` is zero.
    #[error("--timeout {0:?}: give a positive duration such as 90s, 5m or 1h30m")]
    TimeoutZero(String),
    /// Bad `--disk`.
    #[error("--disk {0:?}: give PATH or PATH,ro")]
    Disk(String),
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
        let ByteSize(memory) =
            parse_size(&args.memory).map_err(|e| ConfigError::Memory(args.memory.clone(), e))?;
        if !(MIN_MEMORY..=MAX_MEMORY).contains(&memory) {
            return Err(ConfigError::MemoryRange(args.memory.clone()));
        }
        // Whole pages only.
        let memory = memory & !0xfff;
        let timeout = args
            .timeout
            .as_deref()
            .map(|t| match parse_duration(t) {
                Ok(d) if d.is_zero() => Err(ConfigError::TimeoutZero(t.to_owned())),
                Ok(d) => Ok(d),
                Err(e) => Err(ConfigError::Timeout(t.to_owned(), e)),
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

    /// `--memory` and `--timeout` take the job manifest's grammar: the forms it refuses
    /// (`512M`, a bare number, `250ms`) are refused here too, with its reason as the cause.
    #[test]
    fn test_sizes_and_durations_have_the_manifests_grammar() {
        for (text, bytes) in [
            ("512MiB", 512 << 20),
            ("2GiB", 2 << 30),
            ("2 GiB", 2 << 30),
            ("65536KiB", 64 << 20),
            ("16777216B", 16 << 20),
            ("1TiB", 1 << 40),
        ] {
            let c = config(&["--kernel", "/k", "--memory", text]).unwrap();
            assert_eq!(c.memory, bytes, "{text}");
        }
        for (text, reason) in [
            ("512M", "write \"512MiB\""),
            ("512", "has no unit"),
            ("2 G", "write \"2GiB\""),
            ("1.5GiB", "unknown unit"),
            ("99999999999999TiB", "too large"),
        ] {
            let err = config(&["--kernel", "/k", "--memory", text]).unwrap_err();
            let cause = std::error::Error::source(&err).map(ToString::to_string);
            assert!(
                matches!(err, ConfigError::Memory(..))
                    && cause.as_ref().is_some_and(|c| c.contains(reason)),
                "{text}: {err}: {cause:?}"
            );
        }
        for text in ["1MiB", "2TiB"] {
            let err = config(&["--kernel", "/k", "--memory", text]).unwrap_err();
            assert_eq!(err, ConfigError::MemoryRange(text.into()));
            assert!(err.to_string().contains("16MiB to 1TiB"), "{err}");
        }
        for (text, secs) in [("90s", 90), ("5m", 300), ("1h30m", 5400), ("1d", 86_400)] {
            let c = config(&["--kernel", "/k", "--timeout", text]).unwrap();
            assert_eq!(c.timeout, Some(Duration::from_secs(secs)), "{text}");
        }
        for (text, reason) in [
            ("60", "has no unit"),
            ("250ms", "unknown unit `ms`"),
            ("30m1h", "largest unit first"),
        ] {
            let err = config(&["--kernel", "/k", "--timeout", text]).unwrap_err();
            let cause = std::error::Error::source(&err).map(ToString::to_string);
            assert!(
                matches!(err, ConfigError::Timeout(..))
                    && cause.as_ref().is_some_and(|c| c.contains(reason)),
                "{text}: {err}: {cause:?}"
            );
        }
        assert_eq!(
            config(&["--kernel", "/k", "--timeout", "0s"]).unwrap_err(),
            ConfigError::TimeoutZero("0s".into())
        );
    }
}
