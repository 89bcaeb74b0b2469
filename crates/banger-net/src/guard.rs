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
//! A `none` VM's chain drops everything, recording the TCP/UDP
//! destinations it tried in the bridge set `denied-<a-b-c-d>` (below).
//! Every other VM's IPv4 then meets
//! its policy chain in table `inet <table>` (forward: conntrack sees it
//! there), reached through the verdict map `policies` (the VM's address →
//! `jump policy-<a-b-c-d>`; the anti-spoofing above makes the address
//! name the VM):
//!
//! ```text
//! chain policy-<ip> {        # nat: empty (the base chain's rules decide)
//!   ct state established,related accept
//!   meta l4proto { tcp, udp } th dport 53 drop     # DNS to anyone but banger
//!   ip daddr <net> [th dport <port>] accept          # each CIDR entry
//!   ip daddr != { PRIVATE } th dport <port> accept   # each :PORT entry
//!   ip daddr @dns-<ip> accept                        # domains, any port
//!   ip daddr . th dport @dnsp-<ip> accept            # domains with a port
//!   drop
//! }
//! ```
//!
//! The two sets hold the addresses banger's DNS server answered for the
//! allowed names, each for its record's TTL (element timeouts,
//! [`allow_resolved`]); connections outlive them through conntrack.
//!
//! Every drop of the policy chain counts its packets, and a TCP/UDP packet
//! it drops also records its destination (address . protocol . port, with
//! a packet counter) in the guest's inet set `denied-<a-b-c-d>`: that is
//! the denied log `vm net log` shows, in every mode, since the policy was
//! last applied.

use std::net::Ipv4Addr;

use serde_json::{Value, json};

use crate::nat::{BRIDGE_FAMILY, FAMILY, PRIVATE};
use crate::policy::Policy;

/// The verdict map from a tap's name to its guard chain.
pub const GUARDS: &str = "guards";

/// The guard chain of `tap`.
pub fn chain(tap: &str) -> String {
    format!("guard-{tap}")
}

/// `aa:bb:cc:dd:ee:ff` (any case), a unicast MAC: its octets.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let parts: [u8; 6] = s
        .split(':')
        .map(|p| {
            (p.len() == 2)
                .then(|| u8::from_str_radix(p, 16).ok())
                .flatten()
        })
        .collect::<Option<Vec<u8>>>()?
        .try_into()
        .ok()?;
    (parts[0] & 1 == 0 && parts.iter().any(|b| *b != 0)).then_some(parts)
}

/// A MAC as nft and the logs write it: lowercase, colon-separated.
pub fn mac_text(mac: [u8; 6]) -> String {
    mac.map(|b| format!("{b:02x}")).join(":")
}

fn payload(protocol: &str, field: &str) -> Value {
    json!({ "payload": { "protocol": protocol, "field": field } })
}

/// Every drop counts its packets: `net.inspect` reports their sum.
fn counted_drop() -> [Value; 2] {
    [json!({ "counter": null }), json!({ "drop": null })]
}

/// The statement that records a TCP/UDP packet's destination in `@set`,
/// counting its packets (`family`'s way to name the protocol).
fn record(family: &str, set: &str) -> Value {
    json!({ "set": {
        "op": "update",
        "elem": { "concat": [payload("ip", "daddr"), l4proto(family), payload("th", "dport")] },
        "set": format!("@{set}"),
        "stmt": [{ "counter": null }],
    }})
}

fn l4proto(family: &str) -> Value {
    if family == BRIDGE_FAMILY {
        payload("ip", "protocol")
    } else {
        json!({ "meta": { "key": "l4proto" } })
    }
}

