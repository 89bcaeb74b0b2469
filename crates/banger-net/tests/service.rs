//! The helper's `net.*` logic against the recording fake: validation,
//! idempotency, ordering and rollback, without root.

use banger_net::nat;
use banger_net::recording::{Call, RecordingHostNet};
use banger_net::{Install, LinkKind, NetError, NetService};
use banger_wire::ErrorCode;
use banger_wire::helper::{
    CreateTapParams, DeleteBridgeParams, DeleteTapParams, Deleted, EnsureBridgeParams,
    EnsureBridgeResult, EnsureNatParams, EnsureNatResult, GuardTapParams, RemoveNatParams,
    UnguardTapParams,
};
use ipnet::Ipv4Net;

const UID: u32 = 1000;
/// The one install the helper under test serves, owned by `UID`: its
/// table's name and its bridges' mark.
const INSTALL: &str = "banger-a1b2c3";

fn install() -> Install {
    Install::owned_by("a1b2c3", "/home/u/.local/state/banger", UID)
}

fn service() -> NetService<RecordingHostNet> {
    NetService::new(RecordingHostNet::new(), vec![UID], vec![install()])
}

fn net(s: &str) -> Ipv4Net {
    s.parse().unwrap()
}

fn bridge_params(name: &str, gw: &str) -> EnsureBridgeParams {
    EnsureBridgeParams {
        name: name.into(),
        gateway_cidr: gw.into(),
        install: INSTALL.into(),
    }
}

fn tap_params(name: &str, bridge: &str, uid: u32) -> CreateTapParams {
    CreateTapParams {
        name: name.into(),
        bridge: bridge.into(),
        owner_uid: uid,
    }
}

fn nat_params(table: &str, subnet: &str, bridge: &str) -> EnsureNatParams {
    EnsureNatParams {
        table: table.into(),
        subnet_cidr: subnet.into(),
        bridge: bridge.into(),
    }
}

async fn with_bridge() -> NetService<RecordingHostNet> {
    let svc = service();
    svc.ensure_bridge(&bridge_params("banger0", "172.30.0.1/24"), UID)
        .await
        .unwrap();
    svc.host().clear_calls();
    svc
}

/// A refusal: `invalid_params`, and the host was not even looked at.
fn assert_refused<T: std::fmt::Debug>(svc: &NetService<RecordingHostNet>, r: Result<T, NetError>) {
    let e = r.expect_err("should be refused");
    assert_eq!(e.code(), ErrorCode::InvalidParams, "{e}");
    assert_eq!(
        svc.host().calls(),
        vec![],
        "refused after touching the host: {e}"
    );
}

// ---- net.ensure_bridge -----------------------------------------------------

/// The host's own networks are not banger's to take, whoever asks: a
/// bridge address inside the LAN's subnet is refused and nothing is made.
#[tokio::test]
async fn ensure_bridge_refuses_a_subnet_the_host_uses() {
    let svc = service();
    svc.host().add_link("eth0", LinkKind::Other(None));
    svc.host()
        .edit_link("eth0", |l| l.addrs.push(net("192.168.1.10/24")));
    for gw in ["192.168.1.1/24", "192.168.0.1/16", "192.168.1.129/25"] {
        let e = svc
            .ensure_bridge(&bridge_params("banger0", gw), UID)
            .await
            .unwrap_err();
        assert_eq!(e.code(), ErrorCode::Conflict, "{gw}: {e}");
        assert!(
            e.to_string().contains("eth0") && e.to_string().contains("192.168.1.10/24"),
            "{e}"
        );
        assert!(
            svc.host().link("banger0").is_none(),
            "{gw}: the bridge was left behind"
        );
    }
    svc.ensure_bridge(&bridge_params("banger0", "172.30.0.1/24"), UID)
        .await
        .unwrap();
}

#[tokio::test]
async fn ensure_bridge_creates_addresses_and_brings_up_once() {
    let svc = service();
    let r = svc
        .ensure_bridge(&bridge_params("banger0", "172.30.0.1/24"), UID)
        .await
        .unwrap();
    assert_eq!(
        r,
        EnsureBridgeResult {
            created: true,
            address_added: true
        }
    );
    assert_eq!(
        svc.host().mutations(),
        vec![
            Call::LinkAddBridge("banger0".into()),
            Call::LinkSetAlias("banger0".into(), INSTALL.into()),
            Call::AddrAdd("banger0".into(), net("172.30.0.1/24")),
            Call::LinkSetUp("banger0".into()),
        ]
    );
    let l = svc.host().link("banger0").unwrap();
    assert_eq!(l.kind, LinkKind::Bridge);
    assert!(l.up);
    assert_eq!(l.addrs, vec![net("172.30.0.1/24")]);

    svc.host().clear_calls();
    let again = svc
        .ensure_bridge(&bridge_params("banger0", "172.30.0.1/24"), UID)
        .await
        .unwrap();
    assert_eq!(
        again,
        EnsureBridgeResult {
            created: false,
            address_added: false
        }
    );
    assert_eq!(
        svc.host().mutations(),
        vec![],
        "idempotent call changed the host"
    );
}

