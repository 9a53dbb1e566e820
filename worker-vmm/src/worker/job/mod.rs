//! One job, top down ([`JobRun::steps`]):
//!
//! 1. prepare: report `booting`, make the scratch folder, start fetching the sources on the host
//!    (they are needed only once the guest is up);
//! 2. boot the guest (from here on its teardown is guaranteed);
//! 3. settle: wait for the agent's ready line, open SSH pinned to its host key, report `running`;
//! 4. make the build directory; 5. upload the sources; 6. the environment; 7. send the secrets;
//! 8. each task in turn; 9. collect the artifacts;
//! 10. teardown: shut the guest down (killed if it does not end), stop what still runs on the
//!     host, remove the scratch folder.
//!
//! Each step is one function, says what it does in one line of the job's log and names itself
//! in its error. The whole job runs under its deadline (the lease's `timeout_ms`, counted from
//! when the worker got the lease) and under cancel: a step they interrupt ends the job
//! `timed_out` or `cancelled`, the reason saying what it was doing ([`JobLimits::step`]). A task
//! is the exception: it runs under the same limits itself, so that it can be killed in the guest
//! and reported as `timed_out` or `cancelled`.

mod artifact_glob;
mod artifacts;
mod caches;
mod counted_vm;
mod limits;
mod network;
mod outcome;
mod packages;
mod ssh_sessions;
mod tasks;
mod teardown;

use counted_vm::CountedVm;
use limits::Deadline;
pub use network::trusted_authorities;
pub use outcome::Outcome;

use super::caches::{Caches, CheckedOut};
use super::guest_paths::{BUILD_DIR, FARM_DIR, SECRETS_DIR, quote, unpack_command};
use super::heartbeat::Heartbeat;
use super::log_shipper::{self, LogSink};
use super::metrics::WorkerMetrics;
use super::server_client::{LeaseHandle, ServerClient, ServerError};
use super::sources::{self, FetchedSource, SourceError};
use super::templates::{Stamp, Templates};
use crate::backend::{Backend, Boot, BootSpec, LinuxBoot, Vm};
use crate::config::WorkerConfig;
use crate::guest::cloud_init::Seed;
use crate::guest::{
    Announcer, ExecLimits, Guest, HostFingerprint, JobKey, SshOptions, Start, identity, introduce,
    wait_ready,
};
use crate::images::manifest::{INITRD, InstalledImage};
use crate::network::{JobNetwork, ProxyCache};
use anyhow::Context;
use base64::Engine;
use limits::{Halt, JobLimits};
use outcome::ending;
use ssh_sessions::SshSessions;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use teardown::KeptGuest;
use tokio::io::AsyncReadExt;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use vmfarm_proto::wire::{LeaseResponse, LogStream, StateUpdate};
use vmfarm_proto::{JobState, Manifest};

/// What a job needs from its worker.
pub struct JobContext {
    pub client: ServerClient,
    pub config: Arc<WorkerConfig>,
    pub backend: Arc<dyn Backend>,
    pub image: InstalledImage,
    /// The worker's proxy cache, which every job's network shares.
    pub cache: ProxyCache,
    /// The PEM certificate authorities guests trust besides their own (`guest.ca_certificates`,
    /// read at start by [`trusted_authorities`]).
    pub ca_certificates: Arc<str>,
    pub metrics: Arc<WorkerMetrics>,
    /// The worker's template snapshots, which jobs start from where they can.
    pub templates: Arc<Templates>,
    /// The cache disks of jobs' `[[caches]]`.
    pub caches: Arc<Caches>,
}

/// A leased job as the daemon hands it over: its manifest, parsed once (by the daemon), and
/// when the worker got the lease, from which the job's timeout counts.
pub struct Job {
    pub lease: LeaseResponse,
    pub manifest: Manifest,
    pub leased_at: Instant,
    /// Renewing the lease since it was taken, so that a job waiting for room keeps it.
    pub heartbeat: Heartbeat,
}

/// The vCPUs and memory (MiB) a job gets: its manifest's, else the worker's defaults.
pub fn job_size(manifest: &Manifest, config: &WorkerConfig) -> (u32, u64) {
    let cpus = manifest.resources.cpus.unwrap_or(config.guest.default_cpus);
    let memory = manifest
        .resources
        .memory
        .unwrap_or(config.guest.default_memory);
    (cpus, memory.0 / (1024 * 1024))
}

