//! The routes: each API route is one RPC method of the daemon's router.

use std::convert::Infallible;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::Router as Http;
use axum::body::Bytes;
use axum::extract::ws::{WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Redirect, Response};
use banger_rpc::{Call, EventSink, RpcError};
use banger_wire::methods::{
    ExecEvent, ExecInputParams, ExecResizeParams, HostDoctor, ImageBuild, ImageDelete, ImageImport,
    ImageImportParams, ImageList, ImageName, ImagePromote, ImagePull, ImagePullParams, OpFollow,
    OpStatus, OpStatusParams, OpStatusResult, PortForwardAddParams, PortForwardListParams,
    PortForwardRemoveParams, VmCreate, VmCreateParams, VmDelete, VmExec, VmExecInput, VmExecParams,
    VmExecResize, VmList, VmListParams, VmName, VmNames, VmPortForwardAdd, VmPortForwardList,
    VmPortForwardRemove, VmPorts, VmRestart, VmSet, VmSetParams, VmShow, VmStart, VmStats, VmStop,
    WorkspacePrepare, WorkspacePrepareParams,
};
use banger_wire::{ErrorCode, Method, NoParams, OpId};
use futures_util::stream::{self, Stream, StreamExt};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tracing::warn;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::Backend;
use crate::guard::{guard, header_str};
use crate::ops::{Next, Registry};

/// Requests handled at once (streams count only until their headers).
const MAX_REQUESTS: usize = 128;
/// Server-Sent Event streams open at once, all kinds together.
const MAX_STREAMS: usize = 64;
/// The console log tail served by default.
const DEFAULT_LOG_BYTES: u64 = 65536;
/// The most one log event carries.
const LOG_CHUNK: u64 = 65536;
/// How often a followed console log is checked for more.
const LOG_POLL: Duration = Duration::from_millis(250);
/// The largest WebSocket message (and frame) a terminal client may send.
const MAX_WS_MESSAGE: usize = 64 * 1024;
/// Coalescing of VM list updates (at most ~10 a second).
const VMS_COALESCE: Duration = Duration::from_millis(100);
const KEEP_ALIVE: Duration = Duration::from_secs(15);

#[derive(Debug)]
pub(crate) struct App {
    pub(crate) backend: Backend,
    ops: Registry,
    streams: Arc<Semaphore>,
    /// `/api/openapi.json`, made from the same route table as the router.
    openapi: std::sync::OnceLock<String>,
}

/// A failed API call: the RPC error and the op id it ran under.
#[derive(Debug)]
struct ApiError {
    error: RpcError,
    op_id: OpId,
}

fn status_of(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::NotFound => StatusCode::NOT_FOUND,
        ErrorCode::Conflict => StatusCode::CONFLICT,
        ErrorCode::InvalidParams | ErrorCode::InvalidRequest => StatusCode::BAD_REQUEST,
        ErrorCode::PermissionDenied => StatusCode::FORBIDDEN,
        ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

pub(crate) fn error_response(
    status: StatusCode,
    code: &str,
    message: &str,
    op_id: &OpId,
) -> Response {
    (
        status,
        axum::Json(json!({ "code": code, "message": message, "op_id": op_id })),
    )
        .into_response()
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        error_response(
            status_of(self.error.code),
            self.error.code.as_str(),
            &self.error.message,
            &self.op_id,
        )
    }
}

impl ApiError {
    /// An error the web layer finds itself (a bad body), logged with its op id.
    fn new(code: ErrorCode, message: String) -> Self {
        let op_id = OpId::mint();
        warn!(%op_id, code = %code, "web request failed: {message}");
        ApiError {
            error: RpcError::new(code, message),
            op_id,
        }
    }
}

fn end_event(result: &Result<Value, RpcError>, op_id: &OpId) -> Value {
    match result {
        Ok(v) => json!({ "ok": true, "result": v }),
        Err(e) => json!({
            "ok": false,
            "error": { "code": e.code.as_str(), "message": e.message, "op_id": op_id }
        }),
    }
}

impl App {
    /// Run `M` under a new op id and wait for its answer.
    async fn call<M: Method>(&self, params: M::Params) -> Result<Value, ApiError> {
        let op_id = OpId::mint();
        let params = serde_json::to_value(params).expect("params encode");
        // Held while the call runs: the handler's caller stays "there".
        let (_caller, gone) = watch::channel(false);
        let call = Call::new(op_id.clone(), self.backend.uid, EventSink::discard(), gone);
        self.backend
            .router
            .dispatch("web", M::NAME, call, params)
            .await
            .map_err(|error| ApiError { error, op_id })
    }

