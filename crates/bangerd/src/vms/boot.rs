//! Booting a VM whose disks exist: the accelerator (settled by a KVM test
//! boot), the VMM, the kernel, the agent and sshd.

use std::sync::Arc;
use std::time::{Duration, Instant};

use banger_host::Accel;
use banger_store::{Image, InitMode, SnapshotMemory, Vm, Vmm};
use banger_vmm::qemu;
use banger_vmm::{Driver, GuestMemory, Handles, LaunchIntent, LaunchSpec, NetSpec, is_alive};
use tracing::{debug, info, warn};

use super::VmError;
use super::VmService;
use super::disks::{RootDisk, existing_root_disk, root_disk_spec, work_disk_spec};
use crate::errors::chain;
use crate::network::GuestNet;
use crate::ops::Operation;

/// How long a booting guest may take to answer its agent (TCG is slow).
pub(super) const BOOT_TIMEOUT: Duration = Duration::from_secs(180);

/// How the accelerator is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccelPlan {
    /// Configured, or the only one the host offers.
    Fixed(Accel),
    /// `accel = "auto"` and KVM looks usable: the first boot confirms it
    /// with a test boot of the image's kernel (cached per host boot), and
    /// uses TCG if KVM cannot run it.
    ProbeKvm,
}

/// How long the KVM test boot may take (hardware KVM: about a second).
const KVM_PROBE_TIMEOUT: Duration = Duration::from_secs(10);

impl VmService {
    /// time KVM needs confirming.
    pub(super) async fn accel(&self, image: &Image) -> Accel {
        let AccelPlan::Fixed(accel) = self.settings.accel else {
            return *self.accel.get_or_init(|| self.probe_kvm(image)).await;
        };
        accel
    }

    /// At daemon start: run the KVM test boot in the background when it is
    /// due and the default image is there to boot (else the first create
    /// runs it).
    pub async fn settle_accel(self: Arc<Self>) {
        if self.settings.accel != AccelPlan::ProbeKvm {
            return;
        }
        if let Ok(Some(image)) = self.store.default_image()
            && image.state == banger_store::ImageState::Ready
        {
            self.accel(&image).await;
        }
    }

    pub(super) async fn probe_kvm(&self, image: &Image) -> Accel {
        if let Some(p) = banger_host::KvmProbe::load(&self.state_dir) {
            info!(usable = p.usable, detail = %p.detail, "KVM test boot (cached for this host boot)");
            return if p.usable { Accel::Kvm } else { Accel::Tcg };
        }
        let kernel = image.vmlinux_path.as_ref().unwrap_or(&image.kernel_path);
        let result = qemu::probe_boot(
            &self.settings.qemu.bin,
            Accel::Kvm,
            kernel,
            image.initrd_path.as_deref(),
            &self.state_dir.join("kvm-probe"),
            KVM_PROBE_TIMEOUT,
        )
        .await;
        let probe = banger_host::KvmProbe {
            boot_id: banger_host::current_boot_id().unwrap_or_default(),
            usable: result.is_ok(),
            detail: match &result {
                Ok(took) => format!("booted to userspace in {:.2}s", took.as_secs_f64()),
                Err(why) => why.clone(),
            },
        };
        match &result {
            Ok(_) => info!(detail = %probe.detail, "KVM test boot: using KVM"),
            Err(why) => warn!(why = %why, "KVM cannot run a stock kernel here; using TCG"),
        }
        let _ = std::fs::remove_dir(self.state_dir.join("kvm-probe"));
        if let Err(e) = probe.save(&self.state_dir) {
            warn!(error = %e, "cannot cache the KVM test boot");
        }
        if probe.usable { Accel::Kvm } else { Accel::Tcg }
    }

    pub(super) fn driver(&self, vmm: Vmm) -> Result<Driver, VmError> {
        match vmm {
            Vmm::Qemu => Ok(Driver::Qemu(self.settings.qemu.clone())),
            Vmm::Firecracker => self
                .settings
                .firecracker
                .clone()
                .map(Driver::Firecracker)
                .ok_or_else(|| {
                    VmError::Unavailable(
                        "this VM uses firecracker, which is not found any more (see banger doctor)"
                            .into(),
                    )
                }),
        }
    }

