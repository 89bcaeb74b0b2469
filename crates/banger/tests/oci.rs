//! OCI images end to end: Debian's `docker-registry` on 127.0.0.1 inside
//! the test's network namespace, an image this test assembles itself
//! (a static busybox base; whiteouts, an opaque directory, links, odd modes
//! and owners; gzip, plain and zstd layers) pushed with skopeo, pulled by
//! banger and booted: the guest must see exactly what the layers say.
//! Hostile layers are refused and leave nothing behind.
//!
//! Needs root, iproute2, docker-registry, skopeo, zstd and busybox-static
//! (`scripts/deps.sh --test`); a missing tool fails the test.

mod common;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{TestHome, kill_9, phase, text, wait_until};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

fn require(tool: &str, package: &str) -> PathBuf {
    let found = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .chain(["/usr/sbin".into(), "/sbin".into(), "/bin".into()])
        .map(|d| d.join(tool))
        .find(|p| p.is_file());
    found.unwrap_or_else(|| {
        panic!("{tool} is missing: apt install {package} (scripts/deps.sh --test installs it)")
    })
}

fn digest(data: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(data))
}

// ---------------------------------------------------------------------------
// Layers, built entry by entry (raw names, so hostile ones can be written).

struct Layer {
    b: tar::Builder<Vec<u8>>,
}

fn put(field: &mut [u8], value: &str) {
    field[..value.len()].copy_from_slice(value.as_bytes());
}

impl Layer {
    fn new() -> Layer {
        Layer {
            b: tar::Builder::new(Vec::new()),
        }
    }

    fn entry(
        &mut self,
        name: &str,
        kind: tar::EntryType,
        mode: u32,
        owner: u64,
        link: Option<&str>,
        data: &[u8],
    ) -> &mut Layer {
        let mut h = tar::Header::new_gnu();
        put(&mut h.as_old_mut().name, name);
        if let Some(l) = link {
            put(&mut h.as_old_mut().linkname, l);
        }
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(owner);
        h.set_gid(owner);
        h.set_mtime(1_700_000_000);
        h.set_size(data.len() as u64);
        h.set_cksum();
        self.b.append(&h, data).unwrap();
        self
    }

    fn dir(&mut self, name: &str) -> &mut Layer {
        self.entry(name, tar::EntryType::Directory, 0o755, 0, None, b"")
    }

    fn file(&mut self, name: &str, data: &[u8]) -> &mut Layer {
        self.entry(name, tar::EntryType::Regular, 0o644, 0, None, data)
    }

    fn symlink(&mut self, name: &str, target: &str) -> &mut Layer {
        self.entry(name, tar::EntryType::Symlink, 0o777, 0, Some(target), b"")
    }

    fn hardlink(&mut self, name: &str, target: &str) -> &mut Layer {
        self.entry(name, tar::EntryType::Link, 0o644, 0, Some(target), b"")
    }

    fn tar(&mut self) -> Vec<u8> {
        std::mem::replace(&mut self.b, tar::Builder::new(Vec::new()))
            .into_inner()
            .unwrap()
    }
}

#[derive(Clone, Copy)]
enum Compression {
    None,
    Gzip,
    Zstd,
}

/// An OCI image layout (`oci:DIR`) the test fills and skopeo pushes.
struct OciDir {
    dir: PathBuf,
    index: Vec<Value>,
}

impl OciDir {
    fn new(dir: PathBuf) -> OciDir {
        std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
        std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        OciDir {
            dir,
            index: Vec::new(),
        }
    }

    fn blob(&self, data: &[u8]) -> String {
        let d = digest(data);
        std::fs::write(self.dir.join("blobs/sha256").join(&d[7..]), data).unwrap();
        d
    }

