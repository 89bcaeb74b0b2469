//! banger's Firecracker path against `fc-double`, a stand-in binary that
//! validates every request against Firecracker's OpenAPI file.
//!
//! The double must be built first: `cargo build -p fc-double`, or run
//! `cargo test -p banger-firecracker -p fc-double` (which builds it).

use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use banger_firecracker::models::{
    BootSource, Drive, InstanceState, LogLevel, Logger, MachineConfiguration, Metrics,
    NetworkInterface, Vsock,
};
use banger_firecracker::{
    ApiError, FirecrackerClient, FirecrackerProcess, SpawnConfig, Stage, StopOutcome, VmConfig,
    VsockError, configure_and_start, connect_vsock, spawn,
};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const AGENT_PORT: u32 = 1024;
const ECHO_BANNER: &[u8] = b"fc-double echo-agent\n";

/// `target/<profile>/fc-double`, beside the `deps/` directory holding this
/// test binary.
fn fc_double() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps");
    let bin = profile_dir.join("fc-double");
    assert!(
        bin.is_file(),
        "fc-double not found at {}: run `cargo build -p fc-double` first \
         (or `cargo test -p banger-firecracker -p fc-double`, which builds it)",
        bin.display()
    );
    bin
}

/// Kills the double's process group if a test ends without stopping it.
struct Guard(FirecrackerProcess);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let pid = rustix::process::Pid::from_raw(self.0.pid() as i32).unwrap();
            let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
        }
    }
}

/// A network namespace holding the VM's tap (`bgtap0`), deleted on drop:
/// the double opens its tap the way Firecracker does, so it must exist, and
/// tests running side by side each need their own.
struct Netns(String);

impl Netns {
    fn with_tap() -> Netns {
        let ns = Netns(format!("bgfd-{:08x}", fastrand::u32(..)));
        for args in [
            &["netns", "add", &ns.0][..],
            &["-n", &ns.0, "tuntap", "add", "bgtap0", "mode", "tap"],
        ] {
            let st = std::process::Command::new("ip")
                .args(args)
                .status()
                .expect("run ip");
            assert!(st.success(), "ip {args:?} failed: these tests need root");
        }
        ns
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "delete", &self.0])
            .status();
    }
}

struct Vm {
    dir: tempfile::TempDir,
    fc: Guard,
    client: FirecrackerClient,
    _netns: Netns,
}

impl Vm {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.path("fc.log")).unwrap_or_default()
    }
}

async fn start_double(extra: &[&str]) -> Vm {
    let dir = tempfile::tempdir().unwrap();
    // A file that passes as an ELF vmlinux, an initrd, two disks.
    std::fs::write(
        dir.path().join("vmlinux"),
        b"\x7fELF\x02\x01\x01 not really a kernel",
    )
    .unwrap();
    std::fs::write(dir.path().join("initrd.img"), b"initrd").unwrap();
    std::fs::write(dir.path().join("rootfs.ext4"), b"").unwrap();
    std::fs::write(dir.path().join("work.ext4"), b"").unwrap();
    // Firecracker opens its log and metrics files; banger creates them.
    std::fs::write(dir.path().join("vmm.log"), b"").unwrap();
    std::fs::write(dir.path().join("metrics.json"), b"").unwrap();
    // The double runs inside the namespace with its tap.
    let netns = Netns::with_tap();
    let wrapper = dir.path().join("fc-in-netns");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec ip netns exec {} {} \"$@\"\n",
            netns.0,
            fc_double().display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let mut cfg = SpawnConfig::new(
        wrapper,
        dir.path().join("api.sock"),
        "test-vm",
        dir.path().join("fc.log"),
    );
    cfg.extra_args = extra.iter().map(OsString::from).collect();
    let fc = spawn(&cfg).await.expect("fc-double starts");
    let client = fc.client();
    Vm {
        dir,
        fc: Guard(fc),
        client,
        _netns: netns,
    }
}

