//! Protocol between banger (host) and `banger-agent` (guest), plus the
//! async host-side client ([`AgentClient`], feature `client`, on by default).
//!
//! One byte stream (a virtio-serial port, an AF_VSOCK connection or a Unix
//! socket) carries everything, multiplexed by stream id. See [`frame`] for
//! the frame layout. A connection goes:
//!
//! 1. The host sends `Hello` (protocol version, random nonce), repeating it
//!    until answered: a virtio-serial port drops what the host writes while
//!    the guest has it closed.
//! 2. The agent skips any garbage before a valid `Hello` and answers
//!    `HelloAck` echoing the nonce. The host skips everything before the
//!    `HelloAck` with its nonce: bytes queued for an earlier connection.
//! 3. Each call gets a fresh stream id (host-chosen, non-zero): a `Request`
//!    frame, answered by one `Response`. `exec` then carries `Stdin`,
//!    `StdinClose`, `Signal`, `Cancel` (host → agent) and `Stdout`,
//!    `Stderr`, one final `Exit` (agent → host) on the same stream.
//! 4. Data is credit-based: each exec starts with [`INITIAL_WINDOW`] bytes
//!    of credit per direction and `Window` frames return credit as the
//!    receiver consumes data, so neither side buffers more than the window
//!    per exec however fast the producer is.
//!
//! A new `Hello` with a different nonce, or (on virtio-serial) the host
//! disconnecting, ends the session: the agent kills the session's processes.

pub mod frame;
pub mod guest;
mod messages;

#[cfg(feature = "client")]
mod client;

#[cfg(feature = "client")]
pub use client::{
    AgentClient, AgentError, ExecEvent, ExecOutput, ExecSession, ExecSignaller, ExecStdin,
};
pub use frame::{
    Frame, FrameDecoder, FrameError, FrameKind, HandshakeScan, INITIAL_WINDOW, MAX_DATA_CHUNK,
    MAX_PAYLOAD, decode_frame, encode_frame, scan_handshake,
};
pub use guest::{SYSTEMD_UNIT, UDEV_RULE};
pub use messages::*;
