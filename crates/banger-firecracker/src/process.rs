//! Starting, configuring and stopping a Firecracker process.

use std::ffi::OsString;
use std::fmt;
use std::fs::OpenOptions;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal, kill_process_group};
use tokio::net::UnixStream;
use tokio::process::{Child, Command};

use crate::client::{ApiError, FirecrackerClient};
use crate::models::{
    BootSource, Drive, Logger, MachineConfiguration, Metrics, NetworkInterface, Vsock,
};

/// Default bound on the wait for the API socket to accept connections.
/// Firecracker documents ~12 ms of wall time; this leaves room for a loaded
/// host.
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(5);

/// `sun_path` holds 108 bytes including the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;

/// How to launch one Firecracker process.
#[derive(Debug, Clone)]
pub struct SpawnConfig {
    /// The `firecracker` binary (or a stand-in that takes the same flags).
    pub binary: PathBuf,
    /// Passed as `--api-sock`. A stale socket file there is removed first.
    pub api_socket: PathBuf,
    /// Passed as `--id`: 1 to 64 ASCII alphanumerics or `-`.
    pub id: String,
    /// Receives the process's stdout and stderr (appended).
    pub log_file: PathBuf,
    /// Appended after `--api-sock PATH --id ID`.
    pub extra_args: Vec<OsString>,
    /// Bound on the wait for the API socket.
    pub ready_timeout: Duration,
    /// Descriptors (open close-on-exec in the caller) the process keeps
    /// across its exec, such as locks it must hold while it runs. They must
    /// stay open until [`spawn`] returns.
    pub inherit_fds: Vec<std::os::fd::RawFd>,
    /// The process's working directory: relative paths in its API calls
    /// (drives, and so the paths a snapshot records) resolve against it.
    pub current_dir: Option<PathBuf>,
}

impl SpawnConfig {
    pub fn new(
        binary: impl Into<PathBuf>,
        api_socket: impl Into<PathBuf>,
        id: impl Into<String>,
        log_file: impl Into<PathBuf>,
    ) -> Self {
        Self {
            binary: binary.into(),
            api_socket: api_socket.into(),
            id: id.into(),
            log_file: log_file.into(),
            extra_args: Vec::new(),
            ready_timeout: DEFAULT_READY_TIMEOUT,
            inherit_fds: Vec::new(),
            current_dir: None,
        }
    }
}

/// Failures of process control.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("invalid Firecracker instance id {0:?}: use 1 to 64 ASCII letters, digits or '-'")]
    InvalidId(String),
    #[error("API socket path {} is longer than the {MAX_SOCKET_PATH} bytes a Unix socket path can hold", .0.display())]
    SocketPathTooLong(PathBuf),
    #[error("cannot remove the stale API socket {}", path.display())]
    StaleSocket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open the Firecracker log file {}", path.display())]
    LogFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start {}", binary.display())]
    Spawn {
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Firecracker exited ({status}) before its API socket {} accepted connections; see {}{}", api_socket.display(), log_file.display(), tail_suffix(log_tail))]
    ExitedEarly {
        status: ExitStatus,
        api_socket: PathBuf,
        log_file: PathBuf,
        log_tail: String,
    },
    #[error("Firecracker's API socket {} did not accept connections within {timeout:?} (process killed); see {}{}", api_socket.display(), log_file.display(), tail_suffix(log_tail))]
    NotReady {
        api_socket: PathBuf,
        timeout: Duration,
        log_file: PathBuf,
        log_tail: String,
    },
    #[error("cannot signal Firecracker process group {pid}")]
    Signal {
        pid: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot wait for Firecracker process {pid}")]
    Wait {
        pid: u32,
        #[source]
        source: std::io::Error,
    },
}

/// Make the child of `cmd` keep `fds` (open close-on-exec here) across its
/// exec. Only the child's copies change: a process spawned at the same time
/// by another task does not get them.
#[expect(
    unsafe_code,
    reason = "pre_exec is the only way to change the child's copies alone"
)]
pub fn inherit_fds(cmd: &mut Command, fds: Vec<std::os::fd::RawFd>) {
    if fds.is_empty() {
        return;
    }
    // SAFETY: the closure runs in the forked child before exec and only
    // makes fcntl calls, which are async-signal-safe; `fds` was allocated
    // before the fork and is only read.
    unsafe {
        cmd.pre_exec(move || {
            for fd in &fds {
                let fd = std::os::fd::BorrowedFd::borrow_raw(*fd);
                rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::empty())?;
            }
            Ok(())
        });
    }
}

