//! `ImageService`: the images VMs boot from. Owns the image rows and the
//! `<state>/images` directory. The default image is built from a built-in
//! recipe by the first request that needs it; concurrent requests for the
//! same recipe wait for that one build. OCI images are pulled (into the
//! blob cache `<state>/images/blobs/sha256`) and built into images that
//! boot the default image's kernel and initrd; root filesystem tarballs and
//! directories are imported the same way. One build per image name at a
//! time: a second request for the same name waits for the first.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use banger_image::{BuildOptions, StageEvent as BuildEvent, builtin_recipe};
use banger_oci::{
    BaseKernel, BlobCache, OciImageManifest, PullError, Reference, Registry, RegistryError,
    RegistryOptions,
};
use banger_store::{Image, ImageState, InitMode, SourceKind, Store, StoreError, new_id};
use banger_wire::methods::{ImageImportParams, ImageInfo, ImagePullParams, ImageRegisterParams};
use tracing::{info, warn};

use crate::errors::chain;
use crate::ops::{Operation, TaskFailed};

/// The recipe behind the default image.
pub const DEFAULT_RECIPE: &str = "debian-12";

#[derive(Debug)]
pub struct ImageService {
    store: Arc<Store>,
    dir: PathBuf,
    agent_bin: Option<PathBuf>,
    /// `[image] mirror`; the host's own Debian mirror when unset.
    mirror: Option<String>,
    /// `[image] insecure_registries`: spoken to over plain HTTP.
    insecure_registries: Vec<String>,
    /// `[image] max_unpack_gib` and `max_unpack_entries`.
    unpack_limits: banger_oci::Limits,
    /// One lock per recipe or image name: a second build, pull or import
    /// of the same name waits for the first.
    building: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Held (shared) by every pull while it uses the blob cache; pruning
    /// the cache needs it alone.
    blobs_in_use: tokio::sync::RwLock<()>,
    /// The test seam (`BANGER_FAULT_INJECT=pull:<stage>:pause`).
    fault: Option<crate::vms::Fault>,
}

impl ImageService {
    pub fn new(
        store: Arc<Store>,
        state_dir: &Path,
        mirror: Option<String>,
        insecure_registries: Vec<String>,
        unpack_limits: banger_oci::Limits,
        fault: Option<crate::vms::Fault>,
    ) -> Self {
        ImageService {
            store,
            dir: state_dir.join("images"),
            agent_bin: agent_binary(),
            mirror,
            insecure_registries,
            unpack_limits,
            building: Mutex::default(),
            blobs_in_use: tokio::sync::RwLock::new(()),
            fault,
        }
    }

    pub fn info(image: &Image) -> ImageInfo {
        ImageInfo {
            id: image.id.clone(),
            name: image.name.clone(),
            state: image.state.to_string(),
            source: format!("{}:{}", image.source_kind, image.source_ref),
            source_digest: image.source_digest.clone(),
            is_default: image.is_default,
            default_init: image.default_init,
            size_bytes: image.size_bytes,
            disk_bytes: allocated_bytes(&image.dir),
            dir: image.dir.display().to_string(),
            created_at_ms: image.created_at,
            last_error: image.last_error.clone(),
        }
    }

    pub fn list(&self) -> Result<Vec<ImageInfo>, ImageError> {
        Ok(self.store.list_images()?.iter().map(Self::info).collect())
    }

    pub fn find(&self, name: &str) -> Result<Image, ImageError> {
        self.store.find_image(name).map_err(ImageError::from)
    }

    /// The image a VM should boot: `name`, or the default one. A built-in
    /// recipe's image is built on first use, reporting progress on `op`.
    pub async fn resolve(&self, name: Option<&str>, op: &Operation) -> Result<Image, ImageError> {
        match name {
            None => match self.store.default_image()? {
                Some(img) if img.state == ImageState::Ready => Ok(img),
                _ => self.build(DEFAULT_RECIPE, op).await,
            },
            Some(n) => match self.store.find_image(n) {
                Ok(img) if img.state == ImageState::Ready => Ok(img),
                Ok(img) => Err(ImageError::Conflict(format!(
                    "image {n:?} is {} (not ready)",
                    img.state
                ))),
                Err(e) if e.is_not_found() && builtin_recipe(n).is_some() => {
                    self.build(n, op).await
                }
                // Not an image name but an image reference: pulled on first use.
                Err(e) if e.is_not_found() && banger_oci::looks_like_reference(n) => {
                    let reference = parse_reference(n)?;
                    match self.store.image_by_name(&reference.to_string()) {
                        Ok(img) if img.state == ImageState::Ready => Ok(img),
                        _ => {
                            self.pull(
                                ImagePullParams {
                                    reference: n.to_owned(),
                                    name: None,
                                },
                                op,
                            )
                            .await
                        }
                    }
                }
                Err(e) if e.is_not_found() => Err(ImageError::NotFound(format!(
                    "no image {n:?} (banger image list shows them; an image reference such as \
                     docker.io/library/alpine:3.20 is pulled on first use)"
                ))),
                Err(e) => Err(e.into()),
            },
        }
    }

