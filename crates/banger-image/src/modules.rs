//! Kernel module dependency resolution from depmod's text indexes.
//!
//! The initramfs carries only the modules needed to reach the root disk and
//! the agent channel. Which files those are, and in which order to load them,
//! follows from `modules.dep` (hard dependencies), `modules.softdep` (`pre:`
//! soft dependencies such as ext4's crc32c) and `modules.alias` (to turn
//! names like `crypto-crc32c` into module files). Modules the kernel has
//! built in (`modules.builtin`) need no file and are skipped.

use std::collections::{HashMap, HashSet};
use std::path::Path;

/// Errors resolving modules.
#[derive(Debug, thiserror::Error)]
pub enum ModuleError {
    #[error("cannot read {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("module {0:?} is neither in modules.dep, built in, nor a known alias")]
    Unknown(String),
    #[error("modules.dep names {dependency:?} (needed by {module:?}) but has no entry for it")]
    MissingDependency { module: String, dependency: String },
    #[error("dependency cycle through {0:?}")]
    Cycle(String),
}

/// Canonical module name of a modules.dep path or a user-given name:
/// basename without `.ko[.xz|.zst|.gz]`, dashes as underscores.
pub fn module_name(path_or_name: &str) -> String {
    let base = path_or_name.rsplit('/').next().unwrap_or(path_or_name);
    let base = [".ko.xz", ".ko.zst", ".ko.gz", ".ko"]
        .iter()
        .find_map(|ext| base.strip_suffix(ext))
        .unwrap_or(base);
    base.replace('-', "_")
}

/// The parsed indexes of one kernel's module directory.
#[derive(Debug, Default)]
pub struct ModuleIndex {
    /// Module name -> (path relative to the modules dir, dependency paths).
    entries: HashMap<String, (String, Vec<String>)>,
    /// Dependency path -> module name, to look entries up by path.
    names_by_path: HashMap<String, String>,
    /// Module name -> names or aliases to load before it.
    soft_pre: HashMap<String, Vec<String>>,
    /// Alias -> module names (exact aliases only; device patterns with
    /// wildcards are never asked for here).
    aliases: HashMap<String, Vec<String>>,
    builtin: HashSet<String>,
}

impl ModuleIndex {
    /// Builds the index from the texts of `modules.dep`, `modules.softdep`,
    /// `modules.alias` and `modules.builtin` (the last three may be empty).
    pub fn parse(dep: &str, softdep: &str, alias: &str, builtin: &str) -> Self {
        let mut index = ModuleIndex::default();
        for line in dep.lines() {
            let Some((path, deps)) = line.split_once(':') else {
                continue;
            };
            let path = path.trim().to_owned();
            let name = module_name(&path);
            let deps = deps.split_whitespace().map(str::to_owned).collect();
            index.names_by_path.insert(path.clone(), name.clone());
            index.entries.insert(name, (path, deps));
        }
        for line in softdep.lines() {
            let mut words = line.split_whitespace();
            if words.next() != Some("softdep") {
                continue;
            }
            let Some(module) = words.next() else { continue };
            let mut in_pre = false;
            for word in words {
                match word {
                    "pre:" => in_pre = true,
                    "post:" => in_pre = false,
                    other if in_pre => index
                        .soft_pre
                        .entry(module_name(module))
                        .or_default()
                        .push(other.to_owned()),
                    _ => {}
                }
            }
        }
        for line in alias.lines() {
            let mut words = line.split_whitespace();
            if let (Some("alias"), Some(alias), Some(module)) =
                (words.next(), words.next(), words.next())
            {
                index
                    .aliases
                    .entry(alias.to_owned())
                    .or_default()
                    .push(module_name(module));
            }
        }
        index.builtin = builtin
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(module_name)
            .collect();
        index
    }

