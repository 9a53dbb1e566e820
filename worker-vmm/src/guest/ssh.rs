//! [`Guest`]: the worker's SSH session with the guest agent, over the backend's byte stream,
//! authenticated with the job's key, the agent's host key pinned to the fingerprint from its
//! ready line. Exec with streamed output and exit status, SFTP, timeouts.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use russh::client::ChannelOpenHandle;
use russh::client::{self, Handle, Msg};
use russh::keys::{HashAlg, PrivateKeyWithHashAlg, PublicKeyOrCertificate};
use russh::{Channel, ChannelMsg, ChannelOpenFailure, ChannelStream, Disconnect, Sig};
use russh_sftp::client::SftpSession;
use russh_sftp::protocol::FileType;
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::mpsc;
use vmfarm_proto::units::ByteSize;

use super::{HostFingerprint, JobKey};
use crate::backend::GuestIo;

#[derive(Debug, thiserror::Error)]
pub enum SshError {
    #[error("the SSH handshake with the guest failed")]
    Handshake(#[source] russh::Error),
    #[error("the guest's host key {offered} is not the one it announced ({expected})")]
    HostKeyMismatch { expected: String, offered: String },
    #[error("the guest refused the job's key for user {0:?}")]
    AuthRefused(String),
    #[error("{what} did not finish within {limit:?}")]
    Timeout { what: String, limit: Duration },
    #[error("SSH")]
    Protocol(#[from] russh::Error),
    #[error("SFTP")]
    Sftp(#[from] russh_sftp::client::error::Error),
    #[error("the command was cancelled")]
    Cancelled,
    #[error("the guest closed the channel without an exit status")]
    NoExitStatus,
    #[error("local file {path}")]
    Local {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("remote file {path}")]
    Remote {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the guest agent did not forward a port for the network proxy")]
    ForwardRefused,
    #[error("{path} is {kind}: only regular files are collected")]
    NotAFile { path: String, kind: &'static str },
    #[error("{path} is over the limit of {limit}")]
    TooLarge { path: String, limit: ByteSize },
    #[error("{path} holds more than {limit} entries")]
    TooManyEntries { path: String, limit: usize },
    #[error("{path} holds a name longer than {MAX_NAME_BYTES} bytes")]
    NameTooLong { path: String },
}

/// Longest file name a guest's directory listing may hold (Linux's `NAME_MAX`).
pub const MAX_NAME_BYTES: usize = 255;

/// What a path in the guest is, as its entry (or `lstat`) says; links are not followed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    File,
    Dir,
    Other,
}

impl From<FileType> for EntryKind {
    fn from(kind: FileType) -> Self {
        match kind {
            FileType::File => EntryKind::File,
            FileType::Dir => EntryKind::Dir,
            FileType::Symlink | FileType::Other => EntryKind::Other,
        }
    }
}

/// Limits of one SSH connection.
#[derive(Debug, Clone)]
pub struct SshOptions {
    /// The user to log in as (`vmfarm.user`).
    pub user: String,
    /// Handshake plus authentication.
    pub connect_timeout: Duration,
}

impl Default for SshOptions {
    fn default() -> Self {
        SshOptions {
            user: "build".into(),
            connect_timeout: Duration::from_secs(30),
        }
    }
}

/// When to stop a command early.
#[derive(Debug, Clone, Default)]
pub struct ExecLimits {
    pub timeout: Option<Duration>,
    /// The job's cancel flag (set when a heartbeat answers `cancel: true`).
    pub cancel: Option<tokio::sync::watch::Receiver<bool>>,
}

impl ExecLimits {
    pub fn timeout(limit: Duration) -> Self {
        ExecLimits {
            timeout: Some(limit),
            cancel: None,
        }
    }
}

enum Stop {
    Timeout,
    Cancelled,
}

/// Which of a command's streams a chunk of output came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputStream {
    Stdout,
    Stderr,
}

/// Where a command's output goes. `put` may wait: the command's output is held back meanwhile
/// (SSH's flow control reaches the guest), so a fast writer cannot grow the worker's memory.
pub trait Output: Send {
    fn put(&mut self, stream: OutputStream, data: &[u8]) -> impl Future<Output = ()> + Send;
}

/// A closure takes output at once.
impl<F: FnMut(OutputStream, &[u8]) + Send> Output for F {
    fn put(&mut self, stream: OutputStream, data: &[u8]) -> impl Future<Output = ()> + Send {
        self(stream, data);
        std::future::ready(())
    }
}

/// A file copied from the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Downloaded {
    /// Hex.
    pub sha256: String,
    pub size: u64,
}

/// How much of each stream [`Guest::exec_collect`] keeps.
pub const COLLECT_BYTES: usize = 64 * 1024;

/// What a command printed and how it ended, when collected in memory.
#[derive(Debug, Clone, Default)]
pub struct ExecOutput {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub exit_status: u32,
}

struct Pinned {
    expected: HostFingerprint,
    /// The fingerprint a refused server offered, for the error message.
    offered: Arc<std::sync::Mutex<Option<String>>>,
    /// Where connections to the forwarded port go, once [`Guest::forward`] asked for one.
    forwarded: Arc<std::sync::Mutex<Option<mpsc::Sender<ForwardedStream>>>>,
}

impl client::Handler for Pinned {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let PublicKeyOrCertificate::PublicKey { key, .. } = key else {
            return Ok(false);
        };
        let offered = key.fingerprint(HashAlg::Sha256).to_string();
        let matches = offered == self.expected.0;
        if !matches && let Ok(mut slot) = self.offered.lock() {
            *slot = Some(offered);
        }
        Ok(matches)
    }

    async fn server_channel_open_forwarded_tcpip(
        &mut self,
        channel: Channel<Msg>,
        _connected_address: &str,
        _connected_port: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        let sender = self.forwarded.lock().ok().and_then(|s| s.clone());
        // Refused when nothing asked for it, or when the taker is that far behind.
        match sender.map(|s| s.try_reserve_owned()) {
            Some(Ok(slot)) => {
                reply.accept().await;
                slot.send(channel.into_stream());
            }
            _ => reply.reject(ChannelOpenFailure::ResourceShortage).await,
        }
        Ok(())
    }
}

/// A connection the guest made to the port the worker forwards.
pub type ForwardedStream = ChannelStream<Msg>;

/// Connections the guest made to a forwarded port, not yet taken: more wait in the guest.
const FORWARDED_QUEUE: usize = 16;

/// An authenticated SSH connection to a guest's agent.
pub struct Guest {
    handle: Handle<Pinned>,
    forwarded: Arc<std::sync::Mutex<Option<mpsc::Sender<ForwardedStream>>>>,
}

impl Guest {
    /// Opens SSH over `stream`, accepting only the host key `fingerprint` and logging in with `key`.
    pub async fn ssh(
        stream: Box<dyn GuestIo>,
        key: &JobKey,
        fingerprint: &HostFingerprint,
        options: &SshOptions,
    ) -> Result<Guest, SshError> {
        let limit = options.connect_timeout;
        tokio::time::timeout(
            limit,
            Self::connect(stream, key, fingerprint, &options.user),
        )
        .await
        .map_err(|_| SshError::Timeout {
            what: "the SSH handshake".into(),
            limit,
        })?
    }

