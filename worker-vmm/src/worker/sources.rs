//! A manifest's sources, fetched on the worker host: git repositories are cloned, local paths
//! (only under the worker's `allowed_local_sources`) are copied; each becomes a tar archive to
//! upload into the guest's build directory.
//!
//! A clone goes through the same gate as the tasks' traffic ([`Gate`]): only over https or
//! http, through the job's proxy (which lets the sources' hosts through, refuses non-public
//! addresses, and caps the bytes), with none of the worker's own credentials: an empty
//! environment and HOME, no system or user git config, no credential helper, no ssh agent.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use tokio::io::AsyncReadExt as _;
use tokio::process::Command;
use vmfarm_proto::manifest::Source;
use vmfarm_proto::units::ByteSize;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(
        "source {url}: local paths must be under one of the worker's allowed_local_sources ({allowed})"
    )]
    NotAllowed { url: String, allowed: String },
    #[error("source {url}: {tool} failed: {message}")]
    Tool {
        url: String,
        tool: &'static str,
        message: String,
    },
    #[error(
        "source {url}: the worker fetches sources over https or http, or from allowed local paths"
    )]
    Protocol { url: String },
    #[error("source {url} is larger than the job's limit of {limit}")]
    TooLarge { url: String, limit: ByteSize },
    #[error("source {url}: cannot run {tool}")]
    Spawn {
        url: String,
        tool: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// A source made ready for upload: a tar of its tree, and where it lands.
#[derive(Debug)]
pub struct FetchedSource {
    pub tar: PathBuf,
    pub path: String,
}

/// A local path a source names, if it is one (`file://...` or an absolute path).
fn local_path(url: &str) -> Option<PathBuf> {
    if let Some(rest) = url.strip_prefix("file://") {
        return Some(PathBuf::from(rest));
    }
    url.starts_with('/').then(|| PathBuf::from(url))
}

/// Whether `path` lies under one of `allowed` (both made canonical, so `..` and links cannot escape).
pub fn is_allowed(path: &Path, allowed: &[PathBuf]) -> bool {
    let Ok(real) = path.canonicalize() else {
        return false;
    };
    allowed
        .iter()
        .filter_map(|a| a.canonicalize().ok())
        .any(|a| real.starts_with(a))
}

/// Runs one tool of a fetch to its end. The tool leads a process group of its own, which is
/// killed whole when the returned future is dropped before the tool has ended (the job's
/// deadline or a cancel), so that no `git` (nor its helpers) outlives its job.
async fn run(url: &str, tool: &'static str, cmd: &mut Command) -> Result<(), SourceError> {
    let spawn_err = |source| SourceError::Spawn {
        url: url.to_owned(),
        tool,
        source,
    };
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    crate::backend::die_with_parent(cmd.as_std_mut());
    let mut child = cmd.spawn().map_err(spawn_err)?;
    // Declared after `child`, so dropped before it: the group is killed while its leader is
    // still unreaped, hence while its id still names this group.
    let group = KillGroupOnDrop(child.id());
    let mut pipe = child.stderr.take();
    let mut stderr = Vec::new();
    let read_stderr = async {
        if let Some(pipe) = pipe.as_mut() {
            let _ = pipe.read_to_end(&mut stderr).await;
        }
    };
    let ((), status) = tokio::join!(read_stderr, child.wait());
    let status = status.map_err(spawn_err)?;
    group.disarm();
    if status.success() {
        return Ok(());
    }
    Err(SourceError::Tool {
        url: url.to_owned(),
        tool,
        message: String::from_utf8_lossy(&stderr).trim().to_owned(),
    })
}

/// The process group of a tool that has not ended yet; killed when dropped.
struct KillGroupOnDrop(Option<u32>);

impl KillGroupOnDrop {
    /// The tool ended and was reaped: nothing is left to kill, and its id may be reused.
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for KillGroupOnDrop {
    fn drop(&mut self) {
        let Some(group) = self.0.and_then(|id| libc::pid_t::try_from(id).ok()) else {
            return;
        };
        // SAFETY: kill(2) takes plain integers and touches no memory. A negative pid names
        // the process group the tool leads (spawned with `process_group(0)`); that group is
        // still this tool's, as the tool has not been reaped (see `run`).
        unsafe {
            libc::kill(-group, libc::SIGKILL);
        }
    }
}

/// How a job's fetches reach the network, and how much they may bring.
#[derive(Debug, Clone)]
pub struct Gate {
    /// The job's proxy for its sources, as `http://127.0.0.1:PORT`.
    pub proxy: String,
    /// An empty folder that is the tools' HOME.
    pub home: PathBuf,
    /// The most a source's tree may hold.
    pub max_bytes: u64,
}

impl Gate {
    /// `cmd` with only what a fetch may use: no variable of the worker's, no config or
    /// credential of its user, git's protocols limited to `protocols`.
    fn confine<'c>(&self, cmd: &'c mut Command, protocols: &str) -> &'c mut Command {
        cmd.env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("HOME", &self.home)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_ALLOW_PROTOCOL", protocols)
            .env("http_proxy", &self.proxy)
            .env("https_proxy", &self.proxy)
            .env("no_proxy", "")
    }
}

