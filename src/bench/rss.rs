//! The memory a VMM process holds besides its guest's RAM, from /proc/PID/smaps.

use anyhow::{Context, bail};

/// Resident memory outside the guest RAM mapping, in KiB: all of it, and the anonymous part
/// (the rest is file pages — the binary and its libraries — which every VMM process of the host
/// shares).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Outside {
    pub rss_kib: u64,
    pub anon_kib: u64,
}

impl Outside {
    /// The larger of each figure.
    pub fn max(self, other: Outside) -> Outside {
        Outside {
            rss_kib: self.rss_kib.max(other.rss_kib),
            anon_kib: self.anon_kib.max(other.anon_kib),
        }
    }
}

/// Process `pid`'s resident memory outside its guest RAM mapping. The guest RAM is the largest
/// mapping, which must be at least `guest_bytes` long.
pub fn outside_guest_ram(pid: u32, guest_bytes: u64) -> anyhow::Result<Outside> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))
        .with_context(|| format!("reading /proc/{pid}/smaps"))?;
    from_smaps(&smaps, guest_bytes)
}

fn from_smaps(smaps: &str, guest_bytes: u64) -> anyhow::Result<Outside> {
    struct Mapping {
        size: u64,
        rss_kib: u64,
        anon_kib: u64,
    }
    let mut maps: Vec<Mapping> = Vec::new();
    for line in smaps.lines() {
        if let Some(size) = mapping_size(line) {
            maps.push(Mapping {
                size,
                rss_kib: 0,
                anon_kib: 0,
            });
        } else if let Some(last) = maps.last_mut() {
            if let Some(kib) = kib_field(line, "Rss:") {
                last.rss_kib = kib;
            } else if let Some(kib) = kib_field(line, "Anonymous:") {
                last.anon_kib = kib;
            }
        }
    }
    let Some(guest) = maps.iter().max_by_key(|m| m.size) else {
        bail!("no mappings in smaps");
    };
    if guest.size < guest_bytes {
        bail!(
            "no mapping as large as the guest's {guest_bytes} bytes of RAM (largest: {})",
            guest.size
        );
    }
    Ok(Outside {
        rss_kib: maps.iter().map(|m| m.rss_kib).sum::<u64>() - guest.rss_kib,
        anon_kib: maps.iter().map(|m| m.anon_kib).sum::<u64>() - guest.anon_kib,
    })
}

/// `NAME   123 kB` -> 123.
fn kib_field(line: &str, name: &str) -> Option<u64> {
    line.strip_prefix(name)?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()
}

/// A mapping's header line (`start-end perms offset dev inode [path]`) -> its length.
fn mapping_size(line: &str) -> Option<u64> {
    let range = line.split_whitespace().next()?;
    let (start, end) = range.split_once('-')?;
    let start = u64::from_str_radix(start, 16).ok()?;
    let end = u64::from_str_radix(end, 16).ok()?;
    end.checked_sub(start)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
55d0c0000000-55d0c0200000 r-xp 00000000 fe:01 131 /usr/bin/vmm
Size:               2048 kB
Rss:                1200 kB
Pss:                1200 kB
Anonymous:             0 kB
7f0000000000-7f0020000000 rw-p 00000000 00:00 0
Size:             524288 kB
Rss:              100000 kB
Anonymous:        100000 kB
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                          [stack]
Size:                132 kB
Rss:                  24 kB
Anonymous:            24 kB
";

    #[test]
    fn test_guest_ram_is_left_out() {
        let outside = from_smaps(SMAPS, 512 << 20).unwrap();
        assert_eq!(
            outside,
            Outside {
                rss_kib: 1224,
                anon_kib: 24
            }
        );
        let bigger = outside.max(Outside {
            rss_kib: 1000,
            anon_kib: 30,
        });
        assert_eq!(
            bigger,
            Outside {
                rss_kib: 1224,
                anon_kib: 30
            }
        );
        let err = from_smaps(SMAPS, 1 << 30).unwrap_err();
        assert!(err.to_string().contains("no mapping as large"), "{err}");
        assert!(from_smaps("", 1).is_err());
    }
}
