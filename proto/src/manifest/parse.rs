//! From TOML text to a validated [`Manifest`].

use super::limits::*;
use super::reader::{Reader, Value};
use super::{
    AllowedHost, Artifact, ArtifactWhen, At, Cache, Manifest, ManifestError, ManifestErrors,
    Network, PACKAGES_TASK, Resources, SecretRef, Source, Task, Trigger, TriggerOn,
};
use crate::names::{
    NameKind, check_artifact_path, check_name, check_package, check_relative_path, package_name,
};
use crate::network::HostPattern;
use crate::units::{ByteSize, format_duration, parse_duration, parse_size};
use std::collections::{BTreeMap, HashSet};
use std::ops::Range;
use std::time::Duration;
use toml::de::{DeTable, DeValue};

const TOP_KEYS: &[&str] = &[
    "image",
    "images",
    "timeout",
    "keep_failed",
    "priority",
    "tags",
    "secrets",
    "resources",
    "environment",
    "sources",
    "tasks",
    "artifacts",
    "triggers",
    "packages",
    "network",
    "caches",
];
const RESOURCE_KEYS: &[&str] = &["cpus", "memory"];
const SOURCE_KEYS: &[&str] = &["url", "ref", "path"];
const TASK_KEYS: &[&str] = &["name", "timeout", "script"];
const ARTIFACT_KEYS: &[&str] = &["path", "when"];
const TRIGGER_KEYS: &[&str] = &["on", "webhook"];
const NETWORK_KEYS: &[&str] = &["allow"];
const CACHE_KEYS: &[&str] = &["name", "paths", "size"];

pub(super) fn parse(text: &str) -> Result<Manifest, ManifestErrors> {
    if text.len() > MAX_MANIFEST_BYTES {
        return Err(ManifestErrors(vec![ManifestError {
            line: 1,
            column: 1,
            message: format!(
                "the manifest is {} bytes; the limit is {MAX_MANIFEST_BYTES}: move long scripts into the sources",
                text.len()
            ),
        }]));
    }
    let root = match DeTable::parse(text) {
        Ok(root) => root,
        Err(err) => {
            let mut reader = Reader::new(text);
            let message = format!(
                "this is not valid TOML: {}",
                err.message().trim_end().trim_end_matches('.')
            );
            reader.error(err.span().unwrap_or(0..0), message);
            return reader.finish(Manifest::empty());
        }
    };
    let mut r = Reader::new(text);
    let table = root.get_ref();
    r.check_keys(table, TOP_KEYS, "at the top of the manifest");
    let manifest = Manifest {
        images: images(&mut r, table),
        timeout: table
            .get("timeout")
            .and_then(|v| timeout(&mut r, v, "timeout")),
        keep_failed: table
            .get("keep_failed")
            .and_then(|v| keep_failed(&mut r, v)),
        priority: table.get("priority").map_or(0, |v| priority(&mut r, v)),
        priority_at: table.get("priority").map(|v| at(&r, v.span().start)),
        tags: table
            .get("tags")
            .map(|v| {
                names(
                    &mut r,
                    v,
                    "tags",
                    NameKind::Tag,
                    "tags = [\"nightly\"]",
                    MAX_TAGS,
                )
            })
            .unwrap_or_default(),
        secrets: table
            .get("secrets")
            .map(|v| {
                names_at(
                    &mut r,
                    v,
                    "secrets",
                    NameKind::Secret,
                    "secrets = [\"deploy-key\"]",
                    MAX_SECRETS,
                )
                .into_iter()
                .map(|(name, at)| SecretRef { name, at })
                .collect()
            })
            .unwrap_or_default(),
        resources: table
            .get("resources")
            .map(|v| resources(&mut r, v))
            .unwrap_or_default(),
        environment: table
            .get("environment")
            .map(|v| environment(&mut r, v))
            .unwrap_or_default(),
        sources: table
            .get("sources")
            .map(|v| sources(&mut r, v))
            .unwrap_or_default(),
        tasks: tasks(&mut r, table),
        artifacts: table
            .get("artifacts")
            .map(|v| artifacts(&mut r, v))
            .unwrap_or_default(),
        triggers: table
            .get("triggers")
            .map(|v| triggers(&mut r, v))
            .unwrap_or_default(),
        packages: table
            .get("packages")
            .map(|v| packages(&mut r, v))
            .unwrap_or_default(),
        network: table.get("network").and_then(|v| network(&mut r, v)),
        caches: table
            .get("caches")
            .map(|v| caches(&mut r, v))
            .unwrap_or_default(),
    };
    check_task_timeouts(&mut r, &manifest, table);
    r.finish(manifest)
}

