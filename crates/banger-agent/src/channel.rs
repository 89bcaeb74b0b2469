//! Where the agent listens: a virtio-serial port, AF_VSOCK or a Unix socket.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use banger_agent_proto::guest::{SERIAL_PORT_NAME, SERIAL_PORT_PATH};

use crate::AgentState;
use crate::cmdline::{ChannelKind, KernelCmdline};
use crate::session;

/// A `--listen` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    Serial(PathBuf),
    Vsock(u32),
    Unix(PathBuf),
    /// `banger.channel=` from the kernel command line.
    Auto,
}

impl FromStr for Listen {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s == "auto" {
            return Ok(Self::Auto);
        }
        let (scheme, rest) = s.split_once(':').ok_or_else(|| {
            format!("bad listen spec {s:?}: want serial:PATH, vsock:PORT, unix:PATH or auto")
        })?;
        match scheme {
            "serial" if !rest.is_empty() => Ok(Self::Serial(rest.into())),
            "unix" if !rest.is_empty() => Ok(Self::Unix(rest.into())),
            "vsock" => rest
                .parse()
                .map(Self::Vsock)
                .map_err(|_| format!("bad vsock port {rest:?}")),
            _ => Err(format!(
                "bad listen spec {s:?}: want serial:PATH, vsock:PORT, unix:PATH or auto"
            )),
        }
    }
}

impl fmt::Display for Listen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Serial(p) => write!(f, "serial:{}", p.display()),
            Self::Vsock(port) => write!(f, "vsock:{port}"),
            Self::Unix(p) => write!(f, "unix:{}", p.display()),
            Self::Auto => f.write_str("auto"),
        }
    }
}

impl Listen {
    /// Replaces `Auto` with the channel the kernel command line names.
    pub fn resolve(self, cmdline: &KernelCmdline) -> Self {
        match self {
            Self::Auto => match cmdline.channel() {
                ChannelKind::Serial => Self::Serial(SERIAL_PORT_PATH.into()),
                ChannelKind::Vsock(port) => Self::Vsock(port),
            },
            other => other,
        }
    }
}

/// A listener ready to serve.
#[derive(Debug)]
pub enum Listener {
    /// The serial port is opened (and re-opened) by `serve` itself: it may
    /// not exist yet when the agent starts.
    Serial(PathBuf),
    Vsock(std::os::fd::OwnedFd),
    Unix(UnixListener),
}

/// Spawns a detached thread with a small stack.
pub fn spawn_named(name: &str, f: impl FnOnce() + Send + 'static) {
    if let Err(e) = std::thread::Builder::new()
        .name(name.into())
        .stack_size(256 * 1024)
        .spawn(f)
    {
        log!("cannot start thread {name}: {e}");
    }
}

impl Listener {
    pub fn bind(listen: &Listen) -> io::Result<Self> {
        match listen {
            Listen::Serial(path) => Ok(Self::Serial(path.clone())),
            Listen::Vsock(port) => crate::vsock::listen(*port).map(Self::Vsock),
            Listen::Unix(path) => {
                // A socket left by an earlier run blocks bind(2).
                if let Ok(meta) = std::fs::symlink_metadata(path)
                    && meta.file_type().is_socket()
                {
                    std::fs::remove_file(path)?;
                }
                // Bound and listening under a temporary name, then renamed:
                // once the path exists, connecting to it succeeds.
                let mut tmp = path.as_os_str().to_owned();
                tmp.push(format!(".{}.tmp", std::process::id()));
                let _ = std::fs::remove_file(&tmp);
                let listener = UnixListener::bind(&tmp)?;
                std::fs::rename(&tmp, path)?;
                Ok(Self::Unix(listener))
            }
            Listen::Auto => Err(io::Error::other("unresolved auto listener")),
        }
    }

