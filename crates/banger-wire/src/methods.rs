//! Methods served by `bangerd` to the CLI and the web UI.
//!
//! Each method is a unit type implementing [`crate::Method`]; its params and
//! result types live next to it. Later services (VMs, images, network,
//! workspaces) add their methods here, one module section per service.

use serde::{Deserialize, Serialize};

use crate::{Empty, NoParams};
use crate::{InitMode, Vmm};

method!(
    /// `daemon.status`: who is serving and since when.
    DaemonStatus, "daemon.status", NoParams, DaemonStatusResult
);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct DaemonStatusResult {
    pub pid: u32,
    pub socket: String,
    pub version: String,
    pub protocol: u32,
    pub uptime_s: u64,
    pub state_dir: String,
    pub log_file: String,
    /// This install's names among the host's (two installs never share).
    pub host_names: HostNames,
    /// The web UI's address (`http://IP:PORT`) while the daemon serves it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub web_url: Option<String>,
    /// Why the web UI is not served although `[web] enabled` (the port
    /// is taken, and by whom).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub web_error: Option<String>,
}

/// What this install is called where names are global to the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HostNames {
    /// The hash of the state directory the defaults below carry.
    pub install_id: String,
    /// The guests' bridge (`[network] bridge`, else `banger-<install_id>`).
    pub bridge: String,
    /// banger's nftables table (family `inet`): `banger-<install_id>`.
    pub nft_table: String,
    /// Where this install's vsock CIDs start.
    pub first_cid: u32,
}

method!(
    /// `daemon.stop`: shut down cleanly after answering.
    DaemonStop, "daemon.stop", NoParams, Empty
);

method!(
    /// `web.login`: a one-time login URL for the web UI (single use, valid
    /// for five minutes).
    WebLogin, "web.login", NoParams, WebLoginResult
);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WebLoginResult {
    /// `http://IP:PORT/login?token=T`.
    pub url: String,
}

method!(
    /// `host.doctor`: what this host has and lacks for running VMs, each
    /// with a fix (`banger doctor`, the web UI's doctor page).
    HostDoctor, "host.doctor", NoParams, DoctorReport
);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DoctorReport {
    pub checks: Vec<DoctorCheck>,
    /// How many checks failed, and warned.
    pub failed: usize,
    pub warned: usize,
}

/// One line of the doctor report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DoctorCheck {
    /// Stable machine-readable id, e.g. `"kvm"`.
    pub id: String,
    pub title: String,
    pub status: CheckLevel,
    /// What was found.
    pub detail: String,
    /// One concrete line (a package to install or a command to run).
    pub fix: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum CheckLevel {
    Pass,
    Warn,
    Fail,
}

method!(
    /// `helper.ping`: the daemon forwards a ping (with the caller's op id) to
    /// `banger-helper`, starting the helper first when it is the daemon's job to.
    HelperPing, "helper.ping", NoParams, crate::helper::PingResult
);

// ---------------------------------------------------------------------------
// Operations: long work (create, image build) runs in the daemon as an
// operation named by its op id; its stages stream to the caller as events
// and can be read back with `op.status`.

/// One step of a long operation, sent as an `event` frame.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct StageEvent {
    pub stage: String,
    pub status: StageStatus,
    /// Milliseconds the stage took (on `done` / `failed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub elapsed_ms: Option<u64>,
    /// A progress line or note.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// The VM this stage is of, where one operation works on several at
    /// once (`vm.fork` with a count: each restore's stages name their fork).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum StageStatus {
    Started,
    Progress,
    Done,
    Failed,
}

