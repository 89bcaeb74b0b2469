//! `workspace.export` and `workspace.status`: the guest's work since
//! prepare, read by `git` in the guest; the host only writes a patch file,
//! fetches a bundle into a new branch, or applies a patch to its tree.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use banger_agent_proto::AgentClient;
use banger_rpc::EventSink;
use banger_wire::OpId;
use banger_wire::methods::{
    ExportTarget, WorkspaceExportParams, WorkspaceExportResult, WorkspaceStatusParams,
    WorkspaceStatusResult,
};

use super::guest::{self, Out};
use super::repo;
use super::{WorkspaceError, WorkspaceService, check_dest};
use crate::ops::OpKind;

/// The workspaces prepare recorded that still are workspaces, one a line.
const LIST: &str = r#"[ -f /root/.banger/workspaces ] || exit 0
while IFS= read -r d; do
	git -C "$d" rev-parse -q --verify refs/banger/base >/dev/null 2>&1 && echo "$d"
done </root/.banger/workspaces
"#;

/// Shared start of export and status: `$base`, `$prepared`, `$head`, and
/// `$tip`: HEAD, or a commit of the uncommitted rest on top of it (made
/// with a scratch index: the guest's own index and branch are untouched).
const TIP: &str = r#"set -eu
cd "$1" 2>/dev/null || {
	echo "$1 is not a banger workspace (no such directory)" >&2
	exit 3
}
base=$(git rev-parse -q --verify refs/banger/base) || {
	echo "$1 is not a banger workspace" >&2
	exit 3
}
prepared=$(git rev-parse -q --verify refs/banger/prepared || echo "$base")
head=$(git rev-parse -q --verify HEAD || echo "$base")
idx=$(mktemp)
trap 'rm -f "$idx"' EXIT
[ ! -f .git/index ] || cp .git/index "$idx"
GIT_INDEX_FILE=$idx git add -A
tree=$(GIT_INDEX_FILE=$idx git write-tree)
if [ "${BANGER_COMMITTED_ONLY:-0}" = 1 ] || [ "$tree" = "$(git rev-parse "$head^{tree}")" ]; then
	tip=$head
else
	tip=$(git commit-tree "$tree" -p "$head" -m "${BANGER_MESSAGE:-banger: uncommitted changes}")
fi
git update-ref refs/banger/export "$tip"
"#;

