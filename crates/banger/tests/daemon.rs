//! The CLI, daemon and helper binaries working together in a temp home.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use banger_host::KvmStatus;
use common::{TestHome, is_alive, wait_until};

#[test]
fn first_call_starts_the_daemon_and_stop_stops_it() {
    let home = TestHome::new();
    let out = home.run(&["daemon", "status"]);
    assert_eq!(out.status.code(), Some(3), "status must not start a daemon");
    assert!(home.processes("bangerd").is_empty());

    // Started under a low descriptor soft limit (the daemon raises it).
    let cli = home.banger();
    let mut low = std::process::Command::new("sh");
    low.args(["-c", "ulimit -S -n 256 && exec \"$0\" \"$@\""])
        .arg(cli.get_program())
        .args(["daemon", "start", "--json"]);
    for (k, v) in cli.get_envs() {
        match v {
            Some(v) => low.env(k, v),
            None => low.env_remove(k),
        };
    }
    let out = low.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(st["running"], true);
    let pid = st["pid"].as_u64().unwrap() as u32;
    assert_eq!(st["socket"], home.socket().to_str().unwrap());
    assert_eq!(st["version"], env!("CARGO_PKG_VERSION"));
    assert!(st["uptime_s"].is_u64());
    assert_eq!(home.processes("bangerd"), vec![pid]);
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(home.socket()).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    // Guests draw on its descriptors (DNS, port forwards): the soft limit
    // is raised to the hard one.
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let files: Vec<&str> = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(files[3], files[4], "soft = hard: {limits}");

    // Status again talks to the same daemon.
    assert_eq!(
        home.json(&["daemon", "status"])["pid"].as_u64(),
        Some(pid as u64)
    );

    let stopped = home.json(&["daemon", "stop"]);
    assert_eq!(stopped["stopped"], true);
    wait_until("daemon exit", Duration::from_secs(10), || !is_alive(pid));
    assert!(!home.socket().exists(), "socket removed on clean stop");
    assert!(home.daemon_log().contains("bangerd stopped"));
    assert_eq!(home.run(&["daemon", "status"]).status.code(), Some(3));
}