    /// Start the VMM for an existing VM dir and wait for its agent (and sshd).
    pub(super) async fn boot(
        &self,
        op: &Operation,
        vm: &Vm,
        image: &Image,
        gnet: GuestNet,
        wait_ssh: bool,
        restore: Option<super::restore::Restore<'_>>,
    ) -> Result<(), VmError> {
        let driver = self.driver(vm.vmm)?;
        op.stage("network");
        let addr = vm.mac.as_deref().zip(vm.guest_ip);
        // Before its tap is guarded: the guard redirects to the proxy.
        if let Some(ip) = vm.guest_ip {
            self.serve_secrets(&vm.id, ip, gnet.gateway).await?;
        }
        let tap = match self.net.acquire_tap(&op.op_id, &self.taps_in_use()).await {
            Ok(tap) => tap,
            Err(e) => {
                // No tap, so no release to unregister it.
                if let Some(ip) = vm.guest_ip {
                    self.net.proxy().unregister(ip);
                }
                return Err(e.into());
            }
        };
        // As soon as the tap is this VM's, and before the VMM can outlive
        // this daemon: how the next daemon finds both (and frees them) if
        // this one dies before the handles are written.
        let intent = LaunchIntent {
            vmm: vm.vmm,
            control_socket: banger_vmm::control_socket(vm.vmm, &vm.vm_dir),
            tap: Some(tap.clone()),
        }
        .save(&vm.vm_dir)
        .map_err(|e| VmError::Failed(chain(&e)));
        // This boot's console output starts here: the log is appended to
        // across boots.
        let console_from = banger_vmm::console_offset(&vm.vm_dir.join("console.log"));
        let (launched, guarded) = match intent.and(self.inject_fault("network").await) {
            Ok(()) => {
                op.stage("vmm start");
                let accel = self.accel(image).await;
                let root = existing_root_disk(&vm.vm_dir);
                let mut spec = self.launch_spec(vm, image, gnet, &tap, root, accel);
                if let Some(r) = &restore {
                    spec.incoming = true;
                    spec.memory = match r.snap.memory {
                        SnapshotMemory::File => {
                            GuestMemory::Snapshot(super::snapshot::memory_file(&r.snap.dir))
                        }
                        SnapshotMemory::Stream => GuestMemory::Private,
                        SnapshotMemory::State => GuestMemory::Default,
                    };
                }
                let launch = async {
                    let launched = driver.launch(&spec).await.map_err(|e| {
                        let msg = format!("cannot start VM {:?}: {}", vm.name, chain(&e));
                        match e {
                            banger_vmm::VmmError::DiskInUse { .. } => VmError::Conflict(msg),
                            _ => VmError::Failed(msg),
                        }
                    });
                    if launched.is_ok() {
                        // What of the guard the VMM's start did not hide.
                        op.stage("tap guard");
                    }
                    launched
                };
                // The tap's guard is made while the VMM starts: until it is
                // there the table drops all the tap carries, a restored
                // guest runs only once its state is loaded (after this), and
                // a booting kernel sends nothing for far longer than a guard
                // takes. A guard that failed fails the boot below.
                let guard = async {
                    match addr {
                        Some((mac, ip)) => {
                            self.net
                                .guard_tap(&op.op_id, &tap, mac, ip, &vm.net_policy)
                                .await
                        }
                        None => Ok(()),
                    }
                };
                tokio::join!(launch, guard)
            }
            Err(e) => (Err(e), Ok(())),
        };
        let (handles, boot_media) = match launched {
            Ok(launched) => launched,
            Err(e) => {
                LaunchIntent::remove(&vm.vm_dir);
                self.net.release_tap(tap, vm.guest_ip).await;
                return Err(e);
            }
        };
        // Until the handles are recorded, the intent owns the VMM and the
        // tap: teardown ends and frees them through it.
        self.inject_fault("vmm launched").await?;
        // From here on the handles own the tap: teardown releases it.
        self.entry(&vm.id).state.lock().expect("vm state").handles = Some(handles.clone());
        handles
            .save(&vm.vm_dir)
            .map_err(|e| VmError::Failed(chain(&e)))?;
        LaunchIntent::remove(&vm.vm_dir);
        self.inject_fault("vmm start").await?;
        // With the handles recorded: teardown stops the VMM and frees the tap.
        guarded?;
        self.inject_fault("tap guard").await?;
        let booted = Instant::now();
        let restored = restore.is_some();
        let client = match restore {
            Some(super::restore::Restore {
                snap,
                keep_host_keys,
            }) => {
                op.stage("restore state");
                let memory = super::snapshot::memory_file(&snap.dir);
                banger_vmm::load_state(
                    &handles,
                    &super::snapshot::state_file(&snap.dir),
                    (snap.memory == SnapshotMemory::File).then_some(memory.as_path()),
                    super::restore::LOAD_TIMEOUT,
                )
                .await
                .map_err(|e| {
                    VmError::Failed(format!(
                        "cannot restore snapshot {:?} into VM {:?}: {}",
                        snap.name,
                        vm.name,
                        chain(&e)
                    ))
                })?;
                self.inject_fault("kernel boot").await?;
                op.stage("agent ready");
                let client = self.connect_agent(vm, &handles, BOOT_TIMEOUT).await?;
                op.stage("identity");
                self.reidentify(vm, gnet, &client, keep_host_keys).await?;
                client
            }
            None => {
                op.stage("kernel boot");
                // The console marker ends "kernel boot"; an agent that answers
                // first (a console we cannot read) ends it too.
                let agent = self.connect_agent(vm, &handles, BOOT_TIMEOUT);
                tokio::pin!(agent);
                let client = tokio::select! {
                    seen = wait_console(&vm.name, &handles, console_from, BOOT_TIMEOUT) => {
                        seen?;
                        op.stage("agent ready");
                        agent.await?
                    }
                    answered = &mut agent => {
                        op.stage("agent ready");
                        answered?
                    }
                };
                self.inject_fault("kernel boot").await?;
                // The guest runs its own init: the kernel and initrd are
                // read, and QEMU's copies of them can go.
                let freed = boot_media.release();
                debug!(freed, "the kernel and initrd copies released");
                client
            }
        };
        self.agent_call(
            vm,
            "the SSH key push",
            client.authorize_keys(self.ssh.authorized_keys()),
        )
        .await
        .map_err(|e| match e {
            VmError::Agent(e) => VmError::Failed(format!(
                "cannot authorize SSH keys in the guest: {}",
                chain(&e)
            )),
            timeout => timeout,
        })?;
        self.give_guest_placeholders(vm, &client).await?;
        *self.entry(&vm.id).agent.lock().await = Some(client.clone());
        self.inject_fault("agent ready").await?;
        // Images pulled or imported without an sshd have none to wait for.
        // A guest with no network has no sshd the host can reach.
        let wait_ssh = wait_ssh && vm.net_policy != banger_net::Policy::None.to_string();
        if let (true, Some(ip)) = (wait_ssh && self.images.has_sshd(image), vm.guest_ip) {
            op.stage("ssh ready");
            let left = BOOT_TIMEOUT.saturating_sub(booted.elapsed());
            if restored {
                self.wait_sshd_listening(vm, &handles, &client, left)
                    .await?;
            } else {
                wait_ssh_banner(&handles, ip, left).await?;
            }
            self.inject_fault("ssh ready").await?;
        }
        let services = self.images.services(image);
        if !services.is_empty() {
            op.stage("services ready");
            self.wait_services(op, vm, &handles, &client, &services)
                .await?;
        }
        Ok(())
    }

