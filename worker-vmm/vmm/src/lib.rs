//! The integrated KVM virtual machine monitor: one guest per process.
//!
//! - `vmfarm vm run`: [`cli::VmRunArgs`] (clap) and [`run::run`], which returns the process exit
//!   code (0 on guest reboot/power-off; 2 panic, 3 triple fault, 4 internal error, 124 timeout,
//!   with a one-line reason on stderr).
//! - In-process use: [`config::VmConfig`] (checked once, `TryFrom<&VmRunArgs>`), then
//!   [`vm::build_vm`] and [`vm::Vm::run`], which returns an [`exit::VmExit`].
//! - Confinement: [`jail`] (`vm run --jail DIR --jail-uid UID`: namespaces, `pivot_root` into the
//!   guest's folder, cgroups, resource limits, an unprivileged user) before the VM is built, and
//!   [`seccomp`] (the system calls a running VMM needs, and no other) before the vCPUs run.
//! - Boot: direct 64-bit Linux boot (bzImage or ELF vmlinux), e820 around the MMIO gap, ACPI
//!   tables (virtio-mmio devices as `LNRO0005`, pvpanic as `QEMU0001`), MP table, in-kernel
//!   irqchip and PIT; legacy devices COM1, i8042 reset, CMOS RTC, pvpanic, ACPI power registers.

pub mod acpi;
pub mod boot;
pub mod bus;
pub mod cli;
pub mod config;
pub mod exit;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod irq;
pub mod irqfd;
pub mod jail;
#[cfg(test)]
mod kvm_tests;
pub mod layout;
pub mod legacy;
pub mod memory;
pub mod qcow2;
pub mod run;
pub mod seccomp;
pub mod snapshot;
#[cfg(test)]
mod test_utils;
pub mod thread;
pub mod timing;
pub mod vcpu;
pub mod virtio;
pub mod vm;
