//! What every subcommand gets: paths, config, output mode, this invocation's
//! op id, and the connection to the daemon (started on first use).

use std::io::IsTerminal;
use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use banger_config::lockfile::LockFile;
use banger_config::{Config, Paths};
use banger_rpc::{Client, error_chain};
use banger_wire::{Method, OpId};

use crate::error::CliError;

/// How long a CLI waits for a daemon it started to open its socket.
const DAEMON_START_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a CLI waits for another CLI that is starting the daemon.
const SPAWN_LOCK_TIMEOUT: Duration = Duration::from_secs(30);

/// One `banger` invocation: what every subcommand gets.
/// The umask the CLI was started with (it then runs with 077).
pub static USER_UMASK: std::sync::OnceLock<u32> = std::sync::OnceLock::new();

#[derive(Debug)]
pub struct Invocation {
    pub paths: Paths,
    config: Result<Config, String>,
    pub json: bool,
    /// Minted per invocation and sent with every call, so that whatever goes
    /// wrong — here, in the daemon or in the helper — is findable by one id.
    pub op_id: OpId,
}

impl Invocation {
    pub fn new(paths: Paths, json: bool) -> Invocation {
        let config = Config::load(&paths.config_file).map_err(|e| error_chain(&e));
        Invocation {
            paths,
            config,
            json,
            op_id: OpId::mint(),
        }
    }

    /// The same invocation under another op id: a long-lived client
    /// (`banger mcp`) mints one per request it serves.
    pub fn with_op_id(&self, op_id: OpId) -> Invocation {
        Invocation {
            paths: self.paths.clone(),
            config: self.config.clone(),
            json: self.json,
            op_id,
        }
    }

    pub fn config(&self) -> Result<&Config, CliError> {
        self.config
            .as_ref()
            .map_err(|m| CliError::local(&self.op_id, m))
    }

    /// Colour only on a terminal, and never with NO_COLOR set.
    pub fn color(&self) -> bool {
        std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()) && std::io::stdout().is_terminal()
    }

    /// Call `M` on the daemon, starting it if none answers.
    pub async fn call<M: Method>(&self, params: &M::Params) -> Result<M::Result, CliError> {
        let mut client = self.daemon().await?;
        client
            .call::<M>(params, Some(&self.op_id))
            .await
            .map_err(|e| CliError::from_client(&self.op_id, e))
    }

    /// A connection to the running daemon, if one answers; never starts one.
    /// A socket that is not the user's own is refused, not talked to.
    pub async fn running_daemon(&self) -> Result<Option<Client>, CliError> {
        let socket = self.paths.daemon_socket();
        self.check_socket_owner(&socket)?;
        Ok(Client::connect(&socket).await.ok())
    }

    /// Another local user who can write the runtime dir (or who made it)
    /// could put a socket of theirs there and read every request.
    fn check_socket_owner(&self, socket: &std::path::Path) -> Result<(), CliError> {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let Ok(meta) = std::fs::symlink_metadata(socket) else {
            return Ok(());
        };
        let me = rustix::process::geteuid().as_raw();
        if !meta.file_type().is_socket() || meta.uid() != me {
            return Err(CliError::Unavailable {
                message: format!(
                    "{} is not a socket of yours (a {}, owned by uid {}, you are {me}): \
                     refusing to talk to it; remove it if it is stale",
                    socket.display(),
                    if meta.file_type().is_socket() {
                        "socket"
                    } else {
                        "non-socket file"
                    },
                    meta.uid()
                ),
                op_id: self.op_id.clone(),
            });
        }
        Ok(())
    }

    /// A connection to the daemon, starting it when none answers. Concurrent
    /// CLIs serialise on the spawn lock, so exactly one daemon gets started.
    pub async fn daemon(&self) -> Result<Client, CliError> {
        if let Some(c) = self.running_daemon().await? {
            return Ok(c);
        }
        let unavailable = |message: String| CliError::Unavailable {
            message,
            op_id: self.op_id.clone(),
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.paths.runtime_dir)
            .map_err(|e| {
                unavailable(format!(
                    "cannot create {}: {e}",
                    self.paths.runtime_dir.display()
                ))
            })?;
        let lock_path = self.paths.spawn_lock();
        let _lock = tokio::task::spawn_blocking(move || {
            LockFile::acquire_timeout(&lock_path, SPAWN_LOCK_TIMEOUT)
        })
        .await
        .expect("lock task does not panic")
        .map_err(|e| unavailable(format!("cannot start bangerd: {e}")))?;
        // Another CLI may have started it while we waited.
        if let Some(c) = self.running_daemon().await? {
            return Ok(c);
        }
        self.spawn_daemon().await.map_err(unavailable)
    }

    async fn spawn_daemon(&self) -> Result<Client, String> {
        let bin = sibling_binary("bangerd");
        let log_dir = self.paths.log_dir();
        std::fs::create_dir_all(&log_dir)
            .map_err(|e| format!("cannot create {}: {e}", log_dir.display()))?;
        let stderr_path = self.paths.daemon_stderr();
        let stderr = std::fs::File::create(&stderr_path)
            .map_err(|e| format!("cannot create {}: {e}", stderr_path.display()))?;
        let mut cmd = std::process::Command::new(&bin);
        cmd.arg("--detach")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        if let Some(home) = &self.paths.home {
            cmd.arg("--home").arg(home);
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        let socket = self.paths.daemon_socket();
        let deadline = Instant::now() + DAEMON_START_TIMEOUT;
        loop {
            if let Ok(c) = Client::connect(&socket).await {
                return Ok(c);
            }
            if let Ok(Some(status)) = child.try_wait() {
                let said = std::fs::read_to_string(&stderr_path).unwrap_or_default();
                let said = said.trim();
                return Err(format!(
                    "bangerd exited at startup ({status}){}; see {} and {}",
                    if said.is_empty() {
                        String::new()
                    } else {
                        format!(": {said}")
                    },
                    stderr_path.display(),
                    self.paths.daemon_log().display()
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "bangerd (pid {}) did not open {} within {} s; see {}",
                    child.id(),
                    socket.display(),
                    DAEMON_START_TIMEOUT.as_secs(),
                    self.paths.daemon_log().display()
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A binary installed next to this one (as cargo and install.sh lay them
/// out), else the bare name for a PATH lookup.
pub fn sibling_binary(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .map(|exe| exe.with_file_name(name))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(name))
}
