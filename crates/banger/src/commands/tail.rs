//! Printing a file's last lines and, with `follow`, what is appended to it
//! (the daemon log, a VM's serial console).

use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
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
    // The last lines are found by reading back from the end: a log of any
    // size costs only what is printed.
    let mut f = open(path)?;
    let start = match lines {
        Some(n) => last_lines_start(&mut f, n, TAIL_BLOCK).map_err(io)?,
        None => 0,
    };
    f.seek(SeekFrom::Start(start)).map_err(io)?;
    let mut reader = BufReader::new(f);
    let mut bytes = Vec::new();
    loop {
        bytes.clear();
        if reader.read_until(b'\n', &mut bytes).map_err(io)? == 0 {
            break;
        }
        // A guest's console is not always UTF-8.
        print(String::from_utf8_lossy(&bytes).trim_end_matches('\n'))?;
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
            bytes.clear();
            let n = r.read_until(b'\n', &mut bytes).map_err(io)?;
            if n == 0 || !bytes.ends_with(b"\n") {
                break; // a partial line is printed once it is complete
            }
            pos += n as u64;
            print(String::from_utf8_lossy(&bytes).trim_end_matches('\n'))?;
        }
    }
}

/// How much [`last_lines_start`] reads back at a time.
const TAIL_BLOCK: u64 = 64 * 1024;

/// Where the last `n` lines of `f` start (a newline ending the file ends
/// its last line, it starts none), reading back from the end `block` bytes
/// at a time.
fn last_lines_start(f: &mut std::fs::File, n: usize, block: u64) -> std::io::Result<u64> {
    let len = f.seek(SeekFrom::End(0))?;
    if n == 0 {
        return Ok(len);
    }
    let mut found = 0;
    let mut end = len;
    let mut buf = Vec::new();
    while end > 0 {
        let start = end.saturating_sub(block);
        buf.resize((end - start) as usize, 0);
        f.seek(SeekFrom::Start(start))?;
        f.read_exact(&mut buf)?;
        for (i, b) in buf.iter().enumerate().rev() {
            let at = start + i as u64;
            if *b == b'\n' && at + 1 != len {
                found += 1;
                if found == n {
                    return Ok(at + 1);
                }
            }
        }
        end = start;
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn start_of_last(content: &[u8], n: usize, block: u64) -> u64 {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(content).unwrap();
        last_lines_start(&mut f, n, block).unwrap()
    }

    #[test]
    fn the_last_lines_are_found_from_the_end() {
        let text = b"one\ntwo\nthree\n";
        for block in [1, 2, 3, 5, 64 * 1024] {
            assert_eq!(start_of_last(text, 1, block), 8, "block {block}");
            assert_eq!(start_of_last(text, 2, block), 4, "block {block}");
            assert_eq!(start_of_last(text, 3, block), 0, "block {block}");
            assert_eq!(start_of_last(text, 9, block), 0, "block {block}");
            assert_eq!(start_of_last(text, 0, block), 14, "block {block}");
            // Without a final newline, the unfinished line is the last.
            assert_eq!(start_of_last(b"one\ntwo", 1, block), 4, "block {block}");
        }
        assert_eq!(start_of_last(b"", 1, 3), 0);
    }

    #[tokio::test]
    async fn the_last_line_of_a_large_log() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("console.log");
        let mut f = std::fs::File::create(&log).unwrap();
        for i in 0..200_000 {
            write!(f, "line {i} \u{1b}[1m and not UTF-8: ").unwrap();
            f.write_all(b"\xff\n").unwrap();
        }
        f.write_all(b"last \xff\n").unwrap();
        drop(f);
        let mut got = Vec::new();
        tail(&OpId::mint(), &log, false, Some(1), |l| {
            got.push(l.to_string());
            Ok(())
        })
        .await
        .unwrap();
        assert_eq!(got, ["last \u{fffd}"]);
    }
}
