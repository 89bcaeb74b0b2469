//! The warm tap pool against a fake helper.

use std::collections::{BTreeMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use banger_net::pool::fresh_tap_name;
use banger_net::{TapHelper, TapPool, TapPoolConfig, recorded_taps};
use banger_wire::helper::{CreateTapParams, NetListResult, TapInfo};

const UID: u32 = 1000;
/// The error of a create cut short (the helper went away mid-call).
const CUT_SHORT: &str = "the helper went away";

#[derive(Debug, Clone, PartialEq)]
enum Op {
    Create(String),
    Delete(String),
    List,
}

#[derive(Debug, Default)]
struct FakeHelper {
    taps: Mutex<BTreeMap<String, TapInfo>>,
    ops: Mutex<Vec<Op>>,
    /// Creates that fail before creates succeed again.
    failing_creates: Mutex<usize>,
    /// Creates that fail having made the tap but not attached it, as a
    /// helper killed half way does.
    half_made_creates: Mutex<usize>,
}

impl FakeHelper {
    fn with_taps(taps: &[(&str, Option<&str>, bool, Option<u32>)]) -> Self {
        let fake = FakeHelper::default();
        for (name, bridge, up, owner) in taps {
            fake.taps.lock().unwrap().insert(
                name.to_string(),
                TapInfo {
                    name: name.to_string(),
                    bridge: bridge.map(str::to_owned),
                    up: *up,
                    owner_uid: *owner,
                },
            );
        }
        fake
    }
}

impl TapHelper for FakeHelper {
    type Error = String;

    async fn create_tap(&self, p: CreateTapParams) -> Result<(), String> {
        self.ops.lock().unwrap().push(Op::Create(p.name.clone()));
        let mut failing = self.failing_creates.lock().unwrap();
        if *failing > 0 {
            *failing -= 1;
            return Err("injected failure".into());
        }
        let mut taps = self.taps.lock().unwrap();
        if taps.contains_key(&p.name) {
            return Err(format!("{} exists", p.name));
        }
        let mut half_made = self.half_made_creates.lock().unwrap();
        if *half_made > 0 {
            *half_made -= 1;
            let tap = TapInfo {
                name: p.name.clone(),
                bridge: None,
                up: false,
                owner_uid: Some(p.owner_uid),
            };
            taps.insert(p.name, tap);
            return Err(CUT_SHORT.into());
        }
        taps.insert(
            p.name.clone(),
            TapInfo {
                name: p.name,
                bridge: Some(p.bridge),
                up: true,
                owner_uid: Some(p.owner_uid),
            },
        );
        Ok(())
    }

    async fn delete_tap(&self, name: String) -> Result<(), String> {
        self.ops.lock().unwrap().push(Op::Delete(name.clone()));
        self.taps.lock().unwrap().remove(&name);
        Ok(())
    }

    fn cut_short(error: &String) -> bool {
        error == CUT_SHORT
    }

    async fn list(&self) -> Result<NetListResult, String> {
        self.ops.lock().unwrap().push(Op::List);
        Ok(NetListResult {
            taps: self.taps.lock().unwrap().values().cloned().collect(),
            ..NetListResult::default()
        })
    }
}

fn config(capacity: usize, dir: &tempfile::TempDir) -> TapPoolConfig {
    TapPoolConfig {
        capacity,
        bridge: "banger0".into(),
        owner_uid: UID,
        retry_delay: Duration::from_millis(5),
        record: dir.path().join("tap-pool"),
    }
}

fn sorted(set: HashSet<String>) -> Vec<String> {
    let mut v: Vec<String> = set.into_iter().collect();
    v.sort();
    v
}

fn creates(fake: &FakeHelper) -> usize {
    fake.ops
        .lock()
        .unwrap()
        .iter()
        .filter(|o| matches!(o, Op::Create(_)))
        .count()
}

async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..500 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    panic!("timed out waiting for {what}");
}

/// Returns once every other task is parked. Under a paused clock
/// (`start_paused`) tokio moves time on only when the runtime has nothing
/// else to run, so this hour-long sleep ends exactly when the pool's
/// background work has settled: a negative assertion after it is not a
/// matter of timing.
async fn quiet() {
    tokio::time::sleep(Duration::from_secs(3600)).await;
}

/// The pool owns its helper; tests look at the fake through this shared handle.
#[derive(Debug, Clone, Default)]
struct Shared(std::sync::Arc<FakeHelper>);

impl TapHelper for Shared {
    type Error = String;
    async fn create_tap(&self, p: CreateTapParams) -> Result<(), String> {
        self.0.create_tap(p).await
    }
    async fn delete_tap(&self, name: String) -> Result<(), String> {
        self.0.delete_tap(name).await
    }
    async fn list(&self) -> Result<NetListResult, String> {
        self.0.list().await
    }
    fn cut_short(error: &String) -> bool {
        FakeHelper::cut_short(error)
    }
}