    /// The per-name lock: one build, pull or import of a name at a time.
    fn name_lock(&self, name: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.building
            .lock()
            .expect("building lock")
            .entry(name.to_string())
            .or_default()
            .clone()
    }

    fn agent(&self) -> Result<PathBuf, ImageError> {
        self.agent_bin.clone().ok_or_else(|| {
            ImageError::Unavailable(
                "the guest agent binary (banger-agent) was not found next to bangerd or in ../lib/banger; \
                 reinstall with ./install.sh (developers: scripts/build-agent.sh)".into(),
            )
        })
    }

    /// The agent for pulled and imported images, which may have no libc it
    /// could use: it must be statically linked.
    fn static_agent(&self) -> Result<PathBuf, ImageError> {
        let agent = self.agent()?;
        if is_static_elf(&agent) {
            Ok(agent)
        } else {
            Err(ImageError::Unavailable(format!(
                "the guest agent {} is dynamically linked, and images from registries may lack its libc; \
                 build a static one with scripts/build-agent.sh (or reinstall with ./install.sh)",
                agent.display()
            )))
        }
    }

    /// Whether VMs of this image run an sshd worth waiting for: images
    /// made from OCI images or imports only have one if they brought it.
    /// The readiness checks an image declares: in its manifest (built,
    /// pulled and imported images); a registered image has those of the
    /// built image whose files it registers (the `manifest.json` beside its
    /// vmlinux lists its rootfs's digest), else none.
    pub fn services(&self, image: &Image) -> Vec<banger_oci::ServiceCheck> {
        match image.source_kind {
            SourceKind::Oci | SourceKind::Import => OciImageManifest::read(&image.dir)
                .map(|m| m.services)
                .unwrap_or_default(),
            SourceKind::Recipe => banger_image::ImageManifest::load(&image.dir)
                .map(|m| m.services)
                .unwrap_or_default(),
            SourceKind::Register => banger_image::ImageManifest::load(&image.dir)
                .ok()
                .filter(|m| {
                    m.files
                        .get(banger_image::ROOTFS)
                        .is_some_and(|d| image.manifest.get("rootfs") == Some(&d.sha256))
                })
                .map(|m| m.services)
                .unwrap_or_default(),
        }
    }

    pub fn has_sshd(&self, image: &Image) -> bool {
        match image.source_kind {
            SourceKind::Oci | SourceKind::Import => OciImageManifest::read(&image.dir)
                .map(|m| m.sshd)
                .unwrap_or(false),
            SourceKind::Recipe | SourceKind::Register => true,
        }
    }

