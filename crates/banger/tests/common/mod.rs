//! A throwaway banger installation for integration tests: its own BANGER_HOME,
//! the real `banger`, `bangerd` and `banger-helper` binaries, and a Drop that
//! stops whatever the test started.
#![allow(dead_code)] // each test binary uses a different part of this module

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

pub struct TestHome {
    /// Taken on drop: kept (not deleted) when the test failed, for its logs.
    dir: Option<tempfile::TempDir>,
    /// Network namespace everything runs in (daemon, helper, bridge, VMs).
    pub netns: Option<String>,
    /// Deleted with this home (not when it is another home's).
    owns_netns: bool,
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
        // Test daemons keep no warm pool (each pooled guest is a TCG guest
        // running for the whole test; the pool's tests enable it), and
        // serve their web UI on a port of their own (`daemon status` shows
        // it); tests that write their own config.toml get the default
        // port, in their own network namespace.
        std::fs::write(
            dir.path().join("config.toml"),
            format!("{NO_POOL}[web]\nlisten = \"127.0.0.1:0\"\n"),
        )
        .unwrap();
        TestHome {
            dir: Some(dir),
            netns: None,
            owns_netns: false,
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
        home.owns_netns = true;
        ok(&["-n", &name, "link", "set", "lo", "up"]);
        home
    }

    /// Another install beside `other`: a home of its own in `other`'s
    /// network namespace (which stays `other`'s to delete).
    pub fn beside(other: &TestHome) -> TestHome {
        let mut home = TestHome::new();
        home.netns = other.netns.clone();
        home
    }