#[tokio::test]
async fn ensure_bridge_completes_an_existing_bare_bridge() {
    let svc = service();
    svc.host().add_link("banger0", LinkKind::Bridge);
    svc.host()
        .edit_link("banger0", |l| l.alias = Some(INSTALL.into()));
    let r = svc
        .ensure_bridge(&bridge_params("banger0", "172.30.0.1/24"), UID)
        .await
        .unwrap();
    assert!(!r.created && r.address_added);
    assert_eq!(
        svc.host().mutations(),
        vec![
            Call::AddrAdd("banger0".into(), net("172.30.0.1/24")),
            Call::LinkSetUp("banger0".into()),
        ]
    );
}

#[tokio::test]
async fn ensure_bridge_conflicts_without_changing_anything() {
    let svc = service();
    svc.host()
        .add_link("banger0", LinkKind::Other(Some("dummy".into())));
    let e = svc
        .ensure_bridge(&bridge_params("banger0", "172.30.0.1/24"), UID)
        .await
        .unwrap_err();
    assert_eq!(e.code(), ErrorCode::Conflict, "{e}");

    svc.host().add_link("banger1", LinkKind::Bridge);
    svc.host().edit_link("banger1", |l| {
        l.addrs.push(net("10.9.0.1/24"));
        l.alias = Some(INSTALL.into());
    });
    let e = svc
        .ensure_bridge(&bridge_params("banger1", "172.30.0.1/24"), UID)
        .await
        .unwrap_err();
    assert_eq!(e.code(), ErrorCode::Conflict, "{e}");
    assert!(e.to_string().contains("10.9.0.1/24"), "{e}");
    assert_eq!(svc.host().mutations(), vec![]);
}

#[tokio::test]
async fn ensure_bridge_rolls_back_a_bridge_it_created() {
    for failing in ["link_set_alias", "addr_add", "link_set_up"] {
        let svc = service();
        svc.host().fail_next(failing);
        let e = svc
            .ensure_bridge(&bridge_params("banger0", "172.30.0.1/24"), UID)
            .await
            .unwrap_err();
        assert_eq!(e.code(), ErrorCode::Internal);
        assert!(
            svc.host().link("banger0").is_none(),
            "{failing}: bridge left behind"
        );
        assert_eq!(
            svc.host().mutations().last(),
            Some(&Call::LinkDel("banger0".into()))
        );
    }
}

#[tokio::test]
async fn ensure_bridge_keeps_a_bridge_it_did_not_create() {
    let svc = service();
    svc.host().add_link("banger0", LinkKind::Bridge);
    svc.host().fail_next("addr_add");
    svc.ensure_bridge(&bridge_params("banger0", "172.30.0.1/24"), UID)
        .await
        .unwrap_err();
    assert!(svc.host().link("banger0").is_some());
    assert!(
        !svc.host()
            .mutations()
            .contains(&Call::LinkDel("banger0".into()))
    );
}

#[tokio::test]
async fn ensure_bridge_refuses_foreign_names_and_addresses() {
    for (name, gw) in [
        ("docker0", "172.30.0.1/24"),
        ("br0", "172.30.0.1/24"),
        ("eth0", "172.30.0.1/24"),
        ("banger_0", "172.30.0.1/24"),
        ("banger1234567890", "172.30.0.1/24"),
        ("banger0", "8.8.8.1/24"),
        ("banger0", "100.64.0.1/24"),
        ("banger0", "172.30.0.0/24"),
        ("banger0", "172.30.0.255/24"),
        ("banger0", "10.0.0.1/8"),
        ("banger0", "10.0.0.1/31"),
        ("banger0", "172.30.0.1"),
        ("banger0", "fd00::1/64"),
    ] {
        let svc = service();
        assert_refused(&svc, svc.ensure_bridge(&bridge_params(name, gw), UID).await);
    }
}