    /// `image pull`: resolve the reference to its linux/amd64 image, then
    /// download, unpack and build it under `name` (default: the normalised
    /// reference). A ready image of that name from the same digest is
    /// returned as it is.
    pub async fn pull(&self, p: ImagePullParams, op: &Operation) -> Result<Image, ImageError> {
        let reference = parse_reference(&p.reference)?;
        let name = p.name.clone().unwrap_or_else(|| reference.to_string());
        check_name(&name)?;
        let lock = self.name_lock(&name);
        op.stage("resolve");
        let _building = lock.lock().await;
        let _blobs = self.blobs_in_use.read().await;
        let opts = RegistryOptions {
            insecure: self.insecure_registries.clone(),
            docker_config: banger_oci::auth::docker_config_path(),
        };
        let r = reference.clone();
        let (mut registry, resolved) = tokio::task::spawn_blocking(move || {
            let mut registry = Registry::new(&r, &opts)?;
            let resolved = registry.resolve()?;
            Ok::<_, RegistryError>((registry, resolved))
        })
        .await
        .map_err(|e| ImageError::Failed(format!("image pull task failed: {e}")))??;
        op.progress(format!(
            "{reference}: {} (linux/amd64 manifest {})",
            resolved.digest, resolved.manifest_digest
        ));
        if let Ok(img) = self.store.image_by_name(&name) {
            match img.state {
                ImageState::Ready if img.source_digest.as_deref() == Some(&resolved.digest) => {
                    op.progress(format!("image {name} is up to date"));
                    return Ok(img);
                }
                ImageState::Ready => {
                    return Err(ImageError::Conflict(format!(
                        "image {name:?} exists (from {}, {}); {reference} is now {}: delete it \
                         first (banger image delete {name}) or pull under another name (--name)",
                        img.source_ref,
                        img.source_digest.as_deref().unwrap_or("no digest"),
                        resolved.digest
                    )));
                }
                // Left over by a daemon that died mid-build: start over.
                _ => self.remove_image(&img),
            }
        }
        let services = banger_oci::services_from_labels(&resolved.labels)
            .map_err(|e| ImageError::Invalid(format!("{reference}: {e}")))?;
        let base = self.base_kernel(op).await?;
        let agent_bin = self.static_agent()?;
        let id = new_id();
        let dest = self.dir.join(&id);
        let opts = self.oci_build_options(&dest, agent_bin, base.clone(), services);
        let cache = BlobCache::new(self.dir.join("blobs").join("sha256"));
        let source_ref = reference.to_string();
        let digest = resolved.digest.clone();
        let built = self
            .run_oci(op, move |progress| {
                banger_oci::pull(&mut registry, &resolved, &cache, &opts, progress)
            })
            .await;
        self.record_oci(
            &name,
            &id,
            &dest,
            &base,
            SourceKind::Oci,
            source_ref,
            Some(digest),
            built,
        )
    }

    /// `image import`: a root filesystem tarball (plain, gzip or zstd) or
    /// directory, built into an image like a pulled one.
    pub async fn import(&self, p: ImageImportParams, op: &Operation) -> Result<Image, ImageError> {
        check_name(&p.name)?;
        let path = PathBuf::from(&p.path);
        if !path.is_absolute() {
            return Err(ImageError::Invalid(format!(
                "import path {:?} must be absolute",
                p.path
            )));
        }
        if let Err(e) = path.metadata() {
            return Err(ImageError::Invalid(format!(
                "cannot import {}: {e}",
                path.display()
            )));
        }
        let lock = self.name_lock(&p.name);
        let _building = lock.lock().await;
        if let Ok(img) = self.store.image_by_name(&p.name) {
            if img.state == ImageState::Ready {
                return Err(ImageError::Conflict(format!(
                    "image {:?} exists: delete it first (banger image delete {}) or import under another name",
                    p.name, p.name
                )));
            }
            self.remove_image(&img);
        }
        let base = self.base_kernel(op).await?;
        let agent_bin = self.static_agent()?;
        let id = new_id();
        let dest = self.dir.join(&id);
        let timeout = p
            .wait_timeout_secs
            .unwrap_or(banger_oci::rootfs::DEFAULT_SERVICE_TIMEOUT_SECS);
        let services = banger_oci::port_checks(&p.wait_ports, timeout, None);
        let opts = self.oci_build_options(&dest, agent_bin, base.clone(), services);
        let from = path.clone();
        let built = self
            .run_oci(op, move |progress| {
                banger_oci::import(&from, &opts, progress)
            })
            .await;
        let digest = built.as_ref().ok().and_then(|m| m.source.digest.clone());
        self.record_oci(
            &p.name,
            &id,
            &dest,
            &base,
            SourceKind::Import,
            path.display().to_string(),
            digest,
            built,
        )
    }

    /// Kernel and initrd for pulled and imported images: the default
    /// image's (built first if there is none).
    async fn base_kernel(&self, op: &Operation) -> Result<BaseKernel, ImageError> {
        // Boxed: resolve may pull, and pulling needs this.
        let base = Box::pin(self.resolve(None, op)).await?;
        let vmlinux = base
            .vmlinux_path
            .clone()
            .unwrap_or_else(|| base.kernel_path.clone());
        Ok(BaseKernel {
            name: base.name.clone(),
            vmlinuz: (base.kernel_path != vmlinux).then(|| base.kernel_path.clone()),
            vmlinux,
            initrd: base.initrd_path.clone(),
        })
    }

    fn oci_build_options(
        &self,
        dest: &Path,
        agent_bin: PathBuf,
        base: BaseKernel,
        services: Vec<banger_oci::ServiceCheck>,
    ) -> banger_oci::BuildOptions {
        banger_oci::BuildOptions {
            dest_dir: dest.to_path_buf(),
            scratch: build_scratch(&self.dir),
            agent_bin,
            base,
            limits: self.unpack_limits,
            services,
        }
    }

