//! `workspace.export` and `workspace.status`: the guest's work since
//! prepare. An export is made on the host from the files the guest
//! changed ([`rebuild`]): a patch file, a branch fetched into the host
//! repository, or a patch applied to its tree. When the host cannot (its
//! repository lacks the base commit, the guest has no GNU tar), `git` in
//! the guest makes the patch or bundle. `workspace status` is read there.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use banger_agent_proto::ExitStatus;
use banger_rpc::EventSink;
use banger_wire::OpId;
use banger_wire::methods::{
    ExportTarget, WorkspaceExportParams, WorkspaceExportResult, WorkspaceStatusParams,
    WorkspaceStatusResult,
};

use super::guest::{self, Out};
use super::{WORKSPACE_LIST, WorkspaceError, WorkspaceService, check_dest};
use super::{rebuild, repo};
use crate::ops::OpKind;

/// Shared start of export and status: `$dir`, the workspace `$1` names or
/// else the VM's only one (exit 4: none; exit 5: several, listed on
/// stderr), `$base`, `$prepared`, `$head`, and `$scratch`, the prefix of
/// scratch files (in `.git`, removed at exit).
///
/// Each process costs a guest without KVM about 0.1 s: the three commits
/// are read from their loose ref files (as prepare wrote them) by the
/// shell, or else (packed by a `git gc`, say) from one `git show-ref`.
/// The workspace lock keeps these scripts one at a time, so what one
/// killed before its exit left is the next one's to remove.
const PRELUDE: &str = r#"set -eu
dir=$1 implicit=
if [ -z "$dir" ]; then
	implicit=1
	set --
	[ ! -f "$BANGER_WORKSPACE_LIST" ] || while IFS= read -r d; do set -- "$@" "$d"; done <"$BANGER_WORKSPACE_LIST"
	if [ $# -gt 1 ]; then
		for d; do
			shift
			! git -C "$d" rev-parse -q --verify refs/banger/base >/dev/null 2>&1 || set -- "$@" "$d"
		done
	fi
	case $# in
	0) exit 4 ;;
	1) dir=$1 ;;
	*) printf '%s\n' "$@" >&2; exit 5 ;;
	esac
fi
cd "$dir" 2>/dev/null || {
	[ -z "$implicit" ] || exit 4
	echo "$dir is not a banger workspace (no such directory)" >&2
	exit 3
}
base= prepared= head= h=
{ read -r base <.git/refs/banger/base; read -r prepared <.git/refs/banger/prepared; read -r h <.git/HEAD; } 2>/dev/null || :
case $h in
"ref: refs/"*) { read -r head <".git/${h#ref: }"; } 2>/dev/null || : ;;
*) head=$h ;;
esac
if [ -z "$base" ] || [ -z "$prepared" ] || [ -z "$head" ]; then
	base= prepared= head=
	set -- $(git show-ref --head refs/banger/base refs/banger/prepared || true)
	while [ $# -ge 2 ]; do
		case $2 in
		HEAD) head=$1 ;;
		refs/banger/base) base=$1 ;;
		refs/banger/prepared) prepared=$1 ;;
		esac
		shift 2
	done
fi
[ -n "$base" ] || {
	[ -z "$implicit" ] || exit 4
	echo "$dir is not a banger workspace" >&2
	exit 3
}
prepared=${prepared:-$base}
head=${head:-$base}
scratch=$PWD/.git/banger-scratch
trap 'rm -f "$scratch".*' EXIT
for f in "$scratch".*; do [ ! -e "$f" ] || rm -f "$scratch".*; break; done
"#;

/// After [`PRELUDE`]: a scratch index in `GIT_INDEX_FILE`, so that the
/// guest's own index and branch are never touched. It is a hard link to
/// the guest's, not a copy, as git replaces an index (a new file renamed
/// over it) and never rewrites one in place (hence the scratch files in
/// `.git`: a hard link cannot leave the file system).
const SCRATCH_INDEX: &str = r#"GIT_INDEX_FILE=$scratch.index
export GIT_INDEX_FILE
[ ! -f .git/index ] || ln .git/index "$GIT_INDEX_FILE"
"#;

/// After [`SCRATCH_INDEX`]: the working tree as it is, diffable against a
/// commit without writing an object (but the empty blob). Untracked
/// files (not ignored) enter the scratch index as intent-to-add, so
/// `git diff COMMIT` shows them as new; modified files are hashed in
/// memory by the diff. Writing their blobs instead (`git add -A`) costs
/// three times as much in a guest without KVM, and leaves loose objects
/// behind at every export; `git add -A -N` would stat every tracked file
/// once more than the diff does. A file listed as untracked may be gone
/// by the time `git add` reads the list (a build's temporary file): then
/// the list is made again, a few times.
const WORKTREE: &str = r#"tries=0
while :; do
	git ls-files -z --others --exclude-standard >"$scratch.untracked"
	[ -s "$scratch.untracked" ] || break
	git add --intent-to-add --pathspec-from-file="$scratch.untracked" --pathspec-file-nul 2>"$scratch.err" && break
	tries=$((tries + 1))
	if [ "$tries" -ge 3 ] || ! grep -q 'did not match any files' "$scratch.err"; then
		cat "$scratch.err" >&2
		[ "$tries" -lt 3 ] || echo "untracked files kept appearing and going while the workspace was read: try again once what makes them stops" >&2
		exit 1
	fi
done
"#;

/// After [`SCRATCH_INDEX`]: `$tip`, HEAD or a commit of the uncommitted rest on
/// top of it, kept as `refs/banger/export` (the branch export's bundle).
const TIP: &str = r#"git add -A
tree=$(git write-tree)
if [ "${BANGER_COMMITTED_ONLY:-0}" = 1 ] || [ "$tree" = "$(git rev-parse "$head^{tree}")" ]; then
	tip=$head
else
	tip=$(git commit-tree "$tree" -p "$head" -m "${BANGER_MESSAGE:-banger: uncommitted changes}")
fi
git update-ref refs/banger/export "$tip"
"#;

/// The last line an export script writes on stderr once its stdout is
/// complete: `banger-export TIP BASE RAW_BYTES DEST`.
const META: &str = r#"printf 'banger-export %s %s %s %s\n' "$tip" "$base" "${raw_bytes:-0}" "$dir" >&2
"#;

/// The export script for a target, made in the guest: its stdout is the
/// patch or bundle (for `apply`, the raw listing of the changes first:
/// `RAW_BYTES` of it). For when [`rebuild`] cannot make it on the host.
fn export_script(target: &ExportTarget) -> String {
    let out = match target {
        // From the base commit: applies to a clean checkout of it.
        ExportTarget::Patch { .. } => format!(
            "{SCRATCH_INDEX}{WORKTREE}tip=$head\n\
             git diff --binary --full-index -M --ignore-submodules=dirty \"$base\"\n"
        ),
        // From what prepare sent (what the host's tree had then), after
        // the preimage of every file it touches (the host checks them).
        ExportTarget::Apply => format!(
            "{SCRATCH_INDEX}{WORKTREE}tip=$head\n\
             raw=$scratch.raw\n\
             git diff --raw -z --no-abbrev --no-renames --ignore-submodules=dirty \"$prepared\" >\"$raw\"\n\
             raw_bytes=$(wc -c <\"$raw\")\n\
             cat \"$raw\"\n\
             git diff --binary --full-index --no-renames --ignore-submodules=dirty \"$prepared\"\n"
        ),
        ExportTarget::Branch { .. } => format!(
            "{SCRATCH_INDEX}{TIP}[ \"$tip\" = \"$base\" ] || git bundle create --quiet - refs/banger/export \"^$base\"\n"
        ),
    };
    format!("{PRELUDE}{out}{META}")
}

