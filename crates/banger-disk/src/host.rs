//! The privileged operations behind the `disk.*` methods, behind a trait so
//! that the checking, ordering and rollback around them
//! ([`crate::service`]) are tested without root against
//! [`crate::recording::RecordingHostDisk`]. The real implementation is
//! [`crate::linux::LinuxHostDisk`].

use std::fs::File;
use std::future::Future;
use std::path::{Path, PathBuf};

/// An attached loop device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoopDevice {
    /// `/dev/loopN`.
    pub device: String,
    /// The file behind it, as the kernel names it: the path it had when
    /// it was attached, which may name another file now.
    pub backing_file: PathBuf,
    /// The file behind it, by identity (`None` where the kernel did not
    /// say).
    pub backing_id: Option<FileId>,
}

/// A file by identity: its filesystem's device and its inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileId {
    pub major: u32,
    pub minor: u32,
    pub ino: u64,
}

impl FileId {
    pub fn of(meta: &std::fs::Metadata) -> FileId {
        use std::os::unix::fs::MetadataExt;
        FileId {
            major: rustix::fs::major(meta.dev()),
            minor: rustix::fs::minor(meta.dev()),
            ino: meta.ino(),
        }
    }
}

/// A device-mapper device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DmDevice {
    pub name: String,
    /// The block devices it is built on, e.g. `/dev/loop3`.
    pub slaves: Vec<String>,
}

pub use banger_host::HostError;

/// Privileged disk primitives. Each does exactly one thing; checking,
/// ordering and rollback live in [`crate::service::DiskService`].
pub trait HostDisk: Send + Sync + 'static {
    /// `None` when device-mapper snapshots can be made here; else why not
    /// (and how to fix it).
    fn unavailable(&self) -> Option<String>;
    /// Attach the already opened and checked `file` (found at `path`) to a
    /// free loop device; returns `/dev/loopN`.
    fn loop_attach(
        &self,
        file: &File,
        path: &Path,
        read_only: bool,
    ) -> impl Future<Output = Result<String, HostError>> + Send;
    fn loop_detach(&self, device: &str) -> impl Future<Output = Result<(), HostError>> + Send;
    /// Every attached loop device.
    fn loops(&self) -> impl Future<Output = Result<Vec<LoopDevice>, HostError>> + Send;
    /// Create dm device `name` with one-line `table`, and its
    /// `/dev/mapper/<name>` node.
    fn dm_create(
        &self,
        name: &str,
        table: &str,
    ) -> impl Future<Output = Result<(), HostError>> + Send;
    fn dm_remove(&self, name: &str) -> impl Future<Output = Result<(), HostError>> + Send;
    /// Every dm device.
    fn dm_devices(&self) -> impl Future<Output = Result<Vec<DmDevice>, HostError>> + Send;
    /// Give `/dev/mapper/<name>` (the node it points to) to `uid`; returns
    /// that path.
    fn dm_chown(
        &self,
        name: &str,
        uid: u32,
    ) -> impl Future<Output = Result<String, HostError>> + Send;
}