    /// This install's bridge and nftables table (`daemon status`).
    pub fn host_names(&self) -> (String, String) {
        let n = &self.json(&["daemon", "status"])["host_names"];
        let s = |k: &str| n[k].as_str().expect("host_names").to_owned();
        (s("bridge"), s("nft_table"))
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

    /// `banger` as a terminal runs it, for tests that Ctrl-C it: SIGINT at
    /// its default action even where this test inherited it ignored (as a
    /// background job does). It talks to the home's running daemon.
    pub fn banger_interruptible(&self) -> Command {
        let mut c = Command::new("env");
        c.arg("--default-signal=INT")
            .arg(env!("CARGO_BIN_EXE_banger"))
            .env("BANGER_HOME", self.path())
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
        self.wait_socket_closed();
    }

    /// After a kill: a killed multi-threaded process looks dead (its main
    /// thread is a zombie) while its last threads may still hold the socket.
    /// Wait until it refuses connections, or the next CLI talks to the dying
    /// daemon and loses the connection.
    pub fn wait_socket_closed(&self) {
        wait_until(
            "the daemon's socket closes",
            Duration::from_secs(10),
            || std::os::unix::net::UnixStream::connect(self.socket()).is_err(),
        );
    }

    /// Stop the daemon and start a new one with `BANGER_FAULT_INJECT` set
    /// to `fault` (or unset): the seam is read at daemon start.
    pub fn restart_daemon(&self, fault: Option<&str>) {
        self.ok(&["daemon", "stop"]);
        let mut start = self.banger();
        start.args(["daemon", "start"]);
        if let Some(f) = fault {
            start.env("BANGER_FAULT_INJECT", f);
        }
        let out = start.output().unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
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

    /// The row `id` of `banger doctor --json`.
    pub fn doctor_check(&self, id: &str) -> serde_json::Value {
        let out = self.run(&["doctor", "--json"]);
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("doctor JSON");
        report["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["id"] == id)
            .unwrap_or_else(|| panic!("doctor has no {id} row"))
            .clone()
    }

    /// Whether root disks here are dm snapshots, as doctor reports.
    pub fn root_disks_are_dm(&self) -> bool {
        self.doctor_check("root_disks")["detail"]
            .as_str()
            .unwrap()
            .starts_with("device-mapper snapshots")
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

    /// Wait for the running daemon to log that it paused at `step` (the log
    /// goes on across daemons: only lines after its `bangerd started` count).
    pub fn wait_for_pause(&self, step: &str) {
        wait_until(
            &format!("a pause after {step}"),
            Duration::from_secs(30),
            || {
                let log = self.daemon_log();
                let this_daemon = log
                    .rfind("\"bangerd started\"")
                    .map_or(&log[..], |i| &log[i..]);
                this_daemon.lines().any(|l| {
                    l.contains("fault injection: pausing after this step")
                        && l.contains(&format!("\"step\":\"{step}\""))
                })
            },
        );
    }

    pub fn daemon_pid(&self) -> u32 {
        self.json(&["daemon", "status"])["pid"].as_u64().unwrap() as u32
    }

    /// One call straight to this home's helper, as the test (root) — not
    /// through the daemon: the answer's final frame.
    pub fn helper_call(&self, method: &str, params: serde_json::Value) -> serde_json::Value {
        use std::io::{BufRead, Write};
        let mut conn =
            std::os::unix::net::UnixStream::connect(self.path().join("run/helper.sock")).unwrap();
        let request = serde_json::json!({"v": 1, "id": 1, "method": method, "params": params});
        writeln!(conn, "{request}").unwrap();
        let mut reader = std::io::BufReader::new(conn);
        loop {
            let mut line = String::new();
            assert!(reader.read_line(&mut line).unwrap() > 0, "helper hung up");
            let frame: serde_json::Value = serde_json::from_str(&line).unwrap();
            if frame.get("event").is_none() {
                return frame;
            }
        }
    }

    /// Live (non-zombie) processes of `exe_name` whose command line mentions this home.
    pub fn processes(&self, exe_name: &str) -> Vec<u32> {
        pids_mentioning(exe_name, &self.path().to_string_lossy())
    }
}

impl TestHome {
    /// Each link in the home's namespace: its name and its bridge, if any.
    fn links(&self) -> Vec<(String, Option<String>)> {
        let ns = self.netns.as_deref().expect("a home in a namespace");
        let out = Command::new("ip")
            .args(["-n", ns, "-o", "link", "show"])
            .output()
            .unwrap();
        assert!(out.status.success(), "ip link: {out:?}");
        text(&out.stdout)
            .lines()
            .filter_map(|l| {
                let name = l.split(": ").nth(1)?.split('@').next()?.to_owned();
                let words: Vec<&str> = l.split_whitespace().collect();
                let master = words
                    .windows(2)
                    .find(|w| w[0] == "master")
                    .map(|w| w[1].to_owned());
                Some((name, master))
            })
            .collect()
    }

    /// banger's taps (`bg-*`) in the home's namespace, with their bridge:
    /// what the kernel has, not what banger says.
    pub fn banger_taps(&self) -> Vec<(String, Option<String>)> {
        self.links()
            .into_iter()
            .filter(|(n, _)| n.starts_with("bg-"))
            .collect()
    }

    /// The taps the daemon's TAP pool records as its own.
    pub fn pool_record(&self) -> Vec<String> {
        std::fs::read_to_string(self.path().join("run/tap-pool"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Loop devices over files in this home (a dm snapshot of this home's
    /// VMs holds two of them, so none left means no snapshot left either).
    pub fn loop_devices(&self) -> Vec<String> {
        let root = self.path().to_string_lossy().into_owned();
        std::fs::read_dir("/sys/block")
            .unwrap()
            .flatten()
            .filter(|e| {
                std::fs::read_to_string(e.path().join("loop/backing_file"))
                    .is_ok_and(|b| b.starts_with(&root))
            })
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect()
    }

    /// After an operation that failed and rolled back (or finished): the
    /// leak check finds nothing, and the host agrees: no VMM (`vmm_exe`) or
    /// agent, no banger tap but the pool's, no loop device over our files.
    pub fn assert_host_clean(&self, vmm_exe: &str, after: &str) {
        assert_eq!(
            self.json(&["gc", "--dry-run"]),
            serde_json::json!([]),
            "leaks after {after}"
        );
        for exe in [vmm_exe, "banger-agent"] {
            let left = self.processes(exe);
            assert!(left.is_empty(), "{exe} left after {after}: {left:?}");
        }
        let pool = self.pool_record();
        let (mine, _) = self.host_names();
        // (A recorded tap may still be off the bridge: the pool is making it.
        // One on another bridge is another install's.)
        for (tap, bridge) in self
            .banger_taps()
            .into_iter()
            .filter(|(_, b)| b.as_ref().is_none_or(|b| *b == mine))
        {
            assert!(
                pool.contains(&tap),
                "tap {tap} (bridge {bridge:?}) left after {after}; the pool has {pool:?}"
            );
        }
        let loops = self.loop_devices();
        assert!(
            loops.is_empty(),
            "loop devices left after {after}: {loops:?}"
        );
        // A tap's guard and a guest's policy chain belong to a running VM.
        let running: Vec<serde_json::Value> = self
            .json(&["vm", "list"])
            .as_array()
            .unwrap()
            .iter()
            .filter(|v| v["state"] == "running")
            .cloned()
            .collect();
        let live = |key: &str| -> Vec<String> {
            running
                .iter()
                .filter_map(|v| v[key].as_str().map(str::to_owned))
                .collect()
        };
        let (taps, ips) = (live("tap"), live("guest_ip"));
        for chain in self.nft_chains() {
            let explained = match (chain.strip_prefix("guard-"), chain.strip_prefix("policy-")) {
                (Some(tap), _) => taps.iter().any(|t| t == tap),
                (_, Some(ip)) => ips.iter().any(|i| i.replace('.', "-") == ip),
                _ => true,
            };
            assert!(
                explained,
                "nftables chain {chain} left after {after}: running taps {taps:?}, addresses {ips:?}"
            );
        }
    }

    /// The chains of this install's nftables tables (both families).
    pub fn nft_chains(&self) -> Vec<String> {
        let ns = self.netns.as_deref().expect("a home in a namespace");
        let (_, table) = self.host_names();
        let out = Command::new("ip")
            .args(["netns", "exec", ns, "nft", "-j", "list", "chains"])
            .output()
            .unwrap();
        assert!(out.status.success(), "nft list chains: {out:?}");
        let listing: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        listing["nftables"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|i| i.get("chain"))
            .filter(|c| c["table"] == table.as_str())
            .filter_map(|c| c["name"].as_str().map(str::to_owned))
            .collect()
    }
}

/// Every step of `vm create`, in order, which the daemon's fault seam
/// accepts; `vm start` goes through those from `disks`.
/// A `config.toml` with no warm pool: every test home starts with it.
pub const NO_POOL: &str = "[pool]\nsize = 0\n";

pub const STEPS: [&str; 9] = banger_wire::methods::CREATE_STEPS;

/// Whether `vm start` goes through `step`: it has no image or allocate
/// step (the VM has both), and a disks step only where the VM's dm
/// snapshot is built again (`dm`: root disks are dm snapshots here).
pub fn on_start_path(step: &str, dm: bool) -> bool {
    !matches!(step, "image" | "allocate") && (step != "disks" || dm)
}

/// Live (non-zombie) processes of `exe_name` whose command line mentions `text`.
pub fn pids_mentioning(exe_name: &str, text: &str) -> Vec<u32> {
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
        if is_exe && args.iter().any(|a| a.contains(text)) && is_alive(pid) {
            pids.push(pid);
        }
    }
    pids
}

/// Run one named phase of a long test, saying which on failure and how
/// long it took.
/// What a failed create may leave in its VM's directory: nothing, or the
/// guest's console log (the record `vm logs` shows) and nothing else.
pub fn assert_only_console_left(vm: &serde_json::Value, after: &str) {
    let dir = Path::new(vm["vm_dir"].as_str().expect("vm_dir"));
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let left: Vec<String> = entries
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "console.log" && n != "console.log.1")
        .collect();
    assert!(left.is_empty(), "{after}: the VM dir holds {left:?}");
}

pub fn phase(name: &str, f: impl FnOnce()) {
    let t = Instant::now();
    eprintln!("--- phase: {name}");
    f();
    eprintln!("--- phase: {name} ok in {:.1}s", t.elapsed().as_secs_f64());
}

/// Command output as text.
pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
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

/// Runs `f` while `vm list` is called every 100 ms; prints how long the
/// calls took (a figure: whatever a guest does, the daemon must answer its
/// CLI) and returns `f`'s result.
pub fn while_listing<T>(home: &TestHome, during: &str, f: impl FnOnce() -> T) -> T {
    let done = std::sync::atomic::AtomicBool::new(false);
    let (out, mut ms) = std::thread::scope(|s| {
        let sampler = s.spawn(|| {
            let mut ms = Vec::new();
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let t = Instant::now();
                let out = home
                    .banger()
                    .args(["vm", "list", "--json"])
                    .output()
                    .unwrap();
                assert!(
                    out.status.success(),
                    "vm list during {during}: {}",
                    text(&out.stderr)
                );
                ms.push(t.elapsed().as_secs_f64() * 1000.0);
                std::thread::sleep(Duration::from_millis(100));
            }
            ms
        });
        let out = f();
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        (out, sampler.join().unwrap())
    });
    ms.sort_by(f64::total_cmp);
    if let (Some(max), Some(p50)) = (ms.last(), ms.get(ms.len() / 2)) {
        eprintln!(
            "vm list during {during}: {} calls, p50 {p50:.0} ms, max {max:.0} ms",
            ms.len()
        );
    }
    out
}

/// `git -C dir ARGS` on the host, with a fixed identity and no user
/// config; its stdout without the trailing newline.
pub fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .env("GIT_AUTHOR_NAME", "Test")
        .env("GIT_AUTHOR_EMAIL", "test@example.org")
        .env("GIT_COMMITTER_NAME", "Test")
        .env("GIT_COMMITTER_EMAIL", "test@example.org")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "git {args:?} in {}: {}",
        dir.display(),
        text(&out.stderr)
    );
    text(&out.stdout).trim_end().to_owned()
}

/// `kill -9 pid`, waiting until it is gone.
pub fn kill_9(pid: u32) {
    Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    wait_until("kill -9", Duration::from_secs(10), || !is_alive(pid));
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
        // Daemon and helper may outlive a test; VMMs and agents may not: a
        // test that passed must have deleted its VMs. Noted before anything
        // is killed, so the clean-up below cannot hide a leak.
        let guests: Vec<(&str, u32)> = ["qemu-system-x86_64", "fc-double", "banger-agent"]
            .into_iter()
            .flat_map(|p| self.processes(p).into_iter().map(move |pid| (p, pid)))
            .collect();
        let procs = ["bangerd", "banger-helper"];
        for pid in procs
            .iter()
            .flat_map(|p| self.processes(p))
            .chain(guests.iter().map(|(_, pid)| *pid))
        {
            kill(pid);
        }
        if let Some(ns) = self.netns.as_ref().filter(|_| self.owns_netns) {
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
        } else if !guests.is_empty() {
            let kept = self.dir.take().map(|d| d.keep());
            panic!(
                "the test left guest processes running (killed now): {guests:?}; home kept at {kept:?}"
            );
        }
    }
}

/// Registers the default image (`debian-12`, built from the Debian archive)
/// in `home` and makes it the default.
///
/// The image is built once per machine and per version of what goes into it
/// (the image builder, its recipes, the agent): under a lock in the target
/// dir, by the real `banger image build` in a home of its own, outside any
/// test namespace because the build needs the Debian mirror. Test binaries
/// that boot guests share it instead of spending two minutes each.
pub fn shared_default_image(home: &TestHome) {
    register_image(home, "debian-12", &cached_default_image(), &[]);
    home.ok(&["image", "promote", "debian-12"]);
}

/// Registers the `dev` image (built from its recipe, cached like the
/// default image) in `home` under the name `dev`, with systemd init (its
/// default) and the readiness checks of its manifest.
pub fn shared_dev_image(home: &TestHome) {
    register_image(home, "dev", &cached_dev_image(), &["--init", "systemd"]);
}

/// `banger image register NAME` of the image files in `dir`.
fn register_image(home: &TestHome, name: &str, dir: &Path, more: &[&str]) {
    let file = |f: &str| dir.join(f).to_string_lossy().into_owned();
    let mut args = vec!["image", "register", name]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>();
    for (flag, f) in [
        ("--vmlinux", "vmlinux"),
        ("--initrd", "initrd.img"),
        ("--rootfs", "rootfs.ext4"),
        ("--work-seed", "work-seed.ext4"),
    ] {
        args.push(flag.into());
        args.push(file(f));
    }
    args.extend(more.iter().map(|m| m.to_string()));
    home.ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
}

/// The cached default image's directory, building it first when needed.
pub fn cached_default_image() -> PathBuf {
    cached_image("default-image", build_default_image)
}

/// The cached `dev` image's directory, building it first when needed
/// (`banger image build dev`: Debian packages, and npm packages installed
/// on the host).
pub fn cached_dev_image() -> PathBuf {
    cached_image("dev-image", build_dev_image)
}

/// `target/tmp/<kind>/<hash of the image's inputs>`: the directory of the
/// image `build` made there, built under a lock by the first test binary
/// that needs it.
fn cached_image(kind: &str, build: fn(&Path) -> PathBuf) -> PathBuf {
    let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join(kind);
    std::fs::create_dir_all(&root).unwrap();
    let lock = std::fs::File::create(root.join("lock")).unwrap();
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive).unwrap();
    let key = format!("{:016x}", image_inputs_hash());
    let home = root.join(&key);
    let done = home.join("image-dir");
    if let Ok(dir) = std::fs::read_to_string(&done) {
        return PathBuf::from(dir);
    }
    // A build that died half way: start over.
    let _ = std::fs::remove_dir_all(&home);
    for stale in std::fs::read_dir(&root).unwrap().flatten() {
        if stale.file_type().unwrap().is_dir() {
            let _ = std::fs::remove_dir_all(stale.path());
        }
    }
    std::fs::create_dir_all(&home).unwrap();
    let dir = build(&home);
    std::fs::write(&done, dir.to_string_lossy().as_bytes()).unwrap();
    dir
}

/// In a fresh home, at the same time: `image build`, and a `vm create` that
/// needs the default image, which the fault seam stops right after its image
/// step (before it touches the network: this home is not in a namespace).
/// Both must share one build, and the image becomes the default.
fn build_default_image(home: &Path) -> PathBuf {
    // Outside any namespace: no warm pool may boot a guest here.
    std::fs::write(home.join("config.toml"), NO_POOL).unwrap();
    let banger = |args: &[&str]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_banger"));
        c.env("BANGER_HOME", home)
            .env("NO_COLOR", "1")
            .env_remove("RUST_LOG")
            .args(args);
        c
    };
    let started = banger(&["daemon", "start"])
        .env("BANGER_FAULT_INJECT", "image")
        .output()
        .unwrap();
    assert!(started.status.success(), "daemon start: {started:?}");
    let t = Instant::now();
    let build = banger(&["image", "build", "--json"]).spawn().unwrap();
    let first_use = banger(&["vm", "create", "--name", "first-use"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let out = build.wait_with_output().unwrap();
    assert!(out.status.success(), "image build failed: {out:?}");
    let out = first_use.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("injected fault after the image step"),
        "vm create must get the image built on first use: {stderr}"
    );
    eprintln!(
        "built the default image in {:.1}s",
        t.elapsed().as_secs_f64()
    );
    let log = std::fs::read_to_string(home.join("state/logs/bangerd.log")).unwrap();
    assert_eq!(
        log.matches("\"building image\"").count(),
        1,
        "a build and a create that needs the image must share one build: {log}"
    );
    let list = Command::new(env!("CARGO_BIN_EXE_banger"))
        .env("BANGER_HOME", home)
        .args(["image", "list", "--json"])
        .output()
        .unwrap();
    let images: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    let img = &images.as_array().unwrap()[0];
    assert_eq!(img["name"], "debian-12");
    assert_eq!(img["state"], "ready");
    assert_eq!(img["is_default"], true);
    let dir = PathBuf::from(img["dir"].as_str().unwrap());
    // Stop that home's daemon and helper: nothing else will talk to them.
    let home_str = home.to_string_lossy().into_owned();
    let pids: Vec<u32> = ["bangerd", "banger-helper"]
        .iter()
        .flat_map(|exe| pids_mentioning(exe, &home_str))
        .collect();
    for pid in &pids {
        kill(*pid);
    }
    wait_until(
        "the image home's daemon exits",
        Duration::from_secs(10),
        || pids.iter().all(|p| !is_alive(*p)),
    );
    dir
}

/// `banger image build dev` in a fresh home of its own (outside any test
/// namespace: the build needs the Debian mirror and the npm registry).
fn build_dev_image(home: &Path) -> PathBuf {
    std::fs::write(home.join("config.toml"), NO_POOL).unwrap();
    let banger = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_banger"))
            .env("BANGER_HOME", home)
            .env("NO_COLOR", "1")
            .env_remove("RUST_LOG")
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "banger {args:?}: {out:?}");
        out
    };
    let t = Instant::now();
    banger(&["image", "build", "dev", "--quiet"]);
    eprintln!("built the dev image in {:.1}s", t.elapsed().as_secs_f64());
    let images: serde_json::Value =
        serde_json::from_slice(&banger(&["image", "list", "--json"]).stdout).unwrap();
    let img = &images.as_array().unwrap()[0];
    assert_eq!(img["name"], "dev");
    assert_eq!(img["state"], "ready");
    assert_eq!(img["default_init"], "systemd", "{img}");
    let dir = PathBuf::from(img["dir"].as_str().unwrap());
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["services"][0]["name"], "opencode", "{manifest}");
    let home_str = home.to_string_lossy().into_owned();
    let pids: Vec<u32> = ["bangerd", "banger-helper"]
        .iter()
        .flat_map(|exe| pids_mentioning(exe, &home_str))
        .collect();
    for pid in &pids {
        kill(*pid);
    }
    wait_until(
        "the image home's daemon exits",
        Duration::from_secs(10),
        || pids.iter().all(|p| !is_alive(*p)),
    );
    dir
}

