//! Async host-side client of the guest agent.
//!
//! [`AgentClient::handshake`] takes any byte stream, finds the agent's
//! acknowledgement behind whatever stale bytes the stream carries, and
//! spawns two tasks: a reader that routes frames to the calls waiting for
//! them and a writer that serialises frames onto the stream. Every call
//! gets its own stream id, so any number of calls and execs run at once on
//! one client; the client is cheap to clone.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::time::Instant;

use crate::frame::{
    FrameDecoder, FrameError, FrameKind, HandshakeScan, INITIAL_WINDOW, MAX_DATA_CHUNK,
    encode_frame, encode_handshake, encode_json_frame, encode_window, scan_handshake,
};
use crate::messages::{
    AuthorizeKeysRequest, AuthorizeKeysResult, ExecRequest, ExecStarted, ExitStatus, Health, Hello,
    HelloAck, IdentityRequest, IdentityResult, PROTOCOL_VERSION, PortsResult, RemoteError, Request,
    Response, ShutdownResult, SignalRequest, Stats, TtySize,
};

/// Largest batch of frames the writer task hands to one `write_all`.
const WRITE_BATCH: usize = 256 * 1024;
/// First and longest pause between repeated hellos.
const HELLO_RETRY_MIN: Duration = Duration::from_millis(100);
const HELLO_RETRY_MAX: Duration = Duration::from_secs(1);

