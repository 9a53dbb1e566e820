//! The host channel the SSH server listens on: a virtio-serial port or an AF_VSOCK socket,
//! both driven as non-blocking file descriptors under tokio.

use std::io;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A byte stream over a non-blocking descriptor (a serial port or a connected socket).
pub struct FdStream {
    fd: AsyncFd<OwnedFd>,
}

impl FdStream {
    /// Wraps `fd`, which must be in non-blocking mode.
    pub fn new(fd: OwnedFd) -> io::Result<Self> {
        Ok(FdStream { fd: register(fd)? })
    }
}

fn register(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: an OwnedFd keeps its descriptor open, and returns the same one from as_raw_fd, for
    // as long as it lives; the AsyncFd owns it.
    unsafe { AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)
}

fn cvt(ret: isize) -> io::Result<usize> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}

impl AsyncRead for FdStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            let result = guard.try_io(|fd| {
                // SAFETY: the pointer and length describe the initialised, unfilled part of `buf`.
                cvt(unsafe {
                    libc::read(fd.as_raw_fd(), unfilled.as_mut_ptr().cast(), unfilled.len())
                })
            });
            match result {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for FdStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.fd.poll_write_ready(cx))?;
            let result = guard.try_io(|fd| {
                // SAFETY: the pointer and length describe `data`.
                cvt(unsafe { libc::write(fd.as_raw_fd(), data.as_ptr().cast(), data.len()) })
            });
            match result {
                Ok(r) => return Poll::Ready(r),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

fn owned(fd: RawFd) -> io::Result<OwnedFd> {
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by the kernel to this process and is owned by no one else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Finds the /dev node of the virtio-serial port named `name`, waiting up to `limit` for it.
pub fn find_vport(name: &str, limit: Duration) -> io::Result<PathBuf> {
    let start = Instant::now();
    loop {
        if let Some(found) = lookup_vport(Path::new("/sys/class/virtio-ports"), name)? {
            let dev = Path::new("/dev").join(found);
            if dev.exists() {
                return Ok(dev);
            }
        }
        if start.elapsed() > limit {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no virtio-serial port named {name:?} appeared within {limit:?}"),
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The entry under `class_dir` (e.g. `vport0p1`) whose `name` file holds `name`.
fn lookup_vport(class_dir: &Path, name: &str) -> io::Result<Option<String>> {
    let entries = match std::fs::read_dir(class_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let Ok(text) = std::fs::read_to_string(entry.path().join("name")) else {
            continue;
        };
        if text.trim_end() == name {
            return Ok(entry.file_name().to_str().map(str::to_owned));
        }
    }
    Ok(None)
}

/// An open virtio-serial port: one host connection at a time.
///
/// A virtio-serial port is one byte stream across host connections. When the host drops a
/// connection and opens the next one quickly, the guest may not see the hang-up in between:
/// the old session then reads the new client's first bytes. Every SSH client starts with
/// `SSH-2.0-`, so a read that starts with it after a session's first read marks a new
/// connection: the old session gets end-of-file and the bytes go to the next session.
pub struct Vport {
    fd: OwnedFd,
    handoff: Arc<Mutex<Option<Vec<u8>>>>,
}

const SSH_BANNER: &[u8] = b"SSH-2.0-";

impl Vport {
    pub fn open(path: &Path) -> io::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt as _;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)?;
        Ok(Vport {
            fd: file.into(),
            handoff: Arc::default(),
        })
    }

    /// Waits until the host side is connected (the port stops reporting POLLHUP), unless the
    /// last session already saw the next client, then returns a stream for one session.
    pub async fn next_session(&self) -> io::Result<SessionStream> {
        let prefix = self
            .handoff
            .lock()
            .map_err(|_| io::Error::other("poisoned"))?
            .take();
        if prefix.is_none() {
            self.wait_for_host().await?;
        }
        Ok(SessionStream {
            inner: FdStream::new(self.fd.try_clone()?)?,
            prefix: prefix.unwrap_or_default(),
            started: false,
            ended: false,
            handoff: self.handoff.clone(),
        })
    }

    async fn wait_for_host(&self) -> io::Result<()> {
        loop {
            let mut pfd = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd, zero timeout.
            let n = unsafe { libc::poll(&mut pfd, 1, 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            if pfd.revents & libc::POLLHUP == 0 {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// One SSH session's view of a virtio-serial port (see [`Vport`]).
pub struct SessionStream {
    inner: FdStream,
    /// Bytes read from the port (or by the previous session) not yet handed out.
    prefix: Vec<u8>,
    started: bool,
    ended: bool,
    handoff: Arc<Mutex<Option<Vec<u8>>>>,
}

impl AsyncRead for SessionStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.ended {
            return Poll::Ready(Ok(()));
        }
        if this.prefix.is_empty() {
            // Read whole chunks, whatever the caller asks for, so that a new client's banner
            // is seen at the start of one.
            let mut chunk = vec![0u8; 64 * 1024];
            let mut chunk_buf = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut chunk_buf))?;
            let got = chunk_buf.filled();
            if got.is_empty() {
                return Poll::Ready(Ok(()));
            }
            let banner_len = got.len().min(SSH_BANNER.len());
            if this.started && banner_len >= 4 && got[..banner_len] == SSH_BANNER[..banner_len] {
                this.ended = true;
                if let Ok(mut slot) = this.handoff.lock() {
                    *slot = Some(got.to_vec());
                }
                return Poll::Ready(Ok(()));
            }
            this.prefix = got.to_vec();
        }
        let n = this.prefix.len().min(buf.remaining());
        buf.put_slice(&this.prefix[..n]);
        this.prefix.drain(..n);
        this.started = true;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for SessionStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.ended {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// A listening AF_VSOCK stream socket.
pub struct VsockListener {
    fd: AsyncFd<OwnedFd>,
}

impl VsockListener {
    pub fn bind(port: u32) -> io::Result<Self> {
        // SAFETY: socket(2) with constant arguments.
        let fd = owned(unsafe {
            libc::socket(
                libc::AF_VSOCK,
                libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
            )
        })?;
        // SAFETY: an all-zero sockaddr_vm is a valid value; the fields are set below.
        let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
        addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
        addr.svm_port = port;
        addr.svm_cid = libc::VMADDR_CID_ANY;
        let len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
        // SAFETY: `addr` is a valid sockaddr_vm of `len` bytes.
        if unsafe { libc::bind(fd.as_raw_fd(), (&raw const addr).cast(), len) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: listen(2) on a socket this process owns.
        if unsafe { libc::listen(fd.as_raw_fd(), 16) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(VsockListener { fd: register(fd)? })
    }

    pub async fn accept(&self) -> io::Result<FdStream> {
        loop {
            let mut guard = self.fd.readable().await?;
            let result = guard.try_io(|fd| {
                // SAFETY: accept4 with null address pointers is allowed.
                owned(unsafe {
                    libc::accept4(
                        fd.as_raw_fd(),
                        std::ptr::null_mut(),
                        std::ptr::null_mut(),
                        libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                    )
                })
            });
            if let Ok(conn) = result {
                return FdStream::new(conn?);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_lookup_vport_by_name() {
        let dir = std::env::temp_dir().join(format!("vmfarm-agent-vports-{}", std::process::id()));
        for (port, name) in [
            ("vport0p0", ""),
            ("vport0p1", "org.vmfarm.ssh\n"),
            ("vport0p2", "other\n"),
        ] {
            std::fs::create_dir_all(dir.join(port)).unwrap();
            std::fs::write(dir.join(port).join("name"), name).unwrap();
        }
        assert_eq!(
            lookup_vport(&dir, "org.vmfarm.ssh").unwrap().as_deref(),
            Some("vport0p1")
        );
        assert_eq!(lookup_vport(&dir, "missing").unwrap(), None);
        assert_eq!(
            lookup_vport(&dir.join("nothing"), "org.vmfarm.ssh").unwrap(),
            None
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn socket_pair() -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: socketpair writes two descriptors into `fds`.
        let ret = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_STREAM | libc::SOCK_NONBLOCK,
                0,
                fds.as_mut_ptr(),
            )
        };
        assert_eq!(ret, 0);
        (owned(fds[0]).unwrap(), owned(fds[1]).unwrap())
    }

    #[tokio::test]
    async fn test_a_new_clients_banner_ends_the_old_session_and_starts_the_next() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let (guest, host) = socket_pair();
        let port = Vport {
            fd: guest,
            handoff: Arc::default(),
        };
        let mut host = FdStream::new(host).unwrap();
        let mut first = port.next_session().await.unwrap();
        host.write_all(b"SSH-2.0-one\r\n").await.unwrap();
        let mut buf = [0u8; 64];
        let n = first.read(&mut buf[..4]).await.unwrap();
        assert_eq!(&buf[..n], b"SSH-");
        let n = first.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"2.0-one\r\n");
        host.write_all(b"SSH-2.0-two\r\n").await.unwrap();
        assert_eq!(
            first.read(&mut buf[..4]).await.unwrap(),
            0,
            "the old session ends"
        );
        assert!(first.write_all(b"late").await.is_err());
        let mut second = port.next_session().await.unwrap();
        let n = second.read(&mut buf).await.unwrap();
        assert_eq!(
            &buf[..n],
            b"SSH-2.0-two\r\n",
            "the next session gets the new client's banner"
        );
    }

    #[tokio::test]
    async fn test_fd_stream_round_trip_over_a_socket_pair() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let (a, b) = socket_pair();
        let mut a = FdStream::new(a).unwrap();
        let mut b = FdStream::new(b).unwrap();
        let data = vec![7u8; 300_000];
        let writer = tokio::spawn(async move {
            a.write_all(&data).await.unwrap();
        });
        let mut got = vec![0u8; 300_000];
        b.read_exact(&mut got).await.unwrap();
        writer.await.unwrap();
        assert!(got.iter().all(|&x| x == 7));
    }
}
