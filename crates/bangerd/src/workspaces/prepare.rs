//! `workspace.prepare`: the host's working tree into the guest, whole or
//! not at all.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use banger_rpc::EventSink;
use banger_wire::OpId;
use banger_wire::methods::{WorkspaceInfo, WorkspacePrepareParams};
use tokio::sync::mpsc;

use super::guest::{self, Out};
use super::repo::{self, Sent};
use super::{WorkspaceError, WorkspaceService, check_dest};
use crate::ops::OpKind;

/// Checks the guest can take the workspace: `git` and `tar` are there,
/// and the free space of the destination's filesystem (KiB, printed).
///
/// This script and [`UNPACK`] run a process only where a shell builtin
/// cannot do the work: each costs a guest without KVM about 0.1 s, and
/// `vm run --workspace` waits for both.
const PREFLIGHT: &str = r#"set -eu
dest=$1
for t in git tar; do
	command -v "$t" >/dev/null 2>&1 || {
		echo "$t is not installed in the guest: use an image that has it (banger's default image does)" >&2
		exit 3
	}
done
[ -d "${dest%/*}" ] || mkdir -p "${dest%/*}"
df -Pk "${dest%/*}" | { read -r _; read -r _ _ _ free _; echo "$free"; }
"#;

/// Unpacks the stream next to the destination, records where it came
/// from, then swaps it into place: until the last step the previous
/// workspace is untouched, and a prepare cut short leaves only a
/// `.banger-prepare-*` directory the next prepare removes.
///
/// banger's refs come in the stream (the `prepared` ref last, the mark of
/// a whole stream); git's settings are appended to `.git/config` by the
/// shell. The index is the host's: its inodes and ctimes are not these
/// files', so files are compared by size and mtime (kept by tar) only,
/// and unchanged ones are never hashed again by git in the guest (else the
/// first git status or export reads the whole tree). The commit identity
/// is the host's unless the guest's git has one. `BANGER_GIT_USER` is
/// that `[user]` section, quoted for a config file by the host.
pub(super) const UNPACK: &str = r#"set -eu
dest=$1
parent=${dest%/*}
name=${dest##*/}
for f in "$parent/.banger-prepare-$name".*; do
	[ ! -e "$f" ] || rm -rf "$parent/.banger-prepare-$name".*
	break
done
tmp=$(mktemp -d "$parent/.banger-prepare-$name.XXXXXX")
trap '[ ! -e "$tmp" ] || rm -rf "$tmp"' EXIT
tar -x --no-same-owner -f - -C "$tmp"
cd "$tmp"
[ -f .git/refs/banger/prepared ] || {
	echo "the stream from the host was cut short" >&2
	exit 4
}
printf '[core]\n\tcheckStat = minimal\n\ttrustctime = false\n' >>.git/config
case $(git config --name-only --get-regexp '^user\.(name|email)$' || true) in
*user.name*user.email* | *user.email*user.name*) ;;
*) printf '%s\n' "$BANGER_GIT_USER" >>.git/config ;;
esac
cd /
if [ -e "$dest" ]; then mv "$dest" "$tmp.old"; fi
mv "$tmp" "$dest"
[ ! -e "$tmp.old" ] || rm -rf "$tmp.old"
list=$BANGER_WORKSPACE_LIST
[ -d "${list%/*}" ] || mkdir -p "${list%/*}"
listed=
[ ! -f "$list" ] || while IFS= read -r d; do [ "$d" != "$dest" ] || listed=1; done <"$list"
[ -n "$listed" ] || printf '%s\n' "$dest" >>"$list"
"#;

/// The `[user]` section of the host's commit identity, as a git config
/// file holds it: each value quoted, with `\` and `"` escaped (a name may
/// hold either) and line breaks, which no config value can hold, as spaces.
pub(super) fn user_section(name: &str, email: &str) -> String {
    let quote = |v: &str| {
        let mut q = String::from("\"");
        for c in v.chars() {
            match c {
                '\\' | '"' => {
                    q.push('\\');
                    q.push(c);
                }
                '\n' | '\r' => q.push(' '),
                c => q.push(c),
            }
        }
        q.push('"');
        q
    };
    format!(
        "[user]\n\tname = {}\n\temail = {}",
        quote(name),
        quote(email)
    )
}

