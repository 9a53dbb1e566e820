//! Waiting for the agent's readiness line on the guest console:
//! `vmfarm-agent ready SHA256:<base64>` (CONTRACTS.md; its form is [`ReadyLine`]).

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt as _};
use vmfarm_proto::guest::{ReadyLine, ReadyLineError};

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
}

/// Reads the console until the ready line, handing every byte read to `sink` (the console log),
/// and returns the fingerprint. Bytes after the ready line that were already read went to `sink`
/// too, so the caller can keep reading the console where this left off.
pub async fn wait_ready<R: AsyncRead + Unpin>(
    console: &mut R,
    sink: &mut (dyn FnMut(&[u8]) + Send),
    timeout: Duration,
) -> Result<HostFingerprint, ReadyError> {
    tokio::time::timeout(timeout, scan(console, sink))
        .await
        .map_err(|_| ReadyError::Timeout(timeout))?
}

async fn scan<R: AsyncRead + Unpin>(
    console: &mut R,
    sink: &mut (dyn FnMut(&[u8]) + Send),
) -> Result<HostFingerprint, ReadyError> {
    let mut line = Vec::new();
    let mut buf = vec![0u8; 8192];
    loop {
        let n = console.read(&mut buf).await.map_err(ReadyError::Read)?;
        if n == 0 {
            return Err(ReadyError::Closed);
        }
        sink(&buf[..n]);
        let mut found = None;
        for &b in &buf[..n] {
            if b == b'\n' {
                if found.is_none() {
                    found = ready_line(&line).transpose();
                }
                line.clear();
            } else if line.len() < 4096 {
                line.push(b);
            }
        }
        if let Some(result) = found {
            return result;
        }
    }
}

/// `Some(fingerprint)` when `line` is the ready line.
fn ready_line(line: &[u8]) -> Result<Option<HostFingerprint>, ReadyError> {
    let found = ReadyLine::find(&String::from_utf8_lossy(line))?;
    Ok(found.map(|ready| HostFingerprint(ready.fingerprint)))
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
        )
        .await
        .unwrap();
        assert_eq!(fp, HostFingerprint("SHA256:abc+/9".into()));
        assert_eq!(logged, text);
    }

    #[tokio::test]
    async fn test_wait_ready_reports_a_guest_that_ends_or_lies() {
        let mut ended: &[u8] = b"Kernel panic\n";
        let err = wait_ready(&mut ended, &mut |_: &[u8]| {}, Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(matches!(err, ReadyError::Closed));
        let mut bad: &[u8] = b"vmfarm-agent ready MD5:xx\n";
        let err = wait_ready(&mut bad, &mut |_: &[u8]| {}, Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(matches!(err, ReadyError::BadLine(_)));
    }

    #[tokio::test]
    async fn test_wait_ready_times_out() {
        let (mut quiet, _keep) = tokio::io::duplex(64);
        let err = wait_ready(&mut quiet, &mut |_: &[u8]| {}, Duration::from_millis(50))
            .await
            .unwrap_err();
        assert!(matches!(err, ReadyError::Timeout(_)));
    }
}