    /// Reads the indexes from a `lib/modules/<version>` directory.
    /// `modules.dep` is required; the others are used when present.
    pub fn load(modules_dir: &Path) -> Result<Self, ModuleError> {
        let read = |name: &str, required: bool| -> Result<String, ModuleError> {
            let path = modules_dir.join(name);
            match std::fs::read_to_string(&path) {
                Ok(text) => Ok(text),
                Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => {
                    Ok(String::new())
                }
                Err(source) => Err(ModuleError::Read {
                    path: path.display().to_string(),
                    source,
                }),
            }
        };
        Ok(Self::parse(
            &read("modules.dep", true)?,
            &read("modules.softdep", false)?,
            &read("modules.alias", false)?,
            &read("modules.builtin", false)?,
        ))
    }

    /// Resolves `wanted` module names (or aliases) to module file paths
    /// relative to the modules directory, dependencies first, each once, in
    /// an order in which `insmod` can load them one by one.
    pub fn resolve<S: AsRef<str>>(&self, wanted: &[S]) -> Result<Vec<String>, ModuleError> {
        let mut state = Resolution::default();
        for name in wanted {
            let name = name.as_ref();
            let targets = self.lookup(name);
            if targets.is_empty() && !self.builtin.contains(&module_name(name)) {
                return Err(ModuleError::Unknown(name.to_owned()));
            }
            for target in targets {
                self.visit(&target, &mut state)?;
            }
        }
        Ok(state.order)
    }