    /// Runs a blocking pull or import, turning its stages into the
    /// operation's stages.
    async fn run_oci(
        &self,
        op: &Operation,
        job: impl FnOnce(&mut dyn FnMut(banger_oci::Event)) -> Result<OciImageManifest, PullError>
        + Send
        + 'static,
    ) -> Result<OciImageManifest, ImageError> {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let fault = self.fault.clone();
        let task = tokio::task::spawn_blocking(move || {
            job(&mut |ev| {
                let started = match ev {
                    banger_oci::Event::Started { stage } => Some(stage),
                    _ => None,
                };
                let _ = tx.send(ev);
                if let (Some(stage), Some(f)) = (started, &fault) {
                    f.hold_pull_stage(stage);
                }
            })
        });
        while let Some(ev) = rx.recv().await {
            match ev {
                banger_oci::Event::Started { stage } => op.stage(stage.name()),
                banger_oci::Event::Note { message, .. } => op.progress(message),
                banger_oci::Event::Finished { .. } => {}
            }
        }
        task.await
            .map_err(|e| ImageError::Failed(format!("image task failed: {e}")))?
            .map_err(ImageError::from)
    }

    /// Records a pulled or imported image (already in `dest`) as ready.
    #[allow(clippy::too_many_arguments)]
    fn record_oci(
        &self,
        name: &str,
        id: &str,
        dest: &Path,
        base: &BaseKernel,
        source_kind: SourceKind,
        source_ref: String,
        source_digest: Option<String>,
        built: Result<OciImageManifest, ImageError>,
    ) -> Result<Image, ImageError> {
        let manifest = built.inspect_err(|e| {
            warn!(image = name, error = %chain(&e), "image failed");
            // Whatever the failed build left: no row will ever own it.
            let _ = std::fs::remove_dir_all(dest);
        })?;
        let image = Image {
            id: id.to_string(),
            name: name.to_string(),
            state: ImageState::Building,
            source_kind,
            source_ref,
            source_digest,
            dir: dest.to_path_buf(),
            kernel_path: dest.join(if base.vmlinuz.is_some() {
                banger_image::VMLINUZ
            } else {
                banger_image::VMLINUX
            }),
            vmlinux_path: Some(dest.join(banger_image::VMLINUX)),
            initrd_path: base
                .initrd
                .as_ref()
                .map(|_| dest.join(banger_image::INITRD)),
            rootfs_path: dest.join(banger_image::ROOTFS),
            work_seed_path: Some(dest.join(banger_image::WORK_SEED)),
            manifest: Default::default(),
            size_bytes: 0,
            default_init: match manifest.default_init {
                banger_image::InitMode::Fast => InitMode::Fast,
                banger_image::InitMode::Systemd => InitMode::Systemd,
            },
            is_default: false,
            last_error: None,
            created_at: banger_store::now_ms(),
        };
        let digests = manifest
            .files
            .iter()
            .map(|(k, d)| (k.clone(), d.sha256.clone()))
            .collect();
        let size = manifest.files.values().map(|d| d.size).sum();
        let recorded = self
            .store
            .insert_image(&image)
            .and_then(|()| self.store.complete_image(id, &digests, size));
        if let Err(e) = recorded {
            self.remove_image(&image);
            return Err(e.into());
        }
        info!(image = %id, name, seconds = manifest.build_seconds, "image built from {}", manifest.source.reference);
        self.store.image_by_id(id).map_err(ImageError::from)
    }