/// The script whose output [`rebuild::rebuild`] makes `want` of on the
/// host.
fn rebuild_script(want: &rebuild::Want) -> String {
    let guest = match want {
        rebuild::Want::Patch => rebuild::patch_script(),
        rebuild::Want::Branch { .. } => rebuild::branch_script(),
        rebuild::Want::Apply => rebuild::apply_script(),
    };
    format!("{PRELUDE}{guest}{META}")
}

/// What an export script said on its last stderr line.
struct Meta {
    tip: String,
    base: String,
    raw_bytes: u64,
    dest: String,
}

fn meta(stderr: &str) -> Result<Meta, WorkspaceError> {
    let line = stderr
        .trim_end_matches('\n')
        .rsplit('\n')
        .next()
        .unwrap_or("");
    let bad = || WorkspaceError::Guest(format!("unexpected answer from the guest: {stderr:?}"));
    let rest = line.strip_prefix("banger-export ").ok_or_else(bad)?;
    let mut f = rest.splitn(4, ' ');
    let mut next = || f.next().map(str::to_owned).ok_or_else(bad);
    Ok(Meta {
        tip: next()?,
        base: next()?,
        raw_bytes: next()?.parse().map_err(|_| bad())?,
        dest: next()?,
    })
}

/// Files a patch changes: its `diff --git` headers (base85 lines of
/// binary hunks cannot hold a space, so they never look like one).
fn patch_files(patch: impl std::io::BufRead) -> std::io::Result<u64> {
    let mut n = 0;
    for line in patch.split(b'\n') {
        n += u64::from(line?.starts_with(b"diff --git "));
    }
    Ok(n)
}

/// The scripts' `$1`: the workspace `dest` names, or empty for the VM's
/// only one (the script picks it: [`PRELUDE`]).
fn dest_arg(dest: Option<&str>) -> Result<String, WorkspaceError> {
    dest.map_or(Ok(String::new()), check_dest)
}

/// The environment of a script starting with [`PRELUDE`].
fn prelude_env() -> BTreeMap<String, String> {
    BTreeMap::from([(
        "BANGER_WORKSPACE_LIST".to_owned(),
        WORKSPACE_LIST.to_owned(),
    )])
}

/// Why a script starting with [`PRELUDE`] failed, its exits 4 and 5 (no
/// workspace, several) told in terms of `vm`.
fn failure(ran: &guest::Ran, vm: &str, what: &str) -> WorkspaceError {
    match ran.status {
        ExitStatus::Code(4) => WorkspaceError::NotFound(format!(
            "VM {vm:?} has no workspace: make one with banger workspace prepare {vm} [PATH]"
        )),
        ExitStatus::Code(5) => {
            let many: Vec<&str> = ran.stderr.lines().collect();
            WorkspaceError::Invalid(format!(
                "VM {vm:?} has {} workspaces ({}): say which with --dest",
                many.len(),
                many.join(", ")
            ))
        }
        _ => ran.failure(what),
    }
}

impl WorkspaceService {
    pub async fn export(
        &self,
        op_id: &OpId,
        p: WorkspaceExportParams,
        events: &EventSink,
    ) -> Result<WorkspaceExportResult, WorkspaceError> {
        if let ExportTarget::Patch { file } = &p.target
            && !Path::new(file).is_absolute()
        {
            return Err(WorkspaceError::Invalid(format!(
                "the patch file {file:?} is not absolute"
            )));
        }
        if let ExportTarget::Branch { name, .. } = &p.target {
            let ok =
                repo::git(Path::new("/"), &["check-ref-format", "--branch", name], &[]).is_ok();
            if !ok || name.starts_with('-') {
                return Err(WorkspaceError::Invalid(format!(
                    "{name:?} is not a valid branch name"
                )));
            }
        }
        let (vm, agent) = self.vms.guest(&p.vm).await?;
        let lock = self.lock_for(&vm.id);
        let scratch = self.scratch_dir()?;
        let rebuild_dir = self.scratch_dir()?;
        let (vm_name, vm_id, store) = (vm.name.clone(), vm.id.clone(), self.store.clone());
        self.ops
            .run(
                op_id,
                OpKind::WorkspaceExport,
                &vm.name,
                events,
                move |op| async move {
                    let _held = lock.lock_owned().await;
                    let dest = dest_arg(p.dest.as_deref())?;
                    let committed_only = matches!(
                        p.target,
                        ExportTarget::Branch {
                            committed_only: true,
                            ..
                        }
                    );
                    let mut env = prelude_env();
                    env.extend([
                        (
                            "BANGER_COMMITTED_ONLY".to_owned(),
                            if committed_only { "1" } else { "0" }.to_owned(),
                        ),
                        (
                            "BANGER_MESSAGE".to_owned(),
                            format!("Uncommitted changes from banger VM {vm_name}"),
                        ),
                    ]);
                    op.stage("fetch");
                    let want = match &p.target {
                        ExportTarget::Patch { .. } => rebuild::Want::Patch,
                        ExportTarget::Branch { committed_only, .. } => rebuild::Want::Branch {
                            committed_only: *committed_only,
                            message: env["BANGER_MESSAGE"].clone(),
                        },
                        ExportTarget::Apply => rebuild::Want::Apply,
                    };
                    // Made on the host unless it cannot be: then in the guest.
                    let on_host = OnHost {
                        op: &op,
                        agent: &agent,
                        dest: &dest,
                        env: env.clone(),
                        dir: rebuild_dir,
                        target: p.target.clone(),
                        umask: p.umask.unwrap_or(0o022),
                        path: p.path.clone(),
                        store: store.clone(),
                        vm_id: vm_id.clone(),
                        vm_name: vm_name.clone(),
                    };
                    match on_host.run(want).await? {
                        Ok(done) => return Ok(done),
                        Err(why) => op.stage(&format!("in the guest ({why})")),
                    }
                    // One script: which workspace, the changes and what
                    // they are measured against, in one pass over the
                    // working tree.
                    let out_file = scratch.path().join("out");
                    let script = export_script(&p.target);
                    let ran =
                        guest::run(&agent, &script, &[&dest], env, None, Out::File(&out_file))
                            .await?;
                    if !ran.ok() {
                        return Err(failure(&ran, &vm_name, "exporting the workspace"));
                    }
                    let Meta {
                        tip,
                        base,
                        raw_bytes,
                        dest,
                    } = meta(&ran.stderr)?;
                    let (path, store2, vm_id2, vm_name2, dest2) = (
                        p.path.clone(),
                        store.clone(),
                        vm_id.clone(),
                        vm_name.clone(),
                        dest.clone(),
                    );
                    let top = tokio::task::spawn_blocking(move || {
                        host_repo(path.as_deref(), &store2, &vm_id2, &vm_name2, &dest2)
                    })
                    .await
                    .map_err(|e| WorkspaceError::Host(e.to_string()))??;
                    let bytes = ran.stdout_bytes - raw_bytes;
                    op.progress(format!("{bytes} bytes"));
                    op.stage("write on the host");
                    let umask = p.umask.unwrap_or(0o022);
                    let target = p.target;
                    let (top2, out2, tip2) = (top.clone(), out_file.clone(), tip.clone());
                    let (written, files_changed) = tokio::task::spawn_blocking(move || {
                        write_out(target, &top2, &out2, raw_bytes, &base, &tip2, umask)
                    })
                    .await
                    .map_err(|e| WorkspaceError::Host(e.to_string()))??;
                    drop(scratch);
                    Ok(WorkspaceExportResult {
                        dest,
                        host_path: top.display().to_string(),
                        tip,
                        files_changed,
                        bytes,
                        written,
                    })
                },
            )
            .await
    }

