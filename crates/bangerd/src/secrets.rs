//! `SecretService`: the values behind `banger secret`, one file per secret
//! under `<state>/secrets/` (the directory 0700, each file 0600, written
//! whole or not at all: a temp file in the same directory, synced, renamed
//! over the old one). The store records only which VMs may use a secret
//! (`vm_secrets`: name, hosts, placeholder); values never enter the
//! database, the logs or any reply.
//!
//! No desktop keyring: the daemon runs without a session bus, so the files
//! are the one store.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use banger_store::{Store, StoreError, VmSecret};
use banger_wire::methods::{SecretInfo, secret_name_problem};

/// Largest value kept (an API key or token, not a file store).
pub const MAX_VALUE_BYTES: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("secret store {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

#[derive(Debug)]
pub struct SecretService {
    dir: PathBuf,
    store: Arc<Store>,
}

impl SecretService {
    pub fn new(state_dir: &Path, store: Arc<Store>) -> SecretService {
        SecretService {
            dir: state_dir.join("secrets"),
            store,
        }
    }

    fn io(&self, path: &Path) -> impl FnOnce(std::io::Error) -> SecretError {
        let path = path.to_owned();
        move |source| SecretError::Io { path, source }
    }

    fn path(&self, name: &str) -> Result<PathBuf, SecretError> {
        match secret_name_problem(name) {
            Some(p) => Err(SecretError::Invalid(p)),
            None => Ok(self.dir.join(name)),
        }
    }

    /// The directory, made 0700 if missing; refused if anyone else may
    /// read it.
    fn ensure_dir(&self) -> Result<(), SecretError> {
        match std::fs::DirBuilder::new().mode(0o700).create(&self.dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let meta = std::fs::symlink_metadata(&self.dir).map_err(self.io(&self.dir))?;
                if !meta.is_dir() || meta.mode() & 0o077 != 0 {
                    return Err(SecretError::Invalid(format!(
                        "{} must be a directory only its owner can open (mode 0700)",
                        self.dir.display()
                    )));
                }
                Ok(())
            }
            Err(e) => Err(self.io(&self.dir)(e)),
        }
    }

    fn info(&self, name: &str, path: &Path) -> Result<SecretInfo, SecretError> {
        let meta = std::fs::metadata(path).map_err(self.io(path))?;
        Ok(SecretInfo {
            name: name.to_owned(),
            created_at_ms: meta.mtime() * 1000 + meta.mtime_nsec() / 1_000_000,
            used_by: self.store.vms_using_secret(name)?,
        })
    }

    /// Stores (or replaces) `name`'s value.
    pub fn set(&self, name: &str, value: &str) -> Result<SecretInfo, SecretError> {
        let path = self.path(name)?;
        if value.is_empty() {
            return Err(SecretError::Invalid(format!(
                "secret {name}: the value is empty"
            )));
        }
        if value.len() > MAX_VALUE_BYTES {
            return Err(SecretError::Invalid(format!(
                "secret {name}: the value is over {MAX_VALUE_BYTES} bytes"
            )));
        }
        // The proxy puts the value into HTTP header lines as it is.
        if value.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0) {
            return Err(SecretError::Invalid(format!(
                "secret {name}: the value holds a line break or NUL (it goes into HTTP headers)"
            )));
        }
        self.ensure_dir()?;
        // NamedTempFile makes its file 0600 and exclusively.
        let mut tmp = tempfile::NamedTempFile::new_in(&self.dir).map_err(self.io(&self.dir))?;
        tmp.write_all(value.as_bytes())
            .and_then(|()| tmp.as_file().sync_all())
            .map_err(self.io(tmp.path()))?;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(self.io(&path))?;
        tmp.persist(&path).map_err(|e| self.io(&path)(e.error))?;
        std::fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(self.io(&self.dir))?;
        self.info(name, &path)
    }

    /// Every stored secret, by name.
    pub fn list(&self) -> Result<Vec<SecretInfo>, SecretError> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(self.io(&self.dir)(e)),
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(self.io(&self.dir))?;
            // Temp files of a set in flight (or cut short) are not secrets.
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if secret_name_problem(&name).is_none() {
                out.push(self.info(&name, &entry.path())?);
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Forgets `name`; refused while a VM may use it.
    pub fn remove(&self, name: &str) -> Result<(), SecretError> {
        let path = self.path(name)?;
        let users = self.store.vms_using_secret(name)?;
        if !users.is_empty() {
            return Err(SecretError::Conflict(format!(
                "secret {name} is used by VM(s) {}: delete them first",
                users.join(", ")
            )));
        }
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(SecretError::NotFound(format!("no secret named {name}")))
            }
            Err(e) => Err(self.io(&path)(e)),
        }
    }

    /// Whether `name` is stored.
    pub fn exists(&self, name: &str) -> Result<bool, SecretError> {
        Ok(self.path(name)?.is_file())
    }

    /// The value of `name`, read when it is needed (never cached: a `set`
    /// takes effect on the next request).
    pub fn value(&self, name: &str) -> Result<String, SecretError> {
        let path = self.path(name)?;
        std::fs::read_to_string(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                SecretError::NotFound(format!("no secret named {name}"))
            }
            _ => self.io(&path)(e),
        })
    }
}