    /// Build a built-in recipe, unless a ready image of that name exists.
    pub async fn build(&self, recipe_name: &str, op: &Operation) -> Result<Image, ImageError> {
        let recipe = builtin_recipe(recipe_name).ok_or_else(|| {
            ImageError::NotFound(format!(
                "no built-in recipe {recipe_name:?} (available: {})",
                banger_image::BUILTIN_RECIPES.join(", ")
            ))
        })?;
        let lock = self.name_lock(recipe_name);
        op.stage("image");
        let _building = lock.lock().await;
        if let Ok(img) = self.store.image_by_name(recipe_name) {
            match img.state {
                ImageState::Ready => return Ok(img),
                // Left over by a daemon that died mid-build: start over.
                _ => self.remove_image(&img),
            }
        }
        let agent_bin = self.agent()?;
        let id = new_id();
        let dest = self.dir.join(&id);
        let image = Image {
            id: id.clone(),
            name: recipe_name.to_string(),
            state: ImageState::Building,
            source_kind: SourceKind::Recipe,
            source_ref: recipe_name.to_string(),
            source_digest: None,
            dir: dest.clone(),
            kernel_path: dest.join("vmlinuz"),
            vmlinux_path: Some(dest.join("vmlinux")),
            initrd_path: Some(dest.join("initrd.img")),
            rootfs_path: dest.join("rootfs.ext4"),
            work_seed_path: Some(dest.join("work-seed.ext4")),
            manifest: Default::default(),
            size_bytes: 0,
            default_init: match recipe.default_init {
                banger_image::InitMode::Fast => InitMode::Fast,
                banger_image::InitMode::Systemd => InitMode::Systemd,
            },
            is_default: false,
            last_error: None,
            created_at: banger_store::now_ms(),
        };
        self.store.insert_image(&image)?;
        info!(image = %id, recipe = recipe_name, "building image");
        std::fs::create_dir_all(&self.dir).map_err(|e| {
            ImageError::Failed(format!("cannot create {}: {e}", self.dir.display()))
        })?;
        let opts = BuildOptions {
            dest_dir: dest.clone(),
            agent_bin,
            mirror: self.mirror.clone(),
            scratch: build_scratch(&self.dir),
            cancel: None,
        };
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let job = tokio::task::spawn_blocking(move || {
            banger_image::build_image(&recipe, &opts, &mut |ev| {
                let _ = tx.send(ev);
            })
        });
        while let Some(ev) = rx.recv().await {
            match ev {
                BuildEvent::Started { stage } => op.progress(format!("{stage}")),
                BuildEvent::Finished { stage, elapsed } => {
                    op.progress(format!("{stage} done in {:.1}s", elapsed.as_secs_f64()))
                }
                BuildEvent::Note { message, .. } => op.progress(message),
                BuildEvent::Output { .. } => {}
            }
        }
        let built = job
            .await
            .map_err(|e| ImageError::Failed(format!("image build task failed: {e}")))?;
        let manifest = match built {
            Ok(m) => m,
            Err(e) => {
                let msg = format!(
                    "building image {recipe_name} failed: {}",
                    crate::errors::chain(&e)
                );
                warn!("{msg}");
                self.remove_image(&image);
                return Err(ImageError::Failed(msg));
            }
        };
        let digests = manifest
            .files
            .iter()
            .map(|(k, d)| (k.clone(), d.sha256.clone()))
            .collect();
        let size = manifest.files.values().map(|d| d.size).sum();
        self.store.complete_image(&id, &digests, size)?;
        if self.store.default_image()?.is_none() {
            self.store.set_default_image(&id)?;
        }
        info!(image = %id, seconds = manifest.build_seconds, "image built");
        self.store.image_by_id(&id).map_err(ImageError::from)
    }

