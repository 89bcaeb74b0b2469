//! Behaviour of the store against real SQLite files in a temp dir.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use banger_store::{
    EntityKind, Image, ImageState, InitMode, OpKind, PortForward, Proto, ResourceUpdate, Snapshot,
    SnapshotMemory, SnapshotState, SourceKind, Store, StoreError, Vm, VmSecret, VmState, Vmm,
    now_ms,
};

fn image(id: &str, name: &str) -> Image {
    let dir = PathBuf::from(format!("/var/lib/banger/images/{id}"));
    Image {
        id: id.into(),
        name: name.into(),
        state: ImageState::Ready,
        source_kind: SourceKind::Recipe,
        source_ref: "debian-12".into(),
        source_digest: Some("sha256:00ff".into()),
        kernel_path: dir.join("bzImage"),
        vmlinux_path: Some(dir.join("vmlinux")),
        initrd_path: Some(dir.join("initrd.img")),
        rootfs_path: dir.join("rootfs.ext4"),
        work_seed_path: None,
        dir,
        manifest: [("rootfs.ext4".to_owned(), "ab".repeat(32))].into(),
        size_bytes: 1 << 33,
        default_init: InitMode::Fast,
        is_default: false,
        last_error: None,
        created_at: 1_700_000_000_000,
    }
}

fn vm(id: &str, name: &str, image_id: &str, n: u8) -> Vm {
    Vm {
        id: id.into(),
        name: name.into(),
        image_id: image_id.into(),
        vmm: Vmm::Qemu,
        init_mode: InitMode::Fast,
        vcpus: 2,
        memory_mib: 1024,
        disk_mib: 4096,
        state: VmState::Creating,
        guest_ip: Some(Ipv4Addr::new(172, 30, 0, n)),
        mac: Some(format!("02:00:00:00:00:{n:02x}")),
        vsock_cid: Some(u32::from(n) + 100),
        dns_name: Some(format!("{name}.vm")),
        vm_dir: PathBuf::from(format!("/var/lib/banger/vms/{id}")),
        api_socket: None,
        console_log: Some(PathBuf::from(format!(
            "/var/lib/banger/vms/{id}/console.log"
        ))),
        last_error: None,
        created_at: 1_700_000_000_500,
        last_used_at: None,
        labels: BTreeMap::new(),
        net_policy: "nat".into(),
    }
}

fn db(dir: &Path) -> PathBuf {
    dir.join("banger.db")
}

#[test]
fn image_round_trip_and_lookup() {
    let store = Store::open_in_memory().unwrap();
    let a = image("img-a", "zeta");
    let b = image("img-b", "alpha");
    store.insert_image(&a).unwrap();
    store.insert_image(&b).unwrap();

    assert_eq!(store.image_by_id("img-a").unwrap(), a);
    assert_eq!(store.image_by_name("alpha").unwrap(), b);
    assert_eq!(store.find_image("zeta").unwrap(), a);
    assert_eq!(store.find_image("img-b").unwrap(), b);
    let names: Vec<_> = store
        .list_images()
        .unwrap()
        .into_iter()
        .map(|i| i.name)
        .collect();
    assert_eq!(names, ["alpha", "zeta"]);

    let err = store.image_by_name("nope").unwrap_err();
    assert!(err.is_not_found());
    assert_eq!(err.to_string(), "image \"nope\" not found");

    store
        .set_image_state("img-a", ImageState::Failed, Some("mkfs failed"))
        .unwrap();
    let got = store.image_by_id("img-a").unwrap();
    assert_eq!(got.state, ImageState::Failed);
    assert_eq!(got.last_error.as_deref(), Some("mkfs failed"));

    let manifest: BTreeMap<_, _> = [("vmlinux".to_owned(), "cd".repeat(32))].into();
    store.complete_image("img-a", &manifest, 42).unwrap();
    let got = store.image_by_id("img-a").unwrap();
    assert_eq!(got.state, ImageState::Ready);
    assert_eq!(got.manifest, manifest);
    assert_eq!(got.size_bytes, 42);
    assert_eq!(got.last_error, None);

    assert!(
        store
            .set_image_state("ghost", ImageState::Ready, None)
            .unwrap_err()
            .is_not_found()
    );
}

