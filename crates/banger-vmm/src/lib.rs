//! VMM drivers behind one interface, and what is *currently true* about a
//! running VM ([`Handles`], persisted as `handles.json` in the VM dir).
//!
//! [`is_alive`] is the one answer to "is this VM alive": every caller asks it.

mod boot_media;
mod console;
mod disk_lock;
pub mod firecracker;
mod handles;
mod intent;
mod memory;
mod proc;
pub mod qemu;
mod qmp;
mod spec;

pub use banger_wire::{InitMode, Vmm};
pub use boot_media::BootMedia;
pub use console::{ConsoleScan, cap_console, console_offset, console_tail, rotated_console};
pub use handles::{AgentEndpoint, HANDLES_FILE, Handles, HandlesError};
pub use intent::LaunchIntent;
pub use memory::{copy_memory, memory_digest, shared_memory};
pub use proc::{ProcessIdentity, is_alive, pids, process_identity};
pub use qemu::wait_dead;
pub use spec::{DiskFormat, DiskSpec, GuestMemory, LaunchSpec, NetSpec};

use std::path::{Path, PathBuf};

/// The vsock port the guest agent listens on (both VMMs).
pub const AGENT_VSOCK_PORT: u32 = 1024;

/// A byte stream to a guest agent, whichever channel carries it.
pub trait AgentIo: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> AgentIo for T {}

/// Either driver, chosen per VM.
#[derive(Debug, Clone)]
pub enum Driver {
    Qemu(qemu::Qemu),
    Firecracker(firecracker::Firecracker),
}

impl Driver {
    /// Start the VM: its handles once the VMM runs it, and the boot media
    /// to release once the guest has booted.
    pub async fn launch(&self, spec: &LaunchSpec) -> Result<(Handles, BootMedia), VmmError> {
        match self {
            Driver::Qemu(q) => q.launch(spec).await,
            // Firecracker reads the kernel into guest memory and keeps no copy.
            Driver::Firecracker(f) => Ok((f.launch(spec).await?, BootMedia::default())),
        }
    }
}

/// The VMM's control socket in the VM dir: QMP (QEMU) or the API (Firecracker).
pub fn control_socket(vmm: Vmm, dir: &Path) -> PathBuf {
    match vmm {
        Vmm::Qemu => qemu::control_socket(dir),
        Vmm::Firecracker => firecracker::api_socket(dir),
    }
}

/// Whether the VMM carries the agent over vsock (and so the VM needs a
/// CID): Firecracker always (hybrid vsock); QEMU where `vhost_vsock` is
/// usable on this host, else over virtio-serial.
pub fn agent_over_vsock(vmm: Vmm, vhost_vsock: bool) -> bool {
    match vmm {
        Vmm::Firecracker => true,
        Vmm::Qemu => vhost_vsock,
    }
}

/// Whether the VMM opens qcow2 disks (Firecracker takes raw ones only).
pub fn takes_qcow2(vmm: Vmm) -> bool {
    vmm == Vmm::Qemu
}

/// Whether the guest must be asked (through its agent) to power off before
/// [`stop`]: QEMU's microvm has no power button to press; Firecracker's stop
/// sends Ctrl-Alt-Del itself.
pub fn needs_guest_shutdown(vmm: Vmm) -> bool {
    vmm == Vmm::Qemu
}

/// The sockets and pid files a VMM leaves in the VM dir, removed once it is
/// gone (handles.json is [`Handles::remove`]'s).
pub fn remove_runtime_files(dir: &Path) {
    for f in [
        qemu::control_socket(dir),
        qemu::agent_socket(dir),
        qemu::pid_file(dir),
        firecracker::api_socket(dir),
        firecracker::vsock_socket(dir),
    ] {
        let _ = std::fs::remove_file(f);
    }
}

/// Stop a VM's VMM, gracefully where the VMM can, then by force.
pub async fn stop(h: &Handles, timeout: std::time::Duration) -> Result<(), VmmError> {
    match h.vmm {
        Vmm::Qemu => qemu::stop(h, timeout).await,
        Vmm::Firecracker => firecracker::stop(h, timeout).await,
    }
}

/// Press the guest's power button: an ACPI power-down request (QMP
/// `system_powerdown`) for QEMU, Ctrl-Alt-Del for Firecracker. A guest that
/// handles it powers off and its VMM exits; [`stop`] ends one that does not.
pub async fn press_power_button(h: &Handles) -> Result<(), VmmError> {
    match h.vmm {
        Vmm::Qemu => qemu::press_power_button(h).await,
        Vmm::Firecracker => banger_firecracker::FirecrackerClient::new(&h.control_socket)
            .send_ctrl_alt_del()
            .await
            .map_err(VmmError::FirecrackerApi),
    }
}

