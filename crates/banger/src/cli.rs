//! Command-line definitions. Each subcommand's behaviour lives in
//! `commands/<name>.rs`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "banger",
    about = "Disposable Linux microVMs on your own machine, in seconds",
    disable_version_flag = true,
    after_help = "Exit codes: 0 success, 1 the operation failed, 2 usage error, 3 the daemon could not be reached or started."
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Args)]
pub struct Global {
    /// Keep config, state and runtime files under DIR (also: BANGER_HOME).
    #[arg(long, global = true, value_name = "DIR")]
    pub home: Option<PathBuf>,
    /// Print machine-readable JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    /// Print CLI and daemon versions.
    #[arg(short = 'V', long)]
    pub version: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Manage the banger daemon (bangerd).
    #[command(subcommand)]
    Daemon(DaemonCommand),
    /// Show the effective configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Check what this host has and lacks for running VMs, with fixes.
    Doctor,
    /// Print a shell completion script.
    Completions { shell: clap_complete::Shell },
}

#[derive(Debug, Subcommand)]
pub enum DaemonCommand {
    /// Show whether the daemon runs, its pid, socket, version and uptime.
    Status,
    /// Start the daemon if it is not running (other commands do this on their own).
    Start,
    /// Stop the daemon cleanly. Running VMs keep running.
    Stop,
    /// Print the daemon's log.
    Logs {
        /// Keep printing new lines as they are written.
        #[arg(short, long)]
        follow: bool,
        /// Only the last N lines.
        #[arg(short = 'n', long, value_name = "N")]
        lines: Option<usize>,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print the configuration in effect (defaults merged with config.toml) and the paths in use.
    Show,
}
