//! Rendering the stages of long operations (create, image build).

use crate::out::outln;
use std::io::Write;

use banger_wire::OpId;
use banger_wire::methods::{OpStatus, OpStatusParams, StageEvent, StageStatus};
use serde_json::{Value, json};

use crate::context::Invocation;
use crate::error::CliError;

/// Where stage events go: JSON lines (`--json`), human lines on stderr, or nowhere.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    pub json: bool,
    pub quiet: bool,
    /// JSON events go to stdout unless stdout belongs to something else (`vm run`).
    pub json_to_stderr: bool,
}

impl Progress {
    pub fn event(&self, op_id: &OpId, ev: Value) {
        if self.json {
            let line = json!({ "op_id": op_id, "event": ev }).to_string();
            if self.json_to_stderr {
                eprintln!("{line}");
            } else {
                // A reader that went away is noticed at the command's result.
                let _ = crate::out::line(format_args!("{line}"));
            }
            return;
        }
        if self.quiet {
            return;
        }
        let Ok(ev) = serde_json::from_value::<StageEvent>(ev) else {
            return;
        };
        if let Some(line) = render(&ev) {
            let mut err = std::io::stderr().lock();
            let _ = writeln!(err, "{line}");
        }
    }
}

/// One human line for a stage event, or nothing for a stage start (a
/// stage of one of an operation's several VMs names it first).
pub fn render(ev: &StageEvent) -> Option<String> {
    let secs = ev
        .elapsed_ms
        .map(|ms| format!("{:>7.2}s", ms as f64 / 1000.0))
        .unwrap_or_default();
    let stage = match &ev.vm {
        Some(vm) => format!("{vm}: {}", ev.stage),
        None => ev.stage.clone(),
    };
    match ev.status {
        StageStatus::Started => None,
        StageStatus::Done => Some(format!("  {stage:<12} {secs}")),
        StageStatus::Failed => Some(format!("  {stage:<12} {secs}  FAILED")),
        StageStatus::Progress => ev.detail.as_ref().map(|d| format!("    {stage} {d}")),
    }
}

/// `banger op OP_ID`.
pub async fn op_status(ctx: &Invocation, op_id: OpId) -> Result<u8, CliError> {
    let st = ctx.call::<OpStatus>(&OpStatusParams { op_id }).await?;
    if ctx.json {
        super::print_json(&st)?;
        return Ok(0);
    }
    outln!(
        "{} {} ({}): {}",
        st.op_id,
        st.kind,
        st.subject,
        if st.done { "done" } else { "in progress" }
    );
    for ev in &st.stages {
        if let Some(l) = render(ev) {
            outln!("{l}");
        }
    }
    if let Some(e) = &st.error {
        outln!("error: {}", crate::out::safe_text(e));
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_done_and_failed_stages_with_times() {
        let done = StageEvent {
            stage: "disks".into(),
            status: StageStatus::Done,
            elapsed_ms: Some(1234),
            detail: None,
            vm: None,
        };
        assert_eq!(render(&done).unwrap(), "  disks           1.23s");
        let forked = StageEvent {
            vm: Some("web-fork-2".into()),
            ..done.clone()
        };
        assert_eq!(render(&forked).unwrap(), "  web-fork-2: disks    1.23s");
        let failed = StageEvent {
            status: StageStatus::Failed,
            ..done.clone()
        };
        assert!(render(&failed).unwrap().ends_with("FAILED"));
        let started = StageEvent {
            status: StageStatus::Started,
            elapsed_ms: None,
            ..done
        };
        assert_eq!(render(&started), None);
    }
}
