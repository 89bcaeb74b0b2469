//! `bangerd`, the banger daemon.
//!
//! The daemon is a set of services, each owning its state and locks, wired
//! to RPC methods in [`routes`]. It runs unprivileged; privileged host work
//! goes through [`helper::HelperLink`] to `banger-helper`.

pub mod ca;
pub mod daemon;
pub mod dns;
pub mod doctor;
pub mod errors;
pub mod forward;
pub mod helper;
pub mod images;
pub mod logging;
pub mod network;
pub mod ops;
pub mod proxy;
pub mod routes;
pub mod secrets;
pub mod sessions;
pub mod ssh;
pub mod start;
pub mod vms;
pub mod workspaces;
