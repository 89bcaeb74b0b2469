//! One connection: handshake, request dispatch and the outgoing queue.
//!
//! A connection (a Unix or vsock connection, or the whole lifetime of an
//! open serial port) has one reader loop and one writer thread. Sessions
//! live inside it: each valid `Hello` with a new nonce starts one, and the
//! end of a session (EOF from the host, a new nonce, a protocol error)
//! kills its processes and drops its queued output.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use banger_agent_proto::frame::{
    Frame, FrameDecoder, FrameKind, HandshakeScan, encode_handshake, encode_json_frame,
    parse_handshake_payload, scan_handshake,
};
use banger_agent_proto::{
    AuthorizeKeysResult, Health, Hello, HelloAck, PROTOCOL_VERSION, RemoteError, RemoteErrorCode,
    Request, Response, ShutdownResult, SignalRequest, TtySize,
};
use serde::Serialize;

use crate::exec::Exec;
use crate::reaper::lock;
use crate::{AgentState, MainEvent, keys, sysinfo};

/// Bytes the writer hands to one `write_all`.
const WRITE_BATCH: usize = 256 * 1024;
/// Pause between reads while a serial port has no host connected.
const DISCONNECTED_POLL: Duration = Duration::from_millis(100);

/// The session a frame was queued for has ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Closed;

#[derive(Debug, Default)]
struct OutState {
    queue: VecDeque<Vec<u8>>,
    /// Current session; frames of older sessions are refused.
    generation: u64,
    closed: bool,
    enqueued: u64,
    written: u64,
}

/// Frames waiting for the writer thread. Unbounded by itself: data frames
/// are bounded by the host's credit and control frames by its requests.
#[derive(Debug, Default)]
pub struct Outbox {
    state: Mutex<OutState>,
    cv: Condvar,
}

impl Outbox {
    fn send(&self, generation: u64, frame: Vec<u8>) -> Result<(), Closed> {
        let mut st = lock(&self.state);
        if st.closed || st.generation != generation {
            return Err(Closed);
        }
        st.queue.push_back(frame);
        st.enqueued += 1;
        self.cv.notify_all();
        Ok(())
    }

    /// Starts a new session: drops everything queued for the previous one.
    fn next_generation(&self) -> u64 {
        let mut st = lock(&self.state);
        st.generation += 1;
        let dropped = st.queue.len() as u64;
        st.queue.clear();
        st.written += dropped;
        self.cv.notify_all();
        st.generation
    }

    fn close(&self) {
        lock(&self.state).closed = true;
        self.cv.notify_all();
    }

    /// Waits until everything queued so far was written.
    fn flush(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = lock(&self.state);
        let target = st.enqueued;
        while st.written < target && !st.closed {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            st = self
                .cv
                .wait_timeout(st, left)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
        st.written >= target
    }

    fn run_writer(&self, mut out: impl Write) {
        let mut batch = Vec::new();
        loop {
            let count;
            {
                let mut st = lock(&self.state);
                while st.queue.is_empty() && !st.closed {
                    st = self
                        .cv
                        .wait(st)
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                }
                if st.queue.is_empty() {
                    return;
                }
                batch.clear();
                let mut n = 0;
                while let Some(frame) = st.queue.pop_front() {
                    batch.extend_from_slice(&frame);
                    n += 1;
                    if batch.len() >= WRITE_BATCH {
                        break;
                    }
                }
                count = n;
            }
            // Blocks while a serial port's host is away; the bytes then go
            // to the next host, which skips them (they precede its ack).
            let result = out.write_all(&batch).and_then(|()| out.flush());
            let mut st = lock(&self.state);
            st.written += count;
            self.cv.notify_all();
            if let Err(e) = result {
                log!("write to host failed: {e}");
                st.closed = true;
                return;
            }
        }
    }
}

/// One handshaken session.
#[derive(Debug)]
pub struct Session {
    pub ctx: Arc<AgentState>,
    outbox: Arc<Outbox>,
    generation: u64,
    nonce: String,
    execs: Mutex<HashMap<u32, Arc<Exec>>>,
}

impl Session {
    pub fn send(&self, frame: Vec<u8>) -> Result<(), Closed> {
        self.outbox.send(self.generation, frame)
    }

    pub fn send_json<T: Serialize>(&self, stream: u32, kind: FrameKind, value: &T) {
        match encode_json_frame(stream, kind, value) {
            Ok(frame) => {
                let _ = self.send(frame);
            }
            Err(e) => log!("cannot encode a {kind:?} frame: {e}"),
        }
    }

