//! The CLI's own behaviour at its edges: a closed stdout, bad sizes refused
//! before any work.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::process::Stdio;

use common::TestHome;

/// Runs `banger ARGS` with stdout a pipe whose reader is already gone: every
/// write fails with EPIPE.
fn run_into_closed_pipe(home: &TestHome, args: &[&str]) -> std::process::Output {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    home.banger()
        .args(args)
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .expect("run banger")
}

#[test]
fn a_closed_stdout_ends_every_printing_command_by_sigpipe_without_a_panic() {
    let home = TestHome::new();
    // Starts the daemon, so that the commands below have something to print.
    home.run(&["doctor"]);
    for args in [
        &["completions", "bash"][..],
        &["doctor", "--json"],
        &["doctor"],
        &["vm", "list"],
        &["vm", "list", "--json"],
        &["image", "list"],
        &["daemon", "logs"],
        &["daemon", "status"],
        &["config", "show"],
        &["--version"],
    ] {
        let out = run_into_closed_pipe(&home, args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.signal(),
            Some(13),
            "banger {args:?} must end by SIGPIPE like other CLIs, not {}; stderr: {stderr}",
            out.status
        );
        assert!(stderr.is_empty(), "banger {args:?} printed: {stderr}");
    }
    // The daemon is untouched by its clients' pipes.
    home.ok(&["daemon", "status"]);
}

#[test]
fn bad_sizes_are_refused_before_any_work() {
    let home = TestHome::in_netns();
    for (args, says) in [
        (
            &["--vcpus", "0"][..],
            "0 vCPUs: a VM has from 1 to 255 vCPUs",
        ),
        (&["--vcpus", "256"], "256 vCPUs"),
        (&["--memory", "0"], "0 MiB of memory is too little"),
        (&["--memory", "127"], "at least 128 MiB"),
        (
            &["--memory", "64T"],
            "67108864 MiB of memory is more than this host has",
        ),
        (&["--disk", "1"], "a work disk of 1 MiB is too small"),
        // A unit reaches the daemon as the MiB it means.
        (&["--memory", "127M"], "at least 128 MiB"),
        (
            &["--disk", "0.0009765625G"],
            "a work disk of 1 MiB is too small",
        ),
    ] {
        let out = home.run(&[&["vm", "create", "--name", "sized"][..], args].concat());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
        assert!(stderr.contains("(op-"), "errors carry the op id: {stderr}");
    }
    // What is not a size never reaches the daemon, and says how to write one.
    for size in ["8X", "1.1G"] {
        let out = home.run(&["vm", "create", "--name", "sized", "--disk", size]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{size}: {stderr}");
        assert!(
            stderr.contains(&format!("{size:?} is not")),
            "{size}: {stderr}"
        );
    }
    // Nothing was made: no row, no image build, and the helper (bridge,
    // NAT, taps) was never needed.
    assert_eq!(home.json(&["vm", "list"]), serde_json::json!([]));
    assert_eq!(home.json(&["image", "list"]), serde_json::json!([]));
    assert!(home.processes("banger-helper").is_empty());
    assert_eq!(home.helper_log(), "");
}

#[test]
fn a_daemon_socket_that_is_not_the_users_own_is_refused() {
    let home = TestHome::new();
    let run = home.path().join("run");
    std::fs::create_dir_all(&run).unwrap();
    // Another user's socket where the daemon's should be: nothing is sent to it.
    let listener = std::os::unix::net::UnixListener::bind(home.socket()).unwrap();
    listener.set_nonblocking(true).unwrap();
    rustix::fs::chown(
        home.socket().as_path(),
        Some(rustix::fs::Uid::from_raw(65534)),
        None,
    )
    .unwrap();
    for args in [&["daemon", "status"][..], &["vm", "list"], &["--version"]] {
        let out = home.run(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(3), "{args:?}: {stderr}");
        assert!(stderr.contains("is not a socket of yours"), "{stderr}");
        assert!(stderr.contains("uid 65534"), "{stderr}");
    }
    assert!(
        listener.accept().is_err(),
        "the CLI connected to the foreign socket"
    );
    assert!(home.processes("bangerd").is_empty());
}

#[test]
fn the_daemons_files_are_private_whatever_the_umask() {
    use std::os::unix::fs::PermissionsExt;
    let home = TestHome::new();
    // The CLI, and the daemon it starts, under the loosest umask.
    let out = std::process::Command::new("sh")
        .args(["-c", "umask 000 && exec \"$0\" daemon start"])
        .arg(env!("CARGO_BIN_EXE_banger"))
        .env("BANGER_HOME", home.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for rel in [
        "state",
        "run",
        "state/banger.db",
        "state/logs",
        "state/logs/bangerd.log",
    ] {
        let mode = std::fs::metadata(home.path().join(rel))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "{rel} is {:o}", mode & 0o777);
    }
}