/// The hosts (as `host:port`) the remote sources of a manifest fetch from.
pub fn hosts(sources: &[Source]) -> Vec<String> {
    sources.iter().filter_map(|s| remote_host(&s.url)).collect()
}

/// `host:port` of an http(s) URL.
fn remote_host(url: &str) -> Option<String> {
    let (rest, port) = if let Some(rest) = url.strip_prefix("https://") {
        (rest, 443)
    } else {
        (url.strip_prefix("http://")?, 80)
    };
    let authority = rest.split(['/', '?', '#']).next()?;
    let host_port = authority.rsplit('@').next()?;
    if host_port.contains(':') {
        Some(host_port.to_ascii_lowercase())
    } else {
        Some(format!("{}:{port}", host_port.to_ascii_lowercase()))
    }
}

/// Fetches `source` into `work` (a scratch folder of the job) through `gate`, and packs it.
pub async fn fetch(
    source: &Source,
    index: usize,
    work: &Path,
    allowed: &[PathBuf],
    gate: &Gate,
) -> Result<FetchedSource, SourceError> {
    let url = source.url.as_str();
    let tree = work.join(format!("source-{index}"));
    let local = local_path(url);
    if let Some(path) = &local
        && !is_allowed(path, allowed)
    {
        return Err(SourceError::NotAllowed {
            url: url.to_owned(),
            allowed: if allowed.is_empty() {
                "none are configured".to_owned()
            } else {
                allowed
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            },
        });
    }
    let is_git_repo = match &local {
        Some(path) => path.join(".git").exists() || path.join("HEAD").is_file(),
        None => true,
    };
    if local.is_none() && remote_host(url).is_none() {
        return Err(SourceError::Protocol {
            url: url.to_owned(),
        });
    }
    if is_git_repo {
        let protocols = if local.is_some() {
            "file"
        } else {
            "http:https"
        };
        let mut clone = Command::new("git");
        gate.confine(&mut clone, protocols);
        clone.args([
            "-c",
            "credential.helper=",
            "-c",
            "core.askPass=",
            "clone",
            "--quiet",
        ]);
        if local.is_some() {
            clone.arg("--no-hardlinks");
        }
        clone.arg("--").arg(url).arg(&tree);
        run(url, "git clone", &mut clone).await?;
        if let Some(git_ref) = &source.git_ref {
            let mut checkout = Command::new("git");
            gate.confine(&mut checkout, protocols);
            checkout.arg("-C").arg(&tree).args([
                "checkout",
                "--quiet",
                "--detach",
                git_ref.as_str(),
                "--",
            ]);
            run(url, "git checkout", &mut checkout).await?;
        }
    } else if let Some(path) = &local {
        // A plain folder: copied as it is (no ref applies).
        let mut copy = Command::new("cp");
        copy.arg("-a").arg("--").arg(path).arg(&tree);
        run(url, "cp", &mut copy).await?;
    }
    if tree_bytes(&tree) > gate.max_bytes {
        let _ = tokio::fs::remove_dir_all(&tree).await;
        return Err(SourceError::TooLarge {
            url: url.to_owned(),
            limit: ByteSize(gate.max_bytes),
        });
    }
    let tar = work.join(format!("source-{index}.tar"));
    let mut pack = Command::new("tar");
    pack.arg("-C").arg(&tree).arg("-cf").arg(&tar).arg(".");
    run(url, "tar", &mut pack).await?;
    let _ = tokio::fs::remove_dir_all(&tree).await;
    Ok(FetchedSource {
        tar,
        path: source.path.clone(),
    })
}

