//! The tasks: each uploaded, run under the job's limits with its output in the log, and
//! reported as it starts and ends.

use super::limits::Halt;
use super::outcome::task_end;
use super::{JobRun, Outcome, write_private};
use crate::guest::{Guest, Output, OutputStream};
use crate::worker::guest_paths::{FARM_DIR, task_command};
use crate::worker::heartbeat::Stop;
use crate::worker::log_shipper::LogSink;
use anyhow::Context;
use std::future::Future;
use vmfarm_proto::TaskState;
use vmfarm_proto::manifest::Task;
use vmfarm_proto::wire::{LogStream, StateUpdate, TaskUpdate};

impl JobRun<'_> {
    /// Runs one task and reports how it ended; `Some` when the job ends with it.
    pub(super) async fn task(
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
    pub(super) async fn upload_script(&self, guest: &Guest, task: &Task) -> anyhow::Result<String> {
        let local = self.run_dir.join(format!("task-{}.sh", task.name));
        write_private(&local, task.script.as_bytes())
            .await
            .context("staging a task script")?;
        let remote = format!("{FARM_DIR}/tasks/{}.sh", task.name);
        guest.upload(&local, &remote).await?;
        Ok(remote)
    }

    pub(super) async fn report_task(
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
    pub(super) async fn report(&self, update: StateUpdate) -> Result<(), Halt> {
        self.ctx
            .client
            .state(&self.handle, &update)
            .await
            .context("reporting to the server")
            .map_err(Halt::Failed)
    }
}

/// A task's output, into the job's log (waiting for room there: see [`LogSink::write`]).
pub(super) struct TaskOutput<'a> {
    pub(super) log: &'a LogSink,
    pub(super) task: &'a str,
}

impl Output for TaskOutput<'_> {
    fn put(&mut self, _: OutputStream, data: &[u8]) -> impl Future<Output = ()> + Send {
        self.log.write(LogStream::Task, Some(self.task), data)
    }
}