    pub async fn status(
        &self,
        p: WorkspaceStatusParams,
    ) -> Result<WorkspaceStatusResult, WorkspaceError> {
        let (vm, agent) = self.vms.guest(&p.vm).await?;
        let _held = self.lock_for(&vm.id).lock_owned().await;
        let dest = dest_arg(p.dest.as_deref())?;
        let script = format!(
            "{PRELUDE}{SCRATCH_INDEX}{WORKTREE}echo \"$dir\"; echo \"$base\"; echo \"$prepared\"; echo \"$head\"\n\
             git rev-list --count \"$base..$head\"\n\
             du -sk . | cut -f1\n\
             git diff --name-status --no-renames --ignore-submodules=dirty \"$prepared\""
        );
        let ran = guest::run(&agent, &script, &[&dest], prelude_env(), None, Out::Memory).await?;
        if !ran.ok() {
            return Err(failure(&ran, &vm.name, "reading the workspace"));
        }
        let text = ran.text();
        let mut lines = text.lines();
        let mut next = || lines.next().unwrap_or_default().to_owned();
        let (dest, base_commit, prepared_commit, head_commit) = (next(), next(), next(), next());
        let host_path = self.store.vm_workspace(&vm.id, &dest)?.unwrap_or_default();
        let commits = next().parse().unwrap_or(0);
        let size_bytes = next().parse::<u64>().unwrap_or(0) * 1024;
        let changed = lines
            .map(|l| l.replacen('\t', " ", 1))
            .filter(|l| !l.is_empty())
            .collect();
        Ok(WorkspaceStatusResult {
            dest,
            host_path,
            base_commit,
            prepared_commit,
            head_commit,
            commits,
            changed,
            size_bytes,
        })
    }
}

/// The host repository a workspace came from: `path`'s, or where prepare
/// took it from as the daemon recorded it (never where the guest says).
fn host_repo(
    path: Option<&str>,
    store: &banger_store::Store,
    vm_id: &str,
    vm_name: &str,
    dest: &str,
) -> Result<PathBuf, WorkspaceError> {
    match path {
        Some(path) => repo::top_level(Path::new(path)),
        None => match store.vm_workspace(vm_id, dest)? {
            Some(host) => Ok(PathBuf::from(host)),
            None => Err(WorkspaceError::Invalid(format!(
                "banger has no record of the host repository {dest} in VM {vm_name:?} came \
                 from: give its path"
            ))),
        },
    }
}

/// A patch or branch export made on the host ([`rebuild`]).
struct OnHost<'a> {
    op: &'a crate::ops::Operation,
    agent: &'a banger_agent_proto::AgentClient,
    /// The scripts' `$1`.
    dest: &'a str,
    env: BTreeMap<String, String>,
    /// For scratch files: the rebuild owns it, so that it is removed
    /// after the rebuild ends, even when this export was dropped first.
    dir: tempfile::TempDir,
    target: ExportTarget,
    umask: u32,
    /// As [`host_repo`] takes them.
    path: Option<String>,
    store: std::sync::Arc<banger_store::Store>,
    vm_id: String,
    vm_name: String,
}

impl OnHost<'_> {
    /// The export's result, or why the guest must make it.
    async fn run(
        self,
        want: rebuild::Want,
    ) -> Result<Result<WorkspaceExportResult, String>, WorkspaceError> {
        let (tx, rx) = std::sync::mpsc::channel();
        let (path, store, vm_id, vm_name) =
            (self.path, self.store, self.vm_id, self.vm_name.clone());
        let dir = self.dir;
        // Reads the guest's output as it comes, and writes only in `dir`.
        // If this future is dropped, the guest's output ends, and so does
        // the rebuild, removing `dir`.
        let script = rebuild_script(&want);
        let built = tokio::task::spawn_blocking(move || {
            let built = rebuild::rebuild(
                rebuild::Chunks::new(rx),
                |dest| host_repo(path.as_deref(), &store, &vm_id, &vm_name, dest),
                dir.path(),
                &want,
            );
            (dir, built)
        });
        let ran = guest::run(
            self.agent,
            &script,
            &[self.dest],
            self.env,
            None,
            Out::Stream(tx),
        )
        .await?;
        self.op.progress(format!("{} bytes", ran.stdout_bytes));
        self.op.stage("make it on the host");
        // Its input has ended: it is done soon, whatever the guest did.
        let (_dir, built) = built
            .await
            .map_err(|e| WorkspaceError::Host(e.to_string()))?;
        if ran.status == ExitStatus::Code(rebuild::TAR_FAILED) {
            return Ok(Err(format!(
                "its tar cannot send the files: {}",
                ran.stderr.trim().lines().next().unwrap_or("")
            )));
        }
        if !ran.ok() {
            return Err(failure(&ran, &self.vm_name, "exporting the workspace"));
        }
        let m = meta(&ran.stderr)?;
        let (top, made, raw_bytes, tip) = match built? {
            rebuild::Rebuilt::InGuest(why) => return Ok(Err(why)),
            rebuild::Rebuilt::Patch { top, patch } => (top, patch, 0, m.tip),
            rebuild::Rebuilt::Branch { top, repo, tip } => (top, repo, 0, tip),
            rebuild::Rebuilt::Apply {
                top,
                changes,
                raw_bytes,
            } => (top, changes, raw_bytes, m.tip),
        };
        let patch = matches!(self.target, ExportTarget::Patch { .. });
        let (target, top2, base, tip2, umask) =
            (self.target, top.clone(), m.base, tip.clone(), self.umask);
        let (written, files_changed) = tokio::task::spawn_blocking(move || {
            write_out(target, &top2, &made, raw_bytes, &base, &tip2, umask)
        })
        .await
        .map_err(|e| WorkspaceError::Host(e.to_string()))??;
        // A patch: its size; a branch: what the guest sent for it.
        let bytes = match std::fs::metadata(&written) {
            Ok(m) if patch => m.len(),
            _ => ran.stdout_bytes,
        };
        Ok(Ok(WorkspaceExportResult {
            dest: m.dest,
            host_path: top.display().to_string(),
            tip,
            files_changed,
            bytes,
            written,
        }))
    }
}

/// Write what the guest sent (`out`: for `apply`, `raw_bytes` of raw
/// listing, then the patch) where the target says. Returns what was
/// written and how many files changed.
fn write_out(
    target: ExportTarget,
    top: &Path,
    out: &Path,
    raw_bytes: u64,
    base: &str,
    tip: &str,
    umask: u32,
) -> Result<(String, u64), WorkspaceError> {
    use std::io::{BufReader, Read};
    use std::os::unix::fs::PermissionsExt;
    let host = |what: &str, e: std::io::Error| WorkspaceError::Host(format!("{what}: {e}"));
    match target {
        ExportTarget::Patch { file } => {
            std::fs::copy(out, &file)
                .and_then(|_| {
                    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o666 & !umask))
                })
                .map_err(|e| host(&format!("cannot write {file}"), e))?;
            let f = std::fs::File::open(out).map_err(|e| host("the patch", e))?;
            let files = patch_files(BufReader::new(f)).map_err(|e| host("the patch", e))?;
            Ok((file, files))
        }
        ExportTarget::Apply => {
            let mut f = std::fs::File::open(out).map_err(|e| host("the guest's output", e))?;
            let mut raw = vec![0; raw_bytes as usize];
            f.read_exact(&mut raw)
                .map_err(|e| host("the raw listing", e))?;
            let patch = out.with_extension("patch");
            let mut w = std::fs::File::create(&patch).map_err(|e| host("the patch", e))?;
            std::io::copy(&mut f, &mut w).map_err(|e| host("the patch", e))?;
            let files = apply(top, &patch, &raw, umask)?;
            Ok((top.display().to_string(), files))
        }
        ExportTarget::Branch { name, force, .. } => {
            if tip == base {
                return Err(WorkspaceError::Invalid(
                    "nothing to export: the guest has no change since the base commit".into(),
                ));
            }
            fetch_branch(top, out, &name, force, umask)?;
            let names = repo::git(
                top,
                &["diff", "--name-only", "-z", "--no-renames", base, tip],
                &[],
            )
            .map_err(WorkspaceError::Host)?;
            Ok((name, names.iter().filter(|b| **b == 0).count() as u64))
        }
    }
}

