//! Building an image directory from a recipe.
//!
//! Stages: resolve the mirror, install the recipe's npm packages on the host
//! (`npm ci`, when it has `[npm]`), bootstrap the tree (mmdebstrap, or
//! debootstrap as a root-only fallback), customize it (inside mmdebstrap's
//! customize hooks, so the same steps work in `--mode=unshare`), take the
//! kernel out of it, build the initramfs, make `rootfs.ext4` from the tree,
//! make the work seed, hash everything into the manifest and rename the
//! finished directory into place. Everything is built in a hidden staging
//! directory beside the destination; any failure, cancellation or panic
//! removes it and the tree.

use std::fmt;
use std::io::{BufWriter, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use crate::command::{CommandError, CommandRunner, HostCommand, SystemRunner};
use crate::initramfs::{InitramfsError, build_initramfs};
use crate::kernel::{KernelError, extract_vmlinux};
use crate::manifest::{
    self, FileDigest, INITRD, ImageManifest, MANIFEST_FORMAT, ManifestError, ROOTFS, VMLINUX,
    VMLINUZ, WORK_SEED, digest_file,
};
use crate::mirror::find_debian_mirror;
use crate::recipe::{Npm, Recipe, npm_project};
use crate::scratch::{ScratchError, ScratchSpace};

use banger_agent_proto::guest::{
    AGENT_GUEST_PATH, SYSTEMD_UNIT, SYSTEMD_UNIT_NAME, SYSTEMD_UNIT_PATH, UDEV_RULE, UDEV_RULE_PATH,
};

/// Printed by the customize script first; marks the end of the bootstrap.
const CUSTOMIZE_MARKER: &str = "banger-image: customize";
/// Printed by the customize script last.
const CUSTOMIZE_DONE_MARKER: &str = "banger-image: customize done";
/// Kind of the scratch directories builds make (see [`ScratchSpace`]).
const WORK_KIND: &str = "banger-image";
/// Lines of command output kept for error messages.
const TAIL_LINES: usize = 25;

/// Build inputs besides the recipe.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// The image directory to create. Must not exist; its parent is created.
    pub dest_dir: PathBuf,
    /// The `banger-agent` binary to install in the guest.
    pub agent_bin: PathBuf,
    /// Debian mirror URL; default: the host's APT mirror, else the recipe's.
    pub mirror: Option<String>,
    /// Scratch space for the root tree (about 1 GiB while building).
    pub scratch: ScratchSpace,
    /// Set to true to stop the build; it then fails with `Cancelled` and
    /// leaves nothing behind.
    pub cancel: Option<Arc<AtomicBool>>,
}

/// The steps of a build, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    ResolveMirror,
    /// Only for recipes with `[npm]`.
    Npm,
    Bootstrap,
    Customize,
    Kernel,
    Initramfs,
    RootfsExt4,
    WorkSeed,
    Manifest,
}

impl Stage {
    pub const ALL: [Stage; 9] = [
        Stage::ResolveMirror,
        Stage::Npm,
        Stage::Bootstrap,
        Stage::Customize,
        Stage::Kernel,
        Stage::Initramfs,
        Stage::RootfsExt4,
        Stage::WorkSeed,
        Stage::Manifest,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Stage::ResolveMirror => "resolve-mirror",
            Stage::Npm => "npm",
            Stage::Bootstrap => "bootstrap",
            Stage::Customize => "customize",
            Stage::Kernel => "kernel",
            Stage::Initramfs => "initramfs",
            Stage::RootfsExt4 => "rootfs-ext4",
            Stage::WorkSeed => "work-seed",
            Stage::Manifest => "manifest",
        }
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Progress reported while building.
#[derive(Debug, Clone, PartialEq)]
pub enum StageEvent {
    Started {
        stage: Stage,
    },
    /// A line printed by a command the stage runs.
    Output {
        stage: Stage,
        line: String,
    },
    /// A fact worth showing (the mirror chosen, sizes).
    Note {
        stage: Stage,
        message: String,
    },
    Finished {
        stage: Stage,
        elapsed: Duration,
    },
}

/// Why a build failed. Nothing is left behind in any case.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("agent binary {0} is not a file")]
    AgentMissing(PathBuf),
    #[error("{0}: paths with whitespace cannot be passed to mmdebstrap hooks")]
    WhitespaceInPath(PathBuf),
    #[error("{0} already exists (images are never modified: build into a new directory)")]
    DestinationExists(PathBuf),
    #[error("destination {0} needs a parent directory and a name")]
    BadDestination(PathBuf),
    #[error("neither mmdebstrap nor debootstrap is installed (apt install mmdebstrap)")]
    NoBootstrapTool,
    #[error(
        "only debootstrap is installed and it needs root: install mmdebstrap to build unprivileged"
    )]
    NeedsRoot,
    #[error("{tool} is not installed (apt install {package})")]
    MissingTool {
        tool: &'static str,
        package: &'static str,
    },
    #[error("{stage} failed running {command}; last output:\n{}", tail.join("\n"))]
    Command {
        stage: Stage,
        command: String,
        tail: Vec<String>,
        #[source]
        source: CommandError,
    },
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the bootstrapped tree is unusable: {0}")]
    Tree(String),
    #[error("the tree needs about {needed_mib} MiB but rootfs_size_mib is {size_mib}")]
    RootfsTooSmall { needed_mib: u64, size_mib: u64 },
    #[error("the tree's /root needs about {needed_mib} MiB but work_seed_size_mib is {size_mib}")]
    WorkSeedTooSmall { needed_mib: u64, size_mib: u64 },
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error(transparent)]
    Initramfs(#[from] InitramfsError),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    Scratch(#[from] ScratchError),
    #[error("cannot remove {path}: {detail}")]
    Cleanup { path: PathBuf, detail: String },
    #[error("build cancelled")]
    Cancelled,
}

fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> BuildError {
    let context = context.into();
    move |source| BuildError::Io { context, source }
}

/// Builds `recipe` into `opts.dest_dir`, running the host tools for real.
/// Blocking: run it on a blocking thread.
pub fn build_image(
    recipe: &Recipe,
    opts: &BuildOptions,
    progress: &mut dyn FnMut(StageEvent),
) -> Result<ImageManifest, BuildError> {
    let mut runner = SystemRunner {
        cancel: opts.cancel.clone(),
    };
    build_image_with(&mut runner, recipe, opts, progress)
}

/// [`build_image`] with the host commands going through `runner`.
pub fn build_image_with(
    runner: &mut dyn CommandRunner,
    recipe: &Recipe,
    opts: &BuildOptions,
    progress: &mut dyn FnMut(StageEvent),
) -> Result<ImageManifest, BuildError> {
    let started = Instant::now();
    if !opts.agent_bin.is_file() {
        return Err(BuildError::AgentMissing(opts.agent_bin.clone()));
    }
    // mmdebstrap's hooks are split at whitespace.
    for path in [&opts.agent_bin, &opts.scratch.dir] {
        if path.to_string_lossy().contains(char::is_whitespace) {
            return Err(BuildError::WhitespaceInPath(path.clone()));
        }
    }
    let (parent, name) = match (opts.dest_dir.parent(), opts.dest_dir.file_name()) {
        (Some(p), Some(n)) if !p.as_os_str().is_empty() => (p, n.to_string_lossy().into_owned()),
        _ => return Err(BuildError::BadDestination(opts.dest_dir.clone())),
    };
    if opts.dest_dir.symlink_metadata().is_ok() {
        return Err(BuildError::DestinationExists(opts.dest_dir.clone()));
    }
    let tools = Tools::find(runner, recipe)?;
    std::fs::create_dir_all(parent)
        .map_err(io_err(format!("cannot create {}", parent.display())))?;

    let staging_prefix = format!(".{name}.partial-");
    sweep_stale(parent, &staging_prefix, |p| {
        std::fs::remove_dir_all(p).map_err(io_err(format!("cannot remove {}", p.display())))
    })?;
    opts.scratch
        .sweep(WORK_KIND, |p| remove_work_dir(runner, &tools, p))?;

    let pid = std::process::id();
    // Dropped (removed) on every early return; kept only once renamed.
    let staging = tempfile::Builder::new()
        .prefix(&format!("{staging_prefix}{pid}-"))
        .tempdir_in(parent)
        .map_err(io_err(format!(
            "cannot create a staging directory in {}",
            parent.display()
        )))?;
    set_mode(staging.path(), 0o755)?;
    let work = opts.scratch.create(WORK_KIND)?;
    // Others may read but never write in it: the user namespace's root
    // (unshare mode) and apt's `_apt` sandbox user must reach the tree.
    if let Err(e) = set_mode(work.path(), 0o755) {
        if std::fs::remove_dir(work.path()).is_ok() {
            work.removed();
        }
        return Err(e);
    }

    let mut ctx = RunningBuild {
        runner,
        tools: &tools,
        recipe,
        opts,
        progress,
        staging: staging.path().to_owned(),
        tree: work.path().join("tree"),
    };
    let result = ctx.run_stages(started);
    // The tree may hold files owned by subordinate ids (unshare mode) and,
    // if mmdebstrap was killed, mounts: remove it with the runner's help.
    let cleanup = remove_work_dir(ctx.runner, &tools, work.path());
    if cleanup.is_ok() {
        work.removed();
    }
    let manifest = result?;
    // The staging directory has been renamed to the destination.
    let _ = staging.keep();
    if let Err(e) = cleanup {
        // The image is complete; only scratch space is left over.
        progress(StageEvent::Note {
            stage: Stage::Manifest,
            message: format!("could not clean up the work directory: {e}"),
        });
    }
    Ok(manifest)
}

/// Programs found on the host.
#[derive(Debug)]
struct Tools {
    bootstrap: BootstrapTool,
    mkfs: PathBuf,
    rm: PathBuf,
    /// For recipes with `[npm]`.
    npm: Option<PathBuf>,
    /// mmdebstrap, for `--unshare-helper` when not root.
    unshare_helper: Option<PathBuf>,
}

