//! Build orchestration tests against a fake runner: no root, no network.

use super::*;
use crate::cpio::read_newc;
use crate::recipe::builtin_recipe;
use crate::test_support::Planted;
use std::collections::HashMap;

const KVER: &str = "6.1.0-test";

/// Plays mmdebstrap / debootstrap / mkfs.ext4 / rm: records every command and
/// produces what the real tool would leave behind.
struct FakeRunner {
    root: bool,
    programs: HashMap<&'static str, PathBuf>,
    commands: Vec<HostCommand>,
    fail_program: Option<&'static str>,
    cancel_during: Option<(&'static str, Arc<AtomicBool>)>,
    agent_seen: Option<Vec<u8>>,
}

impl FakeRunner {
    fn new(root: bool) -> Self {
        let programs = ["mmdebstrap", "debootstrap", "mkfs.ext4", "rm", "npm"]
            .into_iter()
            .map(|p| (p, PathBuf::from(format!("/fake/bin/{p}"))))
            .collect();
        FakeRunner {
            root,
            programs,
            commands: Vec::new(),
            fail_program: None,
            cancel_during: None,
            agent_seen: None,
        }
    }

    fn displayed(&self) -> Vec<String> {
        self.commands.iter().map(HostCommand::display).collect()
    }
}

fn base(path: &Path) -> String {
    path.file_name().unwrap().to_string_lossy().into_owned()
}

/// A tree like mmdebstrap leaves: kernel, modules, busybox, the agent.
fn populate_tree(tree: &Path, agent: Option<&str>) {
    let mods = tree.join(format!("usr/lib/modules/{KVER}"));
    std::fs::create_dir_all(mods.join("kernel")).unwrap();
    std::fs::create_dir_all(tree.join("boot")).unwrap();
    std::fs::create_dir_all(tree.join("usr/bin")).unwrap();
    std::fs::create_dir_all(tree.join("usr/local/bin")).unwrap();
    std::fs::write(tree.join("usr/bin/busybox"), b"\x7fELF busybox").unwrap();
    std::fs::write(mods.join("kernel/virtio.ko"), b"virtio").unwrap();
    std::fs::write(mods.join("kernel/virtio_blk.ko"), b"virtio_blk").unwrap();
    std::fs::write(
        mods.join("modules.dep"),
        "kernel/virtio.ko:\nkernel/virtio_blk.ko: kernel/virtio.ko\n",
    )
    .unwrap();
    let mut enc = liblzma::write::XzEncoder::new(Vec::new(), 1);
    enc.write_all(b"\x7fELF fake kernel").unwrap();
    let mut bzimage = b"MZ fake setup ".to_vec();
    bzimage.extend(enc.finish().unwrap());
    bzimage.extend_from_slice(&[0; 8]);
    std::fs::write(tree.join(format!("boot/vmlinuz-{KVER}")), bzimage).unwrap();
    if let Some(agent) = agent {
        std::fs::copy(agent, tree.join("usr/local/bin/banger-agent")).unwrap();
    }
}

impl CommandRunner for FakeRunner {
    fn find_program(&self, name: &str) -> Option<PathBuf> {
        self.programs.get(name).cloned()
    }