#[test]
fn duplicate_names_are_typed_errors() {
    let store = Store::open_in_memory().unwrap();
    store.insert_image(&image("img-1", "debian")).unwrap();
    let err = store.insert_image(&image("img-2", "debian")).unwrap_err();
    assert!(
        matches!(&err, StoreError::NameTaken { kind: EntityKind::Image, name } if name == "debian"),
        "{err:?}"
    );
    assert_eq!(err.to_string(), "an image named \"debian\" already exists");

    let err = store.insert_image(&image("img-1", "other")).unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");

    store.insert_vm(&vm("vm-1", "foo", "img-1", 2)).unwrap();
    let err = store.insert_vm(&vm("vm-2", "foo", "img-1", 3)).unwrap_err();
    assert!(
        matches!(&err, StoreError::NameTaken { kind: EntityKind::Vm, name } if name == "foo"),
        "{err:?}"
    );
    assert_eq!(err.to_string(), "a VM named \"foo\" already exists");
}

#[test]
fn leases_are_unique() {
    let store = Store::open_in_memory().unwrap();
    store.insert_image(&image("img", "debian")).unwrap();
    store.insert_vm(&vm("vm-1", "first", "img", 2)).unwrap();

    let mut same_ip = vm("vm-2", "second", "img", 3);
    same_ip.guest_ip = Some(Ipv4Addr::new(172, 30, 0, 2));
    let err = store.insert_vm(&same_ip).unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    assert_eq!(
        err.to_string(),
        "guest IP 172.30.0.2 is already leased to VM \"first\""
    );

    // MACs compare case-insensitively: they are stored lower-case.
    let mut same_mac = vm("vm-2", "second", "img", 3);
    same_mac.mac = Some("02:00:00:00:00:02".to_uppercase());
    let err = store.insert_vm(&same_mac).unwrap_err();
    assert_eq!(
        err.to_string(),
        "MAC address 02:00:00:00:00:02 is already leased to VM \"first\""
    );

    let mut same_cid = vm("vm-2", "second", "img", 3);
    same_cid.vsock_cid = Some(102);
    let err = store.insert_vm(&same_cid).unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    assert_eq!(
        err.to_string(),
        "vsock CID 102 is already leased to VM \"first\""
    );

    // VMs without leases do not collide on NULL.
    for (id, name) in [("vm-3", "bare1"), ("vm-4", "bare2")] {
        let mut bare = vm(id, name, "img", 0);
        bare.guest_ip = None;
        bare.mac = None;
        bare.vsock_cid = None;
        store.insert_vm(&bare).unwrap();
    }
    let mut upper = vm("vm-5", "upper", "img", 9);
    upper.mac = Some("02:AB:CD:EF:00:09".into());
    store.insert_vm(&upper).unwrap();

    assert_eq!(
        store.used_guest_ips().unwrap(),
        [Ipv4Addr::new(172, 30, 0, 2), Ipv4Addr::new(172, 30, 0, 9)].into()
    );
    assert_eq!(
        store.used_macs().unwrap(),
        [
            "02:00:00:00:00:02".to_owned(),
            "02:ab:cd:ef:00:09".to_owned()
        ]
        .into()
    );
    assert_eq!(store.used_cids().unwrap(), [102, 109].into());

    // Deleting a VM releases its leases.
    store.delete_vm("vm-1").unwrap();
    assert_eq!(store.used_cids().unwrap(), [109].into());
    store.insert_vm(&same_ip).unwrap();
}

