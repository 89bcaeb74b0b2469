//! `fc-double`: a stand-in for the `firecracker` binary in banger's tests.
//!
//! `fc-double --api-sock PATH [--id ID] [--spec PATH] [--guest-agent-cmd CMD]
//! [--guest-agent-port N] [--ignore-ctrl-alt-del]` serves Firecracker's API
//! over HTTP/1.1 on the Unix socket, validates every request against
//! Firecracker's OpenAPI file, applies the pre/post-boot rules (snapshots
//! too: made of paused VMs, loaded by fresh processes), emulates the hybrid
//! vsock device, and runs a host process as the guest agent, in namespaces
//! of its own (see `vmm::GUEST`). `fc-double --version` answers as
//! Firecracker does.
//!
//! `fc-double echo-agent --listen [unix:]PATH` is a tiny guest agent for
//! tests: it greets every connection with `fc-double echo-agent\n` and then
//! echoes what it receives.

mod locate;
mod spec;
mod vmm;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode, header};
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tokio::net::UnixListener;

use crate::spec::Spec;
use crate::vmm::{MAX_BODY, Options, Reply, Vmm};

/// How long the "guest" takes to power off after Ctrl+Alt+Del; it also lets
/// the 204 reach the client before the process exits.
const POWER_OFF_DELAY: Duration = Duration::from_millis(100);

/// Greeting the echo agent sends on every connection.
const ECHO_BANNER: &str = "fc-double echo-agent\n";

#[derive(Debug, Parser)]
#[command(
    name = "fc-double",
    about = "Firecracker stand-in for tests: validates API requests against Firecracker's OpenAPI spec",
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    /// Path of the API Unix socket to create.
    #[arg(long, required_unless_present = "version")]
    api_sock: Option<PathBuf>,
    /// Print the version as Firecracker does (`Firecracker v<the spec's
    /// version>`, then the snapshot format it reads) and exit.
    #[arg(long)]
    version: bool,
    /// Instance id reported by `GET /`.
    #[arg(long, default_value = "anonymous-instance")]
    id: String,
    /// Firecracker's OpenAPI file (default: found beside the repository).
    #[arg(long, env = "BANGER_FC_SPEC")]
    spec: Option<PathBuf>,
    /// Guest agent command line, run with `sh -c` at InstanceStart; `{sock}`
    /// becomes the Unix socket it must listen on, e.g.
    /// `banger-agent --listen unix:{sock}`.
    #[arg(long)]
    guest_agent_cmd: Option<String>,
    /// Guest vsock port the agent serves (banger's default is 1024).
    #[arg(long, default_value_t = 1024)]
    guest_agent_port: u32,
    /// Answer SendCtrlAltDel with 204 but never power off.
    #[arg(long)]
    ignore_ctrl_alt_del: bool,
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Test guest agent: greets, then echoes every connection.
    EchoAgent {
        /// `unix:PATH` or `PATH`.
        #[arg(long)]
        listen: String,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    match cli.command {
        Some(Cmd::EchoAgent { listen }) => {
            let path = PathBuf::from(listen.strip_prefix("unix:").unwrap_or(&listen));
            runtime.block_on(echo_agent(&path))
        }
        None if cli.version => {
            let spec = Spec::load(&locate::find_spec(cli.spec.as_deref())?)?;
            println!(
                "Firecracker v{}\n\nSupported snapshot data format versions: fc-double {}",
                spec.version(),
                vmm::SNAPSHOT_FORMAT
            );
            Ok(())
        }
        None => {
            let api_sock = cli.api_sock.expect("clap requires --api-sock");
            let spec_path = locate::find_spec(cli.spec.as_deref())?;
            let spec = Spec::load(&spec_path)?;
            let opts = Options {
                id: cli.id,
                api_sock,
                agent_cmd: cli.guest_agent_cmd,
                agent_port: cli.guest_agent_port,
                ignore_ctrl_alt_del: cli.ignore_ctrl_alt_del,
            };
            runtime.block_on(serve(spec, opts))
        }
    }
}

async fn serve(spec: Spec, opts: Options) -> anyhow::Result<()> {
    // Like Firecracker, refuse to reuse an existing path.
    let listener = UnixListener::bind(&opts.api_sock).with_context(|| {
        format!(
            "Failed to open the API socket at: {}",
            opts.api_sock.display()
        )
    })?;
    eprintln!(
        "fc-double[{}]: API socket {} up (Firecracker API {})",
        opts.id,
        opts.api_sock.display(),
        spec.version()
    );
    // SIGTERM kills Firecracker (default disposition); the double first
    // takes its stand-in guest down with it, then dies by the same signal.
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot watch SIGTERM")?;
    let id = opts.id.clone();
    let vmm = Arc::new(Vmm::new(spec, opts));
    let mut connections = 0u64;
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = accepted.context("accepting on the API socket")?;
                connections += 1;
                eprintln!("fc-double[{id}]: API connection {connections} opened");
                let vmm = Arc::clone(&vmm);
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let vmm = Arc::clone(&vmm);
                        async move { Ok::<_, hyper::Error>(answer(&vmm, req).await) }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
            _ = sigterm.recv() => {
                vmm.kill_guest().await;
                signal_hook::low_level::emulate_default_handler(signal_hook::consts::SIGTERM)
                    .context("re-raising SIGTERM")?;
                anyhow::bail!("still running after re-raising SIGTERM");
            }
            () = vmm.powered_off() => {
                tokio::time::sleep(POWER_OFF_DELAY).await;
                vmm.shut_down().await;
                eprintln!("fc-double: guest powered off, exiting");
                return Ok(());
            }
        }
    }
}

async fn answer(vmm: &Vmm, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let method = req.method().as_str().to_owned();
    let path = req.uri().path().to_owned();
    let reply = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(body) => vmm.handle(&method, &path, &body.to_bytes()),
        Err(e) => Reply::fault(format!(
            "Request payload could not be read (the API accepts at most {MAX_BODY} bytes): {e}"
        )),
    };
    let status = StatusCode::from_u16(reply.status).expect("handler statuses are valid");
    let builder = Response::builder().status(status);
    match reply.body {
        Some(body) => builder
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.to_string()))),
        None => builder.body(Full::new(Bytes::new())),
    }
    .expect("status and static headers form a valid response")
}

async fn echo_agent(path: &Path) -> anyhow::Result<()> {
    if path.exists() {
        std::fs::remove_file(path)
            .with_context(|| format!("removing stale socket {}", path.display()))?;
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    eprintln!("fc-double echo-agent: listening on {}", path.display());
    loop {
        let (mut stream, _) = listener.accept().await.context("accept")?;
        tokio::spawn(async move {
            if stream.write_all(ECHO_BANNER.as_bytes()).await.is_err() {
                return;
            }
            let (mut rd, mut wr) = stream.split();
            let _ = tokio::io::copy(&mut rd, &mut wr).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from(["fc-double", "echo-agent", "--listen", "unix:/x"]).unwrap();
        assert!(matches!(cli.command, Some(Cmd::EchoAgent { .. })));
        assert!(Cli::try_parse_from(["fc-double", "--id", "x"]).is_err());
        let cli = Cli::try_parse_from([
            "fc-double",
            "--api-sock",
            "/a",
            "--guest-agent-cmd",
            "agent --listen unix:{sock}",
        ])
        .unwrap();
        assert_eq!(cli.guest_agent_port, 1024);
        assert!(
            Cli::try_parse_from(["fc-double", "--version"])
                .unwrap()
                .version
        );
    }
}
