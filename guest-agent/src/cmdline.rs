//! The guest's side of the boot contract: the `vmfarm.*` words of the kernel command line and
//! the job's identity line from the channel, both parsed by `vmfarm_proto::guest` (the worker
//! composes them with the same types); the job's key is decoded and checked here, where russh is.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use russh::keys::{Algorithm, PublicKey};
use vmfarm_proto::cache::CacheMount;
pub use vmfarm_proto::guest::ChannelKind;
use vmfarm_proto::guest::{CmdlineError, GuestCmdline, Identity};

/// What the worker told the guest on the kernel command line.
#[derive(Debug, Clone)]
pub struct BootConfig {
    pub channel: ChannelKind,
    /// The build user's name.
    pub user: String,
}

/// What the worker told the guest over the channel, for its job.
#[derive(Debug, Clone)]
pub struct JobIdentity {
    /// The only public key the SSH server accepts.
    pub key: PublicKey,
    pub hostname: String,
    /// Unix seconds to set the clock to.
    pub time: i64,
    /// Fresh entropy from the host, for the kernel's random pool.
    pub seed: [u8; 32],
    /// The job's cache disks and where each is mounted.
    pub caches: Vec<CacheMount>,
}

/// Why the command line or the identity line gives the agent nothing to serve.
#[derive(Debug, thiserror::Error)]
pub enum BootConfigError {
    #[error(transparent)]
    Cmdline(#[from] CmdlineError),
    #[error("identity key: not base64")]
    KeyNotBase64(#[source] base64::DecodeError),
    #[error("identity key: not an SSH public key blob")]
    KeyNotSsh(#[source] russh::keys::ssh_key::Error),
    #[error("identity key: {0} keys are not accepted, only ssh-ed25519")]
    KeyNotEd25519(Algorithm),
}

impl BootConfig {
    /// Parses the text of /proc/cmdline; words that are not `vmfarm.*` are the kernel's.
    pub fn parse(cmdline: &str) -> Result<Self, BootConfigError> {
        let c = GuestCmdline::parse(cmdline)?;
        Ok(BootConfig {
            channel: c.channel,
            user: c.user,
        })
    }
}

impl JobIdentity {
    /// Parses the identity line the worker sent.
    pub fn parse(line: &str) -> Result<Self, BootConfigError> {
        let id = Identity::parse(line)?;
        Ok(JobIdentity {
            key: parse_key(&id.key_blob)?,
            hostname: id.hostname,
            // `Identity::parse` takes only times that fit a time_t.
            time: i64::try_from(id.time).map_err(|_| CmdlineError::BadTime(id.time.to_string()))?,
            seed: id.seed,
            caches: id.caches,
        })
    }
}

fn parse_key(blob: &str) -> Result<PublicKey, BootConfigError> {
    let bytes = STANDARD
        .decode(blob)
        .map_err(BootConfigError::KeyNotBase64)?;
    let key = PublicKey::from_bytes(&bytes).map_err(BootConfigError::KeyNotSsh)?;
    if key.algorithm() != Algorithm::Ed25519 {
        return Err(BootConfigError::KeyNotEd25519(key.algorithm()));
    }
    Ok(key)
}

#[cfg(test)]
pub(crate) mod test_keys {
    use russh::keys::PrivateKey;
    use russh::keys::ssh_key::private::Ed25519Keypair;

    /// A fixed ed25519 key for tests.
    pub fn key(seed: u8) -> PrivateKey {
        PrivateKey::from(Ed25519Keypair::from_seed(&[seed; 32]))
    }

    /// The base64 wire blob of `key(seed)`'s public half, as the worker sends it in the identity.
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

    fn identity(key_blob: &str) -> String {
        Identity {
            key_blob: key_blob.into(),
            hostname: "job-42".into(),
            time: 1_795_000_000,
            seed: [9; 32],
            caches: Vec::new(),
        }
        .line()
    }

    #[test]
    fn test_parses_the_command_line() {
        let c = BootConfig::parse(
            "console=ttyS0 reboot=k panic=-1 vmfarm.channel=vport:org.vmfarm.ssh \
             vmfarm.user=build quiet",
        )
        .unwrap();
        assert_eq!(c.channel, ChannelKind::Vport("org.vmfarm.ssh".into()));
        assert_eq!(c.user, "build");
    }

    #[test]
    fn test_reads_what_the_worker_composes() {
        let composed = GuestCmdline {
            channel: ChannelKind::Vsock(22),
            user: "build".into(),
            emulated: true,
        }
        .compose();
        let c = BootConfig::parse(&composed).unwrap();
        assert_eq!(c.channel, ChannelKind::Vsock(22));
        let id = JobIdentity::parse(&identity(&blob(2))).unwrap();
        assert_eq!(id.key.key_data(), key(2).public_key().key_data());
        assert_eq!((id.hostname.as_str(), id.time), ("job-42", 1_795_000_000));
        assert_eq!(id.seed, [9; 32]);
    }

    #[test]
    fn test_refuses_what_the_contract_refuses() {
        let err = BootConfig::parse("console=ttyS0").unwrap_err();
        assert!(
            matches!(err, BootConfigError::Cmdline(CmdlineError::Missing(_))),
            "{err}"
        );
    }

    #[test]
    fn test_refuses_bad_keys() {
        for (bad, want) in [
            ("AAA", "not base64"),
            ("AAAA", "not an SSH public key blob"),
            (ECDSA_BLOB, "only ssh-ed25519"),
        ] {
            let err = JobIdentity::parse(&identity(bad)).unwrap_err();
            assert!(err.to_string().contains(want), "{bad}: {err}");
        }
    }

    /// An ecdsa-sha2-nistp256 public key (ssh-keygen -t ecdsa).
    const ECDSA_BLOB: &str = "AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBID4KGHapE2klIk+zWl0HWBV5rVBjngtj/smRkwFVab+CWLOgXkehCESiZZlBcQ35/E0U4eixNIr0l2ugVn/3T4=";
}