/// Apply the guest's changes since prepare to the host's working tree,
/// after checking that each file they touch is still what prepare sent
/// (`raw`: `git diff --raw -z` from the guest). Returns the files changed.
fn apply(top: &Path, patch: &Path, raw: &[u8], umask: u32) -> Result<u64, WorkspaceError> {
    use std::os::unix::ffi::OsStrExt;
    // (old mode, old blob, path) of each file the changes touch.
    let mut entries = Vec::new();
    let mut fields = raw.split(|b| *b == 0);
    while let Some(meta) = fields.next() {
        let meta = String::from_utf8_lossy(meta);
        let meta = meta.trim_start_matches('\n');
        if meta.is_empty() {
            continue;
        }
        let Some(path) = fields.next() else { break };
        // ":100644 100644 <old> <new> M"
        let parts: Vec<&str> = meta.trim_start_matches(':').split(' ').collect();
        if let [old_mode, _, old, ..] = parts.as_slice() {
            entries.push((
                *old_mode == "120000",
                old.to_string(),
                OsStr::from_bytes(path),
            ));
        }
    }
    let absent = |old: &str| old.bytes().all(|b| b == b'0');
    let now: Vec<_> = entries
        .iter()
        .map(|(_, _, path)| std::fs::symlink_metadata(top.join(path)).ok())
        .collect();
    // The host's regular files, hashed by git (its clean filters apply as
    // they did at prepare) in one process.
    let regular: Vec<&OsStr> = entries
        .iter()
        .zip(&now)
        .filter(|((_, old, _), m)| !absent(old) && m.as_ref().is_some_and(|m| m.is_file()))
        .map(|((_, _, path), _)| *path)
        .collect();
    let hashes = hash_files(top, &regular)?;
    let mut conflicts = Vec::new();
    for ((was_link, old, path), m) in entries.iter().zip(&now) {
        let same = match (m, absent(old)) {
            (None, true) => true,
            (Some(_), true) | (None, false) => false,
            (Some(m), false) if m.file_type().is_symlink() => {
                *was_link
                    && std::fs::read_link(top.join(path))
                        .ok()
                        .and_then(|t| {
                            let target = t.as_os_str().as_encoded_bytes().to_vec();
                            hash_object(top, &[OsStr::new("--stdin")], target)
                                .ok()?
                                .pop()
                        })
                        .as_deref()
                        == Some(old.as_str())
            }
            (Some(_), false) => {
                !*was_link && hashes.get(path).map(String::as_str) == Some(old.as_str())
            }
        };
        if !same {
            conflicts.push(path.to_string_lossy().into_owned());
        }
    }
    let n = entries.len() as u64;
    if !conflicts.is_empty() {
        return Err(WorkspaceError::Conflict(format!(
            "the host's working tree changed since prepare in {} file(s) the guest changed too: {}; export with --branch NAME or --patch FILE instead",
            conflicts.len(),
            conflicts.join(", ")
        )));
    }
    if n == 0 {
        return Ok(0);
    }
    let patch_arg = patch.display().to_string();
    repo::git_as_user(
        top,
        umask,
        &["apply", "--binary", "--whitespace=nowarn", &patch_arg],
    )
    .map_err(|e| WorkspaceError::Host(format!("cannot apply the guest's changes: {e}")))?;
    Ok(n)
}

/// `git hash-object ARGS` in `top` with `stdin`: the hashes it printed.
fn hash_object(top: &Path, args: &[&OsStr], stdin: Vec<u8>) -> Result<Vec<String>, WorkspaceError> {
    let mut cmd = std::process::Command::new("git");
    cmd.arg("-C").arg(top).arg("hash-object").args(args);
    let out = repo::output(cmd, Some(&stdin))
        .map_err(|e| WorkspaceError::Host(format!("git hash-object failed: {e}")))?;
    Ok(String::from_utf8_lossy(&out)
        .lines()
        .map(str::to_owned)
        .collect())
}

/// `git hash-object` of each of `paths` (relative to `top`): one process
/// for the lot (`--stdin-paths` reads lines, so a name holding a newline
/// gets a process of its own).
fn hash_files<'a>(
    top: &Path,
    paths: &[&'a OsStr],
) -> Result<std::collections::HashMap<&'a OsStr, String>, WorkspaceError> {
    use std::os::unix::ffi::OsStrExt;
    let run = |args: &[&OsStr], stdin: Vec<u8>| hash_object(top, args, stdin);
    let (lines, odd): (Vec<&OsStr>, Vec<&OsStr>) =
        paths.iter().partition(|p| !p.as_bytes().contains(&b'\n'));
    let mut stdin = Vec::new();
    for p in &lines {
        stdin.extend_from_slice(p.as_bytes());
        stdin.push(b'\n');
    }
    let mut hashes: std::collections::HashMap<_, _> = if lines.is_empty() {
        Default::default()
    } else {
        lines
            .into_iter()
            .zip(run(&[OsStr::new("--stdin-paths")], stdin)?)
            .collect()
    };
    for p in odd {
        let h = run(&[OsStr::new("--"), p], Vec::new())?;
        hashes.extend(h.into_iter().next().map(|h| (p, h)));
    }
    Ok(hashes)
}

