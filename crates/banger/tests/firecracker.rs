//! The Firecracker path end to end, against fc-double: a stand-in for the
//! firecracker binary that validates every API request against Firecracker's
//! own OpenAPI file and runs the real guest agent as a host process. (No
//! Firecracker can run on this machine kind; the QEMU tests boot real guests.)

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{
    STEPS, TestHome, fc_double_home as setup_home, is_alive, kill_9, on_start_path, text,
    wait_until,
};

fn setup() -> TestHome {
    setup_home(TestHome::in_netns())
}

#[test]
fn firecracker_lifecycle_against_the_spec_checking_double() {
    let home = setup();
    let out = home.run(&[
        "vm",
        "create",
        "--name",
        "fc1",
        "--image",
        "fcimg",
        "--vmm",
        "firecracker",
        "--no-ssh-wait",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "create failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let vm = home.json(&["vm", "show", "fc1"]);
    assert_eq!(vm["vmm"], "firecracker");
    assert_eq!(vm["state"], "running");
    let pid = vm["pid"].as_u64().unwrap() as u32;
    let dir = PathBuf::from(vm["vm_dir"].as_str().unwrap());
    // Firecracker takes raw disks only, never a qcow2 overlay: a snapshot
    // over root.cow where banger uses device-mapper, else a clone or sparse
    // copy, root.ext4 — as doctor reports for this host.
    let strategy = home.doctor_check("root_disks")["detail"]
        .as_str()
        .unwrap()
        .to_owned();
    let raw = if strategy.starts_with("device-mapper snapshots") {
        "root.cow"
    } else {
        "root.ext4"
    };
    assert!(dir.join(raw).is_file(), "{raw} with {strategy:?}");
    assert!(!dir.join("root.qcow2").exists());
    // Every request banger made passed the spec check (the double logs each one).
    let log = std::fs::read_to_string(dir.join("console.log")).unwrap();
    assert!(
        log.contains("PUT /actions") && !log.contains(" 400"),
        "{log}"
    );
    // The SSH keys went to the stand-in's file, never the host's.
    let keys = home.path().join(format!("guest-authorized_keys-{pid}"));
    assert!(std::fs::read_to_string(&keys).unwrap().contains("banger"));

    let out = home.run(&[
        "vm",
        "exec",
        "fc1",
        "--",
        "sh",
        "-c",
        "echo over-vsock; exit 3",
    ]);
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "over-vsock\n");

    // kill -9 of the daemon: the VM is found again through handles.json.
    let daemon = home.json(&["daemon", "status"])["pid"].as_u64().unwrap() as u32;
    Command::new("kill")
        .args(["-9", &daemon.to_string()])
        .status()
        .unwrap();
    wait_until("daemon death", Duration::from_secs(10), || {
        !is_alive(daemon)
    });
    home.wait_socket_closed();
    let vm = home.json(&["vm", "show", "fc1"]);
    assert_eq!(vm["state"], "running");
    assert_eq!(vm["pid"].as_u64(), Some(pid as u64));
    assert_eq!(
        String::from_utf8_lossy(
            &home
                .run(&["vm", "exec", "fc1", "--", "echo", "again"])
                .stdout
        ),
        "again\n"
    );

    let out = home.run(&["vm", "set", "fc1", "--vcpus", "3"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("stop it first"));

    // Pause is PATCH /vm: the stand-in's guest (its agent) stops with it.
    home.ok(&["vm", "pause", "fc1"]);
    assert_eq!(home.json(&["vm", "show", "fc1"])["state"], "paused");
    let out = home.run(&["vm", "exec", "fc1", "--", "true"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is paused"));
    let agents = home.processes("banger-agent");
    assert_eq!(agents.len(), 1);
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", agents[0])).unwrap();
    assert!(
        stat.rsplit_once(')')
            .unwrap()
            .1
            .trim_start()
            .starts_with('T'),
        "{stat}"
    );
    home.ok(&["vm", "resume", "fc1"]);
    let out = home.run(&["vm", "exec", "fc1", "--", "echo", "resumed"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "resumed\n");

    // Graceful stop is SendCtrlAltDel (after a resume: a paused guest
    // cannot power off): the double exits.
    home.ok(&["vm", "pause", "fc1"]);
    home.ok(&["vm", "stop", "fc1"]);
    wait_until("firecracker exit", Duration::from_secs(10), || {
        !is_alive(pid)
    });
    assert_eq!(home.json(&["vm", "show", "fc1"])["state"], "stopped");
    let log = std::fs::read_to_string(dir.join("console.log")).unwrap();
    assert_eq!(log.matches("PATCH /vm -> 204").count(), 4, "{log}");
    assert!(!log.contains(" 400"), "{log}");
    let out = home.run(&["vm", "set", "fc1", "--disk", "100"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("only grows"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = home.json(&[
        "vm", "set", "fc1", "--vcpus", "3", "--memory", "512", "--disk", "5000",
    ]);
    assert_eq!(
        (
            v["vcpus"].as_u64(),
            v["memory_mib"].as_u64(),
            v["disk_mib"].as_u64()
        ),
        (Some(3), Some(512), Some(5000))
    );
    assert_eq!(
        std::fs::metadata(dir.join("work.ext4")).unwrap().len(),
        5000 * 1024 * 1024
    );
    home.ok(&["vm", "start", "--no-ssh-wait", "fc1"]);
    assert_eq!(home.json(&["vm", "show", "fc1"])["state"], "running");

    let out = home.run(&[
        "vm",
        "run",
        "--image",
        "fcimg",
        "--vmm",
        "firecracker",
        "--",
        "echo",
        "one-shot",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "one-shot\n");

    home.ok(&["vm", "delete", "--force", "fc1"]);
    assert!(!dir.exists());
    assert!(home.json(&["vm", "list"]).as_array().unwrap().is_empty());
    assert!(home.processes("fc-double").is_empty());
    assert!(home.processes("banger-agent").is_empty());

    // The leak check finds nothing left by all of that, and does find what we plant.
    assert_eq!(home.json(&["gc", "--dry-run"]), serde_json::json!([]));
    let orphan = home.path().join("state/vms/0123456789ab");
    std::fs::create_dir_all(&orphan).unwrap();
    let leaks = home.json(&["gc", "--dry-run"]);
    assert_eq!(leaks.as_array().unwrap().len(), 1, "{leaks}");
    assert_eq!(leaks[0]["kind"], "vm_dir");
    assert!(orphan.exists(), "a dry run removes nothing");
    home.ok(&["gc"]);
    assert!(!orphan.exists());
    assert_eq!(home.json(&["gc", "--dry-run"]), serde_json::json!([]));
}

#[test]
fn two_installs_side_by_side_never_touch_each_other() {
    let a = setup();
    let b = setup_home(TestHome::beside(&a));
    // Both up, each with a VM of the same name.
    fc_create(&a, "keep");
    fc_create(&b, "keep");
    let (a_bridge, a_table) = a.host_names();
    let (b_bridge, b_table) = b.host_names();
    assert_ne!(a_bridge, b_bridge, "each install has a bridge of its own");
    assert_ne!(a_table, b_table, "and an nftables table of its own");
    let (av, bv) = (
        a.json(&["vm", "show", "keep"]),
        b.json(&["vm", "show", "keep"]),
    );
    assert_ne!(av["guest_ip"], bv["guest_ip"], "{av} {bv}");
    let ns = a.netns.clone().unwrap();
    // Rules as text without the counters' values (those move with traffic).
    let rules = |table: &str| {
        let out = Command::new("ip")
            .args(["netns", "exec", &ns, "nft", "list", "table", "inet", table])
            .output()
            .unwrap();
        assert!(out.status.success(), "nft list table {table}: {out:?}");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let mut words = text.split_whitespace();
        let mut kept = Vec::new();
        while let Some(w) = words.next() {
            if w == "packets" || w == "bytes" {
                words.next();
            } else {
                kept.push(w.to_owned());
            }
        }
        kept.join(" ")
    };
    let (a_rules, b_rules) = (rules(&a_table), rules(&b_table));

    // 20 create / delete cycles each, at the same time.
    std::thread::scope(|s| {
        for h in [&a, &b] {
            s.spawn(move || {
                for i in 0..20 {
                    fc_create(h, &format!("c{i}"));
                    h.ok(&["vm", "delete", "--force", &format!("c{i}")]);
                }
            });
        }
    });

    // Neither touched the other's: the kept VMs answer, on their own
    // bridges; each table is as it was; no helper named the other's objects.
    for (h, bridge, other) in [(&a, &a_bridge, &b), (&b, &b_bridge, &a)] {
        let out = h.run(&["vm", "exec", "keep", "--", "echo", "still here"]);
        assert_eq!(String::from_utf8_lossy(&out.stdout), "still here\n");
        let tap = h.json(&["vm", "show", "keep"])["tap"]
            .as_str()
            .unwrap()
            .to_owned();
        let taps = h.banger_taps();
        assert!(
            taps.iter()
                .any(|(t, br)| *t == tap && br.as_deref() == Some(bridge.as_str())),
            "{tap} on {bridge}: {taps:?}"
        );
        // Its guard is in its own install's table (what the leak checks
        // compare with the running VMs).
        assert!(
            h.nft_chains().contains(&format!("guard-{tap}")),
            "{:?}",
            h.nft_chains()
        );
        assert_eq!(h.json(&["gc", "--dry-run"]), serde_json::json!([]));
        let (other_bridge, other_table) = other.host_names();
        let log = h.helper_log();
        assert!(
            !log.contains(&other_bridge) && !log.contains(&other_table),
            "one install's helper touched the other's objects: {log}"
        );
    }
    // Asked straight (by root, which may act for any install a helper
    // serves), each helper refuses the other install's bridge and table.
    for (h, other) in [(&a, &b), (&b, &a)] {
        let (bridge, table) = other.host_names();
        for (method, params) in [
            ("net.remove_nat", serde_json::json!({"table": table})),
            ("net.delete_bridge", serde_json::json!({"name": bridge})),
            (
                "net.ensure_nat",
                serde_json::json!({"table": table, "subnet_cidr": "172.31.250.0/24", "bridge": bridge}),
            ),
            (
                "net.ensure_bridge",
                serde_json::json!({"name": bridge, "gateway_cidr": "172.31.250.1/24", "install": table}),
            ),
        ] {
            let answer = h.helper_call(method, params);
            assert_eq!(
                answer["error"]["code"], "permission_denied",
                "{method} of the other install's: {answer}"
            );
        }
    }
    assert_eq!(rules(&a_table), a_rules);
    assert_eq!(rules(&b_table), b_rules);
    for h in [&a, &b] {
        h.ok(&["vm", "delete", "--force", "keep"]);
        assert_no_leaks(h, "the side-by-side cycles");
    }
}

fn fc_create_args(name: &str) -> Vec<String> {
    [
        "vm",
        "create",
        "--name",
        name,
        "--image",
        "fcimg",
        "--vmm",
        "firecracker",
        "--no-ssh-wait",
    ]
    .map(String::from)
    .to_vec()
}

/// The leak check (shared with `gc` and `doctor`) finds nothing, and the
/// host agrees.
fn assert_no_leaks(home: &TestHome, after: &str) {
    home.assert_host_clean("fc-double", after);
}

#[test]
fn a_failure_at_every_create_step_rolls_back_everything() {
    let home = setup();
    for (i, step) in STEPS.iter().enumerate() {
        home.restart_daemon(Some(step));
        let name = format!("fault{i}");
        let out = home.banger().args(fc_create_args(&name)).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        if *step == "ssh ready" {
            // fc-double's stand-in guest runs no sshd, so these creates pass
            // --no-ssh-wait and have no ssh step: the fault never fires.
            // guests.rs injects it on QEMU.
            assert!(out.status.success(), "{step}: {stderr}");
            home.ok(&["vm", "delete", "--force", &name]);
            assert_no_leaks(&home, step);
            continue;
        }
        assert_eq!(out.status.code(), Some(1), "{step}: {stderr}");
        assert!(
            stderr.contains(&format!("injected fault after the {step} step"))
                && stderr.contains("(op-"),
            "{step}: {stderr}"
        );
        if *step == "image" {
            // Before the VM's row exists: nothing is recorded.
            let out = home.run(&["vm", "show", &name]);
            assert!(!out.status.success(), "{step}: a row was made");
            assert_no_leaks(&home, step);
            continue;
        }
        let vm = home.json(&["vm", "show", &name]);
        assert_eq!(vm["state"], "failed", "{step}: {vm}");
        assert!(
            vm["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("injected fault")),
            "{step}: {vm}"
        );
        common::assert_only_console_left(&vm, step);
        assert_no_leaks(&home, step);
        home.ok(&["vm", "delete", &name]);
    }
    // An unknown step is refused by name when the daemon starts.
    home.ok(&["daemon", "stop"]);
    let out = home
        .banger()
        .env("BANGER_FAULT_INJECT", "nosuch")
        .args(["daemon", "start"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        home.daemon_log().contains("\\\"nosuch\\\" is not a step")
            || String::from_utf8_lossy(&out.stderr).contains("is not a step"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `vm start` of a stopped VM failing at each of its steps: the VM is
/// `stopped` again with the error, keeps its disks, holds nothing else,
/// and starts once the fault is gone.
#[test]
fn a_failure_at_every_start_step_leaves_the_vm_stopped_and_nothing_held() {
    let home = setup();
    fc_create(&home, "st");
    home.ok(&["vm", "stop", "st"]);
    let vm = home.json(&["vm", "show", "st"]);
    let dir = PathBuf::from(vm["vm_dir"].as_str().unwrap());
    let disks: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            n.starts_with("root.") || n == "work.ext4"
        })
        .collect();
    assert_eq!(disks.len(), 2, "a root and a work disk: {disks:?}");
    let dm = home.root_disks_are_dm();
    for step in STEPS {
        // No ssh step with --no-ssh-wait (the double runs no sshd;
        // guests.rs covers it on QEMU).
        let on_path = on_start_path(step, dm) && step != "ssh ready";
        home.restart_daemon(Some(step));
        let out = home.run(&["vm", "start", "--no-ssh-wait", "st"]);
        let stderr = text(&out.stderr);
        if !on_path {
            assert!(out.status.success(), "{step} is not a start step: {stderr}");
            home.ok(&["vm", "stop", "st"]);
            assert_no_leaks(&home, &format!("start, then stop ({step} not on the path)"));
            continue;
        }
        assert_eq!(out.status.code(), Some(1), "{step}: {stderr}");
        assert!(
            stderr.contains(&format!("injected fault after the {step} step")),
            "{step}: {stderr}"
        );
        let vm = home.json(&["vm", "show", "st"]);
        assert_eq!(vm["state"], "stopped", "{step}: {vm}");
        assert!(
            vm["last_error"]
                .as_str()
                .is_some_and(|e| e.contains(&format!("injected fault after the {step} step"))),
            "{step}: {vm}"
        );
        assert_eq!(vm["pid"], serde_json::Value::Null, "{step}: {vm}");
        assert!(!dir.join("handles.json").exists(), "{step}");
        for d in &disks {
            assert!(
                d.is_file(),
                "{step}: start's rollback removed {}",
                d.display()
            );
        }
        assert_no_leaks(&home, &format!("a start failing after {step}"));
    }
    home.restart_daemon(None);
    home.ok(&["vm", "start", "--no-ssh-wait", "st"]);
    assert_eq!(
        home.json(&["vm", "show", "st"])["last_error"],
        serde_json::Value::Null
    );
    home.ok(&["vm", "delete", "--force", "st"]);
    assert_no_leaks(&home, "the start after the faults");
}

#[test]
fn twenty_parallel_creates_get_distinct_addresses_and_leave_nothing() {
    let home = setup();
    // The first call starts the daemon; the creates then race each other.
    home.ok(&["daemon", "start"]);
    let names: Vec<String> = (0..20).map(|i| format!("par{i}")).collect();
    all_succeed(&home, names.iter().map(|n| fc_create_args(n)).collect());
    let vms = home.json(&["vm", "list"]);
    let vms = vms.as_array().unwrap();
    assert_eq!(vms.len(), 20);
    for field in ["guest_ip", "mac", "vsock_cid", "tap"] {
        let mut seen: Vec<String> = vms.iter().map(|v| v[field].to_string()).collect();
        assert!(
            seen.iter().all(|v| v != "null"),
            "every VM has a {field}: {vms:?}"
        );
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 20, "duplicate {field}s: {vms:?}");
    }
    all_succeed(
        &home,
        names
            .iter()
            .map(|n| ["vm", "delete", "--force", n].map(String::from).to_vec())
            .collect(),
    );
    assert!(home.json(&["vm", "list"]).as_array().unwrap().is_empty());
    assert_no_leaks(&home, "20 parallel creates and deletes");
}

/// Run the banger commands all at once; every one must succeed.
fn all_succeed(home: &TestHome, commands: Vec<Vec<String>>) {
    let children: Vec<_> = commands
        .iter()
        .map(|args| {
            home.banger()
                .args(args)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for (args, child) in commands.iter().zip(children) {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "banger {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// `vm create` of a Firecracker VM `name` of the test image, which must
/// succeed.
fn fc_create(home: &TestHome, name: &str) {
    let args = fc_create_args(name);
    home.ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
}

/// Lets a paused step go on: the seam waits for this file, then removes it.
fn release_pause(home: &TestHome) {
    let release = home.path().join("run/fault-release");
    std::fs::write(&release, b"").unwrap();
    wait_until(
        "the daemon takes the release",
        Duration::from_secs(20),
        || !release.exists(),
    );
}

/// kill -9 of the daemon with a create, a start, a stop or a delete held
/// at each of its steps (the fault seam): the next daemon leaves no leak, loses no
/// VM that had a row, leases no address twice. Prints the matrix.
#[test]
fn kill_9_of_the_daemon_at_every_step_leaves_nothing() {
    let home = setup();
    let dm = home.root_disks_are_dm();
    // With --no-ssh-wait there is no ssh step (the double runs no sshd).
    let steps: Vec<&str> = STEPS
        .iter()
        .copied()
        .filter(|s| *s != "ssh ready")
        .chain(["vmm launched"])
        .collect();
    let mut rows = Vec::new();
    let mut kill_at = |op: &str, step: &str, name: &str, args: Vec<String>| {
        home.restart_daemon(Some(&format!("{step}:pause")));
        let daemon = home.daemon_pid();
        let child = home
            .banger()
            .args(args)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        home.wait_for_pause(step);
        kill_9(daemon);
        home.wait_socket_closed();
        let _ = child.wait_with_output().unwrap();
        // The next command starts a daemon without the seam, which reconciles.
        let vms = home.json(&["vm", "list"]);
        let vms = vms.as_array().unwrap();
        let state = vms
            .iter()
            .find(|v| v["name"] == name)
            .map_or("(no row)".to_owned(), |v| {
                v["state"].as_str().unwrap().to_owned()
            });
        let ips: Vec<&str> = vms.iter().filter_map(|v| v["guest_ip"].as_str()).collect();
        let unique: std::collections::BTreeSet<&&str> = ips.iter().collect();
        let leaks = home.json(&["gc", "--dry-run"]).as_array().unwrap().len();
        let vmms = home.processes("fc-double").len();
        rows.push((
            op.to_owned(),
            step.to_owned(),
            state.clone(),
            leaks,
            vmms,
            ips.len() - unique.len(),
        ));
        assert_no_leaks(
            &home,
            &format!("kill -9 of the daemon during {op} at {step}"),
        );
        state
    };
    for step in &steps {
        let state = kill_at("create", step, "mid", fc_create_args("mid"));
        // A create that had a row fails; one killed before its row has none.
        let want = if *step == "image" {
            "(no row)"
        } else {
            "failed"
        };
        assert_eq!(state, want, "create killed at {step}");
        if state == "failed" {
            let vm = home.json(&["vm", "show", "mid"]);
            assert!(
                vm["last_error"]
                    .as_str()
                    .unwrap()
                    .contains("daemon stopped while creating"),
                "{vm}"
            );
            home.ok(&["vm", "delete", "mid"]);
        }
    }
    home.restart_daemon(None);
    fc_create(&home, "st");
    home.ok(&["vm", "stop", "st"]);
    for step in steps.iter().filter(|s| on_start_path(s, dm)) {
        let args = ["vm", "start", "--no-ssh-wait", "st"]
            .map(String::from)
            .to_vec();
        let state = kill_at("start", step, "st", args);
        assert_eq!(state, "stopped", "start killed at {step}");
    }
    home.restart_daemon(None);
    home.ok(&["vm", "start", "--no-ssh-wait", "st"]);
    let state = kill_at(
        "stop",
        "stop",
        "st",
        ["vm", "stop", "st"].map(String::from).to_vec(),
    );
    assert_eq!(state, "stopped", "the guest was off when the daemon died");
    home.restart_daemon(None);
    let state = kill_at(
        "delete",
        "delete",
        "st",
        ["vm", "delete", "--force", "st"].map(String::from).to_vec(),
    );
    assert_eq!(state, "(no row)", "the next daemon finishes a delete");
    assert!(
        home.daemon_log()
            .contains("reconcile: finishing an unfinished delete")
    );

    eprintln!("kill -9 of the daemon, by operation and step (after the next daemon's reconcile):");
    eprintln!(
        "  {:<7} {:<13} {:<9} {:>5} {:>5} {:>10}",
        "op", "step", "state", "leaks", "VMMs", "dup leases"
    );
    for (op, step, state, leaks, vmms, dup) in &rows {
        eprintln!("  {op:<7} {step:<13} {state:<9} {leaks:>5} {vmms:>5} {dup:>10}");
    }
}

/// A home whose creates need the helper for their tap: no warm pool.
fn setup_without_tap_pool() -> TestHome {
    let home = setup();
    let config = home.path().join("config.toml");
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str("[network]\ntap_pool = 0\n");
    std::fs::write(&config, text).unwrap();
    home
}

/// Start this home's daemon afresh, and so its helper, with the helper's
/// test seam set: the daemon starts the helper, which inherits it.
fn restart_with_helper_fault(home: &TestHome, fault: &str) {
    home.stop_daemon_and_helper();
    let out = home
        .banger()
        .env("BANGER_HELPER_FAULT", fault)
        .args(["daemon", "start"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
}

/// Wait for the helper to log that it holds `method` half done.
fn wait_for_helper_pause(home: &TestHome, method: &str) {
    wait_until(
        &format!("the helper pausing in {method}"),
        Duration::from_secs(20),
        || {
            home.helper_log().lines().any(|l| {
                l.contains("fault injection: pausing in this method")
                    && l.contains(&format!("\"method\":\"{method}\""))
            })
        },
    );
}

/// The one helper of this home.
fn helper_pid(home: &TestHome) -> u32 {
    let helpers = home.processes("banger-helper");
    assert_eq!(helpers.len(), 1, "{helpers:?}");
    helpers[0]
}

/// kill -9 of the helper in the middle of a method a create needs: the
/// create fails cleanly, a new helper is started, and no half-made device
/// is left (the pool is off, so the create cannot get its tap elsewhere).
#[test]
fn kill_9_of_the_helper_mid_method_leaves_no_half_made_device() {
    let home = setup_without_tap_pool();

    // Mid `net.create_tap`: the tap exists but is not on the bridge.
    restart_with_helper_fault(&home, "net.create_tap:pause");
    let create = home
        .banger()
        .args(fc_create_args("midtap"))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_helper_pause(&home, "net.create_tap");
    let taps = home.banger_taps();
    assert!(
        matches!(&taps[..], [(_, None)]),
        "one half-made tap, off the bridge: {taps:?}"
    );
    let old = helper_pid(&home);
    kill_9(old);
    let out = create.wait_with_output().unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("banger-helper") && stderr.contains("(op-"),
        "{stderr}"
    );
    let vm = home.json(&["vm", "show", "midtap"]);
    assert_eq!(vm["state"], "failed", "{vm}");
    // The half-made tap was deleted, through a new helper.
    assert_eq!(home.banger_taps(), [], "the half-made tap is gone");
    assert_ne!(helper_pid(&home), old, "a new helper");
    assert_no_leaks(&home, "kill -9 of the helper in net.create_tap");
    home.ok(&["vm", "delete", "midtap"]);

    // Mid `disk.snapshot_create`, where root disks are dm snapshots.
    let strategy = home.doctor_check("root_disks")["detail"]
        .as_str()
        .unwrap()
        .to_owned();
    let logged = home.helper_log().len();
    restart_with_helper_fault(&home, "disk.snapshot_create:pause");
    if strategy.starts_with("device-mapper snapshots") {
        let create = home
            .banger()
            .args(fc_create_args("midsnap"))
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        wait_for_helper_pause(&home, "disk.snapshot_create");
        // Both loop devices attached, no snapshot yet.
        assert_eq!(home.loop_devices().len(), 2, "{:?}", home.loop_devices());
        let old = helper_pid(&home);
        kill_9(old);
        let out = create.wait_with_output().unwrap();
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains("banger-helper"), "{stderr}");
        let vm = home.json(&["vm", "show", "midsnap"]);
        assert_eq!(vm["state"], "failed", "{vm}");
        // The rollback's disk.snapshot_remove, in a new helper, swept the loops.
        assert_ne!(helper_pid(&home), old, "a new helper");
        assert!(
            !Path::new(&format!("/dev/mapper/bg-{}", vm["id"].as_str().unwrap())).exists(),
            "a half-made snapshot is left"
        );
        assert_no_leaks(&home, "kill -9 of the helper in disk.snapshot_create");
        home.ok(&["vm", "delete", "midsnap"]);
    } else {
        // No device-mapper here (no /dev/mapper/control on this machine
        // kind): root disks are files, so a create never calls
        // disk.snapshot_create and is never held in it.
        eprintln!("root disks here: {strategy}; asserting no create calls disk.snapshot_create");
        assert!(
            !Path::new("/dev/mapper/control").exists()
                || not_in_path("dmsetup")
                || not_in_path("losetup"),
            "this host has device-mapper, yet root disks are {strategy:?}"
        );
        fc_create(&home, "files");
        let log = home.helper_log().split_off(logged);
        assert!(
            log.contains("fault injection is on"),
            "the seam is set: {log}"
        );
        assert!(
            !log.contains("\"span\":{\"method\":\"disk.snapshot_create\"")
                && !log.contains("pausing in this method"),
            "{log}"
        );
        assert!(home.loop_devices().is_empty());
        home.ok(&["vm", "delete", "--force", "files"]);
        assert_no_leaks(&home, "a create with file root disks");
    }
}

/// `name` is not in `PATH`.
fn not_in_path(name: &str) -> bool {
    !std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
}

/// The leak check compares the bridge's taps with the exact set the TAP
/// pool recorded, also before the pool starts again after a restart: a
/// tap no VM and no pool holds is reported, however few there are.
#[test]
fn a_leaked_tap_is_reported_after_a_daemon_restart() {
    let home = setup();
    fc_create(&home, "t1");
    home.ok(&["vm", "delete", "--force", "t1"]);
    let (bridge, _) = home.host_names();
    wait_until("a full pool", Duration::from_secs(20), || {
        let taps = home.banger_taps();
        taps.len() == 2
            && taps
                .iter()
                .all(|(_, b)| b.as_deref() == Some(bridge.as_str()))
    });
    // A new daemon: its pool has not started, its record is the last pool's.
    home.restart_daemon(None);
    assert_no_leaks(&home, "a restart");
    // A tap on the bridge named like banger's, as a VM that lost track of
    // its tap leaves it.
    let ns = home.netns.clone().unwrap();
    for args in [
        &["tuntap", "add", "dev", "bg-leak", "mode", "tap"][..],
        &["link", "set", "bg-leak", "master", &bridge, "up"],
    ] {
        let st = Command::new("ip")
            .args(["-n", &ns])
            .args(args)
            .status()
            .unwrap();
        assert!(st.success(), "ip {args:?}");
    }
    let leaks = home.json(&["gc", "--dry-run"]);
    assert_eq!(
        leaks,
        serde_json::json!([{
            "kind": "tap",
            "name": "bg-leak",
            "detail": "on banger's bridge; no VM or pool holds it"
        }]),
        "the pool holds {:?}",
        home.pool_record()
    );
    home.ok(&["gc"]);
    assert!(!home.banger_taps().iter().any(|(t, _)| t == "bg-leak"));
    assert_no_leaks(&home, "gc");
    // The new pool adopts the recorded taps: the next create needs no new one.
    let pool = home.pool_record();
    fc_create(&home, "t2");
    let tap = home.json(&["vm", "show", "t2"])["tap"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(pool.contains(&tap), "{tap} is not one of {pool:?}");
    home.ok(&["vm", "delete", "--force", "t2"]);
    assert_no_leaks(&home, "a create after the restart");
}

#[test]
fn images_are_shown_promoted_and_deleted_only_when_unused() {
    let home = setup();
    let img = home.path().join("img");
    let p = |f: &str| img.join(f).display().to_string();
    home.ok(&[
        "image",
        "register",
        "second",
        "--vmlinux",
        &p("vmlinux"),
        "--initrd",
        &p("initrd.img"),
        "--rootfs",
        &p("rootfs.ext4"),
        "--work-seed",
        &p("work-seed.ext4"),
        "--init",
        "systemd",
    ]);
    let shown = home.json(&["image", "show", "second"]);
    assert_eq!(shown["state"], "ready");
    assert_eq!(shown["default_init"], "systemd");
    assert!(shown["source"].as_str().unwrap().starts_with("register:"));
    assert!(shown["size_bytes"].as_u64().unwrap() > 0);

    // Exactly one default at a time.
    let defaults = |home: &TestHome| -> Vec<String> {
        home.json(&["image", "list"])
            .as_array()
            .unwrap()
            .iter()
            .filter(|i| i["is_default"] == true)
            .map(|i| i["name"].as_str().unwrap().to_string())
            .collect()
    };
    home.ok(&["image", "promote", "fcimg"]);
    assert_eq!(defaults(&home), ["fcimg"]);
    home.ok(&["image", "promote", "second"]);
    assert_eq!(defaults(&home), ["second"]);

    // In use by a VM: deleting is refused, naming the VM.
    home.ok(&[
        "vm",
        "create",
        "--name",
        "user",
        "--image",
        "second",
        "--vmm",
        "firecracker",
        "--no-ssh-wait",
    ]);
    let out = home.run(&["image", "delete", "second"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("user") && err.contains("(op-"), "{err}");
    home.ok(&["vm", "delete", "--force", "user"]);
    home.ok(&["image", "delete", "second"]);
    let out = home.run(&["image", "show", "second"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("second"));
    // A registered image's files are not banger's: they stay.
    assert!(img.join("rootfs.ext4").is_file());
    assert_no_leaks(&home, "image management");
}

/// SIGINT to a CLI, as Ctrl-C in its terminal sends, then wait for it to go.
fn ctrl_c(child: std::process::Child) -> std::process::Output {
    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    child.wait_with_output().unwrap()
}

fn vm_state(home: &TestHome, name: &str) -> String {
    home.json(&["vm", "show", name])["state"]
        .as_str()
        .unwrap()
        .to_string()
}

/// The VM's row comes to say `want`, and the host agrees: one VMM while
/// running, none otherwise.
fn row_and_host_agree(home: &TestHome, name: &str, want: &str, after: &str) {
    wait_until(
        &format!("{name} {want} after {after}"),
        Duration::from_secs(30),
        || vm_state(home, name) == want,
    );
    let vmms = home.processes("fc-double");
    let expected = usize::from(want == "running");
    assert_eq!(
        vmms.len(),
        expected,
        "{after}: VMMs {vmms:?} for a {want} VM"
    );
}

#[test]
fn ctrl_c_during_start_stop_and_delete_leaves_the_row_and_the_host_agreeing() {
    let home = setup();
    fc_create(&home, "cc");
    home.ok(&["vm", "stop", "cc"]);
    // `vm start` cut short at each of its steps: the start finishes anyway.
    for step in ["network", "vmm start", "kernel boot", "agent ready"] {
        home.restart_daemon(Some(&format!("{step}:pause")));
        let start = home
            .banger_interruptible()
            .args(["vm", "start", "cc", "--no-ssh-wait"])
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        home.wait_for_pause(step);
        let out = ctrl_c(start);
        assert!(!out.status.success(), "{step}: the CLI was interrupted");
        release_pause(&home);
        row_and_host_agree(&home, "cc", "running", &format!("Ctrl-C at {step}"));
        // A second start of the running VM is refused: never a second VMM.
        let again = home.run(&["vm", "start", "cc", "--no-ssh-wait"]);
        assert!(!again.status.success(), "{step}: a second start succeeded");
        assert!(
            String::from_utf8_lossy(&again.stderr).contains("is running"),
            "{step}: {}",
            String::from_utf8_lossy(&again.stderr)
        );
        assert_eq!(home.processes("fc-double").len(), 1, "{step}");
        home.ok(&["vm", "stop", "cc"]);
        row_and_host_agree(&home, "cc", "stopped", &format!("stop after {step}"));
    }
    // `vm stop` cut short: the stop finishes.
    home.restart_daemon(None);
    home.ok(&["vm", "start", "cc", "--no-ssh-wait"]);
    let stop = home
        .banger_interruptible()
        .args(["vm", "stop", "cc"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(150));
    ctrl_c(stop);
    row_and_host_agree(&home, "cc", "stopped", "Ctrl-C during stop");
    // `vm delete` cut short after the row is marked deleting: the delete
    // finishes, leaving nothing.
    home.ok(&["vm", "start", "cc", "--no-ssh-wait"]);
    home.restart_daemon(Some("delete:pause"));
    let delete = home
        .banger_interruptible()
        .args(["vm", "delete", "--force", "cc"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    home.wait_for_pause("delete");
    ctrl_c(delete);
    release_pause(&home);
    wait_until("the delete finishes", Duration::from_secs(30), || {
        home.json(&["vm", "list"]).as_array().unwrap().is_empty()
    });
    assert_no_leaks(&home, "Ctrl-C during delete");
}

/// Waits for a banger command to end, failing (and killing it) if it is
/// still there after `bound`: a wedged operation fails the test instead of
/// hanging it. The bound is generous; it decides "ends at all", not speed.
fn finishes(what: &str, mut child: std::process::Child, bound: Duration) -> std::process::Output {
    let deadline = std::time::Instant::now() + bound;
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "{what} did not end within {}s (wedged): {}",
                bound.as_secs(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

fn signal(sig: &str, pid: u32) {
    let st = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success(), "kill {sig} {pid}");
}

/// The one stand-in guest's agent (the double runs it as a host process).
fn the_agent(home: &TestHome) -> u32 {
    let agents = home.processes("banger-agent");
    assert_eq!(agents.len(), 1, "{agents:?}");
    agents[0]
}

#[test]
fn a_stopped_agent_gets_clear_timeouts_and_wedges_nothing() {
    let home = setup();
    let banger = |args: &[&str]| {
        home.banger()
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    // Longer than the agent's call deadline, far shorter than forever.
    let bound = Duration::from_secs(120);

    // The agent stops between its handshake and the key push: the create
    // fails with a timeout and rolls back.
    home.restart_daemon(Some("kernel boot:pause"));
    let create = home
        .banger()
        .args(fc_create_args("hung"))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    home.wait_for_pause("kernel boot");
    signal("-STOP", the_agent(&home));
    release_pause(&home);
    let out = finishes("a create whose agent stopped", create, bound);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("did not answer") && err.contains("hung"),
        "{err}"
    );
    assert_eq!(vm_state(&home, "hung"), "failed");
    assert_no_leaks(&home, "a create whose agent stopped");
    home.ok(&["vm", "delete", "hung"]);

    // A running guest whose agent stops: each call fails within its
    // deadline, naming the VM and what to do; the VM still stops, and
    // nothing stays busy.
    home.restart_daemon(None);
    fc_create(&home, "frozen");
    let agent = the_agent(&home);
    signal("-STOP", agent);
    for args in [
        &["vm", "ports", "frozen"][..],
        &["vm", "stats", "frozen"],
        &["vm", "exec", "frozen", "--", "true"],
        &["vm", "authsync", "frozen"],
    ] {
        let out = finishes(&format!("banger {args:?}"), banger(args), bound);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert!(
            err.contains("\"frozen\"") && err.contains("did not answer") && err.contains("vm stop"),
            "{args:?}: {err}"
        );
    }
    let out = finishes("vm stop", banger(&["vm", "stop", "frozen"]), bound);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(vm_state(&home, "frozen"), "stopped");
    assert!(!is_alive(agent), "the stopped agent went with its VM");
    home.ok(&["vm", "start", "--no-ssh-wait", "frozen"]);
    assert_eq!(
        String::from_utf8_lossy(
            &home
                .run(&["vm", "exec", "frozen", "--", "echo", "ok"])
                .stdout
        ),
        "ok\n"
    );
    home.ok(&["vm", "delete", "--force", "frozen"]);
    assert_no_leaks(&home, "a stopped agent");
}

#[test]
fn failed_creates_release_their_addresses() {
    let home = setup();
    // A /29: five guest addresses besides the bridge's.
    let config = home.path().join("config.toml");
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str("[network]\nsubnet = \"10.213.77.0/29\"\n");
    std::fs::write(&config, text).unwrap();
    // More failed creates than addresses, each failing after its row (the
    // lease) was made.
    home.restart_daemon(Some("allocate"));
    for i in 0..7 {
        let name = format!("doomed{i}");
        let out = home.banger().args(fc_create_args(&name)).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("injected fault after the allocate step"),
            "{name}: {err}"
        );
        let vm = home.json(&["vm", "show", &name]);
        assert_eq!(vm["state"], "failed", "{vm}");
        for lease in ["guest_ip", "mac", "vsock_cid"] {
            assert!(vm[lease].is_null(), "a failed VM keeps its {lease}: {vm}");
        }
    }
    home.restart_daemon(None);
    fc_create(&home, "lives");
    let vm = home.json(&["vm", "show", "lives"]);
    assert_eq!(vm["state"], "running", "{vm}");
    assert_eq!(vm["guest_ip"], "10.213.77.2", "{vm}");
    home.ok(&["vm", "delete", "--force", "lives"]);
    for i in 0..7 {
        home.ok(&["vm", "delete", &format!("doomed{i}")]);
    }
    assert_no_leaks(&home, "failed creates");
}

/// The tap's guard is made while the VMM starts: a guard that fails then
/// (here: the NAT table deleted under the daemon) fails the create with
/// the helper's reason, and the VMM already started is stopped.
#[test]
fn a_guard_that_fails_while_the_vmm_starts_stops_it_and_leaves_nothing() {
    let home = setup();
    fc_create(&home, "before");
    let (_, table) = home.host_names();
    let ns = home.netns.clone().unwrap();
    common::ip(&[
        "netns", "exec", &ns, "nft", "delete", "table", "inet", &table,
    ]);
    let out = home
        .banger()
        .args(fc_create_args("unguarded"))
        .arg("--json")
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("nftables table inet {table} does not exist"))
            && stderr.contains("(op-"),
        "{stderr}"
    );
    let vm = home.json(&["vm", "show", "unguarded"]);
    assert_eq!(vm["state"], "failed", "{vm}");
    // Its VMM had started: the guard failed in the wait for it.
    let done: Vec<String> = text(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|l| l["event"]["status"] == "done")
        .filter_map(|l| l["event"]["stage"].as_str().map(str::to_owned))
        .collect();
    assert!(done.iter().any(|s| s == "vmm start"), "{done:?}");
    assert_eq!(
        home.processes("fc-double").len(),
        1,
        "only the VM made before runs"
    );
    // A new daemon makes the table again; then nothing is left.
    home.restart_daemon(None);
    home.ok(&["vm", "delete", "--force", "before"]);
    home.ok(&["vm", "delete", "unguarded"]);
    assert_no_leaks(&home, "a failed guard");
}

#[test]
fn kill_9_after_the_vmm_starts_but_before_its_handles_are_written_leaves_nothing() {
    let home = setup();
    // Create and start, each held with its VMM running and handles.json
    // not yet written; the daemon dies there.
    fc_create(&home, "restarted");
    home.ok(&["vm", "stop", "restarted"]);
    for (what, args) in [
        ("create", fc_create_args("fresh")),
        (
            "start",
            ["vm", "start", "--no-ssh-wait", "restarted"]
                .map(String::from)
                .to_vec(),
        ),
    ] {
        home.restart_daemon(Some("vmm launched:pause"));
        let daemon = home.daemon_pid();
        // The daemon log goes on across daemons: wait for this one's pause.
        let pauses = |home: &TestHome| {
            home.daemon_log()
                .lines()
                .filter(|l| l.contains("fault injection: pausing after this step"))
                .count()
        };
        let before = pauses(&home);
        let op = home
            .banger()
            .args(&args)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        wait_until(
            "the pause after vmm launched",
            Duration::from_secs(20),
            || pauses(&home) > before,
        );
        assert_eq!(home.processes("fc-double").len(), 1, "{what}");
        kill_9(daemon);
        home.wait_socket_closed();
        let _ = op.wait_with_output().unwrap();
        // The next daemon (started by this call) finds the VMM by what the
        // launch recorded before it, and ends it.
        let list = home.json(&["vm", "list"]);
        let state = |name: &str| {
            list.as_array()
                .unwrap()
                .iter()
                .find(|v| v["name"] == name)
                .map(|v| v["state"].clone())
        };
        match what {
            "create" => assert_eq!(state("fresh"), Some("failed".into()), "{list}"),
            _ => assert_eq!(state("restarted"), Some("stopped".into()), "{list}"),
        }
        assert_no_leaks(&home, &format!("kill -9 of the daemon mid {what}"));
    }
    home.restart_daemon(None);
    home.ok(&["vm", "start", "--no-ssh-wait", "restarted"]);
    home.ok(&["vm", "delete", "--force", "restarted"]);
    home.ok(&["vm", "delete", "fresh"]);
    assert_no_leaks(&home, "the VMs' deletes");
}

/// The files the Firecracker process `pid` holds open under `dir`.
fn open_files_under(pid: u32, dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter(|p| p.starts_with(dir))
        .collect()
}

#[test]
fn firecracker_snapshots_restores_and_forks_against_the_double() {
    let home = setup();
    let host_name = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let host_machine_id = std::fs::read_to_string("/etc/machine-id").unwrap_or_default();
    fc_create(&home, "src");
    let src = home.json(&["vm", "show", "src"]);

    // A snapshot is PUT /snapshot/create of the paused VM; the VM runs on.
    home.ok(&["vm", "snapshot", "src", "--name", "s1", "-q"]);
    let snap = home.json(&["snapshot", "show", "s1"]);
    assert_eq!(snap["vmm"], "firecracker");
    assert_eq!(snap["memory"], "file");
    assert!(
        snap["vmm_version"]
            .as_str()
            .unwrap()
            .starts_with("Firecracker v"),
        "{snap}"
    );
    let snap_dir = PathBuf::from(snap["dir"].as_str().unwrap());
    let memory = std::fs::metadata(snap_dir.join("memory.ram")).unwrap();
    assert_eq!(
        memory.len(),
        src["memory_mib"].as_u64().unwrap() << 20,
        "the guest's memory, as Firecracker wrote it"
    );
    for f in ["state.bin", "root.ext4", "work.ext4"] {
        assert!(snap_dir.join(f).is_file(), "{f}");
    }
    assert_eq!(home.json(&["vm", "show", "src"])["state"], "running");
    let src_dir = PathBuf::from(src["vm_dir"].as_str().unwrap());
    let log = std::fs::read_to_string(src_dir.join("console.log")).unwrap();
    assert!(
        log.contains("PATCH /vm -> 204")
            && log.contains("PUT /snapshot/create -> 204")
            && !log.contains(" 400"),
        "{log}"
    );

    // A restore loads it into a fresh process, on disks of its own.
    home.ok(&[
        "vm",
        "create",
        "--from",
        "s1",
        "--name",
        "r1",
        "--no-ssh-wait",
    ]);
    let r1 = home.json(&["vm", "show", "r1"]);
    assert_eq!(r1["state"], "running");
    assert_eq!(r1["vmm"], "firecracker");
    assert_ne!(r1["guest_ip"], src["guest_ip"]);
    assert_ne!(r1["mac"], src["mac"]);
    let r1_dir = PathBuf::from(r1["vm_dir"].as_str().unwrap());
    let log = std::fs::read_to_string(r1_dir.join("console.log")).unwrap();
    assert!(
        log.contains("PUT /snapshot/load -> 204")
            && !log.contains("/boot-source")
            && !log.contains(" 400"),
        "{log}"
    );
    // The drives the snapshot recorded (relative to the VM dir) are r1's
    // own copies, never the source's nor the snapshot's.
    let pid = r1["pid"].as_u64().unwrap() as u32;
    let held = open_files_under(pid, home.path());
    assert!(
        held.contains(&r1_dir.join("root.ext4")) && held.contains(&r1_dir.join("work.ext4")),
        "{held:?}"
    );
    assert!(
        !held
            .iter()
            .any(|p| p.starts_with(&src_dir) || p.starts_with(&snap_dir)),
        "{held:?}"
    );

    // The restored guest was given its identity: hostname, address, MAC,
    // machine-id, and its clock stepped to the host's.
    let sh = |vm: &str, cmd: &str| home.ok(&["vm", "exec", vm, "--", "sh", "-c", cmd]);
    assert_eq!(sh("r1", "hostname").trim(), "r1");
    let addr = sh("r1", "ip -br addr show eth0; ip -br link show eth0");
    assert!(
        addr.contains(r1["guest_ip"].as_str().unwrap())
            && addr.contains(r1["mac"].as_str().unwrap()),
        "{addr}"
    );
    let r1_machine_id = sh("r1", "cat /etc/machine-id");
    assert_ne!(r1_machine_id, host_machine_id);
    let clock = std::fs::read_to_string(r1_dir.join("fc-double-guest-date")).unwrap();
    let stepped: u64 = clock
        .trim()
        .rsplit('@')
        .next()
        .unwrap()
        .parse()
        .unwrap_or_else(|_| panic!("{clock:?}"));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(now.abs_diff(stepped) < 120, "{clock:?} at {now}");
    // ... and none of it reached the host.
    assert_eq!(
        std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap(),
        host_name
    );
    assert_eq!(
        std::fs::read_to_string("/etc/machine-id").unwrap_or_default(),
        host_machine_id
    );

    // A fork: a snapshot and restores, each with its own identity.
    let out = home.ok(&[
        "vm",
        "fork",
        "src",
        "--count",
        "2",
        "--name",
        "f",
        "--no-ssh-wait",
        "-q",
        "--json",
    ]);
    let last = out.lines().last().expect("a result line");
    let forks =
        serde_json::from_str::<serde_json::Value>(last).expect("JSON")["result"]["vms"].clone();
    // Each restore's stages name their fork, and each fork's run through
    // the restore steps once, each started stage ended (the two run at
    // once: untracked, one's stage ended the other's).
    let events: Vec<serde_json::Value> = out
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|l| l.get("event").cloned())
        .collect();
    for f in ["f-1", "f-2"] {
        let of = |status: &str| -> Vec<String> {
            events
                .iter()
                .filter(|e| e["vm"] == f && e["status"] == status)
                .map(|e| e["stage"].as_str().unwrap().to_owned())
                .collect()
        };
        let (started, done) = (of("started"), of("done"));
        assert!(
            started.iter().any(|s| s == "restore state"),
            "{f}: {events:?}"
        );
        assert_eq!(started, done, "{f}: {events:?}");
    }
    let ips: std::collections::BTreeSet<String> = forks
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["guest_ip"].as_str().unwrap().to_owned())
        .chain([
            src["guest_ip"].as_str().unwrap().to_owned(),
            r1["guest_ip"].as_str().unwrap().to_owned(),
        ])
        .collect();
    assert_eq!(ips.len(), 4, "{forks}");
    for f in ["f-1", "f-2"] {
        assert_eq!(sh(f, "hostname").trim(), f);
        assert_ne!(sh(f, "cat /etc/machine-id"), r1_machine_id);
    }

    // Another Firecracker's snapshot is refused, naming both versions.
    let db = rusqlite::Connection::open(home.path().join("state/banger.db")).unwrap();
    db.execute(
        "UPDATE snapshots SET vmm_version = 'Firecracker v0.9.0' WHERE name = 's1'",
        [],
    )
    .unwrap();
    let out = home.run(&["vm", "create", "--from", "s1", "--name", "r2"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("Firecracker v0.9.0")
            && err.contains("boot a new VM"),
        "{err}"
    );
    assert_eq!(
        home.json(&["gc", "--dry-run"]),
        serde_json::json!([]),
        "leaks after a refused restore"
    );
    assert!(
        !home.run(&["vm", "show", "r2"]).status.success(),
        "the refused restore left no VM"
    );
    assert_eq!(
        home.processes("fc-double").len(),
        4,
        "src, r1 and two forks: the refused restore started none"
    );

    let out = home.run(&["snapshot", "delete", "s1"]);
    assert!(!out.status.success(), "r1 is restored from it");
    for vm in ["r1", "src"] {
        home.ok(&["vm", "delete", "--force", vm]);
    }
    home.ok(&["snapshot", "delete", "s1"]);
    for s in home.json(&["snapshot", "list"]).as_array().unwrap() {
        let name = s["name"].as_str().unwrap();
        for vm in s["used_by"].as_array().unwrap() {
            home.ok(&["vm", "delete", "--force", vm.as_str().unwrap()]);
        }
        home.ok(&["snapshot", "delete", name]);
    }
    assert_no_leaks(&home, "the VMs' and snapshots' deletes");
}
