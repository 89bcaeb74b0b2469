//! The cpio "newc" format (SVR4 without CRC), as the kernel unpacks it into
//! the initial rootfs.
//!
//! Each entry is a 110-byte ASCII header (`070701` and thirteen 8-digit hex
//! fields), the NUL-terminated name padded to 4 bytes, and the data padded to
//! 4 bytes. The archive ends with an entry named `TRAILER!!!`. Entries are
//! written with owner root and mtime 0 so archives are reproducible.

use std::io::{self, Write};

const MAGIC: &[u8; 6] = b"070701";
const HEADER_LEN: usize = 110;
const TRAILER: &str = "TRAILER!!!";

/// File type bits of `mode`.
pub const S_IFMT: u32 = 0o170000;
pub const S_IFDIR: u32 = 0o040000;
pub const S_IFREG: u32 = 0o100000;
pub const S_IFLNK: u32 = 0o120000;
pub const S_IFCHR: u32 = 0o020000;

/// Writes a newc archive to `W`.
#[derive(Debug)]
pub struct CpioWriter<W: Write> {
    out: W,
    next_ino: u32,
    written: u64,
}

impl<W: Write> CpioWriter<W> {
    pub fn new(out: W) -> Self {
        CpioWriter {
            out,
            next_ino: 1,
            written: 0,
        }
    }

    /// A directory; `path` has no leading slash, parents come first.
    pub fn dir(&mut self, path: &str, perm: u32) -> io::Result<()> {
        self.entry(path, S_IFDIR | (perm & 0o7777), 2, (0, 0), &[])
    }

    /// A regular file with permission bits `perm`.
    pub fn file(&mut self, path: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        self.entry(path, S_IFREG | (perm & 0o7777), 1, (0, 0), data)
    }

    /// A symbolic link to `target`.
    pub fn symlink(&mut self, path: &str, target: &str) -> io::Result<()> {
        self.entry(path, S_IFLNK | 0o777, 1, (0, 0), target.as_bytes())
    }

    /// A character device node.
    pub fn char_device(&mut self, path: &str, perm: u32, major: u32, minor: u32) -> io::Result<()> {
        self.entry(path, S_IFCHR | (perm & 0o7777), 1, (major, minor), &[])
    }

    /// Writes the trailer and returns the writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.write_entry(TRAILER, 0, 0, 1, (0, 0), &[])?;
        self.out.flush()?;
        Ok(self.out)
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    fn entry(
        &mut self,
        path: &str,
        mode: u32,
        nlink: u32,
        rdev: (u32, u32),
        data: &[u8],
    ) -> io::Result<()> {
        let path = path.trim_start_matches('/');
        if path.is_empty() || path == TRAILER {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("invalid cpio entry name {path:?}"),
            ));
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        self.write_entry(path, ino, mode, nlink, rdev, data)
    }

    fn write_entry(
        &mut self,
        name: &str,
        ino: u32,
        mode: u32,
        nlink: u32,
        rdev: (u32, u32),
        data: &[u8],
    ) -> io::Result<()> {
        let size = u32::try_from(data.len()).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "cpio newc entries are limited to 4 GiB",
            )
        })?;
        let name_len = name.len() + 1;
        let fields = [
            ino,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime
            size,
            0, // devmajor
            0, // devminor
            rdev.0,
            rdev.1,
            name_len as u32,
            0, // check
        ];
        let mut header = Vec::with_capacity(HEADER_LEN + name_len + 3);
        header.extend_from_slice(MAGIC);
        for field in fields {
            header.extend_from_slice(format!("{field:08X}").as_bytes());
        }
        header.extend_from_slice(name.as_bytes());
        header.push(0);
        header.resize(header.len() + pad4(header.len()), 0);
        self.out.write_all(&header)?;
        self.out.write_all(data)?;
        self.out.write_all(&[0u8; 3][..pad4(data.len())])?;
        self.written += (header.len() + data.len() + pad4(data.len())) as u64;
        Ok(())
    }
}

fn pad4(len: usize) -> usize {
    (4 - len % 4) % 4
}

/// One entry read back from an archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpioEntry {
    pub name: String,
    pub mode: u32,
    pub rdev: (u32, u32),
    pub data: Vec<u8>,
}

/// Errors reading an archive.
#[derive(Debug, thiserror::Error)]
pub enum CpioReadError {
    #[error("truncated archive at offset {0}")]
    Truncated(usize),
    #[error("bad magic at offset {0} (only newc is supported)")]
    BadMagic(usize),
    #[error("bad header field at offset {0}")]
    BadField(usize),
}

