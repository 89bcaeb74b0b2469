//! The real agent binary as a host process on a Unix socket, driven by the
//! real `AgentClient`.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use banger_agent_proto::frame::{
    FrameDecoder, FrameKind, encode_handshake, encode_json_frame, parse_handshake_payload,
};
use banger_agent_proto::{
    AgentClient, AgentError, AgentMode, ExecEvent, ExecRequest, ExecStarted, ExitStatus, Hello,
    HelloAck, PROTOCOL_VERSION, RemoteErrorCode, Request, Response, SocketProtocol,
};
use tokio::net::UnixStream;

const TIMEOUT: Duration = Duration::from_secs(20);

struct Agent {
    child: Child,
    dir: tempfile::TempDir,
    sock: PathBuf,
}

impl Agent {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("agent.sock");
        let child = Command::new(env!("CARGO_BIN_EXE_banger-agent"))
            .arg("--listen")
            .arg(format!("unix:{}", sock.display()))
            .arg("--authorized-keys")
            .arg(dir.path().join("ssh/authorized_keys"))
            .args(["--shutdown-action", "exit"])
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + TIMEOUT;
        while !sock.exists() {
            assert!(Instant::now() < deadline, "agent did not create its socket");
            std::thread::sleep(Duration::from_millis(10));
        }
        Self { child, dir, sock }
    }

    async fn connect(&self) -> AgentClient {
        let stream = UnixStream::connect(&self.sock).await.unwrap();
        AgentClient::handshake(stream, TIMEOUT).await.unwrap()
    }

    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn run(client: &AgentClient, req: ExecRequest) -> banger_agent_proto::ExecOutput {
    let session = client.exec(req).await.unwrap();
    tokio::time::timeout(TIMEOUT, session.wait_with_output())
        .await
        .expect("exec timed out")
        .unwrap()
}

fn sh(script: &str) -> ExecRequest {
    ExecRequest::new(["sh", "-c", script])
}

