//! Long operations (VM create, image build) run as daemon tasks named by
//! their op id, independent of the connection that asked for them: a
//! caller that goes away does not leave a half-made VM. Their stages are
//! kept so that `op.status` can show them and so callers can follow them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use banger_rpc::{EventSink, RpcError};
use banger_wire::OpId;
use banger_wire::methods::{OpStatusResult, StageEvent, StageStatus};
use tokio::sync::watch;

#[derive(Debug, Default)]
pub struct Operations {
    ops: Mutex<HashMap<OpId, Arc<Operation>>>,
}

#[derive(Debug)]
pub struct Operation {
    pub op_id: OpId,
    kind: &'static str,
    subject: String,
    state: Mutex<OpState>,
    /// Bumped on every change, so followers wake up.
    changed: watch::Sender<u64>,
}

#[derive(Debug, Default)]
struct OpState {
    stages: Vec<StageEvent>,
    current: Option<(String, Instant)>,
    done: Option<Result<(), String>>,
}

/// How many finished operations `op.status` remembers.
const KEEP_FINISHED: usize = 256;

impl Operations {
    pub fn begin(&self, op_id: &OpId, kind: &'static str, subject: &str) -> Arc<Operation> {
        let (changed, _) = watch::channel(0);
        let op = Arc::new(Operation {
            op_id: op_id.clone(),
            kind,
            subject: subject.to_string(),
            state: Mutex::new(OpState::default()),
            changed,
        });
        let mut ops = self.ops.lock().expect("ops lock");
        if ops.len() >= KEEP_FINISHED {
            ops.retain(|_, o| o.state.lock().expect("op lock").done.is_none());
        }
        ops.insert(op_id.clone(), op.clone());
        op
    }

    pub fn status(&self, op_id: &OpId) -> Result<OpStatusResult, RpcError> {
        let op = self
            .ops
            .lock()
            .expect("ops lock")
            .get(op_id)
            .cloned()
            .ok_or_else(|| {
                RpcError::not_found(format!(
                    "no operation {op_id} (finished operations are kept until the daemon restarts)"
                ))
            })?;
        let st = op.state.lock().expect("op lock");
        Ok(OpStatusResult {
            op_id: op.op_id.clone(),
            kind: op.kind.to_string(),
            subject: op.subject.clone(),
            stages: st.stages.clone(),
            done: st.done.is_some(),
            error: st.done.as_ref().and_then(|d| d.as_ref().err().cloned()),
        })
    }
}

impl Operation {
    fn push(&self, ev: StageEvent) {
        self.state.lock().expect("op lock").stages.push(ev);
        self.changed.send_modify(|n| *n += 1);
    }

    /// Start a stage (ending the previous one if it is still open).
    pub fn stage(&self, name: &str) {
        self.end_stage(StageStatus::Done);
        self.state.lock().expect("op lock").current = Some((name.to_string(), Instant::now()));
        self.push(StageEvent {
            stage: name.into(),
            status: StageStatus::Started,
            elapsed_ms: None,
            detail: None,
        });
    }

    /// A progress note within the current stage.
    pub fn progress(&self, detail: impl Into<String>) {
        let stage = self
            .state
            .lock()
            .expect("op lock")
            .current
            .as_ref()
            .map(|(n, _)| n.clone())
            .unwrap_or_default();
        self.push(StageEvent {
            stage,
            status: StageStatus::Progress,
            elapsed_ms: None,
            detail: Some(detail.into()),
        });
    }

    fn end_stage(&self, status: StageStatus) {
        let cur = self.state.lock().expect("op lock").current.take();
        if let Some((name, started)) = cur {
            let ms = started.elapsed().as_millis() as u64;
            self.push(StageEvent {
                stage: name,
                status,
                elapsed_ms: Some(ms),
                detail: None,
            });
        }
    }

    pub fn finish(&self, result: Result<(), String>) {
        self.end_stage(if result.is_ok() {
            StageStatus::Done
        } else {
            StageStatus::Failed
        });
        self.state.lock().expect("op lock").done = Some(result);
        self.changed.send_modify(|n| *n += 1);
    }

    /// Forward this operation's stages to a caller until it finishes.
    pub async fn follow(&self, events: &EventSink) {
        let mut rx = self.changed.subscribe();
        let mut sent = 0;
        loop {
            let (new, done) = {
                let st = self.state.lock().expect("op lock");
                (st.stages[sent..].to_vec(), st.done.is_some())
            };
            sent += new.len();
            for ev in &new {
                events.send(ev).await;
            }
            if done || rx.changed().await.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_are_timed_and_status_reports_them() {
        let ops = Operations::default();
        let id = OpId::mint();
        let op = ops.begin(&id, "vm_create", "box");
        op.stage("allocate");
        op.stage("disks");
        op.progress("copying");
        op.finish(Err("disk full".into()));
        let st = ops.status(&id).unwrap();
        assert!(st.done);
        assert_eq!(st.error.as_deref(), Some("disk full"));
        let summary: Vec<_> = st
            .stages
            .iter()
            .map(|s| (s.stage.as_str(), s.status))
            .collect();
        assert_eq!(
            summary,
            vec![
                ("allocate", StageStatus::Started),
                ("allocate", StageStatus::Done),
                ("disks", StageStatus::Started),
                ("disks", StageStatus::Progress),
                ("disks", StageStatus::Failed),
            ]
        );
        assert!(st.stages[1].elapsed_ms.is_some());
        assert!(ops.status(&OpId::mint()).is_err());
    }
}
