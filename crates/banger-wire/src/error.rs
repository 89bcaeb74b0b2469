use std::fmt;

use serde::{Deserialize, Serialize};

use crate::OpId;

/// Typed error codes. Clients branch on these, never on messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The envelope's `v` is not a version this server speaks.
    BadVersion,
    /// The frame is not a well-formed request: invalid UTF-8, invalid JSON,
    /// missing envelope fields, or larger than [`crate::MAX_FRAME_BYTES`].
    InvalidRequest,
    /// No method by that name.
    UnknownMethod,
    /// The params do not decode into the method's parameter type, or a value
    /// in them is refused (a name, path or address outside banger's).
    InvalidParams,
    /// The peer's uid may not use this socket.
    PermissionDenied,
    /// The named VM, image or other object does not exist.
    NotFound,
    /// The request conflicts with the current state (name taken, VM running…).
    Conflict,
    /// A dependency is not there right now (helper down, VMM missing…).
    Unavailable,
    /// A bug or an unexpected host failure.
    Internal,
    /// Stopped by `op.cancel` before it finished; nothing was changed.
    Cancelled,
    /// A code this build does not know (sent by a newer peer).
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadVersion => "bad_version",
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::UnknownMethod => "unknown_method",
            ErrorCode::InvalidParams => "invalid_params",
            ErrorCode::PermissionDenied => "permission_denied",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Conflict => "conflict",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
            ErrorCode::Cancelled => "cancelled",
            ErrorCode::Unknown => "unknown",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error object of an `error` response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ErrorObject {
    pub code: ErrorCode,
    pub message: String,
    pub op_id: OpId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<serde_json::Value>,
}

impl fmt::Display for ErrorObject {
    /// The form the CLI prints after `error: `.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message, self.op_id)
    }
}

impl std::error::Error for ErrorObject {}
