//! Methods served by `banger-helper`, the root helper. This list is the
//! helper's allowlist: it serves these and nothing else.

use serde::{Deserialize, Serialize};

use crate::{Method, NoParams};

/// `ping`: liveness, and who the helper is.
#[derive(Debug)]
pub struct Ping;
impl Method for Ping {
    const NAME: &'static str = "ping";
    type Params = NoParams;
    type Result = PingResult;
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PingResult {
    pub pid: u32,
    /// Effective uid of the helper (0 when it can do its job).
    pub euid: u32,
    pub version: String,
    pub uptime_s: u64,
}

/// `version`: the helper's build version and protocol version.
#[derive(Debug)]
pub struct Version;
impl Method for Version {
    const NAME: &'static str = "version";
    type Params = NoParams;
    type Result = VersionResult;
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VersionResult {
    pub version: String,
    pub protocol: u32,
}

/// Every method the helper serves.
pub const ALL: &[&str] = &[Ping::NAME, Version::NAME];