    /// Start `M` detached under a new op id: `202 {"op_id"}` at once; its
    /// stages and end are kept for `/api/ops/{op_id}`.
    fn start<M: Method>(self: &Arc<Self>, params: M::Params) -> Response {
        let op_id = OpId::mint();
        let params = serde_json::to_value(params).expect("params encode");
        let rec = self.ops.insert(&op_id, M::NAME);
        let app = self.clone();
        let id = op_id.clone();
        tokio::spawn(async move {
            let (events, mut rx) = EventSink::channel(64);
            let (_caller, gone) = watch::channel(false);
            let call = Call::new(id.clone(), app.backend.uid, events, gone);
            let run = app.backend.router.dispatch("web", M::NAME, call, params);
            tokio::pin!(run);
            let result = loop {
                tokio::select! {
                    biased;
                    Some(ev) = rx.recv() => rec.push(ev),
                    r = &mut run => break r,
                }
            };
            while let Ok(ev) = rx.try_recv() {
                rec.push(ev);
            }
            rec.end(end_event(&result, &id));
        });
        (StatusCode::ACCEPTED, axum::Json(json!({ "op_id": op_id }))).into_response()
    }

    fn stream_permit(&self) -> Result<OwnedSemaphorePermit, ApiError> {
        self.streams.clone().try_acquire_owned().map_err(|_| {
            ApiError::new(
                ErrorCode::Unavailable,
                format!("too many event streams open (at most {MAX_STREAMS}): close some tabs"),
            )
        })
    }
}

pub(crate) fn app(backend: Backend) -> Http {
    let app = Arc::new(App {
        backend,
        ops: Registry::default(),
        streams: Arc::new(Semaphore::new(MAX_STREAMS)),
        openapi: std::sync::OnceLock::new(),
    });
    let (router, doc) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(login))
        .routes(routes!(vms_list, vm_create))
        .routes(routes!(vm_show, vm_delete, vm_set))
        .routes(routes!(vm_start))
        .routes(routes!(vm_stop))
        .routes(routes!(vm_restart))
        .routes(routes!(vm_stats))
        .routes(routes!(vm_ports))
        .routes(routes!(vm_logs))
        .routes(routes!(vm_terminal))
        .routes(routes!(vm_exec))
        .routes(routes!(vm_workspace))
        .routes(routes!(forwards_list, forwards_add))
        .routes(routes!(forward_remove))
        .routes(routes!(images_list))
        .routes(routes!(image_build))
        .routes(routes!(image_pull))
        .routes(routes!(image_import))
        .routes(routes!(image_delete))
        .routes(routes!(image_promote))
        .routes(routes!(op))
        .routes(routes!(doctor))
        .routes(routes!(openapi))
        // Axum's catch-all `{*path}` is documented (ApiDoc) as `{path}`.
        .route("/assets/{*path}", axum::routing::get(asset))
        .routes(routes!(page_root))
        .routes(routes!(page_new))
        .routes(routes!(page_images))
        .routes(routes!(page_doctor))
        .routes(routes!(page_vm))
        .routes(routes!(page_op))
        .split_for_parts();
    let _ = app
        .openapi
        .set(doc.to_pretty_json().expect("the OpenAPI document encodes"));
    router
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(app.clone(), guard))
        .layer(tower::limit::GlobalConcurrencyLimitLayer::new(MAX_REQUESTS))
        .with_state(app)
}

/// The OpenAPI document's frame; the routes add their paths.
#[derive(utoipa::OpenApi)]
#[openapi(
    paths(asset),
    info(
        title = "banger",
        description = "The banger daemon's local web API: each route is one of the daemon's RPC methods; errors are {code, message, op_id}."
    )
)]
struct ApiDoc;

type Shared = State<Arc<App>>;

fn wants_events(h: &HeaderMap) -> bool {
    header_str(h, header::ACCEPT).is_some_and(|a| a.contains("text/event-stream"))
}

fn json(v: Value) -> Response {
    axum::Json(v).into_response()
}

/// A JSON body as `T`, or `400 invalid_params` saying why.
fn body<T: serde::de::DeserializeOwned>(bytes: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::new(ErrorCode::InvalidParams, format!("invalid body: {e}")))
}

async fn not_found() -> Response {
    let op_id = OpId::mint();
    error_response(StatusCode::NOT_FOUND, "not_found", "no such page", &op_id)
}

#[derive(Deserialize)]
struct LoginQuery {
    token: Option<String>,
}

#[utoipa::path(get, path = "/login", tag = "pages", params(("token" = String, Query, description = "one-time token from `banger web`")), responses((status = 303, description = "logged in: the session cookie, and a redirect to /"), (status = 401, description = "an unknown, used or expired token")))]
async fn login(State(app): Shared, Query(q): Query<LoginQuery>) -> Response {
    let access = &app.backend.access;
    if !q.token.as_deref().is_some_and(|t| access.redeem(t)) {
        warn!("web login refused: an unknown, used or expired token");
        return (
            StatusCode::UNAUTHORIZED,
            axum::response::Html(
                "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>banger: log in</title></head>\
                 <body><p>This login URL is used or expired: run <code>banger web</code> for a new one.</p></body></html>",
            ),
        )
            .into_response();
    }
    let cookie = format!(
        "{}={}; HttpOnly; SameSite=Strict; Path=/",
        crate::COOKIE,
        access.session_cookie()
    );
    ([(header::SET_COOKIE, cookie)], Redirect::to("/")).into_response()
}

