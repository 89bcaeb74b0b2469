use std::io::Write;
use std::os::unix::fs::MetadataExt;

use super::*;

/// A tar stream built entry by entry, with raw names (no validation: the
/// point is to write hostile ones too).
pub(crate) struct TarBuilder {
    b: tar::Builder<Vec<u8>>,
}

fn put(field: &mut [u8], value: &[u8]) {
    assert!(
        value.len() <= field.len(),
        "name too long for the test helper"
    );
    field[..value.len()].copy_from_slice(value);
}

impl TarBuilder {
    pub(crate) fn new() -> Self {
        TarBuilder {
            b: tar::Builder::new(Vec::new()),
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn raw(
        &mut self,
        name: &str,
        kind: tar::EntryType,
        mode: u32,
        owner: (u64, u64),
        link: Option<&str>,
        data: &[u8],
    ) -> &mut Self {
        let mut h = tar::Header::new_gnu();
        put(&mut h.as_old_mut().name, name.as_bytes());
        if let Some(l) = link {
            put(&mut h.as_old_mut().linkname, l.as_bytes());
        }
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(owner.0);
        h.set_gid(owner.1);
        h.set_mtime(1_700_000_000);
        h.set_size(data.len() as u64);
        h.set_cksum();
        self.b.append(&h, data).unwrap();
        self
    }

    pub(crate) fn dir(&mut self, name: &str) -> &mut Self {
        self.raw(name, tar::EntryType::Directory, 0o755, (0, 0), None, b"")
    }

    pub(crate) fn file(&mut self, name: &str, data: &[u8]) -> &mut Self {
        self.raw(name, tar::EntryType::Regular, 0o644, (0, 0), None, data)
    }

    pub(crate) fn symlink(&mut self, name: &str, target: &str) -> &mut Self {
        self.raw(
            name,
            tar::EntryType::Symlink,
            0o777,
            (0, 0),
            Some(target),
            b"",
        )
    }

    pub(crate) fn hardlink(&mut self, name: &str, target: &str) -> &mut Self {
        self.raw(name, tar::EntryType::Link, 0o644, (0, 0), Some(target), b"")
    }

    /// A PAX extended header for the next entry.
    pub(crate) fn pax(&mut self, records: &[(&str, &[u8])]) -> &mut Self {
        let mut data = Vec::new();
        for (k, v) in records {
            let body = k.len() + v.len() + 3; // ' ', '=', '\n'
            let mut len = body + 1;
            while len != body + len.to_string().len() {
                len = body + len.to_string().len();
            }
            data.extend_from_slice(format!("{len} {k}=").as_bytes());
            data.extend_from_slice(v);
            data.push(b'\n');
        }
        self.raw(
            "PaxHeader",
            tar::EntryType::XHeader,
            0o644,
            (0, 0),
            None,
            &data,
        )
    }

    pub(crate) fn finish(&mut self) -> Vec<u8> {
        let b = std::mem::replace(&mut self.b, tar::Builder::new(Vec::new()));
        b.into_inner().unwrap()
    }
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// A zstd frame of raw (stored) blocks: valid zstd with no encoder.
fn zstd_frame(data: &[u8]) -> Vec<u8> {
    let mut out = vec![0x28, 0xb5, 0x2f, 0xfd, 0x00, 7 << 3];
    let chunks: Vec<&[u8]> = if data.is_empty() {
        vec![&[]]
    } else {
        data.chunks(128 << 10).collect()
    };
    for (i, c) in chunks.iter().enumerate() {
        let last = u32::from(i + 1 == chunks.len());
        let header = last | ((c.len() as u32) << 3);
        out.extend_from_slice(&header.to_le_bytes()[..3]);
        out.extend_from_slice(c);
    }
    out
}

/// Caps no test layer comes near.
pub(crate) const NO_CAPS: Limits = Limits {
    max_bytes: u64::MAX,
    max_entries: u64::MAX,
};

struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    outside: PathBuf,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let outside = dir.path().join("outside");
    std::fs::create_dir(&root).unwrap();
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("secret"), "host").unwrap();
    Fixture {
        _dir: dir,
        root,
        outside,
    }
}

impl Fixture {
    fn apply(&self, layers: &[Vec<u8>]) -> Result<Applier, LayerError> {
        self.apply_capped(layers, NO_CAPS)
    }

