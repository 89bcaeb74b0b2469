//! Processes started by `exec`.
//!
//! Each exec has up to four threads: one per output pipe, one feeding
//! stdin, and a waiter that gets the exit status from the reaper. Output
//! pumps read only as much as the host's credit allows, so a slow host
//! stalls the process on a full pipe instead of filling the agent's memory.
//!
//! When the process exits, the waiter closes a notification pipe; the
//! pumps then read what is left in their pipes without blocking and stop,
//! even if a background grandchild still holds the write end. Only then
//! does the `Exit` frame go out, after all output.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use banger_agent_proto::frame::{FrameKind, encode_frame, encode_window};
use banger_agent_proto::{
    ExecRequest, ExecStarted, ExitStatus, INITIAL_WINDOW, MAX_DATA_CHUNK, RemoteError,
    RemoteErrorCode, TtySize,
};
use rustix::event::{PollFd, PollFlags, poll};
use rustix::io::Errno;
use rustix::process::{Pid, Signal};

use crate::reaper::lock;
use crate::session::Session;

/// `PATH` when neither the agent nor the request sets one.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

#[derive(Debug, Default)]
struct State {
    /// Output bytes the host will still accept.
    out_credit: u64,
    /// The host abandoned the exec or the session ended.
    cancelled: bool,
    exited: bool,
    stdin: VecDeque<Vec<u8>>,
    /// Stdin bytes received and not yet credited back.
    stdin_outstanding: u64,
    stdin_closed: bool,
}

/// A running exec.
#[derive(Debug)]
pub struct Exec {
    stream: u32,
    pid: Pid,
    /// The terminal's master side, for an exec started with `tty`.
    pty: Option<OwnedFd>,
    state: Mutex<State>,
    cv: Condvar,
}

impl Exec {
    fn take_credit(&self, max: usize) -> Option<usize> {
        let mut st = lock(&self.state);
        loop {
            if st.cancelled {
                return None;
            }
            if st.out_credit > 0 {
                let n = st.out_credit.min(max as u64);
                st.out_credit -= n;
                return Some(n as usize);
            }
            st = self
                .cv
                .wait(st)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }

    fn refund(&self, n: usize) {
        if n > 0 {
            lock(&self.state).out_credit += n as u64;
            self.cv.notify_all();
        }
    }

    /// The host consumed `n` output bytes.
    pub fn add_credit(&self, n: u32) {
        self.refund(n as usize);
    }

    /// Queues stdin data; fails if the host ignores its credit.
    pub fn push_stdin(&self, data: Vec<u8>) -> Result<(), String> {
        let mut st = lock(&self.state);
        if st.exited || st.cancelled || st.stdin_closed {
            return Ok(());
        }
        st.stdin_outstanding += data.len() as u64;
        if st.stdin_outstanding > u64::from(INITIAL_WINDOW) {
            return Err(format!(
                "stdin overran its window ({} bytes outstanding)",
                st.stdin_outstanding
            ));
        }
        st.stdin.push_back(data);
        self.cv.notify_all();
        Ok(())
    }

    pub fn close_stdin(&self) {
        lock(&self.state).stdin_closed = true;
        self.cv.notify_all();
    }

    fn kill(&self, signal: Signal) {
        // The process group (the process and what it started); the process
        // alone only if it left its group. Never both: a program may treat
        // a second SIGINT as "force quit".
        let result = match rustix::process::kill_process_group(self.pid, signal) {
            Err(Errno::SRCH) => rustix::process::kill_process(self.pid, signal),
            other => other,
        };
        match result {
            Ok(()) | Err(Errno::SRCH) => {}
            Err(e) => log!("kill {} {signal:?}: {e}", self.pid.as_raw_nonzero()),
        }
    }

    /// Delivers a signal to the exec's process group.
    pub fn signal(&self, signal: i32) {
        let st = lock(&self.state);
        if st.exited {
            return;
        }
        match Signal::from_named_raw(signal) {
            Some(sig) => self.kill(sig),
            None => log!("ignoring unknown signal {signal}"),
        }
    }

    /// Sets the size of the exec's terminal (the kernel tells its
    /// foreground process group with SIGWINCH).
    pub fn resize(&self, size: TtySize) {
        let Some(pty) = &self.pty else {
            log!("resize of stream {} that has no terminal", self.stream);
            return;
        };
        if let Err(e) = rustix::termios::tcsetwinsize(pty, winsize(size)) {
            log!("resize of stream {}: {e}", self.stream);
        }
    }

    /// Kills the process and stops forwarding its output.
    pub fn cancel(&self) {
        let mut st = lock(&self.state);
        if st.cancelled {
            return;
        }
        st.cancelled = true;
        if !st.exited {
            self.kill(Signal::KILL);
        }
        drop(st);
        self.cv.notify_all();
    }
}

fn env_lookup<'a>(env: &'a [(OsString, OsString)], key: &str) -> Option<&'a OsString> {
    env.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v)
}

