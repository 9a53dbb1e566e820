//! A pushed commit as a job's first source: what a push (a forge's webhook or a git server's
//! post-receive hook) adds to each manifest of the repository it builds.

use super::{Manifest, ManifestError, ManifestErrors, Source, limits::MAX_SOURCES};
use serde::{Deserialize, Serialize};

/// The repository and commit a pushed job builds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkout {
    /// What the worker clones (the repository's `url` in the server's config).
    pub url: String,
    /// The full commit id.
    pub commit: String,
}

impl Manifest {
    /// Makes the pushed repository the manifest's first source, at exactly `checkout.commit`: a
    /// source that names the same repository keeps its `path` and loses its `ref`; otherwise the
    /// repository lands at its own name. The server checks this at the push, the worker applies
    /// it to the leased manifest, so both see the same sources.
    pub fn check_out(&mut self, checkout: &Checkout) -> Result<(), ManifestErrors> {
        let at_top = |message: String| {
            ManifestErrors(vec![ManifestError {
                line: 1,
                column: 1,
                message,
            }])
        };
        let wanted = repository_key(&checkout.url);
        let source = match self
            .sources
            .iter()
            .position(|s| repository_key(&s.url) == wanted)
        {
            Some(i) => {
                let mut source = self.sources.remove(i);
                source.url = checkout.url.clone();
                source
            }
            None => {
                let path = super::parse::default_source_path(&checkout.url).ok_or_else(|| {
                    at_top(format!(
                        "cannot tell where the pushed repository `{}` lands: list it among \
                         [[sources]] with a `path`",
                        checkout.url
                    ))
                })?;
                if self.sources.iter().any(|s| s.path == path) {
                    return Err(at_top(format!(
                        "the pushed repository lands at `{path}`, where another source lands: give \
                         that source another `path`, or list the repository `{}` among [[sources]] \
                         with the `path` it should take",
                        checkout.url
                    )));
                }
                if self.sources.len() >= MAX_SOURCES {
                    return Err(at_top(format!(
                        "with the pushed repository this job would have more than {MAX_SOURCES} \
                         sources: remove one"
                    )));
                }
                Source {
                    url: checkout.url.clone(),
                    git_ref: None,
                    path,
                }
            }
        };
        self.sources.insert(
            0,
            Source {
                git_ref: Some(checkout.commit.clone()),
                ..source
            },
        );
        Ok(())
    }
}

/// A repository URL without what does not change which repository it names: `file://`, a
/// trailing `/` or `.git`.
fn repository_key(url: &str) -> &str {
    let url = url.strip_prefix("file://").unwrap_or(url);
    let url = url.trim_end_matches('/');
    url.strip_suffix(".git").unwrap_or(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(sources: &str) -> Manifest {
        Manifest::parse(&format!(
            "image = \"debian-12\"\n{sources}[[tasks]]\nname = \"t\"\nscript = \"true\"\n"
        ))
        .unwrap()
    }

    fn checkout() -> Checkout {
        Checkout {
            url: "https://git.example.org/acme/app.git".into(),
            commit: "0123456789abcdef0123456789abcdef01234567".into(),
        }
    }

    #[test]
    fn test_the_pushed_repository_comes_first_at_its_name_and_commit() {
        let mut m = manifest("[[sources]]\nurl = \"https://example.org/lib.git\"\n");
        m.check_out(&checkout()).unwrap();
        let first = &m.sources[0];
        assert_eq!(first.url, checkout().url);
        assert_eq!(first.path, "app");
        assert_eq!(first.git_ref.as_deref(), Some(checkout().commit.as_str()));
        assert_eq!(m.sources[1].path, "lib", "the manifest's own source stays");
    }

    #[test]
    fn test_a_source_naming_the_repository_keeps_its_path_and_takes_the_commit() {
        let mut m = manifest(
            "[[sources]]\nurl = \"https://example.org/lib.git\"\n\
             [[sources]]\nurl = \"https://git.example.org/acme/app\"\nref = \"main\"\npath = \"src/app\"\n",
        );
        m.check_out(&checkout()).unwrap();
        assert_eq!(m.sources.len(), 2, "not added twice");
        assert_eq!(m.sources[0].path, "src/app");
        assert_eq!(
            m.sources[0].git_ref.as_deref(),
            Some(checkout().commit.as_str())
        );
        assert_eq!(m.sources[1].path, "lib");
    }

    #[test]
    fn test_a_source_already_at_the_repositorys_name_is_refused_with_what_to_do() {
        let mut m =
            manifest("[[sources]]\nurl = \"https://example.org/other.git\"\npath = \"app\"\n");
        let err = m.check_out(&checkout()).unwrap_err();
        assert!(err.0[0].message.contains("lands at `app`"), "{err:?}");
        assert_eq!((err.0[0].line, err.0[0].column), (1, 1));
    }

    #[test]
    fn test_local_paths_name_the_same_repository_with_or_without_file_scheme() {
        assert_eq!(repository_key("file:///srv/git/app.git/"), "/srv/git/app");
        assert_eq!(repository_key("/srv/git/app"), "/srv/git/app");
    }
}
