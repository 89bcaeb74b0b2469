//! Workspaces end to end: real git repositories made here, a real guest
//! (QEMU, the default image), `workspace prepare` / `export` / `status`.
//!
//! One VM for the file; the phases run in order and name themselves on
//! failure.

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{TestHome, git, phase, wait_until};

fn stderr_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn write(path: &Path, data: impl AsRef<[u8]>) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, data).unwrap();
}

fn chmod(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// `sh -c SCRIPT` in the guest; its stdout (must succeed).
fn guest(home: &TestHome, script: &str) -> String {
    home.ok(&["vm", "exec", "ws", "--", "sh", "-c", script])
}

/// The tree id of a working tree as it is (untracked files included),
/// without touching its index: the same content gives the same id on the
/// host and in the guest.
const TREE_OF_WORKTREE: &str = "i=$(mktemp) && cp \"$(git rev-parse --git-dir)/index\" $i && GIT_INDEX_FILE=$i git add -A && GIT_INDEX_FILE=$i git write-tree && rm $i";

/// A repository with everything a working tree can hold: committed,
/// dirty, staged, untracked, ignored and deleted files, a binary, an
/// executable, symlinks in and out, a big file, and a submodule.
fn make_repo(root: &Path) -> PathBuf {
    let sub = root.join("subrepo");
    std::fs::create_dir_all(&sub).unwrap();
    git(&sub, &["init", "-q", "-b", "main"]);
    write(&sub.join("lib.txt"), "submodule file\n");
    git(&sub, &["add", "."]);
    git(&sub, &["commit", "-q", "-m", "sub"]);

    let repo = root.join("project");
    std::fs::create_dir_all(&repo).unwrap();
    git(&repo, &["init", "-q", "-b", "main"]);
    write(&repo.join("a.txt"), "a1\n");
    write(&repo.join("dir/b.txt"), "b1\n");
    write(&repo.join("del.txt"), "to be deleted\n");
    write(&repo.join("staged.txt"), "s1\n");
    write(&repo.join(".gitignore"), "target/\n*.o\n");
    let binary: Vec<u8> = (0..65536u32).map(|i| (i * 7919 % 251) as u8).collect();
    write(&repo.join("bin.dat"), &binary);
    write(&repo.join("run.sh"), "#!/bin/sh\necho run\n");
    chmod(&repo.join("run.sh"), 0o755);
    std::os::unix::fs::symlink("a.txt", repo.join("link-in")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", repo.join("link-out")).unwrap();
    // 100 MB: compresses to little in git, sent whole in the working tree.
    let big = std::fs::File::create(repo.join("big.img")).unwrap();
    big.set_len(100 << 20).unwrap();
    git(&repo, &["add", "."]);
    git(&repo, &["commit", "-q", "-m", "first"]);
    git(
        &repo,
        &[
            "-c",
            "protocol.file.allow=always",
            "submodule",
            "add",
            "-q",
            sub.to_str().unwrap(),
            "sub",
        ],
    );
    git(&repo, &["commit", "-q", "-m", "second: a submodule"]);
    // The working tree as a user leaves it.
    write(&repo.join("a.txt"), "a1\na2 (uncommitted)\n");
    write(&repo.join("staged.txt"), "s2 (staged)\n");
    git(&repo, &["add", "staged.txt"]);
    std::fs::remove_file(repo.join("del.txt")).unwrap();
    write(&repo.join("new.txt"), "untracked\n");
    write(&repo.join("target/out.o"), "ignored\n");
    repo
}

#[test]
fn workspaces_round_trip_through_a_real_guest() {
    let home = TestHome::in_netns();
    let root = home.path().join("repos");
    let repo = make_repo(&root);
    let repo_s = repo.to_str().unwrap().to_owned();

    phase("a VM to work in", || {
        common::shared_default_image(&home);
        home.ok(&["vm", "create", "--name", "ws", "--no-ssh-wait"]);
    });

    let prepared = phase_value("prepare copies the working tree as it is", || {
        let out = home.run(&["workspace", "prepare", "ws", &repo_s, "--json"]);
        assert!(out.status.success(), "{}", stderr_of(&out));
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let last: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
        let ws = last["result"].clone();
        assert_eq!(ws["dest"], "/root/project");
        assert_eq!(ws["base_commit"], git(&repo, &["rev-parse", "HEAD"]));
        assert_ne!(
            ws["prepared_commit"], ws["base_commit"],
            "the tree was dirty"
        );
        // Progress came as events of the send stage.
        assert!(text.contains("\"stage\":\"send\""), "{text}");

        let d = "cd /root/project && ";
        assert_eq!(
            guest(&home, &format!("{d}cat a.txt")),
            "a1\na2 (uncommitted)\n"
        );
        assert_eq!(guest(&home, &format!("{d}cat new.txt")), "untracked\n");
        assert_eq!(
            guest(&home, &format!("{d}cat sub/lib.txt")),
            "submodule file\n"
        );
        assert_eq!(
            guest(
                &home,
                &format!("{d}ls target del.txt 2>&1 | grep -c 'No such file'")
            ),
            "2\n",
            "ignored and deleted files stay out"
        );
        assert_eq!(
            guest(&home, &format!("{d}readlink link-out link-in")),
            "/etc/passwd\na.txt\n"
        );
        assert_eq!(guest(&home, &format!("{d}stat -c %a run.sh")), "755\n");
        assert_eq!(
            guest(&home, &format!("{d}stat -c %s big.img")),
            format!("{}\n", 100 << 20)
        );
        let host_sum = Command::new("sha256sum")
            .arg(repo.join("bin.dat"))
            .output()
            .unwrap();
        let host_sum = String::from_utf8_lossy(&host_sum.stdout)
            .split(' ')
            .next()
            .unwrap()
            .to_owned();
        assert!(guest(&home, &format!("{d}sha256sum bin.dat")).starts_with(&host_sum));
        // git works in the guest: the same history, the same dirty state
        // (staged stays staged).
        assert_eq!(
            guest(&home, &format!("{d}git log --format=%H")).trim(),
            git(&repo, &["log", "--format=%H"])
        );
        assert_eq!(
            guest(&home, &format!("{d}git status --porcelain")).trim_end(),
            git(&repo, &["status", "--porcelain"])
        );
        assert_eq!(
            guest(&home, &format!("{d}git -C sub log --format=%s")).trim(),
            "sub"
        );
        ws
    });
    let base = prepared["base_commit"].as_str().unwrap().to_owned();

    phase(
        "work in the guest: commit one change, leave the rest",
        || {
            guest(
                &home,
                "cd /root/project && git mv dir/b.txt dir/renamed.txt && git commit -q -m 'guest: rename' && \
             echo a3 >> a.txt && echo fresh > guest-new.txt && rm bin.dat && chmod +x a.txt && \
             printf '\\000\\001\\002' > blob.bin",
            );
            let s = home.json(&["workspace", "status", "ws"]);
            assert_eq!(s["commits"], 1, "{s}");
            assert_eq!(s["base_commit"], base.as_str());
            let changed: Vec<String> = s["changed"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c.as_str().unwrap().to_owned())
                .collect();
            for want in [
                "M a.txt",
                "A guest-new.txt",
                "D bin.dat",
                "D dir/b.txt",
                "A dir/renamed.txt",
            ] {
                assert!(
                    changed.contains(&want.to_owned()),
                    "{want} not in {changed:?}"
                );
            }
            assert!(
                home.ok(&["workspace", "status", "ws"])
                    .contains("1 commit(s)")
            );
        },
    );

    // The host moves on meanwhile: a commit of an unrelated file.
    write(&repo.join("host-only.txt"), "host\n");
    git(&repo, &["add", "host-only.txt"]);
    git(&repo, &["commit", "-q", "-m", "host moves on"]);
    let host_head = git(&repo, &["rev-parse", "HEAD"]);
    let host_status = git(&repo, &["status", "--porcelain"]);
    let guest_tree = guest(&home, &format!("cd /root/project && {TREE_OF_WORKTREE}"));

    phase(
        "export --branch: the guest's commits and the rest, as a branch",
        || {
            // A guest that names another of the user's repositories as its
            // workspace's origin (prepare used to record it there) is not
            // believed: the branch goes where the daemon's record says.
            let decoy = root.join("decoy");
            std::fs::create_dir_all(&decoy).unwrap();
            git(&decoy, &["init", "-q", "-b", "main"]);
            git(&decoy, &["commit", "-q", "--allow-empty", "-m", "decoy"]);
            guest(
                &home,
                &format!(
                    "cd /root/project && git config banger.hostpath {}",
                    decoy.display()
                ),
            );
            let out = home.run(&["workspace", "export", "ws", "--branch", "guest-work"]);
            assert!(out.status.success(), "{}", stderr_of(&out));
            assert_eq!(git(&decoy, &["branch", "--list"]), "* main");
            // The branch holds exactly the guest's tree, on top of the base.
            assert_eq!(
                git(&repo, &["rev-parse", "guest-work^{tree}"]),
                guest_tree.trim()
            );
            assert_eq!(
                git(
                    &repo,
                    &["rev-list", "--count", &format!("{base}..guest-work")]
                ),
                "2"
            );
            assert_eq!(
                git(&repo, &["log", "-1", "--format=%s", "guest-work~1"]),
                "guest: rename"
            );
            // Never touching the host's working tree or current branch.
            assert_eq!(git(&repo, &["rev-parse", "HEAD"]), host_head);
            assert_eq!(git(&repo, &["status", "--porcelain"]), host_status);
            assert_eq!(git(&repo, &["symbolic-ref", "--short", "HEAD"]), "main");
            // A second export to the same name is refused unless forced.
            let again = home.run(&["workspace", "export", "ws", "--branch", "guest-work"]);
            assert_eq!(again.status.code(), Some(1));
            assert!(
                stderr_of(&again).contains("already exists"),
                "{}",
                stderr_of(&again)
            );
            home.ok(&[
                "workspace",
                "export",
                "ws",
                "--branch",
                "guest-work",
                "--force",
                "--committed-only",
            ]);
            assert_eq!(
                git(&repo, &["log", "-1", "--format=%s", "guest-work"]),
                "guest: rename"
            );
        },
    );

    phase(
        "export --patch applies to a clean checkout of the base",
        || {
            let patch = home.path().join("guest.patch");
            home.ok(&[
                "workspace",
                "export",
                "ws",
                "--patch",
                patch.to_str().unwrap(),
            ]);
            let clean = home.path().join("clean");
            git(
                &repo,
                &[
                    "worktree",
                    "add",
                    "-q",
                    "--detach",
                    clean.to_str().unwrap(),
                    &base,
                ],
            );
            git(&clean, &["apply", "--check", patch.to_str().unwrap()]);
            git(&clean, &["apply", patch.to_str().unwrap()]);
            let out = Command::new("sh")
                .args(["-c", TREE_OF_WORKTREE])
                .current_dir(&clean)
                .output()
                .unwrap();
            // The submodule is a gitlink in both trees.
            assert_eq!(String::from_utf8_lossy(&out.stdout), guest_tree);
            git(
                &repo,
                &["worktree", "remove", "--force", clean.to_str().unwrap()],
            );
            // The patch is diffed on the host, from the files the guest
            // changed; a host repository without the base commit has the
            // guest diff instead, and the patch is the same.
            let other = home.path().join("not-the-origin");
            std::fs::create_dir_all(&other).unwrap();
            git(&other, &["init", "-q"]);
            git(
                &other,
                &["commit", "-q", "--allow-empty", "-m", "unrelated"],
            );
            let again = home.path().join("guest-diffed.patch");
            let out = home.run(&[
                "workspace",
                "export",
                "ws",
                other.to_str().unwrap(),
                "--patch",
                again.to_str().unwrap(),
            ]);
            let err = stderr_of(&out);
            assert!(out.status.success(), "{err}");
            assert!(
                err.contains("in the guest (") && err.contains("lacks the base commit"),
                "{err}"
            );
            assert_eq!(
                std::fs::read_to_string(&again).unwrap(),
                std::fs::read_to_string(&patch).unwrap()
            );
        },
    );

    phase(
        "export --apply refuses files the host changed too, naming them",
        || {
            write(&repo.join("a.txt"), "changed on the host too\n");
            let out = home.run(&["workspace", "export", "ws", "--apply"]);
            assert_eq!(out.status.code(), Some(1));
            let err = stderr_of(&out);
            assert!(err.contains("a.txt") && err.contains("--branch"), "{err}");
            assert_eq!(
                std::fs::read_to_string(repo.join("a.txt")).unwrap(),
                "changed on the host too\n"
            );
            assert!(repo.join("bin.dat").exists(), "nothing applied");
            write(&repo.join("a.txt"), "a1\na2 (uncommitted)\n");
        },
    );

    phase(
        "export --apply brings the guest's work into the host's tree",
        || {
            home.ok(&["workspace", "export", "ws", "--apply"]);
            assert_eq!(
                std::fs::read_to_string(repo.join("a.txt")).unwrap(),
                "a1\na2 (uncommitted)\na3\n"
            );
            assert_eq!(
                std::fs::read_to_string(repo.join("guest-new.txt")).unwrap(),
                "fresh\n"
            );
            assert_eq!(
                std::fs::read(repo.join("blob.bin")).unwrap(),
                b"\x00\x01\x02"
            );
            assert!(!repo.join("bin.dat").exists());
            assert!(!repo.join("dir/b.txt").exists() && repo.join("dir/renamed.txt").exists());
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(repo.join("a.txt"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o111, 0o111, "the exec bit came along");
            // The host's own commit is still there, its branch unmoved.
            assert_eq!(git(&repo, &["rev-parse", "HEAD"]), host_head);
            assert!(repo.join("host-only.txt").exists());
        },
    );

    phase(
        "a fork's workspace exports to the repository its source's came from",
        || {
            let out = home.ok(&["vm", "fork", "ws", "--name", "wsfork", "-q", "--json"]);
            let result: serde_json::Value =
                serde_json::from_str(out.lines().last().unwrap()).unwrap();
            let snap = result["result"]["snapshot"]["name"].as_str().unwrap();
            home.ok(&[
                "workspace",
                "export",
                "wsfork-1",
                "--branch",
                "from-the-fork",
                "--committed-only",
            ]);
            assert_eq!(
                git(&repo, &["log", "-1", "--format=%s", "from-the-fork"]),
                "guest: rename"
            );
            home.ok(&["vm", "delete", "--force", "wsfork-1"]);
            home.ok(&["snapshot", "delete", snap]);
        },
    );

    phase("bad input gets clear errors and changes nothing", || {
        let plain = home.path().join("plain");
        std::fs::create_dir_all(&plain).unwrap();
        let bare = home.path().join("bare.git");
        git(
            home.path(),
            &["init", "-q", "--bare", bare.to_str().unwrap()],
        );
        let odd = root.join("odd");
        std::fs::create_dir_all(&odd).unwrap();
        git(&odd, &["init", "-q"]);
        write(&odd.join("ok.txt"), "ok\n");
        git(&odd, &["add", "."]);
        git(&odd, &["commit", "-q", "-m", "x"]);
        std::fs::write(odd.join(std::ffi::OsStr::from_bytes(b"bad\xff.txt")), "x").unwrap();
        let missing = home.path().join("missing");
        for (path, says) in [
            (plain.to_str().unwrap(), "not inside a git repository"),
            (bare.to_str().unwrap(), "bare git repository"),
            (missing.to_str().unwrap(), "No such file"),
            (odd.to_str().unwrap(), "not a UTF-8 file name"),
        ] {
            let out = home.run(&["workspace", "prepare", "ws", path, "--dest", "/root/bad"]);
            assert_eq!(out.status.code(), Some(1), "{path}");
            assert!(
                stderr_of(&out).contains(says),
                "{path}: {}",
                stderr_of(&out)
            );
            assert!(stderr_of(&out).contains("(op-"), "{}", stderr_of(&out));
        }
        // Too little room: refused before anything is sent.
        guest(
            &home,
            "mkdir -p /mnt/small && mount -t tmpfs -o size=1m tmpfs /mnt/small",
        );
        let out = home.run(&[
            "workspace",
            "prepare",
            "ws",
            &repo_s,
            "--dest",
            "/mnt/small/p",
        ]);
        assert_eq!(out.status.code(), Some(1));
        assert!(
            stderr_of(&out).contains("free") && stderr_of(&out).contains("--disk"),
            "{}",
            stderr_of(&out)
        );
        assert_eq!(
            guest(&home, "ls -A /mnt/small; test -e /root/bad || echo none"),
            "none\n"
        );
        let out = home.run(&[
            "workspace",
            "export",
            "ws",
            "--patch",
            "relative.patch",
            "--dest",
            "/root/nope",
        ]);
        assert_eq!(out.status.code(), Some(1));
        assert!(
            stderr_of(&out).contains("not a banger workspace"),
            "{}",
            stderr_of(&out)
        );
    });

    phase("--no-history sends one commit; export still works", || {
        home.ok(&[
            "workspace",
            "prepare",
            "ws",
            &repo_s,
            "--dest",
            "/root/shallow",
            "--no-history",
            "-q",
        ]);
        assert_eq!(
            guest(&home, "git -C /root/shallow rev-list --count HEAD"),
            "1\n"
        );
        assert_eq!(
            guest(&home, "cd /root/shallow && git status --porcelain").trim_end(),
            git(&repo, &["status", "--porcelain"])
        );
        guest(&home, "cd /root/shallow && echo shallow-edit >> a.txt");
        let patch = home.path().join("shallow.patch");
        home.ok(&[
            "workspace",
            "export",
            "ws",
            "--dest",
            "/root/shallow",
            "--patch",
            patch.to_str().unwrap(),
        ]);
        assert!(
            std::fs::read_to_string(&patch)
                .unwrap()
                .contains("+shallow-edit")
        );
    });

    phase("three concurrent prepares never interleave", || {
        let variants: Vec<PathBuf> = (0..3)
            .map(|i| {
                let r = root.join(format!("v{i}"));
                std::fs::create_dir_all(&r).unwrap();
                git(&r, &["init", "-q"]);
                for f in 0..50 {
                    write(&r.join(format!("f{f}.txt")), format!("variant {i}\n"));
                }
                git(&r, &["add", "."]);
                git(&r, &["commit", "-q", "-m", "v"]);
                r
            })
            .collect();
        let children: Vec<_> = variants
            .iter()
            .map(|r| {
                home.banger()
                    .args([
                        "workspace",
                        "prepare",
                        "ws",
                        r.to_str().unwrap(),
                        "--dest",
                        "/root/same",
                        "-q",
                    ])
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        for c in children {
            let out = c.wait_with_output().unwrap();
            assert!(out.status.success(), "{}", stderr_of(&out));
        }
        // One variant, whole: every file says the same.
        let seen = guest(&home, "cat /root/same/f*.txt | sort -u");
        assert_eq!(seen.lines().count(), 1, "{seen}");
        assert_eq!(
            guest(&home, "ls -A /root | grep -c banger-prepare || true"),
            "0\n"
        );
    });

    phase(
        "vm stop ends a prepare in flight; the old workspace stays whole",
        || {
            // A marker a completed prepare would remove with the old copy.
            guest(&home, "touch /root/project/old-copy-marker");
            let before = guest(&home, "cat /root/project/a.txt; ls /root/project | wc -l");
            let mut child = home
                .banger()
                .args(["workspace", "prepare", "ws", &repo_s, "--json"])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            let stdout = child.stdout.take().unwrap();
            let mut lines = BufReader::new(stdout).lines();
            // Stop as soon as the stream into the guest has begun.
            loop {
                let line = lines.next().expect("prepare ended before sending").unwrap();
                if line.contains("\"stage\":\"send\"") {
                    break;
                }
            }
            home.ok(&["vm", "stop", "ws"]);
            let out = child.wait_with_output().unwrap();
            assert_eq!(out.status.code(), Some(1), "the prepare fails");
            home.ok(&["vm", "start", "ws", "--no-ssh-wait"]);
            assert_eq!(
                guest(&home, "cat /root/project/a.txt; ls /root/project | wc -l"),
                before
            );
            // The next prepare clears what the cut one left.
            home.ok(&["workspace", "prepare", "ws", &repo_s, "-q"]);
            assert_eq!(
                guest(&home, "ls -A /root | grep -c banger-prepare || true"),
                "0\n"
            );
        },
    );

    phase(
        "Ctrl-C mid-prepare cancels it; the old workspace stays",
        || {
            // A marker a completed prepare would remove with the old copy.
            guest(&home, "touch /root/project/old-copy-marker");
            let before = guest(&home, "cat /root/project/a.txt; ls /root/project | wc -l");
            let mut child = home
                .banger_interruptible()
                .args(["workspace", "prepare", "ws", &repo_s, "--json"])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
            loop {
                let line = lines.next().expect("prepare ended before sending").unwrap();
                if line.contains("\"stage\":\"send\"") {
                    break;
                }
            }
            Command::new("kill")
                .args(["-INT", &child.id().to_string()])
                .status()
                .unwrap();
            let out = child.wait_with_output().unwrap();
            assert_eq!(out.status.code(), Some(130), "{}", stderr_of(&out));
            assert!(stderr_of(&out).contains("cancelled"), "{}", stderr_of(&out));
            assert_eq!(
                guest(&home, "cat /root/project/a.txt; ls /root/project | wc -l"),
                before
            );
            // Nothing keeps unpacking in the guest.
            wait_until("the guest's tar is gone", Duration::from_secs(30), || {
                guest(&home, "pgrep -x tar || true").is_empty()
            });
        },
    );

    phase(
        "vm run --workspace runs the command in the checkout",
        || {
            let out = home.run(&[
                "vm",
                "run",
                "--workspace",
                &repo_s,
                "--",
                "sh",
                "-c",
                "pwd; cat host-only.txt",
            ]);
            assert!(out.status.success(), "{}", stderr_of(&out));
            assert_eq!(
                String::from_utf8_lossy(&out.stdout),
                "/root/project\nhost\n"
            );
        },
    );

    phase(
        "a VM that is not running: a clear error, and the workspace waits",
        || {
            home.ok(&["vm", "stop", "ws"]);
            let patch = home.path().join("stopped.patch");
            let patch = patch.to_str().unwrap();
            for args in [
                vec!["workspace", "prepare", "ws", &repo_s],
                vec!["workspace", "export", "ws", "--patch", patch],
                vec!["workspace", "status", "ws"],
            ] {
                let out = home.run(&args);
                assert_eq!(out.status.code(), Some(1), "{args:?}");
                let err = stderr_of(&out);
                assert!(
                    err.contains("is not running") && err.contains("banger vm start ws"),
                    "{args:?}: {err}"
                );
            }
            assert!(!Path::new(patch).exists(), "nothing written on the host");
            // The work disk kept the workspace: after a start it is there.
            home.ok(&["vm", "start", "ws"]);
            let status = home.ok(&["workspace", "status", "ws", "--dest", "/root/project"]);
            assert!(status.contains("/root/project"), "{status}");
        },
    );

    phase("nothing leaked", || {
        home.ok(&["vm", "delete", "--force", "ws"]);
        wait_until("no VM left", Duration::from_secs(30), || {
            home.json(&["vm", "list"]).as_array().unwrap().is_empty()
        });
        assert_eq!(home.json(&["gc", "--dry-run"]), serde_json::json!([]));
    });
}

/// [`phase`] for a phase that yields a value.
fn phase_value<T>(name: &str, f: impl FnOnce() -> T) -> T {
    let mut out = None;
    phase(name, || out = Some(f()));
    out.unwrap()
}