fn is_executable(path: &Path) -> bool {
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Resolves `program` against `path` like a shell (names with a slash are
/// taken as they are).
pub fn find_in_path(program: &str, path: &str) -> Option<PathBuf> {
    if program.contains('/') {
        return Some(PathBuf::from(program));
    }
    path.split(':')
        .filter(|dir| !dir.is_empty())
        .map(|dir| Path::new(dir).join(program))
        .find(|candidate| is_executable(candidate))
}

fn spawn_thread(name: &str, f: impl FnOnce() + Send + 'static) -> Option<JoinHandle<()>> {
    match std::thread::Builder::new()
        .name(name.into())
        .stack_size(128 * 1024)
        .spawn(f)
    {
        Ok(handle) => Some(handle),
        Err(e) => {
            log!("cannot start thread {name}: {e}");
            None
        }
    }
}

fn winsize(size: TtySize) -> rustix::termios::Winsize {
    rustix::termios::Winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

/// A new pseudo-terminal of `size`: its master and its slave side.
fn open_pty(size: TtySize) -> Result<(OwnedFd, OwnedFd), Errno> {
    use rustix::fs::{Mode, OFlags};
    use rustix::pty::OpenptFlags;
    let master =
        rustix::pty::openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC)?;
    rustix::pty::grantpt(&master)?;
    rustix::pty::unlockpt(&master)?;
    let name = rustix::pty::ptsname(&master, Vec::new())?;
    let slave = rustix::fs::open(
        name.as_c_str(),
        OFlags::RDWR | OFlags::NOCTTY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    rustix::termios::tcsetwinsize(&master, winsize(size))?;
    Ok((master, slave))
}

/// Make the child a session leader with the terminal on its stdin as its
/// controlling terminal (what a login on a terminal gets).
#[allow(unsafe_code)]
fn controlling_terminal(cmd: &mut Command) {
    // SAFETY: the closure runs in the forked child before exec and calls
    // only setsid(2) and ioctl(2), which are async-signal-safe; it touches
    // no lock or allocation of the parent.
    unsafe {
        cmd.pre_exec(|| {
            rustix::process::setsid()?;
            rustix::process::ioctl_tiocsctty(rustix::stdio::stdin())?;
            Ok(())
        });
    }
}

/// Starts an exec and answers the request on `stream`.
pub fn start(session: &Arc<Session>, stream: u32, req: ExecRequest) {
    if let Err(e) = try_start(session, stream, req) {
        session.respond::<()>(stream, Err(e));
    }
}

fn try_start(session: &Arc<Session>, stream: u32, req: ExecRequest) -> Result<(), RemoteError> {
    let bad = |msg: String| RemoteError::new(RemoteErrorCode::BadRequest, msg);
    let argv0 = req
        .argv
        .first()
        .ok_or_else(|| bad("argv is empty".into()))?;
    if let Some(cwd) = &req.cwd
        && !Path::new(cwd).is_dir()
    {
        return Err(bad(format!("cwd {cwd} is not a directory")));
    }
    let mut env = session.ctx.base_env.clone();
    env.extend(req.env.iter().map(|(k, v)| (k.into(), v.into())));
    let path_var = env_lookup(&env, "PATH")
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_else(|| DEFAULT_PATH.to_owned());
    let program = find_in_path(argv0, &path_var).ok_or_else(|| {
        RemoteError::new(
            RemoteErrorCode::NotFound,
            format!("{argv0}: command not found"),
        )
    })?;
    let internal =
        |what: &str, e: Errno| RemoteError::new(RemoteErrorCode::Internal, format!("{what}: {e}"));
    // Closed by the waiter when the process exits.
    let (exit_rd, exit_wr) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
        .map_err(|e| internal("pipe", e))?;

    let mut cmd = Command::new(&program);
    cmd.arg0(argv0).args(&req.argv[1..]).env_clear().envs(env);
    // With a terminal: the child on its slave side (its own session, so
    // its own process group too); the master carries stdin and output.
    let mut pty = None;
    if let Some(size) = req.tty {
        let (master, slave) = open_pty(size).map_err(|e| internal("openpty", e))?;
        let dup = |fd: &OwnedFd| {
            fd.try_clone()
                .map_err(|e| internal("dup", Errno::from_io_error(&e).unwrap_or(Errno::IO)))
        };
        cmd.stdin(Stdio::from(dup(&slave)?))
            .stdout(Stdio::from(dup(&slave)?))
            .stderr(Stdio::from(slave));
        controlling_terminal(&mut cmd);
        pty = Some(master);
    } else {
        cmd.stdin(if req.stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    }
    if let Some(cwd) = &req.cwd {
        cmd.current_dir(cwd);
    }
    let (mut child, exit_rx) = session.ctx.reaper.spawn(&mut cmd).map_err(|e| {
        // As a shell tells them apart (exit 127 and 126): a program that is
        // not there, and one that is but cannot be run.
        let (code, why) = match e.kind() {
            std::io::ErrorKind::NotFound if std::fs::symlink_metadata(&program).is_err() => {
                (RemoteErrorCode::NotFound, e.to_string())
            }
            std::io::ErrorKind::NotFound => (
                RemoteErrorCode::NotExecutable,
                "the interpreter its #! line names does not exist".to_owned(),
            ),
            std::io::ErrorKind::PermissionDenied => (RemoteErrorCode::NotExecutable, e.to_string()),
            _ if e.raw_os_error() == Some(Errno::NOEXEC.raw_os_error()) => {
                (RemoteErrorCode::NotExecutable, e.to_string())
            }
            _ => (RemoteErrorCode::SpawnFailed, e.to_string()),
        };
        RemoteError::new(code, format!("{argv0}: {why}"))
    })?;
    let pid = Pid::from_raw(child.id() as i32).expect("a child's pid is positive");
    // The master's copies: one for output, one for stdin, one for resizes.
    let pty_io = match &pty {
        Some(master) => {
            let dup = || master.try_clone().ok();
            Some((dup(), dup()))
        }
        None => None,
    };
    drop(cmd);
    let exec = Arc::new(Exec {
        stream,
        pid,
        pty,
        // No credit until the response is queued: output must follow it.
        state: Mutex::new(State::default()),
        cv: Condvar::new(),
    });
    session.add_exec(stream, exec.clone());

    let mut pumps = Vec::new();
    let (pty_out, pty_in) = pty_io.unwrap_or((None, None));
    let outputs = [
        (
            child.stdout.take().map(OwnedFd::from).or(pty_out),
            FrameKind::Stdout,
        ),
        (child.stderr.take().map(OwnedFd::from), FrameKind::Stderr),
    ];
    for (fd, kind) in outputs {
        let (Some(fd), Ok(notify)) = (fd, exit_rd.try_clone()) else {
            continue;
        };
        let (exec, session) = (exec.clone(), session.clone());
        pumps.extend(spawn_thread("exec-out", move || {
            pump_output(&exec, &session, &fd, &notify, kind);
        }));
    }
    if let (Some(stdin), Ok(notify)) = (
        child.stdin.take().map(OwnedFd::from).or(pty_in),
        exit_rd.try_clone(),
    ) {
        let (exec, session) = (exec.clone(), session.clone());
        // Not joined: it ends on its own once the process has exited.
        spawn_thread("exec-in", move || {
            pump_stdin(&exec, &session, &stdin, &notify)
        });
    }
    drop(exit_rd);
    let waiter = {
        let (exec, session) = (exec.clone(), session.clone());
        spawn_thread("exec-wait", move || {
            wait_exit(&exec, &session, exit_rx, exit_wr, pumps)
        })
    };
    if waiter.is_none() {
        session.remove_exec(stream);
        exec.cancel();
        return Err(RemoteError::new(
            RemoteErrorCode::Internal,
            "cannot start the exec's waiter thread",
        ));
    }
    session.respond(stream, Ok(ExecStarted { pid: child.id() }));
    exec.add_credit(INITIAL_WINDOW);
    Ok(())
}

fn wait_exit(
    exec: &Exec,
    session: &Session,
    exit_rx: Receiver<ExitStatus>,
    exit_wr: OwnedFd,
    pumps: Vec<JoinHandle<()>>,
) {
    let status = exit_rx.recv().unwrap_or(ExitStatus::Code(-1));
    lock(&exec.state).exited = true;
    exec.cv.notify_all();
    drop(exit_wr);
    for pump in pumps {
        let _ = pump.join();
    }
    session.send_json(exec.stream, FrameKind::Exit, &status);
    session.remove_exec(exec.stream);
}

fn pump_output(exec: &Exec, session: &Session, fd: &OwnedFd, exited: &OwnedFd, kind: FrameKind) {
    let mut buf = vec![0u8; MAX_DATA_CHUNK];
    let mut draining = false;
    loop {
        if !draining {
            let mut fds = [
                PollFd::new(fd, PollFlags::IN),
                PollFd::new(exited, PollFlags::IN),
            ];
            match poll(&mut fds, None) {
                Ok(_) => {}
                Err(Errno::INTR) => continue,
                Err(e) => {
                    log!("poll: {e}");
                    return;
                }
            }
            if !fds[1].revents().is_empty() {
                // The process is gone: take what is buffered, then stop.
                draining = true;
                if let Err(e) = rustix::io::ioctl_fionbio(fd, true) {
                    log!("cannot make an output pipe non-blocking: {e}");
                    return;
                }
            } else if fds[0].revents().is_empty() {
                continue;
            }
        }
        let Some(want) = exec.take_credit(buf.len()) else {
            return;
        };
        match rustix::io::read(fd, &mut buf[..want]) {
            Ok(0) => return exec.refund(want),
            Ok(n) => {
                exec.refund(want - n);
                let frame =
                    encode_frame(exec.stream, kind, &buf[..n]).expect("chunk within limits");
                if session.send(frame).is_err() {
                    return;
                }
            }
            Err(Errno::INTR) => exec.refund(want),
            // EIO: a terminal whose every slave side is closed.
            Err(Errno::AGAIN | Errno::IO) => return exec.refund(want),
            Err(e) => {
                log!("read from the process: {e}");
                return exec.refund(want);
            }
        }
    }
}

enum Fed {
    All,
    /// The process closed its stdin: the rest is discarded.
    Broken,
    /// The process exited.
    Exited,
}

fn write_stdin(fd: &OwnedFd, exited: &OwnedFd, mut data: &[u8]) -> Fed {
    while !data.is_empty() {
        match rustix::io::write(fd, data) {
            Ok(n) => data = &data[n..],
            Err(Errno::AGAIN) => {
                let mut fds = [
                    PollFd::new(fd, PollFlags::OUT),
                    PollFd::new(exited, PollFlags::IN),
                ];
                match poll(&mut fds, None) {
                    Ok(_) if !fds[1].revents().is_empty() => return Fed::Exited,
                    Ok(_) | Err(Errno::INTR) => {}
                    Err(_) => return Fed::Broken,
                }
            }
            Err(Errno::INTR) => {}
            Err(_) => return Fed::Broken,
        }
    }
    Fed::All
}

fn pump_stdin(exec: &Exec, session: &Session, fd: &OwnedFd, exited: &OwnedFd) {
    if let Err(e) = rustix::io::ioctl_fionbio(fd, true) {
        log!("cannot make the stdin pipe non-blocking: {e}");
    }
    let mut broken = false;
    loop {
        let chunk = {
            let mut st = lock(&exec.state);
            loop {
                if st.exited || st.cancelled {
                    return;
                }
                if let Some(chunk) = st.stdin.pop_front() {
                    break chunk;
                }
                if st.stdin_closed {
                    // Returning drops the pipe: the process reads EOF.
                    return;
                }
                st = exec
                    .cv
                    .wait(st)
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
            }
        };
        if !broken {
            match write_stdin(fd, exited, &chunk) {
                Fed::All => {}
                Fed::Broken => broken = true,
                Fed::Exited => return,
            }
        }
        lock(&exec.state).stdin_outstanding -= chunk.len() as u64;
        // At most MAX_DATA_CHUNK bytes: fits a u32.
        if session
            .send(encode_window(exec.stream, chunk.len() as u32))
            .is_err()
        {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_lookup() {
        assert_eq!(
            find_in_path("sh", "/nonexistent:/bin:/usr/bin").map(|p| is_executable(&p)),
            Some(true)
        );
        assert_eq!(find_in_path("no-such-program-xyz", DEFAULT_PATH), None);
        assert_eq!(find_in_path("./rel/x", ""), Some(PathBuf::from("./rel/x")));
        // A directory named like a program is not a program.
        assert_eq!(find_in_path("tmp", "/"), None);
    }

    #[test]
    fn env_lookup_takes_the_last_value() {
        let env = vec![
            (OsString::from("PATH"), OsString::from("/a")),
            (OsString::from("X"), OsString::from("1")),
            (OsString::from("PATH"), OsString::from("/b")),
        ];
        assert_eq!(env_lookup(&env, "PATH"), Some(&OsString::from("/b")));
        assert_eq!(env_lookup(&env, "HOME"), None);
    }
}
