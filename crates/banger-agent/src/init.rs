//! `--init`: the agent as the guest's PID 1.
//!
//! The boot sequence is written against the [`System`] trait so that its
//! decisions (what to mount, which commands to run, which files to write)
//! are unit-tested with a recording fake; only [`RealSystem`] touches the
//! machine. Every step logs its failure and the boot carries on: PID 1
//! must never exit, and a guest without network is still more useful to
//! debug than a kernel panic.
//!
//! Networking uses `ip` from iproute2 (in every banger image) rather than
//! netlink in the agent: four commands at boot are not worth the binary
//! size, and their failures print usable messages on the console.

use std::collections::HashSet;
use std::ffi::OsString;
use std::io;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use banger_agent_proto::{AgentMode, ExitStatus};
use rustix::mount::MountFlags;
use rustix::process::{Pid, Signal};
use rustix::system::RebootCommand;

use crate::channel::{Listen, serve_forever, spawn_named};
use crate::cmdline::{ChannelKind, Halt, KernelCmdline};
use crate::exec::{DEFAULT_PATH, find_in_path};
use crate::reaper::Reaper;
use crate::{AgentState, MainEvent, ShutdownAction};

/// A filesystem `--init` mounts unless something already is mounted there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountSpec {
    pub source: &'static str,
    pub target: &'static str,
    pub fstype: &'static str,
    pub flags: MountFlags,
    pub data: &'static str,
}

/// The API filesystems, in mount order (`/proc` first: the others are
/// checked against `/proc/self/mounts`).
pub fn mount_specs() -> Vec<MountSpec> {
    let nsd = MountFlags::NOSUID | MountFlags::NODEV;
    let m = |source, target, fstype, flags, data| MountSpec {
        source,
        target,
        fstype,
        flags,
        data,
    };
    vec![
        m("proc", "/proc", "proc", nsd | MountFlags::NOEXEC, ""),
        m("sysfs", "/sys", "sysfs", nsd | MountFlags::NOEXEC, ""),
        m(
            "devtmpfs",
            "/dev",
            "devtmpfs",
            MountFlags::NOSUID,
            "mode=0755",
        ),
        m(
            "devpts",
            "/dev/pts",
            "devpts",
            MountFlags::NOSUID | MountFlags::NOEXEC,
            "gid=5,mode=0620,ptmxmode=0666",
        ),
        m("tmpfs", "/dev/shm", "tmpfs", nsd, "mode=1777"),
        m("tmpfs", "/run", "tmpfs", nsd, "mode=0755"),
        m("tmpfs", "/tmp", "tmpfs", nsd, "mode=1777"),
    ]
}

/// Undoes the octal escapes of `/proc/self/mounts` (`\040` for a space).
fn unescape_mount_path(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Mount points listed in `/proc/self/mounts`.
pub fn mounted_targets(mounts: &str) -> HashSet<String> {
    mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .map(unescape_mount_path)
        .collect()
}

/// Whether the topmost mount of `/` is read-only.
pub fn root_is_readonly(mounts: &str) -> bool {
    mounts
        .lines()
        .rev()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(1) == Some(&"/")).then(|| f.get(3).copied().unwrap_or(""))
        })
        .is_some_and(|opts| opts.split(',').any(|o| o == "ro"))
}

/// Whether a `/proc/<pid>/stat` line is a live user-space process (not a
/// kernel thread, not a zombie).
pub fn is_user_process(stat: &str) -> bool {
    const PF_KTHREAD: u64 = 0x0020_0000;
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return false;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let state = f.first().copied().unwrap_or("Z");
    let flags: u64 = f.get(6).and_then(|s| s.parse().ok()).unwrap_or(PF_KTHREAD);
    state != "Z" && state != "X" && flags & PF_KTHREAD == 0
}

/// What the boot sequence needs from the machine.
pub trait System {
    fn read(&self, path: &str) -> io::Result<String>;
    /// Whether anything (including a dangling symlink) is at `path`.
    fn exists(&self, path: &str) -> bool;
    fn list_dir(&self, path: &str) -> io::Result<Vec<String>>;
    fn mkdir_all(&mut self, path: &str) -> io::Result<()>;
    fn mount(&mut self, spec: &MountSpec) -> io::Result<()>;
    fn remount_root_rw(&mut self) -> io::Result<()>;
    fn symlink(&mut self, target: &str, link: &str) -> io::Result<()>;
    /// Replaces `path` (a symlink there is replaced, not followed).
    fn write_file(&mut self, path: &str, contents: &str) -> io::Result<()>;
    fn set_hostname(&mut self, name: &str) -> io::Result<()>;
    fn run(&mut self, argv: &[&str]) -> io::Result<ExitStatus>;
}

