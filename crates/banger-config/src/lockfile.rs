//! Single-instance locks: an exclusive `flock` held for a process's life.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::fs::{FlockOperation, OFlags, flock};

/// A held lock; released when dropped (or when the process dies).
#[derive(Debug)]
pub struct LockFile {
    file: File,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("cannot open lock file {}", path.display())]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Someone else holds it; `holder` is the pid written in the file, if any.
    #[error("{} is held by pid {}", path.display(), holder.map_or_else(|| "unknown".to_string(), |p| p.to_string()))]
    Held { path: PathBuf, holder: Option<u32> },
    #[error("timed out waiting for {}", path.display())]
    Timeout { path: PathBuf },
}

impl LockFile {
    fn open(path: &Path) -> Result<File, LockError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|source| LockError::Open {
                path: path.to_owned(),
                source,
            })?;
        }
        let open_err = |source| LockError::Open {
            path: path.to_owned(),
            source,
        };
        // The directory may be the user's while a root helper takes its lock
        // there: never follow a link planted at the name (the pid written
        // into the file would truncate whatever it points at), and never
        // block on a FIFO.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags((OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC).bits() as i32)
            .open(path)
            .map_err(open_err)?;
        let meta = file.metadata().map_err(open_err)?;
        if !meta.file_type().is_file() {
            return Err(open_err(std::io::Error::other(
                "not a regular file: remove it and try again",
            )));
        }
        Ok(file)
    }

    /// Take the lock now or report who holds it.
    pub fn try_acquire(path: &Path) -> Result<LockFile, LockError> {
        let mut file = Self::open(path)?;
        if flock(&file, FlockOperation::NonBlockingLockExclusive).is_err() {
            let mut s = String::new();
            let _ = file.read_to_string(&mut s);
            return Err(LockError::Held {
                path: path.to_owned(),
                holder: s.trim().parse().ok(),
            });
        }
        Ok(LockFile { file })
    }

    /// Wait up to `timeout` for the lock.
    pub fn acquire_timeout(path: &Path, timeout: Duration) -> Result<LockFile, LockError> {
        let deadline = Instant::now() + timeout;
        loop {
            match Self::try_acquire(path) {
                Err(LockError::Held { .. }) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(LockError::Held { .. }) => {
                    return Err(LockError::Timeout {
                        path: path.to_owned(),
                    });
                }
                other => return other,
            }
        }
    }

    /// Record our pid in the lock file so that others can name the holder.
    pub fn write_pid(&mut self) -> std::io::Result<()> {
        self.file.set_len(0)?;
        self.file.rewind()?;
        writeln!(self.file, "{}", std::process::id())?;
        self.file.sync_data()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_link_or_fifo_at_the_lock_path_is_refused_and_its_target_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("precious");
        std::fs::write(&victim, "precious\n").unwrap();
        let lock = dir.path().join("helper.lock");
        std::os::unix::fs::symlink(&victim, &lock).unwrap();
        let e = LockFile::try_acquire(&lock).unwrap_err();
        assert!(matches!(e, LockError::Open { .. }), "{e:?}");
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");

        let fifo = dir.path().join("fifo.lock");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        let e = LockFile::try_acquire(&fifo).unwrap_err();
        assert!(e.to_string().contains("fifo.lock"), "{e}");
    }

    #[test]
    fn second_acquire_names_the_holder_until_released() {
        let dir = std::env::temp_dir().join(format!("banger-lock-test-{}", std::process::id()));
        let path = dir.join("x.lock");
        let mut first = LockFile::try_acquire(&path).unwrap();
        first.write_pid().unwrap();
        match LockFile::try_acquire(&path) {
            Err(LockError::Held { holder, .. }) => assert_eq!(holder, Some(std::process::id())),
            other => panic!("expected Held, got {other:?}"),
        }
        assert!(matches!(
            LockFile::acquire_timeout(&path, Duration::from_millis(60)),
            Err(LockError::Timeout { .. })
        ));
        drop(first);
        LockFile::try_acquire(&path).unwrap();
        std::fs::remove_dir_all(dir).unwrap();
    }
}
