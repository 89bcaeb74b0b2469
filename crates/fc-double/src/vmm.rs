//! The emulated VMM: API request handling with Firecracker's pre/post-boot
//! rules, the hybrid vsock device, and the "guest" (a host process standing
//! in for the guest agent).

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::process::{Child, Command};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

use crate::spec::{BodyRule, Spec};

/// Firecracker refuses bodies larger than this (except MMDS data).
pub const MAX_BODY: usize = 51_200;

const NOT_AFTER_START: &str =
    "The requested operation is not supported after starting the microVM.";
const NOT_BEFORE_START: &str =
    "The requested operation is not supported before starting the microVM.";
const SERDE_PREFIX: &str = "An error occurred when deserializing the json body of a request";

/// Command-line choices that shape the emulated VMM.
#[derive(Debug, Clone)]
pub struct Options {
    pub id: String,
    pub api_sock: PathBuf,
    /// Shell command line of the guest agent; `{sock}` is replaced with the
    /// (shell-quoted) Unix socket path the agent must listen on.
    pub agent_cmd: Option<String>,
    /// Guest vsock port the agent serves.
    pub agent_port: u32,
    /// Answer `SendCtrlAltDel` but never power off (a guest without i8042).
    pub ignore_ctrl_alt_del: bool,
}

/// An answer to one API request.
#[derive(Debug, PartialEq)]
pub struct Reply {
    pub status: u16,
    pub body: Option<Value>,
}

impl Reply {
    fn no_content() -> Self {
        Self {
            status: 204,
            body: None,
        }
    }

    fn ok(body: Value) -> Self {
        Self {
            status: 200,
            body: Some(body),
        }
    }

    pub fn fault(message: impl Into<String>) -> Self {
        Self {
            status: 400,
            body: Some(json!({ "fault_message": message.into() })),
        }
    }

    pub fn fault_message(&self) -> Option<&str> {
        self.body.as_ref()?.get("fault_message")?.as_str()
    }
}

/// What vsock connections wait for: the guest running, and where its agent
/// listens.
#[derive(Debug, Clone)]
enum Guest {
    Off,
    Running { agent_sock: Option<PathBuf> },
}

#[derive(Debug)]
struct VsockDevice {
    guest_cid: u64,
    uds_path: PathBuf,
    acceptor: JoinHandle<()>,
}

impl Drop for VsockDevice {
    fn drop(&mut self) {
        self.acceptor.abort();
        let _ = std::fs::remove_file(&self.uds_path);
    }
}

#[derive(Debug)]
struct Boot {
    kernel: File,
    /// Held open like Firecracker does; read at boot only by a real VMM.
    _initrd: Option<File>,
}

#[derive(Debug)]
struct DriveState {
    is_root: bool,
    /// The body it was configured with (a snapshot records it).
    config: Value,
    /// Held open like Firecracker does from `PUT /drives` on.
    _backing: File,
}

/// A network interface: its configuration and its tap, held open from
/// `PUT /network-interfaces` on, as Firecracker holds it.
struct Iface {
    config: Value,
    _tap: tokio_tun::Tun,
}

impl std::fmt::Debug for Iface {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Iface")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct Agent {
    child: Child,
    sock: PathBuf,
}

#[derive(Debug)]
struct State {
    started: bool,
    boot: Option<Boot>,
    drives: BTreeMap<String, DriveState>,
    ifaces: BTreeMap<String, Iface>,
    machine: Value,
    vsock: Option<VsockDevice>,
    logger: Option<File>,
    metrics: Option<File>,
    agent: Option<Agent>,
    /// `PATCH /vm` paused the vCPUs.
    paused: bool,
}

/// The emulated Firecracker process.
#[derive(Debug)]
pub struct Vmm {
    spec: Spec,
    opts: Options,
    state: Mutex<State>,
    guest: watch::Sender<Guest>,
    next_local_port: Arc<AtomicU32>,
    power_off: Notify,
}

