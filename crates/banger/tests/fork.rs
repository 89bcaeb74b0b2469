//! `vm fork`: a running QEMU guest snapshotted and restored N times, each
//! fork running on independently with its own identity; and what a failed
//! or cut-short fork leaves (nothing half-made). Real TCG guests in a
//! network namespace of their own (see `common::TestHome`).

mod common;

use std::time::{Duration, Instant};

use common::{
    TestHome, counter, keeps_counting, kill_9, phase, snapshot_names, start_counter, vm_names,
};

/// What identifies a guest from inside: hostname, MAC, machine-id, 16
/// random bytes, the sshd host key.
fn identity(home: &TestHome, vm: &str) -> Vec<String> {
    let out = home.ok(&[
        "vm",
        "exec",
        vm,
        "--",
        "sh",
        "-c",
        "hostname; cat /sys/class/net/eth0/address; echo \"$(cat /etc/machine-id 2> /dev/null)\"; \
         head -c16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; \
         cut -d' ' -f2 /etc/ssh/ssh_host_ed25519_key.pub",
    ]);
    let lines: Vec<String> = out.lines().map(str::to_owned).collect();
    assert_eq!(lines.len(), 5, "{vm}: {out}");
    lines
}

#[test]
fn forks_run_on_independently_each_as_itself() {
    let home = TestHome::in_netns();
    phase("the default image (built once per machine)", || {
        common::shared_default_image(&home);
    });
    phase("a VM counting in memory, with no perl", || {
        home.ok(&["vm", "create", "--name", "src", "-q"]);
        start_counter(&home, "src");
        // Forks reseed their random generator through the agent, which
        // every image has; perl is not in every image.
        home.ok(&[
            "vm",
            "exec",
            "src",
            "--",
            "mv",
            "/usr/bin/perl",
            "/usr/bin/perl.off",
        ]);
    });
    let src_id = identity(&home, "src");

    let started = Instant::now();
    let out = home.ok(&[
        "vm", "fork", "src", "--count", "3", "--name", "f", "-q", "--json",
    ]);
    let forked = started.elapsed();
    let result: serde_json::Value =
        serde_json::from_str(out.lines().last().expect("a result line")).expect("JSON");
    let result = &result["result"];
    let forks = ["f-1", "f-2", "f-3"];
    phase(
        "three forks, each running, and their snapshot listed",
        || {
            let names: Vec<&str> = result["vms"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v["name"].as_str().unwrap())
                .collect();
            assert_eq!(names, forks);
            assert_eq!(result["snapshot"]["source_vm"], "src");
            let snap = result["snapshot"]["name"].as_str().unwrap();
            assert_eq!(snapshot_names(&home), [snap]);
            for f in forks {
                assert_eq!(home.json(&["vm", "show", f])["state"], "running");
            }
        },
    );

    phase(
        "each fork counts on from the snapshot, independently",
        || {
            for f in forks {
                assert!(keeps_counting(&home, f) > 1, "{f} counts from zero");
            }
            keeps_counting(&home, "src");
        },
    );

    phase(
        "each fork is itself: addresses, name, machine-id, RNG, host key",
        || {
            let ids: Vec<Vec<String>> = forks.iter().map(|f| identity(&home, f)).collect();
            let mut all = vec![src_id.clone()];
            all.extend(ids.iter().cloned());
            for (i, f) in forks.iter().enumerate() {
                let shown = home.json(&["vm", "show", f]);
                assert_eq!(ids[i][0], *f, "hostname of {f}");
                assert_eq!(ids[i][1], shown["mac"].as_str().unwrap(), "MAC of {f}");
                assert_eq!(ids[i][2].len(), 32, "machine-id of {f}: {:?}", ids[i]);
                assert_eq!(ids[i][3].len(), 32, "{f}: {:?}", ids[i]);
            }
            // Every restore reseeded its random generator before making
            // keys (a reseed that fails leaves a warning in the log, and
            // forks that may share keys).
            assert!(
                !home.daemon_log().contains("cannot reseed"),
                "a fork's random generator was not reseeded"
            );
            for field in 0..5 {
                let mut seen: Vec<&str> = all.iter().map(|id| id[field].as_str()).collect();
                seen.sort_unstable();
                seen.dedup();
                assert_eq!(seen.len(), all.len(), "field {field} shared: {all:?}");
            }
            let ips: Vec<String> = ["src", "f-1", "f-2", "f-3"]
                .iter()
                .map(|v| {
                    home.json(&["vm", "show", v])["guest_ip"]
                        .as_str()
                        .unwrap()
                        .to_owned()
                })
                .collect();
            let mut distinct = ips.clone();
            distinct.sort();
            distinct.dedup();
            assert_eq!(distinct.len(), 4, "{ips:?}");
            let inet = home.ok(&[
                "vm", "exec", "f-2", "--", "ip", "-4", "-o", "addr", "show", "dev", "eth0",
            ]);
            assert!(inet.contains(&format!("inet {}/", ips[2])), "{inet}");
            // Forks find each other by name (banger's DNS; traffic between
            // guests stays dropped by the bridge's rules).
            let found = home.ok(&["vm", "exec", "f-1", "--", "getent", "hosts", "f-3.vm"]);
            assert!(found.starts_with(&format!("{} ", ips[3])), "{found}");
            // New host keys, and `vm ssh` reaches the fork.
            assert_eq!(
                home.ok(&["vm", "ssh", "f-3", "--", "hostname"]).trim(),
                "f-3"
            );
        },
    );

    phase(
        "disks are each fork's own; the source is unaffected",
        || {
            home.ok(&["vm", "exec", "f-1", "--", "touch", "/root/only-in-f1"]);
            for other in ["f-2", "src"] {
                let seen = home.run(&["vm", "exec", other, "--", "test", "-e", "/root/only-in-f1"]);
                assert!(!seen.status.success(), "{other} sees f-1's file");
            }
            let now = identity(&home, "src");
            for field in [0, 1, 2, 4] {
                assert_eq!(now[field], src_id[field], "src changed: {now:?}");
            }
            keeps_counting(&home, "src");
        },
    );

    phase("pause and resume keep a fork's counter", || {
        let before = counter(&home, "f-2");
        home.ok(&["vm", "pause", "f-2"]);
        assert_eq!(home.json(&["vm", "show", "f-2"])["state"], "paused");
        std::thread::sleep(Duration::from_secs(1));
        home.ok(&["vm", "resume", "f-2"]);
        assert!(counter(&home, "f-2") >= before, "f-2's counter went back");
        assert!(keeps_counting(&home, "f-2") > before);
    });

    phase(
        "the fork's snapshot is kept while forks use it, then leaves nothing",
        || {
            let snap = result["snapshot"]["name"].as_str().unwrap();
            let out = home.run(&["snapshot", "delete", snap]);
            assert!(!out.status.success(), "a snapshot in use was deleted");
            home.ok(&["vm", "delete", "--force", "f-1", "f-2", "f-3", "src"]);
            home.ok(&["snapshot", "delete", snap]);
            home.assert_host_clean("qemu-system-x86_64", "the fork test");
        },
    );
    eprintln!(
        "figures (TCG, this run): `vm fork --count 3` to ssh-ready {:.2}s",
        forked.as_secs_f64()
    );
}

