//! The server loop against a real Unix socket: every error path carries an op id.

use std::sync::Arc;
use std::time::Duration;

use banger_rpc::{Client, ClientError, Router, RpcError, ServeConfig, bind_socket, serve};
use banger_wire::{ErrorCode, Method, NoParams, OpId, Response, ResponseBody};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::watch;

struct Echo;
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct EchoParams {
    text: String,
}
impl Method for Echo {
    const NAME: &'static str = "test.echo";
    type Params = EchoParams;
    type Result = String;
}

struct Fail;
impl Method for Fail {
    const NAME: &'static str = "test.fail";
    type Params = NoParams;
    type Result = ();
}

struct Panic;
impl Method for Panic {
    const NAME: &'static str = "test.panic";
    type Params = NoParams;
    type Result = ();
}

struct Progress;
impl Method for Progress {
    const NAME: &'static str = "test.progress";
    type Params = NoParams;
    type Result = u32;
}

struct Server {
    _dir: tempfile::TempDir,
    sock: std::path::PathBuf,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

async fn start(allowed_uids: Vec<u32>) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s.sock");
    let router = Router::new()
        .route::<Echo, _, _>(|_ctx, p| async move { Ok(p.text) })
        .route::<Fail, _, _>(|_ctx, _| async move { Err(RpcError::not_found("no VM named \"x\"")) })
        .route::<Panic, _, _>(|_ctx, _| async move { panic!("boom") })
        .route::<Progress, _, _>(|ctx, _| async move {
            for i in 0..3u32 {
                ctx.events.send(&serde_json::json!({"stage": i})).await;
            }
            Ok(3)
        });
    let listener = bind_socket(&sock).unwrap();
    let (stop, rx) = watch::channel(false);
    let cfg = ServeConfig {
        name: "test",
        allowed_uids,
    };
    let task = tokio::spawn(serve(
        listener,
        cfg,
        Arc::new(router),
        rx,
        Duration::from_secs(2),
    ));
    Server {
        _dir: dir,
        sock,
        stop,
        task,
    }
}

fn my_uid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    // The uid that owns a file we just created is ours.
    let f = tempfile::NamedTempFile::new().unwrap();
    f.as_file().metadata().unwrap().uid()
}

async fn raw_exchange(sock: &std::path::Path, bytes: &[u8]) -> Option<Response> {
    let mut s = UnixStream::connect(sock).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    let n = r.read_line(&mut line).await.unwrap();
    (n > 0).then(|| serde_json::from_str(&line).unwrap())
}

fn error_of(resp: Response) -> (OpId, banger_wire::ErrorObject) {
    match resp.body {
        ResponseBody::Error(e) => (resp.op_id, e),
        other => panic!("expected an error, got {other:?}"),
    }
}

#[tokio::test]
async fn typed_call_round_trips() {
    let srv = start(vec![my_uid()]).await;
    let mut c = Client::connect(&srv.sock).await.unwrap();
    let out = c
        .call::<Echo>(&EchoParams { text: "hi".into() }, None)
        .await
        .unwrap();
    assert_eq!(out, "hi");
    // Several calls on one connection.
    let out = c
        .call::<Echo>(
            &EchoParams {
                text: "again".into(),
            },
            None,
        )
        .await
        .unwrap();
    assert_eq!(out, "again");
}

#[tokio::test]
async fn handler_error_carries_minted_or_given_op_id() {
    let srv = start(vec![my_uid()]).await;
    let mut c = Client::connect(&srv.sock).await.unwrap();
    let Err(ClientError::Remote(e)) = c.call::<Fail>(&NoParams {}, None).await else {
        panic!()
    };
    assert_eq!(e.code, ErrorCode::NotFound);
    assert!(e.op_id.as_str().starts_with("op-"));
    let given: OpId = "op-given1".parse().unwrap();
    let Err(ClientError::Remote(e)) = c.call::<Fail>(&NoParams {}, Some(&given)).await else {
        panic!()
    };
    assert_eq!(e.op_id, given);
    assert_eq!(e.to_string(), "no VM named \"x\" (op-given1)");
}