#[derive(Debug)]
enum BootstrapTool {
    Mmdebstrap(PathBuf),
    Debootstrap(PathBuf),
}

impl Tools {
    fn find(runner: &dyn CommandRunner, recipe: &Recipe) -> Result<Tools, BuildError> {
        let missing = |tool, package| BuildError::MissingTool { tool, package };
        let mmdebstrap = runner.find_program("mmdebstrap");
        let root = runner.is_root();
        let bootstrap = match (&mmdebstrap, runner.find_program("debootstrap")) {
            (Some(m), _) => BootstrapTool::Mmdebstrap(m.clone()),
            (None, Some(d)) if root => BootstrapTool::Debootstrap(d),
            (None, Some(_)) => return Err(BuildError::NeedsRoot),
            (None, None) => return Err(BuildError::NoBootstrapTool),
        };
        Ok(Tools {
            bootstrap,
            mkfs: runner
                .find_program("mkfs.ext4")
                .ok_or(missing("mkfs.ext4", "e2fsprogs"))?,
            rm: runner
                .find_program("rm")
                .ok_or(missing("rm", "coreutils"))?,
            npm: match &recipe.npm {
                None => None,
                Some(_) => Some(runner.find_program("npm").ok_or(missing("npm", "npm"))?),
            },
            unshare_helper: if root { None } else { mmdebstrap },
        })
    }

    /// `cmd` run as root over the tree: directly as root, else inside
    /// mmdebstrap's user namespace where the tree's files are root's.
    fn as_tree_root(&self, cmd: HostCommand) -> HostCommand {
        match &self.unshare_helper {
            None => cmd,
            Some(helper) => {
                let stdout_to = cmd.stdout_to.clone();
                let mut wrapped = HostCommand::new(helper)
                    .arg("--unshare-helper")
                    .arg(cmd.program)
                    .args(cmd.args);
                wrapped.stdout_to = stdout_to;
                wrapped
            }
        }
    }
}

/// Removes entries of `dir` named `PREFIX<pid>-...` whose process is gone:
/// leftovers of builds killed before they could clean up.
fn sweep_stale(
    dir: &Path,
    prefix: &str,
    mut remove: impl FnMut(&Path) -> Result<(), BuildError>,
) -> Result<(), BuildError> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    for entry in entries.filter_map(Result::ok) {
        let file_name = entry.file_name();
        let Some(rest) = file_name.to_str().and_then(|n| n.strip_prefix(prefix)) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !crate::scratch::pid_is_running(pid) {
            remove(&entry.path())?;
        }
    }
    Ok(())
}

/// Removes a build's work directory without crossing into mounts.
fn remove_work_dir(
    runner: &mut dyn CommandRunner,
    tools: &Tools,
    work: &Path,
) -> Result<(), BuildError> {
    remove_tree(runner, tools, &work.join("tree"))?;
    std::fs::remove_dir_all(work).map_err(io_err(format!("cannot remove {}", work.display())))
}

/// Removes the bootstrapped tree, if present.
fn remove_tree(
    runner: &mut dyn CommandRunner,
    tools: &Tools,
    tree: &Path,
) -> Result<(), BuildError> {
    if tree.symlink_metadata().is_ok() {
        unmount_under(tree)?;
        let cmd = tools.as_tree_root(
            HostCommand::new(&tools.rm)
                .args(["--recursive", "--force", "--one-file-system", "--"])
                .arg(tree),
        );
        let rm_result = runner.run(&cmd, &mut |_| {});
        // In unshare mode the namespace's root cannot unlink the tree's own
        // entry (the work directory is ours): finish that part here.
        if tree.symlink_metadata().is_ok()
            && let Err(e) = std::fs::remove_dir(tree)
        {
            let detail = match rm_result {
                Err(rm_error) => rm_error.to_string(),
                Ok(()) => e.to_string(),
            };
            return Err(BuildError::Cleanup {
                path: tree.to_owned(),
                detail,
            });
        }
    }
    Ok(())
}

/// Mount points at or below `tree` in a `/proc/self/mountinfo` text,
/// deepest first.
fn mounts_under(mountinfo: &str, tree: &Path) -> Vec<PathBuf> {
    let mut points: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        // mountinfo escapes space, tab, newline and backslash as \ooo.
        .map(|p| {
            PathBuf::from(
                p.replace("\\040", " ")
                    .replace("\\011", "\t")
                    .replace("\\012", "\n")
                    .replace("\\134", "\\"),
            )
        })
        .filter(|p| p.starts_with(tree))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    points
}

/// Unmount what a killed mmdebstrap (root mode) left mounted in its tree
/// (`/proc`, `/sys`, `/dev/pts`…), deepest first: `rm --one-file-system`
/// would otherwise leave the tree behind, and every later build would fail
/// to sweep it. Unshare mode's mounts die with its namespace.
fn unmount_under(tree: &Path) -> Result<(), BuildError> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Ok(());
    };
    for point in mounts_under(&info, tree) {
        rustix::mount::unmount(&point, rustix::mount::UnmountFlags::DETACH).map_err(|e| {
            BuildError::Cleanup {
                path: point.clone(),
                detail: format!("cannot unmount it: {e}"),
            }
        })?;
    }
    Ok(())
}

