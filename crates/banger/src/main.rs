//! `banger`: the command-line client. It starts `bangerd` on first use and
//! talks to it over its Unix socket.

mod cli;
mod commands;
mod context;
mod error;
mod exit;

use std::process::ExitCode;

use clap::{CommandFactory, Parser};

use crate::cli::{Cli, Command, ConfigCommand, DaemonCommand};
use crate::context::Ctx;
use crate::error::CliError;

fn main() -> ExitCode {
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
            eprintln!("error: {e}");
            return ExitCode::from(exit::FAILED);
        }
    };
    let ctx = Ctx::new(paths, cli.global.json);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = runtime.block_on(dispatch(&ctx, cli));
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

async fn dispatch(ctx: &Ctx, cli: Cli) -> Result<u8, CliError> {
    if cli.global.version {
        return Ok(commands::version::run(ctx).await);
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
        Command::Completions { shell } => Ok(commands::completions::run(shell)),
    }
}