/// Hash of the sources that shape the default image.
fn image_inputs_hash() -> u64 {
    use std::hash::{Hash, Hasher};
    let crates = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let mut files = Vec::new();
    for dir in ["banger-image", "banger-agent", "banger-agent-proto"] {
        collect_files(&crates.join(dir), &mut files);
    }
    // The build on first use (tested while this image is made), and the
    // dependencies' versions the agent is built with.
    files.push(crates.join("bangerd/src/images.rs"));
    files.push(crates.join("../Cargo.lock"));
    files.sort();
    // Paths relative to the crates dir: the key is the same in every clone
    // (CI keeps the target dir, and so this cache, across fresh clones).
    let mut h = std::hash::DefaultHasher::new();
    for f in files {
        f.strip_prefix(crates).unwrap().hash(&mut h);
        std::fs::read(&f).unwrap().hash(&mut h);
    }
    h.finish()
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if entry.file_type().unwrap().is_dir() {
            collect_files(&path, out);
        } else {
            out.push(path);
        }
    }
}

/// The directory the test binaries' siblings (`bangerd`, `fc-double`, the agent) are built in.
pub fn target_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_banger"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// A registrable image the double accepts: any ELF as the kernel, and real
/// ext4 files labelled as `image register` requires.
pub fn fake_image(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::copy("/bin/true", dir.join("vmlinux")).unwrap();
    std::fs::write(dir.join("initrd.img"), b"initrd").unwrap();
    for (file, label) in [("rootfs.ext4", "rootfs"), ("work-seed.ext4", "work")] {
        let st = Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", label])
            .arg(dir.join(file))
            .arg("16M")
            .status()
            .unwrap();
        assert!(st.success(), "mkfs.ext4 (e2fsprogs) is needed");
    }
}