fn vm_config(vm: &Vm) -> VmConfig {
    let mut machine = MachineConfiguration::new(2, 256);
    machine.smt = Some(false);
    VmConfig {
        logger: Some(Logger {
            log_path: Some(vm.path("vmm.log")),
            level: Some(LogLevel::Info),
            ..Logger::default()
        }),
        metrics: Some(Metrics {
            metrics_path: vm.path("metrics.json"),
            emit_id: None,
            properties: None,
        }),
        machine,
        boot_source: BootSource {
            kernel_image_path: vm.path("vmlinux"),
            initrd_path: Some(vm.path("initrd.img")),
            boot_args: Some("console=ttyS0 reboot=k panic=1 banger.channel=vsock".into()),
        },
        drives: vec![
            Drive::virtio_block("rootfs", vm.path("rootfs.ext4"), true, false),
            Drive::virtio_block("work", vm.path("work.ext4"), false, false),
        ],
        network_interfaces: vec![NetworkInterface::tap("eth0", "bgtap0", "02:fc:00:00:00:01")],
        vsock: Some(Vsock {
            guest_cid: 3,
            uds_path: vm.path("vsock.sock"),
        }),
    }
}

fn fault(err: &ApiError) -> &str {
    assert_eq!(err.status().map(|s| s.as_u16()), Some(400), "{err}");
    err.fault_message().expect("a fault message")
}

#[tokio::test]
async fn full_configure_and_start_sequence_is_accepted() {
    let vm = start_double(&[]).await;
    assert!(vm.fc.0.api_ready_after() < Duration::from_secs(5));
    let before = vm.client.describe_instance().await.unwrap();
    assert_eq!(before.state, InstanceState::NotStarted);
    assert_eq!(before.id, "test-vm");

    let report = configure_and_start(&vm.client, &vm_config(&vm))
        .await
        .unwrap();
    let stages: Vec<String> = report.stages.iter().map(|s| s.stage.to_string()).collect();
    assert_eq!(
        stages,
        [
            "logger",
            "metrics",
            "machine-config",
            "boot-source",
            "drive rootfs",
            "drive work",
            "network-interface eth0",
            "vsock",
            "InstanceStart"
        ]
    );
    assert!(report.total >= report.stages.iter().map(|s| s.elapsed).sum());

    let after = vm.client.describe_instance().await.unwrap();
    assert_eq!(after.state, InstanceState::Running);
    // The double logged each request to the logger file, and created the
    // vsock socket the way Firecracker does.
    let log = vm.log();
    for line in [
        "PUT /logger -> 204",
        "PUT /drives/rootfs -> 204",
        "PUT /network-interfaces/eth0 -> 204",
        "PUT /actions -> 204",
        "GET / -> 200",
    ] {
        assert!(log.contains(line), "missing {line:?} in:\n{log}");
    }
    // One connection for spawn's readiness probe, one kept alive for all
    // ten calls of the client.
    assert_eq!(log.matches("API connection").count(), 2, "{log}");
    let vmm_log = std::fs::read_to_string(vm.path("vmm.log")).unwrap();
    assert!(vmm_log.contains("PUT /actions"), "{vmm_log}");
    assert!(vm.path("vsock.sock").exists());
}

