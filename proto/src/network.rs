//! The guest network's vocabulary (issue 14): the host patterns a job may reach (`[network] allow`
//! in a manifest, the operator's policy in the server's config), the address ranges the operator
//! lets through although they are not public (`allow_private`), and the test of whether an
//! address is public.
//!
//! Patterns name hosts by DNS name only. IP literals are refused in patterns: a public address is
//! reached with `*` (any public host), a private one only where the operator's `allow_private`
//! covers it, so a manifest cannot open an address the operator has not.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// The ports a pattern without `:port` allows.
pub const DEFAULT_PORTS: [u16; 2] = [80, 443];

/// Longest DNS name and label, in bytes (RFC 1035).
const NAME_MAX: usize = 253;
const LABEL_MAX: usize = 63;

/// Which hosts a pattern names.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Hosts {
    /// `*`: any host (the address checks still apply).
    Any,
    /// `example.org`: that host alone.
    Exact(String),
    /// `*.example.org`: any host under example.org, not example.org itself.
    Under(String),
}

/// A host pattern of a network allow-list: `example.org`, `*.example.org` or `*`, each with an
/// optional `:port` (without one: ports 80 and 443). Hosts are kept in lower case.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HostPattern {
    hosts: Hosts,
    port: Option<u16>,
}

/// Why a text is not a host pattern; each message says what to write instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostPatternError {
    #[error(
        "the host pattern is empty: write a host like `pypi.org`, `*.example.org` or `example.org:8080`"
    )]
    Empty,
    #[error("`{pattern}` is a URL: write the host alone, like `{host}`")]
    Url { pattern: String, host: String },
    #[error("`{pattern}` has a path: write the host alone, like `{host}`")]
    Path { pattern: String, host: String },
    #[error("`{pattern}`: write `*.{rest}` for the hosts under {rest}, or `{rest}`")]
    GluedWildcard { pattern: String, rest: String },
    #[error(
        "`{pattern}`: `*` is either the whole host (any public host) or the first label, as in `*.example.org`"
    )]
    Wildcard { pattern: String },
    #[error(
        "`{pattern}` has the port `{port}`: write a number from 1 to 65535 after the colon, like `example.org:8080`, or no port for 80 and 443"
    )]
    Port { pattern: String, port: String },
    #[error(
        "`{pattern}` is an IP address: patterns name hosts; `*` allows any public address, and private ones are opened by the operator's `allow_private`"
    )]
    IpLiteral { pattern: String },
    #[error(
        "`{pattern}` is not ASCII: write an internationalized name in punycode (`xn--…`), as `idn2` prints it"
    )]
    NotAscii { pattern: String },
    #[error("`{pattern}` contains `{ch}`: host names have letters, digits, `-` and dots")]
    BadChar { pattern: String, ch: char },
    #[error(
        "`{pattern}` has an empty label: no dot at the start or the end, and no two dots in a row"
    )]
    EmptyLabel { pattern: String },
    #[error("`{pattern}`: the label `{label}` starts or ends with `-`, which DNS names do not")]
    Hyphen { pattern: String, label: String },
    #[error(
        "`{pattern}` is too long: a DNS name has at most {NAME_MAX} characters, a label at most {LABEL_MAX}"
    )]
    TooLong { pattern: String },
    #[error("`{pattern}` ends in a number, so it is no DNS name: name the host instead")]
    NumericEnd { pattern: String },
}

impl HostPattern {
    /// Whether this pattern allows a connection to `host` (a DNS name in any case, a final dot
    /// ignored, or an IP literal, which only `*` matches) on `port`.
    pub fn matches(&self, host: &str, port: u16) -> bool {
        self.allows_port(port)
            && match &self.hosts {
                Hosts::Any => true,
                Hosts::Exact(name) => same_host(host, name),
                Hosts::Under(suffix) => is_under(host, suffix),
            }
    }

