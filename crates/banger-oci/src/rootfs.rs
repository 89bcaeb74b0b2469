//! From an unpacked tree to a banger image directory: the agent and what it
//! needs put into the tree, `rootfs.ext4` made with `mkfs.ext4 -d` (no loop
//! mount), a work seed, the kernel and initrd of a base image, and a
//! `manifest.json` with sha256 fingerprints of every file.
//!
//! Paths inside the tree are resolved as the guest would resolve them
//! (symlinks followed within the tree, never out of it), so an image whose
//! `/usr/local` is an absolute symlink cannot make banger write on the host.

use std::collections::{BTreeMap, VecDeque};
use std::ffi::OsString;
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::process::Command;

use banger_agent_proto::guest::{
    AGENT_GUEST_PATH, SYSTEMD_UNIT, SYSTEMD_UNIT_NAME, SYSTEMD_UNIT_PATH, UDEV_RULE, UDEV_RULE_PATH,
};
use banger_image::{FileDigest, INITRD, InitMode, ROOTFS, VMLINUX, VMLINUZ, WORK_SEED};
use serde::{Deserialize, Serialize};

/// Name of the manifest inside an image directory.
pub const MANIFEST_FILE: &str = "manifest.json";
/// Version of [`OciImageManifest`]'s layout.
pub const FORMAT: u32 = 1;
/// Smallest apparent size of `rootfs.ext4` (sparse), like the default
/// image's: the guest's root is this disk (through its copy-on-write view).
pub const MIN_ROOTFS_MIB: u64 = 2048;
/// Free space a big image's root keeps at least, for what the guest installs.
pub const FREE_ROOTFS_MIB: u64 = 1024;
/// Size of `work-seed.ext4`, grown per VM.
pub const WORK_SEED_MIB: u64 = 64;

#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("{0} is not installed (apt install e2fsprogs)")]
    MissingTool(&'static str),
    #[error("{command} failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("{path} in the image is a symlink loop")]
    SymlinkLoop { path: String },
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> RootfsError {
    let context = context.into();
    move |source| RootfsError::Io { context, source }
}

/// What the tree turned out to have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TreeFacts {
    /// `systemd` when `/sbin/init` is systemd (the agent then runs as its
    /// service), else `fast` (the agent is PID 1).
    pub default_init: InitMode,
    /// The image has `/usr/sbin/sshd` (banger adds none).
    pub sshd: bool,
}

/// Where an image came from, as recorded in its manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Source {
    /// `oci` or `import`.
    pub kind: String,
    /// The normalised reference, or the imported path.
    pub reference: String,
    /// Digest of what the reference named (index or manifest), or of the
    /// imported tarball.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// Digest of the linux/amd64 image manifest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest_digest: Option<String>,
    /// Layer digests, bottom first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layers: Vec<String>,
}

pub use banger_image::ServiceCheck;

/// Readiness checks the default timeout (seconds) applies to.
pub const DEFAULT_SERVICE_TIMEOUT_SECS: u32 = 60;

/// Image config labels that declare readiness checks at `image pull`.
pub const LABEL_WAIT_PORTS: &str = "dev.banger.wait-ports";
pub const LABEL_WAIT_COMMAND: &str = "dev.banger.wait-command";
pub const LABEL_WAIT_LOG: &str = "dev.banger.wait-log";
pub const LABEL_WAIT_TIMEOUT: &str = "dev.banger.wait-timeout";

/// Checks for TCP `ports` (each its own service).
pub fn port_checks(ports: &[u16], timeout_secs: u32, log: Option<&str>) -> Vec<ServiceCheck> {
    ports
        .iter()
        .map(|p| ServiceCheck {
            name: format!("port {p}"),
            port: Some(*p),
            command: None,
            log: log.map(str::to_owned),
            timeout_secs,
        })
        .collect()
}

