//! The worker's side of a booted guest: the job's SSH key, the agent's waiting and ready lines
//! (or cloud-init's host keys) on the console, the job's identity sent to the agent, a firmware guest's cloud-init seed, and [`Guest`],
//! the SSH session with the agent or the guest's own OpenSSH.

pub mod cloud_init;
pub mod console;
pub mod identity;
pub mod key;
pub mod ssh;

pub use console::{Announcer, HostFingerprint, ReadyError, wait_ready};
pub use identity::{IntroduceError, Start, identity, introduce};
pub use key::JobKey;
pub use ssh::{
    Downloaded, ExecLimits, ExecOutput, Guest, Output, OutputStream, SshError, SshOptions,
};
