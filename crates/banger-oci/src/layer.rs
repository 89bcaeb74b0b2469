//! Applying layer tarballs to a root directory, in order, the way a
//! container runtime stacks them: whiteouts (`.wh.NAME`) remove what lower
//! layers made, an opaque marker (`.wh..wh..opq`) hides a directory's lower
//! contents, later entries replace earlier ones.
//!
//! Nothing a layer says may touch anything outside the root: entries with
//! absolute paths or `..`, symlinks whose relative target climbs above the
//! root, hard links to paths outside it, and entries (or whiteouts) that
//! would go through a symlink are refused with an error naming the entry.
//! No operation follows a symlink: final components are removed before they
//! are created, parents are checked with `lstat`. Absolute symlink targets
//! are kept: inside the guest they resolve within its own root.
//!
//! What all of an image's layers make together is capped ([`Limits`]: file
//! data, entries), each file checked before it is written, and blocks of
//! zeros are left as holes: a small layer cannot fill the disk.
//!
//! Ownership, modes (set-id bits included), xattrs (`SCHILY.xattr.*` PAX
//! records) and modification times are kept. Ownership, device nodes and
//! `trusted.*` xattrs need root: without it they are counted in
//! [`ApplyStats`] and skipped, and the files belong to the applying user
//! (whose directories stay writable until [`Applier::finish`]).

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, SystemTime};

use rustix::fs::{AtFlags, CWD, FileType, Gid, Mode, Timespec, Timestamps, Uid, XattrFlags};

/// Name prefix of a whiteout entry.
pub const WHITEOUT_PREFIX: &str = ".wh.";
/// An opaque directory's marker entry.
pub const OPAQUE_MARKER: &str = ".wh..wh..opq";

/// Why a layer could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error("layer entry {entry:?} {reason}: refusing the image")]
    Unsafe { entry: String, reason: String },
    #[error("layer entry {entry:?}: {reason}")]
    Conflict { entry: String, reason: String },
    #[error("layer entry {entry:?} has type {kind:?}, which a root filesystem cannot hold")]
    Unsupported { entry: String, kind: String },
    #[error("layer entry {entry:?}: cannot {what}")]
    Io {
        entry: String,
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("the layer is not a valid (gzip, zstd or plain) tar archive")]
    Tar(#[source] io::Error),
    #[error(
        "layer entry {entry:?} takes the image over its cap of {cap}: refusing the image \
         (raise [image] {key} in config.toml to allow bigger images)",
        key = cap.config_key()
    )]
    OverCap { entry: String, cap: Cap },
}

/// Caps on what one image's layers may make, together: a small layer can
/// decompress (or declare a sparse file) into far more than any disk holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Bytes of regular-file data, holes included.
    pub max_bytes: u64,
    /// Tar entries (files, directories, links, whiteouts…).
    pub max_entries: u64,
}

/// The cap an image went over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cap {
    Bytes(u64),
    Entries(u64),
}

impl Cap {
    /// The `[image]` key of `config.toml` that sets this cap.
    pub fn config_key(self) -> &'static str {
        match self {
            Cap::Bytes(_) => "max_unpack_gib",
            Cap::Entries(_) => "max_unpack_entries",
        }
    }
}

impl std::fmt::Display for Cap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Cap::Bytes(b) if b % (1 << 30) == 0 => write!(f, "{} GiB of file data", b >> 30),
            Cap::Bytes(b) => write!(f, "{b} bytes of file data"),
            Cap::Entries(n) => write!(f, "{n} entries"),
        }
    }
}

impl LayerError {
    /// Whether the layer itself is refused: hostile, or over a cap (as
    /// opposed to a local I/O failure).
    pub fn is_refusal(&self) -> bool {
        matches!(self, LayerError::Unsafe { .. } | LayerError::OverCap { .. })
    }
}

/// What applying layers did besides writing files.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplyStats {
    pub entries: u64,
    pub bytes: u64,
    pub whiteouts: u64,
    pub opaque_dirs: u64,
    /// Entries whose owner could not be set (not root).
    pub owners_skipped: u64,
    /// Device nodes not created (not root).
    pub devices_skipped: u64,
    /// Extended attributes the filesystem or our privileges refused.
    pub xattrs_skipped: u64,
}

