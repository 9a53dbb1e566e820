//! `vmfarm ssh JOB [-- COMMAND...]`: a shell (or a command) in a running job's guest, or in a
//! failed job's guest kept for `guest.keep_failed`, through the server ([`vmfarm_proto::tunnel`]).
//! On a terminal it runs on a terminal in the guest too (raw mode here, window size changes
//! passed on); its exit status is the session's.

use crate::cli::SshArgs;
use crate::client::{Client, error_from};
use anyhow::{Context, bail};
use reqwest::{Method, StatusCode};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::process::ExitCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::signal::unix::{SignalKind, signal};
use vmfarm_proto::tunnel::{Frame, FrameReader, MAX_FRAME, Open, PROTOCOL, Pty};

pub async fn run(args: SshArgs) -> anyhow::Result<ExitCode> {
    let client = Client::new(&args.client)?;
    let terminal = is_terminal(&std::io::stdin()) && is_terminal(&std::io::stdout());
    let pty = terminal.then(|| {
        let (cols, rows) = window_size().unwrap_or((80, 24));
        Pty {
            term: std::env::var("TERM").unwrap_or_else(|_| "xterm".to_owned()),
            cols,
            rows,
        }
    });
    let open = Open {
        command: (!args.command.is_empty()).then(|| args.command.join(" ")),
        pty,
    };
    let first = Frame::Open(open).encode();
    if first.len() > MAX_FRAME {
        bail!("the command is longer than the {MAX_FRAME} bytes a session may ask for");
    }
    let request = client
        .request(Method::GET, &format!("/api/jobs/{}/ssh", args.job))
        .header("connection", "upgrade")
        .header("upgrade", PROTOCOL);
    let response = request
        .send()
        .await
        .with_context(|| format!("cannot reach the server at {}", client.url("")))?;
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        return Err(error_from(response).await);
    }
    let stream = response.upgrade().await.context("opening the session")?;
    let (mut from_guest, mut to_guest) = tokio::io::split(stream);
    to_guest.write_all(&first).await?;
    // Raw mode for as long as the session lasts (restored when this guard goes).
    let _raw = if terminal {
        Some(RawMode::enter()?)
    } else {
        None
    };
    // Stdin is read on a thread of its own: a read blocked on the terminal cannot be cancelled,
    // and the runtime would wait for it at exit (tokio's stdin reads on its blocking pool).
    let (stdin_tx, mut stdin_rx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut buf = vec![0u8; 8192];
        loop {
            match std::io::Read::read(&mut stdin, &mut buf) {
                Ok(n) if n > 0 => {
                    if stdin_tx.blocking_send(buf[..n].to_vec()).is_err() {
                        return;
                    }
                }
                _ => return,
            }
        }
    });
    let mut resized = signal(SignalKind::window_change())?;
    let mut frames = FrameReader::default();
    let mut buf = vec![0u8; 16 * 1024];
    let mut stdin_open = true;
    loop {
        tokio::select! {
            data = stdin_rx.recv(), if stdin_open => match data {
                Some(data) => to_guest.write_all(&Frame::Stdin(data).encode()).await?,
                None => {
                    stdin_open = false;
                    to_guest.write_all(&Frame::Eof.encode()).await?;
                }
            },
            _ = resized.recv() => {
                if let (true, Some((cols, rows))) = (terminal, window_size()) {
                    to_guest.write_all(&Frame::Resize { cols, rows }.encode()).await?;
                }
            }
            read = from_guest.read(&mut buf) => {
                let n = read.context("reading the session")?;
                if n == 0 {
                    bail!("the session ended without an exit status");
                }
                frames.push(&buf[..n]);
                while let Some(frame) = frames.next_frame()? {
                    match frame {
                        Frame::Stdout(data) => {
                            let mut out = std::io::stdout().lock();
                            out.write_all(&data)?;
                            out.flush()?;
                        }
                        Frame::Stderr(data) => std::io::stderr().lock().write_all(&data)?,
                        Frame::Exit(status) => {
                            return Ok(ExitCode::from(u8::try_from(status).unwrap_or(255)));
                        }
                        Frame::Failed(why) => bail!("{why}"),
                        _ => {}
                    }
                }
            }
        }
    }
}

fn is_terminal(stream: &impl AsRawFd) -> bool {
    // SAFETY: isatty only reads the state of a descriptor this process owns.
    unsafe { libc::isatty(stream.as_raw_fd()) == 1 }
}

/// The terminal's size (columns, rows), when stdout is one.
fn window_size() -> Option<(u16, u16)> {
    let mut size = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one winsize into `size`, which lives across the call.
    let ok = unsafe { libc::ioctl(std::io::stdout().as_raw_fd(), libc::TIOCGWINSZ, &mut size) };
    (ok == 0 && size.ws_col > 0).then_some((size.ws_col, size.ws_row))
}

/// The terminal in raw mode (keys go to the guest as typed: Ctrl-C reaches its shell), and
/// back as it was when dropped.
struct RawMode {
    saved: libc::termios,
}

impl RawMode {
    fn enter() -> anyhow::Result<RawMode> {
        let fd = std::io::stdin().as_raw_fd();
        // SAFETY: a zeroed termios is a valid value for tcgetattr to overwrite.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: tcgetattr writes the terminal's settings into `saved`.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return Err(std::io::Error::last_os_error()).context("reading the terminal's mode");
        }
        let mut raw = saved;
        // SAFETY: cfmakeraw only changes the flags of the termios it is given.
        unsafe { libc::cfmakeraw(&mut raw) };
        // SAFETY: tcsetattr reads `raw`, a termios made from the terminal's own.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            return Err(std::io::Error::last_os_error()).context("setting the terminal raw");
        }
        Ok(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: puts back the settings read at `enter`, on the same descriptor.
        unsafe { libc::tcsetattr(std::io::stdin().as_raw_fd(), libc::TCSANOW, &self.saved) };
    }
}
