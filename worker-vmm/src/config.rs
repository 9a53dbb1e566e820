//! The worker's configuration file (configs/worker.toml documents every key).

use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;
use vmfarm_proto::config_paths::beside;
use vmfarm_proto::units::{ByteSize, GIB, HumanDuration, MIB};

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    pub server: ServerUrls,
    /// Empty: the host name.
    pub name: String,
    pub token: String,
    pub images_dir: PathBuf,
    pub work_dir: PathBuf,
    pub allowed_local_sources: Vec<PathBuf>,
    pub slots: Slots,
    pub guest: GuestDefaults,
    pub backend: BackendConfig,
    pub network: NetworkConfig,
    pub jail: JailConfig,
    pub warm_start: WarmStartConfig,
    pub caches: CachesConfig,
    pub metrics: MetricsListener,
}

/// Where the worker leases jobs: one server, or the URLs of a farm's replicas, tried in turn
/// (the worker moves on to the next when one does not answer). Never an empty list.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "OneOrMany")]
pub struct ServerUrls(Vec<String>);

/// `server` as the config file may say it: a URL, or a list of them.
#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl TryFrom<OneOrMany> for ServerUrls {
    type Error = String;

    fn try_from(said: OneOrMany) -> Result<ServerUrls, String> {
        match said {
            OneOrMany::One(url) => ServerUrls::replicas(vec![url]),
            OneOrMany::Many(urls) => ServerUrls::replicas(urls),
        }
    }
}

impl ServerUrls {
    /// One server.
    pub fn one(url: String) -> ServerUrls {
        ServerUrls(vec![url])
    }

    /// The replicas at `urls`: at least one, none empty.
    pub fn replicas(urls: Vec<String>) -> Result<ServerUrls, String> {
        if urls.is_empty() || urls.iter().any(|u| u.is_empty()) {
            return Err(
                "server is empty: give the server's URL, or a list of its replicas' URLs".into(),
            );
        }
        Ok(ServerUrls(urls))
    }

    pub fn urls(&self) -> &[String] {
        &self.0
    }
}

/// The worker's own Prometheus `/metrics` listener: off unless `listen` is set; then it asks
/// for `token` (`Authorization: Bearer`), unless `open`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsListener {
    pub listen: Option<std::net::SocketAddr>,
    pub token: String,
    pub open: bool,
}

/// The jobs' network proxy (issue 14) and its cache of package files.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkConfig {
    pub cache_dir: PathBuf,
    pub cache_max_size: ByteSize,
    pub max_connections_per_job: u32,
    pub max_bytes_per_job: ByteSize,
    pub idle_timeout: HumanDuration,
    pub connect_timeout: HumanDuration,
}

/// The budget running guests share.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Slots {
    pub cpus: u32,
    pub memory: ByteSize,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GuestDefaults {
    pub default_cpus: u32,
    pub default_memory: ByteSize,
    pub boot_timeout: HumanDuration,
    /// The same for images that boot by firmware: from VM start to cloud-init's host keys.
    pub firmware_boot_timeout: HumanDuration,
    /// How long a failed job's guest stays for `vmfarm ssh JOB` (a manifest may ask for less);
    /// "0s": not kept.
    pub keep_failed: HumanDuration,
    /// Certificate authorities (PEM files, or folders of `*.crt` files) every guest trusts
    /// besides its image's own.
    pub ca_certificates: Vec<PathBuf>,
}

/// Which backend boots guests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    Auto,
    Kvm,
    Qemu,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackendConfig {
    pub default: BackendChoice,
    /// Per-image choice, overriding `default`.
    pub images: BTreeMap<String, BackendChoice>,
}

/// Jobs started from a template snapshot of their image (see `worker::templates`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WarmStartConfig {
    /// Whether jobs start from snapshots (where the backend takes them: QEMU).
    pub enabled: bool,
    /// Images whose jobs always boot cold.
    pub cold_images: Vec<String>,
    /// Where the snapshots are kept (a guest's memory, devices and disk each), across restarts.
    pub dir: PathBuf,
    /// The most snapshots the worker keeps (one per image and job size); past it, the one used
    /// longest ago makes room once unused for a while, else jobs of other images and sizes
    /// boot cold.
    pub max_templates: usize,
}

impl Default for WarmStartConfig {
    fn default() -> Self {
        WarmStartConfig {
            enabled: true,
            cold_images: Vec::new(),
            dir: PathBuf::from("./vmfarm-data/templates"),
            max_templates: 8,
        }
    }
}

impl WarmStartConfig {
    /// Whether jobs of `image` start from its snapshot.
    pub fn warm(&self, image: &str) -> bool {
        self.enabled && !self.cold_images.iter().any(|cold| cold == image)
    }
}

/// `[caches]`: the cache disks of jobs' `[[caches]]`, kept per owner, image and name.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CachesConfig {
    /// Where the caches are kept, across restarts.
    pub dir: PathBuf,
    /// The largest cache a job may ask for; a job that asks for more fails saying so.
    pub max_size: ByteSize,
    /// What all caches' files may take together: past it, those used longest ago go.
    pub total_size: ByteSize,
    /// A cache no job used for this long goes.
    pub max_age: HumanDuration,
}

