//! The real `banger-helper` doing real host networking — inside a network
//! namespace this test creates and deletes, so the host is never touched.
//!
//! Needs root, `ip` (iproute2) and `nft` (nftables): without them the test
//! fails rather than skips, so that CI cannot pass without running it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use banger_rpc::{Client, ClientError};
use banger_wire::helper::{
    AllowResolvedParams, CreateTapParams, DeleteBridgeParams, DeleteTapParams, Deleted,
    EnsureBridgeParams, EnsureBridgeResult, EnsureNatParams, EnsureNatResult, GuardTapParams,
    InspectParams, InspectResult, NetAllowResolved, NetCreateTap, NetDeleteBridge, NetDeleteTap,
    NetEnsureBridge, NetEnsureNat, NetGuardTap, NetInspect, NetList, NetRemoveNat, NetSweepGuards,
    NetUnguardTap, RemoveNatParams, ResolvedAddr, SweepGuardsParams, SweepGuardsResult,
    UnguardTapParams,
};
use banger_wire::{ErrorCode, Method, NoParams};
use serde_json::Value;

const NOBODY: u32 = 65534;

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (is it installed?)"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A network namespace deleted on drop, with the helper running inside it.
struct Netns {
    name: String,
    helper: Option<Child>,
    _dir: tempfile::TempDir,
    socket: PathBuf,
    log: PathBuf,
    /// The state dir of the one install the helper serves.
    state: PathBuf,
}

impl Netns {
    fn create() -> Netns {
        assert!(
            rustix::process::geteuid().is_root(),
            "this test creates network namespaces and must run as root"
        );
        run(Command::new("ip").arg("-V"));
        run(Command::new("nft").arg("-v"));
        let name = format!("bgtest-{:08x}", fastrand::u32(..));
        run(Command::new("ip").args(["netns", "add", &name]));
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("helper.sock");
        let log = dir.path().join("helper.log");
        let state = dir.path().join("state");
        std::fs::create_dir(&state).unwrap();
        Netns {
            name,
            helper: None,
            _dir: dir,
            socket,
            log,
            state,
        }
    }

    /// The helper's install's mark: its table's name, its bridges' alias.
    fn table(&self) -> String {
        format!("banger-{}", banger_config::install_id(&self.state))
    }