/// The rules that drop what `matches` match, counted; a TCP/UDP packet
/// among them first records its destination in `@set` (`family`: `inet`,
/// or `bridge`, where the packet must first be IPv4).
fn denied_drop(matches: Vec<Value>, family: &str, set: &str) -> [Value; 2] {
    let mut recorded = matches.clone();
    if family == BRIDGE_FAMILY {
        recorded.push(
            json!({ "match": { "op": "==", "left": payload("ether", "type"), "right": "ip" } }),
        );
    }
    recorded.extend([
        json!({ "match": { "op": "==", "left": l4proto(family), "right": { "set": ["tcp", "udp"] } } }),
        record(family, set),
    ]);
    recorded.extend(counted_drop());
    let mut rest = matches;
    rest.extend(counted_drop());
    [Value::Array(recorded), Value::Array(rest)]
}

fn drop_unless(left: Value, right: impl Into<Value>) -> Value {
    let mut expr = vec![json!({ "match": { "op": "!=", "left": left, "right": right.into() } })];
    expr.extend(counted_drop());
    Value::Array(expr)
}

fn accept_type(ty: &str) -> Value {
    json!([{ "match": { "op": "==", "left": payload("ether", "type"), "right": ty } }, { "accept": null }])
}

/// The inet verdict map from a guest's address to its policy chain.
pub const POLICIES: &str = "policies";

/// The inet set of guests with secrets: their TCP 443 goes to the secrets
/// proxy (`nat.rs`), after their policy chain allowed it.
pub const SECRET_GUESTS: &str = "secret-guests";

fn secret_guest(verb: &str, table: &str, ip: Ipv4Addr) -> Value {
    json!({ verb: { "element": {
        "family": FAMILY, "table": table, "name": SECRET_GUESTS, "elem": [ip.to_string()],
    }}})
}

fn dashed(ip: Ipv4Addr) -> String {
    ip.to_string().replace('.', "-")
}

/// The policy chain of the guest at `ip`.
pub fn policy_chain(ip: Ipv4Addr) -> String {
    format!("policy-{}", dashed(ip))
}

/// The set where `learn` records the guest's new destinations (address .
/// protocol . port).
pub fn learn_set(ip: Ipv4Addr) -> String {
    format!("learned-{}", dashed(ip))
}

/// The set where a guest's denied TCP/UDP destinations are recorded, with
/// a packet count each: in table `inet <table>` under every policy but
/// `none`, in table `bridge <table>` under `none`.
pub fn denied_set(ip: Ipv4Addr) -> String {
    format!("denied-{}", dashed(ip))
}

/// How many destinations `learn` (and the denied log) records at most per guest.
pub const LEARN_MAX: u32 = 4096;

/// Which of a guest's packet-path sets exist now (those the packet path
/// adds to, which must be made `dynamic`: see [`guard`]): the inet learn
/// and denied sets (made and deleted together), the bridge denied set.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DynSets {
    pub inet: bool,
    pub bridge: bool,
}

/// The sets of resolved addresses of the guest at `ip`: any port, and
/// address . port.
pub fn resolved_sets(ip: Ipv4Addr) -> [String; 2] {
    [
        format!("dns-{}", dashed(ip)),
        format!("dnsp-{}", dashed(ip)),
    ]
}

fn l4_port(port: u16) -> [Value; 2] {
    [
        json!({ "match": { "op": "==", "left": { "meta": { "key": "l4proto" } }, "right": { "set": ["tcp", "udp"] } } }),
        json!({ "match": { "op": "==", "left": payload("th", "dport"), "right": port } }),
    ]
}

fn prefix(net: ipnet::Ipv4Net) -> Value {
    json!({ "prefix": { "addr": net.network().to_string(), "len": net.prefix_len() } })
}

