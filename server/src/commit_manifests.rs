//! A pushed commit's manifests: the server fetches that one commit (shallow, into a scratch
//! bare repository under its data dir, removed after) and reads `.vmfarm.toml` and
//! `.vmfarm/*.toml` from it. Everything is bounded: the time git may take, the number of files
//! and each file's size.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::process::Command;

/// Most manifest files one commit builds.
pub const MAX_FILES: usize = 20;

/// How long fetching the commit may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(120);

/// One manifest file of the commit: its text, or why it cannot be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestFile {
    pub path: String,
    pub text: Result<String, String>,
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("cannot fetch commit {commit} from {url}: {detail}")]
    Git {
        url: String,
        commit: String,
        detail: String,
    },
    #[error("fetching commit {commit} from {url} took longer than {}s", FETCH_TIMEOUT.as_secs())]
    Timeout { url: String, commit: String },
    #[error("cannot make a scratch repository under {dir}")]
    Scratch {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Whether `text` is a full commit id (SHA-1 or SHA-256, lower-case hex).
pub fn is_commit_id(text: &str) -> bool {
    matches!(text.len(), 40 | 64)
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// How many commits are fetched at once; more wait their turn.
static FETCHES: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(4);

/// A pushed commit: its id (an annotated tag's peeled to its commit) and its manifests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    pub commit: String,
    pub files: Vec<ManifestFile>,
}

/// Empties the scratch folder of what a killed server left there.
pub fn clear_scratch(scratch_root: &Path) {
    if let Err(e) = std::fs::remove_dir_all(scratch_root)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(dir = %scratch_root.display(), error = %e, "cannot empty the pushes' scratch folder");
    }
}

/// A scratch folder, removed when dropped (a push whose request went away included).
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The manifests of `commit` in the repository at `url`, in path order (`.vmfarm.toml` first);
/// each at most `max_bytes`. Only the commit's trees come whole (a partial fetch where the
/// repository allows it); the manifests' own contents are fetched one by one.
pub async fn read(
    scratch_root: &Path,
    url: &str,
    commit: &str,
    max_bytes: u64,
) -> Result<Fetched, FetchError> {
    let _turn = FETCHES.acquire().await;
    let name = format!(
        "push-{}",
        crate::random::random_hex(8).map_err(|e| FetchError::Scratch {
            dir: scratch_root.to_owned(),
            source: std::io::Error::other(e.to_string()),
        })?
    );
    let dir = Scratch(scratch_root.join(name));
    tokio::fs::create_dir_all(&dir.0)
        .await
        .map_err(|source| FetchError::Scratch {
            dir: dir.0.clone(),
            source,
        })?;
    read_in(&dir.0, url, commit, max_bytes).await
}

