//! The host CPU: its clock, for guests that cannot calibrate their TSC,
//! and what a KVM guest's saved state depends on.

use std::path::Path;

/// The host's TSC frequency in kHz, from `/proc/cpuinfo`'s `cpu MHz`
/// (the nominal frequency on hosts with a constant TSC). A guest on QEMU's
/// microvm, which has no PIT to calibrate against, needs it as
/// `tsc_early_khz=`; a wrong value makes the guest clock run fast or slow.
pub fn tsc_khz() -> Option<u64> {
    tsc_khz_from(&std::fs::read_to_string(Path::new("/proc/cpuinfo")).ok()?)
}

fn tsc_khz_from(cpuinfo: &str) -> Option<u64> {
    let mhz: f64 = cpuinfo
        .lines()
        .find(|l| l.starts_with("cpu MHz"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse()
        .ok()?;
    (mhz > 0.0).then(|| (mhz * 1000.0).round() as u64)
}

/// What a KVM guest's saved state depends on: the host CPU's vendor,
/// family, model, stepping and name, and a digest of its feature flags (a
/// guest runs with `-cpu host`, so a restore on a CPU with other features
/// may fail or crash the guest). `None` where `/proc/cpuinfo` says none.
pub fn cpu_identity() -> Option<String> {
    cpu_identity_from(&std::fs::read_to_string(Path::new("/proc/cpuinfo")).ok()?)
}

fn cpu_identity_from(cpuinfo: &str) -> Option<String> {
    // The first processor's block: a host's processors are one model.
    let first = cpuinfo.split("\n\n").next()?;
    let field = |name: &str| {
        first.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == name).then(|| v.trim())
        })
    };
    let flags = field("flags")?;
    let mut sorted: Vec<&str> = flags.split_whitespace().collect();
    sorted.sort_unstable();
    use sha2::Digest;
    let digest = sha2::Sha256::digest(sorted.join(" ").as_bytes());
    Some(format!(
        "{} {}/{}/{} {} (flags {:02x}{:02x}{:02x}{:02x})",
        field("vendor_id")?,
        field("cpu family")?,
        field("model")?,
        field("stepping").unwrap_or("?"),
        field("model name").unwrap_or("?"),
        digest[0],
        digest[1],
        digest[2],
        digest[3]
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cpu_is_its_model_and_its_flags() {
        let info = "processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 143\n\
                    model name\t: Intel Xeon\nstepping\t: 8\nflags\t\t: fpu sse avx\n\n\
                    processor\t: 1\nvendor_id\t: Other\nflags\t\t: fpu\n";
        let id = cpu_identity_from(info).unwrap();
        assert!(
            id.starts_with("GenuineIntel 6/143/8 Intel Xeon (flags "),
            "{id}"
        );
        // The flags' order does not matter; one flag more does.
        let same = info.replace("fpu sse avx", "avx fpu sse");
        assert_eq!(cpu_identity_from(&same).unwrap(), id);
        let more = info.replace("fpu sse avx", "fpu sse avx avx512f");
        assert_ne!(cpu_identity_from(&more).unwrap(), id);
        assert_eq!(cpu_identity_from("processor : 0\n"), None);
    }

    #[test]
    fn this_host_has_an_identity() {
        assert!(cpu_identity().is_some());
    }

    #[test]
    fn parses_cpu_mhz() {
        let info = "processor\t: 0\nmodel name\t: X\ncpu MHz\t\t: 2499.998\ncache size\t: 1 KB\n";
        assert_eq!(tsc_khz_from(info), Some(2_499_998));
        assert_eq!(tsc_khz_from("processor : 0\n"), None);
        assert_eq!(tsc_khz_from("cpu MHz : 0.000\n"), None);
    }

    #[test]
    fn this_host_reports_a_frequency() {
        assert!(
            tsc_khz().is_some_and(|k| k > 100_000),
            "x86 hosts list cpu MHz in /proc/cpuinfo"
        );
    }
}