/// The checks an image config's labels declare: `dev.banger.wait-ports`
/// (`4096,8080`), `dev.banger.wait-command` (a shell command),
/// `dev.banger.wait-log` (a guest file) and `dev.banger.wait-timeout`
/// (seconds). A label banger cannot read is refused, naming it.
pub fn services_from_labels(
    labels: &BTreeMap<String, String>,
) -> Result<Vec<ServiceCheck>, String> {
    let timeout_secs = match labels.get(LABEL_WAIT_TIMEOUT) {
        None => DEFAULT_SERVICE_TIMEOUT_SECS,
        Some(t) => t.trim().parse().ok().filter(|t| *t > 0).ok_or_else(|| {
            format!("label {LABEL_WAIT_TIMEOUT}={t:?} is not a number of seconds")
        })?,
    };
    let log = labels.get(LABEL_WAIT_LOG).map(|l| l.trim());
    let mut ports = Vec::new();
    if let Some(list) = labels.get(LABEL_WAIT_PORTS) {
        for p in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            ports.push(
                p.parse::<u16>()
                    .ok()
                    .filter(|p| *p > 0)
                    .ok_or_else(|| format!("label {LABEL_WAIT_PORTS}: {p:?} is not a TCP port"))?,
            );
        }
    }
    let mut checks = port_checks(&ports, timeout_secs, log);
    if let Some(cmd) = labels
        .get(LABEL_WAIT_COMMAND)
        .filter(|c| !c.trim().is_empty())
    {
        checks.push(ServiceCheck {
            name: "command".into(),
            port: None,
            command: Some(cmd.clone()),
            log: log.map(str::to_owned),
            timeout_secs,
        });
    }
    Ok(checks)
}

/// `manifest.json` of an image made from an OCI image or an import.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OciImageManifest {
    pub format: u32,
    pub source: Source,
    /// The image whose kernel and initrd this one boots.
    pub base_image: String,
    pub default_init: InitMode,
    pub sshd: bool,
    pub built_at_unix: u64,
    pub build_seconds: f64,
    pub files: BTreeMap<String, FileDigest>,
    /// What must be up before a VM of the image counts as ready.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<ServiceCheck>,
}

impl OciImageManifest {
    pub fn read(dir: &Path) -> Result<OciImageManifest, RootfsError> {
        let path = dir.join(MANIFEST_FILE);
        let text =
            std::fs::read(&path).map_err(io_err(format!("cannot read {}", path.display())))?;
        serde_json::from_slice(&text).map_err(|e| RootfsError::Io {
            context: format!("{} is not an OCI image manifest", path.display()),
            source: io::Error::new(io::ErrorKind::InvalidData, e),
        })
    }
}

/// Kernel files of the base image.
#[derive(Debug, Clone)]
pub struct BaseKernel {
    /// The base image's name, for the manifest.
    pub name: String,
    pub vmlinux: PathBuf,
    pub vmlinuz: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
}

/// Resolves `guest_path` inside `root` the way the guest would, following
/// symlinks but never above `root`. Returns the host path (which may not
/// exist) and its path relative to `root`.
pub fn resolve_in_root(root: &Path, guest_path: &str) -> Result<(PathBuf, PathBuf), RootfsError> {
    let mut todo: VecDeque<OsString> = Path::new(guest_path)
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_owned()),
            Component::ParentDir => Some("..".into()),
            _ => None,
        })
        .collect();
    let mut cur = PathBuf::new();
    let mut hops = 0;
    while let Some(c) = todo.pop_front() {
        if c == ".." {
            cur.pop();
            continue;
        }
        let next = cur.join(&c);
        let full = root.join(&next);
        match full.symlink_metadata() {
            Ok(m) if m.file_type().is_symlink() => {
                hops += 1;
                if hops > 40 {
                    return Err(RootfsError::SymlinkLoop {
                        path: guest_path.to_owned(),
                    });
                }
                let target = std::fs::read_link(&full).map_err(io_err(format!(
                    "cannot read the symlink {}",
                    full.display()
                )))?;
                if target.is_absolute() {
                    cur = PathBuf::new();
                }
                let mut comps: Vec<OsString> = target
                    .components()
                    .filter_map(|c| match c {
                        Component::Normal(n) => Some(n.to_owned()),
                        Component::ParentDir => Some("..".into()),
                        _ => None,
                    })
                    .collect();
                comps.extend(todo.drain(..));
                todo = comps.into();
            }
            _ => cur = next,
        }
    }
    Ok((root.join(&cur), cur))
}

/// Makes the directory `guest_path` (resolved in-root), and missing parents.
fn mkdir_in_root(root: &Path, guest_path: &str, mode: u32) -> Result<PathBuf, RootfsError> {
    let (full, _) = resolve_in_root(root, guest_path)?;
    if !full.is_dir() {
        // Every existing component of `full` is a real directory (it is
        // resolved); what is missing is made here, with no symlinks in it.
        std::fs::create_dir_all(&full)
            .map_err(io_err(format!("cannot create {guest_path} in the image")))?;
        std::fs::set_permissions(&full, std::fs::Permissions::from_mode(mode))
            .map_err(io_err(format!("cannot chmod {guest_path} in the image")))?;
    }
    Ok(full)
}

