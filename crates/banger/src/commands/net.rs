//! `banger vm net show|set|log`.

use banger_wire::methods::{
    VmName, VmNetDest, VmNetInfo, VmNetLogMethod, VmNetLogParams, VmNetSet, VmNetSetParams,
    VmNetShow,
};

use crate::context::Invocation;
use crate::error::CliError;
use crate::out::outln;

fn print(ctx: &Invocation, info: &VmNetInfo) -> Result<u8, CliError> {
    if ctx.json {
        super::print_json(info)?;
    } else {
        outln!("{}", info.policy);
    }
    Ok(0)
}

pub async fn show(ctx: &Invocation, name: &str) -> Result<u8, CliError> {
    let info = ctx.call::<VmNetShow>(&VmName { name: name.into() }).await?;
    print(ctx, &info)
}

pub async fn set(ctx: &Invocation, name: String, policy: String) -> Result<u8, CliError> {
    let info = ctx
        .call::<VmNetSet>(&VmNetSetParams { name, policy })
        .await?;
    print(ctx, &info)
}

pub async fn log(ctx: &Invocation, name: String, suggest: bool) -> Result<u8, CliError> {
    let log = ctx
        .call::<VmNetLogMethod>(&VmNetLogParams { name, suggest })
        .await?;
    if ctx.json {
        super::print_json(&log)?;
    } else if let Some(s) = &log.suggestion {
        outln!("{s}");
    } else {
        outln!("policy: {}", log.policy);
        let line = |d: &VmNetDest| {
            let names = if d.names.is_empty() {
                String::new()
            } else {
                format!(" ({})", d.names.join(", "))
            };
            format!("{} {}:{}{names}", d.proto, d.addr, d.port)
        };
        if !log.destinations.is_empty() {
            outln!("used:");
            for d in &log.destinations {
                outln!("  {}", line(d));
            }
        }
        outln!("denied: {} packets", log.denied_packets);
        for d in &log.denied {
            outln!("  {} ({} packets)", line(&d.dest), d.packets);
        }
    }
    Ok(0)
}