#[test]
fn a_failed_or_killed_fork_leaves_nothing_half_made() {
    let home = TestHome::in_netns();
    phase("a running VM", || {
        common::shared_default_image(&home);
        home.ok(&["vm", "create", "--name", "src", "--no-ssh-wait", "-q"]);
        start_counter(&home, "src");
    });
    let qemus = home.processes("qemu-system-x86_64").len();

    phase(
        "a fork whose restores fail removes its forks and snapshot",
        || {
            home.restart_daemon(Some("vmm launched"));
            let out = home.run(&["vm", "fork", "src", "--count", "2", "-q"]);
            assert!(!out.status.success(), "the fault did not fail the fork");
            let err = common::text(&out.stderr);
            assert!(err.contains("vmm launched"), "{err}");
            assert_eq!(vm_names(&home), ["src"]);
            assert_eq!(snapshot_names(&home), Vec::<String>::new());
            assert_eq!(home.processes("qemu-system-x86_64").len(), qemus);
            assert_eq!(home.json(&["gc", "--dry-run"]), serde_json::json!([]));
            keeps_counting(&home, "src");
        },
    );

    phase(
        "kill -9 of the daemon mid-fork: the next one finishes nothing half-made",
        || {
            home.restart_daemon(Some("vmm launched:pause"));
            let mut cli = home
                .banger()
                .args(["vm", "fork", "src", "--count", "2", "--name", "k", "-q"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap();
            home.wait_for_pause("vmm launched");
            kill_9(home.daemon_pid());
            home.wait_socket_closed();
            assert!(!cli.wait().unwrap().success());
            home.restart_daemon(None);
            // The cut-short restores are rolled back; their rows stay as failed
            // records owning nothing. The snapshot was whole: it stays, and
            // nothing uses it.
            for k in ["k-1", "k-2"] {
                let shown = home.run(&["vm", "show", k]);
                if shown.status.success() {
                    assert_eq!(home.json(&["vm", "show", k])["state"], "failed");
                }
            }
            assert_eq!(home.processes("qemu-system-x86_64").len(), qemus);
            assert_eq!(home.json(&["gc", "--dry-run"]), serde_json::json!([]));
            for s in snapshot_names(&home) {
                home.ok(&["snapshot", "delete", &s]);
            }
            keeps_counting(&home, "src");
        },
    );

    phase("nothing is left", || {
        home.ok(&["vm", "delete", "--force", "src"]);
        home.assert_host_clean("qemu-system-x86_64", "the failed forks");
    });
}
