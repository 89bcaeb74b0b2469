//! `host.doctor`: the doctor report (`banger_host::doctor_report`, the one
//! list of checks) with what the daemon knows: its helper, DNS server,
//! leaks, web UI and warm pool.

use banger_host::{DaemonFacts, DnsServer, DoctorInputs, WebUi, doctor_report, wire_report};
use banger_wire::OpId;
use banger_wire::helper::Ping;
use banger_wire::methods::DoctorReport;

use crate::routes::Services;

pub async fn report(s: &Services, op_id: &OpId) -> DoctorReport {
    let helper = match s
        .helper
        .call::<Ping>(op_id, &banger_wire::NoParams {})
        .await
    {
        Ok(p) => Ok(format!(
            "pid {}, version {}, euid {}",
            p.pid, p.version, p.euid
        )),
        Err(e) => Err(e.to_string()),
    };
    let config = &s.config;
    let inputs = DoctorInputs {
        firecracker_bin: config.vmm.firecracker_bin.clone(),
        qemu_bin: config.vmm.qemu_bin.clone(),
        accel: config.vmm.accel,
        state_dir: s.daemon.state_dir().to_path_buf(),
        helper,
    };
    let st = s.dns.status();
    let dns = match (st.state.as_str(), st.address, st.error) {
        ("serving", Some(address), _) => DnsServer::Serving {
            address,
            suffix: st.suffix,
        },
        ("failed", _, error) => DnsServer::Failed(error.unwrap_or_else(|| "unknown error".into())),
        _ => DnsServer::NotStarted { suffix: st.suffix },
    };
    let leaks = match s.vms.gc(op_id, true).await {
        Ok(leaks) => Ok(leaks
            .iter()
            .map(|l| format!("{} {}", l.kind, l.name))
            .collect()),
        Err(e) => Err(banger_rpc::error_chain(&e)),
    };
    let web = match (s.web.url(), s.web.failed()) {
        (Some(url), _) => WebUi::Served(url),
        (None, Some(why)) => WebUi::Failed(why.to_string()),
        (None, None) => WebUi::Disabled,
    };
    let pool = match (s.vms.list(true), s.vms.list(false)) {
        (Ok(all), Ok(mine)) => Ok((all.len() - mine.len(), config.pool.size)),
        (Err(e), _) | (_, Err(e)) => Err(banger_rpc::error_chain(&e)),
    };
    let facts = DaemonFacts {
        dns,
        leaks,
        web,
        pool,
    };
    // The host probes read files and run binaries: off the async workers.
    let checks = tokio::task::spawn_blocking(move || doctor_report(&inputs, &facts))
        .await
        .unwrap_or_default();
    wire_report(&checks)
}