    pub fn respond<T: Serialize>(&self, stream: u32, result: Result<T, RemoteError>) {
        let response = match result.map(|v| serde_json::to_value(v)) {
            Ok(Ok(value)) => Response::Ok(value),
            Ok(Err(e)) => {
                Response::Error(RemoteError::new(RemoteErrorCode::Internal, e.to_string()))
            }
            Err(e) => Response::Error(e),
        };
        self.send_json(stream, FrameKind::Response, &response);
    }

    pub fn add_exec(&self, stream: u32, exec: Arc<Exec>) {
        lock(&self.execs).insert(stream, exec);
    }

    pub fn remove_exec(&self, stream: u32) {
        lock(&self.execs).remove(&stream);
    }

    fn exec(&self, stream: u32) -> Option<Arc<Exec>> {
        lock(&self.execs).get(&stream).cloned()
    }

    /// Kills the session's processes and stops their output.
    fn end(&self) {
        let execs: Vec<_> = lock(&self.execs).drain().map(|(_, e)| e).collect();
        for exec in execs {
            exec.cancel();
        }
    }
}

struct Conn {
    ctx: Arc<AgentState>,
    outbox: Arc<Outbox>,
    session: Option<Arc<Session>>,
    /// Bytes before the handshake.
    pre: Vec<u8>,
    decoder: FrameDecoder,
}

/// Ends the session and releases the writer thread (and with it the
/// descriptor it holds) however `serve` exits, unwinding included.
impl Drop for Conn {
    fn drop(&mut self) {
        self.end_session();
        self.outbox.close();
    }
}

impl Conn {
    fn end_session(&mut self) {
        if let Some(s) = self.session.take() {
            s.end();
            self.outbox.next_generation();
        }
        self.pre.clear();
        self.decoder = FrameDecoder::new();
    }

    fn start_session(&mut self, hello: Hello) {
        self.end_session();
        let generation = self.outbox.next_generation();
        let session = Arc::new(Session {
            ctx: self.ctx.clone(),
            outbox: self.outbox.clone(),
            generation,
            nonce: hello.nonce.clone(),
            execs: Mutex::new(HashMap::new()),
        });
        let ack = HelloAck {
            protocol_version: PROTOCOL_VERSION,
            nonce: hello.nonce,
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            boot_id: self.ctx.boot_id.clone(),
            mode: self.ctx.mode,
        };
        match encode_handshake(FrameKind::HelloAck, &ack) {
            Ok(frame) => {
                let _ = session.send(frame);
            }
            Err(e) => log!("cannot encode the ack: {e}"),
        }
        if hello.protocol_version != PROTOCOL_VERSION {
            // The host reads our version from the ack and gives up.
            log!(
                "host speaks protocol {}, agent {}",
                hello.protocol_version,
                PROTOCOL_VERSION
            );
        }
        self.session = Some(session);
    }

    fn feed(&mut self, data: &[u8]) -> Result<(), String> {
        if self.session.is_none() {
            self.pre.extend_from_slice(data);
            match scan_handshake::<Hello>(&self.pre, FrameKind::Hello) {
                HandshakeScan::Found { value, end, .. } => {
                    let rest = self.pre.split_off(end);
                    self.start_session(value);
                    self.decoder.extend(&rest);
                }
                HandshakeScan::NeedMore { discard } => {
                    self.pre.drain(..discard);
                    return Ok(());
                }
            }
        } else {
            self.decoder.extend(data);
        }
        loop {
            match self.decoder.next_frame() {
                Ok(Some(frame)) => self.handle(frame)?,
                Ok(None) => return Ok(()),
                Err(e) => return Err(e.to_string()),
            }
        }
    }

