//! `banger-agent`: the guest side of banger.
//!
//! It serves the banger agent protocol (crate `banger-agent-proto`) on a
//! virtio-serial port, an AF_VSOCK port or a Unix socket, and with `--init`
//! it is the guest's PID 1: it mounts the API filesystems, configures the
//! network from the kernel command line, starts sshd, reaps orphans and
//! powers the VM off on request.
//!
//! It uses plain threads, not an async runtime: the binary ships in every
//! image, and as PID 1 it must own child reaping (see `reaper`).

/// Logs one line to stderr: the console under `--init`, the journal
/// under systemd. Never panics, even with stderr closed.
macro_rules! log {
    ($($arg:tt)*) => {
        $crate::log_line(format_args!($($arg)*))
    };
}

mod channel;
mod cmdline;
mod exec;
mod identity;
mod init;
mod keys;
mod reaper;
mod reseed;
mod session;
mod sysinfo;
mod vsock;
mod work;

use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc;

use banger_agent_proto::AgentMode;

use crate::channel::Listen;
use crate::reaper::Reaper;

const USAGE: &str = "\
usage: banger-agent [--init] [--listen SPEC]... [--authorized-keys PATH]
                    [--shutdown-action poweroff|exit]

  --listen SPEC   serial:PATH | vsock:PORT | unix:PATH | auto (default: auto,
                  which reads banger.channel= from /proc/cmdline)
  --init          run as the guest's PID 1
  --authorized-keys PATH
                  file `authorize_keys` manages (default /root/.ssh/authorized_keys)
  --shutdown-action poweroff|exit
                  what `shutdown` does outside --init: power the guest off
                  with systemctl (default) or just exit the agent
";

fn log_line(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "banger-agent: {args}");
}

/// What `shutdown` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownAction {
    /// Power the machine off (reboot(2) under `--init`, systemctl otherwise).
    PowerOff,
    /// Exit the agent process (tests, the Firecracker test double).
    Exit,
}

/// Parsed command line.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Args {
    init: bool,
    listen: Vec<Listen>,
    authorized_keys: PathBuf,
    shutdown: ShutdownAction,
}

enum Parsed {
    Run(Args),
    Help,
    Version,
}

fn parse_args(args: impl IntoIterator<Item = String>) -> Result<Parsed, String> {
    let mut out = Args {
        init: false,
        listen: Vec::new(),
        authorized_keys: PathBuf::from(keys::DEFAULT_PATH),
        shutdown: ShutdownAction::PowerOff,
    };
    let mut shutdown_given = false;
    let mut it = args.into_iter();
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_owned(), Some(v.to_owned())),
            _ => (arg.clone(), None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| it.next())
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        match flag.as_str() {
            "--init" => out.init = true,
            "--listen" => out.listen.push(value()?.parse()?),
            "--authorized-keys" => out.authorized_keys = PathBuf::from(value()?),
            "--shutdown-action" => {
                shutdown_given = true;
                out.shutdown = match value()?.as_str() {
                    "poweroff" => ShutdownAction::PowerOff,
                    "exit" => ShutdownAction::Exit,
                    other => return Err(format!("unknown shutdown action {other:?}")),
                }
            }
            "-h" | "--help" => return Ok(Parsed::Help),
            "-V" | "--version" => return Ok(Parsed::Version),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if out.listen.is_empty() {
        out.listen.push(Listen::Auto);
    }
    // Listening only on Unix sockets means running on a host (tests, the
    // Firecracker test double): a shutdown request must never power off the
    // machine there unless asked for explicitly.
    if !shutdown_given && !out.init && out.listen.iter().all(|l| matches!(l, Listen::Unix(_))) {
        out.shutdown = ShutdownAction::Exit;
    }
    Ok(Parsed::Run(out))
}

/// Requests to the main thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MainEvent {
    /// Power off (or exit, per [`ShutdownAction`]); the string says why.
    Shutdown(String),
}

/// State shared by every connection.
#[derive(Debug)]
pub struct AgentState {
    pub reaper: Arc<Reaper>,
    pub mode: AgentMode,
    pub shutdown: ShutdownAction,
    pub authorized_keys: PathBuf,
    pub boot_id: String,
    /// Environment every exec starts from.
    pub base_env: Vec<(OsString, OsString)>,
    pub events: mpsc::Sender<MainEvent>,
}

fn read_boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