/// `home` set up for Firecracker VMs against fc-double (the real agent as
/// its stand-in guest), with the registered image `fcimg`.
pub fn fc_double_home(home: TestHome) -> TestHome {
    let double = target_dir().join("fc-double");
    let agent = target_dir().join("banger-agent");
    for bin in [&double, &agent] {
        assert!(
            bin.is_file(),
            "{} is not built: run `cargo build --workspace`",
            bin.display()
        );
    }
    // banger runs `firecracker --api-sock … --id …`; the wrapper adds the
    // double's guest stand-in: the real agent, kept away from the host's keys
    // (each stand-in guest has a file of its own, named by the VMM's pid).
    let wrapper = home.path().join("firecracker");
    let keys = home.path().join("guest-authorized_keys");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec {} --guest-agent-cmd '{} --listen unix:{{sock}} --authorized-keys {}-'$$' --shutdown-action exit' \"$@\"\n",
            double.display(),
            agent.display(),
            keys.display()
        ),
    )
    .unwrap();
    std::os::unix::fs::PermissionsExt::set_mode(
        &mut std::fs::metadata(&wrapper).unwrap().permissions(),
        0o755,
    );
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let config = home.path().join("config.toml");
    let mut text = std::fs::read_to_string(&config).unwrap_or_default();
    text.push_str(&format!(
        "[vmm]\nfirecracker_bin = \"{}\"\n",
        wrapper.display()
    ));
    std::fs::write(&config, text).unwrap();
    let img = home.path().join("img");
    fake_image(&img);
    let p = |f: &str| img.join(f).display().to_string();
    let register = |name: &str, seed: &str| {
        home.run(&[
            "image",
            "register",
            name,
            "--vmlinux",
            &p("vmlinux"),
            "--initrd",
            &p("initrd.img"),
            "--rootfs",
            &p("rootfs.ext4"),
            "--work-seed",
            &p(seed),
        ])
    };
    // The guest mounts the disk labelled `work` on /root: a seed without
    // that label (or no ext4 at all) is refused, saying how to fix it.
    for (seed, says) in [
        ("rootfs.ext4", "is labelled \"rootfs\""),
        ("initrd.img", "is not an ext4 filesystem"),
    ] {
        let out = register("badseed", seed);
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says) && err.contains("work"), "{err}");
    }
    let out = register("fcimg", "work-seed.ext4");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    home
}