impl Manifest {
    fn empty() -> Manifest {
        Manifest {
            images: Vec::new(),
            timeout: None,
            keep_failed: None,
            priority: 0,
            priority_at: None,
            tags: Vec::new(),
            secrets: Vec::new(),
            resources: Resources::default(),
            environment: BTreeMap::new(),
            sources: Vec::new(),
            tasks: Vec::new(),
            artifacts: Vec::new(),
            triggers: Vec::new(),
            packages: Vec::new(),
            network: None,
            caches: Vec::new(),
        }
    }
}

fn images(r: &mut Reader<'_>, table: &DeTable<'_>) -> Vec<String> {
    const EXAMPLE: &str = "images = [\"debian-12\", \"debian-13\"]";
    match (table.get("image"), table.get("images")) {
        (Some(_), Some(both)) => {
            r.error(
                both.span(),
                "both `image` and `images` are set: keep one (`images` for several, `image` for one)",
            );
            Vec::new()
        }
        (Some(one), None) => {
            let Some(name) = r.string(one, "image", "image = \"debian-12\"") else {
                return Vec::new();
            };
            match check_name(NameKind::Image, &name) {
                Ok(()) => vec![name],
                Err(e) => {
                    r.error(one.span(), e.to_string());
                    Vec::new()
                }
            }
        }
        (None, Some(many)) => {
            let list = names(r, many, "images", NameKind::Image, EXAMPLE, MAX_IMAGES);
            if list.is_empty() && matches!(many.get_ref(), DeValue::Array(a) if a.is_empty()) {
                r.error(
                    many.span(),
                    format!("`images` is empty: name at least one, like {EXAMPLE}"),
                );
            }
            list
        }
        (None, None) => {
            r.error(
                0..0,
                format!("no image is named: add `image = \"debian-12\"` or {EXAMPLE}"),
            );
            Vec::new()
        }
    }
}

/// An array of names of one kind: each checked, no repeats, at most `max`.
fn names(
    r: &mut Reader<'_>,
    value: &Value<'_>,
    key: &str,
    kind: NameKind,
    example: &str,
    max: usize,
) -> Vec<String> {
    names_at(r, value, key, kind, example, max)
        .into_iter()
        .map(|(name, _)| name)
        .collect()
}

/// Where `offset` of the manifest's text is.
fn at(r: &Reader<'_>, offset: usize) -> At {
    let (line, column) = r.position(offset);
    At { line, column }
}

/// [`names`], each with where it is written.
fn names_at(
    r: &mut Reader<'_>,
    value: &Value<'_>,
    key: &str,
    kind: NameKind,
    example: &str,
    max: usize,
) -> Vec<(String, At)> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for (name, span) in r.strings(value, key, example, max) {
        if let Err(e) = check_name(kind, &name) {
            r.error(span, e.to_string());
        } else if !seen.insert(name.clone()) {
            r.error(
                span,
                format!("`{name}` appears twice in `{key}`: remove one"),
            );
        } else {
            out.push((name, at(r, span.start)));
        }
    }
    out
}

