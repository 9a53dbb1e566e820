//! The guest's part of the boot contract: the `vmfarm.*` words of the kernel command line.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use russh::keys::PublicKey;

/// Where the agent serves SSH.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Channel {
    /// A virtio-serial port with this name (`vmfarm.channel=vport:NAME`).
    Vport(String),
    /// An AF_VSOCK stream socket listening on this port (`vmfarm.channel=vsock:PORT`).
    Vsock(u32),
}

/// What the worker told the guest on the kernel command line.
#[derive(Debug, Clone)]
pub struct BootConfig {
    pub channel: Channel,
    /// The only public key the SSH server accepts.
    pub key: PublicKey,
    pub hostname: Option<String>,
    /// Unix seconds to set the clock to.
    pub time: Option<i64>,
    /// The build user's name.
    pub user: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CmdlineError {
    #[error("the kernel command line has no {0}=")]
    Missing(&'static str),
    #[error("{0} is given twice on the kernel command line")]
    Repeated(&'static str),
    #[error("vmfarm.channel={0:?}: expected vport:NAME or vsock:PORT")]
    BadChannel(String),
    #[error("vmfarm.key: {0}")]
    BadKey(String),
    #[error("vmfarm.hostname={0:?}: expected 1-63 characters of [a-zA-Z0-9-]")]
    BadHostname(String),
    #[error("vmfarm.time={0:?}: expected unix seconds")]
    BadTime(String),
    #[error("vmfarm.user={0:?}: expected [a-z_][a-z0-9_-]{{0,31}}")]
    BadUser(String),
}

const CHANNEL: &str = "vmfarm.channel";
const KEY: &str = "vmfarm.key";
const HOSTNAME: &str = "vmfarm.hostname";
const TIME: &str = "vmfarm.time";
const USER: &str = "vmfarm.user";

impl BootConfig {
    /// Parses the text of /proc/cmdline; words that are not `vmfarm.*` are the kernel's.
    pub fn parse(cmdline: &str) -> Result<Self, CmdlineError> {
        let mut found: [Option<&str>; 5] = [None; 5];
        let names = [CHANNEL, KEY, HOSTNAME, TIME, USER];
        for word in cmdline.split_ascii_whitespace() {
            let Some((name, value)) = word.split_once('=') else {
                continue;
            };
            if let Some(i) = names.iter().position(|n| *n == name)
                && found[i].replace(value).is_some()
            {
                return Err(CmdlineError::Repeated(names[i]));
            }
        }
        let [channel, key, hostname, time, user] = found;
        Ok(BootConfig {
            channel: parse_channel(channel.ok_or(CmdlineError::Missing(CHANNEL))?)?,
            key: parse_key(key.ok_or(CmdlineError::Missing(KEY))?)?,
            hostname: hostname.map(parse_hostname).transpose()?,
            time: time.map(parse_time).transpose()?,
            user: parse_user(user.unwrap_or("build"))?,
        })
    }
}

fn parse_channel(value: &str) -> Result<Channel, CmdlineError> {
    let bad = || CmdlineError::BadChannel(value.to_owned());
    match value.split_once(':') {
        Some(("vport", name)) if !name.is_empty() && !name.contains('/') && name.is_ascii() => {
            Ok(Channel::Vport(name.to_owned()))
        }
        Some(("vsock", port)) => port.parse().map(Channel::Vsock).map_err(|_| bad()),
        _ => Err(bad()),
    }
}

fn parse_key(value: &str) -> Result<PublicKey, CmdlineError> {
    let blob = STANDARD
        .decode(value)
        .map_err(|e| CmdlineError::BadKey(format!("not base64: {e}")))?;
    let key = PublicKey::from_bytes(&blob)
        .map_err(|e| CmdlineError::BadKey(format!("not an SSH public key blob: {e}")))?;
    if key.algorithm() != russh::keys::Algorithm::Ed25519 {
        return Err(CmdlineError::BadKey(format!(
            "{} keys are not accepted, only ssh-ed25519",
            key.algorithm()
        )));
    }
    Ok(key)
}

fn parse_hostname(value: &str) -> Result<String, CmdlineError> {
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

fn parse_time(value: &str) -> Result<i64, CmdlineError> {
    value
        .parse::<i64>()
        .ok()
        .filter(|t| *t >= 0)
        .ok_or_else(|| CmdlineError::BadTime(value.to_owned()))
}

fn parse_user(value: &str) -> Result<String, CmdlineError> {
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

#[cfg(test)]
pub(crate) mod test_keys {
    use russh::keys::PrivateKey;
    use russh::keys::ssh_key::private::Ed25519Keypair;

    /// A fixed ed25519 key for tests.
    pub fn key(seed: u8) -> PrivateKey {
        PrivateKey::from(Ed25519Keypair::from_seed(&[seed; 32]))
    }

    /// The base64 wire blob of `key(seed)`'s public half, as the worker puts it on the command line.
    pub fn blob(seed: u8) -> String {
        use base64::Engine as _;
        let bytes = key(seed).public_key().to_bytes().expect("encode");
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::test_keys::{blob, key};
    use super::*;

    fn line(extra: &str) -> String {
        format!(
            "console=ttyS0 reboot=k panic=-1 vmfarm.channel=vport:org.vmfarm.ssh vmfarm.key={} {extra}",
            blob(1)
        )
    }

    #[test]
    fn test_parses_the_full_contract() {
        let c = BootConfig::parse(&line(
            "vmfarm.hostname=job-42 vmfarm.time=1795000000 vmfarm.user=build quiet",
        ))
        .unwrap();
        assert_eq!(c.channel, Channel::Vport("org.vmfarm.ssh".into()));
        assert_eq!(c.key.key_data(), key(1).public_key().key_data());
        assert_eq!(c.hostname.as_deref(), Some("job-42"));
        assert_eq!(c.time, Some(1_795_000_000));
        assert_eq!(c.user, "build");
    }

    #[test]
    fn test_vsock_channel_and_defaults() {
        let c =
            BootConfig::parse(&format!("vmfarm.channel=vsock:22 vmfarm.key={}", blob(2))).unwrap();
        assert_eq!(c.channel, Channel::Vsock(22));
        assert_eq!(c.hostname, None);
        assert_eq!(c.time, None);
        assert_eq!(c.user, "build");
    }

    #[test]
    fn test_refuses_missing_words() {
        assert_eq!(
            BootConfig::parse("console=ttyS0").unwrap_err(),
            CmdlineError::Missing(CHANNEL)
        );
        assert_eq!(
            BootConfig::parse("vmfarm.channel=vsock:22").unwrap_err(),
            CmdlineError::Missing(KEY)
        );
    }

    #[test]
    fn test_refuses_repeated_words() {
        assert_eq!(
            BootConfig::parse(&line("vmfarm.channel=vsock:22")).unwrap_err(),
            CmdlineError::Repeated(CHANNEL)
        );
    }

    #[test]
    fn test_refuses_bad_channels() {
        for bad in [
            "vport:",
            "vport:a/b",
            "vsock:x",
            "vsock:",
            "tcp:22",
            "vport",
        ] {
            let text = format!("vmfarm.channel={bad} vmfarm.key={}", blob(1));
            assert_eq!(
                BootConfig::parse(&text).unwrap_err(),
                CmdlineError::BadChannel(bad.into()),
                "{bad}"
            );
        }
    }

    #[test]
    fn test_refuses_bad_keys() {
        for bad in ["!!!", "AAAA", ""] {
            let text = format!("vmfarm.channel=vsock:22 vmfarm.key={bad}");
            assert!(
                matches!(BootConfig::parse(&text), Err(CmdlineError::BadKey(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn test_refuses_bad_hostname_time_and_user() {
        type Case = (&'static str, fn(String) -> CmdlineError, &'static str);
        let cases: [Case; 6] = [
            ("vmfarm.hostname", CmdlineError::BadHostname, "a_b"),
            ("vmfarm.hostname", CmdlineError::BadHostname, "-x"),
            ("vmfarm.time", CmdlineError::BadTime, "-5"),
            ("vmfarm.time", CmdlineError::BadTime, "soon"),
            ("vmfarm.user", CmdlineError::BadUser, "root"),
            ("vmfarm.user", CmdlineError::BadUser, "Build"),
        ];
        for (name, err, value) in cases {
            assert_eq!(
                BootConfig::parse(&line(&format!("{name}={value}"))).unwrap_err(),
                err(value.into()),
                "{name}={value}"
            );
        }
    }
}
