//! Guest I/O through the agent: exec sessions, ports, stats, SSH keys.

use std::collections::HashMap;
use std::sync::Mutex;

use banger_agent_proto::{
    ExecEvent as AgentExecEvent, ExecRequest, ExecStdin, ExitStatus, RemoteError, RemoteErrorCode,
    TtySize,
};
use banger_rpc::EventSink;
use banger_store::VmState;
use banger_wire::methods::{ExecEvent, ExecExit, VmExecParams, VmInfo};
use base64::Engine as _;

use super::VmError;
use super::{ExecControl, VmService};

/// How long `vm show` waits for the guest's answer about its work disk.
const SHOW_STATS_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

impl VmService {
    /// Push the authorized SSH keys (banger's and the user's) to a running guest again.
    pub async fn authsync(&self, name: &str) -> Result<usize, VmError> {
        let vm = self.find(name)?;
        let keys = self.ssh.authorized_keys();
        let n = keys.len();
        let agent = self.agent(&vm).await?;
        self.agent_call(&vm, "the SSH key push", agent.authorize_keys(keys))
            .await?;
        Ok(n)
    }

    // -- guest I/O ---------------------------------------------------------------

    /// A running VM and its agent connection, for guest I/O that does not
    /// take the VM's busy mark (workspaces): a stop or delete may end the
    /// VM meanwhile, which ends the connection.
    pub async fn guest(
        &self,
        name: &str,
    ) -> Result<(banger_store::Vm, banger_agent_proto::AgentClient), VmError> {
        let vm = self.find(name)?;
        let agent = self.agent(&vm).await?;
        Ok((vm, agent))
    }

    pub async fn ports(&self, name: &str) -> Result<serde_json::Value, VmError> {
        let vm = self.find(name)?;
        let agent = self.agent(&vm).await?;
        let r = self
            .agent_call(&vm, "the ports request", agent.ports())
            .await?;
        serde_json::to_value(r).map_err(|e| VmError::Failed(e.to_string()))
    }

    /// [`VmService::info`], plus how full the work disk is when the VM
    /// runs (asked of its agent, briefly: `vm show` never waits on a
    /// guest).
    pub async fn show(&self, name: &str) -> Result<VmInfo, VmError> {
        let vm = self.find(name)?;
        let mut info = self.info(&vm);
        if vm.state == VmState::Running {
            let ask = async { self.agent(&vm).await?.stats().await.map_err(VmError::from) };
            if let Ok(Ok(stats)) = tokio::time::timeout(SHOW_STATS_WAIT, ask).await {
                info.work_disk = stats.work;
            }
        }
        Ok(info)
    }

    pub async fn stats(&self, name: &str) -> Result<banger_agent_proto::Stats, VmError> {
        let vm = self.find(name)?;
        let agent = self.agent(&vm).await?;
        self.agent_call(&vm, "the stats request", agent.stats())
            .await
    }

    /// Run a command in the guest, streaming its output as events.
    pub async fn exec(
        &self,
        params: VmExecParams,
        events: &EventSink,
    ) -> Result<ExecExit, VmError> {
        if params.argv.is_empty() {
            return Err(VmError::Invalid("no command given".into()));
        }
        let vm = self.find(&params.name)?;
        let agent = self.agent(&vm).await?;
        let _ = self.store.touch_vm_last_used(&vm.id);
        let mut req = ExecRequest::new(params.argv.clone());
        req.env = params.env;
        // The secrets' placeholders, unless the caller sets the variable.
        for (name, placeholder) in self.placeholders(&vm)? {
            req.env.entry(name).or_insert(placeholder);
        }
        req.cwd = params.cwd;
        req.stdin = params.stdin;
        if params.tty {
            req.tty = Some(TtySize {
                cols: params.cols.unwrap_or(80),
                rows: params.rows.unwrap_or(24),
            });
        }
        // Only the start has a deadline: the command may run for as long as
        // it likes.
        let b64 = base64::engine::general_purpose::STANDARD;
        let mut session = match self
            .agent_call(&vm, "the exec request", agent.exec(req))
            .await
        {
            Ok(session) => session,
            // A command that cannot be run ends as it would in a shell, with
            // why on stderr and 127 or 126: the caller's command failed, not
            // banger (whose own failures `vm exec` reports as 125).
            Err(VmError::Agent(ref e))
                if let Some((code, why)) = e.remote().and_then(cannot_run) =>
            {
                let why = format!("banger: {why}\n");
                events.send(&ExecEvent::Stderr(b64.encode(why))).await;
                return Ok(ExecExit {
                    code: Some(code),
                    signal: None,
                });
            }
            Err(e) => return Err(e),
        };
        let session_id = format!("{:016x}", fastrand::u64(..));
        let stdin_tx = session.take_stdin().map(|stdin| {
            let (tx, rx) = tokio::sync::mpsc::channel(16);
            tokio::spawn(pump_stdin(stdin, rx));
            tx
        });
        self.sessions.lock().expect("sessions").insert(
            session_id.clone(),
            ExecControl {
                stdin: stdin_tx,
                signaller: session.signaller(),
            },
        );
        let _cleanup = SessionGuard {
            sessions: &self.sessions,
            id: session_id.clone(),
        };
        events
            .send(&ExecEvent::Started {
                session: session_id,
            })
            .await;
        loop {
            match session.next_event().await? {
                Some(AgentExecEvent::Stdout(data)) => {
                    events.send(&ExecEvent::Stdout(b64.encode(&data))).await
                }
                Some(AgentExecEvent::Stderr(data)) => {
                    events.send(&ExecEvent::Stderr(b64.encode(&data))).await
                }
                Some(AgentExecEvent::Exit(status)) => return Ok(exec_exit(status)),
                None => {
                    return match session.exit_status() {
                        Some(status) => Ok(exec_exit(status)),
                        None => Err(VmError::Unavailable(format!(
                            "lost the connection to VM {:?}'s agent",
                            vm.name
                        ))),
                    };
                }
            }
        }
    }

