//! The command-line contract: every subcommand and flag, with the defaults of CONTRACTS.md.

use clap::{Args, Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;

pub const DEFAULT_SERVER: &str = "http://127.0.0.1:8080";

#[derive(Debug, Parser)]
#[command(
    name = "vmfarm",
    version,
    about = "A build farm that runs every build in a fresh virtual machine",
    after_help = crate::exit_status::HELP
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server and a local worker in one process, on the embedded defaults.
    Up(UpArgs),
    /// Run the server: HTTP API, job queue, logs, artifacts, web UI.
    Server(ServerArgs),
    /// Run a worker: lease jobs from a server and run them in guests.
    Worker(WorkerArgs),
    /// Submit a job manifest; prints one line per job (id, image).
    #[command(after_help = crate::exit_status::HELP)]
    Submit(SubmitArgs),
    /// Show jobs.
    Status(StatusArgs),
    /// Print a job's log.
    #[command(after_help = crate::exit_status::HELP)]
    Logs(LogsArgs),
    /// Download every artifact of a job.
    Artifacts(ArtifactsArgs),
    /// Cancel a job.
    Cancel(CancelArgs),
    /// Run a job again (its manifest, on its image, from the same push); prints the new job.
    #[command(after_help = crate::exit_status::HELP)]
    Rerun(RerunArgs),
    /// A shell, or a command, in a running job's guest or a failed job's kept guest (through
    /// the server; the job's owner or an admin). Exits with the session's status.
    Ssh(SshArgs),
    /// Git hooks that start builds from a plain git server.
    #[command(subcommand)]
    Hook(HookCommand),
    /// List or drop the cache disks a worker keeps for jobs' `[[caches]]` (on the worker's host).
    #[command(subcommand)]
    Caches(CachesCommand),
    /// Check job manifests without submitting them.
    Validate(ValidateArgs),
    /// Build and list guest images.
    Images(vmfarm_worker::images::ImagesArgs),
    /// Run virtual machines with the integrated VMM.
    #[command(subcommand)]
    Vm(VmCommand),
    /// Benchmarks, each printed beside its reference.
    Bench(BenchArgs),
    /// Print the completion script of a shell (bash: `vmfarm completions bash >
    /// /etc/bash_completion.d/vmfarm`).
    Completions { shell: clap_complete::Shell },
    /// Write the manual pages (vmfarm.1, vmfarm-submit.1, ...) into a folder.
    ManPages {
        /// Where to write them (made if missing).
        dir: PathBuf,
    },
}

/// How a client reaches a server.
#[derive(Debug, Args)]
pub struct ClientArgs {
    /// The server's URL.
    #[arg(long, env = "VMFARM_SERVER", default_value = DEFAULT_SERVER)]
    pub server: String,
    /// API token; default: the local data dir's `admin-token`.
    #[arg(long, env = "VMFARM_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Data dir whose `admin-token` is used when no token is given.
    #[arg(long, env = "VMFARM_DATA", default_value = "./vmfarm-data")]
    pub data: PathBuf,
}

#[derive(Debug, Args)]
pub struct UpArgs {
    /// Default: the server config's `listen`, else 127.0.0.1:8080.
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Default: the server config's `data_dir`, else ./vmfarm-data.
    #[arg(long, env = "VMFARM_DATA")]
    pub data: Option<PathBuf>,
    /// A server config file (see configs/server.toml): repositories, users, limits, network
    /// policy... The flags above override it.
    #[arg(long, value_name = "FILE")]
    pub server_config: Option<PathBuf>,
    /// A worker config file (see configs/worker.toml): slots, guest sizes, backend,
    /// allowed_local_sources... Its server, name, token and directories are `up`'s own.
    #[arg(long, value_name = "FILE")]
    pub worker_config: Option<PathBuf>,
    /// Build no image, neither the default ones at start nor the image a queued job names: run
    /// jobs on the images already in `<data dir>/images` (for hosts without the image tools,
    /// e.g. when the images were built elsewhere and copied in).
    #[arg(long)]
    pub no_build: bool,
    /// An address range (CIDR, e.g. 127.0.0.0/8 or 10.1.0.0/16) that jobs' network may reach
    /// although it is not public: the server's `[network] allow_private`. Repeat for more.
    #[arg(long, value_name = "RANGE")]
    pub allow_private: Vec<vmfarm_proto::network::AddressRange>,
}

