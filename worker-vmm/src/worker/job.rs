//! One job, top down: boot (teardown guaranteed), settle, send sources, environment and
//! secrets, run the tasks, collect the artifacts, report. Each step says what it does in the
//! job's log; an error names its step.

use super::guest_paths::{BUILD_DIR, FARM_DIR, SECRETS_DIR, quote, task_command, unpack_command};
use super::heartbeat::{self, Heartbeat, Stop};
use super::log_shipper::{self, LogSink};
use super::server_client::{LeaseHandle, ServerClient, ServerError};
use super::sources;
use crate::backend::{Backend, BootSpec, GuestCmdline, Vm};
use crate::config::WorkerConfig;
use crate::guest::{ExecLimits, Guest, JobKey, OutputStream, SshError, SshOptions, wait_ready};
use crate::images::manifest::InstalledImage;
use anyhow::Context;
use base64::Engine;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;
use vmfarm_proto::wire::{LeaseResponse, LogStream, StateUpdate, TaskUpdate};
use vmfarm_proto::{JobState, Manifest, TaskState};

/// What a job needs from its worker.
pub struct JobContext {
    pub client: ServerClient,
    pub config: Arc<WorkerConfig>,
    pub backend: Arc<dyn Backend>,
    pub image: InstalledImage,
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

/// The host's fetching of a job's sources, which runs while its guest boots.
type SourcesFetch =
    tokio::task::JoinHandle<Result<Vec<sources::FetchedSource>, sources::SourceError>>;

/// Runs the leased job to its end and reports it; returns how it ended (`None` if the lease
/// was lost, when nothing more may be written).
pub async fn run(ctx: &JobContext, lease: LeaseResponse) -> Option<Outcome> {
    let handle = LeaseHandle {
        lease_id: lease.lease_id.clone(),
        fence: lease.fence,
    };
    let secrets: Vec<(String, Vec<u8>)> = lease
        .secrets
        .iter()
        .filter_map(|(name, b64)| {
            let value = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
            Some((name.clone(), value))
        })
        .collect();
    let masks: Vec<Vec<u8>> = secrets.iter().map(|(_, v)| v.clone()).collect();
    let (log, shipper) = log_shipper::start(ctx.client.clone(), handle.clone(), masks);
    let heartbeat = heartbeat::start(ctx.client.clone(), handle.clone(), lease.expires_at);
    let run_dir = ctx
        .config
        .work_dir
        .join(format!("job-{}-{}", lease.job.id, lease.job.attempt));

    let job = JobRun {
        ctx,
        lease: &lease,
        handle: &handle,
        secrets: &secrets,
        log: &log,
        heartbeat: &heartbeat,
        run_dir: &run_dir,
        started: Instant::now(),
    };
    let outcome = job.run_steps().await;
    let _ = tokio::fs::remove_dir_all(&run_dir).await;

    let outcome = match (outcome, heartbeat.stopped()) {
        (_, Some(Stop::LeaseLost)) => None,
        (Ok(o), _) => Some(o),
        (Err(e), Some(Stop::Cancelled)) => Some(Outcome::new(
            JobState::Cancelled,
            format!("cancelled ({e:#})"),
        )),
        (Err(e), None) => {
            log.farm(&format!("error: {e:#}"));
            Some(Outcome::new(JobState::Error, format!("{e:#}")))
        }
    };
    drop(log);
    let shipped = shipper.await;
    let outcome = outcome?;
    if let Ok(Err(ServerError::LeaseLost(_))) = shipped {
        return None;
    }
    let update = StateUpdate {
        job_state: Some(outcome.state),
        reason: outcome.reason.clone(),
        ..StateUpdate::default()
    };
    match ctx.client.state(&handle, &update).await {
        Ok(()) => Some(outcome),
        Err(e) => {
            tracing::warn!(job = %lease.job.id, error = %e, "could not report the job's end");
            None
        }
    }
}

async fn set_state(
    ctx: &JobContext,
    lease: &LeaseHandle,
    update: StateUpdate,
) -> anyhow::Result<()> {
    ctx.client
        .state(lease, &update)
        .await
        .context("reporting to the server")
}

/// What every step of one job works with.
#[derive(Clone, Copy)]
struct JobRun<'a> {
    ctx: &'a JobContext,
    lease: &'a LeaseResponse,
    handle: &'a LeaseHandle,
    secrets: &'a [(String, Vec<u8>)],
    log: &'a LogSink,
    heartbeat: &'a Heartbeat,
    run_dir: &'a Path,
    started: Instant,
}

