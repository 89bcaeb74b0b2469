use banger_wire::NoParams;
use banger_wire::methods::DaemonStatus;
use serde_json::json;

use crate::context::Ctx;

/// `banger --version`: this CLI's version and, if one runs, the daemon's.
/// Never starts a daemon.
pub async fn run(ctx: &Ctx) -> u8 {
    let cli = env!("CARGO_PKG_VERSION");
    let daemon = match ctx.running_daemon().await {
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
        }));
    } else {
        println!("banger {cli} (protocol {})", banger_wire::PROTOCOL_VERSION);
        match daemon {
            Some(d) => println!(
                "bangerd {} (protocol {}, pid {})",
                d.version, d.protocol, d.pid
            ),
            None => println!("bangerd not running"),
        }
    }
    0
}
