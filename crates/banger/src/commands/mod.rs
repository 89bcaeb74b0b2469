//! One module per subcommand. Each `run` returns the process exit code.

pub mod completions;
pub mod config;
pub mod daemon;
pub mod doctor;
pub mod gc;
pub mod image;
pub mod mcp;
pub mod net;
pub mod port_forward;
pub mod progress;
pub mod secret;
pub mod snapshot;
pub mod tail;
pub mod version;
pub mod vm;
pub mod web;
pub mod workspace;

use crate::error::CliError;
use crate::out::outln;

/// Print `value` as pretty JSON on stdout.
pub fn print_json(value: &impl serde::Serialize) -> Result<(), CliError> {
    outln!(
        "{}",
        serde_json::to_string_pretty(value).expect("serialisable")
    );
    Ok(())
}