fn main() {
    let parsed = parse_args(std::env::args().skip(1));
    // PID 1 must not exit on a bad command line: it falls back to defaults.
    let as_pid1 = std::process::id() == 1;
    let args = match parsed {
        Ok(Parsed::Run(args)) => args,
        Ok(Parsed::Help) => {
            print!("{USAGE}");
            return;
        }
        Ok(Parsed::Version) => {
            println!("banger-agent {}", env!("CARGO_PKG_VERSION"));
            return;
        }
        Err(e) if as_pid1 => {
            log!("{e}; running as init with defaults");
            Args {
                init: true,
                listen: vec![Listen::Auto],
                authorized_keys: PathBuf::from(keys::DEFAULT_PATH),
                shutdown: ShutdownAction::PowerOff,
            }
        }
        Err(e) => {
            eprint!("banger-agent: {e}\n{USAGE}");
            std::process::exit(2);
        }
    };
    if args.init {
        init::run(args.listen, args.authorized_keys)
    } else {
        std::process::exit(service_main(args))
    }
}

/// The agent's own environment, plus the `--init` defaults for what it
/// lacks: systemd starts services without HOME, USER or SHELL.
fn service_env(mut env: Vec<(OsString, OsString)>) -> Vec<(OsString, OsString)> {
    for (key, value) in init::init_env() {
        if !env.iter().any(|(k, _)| *k == key) {
            env.push((key, value));
        }
    }
    env
}

/// The agent as a service or a plain process: serve until asked to stop.
fn service_main(args: Args) -> i32 {
    let (events, rx) = mpsc::channel();
    let ctx = Arc::new(AgentState {
        reaper: Reaper::new(),
        mode: AgentMode::Service,
        shutdown: args.shutdown,
        authorized_keys: args.authorized_keys,
        boot_id: read_boot_id(),
        base_env: service_env(std::env::vars_os().collect()),
        events,
    });
    let cmdline = cmdline::KernelCmdline::read();
    // In a guest (an agent that powers the machine off), before serving:
    // "agent ready" then means the work disk has its full size.
    if ctx.shutdown == ShutdownAction::PowerOff {
        work::grow_home_logged();
    }
    for listen in args.listen {
        let listen = listen.resolve(&cmdline);
        // Bind Unix and vsock listeners before announcing readiness, so
        // a failure is an exit code and not a log line.
        let bound = match channel::Listener::bind(&listen) {
            Ok(bound) => bound,
            Err(e) => {
                log!("cannot listen on {listen}: {e}");
                return 1;
            }
        };
        log!("listening on {listen}");
        let ctx = ctx.clone();
        channel::spawn_named("listener", move || {
            channel::serve_forever(&ctx, &listen, Some(bound))
        });
    }
    match rx.recv() {
        Ok(MainEvent::Shutdown(why)) => {
            log!("shutdown requested ({why})");
            if ctx.shutdown == ShutdownAction::Exit {
                return 0;
            }
            init::service_poweroff(&ctx.reaper);
            0
        }
        Err(_) => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> Result<Args, String> {
        match parse_args(args.iter().map(|s| s.to_string()))? {
            Parsed::Run(a) => Ok(a),
            _ => Err("not a run".into()),
        }
    }

    #[test]
    fn service_env_fills_gaps_only() {
        let env = service_env(vec![("PATH".into(), "/x".into()), ("A".into(), "1".into())]);
        let get = |k: &str| env.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone());
        assert_eq!(get("PATH"), Some("/x".into()));
        assert_eq!(get("HOME"), Some("/root".into()));
        assert_eq!(env.iter().filter(|(k, _)| k == "PATH").count(), 1);
    }

    #[test]
    fn args() {
        let a = run(&["--listen", "unix:/tmp/a.sock", "--listen=vsock:5"]).unwrap();
        assert_eq!(
            a.listen,
            vec![Listen::Unix("/tmp/a.sock".into()), Listen::Vsock(5)]
        );
        assert!(!a.init);
        assert_eq!(a.shutdown, ShutdownAction::PowerOff);
        let host = run(&["--listen", "unix:/tmp/a.sock"]).unwrap();
        assert_eq!(
            host.shutdown,
            ShutdownAction::Exit,
            "a host-process agent never powers off by default"
        );
        let guest = run(&["--listen", "serial:/dev/vport0p1"]).unwrap();
        assert_eq!(guest.shutdown, ShutdownAction::PowerOff);
        let a = run(&["--init", "--shutdown-action", "exit"]).unwrap();
        assert!(a.init);
        assert_eq!(a.listen, vec![Listen::Auto]);
        assert_eq!(a.shutdown, ShutdownAction::Exit);
        assert!(run(&["--listen"]).is_err());
        assert!(run(&["--listen", "tcp:1"]).is_err());
        assert!(run(&["--bogus"]).is_err());
        assert!(matches!(
            parse_args(["--version".to_string()]),
            Ok(Parsed::Version)
        ));
    }
}