/// The rules of the policy chain of the guest at `ip`.
fn policy_rules(policy: &Policy, ip: Ipv4Addr) -> Vec<Value> {
    let daddr = payload("ip", "daddr");
    let private: Vec<Value> = PRIVATE
        .iter()
        .map(|n| prefix(n.parse().expect("a CIDR")))
        .collect();
    let denied = denied_set(ip);
    let drop = |matches: Vec<Value>| denied_drop(matches, FAMILY, &denied);
    // What host protection drops below anyway, counted as this guest's.
    let private_drop = || {
        drop(vec![
            json!({ "match": { "op": "==", "left": daddr, "right": { "set": private } } }),
        ])
    };
    let entries = match policy {
        Policy::Nat => return private_drop().to_vec(),
        // What host protection denies is counted, not learnt.
        Policy::Learn => {
            let mut rules = private_drop().to_vec();
            rules.push(json!([
                { "match": { "op": "==", "left": { "meta": { "key": "l4proto" } }, "right": { "set": ["tcp", "udp"] } } },
                { "match": { "op": "in", "left": { "ct": { "key": "state" } }, "right": "new" } },
                { "set": {
                    "op": "add",
                    "elem": { "concat": [daddr, { "meta": { "key": "l4proto" } }, payload("th", "dport")] },
                    "set": format!("@{}", learn_set(ip)),
                }},
            ]));
            return rules;
        }
        // The bridge guard drops (and records) it all before it gets here.
        Policy::None => return vec![Value::Array(counted_drop().to_vec())],
        Policy::Allow(entries) => entries,
    };
    let [any_port, with_port] = resolved_sets(ip);
    let mut rules = vec![json!([
        { "match": { "op": "in", "left": { "ct": { "key": "state" } }, "right": ["established", "related"] } },
        { "accept": null },
    ])];
    // DNS to anyone but banger (TCP/UDP already: one rule).
    let mut dns = l4_port(53).to_vec();
    dns.push(record(FAMILY, &denied));
    dns.extend(counted_drop());
    rules.push(Value::Array(dns));
    for e in entries.iter().filter(|e| e.domain.is_none()) {
        let mut expr = match e.net {
            Some(net) => {
                vec![json!({ "match": { "op": "==", "left": daddr, "right": prefix(net) } })]
            }
            None => {
                vec![json!({ "match": { "op": "!=", "left": daddr, "right": { "set": private } } })]
            }
        };
        if let Some(port) = e.port {
            expr.extend(l4_port(port));
        }
        expr.push(json!({ "accept": null }));
        rules.push(Value::Array(expr));
    }
    rules.push(json!([
        { "match": { "op": "==", "left": daddr, "right": format!("@{any_port}") } },
        { "accept": null },
    ]));
    rules.push(json!([
        { "match": { "op": "==", "left": { "meta": { "key": "l4proto" } }, "right": { "set": ["tcp", "udp"] } } },
        { "match": { "op": "==", "left": { "concat": [daddr, payload("th", "dport")] }, "right": format!("@{with_port}") } },
        { "accept": null },
    ]));
    rules.extend(drop(Vec::new()));
    rules
}

fn delete_set(family: &str, table: &str, name: String) -> Value {
    json!({ "delete": { "set": { "family": family, "table": table, "name": name } } })
}

/// `add set` of a packet-path set of the guest at `ip` (address . protocol
/// . port): the learn set, or (`counted`) a denied set.
fn dyn_set(family: &str, table: &str, name: String, counted: bool) -> Value {
    let mut set = json!({
        "family": family, "table": table, "name": name,
        "type": ["ipv4_addr", "inet_proto", "inet_service"],
        "size": LEARN_MAX,
    });
    if counted {
        set["stmt"] = json!([{ "counter": null }]);
    }
    json!({ "add": { "set": set } })
}

/// The commands that make sure the inet objects of the guest at `ip`
/// exist: its chain, its two resolved sets, its `policies` element (not
/// the learn set: see [`guard`]).
fn inet_objects(table: &str, ip: Ipv4Addr) -> Vec<Value> {
    let chain = policy_chain(ip);
    let [any_port, with_port] = resolved_sets(ip);
    vec![
        json!({ "add": { "chain": { "family": FAMILY, "table": table, "name": chain } } }),
        json!({ "add": { "set": {
            "family": FAMILY, "table": table, "name": any_port,
            "type": "ipv4_addr", "flags": ["timeout"],
        }}}),
        json!({ "add": { "set": {
            "family": FAMILY, "table": table, "name": with_port,
            "type": ["ipv4_addr", "inet_service"], "flags": ["timeout"],
        }}}),
        json!({ "add": { "element": {
            "family": FAMILY, "table": table, "name": POLICIES,
            "elem": [[ip.to_string(), { "jump": { "target": chain } }]],
        }}}),
    ]
}

