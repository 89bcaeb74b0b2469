//! VM disks, every strategy in one place: the root disk over the image's
//! read-only rootfs and the work disk copied from the image's seed.
//!
//! The strategy is decided once at daemon start ([`decide`]), best first:
//!
//! - **device-mapper snapshot** (`root.cow`): the VM keeps its writes in a
//!   sparse `<vm>/root.cow` (made here by the daemon, which owns the VM
//!   dir); the root helper builds `bg-<vm id>` over the image's rootfs and
//!   that file and gives the node to our uid, and the VMM opens
//!   `/dev/mapper/bg-<vm id>` as a raw disk. The dm device lives only while
//!   the VM runs: stop removes it, start builds it again over the same
//!   `root.cow`, so the disk keeps its contents. The helper is reached
//!   through [`SnapshotHelper`] so that this logic is tested against
//!   `banger_disk`'s recording fake.
//! - **reflink clone** (`root.ext4`) where the state directory's filesystem
//!   has reflinks;
//! - else a **qcow2 overlay** (`root.qcow2`, QEMU) or a **sparse copy**
//!   (`root.ext4`, Firecracker, which takes raw disks only).
//!
//! The work disk is always a clone (or sparse copy) of the seed, its file
//! **grown** to the VM's size; the guest mounts it on `/root` and its agent
//! grows the filesystem online to fill the disk. The host never runs
//! e2fsprogs over a filesystem a guest has written. The host-side primitives (the reflink
//! probe, the in-process copy, the device-mapper check, the recorded choice
//! `banger doctor` reads) are `banger_host`'s.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use super::VmError;
use banger_host::RootDiskStrategy;
use banger_store::{Image, Vm, Vmm};
use banger_vmm::{DiskFormat, DiskSpec};
use banger_wire::helper::{
    DiskList, DiskListResult, DiskLoopDetach, DiskSnapshotCreate, DiskSnapshotRemove,
    LoopDetachParams, SnapshotCreateParams, SnapshotCreateResult, SnapshotRemoveParams,
};
use banger_wire::methods::Leak;
use banger_wire::{NoParams, OpId};
use tracing::{info, warn};

use crate::helper::{HelperError, HelperLink};

/// The VM's copy-on-write store; its presence marks a snapshot VM.
pub fn cow_path(vm_dir: &Path) -> PathBuf {
    vm_dir.join("root.cow")
}

/// The block device the VMM opens.
pub fn device_path(vm_id: &str) -> PathBuf {
    Path::new("/dev/mapper").join(banger_disk::snapshot_name(vm_id))
}

/// The helper's `disk.*` methods, as the daemon uses them.
pub trait SnapshotHelper {
    fn create(
        &self,
        op_id: &OpId,
        p: SnapshotCreateParams,
    ) -> impl Future<Output = Result<SnapshotCreateResult, HelperError>> + Send;
    /// True when there was a device to remove.
    fn remove(
        &self,
        op_id: &OpId,
        name: String,
    ) -> impl Future<Output = Result<bool, HelperError>> + Send;
    fn detach_loop(
        &self,
        op_id: &OpId,
        device: String,
    ) -> impl Future<Output = Result<bool, HelperError>> + Send;
    fn list(
        &self,
        op_id: &OpId,
    ) -> impl Future<Output = Result<DiskListResult, HelperError>> + Send;
}

impl SnapshotHelper for HelperLink {
    async fn create(
        &self,
        op_id: &OpId,
        p: SnapshotCreateParams,
    ) -> Result<SnapshotCreateResult, HelperError> {
        self.call::<DiskSnapshotCreate>(op_id, &p).await
    }
    async fn remove(&self, op_id: &OpId, name: String) -> Result<bool, HelperError> {
        self.call::<DiskSnapshotRemove>(op_id, &SnapshotRemoveParams { name })
            .await
            .map(|d| d.deleted)
    }
    async fn detach_loop(&self, op_id: &OpId, device: String) -> Result<bool, HelperError> {
        self.call::<DiskLoopDetach>(op_id, &LoopDetachParams { device })
            .await
            .map(|d| d.deleted)
    }
    async fn list(&self, op_id: &OpId) -> Result<DiskListResult, HelperError> {
        self.call::<DiskList>(op_id, &NoParams {}).await
    }
}

