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
//!
//! The same chain carries out the VM's [`Policy`] (the `ether type ip
//! accept` above is `nat`'s): `none` is a chain that drops everything;
//! `allow=LIST` accepts IPv4 to the gateway (the host's input chain lets only
//! DNS and replies in), drops DNS to anyone else, accepts each entry's
//! destinations (marking those with a network [`ALLOWED_MARK`], which lets
//! them past host protection's private ranges) and drops the rest.

use std::net::Ipv4Addr;

use serde_json::{Value, json};

use crate::nat::BRIDGE_FAMILY;
use crate::policy::Policy;

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

/// Set on packets a policy lets through to a network it names, so that the
/// `inet` table's host protection lets them into the private ranges.
pub const ALLOWED_MARK: u32 = 0x0b4e_0001;

fn l4_port(port: u16) -> [Value; 2] {
    [
        json!({ "match": { "op": "==", "left": { "meta": { "key": "l4proto" } }, "right": { "set": ["tcp", "udp"] } } }),
        json!({ "match": { "op": "==", "left": payload("th", "dport"), "right": port } }),
    ]
}

/// The rules that carry out `policy` for IPv4 from the guest, after its
/// source checks (`gw`: the gateway, the host's address on the bridge).
fn policy_rules(policy: &Policy, gw: Ipv4Addr) -> Vec<Value> {
    match policy {
        Policy::None => vec![json!([{ "drop": null }])],
        Policy::Nat => vec![accept_type("ip")],
        Policy::Allow(entries) => {
            let mut rules = vec![
                // The host itself: its input chain lets only DNS and replies in.
                json!([
                    { "match": { "op": "==", "left": payload("ip", "daddr"), "right": gw.to_string() } },
                    { "accept": null },
                ]),
                // DNS to anyone but banger: no exfiltration through an outside resolver.
                Value::Array(
                    l4_port(53)
                        .to_vec()
                        .into_iter()
                        .chain([json!({ "drop": null })])
                        .collect(),
                ),
            ];
            for e in entries {
                let mut expr = Vec::new();
                if let Some(net) = e.net {
                    expr.push(json!({ "match": { "op": "==", "left": payload("ip", "daddr"), "right": {
                        "prefix": { "addr": net.network().to_string(), "len": net.prefix_len() } } } }));
                }
                if let Some(port) = e.port {
                    expr.extend(l4_port(port));
                }
                if e.net.is_some() {
                    expr.push(json!({ "mangle": { "key": { "meta": { "key": "mark" } }, "value": ALLOWED_MARK } }));
                }
                expr.push(json!({ "accept": null }));
                rules.push(Value::Array(expr));
            }
            rules
        }
    }
}

/// One transaction that makes (or remakes) `tap`'s guard, carrying out
/// `policy` (`mac` as [`parse_mac`] returns it; `gw`, the bridge's address).
pub fn guard(
    table: &str,
    tap: &str,
    mac: &str,
    ip: Ipv4Addr,
    gw: Ipv4Addr,
    policy: &Policy,
) -> Value {
    let chain = chain(tap);
    let c = json!({ "family": BRIDGE_FAMILY, "table": table, "name": chain });
    let rule = |expr: Value| {
        json!({ "add": { "rule": {
            "family": BRIDGE_FAMILY, "table": table, "chain": chain, "expr": expr,
        }}})
    };
    let ip = ip.to_string();
    let mut cmds = vec![
        json!({ "add": { "chain": c } }),
        json!({ "flush": { "chain": c } }),
    ];
    if *policy != Policy::None {
        cmds.extend([
            rule(drop_unless(payload("ether", "saddr"), mac)),
            rule(drop_unless(payload("arp", "saddr ether"), mac)),
            rule(drop_unless(payload("arp", "saddr ip"), ip.as_str())),
            rule(accept_type("arp")),
            rule(drop_unless(payload("ip", "saddr"), ip.as_str())),
        ]);
        cmds.extend(policy_rules(policy, gw).into_iter().map(rule));
    }
    cmds.push(rule(json!([{ "drop": null }])));
    cmds.push(json!({ "add": { "element": {
        "family": BRIDGE_FAMILY, "table": table, "name": GUARDS,
        "elem": [[tap, { "jump": { "target": chain } }]],
    }}}));
    json!({ "nftables": cmds })
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
            [172, 30, 0, 1].into(),
            &Policy::Nat,
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
        // none: nothing at all; allow: the gateway, no DNS elsewhere, each
        // entry, then drop.
        let none = guard(
            "banger",
            "bg-t1",
            "52:54:00:00:00:01",
            [172, 30, 0, 2].into(),
            [172, 30, 0, 1].into(),
            &Policy::None,
        );
        let rules: Vec<_> = none["nftables"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|c| c["add"].get("rule"))
            .collect();
        assert_eq!(rules.len(), 1);
        assert_eq!(rules[0]["expr"], json!([{ "drop": null }]));
        let allow = guard(
            "banger",
            "bg-t1",
            "52:54:00:00:00:01",
            [172, 30, 0, 2].into(),
            [172, 30, 0, 1].into(),
            &"allow=10.9.0.0/16:22,:443".parse().unwrap(),
        );
        let rules: Vec<_> = allow["nftables"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|c| c["add"].get("rule"))
            .map(|r| r["expr"].clone())
            .collect();
        assert_eq!(rules.len(), 5 + 2 + 2 + 1);
        assert_eq!(rules[5][0]["match"]["right"], "172.30.0.1");
        assert_eq!(rules[6][1]["match"]["right"], 53);
        assert!(rules[6][2].get("drop").is_some());
        assert_eq!(rules[7][0]["match"]["right"]["prefix"]["addr"], "10.9.0.0");
        assert_eq!(rules[7][3]["mangle"]["value"], ALLOWED_MARK);
        // A bare port opens no private range: no mark.
        assert!(
            rules[8]
                .as_array()
                .unwrap()
                .iter()
                .all(|e| e.get("mangle").is_none())
        );
        assert_eq!(rules[9], json!([{ "drop": null }]));
        let u = unguard("banger", "bg-t1");
        assert_eq!(u["nftables"][2]["delete"]["element"]["elem"][0], "bg-t1");
        assert_eq!(u["nftables"][3]["delete"]["chain"]["name"], "guard-bg-t1");
    }
}
