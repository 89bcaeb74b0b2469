//! `banger vm net show|set`.

use banger_wire::methods::{VmName, VmNetInfo, VmNetSet, VmNetSetParams, VmNetShow};

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