#[tokio::test]
async fn ensure_bridge_marks_a_bridge_named_after_its_install_and_no_other() {
    let svc = service();
    // Made before bridges carried marks: named after its install, so its own.
    svc.host().add_link(INSTALL, LinkKind::Bridge);
    svc.ensure_bridge(&bridge_params(INSTALL, "172.30.0.1/24"), UID)
        .await
        .unwrap();
    assert_eq!(
        svc.host().link(INSTALL).unwrap().alias.as_deref(),
        Some(INSTALL)
    );
    assert!(
        svc.host()
            .mutations()
            .contains(&Call::LinkSetAlias(INSTALL.into(), INSTALL.into()))
    );
    // Any other bridge without a mark is no install's.
    svc.host().clear_calls();
    svc.host().add_link("banger7", LinkKind::Bridge);
    let e = svc
        .ensure_bridge(&bridge_params("banger7", "172.31.0.1/24"), UID)
        .await
        .unwrap_err();
    assert_eq!(e.code(), ErrorCode::PermissionDenied, "{e}");
    assert!(e.to_string().contains("carries no install's mark"), "{e}");
    assert_eq!(svc.host().mutations(), vec![]);
}

/// Two installs served by one helper, owned by two users, and a third
/// install it does not serve: each user acts only on its own install's
/// bridge and table, root on any install the helper serves, no one on an
/// install it does not serve.
#[tokio::test]
async fn another_install_s_bridge_and_table_are_not_the_caller_s() {
    const THEIRS: &str = "banger-d4e5f6";
    const STRANGER: u32 = 1001;
    let svc = NetService::new(
        RecordingHostNet::new(),
        vec![UID, STRANGER],
        vec![
            install(),
            Install::owned_by("d4e5f6", "/home/v/.local/state/banger", STRANGER),
        ],
    );
    let theirs = |name: &str, gw: &str| EnsureBridgeParams {
        name: name.into(),
        gateway_cidr: gw.into(),
        install: THEIRS.into(),
    };
    svc.ensure_bridge(&theirs(THEIRS, "172.31.0.1/24"), STRANGER)
        .await
        .unwrap();
    svc.ensure_nat(&nat_params(THEIRS, "172.31.0.0/24", THEIRS), STRANGER)
        .await
        .unwrap();
    svc.ensure_bridge(&bridge_params("banger0", "172.30.0.1/24"), UID)
        .await
        .unwrap();
    svc.host().clear_calls();
    let denied = |r: Result<(), NetError>, what: &str| {
        let e = r.expect_err(what);
        assert_eq!(e.code(), ErrorCode::PermissionDenied, "{what}: {e}");
    };
    denied(
        svc.ensure_bridge(&theirs("banger5", "172.29.0.1/24"), UID)
            .await
            .map(drop),
        "a bridge for their install",
    );
    denied(
        svc.ensure_bridge(
            &EnsureBridgeParams {
                install: THEIRS.into(),
                ..bridge_params(THEIRS, "172.31.0.1/24")
            },
            UID,
        )
        .await
        .map(drop),
        "their bridge, ensured",
    );
    denied(
        svc.ensure_bridge(&bridge_params(THEIRS, "172.31.0.1/24"), UID)
            .await
            .map(drop),
        "their bridge, claimed for mine",
    );
    denied(
        svc.delete_bridge(
            &DeleteBridgeParams {
                name: THEIRS.into(),
            },
            UID,
        )
        .await
        .map(drop),
        "deleting their bridge",
    );
    denied(
        svc.create_tap(&tap_params("bg-t9", THEIRS, UID), UID).await,
        "a tap of mine on their bridge",
    );
    denied(
        svc.ensure_nat(&nat_params(INSTALL, "172.31.0.0/24", THEIRS), UID)
            .await
            .map(drop),
        "my table over their bridge",
    );
    denied(
        svc.ensure_nat(&nat_params(THEIRS, "172.31.0.0/24", "banger0"), UID)
            .await
            .map(drop),
        "their table",
    );
    denied(
        svc.remove_nat(
            &RemoveNatParams {
                table: THEIRS.into(),
            },
            UID,
        )
        .await
        .map(drop),
        "removing their table",
    );
    denied(
        svc.unguard_tap(
            &UnguardTapParams {
                table: THEIRS.into(),
                tap: "bg-t9".into(),
                ip: None,
            },
            UID,
        )
        .await,
        "unguarding in their table",
    );
    assert_eq!(svc.host().mutations(), vec![], "nothing of theirs changed");
    // An install the helper does not serve is no one's, root's neither.
    denied(
        svc.remove_nat(
            &RemoveNatParams {
                table: "banger-ffffff".into(),
            },
            0,
        )
        .await
        .map(drop),
        "root, an install not served",
    );
    // Root acts for any install the helper serves.
    svc.remove_nat(
        &RemoveNatParams {
            table: THEIRS.into(),
        },
        0,
    )
    .await
    .unwrap();
}

// ---- net.delete_bridge -----------------------------------------------------

