//! The host's memory, for what a VM may be given.

/// The host's RAM in MiB (`MemTotal` of `/proc/meminfo`); `None` where it
/// cannot be read.
pub fn memory_mib() -> Option<u64> {
    memory_mib_from(&std::fs::read_to_string("/proc/meminfo").ok()?)
}

fn memory_mib_from(meminfo: &str) -> Option<u64> {
    let kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()?;
    Some(kib / 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memtotal_is_read_in_mib() {
        let meminfo = "MemTotal:       24592420 kB\nMemFree:        1000 kB\n";
        assert_eq!(memory_mib_from(meminfo), Some(24016));
        assert_eq!(memory_mib_from("MemFree: 1 kB\n"), None);
        assert_eq!(memory_mib_from("MemTotal: many kB\n"), None);
        assert!(memory_mib().is_some_and(|m| m > 0), "this host's");
    }
}
