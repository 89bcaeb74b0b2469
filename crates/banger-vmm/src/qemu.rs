//! The QEMU driver: `qemu-system-x86_64` with a microvm or q35 machine,
//! KVM or TCG, virtio disks/net/rng, serial console to a file, and QMP for
//! control. The agent is reached over vsock when the VM has a CID (the host
//! has vhost-vsock), else on a virtio-serial port backed by a Unix socket.
//!
//! QEMU runs with `-daemonize`: it detaches once its devices are set up, so
//! start-up errors come back on its stderr, and the VM survives the daemon.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use banger_host::Accel;
use tracing::{debug, info, warn};

use crate::disk_lock::DiskLocks;
use crate::proc::{is_socket, start_ticks};
use crate::qmp::Qmp;
use crate::{
    AGENT_VSOCK_PORT, AgentEndpoint, BootMedia, DiskFormat, GuestMemory, Handles, LaunchSpec, Vmm,
    VmmError, is_alive,
};

/// The virtio-serial port name the guest agent opens.
pub const AGENT_PORT_NAME: &str = "org.banger.agent";

pub use banger_config::QemuMachine as Machine;

#[derive(Debug, Clone)]
pub struct Qemu {
    pub bin: PathBuf,
    pub machine: Machine,
}

pub fn control_socket(dir: &Path) -> PathBuf {
    dir.join("qmp.sock")
}
pub fn agent_socket(dir: &Path) -> PathBuf {
    dir.join("agent.sock")
}
/// QEMU's `-qmp` argument for a control socket (also how a VMM whose
/// handles were never written is found: [`crate::LaunchIntent`]).
pub(crate) fn qmp_arg(socket: &Path) -> String {
    format!("unix:{},server=on,wait=off", socket.display())
}
pub(crate) fn pid_file(dir: &Path) -> PathBuf {
    dir.join("qemu.pid")
}

/// The guest's command line plus what QEMU adds: how the agent's channel
/// is carried, and under TCG the TSC frequency (microvm under TCG may hang
/// calibrating the TSC against a PIT it lacks).
fn kernel_cmdline(spec: &LaunchSpec) -> String {
    let channel = match spec.vsock_cid {
        Some(_) => "banger.channel=vsock",
        None => "banger.channel=serial",
    };
    let mut cmdline = format!("{} {channel}", spec.cmdline);
    if spec.accel == Accel::Tcg
        && let Some(khz) = banger_host::tsc_khz()
    {
        cmdline.push_str(&format!(" tsc_early_khz={khz}"));
    }
    cmdline
}

/// `-cpu`: the host's under KVM. Under TCG, every feature QEMU emulates
/// but ERMS: TCG runs `rep movsb` and `rep stosb` one byte per pass of a
/// translated block, and a guest kernel told the CPU has ERMS copies to and
/// from user space and clears every page it hands out that way (as glibc
/// copies large buffers). Without it the kernel uses `rep movsq`/`stosq`,
/// 8 bytes a pass: 21 MB through a pipe in the guest took 0.64-0.87 s with
/// ERMS and 0.14-0.38 s without, on this project's TCG host.
fn cpu_model(accel: Accel) -> &'static str {
    match accel {
        Accel::Kvm => "host",
        Accel::Tcg => "max,erms=off",
    }
}

/// The guest RAM's backend on QEMU's command line, as [`Qemu::launch`]
/// made it from [`GuestMemory`].
#[derive(Debug, Clone, Copy)]
enum Ram<'a> {
    /// `GuestMemory::Shared`: the memfd, inherited as this descriptor.
    Memfd(std::os::fd::RawFd),
    /// `GuestMemory::Snapshot`.
    Snapshot(&'a Path),
    /// `GuestMemory::Private`.
    Private,
    /// `GuestMemory::Default`.
    Default,
}

/// The memfd a booted QEMU guest's RAM lives in (its name in
/// `/proc/<pid>/fd`: `/memfd:banger-ram (deleted)`).
pub(crate) const MEMFD_NAME: &str = "banger-ram";

/// A path in a QEMU option value, its commas doubled.
fn opt_path(p: &Path) -> String {
    p.display().to_string().replace(',', ",,")
}

