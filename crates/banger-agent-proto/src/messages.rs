//! JSON control messages carried inside frames.
//!
//! Requests are decoded with `deny_unknown_fields` (an agent refuses what it
//! does not understand); results are decoded leniently so a host can read an
//! agent that reports more than it knows about.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// Version of the frame format and message set. Both ends must agree.
pub const PROTOCOL_VERSION: u32 = 1;

/// First frame from the host (`FrameKind::Hello`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub protocol_version: u32,
    /// Random per-connection value the agent echoes, so the host can tell
    /// its own acknowledgement from leftovers of an earlier connection.
    pub nonce: String,
}

/// The agent's answer to [`Hello`] (`FrameKind::HelloAck`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloAck {
    pub protocol_version: u32,
    /// The nonce of the hello being answered.
    pub nonce: String,
    pub agent_version: String,
    pub boot_id: String,
    pub mode: AgentMode,
}

/// How the agent was started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentMode {
    /// PID 1 of the guest (`--init`).
    Init,
    /// A service under another init (systemd) or a plain host process.
    Service,
}

/// A call from the host (`FrameKind::Request`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "method", content = "params", rename_all = "snake_case")]
pub enum Request {
    /// Returns [`Health`].
    Health,
    /// Starts a process; returns [`ExecStarted`], then streams data frames
    /// and one `Exit` frame on the same stream.
    Exec(ExecRequest),
    /// Returns [`PortsResult`].
    Ports,
    /// Returns [`Stats`].
    Stats,
    /// Returns [`AuthorizeKeysResult`].
    AuthorizeKeys(AuthorizeKeysRequest),
    /// Returns [`ShutdownResult`], then powers the guest off.
    Shutdown,
    /// Returns [`IdentityResult`] once the guest has the identity (a
    /// restored guest: the one its snapshot had until then). Agents from
    /// before it answer `UnknownMethod`.
    Identity(IdentityRequest),
}

impl Request {
    /// Wire name of the method.
    pub fn method(&self) -> &'static str {
        match self {
            Self::Health => "health",
            Self::Exec(_) => "exec",
            Self::Ports => "ports",
            Self::Stats => "stats",
            Self::AuthorizeKeys(_) => "authorize_keys",
            Self::Shutdown => "shutdown",
            Self::Identity(_) => "identity",
        }
    }
}

/// Answer to a [`Request`] (`FrameKind::Response`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Response {
    Ok(serde_json::Value),
    Error(RemoteError),
}

/// An error reported by the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteError {
    pub code: RemoteErrorCode,
    pub message: String,
}

impl RemoteError {
    pub fn new(code: RemoteErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

impl fmt::Display for RemoteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({:?})", self.message, self.code)
    }
}

impl std::error::Error for RemoteError {}

/// Class of a [`RemoteError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RemoteErrorCode {
    /// The request was malformed or its parameters invalid.
    BadRequest,
    /// The agent does not know the method.
    UnknownMethod,
    /// The program to execute was not found.
    NotFound,
    /// The program is there but cannot be run: not executable, a missing
    /// `#!` interpreter, or not a format the kernel runs.
    NotExecutable,
    /// Starting the process failed.
    SpawnFailed,
    /// A file or system call failed.
    Io,
    /// Something else went wrong inside the agent.
    Internal,
    /// A code this host does not know (a newer agent).
    #[serde(other)]
    Other,
}

/// Parameters of `exec`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    /// Program and arguments; `argv[0]` is looked up in `PATH`.
    pub argv: Vec<String>,
    /// Variables set on top of the agent's base environment.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Working directory (default: the agent's, `/` under `--init`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// Give the process a stdin pipe the host feeds and must close.
    /// Without it stdin is `/dev/null`.
    #[serde(default)]
    pub stdin: bool,
    /// Run the process on a new pseudo-terminal of this size, as its
    /// controlling terminal in a session of its own: stdin and output go
    /// through the terminal (all output comes as stdout), `Resize` frames
    /// change its size. Implies stdin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tty: Option<TtySize>,
}

/// A terminal's size in characters (payload of a `Resize` frame too).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TtySize {
    pub cols: u16,
    pub rows: u16,
}

