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

use super::guest_paths::{BUILD_DIR, FARM_DIR, SECRETS_DIR, quote, task_command, unpack_command};
use super::heartbeat::{Heartbeat, Stop};
use super::log_shipper::{self, LogSink};
use super::server_client::{LeaseHandle, ServerClient, ServerError};
use super::sources::{self, FetchedSource, SourceError};
use crate::backend::{Backend, BootSpec, GuestCmdline, Vm};
use crate::config::WorkerConfig;
use crate::guest::{
    ExecLimits, Guest, HostFingerprint, JobKey, Output, OutputStream, SshError, SshOptions,
    wait_ready,
};
use crate::images::manifest::InstalledImage;
use anyhow::Context;
use base64::Engine;
use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use vmfarm_proto::manifest::Task;
use vmfarm_proto::units::format_duration;
use vmfarm_proto::wire::{LeaseResponse, LogStream, StateUpdate, TaskUpdate};
use vmfarm_proto::{JobState, Manifest, TaskState};

/// What a job needs from its worker.
pub struct JobContext {
    pub client: ServerClient,
    pub config: Arc<WorkerConfig>,
    pub backend: Arc<dyn Backend>,
    pub image: InstalledImage,
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

/// How a job ended, as reported to the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub state: JobState,
    pub reason: Option<String>,
}

impl Outcome {
    fn new(state: JobState, reason: impl Into<String>) -> Self {
        Outcome {
            state,
            reason: Some(reason.into()),
        }
    }

    fn succeeded() -> Self {
        Outcome {
            state: JobState::Succeeded,
            reason: None,
        }
    }
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

/// When a job must be over: its timeout (the lease's `timeout_ms`: the manifest's `timeout`,
/// else the server's `default_job_timeout`) counted from when the worker got the lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadline {
    pub at: Instant,
    pub timeout: Duration,
}

impl Deadline {
    pub fn new(leased_at: Instant, timeout_ms: u64) -> Deadline {
        let timeout = Duration::from_millis(timeout_ms);
        // A timeout beyond what the clock can count is as good as none: a century will do.
        let at = leased_at
            .checked_add(timeout)
            .or_else(|| leased_at.checked_add(Duration::from_secs(100 * 365 * 86_400)))
            .unwrap_or(leased_at);
        Deadline { at, timeout }
    }
}

/// Why a job's steps stopped short of an outcome.
#[derive(Debug)]
enum Halt {
    /// The job's deadline passed during this step.
    TimedOut(String),
    /// A cancel (or a lost lease) came during this step.
    Stopped(String),
    /// A step failed; the error starts with the step's name.
    Failed(anyhow::Error),
}

/// What every step runs under: the job's deadline and its stop flag (set by the heartbeat).
#[derive(Clone)]
struct JobLimits {
    deadline: Deadline,
    stopping: watch::Receiver<bool>,
}

impl JobLimits {
    /// Runs `work` until it ends, the deadline passes or the job is stopped; `work` is dropped
    /// (and with it whatever it was doing) in the last two cases.
    async fn bounded<T>(&self, step: &str, work: impl Future<Output = T>) -> Result<T, Halt> {
        let mut stopping = self.stopping.clone();
        tokio::select! {
            biased;
            done = work => Ok(done),
            () = stop_requested(&mut stopping) => Err(Halt::Stopped(step.to_owned())),
            () = tokio::time::sleep_until(self.deadline.at) => Err(Halt::TimedOut(step.to_owned())),
        }
    }

    /// [`Self::bounded`], and a failure of `work` is named after `step`.
    async fn step<T>(
        &self,
        step: &str,
        work: impl Future<Output = anyhow::Result<T>>,
    ) -> Result<T, Halt> {
        self.bounded(step, work)
            .await?
            .map_err(|e| Halt::Failed(e.context(step.to_owned())))
    }

