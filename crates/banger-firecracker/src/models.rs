//! Request and response bodies of the Firecracker API, written by hand from
//! Firecracker's OpenAPI description (`firecracker-api.yaml`, v1.17.0-dev).
//!
//! Field names are the spec's. Optional fields are `Option`s that are left
//! out of the JSON when `None`, so a body carries exactly what the caller set.
//! Request types refuse unknown fields when read back, like Firecracker's own
//! config types; response types ([`InstanceInfo`], [`Fault`]) ignore them so
//! a newer Firecracker that adds fields still parses.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// `BootSource`: the guest kernel (on x86_64 an uncompressed ELF `vmlinux`),
/// an optional initrd and the kernel command line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    pub kernel_image_path: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
}

/// `Drive.cache_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CacheType {
    Unsafe,
    Writeback,
}

/// `Drive.io_engine`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum IoEngine {
    Sync,
    Async,
}

/// `TokenBucket` (all three are `int64` with `minimum: 0` in the spec).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenBucket {
    pub size: u64,
    pub refill_time: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub one_time_burst: Option<u64>,
}

/// `RateLimiter`: bytes/s (`bandwidth`) and ops/s (`ops`) buckets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimiter {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<TokenBucket>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ops: Option<TokenBucket>,
}

/// `Drive`: a virtio-block device (`path_on_host`) or a vhost-user-block
/// one (`socket`).
///
/// Firecracker accepts only ASCII alphanumerics and `_` in `drive_id` (the
/// id is also the path segment of `PUT /drives/{drive_id}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Drive {
    pub drive_id: String,
    pub is_root_device: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partuuid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_type: Option<CacheType>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub is_read_only: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_on_host: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiter>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_engine: Option<IoEngine>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<PathBuf>,
}

impl Drive {
    /// A virtio-block drive backed by a host file.
    pub fn virtio_block(
        drive_id: impl Into<String>,
        path_on_host: impl Into<PathBuf>,
        is_root_device: bool,
        is_read_only: bool,
    ) -> Self {
        Self {
            drive_id: drive_id.into(),
            is_root_device,
            partuuid: None,
            cache_type: None,
            is_read_only: Some(is_read_only),
            path_on_host: Some(path_on_host.into()),
            rate_limiter: None,
            io_engine: None,
            socket: None,
        }
    }
}

/// `NetworkInterface`: a virtio-net device backed by a host tap device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterface {
    pub iface_id: String,
    pub host_dev_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<String>,
    /// 68..=65535 per the spec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimiter>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimiter>,
}

impl NetworkInterface {
    /// A tap-backed interface with a fixed guest MAC (`aa:bb:cc:dd:ee:ff`).
    pub fn tap(
        iface_id: impl Into<String>,
        host_dev_name: impl Into<String>,
        guest_mac: impl Into<String>,
    ) -> Self {
        Self {
            iface_id: iface_id.into(),
            host_dev_name: host_dev_name.into(),
            guest_mac: Some(guest_mac.into()),
            mtu: None,
            rx_rate_limiter: None,
            tx_rate_limiter: None,
        }
    }
}

/// `CpuTemplate` (deprecated by Firecracker, still in the spec).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CpuTemplate {
    C3,
    T2,
    T2S,
    T2CL,
    T2A,
    V1N1,
    None,
}

/// `MachineConfiguration.huge_pages`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum HugePages {
    None,
    Transparent,
    #[serde(rename = "2M")]
    Hugetlbfs2M,
}

/// `MachineConfiguration`. `vcpu_count` is 1..=32 (1 or even with SMT).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfiguration {
    pub vcpu_count: u32,
    pub mem_size_mib: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smt: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub track_dirty_pages: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<CpuTemplate>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub huge_pages: Option<HugePages>,
}

impl MachineConfiguration {
    pub fn new(vcpu_count: u32, mem_size_mib: u64) -> Self {
        Self {
            vcpu_count,
            mem_size_mib,
            smt: None,
            track_dirty_pages: None,
            cpu_template: None,
            huge_pages: None,
        }
    }
}

/// `Vsock`: a hybrid vsock device whose host side is the Unix socket
/// `uds_path` (see [`crate::connect_vsock`]). `guest_cid` is at least 3.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vsock {
    pub guest_cid: u32,
    pub uds_path: PathBuf,
}

/// `Logger.level`. The spec says Firecracker compares it case-insensitively;
/// banger always sends the spelling of the spec's enum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LogLevel {
    Error,
    Warning,
    Info,
    Debug,
    Trace,
    Off,
}

/// `Logger`: every field is optional in the spec.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Logger {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_path: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<LogLevel>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_level: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_log_origin: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
}

/// `Metrics`: where Firecracker flushes JSON metrics lines.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    pub metrics_path: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub emit_id: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub properties: Option<BTreeMap<String, String>>,
}

/// `InstanceActionInfo.action_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ActionType {
    FlushMetrics,
    InstanceStart,
    SendCtrlAltDel,
}

/// `InstanceActionInfo`: the body of `PUT /actions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceActionInfo {
    pub action_type: ActionType,
}

/// `Vm.state`: what `PATCH /vm` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmState {
    Paused,
    Resumed,
}

/// `Vm`: the body of `PATCH /vm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vm {
    pub state: VmState,
}

/// `InstanceInfo.state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum InstanceState {
    #[serde(rename = "Not started")]
    NotStarted,
    Running,
    Paused,
}

