//! The daemon's link to `banger-helper`, the root helper.
//!
//! Every privileged operation goes through [`HelperLink::call`], which
//! forwards the caller's op id so that the helper's log lines carry it too.
//! Where no service manager runs the helper, the daemon starts it itself —
//! possible only when the daemon runs as root (as on CI); otherwise the
//! error says how to install it.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use banger_rpc::{Client, ClientError};
use banger_wire::helper::Ping;
use banger_wire::{ErrorCode, Method, NoParams, OpId};
use tokio::sync::Mutex;
use tracing::{info, warn};

#[derive(Debug)]
pub struct HelperLink {
    socket: PathBuf,
    log_file: PathBuf,
    /// banger's state directory: a helper we start may attach files under it.
    state_dir: PathBuf,
    /// Serialises starts so that concurrent first calls spawn one helper.
    starting: Mutex<()>,
}

const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one helper call may take. Its methods are netlink, nftables,
/// losetup and dmsetup calls that take milliseconds; a helper wedged past
/// this must not wedge the daemon's operation (and its busy mark) with it.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a helper that stopped answering may take to answer or go.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(5);

impl HelperLink {
    pub fn new(socket: PathBuf, log_file: PathBuf, state_dir: PathBuf) -> Self {
        HelperLink {
            socket,
            log_file,
            state_dir,
            starting: Mutex::new(()),
        }
    }

    /// Call `M` on the helper with `op_id`, starting the helper if needed.
    pub async fn call<M: Method>(
        &self,
        op_id: &OpId,
        params: &M::Params,
    ) -> Result<M::Result, HelperError> {
        let mut client = match Client::connect(&self.socket).await {
            Ok(c) => c,
            Err(_) => self.start().await?,
        };
        let answer = tokio::time::timeout(CALL_TIMEOUT, client.call::<M>(params, Some(op_id)))
            .await
            .map_err(|_| {
                HelperError::Unavailable(format!(
                    "banger-helper at {} did not answer {} within {}s; see its log {}",
                    self.socket.display(),
                    M::NAME,
                    CALL_TIMEOUT.as_secs(),
                    self.log_file.display()
                ))
            })?;
        match answer {
            Ok(result) => Ok(result),
            // The helper's error already carries our op id: pass code and message through.
            Err(ClientError::Remote(obj)) => Err(HelperError::Refused {
                code: obj.code,
                message: obj.message,
            }),
            Err(other) => {
                self.settle().await;
                Err(HelperError::Unavailable(format!(
                    "banger-helper at {} failed: {other}",
                    self.socket.display()
                )))
            }
        }
    }