/// The tasks' environment: the manifest's variables, then the job's own.
fn environment(manifest: &Manifest, lease: &LeaseResponse) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = manifest
        .environment
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    env.push(("VMFARM_JOB_ID".into(), lease.job.id.clone()));
    env.push(("VMFARM_IMAGE".into(), lease.job.image.clone()));
    env
}

/// The variable a secret also becomes (CONTRACTS.md "Secrets"): its name in upper case, when
/// that is a valid variable name.
fn secret_variable(name: &str, value: &[u8]) -> Option<(String, String)> {
    let var = name.to_ascii_uppercase();
    (vmfarm_proto::manifest::is_env_name(&var) && !name.contains('-'))
        .then(|| (var, String::from_utf8_lossy(value).into_owned()))
}

/// The lease's secrets, decoded (one that is not base64 is left out).
fn decode_secrets(secrets: &BTreeMap<String, String>) -> Vec<(String, Vec<u8>)> {
    secrets
        .iter()
        .filter_map(|(name, b64)| {
            let value = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
            Some((name.clone(), value))
        })
        .collect()
}

/// The host's fetch of the job's sources, running while the guest boots.
type SourcesFetch = JoinHandle<Result<Vec<FetchedSource>, SourceError>>;

/// Runs the leased job to its end and reports it; returns how it ended (`None` if the lease
/// was lost, when nothing more may be written).
pub async fn run(ctx: &JobContext, job: Job) -> Option<Outcome> {
    let Job {
        lease,
        manifest,
        leased_at,
        heartbeat,
    } = job;
    let handle = LeaseHandle::of(&lease);
    let secrets = decode_secrets(&lease.secrets);
    let masks: Vec<Vec<u8>> = secrets.iter().map(|(_, v)| v.clone()).collect();
    let (log, shipper) = log_shipper::start(
        ctx.client.clone(),
        handle.clone(),
        masks,
        lease.limits.max_log_bytes,
    );
    let limits = JobLimits {
        deadline: Deadline::new(leased_at, lease.job.timeout_ms),
        stopping: heartbeat.stopping.clone(),
    };
    let mut job = JobRun {
        ctx,
        lease: &lease,
        manifest: &manifest,
        handle: handle.clone(),
        leased_at,
        secrets,
        log,
        heartbeat,
        limits,
        run_dir: ctx
            .config
            .work_dir
            .join(format!("job-{}-{}", lease.job.id, lease.job.attempt)),
        fetch: None,
        console: None,
        network: None,
        proxy: None,
        source_network: None,
        source_proxy: None,
        kept: None,
        caches: Vec::new(),
        shut_cleanly: false,
    };
    let steps = job.steps().await;
    job.clean_up().await;
    let halted = steps.is_err();
    let outcome = ending(steps, job.heartbeat.stopped(), job.limits.deadline.timeout);
    if let Some(Outcome {
        state,
        reason: Some(reason),
    }) = &outcome
        && halted
    {
        match state {
            JobState::Error => job.log.farm(&format!("error: {reason}")),
            _ => job.log.farm(reason),
        }
    }
    let kept = job.kept.take();
    drop(job);
    let outcome = report_end(ctx, &handle, &lease.job.id, shipper, outcome).await;
    if let Some(kept) = kept {
        kept.hold(&lease.job.id).await;
    }
    outcome
}

/// Tells the server how the job ended, once its log is all sent.
async fn report_end(
    ctx: &JobContext,
    handle: &LeaseHandle,
    job_id: &str,
    shipper: JoinHandle<Result<(), ServerError>>,
    outcome: Option<Outcome>,
) -> Option<Outcome> {
    let shipped = shipper.await;
    let mut outcome = outcome?;
    match shipped {
        Ok(Ok(())) => {}
        Ok(Err(ServerError::LeaseLost(_))) => return None,
        // A log the server did not take whole is not the job's log: the farm failed.
        Ok(Err(e)) => outcome = log_lost(&outcome, &e),
        Err(e) => outcome = log_lost(&outcome, &e),
    }
    let update = StateUpdate {
        job_state: Some(outcome.state),
        reason: outcome.reason.clone(),
        ..StateUpdate::default()
    };
    match ctx.client.state(handle, &update).await {
        Ok(()) => Some(outcome),
        Err(e) => {
            tracing::warn!(job = %job_id, error = %e, "could not report the job's end");
            None
        }
    }
}