#[tokio::test]
async fn invalid_bodies_are_rejected_naming_the_problem() {
    let vm = start_double(&[]).await;
    let c = &vm.client;
    let cases = [
        (
            "/boot-source",
            json!({"boot_args": "quiet"}),
            "missing field `kernel_image_path`",
        ),
        (
            "/machine-config",
            json!({"vcpu_count": "2", "mem_size_mib": 128}),
            "vcpu_count: invalid type: string \"2\", expected integer",
        ),
        (
            "/machine-config",
            json!({"vcpu_count": 1, "mem_size_mib": 128.5}),
            "mem_size_mib: invalid type: floating point `128.5`, expected integer",
        ),
        (
            "/vsock",
            json!({"guest_cid": 3, "uds_path": "/tmp/x.sock", "cid": 3}),
            "unknown field `cid`, expected one of `guest_cid`, `uds_path`, `vsock_id`",
        ),
        (
            "/logger",
            json!({"level": "Verbose"}),
            "level: unknown variant string \"Verbose\", expected one of `Error`, `Warning`, \
             `Info`, `Debug`, `Trace`, `Off`",
        ),
        (
            "/drives/rootfs",
            json!({"drive_id": "rootfs", "is_root_device": true, "path_on_host": "/r",
                   "rate_limiter": {"bandwidth": {"size": 1}}}),
            "rate_limiter.bandwidth: missing field `refill_time`",
        ),
        (
            "/vsock",
            json!({"guest_cid": 2, "uds_path": "/tmp/x.sock"}),
            "guest_cid: 2 is below the minimum 3",
        ),
    ];
    for (path, body, expected) in cases {
        let err = c.put(path, &body).await.unwrap_err();
        assert_eq!(
            fault(&err),
            format!("An error occurred when deserializing the json body of a request: {expected}."),
            "PUT {path} {body}"
        );
    }
    let err = c.put("/frobnicate", &json!({})).await.unwrap_err();
    assert_eq!(
        fault(&err),
        "Invalid request method and/or path: PUT /frobnicate."
    );
    // The error's Display carries status and message for callers' reports.
    assert!(err.to_string().contains("400 Bad Request"), "{err}");
    // Ids in the path follow Firecracker's rule (letters, digits, '_').
    let dash = Drive::virtio_block("work-disk", vm.path("work.ext4"), false, false);
    let err = c.put_drive(&dash).await.unwrap_err();
    assert!(fault(&err).contains("alphanumeric characters and underscores"));
    // Nothing was started by any of it.
    let info = c.describe_instance().await.unwrap();
    assert_eq!(info.state, InstanceState::NotStarted);
}

#[tokio::test]
async fn pre_boot_resources_are_refused_after_start() {
    let vm = start_double(&[]).await;
    let config = vm_config(&vm);
    configure_and_start(&vm.client, &config).await.unwrap();
    let not_after = "The requested operation is not supported after starting the microVM.";
    let c = &vm.client;
    assert_eq!(
        fault(&c.put_drive(&config.drives[1]).await.unwrap_err()),
        not_after
    );
    assert_eq!(
        fault(&c.put_machine_config(&config.machine).await.unwrap_err()),
        not_after
    );
    assert_eq!(
        fault(&c.put_boot_source(&config.boot_source).await.unwrap_err()),
        not_after
    );
    assert_eq!(
        fault(
            &c.put_network_interface(&config.network_interfaces[0])
                .await
                .unwrap_err()
        ),
        not_after
    );
    assert_eq!(
        fault(
            &c.put_vsock(config.vsock.as_ref().unwrap())
                .await
                .unwrap_err()
        ),
        not_after
    );
    assert_eq!(
        fault(&c.put_logger(&Logger::default()).await.unwrap_err()),
        not_after
    );
    assert_eq!(fault(&c.instance_start().await.unwrap_err()), not_after);
}

#[tokio::test]
async fn instance_start_needs_a_kernel_that_exists_and_is_elf() {
    // No boot source at all.
    let vm = start_double(&[]).await;
    let err = vm.client.instance_start().await.unwrap_err();
    assert_eq!(
        fault(&err),
        "Cannot start microvm without kernel configuration."
    );

    // A kernel path that does not exist: Firecracker opens the file when the
    // boot source is PUT, so the sequence stops there.
    let mut config = vm_config(&vm);
    config.boot_source.kernel_image_path = vm.path("missing-vmlinux");
    let err = configure_and_start(&vm.client, &config).await.unwrap_err();
    assert_eq!(err.stage, Stage::BootSource);
    assert_eq!(
        err.completed
            .iter()
            .map(|s| s.stage.clone())
            .collect::<Vec<_>>(),
        [Stage::Logger, Stage::Metrics, Stage::MachineConfig]
    );
    let msg = fault(&err.source);
    assert!(msg.starts_with("The kernel file cannot be opened"), "{msg}");
    assert!(msg.contains("missing-vmlinux"), "{msg}");
    assert_eq!(
        err.to_string(),
        "configuring Firecracker failed at boot-source"
    );

    // A missing drive file stops the sequence at that drive.
    let mut config = vm_config(&vm);
    config.drives[1].path_on_host = Some(vm.path("missing-work.ext4"));
    let vm2 = start_double(&[]).await;
    let config2 = VmConfig {
        logger: None,
        metrics: None,
        ..config
    };
    let err = configure_and_start(&vm2.client, &config2)
        .await
        .unwrap_err();
    assert_eq!(err.stage, Stage::Drive("work".into()));
    assert!(fault(&err.source).contains("missing-work.ext4"));

    // A kernel that is not an ELF vmlinux (e.g. a bzImage) fails at start.
    std::fs::write(vm.path("bzImage"), b"MZ\x4d\x5a compressed").unwrap();
    let vm3 = start_double(&[]).await;
    let mut config3 = vm_config(&vm3);
    config3.boot_source.kernel_image_path = vm.path("bzImage");
    let err = configure_and_start(&vm3.client, &config3)
        .await
        .unwrap_err();
    assert_eq!(err.stage, Stage::InstanceStart);
    assert!(fault(&err.source).contains("Invalid Elf magic"));
    assert_eq!(
        vm3.client.describe_instance().await.unwrap().state,
        InstanceState::NotStarted
    );
}