    fn ip(&self, args: &[&str]) -> Output {
        run(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    fn exec(&self, args: &[&str]) -> Output {
        run(Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args))
    }

    fn json(out: Output) -> Value {
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("bad JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
    }

    /// Links in the namespace, by name, with details (`ip -d -j link`).
    fn links(&self) -> Vec<Value> {
        Self::json(self.ip(&["-d", "-j", "link", "show"]))
            .as_array()
            .unwrap()
            .clone()
    }

    fn link(&self, name: &str) -> Value {
        self.links()
            .into_iter()
            .find(|l| l["ifname"] == name)
            .unwrap_or_else(|| panic!("no link {name} in {}", self.name))
    }

    fn link_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .links()
            .iter()
            .map(|l| l["ifname"].as_str().unwrap().to_owned())
            .collect();
        names.sort();
        names
    }

    /// `family name` of every nftables table in the namespace.
    fn nft_tables(&self) -> Vec<String> {
        let v = Self::json(self.exec(&["nft", "-j", "list", "tables"]));
        let mut tables: Vec<String> = v["nftables"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|i| i.get("table"))
            .map(|t| {
                format!(
                    "{} {}",
                    t["family"].as_str().unwrap(),
                    t["name"].as_str().unwrap()
                )
            })
            .collect();
        tables.sort();
        tables
    }

    /// A new namespace inherits IPv4 forwarding from the host's: set what
    /// the test asserts about instead of assuming a pristine host.
    fn set_ip_forward(&self, value: &str) {
        let st = Command::new("ip")
            .args(["netns", "exec", &self.name, "sh", "-c"])
            .arg(format!("echo {value} > /proc/sys/net/ipv4/ip_forward"))
            .status()
            .unwrap();
        assert!(st.success(), "cannot set ip_forward in {}", self.name);
    }

    fn ip_forward(&self) -> String {
        let out = self.exec(&["cat", "/proc/sys/net/ipv4/ip_forward"]);
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }

    fn start_helper(&mut self, bin: &Path) {
        let child = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .arg(bin)
            .arg("--socket")
            .arg(&self.socket)
            .args(["--allow-uid", "0", "--allow-uid", &NOBODY.to_string()])
            .arg("--log-file")
            .arg(&self.log)
            .arg("--state-dir")
            .arg(&self.state)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("cannot start banger-helper");
        self.helper = Some(child);
    }

    async fn connect(&mut self) -> Client {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(c) = Client::connect(&self.socket).await {
                return c;
            }
            if let Some(status) = self.helper.as_mut().unwrap().try_wait().unwrap() {
                panic!("banger-helper exited at startup: {status}");
            }
            assert!(Instant::now() < deadline, "banger-helper did not listen");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Some(mut child) = self.helper.take() {
            // `ip netns exec` execs the helper: this is the helper's pid.
            let pid = rustix::process::Pid::from_child(&child);
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            let deadline = Instant::now() + Duration::from_secs(5);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            eprintln!("--- banger-helper log ---\n{log}");
        }
        // Deleting the namespace removes every device and table in it.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

async fn call<M: Method>(c: &mut Client, p: &M::Params) -> M::Result {
    c.call::<M>(p, None)
        .await
        .unwrap_or_else(|e| panic!("{} failed: {e}", M::NAME))
}

async fn refused<M: Method>(c: &mut Client, p: &M::Params) -> ErrorCode {
    match c.call::<M>(p, None).await {
        Err(ClientError::Remote(obj)) => obj.code,
        Ok(_) => panic!("{} was not refused", M::NAME),
        Err(e) => panic!("{} failed: {e}", M::NAME),
    }
}

fn flags(link: &Value) -> Vec<&str> {
    link["flags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect()
}

#[tokio::test]
async fn bridge_taps_and_nat_in_a_namespace() {
    let mut ns = Netns::create();
    // Someone else's table, which banger must leave alone.
    ns.exec(&["nft", "add", "table", "inet", "foreign"]);
    ns.exec(&[
        "nft",
        "add",
        "chain",
        "inet",
        "foreign",
        "their-chain",
        "{ type filter hook forward priority 10; policy accept; }",
    ]);
    ns.start_helper(Path::new(env!("CARGO_BIN_EXE_banger-helper")));
    let mut c = ns.connect().await;
    let table = ns.table();

    // Bridge, idempotently.
    let bridge = EnsureBridgeParams {
        name: "banger0".into(),
        gateway_cidr: "172.30.0.1/24".into(),
        install: table.clone(),
    };
    let r = call::<NetEnsureBridge>(&mut c, &bridge).await;
    assert_eq!(
        r,
        EnsureBridgeResult {
            created: true,
            address_added: true
        }
    );
    let r = call::<NetEnsureBridge>(&mut c, &bridge).await;
    assert_eq!(
        r,
        EnsureBridgeResult {
            created: false,
            address_added: false
        }
    );
    let br = ns.link("banger0");
    assert_eq!(br["linkinfo"]["info_kind"], "bridge");
    assert!(flags(&br).contains(&"UP"), "{br}");
    // Marked as its install's, so no other install's owner may use it.
    assert_eq!(br["ifalias"], table.as_str(), "{br}");
    let addrs = Netns::json(ns.ip(&["-j", "-4", "addr", "show", "dev", "banger0"]));
    let a = &addrs[0]["addr_info"][0];
    assert_eq!(
        (a["local"].as_str(), a["prefixlen"].as_u64()),
        (Some("172.30.0.1"), Some(24))
    );

    // Two taps.
    for (tap, owner) in [("bg-t1", 0), ("bg-t2", NOBODY)] {
        call::<NetCreateTap>(
            &mut c,
            &CreateTapParams {
                name: tap.into(),
                bridge: "banger0".into(),
                owner_uid: owner,
            },
        )
        .await;
        let l = ns.link(tap);
        assert_eq!(l["master"], "banger0", "{l}");
        assert!(flags(&l).contains(&"UP"), "{l}");
        let info = &l["linkinfo"]["info_data"];
        assert_eq!(l["linkinfo"]["info_kind"], "tun", "{l}");
        assert_eq!(info["type"], "tap", "{l}");
        assert_eq!(info["persist"], true, "{l}");
        assert_eq!(info["pi"], false, "{l}");
        let user = if owner == 0 { "root" } else { "nobody" };
        assert_eq!(info["user"], user, "{l}");
    }
    let list = call::<NetList>(&mut c, &NoParams {}).await;
    assert_eq!(list.bridges.len(), 1);
    assert_eq!(list.bridges[0].addrs, ["172.30.0.1/24"]);
    assert!(list.bridges[0].up);
    let taps: Vec<_> = list
        .taps
        .iter()
        .map(|t| (t.name.as_str(), t.bridge.as_deref(), t.up, t.owner_uid))
        .collect();
    assert_eq!(
        taps,
        [
            ("bg-t1", Some("banger0"), true, Some(0)),
            ("bg-t2", Some("banger0"), true, Some(NOBODY))
        ]
    );
    assert!(list.nft_tables.is_empty(), "{:?}", list.nft_tables);

    // A tap that exists is a conflict; names and owners that aren't banger's are refused.
    let dup = CreateTapParams {
        name: "bg-t1".into(),
        bridge: "banger0".into(),
        owner_uid: 0,
    };
    assert_eq!(
        refused::<NetCreateTap>(&mut c, &dup).await,
        ErrorCode::Conflict
    );
    for (name, bridge, owner) in [
        ("eth0", "banger0", 0),
        ("bg-t3", "lo", 0),
        ("bg-t3", "banger0", 1000),
    ] {
        let p = CreateTapParams {
            name: name.into(),
            bridge: bridge.into(),
            owner_uid: owner,
        };
        assert_eq!(
            refused::<NetCreateTap>(&mut c, &p).await,
            ErrorCode::InvalidParams
        );
    }
    let lo = DeleteTapParams { name: "lo".into() };
    assert_eq!(
        refused::<NetDeleteTap>(&mut c, &lo).await,
        ErrorCode::InvalidParams
    );

    // NAT in our own table; the foreign one is untouched.
    ns.set_ip_forward("0");
    assert_eq!(ns.ip_forward(), "0");
    let nat = EnsureNatParams {
        table: table.clone(),
        subnet_cidr: "172.30.0.0/24".into(),
        bridge: "banger0".into(),
    };
    let r = call::<NetEnsureNat>(&mut c, &nat).await;
    assert_eq!(
        r,
        EnsureNatResult {
            replaced: false,
            ip_forward_enabled: true
        }
    );
    assert_eq!(ns.ip_forward(), "1");
    let r = call::<NetEnsureNat>(&mut c, &nat).await;
    assert_eq!(
        r,
        EnsureNatResult {
            replaced: true,
            ip_forward_enabled: false
        }
    );
    // Sorted: `bridge` before `inet`, `banger-test…` before `foreign`.
    assert_eq!(
        ns.nft_tables(),
        [
            format!("bridge {table}"),
            format!("inet {table}"),
            "inet foreign".to_owned()
        ]
    );
    let bridge_rules =
        || String::from_utf8(ns.exec(&["nft", "list", "table", "bridge", &table]).stdout).unwrap();
    // A banger tap without a guard carries nothing.
    assert!(
        bridge_rules().contains(r#"iifname "bg-*" drop"#),
        "{}",
        bridge_rules()
    );
    // A guard: the guest behind bg-t1 sends only as 52:54:00:00:00:02 / 172.30.0.2.
    let guard = |ip: &str| GuardTapParams {
        table: table.clone(),
        tap: "bg-t1".into(),
        bridge: "banger0".into(),
        mac: "52:54:00:00:00:02".into(),
        ip: ip.into(),
        policy: "nat".into(),
        secrets_proxy: false,
    };
    call::<NetGuardTap>(&mut c, &guard("172.30.0.9")).await;
    // Made again, it replaces the first.
    call::<NetGuardTap>(&mut c, &guard("172.30.0.2")).await;
    let rules = bridge_rules();
    for want in [
        r#""bg-t1" : jump guard-bg-t1"#,
        "ether saddr != 52:54:00:00:00:02 counter packets 0 bytes 0 drop",
        "arp saddr ether != 52:54:00:00:00:02 counter packets 0 bytes 0 drop",
        "arp saddr ip != 172.30.0.2 counter packets 0 bytes 0 drop",
        "ip saddr != 172.30.0.2 counter packets 0 bytes 0 drop",
    ] {
        assert!(rules.contains(want), "{want} missing in {rules}");
    }
    assert!(!rules.contains("172.30.0.9"), "{rules}");
    // The gateway, the broadcast address, one outside the bridge's subnet,
    // a multicast MAC: refused.
    for ip in ["172.30.0.1", "172.30.0.255", "172.30.1.2", "8.8.8.8"] {
        assert_eq!(
            refused::<NetGuardTap>(&mut c, &guard(ip)).await,
            ErrorCode::InvalidParams,
            "{ip}"
        );
    }
    let mut multicast = guard("172.30.0.2");
    multicast.mac = "01:00:5e:00:00:01".into();
    assert_eq!(
        refused::<NetGuardTap>(&mut c, &multicast).await,
        ErrorCode::InvalidParams
    );
    // The guest's policy chain, in the inet table.
    let inet_rules =
        || String::from_utf8(ns.exec(&["nft", "list", "table", "inet", &table]).stdout).unwrap();
    let mut allow = guard("172.30.0.2");
    allow.policy = "allow=203.0.113.0/24:443,:22,api.example.com:443".into();
    call::<NetGuardTap>(&mut c, &allow).await;
    let rules = inet_rules();
    for want in [
        "ip saddr vmap @policies",
        "172.30.0.2 : jump policy-172-30-0-2",
        "ct state established,related accept",
        "meta l4proto { tcp, udp } th dport 53 update @denied-172-30-0-2 { ip daddr . meta l4proto . th dport } counter packets 0 bytes 0 drop",
        "ip daddr 203.0.113.0/24 meta l4proto { tcp, udp } th dport 443 accept",
        "meta l4proto { tcp, udp } th dport 22 accept",
        "ip daddr @dns-172-30-0-2 accept",
        "ip daddr . th dport @dnsp-172-30-0-2 accept",
    ] {
        assert!(rules.contains(want), "{want} missing in {rules}");
    }
    // What banger's DNS answered for an allowed name: public addresses only.
    let resolved = AllowResolvedParams {
        table: table.clone(),
        tap: "bg-t1".into(),
        ip: "172.30.0.2".into(),
        addrs: vec![
            ResolvedAddr {
                addr: "203.0.113.9".into(),
                port: Some(443),
            },
            ResolvedAddr {
                addr: "192.168.1.1".into(),
                port: Some(443),
            },
        ],
        ttl_secs: 60,
    };
    call::<NetAllowResolved>(&mut c, &resolved).await;
    call::<NetAllowResolved>(&mut c, &resolved).await;
    let rules = inet_rules();
    assert!(rules.contains("203.0.113.9 . 443 timeout 1m"), "{rules}");
    assert!(!rules.contains("192.168.1.1"), "{rules}");
    // From allow to learn: the learn set is made anew, dynamic.
    allow.policy = "learn".into();
    call::<NetGuardTap>(&mut c, &allow).await;
    let rules = inet_rules();
    assert!(
        rules.contains("add @learned-172-30-0-2 { ip daddr . meta l4proto . th dport }"),
        "{rules}"
    );
    let seen = call::<NetInspect>(
        &mut c,
        &InspectParams {
            table: table.clone(),
            tap: "bg-t1".into(),
            ip: "172.30.0.2".into(),
        },
    )
    .await;
    assert_eq!(seen, InspectResult::default());
    allow.policy = "allow=nodot".into();
    assert_eq!(
        refused::<NetGuardTap>(&mut c, &allow).await,
        ErrorCode::InvalidParams
    );
    let unguard = UnguardTapParams {
        table: table.clone(),
        tap: "bg-t1".into(),
        ip: Some("172.30.0.2".into()),
    };
    call::<NetUnguardTap>(&mut c, &unguard).await;
    call::<NetUnguardTap>(&mut c, &unguard).await;
    let rules = bridge_rules();
    assert!(!rules.contains("guard-bg-t1"), "{rules}");
    let rules = inet_rules();
    assert!(!rules.contains("172-30-0-2"), "{rules}");
    // Stray guards and policies: what no tap or guest of the caller's
    // explains is listed, and (not in a dry run) removed, a `none` guest's
    // bridge set with it.
    let mut boxed = guard("172.30.0.2");
    boxed.policy = "none".into();
    call::<NetGuardTap>(&mut c, &boxed).await;
    assert!(
        bridge_rules().contains("denied-172-30-0-2"),
        "{}",
        bridge_rules()
    );
    let sweep = |keep: bool, dry_run: bool| SweepGuardsParams {
        table: table.clone(),
        keep_taps: if keep { vec!["bg-t1".into()] } else { vec![] },
        keep_ips: if keep {
            vec!["172.30.0.2".into()]
        } else {
            vec![]
        },
        dry_run,
    };
    let stray = SweepGuardsResult {
        taps: vec!["bg-t1".into()],
        ips: vec!["172.30.0.2".into()],
    };
    // The policy of 172.30.0.9, which bg-t1 guarded first, was left when
    // bg-t1 was guarded again for 172.30.0.2: stray.
    assert_eq!(
        call::<NetSweepGuards>(&mut c, &sweep(true, false)).await,
        SweepGuardsResult {
            taps: vec![],
            ips: vec!["172.30.0.9".into()],
        }
    );
    assert!(!inet_rules().contains("172-30-0-9"), "{}", inet_rules());
    assert_eq!(
        call::<NetSweepGuards>(&mut c, &sweep(false, true)).await,
        stray
    );
    assert!(bridge_rules().contains("guard-bg-t1"), "{}", bridge_rules());
    assert_eq!(
        call::<NetSweepGuards>(&mut c, &sweep(false, false)).await,
        stray
    );
    assert!(!bridge_rules().contains("bg-t1\" :"), "{}", bridge_rules());
    assert!(!bridge_rules().contains("172-30-0-2"), "{}", bridge_rules());
    assert!(!inet_rules().contains("172-30-0-2"), "{}", inet_rules());
    assert_eq!(
        call::<NetSweepGuards>(&mut c, &sweep(false, true)).await,
        SweepGuardsResult::default()
    );
    let mut foreign_sweep = sweep(false, true);
    foreign_sweep.table = "foreign".into();
    assert_eq!(
        refused::<NetSweepGuards>(&mut c, &foreign_sweep).await,
        ErrorCode::InvalidParams
    );
    call::<NetGuardTap>(&mut c, &guard("172.30.0.2")).await;
    let rules =
        String::from_utf8(ns.exec(&["nft", "list", "table", "inet", &table]).stdout).unwrap();
    assert!(
        rules.contains(r#"ip saddr 172.30.0.0/24 oifname != "banger0" masquerade"#),
        "{rules}"
    );
    for want in [
        r#"iifname "banger0" ip daddr 172.30.0.1 meta l4proto { tcp, udp } th dport 53 accept"#,
        r#"iifname "banger0" ip daddr { 10.0.0.0/8, 100.64.0.0/10, 169.254.0.0/16, 172.16.0.0/12, 192.168.0.0/16 } drop"#,
        r#"iifname "banger0" oifname != "banger0" meta nfproto ipv4 accept"#,
        r#"oifname "banger0" drop"#,
    ] {
        assert!(rules.contains(want), "{want} missing in {rules}");
    }
    let foreign = RemoveNatParams {
        table: "foreign".into(),
    };
    assert_eq!(
        refused::<NetRemoveNat>(&mut c, &foreign).await,
        ErrorCode::InvalidParams
    );
    let list = call::<NetList>(&mut c, &NoParams {}).await;
    assert_eq!(list.nft_tables, std::slice::from_ref(&table));
    assert!(list.ip_forward);

    // The bridge is not deleted while taps are attached.
    let del_br = DeleteBridgeParams {
        name: "banger0".into(),
    };
    assert_eq!(
        refused::<NetDeleteBridge>(&mut c, &del_br).await,
        ErrorCode::Conflict
    );

    // Tear down: nothing of banger's is left, the foreign table survives.
    for tap in ["bg-t1", "bg-t2"] {
        let p = DeleteTapParams { name: tap.into() };
        assert_eq!(
            call::<NetDeleteTap>(&mut c, &p).await,
            Deleted { deleted: true }
        );
        assert_eq!(
            call::<NetDeleteTap>(&mut c, &p).await,
            Deleted { deleted: false }
        );
    }
    let rm = RemoveNatParams {
        table: table.clone(),
    };
    assert_eq!(
        call::<NetRemoveNat>(&mut c, &rm).await,
        Deleted { deleted: true }
    );
    assert_eq!(
        call::<NetRemoveNat>(&mut c, &rm).await,
        Deleted { deleted: false }
    );
    assert_eq!(
        call::<NetDeleteBridge>(&mut c, &del_br).await,
        Deleted { deleted: true }
    );

    let list = call::<NetList>(&mut c, &NoParams {}).await;
    assert!(
        list.bridges.is_empty() && list.taps.is_empty() && list.nft_tables.is_empty(),
        "{list:?}"
    );
    assert_eq!(ns.link_names(), ["lo"]);
    assert_eq!(ns.nft_tables(), ["inet foreign"]);
}

/// Every method that acts refuses names, addresses and tables that are not
/// banger's with `invalid_params`, and touches nothing while refusing.
#[tokio::test]
async fn every_method_refuses_what_is_not_bangers() {
    let mut ns = Netns::create();
    ns.exec(&[
        "ip", "link", "add", "eth9", "type", "veth", "peer", "name", "eth9p",
    ]);
    ns.exec(&["nft", "add", "table", "inet", "foreign"]);
    ns.start_helper(Path::new(env!("CARGO_BIN_EXE_banger-helper")));
    let mut c = ns.connect().await;

    for (name, gateway) in [
        ("eth9", "172.30.0.1/24"),    // not banger's device name
        ("docker0", "172.30.0.1/24"), // someone else's bridge
        ("banger0", "8.8.8.1/24"),    // a public address
        ("banger0", "172.30.0.1/8"),  // a prefix wider than /16
        ("banger0", "172.30.0.0/24"), // the network address, not a host
        ("banger0", "not-an-address"),
    ] {
        let p = EnsureBridgeParams {
            name: name.into(),
            gateway_cidr: gateway.into(),
            install: ns.table(),
        };
        assert_eq!(
            refused::<NetEnsureBridge>(&mut c, &p).await,
            ErrorCode::InvalidParams,
            "ensure_bridge {name} {gateway}"
        );
    }
    for name in ["eth9", "lo", "docker0"] {
        let p = DeleteBridgeParams { name: name.into() };
        assert_eq!(
            refused::<NetDeleteBridge>(&mut c, &p).await,
            ErrorCode::InvalidParams,
            "delete_bridge {name}"
        );
        let p = DeleteTapParams { name: name.into() };
        assert_eq!(
            refused::<NetDeleteTap>(&mut c, &p).await,
            ErrorCode::InvalidParams,
            "delete_tap {name}"
        );
    }
    let own = ns.table();
    for (table, subnet, bridge) in [
        ("foreign", "172.30.0.0/24", "banger0"), // someone else's table
        ("filter", "172.30.0.0/24", "banger0"),
        (&own, "1.2.3.0/24", "banger0"),   // a public subnet
        (&own, "172.30.0.0/8", "banger0"), // too wide
        (&own, "172.30.0.0/24", "eth9"),   // not banger's bridge
    ] {
        let p = EnsureNatParams {
            table: table.into(),
            subnet_cidr: subnet.into(),
            bridge: bridge.into(),
        };
        assert_eq!(
            refused::<NetEnsureNat>(&mut c, &p).await,
            ErrorCode::InvalidParams,
            "ensure_nat {table} {subnet} {bridge}"
        );
    }
    let p = RemoveNatParams {
        table: "filter".into(),
    };
    assert_eq!(
        refused::<NetRemoveNat>(&mut c, &p).await,
        ErrorCode::InvalidParams
    );
    let p = CreateTapParams {
        name: "tap0".into(),
        bridge: "banger0".into(),
        owner_uid: 0,
    };
    assert_eq!(
        refused::<NetCreateTap>(&mut c, &p).await,
        ErrorCode::InvalidParams
    );

    // Nothing was made or removed while refusing.
    assert_eq!(ns.link_names(), ["eth9", "eth9p", "lo"]);
    assert_eq!(ns.nft_tables(), ["inet foreign"]);
}