#[test]
fn image_delete_is_refused_while_vms_use_it() {
    let store = Store::open_in_memory().unwrap();
    store.insert_image(&image("img", "debian")).unwrap();
    store.insert_vm(&vm("vm-b", "web", "img", 2)).unwrap();
    store.insert_vm(&vm("vm-a", "db", "img", 3)).unwrap();

    let err = store.delete_image("img").unwrap_err();
    match &err {
        StoreError::ImageInUse { image, vms } => {
            assert_eq!(image, "debian");
            assert_eq!(vms, &["db", "web"]);
        }
        other => panic!("expected ImageInUse, got {other:?}"),
    }
    assert_eq!(
        err.to_string(),
        "image \"debian\" is still used by VMs: db, web; delete them first"
    );
    assert!(store.image_by_id("img").is_ok());

    store.delete_vm("vm-a").unwrap();
    assert_eq!(
        store.delete_image("img").unwrap_err().to_string(),
        "image \"debian\" is still used by VM: web; delete it first"
    );
    store.delete_vm("vm-b").unwrap();
    store.delete_image("img").unwrap();
    assert!(store.image_by_id("img").unwrap_err().is_not_found());
    assert!(store.delete_image("img").unwrap_err().is_not_found());
}

#[test]
fn at_most_one_default_image() {
    let store = Store::open_in_memory().unwrap();
    assert_eq!(store.default_image().unwrap(), None);
    let mut a = image("img-a", "a");
    a.is_default = true;
    store.insert_image(&a).unwrap();
    assert_eq!(store.default_image().unwrap().unwrap().id, "img-a");

    // A second default row is refused by the partial unique index.
    let mut b = image("img-b", "b");
    b.is_default = true;
    let err = store.insert_image(&b).unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    assert!(
        err.to_string().contains("\"a\" is already the default"),
        "{err}"
    );

    b.is_default = false;
    store.insert_image(&b).unwrap();
    store.set_default_image("img-b").unwrap();
    assert_eq!(store.default_image().unwrap().unwrap().id, "img-b");
    let defaults: Vec<_> = store
        .list_images()
        .unwrap()
        .into_iter()
        .filter(|i| i.is_default)
        .map(|i| i.id)
        .collect();
    assert_eq!(defaults, ["img-b"]);

    // Idempotent, and an unknown id changes nothing.
    store.set_default_image("img-b").unwrap();
    assert!(store.set_default_image("ghost").unwrap_err().is_not_found());
    assert_eq!(store.default_image().unwrap().unwrap().id, "img-b");
}

#[test]
fn foreign_keys_are_enforced() {
    let store = Store::open_in_memory().unwrap();
    let err = store
        .insert_vm(&vm("vm-1", "orphan", "no-such-image", 2))
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::NotFound { kind: EntityKind::Image, key } if key == "no-such-image"),
        "{err:?}"
    );
    assert!(store.list_vms().unwrap().is_empty());

    let fwd = PortForward {
        vm_id: "no-such-vm".into(),
        proto: Proto::Tcp,
        bind_addr: "127.0.0.1".parse().unwrap(),
        host_port: 2222,
        guest_port: 22,
    };
    let err = store.add_port_forward(&fwd).unwrap_err();
    assert!(
        matches!(
            &err,
            StoreError::NotFound {
                kind: EntityKind::Vm,
                ..
            }
        ),
        "{err:?}"
    );

    // Deleting a VM cascades to its port forwards.
    store.insert_image(&image("img", "debian")).unwrap();
    store.insert_vm(&vm("vm-1", "web", "img", 2)).unwrap();
    let fwd = PortForward {
        vm_id: "vm-1".into(),
        ..fwd
    };
    store.add_port_forward(&fwd).unwrap();
    store.delete_vm("vm-1").unwrap();
    assert!(store.list_port_forwards().unwrap().is_empty());
}

