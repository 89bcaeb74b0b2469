//! `scripts/deps.sh --verify`: the package list provides every binary banger
//! runs, on any machine, and a list that no longer does fails naming it.

use std::path::{Path, PathBuf};
use std::process::Output;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn verify(args: &[&str]) -> Output {
    std::process::Command::new(repo().join("scripts/deps.sh"))
        .arg("--verify")
        .args(args)
        .output()
        .expect("run scripts/deps.sh")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Binaries banger and its tests run, which the list must name.
const RUN_BY_BANGER: [&str; 23] = [
    "qemu-system-x86_64",
    "qemu-img",
    "mkfs.ext4",
    "debugfs",
    "mmdebstrap",
    "ssh",
    "ssh-keygen",
    "nft",
    "dmsetup",
    "losetup",
    "ip",
    "xz",
    "docker-registry",
    "skopeo",
    "zstd",
    "busybox",
    "file",
    "python3",
    "curl",
    "chromium",
    "gnome-keyring-daemon",
    "dbus-daemon",
    "dbus-send",
];

/// The binaries `scripts/deps.list` names ("-": a package of data only).
fn listed() -> Vec<String> {
    let list = std::fs::read_to_string(repo().join("scripts/deps.list")).unwrap();
    list.lines()
        .map(|l| l.split('#').next().unwrap())
        .flat_map(|l| l.split_whitespace().skip(2))
        .filter(|b| *b != "-")
        .map(str::to_owned)
        .collect()
}

#[test]
fn every_binary_banger_runs_is_in_the_list() {
    let listed = listed();
    for bin in RUN_BY_BANGER {
        assert!(
            listed.iter().any(|l| l == bin),
            "scripts/deps.list does not name {bin}"
        );
    }
    for bin in &listed {
        assert!(
            RUN_BY_BANGER.contains(&bin.as_str()),
            "{bin} is in scripts/deps.list but not known to this test: add it here"
        );
    }
}

#[test]
fn the_committed_list_verifies_on_this_machine() {
    let out = verify(&["--test"]);
    assert!(
        out.status.success(),
        "scripts/deps.sh --verify --test failed (run scripts/deps.sh --test):\n{}",
        stderr(&out)
    );
    let ok = format!("deps: ok: {} binaries", RUN_BY_BANGER.len());
    assert!(stderr(&out).contains(&ok), "{}", stderr(&out));
}

#[test]
fn a_package_that_does_not_provide_a_binary_fails_naming_both() {
    let dir = tempfile::tempdir().unwrap();
    let list = dir.path().join("deps.list");
    // coreutils is on every Debian machine, and has no qemu-img.
    std::fs::write(&list, "coreutils runtime qemu-img ls\n").unwrap();
    let out = verify(&["--list", list.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("MISSING qemu-img: package coreutils does not provide it"),
        "{err}"
    );
    assert!(!err.contains("MISSING ls"), "ls is coreutils': {err}");
}

#[test]
fn a_package_that_is_not_installed_fails_naming_binary_and_package() {
    let dir = tempfile::tempdir().unwrap();
    let list = dir.path().join("deps.list");
    std::fs::write(
        &list,
        "# comment\nbanger-no-such-package test banger-nothing # why\n",
    )
    .unwrap();
    // Test packages are left out without --test ...
    assert!(verify(&["--list", list.to_str().unwrap()]).status.success());
    // ... and checked with it.
    let out = verify(&["--test", "--list", list.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains(
            "MISSING banger-nothing: package banger-no-such-package is not installed \
             (apt-get install banger-no-such-package)"
        ),
        "{}",
        stderr(&out)
    );
}
