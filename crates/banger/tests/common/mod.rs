//! A throwaway banger installation for integration tests: its own BANGER_HOME,
//! the real `banger`, `bangerd` and `banger-helper` binaries, and a Drop that
//! stops whatever the test started.
#![allow(dead_code)] // each test binary uses a different part of this module

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

pub struct TestHome {
    /// Taken on drop: kept (not deleted) when the test failed, for its logs.
    dir: Option<tempfile::TempDir>,
    /// Network namespace everything runs in (daemon, helper, bridge, VMs).
    pub netns: Option<String>,
}

impl TestHome {
    pub fn new() -> TestHome {
        let bin = Path::new(env!("CARGO_BIN_EXE_banger"));
        for sibling in ["bangerd", "banger-helper"] {
            assert!(
                bin.with_file_name(sibling).is_file(),
                "{sibling} is not built next to {}: run `cargo build --workspace` (or `cargo test --workspace`)",
                bin.display()
            );
        }
        // Short paths: Unix socket addresses are limited to 107 bytes.
        let dir = tempfile::Builder::new()
            .prefix("bgt")
            .tempdir_in("/tmp")
            .unwrap();
        TestHome {
            dir: Some(dir),
            netns: None,
        }
    }

    /// A home whose banger runs inside a fresh network namespace, so that
    /// its bridge, NAT table and guests can touch nothing outside it.
    pub fn in_netns() -> TestHome {
        let mut home = TestHome::new();
        let name = format!("bgt-{:08x}", fastrand::u32(..));
        let ok = |args: &[&str]| {
            let st = Command::new("ip")
                .args(args)
                .status()
                .expect("run ip (apt install iproute2)");
            assert!(
                st.success(),
                "ip {args:?} failed: guest tests need root and iproute2"
            );
        };
        ok(&["netns", "add", &name]);
        home.netns = Some(name.clone());
        ok(&["-n", &name, "link", "set", "lo", "up"]);
        home
    }

    pub fn path(&self) -> &Path {
        self.dir.as_ref().expect("home dir").path()
    }

    pub fn banger(&self) -> Command {
        let mut c = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, env!("CARGO_BIN_EXE_banger")]);
                c
            }
            None => Command::new(env!("CARGO_BIN_EXE_banger")),
        };
        c.env("BANGER_HOME", self.path())
            .env("NO_COLOR", "1")
            .env_remove("RUST_LOG");
        c
    }

    /// `banger` in the host's network namespace even for a namespaced home:
    /// for work that must reach the Debian archive, such as image builds.
    pub fn banger_on_host(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_banger"));
        c.env("BANGER_HOME", self.path())
            .env("NO_COLOR", "1")
            .env_remove("RUST_LOG");
        c
    }

    /// Kill this home's daemon and helper and wait until they are gone, so
    /// that the next command starts fresh ones (in the home's namespace).
    pub fn stop_daemon_and_helper(&self) {
        let pids: Vec<u32> = self
            .processes("bangerd")
            .into_iter()
            .chain(self.processes("banger-helper"))
            .collect();
        for pid in &pids {
            kill(*pid);
        }
        wait_until("daemon and helper exit", Duration::from_secs(10), || {
            pids.iter().all(|p| !is_alive(*p))
        });
    }

    /// Run `banger ARGS`, returning its output.
    pub fn run(&self, args: &[&str]) -> Output {
        self.banger().args(args).output().expect("run banger")
    }

    /// Run and require success, returning stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "banger {args:?} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.push("--json");
        serde_json::from_str(&self.ok(&a)).expect("valid JSON")
    }

    pub fn daemon_log(&self) -> String {
        std::fs::read_to_string(self.path().join("state/logs/bangerd.log")).unwrap_or_default()
    }

    pub fn helper_log(&self) -> String {
        std::fs::read_to_string(self.path().join("state/logs/helper.log")).unwrap_or_default()
    }

    pub fn socket(&self) -> PathBuf {
        self.path().join("run/bangerd.sock")
    }

    /// Live (non-zombie) processes of `exe_name` whose command line mentions this home.
    pub fn processes(&self, exe_name: &str) -> Vec<u32> {
        let home = self.path().to_string_lossy().into_owned();
        let mut pids = Vec::new();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
                continue;
            };
            let args: Vec<String> = cmdline
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            let is_exe = args
                .first()
                .is_some_and(|a| Path::new(a).file_name().is_some_and(|f| f == exe_name));
            let mentions_home = args.iter().any(|a| a.contains(&home));
            if is_exe && mentions_home && is_alive(pid) {
                pids.push(pid);
            }
        }
        pids
    }
}

/// Running and not a zombie (this machine's PID 1 does not reap orphans).
pub fn is_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                != Some("Z")
        }
        Err(_) => false,
    }
}

pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

fn kill(pid: u32) {
    let _ = Command::new("kill")
        .arg("-KILL")
        .arg(pid.to_string())
        .status();
}

impl Drop for TestHome {
    fn drop(&mut self) {
        // Everything started for this home names it on its command line:
        // daemon (--home), helper (socket path), VMMs (disk and socket paths).
        let procs = [
            "bangerd",
            "banger-helper",
            "qemu-system-x86_64",
            "fc-double",
            "banger-agent",
        ];
        for pid in procs.iter().flat_map(|p| self.processes(p)) {
            kill(pid);
        }
        if let Some(ns) = &self.netns {
            // Taps and the bridge go with the namespace.
            let _ = Command::new("ip").args(["netns", "delete", ns]).status();
        }
        if std::thread::panicking()
            && let Some(dir) = self.dir.take()
        {
            let kept = dir.keep();
            eprintln!(
                "test failed: kept its banger home (logs in state/logs, VMs in state/vms) at {}",
                kept.display()
            );
        }
    }
}
