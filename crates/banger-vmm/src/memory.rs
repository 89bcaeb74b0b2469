//! A QEMU guest's RAM as a snapshot keeps it: a sparse file, one byte per
//! byte of guest RAM, where pages of zeros are holes. Restores map it
//! private ([`crate::GuestMemory::Snapshot`]), so VMs restored from one
//! snapshot share its unchanged pages through the page cache.
//!
//! Its digest is SHA-256 over each page that is not zero, in order, as
//! its offset (8 bytes, little-endian) then its bytes, then the file's
//! length: it names the content, not the holes a filesystem happened to
//! keep, and skipping holes makes it cost what the guest used, not its
//! RAM size.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use sha2::Digest;

use crate::Handles;

const PAGE: usize = 4096;
/// Read at once from a run of data.
const CHUNK: usize = 2 << 20;

/// The memfd a running QEMU keeps its guest's RAM in
/// ([`crate::GuestMemory::Shared`]), as a path this process may open
/// (`/proc/<pid>/fd/N`); `None` for a VM that runs on QEMU's own RAM.
pub fn shared_memory(h: &Handles) -> Option<PathBuf> {
    let dir = PathBuf::from(format!("/proc/{}/fd", h.pid));
    let want = format!("/memfd:{}", crate::qemu::MEMFD_NAME);
    std::fs::read_dir(&dir).ok()?.flatten().find_map(|e| {
        let target = std::fs::read_link(e.path()).ok()?;
        target
            .to_string_lossy()
            .starts_with(&want)
            .then(|| e.path())
    })
}

/// Copy guest RAM from `src` (a memfd of a paused guest) to a new sparse
/// file `dest`, readable by its owner only (it holds whatever the guest
/// held); its digest. Not synced: a copy a crash cut short fails its
/// digest at the next restore. Blocking.
pub fn copy_memory(src: &Path, dest: &Path) -> io::Result<String> {
    use std::os::unix::fs::OpenOptionsExt;
    let from = File::open(src)?;
    let to = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(dest)?;
    let len = from.metadata()?.len();
    let digest = walk(&from, len, |offset, run| to.write_all_at(run, offset))?;
    to.set_len(len)?;
    Ok(digest)
}

/// The digest of a memory file. Blocking.
pub fn memory_digest(path: &Path) -> io::Result<String> {
    let f = File::open(path)?;
    let len = f.metadata()?.len();
    walk(&f, len, |_, _| Ok(()))
}

/// Visit the runs of pages of `f` that are not zero (skipping holes by
/// `SEEK_DATA`/`SEEK_HOLE`), handing each to `sink` with its offset;
/// returns the digest.
fn walk(
    f: &File,
    len: u64,
    mut sink: impl FnMut(u64, &[u8]) -> io::Result<()>,
) -> io::Result<String> {
    use rustix::fs::{SeekFrom, seek};
    let zero = [0u8; PAGE];
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut pos = 0u64;
    while pos < len {
        let start = match seek(f, SeekFrom::Data(pos)) {
            Ok(s) => s,
            Err(rustix::io::Errno::NXIO) => break,
            Err(e) => return Err(e.into()),
        };
        let end = seek(f, SeekFrom::Hole(start))?.min(len);
        let mut at = start;
        while at < end {
            let n = ((end - at) as usize).min(CHUNK);
            f.read_exact_at(&mut buf[..n], at)?;
            // Runs of pages that are not zero, each handed over whole.
            let mut run: Option<usize> = None;
            for (i, page) in buf[..n].chunks(PAGE).enumerate() {
                let off = i * PAGE;
                if page == &zero[..page.len()] {
                    if let Some(r) = run.take() {
                        sink(at + r as u64, &buf[r..off])?;
                    }
                    continue;
                }
                hasher.update((at + off as u64).to_le_bytes());
                hasher.update(page);
                run.get_or_insert(off);
            }
            if let Some(r) = run {
                sink(at + r as u64, &buf[r..n])?;
            }
            at += n as u64;
        }
        pos = end;
    }
    hasher.update(len.to_le_bytes());
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memfd_with(pages: &[(u64, u8)], len: u64) -> (File, PathBuf) {
        let fd = rustix::fs::memfd_create("banger-test", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        let f = File::from(fd);
        f.set_len(len).unwrap();
        for (page, byte) in pages {
            let at = page * PAGE as u64;
            let n = (len - at).min(PAGE as u64) as usize;
            f.write_all_at(&[*byte; PAGE][..n], at).unwrap();
        }
        let path = PathBuf::from(format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&f)
        ));
        (f, path)
    }

    #[test]
    fn a_copy_holds_the_same_bytes_with_zero_pages_as_holes() {
        let dir = tempfile::tempdir().unwrap();
        let len = 64 * PAGE as u64 + 100;
        // A written page of zeros (1) is data in the memfd but a hole in
        // the copy; the last page is a partial one.
        let (_f, src) = memfd_with(&[(0, 7), (1, 0), (2, 9), (3, 9), (40, 1), (64, 5)], len);
        let dest = dir.path().join("memory.ram");
        let digest = copy_memory(&src, &dest).unwrap();
        let (a, b) = (std::fs::read(&src).unwrap(), std::fs::read(&dest).unwrap());
        assert_eq!(a.len() as u64, len);
        assert!(a == b, "the copy differs from its source");
        use std::os::unix::fs::MetadataExt;
        let allocated = std::fs::metadata(&dest).unwrap().blocks() * 512;
        assert!(
            allocated <= 5 * PAGE as u64,
            "{allocated} bytes allocated for 5 pages of data"
        );
        // The digest names the content: the source's and the copy's agree.
        assert_eq!(memory_digest(&dest).unwrap(), digest);
        assert_eq!(memory_digest(&src).unwrap(), digest);
        assert_eq!(digest.len(), 64);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&dest).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "guest memory is its owner's alone");
    }

    #[test]
    fn the_digest_changes_with_any_byte_or_the_length() {
        let dir = tempfile::tempdir().unwrap();
        let (_f, src) = memfd_with(&[(3, 1)], 16 * PAGE as u64);
        let dest = dir.path().join("memory.ram");
        let digest = copy_memory(&src, &dest).unwrap();
        let f = std::fs::OpenOptions::new().write(true).open(&dest).unwrap();
        // A byte flipped in a hole, then in a page of data.
        f.write_all_at(&[1], 10 * PAGE as u64 + 5).unwrap();
        let flipped = memory_digest(&dest).unwrap();
        assert_ne!(flipped, digest);
        f.write_all_at(&[0], 10 * PAGE as u64 + 5).unwrap();
        assert_eq!(memory_digest(&dest).unwrap(), digest);
        f.write_all_at(&[2], 3 * PAGE as u64).unwrap();
        assert_ne!(memory_digest(&dest).unwrap(), digest);
        f.write_all_at(&[1], 3 * PAGE as u64).unwrap();
        f.set_len(17 * PAGE as u64).unwrap();
        assert_ne!(memory_digest(&dest).unwrap(), digest);
    }

    #[test]
    fn copy_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let (_f, src) = memfd_with(&[(0, 1)], PAGE as u64);
        let dest = dir.path().join("memory.ram");
        std::fs::write(&dest, b"x").unwrap();
        assert_eq!(
            copy_memory(&src, &dest).unwrap_err().kind(),
            io::ErrorKind::AlreadyExists
        );
    }
}
