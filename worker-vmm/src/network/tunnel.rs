//! CONNECT: the proxy connects to the target, answers 200, and from then on copies bytes both
//! ways. TLS passes through untouched (nothing is intercepted, nothing cached).

use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use std::io;
use tokio::net::TcpStream;

use super::body::{self, ProxyBody};
use super::connect::connect;
use super::connection::Connection;
use super::limits::{Gated, TUNNEL_BUFFER};
use super::policy::Target;
use super::refusal::Refusal;

/// A tunnel whose 200 is on its way: the guest's side comes when hyper hands the connection
/// over, after the answer is written.
pub(super) struct PendingTunnel {
    upgrade: OnUpgrade,
    origin: Gated<TcpStream>,
}

/// Answers `CONNECT target`, which the allow-list has let through.
pub(super) async fn open(
    conn: &Connection,
    target: Target,
    mut request: Request<Incoming>,
) -> Result<Response<ProxyBody>, Refusal> {
    let job = &conn.job;
    let origin = connect(&job.policy, &target, job.limits.connect_timeout).await?;
    let tunnel = PendingTunnel {
        upgrade: hyper::upgrade::on(&mut request),
        origin: Gated::new(origin, conn.traffic.clone()),
    };
    conn.set_tunnel(&target, tunnel);
    Ok(Response::new(body::empty()))
}

impl PendingTunnel {
    /// Copies bytes both ways until both sides have closed, or one fails.
    pub(super) async fn run(self) -> io::Result<()> {
        let upgraded = self.upgrade.await.map_err(io::Error::other)?;
        let mut guest = TokioIo::new(upgraded);
        let mut origin = self.origin;
        tokio::io::copy_bidirectional_with_sizes(
            &mut guest,
            &mut origin,
            TUNNEL_BUFFER,
            TUNNEL_BUFFER,
        )
        .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_utils::{Job, MIB, echo_server, limits, pattern};
    use hyper::StatusCode;
    use std::time::{Duration, Instant};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const LOOPBACK: &str = "127.0.0.0/8";

    #[tokio::test]
    async fn test_connect_tunnels_bytes_both_ways() {
        let echo = echo_server().await;
        let target = format!("localhost:{}", echo.port());
        let job = Job::new(&[&target], &[LOOPBACK]).await;
        let mut tunnel = job.tunnel(&target).await.unwrap();
        tunnel.write_all(b"ping").await.unwrap();
        let mut pong = [0; 4];
        tunnel.read_exact(&mut pong).await.unwrap();
        assert_eq!(&pong, b"ping");

        let sent: Vec<u8> = pattern(MIB).flat_map(|c| c.to_vec()).collect();
        let (mut read, mut write) = tokio::io::split(tunnel);
        let writer = async {
            write.write_all(&sent).await.unwrap();
            write.shutdown().await.unwrap();
        };
        let reader = async {
            let mut got = Vec::new();
            read.read_to_end(&mut got).await.unwrap();
            got
        };
        let ((), got) = tokio::join!(writer, reader);
        assert!(
            got == sent,
            "{} bytes came back of {}",
            got.len(),
            sent.len()
        );

        let line = job.log.wait_for(&format!("network {target}: tunnel")).await;
        assert!(
            line.contains("the guest sent 1.0 MiB, received 1.0 MiB in "),
            "{line}"
        );
    }

    #[tokio::test]
    async fn test_connect_outside_the_allow_list_is_refused() {
        let job = Job::new(&["pypi.org"], &[]).await;
        let answer = job.tunnel("example.org:443").await.unwrap_err();
        assert_eq!(answer.status, StatusCode::FORBIDDEN);
        let want = "vmfarm: example.org:443 is not in this job's network allow-list; add \"example.org\" to [network] allow in the manifest";
        assert_eq!(answer.text().trim_end(), want);
        assert_eq!(job.log.lines(), [want]);
    }

    #[tokio::test]
    async fn test_connect_to_a_closed_port_is_a_502() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let job = Job::new(&[&format!("localhost:{port}")], &[LOOPBACK]).await;
        let answer = job.tunnel(&format!("localhost:{port}")).await.unwrap_err();
        assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
        let want = format!("vmfarm: cannot connect to localhost:{port} (127.0.0.1): ");
        assert!(answer.text().starts_with(&want), "{}", answer.text());
        job.log.wait_for(&want).await;
    }