/// banger's end of [`OutsideNet`]'s veth pair, and the outside's.
pub const INSIDE: &str = "198.18.0.1";
pub const OUTSIDE: &str = "198.18.0.2";

/// `ip ARGS`, which must succeed.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(out.status.success(), "ip {args:?}: {}", text(&out.stderr));
}

/// The outside world of a namespaced home: a namespace of its own behind a
/// veth pair (banger's side [`INSIDE`], its default route through
/// [`OUTSIDE`]), also the home namespace's resolver. Made before banger's
/// daemon starts: `ip netns exec` bind-mounts the namespace's resolv.conf
/// only for processes it starts afterwards. Its servers are killed and
/// the namespace deleted on drop.
pub struct OutsideNet {
    pub ns: String,
    pub banger_ns: String,
    servers: Vec<Child>,
}

impl OutsideNet {
    pub fn new(home: &TestHome) -> OutsideNet {
        let banger_ns = home.netns.clone().expect("a namespaced home");
        let ns = format!("bgo-{:08x}", fastrand::u32(..));
        ip(&["netns", "add", &ns]);
        let net = OutsideNet {
            ns: ns.clone(),
            banger_ns: banger_ns.clone(),
            servers: Vec::new(),
        };
        let (vin, vout) = ("bgv-in", "bgv-out");
        ip(&[
            "-n", &banger_ns, "link", "add", vin, "type", "veth", "peer", "name", vout, "netns",
            &ns,
        ]);
        ip(&[
            "-n",
            &banger_ns,
            "addr",
            "add",
            &format!("{INSIDE}/30"),
            "dev",
            vin,
        ]);
        ip(&["-n", &banger_ns, "link", "set", vin, "up"]);
        ip(&["-n", &banger_ns, "route", "add", "default", "via", OUTSIDE]);
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{OUTSIDE}/30"),
            "dev",
            vout,
        ]);
        ip(&["-n", &ns, "link", "set", vout, "up"]);
        // The banger namespace's resolver is the outside one.
        let etc = format!("/etc/netns/{banger_ns}");
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::write(
            format!("{etc}/resolv.conf"),
            format!("nameserver {OUTSIDE}\n"),
        )
        .unwrap();
        net
    }

    /// `/usr/bin/python3 -c SCRIPT ARGS...` in the outside namespace, kept
    /// running until this is dropped.
    pub fn python(&mut self, script: &str, args: &[&str], stdout: std::process::Stdio) {
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns, "/usr/bin/python3", "-c", script])
            .args(args)
            .stdout(stdout)
            .spawn()
            .expect("python3 (apt install python3)");
        self.servers.push(child);
    }
}

