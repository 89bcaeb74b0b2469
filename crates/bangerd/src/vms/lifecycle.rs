//! Start, stop, delete and resize of an existing VM.

use std::sync::Arc;
use std::time::Instant;

use banger_rpc::EventSink;
use banger_store::{Image, Vm, VmState};
use banger_vmm::is_alive;
use banger_wire::OpId;
use banger_wire::methods::{
    VmInfo, VmNetDenied, VmNetDest, VmNetInfo, VmNetLog, VmNetLogParams, VmNetSetParams,
    VmSetParams,
};
use tracing::{info, warn};

use super::VmError;
use super::VmService;
use super::create::check_resources;
use super::disks::{self, RootDisk, existing_root_disk};
use crate::errors::chain;
use crate::ops::{OpKind, Operation};

impl VmService {
    // -- start / stop / delete -------------------------------------------------
    //
    // Each runs through the operation runner with the VM marked busy: a
    // caller that goes away (Ctrl-C) does not leave a VMM the row does not
    // know about, nor a row that says deleting.

    pub async fn start(
        self: &Arc<Self>,
        op_id: &OpId,
        name: &str,
        wait_ssh: bool,
        events: &EventSink,
    ) -> Result<VmInfo, VmError> {
        let vm = self.find(name)?;
        if vm.state != VmState::Stopped {
            return Err(VmError::Conflict(format!(
                "VM {:?} is {}; only a stopped VM can be started",
                vm.name, vm.state
            )));
        }
        let busy = self.claim(&vm, op_id, "start")?;
        let image = self.store.image_by_id(&vm.image_id)?;
        let this = self.clone();
        let subject = vm.name.clone();
        self.ops
            .run(
                op_id,
                OpKind::VmStart,
                &subject,
                events,
                move |op| async move {
                    let _busy = busy;
                    this.start_claimed(&op, vm, image, wait_ssh).await
                },
            )
            .await
    }

    async fn start_claimed(
        &self,
        op: &Operation,
        vm: Vm,
        image: Image,
        wait_ssh: bool,
    ) -> Result<VmInfo, VmError> {
        let booted = async {
            let gnet = self.net.guest_net(&op.op_id, &self.taps_in_use()).await?;
            // A snapshot VM's dm device went with its stop: build it
            // again over the same root.cow.
            if existing_root_disk(&vm.vm_dir) == RootDisk::Snapshot {
                op.stage("disks");
                let h = &*self.helper;
                disks::attach(h, &op.op_id, &vm.id, &vm.vm_dir, &image.rootfs_path).await?;
                self.inject_fault("disks").await?;
            }
            self.boot(op, &vm, &image, gnet, wait_ssh, None).await
        };
        match booted.await {
            Ok(()) => {
                self.store.update_vm_state(&vm.id, VmState::Running, None)?;
                let _ = self.store.touch_vm_last_used(&vm.id);
                self.net.forwards().start_vm(&vm).await;
            }
            Err(e) => {
                self.teardown(&vm).await;
                let _ = self
                    .store
                    .update_vm_state(&vm.id, VmState::Stopped, Some(&chain(&e)));
                return Err(e);
            }
        }
        Ok(self.info(&self.find(&vm.id)?))
    }

    pub async fn stop(
        self: &Arc<Self>,
        op_id: &OpId,
        name: &str,
        events: &EventSink,
    ) -> Result<VmInfo, VmError> {
        let vm = self.find(name)?;
        if vm.state != VmState::Running {
            return Err(VmError::Conflict(format!(
                "VM {:?} is {}; only a running VM can be stopped",
                vm.name, vm.state
            )));
        }
        let busy = self.claim(&vm, op_id, "stop")?;
        let this = self.clone();
        let subject = vm.name.clone();
        self.ops
            .run(
                op_id,
                OpKind::VmStop,
                &subject,
                events,
                move |_| async move {
                    let _busy = busy;
                    this.stop_guest(&vm).await;
                    this.inject_fault("stop").await?;
                    this.teardown(&vm).await;
                    this.store.update_vm_state(&vm.id, VmState::Stopped, None)?;
                    Ok(this.info(&this.find(&vm.id)?))
                },
            )
            .await
    }