    /// Adds a layer; returns (descriptor, diff id).
    fn layer(&self, tar: Vec<u8>, c: Compression) -> (Value, String) {
        let diff_id = digest(&tar);
        let (data, media_type) = match c {
            Compression::None => (tar, "application/vnd.oci.image.layer.v1.tar"),
            Compression::Gzip => {
                let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                e.write_all(&tar).unwrap();
                (
                    e.finish().unwrap(),
                    "application/vnd.oci.image.layer.v1.tar+gzip",
                )
            }
            Compression::Zstd => {
                let mut child = Command::new(require("zstd", "zstd"))
                    .args(["-q", "-c", "-3"])
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .spawn()
                    .unwrap();
                let mut stdin = child.stdin.take().unwrap();
                let writer = std::thread::spawn(move || stdin.write_all(&tar).unwrap());
                let out = child.wait_with_output().unwrap();
                writer.join().unwrap();
                assert!(out.status.success());
                (out.stdout, "application/vnd.oci.image.layer.v1.tar+zstd")
            }
        };
        let d = self.blob(&data);
        (
            json!({"mediaType": media_type, "digest": d, "size": data.len()}),
            diff_id,
        )
    }

    /// A manifest of `layers` for `arch`; returns its descriptor.
    fn manifest(&self, layers: &[(Value, String)], arch: &str) -> Value {
        self.manifest_labelled(layers, arch, json!({}))
    }

    /// [`Layout::manifest`] with the image config's `Labels`.
    fn manifest_labelled(&self, layers: &[(Value, String)], arch: &str, labels: Value) -> Value {
        let config = json!({
            "architecture": arch,
            "os": "linux",
            "config": {"Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"], "Labels": labels},
            "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|l| l.1.clone()).collect::<Vec<_>>()},
        })
        .to_string();
        let cd = self.blob(config.as_bytes());
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": config.len()},
            "layers": layers.iter().map(|l| l.0.clone()).collect::<Vec<_>>(),
        })
        .to_string();
        let md = self.blob(manifest.as_bytes());
        json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": md,
            "size": manifest.len(),
            "platform": {"architecture": arch, "os": "linux"},
        })
    }

    /// Tags a manifest (or an index of several) in the layout.
    fn tag(&mut self, tag: &str, manifests: &[Value], as_index: bool) {
        let mut desc = if !as_index {
            manifests[0].clone()
        } else {
            let index = json!({
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.index.v1+json",
                "manifests": manifests,
            })
            .to_string();
            let d = self.blob(index.as_bytes());
            json!({"mediaType": "application/vnd.oci.image.index.v1+json", "digest": d, "size": index.len()})
        };
        desc["annotations"] = json!({"org.opencontainers.image.ref.name": tag});
        self.index.push(desc);
        let index = json!({"schemaVersion": 2, "manifests": self.index});
        std::fs::write(self.dir.join("index.json"), index.to_string()).unwrap();
    }
}

/// The base layer: a static busybox with the applets the agent and the
/// checks use, `/etc/passwd`, and files the next layer hides.
fn base_layer() -> Vec<u8> {
    let busybox_path = Path::new("/bin/busybox");
    assert!(
        busybox_path.is_file(),
        "/bin/busybox is missing: apt install busybox-static (scripts/deps.sh --test)"
    );
    let busybox = std::fs::read(busybox_path).unwrap();
    let file_out = Command::new(require("file", "file"))
        .arg("-L")
        .arg(busybox_path)
        .output()
        .unwrap();
    assert!(
        text(&file_out.stdout).contains("statically linked"),
        "/bin/busybox is not static: apt install busybox-static"
    );
    let mut l = Layer::new();
    l.dir("./").dir("bin/").entry(
        "bin/busybox",
        tar::EntryType::Regular,
        0o755,
        0,
        None,
        &busybox,
    );
    for applet in [
        "sh", "ls", "stat", "cat", "readlink", "ip", "test", "id", "echo", "find", "mount",
        "hostname", "sleep", "uname",
    ] {
        l.symlink(&format!("bin/{applet}"), "busybox");
    }
    l.dir("etc/")
        .file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
        .file("etc/group", b"root:x:0:\n")
        .file("etc/keep.txt", b"kept\n")
        .file("etc/gone.txt", b"whiteouted\n")
        .dir("opt/")
        .dir("opt/data/")
        .file("opt/data/old1", b"1")
        .dir("opt/data/sub/")
        .file("opt/data/sub/old2", b"2")
        .dir("usr/")
        .dir("usr/bin/");
    l.tar()
}

