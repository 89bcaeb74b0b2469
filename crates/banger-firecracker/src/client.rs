//! HTTP/1.1 client for Firecracker's API socket.
//!
//! Built on hyper's low-level HTTP/1 connection API over a tokio
//! `UnixStream` rather than a hand-rolled client: hyper frames requests by
//! `Content-Length` from the body's exact size, reads responses by
//! `Content-Length` or chunking, and tracks whether the connection may be
//! reused, which are the parts a small hand-written client tends to get
//! subtly wrong. One connection is kept alive and reused across calls (the
//! configure sequence is a dozen requests); it is re-opened when Firecracker
//! closed it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::{self, SendRequest};
use hyper::{Method, Request, StatusCode, header};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::UnixStream;
use tokio::sync::Mutex;

use crate::models::{
    ActionType, BootSource, Drive, Fault, InstanceActionInfo, InstanceInfo, Logger,
    MachineConfiguration, Metrics, NetworkInterface, SnapshotCreateParams, SnapshotLoadParams, Vm,
    VmState, Vsock,
};

/// Default bound on one API call, connection included.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// An API call that did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("cannot connect to the Firecracker API socket {}", path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP exchange for {method} {path} failed")]
    Http {
        method: Method,
        path: String,
        #[source]
        source: hyper::Error,
    },
    #[error("{method} {path} did not complete within {timeout:?}")]
    Timeout {
        method: Method,
        path: String,
        timeout: Duration,
    },
    #[error("cannot encode the body of {method} {path}")]
    Encode {
        method: Method,
        path: String,
        #[source]
        source: serde_json::Error,
    },
    /// Firecracker refused the request: `status` and its `fault_message`.
    #[error("Firecracker answered {method} {path} with {status}: {fault_message}")]
    Fault {
        method: Method,
        path: String,
        status: StatusCode,
        fault_message: String,
    },
    #[error("Firecracker answered {method} {path} with {status} and an unexpected body: {body:?}")]
    UnexpectedResponse {
        method: Method,
        path: String,
        status: StatusCode,
        body: String,
    },
    #[error("cannot decode Firecracker's answer to {method} {path}")]
    Decode {
        method: Method,
        path: String,
        #[source]
        source: serde_json::Error,
    },
}

impl ApiError {
    /// The HTTP status Firecracker answered with, when it answered.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            Self::Fault { status, .. } | Self::UnexpectedResponse { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Firecracker's `fault_message`, when it sent one.
    pub fn fault_message(&self) -> Option<&str> {
        match self {
            Self::Fault { fault_message, .. } => Some(fault_message),
            _ => None,
        }
    }
}

/// Client of one Firecracker process's API socket. Calls are serialised on
/// one kept-alive connection.
#[derive(Debug)]
pub struct FirecrackerClient {
    socket: PathBuf,
    timeout: Duration,
    conn: Mutex<Option<SendRequest<Full<Bytes>>>>,
}

