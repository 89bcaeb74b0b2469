//! What banger owns: dm devices named `bg-<hex>`, loop devices `/dev/loopN`,
//! and files under the helper's state directories.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

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

/// The state directories whose files the helper may attach.
#[derive(Debug, Clone)]
pub struct StateDirs(Vec<PathBuf>);

impl StateDirs {
    pub fn new(dirs: Vec<PathBuf>) -> Self {
        StateDirs(dirs)
    }

    /// The directories as they resolve now (missing ones left out: nothing
    /// can be under them).
    pub fn resolved(&self) -> Vec<PathBuf> {
        self.0
            .iter()
            .filter_map(|d| std::fs::canonicalize(d).ok())
            .collect()
    }

    /// Is `path` (already resolved) strictly below a state directory?
    pub fn contains(&self, path: &Path) -> bool {
        self.resolved()
            .iter()
            .any(|d| path.starts_with(d) && path != d)
    }

    /// Open `path` for attaching: absolute, resolving (symlinks and all) to
    /// a regular file strictly under a state directory. The check is made on
    /// the opened file as the kernel names it, so swapping a path component
    /// for a symlink after the check changes nothing: the returned file is
    /// what gets attached.
    pub fn open(&self, what: &str, path: &str, write: bool) -> Result<(File, PathBuf), Refused> {
        let refuse = |why: String| Refused(format!("{what} {path:?}: {why}"));
        let p = Path::new(path);
        if !p.is_absolute() {
            return Err(refuse("not an absolute path".into()));
        }
        if self.0.is_empty() {
            return Err(refuse(
                "the helper serves no state directory (start it with --state-dir)".into(),
            ));
        }
        let real = std::fs::canonicalize(p).map_err(|e| refuse(e.to_string()))?;
        if !self.contains(&real) {
            return Err(refuse(format!(
                "{} is not under banger's state directory",
                real.display()
            )));
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(write)
            .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
            .open(&real)
            .map_err(|e| refuse(e.to_string()))?;
        let opened = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))
            .map_err(|e| refuse(format!("cannot see what was opened: {e}")))?;
        if !self.contains(&opened) {
            return Err(refuse(format!(
                "opened {}, which is not under banger's state directory",
                opened.display()
            )));
        }
        let meta = file.metadata().map_err(|e| refuse(e.to_string()))?;
        if !meta.is_file() {
            return Err(refuse("not a regular file".into()));
        }
        Ok((file, opened))
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
            (s(&state.join("vms/ab/link")), "not under"),
            (s(&state.join("up/outside")), "not under"),
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
}
