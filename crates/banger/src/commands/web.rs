//! `banger web [--open]`: a one-time login URL for the daemon's web UI.

use crate::out::outln;
use banger_wire::NoParams;
use banger_wire::methods::WebLogin;
use serde_json::json;

use crate::context::Invocation;
use crate::error::CliError;

pub async fn run(ctx: &Invocation, open: bool) -> Result<u8, CliError> {
    let login = ctx.call::<WebLogin>(&NoParams {}).await?;
    let opened = open.then(|| open_in_browser(&login.url));
    if ctx.json {
        super::print_json(&json!({
            "url": login.url,
            "opened": opened.as_ref().map(|r| r.is_ok()),
            "op_id": ctx.op_id,
        }))?;
    } else {
        outln!("{}", login.url);
        outln!(
            "(single use, valid for 5 minutes; it logs this browser in until the daemon restarts)"
        );
    }
    if let Some(Err(why)) = opened {
        eprintln!("could not open a browser: {why}; open the URL above yourself");
    }
    Ok(0)
}

/// `xdg-open URL`, detached: its answer says whether a browser was found.
fn open_in_browser(url: &str) -> Result<(), String> {
    let status = std::process::Command::new("xdg-open")
        .arg(url)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => "xdg-open is not installed".to_string(),
            _ => format!("cannot run xdg-open: {e}"),
        })?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("xdg-open failed ({status})"))
    }
}