impl FirecrackerClient {
    /// A client for the API socket at `socket`; nothing is connected yet.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
            timeout: DEFAULT_REQUEST_TIMEOUT,
            conn: Mutex::new(None),
        }
    }

    /// Sets the bound on each call (connecting included).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    /// `PUT /logger`.
    pub async fn put_logger(&self, logger: &Logger) -> Result<(), ApiError> {
        self.put("/logger", logger).await
    }

    /// `PUT /metrics`.
    pub async fn put_metrics(&self, metrics: &Metrics) -> Result<(), ApiError> {
        self.put("/metrics", metrics).await
    }

    /// `PUT /machine-config`.
    pub async fn put_machine_config(&self, config: &MachineConfiguration) -> Result<(), ApiError> {
        self.put("/machine-config", config).await
    }

    /// `PUT /boot-source`.
    pub async fn put_boot_source(&self, boot: &BootSource) -> Result<(), ApiError> {
        self.put("/boot-source", boot).await
    }

    /// `PUT /drives/{drive_id}`, the id taken from the body.
    pub async fn put_drive(&self, drive: &Drive) -> Result<(), ApiError> {
        self.put(&format!("/drives/{}", drive.drive_id), drive)
            .await
    }

    /// `PUT /network-interfaces/{iface_id}`, the id taken from the body.
    pub async fn put_network_interface(&self, iface: &NetworkInterface) -> Result<(), ApiError> {
        self.put(&format!("/network-interfaces/{}", iface.iface_id), iface)
            .await
    }

    /// `PUT /vsock`.
    pub async fn put_vsock(&self, vsock: &Vsock) -> Result<(), ApiError> {
        self.put("/vsock", vsock).await
    }

    /// `PUT /actions {"action_type": "InstanceStart"}`.
    pub async fn instance_start(&self) -> Result<(), ApiError> {
        self.action(ActionType::InstanceStart).await
    }

    /// `PUT /actions {"action_type": "SendCtrlAltDel"}`: asks the guest to
    /// shut down (x86_64, needs i8042 in the guest kernel).
    pub async fn send_ctrl_alt_del(&self) -> Result<(), ApiError> {
        self.action(ActionType::SendCtrlAltDel).await
    }

    /// `GET /`.
    pub async fn describe_instance(&self) -> Result<InstanceInfo, ApiError> {
        let (status, body) = self.call(Method::GET, "/", None).await?;
        if status != StatusCode::OK {
            return Err(fault(Method::GET, "/", status, &body));
        }
        decode(Method::GET, "/", &body)
    }

    async fn action(&self, action_type: ActionType) -> Result<(), ApiError> {
        self.put("/actions", &InstanceActionInfo { action_type })
            .await
    }

    /// `PATCH /vm`: pause or resume the guest's vCPUs (after boot only).
    pub async fn patch_vm(&self, state: VmState) -> Result<(), ApiError> {
        self.send(Method::PATCH, "/vm", &Vm { state }).await
    }

    /// `PUT /snapshot/create`: the paused microVM's state and memory to files.
    pub async fn create_snapshot(&self, params: &SnapshotCreateParams) -> Result<(), ApiError> {
        self.put("/snapshot/create", params).await
    }

    /// `PUT /snapshot/load`, on a fresh process.
    pub async fn load_snapshot(&self, params: &SnapshotLoadParams) -> Result<(), ApiError> {
        self.put("/snapshot/load", params).await
    }

    /// `PUT path` with any JSON body, for endpoints without a typed method
    /// (balloon, snapshots, ...). 2xx is success; anything else is an error.
    pub async fn put<T: Serialize + ?Sized>(&self, path: &str, body: &T) -> Result<(), ApiError> {
        self.send(Method::PUT, path, body).await
    }

    async fn send<T: Serialize + ?Sized>(
        &self,
        method: Method,
        path: &str,
        body: &T,
    ) -> Result<(), ApiError> {
        let json = serde_json::to_vec(body).map_err(|source| ApiError::Encode {
            method: method.clone(),
            path: path.to_owned(),
            source,
        })?;
        let (status, answer) = self.call(method.clone(), path, Some(json)).await?;
        if status.is_success() {
            Ok(())
        } else {
            Err(fault(method, path, status, &answer))
        }
    }

    /// One request/response exchange, bounded by the client's timeout.
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes), ApiError> {
        match tokio::time::timeout(self.timeout, self.exchange(method.clone(), path, body)).await {
            Ok(result) => result,
            Err(_) => {
                // The connection may be mid-exchange: never reuse it.
                *self.conn.lock().await = None;
                Err(ApiError::Timeout {
                    method,
                    path: path.to_owned(),
                    timeout: self.timeout,
                })
            }
        }
    }

    async fn exchange(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes), ApiError> {
        let http_err = |source| ApiError::Http {
            method: method.clone(),
            path: path.to_owned(),
            source,
        };
        let mut slot = self.conn.lock().await;
        let mut sender = match slot.take() {
            Some(mut sender) if !sender.is_closed() => match sender.ready().await {
                Ok(()) => sender,
                Err(_) => self.connect().await?,
            },
            _ => self.connect().await?,
        };
        let mut builder = Request::builder()
            .method(method.clone())
            .uri(path)
            .header(header::HOST, "localhost")
            .header(header::ACCEPT, "application/json");
        let body = match body {
            Some(json) => {
                builder = builder.header(header::CONTENT_TYPE, "application/json");
                Full::new(Bytes::from(json))
            }
            None => Full::new(Bytes::new()),
        };
        let request = builder
            .body(body)
            .expect("method, origin-form path and static headers form a valid request");
        let response = sender.send_request(request).await.map_err(http_err)?;
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(http_err)?
            .to_bytes();
        *slot = Some(sender);
        Ok((status, bytes))
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, ApiError> {
        let connect_err = |source| ApiError::Connect {
            path: self.socket.clone(),
            source,
        };
        let stream = UnixStream::connect(&self.socket)
            .await
            .map_err(connect_err)?;
        // Title-case header names, as curl and Go send them: Firecracker's
        // own HTTP parser (micro_http) is not a general-purpose one.
        let (sender, connection) = http1::Builder::new()
            .title_case_headers(true)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| connect_err(std::io::Error::other(e)))?;
        // Drives the connection until the sender is dropped or the peer
        // closes it; errors surface through `send_request`.
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(sender)
    }
}

