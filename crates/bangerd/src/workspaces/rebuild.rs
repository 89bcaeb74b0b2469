//! `workspace export`, made on the host: the guest only lists what
//! changed and sends those files (and a bundle of the commits the host
//! lacks: its own for a branch, prepare's snapshot of the host's dirty
//! tree for `--apply`); the host's git, which has the base commit, hashes
//! them, writes the guest's tree, and diffs it (a patch, or the changes
//! since prepare to apply) or commits it on top of the guest's HEAD (a
//! branch). A guest without KVM hashes (SHA-1DC), inflates, compresses
//! and diffs tens of times slower than the host: for 1,000 changed files
//! of a 50,000-file repository its own `git diff` took 2.2-3.0 s of the
//! patch export's ~4 s, and its `git add -A` and bundle 4.3 s of the
//! branch export's 5.2 s.
//!
//! Nothing is written into the host's repository but the branch's
//! fetch: new objects go to a scratch object directory that borrows the
//! repository's. The host's git runs with the repository's own
//! configuration only (not the user's global one), as the guest's git
//! did.

use std::collections::{BTreeMap, HashSet};
use std::ffi::OsStr;
use std::io::{BufRead, Read};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::WorkspaceError;
use super::repo;

/// The start of the guest's half, after the export prelude and `$over`
/// (the commit the changes are listed from): a line, `banger-changes
/// OVER BASE DIR`, so that the host looks up the repository and checks
/// it has the base while the guest works.
const START: &str = r#"export LC_ALL=C
printf 'banger-changes %s %s %s\n' "$over" "$base" "$dir"
raw=.git/banger-scratch.raw untracked=.git/banger-scratch.untracked links=.git/banger-scratch.links
: >"$links"
"#;

/// The listings: `git diff-index` from `$over` (covering the guest's
/// commits since, its index and its working tree, with a file whose stat
/// changed listed unhashed); the untracked files that are not ignored,
/// listed at the same time on the guest's second vCPU; each changed
/// submodule's checked-out commit.
const LIST: &str = r#"git ls-files -z --others --exclude-standard >"$untracked" &
list=$!
git diff-index -z --raw --no-abbrev --no-renames --ignore-submodules=dirty "$over" >"$raw"
wait $list
[ ! -f .gitmodules ] || sed -z -n '/^:[0-7]* 160000 /{n;p}' "$raw" |
	xargs -0 -r -n1 sh -c 'printf "%s %s\0" "$(git -C "$1" rev-parse -q --verify HEAD || true)" "$1"' sh >"$links"
"#;

/// The tar: the scratch files the host reads first (the listings, then
/// `{extra}`), then every file the listings name that exists. tar reads
/// the names straight from the listings, skipping the raw listing's
/// other fields as names of files that do not exist (a file named so
/// would be sent, and left out by the host), which saves the guest a
/// process. Exit 6: tar failed with something to say, as busybox's does
/// (it cannot read NUL-separated names): the guest then does the work.
fn send(extra: &str) -> String {
    format!(
        r#"st=0
tar -c -f - --no-recursion --hard-dereference --ignore-failed-read \
	--warning=no-failed-read --warning=no-file-changed --null --verbatim-files-from \
	"$raw" "$untracked" "$links" {extra} -T "$raw" -T "$untracked" 2>"$scratch.tar" || st=$?
[ "$st" = 0 ] || {{ [ "$st" = 1 ] && [ ! -s "$scratch.tar" ]; }} || {{ cat "$scratch.tar" >&2; exit 6; }}
"#
    )
}

/// The guest's half of a patch: its changes since the base.
pub(super) fn patch_script() -> String {
    format!("over=$base\n{START}{LIST}tip=$head\n{}", send(""))
}