    async fn connect(
        stream: Box<dyn GuestIo>,
        key: &JobKey,
        fingerprint: &HostFingerprint,
        user: &str,
    ) -> Result<Guest, SshError> {
        let config = Arc::new(client::Config {
            inactivity_timeout: None,
            nodelay: true,
            window_size: 8 * 1024 * 1024,
            ..Default::default()
        });
        let offered = Arc::new(std::sync::Mutex::new(None));
        let forwarded = Arc::default();
        let pinned = Pinned {
            expected: fingerprint.clone(),
            offered: offered.clone(),
            forwarded: Arc::clone(&forwarded),
        };
        let mut handle = match client::connect_stream(config, stream, pinned).await {
            Ok(handle) => handle,
            Err(e) => {
                let offered = offered.lock().ok().and_then(|mut o| o.take());
                return Err(match offered {
                    Some(offered) => SshError::HostKeyMismatch {
                        expected: fingerprint.0.clone(),
                        offered,
                    },
                    None => SshError::Handshake(e),
                });
            }
        };
        let auth = handle
            .authenticate_publickey(user, PrivateKeyWithHashAlg::new(key.private(), None))
            .await?;
        if !auth.success() {
            return Err(SshError::AuthRefused(user.to_owned()));
        }
        Ok(Guest { handle, forwarded })
    }

