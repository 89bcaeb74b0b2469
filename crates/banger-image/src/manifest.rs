//! `manifest.json`: what an image directory holds, with digests to check it.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Name of the manifest inside an image directory.
pub const MANIFEST_FILE: &str = "manifest.json";
/// Version of the manifest layout written by this crate.
pub const MANIFEST_FORMAT: u32 = 1;

/// The bzImage, for QEMU's `-kernel` when PVH is not wanted.
pub const VMLINUZ: &str = "vmlinuz";
/// The uncompressed kernel ELF (PVH entry), for QEMU and Firecracker.
pub const VMLINUX: &str = "vmlinux";
/// banger's initramfs (uncompressed newc cpio).
pub const INITRD: &str = "initrd.img";
/// Read-only base root filesystem (ext4, label `rootfs`).
pub const ROOTFS: &str = "rootfs.ext4";
/// Small empty ext4 (label `work`), copied and grown per VM.
pub const WORK_SEED: &str = "work-seed.ext4";
/// Every payload file of an image, in build order.
pub const IMAGE_FILES: [&str; 5] = [VMLINUZ, VMLINUX, INITRD, ROOTFS, WORK_SEED];

/// How the guest's userspace starts, chosen per boot with `banger.init=`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InitMode {
    /// The initramfs switches to `/sbin/init` (systemd).
    Systemd,
    /// The initramfs switches to `banger-agent --init`.
    Fast,
}

impl InitMode {
    /// The kernel command line argument selecting this mode.
    pub fn kernel_arg(self) -> &'static str {
        match self {
            InitMode::Systemd => "banger.init=systemd",
            InitMode::Fast => "banger.init=fast",
        }
    }
}

impl fmt::Display for InitMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            InitMode::Systemd => "systemd",
            InitMode::Fast => "fast",
        })
    }
}

/// Size and SHA-256 of one file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileDigest {
    /// Lowercase hex.
    pub sha256: String,
    pub size: u64,
}

/// A service that must be up before a VM of the image counts as ready:
/// a TCP port listening in the guest, or a command that exits 0. Images
/// built from recipes, pulled or imported carry them in their manifests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceCheck {
    /// Shown in the `services ready` stage and in errors.
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Run by `/bin/sh -c` in the guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// A file in the guest the service logs to, whose tail a create that
    /// gives up on it shows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log: Option<String>,
    pub timeout_secs: u32,
}

/// The contents of `manifest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageManifest {
    pub format: u32,
    /// Recipe the image was built from (`debian-12`).
    pub recipe: String,
    /// `uname -r` of the image's kernel.
    pub kernel_version: String,
    pub default_init: InitMode,
    /// Archive the packages came from.
    pub mirror: String,
    /// Seconds since the Unix epoch when the build finished.
    pub built_at_unix: u64,
    /// Wall time of the whole build.
    pub build_seconds: f64,
    /// File name (relative to the image directory) -> digest.
    pub files: BTreeMap<String, FileDigest>,
    /// What must be up before a VM of the image counts as ready (the
    /// recipe's `[[services]]`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<ServiceCheck>,
}

/// Errors reading or writing a manifest.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a valid manifest")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path} has manifest format {found}, this build reads {MANIFEST_FORMAT}")]
    Format { path: PathBuf, found: u32 },
}

/// A difference between an image directory and its manifest.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("{0} is missing from the manifest")]
    NotListed(String),
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: size {actual}, manifest says {expected}")]
    Size {
        file: String,
        expected: u64,
        actual: u64,
    },
    #[error("{file}: sha256 {actual}, manifest says {expected}")]
    Digest {
        file: String,
        expected: String,
        actual: String,
    },
}

/// Hashes a file. SHA-256 through `ring`: several times faster than a
/// portable implementation on CPUs without SHA extensions, and images hash
/// gigabytes (a sparse 2 GiB `rootfs.ext4` in full).
pub fn digest_file(path: &Path) -> std::io::Result<FileDigest> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    let sha256 = hasher
        .finish()
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok(FileDigest { sha256, size })
}

