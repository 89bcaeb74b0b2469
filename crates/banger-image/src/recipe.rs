//! Image recipes: the data describing what goes into an image.
//!
//! Recipes are TOML files under `recipes/`, compiled in. Every table denies
//! unknown keys so a typo fails loudly instead of silently doing nothing.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::manifest::{InitMode, ServiceCheck};

const DEBIAN_12: &str = include_str!("../recipes/debian-12.toml");
const DEV: &str = include_str!("../recipes/dev.toml");

/// Names of the recipes compiled into this crate.
pub const BUILTIN_RECIPES: &[&str] = &["debian-12", "dev"];

/// An npm project compiled into this crate, which a recipe's `[npm]`
/// names: `npm ci` installs exactly what its lockfile pins, checking each
/// tarball against the lockfile's integrity hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NpmProject {
    pub package_json: &'static str,
    pub package_lock: &'static str,
}

/// The npm projects under `recipes/`, by name.
pub fn npm_project(name: &str) -> Option<NpmProject> {
    match name {
        "dev-npm" => Some(NpmProject {
            package_json: include_str!("../recipes/dev-npm/package.json"),
            package_lock: include_str!("../recipes/dev-npm/package-lock.json"),
        }),
        _ => None,
    }
}

/// A complete image recipe.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    pub name: String,
    pub description: String,
    /// Init mode recorded in the manifest as the image's default.
    pub default_init: InitMode,
    pub bootstrap: Bootstrap,
    pub system: System,
    pub initramfs: Initramfs,
    pub disk: Disk,
    /// Packages from the npm registry, installed on the build host and
    /// copied into the tree.
    #[serde(default)]
    pub npm: Option<Npm>,
    /// What must be up before a VM of the image counts as ready; copied
    /// into the image's manifest.
    #[serde(default)]
    pub services: Vec<ServiceCheck>,
}

/// `[npm]`: an npm project of this crate (`recipes/<project>/`:
/// `package.json` and `package-lock.json`), installed with `npm ci` on the
/// build host (which has the network; the guest needs none) and copied into
/// the tree as `<dest>/node_modules`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Npm {
    pub project: String,
    /// Absolute directory in the guest.
    pub dest: String,
    /// Commands linked into `/usr/local/bin`: name -> path under
    /// `<dest>/node_modules`.
    #[serde(default)]
    pub bin: BTreeMap<String, String>,
}

/// How the root tree is bootstrapped from the Debian archive.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bootstrap {
    pub suite: String,
    pub variant: String,
    pub components: Vec<String>,
    /// More suites from the same mirror (`bookworm-updates`).
    #[serde(default)]
    pub extra_suites: Vec<String>,
    pub default_mirror: String,
    pub packages: Vec<String>,
    #[serde(default)]
    pub dpkg_path_exclude: Vec<String>,
    #[serde(default)]
    pub dpkg_path_include: Vec<String>,
}

/// Changes made to the bootstrapped tree.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct System {
    pub hostname: String,
    #[serde(default)]
    pub enable_units: Vec<String>,
    #[serde(default)]
    pub mask_units: Vec<String>,
    /// Absolute shell globs removed from the tree.
    #[serde(default)]
    pub remove: Vec<String>,
    /// Absolute paths truncated to zero length.
    #[serde(default)]
    pub empty: Vec<String>,
    #[serde(default)]
    pub files: Vec<FileSpec>,
}

/// A file written into the tree.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSpec {
    /// Absolute path inside the guest.
    pub path: String,
    /// Permission bits (write them as TOML octal, `0o644`).
    pub mode: u32,
    /// Contents; a leading newline (from a TOML multi-line string) is dropped.
    pub content: String,
}

/// What the initramfs carries.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Initramfs {
    /// Module names or aliases; dependencies are added.
    pub modules: Vec<String>,
}

/// Disk image sizes.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Disk {
    pub rootfs_size_mib: u64,
    pub work_seed_size_mib: u64,
}

