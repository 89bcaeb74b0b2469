//! Process identity from /proc, and the liveness check built on it.

use std::path::Path;

use crate::Handles;

/// What identifies one process across pid reuse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessIdentity {
    pub start_ticks: u64,
    pub zombie: bool,
    pub cmdline: Vec<String>,
}

/// Read `/proc/PID/stat` and `/proc/PID/cmdline`; `None` if there is no such process.
pub fn process_identity(pid: u32) -> Option<ProcessIdentity> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parens: split after the last ')'.
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); field 22 (starttime) is index 19.
    let zombie = matches!(fields.first(), Some(&"Z") | Some(&"X"));
    let start_ticks = fields.get(19)?.parse().ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let cmdline = cmdline
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    Some(ProcessIdentity {
        start_ticks,
        zombie,
        cmdline,
    })
}

/// Is this VM alive? True only when the recorded pid exists, is not a
/// zombie, started at the recorded time, and its command line names the
/// VM's control socket — i.e. it is *our* VMM for *this* VM.
pub fn is_alive(h: &Handles) -> bool {
    matches_identity(process_identity(h.pid).as_ref(), h)
}

fn matches_identity(id: Option<&ProcessIdentity>, h: &Handles) -> bool {
    let Some(id) = id else { return false };
    let socket = h.control_socket.to_string_lossy();
    !id.zombie
        && id.start_ticks == h.pid_start_ticks
        && id.cmdline.iter().any(|a| a.contains(socket.as_ref()))
}

/// Has the VMM of `h` let go of everything it held (its disk locks)?
/// True once the pid is gone or another process's, or is a zombie whose
/// threads have all exited. [`is_alive`] is not enough: a multi-threaded
/// VMM's leader turns zombie while its other threads are still exiting,
/// and until the last one has, the descriptors they share stay open — a
/// new VMM on the same disks would find them locked.
pub fn has_exited(h: &Handles) -> bool {
    match process_identity(h.pid) {
        None => true,
        Some(id) if id.start_ticks != h.pid_start_ticks => true,
        Some(id) => {
            id.zombie
                && std::fs::read_dir(format!("/proc/{}/task", h.pid)).map_or(0, |d| d.count()) <= 1
        }
    }
}

/// The pid's start time, for recording in [`Handles`].
pub fn start_ticks(pid: u32) -> Option<u64> {
    process_identity(pid).map(|i| i.start_ticks)
}

/// SIGKILL a VMM process; with its process group when it leads one (as
/// banger starts Firecracker, and QEMU's `-daemonize` makes itself), so that
/// what it started (a stand-in's guest agent) goes with it.
pub(crate) fn kill_vmm(pid: u32) {
    let Some(p) = rustix::process::Pid::from_raw(pid as i32) else {
        return;
    };
    let leads_group = rustix::process::getpgid(Some(p)).is_ok_and(|g| g == p);
    let _ = if leads_group {
        rustix::process::kill_process_group(p, rustix::process::Signal::KILL)
    } else {
        rustix::process::kill_process(p, rustix::process::Signal::KILL)
    };
}

/// Every pid in /proc.
pub fn pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Whether a path is an existing Unix socket.
pub fn is_socket(p: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(p)
        .map(|m| m.file_type().is_socket())
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{AgentEndpoint, Vmm};

    fn handles(pid: u32, ticks: u64, sock: &str) -> Handles {
        Handles {
            vmm: Vmm::Qemu,
            pid,
            pid_start_ticks: ticks,
            control_socket: sock.into(),
            agent: AgentEndpoint::Serial {
                socket: "/x/agent.sock".into(),
            },
            tap: None,
            console_log: "/x/console.log".into(),
            paused: false,
        }
    }

    #[test]
    fn reads_a_live_process_and_orders_start_times() {
        let me = process_identity(std::process::id()).unwrap();
        assert!(!me.zombie);
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        // Until the child has exec'd, /proc shows an empty or the parent's command line.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let kid = loop {
            let kid = process_identity(child.id()).unwrap();
            if kid.cmdline.first().map(String::as_str) == Some("sleep")
                || std::time::Instant::now() > deadline
            {
                break kid;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        };
        assert_eq!(kid.cmdline, vec!["sleep".to_string(), "5".to_string()]);
        assert!(
            kid.start_ticks >= me.start_ticks,
            "a child starts after its parent"
        );
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(
            process_identity(child.id()).is_none(),
            "reaped child is gone"
        );
    }

    #[test]
    fn identity_must_match_pid_time_and_socket() {
        let id = ProcessIdentity {
            start_ticks: 100,
            zombie: false,
            cmdline: vec![
                "qemu".into(),
                "-qmp".into(),
                "unix:/vms/a/qmp.sock,server=on".into(),
            ],
        };
        assert!(matches_identity(
            Some(&id),
            &handles(1, 100, "/vms/a/qmp.sock")
        ));
        assert!(
            !matches_identity(Some(&id), &handles(1, 101, "/vms/a/qmp.sock")),
            "pid reused later"
        );
        assert!(
            !matches_identity(Some(&id), &handles(1, 100, "/vms/b/qmp.sock")),
            "another VM's VMM"
        );
        assert!(
            !matches_identity(None, &handles(1, 100, "/vms/a/qmp.sock")),
            "no such pid"
        );
        let zombie = ProcessIdentity { zombie: true, ..id };
        assert!(
            !matches_identity(Some(&zombie), &handles(1, 100, "/vms/a/qmp.sock")),
            "exited, not reaped"
        );
    }

    /// A process whose main thread exits first, another thread keeping
    /// its descriptors for `hold_ms`: built from C (the `cc` Rust links
    /// with), since neither Rust's test harness nor a shell can end the
    /// leader thread alone.
    fn leader_exits_first(dir: &Path, hold_ms: u32) -> std::process::Child {
        let src = dir.join("leader.c");
        std::fs::write(
            &src,
            format!(
                "#include <pthread.h>\n#include <unistd.h>\n\
                 static void *hold(void *a) {{ (void)a; usleep({hold_ms} * 1000); return 0; }}\n\
                 int main(void) {{ pthread_t t; pthread_create(&t, 0, hold, 0); pthread_exit(0); }}\n"
            ),
        )
        .unwrap();
        let bin = dir.join("leader");
        let built = std::process::Command::new("cc")
            .args(["-pthread", "-o"])
            .arg(&bin)
            .arg(&src)
            .status()
            .unwrap();
        assert!(built.success());
        std::process::Command::new(bin).spawn().unwrap()
    }

    #[test]
    fn a_vmm_has_not_exited_while_a_thread_outlives_its_leader() {
        let dir = tempfile::tempdir().unwrap();
        let mut child = leader_exits_first(dir.path(), 1500);
        let pid = child.id();
        let ticks = start_ticks(pid).unwrap();
        let h = handles(pid, ticks, "/vms/a/qmp.sock");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !process_identity(pid).unwrap().zombie {
            assert!(
                std::time::Instant::now() < deadline,
                "the leader never exited"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(!is_alive(&h), "a zombie leader is not a live VMM");
        assert!(
            !has_exited(&h),
            "its other thread still holds its descriptors"
        );
        child.wait().unwrap();
        assert!(has_exited(&h));
    }

    #[test]
    fn a_dead_pid_is_not_alive() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        assert!(!is_alive(&handles(pid, 0, "/nonexistent.sock")));
    }
}
