//! Reading newline-delimited frames with a size bound.

use tokio::io::{AsyncBufRead, AsyncBufReadExt};

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame exceeds {limit} bytes")]
    TooLarge { limit: usize },
    #[error("connection closed in the middle of a frame")]
    Truncated,
    #[error("connection error")]
    Io(#[from] std::io::Error),
}

/// Read one frame (without its `\n`). `Ok(None)` on a clean end of stream.
///
/// Never buffers more than `limit` bytes: a longer line is an error, after
/// which the stream is no longer in sync and must be closed.
pub async fn read_frame<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    limit: usize,
) -> Result<Option<Vec<u8>>, FrameError> {
    let mut frame = Vec::new();
    loop {
        let buf = reader.fill_buf().await?;
        if buf.is_empty() {
            return if frame.is_empty() {
                Ok(None)
            } else {
                Err(FrameError::Truncated)
            };
        }
        let (chunk, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (&buf[..i], Some(i + 1)),
            None => (buf, None),
        };
        if frame.len() + chunk.len() > limit {
            return Err(FrameError::TooLarge { limit });
        }
        frame.extend_from_slice(chunk);
        let used = done.unwrap_or(chunk.len());
        reader.consume(used);
        if done.is_some() {
            return Ok(Some(frame));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::BufReader;

    async fn frames(input: &[u8], limit: usize) -> Vec<Result<Option<Vec<u8>>, String>> {
        let mut r = BufReader::with_capacity(4, input);
        let mut out = Vec::new();
        loop {
            let f = read_frame(&mut r, limit).await.map_err(|e| e.to_string());
            let stop = !matches!(f, Ok(Some(_)));
            out.push(f);
            if stop {
                return out;
            }
        }
    }

    #[tokio::test]
    async fn splits_lines_across_small_buffers() {
        let got = frames(b"hello world\n{}\n", 64).await;
        assert_eq!(got[0], Ok(Some(b"hello world".to_vec())));
        assert_eq!(got[1], Ok(Some(b"{}".to_vec())));
        assert_eq!(got[2], Ok(None));
    }

    #[tokio::test]
    async fn limit_is_enforced_and_exact_fit_passes() {
        assert_eq!(frames(b"12345\n", 5).await[0], Ok(Some(b"12345".to_vec())));
        assert_eq!(
            frames(b"123456\n", 5).await[0],
            Err("frame exceeds 5 bytes".into())
        );
    }

    #[tokio::test]
    async fn eof_mid_frame_is_truncated() {
        assert_eq!(
            frames(b"abc", 64).await[0],
            Err("connection closed in the middle of a frame".into())
        );
    }
}
