//! `vmfarm ssh` sessions of a job ([`vmfarm_proto::tunnel`]): while its guest is up, the worker
//! long-polls the server for sessions asked of the job, opens its own end of each (an upgraded
//! connection: the worker still only connects out), and bridges it to a new interactive channel
//! of the guest's SSH: the CLI's stdin, window sizes and EOF go in, the output and the exit
//! status come back. Guest output is framed as it comes, never buffered past one read.

use crate::guest::Guest;
use crate::worker::server_client::{LeaseHandle, ServerClient};
use russh::ChannelMsg;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinSet;
use vmfarm_proto::tunnel::{Frame, FrameReader, Open};

/// Sessions one guest serves at once; more are refused with a message.
const MAX_SESSIONS: usize = 8;

/// How long a session may take to send what it runs.
const OPEN_WITHIN: Duration = Duration::from_secs(10);

/// The sessions of one job's guest.
pub struct SshSessions {
    client: ServerClient,
    lease: LeaseHandle,
    poller: tokio::task::JoinHandle<()>,
    sessions: Arc<tokio::sync::Mutex<JoinSet<()>>>,
    /// Sessions open now.
    open: Arc<AtomicUsize>,
}

impl SshSessions {
    /// Serves the sessions asked of the lease's job, into `guest`.
    pub fn serve(client: ServerClient, lease: LeaseHandle, guest: Arc<Guest>) -> SshSessions {
        let sessions = Arc::new(tokio::sync::Mutex::new(JoinSet::new()));
        let open = Arc::new(AtomicUsize::new(0));
        let poller = tokio::spawn(poll(
            client.clone(),
            lease.clone(),
            guest,
            sessions.clone(),
            open.clone(),
        ));
        SshSessions {
            client,
            lease,
            poller,
            sessions,
            open,
        }
    }

    /// Sessions open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    /// Ends every session, stops asking for more and tells the server so; returns once none
    /// holds the guest.
    pub async fn stop(self) {
        self.poller.abort();
        let _ = self.poller.await;
        if let Err(e) = self.client.ssh_gone(&self.lease).await {
            tracing::debug!(error = %e, "telling the server the guest is gone failed");
        }
        let mut sessions = self.sessions.lock().await;
        sessions.abort_all();
        while sessions.join_next().await.is_some() {}
    }
}

async fn poll(
    client: ServerClient,
    lease: LeaseHandle,
    guest: Arc<Guest>,
    sessions: Arc<tokio::sync::Mutex<JoinSet<()>>>,
    open: Arc<AtomicUsize>,
) {
    loop {
        match client.ssh_sessions(&lease).await {
            Ok(ids) => {
                let mut set = sessions.lock().await;
                while set.try_join_next().is_some() {}
                for id in ids {
                    let (client, lease, guest, open) =
                        (client.clone(), lease.clone(), guest.clone(), open.clone());
                    if open.load(Ordering::SeqCst) >= MAX_SESSIONS {
                        set.spawn(async move {
                            let why = format!(
                                "this guest has {MAX_SESSIONS} sessions open already: close one first"
                            );
                            let opened =
                                tokio::time::timeout(OPEN_WITHIN, client.ssh_session(&lease, &id));
                            if let Ok(Ok(end)) = opened.await {
                                let (_, mut to_user) = tokio::io::split(end);
                                let _ = to_user.write_all(&Frame::Failed(why).encode()).await;
                            }
                        });
                        continue;
                    }
                    open.fetch_add(1, Ordering::SeqCst);
                    set.spawn(async move {
                        if let Err(e) = session(&client, &lease, &guest, &id).await {
                            tracing::warn!(session = %id, error = %e, "an ssh session failed");
                        }
                        open.fetch_sub(1, Ordering::SeqCst);
                    });
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "asking for ssh sessions failed; asking again");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
    }
}

/// One session: its end on the server, bridged to a channel of the guest's SSH.
async fn session(
    client: &ServerClient,
    lease: &LeaseHandle,
    guest: &Guest,
    id: &str,
) -> anyhow::Result<()> {
    let end = tokio::time::timeout(OPEN_WITHIN, client.ssh_session(lease, id))
        .await
        .map_err(|_| anyhow::anyhow!("the server did not open the session in {OPEN_WITHIN:?}"))??;
    let (mut from_user, mut to_user) = tokio::io::split(end);
    let mut frames = FrameReader::default();
    let mut buf = vec![0u8; 16 * 1024];
    let opened = tokio::time::timeout(
        OPEN_WITHIN,
        first_open(&mut from_user, &mut frames, &mut buf),
    )
    .await
    .map_err(|_| anyhow::anyhow!("the session sent nothing to run in {OPEN_WITHIN:?}"))
    .and_then(|opened| opened);
    let open = match opened {
        Ok(open) => open,
        Err(e) => {
            let _ = to_user
                .write_all(&Frame::Failed(e.to_string()).encode())
                .await;
            return Err(e);
        }
    };
    let channel = match guest.interactive(&open).await {
        Ok(channel) => channel,
        Err(e) => {
            let why = format!("the guest refused the session: {e}");
            to_user.write_all(&Frame::Failed(why).encode()).await?;
            return Ok(());
        }
    };
    let (mut from_guest, to_guest) = channel.split();
    let mut status = None;
    let mut stdin_open = true;
    loop {
        tokio::select! {
            // Read on after the user's EOF too: a closed connection ends the session.
            read = from_user.read(&mut buf) => {
                let n = read?;
                if n == 0 {
                    // The user is gone: so is the session.
                    to_guest.close().await?;
                    return Ok(());
                }
                frames.push(&buf[..n]);
                while let Some(frame) = frames.next_frame()? {
                    match frame {
                        Frame::Stdin(data) if stdin_open => to_guest.data_bytes(data).await?,
                        Frame::Resize { cols, rows } => {
                            to_guest
                                .window_change(u32::from(cols), u32::from(rows), 0, 0)
                                .await?
                        }
                        Frame::Eof if stdin_open => {
                            to_guest.eof().await?;
                            stdin_open = false;
                        }
                        _ => {}
                    }
                }
            }
            msg = from_guest.wait() => match msg {
                Some(ChannelMsg::Data { data }) => {
                    for frame in Frame::data_frames(&data, Frame::Stdout) {
                        to_user.write_all(&frame.encode()).await?;
                    }
                }
                Some(ChannelMsg::ExtendedData { data, .. }) => {
                    for frame in Frame::data_frames(&data, Frame::Stderr) {
                        to_user.write_all(&frame.encode()).await?;
                    }
                }
                Some(ChannelMsg::ExitStatus { exit_status }) => status = Some(exit_status),
                Some(ChannelMsg::Close) | None => {
                    to_user.write_all(&Frame::Exit(status.unwrap_or(255)).encode()).await?;
                    to_user.shutdown().await?;
                    return Ok(());
                }
                Some(_) => {}
            },
        }
    }
}

/// Reads until the session's first frame, which must say what to run.
async fn first_open(
    from_user: &mut (impl tokio::io::AsyncRead + Unpin),
    frames: &mut FrameReader,
    buf: &mut [u8],
) -> anyhow::Result<Open> {
    loop {
        if let Some(frame) = frames.next_frame()? {
            return match frame {
                Frame::Open(open) => Ok(open),
                _ => Err(anyhow::anyhow!("the session's first frame is not an open")),
            };
        }
        let n = from_user.read(buf).await?;
        anyhow::ensure!(n > 0, "the session closed before it said what to run");
        frames.push(&buf[..n]);
    }
}
