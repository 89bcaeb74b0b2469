//! Routes for the `disk.*` methods; the logic is `banger_disk::DiskService`.
//! The snapshot's node goes to the caller: the uid its peer credentials
//! name, which the server has already checked against `--allow-uid`.

use std::sync::Arc;

use banger_disk::{DiskError, DiskService, HostDisk};
use banger_rpc::{Router, RpcError};
use banger_wire::helper::{DiskList, DiskLoopDetach, DiskSnapshotCreate, DiskSnapshotRemove};

/// `e` and its sources, `: `-joined, as the caller sees it.
fn rpc_error(e: DiskError) -> RpcError {
    RpcError::new(e.code(), banger_rpc::error_chain(&e))
}

/// Add the `disk.*` methods, served by `svc`, to `router`.
pub fn route<H: HostDisk>(router: Router, svc: Arc<DiskService<H>>) -> Router {
    router
        .route_with::<DiskSnapshotCreate, _, _, _>(&svc, |s, ctx, p| async move {
            s.snapshot_create(&p, ctx.peer_uid).await.map_err(rpc_error)
        })
        .route_with::<DiskSnapshotRemove, _, _, _>(&svc, |s, ctx, p| async move {
            s.snapshot_remove(&p, ctx.peer_uid).await.map_err(rpc_error)
        })
        .route_with::<DiskLoopDetach, _, _, _>(&svc, |s, ctx, p| async move {
            s.loop_detach(&p, ctx.peer_uid).await.map_err(rpc_error)
        })
        .route_with::<DiskList, _, _, _>(&svc, |s, _, _| async move {
            s.list().await.map_err(rpc_error)
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use banger_disk::recording::RecordingHostDisk;
    use banger_wire::ErrorCode;

    #[test]
    fn errors_carry_code_and_cause() {
        let e = DiskError::Host(banger_disk::HostError::new(
            "cannot create dm device bg-1f",
            "dmsetup create failed",
        ));
        let r = rpc_error(e);
        assert_eq!(r.code, ErrorCode::Internal);
        assert_eq!(
            r.message,
            "cannot create dm device bg-1f: dmsetup create failed"
        );
        let r = rpc_error(DiskError::Unavailable("no /dev/mapper/control".into()));
        assert_eq!(r.code, ErrorCode::Unavailable);
    }

    #[test]
    fn every_disk_method_is_routed() {
        let svc = Arc::new(DiskService::new(RecordingHostDisk::new(), vec![]));
        let router = route(Router::new(), svc);
        let mut disk: Vec<_> = banger_wire::helper::ALL
            .iter()
            .copied()
            .filter(|m| m.starts_with("disk."))
            .collect();
        disk.sort_unstable();
        assert_eq!(router.methods(), disk);
    }
}
