//! Command-line definitions. Each subcommand's behaviour lives in
//! `commands/<name>.rs`.

use std::path::PathBuf;

use banger_wire::methods::{PortForwardSpec, SecretGrant};
use banger_wire::{InitMode, Vmm};
use clap::builder::TypedValueParser as _;
use clap::{Args, Parser, Subcommand};

use crate::commands::port_forward::{parse_host, parse_spec};

#[derive(Debug, Parser)]
#[command(
    name = "banger",
    about = "Disposable Linux microVMs on your own machine, in seconds",
    disable_version_flag = true,
    after_help = "Exit codes: 0 success, 1 the operation failed, 2 usage error, 3 the daemon could not be reached or started; `vm run` and `vm exec` exit with the command's code (127 when it is not there, 126 when it cannot be run, as in a shell), or 125 when banger itself failed. A closed stdout ends a command by SIGPIPE."
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Args)]
pub struct Global {
    /// Keep config, state and runtime files under DIR (also: BANGER_HOME).
    #[arg(long, global = true, value_name = "DIR")]
    pub home: Option<PathBuf>,
    /// Print machine-readable JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    /// Print CLI and daemon versions.
    #[arg(short = 'V', long)]
    pub version: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Manage the banger daemon (bangerd).
    #[command(subcommand)]
    Daemon(DaemonCommand),
    /// Show the effective configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Create, run, inspect and remove VMs.
    #[command(subcommand)]
    Vm(VmCommand),
    /// Build, list and remove the images VMs boot from.
    #[command(subcommand)]
    Image(ImageCommand),
    /// List, inspect and remove snapshots of VMs (taken by `vm snapshot`).
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Copy a git checkout into a VM and bring the guest's work back out.
    #[command(subcommand)]
    Workspace(WorkspaceCommand),
    /// Store secrets that VMs use without holding them (`vm create --secret`).
    #[command(subcommand)]
    Secret(SecretCommand),
    /// Show the stages of a long operation (by its op id).
    Op { op_id: banger_wire::OpId },
    /// Check what this host has and lacks for running VMs, with fixes.
    Doctor,
    /// Print a one-time login URL for the web UI (valid 5 minutes).
    Web {
        /// Also open it in a browser (`xdg-open`).
        #[arg(long)]
        open: bool,
    },
    /// Remove banger-owned resources no live VM explains (VM dirs, stale rows and handles, VMM processes, taps).
    Gc {
        /// Only list them.
        #[arg(long)]
        dry_run: bool,
    },
    /// Serve the Model Context Protocol on stdin/stdout, for coding agents:
    /// tools to create VMs, run commands and move files in them.
    Mcp {
        /// Only these tools (comma-separated); the others are not listed.
        #[arg(long, value_name = "TOOL,...", value_delimiter = ',')]
        allow: Option<Vec<String>>,
        /// Create at most N VMs in this session.
        #[arg(long, value_name = "N")]
        max_vms: Option<u32>,
        /// Delete the VMs this session created when it ends (stdin closed,
        /// SIGTERM, or the process killed: the daemon then deletes them).
        #[arg(long)]
        ephemeral: bool,
        /// The network policy of every VM this session creates (as vm
        /// create --net; the agent cannot change it).
        #[arg(long, value_name = "MODE")]
        net: Option<String>,
        /// Give every VM this session creates a stored secret towards these
        /// hosts (as vm create --secret; the agent gets only placeholders
        /// and cannot add grants). Repeatable.
        #[arg(long = "secret", value_name = "NAME@HOST[,HOST...]", value_parser = |s: &str| s.parse::<SecretGrant>())]
        secrets: Vec<SecretGrant>,
        /// As vm create --secret-in-body. Repeatable.
        #[arg(long = "secret-in-body", value_name = "NAME")]
        secrets_in_body: Vec<String>,
    },
    /// Print a shell completion script.
    Completions { shell: clap_complete::Shell },
}

