use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The effective configuration: `config.toml` over built-in defaults.
///
/// Every key is read by some part of banger; an unknown key is an error that
/// names the key and the file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub daemon: DaemonConfig,
    pub helper: HelperConfig,
    pub vmm: VmmConfig,
    pub vm: VmConfig,
    pub network: NetworkConfig,
    pub image: ImageConfig,
    pub pool: PoolConfig,
    pub secrets: SecretsConfig,
    pub web: WebConfig,
}

/// The warm pool: guests of the default image restored ahead of time, so
/// that a `vm run` or `vm create` with default options takes one instead
/// of booting.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolConfig {
    /// How many guests the pool keeps ready (0: no pool). The default is
    /// 0: a pooled guest holds host memory all the time, and every take
    /// makes the pool restore another in the background (and, whenever
    /// the default image changes, boot and snapshot a new source), work
    /// a user did not ask for, which competes with their own VMs for the
    /// CPU; it saves a boot that takes about a second with KVM, which
    /// users have. Set 1 for one VM at a time (a default `vm run` becomes
    /// a restore), more for bursts of parallel runs where memory allows.
    pub size: usize,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecretsConfig {
    /// PEM file of certificates the secrets proxy also trusts for upstream
    /// servers (besides the webpki roots): a private CA's, say.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_ca: Option<PathBuf>,
    /// Where `banger secret set` keeps a value.
    pub store: SecretStore,
}

/// `[secrets] store`: where `banger secret set` keeps a value. A secret
/// stays where it was set until set again or removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SecretStore {
    /// The desktop keyring when one answers on the session bus the daemon
    /// started with, unlocked; files otherwise.
    #[default]
    Auto,
    /// A 0600 file under the state directory.
    File,
    /// The desktop keyring (the Secret Service: GNOME Keyring, KWallet,
    /// KeePassXC), unlocked by its own prompt if locked; an error where
    /// none answers.
    Keyring,
}

/// The web UI and its HTTP API, served by the daemon.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebConfig {
    /// Serve the web UI (the daemon still serves the CLI when its port is taken).
    pub enabled: bool,
    /// `IP:PORT` to listen on: a loopback address only (the API drives your
    /// VMs). Port 0 picks a free port (`banger daemon status` shows it).
    pub listen: String,
}

impl Default for WebConfig {
    fn default() -> Self {
        WebConfig {
            enabled: true,
            listen: "127.0.0.1:7777".into(),
        }
    }
}

impl WebConfig {
    /// `listen` as an address (checked loopback by [`Config::parse`]).
    pub fn listen_addr(&self) -> Result<std::net::SocketAddr, String> {
        let addr: std::net::SocketAddr = self.listen.parse().map_err(|_| {
            format!(
                "web.listen = {:?} is not IP:PORT (e.g. \"127.0.0.1:7777\")",
                self.listen
            )
        })?;
        if !addr.ip().is_loopback() {
            return Err(format!(
                "web.listen = {:?} is not a loopback address: the web API drives your VMs, serve it on 127.0.0.1 (or ::1) only",
                self.listen
            ));
        }
        Ok(addr)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VmConfig {
    /// How long `vm stop` lets a guest power itself off — asked through its
    /// agent (QEMU), then by its power button (ACPI for QEMU, Ctrl-Alt-Del
    /// for Firecracker) — before its VMM is ended by force (QEMU `quit`,
    /// then SIGKILL, a few seconds more). A hung guest stops within it.
    pub stop_timeout_secs: u64,
    /// Cap (MiB) of a running VM's console log: past it, the log's content
    /// moves to `console.log.1` and the log starts again, so a guest that
    /// floods its serial port holds at most about twice this on the host.
    /// The default, 16, keeps many boots' worth of kernel messages.
    pub console_log_max_mib: u64,
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            stop_timeout_secs: 30,
            console_log_max_mib: 16,
        }
    }
}

impl VmConfig {
    pub fn console_log_max_bytes(&self) -> u64 {
        self.console_log_max_mib.saturating_mul(1 << 20)
    }

