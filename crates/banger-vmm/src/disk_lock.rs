//! The exclusive lock a VMM holds on the disks it runs on.
//!
//! Before a VMM starts, the driver takes a `flock(LOCK_EX)` on each of the
//! VM's writable disks and hands the locked descriptors to the VMM process
//! (they survive its `exec`, and QEMU's `-daemonize` fork). The lock then
//! lives exactly as long as the VMM: when it exits, however it exits, the
//! kernel drops it. A second VMM for the same disks, whatever path gets
//! there, finds the lock taken and is refused before it can open them.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::Path;

use rustix::fs::{FlockOperation, flock};
use rustix::io::Errno;

use crate::{DiskSpec, VmmError};

/// Locked disks, until they are handed to the VMM (and then dropped here).
#[derive(Debug)]
pub struct DiskLocks(Vec<File>);

impl DiskLocks {
    /// Lock every writable disk of `disks`, or say which one a running VMM
    /// holds.
    pub fn take(disks: &[DiskSpec]) -> Result<DiskLocks, VmmError> {
        let mut files = Vec::new();
        for d in disks.iter().filter(|d| !d.read_only) {
            files.push(lock(&d.path)?);
        }
        Ok(DiskLocks(files))
    }

    /// The descriptors a VMM process must keep open across `exec`.
    pub fn fds(&self) -> Vec<RawFd> {
        self.0.iter().map(AsRawFd::as_raw_fd).collect()
    }
}

fn lock(path: &Path) -> Result<File, VmmError> {
    let in_use = |path: &Path| VmmError::DiskInUse {
        path: path.to_path_buf(),
    };
    let f = File::open(path).map_err(|e| VmmError::Launch {
        what: "cannot open a disk to lock it",
        message: format!("{}: {e}", path.display()),
    })?;
    match flock(f.as_fd(), FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(f),
        Err(Errno::WOULDBLOCK) => Err(in_use(path)),
        Err(e) => Err(VmmError::Launch {
            what: "cannot lock a disk",
            message: format!("{}: {e}", path.display()),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DiskFormat;

    fn disk(path: &Path, read_only: bool) -> DiskSpec {
        DiskSpec {
            path: path.to_path_buf(),
            format: DiskFormat::Raw,
            read_only,
        }
    }

    #[tokio::test]
    async fn a_process_given_the_locks_holds_them_until_it_exits() {
        let dir = tempfile::tempdir().unwrap();
        let (root, seed) = (dir.path().join("root.ext4"), dir.path().join("seed"));
        std::fs::write(&root, b"disk").unwrap();
        std::fs::write(&seed, b"read-only").unwrap();
        let disks = [disk(&root, false), disk(&seed, true)];
        let locks = DiskLocks::take(&disks).unwrap();
        let mut cmd = tokio::process::Command::new("sleep");
        cmd.arg("30");
        banger_firecracker::inherit_fds(&mut cmd, locks.fds());
        let mut vmm = cmd.spawn().unwrap();
        drop(locks);
        // The "VMM" holds the root disk; read-only disks are not locked.
        match DiskLocks::take(&disks) {
            Err(VmmError::DiskInUse { path }) => assert_eq!(path, root),
            other => panic!("a second lock was granted: {other:?}"),
        }
        DiskLocks::take(&[disk(&seed, false)]).unwrap();
        vmm.kill().await.unwrap();
        vmm.wait().await.unwrap();
        DiskLocks::take(&disks).unwrap();
    }
}