/// The guest's half of a branch: its changes since its HEAD (unless
/// `BANGER_COMMITTED_ONLY=1`), the identity its git commits with (both
/// at once with the listing), and a bundle of its commits since the
/// base.
pub(super) fn branch_script() -> String {
    format!(
        r#"over=$head
{START}ident=.git/banger-scratch.ident bundle=.git/banger-scratch.bundle
: >"$ident"
: >"$bundle"
if [ "${{BANGER_COMMITTED_ONLY:-0}}" = 1 ]; then
	: >"$raw"
	: >"$untracked"
else
	{{ git var GIT_AUTHOR_IDENT && git var GIT_COMMITTER_IDENT; }} >"$ident" 2>/dev/null &
	who=$!
{LIST}	wait $who || :
fi
[ "$head" = "$base" ] || git bundle create --quiet "$bundle" HEAD "^$base"
tip=$head
{}"#,
        send(r#""$ident" "$bundle""#)
    )
}

/// The guest's half of `--apply`: its changes since prepare's snapshot
/// (`$prepared`), which, when it is not the base (the host's tree was
/// dirty), comes in a bundle.
pub(super) fn apply_script() -> String {
    format!(
        r#"over=$prepared
{START}bundle=.git/banger-scratch.bundle
: >"$bundle"
{LIST}[ "$prepared" = "$base" ] || git bundle create --quiet "$bundle" refs/banger/prepared "^$base"
tip=$head
{}"#,
        send(r#""$bundle""#)
    )
}

/// The scripts' exit when tar failed (or is not GNU tar).
pub(super) const TAR_FAILED: i32 = 6;

/// Most bytes of one listing: a million changed paths of 100 bytes.
const LISTING_CAP: u64 = 256 << 20;

/// The scratch files the tar starts with: the listings, then (a branch)
/// the identity and (a branch, `--apply`) the bundle.
const RAW: &str = ".git/banger-scratch.raw";
const UNTRACKED: &str = ".git/banger-scratch.untracked";
const LINKS: &str = ".git/banger-scratch.links";
const IDENT: &str = ".git/banger-scratch.ident";
const BUNDLE: &str = ".git/banger-scratch.bundle";

/// What happens to one path of the host's copy of the base tree.
#[derive(Debug, Default, PartialEq, Eq)]
struct Change {
    /// Out of the guest's tree unless it was sent as untracked: deleted
    /// (from the index or the working tree).
    deleted: bool,
    /// Untracked and not ignored: it counts as added.
    untracked: bool,
    /// A submodule: the commit it holds.
    link: Option<String>,
}

/// Reads the guest's listings into what changes per path.
fn changes(raw: &[u8], untracked: &[u8], links: &[u8]) -> BTreeMap<Vec<u8>, Change> {
    let heads: BTreeMap<&[u8], &[u8]> = links
        .split(|b| *b == 0)
        .filter_map(|r| {
            let sp = r.iter().position(|b| *b == b' ')?;
            Some((&r[sp + 1..], &r[..sp]))
        })
        .collect();
    let mut out: BTreeMap<Vec<u8>, Change> = BTreeMap::new();
    // `:srcmode dstmode srcsha dstsha STATUS NUL path NUL`.
    let mut it = raw.split(|b| *b == 0);
    while let (Some(meta), Some(path)) = (it.next(), it.next()) {
        if path.is_empty() {
            continue;
        }
        let f: Vec<&[u8]> = meta.split(|b| *b == b' ').collect();
        let c = out.entry(path.to_vec()).or_default();
        c.deleted = f.get(4).is_some_and(|s| s.first() == Some(&b'D'));
        if !c.deleted && f.get(1) == Some(&&b"160000"[..]) {
            let head = heads.get(path).copied().filter(|h| !h.is_empty());
            // Unknown (a submodule whose HEAD cannot be read): the commit
            // the guest's index records.
            let commit = head.or(f.get(3).copied().filter(|h| h.iter().any(|b| *b != b'0')));
            c.link = commit.map(|h| String::from_utf8_lossy(h).into_owned());
        }
    }
    for path in untracked.split(|b| *b == 0).filter(|p| !p.is_empty()) {
        out.entry(path.to_vec()).or_default().untracked = true;
    }
    out
}

/// Git in a scratch index and object directory over the host repository
/// `top`, with `work` as the working tree.
struct Scratch {
    top: PathBuf,
    work: PathBuf,
    env: Vec<(&'static str, std::ffi::OsString)>,
}

impl Scratch {
    /// `Err(why)`: git cannot read `top` as a repository (it is gone, or
    /// the host's git predates `--path-format`, 2.31).
    fn new(top: &Path, dir: &Path) -> Result<Result<Scratch, String>, WorkspaceError> {
        let line = |args: &[&str]| -> Result<std::ffi::OsString, String> {
            let out = repo::git(top, args, &[])?;
            let s = out.strip_suffix(b"\n").unwrap_or(&out);
            Ok(OsStr::from_bytes(s).to_owned())
        };
        let dirs = line(&["rev-parse", "--absolute-git-dir"]).and_then(|git_dir| {
            line(&["rev-parse", "--path-format=absolute", "--git-common-dir"])
                .map(|common| (git_dir, common))
        });
        let (git_dir, common) = match dirs {
            Ok(dirs) => dirs,
            Err(e) => return Ok(Err(e)),
        };
        let work = dir.join("work");
        let objects = dir.join("objects");
        for d in [&work, &objects] {
            std::fs::create_dir_all(d)
                .map_err(|e| WorkspaceError::Host(format!("cannot make {}: {e}", d.display())))?;
        }
        let env = vec![
            ("GIT_DIR", git_dir),
            ("GIT_WORK_TREE", work.clone().into_os_string()),
            ("GIT_INDEX_FILE", dir.join("index").into_os_string()),
            ("GIT_OBJECT_DIRECTORY", objects.into_os_string()),
            (
                "GIT_ALTERNATE_OBJECT_DIRECTORIES",
                PathBuf::from(common).join("objects").into_os_string(),
            ),
            // The repository's configuration, as the guest has it; not
            // the user's (a `color.diff=always` would spoil the patch).
            ("GIT_CONFIG_NOSYSTEM", "1".into()),
            ("GIT_CONFIG_GLOBAL", "/dev/null".into()),
        ];
        Ok(Ok(Scratch {
            top: top.to_owned(),
            work,
            env,
        }))
    }

    /// git in the scratch working tree, with a plain index whatever the
    /// repository says: no file system monitor, and neither a split index
    /// (its shared part would be written into the repository's git
    /// directory) nor a sparse one.
    fn cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("git");
        for setting in [
            "core.fsmonitor=false",
            "core.untrackedCache=false",
            "core.splitIndex=false",
            "index.sparse=false",
            "core.sparseCheckout=false",
        ] {
            cmd.args(["-c", setting]);
        }
        cmd.args(args)
            .current_dir(&self.work)
            .env("LC_ALL", "C")
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd
    }

    fn git(&self, args: &[&str], input: Option<&[u8]>) -> Result<Vec<u8>, WorkspaceError> {
        repo::output(self.cmd(args), input).map_err(|e| {
            WorkspaceError::Host(format!(
                "git {} (rebuilding the guest's tree over {}): {e}",
                args.join(" "),
                self.top.display()
            ))
        })
    }
}

/// The guest's output as it arrives, chunk by chunk.
pub(super) struct Chunks {
    rx: std::sync::mpsc::Receiver<Vec<u8>>,
    chunk: Vec<u8>,
    at: usize,
}

impl Chunks {
    pub(super) fn new(rx: std::sync::mpsc::Receiver<Vec<u8>>) -> Chunks {
        Chunks {
            rx,
            chunk: Vec::new(),
            at: 0,
        }
    }
}

impl Read for Chunks {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.at == self.chunk.len() {
            match self.rx.recv() {
                Ok(c) => (self.chunk, self.at) = (c, 0),
                // The sender is gone: the output is complete.
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.chunk.len() - self.at);
        buf[..n].copy_from_slice(&self.chunk[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// What the host makes.
#[derive(Debug)]
pub(super) enum Want {
    /// From the base commit to the guest's tree ([`patch_script`]).
    Patch,
    /// The guest's commits, and (unless `committed_only`) a commit of the
    /// rest on top ([`branch_script`]).
    Branch {
        committed_only: bool,
        message: String,
    },
    /// The changes since prepare's snapshot, to apply to the host's tree
    /// ([`apply_script`]).
    Apply,
}

/// What [`rebuild`] made.
#[derive(Debug)]
pub(super) enum Rebuilt {
    Patch {
        /// The host repository.
        top: PathBuf,
        /// The patch, in the scratch directory.
        patch: PathBuf,
    },
    Branch {
        top: PathBuf,
        /// A repository in the scratch directory whose
        /// `refs/banger/export` is `tip`, to fetch from.
        repo: PathBuf,
        tip: String,
    },
    Apply {
        top: PathBuf,
        /// `raw_bytes` of `git diff --raw -z` from the snapshot, then the
        /// patch from it, as the guest's script writes them.
        changes: PathBuf,
        raw_bytes: u64,
    },
    /// The host cannot make it (why): the guest must.
    InGuest(String),
}

fn guest_err(what: impl std::fmt::Display) -> WorkspaceError {
    WorkspaceError::Guest(format!("the guest's changes: {what}"))
}

fn is_commit_id(s: &str) -> bool {
    s.len() >= 40 && s.bytes().all(|c| c.is_ascii_hexdigit())
}

/// What `want` asks, made from `input` (what the script for it writes,
/// read as it arrives) in the scratch directory `dir`. `repo` names the
/// host repository of the guest's workspace. Each file is hashed as it
/// arrives.
pub(super) fn rebuild(
    input: impl Read,
    repo: impl FnOnce(&str) -> Result<PathBuf, WorkspaceError>,
    dir: &Path,
    want: &Want,
) -> Result<Rebuilt, WorkspaceError> {
    let mut r = std::io::BufReader::with_capacity(1 << 20, input);
    let mut line = Vec::new();
    r.by_ref()
        .take(4096)
        .read_until(b'\n', &mut line)
        .map_err(guest_err)?;
    let line = String::from_utf8_lossy(&line);
    let mut fields = line
        .strip_prefix("banger-changes ")
        .and_then(|l| l.strip_suffix('\n'))
        .map(|l| l.splitn(3, ' '));
    let mut next = || fields.as_mut().and_then(Iterator::next);
    let (Some(over), Some(base), Some(dest)) = (next(), next(), next()) else {
        return Err(guest_err(format!("unexpected start {line:?}")));
    };
    if !is_commit_id(over) || !is_commit_id(base) {
        return Err(guest_err(format!("unexpected start {line:?}")));
    }
    let top = repo(dest)?;
    let s = match Scratch::new(&top, dir)? {
        Ok(s) => s,
        Err(e) => {
            return Ok(Rebuilt::InGuest(format!(
                "git cannot read {} now: {e}",
                top.display()
            )));
        }
    };
    if s.git(&["cat-file", "-e", &format!("{base}^{{tree}}")], None)
        .is_err()
    {
        return Ok(Rebuilt::InGuest(format!(
            "{} lacks the base commit {base}",
            top.display()
        )));
    }
    if over == base {
        // While the guest lists its changes.
        s.git(&["read-tree", over], None)?;
    }

    let mut archive = tar::Archive::new(r);
    let mut entries = archive.entries().map_err(guest_err)?;
    let names: &[&str] = match want {
        Want::Patch => &[RAW, UNTRACKED, LINKS],
        Want::Branch { .. } => &[RAW, UNTRACKED, LINKS, IDENT, BUNDLE],
        Want::Apply => &[RAW, UNTRACKED, LINKS, BUNDLE],
    };
    let mut listings = Vec::new();
    let bundle = dir.join("guest.bundle");
    for name in names {
        let mut e = entries
            .next()
            .ok_or_else(|| guest_err("cut short"))?
            .map_err(guest_err)?;
        if *e.path_bytes() != *name.as_bytes() {
            return Err(guest_err(format!(
                "{:?} where {name} belongs",
                String::from_utf8_lossy(&e.path_bytes())
            )));
        }
        if *name == BUNDLE {
            let mut f = std::fs::File::create(&bundle).map_err(|e| {
                WorkspaceError::Host(format!("cannot create {}: {e}", bundle.display()))
            })?;
            std::io::copy(&mut e, &mut f).map_err(guest_err)?;
            continue;
        }
        // Held in memory: a guest cannot make the daemon hold more.
        let mut v = Vec::new();
        e.by_ref()
            .take(LISTING_CAP + 1)
            .read_to_end(&mut v)
            .map_err(guest_err)?;
        if v.len() as u64 > LISTING_CAP {
            return Err(guest_err(format!(
                "{name} is over {} MiB",
                LISTING_CAP >> 20
            )));
        }
        listings.push(v);
    }
    let changes = changes(&listings[0], &listings[1], &listings[2]);
    if over != base {
        // The commits the host lacks, which the guest's bundle holds.
        let has_commits = std::fs::metadata(&bundle).is_ok_and(|m| m.len() > 0);
        if has_commits {
            let path = bundle.to_string_lossy();
            s.git(&["bundle", "unbundle", &path], None)?;
        }
        s.git(&["read-tree", over], None)?;
    }

    // New objects are stored uncompressed: they are thrown away. (Not
    // for the diff: the same setting deflates its binary hunks.)
    fn updates<'a>(args: &[&'a str]) -> Vec<&'a str> {
        let mut all = vec!["-c", "core.looseCompression=0", "update-index", "-z"];
        all.extend_from_slice(args);
        all
    }
    let err_file = dir.join("update-index.err");
    let mut adder = s
        .cmd(&updates(&["--add", "--replace", "--stdin"]))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err_file).map_err(|e| {
            WorkspaceError::Host(format!("cannot create {}: {e}", err_file.display()))
        })?)
        .spawn()
        .map_err(|e| WorkspaceError::Host(format!("cannot run git: {e}")))?;
    // Unbuffered: git hashes each file as soon as it is named, while the
    // guest still sends (names held back in a buffer were hashed after
    // the stream ended, ~0.3 s for 1,000 files here).
    let names = adder.stdin.take().expect("piped");
    let fed = feed(entries, &changes, &s.work, names);
    // Waited for even when the stream broke: its input is closed.
    let status = adder
        .wait()
        .map_err(|e| WorkspaceError::Host(format!("git update-index: {e}")))?;
    if !status.success() {
        return Err(WorkspaceError::Host(format!(
            "git update-index (the guest's files over {}): {}",
            top.display(),
            std::fs::read_to_string(&err_file)
                .unwrap_or_default()
                .trim()
        )));
    }
    let added = fed?;
    let (mut remove, mut gitlinks) = (Vec::new(), Vec::new());
    let nul = |v: &mut Vec<u8>, p: &[u8]| {
        v.extend_from_slice(p);
        v.push(0);
    };
    for (path, c) in &changes {
        match &c.link {
            Some(commit) => {
                gitlinks.extend_from_slice(format!("160000 {commit}\t").as_bytes());
                nul(&mut gitlinks, path);
            }
            None if !added.contains(path) => nul(&mut remove, path),
            None => {}
        }
    }
    if !remove.is_empty() {
        s.git(&updates(&["--force-remove", "--stdin"]), Some(&remove))?;
    }
    if !gitlinks.is_empty() {
        s.git(
            &updates(&["--add", "--replace", "--index-info"]),
            Some(&gitlinks),
        )?;
    }
    let tree = s.git(&["write-tree"], None)?;
    let tree = String::from_utf8_lossy(&tree).trim().to_owned();
    match want {
        Want::Patch => {
            let patch = dir.join("patch");
            write_patch(&s, base, &tree, &patch, &["-M"], false)?;
            Ok(Rebuilt::Patch { top, patch })
        }
        Want::Branch {
            committed_only,
            message,
        } => {
            let over_tree = s.git(&["rev-parse", &format!("{over}^{{tree}}")], None)?;
            let tip = if *committed_only || String::from_utf8_lossy(&over_tree).trim() == tree {
                over.to_owned()
            } else {
                commit(&s, &tree, over, &listings[3], message)?
            };
            let repo = fetchable(&s, dir, &tip)?;
            Ok(Rebuilt::Branch { top, repo, tip })
        }
        Want::Apply => {
            let changes = dir.join("changes");
            let raw = s.git(
                &[
                    "diff",
                    "--raw",
                    "-z",
                    "--no-abbrev",
                    "--no-renames",
                    over,
                    &tree,
                ],
                None,
            )?;
            std::fs::write(&changes, &raw).map_err(|e| {
                WorkspaceError::Host(format!("cannot write {}: {e}", changes.display()))
            })?;
            write_patch(&s, over, &tree, &changes, &["--no-renames"], true)?;
            Ok(Rebuilt::Apply {
                top,
                changes,
                raw_bytes: raw.len() as u64,
            })
        }
    }
}

/// A commit of `tree` on top of `parent`, by the identity the guest's
/// git commits with (`ident`: `git var`'s author and committer lines), as
/// the guest's `git commit-tree` would have made it.
fn commit(
    s: &Scratch,
    tree: &str,
    parent: &str,
    ident: &[u8],
    message: &str,
) -> Result<String, WorkspaceError> {
    let ident = String::from_utf8_lossy(ident);
    let mut lines = ident.lines();
    let (Some(author), Some(committer)) = (
        lines.next().and_then(parse_ident),
        lines.next().and_then(parse_ident),
    ) else {
        return Err(WorkspaceError::Invalid(
            "the guest's git has no identity to commit its uncommitted changes with: set one in the guest (git config --global user.name ...; user.email ...), or export with --committed-only".into(),
        ));
    };
    let mut cmd = s.cmd(&[
        "commit-tree",
        "--no-gpg-sign",
        tree,
        "-p",
        parent,
        "-m",
        message,
    ]);
    for (who, (name, email, date)) in [("AUTHOR", author), ("COMMITTER", committer)] {
        cmd.env(format!("GIT_{who}_NAME"), name)
            .env(format!("GIT_{who}_EMAIL"), email)
            .env(format!("GIT_{who}_DATE"), date);
    }
    let out = repo::output(cmd, None)
        .map_err(|e| WorkspaceError::Host(format!("git commit-tree (the guest's changes): {e}")))?;
    Ok(String::from_utf8_lossy(&out).trim().to_owned())
}

/// `Name <email> 1733461234 +0000` as name, email and a date git reads.
fn parse_ident(line: &str) -> Option<(&str, &str, String)> {
    let (who, date) = line.rsplit_once("> ")?;
    let (name, email) = who.rsplit_once(" <")?;
    let (secs, zone) = date.split_once(' ')?;
    let ok = secs.bytes().all(|b| b.is_ascii_digit())
        && zone.len() == 5
        && zone.starts_with(['+', '-'])
        && zone[1..].bytes().all(|b| b.is_ascii_digit());
    ok.then(|| (name, email, format!("@{secs} {zone}")))
}

/// A bare repository in `dir` whose objects are the scratch ones and the
/// host repository's, with `refs/banger/export` at `tip`: what the host
/// repository fetches the branch from.
fn fetchable(s: &Scratch, dir: &Path, tip: &str) -> Result<PathBuf, WorkspaceError> {
    let host = |e: String| WorkspaceError::Host(format!("the branch to fetch: {e}"));
    let repo = dir.join("fetch.git");
    let path = repo.to_string_lossy().into_owned();
    let plain = |args: &[&str]| {
        let mut cmd = Command::new("git");
        cmd.args(args)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null");
        repo::output(cmd, None).map_err(host)
    };
    plain(&["init", "-q", "--bare", &path])?;
    let alternates = s
        .env
        .iter()
        .filter(|(k, _)| *k == "GIT_OBJECT_DIRECTORY" || *k == "GIT_ALTERNATE_OBJECT_DIRECTORIES")
        .map(|(_, v)| format!("{}\n", v.to_string_lossy()))
        .collect::<String>();
    std::fs::write(repo.join("objects/info/alternates"), alternates)
        .map_err(|e| host(e.to_string()))?;
    plain(&["--git-dir", &path, "update-ref", "refs/banger/export", tip])?;
    Ok(repo)
}

/// Unpacks into `work` each file of the tar's `entries` that is part of
/// the guest's tree, as `changes` say, and names it (NUL-terminated, in
/// one write) to `names`. Returns the paths it named.
fn feed<R: Read>(
    entries: tar::Entries<'_, R>,
    changes: &BTreeMap<Vec<u8>, Change>,
    work: &Path,
    mut names: impl std::io::Write,
) -> Result<HashSet<Vec<u8>>, WorkspaceError> {
    // The tar crate's unpack_in refuses paths that leave `work`, through
    // `..` or a symlink the archive made: the guest is not trusted. A
    // file gone before tar read it is not in it, and is gone.
    let mut added = HashSet::new();
    for entry in entries {
        let mut entry = entry.map_err(guest_err)?;
        let kind = entry.header().entry_type();
        let path = entry.path_bytes().into_owned();
        let wanted = changes
            .get(&path)
            .is_some_and(|c| c.link.is_none() && (!c.deleted || c.untracked));
        if !wanted || !(kind.is_file() || kind.is_symlink()) || added.contains(&path) {
            continue;
        }
        let unpacked = entry
            .unpack_in(work)
            .map_err(|e| guest_err(format!("{:?}: {e}", OsStr::from_bytes(&path))))?;
        if unpacked {
            let mut name = path;
            name.push(0);
            names
                .write_all(&name)
                .map_err(|e| WorkspaceError::Host(format!("git update-index: {e}")))?;
            name.pop();
            added.insert(name);
        }
    }
    Ok(added)
}

/// `git diff OPTIONS` from `base` to `tree` into `file` (after what it
/// holds, with `append`), spelled as `git apply` reads it whatever the
/// repository's configuration says.
fn write_patch(
    s: &Scratch,
    base: &str,
    tree: &str,
    file: &Path,
    options: &[&str],
    append: bool,
) -> Result<(), WorkspaceError> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(append)
        .truncate(!append)
        .open(file)
        .map_err(|e| WorkspaceError::Host(format!("cannot create {}: {e}", file.display())))?;
    let mut args = vec!["diff", "--binary", "--full-index"];
    args.extend_from_slice(options);
    args.extend_from_slice(&[
        "--no-color",
        "--no-ext-diff",
        "--no-textconv",
        "--no-relative",
        "--src-prefix=a/",
        "--dst-prefix=b/",
        base,
        tree,
    ]);
    let mut cmd = s.cmd(&args);
    cmd.stdin(Stdio::null()).stdout(f).stderr(Stdio::piped());
    let done = cmd
        .output()
        .map_err(|e| WorkspaceError::Host(format!("cannot run git: {e}")))?;
    if done.status.success() {
        Ok(())
    } else {
        Err(WorkspaceError::Host(format!(
            "git diff (the guest's tree over {}): {}",
            s.top.display(),
            String::from_utf8_lossy(&done.stderr).trim()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_are_read_as_git_var_writes_them() {
        assert_eq!(
            parse_ident("A B <a@b.c> 1733461234 +0100"),
            Some(("A B", "a@b.c", "@1733461234 +0100".to_owned()))
        );
        assert_eq!(
            parse_ident("x <y> <z@w> 1 -0530"),
            Some(("x <y>", "z@w", "@1 -0530".to_owned()))
        );
        for bad in [
            "",
            "A <a@b> now +0000",
            "A <a@b> 1 0000",
            "A a@b 1 +0000",
            "A <a@b> 1",
        ] {
            assert_eq!(parse_ident(bad), None, "{bad}");
        }
    }

    #[test]
    fn changes_read_the_raw_listing_the_untracked_and_submodules() {
        let z = "0000000000000000000000000000000000000000";
        let h = "1111111111111111111111111111111111111111";
        let raw = format!(
            ":100644 100644 {h} {z} M\0a b.txt\0\
             :100644 000000 {h} {z} D\0gone-from-index\0\
             :100644 000000 {h} {z} D\0deleted\0\
             :160000 160000 {h} {z} M\0sub\0\
             :000000 160000 {z} {h} A\0sub2\0\
             :000000 160000 {z} {z} A\0sub3\0\
             :160000 000000 {h} {z} D\0sub4\0"
        );
        let untracked = "gone-from-index\0new file\0";
        let links = "2222222222222222222222222222222222222222 sub\0 sub2\0";
        let c = changes(raw.as_bytes(), untracked.as_bytes(), links.as_bytes());
        let get = |p: &str| c.get(p.as_bytes()).unwrap();
        assert_eq!(get("a b.txt"), &Change::default());
        assert!(get("gone-from-index").deleted && get("gone-from-index").untracked);
        assert!(get("deleted").deleted && !get("deleted").untracked);
        assert_eq!(
            get("sub").link.as_deref(),
            Some("2222222222222222222222222222222222222222")
        );
        // HEAD unreadable: what the index says; nothing known: no link.
        assert_eq!(get("sub2").link.as_deref(), Some(h));
        assert_eq!(get("sub3").link, None);
        assert!(get("sub4").deleted && get("sub4").link.is_none());
        assert!(get("new file").untracked);
        assert_eq!(c.len(), 8);
    }
}