/// Errors of the agent client.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("i/o error on the agent channel")]
    Io(#[from] std::io::Error),
    #[error("no answer from the agent within {0:?}")]
    HandshakeTimeout(Duration),
    #[error("agent speaks protocol version {agent}, this host speaks {host}")]
    VersionMismatch { agent: u32, host: u32 },
    #[error("agent channel closed: {0}")]
    Disconnected(String),
    #[error("protocol violation by the agent: {0}")]
    Protocol(String),
    #[error("bad frame on the agent channel")]
    Frame(#[from] FrameError),
    #[error("agent answered {method} with an unexpected result")]
    BadResult {
        method: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("agent refused {method}")]
    Remote {
        method: &'static str,
        #[source]
        source: RemoteError,
    },
    #[error("the process's stdin is closed")]
    StdinClosed,
}

impl AgentError {
    /// The agent's error, if the agent refused the call.
    pub fn remote(&self) -> Option<&RemoteError> {
        match self {
            Self::Remote { source, .. } => Some(source),
            _ => None,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Output of an exec, in the order the agent read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    /// Always the last event.
    Exit(ExitStatus),
}

/// Everything an exec produced; see [`ExecSession::wait_with_output`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub status: ExitStatus,
}

/// Why a credit pool will never grow again.
#[derive(Debug, Clone)]
enum CreditClosed {
    Exited,
    Disconnected(String),
}

/// Stdin credit granted by the agent.
#[derive(Debug)]
struct Credit {
    state: Mutex<(u64, Option<CreditClosed>)>,
    notify: Notify,
}

impl Credit {
    fn new(initial: u32) -> Self {
        Self {
            state: Mutex::new((u64::from(initial), None)),
            notify: Notify::new(),
        }
    }

    fn add(&self, n: u32) {
        lock(&self.state).0 += u64::from(n);
        self.notify.notify_waiters();
    }

    fn close(&self, why: CreditClosed) {
        lock(&self.state).1.get_or_insert(why);
        self.notify.notify_waiters();
    }

    /// Takes between 1 and `max` bytes of credit, waiting for some.
    async fn take(&self, max: usize) -> Result<usize, AgentError> {
        loop {
            let notified = self.notify.notified();
            {
                let mut st = lock(&self.state);
                match &st.1 {
                    Some(CreditClosed::Exited) => return Err(AgentError::StdinClosed),
                    Some(CreditClosed::Disconnected(r)) => {
                        return Err(AgentError::Disconnected(r.clone()));
                    }
                    None => {}
                }
                if st.0 > 0 {
                    let n = st.0.min(max as u64);
                    st.0 -= n;
                    return Ok(n as usize);
                }
            }
            notified.await;
        }
    }
}

type CallReply = oneshot::Sender<Result<Response, AgentError>>;

#[derive(Debug)]
struct ExecRoute {
    started: Option<CallReply>,
    events: mpsc::UnboundedSender<Result<ExecEvent, AgentError>>,
    /// Output bytes received and not yet credited back.
    unacked: Arc<AtomicU64>,
    stdin_credit: Arc<Credit>,
}

#[derive(Debug)]
enum Route {
    Call(CallReply),
    Exec(ExecRoute),
}

#[derive(Debug, Default)]
struct Routes {
    map: HashMap<u32, Route>,
    closed: Option<String>,
}

impl Routes {
    fn close_all(&mut self, reason: &str) {
        self.closed.get_or_insert_with(|| reason.to_owned());
        for (_, route) in self.map.drain() {
            match route {
                Route::Call(reply) => {
                    let _ = reply.send(Err(AgentError::Disconnected(reason.to_owned())));
                }
                Route::Exec(exec) => {
                    if let Some(reply) = exec.started {
                        let _ = reply.send(Err(AgentError::Disconnected(reason.to_owned())));
                    }
                    exec.stdin_credit
                        .close(CreditClosed::Disconnected(reason.to_owned()));
                    // Dropping `events` ends the session's event stream.
                }
            }
        }
    }
}

#[derive(Debug)]
struct Inner {
    tx: mpsc::UnboundedSender<Vec<u8>>,
    routes: Arc<Mutex<Routes>>,
    next_stream: AtomicU32,
}

impl Inner {
    fn send(&self, frame: Vec<u8>) -> Result<(), AgentError> {
        if let Some(reason) = &lock(&self.routes).closed {
            return Err(AgentError::Disconnected(reason.clone()));
        }
        self.tx
            .send(frame)
            .map_err(|_| AgentError::Disconnected("writer task ended".into()))
    }

    fn register(&self, route: Route) -> Result<u32, AgentError> {
        let mut routes = lock(&self.routes);
        if let Some(reason) = &routes.closed {
            return Err(AgentError::Disconnected(reason.clone()));
        }
        loop {
            let id = self.next_stream.fetch_add(1, Ordering::Relaxed);
            if id != 0 && !routes.map.contains_key(&id) {
                routes.map.insert(id, route);
                return Ok(id);
            }
        }
    }

    fn unregister(&self, stream: u32) {
        lock(&self.routes).map.remove(&stream);
    }

    /// Tells the agent to kill an exec; the result does not matter (a
    /// closed connection took the process with it).
    fn cancel(&self, stream: u32) {
        if let Ok(frame) = encode_frame(stream, FrameKind::Cancel, &[]) {
            let _ = self.send(frame);
        }
    }
}

/// Removes a route when a call is abandoned (its future dropped); an
/// abandoned exec is also cancelled, as it may have started already.
struct RouteGuard<'a> {
    inner: &'a Inner,
    stream: u32,
    armed: bool,
    cancel: bool,
}

impl Drop for RouteGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.inner.unregister(self.stream);
            if self.cancel {
                self.inner.cancel(self.stream);
            }
        }
    }
}

fn typed<T: DeserializeOwned>(method: &'static str, resp: Response) -> Result<T, AgentError> {
    match resp {
        Response::Ok(value) => {
            serde_json::from_value(value).map_err(|source| AgentError::BadResult { method, source })
        }
        Response::Error(source) => Err(AgentError::Remote { method, source }),
    }
}

/// A connection to one guest agent.
#[derive(Debug, Clone)]
pub struct AgentClient {
    inner: Arc<Inner>,
    ack: Arc<HelloAck>,
}

