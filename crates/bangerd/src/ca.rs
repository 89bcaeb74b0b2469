//! The install's certificate authority (rcgen), for the secrets proxy: made
//! at first use into `<state>/ca/` (`ca.key` 0600, `ca.crt`), put in the
//! trust store of each guest with secrets, and signing a leaf certificate
//! for each host the proxy intercepts (made on demand, kept in memory).

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

#[derive(Debug)]
pub struct Ca {
    /// PEM of the CA's certificate, as the guests get it.
    pub cert_pem: String,
    cert_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
    /// One key for every leaf: made at daemon start, never written down.
    leaf_key: KeyPair,
    leaves: Mutex<HashMap<String, Arc<rustls::ServerConfig>>>,
}

/// The CA's own fields. The same every time, so that a CA read back from
/// its files signs leaves that chain to the certificate written then.
fn ca_params(install_id: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "banger");
    dn.push(
        DnType::CommonName,
        format!("banger secrets proxy CA ({install_id})"),
    );
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
}

fn write_new(path: &Path, text: &str, mode: u32) -> anyhow::Result<()> {
    let dir = path.parent().expect("a file in the CA dir");
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(mode))?;
    tmp.write_all(text.as_bytes())?;
    tmp.as_file().sync_all()?;
    tmp.persist(path)?;
    Ok(())
}

impl Ca {
    /// The CA in `dir`, made there first if missing.
    pub fn load_or_create(dir: &Path, install_id: &str) -> anyhow::Result<Ca> {
        let (key_path, cert_path) = (dir.join("ca.key"), dir.join("ca.crt"));
        let (key, cert_pem) = match (
            std::fs::read_to_string(&key_path),
            std::fs::read_to_string(&cert_path),
        ) {
            (Ok(key), Ok(cert)) => (
                KeyPair::from_pem(&key).with_context(|| format!("{}", key_path.display()))?,
                cert,
            ),
            _ => {
                match std::fs::DirBuilder::new().mode(0o700).create(dir) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(e).with_context(|| format!("{}", dir.display())),
                }
                let key = KeyPair::generate()?;
                let cert = ca_params(install_id).self_signed(&key)?;
                // The key first: a certificate is never there without it.
                write_new(&key_path, &key.serialize_pem(), 0o600)
                    .with_context(|| format!("{}", key_path.display()))?;
                write_new(&cert_path, &cert.pem(), 0o644)
                    .with_context(|| format!("{}", cert_path.display()))?;
                tracing::info!(dir = %dir.display(), "made the secrets proxy's CA");
                (key, cert.pem())
            }
        };
        use rustls::pki_types::pem::PemObject;
        let cert_der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .with_context(|| format!("{}", cert_path.display()))?;
        Ok(Ca {
            cert_pem,
            cert_der,
            issuer: Issuer::new(ca_params(install_id), key),
            leaf_key: KeyPair::generate()?,
            leaves: Mutex::default(),
        })
    }

    /// The TLS server side for `host`: a leaf certificate for it (made once).
    pub fn server_config(&self, host: &str) -> anyhow::Result<Arc<rustls::ServerConfig>> {
        if let Some(c) = self.leaves.lock().expect("leaves").get(host) {
            return Ok(c.clone());
        }
        let mut params = CertificateParams::new(vec![host.to_owned()])?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, host);
        params.distinguished_name = dn;
        let leaf = params.signed_by(&self.leaf_key, &self.issuer)?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.leaf_key.serialize_der()));
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(vec![leaf.der().clone(), self.cert_der.clone()], key)?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let config = Arc::new(config);
        self.leaves
            .lock()
            .expect("leaves")
            .insert(host.to_owned(), config.clone());
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn made_once_then_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        let a = Ca::load_or_create(&ca_dir, "abc").unwrap();
        let mode = std::fs::metadata(ca_dir.join("ca.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let b = Ca::load_or_create(&ca_dir, "abc").unwrap();
        assert_eq!(a.cert_pem, b.cert_pem);
        // A leaf made by the CA read back verifies against the first's certificate.
        let mut roots = rustls::RootCertStore::empty();
        roots.add(a.cert_der.clone()).unwrap();
        let server = b.server_config("api.test").unwrap();
        assert!(Arc::ptr_eq(&server, &b.server_config("api.test").unwrap()));
        let client = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let mut c = rustls::ClientConnection::new(Arc::new(client), "api.test".try_into().unwrap())
            .unwrap();
        let mut s = rustls::ServerConnection::new(server).unwrap();
        // Run the handshake in memory.
        for _ in 0..10 {
            let mut buf = Vec::new();
            c.write_tls(&mut buf).unwrap();
            s.read_tls(&mut &buf[..]).unwrap();
            s.process_new_packets().unwrap();
            let mut buf = Vec::new();
            s.write_tls(&mut buf).unwrap();
            c.read_tls(&mut &buf[..]).unwrap();
            c.process_new_packets().unwrap();
        }
        assert!(!c.is_handshaking());
    }
}