/// One transaction that makes (or remakes) `tap`'s guard and the policy
/// chain of the guest at `ip` (`mac` as [`mac_text`] writes it). Made
/// again, the resolved sets start empty.
pub fn guard(
    table: &str,
    tap: &str,
    mac: &str,
    ip: Ipv4Addr,
    policy: &Policy,
    existing: DynSets,
    secrets_proxy: bool,
) -> Value {
    let chain = chain(tap);
    let c = json!({ "family": BRIDGE_FAMILY, "table": table, "name": chain });
    let rule = |expr: Value| {
        json!({ "add": { "rule": {
            "family": BRIDGE_FAMILY, "table": table, "chain": chain, "expr": expr,
        }}})
    };
    let ip_text = ip.to_string();
    let mut cmds = vec![
        json!({ "add": { "chain": c } }),
        json!({ "flush": { "chain": c } }),
    ];
    if *policy != Policy::None {
        cmds.extend([
            rule(drop_unless(payload("ether", "saddr"), mac)),
            rule(drop_unless(payload("arp", "saddr ether"), mac)),
            rule(drop_unless(payload("arp", "saddr ip"), ip_text.as_str())),
            rule(accept_type("arp")),
            rule(drop_unless(payload("ip", "saddr"), ip_text.as_str())),
            rule(accept_type("ip")),
        ]);
    }
    // The bridge denied set, made anew for a `none` guest (with the rules:
    // see the learn set below); the chain's flush above dropped the old
    // rule's reference to it.
    let denied = denied_set(ip);
    if existing.bridge {
        cmds.push(delete_set(BRIDGE_FAMILY, table, denied.clone()));
    }
    if *policy == Policy::None {
        cmds.push(dyn_set(BRIDGE_FAMILY, table, denied.clone(), true));
        cmds.extend(
            denied_drop(Vec::new(), BRIDGE_FAMILY, &denied)
                .into_iter()
                .map(rule),
        );
    } else {
        cmds.push(rule(Value::Array(counted_drop().to_vec())));
    }
    cmds.push(json!({ "add": { "element": {
        "family": BRIDGE_FAMILY, "table": table, "name": GUARDS,
        "elem": [[tap, { "jump": { "target": chain } }]],
    }}}));
    // The policy chain, made anew.
    let pchain = policy_chain(ip);
    cmds.extend(inet_objects(table, ip));
    cmds.push(
        json!({ "flush": { "chain": { "family": FAMILY, "table": table, "name": pchain } } }),
    );
    for set in resolved_sets(ip) {
        cmds.push(json!({ "flush": { "set": { "family": FAMILY, "table": table, "name": set } } }));
    }
    // The learn and denied sets are made anew, with the rules: a set the
    // packet path adds to must be created `dynamic`, which nft does only
    // when the rule that adds comes in the same transaction (the flush
    // above dropped the old chain's references to them); and an `add` of a
    // dynamic set that exists fails, so the caller says whether they do.
    if existing.inet {
        cmds.push(delete_set(FAMILY, table, learn_set(ip)));
        cmds.push(delete_set(FAMILY, table, denied.clone()));
    }
    cmds.push(dyn_set(FAMILY, table, learn_set(ip), false));
    cmds.push(dyn_set(FAMILY, table, denied, true));
    for expr in policy_rules(policy, ip) {
        cmds.push(json!({ "add": { "rule": {
            "family": FAMILY, "table": table, "chain": pchain, "expr": expr,
        }}}));
    }
    // In or out of the secret guests (added first: the delete always finds it).
    cmds.push(secret_guest("add", table, ip));
    if !secrets_proxy {
        cmds.push(secret_guest("delete", table, ip));
    }
    json!({ "nftables": cmds })
}

