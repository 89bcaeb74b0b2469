//! Methods served by `bangerd` to the CLI and the web UI.
//!
//! Each method is a unit type implementing [`crate::Method`]; its params and
//! result types live next to it. Later services (VMs, images, network,
//! workspaces) add their methods here, one module section per service.

use serde::{Deserialize, Serialize};

use crate::{Empty, Method, NoParams};

/// `daemon.status`: who is serving and since when.
#[derive(Debug)]
pub struct DaemonStatus;
impl Method for DaemonStatus {
    const NAME: &'static str = "daemon.status";
    type Params = NoParams;
    type Result = DaemonStatusResult;
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DaemonStatusResult {
    pub pid: u32,
    pub socket: String,
    pub version: String,
    pub protocol: u32,
    pub uptime_s: u64,
    pub state_dir: String,
    pub log_file: String,
}

/// `daemon.stop`: shut down cleanly after answering.
#[derive(Debug)]
pub struct DaemonStop;
impl Method for DaemonStop {
    const NAME: &'static str = "daemon.stop";
    type Params = NoParams;
    type Result = Empty;
}

/// `helper.ping`: the daemon forwards a ping (with the caller's op id) to
/// `banger-helper`, starting the helper first when it is the daemon's job to.
#[derive(Debug)]
pub struct HelperPing;
impl Method for HelperPing {
    const NAME: &'static str = "helper.ping";
    type Params = NoParams;
    type Result = crate::helper::PingResult;
}

/// Every method name `bangerd` serves, for `unknown_method` messages and docs.
pub const ALL: &[&str] = &[DaemonStatus::NAME, DaemonStop::NAME, HelperPing::NAME];
