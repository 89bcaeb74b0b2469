//! A minimal QMP client: greeting, capabilities negotiation, commands.

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::VmmError;

#[derive(Debug)]
pub struct Qmp {
    stream: BufReader<UnixStream>,
}

impl Qmp {
    /// Connect and leave capabilities negotiation mode.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Qmp, VmmError> {
        tokio::time::timeout(timeout, async {
            let stream = UnixStream::connect(path).await?;
            let mut qmp = Qmp {
                stream: BufReader::new(stream),
            };
            let greeting = qmp.read_message().await?;
            if greeting.get("QMP").is_none() {
                return Err(VmmError::Qmp(format!("unexpected greeting {greeting}")));
            }
            qmp.execute("qmp_capabilities", None).await?;
            Ok(qmp)
        })
        .await
        .map_err(|_| {
            VmmError::Qmp(format!(
                "no answer on {} within {timeout:?}",
                path.display()
            ))
        })?
    }

    async fn read_message(&mut self) -> Result<Value, VmmError> {
        let mut line = String::new();
        if self.stream.read_line(&mut line).await? == 0 {
            return Err(VmmError::Qmp("QEMU closed the QMP connection".into()));
        }
        serde_json::from_str(&line)
            .map_err(|e| VmmError::Qmp(format!("malformed QMP message: {e}")))
    }

    /// Run a command; asynchronous events that arrive meanwhile are skipped.
    pub async fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, VmmError> {
        let mut msg = json!({ "execute": command });
        if let Some(args) = arguments {
            msg["arguments"] = args;
        }
        let mut bytes = serde_json::to_vec(&msg).expect("serialisable");
        bytes.push(b'\n');
        self.stream.get_mut().write_all(&bytes).await?;
        loop {
            let reply = self.read_message().await?;
            if let Some(ret) = reply.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = reply.get("error") {
                let desc = err
                    .get("desc")
                    .and_then(Value::as_str)
                    .unwrap_or("unknown error");
                return Err(VmmError::Qmp(format!("{command}: {desc}")));
            }
            // {"event": ...}: not ours.
        }
    }
}