method!(
    /// `op.status`: the stages an operation went through so far.
    OpStatus, "op.status", OpStatusParams, OpStatusResult
);

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OpStatusParams {
    pub op_id: crate::OpId,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct OpStatusResult {
    pub op_id: crate::OpId,
    pub kind: String,
    pub subject: String,
    pub stages: Vec<StageEvent>,
    pub done: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

// ---------------------------------------------------------------------------
// VMs

/// A VM as the CLI and web UI see it: its durable record plus what is true now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct VmInfo {
    pub id: String,
    pub name: String,
    pub state: String,
    pub image: String,
    pub vmm: Vmm,
    pub init: InitMode,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub disk_mib: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_ip: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// Firecracker's vsock context id (QEMU VMs use virtio-serial).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_cid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns_name: Option<String>,
    /// VMM pid while running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tap: Option<String>,
    /// Network policy (`none`, `nat`, `learn`, `allow=LIST`).
    pub net: String,
    pub vm_dir: String,
    pub console_log: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    pub created_at_ms: i64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub port_forwards: Vec<PortForwardInfo>,
    /// The work disk's filesystem (`/root`) as the guest sees it: only in
    /// `vm.show` of a running VM whose agent answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub work_disk: Option<DiskStats>,
    /// The secrets the VM may use: names, hosts and the VM's placeholders
    /// (never values).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<VmSecretInfo>,
}

method!(
    /// `op.follow`: stream an operation's [`StageEvent`]s, those so far
    /// first, until it ends; then answer its status.
    OpFollow, "op.follow", OpStatusParams, OpStatusResult
);

method!(
    /// `op.cancel`: stop a running operation that can stop cleanly at any
    /// point (workspace prepare and export); others are refused.
    OpCancel, "op.cancel", OpStatusParams, OpCancelResult
);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct OpCancelResult {
    /// `false` when the operation had already ended.
    pub cancelled: bool,
}

method!(
    /// `vm.create`: make and boot a VM. Streams [`StageEvent`]s, one per
    /// step of [`CREATE_STEPS`], then `services ready` for an image that
    /// declares readiness checks.
    VmCreate, "vm.create", VmCreateParams, VmInfo
);

/// The steps of creating (and starting, from `disks` on) a VM, in order:
/// the stage names `vm.create` and `vm.start` stream, and the steps the
/// daemon's fault seam (`BANGER_FAULT_INJECT`) takes.
pub const CREATE_STEPS: [&str; 9] = [
    "image",
    "allocate",
    "disks",
    "network",
    "vmm start",
    // The tap's guard is made while the VMM starts: this is the wait for
    // what of it the start did not hide.
    "tap guard",
    "kernel boot",
    "agent ready",
    "ssh ready",
];

/// The stages `image.pull` and `image.import` stream, in order (an import
/// has no `resolve` or `download`).
pub const PULL_STAGES: [&str; 8] = [
    "resolve",
    "download",
    "unpack",
    "prepare",
    "rootfs-ext4",
    "work-seed",
    "kernel",
    "manifest",
];

#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VmCreateParams {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Image name; the default image when absent (built on first use).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpus: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u32>,
    /// Work disk size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_mib: Option<u32>,
    /// `fast` (agent as PID 1) or `systemd`; the image's default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<InitMode>,
    /// `qemu` or `firecracker`; the daemon's choice for this host when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vmm: Option<Vmm>,
    /// Report the VM ready once its `agent` answers, or once its `ssh`
    /// server does too (the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait: Option<String>,
    /// Host → guest TCP forwards, recorded with the VM.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortForwardSpec>,
    /// Network policy: `none`, `nat`, `learn` or `allow=LIST` (CIDRs, domains,
    /// `:PORT`s, each with an optional `:PORT`); `[network]
    /// default_policy` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net: Option<String>,
    /// Tie the VM to a session held open with `session.hold`: the VM is
    /// deleted when that session's connection closes. Refused when no such
    /// session is held.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    /// Restore this snapshot (name or id) instead of booting: the VM is a
    /// copy of the snapshot's guest, running, with its own name, addresses
    /// and disks. Image, VMM, sizes and init come from the snapshot and may
    /// not be given with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_snapshot: Option<String>,
    /// With `from_snapshot`: keep the snapshot's sshd host keys instead of
    /// giving the restored guest new ones.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub keep_host_keys: bool,
    /// Secrets the VM may use, each only towards its hosts: the guest gets a
    /// placeholder, the daemon's HTTPS proxy puts the value in.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<SecretGrant>,
}

