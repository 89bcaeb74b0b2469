//! `vm.snapshot`: a running VM's memory, device state and disks, saved
//! together while its vCPUs are paused; the VM runs on after. And the
//! snapshot records: list, show, delete.
//!
//! Files, in `<state>/snapshots/<id>/`: `memory.ram` (the guest's RAM,
//! copied out of its memfd while the vCPUs are paused: a sparse file that
//! restores map copy-on-write, so they share its pages; its digest in the
//! row, checked before a restore uses a version of it for the first
//! time), `state.bin` (QEMU's migration stream of the devices, its
//! SHA-256 in the row and checked before each restore; for a VM that runs
//! on QEMU's own RAM, one that a daemon before the memfd started, the
//! stream carries the RAM and there is no `memory.ram`), `root.qcow2` or
//! `root.ext4` (a copy of the root disk as it was: a qcow2 overlay keeps
//! its backing on the image's rootfs, which the snapshot therefore keeps)
//! and `work.ext4`. These are read-only bases: each restore runs on qcow2
//! overlays of its own over the disks.
//!
//! A Firecracker VM's snapshot is `PUT /snapshot/create` of the paused VM:
//! Firecracker writes `state.bin` (its microVM state) and `memory.ram` (the
//! guest memory, which restores map private, as with QEMU); the raw disks
//! are copied beside them. Firecracker takes no qcow2, so each restore runs
//! on copies of its own (reflinked where the filesystem can).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use banger_rpc::EventSink;
use banger_store::{Snapshot, SnapshotMemory, SnapshotState, Vm, VmState, Vmm, new_id};
use banger_vmm::DiskFormat;
use banger_wire::OpId;
use banger_wire::methods::{Leak, SnapshotInfo, VmSnapshotParams};
use tracing::{info, warn};

use super::create::valid_name;
use super::disks::{RootDisk, existing_root_disk, root_disk_spec, work_disk_spec};
use super::restore::FileStamp;
use super::{VmError, VmService};
use crate::errors::chain;
use crate::ops::{OpKind, Operation};

/// The label a VM restored from a snapshot carries: the snapshot's id.
pub const SNAPSHOT_LABEL: &str = "banger.snapshot";

/// How long saving the state may take (a 1 GiB guest writes at disk speed).
const SAVE_TIMEOUT: Duration = Duration::from_secs(300);

pub(super) fn state_file(dir: &Path) -> PathBuf {
    dir.join("state.bin")
}
/// Where a snapshot of a restored VM first copies its overlays (the root's
/// becomes `root.qcow2` in place where the snapshot's root is qcow2).
const OVERLAY_ROOT: &str = "root.qcow2";
const OVERLAY_WORK: &str = "work.qcow2";

pub(super) fn memory_file(dir: &Path) -> PathBuf {
    dir.join("memory.ram")
}
pub(super) fn root_file(s: &Snapshot) -> PathBuf {
    s.dir.join(if s.root_qcow2 {
        "root.qcow2"
    } else {
        "root.ext4"
    })
}
pub(super) fn work_file(dir: &Path) -> PathBuf {
    dir.join("work.ext4")
}

/// What [`VmService::save_state`] leaves of the memory's digest.
enum MemoryDigest {
    /// Copied out with its digest taken on the way (QEMU, memory file).
    Saved(String),
    /// No memory file: the memory is in the state stream (QEMU, anonymous
    /// memory), which the state's own digest covers.
    InState,
    /// Written by the VMM (Firecracker): read for its digest once the VM
    /// runs again, as reading it all is no reason to keep the guest paused.
    Later,
}

impl VmService {
    /// `<state>/snapshots`.
    pub(super) fn snapshots_dir(&self) -> PathBuf {
        self.state_dir.join("snapshots")
    }

    /// Snapshot a running VM as operation `op_id` (through the runner).
    pub async fn snapshot(
        self: &Arc<Self>,
        op_id: &OpId,
        params: VmSnapshotParams,
        events: &EventSink,
    ) -> Result<SnapshotInfo, VmError> {
        let vm = self.find(&params.vm)?;
        let name = match params.name {
            Some(n) if valid_name(&n) => n,
            Some(n) => {
                return Err(VmError::Invalid(format!(
                    "snapshot name {n:?} is invalid: use 1-40 lowercase letters, digits and '-', starting with a letter"
                )));
            }
            None => {
                let mut base: String = vm.name.chars().take(32).collect();
                base = base.trim_end_matches('-').to_string();
                format!("{base}-{}", &new_id()[..6])
            }
        };
        Self::check_snapshottable(&vm)?;
        let this = self.clone();
        self.ops
            .run(
                op_id,
                OpKind::VmSnapshot,
                &vm.name.clone(),
                events,
                move |op| async move { this.snapshot_inner(&op, vm, name).await },
            )
            .await
    }