/// Applies layers, in order, to one root directory.
#[derive(Debug)]
pub struct Applier {
    root: PathBuf,
    limits: Limits,
    is_root: bool,
    /// Relative paths checked to be real directories (not symlinks).
    dirs_ok: HashSet<PathBuf>,
    stats: ApplyStats,
    buf: Vec<u8>,
    /// Not root: directories stay writable (u+rwx) while layers are
    /// applied; their real modes are set by [`Applier::finish`].
    deferred_modes: Vec<(PathBuf, u32)>,
}

/// One tar entry's metadata, taken before its data is read.
struct Meta {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: Option<SystemTime>,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// The layer's own paths: whiteouts and opaque markers only hide what
/// lower layers made.
type Added = HashSet<PathBuf>;

impl Applier {
    /// `root` must exist; it becomes the image's `/`. Every layer applied
    /// counts towards `limits`.
    pub fn new(root: &Path, limits: Limits) -> Applier {
        Applier {
            root: root.to_owned(),
            limits,
            is_root: rustix::process::geteuid().is_root(),
            dirs_ok: HashSet::new(),
            stats: ApplyStats::default(),
            buf: vec![0; 256 << 10],
            deferred_modes: Vec::new(),
        }
    }

    pub fn stats(&self) -> &ApplyStats {
        &self.stats
    }

    /// After the last layer: gives directories the modes their layers
    /// asked for (deferred when not root, so later entries could be made).
    pub fn finish(&mut self) -> Result<(), LayerError> {
        for (path, mode) in self.deferred_modes.drain(..).rev() {
            match rustix::fs::chmodat(CWD, &path, Mode::from_raw_mode(mode), AtFlags::empty()) {
                // Removed by a later layer.
                Err(rustix::io::Errno::NOENT) => {}
                Err(e) => {
                    return Err(LayerError::Io {
                        entry: path.display().to_string(),
                        what: "set its mode".to_owned(),
                        source: e.into(),
                    });
                }
                Ok(()) => {}
            }
        }
        Ok(())
    }

    /// Applies one layer (gzip, zstd or plain tar, told apart by their
    /// magic bytes) on top of what is there, reading `reader` to its end.
    pub fn apply<R: Read>(&mut self, reader: R) -> Result<(), LayerError> {
        let mut input = BufReader::with_capacity(256 << 10, reader);
        let head = input.fill_buf().map_err(LayerError::Tar)?;
        let mut tar: Box<dyn Read + '_> = if head.starts_with(&[0x1f, 0x8b]) {
            Box::new(flate2::bufread::MultiGzDecoder::new(input))
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Box::new(Zstd::new(input))
        } else {
            Box::new(input)
        };
        self.apply_tar(&mut tar)?;
        // Read past the end-of-archive blocks, so the caller's digest covers
        // every byte and a truncated stream shows up as an error.
        io::copy(&mut tar, &mut io::sink()).map_err(LayerError::Tar)?;
        Ok(())
    }

    fn apply_tar(&mut self, reader: &mut dyn Read) -> Result<(), LayerError> {
        let mut archive = tar::Archive::new(reader);
        let mut added = Added::new();
        let mut dir_times: Vec<(PathBuf, SystemTime)> = Vec::new();
        for entry in archive.entries().map_err(LayerError::Tar)? {
            let mut entry = entry.map_err(LayerError::Tar)?;
            self.entry(&mut entry, &mut added, &mut dir_times)?;
        }
        // Children changed the directories' times: set them last, deepest first.
        for (path, t) in dir_times.iter().rev() {
            let _ = set_times_nofollow(path, *t);
        }
        Ok(())
    }

