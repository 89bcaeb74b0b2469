use crate::out::outln;
use serde_json::json;

use crate::context::Invocation;
use crate::error::CliError;

/// `banger config show`: the effective config and the paths in use.
pub fn show(ctx: &Invocation) -> Result<u8, CliError> {
    let config = ctx.config()?;
    let p = &ctx.paths;
    let helper_socket = config.helper_socket(p);
    if ctx.json {
        super::print_json(&json!({
            "config": config,
            "paths": {
                "config_file": p.config_file,
                "state_dir": p.state_dir,
                "runtime_dir": p.runtime_dir,
                "daemon_socket": p.daemon_socket(),
                "daemon_log": p.daemon_log(),
                "database": p.database(),
                "helper_socket": helper_socket,
            }
        }))?;
    } else {
        outln!(
            "# config file: {}{}",
            p.config_file.display(),
            if p.config_file.exists() {
                ""
            } else {
                " (absent: defaults)"
            }
        );
        outln!("# state dir:   {}", p.state_dir.display());
        outln!("# runtime dir: {}", p.runtime_dir.display());
        outln!("# helper:      {}", helper_socket.display());
        crate::out::bytes(config.to_toml().as_bytes())?;
    }
    Ok(0)
}