impl AgentClient {
    /// Greets the agent on `stream` and starts the client's tasks.
    ///
    /// The hello is repeated (100 ms, doubling to 1 s) until the agent
    /// answers or `timeout` passes, so this can be called while the guest
    /// is still booting. Must be called inside a tokio runtime.
    pub async fn handshake<S>(stream: S, timeout: Duration) -> Result<Self, AgentError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let deadline = Instant::now() + timeout;
        let (mut rd, mut wr) = tokio::io::split(stream);
        let nonce = format!("{:032x}", fastrand::u128(..));
        let hello = encode_handshake(
            FrameKind::Hello,
            &Hello {
                protocol_version: PROTOCOL_VERSION,
                nonce: nonce.clone(),
            },
        )?;
        let timed_out = || AgentError::HandshakeTimeout(timeout);

        let mut buf = Vec::new();
        let mut chunk = vec![0u8; 16 * 1024];
        let mut retry = HELLO_RETRY_MIN;
        let mut next_hello = Instant::now();
        let ack = loop {
            match scan_handshake::<HelloAck>(&buf, FrameKind::HelloAck) {
                HandshakeScan::Found { value, end, .. } => {
                    buf.drain(..end);
                    if value.nonce == nonce {
                        break value;
                    }
                    // An answer to an earlier connection's hello.
                    continue;
                }
                HandshakeScan::NeedMore { discard } => {
                    buf.drain(..discard);
                }
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(timed_out());
            }
            if now >= next_hello {
                tokio::time::timeout_at(deadline, async {
                    wr.write_all(&hello).await?;
                    wr.flush().await
                })
                .await
                .map_err(|_| timed_out())??;
                next_hello = Instant::now() + retry;
                retry = (retry * 2).min(HELLO_RETRY_MAX);
            }
            match tokio::time::timeout_at(next_hello.min(deadline), rd.read(&mut chunk)).await {
                Ok(Ok(0)) => {
                    return Err(AgentError::Disconnected(
                        "stream ended during the handshake".into(),
                    ));
                }
                Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
                Ok(Err(e)) => return Err(e.into()),
                Err(_) => {}
            }
        };
        if ack.protocol_version != PROTOCOL_VERSION {
            return Err(AgentError::VersionMismatch {
                agent: ack.protocol_version,
                host: PROTOCOL_VERSION,
            });
        }