    fn run(
        &mut self,
        cmd: &HostCommand,
        on_line: &mut dyn FnMut(&str),
    ) -> Result<(), CommandError> {
        self.commands.push(cmd.clone());
        let mut program = base(&cmd.program);
        let mut args: Vec<String> = cmd
            .args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        if args.first().map(String::as_str) == Some("--unshare-helper") {
            program = base(Path::new(&args[1]));
            args.drain(..2);
        }
        if let Some((when, flag)) = &self.cancel_during
            && program == *when
        {
            flag.store(true, Ordering::Relaxed);
            return Err(CommandError::Cancelled { program });
        }
        if self.fail_program == Some(program.as_str()) {
            on_line(&format!("{program}: something went wrong"));
            return Err(CommandError::Failed {
                program,
                status: "exit status: 1".into(),
            });
        }
        match program.as_str() {
            "mmdebstrap" => {
                let tree = args
                    .iter()
                    .find(|a| a.ends_with("/tree"))
                    .expect("tree argument");
                let agent = args
                    .iter()
                    .find_map(|a| a.strip_prefix("--customize-hook=upload "))
                    .and_then(|a| a.split(' ').next())
                    .map(str::to_owned);
                // Hooks are `sh FILE "$1"`: the files must exist and be the scripts.
                let hook_file = |kind: &str| -> String {
                    let hook = args
                        .iter()
                        .find_map(|a| a.strip_prefix(&format!("--{kind}-hook=sh ")))
                        .unwrap_or_else(|| panic!("no {kind} hook file in {args:?}"));
                    let file = hook.strip_suffix(" \"$1\"").unwrap();
                    std::fs::read_to_string(file).unwrap()
                };
                assert!(
                    hook_file("essential").contains("dpkg-divert --quiet --local --rename --add")
                );
                let customize = hook_file("customize");
                assert!(
                    customize.contains(CUSTOMIZE_MARKER)
                        && customize.contains(CUSTOMIZE_DONE_MARKER)
                );
                on_line("I: downloading packages with apt...");
                populate_tree(Path::new(tree), agent.as_deref());
                self.agent_seen = agent.map(|a| std::fs::read(a).unwrap());
                on_line(CUSTOMIZE_MARKER);
                on_line("customizing");
                on_line(CUSTOMIZE_DONE_MARKER);
                on_line("I: success in 1.0 seconds");
            }
            "debootstrap" => {
                let tree = args
                    .iter()
                    .find(|a| a.ends_with("/tree"))
                    .expect("tree argument");
                populate_tree(Path::new(tree), None);
            }
            "npm" => {
                // `npm ci --prefix DIR`: installs what DIR's lockfile pins.
                assert_eq!(args[0], "ci");
                let dir = PathBuf::from(&args[2]);
                let lock = std::fs::read_to_string(dir.join("package-lock.json")).unwrap();
                assert!(dir.join("package.json").is_file());
                for (name, _) in
                    serde_json::from_str::<serde_json::Value>(&lock).unwrap()["packages"]
                        .as_object()
                        .unwrap()
                        .iter()
                        .filter(|(k, _)| !k.is_empty())
                {
                    let bin = dir.join(name).join("bin");
                    std::fs::create_dir_all(&bin).unwrap();
                    for command in ["opencode", "mise"] {
                        std::fs::write(bin.join(command), b"\x7fELF").unwrap();
                    }
                }
                on_line("added 1 package in 2s");
            }
            "sh" | "cp" => {}
            "mkfs.ext4" => {
                let out = match &cmd.stdout_to {
                    Some(file) => file.clone(),
                    None => PathBuf::from(&args[args.len() - 2]),
                };
                std::fs::write(out, format!("ext4 image {}", args.join(" "))).unwrap();
            }
            "rm" => {
                let target = PathBuf::from(args.last().unwrap());
                if target.exists() {
                    std::fs::remove_dir_all(target).unwrap();
                }
            }
            other => panic!("unexpected program {other}"),
        }
        Ok(())
    }

