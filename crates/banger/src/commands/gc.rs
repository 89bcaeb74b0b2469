//! `banger gc [--dry-run]`: the leak check, and its cleanup.

use crate::out::outln;
use banger_wire::methods::{GcParams, HostGc};

use crate::context::Invocation;
use crate::error::CliError;

pub async fn run(ctx: &Invocation, dry_run: bool) -> Result<u8, CliError> {
    let leaks = ctx.call::<HostGc>(&GcParams { dry_run }).await?;
    if ctx.json {
        super::print_json(&leaks)?;
        return Ok(0);
    }
    if leaks.is_empty() {
        outln!("nothing leaked");
        return Ok(0);
    }
    let verb = if dry_run { "would remove" } else { "removed" };
    for l in &leaks {
        outln!("{verb} {:<12} {}  ({})", l.kind, l.name, l.detail);
    }
    Ok(0)
}