/// The end of a job whose log did not all reach the server, which refused it (`why`).
fn log_lost(outcome: &Outcome, why: &dyn std::fmt::Display) -> Outcome {
    tracing::error!(%why, "the server refused a part of a job's log");
    Outcome::new(
        JobState::Error,
        format!(
            "the server refused a part of the job's log ({why}); the job itself ended {}",
            outcome.state
        ),
    )
}

/// What the steps of one job share.
struct JobRun<'a> {
    ctx: &'a JobContext,
    lease: &'a LeaseResponse,
    manifest: &'a Manifest,
    handle: LeaseHandle,
    /// When the worker got the lease (the job start time counts from it).
    leased_at: Instant,
    secrets: Vec<(String, Vec<u8>)>,
    log: LogSink,
    heartbeat: Heartbeat,
    limits: JobLimits,
    /// The job's scratch folder on the host.
    run_dir: PathBuf,
    /// The sources being fetched, until the sources step has them.
    fetch: Option<SourcesFetch>,
    /// The copy of the guest's console to the log, once the agent is ready.
    console: Option<JoinHandle<()>>,
    /// The job's proxy, once the guest is up, and what hands it the guest's connections.
    network: Option<JobNetwork>,
    proxy: Option<JoinHandle<()>>,
    /// The proxy of the host's fetch of the sources, while it runs, and its listener.
    source_network: Option<JobNetwork>,
    source_proxy: Option<JoinHandle<()>>,
    /// A failed job's guest kept for `vmfarm ssh`, held after the job's end is reported.
    kept: Option<KeptGuest>,
    /// The job's copies of its caches, in the manifest's order, once checked out.
    caches: Vec<CheckedOut>,
    /// Whether the guest ended on its own after a clean shutdown (its disks whole).
    shut_cleanly: bool,
}