fn echo_agent_args() -> Vec<String> {
    vec![
        "--guest-agent-cmd".into(),
        format!(
            "{} echo-agent --listen unix:{{sock}}",
            fc_double().display()
        ),
    ]
}

/// Retries while the guest agent is still coming up, as banger will.
async fn connect_agent(uds: &Path) -> tokio::net::UnixStream {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match connect_vsock(uds, AGENT_PORT, Duration::from_secs(2)).await {
            Ok(stream) => return stream,
            Err(VsockError::Refused { .. }) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("vsock connect failed: {e}"),
        }
    }
}

#[tokio::test]
async fn hybrid_vsock_round_trip_to_the_guest_agent() {
    let args = echo_agent_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let vm = start_double(&args).await;
    let config = vm_config(&vm);
    let uds = vm.path("vsock.sock");

    // Before InstanceStart the device is not running: CONNECT gets no answer.
    let mut pre = config.clone();
    pre.drives.clear();
    pre.network_interfaces.clear();
    for step in [
        vm.client.put_machine_config(&pre.machine).await,
        vm.client.put_boot_source(&pre.boot_source).await,
        vm.client.put_vsock(pre.vsock.as_ref().unwrap()).await,
    ] {
        step.unwrap();
    }
    let err = connect_vsock(&uds, AGENT_PORT, Duration::from_millis(200))
        .await
        .unwrap_err();
    assert!(matches!(err, VsockError::Timeout { .. }), "{err}");
    vm.client.instance_start().await.unwrap();

    let mut stream = connect_agent(&uds).await;
    // The agent's greeting is the first thing on the stream: nothing of it
    // was eaten while reading the OK line.
    let mut banner = vec![0; ECHO_BANNER.len()];
    stream.read_exact(&mut banner).await.unwrap();
    assert_eq!(banner, ECHO_BANNER);
    stream.write_all(b"hello guest\n").await.unwrap();
    let mut echoed = vec![0; 12];
    stream.read_exact(&mut echoed).await.unwrap();
    assert_eq!(echoed, b"hello guest\n");

    // A second, concurrent connection works too.
    let mut second = connect_agent(&uds).await;
    let mut banner = vec![0; ECHO_BANNER.len()];
    second.read_exact(&mut banner).await.unwrap();
    assert_eq!(banner, ECHO_BANNER);

    // Nothing listens on another guest port: closed without a reply.
    let err = connect_vsock(&uds, 52, Duration::from_secs(2))
        .await
        .unwrap_err();
    assert!(matches!(err, VsockError::Refused { port: 52, .. }), "{err}");
}