    /// Module names (with entries) a name or alias stands for.
    fn lookup(&self, name_or_alias: &str) -> Vec<String> {
        let name = module_name(name_or_alias);
        if self.entries.contains_key(&name) {
            return vec![name];
        }
        self.aliases
            .get(name_or_alias)
            .map(|names| {
                names
                    .iter()
                    .filter(|n| self.entries.contains_key(*n))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    fn visit(&self, name: &str, state: &mut Resolution) -> Result<(), ModuleError> {
        if state.done.contains(name) {
            return Ok(());
        }
        if !state.in_progress.insert(name.to_owned()) {
            return Err(ModuleError::Cycle(name.to_owned()));
        }
        // `lookup` only returns names with entries.
        let (path, deps) = &self.entries[name];
        // Soft dependencies are best effort: a missing one is not an error.
        for soft in self.soft_pre.get(name).into_iter().flatten() {
            for target in self.lookup(soft) {
                if !state.in_progress.contains(&target) {
                    self.visit(&target, state)?;
                }
            }
        }
        for dep in deps {
            let dep_name =
                self.names_by_path
                    .get(dep)
                    .ok_or_else(|| ModuleError::MissingDependency {
                        module: name.to_owned(),
                        dependency: dep.clone(),
                    })?;
            self.visit(dep_name, state)?;
        }
        state.in_progress.remove(name);
        state.done.insert(name.to_owned());
        state.order.push(path.clone());
        Ok(())
    }
}

#[derive(Default)]
struct Resolution {
    done: HashSet<String>,
    in_progress: HashSet<String>,
    order: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    // Excerpt of Debian bookworm 6.1's indexes (one module compressed, to
    // check the extensions are handled).
    const DEP: &str = "\
kernel/fs/ext4/ext4.ko: kernel/lib/crc16.ko kernel/fs/mbcache.ko kernel/fs/jbd2/jbd2.ko
kernel/lib/crc16.ko:
kernel/fs/mbcache.ko:
kernel/fs/jbd2/jbd2.ko:
kernel/crypto/crc32c_generic.ko:
kernel/arch/x86/crypto/crc32c-intel.ko.xz:
kernel/drivers/virtio/virtio.ko:
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio_pci_legacy_dev.ko:
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_legacy_dev.ko kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/char/hw_random/virtio-rng.ko.zst: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/net/vmw_vsock/vsock.ko:
kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko: kernel/net/vmw_vsock/vsock.ko
kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko: kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko kernel/net/vmw_vsock/vsock.ko kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
";
    const SOFTDEP: &str = "\
# Soft dependencies extracted from modules themselves.
softdep ext4 pre: crypto-crc32c
softdep jbd2 pre: crypto-crc32c
softdep ipmi_msghandler post: ipmi_devintf
";
    const ALIAS: &str = "\
alias crypto-crc32c crc32c_generic
alias crypto-crc32c crc32c_intel
alias virtio:d00000004v* virtio_rng
";
    const BUILTIN: &str = "kernel/drivers/virtio/virtio_mmio.ko\n";

    fn index() -> ModuleIndex {
        ModuleIndex::parse(DEP, SOFTDEP, ALIAS, BUILTIN)
    }

    fn position(order: &[String], suffix: &str) -> usize {
        order
            .iter()
            .position(|p| p.ends_with(suffix))
            .unwrap_or_else(|| panic!("{suffix} missing from {order:?}"))
    }

    #[test]
    fn names_are_canonical() {
        assert_eq!(
            module_name("kernel/drivers/char/hw_random/virtio-rng.ko.zst"),
            "virtio_rng"
        );
        assert_eq!(module_name("virtio-rng"), "virtio_rng");
        assert_eq!(module_name("kernel/fs/ext4/ext4.ko"), "ext4");
    }

    #[test]
    fn resolves_transitively_with_dependencies_first() {
        let order = index()
            .resolve(&["virtio_blk", "ext4", "vmw_vsock_virtio_transport"])
            .unwrap();
        // Every module appears once.
        let unique: HashSet<_> = order.iter().collect();
        assert_eq!(unique.len(), order.len());
        for (module, deps) in [
            ("virtio_blk.ko", &["virtio.ko", "virtio_ring.ko"][..]),
            ("ext4.ko", &["crc16.ko", "mbcache.ko", "jbd2.ko"][..]),
            (
                "vmw_vsock_virtio_transport.ko",
                &["vmw_vsock_virtio_transport_common.ko", "vsock.ko"][..],
            ),
            ("vmw_vsock_virtio_transport_common.ko", &["/vsock.ko"][..]),
        ] {
            for dep in deps {
                assert!(
                    position(&order, dep) < position(&order, module),
                    "{dep} must precede {module}: {order:?}"
                );
            }
        }
        assert!(!order.iter().any(|p| p.contains("virtio_pci")));
    }

    #[test]
    fn soft_dependencies_resolve_through_aliases_and_come_first() {
        let order = index().resolve(&["ext4"]).unwrap();
        let generic = position(&order, "crc32c_generic.ko");
        let intel = position(&order, "crc32c-intel.ko.xz");
        // jbd2 has the same softdep, so crc32c precedes jbd2 too.
        assert!(generic < position(&order, "jbd2.ko"));
        assert!(intel < position(&order, "jbd2.ko"));
        assert_eq!(order.len(), 6, "{order:?}");
    }

    #[test]
    fn dashes_and_compressed_files_and_aliases_are_found() {
        let order = index().resolve(&["virtio-rng"]).unwrap();
        assert_eq!(
            order.last().unwrap(),
            "kernel/drivers/char/hw_random/virtio-rng.ko.zst"
        );
        let order = index().resolve(&["crypto-crc32c"]).unwrap();
        assert_eq!(order.len(), 2);
    }

    #[test]
    fn builtin_modules_are_skipped_and_unknown_ones_fail() {
        assert!(index().resolve(&["virtio_mmio"]).unwrap().is_empty());
        assert!(matches!(
            index().resolve(&["no_such_module"]),
            Err(ModuleError::Unknown(name)) if name == "no_such_module"
        ));
    }

    #[test]
    fn missing_dependency_entry_and_cycles_are_errors() {
        let broken = ModuleIndex::parse("kernel/a.ko: kernel/b.ko\n", "", "", "");
        assert!(matches!(
            broken.resolve(&["a"]),
            Err(ModuleError::MissingDependency { .. })
        ));
        let cyclic = ModuleIndex::parse(
            "kernel/a.ko: kernel/b.ko\nkernel/b.ko: kernel/a.ko\n",
            "",
            "",
            "",
        );
        assert!(matches!(cyclic.resolve(&["a"]), Err(ModuleError::Cycle(_))));
    }
}
