//! `banger mcp`: a Model Context Protocol server on stdio (rmcp), for coding
//! agents. It is a client of the daemon like the rest of the CLI: every
//! tool is one or a few daemon RPCs under an op id of its own, minted per
//! call and reported in the tool's result (and so in the daemon's log).
//!
//! Files in the guest are read, written and listed by exec of fixed
//! commands (`sh -c` with a constant script, `find`) through `vm.exec`; the
//! path is always an argument, never part of a script.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use banger_wire::OpId;
use banger_wire::methods::*;
use base64::Engine as _;
use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{
    CallToolResult, ContentBlock, Implementation, ListResourceTemplatesResult, ListResourcesResult,
    PaginatedRequestParams, ReadResourceRequestParams, ReadResourceResponse, ReadResourceResult,
    Resource, ResourceContents, ResourceTemplate, ServerCapabilities, ServerConfig,
};
use rmcp::service::RequestContext;
use rmcp::{ErrorData, RoleServer, ServerHandler, ServiceExt, schemars, tool, tool_handler};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::context::Invocation;
use crate::error::CliError;

/// Every tool, as `--allow` names them.
pub const TOOLS: &[&str] = &[
    "vm_create",
    "vm_exec",
    "file_read",
    "file_write",
    "file_list",
    "workspace_export",
    "port_forward_add",
    "port_forward_list",
    "port_forward_remove",
    "vm_list",
    "vm_stop",
    "vm_delete",
];

const DEFAULT_EXEC_TIMEOUT_SECS: u64 = 60;
const MAX_EXEC_TIMEOUT_SECS: u64 = 3600;
const DEFAULT_OUTPUT_CAP: usize = 64 * 1024;
const MAX_OUTPUT_CAP: usize = 1024 * 1024;
const DEFAULT_READ_BYTES: usize = 256 * 1024;
const MAX_READ_BYTES: usize = 1024 * 1024;
const MAX_WRITE_BYTES: usize = 1024 * 1024;
const DEFAULT_LIST_ENTRIES: usize = 1000;
const MAX_LIST_ENTRIES: usize = 10_000;
/// Stdin chunks sent per `vm.exec_input` frame (base64 stays well under the
/// 1 MiB frame limit).
const INPUT_CHUNK: usize = 384 * 1024;
const CONSOLE_TAIL_BYTES: u64 = 64 * 1024;
/// How long an exec that timed out gets to end after SIGKILL.
const KILL_GRACE: Duration = Duration::from_secs(10);

/// The flags of `banger mcp`.
#[derive(Debug, Clone)]
pub struct McpOptions {
    pub allow: Option<Vec<String>>,
    pub max_vms: Option<u32>,
    pub ephemeral: bool,
    /// Every VM's network policy and secret grants: the human's choice,
    /// never the agent's (the tools take neither).
    pub net: Option<String>,
    pub secrets: Vec<SecretGrant>,
}

/// A tool's failure, shown to the agent as an `isError` result.
struct ToolError(String);

impl From<CliError> for ToolError {
    fn from(e: CliError) -> Self {
        ToolError(crate::out::safe_text(&e.to_string()))
    }
}

fn bad(arg: &str, why: impl std::fmt::Display) -> ToolError {
    ToolError(format!("invalid argument `{arg}`: {why}"))
}

type ToolResult = Result<Value, ToolError>;

/// One tool call: its own op id, in the result whatever happens.
fn finish(op_id: &OpId, result: ToolResult) -> CallToolResult {
    match result {
        Ok(mut v) => {
            if let Value::Object(m) = &mut v {
                m.insert("op_id".into(), json!(op_id));
            }
            CallToolResult::structured(v)
        }
        Err(ToolError(msg)) => {
            let msg = if msg.contains(op_id.as_str()) {
                msg
            } else {
                format!("{msg} ({op_id})")
            };
            CallToolResult::error(vec![ContentBlock::text(msg)])
        }
    }
}

#[derive(Debug)]
struct Session {
    base: Invocation,
    /// The daemon session the VMs are tied to (`--ephemeral`).
    daemon_session: Option<String>,
    max_vms: Option<u32>,
    net: Option<String>,
    secrets: Vec<SecretGrant>,
    /// VMs this session created (or is creating), by name.
    created: Mutex<BTreeSet<String>>,
    /// Creates counted against `--max-vms` (failed ones are not).
    counted: Mutex<u32>,
}

#[derive(Debug, Clone)]
pub struct Banger {
    session: Arc<Session>,
    tool_router: ToolRouter<Self>,
}

