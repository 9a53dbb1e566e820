//! The server's configuration file (configs/server.toml documents every key).

use crate::db::SqliteSync;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use vmfarm_proto::config_paths::beside;
use vmfarm_proto::network::{AddressRange, HostPattern};
use vmfarm_proto::units::{ByteSize, GIB, HumanDuration, KIB, MIB};

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// Empty: a SQLite file in `data_dir`.
    pub database_url: String,
    pub sqlite_synchronous: SqliteSync,
    pub limits: Limits,
    pub leases: Leases,
    pub workers: Vec<WorkerToken>,
    pub tokens: Vec<ApiToken>,
    pub schedules: Vec<Schedule>,
    pub users: Vec<User>,
    pub web: Web,
    pub metrics: MetricsAccess,
    pub triggers: Triggers,
    pub network: NetworkPolicy,
    pub retention: Retention,
    pub artifacts: Artifacts,
    pub repositories: Vec<Repository>,
    /// Where users reach the web UI (`https://farm.example.org`), for the links the server
    /// gives others (commit statuses); default: `http://` and the listen address.
    pub public_url: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub max_manifest_size: ByteSize,
    pub max_artifact_size: ByteSize,
    pub max_artifacts_per_job: ByteSize,
    pub max_log_size: ByteSize,
    pub default_job_timeout: HumanDuration,
    /// Most jobs of one user leased or running at once (`None`: no limit).
    pub max_running_per_user: Option<u64>,
    /// Most jobs of one user waiting in the queue; a submit past it gets 429 (`None`: no limit).
    pub max_queued_per_user: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Leases {
    pub ttl: HumanDuration,
    pub max_attempts: u32,
    pub long_poll: HumanDuration,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerToken {
    pub name: String,
    pub token: String,
}

/// What an API token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Submit,
    Read,
    Admin,
    /// Scraping `/metrics` (a monitoring system's token), and nothing else.
    Metrics,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiToken {
    pub name: String,
    pub token: String,
    pub scopes: Vec<Scope>,
    /// The user whose jobs the token submits and reads: the built-in `admin` when not given.
    #[serde(default = "admin_user")]
    pub user: String,
    /// The highest priority its manifests may ask for.
    #[serde(default)]
    pub max_priority: Option<i64>,
}

fn admin_user() -> String {
    crate::users::ADMIN.to_owned()
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Schedule {
    pub name: String,
    pub cron: String,
    #[serde(default)]
    pub timezone: Option<String>,
    /// Path of the manifest to enqueue, relative to the config file's folder.
    pub manifest: PathBuf,
    /// The user whose jobs its runs are (and whose secrets they may name).
    #[serde(default = "admin_user")]
    pub owner: String,
}

/// A repository whose pushes build every `.vmfarm/*.toml` (and `.vmfarm.toml`) of the pushed
/// commit: from a forge's webhook (`POST /api/hooks/FORGE`) or a git server's post-receive hook
/// (`vmfarm hook post-receive`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Repository {
    /// As its forge names it (`acme/app`: GitHub's and Forgejo's `full_name`, GitLab's
    /// `path_with_namespace`), or any name the hook is given.
    pub name: String,
    /// What the server reads the manifests from and the workers clone: an `https://` URL, or a
    /// local path (which the workers must list in `allowed_local_sources`).
    pub url: String,
    /// The user whose jobs its pushes make (and whose secrets they may name).
    #[serde(default = "admin_user")]
    pub owner: String,
    /// The forge whose webhook may call for it; none: only the hook (with a token).
    #[serde(default)]
    pub forge: Option<Forge>,
    /// The webhook's secret: the HMAC key (GitHub, Forgejo, Gitea) or the token (GitLab).
    #[serde(default)]
    pub webhook_secret: Option<String>,
    /// Branches that build, as glob patterns (`main`, `release/*`).
    #[serde(default = "all_branches")]
    pub branches: Vec<String>,
    /// Tags that build, as glob patterns; none by default.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Build pull (merge) requests opened or updated on the forge, at their head commit. Their
    /// manifests may not name secrets: their code is not yet the repository's.
    #[serde(default)]
    pub pull_requests: bool,
    /// The name of a secret of the owner holding a forge token that may set commit statuses:
    /// with it, each pushed job's state goes back to the forge (pending, then its result).
    #[serde(default)]
    pub status_token: Option<String>,
    /// The forge's API: `https://api.github.com` (GitHub's default), `https://gitlab.com/api/v4`
    /// (GitLab's default), `https://codeberg.org/api/v1` (Forgejo has none: say which).
    #[serde(default)]
    pub status_api: Option<String>,
}

impl Repository {
    /// Where commit statuses go, when they are reported.
    pub fn status_api(&self) -> Option<&str> {
        self.status_token.as_ref()?;
        match (self.forge?, &self.status_api) {
            (_, Some(api)) => Some(api.trim_end_matches('/')),
            (Forge::Github, None) => Some("https://api.github.com"),
            (Forge::Gitlab, None) => Some("https://gitlab.com/api/v4"),
            (Forge::Forgejo, None) => None,
        }
    }
}

fn all_branches() -> Vec<String> {
    vec!["*".to_owned()]
}

/// A forge whose webhooks the server takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Forge {
    Github,
    Gitlab,
    /// Forgejo, and Gitea (the same payloads and signature).
    Forgejo,
}