fn which(sys: &dyn System, name: &str) -> Option<String> {
    DEFAULT_PATH
        .split(':')
        .map(|dir| format!("{dir}/{name}"))
        .find(|p| sys.exists(p))
}

fn step(what: &str, result: io::Result<()>) {
    if let Err(e) = result {
        log!("{what}: {e}");
    }
}

/// Runs a program from `PATH`, logging failures.
fn run_logged(sys: &mut dyn System, argv: &[&str]) {
    let Some(program) = which(sys, argv[0]) else {
        return log!("{} not found", argv[0]);
    };
    let mut full = vec![program.as_str()];
    full.extend_from_slice(&argv[1..]);
    match sys.run(&full) {
        Ok(status) if status.success() => {}
        Ok(status) => log!("{}: {status}", argv.join(" ")),
        Err(e) => log!("{}: {e}", argv.join(" ")),
    }
}

/// Host key generated on first boot: ed25519 only. RSA generation takes
/// tens of seconds on an emulated CPU (measured: ~40 s under TCG), and every
/// current OpenSSH client speaks ed25519.
const SSH_HOST_KEY: &str = "/etc/ssh/ssh_host_ed25519_key";

/// Everything between the kernel handing over and serving the channel.
pub fn early_boot(sys: &mut dyn System) -> KernelCmdline {
    let specs = mount_specs();
    if !sys.exists("/proc/self") {
        step("mkdir /proc", sys.mkdir_all("/proc"));
        step("mount /proc", sys.mount(&specs[0]));
    }
    let mounts = sys.read("/proc/self/mounts").unwrap_or_default();
    if root_is_readonly(&mounts) {
        step("remount / read-write", sys.remount_root_rw());
    }
    let mounted = mounted_targets(&mounts);
    for spec in &specs[1..] {
        if !mounted.contains(spec.target) {
            step(
                &format!("mkdir {}", spec.target),
                sys.mkdir_all(spec.target),
            );
            step(&format!("mount {}", spec.target), sys.mount(spec));
        }
    }
    // What udev or systemd would create.
    for (link, target) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        if !sys.exists(link) {
            step(&format!("symlink {link}"), sys.symlink(target, link));
        }
    }

    let cmdline = KernelCmdline::parse(&sys.read("/proc/cmdline").unwrap_or_default());

    let mut modules = vec![match cmdline.channel() {
        ChannelKind::Serial => "virtio_console".to_owned(),
        ChannelKind::Vsock(_) => "vmw_vsock_virtio_transport".to_owned(),
    }];
    modules.extend(cmdline.modules());
    for module in &modules {
        if !sys.exists(&format!("/sys/module/{}", module.replace('-', "_"))) {
            run_logged(sys, &["modprobe", module]);
        }
    }

    let ip = match cmdline.ip() {
        Some(Ok(ip)) => Some(ip),
        Some(Err(e)) => {
            log!("ignoring ip=: {e}");
            None
        }
        None => None,
    };
    let hostname = ip.as_ref().and_then(|ip| ip.hostname.clone()).or_else(|| {
        sys.read("/etc/hostname")
            .ok()
            .and_then(|h| h.lines().next().map(|l| l.trim().to_owned()))
            .filter(|h| !h.is_empty())
    });
    if let Some(name) = hostname {
        step(&format!("set hostname {name}"), sys.set_hostname(&name));
    }
    match ip {
        Some(ip) => {
            let device = ip.device.clone().or_else(|| {
                let mut ifaces = sys.list_dir("/sys/class/net").unwrap_or_default();
                ifaces.sort();
                ifaces.into_iter().find(|i| i != "lo")
            });
            match device {
                Some(device) => {
                    for args in ip.commands(&device) {
                        let mut argv = vec!["ip"];
                        argv.extend(args.iter().map(String::as_str));
                        run_logged(sys, &argv);
                    }
                }
                None => log!("ip= given but no network interface found"),
            }
        }
        None => run_logged(sys, &["ip", "link", "set", "lo", "up"]),
    }
    let dns = cmdline.dns();
    if !dns.is_empty() {
        let text: String = dns.iter().map(|ns| format!("nameserver {ns}\n")).collect();
        step(
            "write /etc/resolv.conf",
            sys.write_file("/etc/resolv.conf", &text),
        );
    }
    cmdline
}