impl JobRun<'_> {
    async fn run_steps(self) -> anyhow::Result<Outcome> {
        let JobRun {
            ctx,
            lease,
            handle,
            log,
            run_dir,
            ..
        } = self;
        let manifest = Manifest::parse(&lease.job.manifest)
            .map_err(|e| anyhow::anyhow!("the leased manifest is invalid: {e}"))?;
        let image = &ctx.image.manifest;
        set_state(
            ctx,
            handle,
            StateUpdate {
                job_state: Some(JobState::Booting),
                image_version: Some(image.version.clone()),
                ..StateUpdate::default()
            },
        )
        .await?;
        create_private_dir(run_dir)
            .await
            .context("creating the job's scratch folder")?;

        // Sources are fetched on the host while the guest boots.
        let fetch = {
            let sources = manifest.sources.clone();
            let dir = run_dir.to_owned();
            let allowed = ctx.config.allowed_local_sources.clone();
            tokio::spawn(async move {
                let mut fetched = Vec::new();
                for (i, source) in sources.iter().enumerate() {
                    fetched.push(sources::fetch(source, i, &dir, &allowed).await?);
                }
                Ok::<_, sources::SourceError>(fetched)
            })
        };

        log.farm(&format!(
            "booting {} {} ({}) with the {} backend",
            image.name,
            image.version,
            image.system.pretty_name,
            ctx.backend.name()
        ));
        let key = JobKey::generate().context("making the job's SSH key")?;
        let (cpus, memory_mib) = job_size(&manifest, &ctx.config);
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
            run_dir: run_dir.join("vm"),
        };
        let mut vm = ctx.backend.boot(&spec).await.context("booting the guest")?;
        let result = self.with_guest(&manifest, &key, vm.as_mut(), fetch).await;
        teardown(vm, log).await;
        result
    }

    /// Boots to SSH and runs the job in the guest; the caller tears the guest down afterwards.
    async fn with_guest(
        self,
        manifest: &Manifest,
        key: &JobKey,
        vm: &mut dyn Vm,
        fetch: SourcesFetch,
    ) -> anyhow::Result<Outcome> {
        let JobRun {
            ctx,
            handle,
            log,
            heartbeat,
            ..
        } = self;
        let mut console = vm.take_console().context("the guest's console")?;
        let console_log = log.clone();
        let mut sink = move |data: &[u8]| console_log.write(LogStream::Console, None, data);
        let boot_timeout = ctx.config.guest.boot_timeout.0;
        let booted = Instant::now();
        let fingerprint = tokio::select! {
            ready = wait_ready(&mut console, &mut sink, boot_timeout) => ready.context("waiting for the guest agent")?,
            _ = stop_requested(heartbeat) => anyhow::bail!("stopped while booting"),
        };
        log.farm(&format!(
            "guest ready in {:.1}s (host key {fingerprint})",
            booted.elapsed().as_secs_f64()
        ));
        // The rest of the console keeps going to the log.
        let console_log = log.clone();
        let console_task = tokio::spawn(async move {
            let mut buf = vec![0u8; 8192];
            while let Ok(n) = console.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                console_log.write(LogStream::Console, None, &buf[..n]);
            }
        });

        let stream = vm
            .connect()
            .await
            .context("connecting to the guest agent")?;
        let guest = Guest::ssh(stream, key, &fingerprint, &SshOptions::default())
            .await
            .context("opening SSH to the guest")?;
        set_state(
            ctx,
            handle,
            StateUpdate {
                job_state: Some(JobState::Running),
                ..StateUpdate::default()
            },
        )
        .await?;

        let outcome = self.in_guest(manifest, &guest, fetch).await;
        if let Err(e) = guest.shutdown().await {
            log.farm(&format!("the guest did not shut down cleanly: {e}"));
        }
        wait_for_shutdown(vm, log).await;
        console_task.abort();
        outcome
    }

    /// Sources, environment, secrets, tasks and artifacts, over SSH.
    async fn in_guest(
        self,
        manifest: &Manifest,
        guest: &Guest,
        fetch: SourcesFetch,
    ) -> anyhow::Result<Outcome> {
        let JobRun {
            ctx,
            lease,
            handle,
            secrets,
            log,
            heartbeat,
            run_dir,
            started,
        } = self;
        let quick = ExecLimits::timeout(Duration::from_secs(60));
        let setup =
            format!("mkdir -p {BUILD_DIR} {FARM_DIR}/tasks && mkdir -p -m 0700 {SECRETS_DIR}");
        run_checked(guest, &setup, quick.clone())
            .await
            .context("preparing the build directory")?;

        let fetched = fetch.await.context("fetching the sources")??;
        for (i, source) in fetched.iter().enumerate() {
            log.farm(&format!("uploading source to {}", source.path));
            let remote = format!("{FARM_DIR}/source-{i}.tar");
            guest
                .upload(&source.tar, &remote)
                .await
                .context("uploading the sources")?;
            run_checked(guest, &unpack_command(&remote, &source.path), quick.clone())
                .await
                .context("unpacking the sources")?;
        }

        let mut env: Vec<(String, String)> = manifest
            .environment
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        env.push(("VMFARM_JOB_ID".into(), lease.job.id.clone()));
        env.push(("VMFARM_IMAGE".into(), lease.job.image.clone()));
        for (name, value) in secrets {
            let local = run_dir.join(format!("secret-{name}"));
            write_private(&local, value)
                .await
                .context("staging a secret")?;
            let remote = format!("{SECRETS_DIR}/{name}");
            guest
                .upload(&local, &remote)
                .await
                .context("sending the secrets")?;
            let _ = tokio::fs::remove_file(&local).await;
            run_checked(
                guest,
                &format!("chmod 0600 {}", quote(&remote)),
                quick.clone(),
            )
            .await
            .context("sending the secrets")?;
            let var = name.to_ascii_uppercase();
            if vmfarm_proto::manifest::is_env_name(&var) && !name.contains('-') {
                env.push((var, String::from_utf8_lossy(value).into_owned()));
            }
        }

        let deadline = started + manifest.timeout.unwrap_or(Duration::from_secs(3600));
        let mut outcome = Outcome {
            state: JobState::Succeeded,
            reason: None,
        };
        for task in &manifest.tasks {
            let local = run_dir.join(format!("task-{}.sh", task.name));
            write_private(&local, task.script.as_bytes())
                .await
                .context("staging a task script")?;
            let remote = format!("{FARM_DIR}/tasks/{}.sh", task.name);
            guest
                .upload(&local, &remote)
                .await
                .context("uploading a task script")?;
            report_task(ctx, handle, &task.name, TaskState::Running, None).await?;
            log.farm(&format!("task {}", task.name));
            let left = deadline.saturating_duration_since(Instant::now());
            let (limit, limit_is_job) = match task.timeout {
                Some(t) if t < left => (t, false),
                _ => (left, true),
            };
            let limits = ExecLimits {
                timeout: Some(limit),
                cancel: Some(heartbeat.stopping.clone()),
            };
            let task_log = log.clone();
            let name = task.name.clone();
            let mut output = move |_: OutputStream, data: &[u8]| {
                task_log.write(LogStream::Task, Some(&name), data)
            };
            let result = guest
                .exec(&task_command(&remote), &env, &mut output, limits)
                .await;
            let (task_state, code, job) = match result {
                Ok(0) => (TaskState::Succeeded, Some(0), None),
                Ok(code) => (
                    TaskState::Failed,
                    i32::try_from(code).ok(),
                    Some(Outcome::new(
                        JobState::Failed,
                        format!("task {} exited with status {code}", task.name),
                    )),
                ),
                Err(SshError::Timeout { .. }) => {
                    let which = if limit_is_job { "the job's" } else { "its" };
                    (
                        TaskState::TimedOut,
                        None,
                        Some(Outcome::new(
                            JobState::TimedOut,
                            format!(
                                "task {} ran past {which} timeout of {}",
                                task.name,
                                vmfarm_proto::units::format_duration(limit)
                            ),
                        )),
                    )
                }
                Err(SshError::Cancelled) => (
                    TaskState::Cancelled,
                    None,
                    Some(Outcome::new(JobState::Cancelled, "cancelled by a user")),
                ),
                Err(e) => return Err(e).with_context(|| format!("running task {}", task.name)),
            };
            if let Some(code) = code.filter(|c| *c != 0) {
                log.farm(&format!("task {} exited with status {code}", task.name));
            }
            if heartbeat.stopped() == Some(Stop::LeaseLost) {
                anyhow::bail!("the lease was lost");
            }
            report_task(ctx, handle, &task.name, task_state, code).await?;
            if let Some(end) = job {
                outcome = end;
                break;
            }
        }

        if outcome.state == JobState::Succeeded {
            for artifact in &manifest.artifacts {
                if let Err(e) =
                    collect_artifact(ctx, handle, guest, run_dir, &artifact.path, log).await
                {
                    log.farm(&format!("artifact {}: {e:#}", artifact.path));
                    outcome = Outcome::new(
                        JobState::Failed,
                        format!("artifact {} could not be collected: {e:#}", artifact.path),
                    );
                    break;
                }
            }
        }
        Ok(outcome)
    }
}

