//! `banger vm …`.

use crate::out::outln;
use std::io::{Read, Write};
use tokio::sync::watch;

use banger_wire::OpId;
use banger_wire::methods::*;
use base64::Engine as _;
use serde_json::json;

use super::progress::Progress;
use crate::cli::VmShape;
use crate::context::Invocation;
use crate::error::CliError;

/// `--secret` grants with `--secret-in-body` applied; a body flag for a
/// secret not granted is refused.
pub fn grants(
    ctx: &Invocation,
    secrets: &[SecretGrant],
    in_body: &[String],
) -> Result<Vec<SecretGrant>, CliError> {
    if let Some(n) = in_body
        .iter()
        .find(|n| !secrets.iter().any(|g| g.name == **n))
    {
        return Err(CliError::local(
            &ctx.op_id,
            format!("--secret-in-body {n}: give the secret with --secret {n}@HOST too"),
        ));
    }
    let mut secrets = secrets.to_vec();
    for g in &mut secrets {
        g.in_body = in_body.contains(&g.name);
    }
    Ok(secrets)
}

fn create_params(
    ctx: &Invocation,
    shape: &VmShape,
    wait: &str,
) -> Result<VmCreateParams, CliError> {
    let secrets = grants(ctx, &shape.secrets, &shape.secrets_in_body)?;
    Ok(VmCreateParams {
        name: shape.name.clone(),
        image: shape.image.clone(),
        vcpus: shape.vcpus,
        memory_mib: shape.memory,
        disk_mib: shape.disk,
        init: shape.init,
        vmm: shape.vmm,
        wait: Some(wait.to_string()),
        ports: shape.ports.clone(),
        net: shape.net.clone(),
        session: None,
        from_snapshot: shape.from.clone(),
        keep_host_keys: shape.keep_host_keys,
        secrets,
    })
}

async fn create_vm(
    ctx: &Invocation,
    params: &VmCreateParams,
    progress: Progress,
) -> Result<VmInfo, CliError> {
    let mut client = ctx.daemon().await?;
    client
        .call_with_events::<VmCreate>(params, Some(&ctx.op_id), |op, ev| progress.event(op, ev))
        .await
        .map_err(|e| CliError::from_client(&ctx.op_id, e))
}

/// The workspace prepare of `--workspace PATH`, checked before the VM is
/// made (a path that is not a repository is refused up front).
fn workspace_params(
    ctx: &Invocation,
    vm: &str,
    workspace: Option<&std::path::Path>,
) -> Result<Option<WorkspacePrepareParams>, CliError> {
    workspace
        .map(|p| {
            Ok(WorkspacePrepareParams {
                vm: vm.to_owned(),
                path: super::workspace::absolute(ctx, Some(p))?,
                dest: None,
                include_ignored: false,
                depth: None,
            })
        })
        .transpose()
}

pub async fn create(
    ctx: &Invocation,
    shape: VmShape,
    no_ssh_wait: bool,
    workspace: Option<std::path::PathBuf>,
) -> Result<u8, CliError> {
    let progress = Progress {
        json: ctx.json,
        quiet: shape.quiet,
        json_to_stderr: false,
    };
    let mut params = create_params(ctx, &shape, if no_ssh_wait { "agent" } else { "ssh" })?;
    let ws = if workspace.is_some() {
        let name = params
            .name
            .get_or_insert_with(|| format!("ws-{}", &OpId::mint().as_str()[3..]))
            .clone();
        workspace_params(ctx, &name, workspace.as_deref())?
    } else {
        None
    };
    let vm = create_vm(ctx, &params, progress).await?;
    let ws = match ws {
        Some(p) => Some(super::workspace::prepare_in(ctx, &p, progress, watch_interrupts()).await?),
        None => None,
    };
    if ctx.json {
        outln!(
            "{}",
            json!({ "op_id": ctx.op_id, "result": vm, "workspace": ws })
        );
    } else {
        outln!("{} is running ({})", vm.name, vm.id);
        if let Some(ws) = ws {
            outln!(
                "workspace {} from {} ({} files)",
                crate::out::safe_line(&ws.dest),
                crate::out::safe_line(&ws.host_path),
                ws.files
            );
        }
    }
    Ok(0)
}

