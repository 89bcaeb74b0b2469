//! `banger mcp` driven by a real MCP client that is not banger's code: the
//! Python `mcp` package from PyPI (installed into `target/mcp-venv` by
//! `scripts/deps.sh --test`) running `tests/mcp_client.py`. The daemon,
//! helper and VMs run in a network namespace of the test's own.

mod common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{TestHome, git, phase, vm_names};

fn python() -> PathBuf {
    let venv = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("target dir")
        .join("mcp-venv/bin/python");
    assert!(
        venv.is_file(),
        "{} is missing: run scripts/deps.sh --test (it installs the Python MCP client)",
        venv.display()
    );
    venv
}

fn client(home: &TestHome, scenario: &str, flags: &[&str]) -> Command {
    let ns = home.netns.as_deref().expect("a home in a namespace");
    let mut c = Command::new(python());
    c.arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/mcp_client.py"))
        .args([scenario, "--", "ip", "netns", "exec", ns])
        .arg(env!("CARGO_BIN_EXE_banger"))
        .arg("--home")
        .arg(home.path())
        .arg("mcp")
        .args(flags)
        .env_remove("RUST_LOG");
    c
}

/// Run a scenario's client to its end: the `RESULT` line it prints.
fn run(client: &mut Command) -> serde_json::Value {
    let out = client.output().expect("run python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the MCP client failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .unwrap_or_else(|| panic!("no RESULT line in:\n{stdout}"));
    serde_json::from_str(line).unwrap()
}

fn said(v: &serde_json::Value, key: &str) -> String {
    v[key].as_str().unwrap_or_default().to_owned()
}

#[test]
fn an_mcp_client_drives_vms_through_banger_mcp() {
    let home = TestHome::in_netns();
    common::shared_default_image(&home);

    phase(
        "tools: create, exec, files, workspace, forwards, resources, delete",
        || {
            let repo = home.path().join("repo");
            std::fs::create_dir(&repo).unwrap();
            std::fs::write(repo.join("hello.txt"), "one\n").unwrap();
            git(&repo, &["init", "-q", "-b", "main"]);
            git(&repo, &["add", "hello.txt"]);
            git(&repo, &["commit", "-q", "-m", "one"]);
            let mut c = client(&home, "main", &[]);
            let r = run(c.env("MCP_REPO", &repo));
            eprintln!(
                "mcp vm_create returned after {:.2}s (daemon create {} ms); vm_exec uname {:.3}s",
                r["create_s"].as_f64().unwrap(),
                r["ready_ms"],
                r["exec_s"].as_f64().unwrap()
            );
            assert!(said(&r, "uname").starts_with("Linux "), "{r}");
            // Bad arguments are tool errors that name the argument.
            assert!(said(&r, "bad_vcpus").contains("`vcpus`"), "{r}");
            assert!(said(&r, "bad_unknown").contains("`colour`"), "{r}");
            assert!(said(&r, "bad_wait").contains("`wait`"), "{r}");
            assert!(said(&r, "bad_exec").contains("`argv`"), "{r}");
            assert!(said(&r, "bad_cwd").contains("`cwd`"), "{r}");
            assert!(said(&r, "bad_path").contains("`path`"), "{r}");
            assert!(said(&r, "no_vm").contains("nosuchvm"), "{r}");
            assert!(said(&r, "missing_file").contains("/nonexistent"), "{r}");
            assert!(said(&r, "bad_format").contains("`format`"), "{r}");
            // The branch export reached the host repository.
            assert_eq!(git(&repo, &["show", "mcp-work:hello.txt"]), "two");
            // The op id a tool reported is in the daemon's log.
            let op = said(&r, "exec_op_id");
            assert!(
                home.daemon_log().contains(&op),
                "{op} not in the daemon log"
            );
            assert!(vm_names(&home).is_empty(), "the scenario deleted its VM");
        },
    );

    phase("--allow lists only the tools allowed", || {
        let r = run(&mut client(&home, "allow", &["--allow", "vm_list,vm_exec"]));
        assert_eq!(r["tools"], serde_json::json!(["vm_exec", "vm_list"]));
        let out = home.run(&["mcp", "--allow", "vm_list,rm_rf"]);
        assert!(!out.status.success());
        assert!(common::text(&out.stderr).contains("\"rm_rf\""));
    });

    phase(
        "--net and --secret: every VM the session creates gets them, the agent only placeholders",
        || {
            let out = home.run(&["mcp", "--secret-in-body", "TOKEN"]);
            assert!(!out.status.success());
            assert!(
                common::text(&out.stderr).contains("--secret TOKEN@HOST"),
                "{out:?}"
            );
            let mut set = home
                .banger()
                .args(["secret", "set", "TOKEN"])
                .stdin(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            std::io::Write::write_all(&mut set.stdin.take().unwrap(), b"mcp-value\n").unwrap();
            assert!(set.wait().unwrap().success());
            let mut c = client(
                &home,
                "ephemeral-exit",
                &["--net", "none", "--secret", "TOKEN@api.test"],
            );
            let out = c.env("MCP_VM", "mcp-sec").output().expect("run python");
            assert!(out.status.success(), "{}", common::text(&out.stderr));
            let vm = home.json(&["vm", "show", "mcp-sec"]);
            assert_eq!(vm["net"], "none");
            assert_eq!(vm["secrets"][0]["name"], "TOKEN");
            assert_eq!(vm["secrets"][0]["hosts"], serde_json::json!(["api.test"]));
            let token = home.ok(&[
                "vm",
                "exec",
                "mcp-sec",
                "--",
                "sh",
                "-c",
                "printf %s \"$TOKEN\"",
            ]);
            assert!(token.starts_with("BANGER_PLACEHOLDER_TOKEN_"), "{token}");
            home.ok(&["vm", "delete", "--force", "mcp-sec"]);
            home.ok(&["secret", "rm", "TOKEN"]);
        },
    );

    phase(
        "--ephemeral: the VMs go when the client closes stdin",
        || {
            let mut c = client(&home, "ephemeral-exit", &["--ephemeral"]);
            let out = c.env("MCP_VM", "mcp-exit").output().expect("run python");
            assert!(out.status.success(), "{}", common::text(&out.stderr));
            common::wait_until(
                "the session's VM to be deleted",
                Duration::from_secs(60),
                || vm_names(&home).is_empty(),
            );
        },
    );

    phase(
        "--ephemeral: VMs go when the server is killed (SIGKILL), --max-vms refuses",
        || {
            let client = ephemeral_until_ready(&home, "mcp-kill");
            kill_mcp(&home, client);
            common::wait_until(
                "the daemon to delete the session's VM",
                Duration::from_secs(60),
                || vm_names(&home).is_empty(),
            );
            assert!(
                home.daemon_log()
                    .contains("session ended: deleting its VMs")
            );
        },
    );

    phase(
        "--ephemeral: a daemon killed with the session deletes its VMs when it restarts",
        || {
            let client = ephemeral_until_ready(&home, "mcp-restart");
            home.stop_daemon_and_helper();
            kill_mcp(&home, client);
            // The next command starts a daemon, which finds the VM's session gone.
            common::wait_until(
                "the new daemon to delete the session's VM",
                Duration::from_secs(60),
                || vm_names(&home).is_empty(),
            );
            assert!(
                home.daemon_log()
                    .contains("session ended with the last daemon")
            );
        },
    );
}

/// An `--ephemeral --max-vms 1` server whose client created VM `name` (and
/// was refused a second one), left running: the client's process.
fn ephemeral_until_ready(home: &TestHome, name: &str) -> Child {
    let mut child = client(home, "ephemeral", &["--ephemeral", "--max-vms", "1"])
        .env("MCP_VM", name)
        .stdout(Stdio::piped())
        .spawn()
        .expect("run python");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let ready = lines.find(|l| l.as_ref().is_ok_and(|l| l == "READY"));
    assert!(ready.is_some(), "the client did not get ready");
    assert_eq!(vm_names(home), [name]);
    child
}

/// SIGKILL the home's `banger mcp` server, then its client.
fn kill_mcp(home: &TestHome, mut client: Child) {
    let servers = home.processes("banger");
    assert_eq!(servers.len(), 1, "one banger mcp: {servers:?}");
    for pid in servers {
        Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status()
            .unwrap();
    }
    let _ = client.kill();
    let _ = client.wait();
}
