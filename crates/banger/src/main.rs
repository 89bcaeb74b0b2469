//! `banger`: the command-line client. It starts `bangerd` on first use and
//! talks to it over its Unix socket.

mod cli;
mod commands;
mod context;
mod error;
mod exit;
mod out;

use std::process::ExitCode;

use clap::{CommandFactory, Parser};

use crate::cli::{
    Cli, Command, ConfigCommand, DaemonCommand, ImageCommand, NetCommand, PortForwardCommand,
    SecretCommand, SnapshotCommand, VmCommand, WorkspaceCommand,
};
use crate::context::Invocation;
use crate::error::CliError;

fn main() -> ExitCode {
    // What the CLI creates (runtime dir, the daemon's log dir) is the user's
    // alone, and so is all a daemon it starts creates.
    let user_umask = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    // Files banger writes into the user's own trees (a workspace export)
    // follow the umask the user runs with.
    context::USER_UMASK.get_or_init(|| user_umask.bits());
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { exit::USAGE } else { 0 });
        }
    };
    let paths = match banger_config::Paths::resolve(cli.global.home.as_deref()) {
        Ok(p) => p,
        Err(e) => {
            // Errors may quote the guest (an agent's message, a file name).
            eprintln!("error: {}", out::safe_text(&e.to_string()));
            return ExitCode::from(exit::FAILED);
        }
    };
    let ctx = Invocation::new(paths, cli.global.json);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = runtime.block_on(dispatch(&ctx, cli));
    match result {
        Ok(code) => ExitCode::from(code),
        Err(CliError::StdoutClosed) => {
            // Quietly, as `yes | head -1` ends `yes`: by the signal itself.
            drop(runtime);
            let _ = signal_hook::low_level::emulate_default_handler(signal_hook::consts::SIGPIPE);
            ExitCode::from(exit::STDOUT_CLOSED)
        }
        Err(e) => {
            // Errors may quote the guest (an agent's message, a file name).
            eprintln!("error: {}", out::safe_text(&e.to_string()));
            ExitCode::from(e.exit_code())
        }
    }
}