    /// The limits of a task's command in the guest: the nearer of its own timeout and the
    /// job's deadline, and the job's stop flag.
    fn for_task(&self, task: &Task) -> (TaskLimit, ExecLimits) {
        let limit = TaskLimit::new(task.timeout, &self.deadline, Instant::now());
        let exec = ExecLimits {
            timeout: Some(limit.duration()),
            cancel: Some(self.stopping.clone()),
        };
        (limit, exec)
    }
}

/// Resolves once the job must stop; never, if its heartbeat is gone.
async fn stop_requested(flag: &mut watch::Receiver<bool>) {
    if flag.wait_for(|s| *s).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// How long a task may run, and whose limit that is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TaskLimit {
    /// Its own `timeout`, which ends before the job's deadline.
    Own(Duration),
    /// What is left of the job's time; `timeout` is the job's whole timeout.
    Job { left: Duration, timeout: Duration },
}

impl TaskLimit {
    fn new(own: Option<Duration>, deadline: &Deadline, now: Instant) -> TaskLimit {
        let left = deadline.at.saturating_duration_since(now);
        match own {
            Some(own) if own < left => TaskLimit::Own(own),
            _ => TaskLimit::Job {
                left,
                timeout: deadline.timeout,
            },
        }
    }

    fn duration(self) -> Duration {
        match self {
            TaskLimit::Own(limit) | TaskLimit::Job { left: limit, .. } => limit,
        }
    }

    fn describe(self) -> String {
        match self {
            TaskLimit::Own(limit) => format!("its timeout of {}", format_duration(limit)),
            TaskLimit::Job { timeout, .. } => {
                format!("the job's timeout of {}", format_duration(timeout))
            }
        }
    }
}

/// How a task ended: what the server is told of it, and the job's end if the task ends it.
#[derive(Debug, PartialEq, Eq)]
struct TaskEnd {
    state: TaskState,
    exit_code: Option<i32>,
    job: Option<Outcome>,
}

/// A task's end from how its command ended; an error of the guest's is the job's error.
fn task_end(name: &str, ran: Result<u32, SshError>, limit: TaskLimit) -> anyhow::Result<TaskEnd> {
    let (state, exit_code, job) = match ran {
        Ok(0) => (TaskState::Succeeded, Some(0), None),
        Ok(code) => (
            TaskState::Failed,
            i32::try_from(code).ok(),
            Some(Outcome::new(
                JobState::Failed,
                format!("task {name} exited with status {code}"),
            )),
        ),
        Err(SshError::Timeout { .. }) => (
            TaskState::TimedOut,
            None,
            Some(Outcome::new(
                JobState::TimedOut,
                format!("task {name} ran past {}", limit.describe()),
            )),
        ),
        Err(SshError::Cancelled) => (
            TaskState::Cancelled,
            None,
            Some(Outcome::new(JobState::Cancelled, "cancelled by a user")),
        ),
        Err(e) => return Err(e).with_context(|| format!("running task {name}")),
    };
    Ok(TaskEnd {
        state,
        exit_code,
        job,
    })
}

/// How the job ended, from what its steps came to and why the heartbeat stopped it (if it
/// did); `None` when the lease was lost, when nothing more may be written.
fn ending(steps: Result<Outcome, Halt>, stop: Option<Stop>, timeout: Duration) -> Option<Outcome> {
    Some(match (steps, stop) {
        (_, Some(Stop::LeaseLost)) => return None,
        (Ok(outcome), _) => outcome,
        (Err(Halt::TimedOut(step)), _) => Outcome::new(
            JobState::TimedOut,
            format!(
                "the job ran past its timeout of {} while {step}",
                format_duration(timeout)
            ),
        ),
        (Err(Halt::Stopped(step)), _) => Outcome::new(
            JobState::Cancelled,
            format!("cancelled by a user while {step}"),
        ),
        (Err(Halt::Failed(e)), Some(Stop::Cancelled)) => {
            Outcome::new(JobState::Cancelled, format!("cancelled by a user ({e:#})"))
        }
        (Err(Halt::Failed(e)), None) => Outcome::new(JobState::Error, format!("{e:#}")),
    })
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
    drop(job);
    report_end(ctx, &handle, &lease.job.id, shipper, outcome).await
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

/// A task's output, into the job's log (waiting for room there: see [`LogSink::write`]).
struct TaskOutput<'a> {
    log: &'a LogSink,
    task: &'a str,
}

