//! vmfarm's worker daemon and its KVM virtual machine monitor.

pub mod config;
pub mod vmm;
pub mod backend;
pub mod guest;
pub mod images;
pub mod worker;
