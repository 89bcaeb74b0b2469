//! RPC method → service wiring. The router built here is the daemon's
//! complete method list.

use std::sync::Arc;

use banger_rpc::Router;
use banger_wire::Empty;
use banger_wire::helper::Ping;
use banger_wire::methods::{DaemonStatus, DaemonStop, HelperPing};

use crate::daemon::DaemonService;
use crate::helper::HelperLink;

/// The services the daemon is made of. Each owns its state and locks.
#[derive(Debug)]
pub struct Services {
    pub daemon: DaemonService,
    pub helper: HelperLink,
    pub store: banger_store::Store,
}

pub fn router(services: Arc<Services>) -> Router {
    let s1 = services.clone();
    let s2 = services.clone();
    let s3 = services;
    Router::new()
        .route::<DaemonStatus, _, _>(move |_ctx, _| {
            let s = s1.clone();
            async move { Ok(s.daemon.status()) }
        })
        .route::<DaemonStop, _, _>(move |_ctx, _| {
            let s = s2.clone();
            async move {
                s.daemon.request_stop("daemon.stop");
                Ok(Empty {})
            }
        })
        .route::<HelperPing, _, _>(move |ctx, params| {
            let s = s3.clone();
            async move { s.helper.call::<Ping>(&ctx.op_id, &params).await }
        })
}
