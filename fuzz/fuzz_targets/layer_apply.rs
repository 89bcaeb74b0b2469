//! Arbitrary bytes as two stacked layers (plain, gzip or zstd tar, told
//! apart by their magic) applied into a root beside a sentinel directory:
//! no panic, and whatever the layers say, nothing outside the root changes
//! — no entry is written, linked or removed there. A second sentinel at a
//! fixed absolute path catches writes through absolute names and links; the
//! seed corpus (`fuzz/corpus/layer_apply`, made by `make_corpus.py`) aims at
//! it from the first run.
#![no_main]

use std::path::Path;

use banger_oci::{Applier, Limits};
use libfuzzer_sys::fuzz_target;

fn listing(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let data = std::fs::read(e.path()).unwrap_or_default();
            (e.file_name().to_string_lossy().into_owned(), data)
        })
        .collect();
    out.sort();
    out
}

/// Absolute: layers name it directly, or through `..` and links.
const SENTINEL: &str = "/tmp/banger-fuzz-sentinel";

fn sentinel() -> &'static Vec<(String, Vec<u8>)> {
    static BEFORE: std::sync::OnceLock<Vec<(String, Vec<u8>)>> = std::sync::OnceLock::new();
    BEFORE.get_or_init(|| {
        let _ = std::fs::remove_dir_all(SENTINEL);
        std::fs::create_dir(SENTINEL).unwrap();
        std::fs::write(Path::new(SENTINEL).join("secret"), b"host").unwrap();
        listing(Path::new(SENTINEL))
    })
}

fuzz_target!(|data: &[u8]| {
    let sentinel_before = sentinel();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let outside = dir.path().join("outside");
    std::fs::create_dir(&root).unwrap();
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("secret"), b"host").unwrap();
    let before = listing(dir.path());
    let outside_before = listing(&outside);

    // The first byte splits the input into a lower and an upper layer.
    let split = data
        .first()
        .map_or(0, |b| usize::from(*b) * data.len() / 256);
    let (lower, upper) = data.split_at(split.min(data.len()));
    // Small caps: the cap checks are fuzzed too, and no input fills the disk.
    let limits = Limits {
        max_bytes: 64 << 20,
        max_entries: 10_000,
    };
    let mut applier = Applier::new(&root, limits);
    if applier.apply(lower).is_ok() {
        if applier.apply(upper).is_ok() {
            let _ = applier.finish();
        }
    }

    assert_eq!(
        listing(dir.path()).len(),
        before.len(),
        "entries appeared beside the root"
    );
    assert_eq!(listing(&outside), outside_before, "the outside changed");
    assert_eq!(
        &listing(Path::new(SENTINEL)),
        sentinel_before,
        "{SENTINEL} changed"
    );
});
