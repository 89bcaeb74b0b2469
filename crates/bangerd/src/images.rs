//! `ImageService`: the images VMs boot from. Owns the image rows and the
//! `<state>/images` directory. The default image is built from a built-in
//! recipe by the first request that needs it; concurrent requests for the
//! same recipe wait for that one build.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use banger_image::{BuildOptions, StageEvent as BuildEvent, builtin_recipe};
use banger_rpc::RpcError;
use banger_store::{Image, ImageState, InitMode, SourceKind, Store, StoreError};
use banger_wire::methods::{ImageInfo, ImageRegisterParams};
use tracing::{info, warn};

use crate::errors::store_err;
use crate::ops::Operation;

/// The recipe behind the default image.
pub const DEFAULT_RECIPE: &str = "debian-12";

#[derive(Debug)]
pub struct ImageService {
    store: Arc<Store>,
    dir: PathBuf,
    agent_bin: Option<PathBuf>,
    /// `[image] mirror`; the host's own Debian mirror when unset.
    mirror: Option<String>,
    /// One lock per recipe: a second build request waits for the first.
    building: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl ImageService {
    pub fn new(store: Arc<Store>, state_dir: &Path, mirror: Option<String>) -> Self {
        ImageService {
            store,
            dir: state_dir.join("images"),
            agent_bin: agent_binary(),
            mirror,
            building: Mutex::default(),
        }
    }

    pub fn info(image: &Image) -> ImageInfo {
        ImageInfo {
            id: image.id.clone(),
            name: image.name.clone(),
            state: image.state.to_string(),
            source: format!("{}:{}", image.source_kind, image.source_ref),
            is_default: image.is_default,
            default_init: image.default_init.to_string(),
            size_bytes: image.size_bytes,
            dir: image.dir.display().to_string(),
            created_at_ms: image.created_at,
            last_error: image.last_error.clone(),
        }
    }

    pub fn list(&self) -> Result<Vec<ImageInfo>, RpcError> {
        Ok(self
            .store
            .list_images()
            .map_err(store_err)?
            .iter()
            .map(Self::info)
            .collect())
    }

    pub fn find(&self, name: &str) -> Result<Image, RpcError> {
        self.store.find_image(name).map_err(store_err)
    }

    /// The image a VM should boot: `name`, or the default one. A built-in
    /// recipe's image is built on first use, reporting progress on `op`.
    pub async fn resolve(&self, name: Option<&str>, op: &Operation) -> Result<Image, RpcError> {
        match name {
            None => match self.store.default_image().map_err(store_err)? {
                Some(img) if img.state == ImageState::Ready => Ok(img),
                _ => self.build(DEFAULT_RECIPE, op).await,
            },
            Some(n) => match self.store.find_image(n) {
                Ok(img) if img.state == ImageState::Ready => Ok(img),
                Ok(img) => Err(RpcError::conflict(format!(
                    "image {n:?} is {} (not ready)",
                    img.state
                ))),
                Err(e) if e.is_not_found() && builtin_recipe(n).is_some() => {
                    self.build(n, op).await
                }
                Err(e) => Err(store_err(e)),
            },
        }
    }

    /// Build a built-in recipe, unless a ready image of that name exists.
    pub async fn build(&self, recipe_name: &str, op: &Operation) -> Result<Image, RpcError> {
        let recipe = builtin_recipe(recipe_name).ok_or_else(|| {
            RpcError::not_found(format!(
                "no built-in recipe {recipe_name:?} (available: {DEFAULT_RECIPE})"
            ))
        })?;
        let lock = self
            .building
            .lock()
            .expect("building lock")
            .entry(recipe_name.to_string())
            .or_default()
            .clone();
        op.stage("image");
        let _building = lock.lock().await;
        if let Ok(img) = self.store.image_by_name(recipe_name) {
            match img.state {
                ImageState::Ready => return Ok(img),
                // Left over by a daemon that died mid-build: start over.
                _ => self.remove_image(&img),
            }
        }
        let agent_bin = self.agent_bin.clone().ok_or_else(|| {
            RpcError::unavailable(
                "the guest agent binary (banger-agent) was not found next to bangerd or in ../lib/banger; \
                 reinstall with ./install.sh (developers: scripts/build-agent.sh)",
            )
        })?;
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
            default_init: InitMode::Fast,
            is_default: false,
            last_error: None,
            created_at: banger_store::now_ms(),
        };
        self.store.insert_image(&image).map_err(store_err)?;
        info!(image = %id, recipe = recipe_name, "building image");
        std::fs::create_dir_all(&self.dir).map_err(|e| {
            RpcError::internal(format!("cannot create {}: {e}", self.dir.display()))
        })?;
        let opts = BuildOptions {
            dest_dir: dest.clone(),
            agent_bin,
            mirror: self.mirror.clone(),
            work_dir: build_scratch(&self.dir),
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
            .map_err(|e| RpcError::internal(format!("image build task failed: {e}")))?;
        let manifest = match built {
            Ok(m) => m,
            Err(e) => {
                let msg = format!(
                    "building image {recipe_name} failed: {}",
                    crate::errors::chain(&e)
                );
                warn!("{msg}");
                self.remove_image(&image);
                return Err(RpcError::internal(msg));
            }
        };
        let digests = manifest
            .files
            .iter()
            .map(|(k, d)| (k.clone(), d.sha256.clone()))
            .collect();
        let size = manifest.files.values().map(|d| d.size).sum();
        self.store
            .complete_image(&id, &digests, size)
            .map_err(store_err)?;
        if self.store.default_image().map_err(store_err)?.is_none() {
            self.store.set_default_image(&id).map_err(store_err)?;
        }
        info!(image = %id, seconds = manifest.build_seconds, "image built");
        self.store.image_by_id(&id).map_err(store_err)
    }

    /// Record existing files as an image, in place, with their digests.
    pub async fn register(&self, p: ImageRegisterParams) -> Result<Image, RpcError> {
        let default_init = match p.init.as_deref() {
            None => InitMode::Fast,
            Some(s) => s
                .parse::<InitMode>()
                .map_err(|e| RpcError::invalid_params(e.to_string()))?,
        };
        let mut files = vec![
            ("vmlinux", p.vmlinux.clone()),
            ("rootfs", p.rootfs.clone()),
            ("work_seed", p.work_seed.clone()),
        ];
        files.extend(p.initrd.clone().map(|i| ("initrd", i)));
        let mut paths = std::collections::BTreeMap::new();
        for (what, path) in files {
            let abs = std::fs::canonicalize(&path)
                .map_err(|e| RpcError::invalid_params(format!("{what} {path:?}: {e}")))?;
            if !abs.is_file() {
                return Err(RpcError::invalid_params(format!(
                    "{what} {path:?} is not a file"
                )));
            }
            paths.insert(what, abs);
        }
        let hashed = paths.clone();
        let digests = tokio::task::spawn_blocking(move || {
            hashed
                .iter()
                .map(|(what, path)| banger_image::digest_file(path).map(|d| (what.to_string(), d)))
                .collect::<std::io::Result<Vec<_>>>()
        })
        .await
        .map_err(|e| RpcError::internal(e.to_string()))?
        .map_err(|e| RpcError::internal(format!("cannot hash the image files: {e}")))?;
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
        self.store.insert_image(&image).map_err(store_err)?;
        let manifest = digests
            .iter()
            .map(|(k, d)| (k.clone(), d.sha256.clone()))
            .collect();
        let size = digests.iter().map(|(_, d)| d.size).sum();
        self.store
            .complete_image(&id, &manifest, size)
            .map_err(store_err)?;
        self.store.image_by_id(&id).map_err(store_err)
    }

    pub fn delete(&self, name: &str) -> Result<(), RpcError> {
        let img = self.find(name)?;
        self.store.delete_image(&img.id).map_err(store_err)?;
        // Registered images point at files banger does not own.
        if img.source_kind != SourceKind::Register {
            let _ = std::fs::remove_dir_all(&img.dir);
        }
        Ok(())
    }

    pub fn promote(&self, name: &str) -> Result<ImageInfo, RpcError> {
        let img = self.find(name)?;
        if img.state != ImageState::Ready {
            return Err(RpcError::conflict(format!(
                "image {name:?} is {}; only a ready image can be the default",
                img.state
            )));
        }
        self.store.set_default_image(&img.id).map_err(store_err)?;
        Ok(Self::info(&self.find(name)?))
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

/// Where the bootstrapped tree goes while an image builds: tmpfs when it
/// has room (deleting ~700 MB on a disk mounted with `discard` took 25-31 s
/// here, 0.5 s on tmpfs), else beside the images.
fn build_scratch(images_dir: &Path) -> PathBuf {
    const NEEDED: u64 = 3 << 30;
    let shm = Path::new("/dev/shm");
    match rustix::fs::statvfs(shm) {
        Ok(st) if st.f_bavail.saturating_mul(st.f_frsize) >= NEEDED => shm.to_path_buf(),
        _ => images_dir.to_path_buf(),
    }
}

/// 12 hex characters: short enough for socket paths under the state dir.
pub fn new_id() -> String {
    format!("{:012x}", fastrand::u64(..) & 0xffff_ffff_ffff)
}

/// The static guest agent: next to bangerd, in ../lib/banger (install.sh),
/// or in the cargo target dir (developers and tests).
fn agent_binary() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    let target = dir.parent()?;
    [
        dir.join("banger-agent"),
        target.join("lib/banger/banger-agent"),
        target.join("x86_64-unknown-linux-gnu/release/banger-agent"),
        target.join("x86_64-unknown-linux-gnu/debug/banger-agent"),
    ]
    .into_iter()
    .find(|p| p.is_file())
}