    /// Whether everything `other` allows is allowed by `self` (an operator's policy pattern
    /// covering a manifest's): `*` covers all; `*.a.org` covers `x.a.org` and `*.x.a.org`; the
    /// ports `other` allows must be among `self`'s.
    pub fn covers(&self, other: &HostPattern) -> bool {
        let ports = match (self.port, other.port) {
            (None, None) => true,
            (None, Some(port)) => DEFAULT_PORTS.contains(&port),
            (Some(mine), Some(theirs)) => mine == theirs,
            (Some(_), None) => false,
        };
        ports
            && match (&self.hosts, &other.hosts) {
                (Hosts::Any, _) => true,
                (_, Hosts::Any) => false,
                (Hosts::Exact(mine), Hosts::Exact(theirs)) => mine == theirs,
                (Hosts::Exact(_), Hosts::Under(_)) => false,
                (Hosts::Under(suffix), Hosts::Exact(host)) => is_under(host, suffix),
                (Hosts::Under(suffix), Hosts::Under(theirs)) => {
                    suffix == theirs || is_under(theirs, suffix)
                }
            }
    }

    fn allows_port(&self, port: u16) -> bool {
        match self.port {
            Some(only) => only == port,
            None => DEFAULT_PORTS.contains(&port),
        }
    }
}

/// `host` with one final dot removed (`example.org.` is the fully qualified `example.org`).
fn without_final_dot(host: &str) -> &str {
    host.strip_suffix('.').unwrap_or(host)
}

fn same_host(host: &str, name: &str) -> bool {
    without_final_dot(host).eq_ignore_ascii_case(name)
}

/// Whether `host` is strictly under `suffix` (`a.example.org` under `example.org`).
fn is_under(host: &str, suffix: &str) -> bool {
    let host = without_final_dot(host).as_bytes();
    let suffix = suffix.as_bytes();
    host.len() > suffix.len() + 1
        && host[host.len() - suffix.len() - 1] == b'.'
        && host[host.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
}

impl FromStr for HostPattern {
    type Err = HostPatternError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let pattern = || text.to_owned();
        if text.is_empty() {
            return Err(HostPatternError::Empty);
        }
        if let Some((_, rest)) = text.split_once("://") {
            let host = rest.split('/').next().unwrap_or(rest);
            return Err(HostPatternError::Url {
                pattern: pattern(),
                host: host.to_owned(),
            });
        }
        if let Some((host, _)) = text.split_once('/') {
            return Err(HostPatternError::Path {
                pattern: pattern(),
                host: host.to_owned(),
            });
        }
        if text.starts_with('[') || text.parse::<IpAddr>().is_ok() {
            return Err(HostPatternError::IpLiteral { pattern: pattern() });
        }
        let (host, port) = match text.rsplit_once(':') {
            Some((host, port)) => (host, Some(parse_port(text, port)?)),
            None => (text, None),
        };
        if host.parse::<IpAddr>().is_ok() {
            return Err(HostPatternError::IpLiteral { pattern: pattern() });
        }
        let hosts = if host == "*" {
            Hosts::Any
        } else if let Some(suffix) = host.strip_prefix("*.") {
            Hosts::Under(check_dns_name(text, suffix)?)
        } else if let Some(rest) = host.strip_prefix('*')
            && !rest.contains('*')
            && !rest.is_empty()
        {
            return Err(HostPatternError::GluedWildcard {
                pattern: pattern(),
                rest: rest.trim_start_matches('.').to_owned(),
            });
        } else if host.contains('*') {
            return Err(HostPatternError::Wildcard { pattern: pattern() });
        } else {
            Hosts::Exact(check_dns_name(text, host)?)
        };
        Ok(HostPattern { hosts, port })
    }
}

fn parse_port(pattern: &str, port: &str) -> Result<u16, HostPatternError> {
    let bad = || HostPatternError::Port {
        pattern: pattern.to_owned(),
        port: port.to_owned(),
    };
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    match port.parse::<u16>() {
        Ok(0) | Err(_) => Err(bad()),
        Ok(port) => Ok(port),
    }
}

