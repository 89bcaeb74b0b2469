//! Arbitrary bytes sent to a real server connection: the server never
//! panics or hangs, and everything it writes back is a well-formed response
//! frame carrying an op id.
#![no_main]

use std::sync::Arc;
use std::time::Duration;

use banger_rpc::{Router, RpcError, ServeConfig, serve_connection};
use banger_wire::{Method, NoParams, Response, ResponseBody};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Echo;
impl Method for Echo {
    const NAME: &'static str = "fuzz.echo";
    type Params = serde_json::Value;
    type Result = serde_json::Value;
}

struct Fail;
impl Method for Fail {
    const NAME: &'static str = "fuzz.fail";
    type Params = NoParams;
    type Result = ();
}

fuzz_target!(|data: &[u8]| {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let router = Router::new()
            .route::<Echo, _, _>(|ctx, p| async move {
                ctx.events.send(&p).await;
                Ok(p)
            })
            .route::<Fail, _, _>(|_, _| async move { Err(RpcError::conflict("no")) });
        let uid = std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m)).unwrap();
        let cfg = Arc::new(ServeConfig { name: "fuzz", allowed_uids: vec![uid] });
        let (server, mut client) = tokio::net::UnixStream::pair().unwrap();
        let (_stop, stop_rx) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(serve_connection(server, cfg, Arc::new(router), stop_rx));
        let _ = client.write_all(data).await;
        let _ = client.shutdown().await;
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut out))
            .await
            .expect("server answered and closed")
            .unwrap();
        task.await.unwrap();
        for line in out.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            let resp: Response = serde_json::from_slice(line).expect("well-formed response frame");
            if let ResponseBody::Error(e) = &resp.body {
                assert_eq!(e.op_id, resp.op_id);
            }
        }
    });
});