    fn handle(&mut self, frame: Frame) -> Result<(), String> {
        let Some(session) = self.session.clone() else {
            return Ok(());
        };
        let stream = frame.stream;
        match frame.kind {
            FrameKind::Hello => {
                // Hellos the host repeated before it saw our ack carry our
                // nonce; a different nonce is a new host.
                if let Some(hello) = parse_handshake_payload::<Hello>(&frame.payload)
                    && hello.nonce != session.nonce
                {
                    log!("new hello mid-session: starting over");
                    let rest = self.decoder.pending().to_vec();
                    self.start_session(hello);
                    self.decoder.extend(&rest);
                }
            }
            FrameKind::Request => handle_request(&session, stream, &frame.payload),
            FrameKind::Stdin => {
                if let Some(exec) = session.exec(stream) {
                    exec.push_stdin(frame.payload)
                        .map_err(|e| format!("stream {stream}: {e}"))?;
                }
            }
            FrameKind::StdinClose => {
                if let Some(exec) = session.exec(stream) {
                    exec.close_stdin();
                }
            }
            FrameKind::Window => {
                let n = frame.window_increment().map_err(|e| e.to_string())?;
                if let Some(exec) = session.exec(stream) {
                    exec.add_credit(n);
                }
            }
            FrameKind::Signal => match serde_json::from_slice::<SignalRequest>(&frame.payload) {
                Ok(req) => {
                    if let Some(exec) = session.exec(stream) {
                        exec.signal(req.signal);
                    }
                }
                Err(e) => log!("bad signal request on stream {stream}: {e}"),
            },
            FrameKind::Cancel => {
                if let Some(exec) = session.exec(stream) {
                    session.remove_exec(stream);
                    exec.cancel();
                }
            }
            FrameKind::Resize => match serde_json::from_slice::<TtySize>(&frame.payload) {
                Ok(size) => {
                    if let Some(exec) = session.exec(stream) {
                        exec.resize(size);
                    }
                }
                Err(e) => log!("bad resize request on stream {stream}: {e}"),
            },
            kind @ (FrameKind::HelloAck
            | FrameKind::Response
            | FrameKind::Stdout
            | FrameKind::Stderr
            | FrameKind::Exit) => {
                return Err(format!("host sent a {kind:?} frame"));
            }
        }
        Ok(())
    }
}

/// Serves one connection until it ends.
///
/// With `eof_is_disconnect` (virtio-serial) a read of 0 bytes means the
/// host went away, not that the descriptor is done: the session ends and
/// reading resumes after a short pause. Otherwise EOF ends the connection.
pub fn serve(
    ctx: Arc<AgentState>,
    mut reader: impl Read,
    writer: impl Write + Send + 'static,
    eof_is_disconnect: bool,
) -> io::Result<()> {
    let outbox = Arc::new(Outbox::default());
    {
        let outbox = outbox.clone();
        std::thread::Builder::new()
            .name("writer".into())
            .stack_size(256 * 1024)
            .spawn(move || outbox.run_writer(writer))?;
    }
    let mut conn = Conn {
        ctx,
        outbox,
        session: None,
        pre: Vec::new(),
        decoder: FrameDecoder::new(),
    };
    let mut chunk = vec![0u8; 64 * 1024];
    // Dropping `conn` (at the end or while unwinding) ends the session and
    // the writer.
    loop {
        let n = match reader.read(&mut chunk) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if n == 0 {
            if conn.session.is_some() {
                log!("host disconnected");
            }
            conn.end_session();
            if eof_is_disconnect {
                std::thread::sleep(DISCONNECTED_POLL);
                continue;
            }
            return Ok(());
        }
        if let Err(e) = conn.feed(&chunk[..n]) {
            log!("protocol error: {e}");
            conn.end_session();
            if !eof_is_disconnect {
                return Ok(());
            }
            // On a serial port, wait for the host's next hello.
        }
    }
}

fn parse_request(payload: &[u8]) -> Result<Request, RemoteError> {
    let value: serde_json::Value = serde_json::from_slice(payload)
        .map_err(|e| RemoteError::new(RemoteErrorCode::BadRequest, format!("bad JSON: {e}")))?;
    let method = value
        .get("method")
        .and_then(|m| m.as_str())
        .unwrap_or_default()
        .to_owned();
    serde_json::from_value(value).map_err(|e| {
        const KNOWN: [&str; 7] = [
            "health",
            "exec",
            "ports",
            "stats",
            "authorize_keys",
            "shutdown",
            "identity",
        ];
        if KNOWN.contains(&method.as_str()) {
            RemoteError::new(RemoteErrorCode::BadRequest, format!("{method}: {e}"))
        } else {
            RemoteError::new(
                RemoteErrorCode::UnknownMethod,
                format!("unknown method {method:?}"),
            )
        }
    })
}

fn handle_request(session: &Arc<Session>, stream: u32, payload: &[u8]) {
    let request = match parse_request(payload) {
        Ok(r) => r,
        Err(e) => return session.respond::<()>(stream, Err(e)),
    };
    match request {
        // Inline, so that stdin frames that follow find the process.
        Request::Exec(req) => crate::exec::start(session, stream, req),
        Request::Shutdown => {
            session.respond(stream, Ok(ShutdownResult {}));
            if !session.outbox.flush(Duration::from_secs(2)) {
                log!("shutdown reply not flushed");
            }
            let _ = session
                .ctx
                .events
                .send(MainEvent::Shutdown("requested by the host".into()));
        }
        Request::Health => off_reader(session, stream, |s| Ok(health(&s.ctx))),
        Request::Ports => off_reader(session, stream, |_| sysinfo::ports().map_err(io_error)),
        Request::Stats => off_reader(session, stream, |_| sysinfo::stats().map_err(io_error)),
        Request::AuthorizeKeys(req) => off_reader(session, stream, move |s| {
            let path = &s.ctx.authorized_keys;
            keys::authorize(path, &req.keys).map(|keys| AuthorizeKeysResult {
                path: path.display().to_string(),
                keys,
            })
        }),
        Request::Identity(req) => off_reader(session, stream, move |s| {
            crate::identity::apply(std::path::Path::new("/"), &s.ctx.reaper, &req)
        }),
    }
}

/// Answers a request from its own thread: reading /proc or writing files
/// can take a while on a busy guest, and the reader must keep going.
fn off_reader<T, F>(session: &Arc<Session>, stream: u32, f: F)
where
    T: Serialize,
    F: FnOnce(&Session) -> Result<T, RemoteError> + Send + 'static,
{
    let session = session.clone();
    crate::channel::spawn_named("request", move || {
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&session)))
            .unwrap_or_else(|_| {
                Err(RemoteError::new(
                    RemoteErrorCode::Internal,
                    "the agent panicked handling this request",
                ))
            });
        session.respond(stream, result);
    });
}

