//! The boot contract on the kernel command line: `vmfarm_proto::guest::GuestCmdline::parse`,
//! and the agent's `BootConfig::parse` on top of it (guest-agent/src/cmdline.rs, compiled in
//! here as it is: the agent is a binary crate), which decodes the job's SSH key.
//!
//! Besides not panicking: what parses composes back into a line that parses to the same
//! values, and the agent accepts a line only if the contract does.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmfarm_proto::guest::GuestCmdline;

#[allow(dead_code)]
#[path = "../../guest-agent/src/cmdline.rs"]
mod cmdline;

fuzz_target!(|data: &[u8]| {
    let Ok(line) = std::str::from_utf8(data) else {
        return;
    };
    let parsed = GuestCmdline::parse(line);
    if let Ok(c) = &parsed {
        let again = GuestCmdline::parse(&c.compose());
        assert_eq!(
            again.as_ref(),
            Ok(c),
            "compose of {c:?} does not parse back"
        );
    }
    match cmdline::BootConfig::parse(line) {
        Ok(boot) => {
            let c = parsed.expect("the agent accepted what the contract refuses");
            assert_eq!(boot.channel, c.channel);
            assert_eq!((&boot.hostname, &boot.user), (&c.hostname, &c.user));
            assert_eq!(u64::try_from(boot.time).ok(), Some(c.time));
        }
        Err(cmdline::BootConfigError::Cmdline(err)) => {
            assert_eq!(
                parsed.err(),
                Some(err),
                "the agent and the contract disagree"
            );
        }
        Err(_) => assert!(
            parsed.is_ok(),
            "a key error for a line the contract refuses"
        ),
    }
});