#[derive(Debug, Subcommand)]
pub enum WorkspaceCommand {
    /// Copy the working tree as it is (uncommitted edits, untracked files,
    /// the git history) into a running VM; the previous copy there is
    /// replaced only once all of it arrived.
    Prepare {
        vm: String,
        /// A directory in the repository (default: the current one).
        path: Option<PathBuf>,
        /// Where in the guest (default: /root/<repository name>).
        #[arg(long, value_name = "GUEST_DIR")]
        dest: Option<String>,
        /// Also copy files .gitignore excludes (target/, node_modules/ ...).
        #[arg(long)]
        include_ignored: bool,
        /// Only the last N commits of history (a shallow repository).
        #[arg(long, value_name = "N", conflicts_with = "no_history")]
        depth: Option<u32>,
        /// Only the current commit's history: --depth 1.
        #[arg(long)]
        no_history: bool,
        /// Do not print progress.
        #[arg(short, long)]
        quiet: bool,
    },
    /// Bring the guest's changes back out: as a patch file, as a branch of
    /// the host repository, or applied to the host's working tree.
    #[command(group(clap::ArgGroup::new("target").required(true).args(["patch", "branch", "apply"])))]
    Export {
        vm: String,
        /// The host repository (default: the one the workspace came from).
        path: Option<PathBuf>,
        /// The workspace in the guest (default: the VM's only one).
        #[arg(long, value_name = "GUEST_DIR")]
        dest: Option<String>,
        /// Write a `git apply`-able binary diff from the base commit.
        #[arg(long, value_name = "FILE")]
        patch: Option<PathBuf>,
        /// Fetch the guest's commits (and its uncommitted rest as one more
        /// commit) as this branch; the working tree and current branch stay.
        #[arg(long, value_name = "NAME")]
        branch: Option<String>,
        /// Apply the changes to the host's working tree; refused where the
        /// host changed the same files since prepare.
        #[arg(long)]
        apply: bool,
        /// With --branch: only the guest's commits, not its uncommitted rest.
        #[arg(long, requires = "branch")]
        committed_only: bool,
        /// With --branch: replace a branch of that name.
        #[arg(long, requires = "branch")]
        force: bool,
        /// Do not print progress.
        #[arg(short, long)]
        quiet: bool,
    },
    /// The workspace's base commit and what changed in the guest since.
    Status {
        vm: String,
        #[arg(long, value_name = "GUEST_DIR")]
        dest: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum DaemonCommand {
    /// Show whether the daemon runs, its pid, socket, version and uptime.
    Status,
    /// Start the daemon if it is not running (other commands do this on their own).
    Start,
    /// Stop the daemon cleanly. Running VMs keep running.
    Stop,
    /// Print the daemon's log.
    Logs {
        /// Keep printing new lines as they are written.
        #[arg(short, long)]
        follow: bool,
        /// Only the last N lines.
        #[arg(short = 'n', long, value_name = "N")]
        lines: Option<usize>,
    },
}

#[derive(Debug, Subcommand)]
pub enum SecretCommand {
    /// Store (or replace) a secret's value, read from standard input or
    /// --file (never from the command line).
    Set {
        /// The secret's name, also the guest's variable: A-Z, 0-9 and _.
        #[arg(value_parser = parse_secret_name)]
        name: String,
        /// Read the value from this file instead of standard input.
        #[arg(long, value_name = "PATH")]
        file: Option<PathBuf>,
    },
    /// List stored secrets (names, when set, the VMs using each; never values).
    #[command(alias = "ls")]
    List,
    /// Forget a secret (refused while a VM uses it).
    Rm {
        #[arg(value_parser = parse_secret_name)]
        name: String,
    },
}

fn parse_secret_name(s: &str) -> Result<String, String> {
    match banger_wire::methods::secret_name_problem(s) {
        Some(p) => Err(p),
        None => Ok(s.to_owned()),
    }
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print the configuration in effect (defaults merged with config.toml) and the paths in use.
    Show,
}

/// Sizes and image of a new VM.
#[derive(Debug, Args, Clone)]
pub struct VmShape {
    /// Name (lowercase letters, digits, '-'); generated when absent.
    #[arg(long)]
    pub name: Option<String>,
    /// Image to boot (default: the default image, built on first use); an
    /// OCI reference (docker.io/library/alpine:3.20) is pulled on first use.
    #[arg(long)]
    pub image: Option<String>,
    #[arg(long)]
    pub vcpus: Option<u32>,
    /// Memory: MiB, or a size with a unit (512M, 2G).
    #[arg(long, value_name = "SIZE", value_parser = parse_mib)]
    pub memory: Option<u32>,
    /// Work disk size: MiB, or a size with a unit (8G, 1.5T).
    #[arg(long, value_name = "SIZE", value_parser = parse_mib)]
    pub disk: Option<u32>,
    /// Guest init: fast (the agent as PID 1) or systemd.
    #[arg(long, value_parser = kind(InitMode::ALL, InitMode::as_str))]
    pub init: Option<InitMode>,
    /// VMM: firecracker (needs KVM) or qemu; by default firecracker where it can run.
    #[arg(long, value_parser = kind(Vmm::ALL, Vmm::as_str))]
    pub vmm: Option<Vmm>,
    /// Forward a host port to the guest (TCP; BIND defaults to 127.0.0.1). Repeatable.
    #[arg(short = 'p', long = "port", value_name = "[BIND:]HOSTPORT:GUESTPORT", value_parser = parse_spec)]
    pub ports: Vec<PortForwardSpec>,
    /// Network policy: none (no network; the agent still answers), nat (the
    /// internet through NAT), learn (nat, recording destinations: vm net log),
    /// or allow=LIST of CIDRs, domains and :PORTs, each with an optional
    /// :PORT; default: [network] default_policy (nat).
    #[arg(long, value_name = "MODE")]
    pub net: Option<String>,
    /// Restore this snapshot (name or id) instead of booting: the VM runs
    /// on from where the snapshot was taken, with its own name, addresses
    /// and disks (image, VMM, sizes and init are the snapshot's).
    #[arg(long, value_name = "SNAPSHOT")]
    pub from: Option<String>,
    /// With --from: keep the snapshot's sshd host keys (by default the VM
    /// gets new ones).
    #[arg(long, requires = "from")]
    pub keep_host_keys: bool,
    /// Let the VM use a stored secret towards these hosts (exact names or
    /// *.DOMAIN): the guest gets a placeholder as $NAME and in
    /// /run/banger/secrets/NAME; banger's HTTPS proxy puts the value into
    /// request headers to those hosts only. Repeatable.
    #[arg(long = "secret", value_name = "NAME@HOST[,HOST...]", value_parser = |s: &str| s.parse::<SecretGrant>())]
    pub secrets: Vec<SecretGrant>,
    /// Let the proxy replace secret NAME's placeholder in request bodies
    /// too (form fields, JSON), not only in headers. Repeatable.
    #[arg(long = "secret-in-body", value_name = "NAME")]
    pub secrets_in_body: Vec<String>,
    /// Do not print progress stages.
    #[arg(short, long)]
    pub quiet: bool,
}

#[derive(Debug, Subcommand)]
pub enum VmCommand {
    /// Create and boot a VM.
    Create {
        #[command(flatten)]
        shape: VmShape,
        /// Return once the guest agent answers, without waiting for sshd.
        #[arg(long)]
        no_ssh_wait: bool,
        /// Copy this git checkout into the VM (default: the one holding the
        /// current directory), as `banger workspace prepare` does.
        #[arg(long, value_name = "PATH", num_args = 0..=1, default_missing_value = ".")]
        workspace: Option<PathBuf>,
    },
    /// Boot a VM, run COMMAND in it, stream its output, exit with its code, delete the VM.
    Run {
        #[command(flatten)]
        shape: VmShape,
        /// Keep the VM after the command exits.
        #[arg(long)]
        keep: bool,
        /// Copy this git checkout into the VM first (default: the one
        /// holding the current directory) and run COMMAND in it.
        #[arg(long, value_name = "PATH", num_args = 0..=1, default_missing_value = ".")]
        workspace: Option<PathBuf>,
        /// The command and its arguments.
        #[arg(last = true, required = true, value_name = "COMMAND")]
        command: Vec<String>,
    },
    /// Run COMMAND in a running VM, streaming its output; exit with its code.
    Exec {
        name: String,
        #[arg(last = true, required = true, value_name = "COMMAND")]
        command: Vec<String>,
    },
    /// List VMs.
    #[command(alias = "ls")]
    List {
        /// Also the warm pool's guests.
        #[arg(long)]
        all: bool,
    },
    /// Show one VM.
    Show { name: String },
    /// Boot stopped VMs.
    Start {
        #[arg(required = true)]
        names: Vec<String>,
        /// Return once the guest agent answers, without waiting for sshd.
        #[arg(long)]
        no_ssh_wait: bool,
    },
    /// Power VMs off.
    Stop {
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Save a running VM's memory, device state and disks as a snapshot
    /// (the VM pauses while its state is saved, then runs on); restore it
    /// with `vm create --from SNAPSHOT`.
    Snapshot {
        vm: String,
        /// The snapshot's name (default: the VM's name and a random suffix).
        #[arg(long)]
        name: Option<String>,
        /// Do not print progress stages.
        #[arg(short, long)]
        quiet: bool,
    },
    /// Snapshot a running VM and restore it COUNT times: each fork runs on
    /// from that moment (its processes too) with its own name, addresses,
    /// disks and identity. The snapshot stays (snapshot list) until deleted.
    Fork {
        vm: String,
        /// How many forks.
        #[arg(long, default_value_t = 1)]
        count: u32,
        /// The forks are named PREFIX-1 … PREFIX-COUNT (default: VM-fork).
        #[arg(long, value_name = "PREFIX")]
        name: Option<String>,
        /// Keep the VM's sshd host keys in the forks (by default each gets new ones).
        #[arg(long)]
        keep_host_keys: bool,
        /// Ready once each fork's agent answers, without waiting for its sshd.
        #[arg(long)]
        no_ssh_wait: bool,
        /// Do not print progress stages.
        #[arg(short, long)]
        quiet: bool,
    },
    /// Pause VMs: their vCPUs stop, memory stays, no CPU is used.
    Pause {
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Run paused VMs again.
    Resume {
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Stop and start VMs.
    Restart {
        #[arg(required = true)]
        names: Vec<String>,
        /// Return once the guest agent answers, without waiting for sshd.
        #[arg(long)]
        no_ssh_wait: bool,
    },
    /// Delete VMs and everything they own.
    #[command(alias = "rm")]
    Delete {
        #[arg(required = true)]
        names: Vec<String>,
        /// Also delete running VMs.
        #[arg(short, long)]
        force: bool,
    },
    /// Print a VM's serial console.
    Logs {
        name: String,
        #[arg(short, long)]
        follow: bool,
        #[arg(short = 'n', long, value_name = "N")]
        lines: Option<usize>,
    },
    /// Change a stopped VM's vCPUs, memory or work disk size (disks only grow).
    Set {
        name: String,
        #[arg(long)]
        vcpus: Option<u32>,
        /// Memory: MiB, or a size with a unit (512M, 2G).
        #[arg(long, value_name = "SIZE", value_parser = parse_mib)]
        memory: Option<u32>,
        /// Work disk size: MiB, or a size with a unit (8G, 1.5T).
        #[arg(long, value_name = "SIZE", value_parser = parse_mib)]
        disk: Option<u32>,
    },
    /// Open an SSH session to a VM (or run COMMAND over SSH), as root, with banger's key.
    Ssh {
        name: String,
        #[arg(last = true, value_name = "COMMAND")]
        command: Vec<String>,
    },
    /// Authorize banger's and your (~/.ssh/*.pub) SSH keys in the guest again.
    Authsync { name: String },
    /// Listening sockets inside the guest.
    Ports { name: String },
    /// Show or change a VM's network policy (a running VM's at once).
    Net {
        #[command(subcommand)]
        command: NetCommand,
    },
    /// Forward host ports to a VM's ports (TCP, while the VM runs; kept across stop/start).
    #[command(
        name = "port-forward",
        args_conflicts_with_subcommands = true,
        subcommand_negates_reqs = true
    )]
    PortForward(PortForwardArgs),
    /// CPU, memory and disk use inside the guest (`--json`: one raw sample).
    Stats {
        name: String,
        /// Seconds between the two samples CPU use is measured over.
        #[arg(long, default_value_t = 1.0, value_parser = parse_interval)]
        interval: f64,
    },
}

#[derive(Debug, Subcommand)]
pub enum NetCommand {
    /// Print a VM's network policy.
    Show { name: String },
    /// A running VM's denied packets and, under learn, the destinations it used.
    Log {
        name: String,
        /// Print only the allow= list that would have let through exactly
        /// what was used (for `vm net set`).
        #[arg(long)]
        suggest: bool,
    },
    /// Change a VM's network policy: none, nat, learn or allow=LIST.
    Set {
        name: String,
        #[arg(value_name = "MODE")]
        mode: String,
    },
}

/// `vm port-forward NAME SPEC…`, or one of its subcommands.
#[derive(Debug, Args)]
pub struct PortForwardArgs {
    #[command(subcommand)]
    pub command: Option<PortForwardCommand>,
    /// The VM.
    #[arg(required = true)]
    pub name: Option<String>,
    /// Host port to guest port; BIND defaults to 127.0.0.1.
    #[arg(required = true, value_name = "[BIND:]HOSTPORT:GUESTPORT", value_parser = parse_spec)]
    pub forwards: Vec<PortForwardSpec>,
}

#[derive(Debug, Subcommand)]
pub enum PortForwardCommand {
    /// List forwards and whether they carry traffic now (one VM's, or all).
    #[command(alias = "ls")]
    List { name: Option<String> },
    /// Stop and forget a forward.
    #[command(alias = "rm")]
    Remove {
        name: String,
        #[arg(value_name = "[BIND:]HOSTPORT", value_parser = parse_host)]
        host: (Option<String>, u16),
    },
}

#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// List snapshots.
    #[command(alias = "ls")]
    List,
    /// Show one snapshot: source VM, image, size on disk, created.
    Show { name: String },
    /// Delete a snapshot and its files (refused while a VM restored from it exists).
    #[command(alias = "rm")]
    Delete { name: String },
}

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// List images.
    #[command(alias = "ls")]
    List,
    /// Show one image.
    Show { name: String },
    /// Build an image from a built-in recipe (debian-12, dev).
    Build {
        #[arg(default_value = "debian-12")]
        recipe: String,
        #[arg(short, long)]
        quiet: bool,
    },
    /// Pull an OCI image (linux/amd64) from a registry and build an image from it.
    ///
    /// REFERENCE is [REGISTRY/]REPOSITORY[:TAG][@sha256:DIGEST]; Docker Hub by
    /// default (`python:3.12-slim`). Credentials come from ~/.docker/config.json.
    /// Registries on localhost/127.0.0.0/8/::1 get plain HTTP, others TLS unless
    /// listed in [image] insecure_registries.
    Pull {
        /// The image, e.g. docker.io/library/alpine:3.20 or 127.0.0.1:5000/team/app@sha256:….
        reference: String,
        /// Image name (default: the normalised reference).
        #[arg(long)]
        name: Option<String>,
        /// Do not print progress stages.
        #[arg(short, long)]
        quiet: bool,
    },
    /// Build an image from a root filesystem tarball (plain, gzip or zstd, e.g.
    /// `docker export` output) or directory.
    Import {
        /// A tarball (plain, .gz, .zst) or a directory holding the root filesystem.
        path: std::path::PathBuf,
        /// Image name.
        #[arg(long)]
        name: String,
        /// A TCP port in the guest that must listen before a VM of this
        /// image counts as ready (repeatable).
        #[arg(long = "wait-port", value_name = "PORT")]
        wait_ports: Vec<u16>,
        /// How long `vm create` waits for each --wait-port (default 60).
        #[arg(long, value_name = "SECS", requires = "wait_ports")]
        wait_timeout: Option<u32>,
        /// Do not print progress stages.
        #[arg(short, long)]
        quiet: bool,
    },
    /// Register existing files as an image (in place; banger never changes them).
    Register {
        name: String,
        /// ELF vmlinux (PVH-bootable).
        #[arg(long)]
        vmlinux: std::path::PathBuf,
        #[arg(long)]
        initrd: Option<std::path::PathBuf>,
        /// ext4 root filesystem labelled `rootfs`.
        #[arg(long)]
        rootfs: std::path::PathBuf,
        /// ext4 work-disk seed labelled `work`.
        #[arg(long)]
        work_seed: std::path::PathBuf,
        #[arg(long, value_parser = kind(InitMode::ALL, InitMode::as_str))]
        init: Option<InitMode>,
    },
    /// Delete an image no VM uses.
    #[command(alias = "rm")]
    Delete { name: String },
    /// Make an image the default for new VMs.
    Promote { name: String },
}

/// A wire kind on the command line: its spellings are the possible values.
fn kind<T: Copy + Send + Sync + 'static>(
    all: &'static [T],
    name: fn(T) -> &'static str,
) -> impl clap::builder::TypedValueParser<Value = T> {
    clap::builder::PossibleValuesParser::new(all.iter().map(|k| name(*k))).map(move |s| {
        *all.iter()
            .find(|k| name(**k) == s)
            .expect("clap checked it is one of the spellings")
    })
}

