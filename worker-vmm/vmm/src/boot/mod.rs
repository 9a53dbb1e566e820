//! Direct Linux boot: the kernel image, initrd and command line in guest memory, the zero page,
//! the firmware tables (MP table; ACPI is in `crate::acpi`), and the boot vCPU's registers.

pub mod cpu;
pub mod cpuid;
pub mod kernel;
pub mod mptable;
pub mod zero_page;
