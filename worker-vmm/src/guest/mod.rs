//! The worker's side of a booted guest: the job's SSH key, the agent's ready line on the
//! console, and [`Guest`], the SSH session with the agent.

pub mod console;
pub mod key;
pub mod ssh;

pub use console::{HostFingerprint, ReadyError, wait_ready};
pub use key::JobKey;
pub use ssh::{
    Downloaded, ExecLimits, ExecOutput, Guest, Output, OutputStream, SshError, SshOptions,
};