#[utoipa::path(get, path = "/api/vms", tag = "vms", responses((status = 200, description = "[VmInfo] (vm.list); with `Accept: text/event-stream`, `vms` events: the list now and on every change")))]
async fn vms_list(State(app): Shared, h: HeaderMap) -> Result<Response, ApiError> {
    if !wants_events(&h) {
        return Ok(json(app.call::<VmList>(VmListParams::default()).await?));
    }
    let permit = app.stream_permit()?;
    let mut changes = app.backend.vm_changes.clone();
    changes.borrow_and_update();
    let events = stream::unfold(
        (app, changes, true, permit),
        |(app, mut changes, first, permit)| async move {
            if !first {
                changes.changed().await.ok()?;
                tokio::time::sleep(VMS_COALESCE).await;
                changes.borrow_and_update();
            }
            let ev = match app.call::<VmList>(VmListParams::default()).await {
                Ok(list) => Event::default().event("vms").json_data(list),
                Err(e) => Event::default().event("error").json_data(json!({
                    "code": e.error.code.as_str(), "message": e.error.message, "op_id": e.op_id
                })),
            }
            .ok()?;
            Some((ev, (app, changes, false, permit)))
        },
    );
    Ok(sse(events))
}

fn sse(events: impl Stream<Item = Event> + Send + 'static) -> Response {
    Sse::new(events.map(Ok::<_, Infallible>))
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response()
}

#[utoipa::path(post, path = "/api/vms", tag = "vms", request_body(content = Object, description = "VmCreateParams"), responses((status = 202, description = "{op_id}: the create runs detached (follow it at /api/ops/{op_id})"), (status = 400, description = "an invalid body")))]
async fn vm_create(State(app): Shared, b: Bytes) -> Result<Response, ApiError> {
    let params: VmCreateParams = body(&b)?;
    Ok(app.start::<VmCreate>(params))
}

#[utoipa::path(get, path = "/api/vms/{name}", tag = "vms", params(("name" = String, Path, description = "VM name")), responses((status = 200, description = "VmInfo (vm.show)"), (status = 404, description = "no such VM")))]
async fn vm_show(State(app): Shared, Path(name): Path<String>) -> Result<Response, ApiError> {
    Ok(json(app.call::<VmShow>(VmName { name }).await?))
}

#[derive(Deserialize)]
struct DeleteQuery {
    #[serde(default)]
    force: bool,
}

fn names(name: String) -> VmNames {
    VmNames {
        names: vec![name],
        force: false,
        // The web terminal goes through the agent; SSH is not waited for.
        no_ssh_wait: true,
    }
}

#[utoipa::path(delete, path = "/api/vms/{name}", tag = "vms", params(("name" = String, Path, description = "VM name"), ("force" = Option<bool>, Query, description = "stop a running VM first")), responses((status = 202, description = "{op_id} of the delete")))]
async fn vm_delete(
    State(app): Shared,
    Path(name): Path<String>,
    Query(q): Query<DeleteQuery>,
) -> Response {
    app.start::<VmDelete>(VmNames {
        force: q.force,
        ..names(name)
    })
}

/// The body of `PATCH /api/vms/{name}`: what `vm.set` changes (the path
/// names the VM).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetBody {
    vcpus: Option<u32>,
    memory_mib: Option<u32>,
    disk_mib: Option<u32>,
}

#[utoipa::path(patch, path = "/api/vms/{name}", tag = "vms", params(("name" = String, Path, description = "VM name")), request_body(content = Object, description = "{vcpus?, memory_mib?, disk_mib?} (vm.set: a stopped VM; disks only grow)"), responses((status = 200, description = "VmInfo after the change"), (status = 400, description = "an invalid body"), (status = 409, description = "the VM is running")))]
async fn vm_set(
    State(app): Shared,
    Path(name): Path<String>,
    b: Bytes,
) -> Result<Response, ApiError> {
    let SetBody {
        vcpus,
        memory_mib,
        disk_mib,
    } = body(&b)?;
    let params = VmSetParams {
        name,
        vcpus,
        memory_mib,
        disk_mib,
    };
    Ok(json(app.call::<VmSet>(params).await?))
}

#[utoipa::path(post, path = "/api/vms/{name}/start", tag = "vms", params(("name" = String, Path, description = "VM name")), responses((status = 202, description = "{op_id} of the start")))]
async fn vm_start(State(app): Shared, Path(name): Path<String>) -> Response {
    app.start::<VmStart>(names(name))
}

#[utoipa::path(post, path = "/api/vms/{name}/stop", tag = "vms", params(("name" = String, Path, description = "VM name")), responses((status = 202, description = "{op_id} of the stop")))]
async fn vm_stop(State(app): Shared, Path(name): Path<String>) -> Response {
    app.start::<VmStop>(names(name))
}

#[utoipa::path(post, path = "/api/vms/{name}/restart", tag = "vms", params(("name" = String, Path, description = "VM name")), responses((status = 202, description = "{op_id} of the restart")))]
async fn vm_restart(State(app): Shared, Path(name): Path<String>) -> Response {
    app.start::<VmRestart>(names(name))
}

#[utoipa::path(get, path = "/api/vms/{name}/stats", tag = "vms", params(("name" = String, Path, description = "VM name")), responses((status = 200, description = "vm.stats result")))]
async fn vm_stats(State(app): Shared, Path(name): Path<String>) -> Result<Response, ApiError> {
    Ok(json(app.call::<VmStats>(VmName { name }).await?))
}

