//! Ports the worker forwards (SSH "tcpip-forward", RFC 4254 7.1): the agent listens on a
//! loopback port in the guest and hands each connection to it to the worker as a
//! "forwarded-tcpip" channel of the same SSH connection. This is how the guest reaches the
//! worker's network proxy without a network device.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use russh::server::Handle;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// The listeners of one SSH connection, closed when it ends.
#[derive(Default)]
pub struct Forwards {
    listening: HashMap<u16, JoinHandle<()>>,
}

impl Drop for Forwards {
    fn drop(&mut self) {
        for (_, task) in self.listening.drain() {
            task.abort();
        }
    }
}

impl Forwards {
    /// Listens on `address`:`port` (0: any free port) and forwards each connection over
    /// `session`; the port listened on, or `None` when refused: only loopback addresses are
    /// listened on, so that nothing outside the guest reaches the worker this way.
    pub async fn listen(&mut self, address: &str, port: u32, session: Handle) -> Option<u16> {
        let ip = loopback(address)?;
        let port = u16::try_from(port).ok()?;
        let listener = TcpListener::bind(SocketAddr::new(ip, port)).await.ok()?;
        let port = listener.local_addr().ok()?.port();
        let address = address.to_owned();
        let task = tokio::spawn(async move {
            while let Ok((stream, from)) = listener.accept().await {
                let session = session.clone();
                let address = address.clone();
                tokio::spawn(async move {
                    let opened = session
                        .channel_open_forwarded_tcpip(
                            address,
                            u32::from(port),
                            from.ip().to_string(),
                            u32::from(from.port()),
                        )
                        .await;
                    // A refused channel closes the guest's connection: the worker said no.
                    if let Ok(channel) = opened {
                        let mut stream = stream;
                        let mut channel = channel.into_stream();
                        let _ = tokio::io::copy_bidirectional(&mut stream, &mut channel).await;
                    }
                });
            }
        });
        self.listening.insert(port, task);
        Some(port)
    }

    /// Stops listening on `port`; whether it was listened on.
    pub fn cancel(&mut self, port: u32) -> bool {
        let task = u16::try_from(port)
            .ok()
            .and_then(|p| self.listening.remove(&p));
        task.map(|t| t.abort()).is_some()
    }
}

/// The loopback address `address` names (`localhost`, `127.0.0.1`, `::1`, or empty for
/// 127.0.0.1), if it names one.
fn loopback(address: &str) -> Option<IpAddr> {
    match address {
        "" | "localhost" => Some(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        other => other.parse::<IpAddr>().ok().filter(IpAddr::is_loopback),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_only_loopback_addresses_are_listened_on() {
        for (address, ok) in [
            ("", true),
            ("localhost", true),
            ("127.0.0.1", true),
            ("::1", true),
            ("0.0.0.0", false),
            ("10.0.2.15", false),
            ("example.org", false),
        ] {
            assert_eq!(loopback(address).is_some(), ok, "{address}");
        }
    }
}