/// `vm run`: create, exec, delete. The CLI names the VM itself so that it
/// can always clean up, even after a Ctrl-C during boot.
pub async fn run(
    ctx: &Invocation,
    shape: VmShape,
    keep: bool,
    workspace: Option<std::path::PathBuf>,
    command: Vec<String>,
) -> Result<u8, CliError> {
    // The command runs through the agent: no need to wait for sshd.
    let mut params = create_params(ctx, &shape, "agent")?;
    let name = params
        .name
        .get_or_insert_with(|| format!("run-{}", &OpId::mint().as_str()[3..]))
        .clone();
    let ws = match workspace_params(ctx, &name, workspace.as_deref()) {
        Ok(ws) => ws,
        Err(e) => return Ok(command_exit(Err(e))),
    };
    let progress = Progress {
        json: ctx.json,
        quiet: shape.quiet,
        json_to_stderr: true,
    };
    let interrupts = watch_interrupts();
    let created = create_vm(ctx, &params, progress).await;
    let cwd = match (created, ws) {
        (Err(e), _) => Err(e),
        (Ok(_), Some(ws)) if *interrupts.borrow() == 0 => {
            super::workspace::prepare_in(ctx, &ws, progress, interrupts.clone())
                .await
                .map(|w| Some(w.dest))
        }
        (Ok(_), _) => Ok(None),
    };
    let result = match cwd {
        Err(e) => Err(e),
        // Ctrl-C while booting: do not start the command.
        Ok(_) if *interrupts.borrow() > 0 => Ok(130),
        Ok(cwd) => exec_in(ctx, &name, command, cwd, interrupts)
            .await
            .map(|exit| exit.shell_code().clamp(0, 255) as u8),
    };
    if !keep {
        let del = VmNames {
            force: true,
            ..names(vec![name.clone()])
        };
        // A failed create leaves a failed row behind; remove it too.
        if let Err(e) = ctx.call::<VmDelete>(&del).await
            && !matches!(&e, CliError::Remote(o) if o.code == banger_wire::ErrorCode::NotFound)
        {
            eprintln!("warning: could not delete VM {name}: {e}");
        }
    } else if !ctx.json && result.is_ok() {
        eprintln!("kept VM {name}");
    }
    Ok(command_exit(result))
}

pub async fn exec(ctx: &Invocation, name: &str, command: Vec<String>) -> Result<u8, CliError> {
    Ok(command_exit(
        exec_in(ctx, name, command, None, watch_interrupts())
            .await
            .map(|exit| exit.shell_code().clamp(0, 255) as u8),
    ))
}

/// The command's own exit codes pass through, so banger's failures get one
/// of their own, as with `docker run`.
fn command_exit(result: Result<u8, CliError>) -> u8 {
    result.unwrap_or_else(|e| {
        eprintln!("error: {e}");
        crate::exit::RUN_FAILED
    })
}

/// Counts Ctrl-C presses from now on. Once watched, SIGINT no longer kills
/// the CLI: every press is counted, none is lost between boot and exec.
pub(super) fn watch_interrupts() -> watch::Receiver<usize> {
    let (tx, rx) = watch::channel(0);
    tokio::spawn(async move {
        while tokio::signal::ctrl_c().await.is_ok() {
            tx.send_modify(|n| *n += 1);
        }
    });
    rx
}