    fn entry<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        added: &mut Added,
        dir_times: &mut Vec<(PathBuf, SystemTime)>,
    ) -> Result<(), LayerError> {
        let raw = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw).into_owned();
        let kind = entry.header().entry_type();
        if kind.is_pax_global_extensions() {
            return Ok(());
        }
        self.stats.entries += 1;
        if self.stats.entries > self.limits.max_entries {
            return Err(LayerError::OverCap {
                entry: shown,
                cap: Cap::Entries(self.limits.max_entries),
            });
        }
        let rel = clean_path(&raw).map_err(|reason| LayerError::Unsafe {
            entry: shown.clone(),
            reason: reason.to_owned(),
        })?;
        let meta = read_meta(entry).map_err(LayerError::Tar)?;
        let full = self.root.join(&rel);
        if rel.as_os_str().is_empty() {
            // The root itself (`./`): only its metadata.
            if kind.is_dir() {
                self.set_owner_mode(&shown, &full, &meta, false)?;
                if let Some(t) = meta.mtime {
                    dir_times.push((full, t));
                }
            }
            return Ok(());
        }
        let name = rel.file_name().unwrap_or_default().as_bytes();
        if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX.as_bytes()) {
            let parent = rel.parent().unwrap_or(Path::new("")).to_owned();
            if name == OPAQUE_MARKER.as_bytes() {
                return self.opaque(&shown, &parent, added);
            }
            if hidden.starts_with(WHITEOUT_PREFIX.as_bytes()) {
                // Other `.wh..wh.*` names are aufs bookkeeping, not content.
                return Ok(());
            }
            return self.whiteout(&shown, &parent.join(OsStr::from_bytes(hidden)), added);
        }
        self.ensure_parents(&shown, &rel, added)?;
        let io_err = |what: &str| {
            let entry = shown.clone();
            let what = what.to_owned();
            move |source| LayerError::Io {
                entry,
                what,
                source,
            }
        };
        match kind {
            tar::EntryType::Directory => {
                match full.symlink_metadata() {
                    Ok(m) if m.is_dir() => {}
                    Ok(_) => {
                        self.remove(&rel).map_err(io_err("replace it"))?;
                        std::fs::create_dir(&full).map_err(io_err("create the directory"))?;
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        std::fs::create_dir(&full).map_err(io_err("create the directory"))?;
                    }
                    Err(e) => return Err(io_err("inspect it")(e)),
                }
                self.dirs_ok.insert(rel.clone());
                let mut meta = meta;
                if !self.is_root && meta.mode & 0o700 != 0o700 {
                    self.deferred_modes.push((full.clone(), meta.mode));
                    meta.mode |= 0o700;
                }
                self.set_owner_mode(&shown, &full, &meta, false)?;
                self.set_xattrs(&full, &meta);
                if let Some(t) = meta.mtime {
                    dir_times.push((full, t));
                }
            }
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                // The size is known up front (a GNU sparse entry's is the
                // size it expands to): refuse before writing anything.
                if self.stats.bytes.saturating_add(entry.size()) > self.limits.max_bytes {
                    return Err(LayerError::OverCap {
                        entry: shown,
                        cap: Cap::Bytes(self.limits.max_bytes),
                    });
                }
                self.remove(&rel).map_err(io_err("replace it"))?;
                let f = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                    .open(&full)
                    .map_err(io_err("create the file"))?;
                let mut len = 0u64;
                loop {
                    let n = match entry.read(&mut self.buf) {
                        Ok(0) => break,
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => return Err(LayerError::Tar(e)),
                    };
                    write_skipping_zeros(&f, &self.buf[..n], len)
                        .map_err(io_err("write the file"))?;
                    len += n as u64;
                }
                // Zeros at the end were left out too.
                f.set_len(len).map_err(io_err("write the file"))?;
                self.stats.bytes += len;
                if self.is_root {
                    rustix::fs::fchown(&f, Some(uid(meta.uid)), Some(gid(meta.gid)))
                        .map_err(|e| io_err("set its owner")(e.into()))?;
                } else {
                    self.stats.owners_skipped += 1;
                }
                f.set_permissions(std::fs::Permissions::from_mode(meta.mode))
                    .map_err(io_err("set its mode"))?;
                self.set_xattrs(&full, &meta);
                if let Some(t) = meta.mtime {
                    let _ = f.set_times(std::fs::FileTimes::new().set_modified(t).set_accessed(t));
                }
            }
            tar::EntryType::Symlink => {
                let target = entry.link_name_bytes().unwrap_or_default().into_owned();
                check_symlink(&rel, &target).map_err(|reason| LayerError::Unsafe {
                    entry: shown.clone(),
                    reason,
                })?;
                self.remove(&rel).map_err(io_err("replace it"))?;
                std::os::unix::fs::symlink(OsStr::from_bytes(&target), &full)
                    .map_err(io_err("create the symlink"))?;
                self.set_owner_mode(&shown, &full, &meta, true)?;
                if let Some(t) = meta.mtime {
                    let _ = set_times_nofollow(&full, t);
                }
            }
            tar::EntryType::Link => {
                let target = entry.link_name_bytes().unwrap_or_default().into_owned();
                let shown_target = String::from_utf8_lossy(&target).into_owned();
                let trel = clean_path(&target).map_err(|r| LayerError::Unsafe {
                    entry: shown.clone(),
                    reason: format!("is a hard link to {shown_target:?}, which {r}"),
                })?;
                if trel == rel {
                    return Ok(());
                }
                self.check_existing_parents(&shown, &trel, "is a hard link")?;
                let tfull = self.root.join(&trel);
                match tfull.symlink_metadata() {
                    Ok(m) if m.is_dir() => {
                        return Err(LayerError::Conflict {
                            entry: shown,
                            reason: format!("is a hard link to the directory {shown_target:?}"),
                        });
                    }
                    Ok(_) => {}
                    Err(_) => {
                        return Err(LayerError::Conflict {
                            entry: shown,
                            reason: format!(
                                "is a hard link to {shown_target:?}, which no earlier entry made"
                            ),
                        });
                    }
                }
                self.remove(&rel).map_err(io_err("replace it"))?;
                std::fs::hard_link(&tfull, &full).map_err(io_err("create the hard link"))?;
            }
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                self.remove(&rel).map_err(io_err("replace it"))?;
                let (ft, dev) = match kind {
                    tar::EntryType::Char => (FileType::CharacterDevice, device(entry.header())),
                    tar::EntryType::Block => (FileType::BlockDevice, device(entry.header())),
                    _ => (FileType::Fifo, 0),
                };
                match rustix::fs::mknodat(CWD, &full, ft, Mode::from_raw_mode(0o600), dev) {
                    Ok(()) => {
                        self.set_owner_mode(&shown, &full, &meta, false)?;
                        if let Some(t) = meta.mtime {
                            let _ = set_times_nofollow(&full, t);
                        }
                    }
                    Err(rustix::io::Errno::PERM) if !self.is_root => {
                        self.stats.devices_skipped += 1;
                    }
                    Err(e) => return Err(io_err("create the device node")(e.into())),
                }
            }
            other => {
                return Err(LayerError::Unsupported {
                    entry: shown,
                    kind: format!("{other:?}"),
                });
            }
        }
        added.insert(rel);
        Ok(())
    }

    /// Owner, then mode (changing the owner clears set-id bits).
    fn set_owner_mode(
        &mut self,
        shown: &str,
        full: &Path,
        meta: &Meta,
        is_symlink: bool,
    ) -> Result<(), LayerError> {
        let io_err = |what: &str, e: rustix::io::Errno| LayerError::Io {
            entry: shown.to_owned(),
            what: what.to_owned(),
            source: e.into(),
        };
        if self.is_root {
            rustix::fs::chownat(
                CWD,
                full,
                Some(uid(meta.uid)),
                Some(gid(meta.gid)),
                AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(|e| io_err("set its owner", e))?;
        } else {
            self.stats.owners_skipped += 1;
        }
        if !is_symlink {
            // Only ever called on a directory or node this applier just
            // checked or made, never on a symlink.
            rustix::fs::chmodat(CWD, full, Mode::from_raw_mode(meta.mode), AtFlags::empty())
                .map_err(|e| io_err("set its mode", e))?;
        }
        Ok(())
    }

    fn set_xattrs(&mut self, full: &Path, meta: &Meta) {
        for (name, value) in &meta.xattrs {
            if rustix::fs::lsetxattr(full, OsStr::from_bytes(name), value, XattrFlags::empty())
                .is_err()
            {
                self.stats.xattrs_skipped += 1;
            }
        }
    }

    /// Every parent of `rel` is a real directory afterwards: missing ones
    /// are made (0755, root's); a symlink on the way is refused.
    fn ensure_parents(
        &mut self,
        shown: &str,
        rel: &Path,
        added: &mut Added,
    ) -> Result<(), LayerError> {
        let Some(parent) = rel.parent() else {
            return Ok(());
        };
        let mut prefix = PathBuf::new();
        for c in parent.components() {
            prefix.push(c);
            if self.dirs_ok.contains(&prefix) {
                continue;
            }
            let full = self.root.join(&prefix);
            match full.symlink_metadata() {
                Ok(m) if m.is_dir() => {}
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(LayerError::Unsafe {
                        entry: shown.to_owned(),
                        reason: format!(
                            "would be written through the symlink {:?}{}",
                            prefix.display().to_string(),
                            link_target(&full)
                        ),
                    });
                }
                Ok(_) => {
                    return Err(LayerError::Conflict {
                        entry: shown.to_owned(),
                        reason: format!(
                            "its parent {:?} is not a directory",
                            prefix.display().to_string()
                        ),
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    std::fs::create_dir(&full).map_err(|source| LayerError::Io {
                        entry: shown.to_owned(),
                        what: format!("create its parent {}", prefix.display()),
                        source,
                    })?;
                    added.insert(prefix.clone());
                }
                Err(source) => {
                    return Err(LayerError::Io {
                        entry: shown.to_owned(),
                        what: format!("inspect its parent {}", prefix.display()),
                        source,
                    });
                }
            }
            self.dirs_ok.insert(prefix.clone());
        }
        Ok(())
    }

    /// Whether every parent of `rel` exists as a real directory; a symlink
    /// on the way is refused (`what` says what the entry is).
    fn check_existing_parents(
        &mut self,
        shown: &str,
        rel: &Path,
        what: &str,
    ) -> Result<bool, LayerError> {
        let Some(parent) = rel.parent() else {
            return Ok(true);
        };
        let mut prefix = PathBuf::new();
        for c in parent.components() {
            prefix.push(c);
            if self.dirs_ok.contains(&prefix) {
                continue;
            }
            let full = self.root.join(&prefix);
            match full.symlink_metadata() {
                Ok(m) if m.is_dir() => {
                    self.dirs_ok.insert(prefix.clone());
                }
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(LayerError::Unsafe {
                        entry: shown.to_owned(),
                        reason: format!(
                            "{what} through the symlink {:?}{}",
                            prefix.display().to_string(),
                            link_target(&full)
                        ),
                    });
                }
                _ => return Ok(false),
            }
        }
        Ok(true)
    }

    /// `.wh.NAME`: removes NAME as lower layers made it.
    fn whiteout(&mut self, shown: &str, rel: &Path, added: &Added) -> Result<(), LayerError> {
        let name = rel.file_name().unwrap_or_default();
        if name.is_empty() || name == "." || name == ".." || rel.components().count() == 0 {
            return Err(LayerError::Unsafe {
                entry: shown.to_owned(),
                reason: "is a whiteout of nothing nameable".to_owned(),
            });
        }
        self.stats.whiteouts += 1;
        if added.contains(rel) || !self.check_existing_parents(shown, rel, "is a whiteout")? {
            return Ok(());
        }
        self.remove(rel).map_err(|source| LayerError::Io {
            entry: shown.to_owned(),
            what: format!("remove {}", rel.display()),
            source,
        })
    }

    /// `DIR/.wh..wh..opq`: DIR keeps only what this layer puts in it.
    fn opaque(&mut self, shown: &str, dir: &Path, added: &mut Added) -> Result<(), LayerError> {
        self.stats.opaque_dirs += 1;
        // The directory itself must be real (made if missing).
        self.ensure_parents(shown, &dir.join("x"), added)?;
        self.remove_lower(dir, added)
            .map_err(|source| LayerError::Io {
                entry: shown.to_owned(),
                what: format!("clear the opaque directory {}", dir.display()),
                source,
            })
    }

    fn remove_lower(&mut self, dir: &Path, added: &Added) -> io::Result<()> {
        for child in std::fs::read_dir(self.root.join(dir))? {
            let rel = dir.join(child?.file_name());
            if added.contains(&rel) {
                if self.root.join(&rel).symlink_metadata()?.is_dir() {
                    self.remove_lower(&rel, added)?;
                }
            } else {
                self.remove(&rel)?;
            }
        }
        Ok(())
    }

    /// Removes whatever is at `rel` (a directory with its contents; never
    /// following a symlink). Nothing there is fine.
    fn remove(&mut self, rel: &Path) -> io::Result<()> {
        let full = self.root.join(rel);
        match full.symlink_metadata() {
            Ok(m) if m.is_dir() => {
                std::fs::remove_dir_all(&full)?;
                self.dirs_ok.retain(|p| !p.starts_with(rel));
                Ok(())
            }
            Ok(_) => std::fs::remove_file(&full),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// Writes `data` at `offset` of a file that was empty, leaving out the
/// blocks (4 KiB, aligned in the file) that hold only zeros: the file reads
/// zeros wherever nothing was written, and those blocks stay holes, so a
/// sparse file (a disk image, a database) takes no more disk than it did
/// where it was made.
fn write_skipping_zeros(f: &File, data: &[u8], offset: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    const BLOCK: usize = 4096;
    static ZEROS: [u8; BLOCK] = [0; BLOCK];
    // Bytes from `start` to `i` are still to be written.
    let (mut start, mut i) = (0, 0);
    while i < data.len() {
        let in_block = (offset + i as u64) as usize % BLOCK;
        let end = (i + BLOCK - in_block).min(data.len());
        if data[i..end] == ZEROS[..end - i] {
            if start < i {
                f.write_all_at(&data[start..i], offset + start as u64)?;
            }
            start = end;
        }
        i = end;
    }
    if start < data.len() {
        f.write_all_at(&data[start..], offset + start as u64)?;
    }
    Ok(())
}

fn uid(raw: u32) -> Uid {
    Uid::from_raw(raw)
}

fn gid(raw: u32) -> Gid {
    Gid::from_raw(raw)
}

fn device(h: &tar::Header) -> u64 {
    let major = h.device_major().ok().flatten().unwrap_or(0);
    let minor = h.device_minor().ok().flatten().unwrap_or(0);
    rustix::fs::makedev(major, minor)
}

fn link_target(full: &Path) -> String {
    std::fs::read_link(full)
        .map(|t| format!(" (-> {})", t.display()))
        .unwrap_or_default()
}

fn set_times_nofollow(path: &Path, t: SystemTime) -> io::Result<()> {
    let d = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    let ts = Timespec {
        tv_sec: d.as_secs() as i64,
        tv_nsec: d.subsec_nanos().into(),
    };
    let times = Timestamps {
        last_access: ts,
        last_modification: ts,
    };
    Ok(rustix::fs::utimensat(
        CWD,
        path,
        &times,
        AtFlags::SYMLINK_NOFOLLOW,
    )?)
}

/// Mode, owner, time and xattrs of an entry (PAX records override the
/// header's fields).
fn read_meta<R: Read>(entry: &mut tar::Entry<'_, R>) -> io::Result<Meta> {
    let h = entry.header();
    let mut meta = Meta {
        mode: h.mode().unwrap_or(0o644) & 0o7777,
        uid: h.uid().unwrap_or(0).try_into().unwrap_or(0),
        gid: h.gid().unwrap_or(0).try_into().unwrap_or(0),
        mtime: h
            .mtime()
            .ok()
            .map(|s| SystemTime::UNIX_EPOCH + Duration::from_secs(s)),
        xattrs: Vec::new(),
    };
    if let Some(pax) = entry.pax_extensions()? {
        for ext in pax {
            let ext = ext?;
            let key = ext.key_bytes();
            let value = ext.value_bytes();
            if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                meta.xattrs.push((name.to_vec(), value.to_vec()));
                continue;
            }
            let text = std::str::from_utf8(value).unwrap_or("");
            match key {
                b"uid" => meta.uid = text.parse().unwrap_or(meta.uid),
                b"gid" => meta.gid = text.parse().unwrap_or(meta.gid),
                b"mtime" => {
                    if let Ok(secs) = text.parse::<f64>()
                        && secs >= 0.0
                        && secs.is_finite()
                    {
                        meta.mtime = Some(SystemTime::UNIX_EPOCH + Duration::from_secs_f64(secs));
                    }
                }
                _ => {}
            }
        }
    }
    Ok(meta)
}

/// An entry's path inside the root: `.` and empty components dropped;
/// absolute paths and `..` refused.
pub fn clean_path(raw: &[u8]) -> Result<PathBuf, &'static str> {
    if raw.first() == Some(&b'/') {
        return Err("has an absolute path");
    }
    let mut out = PathBuf::new();
    for c in raw.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err("climbs out of the root with `..`"),
            c => out.push(OsStr::from_bytes(c)),
        }
    }
    debug_assert!(out.components().all(|c| matches!(c, Component::Normal(_))));
    Ok(out)
}