impl ExecRequest {
    pub fn new<I, S>(argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            argv: argv.into_iter().map(Into::into).collect(),
            ..Self::default()
        }
    }

    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.insert(key.into(), value.into());
        self
    }

    pub fn cwd(mut self, cwd: impl Into<String>) -> Self {
        self.cwd = Some(cwd.into());
        self
    }

    pub fn with_stdin(mut self) -> Self {
        self.stdin = true;
        self
    }
}

/// Result of `exec`: the process is running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecStarted {
    pub pid: u32,
}

/// Payload of a `Signal` frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignalRequest {
    /// Linux signal number, delivered to the process group of the exec.
    pub signal: i32,
}

/// How a process ended (payload of an `Exit` frame).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExitStatus {
    /// Exited with this code.
    Code(i32),
    /// Killed by this signal.
    Signal(i32),
}

impl ExitStatus {
    pub fn success(self) -> bool {
        self == Self::Code(0)
    }

    pub fn code(self) -> Option<i32> {
        match self {
            Self::Code(c) => Some(c),
            Self::Signal(_) => None,
        }
    }

    pub fn signal(self) -> Option<i32> {
        match self {
            Self::Signal(s) => Some(s),
            Self::Code(_) => None,
        }
    }

    /// The shell convention: the code, or 128 + the signal.
    pub fn shell_code(self) -> i32 {
        match self {
            Self::Code(c) => c,
            Self::Signal(s) => 128 + s,
        }
    }
}

impl fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Code(c) => write!(f, "exit code {c}"),
            Self::Signal(s) => write!(f, "killed by signal {s}"),
        }
    }
}

/// Result of `health`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Health {
    pub agent_version: String,
    pub protocol_version: u32,
    /// `/proc/sys/kernel/random/boot_id`: changes on every boot.
    pub boot_id: String,
    pub uptime_secs: f64,
    pub mode: AgentMode,
    /// Kernel release (`uname -r`).
    pub kernel: String,
    pub hostname: String,
}

/// Result of `ports`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortsResult {
    pub sockets: Vec<ListeningSocket>,
}

/// Transport of a [`ListeningSocket`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SocketProtocol {
    Tcp,
    Udp,
}

/// A TCP socket in LISTEN state or an unconnected bound UDP socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListeningSocket {
    pub protocol: SocketProtocol,
    pub address: IpAddr,
    pub port: u16,
    pub uid: u32,
    pub inode: u64,
    /// A process holding the socket, when one could be found.
    pub process: Option<SocketProcess>,
}

/// A process that owns a socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SocketProcess {
    pub pid: u32,
    /// `/proc/<pid>/comm`.
    pub name: String,
}

/// Result of `stats`.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    pub uptime_secs: f64,
    pub load: LoadAverage,
    pub cpu: CpuTimes,
    pub memory: MemoryStats,
    /// The root filesystem.
    pub disk: DiskStats,
    /// The work disk on `/root`, when it is mounted there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub work: Option<DiskStats>,
}

/// `/proc/loadavg`.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LoadAverage {
    pub one: f64,
    pub five: f64,
    pub fifteen: f64,
    pub runnable: u32,
    pub processes: u32,
}

/// Cumulative CPU time of all CPUs since boot (`/proc/stat`), in clock
/// ticks; diff two samples for utilisation.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuTimes {
    pub cpus: u32,
    pub ticks_per_sec: u64,
    pub user: u64,
    pub nice: u64,
    pub system: u64,
    pub idle: u64,
    pub iowait: u64,
    pub irq: u64,
    pub softirq: u64,
    pub steal: u64,
}

impl CpuTimes {
    pub fn total(&self) -> u64 {
        self.user
            + self.nice
            + self.system
            + self.idle
            + self.iowait
            + self.irq
            + self.softirq
            + self.steal
    }

    pub fn busy(&self) -> u64 {
        self.total() - self.idle - self.iowait
    }
}

/// `/proc/meminfo`, in bytes.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryStats {
    pub total_bytes: u64,
    pub free_bytes: u64,
    pub available_bytes: u64,
    pub buffers_bytes: u64,
    pub cached_bytes: u64,
    pub swap_total_bytes: u64,
    pub swap_free_bytes: u64,
}

/// `statvfs` of a mount point, in bytes.
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskStats {
    pub path: String,
    pub total_bytes: u64,
    pub free_bytes: u64,
    /// Free for unprivileged users.
    pub available_bytes: u64,
    pub total_inodes: u64,
    pub free_inodes: u64,
}

