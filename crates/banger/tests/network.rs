//! Guest networking end to end on real QEMU guests: the bridge between VMs,
//! `<name>.vm` DNS, NAT to "the outside world", DNS forwarding, port
//! forwards, and parallel creates.
//!
//! Everything that carries traffic runs inside network namespaces the test
//! makes: banger's own (TestHome::in_netns) and an "outside" one joined to
//! it by a veth pair, with its own subnet (198.18.0.0/30, the benchmarking
//! range), an HTTP server and a DNS resolver the test runs itself. The
//! banger namespace's default route and resolv.conf point there; nothing
//! resolves or contacts anything outside this machine.

mod common;

use std::collections::HashSet;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{
    DNS_SERVER, INSIDE, OUTSIDE, OutsideNet, TestHome, ip, is_alive, kill_9, phase, sh, sh_ok,
    text, wait_until, while_listing,
};

/// Answers every GET with the client's address, so the test sees what
/// source address arrived after NAT.
const HTTP_SERVER: &str = r#"
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = self.client_address[0].encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
http.server.HTTPServer((sys.argv[1], 8000), H).serve_forever()
"#;

/// The outside world ([`OutsideNet`]), serving HTTP and DNS.
struct Outside {
    net: OutsideNet,
    dns_log: std::path::PathBuf,
}

impl std::ops::Deref for Outside {
    type Target = OutsideNet;
    fn deref(&self) -> &OutsideNet {
        &self.net
    }
}

impl Outside {
    fn new(home: &TestHome) -> Outside {
        let mut outside = Outside {
            net: OutsideNet::new(home),
            dns_log: home.path().join("outside-dns.log"),
        };
        let log = std::fs::File::create(&outside.dns_log).unwrap();
        // The HTTP server answers on every address the outside has.
        outside.net.python(HTTP_SERVER, &["0.0.0.0"], Stdio::null());
        outside
            .net
            .python(DNS_SERVER, &[OUTSIDE, "outside.example"], Stdio::from(log));
        wait_until("the outside HTTP server", Duration::from_secs(10), || {
            outside.curl_from_banger_ns(&format!("http://{OUTSIDE}:8000/")) == Some(INSIDE.into())
        });
        outside
    }

    fn curl_from_banger_ns(&self, url: &str) -> Option<String> {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.banger_ns,
                "curl",
                "-sf",
                "-m",
                "5",
                url,
            ])
            .output()
            .expect("curl (apt install curl)");
        out.status.success().then(|| text(&out.stdout))
    }

    fn dns_log(&self) -> String {
        std::fs::read_to_string(&self.dns_log).unwrap_or_default()
    }
}

fn guest_ip(home: &TestHome, vm: &str) -> String {
    home.json(&["vm", "show", vm])["guest_ip"]
        .as_str()
        .unwrap()
        .to_string()
}

/// What `getent hosts NAME` prints in the guest: the first address, or None.
fn resolve_in(home: &TestHome, vm: &str, name: &str) -> Option<String> {
    let (code, out, _) = sh(home, vm, &format!("getent hosts {name}"));
    (code == 0).then(|| {
        out.split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string()
    })
}

