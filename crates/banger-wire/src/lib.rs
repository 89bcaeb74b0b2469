//! Wire types shared by every banger process that speaks the banger protocol:
//! the CLI, `bangerd`, `banger-helper` and the web UI.
//!
//! The protocol is newline-delimited JSON over a Unix socket. A connection
//! carries one request at a time; a request is answered by zero or more
//! `event` frames followed by exactly one `result` or `error` frame.
//!
//! This crate knows nothing about sockets or async runtimes: it defines the
//! envelope ([`Request`], [`Response`]), the typed error object
//! ([`ErrorObject`], [`ErrorCode`]), the op id ([`OpId`]) and the method
//! catalogue ([`methods`], [`helper`]).

/// Declares an RPC method type: `method!(/// docs\n Name, "wire.name", Params, Result);`
macro_rules! method {
    ($(#[$doc:meta])* $ty:ident, $name:literal, $params:ty, $result:ty) => {
        $(#[$doc])*
        #[derive(Debug)]
        pub struct $ty;
        impl $crate::Method for $ty {
            const NAME: &'static str = $name;
            type Params = $params;
            type Result = $result;
        }
    };
}

mod envelope;
mod error;
pub mod helper;
mod kinds;
pub mod methods;
mod opid;

pub use envelope::{Request, RequestError, Response, ResponseBody, encode_frame};
pub use error::{ErrorCode, ErrorObject};
pub use kinds::{InitMode, ParseKindError, Vmm};
pub use opid::{OpId, OpIdError};

/// Version of the envelope. Bumped on any incompatible change to the
/// envelope or to an existing method's params or result.
pub const PROTOCOL_VERSION: u32 = 1;

/// Largest frame (one JSON document plus its newline) either side accepts.
pub const MAX_FRAME_BYTES: usize = 1024 * 1024;

/// A typed RPC method: its wire name, parameters and result.
///
/// Both the server's router and the client's `call` are generic over this
/// trait, so a method's name and types are written down exactly once.
pub trait Method {
    /// Name on the wire, `<service>.<verb>`.
    const NAME: &'static str;
    /// Parameters; decoded with `deny_unknown_fields` by convention.
    type Params: serde::Serialize + serde::de::DeserializeOwned + Send + 'static;
    /// Result of a successful call.
    type Result: serde::Serialize + serde::de::DeserializeOwned + Send + 'static;
}

/// Parameters of methods that take none. Accepts `{}` and a missing/`null`
/// `params` (the envelope normalises `null` to `{}`).
#[derive(
    Debug,
    Default,
    Clone,
    Copy,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    schemars::JsonSchema,
)]
#[serde(deny_unknown_fields)]
pub struct NoParams {}

/// Result of methods that return nothing but success.
#[derive(
    Debug,
    Default,
    Clone,
    Copy,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    schemars::JsonSchema,
)]
pub struct Empty {}
