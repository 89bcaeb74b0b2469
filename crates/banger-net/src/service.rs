//! The helper's `net.*` methods: check everything, then act through a
//! [`HostNet`], in an order that never leaves a half-made device behind.

use banger_wire::ErrorCode;
use banger_wire::helper::{
    AllowResolvedParams, BridgeInfo, CreateTapParams, DeleteBridgeParams, DeleteTapParams, Deleted,
    DeniedDest, EnsureBridgeParams, EnsureBridgeResult, EnsureNatParams, EnsureNatResult,
    GuardTapParams, InspectParams, InspectResult, LearnedDest, NetListResult, RemoveNatParams,
    SweepGuardsParams, SweepGuardsResult, TapInfo, UnguardTapParams,
};
use tokio::sync::Mutex;
use tracing::{debug, info, warn};

use crate::guard;
use crate::host::{HostError, HostNet, Link, LinkKind, NftSet};
use crate::installs::Install;
use crate::names::{
    NameError, check_bridge, check_table, check_tap, is_bridge_name, is_table_name, is_tap_name,
    parse_gateway, parse_subnet,
};
use crate::nat::{self, BRIDGE_FAMILY, FAMILY};
use crate::policy::Policy;

/// Why a `net.*` call failed.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The request names something banger does not own, or is malformed.
    #[error(transparent)]
    Refused(#[from] NameError),
    #[error("uid {0} is not one this helper serves, so it may not own a tap")]
    OwnerNotAllowed(u32),
    /// A malformed parameter.
    #[error("{0}")]
    Invalid(String),
    /// A caller asked to change what another uid owns.
    #[error("{0}")]
    NotYours(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    NotFound(String),
    #[error(transparent)]
    Host(#[from] HostError),
}

impl NetError {
    pub fn code(&self) -> ErrorCode {
        match self {
            NetError::Refused(_) | NetError::OwnerNotAllowed(_) | NetError::Invalid(_) => {
                ErrorCode::InvalidParams
            }
            NetError::NotYours(_) => ErrorCode::PermissionDenied,
            NetError::Conflict(_) => ErrorCode::Conflict,
            NetError::NotFound(_) => ErrorCode::NotFound,
            NetError::Host(_) => ErrorCode::Internal,
        }
    }
}

/// Run `check` before anything is done; a failure is logged as a refusal.
fn checked<T>(method: &str, check: impl FnOnce() -> Result<T, NetError>) -> Result<T, NetError> {
    let r = check();
    if let Err(e) = &r {
        warn!(method, error = %e, "refused a request outside banger's resources");
    }
    r
}

/// The sets of each table (family, name), as this helper last read or
/// left them: a guard needs to know which of its guest's packet-path sets
/// exist ([`guard::DynSets`]), and listing them costs an `nft` process on
/// the way of every boot and restore. A hint only: a transaction built on
/// a stale one fails whole (nft applies all or nothing), and the call then
/// forgets the table, lists, and tries again.
#[derive(Debug, Default)]
struct KnownSets(std::collections::HashMap<String, std::collections::HashSet<(String, String)>>);

impl KnownSets {
    fn dyn_sets(&self, table: &str, ip: std::net::Ipv4Addr) -> Option<guard::DynSets> {
        let sets = self.0.get(table)?;
        let has = |family: &str, name: String| sets.contains(&(family.to_owned(), name));
        Some(guard::DynSets {
            inet: has(FAMILY, guard::learn_set(ip)),
            bridge: has(BRIDGE_FAMILY, guard::denied_set(ip)),
        })
    }

    fn learn(&mut self, table: &str, listing: Vec<NftSet>) {
        self.0.insert(
            table.to_owned(),
            listing
                .into_iter()
                .filter(|s| s.table == table)
                .map(|s| (s.family, s.name))
                .collect(),
        );
    }

    /// After a guard of the guest at `ip`: its inet sets are made, and its
    /// bridge denied set exists only under policy `none`.
    fn guarded(&mut self, table: &str, ip: std::net::Ipv4Addr, none: bool) {
        if let Some(sets) = self.0.get_mut(table) {
            sets.insert((FAMILY.to_owned(), guard::learn_set(ip)));
            sets.insert((FAMILY.to_owned(), guard::denied_set(ip)));
            let bridge = (BRIDGE_FAMILY.to_owned(), guard::denied_set(ip));
            if none {
                sets.insert(bridge);
            } else {
                sets.remove(&bridge);
            }
        }
    }

    /// After the guest at `ip` lost its policy: none of its sets exist.
    fn unguarded(&mut self, table: &str, ip: std::net::Ipv4Addr) {
        if let Some(sets) = self.0.get_mut(table) {
            sets.remove(&(FAMILY.to_owned(), guard::learn_set(ip)));
            sets.remove(&(FAMILY.to_owned(), guard::denied_set(ip)));
            sets.remove(&(BRIDGE_FAMILY.to_owned(), guard::denied_set(ip)));
        }
    }

    fn forget(&mut self, table: &str) {
        self.0.remove(table);
    }
}

/// The `net.*` methods over a [`HostNet`].
#[derive(Debug)]
pub struct NetService<H> {
    host: H,
    allowed_uids: Vec<u32>,
    /// The installs whose bridges and tables this helper acts on.
    installs: Vec<Install>,
    /// Calls run one at a time: each reads the host, then changes it.
    lock: Mutex<KnownSets>,
    /// The test seam ([`banger_host::PausePoint`]), when one is set.
    pause: Option<banger_host::PausePoint>,
}

impl<H: HostNet> NetService<H> {
    /// `allowed_uids`: the uids the helper serves; taps may be given only
    /// to them. `installs`: the installs (one per `--state-dir`) whose
    /// bridges and tables it may touch, each only for its owner (and root).
    pub fn new(host: H, allowed_uids: Vec<u32>, installs: Vec<Install>) -> Self {
        NetService {
            host,
            allowed_uids,
            installs,
            lock: Mutex::new(KnownSets::default()),
            pause: None,
        }
    }

    /// Hold each call at its test seam's point (see [`banger_host::PausePoint`]).
    pub fn with_pause_point(mut self, pause: banger_host::PausePoint) -> Self {
        self.pause = Some(pause);
        self
    }

    async fn pause_point(&self, method: &'static str) {
        if let Some(pause) = &self.pause {
            pause.at(method).await;
        }
    }

    pub fn host(&self) -> &H {
        &self.host
    }

    async fn find(&self, name: &str) -> Result<Option<Link>, NetError> {
        Ok(self
            .host
            .links()
            .await?
            .into_iter()
            .find(|l| l.name == name))
    }

    /// The install whose mark (`banger-<id>`: a table's name, a bridge's
    /// alias) is `mark`, if this helper serves it and `caller` owns it
    /// (root: any install this helper serves).
    fn callers_install(&self, mark: &str, caller: u32) -> Result<&Install, NetError> {
        let Some(install) = self.installs.iter().find(|i| i.mark() == mark) else {
            let dirs: Vec<_> = self.installs.iter().map(|i| i.state_dir()).collect();
            return Err(NetError::NotYours(format!(
                "{mark} is not an install this helper serves (its state dirs: {dirs:?}); \
                 it acts only on its own installs' bridges and tables"
            )));
        };
        match install.owner() {
            _ if caller == 0 => Ok(install),
            Some(owner) if owner == caller => Ok(install),
            owner => Err(NetError::NotYours(format!(
                "{mark} is the install at {} of {}, not of uid {caller}",
                install.state_dir().display(),
                owner.map_or("no one (it does not exist)".to_owned(), |u| format!(
                    "uid {u}"
                ))
            ))),
        }
    }

    /// Bridge `name` from `links`, which must carry the mark of an install
    /// `caller` may act for (and be `mark`'s, when given). `None`: no link
    /// has that name.
    fn callers_bridge<'a>(
        &self,
        links: &'a [Link],
        name: &str,
        caller: u32,
        mark: Option<&str>,
    ) -> Result<Option<&'a Link>, NetError> {
        let Some(link) = links.iter().find(|l| l.name == name) else {
            return Ok(None);
        };
        if link.kind != LinkKind::Bridge {
            return Err(NetError::Conflict(format!(
                "{name} is not a bridge ({:?})",
                link.kind
            )));
        }
        let Some(alias) = link.alias.as_deref() else {
            return Err(NetError::NotYours(format!(
                "bridge {name} carries no install's mark (banger did not make it); \
                 delete it or choose another [network] bridge"
            )));
        };
        if mark.is_some_and(|m| m != alias) {
            return Err(NetError::NotYours(format!(
                "bridge {name} is install {alias}'s, not {}'s",
                mark.unwrap_or_default()
            )));
        }
        self.callers_install(alias, caller)?;
        Ok(Some(link))
    }

    /// `net.ensure_bridge`: the bridge carries `p.install`'s mark; one
    /// named after the install that has none yet (made before marks) gets
    /// it.
    pub async fn ensure_bridge(
        &self,
        p: &EnsureBridgeParams,
        caller: u32,
    ) -> Result<EnsureBridgeResult, NetError> {
        let gateway = checked("net.ensure_bridge", || {
            check_bridge(&p.name)?;
            check_table(&p.install)?;
            self.callers_install(&p.install, caller)?;
            Ok(parse_gateway(&p.gateway_cidr)?)
        })?;
        let _guard = self.lock.lock().await;
        let existing = self.find(&p.name).await?;
        let (created, addrs, up) = match existing {
            Some(l) if l.kind != LinkKind::Bridge => {
                return Err(NetError::Conflict(format!(
                    "{} exists and is not a bridge ({:?})",
                    p.name, l.kind
                )));
            }
            Some(l) if l.alias.is_none() && l.name == p.install => {
                self.host.link_set_alias(&p.name, &p.install).await?;
                info!(bridge = %p.name, "bridge marked as its install's");
                (false, l.addrs, l.up)
            }
            Some(l) => {
                checked("net.ensure_bridge", || {
                    self.callers_bridge(std::slice::from_ref(&l), &p.name, caller, Some(&p.install))
                        .map(drop)
                })?;
                (false, l.addrs, l.up)
            }
            None => {
                self.host.link_add_bridge(&p.name).await?;
                (true, Vec::new(), false)
            }
        };
        let result = async {
            if created {
                self.host.link_set_alias(&p.name, &p.install).await?;
            }
            // The host's own networks stay the host's: a banger bridge
            // holding the LAN's router address would win its routes and
            // answer ARP for it.
            let links = self.host.links().await?;
            if let Some((link, net)) = links
                .iter()
                .filter(|l| l.name != p.name)
                .flat_map(|l| l.addrs.iter().map(move |a| (&l.name, a)))
                .find(|(_, a)| a.trunc().contains(&gateway.network()) || gateway.trunc().contains(&a.network()))
            {
                return Err(NetError::Conflict(format!(
                    "{} overlaps the host's network {net} on {link}; pick another [network] subnet",
                    gateway.trunc()
                )));
            }
            let others: Vec<_> = addrs.iter().filter(|a| **a != gateway).collect();
            if !others.is_empty() {
                return Err(NetError::Conflict(format!(
                    "bridge {} already has {others:?}, not only {gateway}; delete the bridge to change its subnet",
                    p.name
                )));
            }
            let address_added = !addrs.contains(&gateway);
            if address_added {
                self.host.addr_add(&p.name, gateway).await?;
            }
            if !up {
                self.host.link_set_up(&p.name).await?;
            }
            Ok(EnsureBridgeResult {
                created,
                address_added,
            })
        }
        .await;
        if result.is_err() && created {
            self.rollback(&p.name).await;
        }
        if let Ok(r) = &result {
            info!(bridge = %p.name, %gateway, created = r.created, address_added = r.address_added, "bridge ready");
        }
        result
    }

    /// Delete `name`, which this call created, after a later step failed.
    async fn rollback(&self, name: &str) {
        match self.host.link_del(name).await {
            Ok(()) => info!(link = name, "rolled back a half-made link"),
            Err(e) => warn!(link = name, error = %e, "cannot roll back a half-made link"),
        }
    }

    /// `net.delete_bridge`: refuses while the bridge still has ports.
    pub async fn delete_bridge(
        &self,
        p: &DeleteBridgeParams,
        caller: u32,
    ) -> Result<Deleted, NetError> {
        checked("net.delete_bridge", || Ok(check_bridge(&p.name)?))?;
        let _guard = self.lock.lock().await;
        let links = self.host.links().await?;
        if checked("net.delete_bridge", || {
            self.callers_bridge(&links, &p.name, caller, None)
        })?
        .is_none()
        {
            return Ok(Deleted { deleted: false });
        }
        let ports: Vec<_> = links
            .iter()
            .filter(|l| l.master.as_deref() == Some(&p.name))
            .map(|l| l.name.as_str())
            .collect();
        if !ports.is_empty() {
            return Err(NetError::Conflict(format!(
                "bridge {} still has ports {ports:?}; delete them first",
                p.name
            )));
        }
        self.host.link_del(&p.name).await?;
        info!(bridge = %p.name, "bridge deleted");
        Ok(Deleted { deleted: true })
    }

    /// `net.create_tap`: create, attach, bring up; on a failure after the
    /// tap exists, delete it again.
    /// `caller`: the peer's uid; a user's tap is made for that user only.
    pub async fn create_tap(&self, p: &CreateTapParams, caller: u32) -> Result<(), NetError> {
        checked("net.create_tap", || {
            check_tap(&p.name)?;
            check_bridge(&p.bridge)?;
            if !self.allowed_uids.contains(&p.owner_uid) {
                return Err(NetError::OwnerNotAllowed(p.owner_uid));
            }
            if caller != 0 && caller != p.owner_uid {
                return Err(NetError::NotYours(format!(
                    "uid {caller} may make taps for itself only, not for uid {}",
                    p.owner_uid
                )));
            }
            Ok(())
        })?;
        let _guard = self.lock.lock().await;
        let links = self.host.links().await?;
        if let Some(l) = links.iter().find(|l| l.name == p.name) {
            return Err(NetError::Conflict(format!(
                "{} already exists ({:?})",
                p.name, l.kind
            )));
        }
        if checked("net.create_tap", || {
            self.callers_bridge(&links, &p.bridge, caller, None)
        })?
        .is_none()
        {
            return Err(NetError::NotFound(format!(
                "bridge {} does not exist",
                p.bridge
            )));
        }
        self.host.tap_create(&p.name, p.owner_uid).await?;
        self.pause_point("net.create_tap").await;
        let attached = async {
            self.host.link_set_master(&p.name, &p.bridge).await?;
            self.host.link_set_up(&p.name).await
        }
        .await;
        if let Err(e) = attached {
            self.rollback(&p.name).await;
            return Err(e.into());
        }
        info!(tap = %p.name, bridge = %p.bridge, owner_uid = p.owner_uid, "tap ready");
        Ok(())
    }

    /// `net.delete_tap`.
    /// `caller`: the peer's uid; a user deletes only taps it owns (root,
    /// any banger tap).
    pub async fn delete_tap(&self, p: &DeleteTapParams, caller: u32) -> Result<Deleted, NetError> {
        checked("net.delete_tap", || Ok(check_tap(&p.name)?))?;
        let _guard = self.lock.lock().await;
        match self.find(&p.name).await? {
            None => Ok(Deleted { deleted: false }),
            Some(l) if !matches!(l.kind, LinkKind::Tap { .. }) => Err(NetError::Conflict(format!(
                "{} is not a tap ({:?}); not deleting it",
                p.name, l.kind
            ))),
            Some(Link {
                kind: LinkKind::Tap { owner },
                ..
            }) if caller != 0 && owner != Some(caller) => {
                let e = NetError::NotYours(format!(
                    "{} belongs to {}, not to uid {caller}; not deleting it",
                    p.name,
                    owner.map_or("no user".to_owned(), |u| format!("uid {u}"))
                ));
                warn!(method = "net.delete_tap", error = %e, "refused");
                Err(e)
            }
            Some(_) => {
                self.host.link_del(&p.name).await?;
                info!(tap = %p.name, "tap deleted");
                Ok(Deleted { deleted: true })
            }
        }
    }

    /// `net.ensure_nat`: replace the table in one transaction, then make
    /// sure the host forwards IPv4.
    /// The bridge must be the table's install's.
    pub async fn ensure_nat(
        &self,
        p: &EnsureNatParams,
        caller: u32,
    ) -> Result<EnsureNatResult, NetError> {
        let subnet = checked("net.ensure_nat", || {
            check_table(&p.table)?;
            check_bridge(&p.bridge)?;
            self.callers_install(&p.table, caller)?;
            Ok(parse_subnet(&p.subnet_cidr)?)
        })?;
        let mut known = self.lock.lock().await;
        // Made anew: its sets are read again at the next guard.
        known.forget(&p.table);
        self.need_callers_bridge("net.ensure_nat", &p.bridge, &p.table, caller)
            .await?;
        let replaced = self.has_table(&p.table).await?;
        let ip_forward_enabled = !self.host.ip_forward().await?;
        // Forward nothing but banger's traffic where banger turns forwarding
        // on, and keep that decision when the table is made again.
        let isolate = ip_forward_enabled
            || self
                .host
                .nft_chain_policy(FAMILY, &p.table, "forward")
                .await?
                .as_deref()
                == Some("drop");
        self.host
            .nft_apply(&nat::ruleset(&p.table, subnet, &p.bridge, isolate))
            .await?;
        if ip_forward_enabled {
            self.host.set_ip_forward(true).await?;
        }
        info!(table = %p.table, %subnet, bridge = %p.bridge, replaced, ip_forward_enabled, isolate, "guest NAT ready");
        Ok(EnsureNatResult {
            replaced,
            ip_forward_enabled,
        })
    }

    async fn has_table(&self, name: &str) -> Result<bool, NetError> {
        self.has_family_table(FAMILY, name).await
    }

    async fn has_family_table(&self, family: &str, name: &str) -> Result<bool, NetError> {
        Ok(self
            .host
            .nft_tables()
            .await?
            .iter()
            .any(|t| t.family == family && t.name == name))
    }

    /// `net.remove_nat`: delete the tables (`inet` and `bridge`);
    /// `ip_forward` is left as it is.
    pub async fn remove_nat(&self, p: &RemoveNatParams, caller: u32) -> Result<Deleted, NetError> {
        checked("net.remove_nat", || {
            check_table(&p.table)?;
            self.callers_install(&p.table, caller).map(drop)
        })?;
        let mut known = self.lock.lock().await;
        known.forget(&p.table);
        let mut deleted = false;
        for family in [FAMILY, BRIDGE_FAMILY] {
            if self.has_family_table(family, &p.table).await? {
                self.host.nft_delete_table(family, &p.table).await?;
                deleted = true;
            }
        }
        if deleted {
            info!(table = %p.table, "guest NAT removed");
        }
        Ok(Deleted { deleted })
    }

    /// The tap `name`, which must be a tap of `caller`'s (root: any).
    fn callers_tap<'a>(links: &'a [Link], name: &str, caller: u32) -> Result<&'a Link, NetError> {
        match links.iter().find(|l| l.name == name) {
            None => Err(NetError::NotFound(format!("tap {name} does not exist"))),
            Some(l) => match l.kind {
                LinkKind::Tap { owner } if caller == 0 || owner == Some(caller) => Ok(l),
                LinkKind::Tap { owner } => Err(NetError::NotYours(format!(
                    "{name} belongs to {}, not to uid {caller}",
                    owner.map_or("no user".to_owned(), |u| format!("uid {u}"))
                ))),
                ref other => Err(NetError::Conflict(format!(
                    "{name} is not a tap ({other:?})"
                ))),
            },
        }
    }

    /// Checks that `tap` is the caller's and on `bridge` (any bridge when
    /// `None`), and that `ip` is a guest address of that bridge's subnet
    /// (neither the gateway nor the network or broadcast address).
    fn check_guest(
        links: &[Link],
        tap: &str,
        bridge: Option<&str>,
        caller: u32,
        ip: std::net::Ipv4Addr,
    ) -> Result<(), NetError> {
        let link = Self::callers_tap(links, tap, caller)?;
        let on = link.master.as_deref();
        if on.is_none() || bridge.is_some_and(|b| on != Some(b)) {
            return Err(NetError::Conflict(format!(
                "{tap} is not on bridge {}",
                bridge.unwrap_or("of banger's")
            )));
        }
        let bridge = links
            .iter()
            .find(|l| Some(l.name.as_str()) == on && l.kind == LinkKind::Bridge)
            .ok_or_else(|| NetError::NotFound(format!("bridge {on:?} does not exist")))?;
        if bridge.addrs.iter().any(|gw| {
            let net = gw.trunc();
            net.contains(&ip) && ip != gw.addr() && ip != net.network() && ip != net.broadcast()
        }) {
            Ok(())
        } else {
            Err(NetError::Invalid(format!(
                "{ip} is not a guest address of bridge {} ({:?})",
                bridge.name, bridge.addrs
            )))
        }
    }

    fn parse_ip(s: &str) -> Result<std::net::Ipv4Addr, NetError> {
        s.parse()
            .map_err(|_| NetError::Invalid(format!("{s:?} is not an IPv4 address")))
    }

    /// Bridge `bridge` exists and carries the mark `table`, an install of
    /// the caller's.
    async fn need_callers_bridge(
        &self,
        method: &str,
        bridge: &str,
        table: &str,
        caller: u32,
    ) -> Result<(), NetError> {
        let links = self.host.links().await?;
        match checked(method, || {
            self.callers_bridge(&links, bridge, caller, Some(table))
        })? {
            Some(_) => Ok(()),
            None => Err(NetError::NotFound(format!(
                "bridge {bridge} does not exist; net.ensure_bridge makes it"
            ))),
        }
    }

    async fn need_tables(&self, table: &str) -> Result<(), NetError> {
        // One listing for both families: each `nft` costs a process.
        let tables = self.host.nft_tables().await?;
        for family in [BRIDGE_FAMILY, FAMILY] {
            if !tables.iter().any(|t| t.family == family && t.name == table) {
                return Err(NetError::NotFound(format!(
                    "nftables table {family} {table} does not exist; net.ensure_nat makes it"
                )));
            }
        }
        Ok(())
    }

    /// `net.guard_tap`: the guest behind the caller's tap sends only as
    /// itself, where its policy allows ([`guard`]).
    pub async fn guard_tap(&self, p: &GuardTapParams, caller: u32) -> Result<(), NetError> {
        let (octets, ip, policy) = checked("net.guard_tap", || {
            check_table(&p.table)?;
            check_tap(&p.tap)?;
            check_bridge(&p.bridge)?;
            self.callers_install(&p.table, caller)?;
            let octets = guard::parse_mac(&p.mac).ok_or_else(|| {
                NetError::Invalid(format!(
                    "{:?} is not a unicast MAC like 52:54:00:12:34:56",
                    p.mac
                ))
            })?;
            let ip = Self::parse_ip(&p.ip)?;
            let policy: Policy = p
                .policy
                .parse()
                .map_err(|e: crate::policy::PolicyError| NetError::Invalid(e.to_string()))?;
            Ok((octets, ip, policy))
        })?;
        let mut known = self.lock.lock().await;
        let links = self.host.links().await?;
        checked("net.guard_tap", || {
            self.callers_bridge(&links, &p.bridge, caller, Some(&p.table))?;
            Self::check_guest(&links, &p.tap, Some(&p.bridge), caller, ip)
        })?;
        let mac = guard::mac_text(octets);
        let batch = |sets| {
            guard::guard(
                &p.table,
                &p.tap,
                &mac,
                ip,
                &policy,
                sets,
                p.secrets_proxy && policy != Policy::None,
            )
        };
        self.apply_for_guest(&mut known, &p.table, ip, batch)
            .await?;
        known.guarded(&p.table, ip, policy == Policy::None);
        // The host's neighbour entry for the address names this guest's
        // MAC from now: an address reused from a deleted VM would otherwise
        // keep that VM's MAC until the entry failed (half a minute of
        // unanswered connections).
        self.host.neigh_replace(&p.bridge, ip, octets).await?;
        info!(tap = %p.tap, %mac, %ip, %policy, secrets_proxy = p.secrets_proxy, "tap guarded");
        Ok(())
    }

    /// `net.unguard_tap`: remove the tap's guard and its guest's policy
    /// chain, if any. Where the tap still exists it must be the caller's and
    /// `ip` its guest's; where it is gone, only its guard goes (another's
    /// guest's policy is not the caller's to lift).
    pub async fn unguard_tap(&self, p: &UnguardTapParams, caller: u32) -> Result<(), NetError> {
        let ip = checked("net.unguard_tap", || {
            check_table(&p.table)?;
            check_tap(&p.tap)?;
            self.callers_install(&p.table, caller)?;
            p.ip.as_deref().map(Self::parse_ip).transpose()
        })?;
        let mut known = self.lock.lock().await;
        let links = self.host.links().await?;
        let exists = links.iter().any(|l| l.name == p.tap);
        if exists {
            checked("net.unguard_tap", || match ip {
                Some(ip) => Self::check_guest(&links, &p.tap, None, caller, ip),
                None => Self::callers_tap(&links, &p.tap, caller).map(drop),
            })?;
        }
        // Without the table there is nothing to remove.
        let ip = ip.filter(|_| exists);
        let applied = match ip {
            Some(ip) => {
                let batch = |sets| guard::unguard(&p.table, &p.tap, Some(ip), sets);
                self.apply_for_guest(&mut known, &p.table, ip, batch).await
            }
            None => match self.need_tables(&p.table).await {
                Ok(()) => self
                    .host
                    .nft_apply(&guard::unguard(&p.table, &p.tap, None, Default::default()))
                    .await
                    .map_err(NetError::from),
                Err(e) => Err(e),
            },
        };
        match applied {
            Err(NetError::NotFound(_)) => return Ok(()),
            r => r?,
        }
        if let Some(ip) = ip {
            known.unguarded(&p.table, ip);
        }
        info!(tap = %p.tap, ip = ?ip, "tap unguarded");
        Ok(())
    }

    /// `build`'s transaction for the guest at `ip`, built on what this
    /// helper knows of `table`'s sets ([`KnownSets`]; a table it does not
    /// know yet is read whole once: one `nft` for all its guests). A view
    /// gone stale fails the transaction whole: the table is forgotten, the
    /// guest's sets listed as they are, and the transaction built again.
    /// `NotFound` when the table does not exist.
    async fn apply_for_guest(
        &self,
        known: &mut KnownSets,
        table: &str,
        ip: std::net::Ipv4Addr,
        build: impl Fn(guard::DynSets) -> serde_json::Value,
    ) -> Result<(), NetError> {
        if known.dyn_sets(table, ip).is_none()
            && let Ok(listing) = self.host.nft_sets().await
        {
            known.learn(table, listing);
        }
        let fast = match known.dyn_sets(table, ip) {
            Some(sets) => self
                .host
                .nft_apply(&build(sets))
                .await
                .map_err(|e| e.to_string()),
            None => Err("the sets could not be listed".to_owned()),
        };
        if let Err(e) = fast {
            info!(error = %e, %table, "a transaction on the known sets failed; listing them");
            known.forget(table);
            let (tables, sets) = tokio::join!(self.need_tables(table), self.dyn_sets(table, ip));
            tables?;
            self.host.nft_apply(&build(sets)).await?;
        }
        Ok(())
    }

    async fn dyn_sets(&self, table: &str, ip: std::net::Ipv4Addr) -> guard::DynSets {
        let exists = |family: &'static str, set: String| async move {
            self.host.nft_list("set", family, table, &set).await.is_ok()
        };
        let (inet, bridge) = tokio::join!(
            exists(FAMILY, guard::learn_set(ip)),
            exists(BRIDGE_FAMILY, guard::denied_set(ip))
        );
        guard::DynSets { inet, bridge }
    }

    /// `net.sweep_guards`: the guards (elements of map `guards`) and guest
    /// policies (elements of map `policies`) of the caller's table that
    /// nothing in `keep_taps` / `keep_ips` explains, removed unless
    /// `dry_run`. The maps are the whole truth: [`guard::guard`] and
    /// [`guard::unguard`] add and remove each element with its chain.
    pub async fn sweep_guards(
        &self,
        p: &SweepGuardsParams,
        caller: u32,
    ) -> Result<SweepGuardsResult, NetError> {
        let keep_ips = checked("net.sweep_guards", || {
            check_table(&p.table)?;
            self.callers_install(&p.table, caller)?;
            p.keep_ips
                .iter()
                .map(|ip| Self::parse_ip(ip))
                .collect::<Result<Vec<_>, _>>()
        })?;
        let mut known = self.lock.lock().await;
        if self.need_tables(&p.table).await.is_err() {
            return Ok(SweepGuardsResult::default());
        }
        // The keys of a verdict map's elements.
        let keys = |listing: &serde_json::Value| -> Vec<String> {
            items(listing)
                .filter_map(|i| i.get("map")?.get("elem")?.as_array())
                .flatten()
                .filter_map(|e| Some(e.get(0)?.as_str()?.to_owned()))
                .collect()
        };
        let guards = self
            .host
            .nft_list("map", BRIDGE_FAMILY, &p.table, guard::GUARDS)
            .await?;
        let policies = self
            .host
            .nft_list("map", FAMILY, &p.table, guard::POLICIES)
            .await?;
        let mut out = SweepGuardsResult {
            taps: keys(&guards)
                .into_iter()
                .filter(|t| check_tap(t).is_ok() && !p.keep_taps.contains(t))
                .collect(),
            ips: keys(&policies)
                .into_iter()
                .filter(|ip| ip.parse().is_ok_and(|ip| !keep_ips.contains(&ip)))
                .collect(),
        };
        out.taps.sort();
        out.ips.sort();
        if p.dry_run || (out.taps.is_empty() && out.ips.is_empty()) {
            return Ok(out);
        }
        let mut cmds = Vec::new();
        for tap in &out.taps {
            cmds.extend(guard::unguard_tap(&p.table, tap));
        }
        // The guests' sets from one listing, not two `nft` per guest.
        known.learn(&p.table, self.host.nft_sets().await?);
        let ips: Vec<std::net::Ipv4Addr> = out
            .ips
            .iter()
            .map(|ip| ip.parse().expect("parsed above"))
            .collect();
        for &ip in &ips {
            let existing = known.dyn_sets(&p.table, ip).unwrap_or_default();
            cmds.extend(guard::unguard_guest(&p.table, ip, existing));
        }
        self.host
            .nft_apply(&serde_json::json!({ "nftables": cmds }))
            .await?;
        for ip in ips {
            known.unguarded(&p.table, ip);
        }
        info!(taps = ?out.taps, ips = ?out.ips, "stray guards swept");
        Ok(out)
    }

    /// `net.inspect`: the packets the guest's guard and policy dropped, and
    /// what `learn` recorded.
    pub async fn inspect(&self, p: &InspectParams, caller: u32) -> Result<InspectResult, NetError> {
        let ip = checked("net.inspect", || {
            check_table(&p.table)?;
            check_tap(&p.tap)?;
            self.callers_install(&p.table, caller)?;
            Self::parse_ip(&p.ip)
        })?;
        let _guard = self.lock.lock().await;
        let links = self.host.links().await?;
        checked("net.inspect", || {
            Self::check_guest(&links, &p.tap, None, caller, ip)
        })?;
        self.need_tables(&p.table).await?;
        let mut out = InspectResult::default();
        for (family, chain) in [
            (BRIDGE_FAMILY, guard::chain(&p.tap)),
            (FAMILY, guard::policy_chain(ip)),
        ] {
            let listing = self
                .host
                .nft_list("chain", family, &p.table, &chain)
                .await?;
            out.denied_packets += items(&listing)
                .filter_map(|i| i.get("rule")?.get("expr")?.as_array())
                .flatten()
                .filter_map(|e| e.get("counter")?.get("packets")?.as_u64())
                .sum::<u64>();
        }
        let listing = self
            .host
            .nft_list("set", FAMILY, &p.table, &guard::learn_set(ip))
            .await?;
        out.learned = dests(&listing).map(|(d, _)| d).collect();
        // The denied log: in the inet set, or (for a `none` guest) the bridge one.
        for family in [FAMILY, BRIDGE_FAMILY] {
            if let Ok(listing) = self
                .host
                .nft_list("set", family, &p.table, &guard::denied_set(ip))
                .await
            {
                out.denied
                    .extend(dests(&listing).map(|(dest, packets)| DeniedDest {
                        dest,
                        packets: packets.unwrap_or(0),
                    }));
            }
        }
        out.denied.sort();
        out.learned.sort();
        Ok(out)
    }

    /// `net.allow_resolved`: let the guest behind the caller's tap reach
    /// the addresses banger's DNS server answered for its allowed names,
    /// for their TTL. Addresses in private, loopback, multicast or reserved
    /// ranges are left out: a name never opens the host's LAN.
    pub async fn allow_resolved(
        &self,
        p: &AllowResolvedParams,
        caller: u32,
    ) -> Result<(), NetError> {
        let (ip, addrs) = checked("net.allow_resolved", || {
            check_table(&p.table)?;
            check_tap(&p.tap)?;
            self.callers_install(&p.table, caller)?;
            let ip = Self::parse_ip(&p.ip)?;
            let private: Vec<ipnet::Ipv4Net> = nat::PRIVATE
                .iter()
                .map(|n| n.parse().expect("a CIDR"))
                .collect();
            let mut addrs = Vec::new();
            for a in &p.addrs {
                let addr = Self::parse_ip(&a.addr)?;
                if a.port == Some(0) {
                    return Err(NetError::Invalid("port 0".into()));
                }
                let public = !(addr.is_private()
                    || addr.is_loopback()
                    || addr.is_multicast()
                    || addr.is_broadcast()
                    || addr.is_unspecified()
                    || addr.octets()[0] >= 240
                    || private.iter().any(|n| n.contains(&addr)));
                if public {
                    addrs.push((addr, a.port));
                }
            }
            Ok((ip, addrs))
        })?;
        let _guard = self.lock.lock().await;
        let links = self.host.links().await?;
        checked("net.allow_resolved", || {
            Self::check_guest(&links, &p.tap, None, caller, ip)
        })?;
        if addrs.is_empty() {
            return Ok(());
        }
        self.need_tables(&p.table).await?;
        let ttl = p.ttl_secs.clamp(1, 86_400);
        self.host
            .nft_apply(&guard::allow_resolved(&p.table, ip, &addrs, ttl))
            .await?;
        debug!(tap = %p.tap, %ip, ?addrs, ttl, "resolved addresses allowed");
        Ok(())
    }

    /// `net.list`: what banger owns on this host right now.
    pub async fn list(&self) -> Result<NetListResult, NetError> {
        let links = self.host.links().await?;
        let mut out = NetListResult::default();
        for l in links {
            match l.kind {
                LinkKind::Bridge if is_bridge_name(&l.name) => out.bridges.push(BridgeInfo {
                    name: l.name,
                    up: l.up,
                    addrs: l.addrs.iter().map(ToString::to_string).collect(),
                }),
                LinkKind::Tap { owner } if is_tap_name(&l.name) => out.taps.push(TapInfo {
                    name: l.name,
                    bridge: l.master,
                    up: l.up,
                    owner_uid: owner,
                }),
                _ => {}
            }
        }
        out.bridges.sort_by(|a, b| a.name.cmp(&b.name));
        out.taps.sort_by(|a, b| a.name.cmp(&b.name));
        out.nft_tables = self
            .host
            .nft_tables()
            .await?
            .into_iter()
            .filter(|t| t.family == FAMILY && is_table_name(&t.name))
            .map(|t| t.name)
            .collect();
        out.nft_tables.sort();
        out.ip_forward = self.host.ip_forward().await?;
        Ok(out)
    }
}

