use std::env;
use std::path::{Path, PathBuf};

/// Where banger keeps its files.
///
/// Without `BANGER_HOME`/`--home`, the XDG layout:
/// - config: `$XDG_CONFIG_HOME/banger/config.toml` (default `~/.config`)
/// - state (database, VMs, images, logs): `$XDG_STATE_HOME/banger` (default `~/.local/state`)
/// - runtime (sockets, locks): `$XDG_RUNTIME_DIR/banger`, or `<state>/run` when unset
/// - helper socket: `/run/banger/helper.sock` (the root helper is shared per host)
///
/// With a home `DIR`, everything is below it: `DIR/config.toml`, `DIR/state`,
/// `DIR/run`, and the helper socket `DIR/run/helper.sock`, so isolated
/// installations (tests, scripts) run side by side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paths {
    pub home: Option<PathBuf>,
    pub config_file: PathBuf,
    pub state_dir: PathBuf,
    pub runtime_dir: PathBuf,
    /// Default location of the root helper's socket; `[helper] socket` overrides it.
    pub default_helper_socket: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum PathsError {
    #[error(
        "cannot find a home directory: set HOME, or BANGER_HOME to keep banger's files elsewhere"
    )]
    NoHome,
    #[error("{var} must be an absolute path, got {value:?}")]
    NotAbsolute { var: &'static str, value: String },
}

impl Paths {
    /// Resolve from `home` (the `--home` flag), else `BANGER_HOME`, else XDG.
    pub fn resolve(home: Option<&Path>) -> Result<Paths, PathsError> {
        let from_env = |var: &'static str| -> Result<Option<PathBuf>, PathsError> {
            match env::var_os(var) {
                Some(v) if !v.is_empty() => {
                    let p = PathBuf::from(&v);
                    if p.is_absolute() {
                        Ok(Some(p))
                    } else {
                        Err(PathsError::NotAbsolute {
                            var,
                            value: v.to_string_lossy().into_owned(),
                        })
                    }
                }
                _ => Ok(None),
            }
        };
        let home = match home {
            Some(h) => Some(absolute(h)),
            None => from_env("BANGER_HOME")?,
        };
        if let Some(dir) = home {
            return Ok(Paths::under(dir));
        }
        let user_home = from_env("HOME")?.ok_or(PathsError::NoHome)?;
        let config_home = from_env("XDG_CONFIG_HOME")?.unwrap_or_else(|| user_home.join(".config"));
        let state_home =
            from_env("XDG_STATE_HOME")?.unwrap_or_else(|| user_home.join(".local/state"));
        let state_dir = state_home.join("banger");
        let runtime_dir = match from_env("XDG_RUNTIME_DIR")? {
            Some(r) => r.join("banger"),
            None => state_dir.join("run"),
        };
        Ok(Paths {
            home: None,
            config_file: config_home.join("banger/config.toml"),
            state_dir,
            runtime_dir,
            default_helper_socket: PathBuf::from("/run/banger/helper.sock"),
        })
    }

    /// The layout of an isolated installation rooted at `dir`.
    pub fn under(dir: PathBuf) -> Paths {
        Paths {
            config_file: dir.join("config.toml"),
            state_dir: dir.join("state"),
            runtime_dir: dir.join("run"),
            default_helper_socket: dir.join("run/helper.sock"),
            home: Some(dir),
        }
    }

    /// This installation's mark on names global to the host (its bridge,
    /// nftables table, vsock CIDs): six hex digits of a hash of its state
    /// directory, so two installs (two users, or two `BANGER_HOME`s) side
    /// by side never pick the same.
    pub fn install_id(&self) -> String {
        install_id(&self.state_dir)
    }

    pub fn daemon_socket(&self) -> PathBuf {
        self.runtime_dir.join("bangerd.sock")
    }
    /// Held (flock) by the running daemon for its whole life; holds its pid.
    pub fn daemon_lock(&self) -> PathBuf {
        self.runtime_dir.join("bangerd.lock")
    }
    /// Held by a CLI while it checks for and starts a daemon.
    pub fn spawn_lock(&self) -> PathBuf {
        self.runtime_dir.join("spawn.lock")
    }
    pub fn log_dir(&self) -> PathBuf {
        self.state_dir.join("logs")
    }
    /// The daemon's JSON log.
    pub fn daemon_log(&self) -> PathBuf {
        self.log_dir().join("bangerd.log")
    }
    /// Where a daemon started by the CLI writes what it prints before its log is open.
    pub fn daemon_stderr(&self) -> PathBuf {
        self.log_dir().join("bangerd.stderr")
    }
    /// The root helper's JSON log, when the daemon starts the helper.
    pub fn helper_log(&self) -> PathBuf {
        self.log_dir().join("helper.log")
    }
    pub fn database(&self) -> PathBuf {
        self.state_dir.join("banger.db")
    }
}

fn absolute(p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        env::current_dir()
            .map(|d| d.join(p))
            .unwrap_or_else(|_| p.to_path_buf())
    }
}

/// The install id of the install whose state directory is `state_dir`
/// ([`Paths::install_id`]); the helper computes it from its `--state-dir`s
/// to know which names are its installs'.
pub fn install_id(state_dir: &std::path::Path) -> String {
    use sha2::{Digest, Sha256};
    let hash = Sha256::digest(state_dir.as_os_str().as_encoded_bytes());
    hash[..3].iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn home_puts_everything_below_it() {
        let p = Paths::resolve(Some(Path::new("/tmp/bh"))).unwrap();
        assert_eq!(p.config_file, PathBuf::from("/tmp/bh/config.toml"));
        assert_eq!(p.daemon_socket(), PathBuf::from("/tmp/bh/run/bangerd.sock"));
        assert_eq!(p.database(), PathBuf::from("/tmp/bh/state/banger.db"));
        assert_eq!(
            p.default_helper_socket,
            PathBuf::from("/tmp/bh/run/helper.sock")
        );
        assert!(p.daemon_log().starts_with("/tmp/bh/state"));
    }
}
