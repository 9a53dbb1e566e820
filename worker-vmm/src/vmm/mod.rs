//! The integrated KVM virtual machine monitor: one guest per process.

pub mod bus;
pub mod irq;
