//! `banger-helper`: a small root process doing only the privileged host work
//! banger needs, on resources banger owns.
//!
//! It listens on its own socket, accepts only the uids given with
//! `--allow-uid` (checked with SO_PEERCRED), and serves exactly the methods in
//! [`banger_wire::helper::ALL`]. It logs JSON lines; each call ends with one
//! `helper rpc completed` / `helper rpc failed` line carrying the op id the
//! daemon forwarded and the call's duration.
//!
//! Each `--state-dir` is one banger install it serves. Files it attaches to
//! loop devices must lie under one of them, and it touches only bridges and
//! nftables tables marked with one of their install ids, for the uid that
//! owns that state directory; without one, the `disk.*` methods refuse
//! every file and the `net.*` methods every bridge and table.

use std::fs::OpenOptions;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use banger_config::lockfile::{LockError, LockFile};
use banger_disk::{DiskService, LinuxHostDisk};
use banger_net::{Install, LinuxHostNet, NetService};
use banger_rpc::{ServeConfig, bind_socket, secure_socket_node, serve};
use clap::Parser;
use tokio::signal::unix::{SignalKind, signal};
use tracing::info;
use tracing_subscriber::EnvFilter;

#[derive(Debug, Parser)]
#[command(version, about = "banger's root helper")]
struct Args {
    /// Socket to listen on.
    #[arg(long, default_value = "/run/banger/helper.sock")]
    socket: PathBuf,
    /// Uid allowed to connect (the user banger runs as). Repeatable.
    #[arg(long = "allow-uid", required = true, value_name = "UID")]
    allow_uids: Vec<u32>,
    /// banger's state directory (repeatable): the only place whose files
    /// may be attached to loop devices for root disks, and the installs
    /// whose bridges and tables (`banger-<install id>`) it acts on, each
    /// for the uid owning the directory.
    #[arg(long = "state-dir", value_name = "DIR")]
    state_dirs: Vec<PathBuf>,
    /// Append JSON log lines here instead of stderr.
    #[arg(long)]
    log_file: Option<PathBuf>,
    /// Start a new session, detached from the caller.
    #[arg(long)]
    detach: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.detach {
        rustix::process::setsid().context("setsid")?;
    }
    anyhow::ensure!(
        rustix::process::geteuid().is_root(),
        "banger-helper must run as root (it manages tap devices, bridges, NAT, loop devices and mounts)"
    );
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .json()
        .with_current_span(true)
        .with_span_list(false)
        .with_env_filter(filter);
    match &args.log_file {
        Some(path) => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let f = OpenOptions::new().create(true).append(true).open(path)?;
            builder.with_writer(Mutex::new(f)).init();
        }
        None => builder.with_writer(std::io::stderr).init(),
    }
    let dir = args
        .socket
        .parent()
        .context("socket path has no parent directory")?;
    std::fs::create_dir_all(dir)?;
    // One helper per socket: the lock makes removing a stale socket safe, and
    // names our pid for whoever needs to find us.
    let mut lock = match LockFile::try_acquire(&args.socket.with_extension("lock")) {
        Ok(lock) => lock,
        Err(e @ LockError::Held { .. }) => anyhow::bail!(
            "another banger-helper already serves {}: {e}",
            args.socket.display()
        ),
        Err(e) => return Err(e.into()),
    };
    lock.write_pid()?;

    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(run(args))?;
    drop(lock);
    Ok(())
}

async fn run(args: Args) -> anyhow::Result<()> {
    let listener = bind_socket(&args.socket)
        .with_context(|| format!("cannot listen on {}", args.socket.display()))?;
    // The socket is 0600; hand it to the allowed user so an unprivileged daemon can connect.
    if let [uid] = args.allow_uids[..] {
        secure_socket_node(&args.socket, Some(uid))
            .with_context(|| format!("cannot chown {}", args.socket.display()))?;
    }
    let host = LinuxHostNet::new().context("cannot open a netlink socket")?;
    let installs = args
        .state_dirs
        .iter()
        .map(|dir| Install::new(&banger_config::install_id(dir), dir))
        .collect();
    let mut net = NetService::new(host, args.allow_uids.clone(), installs);
    let mut disks = DiskService::new(LinuxHostDisk::new(), args.state_dirs.clone());
    if let Some(pause) = banger_helper::fault::from_env(&args.socket)? {
        net = net.with_pause_point(pause.clone());
        disks = disks.with_pause_point(pause);
    }
    let router = banger_helper::router(net, disks);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        let _ = stop_tx.send(true);
    });
    info!(pid = std::process::id(), socket = %args.socket.display(), allowed_uids = ?args.allow_uids, state_dirs = ?args.state_dirs, "banger-helper started");
    let cfg = ServeConfig {
        name: "helper",
        allowed_uids: args.allow_uids.clone(),
    };
    serve(
        listener,
        cfg,
        Arc::new(router),
        stop_rx,
        Duration::from_secs(10),
    )
    .await;
    let _ = std::fs::remove_file(&args.socket);
    info!("banger-helper stopped");
    Ok(())
}
