//! `banger vm snapshot` and `banger snapshot …`.

use banger_wire::NoParams;
use banger_wire::methods::*;

use super::progress::Progress;
use crate::context::Invocation;
use crate::error::CliError;
use crate::out::outln;

/// `vm snapshot VM [--name SNAP]`, showing its stages.
pub async fn take(
    ctx: &Invocation,
    vm: String,
    name: Option<String>,
    quiet: bool,
) -> Result<u8, CliError> {
    let progress = Progress {
        json: ctx.json,
        quiet,
        json_to_stderr: false,
    };
    let mut client = ctx.daemon().await?;
    let s = client
        .call_with_events::<VmSnapshot>(
            &VmSnapshotParams { vm, name },
            Some(&ctx.op_id),
            |op, ev| progress.event(op, ev),
        )
        .await
        .map_err(|e| CliError::from_client(&ctx.op_id, e))?;
    if ctx.json {
        outln!("{}", serde_json::json!({ "op_id": ctx.op_id, "result": s }));
    } else {
        outln!(
            "snapshot {} of {} ({}, {} on disk)",
            s.name,
            s.source_vm,
            s.id,
            size(s.disk_bytes)
        );
    }
    Ok(0)
}

/// `vm fork VM [--count N] [--name PREFIX]`, showing its stages.
pub async fn fork(ctx: &Invocation, params: VmForkParams, quiet: bool) -> Result<u8, CliError> {
    let progress = Progress {
        json: ctx.json,
        quiet,
        json_to_stderr: false,
    };
    let mut client = ctx.daemon().await?;
    let r = client
        .call_with_events::<VmFork>(&params, Some(&ctx.op_id), |op, ev| progress.event(op, ev))
        .await
        .map_err(|e| CliError::from_client(&ctx.op_id, e))?;
    if ctx.json {
        outln!("{}", serde_json::json!({ "op_id": ctx.op_id, "result": r }));
    } else {
        for v in &r.vms {
            outln!(
                "{} {} ({})",
                v.name,
                v.guest_ip.as_deref().unwrap_or("-"),
                v.id
            );
        }
        outln!(
            "forked from snapshot {} of {} (banger snapshot delete {} once the forks are gone)",
            r.snapshot.name,
            r.snapshot.source_vm,
            r.snapshot.name
        );
    }
    Ok(0)
}

fn size(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

pub(super) fn created(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

pub async fn list(ctx: &Invocation) -> Result<u8, CliError> {
    let all = ctx.call::<SnapshotList>(&NoParams {}).await?;
    if ctx.json {
        super::print_json(&all)?;
        return Ok(0);
    }
    outln!(
        "{:<24} {:<9} {:<20} {:<12} {:>11} {:<23} ID",
        "NAME",
        "STATE",
        "SOURCE VM",
        "IMAGE",
        "ON DISK",
        "CREATED"
    );
    for s in &all {
        outln!(
            "{:<24} {:<9} {:<20} {:<12} {:>11} {:<23} {}",
            s.name,
            s.state,
            s.source_vm,
            s.image,
            size(s.disk_bytes),
            created(s.created_at_ms),
            s.id
        );
    }
    Ok(0)
}

pub async fn show(ctx: &Invocation, name: &str) -> Result<u8, CliError> {
    let s = ctx
        .call::<SnapshotShow>(&SnapshotName { name: name.into() })
        .await?;
    if ctx.json {
        return super::print_json(&s).map(|()| 0);
    }
    outln!("name:        {}", s.name);
    outln!("id:          {}", s.id);
    outln!("state:       {}", s.state);
    outln!("source VM:   {}", s.source_vm);
    outln!("image:       {}", s.image);
    outln!("vmm:         {} ({})", s.vmm, s.vmm_version);
    if !s.accel.is_empty() {
        outln!("accelerator: {}", s.accel);
    }
    if !s.cpu.is_empty() {
        outln!("host CPU:    {}", s.cpu);
    }
    outln!(
        "memory:      {}",
        match s.memory.as_str() {
            "file" => "memory.ram, mapped copy-on-write by its restores",
            _ => "in the state file, read whole by each restore",
        }
    );
    outln!(
        "size:        {} vCPUs, {} MiB memory, {} MiB work disk",
        s.vcpus,
        s.memory_mib,
        s.disk_mib
    );
    outln!("on disk:     {}", size(s.disk_bytes));
    outln!("created:     {}", created(s.created_at_ms));
    outln!("dir:         {}", s.dir);
    if !s.used_by.is_empty() {
        outln!("used by:     {}", s.used_by.join(", "));
    }
    if !s.secrets.is_empty() {
        outln!("secrets:     {}", s.secrets.join(", "));
    }
    Ok(0)
}

pub async fn delete(ctx: &Invocation, name: &str) -> Result<u8, CliError> {
    ctx.call::<SnapshotDelete>(&SnapshotName { name: name.into() })
        .await?;
    if ctx.json {
        super::print_json(&serde_json::json!({ "deleted": name }))?;
    } else {
        outln!("deleted snapshot {name}");
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn creation_times_print_as_utc() {
        assert_eq!(super::created(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(super::created(1_796_428_800_000), "2026-12-05 00:00:00 UTC");
    }
}