/// `InstanceInfo`: the answer to `GET /`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceInfo {
    pub app_name: String,
    pub id: String,
    pub state: InstanceState,
    pub vmm_version: String,
}

/// `Error`: the body of every non-2xx answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fault {
    #[serde(default)]
    pub fault_message: Option<String>,
}

/// `SnapshotCreateParams.snapshot_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotType {
    Full,
    Diff,
}

/// `SnapshotCreateParams`: the body of `PUT /snapshot/create`, sent to a
/// paused microVM. Firecracker writes the microVM's state to
/// `snapshot_path` and its guest memory to `mem_file_path`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreateParams {
    pub mem_file_path: PathBuf,
    pub snapshot_path: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_type: Option<SnapshotType>,
}

/// `MemoryBackend.backend_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemoryBackendType {
    /// The guest memory is the file, mapped private (copy-on-write).
    File,
    /// Page faults are served by a process listening on a Unix socket.
    Uffd,
}

/// `MemoryBackend`: where a loaded snapshot's guest memory comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryBackend {
    pub backend_type: MemoryBackendType,
    pub backend_path: PathBuf,
}

/// `NetworkOverride`: the tap a restored interface uses instead of the
/// snapshot's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkOverride {
    pub iface_id: String,
    pub host_dev_name: String,
}

/// `VsockOverride`: the Unix socket a restored vsock device binds instead
/// of the snapshot's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockOverride {
    pub uds_path: PathBuf,
}

/// `SnapshotLoadParams`: the body of `PUT /snapshot/load`, accepted only by
/// a fresh process (nothing configured but the logger and metrics). Of the
/// spec's two ways to name the memory, banger sends `mem_backend` (the
/// other, `mem_file_path`, is deprecated). Drives are reopened at the paths
/// the snapshot recorded: relative ones resolve against the process's
/// working directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotLoadParams {
    pub snapshot_path: PathBuf,
    pub mem_backend: MemoryBackend,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume_vm: Option<bool>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub network_overrides: Vec<NetworkOverride>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_override: Option<VsockOverride>,
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn optional_fields_are_omitted() {
        let boot = BootSource {
            kernel_image_path: "/k/vmlinux".into(),
            initrd_path: None,
            boot_args: Some("console=ttyS0".into()),
        };
        assert_eq!(
            serde_json::to_value(&boot).unwrap(),
            json!({"kernel_image_path": "/k/vmlinux", "boot_args": "console=ttyS0"})
        );
        assert_eq!(serde_json::to_value(Logger::default()).unwrap(), json!({}));
    }

    #[test]
    fn enums_use_the_spec_spelling() {
        let mut m = MachineConfiguration::new(2, 512);
        m.huge_pages = Some(HugePages::Hugetlbfs2M);
        m.cpu_template = Some(CpuTemplate::None);
        assert_eq!(
            serde_json::to_value(&m).unwrap(),
            json!({"vcpu_count": 2, "mem_size_mib": 512, "huge_pages": "2M", "cpu_template": "None"})
        );
        let info: InstanceInfo = serde_json::from_value(json!({
            "app_name": "Firecracker", "id": "vm1", "state": "Not started",
            "vmm_version": "1.17.0", "added_later": true
        }))
        .unwrap();
        assert_eq!(info.state, InstanceState::NotStarted);
        assert_eq!(
            serde_json::to_value(InstanceActionInfo {
                action_type: ActionType::SendCtrlAltDel
            })
            .unwrap(),
            json!({"action_type": "SendCtrlAltDel"})
        );
    }

    #[test]
    fn request_types_refuse_unknown_fields() {
        let err = serde_json::from_value::<Vsock>(
            json!({"guest_cid": 3, "uds_path": "/v", "vsock_id": "x"}),
        )
        .unwrap_err();
        assert!(err.to_string().contains("vsock_id"), "{err}");
    }

    #[test]
    fn snapshot_bodies_carry_what_was_set() {
        let load = SnapshotLoadParams {
            snapshot_path: "state.bin".into(),
            mem_backend: MemoryBackend {
                backend_type: MemoryBackendType::File,
                backend_path: "/s/memory.ram".into(),
            },
            resume_vm: Some(true),
            network_overrides: vec![NetworkOverride {
                iface_id: "eth0".into(),
                host_dev_name: "bg-t2".into(),
            }],
            vsock_override: None,
        };
        assert_eq!(
            serde_json::to_value(&load).unwrap(),
            json!({"snapshot_path": "state.bin",
                   "mem_backend": {"backend_type": "File", "backend_path": "/s/memory.ram"},
                   "resume_vm": true,
                   "network_overrides": [{"iface_id": "eth0", "host_dev_name": "bg-t2"}]})
        );
        let create = SnapshotCreateParams {
            mem_file_path: "m".into(),
            snapshot_path: "s".into(),
            snapshot_type: Some(SnapshotType::Full),
        };
        assert_eq!(
            serde_json::to_value(&create).unwrap(),
            json!({"mem_file_path": "m", "snapshot_path": "s", "snapshot_type": "Full"})
        );
    }

    #[test]
    fn drive_helper_builds_a_virtio_block_body() {
        let d = Drive::virtio_block("rootfs", "/img/rootfs.ext4", true, false);
        assert_eq!(
            serde_json::to_value(&d).unwrap(),
            json!({"drive_id": "rootfs", "is_root_device": true, "is_read_only": false,
                   "path_on_host": "/img/rootfs.ext4"})
        );
    }
}
