//! Facts about how the agent is installed and reached inside a guest, for
//! the image builder and the VMM layer.

/// Where the agent binary lives in every image.
pub const AGENT_GUEST_PATH: &str = "/usr/local/bin/banger-agent";

/// Name of the virtio-serial port (QEMU `virtserialport,name=...`).
pub const SERIAL_PORT_NAME: &str = "org.banger.agent";

/// Where udev links the serial port; without udev the agent finds the port
/// through `/sys/class/virtio-ports/*/name`.
pub const SERIAL_PORT_PATH: &str = "/dev/virtio-ports/org.banger.agent";

/// AF_VSOCK port the agent listens on when `banger.channel=vsock`.
pub const DEFAULT_VSOCK_PORT: u32 = 1024;

/// Kernel command line parameters the agent reads from `/proc/cmdline`.
pub mod cmdline {
    /// `serial` (default) or `vsock`: the channel `--listen auto` serves.
    pub const CHANNEL: &str = "banger.channel";
    /// AF_VSOCK port for `banger.channel=vsock` (default 1024).
    pub const VSOCK_PORT: &str = "banger.vsock_port";
    /// Comma-separated nameservers written to `/etc/resolv.conf` under `--init`.
    pub const DNS: &str = "banger.dns";
    /// Comma-separated extra modules `--init` loads with `modprobe`.
    pub const MODULES: &str = "banger.modules";
    /// `poweroff` (default) or `reboot`: how `--init` ends the VM. Use
    /// `reboot` where the VMM exits on a guest reset but cannot power off
    /// (Firecracker without ACPI, QEMU with `-no-reboot`).
    pub const HALT: &str = "banger.halt";
    /// Set to `fast` by the image's kernel command line to make the
    /// initramfs exec `banger-agent --init` as PID 1.
    pub const INIT: &str = "banger.init";
}

/// Unit name for systemd images.
pub const SYSTEMD_UNIT_NAME: &str = "banger-agent.service";

/// Where the image builder writes [`SYSTEMD_UNIT`]; enable it with a
/// `multi-user.target.wants/banger-agent.service` symlink.
pub const SYSTEMD_UNIT_PATH: &str = "/etc/systemd/system/banger-agent.service";

/// The agent's systemd unit. It deliberately does not `Wants=`/`After=` the
/// serial port device: a missing device would stall boot for 90 s. The
/// agent waits for the port itself; [`UDEV_RULE`] merely starts it as soon
/// as the port appears.
pub const SYSTEMD_UNIT: &str = "\
[Unit]
Description=banger guest agent
After=network.target
StartLimitIntervalSec=0

[Service]
Type=exec
ExecStart=/usr/local/bin/banger-agent --listen auto
Restart=always
RestartSec=1
OOMScoreAdjust=-900

[Install]
WantedBy=multi-user.target
";

/// Where the image builder writes [`UDEV_RULE`].
pub const UDEV_RULE_PATH: &str = "/etc/udev/rules.d/90-banger-agent.rules";

/// Starts the agent when its virtio-serial port appears.
pub const UDEV_RULE: &str = "\
# Start banger-agent as soon as its virtio-serial port shows up.
ACTION==\"add\", SUBSYSTEM==\"virtio-ports\", ATTR{name}==\"org.banger.agent\", \
TAG+=\"systemd\", ENV{SYSTEMD_WANTS}+=\"banger-agent.service\"
";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_and_rule_agree_with_the_constants() {
        assert!(SYSTEMD_UNIT.contains(&format!("ExecStart={AGENT_GUEST_PATH} --listen auto")));
        assert!(!SYSTEMD_UNIT.contains("Wants="));
        assert!(UDEV_RULE.contains(&format!("ATTR{{name}}==\"{SERIAL_PORT_NAME}\"")));
        assert!(UDEV_RULE.contains(SYSTEMD_UNIT_NAME));
        assert!(SYSTEMD_UNIT_PATH.ends_with(SYSTEMD_UNIT_NAME));
        assert!(SERIAL_PORT_PATH.ends_with(SERIAL_PORT_NAME));
        // One rule line (the backslash-newlines joined it).
        assert_eq!(UDEV_RULE.lines().filter(|l| !l.starts_with('#')).count(), 1);
    }
}