#[tokio::test]
async fn graceful_stop_via_ctrl_alt_del() {
    let args = echo_agent_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut vm = start_double(&args).await;
    configure_and_start(&vm.client, &vm_config(&vm))
        .await
        .unwrap();
    let uds = vm.path("vsock.sock");
    drop(connect_agent(&uds).await);

    let report = vm
        .fc
        .0
        .stop(&vm.client, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(report.outcome, StopOutcome::Graceful);
    assert_eq!(report.exit_status.code(), Some(0));
    assert!(report.elapsed < Duration::from_secs(5));
    // The guest powered off: vsock socket and agent gone.
    assert!(!uds.exists());
    assert!(!vm.path("fc-double-agent.sock").exists());
    // A second stop finds it already exited.
    let again = vm
        .fc
        .0
        .stop(&vm.client, Duration::from_secs(1))
        .await
        .unwrap();
    assert_eq!(again.outcome, StopOutcome::AlreadyExited);
}

#[tokio::test]
async fn stop_falls_back_to_sigkill_when_the_guest_ignores_ctrl_alt_del() {
    let mut args = echo_agent_args();
    args.push("--ignore-ctrl-alt-del".into());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut vm = start_double(&args).await;
    configure_and_start(&vm.client, &vm_config(&vm))
        .await
        .unwrap();
    let agent_sock = vm.path("fc-double-agent.sock");
    drop(connect_agent(&vm.path("vsock.sock")).await);

    let report = vm
        .fc
        .0
        .stop(&vm.client, Duration::from_millis(300))
        .await
        .unwrap();
    assert_eq!(report.outcome, StopOutcome::KilledAfterTimeout);
    assert_eq!(report.exit_status.signal(), Some(9));
    assert!(report.elapsed >= Duration::from_millis(300));
    assert!(vm.log().contains("ignoring Ctrl+Alt+Del"));
    // The whole process group went: the agent no longer accepts.
    let deadline = Instant::now() + Duration::from_secs(5);
    while tokio::net::UnixStream::connect(&agent_sock).await.is_ok() {
        assert!(Instant::now() < deadline, "guest agent survived the kill");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn stop_before_start_kills_after_the_refusal() {
    let mut vm = start_double(&[]).await;
    let report = vm
        .fc
        .0
        .stop(&vm.client, Duration::from_secs(5))
        .await
        .unwrap();
    match &report.outcome {
        StopOutcome::KilledAfterRefusal(msg) => {
            assert!(msg.contains("not supported before starting"), "{msg}")
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(report.exit_status.signal(), Some(9));
}

#[tokio::test]
async fn sigterm_kills_the_process_and_its_guest() {
    let args = echo_agent_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut vm = start_double(&args).await;
    configure_and_start(&vm.client, &vm_config(&vm))
        .await
        .unwrap();
    drop(connect_agent(&vm.path("vsock.sock")).await);
    let pid = rustix::process::Pid::from_raw(vm.fc.0.pid() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let status = tokio::time::timeout(Duration::from_secs(5), vm.fc.0.wait())
        .await
        .expect("exits on SIGTERM")
        .unwrap();
    assert_eq!(status.signal(), Some(15));
    // Only the process was signalled, yet the stand-in guest is gone too.
    let agent = vm.path("fc-double-agent.sock");
    assert!(tokio::net::UnixStream::connect(&agent).await.is_err());
}

#[tokio::test]
async fn spawn_replaces_a_stale_socket_and_reports_a_silent_binary() {
    let dir = tempfile::tempdir().unwrap();
    let api = dir.path().join("api.sock");
    // A socket file left behind by a dead process.
    drop(std::os::unix::net::UnixListener::bind(&api).unwrap());
    assert!(api.exists());
    let mut cfg = SpawnConfig::new(fc_double(), &api, "stale", dir.path().join("fc.log"));
    let fc = spawn(&cfg).await.expect("stale socket replaced");
    let mut fc = Guard(fc);
    fc.0.kill().await.unwrap();

    // A binary that never opens the socket: bounded wait, clear error, the
    // log path in the message.
    cfg.api_socket = dir.path().join("never.sock");
    cfg.ready_timeout = Duration::from_millis(300);
    let script = dir.path().join("silent");
    std::fs::write(&script, "#!/bin/sh\nexec sleep 30\n").unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    cfg.binary = script;
    let err = spawn(&cfg).await.unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("did not accept connections within 300ms"),
        "{text}"
    );
    assert!(text.contains("fc.log"), "{text}");
    assert!(text.contains("killed"), "{text}");
}
