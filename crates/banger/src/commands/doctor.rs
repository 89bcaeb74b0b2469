//! `banger doctor`: what this host has and lacks, each with a one-line fix.
//! The daemon runs the checks (`host.doctor`, the web UI's doctor page too);
//! when no daemon answers, the same report is made here, saying why.

use crate::out::outln;
use banger_host::{DaemonFacts, DoctorInputs, doctor_report, wire_report};
use banger_wire::NoParams;
use banger_wire::methods::{CheckLevel, DoctorCheck, DoctorReport, HostDoctor};
use serde_json::json;

use crate::context::Invocation;
use crate::error::CliError;
use crate::exit;

pub async fn run(ctx: &Invocation) -> Result<u8, CliError> {
    let report = match ctx.call::<HostDoctor>(&NoParams {}).await {
        Ok(r) => r,
        Err(e) => without_daemon(ctx, &e.to_string())?,
    };
    if ctx.json {
        super::print_json(&json!({
            "checks": report.checks,
            "failed": report.failed,
            "warned": report.warned,
            "op_id": ctx.op_id,
        }))?;
    } else {
        print_table(&report.checks, ctx.color())?;
        outln!();
        outln!(
            "{} checks: {} failed, {} warnings",
            report.checks.len(),
            report.failed,
            report.warned
        );
    }
    Ok(if report.failed > 0 { exit::FAILED } else { 0 })
}

/// The report with the daemon unreachable (`why`): the host's checks, and
/// the daemon's rows saying it could not be asked.
fn without_daemon(ctx: &Invocation, why: &str) -> Result<DoctorReport, CliError> {
    let config = ctx.config()?;
    let checks = doctor_report(
        &DoctorInputs {
            firecracker_bin: config.vmm.firecracker_bin.clone(),
            qemu_bin: config.vmm.qemu_bin.clone(),
            accel: config.vmm.accel,
            state_dir: ctx.paths.state_dir.clone(),
            helper: Err(why.to_string()),
        },
        &DaemonFacts::unreachable(why),
    );
    Ok(wire_report(&checks))
}

fn print_table(checks: &[DoctorCheck], color: bool) -> Result<(), CliError> {
    let width = checks.iter().map(|c| c.title.len()).max().unwrap_or(0);
    for c in checks {
        let (label, code) = match c.status {
            CheckLevel::Pass => ("PASS", "32"),
            CheckLevel::Warn => ("WARN", "33"),
            CheckLevel::Fail => ("FAIL", "31"),
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