#[test]
fn schema_checks_are_invalid_errors() {
    let store = Store::open_in_memory().unwrap();
    store.insert_image(&image("img", "debian")).unwrap();
    let mut zero = vm("vm-1", "zero", "img", 2);
    zero.vcpus = 0;
    let err = store.insert_vm(&zero).unwrap_err();
    assert!(
        matches!(&err, StoreError::Invalid { kind: EntityKind::Vm, rule } if rule.contains("vcpus")),
        "{err:?}"
    );
    let mut reserved = vm("vm-1", "cid", "img", 2);
    reserved.vsock_cid = Some(2);
    assert!(matches!(
        store.insert_vm(&reserved).unwrap_err(),
        StoreError::Invalid { .. }
    ));

    store.insert_vm(&vm("vm-1", "ok", "img", 2)).unwrap();
    let err = store
        .update_vm_resources(
            "vm-1",
            ResourceUpdate {
                memory_mib: Some(0),
                ..Default::default()
            },
        )
        .unwrap_err();
    assert!(matches!(err, StoreError::Invalid { .. }), "{err:?}");
    assert_eq!(store.find_vm("vm-1").unwrap().memory_mib, 1024);

    let fwd = PortForward {
        vm_id: "vm-1".into(),
        proto: Proto::Udp,
        bind_addr: "127.0.0.1".parse().unwrap(),
        host_port: 0,
        guest_port: 53,
    };
    assert!(matches!(
        store.add_port_forward(&fwd).unwrap_err(),
        StoreError::Invalid {
            kind: EntityKind::PortForward,
            ..
        }
    ));
}