#[utoipa::path(get, path = "/api/vms/{name}/ports", tag = "vms", params(("name" = String, Path, description = "VM name")), responses((status = 200, description = "vm.ports result")))]
async fn vm_ports(State(app): Shared, Path(name): Path<String>) -> Result<Response, ApiError> {
    Ok(json(app.call::<VmPorts>(VmName { name }).await?))
}

#[derive(Deserialize)]
struct LogQuery {
    bytes: Option<u64>,
}

/// The end of `path` from `from` (at most `max` bytes), and where it ends.
fn read_from(path: &FsPath, from: u64, max: u64) -> std::io::Result<(Vec<u8>, u64)> {
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), 0)),
        Err(e) => return Err(e),
    };
    let len = f.metadata()?.len();
    // A log that shrank was rotated: read the new one from its start.
    let from = if from > len { 0 } else { from };
    f.seek(SeekFrom::Start(from))?;
    let mut buf = Vec::new();
    f.take(max.min(len - from)).read_to_end(&mut buf)?;
    let end = from + buf.len() as u64;
    Ok((buf, end))
}

#[utoipa::path(get, path = "/api/vms/{name}/logs", tag = "vms", params(("name" = String, Path, description = "VM name"), ("bytes" = Option<u64>, Query, description = "tail length (default 65536)")), responses((status = 200, description = "text/plain: the console log's tail; with `Accept: text/event-stream`, `log` events (JSON strings): the tail, then what the guest writes")))]
async fn vm_logs(
    State(app): Shared,
    Path(name): Path<String>,
    Query(q): Query<LogQuery>,
    h: HeaderMap,
) -> Result<Response, ApiError> {
    let info = app.call::<VmShow>(VmName { name }).await?;
    let path = PathBuf::from(info["console_log"].as_str().unwrap_or_default());
    let want = q.bytes.unwrap_or(DEFAULT_LOG_BYTES);
    let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(want);
    let io = |e: std::io::Error| {
        ApiError::new(
            ErrorCode::Internal,
            format!("cannot read {}: {e}", path.display()),
        )
    };
    if !wants_events(&h) {
        let (bytes, _) = read_from(&path, start, want).map_err(io)?;
        return Ok((
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            String::from_utf8_lossy(&bytes).into_owned(),
        )
            .into_response());
    }
    let permit = app.stream_permit()?;
    let events = stream::unfold(
        (path, start, true, permit),
        |(path, mut pos, first, permit)| async move {
            loop {
                if !first || pos > 0 {
                    tokio::time::sleep(LOG_POLL).await;
                }
                let p = path.clone();
                let (bytes, end) =
                    tokio::task::spawn_blocking(move || read_from(&p, pos, LOG_CHUNK))
                        .await
                        .ok()?
                        .ok()?;
                pos = end;
                if !bytes.is_empty() {
                    let text = String::from_utf8_lossy(&bytes).into_owned();
                    let ev = Event::default().event("log").json_data(text).ok()?;
                    return Some((ev, (path, pos, false, permit)));
                }
            }
        },
    );
    Ok(sse(events))
}

#[utoipa::path(get, path = "/api/vms/{name}/terminal", tag = "vms", params(("name" = String, Path, description = "VM name")), responses((status = 101, description = "WebSocket: a login shell on a terminal in the guest (root, /root, TERM=xterm-256color); binary frames are the terminal's bytes both ways, a text frame {\"cols\": N, \"rows\": N} resizes it; closed when the shell exits (an error first comes as a text frame {code, message, op_id})"), (status = 404, description = "no such VM")))]
async fn vm_terminal(
    State(app): Shared,
    Path(name): Path<String>,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    upgrade(app, name, ws, terminal).await
}

/// Upgrade to a bounded WebSocket served by `serve` for VM `name`; a
/// missing VM is an HTTP answer, before the upgrade.
async fn upgrade<F, Fut>(
    app: Arc<App>,
    name: String,
    ws: WebSocketUpgrade,
    serve: F,
) -> Result<Response, ApiError>
where
    F: FnOnce(Arc<App>, String, WebSocket) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    app.call::<VmShow>(VmName { name: name.clone() }).await?;
    Ok(ws
        .max_message_size(MAX_WS_MESSAGE)
        .max_frame_size(MAX_WS_MESSAGE)
        .on_upgrade(move |socket| serve(app, name, socket)))
}

/// The shell a terminal runs: a login bash where there is one.
const TERMINAL_SHELL: &str =
    "if [ -x /bin/bash ]; then exec /bin/bash -l; else exec /bin/sh -l; fi";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TermSize {
    cols: u16,
    rows: u16,
}

/// A terminal: [`bridge`] of a login shell on a pty, its bytes as they are.
async fn terminal(app: Arc<App>, name: String, socket: WebSocket) {
    let params = VmExecParams {
        name,
        argv: vec!["/bin/sh".into(), "-c".into(), TERMINAL_SHELL.into()],
        env: [("TERM".to_string(), "xterm-256color".to_string())].into(),
        cwd: Some("/root".into()),
        stdin: true,
        tty: true,
        cols: Some(80),
        rows: Some(24),
    };
    bridge(app, params, socket, Framing::Raw).await
}

