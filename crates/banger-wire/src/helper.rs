//! Methods served by `banger-helper`, the root helper. This list is the
//! helper's allowlist: it serves these and nothing else.

use serde::{Deserialize, Serialize};

use crate::{Empty, Method, NoParams};

method!(
    /// `ping`: liveness, and who the helper is.
    Ping, "ping", NoParams, PingResult
);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct PingResult {
    pub pid: u32,
    /// Effective uid of the helper (0 when it can do its job).
    pub euid: u32,
    pub version: String,
    pub uptime_s: u64,
}

method!(
    /// `version`: the helper's build version and protocol version.
    Version, "version", NoParams, VersionResult
);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct VersionResult {
    pub version: String,
    pub protocol: u32,
}

// ---- Host networking -------------------------------------------------------
//
// The helper acts only on banger's own devices and nftables table: bridges
// named `banger…`, taps named `bg-…`, tables `inet banger` / `inet banger-…`.
// Everything is checked before anything is done; a refusal is
// `invalid_params`.

method!(
    /// `net.ensure_bridge`: create the bridge if missing, give it the gateway
    /// address and bring it up. Idempotent.
    NetEnsureBridge, "net.ensure_bridge", EnsureBridgeParams, EnsureBridgeResult
);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EnsureBridgeParams {
    /// `banger` followed by up to 9 of `[0-9a-z-]` (by default `banger-<install id>`).
    pub name: String,
    /// The bridge's (the guests' gateway's) address with the subnet's
    /// prefix, e.g. `172.30.0.1/24`. Private IPv4, prefix /16 to /30.
    pub gateway_cidr: String,
    /// The mark of the install the bridge is for, `banger-<install id>`
    /// (its nftables table's name): the bridge carries it as its alias, and
    /// only that install's owner may use or delete the bridge.
    pub install: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct EnsureBridgeResult {
    /// The bridge did not exist and was created.
    pub created: bool,
    /// The gateway address was not on the bridge and was added.
    pub address_added: bool,
}

method!(
    /// `net.delete_bridge`: delete a banger bridge that has no ports left.
    NetDeleteBridge, "net.delete_bridge", DeleteBridgeParams, Deleted
);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DeleteBridgeParams {
    pub name: String,
}

/// Result of the `net.delete_*` / `net.remove_*` methods.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Deleted {
    /// False when there was nothing to delete.
    pub deleted: bool,
}

method!(
    /// `net.create_tap`: a persistent TAP device owned by `owner_uid`, attached
    /// to `bridge` and up. Refused with `conflict` if the name exists.
    NetCreateTap, "net.create_tap", CreateTapParams, Empty
);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTapParams {
    /// `bg-` followed by 1 to 12 of `[a-z0-9-]`.
    pub name: String,
    /// An existing banger bridge.
    pub bridge: String,
    /// Uid that may open the tap (the VMM's); one of the helper's `--allow-uid`s.
    pub owner_uid: u32,
}

method!(
    /// `net.delete_tap`: delete a banger tap.
    NetDeleteTap, "net.delete_tap", DeleteTapParams, Deleted
);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DeleteTapParams {
    pub name: String,
}