/// How root disks are made, decided once at daemon start: device-mapper
/// snapshots when the host and the helper can make them, else by a reflink
/// probe where the disks will live. Recorded in the state dir for
/// `banger doctor`.
pub async fn decide(helper: &HelperLink, state_dir: &Path) -> RootDiskStrategy {
    let vms_dir = state_dir.join("vms");
    let reflink_probe = || match RootDiskStrategy::probe(&vms_dir) {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, dir = %vms_dir.display(), "cannot probe for reflinks; using qcow2 overlays and copies");
            RootDiskStrategy::OverlayOrCopy
        }
    };
    let s = choose(
        helper,
        banger_host::device_mapper(),
        state_dir,
        reflink_probe,
    )
    .await;
    info!(strategy = ?s, "root disk strategy");
    if let Err(e) = s.save(state_dir) {
        warn!(error = %e, "cannot record the root disk strategy for banger doctor");
    }
    s
}

/// The daemon's root disk strategy: snapshots when the host has
/// device-mapper (`dm_host`, from [`banger_host::device_mapper`]) and the
/// helper can make them for files in `state_dir`; else `fallback` (the
/// reflink probe). The helper is asked only when the host side is there.
pub async fn choose<S: SnapshotHelper>(
    helper: &S,
    dm_host: Result<(), String>,
    state_dir: &Path,
    fallback: impl FnOnce() -> RootDiskStrategy,
) -> RootDiskStrategy {
    let why_not = match dm_host {
        Err(why) => why,
        Ok(()) => match helper.list(&OpId::mint()).await {
            Err(e) => format!("cannot ask banger-helper: {e}"),
            Ok(l) => match l.unavailable {
                Some(why) => format!("banger-helper: {why}"),
                None if serves(&l, state_dir) => {
                    info!(state_dir = %state_dir.display(), "root disks: device-mapper snapshots");
                    return RootDiskStrategy::DmSnapshot;
                }
                None => format!(
                    "banger-helper serves {:?}, not {}; restart it with --state-dir {}",
                    l.state_dirs,
                    state_dir.display(),
                    state_dir.display()
                ),
            },
        },
    };
    let s = fallback();
    info!(strategy = ?s, no_snapshots = %why_not, "root disks without device-mapper snapshots");
    s
}

/// Does the helper attach files under `state_dir`?
fn serves(l: &DiskListResult, state_dir: &Path) -> bool {
    let Ok(dir) = std::fs::canonicalize(state_dir) else {
        return false;
    };
    l.state_dirs.iter().any(|d| dir.starts_with(d))
}

/// Build the VM's snapshot: over its existing `root.cow` (a VM started
/// again keeps its disk), or over a new sparse one. A store made here is
/// removed again if the helper fails.
pub async fn attach<S: SnapshotHelper>(
    helper: &S,
    op_id: &OpId,
    vm_id: &str,
    vm_dir: &Path,
    rootfs: &Path,
) -> Result<PathBuf, VmError> {
    let cow = cow_path(vm_dir);
    let name = banger_disk::snapshot_name(vm_id);
    let made = if cow.exists() {
        // A snapshot a failed stop left would refuse the create; the VM is
        // not running, so nothing uses it.
        helper.remove(op_id, name.clone()).await?;
        false
    } else {
        let len = std::fs::metadata(rootfs)
            .map_err(|e| VmError::Failed(format!("{}: {e}", rootfs.display())))?
            .len();
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&cow)
            .and_then(|f| f.set_len(banger_disk::cow_size(len)))
            .map_err(|e| VmError::Failed(format!("cannot create {}: {e}", cow.display())))?;
        true
    };
    let p = SnapshotCreateParams {
        name,
        origin: rootfs.display().to_string(),
        cow: cow.display().to_string(),
    };
    match helper.create(op_id, p).await {
        Ok(r) => Ok(PathBuf::from(r.device)),
        Err(e) => {
            if made {
                let _ = std::fs::remove_file(&cow);
            }
            Err(e.into())
        }
    }
}