/// Names of VMs to act on.
#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VmNames {
    pub names: Vec<String>,
    /// For delete: also delete running VMs (they are killed).
    #[serde(default)]
    pub force: bool,
    /// For start/restart: report ready once the agent answers, without waiting for sshd.
    #[serde(default)]
    pub no_ssh_wait: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VmName {
    pub name: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VmListParams {
    /// Also the warm pool's guests (labelled `banger.pool`).
    #[serde(default)]
    pub all: bool,
}

method!(/// `vm.list`: every VM (the warm pool's guests only with `all`).
    VmList, "vm.list", VmListParams, Vec<VmInfo>);
method!(/// `vm.show`: one VM.
    VmShow, "vm.show", VmName, VmInfo);
method!(/// `vm.start`: boot stopped VMs.
    VmStart, "vm.start", VmNames, Vec<VmInfo>);
method!(/// `vm.stop`: power VMs off (guest shutdown, then the VMM is stopped).
    VmStop, "vm.stop", VmNames, Vec<VmInfo>);
method!(/// `vm.pause`: stop VMs' vCPUs; memory stays, no CPU is used.
    VmPause, "vm.pause", VmNames, Vec<VmInfo>);
method!(/// `vm.resume`: run paused VMs' vCPUs again.
    VmResume, "vm.resume", VmNames, Vec<VmInfo>);
method!(/// `vm.restart`: stop then start.
    VmRestart, "vm.restart", VmNames, Vec<VmInfo>);
method!(/// `vm.delete`: remove VMs and everything they own; returns the names deleted.
    VmDelete, "vm.delete", VmNames, Vec<String>);
#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VmSetParams {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpus: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u32>,
    /// New work disk size; disks only grow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_mib: Option<u32>,
}

method!(/// `vm.set`: change a stopped VM's vCPUs, memory or work disk size.
    VmSet, "vm.set", VmSetParams, VmInfo);
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VmNetSetParams {
    pub name: String,
    /// `none`, `nat`, `learn` or `allow=LIST`.
    pub policy: String,
}

/// A VM's network policy, in canonical form.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct VmNetInfo {
    pub name: String,
    pub policy: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VmNetLogParams {
    pub name: String,
    /// Also the `allow=` list that would have let through exactly what was used.
    #[serde(default)]
    pub suggest: bool,
}