method!(
    /// `net.ensure_nat`: (re)create banger's nftables table, as one transaction:
    /// masquerade guest traffic from `subnet_cidr` leaving through any interface
    /// but `bridge`, and accept forwarding from and (established) to `bridge`.
    /// Turns on `net.ipv4.ip_forward` if it is off.
    NetEnsureNat, "net.ensure_nat", EnsureNatParams, EnsureNatResult
);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EnsureNatParams {
    /// `banger`, or `banger-…` (tests use their own table). Family is `inet`.
    pub table: String,
    /// The guests' subnet, e.g. `172.30.0.0/24`. Private IPv4, /16 to /30.
    pub subnet_cidr: String,
    pub bridge: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct EnsureNatResult {
    /// The table existed and was replaced (rather than created).
    pub replaced: bool,
    /// `net.ipv4.ip_forward` was off and the helper turned it on. It is
    /// left on by `net.remove_nat`: other software may rely on it by then.
    pub ip_forward_enabled: bool,
}

method!(
    /// `net.remove_nat`: delete banger's nftables table.
    NetRemoveNat, "net.remove_nat", RemoveNatParams, Deleted
);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RemoveNatParams {
    pub table: String,
}

method!(
    /// `net.guard_tap`: let the guest behind `tap` send only from its own MAC
    /// and IPv4 address (Ethernet source, ARP sender, IPv4 source), and only
    /// where `policy` allows; every other frame from it (IPv6 included) is
    /// dropped on the bridge. Replaces
    /// the tap's earlier guard. Refused unless the tap is the caller's, on
    /// `bridge`, and `ip` a host address of the bridge's subnet other than
    /// the gateway. A banger tap without a guard carries nothing.
    NetGuardTap, "net.guard_tap", GuardTapParams, Empty
);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GuardTapParams {
    /// banger's table (family `bridge`, made by `net.ensure_nat`).
    pub table: String,
    pub tap: String,
    /// The bridge the tap is on.
    pub bridge: String,
    /// The guest's MAC, e.g. `52:54:00:12:34:56`.
    pub mac: String,
    /// The guest's IPv4 address, e.g. `172.30.0.2`.
    pub ip: String,
    /// The VM's network policy, carried out with the guard: `none`, `nat`,
    /// `learn`, or `allow=LIST` (CIDRs, domains, `:PORT`s, each with an
    /// optional `:PORT`); made again, the addresses its domains resolved to,
    /// what `learn` recorded and the counters start anew.
    pub policy: String,
    /// The guest has secrets: its TCP 443, once its policy allows it, is
    /// DNATed to the secrets proxy on the bridge's address.
    #[serde(default)]
    pub secrets_proxy: bool,
}

method!(
    /// `net.unguard_tap`: remove the tap's guard, if it has one (the tap then
    /// carries nothing).
    NetUnguardTap, "net.unguard_tap", UnguardTapParams, Empty
);

method!(
    /// `net.sweep_guards`: the tap guards and guest policies in the caller's
    /// table that belong to no tap of `keep_taps` and no guest of
    /// `keep_ips` (leftovers of a daemon killed mid-operation); removed
    /// unless `dry_run`.
    NetSweepGuards, "net.sweep_guards", SweepGuardsParams, SweepGuardsResult
);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SweepGuardsParams {
    pub table: String,
    pub keep_taps: Vec<String>,
    pub keep_ips: Vec<String>,
    #[serde(default)]
    pub dry_run: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema)]
pub struct SweepGuardsResult {
    /// Taps whose guard was (or would be) removed.
    pub taps: Vec<String>,
    /// Guest addresses whose policy was (or would be) removed.
    pub ips: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UnguardTapParams {
    pub table: String,
    pub tap: String,
    /// The guest's address, if it had one: its policy chain goes too
    /// (only while the tap, the caller's, exists).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
}

method!(
    /// `net.allow_resolved`: let the guest at `ip` behind the caller's `tap`
    /// reach `addrs` (what banger's DNS server answered for a name its
    /// policy allows) for `ttl_secs` (1 s to a day). Private, loopback,
    /// multicast and reserved addresses are left out.
    NetAllowResolved, "net.allow_resolved", AllowResolvedParams, Empty
);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AllowResolvedParams {
    pub table: String,
    pub tap: String,
    pub ip: String,
    pub addrs: Vec<ResolvedAddr>,
    pub ttl_secs: u32,
}

method!(
    /// `net.inspect`: what the guest at `ip` behind the caller's `tap` was
    /// refused (packets dropped by its guard and policy since they were
    /// made), and under `learn` the destinations it opened.
    NetInspect, "net.inspect", InspectParams, InspectResult
);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct InspectParams {
    pub table: String,
    pub tap: String,
    pub ip: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema)]
pub struct InspectResult {
    pub denied_packets: u64,
    pub learned: Vec<LearnedDest>,
    /// The TCP/UDP destinations its policy denied, with packets each.
    #[serde(default)]
    pub denied: Vec<DeniedDest>,
}

/// A destination the policy denied, and how many packets it dropped.
#[derive(
    Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, schemars::JsonSchema,
)]
pub struct DeniedDest {
    #[serde(flatten)]
    pub dest: LearnedDest,
    pub packets: u64,
}

/// A new TCP or UDP connection's destination.
#[derive(
    Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, schemars::JsonSchema,
)]
pub struct LearnedDest {
    pub addr: String,
    /// `tcp` or `udp`.
    pub proto: String,
    pub port: u16,
}

/// An address, and the one port it may be reached on (any when absent).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ResolvedAddr {
    pub addr: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

