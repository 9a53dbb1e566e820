//! The memory a VMM process holds besides its guest's RAM, from /proc/PID/smaps.

use anyhow::{Context, bail};

/// Process `pid`'s resident memory outside its guest RAM mapping, in KiB. The guest RAM is the
/// largest mapping, which must be at least `guest_bytes` long.
pub fn outside_guest_ram_kib(pid: u32, guest_bytes: u64) -> anyhow::Result<u64> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))
        .with_context(|| format!("reading /proc/{pid}/smaps"))?;
    from_smaps(&smaps, guest_bytes)
}

fn from_smaps(smaps: &str, guest_bytes: u64) -> anyhow::Result<u64> {
    // (mapping size in bytes, its Rss in KiB), one per mapping.
    let mut maps: Vec<(u64, u64)> = Vec::new();
    for line in smaps.lines() {
        if let Some(rss) = kib_field(line, "Rss:") {
            if let Some(last) = maps.last_mut() {
                last.1 = rss;
            }
        } else if let Some(size) = mapping_size(line) {
            maps.push((size, 0));
        }
    }
    let total: u64 = maps.iter().map(|m| m.1).sum();
    let Some(&(size, guest_rss)) = maps.iter().max_by_key(|m| m.0) else {
        bail!("no mappings in smaps");
    };
    if size < guest_bytes {
        bail!("no mapping as large as the guest's {guest_bytes} bytes of RAM (largest: {size})");
    }
    Ok(total - guest_rss)
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
7f0000000000-7f0020000000 rw-p 00000000 00:00 0
Size:             524288 kB
Rss:              100000 kB
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                          [stack]
Size:                132 kB
Rss:                  24 kB
";

    #[test]
    fn test_guest_ram_is_left_out() {
        assert_eq!(from_smaps(SMAPS, 512 << 20).unwrap(), 1224);
        let err = from_smaps(SMAPS, 1 << 30).unwrap_err();
        assert!(err.to_string().contains("no mapping as large"), "{err}");
        assert!(from_smaps("", 1).is_err());
    }
}
