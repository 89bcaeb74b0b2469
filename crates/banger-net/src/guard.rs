//! Anti-spoofing: each tap's guard in table `bridge <table>`, as the JSON
//! batches `nft -j -f -` applies.
//!
//! ```text
//! table bridge <table> {
//!   map guards { type ifname : verdict; elements = { "<tap>" : jump guard-<tap> } }
//!   chain guard-<tap> {
//!     ether saddr != <mac> drop
//!     arp saddr ether != <mac> drop
//!     arp saddr ip != <ip> drop
//!     ether type arp accept
//!     ip saddr != <ip> drop
//!     ether type ip accept
//!     drop
//!   }
//! }
//! ```
//!
//! The prerouting chain ([`crate::nat::ruleset`]) jumps to the chain of the
//! tap a frame came in on, before the bridge learns its source MAC: a guest
//! sends only from its own MAC and IPv4 address, answers ARP only for its
//! own address (never for the gateway or another guest), and sends nothing
//! else (no IPv6, no VLAN tags).

use std::net::Ipv4Addr;

use serde_json::{Value, json};

use crate::nat::BRIDGE_FAMILY;

/// The verdict map from a tap's name to its guard chain.
pub const GUARDS: &str = "guards";

/// The guard chain of `tap`.
pub fn chain(tap: &str) -> String {
    format!("guard-{tap}")
}

/// `aa:bb:cc:dd:ee:ff`, a unicast MAC, lowercased.
pub fn parse_mac(s: &str) -> Option<String> {
    let parts: Vec<u8> = s
        .split(':')
        .map(|p| {
            (p.len() == 2)
                .then(|| u8::from_str_radix(p, 16).ok())
                .flatten()
        })
        .collect::<Option<_>>()?;
    (parts.len() == 6 && parts[0] & 1 == 0 && parts.iter().any(|b| *b != 0))
        .then(|| s.to_ascii_lowercase())
}

fn payload(protocol: &str, field: &str) -> Value {
    json!({ "payload": { "protocol": protocol, "field": field } })
}

fn drop_unless(left: Value, right: impl Into<Value>) -> Value {
    json!([{ "match": { "op": "!=", "left": left, "right": right.into() } }, { "drop": null }])
}

fn accept_type(ty: &str) -> Value {
    json!([{ "match": { "op": "==", "left": payload("ether", "type"), "right": ty } }, { "accept": null }])
}

/// One transaction that makes (or remakes) `tap`'s guard. `mac` as
/// [`parse_mac`] returns it.
pub fn guard(table: &str, tap: &str, mac: &str, ip: Ipv4Addr) -> Value {
    let chain = chain(tap);
    let c = json!({ "family": BRIDGE_FAMILY, "table": table, "name": chain });
    let rule = |expr: Value| {
        json!({ "add": { "rule": {
            "family": BRIDGE_FAMILY, "table": table, "chain": chain, "expr": expr,
        }}})
    };
    let ip = ip.to_string();
    json!({ "nftables": [
        { "add": { "chain": c } },
        { "flush": { "chain": c } },
        rule(drop_unless(payload("ether", "saddr"), mac)),
        rule(drop_unless(payload("arp", "saddr ether"), mac)),
        rule(drop_unless(payload("arp", "saddr ip"), ip.as_str())),
        rule(accept_type("arp")),
        rule(drop_unless(payload("ip", "saddr"), ip.as_str())),
        rule(accept_type("ip")),
        rule(json!([{ "drop": null }])),
        { "add": { "element": {
            "family": BRIDGE_FAMILY, "table": table, "name": GUARDS,
            "elem": [[tap, { "jump": { "target": chain } }]],
        }}},
    ]})
}

/// One transaction that removes `tap`'s guard whether or not it exists
/// (made first, so that the deletes always find it).
pub fn unguard(table: &str, tap: &str) -> Value {
    let chain = chain(tap);
    let c = json!({ "family": BRIDGE_FAMILY, "table": table, "name": chain });
    json!({ "nftables": [
        { "add": { "chain": c } },
        { "add": { "element": {
            "family": BRIDGE_FAMILY, "table": table, "name": GUARDS,
            "elem": [[tap, { "jump": { "target": chain } }]],
        }}},
        { "delete": { "element": {
            "family": BRIDGE_FAMILY, "table": table, "name": GUARDS,
            "elem": [tap],
        }}},
        { "delete": { "chain": { "family": BRIDGE_FAMILY, "table": table, "name": chain } } },
    ]})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs() {
        assert_eq!(
            parse_mac("52:54:00:AB:cd:01").as_deref(),
            Some("52:54:00:ab:cd:01")
        );
        for bad in [
            "",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:01:02",
            "01:00:5e:00:00:01", // multicast
            "00:00:00:00:00:00",
            "52:54:00:ab:cd:1",
            "52-54-00-ab-cd-01",
            "52:54:00:ab:cd:zz",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_guard_is_one_chain_and_one_map_element() {
        let v = guard(
            "banger",
            "bg-t1",
            "52:54:00:00:00:01",
            [172, 30, 0, 2].into(),
        );
        let cmds = v["nftables"].as_array().unwrap();
        assert_eq!(cmds[0]["add"]["chain"]["name"], "guard-bg-t1");
        assert_eq!(cmds[1]["flush"]["chain"]["name"], "guard-bg-t1");
        let last = cmds.last().unwrap();
        assert_eq!(last["add"]["element"]["elem"][0][0], "bg-t1");
        assert_eq!(
            last["add"]["element"]["elem"][0][1]["jump"]["target"],
            "guard-bg-t1"
        );
        // Ends in drop: nothing but its own IPv4 and ARP leaves the tap.
        let rules: Vec<_> = cmds.iter().filter_map(|c| c["add"].get("rule")).collect();
        assert_eq!(rules.last().unwrap()["expr"][0], json!({ "drop": null }));
        for r in &rules {
            assert_eq!(r["family"], "bridge");
            assert_eq!(r["table"], "banger");
        }
        let u = unguard("banger", "bg-t1");
        assert_eq!(u["nftables"][2]["delete"]["element"]["elem"][0], "bg-t1");
        assert_eq!(u["nftables"][3]["delete"]["chain"]["name"], "guard-bg-t1");
    }
}