#[utoipa::path(get, path = "/api/vms/{name}/exec", tag = "vms", params(("name" = String, Path, description = "VM name")), responses((status = 101, description = "WebSocket: a command in the guest. The first frame is text: {argv, env?, cwd?, tty?, cols?, rows?} (vm.exec). Then binary frames from the server are output, its first byte the stream (1 stdout, 2 stderr; a tty's output is all 1); binary frames to it are stdin, a text frame {\"eof\": true} closes stdin, {\"cols\": N, \"rows\": N} resizes a tty. Last a text frame {\"exit\": {code} or {signal}} (or an error {code, message, op_id}), then close"), (status = 404, description = "no such VM")))]
async fn vm_exec(
    State(app): Shared,
    Path(name): Path<String>,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    upgrade(app, name, ws, exec).await
}

/// The first frame of an exec WebSocket: `vm.exec`'s params but the VM
/// (the path names it) and stdin (always forwarded).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExecStart {
    argv: Vec<String>,
    #[serde(default)]
    env: std::collections::BTreeMap<String, String>,
    cwd: Option<String>,
    #[serde(default)]
    tty: bool,
    cols: Option<u16>,
    rows: Option<u16>,
}

async fn exec(app: Arc<App>, name: String, mut socket: WebSocket) {
    use axum::extract::ws::Message;
    let start = match socket.next().await {
        Some(Ok(Message::Text(t))) => serde_json::from_str::<ExecStart>(&t).map_err(|e| {
            format!("the first frame is not {{argv, env?, cwd?, tty?, cols?, rows?}}: {e}")
        }),
        _ => Err("the first frame must be a text frame {argv, ...}".to_string()),
    };
    let start = match start {
        Ok(s) => s,
        Err(message) => {
            let body = json!({ "code": ErrorCode::InvalidParams.as_str(), "message": message, "op_id": OpId::mint() });
            let _ = socket.send(Message::Text(body.to_string().into())).await;
            return;
        }
    };
    let params = VmExecParams {
        name,
        argv: start.argv,
        env: start.env,
        cwd: start.cwd,
        stdin: true,
        tty: start.tty,
        cols: start.cols,
        rows: start.rows,
    };
    bridge(app, params, socket, Framing::Channels).await
}

/// How [`bridge`] frames a command's output, and ends.
#[derive(Clone, Copy, PartialEq)]
enum Framing {
    /// The terminal's bytes as they are (stdout and stderr are one pty);
    /// closed when the shell exits.
    Raw,
    /// Each frame's first byte its stream (1 stdout, 2 stderr); the exit
    /// status as a last text frame.
    Channels,
}

/// A client text frame: a resize, or stdin's end.
#[derive(Deserialize)]
#[serde(untagged)]
enum Control {
    Size(TermSize),
    Eof { eof: bool },
}