/// The second layer: a whiteout, an opaque directory, links, modes, owners.
fn change_layer() -> Vec<u8> {
    let mut l = Layer::new();
    l.file("etc/.wh.gone.txt", b"")
        .dir("opt/data/")
        .file("opt/data/.wh..wh..opq", b"")
        .file("opt/data/new.txt", b"fresh\n")
        .entry(
            "usr/bin/special",
            tar::EntryType::Regular,
            0o4751,
            1234,
            None,
            b"#!/bin/sh\necho special\n",
        )
        .entry(
            "etc/secret",
            tar::EntryType::Regular,
            0o600,
            1234,
            None,
            b"s3cret\n",
        )
        .symlink("etc/link", "keep.txt")
        .symlink("etc/abs", "/etc/keep.txt")
        .hardlink("etc/hard", "etc/keep.txt");
    l.tar()
}

/// Debian's docker-registry serving 127.0.0.1:PORT inside a namespace.
struct RegistryServer {
    child: Child,
    port: u16,
}

impl RegistryServer {
    fn start(ns: &str, dir: &Path) -> RegistryServer {
        let bin = require("docker-registry", "docker-registry");
        let port = 20000 + fastrand::u16(..40000);
        let config = dir.join("registry.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
                dir.join("data").display()
            ),
        )
        .unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(bin)
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("registry.log")).unwrap())
            .spawn()
            .unwrap();
        let server = RegistryServer { child, port };
        wait_until("the registry listens", Duration::from_secs(20), || {
            Command::new("ip")
                .args(["netns", "exec", ns, "bash", "-c"])
                .arg(format!("exec 3<>/dev/tcp/127.0.0.1/{port}"))
                .stderr(Stdio::null())
                .status()
                .unwrap()
                .success()
        });
        server
    }
}

