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
    /// `.git` directories (under `.git/`), so that empty ones exist too:
    /// git needs `refs/` even when every ref is packed.
    pub git_dirs: Vec<String>,
    pub git_bytes: u64,
    /// With `--depth`: the object directory of the shallow copy of the
    /// history that is sent instead of the repository's own.
    pub shallow_objects: Option<PathBuf>,
    /// The worktree's git directory and the repository's common one (they
    /// differ in a linked worktree).
    pub git_dir: PathBuf,
    pub common_dir: PathBuf,
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
    for (k, v) in env {
        cmd.env(k, v);
    }
    run_git(cmd, dir, args)
}

/// [`git`] for a command that writes into the user's repository, under
/// the user's `umask` (the daemon's own is 077).
pub(super) fn git_as_user(dir: &Path, umask: u32, args: &[&str]) -> Result<Vec<u8>, String> {
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg("umask \"$0\" && exec git \"$@\"")
        .arg(format!("{:03o}", umask & 0o777));
    run_git(cmd, dir, args)
}

/// `cmd` (git, or what execs it) with `-C dir args…`; its stdout, or
/// git's error.
fn run_git(mut cmd: Command, dir: &Path, args: &[&str]) -> Result<Vec<u8>, String> {
    cmd.arg("-C")
        .arg(dir)
        .args(args)
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("LC_ALL", "C");
    output(cmd, None).map_err(|e| format!("git {}: {e}", args.join(" ")))
}