impl Qemu {
    /// The full argument list (without the binary). Pure: unit-tested.
    fn args(&self, spec: &LaunchSpec, ram: Ram<'_>) -> Vec<String> {
        let (bus_suffix, machine) = match self.machine {
            Machine::Microvm => ("device", "microvm"),
            Machine::Q35 => ("pci", "q35"),
        };
        let dev = |kind: &str| format!("virtio-{kind}-{bus_suffix}");
        let accel = match spec.accel {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        };
        let cpu = cpu_model(spec.accel);
        // Guest RAM: a backend object `ram0` (the RAM block's name in a
        // saved state), or QEMU's own.
        let size = format!("{}M", spec.memory_mib);
        let backend = match ram {
            Ram::Memfd(fd) => Some(format!(
                "memory-backend-file,id=ram0,size={size},mem-path=/dev/fd/{fd},share=on"
            )),
            Ram::Snapshot(file) => Some(format!(
                "memory-backend-file,id=ram0,size={size},mem-path={},share=off",
                opt_path(file)
            )),
            Ram::Private => Some(format!("memory-backend-ram,id=ram0,size={size}")),
            Ram::Default => None,
        };
        let machine = match backend {
            Some(_) => format!("{machine},accel={accel},memory-backend=ram0"),
            None => format!("{machine},accel={accel}"),
        };
        let mut a: Vec<String> = vec![
            "-name".into(),
            format!("banger-{},process=banger-{}", spec.name, spec.id),
            "-machine".into(),
            machine,
            "-cpu".into(),
            cpu.into(),
            "-smp".into(),
            spec.vcpus.to_string(),
            "-m".into(),
            size,
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-display".into(),
            "none".into(),
            "-no-reboot".into(),
            "-kernel".into(),
            spec.kernel.display().to_string(),
            "-append".into(),
            kernel_cmdline(spec),
            // Appended to, never truncated by QEMU: the daemon caps it in
            // place (see `console`).
            "-chardev".into(),
            format!(
                "file,id=console,path={},append=on",
                spec.console_log().display()
            ),
            "-serial".into(),
            "chardev:console".into(),
            "-object".into(),
            "rng-random,id=rng0,filename=/dev/urandom".into(),
            "-device".into(),
            format!("{},rng=rng0", dev("rng")),
        ];
        if let Some(backend) = backend {
            a.extend(["-object".into(), backend]);
        }
        if let Some(initrd) = &spec.initrd {
            a.extend(["-initrd".into(), initrd.display().to_string()]);
        }
        for (i, disk) in spec.disks.iter().enumerate() {
            let format = match disk.format {
                DiskFormat::Raw => "raw",
                DiskFormat::Qcow2 => "qcow2",
            };
            let ro = if disk.read_only { ",readonly=on" } else { "" };
            a.extend([
                "-drive".into(),
                format!(
                    "id=disk{i},file={},format={format},if=none,discard=unmap{ro}",
                    disk.path.display()
                ),
                "-device".into(),
                format!("{},drive=disk{i}", dev("blk")),
            ]);
        }
        if let Some(net) = &spec.net {
            a.extend([
                "-netdev".into(),
                format!("tap,id=net0,ifname={},script=no,downscript=no", net.tap),
                "-device".into(),
                format!("{},netdev=net0,mac={}", dev("net"), net.mac),
            ]);
        }
        match spec.vsock_cid {
            Some(cid) => a.extend([
                "-device".into(),
                format!("vhost-vsock-{bus_suffix},guest-cid={cid}"),
            ]),
            None => a.extend([
                "-device".into(),
                format!("{},id=vser0", dev("serial")),
                "-chardev".into(),
                format!(
                    "socket,id=agent0,path={},server=on,wait=off",
                    agent_socket(&spec.dir).display()
                ),
                "-device".into(),
                format!("virtserialport,bus=vser0.0,chardev=agent0,name={AGENT_PORT_NAME}"),
            ]),
        }
        if spec.incoming {
            a.extend(["-incoming".into(), "defer".into()]);
        }
        a.extend([
            "-qmp".into(),
            qmp_arg(&control_socket(&spec.dir)),
            "-pidfile".into(),
            pid_file(&spec.dir).display().to_string(),
            "-daemonize".into(),
        ]);
        a
    }

