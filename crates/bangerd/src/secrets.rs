//! `SecretService`: the values behind `banger secret`, one file per secret
//! under `<state>/secrets/` (the directory 0700, each file 0600, written
//! whole or not at all: a temp file in the same directory, synced, renamed
//! over the old one). The store records only which VMs may use a secret
//! (`vm_secrets`: name, hosts, placeholder); values never enter the
//! database, the logs or any reply.
//!
//! Or in the desktop keyring (`[secrets] store`): the value is an item of
//! the Secret Service's default collection, found by its attributes
//! (`banger-install`: the state directory, `banger-secret`: the name), and
//! the secrets directory holds only `NAME.keyring`, an empty 0600 marker
//! that says where the value is (so that listing never asks the keyring).
//! The daemon reaches the session bus it was started with
//! (`DBUS_SESSION_BUS_ADDRESS`, or `$XDG_RUNTIME_DIR/bus`).

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use banger_config::SecretStore;
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
    /// The desktop keyring did not answer, is locked, or refused.
    #[error("{0}")]
    Keyring(String),
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
    kind: SecretStore,
    /// The keyring items' `banger-install` attribute: this install's state
    /// directory.
    install: String,
}

/// The suffix of a keyring secret's marker file.
const MARKER: &str = ".keyring";

impl SecretService {
    pub fn new(state_dir: &Path, store: Arc<Store>, kind: SecretStore) -> SecretService {
        SecretService {
            dir: state_dir.join("secrets"),
            store,
            kind,
            install: state_dir.display().to_string(),
        }
    }

