//! The warm pool (`[pool] size`): guests of the default image restored
//! ahead of time, each an ordinary VM row labelled `banger.pool=<snapshot
//! id>` (hidden from `vm list` unless `--all`). A `vm create` / `vm run`
//! with default options takes one ([`VmService::take_pooled`]): the row
//! gets the caller's name and labels, the guest its hostname, the name
//! table the name, and the VM its port forwards; then the pool refills.
//!
//! The filler ([`VmService::keep_pool`]) runs in the background for the
//! daemon's life, never before the daemon answers: it boots a VM of the
//! default image (labelled `banger.pool=source`), snapshots it as
//! `pool-<image id>-<random>` and deletes it, then restores that snapshot
//! until the pool holds `size` running guests. A default image that
//! changes, a size that shrinks, a pooled guest that is no longer running
//! (its VMM died, a dead daemon's restore rolled back to `failed`), a
//! source a dead daemon left: all are removed on its next pass, and pool
//! snapshots nothing uses go too. Every step is a create, snapshot or
//! delete through the runner, so reconcile and the leak check treat them
//! as any other.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use banger_host::{Accel, RootDiskStrategy};
use banger_rpc::EventSink;
use banger_store::{Image, ImageState, Snapshot, SnapshotState, Vm, VmState, Vmm, new_id};
use banger_wire::OpId;
use banger_wire::methods::{VmCreateParams, VmInfo};
use tracing::{info, warn};

use super::{VmError, VmService};
use crate::errors::chain;
use crate::forward::ForwardService;
use crate::ops::{OpKind, Operation};

/// The label of a pooled guest (the snapshot it was restored from) and of
/// the VM a pool snapshot is taken of (`source`).
pub const POOL_LABEL: &str = "banger.pool";
const POOL_SOURCE: &str = "source";
/// Pool snapshots are named `pool-<image id>-<random>`.
const POOL_SNAPSHOT_PREFIX: &str = "pool-";
/// How long the filler waits after a pass (a failed one too) unless woken.
const POOL_PASS_INTERVAL: Duration = Duration::from_secs(30);
/// The longest wait after failed passes.
const POOL_MAX_PAUSE: Duration = Duration::from_secs(600);

fn is_pool_snapshot(s: &Snapshot) -> bool {
    s.name.starts_with(POOL_SNAPSHOT_PREFIX)
}

/// A create a pooled guest can serve: every option at its default. A
/// secret's guest needs its placeholders and the proxy's CA written at
/// create, which a pooled guest was restored without.
fn default_shape(p: &VmCreateParams, default_policy: &str) -> bool {
    p.image.is_none()
        && p.vcpus.is_none()
        && p.memory_mib.is_none()
        && p.disk_mib.is_none()
        && p.init.is_none()
        && p.vmm.is_none()
        && p.from_snapshot.is_none()
        && !p.keep_host_keys
        && p.secrets.is_empty()
        && p.net.as_deref() == Some(default_policy)
}

impl VmService {
    /// A create the pool can serve: nothing asked beyond a name, ports,
    /// a session and the default network policy.
    pub(super) fn poolable(&self, p: &VmCreateParams) -> bool {
        self.settings.pool_size > 0 && default_shape(p, &self.net.default_policy().to_string())
    }

    /// Keep the pool filled, for the daemon's life (spawned after
    /// reconcile; the daemon answers meanwhile).
    pub async fn keep_pool(self: Arc<Self>) {
        let mut pause = POOL_PASS_INTERVAL;
        loop {
            match self.fill_pool().await {
                Ok(()) => pause = POOL_PASS_INTERVAL,
                Err(e) => {
                    // Each failed pass may have booted a guest: back off.
                    pause = (pause * 2).min(POOL_MAX_PAUSE);
                    warn!(error = %chain(&e), retry_secs = pause.as_secs(), "warm pool: cannot fill it");
                    tokio::time::sleep(pause).await;
                    continue;
                }
            }
            tokio::select! {
                () = self.pool_wake.notified() => {}
                () = tokio::time::sleep(pause) => {}
            }
        }
    }

    /// Whether the pool can serve creates of `image` here: its guests are
    /// QEMU restores, made where a create would pick QEMU, on root disks
    /// snapshots can be taken of.
    async fn pool_serves(&self, image: &Image) -> Result<bool, VmError> {
        if self.settings.root_disks == RootDiskStrategy::DmSnapshot {
            return Err(VmError::Unavailable(
                "root disks are device-mapper snapshots here, which cannot be snapshotted yet; set [pool] size = 0".into(),
            ));
        }
        Ok(self.settings.firecracker.is_none() || self.accel(image).await != Accel::Kvm)
    }

