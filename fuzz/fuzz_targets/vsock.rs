//! See `vmfarm_vmm::fuzzing::vsock` for what the input means and what is checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmfarm_vmm::fuzzing::vsock(data));
