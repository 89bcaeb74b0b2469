//! Builds a builtin image and prints per-stage timings.
//!
//! cargo run --release -p banger-image --example build_image -- \
//!     DEST_DIR AGENT_BIN [RECIPE [MIRROR]]
//!
//! Needs root or a user with /etc/subuid entries (mmdebstrap unshare mode),
//! and the Debian mirror. BANGER_IMAGE_WORK_DIR sets the scratch directory
//! (default DEST_DIR/../.work; its directories are recorded in
//! DEST_DIR/../.scratch); BANGER_IMAGE_VERBOSE=1 shows tool output.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use banger_image::{BuildOptions, ScratchSpace, Stage, StageEvent, build_image, builtin_recipe};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [dest, agent, rest @ ..] = args.as_slice() else {
        eprintln!("usage: build_image DEST_DIR AGENT_BIN [RECIPE [MIRROR]]");
        return ExitCode::from(2);
    };
    let recipe_name = rest.first().map_or("debian-12", String::as_str);
    let Some(recipe) = builtin_recipe(recipe_name) else {
        eprintln!("no builtin recipe {recipe_name}");
        return ExitCode::from(2);
    };
    let dest = PathBuf::from(dest);
    // Scratch space for the ~700 MB tree: a tmpfs (BANGER_IMAGE_WORK_DIR=/dev/shm/...)
    // saves minutes where the disk is slow at metadata.
    let parent = dest.parent().map_or_else(std::env::temp_dir, PathBuf::from);
    let scratch = ScratchSpace {
        dir: std::env::var_os("BANGER_IMAGE_WORK_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| parent.join(".work")),
        records: parent.join(".scratch"),
    };
    let opts = BuildOptions {
        dest_dir: dest,
        agent_bin: PathBuf::from(agent),
        mirror: rest.get(1).cloned(),
        scratch,
        cancel: None,
    };
    let verbose = std::env::var_os("BANGER_IMAGE_VERBOSE").is_some();
    let mut timings: Vec<(Stage, Duration)> = Vec::new();
    let result = build_image(&recipe, &opts, &mut |event| match event {
        StageEvent::Started { stage } => eprintln!("==> {stage}"),
        StageEvent::Output { line, .. } if verbose => eprintln!("    {line}"),
        StageEvent::Output { .. } => {}
        StageEvent::Note { stage, message } => eprintln!("    {stage}: {message}"),
        StageEvent::Finished { stage, elapsed } => {
            eprintln!("<== {stage} {:.1}s", elapsed.as_secs_f64());
            timings.push((stage, elapsed));
        }
    });
    match result {
        Ok(manifest) => {
            println!("stage timings:");
            for (stage, elapsed) in &timings {
                println!("  {:<15} {:>7.1} s", stage.name(), elapsed.as_secs_f64());
            }
            println!("  {:<15} {:>7.1} s", "total", manifest.build_seconds);
            println!("files:");
            for (name, digest) in &manifest.files {
                println!("  {name:<15} {:>12} bytes  {}", digest.size, digest.sha256);
            }
            println!("kernel {}", manifest.kernel_version);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("build failed: {e}");
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                eprintln!("  caused by: {s}");
                source = s.source();
            }
            ExitCode::FAILURE
        }
    }
}
