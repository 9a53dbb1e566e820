//! Calls the server makes to the outside (webhooks): they follow no redirect, time out, and
//! never reach a private, loopback, link-local or otherwise non-public address unless the
//! operator allows its range (`[triggers] allow_private`). Names are resolved here and each
//! address is checked before it is connected to, so a DNS answer cannot point a public name at
//! the server's own network.

use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use vmfarm_proto::network::{AddressRange, non_public};

/// Why an outbound call was not made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OutboundError {
    #[error("{ip} is {why}: webhooks may not reach it unless [triggers] allow_private covers it")]
    NotPublic { ip: IpAddr, why: &'static str },
    #[error("`{0}` has no host")]
    NoHost(String),
}

/// The addresses an outbound call may reach.
#[derive(Debug, Clone, Default)]
pub struct Reach {
    allow_private: Arc<Vec<AddressRange>>,
}

impl Reach {
    pub fn new(allow_private: Vec<AddressRange>) -> Reach {
        Reach {
            allow_private: Arc::new(allow_private),
        }
    }

    /// Whether a call may connect to `ip`.
    pub fn check(&self, ip: IpAddr) -> Result<(), OutboundError> {
        match non_public(ip) {
            Some(why) if !self.allow_private.iter().any(|r| r.contains(ip)) => {
                Err(OutboundError::NotPublic { ip, why })
            }
            _ => Ok(()),
        }
    }

    /// Checks a URL whose host is an address (those are not resolved, so not seen by the
    /// resolver); a name is checked when it is resolved.
    pub fn check_url(&self, url: &reqwest::Url) -> Result<(), OutboundError> {
        let host = url
            .host_str()
            .ok_or_else(|| OutboundError::NoHost(url.to_string()))?;
        match host.trim_start_matches('[').trim_end_matches(']').parse() {
            Ok(ip) => self.check(ip),
            Err(_) => Ok(()),
        }
    }

    /// An HTTP client that follows no redirect, gives up after `timeout`, and connects only to
    /// addresses this allows.
    pub fn client(&self, timeout: Duration) -> reqwest::Result<reqwest::Client> {
        reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(timeout)
            .connect_timeout(timeout)
            .dns_resolver(Arc::new(self.clone()))
            .build()
    }
}

impl Resolve for Reach {
    fn resolve(&self, name: Name) -> Resolving {
        let reach = self.clone();
        Box::pin(async move {
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((name.as_str(), 0)).await?.collect();
            let mut refused = None;
            let allowed: Vec<SocketAddr> = found
                .into_iter()
                .filter(|addr| match reach.check(addr.ip()) {
                    Ok(()) => true,
                    Err(e) => {
                        refused = Some(e);
                        false
                    }
                })
                .collect();
            match (allowed.is_empty(), refused) {
                (true, Some(e)) => Err(e.into()),
                _ => Ok(Box::new(allowed.into_iter()) as Addrs),
            }
        })
    }
}
