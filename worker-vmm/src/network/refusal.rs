//! Why the proxy answered a request itself instead of reaching its target. Each refusal has its
//! HTTP status; its message is both the answer's body and the line in the job's farm log, and it
//! says what to change.

use hyper::StatusCode;
use std::net::IpAddr;
use std::time::Duration;
use vmfarm_proto::units::{ByteSize, format_duration};

use super::policy::Target;

#[derive(Debug, thiserror::Error)]
pub(super) enum Refusal {
    #[error(
        "vmfarm: this is the job's network proxy, not a web server: ask it for absolute URLs (`GET http://host/path`) or `CONNECT host:port`, as http_proxy and https_proxy make clients do"
    )]
    NotAProxyRequest,
    #[error(
        "vmfarm: `{method} {authority}`: only CONNECT takes a host:port target; ask for `http://{authority}/...` or `CONNECT {authority}`"
    )]
    AuthorityNotConnect { method: String, authority: String },
    #[error("vmfarm: CONNECT needs a host and a port, like `CONNECT pypi.org:443`; got `{target}`")]
    ConnectTarget { target: String },
    #[error(
        "vmfarm: the proxy forwards http:// URLs itself; for {scheme}:// ask it to CONNECT (https_proxy does)"
    )]
    Scheme { scheme: String },
    #[error("vmfarm: `{host}` is not a host name")]
    NotAHost { host: String },
    #[error(
        "vmfarm: {target} is not in this job's network allow-list; add {suggestion} to [network] allow in the manifest"
    )]
    NotAllowed { target: Target, suggestion: String },
    #[error(
        "vmfarm: {target}: {addresses}; the worker connects only to public addresses unless the operator's [network] allow_private covers them"
    )]
    NotPublic { target: Target, addresses: String },
    #[error("vmfarm: cannot resolve {host}: {error}")]
    Resolve { host: String, error: String },
    #[error("vmfarm: cannot connect to {target} ({address}): {error}")]
    Connect {
        target: Target,
        address: IpAddr,
        error: std::io::Error,
    },
    #[error(
        "vmfarm: connecting to {target} took longer than {} (network.connect_timeout in the worker's config)",
        format_duration(*after)
    )]
    ConnectTimeout { target: Target, after: Duration },
    #[error("vmfarm: {target} did not answer: {error}")]
    Upstream { target: Target, error: hyper::Error },
    #[error(
        "vmfarm: this job has used its network byte limit of {max} through the worker's proxy (network.max_bytes_per_job in the worker's config); it gets no more connections"
    )]
    ByteLimit { max: ByteSize },
    #[error(
        "vmfarm: this job already has {max} connections open through the worker's proxy, the most it may have at once (network.max_connections_per_job in the worker's config)"
    )]
    TooManyConnections { max: usize },
}

impl Refusal {
    pub(super) fn status(&self) -> StatusCode {
        match self {
            Refusal::NotAProxyRequest
            | Refusal::AuthorityNotConnect { .. }
            | Refusal::ConnectTarget { .. }
            | Refusal::Scheme { .. }
            | Refusal::NotAHost { .. } => StatusCode::BAD_REQUEST,
            Refusal::NotAllowed { .. } | Refusal::NotPublic { .. } | Refusal::ByteLimit { .. } => {
                StatusCode::FORBIDDEN
            }
            Refusal::Resolve { .. } | Refusal::Connect { .. } | Refusal::Upstream { .. } => {
                StatusCode::BAD_GATEWAY
            }
            Refusal::ConnectTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            Refusal::TooManyConnections { .. } => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// `target` is outside the allow-list; the message says which pattern to add.
    pub(super) fn not_allowed(target: &Target) -> Refusal {
        let suggestion = if target.ip.is_some() {
            let any = if vmfarm_proto::network::DEFAULT_PORTS.contains(&target.port) {
                "*".to_owned()
            } else {
                format!("*:{}", target.port)
            };
            format!("\"{any}\" (any public host), or name the host instead of its address")
        } else if vmfarm_proto::network::DEFAULT_PORTS.contains(&target.port) {
            format!("\"{}\"", target.host)
        } else {
            format!("\"{target}\"")
        };
        Refusal::NotAllowed {
            target: target.clone(),
            suggestion,
        }
    }

    /// None of `target`'s addresses may be reached; `refused` says why for each.
    pub(super) fn not_public(target: &Target, refused: &[(IpAddr, &'static str)]) -> Refusal {
        let addresses = match (target.ip, refused) {
            (Some(ip), [(_, why)]) => format!("{ip} is not a public address ({why})"),
            _ => {
                let each: Vec<String> = refused
                    .iter()
                    .map(|(ip, why)| format!("{ip} ({why})"))
                    .collect();
                format!(
                    "{} resolves to {}, no public address",
                    target.host,
                    each.join(", ")
                )
            }
        };
        Refusal::NotPublic {
            target: target.clone(),
            addresses,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_not_allowed_says_which_pattern_to_add() {
        let cases = [
            ("example.org", 443, "add \"example.org\" to [network] allow"),
            ("example.org", 80, "add \"example.org\" to [network] allow"),
            (
                "example.org",
                8080,
                "add \"example.org:8080\" to [network] allow",
            ),
            ("93.184.216.34", 443, "add \"*\" (any public host)"),
            ("93.184.216.34", 8080, "add \"*:8080\" (any public host)"),
        ];
        for (host, port, want) in cases {
            let target = Target::parse(host, port).unwrap();
            let refusal = Refusal::not_allowed(&target);
            let message = refusal.to_string();
            assert!(
                message.starts_with(&format!(
                    "vmfarm: {host}:{port} is not in this job's network allow-list"
                )),
                "{message}"
            );
            assert!(message.contains(want), "{message}");
            assert_eq!(refusal.status(), StatusCode::FORBIDDEN);
        }
    }

    #[test]
    fn test_not_public_names_each_address_and_why() {
        let name = Target::parse("localhost", 80).unwrap();
        let message = Refusal::not_public(
            &name,
            &[
                ("::1".parse().unwrap(), "loopback"),
                ("127.0.0.1".parse().unwrap(), "loopback"),
            ],
        )
        .to_string();
        assert!(
            message.starts_with(
                "vmfarm: localhost:80: localhost resolves to ::1 (loopback), 127.0.0.1 (loopback), no public address; "
            ),
            "{message}"
        );
        assert!(message.contains("allow_private"), "{message}");

        let literal = Target::parse("[fd00::1]", 443).unwrap();
        let message =
            Refusal::not_public(&literal, &[("fd00::1".parse().unwrap(), "unique-local")])
                .to_string();
        assert!(
            message.starts_with(
                "vmfarm: [fd00::1]:443: fd00::1 is not a public address (unique-local); "
            ),
            "{message}"
        );
    }
}
