//! `VmService`: VM lifecycle. Owns the VM rows, the `<state>/vms` dirs, the
//! in-memory runtime state of each VM (handles, agent connection) and the
//! exec sessions.
//!
//! Locking: `entries` (the map) and each `VmEntry::state` are std mutexes
//! held only for short in-memory changes. Slow work (disks, VMM start,
//! waiting for the guest) runs with the VM marked `busy` instead of under a
//! lock, so a concurrent operation on the same VM gets a `conflict` naming
//! the operation in progress. `VmEntry::agent` (async mutex) is held only
//! while (re)connecting the agent channel, never together with `state`.
//!
//! One file per operation: this one holds the service, its busy marks, the
//! agent link and teardown; `create.rs` (`vm.create`), `boot.rs` (accelerator,
//! VMM, kernel, agent, sshd), `lifecycle.rs` (start, stop, delete, set),
//! `guest.rs` (exec, ports, stats, keys), `reconcile.rs` (daemon start and the
//! watcher), `gc.rs` (the leak check and `gc`), `disks.rs` (every root disk
//! strategy) and `fault.rs` (the test seam).

mod boot;
mod create;
pub mod disks;
mod fault;
mod fork;
mod gc;
mod guest;
mod lifecycle;
mod pause;
mod pool;
mod reconcile;
mod restore;
mod secrets;
mod services;
mod snapshot;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use banger_agent_proto::{AgentClient, ExecSignaller};
use banger_host::{Accel, RootDiskStrategy};
use banger_store::{Store, Vm, VmState};
use banger_vmm::firecracker::Firecracker;
use banger_vmm::qemu::Qemu;
use banger_vmm::{Handles, LaunchIntent, is_alive};
use banger_wire::OpId;
use banger_wire::methods::VmInfo;
use tracing::warn;

use crate::errors::chain;
use crate::forward::ForwardError;
use crate::helper::{HelperError, HelperLink};
use crate::images::{ImageError, ImageService};
use crate::network::{NetworkError, NetworkService};
use crate::ops::{Operations, TaskFailed};
use crate::secrets::{SecretError, SecretService};
use crate::ssh::SshKeys;

pub use boot::AccelPlan;
pub use create::CREATE_STEPS;
pub use fault::{Fault, PULL_STEPS, SEAM_STEPS};

