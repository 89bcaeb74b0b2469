//! RPC method → service wiring. The router built here is the daemon's
//! complete method list.

use std::future::Future;
use std::sync::Arc;

use banger_rpc::{Router, RpcError};
use banger_wire::Empty;
use banger_wire::helper::Ping;
use banger_wire::methods::*;

use crate::daemon::DaemonService;
use crate::dns::DnsService;
use crate::forward::ForwardService;
use crate::helper::HelperLink;
use crate::images::ImageService;
use crate::ops::{OpKind, Operations};
use crate::vms::VmService;

/// The services the daemon is made of. Each owns its state and locks.
#[derive(Debug)]
pub struct Services {
    pub daemon: DaemonService,
    pub helper: Arc<HelperLink>,
    pub ops: Arc<Operations>,
    pub images: Arc<ImageService>,
    pub vms: Arc<VmService>,
    pub dns: Arc<DnsService>,
    pub forwards: Arc<ForwardService>,
}

/// Apply `f` to each name in order, stopping at the first error.
async fn each<T, Fut: Future<Output = Result<T, RpcError>>>(
    names: Vec<String>,
    f: impl Fn(String) -> Fut,
) -> Result<Vec<T>, RpcError> {
    if names.is_empty() {
        return Err(RpcError::invalid_params("no VM names given"));
    }
    let mut out = Vec::with_capacity(names.len());
    for n in names {
        out.push(f(n).await?);
    }
    Ok(out)
}

