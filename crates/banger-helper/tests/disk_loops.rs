//! The real `banger-helper` serving `disk.*` with real loop devices. Only
//! files in this test's temporary state directory are attached, and every
//! loop device over them is detached at the end.
//!
//! Needs root and loop devices (`/dev/loop-control`, `losetup`): without them
//! the test fails rather than skips. Device-mapper is used where the host has
//! it (a full snapshot create and remove); without it, a create must answer
//! `unavailable` having attached nothing.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use banger_rpc::{Client, ClientError};
use banger_wire::helper::{
    DiskList, DiskListResult, DiskLoopDetach, DiskSnapshotCreate, DiskSnapshotRemove,
    LoopDetachParams, SnapshotCreateParams, SnapshotRemoveParams,
};
use banger_wire::{ErrorCode, Method, NoParams};

fn losetup(args: &[&str]) -> String {
    let out = Command::new("losetup")
        .args(args)
        .output()
        .expect("cannot run losetup (util-linux)");
    assert!(
        out.status.success(),
        "losetup {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// A state directory with an image rootfs and a VM's COW store, the helper
/// serving it, and cleanup of every loop device over its files.
struct Setup {
    dir: tempfile::TempDir,
    state: PathBuf,
    socket: PathBuf,
    log: PathBuf,
    helper: Option<Child>,
}

impl Setup {
    fn new() -> Setup {
        assert!(
            rustix::process::geteuid().is_root(),
            "this test attaches loop devices and must run as root"
        );
        assert!(
            Path::new("/dev/loop-control").exists(),
            "this test needs loop devices (/dev/loop-control)"
        );
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().canonicalize().unwrap().join("state");
        std::fs::create_dir_all(state.join("images/img1")).unwrap();
        std::fs::create_dir_all(state.join("vms/ab12")).unwrap();
        let rootfs = std::fs::File::create(state.join("images/img1/rootfs.ext4")).unwrap();
        rootfs.set_len(4 << 20).unwrap();
        let cow = std::fs::File::create(state.join("vms/ab12/root.cow")).unwrap();
        cow.set_len(banger_disk::cow_size(4 << 20)).unwrap();
        Setup {
            socket: dir.path().join("helper.sock"),
            log: dir.path().join("helper.log"),
            dir,
            state,
            helper: None,
        }
    }

    fn path(&self, rel: &str) -> String {
        self.state.join(rel).display().to_string()
    }

    async fn start_helper(&mut self) -> Client {
        let child = Command::new(env!("CARGO_BIN_EXE_banger-helper"))
            .arg("--socket")
            .arg(&self.socket)
            .args(["--allow-uid", "0"])
            .arg("--state-dir")
            .arg(&self.state)
            .arg("--log-file")
            .arg(&self.log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("cannot start banger-helper");
        self.helper = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(c) = Client::connect(&self.socket).await {
                return c;
            }
            if let Some(status) = self.helper.as_mut().unwrap().try_wait().unwrap() {
                panic!("banger-helper exited at startup: {status}");
            }
            assert!(Instant::now() < deadline, "banger-helper did not listen");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Loop devices over files of this test, with their backing files.
    fn our_loops(&self) -> Vec<(String, String)> {
        let root = self.dir.path().canonicalize().unwrap();
        let mut out = Vec::new();
        for e in std::fs::read_dir("/sys/block").unwrap().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Ok(backing) = std::fs::read_to_string(e.path().join("loop/backing_file")) else {
                continue;
            };
            if Path::new(backing.trim_end()).starts_with(&root) {
                out.push((format!("/dev/{name}"), backing.trim_end().to_owned()));
            }
        }
        out.sort();
        out
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        if let Some(mut child) = self.helper.take() {
            let pid = rustix::process::Pid::from_child(&child);
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            let _ = child.wait();
        }
        let name = format!("bg-{}", "ab12");
        if Path::new("/dev/mapper/control").exists() {
            let _ = Command::new("dmsetup")
                .args(["remove", &name])
                .stderr(Stdio::null())
                .status();
        }
        for (dev, _) in self.our_loops() {
            let _ = Command::new("losetup").args(["--detach", &dev]).status();
        }
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            eprintln!("--- banger-helper log ---\n{log}");
        }
    }
}

async fn call<M: Method>(c: &mut Client, p: &M::Params) -> M::Result {
    c.call::<M>(p, None)
        .await
        .unwrap_or_else(|e| panic!("{} failed: {e}", M::NAME))
}

async fn refused<M: Method>(c: &mut Client, p: &M::Params) -> (ErrorCode, String) {
    match c.call::<M>(p, None).await {
        Err(ClientError::Remote(obj)) => (obj.code, obj.message),
        Ok(_) => panic!("{} was not refused", M::NAME),
        Err(e) => panic!("{} failed: {e}", M::NAME),
    }
}

#[tokio::test]
async fn disk_methods_with_real_loop_devices() {
    let mut s = Setup::new();
    let mut c = s.start_helper().await;
    let list: DiskListResult = call::<DiskList>(&mut c, &NoParams {}).await;
    assert_eq!(list.state_dirs, vec![s.state.display().to_string()]);
    assert!(
        list.loops.is_empty() && list.snapshots.is_empty(),
        "{list:?}"
    );

    // Each method refuses what is not banger's, before doing anything.
    let good = SnapshotCreateParams {
        name: "bg-ab12".into(),
        origin: s.path("images/img1/rootfs.ext4"),
        cow: s.path("vms/ab12/root.cow"),
    };
    let outside = s.dir.path().join("outside.img");
    std::fs::File::create(&outside)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    for bad in [
        SnapshotCreateParams {
            name: "vg0-root".into(),
            ..good.clone()
        },
        SnapshotCreateParams {
            origin: outside.display().to_string(),
            ..good.clone()
        },
        SnapshotCreateParams {
            cow: "/etc/passwd".into(),
            ..good.clone()
        },
    ] {
        let (code, msg) = refused::<DiskSnapshotCreate>(&mut c, &bad).await;
        assert_eq!(code, ErrorCode::InvalidParams, "{bad:?}: {msg}");
    }
    let (code, _) = refused::<DiskSnapshotRemove>(
        &mut c,
        &SnapshotRemoveParams {
            name: "../control".into(),
        },
    )
    .await;
    assert_eq!(code, ErrorCode::InvalidParams);
    let (code, _) = refused::<DiskLoopDetach>(
        &mut c,
        &LoopDetachParams {
            device: "/dev/sda".into(),
        },
    )
    .await;
    assert_eq!(code, ErrorCode::InvalidParams);
    // A loop device over a file outside the state directory is not banger's.
    let foreign = losetup(&["--find", "--show", outside.to_str().unwrap()]);
    let (code, msg) = refused::<DiskLoopDetach>(
        &mut c,
        &LoopDetachParams {
            device: foreign.clone(),
        },
    )
    .await;
    assert_eq!(code, ErrorCode::InvalidParams, "{msg}");
    assert_eq!(s.our_loops().len(), 1, "the foreign loop stays");
    losetup(&["--detach", &foreign]);

    // What a helper killed mid-create leaves: loops under no snapshot.
    let orphan = losetup(&["--find", "--show", "--read-only", &good.origin]);
    let list = call::<DiskList>(&mut c, &NoParams {}).await;
    assert_eq!(list.loops.len(), 1, "{list:?}");
    assert_eq!(
        (
            list.loops[0].device.as_str(),
            list.loops[0].held_by.as_deref()
        ),
        (orphan.as_str(), None)
    );
    let detach = LoopDetachParams {
        device: orphan.clone(),
    };
    assert!(call::<DiskLoopDetach>(&mut c, &detach).await.deleted);
    assert!(!call::<DiskLoopDetach>(&mut c, &detach).await.deleted);
    assert!(s.our_loops().is_empty());
    // snapshot_remove sweeps them too.
    losetup(&["--find", "--show", &good.cow]);
    let rm = SnapshotRemoveParams {
        name: "bg-ab12".into(),
    };
    assert!(call::<DiskSnapshotRemove>(&mut c, &rm).await.deleted);
    assert!(s.our_loops().is_empty());

    // Which branch runs is the kernel's to say, not whatever `unavailable`
    // happens to be: with device-mapper in the kernel, dmsetup (installed by
    // scripts/deps.sh) must make the real snapshot.
    let kernel_has_dm = std::path::Path::new("/dev/mapper/control").exists();
    match list.unavailable {
        Some(why) if kernel_has_dm => {
            panic!("this kernel has device-mapper, yet snapshots are unavailable: {why}")
        }
        None if !kernel_has_dm => panic!("no /dev/mapper/control, yet snapshots are available"),
        // No device-mapper (as on this machine kind): a create is refused
        // with the reason, and attaches nothing.
        Some(why) => {
            eprintln!("this kernel has no device-mapper: asserting banger's refusal ({why})");
            assert!(why.contains("/dev/mapper/control is missing"), "{why}");
            let (code, msg) = refused::<DiskSnapshotCreate>(&mut c, &good).await;
            assert_eq!(code, ErrorCode::Unavailable, "{msg}");
            assert!(msg.contains(&why), "{msg}");
            assert!(s.our_loops().is_empty());
        }
        // Device-mapper: the real thing, twice over the same COW store.
        None => {
            for _ in 0..2 {
                let r = call::<DiskSnapshotCreate>(&mut c, &good).await;
                assert_eq!(r.device, "/dev/mapper/bg-ab12");
                let meta = std::fs::metadata(&r.device).unwrap();
                assert!(std::os::unix::fs::FileTypeExt::is_block_device(
                    &meta.file_type()
                ));
                assert_eq!(std::os::unix::fs::MetadataExt::uid(&meta), 0);
                assert_eq!(s.our_loops().len(), 2);
                let (code, _) = refused::<DiskSnapshotCreate>(&mut c, &good).await;
                assert_eq!(code, ErrorCode::Conflict);
                assert!(call::<DiskSnapshotRemove>(&mut c, &rm).await.deleted);
                assert!(!Path::new(&r.device).exists());
                assert!(s.our_loops().is_empty());
            }
        }
    }
    assert!(!call::<DiskSnapshotRemove>(&mut c, &rm).await.deleted);
}