    /// One pass: drop what the pool no longer wants, then fill it.
    async fn fill_pool(self: &Arc<Self>) -> Result<(), VmError> {
        let image = match self.settings.pool_size {
            0 => None,
            _ => self
                .store
                .default_image()?
                .filter(|i| i.state == ImageState::Ready),
        };
        let snaps = self.store.list_snapshots()?;
        let current = image.as_ref().and_then(|img| {
            snaps
                .iter()
                .find(|s| {
                    is_pool_snapshot(s) && s.image_id == img.id && s.state == SnapshotState::Ready
                })
                .cloned()
        });
        for v in self.store.list_vms()? {
            let Some(tag) = v.labels.get(POOL_LABEL) else {
                continue;
            };
            let wanted = current.as_ref().is_some_and(|s| *tag == s.id)
                && v.state == VmState::Running
                && self
                    .handles(&v.id)
                    .is_some_and(|h| banger_vmm::is_alive(&h));
            if !wanted && !self.is_busy(&v.id) {
                info!(vm = %v.name, state = %v.state, "warm pool: removing a guest it no longer wants");
                self.drop_pooled(v).await;
            }
        }
        for s in snaps.iter().filter(|s| {
            is_pool_snapshot(s)
                && s.state == SnapshotState::Ready
                && current.as_ref().is_none_or(|c| c.id != s.id)
        }) {
            if self.snapshot_info(s).used_by.is_empty() {
                info!(snapshot = %s.name, "warm pool: removing a snapshot it no longer uses");
                self.remove_snapshot(s);
            }
        }
        let Some(image) = image else { return Ok(()) };
        if !self.pool_serves(&image).await? {
            return Ok(());
        }
        let snap = match current {
            Some(s) => s,
            None => self.make_pool_snapshot(&image).await?,
        };
        let ready = self
            .store
            .list_vms()?
            .iter()
            .filter(|v| v.labels.get(POOL_LABEL) == Some(&snap.id))
            .count();
        for _ in ready..self.settings.pool_size {
            self.add_pooled(&snap).await?;
        }
        Ok(())
    }

    /// Delete a pooled guest (or a pool source), whatever its state.
    async fn drop_pooled(&self, v: Vm) {
        let op = OpId::mint();
        match self.claim(&v, &op, "delete") {
            Ok(_busy) => {
                if let Err(e) = self.delete_claimed(v).await {
                    warn!(error = %chain(&e), "warm pool: cannot remove a guest");
                }
            }
            Err(e) => warn!(error = %chain(&e), "warm pool: cannot remove a guest"),
        }
    }

    /// Boot a VM of the default image, snapshot it, delete it.
    async fn make_pool_snapshot(self: &Arc<Self>, image: &Image) -> Result<Snapshot, VmError> {
        let name = format!("pool-src-{}", &new_id()[..6]);
        info!(image = %image.name, vm = %name, "warm pool: booting the guest its snapshot is taken of");
        let params = VmCreateParams {
            name: Some(name.clone()),
            wait: Some("agent".into()),
            net: Some(self.net.default_policy().to_string()),
            ..VmCreateParams::default()
        };
        let labels = BTreeMap::from([(POOL_LABEL.to_owned(), POOL_SOURCE.to_owned())]);
        let this = self.clone();
        let image_name = image.name.clone();
        let created = self
            .ops
            .run(
                &OpId::mint(),
                OpKind::VmCreate,
                &name.clone(),
                &EventSink::discard(),
                move |op| async move {
                    let mut params = params;
                    params.image = Some(image_name);
                    this.create_inner(&op, name, Some(Vmm::Qemu), params, labels)
                        .await
                },
            )
            .await?;
        let source = self.find(&created.id)?;
        let snap_name = format!(
            "{POOL_SNAPSHOT_PREFIX}{}-{}",
            &image.id[..image.id.len().min(12)],
            &new_id()[..6]
        );
        let this = self.clone();
        let taken = self
            .ops
            .run(
                &OpId::mint(),
                OpKind::VmSnapshot,
                &source.name.clone(),
                &EventSink::discard(),
                move |op| async move { this.snapshot_inner(&op, source, snap_name).await },
            )
            .await;
        let source = self.find(&created.id)?;
        self.drop_pooled(source).await;
        Ok(self.store.find_snapshot(&taken?.id)?)
    }