const SSHD: &str = "/usr/sbin/sshd";

/// Readies sshd: its privilege-separation directory and, on first boot
/// (the image ships without host keys), host keys. Runs on the sshd
/// thread, after the agent already serves the channel.
pub fn prepare_sshd(sys: &mut dyn System) {
    step("mkdir /run/sshd", sys.mkdir_all("/run/sshd"));
    if !sys.exists(SSH_HOST_KEY) {
        log!("generating the ssh host key");
        run_logged(
            sys,
            &[
                "ssh-keygen",
                "-q",
                "-t",
                "ed25519",
                "-N",
                "",
                "-f",
                SSH_HOST_KEY,
            ],
        );
    }
}

/// The environment of everything `--init` starts.
pub fn init_env() -> Vec<(OsString, OsString)> {
    [
        ("PATH", DEFAULT_PATH),
        ("HOME", "/root"),
        ("USER", "root"),
        ("LOGNAME", "root"),
        ("SHELL", "/bin/sh"),
        ("LANG", "C.UTF-8"),
    ]
    .into_iter()
    .map(|(k, v)| (k.into(), v.into()))
    .collect()
}

/// The real machine.
#[derive(Debug)]
pub struct RealSystem {
    pub reaper: Arc<Reaper>,
}

impl System for RealSystem {
    fn read(&self, path: &str) -> io::Result<String> {
        std::fs::read_to_string(path)
    }

    fn exists(&self, path: &str) -> bool {
        std::fs::symlink_metadata(path).is_ok()
    }

    fn list_dir(&self, path: &str) -> io::Result<Vec<String>> {
        Ok(std::fs::read_dir(path)?
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().into_string().ok())
            .collect())
    }

    fn mkdir_all(&mut self, path: &str) -> io::Result<()> {
        std::fs::create_dir_all(path)
    }

    fn mount(&mut self, s: &MountSpec) -> io::Result<()> {
        let data = std::ffi::CString::new(s.data)?;
        let data = (!s.data.is_empty()).then_some(data.as_c_str());
        Ok(rustix::mount::mount(
            s.source, s.target, s.fstype, s.flags, data,
        )?)
    }

    fn remount_root_rw(&mut self) -> io::Result<()> {
        Ok(rustix::mount::mount_remount("/", MountFlags::empty(), "")?)
    }

    fn symlink(&mut self, target: &str, link: &str) -> io::Result<()> {
        std::os::unix::fs::symlink(target, link)
    }

    fn write_file(&mut self, path: &str, contents: &str) -> io::Result<()> {
        let tmp = format!("{path}.banger-tmp");
        std::fs::write(&tmp, contents)?;
        std::fs::rename(&tmp, path)
    }

    fn set_hostname(&mut self, name: &str) -> io::Result<()> {
        Ok(rustix::system::sethostname(name.as_bytes())?)
    }

    fn run(&mut self, argv: &[&str]) -> io::Result<ExitStatus> {
        let mut cmd = Command::new(argv[0]);
        cmd.args(&argv[1..])
            .env_clear()
            .envs(init_env())
            .stdin(Stdio::null());
        self.reaper.run(&mut cmd)
    }
}

/// Keeps sshd running, restarting it with a growing pause.
fn supervise_sshd(reaper: &Arc<Reaper>, stopping: &AtomicBool) {
    prepare_sshd(&mut RealSystem {
        reaper: reaper.clone(),
    });
    let mut pause = Duration::from_secs(1);
    while !stopping.load(Ordering::SeqCst) {
        let started = Instant::now();
        let mut cmd = Command::new(SSHD);
        cmd.args(["-D", "-e"])
            .env_clear()
            .envs(init_env())
            .stdin(Stdio::null());
        match reaper.spawn(&mut cmd) {
            Ok((_child, exited)) => {
                let status = exited.recv();
                if stopping.load(Ordering::SeqCst) {
                    return;
                }
                log!("sshd exited ({status:?}); restarting");
            }
            Err(e) => log!("cannot start sshd: {e}"),
        }
        pause = if started.elapsed() > Duration::from_secs(30) {
            Duration::from_secs(1)
        } else {
            (pause * 2).min(Duration::from_secs(30))
        };
        std::thread::sleep(pause);
    }
}

