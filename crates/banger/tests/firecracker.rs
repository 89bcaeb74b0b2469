//! The Firecracker path end to end, against fc-double: a stand-in for the
//! firecracker binary that validates every API request against Firecracker's
//! own OpenAPI file and runs the real guest agent as a host process. (No
//! Firecracker can run on this machine kind; the QEMU tests boot real guests.)

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{TestHome, is_alive, wait_until};

fn target_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_banger"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// A registrable image the double accepts: any ELF as the kernel, and real
/// ext4 files (the work disk is grown with resize2fs).
fn fake_image(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::copy("/bin/true", dir.join("vmlinux")).unwrap();
    std::fs::write(dir.join("initrd.img"), b"initrd").unwrap();
    for (file, label) in [("rootfs.ext4", "rootfs"), ("work-seed.ext4", "work")] {
        let st = Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", label])
            .arg(dir.join(file))
            .arg("16M")
            .status()
            .unwrap();
        assert!(st.success(), "mkfs.ext4 (e2fsprogs) is needed");
    }
}

fn setup() -> TestHome {
    let home = TestHome::in_netns();
    let double = target_dir().join("fc-double");
    let agent = target_dir().join("banger-agent");
    for bin in [&double, &agent] {
        assert!(
            bin.is_file(),
            "{} is not built: run `cargo build --workspace`",
            bin.display()
        );
    }
    // banger runs `firecracker --api-sock … --id …`; the wrapper adds the
    // double's guest stand-in: the real agent, kept away from the host's keys.
    let wrapper = home.path().join("firecracker");
    let keys = home.path().join("guest-authorized_keys");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec {} --guest-agent-cmd '{} --listen unix:{{sock}} --authorized-keys {} --shutdown-action exit' \"$@\"\n",
            double.display(),
            agent.display(),
            keys.display()
        ),
    )
    .unwrap();
    std::os::unix::fs::PermissionsExt::set_mode(
        &mut std::fs::metadata(&wrapper).unwrap().permissions(),
        0o755,
    );
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    std::fs::write(
        home.path().join("config.toml"),
        format!("[vmm]\nfirecracker_bin = \"{}\"\n", wrapper.display()),
    )
    .unwrap();
    let img = home.path().join("img");
    fake_image(&img);
    let p = |f: &str| img.join(f).display().to_string();
    home.ok(&[
        "image",
        "register",
        "fcimg",
        "--vmlinux",
        &p("vmlinux"),
        "--initrd",
        &p("initrd.img"),
        "--rootfs",
        &p("rootfs.ext4"),
        "--work-seed",
        &p("work-seed.ext4"),
    ]);
    home
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
    // Firecracker takes raw disks only: the root disk is a sparse copy, not a qcow2 overlay.
    assert!(dir.join("root.ext4").is_file() && !dir.join("root.qcow2").exists());
    // Every request banger made passed the spec check (the double logs each one).
    let log = std::fs::read_to_string(dir.join("console.log")).unwrap();
    assert!(
        log.contains("PUT /actions") && !log.contains(" 400"),
        "{log}"
    );
    // The SSH keys went to the stand-in's file, never the host's.
    assert!(
        std::fs::read_to_string(home.path().join("guest-authorized_keys"))
            .unwrap()
            .contains("banger")
    );

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

    // Graceful stop is SendCtrlAltDel: the double exits.
    home.ok(&["vm", "stop", "fc1"]);
    wait_until("firecracker exit", Duration::from_secs(10), || {
        !is_alive(pid)
    });
    assert_eq!(home.json(&["vm", "show", "fc1"])["state"], "stopped");
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
