//! The kernel and initrd a booting QEMU guest is given, as memfds that can
//! be emptied once the guest has booted.
//!
//! QEMU keeps what `-kernel` and `-initrd` name mapped for the VM's whole
//! life: the kernel's ELF segments to copy into guest RAM again on a
//! system reset, the initrd for the firmware to read over fw_cfg. Both are
//! read once at boot, and a banger VM never resets (`-no-reboot` turns a
//! reboot into an exit; nothing sends `system_reset`). From the image's
//! files, those pages count in the VMM's RSS until the VM stops: 65 MiB for
//! Debian's kernel and banger's initrd, half of what an idle guest uses. From
//! memfds, [`BootMedia::release`] punches them out once the guest runs its
//! own init, and the pages are freed.
//!
//! A restore does not boot the kernel (QEMU skips loading it while a state
//! is incoming), so it keeps the image's files: their pages are never read.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{FallocateFlags, MemfdFlags};

use crate::VmmError;

/// Copies of a boot's kernel and initrd that QEMU reads through
/// `/dev/fd/N`, held by the caller until [`Self::release`]. Dropping it
/// without releasing only closes this process's descriptors: QEMU's
/// mappings keep the copies (and their memory) until it exits.
#[derive(Debug, Default)]
pub struct BootMedia {
    fds: Vec<OwnedFd>,
}

impl BootMedia {
    /// Copy `kernel` and `initrd` into memfds; the paths QEMU is to open
    /// instead, in the same order.
    pub(crate) fn copy(
        kernel: &Path,
        initrd: Option<&Path>,
    ) -> Result<(Self, PathBuf, Option<PathBuf>), VmmError> {
        let mut media = BootMedia::default();
        let kernel = media.add("banger-kernel", kernel)?;
        let initrd = initrd.map(|p| media.add("banger-initrd", p)).transpose()?;
        Ok((media, kernel, initrd))
    }

    fn add(&mut self, name: &str, from: &Path) -> Result<PathBuf, VmmError> {
        let failed = |what: &'static str, e: std::io::Error| VmmError::Launch {
            what,
            message: format!("{}: {e}", from.display()),
        };
        let fd = rustix::fs::memfd_create(name, MemfdFlags::CLOEXEC)
            .map_err(|e| failed("cannot make a memfd for the boot files", e.into()))?;
        let mut src = File::open(from).map_err(|e| failed("cannot read a boot file", e))?;
        let mut dst = File::from(fd);
        // In the kernel (sendfile); ~20 ms for a 63 MiB vmlinux.
        std::io::copy(&mut src, &mut dst).map_err(|e| failed("cannot copy a boot file", e))?;
        let path = PathBuf::from(format!("/dev/fd/{}", dst.as_raw_fd()));
        self.fds.push(dst.into());
        Ok(path)
    }

    /// The descriptors QEMU inherits.
    pub(crate) fn raw_fds(&self) -> impl Iterator<Item = std::os::fd::RawFd> + '_ {
        self.fds.iter().map(AsRawFd::as_raw_fd)
    }

    /// Empty the copies (their size stays, so QEMU's mappings stay valid
    /// and read zeros): the memory they held is freed, QEMU's share of it
    /// included. Only once the guest has booted: the firmware reads the
    /// initrd after QEMU has started. Returns the bytes released.
    pub fn release(self) -> u64 {
        let mut freed = 0;
        for fd in &self.fds {
            let Ok(st) = rustix::fs::fstat(fd) else {
                continue;
            };
            let len = st.st_size as u64;
            // To the end of the last page: a hole that ends inside a page
            // only zeroes the page's tail, and the page stays.
            let page = rustix::param::page_size() as u64;
            let flags = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
            if rustix::fs::fallocate(fd, flags, 0, len.div_ceil(page) * page).is_ok() {
                freed += len;
            }
        }
        freed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn blocks(p: &Path) -> u64 {
        std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(p).unwrap())
    }

    #[test]
    fn copies_read_as_the_files_until_released_then_hold_no_memory() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("vmlinux");
        let initrd = dir.path().join("initrd.img");
        let body: Vec<u8> = (0..3 << 20).map(|i| (i % 251) as u8 + 1).collect();
        std::fs::File::create(&kernel)
            .unwrap()
            .write_all(&body)
            .unwrap();
        std::fs::write(&initrd, b"initrd").unwrap();

        let (media, k, i) = BootMedia::copy(&kernel, Some(&initrd)).unwrap();
        let i = i.unwrap();
        assert!(k.starts_with("/dev/fd/"), "{}", k.display());
        assert_eq!(std::fs::read(&k).unwrap(), body);
        assert_eq!(std::fs::read(&i).unwrap(), b"initrd");
        assert_eq!(media.raw_fds().count(), 2);
        assert!(blocks(&k) >= (3 << 20) / 512, "the copy holds memory");

        // A mapping made before the release (as QEMU's) stays valid.
        let mapped = File::open(&k).unwrap();
        let mapped_initrd = File::open(&i).unwrap();
        assert_eq!(media.release(), body.len() as u64 + 6);
        assert_eq!(mapped.metadata().unwrap().len(), body.len() as u64);
        assert_eq!(
            std::os::unix::fs::MetadataExt::blocks(&mapped.metadata().unwrap()),
            0
        );
        // Its last page too, though the file ends inside it.
        assert_eq!(
            std::os::unix::fs::MetadataExt::blocks(&mapped_initrd.metadata().unwrap()),
            0
        );
        let mut zeros = Vec::new();
        std::io::Read::read_to_end(&mut &mapped, &mut zeros).unwrap();
        assert!(zeros.iter().all(|b| *b == 0));
    }

    #[test]
    fn a_missing_file_is_named() {
        let e = BootMedia::copy(Path::new("/nonexistent/vmlinux"), None).unwrap_err();
        let text = format!("{e}");
        assert!(text.contains("/nonexistent/vmlinux"), "{text}");
    }
}