impl Drop for OutsideNet {
    fn drop(&mut self) {
        for c in &mut self.servers {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.ns])
            .status();
        let _ = std::fs::remove_dir_all(format!("/etc/netns/{}", self.banger_ns));
    }
}

/// The in-guest counter [`start_counter`] runs: its last value.
pub fn counter(home: &TestHome, vm: &str) -> u64 {
    let text = home.ok(&["vm", "exec", vm, "--", "cat", "/root/counter"]);
    text.trim()
        .parse()
        .unwrap_or_else(|_| panic!("counter of {vm}: {text:?}"))
}

/// The counter moves on in `vm` (by more than a step).
pub fn keeps_counting(home: &TestHome, vm: &str) -> u64 {
    let first = counter(home, vm);
    let mut last = first;
    wait_until(
        &format!("{vm}'s counter goes on from {first}"),
        Duration::from_secs(20),
        || {
            last = counter(home, vm);
            last > first + 1
        },
    );
    last
}

/// A shell loop in `vm` counting in memory and writing each count to
/// `/root/counter`, by rename (a reader never sees a half-written file).
pub fn start_counter(home: &TestHome, vm: &str) {
    home.ok(&[
        "vm",
        "exec",
        vm,
        "--",
        "sh",
        "-c",
        "echo 0 > /root/counter; nohup sh -c 'i=0; while :; do i=$((i+1)); echo $i > /root/counter.new; mv /root/counter.new /root/counter; sleep 0.1; done' >/dev/null 2>&1 &",
    ]);
    keeps_counting(home, vm);
}

