//! SHA-256 through `ring` (already linked for TLS): its assembly is several
//! times faster than a portable implementation on CPUs without SHA
//! extensions, and images hash gigabytes (layers twice, the sparse
//! `rootfs.ext4` in full).

use std::io::Read;
use std::path::Path;

use banger_image::FileDigest;

/// An incremental SHA-256.
pub struct Sha256(ring::digest::Context);

impl std::fmt::Debug for Sha256 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sha256")
    }
}

impl Default for Sha256 {
    fn default() -> Self {
        Sha256(ring::digest::Context::new(&ring::digest::SHA256))
    }
}

impl Sha256 {
    pub fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }

    /// Lowercase hex.
    pub fn hex(self) -> String {
        self.0
            .finish()
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// `sha256:<hex>`, as OCI digests are written.
    pub fn digest(self) -> String {
        format!("sha256:{}", self.hex())
    }
}

/// `sha256:<hex>` of `data`.
pub fn of(data: &[u8]) -> String {
    let mut h = Sha256::default();
    h.update(data);
    h.digest()
}

/// Size and SHA-256 of a file, as image manifests record them.
pub fn file(path: &Path) -> std::io::Result<FileDigest> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::default();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        h.update(&buf[..n]);
        size += n as u64;
    }
    Ok(FileDigest {
        sha256: h.hex(),
        size,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn known_digests() {
        assert_eq!(
            super::of(b""),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"abc").unwrap();
        let d = super::file(&p).unwrap();
        assert_eq!(
            d.sha256,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(d.size, 3);
        assert_eq!(d, banger_image::digest_file(&p).unwrap());
    }
}
