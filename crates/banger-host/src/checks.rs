//! The `banger doctor` checks.

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::binary::find_binary;
use crate::disk::RootDiskStrategy;
use crate::kvm::{
    Accel, AccelError, AccelSetting, KvmProbe, KvmStatus, effective_accel, kvm_status_at,
};
use crate::paths::HostPaths;

/// Outcome of one check, ordered from best to worst so callers can take the maximum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckStatus {
    Pass,
    Warn,
    Fail,
}

/// One line of the doctor report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    /// Stable machine-readable id, e.g. `"kvm"`.
    pub id: &'static str,
    pub title: String,
    pub status: CheckStatus,
    /// What was found.
    pub detail: String,
    /// One concrete line (package to install or command to run). `None` when the check passed
    /// or when nothing can be done about this item on its own (the cause is another check).
    pub fix: Option<String>,
}

impl Check {
    fn new(
        id: &'static str,
        title: &str,
        status: CheckStatus,
        detail: impl Into<String>,
        fix: Option<&str>,
    ) -> Self {
        Self {
            id,
            title: title.to_owned(),
            status,
            detail: detail.into(),
            fix: fix.map(str::to_owned),
        }
    }

    fn pass(id: &'static str, title: &str, detail: impl Into<String>) -> Self {
        Self::new(id, title, CheckStatus::Pass, detail, None)
    }
}

/// What the caller knows that the host probes can't find out themselves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DoctorInputs {
    /// Configured Firecracker binary: a path, or a name looked up in `PATH`.
    pub firecracker_bin: String,
    /// Configured QEMU system emulator: a path, or a name looked up in `PATH`.
    pub qemu_bin: String,
    pub accel: AccelSetting,
    /// banger's state directory (images, disks); need not exist yet.
    pub state_dir: PathBuf,
    /// `Ok(description)` (e.g. `"pid 123, version 0.1.0"`) if the root helper answered,
    /// `Err(why)` if it could not be reached.
    pub helper: Result<String, String>,
}

/// Runs every check against the live host. Reads only; changes nothing.
pub fn run_checks(inputs: &DoctorInputs) -> Vec<Check> {
    let root_disks = match RootDiskStrategy::load(&inputs.state_dir) {
        // The daemon chose snapshots, and the host still has device-mapper.
        Some(RootDiskStrategy::DmSnapshot) if crate::disk::device_mapper().is_ok() => {
            Ok(RootDiskStrategy::DmSnapshot)
        }
        _ => RootDiskStrategy::probe(&inputs.state_dir),
    };
    run_checks_with(inputs, &HostPaths::real(), &find_binary, root_disks)
}

fn run_checks_with(
    inputs: &DoctorInputs,
    paths: &HostPaths,
    find: &dyn Fn(&str) -> Option<PathBuf>,
    root_disks: std::io::Result<RootDiskStrategy>,
) -> Vec<Check> {
    let kvm = kvm_status_at(paths);
    let probe = KvmProbe::load(&inputs.state_dir);
    // A failed test boot under KVM means TCG, as it does for the daemon.
    let accel = match (effective_accel(inputs.accel, &kvm), &probe) {
        (Ok(Accel::Kvm), Some(p)) if inputs.accel == AccelSetting::Auto && !p.usable => {
            Ok(Accel::Tcg)
        }
        (accel, _) => accel,
    };
    let raw_cow = matches!(
        root_disks,
        Ok(RootDiskStrategy::Reflink | RootDiskStrategy::DmSnapshot)
    );
    let firecracker = find(&inputs.firecracker_bin);
    let uses_firecracker = firecracker.is_some() && matches!(accel, Ok(Accel::Kvm));
    vec![
        kvm_check(&kvm, inputs.accel),
        accel_check(inputs.accel, &kvm, &accel, probe.as_ref()),
        firecracker_check(&inputs.firecracker_bin, firecracker.as_deref(), &accel),
        qemu_check(&inputs.qemu_bin, find(&inputs.qemu_bin).as_deref()),
        qemu_img_check(find("qemu-img").as_deref(), raw_cow),
        e2fsprogs_check(find("mkfs.ext4").as_deref()),
        rootfs_builder_check(
            find("mmdebstrap").as_deref(),
            find("debootstrap").as_deref(),
        ),
        npm_check(find("npm").as_deref()),
        ssh_check(find("ssh").as_deref()),
        nft_check(find("nft").as_deref()),
        tun_check(paths, rustix::process::geteuid().is_root()),
        bridge_check(paths),
        ip_forward_check(paths),
        root_disks_check(&inputs.state_dir, &root_disks, uses_firecracker),
        vhost_vsock_check(paths),
        disk_check(&inputs.state_dir),
        helper_check(&inputs.helper),
    ]
}

fn kvm_check(kvm: &KvmStatus, setting: AccelSetting) -> Check {
    const ID: &str = "kvm";
    const TITLE: &str = "KVM";
    // Unusable KVM is only a failure when the configuration insists on it.
    let unusable = if setting == AccelSetting::Kvm {
        CheckStatus::Fail
    } else {
        CheckStatus::Warn
    };
    let tcg = "QEMU with TCG (software emulation) will be used";
    match kvm {
        KvmStatus::Usable => Check::pass(ID, TITLE, "/dev/kvm opens read-write"),
        KvmStatus::Pvm => Check::new(
            ID,
            TITLE,
            unusable,
            format!("KVM is PVM (kvm_pvm): stock kernels can't run under it; {tcg}"),
            Some("none on this host: run banger on a host with hardware KVM for full speed"),
        ),
        KvmStatus::Missing => Check::new(
            ID,
            TITLE,
            unusable,
            format!("/dev/kvm is missing; {tcg}"),
            Some("enable VT-x/AMD-V in the firmware, then: sudo modprobe kvm_intel (or kvm_amd)"),
        ),
        KvmStatus::NoAccess(why) => Check::new(
            ID,
            TITLE,
            unusable,
            format!("{why}; {tcg}"),
            Some("sudo usermod -aG kvm \"$USER\", then log in again"),
        ),
    }
}