    /// A restored guest's sshd: listening on port 22, as the agent reads
    /// the guest's sockets. Not by connecting to it, as for a boot: the
    /// identity step has just set the address it listens on, and an sshd
    /// that re-executes itself for each connection (OpenSSH before 9.8)
    /// would start anew in a guest whose TCG translations are all cold,
    /// 0.3-0.7 s of its CPU for each fork of `vm fork --count N`.
    async fn wait_sshd_listening(
        &self,
        vm: &Vm,
        h: &Handles,
        client: &banger_agent_proto::AgentClient,
        timeout: Duration,
    ) -> Result<(), VmError> {
        poll_guest(h, timeout, Duration::from_millis(100), || async {
            let ports = self
                .agent_call(vm, "the ports request", client.ports())
                .await?;
            Ok(ports.sockets.iter().any(|s| {
                s.port == 22 && s.protocol == banger_agent_proto::SocketProtocol::Tcp
            }))
        })
        .await?
        .then_some(())
        .ok_or_else(|| {
            VmError::Unavailable(format!(
                "the guest's sshd does not listen on port 22 (it did not within {}s of the restore); see {}",
                timeout.as_secs(),
                h.console_log.display()
            ))
        })
    }

    pub(super) fn launch_spec(
        &self,
        vm: &Vm,
        image: &Image,
        gnet: GuestNet,
        tap: &str,
        root: RootDisk,
        accel: Accel,
    ) -> LaunchSpec {
        // A QEMU VM made where vhost-vsock was usable keeps its CID, but
        // uses it only while vhost-vsock is usable.
        let vsock_cid = vm
            .vsock_cid
            .filter(|_| banger_vmm::agent_over_vsock(vm.vmm, self.settings.vhost_vsock));
        let mut cmdline = vec![
            "console=ttyS0".to_string(),
            "root=LABEL=rootfs".into(),
            "rw".into(),
            "quiet".into(),
            "panic=-1".into(),
            init_arg(vm.init_mode).into(),
        ];
        if let Some(ip) = vm.guest_ip {
            // The standard ip= argument; the agent (fast init) and systemd-networkd both read it.
            cmdline.push(format!(
                "ip={ip}::{}:{}:{}:eth0:off",
                gnet.gateway,
                gnet.subnet.netmask(),
                vm.name
            ));
        }
        let nameservers = self.net.dns().guest_nameservers();
        if !nameservers.is_empty() {
            // Read by the agent (fast init) and the image's banger-dns unit (systemd).
            let list: Vec<String> = nameservers.iter().map(|n| n.to_string()).collect();
            cmdline.push(format!("banger.dns={}", list.join(",")));
        }
        LaunchSpec {
            id: vm.id.clone(),
            name: vm.name.clone(),
            dir: vm.vm_dir.clone(),
            vcpus: vm.vcpus,
            memory_mib: vm.memory_mib,
            accel,
            kernel: image
                .vmlinux_path
                .clone()
                .unwrap_or_else(|| image.kernel_path.clone()),
            initrd: image.initrd_path.clone(),
            cmdline: cmdline.join(" "),
            disks: vec![
                root_disk_spec(&vm.id, &vm.vm_dir, root),
                work_disk_spec(&vm.vm_dir),
            ],
            net: vm.mac.clone().map(|mac| NetSpec {
                tap: tap.to_string(),
                mac,
            }),
            vsock_cid,
            incoming: false,
            memory: GuestMemory::Shared,
        }
    }
}

