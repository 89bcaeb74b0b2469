//! Operations started through the web API (`202 {"op_id"}`): their stage
//! events and final outcome, kept so that `/api/ops/{op_id}` can replay
//! them and follow the rest live.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use banger_wire::OpId;
use serde_json::Value;
use tokio::sync::watch;

/// Operations remembered (the oldest finished ones are forgotten first).
const KEEP: usize = 256;
/// Events kept per operation; later progress notes beyond it are dropped.
const MAX_EVENTS: usize = 4096;
/// Followers of one operation at a time.
pub(crate) const MAX_FOLLOWERS: usize = 16;

#[derive(Debug, Default)]
pub(crate) struct Registry {
    inner: Mutex<Kept>,
}

/// The records, and their op ids oldest first.
type Kept = (HashMap<OpId, Arc<Record>>, VecDeque<OpId>);

#[derive(Debug)]
pub(crate) struct Record {
    /// The RPC method it runs.
    method: &'static str,
    state: Mutex<RecordState>,
    changed: watch::Sender<u64>,
    followers: AtomicUsize,
}

#[derive(Debug, Default)]
struct RecordState {
    events: Vec<Value>,
    end: Option<Value>,
}

impl Registry {
    pub(crate) fn insert(&self, op_id: &OpId, method: &'static str) -> Arc<Record> {
        let rec = Arc::new(Record {
            method,
            state: Mutex::default(),
            changed: watch::Sender::new(0),
            followers: AtomicUsize::new(0),
        });
        let mut g = self.inner.lock().expect("ops lock");
        let (map, order) = &mut *g;
        if order.len() >= KEEP {
            // Forget the oldest finished one; all running: the oldest.
            let pos = order
                .iter()
                .position(|id| map.get(id).is_none_or(|r| r.ended()))
                .unwrap_or(0);
            if let Some(id) = order.remove(pos) {
                map.remove(&id);
            }
        }
        map.insert(op_id.clone(), rec.clone());
        order.push_back(op_id.clone());
        rec
    }

    pub(crate) fn get(&self, op_id: &OpId) -> Option<Arc<Record>> {
        self.inner.lock().expect("ops lock").0.get(op_id).cloned()
    }
}

impl Record {
    pub(crate) fn push(&self, event: Value) {
        let mut st = self.state.lock().expect("op lock");
        if st.events.len() < MAX_EVENTS {
            st.events.push(event);
        }
        drop(st);
        self.changed.send_modify(|n| *n += 1);
    }

    pub(crate) fn end(&self, end: Value) {
        self.state.lock().expect("op lock").end = Some(end);
        self.changed.send_modify(|n| *n += 1);
    }

    /// `op.status`'s answer for an operation the runner never saw (it
    /// failed its checks before it began): what this record holds.
    pub(crate) fn status(&self, op_id: &OpId) -> Value {
        let st = self.state.lock().expect("op lock");
        serde_json::json!({
            "op_id": op_id,
            "kind": self.method,
            "subject": "",
            "stages": st.events,
            "done": st.end.is_some(),
            "error": st.end.as_ref().and_then(|e| e["error"]["message"].as_str()),
        })
    }

    fn ended(&self) -> bool {
        self.state.lock().expect("op lock").end.is_some()
    }

    /// A follower, or `None` when [`MAX_FOLLOWERS`] already follow.
    pub(crate) fn follow(self: &Arc<Self>) -> Option<Follower> {
        let prev = self.followers.fetch_add(1, Ordering::SeqCst);
        let f = Follower {
            rx: self.changed.subscribe(),
            rec: self.clone(),
            sent: 0,
            ended: false,
        };
        (prev < MAX_FOLLOWERS).then_some(f)
    }
}

/// Reads one operation's events in order, then its end.
#[derive(Debug)]
pub(crate) struct Follower {
    rec: Arc<Record>,
    rx: watch::Receiver<u64>,
    sent: usize,
    ended: bool,
}

impl Drop for Follower {
    fn drop(&mut self) {
        self.rec.followers.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What a follower reads next.
#[derive(Debug)]
pub(crate) enum Next {
    Stage(Value),
    End(Value),
}

impl Follower {
    /// The next event (waiting for it), or `None` after the end.
    pub(crate) async fn next(&mut self) -> Option<Next> {
        loop {
            if self.ended {
                return None;
            }
            let (ev, end) = {
                let st = self.rec.state.lock().expect("op lock");
                (st.events.get(self.sent).cloned(), st.end.clone())
            };
            if let Some(ev) = ev {
                self.sent += 1;
                return Some(Next::Stage(ev));
            }
            if let Some(end) = end {
                self.ended = true;
                return Some(Next::End(end));
            }
            if self.rx.changed().await.is_err() {
                return None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[tokio::test]
    async fn followers_replay_then_follow_then_end() {
        let reg = Registry::default();
        let id = OpId::mint();
        let rec = reg.insert(&id, "vm.create");
        rec.push(json!({"stage": "a"}));
        let mut f = reg.get(&id).unwrap().follow().unwrap();
        assert!(matches!(f.next().await, Some(Next::Stage(v)) if v["stage"] == "a"));
        let live = tokio::spawn(async move {
            let mut seen = Vec::new();
            while let Some(n) = f.next().await {
                seen.push(match n {
                    Next::Stage(v) => v["stage"].as_str().unwrap().to_string(),
                    Next::End(v) => format!("end {}", v["ok"]),
                });
            }
            seen
        });
        tokio::task::yield_now().await;
        rec.push(json!({"stage": "b"}));
        rec.end(json!({"ok": true}));
        assert_eq!(live.await.unwrap(), vec!["b", "end true"]);
    }

    #[test]
    fn followers_are_bounded_per_operation() {
        let reg = Registry::default();
        let rec = reg.insert(&OpId::mint(), "vm.create");
        let held: Vec<_> = (0..MAX_FOLLOWERS)
            .map(|_| rec.follow().expect("within the bound"))
            .collect();
        assert!(rec.follow().is_none());
        drop(held);
        assert!(rec.follow().is_some());
    }

    #[test]
    fn the_registry_keeps_a_bounded_number() {
        let reg = Registry::default();
        let first = OpId::mint();
        reg.insert(&first, "vm.create").end(json!({"ok": true}));
        for _ in 0..KEEP {
            reg.insert(&OpId::mint(), "vm.create");
        }
        assert!(reg.get(&first).is_none());
        assert_eq!(reg.inner.lock().unwrap().0.len(), KEEP);
    }
}
