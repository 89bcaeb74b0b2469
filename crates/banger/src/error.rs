use banger_rpc::ClientError;
use banger_wire::OpId;

use crate::exit;

/// An error the CLI prints as `error: <message> (<op id>)` before exiting.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The daemon (or the helper behind it) answered with an error; its
    /// message already carries the op id.
    #[error("{0}")]
    Remote(banger_wire::ErrorObject),
    /// The daemon could not be reached or started.
    #[error("{message} ({op_id})")]
    Unavailable { message: String, op_id: OpId },
    /// Anything else that failed on this side.
    #[error("{message} ({op_id})")]
    Local { message: String, op_id: OpId },
    /// Standard output is a pipe nobody reads any more: the command stops
    /// without a message (see `out.rs`).
    #[error("standard output is closed")]
    StdoutClosed,
    /// Writing standard output failed otherwise (a full disk, say).
    #[error("cannot write standard output: {0}")]
    Stdout(std::io::Error),
}

impl CliError {
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Unavailable { .. } => exit::DAEMON_UNAVAILABLE,
            // Cancelled by Ctrl-C, as a shell reports SIGINT.
            CliError::Remote(o) if o.code == banger_wire::ErrorCode::Cancelled => 130,
            CliError::Remote(_) | CliError::Local { .. } | CliError::Stdout(_) => exit::FAILED,
            CliError::StdoutClosed => exit::STDOUT_CLOSED,
        }
    }

    pub fn from_stdout(e: std::io::Error) -> Self {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            CliError::StdoutClosed
        } else {
            CliError::Stdout(e)
        }
    }

    pub fn local(op_id: &OpId, message: impl std::fmt::Display) -> Self {
        CliError::Local {
            message: message.to_string(),
            op_id: op_id.clone(),
        }
    }

    pub fn from_client(op_id: &OpId, e: ClientError) -> Self {
        match e {
            ClientError::Remote(obj) => CliError::Remote(obj),
            other => CliError::Unavailable {
                message: format!("lost the connection to bangerd: {other}"),
                op_id: op_id.clone(),
            },
        }
    }
}