impl JobRun<'_> {
    /// The job's steps, in order; the guest is torn down whatever step ends them.
    async fn steps(&mut self) -> Result<Outcome, Halt> {
        self.prepare().await?;
        let key = JobKey::generate()
            .context("making the job's SSH key")
            .map_err(Halt::Failed)?;
        let (mut vm, restored) = self.boot(&key).await?;
        let outcome = self.with_guest(vm.as_mut(), restored.as_ref(), &key).await;
        // A step that failed because the kernel killed the VMM says so first.
        let outcome = outcome.map_err(|halt| match (halt, vm.memory_exhausted()) {
            (Halt::Failed(e), Some(why)) => Halt::Failed(e.context(why)),
            (halt, _) => halt,
        });
        match &self.kept {
            Some(kept) => *kept.vm.lock().unwrap_or_else(|e| e.into_inner()) = Some(vm),
            None => self.kill(vm).await,
        }
        self.store_caches(&outcome).await;
        outcome
    }

    /// The steps that need the guest, with `vmfarm ssh` sessions served into it meanwhile;
    /// shuts it down after them if SSH was up, unless the job failed and its guest is kept.
    async fn with_guest(
        &mut self,
        vm: &mut dyn Vm,
        restored: Option<&Stamp>,
        key: &JobKey,
    ) -> Result<Outcome, Halt> {
        let guest = Arc::new(self.settle(vm, restored, key).await?);
        let sessions =
            SshSessions::serve(self.ctx.client.clone(), self.handle.clone(), guest.clone());
        let outcome = self.in_guest(&guest).await;
        let keep = self.keep_for(&outcome);
        if keep.is_zero() {
            self.shut_cleanly = self.shut_down(guest, sessions, vm).await;
        } else {
            self.log.farm(&format!(
                "the failed job's guest is kept for {} for `vmfarm ssh {}`, and while a session \
                 is open after that",
                vmfarm_proto::units::format_duration(keep),
                self.lease.job.id
            ));
            self.kept = Some(KeptGuest {
                guest,
                sessions,
                keep,
                vm: std::sync::Mutex::new(None),
                run_dir: self.run_dir.clone(),
            });
        }
        outcome
    }

    /// How long the guest stays after `outcome` for `vmfarm ssh`: the worker's
    /// `guest.keep_failed` (or less, as the manifest asks) after a failed task; else not at all.
    fn keep_for(&self, outcome: &Result<Outcome, Halt>) -> Duration {
        match outcome {
            Ok(Outcome {
                state: JobState::Failed,
                ..
            }) => {
                let most = self.ctx.config.guest.keep_failed.0;
                self.manifest
                    .keep_failed
                    .map_or(most, |asked| asked.min(most))
            }
            _ => Duration::ZERO,
        }
    }

    /// Sources, environment, secrets, tasks and artifacts, over SSH.
    async fn in_guest(&mut self, guest: &Guest) -> Result<Outcome, Halt> {
        self.make_build_dir(guest).await?;
        let proxy = self.network(guest).await?;
        self.sources(guest).await?;
        let mut env = self.environment();
        env.extend(proxy);
        self.send_secrets(guest, &mut env).await?;
        let mut end = self.packages(guest, &env).await?;
        let manifest = self.manifest;
        for task in &manifest.tasks {
            if end.is_some() {
                break;
            }
            end = self.task(guest, task, &env).await?;
        }
        match end {
            None => self.artifacts(guest, true).await,
            Some(end) => {
                // After a failure, the artifacts that ask for it (not after a timeout).
                if end.state == JobState::Failed {
                    self.artifacts(guest, false).await?;
                }
                Ok(end)
            }
        }
    }

    /// Reports `booting` with the image's version, makes the scratch folder, and starts
    /// fetching the sources on the host.
    async fn prepare(&mut self) -> Result<(), Halt> {
        self.report(StateUpdate {
            job_state: Some(JobState::Booting),
            image_version: Some(self.ctx.image.manifest.version.clone()),
            ..StateUpdate::default()
        })
        .await?;
        let made = async {
            create_private_dir(&self.run_dir)
                .await
                .context("creating the job's scratch folder")
        };
        self.limits.step("preparing the job", made).await?;
        let sources = self.manifest.sources.clone();
        if !sources.is_empty() {
            self.log.farm(&format!(
                "fetching {} on the host while the guest boots",
                plural(sources.len(), "source")
            ));
            let gate = self
                .sources_gate()
                .await
                .context("opening the sources' gate")
                .map_err(Halt::Failed)?;
            let dir = self.run_dir.clone();
            let allowed = self.ctx.config.allowed_local_sources.clone();
            self.fetch = Some(tokio::spawn(sources::fetch_all(
                sources, dir, allowed, gate,
            )));
        }
        self.check_out_caches().await
    }

    /// Boots the guest of the job's size, with the boot contract's command line.
    /// The guest, and the stamp of the template snapshot it was restored from, if it was.
    async fn boot(&self, key: &JobKey) -> Result<(Box<dyn Vm>, Option<Stamp>), Halt> {
        let JobRun { ctx, log, .. } = self;
        let image = &ctx.image.manifest;
        log.farm(&format!(
            "booting {} {} ({}) with the {} backend",
            image.name,
            image.version,
            image.system.pretty_name,
            ctx.backend.name()
        ));
        let (cpus, memory_mib) = job_size(self.manifest, &ctx.config);
        let hostname = self.hostname();
        let boot = match ctx.image.firmware() {
            None => Boot::Linux(LinuxBoot::with_agent(&ctx.image, ctx.backend.as_ref())),
            Some(firmware) => {
                let (user, public_key) = (ctx.image.user().to_owned(), key.public_openssh());
                let dir = self.run_dir.join("seed");
                let written = tokio::task::spawn_blocking(move || {
                    let seed = Seed {
                        hostname: &hostname,
                        user: &user,
                        public_key: &public_key,
                    };
                    seed.write(&dir)
                })
                .await;
                let seed = match written {
                    Ok(written) => written.context("making the guest's cloud-init seed"),
                    Err(e) => {
                        Err(anyhow::Error::new(e).context("making the guest's cloud-init seed"))
                    }
                }
                .map_err(Halt::Failed)?;
                Boot::Firmware { firmware, seed }
            }
        };
        let spec = BootSpec {
            boot,
            base_disk: ctx.image.base_disk(),
            vcpus: cpus,
            memory_mib: u32::try_from(memory_mib).unwrap_or(u32::MAX),
            run_dir: self.run_dir.join("vm"),
            caches: self.caches.iter().map(|c| c.overlay.clone()).collect(),
        };
        let started = Instant::now();
        let stamp = self.template_stamp(&spec);
        if stamp.is_some() && !spec.caches.is_empty() {
            log.farm(
                "booting cold: the job has cache disks, and a guest restored from the template \
                 snapshot has only the disks it was saved with",
            );
        }
        let restored = match stamp.filter(|_| spec.caches.is_empty()) {
            // Under the job's limits: a cancel or the deadline stops a restore too.
            Some(stamp) => {
                let restore = async { Ok(self.restore(&spec, stamp).await) };
                self.limits.step("restoring the guest", restore).await?
            }
            None => None,
        };
        let (vm, restored) = match restored {
            Some((vm, stamp)) => {
                log.farm(&format!(
                    "restored the guest from its image's template snapshot in {:.2}s",
                    started.elapsed().as_secs_f64()
                ));
                (vm, Some(stamp))
            }
            None => {
                let boot = async { Ok::<_, anyhow::Error>(ctx.backend.boot(&spec).await?) };
                (self.limits.step("booting the guest", boot).await?, None)
            }
        };
        let vm = Box::new(CountedVm {
            vm,
            _running: ctx.metrics.guest_running(),
        });
        Ok((vm, restored))
    }

    /// The guest's host name: `job-<id>`.
    fn hostname(&self) -> String {
        format!("job-{}", self.lease.job.id)
    }

    /// What a template snapshot for `spec`'s guest must have been made from, when the job may
    /// start from one: a kernel boot with the agent, on a backend that takes snapshots, of an
    /// image `[warm_start]` does not keep cold.
    fn template_stamp(&self, spec: &BootSpec) -> Option<Stamp> {
        let ctx = self.ctx;
        let Boot::Linux(linux) = &spec.boot else {
            return None;
        };
        let image = &ctx.image.manifest;
        if !ctx.config.warm_start.warm(&image.name) {
            return None;
        }
        Some(Stamp {
            image: image.name.clone(),
            image_version: image.version.clone(),
            initrd_sha256: image.files.get(INITRD)?.sha256.clone(),
            vmm: ctx.backend.snapshot_version()?,
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
            cmdline: linux.cmdline.clone(),
        })
    }

    /// The guest restored from the template snapshot stamped `stamp`; `None`, said in the log,
    /// when there is none to restore (one is then made in the background) or the restore failed.
    async fn restore(&self, spec: &BootSpec, stamp: Stamp) -> Option<(Box<dyn Vm>, Stamp)> {
        let ctx = self.ctx;
        let why = match ctx.templates.find(&stamp).await {
            Ok(found) => match ctx
                .backend
                .restore(spec, &found.snapshot, &found.memory)
                .await
            {
                Ok(vm) => return Some((vm, stamp)),
                Err(e) => format!(
                    "restoring the template snapshot failed: {:#}",
                    anyhow::Error::from(e)
                ),
            },
            Err(why) => why,
        };
        let _ = std::fs::remove_dir_all(&spec.run_dir);
        let making = ctx.templates.make(
            ctx.backend.clone(),
            spec.clone(),
            stamp,
            ctx.config.guest.boot_timeout.0,
        );
        self.log.farm(&format!("{why}; booting cold ({making})"));
        None
    }

    /// Waits for the agent's ready line (cloud-init's host keys), opens SSH pinned to the host
    /// key it announced, and reports `running`.
    async fn settle(
        &mut self,
        vm: &mut dyn Vm,
        restored: Option<&Stamp>,
        key: &JobKey,
    ) -> Result<Guest, Halt> {
        let access = GuestAccess::of(&self.ctx.image, &self.ctx.config.guest);
        let fingerprint = self.wait_for_agent(vm, restored, key, &access).await?;
        let options = SshOptions {
            user: access.user.clone(),
            ..SshOptions::default()
        };
        let ssh = async {
            let stream = vm
                .connect()
                .await
                .context("connecting to the guest's SSH server")?;
            Ok::<_, anyhow::Error>(Guest::ssh(stream, key, &fingerprint, &options).await?)
        };
        let guest = self.limits.step("opening SSH to the guest", ssh).await?;
        if access.check_environment {
            let checked = check_environment(&guest);
            self.limits
                .step("checking that the job's variables reach the guest", checked)
                .await?;
        }
        self.report(StateUpdate {
            job_state: Some(JobState::Running),
            ..StateUpdate::default()
        })
        .await?;
        self.ctx
            .metrics
            .job_started(&self.lease.job.image, self.leased_at.elapsed());
        Ok(guest)
    }

    /// Copies the console to the log until the guest says it is ready (the agent's line, after
    /// it took the job's identity, or cloud-init's host keys), and on in the background.
    async fn wait_for_agent(
        &mut self,
        vm: &mut dyn Vm,
        restored: Option<&Stamp>,
        key: &JobKey,
        access: &GuestAccess,
    ) -> Result<HostFingerprint, Halt> {
        let start = match restored {
            Some(_) => Start::Restored,
            None => Start::Cold,
        };
        let mut console = vm
            .take_console()
            .context("the guest's console")
            .map_err(Halt::Failed)?;
        let console_log = self.log.clone();
        let mut sink = move |data: &[u8]| console_log.write_now(LogStream::Console, None, data);
        let booted = Instant::now();
        let (announcer, boot_timeout) = (access.announcer.clone(), access.boot_timeout);
        let hostname = self.hostname();
        let mounts = caches::mounts(self.manifest);
        let ready = async {
            Ok::<_, anyhow::Error>(match announcer {
                Announcer::Agent => {
                    let identity =
                        identity(key, &hostname, mounts).context("making the job's identity")?;
                    introduce(vm, &mut console, &mut sink, boot_timeout, &identity, start).await?
                }
                Announcer::CloudInit { .. } => {
                    wait_ready(&mut console, &mut sink, boot_timeout, announcer).await?
                }
            })
        };
        let fingerprint = self.limits.step(access.waiting_for, ready).await;
        if let (Err(_), Some(stamp)) = (&fingerprint, restored) {
            self.ctx.templates.forget(stamp);
            self.log.farm(
                "the guest restored from the template snapshot did not come up: the snapshot is \
                 dropped, and the next jobs boot cold and have a new one made",
            );
        }
        let fingerprint = fingerprint?;
        let took = booted.elapsed();
        self.ctx.metrics.guest_ready(&self.lease.job.image, took);
        self.log.farm(&format!(
            "guest ready in {:.1}s (host key {fingerprint})",
            took.as_secs_f64()
        ));
        let console_log = self.log.clone();
        self.console = Some(tokio::spawn(async move {
            let mut buf = vec![0u8; 8192];
            while let Ok(n) = console.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                console_log.write(LogStream::Console, None, &buf[..n]).await;
            }
        }));
        Ok(fingerprint)
    }

    async fn make_build_dir(&self, guest: &Guest) -> Result<(), Halt> {
        let setup =
            format!("mkdir -p {BUILD_DIR} {FARM_DIR}/tasks && mkdir -p -m 0700 {SECRETS_DIR}");
        let made = run_checked(guest, &setup);
        self.limits
            .step("preparing the build directory", made)
            .await
    }

    /// Waits for the host's fetch, then uploads each source and unpacks it at its path.
    async fn sources(&mut self, guest: &Guest) -> Result<(), Halt> {
        let fetched = self
            .limits
            .step("fetching the sources", finish_fetch(&mut self.fetch))
            .await;
        self.close_sources_gate();
        let fetched = fetched?;
        for (i, source) in fetched.iter().enumerate() {
            self.log
                .farm(&format!("uploading source to {}", source.path));
            let remote = format!("{FARM_DIR}/source-{i}.tar");
            let upload =
                async { Ok::<_, anyhow::Error>(guest.upload(&source.tar, &remote).await?) };
            self.limits.step("uploading the sources", upload).await?;
            let unpack = unpack_command(&remote, &source.path);
            let unpacked = run_checked(guest, &unpack);
            self.limits.step("unpacking the sources", unpacked).await?;
        }
        Ok(())
    }

    /// The tasks' variables (the secrets add theirs); sent with each task's command.
    fn environment(&self) -> Vec<(String, String)> {
        let env = environment(self.manifest, self.lease);
        let names: Vec<&str> = env.iter().map(|(name, _)| name.as_str()).collect();
        self.log.farm(&format!("environment: {}", names.join(" ")));
        env
    }

    /// Uploads each secret to its file; those with a variable's name go into `env` too.
    async fn send_secrets(
        &self,
        guest: &Guest,
        env: &mut Vec<(String, String)>,
    ) -> Result<(), Halt> {
        if self.secrets.is_empty() {
            return Ok(());
        }
        let names: Vec<&str> = self.secrets.iter().map(|(name, _)| name.as_str()).collect();
        self.log
            .farm(&format!("sending secrets: {}", names.join(" ")));
        for (name, value) in &self.secrets {
            let send = self.send_secret(guest, name, value);
            self.limits.step("sending the secrets", send).await?;
            env.extend(secret_variable(name, value));
        }
        Ok(())
    }

    async fn send_secret(&self, guest: &Guest, name: &str, value: &[u8]) -> anyhow::Result<()> {
        let local = self.run_dir.join(format!("secret-{name}"));
        write_private(&local, value)
            .await
            .context("staging a secret")?;
        let remote = format!("{SECRETS_DIR}/{name}");
        let sent = guest.upload(&local, &remote).await;
        let _ = tokio::fs::remove_file(&local).await;
        sent?;
        run_checked(guest, &format!("chmod 0600 {}", quote(&remote))).await
    }
}