impl Output for TaskOutput<'_> {
    fn put(&mut self, _: OutputStream, data: &[u8]) -> impl Future<Output = ()> + Send {
        self.log.write(LogStream::Task, Some(self.task), data)
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
}

impl JobRun<'_> {
    /// The job's steps, in order; the guest is torn down whatever step ends them.
    async fn steps(&mut self) -> Result<Outcome, Halt> {
        self.prepare().await?;
        let key = JobKey::generate()
            .context("making the job's SSH key")
            .map_err(Halt::Failed)?;
        let mut vm = self.boot(&key).await?;
        let outcome = self.with_guest(vm.as_mut(), &key).await;
        self.kill(vm).await;
        outcome
    }

    /// The steps that need the guest; shuts it down after them if SSH was up.
    async fn with_guest(&mut self, vm: &mut dyn Vm, key: &JobKey) -> Result<Outcome, Halt> {
        let guest = self.settle(vm, key).await?;
        let outcome = self.in_guest(&guest).await;
        self.shut_down(guest, vm).await;
        outcome
    }

    /// Sources, environment, secrets, tasks and artifacts, over SSH.
    async fn in_guest(&mut self, guest: &Guest) -> Result<Outcome, Halt> {
        self.make_build_dir(guest).await?;
        self.sources(guest).await?;
        let mut env = self.environment();
        self.send_secrets(guest, &mut env).await?;
        let manifest = self.manifest;
        for task in &manifest.tasks {
            if let Some(end) = self.task(guest, task, &env).await? {
                return Ok(end);
            }
        }
        self.artifacts(guest).await
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
            let dir = self.run_dir.clone();
            let allowed = self.ctx.config.allowed_local_sources.clone();
            self.fetch = Some(tokio::spawn(sources::fetch_all(sources, dir, allowed)));
        }
        Ok(())
    }

    /// Boots the guest of the job's size, with the boot contract's command line.
    async fn boot(&self, key: &JobKey) -> Result<Box<dyn Vm>, Halt> {
        let JobRun {
            ctx, lease, log, ..
        } = self;
        let image = &ctx.image.manifest;
        log.farm(&format!(
            "booting {} {} ({}) with the {} backend",
            image.name,
            image.version,
            image.system.pretty_name,
            ctx.backend.name()
        ));
        let (cpus, memory_mib) = job_size(self.manifest, &ctx.config);
        let cmdline = GuestCmdline {
            channel: ctx.backend.channel(),
            key_blob: key.public_blob_base64(),
            hostname: format!("job-{}", lease.job.id),
            time: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            user: "build".into(),
            emulated: ctx.backend.emulated(),
        };
        let spec = BootSpec {
            kernel: ctx.image.kernel(),
            initrd: Some(ctx.image.initrd()),
            base_disk: ctx.image.rootfs(),
            vcpus: cpus,
            memory_mib: u32::try_from(memory_mib).unwrap_or(u32::MAX),
            cmdline: cmdline.compose(),
            run_dir: self.run_dir.join("vm"),
        };
        let boot = async { Ok::<_, anyhow::Error>(ctx.backend.boot(&spec).await?) };
        self.limits.step("booting the guest", boot).await
    }

    /// Waits for the agent's ready line, opens SSH pinned to the host key it announced, and
    /// reports `running`.
    async fn settle(&mut self, vm: &mut dyn Vm, key: &JobKey) -> Result<Guest, Halt> {
        let fingerprint = self.wait_for_agent(vm).await?;
        let ssh = async {
            let stream = vm
                .connect()
                .await
                .context("connecting to the guest agent")?;
            Ok::<_, anyhow::Error>(
                Guest::ssh(stream, key, &fingerprint, &SshOptions::default()).await?,
            )
        };
        let guest = self.limits.step("opening SSH to the guest", ssh).await?;
        self.report(StateUpdate {
            job_state: Some(JobState::Running),
            ..StateUpdate::default()
        })
        .await?;
        Ok(guest)
    }

    /// Copies the console to the log until the agent's ready line, and on in the background.
    async fn wait_for_agent(&mut self, vm: &mut dyn Vm) -> Result<HostFingerprint, Halt> {
        let mut console = vm
            .take_console()
            .context("the guest's console")
            .map_err(Halt::Failed)?;
        let console_log = self.log.clone();
        let mut sink = move |data: &[u8]| console_log.write_now(LogStream::Console, None, data);
        let boot_timeout = self.ctx.config.guest.boot_timeout.0;
        let booted = Instant::now();
        let ready = async {
            Ok::<_, anyhow::Error>(wait_ready(&mut console, &mut sink, boot_timeout).await?)
        };
        let fingerprint = self
            .limits
            .step("waiting for the guest agent", ready)
            .await?;
        self.log.farm(&format!(
            "guest ready in {:.1}s (host key {fingerprint})",
            booted.elapsed().as_secs_f64()
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
            .await?;
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

    /// Runs one task and reports how it ended; `Some` when the job ends with it.
    async fn task(
        &self,
        guest: &Guest,
        task: &Task,
        env: &[(String, String)],
    ) -> Result<Option<Outcome>, Halt> {
        let upload = self.upload_script(guest, task);
        let step = format!("uploading the script of task {}", task.name);
        let script = self.limits.step(&step, upload).await?;
        self.report_task(&task.name, TaskState::Running, None)
            .await?;
        self.log.farm(&format!("task {}", task.name));
        let (limit, exec_limits) = self.limits.for_task(task);
        let mut output = TaskOutput {
            log: &self.log,
            task: &task.name,
        };
        let ran = guest
            .exec(&task_command(&script), env, &mut output, exec_limits)
            .await;
        let end = task_end(&task.name, ran, limit).map_err(Halt::Failed)?;
        if let Some(code) = end.exit_code.filter(|c| *c != 0) {
            self.log
                .farm(&format!("task {} exited with status {code}", task.name));
        }
        if self.heartbeat.stopped() == Some(Stop::LeaseLost) {
            return Err(Halt::Failed(anyhow::anyhow!("the lease was lost")));
        }
        self.report_task(&task.name, end.state, end.exit_code)
            .await?;
        Ok(end.job)
    }

    /// Stages a task's script and uploads it; returns its path in the guest.
    async fn upload_script(&self, guest: &Guest, task: &Task) -> anyhow::Result<String> {
        let local = self.run_dir.join(format!("task-{}.sh", task.name));
        write_private(&local, task.script.as_bytes())
            .await
            .context("staging a task script")?;
        let remote = format!("{FARM_DIR}/tasks/{}.sh", task.name);
        guest.upload(&local, &remote).await?;
        Ok(remote)
    }

    async fn report_task(
        &self,
        name: &str,
        state: TaskState,
        exit_code: Option<i32>,
    ) -> Result<(), Halt> {
        self.report(StateUpdate {
            task: Some(TaskUpdate {
                name: name.to_owned(),
                state,
                exit_code,
            }),
            ..StateUpdate::default()
        })
        .await
    }

    /// Tells the server of a state; not bounded by the job's limits, which would leave the
    /// server with a state the job has passed (the client's retries are bounded).
    async fn report(&self, update: StateUpdate) -> Result<(), Halt> {
        self.ctx
            .client
            .state(&self.handle, &update)
            .await
            .context("reporting to the server")
            .map_err(Halt::Failed)
    }

    /// Collects each declared artifact; one that cannot be collected fails the job.
    async fn artifacts(&self, guest: &Guest) -> Result<Outcome, Halt> {
        let limits = &self.lease.limits;
        let mut room = limits.max_artifacts_total_bytes;
        for artifact in &self.manifest.artifacts {
            let path = &artifact.path;
            let step = format!("collecting artifact {path}");
            let max_bytes = limits.max_artifact_bytes.min(room);
            let collected = self.collect_artifact(guest, path, max_bytes);
            match self.limits.bounded(&step, collected).await? {
                Ok(size) => room -= size,
                Err(e) => {
                    self.log.farm(&format!("artifact {path}: {e:#}"));
                    return Ok(Outcome::new(
                        JobState::Failed,
                        format!("artifact {path} could not be collected: {e:#}"),
                    ));
                }
            }
        }
        Ok(Outcome::succeeded())
    }

    /// Downloads one artifact of at most `max_bytes` from the guest and uploads it to the
    /// server; its size.
    async fn collect_artifact(
        &self,
        guest: &Guest,
        path: &str,
        max_bytes: u64,
    ) -> anyhow::Result<u64> {
        vmfarm_proto::names::check_artifact_path(path).map_err(|e| anyhow::anyhow!("{e}"))?;
        let local = self.run_dir.join("artifact");
        let remote = format!("{BUILD_DIR}/{path}");
        let got = guest
            .download(&remote, &local, max_bytes)
            .await
            .context("downloading it from the guest");
        let uploaded = match got {
            Ok(got) => self
                .ctx
                .client
                .upload_artifact(&self.handle, path, &local, &got.sha256)
                .await
                .context("uploading it to the server")
                .map(|()| got),
            Err(e) => Err(e),
        };
        let _ = tokio::fs::remove_file(&local).await;
        let got = uploaded?;
        self.log.farm(&format!(
            "artifact {path}: {} bytes, sha256 {}",
            got.size, got.sha256
        ));
        Ok(got.size)
    }

    /// Teardown, 1: asks the agent to shut the guest down, and gives the guest 10 s to end
    /// (CONTRACTS.md).
    async fn shut_down(&self, guest: Guest, vm: &mut dyn Vm) {
        if let Err(e) = guest.shutdown().await {
            self.log
                .farm(&format!("the guest did not shut down cleanly: {e}"));
        }
        match tokio::time::timeout(Duration::from_secs(10), vm.wait()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => self.log.farm(&format!("waiting for the guest: {e}")),
            Err(_) => self
                .log
                .farm("the guest did not end within 10 s of shutdown; killing it"),
        }
    }

    /// Teardown, 2: ends the guest's VMM if it is still running (a step that failed never
    /// asked it to shut down); its own files go with it.
    async fn kill(&self, mut vm: Box<dyn Vm>) {
        if let Err(e) = vm.kill().await {
            self.log.farm(&format!("stopping the guest: {e}"));
            tracing::error!(error = %e, "killing a guest failed");
        }
    }

    /// Teardown, 3: stops what the job still runs on the host (the console's copy, a fetch
    /// whose tools are then killed) and removes the scratch folder.
    async fn clean_up(&mut self) {
        if let Some(console) = self.console.take() {
            console.abort();
        }
        if let Some(fetch) = self.fetch.take() {
            fetch.abort();
            // The runtime drops an aborted task (and so kills its tools) soon after: wait for
            // that, so that nothing writes into the scratch folder while it is removed.
            let _ = fetch.await;
        }
        remove_run_dir(&self.run_dir).await;
    }
}

impl Drop for JobRun<'_> {
    /// Nothing of the job's outlives it, even if it never got to its teardown.
    fn drop(&mut self) {
        if let Some(console) = self.console.take() {
            console.abort();
        }
        if let Some(fetch) = self.fetch.take() {
            fetch.abort();
        }
    }
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

/// Removes the job's scratch folder; tried twice, as a tool killed a moment ago may still have
/// been writing there.
async fn remove_run_dir(dir: &Path) {
    for pause in [Some(Duration::from_millis(200)), None] {
        match tokio::fs::remove_dir_all(dir).await {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) => match pause {
                Some(pause) => tokio::time::sleep(pause).await,
                None => {
                    tracing::warn!(dir = %dir.display(), error = %e, "cannot remove a job's scratch folder")
                }
            },
        }
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

    fn limits(timeout: Duration) -> (JobLimits, watch::Sender<bool>) {
        let (stop, stopping) = watch::channel(false);
        let deadline = Deadline::new(Instant::now(), u64::try_from(timeout.as_millis()).unwrap());
        (JobLimits { deadline, stopping }, stop)
    }

    #[tokio::test(start_paused = true)]
    async fn test_deadline_counts_the_leases_timeout_from_the_lease() {
        let leased_at = Instant::now();
        let deadline = Deadline::new(leased_at, 1_500);
        assert_eq!(deadline.at, leased_at + Duration::from_millis(1_500));
        assert_eq!(deadline.timeout, Duration::from_millis(1_500));
        // A timeout the clock cannot count does not panic; it is as good as none.
        let far = Deadline::new(leased_at, u64::MAX);
        assert!(far.at > leased_at + Duration::from_secs(50 * 365 * 86_400));
    }

    #[tokio::test(start_paused = true)]
    async fn test_task_limit_is_the_nearer_of_its_own_and_the_jobs() {
        let now = Instant::now();
        let deadline = Deadline::new(now - Duration::from_secs(40), 60_000);
        let left = Duration::from_secs(20);
        let job = TaskLimit::Job {
            left,
            timeout: Duration::from_secs(60),
        };
        let cases = [
            (
                Some(Duration::from_secs(5)),
                TaskLimit::Own(Duration::from_secs(5)),
            ),
            (Some(Duration::from_secs(30)), job),
            (Some(left), job),
            (None, job),
        ];
        for (own, want) in cases {
            assert_eq!(TaskLimit::new(own, &deadline, now), want, "{own:?}");
        }
        assert_eq!(job.duration(), left);
        assert_eq!(job.describe(), "the job's timeout of 1m");
        assert_eq!(
            TaskLimit::Own(Duration::from_secs(3)).describe(),
            "its timeout of 3s"
        );
        // Past the deadline, a task gets no time at all.
        let late = TaskLimit::new(None, &deadline, now + Duration::from_secs(30));
        assert_eq!(late.duration(), Duration::ZERO);
    }

    #[test]
    fn test_task_end_for_each_way_a_task_ends() {
        let own = TaskLimit::Own(Duration::from_secs(3));
        let job = TaskLimit::Job {
            left: Duration::from_secs(1),
            timeout: Duration::from_secs(120),
        };
        let timeout = || SshError::Timeout {
            what: "command".into(),
            limit: Duration::from_secs(3),
        };
        let ended = |state, reason: &str| Some(Outcome::new(state, reason));
        let cases = [
            (Ok(0), own, TaskState::Succeeded, Some(0), None),
            (
                Ok(3),
                own,
                TaskState::Failed,
                Some(3),
                ended(JobState::Failed, "task build exited with status 3"),
            ),
            (
                Err(timeout()),
                own,
                TaskState::TimedOut,
                None,
                ended(JobState::TimedOut, "task build ran past its timeout of 3s"),
            ),
            (
                Err(timeout()),
                job,
                TaskState::TimedOut,
                None,
                ended(
                    JobState::TimedOut,
                    "task build ran past the job's timeout of 2m",
                ),
            ),
            (
                Err(SshError::Cancelled),
                job,
                TaskState::Cancelled,
                None,
                ended(JobState::Cancelled, "cancelled by a user"),
            ),
        ];
        for (ran, limit, state, exit_code, job) in cases {
            let want = TaskEnd {
                state,
                exit_code,
                job,
            };
            assert_eq!(task_end("build", ran, limit).unwrap(), want);
        }
        let err = task_end("build", Err(SshError::NoExitStatus), own).unwrap_err();
        assert!(
            format!("{err:#}").starts_with("running task build: "),
            "{err:#}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn test_a_step_past_the_deadline_ends_the_job_timed_out_saying_what_it_did() {
        let (limits, _stop) = limits(Duration::from_secs(2));
        let quick = limits.step("preparing the job", async { Ok(7) }).await;
        assert_eq!(quick.unwrap(), 7);
        let slow = async {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok(())
        };
        let halt = limits.step("fetching the sources", slow).await.unwrap_err();
        assert!(matches!(&halt, Halt::TimedOut(step) if step == "fetching the sources"));
        assert_eq!(
            ending(Err(halt), None, limits.deadline.timeout),
            Some(Outcome::new(
                JobState::TimedOut,
                "the job ran past its timeout of 2s while fetching the sources"
            ))
        );
        // A step that starts after the deadline does not run to its end either.
        let halt = limits
            .step(
                "collecting artifact out/app",
                std::future::pending::<anyhow::Result<()>>(),
            )
            .await
            .unwrap_err();
        assert!(matches!(halt, Halt::TimedOut(_)));
    }

    #[tokio::test(start_paused = true)]
    async fn test_a_cancel_stops_a_step_and_ends_the_job_cancelled() {
        let (limits, stop) = limits(Duration::from_secs(3600));
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let _ = stop.send(true);
        });
        let started = Instant::now();
        let halt = limits
            .step(
                "uploading the sources",
                std::future::pending::<anyhow::Result<()>>(),
            )
            .await
            .unwrap_err();
        assert_eq!(started.elapsed(), Duration::from_secs(1));
        assert_eq!(
            ending(Err(halt), Some(Stop::Cancelled), limits.deadline.timeout),
            Some(Outcome::new(
                JobState::Cancelled,
                "cancelled by a user while uploading the sources"
            ))
        );
    }

    #[tokio::test]
    async fn test_a_failed_step_names_itself_and_ends_the_job_in_error() {
        let (limits, _stop) = limits(Duration::from_secs(3600));
        let failing = async { anyhow::bail!("the guest closed the channel") };
        let halt = limits
            .step::<()>("sending the secrets", failing)
            .await
            .unwrap_err();
        let timeout = limits.deadline.timeout;
        let outcome = ending(Err(halt), None, timeout).unwrap();
        assert_eq!(outcome.state, JobState::Error);
        assert_eq!(
            outcome.reason.as_deref(),
            Some("sending the secrets: the guest closed the channel")
        );
    }

    #[test]
    fn test_ending_after_a_cancel_or_a_lost_lease() {
        let hour = Duration::from_secs(3600);
        let failed = || Err(Halt::Failed(anyhow::anyhow!("broken pipe")));
        for steps in [
            Ok(Outcome::succeeded()),
            failed(),
            Err(Halt::TimedOut("booting the guest".into())),
        ] {
            assert_eq!(ending(steps, Some(Stop::LeaseLost), hour), None);
        }
        assert_eq!(
            ending(failed(), Some(Stop::Cancelled), hour),
            Some(Outcome::new(
                JobState::Cancelled,
                "cancelled by a user (broken pipe)"
            ))
        );
        let task_cancelled = Outcome::new(JobState::Cancelled, "cancelled by a user");
        assert_eq!(
            ending(Ok(task_cancelled.clone()), Some(Stop::Cancelled), hour),
            Some(task_cancelled)
        );
    }

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
