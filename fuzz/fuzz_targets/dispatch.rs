//! Arbitrary bytes sent to a connection of bangerd's real router — every
//! daemon method (`bangerd::routes::router`) over the services wired as the
//! daemon wires them (`bangerd::start::services`): a real store in a temp
//! state dir, a default image registered whose kernel is none and whose
//! QEMU cannot be found (so creates get their disks and tap, fail at their
//! VMM step and roll back), and `banger-helper`'s real methods over the recording
//! fakes of the host, served in process where the daemon looks for its
//! helper. First the process moves into a network namespace of its own, so
//! that no input reaches anything beyond it (registries, mirrors).
//!
//! The server never panics or hangs, and everything it writes back is a
//! well-formed response frame carrying an op id.
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use banger_config::{AccelSetting, Config, Paths};
use banger_disk::DiskService;
use banger_disk::recording::RecordingHostDisk;
use banger_net::recording::RecordingHostNet;
use banger_net::{Install, NetService};
use banger_rpc::{Router, ServeConfig, bind_socket, serve, serve_connection};
use banger_wire::methods::ImageRegisterParams;
use banger_wire::{Response, ResponseBody};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Fixture {
    rt: tokio::runtime::Runtime,
    router: Arc<Router>,
    cfg: Arc<ServeConfig>,
    /// Keeps the in-process helper serving.
    _helper_stop: tokio::sync::watch::Sender<bool>,
    _home: tempfile::TempDir,
}

static FIXTURE: OnceLock<Fixture> = OnceLock::new();

/// A network namespace of this thread's own (every thread and process the
/// target starts later inherits it): only a loopback that is down.
fn isolate_network() {
    // SAFETY: NEWNET unshares no file descriptor table.
    unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWNET) }
        .expect("the dispatch target runs in a network namespace of its own: run it as root");
}

fn fixture() -> &'static Fixture {
    FIXTURE.get_or_init(|| {
        isolate_network();
        let home = tempfile::Builder::new().prefix("bgfuzz").tempdir().unwrap();
        let paths = Paths::under(home.path().to_path_buf());
        for dir in [&paths.state_dir, &paths.runtime_dir] {
            std::fs::create_dir_all(dir).unwrap();
        }
        let mut config = Config::default();
        config.vmm.accel = AccelSetting::Tcg;
        config.vmm.qemu_bin = "/nonexistent/qemu-system-x86_64".into();
        config.vmm.firecracker_bin = "/nonexistent/firecracker".into();
        // No background creates of a warm pool beside the fuzzed ones.
        config.pool.size = 0;
        let img = home.path().join("img");
        std::fs::create_dir_all(&img).unwrap();
        for f in ["vmlinux", "initrd.img", "rootfs.ext4"] {
            std::fs::write(img.join(f), b"not a kernel, not ext4").unwrap();
        }
        // The one file registering checks: an ext4 labelled work.
        let mkfs = std::process::Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", "work"])
            .arg(img.join("work-seed.ext4"))
            .arg("1M")
            .status()
            .expect("mkfs.ext4 (e2fsprogs)");
        assert!(mkfs.success());
        let file = |f: &str| img.join(f).display().to_string();
        let uid = rustix::process::getuid().as_raw();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (helper_stop, helper_stop_rx) = tokio::sync::watch::channel(false);
        let router = rt.block_on(async {
            let socket = config.helper_socket(&paths);
            let helper = banger_helper::router(
                NetService::new(
                    RecordingHostNet::new(),
                    vec![uid],
                    vec![Install::new(&paths.install_id(), &paths.state_dir)],
                ),
                DiskService::new(RecordingHostDisk::new(), vec![paths.state_dir.clone()]),
            );
            let cfg = ServeConfig {
                name: "helper",
                allowed_uids: vec![uid],
            };
            let listener = bind_socket(&socket).unwrap();
            tokio::spawn(serve(
                listener,
                cfg,
                Arc::new(helper),
                helper_stop_rx,
                Duration::from_secs(1),
            ));
            let (stop, _) = tokio::sync::watch::channel(false);
            let services = bangerd::start::services(&paths, &config, None, stop)
                .await
                .unwrap();
            // The default image exists: `image build debian-12` and a create
            // without --image find it instead of building it.
            services
                .images
                .register(ImageRegisterParams {
                    name: "debian-12".into(),
                    vmlinux: file("vmlinux"),
                    initrd: Some(file("initrd.img")),
                    rootfs: file("rootfs.ext4"),
                    work_seed: file("work-seed.ext4"),
                    init: None,
                })
                .await
                .unwrap();
            services.images.promote("debian-12").unwrap();
            Arc::new(bangerd::routes::router(services))
        });
        Fixture {
            rt,
            router,
            cfg: Arc::new(ServeConfig {
                name: "daemon",
                allowed_uids: vec![uid],
            }),
            _helper_stop: helper_stop,
            _home: home,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    f.rt.block_on(async {
        let (server, mut client) = tokio::net::UnixStream::pair().unwrap();
        let (_stop, stop_rx) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(serve_connection(
            server,
            f.cfg.clone(),
            f.router.clone(),
            stop_rx,
        ));
        let _ = client.write_all(data).await;
        let _ = client.shutdown().await;
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(30), client.read_to_end(&mut out))
            .await
            .expect("the daemon answered and closed")
            .unwrap();
        task.await.unwrap();
        for line in out.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            let resp: Response = serde_json::from_slice(line).expect("well-formed response frame");
            if let ResponseBody::Error(e) = &resp.body {
                assert_eq!(e.op_id, resp.op_id);
            }
        }
    });
});