#[test]
fn concurrent_first_calls_start_exactly_one_daemon() {
    let home = TestHome::new();
    let children: Vec<_> = (0..8)
        .map(|_| {
            home.banger()
                .args(["daemon", "start", "--json"])
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let pids: Vec<u64> = children
        .into_iter()
        .map(|c| {
            let out = c.wait_with_output().unwrap();
            assert!(out.status.success());
            serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["pid"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert!(
        pids.iter().all(|p| *p == pids[0]),
        "all CLIs talk to one daemon: {pids:?}"
    );
    assert_eq!(home.processes("bangerd").len(), 1);
}

#[test]
fn sigterm_shuts_the_daemon_down_cleanly() {
    let home = TestHome::new();
    let pid = home.json(&["daemon", "start"])["pid"].as_u64().unwrap();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap()
            .success()
    );
    wait_until("daemon exit", Duration::from_secs(10), || {
        !is_alive(pid as u32)
    });
    assert!(!home.socket().exists());
    let log = home.daemon_log();
    assert!(
        log.contains("SIGTERM") && log.contains("bangerd stopped"),
        "{log}"
    );
}

#[test]
fn helper_is_reached_through_the_daemon_with_the_same_op_id() {
    let home = TestHome::new();
    let report = home.json(&["doctor"]);
    let op_id = report["op_id"].as_str().unwrap().to_string();
    let helper = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == "helper")
        .unwrap();
    assert_eq!(helper["status"], "pass", "{helper}");

    let helper_line = home
        .helper_log()
        .lines()
        .find(|l| l.contains(&op_id))
        .map(str::to_owned)
        .unwrap_or_else(|| panic!("no helper log line with {op_id}:\n{}", home.helper_log()));
    let v: serde_json::Value = serde_json::from_str(&helper_line).unwrap();
    assert_eq!(v["fields"]["message"], "helper rpc completed");
    assert_eq!(v["span"]["method"], "ping");
    assert!(v["fields"]["duration_ms"].as_f64().is_some());
    // The daemon's lines for the same request (doctor's `host.doctor`,
    // which pings the helper) carry it too.
    assert!(
        home.daemon_log()
            .lines()
            .any(|l| l.contains(&op_id) && l.contains("host.doctor"))
    );
}

#[test]
fn doctor_reports_this_hosts_kvm_and_exit_code_matches_failures() {
    let home = TestHome::new();
    let out = home.run(&["doctor", "--json"]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let failed = report["failed"].as_u64().unwrap();
    assert_eq!(out.status.code(), Some(if failed > 0 { 1 } else { 0 }));
    let checks = report["checks"].as_array().unwrap();
    for id in [
        "kvm",
        "accel",
        "firecracker",
        "qemu",
        "e2fsprogs",
        "rootfs_builder",
        "npm",
        "ssh",
        "nft",
        "tun",
        "bridge",
        "ip_forward",
        "root_disks",
        "vhost_vsock",
        "disk",
        "helper",
        "leaks",
        "pool",
    ] {
        let c = checks
            .iter()
            .find(|c| c["id"] == id)
            .unwrap_or_else(|| panic!("doctor has no {id} check"));
        if c["status"] != "pass" {
            assert!(
                c["fix"].is_string() || id == "kvm" || id == "firecracker",
                "{id} has no fix: {c}"
            );
        }
    }
    // What doctor says follows what this host's /dev/kvm is.
    let row = |id: &str| {
        let c = checks.iter().find(|c| c["id"] == id).unwrap();
        (
            c["status"].as_str().unwrap().to_owned(),
            c["detail"].as_str().unwrap().to_owned(),
        )
    };
    let (kvm_status, kvm) = row("kvm");
    let (_, accel) = row("accel");
    let table = String::from_utf8(home.run(&["doctor"]).stdout).unwrap();
    match banger_host::kvm_status() {
        KvmStatus::Pvm => {
            assert!(kvm.contains("PVM"), "{kvm}");
            assert!(accel.starts_with("tcg"), "{accel}");
            assert!(table.contains("KVM is PVM"), "{table}");
        }
        KvmStatus::Usable => {
            assert_eq!(kvm_status, "pass", "{kvm}");
            // KVM, or TCG after a test boot under KVM failed, which it names.
            assert!(
                accel.starts_with("kvm") || accel.contains("a test boot under KVM failed"),
                "{accel}"
            );
        }
        KvmStatus::Missing => {
            assert!(kvm.contains("/dev/kvm is missing"), "{kvm}");
            assert!(accel.starts_with("tcg"), "{accel}");
        }
        KvmStatus::NoAccess(why) => {
            assert!(kvm.contains(&why), "{kvm}");
            assert!(accel.starts_with("tcg"), "{accel}");
        }
    }
}

#[test]
fn raw_protocol_errors_carry_op_ids_in_answer_and_log() {
    let home = TestHome::new();
    home.ok(&["daemon", "start"]);
    let mut s = UnixStream::connect(home.socket()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut ask = |frame: &str| -> serde_json::Value {
        s.write_all(frame.as_bytes()).unwrap();
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap()
    };
    let unknown = ask("{\"v\":1,\"id\":1,\"op_id\":\"op-unknwn\",\"method\":\"vm.teleport\"}\n");
    assert_eq!(unknown["error"]["code"], "unknown_method");
    assert_eq!(unknown["error"]["op_id"], "op-unknwn");
    let bad = ask("{\"v\":7,\"id\":2,\"method\":\"daemon.status\"}\n");
    assert_eq!(bad["error"]["code"], "bad_version");
    let bad_op = bad["error"]["op_id"].as_str().unwrap().to_string();
    assert!(bad_op.starts_with("op-"));
    let garbage = ask("{{{{\n");
    assert_eq!(garbage["error"]["code"], "invalid_request");
    let log = home.daemon_log();
    assert!(
        log.lines()
            .any(|l| l.contains("op-unknwn") && l.contains("rpc failed")),
        "{log}"
    );
    assert!(
        log.lines()
            .any(|l| l.contains(&bad_op) && l.contains("bad_version")),
        "{log}"
    );
}

#[test]
fn a_daemon_that_cannot_start_gets_a_clear_error_pointing_at_its_log() {
    let home = TestHome::new();
    // A directory where the database file belongs makes the daemon fail at startup.
    std::fs::create_dir_all(home.path().join("state/banger.db")).unwrap();
    let out = home.run(&["doctor"]);
    let err = String::from_utf8_lossy(&out.stderr);
    // doctor itself still runs, reporting the helper as unreachable because the daemon is down.
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("bangerd exited at startup"),
        "{err}"
    );
    let out = home.run(&["daemon", "start"]);
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("error: bangerd exited at startup"), "{err}");
    assert!(err.contains("cannot open the database"), "{err}");
    assert!(err.contains("bangerd.log"), "{err}");
    assert!(
        err.trim_end().ends_with(')') && err.contains("(op-"),
        "error must end with the op id: {err}"
    );
}

#[test]
fn config_errors_name_the_key_and_file() {
    let home = TestHome::new();
    std::fs::write(
        home.path().join("config.toml"),
        "[pool]\nsize = 0\n[vmm]\nacel = \"tcg\"\n",
    )
    .unwrap();
    let out = home.run(&["config", "show"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("acel") && err.contains("config.toml") && err.contains("(op-"),
        "{err}"
    );

    std::fs::write(
        home.path().join("config.toml"),
        "[pool]\nsize = 0\n[vmm]\naccel = \"tcg\"\n",
    )
    .unwrap();
    let shown = home.json(&["config", "show"]);
    assert_eq!(shown["config"]["vmm"]["accel"], "tcg");
    assert_eq!(
        shown["paths"]["daemon_socket"],
        home.socket().to_str().unwrap()
    );
    // The daemon refuses to start on a broken config too, and says why.
    std::fs::write(
        home.path().join("config.toml"),
        "bogus = 1\n[pool]\nsize = 0\n",
    )
    .unwrap();
    let out = home.run(&["daemon", "start"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("bogus"), "{err}");
}

#[test]
fn version_shows_both_sides_without_starting_a_daemon() {
    let home = TestHome::new();
    let v = home.json(&["--version"]);
    assert_eq!(v["cli"]["version"], env!("CARGO_PKG_VERSION"));
    assert!(v["daemon"].is_null());
    assert!(home.processes("bangerd").is_empty());
    home.ok(&["daemon", "start"]);
    let v = home.json(&["--version"]);
    assert_eq!(v["daemon"]["version"], env!("CARGO_PKG_VERSION"));
}

#[test]
fn usage_errors_exit_2_and_completions_print() {
    let home = TestHome::new();
    assert_eq!(home.run(&["daemon", "frobnicate"]).status.code(), Some(2));
    let bash = home.ok(&["completions", "bash"]);
    assert!(bash.contains("banger") && bash.contains("doctor"));
}

#[test]
fn logs_render_with_op_ids() {
    let home = TestHome::new();
    home.ok(&["daemon", "start"]);
    let out = home.ok(&["daemon", "logs", "-n", "50"]);
    assert!(out.contains("bangerd started"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.contains("[op-") && l.contains("daemon rpc completed")),
        "{out}"
    );
    let raw = home.ok(&["daemon", "logs", "--json"]);
    for l in raw.lines() {
        serde_json::from_str::<serde_json::Value>(l).expect("every log line is JSON");
    }
}
