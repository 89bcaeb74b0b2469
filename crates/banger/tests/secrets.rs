//! Secrets end to end on a real QEMU guest: `banger secret`, `vm create
//! --secret NAME@HOST`, the daemon's HTTPS proxy putting the value into
//! requests to that host only, and the value's absence from the guest (its
//! environment, files and whole memory), `vm show`, and the logs.
//!
//! As in `network.rs`, everything runs in namespaces the test makes: banger's
//! own, and an "outside" one behind a veth pair with an HTTPS server (its
//! certificate from a CA the test makes, which banger is told to trust with
//! `[secrets] upstream_ca`) that records the headers it receives, and a DNS
//! resolver answering `api.test` and `other.test`.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{DNS_SERVER, OUTSIDE, OutsideNet, TestHome, phase, sh, sh_ok, text, wait_until};

/// HTTPS on port 443: appends each GET's `Authorization` header and each
/// POST's body (with the Host they came for) to `argv[3]`, answers `ok`
/// (never what it got: the value must not reach the guest through an echo).
const HTTPS_SERVER: &str = r#"
import http.server, ssl, sys
log = open(sys.argv[3], "a")
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        log.write("%s %s\n" % (self.headers.get("Host"), self.headers.get("Authorization")))
        log.flush()
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode()
        log.write("%s body %s\n" % (self.headers.get("Host"), body))
        log.flush()
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")
    def log_message(self, *a):
        pass
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(sys.argv[1], sys.argv[2])
srv = http.server.HTTPServer(("0.0.0.0", 443), H)
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
srv.serve_forever()
"#;

/// QMP: `dump-guest-memory` of the whole guest to the file `argv[2]`.
const QMP_DUMP: &str = r#"
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
f = s.makefile("rw")
f.readline()
def cmd(c, args=None):
    f.write(json.dumps({"execute": c, "arguments": args or {}}) + "\n")
    f.flush()
    while True:
        r = json.loads(f.readline())
        if "return" in r or "error" in r:
            return r
print(json.dumps(cmd("qmp_capabilities")))
print(json.dumps(cmd("dump-guest-memory", {"paging": False, "protocol": "file:" + sys.argv[2]})))
"#;

struct Outside {
    net: OutsideNet,
    /// What the HTTPS server received: `HOST AUTHORIZATION` lines.
    received: std::path::PathBuf,
}

impl Outside {
    fn new(home: &TestHome) -> Outside {
        let mut outside = Outside {
            net: OutsideNet::new(home),
            received: home.path().join("received.log"),
        };
        let banger_ns = outside.net.banger_ns.clone();

        // The server's own CA, and its certificate for both names.
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::default();
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "secrets test upstream CA");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(vec!["api.test".into(), "other.test".into()])
            .unwrap()
            .signed_by(&leaf_key, &issuer)
            .unwrap();
        let dir = home.path();
        std::fs::write(dir.join("upstream-ca.pem"), ca_cert.pem()).unwrap();
        std::fs::write(dir.join("server.pem"), leaf.pem()).unwrap();
        std::fs::write(dir.join("server.key"), leaf_key.serialize_pem()).unwrap();
        std::fs::write(
            dir.join("config.toml"),
            format!(
                "[secrets]\nupstream_ca = {:?}\n",
                dir.join("upstream-ca.pem").display().to_string()
            ),
        )
        .unwrap();

        let received = outside.received.display().to_string();
        outside.net.python(
            HTTPS_SERVER,
            &[
                &dir.join("server.pem").display().to_string(),
                &dir.join("server.key").display().to_string(),
                &received,
            ],
            Stdio::null(),
        );
        outside.net.python(
            DNS_SERVER,
            &[OUTSIDE, "api.test", "other.test"],
            Stdio::null(),
        );
        wait_until("the outside HTTPS server", Duration::from_secs(10), || {
            Command::new("ip")
                .args([
                    "netns", "exec", &banger_ns, "curl", "-sf", "-m", "5", "--cacert",
                ])
                .arg(dir.join("upstream-ca.pem"))
                .args([
                    "--resolve",
                    &format!("api.test:443:{OUTSIDE}"),
                    "https://api.test/",
                ])
                .output()
                .is_ok_and(|o| o.status.success())
        });
        outside
    }

    fn received(&self) -> String {
        std::fs::read_to_string(&self.received).unwrap_or_default()
    }

    /// `vm` sends `$TOKEN` to api.test as a bearer token (answered `ok`),
    /// and the server receives `value` in its place.
    fn gets_value_from(&self, home: &TestHome, vm: &str, value: &str) {
        let before = self.received();
        assert_eq!(sh_ok(home, vm, BEARER), "ok");
        let got = self.received();
        assert!(
            got[before.len()..].contains(&format!("api.test Bearer {value}")),
            "{got}"
        );
    }
}

