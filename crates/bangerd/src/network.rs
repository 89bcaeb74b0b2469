//! `NetworkService`: the host side of guest networking. Owns the bridge's
//! subnet and the warm TAP pool; all privileged work goes through the helper.
//!
//! Set up lazily by the first VM that needs it: the bridge (its existing
//! address wins, so the subnet survives daemon restarts; otherwise a /24
//! that collides with no host route), banger's NAT table, and the pool.

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use banger_net::{TapHelper, TapPool, TapPoolConfig, gateway, pick_subnet};
use banger_wire::helper::{
    CreateTapParams, DeleteTapParams, EnsureBridgeParams, EnsureNatParams, GuardTapParams,
    InspectParams, InspectResult, NetCreateTap, NetDeleteTap, NetEnsureBridge, NetEnsureNat,
    NetGuardTap, NetInspect, NetList, NetListResult, NetSweepGuards, NetUnguardTap,
    SweepGuardsParams, SweepGuardsResult, UnguardTapParams,
};
use banger_wire::{NoParams, OpId};
use ipnet::Ipv4Net;
use tokio::sync::OnceCell;
use tracing::{info, warn};

use crate::dns::DnsService;
use crate::forward::ForwardService;
use crate::helper::{HelperError, HelperLink};
use crate::proxy::SecretsProxy;

#[derive(Debug, Clone)]
pub struct NetworkSettings {
    pub bridge: String,
    /// banger's nftables tables (family inet: NAT and forwarding; family
    /// bridge: each tap's guard), this install's own.
    pub table: String,
    /// Preferred subnet; any free /24 in 172.16.0.0/12 when `None`.
    pub subnet: Option<Ipv4Net>,
    pub tap_pool: usize,
    /// The policy of VMs created without `--net` (`[network] default_policy`).
    pub default_policy: banger_net::Policy,
    /// The TAP pool's record of its taps (`<runtime>/tap-pool`).
    pub pool_record: PathBuf,
}

#[derive(Debug)]
pub struct NetworkService {
    helper: Arc<HelperLink>,
    settings: NetworkSettings,
    ready: OnceCell<Ready>,
    /// VM names on the bridge address, from the moment the bridge is up.
    dns: Arc<DnsService>,
    forwards: Arc<ForwardService>,
    /// Where secret-bearing guests' HTTPS goes.
    proxy: Arc<SecretsProxy>,
}

#[derive(Debug)]
struct Ready {
    subnet: Ipv4Net,
    pool: TapPool<HelperTaps>,
}

/// What a guest needs to configure its interface.
#[derive(Debug, Clone, Copy)]
pub struct GuestNet {
    pub subnet: Ipv4Net,
    pub gateway: Ipv4Addr,
}

/// The helper, as the TAP pool sees it. Each call is its own operation.
#[derive(Debug, Clone)]
pub struct HelperTaps(Arc<HelperLink>);

impl TapHelper for HelperTaps {
    type Error = HelperError;
    async fn create_tap(&self, params: CreateTapParams) -> Result<(), HelperError> {
        self.0
            .call::<NetCreateTap>(&OpId::mint(), &params)
            .await
            .map(|_| ())
    }
    async fn delete_tap(&self, name: String) -> Result<(), HelperError> {
        self.0
            .call::<NetDeleteTap>(&OpId::mint(), &DeleteTapParams { name })
            .await
            .map(|_| ())
    }
    async fn list(&self) -> Result<NetListResult, HelperError> {
        self.0.call::<NetList>(&OpId::mint(), &NoParams {}).await
    }
    fn cut_short(error: &HelperError) -> bool {
        // No answer (the helper died in the call, or is dying); an answer,
        // even a failure, means the helper finished the call.
        matches!(error, HelperError::Unavailable(_))
    }
}

/// What setting up or using the guest network can fail with.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error(transparent)]
    Helper(#[from] HelperError),
    #[error("cannot read the host's routes: {0}")]
    HostRoutes(String),
    /// Every candidate subnet (or the configured one) is taken.
    #[error(
        "no free /24 for banger's bridge: {0} collides with the host's networks; set [network] subnet"
    )]
    NoFreeSubnet(String),
    #[error("cannot start the TAP pool: {0}")]
    TapPool(String),
    #[error("no TAP device: {0}")]
    NoTap(String),
}

impl NetworkService {
    pub fn new(
        helper: Arc<HelperLink>,
        settings: NetworkSettings,
        dns: Arc<DnsService>,
        forwards: Arc<ForwardService>,
        proxy: Arc<SecretsProxy>,
    ) -> Self {
        NetworkService {
            helper,
            settings,
            ready: OnceCell::new(),
            dns,
            forwards,
            proxy,
        }
    }

