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

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use banger_agent_proto::{
    AgentClient, ExecEvent as AgentExecEvent, ExecRequest, ExecSignaller, ExecStdin, ExitStatus,
};
use banger_host::{Accel, RootDiskStrategy};
use banger_rpc::{EventSink, RpcError};
use banger_store::{Image, InitMode, Store, Vm, VmState, Vmm};
use banger_vmm::firecracker::Firecracker;
use banger_vmm::qemu::{self, Qemu};
use banger_vmm::{DiskFormat, DiskSpec, Driver, Handles, LaunchSpec, NetSpec, is_alive};
use banger_wire::OpId;
use banger_wire::methods::{
    ExecEvent, ExecExit, VmCreateParams, VmExecParams, VmInfo, VmSetParams,
};
use base64::Engine as _;
use tracing::{info, warn};

use crate::disks;
use crate::errors::{chain, store_err};
use crate::forward::ForwardService;
use crate::helper::HelperLink;
use crate::images::{ImageService, new_id};
use crate::network::{GuestNet, NetworkService};
use crate::ops::{Operation, Operations};
use crate::ssh::SshKeys;

/// How long a booting guest may take to answer its agent (TCG is slow).
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
/// How long a running guest's agent may take to answer a reconnect.
const AGENT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a guest gets to power off before its VMM is stopped.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

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
}

/// How the accelerator is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccelPlan {
    /// Configured, or the only one the host offers.
    Fixed(Accel),
    /// `accel = "auto"` and KVM looks usable: the first boot confirms it
    /// with a test boot of the image's kernel (cached per host boot), and
    /// uses TCG if KVM cannot run it.
    ProbeKvm,
}

/// How long the KVM test boot may take (hardware KVM: about a second).
const KVM_PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the test seam does after its step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// One of [`CREATE_STEPS`] or `delete` (the row is marked deleting).
    pub step: &'static str,
    /// Pause for [`FAULT_PAUSE`] and go on, instead of failing: time for a
    /// test to kill -9 the daemon or the helper at a known point.
    pub pause: bool,
}

/// How long a paused step waits.
pub const FAULT_PAUSE: Duration = Duration::from_secs(4);

/// The steps of creating (and starting) a VM, in order; also the stage
/// names the CLI shows.
pub const CREATE_STEPS: [&str; 8] = [
    "image",
    "allocate",
    "disks",
    "network",
    "vmm start",
    "kernel boot",
    "agent ready",
    "ssh ready",
];

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
}

#[derive(Debug, Default)]
struct VmEntry {
    state: Mutex<EntryState>,
    agent: tokio::sync::Mutex<Option<AgentClient>>,
}

#[derive(Debug, Default)]
struct EntryState {
    handles: Option<Handles>,
    /// The operation working on this VM right now.
    busy: Option<(OpId, &'static str)>,
}

#[derive(Debug)]
struct ExecControl {
    stdin: Option<tokio::sync::mpsc::Sender<(Vec<u8>, bool)>>,
    signaller: ExecSignaller,
}

/// Clears the VM's busy mark when the operation ends, however it ends.
struct Busy(Arc<VmEntry>);
impl Drop for Busy {
    fn drop(&mut self) {
        self.0.state.lock().expect("vm state").busy = None;
    }
}

fn valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 40
        && b[0].is_ascii_lowercase()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && !name.ends_with('-')
}

/// Smallest and largest sizes a VM may have, for `vm create` and `vm set` alike.
const MIN_MEMORY_MIB: u32 = 128;
const MAX_VCPUS: u32 = 255;
const MIN_DISK_MIB: u32 = 64;