        let mut decoder = FrameDecoder::new();
        decoder.extend(&buf);
        let routes = Arc::new(Mutex::new(Routes::default()));
        let (tx, rx) = mpsc::unbounded_channel();
        let (stop_tx, stop_rx) = oneshot::channel();
        tokio::spawn(write_loop(wr, rx, routes.clone(), stop_tx));
        tokio::spawn(read_loop(rd, decoder, routes.clone(), stop_rx));
        Ok(Self {
            inner: Arc::new(Inner {
                tx,
                routes,
                next_stream: AtomicU32::new(1),
            }),
            ack: Arc::new(ack),
        })
    }

    /// What the agent said in the handshake.
    pub fn hello(&self) -> &HelloAck {
        &self.ack
    }

    /// Whether the connection has ended; every call fails from then on.
    pub fn is_closed(&self) -> bool {
        lock(&self.inner.routes).closed.is_some()
    }

    async fn call(&self, request: &Request) -> Result<Response, AgentError> {
        let (reply, rx) = oneshot::channel();
        let stream = self.inner.register(Route::Call(reply))?;
        let _guard = RouteGuard {
            inner: &self.inner,
            stream,
            armed: true,
            cancel: false,
        };
        self.inner
            .send(encode_json_frame(stream, FrameKind::Request, request)?)?;
        rx.await
            .map_err(|_| AgentError::Disconnected("reader task ended".into()))?
    }

    pub async fn health(&self) -> Result<Health, AgentError> {
        typed("health", self.call(&Request::Health).await?)
    }

    pub async fn ports(&self) -> Result<PortsResult, AgentError> {
        typed("ports", self.call(&Request::Ports).await?)
    }

    pub async fn stats(&self) -> Result<Stats, AgentError> {
        typed("stats", self.call(&Request::Stats).await?)
    }

    pub async fn authorize_keys(
        &self,
        keys: Vec<String>,
    ) -> Result<AuthorizeKeysResult, AgentError> {
        let request = Request::AuthorizeKeys(AuthorizeKeysRequest { keys });
        typed("authorize_keys", self.call(&request).await?)
    }

    /// Gives a restored guest its own identity ([`IdentityRequest`]).
    pub async fn identity(&self, request: IdentityRequest) -> Result<IdentityResult, AgentError> {
        typed("identity", self.call(&Request::Identity(request)).await?)
    }

    /// Asks the guest to power off. Returns once the agent has accepted;
    /// the channel closes shortly after.
    pub async fn shutdown(&self) -> Result<ShutdownResult, AgentError> {
        typed("shutdown", self.call(&Request::Shutdown).await?)
    }

    /// Starts a process. Returns once it runs; its output and exit status
    /// come through the returned session.
    pub async fn exec(&self, request: ExecRequest) -> Result<ExecSession, AgentError> {
        let wants_stdin = request.stdin || request.tty.is_some();
        let (reply, started_rx) = oneshot::channel();
        let (events_tx, events) = mpsc::unbounded_channel();
        let unacked = Arc::new(AtomicU64::new(0));
        let credit = Arc::new(Credit::new(INITIAL_WINDOW));
        let stream = self.inner.register(Route::Exec(ExecRoute {
            started: Some(reply),
            events: events_tx,
            unacked: unacked.clone(),
            stdin_credit: credit.clone(),
        }))?;
        let mut guard = RouteGuard {
            inner: &self.inner,
            stream,
            armed: true,
            cancel: true,
        };
        let frame = encode_json_frame(stream, FrameKind::Request, &Request::Exec(request))?;
        self.inner.send(frame)?;
        let resp = started_rx
            .await
            .map_err(|_| AgentError::Disconnected("reader task ended".into()))??;
        let started: ExecStarted = typed("exec", resp).inspect_err(|_| guard.cancel = false)?;
        // From here on the session owns the route.
        guard.armed = false;
        Ok(ExecSession {
            stdin: wants_stdin.then(|| ExecStdin {
                inner: self.inner.clone(),
                stream,
                credit,
                closed: false,
            }),
            inner: self.inner.clone(),
            stream,
            pid: started.pid,
            events,
            unacked,
            status: None,
        })
    }
}

/// A running process started by [`AgentClient::exec`].
///
/// Dropping the session before the `Exit` event kills the process.
#[derive(Debug)]
pub struct ExecSession {
    inner: Arc<Inner>,
    stream: u32,
    pid: u32,
    events: mpsc::UnboundedReceiver<Result<ExecEvent, AgentError>>,
    unacked: Arc<AtomicU64>,
    stdin: Option<ExecStdin>,
    status: Option<ExitStatus>,
}

impl ExecSession {
    /// PID of the process inside the guest (also its process group id).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The stdin sink, if the request asked for stdin and it was not taken.
    pub fn take_stdin(&mut self) -> Option<ExecStdin> {
        self.stdin.take()
    }

    /// Sends `signal` to the process group of the process.
    pub fn signal(&self, signal: i32) -> Result<(), AgentError> {
        self.signaller().signal(signal)
    }

    /// A handle that can signal the process from another task.
    pub fn signaller(&self) -> ExecSignaller {
        ExecSignaller {
            inner: self.inner.clone(),
            stream: self.stream,
        }
    }

