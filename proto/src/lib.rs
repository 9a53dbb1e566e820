//! Types shared by vmfarm's parts: the job manifest and its validation, job and task states,
//! the rules for names, and the payloads that cross between the CLI, server, worker and guest.
//!
//! `CONTRACTS.md` (beside `DESIGN.md`) is the prose form of what this crate fixes in types.

pub mod api;
pub mod manifest;
pub mod names;
pub mod network;
pub mod state;
pub mod units;
pub mod wire;

pub use manifest::{Manifest, ManifestError, ManifestErrors};
pub use state::{JobState, TaskState};
