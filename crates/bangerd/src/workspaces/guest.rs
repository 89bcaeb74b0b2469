//! Running the guest's side of a workspace operation: one `sh -c` script
//! through the agent, its stdin fed from a stream, its stdout kept in
//! memory (small answers) or written to a host file (patches, bundles).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use banger_agent_proto::{AgentClient, ExecEvent, ExecRequest, ExitStatus};
use tokio::sync::mpsc;

use super::WorkspaceError;

/// Most stdout kept in memory; more is an error (a script's answer is
/// small: patches and bundles go to a file).
const MEMORY_CAP: usize = 4 << 20;
/// Most stderr kept for the error message.
const STDERR_TAIL: usize = 4096;

/// Where a guest script's stdout goes.
pub(super) enum Out<'a> {
    Memory,
    /// Created (0600) and written as it arrives.
    File(&'a Path),
    /// Sent on as it arrives, while the receiver lasts (then dropped);
    /// the sender is dropped when the script is done.
    Stream(std::sync::mpsc::Sender<Vec<u8>>),
}

pub(super) struct Ran {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stdout_bytes: u64,
    pub stderr: String,
}

impl Ran {
    pub fn ok(&self) -> bool {
        self.status == ExitStatus::Code(0)
    }

    /// The failure, as the script explained it on stderr. Exit 3 is the
    /// scripts' "the request is wrong" (no such workspace, no git).
    pub fn failure(&self, what: &str) -> WorkspaceError {
        let why = self.stderr.trim();
        if self.status == ExitStatus::Code(3) && !why.is_empty() {
            return WorkspaceError::Invalid(why.to_owned());
        }
        let status = match self.status {
            ExitStatus::Code(c) => format!("exit {c}"),
            ExitStatus::Signal(s) => format!("signal {s}"),
        };
        WorkspaceError::Guest(if why.is_empty() {
            format!("{what} failed in the guest ({status})")
        } else {
            format!("{what} failed in the guest: {why}")
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

/// A task aborted when its handle is dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Run `script` (POSIX sh, `$1`... from `args`) in the guest with `env`.
/// With `stdin`, its chunks are the script's stdin, closed when the
/// sender is dropped.
pub(super) async fn run(
    agent: &AgentClient,
    script: &str,
    args: &[&str],
    env: BTreeMap<String, String>,
    stdin: Option<mpsc::Receiver<Vec<u8>>>,
    out: Out<'_>,
) -> Result<Ran, WorkspaceError> {
    let mut argv = vec![
        "sh".to_owned(),
        "-c".to_owned(),
        script.to_owned(),
        "sh".to_owned(),
    ];
    argv.extend(args.iter().map(|a| (*a).to_owned()));
    let mut req = ExecRequest::new(argv);
    req.env = env;
    req.stdin = stdin.is_some();
    // Only the start has a deadline: the script runs as long as it needs.
    let timeout = crate::vms::AGENT_CALL_TIMEOUT;
    let mut session = tokio::time::timeout(timeout, agent.exec(req))
        .await
        .map_err(|_| {
            WorkspaceError::Guest(format!(
                "the guest agent did not answer the exec request within {}s: the guest is hung or overloaded; see its console (banger vm logs), and stop it by force if it stays so (banger vm stop)",
                timeout.as_secs()
            ))
        })??;
    // Aborted when this future is dropped (a cancel): a pump left waiting
    // for the agent's credit would keep the stream's sender blocked.
    let _pump = match (stdin, session.take_stdin()) {
        (Some(mut rx), Some(mut w)) => Some(AbortOnDrop(tokio::spawn(async move {
            while let Some(chunk) = rx.recv().await {
                if w.write(&chunk).await.is_err() {
                    // The script exited early; its status says why.
                    return;
                }
            }
            let _ = w.close().await;
        }))),
        _ => None,
    };
    let streaming = matches!(out, Out::Stream(_));
    let mut stream = None;
    let mut file = match out {
        Out::File(path) => Some(
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(path)
                .map_err(|e| {
                    WorkspaceError::Host(format!("cannot create {}: {e}", path.display()))
                })?,
        ),
        Out::Memory => None,
        Out::Stream(tx) => {
            stream = Some(tx);
            None
        }
    };
    let mut stdout = Vec::new();
    let mut stdout_bytes = 0u64;
    let mut stderr = Vec::new();
    let status = loop {
        match session.next_event().await? {
            Some(ExecEvent::Stdout(data)) => {
                stdout_bytes += data.len() as u64;
                if streaming {
                    // A receiver that gave up leaves the rest unread.
                    if stream.as_ref().is_some_and(|tx| tx.send(data).is_err()) {
                        stream = None;
                    }
                    continue;
                }
                match file.as_mut() {
                    Some(f) => f.write_all(&data).map_err(|e| {
                        WorkspaceError::Host(format!("cannot write the guest's output: {e}"))
                    })?,
                    None if stdout.len() + data.len() > MEMORY_CAP => {
                        return Err(WorkspaceError::Guest(format!(
                            "the guest's answer is over {} MiB",
                            MEMORY_CAP >> 20
                        )));
                    }
                    None => stdout.extend_from_slice(&data),
                }
            }
            Some(ExecEvent::Stderr(data)) => {
                stderr.extend_from_slice(&data);
                if stderr.len() > 2 * STDERR_TAIL {
                    stderr.drain(..stderr.len() - STDERR_TAIL);
                }
            }
            Some(ExecEvent::Exit(status)) => break status,
            None => match session.exit_status() {
                Some(status) => break status,
                None => {
                    return Err(WorkspaceError::Guest(
                        "lost the connection to the VM's agent (was the VM stopped?)".into(),
                    ));
                }
            },
        }
    };
    if let Some(f) = file {
        f.sync_all()
            .map_err(|e| WorkspaceError::Host(format!("cannot write the guest's output: {e}")))?;
    }
    let tail = &stderr[stderr.len().saturating_sub(STDERR_TAIL)..];
    Ok(Ran {
        status,
        stdout,
        stdout_bytes,
        stderr: String::from_utf8_lossy(tail).into_owned(),
    })
}
