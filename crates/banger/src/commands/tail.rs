//! Printing a file's last lines and, with `follow`, what is appended to it
//! (the daemon log, a VM's serial console).

use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::path::Path;
use std::time::Duration;

use banger_wire::OpId;

use crate::error::CliError;

/// Print the last `lines` lines of `path` (all without a count) through
/// `print`; with `follow`, keep printing complete lines as they arrive,
/// waiting for the file if it does not exist yet. An error from `print`
/// (stdout closed) ends it.
pub async fn tail(
    op_id: &OpId,
    path: &Path,
    follow: bool,
    lines: Option<usize>,
    mut print: impl FnMut(&str) -> Result<(), CliError>,
) -> Result<(), CliError> {
    let io =
        |e: std::io::Error| CliError::local(op_id, format!("cannot read {}: {e}", path.display()));
    let open = |p: &Path| {
        std::fs::File::open(p)
            .map_err(|e| CliError::local(op_id, format!("cannot open {}: {e}", p.display())))
    };
    if !path.exists() {
        if !follow {
            return Err(CliError::local(
                op_id,
                format!("{} does not exist yet", path.display()),
            ));
        }
        while !path.exists() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let mut reader = BufReader::new(open(path)?);
    let mut all = Vec::new();
    let mut line = String::new();
    while reader.read_line(&mut line).map_err(io)? > 0 {
        all.push(std::mem::take(&mut line));
    }
    let skip = lines.map_or(0, |n| all.len().saturating_sub(n));
    for l in &all[skip..] {
        print(l.trim_end_matches('\n'))?;
    }
    if !follow {
        return Ok(());
    }
    let mut pos = reader.stream_position().map_err(io)?;
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let len = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        if len < pos {
            pos = 0; // truncated or replaced: start over
        }
        if len == pos {
            continue;
        }
        let mut f = open(path)?;
        f.seek(SeekFrom::Start(pos)).map_err(io)?;
        let mut r = BufReader::new(f);
        loop {
            line.clear();
            let n = r.read_line(&mut line).map_err(io)?;
            if n == 0 || !line.ends_with('\n') {
                break; // a partial line is printed once it is complete
            }
            pos += n as u64;
            print(line.trim_end_matches('\n'))?;
        }
    }
}
