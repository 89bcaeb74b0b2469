//! RPC method → service wiring. The router built here is the daemon's
//! complete method list.

use std::future::Future;
use std::sync::Arc;

use banger_rpc::{Call, Router, RpcError};
use banger_wire::Empty;
use banger_wire::Method;
use banger_wire::helper::Ping;
use banger_wire::methods::*;

use crate::daemon::DaemonService;
use crate::dns::DnsService;
use crate::forward::ForwardService;
use crate::helper::HelperLink;
use crate::images::{ImageError, ImageService};
use crate::ops::{OpKind, Operations};
use crate::sessions::SessionService;
use crate::vms::VmService;
use crate::workspaces::WorkspaceService;

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
    pub workspaces: Arc<WorkspaceService>,
    pub sessions: Arc<SessionService>,
    /// The web UI's credentials and address (`web.login`).
    pub web: Arc<banger_web::WebAccess>,
    /// The configuration the daemon started with (`host.doctor`).
    pub config: banger_config::Config,
}

/// Apply `f` to each name in order, stopping at the first error.
async fn each<T, E: Into<RpcError>, Fut: Future<Output = Result<T, E>>>(
    names: Vec<String>,
    f: impl Fn(String) -> Fut,
) -> Result<Vec<T>, RpcError> {
    if names.is_empty() {
        return Err(RpcError::invalid_params("no VM names given"));
    }
    let mut out = Vec::with_capacity(names.len());
    for n in names {
        out.push(f(n).await.map_err(Into::into)?);
    }
    Ok(out)
}

/// Serve `M` with `handler`. This is where a service's own error becomes
/// the wire error (`errors.rs` has the conversions): services never build
/// an `RpcError`.
fn route<M, E, F, Fut>(r: Router, s: &Arc<Services>, handler: F) -> Router
where
    M: Method,
    E: Into<RpcError>,
    F: Fn(Arc<Services>, Call, M::Params) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<M::Result, E>> + Send + 'static,
{
    r.route_with::<M, _, _, _>(s, move |s, call, p| {
        let work = handler(s, call, p);
        async move { work.await.map_err(Into::into) }
    })
}

