//! `vm run --timings`: when the vCPUs start, on CLOCK_MONOTONIC, for `vmfarm bench boot` to set
//! against the moment it started the process.

/// The stderr line's prefix; the value follows as `monotonic_ns=N`.
pub const VCPUS_START: &str = "vmfarm vm run: timing vcpus-start";

/// The stderr line's prefix for a restored VM: how long the restore took and where it went.
pub const RESTORED: &str = "vmfarm vm run: timing restored";

/// CLOCK_MONOTONIC in nanoseconds: the same clock in every process of this host.
pub fn monotonic_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into `now`, which lives for the whole call.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    debug_assert_eq!(rc, 0, "CLOCK_MONOTONIC is always there on Linux");
    u64::try_from(now.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(now.tv_nsec).unwrap_or(0)
}

/// The `--timings` line for the vCPUs starting now.
pub fn vcpus_start_line() -> String {
    format!("{VCPUS_START} monotonic_ns={}", monotonic_ns())
}

/// The monotonic time in a `--timings` line, if `line` is one.
pub fn parse_vcpus_start(line: &str) -> Option<u64> {
    line.strip_prefix(VCPUS_START)?
        .trim()
        .strip_prefix("monotonic_ns=")?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_the_line_reads_back_and_the_clock_moves_forward() {
        let before = monotonic_ns();
        let line = vcpus_start_line();
        let at = parse_vcpus_start(&line).expect("its own line parses");
        assert!(at >= before && monotonic_ns() >= at, "{before} {at}");
        assert_eq!(
            parse_vcpus_start("vmfarm vm run: timing vcpus-start monotonic_ns=x"),
            None
        );
        assert_eq!(parse_vcpus_start("VM built"), None);
    }
}
