//! The CLI's exit codes (also listed in `banger --help` and README.md).

/// The operation failed: the daemon or helper reported an error, or
/// `doctor` found a failing check.
pub const FAILED: u8 = 1;
/// Usage error (bad flags or arguments); clap's own code.
pub const USAGE: u8 = 2;
/// The daemon could not be reached or started.
pub const DAEMON_UNAVAILABLE: u8 = 3;
/// `vm run` / `vm exec` only: banger itself failed. Other codes are the
/// command's own (128 + N when a signal N ended it), or a shell's for a
/// command that could not start (127 not there, 126 not runnable).
pub const RUN_FAILED: u8 = 125;
/// Standard output was closed by its reader (`banger vm list | head -1`):
/// the process ends by SIGPIPE, and where that cannot be raised, with the
/// code a shell reports for it.
pub const STDOUT_CLOSED: u8 = 128 + 13;
