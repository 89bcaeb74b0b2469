//! [`LinuxHostDisk`]: the real [`HostDisk`], with `losetup` and `dmsetup`
//! (no shell; arguments are passed as they are) and sysfs for listing.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use crate::host::{DmDevice, FileId, HostDisk, HostError, LoopDevice};

const CONTROL: &str = "/dev/mapper/control";

/// The host's device-mapper and loop devices.
#[derive(Debug, Clone, Default)]
pub struct LinuxHostDisk {
    sys_block: PathBuf,
}

impl LinuxHostDisk {
    pub fn new() -> Self {
        LinuxHostDisk {
            sys_block: PathBuf::from("/sys/block"),
        }
    }
}

/// Run `program` with `args`; its trimmed stdout, or an error carrying its
/// stderr.
async fn run(op: String, program: &str, args: &[&str]) -> Result<String, HostError> {
    let bin = banger_host::find_binary(program).ok_or_else(|| {
        HostError::new(
            op.clone(),
            format!("{program} not found (install util-linux and dmsetup)"),
        )
    })?;
    let out = tokio::process::Command::new(&bin)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|e| HostError::new(op.clone(), format!("cannot run {}: {e}", bin.display())))?;
    if !out.status.success() {
        return Err(HostError::new(
            op,
            format!(
                "{program} {} failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Is loop `device` backed by `file` (same inode on the same device)?
async fn same_file(file: &File, device: &str) -> Result<(), String> {
    let st = rustix::fs::fstat(file).map_err(|e| format!("cannot stat the file: {e}"))?;
    let want = format!(
        "{} {}:{}",
        st.st_ino,
        rustix::fs::major(st.st_dev),
        rustix::fs::minor(st.st_dev)
    );
    let out = run(
        format!("cannot read what {device} is backed by"),
        "losetup",
        &[
            "--list",
            "--noheadings",
            "--output",
            "BACK-INO,BACK-MAJ:MIN",
            device,
        ],
    )
    .await
    .map_err(|e| format!("{e}: {}", e.source))?;
    let got = out.split_whitespace().collect::<Vec<_>>().join(" ");
    if got == want {
        Ok(())
    } else {
        Err(format!(
            "{device} is backed by inode {got}, not the file checked (inode {want}); detached it"
        ))
    }
}

/// Entries of `dir` whose name starts with `prefix`.
fn entries(dir: &Path, prefix: &str) -> std::io::Result<Vec<String>> {
    let mut out: Vec<String> = std::fs::read_dir(dir)?
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(prefix))
        .collect();
    out.sort();
    Ok(out)
}

impl HostDisk for LinuxHostDisk {
    fn unavailable(&self) -> Option<String> {
        if !Path::new(CONTROL).exists() {
            return Some(format!(
                "{CONTROL} is missing: load device-mapper (modprobe dm_snapshot)"
            ));
        }
        ["losetup", "dmsetup"]
            .into_iter()
            .find(|p| banger_host::find_binary(p).is_none())
            .map(|p| format!("{p} not found (install util-linux and dmsetup)"))
    }

    async fn loop_attach(
        &self,
        file: &File,
        path: &Path,
        read_only: bool,
    ) -> Result<String, HostError> {
        // losetup opens the file we opened and checked, not the path again.
        let fd = format!("/proc/{}/fd/{}", std::process::id(), file.as_raw_fd());
        let mut args = vec!["--find", "--show"];
        if read_only {
            args.push("--read-only");
        }
        args.push(&fd);
        let op = format!("cannot attach {} to a loop device", path.display());
        let device = run(op.clone(), "losetup", &args).await?;
        if !device.starts_with("/dev/loop") {
            return Err(HostError::new(
                op,
                format!("losetup printed {device:?}, not a loop device"),
            ));
        }
        // losetup opens the path our fd link resolves to: make sure what it
        // attached is the very file we checked, not one swapped in meanwhile.
        if let Err(why) = same_file(file, &device).await {
            let _ = self.loop_detach(&device).await;
            return Err(HostError::new(op, why));
        }
        Ok(device)
    }

    async fn loop_detach(&self, device: &str) -> Result<(), HostError> {
        run(
            format!("cannot detach loop device {device}"),
            "losetup",
            &["--detach", device],
        )
        .await
        .map(drop)
    }

    /// From `losetup --json`, which asks each device (`LOOP_GET_STATUS64`)
    /// for its backing file's device and inode as well as its path.
    async fn loops(&self) -> Result<Vec<LoopDevice>, HostError> {
        let json = run(
            "cannot list loop devices".into(),
            "losetup",
            &[
                "--list",
                "--json",
                "--output",
                "NAME,BACK-FILE,BACK-INO,BACK-MAJ:MIN",
            ],
        )
        .await?;
        let mut loops =
            parse_losetup(&json).map_err(|e| HostError::new("cannot read losetup's list", e))?;
        loops.sort_by(|a, b| a.device.cmp(&b.device));
        Ok(loops)
    }

    async fn dm_create(&self, name: &str, table: &str) -> Result<(), HostError> {
        let op = format!("cannot create dm device {name}");
        run(op.clone(), "dmsetup", &["create", name, "--table", table]).await?;
        // Where no udev makes /dev/mapper/<name>, make it ourselves.
        run(op, "dmsetup", &["mknodes", name]).await.map(drop)
    }

    async fn dm_remove(&self, name: &str) -> Result<(), HostError> {
        // --retry: udev may still hold the device open for a moment.
        run(
            format!("cannot remove dm device {name}"),
            "dmsetup",
            &["remove", "--retry", name],
        )
        .await
        .map(drop)
    }

    async fn dm_devices(&self) -> Result<Vec<DmDevice>, HostError> {
        let devs = entries(&self.sys_block, "dm-")
            .map_err(|e| HostError::new("cannot list dm devices in /sys/block", e))?;
        let mut out = Vec::new();
        for d in devs {
            let dir = self.sys_block.join(&d);
            let Ok(name) = std::fs::read_to_string(dir.join("dm/name")) else {
                continue; // removed meanwhile
            };
            let slaves = entries(&dir.join("slaves"), "")
                .unwrap_or_default()
                .into_iter()
                .map(|s| format!("/dev/{s}"))
                .collect();
            out.push(DmDevice {
                name: name.trim_end().to_owned(),
                slaves,
            });
        }
        Ok(out)
    }

    async fn dm_chown(&self, name: &str, uid: u32) -> Result<String, HostError> {
        let node = format!("/dev/mapper/{name}");
        // chown follows a udev symlink to the /dev/dm-N node itself.
        rustix::fs::chown(node.as_str(), Some(rustix::fs::Uid::from_raw(uid)), None)
            .map_err(|e| HostError::new(format!("cannot give {node} to uid {uid}"), e))?;
        Ok(node)
    }
}

/// `losetup --list --json --output NAME,BACK-FILE,BACK-INO,BACK-MAJ:MIN`
/// (numbers come as JSON numbers or strings, by util-linux version; an
/// empty list prints nothing at all).
fn parse_losetup(json: &str) -> Result<Vec<LoopDevice>, String> {
    if json.trim().is_empty() {
        return Ok(Vec::new());
    }
    let v: serde_json::Value = serde_json::from_str(json).map_err(|e| e.to_string())?;
    let text = |d: &serde_json::Value, k: &str| match &d[k] {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    };
    let mut out = Vec::new();
    for d in v["loopdevices"].as_array().into_iter().flatten() {
        let (Some(device), Some(backing)) = (text(d, "name"), text(d, "back-file")) else {
            continue;
        };
        let backing = backing.strip_suffix(" (deleted)").unwrap_or(&backing);
        let ino = text(d, "back-ino").and_then(|i| i.parse().ok());
        let dev = text(d, "back-maj:min").and_then(|m| {
            // Padded for the table even in JSON ("     254:0  ").
            let (a, b) = m.trim().split_once(':')?;
            Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
        });
        out.push(LoopDevice {
            device,
            backing_file: PathBuf::from(backing),
            backing_id: match (dev, ino) {
                (Some((major, minor)), Some(ino)) => Some(FileId { major, minor, ino }),
                _ => None,
            },
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Listing reads sysfs only: it works (and finds nothing of banger's)
    /// on any host, with or without device-mapper.
    #[tokio::test]
    async fn lists_from_sysfs() {
        let host = LinuxHostDisk::new();
        for l in host.loops().await.unwrap() {
            assert!(l.device.starts_with("/dev/loop"), "{l:?}");
        }
        for d in host.dm_devices().await.unwrap() {
            assert!(!d.name.is_empty(), "{d:?}");
        }
    }

    /// Real loop devices (device-mapper is not needed): attach read-only and
    /// read-write, list, detach.
    #[tokio::test]
    async fn attaches_lists_and_detaches_real_loop_devices() {
        // Nothing skips: the suite runs as root on hosts with loop devices.
        assert!(
            rustix::process::geteuid().is_root() && Path::new("/dev/loop-control").exists(),
            "this test needs root and /dev/loop-control (sudo modprobe loop)"
        );
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().canonicalize().unwrap().join("disk.img");
        File::create(&path).unwrap().set_len(1 << 20).unwrap();
        let host = LinuxHostDisk::new();
        let mut attached = Vec::new();
        for read_only in [true, false] {
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(!read_only)
                .open(&path)
                .unwrap();
            let dev = host.loop_attach(&f, &path, read_only).await.unwrap();
            attached.push(dev.clone());
            let ro = std::fs::read_to_string(format!(
                "/sys/block/{}/ro",
                dev.trim_start_matches("/dev/")
            ))
            .unwrap();
            assert_eq!(ro.trim() == "1", read_only, "{dev}");
        }
        let listed: Vec<_> = host
            .loops()
            .await
            .unwrap()
            .into_iter()
            .filter(|l| l.backing_file == path)
            .map(|l| l.device)
            .collect();
        let mut want = attached.clone();
        want.sort();
        assert_eq!(listed, want);
        for dev in &attached {
            host.loop_detach(dev).await.unwrap();
        }
        assert!(
            !host
                .loops()
                .await
                .unwrap()
                .iter()
                .any(|l| l.backing_file == path)
        );
    }

    #[test]
    fn reads_losetup_s_list_with_identities() {
        let json = r#"{
           "loopdevices": [
              {"name": "/dev/loop0", "back-file": "/s/vms/a/root.cow (deleted)", "back-ino": 1234, "back-maj:min": "8:1"},
              {"name": "/dev/loop1", "back-file": "/s/vms/b/root.cow", "back-ino": "99", "back-maj:min": "   259:3  "},
              {"name": "/dev/loop2", "back-file": "/x", "back-ino": null, "back-maj:min": null}
           ]
        }"#;
        assert_eq!(
            parse_losetup(json).unwrap(),
            vec![
                LoopDevice {
                    device: "/dev/loop0".into(),
                    backing_file: "/s/vms/a/root.cow".into(),
                    backing_id: Some(FileId {
                        major: 8,
                        minor: 1,
                        ino: 1234
                    }),
                },
                LoopDevice {
                    device: "/dev/loop1".into(),
                    backing_file: "/s/vms/b/root.cow".into(),
                    backing_id: Some(FileId {
                        major: 259,
                        minor: 3,
                        ino: 99
                    }),
                },
                LoopDevice {
                    device: "/dev/loop2".into(),
                    backing_file: "/x".into(),
                    backing_id: None,
                },
            ]
        );
        assert_eq!(parse_losetup("").unwrap(), vec![]);
    }

    #[test]
    fn lists_a_fake_sysfs() {
        let tmp = tempfile::tempdir().unwrap();
        let sys = tmp.path();
        std::fs::create_dir_all(sys.join("dm-0/dm")).unwrap();
        std::fs::create_dir_all(sys.join("dm-0/slaves/loop0")).unwrap();
        std::fs::write(sys.join("dm-0/dm/name"), "bg-a\n").unwrap();
        let host = LinuxHostDisk {
            sys_block: sys.to_path_buf(),
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        assert_eq!(
            rt.block_on(host.dm_devices()).unwrap(),
            vec![DmDevice {
                name: "bg-a".into(),
                slaves: vec!["/dev/loop0".into()]
            }]
        );
    }
}
