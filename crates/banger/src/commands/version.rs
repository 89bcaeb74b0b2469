use crate::out::outln;
use banger_wire::NoParams;
use banger_wire::methods::DaemonStatus;
use serde_json::json;

use crate::context::Invocation;
use crate::error::CliError;

/// `banger --version`: this CLI's version and, if one runs, the daemon's.
/// Never starts a daemon.
pub async fn run(ctx: &Invocation) -> Result<u8, CliError> {
    let cli = env!("CARGO_PKG_VERSION");
    let daemon = match ctx.running_daemon().await? {
        Some(mut c) => c
            .call::<DaemonStatus>(&NoParams {}, Some(&ctx.op_id))
            .await
            .ok(),
        None => None,
    };
    if ctx.json {
        super::print_json(&json!({
            "cli": { "version": cli, "protocol": banger_wire::PROTOCOL_VERSION },
            "daemon": daemon.as_ref().map(|d| json!({ "version": d.version, "protocol": d.protocol, "pid": d.pid })),
        }))?;
    } else {
        outln!("banger {cli} (protocol {})", banger_wire::PROTOCOL_VERSION);
        match daemon {
            Some(d) => outln!(
                "bangerd {} (protocol {}, pid {})",
                d.version,
                d.protocol,
                d.pid
            ),
            None => outln!("bangerd not running"),
        }
    }
    Ok(0)
}