fn io_error(e: io::Error) -> RemoteError {
    RemoteError::new(RemoteErrorCode::Io, e.to_string())
}

fn health(ctx: &AgentState) -> Health {
    let uname = rustix::system::uname();
    Health {
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        protocol_version: PROTOCOL_VERSION,
        boot_id: ctx.boot_id.clone(),
        uptime_secs: sysinfo::uptime().unwrap_or(0.0),
        mode: ctx.mode,
        kernel: uname.release().to_string_lossy().into_owned(),
        hostname: uname.nodename().to_string_lossy().into_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reaper::Reaper;
    use banger_agent_proto::frame::{decode_frame, encode_frame};
    use banger_agent_proto::{AgentMode, PortsResult};
    use std::sync::mpsc;

    /// A fake serial port: reads come from a channel; an empty message
    /// reads as EOF (host disconnected); writes go to another channel.
    struct FakePort(mpsc::Receiver<Vec<u8>>, Vec<u8>);

    impl Read for FakePort {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.1.is_empty() {
                match self.0.recv() {
                    Ok(data) if data.is_empty() => return Ok(0),
                    Ok(data) => self.1 = data,
                    Err(_) => return Err(io::Error::other("test over")),
                }
            }
            let n = buf.len().min(self.1.len());
            buf[..n].copy_from_slice(&self.1[..n]);
            self.1.drain(..n);
            Ok(n)
        }
    }

    struct FakeOut(mpsc::Sender<Vec<u8>>);

    impl Write for FakeOut {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let _ = self.0.send(buf.to_vec());
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn ctx() -> Arc<AgentState> {
        Arc::new(AgentState {
            reaper: Reaper::new(),
            mode: AgentMode::Service,
            shutdown: crate::ShutdownAction::Exit,
            authorized_keys: "/nonexistent/authorized_keys".into(),
            boot_id: "test-boot".into(),
            base_env: Vec::new(),
            events: mpsc::channel().0,
        })
    }

    fn hello(nonce: &str) -> Vec<u8> {
        encode_handshake(
            FrameKind::Hello,
            &Hello {
                protocol_version: PROTOCOL_VERSION,
                nonce: nonce.into(),
            },
        )
        .unwrap()
    }

    fn request(stream: u32, req: &Request) -> Vec<u8> {
        encode_json_frame(stream, FrameKind::Request, req).unwrap()
    }

    /// Collects frames the agent wrote until `n` arrived.
    fn frames(rx: &mpsc::Receiver<Vec<u8>>, buf: &mut Vec<u8>, n: usize) -> Vec<Frame> {
        let mut out = Vec::new();
        while out.len() < n {
            while let Some((f, used)) = decode_frame(buf).unwrap() {
                buf.drain(..used);
                out.push(f);
            }
            if out.len() >= n {
                break;
            }
            buf.extend(
                rx.recv_timeout(Duration::from_secs(10))
                    .expect("agent silent"),
            );
        }
        out
    }

    #[test]
    fn serial_semantics_survive_disconnect_and_garbage() {
        let (to_agent, agent_in) = mpsc::channel();
        let (agent_out, from_agent) = mpsc::channel();
        let ctx = ctx();
        std::thread::spawn(move || {
            serve(
                ctx,
                FakePort(agent_in, Vec::new()),
                FakeOut(agent_out),
                true,
            )
        });

        // Host 1: garbage, hello, a health call.
        let mut first = b"\x00\x00\x00\x07junk".to_vec();
        first.extend(hello("one"));
        first.extend(request(5, &Request::Health));
        to_agent.send(first).unwrap();
        let mut buf = Vec::new();
        let got = frames(&from_agent, &mut buf, 2);
        let ack: HelloAck = parse_handshake_payload(&got[0].payload).unwrap();
        assert_eq!(
            (ack.nonce.as_str(), ack.boot_id.as_str()),
            ("one", "test-boot")
        );
        assert_eq!((got[1].stream, got[1].kind), (5, FrameKind::Response));
        let resp: Response = serde_json::from_slice(&got[1].payload).unwrap();
        let Response::Ok(v) = resp else {
            panic!("{resp:?}")
        };
        let h: Health = serde_json::from_value(v).unwrap();
        assert_eq!(h.boot_id, "test-boot");

        // A repeated hello with the same nonce changes nothing.
        to_agent.send(hello("one")).unwrap();
        to_agent.send(request(6, &Request::Ports)).unwrap();
        let got = frames(&from_agent, &mut buf, 1);
        assert_eq!((got[0].stream, got[0].kind), (6, FrameKind::Response));
        let Response::Ok(v) = serde_json::from_slice(&got[0].payload).unwrap() else {
            panic!()
        };
        let _: PortsResult = serde_json::from_value(v).unwrap();

        // The host disconnects (EOF, EOF), leaving half a frame behind;
        // host 2 connects: the agent keeps the same port open.
        to_agent
            .send(request(7, &Request::Health)[..5].to_vec())
            .unwrap();
        to_agent.send(Vec::new()).unwrap();
        to_agent.send(Vec::new()).unwrap();
        let mut second = hello("two");
        second.extend(request(1, &Request::Health));
        to_agent.send(second).unwrap();
        let got = frames(&from_agent, &mut buf, 2);
        let ack: HelloAck = parse_handshake_payload(&got[0].payload).unwrap();
        assert_eq!(ack.nonce, "two");
        assert_eq!((got[1].stream, got[1].kind), (1, FrameKind::Response));

        // An unknown method and bad params are errors, not disconnects.
        let bogus = encode_frame(2, FrameKind::Request, br#"{"method":"fly"}"#).unwrap();
        let bad = encode_frame(3, FrameKind::Request, br#"{"method":"exec","params":{}}"#).unwrap();
        to_agent.send([bogus, bad].concat()).unwrap();
        let got = frames(&from_agent, &mut buf, 2);
        let codes: Vec<_> = got
            .iter()
            .map(|f| match serde_json::from_slice(&f.payload).unwrap() {
                Response::Error(e) => (f.stream, e.code),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            codes,
            vec![
                (2, RemoteErrorCode::UnknownMethod),
                (3, RemoteErrorCode::BadRequest)
            ]
        );

        // A framing error ends the session; the next hello starts another.
        let mut oversized = u32::MAX.to_be_bytes().to_vec();
        oversized.extend([0, 0, 0, 1, 3]);
        to_agent.send(oversized).unwrap();
        to_agent.send(hello("three")).unwrap();
        let got = frames(&from_agent, &mut buf, 1);
        let ack: HelloAck = parse_handshake_payload(&got[0].payload).unwrap();
        assert_eq!(ack.nonce, "three");
    }

    #[test]
    fn outbox_refuses_frames_of_ended_sessions() {
        let outbox = Outbox::default();
        let g1 = outbox.next_generation();
        outbox.send(g1, vec![1]).unwrap();
        let g2 = outbox.next_generation();
        assert_eq!(outbox.send(g1, vec![2]), Err(Closed));
        outbox.send(g2, vec![3]).unwrap();
        assert_eq!(lock(&outbox.state).queue, VecDeque::from([vec![3u8]]));
        outbox.close();
        assert_eq!(outbox.send(g2, vec![4]), Err(Closed));
    }
}
