//! Copy-on-write root disks: whether device-mapper is there, whether the
//! state directory's filesystem can clone files (reflinks), and the copy a
//! VM's disk is made with.

use std::fs::File;
use std::io;
use std::path::Path;

use rustix::fs::SeekFrom;
use rustix::io::Errno;

/// How a VM's root disk is made from an image's read-only rootfs, best first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RootDiskStrategy {
    /// A device-mapper snapshot made by the root helper (`disk.*` methods):
    /// instant, a raw block device for every VMM, the VM's writes in a
    /// sparse `root.cow`. Chosen by the daemon when [`device_mapper`] finds
    /// the host side and the helper serves the state directory.
    DmSnapshot,
    /// A reflink clone: instant, shares blocks until written, raw for every VMM.
    Reflink,
    /// No reflinks: a qcow2 overlay for QEMU, a sparse copy for Firecracker
    /// (which takes raw disks only; its cost grows with the image's data).
    OverlayOrCopy,
}

/// The file in the state directory where the daemon records its choice,
/// for `banger doctor`.
const CHOICE_FILE: &str = "root-disks";

impl RootDiskStrategy {
    fn as_str(self) -> &'static str {
        match self {
            RootDiskStrategy::DmSnapshot => "dm-snapshot",
            RootDiskStrategy::Reflink => "reflink",
            RootDiskStrategy::OverlayOrCopy => "overlay-or-copy",
        }
    }

    /// Record the daemon's choice in `state_dir`.
    pub fn save(self, state_dir: &Path) -> io::Result<()> {
        let tmp = state_dir.join(format!("{CHOICE_FILE}.tmp"));
        std::fs::write(&tmp, self.as_str())?;
        std::fs::rename(tmp, state_dir.join(CHOICE_FILE))
    }

    /// The choice a daemon recorded in `state_dir`, if any.
    pub fn load(state_dir: &Path) -> Option<RootDiskStrategy> {
        let text = std::fs::read_to_string(state_dir.join(CHOICE_FILE)).ok()?;
        [
            RootDiskStrategy::DmSnapshot,
            RootDiskStrategy::Reflink,
            RootDiskStrategy::OverlayOrCopy,
        ]
        .into_iter()
        .find(|s| s.as_str() == text.trim())
    }

    /// Probes `dir` (created if missing) with a clone of a small temporary
    /// file, removed at once: [`Self::Reflink`] or [`Self::OverlayOrCopy`].
    pub fn probe(dir: &Path) -> io::Result<RootDiskStrategy> {
        std::fs::create_dir_all(dir)?;
        let src = tempfile::NamedTempFile::new_in(dir)?;
        std::io::Write::write_all(&mut src.as_file(), &[0x5a; 4096])?;
        let dst = tempfile::NamedTempFile::new_in(dir)?;
        Ok(
            match rustix::fs::ioctl_ficlone(dst.as_file(), src.as_file()) {
                Ok(()) => RootDiskStrategy::Reflink,
                Err(e) if not_supported(e) => RootDiskStrategy::OverlayOrCopy,
                Err(e) => return Err(e.into()),
            },
        )
    }
}

/// The host side of device-mapper snapshots: the control node and the
/// `dmsetup` and `losetup` tools (the helper runs them). `Err` says what is
/// missing and how to get it.
pub fn device_mapper() -> Result<(), String> {
    device_mapper_at(Path::new("/dev/mapper/control"), &crate::find_binary)
}

fn device_mapper_at(
    control: &Path,
    find: &dyn Fn(&str) -> Option<std::path::PathBuf>,
) -> Result<(), String> {
    if !control.exists() {
        return Err(format!(
            "{} is missing (no device-mapper; sudo modprobe dm_snapshot)",
            control.display()
        ));
    }
    match ["dmsetup", "losetup"]
        .into_iter()
        .find(|b| find(b).is_none())
    {
        Some(b) => Err(format!(
            "{b} not found (sudo apt install dmsetup util-linux)"
        )),
        None => Ok(()),
    }
}

fn not_supported(e: Errno) -> bool {
    matches!(
        e,
        Errno::OPNOTSUPP | Errno::XDEV | Errno::INVAL | Errno::NOTTY | Errno::BADF | Errno::PERM
    )
}

/// How [`clone_or_copy`] made the copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Copied {
    Reflink,
    /// Only the source's data extents were copied; its holes stay holes.
    Sparse,
}