#[test]
fn guests_talk_resolve_reach_the_outside_and_are_reached() {
    let home = TestHome::in_netns();
    let outside = Outside::new(&home);
    let names = ["alpha", "beta", "gamma", "delta"];

    phase("register the default image", || {
        common::shared_default_image(&home)
    });

    phase("4 VMs created in parallel get distinct addresses", || {
        std::thread::scope(|s| {
            let handles: Vec<_> = names
                .iter()
                .map(|name| {
                    let home = &home;
                    s.spawn(move || {
                        // One guest with systemd as init: it takes its
                        // nameserver from the kernel command line too.
                        let init = if *name == "delta" { "systemd" } else { "fast" };
                        let mut args = vec![
                            "vm",
                            "create",
                            "--name",
                            name,
                            "--init",
                            init,
                            "--memory",
                            "384",
                            "--no-ssh-wait",
                            "-q",
                        ];
                        // A forward given at create time.
                        if *name == "alpha" {
                            args.extend(["-p", "18080:8080"]);
                        }
                        (name, home.run(&args))
                    })
                })
                .collect();
            for h in handles {
                let (name, out) = h.join().unwrap();
                assert!(
                    out.status.success(),
                    "create {name}: {}\n{}",
                    text(&out.stdout),
                    text(&out.stderr)
                );
            }
        });
        let vms = home.json(&["vm", "list"]);
        let vms = vms.as_array().unwrap();
        assert_eq!(vms.len(), 4);
        let mut ips = HashSet::new();
        let mut macs = HashSet::new();
        let mut cids = HashSet::new();
        for v in vms {
            assert_eq!(v["state"], "running", "{v}");
            assert!(
                ips.insert(v["guest_ip"].as_str().unwrap().to_string()),
                "{v}"
            );
            assert!(macs.insert(v["mac"].as_str().unwrap().to_string()), "{v}");
            // QEMU guests use virtio-serial; any CID given must be unique too.
            if let Some(cid) = v["vsock_cid"].as_u64() {
                assert!(cids.insert(cid), "{v}");
            }
        }
        let alpha = home.json(&["vm", "show", "alpha"]);
        assert_eq!(alpha["dns_name"], "alpha.vm");
        assert_eq!(alpha["port_forwards"][0]["host_port"], 18080);
        assert_eq!(alpha["port_forwards"][0]["status"], "active");
    });

    phase("the daemon serves DNS on the bridge", || {
        let dns = home.doctor_check("dns");
        assert_eq!(dns["status"], "pass", "{dns}");
        assert!(dns["detail"].as_str().unwrap().contains(":53"), "{dns}");
    });

    phase(
        "guests resolve each other by <name>.vm but do not reach each other",
        || {
            let beta_ip = guest_ip(&home, "beta");
            let resolv = sh_ok(&home, "alpha", "cat /etc/resolv.conf");
            assert!(resolv.contains("nameserver"), "{resolv}");
            let (code, out, err) = sh(&home, "alpha", &format!("busybox ping -c 1 -W 3 {beta_ip}"));
            assert_eq!(code, 1, "{out}{err}");
            assert_eq!(resolve_in(&home, "alpha", "beta.vm"), Some(beta_ip.clone()));
            assert_eq!(
                resolve_in(&home, "beta", "alpha.vm"),
                Some(guest_ip(&home, "alpha"))
            );
            let (code, out, err) = sh(
                &home,
                "beta",
                &format!("busybox ping -c 1 -W 3 {}", guest_ip(&home, "alpha")),
            );
            assert_eq!(code, 1, "{out}{err}");
            assert_eq!(resolve_in(&home, "alpha", "nosuch.vm"), None);
            // The systemd guest too.
            assert_eq!(resolve_in(&home, "delta", "beta.vm"), Some(beta_ip.clone()));
        },
    );

    phase("a deleted VM's name is gone at once", || {
        let bridge_mac = || {
            let out = Command::new("ip")
                .args([
                    "-n",
                    home.netns.as_deref().unwrap(),
                    "-j",
                    "link",
                    "show",
                    &home.host_names().0,
                ])
                .output()
                .unwrap();
            let links: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            links[0]["address"].as_str().unwrap().to_string()
        };
        let mac = bridge_mac();
        assert!(resolve_in(&home, "alpha", "gamma.vm").is_some());
        home.ok(&["vm", "delete", "--force", "gamma"]);
        assert_eq!(resolve_in(&home, "alpha", "gamma.vm"), None);
        // Its tap left the bridge without changing the bridge's MAC (else
        // the other guests' ARP entry for the gateway goes stale and they
        // lose DNS and NAT for a while).
        assert_eq!(bridge_mac(), mac);
    });

    phase(
        "a guest reaches the outside through NAT, seen as the namespace's address",
        || {
            let seen = fetch(&home, "alpha", OUTSIDE);
            assert_eq!(
                seen, INSIDE,
                "the server sees the NAT'd source, not the guest's"
            );
            // The outside has no route back to the guests' subnet: only NAT can answer.
            let out = Command::new("ip")
                .args(["-n", &outside.ns, "route", "get", &guest_ip(&home, "alpha")])
                .output()
                .unwrap();
            assert!(!out.status.success(), "{}", text(&out.stdout));
        },
    );

    phase("other names are forwarded to the host's resolver", || {
        assert_eq!(
            resolve_in(&home, "alpha", "outside.example"),
            Some(OUTSIDE.to_string())
        );
        assert_eq!(resolve_in(&home, "alpha", "nothing.example"), None);
        let log = outside.dns_log();
        // Asked by the daemon (from the namespace's address), not by the guest.
        assert!(
            log.contains(&format!("query outside.example type 1 from {INSIDE}")),
            "{log}"
        );
        assert!(!log.contains(".vm "), "VM names never leave banger: {log}");
    });

    phase(
        "a port forward reaches a guest service from 127.0.0.1",
        || {
            let serve = || {
                sh_ok(
                    &home,
                    "alpha",
                    "mkdir -p /tmp/www && echo hello-from-alpha > /tmp/www/index.html && busybox httpd -p 8080 -h /tmp/www",
                );
                wait_until("the forward answers", Duration::from_secs(20), || {
                    outside
                        .curl_from_banger_ns("http://127.0.0.1:18080/")
                        .as_deref()
                        == Some("hello-from-alpha\n")
                });
            };
            serve();
            // Kept across stop and start, carrying traffic only while the VM runs.
            home.ok(&["vm", "stop", "alpha"]);
            let fwd = &home.json(&["vm", "show", "alpha"])["port_forwards"][0];
            assert_eq!(fwd["status"], "inactive", "{fwd}");
            assert!(
                outside
                    .curl_from_banger_ns("http://127.0.0.1:18080/")
                    .is_none()
            );
            home.ok(&["vm", "start", "alpha", "--no-ssh-wait"]);
            let fwd = &home.json(&["vm", "show", "alpha"])["port_forwards"][0];
            assert_eq!(fwd["status"], "active", "{fwd}");
            serve();
            // Added later, listed, and removed.
            home.ok(&["vm", "port-forward", "beta", "18081:8080"]);
            let list = home.json(&["vm", "port-forward", "list"]);
            assert_eq!(list.as_array().unwrap().len(), 2, "{list}");
            // A host port that is taken: a conflict naming the port and its holder.
            let out = home.run(&["vm", "port-forward", "beta", "18080:80"]);
            assert_eq!(out.status.code(), Some(1));
            let err = text(&out.stderr);
            assert!(err.contains("18080") && err.contains("alpha"), "{err}");
            home.ok(&["vm", "port-forward", "remove", "beta", "18081"]);
            assert_eq!(
                home.json(&["vm", "port-forward", "list", "beta"]),
                serde_json::json!([])
            );
        },
    );

    phase(
        "without banger's NAT the outside is unreachable; a daemon restart restores NAT, DNS and forwards",
        || {
            // banger turned forwarding on in this namespace, so it forwards
            // banger's traffic only.
            let (_, table) = home.host_names();
            let chain = Command::new("ip")
                .args(["netns", "exec", &outside.banger_ns])
                .args(["nft", "-j", "list", "chain", "inet", &table, "forward"])
                .output()
                .unwrap();
            let chain: serde_json::Value = serde_json::from_slice(&chain.stdout).unwrap();
            let policy = chain["nftables"]
                .as_array()
                .unwrap()
                .iter()
                .find_map(|i| i["chain"]["policy"].as_str())
                .map(str::to_owned);
            assert_eq!(policy.as_deref(), Some("drop"), "{chain}");
            let nft = Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &outside.banger_ns,
                    "nft",
                    "delete",
                    "table",
                    "inet",
                    &table,
                ])
                .status()
                .unwrap();
            assert!(nft.success());
            let (code, out, _) = sh(
                &home,
                "alpha",
                &format!("curl -sf -m 5 http://{OUTSIDE}:8000/"),
            );
            assert_ne!(code, 0, "reached the outside without NAT: {out}");
            home.stop_daemon_and_helper();
            // The next command starts a daemon that adopts the running guests.
            assert_eq!(fetch(&home, "alpha", OUTSIDE), INSIDE);
            assert_eq!(
                resolve_in(&home, "alpha", "beta.vm"),
                Some(guest_ip(&home, "beta"))
            );
            assert_eq!(
                outside
                    .curl_from_banger_ns("http://127.0.0.1:18080/")
                    .as_deref(),
                Some("hello-from-alpha\n")
            );
        },
    );

    phase("delete in parallel leaves nothing behind", || {
        std::thread::scope(|s| {
            for name in ["alpha", "beta", "delta"] {
                let home = &home;
                s.spawn(move || home.ok(&["vm", "delete", "--force", name]));
            }
        });
        assert!(home.json(&["vm", "list"]).as_array().unwrap().is_empty());
        assert!(
            outside
                .curl_from_banger_ns("http://127.0.0.1:18080/")
                .is_none(),
            "the forward went with its VM"
        );
        assert_eq!(home.json(&["gc", "--dry-run"]), serde_json::json!([]));
    });
}

