//! `vmfarm bench ...`: each benchmark prints its figures beside a reference measured in the same run.

pub mod queue;
pub mod stats;
