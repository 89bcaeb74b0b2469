//! Binary framing shared by both ends of the agent channel.
//!
//! Every frame is a 9-byte header followed by its payload:
//!
//! ```text
//! offset  size  field
//!      0     4  payload length, big-endian u32 (header not included)
//!      4     4  stream id, big-endian u32 (0 = the connection itself)
//!      8     1  kind (see FrameKind)
//!      9     n  payload
//! ```
//!
//! Control payloads are JSON; stdin/stdout/stderr payloads are raw bytes;
//! `Window` carries a big-endian u32 credit increment.
//!
//! The two handshake frames (`Hello`, `HelloAck`) carry [`HELLO_MAGIC`] in
//! front of their JSON so that a reader can find them inside garbage left
//! over from an earlier connection (see [`scan_handshake`]).

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Size of the fixed frame header.
pub const HEADER_LEN: usize = 9;

/// Largest payload either side sends or accepts.
pub const MAX_PAYLOAD: usize = 1024 * 1024;

/// Largest stdin/stdout/stderr chunk either side sends.
pub const MAX_DATA_CHUNK: usize = 64 * 1024;

/// Largest payload of a `Hello`/`HelloAck` frame.
pub const MAX_HELLO_PAYLOAD: usize = 4096;

/// Marker at the start of `Hello` and `HelloAck` payloads.
pub const HELLO_MAGIC: [u8; 8] = *b"BANGERAG";

/// Credit each side starts with for one exec's data in each direction:
/// the agent may have this many stdout+stderr bytes unacknowledged, the host
/// this many stdin bytes.
pub const INITIAL_WINDOW: u32 = 256 * 1024;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameKind {
    /// host → agent, stream 0: [`HELLO_MAGIC`] + JSON [`crate::Hello`].
    Hello = 1,
    /// agent → host, stream 0: [`HELLO_MAGIC`] + JSON [`crate::HelloAck`].
    HelloAck = 2,
    /// host → agent: JSON [`crate::Request`]; the stream id names the call.
    Request = 3,
    /// agent → host: JSON [`crate::Response`] to the request on this stream.
    Response = 4,
    /// host → agent: raw bytes for the exec's stdin.
    Stdin = 5,
    /// host → agent: close the exec's stdin (empty payload).
    StdinClose = 6,
    /// agent → host: raw bytes the process wrote to stdout.
    Stdout = 7,
    /// agent → host: raw bytes the process wrote to stderr.
    Stderr = 8,
    /// agent → host: JSON [`crate::ExitStatus`]; last frame of an exec.
    Exit = 9,
    /// both ways: big-endian u32 credit for more data on this stream.
    Window = 10,
    /// host → agent: JSON [`crate::SignalRequest`] for the exec's process group.
    Signal = 11,
    /// host → agent: the host abandoned the exec; kill it, send no more data.
    Cancel = 12,
    /// host → agent: JSON [`crate::TtySize`], the new size of an exec's
    /// terminal (execs started with `tty`).
    Resize = 13,
}

impl FrameKind {
    /// The kind for a wire byte, if known.
    pub fn from_u8(byte: u8) -> Option<Self> {
        Some(match byte {
            1 => Self::Hello,
            2 => Self::HelloAck,
            3 => Self::Request,
            4 => Self::Response,
            5 => Self::Stdin,
            6 => Self::StdinClose,
            7 => Self::Stdout,
            8 => Self::Stderr,
            9 => Self::Exit,
            10 => Self::Window,
            11 => Self::Signal,
            12 => Self::Cancel,
            13 => Self::Resize,
            _ => return None,
        })
    }

    /// The wire byte.
    pub fn as_u8(self) -> u8 {
        self as u8
    }
}

/// A malformed or oversized frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The header announces more than [`MAX_PAYLOAD`] bytes.
    #[error("frame payload of {len} bytes exceeds the {max}-byte limit")]
    TooLarge { len: usize, max: usize },
    /// The kind byte is not a [`FrameKind`].
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// The stream ended inside a frame.
    #[error("stream ended inside a frame ({have} of {need} bytes)")]
    Truncated { have: usize, need: usize },
    /// A payload does not have the shape its kind requires.
    #[error("malformed {kind:?} payload")]
    BadPayload { kind: FrameKind },
}

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub stream: u32,
    pub kind: FrameKind,
    pub payload: Vec<u8>,
}

