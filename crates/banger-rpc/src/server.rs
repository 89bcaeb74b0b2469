use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use banger_wire::{
    ErrorCode, ErrorObject, MAX_FRAME_BYTES, Method, OpId, PROTOCOL_VERSION, Request, RequestError,
    Response, ResponseBody, encode_frame,
};
use serde::Serialize;
use serde_json::Value;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::frame::{FrameError, read_frame};

/// An error a handler returns; the server adds the op id.
#[derive(Debug, Clone, PartialEq)]
pub struct RpcError {
    pub code: ErrorCode,
    pub message: String,
    pub details: Option<Value>,
}

impl RpcError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        RpcError {
            code,
            message: message.into(),
            details: None,
        }
    }
    pub fn invalid_params(m: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidParams, m)
    }
    pub fn not_found(m: impl Into<String>) -> Self {
        Self::new(ErrorCode::NotFound, m)
    }
    pub fn conflict(m: impl Into<String>) -> Self {
        Self::new(ErrorCode::Conflict, m)
    }
    pub fn unavailable(m: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unavailable, m)
    }
    pub fn internal(m: impl Into<String>) -> Self {
        Self::new(ErrorCode::Internal, m)
    }
}

impl fmt::Display for RpcError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for RpcError {}

/// Sends `event` frames to the caller while a handler runs.
#[derive(Debug, Clone)]
pub struct EventSink(mpsc::Sender<Value>);

impl EventSink {
    /// A sink and the receiving end of its events, for a caller in the same
    /// process ([`Router::dispatch`]). At most `capacity` events wait; a
    /// full channel makes the sender wait, as a slow socket caller would.
    pub fn channel(capacity: usize) -> (Self, mpsc::Receiver<Value>) {
        let (tx, rx) = mpsc::channel(capacity);
        (EventSink(tx), rx)
    }

    /// A sink whose events go nowhere: for work the daemon starts on its
    /// own, with no caller to tell.
    pub fn discard() -> Self {
        EventSink(mpsc::channel(1).0)
    }

    /// Queue an event. Waits when the caller reads slowly; a caller that went
    /// away makes this a no-op (the operation itself carries on).
    pub async fn send(&self, event: &impl Serialize) {
        if let Ok(v) = serde_json::to_value(event) {
            let _ = self.0.send(v).await;
        }
    }
}

/// What a handler knows about the request it serves.
#[derive(Debug, Clone)]
pub struct Call {
    pub op_id: OpId,
    pub peer_uid: u32,
    pub peer_pid: Option<i32>,
    pub events: EventSink,
    gone: watch::Receiver<bool>,
}

impl Call {
    /// A call made in process (the web API): `gone` turning true tells the
    /// handler its caller went away, as a closed socket would.
    pub fn new(op_id: OpId, peer_uid: u32, events: EventSink, gone: watch::Receiver<bool>) -> Self {
        Call {
            op_id,
            peer_uid,
            peer_pid: None,
            events,
            gone,
        }
    }

    /// Resolves once the caller has closed its side of the connection
    /// (exited, killed, or done sending) or sent more (a caller sends
    /// nothing while its request runs). Handlers that do not wait for this
    /// learn that a caller went away only when writing to it fails.
    pub async fn caller_gone(&self) {
        let mut gone = self.gone.clone();
        let _ = gone.wait_for(|g| *g).await;
    }
}

type BoxFuture = Pin<Box<dyn Future<Output = Result<Value, RpcError>> + Send>>;
type Handler = Box<dyn Fn(Call, Value) -> BoxFuture + Send + Sync>;

/// Method name → typed handler. Built once at startup; the set of routes is
/// the server's allowlist.
#[derive(Default)]
pub struct Router {
    routes: HashMap<&'static str, Handler>,
}

impl fmt::Debug for Router {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Router")
            .field("methods", &self.methods())
            .finish()
    }
}

impl Router {
    pub fn new() -> Self {
        Self::default()
    }