pub fn router(services: Arc<Services>) -> Router {
    let s = &services;
    let mut r = Router::new();
    r = route::<DaemonStatus, _, _, _>(r, s, |s, _, _| async move {
        Ok::<_, RpcError>(s.daemon.status())
    });
    r = route::<DaemonStop, _, _, _>(r, s, |s, _, _| async move {
        s.daemon.request_stop("daemon.stop");
        Ok::<_, RpcError>(Empty {})
    });
    r = route::<WebLogin, _, _, _>(r, s, |s, _, _| async move {
        s.web
            .login_url()
            .map(|url| WebLoginResult { url })
            .map_err(RpcError::unavailable)
    });
    r = route::<HostDoctor, _, _, _>(r, s, |s, call, _| async move {
        Ok::<_, RpcError>(crate::doctor::report(&s, &call.op_id).await)
    });
    r = route::<HelperPing, _, _, _>(r, s, |s, call, p| async move {
        s.helper.call::<Ping>(&call.op_id, &p).await
    });
    r = route::<HostGc, _, _, _>(r, s, |s, call, p| async move {
        s.vms.gc(&call.op_id, p.dry_run).await
    });
    r = route::<OpStatus, _, _, _>(r, s, |s, _, p| async move { s.ops.status(&p.op_id) });
    r = route::<OpFollow, _, _, _>(r, s, |s, call, p| async move {
        s.ops.follow(&p.op_id, &call.events).await
    });
    r = route::<OpCancel, _, _, _>(r, s, |s, _, p| async move {
        s.ops
            .cancel(&p.op_id)
            .map(|cancelled| OpCancelResult { cancelled })
    });

    r = route::<VmCreate, _, _, _>(r, s, |s, call, p| async move {
        let claim = match &p.session {
            Some(id) => Some(s.sessions.attach(id, p.name.as_deref())?),
            None => None,
        };
        Ok::<_, RpcError>(s.vms.create(&call.op_id, p, &call.events, claim).await?)
    });
    r = route::<SessionHold, _, _, _>(r, s, |s, call, p| async move {
        let held = SessionEvent {
            held: p.session.clone(),
        };
        s.sessions
            .hold(
                &call.op_id,
                p.session,
                async || call.events.send(&held).await,
                call.caller_gone(),
            )
            .await
            .map(|()| Empty {})
    });
    r = route::<VmSnapshot, _, _, _>(r, s, |s, call, p| async move {
        s.vms.snapshot(&call.op_id, p, &call.events).await
    });
    r = route::<VmFork, _, _, _>(r, s, |s, call, p| async move {
        s.vms.fork(&call.op_id, p, &call.events).await
    });
    r = route::<SnapshotList, _, _, _>(r, s, |s, _, _| async move { s.vms.snapshot_list() });
    r = route::<SnapshotShow, _, _, _>(r, s, |s, _, p| async move { s.vms.snapshot_show(&p.name) });
    r = route::<SnapshotDelete, _, _, _>(r, s, |s, _, p| async move {
        s.vms.snapshot_delete(&p.name).map(|()| Empty {})
    });
    r = route::<VmList, _, _, _>(r, s, |s, _, p| async move { s.vms.list(p.all) });
    r = route::<VmShow, _, _, _>(r, s, |s, _, p| async move { s.vms.show(&p.name).await });
    r = route::<VmStart, _, _, _>(r, s, |s, call, p| async move {
        let wait_ssh = !p.no_ssh_wait;
        each(p.names, |n| {
            let (s, call) = (s.clone(), call.clone());
            async move { s.vms.start(&call.op_id, &n, wait_ssh, &call.events).await }
        })
        .await
    });
    r = route::<VmStop, _, _, _>(r, s, |s, call, p| async move {
        each(p.names, |n| {
            let (s, call) = (s.clone(), call.clone());
            async move { s.vms.stop(&call.op_id, &n, &call.events).await }
        })
        .await
    });
    r = route::<VmPause, _, _, _>(r, s, |s, call, p| async move {
        each(p.names, |n| {
            let (s, call) = (s.clone(), call.clone());
            async move { s.vms.set_paused(&call.op_id, &n, true).await }
        })
        .await
    });
    r = route::<VmResume, _, _, _>(r, s, |s, call, p| async move {
        each(p.names, |n| {
            let (s, call) = (s.clone(), call.clone());
            async move { s.vms.set_paused(&call.op_id, &n, false).await }
        })
        .await
    });
    r = route::<VmRestart, _, _, _>(r, s, |s, call, p| async move {
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
    r = route::<VmDelete, _, _, _>(r, s, |s, call, p| async move {
        let force = p.force;
        each(p.names, |n| {
            let (s, call) = (s.clone(), call.clone());
            async move {
                let deleted = s.vms.delete(&call.op_id, &n, force, &call.events).await?;
                s.sessions.forget(&n);
                Ok::<_, RpcError>(deleted)
            }
        })
        .await
    });
    r = route::<VmSet, _, _, _>(
        r,
        s,
        |s, call, p| async move { s.vms.set(&call.op_id, p).await },
    );
    r = route::<VmNetShow, _, _, _>(r, s, |s, _, p| async move { s.vms.net_show(&p.name) });
    r = route::<VmNetSet, _, _, _>(r, s, |s, call, p| async move {
        s.vms.net_set(&call.op_id, p).await
    });
    r = route::<VmNetLogMethod, _, _, _>(r, s, |s, call, p| async move {
        s.vms.net_log(&call.op_id, p).await
    });
    r = route::<VmAuthsync, _, _, _>(r, s, |s, _, p| async move { s.vms.authsync(&p.name).await });
    r = route::<VmPorts, _, _, _>(r, s, |s, _, p| async move { s.vms.ports(&p.name).await });
    r = route::<VmStats, _, _, _>(r, s, |s, _, p| async move { s.vms.stats(&p.name).await });
    r = route::<VmExec, _, _, _>(r, s, |s, call, p| async move {
        s.vms.exec(p, &call.events).await
    });
    r = route::<WorkspacePrepare, _, _, _>(r, s, |s, call, p| async move {
        s.workspaces.prepare(&call.op_id, p, &call.events).await
    });
    r = route::<WorkspaceExport, _, _, _>(r, s, |s, call, p| async move {
        s.workspaces.export(&call.op_id, p, &call.events).await
    });
    r = route::<WorkspaceStatus, _, _, _>(
        r,
        s,
        |s, _, p| async move { s.workspaces.status(p).await },
    );
    r = route::<VmExecInput, _, _, _>(r, s, |s, _, p| async move {
        s.vms
            .exec_input(&p.session, p.data.as_deref(), p.eof)
            .await
            .map(|()| Empty {})
    });
    r = route::<VmExecSignal, _, _, _>(r, s, |s, _, p| async move {
        s.vms.exec_signal(&p.session, p.signal).map(|()| Empty {})
    });
    r = route::<VmExecResize, _, _, _>(r, s, |s, _, p| async move {
        s.vms
            .exec_resize(&p.session, p.cols, p.rows)
            .map(|()| Empty {})
    });

    r = route::<VmPortForwardAdd, _, _, _>(r, s, |s, _, p| async move {
        let vm = s.vms.find(&p.name)?;
        s.forwards
            .add(&vm, ForwardService::rows(&vm.id, &p.forwards)?)
            .await?;
        Ok::<_, RpcError>(s.forwards.list(Some(&vm))?)
    });
    r = route::<VmPortForwardList, _, _, _>(r, s, |s, _, p| async move {
        let vm = match p.name {
            Some(n) => Some(s.vms.find(&n)?),
            None => None,
        };
        Ok::<_, RpcError>(s.forwards.list(vm.as_ref())?)
    });
    r = route::<VmPortForwardRemove, _, _, _>(r, s, |s, _, p| async move {
        let vm = s.vms.find(&p.name)?;
        s.forwards.remove(&vm, p.bind.as_deref(), p.host_port)?;
        Ok::<_, RpcError>(Empty {})
    });
    r = route::<SecretSet, _, _, _>(r, s, |s, _, p| async move {
        s.vms.secrets().set(&p.name, &p.value).await
    });
    r = route::<SecretList, _, _, _>(r, s, |s, _, _| async move { s.vms.secrets().list() });
    r = route::<SecretRm, _, _, _>(r, s, |s, _, p| async move {
        s.vms.secrets().remove(&p.name).await.map(|()| Empty {})
    });
    r = route::<NetworkDnsStatus, _, _, _>(r, s, |s, _, _| async move {
        Ok::<_, RpcError>(s.dns.status())
    });

    r = route::<ImageList, _, _, _>(r, s, |s, _, _| async move { s.images.list() });
    r = route::<ImageShow, _, _, _>(r, s, |s, _, p| async move {
        Ok::<_, ImageError>(ImageService::info(&s.images.find(&p.name)?))
    });
    r = route::<ImageBuild, _, _, _>(r, s, |s, call, p| async move {
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
        Ok::<_, ImageError>(ImageService::info(&image))
    });
    r = route::<ImagePull, _, _, _>(r, s, |s, call, p| async move {
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
        Ok::<_, ImageError>(ImageService::info(&image))
    });
    r = route::<ImageImport, _, _, _>(r, s, |s, call, p| async move {
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
        Ok::<_, ImageError>(ImageService::info(&image))
    });
    r = route::<ImageRegister, _, _, _>(r, s, |s, _, p| async move {
        Ok::<_, ImageError>(ImageService::info(&s.images.register(p).await?))
    });
    r = route::<ImageDelete, _, _, _>(r, s, |s, _, p| async move {
        s.images.delete(&p.name).map(|()| Empty {})
    });
    route::<ImagePromote, _, _, _>(r, s, |s, _, p| async move { s.images.promote(&p.name) })
}