impl Vmm {
    pub fn new(spec: Spec, opts: Options) -> Self {
        Self {
            spec,
            opts,
            state: Mutex::new(State {
                started: false,
                boot: None,
                drives: BTreeMap::new(),
                ifaces: BTreeMap::new(),
                machine: default_machine_config(),
                vsock: None,
                logger: None,
                metrics: None,
                agent: None,
                paused: false,
            }),
            guest: watch::channel(Guest::Off).0,
            // Firecracker allocates host-side ports from 1 << 30 upwards.
            next_local_port: Arc::new(AtomicU32::new(1 << 30)),
            power_off: Notify::new(),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Resolves when the guest powered off (after `SendCtrlAltDel`).
    pub async fn powered_off(&self) {
        self.power_off.notified().await;
    }

    /// Handles one request and logs it (stderr, and the configured logger).
    pub fn handle(&self, method: &str, path: &str, body: &[u8]) -> Reply {
        let reply = self.dispatch(method, path, body);
        let mut line = format!(
            "fc-double[{}]: {method} {path} -> {}",
            self.opts.id, reply.status
        );
        if let Some(msg) = reply.fault_message() {
            line.push_str(&format!(" ({msg})"));
        }
        eprintln!("{line}");
        if let Some(log) = self.state().logger.as_mut() {
            let _ = writeln!(log, "{line}");
        }
        reply
    }

    fn dispatch(&self, method: &str, path: &str, body: &[u8]) -> Reply {
        let Some(route) = self.spec.route(method, path) else {
            return Reply::fault(format!(
                "Invalid request method and/or path: {method} {path}."
            ));
        };
        let body: Option<Value> = match self.spec.body_rule(&route) {
            BodyRule::None if !body.is_empty() => {
                return Reply::fault(format!("{method} request cannot have a body."));
            }
            BodyRule::None => None,
            BodyRule::Schema { .. } if body.is_empty() && method == "PUT" => {
                // Firecracker refuses every empty PUT, whatever the spec says.
                return Reply::fault("Empty PUT request.");
            }
            BodyRule::Schema { required: true, .. } if body.is_empty() => {
                return Reply::fault(format!("Empty {method} request."));
            }
            BodyRule::Schema { .. } if body.is_empty() => None,
            BodyRule::Schema { .. } => {
                let value: Value = match serde_json::from_slice(body) {
                    Ok(v) => v,
                    Err(e) => return Reply::fault(format!("{SERDE_PREFIX}: {e}.")),
                };
                if let Err(v) = self.spec.validate_body(&route, &value) {
                    return Reply::fault(format!("{SERDE_PREFIX}: {v}."));
                }
                Some(value)
            }
        };
        for (name, value) in &route.params {
            if value.is_empty() {
                return Reply::fault("The ID cannot be empty.");
            }
            if !value.chars().all(|c| c == '_' || c.is_alphanumeric()) {
                return Reply::fault(
                    "API Resource IDs can only contain alphanumeric characters and underscores.",
                );
            }
            if let Some(in_body) = body.as_ref().and_then(|b| b.get(name))
                && in_body.as_str() != Some(value.as_str())
            {
                return Reply::fault("The id from the path does not match the id from the body!");
            }
        }
        let body = body.unwrap_or(Value::Null);
        match (method, route.template) {
            ("GET", "/") => self.describe_instance(),
            ("GET", "/version") => Reply::ok(json!({ "firecracker_version": self.spec.version() })),
            ("GET", "/machine-config") => Reply::ok(self.state().machine.clone()),
            ("PUT", "/actions") => self.action(&body),
            ("PATCH", "/vm") => self.patch_vm(&body),
            ("PUT", "/snapshot/create") => self.create_snapshot(&body),
            ("PUT", "/snapshot/load") => self.load_snapshot(&body),
            ("PUT", template) if PRE_BOOT_ONLY.contains(&template) => {
                let mut state = self.state();
                if state.started {
                    return Reply::fault(NOT_AFTER_START);
                }
                match template {
                    "/logger" => put_logger(&mut state, &body),
                    "/metrics" => put_metrics(&mut state, &body),
                    "/machine-config" => put_machine_config(&mut state, body),
                    "/boot-source" => put_boot_source(&mut state, &body),
                    "/drives/{drive_id}" => put_drive(&mut state, &body),
                    "/network-interfaces/{iface_id}" => put_network_interface(&mut state, body),
                    "/vsock" => self.put_vsock(&mut state, &body),
                    _ => unreachable!("PRE_BOOT_ONLY lists exactly these"),
                }
            }
            (method, template) => Reply::fault(format!(
                "fc-double does not emulate {method} {template} (the request is valid per the spec)"
            )),
        }
    }

    fn describe_instance(&self) -> Reply {
        let state = match &*self.state() {
            s if !s.started => "Not started",
            s if s.paused => "Paused",
            _ => "Running",
        };
        Reply::ok(json!({
            "app_name": "Firecracker",
            "id": self.opts.id,
            "state": state,
            "vmm_version": self.spec.version(),
        }))
    }

    fn action(&self, body: &Value) -> Reply {
        match body["action_type"].as_str() {
            Some("InstanceStart") => self.instance_start(),
            Some("SendCtrlAltDel") => {
                if !self.state().started {
                    return Reply::fault(NOT_BEFORE_START);
                }
                if self.opts.ignore_ctrl_alt_del {
                    eprintln!("fc-double[{}]: ignoring Ctrl+Alt+Del", self.opts.id);
                } else {
                    self.power_off.notify_one();
                }
                Reply::no_content()
            }
            Some("FlushMetrics") => {
                let mut state = self.state();
                let Some(metrics) = state.metrics.as_mut() else {
                    return Reply::fault("Metrics system not initialized.");
                };
                let line = json!({ "utc_timestamp_ms": now_ms() });
                match writeln!(metrics, "{line}") {
                    Ok(()) => Reply::no_content(),
                    Err(e) => Reply::fault(format!("Cannot flush metrics: {e}")),
                }
            }
            // The schema's enum already refused anything else.
            other => Reply::fault(format!("unexpected action_type {other:?}")),
        }
    }

    /// `PATCH /vm`: a paused guest runs nothing, so the stand-in's guest
    /// (its agent process) is stopped until the resume. Pausing a paused
    /// VM, or resuming a running one, succeeds as in Firecracker.
    fn patch_vm(&self, body: &Value) -> Reply {
        let mut state = self.state();
        if !state.started {
            return Reply::fault(NOT_BEFORE_START);
        }
        // The schema's enum already refused anything else.
        let paused = body["state"] == "Paused";
        if let Err(e) = signal_agent(&state, paused) {
            return Reply::fault(format!("Cannot change the guest's state: {e}"));
        }
        state.paused = paused;
        Reply::no_content()
    }

    fn instance_start(&self) -> Reply {
        let mut state = self.state();
        if state.started {
            return Reply::fault(NOT_AFTER_START);
        }
        let Some(boot) = &state.boot else {
            return Reply::fault("Cannot start microvm without kernel configuration.");
        };
        let mut magic = [0u8; 4];
        if boot.kernel.read_exact_at(&mut magic, 0).is_err() || &magic != b"\x7fELF" {
            return Reply::fault(
                "Cannot load kernel due to invalid memory configuration or invalid kernel \
                 image: Invalid Elf magic number (x86_64 boots an uncompressed ELF vmlinux)",
            );
        }
        state.started = true;
        self.start_guest(&mut state);
        Reply::no_content()
    }

    /// The guest runs: its agent process starts (stopped again at once
    /// when the VM is paused) and vsock connections reach it.
    fn start_guest(&self, state: &mut State) {
        let agent_sock = match &self.opts.agent_cmd {
            Some(cmd) => {
                let dir = state
                    .vsock
                    .as_ref()
                    .map_or(self.opts.api_sock.as_path(), |v| v.uds_path.as_path())
                    .parent()
                    .unwrap_or(Path::new("."))
                    .to_owned();
                let sock = dir.join("fc-double-agent.sock");
                match spawn_agent(cmd, &sock) {
                    Ok(child) => {
                        state.agent = Some(Agent {
                            child,
                            sock: sock.clone(),
                        });
                        Some(sock)
                    }
                    Err(e) => {
                        // A guest whose agent fails to start still boots.
                        eprintln!(
                            "fc-double[{}]: guest agent did not start: {e}",
                            self.opts.id
                        );
                        None
                    }
                }
            }
            None => None,
        };
        if state.paused {
            let _ = signal_agent(state, true);
        }
        self.guest.send_replace(Guest::Running { agent_sock });
    }

    /// `PUT /snapshot/create`, after boot and from a paused VM only, as in
    /// Firecracker. The state file is fc-double's own (JSON: the version
    /// that wrote it and what the VM was configured with; Firecracker's is
    /// a versioned binary). The memory file is as large as the guest's
    /// memory and, like a guest's, mostly zeros: the stand-in's guest
    /// memory holds one page, naming the instance that wrote it.
    fn create_snapshot(&self, body: &Value) -> Reply {
        let state = self.state();
        if !state.started {
            return Reply::fault(NOT_BEFORE_START);
        }
        if body["snapshot_type"] == "Diff" && state.machine["track_dirty_pages"] != json!(true) {
            return Reply::fault(
                "Diff snapshots are not allowed on uVMs with dirty page tracking disabled.",
            );
        }
        if !state.paused {
            return Reply::fault(
                "Failed to create snapshot: Cannot save the microVM state: Operation not \
                 allowed: save/restore unavailable while running",
            );
        }
        let snapshot = json!({
            "fc_double_snapshot": SNAPSHOT_FORMAT,
            "vmm_version": self.spec.version(),
            "machine": state.machine,
            "drives": state.drives.values().map(|d| d.config.clone()).collect::<Vec<_>>(),
            "ifaces": state.ifaces.values().map(|i| i.config.clone()).collect::<Vec<_>>(),
            "vsock": state.vsock.as_ref().map(|v| json!({
                "guest_cid": v.guest_cid,
                "uds_path": v.uds_path,
            })),
        });
        let state_path = body["snapshot_path"].as_str().unwrap_or_default();
        let mem_path = body["mem_file_path"].as_str().unwrap_or_default();
        let text = serde_json::to_vec_pretty(&snapshot).expect("a JSON value serialises");
        if let Err(e) = std::fs::write(state_path, text) {
            return Reply::fault(format!(
                "Failed to create snapshot: Cannot write the microVM state to {state_path}: {e}"
            ));
        }
        let mem_bytes = state.machine["mem_size_mib"].as_u64().unwrap_or(0) << 20;
        if let Err(e) = write_guest_memory(Path::new(mem_path), mem_bytes, &self.opts.id) {
            let _ = std::fs::remove_file(state_path);
            return Reply::fault(format!(
                "Failed to create snapshot: Cannot write the guest memory to {mem_path}: {e}"
            ));
        }
        Reply::no_content()
    }

    /// `PUT /snapshot/load`, on a fresh process only (nothing configured
    /// but the logger and metrics), as in Firecracker: the VM is rebuilt
    /// from the state file, its drives reopened at the recorded paths
    /// (relative ones against the working directory), its interfaces on
    /// their override taps, its vsock device on the override socket; then
    /// it is paused, or running with `resume_vm`. The stand-in's guest is a
    /// host process: what it held in memory is not restored (its agent
    /// starts afresh), which the QEMU tests, with real guests, check.
    fn load_snapshot(&self, body: &Value) -> Reply {
        let mut state = self.state();
        if state.started {
            return Reply::fault(NOT_AFTER_START);
        }
        if state.boot.is_some()
            || !state.drives.is_empty()
            || !state.ifaces.is_empty()
            || state.vsock.is_some()
            || state.machine != default_machine_config()
        {
            return Reply::fault(
                "Loading a microVM snapshot not allowed after configuring boot-specific resources.",
            );
        }
        let mem_path = match (body.get("mem_backend"), body.get("mem_file_path")) {
            (Some(_), Some(_)) | (None, None) => {
                return Reply::fault(format!(
                    "{SERDE_PREFIX}: exactly one of `mem_backend` and `mem_file_path` must be present."
                ));
            }
            (Some(b), None) if b["backend_type"] == "Uffd" => {
                return Reply::fault("fc-double does not emulate the Uffd memory backend");
            }
            (Some(b), None) => b["backend_path"].as_str(),
            (None, Some(p)) => p.as_str(),
        }
        .unwrap_or_default()
        .to_owned();
        let failed =
            |what: String| Reply::fault(format!("Failed to restore from snapshot: {what}"));
        let snap_path = body["snapshot_path"].as_str().unwrap_or_default();
        let snap: Value = match std::fs::read(snap_path)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
        {
            Ok(v) => v,
            Err(e) => {
                return failed(format!(
                    "Failed to get snapshot state from file {snap_path}: {e}"
                ));
            }
        };
        if snap["fc_double_snapshot"] != json!(SNAPSHOT_FORMAT) {
            return failed(format!(
                "Failed to get snapshot state from file {snap_path}: not a snapshot state"
            ));
        }
        if snap["vmm_version"] != self.spec.version() {
            return failed(format!(
                "the snapshot was written by version {}, this is {}",
                snap["vmm_version"],
                self.spec.version()
            ));
        }
        let mem_bytes = snap["machine"]["mem_size_mib"].as_u64().unwrap_or(0) << 20;
        match std::fs::metadata(&mem_path) {
            Ok(m) if m.len() == mem_bytes => {}
            Ok(m) => {
                return failed(format!(
                    "Failed to load guest memory: {mem_path} holds {} bytes, the snapshot's guest memory {mem_bytes}",
                    m.len()
                ));
            }
            Err(e) => return failed(format!("Failed to load guest memory: {mem_path}: {e}")),
        }
        let mut taps: BTreeMap<String, String> = BTreeMap::new();
        for o in body["network_overrides"].as_array().into_iter().flatten() {
            let id = o["iface_id"].as_str().unwrap_or_default();
            let known = snap["ifaces"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|i| i["iface_id"] == id);
            if !known {
                return failed(format!(
                    "Invalid network override: the snapshot has no network interface {id:?}"
                ));
            }
            taps.insert(
                id.to_owned(),
                o["host_dev_name"].as_str().unwrap_or_default().to_owned(),
            );
        }
        let vsock = match (&snap["vsock"], body["vsock_override"]["uds_path"].as_str()) {
            (Value::Null, Some(_)) => {
                return failed("Invalid vsock override: the snapshot has no vsock device".into());
            }
            (Value::Null, None) => None,
            (v, path) => Some(json!({
                "guest_cid": v["guest_cid"],
                "uds_path": path.map_or(v["uds_path"].clone(), |p| json!(p)),
            })),
        };
        let built = (|| {
            for d in snap["drives"].as_array().into_iter().flatten() {
                let r = put_drive(&mut state, d);
                if r.status != 204 {
                    return Err(failed(format!(
                        "Failed to build microVM from snapshot: {}",
                        r.fault_message().unwrap_or_default()
                    )));
                }
            }
            for i in snap["ifaces"].as_array().into_iter().flatten() {
                let mut config = i.clone();
                if let Some(tap) = taps.get(i["iface_id"].as_str().unwrap_or_default()) {
                    config["host_dev_name"] = json!(tap);
                }
                let r = put_network_interface(&mut state, config);
                if r.status != 204 {
                    return Err(failed(format!(
                        "Failed to build microVM from snapshot: {}",
                        r.fault_message().unwrap_or_default()
                    )));
                }
            }
            if let Some(v) = &vsock {
                let r = self.put_vsock(&mut state, v);
                if r.status != 204 {
                    return Err(failed(format!(
                        "Failed to build microVM from snapshot: {}",
                        r.fault_message().unwrap_or_default()
                    )));
                }
            }
            Ok(())
        })();
        if let Err(reply) = built {
            // Nothing of the half-built VM stays: the process is as fresh
            // as before the request.
            state.drives.clear();
            state.ifaces.clear();
            state.vsock = None;
            return reply;
        }
        state.machine = snap["machine"].clone();
        state.started = true;
        state.paused = body["resume_vm"] != json!(true);
        self.start_guest(&mut state);
        Reply::no_content()
    }

    fn put_vsock(&self, state: &mut State, body: &Value) -> Reply {
        let guest_cid = body["guest_cid"].as_u64().unwrap_or_default();
        let uds_path = PathBuf::from(body["uds_path"].as_str().unwrap_or_default());
        // Replacing the device releases the old socket first.
        state.vsock = None;
        // Firecracker binds the host socket when the device is created.
        let listener = match UnixListener::bind(&uds_path) {
            Ok(l) => l,
            Err(e) => {
                return Reply::fault(format!(
                    "Cannot create backend for vsock device: UnixBind({e}) at {}",
                    uds_path.display()
                ));
            }
        };
        let ctx = Muxer {
            guest: self.guest.subscribe(),
            agent_port: self.opts.agent_port,
            next_local_port: Arc::clone(&self.next_local_port),
        };
        let acceptor = tokio::spawn(ctx.run(listener));
        state.vsock = Some(VsockDevice {
            guest_cid,
            uds_path,
            acceptor,
        });
        Reply::no_content()
    }

    /// Guest power-off: stop the agent, release the vsock sockets.
    pub async fn shut_down(&self) {
        let vsock = self.state().vsock.take();
        drop(vsock);
        self.kill_guest().await;
    }

    /// The guest dies with the VMM: stop the agent process.
    pub async fn kill_guest(&self) {
        let agent = self.state().agent.take();
        if let Some(mut agent) = agent {
            let _ = agent.child.start_kill();
            let _ = agent.child.wait().await;
            let _ = std::fs::remove_file(&agent.sock);
        }
    }
}

/// The version of fc-double's snapshot state format.
pub const SNAPSHOT_FORMAT: u32 = 1;

/// Stops (SIGSTOP) or continues (SIGCONT) the stand-in guest's agent.
fn signal_agent(state: &State, paused: bool) -> rustix::io::Result<()> {
    let agent = state.agent.as_ref().and_then(|a| a.child.id());
    if let Some(pid) = agent.and_then(|p| rustix::process::Pid::from_raw(p as i32)) {
        let signal = if paused {
            rustix::process::Signal::STOP
        } else {
            rustix::process::Signal::CONT
        };
        rustix::process::kill_process(pid, signal)?;
    }
    Ok(())
}

/// A guest memory file of `bytes`: sparse, but for its first page, which
/// names the instance.
fn write_guest_memory(path: &Path, bytes: u64, id: &str) -> std::io::Result<()> {
    let f = File::create(path)?;
    f.set_len(bytes)?;
    let mut page = format!("fc-double guest memory of {id} at {}\n", now_ms()).into_bytes();
    page.resize(4096.min(bytes as usize), 0);
    f.write_all_at(&page, 0)
}

const PRE_BOOT_ONLY: &[&str] = &[
    "/logger",
    "/metrics",
    "/machine-config",
    "/boot-source",
    "/drives/{drive_id}",
    "/network-interfaces/{iface_id}",
    "/vsock",
];

fn default_machine_config() -> Value {
    json!({"vcpu_count": 1, "mem_size_mib": 128, "smt": false,
           "track_dirty_pages": false, "huge_pages": "None"})
}

fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

/// Firecracker opens existing log and metrics files (or FIFOs) for
/// writing; it never creates them.
fn open_output(path: &str) -> std::io::Result<File> {
    OpenOptions::new().append(true).open(path)
}

fn put_logger(state: &mut State, body: &Value) -> Reply {
    if let Some(path) = body["log_path"].as_str() {
        match open_output(path) {
            Ok(f) => state.logger = Some(f),
            Err(e) => return Reply::fault(format!("Cannot open the log file {path}: {e}")),
        }
    }
    Reply::no_content()
}

fn put_metrics(state: &mut State, body: &Value) -> Reply {
    if state.metrics.is_some() {
        return Reply::fault("Reinitialization of metrics not allowed.");
    }
    let path = body["metrics_path"].as_str().unwrap_or_default();
    match open_output(path) {
        Ok(f) => {
            state.metrics = Some(f);
            Reply::no_content()
        }
        Err(e) => Reply::fault(format!("Cannot open the metrics file {path}: {e}")),
    }
}

fn put_machine_config(state: &mut State, body: Value) -> Reply {
    // PUT resets the optional fields to their defaults.
    let mut config = default_machine_config();
    if let (Some(target), Value::Object(given)) = (config.as_object_mut(), body) {
        target.extend(given);
    }
    let vcpus = config["vcpu_count"].as_u64().unwrap_or(0);
    if config["smt"] == json!(true) && vcpus > 1 && vcpus % 2 == 1 {
        return Reply::fault(
            "The vCPU number is invalid! The vCPU number can only be 1 or an even number when SMT is enabled.",
        );
    }
    state.machine = config;
    Reply::no_content()
}

fn put_boot_source(state: &mut State, body: &Value) -> Reply {
    let kernel_path = body["kernel_image_path"].as_str().unwrap_or_default();
    let kernel = match File::open(kernel_path) {
        Ok(f) => f,
        Err(e) => {
            return Reply::fault(format!(
                "The kernel file cannot be opened: {e} ({kernel_path})"
            ));
        }
    };
    let initrd = match body["initrd_path"].as_str() {
        Some(path) => match File::open(path) {
            Ok(f) => Some(f),
            Err(e) => {
                return Reply::fault(format!(
                    "The initrd file cannot be opened due to invalid path or invalid permissions. {e} ({path})"
                ));
            }
        },
        None => None,
    };
    state.boot = Some(Boot {
        kernel,
        _initrd: initrd,
    });
    Reply::no_content()
}

fn put_drive(state: &mut State, body: &Value) -> Reply {
    let id = body["drive_id"].as_str().unwrap_or_default().to_owned();
    let is_root = body["is_root_device"].as_bool().unwrap_or(false);
    if is_root
        && state
            .drives
            .iter()
            .any(|(other, d)| d.is_root && *other != id)
    {
        return Reply::fault("A root block device already exists!");
    }
    let Some(path) = body["path_on_host"].as_str() else {
        return Reply::fault(if body.get("socket").is_some() {
            "fc-double does not emulate vhost-user-block drives (`socket`)"
        } else {
            "Unable to create the block device: `path_on_host` is required for a virtio-block drive"
        });
    };
    let read_only = body["is_read_only"].as_bool().unwrap_or(false);
    let backing = match OpenOptions::new().read(true).write(!read_only).open(path) {
        Ok(f) => f,
        Err(e) => {
            return Reply::fault(format!(
                "Unable to create the block device: cannot open {path}: {e}"
            ));
        }
    };
    state.drives.insert(
        id,
        DriveState {
            is_root,
            config: body.clone(),
            _backing: backing,
        },
    );
    Reply::no_content()
}

fn put_network_interface(state: &mut State, body: Value) -> Reply {
    if let Some(mac) = body["guest_mac"].as_str()
        && !valid_mac(mac)
    {
        return Reply::fault(format!("{SERDE_PREFIX}: invalid MAC address {mac:?}."));
    }
    let tap = body["host_dev_name"].as_str().unwrap_or_default();
    if tap.is_empty() || tap.len() > 15 {
        return Reply::fault(format!(
            "Could not create the network device: Open tap device failed: invalid interface name {tap:?} (1 to 15 bytes)"
        ));
    }
    let id = body["iface_id"].as_str().unwrap_or_default().to_owned();
    // An update lets go of the interface's previous tap first.
    state.ifaces.remove(&id);
    match open_tap(tap) {
        Ok(t) => {
            state.ifaces.insert(
                id,
                Iface {
                    config: body,
                    _tap: t,
                },
            );
            Reply::no_content()
        }
        Err(e) => Reply::fault(format!(
            "Could not create the network device: Open tap device failed: Error while \
             creating ifreq structure: {e}. Invalid TUN/TAP Backend provided by {tap}. \
             Check our documentation on setting up the network devices."
        )),
    }
}

/// Opens tap `name` the way Firecracker does (TUNSETIFF with IFF_TAP |
/// IFF_NO_PI on /dev/net/tun): the kernel refuses a tap another process
/// holds (EBUSY) or another user owns (EPERM). A missing tap fails as it
/// does for Firecracker without CAP_NET_ADMIN, the way banger runs it:
/// TUNSETIFF would otherwise make a new one.
fn open_tap(name: &str) -> std::io::Result<tokio_tun::Tun> {
    if !Path::new("/sys/class/net").join(name).exists() {
        return Err(std::io::Error::from_raw_os_error(19)); // ENODEV
    }
    let mut taps = tokio_tun::Tun::builder()
        .name(name)
        .tap()
        .build()
        .map_err(|e| match e {
            tokio_tun::Error::IoError(io) => io,
            tokio_tun::Error::NixError(errno) => std::io::Error::from_raw_os_error(errno as i32),
        })?;
    Ok(taps.remove(0))
}

fn valid_mac(mac: &str) -> bool {
    let parts: Vec<&str> = mac.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()))
}

