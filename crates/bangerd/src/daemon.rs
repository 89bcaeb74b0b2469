//! The daemon's own service: identity, uptime, and shutdown.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use banger_wire::methods::{DaemonStatusResult, HostNames};
use tokio::sync::watch;
use tracing::info;

#[derive(Debug)]
pub struct DaemonService {
    started: Instant,
    socket: PathBuf,
    state_dir: PathBuf,
    log_file: PathBuf,
    host_names: HostNames,
    shutdown: watch::Sender<bool>,
    web: Arc<banger_web::WebAccess>,
}

impl DaemonService {
    pub fn new(
        socket: PathBuf,
        state_dir: PathBuf,
        log_file: PathBuf,
        host_names: HostNames,
        shutdown: watch::Sender<bool>,
        web: Arc<banger_web::WebAccess>,
    ) -> Self {
        DaemonService {
            started: Instant::now(),
            socket,
            state_dir,
            log_file,
            host_names,
            shutdown,
            web,
        }
    }

    pub fn status(&self) -> DaemonStatusResult {
        DaemonStatusResult {
            pid: std::process::id(),
            socket: self.socket.display().to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            protocol: banger_wire::PROTOCOL_VERSION,
            uptime_s: self.started.elapsed().as_secs(),
            state_dir: self.state_dir.display().to_string(),
            log_file: self.log_file.display().to_string(),
            host_names: self.host_names.clone(),
            web_url: self.web.url(),
            web_error: self.web.failed().map(str::to_string),
        }
    }

    pub fn state_dir(&self) -> &std::path::Path {
        &self.state_dir
    }

    /// Ask the server loop to stop once the current request is answered.
    pub fn request_stop(&self, why: &str) {
        info!(reason = why, "shutdown requested");
        self.shutdown.send_replace(true);
    }
}