fn accel_check(
    setting: AccelSetting,
    kvm: &KvmStatus,
    accel: &Result<Accel, AccelError>,
    probe: Option<&KvmProbe>,
) -> Check {
    const ID: &str = "accel";
    const TITLE: &str = "Accelerator";
    match (accel, probe) {
        (Ok(Accel::Kvm), _) if setting == AccelSetting::Kvm => {
            Check::pass(ID, TITLE, "kvm (accel = \"kvm\")")
        }
        (Ok(Accel::Kvm), Some(p)) => Check::pass(
            ID,
            TITLE,
            format!(
                "kvm (accel = \"auto\"; a test boot of the image's kernel {})",
                p.detail
            ),
        ),
        (Ok(Accel::Kvm), None) => Check::pass(
            ID,
            TITLE,
            "kvm (accel = \"auto\"; the first VM boot confirms it with a test boot)",
        ),
        (Ok(Accel::Tcg), Some(p)) if !p.usable => Check::pass(
            ID,
            TITLE,
            format!(
                "tcg (accel = \"auto\": a test boot under KVM failed: {}; software emulation is much slower)",
                p.detail
            ),
        ),
        (Ok(Accel::Tcg), _) if setting == AccelSetting::Tcg => Check::pass(
            ID,
            TITLE,
            "tcg (accel = \"tcg\"; software emulation is much slower than KVM)",
        ),
        (Ok(Accel::Tcg), _) => Check::pass(
            ID,
            TITLE,
            format!("tcg (accel = \"{setting}\": {kvm}; software emulation is much slower)"),
        ),
        (Err(e), _) => Check::new(
            ID,
            TITLE,
            CheckStatus::Fail,
            e.to_string(),
            Some("set accel = \"auto\" (or \"tcg\") in the banger configuration"),
        ),
    }
}

fn firecracker_check(
    configured: &str,
    found: Option<&Path>,
    accel: &Result<Accel, AccelError>,
) -> Check {
    const ID: &str = "firecracker";
    const TITLE: &str = "Firecracker";
    match (found, accel) {
        (Some(path), Ok(Accel::Kvm)) => Check::pass(ID, TITLE, format!("{}", path.display())),
        // Firecracker has no software emulation: without KVM it cannot run anything.
        (Some(path), _) => Check::new(
            ID,
            TITLE,
            CheckStatus::Warn,
            format!(
                "{} found, but Firecracker needs KVM and the accelerator is not kvm; \
                 QEMU will be used",
                path.display()
            ),
            None,
        ),
        (None, _) => Check::new(
            ID,
            TITLE,
            CheckStatus::Warn,
            format!("{configured:?} not found; QEMU will be used"),
            Some(
                "optional: install a release from \
                 https://github.com/firecracker-microvm/firecracker/releases",
            ),
        ),
    }
}

fn found_or(
    id: &'static str,
    title: &str,
    found: Option<&Path>,
    missing: CheckStatus,
    missing_detail: String,
    fix: &str,
) -> Check {
    match found {
        Some(path) => Check::pass(id, title, format!("{}", path.display())),
        None => Check::new(id, title, missing, missing_detail, Some(fix)),
    }
}

fn qemu_check(configured: &str, found: Option<&Path>) -> Check {
    found_or(
        "qemu",
        "QEMU",
        found,
        CheckStatus::Fail,
        format!("{configured:?} not found"),
        "sudo apt install qemu-system-x86",
    )
}

fn qemu_img_check(found: Option<&Path>, raw_cow: bool) -> Check {
    // qemu-img makes the qcow2 overlays QEMU VMs' root disks are when
    // neither device-mapper snapshots nor reflinks are used.
    let (status, consequence) = if raw_cow {
        (
            CheckStatus::Warn,
            "qcow2 overlays unavailable (device-mapper snapshots or reflink clones are used)",
        )
    } else {
        (
            CheckStatus::Fail,
            "QEMU VMs can't get root disks (no reflinks in the state directory either)",
        )
    };
    found_or(
        "qemu_img",
        "qemu-img",
        found,
        status,
        format!("qemu-img not found; {consequence}"),
        "sudo apt install qemu-utils",
    )
}

fn e2fsprogs_check(mkfs: Option<&Path>) -> Check {
    const ID: &str = "e2fsprogs";
    const TITLE: &str = "ext4 tools";
    match mkfs {
        Some(mkfs) => Check::pass(ID, TITLE, mkfs.display().to_string()),
        None => Check::new(
            ID,
            TITLE,
            CheckStatus::Fail,
            "mkfs.ext4 not found; images and disks can't be made",
            Some("sudo apt install e2fsprogs"),
        ),
    }
}

fn rootfs_builder_check(mmdebstrap: Option<&Path>, debootstrap: Option<&Path>) -> Check {
    const ID: &str = "rootfs_builder";
    const TITLE: &str = "Root filesystem builder";
    match (mmdebstrap, debootstrap) {
        (Some(path), _) => Check::pass(ID, TITLE, format!("{}", path.display())),
        (None, Some(path)) => Check::pass(
            ID,
            TITLE,
            format!("{} (mmdebstrap is about 3x faster)", path.display()),
        ),
        (None, None) => Check::new(
            ID,
            TITLE,
            CheckStatus::Warn,
            "neither mmdebstrap nor debootstrap found; the default image can't be built",
            Some("sudo apt install mmdebstrap"),
        ),
    }
}

/// Only the `dev` image's build runs npm (its npm packages are installed
/// on the host).
fn npm_check(found: Option<&Path>) -> Check {
    found_or(
        "npm",
        "npm",
        found,
        CheckStatus::Warn,
        "npm not found; the dev image (banger image build dev) can't be built".to_owned(),
        "sudo apt install npm",
    )
}

fn ssh_check(found: Option<&Path>) -> Check {
    found_or(
        "ssh",
        "SSH client",
        found,
        CheckStatus::Warn,
        "ssh not found; interactive shells into VMs are unavailable".to_owned(),
        "sudo apt install openssh-client",
    )
}

fn nft_check(found: Option<&Path>) -> Check {
    found_or(
        "nft",
        "nftables",
        found,
        CheckStatus::Warn,
        "nft not found; VM NAT and port forwards are unavailable".to_owned(),
        "sudo apt install nftables",
    )
}

/// A device node's presence. Opening is not needed: the root helper is the one that uses them.
fn device_check(
    id: &'static str,
    title: &str,
    node: &Path,
    missing_detail: &str,
    fix: &str,
) -> Check {
    if node.exists() {
        Check::pass(id, title, format!("{} present", node.display()))
    } else {
        Check::new(
            id,
            title,
            CheckStatus::Warn,
            format!("{} missing; {missing_detail}", node.display()),
            Some(fix),
        )
    }
}