    fn is_root(&self) -> bool {
        self.root
    }
}

struct Setup {
    _dir: tempfile::TempDir,
    parent: PathBuf,
    opts: BuildOptions,
    recipe: Recipe,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let parent = dir.path().join("images");
    let agent = dir.path().join("banger-agent");
    std::fs::write(&agent, b"#!/bin/sh\necho agent\n").unwrap();
    let mut recipe = builtin_recipe("debian-12").unwrap();
    recipe.initramfs.modules = vec!["virtio_blk".into()];
    recipe.disk.rootfs_size_mib = 256;
    Setup {
        opts: BuildOptions {
            dest_dir: parent.join("debian-12"),
            agent_bin: agent,
            mirror: Some("http://mirror.test/debian/".into()),
            scratch: ScratchSpace {
                dir: dir.path().join("work"),
                records: dir.path().join("state/scratch"),
            },
            cancel: None,
        },
        parent,
        recipe,
        _dir: dir,
    }
}

fn dir_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[test]
fn root_build_produces_a_verified_image_and_reports_every_stage() {
    let s = setup();
    // A leftover of a build killed earlier, and one of a live process.
    let stale = s.parent.join(".debian-12.partial-4000000000-abc");
    std::fs::create_dir_all(&stale).unwrap();
    let live = s
        .parent
        .join(format!(".debian-12.partial-{}-abc", std::process::id()));
    std::fs::create_dir_all(&live).unwrap();

    let mut runner = FakeRunner::new(true);
    let mut events = Vec::new();
    let manifest =
        build_image_with(&mut runner, &s.recipe, &s.opts, &mut |e| events.push(e)).unwrap();

    // Stages start and finish in order.
    let order: Vec<(Stage, bool)> = events
        .iter()
        .filter_map(|e| match e {
            StageEvent::Started { stage } => Some((*stage, true)),
            StageEvent::Finished { stage, .. } => Some((*stage, false)),
            _ => None,
        })
        .collect();
    let expected: Vec<(Stage, bool)> = Stage::ALL
        .iter()
        .filter(|s| **s != Stage::Npm)
        .flat_map(|s| [(*s, true), (*s, false)])
        .collect();
    assert_eq!(order, expected);
    assert!(events.contains(&StageEvent::Output {
        stage: Stage::Customize,
        line: "customizing".into()
    }));
    assert!(events.contains(&StageEvent::Note {
        stage: Stage::ResolveMirror,
        message: "mirror http://mirror.test/debian (from the build options)".into()
    }));

    // The image: every file, read-only, verified by its manifest.
    let mut expected_files: Vec<String> = IMAGE_FILES_PLUS_MANIFEST
        .iter()
        .map(|s| s.to_string())
        .collect();
    expected_files.sort();
    assert_eq!(dir_names(&s.opts.dest_dir), expected_files);
    assert_eq!(ImageManifest::load(&s.opts.dest_dir).unwrap(), manifest);
    manifest.verify(&s.opts.dest_dir).unwrap();
    assert_eq!(manifest.kernel_version, KVER);
    assert_eq!(manifest.recipe, "debian-12");
    assert_eq!(manifest.mirror, "http://mirror.test/debian");
    assert_eq!(manifest.default_init, crate::InitMode::Fast);
    let mode = std::fs::metadata(s.opts.dest_dir.join(ROOTFS))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o444);
    assert_eq!(
        std::fs::read(s.opts.dest_dir.join(VMLINUX)).unwrap(),
        b"\x7fELF fake kernel"
    );
    let initrd = read_newc(&std::fs::read(s.opts.dest_dir.join(INITRD)).unwrap()).unwrap();
    assert!(
        initrd
            .iter()
            .any(|e| e.name == format!("lib/modules/{KVER}/kernel/virtio_blk.ko"))
    );

    // Nothing else left: no staging dir (the stale one swept, the live
    // process's one kept), no work tree.
    assert_eq!(
        dir_names(&s.parent),
        [
            ".debian-12.partial-".to_owned() + &format!("{}-abc", std::process::id()),
            "debian-12".into()
        ]
    );
    assert!(dir_names(&s.opts.scratch.dir).is_empty());
    assert!(dir_names(&s.opts.scratch.records).is_empty());

    // The commands: mmdebstrap as root with the recipe, mkfs of the rootfs,
    // removal of the tree as soon as it is in the rootfs, mkfs of the seed.
    let shown = runner.displayed();
    assert_eq!(shown.len(), 4, "{shown:#?}");
    let mm = &runner.commands[0];
    let mm_args: Vec<String> = mm
        .args
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    assert!(mm_args.contains(&"--mode=root".to_owned()), "{mm_args:?}");
    assert!(mm_args.contains(&"--variant=minbase".to_owned()));
    assert!(
        mm_args
            .iter()
            .any(|a| a.starts_with("--include=") && a.contains("openssh-server"))
    );
    assert!(mm_args.contains(&"--dpkgopt=path-exclude=/usr/share/man/*".to_owned()));
    assert!(mm_args.contains(&"deb http://mirror.test/debian bookworm main".to_owned()));
    assert!(mm_args.contains(&"deb http://mirror.test/debian bookworm-updates main".to_owned()));
    assert_eq!(
        runner.agent_seen.as_deref(),
        Some(&b"#!/bin/sh\necho agent\n"[..])
    );
    assert!(
        shown[1].contains("mkfs.ext4") && shown[1].contains("-L rootfs -E root_owner=0:0 -d"),
        "{}",
        shown[1]
    );
    assert!(shown[1].ends_with(" 256M"));
    // The work seed is the tree's /root; then the tree goes.
    assert!(
        shown[2].contains("-L work -E root_owner=0:0 -d")
            && shown[2].contains("/root ")
            && shown[2].ends_with(" 64M"),
        "{}",
        shown[2]
    );
    assert!(
        shown[3].contains("rm --recursive --force --one-file-system"),
        "{}",
        shown[3]
    );
}

