//! Host capability probes: what `banger doctor` reports and what the daemon consults to pick
//! a VMM and an accelerator.
//!
//! Every probe only reads: files under `/sys`, `/proc` and `/lib/modules`, the existence of
//! device nodes, `statvfs`, and opening `/dev/kvm` (which creates no VM). Nothing is loaded
//! or executed; the one write is the reflink probe's two small temporary files in banger's
//! own state directory, removed at once. `doctor` never changes the host. (The daemon also
//! records its root-disk choice there, which `doctor` reads.)

mod binary;
mod checks;
mod cpu;
mod disk;
mod kvm;
mod memory;
mod paths;

pub use binary::find_binary;
pub use checks::{
    Check, CheckStatus, DISK_FAIL_BELOW, DISK_WARN_BELOW, DaemonFacts, DnsServer, DoctorInputs,
    WebUi, disk_status, dns_check, doctor_report, run_checks, vhost_vsock_usable, wire_report,
};
pub use cpu::{cpu_identity, tsc_khz};
pub use disk::{Copied, RootDiskStrategy, clone_or_copy, device_mapper};
pub use kvm::{
    Accel, AccelError, AccelSetting, KvmProbe, KvmStatus, ParseAccelError, current_boot_id,
    effective_accel, kvm_status, kvm_status_at,
};
pub use memory::memory_mib;
pub use paths::HostPaths;

/// A test seam inside a privileged method, called with the method's name
/// where the method has done part of its work (a tap made but not yet on
/// its bridge; loop devices attached but no snapshot yet). `banger-helper`
/// sets one from `BANGER_HELPER_FAULT` that holds the method there, so a
/// test can kill the helper exactly at that point.
#[derive(Clone)]
pub struct PausePoint(pub std::sync::Arc<dyn Fn(&'static str) -> PauseFuture + Send + Sync>);

/// What a [`PausePoint`] returns: done when the method may go on.
pub type PauseFuture = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

impl PausePoint {
    /// Hold `method` here if the seam says so.
    pub async fn at(&self, method: &'static str) {
        (self.0)(method).await;
    }
}

impl std::fmt::Debug for PausePoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PausePoint")
    }
}

/// A privileged host operation failed (a netlink or nftables call, a loop
/// or device-mapper ioctl); the source says why. The one error type of
/// `banger-net`'s and `banger-disk`'s host primitives.
#[derive(Debug, thiserror::Error)]
#[error("{op}")]
pub struct HostError {
    /// What was being done, e.g. `cannot create tap bg-t1`.
    pub op: String,
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

impl HostError {
    pub fn new(
        op: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        HostError {
            op: op.into(),
            source: source.into(),
        }
    }
}
