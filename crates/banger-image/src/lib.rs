//! Builds banger guest images locally from a distribution archive.
//!
//! An image is a directory holding, never modified after the build:
//!
//! | file | what |
//! |---|---|
//! | `vmlinuz` | the distribution's bzImage |
//! | `vmlinux` | the uncompressed kernel ELF, booted through its PVH entry (QEMU `-kernel`, Firecracker) |
//! | `initrd.img` | banger's initramfs: busybox, virtio/ext4/vsock modules, an `/init` that switch_roots to systemd or to the agent (`banger.init=fast`) |
//! | `rootfs.ext4` | the read-only base root filesystem (ext4, label `rootfs`) |
//! | `work-seed.ext4` | the tree's `/root` in a small ext4 (label `work`), copied and grown per VM; the guest mounts it on `/root` |
//! | `manifest.json` | sizes and SHA-256 of the above, kernel version, recipe, build time, default init mode, readiness checks (the recipe's `[[services]]`) |
//!
//! [`build_image`] runs the whole build (minutes; blocking) and reports
//! [`Stage`]s through a callback. Recipes are data (`recipes/*.toml`).
//! Scratch space for the tree is a [`ScratchSpace`]: private directories,
//! recorded in banger's state, in a place (`/dev/shm`) others may share.

mod build;
mod command;
pub mod cpio;
mod ext4;
mod initramfs;
mod kernel;
mod manifest;
pub mod mirror;
pub mod modules;
mod recipe;
mod scratch;
#[cfg(any(test, feature = "test-support"))]
pub mod test_support;

pub use banger_agent_proto::guest::AGENT_GUEST_PATH;
pub use build::{
    BuildError, BuildOptions, Stage, StageEvent, build_image, build_image_with, mkfs_args,
};
pub use command::{CommandError, CommandRunner, HostCommand, SystemRunner};
pub use ext4::ext4_label;
pub use initramfs::{INIT_SCRIPT, InitramfsError, InitramfsReport, build_initramfs};
pub use kernel::{KernelError, extract_vmlinux};
pub use manifest::{
    FileDigest, IMAGE_FILES, INITRD, ImageManifest, InitMode, MANIFEST_FILE, MANIFEST_FORMAT,
    ManifestError, ROOTFS, ServiceCheck, VMLINUX, VMLINUZ, VerifyError, WORK_SEED, digest_file,
};
pub use mirror::host_debian_mirror;
pub use recipe::{
    BUILTIN_RECIPES, Bootstrap, Disk, FileSpec, Initramfs, Npm, NpmProject, Recipe, RecipeError,
    System, builtin_recipe, npm_project,
};
pub use scratch::{ScratchDir, ScratchError, ScratchSpace, pid_is_running};
