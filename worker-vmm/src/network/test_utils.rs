//! Fixtures of the network tests: an HTTP origin (hyper) and an echo server on 127.0.0.1, a job
//! network whose log is recorded, and clients that reach the proxy through an in-memory stream
//! (what the guest's forwarded channel is to `serve`) or a TCP listener.

use futures_util::{StreamExt, stream};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use super::body::BoxError;
use super::{FarmLog, JobNetwork, NetworkLimits, ProxyCache, ProxyMeter};

pub(super) const MIB: usize = 1024 * 1024;

/// Bytes of a pattern chunk; bodies are made of slices of it.
pub(super) const CHUNK: usize = 64 * 1024;

fn chunk() -> Bytes {
    Bytes::from((0..CHUNK).map(|i| (i * 7 % 251) as u8).collect::<Vec<u8>>())
}

/// `len` bytes of the test pattern, in chunks (shared, never the whole body in memory).
pub(super) fn pattern(len: usize) -> impl Iterator<Item = Bytes> + Send + 'static {
    let chunk = chunk();
    (0..len.div_ceil(CHUNK)).map(move |i| chunk.slice(..CHUNK.min(len - i * CHUNK)))
}

/// The content a by-hash path of the origin serves.
pub(super) const INDEX: &[u8] = b"Package: hello\nVersion: 2.10-3\nArchitecture: amd64\n";

/// `/debian/dists/trixie/main/binary-amd64/by-hash/SHA256/<hash>` of `hash`.
pub(super) fn by_hash_path(hash: &str) -> String {
    format!("/debian/dists/trixie/main/binary-amd64/by-hash/SHA256/{hash}")
}

type OriginBody = UnsyncBoxBody<Bytes, BoxError>;

/// An HTTP/1.1 origin on 127.0.0.1. Routes:
/// - `/hello`: a short text;
/// - `/headers`: the request's headers, one `name: value` a line;
/// - `/echo`: the request's body;
/// - `/bytes/<n>`: `n` bytes of the pattern, with Content-Length;
/// - `/debian/pool/main/<x>/<src>/<n>_<anything>`: `n` bytes of the pattern; the source `trunc`
///   announces `n` bytes and sends half, then fails; the source `stall` announces `n` bytes,
///   sends half and then nothing more the first time it is asked, and all of it afterwards; the
///   source `nostore` says `no-store`;
/// - `/debian/dists/.../by-hash/SHA256/<hash>`: `INDEX`, whatever the hash.
pub(super) struct Origin {
    pub(super) addr: SocketAddr,
    requests: Arc<Mutex<Vec<String>>>,
    _server: JoinHandle<()>,
}