/// How long a running guest's agent may take to answer a reconnect.
pub(super) const AGENT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long one agent call (keys, ports, stats, shutdown, the start of an
/// exec) may take. The agent answers each from /proc, a file write or a
/// fork: milliseconds, and well under a second in a loaded TCG guest. 15 s
/// leaves room for a guest swapping hard; one that takes longer is hung
/// for any user, and waiting on it would hold the caller (and a create's or
/// stop's busy mark) for as long as the guest likes.
pub(crate) const AGENT_CALL_TIMEOUT: Duration = Duration::from_secs(15);

pub const DEFAULT_VCPUS: u32 = 2;
pub const DEFAULT_MEMORY_MIB: u32 = 1024;
pub const DEFAULT_DISK_MIB: u32 = 4096;

#[derive(Debug, Clone)]
pub struct VmSettings {
    pub qemu: Qemu,
    /// Present when a firecracker binary was found.
    pub firecracker: Option<Firecracker>,
    pub accel: AccelPlan,
    /// How root disks are made (probed in the state directory at start).
    pub root_disks: RootDiskStrategy,
    /// QEMU guests get a vhost-vsock device (and a CID) for their agent.
    pub vhost_vsock: bool,
    /// Test seam: fail (or pause) every create, start or delete right
    /// after this step.
    pub fault: Option<Fault>,
    /// How long `vm stop` lets the guest power itself off (`[vm]
    /// stop_timeout_secs`).
    pub stop_timeout: Duration,
    /// Cap of each running VM's console log, in bytes (`[vm]
    /// console_log_max_mib`).
    pub console_log_max: u64,
    /// Where this install's vsock CIDs start (they are global to the host).
    pub first_cid: u32,
    /// Guests the warm pool keeps ready (`[pool] size`).
    pub pool_size: usize,
}

#[derive(Debug)]
pub struct VmService {
    store: Arc<Store>,
    images: Arc<ImageService>,
    net: Arc<NetworkService>,
    /// For root disks made by the helper (device-mapper snapshots).
    helper: Arc<HelperLink>,
    ssh: SshKeys,
    ops: Arc<Operations>,
    settings: VmSettings,
    vms_dir: PathBuf,
    state_dir: PathBuf,
    /// The accelerator, once [`AccelPlan`] has settled it.
    accel: tokio::sync::OnceCell<Accel>,
    entries: Mutex<HashMap<String, Arc<VmEntry>>>,
    sessions: Mutex<HashMap<String, ExecControl>>,
    gate: SweepGate,
    /// Wakes the warm pool's filler (a guest was taken).
    pool_wake: tokio::sync::Notify,
    /// Secret values (`<state>/secrets`), for the checks of a create.
    secrets: Arc<SecretService>,
    /// Snapshot memory files whose digest was checked, by snapshot id: the
    /// version of the file that was.
    verified_memory: Mutex<HashMap<String, restore::FileStamp>>,
    /// What each VMM binary said its version was, by path: the version of
    /// the file that said it.
    vmm_versions: Mutex<HashMap<PathBuf, (restore::FileStamp, String)>>,
}

#[derive(Debug, Default)]
pub(super) struct VmEntry {
    state: Mutex<EntryState>,
    agent: tokio::sync::Mutex<Option<AgentClient>>,
}

#[derive(Debug, Default)]
pub(super) struct EntryState {
    handles: Option<Handles>,
    /// The operation working on this VM right now.
    busy: Option<(OpId, &'static str)>,
}

#[derive(Debug)]
pub(super) struct ExecControl {
    stdin: Option<tokio::sync::mpsc::Sender<(Vec<u8>, bool)>>,
    signaller: ExecSignaller,
}

/// Clears the VM's busy mark when the operation ends, however it ends
/// (returned, failed, panicked or cancelled); then leaves the gate.
pub(super) struct Busy {
    entry: Arc<VmEntry>,
    /// Held, not read: dropped after the mark is cleared.
    _in_flight: InFlight,
}
impl Drop for Busy {
    fn drop(&mut self) {
        self.entry.state.lock().expect("vm state").busy = None;
    }
}

/// Keeps `gc` and VM operations apart. An operation enters before it makes
/// anything (a create before its row); `gc` removes only while none is in
/// flight, and none enters while it removes. Both decide under this one
/// mutex, so the "nothing in flight" that `gc` saw holds until its removal
/// is done, helper calls included.
#[derive(Debug, Default)]
pub(super) struct SweepGate(Arc<Mutex<GateState>>);

#[derive(Debug, Default)]
struct GateState {
    sweeping: bool,
    in_flight: usize,
}

/// A VM operation in flight (see [`SweepGate`]).
#[derive(Debug)]
pub(super) struct InFlight(Arc<Mutex<GateState>>);
impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.lock().expect("gate").in_flight -= 1;
    }
}

/// `gc` removing (see [`SweepGate`]).
#[derive(Debug)]
pub(super) struct Sweeping(Arc<Mutex<GateState>>);
impl Drop for Sweeping {
    fn drop(&mut self) {
        self.0.lock().expect("gate").sweeping = false;
    }
}

impl SweepGate {
    pub(super) fn enter(&self) -> Result<InFlight, VmError> {
        let mut st = self.0.lock().expect("gate");
        if st.sweeping {
            return Err(VmError::Conflict(
                "gc is removing leaked resources; try again when it is done".into(),
            ));
        }
        st.in_flight += 1;
        Ok(InFlight(self.0.clone()))
    }

    pub(super) fn sweep(&self) -> Result<Sweeping, VmError> {
        let mut st = self.0.lock().expect("gate");
        if st.in_flight > 0 || st.sweeping {
            return Err(VmError::Conflict(
                "VM operations are in progress; run gc when they are done".into(),
            ));
        }
        st.sweeping = true;
        Ok(Sweeping(self.0.clone()))
    }
}