/// Checks that `name` is a DNS name (letters, digits, `-`, dots; ASCII) and returns it in lower
/// case. `pattern` is the whole text, for the messages.
fn check_dns_name(pattern: &str, name: &str) -> Result<String, HostPatternError> {
    let owned = || pattern.to_owned();
    if !name.is_ascii() {
        return Err(HostPatternError::NotAscii { pattern: owned() });
    }
    if let Some(ch) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '.'))
    {
        return Err(HostPatternError::BadChar {
            pattern: owned(),
            ch,
        });
    }
    if name.len() > NAME_MAX {
        return Err(HostPatternError::TooLong { pattern: owned() });
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err(HostPatternError::EmptyLabel { pattern: owned() });
        }
        if label.len() > LABEL_MAX {
            return Err(HostPatternError::TooLong { pattern: owned() });
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(HostPatternError::Hyphen {
                pattern: owned(),
                label: label.to_owned(),
            });
        }
    }
    let last = name.rsplit('.').next().unwrap_or(name);
    if last.bytes().all(|b| b.is_ascii_digit()) {
        return Err(HostPatternError::NumericEnd { pattern: owned() });
    }
    Ok(name.to_ascii_lowercase())
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.hosts {
            Hosts::Any => f.write_str("*")?,
            Hosts::Exact(host) => f.write_str(host)?,
            Hosts::Under(suffix) => write!(f, "*.{suffix}")?,
        }
        match self.port {
            Some(port) => write!(f, ":{port}"),
            None => Ok(()),
        }
    }
}

/// A range of addresses in CIDR form (`127.0.0.0/8`, `fd00::/8`), or one address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AddressRange(ipnet::IpNet);

/// Why a text is not an address range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressRangeError {
    #[error(
        "`{0}` is not an address range: write an address and a prefix length, like `10.0.0.0/8` or `fd00::/8`, or one address"
    )]
    Syntax(String),
    #[error("`{text}` has bits set past its prefix length: write `{network}`")]
    HostBits { text: String, network: String },
}

impl AddressRange {
    /// Whether `ip` is in the range; an IPv4-mapped IPv6 address (`::ffff:10.0.0.1`) counts as
    /// the IPv4 address it carries.
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.contains(&ip) || self.0.contains(&ip.to_canonical())
    }
}

impl FromStr for AddressRange {
    type Err = AddressRangeError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let syntax = || AddressRangeError::Syntax(text.to_owned());
        if !text.contains('/') {
            let ip: IpAddr = text.parse().map_err(|_| syntax())?;
            return Ok(AddressRange(ipnet::IpNet::from(ip)));
        }
        let net: ipnet::IpNet = text.parse().map_err(|_| syntax())?;
        if net.trunc() != net {
            return Err(AddressRangeError::HostBits {
                text: text.to_owned(),
                network: net.trunc().to_string(),
            });
        }
        Ok(AddressRange(net))
    }
}

impl fmt::Display for AddressRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

serde_as_text!(HostPattern);
serde_as_text!(AddressRange);

/// Why `ip` is not a public address (`"loopback"`, `"private"`, …), or `None` when it is one.
/// An IPv4-mapped IPv6 address is judged as the IPv4 address it carries; NAT64 (64:ff9b::/96)
/// and 6to4 (2002::/16) addresses by the IPv4 address they embed.
pub fn non_public(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => non_public_v4(v4),
        IpAddr::V6(v6) => non_public_v6(v6),
    }
}

/// `(network, prefix length, why)`, the more specific first.
const V4_NOT_PUBLIC: &[([u8; 4], u8, &str)] = &[
    ([0, 0, 0, 0], 32, "unspecified"),
    ([255, 255, 255, 255], 32, "broadcast"),
    ([0, 0, 0, 0], 8, "reserved (\"this network\", 0.0.0.0/8)"),
    ([10, 0, 0, 0], 8, "private"),
    (
        [100, 64, 0, 0],
        10,
        "shared (carrier-grade NAT, 100.64.0.0/10)",
    ),
    ([127, 0, 0, 0], 8, "loopback"),
    ([169, 254, 0, 0], 16, "link-local"),
    ([172, 16, 0, 0], 12, "private"),
    (
        [192, 0, 0, 0],
        24,
        "reserved (IETF protocol assignments, 192.0.0.0/24)",
    ),
    ([192, 0, 2, 0], 24, "documentation"),
    (
        [192, 88, 99, 0],
        24,
        "reserved (the former 6to4 relay anycast, 192.88.99.0/24)",
    ),
    ([192, 168, 0, 0], 16, "private"),
    ([198, 18, 0, 0], 15, "benchmarking (198.18.0.0/15)"),
    ([198, 51, 100, 0], 24, "documentation"),
    ([203, 0, 113, 0], 24, "documentation"),
    ([224, 0, 0, 0], 4, "multicast"),
    ([240, 0, 0, 0], 4, "reserved (240.0.0.0/4)"),
];

fn in_v4(ip: Ipv4Addr, net: [u8; 4], prefix: u8) -> bool {
    let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
    u32::from(ip) & mask == u32::from_be_bytes(net) & mask
}

