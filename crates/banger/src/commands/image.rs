//! `banger image list|show|build|pull|import|register|delete|promote`.

use crate::out::outln;
use banger_wire::Method;
use banger_wire::NoParams;
use banger_wire::methods::{
    ImageBuild, ImageDelete, ImageImport, ImageImportParams, ImageInfo, ImageList, ImageName,
    ImagePromote, ImagePull, ImagePullParams, ImageRegister, ImageRegisterParams, ImageShow,
};

use super::progress::Progress;
use crate::context::Invocation;
use crate::error::CliError;

pub async fn list(ctx: &Invocation) -> Result<u8, CliError> {
    let images = ctx.call::<ImageList>(&NoParams {}).await?;
    if ctx.json {
        super::print_json(&images)?;
        return Ok(0);
    }
    outln!(
        "{:<16} {:<9} {:>9} {:<8} SOURCE",
        "NAME",
        "STATE",
        "ON DISK",
        "DEFAULT"
    );
    for i in &images {
        outln!(
            "{:<16} {:<9} {:>8.0}M {:<8} {}",
            i.name,
            i.state,
            i.disk_bytes as f64 / 1048576.0,
            if i.is_default { "yes" } else { "" },
            i.source
        );
    }
    Ok(0)
}

fn print_image(ctx: &Invocation, i: &ImageInfo) -> Result<(), CliError> {
    if ctx.json {
        super::print_json(i)?;
    } else {
        outln!(
            "{} ({}): {}, {:.0} MiB on disk ({:.0} MiB apparent), init {}{}",
            i.name,
            i.id,
            i.state,
            i.disk_bytes as f64 / 1048576.0,
            i.size_bytes as f64 / 1048576.0,
            i.default_init,
            if i.is_default { ", default" } else { "" }
        );
        outln!("  source: {}", i.source);
        if let Some(d) = &i.source_digest {
            outln!("  digest: {d}");
        }
        outln!("  dir:    {}", i.dir);
        if let Some(e) = &i.last_error {
            outln!("  error:  {}", crate::out::safe_text(e));
        }
    }
    Ok(())
}

pub async fn show(ctx: &Invocation, name: &str) -> Result<u8, CliError> {
    let i = ctx
        .call::<ImageShow>(&ImageName { name: name.into() })
        .await?;
    print_image(ctx, &i)?;
    Ok(0)
}

/// Runs a long image operation, showing its stages, then the image
/// (`--json`: event lines, then one `{"op_id", "result"}` line).
async fn with_stages<M: Method<Result = ImageInfo>>(
    ctx: &Invocation,
    params: &M::Params,
    quiet: bool,
) -> Result<u8, CliError> {
    let progress = Progress {
        json: ctx.json,
        quiet,
        json_to_stderr: false,
    };
    let mut client = ctx.daemon().await?;
    let i = client
        .call_with_events::<M>(params, Some(&ctx.op_id), |op, ev| progress.event(op, ev))
        .await
        .map_err(|e| CliError::from_client(&ctx.op_id, e))?;
    if ctx.json {
        // One line after the event lines, as `vm create --json` does.
        outln!("{}", serde_json::json!({ "op_id": ctx.op_id, "result": i }));
    } else {
        print_image(ctx, &i)?;
    }
    Ok(0)
}

pub async fn build(ctx: &Invocation, recipe: &str, quiet: bool) -> Result<u8, CliError> {
    let params = ImageName {
        name: recipe.into(),
    };
    with_stages::<ImageBuild>(ctx, &params, quiet).await
}

pub async fn pull(
    ctx: &Invocation,
    reference: String,
    name: Option<String>,
    quiet: bool,
) -> Result<u8, CliError> {
    let params = ImagePullParams { reference, name };
    with_stages::<ImagePull>(ctx, &params, quiet).await
}

/// `params.path` must be absolute: the daemon resolves paths itself.
pub async fn import(
    ctx: &Invocation,
    params: ImageImportParams,
    quiet: bool,
) -> Result<u8, CliError> {
    with_stages::<ImageImport>(ctx, &params, quiet).await
}

pub async fn delete(ctx: &Invocation, name: &str) -> Result<u8, CliError> {
    ctx.call::<ImageDelete>(&ImageName { name: name.into() })
        .await?;
    if !ctx.json {
        outln!("deleted image {name}");
    } else {
        super::print_json(&serde_json::json!({ "deleted": name }))?;
    }
    Ok(0)
}

pub async fn promote(ctx: &Invocation, name: &str) -> Result<u8, CliError> {
    let i = ctx
        .call::<ImagePromote>(&ImageName { name: name.into() })
        .await?;
    print_image(ctx, &i)?;
    Ok(0)
}

pub async fn register(
    ctx: &Invocation,
    name: String,
    vmlinux: std::path::PathBuf,
    initrd: Option<std::path::PathBuf>,
    rootfs: std::path::PathBuf,
    work_seed: std::path::PathBuf,
    init: Option<banger_wire::InitMode>,
) -> Result<u8, CliError> {
    // The daemon resolves paths itself: hand it absolute ones.
    let abs = |p: std::path::PathBuf| std::path::absolute(&p).unwrap_or(p).display().to_string();
    let params = ImageRegisterParams {
        name,
        vmlinux: abs(vmlinux),
        initrd: initrd.map(abs),
        rootfs: abs(rootfs),
        work_seed: abs(work_seed),
        init,
    };
    let i = ctx.call::<ImageRegister>(&params).await?;
    print_image(ctx, &i)?;
    Ok(0)
}
