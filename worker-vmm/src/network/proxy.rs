//! `JobNetwork`: one job's proxy. Each connection from the guest is served by hyper's HTTP/1.1
//! server; each request is read for its target, checked against the allow-list and the byte
//! budget, then tunnelled (CONNECT) or forwarded (absolute-form http). Refusals are answered by
//! the proxy itself and logged; every connection that was let through leaves one log line.

use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;
use vmfarm_proto::network::{AddressRange, HostPattern};
use vmfarm_proto::units::ByteSize;

use super::body::{self, ProxyBody};
use super::cache::ProxyCache;
use super::connection::{Connection, Ending};
use super::limits::{JobBudget, MAX_HEAD_BYTES, Metered, NetworkLimits, Traffic};
use super::meter::ProxyMeter;
use super::policy::{Policy, Target};
use super::refusal::Refusal;
use super::{forward, tunnel};

/// Where the proxy's lines go: the job's log, `farm` stream, one call per line.
pub type FarmLog = Arc<dyn Fn(&str) + Send + Sync>;

/// One job's network: its policy, limits and log, and the worker's shared cache. Clones share
/// the job's state (its budget, its allow-list).
#[derive(Clone)]
pub struct JobNetwork {
    shared: Arc<Shared>,
}

/// What every connection of a job shares.
pub(super) struct Shared {
    pub(super) policy: Policy,
    pub(super) limits: NetworkLimits,
    pub(super) budget: Arc<JobBudget>,
    pub(super) cache: ProxyCache,
    meter: ProxyMeter,
    pub(super) log: FarmLog,
    closed: CancellationToken,
}

impl JobNetwork {
    /// A job's network: `allow` is the manifest's `[network] allow` (empty: nothing), and
    /// `allow_private` the operator's ranges that may be reached although not public.
    pub fn new(
        allow: Vec<HostPattern>,
        allow_private: Vec<AddressRange>,
        limits: NetworkLimits,
        cache: ProxyCache,
        meter: ProxyMeter,
        log: FarmLog,
    ) -> JobNetwork {
        JobNetwork {
            shared: Arc::new(Shared {
                policy: Policy::new(allow, allow_private),
                budget: Arc::new(JobBudget::new(&limits)),
                limits,
                cache,
                meter,
                log,
                closed: CancellationToken::new(),
            }),
        }
    }

    /// Replaces the allow-list, e.g. with the image's package mirrors added while the packages
    /// step runs, or a source's host while it is fetched. Requests from now on are checked
    /// against the new list; tunnels already open stay open.
    pub fn set_allow(&self, allow: Vec<HostPattern>) {
        self.shared.policy.set_allow(allow);
    }

    /// Ends every connection of the job now and refuses new ones (at the job's end).
    pub fn close(&self) {
        self.shared.closed.cancel();
    }

