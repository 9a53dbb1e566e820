//! HTTP handlers, grouped by what they serve.

pub mod artifacts;
pub mod badge;
pub mod hooks;
pub mod jobs;
pub mod leases;
pub mod logs;
pub mod meta;
pub mod pushes;
pub mod refusals;
pub mod schedules;
pub mod ssh;