    pub fn proxy(&self) -> &Arc<SecretsProxy> {
        &self.proxy
    }

    pub fn dns(&self) -> &DnsService {
        &self.dns
    }

    pub fn forwards(&self) -> &ForwardService {
        &self.forwards
    }

    pub fn default_policy(&self) -> &banger_net::Policy {
        &self.settings.default_policy
    }

    pub fn bridge(&self) -> &str {
        &self.settings.bridge
    }

    /// Bridge, NAT and pool, set up once. `in_use` are the taps of VMs that
    /// are running now: the pool must not adopt them.
    async fn ready(&self, op_id: &OpId, in_use: &HashSet<String>) -> Result<&Ready, NetworkError> {
        self.ready
            .get_or_try_init(|| self.set_up(op_id, in_use))
            .await
    }

    async fn set_up(&self, op_id: &OpId, in_use: &HashSet<String>) -> Result<Ready, NetworkError> {
        let bridge = &self.settings.bridge;
        let listed = self.helper.call::<NetList>(op_id, &NoParams {}).await?;
        let existing = listed
            .bridges
            .iter()
            .find(|b| &b.name == bridge)
            .and_then(|b| b.addrs.first())
            .and_then(|a| a.parse::<ipnet::Ipv4Net>().ok());
        let (subnet, gw_cidr) = match existing {
            Some(gw) => (gw.trunc(), gw.to_string()),
            None => {
                let taken = banger_net::host_networks(Some(bridge))
                    .await
                    .map_err(|e| NetworkError::HostRoutes(e.to_string()))?;
                let subnet = pick_subnet(&taken, self.settings.subnet).ok_or_else(|| {
                    NetworkError::NoFreeSubnet(self.settings.subnet.map_or_else(
                        || "every candidate in 172.16.0.0/12".to_string(),
                        |s| s.to_string(),
                    ))
                })?;
                let gw = Ipv4Net::new(gateway(subnet), subnet.prefix_len())
                    .expect("prefix from a valid net");
                (subnet, gw.to_string())
            }
        };
        if let Some(preferred) = self.settings.subnet
            && preferred != subnet
        {
            warn!(%preferred, %subnet, "bridge {bridge} already has another subnet; keeping it");
        }
        self.helper
            .call::<NetEnsureBridge>(
                op_id,
                &EnsureBridgeParams {
                    name: bridge.clone(),
                    gateway_cidr: gw_cidr,
                    install: self.settings.table.clone(),
                },
            )
            .await?;
        let nat = self
            .helper
            .call::<NetEnsureNat>(
                op_id,
                &EnsureNatParams {
                    table: self.settings.table.clone(),
                    subnet_cidr: subnet.to_string(),
                    bridge: bridge.clone(),
                },
            )
            .await?;
        self.dns.serve(gateway(subnet)).await;
        if nat.ip_forward_enabled {
            info!("banger-helper enabled net.ipv4.ip_forward for guest NAT");
        }
        let pool = TapPool::start(
            HelperTaps(self.helper.clone()),
            TapPoolConfig {
                capacity: self.settings.tap_pool,
                bridge: bridge.clone(),
                owner_uid: rustix::process::getuid().as_raw(),
                retry_delay: Duration::from_secs(2),
                record: self.settings.pool_record.clone(),
            },
            in_use,
        )
        .await
        .map_err(|e| NetworkError::TapPool(e.to_string()))?;
        info!(%subnet, bridge = %bridge, "guest network ready");
        Ok(Ready { subnet, pool })
    }

    /// The guest network, setting it up on first use.
    pub async fn guest_net(
        &self,
        op_id: &OpId,
        in_use: &HashSet<String>,
    ) -> Result<GuestNet, NetworkError> {
        let r = self.ready(op_id, in_use).await?;
        Ok(GuestNet {
            subnet: r.subnet,
            gateway: gateway(r.subnet),
        })
    }

    /// A TAP on the bridge, from the warm pool, not yet guarded: until
    /// [`Self::guard_tap`] gives it its guest, the table drops everything
    /// that comes from it (a tap without a guard, for a VM without an
    /// address, carries nothing).
    pub async fn acquire_tap(
        &self,
        op_id: &OpId,
        in_use: &HashSet<String>,
    ) -> Result<String, NetworkError> {
        let r = self.ready(op_id, in_use).await?;
        r.pool
            .acquire()
            .await
            .map_err(|e| NetworkError::NoTap(e.to_string()))
    }