#[test]
fn vm_updates() {
    let store = Store::open_in_memory().unwrap();
    store.insert_image(&image("img", "debian")).unwrap();
    let original = vm("vm-1", "web", "img", 2);
    store.insert_vm(&original).unwrap();
    assert_eq!(store.find_vm("vm-1").unwrap(), original);
    assert_eq!(store.find_vm("web").unwrap(), original);
    let err = store.find_vm("ghost").unwrap_err();
    assert_eq!(err.to_string(), "VM \"ghost\" not found");

    store
        .update_vm_state("vm-1", VmState::Running, None)
        .unwrap();
    assert_eq!(store.find_vm("web").unwrap().state, VmState::Running);
    store
        .update_vm_state("vm-1", VmState::Failed, Some("qemu exited with 1"))
        .unwrap();
    let got = store.find_vm("web").unwrap();
    assert_eq!(got.state, VmState::Failed);
    assert_eq!(got.last_error.as_deref(), Some("qemu exited with 1"));
    // A failed VM owns nothing: its leases are free for the next VM.
    assert_eq!((got.guest_ip, got.mac, got.vsock_cid), (None, None, None));
    let next = vm("vm-2", "next", "img", 2);
    store.insert_vm(&next).unwrap();
    assert_eq!(store.find_vm("next").unwrap().guest_ip, original.guest_ip);
    store.delete_vm("vm-2").unwrap();

    let updated = store
        .update_vm_resources(
            "vm-1",
            ResourceUpdate {
                vcpus: Some(4),
                disk_mib: Some(8192),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(
        (updated.vcpus, updated.memory_mib, updated.disk_mib),
        (4, 1024, 8192)
    );
    assert_eq!(store.find_vm("vm-1").unwrap(), updated);

    let before = now_ms();
    store.touch_vm_last_used("vm-1").unwrap();
    let used = store.find_vm("vm-1").unwrap().last_used_at.unwrap();
    assert!(used >= before && used <= now_ms(), "{used} vs {before}");

    let labels: BTreeMap<_, _> = [("env".to_owned(), "ci".to_owned())].into();
    store.set_vm_labels("vm-1", &labels).unwrap();
    assert_eq!(store.find_vm("web").unwrap().labels, labels);

    for err in [
        store
            .update_vm_state("ghost", VmState::Stopped, None)
            .unwrap_err(),
        store
            .update_vm_resources("ghost", ResourceUpdate::default())
            .unwrap_err(),
        store.touch_vm_last_used("ghost").unwrap_err(),
        store.set_vm_labels("ghost", &labels).unwrap_err(),
        store.delete_vm("ghost").unwrap_err(),
    ] {
        assert!(err.is_not_found(), "{err:?}");
    }

    // The record serializes for the wire and back.
    let json = serde_json::to_string(&updated).unwrap();
    assert!(json.contains("\"vmm\":\"qemu\""), "{json}");
    assert_eq!(serde_json::from_str::<Vm>(&json).unwrap(), updated);
}

#[test]
fn port_forwards() {
    let store = Store::open_in_memory().unwrap();
    store.insert_image(&image("img", "debian")).unwrap();
    store.insert_vm(&vm("vm-1", "web", "img", 2)).unwrap();
    store.insert_vm(&vm("vm-2", "db", "img", 3)).unwrap();
    let lo = "127.0.0.1".parse().unwrap();
    let web_http = PortForward {
        vm_id: "vm-1".into(),
        proto: Proto::Tcp,
        bind_addr: lo,
        host_port: 8080,
        guest_port: 80,
    };
    store.add_port_forward(&web_http).unwrap();

    let err = store
        .add_port_forward(&PortForward {
            vm_id: "vm-2".into(),
            guest_port: 5432,
            ..web_http.clone()
        })
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    assert_eq!(
        err.to_string(),
        "tcp 127.0.0.1:8080 is already forwarded to VM \"web\""
    );

    // Same port, other protocol or other address: no clash.
    let db_udp = PortForward {
        vm_id: "vm-2".into(),
        proto: Proto::Udp,
        ..web_http.clone()
    };
    store.add_port_forward(&db_udp).unwrap();
    let v6 = PortForward {
        vm_id: "vm-2".into(),
        bind_addr: "::1".parse().unwrap(),
        ..web_http.clone()
    };
    store.add_port_forward(&v6).unwrap();

    assert_eq!(store.port_forwards_for_vm("vm-1").unwrap(), [web_http]);
    assert_eq!(store.port_forwards_for_vm("vm-2").unwrap().len(), 2);
    assert_eq!(store.list_port_forwards().unwrap().len(), 3);

    let err = store
        .remove_port_forward("vm-2", Proto::Tcp, lo, 8080)
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "port forward \"tcp 127.0.0.1:8080\" not found"
    );
    store
        .remove_port_forward("vm-1", Proto::Tcp, lo, 8080)
        .unwrap();
    assert!(store.port_forwards_for_vm("vm-1").unwrap().is_empty());
    store
        .remove_port_forward("vm-2", Proto::Tcp, "::1".parse().unwrap(), 8080)
        .unwrap();
    assert_eq!(store.port_forwards_for_vm("vm-2").unwrap(), [db_udp]);
}

#[test]
fn operation_journal() {
    let store = Store::open_in_memory().unwrap();
    assert!(store.unfinished_operations().unwrap().is_empty());
    let before = now_ms();
    let op = store
        .begin_operation("op-1", OpKind::VmCreate, "vm-1", "allocated")
        .unwrap();
    assert!(op.started_at >= before);
    store
        .begin_operation("op-2", OpKind::ImageBuild, "img-1", "fetching")
        .unwrap();
    let err = store
        .begin_operation("op-1", OpKind::VmDelete, "vm-1", "x")
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");

    store
        .update_operation_stage("op-1", "disk_created")
        .unwrap();
    let ops = store.unfinished_operations().unwrap();
    assert_eq!(ops.len(), 2);
    let op1 = ops.iter().find(|o| o.op_id == "op-1").unwrap();
    assert_eq!(op1.stage, "disk_created");
    assert_eq!(op1.kind, OpKind::VmCreate);
    assert!(op1.updated_at >= op1.started_at);

    store.finish_operation("op-1").unwrap();
    let ops = store.unfinished_operations().unwrap();
    assert_eq!(ops.len(), 1);
    assert_eq!(ops[0].op_id, "op-2");
    assert!(store.finish_operation("op-1").unwrap_err().is_not_found());
    assert!(
        store
            .update_operation_stage("op-1", "late")
            .unwrap_err()
            .is_not_found()
    );
}

#[test]
fn enums_parse_and_name_the_choices() {
    assert_eq!("firecracker".parse::<Vmm>().unwrap(), Vmm::Firecracker);
    assert_eq!(Vmm::Qemu.as_str(), "qemu");
    assert_eq!(OpKind::ImageBuild.to_string(), "image_build");
    for state in VmState::ALL {
        assert_eq!(state.as_str().parse::<VmState>().unwrap(), *state);
    }
    let err = "kvm".parse::<Vmm>().unwrap_err();
    assert_eq!(
        err.to_string(),
        "unknown VMM \"kvm\" (expected one of: qemu, firecracker)"
    );
}

#[test]
fn data_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let mut img = image("img", "debian");
    img.is_default = true;
    let machine = vm("vm-1", "web", "img", 2);
    {
        let store = Store::open(db(dir.path())).unwrap();
        store.insert_image(&img).unwrap();
        store.insert_vm(&machine).unwrap();
        store
            .begin_operation("op-9", OpKind::VmStart, "vm-1", "spawned")
            .unwrap();
    }
    let store = Store::open(db(dir.path())).unwrap();
    assert_eq!(store.default_image().unwrap(), Some(img));
    assert_eq!(store.list_vms().unwrap(), [machine]);
    assert_eq!(store.unfinished_operations().unwrap()[0].stage, "spawned");
}