/// Starts the guest agent: `sh -c 'exec CMD'` with `{sock}` replaced by the
/// shell-quoted socket path, in a guest of its own ([`GUEST`]). It stays in
/// fc-double's process group, so killing the group (what banger does on a
/// forced stop) takes it down too.
fn spawn_agent(cmd: &str, sock: &Path) -> std::io::Result<Child> {
    let _ = std::fs::remove_file(sock);
    let quoted = shell_quote(&sock.to_string_lossy());
    let agent = format!("exec {}", cmd.replace("{sock}", &quoted));
    let dir = sock.parent().unwrap_or(Path::new("."));
    Command::new("unshare")
        .args(["--mount", "--uts", "--net", "--propagation", "private"])
        .args(["/bin/sh", "-c", GUEST, "fc-double-guest"])
        .arg(dir)
        .arg(agent)
        .stdin(std::process::Stdio::null())
        .spawn()
}

/// The stand-in guest. Its agent runs what banger asks of a guest, and a
/// guest changes itself (hostname, addresses and routes, machine-id, sshd
/// host keys, its clock: what banger's restore does): none of that may
/// reach the host. So it runs in mount, UTS and network namespaces of its
/// own, with one interface (`eth0`, a veth whose peer is in the namespace
/// too), `/etc` and `/var/lib/dbus` on writable layers that vanish with
/// it, and without `CAP_SYS_TIME`: `date -s` is a stand-in that writes its
/// arguments to `fc-double-guest-date` beside the agent's socket (other
/// uses of `date` run a copy of the real one). `$1`: the agent socket's
/// directory; `$2`: the agent's command line.
const GUEST: &str = r#"set -e
d="$1/fc-double-guest"
mkdir -p "$d"
mount -t tmpfs fc-double-guest "$d"
mkdir "$d/etc" "$d/etc.work"
mount -t overlay overlay -o "lowerdir=/etc,upperdir=$d/etc,workdir=$d/etc.work" /etc
if [ -d /var/lib/dbus ]; then mount -t tmpfs fc-double-guest /var/lib/dbus; fi
mount -t sysfs sysfs /sys
ip link add eth0 type veth peer name eth1
ip link set eth1 up
cp /usr/bin/date "$d/date.real"
cat > "$d/date" <<EOF
#!/bin/sh
case " \$* " in
*" -s "*|*" --set"*) printf '%s\n' "\$*" >> '$1/fc-double-guest-date' ;;
*) exec '$d/date.real' "\$@" ;;
esac
EOF
chmod 755 "$d/date"
mount --bind "$d/date" /usr/bin/date
exec setpriv --bounding-set -sys_time -- /bin/sh -c "$2"
"#;

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The host side of the hybrid vsock device.
#[derive(Debug)]
struct Muxer {
    guest: watch::Receiver<Guest>,
    agent_port: u32,
    next_local_port: Arc<AtomicU32>,
}