/// Remove the VM's snapshot, if it has one (`root.cow` in its dir).
pub async fn detach<S: SnapshotHelper>(helper: &S, op_id: &OpId, vm_id: &str, vm_dir: &Path) {
    if !cow_path(vm_dir).exists() {
        return;
    }
    let name = banger_disk::snapshot_name(vm_id);
    match helper.remove(op_id, name.clone()).await {
        Ok(true) => info!(vm = vm_id, dm = %name, "root disk snapshot removed"),
        Ok(false) => {}
        Err(e) => {
            warn!(vm = vm_id, dm = %name, error = %e, "cannot remove the root disk snapshot; banger gc will")
        }
    }
}

/// Banger's dm and loop devices that no VM explains: `live` are the ids of
/// VMs running or in the middle of an operation. A loop device under a
/// leaked snapshot goes with it; one under no dm device is a leak itself.
pub fn leaks(l: &DiskListResult, live: &HashSet<&str>) -> Vec<Leak> {
    let mut out = Vec::new();
    for s in &l.snapshots {
        let vm = s.name.strip_prefix(banger_disk::names::DM_PREFIX);
        if !vm.is_some_and(|id| live.contains(id)) {
            out.push(Leak {
                kind: "dm".into(),
                name: s.name.clone(),
                detail: format!(
                    "root disk snapshot over {}; no running VM uses it",
                    s.slaves.join(", ")
                ),
            });
        }
    }
    for lo in l.loops.iter().filter(|lo| lo.held_by.is_none()) {
        out.push(Leak {
            kind: "loop".into(),
            name: lo.device.clone(),
            detail: format!("loop device over {}; no snapshot uses it", lo.backing_file),
        });
    }
    out
}

/// Remove a `dm` or `loop` leak.
pub async fn remove_leak<S: SnapshotHelper>(
    helper: &S,
    op_id: &OpId,
    leak: &Leak,
) -> Result<(), String> {
    let r = match leak.kind.as_str() {
        "dm" => helper.remove(op_id, leak.name.clone()).await,
        "loop" => helper.detach_loop(op_id, leak.name.clone()).await,
        other => return Err(format!("{other} is not a disk leak")),
    };
    r.map(drop).map_err(|e| e.to_string())
}

/// The root disk of a new VM: a device-mapper snapshot where the host
/// and helper can make them, else a reflink clone where the state
/// directory has them (both raw); else a qcow2 overlay for QEMU and a
/// sparse copy for Firecracker, which takes raw disks only.
pub(super) fn new_root_disk(strategy: RootDiskStrategy, vmm: Vmm) -> RootDisk {
    match strategy {
        RootDiskStrategy::DmSnapshot => RootDisk::Snapshot,
        RootDiskStrategy::OverlayOrCopy if banger_vmm::takes_qcow2(vmm) => RootDisk::Qcow2,
        RootDiskStrategy::Reflink | RootDiskStrategy::OverlayOrCopy => RootDisk::Copy,
    }
}

/// How a VM's root disk is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum RootDisk {
    /// `root.qcow2`, an overlay over the image's rootfs.
    Qcow2,
    /// `root.ext4`, a reflink clone or sparse copy of the image's rootfs.
    Copy,
    /// `root.cow`, the store of the dm snapshot `bg-<vm id>` the helper
    /// builds over the image's rootfs while the VM runs.
    Snapshot,
}

/// How an existing VM's root disk is stored, whatever the strategy was
/// when it was made.
pub(super) fn existing_root_disk(vm_dir: &Path) -> RootDisk {
    if cow_path(vm_dir).exists() {
        RootDisk::Snapshot
    } else if vm_dir.join("root.qcow2").exists() {
        RootDisk::Qcow2
    } else {
        RootDisk::Copy
    }
}