#[test]
fn two_handles_read_and_write_concurrently() {
    let dir = tempfile::tempdir().unwrap();
    let a = Arc::new(Store::open(db(dir.path())).unwrap());
    let b = Arc::new(Store::open(db(dir.path())).unwrap());
    a.insert_image(&image("img", "debian")).unwrap();
    let per_thread = 40u8;

    let workers: Vec<_> = [(a.clone(), 0u8), (b.clone(), 1u8)]
        .into_iter()
        .map(|(store, t)| {
            thread::spawn(move || {
                for i in 0..per_thread {
                    let n = t * per_thread + i + 1;
                    let id = format!("vm-{n}");
                    store
                        .insert_vm(&vm(&id, &format!("m{n}"), "img", n))
                        .unwrap();
                    store.update_vm_state(&id, VmState::Running, None).unwrap();
                    // Each handle sees the other's committed rows.
                    assert!(!store.list_vms().unwrap().is_empty());
                    assert!(store.used_cids().unwrap().contains(&(u32::from(n) + 100)));
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    let total = usize::from(per_thread) * 2;
    assert_eq!(a.list_vms().unwrap().len(), total);
    assert_eq!(b.used_guest_ips().unwrap().len(), total);
    assert!(
        b.list_vms()
            .unwrap()
            .iter()
            .all(|v| v.state == VmState::Running)
    );
}

#[test]
fn writer_waits_for_lock_instead_of_failing() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(db(dir.path())).unwrap();
    store.insert_image(&image("img", "debian")).unwrap();

    // Another connection holds the write lock for a while.
    let hold = Duration::from_millis(600);
    let locked = Arc::new(Barrier::new(2));
    let holder = {
        let path = db(dir.path());
        let locked = locked.clone();
        thread::spawn(move || {
            let conn = rusqlite::Connection::open(path).unwrap();
            conn.execute_batch("BEGIN IMMEDIATE").unwrap();
            conn.execute("UPDATE images SET size_bytes = 7", [])
                .unwrap();
            locked.wait();
            thread::sleep(hold);
            conn.execute_batch("COMMIT").unwrap();
        })
    };
    locked.wait();
    let start = Instant::now();
    store.insert_vm(&vm("vm-1", "web", "img", 2)).unwrap();
    let waited = start.elapsed();
    holder.join().unwrap();

    assert!(
        waited >= hold / 2,
        "write did not wait for the lock: {waited:?}"
    );
    assert!(waited < banger_store::BUSY_TIMEOUT, "{waited:?}");
    assert_eq!(store.image_by_id("img").unwrap().size_bytes, 7);
    assert_eq!(store.list_vms().unwrap().len(), 1);
}

#[test]
fn concurrent_first_opens_all_succeed() {
    let dir = tempfile::tempdir().unwrap();
    let path = db(dir.path());
    let start = Arc::new(Barrier::new(8));
    let openers: Vec<_> = (0..8)
        .map(|_| {
            let path = path.clone();
            let start = start.clone();
            thread::spawn(move || {
                start.wait();
                Store::open(&path).map(|s| s.schema_version().unwrap())
            })
        })
        .collect();
    for o in openers {
        assert_eq!(
            o.join().unwrap().unwrap(),
            banger_store::LATEST_SCHEMA_VERSION
        );
    }
}

fn snapshot(id: &str, name: &str, image_id: &str) -> Snapshot {
    Snapshot {
        id: id.into(),
        name: name.into(),
        source_vm_id: "vm-1".into(),
        source_vm_name: "web".into(),
        image_id: image_id.into(),
        vmm: Vmm::Qemu,
        vmm_version: "QEMU emulator version 7.2.22".into(),
        accel: "kvm".into(),
        cpu: "GenuineIntel 6/143/8 Xeon (flags 01020304)".into(),
        init_mode: InitMode::Fast,
        vcpus: 2,
        memory_mib: 1024,
        disk_mib: 4096,
        root_qcow2: true,
        dir: format!("/s/snapshots/{id}").into(),
        state_sha256: String::new(),
        memory: SnapshotMemory::File,
        memory_sha256: String::new(),
        size_bytes: 0,
        state: SnapshotState::Creating,
        created_at: 1,
    }
}

#[test]
fn snapshots_are_recorded_completed_and_keep_their_image() {
    let store = Store::open_in_memory().unwrap();
    store.insert_image(&image("img", "debian")).unwrap();
    store
        .insert_snapshot(&snapshot("s1", "snap", "img"))
        .unwrap();
    assert!(matches!(
        store.insert_snapshot(&snapshot("s2", "snap", "img")),
        Err(StoreError::NameTaken { .. })
    ));
    assert!(matches!(
        store.insert_snapshot(&snapshot("s3", "other", "no-such-image")),
        Err(StoreError::NotFound { .. })
    ));
    store.complete_snapshot("s1", "abc", "def", 4096).unwrap();
    let s = store.find_snapshot("snap").unwrap();
    assert_eq!(
        (
            s.state,
            s.state_sha256.as_str(),
            s.memory,
            s.memory_sha256.as_str(),
            s.size_bytes
        ),
        (
            SnapshotState::Ready,
            "abc",
            SnapshotMemory::File,
            "def",
            4096
        )
    );
    assert_eq!(store.find_snapshot("s1").unwrap(), s);
    assert_eq!(store.list_snapshots().unwrap(), [s]);

    let err = store.delete_image("img").unwrap_err();
    assert_eq!(
        err.to_string(),
        "image \"debian\" is kept by snapshot: snap; delete it first (banger snapshot delete)"
    );
    store.delete_snapshot("s1").unwrap();
    assert!(store.find_snapshot("snap").unwrap_err().is_not_found());
    store.delete_image("img").unwrap();
}

#[test]
fn secrets_follow_their_vm() {
    let store = Store::open_in_memory().unwrap();
    store.insert_image(&image("img", "base")).unwrap();
    store.insert_vm(&vm("a", "box-a", "img", 2)).unwrap();
    store.insert_vm(&vm("b", "box-b", "img", 3)).unwrap();
    let s = VmSecret {
        name: "TOKEN".into(),
        hosts: vec!["api.test".into(), "*.example.org".into()],
        placeholder: "BANGER_PLACEHOLDER_TOKEN_00".into(),
        in_body: true,
    };
    store.add_vm_secrets("a", std::slice::from_ref(&s)).unwrap();
    assert_eq!(store.vm_secrets("a").unwrap(), vec![s.clone()]);
    assert_eq!(store.vms_using_secret("TOKEN").unwrap(), vec!["box-a"]);
    // A secret named twice is refused, and a refused set leaves nothing.
    assert!(store.add_vm_secrets("b", &[s.clone(), s.clone()]).is_err());
    assert!(store.vm_secrets("b").unwrap().is_empty());
    // A snapshot keeps its VM's grants; a VM restored from it gets the
    // same ones, placeholders included (its guest's memory holds them).
    let mut snap = snapshot("s1", "snap", "img");
    snap.source_vm_id = "a".into();
    store.insert_snapshot(&snap).unwrap();
    store
        .add_snapshot_secrets("s1", &store.vm_secrets("a").unwrap())
        .unwrap();
    assert_eq!(store.snapshot_secrets("s1").unwrap(), vec![s.clone()]);
    assert_eq!(store.snapshots_using_secret("TOKEN").unwrap(), ["snap"]);
    store
        .add_vm_secrets("b", &store.snapshot_secrets("s1").unwrap())
        .unwrap();
    assert_eq!(store.vms_using_secret("TOKEN").unwrap(), ["box-a", "box-b"]);
    store.remove_vm_secrets("b").unwrap();
    // Deleting the snapshot takes its grants with it.
    store.delete_snapshot("s1").unwrap();
    assert!(store.snapshots_using_secret("TOKEN").unwrap().is_empty());
    store.remove_vm_secrets("a").unwrap();
    assert!(store.vms_using_secret("TOKEN").unwrap().is_empty());
    // Deleting the VM takes its secrets with it.
    let again = VmSecret {
        name: "KEY".into(),
        hosts: vec!["api.test".into()],
        placeholder: "BANGER_PLACEHOLDER_KEY_01".into(),
        in_body: false,
    };
    store.add_vm_secrets("b", &[again]).unwrap();
    store.delete_vm("b").unwrap();
    assert!(store.vms_using_secret("KEY").unwrap().is_empty());
}

#[test]
fn workspaces_follow_their_vm() {
    let store = Store::open_in_memory().unwrap();
    store.insert_image(&image("img", "base")).unwrap();
    store.insert_vm(&vm("a", "box-a", "img", 2)).unwrap();
    store.insert_vm(&vm("b", "box-b", "img", 3)).unwrap();
    assert_eq!(store.vm_workspace("a", "/root/p").unwrap(), None);
    store.set_vm_workspace("a", "/root/p", "/home/u/p").unwrap();
    store.set_vm_workspace("a", "/root/q", "/home/u/q").unwrap();
    // A prepare into the same place replaces the record.
    store
        .set_vm_workspace("a", "/root/p", "/home/u/p2")
        .unwrap();
    assert_eq!(
        store.vm_workspace("a", "/root/p").unwrap().as_deref(),
        Some("/home/u/p2")
    );
    assert_eq!(store.vm_workspace("b", "/root/p").unwrap(), None);
    // A snapshot keeps them; a VM restored from it gets them.
    let mut snap = snapshot("s1", "snap", "img");
    snap.source_vm_id = "a".into();
    store.insert_snapshot(&snap).unwrap();
    store.snapshot_vm_workspaces("s1", "a").unwrap();
    store.delete_vm("a").unwrap();
    assert_eq!(store.vm_workspace("a", "/root/p").unwrap(), None);
    store.restore_vm_workspaces("b", "s1").unwrap();
    assert_eq!(
        store.vm_workspace("b", "/root/q").unwrap().as_deref(),
        Some("/home/u/q")
    );
    assert_eq!(
        store.vm_workspace("b", "/root/p").unwrap().as_deref(),
        Some("/home/u/p2")
    );
    // Deleting the snapshot or the VM takes theirs with it.
    store.delete_snapshot("s1").unwrap();
    store.insert_snapshot(&snap).unwrap();
    store.insert_vm(&vm("c", "box-c", "img", 4)).unwrap();
    store.restore_vm_workspaces("c", "s1").unwrap();
    assert_eq!(store.vm_workspace("c", "/root/q").unwrap(), None);
    store.delete_vm("b").unwrap();
    assert_eq!(store.vm_workspace("b", "/root/q").unwrap(), None);
}
