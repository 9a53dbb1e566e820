//! The agent's readiness line on the guest console (`vmfarm_proto::guest::ReadyLine::find`):
//! the worker reads it from console output the guest controls.
//!
//! Besides not panicking: a line that announces readiness gives back a fingerprint that,
//! printed as the agent prints it, is found again unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmfarm_proto::guest::ReadyLine;

fuzz_target!(|data: &[u8]| {
    let Ok(line) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(Some(ready)) = ReadyLine::find(line) {
        assert!(ready.fingerprint.starts_with("SHA256:"), "{ready:?}");
        assert_eq!(ReadyLine::find(&ready.to_string()), Ok(Some(ready.clone())));
    }
});
