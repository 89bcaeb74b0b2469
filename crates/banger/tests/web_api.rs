//! The daemon's web API (`banger-web`), over HTTP like a browser: the login
//! flow, the Host / Origin / cookie guards, errors carrying the RPC's codes
//! and op ids, operations followed as Server-Sent Events, and a VM's life
//! against fc-double. Each test's daemon runs in a network namespace of its
//! own; the HTTP client enters it on a thread of its own.

mod common;

use std::future::Future;
use std::os::fd::AsFd;
use std::time::Duration;

use common::{TestHome, fc_double_home, wait_until};
use reqwest::{Client, Response, StatusCode, header};
use serde_json::{Value, json};

/// Run `f` on a thread inside `home`'s network namespace (where the
/// daemon's loopback is), on a runtime of that thread's own.
fn in_netns<T: Send + 'static, Fut: Future<Output = T>>(
    home: &TestHome,
    f: impl FnOnce() -> Fut + Send + 'static,
) -> T {
    let ns = home.netns.clone().expect("a home in a namespace");
    std::thread::spawn(move || {
        let file = std::fs::File::open(format!("/run/netns/{ns}")).unwrap();
        rustix::thread::move_into_link_name_space(
            file.as_fd(),
            Some(rustix::thread::LinkNameSpaceType::Network),
        )
        .unwrap();
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f())
    })
    .join()
    .unwrap()
}

/// A logged-in client of one daemon's web API.
#[derive(Clone)]
struct Web {
    base: String,
    cookie: String,
    http: Client,
}

fn client() -> Client {
    Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .build()
        .unwrap()
}

/// `banger web --json`'s one-time URL.
fn login_url(home: &TestHome) -> String {
    home.json(&["web"])["url"]
        .as_str()
        .expect("url")
        .to_string()
}

impl Web {
    fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.http
            .get(format!("{}{path}", self.base))
            .header(header::COOKIE, &self.cookie)
    }

    /// A state-changing request, from a page this server served.
    fn send(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.base))
            .header(header::COOKIE, &self.cookie)
            .header(header::ORIGIN, &self.base)
    }

    /// A WebSocket to `path`, opened as a page this server served opens one.
    async fn ws(
        &self,
        path: &str,
    ) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>
    {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let url = format!("{}{path}", self.base.replace("http://", "ws://"));
        let mut req = url.as_str().into_client_request().unwrap();
        req.headers_mut()
            .insert("Cookie", self.cookie.parse().unwrap());
        req.headers_mut()
            .insert("Origin", self.base.parse().unwrap());
        tokio_tungstenite::connect_async(req).await.unwrap().0
    }

    async fn json(&self, path: &str) -> Value {
        let r = self.get(path).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK, "GET {path}");
        r.json().await.unwrap()
    }

    /// Start an operation (`202 {"op_id"}`) and follow it to its end:
    /// the stage events, then the end event.
    async fn run_op(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (Vec<Value>, Value) {
        let mut req = self.send(method, path);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), StatusCode::ACCEPTED, "{path}");
        let op_id = r.json::<Value>().await.unwrap()["op_id"]
            .as_str()
            .unwrap()
            .to_string();
        let mut sse = Sse::open(self, &format!("/api/ops/{op_id}")).await;
        let mut stages = Vec::new();
        loop {
            let (event, data) = sse.next().await.expect("the stream ends after `end`");
            match event.as_str() {
                "stage" => stages.push(data),
                "end" => {
                    assert!(sse.next().await.is_none(), "the stream closes after `end`");
                    return (stages, data);
                }
                other => panic!("unexpected event {other}"),
            }
        }
    }
}

/// Log in through the URL `banger web` prints.
async fn login(url: &str) -> Web {
    let http = client();
    let r = http.get(url).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert_eq!(r.headers()[header::LOCATION], "/");
    let set = r.headers()[header::SET_COOKIE]
        .to_str()
        .unwrap()
        .to_string();
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(set.contains(attr), "{set}");
    }
    let cookie = set.split(';').next().unwrap().to_string();
    assert!(cookie.starts_with("banger_session="), "{cookie}");
    let base = url.split("/login").next().unwrap().to_string();
    Web { base, cookie, http }
}