    /// Serves one connection from the guest until it ends, idles out, or the job closes.
    pub async fn serve<S>(&self, stream: S)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let job = &self.shared;
        if job.closed.is_cancelled() {
            return;
        }
        let Some(_slot) = job.budget.try_slot() else {
            let refusal = Refusal::TooManyConnections {
                max: job.budget.max_connections(),
            };
            (job.log)(&refusal.to_string());
            self.refuse_connection(stream, refusal).await;
            return;
        };
        let traffic = Arc::new(Traffic::new(job.budget.clone()));
        let conn = Arc::new(Connection::new(job.clone(), traffic.clone()));
        let service = {
            let conn = conn.clone();
            service_fn(move |request| {
                let conn = conn.clone();
                async move { Ok::<_, Infallible>(handle(&conn, request).await) }
            })
        };
        let io = TokioIo::new(Metered::new(stream, traffic.clone()));
        let http = self
            .http_server()
            .serve_connection(io, service)
            .with_upgrades();
        let idle = job.limits.idle_timeout;
        let mut ending = tokio::select! {
            served = http => match served {
                // hyper's own header read timeout, set to the idle timeout.
                Err(e) if e.is_timeout() => Ending::Idle,
                Err(e) => {
                    tracing::debug!(error = %e, "proxy connection ended with an error");
                    Ending::Done
                }
                Ok(()) => Ending::Done,
            },
            () = traffic.idle(idle) => Ending::Idle,
            () = job.closed.cancelled() => Ending::Closed,
        };
        if ending == Ending::Done
            && let Some(tunnel) = conn.take_tunnel()
        {
            ending = tokio::select! {
                copied = tunnel.run() => {
                    if let Err(e) = copied {
                        tracing::debug!(error = %e, "tunnel ended with an error");
                    }
                    Ending::Done
                }
                () = traffic.idle(idle) => Ending::Idle,
                () = job.closed.cancelled() => Ending::Closed,
            };
        }
        job.meter
            .connection_ended(traffic.sent_by_guest(), traffic.received_by_guest());
        if let Some(line) = conn.end_line(ending) {
            (job.log)(&line);
        }
    }

    fn http_server(&self) -> http1::Builder {
        let mut builder = http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(self.shared.limits.idle_timeout)
            .max_header_size(MAX_HEAD_BYTES);
        builder
    }

    /// Answers every request of `stream` with `refusal`, then closes it.
    async fn refuse_connection<S>(&self, stream: S, refusal: Refusal)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let text = refusal.to_string();
        let status = refusal.status();
        let service = service_fn(move |_request: Request<Incoming>| {
            let answer = body::message(status, &text);
            async move { Ok::<_, Infallible>(answer) }
        });
        let mut server = self.http_server();
        server.keep_alive(false);
        let http = server.serve_connection(TokioIo::new(stream), service);
        tokio::select! {
            _ = http => {}
            () = tokio::time::sleep(self.shared.limits.idle_timeout) => {}
            () = self.shared.closed.cancelled() => {}
        }
    }
}

async fn handle(conn: &Connection, request: Request<Incoming>) -> Response<ProxyBody> {
    match route(conn, request).await {
        Ok(response) => response,
        Err(refusal) => conn.refuse(&refusal),
    }
}

async fn route(
    conn: &Connection,
    request: Request<Incoming>,
) -> Result<Response<ProxyBody>, Refusal> {
    let target = read_target(&request)?;
    conn.job.policy.check(&target)?;
    if conn.job.budget.exhausted() {
        return Err(Refusal::ByteLimit {
            max: ByteSize(conn.job.budget.max_bytes()),
        });
    }
    if request.method() == Method::CONNECT {
        tunnel::open(conn, target, request).await
    } else {
        forward::forward(conn, target, request).await
    }
}