/// A size in MiB, as people write sizes: `2048` (MiB, as the wire carries
/// it), or a number with a binary unit, `512M`, `2G`, `1.5G`, `1T` (`MiB`,
/// `GiB`, `TiB` and the `MB`/`GB`/`TB` spellings mean the same, as in
/// `docker run --memory 2g`). It must come to a whole number of MiB.
fn parse_mib(s: &str) -> Result<u32, String> {
    let bad = || {
        format!("{s:?} is not a size: give MiB (2048) or a number with a unit (512M, 2G, 1.5G, 1T)")
    };
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "m" | "mb" | "mib" => 1,
        "g" | "gb" | "gib" => 1 << 10,
        "t" | "tb" | "tib" => 1 << 20,
        _ => return Err(bad()),
    };
    let (whole, frac) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && frac.is_empty() {
        return Err(bad());
    }
    let whole: u64 = if whole.is_empty() {
        0
    } else {
        whole.parse().map_err(|_| bad())?
    };
    // The fraction in exact integer arithmetic: 1.1G is 1126.4 MiB, not a
    // size a disk or RAM can have.
    let digits = u32::try_from(frac.len()).map_err(|_| bad())?;
    let frac_n: u64 = if frac.is_empty() {
        0
    } else {
        frac.parse().map_err(|_| bad())?
    };
    let denom = 10u64.checked_pow(digits).ok_or_else(bad)?;
    let frac_scaled = frac_n.checked_mul(scale).ok_or_else(bad)?;
    if frac_scaled % denom != 0 {
        return Err(format!("{s:?} is not a whole number of MiB"));
    }
    whole
        .checked_mul(scale)
        .and_then(|m| m.checked_add(frac_scaled / denom))
        .and_then(|m| u32::try_from(m).ok())
        .ok_or_else(|| format!("{s:?} is too large: at most {} MiB", u32::MAX))
}

