//! The boot contract between the worker and the guest agent (CONTRACTS.md, "Worker <-> guest"):
//! the kernel command line the worker composes and the agent parses ([`GuestCmdline`]), the host
//! channel it names ([`ChannelKind`]), the job's identity the worker sends as the channel's first
//! line ([`Identity`]), and the console lines with which the agent says it waits for that
//! identity ([`WAITING_LINE`]) and that it is ready ([`ReadyLine`]).
//!
//! The command line holds nothing of the job: a guest booted with it and paused while its agent
//! waits (a template snapshot) can be restored for any job, which then gets its own key, host
//! name, clock and random seed over the channel.
//!
//! The agent links this module too, so it stays free of anything that would keep the agent from
//! building static for musl.

use crate::cache::CacheMount;
use std::fmt;
use std::str::FromStr;

/// The build user's home in every guest (whatever the user's name in an image booted by
/// firmware).
pub const HOME: &str = "/home/build";
/// The build directory: the sources land here and the tasks start here.
pub const BUILD_DIR: &str = "/home/build/work";
/// The worker's own files in the guest: task scripts, source archives.
pub const FARM_DIR: &str = "/home/build/.vmfarm";
/// The job's secrets, one file each.
pub const SECRETS_DIR: &str = "/home/build/.secrets";

/// The words before the `vmfarm.*` ones: the serial console, a reboot the VMM sees (`reboot=k`
/// through the i8042) and a panic that reboots at once.
const BASE: &str = "console=ttyS0 reboot=k panic=-1";
/// Under TCG the TSC calibration can hang without this word; its presence is what
/// [`GuestCmdline::emulated`] stands for.
const TCG_WORD: &str = "tsc_early_khz=2000000";

const CHANNEL: &str = "vmfarm.channel";
const USER: &str = "vmfarm.user";
/// The `vmfarm.*` words, in the order `compose` writes them.
const WORDS: [&str; 2] = [CHANNEL, USER];

/// The console line (without its line end) the agent prints once it listens on its channel
/// and waits for the job's [`Identity`]: the worker sends the identity after it, and a template
/// snapshot is taken at it.
pub const WAITING_LINE: &str = "vmfarm-agent waiting for the job's identity";

/// Where the agent serves SSH (`vmfarm.channel=`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChannelKind {
    /// A virtio-serial port of this name (QEMU): `vport:NAME`. The guest finds it under
    /// /sys/class/virtio-ports/*/name.
    Vport(String),
    /// AF_VSOCK on this port (the integrated VMM): `vsock:PORT`.
    Vsock(u32),
}

impl ChannelKind {
    /// The name the QEMU backend gives its virtio-serial port.
    pub const QEMU_PORT: &str = "org.vmfarm.ssh";
}

impl fmt::Display for ChannelKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChannelKind::Vport(name) => write!(f, "vport:{name}"),
            ChannelKind::Vsock(port) => write!(f, "vsock:{port}"),
        }
    }
}

impl FromStr for ChannelKind {
    type Err = CmdlineError;

    fn from_str(value: &str) -> Result<Self, CmdlineError> {
        let bad = || CmdlineError::BadChannel(value.to_owned());
        match value.split_once(':') {
            Some(("vport", name))
                if !name.is_empty()
                    && name.is_ascii()
                    && !name.contains('/')
                    && !name.contains(char::is_whitespace) =>
            {
                Ok(ChannelKind::Vport(name.to_owned()))
            }
            Some(("vsock", port)) => port.parse().map(ChannelKind::Vsock).map_err(|_| bad()),
            _ => Err(bad()),
        }
    }
}

/// Everything the worker tells the guest on the kernel command line. The VMM or QEMU adds
/// nothing of its own: [`GuestCmdline::compose`] is the whole line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestCmdline {
    pub channel: ChannelKind,
    /// The build user's name: `[a-z_][a-z0-9_-]{0,31}`, never `root`.
    pub user: String,
    /// The guest runs under emulation (TCG): adds `tsc_early_khz=2000000`.
    pub emulated: bool,
}