    /// Record existing files as an image, in place, with their digests.
    pub async fn register(&self, p: ImageRegisterParams) -> Result<Image, ImageError> {
        let default_init = p.init.unwrap_or(InitMode::Fast);
        let mut files = vec![
            ("vmlinux", p.vmlinux.clone()),
            ("rootfs", p.rootfs.clone()),
            ("work_seed", p.work_seed.clone()),
        ];
        files.extend(p.initrd.clone().map(|i| ("initrd", i)));
        let mut paths = std::collections::BTreeMap::new();
        for (what, path) in files {
            let abs = std::fs::canonicalize(&path)
                .map_err(|e| ImageError::Invalid(format!("{what} {path:?}: {e}")))?;
            if !abs.is_file() {
                return Err(ImageError::Invalid(format!(
                    "{what} {path:?} is not a file"
                )));
            }
            paths.insert(what, abs);
        }
        let seed = &paths["work_seed"];
        match banger_image::ext4_label(seed) {
            Ok(Some(label)) if label == "work" => {}
            Ok(Some(label)) => {
                return Err(ImageError::Invalid(format!(
                    "work seed {} is labelled {label:?}; the guest mounts the disk labelled \"work\" on /root: relabel it (e2label {} work)",
                    seed.display(),
                    seed.display()
                )));
            }
            Ok(None) => {
                return Err(ImageError::Invalid(format!(
                    "work seed {} is not an ext4 filesystem (make one with mkfs.ext4 -L work)",
                    seed.display()
                )));
            }
            Err(e) => {
                return Err(ImageError::Invalid(format!(
                    "cannot read the work seed {}: {e}",
                    seed.display()
                )));
            }
        }
        let hashed = paths.clone();
        let digests = tokio::task::spawn_blocking(move || {
            hashed
                .iter()
                .map(|(what, path)| banger_image::digest_file(path).map(|d| (what.to_string(), d)))
                .collect::<std::io::Result<Vec<_>>>()
        })
        .await
        .map_err(|e| ImageError::Failed(e.to_string()))?
        .map_err(|e| ImageError::Failed(format!("cannot hash the image files: {e}")))?;
        let id = new_id();
        let vmlinux = paths["vmlinux"].clone();
        let image = Image {
            id: id.clone(),
            name: p.name.clone(),
            state: ImageState::Building,
            source_kind: SourceKind::Register,
            source_ref: vmlinux.parent().unwrap_or(&vmlinux).display().to_string(),
            source_digest: None,
            dir: vmlinux.parent().unwrap_or(&vmlinux).to_path_buf(),
            kernel_path: vmlinux.clone(),
            vmlinux_path: Some(vmlinux),
            initrd_path: paths.get("initrd").cloned(),
            rootfs_path: paths["rootfs"].clone(),
            work_seed_path: Some(paths["work_seed"].clone()),
            manifest: Default::default(),
            size_bytes: 0,
            default_init,
            is_default: false,
            last_error: None,
            created_at: banger_store::now_ms(),
        };
        self.store.insert_image(&image)?;
        let manifest = digests
            .iter()
            .map(|(k, d)| (k.clone(), d.sha256.clone()))
            .collect();
        let size = digests.iter().map(|(_, d)| d.size).sum();
        self.store.complete_image(&id, &manifest, size)?;
        self.store.image_by_id(&id).map_err(ImageError::from)
    }

    pub fn delete(&self, name: &str) -> Result<(), ImageError> {
        let img = self.find(name)?;
        self.store.delete_image(&img.id)?;
        // Registered images point at files banger does not own.
        if img.source_kind != SourceKind::Register {
            let _ = std::fs::remove_dir_all(&img.dir);
        }
        if img.source_kind == SourceKind::Oci {
            self.prune_blobs();
        }
        Ok(())
    }

    /// Removes cached blobs no pulled image names as a layer, unless a pull
    /// is using the cache (then the next delete does it).
    fn prune_blobs(&self) {
        let Ok(_alone) = self.blobs_in_use.try_write() else {
            return;
        };
        let cache = self.dir.join("blobs").join("sha256");
        let Ok(entries) = std::fs::read_dir(&cache) else {
            return;
        };
        let Ok(images) = self.store.list_images() else {
            return;
        };
        let keep: std::collections::HashSet<String> = images
            .iter()
            .filter(|i| i.source_kind == SourceKind::Oci)
            .filter_map(|i| OciImageManifest::read(&i.dir).ok())
            .flat_map(|m| m.source.layers)
            .map(|d| d.trim_start_matches("sha256:").to_owned())
            .collect();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !keep.contains(&name) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }

    pub fn promote(&self, name: &str) -> Result<ImageInfo, ImageError> {
        let img = self.find(name)?;
        if img.state != ImageState::Ready {
            return Err(ImageError::Conflict(format!(
                "image {name:?} is {}; only a ready image can be the default",
                img.state
            )));
        }
        self.store.set_default_image(&img.id)?;
        Ok(Self::info(&self.find(name)?))
    }

