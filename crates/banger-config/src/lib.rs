//! banger's configuration file and filesystem layout.
//!
//! [`Paths::resolve`] decides where everything lives; [`Config::load`] reads
//! `config.toml`, rejecting unknown keys by name. Both the CLI and the daemon
//! use them, so they always agree on socket and file locations.

mod config;
pub mod lockfile;
mod paths;

pub use config::{
    AccelSetting, Config, ConfigError, DaemonConfig, HelperConfig, ImageConfig, NetworkConfig,
    ParseAccelError, QemuMachine, SecretStore, VmConfig, VmmConfig,
};
pub use paths::{Paths, PathsError, install_id};