/// Why the kernel command line or the identity line does not carry a valid boot contract.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CmdlineError {
    #[error("the kernel command line has no {0}=")]
    Missing(&'static str),
    #[error("{0} is given twice on the kernel command line")]
    Repeated(&'static str),
    #[error("vmfarm.channel={0:?}: expected vport:NAME or vsock:PORT")]
    BadChannel(String),
    #[error("vmfarm.user={0:?}: expected [a-z_][a-z0-9_-]{{0,31}}")]
    BadUser(String),
    #[error(
        "the identity line {0:?} is not `{IDENTITY_PREFIX}key=... hostname=... time=... seed=...`"
    )]
    BadIdentity(String),
    #[error("identity key={0:?}: expected base64 of an SSH public key blob")]
    BadKey(String),
    #[error("identity hostname={0:?}: expected 1-63 characters of [a-zA-Z0-9-]")]
    BadHostname(String),
    #[error("identity time={0:?}: expected unix seconds")]
    BadTime(String),
    #[error("identity seed={0:?}: expected 64 hexadecimal digits")]
    BadSeed(String),
    #[error("identity cache={0:?}: expected cache-N.qcow2:PATH[,PATH...] with paths under {HOME}")]
    BadCache(String),
}

impl GuestCmdline {
    /// The kernel command line: `console=ttyS0 reboot=k panic=-1`, `tsc_early_khz=2000000`
    /// under TCG, then the `vmfarm.*` words.
    pub fn compose(&self) -> String {
        let mut line = String::from(BASE);
        if self.emulated {
            line.push(' ');
            line.push_str(TCG_WORD);
        }
        let values = [self.channel.to_string(), self.user.clone()];
        for (name, value) in WORDS.iter().zip(values) {
            line.push_str(&format!(" {name}={value}"));
        }
        line
    }

    /// Parses a kernel command line (the text of /proc/cmdline). Every `vmfarm.*` word of the
    /// contract must be there once; the other words are the kernel's, except that
    /// `tsc_early_khz=2000000` sets `emulated`.
    pub fn parse(cmdline: &str) -> Result<Self, CmdlineError> {
        let mut found: [Option<&str>; WORDS.len()] = [None; WORDS.len()];
        let mut emulated = false;
        for word in cmdline.split_ascii_whitespace() {
            emulated |= word == TCG_WORD;
            let Some((name, value)) = word.split_once('=') else {
                continue;
            };
            if let Some(i) = WORDS.iter().position(|n| *n == name)
                && found[i].replace(value).is_some()
            {
                return Err(CmdlineError::Repeated(WORDS[i]));
            }
        }
        let [channel, user] = found;
        Ok(GuestCmdline {
            channel: channel.ok_or(CmdlineError::Missing(CHANNEL))?.parse()?,
            user: check_user(user.ok_or(CmdlineError::Missing(USER))?)?,
            emulated,
        })
    }
}

/// What starts the identity line.
const IDENTITY_PREFIX: &str = "vmfarm-identity ";

/// The job's identity, the first line the worker sends over the agent's channel (after the
/// agent's [`WAITING_LINE`]): `vmfarm-identity key=<blob> hostname=<name> time=<secs>
/// seed=<64 hex>`. The agent sets the host name and the clock, mixes the seed into the kernel's
/// random pool and reseeds it, and only then makes its host key; so two guests restored from
/// one snapshot share none of them.
#[derive(Clone, PartialEq, Eq)]
pub struct Identity {
    /// The job's ssh-ed25519 public key: base64 of its OpenSSH wire blob. Only its alphabet is
    /// checked here; the agent decodes it and accepts nothing but an ed25519 key.
    pub key_blob: String,
    /// The guest's hostname (`job-<id>`): 1 to 63 of `[a-zA-Z0-9-]`, not starting with `-`.
    pub hostname: String,
    /// Unix seconds to set the guest's clock to.
    pub time: u64,
    /// 32 bytes from the host's random source.
    pub seed: [u8; 32],
    /// The job's cache disks, each a `cache=` word after the seed, at most [`CacheMount::MAX`].
    pub caches: Vec<CacheMount>,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("key_blob", &self.key_blob)
            .field("hostname", &self.hostname)
            .field("time", &self.time)
            .field("caches", &self.caches)
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// The longest identity line the agent reads, its line end included.
    pub const MAX_LINE: usize = 8192;

    /// The line, with its line end.
    pub fn line(&self) -> String {
        let seed: String = self.seed.iter().map(|b| format!("{b:02x}")).collect();
        let caches: String = self.caches.iter().map(|c| format!(" cache={c}")).collect();
        format!(
            "{IDENTITY_PREFIX}key={} hostname={} time={} seed={seed}{caches}\n",
            self.key_blob, self.hostname, self.time
        )
    }

