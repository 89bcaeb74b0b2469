//! The daemon's allocation of a guest subnet, guest IPs, MACs and vsock
//! CIDs. Pure functions over what is in use: the store's `used_*` sets and
//! the host's routes ([`crate::linux::host_networks`]). The store's UNIQUE
//! columns remain the arbiter if two allocations race.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use sha2::{Digest, Sha256};

/// banger's guest subnet unless it collides with something on the host.
pub const DEFAULT_SUBNET: Ipv4Net = Ipv4Net::new_assert(Ipv4Addr::new(172, 30, 0, 0), 24);
/// Where automatic subnets come from.
pub const SUBNET_POOL: Ipv4Net = Ipv4Net::new_assert(Ipv4Addr::new(172, 16, 0, 0), 12);
/// The lowest CID a guest may have (0 hypervisor, 1 local, 2 host).
pub const FIRST_GUEST_CID: u32 = 3;
/// The highest usable CID (`u32::MAX` is `VMADDR_CID_ANY`).
pub const LAST_GUEST_CID: u32 = u32::MAX - 1;
/// How many MACs are derived from one VM id before giving up.
const MAC_ATTEMPTS: u32 = 16;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllocError {
    #[error("no free guest address left in {0}")]
    GuestIpsExhausted(Ipv4Net),
    #[error("every MAC address derived from VM {0} is taken")]
    MacsExhausted(String),
    #[error("no free vsock CID left")]
    CidsExhausted,
}

fn overlaps(a: Ipv4Net, b: Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// The guest subnet: `preferred` if given and free, else the first free /24
/// of 172.16.0.0/12 counting from [`DEFAULT_SUBNET`] (wrapping round).
/// "Free" means overlapping nothing in `existing`, the host's routes and
/// addresses; default routes (prefix 0) are ignored since they cover
/// everything.
pub fn pick_subnet(existing: &[Ipv4Net], preferred: Option<Ipv4Net>) -> Option<Ipv4Net> {
    let taken: Vec<Ipv4Net> = existing
        .iter()
        .copied()
        .filter(|n| n.prefix_len() > 0)
        .collect();
    let free = |c: &Ipv4Net| !taken.iter().any(|t| overlaps(*c, *t));
    if let Some(p) = preferred.map(|p| p.trunc()).filter(free) {
        return Some(p);
    }
    let all: Vec<Ipv4Net> = SUBNET_POOL.subnets(24).expect("/24 within /12").collect();
    let start = all
        .iter()
        .position(|n| *n == DEFAULT_SUBNET)
        .expect("the default subnet is in the pool");
    all[start..].iter().chain(&all[..start]).copied().find(free)
}

/// The gateway (the bridge's address) of a guest subnet: its first host.
pub fn gateway(subnet: Ipv4Net) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(subnet.network()) + 1)
}

/// The lowest address of `subnet` that is not the network, the gateway, the
/// broadcast address or in `used`.
pub fn next_guest_ip(subnet: Ipv4Net, used: &BTreeSet<Ipv4Addr>) -> Result<Ipv4Addr, AllocError> {
    let gw = gateway(subnet);
    subnet
        .hosts()
        .find(|ip| *ip != gw && !used.contains(ip))
        .ok_or(AllocError::GuestIpsExhausted(subnet))
}

/// Candidate MACs for `vm_id`, in order: locally administered, unicast,
/// lower-case `xx:xx:xx:xx:xx:xx`, derived from SHA-256 of the id.
fn mac_candidates(vm_id: &str) -> impl Iterator<Item = String> {
    (0..MAC_ATTEMPTS).map(move |attempt| {
        let mut h = Sha256::new();
        h.update(b"banger-mac\0");
        h.update(vm_id.as_bytes());
        h.update(attempt.to_le_bytes());
        let d = h.finalize();
        // Bit 1 of the first octet: locally administered; bit 0: multicast.
        let b0 = (d[0] & 0xfc) | 0x02;
        format!(
            "{b0:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            d[1], d[2], d[3], d[4], d[5]
        )
    })
}

