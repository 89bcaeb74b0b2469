//! OCI images for banger.
//!
//! - [`Reference`]: `[REGISTRY/]REPOSITORY[:TAG][@DIGEST]`, normalised like Docker
//!   (`alpine` → `docker.io/library/alpine:latest`, served by `registry-1.docker.io`).
//! - [`registry`]: a small blocking client for the distribution API: anonymous,
//!   basic or bearer-token auth (credentials from `~/.docker/config.json`),
//!   manifests and indexes (OCI and Docker v2) with linux/amd64 selection,
//!   blobs streamed into a content-addressed cache with sha256 verification
//!   and resumption of partial downloads.
//! - [`layer`]: applying layers in order, honouring whiteouts and opaque
//!   directories, refusing entries that would escape the root.
//! - [`rootfs`]: turning an unpacked tree into a banger image directory
//!   (agent, `rootfs.ext4` via `mkfs.ext4 -d`, work seed, kernel and initrd
//!   from a base image, `manifest.json`).

pub mod auth;
pub mod digest;
pub mod layer;
pub mod manifest;
pub mod pull;
pub mod reference;
pub mod registry;
pub mod rootfs;

pub use layer::{Applier, ApplyStats, Cap, LayerError, Limits};
pub use pull::{BuildOptions, Event, PullError, Stage, import, pull, sweep_stale};
pub use reference::{DOCKER_HUB, DOCKER_HUB_API, Reference, ReferenceError, looks_like_reference};
pub use registry::{BlobCache, Registry, RegistryError, RegistryOptions, Resolved};
pub use rootfs::{
    BaseKernel, OciImageManifest, ServiceCheck, TreeFacts, port_checks, services_from_labels,
};