/// A recipe that does not make sense.
#[derive(Debug, thiserror::Error)]
pub enum RecipeError {
    #[error("recipe is not valid TOML for a recipe")]
    Parse(#[source] toml::de::Error),
    #[error("invalid recipe: {0}")]
    Invalid(String),
}

/// Characters allowed in names that end up unquoted on a command line or
/// in a glob (package names, unit names, globs, suites).
fn is_plain(s: &str, extra: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "._+-:@".contains(c) || extra.contains(c))
}

fn is_clean_absolute(path: &str) -> bool {
    path.starts_with('/')
        && path.len() > 1
        && !path.split('/').any(|part| part == ".." || part == ".")
}

impl Recipe {
    /// Parses and validates a recipe.
    pub fn from_toml(text: &str) -> Result<Self, RecipeError> {
        let recipe: Recipe = toml::from_str(text).map_err(RecipeError::Parse)?;
        recipe.validate()?;
        Ok(recipe)
    }

    fn validate(&self) -> Result<(), RecipeError> {
        let invalid = |msg: String| Err(RecipeError::Invalid(msg));
        if !is_plain(&self.name, "") {
            return invalid(format!("name {:?} must be a plain word", self.name));
        }
        let b = &self.bootstrap;
        for word in [&b.suite, &b.variant]
            .into_iter()
            .chain(&b.components)
            .chain(&b.extra_suites)
            .chain(&b.packages)
            .chain(&self.system.enable_units)
            .chain(&self.system.mask_units)
            .chain(&self.initramfs.modules)
            .chain(std::iter::once(&self.system.hostname))
        {
            if !is_plain(word, "") {
                return invalid(format!("{word:?} is not a plain name"));
            }
        }
        if b.packages.is_empty() {
            return invalid("bootstrap.packages is empty".into());
        }
        if !(b.default_mirror.starts_with("http://") || b.default_mirror.starts_with("https://")) {
            return invalid(format!(
                "default_mirror {:?} is not an http(s) URL",
                b.default_mirror
            ));
        }
        for glob in b
            .dpkg_path_exclude
            .iter()
            .chain(&b.dpkg_path_include)
            .chain(&self.system.remove)
            .chain(&self.system.empty)
        {
            if !is_clean_absolute(glob) || !is_plain(glob, "/*") {
                return invalid(format!(
                    "{glob:?} must be an absolute path of [A-Za-z0-9_./*+:@-]"
                ));
            }
        }
        for file in &self.system.files {
            if !is_clean_absolute(&file.path) || file.path.contains(['\n', '\'']) {
                return invalid(format!(
                    "file path {:?} must be a clean absolute path",
                    file.path
                ));
            }
            if file.mode > 0o7777 {
                return invalid(format!(
                    "file {} has mode {:o} > 7777",
                    file.path, file.mode
                ));
            }
        }
        if self.initramfs.modules.is_empty() {
            return invalid("initramfs.modules is empty".into());
        }
        if let Some(npm) = &self.npm {
            if npm_project(&npm.project).is_none() {
                return invalid(format!(
                    "npm.project {:?} is not a known project",
                    npm.project
                ));
            }
            if !is_clean_absolute(&npm.dest) || !is_plain(&npm.dest, "/") {
                return invalid(format!(
                    "npm.dest {:?} must be a clean absolute path",
                    npm.dest
                ));
            }
            for (name, path) in &npm.bin {
                if !is_plain(name, "") || name.contains(':') {
                    return invalid(format!("npm.bin name {name:?} is not a plain name"));
                }
                if !is_plain(path, "/")
                    || path.starts_with('/')
                    || path
                        .split('/')
                        .any(|p| p.is_empty() || p == "." || p == "..")
                {
                    return invalid(format!(
                        "npm.bin {name}: {path:?} must be a clean path under node_modules"
                    ));
                }
            }
        }
        for check in &self.services {
            if check.name.trim().is_empty() {
                return invalid("a service has an empty name".into());
            }
            match (check.port, &check.command) {
                (Some(0), _) => return invalid(format!("service {}: port 0", check.name)),
                (Some(_), None) | (None, Some(_)) => {}
                _ => {
                    return invalid(format!(
                        "service {} needs exactly one of port and command",
                        check.name
                    ));
                }
            }
            if check.timeout_secs == 0 {
                return invalid(format!("service {}: timeout_secs is 0", check.name));
            }
            if let Some(log) = &check.log
                && !is_clean_absolute(log)
            {
                return invalid(format!(
                    "service {}: log {log:?} must be a clean absolute path",
                    check.name
                ));
            }
        }
        if self.disk.rootfs_size_mib < 256 || self.disk.work_seed_size_mib < 16 {
            return invalid("disk sizes too small (rootfs >= 256 MiB, work seed >= 16 MiB)".into());
        }
        Ok(())
    }
}