#[derive(Debug, Args)]
#[command(
    args_conflicts_with_subcommands = false,
    subcommand_negates_reqs = true
)]
pub struct ServerArgs {
    #[command(subcommand)]
    pub action: Option<ServerAction>,
    /// Server config file (see configs/server.toml); default: /etc/vmfarm/server.toml when the
    /// package installed it.
    #[arg(long, global = true, env = "VMFARM_CONFIG")]
    pub config: Option<PathBuf>,
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    #[arg(long, env = "VMFARM_DATA", global = true)]
    pub data: Option<PathBuf>,
    /// `sqlite://PATH` or `postgres://...`; default: a SQLite file in the data dir.
    #[arg(long, env = "VMFARM_DATABASE_URL", global = true)]
    pub database_url: Option<String>,
}

/// Administration of the server's database (works whether the server runs or not).
#[derive(Debug, Subcommand)]
pub enum ServerAction {
    /// Make, list and revoke tokens.
    #[command(subcommand)]
    Token(TokenAction),
    /// Store and list secrets that manifests may name.
    #[command(subcommand)]
    Secret(SecretAction),
    /// Manage users (who log in to the web UI and own jobs, schedules, secrets and tokens).
    #[command(subcommand)]
    User(UserAction),
    /// Delete the logs and artifacts that the config's [retention] lets go (the server's sweep,
    /// now), and files no row points at.
    Gc {
        /// Say what would go, and delete nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print the outcome as JSON (`dry_run`, `expiring`: `job`, `reason`, `artifact_bytes`;
        /// after a sweep `expired`, `purged`, `orphans`).
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum UserAction {
    /// Add a user (or set a user's password); the password is read from standard input.
    Add {
        name: String,
        /// The user sees and acts on every user's jobs and schedules.
        #[arg(long)]
        admin: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum TokenAction {
    /// Make a token; it is printed once and stored only as a hash.
    Create {
        /// A worker token for the worker of this name.
        #[arg(long, conflicts_with_all = ["name", "scopes", "user", "max_priority"])]
        worker: Option<String>,
        /// An API token of this name.
        #[arg(long, requires_all = ["scopes", "user"])]
        name: Option<String>,
        /// Its scopes: submit, read, metrics (scraping /metrics only), admin (admin only for an admin
        /// user).
        #[arg(long, value_delimiter = ',')]
        scopes: Vec<String>,
        /// The user it acts for: its jobs are that user's, it reaches that user's things.
        #[arg(long)]
        user: Option<String>,
        /// The highest priority a manifest submitted with it may ask for.
        #[arg(long, allow_negative_numbers = true)]
        max_priority: Option<i64>,
    },
    /// List the tokens: names, users, scopes, caps, where they came from (never the tokens).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Revoke every token of this name: it stops working at once, and its web sessions end.
    Revoke { name: String },
}

#[derive(Debug, Subcommand)]
pub enum SecretAction {
    /// Store (or replace) a secret, owned by a user.
    Set {
        name: String,
        /// Its owner: that user's jobs and schedules may name it.
        #[arg(long)]
        user: String,
        /// Another user whose jobs may name it too (repeatable).
        #[arg(long = "share-with")]
        share_with: Vec<String>,
        /// Read the value from this file.
        #[arg(
            long,
            conflicts_with = "value_stdin",
            required_unless_present = "value_stdin"
        )]
        file: Option<PathBuf>,
        /// Read the value from standard input.
        #[arg(long)]
        value_stdin: bool,
    },
    /// List the secrets: names, owners and who may use them (never the values).
    List {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// Worker config file (see configs/worker.toml); default: /etc/vmfarm/worker.toml when the
    /// package installed it.
    #[arg(long, env = "VMFARM_CONFIG")]
    pub config: Option<PathBuf>,
    #[arg(long, env = "VMFARM_SERVER")]
    pub server: Option<String>,
    /// The worker's token.
    #[arg(long, env = "VMFARM_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    #[arg(long)]
    pub images_dir: Option<PathBuf>,
    /// The token its /metrics listener asks for (`[metrics] token`).
    #[arg(long, env = "VMFARM_METRICS_TOKEN", hide_env_values = true)]
    pub metrics_token: Option<String>,
}

#[derive(Debug, Args)]
pub struct SubmitArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Stream the logs (on stderr with --json); the exit status says how the jobs ended.
    #[arg(long)]
    pub follow: bool,
    /// Print the submit answer as JSON (`group_id`, `jobs`: `id`, `image`, `waiting`).
    #[arg(long)]
    pub json: bool,
    /// The job manifest (TOML).
    pub file: PathBuf,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Print a JSON array of jobs.
    #[arg(long)]
    pub json: bool,
    pub jobs: Vec<String>,
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Stream the log until the job ends; the exit status says how it ended.
    #[arg(long)]
    pub follow: bool,
    /// Print the log's chunks as JSON lines (`offset`, `stream`, `task`, `ts_ms`, `data`); with
    /// --follow, a last line `{"state": ...}`.
    #[arg(long)]
    pub json: bool,
    pub job: String,
}

#[derive(Debug, Args)]
pub struct ArtifactsArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    pub job: String,
    /// Where to put them.
    #[arg(long, default_value = ".")]
    pub out: PathBuf,
    /// Print what was downloaded as a JSON array (`name`, `path`, `size`, `sha256`).
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct CancelArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Print the job as JSON (as `status --json` shows a job).
    #[arg(long)]
    pub json: bool,
    pub job: String,
}

#[derive(Debug, Args)]
pub struct RerunArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    pub job: String,
    /// Stream the new job's log (on stderr with --json); the exit status says how it ended.
    #[arg(long)]
    pub follow: bool,
    /// Print the answer as JSON, as `submit --json` does.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct SshArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    pub job: String,
    /// What to run instead of the login shell (after `--`).
    #[arg(last = true)]
    pub command: Vec<String>,
}