/// The names `snapshot list` shows.
pub fn snapshot_names(home: &TestHome) -> Vec<String> {
    home.json(&["snapshot", "list"])
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_owned())
        .collect()
}

/// `banger vm exec NAME -- sh -c SCRIPT`: (exit code, stdout, stderr).
pub fn sh(home: &TestHome, vm: &str, script: &str) -> (i32, String, String) {
    let out = home.run(&["vm", "exec", vm, "--", "sh", "-c", script]);
    (
        out.status.code().unwrap_or(-1),
        text(&out.stdout),
        text(&out.stderr),
    )
}

/// [`sh`], which must exit 0: its stdout.
pub fn sh_ok(home: &TestHome, vm: &str, script: &str) -> String {
    let (code, out, err) = sh(home, vm, script);
    assert_eq!(code, 0, "in {vm}: {script}\nstdout: {out}\nstderr: {err}");
    out
}

/// A minimal authoritative resolver for [`OutsideNet::python`]: listens on
/// `argv[1]`, answers A queries for the names `argv[2..]` with that
/// address, NXDOMAIN for every other name, and prints each query it gets.
pub const DNS_SERVER: &str = r#"
import socket, struct, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 53))
names = set(sys.argv[2:])
while True:
    q, peer = s.recvfrom(4096)
    i, labels = 12, []
    while q[i]:
        labels.append(q[i + 1:i + 1 + q[i]].decode())
        i += 1 + q[i]
    name = ".".join(labels).lower()
    qtype = struct.unpack(">H", q[i + 1:i + 3])[0]
    question = q[12:i + 5]
    print(f"query {name} type {qtype} from {peer[0]}", flush=True)
    if name in names:
        answers = 1 if qtype == 1 else 0
        resp = q[:2] + struct.pack(">HHHHH", 0x8580, 1, answers, 0, 0) + question
        if answers:
            resp += b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 60, 4) + socket.inet_aton(sys.argv[1])
    else:
        resp = q[:2] + struct.pack(">HHHHH", 0x8583, 1, 0, 0, 0) + question
    s.sendto(resp, peer)
"#;

/// The names `vm list` shows, sorted.
pub fn vm_names(home: &TestHome) -> Vec<String> {
    let mut names: Vec<String> = home
        .json(&["vm", "list"])
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_owned())
        .collect();
    names.sort();
    names
}
