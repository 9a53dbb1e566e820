//! The boot contract: the kernel command line (`vmfarm_proto::guest::GuestCmdline::parse`) and
//! the job's identity line the worker sends over the channel (`Identity::parse`), and the
//! agent's `BootConfig::parse` and `JobIdentity::parse` on top of them
//! (guest-agent/src/cmdline.rs, compiled in here as it is: the agent is a binary crate), which
//! decode the job's SSH key. Each input is tried as both.
//!
//! Besides not panicking: what parses composes back into a line that parses to the same
//! values, and the agent accepts a line only if the contract does, with the same values.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmfarm_proto::guest::{GuestCmdline, Identity};

#[allow(dead_code)]
#[path = "../../guest-agent/src/cmdline.rs"]
mod cmdline;

fuzz_target!(|data: &[u8]| {
    let Ok(line) = std::str::from_utf8(data) else {
        return;
    };
    command_line(line);
    identity(line);
});

fn command_line(line: &str) {
    let parsed = GuestCmdline::parse(line);
    if let Ok(c) = &parsed {
        let again = GuestCmdline::parse(&c.compose());
        assert_eq!(again.as_ref(), Ok(c), "compose of {c:?} does not parse back");
    }
    match cmdline::BootConfig::parse(line) {
        Ok(boot) => {
            let c = parsed.expect("the agent accepted what the contract refuses");
            assert_eq!((&boot.channel, &boot.user), (&c.channel, &c.user));
        }
        Err(cmdline::BootConfigError::Cmdline(err)) => {
            assert_eq!(parsed.err(), Some(err), "the agent and the contract disagree");
        }
        Err(_) => unreachable!("the command line carries no key"),
    }
}

fn identity(line: &str) {
    let parsed = Identity::parse(line);
    if let Ok(id) = &parsed {
        let again = Identity::parse(&id.line());
        assert_eq!(again.as_ref(), Ok(id), "the line of {id:?} does not parse back");
    }
    match cmdline::JobIdentity::parse(line) {
        Ok(job) => {
            let id = parsed.expect("the agent accepted what the contract refuses");
            assert_eq!((&job.hostname, job.seed), (&id.hostname, id.seed));
            assert_eq!(u64::try_from(job.time).ok(), Some(id.time));
        }
        Err(cmdline::BootConfigError::Cmdline(err)) => {
            assert_eq!(parsed.err(), Some(err), "the agent and the contract disagree");
        }
        Err(_) => assert!(parsed.is_ok(), "a key error for a line the contract refuses"),
    }
}