/// Refuses a symlink whose relative target climbs above the root from
/// where the link is. Absolute targets resolve inside the guest's root.
pub fn check_symlink(rel: &Path, target: &[u8]) -> Result<(), String> {
    let shown = String::from_utf8_lossy(target);
    if target.is_empty() {
        return Err("is a symlink with an empty target".to_owned());
    }
    if target.first() == Some(&b'/') {
        return Ok(());
    }
    let mut depth = rel.components().count().saturating_sub(1) as i64;
    for c in target.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                depth -= 1;
                if depth < 0 {
                    return Err(format!(
                        "is a symlink to {shown:?}, which points outside the image's root"
                    ));
                }
            }
            _ => depth += 1,
        }
    }
    Ok(())
}

/// zstd, every frame of it (`ruzstd` decodes one frame per decoder).
struct Zstd<R: BufRead> {
    state: ZstdState<R>,
}

enum ZstdState<R: BufRead> {
    Frame(Box<ruzstd::StreamingDecoder<R, ruzstd::FrameDecoder>>),
    Between(R),
    Done,
}

impl<R: BufRead> Zstd<R> {
    fn new(input: R) -> Self {
        Zstd {
            state: ZstdState::Between(input),
        }
    }
}

impl<R: BufRead> Read for Zstd<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match std::mem::replace(&mut self.state, ZstdState::Done) {
                ZstdState::Frame(mut dec) => {
                    let n = dec.read(buf)?;
                    if n > 0 || buf.is_empty() {
                        self.state = ZstdState::Frame(dec);
                        return Ok(n);
                    }
                    self.state = ZstdState::Between(dec.into_inner());
                }
                ZstdState::Between(mut input) => {
                    if input.fill_buf()?.is_empty() {
                        return Ok(0);
                    }
                    let dec = ruzstd::StreamingDecoder::new(input)
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                    self.state = ZstdState::Frame(Box::new(dec));
                }
                ZstdState::Done => return Ok(0),
            }
        }
    }
}