    fn apply_capped(&self, layers: &[Vec<u8>], limits: Limits) -> Result<Applier, LayerError> {
        let mut a = Applier::new(&self.root, limits);
        for l in layers {
            a.apply(l.as_slice())?;
        }
        Ok(a)
    }

    /// The error applying `layers` under `limits` ends with.
    fn refused(&self, layers: &[Vec<u8>], limits: Limits) -> LayerError {
        match self.apply_capped(layers, limits) {
            Ok(a) => panic!("applied: {:?}", a.stats()),
            Err(e) => e,
        }
    }

    fn exists(&self, rel: &str) -> bool {
        self.root.join(rel).symlink_metadata().is_ok()
    }

    fn read(&self, rel: &str) -> String {
        std::fs::read_to_string(self.root.join(rel)).unwrap()
    }

    /// The directory outside the root is exactly as the fixture made it.
    fn outside_untouched(&self) {
        let names: Vec<_> = std::fs::read_dir(&self.outside)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("secret")]);
        assert_eq!(
            std::fs::read_to_string(self.outside.join("secret")).unwrap(),
            "host"
        );
    }
}

#[test]
fn files_dirs_links_modes_and_owners() {
    let f = fixture();
    let layer = TarBuilder::new()
        .dir("./")
        .dir("./etc/")
        .file("./etc/hosts", b"127.0.0.1 localhost\n")
        .raw(
            "usr/bin/tool",
            tar::EntryType::Regular,
            0o4751,
            (1234, 1234),
            None,
            b"#!/bin/sh\n",
        )
        .raw(
            "etc/shadow",
            tar::EntryType::Regular,
            0o600,
            (0, 42),
            None,
            b"root:*:1::::::\n",
        )
        .symlink("bin", "usr/bin")
        .symlink("etc/abs", "/usr/bin/tool")
        .hardlink("etc/hosts2", "etc/hosts")
        .raw("run/fifo", tar::EntryType::Fifo, 0o620, (0, 0), None, b"")
        .finish();
    let a = f.apply(&[layer]).unwrap();
    assert_eq!(f.read("etc/hosts"), "127.0.0.1 localhost\n");
    let tool = f.root.join("usr/bin/tool").symlink_metadata().unwrap();
    assert_eq!(tool.mode() & 0o7777, 0o4751);
    let shadow = f.root.join("etc/shadow").symlink_metadata().unwrap();
    assert_eq!(shadow.mode() & 0o7777, 0o600);
    if rustix::process::geteuid().is_root() {
        assert_eq!((tool.uid(), tool.gid()), (1234, 1234));
        assert_eq!((shadow.uid(), shadow.gid()), (0, 42));
        assert_eq!(a.stats().owners_skipped, 0);
    } else {
        assert!(a.stats().owners_skipped > 0);
    }
    assert_eq!(tool.mtime(), 1_700_000_000);
    assert_eq!(
        std::fs::read_link(f.root.join("bin")).unwrap(),
        Path::new("usr/bin")
    );
    assert_eq!(
        std::fs::read_link(f.root.join("etc/abs")).unwrap(),
        Path::new("/usr/bin/tool")
    );
    let h1 = f.root.join("etc/hosts").symlink_metadata().unwrap();
    let h2 = f.root.join("etc/hosts2").symlink_metadata().unwrap();
    assert_eq!(h1.ino(), h2.ino());
    assert!(
        f.root
            .join("run/fifo")
            .symlink_metadata()
            .unwrap()
            .file_type()
            .is_fifo()
    );
    assert_eq!(a.stats().bytes, 20 + 10 + 15);
}

