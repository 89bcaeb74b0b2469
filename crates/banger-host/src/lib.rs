//! Host capability probes: what `banger doctor` reports and what the daemon consults to pick
//! a VMM and an accelerator.
//!
//! Every probe only reads: files under `/sys`, `/proc` and `/lib/modules`, the existence of
//! device nodes, `statvfs`, and opening `/dev/kvm` (which creates no VM). Nothing is loaded,
//! written or executed, so `doctor` never changes the host.

mod binary;
mod checks;
mod cpu;
mod kvm;
mod paths;

pub use binary::find_binary;
pub use checks::{
    Check, CheckStatus, DISK_FAIL_BELOW, DISK_WARN_BELOW, DnsServer, DoctorInputs, disk_status,
    dns_check, run_checks,
};
pub use cpu::tsc_khz;
pub use kvm::{
    Accel, AccelError, AccelSetting, KvmStatus, ParseAccelError, effective_accel, kvm_status,
    kvm_status_at,
};
pub use paths::HostPaths;
