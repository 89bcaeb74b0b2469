//! banger's host networking.
//!
//! Two halves:
//!
//! - **Helper side** ([`service::NetService`]): the `net.*` methods of
//!   `banger-helper` — a bridge with the guests' gateway address, persistent
//!   TAP devices an unprivileged VMM may open, and guest NAT in banger's own
//!   nftables table. Every call is checked against what banger owns
//!   ([`names`]) and against the installs the helper serves and the
//!   caller owns ([`installs`]) before anything happens. The privileged primitives sit
//!   behind [`host::HostNet`]: [`linux::LinuxHostNet`] does them for real
//!   (netlink, TUN ioctls, `nft -j`, `/proc/sys`), [`recording::RecordingHostNet`]
//!   simulates them for tests that run without root.
//! - **Daemon side**: the guest subnet and per-VM leases ([`alloc`]), and a
//!   warm pool of taps ([`pool::TapPool`]) so that starting a VM does no
//!   netlink work.

pub mod alloc;
pub mod guard;
pub mod host;
pub mod installs;
pub mod linux;
pub mod names;
pub mod nat;
pub mod policy;
pub mod pool;
pub mod recording;
pub mod service;

pub use alloc::{
    AllocError, first_cid_of_install, gateway, mac_for, next_guest_ip, next_vsock_cid, pick_subnet,
};
pub use host::{HostError, HostNet, Link, LinkKind, NftSet, NftTable};
pub use installs::Install;
pub use linux::{LinuxHostNet, host_networks};
pub use nat::SECRETS_PROXY_PORT;
pub use policy::{Policy, PolicyError};
pub use pool::{TapHelper, TapPool, TapPoolConfig, recorded_taps};
pub use service::{NetError, NetService};
