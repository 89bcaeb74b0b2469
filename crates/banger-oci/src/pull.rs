//! The whole of `image pull` and `image import`, blocking, with stage
//! events: resolve → download → unpack → prepare → rootfs-ext4 → work-seed
//! → kernel → manifest. The image is built in a hidden staging directory
//! beside its destination and the tree in a scratch directory; any failure
//! removes both, so nothing is left behind but verified blobs in the cache.

use std::fmt;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use banger_image::{ScratchDir, ScratchError, ScratchSpace};

use crate::layer::{Applier, LayerError, Limits, apply_blob};
use crate::registry::{BlobCache, Fetch, Registry, RegistryError, Resolved};
use crate::rootfs::{self, BaseKernel, OciImageManifest, RootfsError, Source};

/// The steps of a pull or import, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Resolve,
    Download,
    Unpack,
    Prepare,
    RootfsExt4,
    WorkSeed,
    Kernel,
    Manifest,
}

impl Stage {
    pub fn name(self) -> &'static str {
        match self {
            Stage::Resolve => "resolve",
            Stage::Download => "download",
            Stage::Unpack => "unpack",
            Stage::Prepare => "prepare",
            Stage::RootfsExt4 => "rootfs-ext4",
            Stage::WorkSeed => "work-seed",
            Stage::Kernel => "kernel",
            Stage::Manifest => "manifest",
        }
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Progress of a pull or import.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Started { stage: Stage },
    Note { stage: Stage, message: String },
    Finished { stage: Stage, elapsed: Duration },
}

/// Why a pull or import failed. Nothing is left behind in any case.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("layer {digest} of {reference}")]
    Layer {
        reference: String,
        digest: String,
        #[source]
        source: LayerError,
    },
    #[error(
        "the cached layer {digest} is damaged (it hashes to {actual}); it was removed: pull again"
    )]
    DamagedBlob { digest: String, actual: String },
    #[error("cannot import {path}")]
    Import {
        path: PathBuf,
        #[source]
        source: LayerError,
    },
    #[error(transparent)]
    Rootfs(#[from] RootfsError),
    #[error(transparent)]
    Scratch(#[from] ScratchError),
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} already exists (images are never modified: use a new directory)")]
    DestinationExists(PathBuf),
}

impl PullError {
    /// The layer itself was refused (an escape attempt, or over a cap), as
    /// opposed to a failure.
    pub fn is_refusal(&self) -> bool {
        match self {
            PullError::Layer { source, .. } | PullError::Import { source, .. } => {
                source.is_refusal()
            }
            _ => false,
        }
    }
}

fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> PullError {
    let context = context.into();
    move |source| PullError::Io { context, source }
}

/// Inputs besides the source.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// The image directory to create; must not exist.
    pub dest_dir: PathBuf,
    /// Where the unpacked tree lives while building.
    pub scratch: ScratchSpace,
    /// The `banger-agent` binary to install in the guest.
    pub agent_bin: PathBuf,
    /// Kernel and initrd to boot the image with.
    pub base: BaseKernel,
    /// Caps on what the layers (or the imported tarball) may unpack to.
    pub limits: Limits,
    /// Readiness checks recorded in the image's manifest.
    pub services: Vec<crate::rootfs::ServiceCheck>,
}

struct Progress<'a> {
    progress: &'a mut dyn FnMut(Event),
}

impl Progress<'_> {
    fn stage<T>(
        &mut self,
        stage: Stage,
        f: impl FnOnce(&mut Self) -> Result<T, PullError>,
    ) -> Result<T, PullError> {
        (self.progress)(Event::Started { stage });
        let t = Instant::now();
        let v = f(self)?;
        (self.progress)(Event::Finished {
            stage,
            elapsed: t.elapsed(),
        });
        Ok(v)
    }

    fn note(&mut self, stage: Stage, message: String) {
        (self.progress)(Event::Note { stage, message });
    }
}

/// Kind of the scratch directories unpacks make (see [`ScratchSpace`]).
const SCRATCH_KIND: &str = "banger-oci";

/// The staging directory (removed on drop unless kept) and the scratch
/// directory holding the tree (always removed).
struct Workspace {
    staging: Option<tempfile::TempDir>,
    scratch: Option<ScratchDir>,
    dest: PathBuf,
}

