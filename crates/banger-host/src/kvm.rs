//! Whether KVM can run a stock guest kernel, and which accelerator the daemon should use.

use std::fmt;
use std::fs::OpenOptions;
use std::io::ErrorKind;

use serde::{Deserialize, Serialize};

use crate::HostPaths;

/// What the host's KVM can do for a stock (non-PVM) guest kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvmStatus {
    /// `/dev/kvm` opens read-write and is hardware KVM.
    Usable,
    /// KVM is provided by `kvm_pvm` (Pagetable-based Virtual Machine): only a PVM-enabled
    /// guest kernel runs under it, stock kernels hang or die with emulation failures.
    Pvm,
    /// No `/dev/kvm`.
    Missing,
    /// `/dev/kvm` exists but cannot be opened read-write; the text says why.
    NoAccess(String),
}

impl KvmStatus {
    pub fn is_usable(&self) -> bool {
        matches!(self, Self::Usable)
    }
}

impl fmt::Display for KvmStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Usable => f.write_str("KVM is usable"),
            Self::Pvm => f.write_str("KVM is PVM (kvm_pvm): stock kernels can't run under it"),
            Self::Missing => f.write_str("/dev/kvm is missing"),
            Self::NoAccess(why) => f.write_str(why),
        }
    }
}

/// Probes the live host's KVM. Opens `/dev/kvm` and closes it again; creates no VM.
pub fn kvm_status() -> KvmStatus {
    kvm_status_at(&HostPaths::real())
}

/// [`kvm_status`] against the given paths.
pub fn kvm_status_at(paths: &HostPaths) -> KvmStatus {
    // kvm_pvm registers itself as the KVM vendor module and serves /dev/kvm, so a present
    // module settles it before /dev/kvm is looked at.
    if paths.sys.join("module/kvm_pvm").exists() {
        return KvmStatus::Pvm;
    }
    let dev_kvm = paths.dev.join("kvm");
    match OpenOptions::new().read(true).write(true).open(&dev_kvm) {
        Ok(_) => KvmStatus::Usable,
        Err(e) if e.kind() == ErrorKind::NotFound => KvmStatus::Missing,
        Err(e) => KvmStatus::NoAccess(format!("cannot open {} read-write: {e}", dev_kvm.display())),
    }
}

pub use banger_config::{AccelSetting, ParseAccelError};

/// The outcome of a test boot under KVM (`accel = "auto"` on a host whose
/// KVM looks usable), kept for the rest of the host's boot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KvmProbe {
    /// `/proc/sys/kernel/random/boot_id` when it ran: a reboot probes again.
    pub boot_id: String,
    pub usable: bool,
    /// How long the boot took, or why it failed.
    pub detail: String,
}

impl KvmProbe {
    pub const FILE: &'static str = "kvm-probe.json";

    /// The cached outcome, if it is from this boot of the host.
    pub fn load(state_dir: &std::path::Path) -> Option<KvmProbe> {
        let text = std::fs::read_to_string(state_dir.join(Self::FILE)).ok()?;
        let probe: KvmProbe = serde_json::from_str(&text).ok()?;
        (Some(&probe.boot_id) == current_boot_id().as_ref()).then_some(probe)
    }

    pub fn save(&self, state_dir: &std::path::Path) -> std::io::Result<()> {
        let text = serde_json::to_string_pretty(self).map_err(std::io::Error::other)?;
        let tmp = state_dir.join(format!("{}.tmp", Self::FILE));
        std::fs::write(&tmp, text)?;
        std::fs::rename(tmp, state_dir.join(Self::FILE))
    }
}

/// This boot of the host.
pub fn current_boot_id() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|s| s.trim().to_string())
}

/// The accelerator a VM actually runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// Hardware virtualization through `/dev/kvm`.
    Kvm,
    /// QEMU's software emulation.
    Tcg,
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Kvm => "kvm",
            Self::Tcg => "tcg",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AccelError {
    #[error("accel = \"kvm\" is set but {reason}; set accel = \"auto\" or \"tcg\" to use TCG")]
    KvmUnusable { reason: String },
}

