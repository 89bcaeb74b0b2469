//! The kernel's random generator after a restore: host entropy into its
//! input pool (written to `/dev/urandom`, not credited), then
//! `RNDRESEEDCRNG`, so the generator draws from that pool at once. A
//! restored guest's generator came back in the snapshot's state: without
//! this, every restore of one snapshot would draw the same bytes until the
//! kernel's own next reseed (up to a minute). Part of `identity`.
//!
//! One `ioctl` that neither `libc` nor `rustix` wraps safely: the only
//! unsafe code here.
#![allow(unsafe_code)]

use std::io::Write;

/// `RNDRESEEDCRNG` from `<linux/random.h>`: `_IO('R', 0x07)`.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// At most this much entropy is used.
const MAX_INPUT: usize = 4096;

pub(crate) fn reseed(entropy: &[u8]) -> std::io::Result<()> {
    let entropy = &entropy[..entropy.len().min(MAX_INPUT)];
    if entropy.is_empty() {
        return Err(std::io::Error::other("no entropy"));
    }
    let mut urandom = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")?;
    urandom.write_all(entropy)?;
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
        let err = reseed(&[]).unwrap_err();
        assert_eq!(err.to_string(), "no entropy");
    }
}