/// Runs `cmd` (git) with `input` (or nothing) on its stdin: its stdout,
/// or what it said on stderr.
pub(super) fn output(mut cmd: Command, input: Option<&[u8]>) -> Result<Vec<u8>, String> {
    cmd.stdin(if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot run git: {e} (install git)"))?;
    // Written from a thread: git may answer before it has read it all.
    let feeder = input.map(|input| {
        let mut stdin = child.stdin.take().expect("piped");
        let input = input.to_vec();
        std::thread::spawn(move || stdin.write_all(&input))
    });
    let out = child
        .wait_with_output()
        .map_err(|e| format!("cannot run git: {e}"))?;
    if let Some(f) = feeder {
        let _ = f.join();
    }
    if out.status.success() {
        Ok(out.stdout)
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
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

/// List what prepare sends from the repository at `top`: with `depth`, the
/// last `depth` commits of history (fetched into a shallow repository in
/// `scratch`), else the whole `.git` directory.
pub(super) fn scan(
    top: &Path,
    include_ignored: bool,
    depth: Option<u32>,
    scratch: &Path,
) -> Result<Scan, WorkspaceError> {
    let base = git_line(top, &["rev-parse", "--verify", "-q", "HEAD"]).map_err(|_| {
        WorkspaceError::Invalid(format!(
            "the repository {} has no commit yet: commit once, then prepare",
            top.display()
        ))
    })?;
    let abs = |args: &[&str]| git_line(top, args).map(PathBuf::from).map_err(host);
    let git_dir = abs(&["rev-parse", "--absolute-git-dir"])?;
    let common = abs(&["rev-parse", "--path-format=absolute", "--git-common-dir"])?;
    let mut scan = Scan {
        top: top.to_owned(),
        base,
        entries: Vec::new(),
        files: 0,
        bytes: 0,
        git_files: Vec::new(),
        git_dirs: Vec::new(),
        git_bytes: 0,
        shallow_objects: None,
        git_dir: git_dir.clone(),
        common_dir: common.clone(),
    };
    list_tree(top, "", include_ignored, &mut scan)?;
    if let Some(depth) = depth {
        shallow_git_dir(&mut scan, &git_dir, &common, depth, scratch)?;
        return Ok(scan);
    }
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

/// The `.git` of a `--depth` prepare: the last `depth` commits fetched into
/// a bare repository in `scratch` (its objects and `shallow` file), the
/// repository's own HEAD, index, config, `info/` and submodules, the
/// current branch's ref, and any blob the index holds that the shallow
/// history lacks (staged changes), copied into the snapshot's objects.
fn shallow_git_dir(
    scan: &mut Scan,
    git_dir: &Path,
    common: &Path,
    depth: u32,
    scratch: &Path,
) -> Result<(), WorkspaceError> {
    if depth == 0 {
        return Err(WorkspaceError::Invalid(
            "--depth must be at least 1 (--no-history is --depth 1)".into(),
        ));
    }
    let shallow = scratch.join("shallow.git");
    git(scratch, &["init", "-q", "--bare", "shallow.git"], &[]).map_err(host)?;
    let source = format!("file://{}", common.display());
    git(
        &shallow,
        &[
            "fetch",
            "-q",
            "--no-tags",
            "--depth",
            &depth.to_string(),
            &source,
            &scan.base,
        ],
        &[],
    )
    .map_err(host)?;
    let add = |rel: &str, path: PathBuf, scan: &mut Scan| {
        if let Ok(m) = std::fs::metadata(&path) {
            scan.git_bytes += m.len();
            scan.git_files.push((rel.to_owned(), path));
        }
    };
    let mut objects = Vec::new();
    collect(&shallow.join("objects"), "objects/", &mut objects)?;
    for (rel, path) in objects {
        add(&rel, path, scan);
    }
    add("shallow", shallow.join("shallow"), scan);
    add("HEAD", git_dir.join("HEAD"), scan);
    add("index", git_dir.join("index"), scan);
    add("config", common.join("config"), scan);
    for dir in ["info", "modules"] {
        if common.join(dir).is_dir() {
            walk_git_dir(&common.join(dir), &format!("{dir}/"), false, scan)?;
        }
    }
    // The branch HEAD names, at the base commit (other refs would name
    // commits the shallow history lacks).
    if let Ok(branch) = git_line(&scan.top, &["symbolic-ref", "-q", "HEAD"]) {
        let file = scratch.join("branch-ref");
        std::fs::write(&file, format!("{}\n", scan.base)).map_err(host)?;
        add(&branch, file, scan);
    }
    // Staged blobs the shallow history lacks go with the snapshot's objects.
    let staged = git(&scan.top, &["ls-files", "-s", "-z"], &[]).map_err(host)?;
    let oids: Vec<String> = staged
        .split(|b| *b == 0)
        .filter_map(|e| {
            let e = std::str::from_utf8(e).ok()?;
            let mut f = e.split_whitespace();
            let (mode, oid) = (f.next()?, f.next()?);
            (mode != "160000").then(|| oid.to_owned())
        })
        .collect();
    let objects = scratch.join("objects");
    std::fs::create_dir_all(&objects).map_err(host)?;
    for oid in missing_objects(&shallow, &oids)? {
        let blob = git(&scan.top, &["cat-file", "blob", &oid], &[]).map_err(host)?;
        write_blob(&scan.top, &objects, &blob)?;
    }
    scan.shallow_objects = Some(shallow.join("objects"));
    Ok(())
}

/// Which of `oids` the repository at `dir` lacks.
fn missing_objects(dir: &Path, oids: &[String]) -> Result<Vec<String>, WorkspaceError> {
    use std::io::Write as _;
    let mut child = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["cat-file", "--batch-check"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(host)?;
    let mut input = child.stdin.take().ok_or_else(|| host("no stdin"))?;
    let list = oids.join("\n") + "\n";
    let writer = std::thread::spawn(move || input.write_all(list.as_bytes()));
    let out = child.wait_with_output().map_err(host)?;
    let _ = writer.join();
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_suffix(" missing").map(str::to_owned))
        .collect())
}

/// Write `blob` into the object directory `objects` (as a loose object).
fn write_blob(top: &Path, objects: &Path, blob: &[u8]) -> Result<(), WorkspaceError> {
    use std::io::Write as _;
    let mut child = Command::new("git")
        .arg("-C")
        .arg(top)
        .args(["hash-object", "-w", "--stdin"])
        .env("GIT_OBJECT_DIRECTORY", objects)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .map_err(host)?;
    child
        .stdin
        .take()
        .ok_or_else(|| host("no stdin"))?
        .write_all(blob)
        .map_err(host)?;
    let st = child.wait().map_err(host)?;
    if !st.success() {
        return Err(host("git hash-object -w failed"));
    }
    Ok(())
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
            scan.git_dirs.push(r.clone());
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
    let (git_dir, common) = (&scan.git_dir, &scan.common_dir);
    let objects = scratch.join("objects");
    std::fs::create_dir_all(&objects).map_err(host)?;
    let index = scratch.join("index");
    // With a shallow history, objects are looked up there only, and a
    // fresh index makes git hash every file: whatever the shallow history
    // lacks lands in `objects` and is sent.
    let alternates = match &scan.shallow_objects {
        Some(shallow) => shallow.clone(),
        None => {
            if git_dir.join("index").exists() {
                std::fs::copy(git_dir.join("index"), &index).map_err(host)?;
            }
            common.join("objects")
        }
    };
    let env: [(&str, &OsStr); 7] = [
        ("GIT_INDEX_FILE", index.as_os_str()),
        ("GIT_OBJECT_DIRECTORY", objects.as_os_str()),
        ("GIT_ALTERNATE_OBJECT_DIRECTORIES", alternates.as_os_str()),
        ("GIT_AUTHOR_NAME", OsStr::new("banger")),
        ("GIT_AUTHOR_EMAIL", OsStr::new("banger@localhost")),
        ("GIT_COMMITTER_NAME", OsStr::new("banger")),
        ("GIT_COMMITTER_EMAIL", OsStr::new("banger@localhost")),
    ];
    if scan.shallow_objects.is_some() {
        git(top, &["read-tree", &scan.base], &env).map_err(host)?;
    }
    git(top, &["add", "-A"], &env).map_err(host)?;
    let tree = String::from_utf8_lossy(&git(top, &["write-tree"], &env).map_err(host)?)
        .trim()
        .to_owned();
    let base_tree =
        git_line(top, &["rev-parse", &format!("{}^{{tree}}", scan.base)]).map_err(host)?;
    let commit = if tree == base_tree {
        scan.base.clone()
    } else {
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
        String::from_utf8_lossy(&commit).trim().to_owned()
    };
    // Also staged blobs a shallow history lacks, put there by the scan.
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

/// Where banger's two refs of a workspace live: its base (the host's HEAD
/// at prepare) and what prepare sent (that plus the host's dirty state).
const BANGER_REFS: &str = ".git/refs/banger";

/// The stream's last entry, the `prepared` ref: the guest swaps the new
/// copy in only when it is there.
pub(super) const STREAM_END: &str = ".git/refs/banger/prepared";

/// Write the tar stream of `scan` (and the snapshot's `objects`) into
/// `tx`: the working tree at the top, the `.git` files under `.git/`, and
/// last banger's refs of `scan.base` and `prepared` as loose ref files (what
/// `git update-ref` would write, without two git processes in the guest).
pub(super) fn write_tar(
    scan: &Scan,
    prepared: &str,
    objects: &[(String, PathBuf)],
    tx: mpsc::Sender<Vec<u8>>,
    sent: Arc<Sent>,
) -> std::io::Result<()> {
    let mut b = tar::Builder::new(ChunkWriter {
        tx,
        buf: Vec::with_capacity(CHUNK),
        sent: sent.clone(),
    });
    // Modification times are kept (tar -x restores them): with them git in
    // the guest trusts the copied index by size and mtime instead of
    // hashing every file again (see prepare's UNPACK).
    b.mode(tar::HeaderMode::Complete);
    b.follow_symlinks(false);
    for e in &scan.entries {
        let full = scan.top.join(&e.rel);
        match e.kind {
            Kind::File { .. } => {
                let mut f = std::fs::File::open(&full)?;
                let meta = f.metadata()?;
                let mut h = tar::Header::new_gnu();
                h.set_metadata_in_mode(&meta, tar::HeaderMode::Complete);
                // Only the exec bit means anything to git.
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
    // Directories first (parents before children: the walk's order).
    for rel in std::iter::once("refs").chain(scan.git_dirs.iter().map(String::as_str)) {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_size(0);
        h.set_mode(0o755);
        b.append_data(&mut h, format!(".git/{rel}"), std::io::empty())?;
    }
    // The host's own refs/banger (a repository that was itself a
    // workspace) would stand for the end mark of a stream cut short.
    let banger_refs = BANGER_REFS.trim_start_matches(".git/");
    for (rel, path) in scan
        .git_files
        .iter()
        .chain(objects)
        .filter(|(rel, _)| !rel.starts_with(banger_refs))
    {
        let mut f = std::fs::File::open(path)?;
        let meta = f.metadata()?;
        let mut h = tar::Header::new_gnu();
        h.set_metadata_in_mode(&meta, tar::HeaderMode::Complete);
        h.set_mode(0o644);
        b.append_data(
            &mut h,
            format!(".git/{rel}"),
            std::io::Read::take(&mut f, meta.len()),
        )?;
    }
    // Last, the refs, `prepared` the very last: the mark that the stream
    // is whole. A stream cut short can still end between two entries,
    // which tar takes for a whole archive.
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Directory);
    h.set_size(0);
    h.set_mode(0o755);
    b.append_data(&mut h, BANGER_REFS, std::io::empty())?;
    for (path, commit) in [
        (format!("{BANGER_REFS}/base"), scan.base.as_str()),
        (STREAM_END.to_owned(), prepared),
    ] {
        let line = format!("{commit}\n");
        let mut h = tar::Header::new_gnu();
        h.set_size(line.len() as u64);
        h.set_mode(0o644);
        b.append_data(&mut h, path, line.as_bytes())?;
    }
    b.into_inner()?.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(dir: &Path, script: &str) -> String {
        let out = Command::new("sh")
            .args(["-c", script])
            .current_dir(dir)
            .env("GIT_AUTHOR_NAME", "t")
            .env("GIT_AUTHOR_EMAIL", "t@t")
            .env("GIT_COMMITTER_NAME", "t")
            .env("GIT_COMMITTER_EMAIL", "t@t")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{script}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The stream prepare would send (snapshot included), with its scan
    /// and `prepared` commit.
    fn stream(top: &Path, depth: Option<u32>) -> (Scan, String, Vec<u8>) {
        let scratch = tempfile::tempdir().unwrap();
        let scan = scan(top, false, depth, scratch.path()).unwrap();
        let (prepared, objects) = snapshot(&scan, scratch.path()).unwrap();
        let (tx, mut rx) = mpsc::channel(4);
        let sent = Arc::new(Sent::default());
        let bytes = std::thread::scope(|s| {
            let w = s.spawn(|| write_tar(&scan, &prepared, &objects, tx, sent.clone()));
            let mut all = Vec::new();
            while let Some(chunk) = rx.blocking_recv() {
                all.extend(chunk);
            }
            w.join().unwrap().unwrap();
            all
        });
        (scan, prepared, bytes)
    }

    /// What prepare would send, unpacked into `into` (snapshot included).
    fn send(top: &Path, depth: Option<u32>, into: &Path) -> (Scan, String) {
        let (scan, prepared, bytes) = stream(top, depth);
        tar::Archive::new(&bytes[..]).unpack(into).unwrap();
        assert!(
            into.join(STREAM_END).exists(),
            "a whole stream ends with its mark"
        );
        (scan, prepared)
    }

    /// The guest's side of prepare, the real script run here by `sh` over
    /// `stream` into `dest`, as root's guest git would: no identity unless
    /// `home` has a `.gitconfig`. Its exit code and stderr.
    fn unpack(stream: &[u8], dest: &Path, home: &Path, user: &str) -> (i32, String) {
        use std::io::Write;
        let list = home.join("workspaces");
        let mut child = Command::new("sh")
            .args(["-c", super::super::prepare::UNPACK, "sh"])
            .arg(dest)
            .env("HOME", home)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env_remove("GIT_CONFIG_GLOBAL")
            .env("BANGER_WORKSPACE_LIST", &list)
            .env("BANGER_GIT_USER", user)
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // A stream cut short: the guest's tar may stop reading early.
        let _ = child.stdin.take().unwrap().write_all(stream);
        let out = child.wait_with_output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    #[test]
    fn the_guest_swaps_in_a_whole_stream_with_its_refs_settings_and_identity() {
        let t = tempfile::tempdir().unwrap();
        let repo = t.path().join("r");
        std::fs::create_dir_all(&repo).unwrap();
        // A repository that was itself a workspace has banger's refs of its
        // own: they are not sent, or they would pass for the end mark of a
        // stream cut short (checked last).
        sh(
            &repo,
            "git init -q && echo a > a && git add a && git commit -qm a && echo dirty > a && \
             git update-ref refs/banger/base HEAD && git update-ref refs/banger/prepared HEAD",
        );
        let (scan, prepared, bytes) = stream(&repo, None);
        let home = t.path().join("home");
        std::fs::create_dir_all(&home).unwrap();
        let dest = t.path().join("ws/r");
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        let user = super::super::prepare::user_section("A \"quoted\" \\ name", "a@host");
        let git = |args: &[&str]| {
            let out = Command::new("git")
                .arg("-C")
                .arg(&dest)
                .args(args)
                .env("HOME", &home)
                .env("GIT_CONFIG_NOSYSTEM", "1")
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).trim().to_owned()
        };
        assert_eq!(unpack(&bytes, &dest, &home, &user), (0, String::new()));
        assert_eq!(git(&["rev-parse", "refs/banger/base"]), scan.base);
        assert_eq!(git(&["rev-parse", "refs/banger/prepared"]), prepared);
        assert_eq!(git(&["config", "core.checkStat"]), "minimal");
        assert_eq!(git(&["config", "core.trustctime"]), "false");
        assert_eq!(git(&["config", "user.name"]), "A \"quoted\" \\ name");
        assert_eq!(git(&["config", "user.email"]), "a@host");
        assert_eq!(std::fs::read_to_string(dest.join("a")).unwrap(), "dirty\n");
        // The copied index is trusted: the dirty file is all git sees.
        assert_eq!(git(&["status", "--porcelain"]), "M a");
        let listed = || std::fs::read_to_string(home.join("workspaces")).unwrap();
        assert_eq!(listed(), format!("{}\n", dest.display()));

        // Again, over the first copy, by a guest whose git has an identity
        // of its own: that one stays, the list names the workspace once.
        std::fs::write(dest.join("scratch"), "guest work").unwrap();
        std::fs::write(
            home.join(".gitconfig"),
            "[user]\n\tname = guest\n\temail = g@guest\n",
        )
        .unwrap();
        assert_eq!(unpack(&bytes, &dest, &home, &user), (0, String::new()));
        assert!(!dest.join("scratch").exists(), "the old copy is replaced");
        assert_eq!(git(&["config", "user.name"]), "guest");
        assert_eq!(listed(), format!("{}\n", dest.display()));

        // Cut short before its end mark: refused, the copy there untouched,
        // nothing left beside it.
        std::fs::write(dest.join("scratch"), "guest work").unwrap();
        let (code, err) = unpack(&bytes[..bytes.len() - 2048], &dest, &home, &user);
        assert_eq!(code, 4, "{err}");
        assert!(err.contains("cut short"), "{err}");
        assert!(dest.join("scratch").exists());
        let beside: Vec<_> = std::fs::read_dir(dest.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(beside, ["r"]);
    }

    #[test]
    fn a_stream_cut_short_has_no_end_mark() {
        let t = tempfile::tempdir().unwrap();
        let repo = t.path().join("r");
        std::fs::create_dir_all(&repo).unwrap();
        sh(
            &repo,
            "git init -q && echo a > a && git add a && git commit -qm a",
        );
        let scan = scan(&repo, false, None, t.path()).unwrap();
        // A file of the scan goes away before it is sent (git gc).
        std::fs::remove_file(repo.join(".git/index")).unwrap();
        let (tx, mut rx) = mpsc::channel(4);
        let bytes = std::thread::scope(|s| {
            let w = s.spawn(|| write_tar(&scan, &scan.base, &[], tx, Arc::new(Sent::default())));
            let mut all = Vec::new();
            while let Some(chunk) = rx.blocking_recv() {
                all.extend(chunk);
            }
            assert!(w.join().unwrap().is_err());
            all
        });
        let into = t.path().join("into");
        // What was sent unpacks (it may end between two entries), but
        // without the mark the guest refuses to swap it in.
        let _ = tar::Archive::new(&bytes[..]).unpack(&into);
        assert!(!into.join(STREAM_END).exists());
    }

    #[test]
    fn a_shallow_prepare_has_one_commit_and_the_same_dirty_state() {
        let t = tempfile::tempdir().unwrap();
        let repo = t.path().join("r");
        std::fs::create_dir_all(&repo).unwrap();
        sh(
            &repo,
            "git init -q -b main && for i in 1 2 3; do echo $i > f; git add f; git commit -qm c$i; done && \
             echo staged > s && git add s && echo later > s && echo dirty > f && echo new > u",
        );
        let full = t.path().join("full");
        let (full_scan, _) = send(&repo, None, &full);
        let shallow = t.path().join("shallow");
        let (scan, prepared) = send(&repo, Some(1), &shallow);
        assert!(scan.git_bytes < full_scan.git_bytes || full_scan.git_bytes < 200_000);
        assert_eq!(sh(&shallow, "git rev-list --count HEAD").trim(), "1");
        assert_eq!(
            sh(&shallow, "git symbolic-ref HEAD").trim(),
            "refs/heads/main"
        );
        // The staged blob came along: staged and unstaged as on the host.
        assert_eq!(
            sh(&shallow, "git status --porcelain"),
            sh(&repo, "git status --porcelain")
        );
        assert_eq!(sh(&shallow, "git show :s"), "staged\n");
        sh(&shallow, "git fsck --no-dangling --connectivity-only");
        // The snapshot commit is there, on top of the base.
        assert_eq!(
            sh(&shallow, &format!("git rev-parse {prepared}^")).trim(),
            scan.base
        );
        assert_eq!(sh(&shallow, &format!("git show {prepared}:u")), "new\n");
        assert_eq!(sh(&full, "git rev-list --count HEAD").trim(), "3");
    }

    /// After `git gc` every ref is packed and `refs/` holds only empty
    /// directories, which git still needs to see a repository.
    #[test]
    fn a_repository_with_packed_refs_arrives_as_one() {
        let t = tempfile::tempdir().unwrap();
        let repo = t.path().join("r");
        std::fs::create_dir_all(&repo).unwrap();
        sh(
            &repo,
            "git init -q -b main && echo 1 > f && git add f && git commit -qm c && git gc -q",
        );
        assert!(
            std::fs::read_dir(repo.join(".git/refs/heads"))
                .unwrap()
                .next()
                .is_none()
        );
        let into = t.path().join("into");
        send(&repo, None, &into);
        assert_eq!(
            sh(&into, "git rev-parse HEAD"),
            sh(&repo, "git rev-parse HEAD")
        );
    }
}