impl VmService {
    #[expect(
        clippy::too_many_arguments,
        reason = "the services a VM needs, wired once in main"
    )]
    pub fn new(
        store: Arc<Store>,
        images: Arc<ImageService>,
        net: Arc<NetworkService>,
        helper: Arc<HelperLink>,
        ssh: SshKeys,
        ops: Arc<Operations>,
        settings: VmSettings,
        state_dir: &Path,
    ) -> Self {
        VmService {
            secrets: net.proxy().secrets().clone(),
            store,
            images,
            net,
            helper,
            ssh,
            ops,
            settings,
            vms_dir: state_dir.join("vms"),
            state_dir: state_dir.to_path_buf(),
            accel: tokio::sync::OnceCell::new(),
            entries: Mutex::default(),
            sessions: Mutex::default(),
            gate: SweepGate::default(),
            pool_wake: tokio::sync::Notify::new(),
            verified_memory: Mutex::default(),
            vmm_versions: Mutex::default(),
        }
    }

    /// The secret values `banger secret` manages.
    pub fn secrets(&self) -> &Arc<SecretService> {
        &self.secrets
    }

    fn entry(&self, id: &str) -> Arc<VmEntry> {
        self.entries
            .lock()
            .expect("entries")
            .entry(id.to_string())
            .or_default()
            .clone()
    }

    /// Mark the VM busy for `what`, or say who else is working on it.
    fn claim(&self, vm: &Vm, op: &OpId, what: &'static str) -> Result<Busy, VmError> {
        let in_flight = self.gate.enter()?;
        let entry = self.entry(&vm.id);
        let mut st = entry.state.lock().expect("vm state");
        if let Some((other, doing)) = &st.busy {
            return Err(VmError::Conflict(format!(
                "VM {:?} is busy: {doing} in progress ({other})",
                vm.name
            )));
        }
        st.busy = Some((op.clone(), what));
        drop(st);
        Ok(Busy {
            entry,
            _in_flight: in_flight,
        })
    }

    fn is_busy(&self, id: &str) -> bool {
        self.entries
            .lock()
            .expect("entries")
            .get(id)
            .is_some_and(|e| e.state.lock().expect("vm state").busy.is_some())
    }

    fn handles(&self, id: &str) -> Option<Handles> {
        self.entry(id)
            .state
            .lock()
            .expect("vm state")
            .handles
            .clone()
    }

    pub fn info(&self, vm: &Vm) -> VmInfo {
        let image = self
            .store
            .image_by_id(&vm.image_id)
            .map(|i| i.name)
            .unwrap_or_else(|_| vm.image_id.clone());
        let h = self.handles(&vm.id);
        VmInfo {
            id: vm.id.clone(),
            name: vm.name.clone(),
            state: match &h {
                Some(h) if h.paused && vm.state == VmState::Running => "paused".to_owned(),
                _ => vm.state.to_string(),
            },
            image,
            vmm: vm.vmm,
            init: vm.init_mode,
            vcpus: vm.vcpus,
            memory_mib: vm.memory_mib,
            disk_mib: vm.disk_mib,
            guest_ip: vm.guest_ip.map(|i| i.to_string()),
            mac: vm.mac.clone(),
            vsock_cid: vm.vsock_cid,
            dns_name: vm.guest_ip.map(|_| self.net.dns().names().fqdn(&vm.name)),
            pid: h.as_ref().map(|h| h.pid),
            tap: h.and_then(|h| h.tap),
            net: vm.net_policy.clone(),
            vm_dir: vm.vm_dir.display().to_string(),
            console_log: vm.vm_dir.join("console.log").display().to_string(),
            last_error: vm.last_error.clone(),
            created_at_ms: vm.created_at,
            port_forwards: self.net.forwards().list(Some(vm)).unwrap_or_default(),
            work_disk: None,
            secrets: crate::secrets::secret_infos(
                &self.store.vm_secrets(&vm.id).unwrap_or_default(),
            ),
        }
    }

    pub fn find(&self, name: &str) -> Result<Vm, VmError> {
        self.store.find_vm(name).map_err(VmError::from)
    }

    /// A generation count bumped whenever what [`VmService::list`] shows
    /// may have changed (a row written, a VM paused or resumed).
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.store.watch_vms()
    }

    /// Every VM; the warm pool's guests only when `all`.
    pub fn list(&self, all: bool) -> Result<Vec<VmInfo>, VmError> {
        Ok(self
            .store
            .list_vms()?
            .iter()
            .filter(|v| all || !Self::is_pooled(v))
            .map(|v| self.info(v))
            .collect())
    }

    /// Taps held by VMs this daemon knows to be running.
    fn taps_in_use(&self) -> std::collections::HashSet<String> {
        let entries = self.entries.lock().expect("entries");
        entries
            .values()
            .filter_map(|e| {
                e.state
                    .lock()
                    .expect("vm state")
                    .handles
                    .as_ref()
                    .and_then(|h| h.tap.clone())
            })
            .collect()
    }

    /// `call` to the VM's agent, under [`AGENT_CALL_TIMEOUT`]; `what` names
    /// the call in the error.
    /// Run the script `argv` in `vm`'s guest through its agent and wait
    /// for it (within the agent deadline): a guest change banger makes
    /// (`what`, e.g. "the identity change"); an exit other than 0 is an
    /// error with the script's stderr.
    pub(super) async fn guest_change(
        &self,
        vm: &Vm,
        client: &banger_agent_proto::AgentClient,
        what: &str,
        argv: Vec<String>,
    ) -> Result<(), VmError> {
        let out = self
            .agent_call(vm, what, async {
                client
                    .exec(banger_agent_proto::ExecRequest::new(argv))
                    .await?
                    .wait_with_output()
                    .await
            })
            .await?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        if out.status == banger_agent_proto::ExitStatus::Code(0) {
            // What a step the script goes on without said (a reseed it
            // could not do, say): the log keeps it.
            if !stderr.trim().is_empty() {
                warn!(vm = %vm.id, what, stderr = %stderr.trim(), "a guest change went on past a warning");
            }
            return Ok(());
        }
        Err(VmError::Failed(format!(
            "{what} failed in VM {:?}'s guest ({:?}): {}",
            vm.name,
            out.status,
            stderr.trim()
        )))
    }

    pub(super) async fn agent_call<T>(
        &self,
        vm: &Vm,
        what: &str,
        call: impl Future<Output = Result<T, banger_agent_proto::AgentError>>,
    ) -> Result<T, VmError> {
        match tokio::time::timeout(AGENT_CALL_TIMEOUT, call).await {
            Ok(answer) => answer.map_err(VmError::from),
            Err(_) => Err(VmError::Unavailable(format!(
                "VM {name:?}'s guest agent did not answer {what} within {}s: the guest is hung or overloaded; see its console (banger vm logs {name}), and stop it by force if it stays so (banger vm stop {name})",
                AGENT_CALL_TIMEOUT.as_secs(),
                name = vm.name
            ))),
        }
    }

    async fn connect_agent(
        &self,
        vm: &Vm,
        h: &Handles,
        timeout: Duration,
    ) -> Result<AgentClient, VmError> {
        let deadline = Instant::now() + timeout;
        // Retry soon at first (a Firecracker guest's agent is up in tens of
        // milliseconds), then back off to 100 ms.
        let mut pause = Duration::from_millis(5);
        loop {
            let attempt = async {
                let left = deadline
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(500));
                let stream = banger_vmm::connect_agent(&h.agent, left)
                    .await
                    .map_err(|e| chain(&e))?;
                AgentClient::handshake(stream, left)
                    .await
                    .map_err(|e| chain(&e))
            };
            match attempt.await {
                Ok(c) => return Ok(c),
                Err(e) if Instant::now() < deadline && is_alive(h) => {
                    tracing::debug!(error = %e, "agent not ready yet");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(100));
                }
                Err(e) => {
                    let why = if is_alive(h) {
                        format!("no answer within {}s: {e}", timeout.as_secs())
                    } else {
                        "the VMM exited".into()
                    };
                    return Err(VmError::Unavailable(format!(
                        "VM {name:?}'s guest agent did not answer ({why}); see its console (banger vm logs {name}), and stop it by force if it stays so (banger vm stop {name})",
                        name = vm.name
                    )));
                }
            }
        }
    }

    /// The VM's agent connection, reconnecting if it dropped.
    async fn agent(&self, vm: &Vm) -> Result<AgentClient, VmError> {
        let h = self.running_handles(vm)?;
        if h.paused {
            return Err(VmError::Conflict(format!(
                "VM {:?} is paused: resume it with banger vm resume {}",
                vm.name, vm.name
            )));
        }
        let entry = self.entry(&vm.id);
        let mut slot = entry.agent.lock().await;
        if let Some(c) = slot.as_ref().filter(|c| !c.is_closed()) {
            return Ok(c.clone());
        }
        let c = self.connect_agent(vm, &h, AGENT_TIMEOUT).await?;
        *slot = Some(c.clone());
        Ok(c)
    }

    fn running_handles(&self, vm: &Vm) -> Result<Handles, VmError> {
        match (vm.state, self.handles(&vm.id)) {
            (VmState::Running, Some(h)) if is_alive(&h) => Ok(h),
            _ => Err(VmError::Conflict(format!(
                "VM {:?} is not running (state: {}): start it with banger vm start {}",
                vm.name, vm.state, vm.name
            ))),
        }
    }

    /// Stop the VMM (if any) and release everything the running VM held.
    async fn teardown(&self, vm: &Vm) {
        self.net.forwards().stop_vm(&vm.id);
        let entry = self.entry(&vm.id);
        *entry.agent.lock().await = None;
        let h = entry.state.lock().expect("vm state").handles.take();
        let h = h.or_else(|| Handles::load(&vm.vm_dir).ok().flatten());
        if let Some(h) = h {
            if let Err(e) = banger_vmm::stop(&h, Duration::from_secs(5)).await {
                warn!(vm = %vm.id, error = %chain(&e), "stopping the VMM");
            }
            if let Some(tap) = h.tap {
                self.net.release_tap(tap, vm.guest_ip).await;
            }
        } else if let Some(intent) = LaunchIntent::load(&vm.vm_dir) {
            // A start that never recorded its handles (cut short, or its
            // daemon killed): its VMM is found by its command line.
            let ended = intent.end_vmm(Duration::from_secs(5)).await;
            warn!(vm = %vm.id, pids = ?ended, "ended a VMM whose start never recorded its handles");
            if let Some(tap) = intent.tap {
                self.net.release_tap(tap, vm.guest_ip).await;
            }
        }
        LaunchIntent::remove(&vm.vm_dir);
        // After the VMM: it holds the snapshot open until it exits.
        disks::detach(&*self.helper, &OpId::mint(), &vm.id, &vm.vm_dir).await;
        Handles::remove(&vm.vm_dir);
        banger_vmm::remove_runtime_files(&vm.vm_dir);
    }
}