    pub async fn exec_input(
        &self,
        session: &str,
        data: Option<&str>,
        eof: bool,
    ) -> Result<(), VmError> {
        let tx = {
            let sessions = self.sessions.lock().expect("sessions");
            let ctl = sessions
                .get(session)
                .ok_or_else(|| VmError::NotFound(format!("no exec session {session:?}")))?;
            ctl.stdin
                .clone()
                .ok_or_else(|| VmError::Conflict("that session was started without stdin".into()))?
        };
        let bytes = match data {
            Some(d) => base64::engine::general_purpose::STANDARD
                .decode(d)
                .map_err(|e| VmError::Invalid(format!("data is not base64: {e}")))?,
            None => Vec::new(),
        };
        tx.send((bytes, eof))
            .await
            .map_err(|_| VmError::Conflict("the command's stdin is closed".into()))
    }

    pub fn exec_signal(&self, session: &str, signal: i32) -> Result<(), VmError> {
        let sessions = self.sessions.lock().expect("sessions");
        let ctl = sessions
            .get(session)
            .ok_or_else(|| VmError::NotFound(format!("no exec session {session:?}")))?;
        ctl.signaller.signal(signal).map_err(VmError::from)
    }

    /// Set the terminal size of a session started with `tty`.
    pub fn exec_resize(&self, session: &str, cols: u16, rows: u16) -> Result<(), VmError> {
        let sessions = self.sessions.lock().expect("sessions");
        let ctl = sessions
            .get(session)
            .ok_or_else(|| VmError::NotFound(format!("no exec session {session:?}")))?;
        ctl.signaller
            .resize(TtySize { cols, rows })
            .map_err(VmError::from)
    }
}

pub(super) struct SessionGuard<'a> {
    pub(super) sessions: &'a Mutex<HashMap<String, ExecControl>>,
    pub(super) id: String,
}
impl Drop for SessionGuard<'_> {
    fn drop(&mut self) {
        self.sessions.lock().expect("sessions").remove(&self.id);
    }
}

pub(super) async fn pump_stdin(
    mut stdin: ExecStdin,
    mut rx: tokio::sync::mpsc::Receiver<(Vec<u8>, bool)>,
) {
    while let Some((data, eof)) = rx.recv().await {
        if !data.is_empty() && stdin.write(&data).await.is_err() {
            return;
        }
        if eof {
            let _ = stdin.close().await;
            return;
        }
    }
}

/// The shell's exit code for a command the agent could not start (127 when
/// it is not there, 126 when it cannot be run), and the agent's why.
fn cannot_run(e: &RemoteError) -> Option<(i32, &str)> {
    let code = match e.code {
        RemoteErrorCode::NotFound => 127,
        RemoteErrorCode::NotExecutable => 126,
        _ => return None,
    };
    Some((code, &e.message))
}

pub(super) fn exec_exit(status: ExitStatus) -> ExecExit {
    match status {
        ExitStatus::Code(c) => ExecExit {
            code: Some(c),
            signal: None,
        },
        ExitStatus::Signal(s) => ExecExit {
            code: None,
            signal: Some(s),
        },
    }
}