/// A Server-Sent Events stream, read event by event.
struct Sse {
    resp: Response,
    buf: String,
}

impl Sse {
    async fn open(web: &Web, path: &str) -> Sse {
        let resp = web
            .get(path)
            .header(header::ACCEPT, "text/event-stream")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{path}");
        assert!(
            resp.headers()[header::CONTENT_TYPE]
                .to_str()
                .unwrap()
                .starts_with("text/event-stream")
        );
        Sse {
            resp,
            buf: String::new(),
        }
    }

    /// The next `(event, data)`, skipping keep-alive comments; `None` at the end.
    async fn next(&mut self) -> Option<(String, Value)> {
        loop {
            if let Some(i) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..i + 2).collect();
                let mut event = String::new();
                let mut data = String::new();
                for line in block.lines() {
                    if let Some(e) = line.strip_prefix("event: ") {
                        event = e.to_string();
                    } else if let Some(d) = line.strip_prefix("data: ") {
                        data.push_str(d);
                    }
                }
                if event.is_empty() && data.is_empty() {
                    continue;
                }
                return Some((event, serde_json::from_str(&data).unwrap()));
            }
            let chunk = tokio::time::timeout(Duration::from_secs(60), self.resp.chunk())
                .await
                .expect("an event within 60 s")
                .unwrap()?;
            self.buf.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    }

    /// Read `event`s until one's data satisfies `done`.
    async fn until(&mut self, event: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        loop {
            let (e, data) = self
                .next()
                .await
                .unwrap_or_else(|| panic!("stream ended before {what}"));
            if e == event && done(&data) {
                return data;
            }
        }
    }
}

/// The routes the web UI is written against.
const CONTRACT: &[&str] = &[
    "GET /login",
    "GET /api/vms",
    "POST /api/vms",
    "GET /api/vms/{name}",
    "DELETE /api/vms/{name}",
    "PATCH /api/vms/{name}",
    "POST /api/vms/{name}/start",
    "POST /api/vms/{name}/stop",
    "POST /api/vms/{name}/restart",
    "GET /api/vms/{name}/stats",
    "GET /api/vms/{name}/ports",
    "GET /api/vms/{name}/logs",
    "GET /api/vms/{name}/terminal",
    "GET /api/vms/{name}/exec",
    "POST /api/vms/{name}/workspace",
    "GET /api/vms/{name}/forwards",
    "POST /api/vms/{name}/forwards",
    "DELETE /api/vms/{name}/forwards/{host_port}",
    "GET /api/images",
    "POST /api/images/build",
    "POST /api/images/pull",
    "POST /api/images/import",
    "DELETE /api/images/{name}",
    "POST /api/images/{name}/promote",
    "GET /api/ops/{op_id}",
    "GET /api/doctor",
    "GET /api/openapi.json",
    "GET /assets/{path}",
    "GET /",
    "GET /new",
    "GET /images",
    "GET /doctor",
    "GET /vms/{name}",
    "GET /ops/{op_id}",
];