    /// Parses one identity line (with or without its line end).
    pub fn parse(line: &str) -> Result<Self, CmdlineError> {
        let bad = || CmdlineError::BadIdentity(line.chars().take(200).collect());
        let rest = line
            .strip_suffix('\n')
            .unwrap_or(line)
            .strip_prefix(IDENTITY_PREFIX)
            .ok_or_else(bad)?;
        let words: Vec<(&str, &str)> = rest
            .split(' ')
            .map(|w| w.split_once('=').ok_or_else(bad))
            .collect::<Result<_, _>>()?;
        let [
            ("key", key),
            ("hostname", hostname),
            ("time", time),
            ("seed", seed),
            ref caches @ ..,
        ] = words[..]
        else {
            return Err(bad());
        };
        if caches.len() > CacheMount::MAX {
            return Err(bad());
        }
        let caches = caches
            .iter()
            .map(|(name, value)| match *name {
                "cache" => CacheMount::parse(value),
                _ => Err(bad()),
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Identity {
            key_blob: check_key_blob(key)?,
            hostname: check_hostname(hostname)?,
            time: parse_time(time)?,
            seed: parse_seed(seed)?,
            caches,
        })
    }
}

fn parse_seed(value: &str) -> Result<[u8; 32], CmdlineError> {
    let bad = || CmdlineError::BadSeed(value.to_owned());
    if value.len() != 64 || !value.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad());
    }
    let mut seed = [0u8; 32];
    for (i, byte) in seed.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&value[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(seed)
}

fn check_key_blob(value: &str) -> Result<String, CmdlineError> {
    let ok = !value.is_empty()
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+/=".contains(&b));
    if ok {
        Ok(value.to_owned())
    } else {
        Err(CmdlineError::BadKey(value.to_owned()))
    }
}

fn check_hostname(value: &str) -> Result<String, CmdlineError> {
    let ok = (1..=63).contains(&value.len())
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !value.starts_with('-');
    if ok {
        Ok(value.to_owned())
    } else {
        Err(CmdlineError::BadHostname(value.to_owned()))
    }
}

/// Unix seconds that also fit a signed `time_t`.
fn parse_time(value: &str) -> Result<u64, CmdlineError> {
    value
        .parse::<u64>()
        .ok()
        .filter(|t| i64::try_from(*t).is_ok())
        .ok_or_else(|| CmdlineError::BadTime(value.to_owned()))
}

fn check_user(value: &str) -> Result<String, CmdlineError> {
    let mut bytes = value.bytes();
    let first_ok = bytes
        .next()
        .is_some_and(|b| b.is_ascii_lowercase() || b == b'_');
    let rest_ok =
        bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if first_ok && rest_ok && value.len() <= 32 && value != "root" {
        Ok(value.to_owned())
    } else {
        Err(CmdlineError::BadUser(value.to_owned()))
    }
}

/// The agent's readiness announcement on the guest console, one line:
/// `vmfarm-agent ready SHA256:<base64>`, the host key's fingerprint as OpenSSH prints it. The
/// worker pins that fingerprint for the SSH session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadyLine {
    /// `SHA256:` and the unpadded base64 of the host key's SHA-256.
    pub fingerprint: String,
}

/// A console line that announces readiness without a fingerprint the worker can pin.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the ready line carries no SHA256 fingerprint: {0:?}")]
pub struct ReadyLineError(pub String);

impl ReadyLine {
    /// What starts the announcement.
    pub const PREFIX: &str = "vmfarm-agent ready ";

    /// Looks for the announcement in one console line (without its line end; a trailing `\r` is
    /// allowed). Kernel messages can run into the agent's output on the same line, so the
    /// announcement may start anywhere in it. `Ok(None)` when the line announces nothing.
    pub fn find(line: &str) -> Result<Option<ReadyLine>, ReadyLineError> {
        let line = line.strip_suffix('\r').unwrap_or(line);
        let Some(at) = line.find(Self::PREFIX) else {
            return Ok(None);
        };
        let rest = line[at + Self::PREFIX.len()..].trim();
        let valid = rest.strip_prefix("SHA256:").is_some_and(|b64| {
            !b64.is_empty()
                && b64
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || c == b'+' || c == b'/')
        });
        if valid {
            Ok(Some(ReadyLine {
                fingerprint: rest.to_owned(),
            }))
        } else {
            Err(ReadyLineError(rest.to_owned()))
        }
    }
}