const IMAGE_FILES_PLUS_MANIFEST: [&str; 6] =
    [VMLINUZ, VMLINUX, INITRD, ROOTFS, WORK_SEED, "manifest.json"];

/// The dev recipe, shrunk to what the fake runner can build.
fn dev_setup() -> Setup {
    let mut s = setup();
    let mut dev = builtin_recipe("dev").unwrap();
    dev.initramfs = s.recipe.initramfs.clone();
    dev.disk.rootfs_size_mib = 256;
    s.recipe = dev;
    s.opts.dest_dir = s.parent.join("dev");
    s
}

#[test]
fn npm_packages_are_installed_on_the_host_from_the_lockfile_and_copied_in() {
    let s = dev_setup();
    let mut runner = FakeRunner::new(false);
    let mut events = Vec::new();
    let manifest =
        build_image_with(&mut runner, &s.recipe, &s.opts, &mut |e| events.push(e)).unwrap();
    let cmds = runner.displayed();
    // npm ci, before the bootstrap, with no package scripts.
    let npm = cmds
        .iter()
        .position(|c| c.starts_with("/fake/bin/npm ci --prefix "))
        .unwrap();
    assert!(cmds[npm].contains("--ignore-scripts"), "{}", cmds[npm]);
    let mmdebstrap = cmds.iter().position(|c| c.contains("mmdebstrap")).unwrap();
    assert!(npm < mmdebstrap);
    // Its node_modules copied into the tree after the agent, before the
    // customize script (which links the commands).
    let args: Vec<String> = runner.commands[mmdebstrap]
        .args
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let hook = |prefix: &str| args.iter().position(|a| a.starts_with(prefix)).unwrap();
    let copy_in = hook("--customize-hook=copy-in ");
    let npm_dir = cmds[npm]
        .strip_prefix("/fake/bin/npm ci --prefix ")
        .unwrap()
        .split(' ')
        .next()
        .unwrap();
    assert_eq!(
        args[copy_in],
        format!("--customize-hook=copy-in {npm_dir}/node_modules /opt/banger-npm")
    );
    assert_eq!(
        args[copy_in - 1],
        "--customize-hook=mkdir -p \"$1\"/opt/banger-npm"
    );
    assert!(hook("--customize-hook=upload") < copy_in - 1);
    assert!(copy_in < hook("--customize-hook=sh "));
    assert!(events.iter().any(|e| matches!(
        e,
        StageEvent::Finished {
            stage: Stage::Npm,
            ..
        }
    )));
    // The recipe's readiness checks are in the manifest.
    assert_eq!(manifest.recipe, "dev");
    assert_eq!(manifest.default_init, crate::InitMode::Systemd);
    assert_eq!(manifest.services.len(), 1);
    assert!(
        manifest.services[0]
            .command
            .as_ref()
            .unwrap()
            .contains(":4096/")
    );
    assert_eq!(ImageManifest::load(&s.opts.dest_dir).unwrap(), manifest);
}

#[test]
fn npm_is_required_only_by_recipes_with_npm_packages() {
    let s = dev_setup();
    let mut runner = FakeRunner::new(true);
    runner.programs.remove("npm");
    let err = build_image_with(&mut runner, &s.recipe, &s.opts, &mut |_| {}).unwrap_err();
    assert!(
        matches!(err, BuildError::MissingTool { tool: "npm", .. }),
        "{err:?}"
    );
    assert_eq!(err.to_string(), "npm is not installed (apt install npm)");
    assert!(runner.commands.is_empty());
    assert!(!s.opts.dest_dir.exists());

    let s = setup();
    let mut runner = FakeRunner::new(true);
    runner.programs.remove("npm");
    build_image_with(&mut runner, &s.recipe, &s.opts, &mut |_| {}).unwrap();
}

