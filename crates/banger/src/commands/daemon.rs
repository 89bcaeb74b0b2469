//! `banger daemon status|start|stop|logs`.

use crate::out::outln;
use std::time::Duration;

use banger_config::lockfile::LockFile;
use banger_wire::NoParams;
use banger_wire::methods::{DaemonStatus, DaemonStatusResult, DaemonStop};
use serde_json::{Value, json};

use crate::context::Invocation;
use crate::error::CliError;
use crate::exit;

pub async fn status(ctx: &Invocation) -> Result<u8, CliError> {
    let Some(mut client) = ctx.running_daemon().await? else {
        if ctx.json {
            super::print_json(&json!({ "running": false, "socket": ctx.paths.daemon_socket() }))?;
        } else {
            outln!(
                "bangerd is not running (socket {})",
                ctx.paths.daemon_socket().display()
            );
        }
        return Ok(exit::DAEMON_UNAVAILABLE);
    };
    let st = client
        .call::<DaemonStatus>(&NoParams {}, Some(&ctx.op_id))
        .await
        .map_err(|e| CliError::from_client(&ctx.op_id, e))?;
    print_status(ctx, &st)?;
    Ok(0)
}

pub async fn start(ctx: &Invocation) -> Result<u8, CliError> {
    let st = ctx.call::<DaemonStatus>(&NoParams {}).await?;
    print_status(ctx, &st)?;
    Ok(0)
}

fn print_status(ctx: &Invocation, st: &DaemonStatusResult) -> Result<(), CliError> {
    if ctx.json {
        let mut v = serde_json::to_value(st).expect("serialisable");
        v["running"] = json!(true);
        super::print_json(&v)?;
    } else {
        outln!(
            "bangerd {} running: pid {}, up {}",
            st.version,
            st.pid,
            human_duration(st.uptime_s)
        );
        outln!("  socket: {}", st.socket);
        outln!("  state:  {}", st.state_dir);
        outln!("  log:    {}", st.log_file);
        match (&st.web_url, &st.web_error) {
            (Some(url), _) => outln!("  web:    {url} (banger web prints a login URL)"),
            (None, Some(why)) => outln!("  web:    not served: {why}"),
            (None, None) => outln!("  web:    disabled"),
        }
        let n = &st.host_names;
        outln!(
            "  host names: bridge {}, nftables table inet {}, vsock CIDs from {}",
            n.bridge,
            n.nft_table,
            n.first_cid
        );
    }
    Ok(())
}

pub async fn stop(ctx: &Invocation) -> Result<u8, CliError> {
    let Some(mut client) = ctx.running_daemon().await? else {
        if ctx.json {
            super::print_json(&json!({ "stopped": false, "running": false }))?;
        } else {
            outln!("bangerd is not running");
        }
        return Ok(0);
    };
    let pid = client
        .call::<DaemonStatus>(&NoParams {}, Some(&ctx.op_id))
        .await
        .ok()
        .map(|s| s.pid);
    client
        .call::<DaemonStop>(&NoParams {}, Some(&ctx.op_id))
        .await
        .map_err(|e| CliError::from_client(&ctx.op_id, e))?;
    // The daemon holds its lock until its very last moment: once we can take
    // it, the daemon is gone.
    let lock = ctx.paths.daemon_lock();
    let waited = tokio::task::spawn_blocking(move || {
        LockFile::acquire_timeout(&lock, Duration::from_secs(20))
    })
    .await
    .expect("lock task does not panic");
    if let Err(e) = waited {
        return Err(CliError::local(
            &ctx.op_id,
            format!("bangerd did not exit after being asked to stop: {e}"),
        ));
    }
    if ctx.json {
        super::print_json(&json!({ "stopped": true, "pid": pid }))?;
    } else {
        outln!(
            "bangerd stopped{}",
            pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
        );
    }
    Ok(0)
}

/// `banger daemon logs [-f] [-n N]`: reads the log file directly, so it works
/// when the daemon is down too (which is when it is most needed).
pub async fn logs(ctx: &Invocation, follow: bool, lines: Option<usize>) -> Result<u8, CliError> {
    let path = ctx.paths.daemon_log();
    super::tail::tail(&ctx.op_id, &path, follow, lines, |l| print_log_line(ctx, l)).await?;
    Ok(0)
}

fn print_log_line(ctx: &Invocation, line: &str) -> Result<(), CliError> {
    let line = line.trim_end();
    if ctx.json {
        outln!("{line}");
    } else {
        outln!("{}", render_log_line(line));
    }
    Ok(())
}

/// One JSON log line as `TIME LEVEL [op-id] message key=value…`.
pub fn render_log_line(line: &str) -> String {
    let Ok(Value::Object(v)) = serde_json::from_str::<Value>(line) else {
        return line.to_string();
    };
    let s = |x: Option<&Value>| x.and_then(Value::as_str).unwrap_or("").to_string();
    let ts = s(v.get("timestamp"));
    let level = s(v.get("level"));
    let op = v
        .get("span")
        .and_then(|sp| sp.get("op_id"))
        .and_then(Value::as_str)
        .map(|o| format!(" [{o}]"))
        .unwrap_or_default();
    let mut out = format!("{ts} {level:>5}{op}");
    if let Some(Value::Object(fields)) = v.get("fields") {
        if let Some(msg) = fields.get("message").and_then(Value::as_str) {
            out.push(' ');
            out.push_str(msg);
        }
        for (k, val) in fields.iter().filter(|(k, _)| *k != "message") {
            match val {
                Value::String(t) => out.push_str(&format!(" {k}={t}")),
                other => out.push_str(&format!(" {k}={other}")),
            }
        }
    }
    out
}

fn human_duration(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{}s", s / 60, s % 60),
        s => format!("{}h{}m", s / 3600, (s % 3600) / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_json_log_lines_with_op_id() {
        let line = r#"{"timestamp":"2026-11-22T03:00:00Z","level":"INFO","fields":{"message":"daemon rpc completed","duration_ms":1.5},"target":"x","span":{"method":"daemon.status","op_id":"op-abc123","name":"rpc"}}"#;
        assert_eq!(
            render_log_line(line),
            "2026-11-22T03:00:00Z  INFO [op-abc123] daemon rpc completed duration_ms=1.5"
        );
        assert_eq!(render_log_line("not json"), "not json");
    }

    #[test]
    fn durations_read_naturally() {
        assert_eq!(human_duration(5), "5s");
        assert_eq!(human_duration(125), "2m5s");
        assert_eq!(human_duration(7260), "2h1m");
    }
}
