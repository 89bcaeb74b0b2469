//! The host side of a workspace: what the working tree holds, a commit of
//! its uncommitted state (made without writing into the repository), and
//! the tar stream of both plus the `.git` directory.
//!
//! Blocking code (git runs, directory walks, file reads): called from
//! `spawn_blocking`.

use std::ffi::OsStr;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::mpsc;

use super::WorkspaceError;

/// What prepare sends.
#[derive(Debug)]
pub(super) struct Scan {
    /// The repository's top level.
    pub top: PathBuf,
    /// The host's HEAD.
    pub base: String,
    /// Working-tree entries, relative to `top`, in order.
    pub entries: Vec<Entry>,
    pub files: u64,
    pub bytes: u64,
    /// `.git` files: (path under `.git/`, host path).
    pub git_files: Vec<(String, PathBuf)>,
    pub git_bytes: u64,
}

#[derive(Debug)]
pub(super) struct Entry {
    pub rel: String,
    pub kind: Kind,
}

#[derive(Debug, PartialEq, Eq)]
pub(super) enum Kind {
    File {
        size: u64,
    },
    Symlink,
    /// An empty directory git knows of: an uninitialised submodule.
    Dir,
}

/// `git -C dir args…` with a clean environment; stdout, or the error
/// git gave.
pub(super) fn git(dir: &Path, args: &[&str], env: &[(&str, &OsStr)]) -> Result<Vec<u8>, String> {
    let mut cmd = Command::new("git");
    cmd.arg("-C")
        .arg(dir)
        .args(args)
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("LC_ALL", "C")
        .stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run git: {e} (install git)"))?;
    if out.status.success() {
        Ok(out.stdout)
    } else {
        Err(format!(
            "git {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// [`git`] for a command that writes into the user's repository, under
/// the user's `umask` (the daemon's own is 077).
pub(super) fn git_as_user(dir: &Path, umask: u32, args: &[&str]) -> Result<Vec<u8>, String> {
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg("umask \"$0\" && exec git \"$@\"")
        .arg(format!("{:03o}", umask & 0o777))
        .arg("-C")
        .arg(dir)
        .args(args)
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("LC_ALL", "C")
        .stdin(Stdio::null());
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run git: {e} (install git)"))?;
    if out.status.success() {
        Ok(out.stdout)
    } else {
        Err(format!(
            "git {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn git_line(dir: &Path, args: &[&str]) -> Result<String, String> {
    git(dir, args, &[]).map(|o| String::from_utf8_lossy(&o).trim().to_owned())
}

fn host(e: impl std::fmt::Display) -> WorkspaceError {
    WorkspaceError::Host(e.to_string())
}

/// The repository holding `path`: its top level, checked to be a usable
/// working tree with a commit.
pub(super) fn top_level(path: &Path) -> Result<PathBuf, WorkspaceError> {
    let meta = std::fs::metadata(path).map_err(|e| {
        WorkspaceError::Invalid(format!(
            "{}: {e}; give the repository's path",
            path.display()
        ))
    })?;
    if !meta.is_dir() {
        return Err(WorkspaceError::Invalid(format!(
            "{} is not a directory; give the repository's path",
            path.display()
        )));
    }
    if git_line(path, &["rev-parse", "--is-bare-repository"]).as_deref() == Ok("true") {
        return Err(WorkspaceError::Invalid(format!(
            "{} is a bare git repository: it has no working tree to copy; give a checkout",
            path.display()
        )));
    }
    let top = git_line(path, &["rev-parse", "--show-toplevel"]).map_err(|_| {
        WorkspaceError::Invalid(format!(
            "{} is not inside a git repository (run git init there, or give the repository's path)",
            path.display()
        ))
    })?;
    Ok(PathBuf::from(top))
}

/// List what prepare sends from the repository at `top`.
pub(super) fn scan(top: &Path, include_ignored: bool) -> Result<Scan, WorkspaceError> {
    let base = git_line(top, &["rev-parse", "--verify", "-q", "HEAD"]).map_err(|_| {
        WorkspaceError::Invalid(format!(
            "the repository {} has no commit yet: commit once, then prepare",
            top.display()
        ))
    })?;
    let mut scan = Scan {
        top: top.to_owned(),
        base,
        entries: Vec::new(),
        files: 0,
        bytes: 0,
        git_files: Vec::new(),
        git_bytes: 0,
    };
    list_tree(top, "", include_ignored, &mut scan)?;
    let abs = |args: &[&str]| git_line(top, args).map(PathBuf::from).map_err(host);
    let git_dir = abs(&["rev-parse", "--absolute-git-dir"])?;
    let common = abs(&["rev-parse", "--path-format=absolute", "--git-common-dir"])?;
    let linked = git_dir != common;
    walk_git_dir(&common, "", linked, &mut scan)?;
    if linked {
        // A linked worktree: its own HEAD and index over the shared rest.
        for name in ["HEAD", "index"] {
            let p = git_dir.join(name);
            if let Ok(m) = std::fs::metadata(&p) {
                scan.git_bytes += m.len();
                scan.git_files.push((name.to_owned(), p));
            }
        }
    }
    Ok(scan)
}

/// The working tree's files under `prefix` (a submodule's, recursively).
fn list_tree(
    top: &Path,
    prefix: &str,
    include_ignored: bool,
    scan: &mut Scan,
) -> Result<(), WorkspaceError> {
    let dir = top.join(prefix);
    let mut args = vec!["ls-files", "-z", "--cached", "--others", "--deduplicate"];
    if !include_ignored {
        args.push("--exclude-standard");
    }
    let listed = git(&dir, &args, &[]).map_err(host)?;
    for raw in listed.split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let name = std::str::from_utf8(raw).map_err(|_| {
            WorkspaceError::Invalid(format!(
                "{:?} in {} is not a UTF-8 file name; rename it (git mv) to prepare this repository",
                String::from_utf8_lossy(raw),
                dir.display()
            ))
        })?;
        let rel = format!("{prefix}{name}");
        let full = top.join(&rel);
        let meta = match std::fs::symlink_metadata(&full) {
            Ok(m) => m,
            // Deleted in the working tree: absent in the guest too.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(host(format!("{}: {e}", full.display()))),
        };
        let ft = meta.file_type();
        if ft.is_symlink() {
            // Copied as the link it is (git keeps its text), never followed.
            scan.entries.push(Entry {
                rel,
                kind: Kind::Symlink,
            });
        } else if ft.is_file() {
            scan.files += 1;
            scan.bytes += meta.len();
            scan.entries.push(Entry {
                rel,
                kind: Kind::File { size: meta.len() },
            });
        } else if ft.is_dir() {
            // A submodule (git lists its directory as one entry).
            let dotgit = full.join(".git");
            match std::fs::symlink_metadata(&dotgit) {
                Ok(m) if m.is_file() => {
                    scan.files += 1;
                    scan.bytes += m.len();
                    scan.entries.push(Entry {
                        rel: format!("{rel}/.git"),
                        kind: Kind::File { size: m.len() },
                    });
                    list_tree(top, &format!("{rel}/"), include_ignored, scan)?;
                }
                Ok(m) if m.is_dir() => {
                    return Err(WorkspaceError::Invalid(format!(
                        "submodule {rel} keeps its .git directory inside its working tree; run git submodule absorbgitdirs, then prepare"
                    )));
                }
                _ => scan.entries.push(Entry {
                    rel,
                    kind: Kind::Dir,
                }),
            }
        }
        // Sockets, FIFOs and devices in a working tree are not content.
    }
    Ok(())
}

/// Every file of the `.git` directory at `dir` (skipping other worktrees'
/// administrative files and lock files of git commands in flight).
fn walk_git_dir(
    dir: &Path,
    rel: &str,
    linked: bool,
    scan: &mut Scan,
) -> Result<(), WorkspaceError> {
    let rd = std::fs::read_dir(dir).map_err(|e| host(format!("{}: {e}", dir.display())))?;
    let mut names: Vec<_> = rd.flatten().collect();
    names.sort_by_key(|e| e.file_name());
    for e in names {
        let name = e.file_name();
        let Some(name) = name.to_str() else {
            continue;
        };
        let r = format!("{rel}{name}");
        if r == "worktrees" || name.ends_with(".lock") || (linked && (r == "HEAD" || r == "index"))
        {
            continue;
        }
        let meta = e
            .metadata()
            .map_err(|err| host(format!("{}: {err}", e.path().display())))?;
        if meta.is_dir() {
            walk_git_dir(&e.path(), &format!("{r}/"), linked, scan)?;
        } else if meta.is_file() {
            scan.git_bytes += meta.len();
            scan.git_files.push((r, e.path()));
        }
    }
    Ok(())
}

/// A commit of the working tree as it is (tracked edits, deletions and
/// untracked files on top of `base`), made with a copy of the index and
/// a private object directory: nothing is written into the repository.
/// Returns the commit and the new objects' files (under `objects/`).
pub(super) fn snapshot(
    scan: &Scan,
    scratch: &Path,
) -> Result<(String, Vec<(String, PathBuf)>), WorkspaceError> {
    let top = &scan.top;
    let git_dir = PathBuf::from(git_line(top, &["rev-parse", "--absolute-git-dir"]).map_err(host)?);
    let common = PathBuf::from(
        git_line(
            top,
            &["rev-parse", "--path-format=absolute", "--git-common-dir"],
        )
        .map_err(host)?,
    );
    let objects = scratch.join("objects");
    std::fs::create_dir_all(&objects).map_err(host)?;
    let index = scratch.join("index");
    if git_dir.join("index").exists() {
        std::fs::copy(git_dir.join("index"), &index).map_err(host)?;
    }
    let alternates = common.join("objects");
    let env: [(&str, &OsStr); 7] = [
        ("GIT_INDEX_FILE", index.as_os_str()),
        ("GIT_OBJECT_DIRECTORY", objects.as_os_str()),
        ("GIT_ALTERNATE_OBJECT_DIRECTORIES", alternates.as_os_str()),
        ("GIT_AUTHOR_NAME", OsStr::new("banger")),
        ("GIT_AUTHOR_EMAIL", OsStr::new("banger@localhost")),
        ("GIT_COMMITTER_NAME", OsStr::new("banger")),
        ("GIT_COMMITTER_EMAIL", OsStr::new("banger@localhost")),
    ];
    git(top, &["add", "-A"], &env).map_err(host)?;
    let tree = String::from_utf8_lossy(&git(top, &["write-tree"], &env).map_err(host)?)
        .trim()
        .to_owned();
    let base_tree =
        git_line(top, &["rev-parse", &format!("{}^{{tree}}", scan.base)]).map_err(host)?;
    if tree == base_tree {
        return Ok((scan.base.clone(), Vec::new()));
    }
    let commit = git(
        top,
        &[
            "commit-tree",
            &tree,
            "-p",
            &scan.base,
            "-m",
            "banger: the host's working tree when the workspace was prepared",
        ],
        &env,
    )
    .map_err(host)?;
    let commit = String::from_utf8_lossy(&commit).trim().to_owned();
    let mut files = Vec::new();
    collect(&objects, "objects/", &mut files)?;
    Ok((commit, files))
}

fn collect(dir: &Path, rel: &str, out: &mut Vec<(String, PathBuf)>) -> Result<(), WorkspaceError> {
    for e in std::fs::read_dir(dir).map_err(host)?.flatten() {
        let Some(name) = e.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        let meta = e.metadata().map_err(host)?;
        if meta.is_dir() {
            collect(&e.path(), &format!("{rel}{name}/"), out)?;
        } else {
            out.push((format!("{rel}{name}"), e.path()));
        }
    }
    Ok(())
}

/// Bytes written so far into the stream, and files done.
#[derive(Debug, Default)]
pub(super) struct Sent {
    pub bytes: AtomicU64,
    pub files: AtomicU64,
}

/// A `Write` whose chunks go to an async receiver (the guest's stdin).
struct ChunkWriter {
    tx: mpsc::Sender<Vec<u8>>,
    buf: Vec<u8>,
    sent: Arc<Sent>,
}

const CHUNK: usize = 256 << 10;

impl Write for ChunkWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK {
            self.flush()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        let n = chunk.len() as u64;
        self.tx.blocking_send(chunk).map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the guest stopped reading")
        })?;
        self.sent.bytes.fetch_add(n, Ordering::Relaxed);
        Ok(())
    }
}

/// Write the tar stream of `scan` (and the snapshot's `objects`) into
/// `tx`: the working tree at the top, the `.git` files under `.git/`.
pub(super) fn write_tar(
    scan: &Scan,
    objects: &[(String, PathBuf)],
    tx: mpsc::Sender<Vec<u8>>,
    sent: Arc<Sent>,
) -> std::io::Result<()> {
    let mut b = tar::Builder::new(ChunkWriter {
        tx,
        buf: Vec::with_capacity(CHUNK),
        sent: sent.clone(),
    });
    b.mode(tar::HeaderMode::Deterministic);
    b.follow_symlinks(false);
    for e in &scan.entries {
        let full = scan.top.join(&e.rel);
        match e.kind {
            Kind::File { .. } => {
                let mut f = std::fs::File::open(&full)?;
                let meta = f.metadata()?;
                let mut h = tar::Header::new_gnu();
                h.set_metadata_in_mode(&meta, tar::HeaderMode::Deterministic);
                // Deterministic mode keeps only the exec bit's meaning.
                h.set_mode(if meta.mode() & 0o111 != 0 {
                    0o755
                } else {
                    0o644
                });
                // A file that grows while being sent is cut at the size in
                // its header (a longer entry would corrupt the stream).
                b.append_data(&mut h, &e.rel, std::io::Read::take(&mut f, meta.len()))?;
            }
            Kind::Symlink => {
                let target = std::fs::read_link(&full)?;
                let mut h = tar::Header::new_gnu();
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_size(0);
                h.set_mode(0o777);
                b.append_link(&mut h, &e.rel, &target)?;
            }
            Kind::Dir => {
                let mut h = tar::Header::new_gnu();
                h.set_entry_type(tar::EntryType::Directory);
                h.set_size(0);
                h.set_mode(0o755);
                b.append_data(&mut h, &e.rel, std::io::empty())?;
            }
        }
        sent.files.fetch_add(1, Ordering::Relaxed);
    }
    for (rel, path) in scan.git_files.iter().chain(objects) {
        let mut f = std::fs::File::open(path)?;
        let meta = f.metadata()?;
        let mut h = tar::Header::new_gnu();
        h.set_metadata_in_mode(&meta, tar::HeaderMode::Deterministic);
        h.set_mode(0o644);
        b.append_data(
            &mut h,
            format!(".git/{rel}"),
            std::io::Read::take(&mut f, meta.len()),
        )?;
    }
    b.into_inner()?.flush()
}