/// A MAC for `vm_id`: the same id gives the same MAC unless that one is in
/// `used` (lower-case, as the store keeps them), then the next derived one.
pub fn mac_for(vm_id: &str, used: &BTreeSet<String>) -> Result<String, AllocError> {
    mac_candidates(vm_id)
        .find(|m| !used.contains(m))
        .ok_or_else(|| AllocError::MacsExhausted(vm_id.to_owned()))
}

/// The lowest guest CID from `first` on that is not in `used`.
pub fn next_vsock_cid(used: &BTreeSet<u32>, first: u32) -> Result<u32, AllocError> {
    first_free_cid(used, first.max(FIRST_GUEST_CID), LAST_GUEST_CID)
}

/// Where an install's CIDs start: CIDs are global to the host (with
/// vhost-vsock), so each install (`install_id`: hex) takes them from a
/// range of its own, 4096 apart.
pub fn first_cid_of_install(install_id: &str) -> u32 {
    let n = u32::from_str_radix(install_id, 16).unwrap_or(0) % ((1 << 20) - 1);
    FIRST_GUEST_CID + n * 4096
}

fn first_free_cid(used: &BTreeSet<u32>, first: u32, last: u32) -> Result<u32, AllocError> {
    // `used` is sorted: walk it for the first gap at or after `first`.
    let mut candidate = first;
    for &cid in used.range(first..) {
        if cid != candidate {
            break;
        }
        candidate = candidate.checked_add(1).ok_or(AllocError::CidsExhausted)?;
    }
    if candidate > last {
        return Err(AllocError::CidsExhausted);
    }
    Ok(candidate)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn subnet_defaults_to_172_30_0_0() {
        let existing = [net("127.0.0.0/8"), net("10.0.2.0/24"), net("0.0.0.0/0")];
        assert_eq!(pick_subnet(&existing, None), Some(DEFAULT_SUBNET));
        assert_eq!(pick_subnet(&[], None), Some(DEFAULT_SUBNET));
    }

    #[test]
    fn subnet_skips_collisions() {
        // Docker-style 172.30.0.0/16 covers the default; the next /24 after it is free.
        let existing = [net("172.30.0.0/16")];
        assert_eq!(pick_subnet(&existing, None), Some(net("172.31.0.0/24")));
        // A single host address inside the default also collides.
        let existing = [net("172.30.0.77/32")];
        assert_eq!(pick_subnet(&existing, None), Some(net("172.30.1.0/24")));
        // A wider route containing everything from 172.30 up wraps to 172.16.
        let existing = [net("172.30.0.0/15")];
        assert_eq!(pick_subnet(&existing, None), Some(net("172.16.0.0/24")));
    }

    #[test]
    fn subnet_prefers_the_preferred_when_free() {
        let preferred = Some(net("10.99.0.0/24"));
        assert_eq!(pick_subnet(&[], preferred), preferred);
        // Host bits are dropped.
        assert_eq!(
            pick_subnet(&[], Some(net("10.99.0.5/24"))),
            Some(net("10.99.0.0/24"))
        );
        // Preferred collides: fall back to the pool.
        assert_eq!(
            pick_subnet(&[net("10.0.0.0/8")], preferred),
            Some(DEFAULT_SUBNET)
        );
    }

    #[test]
    fn subnet_exhaustion_is_none() {
        assert_eq!(pick_subnet(&[SUBNET_POOL], None), None);
        assert_eq!(pick_subnet(&[net("172.0.0.0/8")], None), None);
    }

    #[test]
    fn guest_ips_skip_network_gateway_broadcast_and_used() {
        let s = net("172.30.0.0/24");
        assert_eq!(gateway(s), ip("172.30.0.1"));
        assert_eq!(
            next_guest_ip(s, &BTreeSet::new()).unwrap(),
            ip("172.30.0.2")
        );
        let used: BTreeSet<_> = [ip("172.30.0.2"), ip("172.30.0.3"), ip("172.30.0.5")].into();
        assert_eq!(next_guest_ip(s, &used).unwrap(), ip("172.30.0.4"));
        // Everything but the broadcast used: exhausted, broadcast never handed out.
        let used: BTreeSet<_> = (2..=254).map(|i| Ipv4Addr::new(172, 30, 0, i)).collect();
        assert_eq!(
            next_guest_ip(s, &used),
            Err(AllocError::GuestIpsExhausted(s))
        );
    }

    #[test]
    fn guest_ips_in_a_slash_30() {
        let s = net("192.168.5.4/30");
        assert_eq!(
            next_guest_ip(s, &BTreeSet::new()).unwrap(),
            ip("192.168.5.6")
        );
        let used: BTreeSet<_> = [ip("192.168.5.6")].into();
        assert!(matches!(
            next_guest_ip(s, &used),
            Err(AllocError::GuestIpsExhausted(_))
        ));
    }

    #[test]
    fn macs_are_deterministic_local_unicast() {
        let used = BTreeSet::new();
        let a = mac_for("vm-01HZX", &used).unwrap();
        assert_eq!(a, mac_for("vm-01HZX", &used).unwrap());
        assert_ne!(a, mac_for("vm-01HZY", &used).unwrap());
        for id in ["a", "b", "vm-1", "vm-2", "01J0000000000000000000000"] {
            let m = mac_for(id, &used).unwrap();
            let octets: Vec<u8> = m
                .split(':')
                .map(|o| u8::from_str_radix(o, 16).unwrap())
                .collect();
            assert_eq!(octets.len(), 6, "{m}");
            assert_eq!(octets[0] & 0x02, 0x02, "locally administered: {m}");
            assert_eq!(octets[0] & 0x01, 0, "unicast: {m}");
            assert_eq!(m, m.to_ascii_lowercase());
        }
    }

    #[test]
    fn macs_avoid_used_and_run_out() {
        let first = mac_for("vm-1", &BTreeSet::new()).unwrap();
        let used: BTreeSet<_> = [first.clone()].into();
        let second = mac_for("vm-1", &used).unwrap();
        assert_ne!(second, first);
        let all: BTreeSet<String> = mac_candidates("vm-1").collect();
        assert_eq!(all.len(), MAC_ATTEMPTS as usize);
        assert_eq!(
            mac_for("vm-1", &all),
            Err(AllocError::MacsExhausted("vm-1".into()))
        );
        // Another VM is unaffected by vm-1's MACs.
        assert!(mac_for("vm-2", &all).is_ok());
    }

    #[test]
    fn cids_start_at_the_install_s_first_and_fill_gaps() {
        assert_eq!(next_vsock_cid(&BTreeSet::new(), 3), Ok(3));
        assert_eq!(next_vsock_cid(&[0, 1, 2].into(), 0), Ok(3), "never below 3");
        assert_eq!(next_vsock_cid(&[3, 4, 6].into(), 3), Ok(5));
        assert_eq!(next_vsock_cid(&[3, 4, 5].into(), 3), Ok(6));
        assert_eq!(next_vsock_cid(&[10].into(), 3), Ok(3));
        assert_eq!(
            next_vsock_cid(&[3, 4].into(), 4099),
            Ok(4099),
            "another install's are below"
        );
    }

    #[test]
    fn installs_take_cids_from_ranges_apart() {
        assert_eq!(first_cid_of_install("000000"), 3);
        assert_eq!(first_cid_of_install("000001"), 4099);
        let (a, b) = (
            first_cid_of_install("3fa2c1"),
            first_cid_of_install("9e0b77"),
        );
        assert!(a.abs_diff(b) >= 4096, "{a} {b}");
        assert!(first_cid_of_install("ffffff") < LAST_GUEST_CID - 4096);
    }

    #[test]
    fn cids_run_out() {
        assert_eq!(
            first_free_cid(&[3, 4, 5].into(), 3, 5),
            Err(AllocError::CidsExhausted)
        );
        assert_eq!(first_free_cid(&[3, 4].into(), 3, 5), Ok(5));
        let top: BTreeSet<u32> = [LAST_GUEST_CID].into();
        assert_eq!(next_vsock_cid(&top, 3), Ok(3));
        assert_eq!(
            first_free_cid(&[u32::MAX - 1, u32::MAX].into(), 3, u32::MAX),
            Ok(3)
        );
    }
}