    /// What no snapshot (nor fork) is made of yet, refused before any work.
    pub(super) fn check_snapshottable(vm: &Vm) -> Result<(), VmError> {
        if existing_root_disk(&vm.vm_dir) == RootDisk::Snapshot {
            return Err(VmError::Unavailable(format!(
                "VM {:?}'s root disk is a device-mapper snapshot: snapshots of such VMs are not supported yet",
                vm.name
            )));
        }
        Ok(())
    }

    /// The version of the VMM that runs `vmm`'s VMs here: a saved state
    /// loads only in the version that wrote it. Asked once per version of
    /// the binary's file (a process each time would cost every restore
    /// tens of milliseconds).
    pub(super) async fn vmm_version(&self, vmm: Vmm) -> Result<String, VmError> {
        let bin = match vmm {
            Vmm::Qemu => self.settings.qemu.bin.clone(),
            Vmm::Firecracker => match &self.settings.firecracker {
                Some(fc) => fc.bin.clone(),
                None => {
                    return Err(VmError::Unavailable(
                        "firecracker is not found (see banger doctor)".into(),
                    ));
                }
            },
        };
        let stamp = FileStamp::of(&bin).ok();
        if let Some((seen, version)) = self.vmm_versions.lock().expect("versions").get(&bin)
            && Some(*seen) == stamp
        {
            return Ok(version.clone());
        }
        let version = match vmm {
            Vmm::Qemu => banger_vmm::qemu::version(&bin).await,
            Vmm::Firecracker => banger_vmm::firecracker::version(&bin).await,
        }
        .map_err(|e| VmError::Failed(chain(&e)))?;
        if let Some(stamp) = stamp {
            self.vmm_versions
                .lock()
                .expect("versions")
                .insert(bin, (stamp, version.clone()));
        }
        Ok(version)
    }

