//! The `services ready` stage of a boot: the readiness checks an image
//! declares (`banger_oci::ServiceCheck`: a TCP port listening in the guest,
//! or a command exiting 0), each polled through the agent until it passes
//! or its timeout ends. A check that never passes fails the boot with the
//! service's log tail, and the create rolls back like any failed stage.

use std::time::{Duration, Instant};

use banger_agent_proto::{AgentClient, ExecEvent, ExecRequest, ExitStatus, SocketProtocol};
use banger_oci::ServiceCheck;
use banger_store::{InitMode, Vm};
use banger_vmm::{Handles, is_alive};

use super::{VmError, VmService};
use crate::ops::Operation;

/// How often a check that has not passed is tried again.
const POLL: Duration = Duration::from_millis(250);
/// Lines of a service's log shown when it never came up.
const LOG_LINES: usize = 40;
/// Bytes of a log kept while reading it (the end of it).
const LOG_BYTES: usize = 64 * 1024;
/// The last lines of the file `$1` (`tail`, or `cat` where the image has
/// no `tail`; the host keeps the end).
const LOG_SCRIPT: &str =
    r#"if command -v tail >/dev/null 2>&1; then exec tail -n 40 -- "$1"; fi; exec cat -- "$1""#;

fn status_text(s: ExitStatus) -> String {
    match s {
        ExitStatus::Code(c) => format!("exit code {c}"),
        ExitStatus::Signal(n) => format!("signal {n}"),
    }
}

impl VmService {
    pub(super) async fn wait_services(
        &self,
        op: &Operation,
        vm: &Vm,
        h: &Handles,
        agent: &AgentClient,
        checks: &[ServiceCheck],
    ) -> Result<(), VmError> {
        for check in checks {
            let started = Instant::now();
            let timeout = Duration::from_secs(check.timeout_secs.into());
            loop {
                let why = match self.probe(vm, agent, check).await? {
                    None => {
                        op.progress(format!(
                            "{} is up ({:.1}s)",
                            check.name,
                            started.elapsed().as_secs_f64()
                        ));
                        break;
                    }
                    Some(why) => why,
                };
                if started.elapsed() >= timeout || !is_alive(h) {
                    let log = self.log_tail(vm, agent, check).await;
                    let fast = if vm.init_mode == InitMode::Fast {
                        "; the VM boots with --init fast, where the agent is PID 1 and starts \
                         none of the image's services (images whose services are systemd units \
                         need --init systemd)"
                    } else {
                        ""
                    };
                    return Err(VmError::Failed(format!(
                        "service {:?} of VM {:?} was not up within {} s: {why}{fast}{log}",
                        check.name, vm.name, check.timeout_secs
                    )));
                }
                tokio::time::sleep(POLL).await;
            }
        }
        Ok(())
    }

    /// `None` when `check` passes now, else why not.
    async fn probe(
        &self,
        vm: &Vm,
        agent: &AgentClient,
        check: &ServiceCheck,
    ) -> Result<Option<String>, VmError> {
        if let Some(port) = check.port {
            let ports = self
                .agent_call(vm, "the ports request", agent.ports())
                .await?;
            let listening = ports
                .sockets
                .iter()
                .any(|s| s.protocol == SocketProtocol::Tcp && s.port == port);
            return Ok((!listening).then(|| format!("nothing listens on TCP port {port}")));
        }
        let Some(command) = &check.command else {
            return Ok(None);
        };
        let out = self
            .agent_call(vm, "a readiness check", async {
                agent
                    .exec(ExecRequest::new(["/bin/sh", "-c", command]))
                    .await?
                    .wait_with_output()
                    .await
            })
            .await?;
        if out.status.success() {
            return Ok(None);
        }
        let mut said = String::from_utf8_lossy(&out.stdout).into_owned();
        said.push_str(&String::from_utf8_lossy(&out.stderr));
        Ok(Some(format!(
            "`{command}` ended with {}{}",
            status_text(out.status),
            tail_lines("its output", &said)
        )))
    }

    /// The end of the service's log, when the image names one, for the
    /// error; else nothing (a command check's output is in its reason).
    async fn log_tail(&self, vm: &Vm, agent: &AgentClient, check: &ServiceCheck) -> String {
        let Some(log) = &check.log else {
            return String::new();
        };
        let read = self
            .agent_call(vm, "the service log's tail", async {
                let mut session = agent
                    .exec(ExecRequest::new(["/bin/sh", "-c", LOG_SCRIPT, "sh", log]))
                    .await?;
                let (mut out, mut err) = (Vec::new(), Vec::new());
                loop {
                    match session.next_event().await? {
                        Some(ExecEvent::Stdout(d)) => keep_end(&mut out, &d),
                        Some(ExecEvent::Stderr(d)) => keep_end(&mut err, &d),
                        Some(ExecEvent::Exit(status)) => return Ok((status, out, err)),
                        None => {
                            return Err(banger_agent_proto::AgentError::Protocol(
                                "exec ended without a status".into(),
                            ));
                        }
                    }
                }
            })
            .await;
        match read {
            Ok((status, out, _)) if status.success() => {
                tail_lines(&format!("{log} ends"), &String::from_utf8_lossy(&out))
            }
            Ok((_, _, err)) => format!(
                "; cannot read {log}: {}",
                String::from_utf8_lossy(&err).trim()
            ),
            Err(e) => format!("; cannot read {log}: {}", crate::errors::chain(&e)),
        }
    }
}

/// Append `data` to `buf`, keeping only its last [`LOG_BYTES`].
fn keep_end(buf: &mut Vec<u8>, data: &[u8]) {
    buf.extend_from_slice(data);
    if buf.len() > LOG_BYTES {
        buf.drain(..buf.len() - LOG_BYTES);
    }
}

/// `text`'s last lines under a heading, for an error message.
fn tail_lines(heading: &str, text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let tail = &lines[lines.len().saturating_sub(LOG_LINES)..];
    if tail.is_empty() {
        return String::new();
    }
    format!("; {heading}:\n{}", tail.join("\n"))
}
