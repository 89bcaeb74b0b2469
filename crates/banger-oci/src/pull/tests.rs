use super::*;
use crate::layer::tests::TarBuilder;
use banger_image::test_support::Planted;

struct Setup {
    dir: tempfile::TempDir,
    opts: BuildOptions,
}

/// Options for an image built under a fresh temporary directory, with a
/// fake agent and base kernel.
fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    for f in ["agent", "vmlinux", "initrd"] {
        std::fs::write(p.join(f), f).unwrap();
    }
    let opts = BuildOptions {
        dest_dir: p.join("images/img"),
        scratch: ScratchSpace {
            dir: p.join("shm"),
            records: p.join("images/.scratch"),
        },
        agent_bin: p.join("agent"),
        base: BaseKernel {
            name: "base".into(),
            vmlinux: p.join("vmlinux"),
            vmlinuz: None,
            initrd: Some(p.join("initrd")),
        },
        services: Vec::new(),
        limits: crate::layer::tests::NO_CAPS,
    };
    Setup { dir, opts }
}

fn tarball(s: &Setup, name: &str, tar: Vec<u8>) -> PathBuf {
    let path = s.dir.path().join(name);
    std::fs::write(&path, tar).unwrap();
    path
}

fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Another user's names in the shared scratch directory are never
/// removed, chmodded or written through, by an import (good or bad) or by
/// the sweep of leftovers. Needs root (to plant another uid's directory).
#[test]
fn names_planted_in_the_shared_scratch_dir_are_left_alone() {
    assert!(
        rustix::process::geteuid().is_root(),
        "this test chowns a planted directory: run the tests as root"
    );
    let s = setup();
    let planted = Planted::new(&s.opts.scratch.dir, s.dir.path(), "banger-oci");
    let good = tarball(
        &s,
        "good.tar",
        TarBuilder::new().file("etc/hostname", b"x\n").finish(),
    );
    import(&good, &s.opts, &mut |_| {}).unwrap();
    planted.untouched();
    let bad = tarball(&s, "bad.tar", vec![7u8; 4096]);
    let mut opts = s.opts.clone();
    opts.dest_dir = s.dir.path().join("images/bad");
    import(&bad, &opts, &mut |_| {}).unwrap_err();
    planted.untouched();
    assert_eq!(
        names(&s.opts.scratch.dir),
        [
            "banger-oci-999999998-theirs",
            "banger-oci-999999999-planted"
        ]
    );
    assert!(names(&s.opts.scratch.records).is_empty());
    assert_eq!(names(&s.dir.path().join("images")), [".scratch", "img"]);
}

/// An import over a cap fails naming the cap, the key and the entry, and
/// leaves nothing: no image, no staging directory, no tree, no record.
#[test]
fn an_import_over_a_cap_leaves_nothing() {
    let s = setup();
    let mut tar = TarBuilder::new();
    for i in 0..20 {
        tar.file(&format!("usr/share/f{i}"), &[1; 5000]);
    }
    let path = tarball(&s, "big.tar", tar.finish());
    for (limits, (cap, key)) in [
        (
            Limits {
                max_bytes: u64::MAX,
                max_entries: 10,
            },
            (
                "cap of 10 entries",
                "[image] max_unpack_entries in config.toml",
            ),
        ),
        (
            Limits {
                max_bytes: 50_000,
                max_entries: u64::MAX,
            },
            (
                "cap of 50000 bytes of file data",
                "[image] max_unpack_gib in config.toml",
            ),
        ),
    ] {
        let mut opts = s.opts.clone();
        opts.limits = limits;
        let Err(e) = import(&path, &opts, &mut |_| {}) else {
            panic!("imported over {limits:?}");
        };
        assert!(e.is_refusal(), "{e:?}");
        let mut chain = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            chain.push_str(&format!(": {s}"));
            source = s.source();
        }
        assert!(chain.contains(cap) && chain.contains(key), "{chain}");
        assert!(
            chain.contains("cannot import") && chain.contains("usr/share/f"),
            "{chain}"
        );
        assert!(
            names(&s.opts.scratch.dir).is_empty(),
            "{:?}",
            names(&s.opts.scratch.dir)
        );
        assert!(names(&s.opts.scratch.records).is_empty());
        assert_eq!(names(&s.dir.path().join("images")), [".scratch"]);
    }
}