/// Writes a file at `guest_path` (parents resolved in-root; whatever is at
/// the final name is replaced, never written through).
fn write_in_root(
    root: &Path,
    guest_path: &str,
    contents: &[u8],
    mode: u32,
) -> Result<(), RootfsError> {
    let path = Path::new(guest_path);
    let parent = path.parent().and_then(Path::to_str).unwrap_or("/");
    let name = path.file_name().unwrap_or_default();
    let dir = mkdir_in_root(root, parent, 0o755)?;
    let full = dir.join(name);
    if let Ok(m) = full.symlink_metadata() {
        if m.is_dir() {
            std::fs::remove_dir_all(&full)
        } else {
            std::fs::remove_file(&full)
        }
        .map_err(io_err(format!("cannot replace {guest_path} in the image")))?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&full)
        .map_err(io_err(format!("cannot create {guest_path} in the image")))?;
    io::Write::write_all(&mut f, contents)
        .map_err(io_err(format!("cannot write {guest_path} in the image")))?;
    f.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(io_err(format!("cannot chmod {guest_path} in the image")))?;
    if rustix::process::geteuid().is_root() {
        rustix::fs::fchown(&f, Some(rustix::fs::Uid::ROOT), Some(rustix::fs::Gid::ROOT))
            .map_err(|e| io_err(format!("cannot chown {guest_path} in the image"))(e.into()))?;
    }
    Ok(())
}

fn symlink_in_root(root: &Path, guest_path: &str, target: &str) -> Result<(), RootfsError> {
    let path = Path::new(guest_path);
    let parent = path.parent().and_then(Path::to_str).unwrap_or("/");
    let dir = mkdir_in_root(root, parent, 0o755)?;
    let full = dir.join(path.file_name().unwrap_or_default());
    if full.symlink_metadata().is_ok() {
        std::fs::remove_file(&full)
            .map_err(io_err(format!("cannot replace {guest_path} in the image")))?;
    }
    std::os::unix::fs::symlink(target, &full)
        .map_err(io_err(format!("cannot create {guest_path} in the image")))
}

/// Adds what banger needs to an unpacked tree: the agent (the image's init
/// when it has none of its own, else a systemd service), the mount points
/// the initramfs moves its filesystems onto. An sshd is used only when the
/// image has one.
pub fn prepare_tree(tree: &Path, agent_bin: &Path) -> Result<TreeFacts, RootfsError> {
    let agent = std::fs::read(agent_bin).map_err(io_err(format!(
        "cannot read the agent {}",
        agent_bin.display()
    )))?;
    write_in_root(tree, AGENT_GUEST_PATH, &agent, 0o755)?;
    for (dir, mode) in [
        ("/dev", 0o755),
        ("/proc", 0o555),
        ("/sys", 0o555),
        ("/run", 0o755),
        ("/tmp", 0o1777),
        ("/root", 0o700),
        ("/etc", 0o755),
    ] {
        mkdir_in_root(tree, dir, mode)?;
    }
    let (init, init_rel) = resolve_in_root(tree, "/sbin/init")?;
    let systemd = init.is_file() && init_rel.to_string_lossy().contains("systemd");
    if systemd {
        write_in_root(tree, SYSTEMD_UNIT_PATH, SYSTEMD_UNIT.as_bytes(), 0o644)?;
        write_in_root(tree, UDEV_RULE_PATH, UDEV_RULE.as_bytes(), 0o644)?;
        symlink_in_root(
            tree,
            &format!("/etc/systemd/system/multi-user.target.wants/{SYSTEMD_UNIT_NAME}"),
            SYSTEMD_UNIT_PATH,
        )?;
    }
    let (sshd, _) = resolve_in_root(tree, "/usr/sbin/sshd")?;
    Ok(TreeFacts {
        default_init: if systemd {
            InitMode::Systemd
        } else {
            InitMode::Fast
        },
        sshd: sshd.is_file(),
    })
}

/// Bytes and inodes the tree needs.
fn tree_usage(tree: &Path) -> (u64, u64) {
    let (mut bytes, mut inodes) = (0u64, 0u64);
    let mut stack = vec![tree.to_owned()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.filter_map(Result::ok) {
            let Ok(m) = entry.path().symlink_metadata() else {
                continue;
            };
            inodes += 1;
            bytes += m.blocks() * 512;
            if m.is_dir() {
                stack.push(entry.path());
            }
        }
    }
    (bytes, inodes)
}

fn mkfs() -> Result<PathBuf, RootfsError> {
    let paths = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&paths)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join("mkfs.ext4"))
        .find(|p| p.is_file())
        .ok_or(RootfsError::MissingTool("mkfs.ext4"))
}

