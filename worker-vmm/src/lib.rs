//! vmfarm's worker daemon and its KVM virtual machine monitor.

pub mod backend;
pub mod config;
pub mod guest;
pub mod images;
pub mod network;
pub use vmfarm_vmm as vmm;
pub mod worker;