    /// Asks the guest's SSH server (the agent, or OpenSSH's remote forwarding) to listen on a
    /// free loopback port in the guest; each connection to it
    /// arrives on the returned receiver. Returns the port (one forwarded port per guest).
    pub async fn forward(&self) -> Result<(u16, mpsc::Receiver<ForwardedStream>), SshError> {
        let (sender, receiver) = mpsc::channel(FORWARDED_QUEUE);
        if let Ok(mut slot) = self.forwarded.lock() {
            *slot = Some(sender);
        }
        let port = self.handle.tcpip_forward("127.0.0.1", 0).await?;
        let port = u16::try_from(port).map_err(|_| SshError::ForwardRefused)?;
        if port == 0 {
            return Err(SshError::ForwardRefused);
        }
        Ok((port, receiver))
    }

    /// Opens an interactive session (`vmfarm ssh`): `open`'s command or the login shell, on a
    /// terminal of `open`'s size when it asks for one.
    pub async fn interactive(
        &self,
        open: &vmfarm_proto::tunnel::Open,
    ) -> Result<Channel<Msg>, SshError> {
        let channel = self.handle.channel_open_session().await?;
        if let Some(pty) = &open.pty {
            channel
                .request_pty(
                    true,
                    &pty.term,
                    u32::from(pty.cols),
                    u32::from(pty.rows),
                    0,
                    0,
                    &[],
                )
                .await?;
        }
        match &open.command {
            Some(command) => channel.exec(true, command.as_bytes()).await?,
            None => channel.request_shell(true).await?,
        }
        Ok(channel)
    }

    async fn session(&self, env: &[(String, String)]) -> Result<Channel<Msg>, SshError> {
        let channel = self.handle.channel_open_session().await?;
        for (name, value) in env {
            channel
                .set_env(false, name.as_str(), value.as_str())
                .await?;
        }
        Ok(channel)
    }

    /// Runs `command` (a shell command line) with `env`, handing its output to `output` as it
    /// comes, and returns its exit status. When `limits.timeout` passes or `limits.cancel`
    /// turns true first (while the session opens, too), the command's process group is killed
    /// and [`SshError::Timeout`] or [`SshError::Cancelled`] is returned.
    pub async fn exec(
        &self,
        command: &str,
        env: &[(String, String)],
        output: &mut impl Output,
        limits: ExecLimits,
    ) -> Result<u32, SshError> {
        let timeout = limits.timeout;
        let stopped = |why| match why {
            Stop::Timeout => SshError::Timeout {
                what: format!("command {command:?}"),
                limit: timeout.unwrap_or_default(),
            },
            Stop::Cancelled => SshError::Cancelled,
        };
        let stop = stop_signal(limits);
        tokio::pin!(stop);
        let mut channel = tokio::select! {
            opened = self.start(command, env) => opened?,
            why = &mut stop => return Err(stopped(why)),
        };
        tokio::select! {
            status = pump(&mut channel, output) => status,
            why = &mut stop => {
                let _ = channel.signal(Sig::KILL).await;
                let _ = channel.close().await;
                Err(stopped(why))
            }
        }
    }

    /// Opens a session with `env` and starts `command` in it.
    async fn start(
        &self,
        command: &str,
        env: &[(String, String)],
    ) -> Result<Channel<Msg>, SshError> {
        let channel = self.session(env).await?;
        channel.exec(true, command).await?;
        Ok(channel)
    }

    /// Runs `command` and collects the first [`COLLECT_BYTES`] of each of its streams in
    /// memory (the rest is read and dropped).
    pub async fn exec_collect(
        &self,
        command: &str,
        limits: ExecLimits,
    ) -> Result<ExecOutput, SshError> {
        let mut out = ExecOutput::default();
        let (stdout, stderr) = (&mut out.stdout, &mut out.stderr);
        let mut sink = |stream: OutputStream, data: &[u8]| {
            let kept = match stream {
                OutputStream::Stdout => &mut *stdout,
                OutputStream::Stderr => &mut *stderr,
            };
            let room = COLLECT_BYTES.saturating_sub(kept.len());
            kept.extend_from_slice(&data[..data.len().min(room)]);
        };
        let status = self.exec(command, &[], &mut sink, limits).await?;
        out.exit_status = status;
        Ok(out)
    }

    /// An SFTP session (for trees of sources and artifacts).
    pub async fn sftp(&self) -> Result<SftpSession, SshError> {
        let channel = self.session(&[]).await?;
        channel.request_subsystem(true, "sftp").await?;
        Ok(SftpSession::new_with_config(channel.into_stream(), sftp_config()).await?)
    }

