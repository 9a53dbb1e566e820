//! One SSH session channel: collects environment and PTY requests, then runs a command, a
//! login shell or the sftp subsystem as the build user and streams its input and output.

use std::os::fd::{AsRawFd as _, OwnedFd};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use russh::server::Msg;
use russh::{Channel, ChannelMsg, Sig};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _};
use tokio::process::{Child, Command};

use crate::channel::FdStream;
use crate::{init, pid1, pty, shutdown, user};

/// The command the worker sends to end the guest (CONTRACTS.md); the server runs it itself,
/// as root, whatever user the session is.
const SHUTDOWN: &[u8] = b"vmfarm-agent shutdown";

enum Program {
    Command(String),
    Shell,
    Sftp,
}

struct PtyRequest {
    term: String,
    cols: u32,
    rows: u32,
}

/// Environment names a client may set: a C identifier.
pub fn valid_env_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

pub async fn run(mut channel: Channel<Msg>, user: String) {
    let mut env = Vec::new();
    let mut pty_request = None;
    let program = loop {
        match channel.wait().await {
            None | Some(ChannelMsg::Close) => return,
            Some(ChannelMsg::SetEnv {
                variable_name,
                variable_value,
                ..
            }) => {
                if valid_env_name(&variable_name) && !variable_value.contains('\0') {
                    env.push((variable_name, variable_value));
                }
            }
            Some(ChannelMsg::RequestPty {
                term,
                col_width,
                row_height,
                ..
            }) => {
                pty_request = Some(PtyRequest {
                    term,
                    cols: col_width,
                    rows: row_height,
                });
            }
            Some(ChannelMsg::Exec { command, .. }) => {
                if command.trim_ascii() == SHUTDOWN {
                    let _ = channel.exit_status(0).await;
                    let _ = channel.eof().await;
                    let _ = channel.close().await;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    shutdown::run();
                }
                match String::from_utf8(command) {
                    Ok(command) => break Program::Command(command),
                    Err(_) => return fail(&channel, "the command is not UTF-8").await,
                }
            }
            Some(ChannelMsg::RequestShell { .. }) => break Program::Shell,
            Some(ChannelMsg::RequestSubsystem { name, .. }) if name == "sftp" => {
                break Program::Sftp;
            }
            Some(_) => {}
        }
    };
    if let Err(e) = run_program(channel, &user, program, env, pty_request).await {
        eprintln!("vmfarm-agent: session: {e}");
    }
}

async fn fail(channel: &Channel<Msg>, message: &str) {
    let _ = channel
        .extended_data_bytes(1, format!("vmfarm-agent: {message}\n").into_bytes())
        .await;
    let _ = channel.exit_status(127).await;
    let _ = channel.eof().await;
    let _ = channel.close().await;
}

fn command(program: &Program, user: &str, env: &[(String, String)], term: Option<&str>) -> Command {
    let shell = user::shell();
    let home = user::home(user);
    let mut cmd = match program {
        Program::Command(text) => {
            let mut c = Command::new(shell);
            c.arg("-c").arg(text);
            c
        }
        Program::Shell => {
            let mut c = Command::new(shell);
            c.arg("-l");
            c
        }
        Program::Sftp => {
            let mut c = Command::new(init::AGENT_PATH);
            c.arg("sftp-server");
            c
        }
    };
    cmd.env_clear()
        .env("HOME", &home)
        .env("USER", user)
        .env("LOGNAME", user)
        .env("SHELL", shell)
        .env("PATH", pid1::PATH)
        .env("LANG", "C.UTF-8");
    if let Some(term) = term {
        cmd.env("TERM", term);
    }
    cmd.envs(env.iter().map(|(k, v)| (k, v)))
        .current_dir(home.join("work"))
        .uid(user::UID)
        .gid(user::GID)
        .kill_on_drop(true);
    cmd
}

async fn run_program(
    channel: Channel<Msg>,
    user: &str,
    program: Program,
    env: Vec<(String, String)>,
    pty_request: Option<PtyRequest>,
) -> std::io::Result<()> {
    let term = pty_request.as_ref().map(|p| p.term.as_str());
    let cmd = command(&program, user, &env, term);
    let (mut read, write) = channel.split();
    let stdout_writer = write.make_writer();
    let stderr_writer = write.make_writer_ext(Some(1));
    let Spawned {
        mut child,
        mut input,
        outputs,
        master,
    } = match &pty_request {
        Some(req) => spawn_on_pty(cmd, req)?,
        None => spawn_with_pipes(cmd)?,
    };
    let master_fd = master;
    let pid = child.id().map(|p| p as libc::pid_t);
    let mut writers: Vec<Writer> = vec![Box::new(stdout_writer), Box::new(stderr_writer)];
    let pumps: Vec<_> = outputs
        .into_iter()
        .zip(writers.drain(..))
        .map(|(mut from, mut to)| {
            tokio::spawn(async move {
                // A PTY master reports EIO once the last process holding the terminal is gone.
                let _ = tokio::io::copy(&mut from, &mut to).await;
                let _ = to.flush().await;
            })
        })
        .collect();
    let finished = async {
        for pump in pumps {
            let _ = pump.await;
        }
        child.wait().await
    };
    tokio::pin!(finished);
    let status = loop {
        tokio::select! {
            status = &mut finished => break status?,
            msg = read.wait() => match msg {
                Some(ChannelMsg::Data { data }) => {
                    if let Some(w) = input.as_mut()
                        && w.write_all(&data).await.is_err()
                    {
                        input = None;
                    }
                }
                Some(ChannelMsg::Eof) => {
                    if master_fd.is_none() {
                        input = None;
                    }
                }
                Some(ChannelMsg::Signal { signal }) => {
                    if let Some(pid) = pid {
                        signal_group(pid, &signal);
                    }
                }
                Some(ChannelMsg::WindowChange { col_width, row_height, .. }) => {
                    if let Some(master) = &master_fd {
                        let _ = pty::resize(master.as_raw_fd(), col_width, row_height);
                    }
                }
                None | Some(ChannelMsg::Close) => {
                    if let Some(pid) = pid {
                        signal_group(pid, &Sig::HUP);
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        signal_group(pid, &Sig::KILL);
                    }
                    return Ok(());
                }
                Some(_) => {}
            }
        }
    };
    drop(master_fd);
    write
        .exit_status(exit_code(status))
        .await
        .map_err(std::io::Error::other)?;
    write.eof().await.map_err(std::io::Error::other)?;
    write.close().await.map_err(std::io::Error::other)?;
    Ok(())
}