/// `/dev/net/tun` must exist, and QEMU (run by the daemon, as the user)
/// must be able to open it to attach to its tap.
fn tun_check(paths: &HostPaths, root: bool) -> Check {
    use std::os::unix::fs::PermissionsExt;
    let node = paths.dev.join("net/tun");
    let check = device_check(
        "tun",
        "TUN/TAP",
        &node,
        "VMs can't get tap network devices",
        "sudo modprobe tun",
    );
    let mode = match fs::metadata(&node) {
        Ok(m) => m.permissions().mode() & 0o777,
        Err(_) => return check,
    };
    if root || mode & 0o006 == 0o006 {
        return check;
    }
    Check::new(
        "tun",
        "TUN/TAP",
        CheckStatus::Warn,
        format!(
            "{} is mode {mode:04o}: QEMU, run by banger as you, can't open it to use its tap",
            node.display()
        ),
        Some(
            "sudo chmod 0666 /dev/net/tun (and keep it with a udev rule: \
             KERNEL==\"tun\", MODE=\"0666\")",
        ),
    )
}

/// Whether QEMU guests can get a vsock: `/dev/vhost-vsock` opens
/// read-write for this user (QEMU, run as the user, opens it). Else the
/// guest agent rides a virtio-serial port.
pub fn vhost_vsock_usable() -> bool {
    vhost_vsock_status(&HostPaths::real()).is_ok()
}

fn vhost_vsock_status(paths: &HostPaths) -> Result<(), std::io::Error> {
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(paths.dev.join("vhost-vsock"))
        .map(drop)
}

