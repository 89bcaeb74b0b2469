//! `banger workspace prepare | export | status`, and the workspace step of
//! `vm create --workspace` / `vm run --workspace`.

use std::path::{Path, PathBuf};

use banger_wire::methods::{
    ExportTarget, OpCancel, OpStatusParams, WorkspaceExport, WorkspaceExportParams, WorkspaceInfo,
    WorkspacePrepare, WorkspacePrepareParams, WorkspaceStatus, WorkspaceStatusParams,
};
use serde_json::json;

use super::progress::Progress;
use crate::context::Invocation;
use crate::error::CliError;
use crate::out::{outln, safe_line};

/// `path` made absolute against the current directory (the daemon finds
/// the repository's top level from it).
pub fn absolute(ctx: &Invocation, path: Option<&Path>) -> Result<String, CliError> {
    let cwd = std::env::current_dir().map_err(|e| {
        CliError::local(
            &ctx.op_id,
            format!("cannot read the current directory: {e}"),
        )
    })?;
    let p = match path {
        Some(p) if p.is_absolute() => p.to_path_buf(),
        Some(p) => cwd.join(p),
        None => cwd,
    };
    p.to_str()
        .map(str::to_owned)
        .ok_or_else(|| CliError::local(&ctx.op_id, format!("{} is not a UTF-8 path", p.display())))
}

/// The prepare RPC with progress on stderr (or JSON events). Ctrl-C
/// (a change of `interrupts`) cancels it: the previous workspace stays.
pub async fn prepare_in(
    ctx: &Invocation,
    params: &WorkspacePrepareParams,
    progress: Progress,
    mut interrupts: tokio::sync::watch::Receiver<usize>,
) -> Result<WorkspaceInfo, CliError> {
    let mut client = ctx.daemon().await?;
    let follow = client.call_with_events::<WorkspacePrepare>(params, Some(&ctx.op_id), |op, ev| {
        progress.event(op, ev)
    });
    tokio::pin!(follow);
    let mut asked = false;
    loop {
        tokio::select! {
            r = &mut follow => return r.map_err(|e| CliError::from_client(&ctx.op_id, e)),
            changed = interrupts.changed(), if !asked => {
                if changed.is_err() {
                    asked = true;
                    continue;
                }
                asked = true;
                eprintln!("cancelling the prepare ({})…", ctx.op_id);
                let op = OpStatusParams { op_id: ctx.op_id.clone() };
                if let Err(e) = ctx.call::<OpCancel>(&op).await {
                    eprintln!("warning: could not cancel: {e}");
                }
            }
        }
    }
}

pub async fn prepare(
    ctx: &Invocation,
    vm: String,
    path: Option<PathBuf>,
    dest: Option<String>,
    include_ignored: bool,
    depth: Option<u32>,
    quiet: bool,
) -> Result<u8, CliError> {
    let params = WorkspacePrepareParams {
        vm,
        path: absolute(ctx, path.as_deref())?,
        dest,
        include_ignored,
        depth,
    };
    let progress = Progress {
        json: ctx.json,
        quiet,
        json_to_stderr: false,
    };
    let ws = prepare_in(ctx, &params, progress, super::vm::watch_interrupts()).await?;
    if ctx.json {
        outln!("{}", json!({ "op_id": ctx.op_id, "result": ws }));
    } else {
        outln!(
            "{}:{} holds {} at {} ({} files)",
            ws.vm,
            safe_line(&ws.dest),
            safe_line(&ws.host_path),
            short(&ws.base_commit),
            ws.files
        );
    }
    Ok(0)
}

#[allow(clippy::too_many_arguments)]
pub async fn export(
    ctx: &Invocation,
    vm: String,
    path: Option<PathBuf>,
    dest: Option<String>,
    patch: Option<PathBuf>,
    branch: Option<String>,
    committed_only: bool,
    force: bool,
    quiet: bool,
) -> Result<u8, CliError> {
    let target = match (patch, branch) {
        (Some(file), _) => ExportTarget::Patch {
            file: absolute(ctx, Some(&file))?,
        },
        (None, Some(name)) => ExportTarget::Branch {
            name,
            committed_only,
            force,
        },
        (None, None) => ExportTarget::Apply,
    };
    let params = WorkspaceExportParams {
        vm,
        dest,
        path: path
            .as_deref()
            .map(|p| absolute(ctx, Some(p)))
            .transpose()?,
        target,
        umask: crate::context::USER_UMASK.get().copied(),
    };
    let progress = Progress {
        json: ctx.json,
        quiet,
        json_to_stderr: false,
    };
    let mut client = ctx.daemon().await?;
    let r = client
        .call_with_events::<WorkspaceExport>(&params, Some(&ctx.op_id), |op, ev| {
            progress.event(op, ev)
        })
        .await
        .map_err(|e| CliError::from_client(&ctx.op_id, e))?;
    if ctx.json {
        outln!("{}", json!({ "op_id": ctx.op_id, "result": r }));
    } else {
        let what = match &params.target {
            ExportTarget::Patch { .. } => format!("patch {}", safe_line(&r.written)),
            ExportTarget::Branch { .. } => format!(
                "branch {} of {}",
                safe_line(&r.written),
                safe_line(&r.host_path)
            ),
            ExportTarget::Apply => format!("the working tree of {}", safe_line(&r.host_path)),
        };
        let from = match &params.target {
            ExportTarget::Branch { .. } => format!("up to {}", short(&r.tip)),
            _ => format!("the guest's HEAD {} and its working tree", short(&r.tip)),
        };
        outln!("{} file(s) changed, {from} → {what}", r.files_changed);
    }
    Ok(0)
}

pub async fn status(ctx: &Invocation, vm: String, dest: Option<String>) -> Result<u8, CliError> {
    let s = ctx
        .call::<WorkspaceStatus>(&WorkspaceStatusParams { vm, dest })
        .await?;
    if ctx.json {
        super::print_json(&s)?;
        return Ok(0);
    }
    outln!("{} (from {})", safe_line(&s.dest), safe_line(&s.host_path));
    outln!("  base:     {}", short(&s.base_commit));
    if s.prepared_commit != s.base_commit {
        outln!(
            "  prepared: {} (with the host's uncommitted changes)",
            short(&s.prepared_commit)
        );
    }
    outln!(
        "  head:     {} ({} commit(s) made in the guest)",
        short(&s.head_commit),
        s.commits
    );
    outln!(
        "  size:     {:.1} MiB",
        s.size_bytes as f64 / f64::from(1 << 20)
    );
    if s.changed.is_empty() {
        outln!("  nothing changed since prepare");
    } else {
        outln!("  changed since prepare ({}):", s.changed.len());
        for c in &s.changed {
            outln!("    {}", safe_line(c));
        }
    }
    Ok(0)
}

fn short(commit: &str) -> &str {
    &commit[..commit.len().min(12)]
}