/// Parameters of `authorize_keys`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthorizeKeysRequest {
    /// OpenSSH public key lines. They replace banger's managed block in
    /// root's `authorized_keys`; lines outside the block are kept. An empty
    /// list removes the block.
    pub keys: Vec<String>,
}

/// Parameters of `identity`: what a restored guest becomes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityRequest {
    /// The first non-loopback interface's new MAC address.
    pub mac: String,
    /// Its address, `ADDRESS/PREFIX`: the only one it keeps.
    pub address: String,
    /// The default route's gateway.
    pub gateway: String,
    pub hostname: String,
    /// The host's clock, seconds since the epoch: the guest's is stepped
    /// to it.
    pub clock: u64,
    /// `/etc/machine-id` (and D-Bus's copy where it is a file of its own).
    pub machine_id: String,
    /// Host entropy mixed into the kernel's input pool, which the
    /// generator then reseeds from.
    pub entropy: Vec<u8>,
    /// New sshd host keys; `None` keeps the guest's.
    pub host_keys: Option<HostKeys>,
    /// `/etc/resolv.conf`'s nameservers; empty leaves the file alone.
    pub nameservers: Vec<String>,
}

/// sshd host keys made by the host (OpenSSH's files: the private key, the
/// public key line). Each replaces the guest's key of its type where the
/// guest has one; any other type the guest has is made anew by its
/// `ssh-keygen`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostKeys {
    pub ed25519: (String, String),
    pub ecdsa: (String, String),
}

/// Result of `identity`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityResult {
    /// What the guest could not do that does not fail the change (the
    /// generator's reseed), for the host's log.
    pub warnings: Vec<String>,
}

/// Result of `authorize_keys`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthorizeKeysResult {
    pub path: String,
    /// Keys now in the managed block.
    pub keys: usize,
}

/// Result of `shutdown`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShutdownResult {}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn request_wire_shape() {
        let r = Request::Exec(ExecRequest::new(["sh", "-c", "true"]).env("A", "1"));
        assert_eq!(
            serde_json::to_value(&r).unwrap(),
            json!({"method": "exec", "params": {"argv": ["sh", "-c", "true"], "env": {"A": "1"}, "stdin": false}})
        );
        assert_eq!(
            serde_json::to_value(Request::Health).unwrap(),
            json!({"method": "health"})
        );
        let back: Request = serde_json::from_value(json!({"method": "stats"})).unwrap();
        assert_eq!(back, Request::Stats);
    }

    #[test]
    fn request_rejects_unknown_fields() {
        let bad = json!({"method": "exec", "params": {"argv": ["x"], "pty": true}});
        assert!(serde_json::from_value::<Request>(bad).is_err());
        // `tty` is a size, not a flag.
        let bad = json!({"method": "exec", "params": {"argv": ["x"], "tty": true}});
        assert!(serde_json::from_value::<Request>(bad).is_err());
        let tty =
            json!({"method": "exec", "params": {"argv": ["x"], "tty": {"cols": 80, "rows": 24}}});
        let Request::Exec(req) = serde_json::from_value::<Request>(tty).unwrap() else {
            panic!("an exec")
        };
        assert_eq!(req.tty, Some(TtySize { cols: 80, rows: 24 }));
    }

    #[test]
    fn exit_status_shape() {
        assert_eq!(
            serde_json::to_value(ExitStatus::Code(7)).unwrap(),
            json!({"code": 7})
        );
        assert_eq!(
            serde_json::from_value::<ExitStatus>(json!({"signal": 9})).unwrap(),
            ExitStatus::Signal(9)
        );
        assert_eq!(ExitStatus::Signal(15).shell_code(), 143);
        assert!(ExitStatus::Code(0).success());
    }

    #[test]
    fn response_shape_and_unknown_error_code() {
        let r: Response =
            serde_json::from_value(json!({"error": {"code": "brand_new", "message": "m"}}))
                .unwrap();
        assert_eq!(
            r,
            Response::Error(RemoteError::new(RemoteErrorCode::Other, "m"))
        );
        let ok = serde_json::to_value(Response::Ok(json!({"pid": 3}))).unwrap();
        assert_eq!(ok, json!({"ok": {"pid": 3}}));
    }
}
