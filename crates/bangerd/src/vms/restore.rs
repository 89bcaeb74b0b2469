//! `vm.create` from a snapshot: a new VM (its own row, id, name, IP, MAC,
//! tap, hostname) whose disks are qcow2 overlays of its own over the
//! snapshot's frozen ones and whose QEMU loads the snapshot's state instead
//! of booting a kernel. The guest's agent is then told its new identity
//! (MAC, address, route, resolver, hostname, clock). Made and rolled back
//! exactly as a create: a restore is a create from a snapshot.

use std::collections::BTreeMap;
use std::time::Duration;

use banger_store::{Image, Snapshot, SnapshotMemory, SnapshotState, Vm};
use banger_wire::methods::{VmCreateParams, VmInfo};
use tracing::{info, warn};

use super::snapshot::{
    SNAPSHOT_LABEL, memory_file, memory_file_digest, root_file, sha256_file, state_file, work_file,
};
use super::{VmError, VmService};
use crate::errors::chain;
use crate::forward::ForwardService;
use crate::network::GuestNet;
use crate::ops::Operation;

/// How long loading a saved state may take.
pub(super) const LOAD_TIMEOUT: Duration = Duration::from_secs(120);

/// Sets the guest's identity after a restore where the guest's agent is
/// from before the `identity` request (in the memory of an older
/// snapshot), doing what that request does: `$1` MAC, `$2` address/prefix,
/// `$3` gateway, `$4` hostname, `$5` the host's time (Unix seconds), `$6` a
/// new machine-id, `$7` host entropy (hex), `$8` `new` for new sshd host
/// keys (`keep` keeps them), `$9`/`${10}` a new ed25519 host key (private,
/// public) and `${11}`/`${12}` an ecdsa one (empty with `keep`), then the
/// nameservers. Its interface is the first that is not `lo`; it comes up
/// with its new address and MAC already set and `arp_notify` on, so that it
/// announces them (a gratuitous ARP): the host may still hold the address
/// of a deleted VM in its neighbour cache, under that VM's MAC, and would
/// otherwise send there until the entry expired (5 s and more). Few processes
/// (`sh`, one `ip -batch`, `date`, the agent's `--reseed`): each costs tens of
/// milliseconds in a TCG guest. Under systemd, networkd configures the
/// interface from what systemd-network-generator made of the boot's `ip=`
/// (`/run/systemd/network/*-<dev>.network`) and would bring the snapshot's
/// address back: that file is rewritten and networkd restarted (the image
/// has no D-Bus for `networkctl reload`), which drops
/// the old address as no longer its own.
///
/// The kernel's random generator came back in the snapshot's state: every
/// restore of one snapshot would draw the same bytes. `banger-agent
/// --reseed` (in images of agents from then, built from a recipe or pulled) writes the
/// host's entropy to `/dev/urandom` (mixed into the input pool, not
/// credited), then `RNDRESEEDCRNG` makes the generator draw from that pool
/// now. An agent from before `--reseed` refuses it: the script then does
/// the same with `perl` where the guest has it, else says it could not
/// (the daemon logs it; the kernel reseeds on its own within a minute).
/// New sshd host keys replace each type the guest has: ed25519 and ecdsa
/// made by the host (a guest without KVM
/// takes a tenth of a second or more for each, after the restore; they
/// are written with shell builtins), any other type by the guest's
/// `ssh-keygen` after the reseed. sshd up to
/// OpenSSH 9.7 (Debian 12: 9.2) re-executes itself for each connection and
/// reads them there, so it is left running (a SIGHUP costs a TCG guest
/// most of a second of sshd start); one with `sshd-session` (9.8 on),
/// whose listener holds the keys, is told to reload (SIGHUP). `vm ssh`
/// does not pin host keys. That part, and the clock's step, run beside
/// the network's: each process costs a TCG guest a tenth of a second or
/// more.
const REIDENTIFY: &str = r#"set -e
date -u -s "@$5" > /dev/null &
clock=$!
(
    if ! printf '%s' "$7" | /usr/local/bin/banger-agent --reseed 2> /dev/null; then
        printf '%s' "$7" > /dev/urandom
        if ! command -v perl > /dev/null || ! perl -e 'open(my $f, ">", "/dev/urandom") or exit 1; ioctl($f, 0x5207, 0) or exit 1'; then
            echo "banger: cannot reseed the kernel's random generator" >&2
        fi
    fi
    if [ "$8" = new ]; then
        umask 077
        for k in /etc/ssh/ssh_host_*_key; do
            [ -f "$k" ] || continue
            t=${k#/etc/ssh/ssh_host_}; t=${t%_key}
            # Written in place (no process: sshd reads them only once the
            # guest is handed over); the files keep their modes.
            case $t in
            ed25519) printf '%s' "$9" > "$k"; printf '%s\n' "${10}" > "$k.pub" ;;
            ecdsa) printf '%s' "${11}" > "$k"; printf '%s\n' "${12}" > "$k.pub" ;;
            *)
                command -v ssh-keygen > /dev/null || continue
                rm -f "$k" "$k.pub"
                ssh-keygen -q -t "$t" -N '' -f "$k"
                ;;
            esac
        done
        for s in /usr/lib/openssh/sshd-session /usr/libexec/openssh/sshd-session /usr/libexec/sshd-session; do
            if [ -x "$s" ] && [ -f /run/sshd.pid ]; then read -r pid < /run/sshd.pid; kill -HUP "$pid" 2> /dev/null || true; break; fi
        done
    fi
) &
keys=$!
for d in /sys/class/net/*; do dev=${d##*/}; [ "$dev" = lo ] || break; done
networkd=
for f in /run/systemd/network/*-"$dev".network; do
    [ -f "$f" ] || continue
    printf '# Written by banger for a restored VM\n\n[Match]\nName=%s\n\n[Network]\nDHCP=no\n\n[DHCP]\nHostname=%s\n\n[Address]\nAddress=%s\n\n[Route]\nGateway=%s\n' "$dev" "$4" "$2" "$3" > "$f"
    networkd=1
done
{ echo 1 > "/proc/sys/net/ipv4/conf/$dev/arp_notify"; } 2> /dev/null || true
ip -batch - <<EOF
link set dev $dev down
link set dev $dev address $1
addr flush dev $dev
addr add $2 dev $dev
link set dev $dev up
route replace default via $3 dev $dev
EOF
if [ -n "$networkd" ]; then systemctl restart systemd-networkd; fi
echo "$4" > /proc/sys/kernel/hostname
echo "$4" > /etc/hostname
echo "$6" > /etc/machine-id
if [ -f /var/lib/dbus/machine-id ] && [ ! -L /var/lib/dbus/machine-id ]; then echo "$6" > /var/lib/dbus/machine-id; fi
shift 12
if [ $# -gt 0 ]; then printf 'nameserver %s\n' "$@" > /etc/resolv.conf; fi
wait "$clock"
wait "$keys"
"#;

/// What identifies one version of a file: a write changes its times, a
/// replacement its inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct FileStamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileStamp {
    pub(super) fn of(path: &std::path::Path) -> std::io::Result<FileStamp> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path)?;
        Ok(FileStamp {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        })
    }
}

/// How a boot restores instead: from which snapshot, and whether the
/// guest keeps the snapshot's sshd host keys.
#[derive(Debug, Clone, Copy)]
pub(super) struct Restore<'a> {
    pub snap: &'a Snapshot,
    pub keep_host_keys: bool,
}

/// `n` bytes of the host's random generator, in hex.
fn host_random(n: usize) -> Result<Vec<u8>, VmError> {
    use std::io::Read;
    let mut buf = vec![0u8; n];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .map_err(|e| VmError::Failed(format!("cannot read the host's /dev/urandom: {e}")))?;
    Ok(buf)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// [`REIDENTIFY`]'s command line for an agent from before `identity`.
fn reidentify_argv(r: &banger_agent_proto::IdentityRequest) -> Vec<String> {
    let mut argv: Vec<String> = vec![
        "/bin/sh".into(),
        "-c".into(),
        REIDENTIFY.into(),
        "banger-reidentify".into(),
        r.mac.clone(),
        r.address.clone(),
        r.gateway.clone(),
        r.hostname.clone(),
        r.clock.to_string(),
        r.machine_id.clone(),
        hex(&r.entropy),
    ];
    match &r.host_keys {
        None => {
            argv.push("keep".into());
            argv.extend(std::iter::repeat_n(String::new(), 4));
        }
        Some(keys) => {
            argv.push("new".into());
            for (private, public) in [&keys.ed25519, &keys.ecdsa] {
                argv.extend([private.clone(), public.clone()]);
            }
        }
    }
    argv.extend(r.nameservers.iter().cloned());
    argv
}

impl VmService {
    /// The checks of a create from a snapshot, before any work: the
    /// snapshot gives the image, VMM, sizes and init.
    pub(super) fn check_restore_params(params: &VmCreateParams) -> Result<(), VmError> {
        let given: Vec<&str> = [
            ("--image", params.image.is_some()),
            ("--vcpus", params.vcpus.is_some()),
            ("--memory", params.memory_mib.is_some()),
            ("--disk", params.disk_mib.is_some()),
            ("--init", params.init.is_some()),
            ("--vmm", params.vmm.is_some()),
        ]
        .into_iter()
        .filter_map(|(flag, set)| set.then_some(flag))
        .collect();
        if given.is_empty() {
            Ok(())
        } else {
            Err(VmError::Invalid(format!(
                "a VM restored from a snapshot has the snapshot's image, VMM, sizes and init: drop {}",
                given.join(", ")
            )))
        }
    }

    /// The snapshot a restore may use: ready, taken by this host's QEMU,
    /// and whole (its state file's checksum is the recorded one).
    async fn usable_snapshot(&self, key: &str) -> Result<Snapshot, VmError> {
        let snap = self.store.find_snapshot(key)?;
        if snap.state != SnapshotState::Ready {
            return Err(VmError::Conflict(format!(
                "snapshot {:?} is still being taken; restore it when that is done",
                snap.name
            )));
        }
        let here = self.vmm_version(snap.vmm).await?;
        if here != snap.vmm_version {
            return Err(VmError::Conflict(format!(
                "snapshot {:?} was taken by {:?} but this host runs {here:?}: a saved state loads only in the {} that wrote it; boot a new VM instead (banger vm create)",
                snap.name, snap.vmm_version, snap.vmm
            )));
        }
        self.check_snapshot_host(&snap, &self.store.image_by_id(&snap.image_id)?)
            .await?;
        let sha = sha256_file(&state_file(&snap.dir)).await.map_err(|e| {
            VmError::Failed(format!(
                "snapshot {:?} cannot be read ({e}); delete it (banger snapshot delete {})",
                snap.name, snap.name
            ))
        })?;
        if sha != snap.state_sha256 {
            return Err(VmError::Failed(format!(
                "snapshot {:?} is corrupt: its state file {} does not match the checksum recorded when it was taken; delete it (banger snapshot delete {})",
                snap.name,
                state_file(&snap.dir).display(),
                snap.name
            )));
        }
        if snap.memory == SnapshotMemory::File {
            self.check_memory_file(&snap).await?;
        }
        for f in [root_file(&snap), work_file(&snap.dir)] {
            if !f.is_file() {
                return Err(VmError::Failed(format!(
                    "snapshot {:?} is incomplete: {} is missing; delete it (banger snapshot delete {})",
                    snap.name,
                    f.display(),
                    snap.name
                )));
            }
        }
        Ok(snap)
    }

    /// The snapshot's saved state needs this host's accelerator to be the
    /// one it was taken under, and under KVM this host's CPU to be its
    /// (the guest ran with `-cpu host`).
    async fn check_snapshot_host(&self, snap: &Snapshot, image: &Image) -> Result<(), VmError> {
        if !snap.accel.is_empty() {
            let here = self.accel(image).await.to_string();
            if here != snap.accel {
                return Err(VmError::Conflict(format!(
                    "snapshot {:?} was taken under {} but this host runs VMs under {here}: a saved state loads only under the accelerator that made it; boot a new VM instead (banger vm create)",
                    snap.name, snap.accel
                )));
            }
        }
        let cpu = banger_host::cpu_identity().unwrap_or_default();
        if !snap.cpu.is_empty() && cpu != snap.cpu {
            return Err(VmError::Conflict(format!(
                "snapshot {:?} was taken on CPU {:?} but this host's is {cpu:?}: a KVM guest's saved state holds its host CPU's features; boot a new VM instead (banger vm create)",
                snap.name, snap.cpu
            )));
        }
        Ok(())
    }

    /// A snapshot's memory file holds what was saved: its digest is the
    /// recorded one. Checked once per version of the file (its inode,
    /// size and times): the file is as large as the guest's RAM in use,
    /// and reading it all again for each restore would cost a fork more
    /// than the rest of its restore.
    async fn check_memory_file(&self, snap: &Snapshot) -> Result<(), VmError> {
        let file = memory_file(&snap.dir);
        let stamp = FileStamp::of(&file).map_err(|e| {
            VmError::Failed(format!(
                "snapshot {:?} is incomplete: {}: {e}; delete it (banger snapshot delete {})",
                snap.name,
                file.display(),
                snap.name
            ))
        })?;
        if self.verified_memory.lock().expect("verified").get(&snap.id) == Some(&stamp) {
            return Ok(());
        }
        let digest = memory_file_digest(&file).await.map_err(|e| {
            VmError::Failed(format!(
                "snapshot {:?} cannot be read ({e}); delete it (banger snapshot delete {})",
                snap.name, snap.name
            ))
        })?;
        if digest != snap.memory_sha256 {
            return Err(VmError::Failed(format!(
                "snapshot {:?} is corrupt: its memory file {} does not match the checksum recorded when it was taken; delete it (banger snapshot delete {})",
                snap.name,
                file.display(),
                snap.name
            )));
        }
        self.verified_memory
            .lock()
            .expect("verified")
            .insert(snap.id.clone(), stamp);
        Ok(())
    }

    /// The work of `vm.create --from SNAP`, in the runner.
    pub(super) async fn restore_inner(
        &self,
        op: &Operation,
        name: String,
        mut params: VmCreateParams,
        mut labels: BTreeMap<String, String>,
    ) -> Result<VmInfo, VmError> {
        op.stage("image");
        let key = params.from_snapshot.clone().unwrap_or_default();
        let snap = self.usable_snapshot(&key).await?;
        let image = self.store.image_by_id(&snap.image_id)?;
        self.inject_fault("image").await?;
        op.stage("allocate");
        let gnet = self.net.guest_net(&op.op_id, &self.taps_in_use()).await?;
        self.net
            .forwards()
            .check_free(&ForwardService::rows("", &params.ports)?)?;
        let _in_flight = self.gate.enter()?;
        params.vcpus = Some(snap.vcpus);
        params.memory_mib = Some(snap.memory_mib);
        params.disk_mib = Some(snap.disk_mib);
        labels.insert(SNAPSHOT_LABEL.to_owned(), snap.id.clone());
        let vm = self.insert_new_vm(
            &name,
            &image,
            snap.vmm,
            snap.init_mode,
            &params,
            gnet,
            labels,
        )?;
        let id = vm.id.clone();
        let _busy = self.claim(&vm, &op.op_id, "create")?;
        if let Some(ip) = vm.guest_ip {
            self.net.dns().names().insert(&name, ip);
        }
        info!(vm = %id, name = %name, snapshot = %snap.id, ip = ?vm.guest_ip, "restoring VM from snapshot");
        let wait_ssh = params.wait.as_deref() != Some("agent");
        let booted = async {
            // The snapshot's secrets, placeholders and all: the restored
            // guest holds them (a failed restore's row gives them back);
            // and its workspaces' host repositories.
            self.store
                .add_vm_secrets(&id, &self.store.snapshot_secrets(&snap.id)?)?;
            self.store.restore_vm_workspaces(&id, &snap.id)?;
            let forwards = ForwardService::rows(&id, &params.ports)?;
            self.net.forwards().add(&vm, forwards).await?;
            self.inject_fault("allocate").await?;
            op.stage("disks");
            super::disks::make_restore_disks(
                &vm,
                snap.vmm,
                &root_file(&snap),
                snap.root_qcow2,
                &work_file(&snap.dir),
            )
            .await?;
            self.inject_fault("disks").await?;
            let restore = Restore {
                snap: &snap,
                keep_host_keys: params.keep_host_keys,
            };
            self.boot(op, &vm, &image, gnet, wait_ssh, Some(restore))
                .await
        }
        .await;
        self.settle_create(vm, booted).await
    }

    /// After a restored guest runs: give it this VM's identity.
    pub(super) async fn reidentify(
        &self,
        vm: &Vm,
        gnet: GuestNet,
        client: &banger_agent_proto::AgentClient,
        keep_host_keys: bool,
    ) -> Result<(), VmError> {
        let (Some(ip), Some(mac)) = (vm.guest_ip, vm.mac.as_deref()) else {
            return Ok(());
        };
        let clock = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let host_keys = if keep_host_keys {
            None
        } else {
            let comment = format!("root@{}", vm.name);
            let (ed25519, ecdsa) = tokio::join!(
                crate::ssh::key_pair("ed25519", &comment),
                crate::ssh::key_pair("ecdsa", &comment)
            );
            let pair = |p: Result<(String, String), crate::ssh::SshKeyError>| {
                p.map_err(|e| VmError::Failed(chain(&e)))
            };
            Some(banger_agent_proto::HostKeys {
                ed25519: pair(ed25519)?,
                ecdsa: pair(ecdsa)?,
            })
        };
        let request = banger_agent_proto::IdentityRequest {
            mac: mac.to_string(),
            address: format!("{ip}/{}", gnet.subnet.prefix_len()),
            gateway: gnet.gateway.to_string(),
            hostname: vm.name.clone(),
            clock,
            machine_id: hex(&host_random(16)?),
            entropy: host_random(64)?,
            host_keys,
            nameservers: self
                .net
                .dns()
                .guest_nameservers()
                .iter()
                .map(|n| n.to_string())
                .collect(),
        };
        let answer = self
            .agent_call(vm, "the identity change", async {
                match client.identity(request.clone()).await {
                    Err(banger_agent_proto::AgentError::Remote { source, .. }) => Ok(Err(source)),
                    other => other.map(Ok),
                }
            })
            .await?;
        match answer {
            Ok(done) => {
                for warning in done.warnings {
                    warn!(vm = %vm.id, %warning, "the identity change went on past a warning");
                }
                Ok(())
            }
            // An agent from before `identity` (in an older snapshot's
            // memory): the script does the same through exec.
            Err(e) if e.code == banger_agent_proto::RemoteErrorCode::UnknownMethod => {
                self.guest_change(vm, client, "the identity change", reidentify_argv(&request))
                    .await
            }
            Err(e) => Err(VmError::Failed(format!(
                "the identity change failed in VM {:?}'s guest: {}",
                vm.name, e.message
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The script's positional parameters, as its comment numbers them.
    #[test]
    fn the_fallback_script_gets_the_request_in_its_positions() {
        let mut r = banger_agent_proto::IdentityRequest {
            mac: "0e:00:00:00:00:07".into(),
            address: "172.30.0.7/24".into(),
            gateway: "172.30.0.1".into(),
            hostname: "f-1".into(),
            clock: 1_790_000_000,
            machine_id: "00ff".into(),
            entropy: vec![0, 255, 16],
            host_keys: None,
            nameservers: vec!["172.30.0.1".into(), "10.0.0.53".into()],
        };
        let argv = reidentify_argv(&r);
        assert_eq!(&argv[..3], ["/bin/sh", "-c", REIDENTIFY]);
        // $0, then $1..: after `shift 12`, the nameservers.
        let params = &argv[3..];
        assert_eq!(
            params,
            [
                "banger-reidentify",
                "0e:00:00:00:00:07",
                "172.30.0.7/24",
                "172.30.0.1",
                "f-1",
                "1790000000",
                "00ff",
                "00ff10",
                "keep",
                "",
                "",
                "",
                "",
                "172.30.0.1",
                "10.0.0.53"
            ]
        );
        r.host_keys = Some(banger_agent_proto::HostKeys {
            ed25519: ("EDK".into(), "EDP".into()),
            ecdsa: ("ECK".into(), "ECP".into()),
        });
        let argv = reidentify_argv(&r);
        assert_eq!(&argv[3 + 8..3 + 13], ["new", "EDK", "EDP", "ECK", "ECP"]);
    }
}
