use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

use base64::Engine as _;

use super::*;

#[test]
fn encodes_scopes() {
    assert_eq!(
        encode("repository:library/alpine:pull"),
        "repository%3Alibrary%2Falpine%3Apull"
    );
}

#[test]
fn plain_http_only_for_loopback_and_listed_registries() {
    let r = |s: &str| s.parse::<Reference>().unwrap();
    let opts = RegistryOptions {
        insecure: vec!["reg.lan:5000".into()],
        docker_config: None,
    };
    let base = |s: &str| Registry::new(&r(s), &opts).unwrap().base;
    assert_eq!(base("127.0.0.1:5000/a"), "http://127.0.0.1:5000");
    assert_eq!(base("localhost/a"), "http://localhost");
    assert_eq!(base("[::1]:5000/a"), "http://[::1]:5000");
    assert_eq!(base("reg.lan:5000/a"), "http://reg.lan:5000");
    assert_eq!(base("reg.lan:5001/a"), "https://reg.lan:5001");
    assert_eq!(base("alpine"), "https://registry-1.docker.io");
}

#[test]
fn cache_paths_are_content_addressed() {
    let c = BlobCache::new("/c".into());
    let d = format!("sha256:{}", "a".repeat(64));
    assert_eq!(c.path(&d), PathBuf::from(format!("/c/{}", "a".repeat(64))));
    assert_eq!(
        c.partial_path(&d),
        PathBuf::from(format!("/c/{}.partial", "a".repeat(64)))
    );
}

/// One request as the fake registry saw it.
#[derive(Debug, Clone)]
struct Req {
    path: String,
    headers: HashMap<String, String>,
}

struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

fn resp(status: u16, body: impl Into<Vec<u8>>) -> Resp {
    Resp {
        status,
        headers: Vec::new(),
        body: body.into(),
    }
}

/// A tiny HTTP/1.1 server on 127.0.0.1 answering with `handler`.
struct Fake {
    port: u16,
    seen: Arc<Mutex<Vec<Req>>>,
}

fn serve(handler: impl Fn(&Req, u16) -> Resp + Send + 'static) -> Fake {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            if reader.read_line(&mut line).is_err() {
                continue;
            }
            let path = line.split_whitespace().nth(1).unwrap_or("").to_owned();
            let mut headers = HashMap::new();
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                    break;
                }
                if let Some((k, v)) = h.trim_end().split_once(':') {
                    headers.insert(k.to_ascii_lowercase(), v.trim().to_owned());
                }
            }
            let req = Req { path, headers };
            log.lock().unwrap().push(req.clone());
            let r = handler(&req, port);
            let mut head = format!(
                "HTTP/1.1 {} X\r\nContent-Length: {}\r\nConnection: close\r\n",
                r.status,
                r.body.len()
            );
            for (k, v) in &r.headers {
                head.push_str(&format!("{k}: {v}\r\n"));
            }
            head.push_str("\r\n");
            let _ = stream.write_all(head.as_bytes());
            let _ = stream.write_all(&r.body);
        }
    });
    Fake { port, seen }
}

fn sha(data: &[u8]) -> String {
    digest_of(data)
}

/// A registry with token auth (user `me`, password `pw`) serving one image
/// whose layer is `layer` but claims `claimed` as its digest.
fn registry(layer: Vec<u8>, claimed: String) -> (Fake, Reference, Descriptor) {
    let config = br#"{"architecture":"amd64","os":"linux"}"#.to_vec();
    let config_digest = sha(&config);
    let layer_desc = Descriptor {
        media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
        digest: claimed,
        size: layer.len() as u64,
        platform: None,
        urls: Vec::new(),
    };
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": manifest::OCI_MANIFEST,
        "config": {"mediaType": manifest::OCI_CONFIG, "digest": config_digest, "size": config.len()},
        "layers": [layer_desc],
    })
    .to_string();
    let layer_path = format!("/v2/test/img/blobs/{}", layer_desc.digest);
    let config_path = format!("/v2/test/img/blobs/{config_digest}");
    let fake = serve(move |req, port| {
        if req.path.starts_with("/token") {
            let want = format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode("me:pw")
            );
            return if req.headers.get("authorization") == Some(&want)
                && req.path.contains("scope=repository%3Atest%2Fimg%3Apull")
            {
                resp(200, r#"{"token":"tok"}"#)
            } else {
                resp(
                    401,
                    r#"{"errors":[{"code":"UNAUTHORIZED","message":"bad credentials"}]}"#,
                )
            };
        }
        if req.headers.get("authorization").map(String::as_str) != Some("Bearer tok") {
            let mut r = resp(401, "");
            r.headers.push((
                "WWW-Authenticate".into(),
                format!(
                    r#"Bearer realm="http://127.0.0.1:{port}/token",service="fake",scope="repository:test/img:pull""#
                ),
            ));
            return r;
        }
        if req.path == "/v2/test/img/manifests/1" {
            let mut r = resp(200, manifest.clone());
            r.headers
                .push(("Content-Type".into(), manifest::OCI_MANIFEST.into()));
            return r;
        }
        if req.path == config_path {
            return resp(200, config.clone());
        }
        if req.path == layer_path {
            return match req.headers.get("range") {
                Some(range) => {
                    let from: usize = range
                        .trim_start_matches("bytes=")
                        .trim_end_matches('-')
                        .parse()
                        .unwrap();
                    resp(206, layer[from..].to_vec())
                }
                None => resp(200, layer.clone()),
            };
        }
        resp(
            404,
            r#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}"#,
        )
    });
    let reference: Reference = format!("127.0.0.1:{}/test/img:1", fake.port)
        .parse()
        .unwrap();
    (fake, reference, layer_desc)
}