/// Fetches each of a job's sources in turn into its scratch folder `work`.
pub async fn fetch_all(
    sources: Vec<Source>,
    work: PathBuf,
    allowed: Vec<PathBuf>,
    gate: Gate,
) -> Result<Vec<FetchedSource>, SourceError> {
    let mut fetched = Vec::with_capacity(sources.len());
    for (i, source) in sources.iter().enumerate() {
        fetched.push(fetch(source, i, &work, &allowed, &gate).await?);
    }
    Ok(fetched)
}

/// Bytes the files under `dir` hold (links not followed).
fn tree_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            match entry.metadata() {
                Ok(meta) if meta.is_dir() => stack.push(entry.path()),
                Ok(meta) => total += meta.len(),
                Err(_) => {}
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A gate whose proxy answers nothing.
    fn gate(home: &Path) -> Gate {
        Gate {
            proxy: "http://127.0.0.1:9".into(),
            home: home.to_owned(),
            max_bytes: 1 << 30,
        }
    }

    #[test]
    fn test_remote_hosts_of_sources() {
        let cases = [
            ("https://github.com/a/b.git", Some("github.com:443")),
            ("http://Example.org:8080/x", Some("example.org:8080")),
            ("https://user@host.example/x", Some("host.example:443")),
            ("ssh://git@host/x", None),
            ("git@host:x.git", None),
            ("/srv/repo", None),
        ];
        for (url, want) in cases {
            assert_eq!(remote_host(url).as_deref(), want, "{url}");
        }
    }

    #[tokio::test]
    async fn test_only_https_http_and_local_paths_are_fetched() {
        let work = tempfile::tempdir().unwrap();
        for url in ["ssh://git@host/x.git", "git://host/x.git", "git@host:x.git"] {
            let source = Source {
                url: url.into(),
                git_ref: None,
                path: "x".into(),
            };
            let err = fetch(&source, 0, work.path(), &[], &gate(work.path()))
                .await
                .unwrap_err();
            assert!(matches!(err, SourceError::Protocol { .. }), "{url}: {err}");
        }
    }

    /// The worker's user's git config (here: a rewrite of an unreachable URL to a local
    /// repository) is not read by a fetch.
    #[tokio::test]
    async fn test_a_fetch_uses_nothing_of_the_workers_home() {
        let repo = tempfile::tempdir().unwrap();
        let ok = std::process::Command::new("git")
            .args(["init", "--quiet"])
            .arg(repo.path())
            .status()
            .unwrap()
            .success();
        assert!(ok);
        let home = tempfile::tempdir().unwrap();
        std::fs::write(
            home.path().join(".gitconfig"),
            format!(
                "[url \"file://{}\"]\n\tinsteadOf = https://example.invalid/\n[credential]\n\thelper = store\n",
                repo.path().display()
            ),
        )
        .unwrap();
        // SAFETY: this test runs in a process of its own (nextest); nothing else reads the
        // environment meanwhile.
        unsafe { std::env::set_var("HOME", home.path()) };
        let work = tempfile::tempdir().unwrap();
        let empty = tempfile::tempdir().unwrap();
        let source = Source {
            url: "https://example.invalid/repo.git".into(),
            git_ref: None,
            path: "repo".into(),
        };
        let err = fetch(&source, 0, work.path(), &[], &gate(empty.path()))
            .await
            .unwrap_err();
        // Through the (dead) proxy, not rewritten to the local repository.
        assert!(
            matches!(&err, SourceError::Tool { message, .. } if message.contains("127.0.0.1")),
            "{err}"
        );
    }

    #[tokio::test]
    async fn test_a_source_over_the_limit_is_refused() {
        let repo = tempfile::tempdir().unwrap();
        std::fs::write(repo.path().join("big"), vec![0u8; 4096]).unwrap();
        let work = tempfile::tempdir().unwrap();
        let source = Source {
            url: repo.path().display().to_string(),
            git_ref: None,
            path: "r".into(),
        };
        let mut small = gate(work.path());
        small.max_bytes = 1024;
        let err = fetch(&source, 0, work.path(), &[repo.path().to_owned()], &small)
            .await
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("larger than the job's limit of 1KiB"),
            "{err}"
        );
    }

    #[test]
    fn test_local_paths_and_allow_list() {
        assert_eq!(local_path("file:///srv/x"), Some(PathBuf::from("/srv/x")));
        assert_eq!(local_path("/srv/x"), Some(PathBuf::from("/srv/x")));
        assert_eq!(local_path("https://h/x.git"), None);
        let dir = tempfile::tempdir().unwrap();
        let inside = dir.path().join("repo");
        std::fs::create_dir(&inside).unwrap();
        let allowed = vec![dir.path().to_owned()];
        assert!(is_allowed(&inside, &allowed));
        assert!(!is_allowed(&inside.join("../.."), &allowed));
        assert!(!is_allowed(Path::new("/etc"), &allowed));
        assert!(!is_allowed(&inside, &[]));
    }

    #[tokio::test]
    async fn test_fetch_refuses_paths_outside_the_allow_list() {
        let work = tempfile::tempdir().unwrap();
        let source = Source {
            url: "/etc".into(),
            git_ref: None,
            path: "etc".into(),
        };
        let err = fetch(&source, 0, work.path(), &[], &gate(work.path()))
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("allowed_local_sources") && err.contains("none are configured"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn test_fetch_clones_a_local_repository_at_a_ref() {
        let repo = tempfile::tempdir().unwrap();
        let git = |args: &[&str]| {
            let ok = std::process::Command::new("git")
                .arg("-C")
                .arg(repo.path())
                .args(["-c", "user.name=t", "-c", "user.email=t@t"])
                .args(args)
                .status()
                .unwrap()
                .success();
            assert!(ok, "git {args:?}");
        };
        git(&["init", "--quiet"]);
        std::fs::write(repo.path().join("a.txt"), "one").unwrap();
        git(&["add", "a.txt"]);
        git(&["commit", "--quiet", "-m", "one"]);
        git(&["tag", "v1"]);
        std::fs::write(repo.path().join("a.txt"), "two").unwrap();
        git(&["commit", "--quiet", "-am", "two"]);
        let work = tempfile::tempdir().unwrap();
        let source = Source {
            url: format!("file://{}", repo.path().display()),
            git_ref: Some("v1".into()),
            path: "project".into(),
        };
        let fetched = fetch(
            &source,
            0,
            work.path(),
            &[repo.path().to_owned()],
            &gate(work.path()),
        )
        .await
        .unwrap();
        let out = tempfile::tempdir().unwrap();
        let ok = std::process::Command::new("tar")
            .arg("-C")
            .arg(out.path())
            .arg("-xf")
            .arg(&fetched.tar)
            .status()
            .unwrap()
            .success();
        assert!(ok);
        assert_eq!(
            std::fs::read_to_string(out.path().join("a.txt")).unwrap(),
            "one"
        );
        assert_eq!(fetched.path, "project");
    }

    /// Whether process `pid` has ended (gone, or a zombie waiting to be reaped).
    fn ended(pid: &str) -> bool {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Ok(stat) => stat
                .rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z'),
            Err(_) => true,
        }
    }

    #[tokio::test]
    async fn test_a_fetch_stopped_midway_kills_its_tools_and_their_children() {
        let dir = tempfile::tempdir().unwrap();
        let pids = dir.path().join("pids");
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg("echo $$ > \"$1\"; sleep 300 & echo $! >> \"$1\"; wait")
            .arg("sh")
            .arg(&pids);
        let limit = std::time::Duration::from_millis(500);
        let ran = tokio::time::timeout(limit, run("test", "sh", &mut cmd)).await;
        assert!(ran.is_err(), "the tool was still running: {ran:?}");
        let pids = std::fs::read_to_string(&pids).unwrap();
        let pids: Vec<&str> = pids.split_whitespace().collect();
        assert_eq!(pids.len(), 2, "{pids:?}");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !pids.iter().all(|pid| ended(pid)) {
            assert!(
                std::time::Instant::now() < deadline,
                "the tool or its child outlived the fetch: {pids:?}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
}