    /// What a daemon that died in an image operation left, removed at the
    /// next daemon's start (before any image operation can begin): the
    /// staging and scratch directories of pulls and imports, rows of builds
    /// that never finished, and image directories no row owns. (A build's
    /// scratch tree may hold mounts: the next build sweeps it.)
    pub fn reconcile(&self) {
        banger_oci::sweep_stale(&self.dir, &build_scratch(&self.dir));
        let Ok(images) = self.store.list_images() else {
            return;
        };
        let mut owned = std::collections::HashSet::new();
        for img in images {
            if img.state == ImageState::Building {
                warn!(image = %img.id, name = %img.name, "reconcile: removing an image whose build never finished");
                self.remove_image(&img);
            } else {
                owned.insert(img.dir);
            }
        }
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name();
            let ours = !name.to_string_lossy().starts_with('.') && name != "blobs";
            if ours && e.file_type().is_ok_and(|t| t.is_dir()) && !owned.contains(&e.path()) {
                warn!(dir = %e.path().display(), "reconcile: removing an image directory no image owns");
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }

    fn remove_image(&self, img: &Image) {
        let _ = std::fs::remove_dir_all(&img.dir);
        if let Err(e) = self.store.delete_image(&img.id)
            && !matches!(e, StoreError::NotFound { .. })
        {
            warn!(error = %e, image = %img.id, "cannot remove image row");
        }
    }
}

/// What image operations can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    /// Not ready, or a name taken by another image.
    #[error("{0}")]
    Conflict(String),
    /// Something the host lacks (the guest agent binary).
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Failed(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Pull(#[from] PullError),
    #[error(transparent)]
    Task(#[from] TaskFailed),
}

fn parse_reference(s: &str) -> Result<Reference, ImageError> {
    s.parse::<Reference>()
        .map_err(|e| ImageError::Invalid(e.to_string()))
}

fn check_name(name: &str) -> Result<(), ImageError> {
    if name.is_empty() || name.len() > 256 || name.chars().any(char::is_control) {
        return Err(ImageError::Invalid(format!(
            "image name {name:?} must be 1-256 printable characters"
        )));
    }
    Ok(())
}

/// Where the bootstrapped tree goes while an image builds: tmpfs when it
/// has room (deleting ~700 MB on a disk mounted with `discard` took 25-31 s
/// here, 0.5 s on tmpfs), else beside the images; recorded in `.scratch`.
fn build_scratch(images_dir: &Path) -> banger_image::ScratchSpace {
    const NEEDED: u64 = 3 << 30;
    let shm = Path::new("/dev/shm");
    let dir = match rustix::fs::statvfs(shm) {
        Ok(st) if st.f_bavail.saturating_mul(st.f_frsize) >= NEEDED => shm.to_path_buf(),
        _ => images_dir.to_path_buf(),
    };
    let records = images_dir.join(".scratch");
    banger_image::ScratchSpace { dir, records }
}

/// The static guest agent: next to bangerd, in ../lib/banger (install.sh),
/// or in the cargo target dir (developers and tests). A statically linked
/// one is preferred: pulled images may have no libc it could use (a plain
/// `cargo build` also leaves a dynamically linked one next to bangerd).
fn agent_binary() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    let target = dir.parent()?;
    let found: Vec<PathBuf> = [
        dir.join("banger-agent"),
        target.join("lib/banger/banger-agent"),
        target.join("x86_64-unknown-linux-musl/release/banger-agent"),
        target.join("x86_64-unknown-linux-musl/debug/banger-agent"),
        target.join("x86_64-unknown-linux-gnu/release/banger-agent"),
        target.join("x86_64-unknown-linux-gnu/debug/banger-agent"),
    ]
    .into_iter()
    .filter(|p| p.is_file())
    .collect();
    found
        .iter()
        .find(|p| is_static_elf(p))
        .or(found.first())
        .cloned()
}

/// Whether `path` is an ELF64 executable without a program interpreter.
fn is_static_elf(path: &Path) -> bool {
    use std::io::{Read, Seek, SeekFrom};
    let read = || -> std::io::Result<bool> {
        let mut f = std::fs::File::open(path)?;
        let mut h = [0u8; 64];
        f.read_exact(&mut h)?;
        if &h[..4] != b"\x7fELF" || h[4] != 2 || h[5] != 1 {
            return Ok(false);
        }
        let phoff = u64::from_le_bytes(h[0x20..0x28].try_into().expect("8 bytes"));
        let phentsize = u64::from(u16::from_le_bytes([h[0x36], h[0x37]]));
        let phnum = u16::from_le_bytes([h[0x38], h[0x39]]);
        for i in 0..u64::from(phnum) {
            f.seek(SeekFrom::Start(phoff + i * phentsize))?;
            let mut t = [0u8; 4];
            f.read_exact(&mut t)?;
            const PT_INTERP: u32 = 3;
            if u32::from_le_bytes(t) == PT_INTERP {
                return Ok(false);
            }
        }
        Ok(true)
    };
    read().unwrap_or(false)
}

/// The space the files under `dir` take on disk (allocated blocks, so a
/// sparse 2 GiB rootfs counts what it holds), not following symlinks.
fn allocated_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => allocated_bytes(&e.path()),
            Ok(m) if m.is_file() => m.blocks() * 512,
            _ => 0,
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_use_counts_allocated_blocks_not_the_apparent_size() {
        let dir = tempfile::tempdir().unwrap();
        let rootfs = std::fs::File::create(dir.path().join("rootfs.ext4")).unwrap();
        rootfs.set_len(2 << 30).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&rootfs, &[1u8; 65536], 1 << 20).unwrap();
        rootfs.sync_all().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub/vmlinux"), vec![2u8; 65536]).unwrap();
        std::os::unix::fs::symlink("/usr", dir.path().join("link")).unwrap();
        let used = allocated_bytes(dir.path());
        assert!((128 << 10..4 << 20).contains(&used), "{used} bytes");
    }