fn vhost_vsock_check(paths: &HostPaths) -> Check {
    const ID: &str = "vhost_vsock";
    const TITLE: &str = "vhost-vsock";
    const FALLBACK: &str = "QEMU guests' agents use virtio-serial instead";
    let node = paths.dev.join("vhost-vsock");
    match vhost_vsock_status(paths) {
        Ok(()) => Check::pass(
            ID,
            TITLE,
            format!(
                "{} opens read-write: QEMU guests' agents use vsock",
                node.display()
            ),
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Check::new(
            ID,
            TITLE,
            CheckStatus::Warn,
            format!("{} missing; {FALLBACK}", node.display()),
            Some("sudo modprobe vhost_vsock"),
        ),
        Err(e) => Check::new(
            ID,
            TITLE,
            CheckStatus::Warn,
            format!(
                "cannot open {} read-write ({e}); {FALLBACK}",
                node.display()
            ),
            Some("sudo chmod 0666 /dev/vhost-vsock (or a udev rule with MODE=\"0666\")"),
        ),
    }
}

/// How VM root disks are made copy-on-write (the daemon probes the same way).
fn root_disks_check(
    state_dir: &Path,
    strategy: &std::io::Result<RootDiskStrategy>,
    uses_firecracker: bool,
) -> Check {
    const ID: &str = "root_disks";
    const TITLE: &str = "Root disks";
    const FIX: &str = "for instant clones, put the state directory on btrfs or XFS (reflink=1)";
    let dir = state_dir.display();
    match strategy {
        Ok(RootDiskStrategy::DmSnapshot) => Check::pass(
            ID,
            TITLE,
            "device-mapper snapshots of the image's rootfs, made by banger-helper: \
             instant, raw block devices for every VMM",
        ),
        Ok(RootDiskStrategy::Reflink) => Check::pass(
            ID,
            TITLE,
            format!("reflink clones in {dir}: instant, raw disks for every VMM"),
        ),
        Ok(RootDiskStrategy::OverlayOrCopy) if uses_firecracker => Check::new(
            ID,
            TITLE,
            CheckStatus::Warn,
            format!(
                "no reflinks in {dir}: Firecracker VMs get a sparse copy of the image's \
                 rootfs, which is slow for big images (QEMU VMs get qcow2 overlays)"
            ),
            Some(FIX),
        ),
        Ok(RootDiskStrategy::OverlayOrCopy) => Check::pass(
            ID,
            TITLE,
            format!("qcow2 overlays over the image's rootfs (no reflinks in {dir})"),
        ),
        Err(e) => Check::new(
            ID,
            TITLE,
            CheckStatus::Warn,
            format!("cannot probe {dir} for reflinks: {e}"),
            Some("check that banger's state directory is writable"),
        ),
    }
}

/// Whether the kernel can make Linux bridges, decided from sysfs and the module index only.
///
/// * `/sys/module/bridge` exists when the bridge module is loaded, and also when it is built
///   in, because the bridge code declares a `MODULE_VERSION` (built-in code only appears under
///   `/sys/module` if it has parameters or a version). `initstate` exists only for loadable
///   modules, which tells the two apart.
/// * Any `/sys/class/net/*/bridge` directory is an existing bridge device.
/// * Otherwise `modules.builtin` / `modules.dep` of the running kernel say whether it is built
///   in or loadable; a loadable bridge is autoloaded (alias `rtnl-link-bridge`) when the helper
///   creates the first bridge, so that counts as supported.
///
/// `/proc/sys/net/bridge` is deliberately not used: it belongs to `br_netfilter`, not to the
/// bridge itself.
fn bridge_support(paths: &HostPaths) -> Option<String> {
    let module = paths.sys.join("module/bridge");
    if module.is_dir() {
        return Some(if module.join("initstate").exists() {
            "bridge module loaded".to_owned()
        } else {
            "bridge built into the kernel".to_owned()
        });
    }
    if let Ok(entries) = fs::read_dir(paths.sys.join("class/net")) {
        for entry in entries.flatten() {
            if entry.path().join("bridge").is_dir() {
                return Some(format!(
                    "bridge device {} exists",
                    entry.file_name().to_string_lossy()
                ));
            }
        }
    }
    if lists_bridge_module(&paths.modules.join("modules.builtin")) {
        return Some("bridge built into the kernel".to_owned());
    }
    if lists_bridge_module(&paths.modules.join("modules.dep")) {
        return Some("bridge module available; loaded when the first bridge is created".to_owned());
    }
    None
}

/// Whether a `modules.builtin` or `modules.dep` file lists `net/bridge/bridge.ko`
/// (possibly compressed).
fn lists_bridge_module(index: &Path) -> bool {
    let Ok(text) = fs::read_to_string(index) else {
        return false;
    };
    text.lines().any(|line| {
        let module = line.split(':').next().unwrap_or_default().trim();
        let module = [".xz", ".zst", ".gz"]
            .iter()
            .fold(module, |m, ext| m.strip_suffix(ext).unwrap_or(m));
        module.ends_with("net/bridge/bridge.ko")
    })
}

fn bridge_check(paths: &HostPaths) -> Check {
    const ID: &str = "bridge";
    const TITLE: &str = "Bridge support";
    match bridge_support(paths) {
        Some(detail) => Check::pass(ID, TITLE, detail),
        None => Check::new(
            ID,
            TITLE,
            CheckStatus::Warn,
            "no bridge module loaded, built in, or installed; VMs can't share a host bridge",
            Some("sudo modprobe bridge"),
        ),
    }
}

fn ip_forward_check(paths: &HostPaths) -> Check {
    const ID: &str = "ip_forward";
    const TITLE: &str = "IPv4 forwarding";
    const FIX: &str =
        "sudo sysctl -w net.ipv4.ip_forward=1 (persist it with a file in /etc/sysctl.d/)";
    let file = paths.proc.join("sys/net/ipv4/ip_forward");
    match fs::read_to_string(&file) {
        Ok(value) if value.trim() == "1" => Check::pass(ID, TITLE, "net.ipv4.ip_forward = 1"),
        Ok(value) => Check::new(
            ID,
            TITLE,
            CheckStatus::Warn,
            format!(
                "net.ipv4.ip_forward = {}; VMs can't reach other networks through NAT",
                value.trim()
            ),
            Some(FIX),
        ),
        Err(e) => Check::new(
            ID,
            TITLE,
            CheckStatus::Warn,
            format!("cannot read {}: {e}", file.display()),
            Some(FIX),
        ),
    }
}

const GIB: u64 = 1 << 30;
/// Free space below this on the state directory's filesystem is a warning.
pub const DISK_WARN_BELOW: u64 = 10 * GIB;
/// Free space below this on the state directory's filesystem is a failure.
pub const DISK_FAIL_BELOW: u64 = 2 * GIB;

/// Maps free bytes on the state directory's filesystem to a status.
pub fn disk_status(available_bytes: u64) -> CheckStatus {
    if available_bytes < DISK_FAIL_BELOW {
        CheckStatus::Fail
    } else if available_bytes < DISK_WARN_BELOW {
        CheckStatus::Warn
    } else {
        CheckStatus::Pass
    }
}

/// The state directory itself, or its nearest existing ancestor if it isn't created yet.
fn nearest_existing(path: &Path) -> &Path {
    path.ancestors()
        .find(|p| !p.as_os_str().is_empty() && p.exists())
        .unwrap_or(Path::new("."))
}

fn disk_check(state_dir: &Path) -> Check {
    const ID: &str = "disk";
    const TITLE: &str = "Free disk space";
    let measured = nearest_existing(state_dir);
    let stat = match rustix::fs::statvfs(measured) {
        Ok(stat) => stat,
        Err(e) => {
            return Check::new(
                ID,
                TITLE,
                CheckStatus::Warn,
                format!("cannot statvfs {}: {e}", measured.display()),
                Some("check that the state directory's parent is readable"),
            );
        }
    };
    // f_bavail: blocks available to unprivileged users, which is what banger's files get.
    let available = stat.f_bavail.saturating_mul(stat.f_frsize);
    let status = disk_status(available);
    let detail = format!(
        "{:.1} GiB free on the filesystem holding {}",
        available as f64 / GIB as f64,
        measured.display()
    );
    let fix = (status != CheckStatus::Pass).then(|| {
        format!(
            "free space there (need {} GiB, {} GiB recommended) or move state_dir",
            DISK_FAIL_BELOW / GIB,
            DISK_WARN_BELOW / GIB
        )
    });
    Check {
        id: ID,
        title: TITLE.to_owned(),
        status,
        detail,
        fix,
    }
}

fn helper_check(helper: &Result<String, String>) -> Check {
    const ID: &str = "helper";
    const TITLE: &str = "Root helper";
    match helper {
        Ok(description) => Check::pass(ID, TITLE, format!("reachable ({description})")),
        Err(why) => Check::new(
            ID,
            TITLE,
            CheckStatus::Warn,
            format!(
                "unreachable: {why}; tap networking, NAT and device-mapper disks are unavailable"
            ),
            Some("start banger-helper as root"),
        ),
    }
}

/// What the daemon reports about its DNS server for VM names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DnsServer {
    Serving {
        address: String,
        suffix: String,
    },
    /// The bridge (and with it the server) comes up with the first VM.
    NotStarted {
        suffix: String,
    },
    /// It could not listen; the message says why and how to fix it.
    Failed(String),
    /// The daemon could not be asked.
    Unknown(String),
}

/// The doctor row for the DNS server guests use.
pub fn dns_check(dns: &DnsServer) -> Check {
    const ID: &str = "dns";
    const TITLE: &str = "VM-name DNS";
    match dns {
        DnsServer::Serving { address, suffix } => Check::pass(
            ID,
            TITLE,
            format!("answering <vm>.{suffix} on {address}, forwarding other names"),
        ),
        DnsServer::NotStarted { suffix } => Check::pass(
            ID,
            TITLE,
            format!("<vm>.{suffix} is served on the bridge address once the first VM starts"),
        ),
        DnsServer::Failed(why) => Check::new(
            ID,
            TITLE,
            CheckStatus::Warn,
            format!(
                "not serving: {why}; guests use the host's resolvers and VM names do not resolve"
            ),
            Some(
                "sudo setcap cap_net_bind_service=+ep $(command -v bangerd) && banger daemon stop",
            ),
        ),
        DnsServer::Unknown(why) => Check::new(
            ID,
            TITLE,
            CheckStatus::Warn,
            format!("could not ask the daemon: {why}"),
            Some("see banger daemon logs"),
        ),
    }
}

/// What the daemon knows for the doctor report beyond the host probes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonFacts {
    pub dns: DnsServer,
    /// The leak check's findings (`kind name` each), or why it could not run.
    pub leaks: Result<Vec<String>, String>,
    pub web: WebUi,
    /// The warm pool: its guests now and `[pool] size`, or why they could
    /// not be counted.
    pub pool: Result<(usize, usize), String>,
}