    pub(super) async fn snapshot_inner(
        &self,
        op: &Operation,
        vm: Vm,
        name: String,
    ) -> Result<SnapshotInfo, VmError> {
        let _busy = self.claim(&vm, &op.op_id, "snapshot")?;
        let vm = self.find(&vm.id)?;
        let h = self.running_handles(&vm)?;
        // Here too: the warm pool snapshots its source through this alone.
        Self::check_snapshottable(&vm)?;
        let root = existing_root_disk(&vm.vm_dir);
        let vmm_version = self.vmm_version(vm.vmm).await?;
        // Under KVM (`-cpu host`, and always for Firecracker) the state
        // holds the host CPU's features; under TCG QEMU's `max` model,
        // which its version fixes.
        let accel = match vm.vmm {
            Vmm::Qemu => banger_vmm::qemu::running_accel(&h),
            Vmm::Firecracker => None,
        };
        let cpu = match (vm.vmm, accel) {
            (Vmm::Firecracker, _) | (_, Some(banger_host::Accel::Kvm)) => {
                banger_host::cpu_identity().unwrap_or_default()
            }
            _ => String::new(),
        };
        // A restored VM (its disks are overlays over its snapshot's): the
        // snapshot it came from, whose files its disks and RAM sit on.
        let parent = match vm.labels.get(SNAPSHOT_LABEL) {
            Some(id) if work_disk_spec(&vm.vm_dir).format == DiskFormat::Qcow2 => {
                Some(self.store.find_snapshot(id)?)
            }
            _ => None,
        };
        let memory = match (banger_vmm::shared_memory(&h), &parent) {
            // Firecracker writes the guest's memory to a file of its own.
            _ if vm.vmm == Vmm::Firecracker => SnapshotMemory::File,
            (Some(_), _) => SnapshotMemory::File,
            // A restore's RAM maps its snapshot's memory file privately
            // (`ram0`): the stream must carry it.
            (None, Some(p)) if p.memory != SnapshotMemory::State => SnapshotMemory::Stream,
            (None, _) => SnapshotMemory::State,
        };
        let id = new_id();
        let snap = Snapshot {
            dir: self.snapshots_dir().join(&id),
            id,
            name,
            source_vm_id: vm.id.clone(),
            source_vm_name: vm.name.clone(),
            image_id: vm.image_id.clone(),
            vmm: vm.vmm,
            vmm_version,
            accel: accel.map(|a| a.to_string()).unwrap_or_default(),
            cpu,
            init_mode: vm.init_mode,
            vcpus: vm.vcpus,
            memory_mib: vm.memory_mib,
            disk_mib: vm.disk_mib,
            root_qcow2: match &parent {
                Some(p) => p.root_qcow2,
                None => root == RootDisk::Qcow2,
            },
            state_sha256: String::new(),
            memory,
            memory_sha256: String::new(),
            size_bytes: 0,
            state: SnapshotState::Creating,
            created_at: banger_store::now_ms(),
        };
        // The row first: a daemon that dies from here on leaves a
        // `creating` row that names the files to remove. With it, the VM's
        // secrets: its guest's memory holds their placeholders, which VMs
        // restored from the snapshot must be able to use; and where its
        // workspaces came from, which their exports write to.
        self.store.insert_snapshot(&snap)?;
        self.store
            .add_snapshot_secrets(&snap.id, &self.store.vm_secrets(&vm.id)?)?;
        self.store.snapshot_vm_workspaces(&snap.id, &vm.id)?;
        info!(vm = %vm.id, snapshot = %snap.id, name = %snap.name, "snapshotting VM");
        let was_paused = h.paused;
        let saved = async {
            std::fs::create_dir_all(&snap.dir).map_err(|e| {
                VmError::Failed(format!("cannot create {}: {e}", snap.dir.display()))
            })?;
            op.stage("pause");
            if !was_paused {
                self.apply_paused(&vm, h.clone(), true).await?;
            }
            op.stage("save state");
            let digest = self.save_state(op, &vm, &h, &snap).await?;
            op.stage("freeze disks");
            // QEMU flushed the disks when it paused the vCPUs: the files
            // hold what the saved memory expects. A restored VM's overlays
            // are copied as they are, and made the snapshot's own once the
            // VM runs again.
            let root_disk = root_disk_spec(&vm.id, &vm.vm_dir, root).path;
            let work_disk = work_disk_spec(&vm.vm_dir).path;
            let (root_to, work_to) = match parent {
                Some(_) => (snap.dir.join(OVERLAY_ROOT), snap.dir.join(OVERLAY_WORK)),
                None => (root_file(&snap), work_file(&snap.dir)),
            };
            super::disks::clone_or_copy(&root_disk, &root_to).await?;
            super::disks::clone_or_copy(&work_disk, &work_to).await?;
            self.inject_fault("save state").await?;
            Ok(digest)
        }
        .await;
        // However the save went, the VM runs on as it was.
        if !was_paused {
            op.stage("resume");
            let h = self.handles(&vm.id).unwrap_or(h);
            if let Err(e) = self.apply_paused(&vm, h, false).await {
                warn!(vm = %vm.id, error = %chain(&e), "cannot resume the VM after its snapshot");
            }
        }
        let saved = match saved {
            Ok(MemoryDigest::Later) => {
                op.stage("memory digest");
                memory_file_digest(&memory_file(&snap.dir))
                    .await
                    .map_err(|e| {
                        VmError::Failed(format!("cannot read VM {:?}'s memory file {e}", vm.name))
                    })
            }
            Ok(MemoryDigest::Saved(sha)) => Ok(sha),
            Ok(MemoryDigest::InState) => Ok(String::new()),
            Err(e) => Err(e),
        };
        let done = match (saved, &parent) {
            (Ok(memory_sha), None) => self.seal_snapshot(&snap, &memory_sha).await,
            (Ok(memory_sha), Some(_)) => {
                op.stage("flatten disks");
                let image_rootfs = if snap.root_qcow2 {
                    Some(self.store.image_by_id(&snap.image_id)?.rootfs_path)
                } else {
                    None
                };
                let flat = super::disks::flatten_restored_disks(
                    &snap.dir.join(OVERLAY_ROOT),
                    image_rootfs.as_deref(),
                    &root_file(&snap),
                    &snap.dir.join(OVERLAY_WORK),
                    &work_file(&snap.dir),
                )
                .await;
                match flat {
                    Ok(()) => self.seal_snapshot(&snap, &memory_sha).await,
                    Err(e) => Err(e),
                }
            }
            (Err(e), _) => Err(e),
        };
        match done {
            Ok(()) => {
                info!(snapshot = %snap.id, "snapshot ready");
                let snap = self.store.find_snapshot(&snap.id)?;
                Ok(self.snapshot_info(&snap))
            }
            Err(e) => {
                warn!(snapshot = %snap.id, error = %chain(&e), "snapshot failed; removing it");
                let _ = std::fs::remove_dir_all(&snap.dir);
                let _ = self.store.delete_snapshot(&snap.id);
                Err(e)
            }
        }
    }