/// The items of an `nft -j list` answer.
fn items(listing: &serde_json::Value) -> impl Iterator<Item = &serde_json::Value> {
    listing["nftables"].as_array().into_iter().flatten()
}

/// The destinations (address . protocol . port) in a listed set, with
/// their packet counters where the set counts.
fn dests(listing: &serde_json::Value) -> impl Iterator<Item = (LearnedDest, Option<u64>)> + '_ {
    items(listing)
        .filter_map(|i| i.get("set")?.get("elem")?.as_array())
        .flatten()
        .filter_map(|e| {
            // A bare value, or one with its own attributes.
            let attrs = e.get("elem");
            let v = attrs.and_then(|a| a.get("val")).unwrap_or(e);
            let packets = attrs.and_then(|a| a.get("counter")?.get("packets")?.as_u64());
            let parts = v.get("concat")?.as_array()?;
            let dest = LearnedDest {
                addr: parts.first()?.as_str()?.to_owned(),
                proto: match parts.get(1)? {
                    serde_json::Value::Number(n) if n.as_u64() == Some(6) => "tcp".into(),
                    serde_json::Value::Number(n) if n.as_u64() == Some(17) => "udp".into(),
                    other => other.as_str()?.to_owned(),
                },
                port: u16::try_from(parts.get(2)?.as_u64()?).ok()?,
            };
            Some((dest, packets))
        })
}
