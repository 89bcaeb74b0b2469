//! banger's nftables ruleset, as the JSON batch `nft -j -f -` applies.

use ipnet::Ipv4Net;
use serde_json::{Value, json};

/// The family of banger's table. `inet` covers IPv4 and IPv6 in one table.
pub const FAMILY: &str = "inet";
/// The family of banger's table of the same name that guards each tap
/// ([`crate::guard`]): it sees frames as they enter the bridge.
pub const BRIDGE_FAMILY: &str = "bridge";

/// One transaction that replaces table `inet <table>` with guest NAT:
///
/// ```text
/// table inet <table> {
///   chain postrouting { type nat hook postrouting priority srcnat; policy accept;
///     ip saddr <subnet> oifname != "<bridge>" masquerade }
///   chain forward { type filter hook forward priority filter; policy <accept|drop>;
///     iifname "<bridge>" accept
///     oifname "<bridge>" ct state established,related accept }
/// }
/// ```
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
/// running guests' taps again):
///
/// ```text
/// table bridge <table> {
///   map guards { type ifname : verdict }
///   chain prerouting { type filter hook prerouting priority filter; policy accept;
///     iifname vmap @guards
///     iifname "bg-*" drop }
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
    let bt = json!({ "family": BRIDGE_FAMILY, "name": table });
    let iifname = json!({ "meta": { "key": "iifname" } });
    let bridge_rule = |expr: Value| {
        json!({ "add": { "rule": {
            "family": BRIDGE_FAMILY, "table": table, "chain": "prerouting", "expr": expr,
        }}})
    };
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
        // The bridge family's filter priority is -200.
        { "add": { "chain": {
            "family": BRIDGE_FAMILY, "table": table, "name": "prerouting",
            "type": "filter", "hook": "prerouting", "prio": -200, "policy": "accept",
        }}},
        bridge_rule(json!([
            { "vmap": { "key": iifname, "data": format!("@{}", crate::guard::GUARDS) } },
        ])),
        bridge_rule(json!([
            { "match": { "op": "==", "left": iifname, "right": format!("{}*", crate::names::TAP_PREFIX) } },
            { "drop": null },
        ])),
        // srcnat = 100, filter = 0.
        chain("postrouting", "nat", 100, "accept"),
        chain("forward", "filter", 0, if isolate { "drop" } else { "accept" }),
        rule("postrouting", json!([
            { "match": {
                "op": "==",
                "left": { "payload": { "protocol": "ip", "field": "saddr" } },
                "right": { "prefix": { "addr": subnet.network().to_string(), "len": subnet.prefix_len() } },
            }},
            ifname("oifname", "!="),
            { "masquerade": null },
        ])),
        rule("forward", json!([ifname("iifname", "=="), { "accept": null }])),
        rule("forward", json!([
            ifname("oifname", "=="),
            { "match": {
                "op": "in",
                "left": { "ct": { "key": "state" } },
                "right": ["established", "related"],
            }},
            { "accept": null },
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
        assert_eq!(cmds.len(), 15);
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
        let unguarded = &cmds[9]["add"]["rule"]["expr"];
        assert_eq!(unguarded[0]["match"]["right"], "bg-*");
        assert!(unguarded[1].get("drop").is_some());
        let masq = &cmds[12]["add"]["rule"]["expr"];
        assert_eq!(masq[0]["match"]["right"]["prefix"]["addr"], "172.30.0.0");
        assert_eq!(masq[0]["match"]["right"]["prefix"]["len"], 24);
        assert_eq!(masq[1]["match"]["op"], "!=");
        assert_eq!(masq[1]["match"]["right"], "banger0");
        assert!(masq[2].get("masquerade").is_some());
    }
}
