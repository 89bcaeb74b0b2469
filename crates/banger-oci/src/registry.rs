//! A small blocking client for the OCI distribution API: manifests, blobs,
//! and the auth flows registries use (anonymous, basic, bearer tokens from
//! a `WWW-Authenticate` challenge).
//!
//! Like Docker, `localhost` and loopback registries are spoken to over plain
//! HTTP; any other needs TLS unless it is listed as insecure (then plain HTTP
//! too).

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::auth::{self, Challenge, Credentials};
use crate::manifest::{self, Descriptor, Fetched, ImageConfig, ImageManifest, ManifestError};
use crate::reference::Reference;

/// Largest manifest or index accepted.
const MANIFEST_LIMIT: u64 = 4 << 20;
/// Largest image config accepted.
const CONFIG_LIMIT: u64 = 16 << 20;

/// Why talking to a registry failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("cannot reach registry {registry} ({url}): {message}{hint}")]
    Unreachable {
        registry: String,
        url: String,
        message: String,
        hint: &'static str,
    },
    #[error(
        "registry {registry} refused access to {repository} {how}: {detail}; \
         log in with `docker login {registry}` (banger reads ~/.docker/config.json) or check the name"
    )]
    Auth {
        registry: String,
        repository: String,
        how: &'static str,
        detail: String,
    },
    #[error("{what} was not found on registry {registry}: check the repository name and tag")]
    NotFound { registry: String, what: String },
    #[error("registry {registry} answered {status} for {url}: {body}")]
    Status {
        registry: String,
        url: String,
        status: u16,
        body: String,
    },
    #[error("{reference}: {source}")]
    Manifest {
        reference: String,
        #[source]
        source: ManifestError,
    },
    #[error(
        "{what} from registry {registry} does not match its digest: expected {expected}, got {actual}; \
         nothing was kept, pull again (or check the registry)"
    )]
    DigestMismatch {
        registry: String,
        what: String,
        expected: String,
        actual: String,
    },
    #[error(
        "registry {registry} sent {got} bytes for {digest}, but the manifest says {want}; nothing was kept"
    )]
    SizeMismatch {
        registry: String,
        digest: String,
        got: u64,
        want: u64,
    },
    #[error("the image config of {reference} is not valid JSON: {message}")]
    Config { reference: String, message: String },
    #[error("{reference} is a {os}/{arch} image; banger runs linux/amd64 guests")]
    WrongPlatform {
        reference: String,
        os: String,
        arch: String,
    },
    #[error(transparent)]
    Credentials(#[from] auth::AuthConfigError),
    #[error("blob cache {path}")]
    Cache {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// How to reach registries.
#[derive(Debug, Clone, Default)]
pub struct RegistryOptions {
    /// `host:port` entries spoken to over plain HTTP (`[image] insecure_registries`).
    pub insecure: Vec<String>,
    /// Docker's config file with `auths`; `None`: no credentials.
    pub docker_config: Option<PathBuf>,
}

/// The linux/amd64 image a reference points at.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub reference: Reference,
    /// Digest of what the reference names (an index or a manifest).
    pub digest: String,
    /// Digest of the linux/amd64 image manifest.
    pub manifest_digest: String,
    pub manifest: ImageManifest,
    /// The image config's labels.
    pub labels: std::collections::BTreeMap<String, String>,
}

/// A connection to one repository on one registry.
#[derive(Debug)]
pub struct Registry {
    agent: ureq::Agent,
    base: String,
    reference: Reference,
    credentials: Option<Credentials>,
    authorization: Option<String>,
}

impl Registry {
    pub fn new(reference: &Reference, opts: &RegistryOptions) -> Result<Registry, RegistryError> {
        let insecure = opts.insecure.iter().any(|r| r == &reference.registry);
        let scheme = if reference.is_loopback() || insecure {
            "http"
        } else {
            "https"
        };
        let credentials = match &opts.docker_config {
            Some(path) => auth::credentials_for(path, &reference.registry)?,
            None => None,
        };
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(30)))
            .timeout_recv_response(Some(Duration::from_secs(60)))
            .timeout_per_read(Some(Duration::from_secs(60)))
            .user_agent(concat!("banger/", env!("CARGO_PKG_VERSION")))
            .build()
            .new_agent();
        Ok(Registry {
            agent,
            base: format!("{scheme}://{}", reference.api_host()),
            reference: reference.clone(),
            credentials,
            authorization: None,
        })
    }

    fn registry(&self) -> String {
        self.reference.registry.clone()
    }

    fn unreachable(&self, url: &str, e: &ureq::Error) -> RegistryError {
        let hint = if self.base.starts_with("https://") {
            " (a registry that serves plain HTTP must be listed in [image] insecure_registries)"
        } else {
            ""
        };
        RegistryError::Unreachable {
            registry: self.registry(),
            url: url.to_owned(),
            message: e.to_string(),
            hint,
        }
    }

    fn auth_error(&self, detail: String) -> RegistryError {
        RegistryError::Auth {
            registry: self.registry(),
            repository: self.reference.repository.clone(),
            how: if self.credentials.is_some() {
                "with the credentials from ~/.docker/config.json"
            } else {
                "anonymously"
            },
            detail,
        }
    }

    /// GET with auth: on a 401 the challenge is answered once.
    fn get(
        &mut self,
        url: &str,
        accept: Option<&str>,
        range_from: u64,
    ) -> Result<ureq::http::Response<ureq::Body>, RegistryError> {
        for attempt in 0..2 {
            let mut req = self.agent.get(url);
            if let Some(a) = accept {
                req = req.header("Accept", a);
            }
            if let Some(h) = &self.authorization {
                req = req.header("Authorization", h);
            }
            if range_from > 0 {
                req = req.header("Range", format!("bytes={range_from}-"));
            }
            let mut resp = req.call().map_err(|e| self.unreachable(url, &e))?;
            let status = resp.status().as_u16();
            if status == 401 && attempt == 0 {
                let challenge = resp
                    .headers()
                    .get("www-authenticate")
                    .and_then(|v| v.to_str().ok())
                    .and_then(auth::parse_challenge);
                match challenge {
                    Some(Challenge::Bearer {
                        realm,
                        service,
                        scope,
                    }) => {
                        let token = self.token(&realm, service.as_deref(), scope.as_deref())?;
                        self.authorization = Some(format!("Bearer {token}"));
                        continue;
                    }
                    Some(Challenge::Basic) if self.credentials.is_some() => {
                        self.authorization =
                            self.credentials.as_ref().map(Credentials::basic_header);
                        continue;
                    }
                    _ => {}
                }
            }
            if status == 401 || status == 403 {
                return Err(self.auth_error(format!("HTTP {status}, {}", error_text(&mut resp))));
            }
            return Ok(resp);
        }
        unreachable!("the loop returns on its second pass")
    }

    /// The token flow: GET realm?service=…&scope=…, with basic credentials
    /// when there are some.
    fn token(
        &mut self,
        realm: &str,
        service: Option<&str>,
        scope: Option<&str>,
    ) -> Result<String, RegistryError> {
        let own_scope = format!("repository:{}:pull", self.reference.repository);
        let mut url = format!("{realm}?scope={}", encode(scope.unwrap_or(&own_scope)));
        if let Some(s) = service {
            url.push_str(&format!("&service={}", encode(s)));
        }
        let mut req = self.agent.get(&url);
        if let Some(c) = &self.credentials {
            req = req.header("Authorization", c.basic_header());
        }
        let mut resp = req.call().map_err(|e| self.unreachable(&url, &e))?;
        let status = resp.status().as_u16();
        if status != 200 {
            return Err(self.auth_error(format!(
                "its token service {realm} answered HTTP {status}, {}",
                error_text(&mut resp)
            )));
        }
        #[derive(serde::Deserialize)]
        struct Token {
            token: Option<String>,
            access_token: Option<String>,
        }
        let body = resp
            .body_mut()
            .with_config()
            .limit(1 << 20)
            .read_to_vec()
            .map_err(|e| self.unreachable(&url, &e))?;
        let t: Token = serde_json::from_slice(&body)
            .map_err(|e| self.auth_error(format!("its token service sent no token: {e}")))?;
        t.token
            .or(t.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| self.auth_error("its token service sent an empty token".into()))
    }

    fn check_status(
        &self,
        resp: &mut ureq::http::Response<ureq::Body>,
        url: &str,
        what: &str,
    ) -> Result<(), RegistryError> {
        match resp.status().as_u16() {
            200..=299 => Ok(()),
            404 => Err(RegistryError::NotFound {
                registry: self.registry(),
                what: what.to_owned(),
            }),
            status => Err(RegistryError::Status {
                registry: self.registry(),
                url: url.to_owned(),
                status,
                body: error_text(resp),
            }),
        }
    }

    /// A manifest's bytes, checked against `expected` when given.
    fn manifest_bytes(
        &mut self,
        reference: &str,
        expected: Option<&str>,
    ) -> Result<(Vec<u8>, Option<String>, String), RegistryError> {
        let url = format!(
            "{}/v2/{}/manifests/{reference}",
            self.base, self.reference.repository
        );
        let accept = manifest::ACCEPT.join(", ");
        let mut resp = self.get(&url, Some(&accept), 0)?;
        let what = format!(
            "{}/{}:{reference}",
            self.reference.registry, self.reference.repository
        )
        .replace(":sha256:", "@sha256:");
        self.check_status(&mut resp, &url, &what)?;
        let content_type = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = resp
            .body_mut()
            .with_config()
            .limit(MANIFEST_LIMIT)
            .read_to_vec()
            .map_err(|e| self.unreachable(&url, &e))?;
        let digest = digest_of(&body);
        if let Some(want) = expected
            && want != digest
        {
            return Err(RegistryError::DigestMismatch {
                registry: self.registry(),
                what: format!("manifest {want}"),
                expected: want.to_owned(),
                actual: digest,
            });
        }
        Ok((body, content_type, digest))
    }

    /// Resolves the reference to its linux/amd64 image manifest and checks
    /// the image config's platform.
    pub fn resolve(&mut self) -> Result<Resolved, RegistryError> {
        let reference = self.reference.clone();
        let shown = reference.to_string();
        let manifest_err = |source| RegistryError::Manifest {
            reference: shown.clone(),
            source,
        };
        let (body, ct, digest) =
            self.manifest_bytes(reference.manifest_ref(), reference.digest.as_deref())?;
        let (manifest, manifest_digest) = match manifest::parse(&body, ct.as_deref())
            .map_err(manifest_err)?
        {
            Fetched::Manifest(m) => (m, digest.clone()),
            Fetched::Index(list) => {
                let chosen = manifest::select_platform(&list)
                    .map_err(manifest_err)?
                    .clone();
                let (body, ct, d) = self.manifest_bytes(&chosen.digest, Some(&chosen.digest))?;
                match manifest::parse(&body, ct.as_deref()).map_err(manifest_err)? {
                    Fetched::Manifest(m) => (m, d),
                    Fetched::Index(_) => {
                        return Err(manifest_err(ManifestError::UnsupportedType(
                            "an index inside an index".into(),
                        )));
                    }
                }
            }
        };
        let config = self.small_blob(&manifest.config, CONFIG_LIMIT)?;
        let cfg: ImageConfig =
            serde_json::from_slice(&config).map_err(|e| RegistryError::Config {
                reference: shown.clone(),
                message: e.to_string(),
            })?;
        if (!cfg.os.is_empty() && cfg.os != manifest::WANT_OS)
            || (!cfg.architecture.is_empty() && cfg.architecture != manifest::WANT_ARCH)
        {
            return Err(RegistryError::WrongPlatform {
                reference: shown,
                os: cfg.os,
                arch: cfg.architecture,
            });
        }
        Ok(Resolved {
            reference,
            digest,
            manifest_digest,
            manifest,
            labels: cfg.config.and_then(|c| c.labels).unwrap_or_default(),
        })
    }

    fn blob_url(&self, digest: &str) -> String {
        format!(
            "{}/v2/{}/blobs/{digest}",
            self.base, self.reference.repository
        )
    }

    /// A small blob (the config), in memory, verified.
    fn small_blob(&mut self, d: &Descriptor, limit: u64) -> Result<Vec<u8>, RegistryError> {
        let url = self.blob_url(&d.digest);
        let mut resp = self.get(&url, None, 0)?;
        self.check_status(&mut resp, &url, &format!("blob {}", d.digest))?;
        let body = resp
            .body_mut()
            .with_config()
            .limit(limit)
            .read_to_vec()
            .map_err(|e| self.unreachable(&url, &e))?;
        let actual = digest_of(&body);
        if actual != d.digest {
            return Err(RegistryError::DigestMismatch {
                registry: self.registry(),
                what: format!("config {}", d.digest),
                expected: d.digest.clone(),
                actual,
            });
        }
        Ok(body)
    }

    /// Downloads a blob into `cache` (unless it is there already), resuming
    /// a partial download, verifying size and digest. `progress` gets
    /// (bytes so far, total) about once a second.
    pub fn fetch_blob(
        &mut self,
        d: &Descriptor,
        cache: &BlobCache,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Fetch, RegistryError> {
        let cache_err = |path: &Path| {
            let path = path.to_owned();
            move |source| RegistryError::Cache { path, source }
        };
        let done = cache.path(&d.digest);
        if cache.has(d) {
            return Ok(Fetch::Cached(done));
        }
        std::fs::create_dir_all(cache.dir()).map_err(cache_err(cache.dir()))?;
        let partial = cache.partial_path(&d.digest);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&partial)
            .map_err(cache_err(&partial))?;
        // One download per blob; a second pull waits for it.
        rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive)
            .map_err(|e| cache_err(&partial)(e.into()))?;
        if cache.has(d) {
            let _ = std::fs::remove_file(&partial);
            return Ok(Fetch::Cached(done));
        }
        let mut have = file.metadata().map_err(cache_err(&partial))?.len();
        if have >= d.size {
            have = 0;
        }
        let mut hasher = crate::digest::Sha256::default();
        if have > 0 {
            let mut existing = (&file).take(have);
            io::copy(&mut existing, &mut HashWriter(&mut hasher)).map_err(cache_err(&partial))?;
        }
        let url = self.blob_url(&d.digest);
        let mut resp = self.get(&url, None, have)?;
        self.check_status(&mut resp, &url, &format!("blob {}", d.digest))?;
        let resumed = have > 0 && resp.status().as_u16() == 206;
        if !resumed {
            have = 0;
            hasher = crate::digest::Sha256::default();
        }
        file.set_len(have).map_err(cache_err(&partial))?;
        file.seek(io::SeekFrom::Start(have))
            .map_err(cache_err(&partial))?;
        let mut body = resp.body_mut().as_reader();
        let mut buf = vec![0u8; 256 << 10];
        let mut got = have;
        let mut last = Instant::now();
        loop {
            let n = match body.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Kept: the next pull resumes from here.
                    let _ = file.sync_data();
                    return Err(RegistryError::Unreachable {
                        registry: self.registry(),
                        url,
                        message: format!(
                            "the download of {} broke off after {got} of {} bytes ({e}); pull again to resume",
                            d.digest, d.size
                        ),
                        hint: "",
                    });
                }
            };
            got += n as u64;
            if got > d.size {
                drop(file);
                let _ = std::fs::remove_file(&partial);
                return Err(RegistryError::SizeMismatch {
                    registry: self.registry(),
                    digest: d.digest.clone(),
                    got,
                    want: d.size,
                });
            }
            hasher.update(&buf[..n]);
            file.write_all(&buf[..n]).map_err(cache_err(&partial))?;
            if last.elapsed() >= Duration::from_secs(1) {
                progress(got, d.size);
                last = Instant::now();
            }
        }
        progress(got, d.size);
        let actual = hasher.digest();
        if got != d.size || actual != d.digest {
            drop(file);
            let _ = std::fs::remove_file(&partial);
            if got != d.size {
                return Err(RegistryError::SizeMismatch {
                    registry: self.registry(),
                    digest: d.digest.clone(),
                    got,
                    want: d.size,
                });
            }
            return Err(RegistryError::DigestMismatch {
                registry: self.registry(),
                what: format!("layer {}", d.digest),
                expected: d.digest.clone(),
                actual,
            });
        }
        file.sync_all().map_err(cache_err(&partial))?;
        std::fs::rename(&partial, &done).map_err(cache_err(&done))?;
        Ok(Fetch::Downloaded {
            path: done,
            resumed_from: if resumed { Some(have) } else { None },
        })
    }
}

