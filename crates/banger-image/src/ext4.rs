//! The one fact banger reads from an ext4 image on the host: its label.
//! Reading 16 bytes at a fixed offset of the superblock needs no library
//! (and no e2fsprogs run over a file a user handed us).

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

/// The superblock starts 1024 bytes in; its magic is at +56 and its
/// volume name (16 bytes, NUL-padded) at +120.
const SUPERBLOCK: u64 = 1024;
const MAGIC_AT: usize = 56;
const LABEL_AT: usize = 120;
const EXT_MAGIC: u16 = 0xEF53;

/// The label of the ext2/3/4 filesystem in `path`: `Ok(None)` when the file
/// holds no ext filesystem.
pub fn ext4_label(path: &Path) -> std::io::Result<Option<String>> {
    let mut f = std::fs::File::open(path)?;
    f.seek(SeekFrom::Start(SUPERBLOCK))?;
    let mut sb = [0u8; LABEL_AT + 16];
    if let Err(e) = f.read_exact(&mut sb) {
        return match e.kind() {
            std::io::ErrorKind::UnexpectedEof => Ok(None),
            _ => Err(e),
        };
    }
    if u16::from_le_bytes([sb[MAGIC_AT], sb[MAGIC_AT + 1]]) != EXT_MAGIC {
        return Ok(None);
    }
    let name = &sb[LABEL_AT..];
    let end = name.iter().position(|b| *b == 0).unwrap_or(name.len());
    Ok(Some(String::from_utf8_lossy(&name[..end]).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_label_mkfs_wrote() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("w.ext4");
        let ok = std::process::Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", "work"])
            .arg(&img)
            .arg("8M")
            .status()
            .unwrap();
        assert!(ok.success());
        assert_eq!(ext4_label(&img).unwrap().as_deref(), Some("work"));
        let other = dir.path().join("other");
        std::fs::write(&other, vec![0u8; 4096]).unwrap();
        assert_eq!(ext4_label(&other).unwrap(), None);
        let short = dir.path().join("short");
        std::fs::write(&short, b"x").unwrap();
        assert_eq!(ext4_label(&short).unwrap(), None);
    }
}
