use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::Vmm;

/// How the daemon reaches the guest agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum AgentEndpoint {
    /// QEMU virtio-serial port backed by a Unix socket that QEMU listens on.
    Serial { socket: PathBuf },
    /// Firecracker hybrid vsock: connect to `uds`, write `CONNECT <port>`.
    HybridVsock { uds: PathBuf, port: u32 },
    /// The kernel's vsock to a QEMU guest with a vhost-vsock device.
    Vsock { cid: u32, port: u32 },
}

/// What is true about a running VM right now. Written to `handles.json`
/// before the VM is reported running; read back at daemon start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Handles {
    pub vmm: Vmm,
    pub pid: u32,
    /// Start time of `pid` in clock ticks since boot (/proc/PID/stat field
    /// 22): tells our VMM apart from a later process that reused the pid.
    pub pid_start_ticks: u64,
    /// QMP socket (QEMU) or API socket (Firecracker).
    pub control_socket: PathBuf,
    pub agent: AgentEndpoint,
    pub tap: Option<String>,
    pub console_log: PathBuf,
    /// The guest's vCPUs are paused (`vm pause`); its VMM runs on.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub paused: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum HandlesError {
    #[error("cannot write {}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} is corrupt: {message}", path.display())]
    Corrupt { path: PathBuf, message: String },
}

pub const HANDLES_FILE: &str = "handles.json";

impl Handles {
    /// Write atomically (temp file + rename) so a crash never leaves half a file.
    pub fn save(&self, vm_dir: &Path) -> Result<(), HandlesError> {
        let path = vm_dir.join(HANDLES_FILE);
        let tmp = vm_dir.join(".handles.json.tmp");
        let write = || -> std::io::Result<()> {
            let data = serde_json::to_vec_pretty(self).expect("handles serialise");
            std::fs::write(&tmp, data)?;
            std::fs::File::open(&tmp)?.sync_all()?;
            std::fs::rename(&tmp, &path)
        };
        write().map_err(|source| HandlesError::Write { path, source })
    }

    /// `Ok(None)` when there is no handles file (the VM never got running).
    pub fn load(vm_dir: &Path) -> Result<Option<Handles>, HandlesError> {
        let path = vm_dir.join(HANDLES_FILE);
        match std::fs::read(&path) {
            Ok(data) => {
                serde_json::from_slice(&data)
                    .map(Some)
                    .map_err(|e| HandlesError::Corrupt {
                        path,
                        message: e.to_string(),
                    })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(HandlesError::Read { path, source }),
        }
    }

    pub fn remove(vm_dir: &Path) {
        let _ = std::fs::remove_file(vm_dir.join(HANDLES_FILE));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_load_round_trip_and_missing_is_none() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(Handles::load(dir.path()).unwrap(), None);
        let h = Handles {
            vmm: Vmm::Qemu,
            pid: 42,
            pid_start_ticks: 7,
            control_socket: dir.path().join("qmp.sock"),
            agent: AgentEndpoint::Serial {
                socket: dir.path().join("agent.sock"),
            },
            tap: Some("bg-t1".into()),
            console_log: dir.path().join("console.log"),
            paused: false,
        };
        h.save(dir.path()).unwrap();
        assert_eq!(Handles::load(dir.path()).unwrap(), Some(h.clone()));
        // Every agent endpoint survives the file (what reconcile reads back).
        let vsock = Handles {
            agent: AgentEndpoint::Vsock { cid: 9, port: 1024 },
            ..h
        };
        vsock.save(dir.path()).unwrap();
        let text = std::fs::read_to_string(dir.path().join(HANDLES_FILE)).unwrap();
        assert!(text.contains(r#""kind": "vsock""#), "{text}");
        assert_eq!(Handles::load(dir.path()).unwrap(), Some(vsock));
        std::fs::write(dir.path().join(HANDLES_FILE), "{").unwrap();
        assert!(matches!(
            Handles::load(dir.path()),
            Err(HandlesError::Corrupt { .. })
        ));
    }
}
