//! `vm.create`: name and VMM checks, the row (the lease), disks, boot, and
//! the rollback of everything made when a step fails.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use banger_host::Accel;
use banger_rpc::EventSink;
use banger_store::{Image, InitMode, Vm, VmSecret, VmState, Vmm};
use banger_wire::OpId;
use banger_wire::methods::{VmCreateParams, VmInfo};
use tracing::{info, warn};

use super::VmError;
use super::disks::{make_disks, new_root_disk};
use super::{DEFAULT_DISK_MIB, DEFAULT_MEMORY_MIB, DEFAULT_VCPUS, VmService};
use crate::errors::chain;
use crate::forward::ForwardService;
use crate::network::GuestNet;
use crate::ops::{OpKind, Operation};
use banger_store::new_id;

pub use banger_wire::methods::CREATE_STEPS;

pub(super) fn valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 40
        && b[0].is_ascii_lowercase()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && !name.ends_with('-')
}

/// Smallest and largest sizes a VM may have, for `vm create` and `vm set` alike.
const MIN_MEMORY_MIB: u32 = 128;
const MAX_VCPUS: u32 = 255;
const MIN_DISK_MIB: u32 = 64;

pub(super) fn check_resources(vcpus: Option<u32>, memory_mib: Option<u32>) -> Result<(), VmError> {
    if let Some(n) = vcpus
        && !(1..=MAX_VCPUS).contains(&n)
    {
        return Err(VmError::Invalid(format!(
            "{n} vCPUs: a VM has from 1 to {MAX_VCPUS} vCPUs"
        )));
    }
    if let Some(m) = memory_mib
        && m < MIN_MEMORY_MIB
    {
        return Err(VmError::Invalid(format!(
            "{m} MiB of memory is too little: a VM needs at least {MIN_MEMORY_MIB} MiB"
        )));
    }
    // A guest given more than the host has can never use it, and its kernel
    // may not even boot (its page tables for that much memory alone do not
    // fit): it would hang at boot until the timeout instead of failing now.
    if let (Some(m), Some(host)) = (memory_mib, banger_host::memory_mib())
        && u64::from(m) > host
    {
        return Err(VmError::Invalid(format!(
            "{m} MiB of memory is more than this host has ({host} MiB): give a VM at most that"
        )));
    }
    Ok(())
}

/// What a failed create leaves in its VM's directory: the guest's console
/// log (and its capped older part), the record of why a boot failed that
/// the error points at with `banger vm logs`, until `vm delete` removes
/// the row. Without one, the directory goes too.
fn keep_only_console(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut kept = false;
    for e in entries.flatten() {
        let console = matches!(
            e.file_name().to_str(),
            Some("console.log" | "console.log.1")
        );
        match e.file_type() {
            Ok(t) if t.is_file() && console => kept = true,
            Ok(t) if t.is_dir() => drop(std::fs::remove_dir_all(e.path())),
            _ => drop(std::fs::remove_file(e.path())),
        }
    }
    if !kept {
        let _ = std::fs::remove_dir_all(dir);
    }
}

impl VmService {
    // -- create ---------------------------------------------------------------

