//! The fault-injection test seam (`BANGER_FAULT_INJECT`).

use std::path::PathBuf;
use std::time::Duration;

use tracing::warn;

use super::VmError;
use super::VmService;

/// Steps of the seam besides [`super::CREATE_STEPS`]: `vmm launched` (the
/// VMM runs, its handles are not recorded yet), `delete` (the row is
/// marked deleting) and `save state` (a snapshot's state is saved and its
/// disks frozen, its VM still paused).
pub const SEAM_STEPS: [&str; 3] = ["vmm launched", "delete", "save state"];

/// What the test seam does after its step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    /// One of [`super::CREATE_STEPS`] or [`SEAM_STEPS`].
    pub step: &'static str,
    /// Pause there instead of failing, until this file exists (the test
    /// creates it; the daemon removes it and goes on). A test kills the
    /// daemon or the helper while the operation is held exactly there.
    pub release: Option<PathBuf>,
}

/// How often a paused step looks for its release file.
const RELEASE_POLL: Duration = Duration::from_millis(20);

impl VmService {
    /// The test seam after `step`: nothing unless `BANGER_FAULT_INJECT` asks
    /// for one.
    pub(super) async fn inject_fault(&self, step: &str) -> Result<(), VmError> {
        match &self.settings.fault {
            Some(f) if f.step == step => match &f.release {
                Some(release) => {
                    warn!(step, release = %release.display(), "fault injection: pausing after this step");
                    while std::fs::remove_file(release).is_err() {
                        tokio::time::sleep(RELEASE_POLL).await;
                    }
                    warn!(step, "fault injection: released");
                    Ok(())
                }
                None => Err(VmError::Failed(format!(
                    "injected fault after the {step} step (BANGER_FAULT_INJECT)"
                ))),
            },
            _ => Ok(()),
        }
    }
}
