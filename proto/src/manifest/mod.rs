//! The job manifest (TOML): what a user writes to ask for a build, and its strict validation.
//!
//! Every error carries a line and column and says what to write instead; see [`limits`] for
//! the sizes and counts enforced.

pub mod limits;
mod parse;
pub use parse::is_env_name;
mod reader;

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
    /// Higher runs first.
    pub priority: i64,
    pub tags: Vec<String>,
    /// Names of secrets stored on the server.
    pub secrets: Vec<String>,
    pub resources: Resources,
    pub environment: BTreeMap<String, String>,
    pub sources: Vec<Source>,
    pub tasks: Vec<Task>,
    pub artifacts: Vec<Artifact>,
    pub triggers: Vec<Trigger>,
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
    /// Relative to the build directory.
    pub path: String,
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