impl Workspace {
    fn new(opts: &BuildOptions) -> Result<Workspace, PullError> {
        let dest = &opts.dest_dir;
        if dest.symlink_metadata().is_ok() {
            return Err(PullError::DestinationExists(dest.clone()));
        }
        let (Some(parent), Some(name)) = (dest.parent(), dest.file_name()) else {
            return Err(PullError::DestinationExists(dest.clone()));
        };
        std::fs::create_dir_all(parent)
            .map_err(io_err(format!("cannot create {}", parent.display())))?;
        let pid = std::process::id();
        sweep_stale(parent, &opts.scratch);
        let staging = tempfile::Builder::new()
            .prefix(&format!(".{}.partial-{pid}-", name.to_string_lossy()))
            .tempdir_in(parent)
            .map_err(io_err(format!(
                "cannot create a staging directory in {}",
                parent.display()
            )))?;
        let ws = Workspace {
            staging: Some(staging),
            scratch: Some(opts.scratch.create(SCRATCH_KIND)?),
            dest: dest.clone(),
        };
        let tree = ws.tree();
        std::fs::create_dir(&tree).map_err(io_err(format!("cannot create {}", tree.display())))?;
        Ok(ws)
    }

    fn tree(&self) -> PathBuf {
        self.scratch.as_ref().expect("scratch").path().join("tree")
    }

    fn staging(&self) -> &Path {
        self.staging.as_ref().expect("staging").path()
    }

    /// From tree to image directory, renamed into place.
    fn finish(
        mut self,
        ctx: &mut Progress<'_>,
        opts: &BuildOptions,
        source: Source,
        started: Instant,
    ) -> Result<OciImageManifest, PullError> {
        let tree = self.tree();
        let facts = ctx.stage(Stage::Prepare, |ctx| {
            let facts = rootfs::prepare_tree(&tree, &opts.agent_bin)?;
            ctx.note(
                Stage::Prepare,
                format!(
                    "init: {}; sshd: {}",
                    match facts.default_init {
                        banger_image::InitMode::Fast =>
                            "banger-agent as PID 1 (the image has no init)",
                        banger_image::InitMode::Systemd =>
                            "the image's systemd, with the banger-agent service",
                    },
                    if facts.sshd {
                        "the image's"
                    } else {
                        "none (the image has none)"
                    }
                ),
            );
            Ok(facts)
        })?;
        let staging = self.staging().to_owned();
        ctx.stage(Stage::RootfsExt4, |ctx| {
            let note = rootfs::make_rootfs(&tree, &staging.join(banger_image::ROOTFS))?;
            ctx.note(Stage::RootfsExt4, note);
            Ok(())
        })?;
        ctx.stage(Stage::WorkSeed, |_| {
            Ok(rootfs::make_work_seed(
                &tree,
                &staging.join(banger_image::WORK_SEED),
            )?)
        })?;
        // Nothing reads the tree any more: free its space now.
        let _ = remove_tree(&tree);
        ctx.stage(Stage::Kernel, |ctx| {
            rootfs::copy_kernel(&opts.base, &staging)?;
            ctx.note(
                Stage::Kernel,
                format!("kernel and initrd of image {}", opts.base.name),
            );
            Ok(())
        })?;
        ctx.stage(Stage::Manifest, |_| {
            let manifest = rootfs::write_manifest(
                &staging,
                OciImageManifest {
                    format: rootfs::FORMAT,
                    source,
                    base_image: opts.base.name.clone(),
                    default_init: facts.default_init,
                    sshd: facts.sshd,
                    built_at_unix: SystemTime::now()
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .map(|d| d.as_secs())
                        .unwrap_or(0),
                    build_seconds: (started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
                    files: Default::default(),
                    services: opts.services.clone(),
                },
            )?;
            std::fs::set_permissions(
                &staging,
                std::os::unix::fs::PermissionsExt::from_mode(0o755),
            )
            .map_err(io_err(format!("cannot chmod {}", staging.display())))?;
            std::fs::rename(&staging, &self.dest).map_err(io_err(format!(
                "cannot move the image into {}",
                self.dest.display()
            )))?;
            // Renamed: nothing left to remove.
            let _ = self.staging.take().map(tempfile::TempDir::keep);
            Ok(manifest)
        })
    }
}

impl Drop for Workspace {
    fn drop(&mut self) {
        if let Some(scratch) = self.scratch.take()
            && remove_tree(scratch.path()).is_ok()
        {
            scratch.removed();
        }
    }
}

/// Removes what pulls and imports of processes now gone left in `images_dir`
/// (the hidden staging directories `.NAME.partial-PID-*`, banger's own
/// directory) and in `scratch`: what a killed daemon left mid-pull. Each
/// pull runs it, and the daemon at its start.
pub fn sweep_stale(images_dir: &Path, scratch: &ScratchSpace) {
    sweep_stale_staging(images_dir);
    let _ = scratch.sweep(SCRATCH_KIND, remove_tree);
}

fn sweep_stale_staging(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with('.') {
            continue;
        }
        let Some(pid) = name
            .split_once(".partial-")
            .and_then(|(_, rest)| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !banger_image::pid_is_running(pid) {
            let _ = remove_tree(&entry.path());
        }
    }
}

/// Removes a tree even when it holds read-only directories (not root).
fn remove_tree(path: &Path) -> std::io::Result<()> {
    if path.symlink_metadata().is_err() {
        return Ok(());
    }
    if std::fs::remove_dir_all(path).is_ok() {
        return Ok(());
    }
    let mut stack = vec![path.to_owned()];
    while let Some(dir) = stack.pop() {
        let _ = std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700));
        for e in std::fs::read_dir(&dir)?.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(e.path());
            }
        }
    }
    std::fs::remove_dir_all(path)
}