    /// Guard `tap` so that the guest behind it sends only from `mac` and
    /// `ip`, where `policy` allows (again: for a guest adopted after
    /// `net.ensure_nat` made the table anew, or whose policy changed).
    pub async fn guard_tap(
        &self,
        op_id: &OpId,
        tap: &str,
        mac: &str,
        ip: Ipv4Addr,
        policy: &str,
    ) -> Result<(), NetworkError> {
        self.helper
            .call::<NetGuardTap>(
                op_id,
                &GuardTapParams {
                    table: self.settings.table.clone(),
                    tap: tap.into(),
                    bridge: self.settings.bridge.clone(),
                    mac: mac.into(),
                    ip: ip.to_string(),
                    policy: policy.into(),
                    secrets_proxy: self.proxy.is_proxied(ip),
                },
            )
            .await?;
        // The helper checked it: it parses.
        if let Ok(policy) = policy.parse() {
            self.dns.set_policy(ip, tap, policy);
        }
        Ok(())
    }

    /// Taps on banger's bridge, and those of them the TAP pool holds: its
    /// own when it runs, else the ones its record names (the next pool
    /// start adopts exactly those).
    pub async fn bridge_taps(
        &self,
        op_id: &OpId,
    ) -> Result<(Vec<String>, HashSet<String>), NetworkError> {
        let listed = self.helper.call::<NetList>(op_id, &NoParams {}).await?;
        let taps = listed
            .taps
            .into_iter()
            .filter(|t| t.bridge.as_deref() == Some(self.bridge()))
            .map(|t| t.name)
            .collect();
        let pool = match self.ready.get() {
            Some(r) => r.pool.owned().into_iter().collect(),
            None => banger_net::recorded_taps(&self.settings.pool_record),
        };
        Ok((taps, pool))
    }

    /// The tap guards and guest policies that none of `keep_taps` /
    /// `keep_ips` explains; removed unless `dry_run` (garbage collection).
    pub async fn sweep_guards(
        &self,
        op_id: &OpId,
        keep_taps: Vec<String>,
        keep_ips: Vec<Ipv4Addr>,
        dry_run: bool,
    ) -> Result<SweepGuardsResult, NetworkError> {
        Ok(self
            .helper
            .call::<NetSweepGuards>(
                op_id,
                &SweepGuardsParams {
                    table: self.settings.table.clone(),
                    keep_taps,
                    keep_ips: keep_ips.iter().map(ToString::to_string).collect(),
                    dry_run,
                },
            )
            .await?)
    }

    /// Delete a tap outright (garbage collection).
    pub async fn delete_tap(&self, op_id: &OpId, name: &str) -> Result<(), NetworkError> {
        Ok(self
            .helper
            .call::<NetDeleteTap>(
                op_id,
                &DeleteTapParams {
                    name: name.to_string(),
                },
            )
            .await
            .map(drop)?)
    }

    /// What the guard and policy of the guest at `ip` behind `tap` dropped,
    /// and what `learn` recorded.
    pub async fn inspect(
        &self,
        op_id: &OpId,
        tap: &str,
        ip: Ipv4Addr,
    ) -> Result<InspectResult, NetworkError> {
        Ok(self
            .helper
            .call::<NetInspect>(
                op_id,
                &InspectParams {
                    table: self.settings.table.clone(),
                    tap: tap.into(),
                    ip: ip.to_string(),
                },
            )
            .await?)
    }

    /// Give a VM's TAP back (kept warm, or deleted beyond the pool's size),
    /// its guard and the policy of its guest at `ip` removed first.
    pub async fn release_tap(&self, tap: String, ip: Option<Ipv4Addr>) {
        if let Some(ip) = ip {
            self.dns.clear_policy(ip);
            self.proxy.unregister(ip);
        }
        if let Err(e) = self
            .helper
            .call::<NetUnguardTap>(
                &OpId::mint(),
                &UnguardTapParams {
                    table: self.settings.table.clone(),
                    tap: tap.clone(),
                    ip: ip.map(|ip| ip.to_string()),
                },
            )
            .await
        {
            warn!(tap = %tap, error = %e, "cannot remove the TAP's guard");
        }
        let result = match self.ready.get() {
            Some(r) => r.pool.release(tap.clone()).await,
            // The pool never started in this daemon (a dead VM found at startup): delete it.
            None => {
                HelperTaps(self.helper.clone())
                    .delete_tap(tap.clone())
                    .await
            }
        };
        if let Err(e) = result {
            warn!(tap = %tap, error = %e, "cannot release TAP");
        }
    }
}