fn tail_suffix(tail: &str) -> String {
    if tail.is_empty() {
        String::new()
    } else {
        format!("; it ends with:\n{tail}")
    }
}

/// A running (or exited but not yet reaped) Firecracker process. It leads
/// its own process group, so terminal signals aimed at the caller's group
/// do not reach it and [`FirecrackerProcess::kill`] takes down anything it
/// started. Dropping this handle leaves the process running.
#[derive(Debug)]
pub struct FirecrackerProcess {
    child: Child,
    pid: u32,
    api_socket: PathBuf,
    log_file: PathBuf,
    api_ready_after: Duration,
}

/// Starts `binary --api-sock PATH --id ID [extra_args]` in a new process
/// group with stdin on `/dev/null` and stdout/stderr appended to the log
/// file, then waits (bounded) until the API socket accepts a connection.
/// On timeout the process group is killed; both a timeout and an early exit
/// are reported with the log path and the tail of the log.
pub async fn spawn(config: &SpawnConfig) -> Result<FirecrackerProcess, ProcessError> {
    if !valid_instance_id(&config.id) {
        return Err(ProcessError::InvalidId(config.id.clone()));
    }
    if config.api_socket.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(ProcessError::SocketPathTooLong(config.api_socket.clone()));
    }
    remove_stale_socket(&config.api_socket)?;
    let log_err = |source| ProcessError::LogFile {
        path: config.log_file.clone(),
        source,
    };
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&config.log_file)
        .map_err(log_err)?;
    let log_for_stderr = log.try_clone().map_err(log_err)?;

    let started = Instant::now();
    let mut cmd = Command::new(&config.binary);
    inherit_fds(&mut cmd, config.inherit_fds.clone());
    if let Some(dir) = &config.current_dir {
        cmd.current_dir(dir);
    }
    let mut child = cmd
        .arg("--api-sock")
        .arg(&config.api_socket)
        .arg("--id")
        .arg(&config.id)
        .args(&config.extra_args)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_for_stderr)
        .process_group(0)
        .spawn()
        .map_err(|source| ProcessError::Spawn {
            binary: config.binary.clone(),
            source,
        })?;
    let pid = child
        .id()
        .expect("a just-spawned child has not been reaped");

    loop {
        if let Some(status) = child
            .try_wait()
            .map_err(|source| ProcessError::Wait { pid, source })?
        {
            return Err(ProcessError::ExitedEarly {
                status,
                api_socket: config.api_socket.clone(),
                log_file: config.log_file.clone(),
                log_tail: log_tail(&config.log_file),
            });
        }
        if UnixStream::connect(&config.api_socket).await.is_ok() {
            break;
        }
        if started.elapsed() >= config.ready_timeout {
            // Leave nothing behind that the caller has no handle on.
            let _ = signal_group(pid, Signal::KILL);
            let _ = child.wait().await;
            return Err(ProcessError::NotReady {
                api_socket: config.api_socket.clone(),
                timeout: config.ready_timeout,
                log_file: config.log_file.clone(),
                log_tail: log_tail(&config.log_file),
            });
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(FirecrackerProcess {
        child,
        pid,
        api_socket: config.api_socket.clone(),
        log_file: config.log_file.clone(),
        api_ready_after: started.elapsed(),
    })
}

/// Firecracker's own rule for `--id`.
fn valid_instance_id(id: &str) -> bool {
    (1..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

fn remove_stale_socket(path: &Path) -> Result<(), ProcessError> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            std::fs::remove_file(path).map_err(|source| ProcessError::StaleSocket {
                path: path.to_owned(),
                source,
            })
        }
        // Not a socket: leave it, Firecracker's bind will report it.
        _ => Ok(()),
    }
}