// ---------------------------------------------------------------------------
// Tool arguments

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateArgs {
    /// VM name (1-40 lowercase letters, digits, '-'); default: mcp-<random>.
    #[serde(default)]
    pub name: Option<String>,
    /// Image name; the default image when absent.
    #[serde(default)]
    pub image: Option<String>,
    #[serde(default)]
    pub vcpus: Option<u32>,
    #[serde(default)]
    pub memory_mib: Option<u32>,
    /// Work disk (/root) size.
    #[serde(default)]
    pub disk_mib: Option<u32>,
    /// A host git checkout (absolute path) to copy into the VM once it runs.
    #[serde(default)]
    pub workspace: Option<String>,
    /// Report the VM ready once its `agent` answers (default; enough for
    /// the other tools) or once its `ssh` server does too.
    #[serde(default)]
    pub wait: Option<String>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecArgs {
    pub vm: String,
    /// The command as an argument vector (no shell). Give this or `command`.
    #[serde(default)]
    pub argv: Option<Vec<String>>,
    /// A shell command line, run by /bin/sh -c. Give this or `argv`.
    #[serde(default)]
    pub command: Option<String>,
    /// Working directory in the guest (absolute).
    #[serde(default)]
    pub cwd: Option<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Seconds before the command is killed (SIGKILL); default 60, at most 3600.
    #[serde(default)]
    pub timeout_secs: Option<u64>,
    /// Bytes kept of stdout and of stderr each; default 65536, at most 1048576.
    #[serde(default)]
    pub max_output_bytes: Option<usize>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReadArgs {
    pub vm: String,
    /// Absolute path in the guest.
    pub path: String,
    /// Bytes returned at most; default 262144, at most 1048576.
    #[serde(default)]
    pub max_bytes: Option<usize>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WriteArgs {
    pub vm: String,
    /// Absolute path in the guest; missing parent directories are made.
    pub path: String,
    /// The file's new content (at most 1 MiB).
    pub content: String,
    /// `utf8` (default) or `base64`.
    #[serde(default)]
    pub encoding: Option<String>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListArgs {
    pub vm: String,
    /// Absolute path of a directory in the guest.
    pub path: String,
    /// Entries returned at most; default 1000, at most 10000.
    #[serde(default)]
    pub max_entries: Option<usize>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExportArgs {
    pub vm: String,
    /// `patch`: the guest's changes as `git apply`-able diff text in the
    /// result; `branch`: fetched into the host repository as `branch`.
    pub format: String,
    /// The branch to create (format `branch`).
    #[serde(default)]
    pub branch: Option<String>,
    /// Replace an existing branch of that name.
    #[serde(default)]
    pub force: bool,
    /// The workspace in the guest; default: the VM's only one.
    #[serde(default)]
    pub dest: Option<String>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ForwardAddArgs {
    pub vm: String,
    pub host_port: u16,
    pub guest_port: u16,
    /// Host address to listen on; default 127.0.0.1.
    #[serde(default)]
    pub bind: Option<String>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ForwardListArgs {
    /// Only this VM's forwards.
    #[serde(default)]
    pub vm: Option<String>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ForwardRemoveArgs {
    pub vm: String,
    pub host_port: u16,
    #[serde(default)]
    pub bind: Option<String>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NoArgs {}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VmArgs {
    pub vm: String,
}

// ---------------------------------------------------------------------------
// Argument checks

fn guest_path(arg: &str, path: &str) -> Result<(), ToolError> {
    if !path.starts_with('/') {
        return Err(bad(arg, format!("{path:?} is not an absolute path")));
    }
    if path.contains('\0') {
        return Err(bad(arg, "contains a NUL byte"));
    }
    Ok(())
}

fn bounded(
    arg: &str,
    given: Option<usize>,
    default: usize,
    max: usize,
) -> Result<usize, ToolError> {
    match given {
        None => Ok(default),
        Some(0) => Err(bad(arg, "must be at least 1")),
        Some(n) if n > max => Err(bad(arg, format!("{n} is more than the limit, {max}"))),
        Some(n) => Ok(n),
    }
}

// ---------------------------------------------------------------------------
// Exec through the daemon

/// What a command printed, kept up to a cap.
#[derive(Debug, Default)]
struct Captured {
    kept: Vec<u8>,
    total: u64,
}

impl Captured {
    fn push(&mut self, data: &[u8], cap: usize) {
        self.total += data.len() as u64;
        let room = cap.saturating_sub(self.kept.len());
        self.kept.extend_from_slice(&data[..data.len().min(room)]);
    }
    fn truncated(&self) -> bool {
        self.total > self.kept.len() as u64
    }
}

#[derive(Debug)]
struct ExecOutcome {
    exit: Option<ExecExit>,
    timed_out: bool,
    stdout: Captured,
    stderr: Captured,
}

/// Run `params` in the guest under `ctx`'s op id, feeding `stdin` (then
/// EOF) when given; killed (SIGKILL) after `timeout`.
async fn run_exec(
    ctx: &Invocation,
    mut params: VmExecParams,
    stdin: Option<Vec<u8>>,
    timeout: Duration,
    cap: usize,
) -> Result<ExecOutcome, ToolError> {
    params.stdin = stdin.is_some();
    let mut client = ctx.daemon().await?;
    let out = Arc::new(Mutex::new((Captured::default(), Captured::default())));
    let (session_tx, session_rx) = tokio::sync::oneshot::channel::<String>();
    let op_id = ctx.op_id.clone();
    let sink = out.clone();
    let mut call =
        tokio::spawn(async move {
            let mut session_tx = Some(session_tx);
            let b64 = base64::engine::general_purpose::STANDARD;
            client
                .call_with_events::<VmExec>(&params, Some(&op_id), |_, ev| {
                    match serde_json::from_value::<ExecEvent>(ev) {
                        Ok(ExecEvent::Started { session }) => {
                            if let Some(tx) = session_tx.take() {
                                let _ = tx.send(session);
                            }
                        }
                        Ok(ExecEvent::Stdout(d)) => {
                            let d = b64.decode(d).unwrap_or_default();
                            sink.lock().expect("output lock").0.push(&d, cap);
                        }
                        Ok(ExecEvent::Stderr(d)) => {
                            let d = b64.decode(d).unwrap_or_default();
                            sink.lock().expect("output lock").1.push(&d, cap);
                        }
                        Err(_) => {}
                    }
                })
                .await
        });
    let deadline = Instant::now() + timeout;
    // The session id addresses stdin and signals, on a second connection;
    // none when the call ended before starting (its result says why).
    let session = tokio::time::timeout_at(deadline.into(), session_rx)
        .await
        .ok()
        .and_then(Result::ok);
    if let (Some(session), Some(data)) = (&session, stdin)
        && let Err(e) = feed_stdin(ctx, session, &data).await
    {
        // The command would wait for the rest of its input forever.
        kill(ctx, session).await;
        call.abort();
        return Err(e);
    }
    let (result, timed_out) = match tokio::time::timeout_at(deadline.into(), &mut call).await {
        Ok(joined) => (joined, false),
        Err(_) => {
            if let Some(session) = &session {
                kill(ctx, session).await;
            }
            match tokio::time::timeout(KILL_GRACE, &mut call).await {
                Ok(joined) => (joined, true),
                Err(_) => {
                    call.abort();
                    return Err(ToolError(format!(
                        "the command ran past its timeout of {} s and did not end when killed",
                        timeout.as_secs()
                    )));
                }
            }
        }
    };
    let result = result.map_err(|e| ToolError(format!("the exec task failed: {e}")))?;
    let exit = match result {
        Ok(exit) => Some(exit),
        // Killed at its timeout: the session ends without an exit status.
        Err(_) if timed_out => None,
        Err(e) => return Err(CliError::from_client(&ctx.op_id, e).into()),
    };
    let (stdout, stderr) = std::mem::take(&mut *out.lock().expect("output lock"));
    Ok(ExecOutcome {
        exit,
        timed_out,
        stdout,
        stderr,
    })
}

/// Send `data` to exec session `session`'s stdin, then EOF.
async fn feed_stdin(ctx: &Invocation, session: &str, data: &[u8]) -> Result<(), ToolError> {
    let mut side = ctx.daemon().await?;
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut chunks = data.chunks(INPUT_CHUNK).peekable();
    loop {
        let chunk = chunks.next();
        let p = ExecInputParams {
            session: session.to_owned(),
            data: chunk.map(|c| b64.encode(c)),
            eof: chunks.peek().is_none(),
        };
        side.call::<VmExecInput>(&p, Some(&ctx.op_id))
            .await
            .map_err(|e| ToolError::from(CliError::from_client(&ctx.op_id, e)))?;
        if p.eof {
            return Ok(());
        }
    }
}

/// SIGKILL exec session `session`'s command, as far as the daemon can be
/// reached.
async fn kill(ctx: &Invocation, session: &str) {
    if let Ok(mut side) = ctx.daemon().await {
        let p = ExecSignalParams {
            session: session.to_owned(),
            signal: 9,
        };
        let _ = side.call::<VmExecSignal>(&p, Some(&ctx.op_id)).await;
    }
}

/// A fixed command's failure: its stderr says why (a missing file ...).
fn command_failed(what: &str, o: &ExecOutcome) -> ToolError {
    let said = String::from_utf8_lossy(&o.stderr.kept);
    let said = crate::out::safe_text(said.trim());
    let status = match o.exit {
        Some(e) => format!("exit {}", e.shell_code()),
        None => "timed out".into(),
    };
    ToolError(format!("{what} failed ({status}): {said}"))
}

/// Text when `data` is UTF-8, else base64. Where a cap `cut` the data, a
/// character cut in two at its end is left out rather than making it all
/// base64.
fn text_or_base64(data: &[u8], cut: bool) -> (String, &'static str) {
    match std::str::from_utf8(data) {
        Ok(s) => (s.to_owned(), "utf8"),
        Err(e) if cut && e.error_len().is_none() => (
            String::from_utf8_lossy(&data[..e.valid_up_to()]).into_owned(),
            "utf8",
        ),
        Err(_) => (
            base64::engine::general_purpose::STANDARD.encode(data),
            "base64",
        ),
    }
}

/// The script `file_read` runs: the file is `$1`, the byte limit `$2`.
const READ_SCRIPT: &str = r#"[ -f "$1" ] || { echo "$1: not a regular file" >&2; exit 2; }; stat -L -c %s -- "$1" && exec head -c "$2" -- "$1""#;
/// The script `file_write` runs: stdin into a temporary file beside `$1`,
/// renamed over it once complete.
const WRITE_SCRIPT: &str = r#"d=$(dirname -- "$1") && mkdir -p -- "$d" && t=$(mktemp -p "$d" .banger-write.XXXXXX) && cat > "$t" && chmod 644 "$t" && mv -f -- "$t" "$1" || { rm -f -- "$t"; exit 1; }"#;

fn fixed(vm: &str, argv: &[&str]) -> VmExecParams {
    VmExecParams {
        name: vm.to_owned(),
        argv: argv.iter().map(|s| (*s).to_owned()).collect(),
        ..Default::default()
    }
}

/// Fixed commands are short; a minute covers a slow guest.
const FILE_OP_TIMEOUT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------
// The tools

#[rmcp::tool_router]
impl Banger {
    #[tool(
        description = "Create and boot a sandbox VM (a disposable Linux microVM); returns once it is ready for the other tools. Optionally copies a host git checkout into it (`workspace`)."
    )]
    async fn vm_create(&self, Parameters(a): Parameters<CreateArgs>) -> CallToolResult {
        let ctx = self.op();
        let r = self.create(&ctx, a).await;
        finish(&ctx.op_id, r)
    }

    #[tool(
        description = "Run a command in a VM: `argv` (no shell) or `command` (a /bin/sh -c line), with cwd, env and a timeout. Returns the exit code and stdout/stderr, each kept up to `max_output_bytes` (the cap and whether it was hit are reported)."
    )]
    async fn vm_exec(&self, Parameters(a): Parameters<ExecArgs>) -> CallToolResult {
        let ctx = self.op();
        let r = exec_tool(&ctx, a).await;
        finish(&ctx.op_id, r)
    }

    #[tool(
        description = "Read a file in a VM (absolute path). Returns up to `max_bytes` of it, as text, or base64 when it is not UTF-8, with its size and whether it was cut."
    )]
    async fn file_read(&self, Parameters(a): Parameters<ReadArgs>) -> CallToolResult {
        let ctx = self.op();
        let r = read_tool(&ctx, a).await;
        finish(&ctx.op_id, r)
    }

    #[tool(
        description = "Write a file in a VM (absolute path; parent directories are made), replacing it whole. At most 1 MiB."
    )]
    async fn file_write(&self, Parameters(a): Parameters<WriteArgs>) -> CallToolResult {
        let ctx = self.op();
        let r = write_tool(&ctx, a).await;
        finish(&ctx.op_id, r)
    }

    #[tool(
        description = "List a directory in a VM (absolute path): each entry's name, type (f file, d directory, l link ...), size, mode and modification time."
    )]
    async fn file_list(&self, Parameters(a): Parameters<ListArgs>) -> CallToolResult {
        let ctx = self.op();
        let r = list_tool(&ctx, a).await;
        finish(&ctx.op_id, r)
    }

    #[tool(
        description = "Bring a VM's workspace changes back out: as patch text (format `patch`) or as a new branch of the host repository it came from (format `branch`)."
    )]
    async fn workspace_export(&self, Parameters(a): Parameters<ExportArgs>) -> CallToolResult {
        let ctx = self.op();
        let r = export_tool(&ctx, a).await;
        finish(&ctx.op_id, r)
    }

    #[tool(description = "Forward a host TCP port to a port of a VM.")]
    async fn port_forward_add(&self, Parameters(a): Parameters<ForwardAddArgs>) -> CallToolResult {
        let ctx = self.op();
        let p = PortForwardAddParams {
            name: a.vm,
            forwards: vec![PortForwardSpec {
                bind: a.bind,
                host_port: a.host_port,
                guest_port: a.guest_port,
            }],
        };
        let r = async { Ok(json!({ "forwards": ctx.call::<VmPortForwardAdd>(&p).await? })) };
        finish(&ctx.op_id, r.await)
    }

    #[tool(description = "List port forwards (of one VM, or all).")]
    async fn port_forward_list(
        &self,
        Parameters(a): Parameters<ForwardListArgs>,
    ) -> CallToolResult {
        let ctx = self.op();
        let p = PortForwardListParams { name: a.vm };
        let r = async { Ok(json!({ "forwards": ctx.call::<VmPortForwardList>(&p).await? })) };
        finish(&ctx.op_id, r.await)
    }

    #[tool(description = "Remove a port forward.")]
    async fn port_forward_remove(
        &self,
        Parameters(a): Parameters<ForwardRemoveArgs>,
    ) -> CallToolResult {
        let ctx = self.op();
        let p = PortForwardRemoveParams {
            name: a.vm,
            bind: a.bind,
            host_port: a.host_port,
        };
        let r = async {
            ctx.call::<VmPortForwardRemove>(&p).await?;
            Ok(json!({ "removed": p.host_port }))
        };
        finish(&ctx.op_id, r.await)
    }

    #[tool(description = "List VMs: name, state, image, size, address.")]
    async fn vm_list(&self, Parameters(_): Parameters<NoArgs>) -> CallToolResult {
        let ctx = self.op();
        let r = async {
            let vms = ctx.call::<VmList>(&VmListParams::default()).await?;
            Ok(json!({ "vms": vms.iter().map(summary).collect::<Vec<_>>() }))
        };
        finish(&ctx.op_id, r.await)
    }

    #[tool(description = "Stop a VM (it keeps its disks and can be started again).")]
    async fn vm_stop(&self, Parameters(a): Parameters<VmArgs>) -> CallToolResult {
        let ctx = self.op();
        let r = async {
            let p = VmNames {
                names: vec![a.vm],
                ..Default::default()
            };
            let vms = ctx.call::<VmStop>(&p).await?;
            Ok(json!({ "vms": vms.iter().map(summary).collect::<Vec<_>>() }))
        };
        finish(&ctx.op_id, r.await)
    }

    #[tool(description = "Delete a VM and everything it owns (running VMs are killed).")]
    async fn vm_delete(&self, Parameters(a): Parameters<VmArgs>) -> CallToolResult {
        let ctx = self.op();
        let r = async {
            let p = VmNames {
                names: vec![a.vm.clone()],
                force: true,
                ..Default::default()
            };
            let deleted = ctx.call::<VmDelete>(&p).await?;
            self.session
                .created
                .lock()
                .expect("created lock")
                .remove(&a.vm);
            Ok(json!({ "deleted": deleted }))
        };
        finish(&ctx.op_id, r.await)
    }
}