impl Frame {
    pub fn new(stream: u32, kind: FrameKind, payload: impl Into<Vec<u8>>) -> Self {
        Self {
            stream,
            kind,
            payload: payload.into(),
        }
    }

    /// The wire bytes of this frame.
    pub fn encode(&self) -> Result<Vec<u8>, FrameError> {
        encode_frame(self.stream, self.kind, &self.payload)
    }

    /// The credit carried by a `Window` frame.
    pub fn window_increment(&self) -> Result<u32, FrameError> {
        let bytes: [u8; 4] = self
            .payload
            .as_slice()
            .try_into()
            .map_err(|_| FrameError::BadPayload { kind: self.kind })?;
        Ok(u32::from_be_bytes(bytes))
    }
}

/// Encodes one frame.
pub fn encode_frame(stream: u32, kind: FrameKind, payload: &[u8]) -> Result<Vec<u8>, FrameError> {
    if payload.len() > MAX_PAYLOAD {
        return Err(FrameError::TooLarge {
            len: payload.len(),
            max: MAX_PAYLOAD,
        });
    }
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    // The length fits: it is at most MAX_PAYLOAD.
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(&stream.to_be_bytes());
    out.push(kind.as_u8());
    out.extend_from_slice(payload);
    Ok(out)
}

/// Encodes a `Window` frame granting `increment` more bytes on `stream`.
pub fn encode_window(stream: u32, increment: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + 4);
    out.extend_from_slice(&4u32.to_be_bytes());
    out.extend_from_slice(&stream.to_be_bytes());
    out.push(FrameKind::Window.as_u8());
    out.extend_from_slice(&increment.to_be_bytes());
    out
}

/// Encodes a frame whose payload is `value` as JSON.
pub fn encode_json_frame<T: Serialize>(
    stream: u32,
    kind: FrameKind,
    value: &T,
) -> Result<Vec<u8>, FrameError> {
    let payload = serde_json::to_vec(value).map_err(|_| FrameError::BadPayload { kind })?;
    encode_frame(stream, kind, &payload)
}

/// Encodes a handshake frame (`Hello` or `HelloAck`): magic + JSON.
pub fn encode_handshake<T: Serialize>(kind: FrameKind, value: &T) -> Result<Vec<u8>, FrameError> {
    let mut payload = HELLO_MAGIC.to_vec();
    serde_json::to_writer(&mut payload, value).map_err(|_| FrameError::BadPayload { kind })?;
    if payload.len() > MAX_HELLO_PAYLOAD {
        return Err(FrameError::TooLarge {
            len: payload.len(),
            max: MAX_HELLO_PAYLOAD,
        });
    }
    encode_frame(0, kind, &payload)
}

/// Parses the payload of a handshake frame that arrived in-band.
pub fn parse_handshake_payload<T: DeserializeOwned>(payload: &[u8]) -> Option<T> {
    let json = payload.strip_prefix(&HELLO_MAGIC[..])?;
    serde_json::from_slice(json).ok()
}

fn parse_header(buf: &[u8]) -> (usize, u32, u8) {
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    let stream = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]);
    (len, stream, buf[8])
}

/// Decodes the frame at the start of `buf`.
///
/// Returns `Ok(None)` when `buf` holds only part of a frame, and the frame
/// plus the number of bytes it used otherwise. Oversized lengths and unknown
/// kinds are rejected as soon as the header is complete, so a reader never
/// buffers more than `HEADER_LEN + MAX_PAYLOAD` bytes for one frame.
pub fn decode_frame(buf: &[u8]) -> Result<Option<(Frame, usize)>, FrameError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let (len, stream, kind_byte) = parse_header(buf);
    if len > MAX_PAYLOAD {
        return Err(FrameError::TooLarge {
            len,
            max: MAX_PAYLOAD,
        });
    }
    let kind = FrameKind::from_u8(kind_byte).ok_or(FrameError::UnknownKind(kind_byte))?;
    let total = HEADER_LEN + len;
    if buf.len() < total {
        return Ok(None);
    }
    let frame = Frame {
        stream,
        kind,
        payload: buf[HEADER_LEN..total].to_vec(),
    };
    Ok(Some((frame, total)))
}