/// `keep_failed = "5m"`: how long a failed job's guest stays for `vmfarm ssh`, at most the
/// worker's `guest.keep_failed` ("0s": not kept).
fn keep_failed(r: &mut Reader<'_>, value: &Value<'_>) -> Option<Duration> {
    let text = r.string(value, "keep_failed", "keep_failed = \"10m\"")?;
    match parse_duration(&text) {
        Ok(d) if d <= MAX_TIMEOUT => Some(d),
        Ok(d) => {
            r.error(
                value.span(),
                format!(
                    "`keep_failed` is {}; the limit is {}",
                    format_duration(d),
                    format_duration(MAX_TIMEOUT)
                ),
            );
            None
        }
        Err(e) => {
            r.error(value.span(), format!("`keep_failed`: {e}"));
            None
        }
    }
}

fn timeout(r: &mut Reader<'_>, value: &Value<'_>, key: &str) -> Option<Duration> {
    let text = r.string(value, key, &format!("{key} = \"30m\""))?;
    match parse_duration(&text) {
        Ok(d) if d.is_zero() => {
            r.error(
                value.span(),
                format!("`{key}` is zero: give a positive duration, like \"30m\""),
            );
            None
        }
        Ok(d) if d > MAX_TIMEOUT => {
            r.error(
                value.span(),
                format!(
                    "`{key}` is {}; the limit is {}: split the work into several jobs",
                    format_duration(d),
                    format_duration(MAX_TIMEOUT)
                ),
            );
            None
        }
        Ok(d) => Some(d),
        Err(e) => {
            r.error(value.span(), format!("`{key}`: {e}"));
            None
        }
    }
}

fn priority(r: &mut Reader<'_>, value: &Value<'_>) -> i64 {
    let Some(p) = r.integer(value, "priority", "priority = 10") else {
        return 0;
    };
    if !(MIN_PRIORITY..=MAX_PRIORITY).contains(&p) {
        r.error(
            value.span(),
            format!("`priority` is {p}; it must be between {MIN_PRIORITY} and {MAX_PRIORITY}"),
        );
        return 0;
    }
    p
}

fn resources(r: &mut Reader<'_>, value: &Value<'_>) -> Resources {
    let Some(table) = r.table(
        value,
        "resources",
        "[resources] with `cpus = 2` and `memory = \"1GiB\"`",
    ) else {
        return Resources::default();
    };
    r.check_keys(table, RESOURCE_KEYS, "in [resources]");
    let cpus = table.get("cpus").and_then(|v| {
        let n = r.integer(v, "cpus", "cpus = 2")?;
        if (1..=MAX_CPUS).contains(&n) {
            u32::try_from(n).ok()
        } else {
            r.error(
                v.span(),
                format!("`cpus` is {n}; it must be between 1 and {MAX_CPUS}"),
            );
            None
        }
    });
    let memory = table.get("memory").and_then(|v| {
        let text = r.string(v, "memory", "memory = \"1GiB\"")?;
        match parse_size(&text) {
            Ok(size) if size.0 < MIN_MEMORY || size.0 > MAX_MEMORY => {
                r.error(
                    v.span(),
                    format!(
                        "`memory` is {size}; it must be between {} and {}",
                        ByteSize(MIN_MEMORY),
                        ByteSize(MAX_MEMORY)
                    ),
                );
                None
            }
            Ok(size) => Some(size),
            Err(e) => {
                r.error(v.span(), format!("`memory`: {e}"));
                None
            }
        }
    });
    Resources { cpus, memory }
}

