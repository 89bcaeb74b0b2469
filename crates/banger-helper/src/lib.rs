//! `banger-helper`'s methods: [`router`] serves exactly
//! [`banger_wire::helper::ALL`] over a [`NetService`] and a [`DiskService`]
//! (the binary's on the real host; tests and the `dispatch` fuzz target
//! put them on the recording fakes).

mod disk;
pub mod fault;
mod net;

use std::sync::Arc;
use std::time::Instant;

use banger_disk::{DiskService, HostDisk};
use banger_net::{HostNet, NetService};
use banger_rpc::Router;
use banger_wire::helper::{Ping, PingResult, Version, VersionResult};

/// Every helper method: `ping`, `version`, `net.*` and `disk.*`.
pub fn router<N: HostNet, D: HostDisk>(net: NetService<N>, disks: DiskService<D>) -> Router {
    let started = Instant::now();
    let router = Router::new()
        .route::<Ping, _, _>(move |_ctx, _| async move {
            Ok(PingResult {
                pid: std::process::id(),
                euid: rustix::process::geteuid().as_raw(),
                version: env!("CARGO_PKG_VERSION").into(),
                uptime_s: started.elapsed().as_secs(),
            })
        })
        .route::<Version, _, _>(|_ctx, _| async move {
            Ok(VersionResult {
                version: env!("CARGO_PKG_VERSION").into(),
                protocol: banger_wire::PROTOCOL_VERSION,
            })
        });
    let router = net::route(router, Arc::new(net));
    let router = disk::route(router, Arc::new(disks));
    debug_assert_eq!(router.methods(), {
        let mut all = banger_wire::helper::ALL.to_vec();
        all.sort_unstable();
        all
    });
    router
}