/// One transaction that lets the guest at `ip` reach `addrs` (each with a
/// port, or any port) for `ttl` seconds, from now (an address already
/// there gets the new timeout).
pub fn allow_resolved(
    table: &str,
    ip: Ipv4Addr,
    addrs: &[(Ipv4Addr, Option<u16>)],
    ttl: u32,
) -> Value {
    let [any_port, with_port] = resolved_sets(ip);
    let mut cmds = Vec::new();
    for (addr, port) in addrs {
        let (set, val) = match port {
            None => (&any_port, json!(addr.to_string())),
            Some(p) => (&with_port, json!({ "concat": [addr.to_string(), p] })),
        };
        let element = |verb: &str, timeout: bool| {
            let elem = if timeout {
                json!({ "elem": { "val": val, "timeout": ttl } })
            } else {
                val.clone()
            };
            json!({ verb: { "element": {
                "family": FAMILY, "table": table, "name": set, "elem": [elem],
            }}})
        };
        // Added first so that the delete finds it; then added with its timeout.
        cmds.extend([
            element("add", false),
            element("delete", false),
            element("add", true),
        ]);
    }
    json!({ "nftables": cmds })
}

/// One transaction that removes `tap`'s guard and (given `ip`) the policy
/// chain of the guest at `ip`, whether or not they exist (made first, so that the
/// deletes always find them).
pub fn unguard(table: &str, tap: &str, ip: Option<Ipv4Addr>, existing: DynSets) -> Value {
    let mut cmds = unguard_tap(table, tap);
    if let Some(ip) = ip {
        cmds.extend(unguard_guest(table, ip, existing));
    }
    json!({ "nftables": cmds })
}

/// The commands that remove `tap`'s guard chain and its `guards` element.
pub fn unguard_tap(table: &str, tap: &str) -> Vec<Value> {
    let chain = chain(tap);
    let c = json!({ "family": BRIDGE_FAMILY, "table": table, "name": chain });
    vec![
        json!({ "add": { "chain": c } }),
        json!({ "add": { "element": {
            "family": BRIDGE_FAMILY, "table": table, "name": GUARDS,
            "elem": [[tap, { "jump": { "target": chain } }]],
        }}}),
        json!({ "delete": { "element": {
            "family": BRIDGE_FAMILY, "table": table, "name": GUARDS,
            "elem": [tap],
        }}}),
        json!({ "delete": { "chain": c } }),
    ]
}