#[tokio::test]
async fn delete_bridge_deletes_only_an_empty_banger_bridge() {
    let svc = with_bridge().await;
    svc.create_tap(&tap_params("bg-t1", "banger0", UID), UID)
        .await
        .unwrap();
    let e = svc
        .delete_bridge(
            &DeleteBridgeParams {
                name: "banger0".into(),
            },
            UID,
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), ErrorCode::Conflict);
    assert!(e.to_string().contains("bg-t1"), "{e}");

    svc.delete_tap(
        &DeleteTapParams {
            name: "bg-t1".into(),
        },
        UID,
    )
    .await
    .unwrap();
    let r = svc
        .delete_bridge(
            &DeleteBridgeParams {
                name: "banger0".into(),
            },
            UID,
        )
        .await
        .unwrap();
    assert_eq!(r, Deleted { deleted: true });
    assert!(svc.host().link("banger0").is_none());
    let again = svc
        .delete_bridge(
            &DeleteBridgeParams {
                name: "banger0".into(),
            },
            UID,
        )
        .await
        .unwrap();
    assert_eq!(again, Deleted { deleted: false });
}

#[tokio::test]
async fn delete_bridge_will_not_delete_a_non_bridge() {
    let svc = service();
    svc.host()
        .add_link("banger2", LinkKind::Other(Some("veth".into())));
    let e = svc
        .delete_bridge(
            &DeleteBridgeParams {
                name: "banger2".into(),
            },
            UID,
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), ErrorCode::Conflict);
    assert!(svc.host().link("banger2").is_some());
}

#[tokio::test]
async fn delete_bridge_refuses_foreign_names() {
    for name in ["docker0", "lo", "virbr0", "bg-t1", ""] {
        let svc = service();
        assert_refused(
            &svc,
            svc.delete_bridge(&DeleteBridgeParams { name: name.into() }, UID)
                .await,
        );
    }
}

// ---- net.create_tap --------------------------------------------------------

#[tokio::test]
async fn create_tap_creates_attaches_and_brings_up_in_order() {
    let svc = with_bridge().await;
    svc.create_tap(&tap_params("bg-t1", "banger0", UID), UID)
        .await
        .unwrap();
    assert_eq!(
        svc.host().mutations(),
        vec![
            Call::TapCreate("bg-t1".into(), UID),
            Call::LinkSetMaster("bg-t1".into(), "banger0".into()),
            Call::LinkSetUp("bg-t1".into()),
        ]
    );
    let tap = svc.host().link("bg-t1").unwrap();
    assert_eq!(tap.kind, LinkKind::Tap { owner: Some(UID) });
    assert_eq!(tap.master.as_deref(), Some("banger0"));
    assert!(tap.up);
}

#[tokio::test]
async fn create_tap_rolls_back_a_half_created_tap() {
    for failing in ["link_set_master", "link_set_up"] {
        let svc = with_bridge().await;
        svc.host().fail_next(failing);
        let e = svc
            .create_tap(&tap_params("bg-t1", "banger0", UID), UID)
            .await
            .unwrap_err();
        assert_eq!(e.code(), ErrorCode::Internal);
        assert!(e.to_string().contains(failing), "{e}");
        assert!(
            svc.host().link("bg-t1").is_none(),
            "{failing}: tap left behind"
        );
        assert_eq!(
            svc.host().mutations().last(),
            Some(&Call::LinkDel("bg-t1".into()))
        );
    }
}

#[tokio::test]
async fn create_tap_needs_a_bridge_and_a_free_name() {
    let svc = service();
    let e = svc
        .create_tap(&tap_params("bg-t1", "banger0", UID), UID)
        .await
        .unwrap_err();
    assert_eq!(e.code(), ErrorCode::NotFound);

    svc.host()
        .add_link("banger9", LinkKind::Other(Some("dummy".into())));
    let e = svc
        .create_tap(&tap_params("bg-t1", "banger9", UID), UID)
        .await
        .unwrap_err();
    assert_eq!(e.code(), ErrorCode::Conflict);

    let svc = with_bridge().await;
    svc.create_tap(&tap_params("bg-t1", "banger0", UID), UID)
        .await
        .unwrap();
    svc.host().clear_calls();
    let e = svc
        .create_tap(&tap_params("bg-t1", "banger0", UID), UID)
        .await
        .unwrap_err();
    assert_eq!(e.code(), ErrorCode::Conflict);
    assert_eq!(svc.host().mutations(), vec![]);
}

#[tokio::test]
async fn create_tap_refuses_foreign_names_bridges_and_owners() {
    for (name, bridge, uid) in [
        ("eth0", "banger0", UID),
        ("tap0", "banger0", UID),
        ("bg-", "banger0", UID),
        ("bg-abcdefghijklm", "banger0", UID),
        ("bg-T1", "banger0", UID),
        ("bg-t1", "docker0", UID),
        ("bg-t1", "br-1234", UID),
        ("bg-t1", "banger0", 0),
        ("bg-t1", "banger0", 1001),
    ] {
        let svc = service();
        assert_refused(
            &svc,
            svc.create_tap(&tap_params(name, bridge, uid), UID).await,
        );
    }
}