/// Fetch the bundle's `refs/banger/export` into branch `name`: a fetch
/// into a ref, so the working tree, the index and the current branch stay
/// as they are (git refuses to fetch into the checked-out branch).
fn fetch_branch(
    top: &Path,
    bundle: &Path,
    name: &str,
    force: bool,
    umask: u32,
) -> Result<(), WorkspaceError> {
    let exists = repo::git(
        top,
        &["show-ref", "--verify", "-q", &format!("refs/heads/{name}")],
        &[],
    )
    .is_ok();
    if exists && !force {
        return Err(WorkspaceError::Conflict(format!(
            "branch {name} already exists in {}: pick another name, or --force to replace it",
            top.display()
        )));
    }
    let bundle_arg = bundle.display().to_string();
    let refspec = format!(
        "{}refs/banger/export:refs/heads/{name}",
        if force { "+" } else { "" }
    );
    repo::git_as_user(
        top,
        umask,
        &[
            "fetch",
            "--quiet",
            "--no-tags",
            "--no-write-fetch-head",
            &bundle_arg,
            &refspec,
        ],
    )
    .map_err(|e| {
        WorkspaceError::Host(format!("cannot fetch the guest's commits into {name}: {e}"))
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn git(dir: &Path, args: &[&str]) -> Vec<u8> {
        let env = [
            ("GIT_AUTHOR_NAME", std::ffi::OsStr::new("t")),
            ("GIT_AUTHOR_EMAIL", std::ffi::OsStr::new("t@t")),
            ("GIT_COMMITTER_NAME", std::ffi::OsStr::new("t")),
            ("GIT_COMMITTER_EMAIL", std::ffi::OsStr::new("t@t")),
        ];
        repo::git(dir, args, &env).unwrap()
    }

    /// A repository at "prepared", a clone standing for the guest with
    /// changes on top, and the guest's raw list and patch.
    fn setup() -> (tempfile::TempDir, PathBuf, PathBuf, Vec<u8>) {
        let t = tempfile::tempdir().unwrap();
        let host = t.path().join("host");
        std::fs::create_dir_all(&host).unwrap();
        git(&host, &["init", "-q"]);
        std::fs::write(host.join("a.txt"), "a\n").unwrap();
        std::fs::write(host.join("b.txt"), "b\n").unwrap();
        std::os::unix::fs::symlink("a.txt", host.join("l")).unwrap();
        git(&host, &["add", "."]);
        git(&host, &["commit", "-q", "-m", "base"]);
        let guest = t.path().join("guest");
        git(
            t.path(),
            &[
                "clone",
                "-q",
                host.to_str().unwrap(),
                guest.to_str().unwrap(),
            ],
        );
        std::fs::write(guest.join("a.txt"), "a\nguest\n").unwrap();
        std::fs::remove_file(guest.join("b.txt")).unwrap();
        std::fs::write(guest.join("c.txt"), "new\n").unwrap();
        std::fs::remove_file(guest.join("l")).unwrap();
        std::os::unix::fs::symlink("c.txt", guest.join("l")).unwrap();
        git(&guest, &["add", "-A"]);
        git(&guest, &["commit", "-q", "-m", "guest"]);
        let raw = git(
            &guest,
            &[
                "diff",
                "--raw",
                "-z",
                "--no-abbrev",
                "--no-renames",
                "HEAD~",
                "HEAD",
            ],
        );
        let patch = git(
            &guest,
            &[
                "diff",
                "--binary",
                "--full-index",
                "--no-renames",
                "HEAD~",
                "HEAD",
            ],
        );
        let patch_file = t.path().join("p");
        std::fs::write(&patch_file, patch).unwrap();
        (t, host, patch_file, raw)
    }

    #[test]
    fn apply_checks_every_touched_file_then_applies() {
        let (_t, host, patch, raw) = setup();
        assert_eq!(apply(&host, &patch, &raw, 0o022).unwrap(), 4);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(host.join("c.txt"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o644, "the caller's umask, not the daemon's");
        assert_eq!(
            std::fs::read_to_string(host.join("a.txt")).unwrap(),
            "a\nguest\n"
        );
        assert!(!host.join("b.txt").exists());
        assert_eq!(
            std::fs::read_link(host.join("l")).unwrap(),
            Path::new("c.txt")
        );
    }

    #[test]
    fn apply_refuses_files_the_host_changed_naming_them() {
        let (_t, host, patch, raw) = setup();
        std::fs::write(host.join("b.txt"), "b changed on the host\n").unwrap();
        std::fs::write(host.join("c.txt"), "made on the host\n").unwrap();
        let err = apply(&host, &patch, &raw, 0o022).unwrap_err().to_string();
        assert!(
            err.contains("2 file(s)") && err.contains("b.txt") && err.contains("c.txt"),
            "{err}"
        );
        assert!(!err.contains("a.txt"), "{err}");
        // Nothing applied.
        assert_eq!(std::fs::read_to_string(host.join("a.txt")).unwrap(), "a\n");
    }

    /// Runs an export script as the agent would, in `dir`.
    fn run_script(dir: &Path, target: &ExportTarget) -> (Vec<u8>, String) {
        run_script_with(dir, target, std::env::var_os("PATH").unwrap())
    }

    /// [`run_script`] with this `PATH`.
    fn run_script_with(
        dir: &Path,
        target: &ExportTarget,
        path: std::ffi::OsString,
    ) -> (Vec<u8>, String) {
        run_sh(dir, &export_script(target), path)
    }

    /// What the host makes of `sent` (a rebuild script's output in the
    /// workspace `w`), with `repo` as the host repository: the patch's
    /// text, or why the guest must make it.
    fn on_host(sent: &[u8], w: &Path, repo: &Path) -> Result<Vec<u8>, String> {
        let scratch = tempfile::tempdir().unwrap();
        let w = w.to_str().unwrap().to_owned();
        let built = rebuild::rebuild(
            sent,
            |dest| {
                assert_eq!(dest, w);
                Ok(repo.to_owned())
            },
            scratch.path(),
            &rebuild::Want::Patch,
        )
        .unwrap();
        match built {
            rebuild::Rebuilt::Patch { top, patch } => {
                assert_eq!(top, repo);
                Ok(std::fs::read(patch).unwrap())
            }
            rebuild::Rebuilt::InGuest(why) => Err(why),
            other => panic!("{other:?}"),
        }
    }

    /// Runs `script` as the agent would, in `dir`, with this `PATH`.
    fn run_sh(dir: &Path, script: &str, path: std::ffi::OsString) -> (Vec<u8>, String) {
        let out = std::process::Command::new("sh")
            .args(["-c", script, "sh"])
            .arg(dir)
            .env("PATH", path)
            .env("GIT_AUTHOR_NAME", "t")
            .env("GIT_AUTHOR_EMAIL", "t@t")
            .env("GIT_COMMITTER_NAME", "t")
            .env("GIT_COMMITTER_EMAIL", "t@t")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{stderr}");
        (out.stdout, stderr)
    }

    #[test]
    fn export_scripts_diff_the_working_tree_as_a_commit_of_it_would() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let w = t.path().join("w");
        std::fs::create_dir_all(w.join("d")).unwrap();
        git(t.path(), &["init", "-q", w.to_str().unwrap()]);
        std::fs::write(w.join("a.txt"), "a\n").unwrap();
        std::fs::write(w.join("b.bin"), b"\0\x01binary").unwrap();
        std::fs::write(
            w.join("c.txt"),
            "moves somewhere else, unchanged\n".repeat(20),
        )
        .unwrap();
        std::fs::write(w.join("run.sh"), "echo hi\n").unwrap();
        std::fs::write(w.join("gone.txt"), "deleted\n").unwrap();
        std::os::unix::fs::symlink("a.txt", w.join("l")).unwrap();
        std::fs::write(w.join(".gitignore"), "*.log\n").unwrap();
        std::fs::write(w.join("kept.txt"), "untracked in the guest, kept\n").unwrap();
        std::fs::write(w.join("ign.log"), "untracked in the guest, ignored\n").unwrap();
        std::fs::write(w.join("becomes-dir"), "a file, then a directory\n").unwrap();
        git(&w, &["add", "-A"]);
        git(&w, &["add", "-f", "ign.log"]);
        git(&w, &["commit", "-q", "-m", "base"]);
        let base = String::from_utf8(git(&w, &["rev-parse", "HEAD"])).unwrap();
        let base = base.trim();
        git(&w, &["update-ref", "refs/banger/base", base]);
        git(&w, &["update-ref", "refs/banger/prepared", base]);
        // The guest's work: one change committed, the rest left.
        std::fs::write(w.join("a.txt"), "a\ncommitted\n").unwrap();
        git(&w, &["commit", "-q", "-am", "guest"]);
        std::fs::write(w.join("a.txt"), "a\ncommitted\nuncommitted\n").unwrap();
        std::fs::write(w.join("b.bin"), b"\0\x02changed binary").unwrap();
        std::fs::rename(w.join("c.txt"), w.join("d/c.txt")).unwrap();
        std::fs::set_permissions(w.join("run.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::remove_file(w.join("gone.txt")).unwrap();
        std::fs::remove_file(w.join("l")).unwrap();
        std::os::unix::fs::symlink("d/c.txt", w.join("l")).unwrap();
        std::fs::write(w.join("new.txt"), "untracked\n").unwrap();
        std::fs::write(w.join("new.log"), "ignored\n").unwrap();
        git(&w, &["rm", "-q", "--cached", "kept.txt", "ign.log"]);
        std::fs::remove_file(w.join("becomes-dir")).unwrap();
        std::fs::create_dir(w.join("becomes-dir")).unwrap();
        std::fs::write(w.join("becomes-dir/f"), "in it\n").unwrap();
        let head = String::from_utf8(git(&w, &["rev-parse", "HEAD"])).unwrap();
        let index_before = std::fs::read(w.join(".git/index")).unwrap();
        // The empty blob, which intent-to-add entries name, is written
        // once; nothing else is.
        git(&w, &["hash-object", "-w", "/dev/null"]);
        let objects_before = git(&w, &["count-objects"]);

        // What an export killed midway left: a stale index and its lock.
        std::fs::write(w.join(".git/banger-scratch.index"), "stale").unwrap();
        std::fs::write(w.join(".git/banger-scratch.index.lock"), "").unwrap();
        let path = std::env::var_os("PATH").unwrap();
        let (sent, stderr) = run_sh(&w, &rebuild_script(&rebuild::Want::Patch), path);
        let m = meta(&stderr).unwrap();
        assert_eq!((m.tip.as_str(), m.base.as_str()), (head.trim(), base));
        assert_eq!((m.raw_bytes, m.dest.as_str()), (0, w.to_str().unwrap()));
        // The host (here the same repository: it has the base commit)
        // diffs what the guest sent.
        let patch = on_host(&sent, &w, &w).unwrap();
        // The guest's own diff, for a host without the base commit.
        let (in_guest, _) = run_script(&w, &ExportTarget::Patch { file: "/x".into() });
        assert_eq!(
            std::fs::read(w.join(".git/index")).unwrap(),
            index_before,
            "the guest's index is untouched"
        );
        assert_eq!(
            git(&w, &["count-objects"]),
            objects_before,
            "no object written"
        );

        // What a commit of the whole working tree would give.
        let idx = t.path().join("idx");
        std::fs::copy(w.join(".git/index"), &idx).unwrap();
        let with_idx = |args: &[&str]| {
            let out = std::process::Command::new("git")
                .arg("-C")
                .arg(&w)
                .args(args)
                .env("GIT_INDEX_FILE", &idx)
                .output()
                .unwrap();
            assert!(out.status.success());
            String::from_utf8(out.stdout).unwrap().trim().to_owned()
        };
        with_idx(&["add", "-A"]);
        let tree = with_idx(&["write-tree"]);
        let tip = String::from_utf8(git(
            &w,
            &["commit-tree", &tree, "-p", head.trim(), "-m", "t"],
        ))
        .unwrap();
        let tip = tip.trim();
        let want = git(&w, &["diff", "--binary", "--full-index", "-M", base, tip]);
        assert_eq!(
            String::from_utf8_lossy(&patch),
            String::from_utf8_lossy(&want)
        );
        let names = git(&w, &["diff", "--name-only", "-M", base, tip]);
        assert_eq!(
            patch_files(&patch[..]).unwrap(),
            String::from_utf8(names).unwrap().lines().count() as u64
        );
        assert_eq!(
            String::from_utf8_lossy(&in_guest),
            String::from_utf8_lossy(&want)
        );
        let text = String::from_utf8_lossy(&patch);
        assert!(text.contains("rename to d/c.txt"), "{text}");
        assert!(text.contains("new mode 100755"), "{text}");
        // Out of the guest's index: kept as an untracked file, gone as an
        // ignored one; a new ignored file stays out.
        assert!(
            text.contains("diff --git a/ign.log b/ign.log\ndeleted file"),
            "{text}"
        );
        assert!(
            !text.contains("kept.txt") && !text.contains("new.log"),
            "{text}"
        );
        assert!(text.contains("+++ b/becomes-dir/f"), "{text}");
        // A host repository without the base commit: the guest must diff.
        let other = t.path().join("other");
        git(t.path(), &["init", "-q", other.to_str().unwrap()]);
        for (repo, why) in [
            (other, "lacks the base commit"),
            (t.path().join("gone"), "git cannot read"),
        ] {
            let w = on_host(&sent, &w, &repo).unwrap_err();
            assert!(w.contains(why), "{w}");
        }

        // Apply: the raw listing first, then the patch, both from prepare.
        let (out, stderr) = run_script(&w, &ExportTarget::Apply);
        let m = meta(&stderr).unwrap();
        let (raw, rest) = out.split_at(m.raw_bytes as usize);
        let raw_want = git(
            &w,
            &[
                "diff",
                "--raw",
                "-z",
                "--no-abbrev",
                "--no-renames",
                base,
                tip,
            ],
        );
        let raw_paths = |r: &[u8]| -> Vec<Vec<u8>> {
            r.split(|b| *b == 0)
                .skip(1)
                .step_by(2)
                .map(<[u8]>::to_vec)
                .collect()
        };
        assert_eq!(raw_paths(raw), raw_paths(&raw_want));
        let want = git(
            &w,
            &[
                "diff",
                "--binary",
                "--full-index",
                "--no-renames",
                base,
                tip,
            ],
        );
        assert_eq!(
            String::from_utf8_lossy(rest),
            String::from_utf8_lossy(&want)
        );
        // Made on the host: the same listing (but for the new blobs' ids,
        // which the guest leaves unhashed) and the same patch.
        let (sent, _) = run_sh(
            &w,
            &rebuild_script(&rebuild::Want::Apply),
            std::env::var_os("PATH").unwrap(),
        );
        let scratch = tempfile::tempdir().unwrap();
        let built = rebuild::rebuild(
            &sent[..],
            |_| Ok(w.clone()),
            scratch.path(),
            &rebuild::Want::Apply,
        )
        .unwrap();
        let rebuild::Rebuilt::Apply {
            changes, raw_bytes, ..
        } = built
        else {
            panic!("{built:?}");
        };
        let made = std::fs::read(changes).unwrap();
        let (host_raw, host_patch) = made.split_at(raw_bytes as usize);
        assert_eq!(raw_paths(host_raw), raw_paths(raw));
        assert_eq!(
            String::from_utf8_lossy(host_patch),
            String::from_utf8_lossy(rest)
        );

        // Branch: a commit of the rest on top of HEAD, bundled.
        let (bundle, stderr) = run_script(
            &w,
            &ExportTarget::Branch {
                name: "b".into(),
                force: false,
                committed_only: false,
            },
        );
        let m = meta(&stderr).unwrap();
        assert_eq!(
            String::from_utf8(git(&w, &["rev-parse", &format!("{}^{{tree}}", m.tip)]))
                .unwrap()
                .trim(),
            tree
        );
        assert!(bundle.starts_with(b"# v2 git bundle"));
        // Made on the host instead: the guest's commit comes in its
        // bundle, the rest is committed on the host as the guest's git
        // would have, and the host repository (which has only the base)
        // fetches it.
        let host = host_with_only_the_base(t.path(), &w);
        for committed_only in [false, true] {
            let want = rebuild::Want::Branch {
                committed_only,
                message: "the rest".into(),
            };
            let env = [(
                "BANGER_COMMITTED_ONLY",
                if committed_only { "1" } else { "0" },
            )];
            let out = std::process::Command::new("sh")
                .args(["-c", &rebuild_script(&want), "sh"])
                .arg(&w)
                .envs(env)
                .env("GIT_AUTHOR_NAME", "t")
                .env("GIT_AUTHOR_EMAIL", "t@t")
                .env("GIT_COMMITTER_NAME", "c")
                .env("GIT_COMMITTER_EMAIL", "c@c")
                .output()
                .unwrap();
            assert!(out.status.success(), "{out:?}");
            let scratch = tempfile::tempdir().unwrap();
            let built =
                rebuild::rebuild(&out.stdout[..], |_| Ok(host.clone()), scratch.path(), &want)
                    .unwrap();
            let rebuild::Rebuilt::Branch { top, repo, tip } = built else {
                panic!("{built:?}");
            };
            assert_eq!(top, host);
            let name = format!("from-host-{committed_only}");
            fetch_branch(&host, &repo, &name, false, 0o022).unwrap();
            let show = |f: &str| {
                String::from_utf8(git(&host, &["log", "-1", &format!("--format={f}"), &name]))
                    .unwrap()
                    .trim()
                    .to_owned()
            };
            assert_eq!(show("%H"), tip);
            if committed_only {
                assert_eq!(tip, head.trim());
            } else {
                assert_eq!(show("%T %P"), format!("{tree} {}", head.trim()));
                assert_eq!(
                    show("%an <%ae> / %cn <%ce> / %s"),
                    "t <t@t> / c <c@c> / the rest"
                );
            }
        }
        assert_eq!(
            std::fs::read(w.join(".git/index")).unwrap(),
            index_before,
            "the guest's index is untouched"
        );
        let left: Vec<_> = std::fs::read_dir(w.join(".git"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n.to_string_lossy().starts_with("banger-scratch"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    /// A workspace at its base, with `refs/banger/*` as prepare leaves them.
    fn workspace(t: &Path) -> PathBuf {
        let w = t.join("w");
        git(t, &["init", "-q", w.to_str().unwrap()]);
        std::fs::write(w.join("a.txt"), "a\n").unwrap();
        git(&w, &["add", "-A"]);
        git(&w, &["commit", "-q", "-m", "base"]);
        git(&w, &["update-ref", "refs/banger/base", "HEAD"]);
        w
    }

    /// The git the tests run, for a stand-in to exec.
    fn real_git(t: &Path) -> String {
        let dir = repo::git(t, &["--exec-path"], &[]).unwrap();
        let dir = String::from_utf8(dir).unwrap();
        Path::new(dir.trim()).join("git").display().to_string()
    }

    /// A `PATH` whose first directory (made in `t`) holds the script
    /// `name`.
    fn path_with_script(t: &Path, name: &str, script: &str) -> std::ffi::OsString {
        use std::os::unix::fs::PermissionsExt;
        let bin = t.join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::write(bin.join(name), script).unwrap();
        std::fs::set_permissions(bin.join(name), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::env::join_paths(
            std::iter::once(bin).chain(std::env::split_paths(&std::env::var_os("PATH").unwrap())),
        )
        .unwrap()
    }

    /// A host repository (in `t`) holding only the base commit of the
    /// workspace `w`.
    fn host_with_only_the_base(t: &Path, w: &Path) -> PathBuf {
        let host = t.join("host");
        git(t, &["init", "-q", host.to_str().unwrap()]);
        git(
            &host,
            &[
                "fetch",
                "-q",
                w.to_str().unwrap(),
                "refs/banger/base:refs/heads/main",
            ],
        );
        host
    }

    #[test]
    fn an_untracked_file_gone_between_listing_and_adding_is_left_out() {
        let t = tempfile::tempdir().unwrap();
        let w = workspace(t.path());
        std::fs::write(w.join("kept.txt"), "kept\n").unwrap();
        std::fs::write(w.join("build.tmp"), "a build's temporary file\n").unwrap();
        // git as the guest has it, but a build removes its temporary file
        // right after git lists the untracked files, once.
        let once = t.path().join("removed");
        let path = path_with_script(
            t.path(),
            "git",
            &format!(
                "#!/bin/sh\ncase \" $* \" in *\" --others \"*)\n\t{real:?} \"$@\" || exit\n\t[ -e {once:?} ] || {{ rm build.tmp; : >{once:?}; }}\n\texit 0 ;;\nesac\nexec {real:?} \"$@\"\n",
                real = real_git(t.path()),
                once = once.display().to_string(),
            ),
        );
        // The guest's diff adds what is still there.
        let (patch, _) =
            run_script_with(&w, &ExportTarget::Patch { file: "/x".into() }, path.clone());
        let patch = String::from_utf8_lossy(&patch);
        assert!(patch.contains("+++ b/kept.txt"), "{patch}");
        assert!(!patch.contains("build.tmp"), "{patch}");
        // The host's rebuild: tar skips it, and the host leaves it out.
        std::fs::write(w.join("build.tmp"), "a build's temporary file\n").unwrap();
        std::fs::remove_file(&once).unwrap();
        let (sent, _) = run_sh(&w, &rebuild_script(&rebuild::Want::Patch), path);
        let patch = on_host(&sent, &w, &w).unwrap();
        let patch = String::from_utf8_lossy(&patch);
        assert!(patch.contains("+++ b/kept.txt"), "{patch}");
        assert!(!patch.contains("build.tmp"), "{patch}");
    }

    #[test]
    fn the_host_writes_nothing_into_its_repository_whatever_its_index_settings() {
        let t = tempfile::tempdir().unwrap();
        let w = workspace(t.path());
        std::fs::write(w.join("a.txt"), "changed in the guest\n").unwrap();
        let host = host_with_only_the_base(t.path(), &w);
        git(&host, &["config", "core.splitIndex", "true"]);
        git(&host, &["config", "index.sparse", "true"]);
        let listing = |dir: &Path| -> Vec<String> {
            let mut v: Vec<String> = std::fs::read_dir(dir)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        };
        let git_dir = listing(&host.join(".git"));
        let objects = git(&host, &["count-objects", "-v"]);
        let (sent, _) = run_sh(
            &w,
            &rebuild_script(&rebuild::Want::Patch),
            std::env::var_os("PATH").unwrap(),
        );
        let patch = on_host(&sent, &w, &host).unwrap();
        assert!(
            String::from_utf8_lossy(&patch).contains("+changed in the guest"),
            "{}",
            String::from_utf8_lossy(&patch)
        );
        assert_eq!(listing(&host.join(".git")), git_dir);
        assert_eq!(git(&host, &["count-objects", "-v"]), objects);
    }

    #[test]
    fn apply_on_the_host_gets_prepares_snapshot_of_a_dirty_host_tree_in_a_bundle() {
        let t = tempfile::tempdir().unwrap();
        let w = workspace(t.path());
        // Prepare's snapshot: the host's uncommitted a.txt, as a commit
        // only the guest has.
        std::fs::write(w.join("a.txt"), "dirty on the host\n").unwrap();
        git(&w, &["add", "a.txt"]);
        let tree = String::from_utf8(git(&w, &["write-tree"])).unwrap();
        let snap = git(
            &w,
            &["commit-tree", tree.trim(), "-p", "HEAD", "-m", "snapshot"],
        );
        let snap = String::from_utf8(snap).unwrap();
        git(&w, &["update-ref", "refs/banger/prepared", snap.trim()]);
        // The guest's work on top.
        std::fs::write(w.join("a.txt"), "dirty on the host\nand the guest\n").unwrap();
        let host = host_with_only_the_base(t.path(), &w);
        let want = rebuild::Want::Apply;
        let (sent, _) = run_sh(
            &w,
            &rebuild_script(&want),
            std::env::var_os("PATH").unwrap(),
        );
        let scratch = tempfile::tempdir().unwrap();
        let built =
            rebuild::rebuild(&sent[..], |_| Ok(host.clone()), scratch.path(), &want).unwrap();
        let rebuild::Rebuilt::Apply {
            changes, raw_bytes, ..
        } = built
        else {
            panic!("{built:?}");
        };
        let made = std::fs::read(changes).unwrap();
        let (raw, patch) = made.split_at(raw_bytes as usize);
        let old =
            String::from_utf8(git(&w, &["rev-parse", &format!("{}:a.txt", snap.trim())])).unwrap();
        assert!(
            String::from_utf8_lossy(raw).contains(&format!(" {} ", old.trim())),
            "{raw:?}"
        );
        assert!(
            String::from_utf8_lossy(patch).contains(" dirty on the host\n+and the guest\n"),
            "{}",
            String::from_utf8_lossy(patch)
        );
    }

    #[test]
    fn a_branch_made_on_the_host_needs_the_guests_identity_only_for_the_rest() {
        let t = tempfile::tempdir().unwrap();
        let w = workspace(t.path());
        std::fs::write(w.join("a.txt"), "uncommitted\n").unwrap();
        // A guest git with no identity: `git var` fails.
        let path = path_with_script(
            t.path(),
            "git",
            &format!(
                "#!/bin/sh\n[ \"$1\" != var ] || exit 128\nexec {:?} \"$@\"\n",
                real_git(t.path())
            ),
        );
        for committed_only in [false, true] {
            let want = rebuild::Want::Branch {
                committed_only,
                message: "m".into(),
            };
            let out = std::process::Command::new("sh")
                .args(["-c", &rebuild_script(&want), "sh"])
                .arg(&w)
                .env("PATH", &path)
                .env(
                    "BANGER_COMMITTED_ONLY",
                    if committed_only { "1" } else { "0" },
                )
                .output()
                .unwrap();
            assert!(out.status.success(), "{out:?}");
            let scratch = tempfile::tempdir().unwrap();
            let built = rebuild::rebuild(&out.stdout[..], |_| Ok(w.clone()), scratch.path(), &want);
            if committed_only {
                assert!(
                    matches!(built, Ok(rebuild::Rebuilt::Branch { .. })),
                    "{built:?}"
                );
            } else {
                let err = built.unwrap_err().to_string();
                assert!(
                    err.contains("no identity") && err.contains("--committed-only"),
                    "{err}"
                );
            }
        }
    }

    #[test]
    fn the_prelude_reads_the_commits_loose_packed_or_detached() {
        let t = tempfile::tempdir().unwrap();
        let w = workspace(t.path());
        let rev = |r: &str| {
            String::from_utf8(git(&w, &["rev-parse", r]))
                .unwrap()
                .trim()
                .to_owned()
        };
        let base = rev("HEAD");
        git(&w, &["update-ref", "refs/banger/prepared", &base]);
        git(&w, &["commit", "-q", "--allow-empty", "-m", "guest"]);
        let head = rev("HEAD");
        let commits = |w: &Path| {
            let (_, stderr) = run_sh(
                w,
                &rebuild_script(&rebuild::Want::Patch),
                std::env::var_os("PATH").unwrap(),
            );
            let m = meta(&stderr).unwrap();
            (m.base, m.tip)
        };
        assert_eq!(commits(&w), (base.clone(), head.clone()));
        // After a `git gc`: no loose ref file.
        git(&w, &["pack-refs", "--all", "--prune"]);
        assert!(!w.join(".git/refs/banger/base").exists());
        assert_eq!(commits(&w), (base.clone(), head.clone()));
        // A detached HEAD names its commit itself.
        git(&w, &["checkout", "-q", "--detach", &base]);
        assert_eq!(commits(&w), (base.clone(), base));
    }

    #[test]
    fn a_guest_tar_that_cannot_send_the_files_leaves_the_diff_to_the_guest() {
        let t = tempfile::tempdir().unwrap();
        let w = workspace(t.path());
        std::fs::write(w.join("a.txt"), "changed\n").unwrap();
        // busybox's tar, which knows none of GNU tar's long options.
        let path = path_with_script(
            t.path(),
            "tar",
            "#!/bin/sh\necho \"tar: unrecognized option '--no-recursion'\" >&2\nexit 1\n",
        );
        let out = std::process::Command::new("sh")
            .args(["-c", &rebuild_script(&rebuild::Want::Patch), "sh"])
            .arg(&w)
            .env("PATH", path)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(rebuild::TAR_FAILED));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("unrecognized option"),
            "{out:?}"
        );
    }

    #[test]
    fn the_host_refuses_a_stream_that_is_not_what_the_guest_script_writes() {
        let t = tempfile::tempdir().unwrap();
        let w = workspace(t.path());
        std::fs::write(w.join("a.txt"), "changed\n".repeat(20_000)).unwrap();
        let base = String::from_utf8(git(&w, &["rev-parse", "HEAD"])).unwrap();
        let (sent, _) = run_sh(
            &w,
            &rebuild_script(&rebuild::Want::Patch),
            std::env::var_os("PATH").unwrap(),
        );
        let first_line = sent.iter().position(|b| *b == b'\n').unwrap() + 1;
        let mut no_listings = sent[..first_line].to_vec();
        no_listings.extend_from_slice(&[0; 1024]);
        for (stream, why) in [
            (&b"hello\n"[..], "unexpected start"),
            (&sent[..first_line], "cut short"),
            (&no_listings, "cut short"),
            // Cut inside a.txt.
            (&sent[..sent.len() / 2], "the guest's changes"),
        ] {
            let scratch = tempfile::tempdir().unwrap();
            let err = rebuild::rebuild(
                stream,
                |_| Ok(w.clone()),
                scratch.path(),
                &rebuild::Want::Patch,
            )
            .unwrap_err()
            .to_string();
            assert!(err.contains(why), "{err}");
        }
        assert!(sent.starts_with(format!("banger-changes {}", base.trim()).as_bytes()));
        // A listing too big to hold: refused before it is all read.
        let mut header = tar::Header::new_gnu();
        header.set_path(".git/banger-scratch.raw").unwrap();
        header.set_size(1 << 40);
        header.set_cksum();
        let huge = std::io::Read::chain(
            std::io::Read::chain(&sent[..first_line], &header.as_bytes()[..]),
            std::io::repeat(b'x'),
        );
        let scratch = tempfile::tempdir().unwrap();
        let err = rebuild::rebuild(
            huge,
            |_| Ok(w.clone()),
            scratch.path(),
            &rebuild::Want::Patch,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains(".git/banger-scratch.raw is over 256 MiB"),
            "{err}"
        );
    }

    /// An export script run with no workspace named, `list` as the guest's
    /// list of them.
    fn run_implicit(list: &Path) -> std::process::Output {
        std::process::Command::new("sh")
            .args([
                "-c",
                &export_script(&ExportTarget::Patch { file: "/x".into() }),
                "sh",
                "",
            ])
            .env("BANGER_WORKSPACE_LIST", list)
            .output()
            .unwrap()
    }

    #[test]
    fn with_no_workspace_named_the_script_picks_the_only_one() {
        let t = tempfile::tempdir().unwrap();
        let w = workspace(t.path());
        let list = t.path().join("workspaces");
        let ws = |v: &[&Path]| {
            let lines: String = v.iter().map(|p| format!("{}\n", p.display())).collect();
            std::fs::write(&list, lines).unwrap();
        };
        let code = |out: &std::process::Output| out.status.code();

        // No list, an empty one, or only a directory that is gone or no
        // longer a workspace: exit 4.
        assert_eq!(code(&run_implicit(&list)), Some(4));
        ws(&[]);
        assert_eq!(code(&run_implicit(&list)), Some(4));
        let gone = t.path().join("gone");
        ws(&[&gone]);
        assert_eq!(code(&run_implicit(&list)), Some(4));
        let plain = t.path().join("plain");
        git(t.path(), &["init", "-q", plain.to_str().unwrap()]);
        ws(&[&plain]);
        assert_eq!(code(&run_implicit(&list)), Some(4));

        // One that still is a workspace among stale ones: that one.
        ws(&[&gone, &w, &plain]);
        let out = run_implicit(&list);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        assert_eq!(meta(&stderr).unwrap().dest, w.display().to_string());

        // Two: exit 5, both listed.
        let w2 = t.path().join("second");
        std::fs::create_dir(&w2).unwrap();
        let w2 = workspace(&w2);
        ws(&[&w, &gone, &w2]);
        let out = run_implicit(&list);
        assert_eq!(code(&out), Some(5));
        assert_eq!(
            String::from_utf8_lossy(&out.stderr),
            format!("{}\n{}\n", w.display(), w2.display())
        );
    }

    #[test]
    fn exits_4_and_5_are_told_in_terms_of_the_vm() {
        let ran = |code, stderr: &str| guest::Ran {
            status: ExitStatus::Code(code),
            stdout: Vec::new(),
            stdout_bytes: 0,
            stderr: stderr.to_owned(),
        };
        let none = failure(&ran(4, ""), "box", "exporting").to_string();
        assert!(
            none.contains(
                "VM \"box\" has no workspace: make one with banger workspace prepare box"
            ),
            "{none}"
        );
        let many = failure(&ran(5, "/root/a\n/root/b\n"), "box", "exporting").to_string();
        assert!(
            many.contains("has 2 workspaces (/root/a, /root/b): say which with --dest"),
            "{many}"
        );
        let other = failure(&ran(1, "fatal: bad"), "box", "exporting").to_string();
        assert!(
            other.contains("exporting failed in the guest: fatal: bad"),
            "{other}"
        );
    }
}