/// What a running VM's network did since its policy was last applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct VmNetLog {
    pub name: String,
    pub policy: String,
    /// Packets its guard and policy dropped (spoofed, or not allowed).
    pub denied_packets: u64,
    /// Under `learn`: each new TCP/UDP destination, with the names banger's
    /// DNS answered it for.
    pub destinations: Vec<VmNetDest>,
    /// Under every policy: each TCP/UDP destination a packet was denied
    /// to, with how many packets.
    #[serde(default)]
    pub denied: Vec<VmNetDenied>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suggestion: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct VmNetDest {
    pub addr: String,
    pub proto: String,
    pub port: u16,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub names: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct VmNetDenied {
    #[serde(flatten)]
    pub dest: VmNetDest,
    pub packets: u64,
}

method!(/// `vm.net.log`: a running VM's denied packets and, under `learn`, its destinations.
    VmNetLogMethod, "vm.net.log", VmNetLogParams, VmNetLog);
method!(/// `vm.net.show`: a VM's network policy.
    VmNetShow, "vm.net.show", VmName, VmNetInfo);
method!(/// `vm.net.set`: change a VM's network policy; a running VM's tap rules change at once.
    VmNetSet, "vm.net.set", VmNetSetParams, VmNetInfo);
method!(/// `vm.authsync`: authorize banger's and the user's SSH keys in the guest again; returns how many.
    VmAuthsync, "vm.authsync", VmName, usize);
method!(/// `vm.ports`: listening sockets inside the guest (the agent's `ports`).
    VmPorts, "vm.ports", VmName, serde_json::Value);
method!(/// `vm.stats`: cpu, memory, disk inside the guest (the agent's `stats`, one
    /// sample: cumulative CPU ticks, diffed between two samples for utilisation).
    VmStats, "vm.stats", VmName, GuestStats);

/// One sample of a guest's figures, as its agent reports them.
pub use banger_agent_proto::{DiskStats, Stats as GuestStats};

method!(
    /// `vm.exec`: run a command in the guest. Streams [`ExecEvent`]s; the
    /// first is `started` with the session id that `vm.exec_input` and
    /// `vm.exec_signal` (on another connection) address.
    VmExec, "vm.exec", VmExecParams, ExecExit
);

#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VmExecParams {
    pub name: String,
    pub argv: Vec<String>,
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub env: std::collections::BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// Forward stdin (sent with `vm.exec_input`); else the command reads /dev/null.
    #[serde(default)]
    pub stdin: bool,
    /// Run the command on a pseudo-terminal in the guest (its controlling
    /// terminal, in a session of its own), `cols` x `rows` (default 80 x 24;
    /// `vm.exec_resize` changes it): stdin is forwarded, and all output
    /// comes as stdout.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tty: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cols: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ExecEvent {
    Started {
        session: String,
    },
    /// Base64 of a chunk of the command's stdout.
    Stdout(String),
    Stderr(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ExecExit {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
}

impl ExecExit {
    /// The shell convention: the code, or 128 + signal.
    pub fn shell_code(self) -> i32 {
        self.code.unwrap_or_else(|| 128 + self.signal.unwrap_or(0))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecInputParams {
    pub session: String,
    /// Base64 bytes to write to the command's stdin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
    /// Close stdin after `data`.
    #[serde(default)]
    pub eof: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecSignalParams {
    pub session: String,
    pub signal: i32,
}

method!(/// `vm.exec_input`: feed a running `vm.exec` session's stdin.
    VmExecInput, "vm.exec_input", ExecInputParams, Empty);
method!(/// `vm.exec_signal`: signal a running `vm.exec` session's process.
    VmExecSignal, "vm.exec_signal", ExecSignalParams, Empty);

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecResizeParams {
    pub session: String,
    pub cols: u16,
    pub rows: u16,
}

method!(/// `vm.exec_resize`: set the terminal size of a `vm.exec` session started with `tty`.
    VmExecResize, "vm.exec_resize", ExecResizeParams, Empty);

// ---------------------------------------------------------------------------
// Sessions: VMs that live only as long as a client's connection (`banger
// mcp --ephemeral`).

method!(
    /// `session.hold`: hold session `session` open for as long as this
    /// connection lasts. Sends one [`SessionEvent`] once the session is
    /// held, then never answers: when the connection closes (the client
    /// exited or was killed), every VM created with this session is deleted.
    SessionHold, "session.hold", SessionHoldParams, Empty
);

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SessionHoldParams {
    /// 1-64 characters: letters, digits, `-` and `_`.
    pub session: String,
}

/// The event `session.hold` sends once the session is held.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct SessionEvent {
    pub held: String,
}

// ---------------------------------------------------------------------------
// Snapshots

/// The stages `vm.snapshot` streams, in order.
pub const SNAPSHOT_STEPS: [&str; 4] = ["pause", "save state", "freeze disks", "resume"];

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VmSnapshotParams {
    /// The running VM to snapshot.
    pub vm: String,
    /// The snapshot's name; `<vm>-<random>` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

method!(/// `vm.snapshot`: save a running VM's memory, device state and disks; the
    /// VM pauses while its state is saved and runs on after. Streams
    /// [`StageEvent`]s ([`SNAPSHOT_STEPS`]).
    VmSnapshot, "vm.snapshot", VmSnapshotParams, SnapshotInfo);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct SnapshotInfo {
    pub id: String,
    pub name: String,
    /// `creating` while it is being taken, then `ready`.
    pub state: String,
    /// The VM it was taken of (which may since have been deleted).
    pub source_vm: String,
    pub image: String,
    pub vmm: Vmm,
    /// The VMM's version that took it; a restore needs the same.
    pub vmm_version: String,
    /// The accelerator its VM ran under (`kvm`, `tcg`), and under KVM the
    /// host CPU: a restore needs the same (empty: not recorded).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub accel: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cpu: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub disk_mib: u32,
    /// Where it keeps its guest's RAM: `file` (`memory.ram`, which restores
    /// map copy-on-write and so share), `stream` or `state` (inside the
    /// state file, which each restore reads whole).
    pub memory: String,
    /// Space its files take on disk (allocated blocks).
    pub disk_bytes: u64,
    pub dir: String,
    pub created_at_ms: i64,
    /// VMs restored from it that still exist (they keep it from deletion).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub used_by: Vec<String>,
    /// The secrets its VM had, which VMs restored from it keep (names).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SnapshotName {
    pub name: String,
}

method!(/// `snapshot.list`: every snapshot.
    SnapshotList, "snapshot.list", NoParams, Vec<SnapshotInfo>);
method!(/// `snapshot.show`: one snapshot.
    SnapshotShow, "snapshot.show", SnapshotName, SnapshotInfo);
method!(/// `snapshot.delete`: remove a snapshot and its files; refused while a VM
    /// restored from it exists.
    SnapshotDelete, "snapshot.delete", SnapshotName, Empty);

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VmForkParams {
    /// The running VM to fork.
    pub vm: String,
    /// How many forks (1 when absent, at most [`MAX_FORKS`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u32>,
    /// The forks are named `<name>-1` … `<name>-N`; `<vm>-fork` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Keep the VM's sshd host keys in the forks instead of new ones.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub keep_host_keys: bool,
    /// Report the forks ready once their `agent` answers, or once their
    /// `ssh` server does too (the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait: Option<String>,
}

/// The most forks one `vm.fork` makes.
pub const MAX_FORKS: u32 = 16;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct VmForkResult {
    /// The snapshot the forks were restored from (it stays, listed, until
    /// deleted once no fork uses it).
    pub snapshot: SnapshotInfo,
    pub vms: Vec<VmInfo>,
}

method!(/// `vm.fork`: snapshot a running VM (it pauses only while its state is
    /// saved) and restore that snapshot N times, concurrently, each restore
    /// with its own name and identity. A failure removes every fork and the
    /// snapshot. Streams [`StageEvent`]s ([`SNAPSHOT_STEPS`], then each
    /// restore's).
    VmFork, "vm.fork", VmForkParams, VmForkResult);

// ---------------------------------------------------------------------------
// Images

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ImageInfo {
    pub id: String,
    pub name: String,
    pub state: String,
    pub source: String,
    /// OCI images: the digest the reference named when pulled; imports: the
    /// tarball's digest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_digest: Option<String>,
    pub is_default: bool,
    pub default_init: InitMode,
    /// Apparent size of the image's files (sparse files at their full length).
    pub size_bytes: u64,
    /// Space the image's files take on disk: allocated blocks only.
    pub disk_bytes: u64,
    pub dir: String,
    pub created_at_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ImageName {
    pub name: String,
}

method!(/// `image.list`: every image.
    ImageList, "image.list", NoParams, Vec<ImageInfo>);
method!(/// `image.show`: one image.
    ImageShow, "image.show", ImageName, ImageInfo);
method!(/// `image.build`: build a built-in recipe (e.g. `debian-12`). Streams [`StageEvent`]s.
    ImageBuild, "image.build", ImageName, ImageInfo);
/// Existing files to register as an image, in place (banger never
/// modifies or deletes them).
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ImageRegisterParams {
    pub name: String,
    /// An ELF vmlinux (PVH): what both VMMs boot.
    pub vmlinux: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<String>,
    /// ext4 root filesystem, labelled `rootfs`.
    pub rootfs: String,
    /// ext4 seed of the work disk, labelled `work`.
    pub work_seed: String,
    /// `fast` or `systemd`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<InitMode>,
}

method!(/// `image.register`: record existing kernel/initrd/rootfs files as an image.
    ImageRegister, "image.register", ImageRegisterParams, ImageInfo);
method!(/// `image.delete`: refused while VMs use the image.
    ImageDelete, "image.delete", ImageName, Empty);
method!(/// `image.promote`: make an image the default.
    ImagePromote, "image.promote", ImageName, ImageInfo);

/// An OCI image to pull.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ImagePullParams {
    /// `[REGISTRY/]REPOSITORY[:TAG][@sha256:DIGEST]`; Docker Hub by default.
    pub reference: String,
    /// Image name; default: the normalised reference.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

method!(/// `image.pull`: pull an OCI image (linux/amd64) and build a banger image from it. Streams [`StageEvent`]s.
    ImagePull, "image.pull", ImagePullParams, ImageInfo);

/// A root filesystem to import: a tarball (plain, gzip, zstd) or a directory.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ImageImportParams {
    /// Absolute path on the daemon's host.
    pub path: String,
    pub name: String,
    /// TCP ports in the guest that must listen before a VM of the image
    /// counts as ready (the `services ready` stage of a create).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub wait_ports: Vec<u16>,
    /// How long a create waits for each of them (default 60 s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait_timeout_secs: Option<u32>,
}

method!(/// `image.import`: build a banger image from a root filesystem tarball or directory. Streams [`StageEvent`]s.
    ImageImport, "image.import", ImageImportParams, ImageInfo);

// ---------------------------------------------------------------------------
// Host: leak check and garbage collection

/// A banger-owned resource that no live VM explains.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Leak {
    /// `vm_dir`, `vm_row`, `handles`, `vmm_process`, `tap`, `dm` (a root
    /// disk snapshot), `loop` (a loop device under no snapshot),
    /// `snapshot_dir` (files of no VM snapshot) or `snapshot_row` (a VM
    /// snapshot left half-taken).
    pub kind: String,
    pub name: String,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GcParams {
    /// Only list what would be removed.
    #[serde(default)]
    pub dry_run: bool,
}

method!(/// `host.gc`: find (and unless `dry_run`, remove) leaked resources; returns them.
    HostGc, "host.gc", GcParams, Vec<Leak>);

// ---------------------------------------------------------------------------
// Network: `<name>.<suffix>` DNS and host → guest port forwards

/// A host → guest TCP forward to set up: `bind:host_port` on the host (bind
/// defaults to 127.0.0.1) to `guest_ip:guest_port`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PortForwardSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bind: Option<String>,
    pub host_port: u16,
    pub guest_port: u16,
}

/// A recorded forward and whether it carries traffic now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct PortForwardInfo {
    pub vm: String,
    pub proto: String,
    pub bind: String,
    pub host_port: u16,
    pub guest_port: u16,
    /// `active` (listening), `inactive` (the VM is not running) or `error`.
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PortForwardAddParams {
    pub name: String,
    pub forwards: Vec<PortForwardSpec>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PortForwardListParams {
    /// Only this VM's forwards; every VM's when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PortForwardRemoveParams {
    pub name: String,
    /// 127.0.0.1 when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bind: Option<String>,
    pub host_port: u16,
}

method!(/// `vm.port_forward.add`: record forwards (durable) and start them if the VM runs.
    VmPortForwardAdd, "vm.port_forward.add", PortForwardAddParams, Vec<PortForwardInfo>);
method!(/// `vm.port_forward.list`: recorded forwards and their state.
    VmPortForwardList, "vm.port_forward.list", PortForwardListParams, Vec<PortForwardInfo>);
method!(/// `vm.port_forward.remove`: stop and forget one forward.
    VmPortForwardRemove, "vm.port_forward.remove", PortForwardRemoveParams, Empty);

/// The daemon's DNS server for VM names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct DnsStatus {
    /// The names it answers: `<vm>.<suffix>`.
    pub suffix: String,
    /// `serving`, `not_started` (the bridge is set up with the first VM) or `failed`.
    pub state: String,
    /// Where it listens (UDP and TCP) when serving.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// Why it is not serving, with the fix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Where other names are forwarded (from the daemon's /etc/resolv.conf).
    pub upstreams: Vec<String>,
    /// How many VM names it knows.
    pub names: usize,
}

method!(/// `network.dns_status`: whether the VM-name DNS server runs, and where.
    NetworkDnsStatus, "network.dns_status", NoParams, DnsStatus);

// ---------------------------------------------------------------------------
// Workspaces: a host git checkout copied into a running guest, and the
// guest's changes brought back as a patch, a branch or applied edits.

method!(
    /// `workspace.prepare`: copy the working tree at `path` (as it is:
    /// uncommitted edits, untracked files, the `.git` history) into the
    /// guest at `dest`, replacing what was there only once all of it
    /// arrived. Streams [`StageEvent`]s with progress.
    WorkspacePrepare, "workspace.prepare", WorkspacePrepareParams, WorkspaceInfo
);

#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WorkspacePrepareParams {
    pub vm: String,
    /// A directory inside the host repository (absolute).
    pub path: String,
    /// Where in the guest (absolute); default `/root/<repository name>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dest: Option<String>,
    /// Also copy files `.gitignore` excludes.
    #[serde(default)]
    pub include_ignored: bool,
    /// Only the last N commits of history (a shallow repository in the
    /// guest); default: all of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub depth: Option<u32>,
}

/// A prepared workspace.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct WorkspaceInfo {
    pub vm: String,
    /// The directory in the guest.
    pub dest: String,
    /// The host repository's top level it came from.
    pub host_path: String,
    /// The host's HEAD when prepared.
    pub base_commit: String,
    /// A commit of the host's working tree when prepared (its uncommitted
    /// edits and untracked files on top of `base_commit`); equal to
    /// `base_commit` when the tree was clean.
    pub prepared_commit: String,
    /// Working-tree files and bytes sent (the `.git` directory apart).
    pub files: u64,
    pub bytes: u64,
    /// Bytes of the `.git` directory sent.
    pub git_bytes: u64,
}

/// What `workspace.export` produces.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum ExportTarget {
    /// A `git apply`-able binary diff from the base commit, written to this
    /// host file (absolute).
    Patch { file: String },
    /// The guest's commits (and, unless `committed_only`, its uncommitted
    /// rest as one more commit) fetched into the host repository as this
    /// branch, never touching the host's working tree or current branch.
    Branch {
        name: String,
        #[serde(default)]
        committed_only: bool,
        /// Replace an existing branch of that name.
        #[serde(default)]
        force: bool,
    },
    /// The guest's changes since prepare applied to the host's working
    /// tree; refused, naming the files, where the host changed them too.
    Apply,
}

method!(
    /// `workspace.export`: the guest's changes, as [`ExportTarget`] says.
    WorkspaceExport, "workspace.export", WorkspaceExportParams, WorkspaceExportResult
);

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WorkspaceExportParams {
    pub vm: String,
    /// The workspace in the guest; default: the VM's only one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dest: Option<String>,
    /// The host repository (absolute); default: the one it was prepared from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    pub target: ExportTarget,
    /// The caller's umask, for the files written into its repository
    /// (default 022).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub umask: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct WorkspaceExportResult {
    pub dest: String,
    pub host_path: String,
    /// `branch`: the branch's new commit (the guest's HEAD, or a commit
    /// of its uncommitted changes on top). `patch` and `apply`: the
    /// guest's HEAD (they also carry the working tree's uncommitted
    /// changes).
    pub tip: String,
    /// Files that differ between what was exported from and `tip`.
    pub files_changed: u64,
    /// `patch`: the patch's bytes; `branch` and `apply`: the bytes the
    /// guest sent (its changed files and commits, or a bundle or patch
    /// it made).
    pub bytes: u64,
    /// `patch`: the file written; `branch`: the branch; `apply`: the repository.
    pub written: String,
}

method!(
    /// `workspace.status`: a workspace's base, and what changed in the
    /// guest since it was prepared.
    WorkspaceStatus, "workspace.status", WorkspaceStatusParams, WorkspaceStatusResult
);

#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WorkspaceStatusParams {
    pub vm: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dest: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct WorkspaceStatusResult {
    pub dest: String,
    pub host_path: String,
    pub base_commit: String,
    pub prepared_commit: String,
    /// The guest's HEAD now.
    pub head_commit: String,
    /// Commits made in the guest since the base.
    pub commits: u64,
    /// Paths changed since prepare (committed or not), `git status`-style:
    /// a status letter (A, M, D, T) and the path.
    pub changed: Vec<String>,
    /// Bytes the workspace directory holds in the guest.
    pub size_bytes: u64,
}

// ---------------------------------------------------------------------------
// Secrets: values the daemon keeps and puts into a VM's HTTPS requests to
// the hosts it was given for; the guest only ever holds a placeholder.

/// Why `name` is not a secret name, if it is not. A secret's name is also
/// the guest's environment variable: `[A-Z_][A-Z0-9_]{0,63}`.
pub fn secret_name_problem(name: &str) -> Option<String> {
    let b = name.as_bytes();
    let ok = (1..=64).contains(&b.len())
        && (b[0].is_ascii_uppercase() || b[0] == b'_')
        && b.iter()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == b'_');
    (!ok).then(|| {
        format!(
            "secret name {name:?} is invalid: use 1-64 of A-Z, 0-9 and _, not starting with a digit"
        )
    })
}