    /// [`Router::route`] for a handler that works on a shared service:
    /// each call gets its own clone of `state`.
    pub fn route_with<M, S, F, Fut>(self, state: &Arc<S>, handler: F) -> Self
    where
        M: Method,
        S: Send + Sync + 'static,
        F: Fn(Arc<S>, Call, M::Params) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<M::Result, RpcError>> + Send + 'static,
    {
        let state = state.clone();
        self.route::<M, _, _>(move |ctx, params| handler(state.clone(), ctx, params))
    }

    /// Serve `M` with `handler`. Params are decoded before the handler runs;
    /// a decode failure is `invalid_params` naming the method.
    pub fn route<M, F, Fut>(mut self, handler: F) -> Self
    where
        M: Method,
        F: Fn(Call, M::Params) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<M::Result, RpcError>> + Send + 'static,
    {
        let handler = Arc::new(handler);
        let erased: Handler = Box::new(move |ctx, params| {
            let handler = handler.clone();
            Box::pin(async move {
                let params: M::Params = serde_json::from_value(params).map_err(|e| {
                    RpcError::invalid_params(format!("invalid params for {}: {e}", M::NAME))
                })?;
                let result = handler(ctx, params).await?;
                serde_json::to_value(result)
                    .map_err(|e| RpcError::internal(format!("cannot encode result: {e}")))
            })
        });
        assert!(
            self.routes.insert(M::NAME, erased).is_none(),
            "method {} routed twice",
            M::NAME
        );
        self
    }

    /// Run `method` in process, as a socket request would run: in a task of
    /// its own (a panic is `internal`) inside a span carrying the call's op
    /// id, logged as `"<name> rpc completed"` / `"<name> rpc failed"`.
    /// Dropping the returned future aborts the handler, as a caller that
    /// disconnects does.
    pub async fn dispatch(
        &self,
        name: &'static str,
        method: &str,
        call: Call,
        params: Value,
    ) -> Result<Value, RpcError> {
        let started = Instant::now();
        let span = info_span!("rpc", op_id = %call.op_id, method);
        let Some(handler) = self.routes.get(method) else {
            let e = RpcError::new(
                ErrorCode::UnknownMethod,
                format!("unknown method {method:?}"),
            );
            return Err(e);
        };
        let op_id = call.op_id.clone();
        let mut task = AbortOnDrop(tokio::spawn(handler(call, params).instrument(span.clone())));
        let result = (&mut task.0).await;
        let result = result.unwrap_or_else(|e| {
            Err(RpcError::internal(if e.is_panic() {
                "internal error: the handler panicked (see the daemon log)"
            } else {
                "the request was cancelled"
            }))
        });
        span.in_scope(|| match &result {
            Ok(_) => info!(duration_ms = elapsed_ms(started), "{name} rpc completed"),
            Err(e) => log_failure(
                name,
                &ErrorObject {
                    code: e.code,
                    message: e.message.clone(),
                    op_id,
                    details: None,
                },
                started,
            ),
        });
        result
    }

    pub fn methods(&self) -> Vec<&'static str> {
        let mut m: Vec<_> = self.routes.keys().copied().collect();
        m.sort_unstable();
        m
    }
}

/// How a server presents itself and whom it lets in.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Prefix of the per-call log lines: `"<name> rpc completed"` / `"<name> rpc failed"`.
    pub name: &'static str,
    /// Peer uids allowed to talk to this socket (checked with SO_PEERCRED).
    pub allowed_uids: Vec<u32>,
}

/// Bind a Unix socket at `path` with mode 0600, replacing a stale socket
/// file. The caller must hold whatever lock makes `path` its own.
pub fn bind_socket(path: &Path) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    secure_socket_node(path, None)?;
    Ok(listener)
}

/// Make the socket node at `path` 0600 and, with `owner`, that uid's —
/// through a descriptor of the node itself, never following a link: the
/// directory may belong to the user a root helper serves, who could swap the
/// name for a link to any file between bind and chmod.
pub fn secure_socket_node(path: &Path, owner: Option<u32>) -> std::io::Result<()> {
    use rustix::fs::{AtFlags, FileType, Mode, OFlags};
    let fd = rustix::fs::open(
        path,
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let st = rustix::fs::fstat(&fd)?;
    if FileType::from_raw_mode(st.st_mode) != FileType::Socket {
        return Err(std::io::Error::other(format!(
            "{} is not the socket just bound (something replaced it)",
            path.display()
        )));
    }
    // fchmodat(AT_EMPTY_PATH) needs Linux 6.6; the descriptor's /proc link
    // names the same inode on any kernel.
    let by_fd = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&fd));
    rustix::fs::chmod(by_fd.as_str(), Mode::from_raw_mode(0o600))?;
    if let Some(uid) = owner {
        rustix::fs::chownat(
            &fd,
            "",
            Some(rustix::fs::Uid::from_raw(uid)),
            None,
            AtFlags::EMPTY_PATH,
        )?;
    }
    Ok(())
}

