//! banger's device-mapper snapshot root disks.
//!
//! A VM's root disk is a dm `snapshot` named `bg-<vm id>`: its origin is a
//! read-only loop device over the image's `rootfs.ext4`, its exception store
//! a loop device over the VM's sparse `root.cow`. Each VM gets its own two
//! loop devices (the kernel shares the rootfs's page cache between them), so
//! tearing one VM down never touches another's devices and the helper keeps
//! no reference counts.
//!
//! - **Helper side** ([`service::DiskService`]): the `disk.*` methods of
//!   `banger-helper`. Names and paths are checked against what banger owns
//!   ([`names`]) before anything happens; a create undoes its own partial
//!   work. The privileged primitives sit behind [`host::HostDisk`]:
//!   [`linux::LinuxHostDisk`] does them for real (`losetup`, `dmsetup`,
//!   sysfs), [`recording::RecordingHostDisk`] simulates them for tests that
//!   run without root or device-mapper.
//! - **Daemon side**: [`cow_size`] and [`snapshot_name`], shared so that both
//!   sides agree.

pub mod host;
pub mod linux;
pub mod names;
pub mod recording;
pub mod service;

pub use host::{DmDevice, HostDisk, HostError, LoopDevice};
pub use linux::LinuxHostDisk;
pub use service::{DiskError, DiskService};

/// The dm device name of VM `vm_id` (lowercase hex).
pub fn snapshot_name(vm_id: &str) -> String {
    format!("{}{vm_id}", names::DM_PREFIX)
}

/// Size of a VM's COW store over an origin of `origin_bytes`: room for
/// every origin chunk to be written once, plus the exception metadata (16
/// bytes per 4 KiB chunk, i.e. 1/256, doubled) and the header, rounded up
/// to 1 MiB. The file is sparse: only what the guest writes takes space. A
/// snapshot whose store fills up becomes invalid, so it must never be
/// smaller than this.
pub fn cow_size(origin_bytes: u64) -> u64 {
    const MIB: u64 = 1 << 20;
    let want = origin_bytes + origin_bytes / 128 + MIB;
    want.div_ceil(MIB) * MIB
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cow_store_holds_a_full_rewrite() {
        let origin = 2u64 << 30;
        let cow = cow_size(origin);
        assert!(cow >= origin + origin / 256 + 4096);
        assert_eq!(cow % (1 << 20), 0);
        assert_eq!(cow_size(0), 1 << 20);
        assert_eq!(snapshot_name("0123abcd"), "bg-0123abcd");
    }
}
