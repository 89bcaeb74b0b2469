//! Typed records and the enums stored as text columns.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ToSql, ToSqlOutput, ValueRef};
use serde::{Deserialize, Serialize};

pub use banger_wire::{InitMode, Vmm};

/// Defines a fieldless enum stored as a text column: [`banger_wire::kind!`]
/// (`as_str`, `FromStr`, `Display`, serde, one spelling everywhere) and
/// rusqlite conversions.
macro_rules! text_enum {
    ($(#[$meta:meta])* $name:ident, $what:literal { $($(#[$vmeta:meta])* $variant:ident => $text:literal),+ $(,)? }) => {
        banger_wire::kind! {
            $(#[$meta])*
            $name, $what { $($(#[$vmeta])* $variant => $text),+ }
        }

        impl ToSql for $name {
            fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
                Ok(ToSqlOutput::from(self.as_str()))
            }
        }

        impl FromSql for $name {
            fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
                value.as_str()?.parse().map_err(|e| FromSqlError::Other(Box::new(e)))
            }
        }
    };
}

text_enum! {
    /// Lifecycle of an image.
    ImageState, "image state" {
        Building => "building",
        Ready => "ready",
        Failed => "failed",
    }
}

text_enum! {
    /// Where an image came from.
    SourceKind, "image source kind" {
        /// Built by banger from a named recipe.
        Recipe => "recipe",
        /// Converted from an OCI image.
        Oci => "oci",
        /// Copied in from files on the host.
        Import => "import",
        /// Registered in place: banger points at files it does not own.
        Register => "register",
    }
}

text_enum! {
    /// Desired lifecycle state of a VM.
    VmState, "VM state" {
        Creating => "creating",
        Running => "running",
        Stopped => "stopped",
        Failed => "failed",
        Deleting => "deleting",
    }
}

text_enum! {
    /// Transport protocol of a port forward.
    Proto, "protocol" {
        Tcp => "tcp",
        Udp => "udp",
    }
}

text_enum! {
    /// Kind of a long operation recorded in the journal. Not constrained in
    /// SQL, so adding a kind needs no migration.
    OpKind, "operation kind" {
        VmCreate => "vm_create",
        VmStart => "vm_start",
        VmStop => "vm_stop",
        VmDelete => "vm_delete",
        VmSnapshot => "vm_snapshot",
        VmFork => "vm_fork",
        ImageBuild => "image_build",
        ImagePull => "image_pull",
        ImageImport => "image_import",
        WorkspacePrepare => "workspace_prepare",
        WorkspaceExport => "workspace_export",
    }
}

/// An image: what it is made of and where its files are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Image {
    pub id: String,
    pub name: String,
    pub state: ImageState,
    pub source_kind: SourceKind,
    /// Recipe name, OCI reference or import path, depending on `source_kind`.
    pub source_ref: String,
    pub source_digest: Option<String>,
    pub dir: PathBuf,
    pub kernel_path: PathBuf,
    pub vmlinux_path: Option<PathBuf>,
    pub initrd_path: Option<PathBuf>,
    pub rootfs_path: PathBuf,
    pub work_seed_path: Option<PathBuf>,
    /// File name → sha256 (hex) of every file of the image.
    pub manifest: BTreeMap<String, String>,
    pub size_bytes: u64,
    pub default_init: InitMode,
    pub is_default: bool,
    pub last_error: Option<String>,
    /// Unix milliseconds.
    pub created_at: i64,
}

/// A VM as the user asked for it. Runtime facts (pids, tap devices, …) are
/// deliberately absent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vm {
    pub id: String,
    pub name: String,
    pub image_id: String,
    pub vmm: Vmm,
    pub init_mode: InitMode,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// Size of the work disk.
    pub disk_mib: u32,
    pub state: VmState,
    /// Leased guest address; unique across VMs.
    pub guest_ip: Option<Ipv4Addr>,
    /// Leased MAC address (stored lower-case); unique across VMs.
    pub mac: Option<String>,
    /// Leased vsock context id; unique across VMs.
    pub vsock_cid: Option<u32>,
    pub dns_name: Option<String>,
    pub vm_dir: PathBuf,
    pub api_socket: Option<PathBuf>,
    pub console_log: Option<PathBuf>,
    pub last_error: Option<String>,
    /// Unix milliseconds.
    pub created_at: i64,
    /// Unix milliseconds.
    pub last_used_at: Option<i64>,
    pub labels: BTreeMap<String, String>,
    /// Network policy: `none`, `nat`, `learn` or `allow=LIST` (banger-net's
    /// canonical form), carried out in the tap's guard.
    pub net_policy: String,
}

/// New sizes for a VM; `None` keeps the current value.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourceUpdate {
    pub vcpus: Option<u32>,
    pub memory_mib: Option<u32>,
    pub disk_mib: Option<u32>,
}