impl ImageManifest {
    /// Reads `dir/manifest.json`.
    pub fn load(dir: &Path) -> Result<Self, ManifestError> {
        let path = dir.join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&path).map_err(|source| ManifestError::Read {
            path: path.clone(),
            source,
        })?;
        let manifest: ImageManifest =
            serde_json::from_str(&text).map_err(|source| ManifestError::Parse {
                path: path.clone(),
                source,
            })?;
        if manifest.format != MANIFEST_FORMAT {
            return Err(ManifestError::Format {
                path,
                found: manifest.format,
            });
        }
        Ok(manifest)
    }

    /// Writes `dir/manifest.json` (pretty-printed, newline-terminated).
    pub fn write(&self, dir: &Path) -> Result<(), ManifestError> {
        let path = dir.join(MANIFEST_FILE);
        let mut text =
            serde_json::to_string_pretty(self).map_err(|source| ManifestError::Parse {
                path: path.clone(),
                source,
            })?;
        text.push('\n');
        std::fs::write(&path, text).map_err(|source| ManifestError::Write { path, source })
    }

    /// Re-hashes every listed file under `dir` and checks every image file
    /// is listed. Reads all the files: seconds for a 2 GiB sparse rootfs.
    pub fn verify(&self, dir: &Path) -> Result<(), VerifyError> {
        if let Some(missing) = IMAGE_FILES.iter().find(|f| !self.files.contains_key(**f)) {
            return Err(VerifyError::NotListed((*missing).to_owned()));
        }
        for (file, expected) in &self.files {
            let path = dir.join(file);
            let actual = digest_file(&path).map_err(|source| VerifyError::Read { path, source })?;
            if actual.size != expected.size {
                return Err(VerifyError::Size {
                    file: file.clone(),
                    expected: expected.size,
                    actual: actual.size,
                });
            }
            if actual.sha256 != expected.sha256 {
                return Err(VerifyError::Digest {
                    file: file.clone(),
                    expected: expected.sha256.clone(),
                    actual: actual.sha256,
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image_dir() -> (tempfile::TempDir, ImageManifest) {
        let dir = tempfile::tempdir().unwrap();
        let mut files = BTreeMap::new();
        for name in IMAGE_FILES {
            let path = dir.path().join(name);
            std::fs::write(&path, format!("contents of {name}")).unwrap();
            files.insert(name.to_owned(), digest_file(&path).unwrap());
        }
        let manifest = ImageManifest {
            format: MANIFEST_FORMAT,
            recipe: "debian-12".into(),
            kernel_version: "6.1.0-test".into(),
            default_init: InitMode::Systemd,
            mirror: "http://deb.debian.org/debian".into(),
            built_at_unix: 1_700_000_000,
            build_seconds: 12.5,
            files,
            services: Vec::new(),
        };
        manifest.write(dir.path()).unwrap();
        (dir, manifest)
    }

    #[test]
    fn digest_matches_known_sha256() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("abc");
        std::fs::write(&path, b"abc").unwrap();
        let d = digest_file(&path).unwrap();
        assert_eq!(d.size, 3);
        assert_eq!(
            d.sha256,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn round_trips_and_verifies_an_intact_image() {
        let (dir, manifest) = image_dir();
        let loaded = ImageManifest::load(dir.path()).unwrap();
        assert_eq!(loaded, manifest);
        loaded.verify(dir.path()).unwrap();
        let text = std::fs::read_to_string(dir.path().join(MANIFEST_FILE)).unwrap();
        assert!(text.contains("\"default_init\": \"systemd\""), "{text}");
    }

    #[test]
    fn verify_detects_a_changed_file_of_same_size() {
        let (dir, manifest) = image_dir();
        // Same length, different byte: only the digest can tell.
        std::fs::write(dir.path().join(INITRD), "contents of initrd.imG").unwrap();
        match manifest.verify(dir.path()) {
            Err(VerifyError::Digest { file, .. }) => assert_eq!(file, INITRD),
            other => panic!("expected a digest mismatch, got {other:?}"),
        }
    }

    #[test]
    fn verify_detects_size_change_missing_file_and_unlisted_file() {
        let (dir, mut manifest) = image_dir();
        std::fs::write(dir.path().join(ROOTFS), "longer contents of rootfs.ext4").unwrap();
        assert!(matches!(
            manifest.verify(dir.path()),
            Err(VerifyError::Size { file, .. }) if file == ROOTFS
        ));
        std::fs::remove_file(dir.path().join(ROOTFS)).unwrap();
        assert!(matches!(
            manifest.verify(dir.path()),
            Err(VerifyError::Read { .. })
        ));
        manifest.files.remove(VMLINUX);
        assert!(matches!(
            manifest.verify(dir.path()),
            Err(VerifyError::NotListed(f)) if f == VMLINUX
        ));
    }

    #[test]
    fn load_rejects_unknown_format_and_fields() {
        let (dir, mut manifest) = image_dir();
        manifest.format = 99;
        manifest.write(dir.path()).unwrap();
        assert!(matches!(
            ImageManifest::load(dir.path()),
            Err(ManifestError::Format { found: 99, .. })
        ));
        let path = dir.path().join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replacen('{', "{\"extra\": 1,", 1);
        std::fs::write(&path, text).unwrap();
        assert!(matches!(
            ImageManifest::load(dir.path()),
            Err(ManifestError::Parse { .. })
        ));
    }
}
