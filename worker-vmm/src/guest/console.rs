//! Waiting on the guest console for the guest to say it is ready and which host key it has:
//! the agent's line `vmfarm-agent ready SHA256:<base64>` (CONTRACTS.md; its form is
//! [`ReadyLine`]), or the host keys' fingerprints that cloud-init prints at the end of its
//! first boot (`-----BEGIN SSH HOST KEY FINGERPRINTS-----` ... `256 SHA256:<base64> root@host
//! (ED25519)` ... `-----END SSH HOST KEY FINGERPRINTS-----`), of which the ED25519 key is the
//! one pinned (the one the worker's SSH client asks for first).

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt as _};
use vmfarm_proto::guest::{ReadyLine, ReadyLineError, WAITING_LINE};

/// The host key fingerprint the agent announced, as OpenSSH prints it (`SHA256:...`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostFingerprint(pub String);

impl std::fmt::Display for HostFingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReadyError {
    #[error("the guest did not announce readiness within {0:?}")]
    Timeout(Duration),
    #[error("the guest's console closed before it announced readiness (the guest ended)")]
    Closed,
    #[error("reading the guest's console")]
    Read(#[source] std::io::Error),
    #[error(transparent)]
    BadLine(#[from] ReadyLineError),
    #[error(
        "cloud-init printed the guest's SSH host key fingerprints without an ED25519 key: the \
         worker pins the guest's ED25519 key (the image's OpenSSH must have one)"
    )]
    NoEd25519,
}

/// Who says on the console that the guest is ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Announcer {
    /// vmfarm's agent, with its ready line.
    Agent,
    /// cloud-init, with the host keys' fingerprints; `within` while inside that block, with the
    /// ED25519 fingerprint once seen.
    CloudInit {
        within: bool,
        ed25519: Option<String>,
    },
}

impl Announcer {
    /// cloud-init, before its block.
    pub fn cloud_init() -> Announcer {
        Announcer::CloudInit {
            within: false,
            ed25519: None,
        }
    }

    /// `Some(fingerprint)` when `line` ends the announcement.
    fn line(&mut self, line: &str) -> Result<Option<HostFingerprint>, ReadyError> {
        match self {
            Announcer::Agent => {
                let found = ReadyLine::find(line)?;
                Ok(found.map(|ready| HostFingerprint(ready.fingerprint)))
            }
            Announcer::CloudInit { within, ed25519 } => {
                if line.contains("-----BEGIN SSH HOST KEY FINGERPRINTS-----") {
                    *within = true;
                    *ed25519 = None;
                } else if *within && line.contains("-----END SSH HOST KEY FINGERPRINTS-----") {
                    return match ed25519.take() {
                        Some(fingerprint) => Ok(Some(HostFingerprint(fingerprint))),
                        None => Err(ReadyError::NoEd25519),
                    };
                } else if *within && line.trim_end().ends_with("(ED25519)") {
                    *ed25519 = line
                        .split_whitespace()
                        .find(|word| word.starts_with("SHA256:") && word.len() > 7)
                        .map(str::to_owned);
                }
                Ok(None)
            }
        }
    }
}

/// Reads the console until `announcer` has said the guest is ready, handing every byte read to
/// `sink` (the console log), and returns the fingerprint. Bytes after the ready line that were
/// already read went to `sink` too, so the caller can keep reading the console where this left
/// off.
pub async fn wait_ready<R: AsyncRead + Unpin>(
    console: &mut R,
    sink: &mut (dyn FnMut(&[u8]) + Send),
    timeout: Duration,
    mut announcer: Announcer,
) -> Result<HostFingerprint, ReadyError> {
    tokio::time::timeout(timeout, scan(console, sink, &mut |l| announcer.line(l)))
        .await
        .map_err(|_| ReadyError::Timeout(timeout))?
}

/// Reads the console as [`wait_ready`] does until the agent says it waits for the job's
/// identity ([`WAITING_LINE`]).
pub async fn wait_waiting<R: AsyncRead + Unpin>(
    console: &mut R,
    sink: &mut (dyn FnMut(&[u8]) + Send),
    timeout: Duration,
) -> Result<(), ReadyError> {
    let mut waiting = |line: &str| Ok(line.contains(WAITING_LINE).then_some(()));
    tokio::time::timeout(timeout, scan(console, sink, &mut waiting))
        .await
        .map_err(|_| ReadyError::Timeout(timeout))?
}