/// Why `host` is not a host a secret may go to, if it is not: a DNS name
/// (`api.example.com`) or a wildcard over one's subdomains (`*.example.org`),
/// lowercase.
pub fn secret_host_problem(host: &str) -> Option<String> {
    let name = host.strip_prefix("*.").unwrap_or(host);
    let label_ok = |l: &str| {
        (1..=63).contains(&l.len())
            && l.bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    let ok = name.len() <= 253 && name.contains('.') && name.split('.').all(label_ok);
    (!ok).then(|| {
        format!("host {host:?} is invalid: give a lowercase DNS name, or *.NAME for its subdomains")
    })
}

/// A secret and the hosts a VM may send it to (`--secret NAME@HOST[,HOST...]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SecretGrant {
    pub name: String,
    pub hosts: Vec<String>,
    /// Replace the placeholder in request bodies too (`--secret-in-body`),
    /// not only in headers.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub in_body: bool,
}

impl SecretGrant {
    /// Why this grant cannot be used, if it cannot.
    pub fn problem(&self) -> Option<String> {
        if self.hosts.is_empty() {
            return Some(format!("secret {:?} is given no host", self.name));
        }
        secret_name_problem(&self.name)
            .or_else(|| self.hosts.iter().find_map(|h| secret_host_problem(h)))
    }
}