/// `$TOKEN` as a bearer token to api.test, from the guest.
const BEARER: &str = "curl -sS -m 20 -H \"Authorization: Bearer $TOKEN\" https://api.test/";

/// `banger secret set NAME` with `value` on standard input.
fn set_secret(home: &TestHome, name: &str, value: &str) -> std::process::Output {
    use std::io::Write;
    let mut child = home
        .banger()
        .args(["secret", "set", name])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{value}\n").as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// The elements of the install's `secret-guests` set, and whether the
/// secrets proxy listens.
fn proxy_state(home: &TestHome) -> (String, bool) {
    let ns = home.netns.as_deref().unwrap();
    let (_, table) = home.host_names();
    let set = Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "nft",
            "-j",
            "list",
            "set",
            "inet",
            &table,
            "secret-guests",
        ])
        .output()
        .unwrap();
    assert!(set.status.success(), "{set:?}");
    let set: serde_json::Value = serde_json::from_slice(&set.stdout).unwrap();
    let elems = set["nftables"][1]["set"]
        .get("elem")
        .map(|e| e.to_string())
        .unwrap_or_default();
    let ss = Command::new("ip")
        .args(["netns", "exec", ns, "ss", "-Hltn", "sport = :4443"])
        .output()
        .unwrap();
    (elems, !text(&ss.stdout).trim().is_empty())
}