fn summary(v: &VmInfo) -> Value {
    json!({
        "name": v.name,
        "state": v.state,
        "image": v.image,
        "vcpus": v.vcpus,
        "memory_mib": v.memory_mib,
        "disk_mib": v.disk_mib,
        "guest_ip": v.guest_ip,
        "dns_name": v.dns_name,
        "last_error": v.last_error,
        // What the human gave it: where it may connect, and the secrets it
        // may use by placeholder ($NAME in the guest) towards these hosts.
        "net": v.net,
        "secrets": v.secrets.iter().map(|s| json!({ "name": s.name, "hosts": s.hosts })).collect::<Vec<_>>(),
    })
}

impl Banger {
    fn op(&self) -> Invocation {
        self.session.base.with_op_id(OpId::mint())
    }

    async fn create(&self, ctx: &Invocation, a: CreateArgs) -> ToolResult {
        if let Some(w) = a.wait.as_deref()
            && w != "agent"
            && w != "ssh"
        {
            return Err(bad("wait", format!("{w:?} is not one of agent, ssh")));
        }
        if let Some(ws) = &a.workspace
            && !std::path::Path::new(ws).is_absolute()
        {
            return Err(bad("workspace", format!("{ws:?} is not an absolute path")));
        }
        let name = a
            .name
            .clone()
            .unwrap_or_else(|| format!("mcp-{}", &OpId::mint().as_str()[3..]));
        {
            let mut counted = self.session.counted.lock().expect("count lock");
            if let Some(max) = self.session.max_vms
                && *counted >= max
            {
                return Err(ToolError(format!(
                    "refused: this MCP session may create at most {max} VM(s) (banger mcp --max-vms {max}) and has created {counted}"
                )));
            }
            *counted += 1;
        }
        self.session
            .created
            .lock()
            .expect("created lock")
            .insert(name.clone());
        let params = VmCreateParams {
            name: Some(name.clone()),
            image: a.image,
            vcpus: a.vcpus,
            memory_mib: a.memory_mib,
            disk_mib: a.disk_mib,
            wait: Some(a.wait.unwrap_or_else(|| "agent".into())),
            session: self.session.daemon_session.clone(),
            net: self.session.net.clone(),
            secrets: self.session.secrets.clone(),
            ..Default::default()
        };
        let started = Instant::now();
        let vm = match ctx.call::<VmCreate>(&params).await {
            Ok(vm) => vm,
            Err(e) => {
                *self.session.counted.lock().expect("count lock") -= 1;
                return Err(e.into());
            }
        };
        let ready_ms = started.elapsed().as_millis() as u64;
        let workspace = match a.workspace {
            Some(path) => {
                let p = WorkspacePrepareParams {
                    vm: name,
                    path,
                    ..Default::default()
                };
                Some(ctx.call::<WorkspacePrepare>(&p).await?)
            }
            None => None,
        };
        Ok(json!({ "vm": summary(&vm), "ready_ms": ready_ms, "workspace": workspace }))
    }
}