type Writer = Box<dyn AsyncWrite + Send + Unpin>;
type Reader = Box<dyn AsyncRead + Send + Unpin>;

/// A started program: its input, its outputs (stdout then stderr), the terminal's master side.
struct Spawned {
    child: Child,
    input: Option<Writer>,
    outputs: Vec<Reader>,
    master: Option<OwnedFd>,
}

fn spawn_on_pty(mut cmd: Command, req: &PtyRequest) -> std::io::Result<Spawned> {
    let pair = pty::open(req.cols, req.rows)?;
    cmd.stdin(Stdio::from(pair.slave.try_clone()?))
        .stdout(Stdio::from(pair.slave.try_clone()?))
        .stderr(Stdio::from(pair.slave));
    // SAFETY: the closure only makes async-signal-safe calls (setsid, ioctl) in the child.
    unsafe {
        cmd.pre_exec(pty::become_session_leader_on_stdin);
    }
    let child = cmd.spawn()?;
    // The command holds the terminal's slave side; the master reports EIO (the end) only once
    // the last holder is gone.
    drop(cmd);
    Ok(Spawned {
        child,
        input: Some(Box::new(FdStream::new(pair.master.try_clone()?)?)),
        outputs: vec![Box::new(FdStream::new(pair.master.try_clone()?)?)],
        master: Some(pair.master),
    })
}

fn spawn_with_pipes(mut cmd: Command) -> std::io::Result<Spawned> {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: the closure only makes an async-signal-safe call (setsid) in the child.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(())
            }
        });
    }
    let mut child = cmd.spawn()?;
    let input = child.stdin.take().map(|s| Box::new(s) as Writer);
    let mut outputs: Vec<Reader> = Vec::new();
    if let Some(out) = child.stdout.take() {
        outputs.push(Box::new(out));
    }
    if let Some(err) = child.stderr.take() {
        outputs.push(Box::new(err));
    }
    Ok(Spawned {
        child,
        input,
        outputs,
        master: None,
    })
}

fn exit_code(status: ExitStatus) -> u32 {
    use std::os::unix::process::ExitStatusExt as _;
    match (status.code(), status.signal()) {
        (Some(code), _) => code as u32,
        (None, Some(sig)) => 128 + sig as u32,
        (None, None) => 255,
    }
}

fn signal_number(sig: &Sig) -> Option<libc::c_int> {
    Some(match sig {
        Sig::ABRT => libc::SIGABRT,
        Sig::ALRM => libc::SIGALRM,
        Sig::FPE => libc::SIGFPE,
        Sig::HUP => libc::SIGHUP,
        Sig::ILL => libc::SIGILL,
        Sig::INT => libc::SIGINT,
        Sig::KILL => libc::SIGKILL,
        Sig::PIPE => libc::SIGPIPE,
        Sig::QUIT => libc::SIGQUIT,
        Sig::SEGV => libc::SIGSEGV,
        Sig::TERM => libc::SIGTERM,
        Sig::USR1 => libc::SIGUSR1,
        Sig::Custom(name) => match name.as_str() {
            "USR2" => libc::SIGUSR2,
            "CONT" => libc::SIGCONT,
            "STOP" => libc::SIGSTOP,
            _ => return None,
        },
    })
}

/// Signals the process group the session's program leads (it called setsid).
fn signal_group(pid: libc::pid_t, sig: &Sig) {
    if let Some(n) = signal_number(sig) {
        // SAFETY: kill(2) on a process group this server started; no memory is involved.
        unsafe { libc::kill(-pid, n) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_env_names_must_be_identifiers() {
        for good in ["PATH", "_x", "CI_JOB_1"] {
            assert!(valid_env_name(good), "{good}");
        }
        for bad in ["", "1X", "A-B", "A=B", "A B"] {
            assert!(!valid_env_name(bad), "{bad}");
        }
    }

    #[test]
    fn test_signal_names_map_and_unknown_ones_are_refused() {
        assert_eq!(signal_number(&Sig::TERM), Some(libc::SIGTERM));
        assert_eq!(
            signal_number(&Sig::Custom("USR2".into())),
            Some(libc::SIGUSR2)
        );
        assert_eq!(signal_number(&Sig::Custom("NOPE".into())), None);
    }

    #[test]
    fn test_exit_codes_report_signals_as_128_plus() {
        use std::os::unix::process::ExitStatusExt as _;
        assert_eq!(exit_code(ExitStatus::from_raw(3 << 8)), 3);
        assert_eq!(exit_code(ExitStatus::from_raw(libc::SIGKILL)), 128 + 9);
    }
}