    /// A paused VM's device state (`state.bin`) and, where the snapshot
    /// keeps it in a file, its memory (`memory.ram`): QEMU's migration
    /// stream, the RAM copied out of its memfd; Firecracker's
    /// `PUT /snapshot/create`, which writes both.
    async fn save_state(
        &self,
        op: &Operation,
        vm: &Vm,
        h: &banger_vmm::Handles,
        snap: &Snapshot,
    ) -> Result<MemoryDigest, VmError> {
        let failed = |what: &str, e: String| {
            VmError::Failed(format!("cannot save VM {:?}'s {what}: {e}", vm.name))
        };
        let (state, memory) = (state_file(&snap.dir), memory_file(&snap.dir));
        if vm.vmm == Vmm::Firecracker {
            banger_vmm::firecracker::create_snapshot(h, &state, &memory, SAVE_TIMEOUT)
                .await
                .map_err(|e| failed("state", chain(&e)))?;
            return Ok(MemoryDigest::Later);
        }
        let shared = snap.memory == SnapshotMemory::File;
        banger_vmm::qemu::save_state(h, &state, shared, SAVE_TIMEOUT)
            .await
            .map_err(|e| failed("state", chain(&e)))?;
        if !shared {
            return Ok(MemoryDigest::InState);
        }
        op.stage("save memory");
        save_memory(h, &memory)
            .await
            .map(MemoryDigest::Saved)
            .map_err(|e| failed("memory", e))
    }

    /// The files' checksums and size into the row, which becomes `ready`.
    async fn seal_snapshot(&self, snap: &Snapshot, memory_sha: &str) -> Result<(), VmError> {
        let sha = sha256_file(&state_file(&snap.dir)).await?;
        let size = disk_bytes(&snap.dir);
        self.store
            .complete_snapshot(&snap.id, &sha, memory_sha, size)?;
        Ok(())
    }

    /// At daemon start: a snapshot still `creating` was cut short by the
    /// last daemon's death; its files and row go.
    pub(super) fn drop_unfinished_snapshots(&self) {
        for s in self.store.list_snapshots().unwrap_or_default() {
            if s.state == SnapshotState::Creating {
                warn!(snapshot = %s.id, name = %s.name, "reconcile: removing a snapshot its daemon did not finish");
                self.remove_snapshot(&s);
            }
        }
    }

    /// A snapshot's files, then its row.
    pub(super) fn remove_snapshot(&self, s: &Snapshot) {
        self.verified_memory.lock().expect("verified").remove(&s.id);
        if let Err(e) = std::fs::remove_dir_all(&s.dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            warn!(snapshot = %s.id, error = %e, "cannot remove the snapshot's files");
        }
        let _ = self.store.delete_snapshot(&s.id);
    }