fn parse_interval(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.1..=60.0).contains(&v) => Ok(v),
        _ => Err(format!("{s:?} is not a number of seconds from 0.1 to 60")),
    }
}

#[cfg(test)]
mod tests {
    use super::parse_mib;

    #[test]
    fn sizes_read_as_mib_with_or_without_a_unit() {
        for (s, mib) in [
            ("2048", 2048),
            ("512M", 512),
            ("512mib", 512),
            ("2G", 2048),
            ("2g", 2048),
            ("2GiB", 2048),
            ("2 GB", 2048),
            ("1.5G", 1536),
            (".5G", 512),
            ("1T", 1 << 20),
            ("0", 0),
        ] {
            assert_eq!(parse_mib(s), Ok(mib), "{s}");
        }
    }

    #[test]
    fn what_is_not_a_size_says_how_to_write_one() {
        for s in ["", "G", "8X", "1.2.3G", "-1G", "2 G B", "1e3"] {
            let err = parse_mib(s).unwrap_err();
            assert!(
                err.contains("not a size") && err.contains("2G"),
                "{s}: {err}"
            );
        }
        assert!(
            parse_mib("1.1G")
                .unwrap_err()
                .contains("not a whole number of MiB")
        );
        assert!(parse_mib("4096T").unwrap_err().contains("too large"));
        assert!(parse_mib("5000000000").unwrap_err().contains("too large"));
    }
}