fn fault(method: Method, path: &str, status: StatusCode, body: &[u8]) -> ApiError {
    match serde_json::from_slice::<Fault>(body) {
        Ok(Fault {
            fault_message: Some(fault_message),
        }) => ApiError::Fault {
            method,
            path: path.to_owned(),
            status,
            fault_message,
        },
        _ => ApiError::UnexpectedResponse {
            method,
            path: path.to_owned(),
            status,
            body: String::from_utf8_lossy(body).into_owned(),
        },
    }
}

fn decode<T: DeserializeOwned>(method: Method, path: &str, body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|source| ApiError::Decode {
        method,
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    use tokio::net::UnixListener;

    use super::*;
    use crate::models::InstanceState;

    /// Reads one request from a raw connection: (head, body).
    async fn read_request(reader: &mut BufReader<UnixStream>) -> Option<(String, Vec<u8>)> {
        let mut head = String::new();
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).await.ok()? == 0 {
                return None;
            }
            head.push_str(&line);
            if line == "\r\n" {
                break;
            }
        }
        let len = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().parse::<usize>().unwrap())
            })
            .unwrap_or(0);
        let mut body = vec![0; len];
        reader.read_exact(&mut body).await.ok()?;
        Some((head, body))
    }

    /// A raw HTTP/1.1 peer: the client must frame requests by
    /// Content-Length (Firecracker's server does not take chunked bodies),
    /// send no body on GET, and reuse one connection.
    #[tokio::test]
    async fn requests_are_framed_by_content_length_on_one_connection() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let mut reader = BufReader::new(stream);
            let mut seen = Vec::new();
            while let Some((head, body)) = read_request(&mut reader).await {
                let reply = if head.starts_with("GET / ") {
                    r#"{"app_name":"Firecracker","id":"vm","state":"Running","vmm_version":"1.17.0"}"#
                } else {
                    r#"{"fault_message":"no way."}"#
                };
                let status = if reply.contains("fault") {
                    "400 Bad Request"
                } else {
                    "200 OK"
                };
                let answer = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{reply}",
                    reply.len()
                );
                reader.get_mut().write_all(answer.as_bytes()).await.unwrap();
                seen.push((head, body));
            }
            seen
        });

        let client = FirecrackerClient::new(&path);
        let vsock = Vsock {
            guest_cid: 3,
            uds_path: "/run/v.sock".into(),
        };
        let err = client.put_vsock(&vsock).await.unwrap_err();
        assert_eq!(err.status(), Some(StatusCode::BAD_REQUEST));
        assert_eq!(err.fault_message(), Some("no way."));
        let info = client.describe_instance().await.unwrap();
        assert_eq!(info.state, InstanceState::Running);
        drop(client);

        let seen = server.await.unwrap();
        assert_eq!(seen.len(), 2, "both requests on one connection");
        let (put_head, put_body) = &seen[0];
        let expected = br#"{"guest_cid":3,"uds_path":"/run/v.sock"}"#;
        assert!(
            put_head.starts_with("PUT /vsock HTTP/1.1\r\n"),
            "{put_head}"
        );
        assert!(
            put_head.contains(&format!("\r\nContent-Length: {}\r\n", expected.len())),
            "{put_head}"
        );
        assert!(
            put_head.contains("\r\nContent-Type: application/json\r\n"),
            "{put_head}"
        );
        assert!(!put_head.to_ascii_lowercase().contains("transfer-encoding"));
        assert_eq!(put_body, expected);
        let (get_head, get_body) = &seen[1];
        assert!(get_head.starts_with("GET / HTTP/1.1\r\n"), "{get_head}");
        assert!(
            !get_head.to_ascii_lowercase().contains("content-length"),
            "{get_head}"
        );
        assert!(get_body.is_empty());
    }

    #[tokio::test]
    async fn a_closed_connection_is_reopened() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(async move {
            let mut connections = 0;
            for _ in 0..2 {
                let (stream, _) = listener.accept().await.unwrap();
                connections += 1;
                let mut reader = BufReader::new(stream);
                read_request(&mut reader).await.unwrap();
                // Answer, then close: the next call needs a new connection.
                reader
                    .get_mut()
                    .write_all(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
                    .await
                    .unwrap();
            }
            connections
        });
        let client = FirecrackerClient::new(&path);
        client.instance_start().await.unwrap();
        client.send_ctrl_alt_del().await.unwrap();
        assert_eq!(server.await.unwrap(), 2);
    }

    #[tokio::test]
    async fn unanswered_requests_time_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let holder = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(stream);
        });
        let client = FirecrackerClient::new(&path).with_timeout(Duration::from_millis(200));
        let err = client.instance_start().await.unwrap_err();
        assert!(matches!(err, ApiError::Timeout { .. }), "{err}");
        holder.abort();
        let err = FirecrackerClient::new(dir.path().join("absent"))
            .describe_instance()
            .await
            .unwrap_err();
        assert!(matches!(err, ApiError::Connect { .. }), "{err}");
    }
}
