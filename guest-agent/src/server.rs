//! The SSH server: one host key made at boot, one accepted client key (the job's), sessions
//! over the host channel named on the kernel command line.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use russh::keys::ssh_key::private::Ed25519Keypair;
use russh::keys::{HashAlg, PrivateKey, PublicKey};
use russh::server::{Auth, ChannelOpenHandle, Msg, PublicKeyOffer, Session, VerifiedPublicKey};
use russh::{Channel, ChannelId, MethodKind, MethodSet};
use tokio::io::{AsyncRead, AsyncWrite};
use vmfarm_proto::guest::ReadyLine;

use crate::channel::{self, Vport, VsockListener};
use crate::cmdline::{BootConfig, ChannelKind};
use crate::forward::Forwards;
use crate::{session, sys};

pub async fn serve(config: BootConfig) -> Result<()> {
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
        key: config.key,
        user: config.user,
    });
    match config.channel {
        ChannelKind::Vport(name) => {
            let path = channel::find_vport(&name, Duration::from_secs(20))?;
            let port = Vport::open(&path).with_context(|| format!("opening {}", path.display()))?;
            announce(&fingerprint);
            loop {
                let stream = port.next_session().await.context("waiting for the host")?;
                run_session(ssh.clone(), stream, policy.clone()).await;
            }
        }
        ChannelKind::Vsock(port) => {
            let listener = VsockListener::bind(port)
                .with_context(|| format!("listening on vsock port {port}"))?;
            announce(&fingerprint);
            loop {
                let stream = listener
                    .accept()
                    .await
                    .context("accepting a vsock connection")?;
                tokio::spawn(run_session(ssh.clone(), stream, policy.clone()));
            }
        }
    }
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
