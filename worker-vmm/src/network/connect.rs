//! Reaching a target: the name is resolved on the worker, every address is checked by the
//! policy, and the connection goes to a checked address itself (no second resolution, so a DNS
//! answer cannot rebind a public name to 10.x or 169.254.169.254 between check and use).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;
use tokio::net::TcpStream;

use super::policy::{Policy, Target};
use super::refusal::Refusal;

/// Resolves, checks and connects to `target`, all within `timeout`.
pub(super) async fn connect(
    policy: &Policy,
    target: &Target,
    timeout: Duration,
) -> Result<TcpStream, Refusal> {
    match tokio::time::timeout(timeout, resolve_and_connect(policy, target)).await {
        Ok(result) => result,
        Err(_) => Err(Refusal::ConnectTimeout {
            target: target.clone(),
            after: timeout,
        }),
    }
}

async fn resolve_and_connect(policy: &Policy, target: &Target) -> Result<TcpStream, Refusal> {
    let addresses: Vec<IpAddr> = match target.ip {
        Some(ip) => vec![ip],
        None => tokio::net::lookup_host((target.host.as_str(), target.port))
            .await
            .map_err(|e| Refusal::Resolve {
                host: target.host.clone(),
                error: e.to_string(),
            })?
            .map(|address| address.ip())
            .collect(),
    };
    if addresses.is_empty() {
        return Err(Refusal::Resolve {
            host: target.host.clone(),
            error: "no address".into(),
        });
    }
    let mut failure = None;
    for ip in policy.permit(target, addresses)? {
        match TcpStream::connect(SocketAddr::new(ip, target.port)).await {
            Ok(stream) => {
                if let Err(e) = stream.set_nodelay(true) {
                    tracing::debug!(%target, error = %e, "TCP_NODELAY not set");
                }
                return Ok(stream);
            }
            Err(error) => failure = Some((ip, error)),
        }
    }
    let (address, error) = failure.expect("permit returns at least one address");
    Err(Refusal::Connect {
        target: target.clone(),
        address,
        error,
    })
}
