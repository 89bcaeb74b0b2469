//! The Firecracker driver: `firecracker --api-sock` configured over its
//! HTTP API (logger, machine config, boot source, drives, NIC, vsock), then
//! `InstanceStart`; the agent is reached over hybrid vsock. Graceful stop is
//! `SendCtrlAltDel`, then SIGKILL. Snapshots: `PUT /snapshot/create` of a
//! paused VM, and `PUT /snapshot/load` into a fresh process.
//!
//! Firecracker runs in the VM's directory and is given the disks in it by
//! relative paths: a snapshot records the paths the drives were opened at,
//! and a restore reopens them, so that in a VM restored (in its own
//! directory) they name that VM's copies, never the source's. (The jailer
//! gets the same from its chroot.)

use std::path::{Path, PathBuf};
use std::time::Duration;

use banger_firecracker::models::{
    BootSource, Drive, LogLevel, Logger, MachineConfiguration, MemoryBackend, MemoryBackendType,
    Metrics, NetworkInterface, NetworkOverride, SnapshotCreateParams, SnapshotLoadParams,
    SnapshotType, Vsock, VsockOverride,
};
use banger_firecracker::{FirecrackerClient, SpawnConfig, VmConfig, configure_and_start, spawn};
use tracing::{info, warn};

use crate::disk_lock::DiskLocks;
use crate::proc::start_ticks;
use crate::qemu::{kill, wait_dead};
use crate::{
    AGENT_VSOCK_PORT, AgentEndpoint, DiskFormat, Handles, LaunchSpec, Vmm, VmmError, is_alive,
};

/// What Firecracker adds to the guest's command line: the agent rides
/// vsock; Firecracker exits when its guest resets, so the guest powers off
/// by rebooting (`reboot=k`), and there is no PCI bus to probe.
pub const KERNEL_ARGS: &str = "banger.channel=vsock banger.halt=reboot reboot=k pci=off";

/// The id of the VM's one network interface.
const IFACE_ID: &str = "eth0";

#[derive(Debug, Clone)]
pub struct Firecracker {
    pub bin: PathBuf,
}

pub fn api_socket(dir: &Path) -> PathBuf {
    dir.join("firecracker.sock")
}
pub fn vsock_socket(dir: &Path) -> PathBuf {
    dir.join("vsock.sock")
}
/// Firecracker's own log (the guest console goes to `console.log`).
pub fn log_file(dir: &Path) -> PathBuf {
    dir.join("firecracker.log")
}
pub fn metrics_file(dir: &Path) -> PathBuf {
    dir.join("firecracker-metrics.json")
}

