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

    /// Which of `markers` has appeared after the offset so far (the first
    /// of them in the list when several have).
    pub fn seen(&mut self, markers: &[&[u8]]) -> Option<usize> {
        let len = console_offset(&self.log);
        if len < self.pos {
            // Capped (truncated) since the last read: go on from its start.
            self.pos = 0;
            self.carry.clear();
        }
        if len == self.pos {
            return None;
        }
        let Ok(mut f) = std::fs::File::open(&self.log) else {
            return None;
        };
        let mut new = Vec::new();
        if f.seek(SeekFrom::Start(self.pos)).is_err()
            || f.take(len - self.pos).read_to_end(&mut new).is_err()
        {
            return None;
        }
        self.pos += new.len() as u64;
        let mut window = std::mem::take(&mut self.carry);
        window.extend_from_slice(&new);
        if let Some(i) = markers
            .iter()
            .position(|m| window.windows(m.len()).any(|w| w == *m))
        {
            return Some(i);
        }
        let longest = markers.iter().map(|m| m.len()).max().unwrap_or(0);
        let keep = longest.saturating_sub(1).min(window.len());
        self.carry = window.split_off(window.len() - keep);
        None
    }
}

/// The last `lines` lines the guest wrote to `log` from byte `from` on (of
/// its last 16 KiB at most), fit for an error message: each line indented
/// behind `| `, invalid UTF-8 replaced, and control characters (a guest's
/// terminal escapes) shown as `?`. Empty when the guest wrote nothing.
pub fn console_tail(log: &Path, from: u64, lines: usize) -> String {
    const MAX: u64 = 16 << 10;
    let len = console_offset(log);
    // A log capped since `from` starts again at 0.
    let from = if len < from { 0 } else { from };
    let start = from.max(len.saturating_sub(MAX));
    let mut bytes = Vec::new();
    let read = std::fs::File::open(log).and_then(|mut f| {
        f.seek(SeekFrom::Start(start))?;
        f.take(len - start).read_to_end(&mut bytes)
    });
    if read.is_err() {
        return String::new();
    }
    let text = String::from_utf8_lossy(&bytes);
    let kept: Vec<String> = text
        .lines()
        .map(|l| {
            l.trim_end_matches('\r')
                .chars()
                .map(|c| if c.is_control() && c != '\t' { '?' } else { c })
                .collect::<String>()
        })
        .filter(|l| !l.trim().is_empty())
        .collect();
    kept[kept.len().saturating_sub(lines)..]
        .iter()
        .map(|l| format!("  | {l}"))
        .collect::<Vec<_>>()
        .join("\n")
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
        assert_eq!(
            scan.seen(&[MARKER]),
            None,
            "the previous boot's marker matched"
        );
        append(&log, b"boot 2\nbanger-initramfs: swit");
        assert_eq!(scan.seen(&[MARKER]), None);
        // The rest of the marker arrives in a later read.
        append(&log, b"ching root\n");
        assert_eq!(scan.seen(&[MARKER]), Some(0));
    }

    #[test]
    fn a_scan_goes_on_after_the_log_is_capped() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("console.log");
        append(&log, &[b'x'; 100]);
        let mut scan = ConsoleScan::new(&log, 0);
        assert_eq!(scan.seen(&[MARKER]), None);
        assert!(cap_console(&log, 50).unwrap());
        append(&log, MARKER);
        assert_eq!(scan.seen(&[MARKER]), Some(0));
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

    #[test]
    fn a_scan_names_which_marker_it_saw() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("console.log");
        let fatal: &[u8] = b"banger-initramfs: FATAL:";
        let mut scan = ConsoleScan::new(&log, 0);
        append(&log, b"banger-initramfs: FA");
        assert_eq!(scan.seen(&[MARKER, fatal]), None);
        append(&log, b"TAL: cannot mount\n");
        assert_eq!(scan.seen(&[MARKER, fatal]), Some(1));
    }

    #[test]
    fn a_console_tail_is_this_boots_last_lines_made_harmless() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("console.log");
        assert_eq!(console_tail(&log, 0, 5), "", "no log yet");
        append(&log, b"an earlier boot\n");
        let from = console_offset(&log);
        append(&log, b"one\r\n\ntwo \x1b[2Jcleared\nthree \xff\nfour");
        assert_eq!(
            console_tail(&log, from, 3),
            "  | two ?[2Jcleared\n  | three \u{fffd}\n  | four"
        );
        assert_eq!(console_tail(&log, from, 10).lines().count(), 4);
        // Capped since: the log starts again at 0.
        assert!(cap_console(&log, 10).unwrap());
        append(&log, b"after the cap\n");
        assert_eq!(console_tail(&log, from, 10), "  | after the cap");
    }
}
