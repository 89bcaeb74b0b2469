//! What banger owns, by name and address. Every helper method checks its
//! parameters here before it touches anything.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

/// The table name banger used before tables carried the install's id
/// (`banger-<id>`): still banger's, so listed and removable.
const LEGACY_NFT_TABLE: &str = "banger";
/// Prefix of every tap banger creates.
pub const TAP_PREFIX: &str = "bg-";

/// Longest table name accepted (nftables allows more; banger needs far less).
const MAX_TABLE_LEN: usize = 32;

/// A name refused because it is not one of banger's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("{0:?} is not a banger tap name (bg- followed by 1 to 12 of a-z, 0-9, -)")]
    Tap(String),
    #[error("{0:?} is not a banger bridge name (banger followed by up to 9 of 0-9, a-z, -)")]
    Bridge(String),
    #[error("{0:?} is not a banger nftables table (banger, or banger- followed by a-z, 0-9, -)")]
    Table(String),
    #[error("{0:?} is not an IPv4 address with a prefix length, like 172.30.0.1/24")]
    Cidr(String),
    #[error("{0} is not inside a private range (10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16)")]
    NotPrivate(Ipv4Net),
    #[error("prefix /{0} is outside /16 to /30")]
    Prefix(u8),
    #[error("{0} is a network address, not a subnet's network (did you mean {1}?)")]
    NotNetwork(Ipv4Net, Ipv4Net),
    #[error("{0} is the network or broadcast address of its subnet, not a host address")]
    NotHost(Ipv4Net),
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'
}

/// `^bg-[a-z0-9-]{1,12}$`: at most 15 bytes, within IFNAMSIZ.
pub fn is_tap_name(name: &str) -> bool {
    name.strip_prefix(TAP_PREFIX)
        .is_some_and(|rest| (1..=12).contains(&rest.len()) && rest.chars().all(is_name_char))
}

/// `^banger[0-9a-z-]{0,9}$`: at most 15 bytes, within IFNAMSIZ.
pub fn is_bridge_name(name: &str) -> bool {
    name.strip_prefix("banger")
        .is_some_and(|rest| rest.len() <= 9 && rest.chars().all(is_name_char))
}

/// `banger`, or `banger-` followed by `[a-z0-9-]`, at most 32 bytes.
pub fn is_table_name(name: &str) -> bool {
    name == LEGACY_NFT_TABLE
        || name.strip_prefix("banger-").is_some_and(|rest| {
            !rest.is_empty() && name.len() <= MAX_TABLE_LEN && rest.chars().all(is_name_char)
        })
}

pub fn check_tap(name: &str) -> Result<(), NameError> {
    if is_tap_name(name) {
        Ok(())
    } else {
        Err(NameError::Tap(name.to_owned()))
    }
}

pub fn check_bridge(name: &str) -> Result<(), NameError> {
    if is_bridge_name(name) {
        Ok(())
    } else {
        Err(NameError::Bridge(name.to_owned()))
    }
}

pub fn check_table(name: &str) -> Result<(), NameError> {
    if is_table_name(name) {
        Ok(())
    } else {
        Err(NameError::Table(name.to_owned()))
    }
}

const PRIVATE: [Ipv4Net; 3] = [
    Ipv4Net::new_assert(Ipv4Addr::new(10, 0, 0, 0), 8),
    Ipv4Net::new_assert(Ipv4Addr::new(172, 16, 0, 0), 12),
    Ipv4Net::new_assert(Ipv4Addr::new(192, 168, 0, 0), 16),
];

/// A private (RFC 1918) range with a prefix of /16 to /30.
fn check_private(net: Ipv4Net) -> Result<(), NameError> {
    if !(16..=30).contains(&net.prefix_len()) {
        return Err(NameError::Prefix(net.prefix_len()));
    }
    if !PRIVATE.iter().any(|p| p.contains(&net)) {
        return Err(NameError::NotPrivate(net.trunc()));
    }
    Ok(())
}

fn parse_cidr(s: &str) -> Result<Ipv4Net, NameError> {
    s.parse().map_err(|_| NameError::Cidr(s.to_owned()))
}

/// A guest subnet such as `172.30.0.0/24`: private, /16 to /30, host bits zero.
pub fn parse_subnet(s: &str) -> Result<Ipv4Net, NameError> {
    let net = parse_cidr(s)?;
    check_private(net)?;
    if net != net.trunc() {
        return Err(NameError::NotNetwork(net, net.trunc()));
    }
    Ok(net)
}