/// The commands that remove the objects of the guest at `ip`: its policy
/// chain, its `policies` and secret-guests elements, its sets (the bridge
/// denied set after the guard chain that used it, so after
/// [`unguard_tap`]).
pub fn unguard_guest(table: &str, ip: Ipv4Addr, existing: DynSets) -> Vec<Value> {
    let mut cmds = Vec::new();
    if existing.bridge {
        cmds.push(delete_set(BRIDGE_FAMILY, table, denied_set(ip)));
    }
    cmds.extend(inet_objects(table, ip));
    cmds.push(secret_guest("add", table, ip));
    cmds.push(secret_guest("delete", table, ip));
    cmds.push(json!({ "delete": { "element": {
        "family": FAMILY, "table": table, "name": POLICIES, "elem": [ip.to_string()],
    }}}));
    cmds.push(json!({ "delete": { "chain": { "family": FAMILY, "table": table, "name": policy_chain(ip) } } }));
    for set in resolved_sets(ip) {
        cmds.push(
            json!({ "delete": { "set": { "family": FAMILY, "table": table, "name": set } } }),
        );
    }
    if existing.inet {
        cmds.push(delete_set(FAMILY, table, learn_set(ip)));
        cmds.push(delete_set(FAMILY, table, denied_set(ip)));
    }
    cmds
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs() {
        assert_eq!(
            parse_mac("52:54:00:AB:cd:01").map(mac_text).as_deref(),
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

    fn rules(v: &Value, family: &str) -> Vec<Value> {
        v["nftables"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|c| c["add"].get("rule"))
            .filter(|r| r["family"] == family)
            .map(|r| r["expr"].clone())
            .collect()
    }

    fn guard_for(policy: &str) -> Value {
        guard(
            "banger",
            "bg-t1",
            "52:54:00:00:00:01",
            [172, 30, 0, 2].into(),
            &policy.parse().unwrap(),
            DynSets {
                inet: true,
                bridge: true,
            },
            false,
        )
    }

    #[test]
    fn a_guard_is_a_bridge_chain_and_a_policy_chain() {
        let v = guard_for("nat");
        let cmds = v["nftables"].as_array().unwrap();
        assert_eq!(cmds[0]["add"]["chain"]["name"], "guard-bg-t1");
        assert_eq!(cmds[1]["flush"]["chain"]["name"], "guard-bg-t1");
        assert!(cmds.iter().any(|c| c["add"]["element"]["elem"][0]
            == json!(["bg-t1", { "jump": { "target": "guard-bg-t1" } }])));
        assert!(cmds.iter().any(|c| c["add"]["element"]["elem"][0]
            == json!(["172.30.0.2", { "jump": { "target": "policy-172-30-0-2" } }])));
        // The bridge chain ends in drop: nothing but its own IPv4 and ARP.
        let bridge = rules(&v, "bridge");
        assert_eq!(bridge.len(), 7);
        assert_eq!(bridge[6], json!([{ "counter": null }, { "drop": null }]));
        // nat: the policy chain only counts (and records, for TCP/UDP)
        // what host protection drops.
        let inet = rules(&v, "inet");
        assert_eq!(inet.len(), 2);
        assert_eq!(inet[0][2]["set"]["set"], "@denied-172-30-0-2");
        assert_eq!(inet[0][2]["set"]["stmt"], json!([{ "counter": null }]));
        assert_eq!(inet[0][4], json!({ "drop": null }));
        assert_eq!(inet[1][2], json!({ "drop": null }));
        // learn: records new TCP/UDP destinations after what it denies.
        let learn = rules(&guard_for("learn"), "inet");
        assert_eq!(learn[2][2]["set"]["set"], "@learned-172-30-0-2");
        // none: the bridge drops everything, recording TCP/UDP in its own
        // set (made anew); the policy chain is never reached.
        let none = guard_for("none");
        let counted = json!([{ "counter": null }, { "drop": null }]);
        let bridge = rules(&none, "bridge");
        assert_eq!(bridge.len(), 2);
        assert_eq!(bridge[0][0]["match"]["right"], "ip");
        assert_eq!(bridge[0][2]["set"]["set"], "@denied-172-30-0-2");
        assert_eq!(bridge[1], counted);
        assert_eq!(rules(&none, "inet"), [counted]);
        let sets = |v: &Value, verb: &str| -> Vec<String> {
            v["nftables"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|c| {
                    let s = c.get(verb)?.get("set")?;
                    Some(format!("{} {}", s["family"].as_str()?, s["name"].as_str()?))
                })
                .collect()
        };
        assert_eq!(
            sets(&none, "delete"),
            [
                "bridge denied-172-30-0-2",
                "inet learned-172-30-0-2",
                "inet denied-172-30-0-2"
            ]
        );
        assert_eq!(
            sets(&none, "add"),
            [
                "bridge denied-172-30-0-2",
                "inet dns-172-30-0-2",
                "inet dnsp-172-30-0-2",
                "inet learned-172-30-0-2",
                "inet denied-172-30-0-2"
            ]
        );
        // Not none: the bridge set goes, and is not made again.
        assert!(!sets(&v, "add").contains(&"bridge denied-172-30-0-2".to_owned()));
    }

    #[test]
    fn allow_lists_in_order() {
        let v = guard_for("allow=10.9.0.0/16:22,:443,api.example.com");
        let inet = rules(&v, "inet");
        assert_eq!(inet.len(), 2 + 2 + 2 + 2);
        assert_eq!(inet[0][0]["match"]["left"]["ct"]["key"], "state");
        assert_eq!(inet[1][1]["match"]["right"], 53);
        assert_eq!(inet[1][2]["set"]["set"], "@denied-172-30-0-2");
        assert!(inet[1][4].get("drop").is_some());
        assert_eq!(inet[2][0]["match"]["right"]["prefix"]["addr"], "10.9.0.0");
        // A bare port opens no private range.
        assert_eq!(inet[3][0]["match"]["op"], "!=");
        assert_eq!(inet[4][0]["match"]["right"], "@dns-172-30-0-2");
        assert_eq!(inet[5][1]["match"]["right"], "@dnsp-172-30-0-2");
        assert_eq!(inet[6][1]["set"]["set"], "@denied-172-30-0-2");
        assert_eq!(inet[7], json!([{ "counter": null }, { "drop": null }]));
        // Made again, the resolved sets start empty.
        let flushed: Vec<_> = v["nftables"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|c| c["flush"]["set"]["name"].as_str())
            .collect();
        assert_eq!(flushed, ["dns-172-30-0-2", "dnsp-172-30-0-2"]);
    }

    #[test]
    fn resolved_addresses_get_their_ttl() {
        let v = allow_resolved(
            "banger",
            [172, 30, 0, 2].into(),
            &[
                ([203, 0, 113, 7].into(), None),
                ([203, 0, 113, 8].into(), Some(443)),
            ],
            60,
        );
        let cmds = v["nftables"].as_array().unwrap();
        assert_eq!(cmds.len(), 6);
        assert_eq!(cmds[2]["add"]["element"]["name"], "dns-172-30-0-2");
        assert_eq!(cmds[2]["add"]["element"]["elem"][0]["elem"]["timeout"], 60);
        assert_eq!(cmds[5]["add"]["element"]["name"], "dnsp-172-30-0-2");
        assert_eq!(
            cmds[5]["add"]["element"]["elem"][0]["elem"]["val"],
            json!({ "concat": ["203.0.113.8", 443] })
        );
    }

    #[test]
    fn a_guest_with_secrets_joins_the_secret_guests() {
        let elems = |secrets_proxy: bool| -> Vec<String> {
            let g = guard(
                "banger",
                "bg-t1",
                "52:54:00:00:00:01",
                [172, 30, 0, 2].into(),
                &"nat".parse().unwrap(),
                DynSets::default(),
                secrets_proxy,
            );
            g["nftables"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|c| {
                    let (verb, obj) = c.as_object().unwrap().iter().next().unwrap();
                    let e = obj.get("element")?;
                    (e["name"] == SECRET_GUESTS).then(|| format!("{verb} {}", e["elem"][0]))
                })
                .collect()
        };
        assert_eq!(elems(true), ["add \"172.30.0.2\""]);
        // Made again without secrets: out of the set, whether it was in or not.
        assert_eq!(
            elems(false),
            ["add \"172.30.0.2\"", "delete \"172.30.0.2\""]
        );
    }

    #[test]
    fn unguard_names_everything_guard_made() {
        let u = unguard(
            "banger",
            "bg-t1",
            Some([172, 30, 0, 2].into()),
            DynSets {
                inet: true,
                bridge: true,
            },
        );
        let deleted: Vec<String> = u["nftables"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|c| c.get("delete"))
            .map(|d| {
                let (what, body) = d.as_object().unwrap().iter().next().unwrap();
                format!("{what} {}", body["name"].as_str().unwrap())
            })
            .collect();
        assert_eq!(
            deleted,
            [
                "element guards",
                "chain guard-bg-t1",
                "set denied-172-30-0-2",
                "element secret-guests",
                "element policies",
                "chain policy-172-30-0-2",
                "set dns-172-30-0-2",
                "set dnsp-172-30-0-2",
                "set learned-172-30-0-2",
                "set denied-172-30-0-2"
            ]
        );
    }
}