/// How the worker waits for a guest of an image and reaches it: the agent's way, or, for an
/// image that boots by firmware, cloud-init's host keys and the guest's own OpenSSH.
struct GuestAccess {
    announcer: Announcer,
    boot_timeout: Duration,
    /// The step's name while the worker waits.
    waiting_for: &'static str,
    user: String,
    /// Whether to check that SSH `env` requests reach the tasks (the agent takes them all; an
    /// OpenSSH server takes those its `AcceptEnv` names, which the seed sets).
    check_environment: bool,
}

impl GuestAccess {
    fn of(image: &InstalledImage, guest: &crate::config::GuestDefaults) -> GuestAccess {
        match image.firmware() {
            None => GuestAccess {
                announcer: Announcer::Agent,
                boot_timeout: guest.boot_timeout.0,
                waiting_for: "waiting for the guest agent",
                user: SshOptions::default().user,
                check_environment: false,
            },
            Some(_) => GuestAccess {
                announcer: Announcer::cloud_init(),
                boot_timeout: guest.firmware_boot_timeout.0,
                waiting_for: "waiting for cloud-init to print the guest's host keys",
                user: image.user().to_owned(),
                check_environment: true,
            },
        }
    }
}

/// Fails unless a variable sent as an SSH `env` request reaches a command in the guest: an
/// OpenSSH whose config does not read `sshd_config.d` would otherwise drop every variable of
/// the job without a word.
async fn check_environment(guest: &Guest) -> anyhow::Result<()> {
    // What the guest sends is kept up to 64 bytes in all, however much it sends.
    let mut seen = Vec::new();
    let mut sink = |_: crate::guest::OutputStream, data: &[u8]| {
        let room = 64usize.saturating_sub(seen.len());
        seen.extend_from_slice(&data[..data.len().min(room)]);
    };
    let env = [("VMFARM_ENV_CHECK".to_owned(), "passes".to_owned())];
    let limits = ExecLimits::timeout(Duration::from_secs(60));
    guest
        .exec("printf %s \"$VMFARM_ENV_CHECK\"", &env, &mut sink, limits)
        .await?;
    anyhow::ensure!(
        seen == b"passes",
        "the guest's SSH server drops the job's variables: its sshd_config must read \
         /etc/ssh/sshd_config.d/*.conf (an `Include`), where the cloud-init seed puts `AcceptEnv *`"
    );
    Ok(())
}

