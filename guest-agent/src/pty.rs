//! Pseudo-terminals for interactive sessions.

use std::io;
use std::os::fd::{FromRawFd as _, OwnedFd, RawFd};

pub struct PtyPair {
    /// The agent's side, non-blocking.
    pub master: OwnedFd,
    /// The program's terminal.
    pub slave: OwnedFd,
}

fn winsize(cols: u32, rows: u32) -> libc::winsize {
    let clamp = |v: u32| u16::try_from(v).unwrap_or(u16::MAX);
    libc::winsize {
        ws_row: clamp(rows),
        ws_col: clamp(cols),
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

pub fn open(cols: u32, rows: u32) -> io::Result<PtyPair> {
    let (mut master, mut slave) = (-1, -1);
    let size = winsize(cols, rows);
    // SAFETY: openpty writes two descriptors into the locals; name and termios may be null.
    let ret = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &size,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: openpty succeeded, so both descriptors are open and owned by nobody else.
    let pair = unsafe {
        PtyPair {
            master: OwnedFd::from_raw_fd(master),
            slave: OwnedFd::from_raw_fd(slave),
        }
    };
    for fd in [master, slave] {
        // SAFETY: fcntl on a descriptor this function owns.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    // SAFETY: fcntl on the master descriptor this function owns.
    let flags = unsafe { libc::fcntl(master, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(master, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(pair)
}

pub fn resize(master: RawFd, cols: u32, rows: u32) -> io::Result<()> {
    let size = winsize(cols, rows);
    // SAFETY: TIOCSWINSZ reads a valid winsize.
    if unsafe { libc::ioctl(master, libc::TIOCSWINSZ, &size) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// In a forked child: start a new session and make stdin (the PTY) its controlling terminal.
pub fn become_session_leader_on_stdin() -> io::Result<()> {
    // SAFETY: setsid and ioctl are async-signal-safe and touch no memory of the parent.
    unsafe {
        if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}
