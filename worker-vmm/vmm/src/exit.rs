//! Why a guest stopped, and the one-shot signal that carries it from any thread to `run`.

use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// How a VM ended. The first reason reported wins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// The guest rebooted (i8042 reset, ACPI reset, or a reset system event).
    Reset,
    /// The guest powered off (ACPI S5, a shutdown system event, or every vCPU halted).
    PowerOff,
    /// The guest kernel panicked (pvpanic, or a crash system event).
    Panic,
    /// A vCPU took a triple fault (KVM_EXIT_SHUTDOWN).
    TripleFault {
        /// The vCPU.
        vcpu: u32,
        /// Its registers when it stopped (instruction and stack pointers, control registers),
        /// for finding where in the guest it happened; empty if KVM would not say.
        state: String,
    },
    /// KVM could not run a vCPU (entry failure, internal error, unexpected exit, ioctl error).
    Internal {
        /// The vCPU.
        vcpu: u32,
        /// What happened.
        reason: String,
    },
    /// `--timeout` elapsed.
    Timeout(Duration),
    /// The VM was stopped and saved (`--save`): it ends as a clean exit does.
    Saved,
}

impl VmExit {
    /// True for a reboot or power-off the guest asked for.
    pub fn is_clean(&self) -> bool {
        matches!(self, VmExit::Reset | VmExit::PowerOff | VmExit::Saved)
    }

    /// The process exit status for this ending: 0 clean, 2 panic, 3 triple fault,
    /// 4 internal error, 124 timeout (as timeout(1)).
    pub fn exit_status(&self) -> u8 {
        match self {
            VmExit::Reset | VmExit::PowerOff | VmExit::Saved => 0,
            VmExit::Panic => 2,
            VmExit::TripleFault { .. } => 3,
            VmExit::Internal { .. } => 4,
            VmExit::Timeout(_) => 124,
        }
    }
}

impl std::fmt::Display for VmExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmExit::Reset => write!(f, "guest rebooted"),
            VmExit::PowerOff => write!(f, "guest powered off"),
            VmExit::Panic => write!(f, "guest kernel panicked"),
            VmExit::TripleFault { vcpu, state } if state.is_empty() => {
                write!(f, "triple fault on vCPU {vcpu}")
            }
            VmExit::TripleFault { vcpu, state } => {
                write!(f, "triple fault on vCPU {vcpu} ({state})")
            }
            VmExit::Internal { vcpu, reason } => {
                write!(f, "KVM internal error on vCPU {vcpu}: {reason}")
            }
            VmExit::Timeout(d) => write!(f, "timed out after {}", humanize(*d)),
            VmExit::Saved => write!(f, "saved"),
        }
    }
}

fn humanize(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{:.3}s", d.as_secs_f64())
    }
}

/// The place where devices and vCPUs report the end of the VM; `run` waits on it.
#[derive(Default)]
pub struct ExitSignal {
    reason: Mutex<Option<VmExit>>,
    changed: Condvar,
}

impl ExitSignal {
    /// A signal with no reason yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Reports `exit`, unless another reason came first.
    pub fn report(&self, exit: VmExit) {
        let mut reason = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        if reason.is_none() {
            *reason = Some(exit);
            self.changed.notify_all();
        }
    }

    /// The reason, if one was reported.
    pub fn get(&self) -> Option<VmExit> {
        self.reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Waits for a reason until `deadline` (forever if `None`); `None` when the deadline passed.
    pub fn wait(&self, deadline: Option<Instant>) -> Option<VmExit> {
        let mut reason = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(exit) = reason.as_ref() {
                return Some(exit.clone());
            }
            match deadline {
                None => {
                    reason = self.changed.wait(reason).unwrap_or_else(|p| p.into_inner());
                }
                Some(deadline) => {
                    let left = deadline.checked_duration_since(Instant::now())?;
                    reason = self
                        .changed
                        .wait_timeout(reason, left)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn test_first_reason_wins_and_wakes_the_waiter() {
        let signal = Arc::new(ExitSignal::new());
        let s = signal.clone();
        let t = std::thread::spawn(move || s.wait(None));
        signal.report(VmExit::Panic);
        signal.report(VmExit::Reset);
        assert_eq!(t.join().unwrap(), Some(VmExit::Panic));
        assert_eq!(signal.get(), Some(VmExit::Panic));
    }

    #[test]
    fn test_wait_times_out() {
        let signal = ExitSignal::new();
        let deadline = Instant::now() + Duration::from_millis(20);
        assert_eq!(signal.wait(Some(deadline)), None);
    }

    #[test]
    fn test_exit_statuses() {
        for (exit, status) in [
            (VmExit::Reset, 0),
            (VmExit::PowerOff, 0),
            (VmExit::Panic, 2),
            (
                VmExit::TripleFault {
                    vcpu: 1,
                    state: String::new(),
                },
                3,
            ),
            (
                VmExit::Internal {
                    vcpu: 0,
                    reason: "x".into(),
                },
                4,
            ),
            (VmExit::Timeout(Duration::from_secs(60)), 124),
        ] {
            assert_eq!(exit.exit_status(), status, "{exit}");
            assert_eq!(exit.is_clean(), status == 0);
        }
        assert_eq!(
            VmExit::Timeout(Duration::from_secs(60)).to_string(),
            "timed out after 60s"
        );
    }
}