impl Forge {
    pub fn as_str(self) -> &'static str {
        match self {
            Forge::Github => "github",
            Forge::Gitlab => "gitlab",
            Forge::Forgejo => "forgejo",
        }
    }
}

/// A person who logs in to the web UI.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct User {
    pub name: String,
    /// An argon2 hash in PHC form (`$argon2id$...`), as `vmfarm server user add` makes.
    pub password_hash: String,
    /// Sees and acts on every user's jobs and schedules.
    #[serde(default)]
    pub admin: bool,
}

/// Who may read `/metrics`: callers with a token of the `metrics` (or `admin`) scope, or
/// anyone when `open`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsAccess {
    pub open: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Web {
    /// How long a login lasts.
    pub session_ttl: HumanDuration,
    /// Mark the session cookie `Secure` (sent over HTTPS only; browsers treat loopback as secure).
    pub secure_cookie: bool,
    /// Failed logins (for one user name, or from one address, counted from the first for
    /// `login_lock_for`) past which logins are refused until that window ends; from the third
    /// on, each failed answer is slowed.
    pub failed_logins_before_lock: u32,
    pub login_lock_for: HumanDuration,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Triggers {
    /// Deliveries of one webhook before it is given up.
    pub max_attempts: u32,
    /// Wait before the first retry; each next retry waits twice as long.
    pub first_retry: HumanDuration,
    /// How long one POST may take.
    pub timeout: HumanDuration,
    /// Non-public address ranges webhooks may reach nonetheless (none by default).
    pub allow_private: Vec<AddressRange>,
}

/// The operator's policy for jobs' network (`[network]`, issue 14).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkPolicy {
    /// Host patterns a job's `[network] allow` may ask for: each of the job's patterns must be
    /// covered by one of these ([`HostPattern::covers`]), or the job is refused at submit.
    pub allow: Vec<HostPattern>,
    /// Non-public address ranges a job's traffic may reach nonetheless (none by default); handed
    /// to the worker in each lease.
    pub allow_private: Vec<AddressRange>,
}

impl Default for NetworkPolicy {
    fn default() -> Self {
        NetworkPolicy {
            // Any public host, on ports 80 and 443.
            allow: vec!["*".parse().expect("`*` is a host pattern")],
            allow_private: Vec::new(),
        }
    }
}

/// Where artifacts are stored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Artifacts {
    /// An S3-compatible bucket, which every replica reaches; without it, files in
    /// `<data_dir>/artifacts`.
    pub s3: Option<S3Bucket>,
}

