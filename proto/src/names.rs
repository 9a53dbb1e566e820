//! The character rules for names (CONTRACTS.md "Names").

/// What a name names; each kind has its own rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameKind {
    Image,
    Task,
    Secret,
    Tag,
}

/// Longest name of any kind, in bytes.
pub const NAME_MAX: usize = 64;

impl NameKind {
    fn noun(self) -> &'static str {
        match self {
            NameKind::Image => "image name",
            NameKind::Task => "task name",
            NameKind::Secret => "secret name",
            NameKind::Tag => "tag",
        }
    }

    fn allows_inner(self, c: char) -> bool {
        let base = c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-';
        match self {
            NameKind::Tag => base || c == '.' || c == ':',
            _ => base,
        }
    }

    fn allowed_text(self) -> &'static str {
        match self {
            NameKind::Tag => "lowercase letters, digits, '_', '-', '.' and ':'",
            _ => "lowercase letters, digits, '_' and '-'",
        }
    }
}

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{} `{}` {reason}", kind.noun(), name.escape_debug())]
pub struct NameError {
    pub kind: NameKind,
    pub name: String,
    pub reason: String,
}

/// Checks `name` against the rule of `kind`: `[a-z0-9][a-z0-9_-]{0,63}` for images, tasks and
/// secrets, `[a-z0-9][a-z0-9_.:-]{0,63}` for tags.
pub fn check_name(kind: NameKind, name: &str) -> Result<(), NameError> {
    let fail = |reason: String| {
        Err(NameError {
            kind,
            name: name.to_owned(),
            reason,
        })
    };
    let Some(first) = name.chars().next() else {
        return fail("is empty: give it at least one character".into());
    };
    if name.len() > NAME_MAX {
        return fail(format!(
            "is {} bytes long; the limit is {NAME_MAX}",
            name.len()
        ));
    }
    if !(first.is_ascii_lowercase() || first.is_ascii_digit()) {
        return fail(format!(
            "must start with a lowercase letter or a digit, not {first:?}"
        ));
    }
    if let Some(bad) = name.chars().find(|&c| !kind.allows_inner(c)) {
        let hint = if bad.is_ascii_uppercase() {
            format!("; write `{}`", name.to_ascii_lowercase())
        } else {
            String::new()
        };
        return fail(format!(
            "contains {bad:?}: use only {}{hint}",
            kind.allowed_text()
        ));
    }
    Ok(())
}

/// Why a path relative to a folder (`root`) was refused; the message follows the path, as in
/// "artifact name `x` contains `..`: ...".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("is empty: give a path relative to {root}")]
    Empty { root: String },
    #[error("is {len} bytes long; the limit is {PATH_MAX}")]
    TooLong { len: usize },
    #[error("contains a NUL byte")]
    Nul,
    #[error("starts with '/': write it relative to {root}, e.g. `{relative}`")]
    Absolute { root: String, relative: String },
    #[error("contains `..`: it may not leave {root}")]
    Parent { root: String },
    #[error("has an empty or `.` component: write it without `//` or `/./`, like `{cleaned}`")]
    EmptyComponent { cleaned: String },
}

/// Longest path accepted, in bytes.
pub const PATH_MAX: usize = 4096;

/// Checks an artifact path (relative to the guest's build directory): not empty, no leading
/// `/`, no `..` or `.` component, no empty component, no NUL, at most 4096 bytes.
pub fn check_artifact_path(path: &str) -> Result<(), PathError> {
    check_relative_path(path, "the build directory")
}

/// Where sources land and artifacts are taken from must stay under `root`.
pub fn check_relative_path(path: &str, root: &str) -> Result<(), PathError> {
    if path.is_empty() {
        return Err(PathError::Empty { root: root.into() });
    }
    if path.len() > PATH_MAX {
        return Err(PathError::TooLong { len: path.len() });
    }
    if path.contains('\0') {
        return Err(PathError::Nul);
    }
    if path.starts_with('/') {
        return Err(PathError::Absolute {
            root: root.into(),
            relative: path.trim_start_matches('/').into(),
        });
    }
    for part in path.split('/') {
        match part {
            ".." => return Err(PathError::Parent { root: root.into() }),
            "." | "" => {
                return Err(PathError::EmptyComponent {
                    cleaned: path
                        .split('/')
                        .filter(|p| !p.is_empty() && *p != ".")
                        .collect::<Vec<_>>()
                        .join("/"),
                });
            }
            _ => {}
        }
    }
    Ok(())
}

/// An artifact path as it goes into a URL: each component percent-encoded, `/` kept.
pub fn encode_artifact_path(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for b in path.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_names_accepted() {
        for kind in [
            NameKind::Image,
            NameKind::Task,
            NameKind::Secret,
            NameKind::Tag,
        ] {
            for name in ["a", "debian-12", "build_2", "0abc", &"x".repeat(64)] {
                assert_eq!(check_name(kind, name), Ok(()), "{kind:?} {name}");
            }
        }
        for tag in ["scheduled:nightly", "v1.2", "a.b:c-d_e"] {
            assert_eq!(check_name(NameKind::Tag, tag), Ok(()));
        }
    }

    #[test]
    fn test_names_refused_with_reason() {
        let cases = [
            ("", "is empty"),
            ("-abc", "must start with"),
            ("_abc", "must start with"),
            ("Debian", "must start with"),
            ("deBian", "write `debian`"),
            ("a b", "contains ' '"),
            ("a/b", "contains '/'"),
            ("a.b", "contains '.'"),
        ];
        for (name, want) in cases {
            let err = check_name(NameKind::Image, name).unwrap_err().to_string();
            assert!(err.contains(want), "{name:?}: {err}");
        }
        let long = "x".repeat(65);
        let err = check_name(NameKind::Task, &long).unwrap_err().to_string();
        assert!(err.contains("limit is 64"), "{err}");
        assert!(check_name(NameKind::Tag, "a b").is_err());
        assert!(check_name(NameKind::Secret, "a:b").is_err());
    }

    #[test]
    fn test_artifact_paths_encode_for_urls() {
        assert_eq!(encode_artifact_path("out/app"), "out/app");
        assert_eq!(encode_artifact_path("a b/c#d?.txt"), "a%20b/c%23d%3F.txt");
        assert_eq!(encode_artifact_path("ü"), "%C3%BC");
    }

    #[test]
    fn test_artifact_paths() {
        for ok in ["out/app", "project/out/app", "a", "a.b/c..d"] {
            assert_eq!(check_artifact_path(ok), Ok(()), "{ok}");
        }
        let cases = [
            ("", "is empty"),
            ("/etc/passwd", "relative"),
            ("../x", "may not leave"),
            ("a/../../x", "may not leave"),
            ("a//b", "`a/b`"),
            ("./a", "`a`"),
            ("a/", "empty"),
            ("a\0b", "NUL"),
        ];
        for (path, want) in cases {
            let err = check_artifact_path(path).unwrap_err().to_string();
            assert!(err.contains(want), "{path:?}: {err}");
        }
        assert!(check_artifact_path(&"a".repeat(5000)).is_err());
    }
}