impl DaemonFacts {
    /// A daemon that could not be asked: `why`.
    pub fn unreachable(why: &str) -> Self {
        DaemonFacts {
            dns: DnsServer::Unknown(why.into()),
            leaks: Err(why.into()),
            web: WebUi::Unknown(why.into()),
            pool: Err(why.into()),
        }
    }
}

/// The daemon's web UI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WebUi {
    /// Served at this URL.
    Served(String),
    /// Enabled, but not served: why (its port taken, and by whom).
    Failed(String),
    Disabled,
    /// The daemon could not be asked.
    Unknown(String),
}

/// The whole doctor report, in order: the host's checks, then the daemon's
/// (DNS, leaks, web UI, warm pool). `host.doctor` serves it; `banger doctor` prints
/// it, and makes it itself (with `DaemonFacts::unreachable`) when no
/// daemon answers.
pub fn doctor_report(inputs: &DoctorInputs, facts: &DaemonFacts) -> Vec<Check> {
    let mut checks = run_checks(inputs);
    checks.push(dns_check(&facts.dns));
    checks.push(leak_check(&facts.leaks));
    checks.push(web_check(&facts.web));
    checks.push(pool_check(&facts.pool));
    checks
}

/// The warm pool's guests (`vm list --all` less `vm list`) against
/// `[pool] size`.
fn pool_check(pool: &Result<(usize, usize), String>) -> Check {
    const ID: &str = "pool";
    const TITLE: &str = "Warm pool";
    match pool {
        Ok((n, size)) => Check::pass(
            ID,
            TITLE,
            format!("{n} guest(s) of [pool] size = {size} (banger vm list --all shows them)"),
        ),
        Err(e) => Check::new(
            ID,
            TITLE,
            CheckStatus::Warn,
            format!("could not count them: {e}"),
            Some("see banger daemon logs"),
        ),
    }
}

/// The same leak check `banger gc` runs, as a doctor row.
fn leak_check(leaks: &Result<Vec<String>, String>) -> Check {
    const ID: &str = "leaks";
    const TITLE: &str = "Leaked resources";
    match leaks {
        Ok(l) if l.is_empty() => Check::pass(
            ID,
            TITLE,
            "no leaked VM dirs, rows, processes, taps, snapshots or loop devices",
        ),
        Ok(l) => Check::new(
            ID,
            TITLE,
            CheckStatus::Warn,
            format!("{} leaked resource(s): {}", l.len(), l.join(", ")),
            Some("banger gc (banger gc --dry-run lists them)"),
        ),
        Err(e) => Check::new(
            ID,
            TITLE,
            CheckStatus::Warn,
            format!("could not run the leak check: {e}"),
            Some("see banger daemon logs"),
        ),
    }
}

/// The web UI: served, disabled, or its port taken (and by whom).
fn web_check(web: &WebUi) -> Check {
    const ID: &str = "web";
    const TITLE: &str = "Web UI";
    match web {
        WebUi::Served(url) => Check::pass(
            ID,
            TITLE,
            format!("served at {url} (`banger web` prints a login URL)"),
        ),
        WebUi::Disabled => Check::pass(ID, TITLE, "disabled ([web] enabled = false)"),
        WebUi::Failed(why) => Check::new(
            ID,
            TITLE,
            CheckStatus::Warn,
            why.clone(),
            Some(
                "free the port, or set [web] listen = \"127.0.0.1:PORT\" in config.toml, then banger daemon stop",
            ),
        ),
        WebUi::Unknown(why) => Check::new(
            ID,
            TITLE,
            CheckStatus::Warn,
            format!("could not ask the daemon: {why}"),
            Some("see banger daemon logs"),
        ),
    }
}

/// The report as the wire carries it (`host.doctor`), with its counts.
pub fn wire_report(checks: &[Check]) -> banger_wire::methods::DoctorReport {
    let count = |st| checks.iter().filter(|c| c.status == st).count();
    banger_wire::methods::DoctorReport {
        failed: count(CheckStatus::Fail),
        warned: count(CheckStatus::Warn),
        checks: checks.iter().map(Check::to_wire).collect(),
    }
}

impl Check {
    /// This row as the wire carries it (`host.doctor`).
    pub fn to_wire(&self) -> banger_wire::methods::DoctorCheck {
        use banger_wire::methods::CheckLevel;
        banger_wire::methods::DoctorCheck {
            id: self.id.to_string(),
            title: self.title.clone(),
            status: match self.status {
                CheckStatus::Pass => CheckLevel::Pass,
                CheckStatus::Warn => CheckLevel::Warn,
                CheckStatus::Fail => CheckLevel::Fail,
            },
            detail: self.detail.clone(),
            fix: self.fix.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::os::unix::fs::PermissionsExt;

    use crate::binary::find_binary_in;

    const ALL_BINARIES: [&str; 9] = [
        "firecracker",
        "qemu-system-x86_64",
        "qemu-img",
        "mkfs.ext4",
        "mmdebstrap",
        "debootstrap",
        "npm",
        "ssh",
        "nft",
    ];

    struct FakeHost {
        tmp: tempfile::TempDir,
        paths: HostPaths,
        bin: PathBuf,
        /// What the state directory's reflink probe answers.
        root_disks: RootDiskStrategy,
    }

    impl FakeHost {
        /// An empty host: no modules, no devices, no binaries.
        fn bare() -> Self {
            let tmp = tempfile::tempdir().unwrap();
            let paths = HostPaths::under(&tmp.path().join("root"));
            let bin = tmp.path().join("bin");
            for dir in [&paths.sys, &paths.dev, &paths.proc, &paths.modules, &bin] {
                fs::create_dir_all(dir).unwrap();
            }
            Self {
                tmp,
                paths,
                bin,
                root_disks: RootDiskStrategy::OverlayOrCopy,
            }
        }

        /// A host with everything banger can use.
        fn complete() -> Self {
            let host = Self::bare();
            host.dir("sys/module/kvm_intel");
            host.file("sys/module/bridge/initstate", "live\n");
            host.file("proc/sys/net/ipv4/ip_forward", "1\n");
            for node in ["dev/kvm", "dev/net/tun", "dev/vhost-vsock"] {
                host.file(node, "");
            }
            for name in ALL_BINARIES {
                host.binary(name);
            }
            Self {
                root_disks: RootDiskStrategy::Reflink,
                ..host
            }
        }

        fn dir(&self, rel: &str) {
            fs::create_dir_all(self.tmp.path().join("root").join(rel)).unwrap();
        }

        fn file(&self, rel: &str, contents: &str) {
            let path = self.tmp.path().join("root").join(rel);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, contents).unwrap();
        }

        fn remove(&self, rel: &str) {
            let path = self.tmp.path().join("root").join(rel);
            if path.is_dir() {
                fs::remove_dir_all(path).unwrap();
            } else {
                fs::remove_file(path).unwrap();
            }
        }

        fn binary(&self, name: &str) {
            let path = self.bin.join(name);
            fs::write(&path, "#!/bin/sh\n").unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
        }

        fn remove_binary(&self, name: &str) {
            fs::remove_file(self.bin.join(name)).unwrap();
        }

        fn inputs(&self, accel: AccelSetting) -> DoctorInputs {
            DoctorInputs {
                firecracker_bin: "firecracker".into(),
                qemu_bin: "qemu-system-x86_64".into(),
                accel,
                state_dir: self.tmp.path().join("state/not/yet/created"),
                helper: Ok("pid 42, version 0.1.0".into()),
            }
        }

        fn run(&self, inputs: &DoctorInputs) -> HashMap<&'static str, Check> {
            let find = |name: &str| find_binary_in(name, Some(self.bin.as_os_str()), &[]);
            let checks = run_checks_with(inputs, &self.paths, &find, Ok(self.root_disks));
            let count = checks.len();
            let by_id: HashMap<_, _> = checks.into_iter().map(|c| (c.id, c)).collect();
            assert_eq!(by_id.len(), count, "check ids must be unique");
            by_id
        }
    }