fn non_public_v4(ip: Ipv4Addr) -> Option<&'static str> {
    V4_NOT_PUBLIC
        .iter()
        .find(|(net, prefix, _)| in_v4(ip, *net, *prefix))
        .map(|(_, _, why)| *why)
}

fn in_v6(ip: Ipv6Addr, net: u128, prefix: u8) -> bool {
    let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
    u128::from(ip) & mask == net & mask
}

/// `(network, prefix length, why)` for ranges judged without an embedded IPv4 address.
const V6_NOT_PUBLIC: &[(u128, u8, &str)] = &[
    (
        0x0064_ff9b_0001 << 80,
        48,
        "reserved (local-use NAT64, 64:ff9b:1::/48)",
    ),
    (0x0100 << 112, 64, "reserved (discard-only, 100::/64)"),
    (0x2001_0db8 << 96, 32, "documentation"),
    (0x3fff << 112, 20, "documentation"),
    (
        0x2001 << 112,
        23,
        "reserved (IETF protocol assignments, 2001::/23, e.g. Teredo)",
    ),
    (0xfc00 << 112, 7, "unique-local (fc00::/7)"),
    (0xfe80 << 112, 10, "link-local"),
    (0xfec0 << 112, 10, "site-local (deprecated, fec0::/10)"),
    (0xff00 << 112, 8, "multicast"),
];