async fn dispatch(ctx: &Invocation, cli: Cli) -> Result<u8, CliError> {
    if cli.global.version {
        return commands::version::run(ctx).await;
    }
    let Some(command) = cli.command else {
        let _ = Cli::command().print_help();
        return Ok(exit::USAGE);
    };
    match command {
        Command::Daemon(DaemonCommand::Status) => commands::daemon::status(ctx).await,
        Command::Daemon(DaemonCommand::Start) => commands::daemon::start(ctx).await,
        Command::Daemon(DaemonCommand::Stop) => commands::daemon::stop(ctx).await,
        Command::Daemon(DaemonCommand::Logs { follow, lines }) => {
            commands::daemon::logs(ctx, follow, lines).await
        }
        Command::Config(ConfigCommand::Show) => commands::config::show(ctx),
        Command::Doctor => commands::doctor::run(ctx).await,
        Command::Web { open } => commands::web::run(ctx, open).await,
        Command::Gc { dry_run } => commands::gc::run(ctx, dry_run).await,
        Command::Op { op_id } => commands::progress::op_status(ctx, op_id).await,
        Command::Vm(cmd) => match cmd {
            VmCommand::Create {
                shape,
                no_ssh_wait,
                workspace,
            } => commands::vm::create(ctx, shape, no_ssh_wait, workspace).await,
            VmCommand::Run {
                shape,
                keep,
                workspace,
                command,
            } => commands::vm::run(ctx, shape, keep, workspace, command).await,
            VmCommand::Exec { name, command } => commands::vm::exec(ctx, &name, command).await,
            VmCommand::List { all } => commands::vm::list(ctx, all).await,
            VmCommand::Show { name } => commands::vm::show(ctx, &name).await,
            VmCommand::Start { names, no_ssh_wait } => {
                commands::vm::start(ctx, names, no_ssh_wait).await
            }
            VmCommand::Stop { names } => commands::vm::stop(ctx, names).await,
            VmCommand::Snapshot { vm, name, quiet } => {
                commands::snapshot::take(ctx, vm, name, quiet).await
            }
            VmCommand::Fork {
                vm,
                count,
                name,
                keep_host_keys,
                no_ssh_wait,
                quiet,
            } => {
                let p = banger_wire::methods::VmForkParams {
                    vm,
                    count: Some(count),
                    name,
                    keep_host_keys,
                    wait: no_ssh_wait.then(|| "agent".to_string()),
                };
                commands::snapshot::fork(ctx, p, quiet).await
            }
            VmCommand::Pause { names } => commands::vm::pause(ctx, names).await,
            VmCommand::Resume { names } => commands::vm::resume(ctx, names).await,
            VmCommand::Restart { names, no_ssh_wait } => {
                commands::vm::restart(ctx, names, no_ssh_wait).await
            }
            VmCommand::Delete { names, force } => commands::vm::delete(ctx, names, force).await,
            VmCommand::Logs {
                name,
                follow,
                lines,
            } => commands::vm::logs(ctx, &name, follow, lines).await,
            VmCommand::Set {
                name,
                vcpus,
                memory,
                disk,
            } => {
                let p = banger_wire::methods::VmSetParams {
                    name,
                    vcpus,
                    memory_mib: memory,
                    disk_mib: disk,
                };
                commands::vm::set(ctx, p).await
            }
            VmCommand::Ssh { name, command } => commands::vm::ssh(ctx, &name, command).await,
            VmCommand::Authsync { name } => commands::vm::authsync(ctx, &name).await,
            VmCommand::Ports { name } => commands::vm::ports(ctx, &name).await,
            VmCommand::Net { command } => match command {
                NetCommand::Show { name } => commands::net::show(ctx, &name).await,
                NetCommand::Log { name, suggest } => commands::net::log(ctx, name, suggest).await,
                NetCommand::Set { name, mode } => commands::net::set(ctx, name, mode).await,
            },
            VmCommand::PortForward(pf) => match (pf.command, pf.name) {
                (Some(PortForwardCommand::List { name }), _) => {
                    commands::port_forward::list(ctx, name).await
                }
                (Some(PortForwardCommand::Remove { name, host }), _) => {
                    commands::port_forward::remove(ctx, &name, host).await
                }
                (None, Some(name)) => commands::port_forward::add(ctx, &name, pf.forwards).await,
                // clap requires NAME without a subcommand.
                (None, None) => Ok(exit::USAGE),
            },
            VmCommand::Stats { name, interval } => commands::vm::stats(ctx, &name, interval).await,
        },
        Command::Workspace(cmd) => match cmd {
            WorkspaceCommand::Prepare {
                vm,
                path,
                dest,
                include_ignored,
                depth,
                no_history,
                quiet,
            } => {
                let depth = if no_history { Some(1) } else { depth };
                commands::workspace::prepare(ctx, vm, path, dest, include_ignored, depth, quiet)
                    .await
            }
            WorkspaceCommand::Export {
                vm,
                path,
                dest,
                patch,
                branch,
                apply: _,
                committed_only,
                force,
                quiet,
            } => {
                commands::workspace::export(
                    ctx,
                    vm,
                    path,
                    dest,
                    patch,
                    branch,
                    committed_only,
                    force,
                    quiet,
                )
                .await
            }
            WorkspaceCommand::Status { vm, dest } => {
                commands::workspace::status(ctx, vm, dest).await
            }
        },
        Command::Secret(cmd) => match cmd {
            SecretCommand::Set { name, file } => {
                commands::secret::set(ctx, name, file.as_deref()).await
            }
            SecretCommand::List => commands::secret::list(ctx).await,
            SecretCommand::Rm { name } => commands::secret::rm(ctx, name).await,
        },
        Command::Snapshot(cmd) => match cmd {
            SnapshotCommand::List => commands::snapshot::list(ctx).await,
            SnapshotCommand::Show { name } => commands::snapshot::show(ctx, &name).await,
            SnapshotCommand::Delete { name } => commands::snapshot::delete(ctx, &name).await,
        },
        Command::Image(cmd) => match cmd {
            ImageCommand::List => commands::image::list(ctx).await,
            ImageCommand::Show { name } => commands::image::show(ctx, &name).await,
            ImageCommand::Build { recipe, quiet } => {
                commands::image::build(ctx, &recipe, quiet).await
            }
            ImageCommand::Pull {
                reference,
                name,
                quiet,
            } => commands::image::pull(ctx, reference, name, quiet).await,
            ImageCommand::Import {
                path,
                name,
                wait_ports,
                wait_timeout,
                quiet,
            } => {
                let p = banger_wire::methods::ImageImportParams {
                    path: std::path::absolute(&path)
                        .unwrap_or(path)
                        .display()
                        .to_string(),
                    name,
                    wait_ports,
                    wait_timeout_secs: wait_timeout,
                };
                commands::image::import(ctx, p, quiet).await
            }
            ImageCommand::Register {
                name,
                vmlinux,
                initrd,
                rootfs,
                work_seed,
                init,
            } => {
                commands::image::register(ctx, name, vmlinux, initrd, rootfs, work_seed, init).await
            }
            ImageCommand::Delete { name } => commands::image::delete(ctx, &name).await,
            ImageCommand::Promote { name } => commands::image::promote(ctx, &name).await,
        },
        Command::Mcp {
            allow,
            max_vms,
            ephemeral,
            net,
            secrets,
            secrets_in_body,
        } => {
            let secrets = commands::vm::grants(ctx, &secrets, &secrets_in_body)?;
            let opts = commands::mcp::McpOptions {
                allow,
                max_vms,
                ephemeral,
                net,
                secrets,
            };
            commands::mcp::run(ctx, opts).await
        }
        Command::Completions { shell } => commands::completions::run(shell),
    }
}