impl Drop for RegistryServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn skopeo_push(ns: &str, layout: &Path, tag: &str, port: u16) {
    let out = Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(require("skopeo", "skopeo"))
        .args([
            "--insecure-policy",
            "copy",
            "--quiet",
            "--all",
            "--dest-tls-verify=false",
        ])
        .arg(format!("oci:{}:{tag}", layout.display()))
        .arg(format!("docker://127.0.0.1:{port}/test/img:{tag}"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "skopeo copy {tag} failed: {}",
        text(&out.stderr)
    );
}

/// Everything under the images dir except the blob cache.
fn image_dir_entries(home: &TestHome) -> Vec<String> {
    let dir = home.path().join("state/images");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n != "blobs")
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// This home's scratch directories still recorded (each is recorded before
/// it is made, the record removed with it), and whether each is there.
fn scratch_leftovers(home: &TestHome) -> Vec<String> {
    let records = home.path().join("state/images/.scratch");
    std::fs::read_dir(records)
        .map(|rd| {
            rd.flatten()
                .map(|e| {
                    let record: Value =
                        serde_json::from_slice(&std::fs::read(e.path()).unwrap_or_default())
                            .unwrap_or_default();
                    let path = record["path"].as_str().unwrap_or("?").to_owned();
                    let there = Path::new(&path).exists();
                    format!("{path} (exists: {there})")
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn oci_images_are_pulled_verified_and_booted_and_hostile_layers_refused() {
    let home = TestHome::in_netns();
    let ns = home.netns.clone().unwrap();
    let work = tempfile::tempdir().unwrap();
    let mut layout = OciDir::new(work.path().join("layout"));

    phase(
        "the default image (kernel and initrd for pulled images)",
        || {
            common::shared_default_image(&home);
        },
    );

    let registry = RegistryServer::start(&ns, work.path());
    let port = registry.port;
    let reference = format!("127.0.0.1:{port}/test/img:1");

    phase("assemble and push test images", || {
        let base = layout.layer(base_layer(), Compression::Gzip);
        let change = layout.layer(change_layer(), Compression::None);
        let zstd = layout.layer(
            Layer::new()
                .file("etc/zstd.txt", b"from a zstd layer\n")
                .tar(),
            Compression::Zstd,
        );
        let amd64 = layout.manifest(&[base.clone(), change, zstd], "amd64");
        let arm64 = layout.manifest(std::slice::from_ref(&base), "arm64");
        layout.tag("1", std::slice::from_ref(&amd64), false);
        layout.tag("2", std::slice::from_ref(&amd64), false);
        layout.tag("multi", &[arm64.clone(), amd64], true);
        layout.tag("arm", &[arm64], true);
        let hostile: [(&str, Vec<u8>); 5] = [
            ("evil-dotdot", Layer::new().file("../escaped", b"x").tar()),
            (
                "evil-abs",
                Layer::new().file("/tmp/banger-oci-escaped", b"x").tar(),
            ),
            (
                "evil-symlink",
                Layer::new()
                    .symlink("etc/esc", "/tmp")
                    .file("etc/esc/banger-oci-escaped", b"x")
                    .tar(),
            ),
            (
                "evil-uplink",
                Layer::new().symlink("up", "../../../../tmp").tar(),
            ),
            (
                "evil-hardlink",
                Layer::new().hardlink("etc/h", "../../etc/passwd").tar(),
            ),
        ];
        let labelled = [
            (
                "svc-ok",
                json!({"dev.banger.wait-command": "test -e /etc/passwd"}),
            ),
            (
                "svc-never",
                json!({
                    "dev.banger.wait-command": "echo not yet; false",
                    "dev.banger.wait-log": "/etc/passwd",
                    "dev.banger.wait-timeout": "1",
                }),
            ),
            ("svc-badlabel", json!({"dev.banger.wait-ports": "http"})),
        ];
        for (tag, labels) in labelled {
            let m = layout.manifest_labelled(std::slice::from_ref(&base), "amd64", labels);
            layout.tag(tag, &[m], false);
        }
        for (tag, tar) in hostile {
            let evil = layout.layer(tar, Compression::Gzip);
            let m = layout.manifest(&[base.clone(), evil], "amd64");
            layout.tag(tag, &[m], false);
        }
        for tag in [
            "1",
            "2",
            "multi",
            "arm",
            "evil-dotdot",
            "evil-abs",
            "evil-symlink",
            "evil-uplink",
            "evil-hardlink",
            "svc-ok",
            "svc-never",
            "svc-badlabel",
        ] {
            skopeo_push(&ns, &layout.dir, tag, port);
        }
    });

    phase(
        "image pull reports timed stages and records ref + digest",
        || {
            let out = home.run(&["image", "pull", &reference, "--json"]);
            assert!(out.status.success(), "{}", text(&out.stderr));
            let lines: Vec<Value> = text(&out.stdout)
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
            let done: Vec<&str> = lines
                .iter()
                .filter(|l| l["event"]["status"] == "done")
                .map(|l| l["event"]["stage"].as_str().unwrap())
                .collect();
            for l in lines.iter().filter(|l| l["event"]["status"] == "done") {
                eprintln!(
                    "    {:<12} {:>6} ms",
                    l["event"]["stage"].as_str().unwrap(),
                    l["event"]["elapsed_ms"]
                );
            }
            for want in [
                "resolve",
                "download",
                "unpack",
                "prepare",
                "rootfs-ext4",
                "work-seed",
                "kernel",
                "manifest",
            ] {
                assert!(done.contains(&want), "no {want} stage in {done:?}");
            }
            let img = home.json(&["image", "show", &reference]);
            assert_eq!(img["state"], "ready");
            assert_eq!(img["default_init"], "fast");
            let source = img["source"].as_str().unwrap();
            assert!(source.starts_with(&format!("oci:{reference}")), "{source}");
            let dir = PathBuf::from(img["dir"].as_str().unwrap());
            let manifest: Value =
                serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
            assert_eq!(manifest["source"]["kind"], "oci");
            assert_eq!(img["source_digest"], manifest["source"]["digest"]);
            assert!(
                manifest["source"]["digest"]
                    .as_str()
                    .unwrap()
                    .starts_with("sha256:")
            );
            assert_eq!(manifest["source"]["layers"].as_array().unwrap().len(), 3);
            assert_eq!(manifest["sshd"], false);
            for f in ["vmlinux", "initrd.img", "rootfs.ext4", "work-seed.ext4"] {
                let sha = manifest["files"][f]["sha256"].as_str().unwrap();
                assert_eq!(sha.len(), 64, "{f}");
                let mode = std::fs::metadata(dir.join(f)).unwrap().permissions().mode();
                assert_eq!(mode & 0o222, 0, "{f} is read-only");
            }
        },
    );

    phase(
        "a second pull is up to date; another tag reuses the blobs",
        || {
            let before = home.json(&["image", "show", &reference]);
            let out = home.run(&["image", "pull", &reference]);
            assert!(out.status.success(), "{}", text(&out.stderr));
            assert!(
                text(&out.stderr).contains("up to date"),
                "{}",
                text(&out.stderr)
            );
            // The same image, not a second one built from the same blobs.
            assert_eq!(home.json(&["image", "show", &reference]), before);
        },
    );

    let checks = "test ! -e /etc/gone.txt && echo gone; ls -A /opt/data; \
                  stat -c '%a %u %g' /usr/bin/special /etc/secret; \
                  readlink /etc/link; readlink /etc/abs; cat /etc/link /etc/zstd.txt; \
                  stat -c %h /etc/keep.txt; id -u";
    let expected = "gone\nnew.txt\n4751 1234 1234\n600 1234 1234\nkeep.txt\n/etc/keep.txt\nkept\nfrom a zstd layer\n2\n0\n";

    phase(
        "a VM booted from the pulled image sees exactly the layers",
        || {
            let out = home.run(&["vm", "run", "--image", &reference, "--", "sh", "-c", checks]);
            assert!(out.status.success(), "{}", text(&out.stderr));
            assert_eq!(text(&out.stdout), expected);
        },
    );

    phase(
        "vm create of an image without sshd does not wait for ssh",
        || {
            let events = home.ok(&[
                "vm", "create", "--name", "nossh", "--image", &reference, "--json",
            ]);
            // Its stages end at the agent: no wait for an sshd the image lacks.
            assert!(events.contains("\"agent ready\""), "{events}");
            assert!(!events.contains("ssh ready"), "{events}");
            let out = home.run(&["vm", "exec", "nossh", "--", "cat", "/etc/keep.txt"]);
            assert!(out.status.success(), "{}", text(&out.stderr));
            assert_eq!(text(&out.stdout), "kept\n");
            home.ok(&["vm", "delete", "--force", "nossh"]);
        },
    );

    phase(
        "vm run --image REF pulls an unknown reference on first use",
        || {
            let tag2 = format!("127.0.0.1:{port}/test/img:2");
            let out = home.run(&["vm", "run", "--image", &tag2, "--", "cat", "/etc/keep.txt"]);
            assert!(out.status.success(), "{}", text(&out.stderr));
            assert_eq!(text(&out.stdout), "kept\n");
            let err = text(&out.stderr);
            assert!(
                err.contains("already downloaded"),
                "blobs are reused: {err}"
            );
            assert_eq!(home.json(&["image", "show", &tag2])["state"], "ready");
        },
    );

    phase("an index resolves to its linux/amd64 image", || {
        let multi = format!("127.0.0.1:{port}/test/img:multi");
        home.ok(&["image", "pull", &multi, "--quiet"]);
        let out = home.run(&["image", "pull", &format!("127.0.0.1:{port}/test/img:arm")]);
        assert_eq!(out.status.code(), Some(1));
        let err = text(&out.stderr);
        assert!(
            err.contains("no linux/amd64") && err.contains("linux/arm64"),
            "{err}"
        );
    });

    phase("bad references and unknown tags say what is wrong", || {
        let out = home.run(&["image", "pull", "Not A Ref"]);
        assert_eq!(out.status.code(), Some(1));
        assert!(text(&out.stderr).contains("is not an image reference"));
        let out = home.run(&["image", "pull", &format!("127.0.0.1:{port}/test/img:nope")]);
        assert_eq!(out.status.code(), Some(1));
        let err = text(&out.stderr);
        assert!(err.contains("was not found on registry"), "{err}");
        assert!(err.contains("test/img:nope"), "{err}");
    });

    let images_before = image_dir_entries(&home);
    let list_before = home.json(&["image", "list"]).as_array().unwrap().len();
    phase(
        "hostile layers are refused naming the entry; nothing is left",
        || {
            for (tag, needle) in [
                ("evil-dotdot", "\"../escaped\" climbs out of the root"),
                (
                    "evil-abs",
                    "\"/tmp/banger-oci-escaped\" has an absolute path",
                ),
                (
                    "evil-symlink",
                    "\"etc/esc/banger-oci-escaped\" would be written through the symlink \"etc/esc\"",
                ),
                (
                    "evil-uplink",
                    "\"up\" is a symlink to \"../../../../tmp\", which points outside",
                ),
                (
                    "evil-hardlink",
                    "\"etc/h\" is a hard link to \"../../etc/passwd\"",
                ),
            ] {
                let r = format!("127.0.0.1:{port}/test/img:{tag}");
                let out = home.run(&["image", "pull", &r]);
                let err = text(&out.stderr);
                assert_eq!(out.status.code(), Some(1), "{tag}: {err}");
                assert!(err.contains(needle), "{tag}: {err}");
                assert!(err.contains("refusing the image"), "{tag}: {err}");
                assert!(
                    home.run(&["image", "show", &r]).status.code() == Some(1),
                    "{tag} has no image row"
                );
            }
            assert!(!Path::new("/tmp/banger-oci-escaped").exists());
            assert_eq!(
                image_dir_entries(&home),
                images_before,
                "no image or partial dirs"
            );
            assert_eq!(
                home.json(&["image", "list"]).as_array().unwrap().len(),
                list_before
            );
            assert!(
                scratch_leftovers(&home).is_empty(),
                "{:?}",
                scratch_leftovers(&home)
            );
        },
    );

    phase("image import builds the same tree from a tarball", || {
        let tarball = work.path().join("rootfs.tar");
        let mut l = Layer::new();
        let mut tar = base_layer();
        // One archive: drop the base's end-of-archive blocks, append more.
        while tar.ends_with(&[0u8; 512]) {
            tar.truncate(tar.len() - 512);
        }
        tar.extend(l.file("etc/imported", b"yes\n").tar());
        std::fs::write(&tarball, &tar).unwrap();
        home.ok(&[
            "image",
            "import",
            tarball.to_str().unwrap(),
            "--name",
            "imported",
            "--quiet",
        ]);
        let img = home.json(&["image", "show", "imported"]);
        assert!(img["source"].as_str().unwrap().starts_with("import:"));
        let out = home.run(&[
            "vm",
            "run",
            "--image",
            "imported",
            "--",
            "cat",
            "/etc/imported",
        ]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert_eq!(text(&out.stdout), "yes\n");
    });

    phase("image import takes a directory too", || {
        let tree = work.path().join("tree");
        std::fs::create_dir_all(tree.join("etc")).unwrap();
        std::fs::write(tree.join("etc/from-dir"), "dir\n").unwrap();
        std::os::unix::fs::symlink("/etc/from-dir", tree.join("etc/link")).unwrap();
        home.ok(&[
            "image",
            "import",
            tree.to_str().unwrap(),
            "--name",
            "from-dir",
            "--quiet",
        ]);
        let img = home.json(&["image", "show", "from-dir"]);
        let rootfs = Path::new(img["dir"].as_str().unwrap()).join("rootfs.ext4");
        let debugfs = |cmd: &str| {
            let out = Command::new(require("debugfs", "e2fsprogs"))
                .args(["-R", cmd])
                .arg(&rootfs)
                .output()
                .unwrap();
            text(&out.stdout)
        };
        assert_eq!(debugfs("cat /etc/from-dir"), "dir\n");
        assert!(debugfs("stat /etc/link").contains("Fast link dest: \"/etc/from-dir\""));
        assert!(debugfs("stat /usr/local/bin/banger-agent").contains("Mode:  0755"));
    });

    phase(
        "readiness checks declared by the image: a services ready stage, a failure with the log, nothing left",
        || {
            let svc = |tag: &str| format!("127.0.0.1:{port}/test/img:{tag}");
            // --wait-port at import: nothing listens on 4096 in a busybox guest.
            let tarball = work.path().join("rootfs.tar");
            home.ok(&[
                "image",
                "import",
                tarball.to_str().unwrap(),
                "--name",
                "waits",
                "--wait-port",
                "4096",
                "--wait-timeout",
                "1",
                "--quiet",
            ]);
            let out = home.run(&["vm", "create", "--name", "never", "--image", "waits"]);
            assert!(!out.status.success());
            let err = text(&out.stderr);
            assert!(err.contains("services ready"), "{err}");
            assert!(
                err.contains("service \"port 4096\" of VM \"never\" was not up within 1 s: nothing listens on TCP port 4096"),
                "{err}"
            );
            // A busybox image boots fast: nothing starts services there.
            assert!(
                err.contains("nothing listens on TCP port 4096; the VM boots with --init fast"),
                "{err}"
            );
            let vm = home.json(&["vm", "show", "never"]);
            assert_eq!(vm["state"], "failed");
            home.ok(&["vm", "delete", "never"]);
            home.assert_host_clean("qemu-system-x86_64", "a readiness check that never passed");

            // A label's command that passes: the stage, and the VM runs.
            home.ok(&["image", "pull", &svc("svc-ok"), "--quiet"]);
            let out = home.run(&["vm", "create", "--name", "ready", "--image", &svc("svc-ok")]);
            assert!(out.status.success(), "{}", text(&out.stderr));
            assert!(
                text(&out.stderr).contains("services ready"),
                "{}",
                text(&out.stderr)
            );
            home.ok(&["vm", "delete", "--force", "ready"]);

            // One that never passes: its output and the log it names.
            home.ok(&["image", "pull", &svc("svc-never"), "--quiet"]);
            let out = home.run(&[
                "vm",
                "create",
                "--name",
                "never2",
                "--image",
                &svc("svc-never"),
            ]);
            assert!(!out.status.success());
            let err = text(&out.stderr);
            assert!(
                err.contains("`echo not yet; false` ended with exit code 1"),
                "{err}"
            );
            assert!(err.contains("not yet"), "{err}");
            assert!(err.contains("/etc/passwd ends:\nroot:"), "{err}");
            home.ok(&["vm", "delete", "never2"]);
            home.assert_host_clean("qemu-system-x86_64", "a failed readiness command");

            // A label banger cannot read refuses the pull, naming it.
            let out = home.run(&["image", "pull", &svc("svc-badlabel"), "--quiet"]);
            assert!(!out.status.success());
            assert!(
                text(&out.stderr).contains("dev.banger.wait-ports: \"http\" is not a TCP port"),
                "{}",
                text(&out.stderr)
            );
            for img in ["waits", &svc("svc-ok"), &svc("svc-never")] {
                home.ok(&["image", "delete", img]);
            }
        },
    );

    phase("deleting pulled images empties the blob cache", || {
        for tag in ["1", "2", "multi"] {
            home.ok(&[
                "image",
                "delete",
                &format!("127.0.0.1:{port}/test/img:{tag}"),
            ]);
        }
        let blobs = home.path().join("state/images/blobs/sha256");
        let left: Vec<_> = std::fs::read_dir(&blobs).unwrap().flatten().collect();
        assert!(left.is_empty(), "{left:?}");
    });

    phase(
        "Ctrl-C during image pull, at each stage: the pull finishes anyway",
        || {
            let stages = banger_wire::methods::PULL_STAGES;
            let before = image_dir_entries(&home);
            for (i, stage) in stages.iter().enumerate() {
                let name = format!("cc{i}");
                let mut pull = home
                    .banger_interruptible()
                    .args(["image", "pull", &reference, "--name", &name, "--json"])
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap();
                let stdout = std::io::BufReader::new(pull.stdout.take().unwrap());
                let reached = std::io::BufRead::lines(stdout)
                    .map_while(Result::ok)
                    .any(|l| {
                        let v: Value = serde_json::from_str(&l).unwrap_or_default();
                        v["event"]["stage"] == *stage && v["event"]["status"] == "started"
                    });
                assert!(reached, "the pull never reached {stage}");
                Command::new("kill")
                    .args(["-INT", &pull.id().to_string()])
                    .status()
                    .unwrap();
                let _ = pull.wait();
                // The image is made whole, with no directory but its own.
                wait_until(
                    &format!("{name} ready after Ctrl-C at {stage}"),
                    Duration::from_secs(120),
                    || {
                        let out = home.run(&["image", "show", &name, "--json"]);
                        out.status.success()
                            && serde_json::from_slice::<Value>(&out.stdout).unwrap()["state"]
                                == "ready"
                    },
                );
                home.ok(&["image", "delete", &name]);
                assert_eq!(image_dir_entries(&home), before, "{stage}");
            }
        },
    );
    phase(
        "kill -9 of the daemon during image pull, at each stage: nothing is left",
        || {
            let before = image_dir_entries(&home);
            let mut rows = Vec::new();
            // Held at the start of each stage after `resolve` (the daemon's own).
            for stage in &banger_wire::methods::PULL_STAGES[1..] {
                let step = format!("pull:{stage}");
                let step = step.as_str();
                let name = format!("k-{stage}");
                home.restart_daemon(Some(&format!("{step}:pause")));
                let daemon = home.daemon_pid();
                let pull = home
                    .banger()
                    .args(["image", "pull", &reference, "--name", &name])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap();
                home.wait_for_pause(step);
                kill_9(daemon);
                home.wait_socket_closed();
                let _ = pull.wait_with_output();
                // The next command starts a daemon without the seam.
                let row = home.run(&["image", "show", &name]).status.success();
                let left = image_dir_entries(&home);
                let leaks = home.json(&["gc", "--dry-run"]).as_array().unwrap().len();
                rows.push((
                    step.to_owned(),
                    row,
                    left.len() as isize - before.len() as isize,
                    leaks,
                ));
                assert!(!row, "image {name} has a row after kill -9 at {step}");
                assert_eq!(left, before, "kill -9 at {step}");
                assert_eq!(leaks, 0, "kill -9 at {step}");
                assert!(
                    scratch_leftovers(&home).is_empty(),
                    "{:?}",
                    scratch_leftovers(&home)
                );
            }
            eprintln!("kill -9 of the daemon during image pull (after the next daemon's start):");
            eprintln!(
                "  {:<18} {:>4} {:>10} {:>5}",
                "step", "row", "dirs left", "leaks"
            );
            for (step, row, left, leaks) in rows {
                eprintln!("  {step:<18} {row:>4} {left:>10} {leaks:>5}");
            }
            // And a pull after all that works.
            home.ok(&["image", "pull", &reference, "--name", "k-after", "--quiet"]);
            home.ok(&["image", "delete", "k-after"]);
        },
    );
    drop(registry);
}