/// The last lines (up to 2 KiB) of a log file, for error messages.
fn log_tail(path: &Path) -> String {
    let Ok(bytes) = std::fs::read(path) else {
        return String::new();
    };
    let start = bytes.len().saturating_sub(2048);
    let text = String::from_utf8_lossy(&bytes[start..]);
    let text = if start > 0 {
        text.split_once('\n').map_or(&*text, |(_, rest)| rest)
    } else {
        &text
    };
    text.trim_end().to_owned()
}

/// How a [`FirecrackerProcess::stop`] ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopOutcome {
    /// The process had already exited.
    AlreadyExited,
    /// The guest shut down after `SendCtrlAltDel` and Firecracker exited.
    Graceful,
    /// `SendCtrlAltDel` was refused (the message says why); killed.
    KilledAfterRefusal(String),
    /// `SendCtrlAltDel` or the power-off outlived the timeout; killed.
    KilledAfterTimeout,
}

/// Result of [`FirecrackerProcess::stop`].
#[derive(Debug, Clone)]
pub struct StopReport {
    pub outcome: StopOutcome,
    pub exit_status: ExitStatus,
    pub elapsed: Duration,
}

impl FirecrackerProcess {
    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn api_socket(&self) -> &Path {
        &self.api_socket
    }

    pub fn log_file(&self) -> &Path {
        &self.log_file
    }

    /// Time from spawn until the API socket accepted a connection.
    pub fn api_ready_after(&self) -> Duration {
        self.api_ready_after
    }

    /// A new client of this process's API socket.
    pub fn client(&self) -> FirecrackerClient {
        FirecrackerClient::new(&self.api_socket)
    }

    /// The exit status if the process has exited (reaping it).
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>, ProcessError> {
        let pid = self.pid;
        self.child
            .try_wait()
            .map_err(|source| ProcessError::Wait { pid, source })
    }

    /// Waits for the process to exit.
    pub async fn wait(&mut self) -> Result<ExitStatus, ProcessError> {
        let pid = self.pid;
        self.child
            .wait()
            .await
            .map_err(|source| ProcessError::Wait { pid, source })
    }

    /// Graceful stop: `SendCtrlAltDel`, then wait for the process to exit,
    /// both within `timeout`; SIGKILL to its process group if the request
    /// was refused or the guest did not power off in time.
    pub async fn stop(
        &mut self,
        client: &FirecrackerClient,
        timeout: Duration,
    ) -> Result<StopReport, ProcessError> {
        let started = Instant::now();
        if let Some(exit_status) = self.try_wait()? {
            return Ok(StopReport {
                outcome: StopOutcome::AlreadyExited,
                exit_status,
                elapsed: started.elapsed(),
            });
        }
        // One budget for the request and the wait.
        let deadline = tokio::time::Instant::now() + timeout;
        let request = tokio::time::timeout_at(deadline, client.send_ctrl_alt_del()).await;
        let outcome = match request {
            Err(_) => StopOutcome::KilledAfterTimeout,
            Ok(Ok(())) => match tokio::time::timeout_at(deadline, self.wait()).await {
                Ok(exit_status) => {
                    return Ok(StopReport {
                        outcome: StopOutcome::Graceful,
                        exit_status: exit_status?,
                        elapsed: started.elapsed(),
                    });
                }
                Err(_) => StopOutcome::KilledAfterTimeout,
            },
            Ok(Err(e)) => StopOutcome::KilledAfterRefusal(error_chain(&e)),
        };
        // A VMM that exits while answering (or right at the deadline) did
        // stop gracefully.
        if let Some(exit_status) = self.try_wait()? {
            return Ok(StopReport {
                outcome: StopOutcome::Graceful,
                exit_status,
                elapsed: started.elapsed(),
            });
        }
        let exit_status = self.kill().await?;
        Ok(StopReport {
            outcome,
            exit_status,
            elapsed: started.elapsed(),
        })
    }