impl Default for CachesConfig {
    fn default() -> Self {
        CachesConfig {
            dir: PathBuf::from("./vmfarm-data/caches"),
            max_size: ByteSize(16 * GIB),
            total_size: ByteSize(64 * GIB),
            max_age: HumanDuration(Duration::from_secs(14 * 24 * 3600)),
        }
    }
}

/// Whether each VMM process is jailed (see `backend::jail`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JailMode {
    /// Jailed when the worker runs as root; otherwise unjailed, said once in the log.
    Auto,
    /// Always jailed: the worker refuses to start without root or cgroups.
    On,
    /// Never jailed.
    Off,
}

/// The VMM jail: its users and the cgroup limits of each guest.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JailConfig {
    pub mode: JailMode,
    /// The first of the users VMMs run as, one per running guest.
    pub first_uid: u32,
    /// How many users, from `first_uid` on: at least the most guests that run at once.
    pub uid_count: u32,
    /// Where the cgroup file systems are mounted (v2 there, or v1's memory, cpu and pids).
    pub cgroup_root: PathBuf,
    /// The cgroup, in each hierarchy, that guests' cgroups are made under.
    pub cgroup_parent: String,
    /// A guest's memory limit is its RAM plus this (the VMM's own memory; QEMU's TCG code cache).
    pub memory_overhead: ByteSize,
    /// Most tasks (threads) a guest's VMM may have.
    pub pids: u32,
}

impl Default for JailConfig {
    fn default() -> Self {
        JailConfig {
            mode: JailMode::Auto,
            first_uid: 960_000,
            uid_count: 1000,
            cgroup_root: PathBuf::from("/sys/fs/cgroup"),
            cgroup_parent: "vmfarm".into(),
            memory_overhead: ByteSize(512 * MIB),
            pids: 256,
        }
    }
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            server: ServerUrls::one("http://127.0.0.1:8080".into()),
            name: String::new(),
            token: String::new(),
            images_dir: PathBuf::from("./vmfarm-data/images"),
            work_dir: PathBuf::from("./vmfarm-data/work"),
            allowed_local_sources: Vec::new(),
            slots: Slots::default(),
            guest: GuestDefaults::default(),
            backend: BackendConfig::default(),
            network: NetworkConfig::default(),
            jail: JailConfig::default(),
            warm_start: WarmStartConfig::default(),
            caches: CachesConfig::default(),
            metrics: MetricsListener::default(),
        }
    }
}

impl Default for NetworkConfig {
    fn default() -> Self {
        NetworkConfig {
            cache_dir: PathBuf::from("./vmfarm-data/proxy-cache"),
            cache_max_size: ByteSize(10 * GIB),
            max_connections_per_job: 64,
            max_bytes_per_job: ByteSize(8 * GIB),
            idle_timeout: HumanDuration(Duration::from_secs(120)),
            connect_timeout: HumanDuration(Duration::from_secs(15)),
        }
    }
}

impl Default for Slots {
    fn default() -> Self {
        Slots {
            cpus: 2,
            memory: ByteSize(4 * GIB),
        }
    }
}

impl Default for GuestDefaults {
    fn default() -> Self {
        GuestDefaults {
            default_cpus: 1,
            default_memory: ByteSize(GIB),
            boot_timeout: HumanDuration(Duration::from_secs(60)),
            firmware_boot_timeout: HumanDuration(Duration::from_secs(300)),
            keep_failed: HumanDuration(Duration::ZERO),
            ca_certificates: vec![PathBuf::from("/usr/local/share/ca-certificates")],
        }
    }
}