fn run(cmd: &mut Command) -> Result<(), RootfsError> {
    let shown = format!("{cmd:?}");
    let out = cmd
        .output()
        .map_err(io_err(format!("cannot run {shown}")))?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let tail: Vec<&str> = stderr.lines().rev().take(10).collect();
    Err(RootfsError::Command {
        command: shown,
        status: out.status.to_string(),
        stderr: tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
    })
}

/// `mkfs.ext4` with the options built images use (see
/// [`banger_image::mkfs_args`]).
fn mkfs_command(mkfs: &Path, label: &str) -> Command {
    let mut c = Command::new(mkfs);
    c.args(banger_image::mkfs_args(label, None));
    c
}

/// `rootfs.ext4` from `tree` with `mkfs.ext4 -d`: at least
/// [`MIN_ROOTFS_MIB`] (sparse), and [`FREE_ROOTFS_MIB`] more than the tree
/// needs.
pub fn make_rootfs(tree: &Path, out: &Path) -> Result<String, RootfsError> {
    let (bytes, inodes) = tree_usage(tree);
    // ext4 metadata (inode tables, journal) costs about a tenth more.
    let size_mib = ((bytes + bytes / 10) >> 20)
        .saturating_add(64 + FREE_ROOTFS_MIB)
        .max(MIN_ROOTFS_MIB);
    let default_inodes = (size_mib << 20) / 16384;
    let mut cmd = mkfs_command(&mkfs()?, "rootfs");
    if inodes + inodes / 5 + 1024 > default_inodes {
        cmd.arg("-N").arg((inodes + inodes / 5 + 1024).to_string());
    }
    cmd.arg("-d").arg(tree).arg(out).arg(format!("{size_mib}M"));
    run(&mut cmd)?;
    Ok(format!(
        "tree holds {} MiB in {inodes} inodes; rootfs.ext4 is {size_mib} MiB (sparse)",
        bytes >> 20
    ))
}

/// The tree's `/root` (resolved as the guest would) in an ext4 labelled
/// `work`, to copy and grow per VM: the guest mounts it on `/root`. At least
/// [`WORK_SEED_MIB`]; empty when the image has no `/root` directory.
pub fn make_work_seed(tree: &Path, out: &Path) -> Result<(), RootfsError> {
    let home = resolve_in_root(tree, "/root")
        .ok()
        .map(|(full, _)| full)
        .filter(|p| p.symlink_metadata().is_ok_and(|m| m.is_dir()));
    let mut cmd = mkfs_command(&mkfs()?, "work");
    let mut size_mib = WORK_SEED_MIB;
    if let Some(home) = &home {
        let (bytes, _) = tree_usage(home);
        size_mib = size_mib.max(((bytes + bytes / 10) >> 20) + 16);
        cmd.arg("-d").arg(home);
    }
    run(cmd.arg(out).arg(format!("{size_mib}M")))
}

/// Copies the base image's kernel files into `staging`.
pub fn copy_kernel(base: &BaseKernel, staging: &Path) -> Result<(), RootfsError> {
    let mut files = vec![(&base.vmlinux, VMLINUX)];
    files.extend(base.vmlinuz.iter().map(|p| (p, VMLINUZ)));
    files.extend(base.initrd.iter().map(|p| (p, INITRD)));
    for (from, name) in files {
        std::fs::copy(from, staging.join(name)).map_err(io_err(format!(
            "cannot copy {} from the base image {}",
            from.display(),
            base.name
        )))?;
    }
    Ok(())
}

