//! The job manifest (TOML): what a user writes to ask for a build, and its strict validation.
//!
//! Every error carries a line and column and says what to write instead; see [`limits`] for
//! the sizes and counts enforced.
//!
//! The guest network (issue 14) adds two keys:
//! - `packages = ["zlib1g-dev", "python3-venv=3.11.2-1+b1"]` at the top: installed as root by the
//!   image's package manager before the first task, as a step shown like a task named
//!   [`PACKAGES_TASK`] (so no task may take that name). Each entry is `NAME` or `NAME=VERSION`
//!   ([`crate::names::check_package`]), at most [`limits::MAX_PACKAGES`], no name twice. An empty
//!   list is the same as none: no packages step.
//! - `[network]` with `allow = ["pypi.org", "*.crates.io", "static.rust-lang.org:443", "*"]`: the
//!   host patterns the tasks may reach ([`HostPattern`]; without a port, 80 and 443; `*` any
//!   public host). `allow` is required and not empty, at most [`limits::MAX_ALLOW`] patterns, no
//!   pattern twice. No `[network]`: the tasks reach nothing. Each pattern keeps its line and
//!   column, so that the server's policy check can refuse it where it is written.

mod checkout;
pub mod limits;
mod parse;
pub use checkout::Checkout;
pub use parse::is_env_name;
mod reader;

use crate::network::HostPattern;
use crate::units::ByteSize;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

/// A validated job manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Manifest {
    /// One job per image, grouped; never empty, no repeats.
    pub images: Vec<String>,
    /// Whole-job timeout; `None` takes the server's default.
    pub timeout: Option<Duration>,
    /// How long a failed job's guest is kept for `vmfarm ssh`, at most the worker's
    /// `guest.keep_failed`; `None` takes the worker's.
    pub keep_failed: Option<Duration>,
    /// Higher runs first.
    pub priority: i64,
    /// Where `priority` is written (`None`: not written, 0).
    pub priority_at: Option<At>,
    pub tags: Vec<String>,
    /// Secrets stored on the server, by name, where the manifest names them.
    pub secrets: Vec<SecretRef>,
    pub resources: Resources,
    pub environment: BTreeMap<String, String>,
    pub sources: Vec<Source>,
    pub tasks: Vec<Task>,
    pub artifacts: Vec<Artifact>,
    pub triggers: Vec<Trigger>,
    /// Packages installed before the first task (`NAME` or `NAME=VERSION`), in the manifest's
    /// order; empty: no packages step.
    pub packages: Vec<String>,
    /// What the tasks may reach; `None`: no network.
    pub network: Option<Network>,
    /// Cache disks kept between the owner's jobs of an image, in the manifest's order.
    pub caches: Vec<Cache>,
}

/// `[[caches]]`: a disk the owner's jobs of one image share, one version after another: a job
/// starts on the newest, and when it succeeds what it wrote becomes the newest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Cache {
    /// The owner's cache of this name, per image.
    pub name: String,
    /// Absolute guest paths ([`crate::cache::guest_path`]) the disk is mounted on; never
    /// empty, none inside another (of this cache or another).
    pub paths: Vec<String>,
    /// The disk's size.
    pub size: ByteSize,
}

/// A 1-based line and column in the manifest's text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct At {
    pub line: usize,
    pub column: usize,
}

/// One name of `secrets`, and where it is written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SecretRef {
    pub name: String,
    pub at: At,
}

impl Manifest {
    /// The names of its secrets, in the manifest's order.
    pub fn secret_names(&self) -> Vec<&str> {
        self.secrets.iter().map(|s| s.name.as_str()).collect()
    }
}

/// The name of the step that installs a manifest's `packages`: the job's first task row, which
/// no task of the manifest may take.
pub const PACKAGES_TASK: &str = "packages";

/// `[network]`: the hosts a job's tasks may reach.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Network {
    /// The `allow` patterns in the manifest's order; never empty, no repeats.
    pub allow: Vec<AllowedHost>,
}

impl Network {
    /// The patterns alone.
    pub fn patterns(&self) -> Vec<HostPattern> {
        self.allow.iter().map(|a| a.pattern.clone()).collect()
    }
}

