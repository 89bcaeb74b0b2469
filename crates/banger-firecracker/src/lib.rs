//! banger's Firecracker driver.
//!
//! - [`models`]: the API bodies, written by hand from Firecracker's OpenAPI
//!   description.
//! - [`FirecrackerClient`]: HTTP/1.1 over the API Unix socket.
//! - [`spawn`], [`FirecrackerProcess`], [`configure_and_start`]: process
//!   control, with per-stage timings.
//! - [`connect_vsock`]: host-initiated hybrid vsock connections.
//!
//! Tested against `fc-double`, a stand-in binary that validates every
//! request against the same OpenAPI file.

mod client;
pub mod models;
mod process;
mod vsock;

pub use client::{ApiError, DEFAULT_REQUEST_TIMEOUT, FirecrackerClient};
pub use process::{
    ConfigureError, DEFAULT_READY_TIMEOUT, FirecrackerProcess, ProcessError, SpawnConfig, Stage,
    StageTiming, StartReport, StopOutcome, StopReport, VmConfig, configure_and_start, inherit_fds,
    spawn,
};
pub use vsock::{VsockError, connect_vsock};
