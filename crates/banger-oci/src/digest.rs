//! Streaming SHA-256 through `ring` for layers and blobs (several times
//! faster than a portable implementation on CPUs without SHA extensions),
//! written as OCI digests. Whole files: [`banger_image::digest_file`].

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
        let d = banger_image::digest_file(&p).unwrap();
        assert_eq!(format!("sha256:{}", d.sha256), super::of(b"abc"));
        assert_eq!(d.size, 3);
    }
}