/// What VM operations can fail with.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    /// The VM is in the wrong state, or busy with another operation.
    #[error("{0}")]
    Conflict(String),
    /// Something the host or the guest cannot give now.
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Failed(String),
    #[error("cannot start VM {name:?}")]
    Launch {
        name: String,
        #[source]
        source: banger_vmm::VmmError,
    },
    #[error("guest agent")]
    Agent(#[from] banger_agent_proto::AgentError),
    #[error(transparent)]
    Store(#[from] banger_store::StoreError),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Network(#[from] NetworkError),
    #[error(transparent)]
    Helper(#[from] HelperError),
    #[error(transparent)]
    Forward(#[from] ForwardError),
    #[error(transparent)]
    Task(#[from] TaskFailed),
    #[error(transparent)]
    Secret(#[from] SecretError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gc_and_vm_operations_keep_apart() {
        let gate = SweepGate::default();
        let op = gate.enter().unwrap();
        let op2 = gate.enter().unwrap();
        assert!(gate.sweep().is_err(), "gc while operations run");
        drop(op);
        assert!(gate.sweep().is_err(), "one still runs");
        drop(op2);
        let sweeping = gate.sweep().unwrap();
        let err = gate.enter().unwrap_err().to_string();
        assert!(err.contains("gc is removing"), "{err}");
        assert!(gate.sweep().is_err(), "one gc at a time");
        drop(sweeping);
        let _op = gate.enter().unwrap();
    }
}