// ---- net.delete_tap --------------------------------------------------------

#[tokio::test]
async fn delete_tap_deletes_taps_only() {
    let svc = with_bridge().await;
    svc.create_tap(&tap_params("bg-t1", "banger0", UID), UID)
        .await
        .unwrap();
    let del = |name: &str| DeleteTapParams { name: name.into() };
    assert_eq!(
        svc.delete_tap(&del("bg-t1"), UID).await.unwrap(),
        Deleted { deleted: true }
    );
    assert!(svc.host().link("bg-t1").is_none());
    assert_eq!(
        svc.delete_tap(&del("bg-t1"), UID).await.unwrap(),
        Deleted { deleted: false }
    );

    svc.host()
        .add_link("bg-veth", LinkKind::Other(Some("veth".into())));
    let e = svc.delete_tap(&del("bg-veth"), UID).await.unwrap_err();
    assert_eq!(e.code(), ErrorCode::Conflict);
    assert!(svc.host().link("bg-veth").is_some());
}

#[tokio::test]
async fn delete_tap_refuses_foreign_names() {
    for name in ["eth0", "banger0", "tap0", "vnet0", "bg-"] {
        let svc = service();
        assert_refused(
            &svc,
            svc.delete_tap(&DeleteTapParams { name: name.into() }, UID)
                .await,
        );
    }
}

// ---- net.ensure_nat / net.remove_nat ---------------------------------------

#[tokio::test]
async fn ensure_nat_replaces_its_table_and_enables_forwarding_once() {
    let svc = with_bridge().await;
    svc.host().add_foreign_table("inet", "firewalld");
    svc.host().add_foreign_table("ip", "nat");
    let p = nat_params(INSTALL, "172.30.0.0/24", "banger0");
    let r = svc.ensure_nat(&p, UID).await.unwrap();
    assert_eq!(
        r,
        EnsureNatResult {
            replaced: false,
            ip_forward_enabled: true
        }
    );
    assert!(svc.host().ip_forward_on());
    // banger turned forwarding on: it forwards banger's traffic only.
    let expected = nat::ruleset(INSTALL, net("172.30.0.0/24"), "banger0", true);
    assert_eq!(svc.host().table_batch(INSTALL), Some(expected.clone()));
    assert_eq!(
        svc.host().mutations(),
        vec![Call::NftApply(expected.clone()), Call::SetIpForward(true)]
    );

    svc.host().clear_calls();
    let r = svc.ensure_nat(&p, UID).await.unwrap();
    assert_eq!(
        r,
        EnsureNatResult {
            replaced: true,
            ip_forward_enabled: false
        }
    );
    assert!(!svc.host().mutations().contains(&Call::SetIpForward(true)));
    // Made again with forwarding now on: the decision is kept.
    assert_eq!(svc.host().table_batch(INSTALL), Some(expected));
    let names: Vec<_> = svc
        .host()
        .tables()
        .into_iter()
        .map(|t| format!("{} {}", t.family, t.name))
        .collect();
    assert_eq!(
        names,
        [
            "bridge banger-a1b2c3",
            "inet banger-a1b2c3",
            "inet firewalld",
            "ip nat"
        ]
    );
}

/// Where forwarding was on before banger, someone else routes through
/// this host: banger's forward chain accepts, then and when made again.
#[tokio::test]
async fn ensure_nat_leaves_forwarding_others_rely_on() {
    use banger_net::HostNet as _;
    let svc = with_bridge().await;
    svc.host().set_ip_forward(true).await.unwrap();
    let p = nat_params(INSTALL, "172.30.0.0/24", "banger0");
    for _ in 0..2 {
        let r = svc.ensure_nat(&p, UID).await.unwrap();
        assert!(!r.ip_forward_enabled);
        let batch = svc.host().table_batch(INSTALL).unwrap();
        assert_eq!(
            batch,
            nat::ruleset(INSTALL, net("172.30.0.0/24"), "banger0", false)
        );
    }
}