method!(
    /// `net.list`: banger-owned links and nftables tables on the host.
    NetList, "net.list", NoParams, NetListResult
);

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema)]
pub struct NetListResult {
    /// Bridges whose name is a banger bridge name, by name.
    pub bridges: Vec<BridgeInfo>,
    /// TAP devices whose name is a banger tap name, by name.
    pub taps: Vec<TapInfo>,
    /// `inet` tables named `banger` or `banger-…`, by name.
    pub nft_tables: Vec<String>,
    /// Current value of `net.ipv4.ip_forward`.
    pub ip_forward: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct BridgeInfo {
    pub name: String,
    /// Administratively up.
    pub up: bool,
    /// IPv4 addresses with prefix, e.g. `172.30.0.1/24`.
    pub addrs: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct TapInfo {
    pub name: String,
    /// Bridge the tap is attached to, if any.
    pub bridge: Option<String>,
    /// Administratively up.
    pub up: bool,
    /// Uid allowed to open the tap, if one is set.
    pub owner_uid: Option<u32>,
}

// ---- Root disks (device-mapper snapshots) ----------------------------------
//
// The helper acts only on dm devices named `bg-` + lowercase hex (the VM's
// id) and on loop devices whose backing file lies under one of the state
// directories it was started with (`--state-dir`). Paths are resolved (no
// symlink escapes) and must be regular files there. A refusal is
// `invalid_params`.

method!(
    /// `disk.snapshot_create`: as one call, attach `origin` read-only and
    /// `cow` read-write to loop devices, create the dm `snapshot` `name`
    /// over them (persistent exceptions, so a COW store made earlier keeps
    /// the disk's contents) and give its node to the calling uid. A failure
    /// undoes whatever the call made. Refused with `conflict` if `name`
    /// exists.
    DiskSnapshotCreate, "disk.snapshot_create", SnapshotCreateParams, SnapshotCreateResult
);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreateParams {
    /// `bg-` followed by 1 to 32 lowercase hex digits.
    pub name: String,
    /// The image's read-only rootfs: a regular file under a state directory,
    /// its size a multiple of 512.
    pub origin: String,
    /// The VM's copy-on-write store: a regular file under a state directory
    /// (zeros for a new snapshot; the daemon creates it sparse), at least
    /// `banger_disk::cow_size` of the origin. Both files must belong to the
    /// caller's uid.
    pub cow: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct SnapshotCreateResult {
    /// `/dev/mapper/<name>`, owned by the caller's uid.
    pub device: String,
    /// The loop devices made for the origin and the COW store.
    pub origin_loop: String,
    pub cow_loop: String,
}

method!(
    /// `disk.snapshot_remove`: remove the dm device `name`, then detach every
    /// loop device over banger's files that no dm device holds (its own, and
    /// any a create cut short by a helper crash left). Idempotent;
    /// `deleted: false` when there was nothing to remove.
    DiskSnapshotRemove, "disk.snapshot_remove", SnapshotRemoveParams, Deleted
);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRemoveParams {
    pub name: String,
}

method!(
    /// `disk.loop_detach`: detach a loop device backed by a file under a
    /// state directory that no dm device holds (what a crash mid-create can
    /// leave). `deleted: false` when it was not attached.
    DiskLoopDetach, "disk.loop_detach", LoopDetachParams, Deleted
);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LoopDetachParams {
    /// `/dev/loopN`.
    pub device: String,
}

method!(
    /// `disk.list`: whether the helper can make snapshots, the state
    /// directories it serves, banger's dm devices and the loop devices backed
    /// by files under those directories.
    DiskList, "disk.list", NoParams, DiskListResult
);

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema)]
pub struct DiskListResult {
    /// `None` when device-mapper snapshots can be made; else why not.
    pub unavailable: Option<String>,
    /// The helper's `--state-dir`s, resolved.
    pub state_dirs: Vec<String>,
    /// dm devices named `bg-<hex>`, by name.
    pub snapshots: Vec<SnapshotInfo>,
    /// Loop devices backed by files under a state directory, by device.
    pub loops: Vec<LoopInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct SnapshotInfo {
    pub name: String,
    /// The devices it is built on (`/dev/loopN`, …).
    pub slaves: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct LoopInfo {
    pub device: String,
    pub backing_file: String,
    /// The dm device built on it, if any.
    pub held_by: Option<String>,
}

/// Every method the helper serves.
pub const ALL: &[&str] = &[
    Ping::NAME,
    Version::NAME,
    NetEnsureBridge::NAME,
    NetDeleteBridge::NAME,
    NetCreateTap::NAME,
    NetDeleteTap::NAME,
    NetEnsureNat::NAME,
    NetRemoveNat::NAME,
    NetGuardTap::NAME,
    NetUnguardTap::NAME,
    NetSweepGuards::NAME,
    NetAllowResolved::NAME,
    NetInspect::NAME,
    NetList::NAME,
    DiskSnapshotCreate::NAME,
    DiskSnapshotRemove::NAME,
    DiskLoopDetach::NAME,
    DiskList::NAME,
];
