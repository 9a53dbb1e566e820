//! How a job and its tasks end, as the worker reports them.

use super::limits::{Halt, TaskLimit};
use crate::guest::SshError;
use crate::worker::heartbeat::Stop;
use anyhow::Context;
use std::time::Duration;
use vmfarm_proto::units::format_duration;
use vmfarm_proto::{JobState, TaskState};

/// How a job ended, as reported to the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub state: JobState,
    pub reason: Option<String>,
}

impl Outcome {
    pub(super) fn new(state: JobState, reason: impl Into<String>) -> Self {
        Outcome {
            state,
            reason: Some(reason.into()),
        }
    }

    pub(super) fn succeeded() -> Self {
        Outcome {
            state: JobState::Succeeded,
            reason: None,
        }
    }
}

/// How a task ended: what the server is told of it, and the job's end if the task ends it.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct TaskEnd {
    pub(super) state: TaskState,
    pub(super) exit_code: Option<i32>,
    pub(super) job: Option<Outcome>,
}

/// A task's end from how its command ended; an error of the guest's is the job's error.
pub(super) fn task_end(
    name: &str,
    ran: Result<u32, SshError>,
    limit: TaskLimit,
) -> anyhow::Result<TaskEnd> {
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
pub(super) fn ending(
    steps: Result<Outcome, Halt>,
    stop: Option<Stop>,
    timeout: Duration,
) -> Option<Outcome> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::worker::job::limits::{Deadline, JobLimits};
    use tokio::sync::watch;
    use tokio::time::Instant;

    fn limits(timeout: Duration) -> (JobLimits, watch::Sender<bool>) {
        let (stop, stopping) = watch::channel(false);
        let deadline = Deadline::new(Instant::now(), u64::try_from(timeout.as_millis()).unwrap());
        (JobLimits { deadline, stopping }, stop)
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
}
