use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use banger_config::lockfile::{LockError, LockFile};
use banger_config::{Config, Paths};
use banger_rpc::{ServeConfig, bind_socket, serve};
use bangerd::routes::router;
use bangerd::vms::Fault;
use clap::Parser;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info};

/// The banger daemon. Normally started by the `banger` CLI on first use.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Keep config, state and runtime files under DIR (default: BANGER_HOME, else XDG dirs).
    #[arg(long, value_name = "DIR")]
    home: Option<PathBuf>,
    /// Start a new session, detached from the terminal (what the CLI uses).
    #[arg(long)]
    detach: bool,
    /// Also log human-readable lines to stderr.
    #[arg(short, long)]
    verbose: bool,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            error!("bangerd failed: {e:#}");
            eprintln!("bangerd: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    if args.detach {
        // A new session: the daemon must not die with the terminal that started it.
        rustix::process::setsid().context("setsid")?;
    }
    // Disks, console logs, the database and keys are the user's alone,
    // whatever umask started us: everything the daemon and its children
    // (QEMU, qemu-img, mkfs) create is 0600 / 0700.
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    let paths = Paths::resolve(args.home.as_deref())?;
    let config = Config::load(&paths.config_file)?;
    for dir in [&paths.state_dir, &paths.runtime_dir] {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        // Also one made under a looser umask by an older banger.
        std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .with_context(|| format!("cannot make {} private", dir.display()))?;
    }
    let mut lock = match LockFile::try_acquire(&paths.daemon_lock()) {
        Ok(l) => l,
        Err(LockError::Held { holder, .. }) => {
            anyhow::bail!(
                "another bangerd is already running for {} (pid {})",
                paths.state_dir.display(),
                holder.map_or_else(|| "unknown".into(), |p| p.to_string())
            )
        }
        Err(e) => return Err(e.into()),
    };
    lock.write_pid()?;
    bangerd::logging::init(&paths.daemon_log(), &config.daemon.log_filter, args.verbose)?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(serve_daemon(paths, config))?;
    drop(lock);
    Ok(())
}

async fn serve_daemon(paths: Paths, config: Config) -> anyhow::Result<()> {
    let fds = raise_fd_limit();
    let socket = paths.daemon_socket();
    let (stop_tx, stop_rx) = watch_channel();
    let fault = fault_injection_from_env(&paths)?;
    let services = bangerd::start::services(&paths, &config, fault, stop_tx).await?;
    // We hold the daemon lock, so any socket file left there is stale.
    let listener =
        bind_socket(&socket).with_context(|| format!("cannot listen on {}", socket.display()))?;
    info!(pid = std::process::id(), socket = %socket.display(), version = env!("CARGO_PKG_VERSION"), fd_limit = ?fds, "bangerd started");

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let sig_services = services.clone();
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        sig_services.daemon.request_stop(name);
    });

    let uid = rustix::process::getuid().as_raw();
    let router = Arc::new(router(services.clone()));
    if config.web.enabled {
        serve_web(&config, &services, router.clone(), uid).await;
    }
    let cfg = ServeConfig {
        name: "daemon",
        allowed_uids: vec![uid],
    };
    serve(listener, cfg, router, stop_rx, Duration::from_secs(10)).await;
    let _ = std::fs::remove_file(&socket);
    info!("bangerd stopped");
    Ok(())
}

/// Serve the web UI next to the socket. A port that cannot be had is logged
/// (with what holds it) and reported by `daemon status` and `doctor`; the
/// CLI is served all the same.
async fn serve_web(
    config: &Config,
    services: &Arc<bangerd::routes::Services>,
    router: Arc<banger_rpc::Router>,
    uid: u32,
) {
    let access = services.web.clone();
    // Checked when the config was loaded.
    let Ok(addr) = config.web.listen_addr() else {
        return;
    };
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            let holder = banger_web::port_holder(addr)
                .map(|h| format!(" (held by {h})"))
                .unwrap_or_default();
            let why = format!("cannot listen on {addr}: {e}{holder}");
            error!("web UI not served: {why}; the CLI is served as usual");
            access.set_failed(why);
            return;
        }
    };
    let bound = match listener.local_addr() {
        Ok(a) => a,
        Err(e) => {
            access.set_failed(format!("cannot read the web listener's address: {e}"));
            return;
        }
    };
    access.set_bound(bound);
    info!(url = %format!("http://{bound}"), "web UI served");
    let backend = banger_web::Backend {
        router,
        access,
        vm_changes: services.vms.changes(),
        uid,
    };
    tokio::spawn(async move {
        if let Err(e) = banger_web::serve(listener, backend).await {
            error!(error = %e, "the web server stopped");
        }
    });
}

fn watch_channel() -> (
    tokio::sync::watch::Sender<bool>,
    tokio::sync::watch::Receiver<bool>,
) {
    tokio::sync::watch::channel(false)
}

/// Test seam for rollback and crash tests: `BANGER_FAULT_INJECT=<step>`
/// makes each create (or start) fail right after that step made its
/// resources, as a real failure there would; `<step>:pause` holds it there
/// until the file `<runtime>/fault-release` appears. Steps:
/// [`bangerd::vms::CREATE_STEPS`], [`bangerd::vms::SEAM_STEPS`] and
/// [`bangerd::vms::PULL_STEPS`] (those only with `:pause`).
fn fault_injection_from_env(paths: &Paths) -> anyhow::Result<Option<Fault>> {
    let Some(v) = std::env::var_os("BANGER_FAULT_INJECT") else {
        return Ok(None);
    };
    let v = v.to_string_lossy();
    let (name, pause) = match v.strip_suffix(":pause") {
        Some(name) => (name, true),
        None => (&*v, false),
    };
    let known = bangerd::vms::CREATE_STEPS
        .iter()
        .chain(&bangerd::vms::SEAM_STEPS)
        .chain(&bangerd::vms::PULL_STEPS);
    match known.clone().find(|s| **s == name) {
        Some(step) if step.starts_with("pull:") && !pause => {
            anyhow::bail!("BANGER_FAULT_INJECT={v:?}: a pull step can only pause ({name}:pause)")
        }
        Some(step) => {
            tracing::warn!(step, pause, "fault injection is on");
            let release = pause.then(|| paths.runtime_dir.join("fault-release"));
            Ok(Some(Fault { step, release }))
        }
        None => anyhow::bail!(
            "BANGER_FAULT_INJECT={v:?}: {name:?} is not a step (one of: {}; add :pause to pause there)",
            known.copied().collect::<Vec<_>>().join(", ")
        ),
    }
}

/// The descriptor soft limit raised to the hard one: guests' DNS queries,
/// port-forward connections and VMMs' sockets all draw on it, and the RPC
/// socket must still accept when they peak (they are bounded too). Returns
/// the limit in force, for the start-up log line.
fn raise_fd_limit() -> Option<u64> {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut lim = getrlimit(Resource::Nofile);
    if let Some(max) = lim.maximum
        && lim.current.is_some_and(|c| c < max)
    {
        lim.current = Some(max);
        let _ = setrlimit(Resource::Nofile, lim);
    }
    getrlimit(Resource::Nofile).current
}