/// A gateway address with its subnet's prefix such as `172.30.0.1/24`:
/// private, /16 to /30, neither the network nor the broadcast address.
pub fn parse_gateway(s: &str) -> Result<Ipv4Net, NameError> {
    let net = parse_cidr(s)?;
    check_private(net)?;
    if net.addr() == net.network() || net.addr() == net.broadcast() {
        return Err(NameError::NotHost(net));
    }
    Ok(net)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_names() {
        for ok in ["bg-t0", "bg-t0123abcd", "bg-a", "bg-abcdefghijkl", "bg--"] {
            assert!(is_tap_name(ok), "{ok}");
        }
        for bad in [
            "bg-",
            "bg-abcdefghijklm", // 13 after the prefix: beyond IFNAMSIZ
            "bg-T1",
            "bg-a_b",
            "bg-a.b",
            "tap0",
            "eth0",
            "xbg-a",
            "banger0",
            "bg-a/b",
            "bg-é",
        ] {
            assert!(!is_tap_name(bad), "{bad}");
            assert!(check_tap(bad).is_err());
        }
        assert!("bg-abcdefghijkl".len() < 16);
    }

    #[test]
    fn bridge_names() {
        for ok in ["banger", "banger0", "banger-t12345a", "banger123456789"] {
            assert!(is_bridge_name(ok), "{ok}");
        }
        for bad in [
            "banger1234567890",
            "docker0",
            "br0",
            "Banger0",
            "banger_0",
            "bg-t1",
            "",
        ] {
            assert!(!is_bridge_name(bad), "{bad}");
            assert!(check_bridge(bad).is_err());
        }
    }

    #[test]
    fn table_names() {
        for ok in ["banger", "banger-test-1a2b", "banger-x"] {
            assert!(is_table_name(ok), "{ok}");
        }
        for bad in [
            "banger-",
            "bangerx",
            "filter",
            "nat",
            "docker",
            "banger-A",
            "banger-a b",
            "banger-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        ] {
            assert!(!is_table_name(bad), "{bad}");
            assert!(check_table(bad).is_err());
        }
    }

    #[test]
    fn subnets() {
        assert_eq!(
            parse_subnet("172.30.0.0/24").unwrap(),
            "172.30.0.0/24".parse::<Ipv4Net>().unwrap()
        );
        assert!(parse_subnet("10.1.0.0/16").is_ok());
        assert!(parse_subnet("192.168.7.4/30").is_ok());
        assert!(matches!(
            parse_subnet("172.30.0.1/24"),
            Err(NameError::NotNetwork(..))
        ));
        assert!(matches!(
            parse_subnet("8.8.8.0/24"),
            Err(NameError::NotPrivate(_))
        ));
        // 172.32/16 is just outside 172.16.0.0/12.
        assert!(matches!(
            parse_subnet("172.32.0.0/16"),
            Err(NameError::NotPrivate(_))
        ));
        assert!(matches!(
            parse_subnet("10.0.0.0/8"),
            Err(NameError::Prefix(8))
        ));
        assert!(matches!(
            parse_subnet("10.0.0.0/31"),
            Err(NameError::Prefix(31))
        ));
        assert!(matches!(parse_subnet("10.0.0.0"), Err(NameError::Cidr(_))));
        assert!(matches!(parse_subnet("fd00::/64"), Err(NameError::Cidr(_))));
    }

    #[test]
    fn gateways() {
        let gw = parse_gateway("172.30.0.1/24").unwrap();
        assert_eq!(gw.addr(), Ipv4Addr::new(172, 30, 0, 1));
        assert_eq!(gw.prefix_len(), 24);
        assert!(matches!(
            parse_gateway("172.30.0.0/24"),
            Err(NameError::NotHost(_))
        ));
        assert!(matches!(
            parse_gateway("172.30.0.255/24"),
            Err(NameError::NotHost(_))
        ));
        assert!(matches!(
            parse_gateway("100.64.0.1/24"),
            Err(NameError::NotPrivate(_))
        ));
        assert!(matches!(
            parse_gateway("192.168.1.1/32"),
            Err(NameError::Prefix(32))
        ));
    }
}
