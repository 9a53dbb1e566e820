//! Forge webhooks: what GitHub, GitLab and Forgejo (and Gitea) send, and how each signs it.
//!
//! | forge   | event header                          | delivery id                               | signature |
//! |---------|---------------------------------------|-------------------------------------------|-----------|
//! | GitHub  | `X-GitHub-Event`                      | `X-GitHub-Delivery`                       | `X-Hub-Signature-256: sha256=HEX`, HMAC-SHA256 of the body |
//! | GitLab  | `X-Gitlab-Event`                      | `Idempotency-Key`, else `X-Gitlab-Event-UUID` | `X-Gitlab-Token`: the secret itself |
//! | Forgejo | `X-Forgejo-Event` / `X-Gitea-Event`   | `X-Forgejo-Delivery` / `X-Gitea-Delivery` | `X-Forgejo-Signature` / `X-Gitea-Signature: HEX`, HMAC-SHA256 of the body |
//!
//! The repository a payload names picks the secret, so the payload is read before it is
//! verified; nothing in it is acted on until [`verify`] accepts it. Every comparison is in
//! constant time.

use crate::config::Forge;
use axum::http::HeaderMap;
use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// What a delivery asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The forge checks the hook (GitHub's `ping`).
    Ping,
    /// A branch or tag moved.
    Push { git_ref: String, after: String },
    /// A pull (merge) request was opened, updated or reopened: its head, as a ref of the
    /// repository (`refs/pull/N/head`, GitLab's `refs/merge-requests/N/head`).
    PullRequest { git_ref: String, head: String },
    /// Anything else: the event's name and action, not built.
    Other(String),
}

/// One webhook call, read but not yet verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// The repository as the forge names it.
    pub repository: String,
    pub event: Event,
    /// The forge's id of this delivery (the same on a redelivery).
    pub id: String,
}

/// Why a call is refused: `Unsigned` and `BadSignature` answer 401, `Malformed` 400.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HookError {
    #[error("{0}")]
    Malformed(String),
    #[error("the {0} header is missing: set the webhook's secret on the forge")]
    Unsigned(&'static str),
    #[error("the {0} header does not match the repository's webhook secret")]
    BadSignature(&'static str),
}

fn header<'a>(headers: &'a HeaderMap, names: &[&str]) -> Option<&'a str> {
    names
        .iter()
        .find_map(|name| headers.get(*name)?.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
}

fn text<'a>(payload: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter().try_fold(payload, |v, key| v.get(key))?.as_str()
}

fn number(payload: &Value, path: &[&str]) -> Option<u64> {
    path.iter().try_fold(payload, |v, key| v.get(key))?.as_u64()
}

