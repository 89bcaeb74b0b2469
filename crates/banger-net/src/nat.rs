//! banger's nftables ruleset, as the JSON batch `nft -j -f -` applies.

use ipnet::Ipv4Net;
use serde_json::{Value, json};

/// The family of banger's table. `inet` covers IPv4 and IPv6 in one table.
pub const FAMILY: &str = "inet";
/// The family of banger's table of the same name that guards each tap
/// ([`crate::guard`]): it sees frames as they enter the bridge.
pub const BRIDGE_FAMILY: &str = "bridge";

/// Where a guest may never go unless a policy says so: the host's LAN and
/// other private ranges, carrier-grade NAT, link-local (cloud metadata).
/// Where the daemon's secrets proxy listens, on the bridge's address:
/// secret-bearing guests' HTTPS (TCP 443) is DNATed there.
pub const SECRETS_PROXY_PORT: u16 = 4443;

pub const PRIVATE: [&str; 5] = [
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "169.254.0.0/16",
];

/// One transaction that replaces table `inet <table>` with guest NAT and
/// host protection (`<gw>`: the subnet's gateway, the bridge's address):
///
/// ```text
/// table inet <table> {
///   map policies { type ipv4_addr : verdict }
///   chain postrouting { type nat hook postrouting priority srcnat; policy accept;
///     ip saddr <subnet> oifname != "<bridge>" masquerade }
///   chain input { type filter hook input priority filter; policy accept;
///     iifname "<bridge>" ct state established,related accept
///     iifname "<bridge>" ip daddr <gw> meta l4proto { tcp, udp } th dport 53 accept
///     iifname "<bridge>" drop }
///   chain forward { type filter hook forward priority filter; policy <accept|drop>;
///     iifname "<bridge>" ip saddr vmap @policies
///     iifname "<bridge>" ip daddr { PRIVATE } drop
///     iifname "<bridge>" oifname != "<bridge>" meta nfproto ipv4 accept
///     iifname "<bridge>" drop
///     oifname "<bridge>" ct state established,related accept
///     oifname "<bridge>" drop }
/// }
/// ```
///
/// A guest reaches the host only for banger's DNS on the gateway (any of
/// the host's addresses arrives through `input`), never the [`PRIVATE`]
/// ranges, and the internet through NAT; nothing reaches a guest but
/// replies (port forwards are the daemon's own connections). Before all
/// that, each guest's policy chain ([`crate::guard`]) has its say: what it
/// accepts (a listed private range too) is accepted, what it drops is
/// dropped; an empty chain (`nat`) leaves the decision to these rules.
///
/// `isolate` makes the forward policy `drop`: where banger is what turned
/// IPv4 forwarding on, the host forwards banger's bridge traffic and
/// nothing else (as Docker sets FORWARD to DROP). Where forwarding was
/// already on, someone else routes through this host and the policy stays
/// `accept`. The decision lives in the table (its forward policy): made
/// again, the table keeps it; deleted by someone else while forwarding
/// stays on, it is lost and the next table accepts (failing open for
/// whoever else forwards, never breaking them).
///
/// And table `bridge <table>`, where each tap's guard hangs
/// ([`crate::guard`]; made again without guards, so the caller guards its
/// running guests' taps again), and guests never reach each other:
///
/// ```text
/// table bridge <table> {
///   map guards { type ifname : verdict }
///   chain prerouting { type filter hook prerouting priority filter; policy accept;
///     iifname vmap @guards
///     iifname "bg-*" drop }
///   chain forward { type filter hook forward priority filter; policy accept;
///     iifname "bg-*" oifname "bg-*" drop }
/// }
/// ```
///
/// A banger tap with no guard carries nothing.
///
/// `add` before `delete` makes the delete succeed whether or not the table
/// existed; nft applies the whole batch atomically or not at all. Only these
/// tables are named, so no other table is touched.
pub fn ruleset(table: &str, subnet: Ipv4Net, bridge: &str, isolate: bool) -> Value {
    let t = json!({ "family": FAMILY, "name": table });
    let chain = |name: &str, ty: &str, prio: i32, policy: &str| {
        json!({ "add": { "chain": {
            "family": FAMILY, "table": table, "name": name,
            "type": ty, "hook": name, "prio": prio, "policy": policy,
        }}})
    };
    let rule = |chain: &str, expr: Value| {
        json!({ "add": { "rule": {
            "family": FAMILY, "table": table, "chain": chain, "expr": expr,
        }}})
    };
    let ifname = |key: &str, op: &str| json!({ "match": { "op": op, "left": { "meta": { "key": key } }, "right": bridge } });
    let established = json!({ "match": {
        "op": "in",
        "left": { "ct": { "key": "state" } },
        "right": ["established", "related"],
    }});
    let prefix = |net: Ipv4Net| json!({ "prefix": { "addr": net.network().to_string(), "len": net.prefix_len() } });
    let private: Vec<Value> = PRIVATE
        .iter()
        .map(|n| prefix(n.parse().expect("a CIDR")))
        .collect();
    let bt = json!({ "family": BRIDGE_FAMILY, "name": table });
    let meta = |key: &str| json!({ "meta": { "key": key } });
    let bridge_chain = |name: &str| {
        // The bridge family's filter priority is -200.
        json!({ "add": { "chain": {
            "family": BRIDGE_FAMILY, "table": table, "name": name,
            "type": "filter", "hook": name, "prio": -200, "policy": "accept",
        }}})
    };
    let bridge_rule = |chain: &str, expr: Value| {
        json!({ "add": { "rule": {
            "family": BRIDGE_FAMILY, "table": table, "chain": chain, "expr": expr,
        }}})
    };
    let any_tap = format!("{}*", crate::names::TAP_PREFIX);
    // Traffic to the gateway: banger's services there (DNS, the secrets proxy).
    let to_gateway = json!({ "match": {
        "op": "==",
        "left": { "payload": { "protocol": "ip", "field": "daddr" } },
        "right": crate::alloc::gateway(subnet).to_string(),
    }});
    json!({ "nftables": [
        { "add": { "table": t } },
        { "delete": { "table": t } },
        { "add": { "table": t } },
        { "add": { "table": bt } },
        { "delete": { "table": bt } },
        { "add": { "table": bt } },
        { "add": { "map": {
            "family": BRIDGE_FAMILY, "table": table, "name": crate::guard::GUARDS,
            "type": "ifname", "map": "verdict",
        }}},
        bridge_chain("prerouting"),
        bridge_chain("forward"),
        bridge_rule("prerouting", json!([
            { "vmap": { "key": meta("iifname"), "data": format!("@{}", crate::guard::GUARDS) } },
        ])),
        bridge_rule("prerouting", json!([
            { "match": { "op": "==", "left": meta("iifname"), "right": any_tap } },
            { "drop": null },
        ])),
        bridge_rule("forward", json!([
            { "match": { "op": "==", "left": meta("iifname"), "right": any_tap } },
            { "match": { "op": "==", "left": meta("oifname"), "right": any_tap } },
            { "drop": null },
        ])),
        { "add": { "map": {
            "family": FAMILY, "table": table, "name": crate::guard::POLICIES,
            "type": "ipv4_addr", "map": "verdict",
        }}},
        // srcnat = 100, filter = 0.
        chain("postrouting", "nat", 100, "accept"),
        chain("input", "filter", 0, "accept"),
        chain("forward", "filter", 0, if isolate { "drop" } else { "accept" }),
        rule("postrouting", json!([
            { "match": {
                "op": "==",
                "left": { "payload": { "protocol": "ip", "field": "saddr" } },
                "right": prefix(subnet),
            }},
            ifname("oifname", "!="),
            { "masquerade": null },
        ])),
        rule("input", json!([ifname("iifname", "=="), established, { "accept": null }])),
        rule("input", json!([
            ifname("iifname", "=="),
            to_gateway.clone(),
            { "match": { "op": "==", "left": meta("l4proto"), "right": { "set": ["tcp", "udp"] } } },
            { "match": { "op": "==", "left": { "payload": { "protocol": "th", "field": "dport" } }, "right": 53 } },
            { "accept": null },
        ])),
        // The secrets proxy, reached only through the DNAT below.
        rule("input", json!([
            ifname("iifname", "=="),
            to_gateway.clone(),
            { "match": { "op": "==", "left": meta("l4proto"), "right": "tcp" } },
            { "match": { "op": "==", "left": { "payload": { "protocol": "tcp", "field": "dport" } }, "right": SECRETS_PROXY_PORT } },
            { "match": { "op": "in", "left": { "ct": { "key": "status" } }, "right": "dnat" } },
            { "accept": null },
        ])),
        rule("input", json!([ifname("iifname", "=="), { "drop": null }])),
        rule("forward", json!([
            ifname("iifname", "=="),
            { "vmap": {
                "key": { "payload": { "protocol": "ip", "field": "saddr" } },
                "data": format!("@{}", crate::guard::POLICIES),
            }},
        ])),
        rule("forward", json!([
            ifname("iifname", "=="),
            { "match": {
                "op": "==",
                "left": { "payload": { "protocol": "ip", "field": "daddr" } },
                "right": { "set": private },
            }},
            { "drop": null },
        ])),
        rule("forward", json!([
            ifname("iifname", "=="),
            ifname("oifname", "!="),
            { "match": { "op": "==", "left": meta("nfproto"), "right": "ipv4" } },
            { "accept": null },
        ])),
        rule("forward", json!([ifname("iifname", "=="), { "drop": null }])),
        rule("forward", json!([ifname("oifname", "=="), established, { "accept": null }])),
        rule("forward", json!([ifname("oifname", "=="), { "drop": null }])),
        // The secrets proxy's way in (dstnat = -100).
        { "add": { "set": {
            "family": FAMILY, "table": table, "name": crate::guard::SECRET_GUESTS,
            "type": "ipv4_addr",
        }}},
        { "add": { "chain": {
            "family": FAMILY, "table": table, "name": "secrets-policy",
            "type": "filter", "hook": "prerouting", "prio": -150, "policy": "accept",
        }}},
        { "add": { "chain": {
            "family": FAMILY, "table": table, "name": "secrets-dnat",
            "type": "nat", "hook": "prerouting", "prio": -100, "policy": "accept",
        }}},
        // A secret-bearing guest's HTTPS meets its policy chain here, before
        // the DNAT below sends it to the proxy (whose traffic `forward`,
        // where the policy is otherwise applied, never sees).
        rule("secrets-policy", json!([
            ifname("iifname", "=="),
            { "match": { "op": "==", "left": { "payload": { "protocol": "ip", "field": "saddr" } }, "right": format!("@{}", crate::guard::SECRET_GUESTS) } },
            { "match": { "op": "!=", "left": { "payload": { "protocol": "ip", "field": "daddr" } }, "right": prefix(subnet) } },
            { "match": { "op": "==", "left": meta("l4proto"), "right": "tcp" } },
            { "match": { "op": "==", "left": { "payload": { "protocol": "tcp", "field": "dport" } }, "right": 443 } },
            { "vmap": {
                "key": { "payload": { "protocol": "ip", "field": "saddr" } },
                "data": format!("@{}", crate::guard::POLICIES),
            }},
        ])),
        rule("secrets-dnat", json!([
            ifname("iifname", "=="),
            { "match": { "op": "==", "left": { "payload": { "protocol": "ip", "field": "saddr" } }, "right": format!("@{}", crate::guard::SECRET_GUESTS) } },
            { "match": { "op": "!=", "left": { "payload": { "protocol": "ip", "field": "daddr" } }, "right": prefix(subnet) } },
            { "match": { "op": "==", "left": meta("l4proto"), "right": "tcp" } },
            { "match": { "op": "==", "left": { "payload": { "protocol": "tcp", "field": "dport" } }, "right": 443 } },
            { "dnat": { "family": "ip", "addr": crate::alloc::gateway(subnet).to_string(), "port": SECRETS_PROXY_PORT } },
        ])),
    ]})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ruleset_names_only_its_own_table() {
        let v = ruleset(
            "banger-t1",
            "172.30.0.0/24".parse().unwrap(),
            "banger0",
            false,
        );
        let cmds = v["nftables"].as_array().unwrap();
        assert_eq!(cmds.len(), 32);
        for cmd in cmds {
            let (verb, obj) = cmd.as_object().unwrap().iter().next().unwrap();
            assert!(verb == "add" || verb == "delete", "{cmd}");
            let (what, body) = obj.as_object().unwrap().iter().next().unwrap();
            assert!(
                body["family"] == "inet" || body["family"] == "bridge",
                "{cmd}"
            );
            let table = if what == "table" {
                &body["name"]
            } else {
                &body["table"]
            };
            assert_eq!(table, "banger-t1", "{cmd}");
        }
        assert_eq!(cmds[1]["delete"]["table"]["name"], "banger-t1");
        assert_eq!(cmds[4]["delete"]["table"]["family"], "bridge");
        // Unguarded banger taps carry nothing.
        let unguarded = &cmds[10]["add"]["rule"]["expr"];
        assert_eq!(unguarded[0]["match"]["right"], "bg-*");
        assert!(unguarded[1].get("drop").is_some());
        let masq = &cmds[16]["add"]["rule"]["expr"];
        assert_eq!(masq[0]["match"]["right"]["prefix"]["addr"], "172.30.0.0");
        assert_eq!(masq[0]["match"]["right"]["prefix"]["len"], 24);
        assert_eq!(masq[1]["match"]["op"], "!=");
        assert_eq!(masq[1]["match"]["right"], "banger0");
        assert!(masq[2].get("masquerade").is_some());
        // Guests reach the gateway's DNS and nothing else of the host's.
        let dns = &cmds[18]["add"]["rule"]["expr"];
        assert_eq!(dns[1]["match"]["right"], "172.30.0.1");
        assert_eq!(dns[3]["match"]["right"], 53);
        // ... and the secrets proxy, only once DNATed there.
        let proxy = &cmds[19]["add"]["rule"]["expr"];
        assert_eq!(proxy[3]["match"]["right"], SECRETS_PROXY_PORT);
        assert_eq!(proxy[4]["match"]["right"], "dnat");
        assert!(cmds[20]["add"]["rule"]["expr"][1].get("drop").is_some());
        assert_eq!(
            cmds[21]["add"]["rule"]["expr"][1]["vmap"]["data"],
            "@policies"
        );
        let private = &cmds[22]["add"]["rule"]["expr"][1]["match"]["right"]["set"];
        assert_eq!(private.as_array().unwrap().len(), PRIVATE.len());
        assert_eq!(private[4]["prefix"]["addr"], "169.254.0.0");
        // A secret guest's HTTPS: its policy first, then the DNAT.
        let policy = &cmds[30]["add"]["rule"];
        assert_eq!(policy["chain"], "secrets-policy");
        assert_eq!(policy["expr"][5]["vmap"]["data"], "@policies");
        let dnat = &cmds[31]["add"]["rule"]["expr"][5]["dnat"];
        assert_eq!(dnat["addr"], "172.30.0.1");
        assert_eq!(dnat["port"], SECRETS_PROXY_PORT);
    }
}