fn set_mode(path: &Path, mode: u32) -> Result<(), BuildError> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(io_err(format!("cannot chmod {}", path.display())))
}

/// Quotes `s` for POSIX sh.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Runs before the recipe's packages are installed: keeps initramfs-tools
/// (pulled in by the kernel package) from building a 37 MB initrd nobody
/// uses; the customize script puts the real tool back.
const DIVERT_UPDATE_INITRAMFS: &str = r#"set -eu
chroot "$1" dpkg-divert --quiet --local --rename --add /usr/sbin/update-initramfs
printf '#!/bin/sh\nexit 0\n' > "$1/usr/sbin/update-initramfs"
chmod 0755 "$1/usr/sbin/update-initramfs"
"#;

/// The APT sources lines the image uses.
fn apt_lines(recipe: &Recipe, mirror: &str) -> Vec<String> {
    let b = &recipe.bootstrap;
    std::iter::once(&b.suite)
        .chain(&b.extra_suites)
        .map(|suite| format!("deb {mirror} {suite} {}", b.components.join(" ")))
        .collect()
}

/// The shell script that turns the bootstrapped tree (its `$1`) into a
/// banger image. Runs as (namespace) root outside the chroot.
pub(crate) fn customize_script(recipe: &Recipe, apt_lines: &[String]) -> String {
    let s = &recipe.system;
    let mut out = String::new();
    let mut line = |l: String| {
        out.push_str(&l);
        out.push('\n');
    };
    line("set -eu".into());
    line("T=\"$1\"".into());
    line(format!("echo {}", sh_quote(CUSTOMIZE_MARKER)));
    line("# Put the real update-initramfs back (diverted during the bootstrap).".into());
    line("if [ -e \"$T/usr/sbin/update-initramfs.distrib\" ]; then".into());
    line("  rm -f \"$T/usr/sbin/update-initramfs\"".into());
    line(
        "  chroot \"$T\" dpkg-divert --quiet --local --rename --remove /usr/sbin/update-initramfs"
            .into(),
    );
    line("fi".into());
    line("rm -f \"$T\"/boot/initrd.img-* \"$T/initrd.img\" \"$T/initrd.img.old\"".into());
    line(format!("chmod 0755 \"$T\"{}", sh_quote(AGENT_GUEST_PATH)));
    line(format!(
        "printf '%s\\n' {} > \"$T/etc/apt/sources.list\"",
        apt_lines
            .iter()
            .map(|l| sh_quote(l))
            .collect::<Vec<_>>()
            .join(" ")
    ));
    line(format!(
        "echo {} > \"$T/etc/hostname\"",
        sh_quote(&s.hostname)
    ));
    // The recipe's files, then the agent's unit and udev rule (every
    // banger image has the agent).
    let agent_files = [
        (SYSTEMD_UNIT_PATH, SYSTEMD_UNIT),
        (UDEV_RULE_PATH, UDEV_RULE),
    ];
    let files = s
        .files
        .iter()
        .map(|f| (f.path.as_str(), f.text(), f.mode))
        .chain(agent_files.map(|(path, text)| (path, text, 0o644)));
    for (path, text, mode) in files {
        let path = sh_quote(path);
        line(format!("mkdir -p \"$(dirname \"$T\"{path})\""));
        // A symlink there (absolute ones point at the host) is replaced,
        // never written through.
        line(format!("rm -f \"$T\"{path}"));
        line(format!("printf '%s' {} > \"$T\"{path}", sh_quote(text)));
        line(format!("chmod {mode:o} \"$T\"{path}"));
    }
    for glob in &s.remove {
        // Validated to be a plain glob: left unquoted so it expands.
        line(format!("rm -rf \"$T\"{glob}"));
    }
    for path in &s.empty {
        let path = sh_quote(path);
        line(format!("rm -f \"$T\"{path}"));
        line(format!(": > \"$T\"{path}"));
    }
    if let Some(npm) = &recipe.npm {
        let dest = sh_quote(&npm.dest);
        line(format!("chown -R 0:0 \"$T\"{dest}"));
        line("mkdir -p \"$T/usr/local/bin\"".into());
        for (name, path) in &npm.bin {
            let target = sh_quote(&format!("{}/node_modules/{path}", npm.dest));
            let link = sh_quote(&format!("/usr/local/bin/{name}"));
            line(format!("ln -sfn {target} \"$T\"{link}"));
        }
    }
    line(format!(
        "chroot \"$T\" systemctl enable --quiet {} {SYSTEMD_UNIT_NAME}",
        s.enable_units.join(" ")
    ));
    if !s.mask_units.is_empty() {
        line(format!(
            "chroot \"$T\" systemctl mask --quiet {}",
            s.mask_units.join(" ")
        ));
    }
    line(format!("echo {}", sh_quote(CUSTOMIZE_DONE_MARKER)));
    out
}

