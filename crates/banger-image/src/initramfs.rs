//! banger's own initramfs: busybox, the few modules needed to reach the root
//! disk and the agent channel, and an `/init` script that mounts the root and
//! switches to systemd or straight to the agent (`banger.init=fast`).
//!
//! Everything comes from the image's own tree (its busybox, its kernel's
//! modules), so the host needs neither busybox nor cpio.

use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use crate::cpio::CpioWriter;
use crate::modules::{ModuleError, ModuleIndex};

/// The `/init` script (busybox sh).
pub const INIT_SCRIPT: &str = include_str!("init.sh");

/// Where the script reads the module load order from.
const MODULE_LIST: &str = "etc/banger-modules";

/// Errors building the initramfs.
#[derive(Debug, thiserror::Error)]
pub enum InitramfsError {
    #[error("busybox not found in the tree (looked for {0:?}); install busybox-static")]
    NoBusybox(Vec<PathBuf>),
    #[error("no modules directory for kernel {0} in the tree")]
    NoModules(String),
    #[error(transparent)]
    Modules(#[from] ModuleError),
    #[error("module {0} uses a compression this builder cannot read (only none, xz, zstd)")]
    UnsupportedCompression(String),
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write the initramfs")]
    Write(#[source] std::io::Error),
}

/// What went into an initramfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitramfsReport {
    /// Module files in load order, relative to `lib/modules/<version>`,
    /// as stored (decompressed, ending in `.ko`).
    pub modules: Vec<String>,
    /// Archive size in bytes.
    pub size: u64,
}

/// First of `candidates` (relative to `tree`) that exists. The `usr/` forms
/// come first so a merged-/usr tree is read without following the top-level
/// compatibility symlinks.
fn find_in_tree(tree: &Path, candidates: &[&str]) -> Option<PathBuf> {
    candidates.iter().map(|c| tree.join(c)).find(|p| p.exists())
}

fn read(path: &Path) -> Result<Vec<u8>, InitramfsError> {
    std::fs::read(path).map_err(|source| InitramfsError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Reads a module file, decompressing `.ko.xz` and `.ko.zst` (busybox
/// insmod loads plain `.ko` only). Returns the stored name and contents.
fn load_module(modules_dir: &Path, rel: &str) -> Result<(String, Vec<u8>), InitramfsError> {
    let path = modules_dir.join(rel);
    let raw = read(&path)?;
    let corrupt = |source: std::io::Error| InitramfsError::Read {
        path: path.clone(),
        source,
    };
    if let Some(stem) = rel.strip_suffix(".ko.xz") {
        let mut out = Vec::new();
        liblzma::read::XzDecoder::new(raw.as_slice())
            .read_to_end(&mut out)
            .map_err(corrupt)?;
        Ok((format!("{stem}.ko"), out))
    } else if let Some(stem) = rel.strip_suffix(".ko.zst") {
        let mut out = Vec::new();
        ruzstd::StreamingDecoder::new(raw.as_slice())
            .map_err(|e| {
                corrupt(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    e.to_string(),
                ))
            })?
            .read_to_end(&mut out)
            .map_err(corrupt)?;
        Ok((format!("{stem}.ko"), out))
    } else if rel.ends_with(".ko") {
        Ok((rel.to_owned(), raw))
    } else {
        Err(InitramfsError::UnsupportedCompression(rel.to_owned()))
    }
}

/// Builds the initramfs for `kernel_version` from the root tree `tree` into
/// `out` (an uncompressed newc archive), with `modules` (names or aliases)
/// and everything they depend on.
pub fn build_initramfs<S: AsRef<str>>(
    tree: &Path,
    kernel_version: &str,
    modules: &[S],
    out: &Path,
) -> Result<InitramfsReport, InitramfsError> {
    let busybox_candidates = ["usr/bin/busybox", "bin/busybox"];
    let busybox = find_in_tree(tree, &busybox_candidates).ok_or_else(|| {
        InitramfsError::NoBusybox(busybox_candidates.iter().map(|c| tree.join(c)).collect())
    })?;
    let modules_dir = find_in_tree(
        tree,
        &[
            &format!("usr/lib/modules/{kernel_version}"),
            &format!("lib/modules/{kernel_version}"),
        ],
    )
    .ok_or_else(|| InitramfsError::NoModules(kernel_version.to_owned()))?;
    let order = ModuleIndex::load(&modules_dir)?.resolve(modules)?;

    let file = std::fs::File::create(out).map_err(InitramfsError::Write)?;
    let mut w = CpioWriter::new(BufWriter::new(file));
    let mut dirs_done: Vec<String> = Vec::new();
    let mut mkdir_p = |w: &mut CpioWriter<_>, dir: &str| -> std::io::Result<()> {
        let mut prefix = String::new();
        for part in dir.split('/') {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(part);
            if !dirs_done.contains(&prefix) {
                w.dir(&prefix, 0o755)?;
                dirs_done.push(prefix.clone());
            }
        }
        Ok(())
    };

    let write_err = InitramfsError::Write;
    for dir in [
        "bin", "sbin", "usr/bin", "usr/sbin", "etc", "dev", "proc", "sys", "run", "tmp", "newroot",
    ] {
        mkdir_p(&mut w, dir).map_err(write_err)?;
    }
    w.char_device("dev/console", 0o600, 5, 1)
        .map_err(write_err)?;
    w.file("bin/busybox", 0o755, &read(&busybox)?)
        .map_err(write_err)?;
    w.symlink("bin/sh", "busybox").map_err(write_err)?;
    w.file("init", 0o755, INIT_SCRIPT.as_bytes())
        .map_err(write_err)?;

    let mut stored = Vec::with_capacity(order.len());
    for rel in &order {
        let (name, data) = load_module(&modules_dir, rel)?;
        let path = format!("lib/modules/{kernel_version}/{name}");
        if let Some((parent, _)) = path.rsplit_once('/') {
            mkdir_p(&mut w, parent).map_err(write_err)?;
        }
        w.file(&path, 0o644, &data).map_err(write_err)?;
        stored.push(name);
    }
    let mut list = stored.join("\n");
    list.push('\n');
    w.file(MODULE_LIST, 0o644, list.as_bytes())
        .map_err(write_err)?;

    let size = w.written();
    let mut inner = w.finish().map_err(write_err)?;
    inner.flush().map_err(write_err)?;
    let file = inner.into_inner().map_err(|e| write_err(e.into_error()))?;
    file.sync_all().map_err(write_err)?;
    let size = file.metadata().map(|m| m.len()).unwrap_or(size);
    Ok(InitramfsReport {
        modules: stored,
        size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpio::{S_IFCHR, S_IFLNK, S_IFMT, S_IFREG, read_newc};

    /// A one-frame zstd stream holding `data` in a raw block (hand-made:
    /// ruzstd only decodes).
    fn zstd_raw(data: &[u8]) -> Vec<u8> {
        assert!(data.len() < 256);
        let mut out = 0xFD2F_B528u32.to_le_bytes().to_vec();
        out.push(0x20); // single segment, 1-byte content size, no checksum
        out.push(data.len() as u8);
        let block_header = 1 | ((data.len() as u32) << 3); // last, raw
        out.extend_from_slice(&block_header.to_le_bytes()[..3]);
        out.extend_from_slice(data);
        out
    }

    /// A tree shaped like Debian's: merged /usr, modules under usr/lib.
    fn fake_tree() -> tempfile::TempDir {
        let tree = tempfile::tempdir().unwrap();
        let root = tree.path();
        let mods = root.join("usr/lib/modules/6.1.0-test");
        for dir in [
            "usr/bin",
            "kernel/fs/ext4",
            "kernel/drivers/block",
            "kernel/drivers/virtio",
        ] {
            let base = if dir.starts_with("usr") {
                root.to_owned()
            } else {
                mods.clone()
            };
            std::fs::create_dir_all(base.join(dir)).unwrap();
        }
        std::fs::write(root.join("usr/bin/busybox"), b"\x7fELF busybox").unwrap();
        std::fs::write(mods.join("kernel/fs/ext4/ext4.ko"), b"ext4 module").unwrap();
        std::fs::write(
            mods.join("kernel/drivers/virtio/virtio.ko.zst"),
            zstd_raw(b"virtio module"),
        )
        .unwrap();
        let mut xz = liblzma::write::XzEncoder::new(Vec::new(), 6);
        xz.write_all(b"virtio_blk module").unwrap();
        std::fs::write(
            mods.join("kernel/drivers/block/virtio_blk.ko.xz"),
            xz.finish().unwrap(),
        )
        .unwrap();
        std::fs::write(
            mods.join("modules.dep"),
            "kernel/fs/ext4/ext4.ko:\n\
             kernel/drivers/virtio/virtio.ko.zst:\n\
             kernel/drivers/block/virtio_blk.ko.xz: kernel/drivers/virtio/virtio.ko.zst\n",
        )
        .unwrap();
        tree
    }

    #[test]
    fn archive_holds_busybox_init_console_and_modules_in_order() {
        let tree = fake_tree();
        let out = tree.path().join("initrd.img");
        let report =
            build_initramfs(tree.path(), "6.1.0-test", &["virtio_blk", "ext4"], &out).unwrap();
        assert_eq!(
            report.modules,
            [
                "kernel/drivers/virtio/virtio.ko",
                "kernel/drivers/block/virtio_blk.ko",
                "kernel/fs/ext4/ext4.ko"
            ]
        );
        let bytes = std::fs::read(&out).unwrap();
        assert_eq!(report.size, bytes.len() as u64);
        let entries = read_newc(&bytes).unwrap();
        let get = |name: &str| {
            entries
                .iter()
                .find(|e| e.name == name)
                .unwrap_or_else(|| panic!("{name} missing"))
        };
        assert_eq!(get("init").data, INIT_SCRIPT.as_bytes());
        assert_eq!(get("init").mode, S_IFREG | 0o755);
        assert_eq!(get("bin/busybox").data, b"\x7fELF busybox");
        assert_eq!(get("bin/sh").mode & S_IFMT, S_IFLNK);
        assert_eq!(get("dev/console").mode & S_IFMT, S_IFCHR);
        assert_eq!(
            get("lib/modules/6.1.0-test/kernel/drivers/block/virtio_blk.ko").data,
            b"virtio_blk module",
            "xz modules are stored decompressed"
        );
        assert_eq!(
            get("lib/modules/6.1.0-test/kernel/drivers/virtio/virtio.ko").data,
            b"virtio module",
            "zstd modules are stored decompressed"
        );
        assert_eq!(
            get("etc/banger-modules").data,
            b"kernel/drivers/virtio/virtio.ko\nkernel/drivers/block/virtio_blk.ko\nkernel/fs/ext4/ext4.ko\n"
        );
        // Every parent directory precedes its children (the kernel needs it).
        for (i, e) in entries.iter().enumerate() {
            if let Some((parent, _)) = e.name.rsplit_once('/') {
                let at = entries.iter().position(|p| p.name == parent);
                assert!(
                    at.is_some_and(|at| at < i),
                    "{parent} must precede {}",
                    e.name
                );
            }
        }
    }

    #[test]
    fn missing_busybox_or_module_is_reported() {
        let tree = fake_tree();
        let out = tree.path().join("initrd.img");
        assert!(matches!(
            build_initramfs(tree.path(), "6.1.0-test", &["nope"], &out),
            Err(InitramfsError::Modules(ModuleError::Unknown(_)))
        ));
        assert!(matches!(
            build_initramfs(tree.path(), "9.9.9", &["ext4"], &out),
            Err(InitramfsError::NoModules(_))
        ));
        std::fs::remove_file(tree.path().join("usr/bin/busybox")).unwrap();
        assert!(matches!(
            build_initramfs(tree.path(), "6.1.0-test", &["ext4"], &out),
            Err(InitramfsError::NoBusybox(_))
        ));
    }

    #[test]
    fn init_script_parses_and_handles_both_modes() {
        let status = std::process::Command::new("sh")
            .args(["-n", "-c", INIT_SCRIPT])
            .status()
            .unwrap();
        assert!(status.success(), "init script has a syntax error");
        let agent = banger_agent_proto::guest::AGENT_GUEST_PATH;
        assert!(INIT_SCRIPT.contains(&format!("fast) set -- {agent} --init")));
        let init_arg = banger_agent_proto::guest::cmdline::INIT;
        assert!(INIT_SCRIPT.contains(&format!("{init_arg}=*) mode=\"${{arg#{init_arg}=}}\"")));
        assert!(INIT_SCRIPT.contains("systemd) set -- \"${init:-/sbin/init}\""));
        assert!(INIT_SCRIPT.contains("exec switch_root /newroot"));
        // bangerd ends its "kernel boot" timing at this console line.
        assert!(INIT_SCRIPT.contains("echo \"banger-initramfs: switching root to $1\""));
        assert!(INIT_SCRIPT.contains("</etc/banger-modules"));
        assert!(INIT_SCRIPT.contains("banger-initramfs: FATAL"));
    }
}
