//! Which connections a job may make: its allow-list (switchable while the job runs), the
//! operator's private ranges, and the check of every address a name resolves to.

use std::fmt;
use std::net::IpAddr;
use std::sync::{Arc, PoisonError, RwLock};
use vmfarm_proto::network::{AddressRange, HostPattern, non_public};

use super::refusal::Refusal;

/// Where a request goes, as the guest named it: a host name (lower case, no final dot) or an IP
/// literal, and a port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct Target {
    pub(super) host: String,
    /// Set when the host is an IP literal (an IPv4-mapped IPv6 one as its IPv4 address).
    pub(super) ip: Option<IpAddr>,
    pub(super) port: u16,
}

impl Target {
    /// Reads a host as it comes in a URL or a CONNECT line (`[::1]` in brackets).
    pub(super) fn parse(host: &str, port: u16) -> Result<Target, Refusal> {
        let bracketed = host.strip_prefix('[').and_then(|h| h.strip_suffix(']'));
        let literal = match bracketed {
            Some(inner) => Some(inner.parse::<IpAddr>().ok().filter(IpAddr::is_ipv6)),
            None => host
                .parse::<IpAddr>()
                .ok()
                .filter(IpAddr::is_ipv4)
                .map(Some),
        };
        match literal {
            Some(Some(ip)) => {
                let ip = ip.to_canonical();
                return Ok(Target {
                    host: ip.to_string(),
                    ip: Some(ip),
                    port,
                });
            }
            Some(None) => {
                return Err(Refusal::NotAHost {
                    host: host.to_owned(),
                });
            }
            None => {}
        }
        let name = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
        let is_name = !name.is_empty()
            && name.len() <= 253
            && name.split('.').all(|label| {
                !label.is_empty()
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            });
        if !is_name {
            return Err(Refusal::NotAHost {
                host: host.to_owned(),
            });
        }
        Ok(Target {
            host: name,
            ip: None,
            port,
        })
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.ip {
            Some(IpAddr::V6(v6)) => write!(f, "[{v6}]:{}", self.port),
            _ => write!(f, "{}:{}", self.host, self.port),
        }
    }
}

/// A job's network policy.
#[derive(Debug)]
pub(super) struct Policy {
    allow: RwLock<Arc<[HostPattern]>>,
    allow_private: Vec<AddressRange>,
}

impl Policy {
    pub(super) fn new(allow: Vec<HostPattern>, allow_private: Vec<AddressRange>) -> Policy {
        Policy {
            allow: RwLock::new(allow.into()),
            allow_private,
        }
    }

    /// Replaces the allow-list; requests checked from now on see the new one.
    pub(super) fn set_allow(&self, allow: Vec<HostPattern>) {
        *self.allow.write().unwrap_or_else(PoisonError::into_inner) = allow.into();
    }

    /// Whether the allow-list lets a request go to `target`.
    pub(super) fn check(&self, target: &Target) -> Result<(), Refusal> {
        let allow = self
            .allow
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if allow.iter().any(|p| p.matches(&target.host, target.port)) {
            Ok(())
        } else {
            Err(Refusal::not_allowed(target))
        }
    }

    /// The addresses of `target` that may be connected to: public ones, and private ones that an
    /// `allow_private` range covers. None: a refusal naming each address and why.
    pub(super) fn permit(
        &self,
        target: &Target,
        addresses: impl IntoIterator<Item = IpAddr>,
    ) -> Result<Vec<IpAddr>, Refusal> {
        let mut permitted = Vec::new();
        let mut refused = Vec::new();
        for ip in addresses {
            let ip = ip.to_canonical();
            if permitted.contains(&ip) || refused.iter().any(|(r, _)| *r == ip) {
                continue;
            }
            match non_public(ip) {
                Some(why) if !self.allow_private.iter().any(|r| r.contains(ip)) => {
                    refused.push((ip, why));
                }
                _ => permitted.push(ip),
            }
        }
        if permitted.is_empty() {
            return Err(Refusal::not_public(target, &refused));
        }
        Ok(permitted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(allow: &[&str], private: &[&str]) -> Policy {
        Policy::new(
            allow.iter().map(|p| p.parse().unwrap()).collect(),
            private.iter().map(|r| r.parse().unwrap()).collect(),
        )
    }

    #[test]
    fn test_targets_are_normalized() {
        let cases = [
            ("PyPI.org.", "pypi.org", None),
            ("127.0.0.1", "127.0.0.1", Some("127.0.0.1")),
            ("[::1]", "::1", Some("::1")),
            ("[::ffff:10.0.0.1]", "10.0.0.1", Some("10.0.0.1")),
            ("under_score.example", "under_score.example", None),
        ];
        for (host, want_host, want_ip) in cases {
            let target = Target::parse(host, 443).unwrap();
            assert_eq!(target.host, want_host, "{host}");
            assert_eq!(target.ip, want_ip.map(|ip| ip.parse().unwrap()), "{host}");
        }
        assert_eq!(
            Target::parse("[::1]", 443).unwrap().to_string(),
            "[::1]:443"
        );
        for bad in [
            "",
            ".",
            "a..b",
            "a b",
            "[127.0.0.1]",
            "::1",
            "[nope]",
            "bü.de",
        ] {
            let err = Target::parse(bad, 80).unwrap_err();
            assert!(matches!(err, Refusal::NotAHost { .. }), "{bad:?}: {err}");
        }
    }

    #[test]
    fn test_the_allow_list_is_checked_and_switchable() {
        let policy = policy(&["pypi.org"], &[]);
        let pypi = Target::parse("pypi.org", 443).unwrap();
        let mirror = Target::parse("deb.debian.org", 80).unwrap();
        assert!(policy.check(&pypi).is_ok());
        let err = policy.check(&mirror).unwrap_err().to_string();
        assert!(
            err.contains("deb.debian.org:80 is not in this job's network allow-list"),
            "{err}"
        );
        policy.set_allow(vec![
            "pypi.org".parse().unwrap(),
            "deb.debian.org".parse().unwrap(),
        ]);
        assert!(policy.check(&mirror).is_ok());
        policy.set_allow(vec![]);
        assert!(policy.check(&pypi).is_err());
    }

    #[test]
    fn test_private_addresses_need_allow_private() {
        let target = Target::parse("localhost", 80).unwrap();
        let loopback: [IpAddr; 2] = ["::1".parse().unwrap(), "127.0.0.1".parse().unwrap()];
        let err = policy(&["*"], &[])
            .permit(&target, loopback)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("::1 (loopback), 127.0.0.1 (loopback)"),
            "{err}"
        );

        let permitted = policy(&["*"], &["127.0.0.0/8"])
            .permit(&target, loopback)
            .unwrap();
        assert_eq!(permitted, ["127.0.0.1".parse::<IpAddr>().unwrap()]);

        let mixed: [IpAddr; 3] = [
            "10.0.0.1".parse().unwrap(),
            "151.101.0.223".parse().unwrap(),
            "::ffff:151.101.0.223".parse().unwrap(),
        ];
        let permitted = policy(&["*"], &[]).permit(&target, mixed).unwrap();
        assert_eq!(permitted, ["151.101.0.223".parse::<IpAddr>().unwrap()]);

        let metadata = Target::parse("169.254.169.254", 80).unwrap();
        let err = policy(&["*"], &["127.0.0.0/8"])
            .permit(&metadata, metadata.ip)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("169.254.169.254 is not a public address (link-local)"),
            "{err}"
        );
    }
}