/// Everything a running build needs.
struct RunningBuild<'a> {
    runner: &'a mut dyn CommandRunner,
    tools: &'a Tools,
    recipe: &'a Recipe,
    opts: &'a BuildOptions,
    progress: &'a mut dyn FnMut(StageEvent),
    staging: PathBuf,
    tree: PathBuf,
}

impl RunningBuild<'_> {
    fn check_cancel(&self) -> Result<(), BuildError> {
        match &self.opts.cancel {
            Some(flag) if flag.load(Ordering::Relaxed) => Err(BuildError::Cancelled),
            _ => Ok(()),
        }
    }

    fn note(&mut self, stage: Stage, message: String) {
        (self.progress)(StageEvent::Note { stage, message });
    }

    /// Runs `f` as `stage`, reporting its start and duration.
    fn stage<T>(
        &mut self,
        stage: Stage,
        f: impl FnOnce(&mut Self) -> Result<T, BuildError>,
    ) -> Result<T, BuildError> {
        self.check_cancel()?;
        (self.progress)(StageEvent::Started { stage });
        let t = Instant::now();
        let value = f(self)?;
        (self.progress)(StageEvent::Finished {
            stage,
            elapsed: t.elapsed(),
        });
        Ok(value)
    }

    /// Runs a command, forwarding its output as `stage` output lines.
    fn run(&mut self, stage: Stage, cmd: &HostCommand) -> Result<(), BuildError> {
        let mut tail: Vec<String> = Vec::new();
        let progress = &mut *self.progress;
        let result = self.runner.run(cmd, &mut |line| {
            if tail.len() == TAIL_LINES {
                tail.remove(0);
            }
            tail.push(line.to_owned());
            progress(StageEvent::Output {
                stage,
                line: line.to_owned(),
            });
        });
        result.map_err(|source| match source {
            CommandError::Cancelled { .. } => BuildError::Cancelled,
            source => BuildError::Command {
                stage,
                command: cmd.display(),
                tail,
                source,
            },
        })
    }

    fn run_stages(&mut self, started: Instant) -> Result<ImageManifest, BuildError> {
        let mirror = self.stage(Stage::ResolveMirror, |ctx| {
            let suite = &ctx.recipe.bootstrap.suite;
            let (mirror, from) = if let Some(m) = &ctx.opts.mirror {
                (
                    m.trim_end_matches('/').to_owned(),
                    "the build options".to_owned(),
                )
            } else if let Some(host) = find_debian_mirror(Path::new("/etc/apt"), suite) {
                (host.uri, host.source_file.display().to_string())
            } else {
                (
                    ctx.recipe.bootstrap.default_mirror.clone(),
                    "the recipe default".to_owned(),
                )
            };
            ctx.note(
                Stage::ResolveMirror,
                format!("mirror {mirror} (from {from})"),
            );
            Ok(mirror)
        })?;
        let apt_lines = apt_lines(self.recipe, &mirror);
        if let Some(npm) = &self.recipe.npm {
            self.stage(Stage::Npm, |ctx| ctx.npm_ci(npm))?;
        }

        self.bootstrap_and_customize(&apt_lines)?;

        let kernel_version = self.stage(Stage::Kernel, |ctx| ctx.kernel())?;
        self.stage(Stage::Initramfs, |ctx| {
            let report = build_initramfs(
                &ctx.tree,
                &kernel_version,
                &ctx.recipe.initramfs.modules,
                &ctx.staging.join(INITRD),
            )?;
            ctx.note(
                Stage::Initramfs,
                format!("{} modules, {} bytes", report.modules.len(), report.size),
            );
            Ok(())
        })?;
        self.stage(Stage::RootfsExt4, |ctx| ctx.rootfs())?;
        self.stage(Stage::WorkSeed, |ctx| ctx.work_seed())?;
        self.stage(Stage::Manifest, |ctx| {
            let mut files = std::collections::BTreeMap::new();
            for file in manifest::IMAGE_FILES {
                let path = ctx.staging.join(file);
                set_mode(&path, 0o444)?;
                let digest: FileDigest = digest_file(&path)
                    .map_err(io_err(format!("cannot hash {}", path.display())))?;
                files.insert(file.to_owned(), digest);
            }
            let manifest = ImageManifest {
                format: MANIFEST_FORMAT,
                recipe: ctx.recipe.name.clone(),
                kernel_version: kernel_version.clone(),
                default_init: ctx.recipe.default_init,
                mirror: mirror.clone(),
                built_at_unix: SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0),
                build_seconds: (started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
                files,
                services: ctx.recipe.services.clone(),
            };
            manifest.write(&ctx.staging)?;
            set_mode(&ctx.staging.join(manifest::MANIFEST_FILE), 0o444)?;
            let dest = &ctx.opts.dest_dir;
            std::fs::rename(&ctx.staging, dest).map_err(io_err(format!(
                "cannot move the image into {}",
                dest.display()
            )))?;
            if let Some(Ok(dir)) = dest.parent().map(std::fs::File::open) {
                // Best effort: make the rename durable.
                let _ = dir.sync_all();
            }
            Ok(manifest)
        })
    }

    /// Bootstrap and customize. With mmdebstrap both happen in one run (the
    /// customization is a hook); the script's marker line splits the stages.
    fn bootstrap_and_customize(&mut self, apt_lines: &[String]) -> Result<(), BuildError> {
        // The hooks are files beside the tree (readable by the namespace's
        // root in unshare mode, like the tree's directory itself).
        let work = self.tree.parent().unwrap_or(&self.tree).to_owned();
        let customize = work.join("customize.sh");
        let essential = work.join("essential.sh");
        for (path, text) in [
            (&customize, customize_script(self.recipe, apt_lines)),
            (&essential, DIVERT_UPDATE_INITRAMFS.to_owned()),
        ] {
            std::fs::write(path, text)
                .map_err(io_err(format!("cannot write {}", path.display())))?;
            set_mode(path, 0o644)?;
        }
        let b = &self.recipe.bootstrap;
        match &self.tools.bootstrap {
            BootstrapTool::Mmdebstrap(mmdebstrap) => {
                let mode = if self.runner.is_root() {
                    "root"
                } else {
                    "unshare"
                };
                let mut cmd = HostCommand::new(mmdebstrap).args([
                    format!("--mode={mode}"),
                    format!("--variant={}", b.variant),
                    "--format=directory".to_owned(),
                    format!("--components={}", b.components.join(",")),
                    format!("--include={}", b.packages.join(",")),
                    // Ride out a flaky resolver or mirror instead of failing the build.
                    "--aptopt=Acquire::Retries \"5\"".to_owned(),
                ]);
                for glob in &b.dpkg_path_exclude {
                    cmd = cmd.arg(format!("--dpkgopt=path-exclude={glob}"));
                }
                for glob in &b.dpkg_path_include {
                    cmd = cmd.arg(format!("--dpkgopt=path-include={glob}"));
                }
                let upload = format!(
                    "--customize-hook=upload {} {AGENT_GUEST_PATH}",
                    self.opts.agent_bin.display()
                );
                cmd = cmd
                    .arg(format!(
                        "--essential-hook=sh {} \"$1\"",
                        essential.display()
                    ))
                    .arg(upload);
                if let Some(npm) = &self.recipe.npm {
                    // Copied in as they are; the customize script makes
                    // them root's.
                    cmd = cmd
                        .arg(format!("--customize-hook=mkdir -p \"$1\"{}", npm.dest))
                        .arg(format!(
                            "--customize-hook=copy-in {} {}",
                            self.npm_modules().display(),
                            npm.dest
                        ));
                }
                cmd = cmd
                    .arg(format!(
                        "--customize-hook=sh {} \"$1\"",
                        customize.display()
                    ))
                    .arg(&b.suite)
                    .arg(&self.tree)
                    .args(apt_lines.iter());
                self.run_split_at_marker(&cmd)
            }
            BootstrapTool::Debootstrap(debootstrap) => {
                let mirror = apt_lines
                    .first()
                    .and_then(|l| l.split_whitespace().nth(1))
                    .unwrap_or_default()
                    .to_owned();
                let cmd = HostCommand::new(debootstrap)
                    .arg(format!("--variant={}", b.variant))
                    .arg(format!("--components={}", b.components.join(",")))
                    .arg(format!("--include={}", b.packages.join(",")))
                    .arg(&b.suite)
                    .arg(&self.tree)
                    .arg(mirror);
                self.stage(Stage::Bootstrap, |ctx| ctx.run(Stage::Bootstrap, &cmd))?;
                self.stage(Stage::Customize, |ctx| {
                    let dest = ctx.tree.join(AGENT_GUEST_PATH.trim_start_matches('/'));
                    std::fs::copy(&ctx.opts.agent_bin, &dest).map_err(io_err(format!(
                        "cannot copy the agent to {}",
                        dest.display()
                    )))?;
                    if let Some(npm) = &ctx.recipe.npm {
                        let dest = ctx.tree.join(npm.dest.trim_start_matches('/'));
                        std::fs::create_dir_all(&dest)
                            .map_err(io_err(format!("cannot create {}", dest.display())))?;
                        let cmd = HostCommand::new("cp")
                            .arg("-a")
                            .arg(ctx.npm_modules())
                            .arg(dest);
                        ctx.run(Stage::Customize, &cmd)?;
                    }
                    let cmd = HostCommand::new("sh").arg(&customize).arg(&ctx.tree);
                    ctx.run(Stage::Customize, &cmd)
                })
            }
        }
    }

    /// Runs mmdebstrap as the bootstrap stage until the customize marker,
    /// then as the customize stage.
    fn run_split_at_marker(&mut self, cmd: &HostCommand) -> Result<(), BuildError> {
        self.check_cancel()?;
        (self.progress)(StageEvent::Started {
            stage: Stage::Bootstrap,
        });
        let mut stage = Stage::Bootstrap;
        let mut stage_started = Instant::now();
        let mut customize_done = false;
        let mut tail: Vec<String> = Vec::new();
        let progress = &mut *self.progress;
        let result = self.runner.run(cmd, &mut |line| {
            if tail.len() == TAIL_LINES {
                tail.remove(0);
            }
            tail.push(line.to_owned());
            if line == CUSTOMIZE_MARKER && stage == Stage::Bootstrap {
                progress(StageEvent::Finished {
                    stage,
                    elapsed: stage_started.elapsed(),
                });
                stage = Stage::Customize;
                stage_started = Instant::now();
                progress(StageEvent::Started { stage });
            } else if line == CUSTOMIZE_DONE_MARKER {
                customize_done = true;
            } else {
                progress(StageEvent::Output {
                    stage,
                    line: line.to_owned(),
                });
            }
        });
        result.map_err(|source| match source {
            CommandError::Cancelled { .. } => BuildError::Cancelled,
            source => BuildError::Command {
                stage,
                command: cmd.display(),
                tail,
                source,
            },
        })?;
        if !customize_done {
            return Err(BuildError::Tree(
                "mmdebstrap succeeded but the customize hook did not run to its end".into(),
            ));
        }
        (self.progress)(StageEvent::Finished {
            stage: Stage::Customize,
            elapsed: stage_started.elapsed(),
        });
        Ok(())
    }

    /// The recipe's npm project beside the tree; `npm ci` installs into it.
    fn npm_dir(&self) -> PathBuf {
        self.tree.parent().unwrap_or(&self.tree).join("npm")
    }

    /// What `npm ci` installed, copied into the tree.
    fn npm_modules(&self) -> PathBuf {
        self.npm_dir().join("node_modules")
    }

    /// `npm ci` of the recipe's npm project on the host: exactly the
    /// lockfile's versions, each tarball checked against its integrity
    /// hash, no package scripts run (nothing from the registry runs here).
    fn npm_ci(&mut self, npm: &Npm) -> Result<(), BuildError> {
        let project = npm_project(&npm.project)
            .ok_or_else(|| BuildError::Tree(format!("no npm project {:?}", npm.project)))?;
        let dir = self.npm_dir();
        std::fs::create_dir_all(&dir)
            .map_err(io_err(format!("cannot create {}", dir.display())))?;
        for (name, text) in [
            ("package.json", project.package_json),
            ("package-lock.json", project.package_lock),
        ] {
            let path = dir.join(name);
            std::fs::write(&path, text)
                .map_err(io_err(format!("cannot write {}", path.display())))?;
        }
        let npm_bin = self.tools.npm.clone().ok_or(BuildError::MissingTool {
            tool: "npm",
            package: "npm",
        })?;
        let cmd = HostCommand::new(npm_bin)
            .arg("ci")
            .arg("--prefix")
            .arg(&dir)
            .args([
                "--ignore-scripts",
                "--omit=dev",
                "--no-audit",
                "--no-fund",
                "--no-update-notifier",
            ]);
        self.run(Stage::Npm, &cmd)?;
        for (name, path) in &npm.bin {
            let target = self.npm_modules().join(path);
            if !target.is_file() {
                return Err(BuildError::Tree(format!(
                    "npm.bin {name}: {} is not a file after npm ci",
                    target.display()
                )));
            }
        }
        let used = tree_usage(&self.npm_modules())?;
        self.note(Stage::Npm, format!("node_modules holds {} MiB", used >> 20));
        Ok(())
    }

    /// Copies the bzImage, extracts vmlinux; returns the kernel version.
    fn kernel(&mut self) -> Result<String, BuildError> {
        let boot = self.tree.join("boot");
        let mut versions: Vec<String> = std::fs::read_dir(&boot)
            .map_err(io_err(format!("cannot list {}", boot.display())))?
            .filter_map(Result::ok)
            .filter_map(|e| {
                e.file_name()
                    .to_str()
                    .and_then(|n| n.strip_prefix("vmlinuz-"))
                    .map(str::to_owned)
            })
            .collect();
        versions.sort();
        let version = match versions.as_slice() {
            [one] => one.clone(),
            [] => {
                return Err(BuildError::Tree(
                    "no /boot/vmlinuz-* (is linux-image installed?)".into(),
                ));
            }
            many => {
                return Err(BuildError::Tree(format!(
                    "several kernels installed: {many:?}"
                )));
            }
        };
        let bzimage_path = boot.join(format!("vmlinuz-{version}"));
        let bzimage = std::fs::read(&bzimage_path)
            .map_err(io_err(format!("cannot read {}", bzimage_path.display())))?;
        let vmlinuz = self.staging.join(VMLINUZ);
        std::fs::write(&vmlinuz, &bzimage)
            .map_err(io_err(format!("cannot write {}", vmlinuz.display())))?;
        let vmlinux_path = self.staging.join(VMLINUX);
        let file = std::fs::File::create(&vmlinux_path)
            .map_err(io_err(format!("cannot create {}", vmlinux_path.display())))?;
        let mut out = BufWriter::new(file);
        let size = extract_vmlinux(&bzimage, &mut out)?;
        out.flush().map_err(KernelError::Write)?;
        self.note(
            Stage::Kernel,
            format!(
                "kernel {version}: bzImage {} bytes, vmlinux {size} bytes",
                bzimage.len()
            ),
        );
        Ok(version)
    }

    fn rootfs(&mut self) -> Result<(), BuildError> {
        let size_mib = self.recipe.disk.rootfs_size_mib;
        let used = tree_usage(&self.tree)?;
        // ext4 metadata (inode tables, journal) costs about a tenth more.
        let needed_mib = (used + used / 10) / (1 << 20) + 64;
        if needed_mib > size_mib {
            return Err(BuildError::RootfsTooSmall {
                needed_mib,
                size_mib,
            });
        }
        self.note(Stage::RootfsExt4, format!("tree holds {} MiB", used >> 20));
        let tree = self.tree.clone();
        self.mkfs_from(Stage::RootfsExt4, "rootfs", &tree, ROOTFS, size_mib)
    }

    /// `work-seed.ext4` (label `work`): the tree's `/root`, which every VM's
    /// work disk starts from and the guest mounts on `/root`. Then the
    /// tree is no longer needed.
    fn work_seed(&mut self) -> Result<(), BuildError> {
        let home = self.tree.join("root");
        let used = tree_usage(&home)?;
        let needed_mib = (used + used / 10) / (1 << 20) + 16;
        let size_mib = self.recipe.disk.work_seed_size_mib;
        if needed_mib > size_mib {
            return Err(BuildError::WorkSeedTooSmall {
                needed_mib,
                size_mib,
            });
        }
        self.mkfs_from(Stage::WorkSeed, "work", &home, WORK_SEED, size_mib)?;
        // Nothing reads the tree any more: free its space now.
        let t = Instant::now();
        remove_tree(self.runner, self.tools, &self.tree)?;
        self.note(
            Stage::WorkSeed,
            format!("tree removed in {:.1}s", t.elapsed().as_secs_f64()),
        );
        Ok(())
    }

    /// `mkfs.ext4 -d from` into `staging/name`, as the tree's root.
    fn mkfs_from(
        &mut self,
        stage: Stage,
        label: &str,
        from: &Path,
        name: &str,
        size_mib: u64,
    ) -> Result<(), BuildError> {
        let out = self.staging.join(name);
        let size = format!("{size_mib}M");
        let cmd = if self.tools.unshare_helper.is_some() {
            // Only the namespace's root sees the tree's files as root's, and
            // it cannot write into our directories: mkfs writes through its
            // standard output, a file it may open for the duration.
            std::fs::File::create(&out)
                .map_err(io_err(format!("cannot create {}", out.display())))?;
            set_mode(&out, 0o666)?;
            let mut cmd = HostCommand::new(&self.tools.mkfs)
                .args(mkfs_args(label, Some(from)))
                .arg("/dev/stdout")
                .arg(size);
            cmd.stdout_to = Some(out.clone());
            cmd
        } else {
            HostCommand::new(&self.tools.mkfs)
                .args(mkfs_args(label, Some(from)))
                .arg(&out)
                .arg(size)
        };
        let cmd = self.tools.as_tree_root(cmd);
        self.run(stage, &cmd)?;
        set_mode(&out, 0o644)
    }
}