fn non_public_v6(ip: Ipv6Addr) -> Option<&'static str> {
    if ip.is_unspecified() {
        return Some("unspecified");
    }
    if ip.is_loopback() {
        return Some("loopback");
    }
    if let Some(v4) = ip.to_ipv4_mapped() {
        return non_public_v4(v4);
    }
    let bits = u128::from(ip);
    if in_v6(ip, 0x0064_ff9b << 96, 96) {
        let v4 = Ipv4Addr::from((bits & 0xffff_ffff) as u32);
        return non_public_v4(v4).map(|_| "the NAT64 form of a non-public IPv4 address");
    }
    if in_v6(ip, 0x2002 << 112, 16) {
        let v4 = Ipv4Addr::from((bits >> 80) as u32);
        return non_public_v4(v4).map(|_| "the 6to4 form of a non-public IPv4 address");
    }
    if let Some((_, _, why)) = V6_NOT_PUBLIC
        .iter()
        .find(|(net, prefix, _)| in_v6(ip, *net, *prefix))
    {
        return Some(why);
    }
    if !in_v6(ip, 0x2000 << 112, 3) {
        return Some("reserved (outside the global unicast range 2000::/3)");
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(text: &str) -> HostPattern {
        text.parse()
            .unwrap_or_else(|e| panic!("{text:?} should parse: {e}"))
    }

    #[test]
    fn test_patterns_parse_and_print_back() {
        for text in [
            "pypi.org",
            "*.crates.io",
            "static.rust-lang.org:443",
            "*",
            "*:8080",
            "*.example.org:8443",
            "localhost",
            "xn--bcher-kva.de",
            "a-b.c0.org",
        ] {
            assert_eq!(pattern(text).to_string(), text);
        }
        assert_eq!(pattern("PyPI.Org").to_string(), "pypi.org");
    }

    #[test]
    fn test_bad_patterns_say_what_to_write() {
        let cases = [
            ("", "write a host like `pypi.org`"),
            (
                "*example.org",
                "write `*.example.org` for the hosts under example.org, or `example.org`",
            ),
            ("foo.*.org", "`*` is either the whole host"),
            ("example.*", "`*` is either the whole host"),
            ("**.org", "`*` is either the whole host"),
            (
                "https://pypi.org/simple",
                "write the host alone, like `pypi.org`",
            ),
            ("pypi.org/simple", "write the host alone, like `pypi.org`"),
            ("pypi.org:", "write a number from 1 to 65535"),
            ("pypi.org:0", "write a number from 1 to 65535"),
            ("pypi.org:65536", "write a number from 1 to 65535"),
            ("pypi.org:+80", "write a number from 1 to 65535"),
            ("10.0.0.1", "is an IP address"),
            ("10.0.0.1:80", "is an IP address"),
            ("[::1]:443", "is an IP address"),
            ("::1", "is an IP address"),
            ("fd00::1", "is an IP address"),
            ("bücher.de", "punycode"),
            ("under_score.org", "contains `_`"),
            ("a b.org", "contains ` `"),
            (".example.org", "empty label"),
            ("example.org.", "empty label"),
            ("a..org", "empty label"),
            ("*.", "empty label"),
            ("-a.org", "starts or ends with `-`"),
            ("a-.org", "starts or ends with `-`"),
            ("1.2.3", "ends in a number"),
            ("127.1", "ends in a number"),
        ];
        for (text, want) in cases {
            let err = text.parse::<HostPattern>().unwrap_err().to_string();
            assert!(err.contains(want), "{text:?}: {err}");
        }
        let long_label = format!("{}.org", "a".repeat(64));
        let long_name = format!("{}org", "abcdefghi.".repeat(26));
        for text in [long_label, long_name] {
            let err = text.parse::<HostPattern>().unwrap_err();
            assert!(matches!(err, HostPatternError::TooLong { .. }), "{err}");
        }
    }

    #[test]
    fn test_matches_hosts_and_ports() {
        let cases: &[(&str, &str, u16, bool)] = &[
            ("pypi.org", "pypi.org", 443, true),
            ("pypi.org", "pypi.org", 80, true),
            ("pypi.org", "PyPI.org.", 443, true),
            ("pypi.org", "pypi.org", 8080, false),
            ("pypi.org", "www.pypi.org", 443, false),
            ("pypi.org", "evilpypi.org", 443, false),
            ("pypi.org:8080", "pypi.org", 8080, true),
            ("pypi.org:8080", "pypi.org", 443, false),
            ("*.crates.io", "static.crates.io", 443, true),
            ("*.crates.io", "a.b.crates.io", 80, true),
            ("*.crates.io", "crates.io", 443, false),
            ("*.crates.io", "evilcrates.io", 443, false),
            ("*.crates.io", "crates.io.evil.org", 443, false),
            ("*.crates.io:8443", "index.crates.io", 8443, true),
            ("*.crates.io:8443", "index.crates.io", 443, false),
            ("*", "anything.example", 443, true),
            ("*", "93.184.216.34", 80, true),
            ("*", "anything.example", 22, false),
            ("*:22", "anything.example", 22, true),
            ("*:22", "anything.example", 443, false),
            ("localhost", "127.0.0.1", 80, false),
        ];
        for &(pat, host, port, want) in cases {
            assert_eq!(
                pattern(pat).matches(host, port),
                want,
                "{pat} matches {host}:{port}"
            );
        }
    }

    #[test]
    fn test_policy_patterns_cover_manifest_patterns() {
        let cases: &[(&str, &str, bool)] = &[
            ("*", "pypi.org", true),
            ("*", "*.crates.io", true),
            ("*", "*", true),
            ("*", "pypi.org:8080", false),
            ("*:8080", "pypi.org:8080", true),
            ("*:8080", "pypi.org", false),
            ("pypi.org", "pypi.org", true),
            ("pypi.org", "pypi.org:443", true),
            ("pypi.org", "pypi.org:80", true),
            ("pypi.org", "pypi.org:8080", false),
            ("pypi.org:443", "pypi.org", false),
            ("pypi.org", "*.pypi.org", false),
            ("pypi.org", "*", false),
            ("*.a.org", "x.a.org", true),
            ("*.a.org", "*.x.a.org", true),
            ("*.a.org", "*.a.org", true),
            ("*.a.org", "a.org", false),
            ("*.a.org", "*.b.org", false),
            ("*.a.org", "*", false),
            ("*.a.org", "xa.org", false),
        ];
        for &(policy, wanted, want) in cases {
            assert_eq!(
                pattern(policy).covers(&pattern(wanted)),
                want,
                "{policy} covers {wanted}"
            );
        }
    }

    #[test]
    fn test_patterns_and_ranges_are_text_in_serde() {
        #[derive(Debug, serde::Deserialize, serde::Serialize)]
        struct Network {
            allow: Vec<HostPattern>,
            allow_private: Vec<AddressRange>,
        }
        let text = "allow = [\"pypi.org\", \"*.crates.io:443\"]\nallow_private = [\"127.0.0.0/8\", \"fd00::/8\"]\n";
        let network: Network = toml::from_str(text).unwrap();
        assert_eq!(toml::to_string(&network).unwrap(), text);
        let err = toml::from_str::<Network>("allow = [\"*example.org\"]\nallow_private = []\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("write `*.example.org`"), "{err}");
    }

    #[test]
    fn test_address_ranges() {
        let range: AddressRange = "127.0.0.0/8".parse().unwrap();
        assert!(range.contains("127.1.2.3".parse().unwrap()));
        assert!(range.contains("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!range.contains("128.0.0.1".parse().unwrap()));
        assert!(!range.contains("::1".parse().unwrap()));
        let v6: AddressRange = "fd00::/8".parse().unwrap();
        assert!(v6.contains("fd12::1".parse().unwrap()));
        assert!(!v6.contains("fe80::1".parse().unwrap()));
        let one: AddressRange = "10.1.2.3".parse().unwrap();
        assert_eq!(one.to_string(), "10.1.2.3/32");
        assert!(one.contains("10.1.2.3".parse().unwrap()));
        assert!(!one.contains("10.1.2.4".parse().unwrap()));

        let err = "10.1.2.3/8"
            .parse::<AddressRange>()
            .unwrap_err()
            .to_string();
        assert!(err.contains("write `10.0.0.0/8`"), "{err}");
        for bad in ["10.0.0.0/33", "example.org", "10.0.0/8", ""] {
            let err = bad.parse::<AddressRange>().unwrap_err().to_string();
            assert!(err.contains("like `10.0.0.0/8`"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn test_non_public_addresses_say_why() {
        let cases: &[(&str, Option<&str>)] = &[
            ("0.0.0.0", Some("unspecified")),
            ("0.1.2.3", Some("this network")),
            ("10.0.0.1", Some("private")),
            ("100.64.0.1", Some("shared")),
            ("100.127.255.255", Some("shared")),
            ("127.0.0.1", Some("loopback")),
            ("127.255.0.1", Some("loopback")),
            ("169.254.169.254", Some("link-local")),
            ("172.16.0.1", Some("private")),
            ("172.31.255.255", Some("private")),
            ("192.0.0.8", Some("IETF protocol assignments")),
            ("192.0.2.1", Some("documentation")),
            ("192.88.99.1", Some("6to4 relay")),
            ("192.168.1.1", Some("private")),
            ("198.18.0.1", Some("benchmarking")),
            ("198.19.255.255", Some("benchmarking")),
            ("198.51.100.7", Some("documentation")),
            ("203.0.113.7", Some("documentation")),
            ("224.0.0.251", Some("multicast")),
            ("239.255.255.250", Some("multicast")),
            ("240.0.0.1", Some("reserved")),
            ("255.255.255.255", Some("broadcast")),
            ("8.8.8.8", None),
            ("100.63.255.255", None),
            ("100.128.0.0", None),
            ("172.15.255.255", None),
            ("172.32.0.0", None),
            ("151.101.0.223", None),
            ("::", Some("unspecified")),
            ("::1", Some("loopback")),
            ("::ffff:127.0.0.1", Some("loopback")),
            ("::ffff:10.1.1.1", Some("private")),
            ("::ffff:8.8.8.8", None),
            ("::10.1.1.1", Some("outside the global unicast range")),
            ("64:ff9b::a00:1", Some("NAT64 form")),
            ("64:ff9b::808:808", None),
            ("64:ff9b:1::1", Some("local-use NAT64")),
            ("100::1", Some("discard-only")),
            ("2001::1", Some("Teredo")),
            ("2001:db8::1", Some("documentation")),
            ("3fff::1", Some("documentation")),
            ("2002:a00:1::1", Some("6to4 form")),
            ("2002:808:808::1", None),
            ("fc00::1", Some("unique-local")),
            ("fd12:3456::1", Some("unique-local")),
            ("fe80::1", Some("link-local")),
            ("fec0::1", Some("site-local")),
            ("ff02::1", Some("multicast")),
            ("4000::1", Some("outside the global unicast range")),
            ("2a04:4e42::223", None),
            ("2606:4700::1111", None),
        ];
        for &(text, want) in cases {
            let ip: IpAddr = text.parse().unwrap();
            match (non_public(ip), want) {
                (None, None) => {}
                (Some(why), Some(want)) => assert!(why.contains(want), "{text}: {why}"),
                (got, want) => panic!("{text}: got {got:?}, want {want:?}"),
            }
        }
    }
}
