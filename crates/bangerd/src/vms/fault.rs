//! The fault-injection test seam (`BANGER_FAULT_INJECT`).

use std::time::Duration;

use tracing::warn;

use super::VmError;
use super::VmService;

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

impl VmService {
    /// for one.
    pub(super) async fn inject_fault(&self, step: &str) -> Result<(), VmError> {
        match self.settings.fault {
            Some(f) if f.step == step && f.pause => {
                warn!(step, "fault injection: pausing after this step");
                tokio::time::sleep(FAULT_PAUSE).await;
                Ok(())
            }
            Some(f) if f.step == step => Err(VmError::Failed(format!(
                "injected fault after the {step} step (BANGER_FAULT_INJECT)"
            ))),
            _ => Ok(()),
        }
    }
}