/// A reader that hashes what passes through it.
#[derive(Debug)]
pub struct HashingReader<R> {
    inner: R,
    hasher: crate::digest::Sha256,
    count: u64,
}

impl<R: Read> HashingReader<R> {
    pub fn new(inner: R) -> Self {
        HashingReader {
            inner,
            hasher: crate::digest::Sha256::default(),
            count: 0,
        }
    }

    /// `sha256:<hex>` of everything read, and how many bytes.
    pub fn finish(self) -> (String, u64) {
        (self.hasher.digest(), self.count)
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

/// Applies `file` (a layer blob) with `applier`, checking that the blob
/// hashes to `digest` — the file may have been damaged since it was
/// downloaded. Returns `Ok(Err(actual))` on a digest mismatch.
pub fn apply_blob(
    applier: &mut Applier,
    file: File,
    digest: &str,
) -> Result<Result<(), String>, LayerError> {
    let mut hashing = HashingReader::new(file);
    applier.apply(&mut hashing)?;
    io::copy(&mut hashing, &mut io::sink()).map_err(LayerError::Tar)?;
    let (actual, _) = hashing.finish();
    Ok(if actual == digest {
        Ok(())
    } else {
        Err(actual)
    })
}

#[cfg(test)]
pub(crate) mod tests;
