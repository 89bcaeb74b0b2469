//! Long operations (VM create, start, stop, delete; image build, pull,
//! import) all go through one runner, [`Operations::run`]: a daemon task
//! named by its op id, detached from the connection that asked for it. A
//! caller that goes away (Ctrl-C) only stops following it; the operation
//! finishes or rolls back as if the caller had stayed, so the rows and the
//! host always agree. Each operation is journalled in the store from its
//! start to its end, and its stages are kept in memory so that `op.status`
//! can show them and callers can follow them.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use banger_rpc::{EventSink, error_chain};
pub use banger_store::OpKind;
use banger_store::Store;
use banger_wire::OpId;
use banger_wire::methods::{OpStatusResult, StageEvent, StageStatus};
use tokio::sync::watch;
use tracing::warn;

#[derive(Debug)]
pub struct Operations {
    store: Arc<Store>,
    ops: Mutex<HashMap<OpId, Arc<Operation>>>,
}

/// An operation, or one of its tracks ([`Operation::track`]): handles
/// that share its stages, its end and its cancellation.
#[derive(Debug)]
pub struct Operation {
    pub op_id: OpId,
    kind: OpKind,
    subject: String,
    store: Arc<Store>,
    state: Arc<Mutex<OpState>>,
    /// Bumped on every change, so followers wake up.
    changed: Arc<watch::Sender<u64>>,
    /// Set by `op.cancel`; only operations whose work watches it
    /// ([`OpKind::cancellable`]) may be cancelled.
    cancel: Arc<watch::Sender<bool>>,
    /// The VM this handle's stages are of, for a track.
    vm: Option<String>,
}

#[derive(Debug, Default)]
struct OpState {
    stages: Vec<StageEvent>,
    /// The open stage of the operation (key `None`) and of each track.
    current: HashMap<Option<String>, (String, Instant)>,
    done: Option<Result<(), String>>,
}

/// A runner task that ended without a result (it panicked).
#[derive(Debug, thiserror::Error)]
#[error("{kind} task failed: {message}")]
pub struct TaskFailed {
    kind: OpKind,
    message: String,
}

/// `op.status` for an op id this daemon does not know.
#[derive(Debug, thiserror::Error)]
#[error("no operation {0} (finished operations are kept until the daemon restarts)")]
pub struct NoSuchOperation(OpId);

/// Why `op.cancel` did not cancel.
#[derive(Debug, thiserror::Error)]
pub enum CancelError {
    #[error(transparent)]
    NoSuch(#[from] NoSuchOperation),
    /// Operations that change VMs or images finish or roll back on their
    /// own; stopping them half way would leave half-made things.
    #[error(
        "{0} {1} cannot be cancelled: it finishes, or rolls back everything it made, on its own"
    )]
    NotCancellable(OpKind, OpId),
}

/// Operations whose work stops cleanly at any point when cancelled.
fn cancellable(kind: OpKind) -> bool {
    matches!(kind, OpKind::WorkspacePrepare | OpKind::WorkspaceExport)
}

/// How many finished operations `op.status` remembers.
const KEEP_FINISHED: usize = 256;

impl Operations {
    pub fn new(store: Arc<Store>) -> Self {
        Operations {
            store,
            ops: Mutex::default(),
        }
    }

    /// Run `work` as operation `op_id` of `kind` on `subject`: as a daemon
    /// task that outlives the caller, streaming its stages to `events` while
    /// the caller follows, journalled in the store until it ends. The
    /// caller's future may be dropped at any await (the connection closed):
    /// the work goes on.
    pub async fn run<T, E, Fut>(
        &self,
        op_id: &OpId,
        kind: OpKind,
        subject: &str,
        events: &EventSink,
        work: impl FnOnce(Arc<Operation>) -> Fut,
    ) -> Result<T, E>
    where
        Fut: Future<Output = Result<T, E>> + Send + 'static,
        T: Send + 'static,
        E: std::error::Error + From<TaskFailed> + Send + 'static,
    {
        let op = self.begin(op_id, kind, subject);
        let work = work(op.clone());
        let task_op = op.clone();
        let task = tokio::spawn(async move {
            let result = work.await;
            task_op.finish(result.as_ref().map(|_| ()).map_err(|e| error_chain(e)));
            result
        });
        op.follow(events).await;
        task.await.map_err(|e| {
            E::from(TaskFailed {
                kind,
                message: e.to_string(),
            })
        })?
    }

