//! Image recipes: `configs/images/<name>.toml`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// How a guest of this image boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BootMethod {
    /// Direct kernel boot: kernel + initramfs (the agent as /init) + ext4 root disk.
    Linux,
}

/// What makes the root filesystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RootfsBuilder {
    /// A Debian system made by mmdebstrap, the kernel package installed in it.
    Mmdebstrap,
    /// A busybox userland; busybox-static and the kernel package come from the suite.
    Busybox,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    /// The image's name (`[a-z0-9][a-z0-9_-]{0,63}`), as jobs name it.
    pub name: String,
    pub boot: BootMethod,
    pub rootfs: RootfsRecipe,
    pub kernel: KernelRecipe,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RootfsRecipe {
    pub builder: RootfsBuilder,
    /// The Debian suite (bookworm, trixie, ...).
    pub suite: String,
    /// mmdebstrap's --variant (minbase, apt, ...); only for mmdebstrap.
    #[serde(default)]
    pub variant: Option<String>,
    /// Packages installed on top of the variant.
    #[serde(default)]
    pub packages: Vec<String>,
    /// A mirror URL; mmdebstrap's default when absent.
    #[serde(default)]
    pub mirror: Option<String>,
    /// Free space left in the root filesystem for builds, in MiB.
    pub free_mib: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KernelRecipe {
    /// The Debian kernel package (a metapackage is fine).
    pub package: String,
    /// Modules the initramfs loads (their dependencies are added); built-in ones are skipped.
    pub modules: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum RecipeError {
    #[error("no recipe {name:?} in {dir} (recipes there: {available})")]
    NotFound {
        name: String,
        dir: PathBuf,
        available: String,
    },
    #[error("reading recipe {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("recipe {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

fn valid_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && name.len() <= 64
        && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

fn valid_word(word: &str) -> bool {
    !word.is_empty()
        && !word.starts_with('-')
        && word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+-._:".contains(&b))
}

impl Recipe {
    pub fn parse(text: &str, path: &Path) -> Result<Recipe, RecipeError> {
        let invalid = |message: String| RecipeError::Invalid {
            path: path.to_owned(),
            message,
        };
        let recipe: Recipe =
            toml::from_str(text).map_err(|e| invalid(e.to_string().trim().to_owned()))?;
        if !valid_name(&recipe.name) {
            return Err(invalid(format!(
                "name {:?}: expected [a-z0-9][a-z0-9_-]{{0,63}}",
                recipe.name
            )));
        }
        let words = [&recipe.rootfs.suite, &recipe.kernel.package]
            .into_iter()
            .chain(recipe.rootfs.variant.iter())
            .chain(recipe.rootfs.packages.iter())
            .chain(recipe.kernel.modules.iter());
        for word in words {
            if !valid_word(word) {
                return Err(invalid(format!(
                    "{word:?} is not a valid suite, package or module name"
                )));
            }
        }
        if recipe.rootfs.builder == RootfsBuilder::Busybox
            && (recipe.rootfs.variant.is_some() || !recipe.rootfs.packages.is_empty())
        {
            return Err(invalid(
                "a busybox root filesystem takes no variant or packages".into(),
            ));
        }
        Ok(recipe)
    }

    /// `name_or_path` is a path to a .toml file, or a recipe name in `dir`.
    pub fn load(name_or_path: &str, dir: &Path) -> Result<Recipe, RecipeError> {
        let path = if name_or_path.ends_with(".toml") || name_or_path.contains('/') {
            PathBuf::from(name_or_path)
        } else {
            dir.join(format!("{name_or_path}.toml"))
        };
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e)
                if e.kind() == std::io::ErrorKind::NotFound && !name_or_path.ends_with(".toml") =>
            {
                return Err(RecipeError::NotFound {
                    name: name_or_path.to_owned(),
                    dir: dir.to_owned(),
                    available: available(dir).join(", "),
                });
            }
            Err(source) => return Err(RecipeError::Read { path, source }),
        };
        Recipe::parse(&text, &path)
    }
}

fn available(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_suffix(".toml")
                .map(str::to_owned)
        })
        .collect();
    names.sort();
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recipes_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/images")
    }

    #[test]
    fn test_the_shipped_recipes_parse() {
        for name in ["debian-12", "debian-13", "tiny"] {
            let recipe = Recipe::load(name, &recipes_dir()).unwrap();
            assert_eq!(recipe.name, name);
            assert_eq!(recipe.boot, BootMethod::Linux);
        }
    }

    #[test]
    fn test_unknown_keys_are_refused_with_their_name() {
        let text = std::fs::read_to_string(recipes_dir().join("tiny.toml")).unwrap();
        let text = text.replace("[kernel]", "[kernel]\nflavour = \"big\"");
        let err = Recipe::parse(&text, Path::new("x.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `flavour`"), "{err}");
    }

    #[test]
    fn test_bad_names_and_missing_recipes_are_refused() {
        let text = std::fs::read_to_string(recipes_dir().join("debian-12.toml")).unwrap();
        let bad = text.replace("\"git\"", "\"git; rm -rf /\"");
        assert!(Recipe::parse(&bad, Path::new("x.toml")).is_err());
        let err = Recipe::load("no-such", &recipes_dir())
            .unwrap_err()
            .to_string();
        assert!(err.contains("debian-12, debian-13, tiny"), "{err}");
    }
}