#[tokio::test]
async fn ensure_nat_refuses_foreign_tables_and_addresses() {
    for (table, subnet, bridge) in [
        ("filter", "172.30.0.0/24", "banger0"),
        ("nat", "172.30.0.0/24", "banger0"),
        ("firewalld", "172.30.0.0/24", "banger0"),
        ("bangerx", "172.30.0.0/24", "banger0"),
        ("banger-", "172.30.0.0/24", "banger0"),
        (INSTALL, "8.8.8.0/24", "banger0"),
        (INSTALL, "0.0.0.0/0", "banger0"),
        (INSTALL, "172.30.0.1/24", "banger0"),
        (INSTALL, "10.0.0.0/8", "banger0"),
        (INSTALL, "172.30.0.0/24", "docker0"),
        (INSTALL, "172.30.0.0/24", "eth0"),
    ] {
        let svc = service();
        assert_refused(
            &svc,
            svc.ensure_nat(&nat_params(table, subnet, bridge), UID)
                .await,
        );
    }
}

#[tokio::test]
async fn remove_nat_deletes_only_its_table_and_leaves_forwarding() {
    let svc = with_bridge().await;
    svc.host().add_foreign_table("inet", "firewalld");
    svc.ensure_nat(&nat_params(INSTALL, "10.44.0.0/16", "banger0"), UID)
        .await
        .unwrap();
    let rm = RemoveNatParams {
        table: INSTALL.into(),
    };
    assert_eq!(
        svc.remove_nat(&rm, UID).await.unwrap(),
        Deleted { deleted: true }
    );
    assert_eq!(
        svc.remove_nat(&rm, UID).await.unwrap(),
        Deleted { deleted: false }
    );
    let names: Vec<_> = svc.host().tables().into_iter().map(|t| t.name).collect();
    assert_eq!(names, ["firewalld"]);
    assert!(svc.host().ip_forward_on());
}

#[tokio::test]
async fn remove_nat_refuses_foreign_tables() {
    for table in ["filter", "firewalld", "nat", "docker", "banger_x", ""] {
        let svc = service();
        assert_refused(
            &svc,
            svc.remove_nat(
                &RemoveNatParams {
                    table: table.into(),
                },
                UID,
            )
            .await,
        );
    }
}

// ---- net.list --------------------------------------------------------------

#[tokio::test]
async fn list_reports_only_banger_links_and_tables() {
    let svc = with_bridge().await;
    svc.create_tap(&tap_params("bg-t2", "banger0", UID), UID)
        .await
        .unwrap();
    svc.create_tap(&tap_params("bg-t1", "banger0", UID), UID)
        .await
        .unwrap();
    svc.ensure_nat(&nat_params(INSTALL, "172.30.0.0/24", "banger0"), UID)
        .await
        .unwrap();
    // Other people's things, some with banger-looking names.
    svc.host().add_link("docker0", LinkKind::Bridge);
    svc.host().add_link("tap0", LinkKind::Tap { owner: None });
    svc.host()
        .add_link("bg-veth", LinkKind::Other(Some("veth".into())));
    svc.host().add_link("bg-tun", LinkKind::Tun);
    svc.host().add_foreign_table("inet", "filter");
    svc.host().add_foreign_table("ip", INSTALL);

    let l = svc.list().await.unwrap();
    assert_eq!(l.bridges.len(), 1);
    assert_eq!(l.bridges[0].name, "banger0");
    assert!(l.bridges[0].up);
    assert_eq!(l.bridges[0].addrs, ["172.30.0.1/24"]);
    let taps: Vec<_> = l.taps.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(taps, ["bg-t1", "bg-t2"]);
    for t in &l.taps {
        assert_eq!(t.bridge.as_deref(), Some("banger0"));
        assert!(t.up);
        assert_eq!(t.owner_uid, Some(UID));
    }
    assert_eq!(l.nft_tables, [INSTALL]);
    assert!(l.ip_forward);
}

/// Two users' installs share the host: neither makes taps for the other
/// nor deletes the other's; root may do both.
#[tokio::test]
async fn taps_belong_to_the_uid_that_made_them() {
    let svc = NetService::new(RecordingHostNet::new(), vec![UID, 1001], vec![install()]);
    svc.ensure_bridge(&bridge_params("banger0", "172.30.0.1/24"), UID)
        .await
        .unwrap();
    svc.create_tap(&tap_params("bg-t1", "banger0", UID), UID)
        .await
        .unwrap();
    let e = svc
        .create_tap(&tap_params("bg-t2", "banger0", UID), 1001)
        .await
        .unwrap_err();
    assert_eq!(e.code(), ErrorCode::PermissionDenied, "{e}");
    assert!(svc.host().link("bg-t2").is_none());
    let del = DeleteTapParams {
        name: "bg-t1".into(),
    };
    let e = svc.delete_tap(&del, 1001).await.unwrap_err();
    assert_eq!(e.code(), ErrorCode::PermissionDenied, "{e}");
    assert!(e.to_string().contains("uid 1000"), "{e}");
    assert!(
        svc.host().link("bg-t1").is_some(),
        "another user's tap was deleted"
    );
    assert!(svc.delete_tap(&del, UID).await.unwrap().deleted);
    svc.create_tap(&tap_params("bg-t3", "banger0", 1001), 0)
        .await
        .unwrap();
    assert!(
        svc.delete_tap(
            &DeleteTapParams {
                name: "bg-t3".into()
            },
            0
        )
        .await
        .unwrap()
        .deleted
    );
}