/// Reads a delivery of `forge` from its headers and JSON body.
pub fn read(forge: Forge, headers: &HeaderMap, body: &[u8]) -> Result<Delivery, HookError> {
    let malformed = HookError::Malformed;
    let payload: Value = serde_json::from_slice(body)
        .map_err(|e| malformed(format!("the body is not JSON: {e}")))?;
    let (event_headers, delivery_headers): (&[&str], &[&str]) = match forge {
        Forge::Github => (&["x-github-event"], &["x-github-delivery"]),
        Forge::Gitlab => (
            &["x-gitlab-event"],
            &["idempotency-key", "x-gitlab-event-uuid"],
        ),
        Forge::Forgejo => (
            &["x-forgejo-event", "x-gitea-event"],
            &["x-forgejo-delivery", "x-gitea-delivery"],
        ),
    };
    let event_name = header(headers, event_headers)
        .ok_or_else(|| malformed(format!("the {} header is missing", event_headers[0])))?;
    let id = header(headers, delivery_headers)
        .ok_or_else(|| malformed(format!("the {} header is missing", delivery_headers[0])))?;
    if id.len() > 128 {
        return Err(malformed(format!(
            "the {} header is longer than 128 characters",
            delivery_headers[0]
        )));
    }
    let repository_path: &[&str] = match forge {
        Forge::Gitlab => &["project", "path_with_namespace"],
        Forge::Github | Forge::Forgejo => &["repository", "full_name"],
    };
    let repository = text(&payload, repository_path)
        .ok_or_else(|| malformed(format!("the payload has no {}", repository_path.join("."))))?
        .to_owned();
    let field = |path: &[&str]| {
        text(&payload, path).map(str::to_owned).ok_or_else(|| {
            malformed(format!(
                "the {event_name} payload has no {}",
                path.join(".")
            ))
        })
    };
    let event = match (forge, event_name) {
        (Forge::Github, "ping") => Event::Ping,
        (Forge::Github | Forge::Forgejo, "push")
        | (Forge::Gitlab, "Push Hook" | "Tag Push Hook") => Event::Push {
            git_ref: field(&["ref"])?,
            after: field(&["after"])?,
        },
        (Forge::Github | Forge::Forgejo, "pull_request") => {
            let action = field(&["action"])?;
            if ["opened", "synchronize", "synchronized", "reopened"].contains(&action.as_str()) {
                let n = number(&payload, &["number"])
                    .ok_or_else(|| malformed("the pull_request payload has no number".into()))?;
                Event::PullRequest {
                    git_ref: format!("refs/pull/{n}/head"),
                    head: field(&["pull_request", "head", "sha"])?,
                }
            } else {
                Event::Other(format!("pull_request {action}"))
            }
        }
        (Forge::Gitlab, "Merge Request Hook") => {
            let action = field(&["object_attributes", "action"])?;
            if ["open", "update", "reopen"].contains(&action.as_str()) {
                let n = number(&payload, &["object_attributes", "iid"]).ok_or_else(|| {
                    malformed("the merge request payload has no object_attributes.iid".into())
                })?;
                Event::PullRequest {
                    git_ref: format!("refs/merge-requests/{n}/head"),
                    head: field(&["object_attributes", "last_commit", "id"])?,
                }
            } else {
                Event::Other(format!("merge request {action}"))
            }
        }
        (_, other) => Event::Other(other.to_owned()),
    };
    Ok(Delivery {
        repository,
        event,
        id: id.to_owned(),
    })
}

/// Accepts a call whose signature (or token) is the repository's `secret`'s.
pub fn verify(
    forge: Forge,
    headers: &HeaderMap,
    body: &[u8],
    secret: &str,
) -> Result<(), HookError> {
    match forge {
        Forge::Gitlab => {
            const NAME: &str = "X-Gitlab-Token";
            let token = header(headers, &["x-gitlab-token"]).ok_or(HookError::Unsigned(NAME))?;
            // Digests first, so that the comparison does not tell the secret's length.
            let given = Sha256::digest(token.as_bytes());
            let wanted = Sha256::digest(secret.as_bytes());
            if bool::from(given.ct_eq(&wanted)) {
                Ok(())
            } else {
                Err(HookError::BadSignature(NAME))
            }
        }
        Forge::Github => {
            const NAME: &str = "X-Hub-Signature-256";
            let value =
                header(headers, &["x-hub-signature-256"]).ok_or(HookError::Unsigned(NAME))?;
            let hex = value
                .strip_prefix("sha256=")
                .ok_or(HookError::BadSignature(NAME))?;
            check_hmac(hex, body, secret).map_err(|()| HookError::BadSignature(NAME))
        }
        Forge::Forgejo => {
            let names = ["x-forgejo-signature", "x-gitea-signature"];
            const NAME: &str = "X-Forgejo-Signature (or X-Gitea-Signature)";
            let hex = header(headers, &names).ok_or(HookError::Unsigned(NAME))?;
            check_hmac(hex, body, secret).map_err(|()| HookError::BadSignature(NAME))
        }
    }
}

/// Whether `hex` is the HMAC-SHA256 of `body` under `secret` (compared in constant time).
fn check_hmac(hex: &str, body: &[u8], secret: &str) -> Result<(), ()> {
    let given = hex::decode(hex).map_err(|_| ())?;
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).map_err(|_| ())?;
    mac.update(body);
    mac.verify_slice(&given).map_err(|_| ())
}

/// The HMAC-SHA256 of `body` under `secret`, in hex: what GitHub and Forgejo send.
#[cfg(test)]
pub fn sign(body: &[u8], secret: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}
