//! The test boot behind `accel = "auto"`: it must tell a KVM that can run
//! the image's stock kernel from one that cannot. This machine kind's KVM is
//! PVM, which cannot; TCG can, slowly. (On hardware KVM hosts the KVM probe
//! succeeds in about a second; that is not assumed here.)

mod common;

use std::path::Path;
use std::time::Duration;

use banger_host::{Accel, KvmStatus};

#[tokio::test]
async fn the_probe_boot_tells_usable_acceleration_apart() {
    let image = common::cached_default_image();
    let qemu = banger_host::find_binary("qemu-system-x86_64").expect("qemu-system-x86_64");
    let scratch = tempfile::tempdir().unwrap();
    let (kernel, initrd) = (image.join("vmlinux"), image.join("initrd.img"));
    let probe = |accel, timeout| {
        banger_vmm::qemu::probe_boot(
            &qemu,
            accel,
            &kernel,
            Some(&initrd),
            scratch.path(),
            timeout,
        )
    };
    // The bounds decide "boots at all", not speed (the benchmark measures
    // that): TCG reaches the initramfs in about 4 s here, so 60 s allows a
    // loaded 2-core machine; hardware KVM needs well under 1 s of its 10 s,
    // and PVM never gets there.
    let tcg = probe(Accel::Tcg, Duration::from_secs(60)).await;
    let took = tcg.expect("TCG boots the stock kernel to its initramfs");
    eprintln!("TCG probe boot: {:.1}s", took.as_secs_f64());

    let status = banger_host::kvm_status();
    let kvm = probe(Accel::Kvm, Duration::from_secs(10)).await;
    eprintln!("KVM ({status}) probe boot: {kvm:?}");
    match status {
        KvmStatus::Pvm => assert!(kvm.is_err(), "PVM cannot run a stock kernel: {kvm:?}"),
        KvmStatus::Usable => assert!(kvm.is_ok(), "hardware KVM boots it: {kvm:?}"),
        KvmStatus::Missing | KvmStatus::NoAccess(_) => assert!(kvm.is_err()),
    }
    // QEMU is gone and the console log with it.
    assert_eq!(std::fs::read_dir(scratch.path()).unwrap().count(), 0);
    assert!(!Path::new(&scratch.path().join("probe-console.log")).exists());
}
