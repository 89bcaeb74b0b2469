//! banger's RPC transport: newline-delimited JSON frames over a Unix socket.
//!
//! - [`frame`]: reading one bounded frame from a stream.
//! - [`Client`]: the caller side (CLI → daemon, daemon → helper).
//! - [`Router`] + [`serve`]: the server side, typed by [`banger_wire::Method`].
//!   The server mints the op id at dispatch entry, runs the handler inside a
//!   tracing span carrying it, and stamps it on every answer.

mod client;
pub mod frame;
mod server;

pub use client::{Client, ClientError};
pub use server::{
    Call, EventSink, Router, RpcError, ServeConfig, bind_socket, secure_socket_node, serve,
    serve_connection,
};

/// An error and its sources on one line, skipping a source whose text the
/// message already contains (thiserror messages often embed it).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        let t = inner.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        src = inner.source();
    }
    s
}