/// `ip -n NS ARGS` in the banger namespace, its stdout.
fn host_ip(home: &TestHome, args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(["-n", home.netns.as_deref().unwrap()])
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "ip {args:?}: {}", text(&out.stderr));
    text(&out.stdout)
}

/// The IPv6 link-local address of banger's bridge.
fn bridge_link_local(home: &TestHome) -> String {
    let addrs = host_ip(
        home,
        &["-6", "-br", "addr", "show", "dev", &home.host_names().0],
    );
    addrs
        .split_whitespace()
        .find(|a| a.starts_with("fe80"))
        .expect("the bridge's IPv6 link-local address")
        .split('/')
        .next()
        .unwrap()
        .to_string()
}

/// The MAC the banger namespace's neighbour table has for `addr`, if any.
fn host_neighbour(home: &TestHome, addr: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(&host_ip(
        home,
        &["-j", "neigh", "show", addr, "dev", &home.host_names().0],
    ))
    .unwrap();
    v[0]["lladdr"].as_str().map(str::to_owned)
}

/// The bridge port the bridge has learnt `mac` on.
fn fdb_port(home: &TestHome, mac: &str) -> Option<String> {
    let out = Command::new("bridge")
        .args([
            "-n",
            home.netns.as_deref().unwrap(),
            "-j",
            "fdb",
            "show",
            "br",
            &home.host_names().0,
        ])
        .output()
        .expect("bridge (apt install iproute2)");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .find(|e| e["mac"] == mac)
        .and_then(|e| e["ifname"].as_str().map(str::to_owned))
}