fn docker_config(dir: &Path, port: u16, user_pw: &str) -> PathBuf {
    let path = dir.join("config.json");
    let auth = base64::engine::general_purpose::STANDARD.encode(user_pw);
    std::fs::write(
        &path,
        serde_json::json!({"auths": {format!("127.0.0.1:{port}"): {"auth": auth}}}).to_string(),
    )
    .unwrap();
    path
}

#[test]
fn token_flow_resolve_and_a_resumed_verified_download() {
    let layer: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let (fake, reference, desc) = registry(layer.clone(), sha(&layer));
    let dir = tempfile::tempdir().unwrap();
    let opts = RegistryOptions {
        insecure: Vec::new(),
        docker_config: Some(docker_config(dir.path(), fake.port, "me:pw")),
    };
    let mut reg = Registry::new(&reference, &opts).unwrap();
    let resolved = reg.resolve().unwrap();
    assert_eq!(resolved.manifest.layers, vec![desc.clone()]);
    assert_eq!(resolved.digest, resolved.manifest_digest);

    // Half the blob is there from an interrupted pull.
    let cache = BlobCache::new(dir.path().join("blobs"));
    std::fs::create_dir_all(cache.dir()).unwrap();
    std::fs::write(cache.partial_path(&desc.digest), &layer[..100_000]).unwrap();
    let mut reports = Vec::new();
    let fetched = reg
        .fetch_blob(&desc, &cache, &mut |got, total| reports.push((got, total)))
        .unwrap();
    assert_eq!(
        fetched,
        Fetch::Downloaded {
            path: cache.path(&desc.digest),
            resumed_from: Some(100_000)
        }
    );
    assert_eq!(reports.last(), Some(&(300_000, 300_000)));
    assert_eq!(std::fs::read(cache.path(&desc.digest)).unwrap(), layer);
    assert!(!cache.partial_path(&desc.digest).exists());
    let ranges: Vec<String> = fake
        .seen
        .lock()
        .unwrap()
        .iter()
        .filter_map(|r| r.headers.get("range").cloned())
        .collect();
    assert_eq!(ranges, ["bytes=100000-"]);
    // Now it is cached.
    assert_eq!(
        reg.fetch_blob(&desc, &cache, &mut |_, _| {}).unwrap(),
        Fetch::Cached(cache.path(&desc.digest))
    );
}

#[test]
fn a_blob_that_does_not_match_its_digest_is_not_kept() {
    let layer = b"not what the manifest promised".to_vec();
    let claimed = sha(b"something else");
    let (fake, reference, desc) = registry(layer, claimed);
    let dir = tempfile::tempdir().unwrap();
    let opts = RegistryOptions {
        insecure: Vec::new(),
        docker_config: Some(docker_config(dir.path(), fake.port, "me:pw")),
    };
    let mut reg = Registry::new(&reference, &opts).unwrap();
    let cache = BlobCache::new(dir.path().join("blobs"));
    let e = reg.fetch_blob(&desc, &cache, &mut |_, _| {}).unwrap_err();
    assert!(matches!(e, RegistryError::DigestMismatch { .. }), "{e}");
    assert!(e.to_string().contains("does not match its digest"), "{e}");
    assert_eq!(std::fs::read_dir(cache.dir()).unwrap().count(), 0);
}

#[test]
fn bad_credentials_and_unknown_tags_say_so() {
    let (fake, reference, _) = registry(b"x".to_vec(), sha(b"x"));
    let dir = tempfile::tempdir().unwrap();
    let opts = RegistryOptions {
        insecure: Vec::new(),
        docker_config: Some(docker_config(dir.path(), fake.port, "me:wrong")),
    };
    let e = Registry::new(&reference, &opts)
        .unwrap()
        .resolve()
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&format!(
            "registry 127.0.0.1:{} refused access to test/img",
            fake.port
        )),
        "{e}"
    );
    assert!(
        e.contains("with the credentials from ~/.docker/config.json"),
        "{e}"
    );
    assert!(e.contains("bad credentials"), "{e}");

    let opts = RegistryOptions {
        insecure: Vec::new(),
        docker_config: Some(docker_config(dir.path(), fake.port, "me:pw")),
    };
    let unknown: Reference = format!("127.0.0.1:{}/test/img:2", fake.port)
        .parse()
        .unwrap();
    let e = Registry::new(&unknown, &opts)
        .unwrap()
        .resolve()
        .unwrap_err();
    assert!(matches!(e, RegistryError::NotFound { .. }), "{e}");
    assert!(e.to_string().contains("test/img:2"), "{e}");
}

#[test]
fn an_unreachable_registry_is_named() {
    // A port nothing listens on.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let r: Reference = format!("127.0.0.1:{port}/a:1").parse().unwrap();
    let e = Registry::new(&r, &RegistryOptions::default())
        .unwrap()
        .resolve()
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&format!("cannot reach registry 127.0.0.1:{port}")),
        "{e}"
    );
}
