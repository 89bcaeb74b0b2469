//! Getting the uncompressed kernel ELF (`vmlinux`) out of a bzImage.
//!
//! A bzImage is a real-mode setup, a small decompressor and the compressed
//! kernel ELF. Debian compresses with xz, so the payload is the xz stream
//! starting at the first `\xfd7zXZ\0` magic whose contents are an ELF file;
//! the bytes after the stream (the decompressor's size trailer) are ignored.
//! The ELF boots directly through its PVH entry (QEMU `-kernel vmlinux`,
//! Firecracker), skipping the in-guest decompression.

use std::io::{self, Read, Write};

const XZ_MAGIC: &[u8; 6] = b"\xfd7zXZ\0";
const ELF_MAGIC: &[u8; 4] = b"\x7fELF";

/// Errors extracting vmlinux.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("no xz stream holding an ELF kernel found in the bzImage (is it xz-compressed?)")]
    NoXzPayload,
    #[error("xz payload at offset {offset} is corrupt")]
    Corrupt {
        offset: usize,
        #[source]
        source: io::Error,
    },
    #[error("cannot write vmlinux")]
    Write(#[source] io::Error),
}

/// Decompresses the kernel ELF from `bzimage` into `out`, returning the
/// number of bytes written.
pub fn extract_vmlinux<W: Write>(bzimage: &[u8], out: &mut W) -> Result<u64, KernelError> {
    let mut search_from = 0;
    while let Some(found) = find(&bzimage[search_from..], XZ_MAGIC) {
        let offset = search_from + found;
        search_from = offset + 1;
        // Single-stream decoder: stops at the end of the stream and leaves
        // any trailing bytes alone.
        let mut decoder = liblzma::read::XzDecoder::new(&bzimage[offset..]);
        let mut head = [0u8; 4];
        if decoder.read_exact(&mut head).is_err() || &head != ELF_MAGIC {
            // Not the kernel: some other blob with the magic, or a false match.
            continue;
        }
        out.write_all(&head).map_err(KernelError::Write)?;
        let copied = copy(&mut decoder, out, offset)?;
        return Ok(copied + head.len() as u64);
    }
    Err(KernelError::NoXzPayload)
}

/// Copies like `io::copy` but keeps read (corrupt payload) and write errors apart.
fn copy<W: Write>(decoder: &mut impl Read, out: &mut W, offset: usize) -> Result<u64, KernelError> {
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = match decoder.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(source) => return Err(KernelError::Corrupt { offset, source }),
        };
        out.write_all(&buf[..n]).map_err(KernelError::Write)?;
        total += n as u64;
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn xz(data: &[u8]) -> Vec<u8> {
        let mut enc = liblzma::write::XzEncoder::new(Vec::new(), 6);
        enc.write_all(data).unwrap();
        enc.finish().unwrap()
    }

    fn fake_elf(len: usize) -> Vec<u8> {
        // Pseudo-random, so the stream is about as long as the data.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut elf = ELF_MAGIC.to_vec();
        elf.extend((0..len).map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1);
            (state >> 56) as u8
        }));
        elf
    }

    #[test]
    fn extracts_the_elf_stream_and_ignores_decoys_and_trailer() {
        let elf = fake_elf(300_000);
        let mut image = b"MZ\x00\x00 setup and decompressor code ".to_vec();
        image.extend_from_slice(XZ_MAGIC); // a false match: not a valid stream
        image.extend_from_slice(b" more code ");
        image.extend(xz(b"not an ELF, some other compressed blob"));
        image.extend(xz(&elf));
        image.extend_from_slice(&(elf.len() as u32).to_le_bytes()); // size trailer
        image.extend_from_slice(&[0u8; 64]);

        let mut out = Vec::new();
        let n = extract_vmlinux(&image, &mut out).unwrap();
        assert_eq!(n, elf.len() as u64);
        assert_eq!(out, elf);
    }

    #[test]
    fn no_payload_is_an_error() {
        let mut out = Vec::new();
        assert!(matches!(
            extract_vmlinux(b"MZ plain bytes, gzip \x1f\x8b\x08 payload", &mut out),
            Err(KernelError::NoXzPayload)
        ));
        assert!(out.is_empty());
    }

    #[test]
    fn truncated_payload_is_corrupt() {
        let elf = fake_elf(2_000_000);
        let stream = xz(&elf);
        let mut image = b"MZ".to_vec();
        image.extend_from_slice(&stream[..stream.len() / 2]);
        let mut out = Vec::new();
        assert!(matches!(
            extract_vmlinux(&image, &mut out),
            Err(KernelError::Corrupt { offset: 2, .. })
        ));
    }
}
