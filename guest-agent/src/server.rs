//! The SSH server: it waits on the host channel named on the kernel command line for the job's
//! identity (CONTRACTS.md), takes it on (host name, clock, random pool), makes its host key,
//! then accepts one client key (the job's) for sessions over the same channel.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use russh::keys::ssh_key::private::Ed25519Keypair;
use russh::keys::{HashAlg, PrivateKey, PublicKey};
use russh::server::{Auth, ChannelOpenHandle, Msg, PublicKeyOffer, Session, VerifiedPublicKey};
use russh::{Channel, ChannelId, MethodKind, MethodSet};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite};
use vmfarm_proto::guest::{Identity, ReadyLine, WAITING_LINE};

use crate::channel::{self, Vport, VsockListener};
use crate::cmdline::{BootConfig, ChannelKind, JobIdentity};
use crate::forward::Forwards;
use crate::{session, sys, user};

pub async fn serve(config: BootConfig) -> Result<()> {
    match config.channel {
        ChannelKind::Vport(name) => {
            let path = channel::find_vport(&name, Duration::from_secs(20))?;
            let port = Vport::open(&path).with_context(|| format!("opening {}", path.display()))?;
            println!("{WAITING_LINE}");
            let mut first = port.next_session().await.context("waiting for the host")?;
            let (ssh, policy) = take_on(receive_identity(&mut first).await?, config.user)?;
            // The worker hangs up once it saw the ready line; no SSH session may start on its
            // connection before (its server banner would go nowhere). The end is the hang-up,
            // or the next client's banner (see `Vport`).
            let mut rest = [0u8; 256];
            while matches!(first.read(&mut rest).await, Ok(n) if n > 0) {}
            drop(first);
            loop {
                let stream = port.next_session().await.context("waiting for the host")?;
                run_session(ssh.clone(), stream, policy.clone()).await;
            }
        }
        ChannelKind::Vsock(port) => {
            let listener = VsockListener::bind(port)
                .with_context(|| format!("listening on vsock port {port}"))?;
            let accept = async || {
                listener
                    .accept()
                    .await
                    .context("accepting a vsock connection")
            };
            println!("{WAITING_LINE}");
            let identity = receive_identity(&mut accept().await?).await?;
            let (ssh, policy) = take_on(identity, config.user)?;
            loop {
                tokio::spawn(run_session(ssh.clone(), accept().await?, policy.clone()));
            }
        }
    }
}

/// Reads the identity line, the first thing the worker sends on the channel's first connection
/// (at most [`Identity::MAX_LINE`] bytes). A server that restarts waits for it again, in vain:
/// the worker pinned the host key of the first, and the job fails at its next step.
async fn receive_identity<S: AsyncRead + Unpin>(stream: &mut S) -> Result<JobIdentity> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.last() != Some(&b'\n') {
        if line.len() >= Identity::MAX_LINE {
            bail!(
                "the job's identity line is longer than {} bytes",
                Identity::MAX_LINE
            );
        }
        if stream
            .read(&mut byte)
            .await
            .context("reading the job's identity")?
            == 0
        {
            bail!("the host closed the channel before it sent the job's identity");
        }
        line.push(byte[0]);
    }
    let text = std::str::from_utf8(&line).context("the job's identity is not UTF-8")?;
    Ok(JobIdentity::parse(text)?)
}

/// Takes the job's identity on (host name, clock, the host's entropy, which reseeds the
/// kernel's generator, the job's cache disks), then makes the host key from the reseeded
/// generator and announces it.
fn take_on(
    identity: JobIdentity,
    user: String,
) -> Result<(Arc<russh::server::Config>, Arc<Policy>)> {
    sys::sethostname(&identity.hostname).context("setting the hostname")?;
    user::name_host(&identity.hostname).context("naming the host in /etc/hosts")?;
    sys::set_clock(identity.time).context("setting the clock")?;
    sys::reseed_random(&identity.seed).context("reseeding the random pool")?;
    crate::caches::mount_all(&identity.caches).context("mounting the job's caches")?;
    let host_key = generate_host_key().context("generating the host key")?;
    let fingerprint = host_key.public_key().fingerprint(HashAlg::Sha256);
    let ssh = Arc::new(russh::server::Config {
        keys: vec![host_key],
        methods: MethodSet::from(&[MethodKind::PublicKey][..]),
        auth_rejection_time: Duration::from_millis(50),
        auth_rejection_time_initial: Some(Duration::ZERO),
        inactivity_timeout: None,
        nodelay: true,
        ..Default::default()
    });
    let policy = Arc::new(Policy {
        key: identity.key,
        user,
    });
    announce(&fingerprint);
    Ok((ssh, policy))
}