impl Muxer {
    async fn run(self, listener: UnixListener) {
        let this = Arc::new(self);
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(Arc::clone(&this).serve(stream));
        }
    }

    async fn serve(self: Arc<Self>, mut host: UnixStream) {
        // Until the guest runs, the device is not polled: the host waits.
        let mut guest = self.guest.clone();
        let agent_sock = match guest.wait_for(|g| matches!(g, Guest::Running { .. })).await {
            Ok(g) => match &*g {
                Guest::Running { agent_sock } => agent_sock.clone(),
                Guest::Off => return,
            },
            Err(_) => return,
        };
        // Malformed requests and unknown ports: the connection is dropped.
        let Some(port) = read_connect(&mut host).await else {
            return;
        };
        let Some(agent_sock) = agent_sock.filter(|_| port == self.agent_port) else {
            return;
        };
        let Ok(mut agent) = UnixStream::connect(&agent_sock).await else {
            return;
        };
        let local = self.next_local_port.fetch_add(1, Ordering::Relaxed);
        if host
            .write_all(format!("OK {local}\n").as_bytes())
            .await
            .is_err()
        {
            return;
        }
        let _ = tokio::io::copy_bidirectional(&mut host, &mut agent).await;
    }
}

/// Reads `CONNECT <port>\n` as Firecracker does: at least 10 bytes, then one
/// byte at a time up to the newline (32 bytes at most), so that nothing
/// after the newline is consumed. The verb is case-insensitive.
async fn read_connect(stream: &mut UnixStream) -> Option<u32> {
    const MIN: usize = 10;
    let mut buf = [0u8; 32];
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        stream.read_exact(&mut buf[..MIN]).await.ok()?;
        let mut len = MIN;
        while buf[len - 1] != b'\n' && len < buf.len() {
            stream.read_exact(&mut buf[len..=len]).await.ok()?;
            len += 1;
        }
        Some(len)
    })
    .await
    .ok()??;
    let text = std::str::from_utf8(&buf[..read]).ok()?;
    let mut words = text.split_whitespace();
    if !words.next()?.eq_ignore_ascii_case("connect") {
        return None;
    }
    words.next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vmm() -> Vmm {
        let spec = Spec::load(&crate::locate::find_spec(None).unwrap()).unwrap();
        Vmm::new(
            spec,
            Options {
                id: "t".into(),
                api_sock: "/tmp/fc-double-unit.sock".into(),
                agent_cmd: None,
                agent_port: 1024,
                ignore_ctrl_alt_del: false,
            },
        )
    }

    fn put(vmm: &Vmm, path: &str, body: Value) -> Reply {
        vmm.handle("PUT", path, body.to_string().as_bytes())
    }

    #[test]
    fn routing_and_body_rules() {
        let vmm = vmm();
        let r = vmm.handle("GET", "/", b"");
        assert_eq!(r.status, 200);
        assert_eq!(r.body.as_ref().unwrap()["state"], "Not started");
        assert_eq!(
            vmm.handle("PUT", "/nope", b"{}").fault_message(),
            Some("Invalid request method and/or path: PUT /nope.")
        );
        assert_eq!(
            vmm.handle("PUT", "/machine-config", b"").fault_message(),
            Some("Empty PUT request.")
        );
        assert_eq!(
            vmm.handle("GET", "/", b"{}").fault_message(),
            Some("GET request cannot have a body.")
        );
        let bad_json = vmm.handle("PUT", "/vsock", b"{not json");
        assert!(
            bad_json
                .fault_message()
                .unwrap()
                .starts_with("An error occurred when deserializing the json body of a request: key must be a string"),
            "{bad_json:?}"
        );
    }

    #[test]
    fn path_ids_follow_firecracker_rules() {
        let vmm = vmm();
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("d");
        std::fs::write(&disk, b"").unwrap();
        let body = |id: &str| {
            json!({"drive_id": id, "is_root_device": false,
                   "path_on_host": disk.to_str().unwrap()})
        };
        assert_eq!(
            put(&vmm, "/drives/work-disk", body("work-disk")).fault_message(),
            Some("API Resource IDs can only contain alphanumeric characters and underscores.")
        );
        assert_eq!(
            put(&vmm, "/drives/work", body("other")).fault_message(),
            Some("The id from the path does not match the id from the body!")
        );
        assert_eq!(put(&vmm, "/drives/work_1", body("work_1")).status, 204);
    }

    #[test]
    fn only_one_root_drive_and_files_must_exist() {
        let vmm = vmm();
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("d");
        std::fs::write(&disk, b"").unwrap();
        let d = disk.to_str().unwrap();
        assert_eq!(
            put(
                &vmm,
                "/drives/a",
                json!({"drive_id": "a", "is_root_device": true, "path_on_host": d})
            )
            .status,
            204
        );
        // Re-putting the same root drive is an update.
        assert_eq!(
            put(
                &vmm,
                "/drives/a",
                json!({"drive_id": "a", "is_root_device": true, "path_on_host": d})
            )
            .status,
            204
        );
        assert_eq!(
            put(
                &vmm,
                "/drives/b",
                json!({"drive_id": "b", "is_root_device": true, "path_on_host": d})
            )
            .fault_message(),
            Some("A root block device already exists!")
        );
        let missing = put(
            &vmm,
            "/drives/c",
            json!({"drive_id": "c", "is_root_device": false, "path_on_host": "/nonexistent/c"}),
        );
        assert!(
            missing.fault_message().unwrap().contains("/nonexistent/c"),
            "{missing:?}"
        );
        let missing = put(
            &vmm,
            "/boot-source",
            json!({"kernel_image_path": "/nonexistent/k"}),
        );
        assert!(
            missing
                .fault_message()
                .unwrap()
                .starts_with("The kernel file cannot be opened"),
            "{missing:?}"
        );
    }

    #[test]
    fn instance_start_needs_an_elf_kernel() {
        let vmm = vmm();
        assert_eq!(
            put(&vmm, "/actions", json!({"action_type": "InstanceStart"})).fault_message(),
            Some("Cannot start microvm without kernel configuration.")
        );
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("bzImage");
        std::fs::write(&kernel, b"MZ\x00\x00not an elf").unwrap();
        assert_eq!(
            put(
                &vmm,
                "/boot-source",
                json!({"kernel_image_path": kernel.to_str().unwrap()})
            )
            .status,
            204
        );
        let r = put(&vmm, "/actions", json!({"action_type": "InstanceStart"}));
        assert!(
            r.fault_message().unwrap().contains("Invalid Elf magic"),
            "{r:?}"
        );
        assert_eq!(
            vmm.handle("GET", "/", b"").body.unwrap()["state"],
            "Not started"
        );
    }

    #[test]
    fn machine_config_put_resets_optional_fields_and_checks_smt() {
        let vmm = vmm();
        assert_eq!(
            put(
                &vmm,
                "/machine-config",
                json!({"vcpu_count": 2, "mem_size_mib": 256, "smt": true})
            )
            .status,
            204
        );
        assert_eq!(
            put(
                &vmm,
                "/machine-config",
                json!({"vcpu_count": 2, "mem_size_mib": 512})
            )
            .status,
            204
        );
        let got = vmm.handle("GET", "/machine-config", b"").body.unwrap();
        assert_eq!(got["smt"], false);
        assert_eq!(got["mem_size_mib"], 512);
        assert!(
            put(
                &vmm,
                "/machine-config",
                json!({"vcpu_count": 3, "mem_size_mib": 512, "smt": true})
            )
            .fault_message()
            .unwrap()
            .contains("SMT")
        );
    }

    #[test]
    fn guest_mac_and_tap_name_are_checked() {
        let vmm = vmm();
        let r = put(
            &vmm,
            "/network-interfaces/eth0",
            json!({"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "02:00:00:00:00"}),
        );
        assert!(
            r.fault_message().unwrap().contains("invalid MAC address"),
            "{r:?}"
        );
        let r = put(
            &vmm,
            "/network-interfaces/eth0",
            json!({"iface_id": "eth0", "host_dev_name": "a-very-long-tap-name"}),
        );
        assert!(
            r.fault_message().unwrap().contains("1 to 15 bytes"),
            "{r:?}"
        );
        // A well-formed interface whose tap does not exist (tests/cli.rs
        // opens real ones in a namespace).
        let r = put(
            &vmm,
            "/network-interfaces/eth0",
            json!({"iface_id": "eth0", "host_dev_name": "bgt-nosuch", "guest_mac": "02:fc:00:00:00:01"}),
        );
        let msg = r.fault_message().unwrap();
        assert!(msg.contains("Open tap device failed"), "{msg}");
        assert!(
            msg.contains("No such device") && msg.contains("bgt-nosuch"),
            "{msg}"
        );
    }

    #[test]
    fn log_and_metrics_files_must_exist() {
        let vmm = vmm();
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("fc.log");
        let r = put(&vmm, "/logger", json!({"log_path": log.to_str().unwrap()}));
        assert!(r.fault_message().unwrap().contains("No such file"), "{r:?}");
        assert!(!log.exists(), "Firecracker does not create its log file");
        let metrics = dir.path().join("metrics.json");
        let r = put(
            &vmm,
            "/metrics",
            json!({"metrics_path": metrics.to_str().unwrap()}),
        );
        assert!(r.fault_message().unwrap().contains("No such file"), "{r:?}");
        assert!(!metrics.exists());
        std::fs::write(&log, b"").unwrap();
        std::fs::write(&metrics, b"").unwrap();
        assert_eq!(
            put(&vmm, "/logger", json!({"log_path": log.to_str().unwrap()})).status,
            204
        );
        assert_eq!(
            put(
                &vmm,
                "/metrics",
                json!({"metrics_path": metrics.to_str().unwrap()})
            )
            .status,
            204
        );
    }

    #[test]
    fn ctrl_alt_del_and_flush_metrics_need_their_preconditions() {
        let vmm = vmm();
        assert_eq!(
            put(&vmm, "/actions", json!({"action_type": "SendCtrlAltDel"})).fault_message(),
            Some(NOT_BEFORE_START)
        );
        assert_eq!(
            put(&vmm, "/actions", json!({"action_type": "FlushMetrics"})).fault_message(),
            Some("Metrics system not initialized.")
        );
        let dir = tempfile::tempdir().unwrap();
        let m = dir.path().join("metrics");
        std::fs::write(&m, b"").unwrap();
        assert_eq!(
            put(
                &vmm,
                "/metrics",
                json!({"metrics_path": m.to_str().unwrap()})
            )
            .status,
            204
        );
        assert_eq!(
            put(
                &vmm,
                "/metrics",
                json!({"metrics_path": m.to_str().unwrap()})
            )
            .fault_message(),
            Some("Reinitialization of metrics not allowed.")
        );
        assert_eq!(
            put(&vmm, "/actions", json!({"action_type": "FlushMetrics"})).status,
            204
        );
        let written = std::fs::read_to_string(&m).unwrap();
        assert!(written.contains("utc_timestamp_ms"), "{written}");
    }

    #[test]
    fn valid_but_unemulated_requests_say_so() {
        let vmm = vmm();
        let r = put(
            &vmm,
            "/balloon",
            json!({"amount_mib": 1, "deflate_on_oom": true}),
        );
        assert_eq!(r.status, 400);
        assert!(
            r.fault_message()
                .unwrap()
                .contains("does not emulate PUT /balloon"),
            "{r:?}"
        );
    }

    #[test]
    fn patch_vm_pauses_only_a_started_vm() {
        let vmm = vmm();
        let patch = |state: &str| {
            vmm.handle(
                "PATCH",
                "/vm",
                json!({ "state": state }).to_string().as_bytes(),
            )
        };
        let r = patch("Paused");
        assert_eq!(r.status, 400);
        assert_eq!(r.fault_message(), Some(NOT_BEFORE_START));
        let r = patch("Stopped");
        assert_eq!(r.status, 400, "not a state of the spec's enum");
        vmm.state().started = true;
        assert_eq!(patch("Paused").status, 204);
        let info = vmm.handle("GET", "/", b"");
        assert_eq!(info.body.as_ref().unwrap()["state"], "Paused");
        assert_eq!(patch("Resumed").status, 204);
        let info = vmm.handle("GET", "/", b"");
        assert_eq!(info.body.as_ref().unwrap()["state"], "Running");
    }

    #[test]
    fn snapshots_are_made_of_paused_vms_and_loaded_by_fresh_processes() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("root.ext4");
        std::fs::write(&disk, b"disk").unwrap();
        let (state_file, mem_file) = (dir.path().join("state"), dir.path().join("mem"));
        let create = json!({"snapshot_path": state_file.to_str().unwrap(),
                            "mem_file_path": mem_file.to_str().unwrap()});
        let drive = json!({"drive_id": "root", "is_root_device": true,
                           "is_read_only": false, "path_on_host": disk.to_str().unwrap()});
        let vmm = vmm();
        let r = put(&vmm, "/snapshot/create", create.clone());
        assert_eq!(r.fault_message(), Some(NOT_BEFORE_START));
        assert_eq!(put(&vmm, "/drives/root", drive.clone()).status, 204);
        vmm.state().started = true;
        let r = put(&vmm, "/snapshot/create", create.clone());
        assert!(
            r.fault_message()
                .unwrap()
                .contains("unavailable while running"),
            "{r:?}"
        );
        let mut diff = create.clone();
        diff["snapshot_type"] = json!("Diff");
        vmm.state().paused = true;
        let r = put(&vmm, "/snapshot/create", diff);
        assert!(
            r.fault_message()
                .unwrap()
                .contains("dirty page tracking disabled")
        );
        assert!(!state_file.exists() && !mem_file.exists());
        assert_eq!(put(&vmm, "/snapshot/create", create).status, 204);
        let mem = std::fs::metadata(&mem_file).unwrap();
        assert_eq!(mem.len(), 128 << 20, "the guest's memory size");
        assert!(
            mem.blocks() * 512 < 1 << 20,
            "sparse: {} blocks",
            mem.blocks()
        );

        let load = |mem: &Path| {
            json!({"snapshot_path": state_file.to_str().unwrap(),
                   "mem_backend": {"backend_type": "File", "backend_path": mem.to_str().unwrap()}})
        };
        // Only a fresh process loads: a configured drive, or a started VM, refuse it.
        let configured = self::vmm();
        assert_eq!(put(&configured, "/drives/root", drive).status, 204);
        let r = put(&configured, "/snapshot/load", load(&mem_file));
        assert_eq!(
            r.fault_message(),
            Some(
                "Loading a microVM snapshot not allowed after configuring boot-specific resources."
            )
        );
        let r = put(&vmm, "/snapshot/load", load(&mem_file));
        assert_eq!(r.fault_message(), Some(NOT_AFTER_START));

        let fresh = self::vmm();
        let mut both = load(&mem_file);
        both["mem_file_path"] = json!(mem_file.to_str().unwrap());
        assert!(
            put(&fresh, "/snapshot/load", both)
                .fault_message()
                .unwrap()
                .contains("exactly one of")
        );
        let short = dir.path().join("short");
        std::fs::write(&short, b"too small").unwrap();
        assert!(
            put(&fresh, "/snapshot/load", load(&short))
                .fault_message()
                .unwrap()
                .contains("Failed to load guest memory")
        );
        let mut unknown = load(&mem_file);
        unknown["network_overrides"] = json!([{"iface_id": "eth0", "host_dev_name": "t"}]);
        assert!(
            put(&fresh, "/snapshot/load", unknown)
                .fault_message()
                .unwrap()
                .contains("no network interface \"eth0\"")
        );
        // The drive is reopened where the snapshot says: gone, the load fails
        // and leaves the process fresh.
        std::fs::rename(&disk, dir.path().join("moved")).unwrap();
        let r = put(&fresh, "/snapshot/load", load(&mem_file));
        assert!(r.fault_message().unwrap().contains("root.ext4"), "{r:?}");
        assert!(fresh.state().drives.is_empty() && !fresh.state().started);
        std::fs::rename(dir.path().join("moved"), &disk).unwrap();
        assert_eq!(put(&fresh, "/snapshot/load", load(&mem_file)).status, 204);
        let info = fresh.handle("GET", "/", b"");
        assert_eq!(info.body.as_ref().unwrap()["state"], "Paused");
        assert!(fresh.state().drives["root"].is_root);
        let r = put(&fresh, "/boot-source", json!({"kernel_image_path": "/k"}));
        assert_eq!(r.fault_message(), Some(NOT_AFTER_START));
    }

    #[test]
    fn shell_quoting_survives_quotes() {
        assert_eq!(shell_quote("/a b/it's"), r"'/a b/it'\''s'");
    }
}