/// Reads lines until `found` returns something for one.
async fn scan<R: AsyncRead + Unpin, T>(
    console: &mut R,
    sink: &mut (dyn FnMut(&[u8]) + Send),
    found: &mut (dyn FnMut(&str) -> Result<Option<T>, ReadyError> + Send),
) -> Result<T, ReadyError> {
    let mut line = Vec::new();
    let mut buf = vec![0u8; 8192];
    loop {
        let n = console.read(&mut buf).await.map_err(ReadyError::Read)?;
        if n == 0 {
            return Err(ReadyError::Closed);
        }
        sink(&buf[..n]);
        let mut result = None;
        for &b in &buf[..n] {
            if b == b'\n' {
                if result.is_none() {
                    result = found(&String::from_utf8_lossy(&line)).transpose();
                }
                line.clear();
            } else if line.len() < 4096 {
                line.push(b);
            }
        }
        if let Some(result) = result {
            return result;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn test_wait_ready_finds_the_line_and_logs_everything() {
        let text = b"[    1.0] booting\r\nvmfarm-agent ready SHA256:abc+/9\r\nafter\n".to_vec();
        let mut logged = Vec::new();
        let fp = wait_ready(
            &mut text.as_slice(),
            &mut |b: &[u8]| logged.extend_from_slice(b),
            Duration::from_secs(1),
            Announcer::Agent,
        )
        .await
        .unwrap();
        assert_eq!(fp, HostFingerprint("SHA256:abc+/9".into()));
        assert_eq!(logged, text);
    }

    #[tokio::test]
    async fn test_wait_ready_reports_a_guest_that_ends_or_lies() {
        let mut ended: &[u8] = b"Kernel panic\n";
        let second = Duration::from_secs(1);
        let err = wait_ready(&mut ended, &mut |_: &[u8]| {}, second, Announcer::Agent)
            .await
            .unwrap_err();
        assert!(matches!(err, ReadyError::Closed));
        let mut bad: &[u8] = b"vmfarm-agent ready MD5:xx\n";
        let err = wait_ready(&mut bad, &mut |_: &[u8]| {}, second, Announcer::Agent)
            .await
            .unwrap_err();
        assert!(matches!(err, ReadyError::BadLine(_)));
    }

    #[tokio::test]
    async fn test_wait_waiting_finds_the_agents_line() {
        let text = b"[    1.0] booting\r\nvmfarm-agent waiting for the job's identity\r\n".to_vec();
        let second = Duration::from_secs(1);
        wait_waiting(&mut text.as_slice(), &mut |_: &[u8]| {}, second)
            .await
            .unwrap();
        let mut ready_only: &[u8] = b"vmfarm-agent ready SHA256:abc\n";
        let err = wait_waiting(&mut ready_only, &mut |_: &[u8]| {}, second)
            .await
            .unwrap_err();
        assert!(matches!(err, ReadyError::Closed), "{err}");
    }

    #[tokio::test]
    async fn test_wait_ready_times_out() {
        let (mut quiet, _keep) = tokio::io::duplex(64);
        let err = wait_ready(
            &mut quiet,
            &mut |_: &[u8]| {},
            Duration::from_millis(50),
            Announcer::cloud_init(),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, ReadyError::Timeout(_)));
    }

    /// cloud-init's block as a Debian guest prints it on its serial console.
    const CLOUD_INIT: &str = "[   51.3] cloud-init[418]: Cloud-init v. 22.4.2 running 'modules:final'\r\n\
        <14>Dec  6 08:19:53 cloud-init: #######################\r\n\
        <14>Dec  6 08:19:53 cloud-init: -----BEGIN SSH HOST KEY FINGERPRINTS-----\r\n\
        <14>Dec  6 08:19:53 cloud-init: 256 SHA256:AbCd+ecdsa root@job-1 (ECDSA)\r\n\
        <14>Dec  6 08:19:54 cloud-init: 256 SHA256:7DnBn+bUg99VLrSVMt9UDr1CG0bsEJfkVooSrQbNCUQ root@job-1 (ED25519)\r\n\
        <14>Dec  6 08:19:54 cloud-init: 3072 SHA256:Rsa/key root@job-1 (RSA)\r\n\
        <14>Dec  6 08:19:54 cloud-init: -----END SSH HOST KEY FINGERPRINTS-----\r\n\
        after\n";

    #[tokio::test]
    async fn test_cloud_init_announces_its_ed25519_key() {
        let mut logged = Vec::new();
        let fp = wait_ready(
            &mut CLOUD_INIT.as_bytes(),
            &mut |b: &[u8]| logged.extend_from_slice(b),
            Duration::from_secs(1),
            Announcer::cloud_init(),
        )
        .await
        .unwrap();
        assert_eq!(
            fp,
            HostFingerprint("SHA256:7DnBn+bUg99VLrSVMt9UDr1CG0bsEJfkVooSrQbNCUQ".into())
        );
        assert_eq!(logged, CLOUD_INIT.as_bytes());
        // An agent's line in a cloud image's console is not what pins it, nor the other way.
        let agent_line = b"vmfarm-agent ready SHA256:abc\n".to_vec();
        let err = wait_ready(
            &mut agent_line.as_slice(),
            &mut |_: &[u8]| {},
            Duration::from_secs(1),
            Announcer::cloud_init(),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, ReadyError::Closed), "{err}");
        let without = CLOUD_INIT.replace("(ED25519)", "(DSA)");
        let err = wait_ready(
            &mut without.as_bytes(),
            &mut |_: &[u8]| {},
            Duration::from_secs(1),
            Announcer::cloud_init(),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, ReadyError::NoEd25519), "{err}");
    }
}
