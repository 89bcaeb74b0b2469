//! `banger doctor`: what this host has and lacks, each with a one-line fix.

use crate::out::outln;
use banger_host::{Check, CheckStatus, DnsServer, DoctorInputs, run_checks};
use banger_wire::NoParams;
use banger_wire::methods::{GcParams, HelperPing, HostGc, NetworkDnsStatus, VmList, VmListParams};
use serde_json::json;

use crate::context::Invocation;
use crate::error::CliError;
use crate::exit;

pub async fn run(ctx: &Invocation) -> Result<u8, CliError> {
    let config = ctx.config()?;
    // The helper is reached the way every privileged call reaches it: through the daemon.
    let helper = match ctx.call::<HelperPing>(&NoParams {}).await {
        Ok(p) => Ok(format!(
            "pid {}, version {}, euid {}",
            p.pid, p.version, p.euid
        )),
        Err(e) => Err(e.to_string()),
    };
    let mut checks = run_checks(&DoctorInputs {
        firecracker_bin: config.vmm.firecracker_bin.clone(),
        qemu_bin: config.vmm.qemu_bin.clone(),
        accel: config.vmm.accel,
        state_dir: ctx.paths.state_dir.clone(),
        helper,
    });
    checks.push(dns_check(ctx).await);
    checks.push(leak_check(ctx).await);
    checks.push(pool_check(ctx, config.pool.size).await);
    let failed = checks
        .iter()
        .filter(|c| c.status == CheckStatus::Fail)
        .count();
    let warned = checks
        .iter()
        .filter(|c| c.status == CheckStatus::Warn)
        .count();
    if ctx.json {
        super::print_json(
            &json!({ "checks": checks, "failed": failed, "warned": warned, "op_id": ctx.op_id }),
        )?;
    } else {
        print_table(&checks, ctx.color())?;
        outln!();
        outln!(
            "{} checks: {} failed, {} warnings",
            checks.len(),
            failed,
            warned
        );
    }
    Ok(if failed > 0 { exit::FAILED } else { 0 })
}

fn print_table(checks: &[Check], color: bool) -> Result<(), CliError> {
    let width = checks.iter().map(|c| c.title.len()).max().unwrap_or(0);
    for c in checks {
        let (label, code) = match c.status {
            CheckStatus::Pass => ("PASS", "32"),
            CheckStatus::Warn => ("WARN", "33"),
            CheckStatus::Fail => ("FAIL", "31"),
        };
        let label = if color {
            format!("\x1b[{code}m{label}\x1b[0m")
        } else {
            label.to_string()
        };
        outln!("{label}  {:width$}  {}", c.title, c.detail);
        if let Some(fix) = &c.fix {
            outln!("      {:width$}  fix: {fix}", "");
        }
    }
    Ok(())
}

/// The daemon's DNS server for VM names (it binds port 53 on the bridge).
async fn dns_check(ctx: &Invocation) -> Check {
    let server = match ctx.call::<NetworkDnsStatus>(&NoParams {}).await {
        Ok(s) => match (s.state.as_str(), s.address, s.error) {
            ("serving", Some(address), _) => DnsServer::Serving {
                address,
                suffix: s.suffix,
            },
            ("failed", _, error) => {
                DnsServer::Failed(error.unwrap_or_else(|| "unknown error".into()))
            }
            _ => DnsServer::NotStarted { suffix: s.suffix },
        },
        Err(e) => DnsServer::Unknown(e.to_string()),
    };
    banger_host::dns_check(&server)
}

/// The warm pool's guests (`vm list --all` less `vm list`) against
/// `[pool] size`.
async fn pool_check(ctx: &Invocation, size: usize) -> Check {
    let count = async {
        let all = ctx.call::<VmList>(&VmListParams { all: true }).await?;
        let mine = ctx.call::<VmList>(&VmListParams::default()).await?;
        Ok::<_, CliError>(all.len() - mine.len())
    };
    let (status, detail, fix) = match count.await {
        Ok(n) => (
            CheckStatus::Pass,
            format!("{n} guest(s) of [pool] size = {size} (banger vm list --all shows them)"),
            None,
        ),
        Err(e) => (
            CheckStatus::Warn,
            format!("could not count them: {e}"),
            Some("see banger daemon logs".to_string()),
        ),
    };
    Check {
        id: "pool",
        title: "Warm pool".into(),
        status,
        detail,
        fix,
    }
}

/// The same leak check `banger gc` runs, as a doctor row.
async fn leak_check(ctx: &Invocation) -> Check {
    let (status, detail, fix) = match ctx.call::<HostGc>(&GcParams { dry_run: true }).await {
        Ok(leaks) if leaks.is_empty() => (
            CheckStatus::Pass,
            "no leaked VM dirs, rows, processes, taps, snapshots or loop devices".to_string(),
            None,
        ),
        Ok(leaks) => (
            CheckStatus::Warn,
            format!(
                "{} leaked resource(s): {}",
                leaks.len(),
                leaks
                    .iter()
                    .map(|l| format!("{} {}", l.kind, l.name))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Some("banger gc (banger gc --dry-run lists them)".to_string()),
        ),
        Err(e) => (
            CheckStatus::Warn,
            format!("could not run the leak check: {e}"),
            Some("see banger daemon logs".to_string()),
        ),
    };
    Check {
        id: "leaks",
        title: "Leaked resources".into(),
        status,
        detail,
        fix,
    }
}