    /// Restore one more pooled guest.
    async fn add_pooled(self: &Arc<Self>, snap: &Snapshot) -> Result<(), VmError> {
        let name = format!("pool-{}", &new_id()[..6]);
        let params = VmCreateParams {
            name: Some(name.clone()),
            net: Some(self.net.default_policy().to_string()),
            from_snapshot: Some(snap.id.clone()),
            ..VmCreateParams::default()
        };
        let labels = BTreeMap::from([(POOL_LABEL.to_owned(), snap.id.clone())]);
        let this = self.clone();
        self.ops
            .run(
                &OpId::mint(),
                OpKind::VmCreate,
                &name.clone(),
                &EventSink::discard(),
                move |op| async move { this.restore_inner(&op, name, params, labels).await },
            )
            .await?;
        Ok(())
    }

    /// A running pooled guest of the default image, made the caller's VM
    /// `name`; `None` when the pool has none ready.
    pub(super) async fn take_pooled(
        &self,
        op: &Operation,
        name: &str,
        params: &VmCreateParams,
    ) -> Result<Option<VmInfo>, VmError> {
        let Some(image) = self.store.default_image()? else {
            return Ok(None);
        };
        if !self.pool_serves(&image).await.unwrap_or(false) {
            return Ok(None);
        }
        let candidates = self.store.list_vms()?.into_iter().filter(|v| {
            v.labels.get(POOL_LABEL).is_some_and(|t| t != POOL_SOURCE)
                && v.state == VmState::Running
                && v.image_id == image.id
        });
        for v in candidates {
            let Ok(busy) = self.claim(&v, &op.op_id, "create") else {
                continue;
            };
            // Still pooled and running now that it is ours.
            let Ok(v) = self.find(&v.id) else { continue };
            if !v.labels.contains_key(POOL_LABEL) || v.state != VmState::Running {
                continue;
            }
            op.stage("pool");
            self.net
                .forwards()
                .check_free(&ForwardService::rows("", &params.ports)?)?;
            let mut labels = v.labels.clone();
            labels.remove(POOL_LABEL);
            if let Some(s) = &params.session {
                labels.insert(crate::sessions::SESSION_LABEL.to_owned(), s.clone());
            }
            self.store.rename_vm(&v.id, name, &labels)?;
            self.pool_wake.notify_one();
            info!(vm = %v.id, from = %v.name, name = %name, "taking a guest from the warm pool");
            self.net.dns().names().remove(&v.name);
            let vm = self.find(&v.id)?;
            if let Some(ip) = vm.guest_ip {
                self.net.dns().names().insert(name, ip);
            }
            let named = async {
                self.rename_guest(&vm).await?;
                // `creating` until settled, as a create's row (a daemon
                // that dies meanwhile rolls it back); its forwards are
                // recorded now and start when it runs.
                self.store
                    .update_vm_state(&vm.id, VmState::Creating, None)?;
                let forwards = ForwardService::rows(&vm.id, &params.ports)?;
                let pending = self.find(&vm.id)?;
                self.net.forwards().add(&pending, forwards).await?;
                Ok(())
            }
            .await;
            let info = self.settle_create(vm, named).await;
            drop(busy);
            return info.map(Some);
        }
        Ok(None)
    }

    /// The guest's hostname becomes its VM's new name.
    async fn rename_guest(&self, vm: &Vm) -> Result<(), VmError> {
        let client = self.agent(vm).await?;
        let argv: Vec<String> = vec![
            "/bin/sh".into(),
            "-c".into(),
            r#"echo "$1" > /proc/sys/kernel/hostname && echo "$1" > /etc/hostname"#.into(),
            "banger-rename".into(),
            vm.name.clone(),
        ];
        self.guest_change(vm, &client, "the hostname change", argv)
            .await
    }

    /// Pooled guests (running or on their way), for `vm list --all` and
    /// filters.
    pub(super) fn is_pooled(vm: &Vm) -> bool {
        vm.labels.contains_key(POOL_LABEL)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use banger_wire::methods::SecretGrant;

    #[test]
    fn only_creates_with_every_option_at_its_default_take_a_pooled_guest() {
        let plain = VmCreateParams {
            net: Some("nat".into()),
            ..Default::default()
        };
        assert!(default_shape(&plain, "nat"));
        assert!(!default_shape(&plain, "none"), "another policy");
        let sized = VmCreateParams {
            vcpus: Some(2),
            ..plain.clone()
        };
        assert!(!default_shape(&sized, "nat"));
        let secret = VmCreateParams {
            secrets: vec!["TOKEN@api.example.com".parse::<SecretGrant>().unwrap()],
            ..plain.clone()
        };
        assert!(
            !default_shape(&secret, "nat"),
            "a secret's guest is set up at create"
        );
    }
}
