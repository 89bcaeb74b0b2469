//! The installs a helper serves, and so the bridges and tables it may act
//! on: an install's nftables table is `banger-<install id>`, and every bridge
//! banger makes carries that same mark as its alias (`IFLA_IFALIAS`), so a
//! bridge with any name (`[network] bridge`) says whose it is.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// One banger install: its id and its state directory, whose owner is the
/// install's owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Install {
    mark: String,
    state_dir: PathBuf,
    /// Known without looking at the state directory (tests on the
    /// recording fake, which run without root).
    fixed_owner: Option<u32>,
}

impl Install {
    /// `id`: the install id of `state_dir` (`banger_config::install_id`).
    pub fn new(id: &str, state_dir: impl Into<PathBuf>) -> Install {
        Install {
            mark: format!("banger-{id}"),
            state_dir: state_dir.into(),
            fixed_owner: None,
        }
    }

    /// An install owned by `uid`, whatever its state directory's owner.
    pub fn owned_by(id: &str, state_dir: impl Into<PathBuf>, uid: u32) -> Install {
        Install {
            fixed_owner: Some(uid),
            ..Install::new(id, state_dir)
        }
    }

    /// `banger-<install id>`: the install's table name and its bridges' alias.
    pub fn mark(&self) -> &str {
        &self.mark
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// The uid owning the state directory itself (not what a symlink there
    /// points at); `None` while it does not exist.
    pub fn owner(&self) -> Option<u32> {
        self.fixed_owner.or_else(|| {
            std::fs::symlink_metadata(&self.state_dir)
                .ok()
                .map(|m| m.uid())
        })
    }
}