/// Parses a whole uncompressed newc archive (up to its trailer), to inspect
/// an initramfs.
pub fn read_newc(bytes: &[u8]) -> Result<Vec<CpioEntry>, CpioReadError> {
    let mut entries = Vec::new();
    let mut at = 0usize;
    loop {
        let header = bytes
            .get(at..at + HEADER_LEN)
            .ok_or(CpioReadError::Truncated(at))?;
        if &header[..6] != MAGIC {
            return Err(CpioReadError::BadMagic(at));
        }
        let field = |i: usize| -> Result<u32, CpioReadError> {
            let raw = &header[6 + i * 8..6 + (i + 1) * 8];
            std::str::from_utf8(raw)
                .ok()
                .and_then(|s| u32::from_str_radix(s, 16).ok())
                .ok_or(CpioReadError::BadField(at))
        };
        let mode = field(1)?;
        let size = field(6)? as usize;
        let rdev = (field(9)?, field(10)?);
        let name_len = field(11)? as usize;
        let name_start = at + HEADER_LEN;
        let name_bytes = bytes
            .get(name_start..name_start + name_len)
            .ok_or(CpioReadError::Truncated(name_start))?;
        let name = String::from_utf8_lossy(name_bytes.strip_suffix(&[0]).unwrap_or(name_bytes))
            .into_owned();
        let data_start = name_start + name_len + pad4(HEADER_LEN + name_len);
        let data = bytes
            .get(data_start..data_start + size)
            .ok_or(CpioReadError::Truncated(data_start))?;
        at = data_start + size + pad4(size);
        if name == TRAILER {
            return Ok(entries);
        }
        entries.push(CpioEntry {
            name,
            mode,
            rdev,
            data: data.to_vec(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_entry_kind() {
        let mut w = CpioWriter::new(Vec::new());
        w.dir("bin", 0o755).unwrap();
        w.file("bin/busybox", 0o755, b"\x7fELF not really").unwrap();
        w.symlink("bin/sh", "busybox").unwrap();
        w.dir("dev", 0o755).unwrap();
        w.char_device("dev/console", 0o600, 5, 1).unwrap();
        w.file("/init", 0o755, b"#!/bin/sh\n").unwrap();
        w.file("empty", 0o644, b"").unwrap();
        let written = w.written();
        let bytes = w.finish().unwrap();
        assert!(bytes.len() as u64 > written, "trailer follows the entries");
        assert_eq!(bytes.len() % 4, 0);

        let entries = read_newc(&bytes).unwrap();
        let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "bin",
                "bin/busybox",
                "bin/sh",
                "dev",
                "dev/console",
                "init",
                "empty"
            ]
        );
        assert_eq!(entries[0].mode, S_IFDIR | 0o755);
        assert_eq!(entries[1].data, b"\x7fELF not really");
        assert_eq!(entries[2].mode & S_IFMT, S_IFLNK);
        assert_eq!(entries[2].data, b"busybox");
        assert_eq!(entries[4].mode, S_IFCHR | 0o600);
        assert_eq!(entries[4].rdev, (5, 1));
        assert_eq!(entries[5].data, b"#!/bin/sh\n");
        assert!(entries[6].data.is_empty());
    }

    #[test]
    fn header_layout_matches_newc() {
        let mut w = CpioWriter::new(Vec::new());
        w.file("a", 0o644, b"xyz").unwrap();
        let bytes = w.finish().unwrap();
        let header = std::str::from_utf8(&bytes[..HEADER_LEN]).unwrap();
        // magic, ino 1, mode 0100644, uid, gid, nlink 1, mtime, size 3, ...
        assert_eq!(
            header,
            "07070100000001000081A40000000000000000000000010000000000000003000000000000000000000000000000000000000200000000"
        );
        // Name "a\0" padded so data starts 4-aligned (110 + 2 = 112).
        assert_eq!(&bytes[110..112], b"a\0");
        assert_eq!(&bytes[112..115], b"xyz");
        assert_eq!(bytes[115], 0);
        assert_eq!(&bytes[116..122], MAGIC);
    }

    #[test]
    fn reader_rejects_damage() {
        let mut w = CpioWriter::new(Vec::new());
        w.file("a", 0o644, b"data").unwrap();
        let bytes = w.finish().unwrap();
        assert!(matches!(
            read_newc(&bytes[..50]),
            Err(CpioReadError::Truncated(0))
        ));
        let mut bad = bytes.clone();
        bad[0] = b'1';
        assert!(matches!(read_newc(&bad), Err(CpioReadError::BadMagic(0))));
        assert!(matches!(
            read_newc(&bytes[..bytes.len() - 120]),
            Err(CpioReadError::Truncated(_))
        ));
    }

    #[test]
    fn trailer_name_and_empty_names_are_refused() {
        let mut w = CpioWriter::new(Vec::new());
        assert!(w.file("TRAILER!!!", 0o644, b"").is_err());
        assert!(w.dir("/", 0o755).is_err());
    }
}
