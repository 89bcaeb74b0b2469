//! fc-double as a process: spec discovery errors, raw HTTP/1.1 framing and
//! keep-alive on the API socket, the echo agent.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_fc-double");

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for_socket(path: &Path) -> UnixStream {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(s) = UnixStream::connect(path) {
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "{} never accepted",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn start(dir: &Path) -> (Running, UnixStream) {
    let sock = dir.join("api.sock");
    let child = Command::new(BIN)
        .args(["--api-sock", sock.to_str().unwrap(), "--id", "cli-test"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let running = Running(child);
    (running, wait_for_socket(&sock))
}

/// Reads one response: status code, headers (lower-cased names), body
/// framed by Content-Length.
fn read_response(reader: &mut BufReader<&UnixStream>) -> (u16, Vec<(String, String)>, String) {
    let mut status_line = String::new();
    reader.read_line(&mut status_line).unwrap();
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    assert!(status_line.starts_with("HTTP/1.1 "), "{status_line:?}");
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        let (name, value) = line.split_once(':').unwrap();
        headers.push((name.to_ascii_lowercase(), value.trim().to_owned()));
    }
    let len: usize = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .map_or(0, |(_, v)| v.parse().unwrap());
    let mut body = vec![0; len];
    reader.read_exact(&mut body).unwrap();
    (status, headers, String::from_utf8(body).unwrap())
}

#[test]
fn a_missing_spec_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["--api-sock", dir.path().join("a.sock").to_str().unwrap()])
        .args(["--spec", "/nonexistent/firecracker-api.yaml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("/nonexistent/firecracker-api.yaml"),
        "{stderr}"
    );
    assert!(stderr.contains("BANGER_FC_SPEC"), "{stderr}");
    // Same through the environment variable.
    let out = Command::new(BIN)
        .args(["--api-sock", dir.path().join("a.sock").to_str().unwrap()])
        .env("BANGER_FC_SPEC", "/nonexistent/other.yaml")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/other.yaml"));
}

#[test]
fn an_existing_api_socket_path_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    std::fs::write(&sock, b"").unwrap();
    let out = Command::new(BIN)
        .args(["--api-sock", sock.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("Failed to open the API socket"), "{stderr}");
}

#[test]
fn raw_http_keep_alive_and_content_length_framing() {
    let dir = tempfile::tempdir().unwrap();
    let (_fc, stream) = start(dir.path());
    let mut writer = &stream;
    let mut reader = BufReader::new(&stream);

    writer
        .write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\r\n")
        .unwrap();
    let (status, headers, body) = read_response(&mut reader);
    assert_eq!(status, 200);
    assert!(
        headers.contains(&("content-type".into(), "application/json".into())),
        "{headers:?}"
    );
    let info: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(info["id"], "cli-test");
    assert_eq!(info["state"], "Not started");

    // Same connection; the body arrives in two writes and is framed by
    // Content-Length alone.
    let body = br#"{"vcpu_count": 2, "mem_size_mib": "512"}"#;
    write!(
        writer,
        "PUT /machine-config HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    writer.write_all(&body[..10]).unwrap();
    writer.flush().unwrap();
    std::thread::sleep(Duration::from_millis(50));
    writer.write_all(&body[10..]).unwrap();
    let (status, _, answer) = read_response(&mut reader);
    assert_eq!(status, 400);
    let fault: serde_json::Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(
        fault["fault_message"],
        "An error occurred when deserializing the json body of a request: \
         mem_size_mib: invalid type: string \"512\", expected integer."
    );

    // And a successful PUT answers 204 without a body.
    let body = br#"{"vcpu_count": 2, "mem_size_mib": 512}"#;
    write!(
        writer,
        "PUT /machine-config HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    writer.write_all(body).unwrap();
    let (status, _, answer) = read_response(&mut reader);
    assert_eq!(status, 204);
    assert_eq!(answer, "");
}

#[test]
fn echo_agent_greets_then_echoes() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("agent.sock");
    let child = Command::new(BIN)
        .args([
            "echo-agent",
            "--listen",
            &format!("unix:{}", sock.display()),
        ])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _agent = Running(child);
    let stream = wait_for_socket(&sock);
    let mut reader = BufReader::new(&stream);
    let mut banner = String::new();
    reader.read_line(&mut banner).unwrap();
    assert_eq!(banner, "fc-double echo-agent\n");
    (&stream).write_all(b"ping\n").unwrap();
    let mut echoed = String::new();
    reader.read_line(&mut echoed).unwrap();
    assert_eq!(echoed, "ping\n");
}

/// A network namespace of the test's own, deleted on drop.
struct Netns(String);

impl Netns {
    fn new() -> Netns {
        let ns = Netns(format!("bgfc-{:08x}", std::process::id() ^ 0x5a5a_0000));
        ns.ip(&["netns", "add", &ns.0]);
        ns
    }

    fn ip(&self, args: &[&str]) {
        let st = Command::new("ip").args(args).status().expect("run ip");
        assert!(st.success(), "ip {args:?} failed: this test needs root");
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.0])
            .status();
    }
}

fn start_in(ns: &Netns, sock: &Path) -> (Running, UnixStream) {
    let child = Command::new("ip")
        .args(["netns", "exec", &ns.0, BIN])
        .args(["--api-sock", sock.to_str().unwrap(), "--id", "tap-test"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let running = Running(child);
    (running, wait_for_socket(sock))
}

fn put_iface(stream: &UnixStream, tap: &str) -> (u16, String) {
    let body = format!(r#"{{"iface_id": "eth0", "host_dev_name": "{tap}"}}"#);
    let mut writer = stream;
    write!(
        writer,
        "PUT /network-interfaces/eth0 HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let (status, _, answer) = read_response(&mut BufReader::new(stream));
    (status, answer)
}

#[test]
fn taps_are_opened_and_held_like_firecracker_does() {
    let ns = Netns::new();
    ns.ip(&["-n", &ns.0, "tuntap", "add", "bgt0", "mode", "tap"]);
    let dir = tempfile::tempdir().unwrap();
    let (first, a) = start_in(&ns, &dir.path().join("a.sock"));
    let (_second, b) = start_in(&ns, &dir.path().join("b.sock"));

    assert_eq!(put_iface(&a, "bgt0"), (204, String::new()));
    // The tap is held: a second VMM on it is refused, as the kernel refuses
    // Firecracker (a pool that hands out a tap still in use shows here).
    let (status, fault) = put_iface(&b, "bgt0");
    assert_eq!(status, 400);
    assert!(fault.contains("Open tap device failed"), "{fault}");
    assert!(fault.contains("Device or resource busy"), "{fault}");
    // Updating the interface lets go of its tap before taking it again.
    assert_eq!(put_iface(&a, "bgt0"), (204, String::new()));
    // A tap that does not exist.
    let (status, fault) = put_iface(&b, "bgt9");
    assert_eq!(status, 400);
    assert!(
        fault.contains("No such device") && fault.contains("bgt9"),
        "{fault}"
    );
    // Once the first VMM is gone the tap is free again.
    drop(first);
    assert_eq!(put_iface(&b, "bgt0"), (204, String::new()));
}
