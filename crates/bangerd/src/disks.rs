//! Root disks as device-mapper snapshots, made by the root helper.
//!
//! A snapshot VM keeps its writes in `<vm>/root.cow` (sparse, made here by
//! the daemon, which owns the VM dir); the helper builds `bg-<vm id>` over
//! the image's rootfs and that file and gives the node to our uid, and the
//! VMM opens `/dev/mapper/bg-<vm id>` as a raw disk. The dm device lives
//! only while the VM runs: stop removes it, start builds it again over the
//! same `root.cow`, so the disk keeps its contents.
//!
//! The helper is reached through [`SnapshotHelper`] so that this logic is
//! tested against `banger_disk`'s recording fake.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use banger_host::RootDiskStrategy;
use banger_rpc::RpcError;
use banger_wire::helper::{
    DiskList, DiskListResult, DiskLoopDetach, DiskSnapshotCreate, DiskSnapshotRemove,
    LoopDetachParams, SnapshotCreateParams, SnapshotCreateResult, SnapshotRemoveParams,
};
use banger_wire::methods::Leak;
use banger_wire::{NoParams, OpId};
use tracing::{info, warn};

use crate::helper::HelperLink;

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
    ) -> impl Future<Output = Result<SnapshotCreateResult, RpcError>> + Send;
    /// True when there was a device to remove.
    fn remove(
        &self,
        op_id: &OpId,
        name: String,
    ) -> impl Future<Output = Result<bool, RpcError>> + Send;
    fn detach_loop(
        &self,
        op_id: &OpId,
        device: String,
    ) -> impl Future<Output = Result<bool, RpcError>> + Send;
    fn list(&self, op_id: &OpId) -> impl Future<Output = Result<DiskListResult, RpcError>> + Send;
}

impl SnapshotHelper for HelperLink {
    async fn create(
        &self,
        op_id: &OpId,
        p: SnapshotCreateParams,
    ) -> Result<SnapshotCreateResult, RpcError> {
        self.call::<DiskSnapshotCreate>(op_id, &p).await
    }
    async fn remove(&self, op_id: &OpId, name: String) -> Result<bool, RpcError> {
        self.call::<DiskSnapshotRemove>(op_id, &SnapshotRemoveParams { name })
            .await
            .map(|d| d.deleted)
    }
    async fn detach_loop(&self, op_id: &OpId, device: String) -> Result<bool, RpcError> {
        self.call::<DiskLoopDetach>(op_id, &LoopDetachParams { device })
            .await
            .map(|d| d.deleted)
    }
    async fn list(&self, op_id: &OpId) -> Result<DiskListResult, RpcError> {
        self.call::<DiskList>(op_id, &NoParams {}).await
    }
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
            Err(e) => format!("cannot ask banger-helper: {}", e.message),
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
) -> Result<PathBuf, RpcError> {
    let cow = cow_path(vm_dir);
    let name = banger_disk::snapshot_name(vm_id);
    let made = if cow.exists() {
        // A snapshot a failed stop left would refuse the create; the VM is
        // not running, so nothing uses it.
        helper.remove(op_id, name.clone()).await?;
        false
    } else {
        let len = std::fs::metadata(rootfs)
            .map_err(|e| RpcError::internal(format!("{}: {e}", rootfs.display())))?
            .len();
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&cow)
            .and_then(|f| f.set_len(banger_disk::cow_size(len)))
            .map_err(|e| RpcError::internal(format!("cannot create {}: {e}", cow.display())))?;
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
            Err(e)
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
            warn!(vm = vm_id, dm = %name, error = %e.message, "cannot remove the root disk snapshot; banger gc will")
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
    r.map(drop).map_err(|e| e.message)
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

    fn rpc(e: banger_disk::DiskError) -> RpcError {
        RpcError::new(e.code(), e.to_string())
    }

    impl SnapshotHelper for Fake {
        async fn create(
            &self,
            _: &OpId,
            p: SnapshotCreateParams,
        ) -> Result<SnapshotCreateResult, RpcError> {
            let uid = rustix::process::getuid().as_raw();
            self.0.snapshot_create(&p, uid).await.map_err(rpc)
        }
        async fn remove(&self, _: &OpId, name: String) -> Result<bool, RpcError> {
            let p = SnapshotRemoveParams { name };
            self.0
                .snapshot_remove(&p)
                .await
                .map(|d| d.deleted)
                .map_err(rpc)
        }
        async fn detach_loop(&self, _: &OpId, device: String) -> Result<bool, RpcError> {
            let p = LoopDetachParams { device };
            self.0.loop_detach(&p).await.map(|d| d.deleted).map_err(rpc)
        }
        async fn list(&self, _: &OpId) -> Result<DiskListResult, RpcError> {
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
            assert!(e.message.contains(op), "{}", e.message);
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
}
