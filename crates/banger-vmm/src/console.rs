//! The guest's serial console log. Both VMMs write it in append mode
//! (QEMU's file chardev with `append=on`, Firecracker's stdout opened
//! `O_APPEND`), across boots. That lets the daemon cap it in place: once it
//! passes the cap its content moves to `console.log.1` and the log is
//! truncated, and the VMM's next write lands at the new end, offset 0. (A
//! rename would not do: the VMM keeps writing to the renamed file, and
//! neither VMM can be told to reopen its log.)
//!
//! Readers start where they need to: the boot-marker wait at the log's
//! length before the VMM started, so an earlier boot's marker is never
//! taken for this one's.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// Where the next boot's console output starts: the log's current length.
pub fn console_offset(log: &Path) -> u64 {
    std::fs::metadata(log).map_or(0, |m| m.len())
}

/// The file a capped console log's older output moves to.
pub fn rotated_console(log: &Path) -> PathBuf {
    let mut name = log.as_os_str().to_owned();
    name.push(".1");
    PathBuf::from(name)
}

/// Cap the console log at `max` bytes: past it, its content replaces
/// `console.log.1` and the log starts again empty. True when it rotated.
/// Output the VMM writes between the copy and the truncation (a moment) is
/// lost; the host holds at most twice the cap plus what the guest writes
/// between two checks.
pub fn cap_console(log: &Path, max: u64) -> std::io::Result<bool> {
    if console_offset(log) <= max {
        return Ok(false);
    }
    let rotated = rotated_console(log);
    let mut from = std::fs::File::open(log)?;
    let mut to = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&rotated)?;
    std::io::copy(&mut from, &mut to)?;
    std::fs::OpenOptions::new()
        .write(true)
        .open(log)?
        .set_len(0)?;
    Ok(true)
}

/// Reads a console log from an offset on, call after call, looking for a
/// marker: each call reads only what was appended since the last one.
#[derive(Debug)]
pub struct ConsoleScan {
    log: PathBuf,
    pos: u64,
    /// The end of what was read, kept for a marker split across two reads.
    carry: Vec<u8>,
}

impl ConsoleScan {
    /// Scan `log` from byte `from` on (see [`console_offset`]).
    pub fn new(log: &Path, from: u64) -> ConsoleScan {
        ConsoleScan {
            log: log.to_path_buf(),
            pos: from,
            carry: Vec::new(),
        }
    }

    /// Whether `marker` has appeared after the offset so far.
    pub fn seen(&mut self, marker: &[u8]) -> bool {
        let len = console_offset(&self.log);
        if len < self.pos {
            // Capped (truncated) since the last read: go on from its start.
            self.pos = 0;
            self.carry.clear();
        }
        if len == self.pos {
            return false;
        }
        let Ok(mut f) = std::fs::File::open(&self.log) else {
            return false;
        };
        let mut new = Vec::new();
        if f.seek(SeekFrom::Start(self.pos)).is_err()
            || f.take(len - self.pos).read_to_end(&mut new).is_err()
        {
            return false;
        }
        self.pos += new.len() as u64;
        let mut window = std::mem::take(&mut self.carry);
        window.extend_from_slice(&new);
        if window.windows(marker.len()).any(|w| w == marker) {
            return true;
        }
        let keep = marker.len().saturating_sub(1).min(window.len());
        self.carry = window.split_off(window.len() - keep);
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const MARKER: &[u8] = b"banger-initramfs: switching root";

    fn append(p: &Path, data: &[u8]) {
        std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(p)
            .unwrap()
            .write_all(data)
            .unwrap();
    }

    #[test]
    fn an_earlier_boots_marker_is_not_this_boots() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("console.log");
        append(&log, b"boot 1\nbanger-initramfs: switching root\nhalted\n");
        let from = console_offset(&log);
        let mut scan = ConsoleScan::new(&log, from);
        assert!(!scan.seen(MARKER), "the previous boot's marker matched");
        append(&log, b"boot 2\nbanger-initramfs: swit");
        assert!(!scan.seen(MARKER));
        // The rest of the marker arrives in a later read.
        append(&log, b"ching root\n");
        assert!(scan.seen(MARKER));
    }

    #[test]
    fn a_scan_goes_on_after_the_log_is_capped() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("console.log");
        append(&log, &[b'x'; 100]);
        let mut scan = ConsoleScan::new(&log, 0);
        assert!(!scan.seen(MARKER));
        assert!(cap_console(&log, 50).unwrap());
        append(&log, MARKER);
        assert!(scan.seen(MARKER));
    }

    #[test]
    fn capping_keeps_one_older_file_and_appends_go_on_at_the_start() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("console.log");
        // The VMM's file: opened once, in append mode, for its whole life.
        let mut vmm = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&log)
            .unwrap();
        vmm.write_all(&[b'a'; 80]).unwrap();
        assert!(!cap_console(&log, 100).unwrap(), "under the cap");
        vmm.write_all(&[b'b'; 80]).unwrap();
        assert!(cap_console(&log, 100).unwrap());
        assert_eq!(std::fs::metadata(&log).unwrap().len(), 0);
        assert_eq!(std::fs::read(rotated_console(&log)).unwrap().len(), 160);
        vmm.write_all(b"after\n").unwrap();
        assert_eq!(
            std::fs::read(&log).unwrap(),
            b"after\n",
            "no hole before it"
        );
        vmm.write_all(&[b'c'; 200]).unwrap();
        assert!(cap_console(&log, 100).unwrap());
        let older = std::fs::read(rotated_console(&log)).unwrap();
        assert!(older.starts_with(b"after\n"), "the .1 file is replaced");
        assert_eq!(older.len(), 206);
    }
}
