//! `vm.fork`: a snapshot of a running VM (taken as `vm.snapshot` takes
//! one: the VM pauses only while its state is saved) restored N times, the
//! restores running concurrently, each a VM of its own (name, id, IP, MAC,
//! tap, CID, hostname, machine-id, sshd host keys).
//!
//! The snapshot stays as an ordinary, listed snapshot: the forks' disks are
//! overlays over its files, `snapshot delete` is refused while a fork
//! exists, and it can be restored again (`vm create --from`). A failure at
//! any stage removes everything the fork made: the forks already running,
//! the failed ones' rows, and the snapshot.

use std::sync::Arc;

use banger_rpc::EventSink;
use banger_store::new_id;
use banger_wire::OpId;
use banger_wire::methods::{MAX_FORKS, VmCreateParams, VmForkParams, VmForkResult, VmInfo};
use tracing::{info, warn};

use super::create::valid_name;
use super::{VmError, VmService};
use crate::errors::chain;
use crate::ops::{OpKind, Operation};

/// The names of `count` forks: `<prefix>-1` … `<prefix>-N`.
fn fork_names(prefix: &str, count: u32) -> Vec<String> {
    (1..=count).map(|i| format!("{prefix}-{i}")).collect()
}

impl VmService {
    /// Fork a running VM as operation `op_id` (through the runner).
    pub async fn fork(
        self: &Arc<Self>,
        op_id: &OpId,
        params: VmForkParams,
        events: &EventSink,
    ) -> Result<VmForkResult, VmError> {
        let vm = self.find(&params.vm)?;
        Self::check_snapshottable(&vm)?;
        let count = params.count.unwrap_or(1);
        if !(1..=MAX_FORKS).contains(&count) {
            return Err(VmError::Invalid(format!(
                "--count {count}: a fork makes from 1 to {MAX_FORKS} VMs"
            )));
        }
        let prefix = match params.name {
            Some(p) => p,
            None => {
                // Room for "-fork-NN" within a name's 40 characters.
                let base: String = vm.name.chars().take(31).collect();
                format!("{}-fork", base.trim_end_matches('-'))
            }
        };
        let names = fork_names(&prefix, count);
        for n in &names {
            if !valid_name(n) {
                return Err(VmError::Invalid(format!(
                    "fork name {n:?} is invalid: use a --name of lowercase letters, digits and '-', starting with a letter, short enough for \"-{count}\" to follow within 40 characters"
                )));
            }
            if self.find(n).is_ok() {
                return Err(VmError::Conflict(format!(
                    "a VM named {n:?} exists already: pick another --name"
                )));
            }
        }
        super::create::check_wait(params.wait.as_deref())?;
        let this = self.clone();
        let keep_host_keys = params.keep_host_keys;
        let wait = params.wait;
        self.ops
            .run(
                op_id,
                OpKind::VmFork,
                &vm.name.clone(),
                events,
                move |op| async move { this.fork_inner(op, vm, names, keep_host_keys, wait).await },
            )
            .await
    }

    async fn fork_inner(
        self: Arc<Self>,
        op: Arc<Operation>,
        vm: banger_store::Vm,
        names: Vec<String>,
        keep_host_keys: bool,
        wait: Option<String>,
    ) -> Result<VmForkResult, VmError> {
        let base: String = vm.name.chars().take(26).collect();
        let snap_name = format!("{}-fork-{}", base.trim_end_matches('-'), &new_id()[..6]);
        let net = vm.net_policy.clone();
        let source = vm.name.clone();
        let snap = self.snapshot_inner(&op, vm, snap_name).await?;
        info!(vm = %source, snapshot = %snap.id, forks = names.len(), "forking VM");
        op.stage("restore");
        let mut restores = tokio::task::JoinSet::new();
        for (i, name) in names.iter().cloned().enumerate() {
            let params = VmCreateParams {
                name: Some(name.clone()),
                net: Some(net.clone()),
                from_snapshot: Some(snap.id.clone()),
                keep_host_keys,
                wait: wait.clone(),
                ..VmCreateParams::default()
            };
            // Its stages on a track of their own: timed apart from the
            // other forks', and naming this fork.
            let (this, track) = (self.clone(), op.track(&name));
            restores.spawn(async move {
                let restored = this
                    .restore_inner(&track, name, params, Default::default())
                    .await;
                track.end_track(restored.is_ok());
                (i, restored)
            });
        }
        let mut made: Vec<Option<VmInfo>> = vec![None; names.len()];
        let mut failure = None;
        while let Some(joined) = restores.join_next().await {
            match joined {
                Ok((i, Ok(v))) => made[i] = Some(v),
                Ok((i, Err(e))) => {
                    warn!(vm = %names[i], error = %chain(&e), "a fork failed");
                    failure.get_or_insert(e);
                }
                Err(e) => {
                    failure.get_or_insert(VmError::Failed(format!("a restore task failed: {e}")));
                }
            }
        }
        match failure {
            None => Ok(VmForkResult {
                snapshot: self.snapshot_info(&self.store.find_snapshot(&snap.id)?),
                vms: made.into_iter().flatten().collect(),
            }),
            Some(e) => {
                op.stage("roll back");
                self.undo_fork(&op.op_id, &names, &snap.id).await;
                Err(e)
            }
        }
    }

    /// A fork failed: delete every fork it made (the running ones, and the
    /// rows of the failed ones, which own nothing), then its snapshot.
    async fn undo_fork(&self, op_id: &OpId, names: &[String], snapshot_id: &str) {
        for name in names {
            let Ok(vm) = self.find(name) else { continue };
            match self.claim(&vm, op_id, "delete") {
                Ok(_busy) => {
                    if let Err(e) = self.delete_claimed(vm).await {
                        warn!(vm = %name, error = %chain(&e), "cannot remove a fork");
                    }
                }
                Err(e) => warn!(vm = %name, error = %chain(&e), "cannot remove a fork"),
            }
        }
        if let Ok(s) = self.store.find_snapshot(snapshot_id) {
            self.remove_snapshot(&s);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forks_are_numbered_from_one() {
        assert_eq!(
            fork_names("web-fork", 3),
            ["web-fork-1", "web-fork-2", "web-fork-3"]
        );
    }
}