/// An S3-compatible bucket (AWS S3, MinIO, Ceph's radosgw, Garage, SeaweedFS...).
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Bucket {
    pub bucket: String,
    /// The service's URL; unset: AWS's for `region`. Requests name the bucket in the path.
    pub endpoint: Option<String>,
    #[serde(default = "default_region")]
    pub region: String,
    /// What every key of this farm starts with: retention deletes what no job holds under it.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// Both, or neither: then `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY` from the
    /// environment, or the host's instance role.
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    /// Whether a plain `http://` endpoint is allowed (a test server, a private network).
    #[serde(default)]
    pub allow_http: bool,
}

fn default_region() -> String {
    "us-east-1".to_owned()
}

fn default_prefix() -> String {
    "vmfarm".to_owned()
}

impl S3Bucket {
    fn check(&self) -> Result<(), String> {
        if self.bucket.is_empty() {
            return Err("artifacts.s3.bucket is empty: name the bucket".into());
        }
        if self.access_key_id.is_some() != self.secret_access_key.is_some() {
            return Err("artifacts.s3: give both access_key_id and secret_access_key, or neither (then AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or the instance role)".into());
        }
        if self.prefix.trim_matches('/').is_empty() {
            return Err("artifacts.s3.prefix is empty: retention deletes what no job holds under the prefix, so the farm needs one of its own".into());
        }
        if let Some(endpoint) = &self.endpoint
            && endpoint.to_ascii_lowercase().starts_with("http://")
            && !self.allow_http
        {
            return Err(format!(
                "artifacts.s3.endpoint {endpoint} is plain http: use https, or set allow_http = true for a service on a private network"
            ));
        }
        Ok(())
    }

    /// How logs and errors name it: `s3://bucket/prefix` and where.
    pub fn describe(&self) -> String {
        let at = self.endpoint.as_deref().unwrap_or(&self.region);
        format!("s3://{}/{} at {at}", self.bucket, self.prefix)
    }
}

/// Without its secret: configs are logged and printed.
impl std::fmt::Debug for S3Bucket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Bucket")
            .field("bucket", &self.bucket)
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("prefix", &self.prefix)
            .field("access_key_id", &self.access_key_id)
            .field("allow_http", &self.allow_http)
            .finish_non_exhaustive()
    }
}

/// How long logs and artifacts are kept; nothing is deleted unless a limit is set.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Retention {
    /// The logs and artifacts of jobs that ended longer ago than this are deleted.
    pub keep_for: Option<HumanDuration>,
    /// The newest this many successful jobs of each schedule keep theirs regardless.
    pub keep_successful_per_schedule: u32,
    /// The artifact store's total size: past it, the artifacts of the jobs that ended first go.
    pub max_artifact_store: Option<ByteSize>,
    /// How often the server sweeps.
    pub sweep_every: HumanDuration,
}

impl Retention {
    /// Whether anything is ever to expire.
    pub fn is_set(&self) -> bool {
        self.keep_for.is_some() || self.max_artifact_store.is_some()
    }
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            keep_for: None,
            keep_successful_per_schedule: 0,
            max_artifact_store: None,
            sweep_every: HumanDuration(Duration::from_secs(600)),
        }
    }
}

impl Default for Web {
    fn default() -> Self {
        Web {
            session_ttl: HumanDuration(Duration::from_secs(12 * 3600)),
            secure_cookie: true,
            failed_logins_before_lock: 10,
            login_lock_for: HumanDuration(Duration::from_secs(15 * 60)),
        }
    }
}