#[test]
fn a_hostile_guest_spoofs_nothing_and_reaches_neither_the_host_nor_its_lan() {
    let home = TestHome::in_netns();
    let outside = Outside::new(&home);
    phase("register the default image", || {
        common::shared_default_image(&home)
    });
    phase("a victim with sshd and a hostile guest", || {
        home.ok(&["vm", "create", "--name", "alpha", "--memory", "384", "-q"]);
        home.ok(&[
            "vm",
            "create",
            "--name",
            "mallory",
            "--memory",
            "384",
            "--no-ssh-wait",
            "-q",
        ]);
    });
    let alpha = home.json(&["vm", "show", "alpha"]);
    let alpha_ip = alpha["guest_ip"].as_str().unwrap().to_string();
    let alpha_mac = alpha["mac"].as_str().unwrap().to_string();
    let alpha_tap = alpha["tap"].as_str().unwrap().to_string();
    let gw = sh_ok(&home, "alpha", "ip -4 route show default")
        .split_whitespace()
        .nth(2)
        .unwrap()
        .to_string();
    let bridge_mac: serde_json::Value = serde_json::from_str(&host_ip(
        &home,
        &["-j", "link", "show", &home.host_names().0],
    ))
    .unwrap();
    let bridge_mac = bridge_mac[0]["address"].as_str().unwrap().to_string();
    let gw_in_alpha = || {
        sh_ok(&home, "alpha", &format!("ip neigh show {gw}"))
            .split_whitespace()
            .nth(4)
            .map(str::to_owned)
    };

    phase("before: both know the truth", || {
        sh_ok(
            &home,
            "mallory",
            &format!("busybox ping -c 1 -W 5 {OUTSIDE}"),
        );
        assert_eq!(fetch(&home, "alpha", OUTSIDE), INSIDE);
        assert_eq!(gw_in_alpha().as_deref(), Some(bridge_mac.as_str()));
        // The host learns the victim's MAC (ssh connects to it).
        host_ip(&home, &["neigh", "flush", "dev", &home.host_names().0]);
        assert_eq!(
            home.ok(&["vm", "ssh", "alpha", "--", "hostname"]).trim(),
            "alpha"
        );
        assert_eq!(host_neighbour(&home, &alpha_ip), Some(alpha_mac.clone()));
        assert_eq!(fdb_port(&home, &alpha_mac), Some(alpha_tap.clone()));
        // The bridge speaks IPv6: a guest's IPv6 would reach it unless dropped.
        assert!(
            host_ip(&home, &["-6", "addr", "show", "dev", &home.host_names().0]).contains("fe80"),
            "the bridge has no IPv6 link-local address: the IPv6 check below would prove nothing"
        );
    });

    phase(
        "guests reach the internet through NAT, but neither the host, its LAN, metadata nor each other",
        || {
            // A LAN and a metadata address behind the outside, which the
            // host reaches; a service on every address of the host.
            let ns = &outside.ns;
            ip(&["-n", ns, "addr", "add", "10.99.0.2/24", "dev", "bgv-out"]);
            ip(&["-n", ns, "addr", "add", "169.254.169.254/32", "dev", "lo"]);
            let banger_ns = home.netns.as_deref().unwrap();
            ip(&[
                "-n",
                banger_ns,
                "route",
                "add",
                "10.99.0.0/24",
                "via",
                OUTSIDE,
            ]);
            ip(&[
                "-n",
                banger_ns,
                "route",
                "add",
                "169.254.169.254/32",
                "via",
                OUTSIDE,
            ]);
            let mut host_server = Command::new("ip")
                .args(["netns", "exec", banger_ns, "/usr/bin/python3", "-c"])
                .args([HTTP_SERVER, "0.0.0.0"])
                .spawn()
                .unwrap();
            let forbidden = ["10.99.0.2", "169.254.169.254", gw.as_str(), INSIDE];
            for addr in forbidden {
                wait_until(addr, Duration::from_secs(10), || {
                    outside
                        .curl_from_banger_ns(&format!("http://{addr}:8000/"))
                        .is_some()
                });
            }
            for vm in ["alpha", "mallory"] {
                for addr in forbidden {
                    let (code, out, err) =
                        sh(&home, vm, &format!("curl -sf -m 5 http://{addr}:8000/"));
                    assert!(
                        code == 7 || code == 28,
                        "{vm} reached {addr}: {code} {out}{err}"
                    );
                }
                let (code, out, err) = sh(&home, vm, &format!("busybox ping -c 1 -W 3 {gw}"));
                assert_eq!(code, 1, "{vm} pinged the gateway: {out}{err}");
                // DNS on the gateway and the internet still work.
                assert_eq!(
                    resolve_in(&home, vm, "outside.example"),
                    Some(OUTSIDE.to_string())
                );
                assert_eq!(fetch(&home, vm, OUTSIDE), INSIDE);
            }
            let (code, out, err) = sh(
                &home,
                "mallory",
                &format!("echo | busybox nc -w 3 {alpha_ip} 22"),
            );
            assert!(
                !out.contains("SSH-"),
                "mallory reached alpha's sshd: {code} {out}{err}"
            );
            let _ = host_server.kill();
            let _ = host_server.wait();
        },
    );

    phase(
        "the hostile guest claims the gateway's and the victim's addresses by ARP",
        || {
            let (_, out, err) = while_listing(&home, "the ARP spoofing", || {
                sh(
                    &home,
                    "mallory",
                    &format!(
                        "ip addr add {gw}/32 dev eth0; ip addr add {alpha_ip}/32 dev eth0; \
                     busybox arping -U -c 3 -s {gw} -I eth0 {gw}; \
                     busybox arping -U -c 3 -s {alpha_ip} -I eth0 {alpha_ip}; \
                     busybox arping -A -c 3 -s {gw} -I eth0 {alpha_ip}"
                    ),
                )
            });
            // Each was sent (and the bridge dropped it).
            assert_eq!(out.matches("Sent 3 probe").count(), 3, "{out}{err}");
            assert_eq!(gw_in_alpha().as_deref(), Some(bridge_mac.as_str()));
            assert_eq!(host_neighbour(&home, &alpha_ip), Some(alpha_mac.clone()));
        },
    );

    phase("the hostile guest sends IPv6", || {
        let bridge_ll = bridge_link_local(&home);
        let (code, out, err) = sh(
            &home,
            "mallory",
            &format!("busybox ping -6 -c 2 -W 3 -I eth0 {bridge_ll}"),
        );
        assert_eq!(code, 1, "IPv6 from a guest: {out}{err}");
        assert!(out.contains("0 packets received"), "{out}{err}");
    });

    phase(
        "the hostile guest takes the victim's IP and MAC and sends",
        || {
            let script = format!(
                "ip link set eth0 down && ip link set eth0 address {alpha_mac} && ip link set eth0 up && \
             ip addr flush dev eth0 && ip addr add {alpha_ip}/24 dev eth0 && \
             ip route add default via {gw} && \
             busybox arping -U -c 3 -s {alpha_ip} -I eth0 {alpha_ip}; \
             busybox ping -c 2 -W 3 {OUTSIDE}; p=$?; \
             curl -sf -m 5 http://{OUTSIDE}:8000/; c=$?; \
             echo \"ping=$p curl=$c\""
            );
            let out = sh_ok(&home, "mallory", &script);
            // Sent, no answer (ping: 1), no connection (curl: 7 or 28).
            assert!(out.contains("Sent 3 probe"), "{out}");
            let last = out.lines().last().unwrap_or_default();
            assert!(["ping=1 curl=7", "ping=1 curl=28"].contains(&last), "{out}");
            assert_eq!(fdb_port(&home, &alpha_mac), Some(alpha_tap.clone()));
            assert_eq!(host_neighbour(&home, &alpha_ip), Some(alpha_mac.clone()));
        },
    );

    phase(
        "the victim's ssh lands in the victim, which still reaches the outside",
        || {
            let out = home.run(&["vm", "ssh", "alpha", "--", "hostname"]);
            assert!(out.status.success(), "{}", text(&out.stderr));
            assert_eq!(text(&out.stdout).trim(), "alpha");
            assert_eq!(fetch(&home, "alpha", OUTSIDE), INSIDE);
            assert_eq!(gw_in_alpha().as_deref(), Some(bridge_mac.as_str()));
        },
    );

    phase("delete leaves no guard behind", || {
        home.ok(&["vm", "delete", "--force", "alpha"]);
        home.ok(&["vm", "delete", "--force", "mallory"]);
        assert_eq!(per_vm_rules(&home), Vec::<String>::new());
        assert_eq!(home.json(&["gc", "--dry-run"]), serde_json::json!([]));
    });

    phase(
        "a new VM on the victim's address: the host sends to the new MAC at once",
        || {
            // The host still knows alpha's MAC for the address.
            assert_eq!(host_neighbour(&home, &alpha_ip), Some(alpha_mac.clone()));
            home.ok(&[
                "vm",
                "create",
                "--name",
                "beta",
                "--memory",
                "384",
                "--no-ssh-wait",
                "-q",
            ]);
            let beta = home.json(&["vm", "show", "beta"]);
            assert_eq!(beta["guest_ip"], alpha_ip.as_str(), "the address is reused");
            let beta_mac = beta["mac"].as_str().unwrap().to_string();
            assert_ne!(beta_mac, alpha_mac);
            // Before any packet to or from beta.
            assert_eq!(host_neighbour(&home, &alpha_ip), Some(beta_mac));
            wait_until("beta's sshd", Duration::from_secs(60), || {
                let out = home.run(&["vm", "ssh", "beta", "--", "hostname"]);
                out.status.success() && text(&out.stdout).trim() == "beta"
            });
            home.ok(&["vm", "delete", "--force", "beta"]);
        },
    );
    drop(outside);
}