async fn exec_tool(ctx: &Invocation, a: ExecArgs) -> ToolResult {
    let argv = match (a.argv, a.command) {
        (Some(argv), None) if argv.is_empty() => return Err(bad("argv", "is empty")),
        (Some(argv), None) => argv,
        (None, Some(c)) if c.trim().is_empty() => return Err(bad("command", "is empty")),
        (None, Some(c)) => vec!["/bin/sh".into(), "-c".into(), c],
        (Some(_), Some(_)) => {
            return Err(bad("argv", "give either `argv` or `command`, not both"));
        }
        (None, None) => return Err(bad("argv", "give `argv` (a list) or `command` (a string)")),
    };
    if let Some(cwd) = &a.cwd {
        guest_path("cwd", cwd)?;
    }
    let secs = match a.timeout_secs {
        None => DEFAULT_EXEC_TIMEOUT_SECS,
        Some(0) => return Err(bad("timeout_secs", "must be at least 1")),
        Some(s) if s > MAX_EXEC_TIMEOUT_SECS => {
            return Err(bad(
                "timeout_secs",
                format!("{s} is more than the limit, {MAX_EXEC_TIMEOUT_SECS}"),
            ));
        }
        Some(s) => s,
    };
    let cap = bounded(
        "max_output_bytes",
        a.max_output_bytes,
        DEFAULT_OUTPUT_CAP,
        MAX_OUTPUT_CAP,
    )?;
    let params = VmExecParams {
        name: a.vm,
        argv,
        env: a.env,
        cwd: a.cwd,
        ..Default::default()
    };
    let o = run_exec(ctx, params, None, Duration::from_secs(secs), cap).await?;
    let stream = |c: &Captured| {
        let (text, encoding) = text_or_base64(&c.kept, c.truncated());
        json!({
            "text": text,
            "encoding": encoding,
            "bytes": c.total,
            "truncated": c.truncated(),
        })
    };
    Ok(json!({
        "exit_code": o.exit.map(ExecExit::shell_code),
        "signal": o.exit.and_then(|e| e.signal),
        "timed_out": o.timed_out,
        "timeout_secs": secs,
        "output_cap_bytes": cap,
        "stdout": stream(&o.stdout),
        "stderr": stream(&o.stderr),
    }))
}