    /// The exit status, once the `Exit` event was returned.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        self.status
    }

    /// The next chunk of output or the exit status; `Ok(None)` after the
    /// exit status was returned. Taking an output event returns its bytes
    /// of credit to the agent: an unread session stalls the process after
    /// [`INITIAL_WINDOW`] bytes instead of filling memory.
    pub async fn next_event(&mut self) -> Result<Option<ExecEvent>, AgentError> {
        if self.status.is_some() {
            return Ok(None);
        }
        let event = match self.events.recv().await {
            Some(event) => event?,
            None => {
                let reason = lock(&self.inner.routes)
                    .closed
                    .clone()
                    .unwrap_or_else(|| "exec route dropped".into());
                return Err(AgentError::Disconnected(reason));
            }
        };
        match &event {
            ExecEvent::Stdout(data) | ExecEvent::Stderr(data) => {
                let n = data.len() as u32;
                self.unacked.fetch_sub(u64::from(n), Ordering::AcqRel);
                // A failure means the connection is gone: the next
                // recv reports it.
                let _ = self.inner.send(encode_window(self.stream, n));
            }
            ExecEvent::Exit(status) => self.status = Some(*status),
        }
        Ok(Some(event))
    }

    /// Closes stdin (if still held), collects all output and the status.
    pub async fn wait_with_output(mut self) -> Result<ExecOutput, AgentError> {
        drop(self.stdin.take());
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        loop {
            match self.next_event().await? {
                Some(ExecEvent::Stdout(d)) => stdout.extend_from_slice(&d),
                Some(ExecEvent::Stderr(d)) => stderr.extend_from_slice(&d),
                Some(ExecEvent::Exit(status)) => {
                    return Ok(ExecOutput {
                        stdout,
                        stderr,
                        status,
                    });
                }
                None => return Err(AgentError::Protocol("exec ended without a status".into())),
            }
        }
    }

    /// Waits for the exit status, discarding output.
    pub async fn wait(mut self) -> Result<ExitStatus, AgentError> {
        drop(self.stdin.take());
        loop {
            if let Some(ExecEvent::Exit(status)) = self.next_event().await? {
                return Ok(status);
            }
        }
    }
}

impl Drop for ExecSession {
    fn drop(&mut self) {
        if self.status.is_none() {
            self.inner.unregister(self.stream);
            self.inner.cancel(self.stream);
        }
    }
}

/// Signals an exec from anywhere; see [`ExecSession::signaller`].
#[derive(Debug, Clone)]
pub struct ExecSignaller {
    inner: Arc<Inner>,
    stream: u32,
}

impl ExecSignaller {
    /// Sends `signal` (a Linux signal number) to the exec's process group.
    pub fn signal(&self, signal: i32) -> Result<(), AgentError> {
        let frame = encode_json_frame(self.stream, FrameKind::Signal, &SignalRequest { signal })?;
        self.inner.send(frame)
    }

    /// Sets the size of the exec's terminal (an exec started with `tty`).
    pub fn resize(&self, size: TtySize) -> Result<(), AgentError> {
        let frame = encode_json_frame(self.stream, FrameKind::Resize, &size)?;
        self.inner.send(frame)
    }
}

/// The stdin of an exec started with [`ExecRequest::with_stdin`].
///
/// Dropping it closes the process's stdin.
#[derive(Debug)]
pub struct ExecStdin {
    inner: Arc<Inner>,
    stream: u32,
    credit: Arc<Credit>,
    closed: bool,
}

impl ExecStdin {
    /// Sends all of `data`, waiting for the agent's credit as needed.
    /// Fails with [`AgentError::StdinClosed`] once the process has exited.
    pub async fn write(&mut self, mut data: &[u8]) -> Result<(), AgentError> {
        while !data.is_empty() {
            let n = self.credit.take(data.len().min(MAX_DATA_CHUNK)).await?;
            self.inner
                .send(encode_frame(self.stream, FrameKind::Stdin, &data[..n])?)?;
            data = &data[n..];
        }
        Ok(())
    }

    /// Closes the process's stdin (it reads EOF after the data sent so far).
    pub async fn close(mut self) -> Result<(), AgentError> {
        self.closed = true;
        self.inner
            .send(encode_frame(self.stream, FrameKind::StdinClose, &[])?)
    }
}