/// The per-VM objects in banger's tables: guard chains (bridge), policy
/// chains, resolved-address and learn sets (inet), and the maps' elements.
fn per_vm_rules(home: &TestHome) -> Vec<String> {
    let mut found = Vec::new();
    for family in ["bridge", "inet"] {
        let out = Command::new("ip")
            .args(["netns", "exec", home.netns.as_deref().unwrap()])
            .args(["nft", "-j", "list", "table", family, &home.host_names().1])
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        for item in v["nftables"].as_array().unwrap() {
            for kind in ["chain", "set"] {
                if let Some(name) = item[kind]["name"].as_str()
                    && (name.starts_with("guard-")
                        || name.starts_with("policy-")
                        || name.starts_with("dns")
                        || name.starts_with("learned-")
                        || name.starts_with("denied-"))
                {
                    found.push(format!("{family} {kind} {name}"));
                }
            }
            if let Some(elems) = item["map"]["elem"].as_array() {
                found.extend(elems.iter().map(|e| format!("{family} element {}", e[0])));
            }
        }
    }
    found
}

/// The destinations `vm net log` says were denied to `vm`, as
/// `proto addr:port`, each with at least one packet.
fn denied(home: &TestHome, vm: &str) -> Vec<String> {
    let log = home.json(&["vm", "net", "log", vm]);
    log["denied"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            assert!(d["packets"].as_u64().unwrap() >= 1, "{d}");
            format!(
                "{} {}:{}",
                d["proto"].as_str().unwrap(),
                d["addr"].as_str().unwrap(),
                d["port"]
            )
        })
        .collect()
}

