//! At daemon start, reconcile the rows with what runs; while it runs,
//! watch for VMMs that die.

use std::sync::Arc;
use std::time::Duration;

use banger_store::{Vm, VmState};
use banger_vmm::{Handles, LaunchIntent, is_alive};
use banger_wire::OpId;
use tracing::{info, warn};

use super::VmService;
use crate::errors::chain;

impl VmService {
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
        // The adopted guests' taps, guarded again once the table is made anew.
        let mut adopted = Vec::new();
        for vm in vms {
            match vm.state {
                VmState::Running => match Handles::load(&vm.vm_dir) {
                    Ok(Some(h)) if is_alive(&h) => {
                        info!(vm = %vm.id, pid = h.pid, "reconcile: VM still running");
                        if let (Some(tap), Some(mac), Some(ip)) = (&h.tap, &vm.mac, vm.guest_ip) {
                            adopted.push((
                                vm.id.clone(),
                                tap.clone(),
                                mac.clone(),
                                ip,
                                vm.net_policy.clone(),
                            ));
                        }
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
                // A start cut short by the daemon's death left its VMM
                // (recorded in handles.json, or only in the launch intent).
                VmState::Stopped | VmState::Failed
                    if LaunchIntent::exists(&vm.vm_dir)
                        || vm.vm_dir.join(banger_vmm::HANDLES_FILE).exists() =>
                {
                    warn!(vm = %vm.id, "reconcile: ending the VMM of an unfinished start");
                    self.teardown(&vm).await;
                }
                VmState::Stopped | VmState::Failed => {}
            }
        }
        self.drop_unfinished_snapshots();
        self.net
            .dns()
            .names()
            .rebuild(&self.store.list_vms().unwrap_or_default());
        // Guests still running use the bridge address for DNS: serve it again.
        let in_use = self.taps_in_use();
        if !in_use.is_empty() {
            let op_id = OpId::mint();
            let gnet = self.net.guest_net(&op_id, &in_use).await;
            if let Err(e) = &gnet {
                warn!(error = %chain(e), "reconcile: cannot set up the guest network again");
            }
            // `net.ensure_nat` made the tables without guards: until its
            // guard is back, an adopted guest's tap carries nothing.
            for (id, tap, mac, ip, policy) in adopted {
                // Its secrets proxy first: the guard redirects to it.
                if let Ok(gnet) = &gnet
                    && let Err(e) = self.serve_secrets(&id, ip, gnet.gateway).await
                {
                    warn!(vm = %id, error = %chain(&e), "reconcile: cannot proxy the guest's secrets again");
                }
                if let Err(e) = self.net.guard_tap(&op_id, &tap, &mac, ip, &policy).await {
                    warn!(vm = %id, tap = %tap, error = %chain(&e), "reconcile: cannot guard the tap again; the guest is cut off");
                }
            }
        }
    }

    /// Cap the console log of every VM with a VMM (a guest writing to its
    /// serial port must not fill the host's disk).
    fn cap_consoles(&self) {
        let logs: Vec<(String, std::path::PathBuf)> = {
            let entries = self.entries.lock().expect("entries");
            entries
                .iter()
                .filter_map(|(id, e)| {
                    let st = e.state.lock().expect("vm state");
                    st.handles
                        .as_ref()
                        .map(|h| (id.clone(), h.console_log.clone()))
                })
                .collect()
        };
        for (id, log) in logs {
            match banger_vmm::cap_console(&log, self.settings.console_log_max) {
                Ok(true) => {
                    info!(vm = %id, max_bytes = self.settings.console_log_max, "console log capped: older output moved to console.log.1")
                }
                Ok(false) => {}
                Err(e) => warn!(vm = %id, error = %e, "cannot cap the console log"),
            }
        }
    }

    pub(super) async fn mark_dead(&self, vm: &Vm, why: &str) {
        warn!(vm = %vm.id, name = %vm.name, reason = why, "VM is not running any more");
        self.teardown(vm).await;
        let _ = self
            .store
            .update_vm_state(&vm.id, VmState::Stopped, Some(why));
    }

    /// Notice VMMs that die while the daemon runs (a crash, a kill -9) and
    /// mark their VMs stopped with the reason, freeing what they held; and
    /// keep each running VM's console log under its cap.
    pub async fn watch(self: Arc<Self>) {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            self.cap_consoles();
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