/// The target of a proxy request: `CONNECT host:port`, or an absolute `http://` URL.
fn read_target(request: &Request<Incoming>) -> Result<Target, Refusal> {
    let uri = request.uri();
    if request.method() == Method::CONNECT {
        let port = uri.authority().and_then(|a| a.port_u16());
        return match (uri.scheme(), uri.host(), port) {
            (None, Some(host), Some(port)) => Target::parse(host, port),
            _ => Err(Refusal::ConnectTarget {
                target: uri.to_string(),
            }),
        };
    }
    match (uri.scheme_str(), uri.authority()) {
        (Some("http"), Some(authority)) => {
            Target::parse(authority.host(), authority.port_u16().unwrap_or(80))
        }
        (Some(scheme), _) => Err(Refusal::Scheme {
            scheme: scheme.to_owned(),
        }),
        (None, Some(authority)) => Err(Refusal::AuthorityNotConnect {
            method: request.method().to_string(),
            authority: authority.to_string(),
        }),
        (None, None) => Err(Refusal::NotAProxyRequest),
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_utils::{Job, Origin, client, echo_server, limits, request};
    use hyper::StatusCode;
    use sha2::{Digest, Sha256};
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const LOOPBACK: &str = "127.0.0.0/8";

    #[tokio::test]
    async fn test_requests_that_are_not_for_a_proxy_get_a_400_saying_what_to_send() {
        let job = Job::new(&["*"], &[]).await;
        let cases = [
            (
                "GET / HTTP/1.1\r\nHost: vmfarm\r\n",
                "vmfarm: this is the job's network proxy, not a web server: ask it for absolute URLs",
            ),
            (
                "GET https://pypi.org/simple/ HTTP/1.1\r\nHost: pypi.org\r\n",
                "vmfarm: the proxy forwards http:// URLs itself; for https:// ask it to CONNECT",
            ),
            (
                "GET pypi.org:443 HTTP/1.1\r\nHost: pypi.org\r\n",
                "vmfarm: `GET pypi.org:443`: only CONNECT takes a host:port target",
            ),
            (
                "CONNECT pypi.org HTTP/1.1\r\nHost: pypi.org\r\n",
                "vmfarm: CONNECT needs a host and a port, like `CONNECT pypi.org:443`; got `pypi.org`",
            ),
            (
                "GET http://a..b/ HTTP/1.1\r\nHost: x\r\n",
                "vmfarm: `a..b` is not a host name",
            ),
        ];
        for (head, want) in cases {
            let answer = job.raw(&format!("{head}Connection: close\r\n\r\n")).await;
            assert!(
                answer.starts_with("HTTP/1.1 400 Bad Request\r\n"),
                "{head}: {answer}"
            );
            assert!(answer.contains(want), "{head}: {answer}");
            job.log.wait_for(want).await;
        }
    }

    #[tokio::test]
    async fn test_an_oversized_request_head_is_refused() {
        let job = Job::new(&["*"], &[]).await;
        let padding = "x".repeat(super::MAX_HEAD_BYTES);
        let answer = job
            .raw(&format!(
                "GET http://example.org/ HTTP/1.1\r\nHost: example.org\r\nX-Padding: {padding}\r\n\r\n"
            ))
            .await;
        assert!(
            answer.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"),
            "{answer}"
        );
    }

    #[tokio::test]
    async fn test_a_host_outside_the_allow_list_gets_a_403_and_a_log_line() {
        let job = Job::new(&["pypi.org", "*.crates.io"], &[]).await;
        let cases = [
            ("http://example.org/x", "example.org:80", "\"example.org\""),
            ("http://crates.io/", "crates.io:80", "\"crates.io\""),
            (
                "http://static.crates.io:8080/",
                "static.crates.io:8080",
                "\"static.crates.io:8080\"",
            ),
            (
                "http://93.184.216.34/",
                "93.184.216.34:80",
                "\"*\" (any public host)",
            ),
        ];
        for (url, target, pattern) in cases {
            let answer = job.get(url).await;
            assert_eq!(answer.status, StatusCode::FORBIDDEN, "{url}");
            let want =
                format!("vmfarm: {target} is not in this job's network allow-list; add {pattern}");
            assert!(answer.text().starts_with(&want), "{}", answer.text());
            assert!(
                answer
                    .text()
                    .ends_with("to [network] allow in the manifest\n")
            );
            job.log.wait_for(&want).await;
        }
        assert!(
            !job.log.lines().iter().any(|l| l.starts_with("network ")),
            "refused connections leave no connection line: {:#?}",
            job.log.lines()
        );
    }

    #[tokio::test]
    async fn test_a_loopback_origin_is_refused_unless_allow_private_covers_it() {
        let origin = Origin::start().await;
        let url = format!("http://127.0.0.1:{}/hello", origin.port());
        let pattern = format!("*:{}", origin.port());

        let closed = Job::new(&[&pattern], &[]).await;
        let answer = closed.get(&url).await;
        assert_eq!(answer.status, StatusCode::FORBIDDEN);
        let want = format!(
            "vmfarm: 127.0.0.1:{}: 127.0.0.1 is not a public address (loopback); the worker connects only to public addresses unless the operator's [network] allow_private covers them",
            origin.port()
        );
        assert_eq!(answer.text().trim_end(), want);
        closed.log.wait_for(&want).await;
        assert_eq!(origin.requests_for("/hello"), 0);

        let open = Job::new(&[&pattern], &[LOOPBACK]).await;
        let answer = open.get(&url).await;
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(answer.text(), "hello from the origin\n");
        let line = open
            .log
            .wait_for(&format!("network 127.0.0.1:{}: 1 request", origin.port()))
            .await;
        assert!(
            line.contains("none from the cache; the guest sent "),
            "{line}"
        );
    }

    #[tokio::test]
    async fn test_a_name_that_resolves_to_a_private_address_is_refused() {
        let origin = Origin::start().await;
        let target = format!("localhost:{}", origin.port());
        let job = Job::new(&[&target], &["10.0.0.0/8"]).await;
        for answer in [
            job.get(&origin.url("/hello")).await,
            job.tunnel(&target).await.unwrap_err(),
        ] {
            assert_eq!(answer.status, StatusCode::FORBIDDEN);
            let text = answer.text();
            assert!(
                text.starts_with(&format!("vmfarm: {target}: localhost resolves to ")),
                "{text}"
            );
            assert!(text.contains("127.0.0.1 (loopback)"), "{text}");
            assert!(text.contains(", no public address; "), "{text}");
        }
        assert_eq!(origin.requests_for("/hello"), 0);
    }

    #[tokio::test]
    async fn test_connections_beyond_the_limit_get_a_503() {
        let echo = echo_server().await;
        let target = format!("localhost:{}", echo.port());
        let mut limits = limits();
        limits.max_connections = 2;
        let job = Job::with(&[&target], &[LOOPBACK], limits, 0).await;
        let first = job.tunnel(&target).await.unwrap();
        let _second = job.tunnel(&target).await.unwrap();
        let answer = job.tunnel(&target).await.unwrap_err();
        assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
        let want = "vmfarm: this job already has 2 connections open through the worker's proxy, the most it may have at once (network.max_connections_per_job in the worker's config)";
        assert_eq!(answer.text().trim_end(), want);
        job.log.wait_for(want).await;

        drop(first);
        job.log.wait_for(&format!("network {target}: tunnel")).await;
        let mut third = job.tunnel(&target).await.unwrap();
        third.write_all(b"ok").await.unwrap();
        let mut back = [0; 2];
        third.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"ok");
    }

    #[tokio::test]
    async fn test_close_ends_every_connection_of_the_job() {
        let echo = echo_server().await;
        let target = format!("localhost:{}", echo.port());
        let job = Job::new(&[&target], &[LOOPBACK]).await;
        let mut tunnel = job.tunnel(&target).await.unwrap();
        let (idle, served) = job.connect();
        job.net.close();
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), tunnel.read_to_end(&mut rest))
            .await
            .expect("the tunnel ends")
            .unwrap();
        tokio::time::timeout(Duration::from_secs(5), served)
            .await
            .expect("the idle connection ends")
            .unwrap();
        drop(idle);
        let line = job.log.wait_for(&format!("network {target}: tunnel")).await;
        assert!(line.ends_with("; closed at the job's end"), "{line}");

        // After the end, connections are dropped unanswered.
        let (mut late, served) = job.connect();
        served.await.unwrap();
        let mut nothing = Vec::new();
        late.read_to_end(&mut nothing).await.unwrap();
        assert!(nothing.is_empty());
    }

    #[tokio::test]
    async fn test_the_allow_list_switches_while_the_job_runs() {
        let origin = Origin::start().await;
        let target = format!("localhost:{}", origin.port());
        let job = Job::new(&[], &[LOOPBACK]).await;
        assert_eq!(
            job.get(&origin.url("/hello")).await.status,
            StatusCode::FORBIDDEN
        );
        job.net.set_allow(vec![target.parse().unwrap()]);
        assert_eq!(job.get(&origin.url("/hello")).await.status, StatusCode::OK);
        job.net.set_allow(vec![]);
        assert_eq!(
            job.get(&origin.url("/hello")).await.status,
            StatusCode::FORBIDDEN
        );
    }

    #[tokio::test]
    async fn test_requests_on_one_connection_leave_one_line() {
        let origin = Origin::start().await;
        let target = format!("localhost:{}", origin.port());
        let job = Job::new(&[&target], &[LOOPBACK]).await;
        let (guest, served) = job.connect();
        let mut sender = client(guest).await;
        for path in ["/hello", "/bytes/2048", "/nothing-here"] {
            let response = sender
                .send_request(request(hyper::Method::GET, &origin.url(path)))
                .await
                .unwrap();
            super::super::test_utils::Answer::read(response).await;
        }
        // Refused on the same connection: answered, logged, and the connection goes on.
        let refused = sender
            .send_request(request(hyper::Method::GET, "http://example.org/"))
            .await
            .unwrap();
        assert_eq!(refused.status(), StatusCode::FORBIDDEN);
        super::super::test_utils::Answer::read(refused).await;
        drop(sender);
        served.await.unwrap();
        let lines: Vec<String> = job
            .log
            .lines()
            .into_iter()
            .filter(|l| l.starts_with("network "))
            .collect();
        assert_eq!(lines.len(), 1, "{lines:#?}");
        assert!(
            lines[0].starts_with(&format!(
                "network {target}: 3 requests, none from the cache; the guest sent "
            )),
            "{}",
            lines[0]
        );
        assert!(lines[0].contains("received 2."), "{}", lines[0]);
    }

    /// The real thing: a client with `http_proxy`/`https_proxy` settings (reqwest) through the
    /// proxy to PyPI over https (CONNECT), and Debian's mirror over http, whose by-hash index is
    /// cached on the second fetch. These hosts are reachable from the test machines, some through
    /// a gateway whose address is not public (203.0.113.80, a documentation address, on the
    /// build machines): the operator opens such an address with `allow_private`, as done here.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn test_real_registries_through_the_proxy() {
        let mut gateways = Vec::new();
        for host in ["pypi.org", "deb.debian.org"] {
            for address in tokio::net::lookup_host((host, 443)).await.unwrap() {
                let ip = address.ip().to_canonical();
                if vmfarm_proto::network::non_public(ip).is_some() {
                    gateways.push(ip.to_string());
                }
            }
        }
        let gateways: Vec<&str> = gateways.iter().map(String::as_str).collect();
        let job = Job::new(&["pypi.org", "deb.debian.org"], &gateways).await;
        let proxy = job.listen().await;
        // The system's trust store, as curl or pip would use it (the build machines' gateway
        // presents certificates of a local authority kept there).
        let roots = std::fs::read("/etc/ssl/certs/ca-certificates.crt").unwrap();
        let mut client = reqwest::Client::builder();
        for root in reqwest::Certificate::from_pem_bundle(&roots).unwrap() {
            client = client.add_root_certificate(root);
        }
        let client = client
            .proxy(reqwest::Proxy::all(format!("http://{proxy}")).unwrap())
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap();

        let page = client
            .get("https://pypi.org/simple/six/")
            .send()
            .await
            .unwrap();
        assert_eq!(page.status(), StatusCode::OK);
        assert!(page.text().await.unwrap().contains("six-1.16.0"));

        let release = client
            .get("http://deb.debian.org/debian/dists/trixie/Release")
            .send()
            .await
            .unwrap();
        assert_eq!(release.status(), StatusCode::OK);
        let release = release.text().await.unwrap();
        // A small index of the kind apt fetches on amd64, from the SHA256 section:
        // "<hash> <size> <path>".
        let (hash, path) = release
            .split("\nSHA256:\n")
            .nth(1)
            .unwrap()
            .lines()
            .take_while(|l| l.starts_with(' '))
            .filter_map(|l| {
                let mut fields = l.split_whitespace();
                let (hash, size, path) = (fields.next()?, fields.next()?, fields.next()?);
                let size: u64 = size.parse().ok()?;
                (path.ends_with("/binary-amd64/Packages.xz") && (1000..1_000_000).contains(&size))
                    .then(|| (hash.to_owned(), path.to_owned()))
            })
            .next()
            .expect("a binary-amd64 Packages.xz under 1 MiB in the Release file");
        let dir = path.rsplit_once('/').unwrap().0;
        let url = format!("http://deb.debian.org/debian/dists/trixie/{dir}/by-hash/SHA256/{hash}");
        let mut bodies = Vec::new();
        for _ in 0..2 {
            let answer = client.get(&url).send().await.unwrap();
            assert_eq!(answer.status(), StatusCode::OK);
            let hit = answer.headers().get("x-vmfarm-cache").is_some();
            bodies.push((hit, answer.bytes().await.unwrap()));
        }
        assert!(!bodies[0].0 && bodies[1].0, "the second fetch is a hit");
        assert_eq!(bodies[0].1, bodies[1].1);
        assert_eq!(hex::encode(Sha256::digest(&bodies[1].1)), hash);
        assert_eq!(job.cache.stats().hits, 1);

        drop(client);
        job.log.wait_for("network pypi.org:443: tunnel; ").await;
        job.log.wait_for("network deb.debian.org:80: ").await;
    }
}