    fn status(checks: &HashMap<&'static str, Check>, id: &str) -> CheckStatus {
        checks[id].status
    }

    #[test]
    fn complete_host_passes_everything() {
        let host = FakeHost::complete();
        let checks = host.run(&host.inputs(AccelSetting::Auto));
        assert_eq!(checks.len(), 17);
        for check in checks.values() {
            // Free space depends on the real filesystem holding the tempdir.
            if check.id != "disk" {
                assert_eq!(check.status, CheckStatus::Pass, "{check:?}");
                assert_eq!(check.fix, None, "{check:?}");
            }
        }
        assert_eq!(
            checks["accel"].detail,
            "kvm (accel = \"auto\"; the first VM boot confirms it with a test boot)"
        );
        assert_eq!(
            checks["qemu"].detail,
            host.bin.join("qemu-system-x86_64").display().to_string()
        );
        assert_eq!(checks["bridge"].detail, "bridge module loaded");
        assert!(checks["helper"].detail.contains("pid 42"));
    }

    #[test]
    fn bare_host_mapping() {
        let host = FakeHost::bare();
        let mut inputs = host.inputs(AccelSetting::Auto);
        inputs.helper = Err("connection refused".into());
        let checks = host.run(&inputs);
        let expected = [
            ("kvm", CheckStatus::Warn),
            ("accel", CheckStatus::Pass),
            ("firecracker", CheckStatus::Warn),
            ("qemu", CheckStatus::Fail),
            ("qemu_img", CheckStatus::Fail),
            ("e2fsprogs", CheckStatus::Fail),
            ("rootfs_builder", CheckStatus::Warn),
            ("npm", CheckStatus::Warn),
            ("ssh", CheckStatus::Warn),
            ("nft", CheckStatus::Warn),
            ("tun", CheckStatus::Warn),
            ("bridge", CheckStatus::Warn),
            ("ip_forward", CheckStatus::Warn),
            ("root_disks", CheckStatus::Pass),
            ("vhost_vsock", CheckStatus::Warn),
            ("helper", CheckStatus::Warn),
        ];
        for (id, want) in expected {
            assert_eq!(status(&checks, id), want, "{:?}", checks[id]);
            if want != CheckStatus::Pass {
                let fix = checks[id].fix.as_deref().unwrap_or_default();
                assert!(!fix.is_empty() && !fix.contains('\n'), "{:?}", checks[id]);
            }
        }
        assert!(checks["kvm"].detail.contains("/dev/kvm is missing"));
        assert!(checks["kvm"].detail.contains("TCG"));
        assert!(checks["accel"].detail.starts_with("tcg"));
        assert_eq!(
            checks["qemu"].fix.as_deref(),
            Some("sudo apt install qemu-system-x86")
        );
        assert_eq!(
            checks["qemu_img"].fix.as_deref(),
            Some("sudo apt install qemu-utils")
        );
        assert_eq!(
            checks["e2fsprogs"].detail,
            "mkfs.ext4 not found; images and disks can't be made"
        );
        assert!(checks["firecracker"].detail.contains("QEMU will be used"));
        assert!(checks["vhost_vsock"].detail.contains("virtio-serial"));
        assert!(
            checks["root_disks"].detail.contains("qcow2"),
            "{:?}",
            checks["root_disks"]
        );
        assert!(checks["helper"].detail.contains("connection refused"));
        assert!(checks["ip_forward"].detail.starts_with("cannot read"));
    }

    #[test]
    fn pvm_warns_and_firecracker_is_not_used() {
        let host = FakeHost::complete();
        host.dir("sys/module/kvm_pvm");
        let checks = host.run(&host.inputs(AccelSetting::Auto));
        assert_eq!(status(&checks, "kvm"), CheckStatus::Warn);
        assert_eq!(
            checks["kvm"].detail,
            "KVM is PVM (kvm_pvm): stock kernels can't run under it; \
             QEMU with TCG (software emulation) will be used"
        );
        assert_eq!(status(&checks, "accel"), CheckStatus::Pass);
        assert!(
            checks["accel"]
                .detail
                .starts_with("tcg (accel = \"auto\": KVM is PVM")
        );
        assert_eq!(status(&checks, "firecracker"), CheckStatus::Warn);
        assert!(checks["firecracker"].detail.contains("needs KVM"));
    }