async fn read_tool(ctx: &Invocation, a: ReadArgs) -> ToolResult {
    guest_path("path", &a.path)?;
    let max = bounded("max_bytes", a.max_bytes, DEFAULT_READ_BYTES, MAX_READ_BYTES)?;
    let limit = max.to_string();
    let p = fixed(
        &a.vm,
        &["/bin/sh", "-c", READ_SCRIPT, "sh", &a.path, &limit],
    );
    // The size line, then at most `max` bytes.
    let o = run_exec(ctx, p, None, FILE_OP_TIMEOUT, max + 32).await?;
    if o.exit.map(ExecExit::shell_code) != Some(0) {
        return Err(command_failed(&format!("reading {}", a.path), &o));
    }
    let out = &o.stdout.kept;
    let nl = out
        .iter()
        .position(|b| *b == b'\n')
        .ok_or_else(|| ToolError("the guest's stat printed no size".into()))?;
    let size: u64 = std::str::from_utf8(&out[..nl])
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| ToolError("the guest's stat printed no size".into()))?;
    let data = &out[nl + 1..];
    let (content, encoding) = text_or_base64(data, (data.len() as u64) < size);
    Ok(json!({
        "path": a.path,
        "size": size,
        "returned_bytes": data.len(),
        "max_bytes": max,
        "truncated": (data.len() as u64) < size,
        "encoding": encoding,
        "content": content,
    }))
}