    /// Snapshot files no snapshot owns, and snapshots left `creating` with
    /// no snapshot of their VM in flight.
    pub(super) fn snapshot_leaks(&self) -> Result<Vec<Leak>, VmError> {
        let rows = self.store.list_snapshots()?;
        let mut out = Vec::new();
        if let Ok(entries) = std::fs::read_dir(self.snapshots_dir()) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if !rows.iter().any(|s| s.id == name) {
                    out.push(Leak {
                        kind: "snapshot_dir".into(),
                        name: e.path().display().to_string(),
                        detail: "no snapshot owns this directory".into(),
                    });
                }
            }
        }
        for s in rows {
            if s.state == SnapshotState::Creating && !self.is_busy(&s.source_vm_id) {
                out.push(Leak {
                    kind: "snapshot_row".into(),
                    name: s.name,
                    detail: "creating, with no snapshot running".into(),
                });
            }
        }
        Ok(out)
    }

    pub fn snapshot_info(&self, s: &Snapshot) -> SnapshotInfo {
        let image = self
            .store
            .image_by_id(&s.image_id)
            .map(|i| i.name)
            .unwrap_or_else(|_| s.image_id.clone());
        SnapshotInfo {
            id: s.id.clone(),
            name: s.name.clone(),
            state: s.state.as_str().to_string(),
            source_vm: s.source_vm_name.clone(),
            image,
            vmm: s.vmm,
            vmm_version: s.vmm_version.clone(),
            accel: s.accel.clone(),
            cpu: s.cpu.clone(),
            vcpus: s.vcpus,
            memory_mib: s.memory_mib,
            disk_mib: s.disk_mib,
            memory: s.memory.as_str().to_string(),
            disk_bytes: disk_bytes(&s.dir),
            dir: s.dir.display().to_string(),
            created_at_ms: s.created_at,
            used_by: self.snapshot_users(&s.id).unwrap_or_default(),
            secrets: self
                .store
                .snapshot_secrets(&s.id)
                .unwrap_or_default()
                .into_iter()
                .map(|g| g.name)
                .collect(),
        }
    }

    /// The VMs restored from snapshot `id` that still have disks over it.
    fn snapshot_users(&self, id: &str) -> Result<Vec<String>, VmError> {
        Ok(self
            .store
            .list_vms()?
            .into_iter()
            .filter(|v| v.state != VmState::Failed)
            .filter(|v| v.labels.get(SNAPSHOT_LABEL).is_some_and(|s| s == id))
            .map(|v| v.name)
            .collect())
    }

    pub fn snapshot_list(&self) -> Result<Vec<SnapshotInfo>, VmError> {
        Ok(self
            .store
            .list_snapshots()?
            .iter()
            .map(|s| self.snapshot_info(s))
            .collect())
    }

    pub fn snapshot_show(&self, name: &str) -> Result<SnapshotInfo, VmError> {
        Ok(self.snapshot_info(&self.store.find_snapshot(name)?))
    }

    /// Delete a snapshot and its files; refused while a VM restored from it
    /// exists (its disks are overlays over the snapshot's) or while it is
    /// being taken.
    pub fn snapshot_delete(&self, name: &str) -> Result<(), VmError> {
        let s = self.store.find_snapshot(name)?;
        if s.state != SnapshotState::Ready {
            return Err(VmError::Conflict(format!(
                "snapshot {:?} is still being taken; delete it when that is done",
                s.name
            )));
        }
        let users = self.snapshot_users(&s.id)?;
        if !users.is_empty() {
            return Err(VmError::Conflict(format!(
                "snapshot {:?} is used by {}: {}; delete {} first (banger vm delete)",
                s.name,
                if users.len() == 1 { "VM" } else { "VMs" },
                users.join(", "),
                if users.len() == 1 { "it" } else { "them" },
            )));
        }
        self.remove_snapshot(&s);
        info!(snapshot = %s.id, name = %s.name, "snapshot deleted");
        Ok(())
    }
}

/// Copy a paused guest's RAM out of its QEMU's memfd into `dest`; the
/// copy's digest.
async fn save_memory(h: &banger_vmm::Handles, dest: &Path) -> Result<String, String> {
    let src = banger_vmm::shared_memory(h)
        .ok_or_else(|| "its QEMU no longer holds the guest's memfd".to_string())?;
    let dest = dest.to_owned();
    tokio::task::spawn_blocking(move || {
        banger_vmm::copy_memory(&src, &dest)
            .map_err(|e| format!("copying {} to {}: {e}", src.display(), dest.display()))
    })
    .await
    .map_err(|e| format!("the copy's task failed: {e}"))?
}

/// [`banger_vmm::memory_digest`] of a snapshot's memory file, off the
/// runtime's threads (it reads the whole file).
pub(super) async fn memory_file_digest(path: &Path) -> Result<String, String> {
    let p = path.to_owned();
    tokio::task::spawn_blocking(move || banger_vmm::memory_digest(&p))
        .await
        .map_err(|e| format!("the digest's task failed: {e}"))?
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// SHA-256 of a file, hex.
pub(super) async fn sha256_file(path: &Path) -> Result<String, VmError> {
    let p = path.to_owned();
    tokio::task::spawn_blocking(move || {
        use sha2::Digest;
        use std::io::Read;
        let mut f = std::fs::File::open(&p)?;
        let mut hasher = sha2::Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        Ok::<_, std::io::Error>(
            hasher
                .finalize()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>(),
        )
    })
    .await
    .map_err(|e| VmError::Failed(format!("checksum task failed: {e}")))?
    .map_err(|e| VmError::Failed(format!("cannot read {}: {e}", path.display())))
}

/// Bytes the files in `dir` take on disk (allocated blocks).
fn disk_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.blocks() * 512)
                .sum()
        })
        .unwrap_or(0)
}
