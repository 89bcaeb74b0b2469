//! The fault-injection test seam (`BANGER_FAULT_INJECT`).

use std::path::PathBuf;
use std::time::Duration;

use tracing::warn;

use super::VmError;
use super::VmService;

/// Steps of the seam besides [`super::CREATE_STEPS`]: `vmm launched` (the
/// VMM runs, its handles are not recorded yet), `stop` (the guest is off,
/// its VM not torn down yet), `delete` (the row is marked deleting), `save
/// state` (a snapshot's state is saved and its disks frozen, its VM still
/// paused), and [`PULL_STEPS`].
pub const SEAM_STEPS: [&str; 4] = ["vmm launched", "stop", "delete", "save state"];

/// `pull:<stage>`: an image pull or import held at the start of that stage
/// of `banger_oci` (pause only: the stage runs on a blocking thread that
/// cannot be failed from outside).
pub const PULL_STEPS: [&str; 7] = [
    "pull:download",
    "pull:unpack",
    "pull:prepare",
    "pull:rootfs-ext4",
    "pull:work-seed",
    "pull:kernel",
    "pull:manifest",
];

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

impl Fault {
    /// Hold the calling (blocking) thread at the start of pull stage
    /// `stage` when the seam asks for it.
    pub fn hold_pull_stage(&self, stage: banger_oci::Stage) {
        let Some(release) = &self.release else {
            return;
        };
        if self.step.strip_prefix("pull:") != Some(stage.name()) {
            return;
        }
        warn!(step = self.step, release = %release.display(), "fault injection: pausing after this step");
        while std::fs::remove_file(release).is_err() {
            std::thread::sleep(RELEASE_POLL);
        }
        warn!(step = self.step, "fault injection: released");
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pull_steps_are_the_oci_stages_after_resolve() {
        use banger_oci::Stage::*;
        let stages = [
            Resolve, Download, Unpack, Prepare, RootfsExt4, WorkSeed, Kernel, Manifest,
        ];
        let names: Vec<&str> = stages.iter().map(|s| s.name()).collect();
        assert_eq!(names, banger_wire::methods::PULL_STAGES);
        let steps: Vec<String> = names[1..].iter().map(|s| format!("pull:{s}")).collect();
        assert_eq!(steps, PULL_STEPS);
    }
}