fn check_resources(vcpus: Option<u32>, memory_mib: Option<u32>) -> Result<(), RpcError> {
    if let Some(n) = vcpus
        && !(1..=MAX_VCPUS).contains(&n)
    {
        return Err(RpcError::invalid_params(format!(
            "{n} vCPUs: a VM has from 1 to {MAX_VCPUS} vCPUs"
        )));
    }
    if let Some(m) = memory_mib
        && m < MIN_MEMORY_MIB
    {
        return Err(RpcError::invalid_params(format!(
            "{m} MiB of memory is too little: a VM needs at least {MIN_MEMORY_MIB} MiB"
        )));
    }
    Ok(())
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
        }
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
    fn claim(&self, vm: &Vm, op: &OpId, what: &'static str) -> Result<Busy, RpcError> {
        let entry = self.entry(&vm.id);
        let mut st = entry.state.lock().expect("vm state");
        if let Some((other, doing)) = &st.busy {
            return Err(RpcError::conflict(format!(
                "VM {:?} is busy: {doing} in progress ({other})",
                vm.name
            )));
        }
        st.busy = Some((op.clone(), what));
        drop(st);
        Ok(Busy(entry))
    }

    pub(crate) fn store_handle(&self) -> &Store {
        &self.store
    }
    pub(crate) fn vms_dir(&self) -> &Path {
        &self.vms_dir
    }
    pub(crate) fn network(&self) -> &NetworkService {
        &self.net
    }
    pub(crate) fn helper(&self) -> &HelperLink {
        &self.helper
    }
    pub(crate) fn current_handles(&self, id: &str) -> Option<Handles> {
        self.handles(id)
    }
    pub(crate) fn is_busy(&self, id: &str) -> bool {
        self.entries
            .lock()
            .expect("entries")
            .get(id)
            .is_some_and(|e| e.state.lock().expect("vm state").busy.is_some())
    }
    pub(crate) fn any_busy(&self) -> bool {
        self.entries
            .lock()
            .expect("entries")
            .values()
            .any(|e| e.state.lock().expect("vm state").busy.is_some())
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
            state: vm.state.to_string(),
            image,
            vmm: vm.vmm.to_string(),
            init: vm.init_mode.to_string(),
            vcpus: vm.vcpus,
            memory_mib: vm.memory_mib,
            disk_mib: vm.disk_mib,
            guest_ip: vm.guest_ip.map(|i| i.to_string()),
            mac: vm.mac.clone(),
            vsock_cid: vm.vsock_cid,
            dns_name: vm.guest_ip.map(|_| self.net.dns().names().fqdn(&vm.name)),
            pid: h.as_ref().map(|h| h.pid),
            tap: h.and_then(|h| h.tap),
            vm_dir: vm.vm_dir.display().to_string(),
            console_log: vm.vm_dir.join("console.log").display().to_string(),
            last_error: vm.last_error.clone(),
            created_at_ms: vm.created_at,
            port_forwards: self.net.forwards().list(Some(vm)).unwrap_or_default(),
        }
    }

    pub fn find(&self, name: &str) -> Result<Vm, RpcError> {
        self.store.find_vm(name).map_err(store_err)
    }

    pub fn list(&self) -> Result<Vec<VmInfo>, RpcError> {
        Ok(self
            .store
            .list_vms()
            .map_err(store_err)?
            .iter()
            .map(|v| self.info(v))
            .collect())
    }

    // -- create ---------------------------------------------------------------

    /// Create and boot a VM as operation `op_id`. The work runs as a daemon
    /// task: if the caller goes away, the VM is still finished or rolled back.
    pub async fn create(
        self: &Arc<Self>,
        op_id: &OpId,
        params: VmCreateParams,
        events: &EventSink,
    ) -> Result<VmInfo, RpcError> {
        let name = match params.name.clone() {
            Some(n) if valid_name(&n) => n,
            Some(n) => {
                return Err(RpcError::invalid_params(format!(
                    "VM name {n:?} is invalid: use 1-40 lowercase letters, digits and '-', starting with a letter"
                )));
            }
            None => format!("vm-{}", &new_id()[..6]),
        };
        let vmm = self.requested_vmm(params.vmm.as_deref())?;
        // Before any work: a bad size must not set up a bridge first.
        check_resources(params.vcpus, params.memory_mib)?;
        if let Some(d) = params.disk_mib
            && d < MIN_DISK_MIB
        {
            return Err(RpcError::invalid_params(format!(
                "a work disk of {d} MiB is too small: give at least {MIN_DISK_MIB} MiB"
            )));
        }
        if let Some(w) = params.wait.as_deref()
            && w != "agent"
            && w != "ssh"
        {
            return Err(RpcError::invalid_params(format!(
                "wait {w:?} is not one of agent, ssh"
            )));
        }
        let op = self.ops.begin(op_id, "vm_create", &name);
        let this = self.clone();
        let task_op = op.clone();
        let task = tokio::spawn(async move {
            let result = this.create_inner(&task_op, name, vmm, params).await;
            task_op.finish(result.as_ref().map(|_| ()).map_err(|e| e.message.clone()));
            result
        });
        op.follow(events).await;
        task.await
            .map_err(|e| RpcError::internal(format!("create task failed: {e}")))?
    }

    /// The VMM the caller asked for, if any.
    fn requested_vmm(&self, asked: Option<&str>) -> Result<Option<Vmm>, RpcError> {
        match asked {
            None => Ok(None),
            Some("qemu") => Ok(Some(Vmm::Qemu)),
            Some("firecracker") if self.settings.firecracker.is_some() => {
                Ok(Some(Vmm::Firecracker))
            }
            Some("firecracker") => Err(RpcError::unavailable(
                "firecracker was not found (set [vmm] firecracker_bin, see banger doctor)",
            )),
            Some(other) => Err(RpcError::invalid_params(format!(
                "VMM {other:?} is not one of qemu, firecracker"
            ))),
        }
    }

    /// The accelerator, settled by a test boot of `image`'s kernel the first
    /// time KVM needs confirming.
    async fn accel(&self, image: &Image) -> Accel {
        let AccelPlan::Fixed(accel) = self.settings.accel else {
            return *self.accel.get_or_init(|| self.probe_kvm(image)).await;
        };
        accel
    }

    /// At daemon start: run the KVM test boot in the background when it is
    /// due and the default image is there to boot (else the first create
    /// runs it).
    pub async fn settle_accel(self: Arc<Self>) {
        if self.settings.accel != AccelPlan::ProbeKvm {
            return;
        }
        if let Ok(Some(image)) = self.store.default_image()
            && image.state == banger_store::ImageState::Ready
        {
            self.accel(&image).await;
        }
    }

    async fn probe_kvm(&self, image: &Image) -> Accel {
        if let Some(p) = banger_host::KvmProbe::load(&self.state_dir) {
            info!(usable = p.usable, detail = %p.detail, "KVM test boot (cached for this host boot)");
            return if p.usable { Accel::Kvm } else { Accel::Tcg };
        }
        let kernel = image.vmlinux_path.as_ref().unwrap_or(&image.kernel_path);
        let result = qemu::probe_boot(
            &self.settings.qemu.bin,
            Accel::Kvm,
            kernel,
            image.initrd_path.as_deref(),
            &self.state_dir.join("kvm-probe"),
            KVM_PROBE_TIMEOUT,
        )
        .await;
        let probe = banger_host::KvmProbe {
            boot_id: banger_host::current_boot_id().unwrap_or_default(),
            usable: result.is_ok(),
            detail: match &result {
                Ok(took) => format!("booted to userspace in {:.2}s", took.as_secs_f64()),
                Err(why) => why.clone(),
            },
        };
        match &result {
            Ok(_) => info!(detail = %probe.detail, "KVM test boot: using KVM"),
            Err(why) => warn!(why = %why, "KVM cannot run a stock kernel here; using TCG"),
        }
        let _ = std::fs::remove_dir(self.state_dir.join("kvm-probe"));
        if let Err(e) = probe.save(&self.state_dir) {
            warn!(error = %e, "cannot cache the KVM test boot");
        }
        if probe.usable { Accel::Kvm } else { Accel::Tcg }
    }

    /// The injected failure (or pause) after `step`, if the test seam asks
    /// for one.
    async fn inject_fault(&self, step: &str) -> Result<(), RpcError> {
        match self.settings.fault {
            Some(f) if f.step == step && f.pause => {
                warn!(step, "fault injection: pausing after this step");
                tokio::time::sleep(FAULT_PAUSE).await;
                Ok(())
            }
            Some(f) if f.step == step => Err(RpcError::internal(format!(
                "injected fault after the {step} step (BANGER_FAULT_INJECT)"
            ))),
            _ => Ok(()),
        }
    }

    /// The root disk of a new VM: a device-mapper snapshot where the host
    /// and helper can make them, else a reflink clone where the state
    /// directory has them (both raw); else a qcow2 overlay for QEMU and a
    /// sparse copy for Firecracker, which takes raw disks only.
    fn new_root_disk(&self, vmm: Vmm) -> RootDisk {
        match (self.settings.root_disks, vmm) {
            (RootDiskStrategy::DmSnapshot, _) => RootDisk::Snapshot,
            (RootDiskStrategy::Reflink, _) | (_, Vmm::Firecracker) => RootDisk::Copy,
            (RootDiskStrategy::OverlayOrCopy, Vmm::Qemu) => RootDisk::Qcow2,
        }
    }

    fn driver(&self, vmm: Vmm) -> Result<Driver, RpcError> {
        match vmm {
            Vmm::Qemu => Ok(Driver::Qemu(self.settings.qemu.clone())),
            Vmm::Firecracker => self
                .settings
                .firecracker
                .clone()
                .map(Driver::Firecracker)
                .ok_or_else(|| {
                    RpcError::unavailable(
                        "this VM uses firecracker, which is not found any more (see banger doctor)",
                    )
                }),
        }
    }

    async fn create_inner(
        &self,
        op: &Operation,
        name: String,
        vmm: Option<Vmm>,
        params: VmCreateParams,
    ) -> Result<VmInfo, RpcError> {
        let image = self.images.resolve(params.image.as_deref(), op).await?;
        self.inject_fault("image").await?;
        // Not asked: Firecracker where it can run (found, and KVM usable), else QEMU.
        let vmm = match vmm {
            Some(v) => v,
            None if self.settings.firecracker.is_some()
                && self.accel(&image).await == Accel::Kvm =>
            {
                Vmm::Firecracker
            }
            None => Vmm::Qemu,
        };
        op.stage("allocate");
        let init_mode = match params.init.as_deref() {
            None => image.default_init,
            Some(s) => s
                .parse::<InitMode>()
                .map_err(|e| RpcError::invalid_params(e.to_string()))?,
        };
        let gnet = self.net.guest_net(&op.op_id, &self.taps_in_use()).await?;
        // Host ports first: a taken one fails the create before anything exists.
        self.net
            .forwards()
            .check_free(&ForwardService::rows("", &params.ports)?)?;
        let mut vm = self.insert_new_vm(&name, &image, vmm, init_mode, &params, gnet)?;
        let id = vm.id.clone();
        let _busy = self.claim(&vm, &op.op_id, "create")?;
        if let Some(ip) = vm.guest_ip {
            self.net.dns().names().insert(&name, ip);
        }
        info!(vm = %id, name = %name, ip = ?vm.guest_ip, "creating VM");
        let wait_ssh = params.wait.as_deref() != Some("agent");
        let booted = async {
            let forwards = ForwardService::rows(&id, &params.ports)?;
            self.net.forwards().add(&vm, forwards).await?;
            self.provision_and_boot(op, &vm, &image, gnet, wait_ssh)
                .await
        };
        match booted.await {
            Ok(()) => {
                self.store
                    .update_vm_state(&id, VmState::Running, None)
                    .map_err(store_err)?;
                let _ = self.store.touch_vm_last_used(&id);
                vm = self.find(&id)?;
                self.net.forwards().start_vm(&vm).await;
                Ok(self.info(&vm))
            }
            Err(e) => {
                self.net.forwards().forget_vm(&id);
                self.net.dns().names().remove(&name);
                warn!(vm = %id, error = %e.message, "create failed; rolling back");
                self.teardown(&vm).await;
                let _ = std::fs::remove_dir_all(&vm.vm_dir);
                // The row stays as a record of what failed; it owns nothing now.
                let _ = self
                    .store
                    .update_vm_state(&id, VmState::Failed, Some(&e.message));
                Err(e)
            }
        }
    }

    /// Insert the VM's row with a fresh IP and MAC. The row is the lease:
    /// the UNIQUE columns make a concurrent create that picked the same
    /// address fail here, and it then picks again.
    fn insert_new_vm(
        &self,
        name: &str,
        image: &Image,
        vmm: Vmm,
        init_mode: InitMode,
        params: &VmCreateParams,
        gnet: GuestNet,
    ) -> Result<Vm, RpcError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let id = new_id();
            let lease = |what: &str, e: banger_net::AllocError| {
                RpcError::conflict(format!("cannot lease a {what}: {e}"))
            };
            let ip = banger_net::next_guest_ip(
                gnet.subnet,
                &self.store.used_guest_ips().map_err(store_err)?,
            )
            .map_err(|e| lease("guest address", e))?;
            let mac = banger_net::mac_for(&id, &self.store.used_macs().map_err(store_err)?)
                .map_err(|e| lease("MAC address", e))?;
            // Firecracker's hybrid vsock needs a CID, and so does QEMU's
            // vhost-vsock; without vhost-vsock, QEMU's agent rides virtio-serial.
            let cid = match (vmm, self.settings.vhost_vsock) {
                (Vmm::Firecracker, _) | (Vmm::Qemu, true) => Some(
                    banger_net::next_vsock_cid(&self.store.used_cids().map_err(store_err)?)
                        .map_err(|e| lease("vsock CID", e))?,
                ),
                (Vmm::Qemu, false) => None,
            };
            let vm_dir = self.vms_dir.join(&id);
            let control = match vmm {
                Vmm::Qemu => qemu::control_socket(&vm_dir),
                Vmm::Firecracker => banger_vmm::firecracker::api_socket(&vm_dir),
            };
            let vm = Vm {
                id,
                name: name.to_string(),
                image_id: image.id.clone(),
                vmm,
                init_mode,
                vcpus: params.vcpus.unwrap_or(DEFAULT_VCPUS),
                memory_mib: params.memory_mib.unwrap_or(DEFAULT_MEMORY_MIB),
                disk_mib: params.disk_mib.unwrap_or(DEFAULT_DISK_MIB),
                state: VmState::Creating,
                guest_ip: Some(ip),
                mac: Some(mac),
                vsock_cid: cid,
                dns_name: None,
                api_socket: Some(control),
                console_log: Some(vm_dir.join("console.log")),
                vm_dir,
                last_error: None,
                created_at: banger_store::now_ms(),
                last_used_at: None,
                labels: Default::default(),
            };
            match self.store.insert_vm(&vm) {
                Ok(()) => return Ok(vm),
                // A concurrent create leased the same address first: pick again.
                Err(banger_store::StoreError::Conflict(_)) if attempt < 5 => continue,
                Err(e) => return Err(store_err(e)),
            }
        }
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

    async fn provision_and_boot(
        &self,
        op: &Operation,
        vm: &Vm,
        image: &Image,
        gnet: GuestNet,
        wait_ssh: bool,
    ) -> Result<(), RpcError> {
        self.inject_fault("allocate").await?;
        op.stage("disks");
        let root = self.new_root_disk(vm.vmm);
        make_disks(vm, image, root, &self.helper, &op.op_id).await?;
        self.inject_fault("disks").await?;
        self.boot(op, vm, image, gnet, wait_ssh).await
    }

    /// Start the VMM for an existing VM dir and wait for its agent (and sshd).
    async fn boot(
        &self,
        op: &Operation,
        vm: &Vm,
        image: &Image,
        gnet: GuestNet,
        wait_ssh: bool,
    ) -> Result<(), RpcError> {
        let driver = self.driver(vm.vmm)?;
        op.stage("network");
        let tap = self.net.acquire_tap(&op.op_id, &self.taps_in_use()).await?;
        let launched = match self.inject_fault("network").await {
            Ok(()) => {
                op.stage("vmm start");
                let accel = self.accel(image).await;
                let root = existing_root_disk(&vm.vm_dir);
                let spec = self.launch_spec(vm, image, gnet, &tap, root, accel);
                driver.launch(&spec).await.map_err(|e| {
                    RpcError::internal(format!("cannot start VM {:?}: {}", vm.name, chain(&e)))
                })
            }
            Err(e) => Err(e),
        };
        let handles = match launched {
            Ok(h) => h,
            Err(e) => {
                self.net.release_tap(tap).await;
                return Err(e);
            }
        };
        // From here on the handles own the tap: teardown releases it.
        self.entry(&vm.id).state.lock().expect("vm state").handles = Some(handles.clone());
        handles
            .save(&vm.vm_dir)
            .map_err(|e| RpcError::internal(chain(&e)))?;
        self.inject_fault("vmm start").await?;
        op.stage("kernel boot");
        let booted = Instant::now();
        // The console marker ends "kernel boot"; an agent that answers first
        // (a console we cannot read) ends it too.
        let agent = self.connect_agent(&handles, BOOT_TIMEOUT);
        tokio::pin!(agent);
        let client = tokio::select! {
            seen = wait_console(&handles, "banger-initramfs: switching root", BOOT_TIMEOUT) => {
                seen?;
                op.stage("agent ready");
                agent.await?
            }
            answered = &mut agent => {
                op.stage("agent ready");
                answered?
            }
        };
        self.inject_fault("kernel boot").await?;
        client
            .authorize_keys(self.ssh.authorized_keys())
            .await
            .map_err(|e| {
                RpcError::internal(format!(
                    "cannot authorize SSH keys in the guest: {}",
                    chain(&e)
                ))
            })?;
        *self.entry(&vm.id).agent.lock().await = Some(client);
        self.inject_fault("agent ready").await?;
        // Images pulled or imported without an sshd have none to wait for.
        if let (true, Some(ip)) = (wait_ssh && self.images.has_sshd(image), vm.guest_ip) {
            op.stage("ssh ready");
            wait_ssh_banner(&handles, ip, BOOT_TIMEOUT.saturating_sub(booted.elapsed())).await?;
            self.inject_fault("ssh ready").await?;
        }
        Ok(())
    }

    /// Push the authorized SSH keys (banger's and the user's) to a running guest again.
    pub async fn authsync(&self, name: &str) -> Result<usize, RpcError> {
        let vm = self.find(name)?;
        let keys = self.ssh.authorized_keys();
        let n = keys.len();
        self.agent(&vm)
            .await?
            .authorize_keys(keys)
            .await
            .map_err(agent_err)?;
        Ok(n)
    }

    fn launch_spec(
        &self,
        vm: &Vm,
        image: &Image,
        gnet: GuestNet,
        tap: &str,
        root: RootDisk,
        accel: Accel,
    ) -> LaunchSpec {
        // A QEMU VM made where vhost-vsock was usable keeps its CID, but
        // uses it only while vhost-vsock is usable.
        let vsock_cid = match vm.vmm {
            Vmm::Firecracker => vm.vsock_cid,
            Vmm::Qemu => vm.vsock_cid.filter(|_| self.settings.vhost_vsock),
        };
        let mut cmdline = vec![
            "console=ttyS0".to_string(),
            "root=LABEL=rootfs".into(),
            "rw".into(),
            "quiet".into(),
            "panic=-1".into(),
            init_arg(vm.init_mode).into(),
            match (vm.vmm, vsock_cid) {
                (Vmm::Qemu, None) => "banger.channel=serial".into(),
                (Vmm::Qemu, Some(_)) => "banger.channel=vsock".into(),
                // Firecracker exits when its guest resets: power off by rebooting.
                (Vmm::Firecracker, _) => {
                    "banger.channel=vsock banger.halt=reboot reboot=k pci=off".into()
                }
            },
        ];
        if let Some(ip) = vm.guest_ip {
            // The standard ip= argument; the agent (fast init) and systemd-networkd both read it.
            cmdline.push(format!(
                "ip={ip}::{}:{}:{}:eth0:off",
                gnet.gateway,
                gnet.subnet.netmask(),
                vm.name
            ));
        }
        let nameservers = self.net.dns().guest_nameservers();
        if !nameservers.is_empty() {
            // Read by the agent (fast init) and the image's banger-dns unit (systemd).
            let list: Vec<String> = nameservers.iter().map(|n| n.to_string()).collect();
            cmdline.push(format!("banger.dns={}", list.join(",")));
        }
        if vm.vmm == Vmm::Qemu && accel == Accel::Tcg {
            // microvm under TCG may hang calibrating the TSC against a PIT it lacks.
            if let Some(khz) = banger_host::tsc_khz() {
                cmdline.push(format!("tsc_early_khz={khz}"));
            }
        }
        LaunchSpec {
            id: vm.id.clone(),
            name: vm.name.clone(),
            dir: vm.vm_dir.clone(),
            vcpus: vm.vcpus,
            memory_mib: vm.memory_mib,
            accel,
            kernel: image
                .vmlinux_path
                .clone()
                .unwrap_or_else(|| image.kernel_path.clone()),
            initrd: image.initrd_path.clone(),
            cmdline: cmdline.join(" "),
            disks: vec![
                root_disk_spec(&vm.id, &vm.vm_dir, root),
                DiskSpec {
                    path: vm.vm_dir.join("work.ext4"),
                    format: DiskFormat::Raw,
                    read_only: false,
                },
            ],
            net: vm.mac.clone().map(|mac| NetSpec {
                tap: tap.to_string(),
                mac,
            }),
            vsock_cid,
        }
    }

    async fn connect_agent(&self, h: &Handles, timeout: Duration) -> Result<AgentClient, RpcError> {
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
                    return Err(RpcError::unavailable(format!(
                        "the guest agent is not reachable ({why}); see the console log {}",
                        h.console_log.display()
                    )));
                }
            }
        }
    }

    /// The VM's agent connection, reconnecting if it dropped.
    async fn agent(&self, vm: &Vm) -> Result<AgentClient, RpcError> {
        let h = self.running_handles(vm)?;
        let entry = self.entry(&vm.id);
        let mut slot = entry.agent.lock().await;
        if let Some(c) = slot.as_ref().filter(|c| !c.is_closed()) {
            return Ok(c.clone());
        }
        let c = self.connect_agent(&h, AGENT_TIMEOUT).await?;
        *slot = Some(c.clone());
        Ok(c)
    }

    fn running_handles(&self, vm: &Vm) -> Result<Handles, RpcError> {
        match (vm.state, self.handles(&vm.id)) {
            (VmState::Running, Some(h)) if is_alive(&h) => Ok(h),
            _ => Err(RpcError::conflict(format!(
                "VM {:?} is not running (state: {})",
                vm.name, vm.state
            ))),
        }
    }

    // -- start / stop / delete -------------------------------------------------

    pub async fn start(
        &self,
        op_id: &OpId,
        name: &str,
        wait_ssh: bool,
        events: &EventSink,
    ) -> Result<VmInfo, RpcError> {
        let vm = self.find(name)?;
        if vm.state != VmState::Stopped {
            return Err(RpcError::conflict(format!(
                "VM {:?} is {}; only a stopped VM can be started",
                vm.name, vm.state
            )));
        }
        let _busy = self.claim(&vm, op_id, "start")?;
        let image = self.store.image_by_id(&vm.image_id).map_err(store_err)?;
        let op = self.ops.begin(op_id, "vm_start", &vm.name);
        let forward = op.follow(events);
        let work = async {
            let r = async {
                let gnet = self.net.guest_net(&op.op_id, &self.taps_in_use()).await?;
                // A snapshot VM's dm device went with its stop: build it
                // again over the same root.cow.
                if existing_root_disk(&vm.vm_dir) == RootDisk::Snapshot {
                    op.stage("disks");
                    let h = &*self.helper;
                    disks::attach(h, &op.op_id, &vm.id, &vm.vm_dir, &image.rootfs_path).await?;
                    self.inject_fault("disks").await?;
                }
                self.boot(&op, &vm, &image, gnet, wait_ssh).await
            }
            .await;
            op.finish(r.as_ref().map(|_| ()).map_err(|e| e.message.clone()));
            r
        };
        let (r, ()) = tokio::join!(work, forward);
        match r {
            Ok(()) => {
                self.store
                    .update_vm_state(&vm.id, VmState::Running, None)
                    .map_err(store_err)?;
                let _ = self.store.touch_vm_last_used(&vm.id);
                self.net.forwards().start_vm(&vm).await;
            }
            Err(e) => {
                self.teardown(&vm).await;
                let _ = self
                    .store
                    .update_vm_state(&vm.id, VmState::Stopped, Some(&e.message));
                return Err(e);
            }
        }
        Ok(self.info(&self.find(&vm.id)?))
    }

    pub async fn stop(&self, op_id: &OpId, name: &str) -> Result<VmInfo, RpcError> {
        let vm = self.find(name)?;
        if vm.state != VmState::Running {
            return Err(RpcError::conflict(format!(
                "VM {:?} is {}; only a running VM can be stopped",
                vm.name, vm.state
            )));
        }
        let _busy = self.claim(&vm, op_id, "stop")?;
        self.shutdown_guest(&vm).await;
        self.teardown(&vm).await;
        self.store
            .update_vm_state(&vm.id, VmState::Stopped, None)
            .map_err(store_err)?;
        Ok(self.info(&self.find(&vm.id)?))
    }

    /// Ask the guest to power off and wait a little for it.
    async fn shutdown_guest(&self, vm: &Vm) {
        // Firecracker's own stop is the graceful one (Ctrl-Alt-Del to the guest).
        if vm.vmm == Vmm::Firecracker {
            return;
        }
        let Some(h) = self.handles(&vm.id) else {
            return;
        };
        if !is_alive(&h) {
            return;
        }
        match tokio::time::timeout(Duration::from_secs(3), self.agent(vm)).await {
            Ok(Ok(agent)) => {
                if let Err(e) = agent.shutdown().await {
                    warn!(vm = %vm.id, error = %chain(&e), "guest shutdown request failed");
                }
                qemu::wait_dead(&h, SHUTDOWN_GRACE).await;
            }
            _ => warn!(vm = %vm.id, "agent unreachable; stopping the VMM without a guest shutdown"),
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
                self.net.release_tap(tap).await;
            }
        }
        // After the VMM: it holds the snapshot open until it exits.
        disks::detach(&*self.helper, &OpId::mint(), &vm.id, &vm.vm_dir).await;
        Handles::remove(&vm.vm_dir);
        for sock in [
            "qmp.sock",
            "agent.sock",
            "qemu.pid",
            "firecracker.sock",
            "vsock.sock",
        ] {
            let _ = std::fs::remove_file(vm.vm_dir.join(sock));
        }
    }

    pub async fn delete(&self, op_id: &OpId, name: &str, force: bool) -> Result<String, RpcError> {
        let vm = self.find(name)?;
        let running =
            vm.state == VmState::Running && self.handles(&vm.id).is_some_and(|h| is_alive(&h));
        if running && !force {
            return Err(RpcError::conflict(format!(
                "VM {:?} is running; stop it first or pass --force",
                vm.name
            )));
        }
        let _busy = self.claim(&vm, op_id, "delete")?;
        self.store
            .update_vm_state(&vm.id, VmState::Deleting, None)
            .map_err(store_err)?;
        self.inject_fault("delete").await?;
        self.teardown(&vm).await;
        if let Err(e) = std::fs::remove_dir_all(&vm.vm_dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            let msg = format!("cannot remove {}: {e}", vm.vm_dir.display());
            let _ = self
                .store
                .update_vm_state(&vm.id, VmState::Failed, Some(&msg));
            return Err(RpcError::internal(msg));
        }
        self.store.delete_vm(&vm.id).map_err(store_err)?;
        self.net.dns().names().remove(&vm.name);
        self.entries.lock().expect("entries").remove(&vm.id);
        info!(vm = %vm.id, name = %vm.name, "VM deleted");
        Ok(vm.name)
    }

    /// Resize a VM. vCPUs, memory and disk are fixed while the VMM runs, so
    /// the VM must be stopped; the work disk only grows (its filesystem is
    /// grown with it).
    pub async fn set(&self, op_id: &OpId, p: VmSetParams) -> Result<VmInfo, RpcError> {
        let vm = self.find(&p.name)?;
        if p.vcpus.is_none() && p.memory_mib.is_none() && p.disk_mib.is_none() {
            return Err(RpcError::invalid_params(
                "nothing to change: give --vcpus, --memory or --disk",
            ));
        }
        if vm.state != VmState::Stopped {
            return Err(RpcError::conflict(format!(
                "VM {:?} is {}; stop it first (banger vm stop {}): vCPUs, memory and disk change only while stopped",
                vm.name, vm.state, vm.name
            )));
        }
        check_resources(p.vcpus, p.memory_mib)?;
        if let Some(d) = p.disk_mib
            && d < vm.disk_mib
        {
            return Err(RpcError::invalid_params(format!(
                "the work disk only grows: {} MiB is less than its current {} MiB",
                d, vm.disk_mib
            )));
        }
        let _busy = self.claim(&vm, op_id, "set")?;
        if let Some(d) = p.disk_mib.filter(|d| *d > vm.disk_mib) {
            grow_disk(&vm.vm_dir.join("work.ext4"), d).await?;
        }
        let updated = self
            .store
            .update_vm_resources(
                &vm.id,
                banger_store::ResourceUpdate {
                    vcpus: p.vcpus,
                    memory_mib: p.memory_mib,
                    disk_mib: p.disk_mib,
                },
            )
            .map_err(store_err)?;
        Ok(self.info(&updated))
    }

    // -- guest I/O ---------------------------------------------------------------

    pub async fn ports(&self, name: &str) -> Result<serde_json::Value, RpcError> {
        let vm = self.find(name)?;
        let r = self.agent(&vm).await?.ports().await.map_err(agent_err)?;
        serde_json::to_value(r).map_err(|e| RpcError::internal(e.to_string()))
    }

    pub async fn stats(&self, name: &str) -> Result<banger_agent_proto::Stats, RpcError> {
        let vm = self.find(name)?;
        self.agent(&vm).await?.stats().await.map_err(agent_err)
    }

    /// Run a command in the guest, streaming its output as events.
    pub async fn exec(
        &self,
        params: VmExecParams,
        events: &EventSink,
    ) -> Result<ExecExit, RpcError> {
        if params.argv.is_empty() {
            return Err(RpcError::invalid_params("no command given"));
        }
        let vm = self.find(&params.name)?;
        let agent = self.agent(&vm).await?;
        let _ = self.store.touch_vm_last_used(&vm.id);
        let mut req = ExecRequest::new(params.argv.clone());
        req.env = params.env;
        req.cwd = params.cwd;
        req.stdin = params.stdin;
        let mut session = agent.exec(req).await.map_err(agent_err)?;
        let session_id = new_id();
        let stdin_tx = session.take_stdin().map(|stdin| {
            let (tx, rx) = tokio::sync::mpsc::channel(16);
            tokio::spawn(pump_stdin(stdin, rx));
            tx
        });
        self.sessions.lock().expect("sessions").insert(
            session_id.clone(),
            ExecControl {
                stdin: stdin_tx,
                signaller: session.signaller(),
            },
        );
        let _cleanup = SessionGuard {
            sessions: &self.sessions,
            id: session_id.clone(),
        };
        events
            .send(&ExecEvent::Started {
                session: session_id,
            })
            .await;
        let b64 = base64::engine::general_purpose::STANDARD;
        loop {
            match session.next_event().await.map_err(agent_err)? {
                Some(AgentExecEvent::Stdout(data)) => {
                    events.send(&ExecEvent::Stdout(b64.encode(&data))).await
                }
                Some(AgentExecEvent::Stderr(data)) => {
                    events.send(&ExecEvent::Stderr(b64.encode(&data))).await
                }
                Some(AgentExecEvent::Exit(status)) => return Ok(exec_exit(status)),
                None => {
                    return match session.exit_status() {
                        Some(status) => Ok(exec_exit(status)),
                        None => Err(RpcError::unavailable(format!(
                            "lost the connection to VM {:?}'s agent",
                            vm.name
                        ))),
                    };
                }
            }
        }
    }

    pub async fn exec_input(
        &self,
        session: &str,
        data: Option<&str>,
        eof: bool,
    ) -> Result<(), RpcError> {
        let tx = {
            let sessions = self.sessions.lock().expect("sessions");
            let ctl = sessions
                .get(session)
                .ok_or_else(|| RpcError::not_found(format!("no exec session {session:?}")))?;
            ctl.stdin
                .clone()
                .ok_or_else(|| RpcError::conflict("that session was started without stdin"))?
        };
        let bytes = match data {
            Some(d) => base64::engine::general_purpose::STANDARD
                .decode(d)
                .map_err(|e| RpcError::invalid_params(format!("data is not base64: {e}")))?,
            None => Vec::new(),
        };
        tx.send((bytes, eof))
            .await
            .map_err(|_| RpcError::conflict("the command's stdin is closed"))
    }

    pub fn exec_signal(&self, session: &str, signal: i32) -> Result<(), RpcError> {
        let sessions = self.sessions.lock().expect("sessions");
        let ctl = sessions
            .get(session)
            .ok_or_else(|| RpcError::not_found(format!("no exec session {session:?}")))?;
        ctl.signaller.signal(signal).map_err(agent_err)
    }

    // -- reconcile -----------------------------------------------------------------

    /// At daemon start: find running VMs again, clean up after dead ones,
    /// and finish operations a killed daemon left half done.
    pub async fn reconcile(&self) {
        let vms = match self.store.list_vms() {
            Ok(v) => v,
            Err(e) => {
                warn!(error = %e, "reconcile: cannot list VMs");
                return;
            }
        };
        for vm in vms {
            match vm.state {
                VmState::Running => match Handles::load(&vm.vm_dir) {
                    Ok(Some(h)) if is_alive(&h) => {
                        info!(vm = %vm.id, pid = h.pid, "reconcile: VM still running");
                        self.entry(&vm.id).state.lock().expect("vm state").handles = Some(h);
                        self.net.forwards().start_vm(&vm).await;
                    }
                    found => {
                        let why = match found {
                            Ok(Some(h)) => format!(
                                "its VMM (pid {}) exited while the daemon was not watching",
                                h.pid
                            ),
                            Ok(None) => {
                                "it had no handles.json (the daemon died while starting it)"
                                    .to_string()
                            }
                            Err(e) => format!("its handles.json is unreadable: {}", chain(&e)),
                        };
                        self.mark_dead(&vm, &why).await;
                    }
                },
                VmState::Creating => {
                    let why = "the daemon stopped while creating it";
                    warn!(vm = %vm.id, "reconcile: rolling back an unfinished create");
                    self.teardown(&vm).await;
                    self.net.forwards().forget_vm(&vm.id);
                    let _ = std::fs::remove_dir_all(&vm.vm_dir);
                    let _ = self
                        .store
                        .update_vm_state(&vm.id, VmState::Failed, Some(why));
                }
                VmState::Deleting => {
                    warn!(vm = %vm.id, "reconcile: finishing an unfinished delete");
                    self.teardown(&vm).await;
                    let _ = std::fs::remove_dir_all(&vm.vm_dir);
                    let _ = self.store.delete_vm(&vm.id);
                }
                VmState::Stopped | VmState::Failed => {}
            }
        }
        self.net
            .dns()
            .names()
            .rebuild(&self.store.list_vms().unwrap_or_default());
        // Guests still running use the bridge address for DNS: serve it again.
        let in_use = self.taps_in_use();
        if !in_use.is_empty()
            && let Err(e) = self.net.guest_net(&OpId::mint(), &in_use).await
        {
            warn!(error = %e.message, "reconcile: cannot set up the guest network again");
        }
    }

    async fn mark_dead(&self, vm: &Vm, why: &str) {
        warn!(vm = %vm.id, name = %vm.name, reason = why, "VM is not running any more");
        self.teardown(vm).await;
        let _ = self
            .store
            .update_vm_state(&vm.id, VmState::Stopped, Some(why));
    }

    /// Notice VMMs that die while the daemon runs (a crash, a kill -9) and
    /// mark their VMs stopped with the reason, freeing what they held.
    pub async fn watch(self: Arc<Self>) {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let dead: Vec<(String, Handles)> = {
                let entries = self.entries.lock().expect("entries");
                entries
                    .iter()
                    .filter_map(|(id, e)| {
                        let st = e.state.lock().expect("vm state");
                        match (&st.busy, &st.handles) {
                            (None, Some(h)) if !is_alive(h) => Some((id.clone(), h.clone())),
                            _ => None,
                        }
                    })
                    .collect()
            };
            for (id, h) in dead {
                if let Ok(vm) = self.store.find_vm(&id)
                    && vm.state == VmState::Running
                {
                    self.mark_dead(&vm, &format!("its VMM (pid {}) exited unexpectedly", h.pid))
                        .await;
                }
            }
        }
    }
}