/// A new placeholder for secret `name` in one VM: what the guest holds
/// instead of the value, random per VM (128 bits).
pub fn placeholder(name: &str) -> String {
    format!(
        "BANGER_PLACEHOLDER_{name}_{:016x}{:016x}",
        fastrand::u64(..),
        fastrand::u64(..)
    )
}

/// Whether `host` (an SNI name) matches one of `patterns` (exact names, or
/// `*.NAME` for NAME's subdomains).
pub fn host_matches(patterns: &[String], host: &str) -> bool {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    patterns.iter().any(|p| match p.strip_prefix("*.") {
        Some(base) => host
            .strip_suffix(base)
            .is_some_and(|sub| sub.len() > 1 && sub.ends_with('.')),
        None => *p == host,
    })
}

/// The guest-side view of a VM's secrets, for `vm show`.
pub fn secret_infos(secrets: &[VmSecret]) -> Vec<banger_wire::methods::VmSecretInfo> {
    secrets
        .iter()
        .map(|s| banger_wire::methods::VmSecretInfo {
            name: s.name.clone(),
            hosts: s.hosts.clone(),
            placeholder: s.placeholder.clone(),
            in_body: s.in_body,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_list_remove() {
        let state = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open_in_memory().unwrap());
        let s = SecretService::new(state.path(), store);
        assert!(s.list().unwrap().is_empty());
        s.set("TOKEN", "v1").unwrap();
        s.set("TOKEN", "v2").unwrap();
        assert_eq!(s.value("TOKEN").unwrap(), "v2");
        let dir_mode = std::fs::metadata(state.path().join("secrets"))
            .unwrap()
            .mode();
        assert_eq!(dir_mode & 0o777, 0o700);
        let mode = std::fs::metadata(state.path().join("secrets/TOKEN"))
            .unwrap()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let names: Vec<_> = s.list().unwrap().into_iter().map(|i| i.name).collect();
        assert_eq!(names, ["TOKEN"]);
        assert!(matches!(s.set("bad", "x"), Err(SecretError::Invalid(_))));
        assert!(matches!(
            s.set("A", "x\r\ny: z"),
            Err(SecretError::Invalid(_))
        ));
        assert!(matches!(s.set("A", ""), Err(SecretError::Invalid(_))));
        s.remove("TOKEN").unwrap();
        assert!(matches!(s.remove("TOKEN"), Err(SecretError::NotFound(_))));
        assert!(!s.exists("TOKEN").unwrap());
    }

    #[test]
    fn hosts_match_exactly_or_as_subdomains() {
        let p = vec!["api.test".to_owned(), "*.example.org".to_owned()];
        assert!(host_matches(&p, "api.test"));
        assert!(host_matches(&p, "API.test."));
        assert!(host_matches(&p, "a.example.org"));
        assert!(host_matches(&p, "a.b.example.org"));
        for no in [
            "example.org",
            "xexample.org",
            "api.test.evil",
            "other.test",
            "",
        ] {
            assert!(!host_matches(&p, no), "{no}");
        }
    }

    #[test]
    fn placeholders_differ() {
        let a = placeholder("TOKEN");
        assert!(a.starts_with("BANGER_PLACEHOLDER_TOKEN_"));
        assert_eq!(a.len(), "BANGER_PLACEHOLDER_TOKEN_".len() + 32);
        assert_ne!(a, placeholder("TOKEN"));
    }
}
