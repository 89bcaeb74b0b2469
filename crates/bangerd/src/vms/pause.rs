//! Pause and resume of a running VM: its vCPUs stop, its memory stays and
//! its VMM uses no CPU; the VMM, tap, forwards and DNS name stay as they
//! are. Whether it is paused is a fact of now: kept in `handles.json`, so a
//! daemon restarted meanwhile still knows.

use banger_store::Vm;
use banger_vmm::Handles;
use banger_wire::OpId;
use banger_wire::methods::VmInfo;
use tracing::info;

use super::{VmError, VmService};
use crate::errors::chain;

impl VmService {
    /// Pause (`paused`) or resume a running VM. Pausing a paused VM, or
    /// resuming a running one, changes nothing.
    pub async fn set_paused(
        &self,
        op_id: &OpId,
        name: &str,
        paused: bool,
    ) -> Result<VmInfo, VmError> {
        let vm = self.find(name)?;
        let _busy = self.claim(&vm, op_id, if paused { "pause" } else { "resume" })?;
        let h = self.running_handles(&vm)?;
        if h.paused != paused {
            self.apply_paused(&vm, h, paused).await?;
            info!(vm = %vm.id, paused, "vCPUs paused or resumed");
        }
        Ok(self.info(&vm))
    }

    /// Tell the VMM, then record it (in memory and in `handles.json`).
    pub(super) async fn apply_paused(
        &self,
        vm: &Vm,
        mut h: Handles,
        paused: bool,
    ) -> Result<(), VmError> {
        banger_vmm::set_paused(&h, paused).await.map_err(|e| {
            VmError::Failed(format!(
                "cannot {} VM {:?}: {}",
                if paused { "pause" } else { "resume" },
                vm.name,
                chain(&e)
            ))
        })?;
        h.paused = paused;
        h.save(&vm.vm_dir).map_err(|e| VmError::Failed(chain(&e)))?;
        self.entry(&vm.id).state.lock().expect("vm state").handles = Some(h);
        self.store.note_vm_change();
        Ok(())
    }
}