impl Drop for ExecStdin {
    fn drop(&mut self) {
        if !self.closed
            && let Ok(frame) = encode_frame(self.stream, FrameKind::StdinClose, &[])
        {
            let _ = self.inner.send(frame);
        }
    }
}

async fn write_loop<S: AsyncWrite>(
    mut wr: WriteHalf<S>,
    mut rx: mpsc::UnboundedReceiver<Vec<u8>>,
    routes: Arc<Mutex<Routes>>,
    // Dropped on exit, which stops the reader.
    _stop_reader: oneshot::Sender<()>,
) {
    let mut batch = Vec::new();
    while let Some(first) = rx.recv().await {
        batch.clear();
        batch.extend_from_slice(&first);
        while batch.len() < WRITE_BATCH {
            match rx.try_recv() {
                Ok(more) => batch.extend_from_slice(&more),
                Err(_) => break,
            }
        }
        let result = async {
            wr.write_all(&batch).await?;
            wr.flush().await
        }
        .await;
        if let Err(e) = result {
            lock(&routes).close_all(&format!("write failed: {e}"));
            return;
        }
    }
    // Every handle to the client is gone.
    lock(&routes).close_all("client dropped");
    let _ = wr.shutdown().await;
}

async fn read_loop<S: AsyncRead>(
    mut rd: ReadHalf<S>,
    mut decoder: FrameDecoder,
    routes: Arc<Mutex<Routes>>,
    mut stop: oneshot::Receiver<()>,
) {
    let mut chunk = vec![0u8; 64 * 1024];
    let reason = 'conn: loop {
        loop {
            match decoder.next_frame() {
                Ok(Some(frame)) => {
                    if let Err(e) = dispatch(&routes, frame) {
                        break 'conn e.to_string();
                    }
                }
                Ok(None) => break,
                Err(e) => break 'conn format!("bad frame from the agent: {e}"),
            }
        }
        tokio::select! {
            read = rd.read(&mut chunk) => match read {
                Ok(0) => match decoder.finish() {
                    Ok(()) => break "agent closed the channel".to_owned(),
                    Err(e) => break format!("agent closed the channel mid-frame: {e}"),
                },
                Ok(n) => decoder.extend(&chunk[..n]),
                Err(e) => break format!("read failed: {e}"),
            },
            _ = &mut stop => break "writer stopped".to_owned(),
        }
    };
    lock(&routes).close_all(&reason);
}