async fn read_in(
    dir: &Path,
    url: &str,
    commit: &str,
    max_bytes: u64,
) -> Result<Fetched, FetchError> {
    let fail = |detail: String| FetchError::Git {
        url: url.to_owned(),
        commit: commit.to_owned(),
        detail,
    };
    let setup: [&[&str]; 4] = [
        &["init", "--quiet", "--bare", "."],
        &["config", "remote.origin.url", url],
        &["config", "remote.origin.promisor", "true"],
        &["config", "remote.origin.partialclonefilter", "blob:none"],
    ];
    for args in setup {
        git(dir, args).await.map_err(fail)?;
    }
    let fetch_args = [
        "fetch",
        "--quiet",
        "--depth=1",
        "--no-tags",
        "--filter=blob:none",
        "origin",
        commit,
    ];
    match tokio::time::timeout(FETCH_TIMEOUT, git(dir, &fetch_args)).await {
        Err(_) => {
            return Err(FetchError::Timeout {
                url: url.to_owned(),
                commit: commit.to_owned(),
            });
        }
        Ok(result) => result.map_err(fail)?,
    };
    let peeled = git(
        dir,
        &["rev-parse", "--verify", &format!("{commit}^{{commit}}")],
    )
    .await
    .map_err(fail)?
    .trim()
    .to_owned();
    let listing = git(
        dir,
        &[
            "ls-tree",
            "-z",
            "--full-tree",
            &peeled,
            "--",
            ".vmfarm.toml",
            ".vmfarm/",
        ],
    )
    .await
    .map_err(fail)?;
    let mut files = Vec::new();
    let mut left_out = 0;
    for entry in listing.split('\0').filter(|e| !e.is_empty()) {
        // `MODE TYPE OID\tPATH`
        let Some((meta, path)) = entry.split_once('\t') else {
            continue;
        };
        let fields: Vec<&str> = meta.split_whitespace().collect();
        let [_, kind, oid] = fields[..] else {
            continue;
        };
        if kind != "blob" || !is_manifest_path(path) {
            continue;
        }
        if files.len() == MAX_FILES {
            left_out += 1;
            continue;
        }
        let text = manifest_text(dir, oid, max_bytes).await;
        files.push(ManifestFile {
            path: path.to_owned(),
            text,
        });
    }
    if left_out > 0 {
        files.push(ManifestFile {
            path: format!(".vmfarm/ ({left_out} more)"),
            text: Err(format!(
                "{left_out} manifest files left out: a commit builds at most {MAX_FILES}"
            )),
        });
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(Fetched {
        commit: peeled,
        files,
    })
}

/// The text of blob `oid` (fetched now when the partial fetch left it out), if it is at most
/// `max_bytes` of UTF-8.
async fn manifest_text(dir: &Path, oid: &str, max_bytes: u64) -> Result<String, String> {
    let size: u64 = git(dir, &["cat-file", "-s", oid])
        .await?
        .trim()
        .parse()
        .unwrap_or(u64::MAX);
    if size > max_bytes {
        return Err(format!(
            "the manifest is {size} bytes; the limit is {}",
            vmfarm_proto::units::ByteSize(max_bytes)
        ));
    }
    let bytes = git_bytes(dir, &["cat-file", "blob", oid]).await?;
    String::from_utf8(bytes).map_err(|_| "the manifest is not UTF-8 text".to_owned())
}

/// `.vmfarm.toml`, or a `.toml` file directly in `.vmfarm/`.
fn is_manifest_path(path: &str) -> bool {
    path == ".vmfarm.toml"
        || path
            .strip_prefix(".vmfarm/")
            .is_some_and(|name| name.ends_with(".toml") && !name.contains('/'))
}

/// [`git_bytes`]'s output as text (bytes that are not UTF-8 replaced).
async fn git(dir: &Path, args: &[&str]) -> Result<String, String> {
    Ok(String::from_utf8_lossy(&git_bytes(dir, args).await?).into_owned())
}

/// Runs git in `dir` with no user or system config, no prompts and only the file and http(s)
/// transports; its stdout, or its stderr as the error.
async fn git_bytes(dir: &Path, args: &[&str]) -> Result<Vec<u8>, String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args([
            "-c",
            "credential.helper=",
            "-c",
            "core.askPass=",
            "-c",
            "protocol.file.allow=always",
            // A repository on this host serves the partial fetch too.
            "-c",
            "uploadpack.allowFilter=true",
        ])
        .args(args)
        .env("HOME", dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_ALLOW_PROTOCOL", "file:http:https")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| format!("cannot run git: {e}"))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let last = stderr
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        return Err(format!("git {} failed: {}", args[0], last.trim()));
    }
    Ok(out.stdout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_only_top_level_toml_files_of_the_folder_are_manifests() {
        assert!(is_manifest_path(".vmfarm.toml"));
        assert!(is_manifest_path(".vmfarm/build.toml"));
        assert!(!is_manifest_path(".vmfarm/sub/build.toml"));
        assert!(!is_manifest_path(".vmfarm/README.md"));
    }

    #[test]
    fn test_commit_ids_are_full_lower_case_hex() {
        assert!(is_commit_id(&"a".repeat(40)));
        assert!(is_commit_id(&"0".repeat(64)));
        assert!(!is_commit_id("main"));
        assert!(!is_commit_id(&"A".repeat(40)));
        assert!(!is_commit_id(&"a".repeat(39)));
    }

    #[tokio::test]
    async fn test_reads_the_manifests_of_exactly_the_given_commit() {
        let repo = tempfile::tempdir().unwrap();
        let scratch = tempfile::tempdir().unwrap();
        let run = |args: &[&str]| crate::test_utils::git(repo.path(), args);
        run(&["init", "--quiet", "--initial-branch=main"]);
        std::fs::create_dir(repo.path().join(".vmfarm")).unwrap();
        std::fs::write(repo.path().join(".vmfarm/a.toml"), "first").unwrap();
        std::fs::write(repo.path().join(".vmfarm/notes.txt"), "no").unwrap();
        run(&["add", "."]);
        run(&["commit", "--quiet", "-m", "one"]);
        let first = run(&["rev-parse", "HEAD"]);
        std::fs::write(repo.path().join(".vmfarm/a.toml"), "second").unwrap();
        std::fs::write(repo.path().join(".vmfarm.toml"), "top").unwrap();
        run(&["add", "."]);
        run(&["commit", "--quiet", "-m", "two"]);
        let url = repo.path().to_str().unwrap();

        let fetched = read(scratch.path(), url, &first, 1024).await.unwrap();
        assert_eq!(fetched.commit, first);
        assert_eq!(
            fetched.files,
            [ManifestFile {
                path: ".vmfarm/a.toml".into(),
                text: Ok("first".into())
            }]
        );
        let second = run(&["rev-parse", "HEAD"]);
        let files = read(scratch.path(), url, &second, 4).await.unwrap().files;
        assert_eq!(files[0].path, ".vmfarm.toml");
        assert_eq!(files[0].text, Ok("top".into()));
        assert!(
            files[1].text.as_ref().unwrap_err().contains("the limit is"),
            "{files:?}"
        );
        assert_eq!(
            std::fs::read_dir(scratch.path()).unwrap().count(),
            0,
            "nothing left behind"
        );

        let missing = read(scratch.path(), url, &"1".repeat(40), 1024)
            .await
            .unwrap_err();
        assert!(
            missing.to_string().contains("cannot fetch commit"),
            "{missing}"
        );
    }
}