/// A host port forwarded to a guest port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortForward {
    pub vm_id: String,
    pub proto: Proto,
    pub bind_addr: IpAddr,
    pub host_port: u16,
    pub guest_port: u16,
}

/// A secret a VM may use: its name, the hosts the daemon's proxy puts its
/// value in for, and the VM's placeholder, which is all the guest sees.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSecret {
    pub name: String,
    pub hosts: Vec<String>,
    pub placeholder: String,
    /// Replaced in request bodies too, not only in headers.
    pub in_body: bool,
}

/// An operation in flight, as journaled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Operation {
    pub op_id: String,
    pub kind: OpKind,
    /// What the operation works on: a VM or image name, an image reference
    /// or an import path (a VM's id is not known before its create has run).
    pub subject_id: String,
    /// Last stage reached; its meaning is up to the operation's kind.
    pub stage: String,
    /// Unix milliseconds.
    pub started_at: i64,
    /// Unix milliseconds.
    pub updated_at: i64,
}

/// A snapshot's record: state `creating` until its files are whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotState {
    Creating,
    Ready,
}

impl SnapshotState {
    pub fn as_str(self) -> &'static str {
        match self {
            SnapshotState::Creating => "creating",
            SnapshotState::Ready => "ready",
        }
    }
}

/// Where a snapshot keeps its guest's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotMemory {
    /// Inside the state file (QEMU's migration stream carries the RAM), as
    /// QEMU's own RAM: taken before guest RAM lived in a memfd.
    State,
    /// Inside the state file, as the memory backend `ram0`: a snapshot of a
    /// restored VM, whose RAM is a private mapping of its snapshot's.
    Stream,
    /// In a file of its own, which restores map copy-on-write; the state
    /// file holds the devices only.
    File,
}

impl SnapshotMemory {
    pub fn as_str(self) -> &'static str {
        match self {
            SnapshotMemory::State => "state",
            SnapshotMemory::Stream => "stream",
            SnapshotMemory::File => "file",
        }
    }
}

/// A snapshot of a running VM: its memory and device state (`state.bin`)
/// and its disks, frozen in `dir`, with what a restore needs to rebuild the
/// VMM that made them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub id: String,
    pub name: String,
    pub source_vm_id: String,
    pub source_vm_name: String,
    pub image_id: String,
    pub vmm: Vmm,
    /// The VMM's version line when the snapshot was taken: a restore needs
    /// the same one.
    pub vmm_version: String,
    /// The accelerator the VM ran under (`kvm`, `tcg`; empty: not
    /// recorded), and under KVM the host CPU's identity: a restore needs
    /// the same.
    pub accel: String,
    pub cpu: String,
    pub init_mode: InitMode,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub disk_mib: u32,
    /// The frozen root disk is a qcow2 file (else raw).
    pub root_qcow2: bool,
    pub dir: PathBuf,
    /// SHA-256 (hex) of the state file, checked before each restore.
    pub state_sha256: String,
    pub memory: SnapshotMemory,
    /// With [`SnapshotMemory::File`]: the memory file's digest (SHA-256 of
    /// its pages that are not zero, with their offsets), checked before
    /// the first restore of each version of the file.
    pub memory_sha256: String,
    /// Bytes the snapshot's files take on disk.
    pub size_bytes: i64,
    pub state: SnapshotState,
    pub created_at: i64,
}