impl std::str::FromStr for SecretGrant {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (name, hosts) = s
            .split_once('@')
            .ok_or_else(|| format!("{s:?}: give NAME@HOST[,HOST...]"))?;
        let grant = SecretGrant {
            name: name.to_owned(),
            hosts: hosts.split(',').map(str::to_owned).collect(),
            in_body: false,
        };
        match grant.problem() {
            Some(p) => Err(p),
            None => Ok(grant),
        }
    }
}

/// A VM's secret as `vm.show` tells it: never the value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct VmSecretInfo {
    pub name: String,
    pub hosts: Vec<String>,
    /// What the guest holds instead of the value.
    pub placeholder: String,
    /// Replaced in request bodies too, not only in headers.
    #[serde(default)]
    pub in_body: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SecretSetParams {
    pub name: String,
    /// The value; sent only over the daemon's own (0600) Unix socket.
    pub value: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SecretName {
    pub name: String,
}

/// A stored secret: never its value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct SecretInfo {
    pub name: String,
    /// When it was last set (unix milliseconds).
    pub created_at_ms: i64,
    /// The VMs that may use it.
    #[serde(default)]
    pub used_by: Vec<String>,
    /// Where its value is: `file` or `keyring`.
    pub store: String,
}

method!(/// `secret.set`: store (or replace) a secret's value.
    SecretSet, "secret.set", SecretSetParams, SecretInfo);