struct SessionGuard<'a> {
    sessions: &'a Mutex<HashMap<String, ExecControl>>,
    id: String,
}
impl Drop for SessionGuard<'_> {
    fn drop(&mut self) {
        self.sessions.lock().expect("sessions").remove(&self.id);
    }
}

async fn pump_stdin(mut stdin: ExecStdin, mut rx: tokio::sync::mpsc::Receiver<(Vec<u8>, bool)>) {
    while let Some((data, eof)) = rx.recv().await {
        if !data.is_empty() && stdin.write(&data).await.is_err() {
            return;
        }
        if eof {
            let _ = stdin.close().await;
            return;
        }
    }
}

fn exec_exit(status: ExitStatus) -> ExecExit {
    match status {
        ExitStatus::Code(c) => ExecExit {
            code: Some(c),
            signal: None,
        },
        ExitStatus::Signal(s) => ExecExit {
            code: None,
            signal: Some(s),
        },
    }
}

fn agent_err(e: banger_agent_proto::AgentError) -> RpcError {
    RpcError::unavailable(format!("guest agent: {}", chain(&e)))
}

fn init_arg(mode: InitMode) -> &'static str {
    match mode {
        InitMode::Fast => "banger.init=fast",
        InitMode::Systemd => "banger.init=systemd",
    }
}