impl Firecracker {
    /// The API calls that configure `spec`. Pure: unit-tested.
    pub fn config(&self, spec: &LaunchSpec) -> Result<VmConfig, VmmError> {
        let cid = spec.vsock_cid.ok_or(VmmError::Launch {
            what: "no vsock CID",
            message: "Firecracker needs one for the agent".into(),
        })?;
        let drives = spec
            .disks
            .iter()
            .enumerate()
            .map(|(i, d)| {
                if d.format != DiskFormat::Raw {
                    return Err(VmmError::Launch {
                        what: "unsupported disk",
                        message: format!("{} is not raw", d.path.display()),
                    });
                }
                Ok(Drive::virtio_block(
                    if i == 0 {
                        "root".to_string()
                    } else {
                        format!("disk{i}")
                    },
                    d.path.strip_prefix(&spec.dir).unwrap_or(&d.path),
                    i == 0,
                    d.read_only,
                ))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(VmConfig {
            logger: Some(Logger {
                log_path: Some(log_file(&spec.dir)),
                level: Some(LogLevel::Info),
                ..Default::default()
            }),
            metrics: Some(Metrics {
                metrics_path: metrics_file(&spec.dir),
                emit_id: None,
                properties: None,
            }),
            machine: MachineConfiguration::new(spec.vcpus, u64::from(spec.memory_mib)),
            boot_source: BootSource {
                kernel_image_path: spec.kernel.clone(),
                initrd_path: spec.initrd.clone(),
                boot_args: Some(format!("{} {KERNEL_ARGS}", spec.cmdline)),
            },
            drives,
            network_interfaces: spec
                .net
                .iter()
                .map(|n| NetworkInterface::tap(IFACE_ID, &n.tap, &n.mac))
                .collect(),
            vsock: Some(Vsock {
                guest_cid: cid,
                uds_path: vsock_socket(&spec.dir),
            }),
        })
    }

    /// Start Firecracker for `spec`: configured and booted, or, for a
    /// restore (`spec.incoming`), with its logger and metrics only, waiting
    /// for [`load_snapshot`].
    pub async fn launch(&self, spec: &LaunchSpec) -> Result<Handles, VmmError> {
        let config = self.config(spec)?;
        let _ = std::fs::remove_file(vsock_socket(&spec.dir));
        // Firecracker opens its log and metrics files; it does not create them.
        for f in [log_file(&spec.dir), metrics_file(&spec.dir)] {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&f)?;
        }
        // Firecracker writes the guest's serial console to its stdout.
        let locks = DiskLocks::take(&spec.disks)?;
        let mut spawn_cfg = SpawnConfig::new(
            &self.bin,
            api_socket(&spec.dir),
            format!("banger-{}", spec.id),
            spec.console_log(),
        );
        spawn_cfg.inherit_fds = locks.fds();
        spawn_cfg.current_dir = Some(spec.dir.clone());
        let spawned = spawn(&spawn_cfg).await;
        drop(locks);
        let mut process = spawned.map_err(VmmError::FirecrackerSpawn)?;
        let pid = process.pid();
        let configured = if spec.incoming {
            configure_logging(&process.client(), &config).await
        } else {
            configure_and_start(&process.client(), &config)
                .await
                .map(|_| ())
                .map_err(|e| VmmError::FirecrackerConfig(Box::new(e)))
        };
        if let Err(e) = configured {
            let _ = process.kill().await;
            return Err(e);
        }
        let ticks = start_ticks(pid).ok_or_else(|| VmmError::Launch {
            what: "Firecracker exited right after starting",
            message: format!("pid {pid}"),
        })?;
        info!(pid, "firecracker started");
        Ok(Handles {
            vmm: Vmm::Firecracker,
            pid,
            pid_start_ticks: ticks,
            control_socket: api_socket(&spec.dir),
            agent: AgentEndpoint::HybridVsock {
                uds: vsock_socket(&spec.dir),
                port: AGENT_VSOCK_PORT,
            },
            tap: spec.net.as_ref().map(|n| n.tap.clone()),
            console_log: spec.console_log(),
            paused: false,
        })
    }
}

/// The logger and metrics, all a process that is to load a snapshot may
/// be given first.
async fn configure_logging(client: &FirecrackerClient, config: &VmConfig) -> Result<(), VmmError> {
    if let Some(logger) = &config.logger {
        client
            .put_logger(logger)
            .await
            .map_err(VmmError::FirecrackerApi)?;
    }
    if let Some(metrics) = &config.metrics {
        client
            .put_metrics(metrics)
            .await
            .map_err(VmmError::FirecrackerApi)?;
    }
    Ok(())
}

/// `firecracker --version`'s first line (`Firecracker v1.10.1`): a
/// snapshot loads only in the version that wrote it.
pub async fn version(bin: &Path) -> Result<String, VmmError> {
    crate::version_line(bin, "Firecracker").await
}

/// A full snapshot of a paused VM: its state to `state`, its guest memory
/// to `memory`.
pub async fn create_snapshot(
    h: &Handles,
    state: &Path,
    memory: &Path,
    timeout: Duration,
) -> Result<(), VmmError> {
    FirecrackerClient::new(&h.control_socket)
        .with_timeout(timeout)
        .create_snapshot(&SnapshotCreateParams {
            mem_file_path: memory.to_owned(),
            snapshot_path: state.to_owned(),
            snapshot_type: Some(SnapshotType::Full),
        })
        .await
        .map_err(VmmError::FirecrackerApi)
}

/// Load a snapshot into a process [`Firecracker::launch`]ed for a restore,
/// and run it: the guest memory maps `memory` privately (copy-on-write),
/// the interface uses this VM's tap and the vsock device its socket.
pub async fn load_snapshot(
    h: &Handles,
    state: &Path,
    memory: &Path,
    timeout: Duration,
) -> Result<(), VmmError> {
    let AgentEndpoint::HybridVsock { uds, .. } = &h.agent else {
        return Err(VmmError::Launch {
            what: "no vsock socket",
            message: "a Firecracker VM's agent rides hybrid vsock".into(),
        });
    };
    FirecrackerClient::new(&h.control_socket)
        .with_timeout(timeout)
        .load_snapshot(&SnapshotLoadParams {
            snapshot_path: state.to_owned(),
            mem_backend: MemoryBackend {
                backend_type: MemoryBackendType::File,
                backend_path: memory.to_owned(),
            },
            resume_vm: Some(true),
            network_overrides: h
                .tap
                .iter()
                .map(|tap| NetworkOverride {
                    iface_id: IFACE_ID.into(),
                    host_dev_name: tap.clone(),
                })
                .collect(),
            vsock_override: Some(VsockOverride {
                uds_path: uds.clone(),
            }),
        })
        .await
        .map_err(VmmError::FirecrackerApi)
}

/// Ctrl-Alt-Del (the guest powers off and Firecracker exits), then SIGKILL.
pub async fn stop(h: &Handles, timeout: Duration) -> Result<(), VmmError> {
    if !is_alive(h) {
        // Exited, or still exiting: gone only when its last thread is.
        wait_dead(h, Duration::from_secs(5)).await;
        return Ok(());
    }
    if let Err(e) = FirecrackerClient::new(&h.control_socket)
        .send_ctrl_alt_del()
        .await
    {
        warn!(error = %e, "SendCtrlAltDel failed; killing Firecracker");
    } else if wait_dead(h, timeout).await {
        return Ok(());
    }
    kill(h);
    wait_dead(h, Duration::from_secs(5)).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DiskSpec, NetSpec};
    use banger_host::Accel;

