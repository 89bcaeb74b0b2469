//! Snapshots of running QEMU guests and restores from them: a real TCG
//! guest in a network namespace of its own (see `common::TestHome`).

mod common;

use std::time::{Duration, Instant};

use common::{TestHome, counter, keeps_counting, kill_9, phase, snapshot_names, start_counter};

fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let t = Instant::now();
    let r = f();
    (r, t.elapsed())
}

#[test]
fn a_restored_guest_runs_on_with_its_own_identity() {
    let home = TestHome::in_netns();
    phase("the default image (built once per machine)", || {
        common::shared_default_image(&home);
    });

    let (_, cold_run) = timed(|| home.ok(&["vm", "run", "-q", "--", "true"]));
    phase("a VM counting in memory and on its work disk", || {
        home.ok(&["vm", "create", "--name", "src", "--no-ssh-wait", "-q"]);
        start_counter(&home, "src");
    });

    let (snap, took_snapshot) = timed(|| {
        let out = home.ok(&["vm", "snapshot", "src", "--name", "snap1", "-q", "--json"]);
        let last = out.lines().last().expect("a result line");
        serde_json::from_str::<serde_json::Value>(last).expect("JSON")["result"].clone()
    });
    phase("the snapshot is listed and the source runs on", || {
        assert_eq!(snap["name"], "snap1");
        assert_eq!(snap["state"], "ready");
        assert_eq!(snap["source_vm"], "src");
        assert_eq!(snap["image"], "debian-12");
        assert!(snap["disk_bytes"].as_u64().unwrap() > 0, "{snap}");
        assert_eq!(snap["memory"], "file", "{snap}");
        let accel = snap["accel"].as_str().unwrap_or_default();
        assert!(accel == "tcg" || accel == "kvm", "{snap}");
        let text = home.ok(&["snapshot", "show", "snap1"]);
        assert!(
            text.contains("memory:      memory.ram, mapped copy-on-write by its restores")
                && text.contains(&format!("accelerator: {accel}")),
            "{text}"
        );
        let list = home.json(&["snapshot", "list"]);
        assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
        let shown = home.json(&["snapshot", "show", "snap1"]);
        assert_eq!(shown["id"], snap["id"]);
        assert_eq!(home.json(&["vm", "show", "src"])["state"], "running");
        keeps_counting(&home, "src");
    });
    let snap_dir = std::path::PathBuf::from(snap["dir"].as_str().unwrap());
    phase(
        "the guest's RAM is a file of its own; the state holds the devices",
        || {
            use std::os::unix::fs::MetadataExt;
            let ram = std::fs::metadata(snap_dir.join("memory.ram")).unwrap();
            assert_eq!(ram.len(), 1024 << 20, "as large as the guest's RAM");
            let used = ram.blocks() * 512;
            assert!(
                used > 16 << 20 && used < 1024 << 20,
                "the pages in use, zeros left as holes: {used} bytes"
            );
            let state = std::fs::metadata(snap_dir.join("state.bin")).unwrap().len();
            assert!(state < 4 << 20, "state.bin carries RAM: {state} bytes");
        },
    );

    let at_snapshot_or_later = counter(&home, "src");
    let (_, restore_to_ready) = timed(|| {
        home.ok(&["vm", "create", "--from", "snap1", "--name", "r1", "-q"]);
    });
    phase("the restore maps the snapshot's memory file", || {
        let pid = home.json(&["vm", "show", "r1"])["pid"].as_u64().unwrap();
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
        let ram = snap_dir.join("memory.ram");
        let mapping = maps
            .lines()
            .find(|l| l.ends_with(ram.to_str().unwrap()))
            .unwrap_or_else(|| panic!("r1's QEMU does not map {}:\n{maps}", ram.display()));
        // Private (copy-on-write): the guest's writes stay its own.
        assert!(
            mapping.split_whitespace().nth(1).unwrap().ends_with('p'),
            "{mapping}"
        );
    });
    phase("the restored guest counts on, as itself", || {
        let resumed = keeps_counting(&home, "r1");
        assert!(resumed > 1, "r1 counts from its snapshot, not from zero");
        let src = home.json(&["vm", "show", "src"]);
        let r1 = home.json(&["vm", "show", "r1"]);
        assert_eq!(r1["state"], "running");
        assert_ne!(r1["guest_ip"], src["guest_ip"]);
        assert_ne!(r1["mac"], src["mac"]);
        let ip = r1["guest_ip"].as_str().unwrap();
        let mac = r1["mac"].as_str().unwrap();
        let id = home.ok(&[
            "vm",
            "exec",
            "r1",
            "--",
            "sh",
            "-c",
            "hostname; cat /sys/class/net/eth0/address; ip -4 -o addr show dev eth0",
        ]);
        let lines: Vec<&str> = id.lines().collect();
        assert_eq!(lines[0], "r1", "{id}");
        assert_eq!(lines[1], mac, "{id}");
        assert!(lines[2].contains(&format!("inet {ip}/")), "{id}");
        // Disks are the restore's own: a file written in r1 is not in src.
        home.ok(&["vm", "exec", "r1", "--", "touch", "/root/only-in-r1"]);
        let seen = home.run(&["vm", "exec", "src", "--", "test", "-e", "/root/only-in-r1"]);
        assert!(!seen.status.success(), "src sees r1's file");
        // The source is unaffected.
        assert!(counter(&home, "src") >= at_snapshot_or_later);
        keeps_counting(&home, "src");
        let src_id = home.ok(&["vm", "exec", "src", "--", "hostname"]);
        assert_eq!(src_id.trim(), "src");
    });

    phase(
        "a restored VM boots cold after a stop, with its own disks",
        || {
            home.ok(&["vm", "stop", "r1"]);
            home.ok(&["vm", "set", "r1", "--disk", "5120"]);
            home.ok(&["vm", "start", "r1", "--no-ssh-wait"]);
            let out = home.ok(&[
                "vm",
                "exec",
                "r1",
                "--",
                "sh",
                "-c",
                "hostname; test -e /root/only-in-r1 && echo kept; df -m /root | tail -n 1",
            ]);
            let lines: Vec<&str> = out.lines().collect();
            assert_eq!(lines[..2], ["r1", "kept"], "{out}");
            let size_mib: u64 = lines[2].split_whitespace().nth(1).unwrap().parse().unwrap();
            assert!(size_mib > 4096, "the work disk grew: {out}");
        },
    );

    let (ran, restored_run) = timed(|| {
        home.ok(&[
            "vm",
            "run",
            "--from",
            "snap1",
            "-q",
            "--",
            "sh",
            "-c",
            "hostname; cat /root/counter",
        ])
    });
    phase(
        "vm run --from runs the command in a restore of its own",
        || {
            let mut lines = ran.lines();
            assert!(lines.next().unwrap().starts_with("run-"), "{ran}");
            assert!(lines.next().unwrap().parse::<u64>().unwrap() > 0, "{ran}");
        },
    );

    phase(
        "a restored VM is snapshotted in turn; its snapshot needs nothing of the first",
        || {
            home.ok(&["vm", "create", "--from", "snap1", "--name", "r2", "-q"]);
            home.ok(&["vm", "exec", "r2", "--", "touch", "/root/from-r2"]);
            let at = keeps_counting(&home, "r2");
            let out = home.ok(&["vm", "snapshot", "r2", "--name", "snap2", "-q", "--json"]);
            let last = out.lines().last().expect("a result line");
            let snap2 =
                serde_json::from_str::<serde_json::Value>(last).expect("JSON")["result"].clone();
            assert_eq!(snap2["source_vm"], "r2", "{snap2}");
            // r2's RAM maps snap1's file privately: the stream carries it.
            assert_eq!(snap2["memory"], "stream", "{snap2}");
            keeps_counting(&home, "r2");
            let dir2 = std::path::PathBuf::from(snap2["dir"].as_str().unwrap());
            // The root is an overlay over the image's rootfs, not over snap1's.
            let chain = std::process::Command::new("qemu-img")
                .args(["info", "-U", "--output=json", "--backing-chain"])
                .arg(dir2.join("root.qcow2"))
                .output()
                .unwrap();
            assert!(chain.status.success());
            let chain: serde_json::Value = serde_json::from_slice(&chain.stdout).unwrap();
            let files: Vec<&str> = chain
                .as_array()
                .unwrap()
                .iter()
                .map(|i| i["filename"].as_str().unwrap())
                .collect();
            assert_eq!(files.len(), 2, "{files:?}");
            assert!(files[1].ends_with("rootfs.ext4"), "{files:?}");
            let names: Vec<_> = std::fs::read_dir(&dir2)
                .unwrap()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            for f in ["root.qcow2", "work.ext4", "state.bin"] {
                assert!(names.iter().any(|n| n == f), "{f} not in {names:?}");
            }
            assert!(!names.iter().any(|n| n == "work.qcow2"), "{names:?}");
            home.ok(&["vm", "delete", "--force", "r2"]);
            home.ok(&["vm", "create", "--from", "snap2", "--name", "r3", "-q"]);
            let resumed = keeps_counting(&home, "r3");
            assert!(resumed >= at, "r3 counts on from r2's {at}: {resumed}");
            let out = home.ok(&[
                "vm",
                "exec",
                "r3",
                "--",
                "sh",
                "-c",
                "hostname; test -e /root/from-r2 && echo kept",
            ]);
            assert_eq!(out.lines().collect::<Vec<_>>(), ["r3", "kept"], "{out}");
            let users = home.json(&["snapshot", "show", "snap1"])["used_by"].clone();
            assert_eq!(users, serde_json::json!(["r1"]), "snap1 is not r3's");
            home.ok(&["vm", "delete", "--force", "r3"]);
            home.ok(&["snapshot", "delete", "snap2"]);
            assert!(!dir2.exists());
        },
    );

    phase("a snapshot in use is kept, and keeps its image", || {
        let out = home.run(&["snapshot", "delete", "snap1"]);
        assert!(!out.status.success());
        let err = common::text(&out.stderr);
        assert!(err.contains("used by VM: r1"), "{err}");
        home.ok(&["vm", "delete", "--force", "r1", "src"]);
        let out = home.run(&["image", "delete", "debian-12"]);
        assert!(!out.status.success());
        let err = common::text(&out.stderr);
        assert!(err.contains("kept by snapshot: snap1"), "{err}");
    });

    phase("deleting the snapshot leaves nothing", || {
        let dir = std::path::PathBuf::from(snap["dir"].as_str().unwrap());
        assert!(dir.is_dir());
        home.ok(&["snapshot", "delete", "snap1"]);
        assert!(!dir.exists(), "{} left", dir.display());
        assert_eq!(home.json(&["snapshot", "list"]), serde_json::json!([]));
        home.assert_host_clean("qemu-system-x86_64", "the snapshot test");
    });

    eprintln!(
        "figures (TCG, this run): cold `vm run -- true` {:.2}s; `vm snapshot` of a running \
         1 GiB guest {:.2}s ({} MiB on disk); `vm create --from` to ssh-ready {:.2}s; \
         `vm run --from -- sh` {:.2}s",
        cold_run.as_secs_f64(),
        took_snapshot.as_secs_f64(),
        snap["disk_bytes"].as_u64().unwrap() >> 20,
        restore_to_ready.as_secs_f64(),
        restored_run.as_secs_f64()
    );
}