    /// Start the VM and return its handles once QEMU has detached, and,
    /// for a boot, the copies of its kernel and initrd to release once the
    /// guest has booted ([`BootMedia`]).
    pub async fn launch(&self, spec: &LaunchSpec) -> Result<(Handles, BootMedia), VmmError> {
        for stale in [
            control_socket(&spec.dir),
            agent_socket(&spec.dir),
            pid_file(&spec.dir),
        ] {
            let _ = std::fs::remove_file(stale);
        }
        // A daemonized QEMU sets its umask to 027 and would make the console
        // log group-readable: it gets an existing 0600 file to open instead.
        let log = spec.console_log();
        std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&log)
            .and_then(|_| {
                std::fs::set_permissions(&log, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            })
            .map_err(|e| VmmError::Launch {
                what: "cannot create the console log",
                message: format!("{}: {e}", log.display()),
            })?;
        let memfd = match spec.memory {
            GuestMemory::Shared => Some(
                rustix::fs::memfd_create(MEMFD_NAME, rustix::fs::MemfdFlags::CLOEXEC).map_err(
                    |e| VmmError::Launch {
                        what: "cannot make the guest's memory",
                        message: format!("memfd_create: {e}"),
                    },
                )?,
            ),
            _ => None,
        };
        let ram = match (&spec.memory, &memfd) {
            (GuestMemory::Snapshot(file), _) => Ram::Snapshot(file),
            (GuestMemory::Private, _) => Ram::Private,
            (_, Some(fd)) => Ram::Memfd(std::os::fd::AsRawFd::as_raw_fd(fd)),
            _ => Ram::Default,
        };
        let (media, args) = if spec.incoming {
            (BootMedia::default(), self.args(spec, ram))
        } else {
            let (media, kernel, initrd) = BootMedia::copy(&spec.kernel, spec.initrd.as_deref())?;
            let spec = LaunchSpec {
                kernel,
                initrd,
                ..spec.clone()
            };
            (media, self.args(&spec, ram))
        };
        let locks = DiskLocks::take(&spec.disks)?;
        debug!(bin = %self.bin.display(), ?args, "starting qemu");
        let mut cmd = tokio::process::Command::new(&self.bin);
        cmd.args(&args).stdin(std::process::Stdio::null());
        let mut fds = locks.fds();
        fds.extend(memfd.iter().map(std::os::fd::AsRawFd::as_raw_fd));
        fds.extend(media.raw_fds());
        banger_firecracker::inherit_fds(&mut cmd, fds);
        let out = cmd.output().await.map_err(|e| VmmError::Launch {
            what: "cannot run QEMU",
            message: format!("{}: {e}", self.bin.display()),
        })?;
        // QEMU has opened and mapped it (or failed): the guest's memory is
        // QEMU's alone, and goes when it does.
        drop(memfd);
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            return Err(VmmError::Launch {
                what: "QEMU refused to start",
                message: stderr.trim().to_string(),
            });
        }
        let pid_text = std::fs::read_to_string(pid_file(&spec.dir))?;
        let pid: u32 = pid_text.trim().parse().map_err(|_| VmmError::Launch {
            what: "QEMU wrote no pid",
            message: pid_text.clone(),
        })?;
        let ticks = start_ticks(pid).ok_or_else(|| VmmError::Launch {
            what: "QEMU exited right after starting",
            message: format!("pid {pid}"),
        })?;
        info!(pid, "qemu started");
        let handles = Handles {
            vmm: Vmm::Qemu,
            pid,
            pid_start_ticks: ticks,
            control_socket: control_socket(&spec.dir),
            agent: match spec.vsock_cid {
                Some(cid) => AgentEndpoint::Vsock {
                    cid,
                    port: AGENT_VSOCK_PORT,
                },
                None => AgentEndpoint::Serial {
                    socket: agent_socket(&spec.dir),
                },
            },
            tap: spec.net.as_ref().map(|n| n.tap.clone()),
            console_log: spec.console_log(),
            paused: false,
        };
        Ok((handles, media))
    }
}

/// What the initramfs prints first; seeing it proves the kernel ran its
/// userspace.
const PROBE_MARKER: &str = "banger-initramfs:";