/// Pause the guest's vCPUs (its memory stays; a paused guest uses no
/// CPU), or resume them: QMP `stop` / `cont`, Firecracker `PATCH /vm`.
pub async fn set_paused(h: &Handles, paused: bool) -> Result<(), VmmError> {
    match h.vmm {
        Vmm::Qemu => qemu::command(h, if paused { "stop" } else { "cont" }).await,
        Vmm::Firecracker => {
            use banger_firecracker::models::VmState;
            let state = if paused {
                VmState::Paused
            } else {
                VmState::Resumed
            };
            banger_firecracker::FirecrackerClient::new(&h.control_socket)
                .patch_vm(state)
                .await
                .map_err(VmmError::FirecrackerApi)
        }
    }
}

/// Load the saved state `state` into a VMM launched with
/// `LaunchSpec::incoming`, and run the guest. `memory`: the snapshot's
/// memory file, which the guest's RAM maps (QEMU with
/// `GuestMemory::Snapshot`: the stream does not carry the RAM; Firecracker:
/// always).
pub async fn load_state(
    h: &Handles,
    state: &Path,
    memory: Option<&Path>,
    timeout: std::time::Duration,
) -> Result<(), VmmError> {
    match (h.vmm, memory) {
        (Vmm::Qemu, memory) => qemu::load_state(h, state, memory.is_some(), timeout).await,
        (Vmm::Firecracker, Some(memory)) => {
            firecracker::load_snapshot(h, state, memory, timeout).await
        }
        (Vmm::Firecracker, None) => Err(VmmError::Launch {
            what: "no memory file",
            message: "a Firecracker snapshot keeps the guest's memory in a file".into(),
        }),
    }
}

/// The first line `bin --version` prints (the VMM's name and version),
/// which must be there.
async fn version_line(bin: &Path, vmm: &'static str) -> Result<String, VmmError> {
    let out = tokio::process::Command::new(bin)
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|e| VmmError::Launch {
            what: "cannot run the VMM",
            message: format!("{vmm} ({}): {e}", bin.display()),
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    match text.lines().next().map(str::trim) {
        Some(line) if out.status.success() && !line.is_empty() => Ok(line.to_string()),
        _ => Err(VmmError::Launch {
            what: "the VMM did not say its version",
            message: format!(
                "{vmm} ({} --version): {}",
                bin.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        }),
    }
}

/// A byte stream to the guest agent.
pub async fn connect_agent(
    endpoint: &AgentEndpoint,
    timeout: std::time::Duration,
) -> Result<Box<dyn AgentIo>, VmmError> {
    let vsock_err = |e: &dyn std::fmt::Display| VmmError::Launch {
        what: "vsock connect failed",
        message: e.to_string(),
    };
    Ok(match endpoint {
        AgentEndpoint::Serial { socket } => {
            Box::new(tokio::net::UnixStream::connect(socket).await?)
        }
        AgentEndpoint::HybridVsock { uds, port } => Box::new(
            banger_firecracker::connect_vsock(uds, *port, timeout)
                .await
                .map_err(|e| vsock_err(&e))?,
        ),
        AgentEndpoint::Vsock { cid, port } => {
            let addr = tokio_vsock::VsockAddr::new(*cid, *port);
            let stream = tokio::time::timeout(timeout, tokio_vsock::VsockStream::connect(addr))
                .await
                .map_err(|_| vsock_err(&format!("no answer from cid {cid} port {port}")))?
                .map_err(|e| vsock_err(&format!("cid {cid} port {port}: {e}")))?;
            Box::new(stream)
        }
    })
}

/// A VMM failed to start or stop.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("{what}: {message}")]
    Launch { what: &'static str, message: String },
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("QMP: {0}")]
    Qmp(String),
    #[error(transparent)]
    Handles(#[from] HandlesError),
    #[error("Firecracker did not start")]
    FirecrackerSpawn(#[source] banger_firecracker::ProcessError),
    #[error("Firecracker's API")]
    FirecrackerApi(#[source] banger_firecracker::ApiError),
    #[error("Firecracker refused the VM")]
    FirecrackerConfig(#[source] Box<banger_firecracker::ConfigureError>),
    #[error("{} is in use by another VMM (it holds the disk's lock)", path.display())]
    DiskInUse { path: std::path::PathBuf },
    #[error("cannot reach the agent over vsock")]
    Vsock(#[source] banger_firecracker::VsockError),
}