impl Default for BackendConfig {
    fn default() -> Self {
        BackendConfig {
            default: BackendChoice::Auto,
            images: BTreeMap::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the worker config {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the worker config {path} is invalid: {message}")]
    Invalid { path: PathBuf, message: String },
}

impl WorkerConfig {
    pub fn load(path: &Path) -> Result<WorkerConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut config = Self::parse(&text).map_err(|message| ConfigError::Invalid {
            path: path.to_owned(),
            message,
        })?;
        let paths = [
            &mut config.images_dir,
            &mut config.work_dir,
            &mut config.network.cache_dir,
            &mut config.warm_start.dir,
            &mut config.caches.dir,
        ]
        .into_iter()
        .chain(&mut config.allowed_local_sources)
        .chain(&mut config.guest.ca_certificates)
        .chain([&mut config.jail.cgroup_root]);
        for file in paths {
            beside(path, file);
        }
        Ok(config)
    }

    pub fn parse(text: &str) -> Result<WorkerConfig, String> {
        let config: WorkerConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        let g = &config.guest;
        if config.slots.cpus == 0 {
            return Err("slots.cpus is 0: the worker could never run a job".into());
        }
        if g.default_cpus == 0 || g.default_cpus > config.slots.cpus {
            return Err(format!(
                "guest.default_cpus is {}: it must be between 1 and slots.cpus ({})",
                g.default_cpus, config.slots.cpus
            ));
        }
        if g.default_memory > config.slots.memory {
            return Err(format!(
                "guest.default_memory ({}) is more than slots.memory ({})",
                g.default_memory, config.slots.memory
            ));
        }
        let n = &config.network;
        if n.max_connections_per_job == 0 {
            return Err(
                "network.max_connections_per_job is 0: a job with network could never connect"
                    .into(),
            );
        }
        if n.max_bytes_per_job.0 == 0 {
            return Err(
                "network.max_bytes_per_job is 0B: a job with network could not move a byte".into(),
            );
        }
        for (key, value) in [
            ("network.idle_timeout", n.idle_timeout),
            ("network.connect_timeout", n.connect_timeout),
            ("guest.boot_timeout", config.guest.boot_timeout),
            (
                "guest.firmware_boot_timeout",
                config.guest.firmware_boot_timeout,
            ),
        ] {
            if value.0.is_zero() {
                return Err(format!(
                    "{key} is 0s: give it a positive duration, like \"30s\""
                ));
            }
        }
        let jail = &config.jail;
        if jail.uid_count == 0
            || jail.first_uid == 0
            || jail.first_uid.checked_add(jail.uid_count).is_none()
        {
            return Err(format!(
                "jail.first_uid ({}) and jail.uid_count ({}): give a range of users above 0 \
                 with room for every guest that runs at once",
                jail.first_uid, jail.uid_count
            ));
        }
        if jail.pids == 0 {
            return Err("jail.pids is 0: no VMM could start".into());
        }
        Ok(config)
    }

    /// The backend for `image`: its own entry, else the default.
    pub fn backend_for(&self, image: &str) -> BackendChoice {
        self.backend
            .images
            .get(image)
            .copied()
            .unwrap_or(self.backend.default)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_relative_paths_are_beside_the_config_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("worker.toml");
        std::fs::write(
            &file,
            "images_dir = \"images\"\nwork_dir = \"/var/lib/vmfarm/work\"\n\
             allowed_local_sources = [\"repos\"]\n",
        )
        .unwrap();
        let config = WorkerConfig::load(&file).unwrap();
        assert_eq!(config.images_dir, dir.path().join("images"));
        assert_eq!(config.work_dir, Path::new("/var/lib/vmfarm/work"));
        assert_eq!(config.allowed_local_sources, [dir.path().join("repos")]);
        // A default that is relative is beside the file too.
        assert_eq!(
            config.network.cache_dir,
            dir.path().join("./vmfarm-data/proxy-cache")
        );
    }

    #[test]
    fn test_shipped_config_is_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/worker.toml");
        // As written (loaded, its relative paths would be beside it).
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(WorkerConfig::parse(&text).unwrap(), WorkerConfig::default());
    }

    #[test]
    fn test_backend_per_image_overrides_default() {
        let config = WorkerConfig::parse(
            "[backend]\ndefault = \"kvm\"\n[backend.images]\nfreebsd-14 = \"qemu\"\n",
        )
        .unwrap();
        assert_eq!(config.backend_for("freebsd-14"), BackendChoice::Qemu);
        assert_eq!(config.backend_for("debian-12"), BackendChoice::Kvm);
    }

    #[test]
    fn test_bad_configs_are_refused_with_the_reason() {
        let cases = [
            ("severs = \"x\"\n", "unknown field `severs`"),
            ("[slots]\ncpus = 0\n", "never run a job"),
            (
                "[guest]\ndefault_cpus = 3\n",
                "between 1 and slots.cpus (2)",
            ),
            (
                "[guest]\ndefault_memory = \"8GiB\"\n",
                "more than slots.memory (4GiB)",
            ),
            ("[backend]\ndefault = \"xen\"\n", "unknown variant `xen`"),
            ("[guest]\nboot_timeout = \"soon\"\n", "not a duration"),
            (
                "[network]\nmax_connections_per_job = 0\n",
                "could never connect",
            ),
            (
                "[network]\nmax_bytes_per_job = \"0B\"\n",
                "could not move a byte",
            ),
            (
                "[network]\nidle_timeout = \"0s\"\n",
                "network.idle_timeout is 0s",
            ),
            (
                "[network]\nconnect_timeout = \"0s\"\n",
                "network.connect_timeout is 0s",
            ),
            ("[network]\ncache_max_size = \"10G\"\n", "write \"10GiB\""),
            ("[jail]\nmode = \"maybe\"\n", "unknown variant `maybe`"),
            ("[jail]\nuid_count = 0\n", "a range of users above 0"),
            (
                "[jail]\nfirst_uid = 4294967000\n",
                "a range of users above 0",
            ),
            ("[jail]\npids = 0\n", "no VMM could start"),
        ];
        for (text, want) in cases {
            let err = WorkerConfig::parse(text).unwrap_err();
            assert!(err.contains(want), "{text:?}: {err}");
        }
    }
}
