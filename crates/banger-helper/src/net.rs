//! Routes for the `net.*` methods; the logic is `banger_net::NetService`.

use std::sync::Arc;

use banger_net::{HostNet, NetError, NetService};
use banger_rpc::{Router, RpcError};
use banger_wire::Empty;
use banger_wire::helper::{
    NetAllowResolved, NetCreateTap, NetDeleteBridge, NetDeleteTap, NetEnsureBridge, NetEnsureNat,
    NetGuardTap, NetInspect, NetList, NetRemoveNat, NetSweepGuards, NetUnguardTap,
};

/// `e` and its sources, `: `-joined, as the caller sees it.
fn rpc_error(e: NetError) -> RpcError {
    RpcError::new(e.code(), banger_rpc::error_chain(&e))
}

/// Add the `net.*` methods, served by `svc`, to `router`.
pub fn route<H: HostNet>(router: Router, svc: Arc<NetService<H>>) -> Router {
    router
        .route_with::<NetEnsureBridge, _, _, _>(&svc, |s, call, p| async move {
            s.ensure_bridge(&p, call.peer_uid).await.map_err(rpc_error)
        })
        .route_with::<NetDeleteBridge, _, _, _>(&svc, |s, call, p| async move {
            s.delete_bridge(&p, call.peer_uid).await.map_err(rpc_error)
        })
        .route_with::<NetCreateTap, _, _, _>(&svc, |s, call, p| async move {
            s.create_tap(&p, call.peer_uid)
                .await
                .map(|()| Empty {})
                .map_err(rpc_error)
        })
        .route_with::<NetDeleteTap, _, _, _>(&svc, |s, call, p| async move {
            s.delete_tap(&p, call.peer_uid).await.map_err(rpc_error)
        })
        .route_with::<NetEnsureNat, _, _, _>(&svc, |s, call, p| async move {
            s.ensure_nat(&p, call.peer_uid).await.map_err(rpc_error)
        })
        .route_with::<NetRemoveNat, _, _, _>(&svc, |s, call, p| async move {
            s.remove_nat(&p, call.peer_uid).await.map_err(rpc_error)
        })
        .route_with::<NetGuardTap, _, _, _>(&svc, |s, call, p| async move {
            s.guard_tap(&p, call.peer_uid)
                .await
                .map(|()| Empty {})
                .map_err(rpc_error)
        })
        .route_with::<NetUnguardTap, _, _, _>(&svc, |s, call, p| async move {
            s.unguard_tap(&p, call.peer_uid)
                .await
                .map(|()| Empty {})
                .map_err(rpc_error)
        })
        .route_with::<NetSweepGuards, _, _, _>(&svc, |s, call, p| async move {
            s.sweep_guards(&p, call.peer_uid).await.map_err(rpc_error)
        })
        .route_with::<NetAllowResolved, _, _, _>(&svc, |s, call, p| async move {
            s.allow_resolved(&p, call.peer_uid)
                .await
                .map(|()| Empty {})
                .map_err(rpc_error)
        })
        .route_with::<NetInspect, _, _, _>(&svc, |s, call, p| async move {
            s.inspect(&p, call.peer_uid).await.map_err(rpc_error)
        })
        .route_with::<NetList, _, _, _>(
            &svc,
            |s, _, _| async move { s.list().await.map_err(rpc_error) },
        )
}

#[cfg(test)]
mod tests {
    use super::*;
    use banger_net::HostError;
    use banger_wire::ErrorCode;

    #[test]
    fn errors_carry_code_and_cause() {
        let e = NetError::Host(HostError::new(
            "cannot create tap bg-t1",
            std::io::Error::from_raw_os_error(1),
        ));
        let r = rpc_error(e);
        assert_eq!(r.code, ErrorCode::Internal);
        assert!(
            r.message
                .starts_with("cannot create tap bg-t1: Operation not permitted"),
            "{}",
            r.message
        );
        let refused = rpc_error(NetError::OwnerNotAllowed(7));
        assert_eq!(refused.code, ErrorCode::InvalidParams);
    }

    #[test]
    fn every_helper_method_is_routed() {
        let svc = Arc::new(NetService::new(
            banger_net::recording::RecordingHostNet::new(),
            vec![0],
            Vec::new(),
        ));
        let router = route(Router::new(), svc);
        let mut net: Vec<_> = banger_wire::helper::ALL
            .iter()
            .copied()
            .filter(|m| m.starts_with("net."))
            .collect();
        net.sort_unstable();
        assert_eq!(router.methods(), net);
    }
}