    /// Copies the local file `local` to `remote` in the guest; returns its sha256 (hex).
    pub async fn upload(&self, local: &Path, remote: &str) -> Result<String, SshError> {
        let local_err = |source| SshError::Local {
            path: local.display().to_string(),
            source,
        };
        let remote_err = |source| SshError::Remote {
            path: remote.to_owned(),
            source,
        };
        let sftp = self.sftp().await?;
        let mut from = tokio::fs::File::open(local).await.map_err(local_err)?;
        let mut to = sftp.create(remote).await?;
        let mut hash = Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = from.read(&mut buf).await.map_err(local_err)?;
            if n == 0 {
                break;
            }
            hash.update(&buf[..n]);
            to.write_all(&buf[..n]).await.map_err(remote_err)?;
        }
        to.shutdown().await.map_err(remote_err)?;
        sftp.close().await?;
        Ok(hex::encode(hash.finalize()))
    }

    /// What `remote` is (not following a link), or `None` when it does not exist.
    pub async fn kind_of(&self, remote: &str) -> Result<Option<EntryKind>, SshError> {
        let sftp = self.sftp().await?;
        let kind = match sftp.symlink_metadata(remote).await {
            Ok(meta) => Some(meta.file_type().into()),
            Err(russh_sftp::client::error::Error::Status(status))
                if status.status_code == russh_sftp::protocol::StatusCode::NoSuchFile =>
            {
                None
            }
            Err(e) => return Err(e.into()),
        };
        sftp.close().await?;
        Ok(kind)
    }

    /// The entries of the directory `remote` (but `.` and `..`), refusing one of more than
    /// `max`, a name longer than [`MAX_NAME_BYTES`], or more pages than entries allow: the
    /// guest's listing is read a packet at a time and what is kept stays under
    /// `max` × [`MAX_NAME_BYTES`].
    pub async fn list_dir(
        &self,
        remote: &str,
        max: usize,
    ) -> Result<Vec<(String, EntryKind)>, SshError> {
        let too_many = || SshError::TooManyEntries {
            path: remote.to_owned(),
            limit: max,
        };
        let channel = self.session(&[]).await?;
        channel.request_subsystem(true, "sftp").await?;
        let raw = russh_sftp::client::RawSftpSession::new_with_config(
            channel.into_stream(),
            sftp_config(),
        );
        raw.init().await?;
        let handle = raw.opendir(remote).await?.handle;
        let mut entries = Vec::new();
        // Every page but the last holds an entry (or `.` and `..`): a guest that sends empty
        // pages runs out of them.
        for _ in 0..max + 2 {
            let page = match raw.readdir(handle.as_str()).await {
                Ok(page) => page,
                Err(russh_sftp::client::error::Error::Status(status))
                    if status.status_code == russh_sftp::protocol::StatusCode::Eof =>
                {
                    raw.close(handle).await?;
                    return Ok(entries);
                }
                Err(e) => return Err(e.into()),
            };
            for file in page.files {
                if file.filename == "." || file.filename == ".." {
                    continue;
                }
                if file.filename.len() > MAX_NAME_BYTES {
                    return Err(SshError::NameTooLong {
                        path: remote.to_owned(),
                    });
                }
                if entries.len() == max {
                    return Err(too_many());
                }
                entries.push((file.filename, file.attrs.file_type().into()));
            }
        }
        Err(too_many())
    }

    /// Copies the regular file `remote` from the guest to the local file `local`, refusing
    /// anything else (a link, a FIFO, a device) and anything over `max_bytes`.
    pub async fn download(
        &self,
        remote: &str,
        local: &Path,
        max_bytes: u64,
    ) -> Result<Downloaded, SshError> {
        let local_err = |source| SshError::Local {
            path: local.display().to_string(),
            source,
        };
        let remote_err = |source| SshError::Remote {
            path: remote.to_owned(),
            source,
        };
        let too_large = || SshError::TooLarge {
            path: remote.to_owned(),
            limit: ByteSize(max_bytes),
        };
        let sftp = self.sftp().await?;
        let meta = sftp.symlink_metadata(remote).await?;
        let kind = match meta.file_type() {
            FileType::File => None,
            FileType::Symlink => Some("a symbolic link"),
            FileType::Dir => Some("a directory"),
            FileType::Other => Some("a FIFO, device or socket"),
        };
        if let Some(kind) = kind {
            return Err(SshError::NotAFile {
                path: remote.to_owned(),
                kind,
            });
        }
        if meta.len() > max_bytes {
            return Err(too_large());
        }
        let mut from = sftp.open(remote).await?;
        let mut to = tokio::fs::File::create(local).await.map_err(local_err)?;
        let mut hash = Sha256::new();
        let mut size = 0u64;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = from.read(&mut buf).await.map_err(remote_err)?;
            if n == 0 {
                break;
            }
            // It may grow while it is read.
            size += n as u64;
            if size > max_bytes {
                return Err(too_large());
            }
            hash.update(&buf[..n]);
            to.write_all(&buf[..n]).await.map_err(local_err)?;
        }
        to.flush().await.map_err(local_err)?;
        sftp.close().await?;
        Ok(Downloaded {
            sha256: hex::encode(hash.finalize()),
            size,
        })
    }

    /// Asks the agent to end the guest (sync, unmount, reboot); the caller then waits for the
    /// VM to exit and kills it if it does not within 10 s (CONTRACTS.md).
    pub async fn shutdown(self) -> Result<(), SshError> {
        let mut ignore = |_: OutputStream, _: &[u8]| {};
        // The guest goes away while answering: a lost connection is the expected end.
        let limits = ExecLimits::timeout(Duration::from_secs(10));
        let _ = self
            .exec("vmfarm-agent shutdown", &[], &mut ignore, limits)
            .await;
        self.disconnect().await;
        Ok(())
    }

    /// Ends the SSH connection (the guest is being shut down some other way).
    pub async fn disconnect(self) {
        let _ = self
            .handle
            .disconnect(Disconnect::ByApplication, "", "en")
            .await;
    }
}

