//! The work disk on `/root`: the initramfs mounts it; the agent grows its
//! filesystem online to fill the disk before it serves anyone, because the
//! host only grows the disk's file (it never runs e2fsprogs over what a
//! guest wrote).
//!
//! One `ioctl` that neither `libc` nor `rustix` wraps safely: the only
//! unsafe code here.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::AsRawFd;

/// Where the work disk is mounted.
pub const HOME: &str = "/root";

/// `EXT4_IOC_RESIZE_FS`: `_IOW('f', 16, __u64)`, the new size in blocks.
/// `libc` does not define it.
const EXT4_IOC_RESIZE_FS: libc::c_ulong = 0x4008_6610;

/// The block device mounted on `target` (`/dev/vdb`), from `/proc/self/mounts`.
pub fn mount_source(mounts: &str, target: &str) -> Option<String> {
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (src, dst, fstype) = (f.next()?, f.next()?, f.next()?);
            (dst == target && fstype == "ext4" && src.starts_with("/dev/")).then(|| src.to_owned())
        })
        .next_back()
}

/// Bytes of the block device `/dev/NAME`, from sysfs (512-byte sectors).
fn device_bytes(dev: &str) -> io::Result<u64> {
    let name = dev.trim_start_matches("/dev/");
    let sectors = std::fs::read_to_string(format!("/sys/class/block/{name}/size"))?;
    sectors
        .trim()
        .parse::<u64>()
        .map(|s| s * 512)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Grow the ext4 mounted on [`HOME`] to its whole device, if it is
/// smaller. Returns the filesystem's size before and after, in bytes, or
/// `None` when `/root` is not a mounted ext4 disk.
pub fn grow_home() -> io::Result<Option<(u64, u64)>> {
    let mounts = std::fs::read_to_string("/proc/self/mounts")?;
    let Some(dev) = mount_source(&mounts, HOME) else {
        return Ok(None);
    };
    let disk = device_bytes(&dev)?;
    let dir = std::fs::File::open(HOME)?;
    let before = rustix::fs::fstatvfs(&dir)?;
    let block = before.f_frsize.max(1);
    let blocks: u64 = disk / block;
    // A no-op in the kernel when the filesystem already has that size.
    // SAFETY: the ioctl reads one u64 from a valid pointer.
    let rc = unsafe { libc::ioctl(dir.as_raw_fd(), EXT4_IOC_RESIZE_FS, &blocks as *const u64) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let after = rustix::fs::fstatvfs(&dir)?;
    Ok(Some((before.f_blocks * block, after.f_blocks * block)))
}

/// [`grow_home`], logged; never fatal (the guest still boots, with the
/// space it has).
pub fn grow_home_logged() {
    match grow_home() {
        Ok(Some((before, after))) if after > before => log!(
            "work disk on {HOME}: grown from {} to {} MiB",
            before >> 20,
            after >> 20
        ),
        Ok(_) => {}
        Err(e) => log!("cannot grow the work disk on {HOME}: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_work_disk_mount() {
        let mounts = "/dev/root / ext4 rw 0 0\n\
                      proc /proc proc rw 0 0\n\
                      /dev/vdb /root ext4 rw,relatime 0 0\n";
        assert_eq!(mount_source(mounts, "/root").as_deref(), Some("/dev/vdb"));
        assert_eq!(mount_source(mounts, "/home"), None);
        // A tmpfs over /root is not a disk to grow.
        let tmpfs = "tmpfs /root tmpfs rw 0 0\n";
        assert_eq!(mount_source(tmpfs, "/root"), None);
    }
}