    fn begin(&self, op_id: &OpId, kind: OpKind, subject: &str) -> Arc<Operation> {
        if let Err(e) = self
            .store
            .begin_operation(op_id.as_str(), kind, subject, "started")
        {
            warn!(%op_id, error = %e, "cannot journal the operation");
        }
        self.track(op_id, kind, subject)
    }

    /// Keep `op_id` for `op.status` (forgetting finished ones beyond
    /// [`KEEP_FINISHED`]).
    fn track(&self, op_id: &OpId, kind: OpKind, subject: &str) -> Arc<Operation> {
        let (changed, _) = watch::channel(0);
        let (cancel, _) = watch::channel(false);
        let op = Arc::new(Operation {
            op_id: op_id.clone(),
            kind,
            subject: subject.to_string(),
            store: self.store.clone(),
            state: Arc::default(),
            changed: Arc::new(changed),
            cancel: Arc::new(cancel),
            vm: None,
        });
        let mut ops = self.ops.lock().expect("ops lock");
        if ops.len() >= KEEP_FINISHED {
            ops.retain(|_, o| o.state.lock().expect("op lock").done.is_none());
        }
        ops.insert(op_id.clone(), op.clone());
        op
    }

    /// At daemon start: operations the journal holds were cut short by a
    /// daemon that died (reconcile has already settled their VM rows).
    /// `op.status` reports each as failed at the stage it reached.
    pub fn recover(&self) {
        let unfinished = match self.store.unfinished_operations() {
            Ok(u) => u,
            Err(e) => {
                warn!(error = %e, "cannot read the operation journal");
                return;
            }
        };
        for j in unfinished {
            let Ok(op_id) = j.op_id.parse::<OpId>() else {
                let _ = self.store.finish_operation(&j.op_id);
                continue;
            };
            warn!(%op_id, kind = %j.kind, subject = %j.subject_id, stage = %j.stage, "an operation was cut short by a daemon stop");
            // Already begun in the journal: only tracked here.
            let op = self.track(&op_id, j.kind, &j.subject_id);
            op.finish(Err(format!(
                "cut short by a daemon stop during its {} stage",
                j.stage
            )));
        }
    }

    /// `op.cancel`: ask a running cancellable operation to stop. `false`
    /// when it had already ended.
    fn get(&self, op_id: &OpId) -> Result<Arc<Operation>, NoSuchOperation> {
        self.ops
            .lock()
            .expect("ops lock")
            .get(op_id)
            .cloned()
            .ok_or_else(|| NoSuchOperation(op_id.clone()))
    }

    pub fn cancel(&self, op_id: &OpId) -> Result<bool, CancelError> {
        let op = self.get(op_id)?;
        if op.state.lock().expect("op lock").done.is_some() {
            return Ok(false);
        }
        if !cancellable(op.kind) {
            return Err(CancelError::NotCancellable(op.kind, op_id.clone()));
        }
        op.cancel.send_replace(true);
        Ok(true)
    }

    /// `op.follow`: `op_id`'s stages to `events` (those so far first)
    /// until it ends, then its status.
    pub async fn follow(
        &self,
        op_id: &OpId,
        events: &EventSink,
    ) -> Result<OpStatusResult, NoSuchOperation> {
        self.get(op_id)?.follow(events).await;
        self.status(op_id)
    }