/// How a VM's root disk is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RootDisk {
    /// `root.qcow2`, an overlay over the image's rootfs.
    Qcow2,
    /// `root.ext4`, a reflink clone or sparse copy of the image's rootfs.
    Copy,
    /// `root.cow`, the store of the dm snapshot `bg-<vm id>` the helper
    /// builds over the image's rootfs while the VM runs.
    Snapshot,
}

/// How an existing VM's root disk is stored, whatever the strategy was
/// when it was made.
fn existing_root_disk(vm_dir: &Path) -> RootDisk {
    if disks::cow_path(vm_dir).exists() {
        RootDisk::Snapshot
    } else if vm_dir.join("root.qcow2").exists() {
        RootDisk::Qcow2
    } else {
        RootDisk::Copy
    }
}

/// What the VMM opens: a qcow2 file, or a raw file or block device.
fn root_disk_spec(vm_id: &str, vm_dir: &Path, root: RootDisk) -> DiskSpec {
    let (path, format) = match root {
        RootDisk::Qcow2 => (vm_dir.join("root.qcow2"), DiskFormat::Qcow2),
        RootDisk::Copy => (vm_dir.join("root.ext4"), DiskFormat::Raw),
        RootDisk::Snapshot => (disks::device_path(vm_id), DiskFormat::Raw),
    };
    DiskSpec {
        path,
        format,
        read_only: false,
    }
}