    pub fn stop_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.stop_timeout_secs)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ImageConfig {
    /// Debian mirror for image builds; unset: the first Debian mirror in the
    /// host's apt sources.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mirror: Option<String>,
    /// Registries (`host:port`, as written in image references) that
    /// `image pull` speaks plain HTTP to. `localhost` and loopback
    /// addresses always get plain HTTP; every other registry needs TLS
    /// unless it is listed here.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub insecure_registries: Vec<String>,
    /// Cap on the file data (GiB, sparse files at their full size) one
    /// pulled or imported image may unpack to, all layers together: a
    /// small layer can expand to more than any disk holds. The default,
    /// 64, is several times the biggest images in common use (CUDA and
    /// ML images run to 10-20 GiB).
    pub max_unpack_gib: u64,
    /// Cap on the tar entries (files, directories, links, whiteouts) of
    /// one pulled or imported image, all layers together. The default,
    /// 2000000, is several times what a full desktop distribution holds
    /// (about 500000), and keeps a layer of empty entries from
    /// exhausting inodes.
    pub max_unpack_entries: u64,
}

impl Default for ImageConfig {
    fn default() -> Self {
        ImageConfig {
            mirror: None,
            insecure_registries: Vec::new(),
            max_unpack_gib: 64,
            max_unpack_entries: 2_000_000,
        }
    }
}

impl ImageConfig {
    /// `max_unpack_gib` in bytes.
    pub fn max_unpack_bytes(&self) -> u64 {
        self.max_unpack_gib.saturating_mul(1 << 30)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkConfig {
    /// The bridge guests are attached to (`banger` followed by up to 9 of
    /// `[0-9a-z-]`); unset: `banger-<install id>`, this install's own.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bridge: Option<String>,
    /// Guest subnet, e.g. `172.30.0.0/24`; unset: a free /24 in 172.16.0.0/12.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subnet: Option<String>,
    /// TAP devices kept ready on the bridge so that create does no netlink work.
    pub tap_pool: usize,
    /// Guests resolve each VM as `<name>.<dns_suffix>` through the daemon's
    /// DNS server on the bridge address.
    pub dns_suffix: String,
    /// Network policy of VMs created without `--net`: `none`, `nat`, `learn` or
    /// `allow=LIST` (checked by the daemon at start).
    pub default_policy: String,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        NetworkConfig {
            bridge: None,
            subnet: None,
            tap_pool: 2,
            dns_suffix: "vm".into(),
            default_policy: "nat".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DaemonConfig {
    /// Log filter for the daemon's JSON log, `RUST_LOG` syntax
    /// (`RUST_LOG` in the daemon's environment takes precedence).
    pub log_filter: String,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            log_filter: "info".into(),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HelperConfig {
    /// Socket of the root helper. Unset: `/run/banger/helper.sock`, or
    /// `<home>/run/helper.sock` for an installation with a home dir.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub socket: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VmmConfig {
    /// Firecracker binary: a name looked up in PATH, or a path.
    pub firecracker_bin: String,
    /// QEMU system emulator: a name looked up in PATH, or a path.
    pub qemu_bin: String,
    /// Accelerator for QEMU guests.
    pub accel: AccelSetting,
    /// QEMU machine type: `microvm` boots fastest; `q35` is a full PCI machine.
    pub qemu_machine: QemuMachine,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QemuMachine {
    /// Minimal virtio-mmio machine.
    #[default]
    Microvm,
    /// PCI machine: broadest guest support.
    Q35,
}

impl Default for VmmConfig {
    fn default() -> Self {
        VmmConfig {
            firecracker_bin: "firecracker".into(),
            qemu_bin: "qemu-system-x86_64".into(),
            accel: AccelSetting::Auto,
            qemu_machine: QemuMachine::Microvm,
        }
    }
}

/// The `accel` setting from the configuration.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccelSetting {
    /// KVM when usable, TCG otherwise.
    #[default]
    Auto,
    /// KVM or an error.
    Kvm,
    /// Always TCG.
    Tcg,
}

impl fmt::Display for AccelSetting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AccelSetting::Auto => "auto",
            AccelSetting::Kvm => "kvm",
            AccelSetting::Tcg => "tcg",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown accel {0:?}: expected \"auto\", \"kvm\" or \"tcg\"")]
pub struct ParseAccelError(pub String);

impl FromStr for AccelSetting {
    type Err = ParseAccelError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(AccelSetting::Auto),
            "kvm" => Ok(AccelSetting::Kvm),
            "tcg" => Ok(AccelSetting::Tcg),
            other => Err(ParseAccelError(other.to_owned())),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
}

impl Config {
    /// Read `path`; a missing file means all defaults.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Config::parse(&text, path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Config::default()),
            Err(source) => Err(ConfigError::Read {
                path: path.to_owned(),
                source,
            }),
        }
    }

    /// Parse TOML text; `path` is only used in error messages.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            // toml's message names the unknown key and the line; keep it on one line.
            message: e.to_string().trim().replace('\n', " "),
        })?;
        if !valid_dns_suffix(&config.network.dns_suffix) {
            return Err(ConfigError::Parse {
                path: path.to_owned(),
                message: format!(
                    "[network] dns_suffix = {:?} is not a DNS name: use dot-separated labels of lowercase letters, digits and '-' (e.g. \"vm\")",
                    config.network.dns_suffix
                ),
            });
        }
        if config.vm.console_log_max_mib == 0 {
            return Err(ConfigError::Parse {
                path: path.to_owned(),
                message: "[vm] console_log_max_mib = 0 would keep no console output: use 1 or more"
                    .into(),
            });
        }
        if config.vm.stop_timeout_secs == 0 {
            return Err(ConfigError::Parse {
                path: path.to_owned(),
                message:
                    "[vm] stop_timeout_secs = 0 gives a guest no time to power off: use 1 or more"
                        .into(),
            });
        }
        for (key, value) in [
            ("max_unpack_gib", config.image.max_unpack_gib),
            ("max_unpack_entries", config.image.max_unpack_entries),
        ] {
            if value == 0 {
                return Err(ConfigError::Parse {
                    path: path.to_owned(),
                    message: format!("[image] {key} = 0 would refuse every image: use 1 or more"),
                });
            }
        }
        if let Err(message) = config.web.listen_addr() {
            return Err(ConfigError::Parse {
                path: path.to_owned(),
                message,
            });
        }
        Ok(config)
    }

    /// The helper socket in effect for an installation laid out as `paths`.
    pub fn helper_socket(&self, paths: &crate::Paths) -> PathBuf {
        self.helper
            .socket
            .clone()
            .unwrap_or_else(|| paths.default_helper_socket.clone())
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("config always serialises")
    }
}

