//! Scratch directories in a place other local users share (`/dev/shm`).
//!
//! Anyone can create any name in a shared directory, so banger never uses
//! a predictable name there and never sweeps one by its name. A scratch
//! directory gets a fresh random name, is recorded in banger's own state
//! first, and is then made with `mkdir` (mode 0700): it fails on anything
//! already there, a symlink included, and follows none. Leftovers of a
//! process that died mid-build are found through the records alone, and
//! removed only while the recorded path is still a real directory (not a
//! symlink) owned by banger's user — in a sticky directory such as
//! `/dev/shm` nobody else can then rename or replace it.

use std::fs::DirBuilder;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Where scratch directories are made, and where banger records them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScratchSpace {
    /// The (possibly shared) directory scratch directories are made in.
    pub dir: PathBuf,
    /// banger's own directory of records, one file per scratch directory
    /// made and not yet removed. Must not be shared with other users.
    pub records: PathBuf,
}

/// Why a scratch directory could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ScratchError {
    #[error("cannot record a scratch directory in {}", dir.display())]
    Record {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot create a scratch directory in {}", dir.display())]
    Create {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A scratch directory made by [`ScratchSpace::create`]. The caller
/// removes it (how depends on what it holds), then calls
/// [`ScratchDir::removed`]; until then its record stays, so a process that
/// dies first has it swept by a later one.
#[derive(Debug)]
pub struct ScratchDir {
    path: PathBuf,
    record: PathBuf,
}

impl ScratchDir {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The directory is gone: forget its record.
    pub fn removed(self) {
        let _ = std::fs::remove_file(&self.record);
    }
}

#[cfg(test)]
impl ScratchDir {
    /// Rewrites the record as if a process now gone had made the directory.
    pub(crate) fn orphan(&self) {
        let mut r: Record = serde_json::from_slice(&std::fs::read(&self.record).unwrap()).unwrap();
        r.owner.start_ticks += 1;
        std::fs::write(&self.record, serde_json::to_vec(&r).unwrap()).unwrap();
    }
}

/// A record: the scratch directory and the process that made it.
#[derive(Debug, Serialize, Deserialize)]
struct Record {
    path: PathBuf,
    owner: Process,
}

/// A process, told apart from a later one with the same pid (after a
/// reboot too).
#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Process {
    pid: u32,
    /// Field 22 of `/proc/PID/stat`: clock ticks from boot to its start.
    start_ticks: u64,
    boot_id: String,
}

impl Process {
    fn of(pid: u32) -> io::Result<Process> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        // `PID (COMM) STATE ...`: COMM may hold spaces and parentheses.
        let start_ticks = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(19))
            .and_then(|t| t.parse().ok())
            .ok_or_else(|| io::Error::other(format!("cannot parse /proc/{pid}/stat")))?;
        let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")?
            .trim()
            .to_owned();
        Ok(Process {
            pid,
            start_ticks,
            boot_id,
        })
    }

    fn is_running(&self) -> bool {
        pid_is_running(self.pid) && Process::of(self.pid).is_ok_and(|now| now == *self)
    }
}

/// Whether `pid` is a running process: a zombie (killed, not yet reaped by
/// its parent) left its work as undone as a process that is gone.
pub fn pid_is_running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            != Some("Z")
    })
}

impl ScratchSpace {
    /// Makes a private directory `<dir>/<kind>-<random>` (mode 0700),
    /// recorded under `records` before it exists.
    pub fn create(&self, kind: &str) -> Result<ScratchDir, ScratchError> {
        let record_err = |source| ScratchError::Record {
            dir: self.records.clone(),
            source,
        };
        let create_err = |source| ScratchError::Create {
            dir: self.dir.clone(),
            source,
        };
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.records)
            .map_err(record_err)?;
        DirBuilder::new()
            .recursive(true)
            .create(&self.dir)
            .map_err(create_err)?;
        let owner = Process::of(std::process::id()).map_err(record_err)?;
        let name = format!("{kind}-{}", random_hex().map_err(create_err)?);
        let path = self.dir.join(&name);
        let record = self.records.join(format!("{name}.json"));
        let text = serde_json::to_vec(&Record {
            path: path.clone(),
            owner,
        })
        .expect("a record serialises");
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&record)
            .and_then(|mut f| f.write_all(&text))
            .map_err(record_err)?;
        let dir = ScratchDir { path, record };
        // A fresh random name: anything already there is someone else's.
        match DirBuilder::new().mode(0o700).create(&dir.path) {
            Ok(()) => Ok(dir),
            Err(e) => {
                dir.removed();
                Err(create_err(e))
            }
        }
    }

    /// Removes, with `remove`, the scratch directories of `kind` that
    /// processes now gone recorded and left behind. A record whose path is
    /// missing, or is not a directory of this user's (a symlink, another
    /// user's directory), is dropped and the path left untouched.
    pub fn sweep<E>(
        &self,
        kind: &str,
        mut remove: impl FnMut(&Path) -> Result<(), E>,
    ) -> Result<(), E> {
        let Ok(entries) = std::fs::read_dir(&self.records) else {
            return Ok(());
        };
        let prefix = format!("{kind}-");
        let euid = rustix::process::geteuid().as_raw();
        for entry in entries.flatten() {
            let file_name = entry.file_name();
            let Some(name) = file_name.to_str() else {
                continue;
            };
            if !(name.starts_with(&prefix) && name.ends_with(".json")) {
                continue;
            }
            let record_path = entry.path();
            // Unreadable: cut short before its directory was made.
            let record: Option<Record> = std::fs::read(&record_path)
                .ok()
                .and_then(|t| serde_json::from_slice(&t).ok());
            if let Some(record) = record {
                if record.owner.is_running() {
                    continue;
                }
                match record.path.symlink_metadata() {
                    Ok(m) if m.is_dir() && m.uid() == euid => remove(&record.path)?,
                    _ => {}
                }
            }
            let _ = std::fs::remove_file(&record_path);
        }
        Ok(())
    }
}