/// Live user-space processes other than ourselves.
fn user_processes() -> Vec<Pid> {
    let me = std::process::id();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me && pid != 1)
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| is_user_process(&s))
        })
        .filter_map(|pid| Pid::from_raw(pid as i32))
        .collect()
}

fn stop_processes(signal: Signal, grace: Duration) {
    for pid in user_processes() {
        let _ = rustix::process::kill_process(pid, signal);
    }
    let deadline = Instant::now() + grace;
    while !user_processes().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Stops everything and ends the machine. Never returns.
fn halt(how: Halt, stopping: &AtomicBool) -> ! {
    stopping.store(true, Ordering::SeqCst);
    log!("stopping processes");
    rustix::fs::sync();
    stop_processes(Signal::TERM, Duration::from_secs(5));
    stop_processes(Signal::KILL, Duration::from_secs(2));
    rustix::fs::sync();
    step(
        "remount / read-only",
        rustix::mount::mount_remount("/", MountFlags::RDONLY, "").map_err(io::Error::from),
    );
    rustix::fs::sync();
    let cmd = match how {
        Halt::PowerOff => RebootCommand::PowerOff,
        Halt::Reboot => RebootCommand::Restart,
    };
    log!("{cmd:?}");
    if let Err(e) = rustix::system::reboot(cmd) {
        log!("reboot(2) failed: {e}");
    }
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Powers off a guest that runs another init (systemd).
pub fn service_poweroff(reaper: &Arc<Reaper>) {
    for argv in [&["systemctl", "poweroff"][..], &["poweroff"][..]] {
        let Some(program) = find_in_path(argv[0], DEFAULT_PATH) else {
            continue;
        };
        let mut cmd = Command::new(program);
        cmd.args(&argv[1..]).stdin(Stdio::null());
        match reaper.run(&mut cmd) {
            Ok(status) if status.success() => return,
            Ok(status) => log!("{}: {status}", argv.join(" ")),
            Err(e) => log!("{}: {e}", argv.join(" ")),
        }
    }
    log!("could not power off");
}

/// Points stdout and stderr (ours and our children's) at the console and
/// stdin at /dev/null, whatever the initramfs left us. NOCTTY: the
/// console must never become our controlling terminal, or a ^C typed on it
/// would reach PID 1 as SIGINT and power the machine off.
fn attach_console() {
    use rustix::fs::{Mode, OFlags, open};
    match open(
        "/dev/console",
        OFlags::WRONLY | OFlags::NOCTTY | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(console) => {
            step(
                "console stdout",
                rustix::stdio::dup2_stdout(&console).map_err(io::Error::from),
            );
            step(
                "console stderr",
                rustix::stdio::dup2_stderr(&console).map_err(io::Error::from),
            );
        }
        Err(e) => log!("cannot open /dev/console: {e}"),
    }
    if let Ok(null) = open("/dev/null", OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty()) {
        step(
            "stdin",
            rustix::stdio::dup2_stdin(&null).map_err(io::Error::from),
        );
    }
}

/// PID 1's main. Never returns.
pub fn run(listen: Vec<Listen>, authorized_keys: PathBuf) -> ! {
    if std::process::id() != 1 {
        log!("--init must run as PID 1 (it mounts filesystems and powers the machine off)");
        std::process::exit(2);
    }
    log!("starting as init, version {}", env!("CARGO_PKG_VERSION"));
    // Ctrl-Alt-Del then sends us SIGINT instead of resetting the machine.
    step(
        "disable ctrl-alt-del reboot",
        rustix::system::reboot(RebootCommand::CadOff).map_err(io::Error::from),
    );
    let reaper = Reaper::new();
    reaper.start();
    let cmdline = std::panic::catch_unwind(|| {
        early_boot(&mut RealSystem {
            reaper: reaper.clone(),
        })
    })
    .unwrap_or_else(|_| {
        log!("boot setup panicked; carrying on");
        KernelCmdline::read()
    });
    attach_console();
    // Before serving: "agent ready" means the work disk has its full size.
    crate::work::grow_home_logged();

    let (events, rx) = mpsc::channel();
    match signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        libc::SIGPWR,
    ]) {
        Ok(mut signals) => {
            let events = events.clone();
            spawn_named("signals", move || {
                for sig in signals.forever() {
                    let _ = events.send(MainEvent::Shutdown(format!("signal {sig}")));
                }
            });
        }
        Err(e) => log!("cannot handle signals: {e}"),
    }

    let stopping = Arc::new(AtomicBool::new(false));
    if std::path::Path::new(SSHD).exists() {
        let (reaper, stopping) = (reaper.clone(), stopping.clone());
        spawn_named("sshd", move || supervise_sshd(&reaper, &stopping));
    }

    let ctx = Arc::new(AgentState {
        reaper,
        mode: AgentMode::Init,
        shutdown: ShutdownAction::PowerOff,
        authorized_keys,
        boot_id: crate::read_boot_id(),
        base_env: init_env(),
        events: events.clone(),
    });
    for l in listen {
        let (ctx, l) = (ctx.clone(), l.resolve(&cmdline));
        spawn_named("listener", move || serve_forever(&ctx, &l, None));
    }
    // `events` stays alive here, so recv() only returns events.
    loop {
        if let Ok(MainEvent::Shutdown(why)) = rx.recv() {
            log!("shutdown: {why}");
            halt(cmdline.halt(), &stopping);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[derive(Default)]
    struct Fake {
        files: HashMap<String, String>,
        paths: HashSet<String>,
        ops: Vec<String>,
    }

    impl Fake {
        fn with(mut self, paths: &[&str]) -> Self {
            self.paths.extend(paths.iter().map(|s| s.to_string()));
            self
        }
        fn file(mut self, path: &str, text: &str) -> Self {
            self.files.insert(path.into(), text.into());
            self
        }
    }

    impl System for Fake {
        fn read(&self, path: &str) -> io::Result<String> {
            self.files
                .get(path)
                .cloned()
                .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
        }
        fn exists(&self, path: &str) -> bool {
            self.paths.contains(path) || self.files.contains_key(path)
        }
        fn list_dir(&self, path: &str) -> io::Result<Vec<String>> {
            let prefix = format!("{path}/");
            Ok(self
                .paths
                .iter()
                .filter_map(|p| p.strip_prefix(&prefix))
                .map(str::to_owned)
                .collect())
        }
        fn mkdir_all(&mut self, path: &str) -> io::Result<()> {
            self.ops.push(format!("mkdir {path}"));
            Ok(())
        }
        fn mount(&mut self, s: &MountSpec) -> io::Result<()> {
            self.ops.push(format!("mount {} {}", s.fstype, s.target));
            if s.target == "/proc" {
                self.paths.insert("/proc/self".into());
            }
            Ok(())
        }
        fn remount_root_rw(&mut self) -> io::Result<()> {
            self.ops.push("remount / rw".into());
            Ok(())
        }
        fn symlink(&mut self, target: &str, link: &str) -> io::Result<()> {
            self.ops.push(format!("ln {link} -> {target}"));
            Ok(())
        }
        fn write_file(&mut self, path: &str, contents: &str) -> io::Result<()> {
            self.ops.push(format!("write {path}: {contents:?}"));
            Ok(())
        }
        fn set_hostname(&mut self, name: &str) -> io::Result<()> {
            self.ops.push(format!("hostname {name}"));
            Ok(())
        }
        fn run(&mut self, argv: &[&str]) -> io::Result<ExitStatus> {
            self.ops.push(format!("run {}", argv.join(" ")));
            // A failing command must not stop the boot.
            Ok(ExitStatus::Code(if argv[0].ends_with("modprobe") {
                1
            } else {
                0
            }))
        }
    }

    const TOOLS: [&str; 4] = [
        "/usr/sbin/ip",
        "/usr/sbin/modprobe",
        "/usr/bin/ssh-keygen",
        "/usr/sbin/sshd",
    ];

    #[test]
    fn first_boot_from_a_bare_initramfs_handover() {
        let mut sys = Fake::default()
            .with(&TOOLS)
            .with(&["/sys/class/net/lo", "/sys/class/net/eth0"])
            .file(
                "/proc/self/mounts",
                "/dev/root / ext4 ro,relatime 0 0\nproc /proc proc rw 0 0\ndevtmpfs /dev devtmpfs rw 0 0\n",
            )
            .file(
                "/proc/cmdline",
                "console=ttyS0 root=/dev/vda ro banger.init=fast ip=172.16.0.2::172.16.0.1:255.255.255.252:vm-a::off banger.dns=10.0.0.53",
            );
        let cmdline = early_boot(&mut sys);
        prepare_sshd(&mut sys);
        assert_eq!(cmdline.get("banger.init"), Some("fast"));
        assert_eq!(
            sys.ops,
            vec![
                "mkdir /proc",
                "mount proc /proc",
                "remount / rw",
                "mkdir /sys",
                "mount sysfs /sys",
                "mkdir /dev/pts",
                "mount devpts /dev/pts",
                "mkdir /dev/shm",
                "mount tmpfs /dev/shm",
                "mkdir /run",
                "mount tmpfs /run",
                "mkdir /tmp",
                "mount tmpfs /tmp",
                "ln /dev/fd -> /proc/self/fd",
                "ln /dev/stdin -> /proc/self/fd/0",
                "ln /dev/stdout -> /proc/self/fd/1",
                "ln /dev/stderr -> /proc/self/fd/2",
                "run /usr/sbin/modprobe virtio_console",
                "hostname vm-a",
                "run /usr/sbin/ip link set lo up",
                "run /usr/sbin/ip addr replace 172.16.0.2/30 dev eth0",
                "run /usr/sbin/ip link set eth0 up",
                "run /usr/sbin/ip route replace default via 172.16.0.1 dev eth0",
                "write /etc/resolv.conf: \"nameserver 10.0.0.53\\n\"",
                "mkdir /run/sshd",
                "run /usr/bin/ssh-keygen -q -t ed25519 -N  -f /etc/ssh/ssh_host_ed25519_key",
            ]
        );
    }

    #[test]
    fn second_boot_only_does_what_is_missing() {
        let mounts = mount_specs()
            .iter()
            .map(|m| format!("{} {} {} rw 0 0\n", m.source, m.target, m.fstype))
            .collect::<String>();
        let mut sys = Fake::default()
            .with(&TOOLS)
            .with(&[
                "/proc/self",
                "/dev/fd",
                "/dev/stdin",
                "/dev/stdout",
                "/dev/stderr",
            ])
            .with(&["/sys/module/vmw_vsock_virtio_transport"])
            .with(&["/etc/ssh/ssh_host_ed25519_key"])
            .file(
                "/proc/self/mounts",
                &format!("/dev/vda / ext4 rw 0 0\n{mounts}"),
            )
            .file("/etc/hostname", "from-etc\n")
            .file(
                "/proc/cmdline",
                "banger.channel=vsock banger.modules=virtio-rng",
            );
        early_boot(&mut sys);
        prepare_sshd(&mut sys);
        assert_eq!(
            sys.ops,
            vec![
                "run /usr/sbin/modprobe virtio-rng",
                "hostname from-etc",
                "run /usr/sbin/ip link set lo up",
                "mkdir /run/sshd",
            ]
        );
    }

    #[test]
    fn bad_ip_and_missing_tools_are_logged_not_fatal() {
        let mut sys = Fake::default()
            .file("/proc/self/mounts", "")
            .with(&["/proc/self"])
            .file("/proc/cmdline", "ip=dhcp");
        early_boot(&mut sys);
        // No ip binary: mounts and links only.
        assert!(
            sys.ops.iter().all(|op| !op.starts_with("run")),
            "{:?}",
            sys.ops
        );
        assert!(sys.ops.contains(&"mount tmpfs /tmp".to_string()));
    }

    #[test]
    fn mounts_parsing() {
        let text = "rootfs / rootfs rw 0 0\n/dev/vda / ext4 ro,relatime 0 0\n/dev/vdb /mnt/my\\040disk ext4 rw 0 0\n";
        assert!(root_is_readonly(text));
        assert!(!root_is_readonly(
            "/dev/vda / ext4 rw,errors=remount-ro 0 0\n"
        ));
        assert!(!root_is_readonly(""));
        let t = mounted_targets(text);
        assert!(t.contains("/mnt/my disk") && t.contains("/"));
        assert_eq!(unescape_mount_path("a\\134b\\011"), "a\\b\t");
        assert_eq!(unescape_mount_path("trailing\\04"), "trailing\\04");
    }

    #[test]
    fn process_classification() {
        assert!(is_user_process(
            "42 (sshd) S 1 42 42 0 -1 4194560 100 0 0 0"
        ));
        assert!(!is_user_process(
            "2 (kthreadd) S 0 0 0 0 -1 2129984 0 0 0 0"
        ));
        assert!(!is_user_process(
            "77 (my (odd) name) Z 1 77 77 0 -1 4194316 0 0"
        ));
        assert!(is_user_process("78 (a) b) R 1 78 78 0 -1 4194304 0 0"));
        assert!(!is_user_process("garbage"));
    }
}
