//! The web UI in a real browser: Debian's chromium, headless, driven by
//! playwright-core (`tests/browser/web_ui.js`, installed into
//! `target/browser` by `scripts/deps.sh --test`) through the pages a person
//! uses, against a real daemon and a real QEMU guest in the test's own
//! network namespace. Screenshots of every page are kept in
//! `target/tmp/web-ui-screens/`.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::{TestHome, phase};

fn node_modules() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("target dir")
        .join("browser/node_modules");
    assert!(
        dir.join("playwright-core").is_dir(),
        "{} has no playwright-core: run scripts/deps.sh --test (it installs the browser driver)",
        dir.display()
    );
    dir
}

fn chromium() -> &'static str {
    let bin = "/usr/bin/chromium";
    assert!(
        std::path::Path::new(bin).is_file(),
        "{bin} is missing: run scripts/deps.sh --test (apt-get install chromium)"
    );
    bin
}

#[test]
fn a_person_drives_a_vm_through_the_web_ui_in_a_real_browser() {
    let home = TestHome::in_netns();
    common::shared_default_image(&home);
    let shots = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("web-ui-screens");
    let _ = std::fs::remove_dir_all(&shots);
    std::fs::create_dir_all(&shots).unwrap();

    // A checkout for the form's workspace field.
    let repo = home.path().join("project");
    std::fs::create_dir(&repo).unwrap();
    std::fs::write(repo.join("hello.txt"), "hello-from-the-host\n").unwrap();
    common::git(&repo, &["init", "-q", "-b", "main"]);
    common::git(&repo, &["add", "hello.txt"]);
    common::git(&repo, &["commit", "-q", "-m", "hello"]);

    let login = home.json(&["web"]);
    let url = login["url"].as_str().expect("banger web --json: url");
    let ns = home.netns.as_deref().unwrap();

    let mut result = serde_json::Value::Null;
    phase("the browser scenario", || {
        let out = Command::new("ip")
            .args(["netns", "exec", ns, "node"])
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/browser/web_ui.js"
            ))
            .env("NODE_PATH", node_modules())
            .env("CHROMIUM", chromium())
            .env("LOGIN_URL", url)
            .env("SHOTS", &shots)
            .env("VM", "web1")
            .env("WORKSPACE", &repo)
            .env("HOST_PORT", "18080")
            .env("GUEST_PORT", "8080")
            .env("EVIL_PORT", "18666")
            .output()
            .expect("run node (apt-get install nodejs)");
        let stdout = common::text(&out.stdout);
        eprintln!("{}", common::text(&out.stderr));
        let line = stdout
            .lines()
            .find_map(|l| l.strip_prefix("RESULT "))
            .unwrap_or_else(|| panic!("no RESULT line from the browser driver:\n{stdout}"));
        result = serde_json::from_str(line).unwrap();
        eprintln!(
            "browser result: {}",
            serde_json::to_string_pretty(&result).unwrap()
        );
        assert!(
            result["error"].is_null(),
            "the browser failed at step {:?}: {}\nscreenshots in {}",
            result["failed_step"],
            result["error"].as_str().unwrap_or_default(),
            shots.display()
        );
    });
    let r = &result;

    // Logging in.
    assert_eq!(r["no_cookie_status"], 401, "{r}");
    assert_eq!(r["login_landed"], "/", "{r}");
    assert_eq!(
        r["cookie"],
        serde_json::json!({"httpOnly": true, "sameSite": "Strict"})
    );
    assert_eq!(r["reused_login_status"], 401, "a login URL works once: {r}");

    // The create's stages appeared while it ran, ending in the VM running.
    let seen: Vec<&str> = r["stages_seen_before_end"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s.as_str())
        .collect();
    assert!(
        seen.contains(&"kernel boot") && seen.len() >= 4,
        "stages seen while the create ran: {seen:?}"
    );
    let stages: Vec<&str> = r["create_stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s[0].as_str().unwrap())
        .collect();
    // Every step after `image` (a stage only when the image must be built first).
    assert_eq!(stages, banger_wire::methods::CREATE_STEPS[1..], "{r}");
    assert!(
        r["dashboard_row"].as_str().unwrap().contains("running"),
        "{r}"
    );

    // The form's workspace went in after the create, where the guest reads it.
    assert_eq!(r["workspace_end"], "ok", "{r}");
    assert_eq!(r["workspace_dest"], "/root/project", "{r}");
    assert_eq!(r["workspace_file"], "hello-from-the-host", "{r}");
    // The terminal is the guest's shell.
    assert!(
        r["uname"].as_str().unwrap().starts_with("Linux web1 "),
        "{r}"
    );
    // The terminal's text is drawn in xterm's theme (white on black), not unstyled.
    assert_eq!(
        r["terminal_colors"],
        serde_json::json!({"fg": "rgb(255, 255, 255)", "bg": "rgb(0, 0, 0)"}),
        "{r}"
    );
    // Guest-written markup stays text.
    assert_eq!(r["console_has_literal_markup"], true, "{r}");
    assert_eq!(r["console_img_elements"], 0, "{r}");
    // The forward added in the page carries the guest's web server.
    assert_eq!(r["forward_status"], 200, "{r}");
    assert_eq!(r["forward_body"], "banger-web-ok", "{r}");

    // Another origin's page: its POST did nothing, its WebSocket never opened.
    assert_ne!(r["evil"]["ws"], "open", "{r}");
    assert_eq!(r["evil_ws_wrote"], false, "{r}");
    // A rebound name is refused.
    let rebind = r["rebind_page_status"].as_u64().unwrap();
    assert!((400..500).contains(&rebind), "rebind answered {rebind}");

    assert!(
        r["images"]
            .as_array()
            .unwrap()
            .contains(&"debian-12".into())
    );
    assert!(r["doctor_checks"].as_u64().unwrap() > 5, "{r}");
    assert_eq!(
        r["op_page_stages"].as_array().unwrap().len(),
        stages.len(),
        "{r}"
    );
    assert_eq!(r["dashboard_never_reloaded"], true, "{r}");
    assert_eq!(r["page_errors"], serde_json::json!([]), "the UI threw: {r}");

    // The browser's stop and delete did happen; the foreign page created nothing.
    assert_eq!(home.json(&["vm", "list"]), serde_json::json!([]));
    home.assert_host_clean("qemu-system-x86_64", "the web UI test");
    for shot in [
        "01-dashboard-empty",
        "02-create",
        "03-dashboard-running",
        "04-vm",
        "05-images",
        "06-doctor",
        "07-operation",
        "08-dashboard-stopped",
    ] {
        let f = shots.join(format!("{shot}.png"));
        assert!(
            std::fs::metadata(&f).is_ok_and(|m| m.len() > 1000),
            "{} missing",
            f.display()
        );
    }
    eprintln!(
        "web UI scenario: {} ms in the browser; screenshots in {}",
        r["total_ms"],
        shots.display()
    );
}