/// Downloads the resolved image's layers into `cache` and builds the image
/// into `opts.dest_dir`.
pub fn pull(
    registry: &mut Registry,
    resolved: &Resolved,
    cache: &BlobCache,
    opts: &BuildOptions,
    progress: &mut dyn FnMut(Event),
) -> Result<OciImageManifest, PullError> {
    let started = Instant::now();
    let mut ctx = Progress { progress };
    let reference = resolved.reference.to_string();
    let layers = &resolved.manifest.layers;
    let ws = Workspace::new(opts)?;
    ctx.stage(Stage::Download, |ctx| {
        let total: u64 = layers.iter().map(|l| l.size).sum();
        ctx.note(
            Stage::Download,
            format!(
                "{} layers, {:.1} MiB",
                layers.len(),
                total as f64 / 1048576.0
            ),
        );
        for (i, layer) in layers.iter().enumerate() {
            let n = i + 1;
            let short = &layer.digest[7..19];
            let mut on_bytes = |got: u64, size: u64| {
                (ctx.progress)(Event::Note {
                    stage: Stage::Download,
                    message: format!(
                        "layer {n}/{} {short}: {:.1}/{:.1} MiB",
                        layers.len(),
                        got as f64 / 1048576.0,
                        size as f64 / 1048576.0
                    ),
                });
            };
            let t = Instant::now();
            match registry.fetch_blob(layer, cache, &mut on_bytes)? {
                Fetch::Cached(_) => ctx.note(
                    Stage::Download,
                    format!("layer {n}/{} {short}: already downloaded", layers.len()),
                ),
                Fetch::Downloaded { resumed_from, .. } => ctx.note(
                    Stage::Download,
                    format!(
                        "layer {n}/{} {short}: verified in {:.1}s{}",
                        layers.len(),
                        t.elapsed().as_secs_f64(),
                        resumed_from
                            .map(|b| format!(" (resumed at {b} bytes)"))
                            .unwrap_or_default()
                    ),
                ),
            }
        }
        Ok(())
    })?;
    let tree = ws.tree();
    ctx.stage(Stage::Unpack, |ctx| {
        let mut applier = Applier::new(&tree, opts.limits);
        for (i, layer) in layers.iter().enumerate() {
            let file = cache.open(&layer.digest).map_err(io_err(format!(
                "cannot open the cached layer {}",
                layer.digest
            )))?;
            match apply_blob(&mut applier, file, &layer.digest) {
                Ok(Ok(())) => {}
                Ok(Err(actual)) => {
                    cache.remove(&layer.digest);
                    return Err(PullError::DamagedBlob {
                        digest: layer.digest.clone(),
                        actual,
                    });
                }
                Err(source) => {
                    if matches!(source, LayerError::Unsafe { .. }) {
                        // A hostile layer is of no use to any image.
                        cache.remove(&layer.digest);
                    }
                    return Err(PullError::Layer {
                        reference: reference.clone(),
                        digest: layer.digest.clone(),
                        source,
                    });
                }
            }
            ctx.note(
                Stage::Unpack,
                format!("layer {}/{} applied", i + 1, layers.len()),
            );
        }
        applier.finish().map_err(|source| PullError::Layer {
            reference: reference.clone(),
            digest: "(all)".to_owned(),
            source,
        })?;
        note_stats(ctx, applier.stats());
        Ok(())
    })?;
    let source = Source {
        kind: "oci".to_owned(),
        reference,
        digest: Some(resolved.digest.clone()),
        manifest_digest: Some(resolved.manifest_digest.clone()),
        layers: layers.iter().map(|l| l.digest.clone()).collect(),
    };
    ws.finish(&mut ctx, opts, source, started)
}