/// Bridge `socket` and a `vm.exec` of `params` until either ends: the
/// socket closing ends the exec (its handler is dropped, which cancels the
/// guest process); the command exiting closes the socket.
async fn bridge(app: Arc<App>, params: VmExecParams, socket: WebSocket, framing: Framing) {
    use axum::extract::ws::{CloseFrame, Message};
    use base64::Engine;
    use futures_util::SinkExt;
    let b64 = base64::engine::general_purpose::STANDARD;
    let frame = |stream: u8, bytes: Vec<u8>| -> Message {
        match framing {
            Framing::Raw => Message::Binary(bytes.into()),
            Framing::Channels => {
                let mut f = Vec::with_capacity(bytes.len() + 1);
                f.push(stream);
                f.extend_from_slice(&bytes);
                Message::Binary(f.into())
            }
        }
    };
    let output = |ev: ExecEvent| -> Option<(u8, Vec<u8>)> {
        match ev {
            ExecEvent::Stdout(d) => b64.decode(d).ok().map(|b| (1, b)),
            ExecEvent::Stderr(d) => b64.decode(d).ok().map(|b| (2, b)),
            ExecEvent::Started { .. } => None,
        }
    };
    let (mut to_client, mut from_client) = socket.split();
    let op_id = OpId::mint();
    let (events, mut exec_events) = EventSink::channel(64);
    let (_caller, gone) = watch::channel(false);
    let call = Call::new(op_id.clone(), app.backend.uid, events, gone);
    let params = serde_json::to_value(params).expect("params encode");
    let run = app
        .backend
        .router
        .dispatch("web", VmExec::NAME, call, params);
    tokio::pin!(run);
    let mut session: Option<String> = None;
    // Input before the command started: bytes, then whether stdin ended.
    let mut pending: (Vec<u8>, bool) = (Vec::new(), false);
    let mut events_open = true;
    let outcome = loop {
        tokio::select! {
            ev = exec_events.recv(), if events_open => match ev.map(serde_json::from_value::<ExecEvent>) {
                Some(Ok(ExecEvent::Started { session: s })) => {
                    // What was sent before the command started.
                    let (data, eof) = std::mem::take(&mut pending);
                    if !data.is_empty() || eof {
                        let input = ExecInputParams { session: s.clone(), data: (!data.is_empty()).then(|| b64.encode(&data)), eof };
                        if app.call::<VmExecInput>(input).await.is_err() {
                            break Ok(Value::Null);
                        }
                    }
                    session = Some(s);
                }
                Some(Ok(ev)) => {
                    let Some((stream, bytes)) = output(ev) else { continue };
                    if to_client.send(frame(stream, bytes)).await.is_err() {
                        return;
                    }
                }
                Some(Err(_)) => {}
                None => events_open = false,
            },
            r = &mut run => break r,
            msg = from_client.next() => match msg {
                Some(Ok(Message::Binary(data))) => match &session {
                    Some(s) => {
                        let input = ExecInputParams { session: s.clone(), data: Some(b64.encode(&data)), eof: false };
                        if app.call::<VmExecInput>(input).await.is_err() {
                            break Ok(Value::Null);
                        }
                    }
                    // Kept (up to a bound) until the command has started.
                    None if pending.0.len() + data.len() <= MAX_WS_MESSAGE => pending.0.extend_from_slice(&data),
                    None => {}
                },
                Some(Ok(Message::Text(t))) => match (serde_json::from_str::<Control>(&t), &session) {
                    (Ok(Control::Size(size)), Some(s)) => {
                        let _ = app
                            .call::<VmExecResize>(ExecResizeParams { session: s.clone(), cols: size.cols, rows: size.rows })
                            .await;
                    }
                    (Ok(Control::Eof { eof: true }), Some(s)) => {
                        let input = ExecInputParams { session: s.clone(), data: None, eof: true };
                        let _ = app.call::<VmExecInput>(input).await;
                    }
                    (Ok(Control::Eof { eof: true }), None) => pending.1 = true,
                    _ => {}
                },
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return,
                Some(Ok(_)) => {}
            },
        }
    };
    // What the command wrote last.
    while let Ok(v) = exec_events.try_recv() {
        if let Ok(ev) = serde_json::from_value(v)
            && let Some((stream, bytes)) = output(ev)
        {
            let _ = to_client.send(frame(stream, bytes)).await;
        }
    }
    let last = match outcome {
        Err(e) => Some(json!({ "code": e.code.as_str(), "message": e.message, "op_id": op_id })),
        Ok(exit) if framing == Framing::Channels => Some(json!({ "exit": exit })),
        Ok(_) => None,
    };
    if let Some(last) = last {
        let _ = to_client.send(Message::Text(last.to_string().into())).await;
    }
    let _ = to_client
        .send(Message::Close(Some(CloseFrame {
            code: axum::extract::ws::close_code::NORMAL,
            reason: match framing {
                Framing::Raw => "the shell exited",
                Framing::Channels => "the command exited",
            }
            .into(),
        })))
        .await;
}

/// The body of `POST /api/vms/{name}/workspace`: `workspace.prepare`'s
/// params but the VM (the path names it).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WorkspaceBody {
    path: String,
    dest: Option<String>,
    #[serde(default)]
    include_ignored: bool,
    depth: Option<u32>,
}

#[utoipa::path(post, path = "/api/vms/{name}/workspace", tag = "vms", params(("name" = String, Path, description = "VM name")), request_body(content = Object, description = "{path, dest?, include_ignored?, depth?}: a git checkout on the daemon's host into the guest (workspace.prepare)"), responses((status = 202, description = "{op_id} of the prepare")))]
async fn vm_workspace(
    State(app): Shared,
    Path(name): Path<String>,
    b: Bytes,
) -> Result<Response, ApiError> {
    let WorkspaceBody {
        path,
        dest,
        include_ignored,
        depth,
    } = body(&b)?;
    Ok(app.start::<WorkspacePrepare>(WorkspacePrepareParams {
        vm: name,
        path,
        dest,
        include_ignored,
        depth,
    }))
}