use std::os::unix::fs::FileTypeExt;

#[test]
fn whiteouts_remove_lower_files_and_directories() {
    let f = fixture();
    let lower = TarBuilder::new()
        .file("a/keep", b"k")
        .file("a/gone", b"g")
        .file("d/sub/x", b"x")
        .finish();
    let upper = TarBuilder::new()
        .file("a/.wh.gone", b"")
        .file("d/.wh.sub", b"")
        .file(".wh.nothing-there", b"")
        .finish();
    let a = f.apply(&[lower, upper]).unwrap();
    assert!(f.exists("a/keep"));
    assert!(!f.exists("a/gone"));
    assert!(!f.exists("a/.wh.gone"), "whiteouts are not content");
    assert!(!f.exists("d/sub"));
    assert!(f.exists("d"));
    assert_eq!(a.stats().whiteouts, 3);
}

#[test]
fn a_whiteout_does_not_hide_its_own_layer() {
    let f = fixture();
    let lower = TarBuilder::new().file("x", b"old").finish();
    let upper = TarBuilder::new()
        .file("x", b"new")
        .file(".wh.x", b"")
        .finish();
    f.apply(&[lower, upper]).unwrap();
    assert_eq!(f.read("x"), "new");
}

#[test]
fn opaque_directories_replace_lower_contents() {
    let f = fixture();
    let lower = TarBuilder::new()
        .file("opt/app/old1", b"1")
        .file("opt/app/deep/old2", b"2")
        .file("opt/other", b"o")
        .finish();
    let upper = TarBuilder::new()
        .dir("opt/app/")
        .file("opt/app/.wh..wh..opq", b"")
        .file("opt/app/new", b"n")
        .finish();
    let a = f.apply(&[lower, upper]).unwrap();
    let mut names: Vec<_> = std::fs::read_dir(f.root.join("opt/app"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["new"]);
    assert!(f.exists("opt/other"));
    assert_eq!(a.stats().opaque_dirs, 1);

    // The marker after this layer's own entries keeps them.
    let again = TarBuilder::new()
        .file("opt/app/newer", b"m")
        .file("opt/app/.wh..wh..opq", b"")
        .finish();
    f.apply(&[again]).unwrap();
    assert!(f.exists("opt/app/newer"));
    assert!(!f.exists("opt/app/new"));
}

#[test]
fn later_entries_replace_earlier_ones_of_another_kind() {
    let f = fixture();
    let l1 = TarBuilder::new()
        .file("p/file-then-dir", b"f")
        .file("p/dir-then-file/child", b"c")
        .symlink("p/link-then-dir", "/tmp")
        .finish();
    let l2 = TarBuilder::new()
        .dir("p/file-then-dir/")
        .file("p/file-then-dir/inner", b"i")
        .file("p/dir-then-file", b"now a file")
        .dir("p/link-then-dir/")
        .file("p/link-then-dir/inside", b"safe")
        .finish();
    f.apply(&[l1, l2]).unwrap();
    assert_eq!(f.read("p/file-then-dir/inner"), "i");
    assert_eq!(f.read("p/dir-then-file"), "now a file");
    assert_eq!(f.read("p/link-then-dir/inside"), "safe");
    assert!(
        f.root
            .join("p/link-then-dir")
            .symlink_metadata()
            .unwrap()
            .is_dir()
    );
}

fn refused(f: &Fixture, layers: Vec<Vec<u8>>, needle: &str) {
    let e = f.apply(&layers).unwrap_err();
    assert!(e.is_refusal(), "{e}");
    let msg = e.to_string();
    assert!(msg.contains(needle), "{msg:?} should name {needle:?}");
    assert!(msg.contains("refusing the image"), "{msg}");
    f.outside_untouched();
}

#[test]
fn escapes_are_refused_naming_the_entry() {
    let f = fixture();
    refused(
        &f,
        vec![TarBuilder::new().file("../outside/evil", b"x").finish()],
        "\"../outside/evil\" climbs out",
    );
    refused(
        &f,
        vec![
            TarBuilder::new()
                .file("a/../../outside/evil", b"x")
                .finish(),
        ],
        "a/../../outside/evil",
    );
    refused(
        &f,
        vec![
            TarBuilder::new()
                .file(&format!("{}/evil", f.outside.display()), b"x")
                .finish(),
        ],
        "has an absolute path",
    );
    refused(
        &f,
        vec![TarBuilder::new().symlink("up", "../../outside").finish()],
        "points outside the image's root",
    );
    refused(
        &f,
        vec![TarBuilder::new().symlink("a/b/up", "../../..").finish()],
        "\"a/b/up\"",
    );
    // A symlink to an absolute path is fine; writing through it is not.
    refused(
        &f,
        vec![
            TarBuilder::new()
                .symlink("esc", &f.outside.display().to_string())
                .file("esc/evil", b"x")
                .finish(),
        ],
        "\"esc/evil\" would be written through the symlink \"esc\"",
    );
    // ... also when the symlink came from a lower layer.
    refused(
        &f,
        vec![
            TarBuilder::new().symlink("lower", "/").finish(),
            TarBuilder::new().file("lower/outside/evil", b"x").finish(),
        ],
        "through the symlink \"lower\"",
    );
    refused(
        &f,
        vec![
            TarBuilder::new()
                .hardlink("hl", &format!("{}/secret", f.outside.display()))
                .finish(),
        ],
        "is a hard link to",
    );
    refused(
        &f,
        vec![
            TarBuilder::new()
                .hardlink("hl", "../outside/secret")
                .finish(),
        ],
        "\"hl\" is a hard link to \"../outside/secret\", which climbs out",
    );
    refused(
        &f,
        vec![
            TarBuilder::new()
                .symlink("via", &f.outside.display().to_string())
                .hardlink("hl", "via/secret")
                .finish(),
        ],
        "is a hard link through the symlink \"via\"",
    );
    refused(
        &f,
        vec![
            TarBuilder::new()
                .symlink("wl", &f.outside.display().to_string())
                .file("wl/.wh.secret", b"")
                .finish(),
        ],
        "is a whiteout through the symlink",
    );
    refused(
        &f,
        vec![
            TarBuilder::new()
                .symlink("op", &f.outside.display().to_string())
                .file("op/.wh..wh..opq", b"")
                .finish(),
        ],
        "through the symlink \"op\"",
    );
}

#[test]
fn compressed_layers_by_magic() {
    let f = fixture();
    let tar = TarBuilder::new().file("gz", b"gzip").finish();
    f.apply(&[gzip(&tar)]).unwrap();
    assert_eq!(f.read("gz"), "gzip");
    // Two zstd frames, the archive split between them.
    let tar = TarBuilder::new()
        .file("z1", &vec![b'a'; 300_000])
        .file("z2", b"zstd")
        .finish();
    let (a, b) = tar.split_at(1000);
    let mut z = zstd_frame(a);
    z.extend(zstd_frame(b));
    f.apply(&[z]).unwrap();
    assert_eq!(f.read("z2"), "zstd");
    assert_eq!(f.read("z1").len(), 300_000);
}

#[test]
fn pax_records_set_xattrs_owner_and_long_names() {
    let f = fixture();
    let long = format!("{}/file", "d".repeat(150));
    let tar = TarBuilder::new()
        .pax(&[
            ("path", long.as_bytes()),
            ("uid", b"4321"),
            ("SCHILY.xattr.user.banger", b"yes"),
        ])
        .file("short-name-ignored", b"long")
        .finish();
    let a = f.apply(&[tar]).unwrap();
    assert_eq!(f.read(&long), "long");
    let m = f.root.join(&long).symlink_metadata().unwrap();
    if rustix::process::geteuid().is_root() {
        assert_eq!(m.uid(), 4321);
    }
    let mut buf = [0u8; 16];
    match rustix::fs::lgetxattr(f.root.join(&long), "user.banger", &mut buf) {
        Ok(n) => assert_eq!(&buf[..n], b"yes"),
        // user xattrs are not supported on every filesystem (older tmpfs).
        Err(_) => assert_eq!(a.stats().xattrs_skipped, 1),
    }
}

#[test]
fn garbage_is_a_tar_error() {
    let f = fixture();
    let e = f.apply(&[vec![7u8; 1024]]).unwrap_err();
    assert!(matches!(e, LayerError::Tar(_)), "{e}");
    let mut truncated = gzip(&TarBuilder::new().file("x", &[1; 5000]).finish());
    truncated.truncate(truncated.len() / 2);
    assert!(f.apply(&[truncated]).is_err());
}

#[test]
fn blob_digest_is_checked_while_applying() {
    let f = fixture();
    let tar = gzip(&TarBuilder::new().file("x", b"x").finish());
    let path = f.root.parent().unwrap().join("blob");
    std::fs::write(&path, &tar).unwrap();
    let digest = crate::digest::of(&tar);
    let mut a = Applier::new(&f.root, NO_CAPS);
    apply_blob(&mut a, File::open(&path).unwrap(), &digest)
        .unwrap()
        .unwrap();
    let wrong = format!("sha256:{}", "0".repeat(64));
    let got = apply_blob(&mut a, File::open(&path).unwrap(), &wrong)
        .unwrap()
        .unwrap_err();
    assert_eq!(got, digest);
}

#[test]
fn clean_path_and_symlink_rules() {
    assert_eq!(clean_path(b"./a//b/./c/").unwrap(), Path::new("a/b/c"));
    assert_eq!(clean_path(b"./").unwrap(), Path::new(""));
    assert!(clean_path(b"/etc").is_err());
    assert!(clean_path(b"a/../b").is_err());
    assert!(check_symlink(Path::new("a/b"), b"../c").is_ok());
    assert!(check_symlink(Path::new("a/b"), b"../../c").is_err());
    assert!(check_symlink(Path::new("a/b"), b"x/../../c").is_ok());
    assert!(check_symlink(Path::new("a"), b"/anything/../..").is_ok());
    assert!(check_symlink(Path::new("a"), b"").is_err());
}

/// A plain tar stream of one regular file of `size` bytes whose contents
/// are `data` (readers, in order), without holding it in memory.
fn streamed_file(name: &str, size: u64, data: impl Read) -> impl Read {
    let mut h = tar::Header::new_gnu();
    h.set_path(name).unwrap();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o644);
    h.set_size(size);
    h.set_cksum();
    let pad = (512 - size % 512) % 512;
    io::Cursor::new(h.as_bytes().to_vec())
        .chain(data.take(size))
        .chain(io::repeat(0).take(pad + 1024))
}

