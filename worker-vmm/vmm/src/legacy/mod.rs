//! The legacy devices of a PC that Linux expects on the port-I/O bus.

pub mod acpi_pm;
pub mod i8042;
pub mod pvpanic;
pub mod rtc;
pub mod serial;
pub mod vmgenid;