/// What the VMM opens: a qcow2 file, or a raw file or block device.
pub(super) fn root_disk_spec(vm_id: &str, vm_dir: &Path, root: RootDisk) -> DiskSpec {
    let (path, format) = match root {
        RootDisk::Qcow2 => (vm_dir.join("root.qcow2"), DiskFormat::Qcow2),
        RootDisk::Copy => (vm_dir.join("root.ext4"), DiskFormat::Raw),
        RootDisk::Snapshot => (device_path(vm_id), DiskFormat::Raw),
    };
    DiskSpec {
        path,
        format,
        read_only: false,
    }
}

/// The work disk the VMM opens: `work.qcow2` (a restored VM's overlay over
/// its snapshot's) where there is one, else the raw `work.ext4`.
pub(super) fn work_disk_spec(vm_dir: &Path) -> DiskSpec {
    let overlay = vm_dir.join("work.qcow2");
    let (path, format) = if overlay.exists() {
        (overlay, DiskFormat::Qcow2)
    } else {
        (vm_dir.join("work.ext4"), DiskFormat::Raw)
    };
    DiskSpec {
        path,
        format,
        read_only: false,
    }
}

/// Grow a stopped VM's work disk to `mib`: its raw file, or a restored
/// VM's qcow2 overlay (`qemu-img resize`). The guest's agent grows the
/// filesystem at the next boot.
pub(super) async fn grow_work_disk(vm_dir: &Path, mib: u32) -> Result<(), VmError> {
    let disk = work_disk_spec(vm_dir);
    match disk.format {
        DiskFormat::Raw => grow_disk(&disk.path, mib),
        DiskFormat::Qcow2 => {
            let size = format!("{mib}M");
            let args: [&std::ffi::OsStr; 4] = [
                "resize".as_ref(),
                "-q".as_ref(),
                disk.path.as_os_str(),
                size.as_ref(),
            ];
            run("qemu-img", &args).await
        }
    }
}

/// A restored VM's disks: qcow2 overlays of its own (`root.qcow2`,
/// `work.qcow2`) over its snapshot's frozen root (`root_qcow2`: a qcow2
/// file, else raw) and work disks, which no VM ever writes. Firecracker
/// takes raw files only: its restores get copies (`root.ext4`,
/// `work.ext4`), reflinked where the filesystem can, else sparse.
pub(super) async fn make_restore_disks(
    vm: &Vm,
    vmm: Vmm,
    root: &Path,
    root_qcow2: bool,
    work: &Path,
) -> Result<(), VmError> {
    std::fs::create_dir_all(&vm.vm_dir)
        .map_err(|e| VmError::Failed(format!("cannot create {}: {e}", vm.vm_dir.display())))?;
    if !banger_vmm::takes_qcow2(vmm) {
        if root_qcow2 {
            return Err(VmError::Failed(format!(
                "{}: {vmm} takes raw disks only",
                root.display()
            )));
        }
        clone_or_copy(root, &vm.vm_dir.join("root.ext4")).await?;
        return clone_or_copy(work, &vm.vm_dir.join("work.ext4")).await;
    }
    let root_format = if root_qcow2 { "qcow2" } else { "raw" };
    for (base, format, overlay) in [
        (root, root_format, vm.vm_dir.join("root.qcow2")),
        (work, "raw", vm.vm_dir.join("work.qcow2")),
    ] {
        qcow2_over("create", base, format, &overlay).await?;
    }
    Ok(())
}

/// `qemu-img create` (a new qcow2 overlay) or `rebase` (an existing one
/// moved, safe mode: what differs between its old backing chain and the
/// new one is written into it) with `base` of `format` as its backing.
async fn qcow2_over(verb: &str, base: &Path, format: &str, overlay: &Path) -> Result<(), VmError> {
    let args: [&std::ffi::OsStr; 9] = [
        verb.as_ref(),
        "-q".as_ref(),
        "-f".as_ref(),
        "qcow2".as_ref(),
        "-F".as_ref(),
        format.as_ref(),
        "-b".as_ref(),
        base.as_os_str(),
        overlay.as_os_str(),
    ];
    run("qemu-img", &args).await
}

