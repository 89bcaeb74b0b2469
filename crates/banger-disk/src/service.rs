//! The helper's `disk.*` methods: check everything, then act through a
//! [`HostDisk`]; a create that fails part way undoes what it made.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use banger_wire::ErrorCode;
use banger_wire::helper::{
    Deleted, DiskListResult, LoopDetachParams, LoopInfo, SnapshotCreateParams,
    SnapshotCreateResult, SnapshotInfo, SnapshotRemoveParams,
};
use tokio::sync::Mutex;
use tracing::{info, warn};

use crate::host::{FileId, HostDisk, HostError, LoopDevice};
use crate::names::{Refused, StateDirs, check_dm_name, check_loop_device, is_dm_name};

/// Snapshot chunk size in 512-byte sectors: 4 KiB, ext4's block size.
const CHUNK_SECTORS: u32 = 8;

/// Why a `disk.*` call failed.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The request names something banger does not own, or is malformed.
    #[error(transparent)]
    Refused(#[from] Refused),
    #[error("device-mapper snapshots are unavailable here: {0}")]
    Unavailable(String),
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Host(#[from] HostError),
}

impl DiskError {
    pub fn code(&self) -> ErrorCode {
        match self {
            DiskError::Refused(_) => ErrorCode::InvalidParams,
            DiskError::Unavailable(_) => ErrorCode::Unavailable,
            DiskError::Conflict(_) => ErrorCode::Conflict,
            DiskError::Host(_) => ErrorCode::Internal,
        }
    }
}

/// Run `check` before anything is done; a refusal is logged.
fn checked<T>(method: &str, check: impl FnOnce() -> Result<T, Refused>) -> Result<T, DiskError> {
    check().map_err(|e| {
        warn!(method, error = %e, "refused a request outside banger's resources");
        e.into()
    })
}

/// The `disk.*` methods over a [`HostDisk`].
#[derive(Debug)]
pub struct DiskService<H> {
    host: H,
    dirs: StateDirs,
    /// Calls run one at a time: each reads the host, then changes it. So a
    /// loop device no dm device holds is never one a create is about to use.
    lock: Mutex<()>,
    /// The test seam ([`banger_host::PausePoint`]), when one is set.
    pause: Option<banger_host::PausePoint>,
}

impl<H: HostDisk> DiskService<H> {
    /// `state_dirs`: the only directories whose files may be attached.
    pub fn new(host: H, state_dirs: Vec<PathBuf>) -> Self {
        DiskService {
            host,
            dirs: StateDirs::new(state_dirs),
            lock: Mutex::new(()),
            pause: None,
        }
    }

    /// Hold each call at its test seam's point (see [`banger_host::PausePoint`]).
    pub fn with_pause_point(mut self, pause: banger_host::PausePoint) -> Self {
        self.pause = Some(pause);
        self
    }

    async fn pause_point(&self, method: &'static str) {
        if let Some(pause) = &self.pause {
            pause.at(method).await;
        }
    }

    pub fn host(&self) -> &H {
        &self.host
    }

    /// `disk.snapshot_create`, giving the node to `owner_uid` (the caller).
    pub async fn snapshot_create(
        &self,
        p: &SnapshotCreateParams,
        owner_uid: u32,
    ) -> Result<SnapshotCreateResult, DiskError> {
        let method = "disk.snapshot_create";
        let ((origin_file, origin), (cow_file, cow)) = checked(method, || {
            check_dm_name(&p.name)?;
            let origin = self.dirs.open("origin", &p.origin, false)?;
            let cow = self.dirs.open("cow", &p.cow, true)?;
            if origin.1 == cow.1 {
                return Err(Refused("origin and cow are the same file".into()));
            }
            Ok((origin, cow))
        })?;
        let (origin_meta, cow_meta) = match (origin_file.metadata(), cow_file.metadata()) {
            (Ok(o), Ok(c)) => (o, c),
            (Err(e), _) | (_, Err(e)) => {
                return Err(HostError::new("cannot read the disk files' metadata", e).into());
            }
        };
        let (origin_len, cow_len) = (origin_meta.len(), cow_meta.len());
        checked(method, || {
            // The caller's own files only: a hard link to someone else's
            // file in the state directory must not become the caller's disk.
            for (what, path, meta) in [("origin", &origin, &origin_meta), ("cow", &cow, &cow_meta)]
            {
                if meta.uid() != owner_uid {
                    return Err(Refused(format!(
                        "{what} {}: owned by uid {}, not by the caller (uid {owner_uid})",
                        path.display(),
                        meta.uid()
                    )));
                }
            }
            if origin_len == 0 || origin_len % 512 != 0 {
                return Err(Refused(format!(
                    "origin {}: its size ({origin_len} bytes) is not a positive multiple of 512",
                    origin.display()
                )));
            }
            if cow_len < crate::cow_size(origin_len) {
                return Err(Refused(format!(
                    "cow {}: {cow_len} bytes is too small for an origin of {origin_len} \
                     (needs {}; a full store invalidates the snapshot)",
                    cow.display(),
                    crate::cow_size(origin_len)
                )));
            }
            Ok(())
        })?;
        if let Some(why) = self.host.unavailable() {
            return Err(DiskError::Unavailable(why));
        }
        let _guard = self.lock.lock().await;
        if self
            .host
            .dm_devices()
            .await?
            .iter()
            .any(|d| d.name == p.name)
        {
            return Err(DiskError::Conflict(format!(
                "dm device {} already exists; remove it first (disk.snapshot_remove)",
                p.name
            )));
        }
        let mut made = Made::default();
        let result = async {
            let origin_loop = self.host.loop_attach(&origin_file, &origin, true).await?;
            made.loops.push(origin_loop.clone());
            let cow_loop = self.host.loop_attach(&cow_file, &cow, false).await?;
            made.loops.push(cow_loop.clone());
            self.pause_point("disk.snapshot_create").await;
            let table = format!(
                "0 {} snapshot {origin_loop} {cow_loop} P {CHUNK_SECTORS}",
                origin_len / 512
            );
            self.host.dm_create(&p.name, &table).await?;
            made.dm = true;
            let device = self.host.dm_chown(&p.name, owner_uid).await?;
            Ok::<_, HostError>(SnapshotCreateResult {
                device,
                origin_loop,
                cow_loop,
            })
        }
        .await;
        match result {
            Ok(r) => {
                info!(name = %p.name, origin = %origin.display(), cow = %cow.display(),
                    origin_loop = %r.origin_loop, cow_loop = %r.cow_loop, owner_uid, "snapshot ready");
                Ok(r)
            }
            Err(e) => {
                self.roll_back(&p.name, made).await;
                Err(e.into())
            }
        }
    }

    /// Undo, in reverse, what a failed create made.
    async fn roll_back(&self, name: &str, made: Made) {
        if made.dm {
            match self.host.dm_remove(name).await {
                Ok(()) => info!(name, "rolled back a half-made dm device"),
                Err(e) => warn!(name, error = %e, "cannot roll back a half-made dm device"),
            }
        }
        for device in made.loops.iter().rev() {
            match self.host.loop_detach(device).await {
                Ok(()) => info!(device, "rolled back a loop device"),
                Err(e) => warn!(device, error = %e, "cannot roll back a loop device"),
            }
        }
    }

    /// `disk.snapshot_remove`: the dm device, then every loop device over
    /// banger's files that no dm device holds: its own two, and any a create
    /// cut short by a helper crash left. (Creates run under the same lock, so
    /// no create in progress owns such a loop device.)
    /// `caller`: the peer's uid. Only a snapshot built on this install's
    /// files (under its state directories, and the caller's unless it is
    /// root) is removed: another install's is refused.
    pub async fn snapshot_remove(
        &self,
        p: &SnapshotRemoveParams,
        caller: u32,
    ) -> Result<Deleted, DiskError> {
        let method = "disk.snapshot_remove";
        checked(method, || check_dm_name(&p.name))?;
        let _guard = self.lock.lock().await;
        let dms = self.host.dm_devices().await?;
        let loops = self.host.loops().await?;
        let mut deleted = false;
        if let Some(dm) = dms.iter().find(|d| d.name == p.name) {
            for slave in &dm.slaves {
                let backing = loops.iter().find(|l| &l.device == slave);
                checked(method, || match backing {
                    Some(l) => self.check_ours(l, caller),
                    None => Err(Refused(format!(
                        "{} is built on {slave}, which is not one of banger's loop devices",
                        p.name
                    ))),
                })?;
            }
            self.host.dm_remove(&p.name).await?;
            deleted = true;
            info!(name = %p.name, loops = ?dm.slaves, "snapshot removed");
        }
        let held: Vec<&String> = dms
            .iter()
            .filter(|d| d.name != p.name)
            .flat_map(|d| &d.slaves)
            .collect();
        for l in loops {
            if self.check_ours(&l, caller).is_ok() && !held.contains(&&l.device) {
                self.host.loop_detach(&l.device).await?;
                deleted = true;
                info!(device = %l.device, backing = %l.backing_file.display(), "loop device detached");
            }
        }
        Ok(Deleted { deleted })
    }

    /// `disk.loop_detach`: a loop device over banger's files that no dm
    /// device holds.
    /// `caller`: the peer's uid (see [`DiskService::snapshot_remove`]).
    pub async fn loop_detach(
        &self,
        p: &LoopDetachParams,
        caller: u32,
    ) -> Result<Deleted, DiskError> {
        let method = "disk.loop_detach";
        checked(method, || check_loop_device(&p.device))?;
        let _guard = self.lock.lock().await;
        let Some(l) = self
            .host
            .loops()
            .await?
            .into_iter()
            .find(|l| l.device == p.device)
        else {
            return Ok(Deleted { deleted: false });
        };
        checked(method, || self.check_ours(&l, caller))?;
        if let Some(dm) = self
            .host
            .dm_devices()
            .await?
            .into_iter()
            .find(|d| d.slaves.contains(&p.device))
        {
            return Err(DiskError::Conflict(format!(
                "{} is in use by dm device {}; remove that instead",
                p.device, dm.name
            )));
        }
        self.host.loop_detach(&p.device).await?;
        info!(device = %p.device, backing = %l.backing_file.display(), "loop device detached");
        Ok(Deleted { deleted: true })
    }

    /// Is loop device `l` this install's and the caller's: over a file
    /// under the state directories, owned by `caller` unless the caller is
    /// root — the file itself, by device and inode, not whatever its
    /// attach-time path names now?
    fn check_ours(&self, l: &LoopDevice, caller: u32) -> Result<(), Refused> {
        let (device, backing) = (&l.device, &l.backing_file);
        if !self.dirs.contains(backing) {
            return Err(Refused(format!(
                "{device} is backed by {}, which is not under banger's state directory",
                backing.display()
            )));
        }
        let meta = std::fs::symlink_metadata(backing).ok();
        if meta
            .as_ref()
            .map(FileId::of)
            .is_none_or(|id| Some(id) != l.backing_id)
        {
            return Err(Refused(format!(
                "{device} is not backed by the file now at {} (it was moved or replaced)",
                backing.display()
            )));
        }
        if caller != 0 && meta.map(|m| m.uid()) != Some(caller) {
            return Err(Refused(format!(
                "{device} is backed by {}, which uid {caller} does not own",
                backing.display()
            )));
        }
        Ok(())
    }

    /// `disk.list`.
    pub async fn list(&self) -> Result<DiskListResult, DiskError> {
        let _guard = self.lock.lock().await;
        let dms = self.host.dm_devices().await?;
        let mut out = DiskListResult {
            unavailable: self.host.unavailable(),
            state_dirs: self
                .dirs
                .resolved()
                .iter()
                .map(|d| d.display().to_string())
                .collect(),
            ..DiskListResult::default()
        };
        for l in self.host.loops().await? {
            if self.dirs.contains(&l.backing_file) {
                out.loops.push(LoopInfo {
                    held_by: dms
                        .iter()
                        .find(|d| d.slaves.contains(&l.device))
                        .map(|d| d.name.clone()),
                    device: l.device,
                    backing_file: l.backing_file.display().to_string(),
                });
            }
        }
        out.snapshots = dms
            .into_iter()
            .filter(|d| is_dm_name(&d.name))
            .map(|d| SnapshotInfo {
                name: d.name,
                slaves: d.slaves,
            })
            .collect();
        out.snapshots.sort_by(|a, b| a.name.cmp(&b.name));
        out.loops.sort_by(|a, b| a.device.cmp(&b.device));
        Ok(out)
    }
}

/// What a create has made so far.
#[derive(Debug, Default)]
struct Made {
    loops: Vec<String>,
    dm: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recording::{Call, RecordingHostDisk};
    use std::path::Path;

    /// The files the tests make are the caller's.
    fn uid() -> u32 {
        rustix::process::getuid().as_raw()
    }

    struct Fixture {
        _tmp: tempfile::TempDir,
        state: PathBuf,
        svc: DiskService<RecordingHostDisk>,
    }

    impl Fixture {
        fn new() -> Self {
            let tmp = tempfile::tempdir().unwrap();
            let state = tmp.path().join("state").canonicalize().unwrap_or_else(|_| {
                std::fs::create_dir_all(tmp.path().join("state")).unwrap();
                tmp.path().join("state").canonicalize().unwrap()
            });
            std::fs::create_dir_all(state.join("images/deb")).unwrap();
            let rootfs = std::fs::File::create(state.join("images/deb/rootfs.ext4")).unwrap();
            rootfs.set_len(1 << 20).unwrap();
            let svc = DiskService::new(RecordingHostDisk::new(), vec![state.clone()]);
            let f = Fixture {
                _tmp: tmp,
                state,
                svc,
            };
            f.vm("ab12");
            f
        }

        /// A VM dir with a COW store of the right size.
        fn vm(&self, id: &str) {
            std::fs::create_dir_all(self.state.join("vms").join(id)).unwrap();
            let cow = std::fs::File::create(self.cow(id)).unwrap();
            cow.set_len(crate::cow_size(1 << 20)).unwrap();
        }

        fn cow(&self, id: &str) -> PathBuf {
            self.state.join("vms").join(id).join("root.cow")
        }

        fn rootfs(&self) -> PathBuf {
            self.state.join("images/deb/rootfs.ext4")
        }

        fn params(&self, id: &str) -> SnapshotCreateParams {
            SnapshotCreateParams {
                name: format!("bg-{id}"),
                origin: self.rootfs().display().to_string(),
                cow: self.cow(id).display().to_string(),
            }
        }

        fn host(&self) -> &RecordingHostDisk {
            self.svc.host()
        }

        fn assert_clean(&self) {
            assert!(
                self.host().dm_names().is_empty(),
                "{:?}",
                self.host().dm_names()
            );
            assert!(
                self.host().loop_devices().is_empty(),
                "{:?}",
                self.host().loop_devices()
            );
        }
    }

    #[tokio::test]
    async fn create_attaches_snapshots_and_hands_over_the_node() {
        let f = Fixture::new();
        let r = f
            .svc
            .snapshot_create(&f.params("ab12"), uid())
            .await
            .unwrap();
        assert_eq!(r.device, "/dev/mapper/bg-ab12");
        assert_eq!(
            f.host().mutations(),
            vec![
                Call::LoopAttach {
                    path: f.rootfs(),
                    read_only: true
                },
                Call::LoopAttach {
                    path: f.cow("ab12"),
                    read_only: false
                },
                Call::DmCreate {
                    name: "bg-ab12".into(),
                    table: format!("0 2048 snapshot {} {} P 8", r.origin_loop, r.cow_loop),
                },
                Call::DmChown("bg-ab12".into(), uid()),
            ]
        );
        assert_eq!(f.host().dm("bg-ab12").unwrap().owner, Some(uid()));
        // A second VM of the same image gets its own pair of loop devices.
        f.vm("cd34");
        let r2 = f
            .svc
            .snapshot_create(&f.params("cd34"), uid())
            .await
            .unwrap();
        assert_ne!(r2.origin_loop, r.origin_loop);
        assert_eq!(f.host().loop_devices().len(), 4);
        // Taken name: conflict, nothing done.
        f.host().clear_calls();
        let e = f
            .svc
            .snapshot_create(&f.params("ab12"), uid())
            .await
            .unwrap_err();
        assert_eq!(e.code(), ErrorCode::Conflict, "{e}");
        assert!(f.host().mutations().is_empty());
    }

    #[tokio::test]
    async fn a_failure_at_any_step_leaves_nothing() {
        for (op, skip, undone) in [
            ("loop_attach", 0, 0),
            ("loop_attach", 1, 1),
            ("dm_create", 0, 2),
            ("dm_chown", 0, 3),
        ] {
            let f = Fixture::new();
            f.host().fail_nth(op, skip);
            let e = f
                .svc
                .snapshot_create(&f.params("ab12"), uid())
                .await
                .unwrap_err();
            assert_eq!(e.code(), ErrorCode::Internal, "{op}: {e}");
            assert!(e.to_string().contains(op), "{e}");
            f.assert_clean();
            // The undo is the reverse of what was made.
            let undo: Vec<Call> = f
                .host()
                .mutations()
                .into_iter()
                .filter(|c| matches!(c, Call::DmRemove(_) | Call::LoopDetach(_)))
                .collect();
            let expected: Vec<Call> = [
                Call::DmRemove("bg-ab12".into()),
                Call::LoopDetach("/dev/loop1".into()),
                Call::LoopDetach("/dev/loop0".into()),
            ]
            .into_iter()
            .skip(3 - undone.min(3))
            .filter(|c| undone == 3 || !matches!(c, Call::DmRemove(_)))
            .collect();
            assert_eq!(undo, expected, "{op}");
            // And the name is free for the next try.
            f.svc
                .snapshot_create(&f.params("ab12"), uid())
                .await
                .unwrap();
        }
    }

    #[tokio::test]
    async fn refuses_what_is_not_bangers_before_touching_anything() {
        let f = Fixture::new();
        let outside = f.state.parent().unwrap().join("outside.img");
        std::fs::File::create(&outside)
            .unwrap()
            .set_len(crate::cow_size(1 << 20))
            .unwrap();
        std::os::unix::fs::symlink(&outside, f.state.join("vms/ab12/evil")).unwrap();
        let odd = f.state.join("images/deb/odd.ext4");
        std::fs::write(&odd, [0u8; 1000]).unwrap();
        let small = f.state.join("vms/ab12/small.cow");
        std::fs::write(&small, [0u8; 4096]).unwrap();
        let s = |p: &Path| p.display().to_string();
        let base = f.params("ab12");
        let cases = [
            (
                SnapshotCreateParams {
                    name: "vg0-root".into(),
                    ..base.clone()
                },
                "not a banger dm device",
            ),
            (
                SnapshotCreateParams {
                    name: "bg-XYZ".into(),
                    ..base.clone()
                },
                "not a banger dm device",
            ),
            (
                SnapshotCreateParams {
                    origin: "/etc/passwd".into(),
                    ..base.clone()
                },
                "not under",
            ),
            (
                SnapshotCreateParams {
                    origin: s(&outside),
                    ..base.clone()
                },
                "not under",
            ),
            (
                SnapshotCreateParams {
                    cow: s(&f.state.join("vms/ab12/evil")),
                    ..base.clone()
                },
                "symlink",
            ),
            (
                SnapshotCreateParams {
                    cow: s(&f.state.join("vms/ab12")),
                    ..base.clone()
                },
                "not a regular file",
            ),
            (
                SnapshotCreateParams {
                    cow: base.origin.clone(),
                    ..base.clone()
                },
                "same file",
            ),
            (
                SnapshotCreateParams {
                    origin: s(&odd),
                    ..base.clone()
                },
                "multiple of 512",
            ),
            (
                SnapshotCreateParams {
                    cow: s(&small),
                    ..base.clone()
                },
                "too small",
            ),
        ];
        for (p, why) in cases {
            let e = f.svc.snapshot_create(&p, uid()).await.unwrap_err();
            assert_eq!(e.code(), ErrorCode::InvalidParams, "{p:?}: {e}");
            assert!(e.to_string().contains(why), "{p:?}: {e}");
        }
        // Files of another uid (a hard link to someone else's file).
        let e = f.svc.snapshot_create(&base, uid() + 1).await.unwrap_err();
        assert_eq!(e.code(), ErrorCode::InvalidParams);
        assert!(e.to_string().contains("not by the caller"), "{e}");
        for (bad, why) in [
            ("/dev/sda", "not a loop device"),
            ("/dev/loop0p1", "not a loop device"),
        ] {
            let e = f
                .svc
                .loop_detach(&LoopDetachParams { device: bad.into() }, uid())
                .await
                .unwrap_err();
            assert_eq!(e.code(), ErrorCode::InvalidParams);
            assert!(e.to_string().contains(why), "{e}");
        }
        let e = f
            .svc
            .snapshot_remove(
                &SnapshotRemoveParams {
                    name: "vg0-root".into(),
                },
                uid(),
            )
            .await
            .unwrap_err();
        assert_eq!(e.code(), ErrorCode::InvalidParams);
        // Someone else's loop device: refused by its backing file.
        f.host()
            .add_loop("/dev/loop7", Path::new("/var/lib/other.img"));
        let e = f
            .svc
            .loop_detach(
                &LoopDetachParams {
                    device: "/dev/loop7".into(),
                },
                uid(),
            )
            .await
            .unwrap_err();
        assert_eq!(e.code(), ErrorCode::InvalidParams);
        assert!(e.to_string().contains("/var/lib/other.img"), "{e}");
        assert!(
            f.host().mutations().is_empty(),
            "{:?}",
            f.host().mutations()
        );
    }

    #[tokio::test]
    async fn without_device_mapper_create_is_unavailable() {
        let f = Fixture::new();
        f.host().set_unavailable("/dev/mapper/control is missing");
        let e = f
            .svc
            .snapshot_create(&f.params("ab12"), uid())
            .await
            .unwrap_err();
        assert_eq!(e.code(), ErrorCode::Unavailable);
        assert!(e.to_string().contains("/dev/mapper/control"), "{e}");
        assert!(f.host().mutations().is_empty());
        let l = f.svc.list().await.unwrap();
        assert!(l.unavailable.is_some());
        // A helper started without --state-dir attaches nothing.
        let none = DiskService::new(RecordingHostDisk::new(), vec![]);
        let e = none
            .snapshot_create(&f.params("ab12"), uid())
            .await
            .unwrap_err();
        assert!(e.to_string().contains("--state-dir"), "{e}");
    }

    #[tokio::test]
    async fn remove_is_idempotent_and_recreate_reuses_the_cow_store() {
        let f = Fixture::new();
        f.svc
            .snapshot_create(&f.params("ab12"), uid())
            .await
            .unwrap();
        let rm = SnapshotRemoveParams {
            name: "bg-ab12".into(),
        };
        assert!(f.svc.snapshot_remove(&rm, uid()).await.unwrap().deleted);
        f.assert_clean();
        assert!(!f.svc.snapshot_remove(&rm, uid()).await.unwrap().deleted);
        // `vm start` after `stop`: the same COW store, attached again.
        assert!(f.cow("ab12").exists());
        f.host().clear_calls();
        f.svc
            .snapshot_create(&f.params("ab12"), uid())
            .await
            .unwrap();
        assert!(f.host().mutations().contains(&Call::LoopAttach {
            path: f.cow("ab12"),
            read_only: false
        }));
        // A failing detach is reported; the orphan shows in the list, and
        // the next remove takes it.
        f.host().fail_nth("loop_detach", 1);
        assert!(f.svc.snapshot_remove(&rm, uid()).await.is_err());
        let l = f.svc.list().await.unwrap();
        assert!(l.snapshots.is_empty());
        assert_eq!(l.loops.len(), 1, "{l:?}");
        assert_eq!(l.loops[0].held_by, None);
        assert!(f.svc.snapshot_remove(&rm, uid()).await.unwrap().deleted);
        f.assert_clean();
    }

    #[tokio::test]
    async fn remove_also_takes_what_a_crash_mid_create_left() {
        let f = Fixture::new();
        f.vm("cd34");
        f.svc
            .snapshot_create(&f.params("cd34"), uid())
            .await
            .unwrap();
        // A helper killed between the attaches and `dmsetup create` of ab12.
        f.host().add_loop("/dev/loop7", &f.rootfs());
        f.host().add_loop("/dev/loop8", &f.cow("ab12"));
        f.host()
            .add_loop("/dev/loop9", Path::new("/var/lib/other.img"));
        let rm = SnapshotRemoveParams {
            name: "bg-ab12".into(),
        };
        assert!(f.svc.snapshot_remove(&rm, uid()).await.unwrap().deleted);
        // cd34's snapshot and its loops, and the foreign loop, are untouched.
        assert_eq!(f.host().dm_names(), vec!["bg-cd34"]);
        let left: Vec<String> = f.host().loop_devices().into_keys().collect();
        assert_eq!(left, vec!["/dev/loop0", "/dev/loop1", "/dev/loop9"]);
        assert!(!f.svc.snapshot_remove(&rm, uid()).await.unwrap().deleted);
    }

    #[tokio::test]
    async fn list_shows_only_bangers_and_orphans_can_be_detached() {
        let f = Fixture::new();
        f.svc
            .snapshot_create(&f.params("ab12"), uid())
            .await
            .unwrap();
        f.host()
            .add_loop("/dev/loop9", Path::new("/var/lib/other.img"));
        f.host().add_dm("vg0-root", &["/dev/sda2"]);
        // What a helper killed between attach and dm create leaves.
        f.host().add_loop("/dev/loop5", &f.rootfs());
        let l = f.svc.list().await.unwrap();
        assert_eq!(l.unavailable, None);
        assert_eq!(l.state_dirs, vec![f.state.display().to_string()]);
        assert_eq!(
            l.snapshots,
            vec![SnapshotInfo {
                name: "bg-ab12".into(),
                slaves: vec!["/dev/loop0".into(), "/dev/loop1".into()],
            }]
        );
        let held: Vec<_> = l
            .loops
            .iter()
            .map(|l| (l.device.as_str(), l.held_by.as_deref()))
            .collect();
        assert_eq!(
            held,
            vec![
                ("/dev/loop0", Some("bg-ab12")),
                ("/dev/loop1", Some("bg-ab12")),
                ("/dev/loop5", None),
            ]
        );
        let e = f
            .svc
            .loop_detach(
                &LoopDetachParams {
                    device: "/dev/loop0".into(),
                },
                uid(),
            )
            .await
            .unwrap_err();
        assert_eq!(e.code(), ErrorCode::Conflict, "{e}");
        let orphan = LoopDetachParams {
            device: "/dev/loop5".into(),
        };
        assert!(f.svc.loop_detach(&orphan, uid()).await.unwrap().deleted);
        assert!(!f.svc.loop_detach(&orphan, uid()).await.unwrap().deleted);
        assert_eq!(f.host().loop_devices().len(), 3);
    }

    /// Two installs side by side: a snapshot on another install's files
    /// (outside this helper's state dirs) or on files another uid owns is
    /// neither removed nor detached, whoever names it.
    #[tokio::test]
    async fn another_installs_or_users_devices_are_refused() {
        let f = Fixture::new();
        f.svc
            .snapshot_create(&f.params("ab12"), uid())
            .await
            .unwrap();
        let rm = SnapshotRemoveParams {
            name: "bg-ab12".into(),
        };
        // Not the caller's files (a uid that is not root and not the owner).
        let e = f.svc.snapshot_remove(&rm, uid() + 1).await.unwrap_err();
        assert_eq!(e.code(), ErrorCode::InvalidParams, "{e}");
        assert!(e.to_string().contains("does not own"), "{e}");
        assert_eq!(f.svc.list().await.unwrap().snapshots.len(), 1);
        // Another install's snapshot: its loops are over files elsewhere.
        let elsewhere = tempfile::tempdir().unwrap();
        let theirs = elsewhere.path().join("root.cow");
        std::fs::write(&theirs, b"").unwrap();
        f.host().add_loop("/dev/loop40", &theirs);
        f.host().add_dm("bg-ff00", &["/dev/loop40"]);
        let e = f
            .svc
            .snapshot_remove(
                &SnapshotRemoveParams {
                    name: "bg-ff00".into(),
                },
                0,
            )
            .await
            .unwrap_err();
        assert!(
            e.to_string().contains("not under banger's state directory"),
            "{e}"
        );
        f.host().add_loop("/dev/loop41", &theirs);
        let e = f
            .svc
            .loop_detach(
                &LoopDetachParams {
                    device: "/dev/loop41".into(),
                },
                0,
            )
            .await
            .unwrap_err();
        assert!(e.to_string().contains("not under"), "{e}");
        // Nothing of theirs was touched; ours still goes.
        assert!(
            !f.host()
                .mutations()
                .iter()
                .any(|c| format!("{c:?}").contains("ff00")
                    || format!("{c:?}").contains("loop40")
                    || format!("{c:?}").contains("loop41"))
        );
        assert!(f.svc.snapshot_remove(&rm, uid()).await.unwrap().deleted);
    }

    #[tokio::test]
    async fn a_loop_whose_file_was_replaced_at_its_path_is_refused() {
        let f = Fixture::new();
        f.vm("cd34");
        let cow = f.cow("cd34");
        std::fs::write(&cow, b"").unwrap();
        // Someone's loop device over a file that then went away, and a
        // file of the caller's put at the same path: the path now says
        // "ours", the device is over something else.
        f.host().add_loop("/dev/loop42", &cow);
        let elsewhere = cow.with_extension("new");
        std::fs::write(&elsewhere, b"").unwrap();
        std::fs::rename(&elsewhere, &cow).unwrap();
        let e = f
            .svc
            .loop_detach(
                &LoopDetachParams {
                    device: "/dev/loop42".into(),
                },
                uid(),
            )
            .await
            .unwrap_err();
        assert!(e.to_string().contains("moved or replaced"), "{e}");
        f.host().add_dm("bg-cd34", &["/dev/loop42"]);
        let e = f
            .svc
            .snapshot_remove(
                &SnapshotRemoveParams {
                    name: "bg-cd34".into(),
                },
                uid(),
            )
            .await
            .unwrap_err();
        assert!(e.to_string().contains("moved or replaced"), "{e}");
        assert!(
            f.host().mutations().is_empty(),
            "{:?}",
            f.host().mutations()
        );
    }
}
