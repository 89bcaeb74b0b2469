//! The host CPU's clock, for guests that cannot calibrate their TSC.

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

#[cfg(test)]
mod tests {
    use super::*;

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