/// Run `argv` in VM `name`: stdout/stderr stream to ours, our stdin is
/// forwarded, Ctrl-C sends SIGINT to the command (twice: SIGKILL), also
/// when pressed before the command started.
async fn exec_in(
    ctx: &Invocation,
    name: &str,
    argv: Vec<String>,
    cwd: Option<String>,
    interrupts: watch::Receiver<usize>,
) -> Result<ExecExit, CliError> {
    let mut client = ctx.daemon().await?;
    let (session_tx, session_rx) = tokio::sync::oneshot::channel::<String>();
    let mut session_tx = Some(session_tx);
    let params = VmExecParams {
        name: name.to_string(),
        argv,
        cwd,
        stdin: true,
        ..Default::default()
    };
    let b64 = base64::engine::general_purpose::STANDARD;
    let (signals, signals_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut stdout_closed = false;
    let side = tokio::spawn(forward_input(
        ctx.paths.daemon_socket(),
        ctx.op_id.clone(),
        session_rx,
        interrupts,
        signals_rx,
    ));
    let result = client
        .call_with_events::<VmExec>(&params, Some(&ctx.op_id), |_, ev| {
            match serde_json::from_value::<ExecEvent>(ev) {
                Ok(ExecEvent::Started { session }) => {
                    if let Some(tx) = session_tx.take() {
                        let _ = tx.send(session);
                    }
                }
                Ok(ExecEvent::Stdout(data)) if !stdout_closed => {
                    let data = b64.decode(data).unwrap_or_default();
                    if let Err(CliError::StdoutClosed) = crate::out::bytes(&data) {
                        // As in a local pipeline: the writer gets SIGPIPE.
                        stdout_closed = true;
                        let _ = signals.send(SIGPIPE);
                    }
                }
                Ok(ExecEvent::Stdout(_)) => {}
                Ok(ExecEvent::Stderr(data)) => {
                    let mut err = std::io::stderr().lock();
                    let _ = err.write_all(&b64.decode(data).unwrap_or_default());
                    let _ = err.flush();
                }
                Err(_) => {}
            }
        })
        .await;
    side.abort();
    result.map_err(|e| CliError::from_client(&ctx.op_id, e))
}

/// SIGPIPE, sent to a command whose output nobody reads any more.
const SIGPIPE: i32 = 13;

/// Forward stdin, Ctrl-C and `signals` to an exec session over a second
/// connection.
async fn forward_input(
    socket: std::path::PathBuf,
    op_id: OpId,
    session: tokio::sync::oneshot::Receiver<String>,
    mut interrupts: watch::Receiver<usize>,
    mut signals: tokio::sync::mpsc::UnboundedReceiver<i32>,
) {
    let Ok(session) = session.await else { return };
    let Ok(mut client) = banger_rpc::Client::connect(&socket).await else {
        return;
    };
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Option<Vec<u8>>>(4);
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => {
                    let _ = tx.blocking_send(None);
                    return;
                }
                Ok(n) => {
                    if tx.blocking_send(Some(buf[..n].to_vec())).is_err() {
                        return;
                    }
                }
            }
        }
    });
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut signalled = 0;
    let mut stdin_open = true;
    loop {
        // Presses not yet passed on, including any from before the session.
        let pressed = *interrupts.borrow_and_update();
        while signalled < pressed {
            signalled += 1;
            let signal = if signalled == 1 { 2 } else { 9 };
            let p = ExecSignalParams {
                session: session.clone(),
                signal,
            };
            let _ = client.call::<VmExecSignal>(&p, Some(&op_id)).await;
        }
        tokio::select! {
            chunk = rx.recv(), if stdin_open => {
                let (data, eof) = match chunk {
                    Some(Some(d)) => (Some(b64.encode(d)), false),
                    _ => (None, true),
                };
                stdin_open = !eof;
                let p = ExecInputParams { session: session.clone(), data, eof };
                if client.call::<VmExecInput>(&p, Some(&op_id)).await.is_err() {
                    stdin_open = false;
                }
            }
            changed = interrupts.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            Some(signal) = signals.recv() => {
                let p = ExecSignalParams { session: session.clone(), signal };
                let _ = client.call::<VmExecSignal>(&p, Some(&op_id)).await;
            }
        }
    }
}

pub async fn list(ctx: &Invocation, all: bool) -> Result<u8, CliError> {
    let vms = ctx.call::<VmList>(&VmListParams { all }).await?;
    if ctx.json {
        super::print_json(&vms)?;
        return Ok(0);
    }
    outln!(
        "{:<20} {:<9} {:<12} {:>5} {:>7} {:<15} ID",
        "NAME",
        "STATE",
        "IMAGE",
        "CPUS",
        "MEMORY",
        "IP"
    );
    for v in &vms {
        outln!(
            "{:<20} {:<9} {:<12} {:>5} {:>6}M {:<15} {}",
            v.name,
            v.state,
            v.image,
            v.vcpus,
            v.memory_mib,
            v.guest_ip.as_deref().unwrap_or("-"),
            v.id
        );
    }
    Ok(0)
}