/// Hashes every file, writes `manifest.json`, makes it all read-only.
pub fn write_manifest(
    staging: &Path,
    mut manifest: OciImageManifest,
) -> Result<OciImageManifest, RootfsError> {
    for name in [VMLINUZ, VMLINUX, INITRD, ROOTFS, WORK_SEED] {
        let path = staging.join(name);
        if !path.exists() {
            continue;
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o444))
            .map_err(io_err(format!("cannot chmod {}", path.display())))?;
        let d = banger_image::digest_file(&path)
            .map_err(io_err(format!("cannot hash {}", path.display())))?;
        manifest.files.insert(name.to_owned(), d);
    }
    let path = staging.join(MANIFEST_FILE);
    let text = serde_json::to_vec_pretty(&manifest).expect("manifest serialises");
    std::fs::write(&path, text).map_err(io_err(format!("cannot write {}", path.display())))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o444))
        .map_err(io_err(format!("cannot chmod {}", path.display())))?;
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_declare_readiness_checks() {
        let labels = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        assert_eq!(services_from_labels(&labels(&[])), Ok(vec![]));
        let got = services_from_labels(&labels(&[
            (LABEL_WAIT_PORTS, "4096, 8080"),
            (LABEL_WAIT_COMMAND, "curl -fs localhost:4096"),
            (LABEL_WAIT_LOG, "/var/log/app.log"),
            (LABEL_WAIT_TIMEOUT, "30"),
        ]))
        .unwrap();
        assert_eq!(got.len(), 3);
        assert_eq!(
            (got[0].name.as_str(), got[0].port),
            ("port 4096", Some(4096))
        );
        assert_eq!(got[1].port, Some(8080));
        assert_eq!(got[2].command.as_deref(), Some("curl -fs localhost:4096"));
        assert!(got.iter().all(|c| c.timeout_secs == 30));
        assert!(
            got.iter()
                .all(|c| c.log.as_deref() == Some("/var/log/app.log"))
        );
        let bad = services_from_labels(&labels(&[(LABEL_WAIT_PORTS, "80,http")]));
        assert_eq!(
            bad,
            Err("label dev.banger.wait-ports: \"http\" is not a TCP port".into())
        );
        assert!(services_from_labels(&labels(&[(LABEL_WAIT_TIMEOUT, "0")])).is_err());
    }

    #[test]
    fn resolves_symlinks_inside_the_root_only() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("usr/lib/systemd")).unwrap();
        std::fs::write(root.join("usr/lib/systemd/systemd"), "").unwrap();
        std::fs::create_dir_all(root.join("sbin")).unwrap();
        std::os::unix::fs::symlink("/usr/lib/systemd/systemd", root.join("sbin/init")).unwrap();
        std::os::unix::fs::symlink("../../../../../../etc", root.join("up")).unwrap();
        std::os::unix::fs::symlink("loop", root.join("loop")).unwrap();
        let (full, rel) = resolve_in_root(root, "/sbin/init").unwrap();
        assert_eq!(rel, Path::new("usr/lib/systemd/systemd"));
        assert_eq!(full, root.join("usr/lib/systemd/systemd"));
        // `..` stops at the root, as in the guest.
        assert_eq!(
            resolve_in_root(root, "/up/passwd").unwrap().1,
            Path::new("etc/passwd")
        );
        assert!(matches!(
            resolve_in_root(root, "/loop/x"),
            Err(RootfsError::SymlinkLoop { .. })
        ));
    }

    #[test]
    fn prepare_tree_adds_the_agent_without_writing_through_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("tree");
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(tree.join("usr")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        // An absolute symlink that would point at the host if followed there.
        std::os::unix::fs::symlink(&outside, tree.join("usr/local")).unwrap();
        let agent = dir.path().join("agent");
        std::fs::write(&agent, "ELF").unwrap();
        let facts = prepare_tree(&tree, &agent).unwrap();
        assert_eq!(facts.default_init, InitMode::Fast);
        assert!(!facts.sshd);
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
        let inside = tree
            .join(outside.strip_prefix("/").unwrap())
            .join("bin/banger-agent");
        assert_eq!(std::fs::read_to_string(&inside).unwrap(), "ELF");
        let mode = inside.metadata().unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o755);
        assert!(tree.join("proc").is_dir() && tree.join("dev").is_dir());
        assert_eq!(
            tree.join("proc").metadata().unwrap().permissions().mode() & 0o7777,
            0o555
        );
    }

    #[test]
    fn systemd_images_get_the_agent_service() {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("tree");
        std::fs::create_dir_all(tree.join("lib/systemd")).unwrap();
        std::fs::create_dir_all(tree.join("sbin")).unwrap();
        std::fs::create_dir_all(tree.join("usr/sbin")).unwrap();
        std::fs::write(tree.join("lib/systemd/systemd"), "").unwrap();
        std::fs::write(tree.join("usr/sbin/sshd"), "").unwrap();
        std::os::unix::fs::symlink("../lib/systemd/systemd", tree.join("sbin/init")).unwrap();
        let agent = dir.path().join("agent");
        std::fs::write(&agent, "ELF").unwrap();
        let facts = prepare_tree(&tree, &agent).unwrap();
        assert_eq!(facts.default_init, InitMode::Systemd);
        assert!(facts.sshd);
        let wants = tree.join("etc/systemd/system/multi-user.target.wants/banger-agent.service");
        assert_eq!(
            std::fs::read_link(wants).unwrap(),
            Path::new(SYSTEMD_UNIT_PATH)
        );
        assert!(tree.join(UDEV_RULE_PATH.trim_start_matches('/')).is_file());
    }
}