/// Waits for the host's fetch to end (none: no sources); the fetch stays with the job until
/// it has ended, so that a step interrupted here still leaves it to teardown to stop.
async fn finish_fetch(fetch: &mut Option<SourcesFetch>) -> anyhow::Result<Vec<FetchedSource>> {
    let Some(running) = fetch.as_mut() else {
        return Ok(Vec::new());
    };
    let ended = running.await;
    *fetch = None;
    Ok(ended.context("the fetch stopped")??)
}

/// Runs a short command of the worker's own in the guest; a non-zero status is an error.
async fn run_checked(guest: &Guest, command: &str) -> anyhow::Result<()> {
    let out = guest
        .exec_collect(command, ExecLimits::timeout(Duration::from_secs(60)))
        .await?;
    if out.exit_status != 0 {
        anyhow::bail!(
            "`{command}` exited with status {}: {}",
            out.exit_status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn plural(n: usize, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

async fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    let dir: PathBuf = dir.to_owned();
    tokio::task::spawn_blocking(move || {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
    })
    .await
    .map_err(std::io::Error::other)?
}

async fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_secret_variables() {
        let cases = [
            ("token", Some("TOKEN")),
            ("deploy_key", Some("DEPLOY_KEY")),
            ("db-password", None),
            ("1st", None),
        ];
        for (name, want) in cases {
            let got = secret_variable(name, b"v");
            assert_eq!(got.as_ref().map(|(var, _)| var.as_str()), want, "{name}");
        }
    }
}
