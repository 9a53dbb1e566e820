//! vmfarm's worker daemon and its KVM virtual machine monitor.

pub mod vmm;