/// A 1 GiB file of zeros but for three blocks of data is written with
/// holes: it reads back the same and takes a few blocks of disk.
#[test]
fn runs_of_zeros_become_holes() {
    let f = fixture();
    let size = 1u64 << 30;
    let data = io::Cursor::new(vec![1u8; 4096])
        .chain(io::repeat(0).take((size >> 1) - 4096 - 100))
        .chain(io::Cursor::new(vec![2u8; 4096]))
        .chain(io::repeat(0).take(size))
        .take(size - 3)
        .chain(io::Cursor::new(b"end".to_vec()));
    let mut a = Applier::new(&f.root, NO_CAPS);
    a.apply(streamed_file("big", size, data)).unwrap();
    let path = f.root.join("big");
    let m = path.metadata().unwrap();
    assert_eq!(m.len(), size);
    assert!(
        m.blocks() * 512 <= 1 << 20,
        "{} bytes allocated",
        m.blocks() * 512
    );
    let file = File::open(&path).unwrap();
    let at = |off: u64, len: usize| {
        let mut buf = vec![0; len];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut buf, off).unwrap();
        buf
    };
    assert_eq!(at(0, 4097), [vec![1u8; 4096], vec![0]].concat());
    let second = (size >> 1) - 100;
    assert_eq!(
        at(second - 1, 4098),
        [vec![0], vec![2u8; 4096], vec![0]].concat()
    );
    assert_eq!(at(size - 4, 4), b"\0end");
    assert_eq!(a.stats().bytes, size);
}

