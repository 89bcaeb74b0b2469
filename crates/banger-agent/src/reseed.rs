//! `banger-agent --reseed`: the bytes on stdin into the kernel's input
//! pool (written to `/dev/urandom`, not credited), then `RNDRESEEDCRNG`, so
//! the generator draws from that pool at once. A restored guest's
//! generator came back in the snapshot's state: without this, every
//! restore of one snapshot would draw the same bytes until the kernel's
//! own next reseed (up to a minute). Run by the host's identity script
//! after each restore; the agent is in every image, perl is not.
//!
//! One `ioctl` that neither `libc` nor `rustix` wraps safely: the only
//! unsafe code here.
#![allow(unsafe_code)]

use std::io::{Read, Write};

/// `RNDRESEEDCRNG` from `<linux/random.h>`: `_IO('R', 0x07)`.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// At most this much entropy is read from stdin.
const MAX_INPUT: u64 = 4096;

/// Exit status: 0 reseeded, 1 with the reason on stderr.
pub fn run() -> i32 {
    match reseed(std::io::stdin().lock()) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("banger-agent: cannot reseed the kernel's random generator: {e}");
            1
        }
    }
}

fn reseed(input: impl Read) -> std::io::Result<()> {
    let mut entropy = Vec::new();
    input.take(MAX_INPUT).read_to_end(&mut entropy)?;
    if entropy.is_empty() {
        return Err(std::io::Error::other("no entropy on stdin"));
    }
    let mut urandom = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")?;
    urandom.write_all(&entropy)?;
    // SAFETY: RNDRESEEDCRNG takes no argument; the descriptor is open for
    // the call's whole length.
    let rc = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&urandom),
            RNDRESEEDCRNG as _,
            0,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_entropy_is_refused_before_touching_the_generator() {
        let err = reseed(std::io::empty()).unwrap_err();
        assert_eq!(err.to_string(), "no entropy on stdin");
    }
}
