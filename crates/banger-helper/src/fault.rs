//! The helper's test seam (`BANGER_HELPER_FAULT`): hold a privileged method
//! half done, so a test can kill the helper exactly there.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use banger_host::PausePoint;
use tracing::warn;

/// The methods that have a pause point, where each holds.
pub const PAUSE_POINTS: [&str; 2] = [
    // The tap exists, owned by the VMM's user, but is not on the bridge yet.
    "net.create_tap",
    // Both loop devices are attached; the dm snapshot does not exist yet.
    "disk.snapshot_create",
];

/// How often a paused method looks for its release file.
const RELEASE_POLL: Duration = Duration::from_millis(20);

/// `BANGER_HELPER_FAULT=<method>:pause` (read at helper start, logged as a
/// warning): every call of `<method>` (one of [`PAUSE_POINTS`]) holds at its
/// pause point until the file `helper-fault-release` appears next to the
/// helper's socket; the helper removes it and goes on. A helper started by
/// the daemon inherits the daemon's environment, and so the seam.
pub fn from_env(socket: &Path) -> anyhow::Result<Option<PausePoint>> {
    let Some(v) = std::env::var_os("BANGER_HELPER_FAULT") else {
        return Ok(None);
    };
    let v = v.to_string_lossy();
    let Some(method) = v
        .strip_suffix(":pause")
        .and_then(|m| PAUSE_POINTS.iter().find(|p| **p == m))
    else {
        anyhow::bail!(
            "BANGER_HELPER_FAULT={v:?} is not <method>:pause with a method of: {}",
            PAUSE_POINTS.join(", ")
        );
    };
    let release = socket.with_file_name("helper-fault-release");
    warn!(method, release = %release.display(), "fault injection is on");
    Ok(Some(pause_at(method, release)))
}

fn pause_at(method: &'static str, release: PathBuf) -> PausePoint {
    PausePoint(Arc::new(move |at| {
        let release = release.clone();
        Box::pin(async move {
            if at != method {
                return;
            }
            warn!(method, release = %release.display(), "fault injection: pausing in this method");
            while std::fs::remove_file(&release).is_err() {
                tokio::time::sleep(RELEASE_POLL).await;
            }
            warn!(method, "fault injection: released");
        })
    }))
}