/// Entries count over every layer of an image; the one that goes over
/// the cap is named, with the cap and the key that raises it.
#[test]
fn the_entry_cap_counts_every_layer() {
    let f = fixture();
    let caps = Limits {
        max_bytes: u64::MAX,
        max_entries: 3,
    };
    let one = TarBuilder::new().dir("etc/").file("etc/a", b"a").finish();
    let two = TarBuilder::new()
        .file("etc/b", b"b")
        .file("etc/c", b"c")
        .finish();
    let e = f.refused(&[one, two], caps);
    assert!(
        matches!(&e, LayerError::OverCap { entry, cap: Cap::Entries(3) } if entry == "etc/c"),
        "{e:?}"
    );
    assert!(e.is_refusal());
    let msg = e.to_string();
    assert!(
        msg.contains("\"etc/c\"") && msg.contains("cap of 3 entries"),
        "{msg}"
    );
    assert!(
        msg.contains("[image] max_unpack_entries in config.toml"),
        "{msg}"
    );
    assert!(!f.exists("etc/c"));
}

/// File data counts over every file of an image, holes included; the file
/// that would go over the cap is not made.
#[test]
fn the_byte_cap_counts_file_data() {
    let f = fixture();
    let caps = Limits {
        max_bytes: 10_000,
        max_entries: u64::MAX,
    };
    let layer = TarBuilder::new()
        .file("a", &[1; 6000])
        .file("b", &[0; 4000])
        .file("c", &[1; 1])
        .finish();
    let e = f.refused(&[layer], caps);
    assert!(
        matches!(&e, LayerError::OverCap { entry, cap: Cap::Bytes(10_000) } if entry == "c"),
        "{e:?}"
    );
    let msg = e.to_string();
    assert!(msg.contains("cap of 10000 bytes of file data"), "{msg}");
    assert!(
        msg.contains("[image] max_unpack_gib in config.toml"),
        "{msg}"
    );
    assert!(f.exists("b") && !f.exists("c"));
    assert_eq!(Cap::Bytes(64 << 30).to_string(), "64 GiB of file data");
}