/// Routes one frame from the agent. An error ends the connection.
fn dispatch(routes: &Mutex<Routes>, frame: crate::frame::Frame) -> Result<(), AgentError> {
    let mut routes = lock(routes);
    let stream = frame.stream;
    match frame.kind {
        FrameKind::Response => {
            let parsed = serde_json::from_slice::<Response>(&frame.payload)
                .map_err(|e| AgentError::Protocol(format!("bad response: {e}")));
            match routes.map.get_mut(&stream) {
                Some(Route::Call(_)) => {
                    if let Some(Route::Call(reply)) = routes.map.remove(&stream) {
                        let _ = reply.send(parsed);
                    }
                }
                Some(Route::Exec(exec)) => {
                    let reply = exec.started.take().ok_or_else(|| {
                        AgentError::Protocol(format!("second response on {stream}"))
                    })?;
                    let failed = !matches!(parsed, Ok(Response::Ok(_)));
                    let _ = reply.send(parsed);
                    if failed {
                        routes.map.remove(&stream);
                    }
                }
                None => {}
            }
        }
        FrameKind::Stdout | FrameKind::Stderr => {
            if let Some(Route::Exec(exec)) = routes.map.get(&stream) {
                let n = frame.payload.len() as u64;
                let unacked = exec.unacked.fetch_add(n, Ordering::AcqRel) + n;
                if unacked > u64::from(INITIAL_WINDOW) {
                    return Err(AgentError::Protocol(format!(
                        "stream {stream} overran its window ({unacked} bytes unacknowledged)"
                    )));
                }
                let event = if frame.kind == FrameKind::Stdout {
                    ExecEvent::Stdout(frame.payload)
                } else {
                    ExecEvent::Stderr(frame.payload)
                };
                let _ = exec.events.send(Ok(event));
            }
        }
        FrameKind::Exit => {
            if let Some(Route::Exec(exec)) = routes.map.remove(&stream) {
                let event = serde_json::from_slice::<ExitStatus>(&frame.payload)
                    .map(ExecEvent::Exit)
                    .map_err(|e| AgentError::Protocol(format!("bad exit status: {e}")));
                exec.stdin_credit.close(CreditClosed::Exited);
                let _ = exec.events.send(event);
            }
        }
        FrameKind::Window => {
            let n = frame.window_increment()?;
            if let Some(Route::Exec(exec)) = routes.map.get(&stream) {
                exec.stdin_credit.add(n);
            }
        }
        // A repeated acknowledgement carries nothing new.
        FrameKind::HelloAck => {}
        kind @ (FrameKind::Hello
        | FrameKind::Request
        | FrameKind::Stdin
        | FrameKind::StdinClose
        | FrameKind::Signal
        | FrameKind::Cancel
        | FrameKind::Resize) => {
            return Err(AgentError::Protocol(format!("agent sent a {kind:?} frame")));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{Frame, decode_frame};
    use crate::messages::AgentMode;
    use tokio::io::DuplexStream;

    fn ack(nonce: &str) -> Vec<u8> {
        encode_handshake(
            FrameKind::HelloAck,
            &HelloAck {
                protocol_version: PROTOCOL_VERSION,
                nonce: nonce.into(),
                agent_version: "test".into(),
                boot_id: "b".into(),
                mode: AgentMode::Service,
            },
        )
        .unwrap()
    }

    /// Reads until a whole hello frame arrived; returns its nonce.
    async fn read_hello(s: &mut DuplexStream) -> String {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 512];
        loop {
            if let HandshakeScan::Found { value, .. } =
                scan_handshake::<Hello>(&buf, FrameKind::Hello)
            {
                let value: Hello = value;
                return value.nonce;
            }
            let n = s.read(&mut chunk).await.unwrap();
            assert!(n > 0);
            buf.extend_from_slice(&chunk[..n]);
        }
    }

    async fn read_frame(s: &mut DuplexStream, dec: &mut FrameDecoder) -> Frame {
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(f) = dec.next_frame().unwrap() {
                if f.kind != FrameKind::Hello {
                    return f;
                }
                continue;
            }
            let n = s.read(&mut chunk).await.unwrap();
            assert!(n > 0, "client closed");
            dec.extend(&chunk[..n]);
        }
    }

    #[tokio::test]
    async fn handshake_skips_stale_bytes_and_foreign_acks() {
        let (client_end, mut agent) = tokio::io::duplex(1 << 16);
        let fake = tokio::spawn(async move {
            let nonce = read_hello(&mut agent).await;
            // Leftovers: half a frame, an ack for someone else, noise.
            agent
                .write_all(&[0, 0, 0, 50, 0, 0, 0, 1, 7, 1, 2])
                .await
                .unwrap();
            agent.write_all(&ack("someone-else")).await.unwrap();
            agent.write_all(b"noise").await.unwrap();
            agent.write_all(&ack(&nonce)).await.unwrap();
            // Answer one health call.
            let mut dec = FrameDecoder::new();
            let req = read_frame(&mut agent, &mut dec).await;
            assert_eq!(req.kind, FrameKind::Request);
            let health = serde_json::json!({"ok": {
                "agent_version": "t", "protocol_version": 1, "boot_id": "b",
                "uptime_secs": 1.5, "mode": "service", "kernel": "k", "hostname": "h",
                "a_field_from_the_future": true
            }});
            let resp = encode_frame(
                req.stream,
                FrameKind::Response,
                health.to_string().as_bytes(),
            );
            agent.write_all(&resp.unwrap()).await.unwrap();
            agent
        });
        let client = AgentClient::handshake(client_end, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(client.hello().agent_version, "test");
        let h = client.health().await.unwrap();
        assert_eq!(h.uptime_secs, 1.5);
        let _agent = fake.await.unwrap();
    }

    #[tokio::test]
    async fn handshake_retries_hello_and_times_out() {
        let (client_end, mut agent) = tokio::io::duplex(1 << 16);
        let err = AgentClient::handshake(client_end, Duration::from_millis(1000))
            .await
            .unwrap_err();
        assert!(matches!(err, AgentError::HandshakeTimeout(_)), "{err:?}");
        // Sent at 0, 100, 300 and 700 ms: at least three, one nonce.
        let mut buf = vec![0u8; 4096];
        let n = agent.read(&mut buf).await.unwrap();
        let mut rest = &buf[..n];
        let mut nonces = Vec::new();
        while let Some((f, used)) = decode_frame(rest).unwrap() {
            let h: Hello = crate::frame::parse_handshake_payload(&f.payload).unwrap();
            nonces.push(h.nonce);
            rest = &rest[used..];
        }
        assert!(nonces.len() >= 3, "{nonces:?}");
        assert!(nonces.iter().all(|n| n == &nonces[0]));
    }

    #[tokio::test]
    async fn version_mismatch_is_reported() {
        let (client_end, mut agent) = tokio::io::duplex(1 << 16);
        tokio::spawn(async move {
            let nonce = read_hello(&mut agent).await;
            let frame = encode_handshake(
                FrameKind::HelloAck,
                &HelloAck {
                    protocol_version: 99,
                    nonce,
                    agent_version: "x".into(),
                    boot_id: "b".into(),
                    mode: AgentMode::Init,
                },
            )
            .unwrap();
            agent.write_all(&frame).await.unwrap();
            agent
        });
        let err = AgentClient::handshake(client_end, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(
            matches!(err, AgentError::VersionMismatch { agent: 99, host: 1 }),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn window_overrun_and_disconnect_fail_the_calls() {
        let (client_end, mut agent) = tokio::io::duplex(1 << 20);
        let fake = tokio::spawn(async move {
            let nonce = read_hello(&mut agent).await;
            agent.write_all(&ack(&nonce)).await.unwrap();
            let mut dec = FrameDecoder::new();
            let req = read_frame(&mut agent, &mut dec).await;
            let ok = encode_frame(req.stream, FrameKind::Response, br#"{"ok":{"pid":42}}"#);
            agent.write_all(&ok.unwrap()).await.unwrap();
            // More than the window without waiting for credit.
            let chunk = vec![b'x'; MAX_DATA_CHUNK];
            for _ in 0..(INITIAL_WINDOW as usize / MAX_DATA_CHUNK + 1) {
                let f = encode_frame(req.stream, FrameKind::Stdout, &chunk).unwrap();
                agent.write_all(&f).await.unwrap();
            }
            agent
        });
        let client = AgentClient::handshake(client_end, Duration::from_secs(5))
            .await
            .unwrap();
        let mut session = client.exec(ExecRequest::new(["yes"])).await.unwrap();
        assert_eq!(session.pid(), 42);
        let _agent = fake.await.unwrap();
        // Let the reader see every frame before any credit goes back.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !client.is_closed() {
            assert!(Instant::now() < deadline, "overrun not detected");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut got = 0;
        let err = loop {
            match session.next_event().await {
                Ok(Some(ExecEvent::Stdout(d))) => got += d.len(),
                Ok(other) => panic!("{other:?}"),
                Err(e) => break e,
            }
        };
        assert!(got <= INITIAL_WINDOW as usize);
        assert!(
            matches!(err, AgentError::Disconnected(ref r) if r.contains("overran")),
            "{err:?}"
        );
        assert!(client.is_closed());
        assert!(matches!(
            client.health().await,
            Err(AgentError::Disconnected(_))
        ));
    }
}