/// What `curl http://HOST:8000/` from the guest gets (it must succeed).
fn fetch(home: &TestHome, vm: &str, host: &str) -> String {
    sh_ok(home, vm, &format!("curl -sf -m 10 http://{host}:8000/"))
}

/// Whether `curl http://ADDR:8000/` from the guest gets an answer.
fn reaches(home: &TestHome, vm: &str, addr: &str) -> bool {
    let (code, _, _) = sh(home, vm, &format!("curl -sf -m 5 http://{addr}:8000/"));
    code == 0
}

#[test]
fn net_policies_none_allow_and_live_changes() {
    let home = TestHome::in_netns();
    let outside = Outside::new(&home);
    // Beyond the outside: a public address and a LAN, both reached by the host.
    let banger_ns = home.netns.clone().unwrap();
    ip(&[
        "-n",
        &outside.ns,
        "addr",
        "add",
        "203.0.113.7/32",
        "dev",
        "lo",
    ]);
    ip(&[
        "-n",
        &outside.ns,
        "addr",
        "add",
        "10.99.0.2/24",
        "dev",
        "bgv-out",
    ]);
    ip(&[
        "-n",
        &banger_ns,
        "route",
        "add",
        "203.0.113.7/32",
        "via",
        OUTSIDE,
    ]);
    ip(&[
        "-n",
        &banger_ns,
        "route",
        "add",
        "10.99.0.0/24",
        "via",
        OUTSIDE,
    ]);
    let config = home.path().join("config.toml");

    phase("a bad default_policy is refused, naming the key", || {
        std::fs::write(
            &config,
            "[pool]\nsize = 0\n[network]\ndefault_policy = \"open\"\n",
        )
        .unwrap();
        let out = home.run(&["vm", "list"]);
        assert!(!out.status.success());
        let err = text(&out.stderr);
        assert!(err.contains("[network] default_policy"), "{err}");
        std::fs::write(
            &config,
            "[pool]\nsize = 0\n[network]\ndefault_policy = \"none\"\n",
        )
        .unwrap();
    });
    phase("register the default image", || {
        common::shared_default_image(&home)
    });
    phase(
        "a bad entry, or a mode that is none of them, is refused before any work",
        || {
            for (net, want) in [
                ("allow=localhost", "not an allow= entry"),
                ("open", "is not a network mode"),
            ] {
                let out = home.run(&["vm", "create", "--name", "bad", "--net", net, "-q"]);
                assert_eq!(out.status.code(), Some(1));
                let err = text(&out.stderr);
                assert!(err.contains("--net") && err.contains(want), "{err}");
            }
            assert!(home.json(&["vm", "list"]).as_array().unwrap().is_empty());
        },
    );
    phase(
        "one VM under the default (none), one under an allow-list",
        || {
            home.ok(&["vm", "create", "--name", "boxed", "--memory", "384", "-q"]);
            home.ok(&[
                "vm",
                "create",
                "--name",
                "allowed",
                "--memory",
                "384",
                "--net",
                "allow=198.18.0.2,10.99.0.0/24:8000",
                "--no-ssh-wait",
                "-q",
            ]);
            assert_eq!(home.ok(&["vm", "net", "show", "boxed"]).trim(), "none");
            assert_eq!(
                home.json(&["vm", "show", "allowed"])["net"],
                "allow=198.18.0.2,10.99.0.0/24:8000"
            );
        },
    );
    phase("none: nothing gets out, the agent still answers", || {
        let tried = format!("tcp {OUTSIDE}:8000");
        assert!(!reaches(&home, "boxed", OUTSIDE));
        // Not even ARP gets out, so that tried nothing on IP. A guest that
        // forges its gateway's neighbour entry sends IP: dropped, and logged.
        assert!(!denied(&home, "boxed").contains(&tried));
        let bridge_mac = host_ip(&home, &["-br", "link", "show", &home.host_names().0]);
        let bridge_mac = bridge_mac.split_whitespace().nth(2).unwrap().to_owned();
        let route = sh_ok(&home, "boxed", "ip -4 route show default");
        let route: Vec<&str> = route.split_whitespace().collect();
        let (gw, dev) = (route[2], route[4]);
        sh_ok(
            &home,
            "boxed",
            &format!("ip neigh replace {gw} lladdr {bridge_mac} dev {dev} nud permanent"),
        );
        assert!(!reaches(&home, "boxed", OUTSIDE));
        let log = denied(&home, "boxed");
        assert!(log.contains(&tried), "{log:?}");
        // UDP (DNS straight to the outside resolver): it hears nothing.
        let heard = outside.dns_log().lines().count();
        let (code, out, err) = sh(
            &home,
            "boxed",
            &format!("busybox nslookup outside.example {OUTSIDE}"),
        );
        assert_ne!(code, 0, "{out}{err}");
        assert_eq!(outside.dns_log().lines().count(), heard);
        assert!(denied(&home, "boxed").contains(&format!("udp {OUTSIDE}:53")));
        // IPv6, to the bridge's own link-local address: nothing back.
        let bridge_ll = bridge_link_local(&home);
        let (code, out, err) = sh(
            &home,
            "boxed",
            &format!("busybox ping -6 -c 2 -W 3 -I {dev} {bridge_ll}"),
        );
        assert_eq!(code, 1, "IPv6 from a none guest: {out}{err}");
        let (code, out, err) = sh(&home, "boxed", &format!("busybox ping -c 1 -W 3 {OUTSIDE}"));
        assert_eq!(code, 1, "{out}{err}");
        assert_eq!(resolve_in(&home, "boxed", "outside.example"), None);
    });
    phase(
        "allow: the listed destinations, nothing else, not even other names",
        || {
            assert!(reaches(&home, "allowed", OUTSIDE));
            sh_ok(
                &home,
                "allowed",
                &format!("busybox ping -c 1 -W 5 {OUTSIDE}"),
            );
            // A LAN the list names is open, host protection notwithstanding.
            assert!(reaches(&home, "allowed", "10.99.0.2"));
            assert!(!reaches(&home, "allowed", "203.0.113.7"));
            // A name the list does not allow: banger's DNS refuses it.
            assert_eq!(resolve_in(&home, "allowed", "outside.example"), None);
            // DNS to the outside resolver, although its address is listed:
            // dropped (the resolver hears nothing).
            let heard = outside.dns_log().lines().count();
            let (code, out, err) = sh(
                &home,
                "allowed",
                &format!("busybox nslookup outside.example {OUTSIDE}"),
            );
            assert_ne!(code, 0, "{out}{err}");
            assert_eq!(
                outside.dns_log().lines().count(),
                heard,
                "{}",
                outside.dns_log()
            );
            // Both logged as denied; what was allowed is not.
            let log = denied(&home, "allowed");
            for want in [
                "tcp 203.0.113.7:8000".to_owned(),
                format!("udp {OUTSIDE}:53"),
            ] {
                assert!(log.contains(&want), "{want} not in {log:?}");
            }
            assert!(
                !log.iter()
                    .any(|d| d.contains(":8000") && d.contains(OUTSIDE)),
                "{log:?}"
            );
        },
    );
    phase(
        "allow a domain: only its name resolves, and only what it resolved to is reached",
        || {
            home.ok(&["vm", "net", "set", "allowed", "allow=outside.example:8000"]);
            // Not resolved yet: its address is not open, by number.
            assert!(!reaches(&home, "allowed", OUTSIDE));
            assert_eq!(resolve_in(&home, "allowed", "nothing.example"), None);
            assert_eq!(resolve_in(&home, "allowed", "boxed.vm"), None);
            assert_eq!(fetch(&home, "allowed", "outside.example"), INSIDE);
            // On that port only, to that address only.
            let (code, out, err) = sh(
                &home,
                "allowed",
                &format!("busybox ping -c 1 -W 3 {OUTSIDE}"),
            );
            assert_eq!(code, 1, "{out}{err}");
            assert!(!reaches(&home, "allowed", "203.0.113.7"));
            let set = Command::new("ip")
                .args(["netns", "exec", &banger_ns])
                .args(["nft", "list", "table", "inet", &home.host_names().1])
                .output()
                .unwrap();
            let set = text(&set.stdout);
            assert!(set.contains(&format!("{OUTSIDE} . 8000 timeout")), "{set}");
        },
    );
    phase("vm net set changes a running VM at once", || {
        assert_eq!(
            home.ok(&["vm", "net", "set", "allowed", "none"]).trim(),
            "none"
        );
        assert!(!reaches(&home, "allowed", OUTSIDE));
        home.ok(&["vm", "net", "set", "allowed", "nat"]);
        assert!(reaches(&home, "allowed", "203.0.113.7"));
        // nat keeps host protection.
        assert!(!reaches(&home, "allowed", "10.99.0.2"));
        let out = home.run(&["vm", "net", "set", "allowed", "allow=-bad.example"]);
        assert_eq!(out.status.code(), Some(1));
        assert_eq!(home.ok(&["vm", "net", "show", "allowed"]).trim(), "nat");
    });
    phase(
        "learn: traffic passes and is recorded; the suggestion allows exactly that",
        || {
            home.ok(&["vm", "net", "set", "allowed", "learn"]);
            assert_eq!(fetch(&home, "allowed", "outside.example"), INSIDE);
            assert!(reaches(&home, "allowed", "203.0.113.7"));
            // Host protection holds: denied, counted, logged, not learnt.
            assert!(!reaches(&home, "allowed", "10.99.0.2"));
            let log = home.json(&["vm", "net", "log", "allowed"]);
            assert!(log["denied_packets"].as_u64().unwrap() >= 1, "{log}");
            assert_eq!(denied(&home, "allowed"), ["tcp 10.99.0.2:8000"]);
            assert_eq!(
                log["destinations"],
                serde_json::json!([
                    { "addr": OUTSIDE, "proto": "tcp", "port": 8000, "names": ["outside.example"] },
                    { "addr": "203.0.113.7", "proto": "tcp", "port": 8000 },
                ]),
                "{log}"
            );
            let suggestion = home.ok(&["vm", "net", "log", "allowed", "--suggest"]);
            let suggestion = suggestion.trim();
            assert_eq!(suggestion, "allow=outside.example:8000,203.0.113.7:8000");
            home.ok(&["vm", "net", "set", "allowed", suggestion]);
            assert_eq!(fetch(&home, "allowed", "outside.example"), INSIDE);
            assert!(reaches(&home, "allowed", "203.0.113.7"));
            let (code, out, err) = sh(
                &home,
                "allowed",
                &format!("busybox ping -c 1 -W 3 {OUTSIDE}"),
            );
            assert_eq!(code, 1, "{out}{err}");
            let log = home.json(&["vm", "net", "log", "allowed"]);
            assert!(log["denied_packets"].as_u64().unwrap() >= 1, "{log}");
        },
    );
    phase(
        "the policy holds across a daemon restart and a stop/start",
        || {
            home.ok(&["vm", "net", "set", "boxed", "allow=203.0.113.7"]);
            assert!(reaches(&home, "boxed", "203.0.113.7"));
            home.stop_daemon_and_helper();
            assert!(reaches(&home, "boxed", "203.0.113.7"));
            assert!(!reaches(&home, "boxed", OUTSIDE));
            home.ok(&["vm", "stop", "boxed"]);
            home.ok(&["vm", "start", "boxed", "--no-ssh-wait"]);
            assert!(reaches(&home, "boxed", "203.0.113.7"));
            assert!(!reaches(&home, "boxed", OUTSIDE));
        },
    );
    phase(
        "a VM whose tap was deleted under it, then died: gc removes the policy left",
        || {
            home.ok(&[
                "vm",
                "create",
                "--name",
                "gone",
                "--memory",
                "256",
                "--net",
                "allow=203.0.113.7",
                "--no-ssh-wait",
                "-q",
            ]);
            let vm = home.json(&["vm", "show", "gone"]);
            let (tap, guest) = (
                vm["tap"].as_str().unwrap().to_owned(),
                vm["guest_ip"].as_str().unwrap().to_owned(),
            );
            // Its tap deleted under it (by someone else), then its QEMU dies.
            host_ip(&home, &["link", "del", &tap]);
            kill_9(vm["pid"].as_u64().unwrap() as u32);
            wait_until("the VM's QEMU to exit", Duration::from_secs(10), || {
                !is_alive(vm["pid"].as_u64().unwrap() as u32)
            });
            // The daemon finds the VM dead and releases its tap: gone, so
            // the helper lifts only the guard; the guest's policy stays.
            wait_until("the daemon to see it dead", Duration::from_secs(20), || {
                home.json(&["vm", "show", "gone"])["state"] != "running"
            });
            let policy = format!("inet chain policy-{}", guest.replace('.', "-"));
            assert!(per_vm_rules(&home).contains(&policy));
            assert_eq!(
                home.json(&["gc", "--dry-run"]),
                serde_json::json!([{
                    "kind": "policy",
                    "name": guest,
                    "detail": "a guest policy no running VM holds",
                }])
            );
            home.ok(&["gc"]);
            assert!(
                !per_vm_rules(&home)
                    .iter()
                    .any(|r| r.contains(&guest.replace('.', "-")))
            );
            assert_eq!(home.json(&["gc", "--dry-run"]), serde_json::json!([]));
            home.ok(&["vm", "delete", "gone"]);
        },
    );
    phase("delete leaves no rules behind", || {
        // Each VM: a guard chain and its element, a policy chain, its
        // element and its four sets.
        assert_eq!(
            per_vm_rules(&home).len(),
            2 * 8,
            "{:?}",
            per_vm_rules(&home)
        );
        home.ok(&["vm", "delete", "--force", "boxed"]);
        home.ok(&["vm", "delete", "--force", "allowed"]);
        assert_eq!(per_vm_rules(&home), Vec::<String>::new());
        assert_eq!(home.json(&["gc", "--dry-run"]), serde_json::json!([]));
    });
}
