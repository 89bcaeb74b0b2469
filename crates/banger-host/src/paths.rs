//! Where the probes look for the kernel's view of the host.

use std::path::{Path, PathBuf};

/// Roots of the kernel interfaces the probes read. [`HostPaths::real`] points at the live
/// host; [`HostPaths::under`] points at a fake tree so unit tests run anywhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPaths {
    /// sysfs, normally `/sys`.
    pub sys: PathBuf,
    /// devtmpfs, normally `/dev`.
    pub dev: PathBuf,
    /// procfs, normally `/proc`.
    pub proc: PathBuf,
    /// The running kernel's module directory, normally `/lib/modules/$(uname -r)`.
    pub modules: PathBuf,
}

impl HostPaths {
    /// The live host's paths.
    pub fn real() -> Self {
        let release = rustix::system::uname()
            .release()
            .to_string_lossy()
            .into_owned();
        Self {
            sys: PathBuf::from("/sys"),
            dev: PathBuf::from("/dev"),
            proc: PathBuf::from("/proc"),
            modules: Path::new("/lib/modules").join(release),
        }
    }

    /// `root/sys`, `root/dev`, `root/proc` and `root/modules`.
    pub fn under(root: &Path) -> Self {
        Self {
            sys: root.join("sys"),
            dev: root.join("dev"),
            proc: root.join("proc"),
            modules: root.join("modules"),
        }
    }
}