/// `/api/vms/{name}/exec` of a command (the stand-in guest's agent runs on
/// this host: a harmless one).
async fn exec_answers(web: &Web, name: &str) {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let path = format!("/api/vms/{name}/exec");
    let mut ws = web.ws(&path).await;
    let start =
        json!({"argv": ["sh", "-c", "echo out; echo err >&2; read x; echo got $x; cat; exit 3"]});
    ws.send(Message::Text(start.to_string().into()))
        .await
        .unwrap();
    ws.send(Message::Binary(b"hi\nrest\n".to_vec().into()))
        .await
        .unwrap();
    ws.send(Message::Text(r#"{"eof": true}"#.into()))
        .await
        .unwrap();
    let (mut stdout, mut stderr, mut exit) = (Vec::new(), Vec::new(), None);
    tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(msg) = ws.next().await {
            match msg.unwrap() {
                Message::Binary(b) => match b.first() {
                    Some(1) => stdout.extend_from_slice(&b[1..]),
                    Some(2) => stderr.extend_from_slice(&b[1..]),
                    other => panic!("a frame of stream {other:?}"),
                },
                Message::Text(t) => exit = Some(serde_json::from_str::<Value>(&t).unwrap()),
                Message::Close(_) => break,
                _ => {}
            }
        }
    })
    .await
    .expect("the exec ends");
    assert_eq!(String::from_utf8_lossy(&stdout), "out\ngot hi\nrest\n");
    assert_eq!(String::from_utf8_lossy(&stderr), "err\n");
    assert_eq!(exit, Some(json!({"exit": {"code": 3}})));

    // A first frame that is not a command: an error naming what was wrong.
    let mut ws = web.ws(&path).await;
    ws.send(Message::Text(r#"{"cmd": "ls"}"#.into()))
        .await
        .unwrap();
    match ws.next().await {
        Some(Ok(Message::Text(t))) => {
            let e: Value = serde_json::from_str(&t).unwrap();
            assert_eq!(e["code"], "invalid_params", "{e}");
            assert!(e["message"].as_str().unwrap().contains("cmd"), "{e}");
        }
        other => panic!("expected an error frame, got {other:?}"),
    }
}

/// Type into `name`'s terminal over the WebSocket and read the answers:
/// `uname -a`, the size after a resize, then `exit` closes the socket.
async fn terminal_answers(web: &Web, name: &str) {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let mut ws = web.ws(&format!("/api/vms/{name}/terminal")).await;
    let mut seen = String::new();
    async fn read_until(
        ws: &mut (
                 impl futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>>
                 + Unpin
             ),
        seen: &mut String,
        want: &str,
    ) {
        let found = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(msg) = ws.next().await {
                match msg.unwrap() {
                    Message::Binary(b) => seen.push_str(&String::from_utf8_lossy(&b)),
                    Message::Text(t) => panic!("an error from the terminal: {t}"),
                    Message::Close(_) => return false,
                    _ => {}
                }
                if seen.contains(want) {
                    return true;
                }
            }
            false
        })
        .await
        .unwrap_or(false);
        assert!(found, "{want:?} never came; the terminal showed:\n{seen}");
    }
    ws.send(Message::Binary(b"uname -a\n".to_vec().into()))
        .await
        .unwrap();
    read_until(&mut ws, &mut seen, "Linux").await;
    ws.send(Message::Text(r#"{"cols": 111, "rows": 33}"#.into()))
        .await
        .unwrap();
    ws.send(Message::Binary(b"stty size; tty\n".to_vec().into()))
        .await
        .unwrap();
    read_until(&mut ws, &mut seen, "33 111").await;
    read_until(&mut ws, &mut seen, "/dev/pts/").await;
    ws.send(Message::Binary(b"exit\n".to_vec().into()))
        .await
        .unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return true,
                Some(Ok(Message::Text(t))) => panic!("an error from the terminal: {t}"),
                Some(Ok(_)) => {}
            }
        }
    })
    .await
    .unwrap_or(false);
    assert!(closed, "the socket stayed open after the shell exited");
}

fn vm_state(list: &Value, name: &str) -> Option<String> {
    list.as_array()?
        .iter()
        .find(|v| v["name"] == name)
        .map(|v| v["state"].as_str().unwrap().to_string())
}