/// The workspace `dest` names, or the VM's only one.
async fn pick(agent: &AgentClient, vm: &str, dest: Option<&str>) -> Result<String, WorkspaceError> {
    if let Some(d) = dest {
        return check_dest(d);
    }
    let ran = guest::run(agent, LIST, &[], BTreeMap::new(), None, Out::Memory).await?;
    if !ran.ok() {
        return Err(ran.failure("listing the workspaces"));
    }
    let all: Vec<String> = ran.text().lines().map(str::to_owned).collect();
    match all.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(WorkspaceError::NotFound(format!(
            "VM {vm:?} has no workspace: make one with banger workspace prepare {vm} [PATH]"
        ))),
        many => Err(WorkspaceError::Invalid(format!(
            "VM {vm:?} has {} workspaces ({}): say which with --dest",
            many.len(),
            many.join(", ")
        ))),
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
        let vm_name = vm.name.clone();
        self.ops
            .run(op_id, OpKind::WorkspaceExport, &vm.name, events, move |op| async move {
                let _held = lock.lock_owned().await;
                op.stage("read the guest");
                let dest = pick(&agent, &vm_name, p.dest.as_deref()).await?;
                let (apply_mode, committed_only) = match &p.target {
                    ExportTarget::Patch { .. } => (false, false),
                    ExportTarget::Branch { committed_only, .. } => (false, *committed_only),
                    ExportTarget::Apply => (true, false),
                };
                // The commits, the host repository recorded, and how many
                // files changed since the base (patch, branch) or since
                // prepare (apply).
                let script = format!(
                    "{TIP}\nfrom=$base; [ \"$2\" = apply ] && from=$prepared\n\
                     echo \"$tip\"; echo \"$base\"; echo \"$prepared\"\n\
                     git config --get banger.hostpath || echo\n\
                     git diff --name-only -z --no-renames \"$from\" \"$tip\" | tr -cd '\\000' | wc -c"
                );
                let env = BTreeMap::from([
                    ("BANGER_COMMITTED_ONLY".to_owned(), if committed_only { "1" } else { "0" }.to_owned()),
                    ("BANGER_MESSAGE".to_owned(), format!("Uncommitted changes from banger VM {vm_name}")),
                ]);
                let mode = if apply_mode { "apply" } else { "other" };
                let ran = guest::run(&agent, &script, &[&dest, mode], env, None, Out::Memory).await?;
                if !ran.ok() {
                    return Err(ran.failure("reading the workspace"));
                }
                let text = ran.text();
                let l: Vec<&str> = text.lines().collect();
                let [tip, base, prepared, recorded, files_changed] = l.as_slice() else {
                    return Err(WorkspaceError::Guest(format!("unexpected answer from the guest: {text:?}")));
                };
                let (tip, base, prepared) = (tip.to_string(), base.to_string(), prepared.to_string());
                let files_changed: u64 = files_changed.trim().parse().unwrap_or(0);
                let top = match &p.path {
                    Some(path) => {
                        let path = PathBuf::from(path);
                        tokio::task::spawn_blocking(move || repo::top_level(&path))
                            .await
                            .map_err(|e| WorkspaceError::Host(e.to_string()))??
                    }
                    None if !recorded.is_empty() => PathBuf::from(recorded),
                    None => {
                        return Err(WorkspaceError::Invalid(format!(
                            "{dest} records no host repository: give its path"
                        )));
                    }
                };
                op.stage("fetch");
                let out_file = scratch.path().join("out");
                let out_script = match &p.target {
                    // From the base commit: applies to a clean checkout of it.
                    ExportTarget::Patch { .. } => "git -C \"$1\" diff --binary --full-index -M \"$2\" \"$3\"",
                    // From what prepare sent: what the host's tree had then.
                    ExportTarget::Apply => "git -C \"$1\" diff --binary --full-index --no-renames \"$2\" \"$3\"",
                    ExportTarget::Branch { .. } => "[ \"$2\" = \"$3\" ] || git -C \"$1\" bundle create --quiet - refs/banger/export \"^$2\"",
                };
                let from = if apply_mode { &prepared } else { &base };
                let ran = guest::run(&agent, out_script, &[&dest, from, &tip], BTreeMap::new(), None, Out::File(&out_file)).await?;
                if !ran.ok() {
                    return Err(ran.failure("exporting the workspace"));
                }
                let bytes = ran.stdout_bytes;
                op.progress(format!("{files_changed} files changed, {bytes} bytes"));
                op.stage("write on the host");
                let umask = p.umask.unwrap_or(0o022);
                let written = match p.target {
                    ExportTarget::Patch { file } => {
                        std::fs::copy(&out_file, &file)
                            .and_then(|_| {
                                use std::os::unix::fs::PermissionsExt;
                                std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o666 & !umask))
                            })
                            .map_err(|e| WorkspaceError::Host(format!("cannot write {file}: {e}")))?;
                        file
                    }
                    ExportTarget::Apply => {
                        let raw = guest::run(
                            &agent,
                            "git -C \"$1\" diff --raw -z --no-abbrev --no-renames \"$2\" \"$3\"",
                            &[&dest, &prepared, &tip],
                            BTreeMap::new(),
                            None,
                            Out::Memory,
                        )
                        .await?;
                        if !raw.ok() {
                            return Err(raw.failure("listing the changes"));
                        }
                        let (top2, out2, raw) = (top.clone(), out_file.clone(), raw.stdout);
                        tokio::task::spawn_blocking(move || apply(&top2, &out2, &raw, umask))
                            .await
                            .map_err(|e| WorkspaceError::Host(e.to_string()))??;
                        top.display().to_string()
                    }
                    ExportTarget::Branch { name, force, .. } => {
                        let (top2, out2, name2) = (top.clone(), out_file.clone(), name.clone());
                        tokio::task::spawn_blocking(move || fetch_branch(&top2, &out2, &name2, force, bytes, umask))
                            .await
                            .map_err(|e| WorkspaceError::Host(e.to_string()))??;
                        name
                    }
                };
                drop(scratch);
                Ok(WorkspaceExportResult {
                    dest,
                    host_path: top.display().to_string(),
                    tip,
                    files_changed,
                    bytes,
                    written,
                })
            })
            .await
    }

    pub async fn status(
        &self,
        p: WorkspaceStatusParams,
    ) -> Result<WorkspaceStatusResult, WorkspaceError> {
        let (vm, agent) = self.vms.guest(&p.vm).await?;
        let _held = self.lock_for(&vm.id).lock_owned().await;
        let dest = pick(&agent, &vm.name, p.dest.as_deref()).await?;
        let script = format!(
            "{TIP}\necho \"$base\"; echo \"$prepared\"; echo \"$head\"\n\
             git config --get banger.hostpath || echo\n\
             git rev-list --count \"$base..$head\"\n\
             du -sk . | cut -f1\n\
             git diff --name-status --no-renames \"$prepared\" \"$tip\""
        );
        let ran = guest::run(
            &agent,
            &script,
            &[&dest],
            BTreeMap::new(),
            None,
            Out::Memory,
        )
        .await?;
        if !ran.ok() {
            return Err(ran.failure("reading the workspace"));
        }
        let text = ran.text();
        let mut lines = text.lines();
        let mut next = || lines.next().unwrap_or_default().to_owned();
        let (base_commit, prepared_commit, head_commit, host_path) =
            (next(), next(), next(), next());
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

/// Apply the guest's changes since prepare to the host's working tree,
/// after checking that each file they touch is still what prepare sent
/// (`raw`: `git diff --raw -z` from the guest). Returns the files changed.
fn apply(top: &Path, patch: &Path, raw: &[u8], umask: u32) -> Result<u64, WorkspaceError> {
    let raw = String::from_utf8_lossy(raw);
    let mut conflicts = Vec::new();
    let mut n = 0u64;
    let mut fields = raw.split('\0');
    while let Some(meta) = fields.next() {
        let meta = meta.trim_start_matches('\n');
        if meta.is_empty() {
            continue;
        }
        let Some(path) = fields.next() else { break };
        // ":100644 100644 <old> <new> M"
        let parts: Vec<&str> = meta.trim_start_matches(':').split(' ').collect();
        let (old_mode, old) = match parts.as_slice() {
            [om, _, o, ..] => (*om, *o),
            _ => continue,
        };
        n += 1;
        let full = top.join(path);
        let now = std::fs::symlink_metadata(&full);
        let absent = old.bytes().all(|b| b == b'0');
        let same = match (&now, absent) {
            (Err(_), true) => true,
            (Ok(_), true) | (Err(_), false) => false,
            (Ok(m), false) => {
                let blob = if m.file_type().is_symlink() {
                    std::fs::read_link(&full)
                        .ok()
                        .and_then(|t| hash_stdin(top, t.as_os_str().as_encoded_bytes()))
                } else {
                    repo::git(top, &["hash-object", "--", path], &[])
                        .ok()
                        .map(|o| String::from_utf8_lossy(&o).trim().to_owned())
                };
                blob.as_deref() == Some(old) && (old_mode == "120000") == m.file_type().is_symlink()
            }
        };
        if !same {
            conflicts.push(path.to_owned());
        }
    }
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

fn hash_stdin(top: &Path, data: &[u8]) -> Option<String> {
    use std::io::Write;
    let mut child = std::process::Command::new("git")
        .arg("-C")
        .arg(top)
        .args(["hash-object", "--stdin"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .ok()?;
    child.stdin.take()?.write_all(data).ok()?;
    let out = child.wait_with_output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Fetch the bundle's `refs/banger/export` into branch `name`: a fetch
/// into a ref, so the working tree, the index and the current branch stay
/// as they are (git refuses to fetch into the checked-out branch).
fn fetch_branch(
    top: &Path,
    bundle: &Path,
    name: &str,
    force: bool,
    bytes: u64,
    umask: u32,
) -> Result<(), WorkspaceError> {
    if bytes == 0 {
        return Err(WorkspaceError::Invalid(
            "nothing to export: the guest has no change since the base commit".into(),
        ));
    }
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
}