#[test]
fn fresh_names_are_banger_tap_names() {
    for _ in 0..100 {
        let n = fresh_tap_name();
        assert!(banger_net::names::is_tap_name(&n), "{n}");
        assert!(n.starts_with("bg-t") && n.len() == 12, "{n}");
    }
}

#[tokio::test(start_paused = true)]
async fn fills_to_capacity_in_the_background() {
    let fake = Shared::default();
    let dir = tempfile::tempdir().unwrap();
    let pool = TapPool::start(fake.clone(), config(3, &dir), &HashSet::new())
        .await
        .unwrap();
    until("a full pool", || pool.ready() == 3).await;
    quiet().await;
    assert_eq!(creates(&fake.0), 3, "created beyond capacity");
    let taps = fake.0.taps.lock().unwrap().clone();
    assert_eq!(taps.len(), 3);
    for t in taps.values() {
        assert_eq!(t.bridge.as_deref(), Some("banger0"));
        assert_eq!(t.owner_uid, Some(UID));
    }
}

#[tokio::test]
async fn acquire_does_no_helper_work_when_a_tap_is_ready() {
    let fake = Shared::default();
    let dir = tempfile::tempdir().unwrap();
    let pool = TapPool::start(fake.clone(), config(2, &dir), &HashSet::new())
        .await
        .unwrap();
    until("a full pool", || pool.ready() == 2).await;
    let ops_before = fake.0.ops.lock().unwrap().len();
    // On this single-threaded runtime the refill task cannot run until we
    // await something else: whatever acquire did, it did alone.
    let name = pool.acquire().await.unwrap();
    assert_eq!(
        fake.0.ops.lock().unwrap().len(),
        ops_before,
        "hot path called the helper"
    );
    assert!(fake.0.taps.lock().unwrap().contains_key(&name));
    assert_eq!(pool.ready(), 1);
    until("a refill", || pool.ready() == 2).await;
    assert_eq!(creates(&fake.0), 3);
    let other = pool.acquire().await.unwrap();
    assert_ne!(name, other);
}

#[tokio::test]
async fn empty_pool_creates_on_demand() {
    let fake = Shared::default();
    let dir = tempfile::tempdir().unwrap();
    let pool = TapPool::start(fake.clone(), config(0, &dir), &HashSet::new())
        .await
        .unwrap();
    let name = pool.acquire().await.unwrap();
    assert!(fake.0.taps.lock().unwrap().contains_key(&name));
    assert_eq!(
        fake.0.ops.lock().unwrap().clone(),
        [Op::List, Op::Create(name.clone())]
    );
    // With no room, a released tap is deleted.
    pool.release(name.clone()).await.unwrap();
    assert!(fake.0.taps.lock().unwrap().is_empty());
    assert_eq!(fake.0.ops.lock().unwrap().last(), Some(&Op::Delete(name)));
}

#[tokio::test]
async fn release_keeps_taps_while_there_is_room() {
    let fake = Shared::default();
    let dir = tempfile::tempdir().unwrap();
    let pool = TapPool::start(fake.clone(), config(2, &dir), &HashSet::new())
        .await
        .unwrap();
    until("a full pool", || pool.ready() == 2).await;
    let a = pool.acquire().await.unwrap();
    let b = pool.acquire().await.unwrap();
    // Released before the refill ran: back into the pool, nothing deleted.
    pool.release(a.clone()).await.unwrap();
    pool.release(b.clone()).await.unwrap();
    assert_eq!(pool.ready(), 2);
    assert!(
        !fake
            .0
            .ops
            .lock()
            .unwrap()
            .iter()
            .any(|o| matches!(o, Op::Delete(_)))
    );
    // Full now: one more is deleted.
    let c = pool.acquire().await.unwrap();
    until("a full pool", || pool.ready() == 2).await;
    pool.release(c.clone()).await.unwrap();
    assert_eq!(
        fake.0.ops.lock().unwrap().last(),
        Some(&Op::Delete(c.clone()))
    );
    assert!(!fake.0.taps.lock().unwrap().contains_key(&c));
    assert_eq!(pool.ready(), 2);
}