/// The line the agent prints (without its line end).
impl fmt::Display for ReadyLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", Self::PREFIX, self.fingerprint)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmdline(channel: ChannelKind, emulated: bool) -> GuestCmdline {
        GuestCmdline {
            channel,
            user: "build".into(),
            emulated,
        }
    }

    /// A command line with the contract's words and `extra` after them.
    fn line(extra: &str) -> String {
        format!(
            "{} {extra}",
            cmdline(ChannelKind::Vsock(22), false).compose()
        )
    }

    fn identity() -> Identity {
        Identity {
            key_blob: "AAAAC3NzaC1lZDI1NTE5AAAAIOv+/w==".into(),
            hostname: "job-7".into(),
            time: 1_795_000_000,
            seed: std::array::from_fn(|i| i as u8 * 7),
            caches: Vec::new(),
        }
    }

    #[test]
    fn test_compose_then_parse_gives_back_the_same_values() {
        for channel in [
            ChannelKind::Vport(ChannelKind::QEMU_PORT.into()),
            ChannelKind::Vsock(22),
        ] {
            for emulated in [false, true] {
                let c = cmdline(channel.clone(), emulated);
                assert_eq!(GuestCmdline::parse(&c.compose()), Ok(c.clone()), "{c:?}");
            }
        }
    }

    #[test]
    fn test_compose_follows_the_boot_contract() {
        let c = cmdline(ChannelKind::Vport(ChannelKind::QEMU_PORT.into()), true);
        assert_eq!(
            c.compose(),
            "console=ttyS0 reboot=k panic=-1 tsc_early_khz=2000000 vmfarm.channel=vport:org.vmfarm.ssh \
             vmfarm.user=build"
        );
        let c = cmdline(ChannelKind::Vsock(22), false);
        assert_eq!(
            c.compose(),
            "console=ttyS0 reboot=k panic=-1 vmfarm.channel=vsock:22 vmfarm.user=build"
        );
    }

    #[test]
    fn test_parse_leaves_the_kernels_words_alone() {
        let c = GuestCmdline::parse(&format!("quiet {} loglevel=3 init=/x", line(""))).unwrap();
        assert_eq!(c, cmdline(ChannelKind::Vsock(22), false));
    }

    #[test]
    fn test_parse_refuses_missing_words() {
        let full = cmdline(ChannelKind::Vsock(22), false).compose();
        for name in WORDS {
            let without: Vec<&str> = full
                .split(' ')
                .filter(|w| !w.starts_with(&format!("{name}=")))
                .collect();
            assert_eq!(
                GuestCmdline::parse(&without.join(" ")),
                Err(CmdlineError::Missing(name)),
                "{name}"
            );
        }
        assert_eq!(
            GuestCmdline::parse("console=ttyS0"),
            Err(CmdlineError::Missing(CHANNEL))
        );
    }

    #[test]
    fn test_parse_refuses_repeated_words() {
        assert_eq!(
            GuestCmdline::parse(&line("vmfarm.channel=vsock:23")),
            Err(CmdlineError::Repeated(CHANNEL))
        );
    }

    #[test]
    fn test_parse_refuses_bad_values() {
        type Case = (&'static str, fn(String) -> CmdlineError, &'static str);
        let cases: [Case; 8] = [
            (CHANNEL, CmdlineError::BadChannel, "vport:"),
            (CHANNEL, CmdlineError::BadChannel, "vport:a/b"),
            (CHANNEL, CmdlineError::BadChannel, "vsock:x"),
            (CHANNEL, CmdlineError::BadChannel, "vsock:"),
            (CHANNEL, CmdlineError::BadChannel, "tcp:22"),
            (CHANNEL, CmdlineError::BadChannel, "vport"),
            (USER, CmdlineError::BadUser, "root"),
            (USER, CmdlineError::BadUser, "Build"),
        ];
        let full = cmdline(ChannelKind::Vsock(22), false).compose();
        for (name, err, value) in cases {
            let text = full
                .split(' ')
                .map(|w| {
                    if w.starts_with(&format!("{name}=")) {
                        format!("{name}={value}")
                    } else {
                        w.to_owned()
                    }
                })
                .collect::<Vec<_>>()
                .join(" ");
            assert_eq!(
                GuestCmdline::parse(&text),
                Err(err(value.into())),
                "{name}={value}"
            );
        }
    }

    #[test]
    fn test_identity_line_round_trips() {
        let id = identity();
        let line = id.line();
        assert!(line.starts_with(
            "vmfarm-identity key=AAAAC3NzaC1lZDI1NTE5AAAAIOv+/w== hostname=job-7 \
             time=1795000000 seed=00070e15"
        ));
        assert!(
            line.ends_with('\n') && line.len() < Identity::MAX_LINE,
            "{line}"
        );
        assert_eq!(Identity::parse(&line), Ok(id.clone()));
        assert_eq!(Identity::parse(line.trim_end()), Ok(id.clone()));
        assert!(
            !format!("{id:?}").contains("seed"),
            "the seed stays out of logs"
        );
    }

    #[test]
    fn test_identity_carries_the_most_cache_mounts_within_its_line() {
        let longest = format!("/home/build/{}", "p".repeat(crate::cache::MAX_PATH_BYTES));
        let mut id = identity();
        id.caches = (0..CacheMount::MAX)
            .map(|i| CacheMount {
                serial: CacheMount::serial(i),
                paths: vec![longest.clone(); CacheMount::MAX_PATHS],
            })
            .collect();
        let line = id.line();
        assert!(line.len() < Identity::MAX_LINE, "{}", line.len());
        assert_eq!(Identity::parse(&line), Ok(id.clone()));
        let five = format!("{} cache={}", line.trim_end(), id.caches[0]);
        assert!(matches!(
            Identity::parse(&five),
            Err(CmdlineError::BadIdentity(_))
        ));
        let escaping = format!("{} cache=cache-0.qcow2:/etc", identity().line().trim_end());
        assert!(matches!(
            Identity::parse(&escaping),
            Err(CmdlineError::BadCache(_))
        ));
    }

    #[test]
    fn test_identity_refuses_bad_values() {
        let good = identity().line();
        type Case = (&'static str, &'static str, fn(String) -> CmdlineError);
        let cases: [Case; 9] = [
            ("key", "", CmdlineError::BadKey),
            ("key", "!!!", CmdlineError::BadKey),
            ("hostname", "a_b", CmdlineError::BadHostname),
            ("hostname", "-x", CmdlineError::BadHostname),
            ("time", "-5", CmdlineError::BadTime),
            ("time", "soon", CmdlineError::BadTime),
            ("time", "18446744073709551615", CmdlineError::BadTime),
            ("seed", "00", CmdlineError::BadSeed),
            ("seed", "zz", CmdlineError::BadSeed),
        ];
        for (name, value, err) in cases {
            let text: Vec<String> = good
                .trim_end()
                .split(' ')
                .map(|w| match w.split_once('=') {
                    Some((n, _)) if n == name => format!("{name}={value}"),
                    _ => w.to_owned(),
                })
                .collect();
            assert_eq!(
                Identity::parse(&text.join(" ")),
                Err(err(value.into())),
                "{name}={value}"
            );
        }
        for bad in [
            "",
            "vmfarm-identity",
            "identity key=a hostname=b time=1 seed=00",
            "vmfarm-identity hostname=job-7 key=AAAA time=1 seed=00",
            &format!("{} extra=1", good.trim_end()),
        ] {
            assert!(
                matches!(Identity::parse(bad), Err(CmdlineError::BadIdentity(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn test_ready_line_round_trips_and_is_found_after_other_output() {
        let ready = ReadyLine {
            fingerprint: "SHA256:abc+/9".into(),
        };
        let text = ready.to_string();
        assert_eq!(text, "vmfarm-agent ready SHA256:abc+/9");
        assert_eq!(ReadyLine::find(&text), Ok(Some(ready.clone())));
        assert_eq!(
            ReadyLine::find(&format!("{text}\r")),
            Ok(Some(ready.clone()))
        );
        assert_eq!(
            ReadyLine::find(&format!("[    1.5] random: crng init done{text}")),
            Ok(Some(ready))
        );
        assert_eq!(ReadyLine::find("[    1.0] booting"), Ok(None));
    }

    #[test]
    fn test_ready_line_without_a_sha256_fingerprint_is_refused() {
        for bad in ["MD5:xx", "SHA256:", "SHA256:a b", ""] {
            let line = format!("{}{bad}", ReadyLine::PREFIX);
            assert_eq!(
                ReadyLine::find(&line),
                Err(ReadyLineError(bad.trim().to_owned())),
                "{line:?}"
            );
        }
    }
}
