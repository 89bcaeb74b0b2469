//! `identity`: a restored guest becomes the VM it was restored as. Until
//! then it is its snapshot's source: same address and MAC, hostname,
//! machine-id, sshd host keys, a clock stopped at the snapshot and a random
//! generator in the snapshot's state.
//!
//! Done here rather than by a shell script through `exec`: in a guest
//! without KVM whose translations are all cold after the restore, each
//! process costs a tenth of a second or more, and a restore waits for this.
//! Two processes remain, run side by side: `ip` for the network (netlink
//! by hand is not worth it for six messages) and `date` for the clock (the
//! guest stand-in of the Firecracker test double has no `CAP_SYS_TIME` and
//! replaces `date -s`). The reseed and the files are this process's.
//!
//! Paths are under `root` (`/` but in tests).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use banger_agent_proto::{
    ExitStatus, HostKeys, IdentityRequest, IdentityResult, RemoteError, RemoteErrorCode,
};

use crate::reaper::Reaper;

fn io_err(what: &str, e: impl std::fmt::Display) -> RemoteError {
    RemoteError::new(RemoteErrorCode::Io, format!("{what}: {e}"))
}

/// Gives the guest `req`'s identity.
pub fn apply(
    root: &Path,
    reaper: &Arc<Reaper>,
    req: &IdentityRequest,
) -> Result<IdentityResult, RemoteError> {
    let clock = {
        let reaper = reaper.clone();
        let at = format!("@{}", req.clock);
        std::thread::spawn(move || {
            run(
                &reaper,
                Command::new("date").args(["-u", "-s", &at]),
                None,
                "date -s",
            )
        })
    };
    let keys = {
        let (root, reaper) = (root.to_path_buf(), reaper.clone());
        let (entropy, keys) = (req.entropy.clone(), req.host_keys.clone());
        std::thread::spawn(move || {
            let mut warnings = Vec::new();
            if let Err(e) = crate::reseed::reseed(&entropy) {
                warnings.push(format!("cannot reseed the kernel's random generator: {e}"));
            }
            if let Some(keys) = keys {
                replace_host_keys(&root, &reaper, &keys)?;
            }
            Ok::<_, RemoteError>(warnings)
        })
    };
    let network = network(root, reaper, req);
    let files = write_files(root, req);
    let clock = clock
        .join()
        .unwrap_or_else(|_| Err(io_err("date -s", "panicked")));
    let warnings = keys
        .join()
        .unwrap_or_else(|_| Err(io_err("host keys", "panicked")));
    network?;
    files?;
    clock?;
    Ok(IdentityResult {
        warnings: warnings?,
    })
}

/// Runs `cmd` with `stdin`, its stderr kept for the error.
fn run(
    reaper: &Arc<Reaper>,
    cmd: &mut Command,
    stdin: Option<&str>,
    what: &str,
) -> Result<(), RemoteError> {
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    let (mut child, status) = reaper.spawn(cmd).map_err(|e| io_err(what, e))?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())
            .map_err(|e| io_err(what, e))?;
    }
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        let _ = pipe.read_to_string(&mut stderr);
    }
    match status.recv() {
        Ok(ExitStatus::Code(0)) => Ok(()),
        Ok(status) => Err(io_err(what, format!("{status:?}: {}", stderr.trim()))),
        Err(_) => Err(io_err(what, "the reaper lost it")),
    }
}

/// The guest's network interface: the first that is not loopback.
fn interface(root: &Path) -> Result<String, RemoteError> {
    let dir = root.join("sys/class/net");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .map_err(|e| io_err(&dir.display().to_string(), e))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n != "lo")
        .collect();
    names.sort();
    names
        .into_iter()
        .next()
        .ok_or_else(|| io_err("the network", "the guest has no interface but lo"))
}

