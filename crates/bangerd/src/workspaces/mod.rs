//! Workspaces: a host git checkout copied into a running guest
//! (`prepare.rs`), and the guest's work brought back out (`export.rs`:
//! patch, branch or applied edits; and `status`). The host side of git
//! (what the working tree holds, the snapshot of its uncommitted state, the
//! tar stream) is `repo.rs`; the guest side runs `git` and `tar` in the
//! guest through the agent (`guest.rs`), never over ssh.
//!
//! Locks: the VM's state is read (and its agent connection taken) without
//! the busy mark; then the VM's **workspace lock** is held for the guest
//! I/O. Prepares on one VM serialise, an export or status waits for a
//! prepare in flight, and `vm stop` / `delete` never wait for either: the
//! agent connection going away fails the workspace operation, and a
//! prepare cut short leaves the previous workspace as it was.

mod export;
mod guest;
mod prepare;
mod rebuild;
mod repo;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use banger_agent_proto::AgentError;
use banger_store::Store;

use crate::ops::Operations;
use crate::vms::{VmError, VmService};

/// A workspace operation's error.
#[derive(Debug, thiserror::Error)]
pub enum WorkspaceError {
    /// Bad input: says what was wrong and what to do.
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    /// A git or tar step in the guest failed.
    #[error("{0}")]
    Guest(String),
    /// A host-side step (git, files) failed.
    #[error("{0}")]
    Host(String),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Store(#[from] banger_store::StoreError),
    #[error("the VM's agent: {0}")]
    Agent(#[from] AgentError),
    #[error(transparent)]
    Task(#[from] crate::ops::TaskFailed),
    /// `op.cancel` stopped it; what was there before is as it was.
    #[error("{0}")]
    Cancelled(String),
}

/// Workspaces in running guests.
#[derive(Debug)]
pub struct WorkspaceService {
    vms: Arc<VmService>,
    ops: Arc<Operations>,
    /// Where each VM's workspaces came from on the host.
    store: Arc<Store>,
    /// Patches and bundles on their way out, and host snapshots' objects.
    scratch: PathBuf,
    /// The per-VM workspace locks.
    locks: LockMap,
}

/// Locks by VM id, each kept only while someone holds or awaits it: the
/// map never outgrows the VMs with a workspace operation in flight.
#[derive(Debug, Default)]
struct LockMap(Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>);

impl LockMap {
    fn get(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut map = self.0.lock().expect("workspace locks");
        // Nobody but the map has these any more.
        map.retain(|_, l| Arc::strong_count(l) > 1);
        map.entry(id.to_owned()).or_default().clone()
    }
}

impl WorkspaceService {
    pub fn new(
        vms: Arc<VmService>,
        ops: Arc<Operations>,
        store: Arc<Store>,
        state_dir: &std::path::Path,
    ) -> Self {
        WorkspaceService {
            vms,
            ops,
            store,
            scratch: state_dir.join("workspaces"),
            locks: LockMap::default(),
        }
    }

    /// The VM's workspace lock.
    fn lock_for(&self, vm_id: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.locks.get(vm_id)
    }

    /// A private scratch directory for one operation, removed on drop.
    fn scratch_dir(&self) -> Result<tempfile::TempDir, WorkspaceError> {
        std::fs::create_dir_all(&self.scratch).map_err(|e| {
            WorkspaceError::Host(format!("cannot create {}: {e}", self.scratch.display()))
        })?;
        tempfile::Builder::new()
            .prefix("op-")
            .tempdir_in(&self.scratch)
            .map_err(|e| WorkspaceError::Host(format!("cannot make a scratch directory: {e}")))
    }
}

/// The guest's list of its workspaces, one path a line: prepare adds to
/// it; export and status pick from it when not told which.
const WORKSPACE_LIST: &str = "/root/.banger/workspaces";

/// `dest` as the guest path of a workspace: absolute, normal, not `/` or
/// `/root` itself, and printable.
fn check_dest(dest: &str) -> Result<String, WorkspaceError> {
    let p = std::path::Path::new(dest);
    let bad = |why: &str| {
        Err(WorkspaceError::Invalid(format!(
            "--dest {dest:?} {why}; give an absolute directory such as /root/project"
        )))
    };
    if !p.is_absolute() {
        return bad("is not absolute");
    }
    if p.components().any(|c| {
        matches!(
            c,
            std::path::Component::ParentDir | std::path::Component::CurDir
        )
    }) || dest.contains("//")
    {
        return bad("has . or .. or empty components");
    }
    if dest.chars().any(|c| c.is_control()) {
        return bad("has control characters");
    }
    let dest = dest.trim_end_matches('/');
    if dest.is_empty() || dest == "/root" || p.parent() == Some(std::path::Path::new("/")) {
        return bad("would replace a top-level directory or /root itself");
    }
    Ok(dest.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lock_map_keeps_only_locks_in_use() {
        let map = LockMap::default();
        let held = map.get("a");
        assert!(Arc::ptr_eq(&held, &map.get("a")), "one lock per VM");
        for i in 0..100 {
            drop(map.get(&format!("vm{i}")));
        }
        let len = map.0.lock().unwrap().len();
        assert!(len <= 2, "{len} locks kept");
        assert!(Arc::ptr_eq(&held, &map.get("a")), "a held lock stays");
    }

    #[test]
    fn dest_must_be_a_plain_absolute_subdirectory() {
        assert_eq!(check_dest("/root/proj/").unwrap(), "/root/proj");
        assert_eq!(check_dest("/srv/work/proj").unwrap(), "/srv/work/proj");
        for bad in [
            "root/proj",
            "/root",
            "/",
            "/usr",
            "/root/../etc",
            "/root/a\nb",
            "/root//a",
        ] {
            assert!(
                matches!(check_dest(bad), Err(WorkspaceError::Invalid(_))),
                "{bad:?}"
            );
        }
    }
}