/// A test boot: can `accel` run this (stock) kernel? The kernel and initrd
/// boot with no disks and a root device that cannot appear, so the
/// initramfs reports and stops at once; any line from it proves the kernel
/// got to userspace. Hardware KVM gets there in about a second; KVM that
/// cannot run a stock kernel (PVM) prints nothing or dies with an emulation
/// failure. `dir` holds the console log; QEMU is killed before returning.
pub async fn probe_boot(
    qemu_bin: &Path,
    accel: Accel,
    kernel: &Path,
    initrd: Option<&Path>,
    dir: &Path,
    timeout: Duration,
) -> Result<Duration, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let log = dir.join("probe-console.log");
    let _ = std::fs::remove_file(&log);
    let accel_name = match accel {
        Accel::Kvm => "kvm",
        Accel::Tcg => "tcg",
    };
    let cpu = cpu_model(accel);
    let mut append =
        "console=ttyS0 quiet panic=-1 root=/dev/banger-probe banger.rootwait=0".to_string();
    if accel == Accel::Tcg
        && let Some(khz) = banger_host::tsc_khz()
    {
        // As for VMs: microvm under TCG hangs calibrating the TSC without it.
        append.push_str(&format!(" tsc_early_khz={khz}"));
    }
    let mut cmd = tokio::process::Command::new(qemu_bin);
    cmd.args(["-machine", &format!("microvm,accel={accel_name}")])
        .args(["-cpu", cpu, "-m", "256M", "-smp", "1"])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(kernel)
        .arg("-append")
        .arg(&append)
        .arg("-serial")
        .arg(format!("file:{}", log.display()))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    if let Some(initrd) = initrd {
        cmd.arg("-initrd").arg(initrd);
    }
    let started = Instant::now();
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", qemu_bin.display()))?;
    let outcome = loop {
        if std::fs::read_to_string(&log).is_ok_and(|t| t.contains(PROBE_MARKER)) {
            break Ok(started.elapsed());
        }
        if let Ok(Some(status)) = child.try_wait() {
            let mut stderr = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = tokio::io::AsyncReadExt::read_to_string(&mut e, &mut stderr).await;
            }
            let why = stderr.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
            break Err(format!(
                "QEMU exited ({status}) before the kernel ran userspace: {why}"
            ));
        }
        if started.elapsed() >= timeout {
            break Err(format!(
                "the kernel printed nothing from userspace within {}s",
                timeout.as_secs()
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let _ = child.kill().await;
    let _ = std::fs::remove_file(&log);
    outcome
}

/// Ask the guest to power off by ACPI (its power button).
pub async fn press_power_button(h: &Handles) -> Result<(), VmmError> {
    command(h, "system_powerdown").await
}

/// One QMP command without arguments, its answer dropped.
pub(crate) async fn command(h: &Handles, name: &str) -> Result<(), VmmError> {
    let mut qmp = Qmp::connect(&h.control_socket, QMP_TIMEOUT).await?;
    tokio::time::timeout(QMP_TIMEOUT, qmp.execute(name, None))
        .await
        .map_err(|_| VmmError::Qmp(format!("no answer to {name} within {QMP_TIMEOUT:?}")))?
        .map(drop)
}

/// `sh` quoting of a path.
fn sh_quote(p: &Path) -> String {
    format!("'{}'", p.to_string_lossy().replace('\'', r"'\''"))
}

/// Where QEMU writes a saved state: to `<file>.part`, renamed only once
/// `cat` has written all of it (QEMU reports the migration complete when it
/// has sent the last byte, not when the file holds it).
fn save_uri(file: &Path) -> String {
    let mut part = file.as_os_str().to_owned();
    part.push(".part");
    let part = Path::new(&part);
    format!(
        "exec:cat > {} && mv {} {}",
        sh_quote(part),
        sh_quote(part),
        sh_quote(file)
    )
}

fn load_uri(file: &Path) -> String {
    format!("exec:cat {}", sh_quote(file))
}

/// QEMU's version line (`QEMU emulator version 7.2.22 (...)`): a saved
/// state is loaded only by the QEMU that wrote it.
pub async fn version(bin: &Path) -> Result<String, VmmError> {
    crate::version_line(bin, "QEMU").await
}

/// The accelerator a running QEMU runs its guest under, from its command
/// line (`-machine …,accel=kvm`).
pub fn running_accel(h: &Handles) -> Option<Accel> {
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", h.pid)).ok()?;
    accel_of(&cmdline)
}

fn accel_of(cmdline: &[u8]) -> Option<Accel> {
    cmdline
        .split(|b| *b == 0)
        .filter_map(|a| std::str::from_utf8(a).ok())
        .flat_map(|a| a.split(','))
        .find_map(|opt| match opt {
            "accel=kvm" => Some(Accel::Kvm),
            "accel=tcg" => Some(Accel::Tcg),
            _ => None,
        })
}

/// Save a paused VM's device state to `file`, and its RAM with it unless
/// `skip_shared` (QMP `migrate` to an `exec:` URI; QEMU 7.2 has no `file:`
/// one). `skip_shared` (QEMU's `x-ignore-shared`) leaves out RAM that is a
/// shared file mapping, which the caller copies itself ([`copy_memory`]);
/// the load must say the same. The VM stays paused.
pub async fn save_state(
    h: &Handles,
    file: &Path,
    skip_shared: bool,
    timeout: Duration,
) -> Result<(), VmmError> {
    let mut qmp = Qmp::connect(&h.control_socket, QMP_TIMEOUT).await?;
    set_skip_shared(&mut qmp, skip_shared).await?;
    // The default bandwidth cap (128 MiB/s) is for live migration over a
    // network; into a local file of a paused guest, none is wanted.
    qmp.execute(
        "migrate-set-parameters",
        Some(serde_json::json!({ "max-bandwidth": 64u64 << 30 })),
    )
    .await?;
    qmp.execute(
        "migrate",
        Some(serde_json::json!({ "uri": save_uri(file) })),
    )
    .await?;
    wait_migration(&mut qmp, "saving the VM's state", timeout).await?;
    // `cat` has exited and `mv` renamed its output: the state is whole.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !file.exists() {
        if Instant::now() > deadline {
            return Err(VmmError::Qmp(format!(
                "QEMU sent its state but {} was not written whole",
                file.display()
            )));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// Load a saved state into a QEMU started with [`LaunchSpec::incoming`],
/// then run the guest. `skip_shared` as the state was saved with: its RAM
/// is then the snapshot's memory file, which the VM maps
/// ([`GuestMemory::Snapshot`]).
pub async fn load_state(
    h: &Handles,
    file: &Path,
    skip_shared: bool,
    timeout: Duration,
) -> Result<(), VmmError> {
    let mut qmp = Qmp::connect(&h.control_socket, QMP_TIMEOUT).await?;
    set_skip_shared(&mut qmp, skip_shared).await?;
    qmp.execute(
        "migrate-incoming",
        Some(serde_json::json!({ "uri": load_uri(file) })),
    )
    .await?;
    wait_migration(&mut qmp, "loading the VM's state", timeout).await?;
    // Loaded. The state says the source was paused (a snapshot is taken
    // of a paused guest), so QEMU leaves it paused: run it.
    let deadline = Instant::now() + QMP_TIMEOUT;
    loop {
        let status = qmp.execute("query-status", None).await?;
        if status["running"].as_bool() == Some(true) {
            return Ok(());
        }
        if status["status"].as_str() != Some("inmigrate") {
            qmp.execute("cont", None).await?;
        }
        if Instant::now() > deadline {
            return Err(VmmError::Qmp(format!(
                "the restored VM did not start running (status {})",
                status["status"]
            )));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// QEMU's `x-ignore-shared` migration capability: the RAM of a shared
/// file mapping stays out of the stream (and the stream says where each
/// such block is, so both ends must agree).
async fn set_skip_shared(qmp: &mut Qmp, on: bool) -> Result<(), VmmError> {
    qmp.execute(
        "migrate-set-capabilities",
        Some(serde_json::json!({
            "capabilities": [{ "capability": "x-ignore-shared", "state": on }]
        })),
    )
    .await
    .map(drop)
}

/// Poll `query-migrate` until the migration completes (or fails).
async fn wait_migration(qmp: &mut Qmp, what: &str, timeout: Duration) -> Result<(), VmmError> {
    let deadline = Instant::now() + timeout;
    loop {
        let info = qmp.execute("query-migrate", None).await?;
        match info["status"].as_str().unwrap_or("") {
            "completed" => return Ok(()),
            "failed" | "cancelled" => {
                let why = info["error-desc"].as_str().unwrap_or("no reason given");
                return Err(VmmError::Qmp(format!("{what} failed: {why}")));
            }
            _ => {}
        }
        if Instant::now() > deadline {
            return Err(VmmError::Qmp(format!(
                "{what} did not finish within {}s",
                timeout.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// How long QEMU's QMP monitor may take to answer: it runs on QEMU's main
/// loop, which answers in milliseconds unless QEMU itself is stuck.
const QMP_TIMEOUT: Duration = Duration::from_secs(2);

/// Stop a QEMU VM: QMP `quit` (QEMU flushes its disks and exits), then
/// SIGKILL if it is still there after `timeout`. The caller asks the guest
/// to power off first when it wants a clean guest shutdown.
pub async fn stop(h: &Handles, timeout: Duration) -> Result<(), VmmError> {
    if !is_alive(h) {
        // Exited, or still exiting: gone only when its last thread is.
        wait_dead(h, Duration::from_secs(5)).await;
        return Ok(());
    }
    if is_socket(&h.control_socket) {
        match Qmp::connect(&h.control_socket, QMP_TIMEOUT).await {
            Ok(mut qmp) => {
                if let Ok(Err(e)) =
                    tokio::time::timeout(QMP_TIMEOUT, qmp.execute("quit", None)).await
                {
                    // QEMU may close the socket before answering `quit`.
                    debug!(error = %e, "qmp quit");
                }
            }
            Err(e) => warn!(error = %e, "QMP unreachable; killing QEMU"),
        }
    }
    if wait_dead(h, timeout).await {
        return Ok(());
    }
    kill(h);
    wait_dead(h, Duration::from_secs(5)).await;
    Ok(())
}

/// SIGKILL the VMM if (and only if) it is still ours.
pub fn kill(h: &Handles) {
    if is_alive(h) {
        crate::proc::kill_vmm(h.pid);
    }
}

/// Wait until the VMM is gone, every thread of it; false on timeout.
pub async fn wait_dead(h: &Handles, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while !crate::proc::has_exited(h) {
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DiskSpec, NetSpec};

    fn spec() -> LaunchSpec {
        LaunchSpec {
            id: "abc123".into(),
            name: "box".into(),
            dir: "/s/vms/abc123".into(),
            vcpus: 2,
            memory_mib: 512,
            accel: Accel::Tcg,
            kernel: "/img/vmlinux".into(),
            initrd: Some("/img/initrd.img".into()),
            cmdline: "console=ttyS0 root=LABEL=rootfs".into(),
            disks: vec![
                DiskSpec {
                    path: "/s/vms/abc123/root.qcow2".into(),
                    format: DiskFormat::Qcow2,
                    read_only: false,
                },
                DiskSpec {
                    path: "/s/vms/abc123/work.ext4".into(),
                    format: DiskFormat::Raw,
                    read_only: false,
                },
            ],
            net: Some(NetSpec {
                tap: "bg-t01".into(),
                mac: "02:bg:00:00:00:01".into(),
            }),
            vsock_cid: None,
            incoming: false,
            memory: GuestMemory::Shared,
        }
    }

    #[test]
    fn a_restore_waits_for_its_state() {
        let q = Qemu {
            bin: "qemu".into(),
            machine: Machine::Microvm,
        };
        let mut s = spec();
        assert!(!q.args(&s, Ram::Memfd(9)).contains(&"-incoming".to_string()));
        s.incoming = true;
        let a = q.args(&s, Ram::Memfd(9)).join(" ");
        assert!(a.contains("-incoming defer"), "{a}");
    }

    #[test]
    fn guest_ram_is_the_backend_ram0_or_qemus_own() {
        let q = Qemu {
            bin: "qemu".into(),
            machine: Machine::Microvm,
        };
        let s = spec();
        let a = q.args(&s, Ram::Memfd(9)).join(" ");
        assert!(
            a.contains("-machine microvm,accel=tcg,memory-backend=ram0")
                && a.contains(
                    "-object memory-backend-file,id=ram0,size=512M,mem-path=/dev/fd/9,share=on"
                ),
            "{a}"
        );
        let a = q
            .args(&s, Ram::Snapshot(Path::new("/s/snap,1/memory.ram")))
            .join(" ");
        assert!(
            a.contains(
                "-object memory-backend-file,id=ram0,size=512M,mem-path=/s/snap,,1/memory.ram,share=off"
            ),
            "{a}"
        );
        let a = q.args(&s, Ram::Private).join(" ");
        assert!(
            a.contains("memory-backend=ram0")
                && a.contains("-object memory-backend-ram,id=ram0,size=512M"),
            "{a}"
        );
        let a = q.args(&s, Ram::Default).join(" ");
        assert!(
            a.contains("-machine microvm,accel=tcg -cpu") && !a.contains("ram0"),
            "{a}"
        );
        assert!(a.contains("-m 512M"), "{a}");
    }

    #[test]
    fn the_accelerator_is_read_back_from_the_command_line() {
        let q = Qemu {
            bin: "qemu".into(),
            machine: Machine::Microvm,
        };
        for accel in [Accel::Kvm, Accel::Tcg] {
            let mut s = spec();
            s.accel = accel;
            let argv = q.args(&s, Ram::Memfd(9)).join("\0");
            assert_eq!(accel_of(argv.as_bytes()), Some(accel));
        }
        assert_eq!(accel_of(b"qemu\x00-m\x00512M"), None);
    }

    #[test]
    fn exec_uris_quote_the_path() {
        assert_eq!(
            save_uri(Path::new("/s/snap/it's.bin")),
            r#"exec:cat > '/s/snap/it'\''s.bin.part' && mv '/s/snap/it'\''s.bin.part' '/s/snap/it'\''s.bin'"#
        );
        assert_eq!(load_uri(Path::new("/s/a.bin")), "exec:cat '/s/a.bin'");
    }

    fn joined(q: &Qemu) -> String {
        q.args(&spec(), Ram::Memfd(9)).join(" ")
    }

    #[test]
    fn microvm_tcg_command_line() {
        let a = joined(&Qemu {
            bin: "qemu".into(),
            machine: Machine::Microvm,
        });
        for want in [
            "-machine microvm,accel=tcg",
            "-cpu max,erms=off",
            "-smp 2",
            "-m 512M",
            "-kernel /img/vmlinux",
            "-initrd /img/initrd.img",
            "-chardev file,id=console,path=/s/vms/abc123/console.log,append=on -serial chardev:console",
            "file=/s/vms/abc123/root.qcow2,format=qcow2",
            "-device virtio-blk-device,drive=disk0",
            "file=/s/vms/abc123/work.ext4,format=raw",
            "tap,id=net0,ifname=bg-t01,script=no,downscript=no",
            "virtio-net-device,netdev=net0,mac=02:bg:00:00:00:01",
            "virtio-rng-device,rng=rng0",
            "socket,id=agent0,path=/s/vms/abc123/agent.sock,server=on,wait=off",
            "name=org.banger.agent",
            "-qmp unix:/s/vms/abc123/qmp.sock,server=on,wait=off",
            "-daemonize",
        ] {
            assert!(a.contains(want), "missing {want:?} in {a}");
        }
        assert!(
            !a.contains("-nographic"),
            "-nographic conflicts with -daemonize"
        );
    }

    #[test]
    fn q35_uses_pci_devices_and_kvm_uses_host_cpu() {
        let q = Qemu {
            bin: "qemu".into(),
            machine: Machine::Q35,
        };
        let mut s = spec();
        s.accel = Accel::Kvm;
        let a = q.args(&s, Ram::Memfd(9)).join(" ");
        assert!(a.contains("-machine q35,accel=kvm"));
        assert!(a.contains("-cpu host"));
        assert!(a.contains("virtio-blk-pci,drive=disk0"));
        assert!(a.contains("virtio-serial-pci,id=vser0"));
    }

    #[test]
    fn a_vsock_cid_replaces_the_serial_channel_with_vhost_vsock() {
        for (machine, device) in [
            (Machine::Microvm, "-device vhost-vsock-device,guest-cid=7"),
            (Machine::Q35, "-device vhost-vsock-pci,guest-cid=7"),
        ] {
            let mut s = spec();
            s.vsock_cid = Some(7);
            let a = Qemu {
                bin: "qemu".into(),
                machine,
            }
            .args(&s, Ram::Memfd(9))
            .join(" ");
            assert!(a.contains(device), "{a}");
            assert!(
                !a.contains("virtserialport") && !a.contains("agent.sock"),
                "{a}"
            );
        }
    }

    #[test]
    fn the_control_socket_is_in_the_command_line_for_liveness() {
        // is_alive() recognises our VMM by its control socket in argv.
        let a = joined(&Qemu {
            bin: "qemu".into(),
            machine: Machine::Microvm,
        });
        assert!(a.contains(control_socket(Path::new("/s/vms/abc123")).to_str().unwrap()));
    }
}