impl Default for Triggers {
    fn default() -> Self {
        Triggers {
            max_attempts: 5,
            first_retry: HumanDuration(Duration::from_secs(2)),
            timeout: HumanDuration(Duration::from_secs(10)),
            allow_private: Vec::new(),
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: PathBuf::from("./vmfarm-data"),
            database_url: String::new(),
            sqlite_synchronous: SqliteSync::default(),
            limits: Limits::default(),
            leases: Leases::default(),
            workers: Vec::new(),
            tokens: Vec::new(),
            schedules: Vec::new(),
            users: Vec::new(),
            web: Web::default(),
            metrics: MetricsAccess::default(),
            triggers: Triggers::default(),
            network: NetworkPolicy::default(),
            retention: Retention::default(),
            artifacts: Artifacts::default(),
            repositories: Vec::new(),
            public_url: None,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_manifest_size: ByteSize(256 * KIB),
            max_artifact_size: ByteSize(2 * GIB),
            max_artifacts_per_job: ByteSize(4 * GIB),
            max_log_size: ByteSize(64 * MIB),
            default_job_timeout: HumanDuration(Duration::from_secs(3600)),
            max_running_per_user: None,
            max_queued_per_user: None,
        }
    }
}

impl Default for Leases {
    fn default() -> Self {
        Leases {
            ttl: HumanDuration(Duration::from_secs(30)),
            max_attempts: 3,
            long_poll: HumanDuration(Duration::from_secs(20)),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the server config {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the server config {path} is invalid: {message}")]
    Invalid { path: PathBuf, message: String },
}

impl ServerConfig {
    /// Reads a config file; unknown keys are errors that name the key and where it is.
    pub fn load(path: &Path) -> Result<ServerConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut config = Self::parse(&text).map_err(|message| ConfigError::Invalid {
            path: path.to_owned(),
            message,
        })?;
        beside(path, &mut config.data_dir);
        for schedule in &mut config.schedules {
            beside(path, &mut schedule.manifest);
        }
        Ok(config)
    }

    pub fn parse(text: &str) -> Result<ServerConfig, String> {
        let config: ServerConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        if config.leases.max_attempts == 0 {
            return Err(
                "leases.max_attempts is 0: a job must be allowed at least one attempt".into(),
            );
        }
        if config.leases.ttl.0 < Duration::from_secs(1) {
            return Err("leases.ttl is under 1s: workers could not renew in time".into());
        }
        if config.leases.long_poll.0 > crate::workers::MAX_LONG_POLL {
            return Err(format!(
                "leases.long_poll is {}: at most {}s, so that an idle worker is known to be there",
                config.leases.long_poll,
                crate::workers::MAX_LONG_POLL.as_secs()
            ));
        }
        if config.triggers.max_attempts == 0 {
            return Err("triggers.max_attempts is 0: a webhook needs at least one try".into());
        }
        check_repositories(&config.repositories)?;
        if let Some(s3) = &config.artifacts.s3 {
            s3.check()?;
        }
        Ok(config)
    }

    /// The address of `path` (`/jobs/7`) in the web UI, as others should link to it.
    pub fn public_link(&self, path: &str) -> String {
        match &self.public_url {
            Some(url) => format!("{}{path}", url.trim_end_matches('/')),
            None => format!("http://{}{path}", self.listen),
        }
    }

    /// The database to open: the configured URL, or the SQLite file in the data dir.
    pub fn database_url(&self) -> String {
        if self.database_url.is_empty() {
            format!("sqlite://{}", self.data_dir.join("vmfarm.db").display())
        } else {
            self.database_url.clone()
        }
    }
}

/// The shortest webhook secret taken: a guessable key lets anyone sign a push.
const MIN_WEBHOOK_SECRET: usize = 16;

/// Each repository once, with a forge only beside its webhook secret (long enough), and
/// patterns that parse.
fn check_repositories(repositories: &[Repository]) -> Result<(), String> {
    let mut names = std::collections::HashSet::new();
    for repo in repositories {
        if repo.name.is_empty() || repo.name.len() > 200 {
            return Err("a [[repositories]] name must be 1 to 200 characters".into());
        }
        if !names.insert(repo.name.as_str()) {
            return Err(format!(
                "[[repositories]] `{}` is configured twice",
                repo.name
            ));
        }
        if repo.url.is_empty() || repo.url.starts_with('-') {
            return Err(format!(
                "[[repositories]] `{}`: `url` must be the repository's https:// URL or local path",
                repo.name
            ));
        }
        if let Some(secret) = &repo.webhook_secret
            && secret.len() < MIN_WEBHOOK_SECRET
        {
            return Err(format!(
                "[[repositories]] `{}`: `webhook_secret` is {} characters; give it at least \
                 {MIN_WEBHOOK_SECRET} (e.g. `openssl rand -hex 20`), or anyone could sign calls",
                repo.name,
                secret.len()
            ));
        }
        match (repo.forge, &repo.webhook_secret) {
            (Some(forge), None) => {
                return Err(format!(
                    "[[repositories]] `{}`: forge = \"{}\" needs a `webhook_secret` (the one set \
                     in the forge's webhook), or its calls could not be checked",
                    repo.name,
                    forge.as_str()
                ));
            }
            (None, Some(_)) => {
                return Err(format!(
                    "[[repositories]] `{}`: `webhook_secret` without a `forge`: add forge = \
                     \"github\", \"gitlab\" or \"forgejo\"",
                    repo.name
                ));
            }
            _ => {}
        }
        if repo.status_token.is_some() && repo.status_api().is_none() {
            return Err(format!(
                "[[repositories]] `{}`: `status_token` reports to a forge: set `forge`, and for \
                 Forgejo the `status_api` (`https://HOST/api/v1`)",
                repo.name
            ));
        }
        for pattern in repo.branches.iter().chain(&repo.tags) {
            glob::Pattern::new(pattern).map_err(|e| {
                format!(
                    "[[repositories]] `{}`: the pattern `{pattern}` is not a glob: {e}",
                    repo.name
                )
            })?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_relative_paths_are_beside_the_config_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("server.toml");
        std::fs::write(
            &file,
            "data_dir = \"state\"\n[[schedules]]\nname = \"n\"\ncron = \"0 3 * * *\"\n\
             manifest = \"jobs/nightly.toml\"\n",
        )
        .unwrap();
        let config = ServerConfig::load(&file).unwrap();
        assert_eq!(config.data_dir, dir.path().join("state"));
        assert_eq!(
            config.schedules[0].manifest,
            dir.path().join("jobs/nightly.toml")
        );
        std::fs::write(&file, "data_dir = \"/var/lib/vmfarm/server\"\n").unwrap();
        let config = ServerConfig::load(&file).unwrap();
        assert_eq!(config.data_dir, Path::new("/var/lib/vmfarm/server"));
    }

    #[test]
    fn test_a_forge_repository_needs_a_long_webhook_secret() {
        let repo = |secret: &str| {
            format!(
                "[[repositories]]\nname = \"acme/app\"\nurl = \"https://git.example.org/acme/app.git\"\n\
                 forge = \"github\"\nwebhook_secret = \"{secret}\"\n"
            )
        };
        let short = ServerConfig::parse(&repo("hunter2")).unwrap_err();
        assert!(
            short.contains("`webhook_secret` is 7 characters"),
            "{short}"
        );
        assert!(ServerConfig::parse(&repo(&"x".repeat(16))).is_ok());
        let unsigned = ServerConfig::parse(&repo("x").replace("webhook_secret = \"x\"\n", ""));
        assert!(unsigned.unwrap_err().contains("needs a `webhook_secret`"));
    }

    #[test]
    fn test_shipped_config_is_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/server.toml");
        // As written (loaded, its relative paths would be beside it).
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(ServerConfig::parse(&text).unwrap(), ServerConfig::default());
    }

    #[test]
    fn test_database_url_defaults_to_sqlite_in_data_dir() {
        let config = ServerConfig::parse("data_dir = \"/srv/farm\"\n").unwrap();
        assert_eq!(config.database_url(), "sqlite:///srv/farm/vmfarm.db");
        let pg = ServerConfig::parse("database_url = \"postgres://u@h/db\"\n").unwrap();
        assert_eq!(pg.database_url(), "postgres://u@h/db");
    }

    #[test]
    fn test_sqlite_commits_are_synced_unless_the_operator_says_normal() {
        assert_eq!(
            ServerConfig::parse("").unwrap().sqlite_synchronous,
            SqliteSync::Full
        );
        let normal = ServerConfig::parse("sqlite_synchronous = \"normal\"\n").unwrap();
        assert_eq!(normal.sqlite_synchronous, SqliteSync::Normal);
        let err = ServerConfig::parse("sqlite_synchronous = \"off\"\n").unwrap_err();
        assert!(err.to_string().contains("unknown variant `off`"), "{err}");
    }

    #[test]
    fn test_tokens_and_schedules_parse() {
        let config = ServerConfig::parse(
            "[[workers]]\nname = \"w1\"\ntoken = \"t\"\n[[tokens]]\nname = \"ci\"\ntoken = \"x\"\nscopes = [\"submit\", \"read\"]\n[[schedules]]\nname = \"nightly\"\ncron = \"0 3 * * *\"\nmanifest = \"n.toml\"\n",
        )
        .unwrap();
        assert_eq!(config.tokens[0].scopes, [Scope::Submit, Scope::Read]);
        assert_eq!(config.schedules[0].timezone, None);
    }

    #[test]
    fn test_network_policy_parses() {
        let config = ServerConfig::parse(
            "[network]\nallow = [\"*.internal.example\", \"pypi.org:8443\"]\nallow_private = [\"127.0.0.0/8\", \"fd00::/8\"]\n",
        )
        .unwrap();
        let allow: Vec<String> = config.network.allow.iter().map(|p| p.to_string()).collect();
        assert_eq!(allow, ["*.internal.example", "pypi.org:8443"]);
        assert_eq!(config.network.allow_private.len(), 2);
        let default = ServerConfig::parse("").unwrap().network;
        assert_eq!(default.allow, ["*".parse::<HostPattern>().unwrap()]);
        assert!(default.allow_private.is_empty());
        let closed = ServerConfig::parse("[network]\nallow = []\n").unwrap();
        assert!(
            closed.network.allow.is_empty(),
            "no job may ask for network"
        );
    }

    #[test]
    fn test_bad_configs_are_refused_with_the_key() {
        let cases = [
            ("listn = \"127.0.0.1:1\"\n", "unknown field `listn`"),
            ("[leases]\nttl = \"30 s\"\n", "unknown unit"),
            ("[leases]\nlong_poll = \"5m\"\n", "at most 60s"),
            ("[leases]\nmax_attempts = 0\n", "at least one attempt"),
            ("[limits]\nmax_log_size = \"1GB\"\n", "write \"1GiB\""),
            (
                "[[tokens]]\nname = \"a\"\ntoken = \"b\"\nscopes = [\"root\"]\n",
                "unknown variant `root`",
            ),
            ("listen = \"nowhere\"\n", "invalid socket address"),
            (
                "[network]\nallow = [\"*example.org\"]\n",
                "write `*.example.org` for the hosts under example.org",
            ),
            (
                "[network]\nallow_private = [\"10.1.2.3/8\"]\n",
                "write `10.0.0.0/8`",
            ),
            (
                "[network]\nallow_privat = []\n",
                "unknown field `allow_privat`",
            ),
            (
                "[artifacts.s3]\nbucket = \"b\"\nprefix = \"/\"\n",
                "artifacts.s3.prefix is empty",
            ),
            (
                "[artifacts.s3]\nbucket = \"b\"\nendpoint = \"HTTP://minio:9000\"\n",
                "is plain http",
            ),
            (
                "[artifacts.s3]\nbucket = \"b\"\naccess_key_id = \"k\"\n",
                "give both access_key_id and secret_access_key",
            ),
        ];
        for (text, want) in cases {
            let err = ServerConfig::parse(text).unwrap_err();
            assert!(err.contains(want), "{text:?}: {err}");
        }
    }
}
