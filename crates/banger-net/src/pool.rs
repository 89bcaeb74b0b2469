//! A warm pool of TAP devices, so that starting a VM does no netlink work:
//! [`TapPool::acquire`] pops a tap that already exists, is attached to the
//! bridge and up; a background task refills the pool through the helper.
//!
//! The pool keeps the names of the taps it holds in its record file
//! ([`TapPoolConfig::record`]), rewritten on every change: a leak check made
//! before the next pool starts (after a daemon restart) tells the pool's
//! taps from leaked ones by name ([`recorded_taps`]), and the next pool
//! adopts exactly those.

use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use banger_wire::helper::{CreateTapParams, NetListResult};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::names::TAP_PREFIX;

/// What the pool needs from `banger-helper`. The daemon's helper link
/// implements it with `net.create_tap`, `net.delete_tap` and `net.list`.
pub trait TapHelper: Send + Sync + 'static {
    type Error: std::fmt::Display + Send + 'static;
    fn create_tap(
        &self,
        params: CreateTapParams,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;
    fn delete_tap(&self, name: String) -> impl Future<Output = Result<(), Self::Error>> + Send;
    fn list(&self) -> impl Future<Output = Result<NetListResult, Self::Error>> + Send;
    /// Whether the call was cut short: the helper went away mid-call, so
    /// what it did is unknown. A `create_tap` cut short may have left part
    /// of the tap; one that failed with an answer did not (the helper
    /// undoes its own partial work, and a tap by that name that existed
    /// before, which it refused to touch, is not the pool's to delete).
    fn cut_short(error: &Self::Error) -> bool;
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TapPoolConfig {
    /// Taps kept ready.
    pub capacity: usize,
    /// Bridge the taps are attached to.
    pub bridge: String,
    /// Uid that may open the taps (the daemon's, which runs the VMMs).
    pub owner_uid: u32,
    /// Pause after a failed refill before trying again.
    pub retry_delay: Duration,
    /// The file naming the taps the pool holds (ready or being created).
    /// Taps live until the host reboots: keep it where the runtime files are.
    pub record: PathBuf,
}

/// The taps a pool's record file names (none when there is no file).
pub fn recorded_taps(record: &Path) -> HashSet<String> {
    std::fs::read_to_string(record)
        .map(|s| s.lines().map(str::to_owned).collect())
        .unwrap_or_default()
}

#[derive(Debug, Default)]
struct PoolState {
    ready: VecDeque<String>,
    /// Taps the refill task is creating right now.
    creating: Vec<String>,
}

#[derive(Debug)]
struct Inner<H> {
    helper: H,
    config: TapPoolConfig,
    state: Mutex<PoolState>,
    wake: Notify,
}

impl<H: TapHelper> Inner<H> {
    fn params(&self, name: &str) -> CreateTapParams {
        CreateTapParams {
            name: name.to_owned(),
            bridge: self.config.bridge.clone(),
            owner_uid: self.config.owner_uid,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Rewrite the record from `s`. Called with the state locked, so the
    /// file always names what the pool holds: a tap is recorded before the
    /// helper is asked to create it, and unrecorded when a VM takes it.
    fn save(&self, s: &PoolState) {
        save_record(&self.config.record, s);
    }

    /// After a `create_tap` cut short: delete whatever part of the tap
    /// exists (a helper killed half way leaves a tap off the bridge).
    async fn discard(&self, name: &str) {
        if let Err(e) = self.helper.delete_tap(name.to_owned()).await {
            warn!(tap = %name, error = %e, "cannot delete a tap whose creation was cut short");
        }
    }
}

fn save_record(record: &Path, s: &PoolState) {
    let mut text = String::new();
    for name in s.ready.iter().chain(&s.creating) {
        text.push_str(name);
        text.push('\n');
    }
    let tmp = record.with_extension("tmp");
    if let Err(e) = std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, record)) {
        warn!(record = %record.display(), error = %e, "cannot record the tap pool's taps");
    }
}

/// A fresh pool tap name, `bg-t` and 8 hex digits.
pub fn fresh_tap_name() -> String {
    format!("{TAP_PREFIX}t{:08x}", fastrand::u32(..))
}

/// Warm TAP devices. Dropping the pool stops refilling; the taps stay for
/// the next daemon to adopt.
#[derive(Debug)]
pub struct TapPool<H: TapHelper> {
    inner: Arc<Inner<H>>,
    refill: JoinHandle<()>,
}

impl<H: TapHelper> Drop for TapPool<H> {
    fn drop(&mut self) {
        self.refill.abort();
    }
}

impl<H: TapHelper> TapPool<H> {
    /// Adopt the taps the helper reports on `config.bridge` that the last
    /// pool recorded, that are up, owned by `config.owner_uid` and not in
    /// `in_use` (taps of VMs still running), up to capacity; delete the rest
    /// of those on the bridge (a tap no pool recorded and no running VM
    /// holds is a leak); then start refilling in the background. Taps on
    /// other bridges and those in `in_use` are left alone. Must be called
    /// inside a tokio runtime.
    pub async fn start(
        helper: H,
        config: TapPoolConfig,
        in_use: &HashSet<String>,
    ) -> Result<Self, H::Error> {
        let listing = helper.list().await?;
        let recorded = recorded_taps(&config.record);
        let mut ready = VecDeque::new();
        let mut stale = Vec::new();
        for tap in listing.taps {
            if in_use.contains(&tap.name) || tap.bridge.as_deref() != Some(&config.bridge) {
                continue;
            }
            if recorded.contains(&tap.name)
                && tap.up
                && tap.owner_uid == Some(config.owner_uid)
                && ready.len() < config.capacity
            {
                ready.push_back(tap.name);
            } else {
                stale.push(tap.name);
            }
        }
        let state = PoolState {
            ready,
            creating: Vec::new(),
        };
        save_record(&config.record, &state);
        for name in stale {
            match helper.delete_tap(name.clone()).await {
                Ok(()) => debug!(tap = %name, "deleted a stale or surplus tap"),
                Err(e) => warn!(tap = %name, error = %e, "cannot delete a stale tap"),
            }
        }
        info!(adopted = state.ready.len(), capacity = config.capacity, bridge = %config.bridge, "tap pool starting");
        let inner = Arc::new(Inner {
            helper,
            config,
            state: Mutex::new(state),
            wake: Notify::new(),
        });
        let refill = tokio::spawn(refill(inner.clone()));
        Ok(TapPool { inner, refill })
    }

    /// A tap ready for a VMM to open. From the pool without any helper call
    /// when one is ready; otherwise created on the spot.
    pub async fn acquire(&self) -> Result<String, H::Error> {
        let popped = {
            let mut s = self.inner.lock();
            let popped = s.ready.pop_front();
            if popped.is_some() {
                self.inner.save(&s);
            }
            popped
        };
        self.inner.wake.notify_one();
        if let Some(name) = popped {
            return Ok(name);
        }
        let name = fresh_tap_name();
        debug!(tap = %name, "tap pool empty: creating a tap on demand");
        if let Err(e) = self.inner.helper.create_tap(self.inner.params(&name)).await {
            if H::cut_short(&e) {
                self.inner.discard(&name).await;
            }
            return Err(e);
        }
        Ok(name)
    }

    /// Give back a tap whose VMM has exited: kept if the pool has room,
    /// deleted otherwise.
    pub async fn release(&self, name: String) -> Result<(), H::Error> {
        {
            let mut s = self.inner.lock();
            if s.ready.len() + s.creating.len() < self.inner.config.capacity
                && !s.ready.contains(&name)
            {
                s.ready.push_back(name);
                self.inner.save(&s);
                return Ok(());
            }
        }
        self.inner.helper.delete_tap(name).await
    }

    /// Taps ready right now.
    pub fn ready(&self) -> usize {
        self.inner.lock().ready.len()
    }

    /// Every tap the pool holds: ready ones and ones being created.
    pub fn owned(&self) -> Vec<String> {
        let s = self.inner.lock();
        s.ready.iter().chain(s.creating.iter()).cloned().collect()
    }
}

/// Keep the pool at capacity, one tap at a time; sleep until woken when full.
async fn refill<H: TapHelper>(inner: Arc<Inner<H>>) {
    loop {
        let name = fresh_tap_name();
        let short = {
            let mut s = inner.lock();
            let short = s.ready.len() + s.creating.len() < inner.config.capacity;
            if short {
                s.creating.push(name.clone());
                inner.save(&s);
            }
            short
        };
        if !short {
            inner.wake.notified().await;
            continue;
        }
        let created = inner.helper.create_tap(inner.params(&name)).await;
        if created.as_ref().is_err_and(H::cut_short) {
            // Still recorded while it goes: the leak check never sees it unexplained.
            inner.discard(&name).await;
        }
        {
            let mut s = inner.lock();
            s.creating.retain(|n| *n != name);
            if created.is_ok() {
                s.ready.push_back(name.clone());
            }
            inner.save(&s);
        }
        if let Err(e) = created {
            warn!(tap = %name, error = %e, retry_in_ms = inner.config.retry_delay.as_millis() as u64, "cannot refill the tap pool");
            tokio::time::sleep(inner.config.retry_delay).await;
        }
    }
}
