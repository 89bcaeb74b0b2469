//! The leak check: banger-owned resources that no live VM explains. One
//! function serves the tests, `banger doctor` and `banger gc`.

use std::collections::HashSet;

use banger_store::VmState;
use banger_vmm::{Handles, is_alive, process_identity};
use banger_wire::OpId;
use banger_wire::methods::Leak;
use tracing::{info, warn};

use super::VmError;
use super::VmService;
use super::disks::{self, SnapshotHelper};

fn leak(kind: &str, name: impl Into<String>, detail: impl Into<String>) -> Leak {
    Leak {
        kind: kind.into(),
        name: name.into(),
        detail: detail.into(),
    }
}

impl VmService {
    /// Everything banger owns that no live VM explains.
    pub async fn leaks(&self, op_id: &OpId) -> Result<Vec<Leak>, VmError> {
        // Disk devices first: a create that attaches after this call is not
        // listed, one that attached before has its row (busy) below.
        let disk_devices = match banger_host::device_mapper() {
            Ok(()) => Some(self.helper.list(op_id).await?),
            Err(_) => None,
        };
        let vms = self.store.list_vms()?;
        let ids: HashSet<&str> = vms.iter().map(|v| v.id.as_str()).collect();
        let mut out = Vec::new();

        // VM directories without a row.
        if let Ok(entries) = std::fs::read_dir(&self.vms_dir) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if !ids.contains(name.as_str()) {
                    out.push(leak(
                        "vm_dir",
                        e.path().display().to_string(),
                        "no VM owns this directory",
                    ));
                }
            }
        }
        let mut live_pids = HashSet::new();
        let mut live_taps = HashSet::new();
        let any_busy = vms.iter().any(|vm| self.is_busy(&vm.id));
        // VMs whose root disk snapshot may exist: running, or mid-operation.
        let mut live_vms = HashSet::new();
        for vm in &vms {
            let busy = self.is_busy(&vm.id);
            if busy {
                live_vms.insert(vm.id.as_str());
            }
            match (vm.state, self.handles(&vm.id)) {
                (VmState::Running, Some(h)) if is_alive(&h) => {
                    live_pids.insert(h.pid);
                    live_taps.extend(h.tap);
                    live_vms.insert(vm.id.as_str());
                }
                (VmState::Creating | VmState::Deleting, _) if !busy => {
                    out.push(leak(
                        "vm_row",
                        &vm.name,
                        format!("{} with no operation running", vm.state),
                    ));
                }
                _ => {}
            }
            if vm.state != VmState::Running && !busy && vm.vm_dir.join("handles.json").exists() {
                out.push(leak(
                    "handles",
                    vm.vm_dir.join("handles.json").display().to_string(),
                    format!("VM {:?} is {}", vm.name, vm.state),
                ));
            }
        }
        // VMM processes serving a control socket under our VMs dir that no running VM owns.
        let vms_dir = self.vms_dir.display().to_string();
        for pid in banger_vmm::pids() {
            if live_pids.contains(&pid) {
                continue;
            }
            let Some(id) = process_identity(pid) else {
                continue;
            };
            let ours = !id.zombie
                && owned_by_us(pid)
                && id
                    .cmdline
                    .iter()
                    .any(|a| is_our_vmm_socket_arg(a, &vms_dir));
            if ours {
                out.push(leak(
                    "vmm_process",
                    pid.to_string(),
                    id.cmdline.join(" ").chars().take(160).collect::<String>(),
                ));
            }
        }
        // TAP devices on our bridge held by neither a VM nor the pool.
        let (taps, pool) = self.net.bridge_taps(op_id).await?;
        let unexplained: Vec<String> = taps
            .into_iter()
            .filter(|t| !live_taps.contains(t) && !pool.contains(t))
            .collect();
        out.extend(
            unexplained
                .into_iter()
                .map(|t| leak("tap", t, "on banger's bridge; no VM or pool holds it")),
        );
        // Guards and policies no running VM holds (a daemon killed between
        // guarding a tap and recording its VM). A VM mid-operation may hold
        // one not recorded yet: none are listed then (gc runs alone).
        if !any_busy {
            out.extend(self.guard_leaks(op_id, true).await?);
        }
        if let Some(listed) = disk_devices {
            out.extend(disks::leaks(&listed, &live_vms));
        }
        out.extend(self.snapshot_leaks()?);
        Ok(out)
    }

    /// Remove what [`VmService::leaks`] finds. Refused while VM operations
    /// run (a half-made VM is not a leak), and no VM operation starts until
    /// the removal is done: the leaks are found and removed under one view
    /// of what runs.
    pub async fn gc(&self, op_id: &OpId, dry_run: bool) -> Result<Vec<Leak>, VmError> {
        let _sweeping = if dry_run {
            None
        } else {
            Some(self.gate.sweep()?)
        };
        let leaks = self.leaks(op_id).await?;
        if dry_run {
            return Ok(leaks);
        }
        for l in &leaks {
            let result = match l.kind.as_str() {
                "vm_dir" => std::fs::remove_dir_all(&l.name).map_err(|e| e.to_string()),
                "handles" => std::fs::remove_file(&l.name).map_err(|e| e.to_string()),
                "vm_row" => match self.store.find_vm(&l.name) {
                    Ok(vm) => {
                        if let Ok(Some(h)) = Handles::load(&vm.vm_dir) {
                            let _ = banger_vmm::stop(&h, std::time::Duration::from_secs(2)).await;
                        }
                        disks::detach(&*self.helper, op_id, &vm.id, &vm.vm_dir).await;
                        let _ = std::fs::remove_dir_all(&vm.vm_dir);
                        self.store.delete_vm(&vm.id).map_err(|e| e.to_string())
                    }
                    Err(e) => Err(e.to_string()),
                },
                "vmm_process" => l
                    .name
                    .parse::<i32>()
                    .ok()
                    .and_then(rustix::process::Pid::from_raw)
                    .map(|pid| {
                        rustix::process::kill_process(pid, rustix::process::Signal::KILL)
                            .map_err(|e| e.to_string())
                    })
                    .unwrap_or(Ok(())),
                "tap" => self
                    .net
                    .delete_tap(op_id, &l.name)
                    .await
                    .map_err(|e| e.to_string()),
                "dm" | "loop" => disks::remove_leak(&*self.helper, op_id, l).await,
                // All at once, below.
                "guard" | "policy" => Ok(()),
                "snapshot_dir" => std::fs::remove_dir_all(&l.name).map_err(|e| e.to_string()),
                "snapshot_row" => self
                    .store
                    .find_snapshot(&l.name)
                    .map(|s| self.remove_snapshot(&s))
                    .map_err(|e| e.to_string()),
                _ => Ok(()),
            };
            match result {
                Ok(()) => info!(kind = %l.kind, name = %l.name, "gc removed a leaked resource"),
                Err(e) => {
                    warn!(kind = %l.kind, name = %l.name, error = %e, "gc could not remove a leaked resource")
                }
            }
        }
        if leaks
            .iter()
            .any(|l| l.kind == "guard" || l.kind == "policy")
            && let Err(e) = self.guard_leaks(op_id, false).await
        {
            warn!(error = %e, "gc could not remove stray guards");
        }
        Ok(leaks)
    }

    /// The tap guards and guest policies in banger's table that no running
    /// VM holds, removed unless `dry_run`.
    async fn guard_leaks(&self, op_id: &OpId, dry_run: bool) -> Result<Vec<Leak>, VmError> {
        let mut taps = Vec::new();
        let mut ips = Vec::new();
        for vm in self.store.list_vms()? {
            if let (VmState::Running, Some(h)) = (vm.state, self.handles(&vm.id))
                && is_alive(&h)
            {
                taps.extend(h.tap);
                ips.extend(vm.guest_ip);
            }
        }
        let swept = self.net.sweep_guards(op_id, taps, ips, dry_run).await?;
        let guards = swept
            .taps
            .into_iter()
            .map(|t| leak("guard", t, "a tap guard no running VM holds"));
        let policies = swept
            .ips
            .into_iter()
            .map(|ip| leak("policy", ip, "a guest policy no running VM holds"));
        Ok(guards.chain(policies).collect())
    }
}