/// The VM's disks: its own copy-on-write view of the image's read-only
/// rootfs (a dm snapshot built by the helper; else a qcow2 overlay for
/// QEMU, and for Firecracker, which takes raw files only, a sparse copy —
/// reflinked where the filesystem can), and a work disk copied from the
/// image's seed and grown to the requested size.
pub(super) async fn make_disks(
    vm: &Vm,
    image: &Image,
    root_disk: RootDisk,
    helper: &HelperLink,
    op_id: &OpId,
) -> Result<(), VmError> {
    std::fs::create_dir_all(&vm.vm_dir)
        .map_err(|e| VmError::Failed(format!("cannot create {}: {e}", vm.vm_dir.display())))?;
    let root = root_disk_spec(&vm.id, &vm.vm_dir, root_disk).path;
    match root_disk {
        RootDisk::Snapshot => {
            attach(helper, op_id, &vm.id, &vm.vm_dir, &image.rootfs_path).await?;
        }
        RootDisk::Qcow2 => qcow2_over("create", &image.rootfs_path, "raw", &root).await?,
        RootDisk::Copy => clone_or_copy(&image.rootfs_path, &root).await?,
    }
    let seed = image
        .work_seed_path
        .as_ref()
        .ok_or_else(|| VmError::Failed(format!("image {} has no work-seed disk", image.name)))?;
    let work = vm.vm_dir.join("work.ext4");
    clone_or_copy(seed, &work).await?;
    grow_disk(&work, vm.disk_mib)
}

/// Grow an ext4 disk file to `mib` and its filesystem with it.
/// Grow the work disk's file (sparse) to `mib`. Its filesystem is grown
/// by the guest's agent at the next boot (online, `EXT4_IOC_RESIZE_FS`):
/// host e2fsprogs never parse what a guest wrote.
pub(super) fn grow_disk(disk: &Path, mib: u32) -> Result<(), VmError> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(disk)
        .map_err(|e| VmError::Failed(format!("{}: {e}", disk.display())))?;
    let want = u64::from(mib) * 1024 * 1024;
    if f.metadata().map(|m| m.len()).unwrap_or(0) < want {
        f.set_len(want)
            .map_err(|e| VmError::Failed(format!("cannot grow {}: {e}", disk.display())))?;
    }
    Ok(())
}

/// A restored VM's disks, as a snapshot of it keeps them: the copies of
/// its qcow2 overlays (`root`, `work`, taken while it was paused) made to
/// need nothing of the snapshot its VM came from, whose files they sit
/// on. The root becomes an overlay over the image's rootfs (`qemu-img
/// rebase` in safe mode writes into it what the old snapshot's root
/// changed) where that snapshot's root was one (`image_rootfs`), else a
/// raw file at `root_raw`; the work disk a raw file at `work_raw`. Both
/// copies are removed. Runs while the VM runs on: the copies are the
/// snapshot's own.
pub(super) async fn flatten_restored_disks(
    root: &Path,
    image_rootfs: Option<&Path>,
    root_raw: &Path,
    work: &Path,
    work_raw: &Path,
) -> Result<(), VmError> {
    match image_rootfs {
        Some(base) => qcow2_over("rebase", base, "raw", root).await?,
        None => {
            convert_to_raw(root, root_raw).await?;
            let _ = std::fs::remove_file(root);
        }
    }
    convert_to_raw(work, work_raw).await?;
    let _ = std::fs::remove_file(work);
    Ok(())
}

/// A qcow2 image and its backing chain as one sparse raw file.
async fn convert_to_raw(from: &Path, to: &Path) -> Result<(), VmError> {
    let args: [&std::ffi::OsStr; 8] = [
        "convert".as_ref(),
        "-q".as_ref(),
        "-f".as_ref(),
        "qcow2".as_ref(),
        "-O".as_ref(),
        "raw".as_ref(),
        from.as_os_str(),
        to.as_os_str(),
    ];
    run("qemu-img", &args).await
}