async fn wait_gone(pid: u32) {
    let deadline = Instant::now() + TIMEOUT;
    // Gone or a zombie nobody reaped yet is fine: the process is dead.
    while std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit_once(')')
            .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
    }) {
        assert!(Instant::now() < deadline, "process {pid} still alive");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `pid` sleeps in the kernel's pipe write (its reader stopped).
async fn wait_blocked_on_pipe(pid: u32) {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let wchan = std::fs::read_to_string(format!("/proc/{pid}/wchan")).unwrap_or_default();
        if wchan.contains("pipe_write") {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "process {pid} never blocked writing its pipe (last in {wchan:?})"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_handshake_info() {
    let agent = Agent::start();
    let client = agent.connect().await;
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    assert_eq!(client.hello().boot_id, boot_id.trim());
    assert_eq!(client.hello().mode, AgentMode::Service);
    let h = client.health().await.unwrap();
    assert_eq!(h.agent_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(h.protocol_version, PROTOCOL_VERSION);
    assert_eq!(h.boot_id, boot_id.trim());
    assert!(h.uptime_secs > 0.0);
    assert_eq!(h.mode, AgentMode::Service);
    assert!(!h.kernel.is_empty() && !h.hostname.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_output_codes_and_streams() {
    let agent = Agent::start();
    let client = agent.connect().await;

    let out = run(&client, ExecRequest::new(["cat", "/etc/os-release"])).await;
    assert_eq!(out.status, ExitStatus::Code(0));
    assert_eq!(out.stdout, std::fs::read("/etc/os-release").unwrap());
    assert!(out.stderr.is_empty());

    let out = run(&client, sh("exit 7")).await;
    assert_eq!(out.status, ExitStatus::Code(7));

    let out = run(&client, sh("echo out; echo err >&2; echo out2")).await;
    assert_eq!(out.stdout, b"out\nout2\n");
    assert_eq!(out.stderr, b"err\n");

    let out = run(
        &client,
        sh("echo \"$FOO\"; pwd").env("FOO", "bar baz").cwd("/tmp"),
    )
    .await;
    assert_eq!(out.stdout, b"bar baz\n/tmp\n");

    // Children get default signal dispositions (the agent ignores SIGPIPE).
    let out = run(&client, sh("kill -PIPE $$; echo survived")).await;
    assert_eq!(out.status, ExitStatus::Signal(13));

    // Without stdin the process reads EOF at once.
    let out = run(&client, ExecRequest::new(["cat"])).await;
    assert_eq!((out.status, out.stdout.len()), (ExitStatus::Code(0), 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_errors() {
    let agent = Agent::start();
    let client = agent.connect().await;
    let err = client
        .exec(ExecRequest::new(["no-such-command-banger"]))
        .await
        .unwrap_err();
    assert_eq!(
        err.remote().map(|e| e.code),
        Some(RemoteErrorCode::NotFound),
        "{err:?}"
    );
    let err = client
        .exec(sh("true").cwd("/nonexistent-dir"))
        .await
        .unwrap_err();
    assert_eq!(
        err.remote().map(|e| e.code),
        Some(RemoteErrorCode::BadRequest)
    );
    let err = client.exec(ExecRequest::default()).await.unwrap_err();
    assert_eq!(
        err.remote().map(|e| e.code),
        Some(RemoteErrorCode::BadRequest)
    );
    // A file that is not executable.
    let script = agent.dir.path().join("script");
    std::fs::write(&script, "echo hi\n").unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = client
        .exec(ExecRequest::new([script.to_str().unwrap()]))
        .await
        .unwrap_err();
    assert_eq!(
        err.remote().map(|e| e.code),
        Some(RemoteErrorCode::NotExecutable),
        "{err:?}"
    );
    // A script whose interpreter does not exist.
    std::fs::write(&script, "#!/no/such/interpreter\necho hi\n").unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let err = client
        .exec(ExecRequest::new([script.to_str().unwrap()]))
        .await
        .unwrap_err();
    let remote = err.remote().expect("refused");
    assert_eq!(remote.code, RemoteErrorCode::NotExecutable, "{err:?}");
    assert!(remote.message.contains("interpreter"), "{err:?}");
    // A path to nothing.
    let err = client
        .exec(ExecRequest::new(["./no-such-file-banger"]))
        .await
        .unwrap_err();
    assert_eq!(
        err.remote().map(|e| e.code),
        Some(RemoteErrorCode::NotFound),
        "{err:?}"
    );
    // The connection is still good.
    assert_eq!(run(&client, sh("exit 3")).await.status, ExitStatus::Code(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdin_is_streamed() {
    let agent = Agent::start();
    let client = agent.connect().await;
    let mut session = client
        .exec(ExecRequest::new(["cat"]).with_stdin())
        .await
        .unwrap();
    let mut stdin = session.take_stdin().unwrap();
    // Each line comes back before the next is sent: nothing waits for EOF.
    for line in ["ping\n", "pong\n"] {
        stdin.write(line.as_bytes()).await.unwrap();
        let ev = tokio::time::timeout(TIMEOUT, session.next_event())
            .await
            .unwrap();
        assert_eq!(
            ev.unwrap(),
            Some(ExecEvent::Stdout(line.as_bytes().to_vec()))
        );
    }
    stdin.close().await.unwrap();
    let ev = tokio::time::timeout(TIMEOUT, session.next_event())
        .await
        .unwrap();
    assert_eq!(ev.unwrap(), Some(ExecEvent::Exit(ExitStatus::Code(0))));
    assert_eq!(session.next_event().await.unwrap(), None);
}

fn pseudo_random(len: usize, mut seed: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 24) as u8
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_megabytes_out_byte_exact() {
    let agent = Agent::start();
    let client = agent.connect().await;
    let data = pseudo_random(10 * 1024 * 1024 + 12345, 0x9E37_79B9_7F4A_7C15);
    let file = agent.dir.path().join("big");
    std::fs::write(&file, &data).unwrap();
    let started = Instant::now();
    let out = run(&client, ExecRequest::new(["cat", file.to_str().unwrap()])).await;
    let elapsed = started.elapsed();
    assert_eq!(out.status, ExitStatus::Code(0));
    assert_eq!(out.stdout.len(), data.len());
    assert!(out.stdout == data, "10 MB output differs");
    eprintln!(
        "10 MiB out in {elapsed:?} ({:.0} MiB/s)",
        data.len() as f64 / 1048576.0 / elapsed.as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_megabytes_through_stdin_and_back() {
    let agent = Agent::start();
    let client = agent.connect().await;
    let data = pseudo_random(10 * 1024 * 1024, 42);
    let mut session = client
        .exec(ExecRequest::new(["cat"]).with_stdin())
        .await
        .unwrap();
    let mut stdin = session.take_stdin().unwrap();
    let to_send = data.clone();
    // Writing and reading at once: both directions' credit must flow.
    let writer = tokio::spawn(async move {
        for chunk in to_send.chunks(100_000) {
            stdin.write(chunk).await.unwrap();
        }
        stdin.close().await.unwrap();
    });
    let out = tokio::time::timeout(TIMEOUT, session.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    writer.await.unwrap();
    assert_eq!(out.status, ExitStatus::Code(0));
    assert!(
        out.stdout == data,
        "echoed data differs ({} bytes)",
        out.stdout.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unread_output_does_not_grow_the_agent() {
    let agent = Agent::start();
    let client = agent.connect().await;
    let before = agent.rss_kib();
    // `yes` writes as fast as it can; nobody reads the session.
    let mut session = client
        .exec(ExecRequest::new(["yes", "banger"]))
        .await
        .unwrap();
    // Quiet, not a while: `yes` ends up blocked on its full pipe once the
    // agent stops reading it for want of credit. An agent that buffered
    // without bound would keep reading and never get here.
    wait_blocked_on_pipe(session.pid()).await;
    let after = agent.rss_kib();
    assert!(
        after < before + 16 * 1024,
        "agent RSS grew from {before} KiB to {after} KiB"
    );
    // Still alive and producing once read.
    match session.next_event().await.unwrap() {
        Some(ExecEvent::Stdout(d)) => assert!(d.starts_with(b"banger\n")),
        other => panic!("{other:?}"),
    }
    let pid = session.pid();
    drop(session);
    wait_gone(pid).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_and_cancellation() {
    let agent = Agent::start();
    let client = agent.connect().await;
    let session = client
        .exec(ExecRequest::new(["sleep", "100"]))
        .await
        .unwrap();
    let started = Instant::now();
    session.signal(15).unwrap();
    let status = tokio::time::timeout(TIMEOUT, session.wait()).await;
    assert_eq!(status.unwrap().unwrap(), ExitStatus::Signal(15));
    assert!(started.elapsed() < Duration::from_secs(10));

    // The signal reaches the whole process group.
    let session = client
        .exec(sh("sleep 100; echo not reached"))
        .await
        .unwrap();
    let signaller = session.signaller();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        signaller.signal(9).unwrap();
    });
    let out = tokio::time::timeout(TIMEOUT, session.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(out.status, ExitStatus::Signal(9));
    assert!(out.stdout.is_empty());

    // Dropping a session kills its process.
    let session = client
        .exec(ExecRequest::new(["sleep", "100"]))
        .await
        .unwrap();
    let pid = session.pid();
    drop(session);
    wait_gone(pid).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_child_holding_stdout_does_not_block_exit() {
    let agent = Agent::start();
    let client = agent.connect().await;
    let started = Instant::now();
    let out = run(&client, sh("sleep 30 & echo started")).await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(out.stdout, b"started\n");
    assert_eq!(out.status, ExitStatus::Code(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_execs_on_one_connection() {
    let agent = Agent::start();
    let client = agent.connect().await;
    let mut tasks = Vec::new();
    for i in 0..8 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let script = format!(
                "for n in 1 2 3; do echo {i}-$n; sleep 0.05; done; echo e{i} >&2; exit {i}"
            );
            run(&client, sh(&script)).await
        }));
    }
    let health = client.health();
    let (h, outs) = tokio::join!(health, async {
        let mut outs = Vec::new();
        for t in tasks {
            outs.push(t.await.unwrap());
        }
        outs
    });
    h.unwrap();
    for (i, out) in outs.into_iter().enumerate() {
        assert_eq!(out.status, ExitStatus::Code(i as i32));
        assert_eq!(out.stdout, format!("{i}-1\n{i}-2\n{i}-3\n").into_bytes());
        assert_eq!(out.stderr, format!("e{i}\n").into_bytes());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_before_the_handshake_is_discarded() {
    use tokio::io::AsyncWriteExt;
    let agent = Agent::start();
    let mut stream = UnixStream::connect(&agent.sock).await.unwrap();
    // Half a frame, a fake magic, and a hello from an "earlier" host.
    stream
        .write_all(&[0, 0, 0, 40, 0, 0, 0, 3, 3, b'{'])
        .await
        .unwrap();
    stream.write_all(b"BANGERAG garbage").await.unwrap();
    let stale = encode_handshake(
        FrameKind::Hello,
        &Hello {
            protocol_version: PROTOCOL_VERSION,
            nonce: "stale".into(),
        },
    )
    .unwrap();
    stream.write_all(&stale).await.unwrap();
    let client = AgentClient::handshake(stream, TIMEOUT).await.unwrap();
    assert_ne!(client.hello().nonce, "stale");
    assert_eq!(run(&client, sh("echo ok")).await.stdout, b"ok\n");
}

/// Speaks the protocol by hand over a blocking socket.
fn raw_exec_then_vanish(sock: &Path) -> u32 {
    let mut s = std::os::unix::net::UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    let hello = Hello {
        protocol_version: PROTOCOL_VERSION,
        nonce: "raw".into(),
    };
    s.write_all(&encode_handshake(FrameKind::Hello, &hello).unwrap())
        .unwrap();
    let req = Request::Exec(ExecRequest::new(["sleep", "100"]));
    s.write_all(&encode_json_frame(9, FrameKind::Request, &req).unwrap())
        .unwrap();
    let mut dec = FrameDecoder::new();
    let mut frames = Vec::new();
    let mut buf = [0u8; 4096];
    while frames.len() < 2 {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "agent closed");
        dec.extend(&buf[..n]);
        while let Some(f) = dec.next_frame().unwrap() {
            frames.push(f);
        }
    }
    let ack: HelloAck = parse_handshake_payload(&frames[0].payload).unwrap();
    assert_eq!(ack.nonce, "raw");
    assert_eq!((frames[1].stream, frames[1].kind), (9, FrameKind::Response));
    let Response::Ok(v) = serde_json::from_slice(&frames[1].payload).unwrap() else {
        panic!("exec failed");
    };
    let started: ExecStarted = serde_json::from_value(v).unwrap();
    started.pid
    // `s` drops here without a cancel: the host just vanishes.
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_after_disconnect() {
    let agent = Agent::start();
    let pid = raw_exec_then_vanish(&agent.sock);
    // The vanished host's process is killed with its session.
    wait_gone(pid).await;
    for _ in 0..3 {
        let client = agent.connect().await;
        client.health().await.unwrap();
        assert_eq!(run(&client, sh("echo again")).await.stdout, b"again\n");
        drop(client);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ports_sees_our_listeners() {
    let agent = Agent::start();
    let client = agent.connect().await;
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let (tcp_port, udp_port) = (
        tcp.local_addr().unwrap().port(),
        udp.local_addr().unwrap().port(),
    );
    let ports = client.ports().await.unwrap();
    let find = |proto, port| {
        ports
            .sockets
            .iter()
            .find(|s| s.protocol == proto && s.port == port)
            .unwrap_or_else(|| panic!("{proto:?} {port} missing"))
    };
    for (proto, port) in [
        (SocketProtocol::Tcp, tcp_port),
        (SocketProtocol::Udp, udp_port),
    ] {
        let s = find(proto, port);
        assert_eq!(s.address, "127.0.0.1".parse::<std::net::IpAddr>().unwrap());
        let owner = s.process.as_ref().expect("owner found");
        assert_eq!(owner.pid, std::process::id());
        assert!(!owner.name.is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_are_sane() {
    let agent = Agent::start();
    let client = agent.connect().await;
    let s = client.stats().await.unwrap();
    assert!(s.uptime_secs > 0.0);
    assert!(s.cpu.cpus >= 1 && s.cpu.ticks_per_sec > 0 && s.cpu.total() > 0);
    assert!(s.memory.total_bytes > 64 << 20);
    assert!(s.memory.available_bytes <= s.memory.total_bytes);
    assert!(s.disk.total_bytes > 0 && s.disk.available_bytes <= s.disk.total_bytes);
    assert!(s.load.processes > 0 && s.load.one >= 0.0);
    let later = client.stats().await.unwrap();
    assert!(later.cpu.total() >= s.cpu.total());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorize_keys_is_idempotent() {
    let agent = Agent::start();
    let client = agent.connect().await;
    let keys = vec![
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA host@banger".to_string(),
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB other".to_string(),
    ];
    let r = client.authorize_keys(keys.clone()).await.unwrap();
    assert_eq!(r.keys, 2);
    let path = PathBuf::from(&r.path);
    let first = std::fs::read_to_string(&path).unwrap();
    client.authorize_keys(keys).await.unwrap();
    assert_eq!(std::fs::read_to_string(&path).unwrap(), first);
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let err = client
        .authorize_keys(vec!["a\nb".into()])
        .await
        .unwrap_err();
    assert_eq!(
        err.remote().map(|e| e.code),
        Some(RemoteErrorCode::BadRequest)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_with_exit_action_ends_the_agent() {
    let mut agent = Agent::start();
    let client = agent.connect().await;
    client.shutdown().await.unwrap();
    let deadline = Instant::now() + TIMEOUT;
    let status = loop {
        if let Some(status) = agent.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "agent did not exit");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success());
    // The client notices the channel is gone.
    let err = client.health().await.unwrap_err();
    assert!(matches!(err, AgentError::Disconnected(_)), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_on_a_terminal_reads_input_echoes_and_resizes() {
    let agent = Agent::start();
    let client = agent.connect().await;
    let mut req = sh("stty size; test -t 0 && echo tty-in; read line; echo got:$line; stty size");
    req.tty = Some(banger_agent_proto::TtySize { cols: 91, rows: 33 });
    let mut session = client.exec(req).await.unwrap();
    let mut stdin = session.take_stdin().expect("a terminal's input");
    let mut out = Vec::new();
    let mut wrote = false;
    let status = loop {
        let ev = tokio::time::timeout(TIMEOUT, session.next_event())
            .await
            .expect("exec timed out")
            .unwrap();
        match ev {
            Some(ExecEvent::Stdout(d)) => out.extend_from_slice(&d),
            Some(ExecEvent::Stderr(d)) => panic!("a terminal has no stderr: {d:?}"),
            Some(ExecEvent::Exit(s)) => break s,
            None => panic!("no exit"),
        }
        if !wrote && String::from_utf8_lossy(&out).contains("tty-in") {
            wrote = true;
            session
                .signaller()
                .resize(banger_agent_proto::TtySize {
                    cols: 120,
                    rows: 40,
                })
                .unwrap();
            stdin.write(b"hello\n").await.unwrap();
        }
    };
    let text = String::from_utf8_lossy(&out).replace('\r', "");
    assert_eq!(status, ExitStatus::Code(0), "{text}");
    // The size it started with, the input echoed by the terminal, the new size.
    assert!(text.starts_with("33 91\ntty-in\n"), "{text}");
    assert!(text.contains("hello\ngot:hello\n40 120\n"), "{text}");
}