    /// Let the guest power itself off, escalating within the configured
    /// stop timeout (`[vm] stop_timeout_secs`): first the agent's shutdown
    /// (QEMU guests; for half the time), then the power button (ACPI for
    /// QEMU, Ctrl-Alt-Del for Firecracker) for the rest. A guest still
    /// running then is ended by force in [`VmService::teardown`]. No step
    /// waits on the guest past its share of the time: a hung or hostile
    /// guest cannot hold `vm stop` (nor the VM's busy mark).
    pub(super) async fn stop_guest(&self, vm: &Vm) {
        let Some(h) = self.handles(&vm.id) else {
            return;
        };
        let budget = self.settings.stop_timeout;
        let deadline = Instant::now() + budget;
        if !is_alive(&h) {
            return;
        }
        // A paused guest can neither answer nor power off: it runs again
        // first (else teardown ends it by force).
        if h.paused
            && let Err(e) = self.apply_paused(vm, h.clone(), false).await
        {
            warn!(vm = %vm.id, error = %chain(&e), "cannot resume the paused guest to stop it");
            return;
        }
        if banger_vmm::needs_guest_shutdown(vm.vmm) {
            let ask_until = Instant::now() + budget / 2;
            let asked = tokio::time::timeout_at(ask_until.into(), async {
                let agent = self.agent(vm).await?;
                self.agent_call(vm, "the shutdown request", agent.shutdown())
                    .await
            })
            .await;
            match asked {
                Ok(Ok(_)) => {
                    let left = ask_until.saturating_duration_since(Instant::now());
                    if banger_vmm::wait_dead(&h, left).await {
                        return;
                    }
                    warn!(vm = %vm.id, "the guest did not power off after its agent's shutdown");
                }
                Ok(Err(e)) => {
                    warn!(vm = %vm.id, error = %chain(&e), "guest shutdown request failed")
                }
                Err(_) => warn!(vm = %vm.id, "the guest agent did not answer the shutdown request"),
            }
        }
        match banger_vmm::press_power_button(&h).await {
            Ok(()) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if banger_vmm::wait_dead(&h, left).await {
                    return;
                }
                warn!(vm = %vm.id, timeout_secs = budget.as_secs(), "the guest did not power off in time; ending its VMM");
            }
            Err(e) => {
                warn!(vm = %vm.id, error = %chain(&e), "cannot press the guest's power button")
            }
        }
    }

    pub async fn delete(
        self: &Arc<Self>,
        op_id: &OpId,
        name: &str,
        force: bool,
        events: &EventSink,
    ) -> Result<String, VmError> {
        let vm = self.find(name)?;
        let running =
            vm.state == VmState::Running && self.handles(&vm.id).is_some_and(|h| is_alive(&h));
        if running && !force {
            return Err(VmError::Conflict(format!(
                "VM {:?} is running; stop it first or pass --force",
                vm.name
            )));
        }
        let busy = self.claim(&vm, op_id, "delete")?;
        let this = self.clone();
        let subject = vm.name.clone();
        self.ops
            .run(
                op_id,
                OpKind::VmDelete,
                &subject,
                events,
                move |_| async move {
                    let _busy = busy;
                    this.delete_claimed(vm).await
                },
            )
            .await
    }

    pub(super) async fn delete_claimed(&self, vm: Vm) -> Result<String, VmError> {
        self.store
            .update_vm_state(&vm.id, VmState::Deleting, None)?;
        self.inject_fault("delete").await?;
        self.teardown(&vm).await;
        if let Err(e) = std::fs::remove_dir_all(&vm.vm_dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            let msg = format!("cannot remove {}: {e}", vm.vm_dir.display());
            let _ = self
                .store
                .update_vm_state(&vm.id, VmState::Failed, Some(&msg));
            return Err(VmError::Failed(msg));
        }
        self.store.delete_vm(&vm.id)?;
        self.net.dns().names().remove(&vm.name);
        self.entries.lock().expect("entries").remove(&vm.id);
        info!(vm = %vm.id, name = %vm.name, "VM deleted");
        Ok(vm.name)
    }

    /// Resize a VM. vCPUs, memory and disk are fixed while the VMM runs, so
    /// the VM must be stopped; the work disk only grows (its filesystem is
    /// grown by the guest at the next start).
    pub async fn set(&self, op_id: &OpId, p: VmSetParams) -> Result<VmInfo, VmError> {
        let vm = self.find(&p.name)?;
        if p.vcpus.is_none() && p.memory_mib.is_none() && p.disk_mib.is_none() {
            return Err(VmError::Invalid(
                "nothing to change: give --vcpus, --memory or --disk".into(),
            ));
        }
        if vm.state != VmState::Stopped {
            return Err(VmError::Conflict(format!(
                "VM {:?} is {}; stop it first (banger vm stop {}): vCPUs, memory and disk change only while stopped",
                vm.name, vm.state, vm.name
            )));
        }
        check_resources(p.vcpus, p.memory_mib)?;
        if let Some(d) = p.disk_mib
            && d < vm.disk_mib
        {
            return Err(VmError::Invalid(format!(
                "the work disk only grows: {} MiB is less than its current {} MiB",
                d, vm.disk_mib
            )));
        }
        let _busy = self.claim(&vm, op_id, "set")?;
        if let Some(d) = p.disk_mib.filter(|d| *d > vm.disk_mib) {
            disks::grow_work_disk(&vm.vm_dir, d).await?;
        }
        let updated = self.store.update_vm_resources(
            &vm.id,
            banger_store::ResourceUpdate {
                vcpus: p.vcpus,
                memory_mib: p.memory_mib,
                disk_mib: p.disk_mib,
            },
        )?;
        Ok(self.info(&updated))
    }

    /// `vm.net.show`.
    pub fn net_show(&self, name: &str) -> Result<VmNetInfo, VmError> {
        let vm = self.find(name)?;
        Ok(VmNetInfo {
            name: vm.name,
            policy: vm.net_policy,
        })
    }

    /// `vm.net.set`: record the policy, and carry it out at once on a
    /// running VM's tap (on failure the old policy stays, in both).
    pub async fn net_set(&self, op_id: &OpId, p: VmNetSetParams) -> Result<VmNetInfo, VmError> {
        let vm = self.find(&p.name)?;
        let policy = self.net_policy(Some(&p.policy))?;
        let _busy = self.claim(&vm, op_id, "net set")?;
        let tap = self.handles(&vm.id).and_then(|h| h.tap);
        if let (Some(tap), Some(mac), Some(ip)) = (tap, vm.mac.as_deref(), vm.guest_ip) {
            self.net.guard_tap(op_id, &tap, mac, ip, &policy).await?;
        }
        self.store.set_vm_net_policy(&vm.id, &policy)?;
        info!(vm = %vm.id, name = %vm.name, %policy, "network policy set");
        Ok(VmNetInfo {
            name: vm.name,
            policy,
        })
    }

    /// `vm.net.log`: what a running VM's network did since its policy was
    /// last applied.
    pub async fn net_log(&self, op_id: &OpId, p: VmNetLogParams) -> Result<VmNetLog, VmError> {
        let vm = self.find(&p.name)?;
        let tap = self.handles(&vm.id).and_then(|h| h.tap);
        let (Some(tap), Some(ip)) = (tap, vm.guest_ip) else {
            return Err(VmError::Conflict(format!(
                "VM {:?} is not running: its network log lives while it runs (banger vm start {})",
                vm.name, vm.name
            )));
        };
        let seen = self.net.inspect(op_id, &tap, ip).await?;
        let names = self.net.dns().learned_names(ip);
        let suggestion = p.suggest.then(|| {
            let used: Vec<(std::net::Ipv4Addr, u16)> = seen
                .learned
                .iter()
                .filter_map(|d| Some((d.addr.parse().ok()?, d.port)))
                .collect();
            banger_net::policy::suggest(&used, &names).to_string()
        });
        let dest = |addr: String, proto: String, port: u16| VmNetDest {
            names: addr
                .parse()
                .ok()
                .and_then(|a: std::net::Ipv4Addr| names.get(&a))
                .map(|n| n.iter().cloned().collect())
                .unwrap_or_default(),
            addr,
            proto,
            port,
        };
        let destinations = seen
            .learned
            .into_iter()
            .map(|d| dest(d.addr, d.proto, d.port))
            .collect();
        let denied = seen
            .denied
            .into_iter()
            .map(|d| VmNetDenied {
                dest: dest(d.dest.addr, d.dest.proto, d.dest.port),
                packets: d.packets,
            })
            .collect();
        Ok(VmNetLog {
            name: vm.name,
            policy: vm.net_policy,
            denied_packets: seen.denied_packets,
            destinations,
            denied,
            suggestion,
        })
    }
}