/// A reflink clone where the filesystem has them, else a copy that keeps
/// holes.
pub(super) async fn clone_or_copy(from: &Path, to: &Path) -> Result<(), VmError> {
    let (src, dst) = (from.to_owned(), to.to_owned());
    tokio::task::spawn_blocking(move || banger_host::clone_or_copy(&src, &dst))
        .await
        .map_err(|e| VmError::Failed(format!("copy task failed: {e}")))?
        .map(drop)
        .map_err(|e| {
            VmError::Failed(format!(
                "cannot copy {} to {}: {e}",
                from.display(),
                to.display()
            ))
        })
}

async fn run(program: &str, args: &[&std::ffi::OsStr]) -> Result<(), VmError> {
    let bin = banger_host::find_binary(program).unwrap_or_else(|| PathBuf::from(program));
    let out = tokio::process::Command::new(&bin)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|e| {
            VmError::Unavailable(format!("cannot run {program}: {e} (see banger doctor)"))
        })?;
    if !out.status.success() {
        return Err(VmError::Failed(format!(
            "{program} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use banger_disk::DiskService;
    use banger_disk::recording::{Call, RecordingHostDisk};
    use std::sync::Arc;

    /// The helper's own logic over the recording fake, called in-process
    /// with our uid, as the helper would see us.
    #[derive(Debug, Clone)]
    struct Fake(Arc<DiskService<RecordingHostDisk>>);

    fn rpc(e: banger_disk::DiskError) -> HelperError {
        HelperError::Refused {
            code: e.code(),
            message: e.to_string(),
        }
    }

    impl SnapshotHelper for Fake {
        async fn create(
            &self,
            _: &OpId,
            p: SnapshotCreateParams,
        ) -> Result<SnapshotCreateResult, HelperError> {
            let uid = rustix::process::getuid().as_raw();
            self.0.snapshot_create(&p, uid).await.map_err(rpc)
        }
        async fn remove(&self, _: &OpId, name: String) -> Result<bool, HelperError> {
            let p = SnapshotRemoveParams { name };
            let uid = rustix::process::getuid().as_raw();
            self.0
                .snapshot_remove(&p, uid)
                .await
                .map(|d| d.deleted)
                .map_err(rpc)
        }
        async fn detach_loop(&self, _: &OpId, device: String) -> Result<bool, HelperError> {
            let p = LoopDetachParams { device };
            let uid = rustix::process::getuid().as_raw();
            self.0
                .loop_detach(&p, uid)
                .await
                .map(|d| d.deleted)
                .map_err(rpc)
        }
        async fn list(&self, _: &OpId) -> Result<DiskListResult, HelperError> {
            self.0.list().await.map_err(rpc)
        }
    }

    struct Setup {
        _tmp: tempfile::TempDir,
        state: PathBuf,
        rootfs: PathBuf,
    }

    fn setup() -> Setup {
        let tmp = tempfile::tempdir().unwrap();
        let state = tmp.path().join("state");
        std::fs::create_dir_all(state.join("images/img1")).unwrap();
        std::fs::create_dir_all(state.join("vms/0a1b2c3d4e5f")).unwrap();
        let rootfs = state.join("images/img1/rootfs.ext4");
        std::fs::File::create(&rootfs)
            .unwrap()
            .set_len(64 << 20)
            .unwrap();
        Setup {
            _tmp: tmp,
            state,
            rootfs,
        }
    }

    fn fake(state_dirs: Vec<PathBuf>) -> Fake {
        Fake(Arc::new(DiskService::new(
            RecordingHostDisk::new(),
            state_dirs,
        )))
    }

    #[tokio::test]
    async fn snapshots_are_chosen_only_when_the_host_and_helper_can_make_them() {
        let s = setup();
        let fallback = || RootDiskStrategy::OverlayOrCopy;
        // No device-mapper on the host: the helper is not even asked.
        let h = fake(vec![s.state.clone()]);
        let got = choose(&h, Err("no /dev/mapper/control".into()), &s.state, fallback).await;
        assert_eq!(got, RootDiskStrategy::OverlayOrCopy);
        assert!(h.0.host().calls().is_empty());
        // The helper serves our state dir and has device-mapper.
        assert_eq!(
            choose(&h, Ok(()), &s.state, fallback).await,
            RootDiskStrategy::DmSnapshot
        );
        // A helper started for another state dir, or without one.
        let other = fake(vec![s.state.join("images")]);
        assert_eq!(
            choose(&other, Ok(()), &s.state, || RootDiskStrategy::Reflink).await,
            RootDiskStrategy::Reflink
        );
        assert_eq!(
            choose(&fake(vec![]), Ok(()), &s.state, fallback).await,
            RootDiskStrategy::OverlayOrCopy
        );
        // The helper's side lacks device-mapper.
        let missing = fake(vec![s.state.clone()]);
        missing.0.host().set_unavailable("dmsetup not found");
        assert_eq!(
            choose(&missing, Ok(()), &s.state, fallback).await,
            RootDiskStrategy::OverlayOrCopy
        );
        // A parent of the state dir served counts.
        let parent = fake(vec![s.state.parent().unwrap().to_path_buf()]);
        assert_eq!(
            choose(&parent, Ok(()), &s.state, fallback).await,
            RootDiskStrategy::DmSnapshot
        );
    }

    #[tokio::test]
    async fn a_vm_keeps_its_cow_store_across_stop_and_start() {
        let s = setup();
        let h = fake(vec![s.state.clone()]);
        let (id, dir) = ("0a1b2c3d4e5f", s.state.join("vms/0a1b2c3d4e5f"));
        let op = OpId::mint();
        let dev = attach(&h, &op, id, &dir, &s.rootfs).await.unwrap();
        assert_eq!(dev, device_path(id));
        assert_eq!(dev, Path::new("/dev/mapper/bg-0a1b2c3d4e5f"));
        let cow = cow_path(&dir);
        let meta = std::fs::metadata(&cow).unwrap();
        assert_eq!(meta.len(), banger_disk::cow_size(64 << 20));
        {
            use std::os::unix::fs::MetadataExt;
            assert!(meta.blocks() < 16, "the store is sparse");
        }
        let owner = h.0.host().dm("bg-0a1b2c3d4e5f").unwrap().owner;
        assert_eq!(owner, Some(rustix::process::getuid().as_raw()));
        // The guest wrote something; stop removes the devices, not the store.
        std::fs::write(&cow, b"exceptions").unwrap();
        std::fs::File::options()
            .write(true)
            .open(&cow)
            .unwrap()
            .set_len(banger_disk::cow_size(64 << 20))
            .unwrap();
        detach(&h, &op, id, &dir).await;
        assert!(h.0.host().dm_names().is_empty());
        assert!(h.0.host().loop_devices().is_empty());
        assert!(std::fs::read(&cow).unwrap().starts_with(b"exceptions"));
        // Start: the same store again.
        h.0.host().clear_calls();
        attach(&h, &op, id, &dir, &s.rootfs).await.unwrap();
        // Even when a stop failed to remove the snapshot.
        attach(&h, &op, id, &dir, &s.rootfs).await.unwrap();
        assert_eq!(h.0.host().loop_devices().len(), 2);
        assert!(std::fs::read(&cow).unwrap().starts_with(b"exceptions"));
        assert!(h.0.host().mutations().contains(&Call::LoopAttach {
            path: cow.canonicalize().unwrap(),
            read_only: false
        }));
        // A VM without a store (qcow2, reflink) is not the helper's business.
        h.0.host().clear_calls();
        detach(&h, &op, "ffff", &s.state.join("vms/none")).await;
        assert!(h.0.host().calls().is_empty());
    }

    #[tokio::test]
    async fn a_failed_attach_leaves_no_device_and_no_new_store() {
        let s = setup();
        let h = fake(vec![s.state.clone()]);
        let (id, dir) = ("0a1b2c3d4e5f", s.state.join("vms/0a1b2c3d4e5f"));
        for op in ["loop_attach", "dm_create", "dm_chown"] {
            h.0.host().fail_next(op);
            let e = attach(&h, &OpId::mint(), id, &dir, &s.rootfs)
                .await
                .unwrap_err();
            assert!(e.to_string().contains(op), "{e}");
            assert!(!cow_path(&dir).exists(), "{op}");
            assert!(h.0.host().dm_names().is_empty(), "{op}");
            assert!(h.0.host().loop_devices().is_empty(), "{op}");
        }
        // On start, an existing store survives a failure.
        attach(&h, &OpId::mint(), id, &dir, &s.rootfs)
            .await
            .unwrap();
        detach(&h, &OpId::mint(), id, &dir).await;
        h.0.host().fail_next("dm_create");
        attach(&h, &OpId::mint(), id, &dir, &s.rootfs)
            .await
            .unwrap_err();
        assert!(cow_path(&dir).exists());
        assert!(h.0.host().loop_devices().is_empty());
    }

    #[tokio::test]
    async fn leaks_are_devices_no_live_vm_explains_and_gc_removes_them() {
        let s = setup();
        let h = fake(vec![s.state.clone()]);
        let op = OpId::mint();
        for id in ["0a", "0b"] {
            let dir = s.state.join("vms").join(id);
            std::fs::create_dir_all(&dir).unwrap();
            attach(&h, &op, id, &dir, &s.rootfs).await.unwrap();
        }
        // What a helper killed mid-create leaves: a loop under no snapshot.
        h.0.host()
            .add_loop("/dev/loop9", &s.rootfs.canonicalize().unwrap());
        // Someone else's devices are not banger's business.
        h.0.host().add_dm("vg0-root", &["/dev/sda2"]);
        h.0.host()
            .add_loop("/dev/loop8", Path::new("/var/lib/other.img"));
        let live: HashSet<&str> = ["0a"].into();
        let found = leaks(&h.list(&op).await.unwrap(), &live);
        let names: Vec<_> = found
            .iter()
            .map(|l| (l.kind.as_str(), l.name.as_str()))
            .collect();
        assert_eq!(names, vec![("dm", "bg-0b"), ("loop", "/dev/loop9")]);
        for l in &found {
            remove_leak(&h, &op, l).await.unwrap();
        }
        assert!(leaks(&h.list(&op).await.unwrap(), &live).is_empty());
        assert_eq!(h.0.host().dm_names(), vec!["bg-0a", "vg0-root"]);
        // The live VM's two loops and the foreign one remain.
        assert_eq!(h.0.host().loop_devices().len(), 3);
    }

    #[test]
    fn root_disks_are_known_by_their_files() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        assert_eq!(existing_root_disk(d), RootDisk::Copy);
        std::fs::write(d.join("root.qcow2"), b"").unwrap();
        assert_eq!(existing_root_disk(d), RootDisk::Qcow2);
        std::fs::write(d.join("root.cow"), b"").unwrap();
        assert_eq!(existing_root_disk(d), RootDisk::Snapshot);
        let spec = |root| {
            let s = root_disk_spec("0a1b2c3d4e5f", d, root);
            (s.path, s.format, s.read_only)
        };
        // Both VMMs take the snapshot's node as a raw disk.
        assert_eq!(
            spec(RootDisk::Snapshot),
            (
                PathBuf::from("/dev/mapper/bg-0a1b2c3d4e5f"),
                DiskFormat::Raw,
                false
            )
        );
        assert_eq!(
            spec(RootDisk::Qcow2),
            (d.join("root.qcow2"), DiskFormat::Qcow2, false)
        );
        assert_eq!(
            spec(RootDisk::Copy),
            (d.join("root.ext4"), DiskFormat::Raw, false)
        );
    }
}