/// The VM's disks: its own copy-on-write view of the image's read-only
/// rootfs (a dm snapshot built by the helper; else a qcow2 overlay for
/// QEMU, and for Firecracker, which takes raw files only, a sparse copy —
/// reflinked where the filesystem can), and a work disk copied from the
/// image's seed and grown to the requested size.
async fn make_disks(
    vm: &Vm,
    image: &Image,
    root_disk: RootDisk,
    helper: &HelperLink,
    op_id: &OpId,
) -> Result<(), RpcError> {
    std::fs::create_dir_all(&vm.vm_dir)
        .map_err(|e| RpcError::internal(format!("cannot create {}: {e}", vm.vm_dir.display())))?;
    let root = root_disk_spec(&vm.id, &vm.vm_dir, root_disk).path;
    match root_disk {
        RootDisk::Snapshot => {
            disks::attach(helper, op_id, &vm.id, &vm.vm_dir, &image.rootfs_path).await?;
        }
        RootDisk::Qcow2 => {
            let args: [&std::ffi::OsStr; 9] = [
                "create".as_ref(),
                "-q".as_ref(),
                "-f".as_ref(),
                "qcow2".as_ref(),
                "-F".as_ref(),
                "raw".as_ref(),
                "-b".as_ref(),
                image.rootfs_path.as_os_str(),
                root.as_os_str(),
            ];
            run("qemu-img", &args).await?
        }
        RootDisk::Copy => clone_or_copy(&image.rootfs_path, &root).await?,
    }
    let seed = image
        .work_seed_path
        .as_ref()
        .ok_or_else(|| RpcError::internal(format!("image {} has no work-seed disk", image.name)))?;
    let work = vm.vm_dir.join("work.ext4");
    clone_or_copy(seed, &work).await?;
    grow_disk(&work, vm.disk_mib).await
}