    /// Create and boot a VM as operation `op_id`, through the runner: if the
    /// caller goes away, the VM is still finished or rolled back. `keep` is
    /// held until the operation ends (a session's claim on the VM).
    pub async fn create(
        self: &Arc<Self>,
        op_id: &OpId,
        params: VmCreateParams,
        events: &EventSink,
        keep: impl Send + 'static,
    ) -> Result<VmInfo, VmError> {
        let name = match params.name.clone() {
            Some(n) if valid_name(&n) => n,
            Some(n) => {
                return Err(VmError::Invalid(format!(
                    "VM name {n:?} is invalid: use 1-40 lowercase letters, digits and '-', starting with a letter"
                )));
            }
            None => format!("vm-{}", &new_id()[..6]),
        };
        if params.from_snapshot.is_some() {
            Self::check_restore_params(&params)?;
        }
        let vmm = self.requested_vmm(params.vmm)?;
        // Before any work: a bad size must not set up a bridge first.
        check_resources(params.vcpus, params.memory_mib)?;
        if let Some(d) = params.disk_mib
            && d < MIN_DISK_MIB
        {
            return Err(VmError::Invalid(format!(
                "a work disk of {d} MiB is too small: give at least {MIN_DISK_MIB} MiB"
            )));
        }
        check_wait(params.wait.as_deref())?;
        self.check_secrets(&params)?;
        let mut params = params;
        params.net = Some(self.net_policy(params.net.as_deref())?);
        let this = self.clone();
        let subject = name.clone();
        let labels = BTreeMap::new();
        self.ops
            .run(
                op_id,
                OpKind::VmCreate,
                &subject,
                events,
                move |op| async move {
                    let _keep = keep;
                    if params.from_snapshot.is_some() {
                        return this.restore_inner(&op, name, params, labels).await;
                    }
                    if this.poolable(&params)
                        && let Some(vm) = this.take_pooled(&op, &name, &params).await?
                    {
                        return Ok(vm);
                    }
                    this.create_inner(&op, name, vmm, params, labels).await
                },
            )
            .await
    }