async fn write_tool(ctx: &Invocation, a: WriteArgs) -> ToolResult {
    guest_path("path", &a.path)?;
    if a.path.ends_with('/') {
        return Err(bad("path", format!("{:?} names a directory", a.path)));
    }
    let data = match a.encoding.as_deref() {
        None | Some("utf8") => a.content.into_bytes(),
        Some("base64") => base64::engine::general_purpose::STANDARD
            .decode(a.content.as_bytes())
            .map_err(|e| bad("content", format!("is not base64: {e}")))?,
        Some(other) => {
            return Err(bad(
                "encoding",
                format!("{other:?} is not one of utf8, base64"),
            ));
        }
    };
    if data.len() > MAX_WRITE_BYTES {
        return Err(bad(
            "content",
            format!(
                "{} bytes is more than the limit, {MAX_WRITE_BYTES}",
                data.len()
            ),
        ));
    }
    let bytes = data.len();
    let p = fixed(&a.vm, &["/bin/sh", "-c", WRITE_SCRIPT, "sh", &a.path]);
    let o = run_exec(ctx, p, Some(data), FILE_OP_TIMEOUT, 4096).await?;
    if o.exit.map(ExecExit::shell_code) != Some(0) {
        return Err(command_failed(&format!("writing {}", a.path), &o));
    }
    Ok(json!({ "path": a.path, "bytes": bytes }))
}

async fn list_tool(ctx: &Invocation, a: ListArgs) -> ToolResult {
    guest_path("path", &a.path)?;
    let max = bounded(
        "max_entries",
        a.max_entries,
        DEFAULT_LIST_ENTRIES,
        MAX_LIST_ENTRIES,
    )?;
    // The path is find's starting point: absolute, so never an expression.
    let p = fixed(
        &a.vm,
        &[
            "find",
            &a.path,
            "-mindepth",
            "1",
            "-maxdepth",
            "1",
            "-printf",
            "%y\\t%s\\t%m\\t%T@\\t%P\\0",
        ],
    );
    // An entry's line is at most a few hundred bytes (names ≤ 255).
    let o = run_exec(ctx, p, None, FILE_OP_TIMEOUT, (max + 1) * 320).await?;
    if o.exit.map(ExecExit::shell_code) != Some(0) {
        return Err(command_failed(&format!("listing {}", a.path), &o));
    }
    let mut entries = Vec::new();
    let mut records = o.stdout.kept.split(|b| *b == 0).filter(|r| !r.is_empty());
    let mut truncated = o.stdout.truncated();
    for rec in records.by_ref() {
        if entries.len() == max {
            truncated = true;
            break;
        }
        let rec = String::from_utf8_lossy(rec);
        let f: Vec<&str> = rec.splitn(5, '\t').collect();
        let [kind, size, mode, mtime, name] = f[..] else {
            continue;
        };
        entries.push(json!({
            "name": name,
            "type": kind,
            "size": size.parse::<u64>().ok(),
            "mode": mode,
            "mtime": mtime.split('.').next().and_then(|s| s.parse::<i64>().ok()),
        }));
    }
    entries.sort_by(|x, y| x["name"].as_str().cmp(&y["name"].as_str()));
    Ok(json!({
        "path": a.path,
        "entries": entries,
        "max_entries": max,
        "truncated": truncated,
    }))
}

async fn export_tool(ctx: &Invocation, a: ExportArgs) -> ToolResult {
    match a.format.as_str() {
        "patch" => {
            let file = std::env::temp_dir().join(format!("banger-mcp-{}.patch", ctx.op_id));
            let file_str = file
                .to_str()
                .ok_or_else(|| ToolError("the temporary directory is not UTF-8".into()))?
                .to_owned();
            let p = WorkspaceExportParams {
                vm: a.vm,
                dest: a.dest,
                path: None,
                target: ExportTarget::Patch { file: file_str },
                umask: crate::context::USER_UMASK.get().copied(),
            };
            let result = ctx.call::<WorkspaceExport>(&p).await;
            let text = std::fs::read(&file);
            let _ = std::fs::remove_file(&file);
            let r = result?;
            let text = text.map_err(|e| ToolError(format!("cannot read the patch back: {e}")))?;
            let cut = text.len() > MAX_READ_BYTES;
            let (patch, encoding) = text_or_base64(&text[..text.len().min(MAX_READ_BYTES)], cut);
            Ok(json!({
                "format": "patch",
                "files_changed": r.files_changed,
                "bytes": r.bytes,
                "truncated": cut,
                "encoding": encoding,
                "patch": patch,
                "tip": r.tip,
            }))
        }
        "branch" => {
            let Some(name) = a.branch else {
                return Err(bad("branch", "format `branch` needs a branch name"));
            };
            let p = WorkspaceExportParams {
                vm: a.vm,
                dest: a.dest,
                path: None,
                target: ExportTarget::Branch {
                    name,
                    committed_only: false,
                    force: a.force,
                },
                umask: crate::context::USER_UMASK.get().copied(),
            };
            let r = ctx.call::<WorkspaceExport>(&p).await?;
            Ok(json!({
                "format": "branch",
                "branch": r.written,
                "repository": r.host_path,
                "files_changed": r.files_changed,
                "tip": r.tip,
            }))
        }
        other => Err(bad(
            "format",
            format!("{other:?} is not one of patch, branch"),
        )),
    }
}

// ---------------------------------------------------------------------------
// Resources: the VM list, a VM's console log tail, its stats.

const VMS_URI: &str = "banger://vms";

fn vm_resource(uri: &str) -> Option<(&str, &str)> {
    let rest = uri.strip_prefix("banger://vm/")?;
    let (name, what) = rest.rsplit_once('/')?;
    matches!(what, "console" | "stats").then_some((name, what))
}

fn json_contents(uri: &str, v: &impl serde::Serialize) -> ReadResourceResult {
    let text = serde_json::to_string_pretty(v).expect("serialisable");
    ReadResourceResult::new(vec![
        ResourceContents::text(text, uri).with_mime_type("application/json"),
    ])
}

/// The last `CONSOLE_TAIL_BYTES` of a console log, from a line start.
fn console_tail(path: &std::path::Path) -> std::io::Result<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    let from = len.saturating_sub(CONSOLE_TAIL_BYTES);
    f.seek(SeekFrom::Start(from))?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf)?;
    let start = if from > 0 {
        buf.iter().position(|b| *b == b'\n').map_or(0, |i| i + 1)
    } else {
        0
    };
    Ok(crate::out::safe_text(&String::from_utf8_lossy(
        &buf[start..],
    )))
}