/// Grow an ext4 disk file to `mib` and its filesystem with it.
async fn grow_disk(disk: &Path, mib: u32) -> Result<(), RpcError> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(disk)
        .map_err(|e| RpcError::internal(format!("{}: {e}", disk.display())))?;
    let want = u64::from(mib) * 1024 * 1024;
    if f.metadata().map(|m| m.len()).unwrap_or(0) < want {
        f.set_len(want)
            .map_err(|e| RpcError::internal(format!("cannot grow {}: {e}", disk.display())))?;
        run("resize2fs", &["-f".as_ref(), disk.as_os_str()]).await?;
    }
    Ok(())
}

/// A reflink clone where the filesystem has them, else a copy that keeps
/// holes.
async fn clone_or_copy(from: &Path, to: &Path) -> Result<(), RpcError> {
    let (src, dst) = (from.to_owned(), to.to_owned());
    tokio::task::spawn_blocking(move || banger_host::clone_or_copy(&src, &dst))
        .await
        .map_err(|e| RpcError::internal(format!("copy task failed: {e}")))?
        .map(drop)
        .map_err(|e| {
            RpcError::internal(format!(
                "cannot copy {} to {}: {e}",
                from.display(),
                to.display()
            ))
        })
}

async fn run(program: &str, args: &[&std::ffi::OsStr]) -> Result<(), RpcError> {
    let bin = banger_host::find_binary(program).unwrap_or_else(|| PathBuf::from(program));
    let out = tokio::process::Command::new(&bin)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|e| {
            RpcError::unavailable(format!("cannot run {program}: {e} (see banger doctor)"))
        })?;
    if !out.status.success() {
        return Err(RpcError::internal(format!(
            "{program} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// Wait until the guest's sshd answers with its banner.
async fn wait_ssh_banner(
    h: &Handles,
    ip: std::net::Ipv4Addr,
    timeout: Duration,
) -> Result<(), RpcError> {
    use tokio::io::AsyncReadExt;
    let deadline = Instant::now() + timeout;
    loop {
        let attempt = async {
            let mut s = tokio::net::TcpStream::connect((ip, 22)).await.ok()?;
            let mut banner = [0u8; 4];
            tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut banner))
                .await
                .ok()?
                .ok()?;
            (&banner == b"SSH-").then_some(())
        };
        if tokio::time::timeout(Duration::from_secs(6), attempt)
            .await
            .ok()
            .flatten()
            .is_some()
        {
            return Ok(());
        }
        if !is_alive(h) || Instant::now() > deadline {
            return Err(RpcError::unavailable(format!(
                "the guest's sshd did not answer on {ip}:22 within {}s; see {}",
                timeout.as_secs(),
                h.console_log.display()
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Wait until the console log shows `marker` (the initramfs announcing the
/// switch to the real root), or the VMM dies, or time runs out.
async fn wait_console(h: &Handles, marker: &str, timeout: Duration) -> Result<(), RpcError> {
    let deadline = Instant::now() + timeout;
    loop {
        if std::fs::read(&h.console_log)
            .is_ok_and(|c| c.windows(marker.len()).any(|w| w == marker.as_bytes()))
        {
            return Ok(());
        }
        if !is_alive(h) {
            return Err(RpcError::internal(format!(
                "the VM's VMM exited during boot; see the console log {}",
                h.console_log.display()
            )));
        }
        if Instant::now() > deadline {
            return Err(RpcError::unavailable(format!(
                "the kernel did not reach the initramfs within {}s; see {}",
                timeout.as_secs(),
                h.console_log.display()
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_disks_are_known_by_their_files() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        assert_eq!(existing_root_disk(d), RootDisk::Copy);
        std::fs::write(d.join("root.qcow2"), b"").unwrap();
        assert_eq!(existing_root_disk(d), RootDisk::Qcow2);
        std::fs::write(d.join("root.cow"), b"").unwrap();
        assert_eq!(existing_root_disk(d), RootDisk::Snapshot);
        let spec = |root| {
            let s = root_disk_spec("0a1b2c3d4e5f", d, root);
            (s.path, s.format, s.read_only)
        };
        // Both VMMs take the snapshot's node as a raw disk.
        assert_eq!(
            spec(RootDisk::Snapshot),
            (
                PathBuf::from("/dev/mapper/bg-0a1b2c3d4e5f"),
                DiskFormat::Raw,
                false
            )
        );
        assert_eq!(
            spec(RootDisk::Qcow2),
            (d.join("root.qcow2"), DiskFormat::Qcow2, false)
        );
        assert_eq!(
            spec(RootDisk::Copy),
            (d.join("root.ext4"), DiskFormat::Raw, false)
        );
    }

    #[test]
    fn vm_names() {
        for ok in ["box", "a1", "my-vm-2"] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in [
            "",
            "1box",
            "Box",
            "my_vm",
            "a-",
            "has space",
            &"a".repeat(41),
        ] {
            assert!(!valid_name(bad), "{bad}");
        }
    }
}