impl FileSpec {
    /// The bytes written: `content` without the leading newline a TOML
    /// multi-line string starting on its own line would otherwise keep.
    pub fn text(&self) -> &str {
        self.content.strip_prefix('\n').unwrap_or(&self.content)
    }
}

/// A recipe compiled into this crate, by name.
pub fn builtin_recipe(name: &str) -> Option<Recipe> {
    let text = match name {
        "debian-12" => DEBIAN_12,
        "dev" => DEV,
        _ => return None,
    };
    // The compiled-in recipes are tested to parse.
    Recipe::from_toml(text).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_builtin_recipe_parses() {
        for name in BUILTIN_RECIPES {
            let text = match *name {
                "debian-12" => DEBIAN_12,
                "dev" => DEV,
                other => panic!("unlisted recipe {other}"),
            };
            let recipe = Recipe::from_toml(text).unwrap_or_else(|e| panic!("{name}: {e:?}"));
            assert_eq!(recipe.name, *name);
            assert_eq!(builtin_recipe(name), Some(recipe));
        }
        assert_eq!(builtin_recipe("nope"), None);
    }

    #[test]
    fn debian_12_has_what_banger_needs() {
        let r = builtin_recipe("debian-12").unwrap();
        assert_eq!(r.bootstrap.suite, "bookworm");
        assert_eq!(r.bootstrap.variant, "minbase");
        for pkg in [
            "systemd-sysv",
            "udev",
            "kmod",
            "openssh-server",
            "busybox-static",
            "linux-image-amd64",
        ] {
            assert!(r.bootstrap.packages.iter().any(|p| p == pkg), "{pkg}");
        }
        for unit in [
            "systemd-networkd.service",
            "systemd-network-generator.service",
        ] {
            assert!(r.system.enable_units.iter().any(|u| u == unit), "{unit}");
        }
        let sshd = r
            .system
            .files
            .iter()
            .find(|f| f.path.starts_with("/etc/ssh/sshd_config.d/"))
            .unwrap();
        assert!(sshd.text().contains("PermitRootLogin prohibit-password"));
        assert!(sshd.text().contains("PasswordAuthentication no"));
        assert!(!sshd.text().starts_with('\n'));
        assert!(r.system.remove.iter().any(|g| g == "/etc/ssh/ssh_host_*"));
        assert!(r.system.empty.iter().any(|p| p == "/etc/machine-id"));
    }

    #[test]
    fn dev_has_the_tools_npm_packages_and_readiness_the_issue_lists() {
        let r = builtin_recipe("dev").unwrap();
        let base = builtin_recipe("debian-12").unwrap();
        // Everything the default image has, and more.
        for pkg in &base.bootstrap.packages {
            assert!(r.bootstrap.packages.contains(pkg), "{pkg}");
        }
        for pkg in [
            "git",
            "tmux",
            "build-essential",
            "curl",
            "ca-certificates",
            "iputils-ping",
            "dnsutils",
            "jq",
            "ripgrep",
            "unzip",
            "sudo",
            "python3",
            "python3-venv",
            "python3-pip",
            "nodejs",
            "npm",
            "docker.io",
        ] {
            assert!(r.bootstrap.packages.iter().any(|p| p == pkg), "{pkg}");
        }
        assert_eq!(r.default_init, InitMode::Systemd);
        assert!(
            r.system
                .enable_units
                .iter()
                .any(|u| u == "opencode.service")
        );
        let npm = r.npm.as_ref().unwrap();
        assert_eq!(npm.dest, "/opt/banger-npm");
        let opencode = &npm.bin["opencode"];
        // The lockfile pins the package the command comes from, with an
        // integrity hash npm checks.
        let project = npm_project(&npm.project).unwrap();
        let lock: serde_json::Value = serde_json::from_str(project.package_lock).unwrap();
        let package = opencode.split('/').next().unwrap();
        let entries = lock["packages"].as_object().unwrap();
        assert!(entries.contains_key(&format!("node_modules/{package}")));
        for (name, entry) in entries.iter().filter(|(k, _)| !k.is_empty()) {
            let integrity = entry["integrity"].as_str().unwrap_or_default();
            assert!(integrity.starts_with("sha512-"), "{name}: {integrity:?}");
        }
        let package_json: serde_json::Value = serde_json::from_str(project.package_json).unwrap();
        assert!(package_json["dependencies"][package].is_string());
        assert_eq!(
            r.services,
            vec![ServiceCheck {
                name: "opencode".into(),
                port: None,
                command: Some("curl -fsS -o /dev/null --max-time 10 http://127.0.0.1:4096/".into()),
                log: Some("/var/log/opencode.log".into()),
                timeout_secs: 300,
            }]
        );
    }

    #[test]
    fn bad_npm_and_service_entries_are_rejected() {
        let invalid = |from: &str, to: &str| {
            assert!(DEV.contains(from), "{from}");
            let text = DEV.replace(from, to);
            match Recipe::from_toml(&text) {
                Err(RecipeError::Invalid(msg)) => msg,
                other => panic!("{to}: {other:?}"),
            }
        };
        assert!(invalid("project = \"dev-npm\"", "project = \"nope\"").contains("nope"));
        invalid("dest = \"/opt/banger-npm\"", "dest = \"opt/npm\"");
        invalid("dest = \"/opt/banger-npm\"", "dest = \"/opt/../etc\"");
        invalid(
            "opencode = \"opencode-linux-x64-baseline/bin/opencode\"",
            "opencode = \"../../etc/shadow\"",
        );
        invalid(
            "opencode = \"opencode-linux-x64-baseline/bin/opencode\"",
            "\"a b\" = \"x/bin\"",
        );
        let command = "command = \"curl -fsS -o /dev/null --max-time 10 http://127.0.0.1:4096/\"";
        invalid(command, "port = 0");
        invalid(command, "");
        invalid(command, &format!("port = 4096\n{command}"));
        assert_eq!(
            Recipe::from_toml(&DEV.replace(command, "port = 4096"))
                .unwrap()
                .services[0]
                .port,
            Some(4096)
        );
        invalid("timeout_secs = 300", "timeout_secs = 0");
        invalid("log = \"/var/log/opencode.log\"", "log = \"opencode.log\"");
        let typo = DEV.replace(command, "ports = 4096");
        assert!(matches!(
            Recipe::from_toml(&typo),
            Err(RecipeError::Parse(_))
        ));
        let typo = DEV.replace(
            "dest = \"/opt/banger-npm\"",
            "dest = \"/opt/banger-npm\"\nlockfile = \"x\"",
        );
        assert!(matches!(
            Recipe::from_toml(&typo),
            Err(RecipeError::Parse(_))
        ));
    }

    #[test]
    fn unknown_keys_and_bad_values_are_rejected() {
        let with_typo = DEBIAN_12.replace("[disk]", "[disk]\nrootfs_size_gib = 2");
        assert!(matches!(
            Recipe::from_toml(&with_typo),
            Err(RecipeError::Parse(_))
        ));

        let injected = DEBIAN_12.replace("\"procps\",", "\"procps; rm -rf /\",");
        assert!(matches!(
            Recipe::from_toml(&injected),
            Err(RecipeError::Invalid(_))
        ));

        let relative = DEBIAN_12.replace("\"/etc/machine-id\"", "\"etc/machine-id\"");
        assert!(matches!(
            Recipe::from_toml(&relative),
            Err(RecipeError::Invalid(_))
        ));

        let escape = DEBIAN_12.replace("path = \"/etc/hosts\"", "path = \"/etc/../../host-file\"");
        assert!(matches!(
            Recipe::from_toml(&escape),
            Err(RecipeError::Invalid(_))
        ));
    }
}
