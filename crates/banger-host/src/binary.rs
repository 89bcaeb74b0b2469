//! Finding executables the way a shell would, plus the sbin directories.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

/// Searched after `PATH`: `mkfs.ext4`, `resize2fs` and `nft` live in sbin, which a
/// non-root user's `PATH` often lacks.
const SBIN_DIRS: [&str; 3] = ["/usr/local/sbin", "/usr/sbin", "/sbin"];

/// Locates an executable.
///
/// A value containing `/` is a path (absolute, or relative to the working directory) and is
/// returned if it is an executable regular file. A bare name is searched in `PATH`, then in
/// `/usr/local/sbin`, `/usr/sbin` and `/sbin`.
pub fn find_binary(name_or_path: &str) -> Option<PathBuf> {
    let path_var = std::env::var_os("PATH");
    let sbin = SBIN_DIRS.map(Path::new);
    find_binary_in(name_or_path, path_var.as_deref(), &sbin)
}

pub(crate) fn find_binary_in(
    name_or_path: &str,
    path_var: Option<&OsStr>,
    extra_dirs: &[&Path],
) -> Option<PathBuf> {
    if name_or_path.is_empty() {
        return None;
    }
    if name_or_path.contains('/') {
        let path = PathBuf::from(name_or_path);
        return is_executable(&path).then_some(path);
    }
    path_var
        .into_iter()
        .flat_map(std::env::split_paths)
        .chain(extra_dirs.iter().map(|dir| dir.to_path_buf()))
        // An empty PATH entry means "the working directory" to a POSIX shell; resolving tools
        // from wherever banger happens to run is a trap, so it is skipped.
        .filter(|dir| !dir.as_os_str().is_empty())
        .map(|dir| dir.join(name_or_path))
        .find(|candidate| is_executable(candidate))
}

/// A regular file (after following symlinks) that the caller may execute.
fn is_executable(path: &Path) -> bool {
    path.is_file() && rustix::fs::access(path, rustix::fs::Access::EXEC_OK).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    fn write_file(path: &Path, mode: u32) {
        fs::write(path, "#!/bin/sh\n").unwrap();
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn bare_name_found_in_path_in_order() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        fs::create_dir_all(&a).unwrap();
        fs::create_dir_all(&b).unwrap();
        write_file(&a.join("tool"), 0o755);
        write_file(&b.join("tool"), 0o755);
        let path_var = std::env::join_paths([&b, &a]).unwrap();
        assert_eq!(
            find_binary_in("tool", Some(&path_var), &[]),
            Some(b.join("tool"))
        );
    }

    #[test]
    fn non_executable_and_directories_are_skipped() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b, c) = (
            tmp.path().join("a"),
            tmp.path().join("b"),
            tmp.path().join("c"),
        );
        for dir in [&a, &b, &c] {
            fs::create_dir_all(dir).unwrap();
        }
        write_file(&a.join("tool"), 0o644);
        fs::create_dir_all(b.join("tool")).unwrap();
        write_file(&c.join("tool"), 0o700);
        let path_var = std::env::join_paths([&a, &b, &c]).unwrap();
        assert_eq!(
            find_binary_in("tool", Some(&path_var), &[]),
            Some(c.join("tool"))
        );
        let only_bad = std::env::join_paths([&a, &b]).unwrap();
        assert_eq!(find_binary_in("tool", Some(&only_bad), &[]), None);
    }

    #[test]
    fn extra_dirs_searched_after_path() {
        let tmp = tempfile::tempdir().unwrap();
        let sbin = tmp.path().join("sbin");
        fs::create_dir_all(&sbin).unwrap();
        write_file(&sbin.join("mkfs.ext4"), 0o755);
        let empty = tmp.path().join("empty");
        fs::create_dir_all(&empty).unwrap();
        assert_eq!(
            find_binary_in("mkfs.ext4", Some(empty.as_os_str()), &[&sbin]),
            Some(sbin.join("mkfs.ext4"))
        );
        assert_eq!(
            find_binary_in("mkfs.ext4", None, &[&sbin]),
            Some(sbin.join("mkfs.ext4"))
        );
        assert_eq!(find_binary_in("mkfs.ext4", None, &[]), None);
    }

    #[test]
    fn paths_are_checked_not_searched() {
        let tmp = tempfile::tempdir().unwrap();
        let exe = tmp.path().join("firecracker");
        write_file(&exe, 0o755);
        let plain = tmp.path().join("plain");
        write_file(&plain, 0o644);
        let exe_str = exe.to_str().unwrap();
        assert_eq!(find_binary(exe_str), Some(exe.clone()));
        assert_eq!(find_binary(plain.to_str().unwrap()), None);
        assert_eq!(
            find_binary(tmp.path().join("missing").to_str().unwrap()),
            None
        );
        // A path is never looked up in PATH, even if a same-named file is there.
        let path_var = tmp.path().as_os_str();
        assert_eq!(find_binary_in("./firecracker", Some(path_var), &[]), None);
        assert_eq!(find_binary(""), None);
    }

    #[test]
    fn real_host_finds_sh() {
        // /bin/sh exists on every Linux host banger supports.
        let sh = find_binary("sh").expect("sh on PATH");
        assert!(sh.is_absolute());
        assert_eq!(find_binary("/bin/sh"), Some(PathBuf::from("/bin/sh")));
    }
}