/// Does a VMM argument name a control socket of one of this install's VMs,
/// `<vms_dir>/<vm id>/qmp.sock` or `…/firecracker.sock`, as a whole path
/// (`unix:PATH,server` and `--api-sock PATH` alike)? A substring match
/// would also take another install's `<vms_dir>-other/…`.
fn is_our_vmm_socket_arg(arg: &str, vms_dir: &str) -> bool {
    arg.split([',', '=', ':']).any(|token| {
        let Some(rest) = token
            .strip_prefix(vms_dir)
            .and_then(|r| r.strip_prefix('/'))
        else {
            return false;
        };
        match rest.split_once('/') {
            Some((id, sock)) => {
                !id.is_empty()
                    && id.bytes().all(|b| b.is_ascii_alphanumeric())
                    && (sock == "qmp.sock" || sock == "firecracker.sock")
            }
            None => false,
        }
    })
}

/// Is `pid` our uid's process (any process, when we are root)?
fn owned_by_us(pid: u32) -> bool {
    use std::os::unix::fs::MetadataExt;
    let me = rustix::process::getuid();
    me.is_root() || std::fs::metadata(format!("/proc/{pid}")).is_ok_and(|m| m.uid() == me.as_raw())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vmm_sockets_match_whole_paths_of_this_install_only() {
        let dir = "/home/a/.local/state/banger/vms";
        for ours in [
            "unix:/home/a/.local/state/banger/vms/3fa2b1/qmp.sock,server=on,wait=off",
            "/home/a/.local/state/banger/vms/3fa2b1/firecracker.sock",
        ] {
            assert!(is_our_vmm_socket_arg(ours, dir), "{ours}");
        }
        for theirs in [
            "unix:/home/a/.local/state/banger/vms-other/3fa2b1/qmp.sock,server=on",
            "unix:/x/home/a/.local/state/banger/vms/3fa2b1/qmp.sock",
            "/home/a/.local/state/banger/vms/3fa2b1/sub/qmp.sock",
            "/home/a/.local/state/banger/vms/3fa2b1/console.log",
            "/home/a/.local/state/banger/vms/../x/qmp.sock",
        ] {
            assert!(!is_our_vmm_socket_arg(theirs, dir), "{theirs}");
        }
    }
}