    fn spec() -> LaunchSpec {
        LaunchSpec {
            id: "abc".into(),
            name: "fc".into(),
            dir: "/s/vms/abc".into(),
            vcpus: 2,
            memory_mib: 256,
            accel: Accel::Kvm,
            kernel: "/img/vmlinux".into(),
            initrd: Some("/img/initrd.img".into()),
            cmdline: "console=ttyS0".into(),
            disks: vec![
                DiskSpec {
                    path: "/s/vms/abc/root.ext4".into(),
                    format: DiskFormat::Raw,
                    read_only: false,
                },
                DiskSpec {
                    path: "/s/vms/abc/work.ext4".into(),
                    format: DiskFormat::Raw,
                    read_only: false,
                },
            ],
            net: Some(NetSpec {
                tap: "bg-t1".into(),
                mac: "02:00:00:00:00:01".into(),
            }),
            vsock_cid: Some(3),
            incoming: false,
            memory: crate::GuestMemory::Shared,
        }
    }

    #[test]
    fn config_maps_the_spec() {
        let fc = Firecracker {
            bin: "firecracker".into(),
        };
        let c = fc.config(&spec()).unwrap();
        assert_eq!(c.drives.len(), 2);
        assert!(c.drives[0].is_root_device && !c.drives[1].is_root_device);
        assert_eq!(c.drives[0].drive_id, "root");
        assert_eq!(c.drives[1].drive_id, "disk1");
        // Relative to the VM dir Firecracker runs in (a snapshot records them).
        assert_eq!(c.drives[0].path_on_host, Some(PathBuf::from("root.ext4")));
        assert_eq!(c.network_interfaces[0].host_dev_name, "bg-t1");
        let v = c.vsock.unwrap();
        assert_eq!(v.guest_cid, 3);
        assert_eq!(v.uds_path, PathBuf::from("/s/vms/abc/vsock.sock"));
        assert_eq!(
            c.boot_source.boot_args.as_deref(),
            Some("console=ttyS0 banger.channel=vsock banger.halt=reboot reboot=k pci=off")
        );
        assert_eq!(
            c.logger.unwrap().log_path,
            Some(PathBuf::from("/s/vms/abc/firecracker.log"))
        );
        assert_eq!(
            c.metrics.unwrap().metrics_path,
            PathBuf::from("/s/vms/abc/firecracker-metrics.json")
        );
    }

    #[test]
    fn qcow2_and_missing_cid_are_refused() {
        let fc = Firecracker {
            bin: "firecracker".into(),
        };
        let mut s = spec();
        s.disks[0].format = DiskFormat::Qcow2;
        assert!(fc.config(&s).is_err());
        let mut s = spec();
        s.vsock_cid = None;
        assert!(fc.config(&s).is_err());
    }
}