#[test]
fn a_failing_npm_ci_fails_the_build_with_its_output() {
    let s = dev_setup();
    let mut runner = FakeRunner::new(true);
    runner.fail_program = Some("npm");
    let err = build_image_with(&mut runner, &s.recipe, &s.opts, &mut |_| {}).unwrap_err();
    match &err {
        BuildError::Command { stage, tail, .. } => {
            assert_eq!(*stage, Stage::Npm);
            assert_eq!(tail, &["npm: something went wrong"]);
        }
        other => panic!("{other:?}"),
    }
    assert!(!s.opts.dest_dir.exists());
    assert_eq!(dir_names(&s.parent), Vec::<String>::new());
}

#[test]
fn unprivileged_build_uses_unshare_and_the_helper_for_tree_owned_steps() {
    let s = setup();
    let mut runner = FakeRunner::new(false);
    build_image_with(&mut runner, &s.recipe, &s.opts, &mut |_| {}).unwrap();
    let shown = runner.displayed();
    assert!(shown[0].contains("--mode=unshare"), "{}", shown[0]);
    // rootfs: mkfs inside the namespace, writing through its stdout.
    assert!(
        shown[1].starts_with("/fake/bin/mmdebstrap --unshare-helper /fake/bin/mkfs.ext4")
            && shown[1].contains("/dev/stdout"),
        "{}",
        shown[1]
    );
    assert!(
        runner.commands[1]
            .stdout_to
            .as_ref()
            .unwrap()
            .ends_with(ROOTFS)
    );
    // The work seed is the tree's /root: made inside the namespace too.
    assert!(
        shown[2].starts_with("/fake/bin/mmdebstrap --unshare-helper /fake/bin/mkfs.ext4")
            && shown[2].contains("-L work")
            && shown[2].contains("/dev/stdout"),
        "{}",
        shown[2]
    );
    assert!(
        runner.commands[2]
            .stdout_to
            .as_ref()
            .unwrap()
            .ends_with(WORK_SEED)
    );
    assert!(
        shown[3].starts_with("/fake/bin/mmdebstrap --unshare-helper /fake/bin/rm"),
        "{}",
        shown[3]
    );
    let mode = std::fs::metadata(s.opts.dest_dir.join(ROOTFS))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o444);
}

