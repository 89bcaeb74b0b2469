use std::path::{Path, PathBuf};

use banger_wire::{
    ErrorObject, MAX_FRAME_BYTES, Method, OpId, PROTOCOL_VERSION, Request, Response, ResponseBody,
    encode_frame,
};
use serde_json::Value;
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::frame::{FrameError, read_frame};

/// One connection to a banger RPC server. Calls run one at a time.
#[derive(Debug)]
pub struct Client {
    stream: BufReader<UnixStream>,
    next_id: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {}", path.display())]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The server answered with an error object.
    #[error("{0}")]
    Remote(ErrorObject),
    #[error("connection to the server failed")]
    Io(#[from] std::io::Error),
    #[error("protocol error: {0}")]
    Protocol(String),
}

impl From<FrameError> for ClientError {
    fn from(e: FrameError) -> Self {
        match e {
            FrameError::Io(io) => ClientError::Io(io),
            other => ClientError::Protocol(other.to_string()),
        }
    }
}

impl Client {
    pub async fn connect(path: &Path) -> Result<Client, ClientError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| ClientError::Connect {
                path: path.to_owned(),
                source,
            })?;
        Ok(Client {
            stream: BufReader::new(stream),
            next_id: 1,
        })
    }

    /// Call `M` and wait for its result.
    pub async fn call<M: Method>(
        &mut self,
        params: &M::Params,
        op_id: Option<&OpId>,
    ) -> Result<M::Result, ClientError> {
        self.call_with_events::<M>(params, op_id, |_, _| {}).await
    }

    /// Call `M`, handing every `event` frame to `on_event` as it arrives.
    pub async fn call_with_events<M: Method>(
        &mut self,
        params: &M::Params,
        op_id: Option<&OpId>,
        on_event: impl FnMut(&OpId, Value),
    ) -> Result<M::Result, ClientError> {
        let params =
            serde_json::to_value(params).map_err(|e| ClientError::Protocol(e.to_string()))?;
        let value = self.call_raw(M::NAME, params, op_id, on_event).await?;
        serde_json::from_value(value)
            .map_err(|e| ClientError::Protocol(format!("unexpected result for {}: {e}", M::NAME)))
    }

    /// Call a method by name with untyped params.
    pub async fn call_raw(
        &mut self,
        method: &str,
        params: Value,
        op_id: Option<&OpId>,
        mut on_event: impl FnMut(&OpId, Value),
    ) -> Result<Value, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        let req = Request {
            v: PROTOCOL_VERSION,
            id,
            op_id: op_id.cloned(),
            method: method.to_owned(),
            params,
        };
        self.stream.get_mut().write_all(&encode_frame(&req)).await?;
        loop {
            let frame = read_frame(&mut self.stream, MAX_FRAME_BYTES)
                .await?
                .ok_or_else(|| {
                    ClientError::Protocol(format!(
                        "server closed the connection before answering {method}"
                    ))
                })?;
            let resp: Response = serde_json::from_slice(&frame)
                .map_err(|e| ClientError::Protocol(format!("malformed response: {e}")))?;
            if resp.id.is_some_and(|rid| rid != id) {
                return Err(ClientError::Protocol(format!(
                    "response for request {:?}, expected {id}",
                    resp.id
                )));
            }
            match resp.body {
                ResponseBody::Event(ev) => on_event(&resp.op_id, ev),
                ResponseBody::Result(v) => return Ok(v),
                ResponseBody::Error(e) => return Err(ClientError::Remote(e)),
            }
        }
    }
}