/// Accept and serve connections until `shutdown` turns true; then let
/// requests in flight finish (up to `grace`) and return.
pub async fn serve(
    listener: UnixListener,
    config: ServeConfig,
    router: Arc<Router>,
    mut shutdown: watch::Receiver<bool>,
    grace: Duration,
) {
    let config = Arc::new(config);
    let conn_shutdown = shutdown.clone();
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    conns.spawn(serve_connection(stream, config.clone(), router.clone(), conn_shutdown.clone()));
                }
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = stopped(&mut shutdown) => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    drop(listener);
    if tokio::time::timeout(grace, async { while conns.join_next().await.is_some() {} })
        .await
        .is_err()
    {
        warn!(
            remaining = conns.len(),
            "requests still running at shutdown were abandoned"
        );
    }
}

/// Resolves once `rx` reads true (or its sender is gone).
async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await.map(|_| ());
}

async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, resp: &Response) -> std::io::Result<()> {
    w.write_all(&encode_frame(resp)).await
}

/// Serve one accepted connection until the peer closes it, it breaks the
/// framing, or `shutdown` turns true between requests. [`serve`] runs one of
/// these per connection; the fuzz target drives it directly.
pub async fn serve_connection(
    stream: UnixStream,
    config: Arc<ServeConfig>,
    router: Arc<Router>,
    mut shutdown: watch::Receiver<bool>,
) {
    let (peer_uid, peer_pid) = match stream.peer_cred() {
        Ok(c) => (c.uid(), c.pid()),
        Err(e) => {
            warn!(error = %e, "cannot read peer credentials; closing");
            return;
        }
    };
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    if !config.allowed_uids.contains(&peer_uid) {
        let op_id = OpId::mint();
        warn!(%op_id, peer_uid, "{} refused a connection from a uid it does not serve", config.name);
        let resp = RequestError {
            id: None,
            op_id: Some(op_id),
            code: ErrorCode::PermissionDenied,
            message: format!("uid {peer_uid} may not use this socket"),
        }
        .into_response();
        let _ = write_frame(&mut w, &resp).await;
        return;
    }
    loop {
        let frame = tokio::select! {
            f = read_frame(&mut r, MAX_FRAME_BYTES) => f,
            _ = stopped(&mut shutdown) => return,
        };
        let bytes = match frame {
            Ok(Some(bytes)) => bytes,
            Ok(None) => return,
            Err(FrameError::Io(e)) => {
                debug!(error = %e, "connection error");
                return;
            }
            Err(e @ FrameError::Truncated) => {
                debug!(error = %e, "peer went away mid-frame");
                return;
            }
            Err(e @ FrameError::TooLarge { .. }) => {
                // The stream is out of sync after an oversized frame: answer and close.
                let err = RequestError {
                    id: None,
                    op_id: None,
                    code: ErrorCode::InvalidRequest,
                    message: e.to_string(),
                };
                let resp = err.into_response();
                warn!(op_id = %resp.op_id, "{} rejected a frame: {e}", config.name);
                let _ = write_frame(&mut w, &resp).await;
                return;
            }
        };
        let peer = Peer {
            uid: peer_uid,
            pid: peer_pid,
        };
        if handle_frame(&bytes, peer, &config, &router, &mut r, &mut w)
            .await
            .is_err()
        {
            return;
        }
        if *shutdown.borrow() {
            return;
        }
    }
}

#[derive(Clone, Copy)]
struct Peer {
    uid: u32,
    pid: Option<i32>,
}

