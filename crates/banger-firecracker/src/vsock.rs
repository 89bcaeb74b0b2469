//! Host-initiated connections over Firecracker's hybrid vsock.
//!
//! The host connects to the Unix socket `uds_path` of the vsock device,
//! writes `CONNECT <port>\n`, and Firecracker answers `OK <host_port>\n`
//! once the guest accepted; from then on the stream is the guest's. If
//! nothing listens on that guest port, Firecracker closes the connection
//! without a reply. The reply is read one byte at a time: the guest may
//! speak first, and its bytes can arrive in the same segment as the `OK`
//! line, so a buffered reader would swallow them.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// Longest reply accepted: `OK ` + a u32 + `\n` is at most 14 bytes.
const MAX_REPLY: usize = 32;

/// Why a hybrid vsock connection could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("cannot connect to the vsock socket {}", path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot send the CONNECT request on {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Firecracker closed the connection without answering: nothing
    /// listens on that port in the guest (yet).
    #[error("guest port {port} refused the connection (Firecracker closed {} without a reply)", path.display())]
    Refused { path: PathBuf, port: u32 },
    #[error("unexpected reply to CONNECT {port} on {}: {reply:?}", path.display())]
    BadReply {
        path: PathBuf,
        port: u32,
        reply: String,
    },
    #[error("no reply to CONNECT {port} on {} within {timeout:?}", path.display())]
    Timeout {
        path: PathBuf,
        port: u32,
        timeout: Duration,
    },
}

/// Opens a stream to guest vsock `port` through the hybrid vsock socket at
/// `uds_path`. The returned stream is positioned right after Firecracker's
/// `OK <host_port>\n` line. `timeout` bounds the whole handshake.
///
/// A guest that is still booting answers [`VsockError::Refused`]; callers
/// that wait for a guest service retry on it.
pub async fn connect_vsock(
    uds_path: &Path,
    port: u32,
    timeout: Duration,
) -> Result<UnixStream, VsockError> {
    match tokio::time::timeout(timeout, handshake(uds_path, port)).await {
        Ok(result) => result.map(|(stream, _host_port)| stream),
        Err(_) => Err(VsockError::Timeout {
            path: uds_path.to_owned(),
            port,
            timeout,
        }),
    }
}

async fn handshake(uds_path: &Path, port: u32) -> Result<(UnixStream, u32), VsockError> {
    let path = || uds_path.to_owned();
    let mut stream = UnixStream::connect(uds_path)
        .await
        .map_err(|source| VsockError::Connect {
            path: path(),
            source,
        })?;
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .await
        .map_err(|source| VsockError::Io {
            path: path(),
            source,
        })?;

    let mut reply = Vec::with_capacity(MAX_REPLY);
    loop {
        let mut byte = [0u8; 1];
        let n = match stream.read(&mut byte).await {
            Ok(n) => n,
            // A reset instead of an orderly close means the same thing.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => 0,
            Err(source) => {
                return Err(VsockError::Io {
                    path: path(),
                    source,
                });
            }
        };
        if n == 0 {
            return Err(if reply.is_empty() {
                VsockError::Refused { path: path(), port }
            } else {
                bad_reply(uds_path, port, &reply)
            });
        }
        if byte[0] == b'\n' {
            break;
        }
        reply.push(byte[0]);
        if reply.len() >= MAX_REPLY {
            return Err(bad_reply(uds_path, port, &reply));
        }
    }
    let host_port = std::str::from_utf8(&reply)
        .ok()
        .and_then(|line| line.strip_prefix("OK "))
        .and_then(|n| n.parse::<u32>().ok())
        .ok_or_else(|| bad_reply(uds_path, port, &reply))?;
    Ok((stream, host_port))
}

fn bad_reply(path: &Path, port: u32, reply: &[u8]) -> VsockError {
    VsockError::BadReply {
        path: path.to_owned(),
        port,
        reply: String::from_utf8_lossy(reply).into_owned(),
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncBufReadExt, BufReader};
    use tokio::net::UnixListener;

    use super::*;

    /// A fake Firecracker side: checks the request line, then writes `reply`
    /// in a single write and closes.
    async fn serve_once(listener: UnixListener, reply: &'static [u8]) -> String {
        let (stream, _) = listener.accept().await.unwrap();
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        reader.read_line(&mut line).await.unwrap();
        let mut stream = reader.into_inner();
        stream.write_all(reply).await.unwrap();
        line
    }

    fn bound() -> (tempfile::TempDir, PathBuf, UnixListener) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        let listener = UnixListener::bind(&path).unwrap();
        (dir, path, listener)
    }

    #[tokio::test]
    async fn guest_bytes_in_the_same_segment_as_ok_are_kept() {
        let (_dir, path, listener) = bound();
        let server = tokio::spawn(serve_once(listener, b"OK 1073741824\nhello from guest"));
        let mut stream = connect_vsock(&path, 1024, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(server.await.unwrap(), "CONNECT 1024\n");
        let mut rest = String::new();
        stream.read_to_string(&mut rest).await.unwrap();
        assert_eq!(rest, "hello from guest");
    }

    #[tokio::test]
    async fn close_without_reply_is_refused() {
        let (_dir, path, listener) = bound();
        tokio::spawn(serve_once(listener, b""));
        let err = connect_vsock(&path, 7, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(err, VsockError::Refused { port: 7, .. }), "{err}");
    }

    #[tokio::test]
    async fn garbage_reply_is_reported() {
        let (_dir, path, listener) = bound();
        tokio::spawn(serve_once(listener, b"NOPE 12\n"));
        let err = connect_vsock(&path, 7, Duration::from_secs(5))
            .await
            .unwrap_err();
        match err {
            VsockError::BadReply { reply, .. } => assert_eq!(reply, "NOPE 12"),
            other => panic!("unexpected {other}"),
        }
        let (_dir, path, listener) = bound();
        tokio::spawn(serve_once(listener, &[b'x'; 64]));
        let err = connect_vsock(&path, 7, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(err, VsockError::BadReply { .. }), "{err}");
    }

    #[tokio::test]
    async fn silent_peer_times_out() {
        let (_dir, path, listener) = bound();
        // Accepts and keeps the connection open without answering.
        let holder = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(stream);
        });
        let err = connect_vsock(&path, 7, Duration::from_millis(200))
            .await
            .unwrap_err();
        assert!(matches!(err, VsockError::Timeout { .. }), "{err}");
        holder.abort();
    }

    #[tokio::test]
    async fn missing_socket_is_a_connect_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = connect_vsock(&dir.path().join("absent"), 7, Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(matches!(err, VsockError::Connect { .. }), "{err}");
    }
}
