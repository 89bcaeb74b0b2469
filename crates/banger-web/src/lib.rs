//! banger's local web UI and its HTTP API, served by the daemon.
//!
//! A thin adapter: every API route is one of the daemon's RPC methods run
//! in process through its own [`Router`] ([`Router::dispatch`]), so errors
//! carry the same codes and op ids as the CLI's. Long operations answer
//! `202 {"op_id"}` at once and run detached; `/api/ops/{op_id}` replays and
//! follows their stages as Server-Sent Events.
//!
//! Guards, on every request ([`guard`]): `Host` must be the bound address or
//! `localhost:PORT` (DNS rebinding), state-changing requests and WebSocket
//! upgrades must come from this server's own `Origin`, and everything but
//! `/login` needs the session cookie `banger web`'s one-time URL sets.

mod access;
mod api;
mod guard;
mod holder;
mod listener;
mod ops;

use std::sync::Arc;

pub use access::{AccessError, COOKIE, SECRET_FILE, WebAccess};
use banger_rpc::Router;
pub use holder::port_holder;
use tokio::sync::watch;

/// What the web server serves from.
#[derive(Debug)]
pub struct Backend {
    /// The daemon's RPC router: the one implementation of every operation.
    pub router: Arc<Router>,
    pub access: Arc<WebAccess>,
    /// Bumped whenever the VM list may have changed.
    pub vm_changes: watch::Receiver<u64>,
    /// The uid handlers see as the caller (the daemon's own: only its user
    /// holds the cookie).
    pub uid: u32,
}

/// Connections held at once (past it, new ones wait in the backlog).
const MAX_CONNECTIONS: usize = 128;

/// Serve the web UI and API on `listener` until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, backend: Backend) -> std::io::Result<()> {
    let listener = listener::Bounded::new(listener, MAX_CONNECTIONS);
    axum::serve(listener, api::app(backend)).await
}