fn environment(r: &mut Reader<'_>, value: &Value<'_>) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let Some(table) = r.table(value, "environment", "[environment] with `CC = \"gcc\"`") else {
        return out;
    };
    if table.len() > MAX_ENV_VARS {
        r.error(
            value.span(),
            format!(
                "[environment] has {} variables; the limit is {MAX_ENV_VARS}",
                table.len()
            ),
        );
        return out;
    }
    for (key, v) in table.iter() {
        let name: &str = key.get_ref();
        if !is_env_name(name) {
            r.error(
                key.span(),
                format!(
                    "`{}` is not a valid environment variable name: use letters, digits and '_', not starting with a digit",
                    name.escape_debug()
                ),
            );
            continue;
        }
        let example = format!("{name} = \"value\"");
        let Some(text) = r.string(v, name, &example) else {
            continue;
        };
        if text.len() > MAX_ENV_VALUE_BYTES {
            r.error(
                v.span(),
                format!(
                    "`{name}` is {} bytes; the limit is {MAX_ENV_VALUE_BYTES}",
                    text.len()
                ),
            );
        } else if text.contains('\0') {
            r.error(
                v.span(),
                format!("`{name}` contains a NUL byte, which no environment can hold"),
            );
        } else {
            out.insert(name.to_owned(), text);
        }
    }
    out
}

/// A usable environment variable name (also used for secrets exported as variables).
pub fn is_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The items of an array of tables, each table checked for known keys.
fn table_items<'a, 'i>(
    r: &mut Reader<'_>,
    value: &'a Value<'i>,
    key: &str,
    allowed: &[&str],
    max: usize,
) -> Vec<(&'a DeTable<'i>, Range<usize>)> {
    let example = format!("[[{key}]] tables");
    let Some(array) = r.bounded_array(value, key, &example, max) else {
        return Vec::new();
    };
    let place = format!("in [[{key}]]");
    array
        .iter()
        .filter_map(|item| {
            let t = r.table(item, &format!("each entry of `{key}`"), &example)?;
            r.check_keys(t, allowed, &place);
            Some((t, item.span()))
        })
        .collect()
}

fn required<'a, 'i>(
    r: &mut Reader<'_>,
    table: &'a DeTable<'i>,
    span: &Range<usize>,
    key: &str,
    section: &str,
    example: &str,
) -> Option<&'a Value<'i>> {
    let value = table.get(key);
    if value.is_none() {
        r.error(
            span.clone(),
            format!("[[{section}]] has no `{key}`: add {example}"),
        );
    }
    value
}

fn sources(r: &mut Reader<'_>, value: &Value<'_>) -> Vec<Source> {
    let mut out = Vec::new();
    let mut paths = HashSet::new();
    for (t, span) in table_items(r, value, "sources", SOURCE_KEYS, MAX_SOURCES) {
        let url_example = "url = \"https://example.org/project.git\"";
        let Some(url_value) = required(r, t, &span, "url", "sources", url_example) else {
            continue;
        };
        let Some(url) = r.string(url_value, "url", url_example) else {
            continue;
        };
        if let Err(e) = check_source_url(&url) {
            r.error(url_value.span(), format!("source url `{url}` {e}"));
            continue;
        }
        let git_ref = t.get("ref").and_then(|v| {
            let s = r.string(v, "ref", "ref = \"main\"")?;
            if s.is_empty() || s.starts_with('-') || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
                r.error(
                    v.span(),
                    "`ref` must be a branch, tag or commit: not empty, no spaces, not starting with '-'",
                );
                return None;
            }
            Some(s)
        });
        let path = match t.get("path") {
            Some(v) => {
                let Some(p) = r.string(v, "path", "path = \"project\"") else {
                    continue;
                };
                if let Err(e) = check_relative_path(&p, "the build directory") {
                    r.error(v.span(), format!("source path `{}` {e}", p.escape_debug()));
                    continue;
                }
                p
            }
            None => match default_source_path(&url) {
                Some(p) => p,
                None => {
                    r.error(
                        span.clone(),
                        "cannot tell where this source lands: add `path = \"project\"`",
                    );
                    continue;
                }
            },
        };
        if !paths.insert(path.clone()) {
            r.error(
                span.clone(),
                format!("two sources land at `{path}`: give one a different `path`"),
            );
            continue;
        }
        out.push(Source { url, git_ref, path });
    }
    out
}