impl Origin {
    pub(super) async fn start() -> Origin {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = requests.clone();
        let server = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let seen = seen.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |request: Request<Incoming>| {
                        let this = format!("{} {}", request.method(), request.uri());
                        let earlier = {
                            let mut seen = seen.lock().unwrap();
                            let earlier = seen.iter().filter(|r| **r == this).count();
                            seen.push(this);
                            earlier
                        };
                        async move { Ok::<_, Infallible>(route(request, earlier)) }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Origin {
            addr,
            requests,
            _server: server,
        }
    }

    pub(super) fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `http://localhost:<port><path>`.
    pub(super) fn url(&self, path: &str) -> String {
        format!("http://localhost:{}{path}", self.port())
    }

    /// How many requests for `path` the origin has had.
    pub(super) fn requests_for(&self, path: &str) -> usize {
        let want = format!("GET {path}");
        let requests = self.requests.lock().unwrap();
        requests.iter().filter(|r| **r == want).count()
    }
}

fn full(bytes: impl Into<Bytes>) -> OriginBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

fn with_length(len: usize, body: OriginBody) -> Response<OriginBody> {
    let mut response = Response::new(body);
    response
        .headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    response
}

fn streamed(len: usize) -> OriginBody {
    let frames = pattern(len).map(|c| Ok::<_, BoxError>(Frame::data(c)));
    StreamBody::new(stream::iter(frames)).boxed_unsync()
}

/// The answer to `request`, asked `earlier` times before.
fn route(request: Request<Incoming>, earlier: usize) -> Response<OriginBody> {
    let path = request.uri().path().to_owned();
    let segments: Vec<&str> = path.split('/').collect();
    match segments.as_slice() {
        ["", "hello"] => Response::new(full("hello from the origin\n")),
        ["", "headers"] => {
            let text: String = request
                .headers()
                .iter()
                .map(|(name, value)| format!("{name}: {}\n", value.to_str().unwrap_or("?")))
                .collect();
            Response::new(full(text))
        }
        ["", "echo"] => Response::new(request.into_body().map_err(BoxError::from).boxed_unsync()),
        ["", "bytes", n] => {
            let len: usize = n.parse().unwrap();
            with_length(len, streamed(len))
        }
        ["", "debian", "pool", "main", _, source, file] => {
            let len: usize = file.split('_').next().unwrap().parse().unwrap();
            match *source {
                "trunc" => {
                    let half = pattern(len / 2).map(|c| Ok::<_, BoxError>(Frame::data(c)));
                    // The half goes out before the origin dies.
                    let failed = stream::once(async {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        Err::<Frame<Bytes>, BoxError>("origin died".into())
                    });
                    let body = StreamBody::new(stream::iter(half).chain(failed)).boxed_unsync();
                    with_length(len, body)
                }
                "stall" if earlier == 0 => {
                    let half = pattern(len / 2).map(|c| Ok::<_, BoxError>(Frame::data(c)));
                    let body = StreamBody::new(stream::iter(half).chain(stream::pending()));
                    with_length(len, body.boxed_unsync())
                }
                "nostore" => {
                    let mut response = with_length(len, streamed(len));
                    response
                        .headers_mut()
                        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
                    response
                }
                _ => with_length(len, streamed(len)),
            }
        }
        ["", "debian", "dists", .., "by-hash", "SHA256", _] => {
            with_length(INDEX.len(), full(INDEX))
        }
        _ => {
            let mut response = Response::new(full("not found\n"));
            *response.status_mut() = StatusCode::NOT_FOUND;
            response
        }
    }
}

/// A TCP server on 127.0.0.1 that sends back what it gets.
pub(super) async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut read, mut write) = stream.split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
            });
        }
    });
    addr
}

/// The job's farm log as the tests read it.
#[derive(Clone, Default)]
pub(super) struct Log {
    lines: Arc<Mutex<Vec<String>>>,
}

impl Log {
    pub(super) fn farm_log(&self) -> FarmLog {
        let lines = self.lines.clone();
        Arc::new(move |line: &str| lines.lock().unwrap().push(line.to_owned()))
    }