fn print_vm(v: &VmInfo) -> Result<(), CliError> {
    outln!("{} ({})", v.name, v.id);
    outln!(
        "  state:   {}{}",
        v.state,
        v.pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
    );
    outln!("  image:   {} (init {}, {})", v.image, v.init, v.vmm);
    outln!(
        "  size:    {} vCPU, {} MiB memory, {} MiB work disk",
        v.vcpus,
        v.memory_mib,
        v.disk_mib
    );
    if let Some(ip) = &v.guest_ip {
        outln!(
            "  address: {ip}{}",
            v.dns_name
                .as_deref()
                .map(|d| format!(" ({d})"))
                .unwrap_or_default()
        );
    }
    outln!("  network: {}", v.net);
    for s in &v.secrets {
        outln!(
            "  secret: {} to {}{} (the guest holds {})",
            s.name,
            s.hosts.join(","),
            if s.in_body {
                ", headers and bodies"
            } else {
                ""
            },
            s.placeholder
        );
    }
    for f in &v.port_forwards {
        outln!("  forward: {}", super::port_forward::describe(f));
    }
    if let Some(w) = &v.work_disk {
        let used = w.total_bytes.saturating_sub(w.free_bytes);
        outln!(
            "  /root:   {} used of {} ({} free)",
            human_bytes(used),
            human_bytes(w.total_bytes),
            human_bytes(w.available_bytes)
        );
    }
    outln!("  dir:     {}", v.vm_dir);
    outln!("  console: {}", v.console_log);
    if let Some(e) = &v.last_error {
        outln!("  error:   {}", crate::out::safe_text(e));
    }
    Ok(())
}

pub async fn set(ctx: &Invocation, params: VmSetParams) -> Result<u8, CliError> {
    let v = ctx.call::<VmSet>(&params).await?;
    if ctx.json {
        super::print_json(&v)?;
    } else {
        print_vm(&v)?;
    }
    Ok(0)
}

pub async fn show(ctx: &Invocation, name: &str) -> Result<u8, CliError> {
    let v = ctx.call::<VmShow>(&VmName { name: name.into() }).await?;
    if ctx.json {
        super::print_json(&v)?;
    } else {
        print_vm(&v)?;
    }
    Ok(0)
}

async fn many<M>(ctx: &Invocation, params: VmNames, verb: &str) -> Result<u8, CliError>
where
    M: banger_wire::Method<Params = VmNames>,
    M::Result: serde::Serialize,
{
    let progress = Progress {
        json: false,
        quiet: ctx.json,
        json_to_stderr: true,
    };
    let mut client = ctx.daemon().await?;
    let r = client
        .call_with_events::<M>(&params, Some(&ctx.op_id), |op, ev| progress.event(op, ev))
        .await
        .map_err(|e| CliError::from_client(&ctx.op_id, e))?;
    if ctx.json {
        super::print_json(&r)?;
    } else {
        for n in &params.names {
            outln!("{verb} {n}");
        }
    }
    Ok(0)
}

fn names(names: Vec<String>) -> VmNames {
    VmNames {
        names,
        ..Default::default()
    }
}

pub async fn start(
    ctx: &Invocation,
    names: Vec<String>,
    no_ssh_wait: bool,
) -> Result<u8, CliError> {
    many::<VmStart>(
        ctx,
        VmNames {
            no_ssh_wait,
            ..self::names(names)
        },
        "started",
    )
    .await
}
pub async fn stop(ctx: &Invocation, names: Vec<String>) -> Result<u8, CliError> {
    many::<VmStop>(ctx, self::names(names), "stopped").await
}
pub async fn pause(ctx: &Invocation, names: Vec<String>) -> Result<u8, CliError> {
    many::<VmPause>(ctx, self::names(names), "paused").await
}
pub async fn resume(ctx: &Invocation, names: Vec<String>) -> Result<u8, CliError> {
    many::<VmResume>(ctx, self::names(names), "resumed").await
}
pub async fn restart(
    ctx: &Invocation,
    names: Vec<String>,
    no_ssh_wait: bool,
) -> Result<u8, CliError> {
    many::<VmRestart>(
        ctx,
        VmNames {
            no_ssh_wait,
            ..self::names(names)
        },
        "restarted",
    )
    .await
}
pub async fn delete(ctx: &Invocation, names: Vec<String>, force: bool) -> Result<u8, CliError> {
    many::<VmDelete>(
        ctx,
        VmNames {
            force,
            ..self::names(names)
        },
        "deleted",
    )
    .await
}

pub async fn logs(
    ctx: &Invocation,
    name: &str,
    follow: bool,
    lines: Option<usize>,
) -> Result<u8, CliError> {
    let v = ctx.call::<VmShow>(&VmName { name: name.into() }).await?;
    let console = std::path::Path::new(&v.console_log);
    super::tail::tail(&ctx.op_id, console, follow, lines, |l| {
        outln!("{l}");
        Ok(())
    })
    .await?;
    Ok(0)
}

