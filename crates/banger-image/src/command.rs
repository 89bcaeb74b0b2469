//! Running the host tools a build needs (mmdebstrap, mkfs.ext4, rm), behind a
//! trait so the build's orchestration is tested without root or network.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A host command: program, arguments, and optionally a file its standard
/// output goes to (instead of being read as log lines).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostCommand {
    pub program: PathBuf,
    pub args: Vec<OsString>,
    pub stdout_to: Option<PathBuf>,
}

impl HostCommand {
    pub fn new(program: impl Into<PathBuf>) -> Self {
        HostCommand {
            program: program.into(),
            args: Vec::new(),
            stdout_to: None,
        }
    }

    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.args.push(arg.into());
        self
    }

    pub fn args<I: IntoIterator<Item = S>, S: Into<OsString>>(mut self, args: I) -> Self {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// The command as one line, for logs and errors.
    pub fn display(&self) -> String {
        let mut s = self.program.display().to_string();
        for arg in &self.args {
            s.push(' ');
            let arg = arg.to_string_lossy();
            if arg.contains(char::is_whitespace) || arg.is_empty() {
                s.push_str(&format!("{:?}", shorten(&arg)));
            } else {
                s.push_str(&arg);
            }
        }
        s
    }
}

fn shorten(s: &str) -> String {
    if s.chars().count() > 60 {
        format!("{}...", s.chars().take(57).collect::<String>())
    } else {
        s.to_owned()
    }
}

/// Why a command did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("cannot start {program}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{program} failed ({status})")]
    Failed { program: String, status: String },
    #[error("cancelled while running {program}")]
    Cancelled { program: String },
}

/// Runs host commands. The build calls only this for anything that needs
/// privileges or outside programs.
pub trait CommandRunner {
    /// Path of `name` if it is installed (searched like a shell, plus the
    /// sbin directories that a non-root PATH often lacks).
    fn find_program(&self, name: &str) -> Option<PathBuf>;

    /// Runs `cmd` to completion, passing each line it prints (stdout unless
    /// redirected, and stderr) to `on_line`.
    fn run(&mut self, cmd: &HostCommand, on_line: &mut dyn FnMut(&str))
    -> Result<(), CommandError>;

    /// Whether the build runs as root (bootstrap `--mode=root`) or must use
    /// a user namespace (`--mode=unshare`).
    fn is_root(&self) -> bool;
}

/// Runs commands for real, stopping them when `cancel` becomes true.
#[derive(Debug, Default, Clone)]
pub struct SystemRunner {
    pub cancel: Option<Arc<AtomicBool>>,
}

/// How long a cancelled command gets between SIGTERM and SIGKILL, so
/// mmdebstrap can unmount what it mounted in the tree.
const TERM_GRACE: Duration = Duration::from_secs(20);

impl SystemRunner {
    fn cancelled(&self) -> bool {
        self.cancel
            .as_ref()
            .is_some_and(|c| c.load(Ordering::Relaxed))
    }

    fn stop(child: &mut Child) {
        let pid = i32::try_from(child.id())
            .ok()
            .and_then(rustix::process::Pid::from_raw);
        if let Some(pid) = pid {
            // The child may have exited already; nothing to do then.
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            let deadline = Instant::now() + TERM_GRACE;
            while Instant::now() < deadline {
                if matches!(child.try_wait(), Ok(Some(_))) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

fn forward_lines<R: Read + Send + 'static>(reader: R, tx: mpsc::Sender<String>) {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(reader);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => return,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&buf);
                    if tx.send(line.trim_end().to_owned()).is_err() {
                        return;
                    }
                }
            }
        }
    });
}