/// Why a source URL was refused; the message follows "source url `URL`".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum SourceUrlError {
    #[error("is {0} bytes; the limit is {MAX_URL_BYTES}")]
    TooLong(usize),
    #[error("must not start with '-' or contain spaces")]
    Unsafe,
    #[error("has nothing after the scheme")]
    SchemeOnly,
    #[error(
        "is {0}, which the worker does not fetch: sources come over https:// or http://, through \
         the job's network gate and with no credentials; write the repository's https:// URL"
    )]
    NotFetched(&'static str),
    #[error(
        "is neither a git URL (https://, http://) nor a local path (file://, or an absolute path)"
    )]
    Unknown,
}

/// Git URLs over http(s), which the worker fetches through the job's network gate, or local
/// paths (which the worker checks against its allow-list).
fn check_source_url(url: &str) -> Result<(), SourceUrlError> {
    if url.len() > MAX_URL_BYTES {
        return Err(SourceUrlError::TooLong(url.len()));
    }
    if url.starts_with('-') || url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(SourceUrlError::Unsafe);
    }
    for (scheme, what) in [("git://", "a git:// URL"), ("ssh://", "an ssh:// URL")] {
        if url.starts_with(scheme) {
            return Err(SourceUrlError::NotFetched(what));
        }
    }
    let schemes = ["https://", "http://", "file://"];
    if let Some(scheme) = schemes.iter().find(|s| url.starts_with(*s)) {
        if url.len() == scheme.len() {
            return Err(SourceUrlError::SchemeOnly);
        }
        return Ok(());
    }
    if url.starts_with('/') {
        return Ok(());
    }
    // scp-like `user@host:path`, which is ssh.
    if let Some((host, path)) = url.split_once(':')
        && !host.is_empty()
        && !host.contains('/')
        && !path.is_empty()
    {
        return Err(SourceUrlError::NotFetched(
            "an ssh address (user@host:path)",
        ));
    }
    Err(SourceUrlError::Unknown)
}

/// `https://host/group/project.git` lands at `project`.
pub(super) fn default_source_path(url: &str) -> Option<String> {
    let last = url.trim_end_matches('/').rsplit(['/', ':']).next()?;
    let name = last.strip_suffix(".git").unwrap_or(last);
    check_relative_path(name, "the build directory").ok()?;
    Some(name.to_owned())
}