    /// SIGKILL to the whole process group, then reap the process.
    pub async fn kill(&mut self) -> Result<ExitStatus, ProcessError> {
        if let Some(status) = self.try_wait()? {
            // Still take down anything left in its group.
            let _ = self.signal_group(Signal::KILL);
            return Ok(status);
        }
        self.signal_group(Signal::KILL)?;
        self.wait().await
    }

    fn signal_group(&self, signal: Signal) -> Result<(), ProcessError> {
        signal_group(self.pid, signal)
    }
}

/// Signals the process group led by `pid` (spawn makes every child a group
/// leader). A group that is already gone is not an error.
fn signal_group(pid: u32, signal: Signal) -> Result<(), ProcessError> {
    let group = i32::try_from(pid)
        .ok()
        .and_then(Pid::from_raw)
        .expect("a child pid is a positive i32");
    match kill_process_group(group, signal) {
        Ok(()) | Err(rustix::io::Errno::SRCH) => Ok(()),
        Err(e) => Err(ProcessError::Signal {
            pid,
            source: e.into(),
        }),
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Everything `configure_and_start` sends, in the order it sends it.
#[derive(Debug, Clone)]
pub struct VmConfig {
    pub logger: Option<Logger>,
    pub metrics: Option<Metrics>,
    pub machine: MachineConfiguration,
    pub boot_source: BootSource,
    /// Root filesystem first, then e.g. the work disk.
    pub drives: Vec<Drive>,
    pub network_interfaces: Vec<NetworkInterface>,
    pub vsock: Option<Vsock>,
}

/// One step of [`configure_and_start`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stage {
    Logger,
    Metrics,
    MachineConfig,
    BootSource,
    Drive(String),
    NetworkInterface(String),
    Vsock,
    InstanceStart,
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Logger => f.write_str("logger"),
            Self::Metrics => f.write_str("metrics"),
            Self::MachineConfig => f.write_str("machine-config"),
            Self::BootSource => f.write_str("boot-source"),
            Self::Drive(id) => write!(f, "drive {id}"),
            Self::NetworkInterface(id) => write!(f, "network-interface {id}"),
            Self::Vsock => f.write_str("vsock"),
            Self::InstanceStart => f.write_str("InstanceStart"),
        }
    }
}

/// How long one stage took.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageTiming {
    pub stage: Stage,
    pub elapsed: Duration,
}

/// The stages of a successful [`configure_and_start`].
#[derive(Debug, Clone)]
pub struct StartReport {
    pub stages: Vec<StageTiming>,
    pub total: Duration,
}

/// A stage of [`configure_and_start`] failed; `completed` holds the stages
/// that succeeded before it.
#[derive(Debug, thiserror::Error)]
#[error("configuring Firecracker failed at {stage}")]
pub struct ConfigureError {
    pub stage: Stage,
    pub completed: Vec<StageTiming>,
    #[source]
    pub source: ApiError,
}

