//! What `vmfarm`'s exit status says, in one place: `--help` and README say the same.

use std::process::ExitCode;
use vmfarm_proto::JobState;

/// `--help`'s words on exit statuses.
pub const HELP: &str = "\
Exit status:
  0  success (with --follow: every job succeeded)
  1  a usage error, the server cannot be reached or refused, or any other error
  2  a followed job failed (a task exited non-zero)
  3  a followed job timed out
  4  a followed job was cancelled
  5  a followed job ended in error (the farm could not run it)
With several jobs followed, the highest of their statuses.";

/// Usage errors, connection errors and any error of the command itself.
pub const ERROR: u8 = 1;

/// The status a followed job's end state gives.
pub fn of_state(state: JobState) -> u8 {
    match state {
        JobState::Succeeded => 0,
        JobState::Failed => 2,
        JobState::TimedOut => 3,
        JobState::Cancelled => 4,
        JobState::Error => 5,
        JobState::Queued | JobState::Leased | JobState::Booting | JobState::Running => ERROR,
    }
}

/// The status of several followed jobs: the highest of theirs (0 when there are none).
pub fn of_states(states: impl IntoIterator<Item = JobState>) -> ExitCode {
    ExitCode::from(states.into_iter().map(of_state).max().unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_each_end_has_its_own_status_and_the_worst_wins() {
        let ends = [
            JobState::Succeeded,
            JobState::Failed,
            JobState::TimedOut,
            JobState::Cancelled,
            JobState::Error,
        ];
        let codes: Vec<u8> = ends.iter().map(|s| of_state(*s)).collect();
        assert_eq!(codes, [0, 2, 3, 4, 5]);
        assert_eq!(
            of_states([JobState::Failed, JobState::Succeeded, JobState::TimedOut]),
            ExitCode::from(3)
        );
        assert_eq!(of_states([]), ExitCode::SUCCESS);
    }
}
