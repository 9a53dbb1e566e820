//! The character rules for names (CONTRACTS.md "Names").

/// What a name names; each kind has its own rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameKind {
    Image,
    Task,
    Secret,
    Tag,
    Cache,
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
            NameKind::Cache => "cache name",
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

/// Longest package name, and longest version after `=`, in bytes.
pub const PACKAGE_PART_MAX: usize = 128;

/// Why an entry of a manifest's `packages` was refused; each message says what to write.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PackageError {
    #[error("package `` is empty: write a package name, like \"zlib1g-dev\"")]
    Empty,
    #[error("package `{spec}` is {len} bytes long where the limit is {PACKAGE_PART_MAX}: {part}")]
    TooLong {
        spec: String,
        len: usize,
        part: &'static str,
    },
    #[error(
        "package `{spec}` must start with a lowercase letter or a digit, not {first:?}: write the package's name as the package manager lists it, like \"zlib1g-dev\""
    )]
    Start { spec: String, first: char },
    #[error("package `{spec}` contains {bad:?}: package names are lowercase; write `{lower}`")]
    Uppercase {
        spec: String,
        bad: char,
        lower: String,
    },
    #[error(
        "package `{spec}` contains {bad:?}: a package is a name of lowercase letters, digits, '+', '.', '_' and '-', optionally followed by `=VERSION`, like \"zlib1g-dev\" or \"zlib1g-dev=1:1.3.dfsg-3.1\""
    )]
    NameChar { spec: String, bad: char },
    #[error(
        "package `{spec}` has `=` but no version: write `{name}` for any version, or `{name}=VERSION`"
    )]
    NoVersion { spec: String, name: String },
    #[error(
        "package `{spec}` has the version `{version}`, which contains {bad:?} or does not start with a letter or digit: a version has letters, digits, '.', '+', '~', ':', '_' and '-', like `{name}=1:1.3.dfsg-3.1`"
    )]
    VersionChar {
        spec: String,
        name: String,
        version: String,
        bad: char,
    },
}

/// Checks one entry of a manifest's `packages`: `NAME` or `NAME=VERSION`, where NAME is
/// `[a-z0-9][a-z0-9+._-]*` (Debian's and Alpine's package names; lowercase only) and VERSION is
/// `[A-Za-z0-9][A-Za-z0-9.+~:_-]*` (Debian's `epoch:upstream-revision`, Alpine's `1.2.3-r0`),
/// each at most [`PACKAGE_PART_MAX`] bytes. Nothing else, so no entry can be read as an option
/// or a pattern by the package manager (`-o`, `foo*`, `./local.deb`, `pkg/suite`).
pub fn check_package(spec: &str) -> Result<(), PackageError> {
    let owned = || spec.to_owned();
    let (name, version) = match spec.split_once('=') {
        Some((name, version)) => (name, Some(version)),
        None => (spec, None),
    };
    let Some(first) = name.chars().next() else {
        return Err(PackageError::Empty);
    };
    if name.len() > PACKAGE_PART_MAX {
        return Err(PackageError::TooLong {
            spec: owned(),
            len: name.len(),
            part: "shorten the name",
        });
    }
    // An uppercase first letter gets the lowercase fix below.
    if !first.is_ascii_alphanumeric() {
        return Err(PackageError::Start {
            spec: owned(),
            first,
        });
    }
    if let Some(bad) = name.chars().find(char::is_ascii_uppercase) {
        return Err(PackageError::Uppercase {
            spec: owned(),
            bad,
            lower: spec.replacen(name, &name.to_ascii_lowercase(), 1),
        });
    }
    let name_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || "+._-".contains(c);
    if let Some(bad) = name.chars().find(|&c| !name_char(c)) {
        return Err(PackageError::NameChar { spec: owned(), bad });
    }
    let Some(version) = version else {
        return Ok(());
    };
    if version.is_empty() {
        return Err(PackageError::NoVersion {
            spec: owned(),
            name: name.to_owned(),
        });
    }
    if version.len() > PACKAGE_PART_MAX {
        return Err(PackageError::TooLong {
            spec: owned(),
            len: version.len(),
            part: "shorten the version",
        });
    }
    let version_char = |c: char| c.is_ascii_alphanumeric() || ".+~:_-".contains(c);
    let bad = version.chars().find(|&c| !version_char(c)).or_else(|| {
        version
            .chars()
            .next()
            .filter(|c| !c.is_ascii_alphanumeric())
    });
    if let Some(bad) = bad {
        return Err(PackageError::VersionChar {
            spec: owned(),
            name: name.to_owned(),
            version: version.to_owned(),
            bad,
        });
    }
    Ok(())
}

/// The name part of a package entry (`zlib1g-dev` of `zlib1g-dev=1:1.3`).
pub fn package_name(spec: &str) -> &str {
    spec.split_once('=').map_or(spec, |(name, _)| name)
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

    #[test]
    fn test_packages_accepted() {
        for spec in [
            "zlib1g-dev",
            "g++",
            "libstdc++6",
            "python3.11-venv",
            "py3-setuptools",
            "linux_headers",
            "0ad",
            "zlib1g-dev=1:1.2.13.dfsg-1",
            "curl=8.5.0-r0",
            "foo=1.0~rc1+dfsg_2",
        ] {
            assert_eq!(check_package(spec), Ok(()), "{spec}");
        }
        assert_eq!(package_name("zlib1g-dev=1:1.3"), "zlib1g-dev");
        assert_eq!(package_name("git"), "git");
    }

    #[test]
    fn test_packages_refused_with_what_to_write() {
        let cases = [
            ("", "write a package name"),
            (
                "-o",
                "must start with a lowercase letter or a digit, not '-'",
            ),
            ("./local.deb", "must start with"),
            ("Zlib1g-dev", "write `zlib1g-dev`"),
            ("SDL2=2.0", "write `sdl2=2.0`"),
            ("foo bar", "contains ' '"),
            ("foo*", "contains '*'"),
            ("foo/bookworm", "contains '/'"),
            ("libc6:i386", "contains ':'"),
            ("foo;rm", "contains ';'"),
            ("foo=", "write `foo` for any version, or `foo=VERSION`"),
            ("foo=1 2", "contains ' '"),
            ("foo=-1", "contains '-'"),
            ("foo=1=2", "contains '='"),
        ];
        for (spec, want) in cases {
            let err = check_package(spec).unwrap_err().to_string();
            assert!(err.contains(want), "{spec:?}: {err}");
        }
        let long = "a".repeat(PACKAGE_PART_MAX + 1);
        for spec in [long.clone(), format!("a={long}")] {
            let err = check_package(&spec).unwrap_err().to_string();
            assert!(err.contains("the limit is 128"), "{err}");
        }
    }
}
