//! Standard output that a closed pipe ends quietly.
//!
//! `println!` panics when stdout is a pipe whose reader went away
//! (`banger vm list | head -1`). Every line the CLI prints goes through
//! [`outln!`] instead: a broken pipe becomes [`CliError::StdoutClosed`], the
//! command unwinds through its own clean-up (so `vm run` still deletes its
//! VM), and `main` then ends the process by SIGPIPE, as other CLIs end.

use std::io::Write;

use crate::error::CliError;

/// Write `args` and a newline to stdout.
pub fn line(args: std::fmt::Arguments<'_>) -> Result<(), CliError> {
    let mut out = std::io::stdout().lock();
    out.write_fmt(args)
        .and_then(|()| out.write_all(b"\n"))
        .map_err(CliError::from_stdout)
}

/// Write raw bytes to stdout and flush them.
pub fn bytes(data: &[u8]) -> Result<(), CliError> {
    let mut out = std::io::stdout().lock();
    out.write_all(data)
        .and_then(|()| out.flush())
        .map_err(CliError::from_stdout)
}

/// `println!` for the CLI: returns early with [`CliError::StdoutClosed`]
/// (or another write error) from the enclosing function.
macro_rules! outln {
    () => {
        $crate::out::line(format_args!(""))?
    };
    ($($arg:tt)*) => {
        $crate::out::line(format_args!($($arg)*))?
    };
}
pub(crate) use outln;
