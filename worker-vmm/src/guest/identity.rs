//! Introducing an agent guest to its job (CONTRACTS.md, "Worker <-> guest"): once the agent
//! says on the console that it waits (a cold boot; a guest restored from a template snapshot
//! said it before the snapshot), the worker sends the job's [`Identity`] as the first line of a
//! connection on the agent's channel, and holds that connection until the agent announces the
//! host key it made after taking the identity on.

use std::io::Read as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::io::AsyncWriteExt as _;
use vmfarm_proto::cache::CacheMount;
use vmfarm_proto::guest::Identity;

use super::console::{Announcer, HostFingerprint, ReadyError, wait_ready, wait_waiting};
use super::key::JobKey;
use crate::backend::{BackendError, Console, Vm};

/// How the guest came to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// Booted now: its agent has yet to say that it waits.
    Cold,
    /// Restored from a snapshot taken while its agent waited.
    Restored,
}

#[derive(Debug, thiserror::Error)]
pub enum IntroduceError {
    #[error(transparent)]
    Console(#[from] ReadyError),
    #[error("opening the agent's channel to send the job's identity")]
    Connect(#[source] BackendError),
    #[error("sending the job's identity to the agent")]
    Send(#[source] std::io::Error),
    #[error("the guest took longer than {timeout:?} {waiting}")]
    Timeout {
        timeout: Duration,
        waiting: &'static str,
    },
}

/// The identity of the job whose key is `key`, in a guest named `hostname` with the cache disks
/// `caches`: the host's clock and 32 fresh bytes of its random source.
pub fn identity(
    key: &JobKey,
    hostname: &str,
    caches: Vec<CacheMount>,
) -> std::io::Result<Identity> {
    let mut seed = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut seed)?;
    Ok(Identity {
        key_blob: key.public_blob_base64(),
        hostname: hostname.to_owned(),
        time: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        seed,
        caches,
    })
}

/// Waits for the agent (after a cold boot), sends it `identity`, and returns the host key it
/// then announced; every console byte read meanwhile goes to `sink`. All of it within
/// `timeout`.
pub async fn introduce(
    vm: &mut dyn Vm,
    console: &mut Console,
    sink: &mut (dyn FnMut(&[u8]) + Send),
    timeout: Duration,
    identity: &Identity,
    start: Start,
) -> Result<HostFingerprint, IntroduceError> {
    let waited = AtomicBool::new(false);
    let steps = async {
        if start == Start::Cold {
            wait_waiting(console, sink, timeout).await?;
        }
        waited.store(true, Ordering::Relaxed);
        let mut channel = vm.connect().await.map_err(IntroduceError::Connect)?;
        channel
            .write_all(identity.line().as_bytes())
            .await
            .map_err(IntroduceError::Send)?;
        channel.flush().await.map_err(IntroduceError::Send)?;
        // The channel stays open until the agent has read the line (it announces after).
        let fingerprint = wait_ready(console, sink, timeout, Announcer::Agent).await?;
        drop(channel);
        Ok(fingerprint)
    };
    match tokio::time::timeout(timeout, steps).await {
        Ok(done) => done,
        Err(_) => Err(IntroduceError::Timeout {
            timeout,
            waiting: if waited.load(Ordering::Relaxed) {
                "to take the job's identity and announce its host key"
            } else {
                "to say that its agent waits for the job's identity"
            },
        }),
    }
}