/// mkfs.ext4 options: 4 KiB blocks and the usual inode ratio even for small
/// sizes (the work seed is grown a thousandfold later), root-owned top
/// directory whoever runs it.
pub fn mkfs_args(label: &str, populate_from: Option<&Path>) -> Vec<std::ffi::OsString> {
    let mut args: Vec<std::ffi::OsString> = [
        "-q",
        "-F",
        "-t",
        "ext4",
        "-T",
        "default",
        "-b",
        "4096",
        "-L",
        label,
        "-E",
        "root_owner=0:0",
    ]
    .into_iter()
    .map(Into::into)
    .collect();
    if let Some(dir) = populate_from {
        args.push("-d".into());
        args.push(dir.into());
    }
    args
}

/// Bytes the tree's regular files and directories occupy, rounded up to 4 KiB
/// blocks. Unreadable directories (unshare mode) are counted as one block.
fn tree_usage(tree: &Path) -> Result<u64, BuildError> {
    let mut total = 0u64;
    let mut stack = vec![tree.to_owned()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            total += 4096;
            continue;
        };
        for entry in entries.filter_map(Result::ok) {
            let Ok(meta) = entry.path().symlink_metadata() else {
                continue;
            };
            total += meta.len().div_ceil(4096) * 4096;
            if meta.is_dir() {
                stack.push(entry.path());
            }
        }
    }
    if total == 0 {
        return Err(BuildError::Tree(format!("{} is empty", tree.display())));
    }
    Ok(total)
}

#[cfg(test)]
mod tests;