pub fn router(services: Arc<Services>) -> Router {
    let s = &services;
    let mut r = Router::new();
    r = r.route_with::<DaemonStatus, _, _, _>(s, |s, _, _| async move { Ok(s.daemon.status()) });
    r = r.route_with::<DaemonStop, _, _, _>(s, |s, _, _| async move {
        s.daemon.request_stop("daemon.stop");
        Ok(Empty {})
    });
    r = r.route_with::<HelperPing, _, _, _>(s, |s, call, p| async move {
        s.helper.call::<Ping>(&call.op_id, &p).await
    });
    r = r.route_with::<HostGc, _, _, _>(s, |s, call, p| async move {
        s.vms.gc(&call.op_id, p.dry_run).await
    });
    r = r.route_with::<OpStatus, _, _, _>(s, |s, _, p| async move { s.ops.status(&p.op_id) });

    r = r.route_with::<VmCreate, _, _, _>(s, |s, call, p| async move {
        s.vms.create(&call.op_id, p, &call.events).await
    });
    r = r.route_with::<VmList, _, _, _>(s, |s, _, _| async move { s.vms.list() });
    r = r.route_with::<VmShow, _, _, _>(s, |s, _, p| async move {
        Ok(s.vms.info(&s.vms.find(&p.name)?))
    });
    r = r.route_with::<VmStart, _, _, _>(s, |s, call, p| async move {
        let wait_ssh = !p.no_ssh_wait;
        each(p.names, |n| {
            let (s, call) = (s.clone(), call.clone());
            async move { s.vms.start(&call.op_id, &n, wait_ssh, &call.events).await }
        })
        .await
    });
    r = r.route_with::<VmStop, _, _, _>(s, |s, call, p| async move {
        each(p.names, |n| {
            let (s, call) = (s.clone(), call.clone());
            async move { s.vms.stop(&call.op_id, &n, &call.events).await }
        })
        .await
    });
    r = r.route_with::<VmRestart, _, _, _>(s, |s, call, p| async move {
        let wait_ssh = !p.no_ssh_wait;
        each(p.names, |n| {
            let (s, call) = (s.clone(), call.clone());
            async move {
                s.vms.stop(&call.op_id, &n, &call.events).await?;
                s.vms.start(&call.op_id, &n, wait_ssh, &call.events).await
            }
        })
        .await
    });
    r = r.route_with::<VmDelete, _, _, _>(s, |s, call, p| async move {
        let force = p.force;
        each(p.names, |n| {
            let (s, call) = (s.clone(), call.clone());
            async move { s.vms.delete(&call.op_id, &n, force, &call.events).await }
        })
        .await
    });
    r = r.route_with::<VmSet, _, _, _>(
        s,
        |s, call, p| async move { s.vms.set(&call.op_id, p).await },
    );
    r = r.route_with::<VmAuthsync, _, _, _>(
        s,
        |s, _, p| async move { s.vms.authsync(&p.name).await },
    );
    r = r.route_with::<VmPorts, _, _, _>(s, |s, _, p| async move { s.vms.ports(&p.name).await });
    r = r.route_with::<VmStats, _, _, _>(s, |s, _, p| async move { s.vms.stats(&p.name).await });
    r = r.route_with::<VmExec, _, _, _>(s, |s, call, p| async move {
        s.vms.exec(p, &call.events).await
    });
    r = r.route_with::<VmExecInput, _, _, _>(s, |s, _, p| async move {
        s.vms
            .exec_input(&p.session, p.data.as_deref(), p.eof)
            .await
            .map(|()| Empty {})
    });
    r = r.route_with::<VmExecSignal, _, _, _>(s, |s, _, p| async move {
        s.vms.exec_signal(&p.session, p.signal).map(|()| Empty {})
    });

    r = r.route_with::<VmPortForwardAdd, _, _, _>(s, |s, _, p| async move {
        let vm = s.vms.find(&p.name)?;
        s.forwards
            .add(&vm, ForwardService::rows(&vm.id, &p.forwards)?)
            .await?;
        s.forwards.list(Some(&vm))
    });
    r = r.route_with::<VmPortForwardList, _, _, _>(s, |s, _, p| async move {
        match p.name {
            Some(n) => s.forwards.list(Some(&s.vms.find(&n)?)),
            None => s.forwards.list(None),
        }
    });
    r = r.route_with::<VmPortForwardRemove, _, _, _>(s, |s, _, p| async move {
        let vm = s.vms.find(&p.name)?;
        s.forwards
            .remove(&vm, p.bind.as_deref(), p.host_port)
            .map(|()| Empty {})
    });
    r = r.route_with::<NetworkDnsStatus, _, _, _>(s, |s, _, _| async move { Ok(s.dns.status()) });

    r = r.route_with::<ImageList, _, _, _>(s, |s, _, _| async move { s.images.list() });
    r = r.route_with::<ImageShow, _, _, _>(s, |s, _, p| async move {
        Ok(ImageService::info(&s.images.find(&p.name)?))
    });
    r = r.route_with::<ImageBuild, _, _, _>(s, |s, call, p| async move {
        let images = s.images.clone();
        let subject = p.name.clone();
        let image = s
            .ops
            .run(
                &call.op_id,
                OpKind::ImageBuild,
                &subject,
                &call.events,
                |op| async move { images.build(&p.name, &op).await },
            )
            .await?;
        Ok(ImageService::info(&image))
    });
    r = r.route_with::<ImagePull, _, _, _>(s, |s, call, p| async move {
        let images = s.images.clone();
        let subject = p.reference.clone();
        let image = s
            .ops
            .run(
                &call.op_id,
                OpKind::ImagePull,
                &subject,
                &call.events,
                |op| async move { images.pull(p, &op).await },
            )
            .await?;
        Ok(ImageService::info(&image))
    });
    r = r.route_with::<ImageImport, _, _, _>(s, |s, call, p| async move {
        let images = s.images.clone();
        let subject = p.path.clone();
        let image = s
            .ops
            .run(
                &call.op_id,
                OpKind::ImageImport,
                &subject,
                &call.events,
                |op| async move { images.import(p, &op).await },
            )
            .await?;
        Ok(ImageService::info(&image))
    });
    r = r.route_with::<ImageRegister, _, _, _>(s, |s, _, p| async move {
        Ok(ImageService::info(&s.images.register(p).await?))
    });
    r = r.route_with::<ImageDelete, _, _, _>(s, |s, _, p| async move {
        s.images.delete(&p.name).map(|()| Empty {})
    });
    r.route_with::<ImagePromote, _, _, _>(s, |s, _, p| async move { s.images.promote(&p.name) })
}