#[test]
fn login_host_origin_and_cookie_guards_and_rpc_errors() {
    let home = TestHome::in_netns();
    home.ok(&["vm", "list"]);
    let status = home.json(&["daemon", "status"]);
    let web_url = status["web_url"]
        .as_str()
        .expect("web_url in daemon status")
        .to_string();
    let url = login_url(&home);
    assert!(url.starts_with(&format!("{web_url}/login?token=")), "{url}");
    let second_url = login_url(&home);
    let log_home = home.path().to_path_buf();
    let cli_ok = {
        let ns = home.netns.clone().unwrap();
        move || {
            // The daemon still answers the CLI.
            let out = std::process::Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &ns,
                    env!("CARGO_BIN_EXE_banger"),
                    "vm",
                    "list",
                    "--json",
                ])
                .env("BANGER_HOME", &log_home)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            serde_json::from_slice::<Value>(&out.stdout).unwrap()
        }
    };
    let refusals = in_netns(&home, move || async move {
        let http = client();
        let base = web_url.clone();
        // No cookie: 401 everywhere, JSON for the API, a page otherwise.
        let r = http.get(format!("{base}/api/vms")).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        let csp = r.headers()[header::CONTENT_SECURITY_POLICY]
            .to_str()
            .unwrap()
            .to_string();
        assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
        assert_eq!(r.headers()[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["code"], "permission_denied", "{body}");
        let unauth_op = body["op_id"].as_str().unwrap().to_string();
        assert!(unauth_op.starts_with("op-"), "{body}");
        let r = http.get(format!("{base}/")).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        assert!(r.text().await.unwrap().contains("banger web"));
        let r = http
            .get(format!("{base}/assets/index.html"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        // A made-up token, then the real one, then the real one again.
        let r = http
            .get(format!("{base}/login?token=00ff"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        assert!(r.headers().get(header::SET_COOKIE).is_none());
        let web = login(&url).await;
        let r = http.get(&url).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "a used token");
        // Logged in: the API and the pages.
        assert_eq!(web.json("/api/vms").await, json!([]));
        let r = web.get("/vms/anything").send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        assert!(
            r.headers()[header::CONTENT_TYPE]
                .to_str()
                .unwrap()
                .starts_with("text/html")
        );
        // The doctor report `banger doctor --json` prints, the web UI row included.
        let report = web.json("/api/doctor").await;
        let web_row = report["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["id"] == "web")
            .expect("a web check")
            .clone();
        assert_eq!(web_row["status"], "pass", "{web_row}");
        assert!(
            web_row["detail"].as_str().unwrap().contains(&base),
            "{web_row}"
        );
        assert!(report["failed"].is_u64() && report["warned"].is_u64());
        // The OpenAPI document: exactly the routes the UI is written
        // against, and each documented route is served.
        let doc = web.json("/api/openapi.json").await;
        assert!(doc["openapi"].as_str().unwrap().starts_with("3."), "{doc}");
        let mut documented = Vec::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for method in item.as_object().unwrap().keys() {
                documented.push(format!("{} {path}", method.to_uppercase()));
            }
        }
        documented.sort();
        let mut contract: Vec<String> = CONTRACT.iter().map(|r| r.to_string()).collect();
        contract.sort();
        assert_eq!(documented, contract);
        for route in &documented {
            let (method, path) = route.split_once(' ').unwrap();
            let path = path
                .replace("{name}", "nope")
                .replace("{op_id}", "op-000000")
                .replace("{host_port}", "1")
                .replace("{path}", "index.html");
            // Bodies that are not JSON: nothing is created.
            let r = web
                .send(method.parse().unwrap(), &path)
                .body("x")
                .send()
                .await
                .unwrap();
            let status = r.status();
            let body = r.text().await.unwrap();
            assert!(
                status != StatusCode::METHOD_NOT_ALLOWED && !body.contains("no such page"),
                "{route} is documented but not served: {status} {body}"
            );
        }
        // Another login of the same daemon run: the same session.
        let other = login(&second_url).await;
        assert_eq!(other.cookie, web.cookie);
        // A forged cookie.
        let r = http
            .get(format!("{base}/api/vms"))
            .header(header::COOKIE, "banger_session=00")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);

        // DNS rebinding: a foreign Host, even with the cookie.
        let r = web
            .get("/api/vms")
            .header(
                header::HOST,
                format!("evil.example:{}", base.rsplit(':').next().unwrap()),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::MISDIRECTED_REQUEST);
        let host_op = r.json::<Value>().await.unwrap()["op_id"]
            .as_str()
            .unwrap()
            .to_string();
        // `localhost:PORT` is this server too.
        let r = web
            .get("/api/vms")
            .header(
                header::HOST,
                format!("localhost:{}", base.rsplit(':').next().unwrap()),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);

        // State changes need this server's Origin: foreign or none is 403,
        // and nothing was created.
        let create = json!({"name": "evil", "image": "nope"});
        for origin in [Some("http://evil.example"), None] {
            let mut req = web
                .http
                .post(format!("{base}/api/vms"))
                .header(header::COOKIE, &web.cookie)
                .json(&create);
            if let Some(o) = origin {
                req = req.header(header::ORIGIN, o);
            }
            let r = req.send().await.unwrap();
            assert_eq!(r.status(), StatusCode::FORBIDDEN, "origin {origin:?}");
        }
        // A WebSocket upgrade from a foreign origin.
        let r = web
            .get("/api/vms/x/terminal")
            .header(header::ORIGIN, "http://evil.example")
            .header(header::CONNECTION, "Upgrade")
            .header(header::UPGRADE, "websocket")
            .header("Sec-WebSocket-Version", "13")
            .header("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        // GET never changes state: the operations' routes refuse it.
        for path in ["/api/vms/x/start", "/api/vms/x/stop", "/api/images/build"] {
            let r = web.get(path).send().await.unwrap();
            assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED, "{path}");
        }

        // Errors: the RPC's code and the op id of the request.
        let r = web.get("/api/vms/nope").send().await.unwrap();
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        let err: Value = r.json().await.unwrap();
        assert_eq!(err["code"], "not_found", "{err}");
        assert!(err["message"].as_str().unwrap().contains("nope"), "{err}");
        let show_op = err["op_id"].as_str().unwrap().to_string();
        let r = web
            .send(reqwest::Method::POST, "/api/vms")
            .body("{\"name\": 1}")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        assert_eq!(r.json::<Value>().await.unwrap()["code"], "invalid_params");
        // An operation that fails: its end carries the error and its op id.
        let (_, end) = web
            .run_op(reqwest::Method::POST, "/api/vms/nope/stop", None)
            .await;
        assert_eq!(end["ok"], false, "{end}");
        assert_eq!(end["error"]["code"], "not_found", "{end}");
        let stop_op = end["error"]["op_id"].as_str().unwrap().to_string();
        // `op.status` knows it: the op id is the runner's.
        let status = web.json(&format!("/api/ops/{stop_op}")).await;
        assert_eq!(status["op_id"], stop_op.as_str(), "{status}");
        assert_eq!(status["done"], true, "{status}");
        let r = web.get("/api/ops/op-000000").send().await.unwrap();
        assert_eq!(r.status(), StatusCode::NOT_FOUND);

        // Bounded event streams: the one past the bound is refused.
        let mut held = Vec::new();
        loop {
            let r = web
                .get("/api/vms")
                .header(header::ACCEPT, "text/event-stream")
                .send()
                .await
                .unwrap();
            if r.status() == StatusCode::SERVICE_UNAVAILABLE {
                assert_eq!(r.json::<Value>().await.unwrap()["code"], "unavailable");
                break;
            }
            assert_eq!(r.status(), StatusCode::OK);
            held.push(r);
            assert!(held.len() <= 64, "more than 64 event streams were let in");
        }
        assert_eq!(held.len(), 64);
        drop(held);
        // Closed streams give their places back.
        let mut back = false;
        for _ in 0..50 {
            let r = web
                .get("/api/vms")
                .header(header::ACCEPT, "text/event-stream")
                .send()
                .await
                .unwrap();
            if r.status() == StatusCode::OK {
                back = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(back, "closed streams kept their places");
        vec![unauth_op, host_op, show_op, stop_op]
    });
    assert_eq!(cli_ok(), json!([]), "nothing was created");
    let log = home.daemon_log();
    for op in &refusals {
        assert!(
            log.contains(op.as_str()),
            "op id {op} is not in the daemon log"
        );
    }
}

#[test]
fn a_taken_port_is_reported_and_the_cli_still_served() {
    let home = TestHome::in_netns();
    // Something else holds the port in the daemon's namespace.
    let (tx, rx) = std::sync::mpsc::channel();
    let (hold_tx, hold_rx) = std::sync::mpsc::channel::<()>();
    let ns = home.netns.clone().unwrap();
    let holder = std::thread::spawn(move || {
        let file = std::fs::File::open(format!("/run/netns/{ns}")).unwrap();
        rustix::thread::move_into_link_name_space(
            file.as_fd(),
            Some(rustix::thread::LinkNameSpaceType::Network),
        )
        .unwrap();
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        tx.send(l.local_addr().unwrap().port()).unwrap();
        let _ = hold_rx.recv();
    });
    let port = rx.recv().unwrap();
    std::fs::write(
        home.path().join("config.toml"),
        format!("[web]\nlisten = \"127.0.0.1:{port}\"\n"),
    )
    .unwrap();
    home.ok(&["vm", "list"]);
    let status = home.json(&["daemon", "status"]);
    assert!(status.get("web_url").is_none(), "{status}");
    let why = status["web_error"].as_str().expect("web_error").to_string();
    assert!(why.contains(&format!("127.0.0.1:{port}")), "{why}");
    assert!(
        why.contains(&format!("held by pid {}", std::process::id())),
        "the holder is named: {why}"
    );
    assert!(home.daemon_log().contains("web UI not served"));
    let check = home.doctor_check("web");
    assert_eq!(check["status"], "warn", "{check}");
    assert!(
        check["detail"].as_str().unwrap().contains("held by pid"),
        "{check}"
    );
    assert_eq!(home.json(&["vm", "list"]), json!([]));
    let out = home.run(&["web"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not served"));
    hold_tx.send(()).unwrap();
    holder.join().unwrap();
    // A non-loopback address is a config error naming the key.
    std::fs::write(
        home.path().join("config.toml"),
        "[web]\nlisten = \"0.0.0.0:7777\"\n",
    )
    .unwrap();
    home.ok(&["daemon", "stop"]);
    home.wait_socket_closed();
    let out = home.run(&["vm", "list"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("web.listen") && err.contains("loopback"),
        "{err}"
    );
}

#[test]
fn a_vm_created_stopped_started_and_deleted_through_the_api() {
    let home = fc_double_home(TestHome::in_netns());
    let url = login_url(&home);
    let name = "webvm";
    in_netns(&home, move || async move {
        let web = login(&url).await;
        let mut vms = Sse::open(&web, "/api/vms").await;
        let (e, first) = vms.next().await.unwrap();
        assert_eq!((e.as_str(), first), ("vms", json!([])));

        let (stages, end) = web
            .run_op(
                reqwest::Method::POST,
                "/api/vms",
                Some(
                    json!({"name": name, "image": "fcimg", "vmm": "firecracker", "wait": "agent"}),
                ),
            )
            .await;
        assert_eq!(end["ok"], true, "{end}");
        assert_eq!(end["result"]["name"], name);
        assert_eq!(end["result"]["state"], "running");
        let names: Vec<&str> = stages
            .iter()
            .map(|s| s["stage"].as_str().unwrap())
            .collect();
        for stage in ["allocate", "disks", "vmm start", "agent ready"] {
            assert!(names.contains(&stage), "stage {stage} in {names:?}");
        }
        vms.until("vms", "the VM running", |l| {
            vm_state(l, name).as_deref() == Some("running")
        })
        .await;
        let info = web.json(&format!("/api/vms/{name}")).await;
        assert_eq!(info["state"], "running");
        assert_eq!(
            vm_state(&web.json("/api/vms").await, name).as_deref(),
            Some("running")
        );
        // The console log, followed live: what the guest writes next comes
        // as a `log` event.
        let mut log = Sse::open(&web, &format!("/api/vms/{name}/logs")).await;
        let console = info["console_log"].as_str().unwrap().to_string();
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&console)
            .unwrap();
        std::io::Write::write_all(&mut f, b"a line <b>from the guest</b>\n").unwrap();
        log.until("log", "the appended line", |d| {
            d.as_str()
                .is_some_and(|t| t.contains("a line <b>from the guest</b>"))
        })
        .await;
        drop(log);
        let r = web
            .get(&format!("/api/vms/{name}/logs?bytes=100"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        assert!(r.text().await.unwrap().len() <= 100);
        assert_eq!(
            web.json(&format!("/api/vms/{name}/forwards")).await,
            json!([])
        );

        // A terminal: a login shell on a pty in the stand-in guest.
        terminal_answers(&web, name).await;
        // A command over the exec WebSocket: stdin in, stdout and stderr
        // apart, the exit code last.
        exec_answers(&web, name).await;

        // A stop shows on the live list.
        let (_, end) = web
            .run_op(
                reqwest::Method::POST,
                &format!("/api/vms/{name}/stop"),
                None,
            )
            .await;
        assert_eq!(end["ok"], true, "{end}");
        vms.until("vms", "the VM stopped", |l| {
            vm_state(l, name).as_deref() == Some("stopped")
        })
        .await;
        // vm.set of the stopped VM.
        let r = web
            .send(reqwest::Method::PATCH, &format!("/api/vms/{name}"))
            .json(&json!({"memory_mib": 512}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.json::<Value>().await.unwrap()["memory_mib"], 512);
        let r = web
            .send(reqwest::Method::PATCH, &format!("/api/vms/{name}"))
            .json(&json!({"name": "other", "memory_mib": 512}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "the path names the VM");
        let (_, end) = web
            .run_op(
                reqwest::Method::POST,
                &format!("/api/vms/{name}/start"),
                None,
            )
            .await;
        assert_eq!(end["ok"], true, "{end}");
        assert_eq!(end["result"][0]["state"], "running", "{end}");
        assert_eq!(end["result"][0]["memory_mib"], 512, "{end}");
        // An import runs as an operation: one of a missing path fails, saying so.
        let (_, end) = web
            .run_op(
                reqwest::Method::POST,
                "/api/images/import",
                Some(json!({"path": "/nonexistent/rootfs.tar", "name": "imp"})),
            )
            .await;
        assert_eq!(end["ok"], false, "{end}");
        assert!(
            end["error"]["message"]
                .as_str()
                .unwrap()
                .contains("/nonexistent/rootfs.tar"),
            "{end}"
        );
        let (_, end) = web
            .run_op(
                reqwest::Method::DELETE,
                &format!("/api/vms/{name}?force=true"),
                None,
            )
            .await;
        assert_eq!(end["ok"], true, "{end}");
        vms.until("vms", "the VM gone", |l| vm_state(l, name).is_none())
            .await;
        let r = web.get(&format!("/api/vms/{name}")).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
    });
    wait_until("the CLI sees no VM", Duration::from_secs(5), || {
        home.json(&["vm", "list"]) == json!([])
    });
}

#[test]
fn a_terminal_into_a_real_guest() {
    let home = TestHome::in_netns();
    common::shared_default_image(&home);
    home.ok(&["vm", "create", "--name", "term", "--no-ssh-wait"]);
    let url = login_url(&home);
    in_netns(&home, move || async move {
        let web = login(&url).await;
        terminal_answers(&web, "term").await;
    });
    home.ok(&["vm", "delete", "--force", "term"]);
}

/// An operation the CLI started is followed at `/api/ops/{op_id}` like one
/// the web API started: its stages (replayed), then `end`.
#[test]
fn an_operation_the_cli_started_is_followed_over_sse() {
    let home = fc_double_home(TestHome::in_netns());
    let url = login_url(&home);
    // `--json` prints the stage events, then the answer with its op id.
    let out = home.ok(&[
        "vm",
        "create",
        "--name",
        "clivm",
        "--image",
        "fcimg",
        "--vmm",
        "firecracker",
        "--no-ssh-wait",
        "--json",
    ]);
    let last: Value = serde_json::from_str(out.lines().last().expect("an answer")).unwrap();
    let op_id = last["op_id"].as_str().expect("op_id").to_string();
    in_netns(&home, move || async move {
        let web = login(&url).await;
        let mut sse = Sse::open(&web, &format!("/api/ops/{op_id}")).await;
        let mut stages = Vec::new();
        let end = loop {
            let (event, data) = sse.next().await.expect("the stream ends after `end`");
            match event.as_str() {
                "stage" => stages.push(data["stage"].as_str().unwrap().to_string()),
                "end" => break data,
                other => panic!("unexpected event {other}"),
            }
        };
        assert!(sse.next().await.is_none(), "the stream closes after `end`");
        assert_eq!(end["ok"], true, "{end}");
        for stage in ["allocate", "disks", "vmm start", "agent ready"] {
            assert!(stages.iter().any(|s| s == stage), "{stage} in {stages:?}");
        }
    });
    home.ok(&["vm", "delete", "--force", "clivm"]);
    home.assert_host_clean("fc-double", "an operation followed over SSE");
}
