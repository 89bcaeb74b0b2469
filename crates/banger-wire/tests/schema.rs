//! The wire protocol as a visible diff: the JSON schema of every method's
//! params and result, daemon and helper, against `tests/schema.json`. A
//! change to the protocol changes that file; regenerate it with
//! `UPDATE_SCHEMA=1 cargo test -p banger-wire --test schema` and review
//! the diff (an incompatible change also bumps `PROTOCOL_VERSION`).

use banger_wire::{Method, helper, methods};
use serde_json::{Map, Value, json};

fn schema_of<M: Method>(out: &mut Map<String, Value>)
where
    M::Params: schemars::JsonSchema,
    M::Result: schemars::JsonSchema,
{
    let prev = out.insert(
        M::NAME.to_string(),
        json!({
            "params": schemars::schema_for!(M::Params),
            "result": schemars::schema_for!(M::Result),
        }),
    );
    assert!(prev.is_none(), "{} is listed twice", M::NAME);
}

macro_rules! catalogue {
    ($($m:ty),+ $(,)?) => {{
        let mut out = Map::new();
        $(schema_of::<$m>(&mut out);)+
        out
    }};
}

#[test]
fn the_protocol_matches_its_snapshot() {
    let daemon = catalogue!(
        methods::DaemonStatus,
        methods::DaemonStop,
        methods::WebLogin,
        methods::HostDoctor,
        methods::HelperPing,
        methods::OpStatus,
        methods::OpCancel,
        methods::OpFollow,
        methods::VmCreate,
        methods::VmList,
        methods::VmShow,
        methods::VmStart,
        methods::VmStop,
        methods::VmPause,
        methods::VmResume,
        methods::VmRestart,
        methods::VmDelete,
        methods::VmSet,
        methods::VmNetShow,
        methods::VmNetSet,
        methods::VmNetLogMethod,
        methods::VmAuthsync,
        methods::VmPorts,
        methods::VmStats,
        methods::VmExec,
        methods::VmExecInput,
        methods::VmExecSignal,
        methods::VmExecResize,
        methods::SessionHold,
        methods::ImageList,
        methods::ImageShow,
        methods::ImageBuild,
        methods::ImageRegister,
        methods::ImageDelete,
        methods::VmSnapshot,
        methods::VmFork,
        methods::SnapshotList,
        methods::SnapshotShow,
        methods::SnapshotDelete,
        methods::ImagePromote,
        methods::ImagePull,
        methods::ImageImport,
        methods::HostGc,
        methods::VmPortForwardAdd,
        methods::VmPortForwardList,
        methods::VmPortForwardRemove,
        methods::NetworkDnsStatus,
        methods::WorkspacePrepare,
        methods::WorkspaceExport,
        methods::WorkspaceStatus,
        methods::SecretSet,
        methods::SecretList,
        methods::SecretRm,
    );
    let helper = catalogue!(
        helper::Ping,
        helper::Version,
        helper::NetEnsureBridge,
        helper::NetDeleteBridge,
        helper::NetCreateTap,
        helper::NetDeleteTap,
        helper::NetEnsureNat,
        helper::NetRemoveNat,
        helper::NetGuardTap,
        helper::NetUnguardTap,
        helper::NetSweepGuards,
        helper::NetAllowResolved,
        helper::NetInspect,
        helper::NetList,
        helper::DiskSnapshotCreate,
        helper::DiskSnapshotRemove,
        helper::DiskLoopDetach,
        helper::DiskList,
    );
    // Every method! in the sources is listed above.
    let declared = |src: &str| src.matches("method!(").count();
    assert_eq!(
        daemon.len(),
        declared(include_str!("../src/methods.rs")),
        "a daemon method is missing from this test"
    );
    assert_eq!(
        helper.len(),
        declared(include_str!("../src/helper.rs")),
        "a helper method is missing from this test"
    );
    assert_eq!(helper.len(), helper::ALL.len());
    let got = serde_json::to_string_pretty(&json!({
        "protocol_version": banger_wire::PROTOCOL_VERSION,
        "daemon": daemon,
        "helper": helper,
    }))
    .unwrap()
        + "\n";
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/schema.json");
    if std::env::var_os("UPDATE_SCHEMA").is_some() {
        std::fs::write(path, &got).unwrap();
        return;
    }
    let want = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        got == want,
        "the wire protocol changed: review the diff after \
         UPDATE_SCHEMA=1 cargo test -p banger-wire --test schema"
    );
}

#[test]
fn every_params_type_refuses_unknown_fields() {
    let schema: Value = serde_json::from_str(include_str!("schema.json")).unwrap();
    for side in ["daemon", "helper"] {
        for (name, m) in schema[side].as_object().unwrap() {
            let params = &m["params"];
            if params["type"] == "object" {
                assert_eq!(
                    params["additionalProperties"],
                    Value::Bool(false),
                    "{name}: params accept unknown fields"
                );
            }
        }
    }
}
