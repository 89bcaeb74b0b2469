//! The daemon's services, wired once: what `bangerd` serves (and what the
//! `dispatch` fuzz target drives through the same [`router`](crate::routes::router)).

use std::sync::Arc;

use anyhow::Context;
use banger_config::{Config, Paths};
use banger_host::Accel;
use banger_vmm::firecracker::Firecracker;
use banger_vmm::qemu::Qemu;
use tracing::info;

use crate::daemon::DaemonService;
use crate::dns::DnsService;
use crate::forward::ForwardService;
use crate::helper::HelperLink;
use crate::images::ImageService;
use crate::network::{NetworkService, NetworkSettings};
use crate::ops::Operations;
use crate::proxy::SecretsProxy;
use crate::routes::Services;
use crate::secrets::SecretService;
use crate::sessions::SessionService;
use crate::ssh::SshKeys;
use crate::vms::{AccelPlan, Fault, VmService, VmSettings};
use crate::workspaces::WorkspaceService;

/// Open the store, wire every service for the installation at `paths`,
/// and settle what the last daemon left (reconcile, the journal); the
/// watcher and the accelerator's test boot start in the background.
/// `stop` is told when `daemon.stop` (or a signal) asks the daemon to go.
pub async fn services(
    paths: &Paths,
    config: &Config,
    fault: Option<Fault>,
    stop: tokio::sync::watch::Sender<bool>,
) -> anyhow::Result<Arc<Services>> {
    let store = banger_store::Store::open(paths.database())
        .with_context(|| format!("cannot open the database {}", paths.database().display()))?;
    let store = Arc::new(store);
    let accel = match (
        config.vmm.accel,
        banger_host::effective_accel(config.vmm.accel, &banger_host::kvm_status())?,
    ) {
        // KVM looks usable: the first boot confirms it can run the kernel.
        (banger_host::AccelSetting::Auto, Accel::Kvm) => AccelPlan::ProbeKvm,
        (_, accel) => AccelPlan::Fixed(accel),
    };
    let qemu_bin = banger_host::find_binary(&config.vmm.qemu_bin)
        .unwrap_or_else(|| config.vmm.qemu_bin.clone().into());
    let ops = Arc::new(Operations::new(store.clone()));
    let images = Arc::new(ImageService::new(
        store.clone(),
        &paths.state_dir,
        config.image.mirror.clone(),
        config.image.insecure_registries.clone(),
        banger_oci::Limits {
            max_bytes: config.image.max_unpack_bytes(),
            max_entries: config.image.max_unpack_entries,
        },
        fault.clone(),
    ));
    let helper = Arc::new(HelperLink::new(
        config.helper_socket(paths),
        paths.helper_log(),
        paths.state_dir.clone(),
    ));
    let root_disks = crate::vms::disks::decide(&helper, &paths.state_dir).await;
    // Names global to the host carry this install's mark.
    let install = paths.install_id();
    let host_names = banger_wire::methods::HostNames {
        bridge: config
            .network
            .bridge
            .clone()
            .unwrap_or_else(|| format!("banger-{install}")),
        nft_table: format!("banger-{install}"),
        first_cid: banger_net::first_cid_of_install(&install),
        install_id: install,
    };
    let settings = VmSettings {
        qemu: Qemu {
            bin: qemu_bin,
            machine: config.vmm.qemu_machine,
        },
        firecracker: banger_host::find_binary(&config.vmm.firecracker_bin)
            .map(|bin| Firecracker { bin }),
        accel,
        fault,
        stop_timeout: config.vm.stop_timeout(),
        console_log_max: config.vm.console_log_max_bytes(),
        pool_size: config.pool.size,
        root_disks,
        vhost_vsock: banger_host::vhost_vsock_usable(),
        first_cid: host_names.first_cid,
    };
    let subnet = match &config.network.subnet {
        None => None,
        Some(s) => Some(s.parse().with_context(|| {
            format!("config file {}: [network] subnet = {s:?} is not an IPv4 network like 172.30.0.0/24", paths.config_file.display())
        })?),
    };
    let default_policy: banger_net::Policy =
        config.network.default_policy.parse().with_context(|| {
            format!(
                "config file {}: [network] default_policy = {:?}",
                paths.config_file.display(),
                config.network.default_policy
            )
        })?;
    let dns = Arc::new(
        DnsService::new(&config.network.dns_suffix)
            .with_helper(helper.clone(), host_names.nft_table.clone()),
    );
    let forwards = Arc::new(ForwardService::new(store.clone()));
    let proxy = Arc::new(SecretsProxy::new(
        &paths.state_dir,
        &host_names.install_id,
        Arc::new(SecretService::new(
            &paths.state_dir,
            store.clone(),
            config.secrets.store,
        )),
        crate::proxy::upstream_config(config.secrets.upstream_ca.as_deref())
            .with_context(|| format!("config file {}", paths.config_file.display()))?,
    ));
    let net = Arc::new(NetworkService::new(
        helper.clone(),
        NetworkSettings {
            bridge: host_names.bridge.clone(),
            table: host_names.nft_table.clone(),
            subnet,
            tap_pool: config.network.tap_pool,
            default_policy,
            pool_record: paths.runtime_dir.join("tap-pool"),
        },
        dns.clone(),
        forwards.clone(),
        proxy,
    ));
    let ssh = SshKeys::ensure(&paths.state_dir)?;
    let vms = Arc::new(VmService::new(
        store.clone(),
        images.clone(),
        net,
        helper.clone(),
        ssh,
        ops.clone(),
        settings,
        &paths.state_dir,
    ));
    images.reconcile();
    vms.reconcile().await;
    // After reconcile has settled their VMs: what the journal still holds.
    ops.recover();
    tokio::spawn(vms.clone().watch());
    // Settle the accelerator now, not on the first create's critical path.
    tokio::spawn(vms.clone().settle_accel());
    // The warm pool fills in the background: the daemon answers meanwhile.
    tokio::spawn(vms.clone().keep_pool());
    let workspaces = Arc::new(WorkspaceService::new(
        vms.clone(),
        ops.clone(),
        store.clone(),
        &paths.state_dir,
    ));
    let sessions = Arc::new(SessionService::new(vms.clone(), store.clone()));
    sessions.reap_orphans();
    info!(?accel, "accelerator plan");
    let web = Arc::new(banger_web::WebAccess::open(&paths.state_dir)?);
    let services = Arc::new(Services {
        daemon: DaemonService::new(
            paths.daemon_socket(),
            paths.state_dir.clone(),
            paths.daemon_log(),
            host_names,
            stop,
            web.clone(),
        ),
        helper,
        ops,
        images,
        vms,
        dns,
        forwards,
        workspaces,
        sessions,
        web,
        config: config.clone(),
    });
    Ok(services)
}