#[test]
fn failed_restores_leave_nothing_and_bad_snapshots_are_refused() {
    let home = TestHome::in_netns();
    phase("a snapshot that outlives its VM", || {
        common::shared_default_image(&home);
        home.ok(&["vm", "create", "--name", "src", "--no-ssh-wait", "-q"]);
        home.ok(&["vm", "snapshot", "src", "--name", "snap", "-q"]);
        home.ok(&["vm", "delete", "--force", "src"]);
    });
    let steps = common::STEPS.iter().copied().chain(["vmm launched"]);
    for (i, step) in steps.enumerate() {
        phase(
            &format!("a restore failing after {step} rolls back"),
            || {
                home.restart_daemon(Some(step));
                let name = format!("f{i}");
                let out = home.run(&["vm", "create", "--from", "snap", "--name", &name, "-q"]);
                assert!(!out.status.success(), "the fault at {step} did not fail it");
                let err = common::text(&out.stderr);
                assert!(err.contains(step), "{step}: {err}");
                if step != "image" {
                    // From allocate on, the row exists and is kept as failed.
                    assert_eq!(home.json(&["vm", "show", &name])["state"], "failed");
                }
                home.assert_host_clean(
                    "qemu-system-x86_64",
                    &format!("a restore failed at {step}"),
                );
            },
        );
    }
    home.restart_daemon(None);
    phase("the snapshot still restores", || {
        home.ok(&[
            "vm",
            "create",
            "--from",
            "snap",
            "--name",
            "ok",
            "--no-ssh-wait",
            "-q",
        ]);
        let name = home.ok(&["vm", "exec", "ok", "--", "hostname"]);
        assert_eq!(name.trim(), "ok");
        home.ok(&["vm", "delete", "--force", "ok"]);
    });
    let dir = std::path::PathBuf::from(
        home.json(&["snapshot", "show", "snap"])["dir"]
            .as_str()
            .unwrap(),
    );
    phase("a corrupt state file is refused", || {
        let state = dir.join("state.bin");
        let mut bytes = std::fs::read(&state).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0xff;
        std::fs::write(&state, &bytes).unwrap();
        let out = home.run(&["vm", "create", "--from", "snap", "--name", "bad", "-q"]);
        assert!(!out.status.success());
        let err = common::text(&out.stderr);
        assert!(err.contains("snapshot \"snap\" is corrupt"), "{err}");
        assert!(err.contains("banger snapshot delete snap"), "{err}");
        home.assert_host_clean("qemu-system-x86_64", "a corrupt snapshot");
        bytes[mid] ^= 0xff;
        std::fs::write(&state, &bytes).unwrap();
    });
    phase("a corrupt memory file is refused", || {
        use std::os::unix::fs::FileExt;
        // A byte in a page of the guest's memory: the file was checked
        // (and the check remembered) by the restore above, but it changed.
        let ram = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(dir.join("memory.ram"))
            .unwrap();
        let mut byte = [0u8; 1];
        ram.read_exact_at(&mut byte, 0x100000).unwrap();
        ram.write_all_at(&[byte[0] ^ 0x5a], 0x100000).unwrap();
        let out = home.run(&["vm", "create", "--from", "snap", "--name", "bad", "-q"]);
        assert!(!out.status.success());
        let err = common::text(&out.stderr);
        assert!(
            err.contains("snapshot \"snap\" is corrupt: its memory file"),
            "{err}"
        );
        home.assert_host_clean("qemu-system-x86_64", "a corrupt memory file");
        ram.write_all_at(&byte, 0x100000).unwrap();
    });
    phase(
        "a snapshot taken under another accelerator or CPU is refused",
        || {
            let db = rusqlite::Connection::open(home.path().join("state/banger.db")).unwrap();
            let (accel, cpu): (String, String) = db
                .query_row(
                    "SELECT accel, cpu FROM snapshots WHERE name = 'snap'",
                    [],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .unwrap();
            assert!(accel == "tcg" || accel == "kvm", "recorded {accel:?}");
            // Under TCG the CPU is QEMU's model, which its version fixes.
            assert_eq!(cpu.is_empty(), accel == "tcg", "{accel} {cpu:?}");
            let other = if accel == "tcg" { "kvm" } else { "tcg" };
            let set = |a: &str, c: &str| {
                db.execute(
                    "UPDATE snapshots SET accel = ?1, cpu = ?2 WHERE name = 'snap'",
                    [a, c],
                )
                .unwrap();
            };
            set(other, "");
            let out = home.run(&["vm", "create", "--from", "snap", "--name", "acc", "-q"]);
            assert!(!out.status.success());
            let err = common::text(&out.stderr);
            assert!(
                err.contains(&format!(
                    "was taken under {other} but this host runs VMs under {accel}"
                )),
                "{err}"
            );
            if accel == "kvm" {
                set("kvm", "GenuineIntel 6/1/1 Another CPU (flags 00000000)");
                let out = home.run(&["vm", "create", "--from", "snap", "--name", "acc", "-q"]);
                let err = common::text(&out.stderr);
                assert!(err.contains("was taken on CPU"), "{err}");
            }
            home.assert_host_clean("qemu-system-x86_64", "a snapshot of another host");
            set(&accel, &cpu);
        },
    );
    phase("another QEMU version is refused with the reason", || {
        let fake = home.path().join("qemu-7.1");
        std::fs::write(
            &fake,
            "#!/bin/sh\n[ \"$1\" = --version ] && { echo 'QEMU emulator version 7.1.0'; exit 0; }\nexec qemu-system-x86_64 \"$@\"\n",
        )
        .unwrap();
        std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let config = home.path().join("config.toml");
        std::fs::write(
            &config,
            format!(
                "[pool]\nsize = 0\n[vmm]\nqemu_bin = \"{}\"\n",
                fake.display()
            ),
        )
        .unwrap();
        home.restart_daemon(None);
        let out = home.run(&["vm", "create", "--from", "snap", "--name", "other", "-q"]);
        assert!(!out.status.success());
        let err = common::text(&out.stderr);
        assert!(
            err.contains("but this host runs \"QEMU emulator version 7.1.0\""),
            "{err}"
        );
        std::fs::write(&config, common::NO_POOL).unwrap();
        home.restart_daemon(None);
    });
    phase("gc finds and removes stray snapshot files", || {
        let stray = dir.with_file_name("0123456789ab");
        std::fs::create_dir(&stray).unwrap();
        let leaks = home.json(&["gc", "--dry-run"]);
        assert_eq!(leaks[0]["kind"], "snapshot_dir", "{leaks}");
        assert_eq!(leaks.as_array().unwrap().len(), 1, "{leaks}");
        home.ok(&["gc"]);
        assert!(!stray.exists());
        assert!(dir.exists(), "gc took the snapshot itself");
    });
    phase(
        "a failed snapshot leaves nothing and its VM running",
        || {
            home.ok(&["vm", "create", "--name", "live", "--no-ssh-wait", "-q"]);
            start_counter(&home, "live");
            home.restart_daemon(Some("save state"));
            let out = home.run(&["vm", "snapshot", "live", "--name", "s2", "-q"]);
            assert!(!out.status.success());
            let err = common::text(&out.stderr);
            assert!(err.contains("after the save state step"), "{err}");
            assert_eq!(home.json(&["vm", "show", "live"])["state"], "running");
            keeps_counting(&home, "live");
            let names: Vec<String> = snapshot_names(&home);
            assert_eq!(names, ["snap"]);
            assert_eq!(home.json(&["gc", "--dry-run"]), serde_json::json!([]));
        },
    );
    phase(
        "kill -9 of the daemon mid-snapshot: the next one removes it",
        || {
            home.restart_daemon(Some("save state:pause"));
            let cli = home
                .banger()
                .args(["vm", "snapshot", "live", "--name", "s3", "-q"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap();
            home.wait_for_pause("save state");
            assert_eq!(snapshot_names(&home), ["snap", "s3"]);
            kill_9(home.daemon_pid());
            home.wait_socket_closed();
            let mut cli = cli;
            assert!(!cli.wait().unwrap().success());
            home.restart_daemon(None);
            assert_eq!(snapshot_names(&home), ["snap"]);
            let left: Vec<_> = std::fs::read_dir(dir.parent().unwrap())
                .unwrap()
                .flatten()
                .map(|e| e.file_name())
                .collect();
            assert_eq!(left.len(), 1, "snapshot dirs left: {left:?}");
            assert_eq!(home.json(&["gc", "--dry-run"]), serde_json::json!([]));
            // The VM was paused for the snapshot; it resumes on request.
            assert_eq!(home.json(&["vm", "show", "live"])["state"], "paused");
            home.ok(&["vm", "resume", "live"]);
            keeps_counting(&home, "live");
            home.ok(&["vm", "delete", "--force", "live"]);
        },
    );
    phase("deleting the snapshot leaves nothing", || {
        home.ok(&["snapshot", "delete", "snap"]);
        assert!(!dir.exists());
        home.assert_host_clean("qemu-system-x86_64", "the snapshot's delete");
    });
}

#[test]
fn a_systemd_guest_restores_with_its_own_address() {
    let home = TestHome::in_netns();
    common::shared_default_image(&home);
    home.ok(&["vm", "create", "--name", "sd", "--init", "systemd", "-q"]);
    home.ok(&["vm", "snapshot", "sd", "--name", "sd-snap", "-q"]);
    home.ok(&["vm", "create", "--from", "sd-snap", "--name", "sd2", "-q"]);
    let ip = home.json(&["vm", "show", "sd2"])["guest_ip"]
        .as_str()
        .unwrap()
        .to_owned();
    // Whatever manages the network in the guest (systemd-networkd here)
    // must not bring the snapshot's address back.
    std::thread::sleep(Duration::from_secs(3));
    let addrs = home.ok(&[
        "vm",
        "exec",
        "sd2",
        "--",
        "sh",
        "-c",
        "hostname; ip -4 -o addr show dev eth0",
    ]);
    let mut lines = addrs.lines();
    assert_eq!(lines.next(), Some("sd2"), "{addrs}");
    let inet: Vec<&str> = lines.collect();
    assert_eq!(inet.len(), 1, "one address only: {addrs}");
    assert!(inet[0].contains(&format!("inet {ip}/")), "{addrs}");
    home.ok(&["vm", "delete", "--force", "sd2", "sd"]);
    home.ok(&["snapshot", "delete", "sd-snap"]);
    home.assert_host_clean("qemu-system-x86_64", "a systemd guest's restore");
}