#[utoipa::path(get, path = "/api/vms/{name}/forwards", tag = "forwards", params(("name" = String, Path, description = "VM name")), responses((status = 200, description = "[PortForwardInfo]")))]
async fn forwards_list(State(app): Shared, Path(name): Path<String>) -> Result<Response, ApiError> {
    Ok(json(
        app.call::<VmPortForwardList>(PortForwardListParams { name: Some(name) })
            .await?,
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ForwardsBody {
    forwards: Vec<banger_wire::methods::PortForwardSpec>,
}

#[utoipa::path(post, path = "/api/vms/{name}/forwards", tag = "forwards", params(("name" = String, Path, description = "VM name")), request_body(content = Object, description = "{\"forwards\": [PortForwardSpec]}"), responses((status = 200, description = "[PortForwardInfo]: all the VM's forwards")))]
async fn forwards_add(
    State(app): Shared,
    Path(name): Path<String>,
    b: Bytes,
) -> Result<Response, ApiError> {
    let ForwardsBody { forwards } = body(&b)?;
    Ok(json(
        app.call::<VmPortForwardAdd>(PortForwardAddParams { name, forwards })
            .await?,
    ))
}

#[utoipa::path(delete, path = "/api/vms/{name}/forwards/{host_port}", tag = "forwards", params(("name" = String, Path, description = "VM name"), ("host_port" = u16, Path, description = "the forward's host port")), responses((status = 200, description = "{}")))]
async fn forward_remove(
    State(app): Shared,
    Path((name, host_port)): Path<(String, u16)>,
) -> Result<Response, ApiError> {
    Ok(json(
        app.call::<VmPortForwardRemove>(PortForwardRemoveParams {
            name,
            bind: None,
            host_port,
        })
        .await?,
    ))
}

#[utoipa::path(get, path = "/api/images", tag = "images", responses((status = 200, description = "[ImageInfo]")))]
async fn images_list(State(app): Shared) -> Result<Response, ApiError> {
    Ok(json(app.call::<ImageList>(NoParams {}).await?))
}

#[utoipa::path(post, path = "/api/images/build", tag = "images", request_body(content = Object, description = "{\"name\": \"...\"}"), responses((status = 202, description = "{op_id} of the build")))]
async fn image_build(State(app): Shared, b: Bytes) -> Result<Response, ApiError> {
    let params: ImageName = body(&b)?;
    Ok(app.start::<ImageBuild>(params))
}

#[utoipa::path(post, path = "/api/images/pull", tag = "images", request_body(content = Object, description = "ImagePullParams"), responses((status = 202, description = "{op_id} of the pull")))]
async fn image_pull(State(app): Shared, b: Bytes) -> Result<Response, ApiError> {
    let params: ImagePullParams = body(&b)?;
    Ok(app.start::<ImagePull>(params))
}

#[utoipa::path(post, path = "/api/images/import", tag = "images", request_body(content = Object, description = "ImageImportParams (a root filesystem tarball or directory on the daemon's host)"), responses((status = 202, description = "{op_id} of the import")))]
async fn image_import(State(app): Shared, b: Bytes) -> Result<Response, ApiError> {
    let params: ImageImportParams = body(&b)?;
    Ok(app.start::<ImageImport>(params))
}

#[utoipa::path(delete, path = "/api/images/{name}", tag = "images", params(("name" = String, Path, description = "image name")), responses((status = 200, description = "{}")))]
async fn image_delete(State(app): Shared, Path(name): Path<String>) -> Result<Response, ApiError> {
    Ok(json(app.call::<ImageDelete>(ImageName { name }).await?))
}

#[utoipa::path(post, path = "/api/images/{name}/promote", tag = "images", params(("name" = String, Path, description = "image name")), responses((status = 200, description = "ImageInfo (image.promote)")))]
async fn image_promote(State(app): Shared, Path(name): Path<String>) -> Result<Response, ApiError> {
    Ok(json(app.call::<ImagePromote>(ImageName { name }).await?))
}

#[utoipa::path(get, path = "/api/ops/{op_id}", tag = "ops", params(("op_id" = String, Path, description = "op-xxxxxx")), responses((status = 200, description = "OpStatusResult; with `Accept: text/event-stream`, `stage` events (StageEvent) so far and live, then `end`: {ok, result} or {ok: false, error}")))]
async fn op(
    State(app): Shared,
    Path(op_id): Path<String>,
    h: HeaderMap,
) -> Result<Response, ApiError> {
    let op_id: OpId = op_id
        .parse()
        .map_err(|e| ApiError::new(ErrorCode::InvalidParams, format!("{e}")))?;
    let rec = app.ops.get(&op_id);
    if !wants_events(&h) {
        return match app
            .call::<OpStatus>(OpStatusParams {
                op_id: op_id.clone(),
            })
            .await
        {
            Err(e) if e.error.code == ErrorCode::NotFound => match rec {
                Some(rec) => Ok(json(rec.status(&op_id))),
                None => Err(e),
            },
            answer => Ok(json(answer?)),
        };
    }
    let Some(rec) = rec else {
        return follow_any(&app, op_id).await;
    };
    let permit = app.stream_permit()?;
    let follower = rec.follow().ok_or_else(|| {
        ApiError::new(
            ErrorCode::Unavailable,
            format!(
                "operation {op_id} has {} followers already",
                crate::ops::MAX_FOLLOWERS
            ),
        )
    })?;
    let events = stream::unfold((follower, permit), |(mut f, permit)| async move {
        let ev = match f.next().await? {
            Next::Stage(v) => Event::default().event("stage").json_data(v),
            Next::End(v) => Event::default().event("end").json_data(v),
        }
        .ok()?;
        Some((ev, (f, permit)))
    });
    Ok(sse(events))
}

/// Where [`follow_any`]'s stream is.
enum Following {
    /// `op.follow` runs; its stage events arrive.
    Running(std::pin::Pin<Box<dyn std::future::Future<Output = Result<Value, RpcError>> + Send>>),
    /// It answered: the events still queued, then `end`.
    Ended(Result<Value, RpcError>),
    Done,
}

/// The event stream of an operation the web API did not start (the
/// CLI's, say): its stages through `op.follow` (the runner's own record,
/// replayed then live), then `end`. The runner keeps a failure's message,
/// not its code: such an `end` carries the message and the op id.
async fn follow_any(app: &Arc<App>, op_id: OpId) -> Result<Response, ApiError> {
    let params = OpStatusParams {
        op_id: op_id.clone(),
    };
    // An unknown op id is `not_found` before any stream opens.
    app.call::<OpStatus>(params.clone()).await?;
    let permit = app.stream_permit()?;
    let (events, rx) = EventSink::channel(64);
    let (caller, gone) = watch::channel(false);
    let call = Call::new(OpId::mint(), app.backend.uid, events, gone);
    let params = serde_json::to_value(params).expect("params encode");
    let router = app.backend.router.clone();
    let run = Box::pin(async move { router.dispatch("web", OpFollow::NAME, call, params).await });
    let state = (Following::Running(run), rx, (permit, caller));
    let events = stream::unfold(state, move |(mut st, mut rx, held)| {
        let op_id = op_id.clone();
        async move {
            loop {
                match st {
                    Following::Running(mut run) => tokio::select! {
                        biased;
                        Some(ev) = rx.recv() => {
                            let e = Event::default().event("stage").json_data(ev).ok()?;
                            return Some((e, (Following::Running(run), rx, held)));
                        }
                        r = &mut run => st = Following::Ended(r),
                    },
                    Following::Ended(r) => {
                        if let Ok(ev) = rx.try_recv() {
                            let e = Event::default().event("stage").json_data(ev).ok()?;
                            return Some((e, (Following::Ended(r), rx, held)));
                        }
                        let end = match r.map(serde_json::from_value::<OpStatusResult>) {
                            Ok(Ok(status)) => match status.error {
                                None => json!({ "ok": true, "result": status }),
                                Some(message) => json!({
                                    "ok": false,
                                    "error": { "message": message, "op_id": op_id }
                                }),
                            },
                            Ok(Err(e)) => json!({
                                "ok": false,
                                "error": { "code": "internal", "message": e.to_string(), "op_id": op_id }
                            }),
                            Err(e) => end_event(&Err(e), &op_id),
                        };
                        let e = Event::default().event("end").json_data(end).ok()?;
                        return Some((e, (Following::Done, rx, held)));
                    }
                    Following::Done => return None,
                }
            }
        }
    });
    Ok(sse(events))
}

#[utoipa::path(get, path = "/api/doctor", tag = "host", responses((status = 200, description = "the doctor report (`banger doctor --json`)")))]
async fn doctor(State(app): Shared) -> Result<Response, ApiError> {
    Ok(json(app.call::<HostDoctor>(NoParams {}).await?))
}

#[derive(rust_embed::Embed)]
#[folder = "ui/"]
struct Ui;

fn content_type(path: &str) -> &'static str {
    match path.rsplit_once('.').map(|(_, ext)| ext) {
        Some("html") => "text/html; charset=utf-8",
        Some("js" | "mjs") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("json" | "map") => "application/json",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        Some("ico") => "image/x-icon",
        Some("woff2") => "font/woff2",
        Some("txt") => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    }
}

fn embedded(path: &str) -> Response {
    match Ui::get(path) {
        Some(f) => (
            [
                (header::CONTENT_TYPE, content_type(path)),
                (header::CACHE_CONTROL, "no-cache"),
            ],
            f.data.into_owned(),
        )
            .into_response(),
        None => error_response(
            StatusCode::NOT_FOUND,
            "not_found",
            &format!("no asset {path:?}"),
            &OpId::mint(),
        ),
    }
}

#[utoipa::path(get, path = "/assets/{path}", tag = "pages", params(("path" = String, Path, description = "a file of the UI")), responses((status = 200, description = "the file"), (status = 404, description = "no such file")))]
async fn asset(Path(path): Path<String>) -> Response {
    embedded(&path)
}

#[utoipa::path(get, path = "/", tag = "pages", responses((status = 200, description = "the UI (index.html)")))]
async fn page_root() -> Response {
    embedded("index.html")
}

#[utoipa::path(get, path = "/new", tag = "pages", responses((status = 200, description = "the UI (index.html)")))]
async fn page_new() -> Response {
    embedded("index.html")
}

#[utoipa::path(get, path = "/images", tag = "pages", responses((status = 200, description = "the UI (index.html)")))]
async fn page_images() -> Response {
    embedded("index.html")
}

#[utoipa::path(get, path = "/doctor", tag = "pages", responses((status = 200, description = "the UI (index.html)")))]
async fn page_doctor() -> Response {
    embedded("index.html")
}

#[utoipa::path(get, path = "/vms/{name}", tag = "pages", params(("name" = String, Path, description = "VM name")), responses((status = 200, description = "the UI (index.html)")))]
async fn page_vm() -> Response {
    embedded("index.html")
}

#[utoipa::path(get, path = "/ops/{op_id}", tag = "pages", params(("op_id" = String, Path, description = "op-xxxxxx")), responses((status = 200, description = "the UI (index.html)")))]
async fn page_op() -> Response {
    embedded("index.html")
}

#[utoipa::path(get, path = "/api/openapi.json", tag = "host", responses((status = 200, description = "this document")))]
async fn openapi(State(app): Shared) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        app.openapi.get().cloned().unwrap_or_default(),
    )
        .into_response()
}