#[derive(Debug, Subcommand)]
pub enum CachesCommand {
    /// One line per cache: OWNER/IMAGE/NAME, its newest version, size, what its files take, when
    /// a job last used it; those used longest ago first.
    List(CachesArgs),
    /// Drops a cache whole (its next job starts empty); a job running on it stores nothing.
    Drop {
        #[command(flatten)]
        where_: CachesArgs,
        /// The cache, as `list` names it: OWNER/IMAGE/NAME.
        cache: String,
    },
}

/// Which worker's caches.
#[derive(Debug, Args)]
pub struct CachesArgs {
    /// The worker's config file, whose `[caches] dir` is read; default: /etc/vmfarm/worker.toml
    /// when the package installed it.
    #[arg(long, env = "VMFARM_CONFIG")]
    pub config: Option<PathBuf>,
    /// The caches' folder itself (`vmfarm up` keeps them in `<data dir>/caches`).
    #[arg(long, conflicts_with = "config")]
    pub dir: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum HookCommand {
    /// A bare repository's `hooks/post-receive`: reads the `OLD NEW REF` lines git gives it and
    /// asks the server to build each updated ref of the repository (its `.vmfarm/*.toml` and
    /// `.vmfarm.toml` at the new commit), printing what each built for the one who pushed.
    PostReceive(PostReceiveArgs),
}

#[derive(Debug, Args)]
pub struct PostReceiveArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// The repository's name in the server's `[[repositories]]`.
    #[arg(long, env = "VMFARM_REPOSITORY")]
    pub repository: String,
    /// Print each ref's answer as a JSON line (`push` or `ignored`, as `POST /api/pushes` gives).
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ValidateArgs {
    /// Print a JSON array: each file with `ok`, its `summary` or its `errors` (`line`, `column`,
    /// `message`).
    #[arg(long)]
    pub json: bool,
    /// Manifests to check.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum VmCommand {
    #[command(about = vmfarm_worker::vmm::cli::ABOUT)]
    Run(vmfarm_worker::vmm::cli::VmRunArgs),
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub which: BenchKind,
}

#[derive(Debug, Subcommand)]
pub enum BenchKind {
    /// `vmfarm vm run` beside QEMU microvm: boot times and memory overhead (needs hardware KVM;
    /// here, run it in the KVM lab: tests/kvm-lab/lab.sh bench-boot).
    Boot(Box<crate::bench::boot::BootBenchArgs>),
    /// The disk engines of `vm run` (raw file, qcow2 overlay) beside `qemu-img bench`, on this host.
    Disk(crate::bench::disk::DiskBenchArgs),
    /// Artifact uploads and downloads over HTTP with the artifacts in an S3-compatible bucket
    /// (s3s-fs on loopback) beside the server's own folder.
    Artifacts,
    /// The job queue on SQLite and PostgreSQL: cycles, submits and leases per second, lease latency.
    Queue {
        /// Also measure this PostgreSQL server (default: $VMFARM_TEST_POSTGRES).
        #[arg(long)]
        postgres: Option<String>,
    },
    /// A 64 MiB download in a guest through the job's proxy beside the same on the host, and
    /// the packages step with the proxy's cache cold, then warm (qemu backend, debian-13).
    Network {
        #[command(flatten)]
        dir: ImagesDir,
    },
    /// git push (post-receive hook) -> first line of the pushed commit's task, beside submit ->
    /// first task line (qemu backend, the tiny image).
    Push {
        #[command(flatten)]
        dir: ImagesDir,
    },
    /// A line the guest prints -> a follower of the job's live log has it (p50, p99), beside
    /// a follower polling once a second (the debian-12 image).
    LiveLog {
        #[command(flatten)]
        dir: ImagesDir,
    },
    /// Submit -> first line of the first task, per backend usable on this host.
    JobStart {
        #[command(flatten)]
        dir: ImagesDir,
        /// The images to measure (repeatable; a firmware-booted one runs on QEMU whatever the
        /// backend).
        #[arg(long = "image", default_value = "tiny")]
        images: Vec<String>,
        /// Jobs per backend and image, one after another.
        #[arg(long, default_value_t = 20)]
        jobs: usize,
    },
    /// A real build's install step (a venv and packages from PyPI) with a cache disk, beside
    /// the same without one (qemu backend).
    CacheBuild {
        #[command(flatten)]
        dir: ImagesDir,
        /// A Debian image with vmfarm's agent.
        #[arg(long, default_value = "debian-12")]
        image: String,
    },
    /// Memory of N guests at once on QEMU, booted cold beside restored from one snapshot.
    WarmMemory {
        #[command(flatten)]
        dir: ImagesDir,
        /// An image with vmfarm's agent.
        #[arg(long, default_value = "tiny")]
        image: String,
        /// Guests at once.
        #[arg(long, default_value_t = 16)]
        guests: usize,
        /// Each guest's memory, MiB.
        #[arg(long, default_value_t = 512)]
        memory_mib: u32,
    },
}

/// Where a benchmark finds the images it boots.
#[derive(Debug, Clone, Args)]
pub struct ImagesDir {
    /// The images dir holding the images the benchmark boots.
    #[arg(
        long,
        env = "VMFARM_IMAGES_DIR",
        default_value = "./vmfarm-data/images"
    )]
    pub images_dir: PathBuf,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn test_cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn test_client_defaults_follow_the_contract() {
        let cli = Cli::try_parse_from(["vmfarm", "status", "--json", "j1"]).unwrap();
        let Command::Status(args) = cli.command else {
            panic!("not status")
        };
        if std::env::var_os("VMFARM_SERVER").is_none() {
            assert_eq!(args.client.server, DEFAULT_SERVER);
        }
        assert!(args.json);
        assert_eq!(args.jobs, ["j1"]);
    }
}
