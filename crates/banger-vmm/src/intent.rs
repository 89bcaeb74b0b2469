//! The launch intent (`launch.json`): what a VMM start is about to make,
//! written before the VMM process exists. A daemon killed after the VMM
//! started and before [`Handles`](crate::Handles) were written leaves a VMM
//! that no handles.json names; the next daemon reads the intent, finds the
//! VMM by the control socket banger put in its command line, ends it, and
//! frees the tap it was given.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::proc::process_identity;
use crate::{HandlesError, Vmm};

pub const INTENT_FILE: &str = "launch.json";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LaunchIntent {
    pub vmm: Vmm,
    /// The control socket the VMM is given on its command line (QEMU
    /// `-qmp unix:SOCK,…`, Firecracker `--api-sock SOCK`): unique to the VM
    /// dir, it identifies the VMM process.
    pub control_socket: PathBuf,
    /// The TAP the VMM is given.
    pub tap: Option<String>,
}

impl LaunchIntent {
    /// Write durably (temp file + fsync + rename) before the VMM starts.
    pub fn save(&self, vm_dir: &Path) -> Result<(), HandlesError> {
        let path = vm_dir.join(INTENT_FILE);
        let tmp = vm_dir.join(".launch.json.tmp");
        let write = || -> std::io::Result<()> {
            std::fs::write(&tmp, serde_json::to_vec_pretty(self).expect("serialises"))?;
            std::fs::File::open(&tmp)?.sync_all()?;
            std::fs::rename(&tmp, &path)
        };
        write().map_err(|source| HandlesError::Write { path, source })
    }

    /// The intent of a start that never recorded its handles, if any.
    pub fn load(vm_dir: &Path) -> Option<LaunchIntent> {
        let data = std::fs::read(vm_dir.join(INTENT_FILE)).ok()?;
        serde_json::from_slice(&data).ok()
    }

    pub fn exists(vm_dir: &Path) -> bool {
        vm_dir.join(INTENT_FILE).exists()
    }

    pub fn remove(vm_dir: &Path) {
        let _ = std::fs::remove_file(vm_dir.join(INTENT_FILE));
    }

    /// Whether `cmdline` is this launch's VMM (or the wrapper about to exec
    /// it): the exact argument banger gives the VMM for its control socket.
    pub fn matches(&self, cmdline: &[String]) -> bool {
        let sock = self.control_socket.to_string_lossy();
        match self.vmm {
            Vmm::Qemu => {
                let qmp = crate::qemu::qmp_arg(&self.control_socket);
                cmdline.windows(2).any(|w| w[0] == "-qmp" && w[1] == qmp)
            }
            Vmm::Firecracker => cmdline
                .windows(2)
                .any(|w| w[0] == "--api-sock" && w[1] == sock.as_ref()),
        }
    }

    /// SIGKILL every live process that is this launch's VMM and wait (up to
    /// `wait`) until they are gone; the pids found.
    pub async fn end_vmm(&self, wait: Duration) -> Vec<u32> {
        let found: Vec<(u32, u64)> = crate::proc::pids()
            .into_iter()
            .filter_map(|pid| {
                let id = process_identity(pid)?;
                (!id.zombie && self.matches(&id.cmdline)).then_some((pid, id.start_ticks))
            })
            .collect();
        let still_there = |(pid, ticks): &(u32, u64)| {
            process_identity(*pid).is_some_and(|id| !id.zombie && id.start_ticks == *ticks)
        };
        for f in found.iter().filter(|f| still_there(f)) {
            crate::proc::kill_vmm(f.0);
        }
        let deadline = std::time::Instant::now() + wait;
        while found.iter().any(still_there) && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        found.into_iter().map(|(pid, _)| pid).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_vmm_is_known_by_its_exact_control_socket_argument() {
        let fc = LaunchIntent {
            vmm: Vmm::Firecracker,
            control_socket: "/s/vms/a/firecracker.sock".into(),
            tap: None,
        };
        assert!(fc.matches(&args(&[
            "firecracker",
            "--api-sock",
            "/s/vms/a/firecracker.sock",
            "--id",
            "banger-a"
        ])));
        // Another VM's, or the path merely mentioned: not this VMM.
        assert!(!fc.matches(&args(&[
            "firecracker",
            "--api-sock",
            "/s/vms/ab/firecracker.sock"
        ])));
        assert!(!fc.matches(&args(&["cat", "/s/vms/a/firecracker.sock"])));
        let q = LaunchIntent {
            vmm: Vmm::Qemu,
            control_socket: "/s/vms/a/qmp.sock".into(),
            tap: Some("bg-t1".into()),
        };
        assert!(q.matches(&args(&[
            "qemu-system-x86_64",
            "-qmp",
            "unix:/s/vms/a/qmp.sock,server=on,wait=off"
        ])));
        assert!(!q.matches(&args(&["socat", "-", "unix:/s/vms/a/qmp.sock"])));
    }

    #[tokio::test]
    async fn save_load_and_end_the_vmm_it_names() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(LaunchIntent::load(dir.path()), None);
        let sock = dir.path().join("firecracker.sock");
        let intent = LaunchIntent {
            vmm: Vmm::Firecracker,
            control_socket: sock.clone(),
            tap: Some("bg-t1".into()),
        };
        intent.save(dir.path()).unwrap();
        assert_eq!(LaunchIntent::load(dir.path()), Some(intent.clone()));
        // A stand-in VMM: any process with the VMM's arguments.
        let mut vmm = std::process::Command::new("sh")
            .args(["-c", "sleep 600", "--api-sock"])
            .arg(&sock)
            .spawn()
            .unwrap();
        let pid = vmm.id();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !process_identity(pid).is_some_and(|id| intent.matches(&id.cmdline)) {
            assert!(std::time::Instant::now() < deadline, "sh never ran");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(intent.end_vmm(Duration::from_secs(10)).await, vec![pid]);
        assert!(!vmm.wait().unwrap().success(), "killed");
        LaunchIntent::remove(dir.path());
        assert!(!LaunchIntent::exists(dir.path()));
    }
}
