//! RPC method → service wiring. The router built here is the daemon's
//! complete method list.

use std::future::Future;
use std::sync::Arc;

use banger_rpc::{Ctx, Router, RpcError};
use banger_wire::helper::Ping;
use banger_wire::methods::*;
use banger_wire::{Empty, Method};

use crate::daemon::DaemonService;
use crate::dns::DnsService;
use crate::forward::ForwardService;
use crate::helper::HelperLink;
use crate::images::ImageService;
use crate::ops::Operations;
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

/// Route `M` to `f`, which gets the services, the request context and the params.
fn on<M, F, Fut>(router: Router, services: &Arc<Services>, f: F) -> Router
where
    M: Method,
    F: Fn(Arc<Services>, Ctx, M::Params) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<M::Result, RpcError>> + Send + 'static,
{
    router.route_with::<M, _, _, _>(services, f)
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
    r = on::<DaemonStatus, _, _>(r, s, |s, _, _| async move { Ok(s.daemon.status()) });
    r = on::<DaemonStop, _, _>(r, s, |s, _, _| async move {
        s.daemon.request_stop("daemon.stop");
        Ok(Empty {})
    });
    r = on::<HelperPing, _, _>(r, s, |s, ctx, p| async move {
        s.helper.call::<Ping>(&ctx.op_id, &p).await
    });
    r = on::<HostGc, _, _>(r, s, |s, ctx, p| async move {
        s.vms.gc(&ctx.op_id, p.dry_run).await
    });
    r = on::<OpStatus, _, _>(r, s, |s, _, p| async move { s.ops.status(&p.op_id) });

    r = on::<VmCreate, _, _>(r, s, |s, ctx, p| async move {
        s.vms.create(&ctx.op_id, p, &ctx.events).await
    });
    r = on::<VmList, _, _>(r, s, |s, _, _| async move { s.vms.list() });
    r = on::<VmShow, _, _>(r, s, |s, _, p| async move {
        Ok(s.vms.info(&s.vms.find(&p.name)?))
    });
    r = on::<VmStart, _, _>(r, s, |s, ctx, p| async move {
        let wait_ssh = !p.no_ssh_wait;
        each(p.names, |n| {
            let (s, ctx) = (s.clone(), ctx.clone());
            async move { s.vms.start(&ctx.op_id, &n, wait_ssh, &ctx.events).await }
        })
        .await
    });
    r = on::<VmStop, _, _>(r, s, |s, ctx, p| async move {
        each(p.names, |n| {
            let (s, ctx) = (s.clone(), ctx.clone());
            async move { s.vms.stop(&ctx.op_id, &n).await }
        })
        .await
    });
    r = on::<VmRestart, _, _>(r, s, |s, ctx, p| async move {
        let wait_ssh = !p.no_ssh_wait;
        each(p.names, |n| {
            let (s, ctx) = (s.clone(), ctx.clone());
            async move {
                s.vms.stop(&ctx.op_id, &n).await?;
                s.vms.start(&ctx.op_id, &n, wait_ssh, &ctx.events).await
            }
        })
        .await
    });
    r = on::<VmDelete, _, _>(r, s, |s, ctx, p| async move {
        let force = p.force;
        each(p.names, |n| {
            let (s, ctx) = (s.clone(), ctx.clone());
            async move { s.vms.delete(&ctx.op_id, &n, force).await }
        })
        .await
    });
    r = on::<VmSet, _, _>(
        r,
        s,
        |s, ctx, p| async move { s.vms.set(&ctx.op_id, p).await },
    );
    r = on::<VmAuthsync, _, _>(r, s, |s, _, p| async move { s.vms.authsync(&p.name).await });
    r = on::<VmPorts, _, _>(r, s, |s, _, p| async move { s.vms.ports(&p.name).await });
    r = on::<VmStats, _, _>(r, s, |s, _, p| async move { s.vms.stats(&p.name).await });
    r = on::<VmExec, _, _>(
        r,
        s,
        |s, ctx, p| async move { s.vms.exec(p, &ctx.events).await },
    );
    r = on::<VmExecInput, _, _>(r, s, |s, _, p| async move {
        s.vms
            .exec_input(&p.session, p.data.as_deref(), p.eof)
            .await
            .map(|()| Empty {})
    });
    r = on::<VmExecSignal, _, _>(r, s, |s, _, p| async move {
        s.vms.exec_signal(&p.session, p.signal).map(|()| Empty {})
    });

    r = on::<VmPortForwardAdd, _, _>(r, s, |s, _, p| async move {
        let vm = s.vms.find(&p.name)?;
        s.forwards
            .add(&vm, ForwardService::rows(&vm.id, &p.forwards)?)
            .await?;
        s.forwards.list(Some(&vm))
    });
    r = on::<VmPortForwardList, _, _>(r, s, |s, _, p| async move {
        match p.name {
            Some(n) => s.forwards.list(Some(&s.vms.find(&n)?)),
            None => s.forwards.list(None),
        }
    });
    r = on::<VmPortForwardRemove, _, _>(r, s, |s, _, p| async move {
        let vm = s.vms.find(&p.name)?;
        s.forwards
            .remove(&vm, p.bind.as_deref(), p.host_port)
            .map(|()| Empty {})
    });
    r = on::<NetworkDnsStatus, _, _>(r, s, |s, _, _| async move { Ok(s.dns.status()) });

    r = on::<ImageList, _, _>(r, s, |s, _, _| async move { s.images.list() });
    r = on::<ImageShow, _, _>(r, s, |s, _, p| async move {
        Ok(ImageService::info(&s.images.find(&p.name)?))
    });
    r = on::<ImageBuild, _, _>(r, s, |s, ctx, p| async move {
        let op = s.ops.begin(&ctx.op_id, "image_build", &p.name);
        let work = async {
            let r = s.images.build(&p.name, &op).await;
            op.finish(r.as_ref().map(|_| ()).map_err(|e| e.message.clone()));
            r
        };
        let (r, ()) = tokio::join!(work, op.follow(&ctx.events));
        Ok(ImageService::info(&r?))
    });
    r = on::<ImagePull, _, _>(r, s, |s, ctx, p| async move {
        let op = s.ops.begin(&ctx.op_id, "image_pull", &p.reference);
        let work = async {
            let r = s.images.pull(p, &op).await;
            op.finish(r.as_ref().map(|_| ()).map_err(|e| e.message.clone()));
            r
        };
        let (r, ()) = tokio::join!(work, op.follow(&ctx.events));
        Ok(ImageService::info(&r?))
    });
    r = on::<ImageImport, _, _>(r, s, |s, ctx, p| async move {
        let op = s.ops.begin(&ctx.op_id, "image_import", &p.path);
        let work = async {
            let r = s.images.import(p, &op).await;
            op.finish(r.as_ref().map(|_| ()).map_err(|e| e.message.clone()));
            r
        };
        let (r, ()) = tokio::join!(work, op.follow(&ctx.events));
        Ok(ImageService::info(&r?))
    });
    r = on::<ImageRegister, _, _>(r, s, |s, _, p| async move {
        Ok(ImageService::info(&s.images.register(p).await?))
    });
    r = on::<ImageDelete, _, _>(r, s, |s, _, p| async move {
        s.images.delete(&p.name).map(|()| Empty {})
    });
    on::<ImagePromote, _, _>(r, s, |s, _, p| async move { s.images.promote(&p.name) })
}