/// Dot-separated labels of `[a-z0-9-]`, none empty, none starting or
/// ending with `-`.
fn valid_dns_suffix(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 200
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/etc/banger.toml"))
    }

    #[test]
    fn empty_file_is_all_defaults() {
        assert_eq!(parse("").unwrap(), Config::default());
    }

    #[test]
    fn reads_known_keys() {
        let c = parse(
            "[vmm]\naccel = \"tcg\"\nqemu_bin = \"/opt/q\"\n[daemon]\nlog_filter = \"debug\"\n",
        )
        .unwrap();
        assert_eq!(c.vmm.accel, AccelSetting::Tcg);
        assert_eq!(c.vmm.qemu_bin, "/opt/q");
        assert_eq!(c.vmm.firecracker_bin, "firecracker");
        assert_eq!(c.daemon.log_filter, "debug");
    }

    #[test]
    fn unknown_key_names_key_and_file() {
        let err = parse("[vmm]\naccell = \"tcg\"\n").unwrap_err().to_string();
        assert!(err.contains("accell"), "{err}");
        assert!(err.contains("/etc/banger.toml"), "{err}");
        let err = parse("colour = true\n").unwrap_err().to_string();
        assert!(err.contains("colour"), "{err}");
    }

    #[test]
    fn bad_value_is_an_error() {
        let err = parse("[vmm]\naccel = \"fast\"\n").unwrap_err().to_string();
        assert!(err.contains("accel") || err.contains("fast"), "{err}");
    }

    #[test]
    fn missing_file_is_defaults_and_unreadable_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            Config::load(&dir.path().join("nope.toml")).unwrap(),
            Config::default()
        );
        // A directory where the file should be cannot be read.
        let err = Config::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("cannot read config file"), "{err}");
    }

    #[test]
    fn web_listen_must_be_loopback_ip_and_port() {
        assert_eq!(
            parse("").unwrap().web.listen_addr().unwrap(),
            "127.0.0.1:7777".parse().unwrap()
        );
        let c = parse("[web]\nlisten = \"[::1]:0\"\nenabled = false\n").unwrap();
        assert!(!c.web.enabled);
        for (bad, says) in [
            ("0.0.0.0:7777", "not a loopback address"),
            ("192.168.1.2:80", "not a loopback address"),
            ("localhost:7777", "not IP:PORT"),
        ] {
            let e = parse(&format!("[web]\nlisten = \"{bad}\"\n"))
                .unwrap_err()
                .to_string();
            assert!(e.contains("web.listen") && e.contains(says), "{bad}: {e}");
        }
        let e = parse("[web]\nport = 1\n").unwrap_err().to_string();
        assert!(e.contains("port"), "{e}");
    }

    #[test]
    fn vm_stop_timeout() {
        assert_eq!(parse("").unwrap().vm.stop_timeout_secs, 30);
        let c = parse("[vm]\nstop_timeout_secs = 5\n").unwrap();
        assert_eq!(c.vm.stop_timeout(), std::time::Duration::from_secs(5));
        let err = parse("[vm]\nstop_timeout_secs = 0\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("stop_timeout_secs"), "{err}");
    }

    #[test]
    fn vm_console_log_cap() {
        assert_eq!(parse("").unwrap().vm.console_log_max_bytes(), 16 << 20);
        let c = parse("[vm]\nconsole_log_max_mib = 1\n").unwrap();
        assert_eq!(c.vm.console_log_max_bytes(), 1 << 20);
        let err = parse("[vm]\nconsole_log_max_mib = 0\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("console_log_max_mib"), "{err}");
    }

    #[test]
    fn dns_suffix() {
        assert_eq!(parse("").unwrap().network.dns_suffix, "vm");
        let c = parse("[network]\ndns_suffix = \"banger.internal\"\n").unwrap();
        assert_eq!(c.network.dns_suffix, "banger.internal");
        for bad in ["", ".", "a..b", "-x", "x y", "Upper", "x.-y", "x."] {
            let err = parse(&format!("[network]\ndns_suffix = {bad:?}\n"))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("dns_suffix") && err.contains("/etc/banger.toml"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn insecure_registries_are_read() {
        let c = parse("[image]\ninsecure_registries = [\"reg.lan:5000\", \"10.0.0.2\"]\n").unwrap();
        assert_eq!(c.image.insecure_registries, ["reg.lan:5000", "10.0.0.2"]);
        assert_eq!(parse(&c.to_toml()).unwrap(), c);
        assert!(Config::default().image.insecure_registries.is_empty());
        let err = parse("[image]\ninsecure_registries = \"reg.lan\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("insecure_registries") || err.contains("sequence"),
            "{err}"
        );
    }

    #[test]
    fn the_pool_size_is_read_and_defaults_to_none() {
        assert_eq!(Config::default().pool.size, 0);
        assert_eq!(parse("[pool]\nsize = 2\n").unwrap().pool.size, 2);
        let err = parse("[pool]\nsiz = 2\n").unwrap_err().to_string();
        assert!(err.contains("siz"), "{err}");
    }

    #[test]
    fn unpack_caps_are_read_and_have_generous_defaults() {
        let d = Config::default().image;
        assert_eq!((d.max_unpack_gib, d.max_unpack_entries), (64, 2_000_000));
        assert_eq!(d.max_unpack_bytes(), 64 << 30);
        let c = parse("[image]\nmax_unpack_gib = 200\nmax_unpack_entries = 5000000\n").unwrap();
        assert_eq!(c.image.max_unpack_gib, 200);
        assert_eq!(c.image.max_unpack_bytes(), 200 << 30);
        assert_eq!(c.image.max_unpack_entries, 5_000_000);
        assert_eq!(parse(&c.to_toml()).unwrap(), c);
        let huge = parse(&format!("[image]\nmax_unpack_gib = {}\n", i64::MAX)).unwrap();
        assert_eq!(huge.image.max_unpack_bytes(), u64::MAX);
        for key in ["max_unpack_gib", "max_unpack_entries"] {
            let err = parse(&format!("[image]\n{key} = 0\n"))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(key) && err.contains("/etc/banger.toml"),
                "{err}"
            );
            let err = parse(&format!("[image]\n{key} = -1\n"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(key) || err.contains("-1"), "{err}");
        }
    }

    #[test]
    fn round_trips_through_toml() {
        let mut c = Config::default();
        c.helper.socket = Some("/x/h.sock".into());
        assert_eq!(parse(&c.to_toml()).unwrap(), c);
    }
}
