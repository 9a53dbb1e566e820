//! The job's deadline and cancel, around every step and task.

use crate::guest::ExecLimits;
use std::future::Future;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;
use vmfarm_proto::manifest::Task;
use vmfarm_proto::units::format_duration;

/// When a job must be over: its timeout (the lease's `timeout_ms`: the manifest's `timeout`,
/// else the server's `default_job_timeout`) counted from when the worker got the lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Deadline {
    pub(super) at: Instant,
    pub(super) timeout: Duration,
}

impl Deadline {
    pub(super) fn new(leased_at: Instant, timeout_ms: u64) -> Deadline {
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
pub(super) enum Halt {
    /// The job's deadline passed during this step.
    TimedOut(String),
    /// A cancel (or a lost lease) came during this step.
    Stopped(String),
    /// A step failed; the error starts with the step's name.
    Failed(anyhow::Error),
}

/// What every step runs under: the job's deadline and its stop flag (set by the heartbeat).
#[derive(Clone)]
pub(super) struct JobLimits {
    pub(super) deadline: Deadline,
    pub(super) stopping: watch::Receiver<bool>,
}

impl JobLimits {
    /// Runs `work` until it ends, the deadline passes or the job is stopped; `work` is dropped
    /// (and with it whatever it was doing) in the last two cases.
    pub(super) async fn bounded<T>(
        &self,
        step: &str,
        work: impl Future<Output = T>,
    ) -> Result<T, Halt> {
        let mut stopping = self.stopping.clone();
        tokio::select! {
            biased;
            done = work => Ok(done),
            () = stop_requested(&mut stopping) => Err(Halt::Stopped(step.to_owned())),
            () = tokio::time::sleep_until(self.deadline.at) => Err(Halt::TimedOut(step.to_owned())),
        }
    }

    /// [`Self::bounded`], and a failure of `work` is named after `step`.
    pub(super) async fn step<T>(
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
    pub(super) fn for_task(&self, task: &Task) -> (TaskLimit, ExecLimits) {
        self.for_command(task.timeout)
    }

    /// The limits of a command in the guest with its `own` timeout, if any (see
    /// [`Self::for_task`]).
    pub(super) fn for_command(&self, own: Option<Duration>) -> (TaskLimit, ExecLimits) {
        let limit = TaskLimit::new(own, &self.deadline, Instant::now());
        let exec = ExecLimits {
            timeout: Some(limit.duration()),
            cancel: Some(self.stopping.clone()),
        };
        (limit, exec)
    }
}

/// Resolves once the job must stop; never, if its heartbeat is gone.
pub(super) async fn stop_requested(flag: &mut watch::Receiver<bool>) {
    if flag.wait_for(|s| *s).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// How long a task may run, and whose limit that is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum TaskLimit {
    /// Its own `timeout`, which ends before the job's deadline.
    Own(Duration),
    /// What is left of the job's time; `timeout` is the job's whole timeout.
    Job { left: Duration, timeout: Duration },
}

impl TaskLimit {
    pub(super) fn new(own: Option<Duration>, deadline: &Deadline, now: Instant) -> TaskLimit {
        let left = deadline.at.saturating_duration_since(now);
        match own {
            Some(own) if own < left => TaskLimit::Own(own),
            _ => TaskLimit::Job {
                left,
                timeout: deadline.timeout,
            },
        }
    }

    pub(super) fn duration(self) -> Duration {
        match self {
            TaskLimit::Own(limit) | TaskLimit::Job { left: limit, .. } => limit,
        }
    }

    pub(super) fn describe(self) -> String {
        match self {
            TaskLimit::Own(limit) => format!("its timeout of {}", format_duration(limit)),
            TaskLimit::Job { timeout, .. } => {
                format!("the job's timeout of {}", format_duration(timeout))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