/// One pattern of `[network] allow`, with the 1-based line and column where it is written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AllowedHost {
    pub pattern: HostPattern,
    pub line: usize,
    pub column: usize,
}

/// vCPUs and memory asked for; `None` takes the worker's default.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Resources {
    pub cpus: Option<u32>,
    pub memory: Option<ByteSize>,
}

/// A repository or local tree the worker fetches and uploads into the build directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Source {
    pub url: String,
    /// Branch, tag or commit; `None` is the repository's default branch.
    pub git_ref: Option<String>,
    /// Where it lands, relative to the build directory.
    pub path: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Task {
    pub name: String,
    pub timeout: Option<Duration>,
    pub script: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Artifact {
    /// Relative to the build directory: a file, a directory (collected as one tar file named
    /// `PATH.tar`), or a glob (`*`, `?`, `[...]` within components: each regular file it
    /// matches, by its own path).
    pub path: String,
    /// Whether it is collected after a failed task too.
    pub when: ArtifactWhen,
}

/// When an artifact is collected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ArtifactWhen {
    /// When every task succeeded (the default); one that cannot be collected fails the job.
    #[default]
    Success,
    /// After the tasks whatever their result (not after a timeout or a cancel); one that cannot
    /// be collected after a failure is only noted in the log.
    Always,
}

impl Artifact {
    /// Whether its path is a glob pattern rather than one path.
    pub fn is_glob(&self) -> bool {
        is_glob(&self.path)
    }
}

/// Whether `path` holds glob characters (`*`, `?`, `[`).
pub fn is_glob(path: &str) -> bool {
    path.contains(['*', '?', '['])
}

/// When a trigger fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TriggerOn {
    Success,
    Failure,
    Always,
}

impl TriggerOn {
    /// Whether a job that ended with `succeeded` (true) or not (false) fires this trigger.
    pub fn fires(self, succeeded: bool) -> bool {
        match self {
            TriggerOn::Success => succeeded,
            TriggerOn::Failure => !succeeded,
            TriggerOn::Always => true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trigger {
    pub on: TriggerOn,
    pub webhook: String,
}

impl Manifest {
    /// Parses and validates a manifest, returning every error found (not just the first).
    pub fn parse(text: &str) -> Result<Manifest, ManifestErrors> {
        parse::parse(text)
    }

    /// One line saying what the manifest asks for.
    pub fn summary(&self) -> String {
        let plural = |n: usize, word: &str| format!("{n} {word}{}", if n == 1 { "" } else { "s" });
        let mut out = format!(
            "{} ({}), {}",
            plural(self.images.len(), "image"),
            self.images.join(", "),
            plural(self.tasks.len(), "task")
        );
        if !self.sources.is_empty() {
            out.push_str(&format!(", {}", plural(self.sources.len(), "source")));
        }
        if !self.artifacts.is_empty() {
            out.push_str(&format!(", {}", plural(self.artifacts.len(), "artifact")));
        }
        if !self.packages.is_empty() {
            out.push_str(&format!(", {}", plural(self.packages.len(), "package")));
        }
        if !self.caches.is_empty() {
            out.push_str(&format!(", {}", plural(self.caches.len(), "cache")));
        }
        if let Some(network) = &self.network {
            let patterns: Vec<String> = network
                .allow
                .iter()
                .map(|a| a.pattern.to_string())
                .collect();
            if patterns.len() <= 3 {
                out.push_str(&format!(", network to {}", patterns.join(", ")));
            } else {
                out.push_str(&format!(
                    ", network to {}",
                    plural(patterns.len(), "host pattern")
                ));
            }
        }
        if let Some(timeout) = self.timeout {
            out.push_str(&format!(
                ", timeout {}",
                crate::units::format_duration(timeout)
            ));
        }
        out
    }
}

/// One problem in a manifest, at a 1-based line and column.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ManifestError {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.line, self.column, self.message)
    }
}

/// Every problem found in a manifest, in the order they appear in the text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestErrors(pub Vec<ManifestError>);

impl ManifestErrors {
    /// The errors as `FILE:LINE:COL: message` lines.
    pub fn render(&self, file: &str) -> String {
        self.0.iter().map(|e| format!("{file}:{e}\n")).collect()
    }
}

impl fmt::Display for ManifestErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ManifestErrors {}

#[cfg(test)]
mod tests;
