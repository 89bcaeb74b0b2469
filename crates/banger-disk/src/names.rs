//! What banger owns: dm devices named `bg-<hex>`, loop devices `/dev/loopN`,
//! and files under the helper's state directories.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{Mode, OFlags, ResolveFlags};

/// Prefix of banger's dm devices; the rest is a VM id.
pub const DM_PREFIX: &str = "bg-";

/// A request named or pointed at something that is not banger's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

pub fn is_dm_name(name: &str) -> bool {
    name.strip_prefix(DM_PREFIX).is_some_and(|hex| {
        (1..=32).contains(&hex.len())
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

pub fn check_dm_name(name: &str) -> Result<(), Refused> {
    if is_dm_name(name) {
        Ok(())
    } else {
        Err(Refused(format!(
            "{name:?} is not a banger dm device name ({DM_PREFIX} followed by 1 to 32 lowercase hex digits)"
        )))
    }
}

pub fn check_loop_device(device: &str) -> Result<(), Refused> {
    let ok = device
        .strip_prefix("/dev/loop")
        .is_some_and(|n| !n.is_empty() && n.len() <= 6 && n.bytes().all(|b| b.is_ascii_digit()));
    if ok {
        Ok(())
    } else {
        Err(Refused(format!(
            "{device:?} is not a loop device (/dev/loopN)"
        )))
    }
}

/// The state directories whose files the helper may attach, each pinned
/// by a directory descriptor the first time it is seen: a user who then
/// swaps the directory (or a component of a path under it) for a symlink
/// changes nothing the helper opens.
#[derive(Debug)]
pub struct StateDirs {
    dirs: Vec<PathBuf>,
    /// Per directory: its path as it resolved when pinned, and the pin.
    pins: std::sync::Mutex<Vec<Option<(PathBuf, OwnedFd)>>>,
}

impl StateDirs {
    pub fn new(dirs: Vec<PathBuf>) -> Self {
        let pins = std::sync::Mutex::new(dirs.iter().map(|_| None).collect());
        let me = StateDirs { dirs, pins };
        me.pin();
        me
    }

    /// Pin the directories not pinned yet (missing ones stay unpinned:
    /// nothing can be under them until they exist).
    fn pin(&self) {
        let mut pins = self.pins.lock().expect("state dir pins");
        for (dir, pin) in self.dirs.iter().zip(pins.iter_mut()) {
            if pin.is_some() {
                continue;
            }
            let Ok(fd) = rustix::fs::open(
                dir,
                OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            ) else {
                continue;
            };
            if let Ok(real) = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())) {
                *pin = Some((real, fd));
            }
        }
    }

    /// The directories as they were pinned.
    pub fn resolved(&self) -> Vec<PathBuf> {
        self.pin();
        self.pins
            .lock()
            .expect("state dir pins")
            .iter()
            .flatten()
            .map(|(real, _)| real.clone())
            .collect()
    }

    /// Is `path` (already resolved) strictly below a state directory?
    pub fn contains(&self, path: &Path) -> bool {
        self.resolved()
            .iter()
            .any(|d| path.starts_with(d) && path != d)
    }

    /// Open `path` for attaching: an absolute path strictly under a state
    /// directory (as configured, or as pinned), naming a regular file
    /// through plain components. The file is reached from the pinned
    /// directory with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)` as an
    /// `O_PATH` descriptor, checked to be a regular file, and only then
    /// opened for I/O (non-blocking, never a controlling terminal): the
    /// helper never opens anything else, not even for a moment.
    pub fn open(&self, what: &str, path: &str, write: bool) -> Result<(File, PathBuf), Refused> {
        let refuse = |why: String| Refused(format!("{what} {path:?}: {why}"));
        let p = Path::new(path);
        if !p.is_absolute() {
            return Err(refuse("not an absolute path".into()));
        }
        if self.dirs.is_empty() {
            return Err(refuse(
                "the helper serves no state directory (start it with --state-dir)".into(),
            ));
        }
        self.pin();
        let pins = self.pins.lock().expect("state dir pins");
        let found = self.dirs.iter().zip(pins.iter()).find_map(|(dir, pin)| {
            let (real, fd) = pin.as_ref()?;
            let rel = p.strip_prefix(dir).or_else(|_| p.strip_prefix(real)).ok()?;
            Some((real.clone(), fd, rel.to_owned()))
        });
        let Some((real, dirfd, rel)) = found else {
            return Err(refuse("not under banger's state directory".into()));
        };
        if rel.as_os_str().is_empty()
            || !rel
                .components()
                .all(|c| matches!(c, std::path::Component::Normal(_)))
        {
            return Err(refuse(
                "not under banger's state directory (only plain path components below it)".into(),
            ));
        }
        let at = rustix::fs::openat2(
            dirfd,
            &rel,
            OFlags::PATH | OFlags::CLOEXEC,
            Mode::empty(),
            ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
        )
        .map_err(|e| match e {
            rustix::io::Errno::LOOP => refuse("a symlink is in the way (refused)".into()),
            rustix::io::Errno::XDEV => refuse("not under banger's state directory".into()),
            e => refuse(std::io::Error::from(e).to_string()),
        })?;
        let st = rustix::fs::fstat(&at).map_err(|e| refuse(std::io::Error::from(e).to_string()))?;
        if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::RegularFile {
            return Err(refuse("not a regular file".into()));
        }
        let mut flags = OFlags::CLOEXEC | OFlags::NONBLOCK | OFlags::NOCTTY;
        flags |= if write { OFlags::RDWR } else { OFlags::RDONLY };
        // Reopening the O_PATH descriptor opens that very inode.
        let fd = rustix::fs::open(
            format!("/proc/self/fd/{}", at.as_raw_fd()),
            flags,
            Mode::empty(),
        )
        .map_err(|e| refuse(std::io::Error::from(e).to_string()))?;
        Ok((File::from(fd), real.join(rel)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dm_names() {
        for ok in ["bg-0", "bg-0123456789ab", &format!("bg-{}", "f".repeat(32))] {
            assert!(is_dm_name(ok), "{ok}");
        }
        for bad in [
            "bg-",
            "bg-ABC",
            "bg-xyz",
            "bg-12/..",
            "vg0-root",
            "banger0",
            &format!("bg-{}", "f".repeat(33)),
        ] {
            assert!(check_dm_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn loop_devices() {
        assert!(check_loop_device("/dev/loop0").is_ok());
        assert!(check_loop_device("/dev/loop123").is_ok());
        for bad in [
            "/dev/loop",
            "/dev/sda",
            "/dev/loop0p1",
            "loop0",
            "/dev/loop/0",
        ] {
            assert!(check_loop_device(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn files_only_under_a_state_dir() {
        let tmp = tempfile::tempdir().unwrap();
        let state = tmp.path().join("state");
        std::fs::create_dir_all(state.join("vms/ab")).unwrap();
        std::fs::write(state.join("vms/ab/root.cow"), b"").unwrap();
        std::fs::write(tmp.path().join("outside"), b"").unwrap();
        std::os::unix::fs::symlink(tmp.path().join("outside"), state.join("vms/ab/link")).unwrap();
        std::os::unix::fs::symlink(tmp.path(), state.join("up")).unwrap();
        let dirs = StateDirs::new(vec![state.clone()]);
        let s = |p: &Path| p.to_str().unwrap().to_owned();

        let (_, real) = dirs
            .open("cow", &s(&state.join("vms/ab/root.cow")), true)
            .unwrap();
        assert_eq!(real, state.canonicalize().unwrap().join("vms/ab/root.cow"));
        for (bad, why) in [
            (s(&tmp.path().join("outside")), "not under"),
            (s(&state.join("vms/ab/link")), "symlink"),
            (s(&state.join("up/outside")), "symlink"),
            (s(&state.join("vms/../../outside")), "not under"),
            (s(&state.join("vms/ab")), "not a regular file"),
            (s(&state), "not under"),
            (s(&state.join("vms/ab/missing")), "No such file"),
            ("vms/ab/root.cow".into(), "not an absolute path"),
            ("/etc/passwd".into(), "not under"),
        ] {
            let e = dirs.open("cow", &bad, false).unwrap_err();
            assert!(e.0.contains(why), "{bad}: {e}");
        }
        let none = StateDirs::new(vec![]);
        let e = none
            .open("cow", &s(&state.join("vms/ab/root.cow")), false)
            .unwrap_err();
        assert!(e.0.contains("--state-dir"), "{e}");
    }

    #[test]
    fn fifos_and_swapped_state_dirs_never_reach_an_open() {
        let tmp = tempfile::tempdir().unwrap();
        let state = tmp.path().join("state");
        std::fs::create_dir_all(state.join("vms/ab")).unwrap();
        std::fs::write(state.join("vms/ab/root.cow"), b"").unwrap();
        let dirs = StateDirs::new(vec![state.clone()]);
        let s = |p: &Path| p.to_str().unwrap().to_owned();
        // A FIFO is refused without being opened (opening it to read
        // would block the helper until a writer came).
        rustix::fs::mknodat(
            rustix::fs::CWD,
            state.join("vms/ab/fifo"),
            rustix::fs::FileType::Fifo,
            Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let fifo = s(&state.join("vms/ab/fifo"));
        let d2 = StateDirs::new(vec![state.clone()]);
        std::thread::spawn(move || tx.send(d2.open("cow", &fifo, false).map(drop)));
        let got = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("opening a FIFO under the state dir blocked the helper");
        assert!(got.unwrap_err().0.contains("not a regular file"));
        // The state dir swapped for a symlink after the helper pinned it:
        // paths under it still resolve in the directory that was pinned.
        std::fs::rename(&state, tmp.path().join("moved")).unwrap();
        std::fs::create_dir_all(tmp.path().join("decoy/vms/ab")).unwrap();
        std::fs::write(tmp.path().join("decoy/vms/ab/root.cow"), b"decoy").unwrap();
        std::os::unix::fs::symlink(tmp.path().join("decoy"), &state).unwrap();
        let (mut f, _) = dirs
            .open("cow", &s(&state.join("vms/ab/root.cow")), false)
            .unwrap();
        let mut read = Vec::new();
        std::io::Read::read_to_end(&mut f, &mut read).unwrap();
        assert_ne!(read, b"decoy", "the helper followed the swapped state dir");
    }
}
