//! A warm pool of TAP devices, so that starting a VM does no netlink work:
//! [`TapPool::acquire`] pops a tap that already exists, is attached to the
//! bridge and up; a background task refills the pool through the helper.

use std::collections::{HashSet, VecDeque};
use std::future::Future;
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
    /// Adopt the banger taps the helper reports on `config.bridge` that are
    /// up, owned by `config.owner_uid` and not in `in_use` (taps of VMs
    /// still running), up to capacity; delete the rest of those on the
    /// bridge; then start refilling in the background. Taps on other
    /// bridges and those in `in_use` are left alone. Must be called inside a
    /// tokio runtime.
    pub async fn start(
        helper: H,
        config: TapPoolConfig,
        in_use: &HashSet<String>,
    ) -> Result<Self, H::Error> {
        let listing = helper.list().await?;
        let mut ready = VecDeque::new();
        let mut stale = Vec::new();
        for tap in listing.taps {
            if in_use.contains(&tap.name) || tap.bridge.as_deref() != Some(&config.bridge) {
                continue;
            }
            if tap.up && tap.owner_uid == Some(config.owner_uid) && ready.len() < config.capacity {
                ready.push_back(tap.name);
            } else {
                stale.push(tap.name);
            }
        }
        for name in stale {
            match helper.delete_tap(name.clone()).await {
                Ok(()) => debug!(tap = %name, "deleted a stale or surplus tap"),
                Err(e) => warn!(tap = %name, error = %e, "cannot delete a stale tap"),
            }
        }
        info!(adopted = ready.len(), capacity = config.capacity, bridge = %config.bridge, "tap pool starting");
        let inner = Arc::new(Inner {
            helper,
            config,
            state: Mutex::new(PoolState {
                ready,
                creating: Vec::new(),
            }),
            wake: Notify::new(),
        });
        let refill = tokio::spawn(refill(inner.clone()));
        Ok(TapPool { inner, refill })
    }

    /// A tap ready for a VMM to open. From the pool without any helper call
    /// when one is ready; otherwise created on the spot.
    pub async fn acquire(&self) -> Result<String, H::Error> {
        let popped = self.inner.lock().ready.pop_front();
        self.inner.wake.notify_one();
        if let Some(name) = popped {
            return Ok(name);
        }
        let name = fresh_tap_name();
        debug!(tap = %name, "tap pool empty: creating a tap on demand");
        self.inner
            .helper
            .create_tap(self.inner.params(&name))
            .await?;
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
            }
            short
        };
        if !short {
            inner.wake.notified().await;
            continue;
        }
        let created = inner.helper.create_tap(inner.params(&name)).await;
        {
            let mut s = inner.lock();
            s.creating.retain(|n| *n != name);
            if created.is_ok() {
                s.ready.push_back(name.clone());
            }
        }
        if let Err(e) = created {
            warn!(tap = %name, error = %e, retry_in_ms = inner.config.retry_delay.as_millis() as u64, "cannot refill the tap pool");
            tokio::time::sleep(inner.config.retry_delay).await;
        }
    }
}
