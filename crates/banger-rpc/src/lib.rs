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
    Ctx, EventSink, Router, RpcError, ServeConfig, bind_socket, serve, serve_connection,
};