/// Incremental decoder over a byte stream.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    start: usize,
}

impl FrameDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends bytes read from the stream.
    pub fn extend(&mut self, data: &[u8]) {
        if self.start > 0 && self.start >= self.buf.len() / 2 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(data);
    }

    /// The next complete frame, if any.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        match decode_frame(&self.buf[self.start..])? {
            Some((frame, used)) => {
                self.start += used;
                if self.start == self.buf.len() {
                    self.buf.clear();
                    self.start = 0;
                }
                Ok(Some(frame))
            }
            None => Ok(None),
        }
    }

    /// Bytes received but not yet decoded.
    pub fn pending(&self) -> &[u8] {
        &self.buf[self.start..]
    }

    /// Checks the stream ended on a frame boundary.
    pub fn finish(&self) -> Result<(), FrameError> {
        let rest = self.pending();
        if rest.is_empty() {
            return Ok(());
        }
        let need = if rest.len() < HEADER_LEN {
            HEADER_LEN
        } else {
            HEADER_LEN + parse_header(rest).0
        };
        Err(FrameError::Truncated {
            have: rest.len(),
            need,
        })
    }
}

/// Outcome of [`scan_handshake`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandshakeScan<T> {
    /// A valid handshake frame occupies `buf[start..end]`; everything before
    /// `start` is garbage and everything from `end` on belongs to the session.
    Found { value: T, start: usize, end: usize },
    /// No complete handshake frame yet: `buf[..discard]` can never be part
    /// of one and may be dropped; read more and scan again.
    NeedMore { discard: usize },
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Looks for a handshake frame of `kind` (stream 0, magic, JSON `T`) in
/// bytes that may start with garbage: leftovers of an earlier connection,
/// a partial frame, line noise. Candidates that fail any check are skipped,
/// so garbage that merely contains the magic cannot wedge the handshake.
pub fn scan_handshake<T: DeserializeOwned>(buf: &[u8], kind: FrameKind) -> HandshakeScan<T> {
    let mut from = 0;
    // Earliest candidate that is plausible but not complete yet.
    let mut pending: Option<usize> = None;
    while let Some(rel) = find(&buf[from..], &HELLO_MAGIC) {
        let magic_at = from + rel;
        from = magic_at + 1;
        let Some(start) = magic_at.checked_sub(HEADER_LEN) else {
            continue;
        };
        let (len, stream, kind_byte) = parse_header(&buf[start..]);
        if stream != 0
            || kind_byte != kind.as_u8()
            || len < HELLO_MAGIC.len()
            || len > MAX_HELLO_PAYLOAD
        {
            continue;
        }
        let end = start + HEADER_LEN + len;
        if buf.len() < end {
            pending.get_or_insert(start);
            continue;
        }
        if let Ok(value) = serde_json::from_slice(&buf[magic_at + HELLO_MAGIC.len()..end]) {
            return HandshakeScan::Found { value, start, end };
        }
    }
    // A handshake frame whose magic is still incomplete starts within the
    // last HEADER_LEN + magic - 1 bytes.
    let keep_tail = buf.len().saturating_sub(HEADER_LEN + HELLO_MAGIC.len() - 1);
    HandshakeScan::NeedMore {
        discard: pending.map_or(keep_tail, |p| p.min(keep_tail)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Hello;

    fn hello(nonce: &str) -> Hello {
        Hello {
            protocol_version: crate::PROTOCOL_VERSION,
            nonce: nonce.to_owned(),
        }
    }

    #[test]
    fn round_trip() {
        let bytes = encode_frame(7, FrameKind::Stdout, b"hello").unwrap();
        assert_eq!(&bytes[..9], &[0, 0, 0, 5, 0, 0, 0, 7, 7]);
        let (frame, used) = decode_frame(&bytes).unwrap().unwrap();
        assert_eq!(used, bytes.len());
        assert_eq!(frame, Frame::new(7, FrameKind::Stdout, b"hello".to_vec()));
    }

    #[test]
    fn empty_payload_round_trip() {
        let bytes = encode_frame(3, FrameKind::StdinClose, &[]).unwrap();
        assert_eq!(bytes.len(), HEADER_LEN);
        let (frame, used) = decode_frame(&bytes).unwrap().unwrap();
        assert_eq!(
            (frame.kind, frame.payload.len(), used),
            (FrameKind::StdinClose, 0, 9)
        );
    }

    #[test]
    fn truncated_frame_needs_more() {
        let bytes = encode_frame(1, FrameKind::Stderr, b"0123456789").unwrap();
        for cut in 0..bytes.len() {
            assert_eq!(decode_frame(&bytes[..cut]).unwrap(), None, "cut at {cut}");
        }
        let mut dec = FrameDecoder::new();
        dec.extend(&bytes[..12]);
        assert_eq!(dec.next_frame().unwrap(), None);
        assert_eq!(
            dec.finish(),
            Err(FrameError::Truncated {
                have: 12,
                need: HEADER_LEN + 10
            })
        );
        dec.extend(&bytes[12..]);
        assert!(dec.next_frame().unwrap().is_some());
        assert_eq!(dec.finish(), Ok(()));
    }

    #[test]
    fn too_large_rejected_from_header_alone() {
        let mut header = ((MAX_PAYLOAD + 1) as u32).to_be_bytes().to_vec();
        header.extend_from_slice(&[0, 0, 0, 1, FrameKind::Stdout.as_u8()]);
        assert_eq!(
            decode_frame(&header),
            Err(FrameError::TooLarge {
                len: MAX_PAYLOAD + 1,
                max: MAX_PAYLOAD
            })
        );
        let big = vec![0u8; MAX_PAYLOAD + 1];
        assert!(matches!(
            encode_frame(1, FrameKind::Stdout, &big),
            Err(FrameError::TooLarge { .. })
        ));
        assert!(encode_frame(1, FrameKind::Stdout, &big[..MAX_PAYLOAD]).is_ok());
    }

    #[test]
    fn unknown_kind_rejected() {
        let mut bytes = encode_frame(1, FrameKind::Stdout, b"x").unwrap();
        bytes[8] = 200;
        assert_eq!(decode_frame(&bytes), Err(FrameError::UnknownKind(200)));
        for k in 1..=12u8 {
            assert_eq!(FrameKind::from_u8(k).map(FrameKind::as_u8), Some(k));
        }
        assert_eq!(FrameKind::from_u8(0), None);
    }

    #[test]
    fn decoder_splits_stream_at_any_boundary() {
        let mut wire = Vec::new();
        let frames: Vec<Frame> = (0..50u32)
            .map(|i| Frame::new(i, FrameKind::Stdout, vec![i as u8; i as usize * 3]))
            .collect();
        for f in &frames {
            wire.extend(f.encode().unwrap());
        }
        for step in [1, 2, 7, 64, 1000] {
            let mut dec = FrameDecoder::new();
            let mut got = Vec::new();
            for chunk in wire.chunks(step) {
                dec.extend(chunk);
                while let Some(f) = dec.next_frame().unwrap() {
                    got.push(f);
                }
            }
            assert_eq!(got, frames, "step {step}");
            dec.finish().unwrap();
        }
    }

    #[test]
    fn window_frames() {
        let bytes = encode_window(9, 4096);
        let (frame, _) = decode_frame(&bytes).unwrap().unwrap();
        assert_eq!(frame.window_increment(), Ok(4096));
        let bad = Frame::new(9, FrameKind::Window, vec![1, 2, 3]);
        assert!(bad.window_increment().is_err());
    }

    #[test]
    fn handshake_found_after_garbage() {
        let mut buf = b"\x00\x00\x00\x05garbage from an old session".to_vec();
        let start = buf.len();
        buf.extend(encode_handshake(FrameKind::Hello, &hello("abc")).unwrap());
        let end = buf.len();
        buf.extend(encode_frame(1, FrameKind::Request, b"{}").unwrap());
        match scan_handshake::<Hello>(&buf, FrameKind::Hello) {
            HandshakeScan::Found {
                value,
                start: s,
                end: e,
            } => {
                assert_eq!(value.nonce, "abc");
                assert_eq!((s, e), (start, end));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn handshake_skips_fake_magic_and_wrong_kind() {
        let mut buf = Vec::new();
        buf.extend_from_slice(&HELLO_MAGIC); // magic with no room for a header
        buf.extend_from_slice(b"123456789");
        buf.extend_from_slice(&HELLO_MAGIC); // header bytes are garbage
        buf.extend(encode_handshake(FrameKind::HelloAck, &hello("ack")).unwrap()); // wrong kind
        // Right kind and header, but the JSON is broken.
        let mut broken = encode_handshake(FrameKind::Hello, &hello("zzz")).unwrap();
        let n = broken.len();
        broken[n - 2] = b'!';
        buf.extend(broken);
        buf.extend(encode_handshake(FrameKind::Hello, &hello("good")).unwrap());
        match scan_handshake::<Hello>(&buf, FrameKind::Hello) {
            HandshakeScan::Found { value, end, .. } => {
                assert_eq!(value.nonce, "good");
                assert_eq!(end, buf.len());
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn handshake_partial_keeps_candidate() {
        let frame = encode_handshake(FrameKind::Hello, &hello("n1")).unwrap();
        let mut buf = vec![0xAAu8; 100];
        buf.extend_from_slice(&frame[..frame.len() - 3]);
        assert_eq!(
            scan_handshake::<Hello>(&buf, FrameKind::Hello),
            HandshakeScan::NeedMore { discard: 100 }
        );
        // Only the header and part of the magic: keep the tail.
        let mut buf = vec![0xAAu8; 100];
        buf.extend_from_slice(&frame[..12]);
        let HandshakeScan::NeedMore { discard } = scan_handshake::<Hello>(&buf, FrameKind::Hello)
        else {
            panic!("found in a partial buffer");
        };
        assert!(discard <= 100, "discarded into the candidate: {discard}");
        buf.drain(..discard);
        buf.extend_from_slice(&frame[12..]);
        assert!(matches!(
            scan_handshake::<Hello>(&buf, FrameKind::Hello),
            HandshakeScan::Found { .. }
        ));
    }

    #[test]
    fn handshake_incomplete_bogus_candidate_does_not_hide_a_later_one() {
        // A garbage header that claims a 4000-byte hello, then a real one.
        let mut buf = 4000u32.to_be_bytes().to_vec();
        buf.extend_from_slice(&[0, 0, 0, 0, FrameKind::Hello.as_u8()]);
        buf.extend_from_slice(&HELLO_MAGIC);
        buf.extend(encode_handshake(FrameKind::Hello, &hello("real")).unwrap());
        assert!(matches!(
            scan_handshake::<Hello>(&buf, FrameKind::Hello),
            HandshakeScan::Found { value: Hello { ref nonce, .. }, .. } if nonce == "real"
        ));
    }

    #[test]
    fn handshake_payload_in_band() {
        let frame = encode_handshake(FrameKind::Hello, &hello("x")).unwrap();
        let (f, _) = decode_frame(&frame).unwrap().unwrap();
        let h: Hello = parse_handshake_payload(&f.payload).unwrap();
        assert_eq!(h.nonce, "x");
        assert!(parse_handshake_payload::<Hello>(b"{}").is_none());
    }

    #[test]
    fn decode_never_panics_on_noise() {
        let mut rng = 0x1234_5678_u64;
        for _ in 0..2000 {
            let len = (rng % 64) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    rng as u8
                })
                .collect();
            let _ = decode_frame(&bytes);
            let _ = scan_handshake::<Hello>(&bytes, FrameKind::Hello);
        }
    }
}