    pub(super) fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// The first line containing `needle`, waiting up to 10 s for it.
    pub(super) async fn wait_for(&self, needle: &str) -> String {
        for _ in 0..1000 {
            if let Some(line) = self.lines().into_iter().find(|l| l.contains(needle)) {
                return line;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("no log line with {needle:?} in {:#?}", self.lines());
    }
}

/// Limits of the tests unless they say otherwise.
pub(super) fn limits() -> NetworkLimits {
    NetworkLimits {
        max_connections: 16,
        max_bytes: 1 << 30,
        idle_timeout: Duration::from_secs(30),
        connect_timeout: Duration::from_secs(10),
    }
}

/// A job network with a recorded log and a cache in a directory of its own.
pub(super) struct Job {
    pub(super) net: JobNetwork,
    pub(super) log: Log,
    pub(super) cache: ProxyCache,
    /// The cache's directory.
    pub(super) dir: PathBuf,
    /// The temporary directory that `dir` is, when the job made it.
    _temp: Option<tempfile::TempDir>,
}

impl Job {
    pub(super) async fn new(allow: &[&str], private: &[&str]) -> Job {
        Job::with(allow, private, limits(), 1 << 30).await
    }

    pub(super) async fn with(
        allow: &[&str],
        private: &[&str],
        limits: NetworkLimits,
        cache_max: u64,
    ) -> Job {
        let temp = tempfile::tempdir().unwrap();
        let mut job = Job::at(temp.path(), allow, private, limits, cache_max).await;
        job._temp = Some(temp);
        job
    }

    /// A job whose cache is the one in `dir` (which outlives the job, as a worker's cache
    /// outlives the worker).
    pub(super) async fn at(
        dir: &Path,
        allow: &[&str],
        private: &[&str],
        limits: NetworkLimits,
        cache_max: u64,
    ) -> Job {
        let cache = ProxyCache::open(dir, cache_max).await.unwrap();
        let log = Log::default();
        let net = JobNetwork::new(
            allow.iter().map(|p| p.parse().unwrap()).collect(),
            private.iter().map(|r| r.parse().unwrap()).collect(),
            limits,
            cache.clone(),
            ProxyMeter::default(),
            log.farm_log(),
        );
        Job {
            net,
            log,
            cache,
            dir: dir.to_owned(),
            _temp: None,
        }
    }

    /// A new connection to the proxy, served by `serve` on a task of its own.
    pub(super) fn connect(&self) -> (DuplexStream, JoinHandle<()>) {
        let (guest, worker) = tokio::io::duplex(256 * 1024);
        let net = self.net.clone();
        let served = tokio::spawn(async move { net.serve(worker).await });
        (guest, served)
    }

    /// The proxy on a TCP port of 127.0.0.1, as a client configured with `http_proxy` sees it.
    pub(super) async fn listen(&self) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let net = self.net.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let net = net.clone();
                tokio::spawn(async move { net.serve(stream).await });
            }
        });
        addr
    }

    /// `request` on a connection of its own; the answer's status, headers and whole body.
    pub(super) async fn send(&self, request: Request<Empty<Bytes>>) -> Answer {
        let (guest, served) = self.connect();
        let mut sender = client(guest).await;
        let response = sender.send_request(request).await.unwrap();
        let answer = Answer::read(response).await;
        // The guest closes; the connection's log line is written once `serve` returns.
        drop(sender);
        served.await.unwrap();
        answer
    }

    /// `GET url` on a connection of its own.
    pub(super) async fn get(&self, url: &str) -> Answer {
        self.send(Request::get(url).body(Empty::new()).unwrap())
            .await
    }

    /// `CONNECT authority`: the tunnel, or the refusal.
    pub(super) async fn tunnel(
        &self,
        authority: &str,
    ) -> Result<TokioIo<hyper::upgrade::Upgraded>, Answer> {
        let (guest, _served) = self.connect();
        let mut sender = client(guest).await;
        let request = Request::connect(authority).body(Empty::new()).unwrap();
        let response = sender.send_request(request).await.unwrap();
        if response.status() != StatusCode::OK {
            return Err(Answer::read(response).await);
        }
        Ok(TokioIo::new(hyper::upgrade::on(response).await.unwrap()))
    }

    /// `text` as raw bytes on a connection of its own, and all the proxy sends back until it
    /// closes (send `Connection: close`).
    pub(super) async fn raw(&self, text: &str) -> String {
        let (mut guest, served) = self.connect();
        guest.write_all(text.as_bytes()).await.unwrap();
        let mut answer = String::new();
        guest.read_to_string(&mut answer).await.unwrap();
        served.await.unwrap();
        answer
    }
}

/// An HTTP/1.1 client on `stream`, its connection driven by a task (with upgrades, for CONNECT).
pub(super) async fn client<S>(stream: S) -> hyper::client::conn::http1::SendRequest<Empty<Bytes>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    sender
}

/// An answer as a test reads it.
#[derive(Debug)]
pub(super) struct Answer {
    pub(super) status: StatusCode,
    pub(super) headers: HeaderMap,
    /// The body, or what was read of it before it failed.
    pub(super) body: Vec<u8>,
    pub(super) failed: bool,
}

impl Answer {
    pub(super) async fn read(response: Response<Incoming>) -> Answer {
        let (parts, mut body) = response.into_parts();
        let mut bytes = Vec::new();
        let mut failed = false;
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(frame) => {
                    if let Some(data) = frame.data_ref() {
                        bytes.extend_from_slice(data);
                    }
                }
                Err(_) => {
                    failed = true;
                    break;
                }
            }
        }
        Answer {
            status: parts.status,
            headers: parts.headers,
            body: bytes,
            failed,
        }
    }

    pub(super) fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub(super) fn is_hit(&self) -> bool {
        self.headers
            .get("x-vmfarm-cache")
            .is_some_and(|v| v == "hit")
    }
}

/// `Method` helper for requests built by hand.
pub(super) fn request(method: Method, url: &str) -> Request<Empty<Bytes>> {
    Request::builder()
        .method(method)
        .uri(url)
        .body(Empty::new())
        .unwrap()
}