fn tasks(r: &mut Reader<'_>, table: &DeTable<'_>) -> Vec<Task> {
    let Some(value) = table.get("tasks") else {
        r.error(
            0..0,
            "the manifest has no tasks: add a [[tasks]] table with `name` and `script`",
        );
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    for (t, span) in table_items(r, value, "tasks", TASK_KEYS, MAX_TASKS) {
        let name_value = required(r, t, &span, "name", "tasks", "name = \"build\"");
        let script_value = required(r, t, &span, "script", "tasks", "script = \"make\"");
        let name = name_value.and_then(|v| {
            let n = r.string(v, "name", "name = \"build\"")?;
            if let Err(e) = check_name(NameKind::Task, &n) {
                r.error(v.span(), e.to_string());
                return None;
            }
            if n == PACKAGES_TASK {
                r.error(
                    v.span(),
                    format!(
                        "a task may not be named `{PACKAGES_TASK}`: that is the step that installs the manifest's `packages`; give it another name, like `setup`"
                    ),
                );
                return None;
            }
            if !seen.insert(n.clone()) {
                r.error(
                    v.span(),
                    format!("two tasks are named `{n}`: task names must be unique"),
                );
                return None;
            }
            Some(n)
        });
        let script = script_value.and_then(|v| {
            let s = r.string(v, "script", "script = \"\"\"\nmake\n\"\"\"")?;
            if s.trim().is_empty() {
                r.error(v.span(), "`script` is empty: write the commands the task runs");
                return None;
            }
            if s.len() > MAX_SCRIPT_BYTES {
                r.error(
                    v.span(),
                    format!(
                        "`script` is {} bytes; the limit is {MAX_SCRIPT_BYTES}: put long scripts in the sources and run them from here",
                        s.len()
                    ),
                );
                return None;
            }
            if s.contains('\0') {
                r.error(v.span(), "`script` contains a NUL byte");
                return None;
            }
            Some(s)
        });
        let timeout = t.get("timeout").and_then(|v| timeout(r, v, "timeout"));
        if let (Some(name), Some(script)) = (name, script) {
            out.push(Task {
                name,
                timeout,
                script,
            });
        }
    }
    if out.is_empty() && matches!(value.get_ref(), DeValue::Array(a) if a.is_empty()) {
        r.error(
            value.span(),
            "`tasks` is empty: add a [[tasks]] table with `name` and `script`",
        );
    }
    out
}

fn check_task_timeouts(r: &mut Reader<'_>, manifest: &Manifest, table: &DeTable<'_>) {
    let Some(job) = manifest.timeout else { return };
    let Some(DeValue::Array(items)) = table.get("tasks").map(|v| v.get_ref()) else {
        return;
    };
    for (task, item) in manifest.tasks.iter().zip(items.iter()) {
        if let Some(t) = task.timeout
            && t > job
        {
            let span = match item.get_ref() {
                DeValue::Table(tt) => tt.get("timeout").map_or(item.span(), |v| v.span()),
                _ => item.span(),
            };
            r.error(
                span,
                format!(
                    "task `{}` has timeout {}, longer than the job's {}: shorten it or raise the job's `timeout`",
                    task.name,
                    format_duration(t),
                    format_duration(job)
                ),
            );
        }
    }
}

fn artifacts(r: &mut Reader<'_>, value: &Value<'_>) -> Vec<Artifact> {
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    for (t, span) in table_items(r, value, "artifacts", ARTIFACT_KEYS, MAX_ARTIFACTS) {
        let example = "path = \"project/out/app\"";
        let Some(v) = required(r, t, &span, "path", "artifacts", example) else {
            continue;
        };
        let Some(path) = r.string(v, "path", example) else {
            continue;
        };
        if let Err(e) = check_artifact_path(&path) {
            r.error(
                v.span(),
                format!("artifact path `{}` {e}", path.escape_debug()),
            );
        } else if path.contains("**") {
            r.error(
                v.span(),
                format!(
                    "artifact glob `{}` uses `**`, which is not supported: name the folder to collect it whole (as a tar), or use `*` per level, like \"out/*/*.log\"",
                    path.escape_debug()
                ),
            );
        } else if let Some(e) = super::is_glob(&path)
            .then(|| glob::Pattern::new(&path).err())
            .flatten()
        {
            r.error(
                v.span(),
                format!(
                    "artifact glob `{}` is not a valid pattern ({}): use `*`, `?` and `[...]` within path components, like \"out/*.log\"",
                    path.escape_debug(),
                    e.msg
                ),
            );
        } else if !seen.insert(path.clone()) {
            r.error(
                v.span(),
                format!("artifact `{path}` is listed twice: remove one"),
            );
        } else {
            let when = t
                .get("when")
                .map_or(ArtifactWhen::Success, |v| artifact_when(r, v));
            out.push(Artifact { path, when });
        }
    }
    out
}

fn artifact_when(r: &mut Reader<'_>, value: &Value<'_>) -> ArtifactWhen {
    let example = "when = \"always\"";
    match r.string(value, "when", example).as_deref() {
        Some("success") => ArtifactWhen::Success,
        Some("always") => ArtifactWhen::Always,
        Some(other) => {
            r.error(
                value.span(),
                format!("`when` is `{other}`: use \"success\" (the default) or \"always\""),
            );
            ArtifactWhen::Success
        }
        None => ArtifactWhen::Success,
    }
}

fn triggers(r: &mut Reader<'_>, value: &Value<'_>) -> Vec<Trigger> {
    let mut out = Vec::new();
    for (t, span) in table_items(r, value, "triggers", TRIGGER_KEYS, MAX_TRIGGERS) {
        let on = required(r, t, &span, "on", "triggers", "on = \"failure\"").and_then(|v| {
            let s = r.string(v, "on", "on = \"failure\"")?;
            match s.as_str() {
                "success" => Some(TriggerOn::Success),
                "failure" => Some(TriggerOn::Failure),
                "always" => Some(TriggerOn::Always),
                other => {
                    r.error(
                        v.span(),
                        format!("`on` is `{other}`: use \"success\", \"failure\" or \"always\""),
                    );
                    None
                }
            }
        });
        let example = "webhook = \"https://example.org/hook\"";
        let webhook = required(r, t, &span, "webhook", "triggers", example).and_then(|v| {
            let s = r.string(v, "webhook", example)?;
            let rest = s
                .strip_prefix("https://")
                .or_else(|| s.strip_prefix("http://"));
            let host_ok = rest.is_some_and(|rest| {
                let host = rest.split(['/', '?', '#']).next().unwrap_or("");
                !host.is_empty()
            });
            if !host_ok
                || s.len() > MAX_URL_BYTES
                || s.chars().any(|c| c.is_whitespace() || c.is_control())
            {
                r.error(
                    v.span(),
                    format!(
                        "`webhook` `{}` is not an http(s) URL: write it like {example}",
                        s.escape_debug()
                    ),
                );
                return None;
            }
            Some(s)
        });
        if let (Some(on), Some(webhook)) = (on, webhook) {
            out.push(Trigger { on, webhook });
        }
    }
    out
}

/// `packages`: each entry `NAME` or `NAME=VERSION`, no name twice.
fn packages(r: &mut Reader<'_>, value: &Value<'_>) -> Vec<String> {
    const EXAMPLE: &str = "packages = [\"zlib1g-dev\", \"python3-venv\"]";
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for (spec, span) in r.strings(value, "packages", EXAMPLE, MAX_PACKAGES) {
        if let Err(e) = check_package(&spec) {
            r.error(span, e.to_string());
        } else if !seen.insert(package_name(&spec).to_owned()) {
            r.error(
                span,
                format!(
                    "the package `{}` appears twice in `packages`: keep one",
                    package_name(&spec)
                ),
            );
        } else {
            out.push(spec);
        }
    }
    out
}

/// `[network]`: `allow`, a non-empty list of host patterns, each kept with its position.
fn network(r: &mut Reader<'_>, value: &Value<'_>) -> Option<Network> {
    const EXAMPLE: &str = "allow = [\"pypi.org\", \"*.crates.io\"]";
    let table = r.table(value, "network", "[network] with `allow = [\"pypi.org\"]`")?;
    // `allow_private` is the server's key: refused with a message that says so.
    r.check_keys_but(table, NETWORK_KEYS, &["allow_private"], "in [network]");
    if let Some(key) = table.keys().find(|k| {
        let name: &str = k.get_ref();
        name == "allow_private"
    }) {
        r.error(
            key.span(),
            "`allow_private` is the server's setting, not a job's: a job's traffic reaches public addresses only, unless the operator adds the range to the server's [network] allow_private; remove it here",
        );
    }
    let Some(allow) = table.get("allow") else {
        r.error(
            value.span(),
            format!(
                "[network] has no `allow`: add {EXAMPLE} (the hosts the tasks may reach), or remove [network] for no network"
            ),
        );
        return None;
    };
    let entries = r.strings(allow, "allow", EXAMPLE, MAX_ALLOW);
    if entries.is_empty() && matches!(allow.get_ref(), DeValue::Array(a) if a.is_empty()) {
        r.error(
            allow.span(),
            format!(
                "`allow` is empty: list the hosts the tasks may reach, like {EXAMPLE}, or remove [network] for no network"
            ),
        );
        return None;
    }
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for (text, span) in entries {
        match text.parse::<HostPattern>() {
            Err(e) => r.error(span, format!("[network] allow: {e}")),
            Ok(pattern) if !seen.insert(pattern.clone()) => r.error(
                span,
                format!("`{pattern}` appears twice in `allow`: remove one"),
            ),
            Ok(pattern) => {
                let (line, column) = r.position(span.start);
                out.push(AllowedHost {
                    pattern,
                    line,
                    column,
                });
            }
        }
    }
    Some(Network { allow: out })
}

/// `[[caches]]`: a name (no name twice), `paths` (none inside another, across the caches) and
/// a `size`.
fn caches(r: &mut Reader<'_>, value: &Value<'_>) -> Vec<Cache> {
    const NAME: &str = "name = \"pip\"";
    const PATHS: &str = "paths = [\"~/.cache/pip\"]";
    const SIZE: &str = "size = \"2GiB\"";
    let mut out: Vec<Cache> = Vec::new();
    let mut names = HashSet::new();
    let mut taken: Vec<String> = Vec::new();
    for (t, span) in table_items(r, value, "caches", CACHE_KEYS, MAX_CACHES) {
        let name = required(r, t, &span, "name", "caches", NAME).and_then(|v| {
            let name = r.string(v, "name", NAME)?;
            if let Err(e) = check_name(NameKind::Cache, &name) {
                r.error(v.span(), e.to_string());
                return None;
            }
            if !names.insert(name.clone()) {
                r.error(
                    v.span(),
                    format!(
                        "two caches are named `{name}`: give one another name, or join their paths"
                    ),
                );
                return None;
            }
            Some(name)
        });
        let mut paths = Vec::new();
        if let Some(v) = required(r, t, &span, "paths", "caches", PATHS) {
            let written = r.strings(v, "paths", PATHS, MAX_CACHE_PATHS);
            if written.is_empty() && matches!(v.get_ref(), DeValue::Array(a) if a.is_empty()) {
                r.error(
                    v.span(),
                    format!("`paths` is empty: list where the cache goes, like {PATHS}"),
                );
            }
            for (text, span) in written {
                match crate::cache::guest_path(&text) {
                    Err(e) => r.error(span, format!("cache path `{}` {e}", text.escape_debug())),
                    Ok(path) => match taken.iter().find(|p| crate::cache::overlap(p, &path)) {
                        Some(other) => r.error(
                            span,
                            format!(
                                "cache path `{text}` ({path} in the guest) overlaps {other}, already a cache's: a path may be in one cache once, not inside another"
                            ),
                        ),
                        None => {
                            taken.push(path.clone());
                            paths.push(path);
                        }
                    },
                }
            }
        }
        let size = required(r, t, &span, "size", "caches", SIZE).and_then(|v| {
            let text = r.string(v, "size", SIZE)?;
            match parse_size(&text) {
                Ok(size) if size.0 < MIN_CACHE_SIZE || size.0 > MAX_CACHE_SIZE => {
                    r.error(
                        v.span(),
                        format!(
                            "the cache's `size` is {size}; it must be between {} and {}",
                            ByteSize(MIN_CACHE_SIZE),
                            ByteSize(MAX_CACHE_SIZE)
                        ),
                    );
                    None
                }
                Ok(size) => Some(size),
                Err(e) => {
                    r.error(
                        v.span(),
                        format!("the cache's `size`: {e}: write it like {SIZE}"),
                    );
                    None
                }
            }
        });
        if let (Some(name), Some(size)) = (name, size)
            && !paths.is_empty()
        {
            out.push(Cache { name, paths, size });
        }
    }
    out
}