/// Copy `from` to a new file `to`: a reflink clone where the filesystem
/// has them, else a copy of the data extents only (holes stay holes).
pub fn clone_or_copy(from: &Path, to: &Path) -> io::Result<Copied> {
    let src = File::open(from)?;
    let dst = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(to)?;
    let result = match rustix::fs::ioctl_ficlone(&dst, &src) {
        Ok(()) => Ok(Copied::Reflink),
        Err(e) if not_supported(e) => sparse_copy(&src, &dst).map(|()| Copied::Sparse),
        Err(e) => Err(e.into()),
    };
    if result.is_err() {
        let _ = std::fs::remove_file(to);
    }
    result
}

/// Copy each data extent of `src` (found with SEEK_DATA / SEEK_HOLE) with
/// `copy_file_range`, then set the length so a trailing hole stays a hole.
fn sparse_copy(src: &File, dst: &File) -> io::Result<()> {
    let len = src.metadata()?.len();
    let mut pos = 0u64;
    while pos < len {
        let data = match rustix::fs::seek(src, SeekFrom::Data(pos)) {
            Ok(d) => d,
            // No data after `pos`: the rest is a hole.
            Err(Errno::NXIO) => break,
            Err(e) => return Err(e.into()),
        };
        let hole = rustix::fs::seek(src, SeekFrom::Hole(data))?.min(len);
        let (mut off_in, mut off_out) = (data, data);
        while off_in < hole {
            let want = usize::try_from(hole - off_in).unwrap_or(usize::MAX);
            let n = rustix::fs::copy_file_range(
                src,
                Some(&mut off_in),
                dst,
                Some(&mut off_out),
                want.min(1 << 30),
            )?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the source shrank while being copied",
                ));
            }
        }
        pos = hole;
    }
    dst.set_len(len)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, Write};
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn sparse_copy_keeps_data_and_holes() {
        let dir = tempfile::tempdir().unwrap();
        let from = dir.path().join("src.img");
        let mut f = File::create(&from).unwrap();
        // data, a 64 MiB hole, data, and a trailing 32 MiB hole
        f.write_all(&[1u8; 8192]).unwrap();
        f.seek(std::io::SeekFrom::Start(64 << 20)).unwrap();
        f.write_all(&[2u8; 8192]).unwrap();
        f.set_len(128 << 20).unwrap();
        drop(f);
        let to = dir.path().join("dst.img");
        clone_or_copy(&from, &to).unwrap();
        let (a, b) = (std::fs::read(&from).unwrap(), std::fs::read(&to).unwrap());
        assert_eq!(a.len(), b.len());
        assert!(a == b, "contents differ");
        // Holes stayed holes (or the blocks are shared by a reflink).
        let blocks = std::fs::metadata(&to).unwrap().blocks() * 512;
        assert!(
            blocks < 8 << 20,
            "{blocks} bytes allocated for 16 KiB of data"
        );
    }

    #[test]
    fn an_existing_destination_is_refused_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (from, to) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&from, b"new").unwrap();
        std::fs::write(&to, b"old").unwrap();
        let e = clone_or_copy(&from, &to).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&to).unwrap(), b"old");
    }

    #[test]
    fn device_mapper_needs_the_control_node_and_both_tools() {
        let dir = tempfile::tempdir().unwrap();
        let control = dir.path().join("control");
        let all = |_: &str| Some(std::path::PathBuf::from("/sbin/x"));
        let e = device_mapper_at(&control, &all).unwrap_err();
        assert!(e.contains("modprobe dm_snapshot"), "{e}");
        std::fs::write(&control, b"").unwrap();
        device_mapper_at(&control, &all).unwrap();
        let no_dmsetup = |b: &str| (b != "dmsetup").then(|| std::path::PathBuf::from("/sbin/x"));
        let e = device_mapper_at(&control, &no_dmsetup).unwrap_err();
        assert!(e.starts_with("dmsetup not found"), "{e}");
    }

    #[test]
    fn the_daemons_choice_is_recorded() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(RootDiskStrategy::load(dir.path()), None);
        for s in [
            RootDiskStrategy::DmSnapshot,
            RootDiskStrategy::Reflink,
            RootDiskStrategy::OverlayOrCopy,
        ] {
            s.save(dir.path()).unwrap();
            assert_eq!(RootDiskStrategy::load(dir.path()), Some(s));
        }
    }

    #[test]
    fn probe_answers_for_a_real_directory() {
        let dir = tempfile::tempdir().unwrap();
        // ext4 here (no reflinks); btrfs/xfs elsewhere. Either is an answer,
        // and the probe leaves nothing behind.
        RootDiskStrategy::probe(dir.path()).unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