fn init_arg(mode: InitMode) -> &'static str {
    match mode {
        InitMode::Fast => "banger.init=fast",
        InitMode::Systemd => "banger.init=systemd",
    }
}

/// Wait until the guest's sshd answers with its banner.
pub(super) async fn wait_ssh_banner(
    h: &Handles,
    ip: std::net::Ipv4Addr,
    timeout: Duration,
) -> Result<(), VmError> {
    use tokio::io::AsyncReadExt;
    let attempt = || async {
        let answered = async {
            let mut s = tokio::net::TcpStream::connect((ip, 22)).await.ok()?;
            let mut banner = [0u8; 4];
            s.read_exact(&mut banner).await.ok()?;
            (&banner == b"SSH-").then_some(())
        };
        Ok(tokio::time::timeout(Duration::from_secs(6), answered)
            .await
            .ok()
            .flatten()
            .is_some())
    };
    poll_guest(h, timeout, Duration::from_millis(200), attempt)
        .await?
        .then_some(())
        .ok_or_else(|| {
            VmError::Unavailable(format!(
                "the guest's sshd did not answer on {ip}:22 within {}s; see {}",
                timeout.as_secs(),
                h.console_log.display()
            ))
        })
}

/// Runs `check` every `every` until it says yes (`true`), or fails;
/// `false` once the VMM died or `timeout` passed.
async fn poll_guest<F, Fut>(
    h: &Handles,
    timeout: Duration,
    every: Duration,
    mut check: F,
) -> Result<bool, VmError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool, VmError>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await? {
            return Ok(true);
        }
        if !is_alive(h) || Instant::now() > deadline {
            return Ok(false);
        }
        tokio::time::sleep(every).await;
    }
}

/// The initramfs announcing the switch to the real root: the kernel booted.
const BOOTED: &str = "banger-initramfs: switching root";
/// The initramfs giving up (no root disk, no init on it): it then waits on
/// a console shell no one can reach, so the boot ends here, not at the
/// timeout.
const INIT_FAILED: &str = "banger-initramfs: FATAL:";
/// Console lines an error of a failed boot quotes.
const TAIL_LINES: usize = 12;

/// Wait until the console log shows [`BOOTED`] after byte `from` (where
/// this boot's output starts), or [`INIT_FAILED`], or the VMM dies, or
/// time runs out. Each look reads only what was appended since the last.
/// A failure quotes the console's last lines: a create's rollback removes
/// the VM's files, so a path to the log would name nothing.
pub(super) async fn wait_console(
    vm: &str,
    h: &Handles,
    from: u64,
    timeout: Duration,
) -> Result<(), VmError> {
    let deadline = Instant::now() + timeout;
    let mut scan = banger_vmm::ConsoleScan::new(&h.console_log, from);
    let tail = || match banger_vmm::console_tail(&h.console_log, from, TAIL_LINES) {
        t if t.is_empty() => "the guest wrote nothing on its console".to_owned(),
        t => format!("the console ends with:\n{t}"),
    };
    loop {
        match scan.seen(&[BOOTED.as_bytes(), INIT_FAILED.as_bytes()]) {
            Some(0) => return Ok(()),
            Some(_) => {
                // The rest of its message may be a write behind.
                tokio::time::sleep(Duration::from_millis(100)).await;
                return Err(VmError::Failed(format!(
                    "VM {vm:?} cannot boot: its initramfs gave up; {}",
                    tail()
                )));
            }
            None => {}
        }
        if !is_alive(h) {
            return Err(VmError::Failed(format!(
                "VM {vm:?}'s VMM exited during boot; {}",
                tail()
            )));
        }
        if Instant::now() > deadline {
            return Err(VmError::Unavailable(format!(
                "VM {vm:?}'s kernel did not reach the initramfs within {}s; {}",
                timeout.as_secs(),
                tail()
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