// ---- net.guard_tap / net.unguard_tap ---------------------------------------

fn guard_params(tap: &str, mac: &str, ip: &str) -> GuardTapParams {
    GuardTapParams {
        table: INSTALL.into(),
        tap: tap.into(),
        bridge: "banger0".into(),
        mac: mac.into(),
        ip: ip.into(),
        policy: "nat".into(),
        secrets_proxy: false,
    }
}

/// A caller guards only its own taps, with an address of the tap's
/// bridge; nothing is applied otherwise.
#[tokio::test]
async fn guard_tap_checks_owner_bridge_and_address() {
    let svc = NetService::new(RecordingHostNet::new(), vec![UID, 2000], vec![install()]);
    svc.ensure_bridge(&bridge_params("banger0", "172.30.0.1/24"), UID)
        .await
        .unwrap();
    svc.ensure_nat(&nat_params(INSTALL, "172.30.0.0/24", "banger0"), UID)
        .await
        .unwrap();
    svc.create_tap(&tap_params("bg-mine", "banger0", UID), UID)
        .await
        .unwrap();
    svc.create_tap(&tap_params("bg-other", "banger0", 2000), 0)
        .await
        .unwrap();
    svc.host().clear_calls();
    // Malformed: refused before the host is looked at.
    for p in [
        guard_params("eth0", "52:54:00:00:00:02", "172.30.0.2"),
        guard_params("bg-mine", "ff:ff:ff:ff:ff:ff", "172.30.0.2"),
        guard_params("bg-mine", "52:54:00:00:00:02", "172.30.0.2/24"),
    ] {
        assert_refused(&svc, svc.guard_tap(&p, UID).await);
    }
    let applied = |svc: &NetService<RecordingHostNet>| {
        svc.host()
            .mutations()
            .into_iter()
            .filter(|c| matches!(c, Call::NftApply(_)))
            .count()
    };
    let e = svc
        .guard_tap(
            &guard_params("bg-other", "52:54:00:00:00:02", "172.30.0.2"),
            UID,
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), ErrorCode::PermissionDenied, "{e}");
    for ip in ["172.30.0.1", "172.30.0.0", "172.30.0.255", "10.0.0.2"] {
        let e = svc
            .guard_tap(&guard_params("bg-mine", "52:54:00:00:00:02", ip), UID)
            .await
            .unwrap_err();
        assert_eq!(e.code(), ErrorCode::InvalidParams, "{ip}: {e}");
    }
    let e = svc
        .guard_tap(
            &guard_params("bg-none", "52:54:00:00:00:02", "172.30.0.2"),
            UID,
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), ErrorCode::NotFound, "{e}");
    assert_eq!(applied(&svc), 0);
    svc.guard_tap(
        &guard_params("bg-mine", "52:54:00:00:00:02", "172.30.0.2"),
        UID,
    )
    .await
    .unwrap();
    assert_eq!(applied(&svc), 1);
    // After the rules, the bridge's neighbour entry for the address names
    // this guest's MAC (not a deleted VM's that had the address before).
    assert_eq!(
        svc.host().mutations().last(),
        Some(&Call::NeighReplace(
            "banger0".into(),
            [172, 30, 0, 2].into(),
            [0x52, 0x54, 0, 0, 0, 2]
        ))
    );
    // Unguarding another's tap is refused; one's own, or a tap gone, is not.
    let unguard = |tap: &str| UnguardTapParams {
        table: INSTALL.into(),
        tap: tap.into(),
        ip: Some("172.30.0.2".into()),
    };
    let e = svc
        .unguard_tap(&unguard("bg-other"), UID)
        .await
        .unwrap_err();
    assert_eq!(e.code(), ErrorCode::PermissionDenied, "{e}");
    svc.unguard_tap(&unguard("bg-mine"), UID).await.unwrap();
    svc.unguard_tap(&unguard("bg-gone"), UID).await.unwrap();
    assert_eq!(applied(&svc), 3);
}

/// Without banger's table there is nothing to hang a guard on.
#[tokio::test]
async fn guard_tap_needs_the_table() {
    let svc = with_bridge().await;
    svc.create_tap(&tap_params("bg-mine", "banger0", UID), UID)
        .await
        .unwrap();
    let e = svc
        .guard_tap(
            &guard_params("bg-mine", "52:54:00:00:00:02", "172.30.0.2"),
            UID,
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), ErrorCode::NotFound, "{e}");
}