    /// Serves connections; returns only by panicking.
    pub fn serve(self, ctx: Arc<AgentState>) {
        match self {
            Self::Serial(path) => serve_serial(&ctx, &path),
            Self::Unix(listener) => loop {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let ctx = ctx.clone();
                        spawn_named("conn", move || match stream.try_clone() {
                            Ok(writer) => {
                                let _ = session::serve(ctx, stream, writer, false);
                            }
                            Err(e) => log!("cannot clone a connection: {e}"),
                        });
                    }
                    Err(e) => {
                        log!("accept failed: {e}");
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            },
            Self::Vsock(fd) => loop {
                match crate::vsock::accept(&fd) {
                    Ok(conn) => {
                        let ctx = ctx.clone();
                        let conn = File::from(conn);
                        spawn_named("conn", move || match conn.try_clone() {
                            Ok(writer) => {
                                let _ = session::serve(ctx, conn, writer, false);
                            }
                            Err(e) => log!("cannot clone a connection: {e}"),
                        });
                    }
                    Err(e) => {
                        log!("vsock accept failed: {e}");
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            },
        }
    }
}

/// Serves `listen` for the life of the process. Binds it unless `bound`
/// already is, retrying while binding fails (a vsock transport module
/// still loading, say). A panic in the serving code (a bug) is logged and
/// the listener bound again: the agent must not go deaf.
pub fn serve_forever(ctx: &Arc<AgentState>, listen: &Listen, mut bound: Option<Listener>) -> ! {
    let mut logged = false;
    loop {
        let listener = match bound.take() {
            Some(listener) => listener,
            None => match Listener::bind(listen) {
                Ok(listener) => {
                    log!("listening on {listen}");
                    logged = false;
                    listener
                }
                Err(e) => {
                    if !logged {
                        log!("cannot listen on {listen} yet: {e}");
                        logged = true;
                    }
                    std::thread::sleep(Duration::from_secs(1));
                    continue;
                }
            },
        };
        let ctx = ctx.clone();
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| listener.serve(ctx))).is_err() {
            log!("serving {listen} panicked; starting over");
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// `/dev/<vportNpM>` of the virtio port called `name`, from sysfs.
pub fn find_virtio_port(sys_class: &Path, name: &str) -> Option<PathBuf> {
    let mut entries: Vec<_> = std::fs::read_dir(sys_class)
        .ok()?
        .filter_map(Result::ok)
        .collect();
    entries.sort_by_key(|e| e.file_name());
    entries.into_iter().find_map(|entry| {
        let port_name = std::fs::read_to_string(entry.path().join("name")).ok()?;
        (port_name.trim() == name).then(|| Path::new("/dev").join(entry.file_name()))
    })
}

/// The device to open for `path`: itself when present, else (udev-less
/// guests) the port with the same name found through sysfs.
fn serial_device(path: &Path) -> Option<PathBuf> {
    if path.exists() {
        return Some(path.to_owned());
    }
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or(SERIAL_PORT_NAME);
    find_virtio_port(Path::new("/sys/class/virtio-ports"), name).filter(|p| p.exists())
}

/// Opens the port and serves it, re-opening after errors, forever.
///
/// A virtio-serial read returns EOF whenever the host side is not
/// connected; `session::serve` treats that as the end of a session and
/// keeps reading the same descriptor, so nothing the next host writes is
/// lost to a closed port.
fn serve_serial(ctx: &Arc<AgentState>, path: &Path) {
    let mut announced_wait = false;
    loop {
        let Some(device) = serial_device(path) else {
            if !announced_wait {
                log!("waiting for {}", path.display());
                announced_wait = true;
            }
            std::thread::sleep(Duration::from_millis(200));
            continue;
        };
        let opened = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&device)
            .and_then(|f| Ok((f.try_clone()?, f)));
        match opened {
            Ok((reader, writer)) => {
                log!("serving {}", device.display());
                announced_wait = false;
                if let Err(e) = session::serve(ctx.clone(), reader, writer, true) {
                    log!("{}: {e}; reopening", device.display());
                }
            }
            // EBUSY while an old descriptor is still held by a writer.
            Err(e) => log!("cannot open {}: {e}", device.display()),
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_specs() {
        assert_eq!("auto".parse(), Ok(Listen::Auto));
        assert_eq!("vsock:1024".parse(), Ok(Listen::Vsock(1024)));
        assert_eq!(
            "unix:/run/a.sock".parse(),
            Ok(Listen::Unix("/run/a.sock".into()))
        );
        assert_eq!(
            "serial:/dev/vport0p1".parse(),
            Ok(Listen::Serial("/dev/vport0p1".into()))
        );
        for bad in ["", "vsock:x", "unix:", "tcp:80", "serial"] {
            assert!(bad.parse::<Listen>().is_err(), "{bad}");
        }
        let l: Listen = "vsock:9".parse().unwrap();
        assert_eq!(l.to_string(), "vsock:9");
    }

    #[test]
    fn auto_follows_cmdline() {
        let serial = Listen::Auto.resolve(&KernelCmdline::parse("quiet"));
        assert_eq!(serial, Listen::Serial(SERIAL_PORT_PATH.into()));
        let vsock = Listen::Auto.resolve(&KernelCmdline::parse("banger.channel=vsock"));
        assert_eq!(vsock, Listen::Vsock(1024));
        let explicit = Listen::Vsock(7).resolve(&KernelCmdline::parse("banger.channel=serial"));
        assert_eq!(explicit, Listen::Vsock(7));
    }

    #[test]
    fn virtio_port_lookup_in_sysfs() {
        let dir = tempfile::tempdir().unwrap();
        for (port, name) in [("vport0p0", "other"), ("vport0p1", SERIAL_PORT_NAME)] {
            std::fs::create_dir(dir.path().join(port)).unwrap();
            std::fs::write(dir.path().join(port).join("name"), format!("{name}\n")).unwrap();
        }
        std::fs::create_dir(dir.path().join("vport0p2")).unwrap(); // no name file
        assert_eq!(
            find_virtio_port(dir.path(), SERIAL_PORT_NAME),
            Some(PathBuf::from("/dev/vport0p1"))
        );
        assert_eq!(find_virtio_port(dir.path(), "absent"), None);
    }
}