#[tokio::test]
async fn unknown_method_and_bad_version_carry_op_ids() {
    let srv = start(vec![my_uid()]).await;
    let resp = raw_exchange(
        &srv.sock,
        b"{\"v\":1,\"id\":4,\"op_id\":\"op-abcdef\",\"method\":\"vm.nope\"}\n",
    )
    .await
    .unwrap();
    assert_eq!(resp.id, Some(4));
    let (op, e) = error_of(resp);
    assert_eq!(e.code, ErrorCode::UnknownMethod);
    assert_eq!(op.as_str(), "op-abcdef");
    assert_eq!(e.op_id.as_str(), "op-abcdef");
    assert!(e.message.contains("test.echo"), "{}", e.message);

    let resp = raw_exchange(&srv.sock, b"{\"v\":99,\"id\":5,\"method\":\"test.echo\"}\n")
        .await
        .unwrap();
    let (op, e) = error_of(resp);
    assert_eq!(e.code, ErrorCode::BadVersion);
    assert_eq!(op, e.op_id);
    assert!(op.as_str().starts_with("op-"));
}

#[tokio::test]
async fn invalid_params_name_the_method() {
    let srv = start(vec![my_uid()]).await;
    let resp = raw_exchange(
        &srv.sock,
        b"{\"v\":1,\"id\":1,\"method\":\"test.echo\",\"params\":{\"txt\":1}}\n",
    )
    .await
    .unwrap();
    let (_, e) = error_of(resp);
    assert_eq!(e.code, ErrorCode::InvalidParams);
    assert!(e.message.contains("test.echo"), "{}", e.message);
}

#[tokio::test]
async fn garbage_frames_get_typed_errors_and_connection_survives() {
    let srv = start(vec![my_uid()]).await;
    let mut s = BufReader::new(UnixStream::connect(&srv.sock).await.unwrap());
    for frame in [&b"\xff\xfe\n"[..], b"not json\n", b"[]\n"] {
        s.get_mut().write_all(frame).await.unwrap();
        let mut line = String::new();
        s.read_line(&mut line).await.unwrap();
        let (_, e) = error_of(serde_json::from_str(&line).unwrap());
        assert_eq!(e.code, ErrorCode::InvalidRequest);
    }
    // Still usable afterwards.
    s.get_mut()
        .write_all(b"{\"v\":1,\"id\":2,\"method\":\"test.echo\",\"params\":{\"text\":\"ok\"}}\n")
        .await
        .unwrap();
    let mut line = String::new();
    s.read_line(&mut line).await.unwrap();
    let resp: Response = serde_json::from_str(&line).unwrap();
    assert_eq!(resp.body, ResponseBody::Result(serde_json::json!("ok")));
}

#[tokio::test]
async fn oversized_frame_is_refused_then_closed() {
    let srv = start(vec![my_uid()]).await;
    let mut big = vec![b'a'; banger_wire::MAX_FRAME_BYTES + 10];
    big.push(b'\n');
    let mut s = UnixStream::connect(&srv.sock).await.unwrap();
    // The server may close before we finish writing; that is fine.
    let _ = s.write_all(&big).await;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).await.unwrap();
    let (_, e) = error_of(serde_json::from_str(&line).unwrap());
    assert_eq!(e.code, ErrorCode::InvalidRequest);
    assert!(e.message.contains("exceeds"));
    line.clear();
    assert_eq!(
        r.read_line(&mut line).await.unwrap(),
        0,
        "connection must be closed"
    );
    // The server is still healthy.
    let mut c = Client::connect(&srv.sock).await.unwrap();
    assert_eq!(
        c.call::<Echo>(&EchoParams { text: "x".into() }, None)
            .await
            .unwrap(),
        "x"
    );
}

#[tokio::test]
async fn closed_mid_frame_does_not_hurt_the_server() {
    let srv = start(vec![my_uid()]).await;
    {
        let mut s = UnixStream::connect(&srv.sock).await.unwrap();
        s.write_all(b"{\"v\":1,\"id\":1,\"meth").await.unwrap();
    }
    let mut c = Client::connect(&srv.sock).await.unwrap();
    assert_eq!(
        c.call::<Echo>(&EchoParams { text: "y".into() }, None)
            .await
            .unwrap(),
        "y"
    );
}

#[tokio::test]
async fn handler_panic_is_an_internal_error() {
    let srv = start(vec![my_uid()]).await;
    let mut c = Client::connect(&srv.sock).await.unwrap();
    let Err(ClientError::Remote(e)) = c.call::<Panic>(&NoParams {}, None).await else {
        panic!()
    };
    assert_eq!(e.code, ErrorCode::Internal);
    assert_eq!(
        c.call::<Echo>(&EchoParams { text: "z".into() }, None)
            .await
            .unwrap(),
        "z"
    );
}

