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

/// `s` with every control character escaped (`\u{1b}`), for one line of a
/// table: a guest-supplied string (a process name, a path) must not drive
/// the user's terminal. Command output streams (`vm exec`, `vm run`) stay
/// byte-exact; this is for what banger itself prints.
pub fn safe_line(s: &str) -> String {
    escape_controls(s, |_| false)
}

/// As [`safe_line`], keeping newlines and tabs: for messages that may span
/// lines (errors, which can quote the guest).
pub fn safe_text(s: &str) -> String {
    escape_controls(s, |c| c == '\n' || c == '\t')
}

fn escape_controls(s: &str, keep: impl Fn(char) -> bool) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_control() && !keep(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_text_cannot_reach_the_terminal_raw() {
        let evil = "httpd\x1b]0;pwned\x07\x1b[2J\r\nnext\u{9b}31m";
        assert_eq!(
            safe_line(evil),
            "httpd\\u{1b}]0;pwned\\u{7}\\u{1b}[2J\\r\\nnext\\u{9b}31m"
        );
        assert_eq!(safe_text("a\n\tb\x1b[0m"), "a\n\tb\\u{1b}[0m");
        assert_eq!(safe_line("plain ünïcode"), "plain ünïcode");
    }
}