    #[test]
    fn forced_kvm_fails_when_unusable() {
        let host = FakeHost::complete();
        host.dir("sys/module/kvm_pvm");
        let checks = host.run(&host.inputs(AccelSetting::Kvm));
        assert_eq!(status(&checks, "kvm"), CheckStatus::Fail);
        assert_eq!(status(&checks, "accel"), CheckStatus::Fail);
        assert!(
            checks["accel"]
                .detail
                .contains("accel = \"auto\" or \"tcg\"")
        );

        host.remove("sys/module/kvm_pvm");
        host.remove("dev/kvm");
        let checks = host.run(&host.inputs(AccelSetting::Kvm));
        assert_eq!(status(&checks, "kvm"), CheckStatus::Fail);
        assert!(checks["accel"].detail.contains("/dev/kvm is missing"));
    }

    #[test]
    fn forced_tcg_on_kvm_host() {
        let host = FakeHost::complete();
        let checks = host.run(&host.inputs(AccelSetting::Tcg));
        assert_eq!(status(&checks, "kvm"), CheckStatus::Pass);
        assert_eq!(status(&checks, "accel"), CheckStatus::Pass);
        assert!(checks["accel"].detail.starts_with("tcg (accel = \"tcg\""));
        // Firecracker can't run without KVM.
        assert_eq!(status(&checks, "firecracker"), CheckStatus::Warn);
    }

    #[test]
    fn configured_binary_paths() {
        let host = FakeHost::complete();
        let mut inputs = host.inputs(AccelSetting::Auto);
        inputs.qemu_bin = host.bin.join("qemu-system-x86_64").display().to_string();
        inputs.firecracker_bin = "/nonexistent/firecracker".into();
        let checks = host.run(&inputs);
        assert_eq!(status(&checks, "qemu"), CheckStatus::Pass);
        assert_eq!(status(&checks, "firecracker"), CheckStatus::Warn);
        assert!(
            checks["firecracker"]
                .detail
                .contains("/nonexistent/firecracker")
        );
    }

    #[test]
    fn tool_checks_degrade_individually() {
        let host = FakeHost::complete();
        host.remove_binary("qemu-img");
        host.remove_binary("mkfs.ext4");
        host.remove_binary("mmdebstrap");
        host.remove_binary("nft");
        let checks = host.run(&host.inputs(AccelSetting::Auto));
        // device-mapper is there, so qcow2 overlays are only the fallback.
        assert_eq!(status(&checks, "qemu_img"), CheckStatus::Warn);
        assert_eq!(status(&checks, "e2fsprogs"), CheckStatus::Fail);
        assert!(
            checks["e2fsprogs"]
                .detail
                .starts_with("mkfs.ext4 not found")
        );
        assert_eq!(status(&checks, "rootfs_builder"), CheckStatus::Pass);
        assert!(checks["rootfs_builder"].detail.contains("debootstrap"));
        assert_eq!(status(&checks, "nft"), CheckStatus::Warn);
        assert_eq!(
            checks["nft"].fix.as_deref(),
            Some("sudo apt install nftables")
        );
        assert_eq!(status(&checks, "ssh"), CheckStatus::Pass);
    }

    #[test]
    fn device_nodes_map_to_warnings() {
        let host = FakeHost::complete();
        host.remove("dev/net/tun");
        host.remove("dev/vhost-vsock");
        let checks = host.run(&host.inputs(AccelSetting::Auto));
        assert_eq!(status(&checks, "tun"), CheckStatus::Warn);
        assert_eq!(checks["tun"].fix.as_deref(), Some("sudo modprobe tun"));
        assert_eq!(status(&checks, "vhost_vsock"), CheckStatus::Warn);
    }

    #[test]
    fn a_cached_kvm_test_boot_decides_auto() {
        let host = FakeHost::complete();
        let inputs = host.inputs(AccelSetting::Auto);
        fs::create_dir_all(&inputs.state_dir).unwrap();
        let probe = |usable, detail: &str| KvmProbe {
            boot_id: crate::kvm::current_boot_id().unwrap(),
            usable,
            detail: detail.into(),
        };
        probe(
            false,
            "the kernel printed nothing from userspace within 10s",
        )
        .save(&inputs.state_dir)
        .unwrap();
        let checks = host.run(&inputs);
        assert!(
            checks["accel"]
                .detail
                .starts_with("tcg (accel = \"auto\": a test boot under KVM failed: the kernel"),
            "{:?}",
            checks["accel"]
        );
        assert!(checks["firecracker"].detail.contains("needs KVM"));
        probe(true, "booted to userspace in 0.91s")
            .save(&inputs.state_dir)
            .unwrap();
        let checks = host.run(&inputs);
        assert!(
            checks["accel"]
                .detail
                .contains("booted to userspace in 0.91s")
        );
        assert_eq!(status(&checks, "firecracker"), CheckStatus::Pass);
        // A probe from an earlier boot of the host is not used.
        KvmProbe {
            boot_id: "another-boot".into(),
            ..probe(false, "old")
        }
        .save(&inputs.state_dir)
        .unwrap();
        assert!(KvmProbe::load(&inputs.state_dir).is_none());
    }

    #[test]
    fn tun_readable_only_by_root_warns_a_user() {
        use std::os::unix::fs::PermissionsExt;
        let host = FakeHost::complete();
        let tun = host.tmp.path().join("root/dev/net/tun");
        fs::set_permissions(&tun, fs::Permissions::from_mode(0o600)).unwrap();
        let user = tun_check(&host.paths, false);
        assert_eq!(user.status, CheckStatus::Warn);
        assert!(user.detail.contains("mode 0600"), "{user:?}");
        assert!(user.fix.unwrap().contains("chmod 0666"));
        assert_eq!(tun_check(&host.paths, true).status, CheckStatus::Pass);
        fs::set_permissions(&tun, fs::Permissions::from_mode(0o666)).unwrap();
        assert_eq!(tun_check(&host.paths, false).status, CheckStatus::Pass);
    }