method!(/// `secret.list`: the stored secrets (names, never values).
    SecretList, "secret.list", NoParams, Vec<SecretInfo>);
method!(/// `secret.rm`: forget a secret; refused while a VM may use it.
    SecretRm, "secret.rm", SecretName, Empty);

#[cfg(test)]
mod secret_tests {
    use super::*;

    #[test]
    fn secret_names_and_grants() {
        for ok in ["TOKEN", "_X", "GITHUB_TOKEN_2", &"A".repeat(64)] {
            assert_eq!(secret_name_problem(ok), None, "{ok}");
        }
        for bad in ["", "token", "2X", "A-B", "A B", &"A".repeat(65), "TOKEN=1"] {
            assert!(secret_name_problem(bad).is_some(), "{bad}");
        }
        let g: SecretGrant = "TOKEN@api.test,*.example.org".parse().unwrap();
        assert_eq!(g.hosts, ["api.test", "*.example.org"]);
        for bad in [
            "TOKEN",
            "TOKEN@",
            "token@api.test",
            "TOKEN@api",
            "TOKEN@API.test",
            "TOKEN@a.*.test",
            "TOKEN@api.test,",
            "TOKEN@-a.test",
        ] {
            assert!(bad.parse::<SecretGrant>().is_err(), "{bad}");
        }
    }
}
