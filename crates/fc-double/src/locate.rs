//! Finding `firecracker-api.yaml`.
//!
//! The spec is shared data beside the repository
//! (`<repo>/../shared/reference/firecracker/firecracker-api.yaml`), never
//! copied into it. In order:
//! 1. `--spec PATH`, or the environment variable `BANGER_FC_SPEC`;
//! 2. `shared/reference/firecracker/firecracker-api.yaml` under any ancestor
//!    of the directory holding the fc-double binary (works for any target
//!    directory inside or beside the repository);
//! 3. the same under any ancestor of this crate's source directory, as
//!    recorded at build time (works for a target directory elsewhere).

use std::path::{Path, PathBuf};

use anyhow::bail;

/// Where the spec lives relative to an ancestor directory.
const RELATIVE: &str = "shared/reference/firecracker/firecracker-api.yaml";

pub fn find_spec(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(path) = explicit {
        if path.is_file() {
            return Ok(path.to_owned());
        }
        bail!(
            "the Firecracker API spec {} (from --spec or BANGER_FC_SPEC) does not exist",
            path.display()
        );
    }
    let exe_dir = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_owned));
    let manifest_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let starts: Vec<PathBuf> = exe_dir.into_iter().chain([manifest_dir]).collect();
    for start in &starts {
        for dir in start.ancestors() {
            let candidate = dir.join(RELATIVE);
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    bail!(
        "cannot find the Firecracker API spec: no {RELATIVE} in any parent of {}; \
         pass --spec PATH or set BANGER_FC_SPEC",
        starts
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(" or ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_path_must_exist() {
        let err = find_spec(Some(Path::new("/nonexistent/fc.yaml"))).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/fc.yaml"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("api.yaml");
        std::fs::write(&file, "x").unwrap();
        assert_eq!(find_spec(Some(&file)).unwrap(), file);
    }

    #[test]
    fn found_beside_the_repository() {
        let found = find_spec(None).unwrap();
        assert!(found.ends_with(RELATIVE), "{}", found.display());
    }
}
