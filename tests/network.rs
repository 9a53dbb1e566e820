//! The guest network end to end (real guests under QEMU, the worker's proxy, the package
//! registries this machine reaches): builds reach the hosts they name, through the worker,
//! and nothing else.

mod common;

use common::farm::{TestWorker, images};
use common::{Api, Backend, TestServer, log_of, wait_ended};
use serde_json::Value;
use std::net::{IpAddr, ToSocketAddrs};

const WORKER: &str = "[slots]\ncpus = 2\nmemory = \"3GiB\"\n[guest]\ndefault_cpus = 1\n\
                      default_memory = \"1GiB\"\nboot_timeout = \"180s\"\n";

/// The registries the tests reach. Here they resolve to an egress gateway at a non-public
/// address; an operator in that place allows it (`[network] allow_private`), as does this.
const REGISTRIES: [&str; 3] = ["deb.debian.org", "pypi.org", "files.pythonhosted.org"];

/// `allow_private` entries for the registries' addresses that are not public (none where they
/// are public).
fn registry_gateways() -> Vec<String> {
    let mut ranges: Vec<String> = REGISTRIES
        .iter()
        .flat_map(|host| (*host, 443).to_socket_addrs().into_iter().flatten())
        .map(|addr| addr.ip())
        .filter(|ip| vmfarm_proto::network::non_public(*ip).is_some())
        .map(|ip| match ip {
            IpAddr::V4(v4) => format!("\"{v4}/32\""),
            IpAddr::V6(v6) => format!("\"{v6}/128\""),
        })
        .collect();
    ranges.sort();
    ranges.dedup();
    ranges
}

/// A server whose network policy allows any public host on 80 and 443 (and on `ports`), and
/// the non-public `extra_private` besides the registries' gateways.
fn server(ports: &[u16], extra_private: &[&str]) -> TestServer {
    let mut private = registry_gateways();
    private.extend(extra_private.iter().map(|r| format!("\"{r}\"")));
    let mut allow = vec!["\"*\"".to_owned()];
    allow.extend(ports.iter().map(|p| format!("\"*:{p}\"")));
    TestServer::start_with(
        Backend::Sqlite,
        &format!(
            "[network]\nallow = [{}]\nallow_private = [{}]\n",
            allow.join(", "),
            private.join(", ")
        ),
    )
}

async fn run(api: &Api, manifest: &str) -> (Value, String) {
    let id = api.submit(manifest).await.jobs[0].id.clone();
    let job = wait_ended(api, &id).await;
    let log = log_of(api, &id).await;
    (job, log)
}

/// The token of the worker's /metrics listener.
const METRICS_TOKEN: &str = "scrape-me";

/// [`WORKER`] with its /metrics listener on a free loopback port, and that listener's URL.
fn with_metrics() -> (String, String) {
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = free.local_addr().unwrap().port();
    drop(free);
    (
        format!("{WORKER}[metrics]\nlisten = \"127.0.0.1:{port}\"\ntoken = \"{METRICS_TOKEN}\"\n"),
        format!("http://127.0.0.1:{port}/metrics"),
    )
}

fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_packages_install_and_the_second_run_is_served_from_the_cache() {
    let dir = images(&["debian-13"]);
    let server = server(&[], &[]);
    let (config, scrape) = with_metrics();
    let worker = TestWorker::start(&server, 0, &dir, &config);
    let api = server.admin();
    let manifest = r#"image = "debian-13"
timeout = "20m"
packages = ["zlib1g-dev"]
[[tasks]]
name = "build"
script = '''
cat > z.c <<'C'
#include <zlib.h>
#include <stdio.h>
int main(void) { printf("zlib %s\n", zlibVersion()); return 0; }
C
cc -o z z.c -lz
./z
'''
[[artifacts]]
path = "z"
"#;
    let (job, log) = run(&api, manifest).await;
    assert_eq!(job["state"], "succeeded", "{job}\n{log}\n{}", worker.log());
    assert_eq!(job["tasks"][0]["name"], "packages");
    assert_eq!(job["tasks"][0]["state"], "succeeded");
    assert!(log.contains("zlib 1."), "{log}");
    assert!(log.contains("[vmfarm] network deb.debian.org:80"), "{log}");
    // The artifact runs here too (the host has zlib).
    let id = job["id"].as_str().unwrap();
    let bin = api.get_bytes(&format!("/api/jobs/{id}/artifacts/z")).await;
    let out = tempfile::tempdir().unwrap();
    let path = out.path().join("z");
    std::fs::write(&path, &bin).unwrap();
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let ran = std::process::Command::new(&path).output().unwrap();
    assert!(String::from_utf8_lossy(&ran.stdout).starts_with("zlib 1."));

    // The worker's own /metrics listener asks for its token.
    let http = reqwest::Client::new();
    let refused = http.get(&scrape).send().await.unwrap();
    assert_eq!(refused.status(), reqwest::StatusCode::UNAUTHORIZED);
    let metrics = || async {
        let answer = http
            .get(&scrape)
            .bearer_auth(METRICS_TOKEN)
            .send()
            .await
            .unwrap();
        assert!(answer.status().is_success(), "{}", answer.status());
        let text = answer.text().await.unwrap();
        (
            metric(&text, "vmfarm_worker_proxy_cache_served_bytes_total"),
            metric(&text, "vmfarm_worker_proxy_cache_fetched_bytes_total"),
            text,
        )
    };
    let (served_before, fetched_before, _) = metrics().await;
    let (again, log) = run(&api, manifest).await;
    assert_eq!(again["state"], "succeeded", "{again}\n{log}");
    let (served, fetched, text) = metrics().await;
    for (name, at_least) in [
        (
            "vmfarm_worker_boot_duration_seconds_count{image=\"debian-13\"}",
            2,
        ),
        (
            "vmfarm_worker_job_start_duration_seconds_count{image=\"debian-13\"}",
            2,
        ),
        ("vmfarm_worker_jobs_finished_total{state=\"succeeded\"}", 2),
        ("vmfarm_worker_proxy_sent_bytes_total", 1_000_000),
    ] {
        assert!(
            metric(&text, name) >= at_least,
            "{name} >= {at_least} in:\n{text}"
        );
    }
    let (served, fetched) = (served - served_before, fetched - fetched_before);
    eprintln!("second run: {served} bytes from the cache, {fetched} fetched");
    assert!(
        served * 10 >= (served + fetched) * 9,
        "at least 90% from the cache: {served} served, {fetched} fetched"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_a_venv_installs_from_pypi_and_nothing_else_is_reached() {
    let dir = images(&["debian-12"]);
    let server = server(&[], &[]);
    let worker = TestWorker::start(&server, 0, &dir, WORKER);
    let api = server.admin();
    let manifest = "image = \"debian-12\"\ntimeout = \"20m\"\npackages = [\"python3-venv\"]\n\
        [network]\nallow = [\"pypi.org\", \"files.pythonhosted.org\"]\n\
        [[tasks]]\nname = \"venv\"\nscript = '''\n\
        python3 -m venv v\nv/bin/pip install --quiet six\nv/bin/python -c 'import six; print(\"six\", six.__version__)'\n'''\n\
        [[tasks]]\nname = \"denied\"\nscript = \"git ls-remote https://example.com/nothing.git\"\n";
    let (job, log) = run(&api, manifest).await;
    assert_eq!(job["state"], "failed", "{job}\n{log}\n{}", worker.log());
    assert_eq!(job["tasks"][1]["state"], "succeeded", "{log}");
    assert!(log.contains("six 1."), "{log}");
    assert_eq!(job["tasks"][2]["state"], "failed", "the build's fault");
    assert!(
        log.contains("vmfarm: example.com:443 is not in this job's network allow-list"),
        "{log}"
    );

    // Without [network], the tasks reach nothing.
    let (job, log) = run(
        &api,
        "image = \"debian-12\"\n[[tasks]]\nname = \"t\"\nscript = \"git ls-remote https://pypi.org/x.git\"\n",
    )
    .await;
    assert_eq!(job["state"], "failed", "{job}");
    assert!(
        log.contains("vmfarm: pypi.org:443 is not in this job's network allow-list"),
        "{log}"
    );
}

/// A guest that boots by firmware, with no agent, has the same network: its packages come
/// through the worker's proxy (the image's mirrors, as root by sudo), its tasks reach the hosts
/// the job allows and nothing else, all over its own OpenSSH.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_a_cloud_image_reaches_what_the_job_allows_through_the_proxy() {
    let dir = images(&["debian-12-cloud"]);
    let server = server(&[], &[]);
    let worker = TestWorker::start(&server, 0, &dir, WORKER);
    let api = server.admin();
    let manifest = "image = \"debian-12-cloud\"\ntimeout = \"20m\"\npackages = [\"python3-venv\"]\n\
        [network]\nallow = [\"pypi.org\", \"files.pythonhosted.org\"]\n\
        [[tasks]]\nname = \"venv\"\nscript = '''\n\
        python3 -m venv v\nv/bin/pip install --quiet six\nv/bin/python -c 'import six; print(\"six\", six.__version__)'\n'''\n\
        [[tasks]]\nname = \"denied\"\nscript = \"git ls-remote https://example.com/nothing.git\"\n";
    let (job, log) = run(&api, manifest).await;
    assert_eq!(job["state"], "failed", "{job}\n{log}\n{}", worker.log());
    assert_eq!(job["tasks"][0]["state"], "succeeded", "packages: {log}");
    assert_eq!(job["tasks"][1]["state"], "succeeded", "{log}");
    assert!(log.contains("six 1."), "{log}");
    assert!(log.contains("[vmfarm] network deb.debian.org:80"), "{log}");
    assert_eq!(job["tasks"][2]["state"], "failed", "the build's fault");
    assert!(
        log.contains("vmfarm: example.com:443 is not in this job's network allow-list"),
        "{log}"
    );
}

/// A host-side HTTP server on loopback, serving `body` to any GET; its port.
fn loopback_server(body: &'static str) -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for mut conn in listener.incoming().flatten() {
            let mut buf = [0u8; 4096];
            let _ = conn.read(&mut buf);
            let _ = write!(
                conn,
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_private_addresses_are_refused_unless_the_operator_allows_them() {
    let dir = images(&["debian-12"]);
    let port = loopback_server("hello from the host\n");
    let manifest = format!(
        "image = \"debian-12\"\n[network]\nallow = [\"localhost:{port}\"]\n\
         [[tasks]]\nname = \"get\"\nscript = '''\n\
         exec 3<>/dev/tcp/127.0.0.1/$(echo $http_proxy | sed 's/.*://')\n\
         printf 'GET http://localhost:{port}/ HTTP/1.1\\r\\nHost: localhost:{port}\\r\\nConnection: close\\r\\n\\r\\n' >&3\n\
         cat <&3\n'''\n"
    );
    {
        let server = server(&[port], &[]);
        let _worker = TestWorker::start(&server, 0, &dir, WORKER);
        let (job, log) = run(&server.admin(), &manifest).await;
        assert_eq!(job["state"], "succeeded", "{job}");
        assert!(log.contains("403"), "{log}");
        assert!(
            log.contains("127.0.0.1") && log.contains("loopback"),
            "{log}"
        );
        assert!(!log.contains("hello from the host"), "{log}");

        // A source at a private address is refused too, with the worker's reason.
        let (job, log) = run(
            &server.admin(),
            &format!(
                "image = \"debian-12\"\n[[sources]]\nurl = \"http://localhost:{port}/repo.git\"\n\
                 [[tasks]]\nname = \"t\"\nscript = \"true\"\n"
            ),
        )
        .await;
        assert!(
            ["failed", "error"].contains(&job["state"].as_str().unwrap_or("")),
            "{job}"
        );
        assert!(
            log.contains("127.0.0.1") && log.contains("loopback"),
            "{log}"
        );
    }
    let server = server(&[port], &["127.0.0.0/8"]);
    let _worker = TestWorker::start(&server, 0, &dir, WORKER);
    let (job, log) = run(&server.admin(), &manifest).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert!(log.contains("hello from the host"), "{log}");
}
