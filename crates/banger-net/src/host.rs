//! The privileged host operations the helper performs, behind a trait so
//! that the logic around them ([`crate::service`]) is tested without root
//! against [`crate::recording::RecordingHostNet`]. The real implementation
//! is [`crate::linux::LinuxHostNet`].

use std::future::Future;

use ipnet::Ipv4Net;

/// One network interface, as much of it as banger cares about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub kind: LinkKind,
    /// Name of the bridge (or other controller) this link is attached to.
    pub master: Option<String>,
    /// Administratively up (IFF_UP).
    pub up: bool,
    /// IPv4 addresses, each with its prefix length.
    pub addrs: Vec<Ipv4Net>,
    /// `IFLA_IFALIAS`: on a bridge banger made, the stamp of the install it
    /// belongs to (`banger-<install id>`).
    pub alias: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkKind {
    Bridge,
    /// A TAP device; `owner` is the uid allowed to open it, if set.
    Tap {
        owner: Option<u32>,
    },
    /// A TUN (layer 3) device.
    Tun,
    /// Anything else, with its `IFLA_INFO_KIND` if it has one.
    Other(Option<String>),
}

pub use banger_host::HostError;

/// An nftables table.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct NftTable {
    pub family: String,
    pub name: String,
}

/// An nftables set: its table (family and name) and its own name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NftSet {
    pub family: String,
    pub table: String,
    pub name: String,
}

/// Privileged host networking primitives. Each does exactly one thing;
/// checking, ordering and rollback live in [`crate::service::NetService`].
pub trait HostNet: Send + Sync + 'static {
    /// Every link on the host with its IPv4 addresses.
    fn links(&self) -> impl Future<Output = Result<Vec<Link>, HostError>> + Send;
    fn link_add_bridge(&self, name: &str) -> impl Future<Output = Result<(), HostError>> + Send;
    /// Set `IFLA_IFALIAS` (the kernel ignores it when a link is created).
    fn link_set_alias(
        &self,
        name: &str,
        alias: &str,
    ) -> impl Future<Output = Result<(), HostError>> + Send;
    fn addr_add(
        &self,
        link: &str,
        addr: Ipv4Net,
    ) -> impl Future<Output = Result<(), HostError>> + Send;
    fn link_set_up(&self, name: &str) -> impl Future<Output = Result<(), HostError>> + Send;
    /// Create a persistent TAP device (no packet info) that `owner_uid` may open.
    fn tap_create(
        &self,
        name: &str,
        owner_uid: u32,
    ) -> impl Future<Output = Result<(), HostError>> + Send;
    fn link_set_master(
        &self,
        name: &str,
        master: &str,
    ) -> impl Future<Output = Result<(), HostError>> + Send;
    fn link_del(&self, name: &str) -> impl Future<Output = Result<(), HostError>> + Send;
    /// Apply a JSON nftables batch (`nft -j -f -`) as one transaction.
    fn nft_apply(
        &self,
        batch: &serde_json::Value,
    ) -> impl Future<Output = Result<(), HostError>> + Send;
    fn nft_tables(&self) -> impl Future<Output = Result<Vec<NftTable>, HostError>> + Send;
    /// Every set of every table (`nft -j list sets`: names, no elements).
    fn nft_sets(&self) -> impl Future<Output = Result<Vec<NftSet>, HostError>> + Send;
    /// The policy (`accept`, `drop`) of base chain `chain` of a table, if
    /// the table and chain exist.
    fn nft_chain_policy(
        &self,
        family: &str,
        table: &str,
        chain: &str,
    ) -> impl Future<Output = Result<Option<String>, HostError>> + Send;
    /// `nft -j list <kind> <family> <table> <name>` (`kind`: `chain` or
    /// `set`), as JSON.
    fn nft_list(
        &self,
        kind: &str,
        family: &str,
        table: &str,
        name: &str,
    ) -> impl Future<Output = Result<serde_json::Value, HostError>> + Send;
    fn nft_delete_table(
        &self,
        family: &str,
        name: &str,
    ) -> impl Future<Output = Result<(), HostError>> + Send;
    fn ip_forward(&self) -> impl Future<Output = Result<bool, HostError>> + Send;
    fn set_ip_forward(&self, on: bool) -> impl Future<Output = Result<(), HostError>> + Send;
    /// Put (or replace) `ip`'s neighbour entry on `link`: `mac`, in state
    /// STALE (used at once, confirmed on use).
    fn neigh_replace(
        &self,
        link: &str,
        ip: std::net::Ipv4Addr,
        mac: [u8; 6],
    ) -> impl Future<Output = Result<(), HostError>> + Send;
}