    #[tokio::test]
    async fn test_connect_gives_up_after_the_connect_timeout() {
        // A listener that never accepts, its queue full: further connections hang in SYN.
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(1).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut queued = Vec::new();
        while let Ok(Ok(stream)) = tokio::time::timeout(
            Duration::from_millis(300),
            tokio::net::TcpStream::connect(addr),
        )
        .await
        {
            queued.push(stream);
            assert!(queued.len() < 64, "the listen queue never filled");
        }
        let mut limits = limits();
        limits.connect_timeout = Duration::from_secs(1);
        let target = format!("localhost:{}", addr.port());
        let job = Job::with(&[&target], &[LOOPBACK], limits, 0).await;
        let start = Instant::now();
        let answer = job.tunnel(&target).await.unwrap_err();
        assert_eq!(answer.status, StatusCode::GATEWAY_TIMEOUT);
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{:?}",
            start.elapsed()
        );
        assert!(
            answer.text().contains(&format!(
                "connecting to {target} took longer than 1s (network.connect_timeout"
            )),
            "{}",
            answer.text()
        );
    }

    #[tokio::test]
    async fn test_a_quiet_tunnel_is_closed_after_the_idle_timeout() {
        let echo = echo_server().await;
        let target = format!("localhost:{}", echo.port());
        let mut limits = limits();
        limits.idle_timeout = Duration::from_secs(1);
        let job = Job::with(&[&target], &[LOOPBACK], limits, 0).await;
        let mut tunnel = job.tunnel(&target).await.unwrap();
        tunnel.write_all(b"ping").await.unwrap();
        let mut pong = [0; 4];
        tunnel.read_exact(&mut pong).await.unwrap();
        let quiet = Instant::now();
        let mut rest = Vec::new();
        tunnel.read_to_end(&mut rest).await.unwrap();
        let waited = quiet.elapsed();
        assert!(
            waited >= Duration::from_millis(900) && waited < Duration::from_secs(10),
            "{waited:?}"
        );
        let line = job.log.wait_for(&format!("network {target}: tunnel")).await;
        assert!(
            line.ends_with(
                "; closed after 1s without traffic (network.idle_timeout in the worker's config)"
            ),
            "{line}"
        );
    }

    #[tokio::test]
    async fn test_the_byte_limit_cuts_a_tunnel_and_refuses_more() {
        let echo = echo_server().await;
        let target = format!("localhost:{}", echo.port());
        let mut limits = limits();
        limits.max_bytes = 256 * 1024;
        let job = Job::with(&[&target], &[LOOPBACK], limits, 0).await;
        let tunnel = job.tunnel(&target).await.unwrap();
        let (mut read, mut write) = tokio::io::split(tunnel);
        let sent: Vec<u8> = pattern(4 * MIB).flat_map(|c| c.to_vec()).collect();
        let writer = async {
            // Fails once the tunnel is cut.
            let _ = write.write_all(&sent).await;
        };
        let reader = async {
            let mut got = Vec::new();
            let _ = read.read_to_end(&mut got).await;
            got.len()
        };
        let ((), got) = tokio::join!(writer, reader);
        assert!(got < MIB, "{got} bytes came back");
        let line = job.log.wait_for(&format!("network {target}: tunnel")).await;
        assert!(
            line.ends_with("; cut at the job's network byte limit of 256KiB (network.max_bytes_per_job in the worker's config)"),
            "{line}"
        );

        let answer = job.tunnel(&target).await.unwrap_err();
        assert_eq!(answer.status, StatusCode::FORBIDDEN);
        assert!(
            answer
                .text()
                .starts_with("vmfarm: this job has used its network byte limit of 256KiB"),
            "{}",
            answer.text()
        );
    }
}
