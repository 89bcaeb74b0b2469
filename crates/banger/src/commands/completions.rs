use clap::CommandFactory;

use crate::cli::Cli;
use crate::error::CliError;

pub fn run(shell: clap_complete::Shell) -> Result<u8, CliError> {
    // clap_complete panics when its writer fails; write to memory, then out.
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "banger", &mut script);
    crate::out::bytes(&script)?;
    Ok(0)
}