/// A GNU sparse entry of a few bytes that declares a 1 TiB file is
/// refused before anything is written.
#[test]
fn a_sparse_file_bigger_than_the_cap_is_refused_at_once() {
    /// tar's base-256 number: too big for octal.
    fn big(field: &mut [u8; 12], v: u64) {
        field[0] = 0x80;
        field[4..].copy_from_slice(&v.to_be_bytes());
    }
    let f = fixture();
    let real = 1u64 << 40;
    let mut h = tar::Header::new_gnu();
    h.set_path("bomb").unwrap();
    h.set_entry_type(tar::EntryType::GNUSparse);
    h.set_mode(0o644);
    h.set_size(512);
    let gnu = h.as_gnu_mut().unwrap();
    big(&mut gnu.realsize, real);
    big(&mut gnu.sparse[0].offset, real - 512);
    big(&mut gnu.sparse[0].numbytes, 512);
    h.set_cksum();
    let mut tar = h.as_bytes().to_vec();
    tar.extend_from_slice(&[7; 512]);
    tar.extend_from_slice(&[0; 1024]);
    let caps = Limits {
        max_bytes: 64 << 30,
        max_entries: u64::MAX,
    };
    let t = std::time::Instant::now();
    let e = f.refused(&[tar], caps);
    assert!(
        matches!(
            e,
            LayerError::OverCap {
                cap: Cap::Bytes(_),
                ..
            }
        ),
        "{e:?}"
    );
    assert!(!f.exists("bomb"));
    assert!(t.elapsed().as_secs() < 5);
}