#[test]
fn secret_names_and_values_are_checked_before_the_daemon() {
    let home = TestHome::in_netns();
    // A bad name is a usage error (clap: exit 2), the daemon never asked.
    for bad in ["token", "1X", "A-B"] {
        let out = home.run(&["secret", "set", bad]);
        assert_eq!(out.status.code(), Some(2), "{bad}: {out:?}");
        assert!(text(&out.stderr).contains("invalid"), "{out:?}");
    }
    let out = home.run(&["vm", "create", "--secret", "TOKEN"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let out = home.run(&["vm", "create", "--secret", "TOKEN@*.test,api"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    // The value comes from standard input, never the command line.
    let out = home.run(&["secret", "set", "TOKEN", "value"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let out = set_secret(&home, "TOKEN", "from-stdin");
    assert!(out.status.success(), "{out:?}");
    let stored = home.path().join("state/secrets/TOKEN");
    assert_eq!(std::fs::read_to_string(&stored).unwrap(), "from-stdin");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&stored).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let file = home.path().join("value.txt");
    std::fs::write(&file, "from-file\n").unwrap();
    home.ok(&[
        "secret",
        "set",
        "TOKEN",
        "--file",
        &file.display().to_string(),
    ]);
    assert_eq!(std::fs::read_to_string(&stored).unwrap(), "from-file");
    let list = home.json(&["secret", "list"]);
    assert_eq!(list[0]["name"], "TOKEN", "{list}");
    assert!(!list.to_string().contains("from-file"), "{list}");
    // A VM cannot name a secret that is not stored.
    let out = home.run(&["vm", "create", "--secret", "NOPE@api.test"]);
    assert!(
        text(&out.stderr).contains("no secret named NOPE"),
        "{out:?}"
    );
    home.ok(&["secret", "rm", "TOKEN"]);
    assert!(!stored.exists());
    assert_eq!(home.json(&["secret", "list"]), serde_json::json!([]));
}

#[test]
fn the_proxy_puts_the_value_in_only_for_its_host_and_the_guest_never_holds_it() {
    let home = TestHome::in_netns();
    let outside = Outside::new(&home);
    let value = format!(
        "s3cret-{:016x}{:016x}",
        fastrand::u64(..),
        fastrand::u64(..)
    );
    // What the guest searches its files for: the value's shape, not the
    // value (the search's own pattern is in the guest's memory, and grep
    // makes a literal of whatever it can).
    let pattern = "s3cret-[0-9a-f]{32}";
    common::shared_default_image(&home);
    assert!(set_secret(&home, "TOKEN", &value).status.success());
    // A second secret for the same host, in headers only.
    let key = format!("keyvalue-{:016x}", fastrand::u64(..));
    assert!(set_secret(&home, "KEY", &key).status.success());

    phase("a VM with the secret for api.test", || {
        // Bodies only for a secret that opts in, and only one named by --secret.
        let out = home.run(&[
            "vm",
            "create",
            "--secret",
            "KEY@api.test",
            "--secret-in-body",
            "TOKEN",
        ]);
        assert!(text(&out.stderr).contains("--secret TOKEN@HOST"), "{out:?}");
        home.ok(&[
            "vm",
            "create",
            "--name",
            "sec",
            "--memory",
            "384",
            "--no-ssh-wait",
            "-q",
            "--secret",
            "TOKEN@api.test",
            "--secret",
            "KEY@api.test",
            "--secret-in-body",
            "TOKEN",
        ]);
    });
    let show = home.json(&["vm", "show", "sec"]);
    // Secrets are listed by name: KEY, TOKEN.
    let key_placeholder = show["secrets"][0]["placeholder"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(show["secrets"][0]["in_body"], false);
    assert_eq!(show["secrets"][1]["in_body"], true);
    let placeholder = show["secrets"][1]["placeholder"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(!show.to_string().contains(&key), "{show}");
    assert!(
        placeholder.starts_with("BANGER_PLACEHOLDER_TOKEN_"),
        "{show}"
    );
    assert_eq!(show["secrets"][1]["hosts"], serde_json::json!(["api.test"]));
    assert!(!show.to_string().contains(&value), "{show}");
    let (elems, listening) = proxy_state(&home);
    assert!(
        elems.contains(show["guest_ip"].as_str().unwrap()),
        "{elems}"
    );
    assert!(listening);

    phase("the guest holds the placeholder", || {
        assert_eq!(sh_ok(&home, "sec", "printf %s \"$TOKEN\""), placeholder);
        assert_eq!(
            sh_ok(&home, "sec", "cat /run/banger/secrets/TOKEN"),
            placeholder
        );
        let profile = sh_ok(
            &home,
            "sec",
            "cat /etc/profile.d/banger-secrets.sh /etc/environment",
        );
        assert!(
            profile.contains(&format!("TOKEN={placeholder}")),
            "{profile}"
        );
    });

    phase(
        "api.test receives the value, other.test the placeholder",
        || {
            let out = sh_ok(
                &home,
                "sec",
                // other.test's own certificate is not one the guest trusts
                // (below): -k, what it receives is the point here.
                "curl -sS -m 20 -H \"Authorization: Bearer $TOKEN\" https://api.test/ && \
             curl -sSk -m 20 -H \"Authorization: Bearer $TOKEN\" https://other.test/",
            );
            assert_eq!(out, "okok");
            let got = outside.received();
            assert!(got.contains(&format!("api.test Bearer {value}")), "{got}");
            assert!(
                got.contains(&format!("other.test Bearer {placeholder}")),
                "{got}"
            );
            assert!(
                !got.contains(&format!("api.test Bearer {placeholder}")),
                "{got}"
            );
            // In a body: TOKEN (opted in) is replaced, KEY is not.
            let out = sh_ok(
                &home,
                "sec",
                "curl -sS -m 20 -d \"t=$TOKEN&k=$KEY\" https://api.test/",
            );
            assert_eq!(out, "ok");
            let got = outside.received();
            assert!(
                got.contains(&format!("api.test body t={value}&k={key_placeholder}")),
                "{got}"
            );
            // other.test's TLS was not intercepted: the guest saw the server's
            // own certificate, which it does not trust without the test CA.
            let (code, _, err) = sh(
                &home,
                "sec",
                "curl -sS -m 20 -o /dev/null https://other.test/",
            );
            assert_ne!(code, 0, "{err}");
            assert!(err.contains("certificate"), "{err}");
        },
    );

    phase("nowhere in the guest: files, memory", || {
        let (code, out, err) = sh(
            &home,
            "sec",
            &format!(
                "grep -rlsE '{pattern}' / --exclude-dir=proc --exclude-dir=sys --exclude-dir=dev"
            ),
        );
        assert_eq!(code, 1, "found in the guest's files: {out}{err}");
        let vm_dir = show["vm_dir"].as_str().unwrap();
        let dump = home.path().join("guest.mem");
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                home.netns.as_deref().unwrap(),
                "python3",
                "-c",
                QMP_DUMP,
            ])
            .arg(format!("{vm_dir}/qmp.sock"))
            .arg(&dump)
            .output()
            .unwrap();
        assert!(text(&out.stdout).contains("\"return\": {}"), "{out:?}");
        let grep = |needle: &str| {
            Command::new("grep")
                .args(["-qaF", needle])
                .arg(&dump)
                .status()
                .unwrap()
                .code()
        };
        assert!(std::fs::metadata(&dump).unwrap().len() > 300 << 20);
        // The dump is worth searching: the placeholder is in it.
        assert_eq!(grep(&placeholder), Some(0));
        assert_eq!(grep(&value), Some(1), "the value is in the guest's memory");
        assert_eq!(grep(&key), Some(1), "KEY's value is in the guest's memory");
        if std::env::var_os("KEEP_DUMP").is_none() {
            std::fs::remove_file(&dump).unwrap();
        }
    });

    phase(
        "the proxy reaches nothing the VM's policy does not allow",
        || {
            let before = outside.received();
            home.ok(&["vm", "net", "set", "sec", "allow=192.0.2.1/32:443"]);
            // Past DNS (which the policy would refuse): the address itself.
            let (code, _, err) = sh(
                &home,
                "sec",
                &format!(
                    "curl -sS -m 5 -H \"Authorization: Bearer $TOKEN\" --resolve api.test:443:{OUTSIDE} https://api.test/"
                ),
            );
            assert_ne!(code, 0, "{err}");
            assert_eq!(outside.received(), before);
            home.ok(&["vm", "net", "set", "sec", "nat"]);
            // Made again, the guard kept the redirect.
            assert!(
                proxy_state(&home)
                    .0
                    .contains(show["guest_ip"].as_str().unwrap())
            );
            assert_eq!(sh_ok(&home, "sec", BEARER), "ok");
        },
    );

    phase(
        "a new daemon serves the adopted guest's secrets again",
        || {
            home.restart_daemon(None);
            outside.gets_value_from(&home, "sec", &value);
        },
    );

    phase(
        "a fork keeps the secrets (its snapshot too, and only placeholders)",
        || {
            home.ok(&["vm", "fork", "sec", "--name", "secf", "-q"]);
            assert_eq!(sh_ok(&home, "secf-1", "printf %s \"$TOKEN\""), placeholder);
            outside.gets_value_from(&home, "secf-1", &value);
            let snap = home.json(&["snapshot", "list"])[0].clone();
            assert_eq!(snap["secrets"], serde_json::json!(["KEY", "TOKEN"]));
            let grep = Command::new("grep")
                .args(["-rqaF", &value])
                .arg(snap["dir"].as_str().unwrap())
                .status()
                .unwrap();
            assert_eq!(grep.code(), Some(1), "the value is in the snapshot");
            home.ok(&["vm", "delete", "--force", "secf-1"]);
        },
    );
    phase("nowhere in the logs; rm refused while used", || {
        for v in [&value, &key] {
            assert!(!home.daemon_log().contains(v.as_str()));
            assert!(!home.helper_log().contains(v.as_str()));
        }
        let out = home.run(&["secret", "rm", "TOKEN"]);
        assert!(!out.status.success());
        assert!(text(&out.stderr).contains("sec"), "{out:?}");
        assert_eq!(
            home.json(&["secret", "list"])[0]["used_by"],
            serde_json::json!(["sec"])
        );
    });

    phase("delete leaves nothing", || {
        home.ok(&["vm", "delete", "--force", "sec"]);
        assert_eq!(proxy_state(&home), (String::new(), false));
        home.assert_host_clean("qemu-system-x86_64", "delete");
        // The fork's snapshot still keeps TOKEN for what it may restore.
        let snap = home.json(&["snapshot", "list"])[0]["name"]
            .as_str()
            .unwrap()
            .to_owned();
        let out = home.run(&["secret", "rm", "TOKEN"]);
        assert!(!out.status.success());
        let err = text(&out.stderr);
        assert!(
            err.contains(&format!("kept by snapshot(s) {snap}")),
            "{err}"
        );
        home.ok(&["snapshot", "delete", &snap]);
        home.ok(&["secret", "rm", "TOKEN"]);
        home.ok(&["secret", "rm", "KEY"]);
    });
}

#[test]
fn a_create_with_a_secret_that_fails_leaves_nothing() {
    let home = TestHome::in_netns();
    common::shared_default_image(&home);
    assert!(set_secret(&home, "TOKEN", "v").status.success());
    // Fails once the guest has its placeholders and the proxy serves it.
    home.restart_daemon(Some("agent ready"));
    let out = home.run(&[
        "vm",
        "create",
        "--name",
        "doomed",
        "--memory",
        "384",
        "--no-ssh-wait",
        "-q",
        "--secret",
        "TOKEN@api.test",
    ]);
    assert!(!out.status.success(), "{out:?}");
    assert!(text(&out.stderr).contains("injected fault"), "{out:?}");
    assert_eq!(proxy_state(&home), (String::new(), false));
    assert_eq!(
        home.json(&["secret", "list"])[0]["used_by"],
        serde_json::json!([])
    );
    home.assert_host_clean("qemu-system-x86_64", "a failed create");
}

/// A desktop keyring of the test's own: a session bus on a socket in a
/// temporary directory and GNOME Keyring's Secret Service on it, its
/// login collection unlocked with a password; both killed on drop.
struct Keyring {
    dir: tempfile::TempDir,
    address: String,
    bus: std::process::Child,
}

impl Keyring {
    fn new() -> Keyring {
        let dir = tempfile::tempdir().unwrap();
        let address = format!("unix:path={}/bus", dir.path().display());
        let bus = Command::new("dbus-daemon")
            .args(["--session", "--nofork", "--nopidfile"])
            .arg(format!("--address={address}"))
            .stderr(Stdio::null())
            .spawn()
            .expect("dbus-daemon (apt install dbus-daemon)");
        let socket = dir.path().join("bus");
        wait_until("the session bus", Duration::from_secs(10), || {
            socket.exists()
        });
        let keyring = Keyring { dir, address, bus };
        let mut unlock = keyring
            .env(&mut Command::new("gnome-keyring-daemon"))
            .args(["--unlock", "--components=secrets", "--daemonize"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("gnome-keyring-daemon (apt install gnome-keyring)");
        use std::io::Write;
        unlock
            .stdin
            .take()
            .unwrap()
            .write_all(b"test-password")
            .unwrap();
        assert!(unlock.wait().unwrap().success());
        wait_until("the keyring on the bus", Duration::from_secs(10), || {
            keyring.items("banger-secret", "-").is_some()
        });
        keyring
    }

    /// `cmd` with this keyring's session: its bus, and a home of its own.
    fn env<'a>(&self, cmd: &'a mut Command) -> &'a mut Command {
        let home = self.dir.path().join("home");
        let run = self.dir.path().join("run");
        for d in [&home, &run] {
            std::fs::create_dir_all(d).unwrap();
        }
        cmd.env("DBUS_SESSION_BUS_ADDRESS", &self.address)
            .env("HOME", &home)
            .env("XDG_DATA_HOME", home.join("data"))
            .env("XDG_RUNTIME_DIR", &run)
    }

    /// `dbus-send --print-reply` of Secret Service method `method` with
    /// `args`, on this keyring's bus.
    fn call(&self, method: &str, args: &[&str]) -> std::process::Output {
        self.env(&mut Command::new("dbus-send"))
            .args([
                "--session",
                "--print-reply",
                "--dest=org.freedesktop.secrets",
                "/org/freedesktop/secrets",
            ])
            .arg(format!("org.freedesktop.Secret.Service.{method}"))
            .args(args)
            .output()
            .expect("dbus-send (apt install dbus-bin)")
    }

    /// The unlocked items whose attribute `key` is `value`, as the Secret
    /// Service lists them (`None`: no answer).
    fn items(&self, key: &str, value: &str) -> Option<String> {
        let out = self.call(
            "SearchItems",
            &[&format!("dict:string:string:{key},{value}")],
        );
        out.status.success().then(|| {
            text(&out.stdout)
                .lines()
                .filter(|l| l.contains("object path"))
                .map(|l| l.trim().to_owned())
                .collect::<Vec<_>>()
                .join("\n")
        })
    }

    /// Lock the login collection.
    fn lock(&self) {
        let out = self.call(
            "Lock",
            &["array:objpath:/org/freedesktop/secrets/collection/login"],
        );
        assert!(out.status.success(), "{out:?}");
    }
}

impl Drop for Keyring {
    fn drop(&mut self) {
        // The keyring daemon leaves with its bus.
        let _ = self.bus.kill();
        let _ = self.bus.wait();
    }
}

#[test]
fn a_secret_in_the_desktop_keyring_is_used_and_never_written_to_disk() {
    let home = TestHome::in_netns();
    let outside = Outside::new(&home);
    common::shared_default_image(&home);
    let keyring = Keyring::new();
    let config = home.path().join("config.toml");
    let with_store = |store: &str| {
        let mut c = std::fs::read_to_string(&config).unwrap();
        c.push_str(&format!("store = {store:?}\n"));
        c
    };
    let plain = std::fs::read_to_string(&config).unwrap();
    let secrets_dir = home.path().join("state/secrets");
    let value = format!("kr-{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..));
    assert!(plain.contains("[secrets]"), "{plain}");

    phase(
        "store = keyring where none answers: refused, naming the fix, nothing kept",
        || {
            std::fs::write(&config, with_store("keyring")).unwrap();
            home.restart_daemon(None);
            let out = set_secret(&home, "TOKEN", &value);
            assert!(!out.status.success());
            let err = text(&out.stderr);
            assert!(
                err.contains("no desktop keyring answers") && err.contains("store = \"file\""),
                "{err}"
            );
            assert_eq!(home.json(&["secret", "list"]), serde_json::json!([]));
        },
    );
    phase(
        "auto with a keyring on the daemon's session bus: the value goes there",
        || {
            std::fs::write(&config, &plain).unwrap();
            home.ok(&["daemon", "stop"]);
            let out = keyring
                .env(&mut home.banger())
                .args(["daemon", "start"])
                .output()
                .unwrap();
            assert!(out.status.success(), "{out:?}");
            let out = set_secret(&home, "TOKEN", &value);
            assert!(out.status.success(), "{out:?}");
            assert!(text(&out.stdout).contains("(keyring)"), "{out:?}");
            let listed = home.json(&["secret", "list"]);
            assert_eq!(listed[0]["name"], "TOKEN");
            assert_eq!(listed[0]["store"], "keyring");
            assert!(!secrets_dir.join("TOKEN").exists());
            assert_eq!(
                std::fs::read(secrets_dir.join("TOKEN.keyring")).unwrap(),
                b""
            );
            let items = keyring.items("banger-secret", "TOKEN").unwrap();
            assert_eq!(items.lines().count(), 1, "{items}");
            // Not in any file of the install.
            let grep = Command::new("grep")
                .args(["-rqF", &value])
                .arg(home.path())
                .status()
                .unwrap();
            assert_eq!(grep.code(), Some(1));
        },
    );
    phase(
        "a VM's requests to its host carry the keyring's value",
        || {
            home.ok(&[
                "vm",
                "create",
                "--name",
                "kr",
                "--memory",
                "384",
                "--no-ssh-wait",
                "-q",
                "--secret",
                "TOKEN@api.test",
            ]);
            outside.gets_value_from(&home, "kr", &value);
        },
    );
    phase(
        "a locked keyring: the request fails, and the log says why",
        || {
            keyring.lock();
            let before = outside.received();
            let (code, _, err) = sh(&home, "kr", BEARER);
            assert_ne!(code, 0, "{err}");
            assert_eq!(outside.received(), before);
            let log = home.daemon_log();
            assert!(log.contains("the desktop keyring is locked"), "{log}");
            assert!(!log.contains(&value));
        },
    );
    phase("rm takes it out of the keyring", || {
        home.ok(&["vm", "delete", "--force", "kr"]);
        let out = keyring
            .env(&mut Command::new("sh"))
            .args(["-c", "printf test-password | gnome-keyring-daemon --unlock --components=secrets --replace --daemonize"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        wait_until(
            "the keyring unlocked again",
            Duration::from_secs(10),
            || {
                keyring
                    .items("banger-secret", "TOKEN")
                    .is_some_and(|i| i.lines().count() == 1)
            },
        );
        home.ok(&["secret", "rm", "TOKEN"]);
        assert_eq!(keyring.items("banger-secret", "TOKEN").unwrap(), "");
        assert!(!secrets_dir.join("TOKEN.keyring").exists());
        assert_eq!(home.json(&["secret", "list"]), serde_json::json!([]));
        home.assert_host_clean("qemu-system-x86_64", "delete");
    });
}
