//! vmfarm's worker daemon and its KVM virtual machine monitor.

pub mod config;
pub mod vmm;
