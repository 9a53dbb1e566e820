//! `vmfarm bench ...`: each benchmark prints its figures beside a reference measured in the same run.

pub mod artifacts;
pub mod boot;
pub mod cache_build;
pub mod disk;
pub mod farm;
pub mod job_start;
pub mod live_log;
pub mod network;
pub mod push;
pub mod queue;
pub mod rss;
pub mod stats;
pub mod warm_memory;