    fn marker(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}{MARKER}"))
    }

    /// Whether `name`'s value is in the keyring (its marker exists).
    fn in_keyring(&self, name: &str) -> bool {
        self.marker(name).is_file()
    }

    /// `bytes` as `path`, whole or not at all, 0600.
    fn write_whole(&self, path: &Path, bytes: &[u8]) -> Result<(), SecretError> {
        // NamedTempFile makes its file 0600 and exclusively.
        let mut tmp = tempfile::NamedTempFile::new_in(&self.dir).map_err(self.io(&self.dir))?;
        tmp.write_all(bytes)
            .and_then(|()| tmp.as_file().sync_all())
            .map_err(self.io(tmp.path()))?;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(self.io(path))?;
        tmp.persist(path).map_err(|e| self.io(path)(e.error))?;
        std::fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(self.io(&self.dir))
    }

    fn remove_if_there(&self, path: &Path) -> Result<bool, SecretError> {
        match std::fs::remove_file(path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(self.io(path)(e)),
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

    fn info(&self, name: &str, path: &Path, keyring: bool) -> Result<SecretInfo, SecretError> {
        let meta = std::fs::metadata(path).map_err(self.io(path))?;
        Ok(SecretInfo {
            name: name.to_owned(),
            created_at_ms: meta.mtime() * 1000 + meta.mtime_nsec() / 1_000_000,
            used_by: self.store.vms_using_secret(name)?,
            store: if keyring { "keyring" } else { "file" }.into(),
        })
    }

    /// Stores (or replaces) `name`'s value, where `[secrets] store` says
    /// (taking it out of the other place if it was there).
    pub async fn set(&self, name: &str, value: &str) -> Result<SecretInfo, SecretError> {
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
        let keyring = match self.kind {
            SecretStore::File => false,
            SecretStore::Keyring => true,
            SecretStore::Auto => keyring::usable().await,
        };
        if keyring {
            keyring::store(&self.install, name, value).await?;
            let marker = self.marker(name);
            self.write_whole(&marker, b"")?;
            self.remove_if_there(&path)?;
            self.info(name, &marker, true)
        } else {
            self.write_whole(&path, value.as_bytes())?;
            if self.in_keyring(name) {
                // Out of the keyring; a keyring that cannot be reached keeps a
                // copy no marker points to, which a later set replaces.
                if let Err(e) = keyring::delete(&self.install, name).await {
                    tracing::warn!(secret = name, error = %e, "cannot delete the old keyring item");
                }
                self.remove_if_there(&self.marker(name))?;
            }
            self.info(name, &path, false)
        }
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
            let (name, keyring) = match name.strip_suffix(MARKER) {
                Some(n) => (n.to_owned(), true),
                None => (name, false),
            };
            if secret_name_problem(&name).is_none() {
                out.push(self.info(&name, &entry.path(), keyring)?);
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Forgets `name`; refused while a VM may use it.
    pub async fn remove(&self, name: &str) -> Result<(), SecretError> {
        let path = self.path(name)?;
        let users = self.store.vms_using_secret(name)?;
        if !users.is_empty() {
            return Err(SecretError::Conflict(format!(
                "secret {name} is used by VM(s) {}: delete them first",
                users.join(", ")
            )));
        }
        let snapshots = self.store.snapshots_using_secret(name)?;
        if !snapshots.is_empty() {
            return Err(SecretError::Conflict(format!(
                "secret {name} is kept by snapshot(s) {} for the VMs restored from them: delete them first (banger snapshot delete)",
                snapshots.join(", ")
            )));
        }
        if self.in_keyring(name) {
            keyring::delete(&self.install, name).await?;
            self.remove_if_there(&self.marker(name))?;
            return Ok(());
        }
        if self.remove_if_there(&path)? {
            Ok(())
        } else {
            Err(SecretError::NotFound(format!("no secret named {name}")))
        }
    }

    /// Whether `name` is stored.
    pub fn exists(&self, name: &str) -> Result<bool, SecretError> {
        Ok(self.path(name)?.is_file() || self.in_keyring(name))
    }

    /// The value of `name`, read when it is needed (never cached: a `set`
    /// takes effect on the next request).
    pub async fn value(&self, name: &str) -> Result<String, SecretError> {
        let path = self.path(name)?;
        if self.in_keyring(name) {
            return keyring::read(&self.install, name).await?.ok_or_else(|| {
                SecretError::Keyring(format!(
                    "secret {name}: the desktop keyring has no value for it any more: set it again (banger secret set {name})"
                ))
            });
        }
        std::fs::read_to_string(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                SecretError::NotFound(format!("no secret named {name}"))
            }
            _ => self.io(&path)(e),
        })
    }
}

/// The desktop keyring, through the Secret Service D-Bus API (the
/// `secret-service` crate). Every call has a deadline: a keyring that
/// does not answer is an error, never a hang.
mod keyring {
    use std::collections::HashMap;
    use std::time::Duration;

    use secret_service::{EncryptionType, Error, SecretService};

    use super::SecretError;

    /// How long a call may take; a `set` that makes the keyring ask for
    /// its password waits for the user that long.
    const DEADLINE: Duration = Duration::from_secs(60);
    /// How long `auto` waits to learn whether a keyring answers.
    const PROBE: Duration = Duration::from_secs(2);

    fn attrs<'a>(install: &'a str, name: &'a str) -> HashMap<&'a str, &'a str> {
        HashMap::from([("banger-install", install), ("banger-secret", name)])
    }

    fn failed(what: &str, e: Error) -> SecretError {
        SecretError::Keyring(match e {
            Error::Unavailable | Error::Zbus(_) => format!(
                "{what}: no desktop keyring answers on the session bus the daemon started with ({e}); start one, or set [secrets] store = \"file\" (then banger daemon stop)"
            ),
            Error::Locked => format!(
                "{what}: the desktop keyring is locked: unlock it (log in to the desktop session), then try again"
            ),
            Error::Prompt => format!("{what}: the keyring's unlock prompt was dismissed"),
            e => format!("{what}: {e}"),
        })
    }

    async fn within<T>(
        what: &str,
        limit: Duration,
        f: impl std::future::Future<Output = Result<T, Error>>,
    ) -> Result<T, SecretError> {
        match tokio::time::timeout(limit, f).await {
            Ok(r) => r.map_err(|e| failed(what, e)),
            Err(_) => Err(SecretError::Keyring(format!(
                "{what}: the desktop keyring did not answer within {}s",
                limit.as_secs()
            ))),
        }
    }

    async fn connect(what: &str) -> Result<SecretService<'static>, SecretError> {
        within(what, PROBE, SecretService::connect(EncryptionType::Dh)).await
    }

    /// Whether a keyring answers and its default collection is unlocked
    /// (`auto` never makes it prompt).
    pub async fn usable() -> bool {
        let probe = async {
            let ss = SecretService::connect(EncryptionType::Dh).await?;
            let c = ss.get_default_collection().await?;
            Ok::<_, Error>(!c.is_locked().await?)
        };
        matches!(tokio::time::timeout(PROBE, probe).await, Ok(Ok(true)))
    }

    pub async fn store(install: &str, name: &str, value: &str) -> Result<(), SecretError> {
        let what = format!("secret {name}");
        let ss = connect(&what).await?;
        within(&what, DEADLINE, async {
            let c = ss.get_default_collection().await?;
            if c.is_locked().await? {
                c.unlock().await?;
            }
            c.create_item(
                &format!("banger secret {name} ({install})"),
                attrs(install, name),
                value.as_bytes(),
                true,
                "text/plain",
            )
            .await
            .map(drop)
        })
        .await
    }

    /// The value, if an unlocked item holds it; a locked one is an error
    /// (the daemon never makes the keyring prompt behind the user's back).
    pub async fn read(install: &str, name: &str) -> Result<Option<String>, SecretError> {
        let what = format!("secret {name}");
        let ss = connect(&what).await?;
        within(&what, DEADLINE, async {
            let found = ss.search_items(attrs(install, name)).await?;
            match found.unlocked.first() {
                Some(item) => Ok(Some(item.get_secret().await?)),
                None if found.locked.is_empty() => Ok(None),
                None => Err(Error::Locked),
            }
        })
        .await?
        .map(|v| {
            String::from_utf8(v).map_err(|_| {
                SecretError::Keyring(format!("{what}: the keyring's value is not UTF-8"))
            })
        })
        .transpose()
    }

    pub async fn delete(install: &str, name: &str) -> Result<(), SecretError> {
        let what = format!("secret {name}");
        let ss = connect(&what).await?;
        within(&what, DEADLINE, async {
            let found = ss.search_items(attrs(install, name)).await?;
            if !found.locked.is_empty() {
                return Err(Error::Locked);
            }
            for item in &found.unlocked {
                item.delete().await?;
            }
            Ok(())
        })
        .await
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

    #[tokio::test]
    async fn set_list_remove() {
        let state = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open_in_memory().unwrap());
        let s = SecretService::new(state.path(), store, SecretStore::File);
        assert!(s.list().unwrap().is_empty());
        s.set("TOKEN", "v1").await.unwrap();
        s.set("TOKEN", "v2").await.unwrap();
        assert_eq!(s.value("TOKEN").await.unwrap(), "v2");
        let dir_mode = std::fs::metadata(state.path().join("secrets"))
            .unwrap()
            .mode();
        assert_eq!(dir_mode & 0o777, 0o700);
        let mode = std::fs::metadata(state.path().join("secrets/TOKEN"))
            .unwrap()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let listed: Vec<_> = s
            .list()
            .unwrap()
            .into_iter()
            .map(|i| (i.name, i.store))
            .collect();
        assert_eq!(listed, [("TOKEN".to_owned(), "file".to_owned())]);
        assert!(matches!(
            s.set("bad", "x").await,
            Err(SecretError::Invalid(_))
        ));
        assert!(matches!(
            s.set("A", "x\r\ny: z").await,
            Err(SecretError::Invalid(_))
        ));
        assert!(matches!(s.set("A", "").await, Err(SecretError::Invalid(_))));
        s.remove("TOKEN").await.unwrap();
        assert!(matches!(
            s.remove("TOKEN").await,
            Err(SecretError::NotFound(_))
        ));
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
