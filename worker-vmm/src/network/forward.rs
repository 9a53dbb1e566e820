//! Plain http: an absolute-form request (`GET http://host/path`) goes to its origin in origin
//! form over a connection the proxy opened itself (a hyper client connection, kept for the
//! guest's next request to the same target), with hop-by-hop headers removed both ways. Bodies
//! stream through; cacheable answers come from the cache or go into it on their way.

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, Response, Uri, Version};
use hyper_util::rt::TokioIo;
use tokio::task::JoinHandle;

use super::body::{BoxError, ProxyBody};
use super::connect::connect;
use super::connection::Connection;
use super::limits::{Gated, MAX_HEAD_BYTES};
use super::policy::Target;
use super::refusal::Refusal;

/// Headers that belong to one hop, never forwarded (RFC 9110 7.6.1), besides those the
/// `Connection` header names. `Expect` is answered by the proxy's own server side.
const HOP_BY_HOP: [HeaderName; 10] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::EXPECT,
];

/// An origin connection: its request sender, and the task that drives it (stopped when this is
/// dropped, so nothing outlives the guest's connection).
pub(super) struct Upstream {
    target: Target,
    sender: SendRequest<Incoming>,
    driver: JoinHandle<()>,
}

impl Upstream {
    pub(super) fn target(&self) -> &Target {
        &self.target
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// Answers an absolute-form request to `target`, which the allow-list has let through.
pub(super) async fn forward(
    conn: &Connection,
    target: Target,
    request: Request<Incoming>,
) -> Result<Response<ProxyBody>, Refusal> {
    let cache = &conn.job.cache;
    let key = cache.key_for(&target, &request);
    if let Some(key) = &key
        && let Some(hit) = cache.lookup(key).await
    {
        conn.note_request(&target, true);
        return Ok(hit.into_response(conn.cache_bytes.clone()));
    }
    let (upstream, reused) = upstream(conn, &target).await?;
    conn.note_request(&target, false);
    let (response, upstream) =
        send(conn, &target, upstream, reused, origin_request(request)).await?;
    conn.keep_upstream(upstream);
    let (mut parts, body) = response.into_parts();
    remove_hop_by_hop(&mut parts.headers);
    parts.version = Version::HTTP_11;
    let body = body.map_err(BoxError::from).boxed_unsync();
    let filler = match key {
        Some(key) => cache.fill(key, &parts).await,
        None => None,
    };
    let body = match filler {
        Some(filler) => filler.body(body),
        None => body,
    };
    Ok(Response::from_parts(parts, body))
}

/// The connection kept for `target` if it is still open, or a new one; whether it was kept.
async fn upstream(conn: &Connection, target: &Target) -> Result<(Upstream, bool), Refusal> {
    if let Some(mut kept) = conn.take_upstream(target)
        && kept.sender.ready().await.is_ok()
    {
        return Ok((kept, true));
    }
    Ok((open(conn, target).await?, false))
}

/// Sends `request` on `upstream`; if a kept connection turns out closed by the origin before
/// the request went out, once more on a new one.
async fn send(
    conn: &Connection,
    target: &Target,
    mut upstream: Upstream,
    reused: bool,
    request: Request<Incoming>,
) -> Result<(Response<Incoming>, Upstream), Refusal> {
    let failed = |error| Refusal::Upstream {
        target: target.clone(),
        error,
    };
    match upstream.sender.try_send_request(request).await {
        Ok(response) => Ok((response, upstream)),
        Err(mut e) => match e.take_message() {
            Some(request) if reused => {
                let mut fresh = open(conn, target).await?;
                let response = fresh.sender.send_request(request).await.map_err(failed)?;
                Ok((response, fresh))
            }
            _ => Err(failed(e.into_error())),
        },
    }
}

/// A new origin connection to `target`.
async fn open(conn: &Connection, target: &Target) -> Result<Upstream, Refusal> {
    let job = &conn.job;
    let stream = connect(&job.policy, target, job.limits.connect_timeout).await?;
    let io = TokioIo::new(Gated::new(stream, conn.traffic.clone()));
    let (sender, driver) = hyper::client::conn::http1::Builder::new()
        .max_header_size(MAX_HEAD_BYTES)
        .handshake(io)
        .await
        .map_err(|error| Refusal::Upstream {
            target: target.clone(),
            error,
        })?;
    let name = target.to_string();
    let driver = tokio::spawn(async move {
        if let Err(e) = driver.await {
            tracing::debug!(target = %name, error = %e, "origin connection ended");
        }
    });
    Ok(Upstream {
        target: target.clone(),
        sender,
        driver,
    })
}

/// `request` as its origin gets it: origin form, `Host` from the URL (RFC 9112 3.2.2), no
/// hop-by-hop headers.
fn origin_request(request: Request<Incoming>) -> Request<Incoming> {
    let (mut parts, body) = request.into_parts();
    let host = parts
        .uri
        .authority()
        .map(|a| a.as_str().rsplit('@').next().unwrap_or(a.as_str()))
        .and_then(|host| HeaderValue::from_str(host).ok());
    parts.uri = parts
        .uri
        .path_and_query()
        .cloned()
        .map_or_else(|| Uri::from_static("/"), Uri::from);
    remove_hop_by_hop(&mut parts.headers);
    if let Some(host) = host {
        parts.headers.insert(header::HOST, host);
    }
    parts.version = Version::HTTP_11;
    Request::from_parts(parts, body)
}

fn remove_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(&HOP_BY_HOP) {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_utils::{CHUNK, Job, MIB, Origin, client, limits, pattern, request};
    use http_body_util::BodyExt;
    use hyper::{Method, Request, StatusCode};
    use std::time::{Duration, Instant};

    const LOOPBACK: &str = "127.0.0.0/8";

    /// The largest amount of memory this process has held (VmHWM), in bytes.
    fn peak_memory() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
        let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        kib * 1024
    }

    /// `GET url` on `stream`, the body compared with the pattern as it arrives (memcmp, cheap
    /// enough not to be what is measured): (whether it matched, bytes, seconds).
    async fn download<S>(stream: S, url: &str) -> (bool, usize, f64)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let start = Instant::now();
        let mut sender = client(stream).await;
        let response = sender
            .send_request(request(Method::GET, url))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let mut body = response.into_body();
        let want = pattern(CHUNK).next().unwrap();
        let (mut matched, mut len) = (true, 0);
        while let Some(frame) = body.frame().await {
            if let Ok(mut data) = frame.unwrap().into_data() {
                while !data.is_empty() {
                    let at = len % CHUNK;
                    let n = data.len().min(CHUNK - at);
                    matched &= data[..n] == want[at..at + n];
                    len += n;
                    data = data.slice(n..);
                }
            }
        }
        (matched, len, start.elapsed().as_secs_f64())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn test_get_streams_a_large_body_without_holding_it() {
        const LEN: usize = 64 * MIB;
        let origin = Origin::start().await;
        let target = format!("localhost:{}", origin.port());
        let job = Job::new(&[&target], &[LOOPBACK]).await;
        let proxy = job.listen().await;
        let path = format!("/bytes/{LEN}");

        let direct = tokio::net::TcpStream::connect(origin.addr).await.unwrap();
        let (matched, len, direct_secs) = download(direct, &path).await;
        assert_eq!((matched, len), (true, LEN));

        let before = peak_memory();
        let proxied = tokio::net::TcpStream::connect(proxy).await.unwrap();
        let (matched, len, proxied_secs) = download(proxied, &origin.url(&path)).await;
        let grown = peak_memory().saturating_sub(before);
        assert_eq!((matched, len), (true, LEN));
        assert!(grown < 32 * MIB as u64, "peak memory grew by {grown} bytes");

        let mib_per_s = |secs: f64| LEN as f64 / MIB as f64 / secs;
        eprintln!(
            "64 MiB over loopback: direct {:.0} MiB/s, through the proxy {:.0} MiB/s (ratio {:.2}); peak memory grew by {:.1} MiB",
            mib_per_s(direct_secs),
            mib_per_s(proxied_secs),
            direct_secs / proxied_secs,
            grown as f64 / MIB as f64,
        );
        let line = job
            .log
            .wait_for(&format!("network {target}: 1 request"))
            .await;
        assert!(line.contains("received 64.0 MiB"), "{line}");
    }

    #[tokio::test]
    async fn test_hop_by_hop_headers_stay_on_their_hop() {
        let origin = Origin::start().await;
        let job = Job::new(&[&format!("localhost:{}", origin.port())], &[LOOPBACK]).await;
        let answer = job
            .send(
                Request::get(origin.url("/headers"))
                    .header("connection", "x-hop, keep-alive")
                    .header("x-hop", "dropped")
                    .header("keep-alive", "timeout=5")
                    .header("proxy-authorization", "Basic c2VjcmV0")
                    .header("proxy-connection", "keep-alive")
                    .header("te", "trailers")
                    .header("host", "somewhere.else")
                    .header("x-end-to-end", "kept")
                    .body(http_body_util::Empty::new())
                    .unwrap(),
            )
            .await;
        assert_eq!(answer.status, StatusCode::OK);
        let seen = answer.text();
        for gone in ["x-hop", "keep-alive", "proxy-", "te:", "somewhere"] {
            assert!(!seen.contains(gone), "{gone} reached the origin:\n{seen}");
        }
        assert!(seen.contains("x-end-to-end: kept"), "{seen}");
        assert!(
            seen.contains(&format!("host: localhost:{}\n", origin.port())),
            "{seen}"
        );
    }

    #[tokio::test]
    async fn test_request_bodies_and_head_go_through() {
        let origin = Origin::start().await;
        let target = format!("localhost:{}", origin.port());
        let job = Job::new(&[&target], &[LOOPBACK]).await;
        let proxy = job.listen().await;
        let stream = tokio::net::TcpStream::connect(proxy).await.unwrap();
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(conn);
        let body: Vec<u8> = pattern(3 * MIB).flat_map(|c| c.to_vec()).collect();
        let response = sender
            .send_request(
                Request::post(origin.url("/echo"))
                    .body(http_body_util::Full::new(hyper::body::Bytes::from(
                        body.clone(),
                    )))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let echoed = response.into_body().collect().await.unwrap().to_bytes();
        assert!(
            echoed == body,
            "{} bytes echoed of {}",
            echoed.len(),
            body.len()
        );

        // The same connection carries the next request; HEAD keeps the length, sends no body.
        let response = sender
            .send_request(
                Request::head(origin.url("/bytes/1000"))
                    .body(http_body_util::Full::default())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["content-length"], "1000");
        let rest = response.into_body().collect().await.unwrap().to_bytes();
        assert!(rest.is_empty());
        drop(sender);
        let line = job
            .log
            .wait_for(&format!("network {target}: 2 requests"))
            .await;
        assert!(line.contains("none from the cache"), "{line}");
    }

    #[tokio::test]
    async fn test_the_byte_limit_cuts_a_download_and_refuses_more() {
        let origin = Origin::start().await;
        let target = format!("localhost:{}", origin.port());
        let mut limits = limits();
        limits.max_bytes = MIB as u64;
        let job = Job::with(&[&target], &[LOOPBACK], limits, 0).await;
        let answer = job.get(&origin.url(&format!("/bytes/{}", 8 * MIB))).await;
        assert_eq!(answer.status, StatusCode::OK);
        assert!(answer.failed, "the body should end in an error");
        assert!(
            answer.body.len() < 2 * MIB,
            "{} bytes arrived",
            answer.body.len()
        );
        let line = job
            .log
            .wait_for(&format!("network {target}: 1 request"))
            .await;
        assert!(
            line.ends_with("; cut at the job's network byte limit of 1MiB (network.max_bytes_per_job in the worker's config)"),
            "{line}"
        );

        let answer = job.get(&origin.url("/hello")).await;
        assert_eq!(answer.status, StatusCode::FORBIDDEN);
        let want = "vmfarm: this job has used its network byte limit of 1MiB through the worker's proxy (network.max_bytes_per_job in the worker's config); it gets no more connections";
        assert_eq!(answer.text().trim_end(), want);
        job.log.wait_for(want).await;
    }

    #[tokio::test]
    async fn test_a_quiet_origin_is_left_after_the_idle_timeout() {
        // An origin that accepts and never answers.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let _held = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
            }
        });
        let mut limits = limits();
        limits.idle_timeout = Duration::from_secs(1);
        let target = format!("localhost:{port}");
        let job = Job::with(&[&target], &[LOOPBACK], limits, 0).await;
        let (guest, served) = job.connect();
        let mut sender = client(guest).await;
        let start = Instant::now();
        let sent = sender
            .send_request(request(Method::GET, &format!("http://{target}/")))
            .await;
        assert!(sent.is_err(), "no answer can come: {sent:?}");
        served.await.unwrap();
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_millis(900) && waited < Duration::from_secs(10),
            "{waited:?}"
        );
        let line = job.log.wait_for(&format!("network {target}: ")).await;
        assert!(line.contains("; closed after 1s without traffic"), "{line}");
    }
}
