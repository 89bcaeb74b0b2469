//! The SSH key banger manages for `vm ssh`, and the keys it authorizes in
//! guests: its own plus the user's public keys from ~/.ssh.

use std::path::{Path, PathBuf};

/// Why banger's own SSH key cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum SshKeyError {
    #[error("cannot create {}: {source}", dir.display())]
    Dir {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("ssh-keygen not found: install openssh-client (see banger doctor)")]
    NoKeygen,
    #[error("ssh-keygen: {0}")]
    Keygen(std::io::Error),
    #[error("ssh-keygen failed: {0}")]
    KeygenFailed(String),
}

#[derive(Debug, Clone)]
pub struct SshKeys {
    pub private_key: PathBuf,
}

/// A new key pair of type `kind` (`ed25519`, `ecdsa`) made by the host's
/// ssh-keygen: the private key (OpenSSH format) and the public key line.
/// For a restored guest's sshd host keys: the host makes them in
/// milliseconds, a guest without KVM in a tenth of a second or more each.
pub async fn key_pair(kind: &str, comment: &str) -> Result<(String, String), SshKeyError> {
    let keygen = banger_host::find_binary("ssh-keygen").ok_or(SshKeyError::NoKeygen)?;
    let dir = tempfile::tempdir().map_err(SshKeyError::Keygen)?;
    let key = dir.path().join("key");
    let out = tokio::process::Command::new(keygen)
        .args(["-q", "-t", kind, "-N", "", "-C", comment, "-f"])
        .arg(&key)
        .output()
        .await
        .map_err(SshKeyError::Keygen)?;
    if !out.status.success() {
        return Err(SshKeyError::KeygenFailed(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    let private = std::fs::read_to_string(&key).map_err(SshKeyError::Keygen)?;
    let public = std::fs::read_to_string(key.with_extension("pub")).map_err(SshKeyError::Keygen)?;
    Ok((private, public.trim_end().to_owned()))
}

impl SshKeys {
    /// `<state>/ssh/id_ed25519`, generated on first use with ssh-keygen.
    pub fn ensure(state_dir: &Path) -> Result<SshKeys, SshKeyError> {
        let dir = state_dir.join("ssh");
        let private_key = dir.join("id_ed25519");
        if !private_key.exists() {
            std::fs::create_dir_all(&dir).map_err(|source| SshKeyError::Dir {
                dir: dir.clone(),
                source,
            })?;
            let keygen = banger_host::find_binary("ssh-keygen").ok_or(SshKeyError::NoKeygen)?;
            let out = std::process::Command::new(keygen)
                .args(["-q", "-t", "ed25519", "-N", "", "-C", "banger", "-f"])
                .arg(&private_key)
                .output()
                .map_err(SshKeyError::Keygen)?;
            if !out.status.success() {
                return Err(SshKeyError::KeygenFailed(
                    String::from_utf8_lossy(&out.stderr).trim().to_string(),
                ));
            }
        }
        Ok(SshKeys { private_key })
    }

    /// Public keys to authorize in a guest: banger's own, then the user's.
    pub fn authorized_keys(&self) -> Vec<String> {
        let mut keys = Vec::new();
        let mut add = |p: &Path| {
            if let Ok(text) = std::fs::read_to_string(p) {
                keys.extend(
                    text.lines()
                        .map(str::trim)
                        .filter(|l| !l.is_empty() && !l.starts_with('#'))
                        .map(str::to_owned),
                );
            }
        };
        add(&self.private_key.with_extension("pub"));
        if let Some(home) = std::env::var_os("HOME").map(PathBuf::from)
            && let Ok(entries) = std::fs::read_dir(home.join(".ssh"))
        {
            let mut pubs: Vec<PathBuf> = entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "pub"))
                .collect();
            pubs.sort();
            for p in pubs {
                add(&p);
            }
        }
        keys.dedup();
        keys
    }
}