fn note_stats(ctx: &mut Progress<'_>, s: &crate::ApplyStats) {
    ctx.note(
        Stage::Unpack,
        format!(
            "{} entries, {:.1} MiB, {} whiteouts, {} opaque dirs",
            s.entries,
            s.bytes as f64 / 1048576.0,
            s.whiteouts,
            s.opaque_dirs
        ),
    );
    if s.owners_skipped + s.devices_skipped > 0 {
        ctx.note(
            Stage::Unpack,
            format!(
                "not root: {} entries keep the daemon user as owner and {} device nodes were skipped",
                s.owners_skipped, s.devices_skipped
            ),
        );
    }
    if s.xattrs_skipped > 0 {
        ctx.note(
            Stage::Unpack,
            format!(
                "{} extended attributes could not be set here",
                s.xattrs_skipped
            ),
        );
    }
}

/// `image import PATH`: a root filesystem tarball (plain, gzip or zstd,
/// e.g. `docker export` output) or a directory, built into an image.
pub fn import(
    path: &Path,
    opts: &BuildOptions,
    progress: &mut dyn FnMut(Event),
) -> Result<OciImageManifest, PullError> {
    let started = Instant::now();
    let mut ctx = Progress { progress };
    let meta = path
        .metadata()
        .map_err(io_err(format!("cannot import {}", path.display())))?;
    let ws = Workspace::new(opts)?;
    let tree = ws.tree();
    let digest = ctx.stage(Stage::Unpack, |ctx| {
        if meta.is_dir() {
            // cp keeps owners, modes, xattrs, links and holes; the source's
            // symlinks are copied as symlinks, never followed.
            let out = std::process::Command::new("cp")
                .args(["-a", "--reflink=auto", "--"])
                .arg(path.join("."))
                .arg(&tree)
                .output()
                .map_err(io_err("cannot run cp"))?;
            if !out.status.success() {
                return Err(PullError::Io {
                    context: format!("cannot copy {}", path.display()),
                    source: std::io::Error::other(
                        String::from_utf8_lossy(&out.stderr).trim().to_owned(),
                    ),
                });
            }
            return Ok(None);
        }
        let file = File::open(path).map_err(io_err(format!("cannot open {}", path.display())))?;
        let mut hashing = crate::layer::HashingReader::new(BufReader::new(file));
        let mut applier = Applier::new(&tree, opts.limits);
        applier
            .apply(&mut hashing)
            .map_err(|source| PullError::Import {
                path: path.to_owned(),
                source,
            })?;
        std::io::copy(&mut hashing, &mut std::io::sink())
            .map_err(io_err(format!("cannot read {}", path.display())))?;
        applier.finish().map_err(|source| PullError::Import {
            path: path.to_owned(),
            source,
        })?;
        note_stats(ctx, applier.stats());
        Ok(Some(hashing.finish().0))
    })?;
    let source = Source {
        kind: "import".to_owned(),
        reference: path.display().to_string(),
        digest,
        manifest_digest: None,
        layers: Vec::new(),
    };
    ws.finish(&mut ctx, opts, source, started)
}

#[cfg(test)]
mod tests;
