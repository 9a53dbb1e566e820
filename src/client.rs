//! The HTTP client the CLI uses: server URL and token per CONTRACTS.md, errors a user can act on.

use crate::cli::ClientArgs;
use anyhow::{Context, anyhow, bail};
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use vmfarm_proto::api::ErrorBody;

pub struct Client {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Client {
    pub fn new(args: &ClientArgs) -> anyhow::Result<Client> {
        let token = match &args.token {
            Some(t) => t.trim().to_owned(),
            None => {
                let path = args.data.join("admin-token");
                std::fs::read_to_string(&path)
                    .with_context(|| {
                        format!(
                            "no token: pass --token or set VMFARM_TOKEN (or run next to a local server's data dir; {} is not readable)",
                            path.display()
                        )
                    })?
                    .trim()
                    .to_owned()
            }
        };
        Ok(Client {
            http: reqwest::Client::builder()
                .user_agent(concat!("vmfarm/", env!("CARGO_PKG_VERSION")))
                .build()?,
            base: args.server.trim_end_matches('/').to_owned(),
            token,
        })
    }

    /// The address of `path` on the server (`/jobs/7`: the job's page).
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.http
            .request(method, self.url(path))
            .bearer_auth(&self.token)
    }

    /// Sends a request; a non-success answer becomes an error carrying the server's message.
    pub async fn send(&self, request: RequestBuilder) -> anyhow::Result<Response> {
        let response = request
            .send()
            .await
            .map_err(|e| anyhow!("cannot reach the server at {}: {e}", self.base))?;
        if response.status().is_success() {
            return Ok(response);
        }
        Err(error_from(response).await)
    }
}

/// The server's error message (and manifest errors), or the status when there is none.
pub async fn error_from(response: Response) -> anyhow::Error {
    let status = response.status();
    let text = response.text().await.unwrap_or_default();
    match serde_json::from_str::<ErrorBody>(&text) {
        Ok(body) if body.manifest_errors.is_empty() => anyhow!("{} ({status})", body.error),
        Ok(body) => anyhow!(
            "{}",
            body.manifest_errors
                .iter()
                .map(|e| format!("{}:{}: {}", e.line, e.column, e.message))
                .collect::<Vec<_>>()
                .join("\n")
        ),
        Err(_) if status == StatusCode::UNAUTHORIZED => {
            anyhow!("the server refused the token ({status})")
        }
        Err(_) => anyhow!("the server answered {status}: {}", text.trim()),
    }
}

/// Reads Server-Sent Events from a response, calling `on_event(event, data)` for each.
/// Stops when the callback returns false or the stream ends.
pub async fn read_sse(
    response: Response,
    mut on_event: impl FnMut(&str, &str) -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    use futures_util::StreamExt;
    let mut stream = response.bytes_stream();
    let mut buf: Vec<u8> = Vec::new();
    let (mut event, mut data) = (String::new(), String::new());
    while let Some(piece) = stream.next().await {
        buf.extend_from_slice(&piece.context("the log stream broke off")?);
        while let Some(end) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line);
            let line = line.trim_end_matches(['\n', '\r']);
            if line.is_empty() {
                if !data.is_empty() || !event.is_empty() {
                    let name = if event.is_empty() { "message" } else { &event };
                    if !on_event(name, &data)? {
                        return Ok(());
                    }
                }
                event.clear();
                data.clear();
            } else if let Some(v) = line.strip_prefix("event:") {
                event = v.trim_start().to_owned();
            } else if let Some(v) = line.strip_prefix("data:") {
                if !data.is_empty() {
                    data.push('\n');
                }
                data.push_str(v.strip_prefix(' ').unwrap_or(v));
            }
        }
    }
    bail!("the log stream ended before the job did")
}