impl CommandRunner for SystemRunner {
    fn find_program(&self, name: &str) -> Option<PathBuf> {
        let path = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&path)
            .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
            .map(|dir| dir.join(name))
            .find(|p| is_executable(p))
    }

    fn run(
        &mut self,
        cmd: &HostCommand,
        on_line: &mut dyn FnMut(&str),
    ) -> Result<(), CommandError> {
        let program = cmd.program.display().to_string();
        if self.cancelled() {
            return Err(CommandError::Cancelled { program });
        }
        let mut command = Command::new(&cmd.program);
        command
            .args(&cmd.args)
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            // Its own process group: a build tool that signals its group on
            // cleanup (or a terminal's Ctrl-C) must not reach the daemon.
            .process_group(0);
        match &cmd.stdout_to {
            Some(path) => {
                let file =
                    std::fs::OpenOptions::new()
                        .write(true)
                        .open(path)
                        .map_err(|source| CommandError::Spawn {
                            program: program.clone(),
                            source,
                        })?;
                command.stdout(file);
            }
            None => {
                command.stdout(Stdio::piped());
            }
        }
        let mut child = command.spawn().map_err(|source| CommandError::Spawn {
            program: program.clone(),
            source,
        })?;
        let (tx, rx) = mpsc::channel();
        if let Some(out) = child.stdout.take() {
            forward_lines(out, tx.clone());
        }
        if let Some(err) = child.stderr.take() {
            forward_lines(err, tx);
        } else {
            drop(tx);
        }
        loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(line) => on_line(&line),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
            if self.cancelled() {
                Self::stop(&mut child);
                return Err(CommandError::Cancelled { program });
            }
        }
        let status = loop {
            if let Some(status) = child.try_wait().map_err(|source| CommandError::Spawn {
                program: program.clone(),
                source,
            })? {
                break status;
            }
            if self.cancelled() {
                Self::stop(&mut child);
                return Err(CommandError::Cancelled { program });
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        if status.success() {
            Ok(())
        } else {
            Err(CommandError::Failed {
                program,
                status: status.to_string(),
            })
        }
    }

    fn is_root(&self) -> bool {
        rustix::process::geteuid().is_root()
    }
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_and_streams_both_output_streams() {
        let mut runner = SystemRunner::default();
        let cmd =
            HostCommand::new("sh").args(["-c", "echo out; echo err >&2; printf 'no newline'"]);
        let mut lines = Vec::new();
        runner.run(&cmd, &mut |l| lines.push(l.to_owned())).unwrap();
        lines.sort();
        assert_eq!(lines, ["err", "no newline", "out"]);
    }

    #[test]
    fn failure_and_missing_program_are_errors() {
        let mut runner = SystemRunner::default();
        let err = runner
            .run(&HostCommand::new("sh").args(["-c", "exit 3"]), &mut |_| {})
            .unwrap_err();
        assert!(
            matches!(&err, CommandError::Failed { status, .. } if status.contains('3')),
            "{err}"
        );
        assert!(matches!(
            runner.run(&HostCommand::new("/nonexistent/program"), &mut |_| {}),
            Err(CommandError::Spawn { .. })
        ));
    }

    #[test]
    fn stdout_can_go_to_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        std::fs::write(&out, b"").unwrap();
        let mut cmd = HostCommand::new("sh").args(["-c", "echo to-file; echo to-log >&2"]);
        cmd.stdout_to = Some(out.clone());
        let mut lines = Vec::new();
        SystemRunner::default()
            .run(&cmd, &mut |l| lines.push(l.to_owned()))
            .unwrap();
        assert_eq!(lines, ["to-log"]);
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "to-file\n");
    }

    #[test]
    fn cancel_stops_a_running_command() {
        let cancel = Arc::new(AtomicBool::new(false));
        let mut runner = SystemRunner {
            cancel: Some(cancel.clone()),
        };
        let flag = cancel.clone();
        let setter = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            flag.store(true, Ordering::Relaxed);
        });
        let started = Instant::now();
        let result = runner.run(&HostCommand::new("sleep").arg("30"), &mut |_| {});
        setter.join().unwrap();
        assert!(matches!(result, Err(CommandError::Cancelled { .. })));
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn finds_sh_and_not_nonsense() {
        let runner = SystemRunner::default();
        assert!(runner.find_program("sh").is_some());
        assert!(runner.find_program("no-such-program-banger").is_none());
    }

    #[test]
    fn display_quotes_arguments_with_spaces() {
        let cmd = HostCommand::new("/usr/bin/mmdebstrap")
            .args(["--variant=minbase", "deb http://x bookworm main"]);
        assert_eq!(
            cmd.display(),
            "/usr/bin/mmdebstrap --variant=minbase \"deb http://x bookworm main\""
        );
    }
}