/// 16 hex digits from the system's random source.
fn random_hex() -> io::Result<String> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 8];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| io::Error::other("no random bytes from the system"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn space(root: &Path) -> ScratchSpace {
        ScratchSpace {
            dir: root.join("shm"),
            records: root.join("state/.scratch"),
        }
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut n: Vec<String> = std::fs::read_dir(dir)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        n.sort();
        n
    }

    #[test]
    fn directories_are_private_fresh_and_recorded() {
        let tmp = tempfile::tempdir().unwrap();
        let s = space(tmp.path());
        let a = s.create("banger-test").unwrap();
        let b = s.create("banger-test").unwrap();
        assert_ne!(a.path(), b.path());
        let m = a.path().symlink_metadata().unwrap();
        assert!(m.is_dir());
        assert_eq!(m.permissions().mode() & 0o7777, 0o700);
        let name = a.path().file_name().unwrap().to_str().unwrap();
        assert!(name.starts_with("banger-test-") && name.len() == 12 + 16);
        assert_eq!(names(&s.records).len(), 2);
        // The owner is alive: a sweep leaves both.
        s.sweep("banger-test", |p| std::fs::remove_dir_all(p))
            .unwrap();
        assert!(a.path().is_dir() && b.path().is_dir());
        std::fs::remove_dir(a.path()).unwrap();
        a.removed();
        assert_eq!(names(&s.records).len(), 1);
    }

    #[test]
    fn the_sweep_removes_only_recorded_leftovers_of_its_kind() {
        let tmp = tempfile::tempdir().unwrap();
        let s = space(tmp.path());
        let gone = s.create("banger-test").unwrap();
        std::fs::write(gone.path().join("f"), "x").unwrap();
        gone.orphan();
        let other_kind = s.create("banger-other").unwrap();
        other_kind.orphan();
        // Named like ours, but never recorded.
        std::fs::create_dir(s.dir.join("banger-test-0123456789abcdef")).unwrap();
        // A record cut short before its directory was made.
        std::fs::write(s.records.join("banger-test-feed.json"), "{\"pa").unwrap();
        let mut removed = Vec::new();
        s.sweep("banger-test", |p| {
            removed.push(p.to_owned());
            std::fs::remove_dir_all(p)
        })
        .unwrap();
        assert_eq!(removed, [gone.path().to_owned()]);
        assert_eq!(
            names(&s.dir),
            [
                other_kind.path().file_name().unwrap().to_str().unwrap(),
                "banger-test-0123456789abcdef"
            ]
        );
        assert_eq!(names(&s.records), [format!("{}.json", names(&s.dir)[0])]);
    }

    #[test]
    fn a_recorded_path_replaced_by_a_symlink_is_not_followed() {
        let tmp = tempfile::tempdir().unwrap();
        let s = space(tmp.path());
        let victim = tmp.path().join("victim");
        std::fs::create_dir(&victim).unwrap();
        std::fs::write(victim.join("f"), "keep").unwrap();
        let d = s.create("banger-test").unwrap();
        d.orphan();
        std::fs::remove_dir(d.path()).unwrap();
        std::os::unix::fs::symlink(&victim, d.path()).unwrap();
        s.sweep("banger-test", |p| -> io::Result<()> {
            panic!("removed {}", p.display())
        })
        .unwrap();
        assert_eq!(std::fs::read_link(d.path()).unwrap(), victim);
        assert_eq!(std::fs::read_to_string(victim.join("f")).unwrap(), "keep");
        assert!(names(&s.records).is_empty());
    }

    #[test]
    fn processes_are_told_apart_from_later_ones_with_the_same_pid() {
        let me = Process::of(std::process::id()).unwrap();
        assert!(me.is_running());
        let later = Process {
            start_ticks: me.start_ticks + 1,
            ..Process::of(std::process::id()).unwrap()
        };
        assert!(!later.is_running());
        let rebooted = Process {
            boot_id: "another boot".into(),
            ..Process::of(std::process::id()).unwrap()
        };
        assert!(!rebooted.is_running());
        assert!(Process::of(u32::MAX).is_err());
    }
}