#[tokio::test]
async fn events_arrive_before_the_result_with_the_op_id() {
    let srv = start(vec![my_uid()]).await;
    let mut c = Client::connect(&srv.sock).await.unwrap();
    let mut seen = Vec::new();
    let op: OpId = "op-events".parse().unwrap();
    let n = c
        .call_with_events::<Progress>(&NoParams {}, Some(&op), |o, ev| seen.push((o.clone(), ev)))
        .await
        .unwrap();
    assert_eq!(n, 3);
    assert_eq!(seen.len(), 3);
    assert!(seen.iter().all(|(o, _)| *o == op));
    assert_eq!(seen[2].1["stage"], 2);
}

#[tokio::test]
async fn foreign_uid_is_refused() {
    let srv = start(vec![my_uid().wrapping_add(12345)]).await;
    let mut c = Client::connect(&srv.sock).await.unwrap();
    let Err(ClientError::Remote(e)) = c.call::<Echo>(&EchoParams { text: "x".into() }, None).await
    else {
        panic!()
    };
    assert_eq!(e.code, ErrorCode::PermissionDenied);
}

#[tokio::test]
async fn socket_is_private_and_shutdown_returns() {
    use std::os::unix::fs::PermissionsExt;
    let srv = start(vec![my_uid()]).await;
    let mode = std::fs::metadata(&srv.sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    srv.stop.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(5), srv.task)
        .await
        .unwrap()
        .unwrap();
}

#[test]
fn securing_the_socket_node_never_follows_a_planted_link() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let victim = dir.path().join("shadow");
    std::fs::write(&victim, "x").unwrap();
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o640)).unwrap();
    let sock = dir.path().join("helper.sock");
    std::os::unix::fs::symlink(&victim, &sock).unwrap();
    let e = banger_rpc::secure_socket_node(&sock, Some(65534)).unwrap_err();
    assert!(e.to_string().contains("is not the socket"), "{e}");
    let meta = std::fs::metadata(&victim).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o640);
    assert_eq!(std::os::unix::fs::MetadataExt::uid(&meta), 0);
    // A plain file is not the socket either.
    std::fs::remove_file(&sock).unwrap();
    std::fs::write(&sock, "").unwrap();
    let e = banger_rpc::secure_socket_node(&sock, None).unwrap_err();
    assert!(e.to_string().contains("is not the socket"), "{e}");
    // The real thing: 0600, handed to the owner.
    std::fs::remove_file(&sock).unwrap();
    let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    banger_rpc::secure_socket_node(&sock, Some(65534)).unwrap();
    let meta = std::fs::symlink_metadata(&sock).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(std::os::unix::fs::MetadataExt::uid(&meta), 65534);
}

struct Hold;
impl Method for Hold {
    const NAME: &'static str = "test.hold";
    type Params = NoParams;
    type Result = ();
}

#[tokio::test]
async fn a_handler_learns_when_its_caller_closes_the_connection() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s.sock");
    let (gone_tx, mut gone_rx) = tokio::sync::mpsc::unbounded_channel::<OpId>();
    let router = Router::new().route::<Hold, _, _>(move |ctx, _| {
        let gone_tx = gone_tx.clone();
        async move {
            ctx.events.send(&serde_json::json!({"held": true})).await;
            ctx.caller_gone().await;
            let _ = gone_tx.send(ctx.op_id.clone());
            Ok(())
        }
    });
    let (_stop, rx) = watch::channel(false);
    let cfg = ServeConfig {
        name: "test",
        allowed_uids: vec![my_uid()],
    };
    tokio::spawn(serve(
        bind_socket(&sock).unwrap(),
        cfg,
        Arc::new(router),
        rx,
        Duration::from_secs(2),
    ));
    let mut s = UnixStream::connect(&sock).await.unwrap();
    s.write_all(b"{\"v\":1,\"id\":1,\"op_id\":\"op-hold01\",\"method\":\"test.hold\"}\n")
        .await
        .unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).await.unwrap();
    let event: Response = serde_json::from_str(&line).unwrap();
    assert!(matches!(event.body, ResponseBody::Event(_)), "{line}");
    // The caller is still there: the handler holds.
    assert!(gone_rx.try_recv().is_err());
    drop(r);
    let gone = tokio::time::timeout(Duration::from_secs(30), gone_rx.recv())
        .await
        .expect("the handler was told its caller went away")
        .unwrap();
    assert_eq!(gone.as_str(), "op-hold01");
}
