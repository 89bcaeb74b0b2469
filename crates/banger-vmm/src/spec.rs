use std::path::PathBuf;

use banger_host::Accel;

/// Everything a driver needs to start one VM. Built by the daemon's VM
/// service from the VM's durable record, its image and its leases.
#[derive(Debug, Clone)]
pub struct LaunchSpec {
    pub id: String,
    pub name: String,
    /// The VM's directory: sockets, logs and handles.json go here.
    pub dir: PathBuf,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub accel: Accel,
    /// Kernel: an ELF vmlinux (PVH) for both VMMs.
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// The guest's own kernel arguments; each driver adds its own (how
    /// the agent's channel is carried, reboot and clock quirks).
    pub cmdline: String,
    /// `/dev/vda` first (root), then `/dev/vdb` (work), in order.
    pub disks: Vec<DiskSpec>,
    pub net: Option<NetSpec>,
    /// Guest CID for vsock (Firecracker, or QEMU with vhost-vsock).
    pub vsock_cid: Option<u32>,
    /// Restore: the VMM starts waiting for a saved state (QEMU's `-incoming
    /// defer`) instead of booting the kernel; the caller then loads it.
    pub incoming: bool,
    /// Where QEMU keeps the guest's RAM (Firecracker keeps its own).
    pub memory: GuestMemory,
}

/// Where a QEMU guest's RAM lives (a memory backend named `ram0`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestMemory {
    /// A memfd the driver makes and QEMU maps shared (as a file, through
    /// `/dev/fd/N`, so that migration knows it can skip it): a snapshot
    /// copies the RAM out itself while the vCPUs are paused, and QEMU's
    /// state stream carries the devices only. A memfd, unlike a file in
    /// `/dev/shm`, has no size limit of its own, and goes when QEMU does.
    Shared,
    /// A snapshot's memory file, mapped private: each page is read from the
    /// file, through the page cache every VM restored from it shares, until
    /// the guest writes it.
    Snapshot(PathBuf),
    /// Anonymous RAM as the backend `ram0`: for restores of snapshots
    /// whose state stream carries it (snapshots of restored VMs).
    Private,
    /// QEMU's own RAM (no backend object): for restores of snapshots whose
    /// state stream carries the RAM, taken before guest RAM was `Shared`.
    Default,
}

impl LaunchSpec {
    pub fn console_log(&self) -> PathBuf {
        self.dir.join("console.log")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskFormat {
    Raw,
    Qcow2,
}

#[derive(Debug, Clone)]
pub struct DiskSpec {
    pub path: PathBuf,
    pub format: DiskFormat,
    pub read_only: bool,
}

#[derive(Debug, Clone)]
pub struct NetSpec {
    /// A TAP device the VMM opens (already attached to the bridge).
    pub tap: String,
    pub mac: String,
}