/// The first argument of `args` that `schema` (a tool's input schema)
/// does not take, or takes as another JSON type: serde's own message names
/// an unknown field but not a field of the wrong type.
fn argument_error(
    schema: &rmcp::model::JsonObject,
    args: &rmcp::model::JsonObject,
) -> Option<String> {
    let props = schema.get("properties").and_then(Value::as_object);
    for (name, value) in args {
        let Some(prop) = props.and_then(|p| p.get(name)) else {
            let known: Vec<&str> = props
                .into_iter()
                .flat_map(|p| p.keys())
                .map(String::as_str)
                .collect();
            return Some(format!(
                "invalid argument `{name}`: no such argument (this tool takes: {})",
                known.join(", ")
            ));
        };
        let types: Vec<&str> = match prop.get("type") {
            Some(Value::String(t)) => vec![t.as_str()],
            Some(Value::Array(ts)) => ts.iter().filter_map(Value::as_str).collect(),
            _ => continue,
        };
        let got = match value {
            Value::Null => "null",
            Value::Bool(_) => "boolean",
            Value::Number(n) if n.is_u64() || n.is_i64() => "integer",
            Value::Number(_) => "number",
            Value::String(_) => "string",
            Value::Array(_) => "array",
            Value::Object(_) => "object",
        };
        let fits = types.contains(&got) || (got == "integer" && types.contains(&"number"));
        if !fits {
            return Some(format!(
                "invalid argument `{name}`: expected {}, got {got}",
                types.join(" or ")
            ));
        }
    }
    None
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for Banger {
    async fn call_tool(
        &self,
        request: rmcp::model::CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<rmcp::model::CallToolResponse, ErrorData> {
        if let (Some(tool), Some(args)) = (self.tool_router.get(&request.name), &request.arguments)
            && let Some(message) = argument_error(&tool.input_schema, args)
        {
            return Ok(finish(&OpId::mint(), Err(ToolError(message))).into());
        }
        let call = rmcp::handler::server::tool::ToolCallContext::new(self, request, context);
        self.tool_router.call(call).await
    }

    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(
            ServerCapabilities::builder()
                .enable_tools()
                .enable_resources()
                .build(),
        )
        .with_server_info(Implementation::new("banger", env!("CARGO_PKG_VERSION")))
        .with_instructions(
            "banger runs disposable Linux microVMs. Create one with vm_create, run commands with \
             vm_exec, move files with file_read/file_write/file_list, and delete it with vm_delete. \
             A VM's network policy (`net`) and its secrets are set by the user who started this \
             server: a secret is $NAME in the guest, a placeholder that banger's proxy replaces with \
             the real value in HTTPS requests to that secret's hosts only. \
             Every result names the op id of the call (`banger op OP_ID`, the daemon log).",
        )
    }

    async fn list_resources(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListResourcesResult, ErrorData> {
        let ctx = self.op();
        let mut resources = vec![
            Resource::new(VMS_URI, "vms")
                .with_description("Every VM, as JSON")
                .with_mime_type("application/json"),
        ];
        if let Ok(vms) = ctx.call::<VmList>(&VmListParams::default()).await {
            for v in vms {
                resources.push(
                    Resource::new(
                        format!("banger://vm/{}/console", v.name),
                        format!("{} console", v.name),
                    )
                    .with_mime_type("text/plain"),
                );
                resources.push(
                    Resource::new(
                        format!("banger://vm/{}/stats", v.name),
                        format!("{} stats", v.name),
                    )
                    .with_mime_type("application/json"),
                );
            }
        }
        Ok(ListResourcesResult::with_all_items(resources))
    }

    async fn list_resource_templates(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListResourceTemplatesResult, ErrorData> {
        Ok(ListResourceTemplatesResult::with_all_items(vec![
            ResourceTemplate::new("banger://vm/{name}/console", "console")
                .with_description("The last 64 KiB of a VM's console log")
                .with_mime_type("text/plain"),
            ResourceTemplate::new("banger://vm/{name}/stats", "stats")
                .with_description("A VM's cpu, memory, disk and load, one sample from its agent")
                .with_mime_type("application/json"),
        ]))
    }

    async fn read_resource(
        &self,
        request: ReadResourceRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<ReadResourceResponse, ErrorData> {
        let ctx = self.op();
        let uri = request.uri.as_str();
        let failed =
            |e: CliError| ErrorData::internal_error(crate::out::safe_text(&e.to_string()), None);
        if uri == VMS_URI {
            let vms = ctx
                .call::<VmList>(&VmListParams::default())
                .await
                .map_err(failed)?;
            return Ok(json_contents(uri, &vms).into());
        }
        let Some((name, what)) = vm_resource(uri) else {
            return Err(ErrorData::resource_not_found(
                format!(
                    "no resource {uri:?} (banger://vms, banger://vm/NAME/console, banger://vm/NAME/stats)"
                ),
                None,
            ));
        };
        let vm = VmName { name: name.into() };
        if what == "stats" {
            let stats = ctx.call::<VmStats>(&vm).await.map_err(failed)?;
            return Ok(json_contents(uri, &stats).into());
        }
        let info = ctx.call::<VmShow>(&vm).await.map_err(failed)?;
        let text = console_tail(std::path::Path::new(&info.console_log)).map_err(|e| {
            ErrorData::internal_error(format!("cannot read {}: {e}", info.console_log), None)
        })?;
        Ok(ReadResourceResult::new(vec![ResourceContents::text(text, uri)]).into())
    }
}

/// Serve MCP on stdin/stdout until stdin closes or a signal ends it.
pub async fn run(ctx: &Invocation, opts: McpOptions) -> Result<u8, CliError> {
    let mut router = Banger::tool_router();
    if let Some(allow) = &opts.allow {
        for name in allow {
            if !TOOLS.contains(&name.as_str()) {
                return Err(CliError::local(
                    &ctx.op_id,
                    format!("--allow: no tool {name:?} (tools: {})", TOOLS.join(", ")),
                ));
            }
        }
        for name in TOOLS {
            if !allow.iter().any(|a| a == name) {
                router.remove_route(name);
            }
        }
    }
    // --ephemeral: a session the daemon holds while our connection lasts;
    // it deletes the session's VMs when the connection closes, however
    // this process ends (SIGKILL included).
    let (daemon_session, _hold) = if opts.ephemeral {
        let id = format!("mcp-{}", &ctx.op_id.as_str()[3..]);
        let hold = hold_session(ctx, &id).await?;
        (Some(id), Some(hold))
    } else {
        (None, None)
    };
    let session = Arc::new(Session {
        base: ctx.with_op_id(ctx.op_id.clone()),
        daemon_session,
        max_vms: opts.max_vms,
        net: opts.net,
        secrets: opts.secrets,
        created: Mutex::new(BTreeSet::new()),
        counted: Mutex::new(0),
    });
    let server = Banger {
        session: session.clone(),
        tool_router: router,
    };
    let service = server
        .serve(rmcp::transport::io::stdio_pipes())
        .await
        .map_err(|e| CliError::local(&ctx.op_id, format!("MCP session failed to start: {e}")))?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| CliError::local(&ctx.op_id, format!("cannot watch SIGTERM: {e}")))?;
    tokio::select! {
        _ = service.waiting() => {}
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    if opts.ephemeral {
        // Delete them here, so that they are gone when we exit; the
        // daemon's session end would find nothing left to do.
        let names: Vec<String> = session
            .created
            .lock()
            .expect("created lock")
            .iter()
            .cloned()
            .collect();
        for name in names {
            let p = VmNames {
                names: vec![name.clone()],
                force: true,
                ..Default::default()
            };
            match ctx.call::<VmDelete>(&p).await {
                Ok(_) => {}
                Err(CliError::Remote(o)) if o.code == banger_wire::ErrorCode::NotFound => {}
                Err(e) => eprintln!("warning: could not delete VM {name}: {e}"),
            }
        }
    }
    // A read of stdin may still be pending on a blocking thread, which
    // would hold the runtime's shutdown: leave now.
    std::process::exit(0)
}

/// Hold daemon session `id` on a connection of its own for as long as this
/// process lives; returns once the daemon holds it.
async fn hold_session(ctx: &Invocation, id: &str) -> Result<tokio::task::JoinHandle<()>, CliError> {
    let mut client = ctx.daemon().await?;
    let (held_tx, held_rx) = tokio::sync::oneshot::channel::<()>();
    let op_id = ctx.op_id.clone();
    let params = SessionHoldParams {
        session: id.to_owned(),
    };
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let mut held_tx = Some(held_tx);
        let r = client
            .call_with_events::<SessionHold>(&params, Some(&op_id), |_, _| {
                if let Some(tx) = held_tx.take() {
                    let _ = tx.send(());
                }
            })
            .await;
        let _ = done_tx.send(r);
    });
    if held_rx.await.is_ok() {
        return Ok(task);
    }
    match done_rx.await {
        Ok(Err(e)) => Err(CliError::from_client(&ctx.op_id, e)),
        _ => Err(CliError::local(
            &ctx.op_id,
            "the daemon ended the session before holding it",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(v: Value) -> rmcp::model::JsonObject {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn arguments_of_a_wrong_type_or_name_are_named() {
        let tool = Banger::tool_router().get("vm_create").unwrap().clone();
        let check = |args: Value| argument_error(&tool.input_schema, &object(args));
        assert_eq!(check(json!({ "name": "a", "vcpus": 2 })), None);
        assert_eq!(check(json!({ "vcpus": null })), None);
        let e = check(json!({ "vcpus": "many" })).unwrap();
        assert!(
            e.starts_with("invalid argument `vcpus`: expected integer"),
            "{e}"
        );
        let e = check(json!({ "colour": "red" })).unwrap();
        assert!(
            e.starts_with("invalid argument `colour`: no such argument"),
            "{e}"
        );
    }

    #[test]
    fn only_output_cut_by_a_cap_loses_a_split_character() {
        let e_acute = "é".as_bytes();
        assert_eq!(text_or_base64(b"ab", false), ("ab".into(), "utf8"));
        // "aé" cut after the first byte of é: the text up to it.
        let cut = [b'a', e_acute[0]];
        assert_eq!(text_or_base64(&cut, true), ("a".into(), "utf8"));
        // The same bytes as the whole of a file are not text.
        assert_eq!(text_or_base64(&cut, false), ("YcM=".into(), "base64"));
        assert_eq!(text_or_base64(&[0xff, b'a'], true).1, "base64");
    }

    #[test]
    fn captured_output_keeps_up_to_the_cap_and_counts_all() {
        let mut c = Captured::default();
        c.push(b"hello", 8);
        c.push(b"world", 8);
        assert_eq!(c.kept, b"hellowor");
        assert_eq!(c.total, 10);
        assert!(c.truncated());
    }

    #[test]
    fn vm_resource_uris() {
        assert_eq!(
            vm_resource("banger://vm/box/console"),
            Some(("box", "console"))
        );
        assert_eq!(vm_resource("banger://vm/box/stats"), Some(("box", "stats")));
        assert_eq!(vm_resource("banger://vm/box/secrets"), None);
        assert_eq!(vm_resource("file:///etc/passwd"), None);
    }
}