/// Where a blob came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fetch {
    Cached(PathBuf),
    Downloaded {
        path: PathBuf,
        resumed_from: Option<u64>,
    },
}

impl Fetch {
    pub fn path(&self) -> &Path {
        match self {
            Fetch::Cached(p) | Fetch::Downloaded { path: p, .. } => p,
        }
    }
}

/// Content-addressed blobs: `<dir>/<hex>` for `sha256:<hex>`, each
/// verified before it got its name; `<hex>.partial` while downloading.
#[derive(Debug, Clone)]
pub struct BlobCache {
    dir: PathBuf,
}

impl BlobCache {
    pub fn new(dir: PathBuf) -> Self {
        BlobCache { dir }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Digests are checked by the manifest parser (64 lowercase hex).
    pub fn path(&self, digest: &str) -> PathBuf {
        self.dir
            .join(digest.strip_prefix("sha256:").unwrap_or(digest))
    }

    fn partial_path(&self, digest: &str) -> PathBuf {
        let mut p = self.path(digest).into_os_string();
        p.push(".partial");
        p.into()
    }

    /// Whether a complete blob of the descriptor's size is cached.
    pub fn has(&self, d: &Descriptor) -> bool {
        std::fs::metadata(self.path(&d.digest)).is_ok_and(|m| m.len() == d.size)
    }

    /// Opens a cached blob.
    pub fn open(&self, digest: &str) -> io::Result<File> {
        File::open(self.path(digest))
    }

    /// Drops a blob (damaged, or refused).
    pub fn remove(&self, digest: &str) {
        let _ = std::fs::remove_file(self.path(digest));
    }
}

struct HashWriter<'a>(&'a mut crate::digest::Sha256);

impl Write for HashWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn digest_of(bytes: &[u8]) -> String {
    crate::digest::of(bytes)
}

/// The registry's error text: the `errors[].message` of its JSON body, or
/// the first line of whatever it sent.
fn error_text(resp: &mut ureq::http::Response<ureq::Body>) -> String {
    let body = resp
        .body_mut()
        .with_config()
        .limit(64 << 10)
        .read_to_string()
        .unwrap_or_default();
    #[derive(serde::Deserialize)]
    struct Errors {
        errors: Vec<Entry>,
    }
    #[derive(serde::Deserialize)]
    struct Entry {
        #[serde(default)]
        code: String,
        #[serde(default)]
        message: String,
    }
    match serde_json::from_str::<Errors>(&body) {
        Ok(e) if !e.errors.is_empty() => e
            .errors
            .iter()
            .map(|x| format!("{} {}", x.code, x.message).trim().to_owned())
            .collect::<Vec<_>>()
            .join("; "),
        _ => {
            let line = body.lines().next().unwrap_or("").trim();
            if line.is_empty() {
                "no details".to_owned()
            } else {
                line.chars().take(200).collect()
            }
        }
    }
}

/// Percent-encodes a query value.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests;