pub async fn ports(ctx: &Invocation, name: &str) -> Result<u8, CliError> {
    let p = ctx.call::<VmPorts>(&VmName { name: name.into() }).await?;
    if ctx.json {
        super::print_json(&p)?;
        return Ok(0);
    }
    outln!("{:<5} {:<40} PROCESS", "PROTO", "ADDRESS");
    for sock in p
        .get("sockets")
        .and_then(|s| s.as_array())
        .into_iter()
        .flatten()
    {
        // Every field comes from the guest.
        let text = |v: Option<&serde_json::Value>| match v {
            Some(serde_json::Value::String(s)) => crate::out::safe_line(s),
            Some(other) => crate::out::safe_line(&other.to_string()),
            None => String::new(),
        };
        let address = text(sock.get("address"));
        // IPv6 addresses get brackets so the port stays readable.
        let address = if address.contains(':') {
            format!("[{address}]")
        } else {
            address
        };
        let process = match (sock.pointer("/process/name"), sock.pointer("/process/pid")) {
            (Some(name), Some(pid)) => format!("{} ({pid})", text(Some(name))),
            _ => "-".to_string(),
        };
        outln!(
            "{:<5} {:<40} {process}",
            text(sock.get("protocol")),
            format!("{address}:{}", text(sock.get("port")))
        );
    }
    Ok(0)
}

/// `vm stats NAME`: CPU use over `interval` seconds (two samples), memory,
/// disk, load and uptime; `--json` prints one raw sample.
pub async fn stats(ctx: &Invocation, name: &str, interval: f64) -> Result<u8, CliError> {
    let vm = VmName { name: name.into() };
    let first = ctx.call::<VmStats>(&vm).await?;
    if ctx.json {
        super::print_json(&first)?;
        return Ok(0);
    }
    tokio::time::sleep(std::time::Duration::from_secs_f64(interval)).await;
    let second = ctx.call::<VmStats>(&vm).await?;
    for line in stats_table(&first, &second) {
        outln!("{line}");
    }
    Ok(0)
}

fn stats_table(first: &GuestStats, second: &GuestStats) -> Vec<String> {
    let cpu = second.cpu;
    let busy = cpu.busy().saturating_sub(first.cpu.busy());
    let total = cpu.total().saturating_sub(first.cpu.total());
    let percent = if total == 0 {
        0.0
    } else {
        100.0 * busy as f64 / total as f64
    };
    let secs = total as f64 / cpu.ticks_per_sec.max(1) as f64 / f64::from(cpu.cpus.max(1));
    let m = second.memory;
    let d = &second.disk;
    let used = |total: u64, free: u64| total.saturating_sub(free);
    let share = |part: u64, whole: u64| {
        if whole == 0 {
            0.0
        } else {
            100.0 * part as f64 / whole as f64
        }
    };
    let mem_used = used(m.total_bytes, m.available_bytes);
    let disk_line = |what: &str, d: &DiskStats| {
        let disk_used = used(d.total_bytes, d.free_bytes);
        format!(
            "{what:<7} {:5.1}%  {} used of {} ({})",
            share(disk_used, d.total_bytes),
            human_bytes(disk_used),
            human_bytes(d.total_bytes),
            crate::out::safe_line(&d.path)
        )
    };
    let mut lines = vec![
        format!(
            "cpu     {percent:5.1}%  of {} vCPU over {secs:.1}s",
            cpu.cpus
        ),
        format!(
            "memory  {:5.1}%  {} used of {}",
            share(mem_used, m.total_bytes),
            human_bytes(mem_used),
            human_bytes(m.total_bytes)
        ),
        disk_line("disk", d),
    ];
    lines.extend(second.work.as_ref().map(|w| disk_line("work", w)));
    lines.extend([
        format!(
            "load    {:.2} {:.2} {:.2}  ({} running, {} processes)",
            second.load.one,
            second.load.five,
            second.load.fifteen,
            second.load.runnable,
            second.load.processes
        ),
        format!("uptime  {}", human_uptime(second.uptime_secs)),
    ]);
    lines
}

/// Bytes in binary units with one decimal: `1.5 GiB`.
fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

fn human_uptime(secs: f64) -> String {
    let s = secs.max(0.0) as u64;
    match (s / 86400, s / 3600 % 24, s / 60 % 60, s % 60) {
        (0, 0, 0, s) => format!("{s}s"),
        (0, 0, m, s) => format!("{m}m {s}s"),
        (0, h, m, _) => format!("{h}h {m}m"),
        (d, h, _, _) => format!("{d}d {h}h"),
    }
}