    #[test]
    fn root_disk_rows() {
        let dir = Path::new("/var/lib/banger");
        let none = Ok(RootDiskStrategy::OverlayOrCopy);
        let qemu = root_disks_check(dir, &none, false);
        assert_eq!(qemu.status, CheckStatus::Pass);
        assert!(qemu.detail.contains("qcow2 overlays"), "{qemu:?}");
        let fc = root_disks_check(dir, &none, true);
        assert_eq!(fc.status, CheckStatus::Warn);
        assert!(fc.detail.contains("sparse copy"), "{fc:?}");
        assert!(fc.fix.unwrap().contains("btrfs"));
        let reflink = root_disks_check(dir, &Ok(RootDiskStrategy::Reflink), true);
        assert_eq!(reflink.status, CheckStatus::Pass);
        let dm = root_disks_check(dir, &Ok(RootDiskStrategy::DmSnapshot), true);
        assert_eq!(dm.status, CheckStatus::Pass);
        assert!(dm.detail.starts_with("device-mapper snapshots"), "{dm:?}");
        let denied = std::io::Error::from(std::io::ErrorKind::PermissionDenied);
        let err = root_disks_check(dir, &Err(denied), false);
        assert_eq!(err.status, CheckStatus::Warn);
        assert!(err.detail.starts_with("cannot probe /var/lib/banger"));
    }

    #[test]
    fn ip_forward_disabled_warns() {
        let host = FakeHost::complete();
        host.file("proc/sys/net/ipv4/ip_forward", "0\n");
        let check = ip_forward_check(&host.paths);
        assert_eq!(check.status, CheckStatus::Warn);
        assert!(check.detail.starts_with("net.ipv4.ip_forward = 0;"));
        assert!(
            check
                .fix
                .unwrap()
                .starts_with("sudo sysctl -w net.ipv4.ip_forward=1")
        );
    }

    #[test]
    fn bridge_detection_methods() {
        let host = FakeHost::bare();
        assert_eq!(bridge_check(&host.paths).status, CheckStatus::Warn);

        // Loadable but not loaded: listed in modules.dep (compressed).
        host.file(
            "modules/modules.dep",
            "kernel/net/802/stp.ko.xz:\nkernel/net/bridge/bridge.ko.xz: kernel/net/802/stp.ko.xz\n",
        );
        let check = bridge_check(&host.paths);
        assert_eq!(check.status, CheckStatus::Pass);
        assert!(
            check
                .detail
                .contains("loaded when the first bridge is created")
        );

        // br_netfilter's module must not be mistaken for the bridge.
        host.file(
            "modules/modules.dep",
            "kernel/net/bridge/br_netfilter.ko:\n",
        );
        assert_eq!(bridge_check(&host.paths).status, CheckStatus::Warn);

        host.file("modules/modules.builtin", "kernel/net/bridge/bridge.ko\n");
        assert_eq!(
            bridge_check(&host.paths).detail,
            "bridge built into the kernel"
        );
        host.remove("modules/modules.builtin");

        host.dir("sys/class/net/lo");
        host.dir("sys/class/net/br0/bridge");
        assert_eq!(bridge_check(&host.paths).detail, "bridge device br0 exists");

        // Built in: /sys/module/bridge without initstate.
        host.file("sys/module/bridge/version", "2.3\n");
        assert_eq!(
            bridge_check(&host.paths).detail,
            "bridge built into the kernel"
        );
    }

    #[test]
    fn disk_thresholds() {
        assert_eq!(disk_status(0), CheckStatus::Fail);
        assert_eq!(disk_status(2 * GIB - 1), CheckStatus::Fail);
        assert_eq!(disk_status(2 * GIB), CheckStatus::Warn);
        assert_eq!(disk_status(10 * GIB - 1), CheckStatus::Warn);
        assert_eq!(disk_status(10 * GIB), CheckStatus::Pass);
        assert_eq!(disk_status(u64::MAX), CheckStatus::Pass);
    }

    #[test]
    fn disk_measured_at_nearest_existing_ancestor() {
        let tmp = tempfile::tempdir().unwrap();
        let state = tmp.path().join("a/b/c");
        assert_eq!(nearest_existing(&state), tmp.path());
        assert_eq!(nearest_existing(tmp.path()), tmp.path());
        assert_eq!(nearest_existing(Path::new("no-such-dir/x")), Path::new("."));
        let check = disk_check(&state);
        assert!(
            check
                .detail
                .ends_with(&format!("holding {}", tmp.path().display())),
            "{check:?}"
        );
        assert!(check.detail.contains(" GiB free"));
        assert_eq!(check.fix.is_some(), check.status != CheckStatus::Pass);
    }

    #[test]
    fn dns_rows() {
        let serving = dns_check(&DnsServer::Serving {
            address: "172.30.0.1:53".into(),
            suffix: "vm".into(),
        });
        assert_eq!(serving.status, CheckStatus::Pass);
        assert!(serving.detail.contains("<vm>.vm on 172.30.0.1:53"));
        let later = dns_check(&DnsServer::NotStarted { suffix: "x".into() });
        assert_eq!(later.status, CheckStatus::Pass);
        let failed = dns_check(&DnsServer::Failed(
            "cannot listen on 172.30.0.1:53: permission denied".into(),
        ));
        assert_eq!(failed.status, CheckStatus::Warn);
        assert!(failed.fix.unwrap().contains("cap_net_bind_service"));
        assert_eq!(
            dns_check(&DnsServer::Unknown("no daemon".into())).status,
            CheckStatus::Warn
        );
    }

    #[test]
    fn check_serializes_snake_case() {
        let check = Check::new("kvm", "KVM", CheckStatus::Warn, "x", None);
        let json = serde_json::to_value(&check).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "id": "kvm", "title": "KVM", "status": "warn", "detail": "x", "fix": null
            })
        );
        assert!(CheckStatus::Pass < CheckStatus::Warn && CheckStatus::Warn < CheckStatus::Fail);
    }

    /// This machine kind's /dev/kvm is served by kvm_pvm; CI runs on the same kind.
    #[test]
    fn real_host_reports_pvm() {
        let tmp = tempfile::tempdir().unwrap();
        let inputs = DoctorInputs {
            firecracker_bin: "firecracker".into(),
            qemu_bin: "qemu-system-x86_64".into(),
            accel: AccelSetting::Auto,
            state_dir: tmp.path().join("state"),
            helper: Err("not started by this test".into()),
        };
        let checks = run_checks(&inputs);
        let kvm = checks.iter().find(|c| c.id == "kvm").unwrap();
        assert_eq!(kvm.status, CheckStatus::Warn, "{kvm:?}");
        assert!(kvm.detail.starts_with("KVM is PVM (kvm_pvm)"), "{kvm:?}");
        let accel = checks.iter().find(|c| c.id == "accel").unwrap();
        assert!(accel.detail.starts_with("tcg"), "{accel:?}");
        assert_eq!(crate::kvm_status(), KvmStatus::Pvm);
    }
}