/// `ip -batch` commands: the new MAC, the one address, the default route.
fn ip_batch(dev: &str, req: &IdentityRequest) -> String {
    format!(
        "link set dev {dev} down\n\
         link set dev {dev} address {}\n\
         addr flush dev {dev}\n\
         addr add {} dev {dev}\n\
         link set dev {dev} up\n\
         route replace default via {} dev {dev}\n",
        req.mac, req.address, req.gateway
    )
}

/// systemd-networkd's unit for `dev` (a guest under systemd has one per
/// interface in `/run/systemd/network`, which would bring the snapshot's
/// address back).
fn networkd_unit(dev: &str, req: &IdentityRequest) -> String {
    format!(
        "# Written by banger for a restored VM\n\n[Match]\nName={dev}\n\n[Network]\nDHCP=no\n\n\
         [DHCP]\nHostname={}\n\n[Address]\nAddress={}\n\n[Route]\nGateway={}\n",
        req.hostname, req.address, req.gateway
    )
}

fn network(root: &Path, reaper: &Arc<Reaper>, req: &IdentityRequest) -> Result<(), RemoteError> {
    for field in [&req.mac, &req.address, &req.gateway] {
        if field.is_empty() || field.contains(|c: char| c.is_whitespace()) {
            return Err(RemoteError::new(
                RemoteErrorCode::BadRequest,
                format!("not an address: {field:?}"),
            ));
        }
    }
    let dev = interface(root)?;
    let units = networkd_units(root, &dev);
    for unit in &units {
        std::fs::write(unit, networkd_unit(&dev, req))
            .map_err(|e| io_err(&unit.display().to_string(), e))?;
    }
    // Neighbours learn the new MAC at once (best effort: not every kernel
    // has it).
    let _ = std::fs::write(
        root.join("proc/sys/net/ipv4/conf")
            .join(&dev)
            .join("arp_notify"),
        "1\n",
    );
    run(
        reaper,
        Command::new("ip").args(["-batch", "-"]),
        Some(&ip_batch(&dev, req)),
        "ip -batch",
    )?;
    if !units.is_empty() {
        run(
            reaper,
            Command::new("systemctl").args(["restart", "systemd-networkd"]),
            None,
            "systemctl restart systemd-networkd",
        )?;
    }
    Ok(())
}

/// `/run/systemd/network/*-DEV.network`.
fn networkd_units(root: &Path, dev: &str) -> Vec<PathBuf> {
    let suffix = format!("-{dev}.network");
    let mut units: Vec<PathBuf> = std::fs::read_dir(root.join("run/systemd/network"))
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(&suffix))
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| e.path())
        .collect();
    units.sort();
    units
}

/// Hostname, machine-id and resolver.
fn write_files(root: &Path, req: &IdentityRequest) -> Result<(), RemoteError> {
    let write = |rel: &str, text: String| {
        let path = root.join(rel);
        std::fs::write(&path, text).map_err(|e| io_err(&path.display().to_string(), e))
    };
    write("proc/sys/kernel/hostname", format!("{}\n", req.hostname))?;
    write("etc/hostname", format!("{}\n", req.hostname))?;
    write("etc/machine-id", format!("{}\n", req.machine_id))?;
    let dbus = root.join("var/lib/dbus/machine-id");
    if std::fs::symlink_metadata(&dbus).is_ok_and(|m| m.is_file()) {
        write("var/lib/dbus/machine-id", format!("{}\n", req.machine_id))?;
    }
    if !req.nameservers.is_empty() {
        let text: String = req
            .nameservers
            .iter()
            .map(|n| format!("nameserver {n}\n"))
            .collect();
        write("etc/resolv.conf", text)?;
    }
    Ok(())
}