/// `vm ssh NAME [-- COMMAND]`: replaces this process with OpenSSH's client.
/// Host keys are regenerated per VM, so none are remembered.
pub async fn ssh(ctx: &Invocation, name: &str, command: Vec<String>) -> Result<u8, CliError> {
    use std::os::unix::process::CommandExt;
    let v = ctx.call::<VmShow>(&VmName { name: name.into() }).await?;
    if v.state != "running" {
        return Err(CliError::local(
            &ctx.op_id,
            format!(
                "VM {name:?} is {}; start it with `banger vm start {name}`",
                v.state
            ),
        ));
    }
    let ip = v.guest_ip.ok_or_else(|| {
        CliError::local(&ctx.op_id, format!("VM {name:?} has no network address"))
    })?;
    let key = ctx.paths.state_dir.join("ssh/id_ed25519");
    let mut cmd = std::process::Command::new("ssh");
    cmd.arg("-i")
        .arg(&key)
        .args([
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
        ])
        .args(["-o", "LogLevel=ERROR", "-o", "ConnectTimeout=10"])
        .arg(format!("root@{ip}"));
    if !command.is_empty() {
        cmd.arg("--").args(&command);
    }
    let err = cmd.exec();
    Err(CliError::local(
        &ctx.op_id,
        format!("cannot run ssh: {err} (apt install openssh-client)"),
    ))
}

pub async fn authsync(ctx: &Invocation, name: &str) -> Result<u8, CliError> {
    let n = ctx
        .call::<VmAuthsync>(&VmName { name: name.into() })
        .await?;
    if ctx.json {
        super::print_json(&json!({ "authorized_keys": n }))?;
    } else {
        outln!("authorized {n} key(s) in {name}");
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use banger_agent_proto::{CpuTimes, DiskStats, LoadAverage, MemoryStats};

    fn sample(user: u64, idle: u64) -> GuestStats {
        GuestStats {
            uptime_secs: 3725.0,
            load: LoadAverage {
                one: 0.5,
                five: 0.25,
                fifteen: 0.1,
                runnable: 1,
                processes: 42,
            },
            cpu: CpuTimes {
                cpus: 2,
                ticks_per_sec: 100,
                user,
                nice: 0,
                system: 0,
                idle,
                iowait: 0,
                irq: 0,
                softirq: 0,
                steal: 0,
            },
            memory: MemoryStats {
                total_bytes: 1024 << 20,
                free_bytes: 100 << 20,
                available_bytes: 768 << 20,
                buffers_bytes: 0,
                cached_bytes: 0,
                swap_total_bytes: 0,
                swap_free_bytes: 0,
            },
            disk: DiskStats {
                path: "/\x1b[2J".into(),
                total_bytes: 4 << 30,
                free_bytes: 3 << 30,
                available_bytes: 3 << 30,
                total_inodes: 0,
                free_inodes: 0,
            },
            work: None,
        }
    }

    #[test]
    fn stats_show_cpu_use_over_the_interval_and_used_of_total() {
        // 2 vCPUs for 1 s at 100 ticks/s: 200 ticks, 50 of them busy.
        let lines = stats_table(&sample(1000, 5000), &sample(1050, 5150));
        assert_eq!(lines[0], "cpu      25.0%  of 2 vCPU over 1.0s");
        assert_eq!(lines[1], "memory   25.0%  256.0 MiB used of 1.0 GiB");
        assert_eq!(
            lines[2],
            "disk     25.0%  1.0 GiB used of 4.0 GiB (/\\u{1b}[2J)"
        );
        assert_eq!(
            lines[3],
            "load    0.50 0.25 0.10  (1 running, 42 processes)"
        );
        assert_eq!(lines[4], "uptime  1h 2m");
    }

    #[test]
    fn stats_show_the_work_disk_when_mounted() {
        let mut second = sample(1050, 5150);
        second.work = Some(DiskStats {
            path: "/root".into(),
            total_bytes: 8 << 30,
            free_bytes: 6 << 30,
            available_bytes: 6 << 30,
            total_inodes: 0,
            free_inodes: 0,
        });
        let lines = stats_table(&sample(1000, 5000), &second);
        assert_eq!(lines[3], "work     25.0%  2.0 GiB used of 8.0 GiB (/root)");
        assert!(lines[4].starts_with("load"));
    }

    #[test]
    fn identical_samples_are_zero_not_a_division_by_zero() {
        let s = sample(10, 10);
        assert!(stats_table(&s, &s)[0].starts_with("cpu       0.0%"));
    }
}
