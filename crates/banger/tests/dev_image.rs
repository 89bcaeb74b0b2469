//! The `dev` image end to end: built from its recipe (Debian packages, and
//! opencode from the npm registry installed on the host), a VM of it that
//! `vm create` reports ready only once opencode answers on port 4096, the
//! tools it lists, and Docker inside the guest building and running a local
//! image with no registry.
//!
//! The image is built once per machine and per version of its inputs
//! (`common::shared_dev_image`), like the default image.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{TestHome, phase, text, wait_until};

/// `sh -c SCRIPT` in a running guest, through the agent; must succeed.
fn guest_sh_ok(home: &TestHome, vm: &str, script: &str) -> String {
    home.ok(&["vm", "exec", vm, "--", "sh", "-c", script])
}

/// `vm create ARGS --json`, timed; the stages it went through, each with
/// how long it took.
fn create(home: &TestHome, args: &[&str]) -> (f64, Vec<String>) {
    let mut all = vec!["vm", "create", "--json"];
    all.extend_from_slice(args);
    let t = Instant::now();
    let out = home.run(&all);
    let secs = t.elapsed().as_secs_f64();
    assert!(
        out.status.success(),
        "vm create {args:?}: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let stages = text(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["event"]["status"] == "done")
        .filter_map(|v| {
            let stage = v["event"]["stage"].as_str()?;
            let ms = v["event"]["elapsed_ms"].as_u64().unwrap_or_default();
            Some(format!("{stage} {:.1}s", ms as f64 / 1000.0))
        })
        .collect();
    (secs, stages)
}

/// `curl URL` from the daemon's network namespace (where port forwards
/// listen on 127.0.0.1): the HTTP status, or None when nothing answers.
fn curl_in_banger_ns(home: &TestHome, url: &str) -> Option<String> {
    let ns = home.netns.as_deref().expect("a namespaced home");
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "curl", "-s", "-o", "/dev/null"])
        .args(["-w", "%{http_code}", "-m", "10", url])
        .output()
        .expect("curl (apt install curl)");
    out.status.success().then(|| text(&out.stdout))
}

#[test]
fn dev_image_serves_opencode_runs_docker_and_has_the_tools() {
    let home = TestHome::in_netns();

    phase(
        "the default and dev images (built once per machine)",
        || {
            let t = Instant::now();
            common::shared_default_image(&home);
            common::shared_dev_image(&home);
            eprintln!(
                "images ready (built or from the cache) in {:.1}s",
                t.elapsed().as_secs_f64()
            );
        },
    );

    phase("a default-image VM, for comparison", || {
        let (secs, stages) = create(&home, &["--name", "base", "--no-ssh-wait"]);
        eprintln!("default image: vm create took {secs:.1}s ({stages:?})");
        assert!(
            !stages.iter().any(|s| s.starts_with("services ready")),
            "{stages:?}"
        );
        home.ok(&["vm", "delete", "--force", "base"]);
    });

    phase(
        "--init fast on the dev image is refused before anything is made",
        || {
            let out = home.run(&[
                "vm", "create", "--name", "devfast", "--image", "dev", "--init", "fast",
            ]);
            let err = text(&out.stderr);
            assert!(!out.status.success(), "{err}");
            assert!(
                err.contains("opencode") && err.contains("--init systemd"),
                "the refusal names the service and the fix: {err}"
            );
            // Refused before the VM's row existed: a create that failed
            // later (after waiting out the services' timeout) keeps a
            // `failed` row.
            assert_eq!(home.json(&["vm", "list"]), serde_json::json!([]));
        },
    );

    phase(
        "a dev VM is ready only once opencode answers HTTP on 4096",
        || {
            let (secs, stages) = create(
                &home,
                &[
                    "--name",
                    "dev",
                    "--image",
                    "dev",
                    "--no-ssh-wait",
                    "-p",
                    "14096:4096",
                ],
            );
            eprintln!("dev image: vm create took {secs:.1}s ({stages:?})");
            assert!(
                stages.iter().any(|s| s.starts_with("services ready ")),
                "{stages:?}"
            );
            // Right after the create, with no waiting of our own.
            let code = guest_sh_ok(
                &home,
                "dev",
                "curl -s -o /dev/null -w '%{http_code}' -m 30 http://127.0.0.1:4096/",
            );
            assert_eq!(code, "200");
            assert_eq!(
                guest_sh_ok(&home, "dev", "systemctl is-active opencode.service").trim(),
                "active"
            );
        },
    );

    phase("opencode through a port forward from the host", || {
        wait_until("the forward answers", Duration::from_secs(20), || {
            curl_in_banger_ns(&home, "http://127.0.0.1:14096/").as_deref() == Some("200")
        });
    });

    phase("the tools the image lists are there and run", || {
        let tools = [
            "git", "tmux", "make", "gcc", "cc", "curl", "ping", "dig", "jq", "rg", "unzip", "sudo",
            "python3", "pip3", "node", "npm", "docker", "opencode", "mise",
        ];
        let script: String = tools
            .iter()
            .map(|t| format!("command -v {t} >/dev/null || echo missing: {t}; "))
            .collect();
        assert_eq!(guest_sh_ok(&home, "dev", &script), "");
        let versions = guest_sh_ok(
            &home,
            "dev",
            "git --version && tmux -V && node --version && python3 --version && rg --version | head -1 \
             && python3 -m venv --without-pip /tmp/venv && /tmp/venv/bin/python -c 'print(\"venv ok\")' \
             && mise --version",
        );
        eprintln!("{versions}");
        assert!(versions.contains("venv ok"), "{versions}");
    });

    phase(
        "docker build and docker run of a local image, no registry",
        || {
            wait_until("dockerd answers", Duration::from_secs(120), || {
                home.run(&["vm", "exec", "dev", "--", "docker", "info"])
                    .status
                    .success()
            });
            let t = Instant::now();
            let out = guest_sh_ok(
                &home,
                "dev",
                "set -e; mkdir -p /root/img && cd /root/img \
                 && cp /bin/busybox . \
                 && printf 'FROM scratch\\nCOPY busybox /bin/busybox\\nCMD [\"/bin/busybox\", \"echo\", \"hello from a local image\"]\\n' > Dockerfile \
                 && docker build -q -t banger-hello . >/dev/null \
                 && docker run --rm banger-hello \
                 && docker run --rm --network none banger-hello /bin/busybox sh -c 'echo $((6 * 7))'",
            );
            eprintln!("docker build + 2 runs in {:.1}s", t.elapsed().as_secs_f64());
            assert_eq!(out, "hello from a local image\n42\n");
        },
    );

    home.ok(&["vm", "delete", "--force", "dev"]);
}