    /// `--secret`s: each well formed, named once, stored, and not with a
    /// restore (its guest would hold another VM's placeholders).
    fn check_secrets(&self, params: &VmCreateParams) -> Result<(), VmError> {
        if params.from_snapshot.is_some() && !params.secrets.is_empty() {
            return Err(VmError::Invalid(
                "--secret cannot be given with a restore: a restored VM keeps the secrets of the VM its snapshot was taken from (their placeholders are in its guest's memory)".into(),
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        for grant in &params.secrets {
            if let Some(problem) = grant.problem() {
                return Err(VmError::Invalid(problem));
            }
            if !seen.insert(grant.name.as_str()) {
                return Err(VmError::Invalid(format!(
                    "secret {} is given twice: list all its hosts in one --secret",
                    grant.name
                )));
            }
            if !self.secrets.exists(&grant.name)? {
                return Err(VmError::NotFound(format!(
                    "no secret named {}: store it first with `banger secret set {}`",
                    grant.name, grant.name
                )));
            }
        }
        Ok(())
    }

    /// The canonical form of the policy asked for (`--net`), or of
    /// `[network] default_policy`.
    pub(super) fn net_policy(&self, asked: Option<&str>) -> Result<String, VmError> {
        match asked {
            None => Ok(self.net.default_policy().to_string()),
            Some(s) => s
                .parse::<banger_net::Policy>()
                .map(|p| p.to_string())
                .map_err(|e| VmError::Invalid(format!("--net {s:?}: {e}"))),
        }
    }

    /// An image whose services its systemd starts (the `dev` image's
    /// opencode) never gets ready under `--init fast`, where the agent is
    /// PID 1 and starts none: refused before anything is made, instead of
    /// after the services' timeout.
    fn check_init_starts_services(&self, image: &Image, init: InitMode) -> Result<(), VmError> {
        if init != InitMode::Fast || image.default_init != InitMode::Systemd {
            return Ok(());
        }
        let services = self.images.services(image);
        if services.is_empty() {
            return Ok(());
        }
        let names: Vec<&str> = services.iter().map(|s| s.name.as_str()).collect();
        Err(VmError::Invalid(format!(
            "image {:?} is ready only once its services are up ({}), which its init \
             (systemd) starts; --init fast starts none of them: leave --init out or \
             give --init systemd",
            image.name,
            names.join(", ")
        )))
    }

    /// The VMM the caller asked for, if any.
    pub(super) fn requested_vmm(&self, asked: Option<Vmm>) -> Result<Option<Vmm>, VmError> {
        match asked {
            Some(Vmm::Firecracker) if self.settings.firecracker.is_none() => {
                Err(VmError::Unavailable(
                    "firecracker was not found (set [vmm] firecracker_bin, see banger doctor)"
                        .into(),
                ))
            }
            asked => Ok(asked),
        }
    }

    pub(super) async fn create_inner(
        &self,
        op: &Operation,
        name: String,
        vmm: Option<Vmm>,
        params: VmCreateParams,
        labels: BTreeMap<String, String>,
    ) -> Result<VmInfo, VmError> {
        let image = self.images.resolve(params.image.as_deref(), op).await?;
        self.inject_fault("image").await?;
        // Not asked: Firecracker where it can run (found, and KVM usable), else QEMU.
        let vmm = match vmm {
            Some(v) => v,
            None if self.settings.firecracker.is_some()
                && self.accel(&image).await == Accel::Kvm =>
            {
                Vmm::Firecracker
            }
            None => Vmm::Qemu,
        };
        let init_mode = params.init.unwrap_or(image.default_init);
        self.check_init_starts_services(&image, init_mode)?;
        op.stage("allocate");
        let gnet = self.net.guest_net(&op.op_id, &self.taps_in_use()).await?;
        // Host ports first: a taken one fails the create before anything exists.
        self.net
            .forwards()
            .check_free(&ForwardService::rows("", &params.ports)?)?;
        // In flight before the row exists: gc never takes a create's row
        // (or anything it makes) for a leak.
        let _in_flight = self.gate.enter()?;
        let vm = self.insert_new_vm(&name, &image, vmm, init_mode, &params, gnet, labels)?;
        let id = vm.id.clone();
        let _busy = self.claim(&vm, &op.op_id, "create")?;
        let secrets: Vec<VmSecret> = params
            .secrets
            .iter()
            .map(|g| VmSecret {
                name: g.name.clone(),
                hosts: g.hosts.clone(),
                placeholder: crate::secrets::placeholder(&g.name),
                in_body: g.in_body,
            })
            .collect();
        if let Some(ip) = vm.guest_ip {
            self.net.dns().names().insert(&name, ip);
        }
        info!(vm = %id, name = %name, ip = ?vm.guest_ip, "creating VM");
        let wait_ssh = params.wait.as_deref() != Some("agent");
        let booted = async {
            self.store.add_vm_secrets(&id, &secrets)?;
            let forwards = ForwardService::rows(&id, &params.ports)?;
            self.net.forwards().add(&vm, forwards).await?;
            self.provision_and_boot(op, &vm, &image, gnet, wait_ssh)
                .await
        };
        let booted = booted.await;
        self.settle_create(vm, booted).await
    }

    /// The end of a create (or restore): the row becomes `running`, or
    /// everything made is undone and the row kept as `failed`.
    pub(super) async fn settle_create(
        &self,
        mut vm: Vm,
        booted: Result<(), VmError>,
    ) -> Result<VmInfo, VmError> {
        let (id, name) = (vm.id.clone(), vm.name.clone());
        match booted {
            Ok(()) => {
                self.store.update_vm_state(&id, VmState::Running, None)?;
                let _ = self.store.touch_vm_last_used(&id);
                vm = self.find(&id)?;
                self.net.forwards().start_vm(&vm).await;
                Ok(self.info(&vm))
            }
            Err(e) => {
                self.net.forwards().forget_vm(&id);
                // A failed row owns nothing: no secret may name it.
                let _ = self.store.remove_vm_secrets(&id);
                self.net.dns().names().remove(&name);
                warn!(vm = %id, error = %chain(&e), "create failed; rolling back");
                self.teardown(&vm).await;
                keep_only_console(&vm.vm_dir);
                // The row stays as a record of what failed, with the guest's
                // console (`vm logs`); it owns nothing else now.
                let _ = self
                    .store
                    .update_vm_state(&id, VmState::Failed, Some(&chain(&e)));
                Err(e)
            }
        }
    }

    /// Insert the VM's row with a fresh IP and MAC. The row is the lease:
    /// the UNIQUE columns make a concurrent create that picked the same
    /// address fail here, and it then picks again.
    // Everything the row holds goes in with its insert (labels too: a
    // pooled guest is one from its first statement).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn insert_new_vm(
        &self,
        name: &str,
        image: &Image,
        vmm: Vmm,
        init_mode: InitMode,
        params: &VmCreateParams,
        gnet: GuestNet,
        mut labels: BTreeMap<String, String>,
    ) -> Result<Vm, VmError> {
        // Durable: a daemon that restarts deletes the VMs of sessions,
        // which all ended with its connections.
        if let Some(s) = &params.session {
            labels.insert(crate::sessions::SESSION_LABEL.to_owned(), s.clone());
        }
        let mut attempt = 0;
        loop {
            attempt += 1;
            let id = new_id();
            let lease = |what: &str, e: banger_net::AllocError| {
                VmError::Conflict(format!("cannot lease a {what}: {e}"))
            };
            let ip = banger_net::next_guest_ip(gnet.subnet, &self.store.used_guest_ips()?)
                .map_err(|e| lease("guest address", e))?;
            let mac = banger_net::mac_for(&id, &self.store.used_macs()?)
                .map_err(|e| lease("MAC address", e))?;
            // The VMM's agent channel decides whether the VM needs a CID.
            let cid = if banger_vmm::agent_over_vsock(vmm, self.settings.vhost_vsock) {
                Some(
                    banger_net::next_vsock_cid(&self.store.used_cids()?, self.settings.first_cid)
                        .map_err(|e| lease("vsock CID", e))?,
                )
            } else {
                None
            };
            let vm_dir = self.vms_dir.join(&id);
            let control = banger_vmm::control_socket(vmm, &vm_dir);
            let vm = Vm {
                id,
                name: name.to_string(),
                image_id: image.id.clone(),
                vmm,
                init_mode,
                vcpus: params.vcpus.unwrap_or(DEFAULT_VCPUS),
                memory_mib: params.memory_mib.unwrap_or(DEFAULT_MEMORY_MIB),
                disk_mib: params.disk_mib.unwrap_or(DEFAULT_DISK_MIB),
                state: VmState::Creating,
                guest_ip: Some(ip),
                mac: Some(mac),
                vsock_cid: cid,
                dns_name: None,
                api_socket: Some(control),
                console_log: Some(vm_dir.join("console.log")),
                vm_dir,
                last_error: None,
                created_at: banger_store::now_ms(),
                last_used_at: None,
                labels: labels.clone(),
                net_policy: params
                    .net
                    .clone()
                    .unwrap_or_else(|| self.net.default_policy().to_string()),
            };
            match self.store.insert_vm(&vm) {
                Ok(()) => return Ok(vm),
                // A concurrent create leased the same address first: pick again.
                Err(banger_store::StoreError::Conflict(_)) if attempt < 5 => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    pub(super) async fn provision_and_boot(
        &self,
        op: &Operation,
        vm: &Vm,
        image: &Image,
        gnet: GuestNet,
        wait_ssh: bool,
    ) -> Result<(), VmError> {
        self.inject_fault("allocate").await?;
        op.stage("disks");
        let root = new_root_disk(self.settings.root_disks, vm.vmm);
        make_disks(vm, image, root, &self.helper, &op.op_id).await?;
        self.inject_fault("disks").await?;
        self.boot(op, vm, image, gnet, wait_ssh, None).await
    }
}

/// A create's or fork's `wait`: `agent` or `ssh`.
pub(super) fn check_wait(wait: Option<&str>) -> Result<(), VmError> {
    match wait {
        None | Some("agent" | "ssh") => Ok(()),
        Some(w) => Err(VmError::Invalid(format!(
            "wait {w:?} is not one of agent, ssh"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    pub(super) fn vm_names() {
        for ok in ["box", "a1", "my-vm-2"] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in [
            "",
            "1box",
            "Box",
            "my_vm",
            "a-",
            "has space",
            &"a".repeat(41),
        ] {
            assert!(!valid_name(bad), "{bad}");
        }
    }
}