/// Room the guest keeps free beyond the workspace itself.
const SPARE_BYTES: u64 = 64 << 20;
/// How often progress is reported while sending.
const PROGRESS_EVERY: Duration = Duration::from_millis(500);

impl WorkspaceService {
    pub async fn prepare(
        &self,
        op_id: &OpId,
        p: WorkspacePrepareParams,
        events: &EventSink,
    ) -> Result<WorkspaceInfo, WorkspaceError> {
        let path = PathBuf::from(&p.path);
        if !path.is_absolute() {
            return Err(WorkspaceError::Invalid(format!(
                "the repository path {:?} is not absolute",
                p.path
            )));
        }
        let top = tokio::task::spawn_blocking(move || repo::top_level(&path))
            .await
            .map_err(|e| WorkspaceError::Host(e.to_string()))??;
        let dest = match &p.dest {
            Some(d) => check_dest(d)?,
            None => {
                let name = top.file_name().and_then(|n| n.to_str()).ok_or_else(|| {
                    WorkspaceError::Invalid(format!(
                        "the repository's directory name {} is not UTF-8: give --dest",
                        top.display()
                    ))
                })?;
                check_dest(&format!("/root/{name}"))?
            }
        };
        // The VM's state, read once: no busy mark is taken.
        let (vm, agent) = self.vms.guest(&p.vm).await?;
        let lock = self.lock_for(&vm.id);
        let scratch = self.scratch_dir()?;
        let (include_ignored, depth) = (p.include_ignored, p.depth);
        let (vm_name, vm_id, store) = (vm.name.clone(), vm.id.clone(), self.store.clone());
        self.ops
            .run(op_id, OpKind::WorkspacePrepare, &vm.name, events, move |op| async move {
                let _held = lock.lock_owned().await;
                op.stage("scan");
                let scratch_path = scratch.path().to_owned();
                let (scan, prepared, objects, identity) = tokio::task::spawn_blocking(move || {
                    let scan = repo::scan(&top, include_ignored, depth, &scratch_path)?;
                    let (prepared, objects) = repo::snapshot(&scan, &scratch_path)?;
                    let identity = |key: &str, or: &str| {
                        repo::git(&scan.top, &["config", key], &[])
                            .ok()
                            .map(|o| String::from_utf8_lossy(&o).trim().to_owned())
                            .filter(|s| !s.is_empty())
                            .unwrap_or_else(|| or.to_owned())
                    };
                    let who = (identity("user.name", "banger"), identity("user.email", "banger@localhost"));
                    Ok::<_, WorkspaceError>((scan, prepared, objects, who))
                })
                .await
                .map_err(|e| WorkspaceError::Host(e.to_string()))??;
                let objects_bytes: u64 = objects
                    .iter()
                    .filter_map(|(_, p)| std::fs::metadata(p).ok())
                    .map(|m| m.len())
                    .sum();
                op.progress(format!(
                    "{} files, {} working tree, {} of git history{}",
                    scan.files,
                    mib(scan.bytes),
                    mib(scan.git_bytes),
                    if prepared == scan.base {
                        String::new()
                    } else {
                        " (with uncommitted changes)".into()
                    }
                ));

                op.stage("check guest");
                let pre = guest::run(&agent, PREFLIGHT, &[&dest], BTreeMap::new(), None, Out::Memory).await?;
                if !pre.ok() {
                    return Err(pre.failure("checking the guest"));
                }
                let free: u64 = pre.text().trim().parse::<u64>().map_err(|_| {
                    WorkspaceError::Guest(format!("cannot read the guest's free space from {:?}", pre.text()))
                })? * 1024;
                let need = scan.bytes + scan.git_bytes + objects_bytes + SPARE_BYTES;
                if free < need {
                    return Err(WorkspaceError::Invalid(format!(
                        "the workspace needs {} in the guest but {} has {} free: stop the VM and grow its disk (banger vm set {vm_name} --disk MIB), or prepare without --include-ignored",
                        mib(need),
                        dest.rsplit_once('/').map(|(d, _)| if d.is_empty() { "/" } else { d }).unwrap_or("/"),
                        mib(free)
                    )));
                }

                op.stage("send");
                let started = Instant::now();
                let sent = Arc::new(Sent::default());
                let (tx, rx) = mpsc::channel(8);
                let scan = Arc::new(scan);
                let writer = {
                    let (scan, sent) = (scan.clone(), sent.clone());
                    let prepared = prepared.clone();
                    tokio::task::spawn_blocking(move || {
                        repo::write_tar(&scan, &prepared, &objects, tx, sent)
                    })
                };
                let ticker = {
                    let (op, sent) = (op.clone(), sent.clone());
                    let total = scan.bytes + scan.git_bytes + objects_bytes;
                    let files = scan.files;
                    tokio::spawn(async move {
                        loop {
                            tokio::time::sleep(PROGRESS_EVERY).await;
                            let bytes = sent.bytes.load(Ordering::Relaxed);
                            let secs = started.elapsed().as_secs_f64().max(0.001);
                            op.progress(format!(
                                "{} of {} files, {} of {}, {:.1} MiB/s",
                                sent.files.load(Ordering::Relaxed).min(files),
                                files,
                                mib(bytes),
                                mib(total),
                                bytes as f64 / secs / f64::from(1 << 20)
                            ));
                        }
                    })
                };
                let env = BTreeMap::from([
                    (
                        "BANGER_WORKSPACE_LIST".to_owned(),
                        super::WORKSPACE_LIST.to_owned(),
                    ),
                    ("BANGER_GIT_USER".to_owned(), user_section(&identity.0, &identity.1)),
                ]);
                // A cancel drops the guest command: the agent kills its
                // process group before the swap, so the old copy stays.
                let args = [dest.as_str()];
                let ran = tokio::select! {
                    ran = guest::run(&agent, UNPACK, &args, env, Some(rx), Out::Memory) => ran,
                    () = op.cancelled() => Err(WorkspaceError::Cancelled(format!(
                        "the prepare of {dest} was cancelled; the previous workspace there is as it was"
                    ))),
                };
                ticker.abort();
                let wrote = writer.await.map_err(|e| WorkspaceError::Host(e.to_string()))?;
                let ran = ran?;
                // The host's failure first: it is why the guest's tar
                // stopped, or why it refused the stream as cut short.
                if !ran.ok() || wrote.is_err() {
                    wrote.map_err(|e| WorkspaceError::Host(format!("cannot read the working tree: {e}")))?;
                    return Err(ran.failure("unpacking the workspace"));
                }
                let secs = started.elapsed().as_secs_f64().max(0.001);
                let bytes = sent.bytes.load(Ordering::Relaxed);
                op.progress(format!(
                    "{} files, {} in {:.1}s ({:.0} files/s, {:.1} MiB/s)",
                    scan.files,
                    mib(bytes),
                    secs,
                    scan.files as f64 / secs,
                    bytes as f64 / secs / f64::from(1 << 20)
                ));
                // Export writes here when not told where: the daemon's
                // record, never the guest's word.
                store.set_vm_workspace(&vm_id, &dest, &scan.top.display().to_string())?;
                drop(scratch);
                Ok(WorkspaceInfo {
                    vm: vm_name,
                    dest,
                    host_path: scan.top.display().to_string(),
                    base_commit: scan.base.clone(),
                    prepared_commit: prepared,
                    files: scan.files,
                    bytes: scan.bytes,
                    git_bytes: scan.git_bytes,
                })
            })
            .await
    }
}

pub(super) fn mib(bytes: u64) -> String {
    if bytes < 1 << 20 {
        format!("{:.1} KiB", bytes as f64 / 1024.0)
    } else {
        format!("{:.1} MiB", bytes as f64 / f64::from(1 << 20))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_guest_checks_the_streams_end_mark() {
        assert!(super::UNPACK.contains(&format!("[ -f {} ]", super::repo::STREAM_END)));
    }
}