/// A guard lists the table's sets once per helper (not twice per guard):
/// later guards use what the helper made and removed, and a view gone
/// stale behind its back (a set deleted by hand) costs one failed
/// transaction and a listing, never a wrong guard.
#[tokio::test]
async fn guard_tap_lists_the_sets_once_and_survives_a_stale_view() {
    use banger_net::HostNet;
    let svc = with_bridge().await;
    svc.ensure_nat(&nat_params(INSTALL, "172.30.0.0/24", "banger0"), UID)
        .await
        .unwrap();
    for tap in ["bg-a", "bg-b"] {
        svc.create_tap(&tap_params(tap, "banger0", UID), UID)
            .await
            .unwrap();
    }
    let sets = || async {
        let mut names: Vec<String> = svc
            .host()
            .nft_sets()
            .await
            .unwrap()
            .into_iter()
            .filter(|s| s.name.starts_with("learned-") || s.name.starts_with("denied-"))
            .map(|s| format!("{} {}", s.family, s.name))
            .collect();
        names.sort();
        // Its own listing is not the service's.
        svc.host().clear_calls();
        names
    };
    // (sets listings, other listings: one set or the tables, transactions)
    // since the last look.
    let counts = || {
        let calls = svc.host().calls();
        svc.host().clear_calls();
        let n = |f: fn(&Call) -> bool| calls.iter().filter(|c| f(c)).count();
        (
            n(|c| matches!(c, Call::NftSets)),
            n(|c| matches!(c, Call::NftList(..) | Call::NftTables)),
            n(|c| matches!(c, Call::NftApply(_))),
        )
    };
    let guard = |tap: &str, ip: &str, policy: &str| {
        let mut p = guard_params(tap, "52:54:00:00:00:02", ip);
        p.policy = policy.into();
        p
    };
    svc.host().clear_calls();
    svc.guard_tap(&guard("bg-a", "172.30.0.2", "nat"), UID)
        .await
        .unwrap();
    assert_eq!(counts(), (1, 0, 1));
    svc.guard_tap(&guard("bg-b", "172.30.0.3", "nat"), UID)
        .await
        .unwrap();
    assert_eq!(counts(), (0, 0, 1));
    // Made again under `none` (the bridge denied set comes), then `nat`
    // (it goes): each on what the helper knows, in one transaction.
    svc.guard_tap(&guard("bg-a", "172.30.0.2", "none"), UID)
        .await
        .unwrap();
    assert_eq!(counts(), (0, 0, 1));
    assert!(
        sets()
            .await
            .contains(&"bridge denied-172-30-0-2".to_owned())
    );
    svc.guard_tap(&guard("bg-a", "172.30.0.2", "nat"), UID)
        .await
        .unwrap();
    assert_eq!(counts(), (0, 0, 1));
    let both = vec![
        "inet denied-172-30-0-2".to_owned(),
        "inet denied-172-30-0-3".to_owned(),
        "inet learned-172-30-0-2".to_owned(),
        "inet learned-172-30-0-3".to_owned(),
    ];
    assert_eq!(sets().await, both);
    // Behind the helper's back: the first try fails whole, the second
    // lists the guest's sets and makes them again.
    svc.host()
        .nft_apply(&serde_json::json!({ "nftables": [
            { "delete": { "set": { "family": "inet", "table": INSTALL, "name": "learned-172-30-0-3" } } },
            { "delete": { "set": { "family": "inet", "table": INSTALL, "name": "denied-172-30-0-3" } } },
        ]}))
        .await
        .unwrap();
    svc.host().clear_calls();
    svc.guard_tap(&guard("bg-b", "172.30.0.3", "nat"), UID)
        .await
        .unwrap();
    assert_eq!(counts(), (0, 3, 2));
    assert_eq!(sets().await, both);
    // The next guard lists the table whole again, once.
    svc.guard_tap(&guard("bg-b", "172.30.0.3", "nat"), UID)
        .await
        .unwrap();
    assert_eq!(counts(), (1, 0, 1));
    // An unguard is one transaction on the same view, and removes the
    // guest's sets from it.
    svc.unguard_tap(
        &UnguardTapParams {
            table: INSTALL.into(),
            tap: "bg-a".into(),
            ip: Some("172.30.0.2".into()),
        },
        UID,
    )
    .await
    .unwrap();
    assert_eq!(counts(), (0, 0, 1));
    svc.guard_tap(&guard("bg-a", "172.30.0.2", "nat"), UID)
        .await
        .unwrap();
    assert_eq!(counts(), (0, 0, 1));
    assert_eq!(sets().await, both);
}