    /// A recipe-built image dir's manifest, declaring one readiness check,
    /// listing `rootfs_sha256` as its rootfs.
    fn built_image_dir(rootfs_sha256: &str) -> (tempfile::TempDir, banger_oci::ServiceCheck) {
        let dir = tempfile::tempdir().unwrap();
        let check = banger_oci::ServiceCheck {
            name: "opencode".into(),
            port: Some(4096),
            command: None,
            log: None,
            timeout_secs: 300,
        };
        let manifest = banger_image::ImageManifest {
            format: banger_image::MANIFEST_FORMAT,
            recipe: "dev".into(),
            kernel_version: "6.1.0-test".into(),
            default_init: banger_image::InitMode::Systemd,
            mirror: "http://m.test/debian".into(),
            built_at_unix: 0,
            build_seconds: 1.0,
            files: [(
                banger_image::ROOTFS.to_owned(),
                banger_image::FileDigest {
                    sha256: rootfs_sha256.into(),
                    size: 1,
                },
            )]
            .into(),
            services: vec![check.clone()],
        };
        manifest.write(dir.path()).unwrap();
        (dir, check)
    }

    fn image_in(dir: &Path, source_kind: SourceKind, rootfs_sha256: &str) -> Image {
        Image {
            id: "img".into(),
            name: "dev".into(),
            state: ImageState::Ready,
            source_kind,
            source_ref: "dev".into(),
            source_digest: None,
            dir: dir.to_path_buf(),
            kernel_path: dir.join("vmlinux"),
            vmlinux_path: Some(dir.join("vmlinux")),
            initrd_path: None,
            rootfs_path: dir.join("rootfs.ext4"),
            work_seed_path: None,
            manifest: [("rootfs".to_owned(), rootfs_sha256.to_owned())].into(),
            size_bytes: 0,
            default_init: InitMode::Systemd,
            is_default: false,
            last_error: None,
            created_at: 0,
        }
    }

    #[test]
    fn built_images_and_registrations_of_them_declare_their_recipe_s_services() {
        let store = Arc::new(Store::open_in_memory().unwrap());
        let state = tempfile::tempdir().unwrap();
        let limits = banger_oci::Limits {
            max_bytes: 1 << 30,
            max_entries: 1000,
        };
        let images = ImageService::new(store, state.path(), None, Vec::new(), limits, None);
        let (dir, check) = built_image_dir("aaaa");
        // Built from the recipe: the manifest's checks.
        let built = image_in(dir.path(), SourceKind::Recipe, "");
        assert_eq!(images.services(&built), vec![check.clone()]);
        // The same files registered: they are that image.
        let registered = image_in(dir.path(), SourceKind::Register, "aaaa");
        assert_eq!(images.services(&registered), vec![check]);
        // Another rootfs registered beside that manifest: none.
        let other = image_in(dir.path(), SourceKind::Register, "bbbb");
        assert_eq!(images.services(&other), Vec::new());
        // A registered directory without a manifest: none.
        let bare = tempfile::tempdir().unwrap();
        let bare = image_in(bare.path(), SourceKind::Register, "aaaa");
        assert_eq!(images.services(&bare), Vec::new());
    }

    #[test]
    fn tells_static_from_dynamic_executables() {
        // This test binary has a program interpreter (ld.so).
        assert!(!is_static_elf(&std::env::current_exe().unwrap()));
        let dir = tempfile::tempdir().unwrap();
        // An ELF64 header with no program headers at all: nothing to load.
        let mut elf = vec![0u8; 64];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2;
        elf[5] = 1;
        let path = dir.path().join("static");
        std::fs::write(&path, &elf).unwrap();
        assert!(is_static_elf(&path));
        let script = dir.path().join("script");
        std::fs::write(&script, "#!/bin/sh\n").unwrap();
        assert!(!is_static_elf(&script));
        assert!(!is_static_elf(&dir.path().join("missing")));
    }
}
