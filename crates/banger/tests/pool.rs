//! The warm pool (`[pool] size`): filled in the background with restores
//! of the default image, taken by default `vm run` / `vm create`, refilled,
//! hidden from `vm list`, and left whole by a daemon killed while filling.
//! Real TCG guests in a network namespace of their own; size 2, drained by
//! 2 parallel runs (3 restores at once besides the runs is more than this
//! 2-core machine's guests answer within the harness's timeouts).

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{TestHome, kill_9, phase, wait_until};

/// The pool's guests that are ready: running, named `pool-…` (not the
/// `pool-src-…` its snapshot is taken of).
fn pooled(home: &TestHome) -> Vec<String> {
    home.json(&["vm", "list", "--all"])
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["state"] == "running")
        .filter_map(|v| v["name"].as_str())
        .filter(|n| n.starts_with("pool-") && !n.starts_with("pool-src-"))
        .map(str::to_owned)
        .collect()
}

fn wait_full(home: &TestHome, n: usize) {
    wait_until(
        &format!("{n} pooled guests"),
        Duration::from_secs(240),
        || pooled(home).len() == n,
    );
}

fn set_pool(home: &TestHome, size: usize) {
    std::fs::write(
        home.path().join("config.toml"),
        format!("[pool]\nsize = {size}\n"),
    )
    .unwrap();
}

fn taken(home: &TestHome) -> usize {
    home.daemon_log()
        .matches("taking a guest from the warm pool")
        .count()
}

#[test]
fn the_warm_pool_serves_default_creates_and_refills() {
    let home = TestHome::in_netns();
    common::shared_default_image(&home);
    set_pool(&home, 2);
    home.restart_daemon(None);

    phase("the daemon answers while the pool fills", || {
        let t = Instant::now();
        assert_eq!(home.json(&["vm", "list"]), serde_json::json!([]));
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        wait_full(&home, 2);
        // Pool guests are not the user's VMs.
        assert_eq!(home.json(&["vm", "list"]), serde_json::json!([]));
        assert_eq!(home.json(&["gc", "--dry-run"]), serde_json::json!([]));
    });

    phase("two parallel vm runs take the pooled guests", || {
        let runs: Vec<_> = ["r1", "r2"]
            .iter()
            .map(|n| {
                home.banger()
                    .args(["vm", "run", "--name", n, "-q", "--", "hostname"])
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        for (run, name) in runs.into_iter().zip(["r1", "r2"]) {
            let out = run.wait_with_output().unwrap();
            assert!(out.status.success(), "{out:?}");
            assert_eq!(common::text(&out.stdout).trim(), name);
        }
        assert_eq!(taken(&home), 2);
    });

    phase("the pool refills", || wait_full(&home, 2));

    phase("a pooled VM is a VM: ssh, DNS, port forwards", || {
        home.ok(&[
            "vm",
            "create",
            "--name",
            "c1",
            "-p",
            "127.0.0.1:2299:22",
            "-q",
        ]);
        assert_eq!(taken(&home), 3);
        assert_eq!(home.ok(&["vm", "ssh", "c1", "--", "hostname"]).trim(), "c1");
        let ip = home.json(&["vm", "show", "c1"])["guest_ip"]
            .as_str()
            .unwrap()
            .to_owned();
        let found = home.ok(&["vm", "exec", "c1", "--", "getent", "hosts", "c1.vm"]);
        assert!(found.starts_with(&format!("{ip} ")), "{found}");
        let ns = home.netns.clone().unwrap();
        let banner = std::process::Command::new("ip")
            .args(["netns", "exec", &ns, "timeout", "10", "bash", "-c"])
            .arg("exec 3<>/dev/tcp/127.0.0.1/2299 && head -c 7 <&3")
            .output()
            .unwrap();
        assert_eq!(common::text(&banner.stdout), "SSH-2.0", "{banner:?}");
        assert_eq!(common::vm_names(&home), ["c1"]);
        home.ok(&["vm", "delete", "--force", "c1"]);
        wait_full(&home, 2);
    });

    phase(
        "kill -9 of the daemon while it refills: nothing half-made",
        || {
            home.restart_daemon(Some("vmm launched:pause"));
            wait_full(&home, 2);
            home.ok(&["vm", "create", "--name", "c2", "--no-ssh-wait", "-q"]);
            home.wait_for_pause("vmm launched");
            kill_9(home.daemon_pid());
            home.wait_socket_closed();
            home.restart_daemon(None);
            wait_full(&home, 2);
            let all = home.json(&["vm", "list", "--all"]);
            let states: Vec<&str> = all
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v["state"].as_str().unwrap())
                .collect();
            assert!(states.iter().all(|s| *s == "running"), "{all}");
            assert_eq!(all.as_array().unwrap().len(), 3, "{all}");
            assert_eq!(home.json(&["gc", "--dry-run"]), serde_json::json!([]));
            assert_eq!(
                home.ok(&["vm", "exec", "c2", "--", "hostname"]).trim(),
                "c2"
            );
        },
    );

    phase("size 0 empties the pool and leaves nothing", || {
        set_pool(&home, 0);
        home.restart_daemon(None);
        wait_until("the pool emptied", Duration::from_secs(60), || {
            home.json(&["vm", "list", "--all"])
                .as_array()
                .unwrap()
                .len()
                == 1
        });
        // c2 came from the pool's snapshot: its disks keep it.
        let snaps = home.json(&["snapshot", "list"]);
        assert_eq!(snaps[0]["used_by"], serde_json::json!(["c2"]), "{snaps}");
        home.ok(&["vm", "delete", "--force", "c2"]);
        // The next pass (here: the next daemon's first) removes it.
        home.restart_daemon(None);
        wait_until(
            "the pool's snapshot removed",
            Duration::from_secs(30),
            || home.json(&["snapshot", "list"]) == serde_json::json!([]),
        );
        home.assert_host_clean("qemu-system-x86_64", "the pool test");
    });
}