#[tokio::test]
async fn refill_retries_after_helper_failures() {
    let fake = Shared::default();
    *fake.0.failing_creates.lock().unwrap() = 3;
    let dir = tempfile::tempdir().unwrap();
    let pool = TapPool::start(fake.clone(), config(2, &dir), &HashSet::new())
        .await
        .unwrap();
    until("a full pool", || pool.ready() == 2).await;
    assert_eq!(creates(&fake.0), 5);
    assert_eq!(fake.0.taps.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn start_adopts_recorded_usable_taps_and_cleans_up_the_rest() {
    let fake = Shared(std::sync::Arc::new(FakeHelper::with_taps(&[
        ("bg-ta", Some("banger0"), true, Some(UID)),
        ("bg-tb", Some("banger0"), true, Some(UID)),
        ("bg-tc", Some("banger0"), true, Some(UID)), // beyond capacity
        ("bg-leak", Some("banger0"), true, Some(UID)), // usable, but no pool's
        ("bg-vm1", Some("banger0"), true, Some(UID)), // in use by a running VM
        ("bg-down", Some("banger0"), false, Some(UID)),
        ("bg-root", Some("banger0"), true, Some(0)),
        ("bg-other", Some("banger-t1"), true, Some(UID)), // another bridge
        ("bg-loose", None, true, Some(UID)),
    ])));
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(2, &dir);
    std::fs::write(&cfg.record, "bg-ta\nbg-tb\nbg-tc\nbg-down\nbg-root\n").unwrap();
    let in_use: HashSet<String> = ["bg-vm1".to_owned()].into();
    let pool = TapPool::start(fake.clone(), cfg.clone(), &in_use)
        .await
        .unwrap();
    assert_eq!(pool.ready(), 2);
    assert_eq!(sorted(recorded_taps(&cfg.record)), ["bg-ta", "bg-tb"]);
    let mut got = vec![pool.acquire().await.unwrap(), pool.acquire().await.unwrap()];
    got.sort();
    assert_eq!(got, ["bg-ta", "bg-tb"]);
    let left: Vec<String> = fake.0.taps.lock().unwrap().keys().cloned().collect();
    assert_eq!(left, ["bg-loose", "bg-other", "bg-ta", "bg-tb", "bg-vm1"]);
    let ops = fake.0.ops.lock().unwrap().clone();
    assert!(!ops.iter().any(|o| matches!(o, Op::Create(_))), "{ops:?}");
}

#[tokio::test(start_paused = true)]
async fn the_record_names_exactly_the_taps_the_pool_holds() {
    let fake = Shared::default();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(2, &dir);
    let pool = TapPool::start(fake.clone(), cfg.clone(), &HashSet::new())
        .await
        .unwrap();
    until("a full pool", || pool.ready() == 2).await;
    quiet().await;
    let all: HashSet<String> = fake.0.taps.lock().unwrap().keys().cloned().collect();
    assert_eq!(recorded_taps(&cfg.record), all);
    // Taken by a VM: no longer the pool's. (On this single-threaded
    // runtime the refill cannot run before the release below.)
    let taken = pool.acquire().await.unwrap();
    assert!(!recorded_taps(&cfg.record).contains(&taken));
    // Given back while there is room: the pool's again.
    pool.release(taken.clone()).await.unwrap();
    assert!(recorded_taps(&cfg.record).contains(&taken));
    // Taken for good: the refill makes and records another.
    let taken = pool.acquire().await.unwrap();
    quiet().await;
    let record = recorded_taps(&cfg.record);
    assert!(!record.contains(&taken));
    assert_eq!(record.len(), 2);
    assert_eq!(record, pool.owned().into_iter().collect());
}

#[tokio::test(start_paused = true)]
async fn a_create_cut_short_leaves_no_half_made_tap() {
    // On demand (an empty pool): the half-made tap is deleted, the error returned.
    let fake = Shared::default();
    *fake.0.half_made_creates.lock().unwrap() = 1;
    let dir = tempfile::tempdir().unwrap();
    let pool = TapPool::start(fake.clone(), config(0, &dir), &HashSet::new())
        .await
        .unwrap();
    let err = pool.acquire().await.unwrap_err();
    assert_eq!(err, CUT_SHORT);
    assert!(fake.0.taps.lock().unwrap().is_empty(), "half-made tap left");
    // A failure the helper answered (it undid its own work, or refused a
    // name that exists): nothing is deleted, whatever has that name.
    *fake.0.failing_creates.lock().unwrap() = 1;
    pool.acquire().await.unwrap_err();
    let deletes = fake
        .0
        .ops
        .lock()
        .unwrap()
        .iter()
        .filter(|o| matches!(o, Op::Delete(_)))
        .count();
    assert_eq!(deletes, 1, "only the half-made tap was deleted");
    // In the background refill: likewise, and the pool fills anyway.
    let fake = Shared::default();
    *fake.0.half_made_creates.lock().unwrap() = 2;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(2, &dir);
    let pool = TapPool::start(fake.clone(), cfg.clone(), &HashSet::new())
        .await
        .unwrap();
    until("a full pool", || pool.ready() == 2).await;
    quiet().await;
    let taps = fake.0.taps.lock().unwrap().clone();
    assert_eq!(taps.len(), 2, "{taps:?}");
    assert!(
        taps.values()
            .all(|t| t.bridge.as_deref() == Some("banger0"))
    );
    assert_eq!(
        sorted(recorded_taps(&cfg.record)),
        sorted(taps.keys().cloned().collect())
    );
}

#[tokio::test(start_paused = true)]
async fn dropping_the_pool_stops_refilling() {
    let fake = Shared::default();
    let dir = tempfile::tempdir().unwrap();
    let pool = TapPool::start(fake.clone(), config(2, &dir), &HashSet::new())
        .await
        .unwrap();
    until("a full pool", || pool.ready() == 2).await;
    let _tap = pool.acquire().await.unwrap();
    drop(pool);
    quiet().await;
    assert_eq!(creates(&fake.0), 2, "refilled after the pool was dropped");
}