async fn stop_requested(heartbeat: &Heartbeat) {
    let mut flag = heartbeat.stopping.clone();
    if flag.wait_for(|s| *s).await.is_err() {
        std::future::pending::<()>().await;
    }
}

async fn report_task(
    ctx: &JobContext,
    handle: &LeaseHandle,
    name: &str,
    state: TaskState,
    exit_code: Option<i32>,
) -> anyhow::Result<()> {
    set_state(
        ctx,
        handle,
        StateUpdate {
            task: Some(TaskUpdate {
                name: name.to_owned(),
                state,
                exit_code,
            }),
            ..StateUpdate::default()
        },
    )
    .await
}

async fn collect_artifact(
    ctx: &JobContext,
    handle: &LeaseHandle,
    guest: &Guest,
    run_dir: &Path,
    path: &str,
    log: &LogSink,
) -> anyhow::Result<()> {
    vmfarm_proto::names::check_artifact_path(path).map_err(|e| anyhow::anyhow!("{e}"))?;
    let local = run_dir.join("artifact");
    let remote = format!("{BUILD_DIR}/{path}");
    let sha256 = guest
        .download(&remote, &local)
        .await
        .context("downloading it from the guest")?;
    let size = tokio::fs::metadata(&local)
        .await
        .map(|m| m.len())
        .unwrap_or(0);
    ctx.client
        .upload_artifact(handle, path, &local, &sha256)
        .await
        .context("uploading it to the server")?;
    let _ = tokio::fs::remove_file(&local).await;
    log.farm(&format!("artifact {path}: {size} bytes, sha256 {sha256}"));
    Ok(())
}

async fn run_checked(guest: &Guest, command: &str, limits: ExecLimits) -> anyhow::Result<()> {
    let out = guest.exec_collect(command, limits).await?;
    if out.exit_status != 0 {
        anyhow::bail!(
            "`{command}` exited with status {}: {}",
            out.exit_status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// After `vmfarm-agent shutdown` the guest ends by itself; it gets 10 s (CONTRACTS.md).
async fn wait_for_shutdown(vm: &mut dyn Vm, log: &LogSink) {
    match tokio::time::timeout(Duration::from_secs(10), vm.wait()).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => log.farm(&format!("waiting for the guest: {e}")),
        Err(_) => log.farm("the guest did not end within 10 s of shutdown; killing it"),
    }
}

/// Ends the guest's VMM if it is still running (a failed step never asked it to shut down).
async fn teardown(mut vm: Box<dyn Vm>, log: &LogSink) {
    if let Err(e) = vm.kill().await {
        log.farm(&format!("stopping the guest: {e}"));
        tracing::error!(error = %e, "killing a guest failed");
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