/// Aborts the task when dropped, so a caller that disconnects cancels its request.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);
impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn handle_frame<R: AsyncBufRead + Unpin, W: AsyncWrite + Unpin>(
    bytes: &[u8],
    peer: Peer,
    config: &ServeConfig,
    router: &Router,
    r: &mut R,
    w: &mut W,
) -> std::io::Result<()> {
    let started = Instant::now();
    let req = match Request::parse(bytes) {
        Ok(req) => req,
        Err(err) => {
            let method = "<unparsed>";
            let resp = err.into_response();
            let ResponseBody::Error(obj) = &resp.body else {
                unreachable!()
            };
            let span = info_span!("rpc", op_id = %resp.op_id, method);
            span.in_scope(|| log_failure(config.name, obj, started));
            return write_frame(w, &resp).await;
        }
    };
    let op_id = req.op_id.clone().unwrap_or_else(OpId::mint);
    let span = info_span!("rpc", op_id = %op_id, method = %req.method);
    async move {
        let reply = |body| Response {
            v: PROTOCOL_VERSION,
            id: Some(req.id),
            op_id: op_id.clone(),
            body,
        };
        let Some(handler) = router.routes.get(req.method.as_str()) else {
            let obj = ErrorObject {
                code: ErrorCode::UnknownMethod,
                message: format!(
                    "unknown method {:?} (this server serves: {})",
                    req.method,
                    router.methods().join(", ")
                ),
                op_id: op_id.clone(),
                details: None,
            };
            log_failure(config.name, &obj, started);
            return write_frame(w, &reply(ResponseBody::Error(obj))).await;
        };
        debug!(
            peer_uid = peer.uid,
            peer_pid = peer.pid,
            "{} rpc started",
            config.name
        );
        let (tx, mut rx) = mpsc::channel(64);
        let (gone_tx, gone_rx) = watch::channel(false);
        let ctx = Call {
            op_id: op_id.clone(),
            peer_uid: peer.uid,
            peer_pid: peer.pid,
            events: EventSink(tx),
            gone: gone_rx,
        };
        // The handler runs as its own task so that a panic becomes an `internal`
        // error instead of a dropped connection.
        let mut task = AbortOnDrop(tokio::spawn(handler(ctx, req.params).in_current_span()));
        // A caller sends nothing while its request runs: the read side
        // ending (it closed the connection, or its sending side) or more
        // bytes arriving (the next request, which stays buffered for the
        // next read) mean it is done waiting, which handlers that run until
        // then learn through `Call::caller_gone`.
        let mut watching = true;
        let outcome = loop {
            tokio::select! {
                biased;
                Some(ev) = rx.recv() => write_frame(w, &reply(ResponseBody::Event(ev))).await?,
                joined = &mut task.0 => break joined,
                // Closed, broken, or more bytes: the caller is done with
                // this request either way.
                _ = r.fill_buf(), if watching => {
                    watching = false;
                    let _ = gone_tx.send(true);
                }
            }
        };
        while let Ok(ev) = rx.try_recv() {
            write_frame(w, &reply(ResponseBody::Event(ev))).await?;
        }
        let result = outcome.unwrap_or_else(|e| {
            Err(RpcError::internal(if e.is_panic() {
                "internal error: the handler panicked (see the daemon log)"
            } else {
                "the request was cancelled"
            }))
        });
        let body = match result {
            Ok(v) => {
                info!(
                    duration_ms = elapsed_ms(started),
                    "{} rpc completed", config.name
                );
                ResponseBody::Result(v)
            }
            Err(e) => {
                let obj = ErrorObject {
                    code: e.code,
                    message: e.message,
                    op_id: op_id.clone(),
                    details: e.details,
                };
                log_failure(config.name, &obj, started);
                ResponseBody::Error(obj)
            }
        };
        write_frame(w, &reply(body)).await
    }
    .instrument(span)
    .await
}

fn elapsed_ms(started: Instant) -> f64 {
    (started.elapsed().as_secs_f64() * 1e6).round() / 1e3
}

fn log_failure(name: &str, obj: &ErrorObject, started: Instant) {
    warn!(code = %obj.code, error = %obj.message, duration_ms = elapsed_ms(started), "{name} rpc failed");
}