/// Sends logger, metrics, machine-config, boot-source, drives, network
/// interfaces and vsock, then `InstanceStart`, timing each step.
pub async fn configure_and_start(
    client: &FirecrackerClient,
    config: &VmConfig,
) -> Result<StartReport, ConfigureError> {
    let started = Instant::now();
    let mut stages = Vec::new();

    async fn step(
        stages: &mut Vec<StageTiming>,
        stage: Stage,
        call: impl std::future::Future<Output = Result<(), ApiError>>,
    ) -> Result<(), ConfigureError> {
        let t = Instant::now();
        match call.await {
            Ok(()) => {
                stages.push(StageTiming {
                    stage,
                    elapsed: t.elapsed(),
                });
                Ok(())
            }
            Err(source) => Err(ConfigureError {
                stage,
                completed: std::mem::take(stages),
                source,
            }),
        }
    }

    if let Some(logger) = &config.logger {
        step(&mut stages, Stage::Logger, client.put_logger(logger)).await?;
    }
    if let Some(metrics) = &config.metrics {
        step(&mut stages, Stage::Metrics, client.put_metrics(metrics)).await?;
    }
    step(
        &mut stages,
        Stage::MachineConfig,
        client.put_machine_config(&config.machine),
    )
    .await?;
    step(
        &mut stages,
        Stage::BootSource,
        client.put_boot_source(&config.boot_source),
    )
    .await?;
    for drive in &config.drives {
        step(
            &mut stages,
            Stage::Drive(drive.drive_id.clone()),
            client.put_drive(drive),
        )
        .await?;
    }
    for iface in &config.network_interfaces {
        step(
            &mut stages,
            Stage::NetworkInterface(iface.iface_id.clone()),
            client.put_network_interface(iface),
        )
        .await?;
    }
    if let Some(vsock) = &config.vsock {
        step(&mut stages, Stage::Vsock, client.put_vsock(vsock)).await?;
    }
    step(&mut stages, Stage::InstanceStart, client.instance_start()).await?;
    Ok(StartReport {
        stages,
        total: started.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_id_rule_matches_firecracker() {
        assert!(valid_instance_id("vm-01"));
        assert!(valid_instance_id(&"a".repeat(64)));
        assert!(!valid_instance_id(""));
        assert!(!valid_instance_id(&"a".repeat(65)));
        assert!(!valid_instance_id("vm_01"));
        assert!(!valid_instance_id("vm 01"));
    }

    #[test]
    fn log_tail_keeps_whole_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let mut text = String::new();
        for i in 0..500 {
            text.push_str(&format!("line {i}\n"));
        }
        std::fs::write(&path, &text).unwrap();
        let tail = log_tail(&path);
        assert!(tail.ends_with("line 499"));
        assert!(tail.len() <= 2048);
        assert!(tail.starts_with("line "), "{tail:?}");
        assert_eq!(log_tail(&dir.path().join("absent")), "");
    }

    #[tokio::test]
    async fn spawn_refuses_bad_ids_and_long_paths() {
        let err = spawn(&SpawnConfig::new(
            "/bin/true",
            "/tmp/a.sock",
            "bad_id",
            "/tmp/l",
        ))
        .await
        .unwrap_err();
        assert!(matches!(err, ProcessError::InvalidId(_)), "{err}");
        let long = format!("/tmp/{}.sock", "x".repeat(120));
        let err = spawn(&SpawnConfig::new("/bin/true", long, "vm", "/tmp/l"))
            .await
            .unwrap_err();
        assert!(matches!(err, ProcessError::SocketPathTooLong(_)), "{err}");
    }

    #[tokio::test]
    async fn early_exit_reports_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("fc.log");
        let script = dir.path().join("fails");
        std::fs::write(&script, "#!/bin/sh\necho \"refusing: $*\" >&2\nexit 3\n").unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let cfg = SpawnConfig::new(&script, dir.path().join("api.sock"), "vm", &log);
        let err = spawn(&cfg).await.unwrap_err();
        match &err {
            ProcessError::ExitedEarly {
                log_tail, status, ..
            } => {
                assert_eq!(status.code(), Some(3));
                assert!(log_tail.contains("refusing: --api-sock"), "{log_tail}");
                assert!(log_tail.contains("--id vm"), "{log_tail}");
            }
            other => panic!("unexpected {other}"),
        }
        assert!(err.to_string().contains(&log.display().to_string()));
    }
}