    /// After a call the helper never answered: it may be dying (killed in
    /// the call), its socket still taking connections it will never serve.
    /// Wait until the socket answers a ping again or refuses connections,
    /// so the caller's next call (a clean-up, say) reaches a live helper or
    /// starts a new one instead of meeting the dying one.
    async fn settle(&self) {
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        while Instant::now() < deadline {
            let Ok(mut c) = Client::connect(&self.socket).await else {
                return;
            };
            let ping = c.call::<Ping>(&NoParams {}, None);
            if let Ok(Ok(_)) = tokio::time::timeout(SETTLE_TIMEOUT, ping).await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        warn!(socket = %self.socket.display(), "banger-helper neither answers nor goes away");
    }

    /// The command a user runs to start the helper this daemon expects: the
    /// same binary, socket and state dir the daemon would pass, shell-quoted
    /// so that it works pasted as given.
    fn manual_start_command(&self, bin: &std::path::Path, uid: u32) -> String {
        let bin = bin.to_string_lossy();
        let socket = self.socket.to_string_lossy();
        let uid = uid.to_string();
        let state = self.state_dir.to_string_lossy();
        let words = [
            "sudo",
            &bin,
            "--socket",
            &socket,
            "--allow-uid",
            &uid,
            "--state-dir",
            &state,
        ];
        shlex::try_join(words).unwrap_or_else(|_| words.join(" "))
    }

    async fn start(&self) -> Result<Client, HelperError> {
        let _guard = self.starting.lock().await;
        // Someone may have started it while we waited for the lock.
        if let Ok(c) = Client::connect(&self.socket).await {
            return Ok(c);
        }
        let bin = helper_binary();
        if !rustix::process::geteuid().is_root() {
            return Err(HelperError::Unavailable(format!(
                "banger-helper is not running at {}; start it as root with `{}` \
                 or install its systemd unit with ./install.sh",
                self.socket.display(),
                self.manual_start_command(&bin, rustix::process::getuid().as_raw())
            )));
        }
        info!(bin = %bin.display(), socket = %self.socket.display(), "starting banger-helper");
        if let Some(dir) = self.log_file.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_file.with_extension("stderr"))
            .map(Stdio::from)
            .unwrap_or_else(|_| Stdio::null());
        let mut child = tokio::process::Command::new(&bin)
            .arg("--socket")
            .arg(&self.socket)
            .arg("--allow-uid")
            .arg(rustix::process::getuid().as_raw().to_string())
            .arg("--log-file")
            .arg(&self.log_file)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--detach")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|e| {
                HelperError::Unavailable(format!("cannot start {}: {e}", bin.display()))
            })?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(c) = Client::connect(&self.socket).await {
                // Reap the helper whenever it exits so it never lingers as a zombie.
                tokio::spawn(async move {
                    let status = child.wait().await;
                    warn!(?status, "banger-helper exited");
                });
                return Ok(c);
            }
            if let Ok(Some(status)) = child.try_wait() {
                return Err(HelperError::Unavailable(format!(
                    "banger-helper exited at startup ({status}); see {}",
                    self.log_file.with_extension("stderr").display()
                )));
            }
            if Instant::now() > deadline {
                let _ = child.start_kill();
                return Err(HelperError::Unavailable(format!(
                    "banger-helper did not open {} within {}s; see {}",
                    self.socket.display(),
                    START_TIMEOUT.as_secs(),
                    self.log_file.display()
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// What a helper call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum HelperError {
    /// The helper answered with an error; its code is passed on.
    #[error("banger-helper: {message}")]
    Refused { code: ErrorCode, message: String },
    /// The helper could not be reached or started.
    #[error("{0}")]
    Unavailable(String),
}

/// `banger-helper` next to our own binary, else from PATH.
fn helper_binary() -> PathBuf {
    std::env::current_exe()
        .ok()
        .map(|exe| exe.with_file_name("banger-helper"))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("banger-helper"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A helper that takes the call and never answers: the call fails with
    /// the method named, instead of waiting forever.
    #[tokio::test(start_paused = true)]
    async fn a_wedged_helper_call_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("helper.sock");
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                held.push(s);
            }
        });
        let link = HelperLink::new(socket, dir.path().join("h.log"), dir.path().into());
        let e = link
            .call::<banger_wire::helper::Ping>(&OpId::mint(), &banger_wire::NoParams {})
            .await
            .unwrap_err();
        assert!(
            matches!(&e, HelperError::Unavailable(m) if m.contains("did not answer") && m.contains("ping")),
            "{e}"
        );
    }

    #[test]
    fn the_manual_start_hint_names_the_socket_the_daemon_dials() {
        let link = HelperLink::new(
            "/run/user/1000/banger/helper.sock".into(),
            "/tmp/h.log".into(),
            "/home/a user/.local/state/banger".into(),
        );
        let cmd =
            link.manual_start_command(std::path::Path::new("/usr/local/bin/banger-helper"), 1000);
        let argv = shlex::split(&cmd).expect("the hint is valid shell");
        assert_eq!(
            argv,
            [
                "sudo",
                "/usr/local/bin/banger-helper",
                "--socket",
                "/run/user/1000/banger/helper.sock",
                "--allow-uid",
                "1000",
                "--state-dir",
                "/home/a user/.local/state/banger",
            ]
        );
    }
}
