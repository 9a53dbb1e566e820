//! Job and task states and the moves between them (CONTRACTS.md "States").

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Where a job is on its way through the farm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum JobState {
    Queued,
    Leased,
    Booting,
    Running,
    Succeeded,
    Failed,
    TimedOut,
    Cancelled,
    Error,
}

impl JobState {
    pub const ALL: [JobState; 9] = [
        JobState::Queued,
        JobState::Leased,
        JobState::Booting,
        JobState::Running,
        JobState::Succeeded,
        JobState::Failed,
        JobState::TimedOut,
        JobState::Cancelled,
        JobState::Error,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Leased => "leased",
            JobState::Booting => "booting",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::TimedOut => "timed_out",
            JobState::Cancelled => "cancelled",
            JobState::Error => "error",
        }
    }

    /// A job in a terminal state never changes again.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Succeeded
                | JobState::Failed
                | JobState::TimedOut
                | JobState::Cancelled
                | JobState::Error
        )
    }

    /// Whether a lease holder (or the server) may move a job from `self` to `next`.
    /// The requeue of an expired lease (`leased|booting|running -> queued`) is included.
    pub fn can_become(self, next: JobState) -> bool {
        use JobState::*;
        matches!(
            (self, next),
            (Queued, Leased)
                | (Leased, Booting)
                | (Booting, Running)
                | (Leased | Booting | Running, Queued)
                | (Running, Succeeded | Failed | TimedOut | Cancelled | Error)
                | (Queued | Leased | Booting, Cancelled | Error)
        )
    }
}

/// Where one task of a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum TaskState {
    Pending,
    Running,
    Succeeded,
    Failed,
    TimedOut,
    Cancelled,
    Skipped,
}

impl TaskState {
    pub const ALL: [TaskState; 7] = [
        TaskState::Pending,
        TaskState::Running,
        TaskState::Succeeded,
        TaskState::Failed,
        TaskState::TimedOut,
        TaskState::Cancelled,
        TaskState::Skipped,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Pending => "pending",
            TaskState::Running => "running",
            TaskState::Succeeded => "succeeded",
            TaskState::Failed => "failed",
            TaskState::TimedOut => "timed_out",
            TaskState::Cancelled => "cancelled",
            TaskState::Skipped => "skipped",
        }
    }

    pub fn is_terminal(self) -> bool {
        !matches!(self, TaskState::Pending | TaskState::Running)
    }

    /// `pending -> running -> succeeded|failed|timed_out|cancelled`; a pending task may be
    /// `skipped` (after a failed, timed-out or cancelled one) or `cancelled`.
    pub fn can_become(self, next: TaskState) -> bool {
        use TaskState::*;
        matches!(
            (self, next),
            (Pending, Running | Skipped | Cancelled)
                | (Running, Succeeded | Failed | TimedOut | Cancelled)
        )
    }
}

/// A state name that is not one of the known ones.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} `{given}`: use one of {allowed}")]
pub struct UnknownState {
    what: &'static str,
    given: String,
    allowed: String,
}

macro_rules! state_text {
    ($ty:ty, $what:literal) => {
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $ty {
            type Err = UnknownState;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                <$ty>::ALL
                    .into_iter()
                    .find(|state| state.as_str() == s)
                    .ok_or_else(|| UnknownState {
                        what: $what,
                        given: s.to_owned(),
                        allowed: <$ty>::ALL.map(|st| st.as_str()).join(", "),
                    })
            }
        }
    };
}

state_text!(JobState, "job state");
state_text!(TaskState, "task state");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_states_round_trip_as_text_and_json() {
        for state in JobState::ALL {
            assert_eq!(state.as_str().parse::<JobState>(), Ok(state));
            let json = serde_json::to_string(&state).unwrap();
            assert_eq!(json, format!("\"{}\"", state.as_str()));
            assert_eq!(serde_json::from_str::<JobState>(&json).unwrap(), state);
        }
        for state in TaskState::ALL {
            assert_eq!(state.as_str().parse::<TaskState>(), Ok(state));
            let json = serde_json::to_string(&state).unwrap();
            assert_eq!(serde_json::from_str::<TaskState>(&json).unwrap(), state);
        }
        let err = "done".parse::<JobState>().unwrap_err().to_string();
        assert!(
            err.contains("unknown job state `done`") && err.contains("timed_out"),
            "{err}"
        );
    }

    #[test]
    fn test_job_moves_follow_the_contract() {
        use JobState::*;
        let allowed = [
            (Queued, Leased),
            (Leased, Booting),
            (Booting, Running),
            (Running, Succeeded),
            (Running, Failed),
            (Running, TimedOut),
            (Running, Cancelled),
            (Running, Error),
            (Queued, Cancelled),
            (Queued, Error),
            (Leased, Cancelled),
            (Leased, Error),
            (Booting, Cancelled),
            (Booting, Error),
            (Leased, Queued),
            (Booting, Queued),
            (Running, Queued),
        ];
        for from in JobState::ALL {
            for to in JobState::ALL {
                assert_eq!(
                    from.can_become(to),
                    allowed.contains(&(from, to)),
                    "{from} -> {to}"
                );
            }
        }
        for state in JobState::ALL {
            assert_eq!(
                state.is_terminal(),
                !JobState::ALL.iter().any(|&n| state.can_become(n))
            );
        }
    }

    #[test]
    fn test_task_moves_follow_the_contract() {
        use TaskState::*;
        assert!(Pending.can_become(Running));
        assert!(Pending.can_become(Skipped));
        assert!(Running.can_become(TimedOut));
        assert!(!Running.can_become(Skipped));
        assert!(!Succeeded.can_become(Running));
        assert!(!Skipped.can_become(Running));
        for state in TaskState::ALL {
            assert_eq!(
                state.is_terminal(),
                !TaskState::ALL.iter().any(|&n| state.can_become(n))
            );
        }
    }
}