/// Each of the guest's `ssh_host_*_key`: ed25519 and ecdsa replaced by the
/// host's (written in place: the files keep their modes), any other type
/// made anew by `ssh-keygen`. sshd up to OpenSSH 9.7 re-executes itself
/// for each connection and reads them there; one with `sshd-session`
/// (9.8 on), whose listener holds the keys, is told to reload.
fn replace_host_keys(
    root: &Path,
    reaper: &Arc<Reaper>,
    keys: &HostKeys,
) -> Result<(), RemoteError> {
    let ssh = root.join("etc/ssh");
    let mut found: Vec<(String, PathBuf)> = std::fs::read_dir(&ssh)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let kind = name.strip_prefix("ssh_host_")?.strip_suffix("_key")?;
            Some((kind.to_string(), e.path()))
        })
        .collect();
    found.sort();
    for (kind, private) in found {
        let public = PathBuf::from(format!("{}.pub", private.display()));
        let pair = match kind.as_str() {
            "ed25519" => Some(&keys.ed25519),
            "ecdsa" => Some(&keys.ecdsa),
            _ => None,
        };
        match pair {
            Some((key, line)) => {
                let write = |path: &Path, text: &str| {
                    std::fs::write(path, text).map_err(|e| io_err(&path.display().to_string(), e))
                };
                write(&private, key)?;
                write(&public, &format!("{line}\n"))?;
            }
            None => {
                let _ = std::fs::remove_file(&private);
                let _ = std::fs::remove_file(&public);
                run(
                    reaper,
                    Command::new("ssh-keygen")
                        .args(["-q", "-t", &kind, "-N", "", "-f"])
                        .arg(&private),
                    None,
                    "ssh-keygen",
                )?;
            }
        }
    }
    let session = [
        "usr/lib/openssh/sshd-session",
        "usr/libexec/openssh/sshd-session",
        "usr/libexec/sshd-session",
    ]
    .iter()
    .any(|p| root.join(p).is_file());
    if session
        && let Ok(text) = std::fs::read_to_string(root.join("run/sshd.pid"))
        && let Some(pid) = text
            .trim()
            .parse::<i32>()
            .ok()
            .and_then(rustix::process::Pid::from_raw)
    {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::HUP);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> IdentityRequest {
        IdentityRequest {
            mac: "0e:00:00:00:00:07".into(),
            address: "172.30.0.7/24".into(),
            gateway: "172.30.0.1".into(),
            hostname: "fork-1".into(),
            clock: 1_790_000_000,
            machine_id: "0123456789abcdef0123456789abcdef".into(),
            entropy: vec![1; 64],
            host_keys: None,
            nameservers: vec!["172.30.0.1".into()],
        }
    }

    fn mkdirs(root: &Path, dirs: &[&str]) {
        for d in dirs {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
    }

    #[test]
    fn the_interface_is_the_first_that_is_not_loopback() {
        let t = tempfile::tempdir().unwrap();
        mkdirs(
            t.path(),
            &[
                "sys/class/net/lo",
                "sys/class/net/eth1",
                "sys/class/net/eth0",
            ],
        );
        assert_eq!(interface(t.path()).unwrap(), "eth0");
        let t = tempfile::tempdir().unwrap();
        mkdirs(t.path(), &["sys/class/net/lo"]);
        assert!(
            interface(t.path())
                .unwrap_err()
                .message
                .contains("no interface")
        );
    }

    #[test]
    fn the_network_gets_one_address_and_the_default_route() {
        assert_eq!(
            ip_batch("eth0", &request()),
            "link set dev eth0 down\nlink set dev eth0 address 0e:00:00:00:00:07\n\
             addr flush dev eth0\naddr add 172.30.0.7/24 dev eth0\nlink set dev eth0 up\n\
             route replace default via 172.30.0.1 dev eth0\n"
        );
        let unit = networkd_unit("eth0", &request());
        for want in [
            "Name=eth0",
            "DHCP=no",
            "Hostname=fork-1",
            "Address=172.30.0.7/24",
            "Gateway=172.30.0.1",
        ] {
            assert!(unit.contains(want), "{want} in {unit}");
        }
    }

    #[test]
    fn an_address_with_spaces_is_refused_before_anything_runs() {
        let t = tempfile::tempdir().unwrap();
        let mut req = request();
        req.address = "1.2.3.4/24\nlink del eth0".into();
        let err = network(t.path(), &Reaper::new(), &req).unwrap_err();
        assert_eq!(err.code, RemoteErrorCode::BadRequest);
    }

    #[test]
    fn only_the_interfaces_networkd_units_are_found() {
        let t = tempfile::tempdir().unwrap();
        mkdirs(t.path(), &["run/systemd/network"]);
        for f in ["10-eth0.network", "10-eth1.network", "20-eth0.link"] {
            std::fs::write(t.path().join("run/systemd/network").join(f), "").unwrap();
        }
        let units = networkd_units(t.path(), "eth0");
        assert_eq!(
            units,
            vec![t.path().join("run/systemd/network/10-eth0.network")]
        );
        assert!(networkd_units(&t.path().join("none"), "eth0").is_empty());
    }

    #[test]
    fn hostname_machine_id_and_resolver_are_written() {
        let t = tempfile::tempdir().unwrap();
        mkdirs(t.path(), &["proc/sys/kernel", "etc", "var/lib/dbus"]);
        std::fs::write(t.path().join("var/lib/dbus/machine-id"), "old\n").unwrap();
        write_files(t.path(), &request()).unwrap();
        let read = |p: &str| std::fs::read_to_string(t.path().join(p)).unwrap();
        assert_eq!(read("proc/sys/kernel/hostname"), "fork-1\n");
        assert_eq!(read("etc/hostname"), "fork-1\n");
        assert_eq!(read("etc/machine-id"), "0123456789abcdef0123456789abcdef\n");
        assert_eq!(
            read("var/lib/dbus/machine-id"),
            "0123456789abcdef0123456789abcdef\n"
        );
        assert_eq!(read("etc/resolv.conf"), "nameserver 172.30.0.1\n");

        // D-Bus's link to /etc/machine-id stays a link; no nameservers
        // leave the resolver alone.
        let t = tempfile::tempdir().unwrap();
        mkdirs(t.path(), &["proc/sys/kernel", "etc", "var/lib/dbus"]);
        std::os::unix::fs::symlink("/etc/machine-id", t.path().join("var/lib/dbus/machine-id"))
            .unwrap();
        std::fs::write(t.path().join("etc/resolv.conf"), "nameserver 9.9.9.9\n").unwrap();
        let mut req = request();
        req.nameservers.clear();
        write_files(t.path(), &req).unwrap();
        assert!(
            std::fs::symlink_metadata(t.path().join("var/lib/dbus/machine-id"))
                .unwrap()
                .is_symlink()
        );
        assert_eq!(read_in(t.path(), "etc/resolv.conf"), "nameserver 9.9.9.9\n");
    }

    fn read_in(root: &Path, p: &str) -> String {
        std::fs::read_to_string(root.join(p)).unwrap()
    }

    #[test]
    fn host_keys_of_the_types_the_host_made_are_replaced_in_place() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        mkdirs(t.path(), &["etc/ssh"]);
        let key = t.path().join("etc/ssh/ssh_host_ed25519_key");
        std::fs::write(&key, "old").unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(t.path().join("etc/ssh/ssh_host_ed25519_key.pub"), "old").unwrap();
        let keys = HostKeys {
            ed25519: ("PRIVATE-ED".into(), "ssh-ed25519 AAAA root@fork-1".into()),
            ecdsa: (
                "PRIVATE-EC".into(),
                "ecdsa-sha2-nistp256 AAAA root@fork-1".into(),
            ),
        };
        replace_host_keys(t.path(), &Reaper::new(), &keys).unwrap();
        assert_eq!(
            read_in(t.path(), "etc/ssh/ssh_host_ed25519_key"),
            "PRIVATE-ED"
        );
        assert_eq!(
            read_in(t.path(), "etc/ssh/ssh_host_ed25519_key.pub"),
            "ssh-ed25519 AAAA root@fork-1\n"
        );
        assert_eq!(
            std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // A type the guest does not have is not added.
        assert!(!t.path().join("etc/ssh/ssh_host_ecdsa_key").exists());
    }
}
