//! `authorize_keys`: banger's managed block in root's `authorized_keys`.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use banger_agent_proto::{RemoteError, RemoteErrorCode};

pub const DEFAULT_PATH: &str = "/root/.ssh/authorized_keys";
const BEGIN: &str = "# BEGIN banger managed keys (do not edit inside this block)";
const END: &str = "# END banger managed keys";

/// The file's new contents: lines outside banger's block(s) kept in order,
/// a single block with `keys` at the end (none if `keys` is empty), and
/// the number of distinct keys. A `BEGIN` without `END` extends to the end
/// of the file.
pub fn render(existing: &str, keys: &[String]) -> Result<(String, usize), String> {
    let mut clean: Vec<&str> = Vec::new();
    for key in keys {
        let key = key.trim();
        if key.is_empty() || key.contains(['\n', '\r', '\0']) || key.starts_with('#') {
            return Err(format!("not a single public key line: {key:?}"));
        }
        if !clean.contains(&key) {
            clean.push(key);
        }
    }
    let mut out = String::new();
    let mut in_block = false;
    for line in existing.lines() {
        match line.trim_end() {
            BEGIN => in_block = true,
            END if in_block => in_block = false,
            _ if in_block => {}
            _ => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    if !clean.is_empty() {
        out.push_str(BEGIN);
        out.push('\n');
        for key in &clean {
            out.push_str(key);
            out.push('\n');
        }
        out.push_str(END);
        out.push('\n');
    }
    Ok((out, clean.len()))
}

/// Rewrites `path` atomically with `keys` as the managed block. The
/// directory gets mode 0700 and the file 0600, as sshd's StrictModes wants.
/// Returns the number of keys in the block.
pub fn authorize(path: &Path, keys: &[String]) -> Result<usize, RemoteError> {
    let io_err = |what: &str, e: io::Error| {
        RemoteError::new(
            RemoteErrorCode::Io,
            format!("{what} {}: {e}", path.display()),
        )
    };
    let existing = match fs::read_to_string(path) {
        Ok(s) => s,
        Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(io_err("read", e)),
    };
    let (contents, count) =
        render(&existing, keys).map_err(|m| RemoteError::new(RemoteErrorCode::BadRequest, m))?;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| io_err("create the directory of", e))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .map_err(|e| io_err("chmod the directory of", e))?;
    let tmp = path.with_extension("banger-tmp");
    let write = || -> io::Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.set_permissions(fs::Permissions::from_mode(0o600))?;
        f.write_all(contents.as_bytes())?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    };
    write().map_err(|e| {
        let _ = fs::remove_file(&tmp);
        io_err("write", e)
    })?;
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(k: &[&str]) -> Vec<String> {
        k.iter().map(|s| s.to_string()).collect()
    }

    fn render(existing: &str, keys: &[String]) -> Result<String, String> {
        super::render(existing, keys).map(|(text, _)| text)
    }

    #[test]
    fn render_replaces_the_block_and_keeps_the_rest() {
        let user = "ssh-ed25519 AAAA user@laptop\n";
        let once = render(user, &keys(&["ssh-ed25519 BBBB banger", "ssh-rsa CCCC x"])).unwrap();
        assert_eq!(
            once,
            format!("{user}{BEGIN}\nssh-ed25519 BBBB banger\nssh-rsa CCCC x\n{END}\n")
        );
        // Idempotent, and replacing drops the old keys.
        let twice = render(&once, &keys(&["ssh-ed25519 BBBB banger", "ssh-rsa CCCC x"])).unwrap();
        assert_eq!(twice, once);
        let replaced = render(&once, &keys(&[" ssh-ed25519 DDDD new "])).unwrap();
        assert_eq!(
            replaced,
            format!("{user}{BEGIN}\nssh-ed25519 DDDD new\n{END}\n")
        );
        // Empty removes the block.
        assert_eq!(render(&replaced, &[]).unwrap(), user);
        // Lines after the block survive; missing trailing newline is fixed.
        let mixed = format!("a\n{BEGIN}\nold\n{END}\nb");
        assert_eq!(
            render(&mixed, &keys(&["k1", "k1"])).unwrap(),
            format!("a\nb\n{BEGIN}\nk1\n{END}\n")
        );
        // A trailing CR (a key pasted from a CRLF file) is trimmed; the
        // count is of distinct keys.
        assert_eq!(super::render("", &keys(&["k\r", "k", "j"])).unwrap().1, 2);
        // An unterminated block runs to the end of the file.
        assert_eq!(render(&format!("a\n{BEGIN}\nold\n"), &[]).unwrap(), "a\n");
    }

    #[test]
    fn render_rejects_injection() {
        for bad in ["", "   ", "k1\nk2", "k\rk2", "# BEGIN", "a\0b"] {
            assert!(render("", &keys(&[bad])).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn authorize_writes_with_modes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("home/.ssh/authorized_keys");
        assert_eq!(
            authorize(&path, &keys(&["ssh-ed25519 AAAA a", "ssh-ed25519 BBBB b"])).unwrap(),
            2
        );
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(path.parent().unwrap()), 0o700);
        let mut text = fs::read_to_string(&path).unwrap();
        text.insert_str(0, "ssh-ed25519 USER mine\n");
        fs::write(&path, &text).unwrap();
        assert_eq!(authorize(&path, &keys(&["ssh-ed25519 CCCC c"])).unwrap(), 1);
        let text = fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("ssh-ed25519 USER mine\n"));
        assert!(!text.contains("AAAA"));
        assert_eq!(text.matches(BEGIN).count(), 1);
        assert!(!path.with_extension("banger-tmp").exists());
    }
}
