//! An artifact glob (`out/*.log`: `*`, `?` and `[...]` within components; the manifest refuses
//! `**`) expanded against the guest's build directory over SFTP. The guest is hostile: listings are
//! bounded per directory and in all, and so are the matches; links are never followed; every
//! match is checked as an artifact path.

use crate::guest::Guest;
use crate::guest::ssh::EntryKind;
use crate::worker::guest_paths::BUILD_DIR;
use anyhow::{Context, bail};
use glob::{MatchOptions, Pattern};
use vmfarm_proto::manifest::is_glob;
use vmfarm_proto::names::check_artifact_path;

/// Entries read from one directory at most.
const MAX_DIR_ENTRIES: usize = 10_000;
/// Entries read in all for one glob.
const MAX_LISTED: usize = 100_000;
/// Files (and directories on the way) one glob may match.
pub(super) const MAX_MATCHES: usize = 1_000;

/// What the expansion asks of the guest, paths relative to the build directory.
pub(super) trait Listing {
    /// The entries of `dir`, or `None` when it is not a directory.
    async fn list(&self, dir: &str) -> anyhow::Result<Option<Vec<(String, EntryKind)>>>;
    /// What `path` is, or `None` when it does not exist.
    async fn kind(&self, path: &str) -> anyhow::Result<Option<EntryKind>>;
}

impl Listing for Guest {
    async fn list(&self, dir: &str) -> anyhow::Result<Option<Vec<(String, EntryKind)>>> {
        let remote = under_build_dir(dir);
        if self.kind_of(&remote).await? != Some(EntryKind::Dir) {
            return Ok(None);
        }
        Ok(Some(self.list_dir(&remote, MAX_DIR_ENTRIES).await?))
    }

    async fn kind(&self, path: &str) -> anyhow::Result<Option<EntryKind>> {
        Ok(self.kind_of(&under_build_dir(path)).await?)
    }
}

fn under_build_dir(path: &str) -> String {
    if path.is_empty() {
        BUILD_DIR.to_owned()
    } else {
        format!("{BUILD_DIR}/{path}")
    }
}

fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_owned()
    } else {
        format!("{dir}/{name}")
    }
}

/// The regular files `pattern` matches, sorted. A component with glob characters matches the
/// names of a directory (a leading `.` only literally); the others are taken as they are.
pub(super) async fn expand(guest: &impl Listing, pattern: &str) -> anyhow::Result<Vec<String>> {
    let options = MatchOptions {
        case_sensitive: true,
        require_literal_separator: true,
        require_literal_leading_dot: true,
    };
    let components: Vec<&str> = pattern.split('/').collect();
    let mut frontier = vec![String::new()];
    let mut listed = 0;
    for (i, component) in components.iter().enumerate() {
        let wanted = if i + 1 == components.len() {
            EntryKind::File
        } else {
            EntryKind::Dir
        };
        let mut next = Vec::new();
        for dir in &frontier {
            if is_glob(component) {
                let matcher = Pattern::new(component)
                    .with_context(|| format!("`{component}` is not a glob pattern"))?;
                let Some(entries) = guest.list(dir).await? else {
                    continue;
                };
                listed += entries.len();
                if listed > MAX_LISTED {
                    bail!(
                        "matching it read over {MAX_LISTED} directory entries: narrow the pattern"
                    );
                }
                for (name, kind) in entries {
                    if kind == wanted && matcher.matches_with(&name, options) {
                        next.push(join(dir, &name));
                    }
                }
            } else {
                let path = join(dir, component);
                if guest.kind(&path).await? == Some(wanted) {
                    next.push(path);
                }
            }
            if next.len() > MAX_MATCHES {
                bail!(
                    "it matches over {MAX_MATCHES} paths: narrow the pattern or collect a directory"
                );
            }
        }
        frontier = next;
    }
    for path in &frontier {
        check_artifact_path(path).map_err(|e| {
            anyhow::anyhow!("the guest named a file `{}`: {e}", path.escape_debug())
        })?;
    }
    frontier.sort();
    Ok(frontier)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// A build directory: each path and what it is.
    struct Tree(BTreeMap<String, EntryKind>);

    impl Tree {
        fn new(files: &[&str], dirs: &[&str], links: &[&str]) -> Tree {
            let mut map = BTreeMap::new();
            for (paths, kind) in [
                (files, EntryKind::File),
                (dirs, EntryKind::Dir),
                (links, EntryKind::Other),
            ] {
                for p in paths {
                    map.insert(p.to_string(), kind);
                }
            }
            Tree(map)
        }
    }

    impl Listing for Tree {
        async fn list(&self, dir: &str) -> anyhow::Result<Option<Vec<(String, EntryKind)>>> {
            if !dir.is_empty() && self.0.get(dir) != Some(&EntryKind::Dir) {
                return Ok(None);
            }
            let prefix = if dir.is_empty() {
                String::new()
            } else {
                format!("{dir}/")
            };
            Ok(Some(
                self.0
                    .iter()
                    .filter_map(|(p, k)| {
                        let rest = p.strip_prefix(&prefix)?;
                        (!rest.contains('/')).then(|| (rest.to_owned(), *k))
                    })
                    .collect(),
            ))
        }

        async fn kind(&self, path: &str) -> anyhow::Result<Option<EntryKind>> {
            Ok(self.0.get(path).copied())
        }
    }

    fn tree() -> Tree {
        Tree::new(
            &[
                "out/a.log",
                "out/b.log",
                "out/.hidden.log",
                "out/c.txt",
                "out/sub/d.log",
                "logs/x/report.xml",
                "logs/y/report.xml",
                "top.log",
            ],
            &["out", "out/sub", "out/dir.log", "logs", "logs/x", "logs/y"],
            &["out/link.log"],
        )
    }

    #[tokio::test]
    async fn test_globs_match_regular_files_only_within_components() {
        let t = tree();
        assert_eq!(
            expand(&t, "out/*.log").await.unwrap(),
            ["out/a.log", "out/b.log"]
        );
        assert_eq!(expand(&t, "out/.*.log").await.unwrap(), ["out/.hidden.log"]);
        assert_eq!(
            expand(&t, "logs/*/report.xml").await.unwrap(),
            ["logs/x/report.xml", "logs/y/report.xml"]
        );
        assert_eq!(expand(&t, "out/?.txt").await.unwrap(), ["out/c.txt"]);
        assert_eq!(expand(&t, "*.log").await.unwrap(), ["top.log"]);
        assert!(expand(&t, "missing/*.log").await.unwrap().is_empty());
        assert!(expand(&t, "out/*.zip").await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn test_a_guest_with_too_many_files_is_refused() {
        let files: Vec<String> = (0..=MAX_MATCHES).map(|i| format!("f{i}.log")).collect();
        let refs: Vec<&str> = files.iter().map(String::as_str).collect();
        let t = Tree::new(&refs, &[], &[]);
        let err = expand(&t, "*.log").await.unwrap_err().to_string();
        assert!(err.contains("matches over 1000 paths"), "{err}");
    }
}
