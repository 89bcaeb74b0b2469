//! Sessions: VMs that live only as long as a client's connection.
//!
//! A client (`banger mcp --ephemeral`) holds a session with `session.hold`
//! on a connection of its own and creates VMs with `session` set. When that
//! connection closes — the client exited, or was killed with SIGKILL, which
//! nothing inside it can catch — the session ends and every VM created in
//! it is deleted here, by the daemon. Sessions live in memory (a daemon
//! that stops ends every connection, and so every session); a VM records
//! its session as a label, so the next daemon deletes the VMs of sessions
//! that ended with the last one.

use std::collections::{HashMap, hash_map::Entry};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use banger_rpc::EventSink;
use banger_wire::OpId;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::vms::{VmError, VmService};

/// The label that names a VM's session in its row.
pub const SESSION_LABEL: &str = "banger.session";

/// How long the reaper waits before asking again to delete a VM another
/// operation is busy with, and how often it asks (10 minutes in all: a
/// stop ends well within that).
const BUSY_RETRY: Duration = Duration::from_millis(250);
const BUSY_TRIES: u32 = 2400;

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotHeld(String),
    #[error("{0}")]
    Conflict(String),
}

/// A VM created in a session: its create holds the sender until the
/// create's operation ends (it may outlive the request that began it).
#[derive(Debug)]
struct Member {
    create_done: watch::Receiver<()>,
}

/// Held by a VM's create until its operation ends.
#[derive(Debug)]
pub struct CreateClaim {
    _done: watch::Sender<()>,
}

#[derive(Debug)]
pub struct SessionService {
    vms: Arc<VmService>,
    store: Arc<banger_store::Store>,
    sessions: Mutex<HashMap<String, HashMap<String, Member>>>,
}

fn valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl SessionService {
    pub fn new(vms: Arc<VmService>, store: Arc<banger_store::Store>) -> Self {
        SessionService {
            vms,
            store,
            sessions: Mutex::new(HashMap::new()),
        }
    }

    /// At daemon start: no session is held yet, so the VMs of sessions the
    /// last daemon held are deleted (in the background).
    pub fn reap_orphans(&self) {
        let vms = match self.store.list_vms() {
            Ok(vms) => vms,
            Err(e) => {
                warn!(error = %crate::errors::chain(&e), "cannot list the VMs of ended sessions");
                return;
            }
        };
        let op_id = OpId::mint();
        for vm in vms {
            let Some(session) = vm.labels.get(SESSION_LABEL) else {
                continue;
            };
            info!(%op_id, vm = %vm.name, %session, "the VM's session ended with the last daemon: deleting it");
            // No create of it is in flight: its claim is already released.
            let (_, create_done) = watch::channel(());
            let member = Member { create_done };
            tokio::spawn(reap(self.vms.clone(), op_id.clone(), vm.name, member));
        }
    }

    /// Hold session `id` until `gone` resolves (the caller's connection
    /// closed), then delete every VM created in it. `held` is told once the
    /// session is held.
    pub async fn hold(
        self: &Arc<Self>,
        op_id: &OpId,
        id: String,
        held: impl AsyncFnOnce(),
        gone: impl Future<Output = ()>,
    ) -> Result<(), SessionError> {
        if !valid_id(&id) {
            return Err(SessionError::Invalid(format!(
                "session id {id:?} is invalid: use 1-64 letters, digits, '-' and '_'"
            )));
        }
        match self
            .sessions
            .lock()
            .expect("sessions lock")
            .entry(id.clone())
        {
            Entry::Occupied(_) => {
                return Err(SessionError::Conflict(format!(
                    "session {id:?} is already held by another connection"
                )));
            }
            Entry::Vacant(v) => {
                v.insert(HashMap::new());
            }
        }
        // However this handler ends (the caller gone, the daemon stopping,
        // the task aborted), the session's VMs are deleted.
        let _end = End {
            service: self.clone(),
            id: id.clone(),
            op_id: op_id.clone(),
        };
        info!(session = %id, "session held");
        held().await;
        gone.await;
        Ok(())
    }

    /// Record that VM `name` is being created in session `id`, refused when
    /// the session is not held. The create keeps the claim until its
    /// operation ends, so the session's end deletes the VM only after that.
    pub fn attach(&self, id: &str, name: Option<&str>) -> Result<CreateClaim, SessionError> {
        let Some(name) = name else {
            return Err(SessionError::Invalid(
                "a VM created in a session needs a name".into(),
            ));
        };
        let mut sessions = self.sessions.lock().expect("sessions lock");
        let Some(members) = sessions.get_mut(id) else {
            return Err(SessionError::NotHeld(format!(
                "session {id:?} is not held (session.hold on a connection that stays open)"
            )));
        };
        let (tx, rx) = watch::channel(());
        members.insert(name.to_owned(), Member { create_done: rx });
        Ok(CreateClaim { _done: tx })
    }

    /// VM `name` was deleted: a later VM of the same name is no member.
    pub fn forget(&self, name: &str) {
        for members in self.sessions.lock().expect("sessions lock").values_mut() {
            members.remove(name);
        }
    }

    fn end(self: Arc<Self>, id: String, op_id: OpId) {
        let Some(members) = self.sessions.lock().expect("sessions lock").remove(&id) else {
            return;
        };
        info!(session = %id, vms = members.len(), "session ended: deleting its VMs");
        for (name, member) in members {
            let vms = self.vms.clone();
            let op_id = op_id.clone();
            tokio::spawn(async move { reap(vms, op_id, name, member).await });
        }
    }
}

/// Ends the session when the holding handler ends.
struct End {
    service: Arc<SessionService>,
    id: String,
    op_id: OpId,
}

impl Drop for End {
    fn drop(&mut self) {
        let id = std::mem::take(&mut self.id);
        self.service.clone().end(id, self.op_id.clone());
    }
}

/// Delete `name` once its create has ended, waiting out other operations
/// on it.
async fn reap(vms: Arc<VmService>, op_id: OpId, name: String, mut member: Member) {
    while member.create_done.changed().await.is_ok() {}
    for _ in 0..BUSY_TRIES {
        match vms.delete(&op_id, &name, true, &EventSink::discard()).await {
            Ok(_) => {
                info!(vm = %name, "deleted the VM of an ended session");
                return;
            }
            Err(VmError::NotFound(_)) => return,
            Err(VmError::Conflict(_)) => tokio::time::sleep(BUSY_RETRY).await,
            Err(e) => {
                warn!(vm = %name, error = %crate::errors::chain(&e), "cannot delete the VM of an ended session");
                return;
            }
        }
    }
    warn!(vm = %name, "the VM of an ended session stayed busy: not deleted");
}