/// The SFTP client's settings: each request may take up to a minute (the library's 10 s is
/// too short for a guest's first SFTP server on a loaded host: under TCG its code is translated
/// as it first runs, all of it in a guest just restored from a snapshot); the job's own limits
/// bound the whole.
fn sftp_config() -> russh_sftp::client::Config {
    russh_sftp::client::Config {
        request_timeout_secs: 60,
        ..Default::default()
    }
}

/// Resolves when `limits` say a command must stop: its timeout passed or its cancel flag
/// turned true (a dropped cancel sender never cancels).
async fn stop_signal(limits: ExecLimits) -> Stop {
    let timed_out = async {
        match limits.timeout {
            Some(limit) => tokio::time::sleep(limit).await,
            None => std::future::pending().await,
        }
    };
    let cancelled = async {
        match limits.cancel {
            Some(mut cancel) => {
                if cancel.wait_for(|c| *c).await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        () = timed_out => Stop::Timeout,
        () = cancelled => Stop::Cancelled,
    }
}

/// Forwards a channel's output until it closes; returns the exit status.
async fn pump(channel: &mut Channel<Msg>, output: &mut impl Output) -> Result<u32, SshError> {
    let mut status = None;
    while let Some(msg) = channel.wait().await {
        match msg {
            ChannelMsg::Data { data } => output.put(OutputStream::Stdout, &data).await,
            ChannelMsg::ExtendedData { data, ext: 1 } => {
                output.put(OutputStream::Stderr, &data).await
            }
            ChannelMsg::ExitStatus { exit_status } => status = Some(exit_status),
            ChannelMsg::ExitSignal { .. } => status = status.or(Some(255)),
            ChannelMsg::Close => break,
            _ => {}
        }
    }
    status.ok_or(SshError::NoExitStatus)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A guest whose channel sends garbage instead of SSH: the connection is refused with a
    /// clear error, quickly, and what it sends is not kept.
    #[tokio::test]
    async fn test_garbage_on_the_agents_channel_is_refused() {
        let (ours, mut theirs) = tokio::io::duplex(64 * 1024);
        let flood = tokio::spawn(async move {
            let mut garbage = vec![0u8; 64 * 1024];
            let mut sent = 0usize;
            for round in 0..1024u32 {
                for (i, b) in garbage.iter_mut().enumerate() {
                    *b = (i as u32).wrapping_mul(2_654_435_761).wrapping_add(round) as u8;
                }
                if theirs.write_all(&garbage).await.is_err() {
                    break;
                }
                sent += garbage.len();
            }
            sent
        });
        let key = JobKey::generate().unwrap();
        let fingerprint = HostFingerprint("SHA256:nothing".into());
        let options = SshOptions {
            connect_timeout: Duration::from_secs(20),
            ..SshOptions::default()
        };
        let started = std::time::Instant::now();
        let refused = Guest::ssh(Box::new(ours), &key, &fingerprint, &options).await;
        assert!(
            matches!(refused, Err(SshError::Handshake(_))),
            "{:?}",
            refused.err()
        );
        assert!(started.elapsed() < Duration::from_secs(5));
        // The worker stopped reading: the flood could not send its 64 MiB.
        assert!(flood.await.unwrap() < 64 << 20);
    }
}