/// The ready line on the console (CONTRACTS.md): the worker pins this fingerprint.
fn announce(fingerprint: &impl std::fmt::Display) {
    let ready = ReadyLine {
        fingerprint: fingerprint.to_string(),
    };
    println!("{ready}");
}

async fn run_session<S>(ssh: Arc<russh::server::Config>, stream: S, policy: Arc<Policy>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let handler = Agent {
        policy,
        forwards: Forwards::default(),
    };
    match russh::server::run_stream(ssh, stream, handler).await {
        Ok(running) => {
            if let Err(e) = running.await {
                eprintln!("vmfarm-agent: ssh session ended: {e}");
            }
        }
        Err(e) => eprintln!("vmfarm-agent: ssh session failed to start: {e}"),
    }
}

/// An ed25519 host key from the kernel's random pool (fed by virtio-rng).
fn generate_host_key() -> std::io::Result<PrivateKey> {
    let mut seed = [0u8; 32];
    sys::getrandom(&mut seed)?;
    Ok(PrivateKey::from(Ed25519Keypair::from_seed(&seed)))
}

/// Who may log in: the job's key, as the build user, nothing else.
pub struct Policy {
    pub key: PublicKey,
    pub user: String,
}

impl Policy {
    pub fn admits(&self, user: &str, key: &PublicKey) -> bool {
        user == self.user && key.key_data() == self.key.key_data()
    }
}

struct Agent {
    policy: Arc<Policy>,
    forwards: Forwards,
}

impl russh::server::Handler for Agent {
    type Error = russh::Error;

    async fn auth_publickey_offered(
        &mut self,
        user: &str,
        offer: PublicKeyOffer<'_>,
    ) -> Result<Auth, Self::Error> {
        Ok(if self.policy.admits(user, offer.public_key) {
            Auth::Accept
        } else {
            Auth::reject()
        })
    }

    async fn auth_publickey(
        &mut self,
        user: &str,
        key: VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        Ok(if self.policy.admits(user, key.public_key) {
            Auth::Accept
        } else {
            Auth::reject()
        })
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        reply.accept().await;
        tokio::spawn(session::run(channel, self.policy.user.clone()));
        Ok(())
    }

    async fn pty_request(
        &mut self,
        channel: ChannelId,
        _term: &str,
        _cols: u32,
        _rows: u32,
        _pix_width: u32,
        _pix_height: u32,
        _modes: &[(russh::Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)
    }

    async fn env_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        _value: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if session::valid_env_name(name) {
            session.channel_success(channel)
        } else {
            session.channel_failure(channel)
        }
    }

    async fn shell_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        _data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)
    }

    async fn tcpip_forward(
        &mut self,
        address: &str,
        port: &mut u32,
        session: &mut Session,
    ) -> Result<bool, Self::Error> {
        match self.forwards.listen(address, *port, session.handle()).await {
            Some(bound) => {
                *port = u32::from(bound);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    async fn cancel_tcpip_forward(
        &mut self,
        _address: &str,
        port: u32,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        Ok(self.forwards.cancel(port))
    }

    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if name == "sftp" {
            session.channel_success(channel)
        } else {
            session.channel_failure(channel)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cmdline::test_keys::key;

    #[test]
    fn test_policy_admits_only_the_job_key_as_the_build_user() {
        let policy = Policy {
            key: key(1).public_key().clone(),
            user: "build".into(),
        };
        assert!(policy.admits("build", key(1).public_key()));
        assert!(!policy.admits("build", key(2).public_key()), "another key");
        assert!(!policy.admits("root", key(1).public_key()), "another user");
    }

    #[test]
    fn test_host_keys_differ_per_boot() {
        let a = generate_host_key().unwrap();
        let b = generate_host_key().unwrap();
        assert_ne!(a.public_key().key_data(), b.public_key().key_data());
        assert!(
            a.public_key()
                .fingerprint(HashAlg::Sha256)
                .to_string()
                .starts_with("SHA256:")
        );
    }
}