#[test]
fn a_failing_step_leaves_nothing_and_reports_the_output_tail() {
    let s = setup();
    let mut runner = FakeRunner::new(true);
    runner.fail_program = Some("mkfs.ext4");
    let err = build_image_with(&mut runner, &s.recipe, &s.opts, &mut |_| {}).unwrap_err();
    match &err {
        BuildError::Command { stage, tail, .. } => {
            assert_eq!(*stage, Stage::RootfsExt4);
            assert_eq!(tail, &["mkfs.ext4: something went wrong"]);
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(err.to_string().contains("something went wrong"));
    assert!(
        dir_names(&s.parent).is_empty(),
        "{:?}",
        dir_names(&s.parent)
    );
    assert!(dir_names(&s.opts.scratch.dir).is_empty());
}

#[test]
fn cancelling_stops_the_build_and_cleans_up() {
    let s = setup();
    let flag = Arc::new(AtomicBool::new(false));
    let mut opts = s.opts.clone();
    opts.cancel = Some(flag.clone());
    let mut runner = FakeRunner::new(true);
    runner.cancel_during = Some(("mmdebstrap", flag));
    let err = build_image_with(&mut runner, &s.recipe, &opts, &mut |_| {}).unwrap_err();
    assert!(matches!(err, BuildError::Cancelled), "{err:?}");
    assert!(dir_names(&s.parent).is_empty());
    assert!(dir_names(&s.opts.scratch.dir).is_empty());
}

#[test]
fn bad_inputs_are_refused_before_any_command() {
    let s = setup();
    let mut runner = FakeRunner::new(true);
    std::fs::create_dir_all(&s.opts.dest_dir).unwrap();
    assert!(matches!(
        build_image_with(&mut runner, &s.recipe, &s.opts, &mut |_| {}),
        Err(BuildError::DestinationExists(_))
    ));
    std::fs::remove_dir(&s.opts.dest_dir).unwrap();
    let mut opts = s.opts.clone();
    opts.agent_bin = PathBuf::from("/nonexistent/banger-agent");
    assert!(matches!(
        build_image_with(&mut runner, &s.recipe, &opts, &mut |_| {}),
        Err(BuildError::AgentMissing(_))
    ));
    runner.programs.remove("mmdebstrap");
    runner.root = false;
    assert!(matches!(
        build_image_with(&mut runner, &s.recipe, &s.opts, &mut |_| {}),
        Err(BuildError::NeedsRoot)
    ));
    runner.programs.remove("debootstrap");
    assert!(matches!(
        build_image_with(&mut runner, &s.recipe, &s.opts, &mut |_| {}),
        Err(BuildError::NoBootstrapTool)
    ));
    assert!(runner.commands.is_empty());
}

#[test]
fn debootstrap_fallback_installs_the_agent_and_runs_the_script() {
    let s = setup();
    let mut runner = FakeRunner::new(true);
    runner.programs.remove("mmdebstrap");
    let mut events = Vec::new();
    build_image_with(&mut runner, &s.recipe, &s.opts, &mut |e| events.push(e)).unwrap();
    let shown = runner.displayed();
    assert!(
        shown[0].starts_with("/fake/bin/debootstrap --variant=minbase"),
        "{}",
        shown[0]
    );
    assert!(
        shown[0].ends_with(" http://mirror.test/debian"),
        "{}",
        shown[0]
    );
    assert!(
        shown[1].starts_with("sh ") && shown[1].contains("customize.sh"),
        "{}",
        shown[1]
    );
    assert!(events.contains(&StageEvent::Started {
        stage: Stage::Customize
    }));
}

#[test]
fn too_small_rootfs_is_reported() {
    let s = setup();
    let mut recipe = s.recipe.clone();
    recipe.disk.rootfs_size_mib = 1;
    let mut runner = FakeRunner::new(true);
    assert!(matches!(
        build_image_with(&mut runner, &recipe, &s.opts, &mut |_| {}),
        Err(BuildError::RootfsTooSmall { size_mib: 1, .. })
    ));
    assert!(dir_names(&s.parent).is_empty());
}

/// Runs the customize script for real against a fake tree, with a `chroot`
/// stand-in on PATH that records its arguments.
#[test]
fn customize_script_applies_the_recipe_to_a_tree() {
    let recipe = builtin_recipe("debian-12").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    for d in [
        "etc/ssh",
        "etc/apt",
        "usr/sbin",
        "usr/local/bin",
        "boot",
        "var/lib/dbus",
    ] {
        std::fs::create_dir_all(tree.join(d)).unwrap();
    }
    for key in [
        "ssh_host_rsa_key",
        "ssh_host_rsa_key.pub",
        "ssh_host_ed25519_key",
    ] {
        std::fs::write(tree.join("etc/ssh").join(key), b"key").unwrap();
    }
    std::fs::write(tree.join("etc/ssh/sshd_config"), b"# stock\n").unwrap();
    std::fs::write(tree.join("etc/machine-id"), b"0123456789abcdef\n").unwrap();
    // An absolute symlink in the tree must be replaced, not written through.
    let host_file = dir.path().join("host-resolv.conf");
    std::fs::write(&host_file, b"host contents").unwrap();
    std::os::unix::fs::symlink(&host_file, tree.join("etc/resolv.conf")).unwrap();
    std::fs::write(tree.join("usr/local/bin/banger-agent"), b"agent").unwrap();
    std::fs::write(tree.join("usr/sbin/update-initramfs"), b"stub").unwrap();
    std::fs::write(tree.join("usr/sbin/update-initramfs.distrib"), b"real").unwrap();
    std::fs::write(tree.join(format!("boot/initrd.img-{KVER}")), b"37 MB").unwrap();

    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let log = dir.path().join("chroot.log");
    std::fs::write(
        bin.join("chroot"),
        format!("#!/bin/sh\nshift\necho \"$*\" >> {}\n", log.display()),
    )
    .unwrap();
    set_mode(&bin.join("chroot"), 0o755).unwrap();

    let lines = apt_lines(&recipe, "http://m.test/debian");
    let script = customize_script(&recipe, &lines);
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = std::process::Command::new("sh")
        .args(["-c", &script, "banger-customize"])
        .arg(&tree)
        .env("PATH", path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.lines().next(), Some(CUSTOMIZE_MARKER));
    assert_eq!(stdout.lines().last(), Some(CUSTOMIZE_DONE_MARKER));

    let read = |p: &str| std::fs::read_to_string(tree.join(p)).unwrap();
    assert!(
        dir_names(&tree.join("etc/ssh"))
            .iter()
            .all(|n| !n.starts_with("ssh_host_"))
    );
    assert_eq!(read("etc/machine-id"), "");
    assert_eq!(read("etc/hostname"), "banger\n");
    assert_eq!(
        std::fs::read_to_string(&host_file).unwrap(),
        "host contents"
    );
    assert!(!tree.join("etc/resolv.conf").is_symlink());
    assert!(read("etc/resolv.conf").contains("banger.dns"));
    assert!(read("etc/modprobe.d/banger.conf").contains("blacklist kvm\n"));
    assert!(
        read("etc/ssh/sshd_config.d/10-banger.conf").starts_with("# banger: key-only root login")
    );
    assert_eq!(
        read("etc/systemd/system/banger-agent.service"),
        SYSTEMD_UNIT
    );
    assert_eq!(read("etc/udev/rules.d/90-banger-agent.rules"), UDEV_RULE);
    assert!(read("etc/systemd/system/banger-ssh-hostkeys.service").contains("ssh-keygen"));
    assert_eq!(
        read("etc/apt/sources.list"),
        "deb http://m.test/debian bookworm main\ndeb http://m.test/debian bookworm-updates main\n"
    );
    let agent_mode = std::fs::metadata(tree.join("usr/local/bin/banger-agent"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(agent_mode & 0o777, 0o755);
    assert!(
        !tree.join("usr/sbin/update-initramfs").exists(),
        "stub removed"
    );
    assert!(!tree.join(format!("boot/initrd.img-{KVER}")).exists());
    let chroot_calls = std::fs::read_to_string(&log).unwrap();
    assert!(
        chroot_calls
            .contains("dpkg-divert --quiet --local --rename --remove /usr/sbin/update-initramfs")
    );
    assert!(chroot_calls.contains(
        "systemctl enable --quiet systemd-networkd.service systemd-network-generator.service"
    ));
    assert!(
        chroot_calls.contains(" banger-agent.service\n"),
        "{chroot_calls}"
    );
    assert!(chroot_calls.contains("systemctl mask --quiet apt-daily.timer"));
}

#[test]
fn customize_script_links_npm_commands_and_enables_the_recipe_s_services() {
    let recipe = builtin_recipe("dev").unwrap();
    let script = customize_script(&recipe, &apt_lines(&recipe, "http://m.test/debian"));
    assert!(
        script.contains("chown -R 0:0 \"$T\"'/opt/banger-npm'"),
        "{script}"
    );
    assert!(
        script.contains(
            "ln -sfn '/opt/banger-npm/node_modules/opencode-linux-x64-baseline/bin/opencode' \"$T\"'/usr/local/bin/opencode'"
        ),
        "{script}"
    );
    let enable = script
        .lines()
        .find(|l| l.contains("systemctl enable"))
        .unwrap();
    assert!(enable.contains(" opencode.service "), "{enable}");
    // The links come after the copy (a hook before this script) and before
    // the units are enabled.
    assert!(script.find("ln -sfn").unwrap() < script.find("systemctl enable").unwrap());
    let unit = recipe
        .system
        .files
        .iter()
        .find(|f| f.path == "/etc/systemd/system/opencode.service")
        .unwrap();
    assert!(unit.text().contains("--port 4096 --hostname 0.0.0.0"));
}

#[test]
fn quoting_survives_hostile_text() {
    let text = "it's \"quoted\" $HOME `x` \\ end";
    let out = std::process::Command::new("sh")
        .args(["-c", &format!("printf '%s' {}", sh_quote(text))])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), text);
}

#[test]
fn mounts_under_the_tree_deepest_first() {
    let info = "\
22 1 259:1 / / rw,relatime shared:1 - ext4 /dev/root rw
90 22 0:5 / /w/banger-image-7-x/tree/proc rw - proc proc rw
91 90 0:6 / /w/banger-image-7-x/tree/proc/sys/fs/binfmt_misc rw - binfmt_misc x rw
92 22 0:7 / /w/banger-image-7-x/tree/dev/pts rw - devpts devpts rw
93 22 0:8 / /w/other/tree\\040two/proc rw - proc proc rw
94 22 0:9 / /w/banger-image-7-x/tree-not-it rw - tmpfs t rw
";
    let tree = Path::new("/w/banger-image-7-x/tree");
    assert_eq!(
        mounts_under(info, tree),
        [
            "/w/banger-image-7-x/tree/proc/sys/fs/binfmt_misc",
            "/w/banger-image-7-x/tree/dev/pts",
            "/w/banger-image-7-x/tree/proc",
        ]
        .map(PathBuf::from)
    );
    assert_eq!(
        mounts_under(info, Path::new("/w/other/tree two")),
        [PathBuf::from("/w/other/tree two/proc")]
    );
}

/// A killed root-mode build leaves /proc mounted in its tree; the next
/// build's sweep must still remove the tree. Needs root (as CI runs).
#[test]
fn a_tree_with_mounts_left_in_it_is_removed() {
    assert!(
        rustix::process::geteuid().is_root(),
        "this test mounts /proc in a scratch tree: run the tests as root"
    );
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("banger-image-1-x");
    let proc_dir = work.join("tree/proc");
    std::fs::create_dir_all(&proc_dir).unwrap();
    std::fs::write(work.join("tree/file"), b"x").unwrap();
    let st = std::process::Command::new("mount")
        .args(["-t", "proc", "proc"])
        .arg(&proc_dir)
        .status()
        .unwrap();
    assert!(st.success());
    assert!(proc_dir.join("self").exists());
    let mut runner = SystemRunner { cancel: None };
    let tools = Tools::find(&runner, &builtin_recipe("debian-12").unwrap()).unwrap();
    remove_work_dir(&mut runner, &tools, &work).unwrap();
    assert!(!work.exists());
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!info.contains(&*work.to_string_lossy()), "{info}");
}

/// Another user's names in the shared scratch directory are never
/// removed, chmodded or written through, by a build or by its sweep of
/// leftovers. Needs root (to plant a directory owned by another uid).
#[test]
fn names_planted_in_the_shared_scratch_dir_are_left_alone() {
    assert!(
        rustix::process::geteuid().is_root(),
        "this test chowns a planted directory: run the tests as root"
    );
    let s = setup();
    let planted = Planted::new(&s.opts.scratch.dir, s._dir.path(), "banger-image");
    for root in [true, false] {
        let mut runner = FakeRunner::new(root);
        let mut opts = s.opts.clone();
        opts.dest_dir = s.parent.join(format!("image-{root}"));
        build_image_with(&mut runner, &s.recipe, &opts, &mut |_| {}).unwrap();
        planted.untouched();
        for shown in runner.displayed() {
            assert!(
                !shown.contains("planted") && !shown.contains("theirs"),
                "{shown}"
            );
        }
    }
}

/// The work directory of a build killed half way (its record names a
/// process that is gone) is removed by the next build, through the runner.
#[test]
fn a_killed_build_s_recorded_work_dir_is_swept() {
    let s = setup();
    let left = s.opts.scratch.create("banger-image").unwrap();
    populate_tree(&left.path().join("tree"), None);
    left.orphan();
    let mut runner = FakeRunner::new(true);
    build_image_with(&mut runner, &s.recipe, &s.opts, &mut |_| {}).unwrap();
    assert!(left.path().symlink_metadata().is_err());
    let tree = left.path().join("tree").display().to_string();
    assert!(
        runner.displayed()[0].contains("rm --recursive") && runner.displayed()[0].ends_with(&tree),
        "{:?}",
        runner.displayed()
    );
    assert!(dir_names(&s.opts.scratch.dir).is_empty());
    assert!(dir_names(&s.opts.scratch.records).is_empty());
}