    pub fn status(&self, op_id: &OpId) -> Result<OpStatusResult, NoSuchOperation> {
        let op = self.get(op_id)?;
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
    /// Resolves once `op.cancel` asked this operation to stop.
    pub async fn cancelled(&self) {
        let mut rx = self.cancel.subscribe();
        let _ = rx.wait_for(|c| *c).await;
    }

    fn push(&self, ev: StageEvent) {
        self.state.lock().expect("op lock").stages.push(ev);
        self.changed.send_modify(|n| *n += 1);
    }

    /// A handle on this operation whose stages are those of `vm`, timed
    /// apart from the operation's own and from other tracks': an operation
    /// that works on several VMs at once (`vm fork --count N`) gives each
    /// its track, and every stage event names its VM.
    pub fn track(&self, vm: &str) -> Operation {
        Operation {
            op_id: self.op_id.clone(),
            kind: self.kind,
            subject: self.subject.clone(),
            store: self.store.clone(),
            state: self.state.clone(),
            changed: self.changed.clone(),
            cancel: self.cancel.clone(),
            vm: Some(vm.to_owned()),
        }
    }

    /// Start a stage (ending this handle's previous one if it is still open).
    pub fn stage(&self, name: &str) {
        self.end_stage(StageStatus::Done);
        self.state
            .lock()
            .expect("op lock")
            .current
            .insert(self.vm.clone(), (name.to_string(), Instant::now()));
        let journal = match &self.vm {
            Some(vm) => format!("{vm}: {name}"),
            None => name.to_owned(),
        };
        if let Err(e) = self
            .store
            .update_operation_stage(self.op_id.as_str(), &journal)
        {
            warn!(op_id = %self.op_id, error = %e, "cannot journal the stage");
        }
        self.push(StageEvent {
            stage: name.into(),
            status: StageStatus::Started,
            elapsed_ms: None,
            detail: None,
            vm: self.vm.clone(),
        });
    }

    /// A progress note within this handle's current stage.
    pub fn progress(&self, detail: impl Into<String>) {
        let stage = self
            .state
            .lock()
            .expect("op lock")
            .current
            .get(&self.vm)
            .map(|(n, _)| n.clone())
            .unwrap_or_default();
        self.push(StageEvent {
            stage,
            status: StageStatus::Progress,
            elapsed_ms: None,
            detail: Some(detail.into()),
            vm: self.vm.clone(),
        });
    }

    /// A track's work ended: its open stage ends with it.
    pub fn end_track(&self, ok: bool) {
        self.end_stage(if ok {
            StageStatus::Done
        } else {
            StageStatus::Failed
        });
    }

    fn end_stage(&self, status: StageStatus) {
        let cur = self.state.lock().expect("op lock").current.remove(&self.vm);
        if let Some((name, started)) = cur {
            self.push(ended(name, started, status, self.vm.clone()));
        }
    }

    fn finish(&self, result: Result<(), String>) {
        if let Err(e) = self.store.finish_operation(self.op_id.as_str())
            && !e.is_not_found()
        {
            warn!(op_id = %self.op_id, error = %e, "cannot journal the end of the operation");
        }
        let status = if result.is_ok() {
            StageStatus::Done
        } else {
            StageStatus::Failed
        };
        // The operation's open stage, then any a track left open.
        self.end_stage(status);
        let open: Vec<_> = self
            .state
            .lock()
            .expect("op lock")
            .current
            .drain()
            .collect();
        for (vm, (name, started)) in open {
            self.push(ended(name, started, status, vm));
        }
        self.state.lock().expect("op lock").done = Some(result);
        self.changed.send_modify(|n| *n += 1);
    }

    /// Forward this operation's stages to a caller until it finishes.
    async fn follow(&self, events: &EventSink) {
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

/// The event that ends stage `name`, open since `started`.
fn ended(name: String, started: Instant, status: StageStatus, vm: Option<String>) -> StageEvent {
    StageEvent {
        stage: name,
        status,
        elapsed_ms: Some(started.elapsed().as_millis() as u64),
        detail: None,
        vm,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn only_workspace_operations_can_be_cancelled() {
        let store = Arc::new(Store::open_in_memory().unwrap());
        let ops = Operations::new(store);
        let create = OpId::mint();
        let _c = ops.begin(&create, OpKind::VmCreate, "box");
        let e = ops.cancel(&create).unwrap_err();
        assert!(
            matches!(e, CancelError::NotCancellable(OpKind::VmCreate, _)),
            "{e}"
        );
        assert!(e.to_string().contains("rolls back"), "{e}");
        assert!(matches!(
            ops.cancel(&OpId::mint()),
            Err(CancelError::NoSuch(_))
        ));
        let prepare = OpId::mint();
        let op = ops.begin(&prepare, OpKind::WorkspacePrepare, "box");
        let waiting = tokio::spawn({
            let op = op.clone();
            async move { op.cancelled().await }
        });
        assert!(ops.cancel(&prepare).unwrap());
        waiting.await.unwrap();
        op.finish(Err("cancelled".into()));
        assert!(!ops.cancel(&prepare).unwrap(), "an ended operation");
    }

    #[test]
    fn stages_are_timed_and_status_reports_them() {
        let store = Arc::new(Store::open_in_memory().unwrap());
        let ops = Operations::new(store.clone());
        let id = OpId::mint();
        let op = ops.begin(&id, OpKind::VmCreate, "box");
        assert_eq!(store.unfinished_operations().unwrap()[0].stage, "started");
        op.stage("allocate");
        op.stage("disks");
        op.progress("copying");
        assert_eq!(store.unfinished_operations().unwrap()[0].stage, "disks");
        op.finish(Err("disk full".into()));
        assert!(store.unfinished_operations().unwrap().is_empty());
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

    /// Tracks interleave without ending each other's stages (before them,
    /// two concurrent forks' stages ended one another, timed wrong); each
    /// event names its VM, and the operation's end closes what is open.
    #[test]
    fn tracks_time_their_own_stages_and_name_their_vm() {
        let store = Arc::new(Store::open_in_memory().unwrap());
        let ops = Operations::new(store.clone());
        let id = OpId::mint();
        let op = ops.begin(&id, OpKind::VmFork, "box");
        op.stage("restore");
        let (a, b) = (op.track("box-fork-1"), op.track("box-fork-2"));
        a.stage("disks");
        b.stage("disks");
        a.stage("network");
        a.progress("tap");
        assert_eq!(
            store.unfinished_operations().unwrap()[0].stage,
            "box-fork-1: network"
        );
        a.end_track(true);
        b.stage("network");
        op.finish(Err("box-fork-2 failed".into()));
        let st = ops.status(&id).unwrap();
        let summary: Vec<_> = st
            .stages
            .iter()
            .map(|s| (s.vm.as_deref(), s.stage.as_str(), s.status))
            .collect();
        let (one, two) = (Some("box-fork-1"), Some("box-fork-2"));
        use StageStatus::*;
        assert_eq!(
            summary,
            vec![
                (None, "restore", Started),
                (one, "disks", Started),
                (two, "disks", Started),
                (one, "disks", Done),
                (one, "network", Started),
                (one, "network", Progress),
                (one, "network", Done),
                (two, "disks", Done),
                (two, "network", Started),
                (None, "restore", Failed),
                (two, "network", Failed),
            ]
        );
    }

    #[test]
    fn operations_a_dead_daemon_left_in_the_journal_are_reported_failed() {
        let store = Arc::new(Store::open_in_memory().unwrap());
        let id = OpId::mint();
        store
            .begin_operation(id.as_str(), OpKind::ImagePull, "alpine", "layers")
            .unwrap();
        let ops = Operations::new(store.clone());
        ops.recover();
        let st = ops.status(&id).unwrap();
        assert!(st.done);
        assert_eq!(st.kind, "image_pull");
        assert!(st.error.unwrap().contains("during its layers stage"));
        assert!(store.unfinished_operations().unwrap().is_empty());
    }
}