/// Resolves the configured accelerator against what the host offers.
pub fn effective_accel(setting: AccelSetting, kvm: &KvmStatus) -> Result<Accel, AccelError> {
    match (setting, kvm.is_usable()) {
        (AccelSetting::Tcg, _) | (AccelSetting::Auto, false) => Ok(Accel::Tcg),
        (AccelSetting::Kvm | AccelSetting::Auto, true) => Ok(Accel::Kvm),
        (AccelSetting::Kvm, false) => Err(AccelError::KvmUnusable {
            reason: kvm.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn fake_host() -> (tempfile::TempDir, HostPaths) {
        let tmp = tempfile::tempdir().unwrap();
        let paths = HostPaths::under(tmp.path());
        fs::create_dir_all(paths.sys.join("module/kvm")).unwrap();
        fs::create_dir_all(&paths.dev).unwrap();
        (tmp, paths)
    }

    #[test]
    fn pvm_detected() {
        let (_tmp, paths) = fake_host();
        fs::write(paths.dev.join("kvm"), "").unwrap();
        fs::create_dir_all(paths.sys.join("module/kvm_pvm")).unwrap();
        assert_eq!(kvm_status_at(&paths), KvmStatus::Pvm);
    }

    #[test]
    fn kvm_usable() {
        let (_tmp, paths) = fake_host();
        fs::create_dir_all(paths.sys.join("module/kvm_intel")).unwrap();
        fs::write(paths.dev.join("kvm"), "").unwrap();
        assert_eq!(kvm_status_at(&paths), KvmStatus::Usable);
    }

    #[test]
    fn no_dev_kvm() {
        let (_tmp, paths) = fake_host();
        assert_eq!(kvm_status_at(&paths), KvmStatus::Missing);
    }

    #[test]
    fn dev_kvm_not_openable() {
        let (_tmp, paths) = fake_host();
        // A directory can't be opened for writing, even by root.
        fs::create_dir_all(paths.dev.join("kvm")).unwrap();
        match kvm_status_at(&paths) {
            KvmStatus::NoAccess(why) => assert!(why.contains("read-write"), "{why}"),
            other => panic!("expected NoAccess, got {other:?}"),
        }
    }

    #[test]
    fn forced_kvm_on_pvm_errors() {
        let err = effective_accel(AccelSetting::Kvm, &KvmStatus::Pvm).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("kvm_pvm"), "{msg}");
        assert!(msg.contains("accel = \"auto\" or \"tcg\""), "{msg}");
    }

    #[test]
    fn accel_resolution() {
        use AccelSetting as S;
        let no_access = KvmStatus::NoAccess("denied".into());
        assert_eq!(effective_accel(S::Auto, &KvmStatus::Usable), Ok(Accel::Kvm));
        assert_eq!(effective_accel(S::Kvm, &KvmStatus::Usable), Ok(Accel::Kvm));
        assert_eq!(effective_accel(S::Tcg, &KvmStatus::Usable), Ok(Accel::Tcg));
        for kvm in [KvmStatus::Pvm, KvmStatus::Missing, no_access] {
            assert_eq!(effective_accel(S::Auto, &kvm), Ok(Accel::Tcg));
            assert_eq!(effective_accel(S::Tcg, &kvm), Ok(Accel::Tcg));
            assert!(effective_accel(S::Kvm, &kvm).is_err());
        }
        let missing = effective_accel(S::Kvm, &KvmStatus::Missing).unwrap_err();
        assert!(missing.to_string().contains("/dev/kvm is missing"));
    }

    #[test]
    fn accel_setting_parses_and_serializes() {
        for (text, setting) in [
            ("auto", AccelSetting::Auto),
            ("kvm", AccelSetting::Kvm),
            ("tcg", AccelSetting::Tcg),
        ] {
            assert_eq!(text.parse::<AccelSetting>(), Ok(setting));
            assert_eq!(setting.to_string(), text);
            assert_eq!(
                serde_json::to_string(&setting).unwrap(),
                format!("\"{text}\"")
            );
        }
        assert!("KVM".parse::<AccelSetting>().is_err());
        assert_eq!(serde_json::to_string(&Accel::Tcg).unwrap(), "\"tcg\"");
    }
}
