//! Who may use the web API: the per-install secret, one-time login tokens,
//! the session cookie, and the `Host` / `Origin` values the server accepts.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};

/// The secret's file in the state dir (0600, 32 random bytes as hex).
pub const SECRET_FILE: &str = "web.secret";
/// The session cookie's name.
pub const COOKIE: &str = "banger_session";
/// How long a login URL stays valid (it is also single use).
const TOKEN_TTL: Duration = Duration::from_secs(300);
/// Login tokens waiting to be used; the oldest goes first beyond this.
const MAX_TOKENS: usize = 64;

/// The web API's credentials and address. The daemon's `web.login` method
/// mints tokens here; the server redeems them and checks cookies.
///
/// A session cookie is the HMAC-SHA256, under the install's secret, of a
/// random id drawn at daemon start: every login of one daemon run gets the
/// same cookie, valid until the daemon restarts or the secret changes.
pub struct WebAccess {
    key: hmac::Key,
    session_id: [u8; 16],
    bound: OnceLock<SocketAddr>,
    failed: OnceLock<String>,
    tokens: Mutex<HashMap<String, Instant>>,
}

impl std::fmt::Debug for WebAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebAccess")
            .field("bound", &self.bound.get())
            .field("failed", &self.failed.get())
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error("cannot read or create the web secret {path}: {source}")]
    Secret {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the web secret {0} is not 64 hex digits (delete it: the daemon makes a new one)")]
    BadSecret(PathBuf),
    #[error("no random bytes from the system")]
    Random,
}

fn random<const N: usize>() -> Result<[u8; N], AccessError> {
    let mut b = [0u8; N];
    SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| AccessError::Random)?;
    Ok(b)
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || !s.bytes().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

/// Read `<state_dir>/web.secret`, making it (0600) if missing.
fn load_secret(state_dir: &Path) -> Result<Vec<u8>, AccessError> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let path = state_dir.join(SECRET_FILE);
    let io = |source| AccessError::Secret {
        path: path.clone(),
        source,
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
            unhex(text.trim())
                .filter(|b| b.len() == 32)
                .ok_or_else(|| AccessError::BadSecret(path.clone()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let secret = random::<32>()?;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .map_err(io)?;
            writeln!(f, "{}", hex(&secret)).map_err(io)?;
            Ok(secret.to_vec())
        }
        Err(e) => Err(io(e)),
    }
}

impl WebAccess {
    /// The install's access: its secret (made at first use) and a fresh
    /// session id for this daemon run.
    pub fn open(state_dir: &Path) -> Result<Self, AccessError> {
        let secret = load_secret(state_dir)?;
        Ok(WebAccess {
            key: hmac::Key::new(hmac::HMAC_SHA256, &secret),
            session_id: random::<16>()?,
            bound: OnceLock::new(),
            failed: OnceLock::new(),
            tokens: Mutex::default(),
        })
    }

    /// The server listens on `addr`.
    pub fn set_bound(&self, addr: SocketAddr) {
        let _ = self.bound.set(addr);
    }

    /// The server could not listen: why (shown by `daemon status`, `doctor`).
    pub fn set_failed(&self, why: String) {
        let _ = self.failed.set(why);
    }

    pub fn bound(&self) -> Option<SocketAddr> {
        self.bound.get().copied()
    }

    pub fn failed(&self) -> Option<&str> {
        self.failed.get().map(String::as_str)
    }

    /// `http://IP:PORT` while the server listens.
    pub fn url(&self) -> Option<String> {
        self.bound().map(|a| format!("http://{a}"))
    }

    /// A one-time login URL, or why there is none (the server is not listening).
    pub fn login_url(&self) -> Result<String, String> {
        let Some(base) = self.url() else {
            return Err(match self.failed() {
                Some(why) => format!("the web UI is not served: {why}"),
                None => "the web UI is not served ([web] enabled = false in config.toml)".into(),
            });
        };
        let token = hex(&random::<32>().map_err(|e| e.to_string())?);
        let mut tokens = self.tokens.lock().expect("tokens lock");
        tokens.retain(|_, at| at.elapsed() < TOKEN_TTL);
        while tokens.len() >= MAX_TOKENS {
            let oldest = tokens
                .iter()
                .min_by_key(|(_, at)| **at)
                .map(|(t, _)| t.clone());
            if let Some(t) = oldest {
                tokens.remove(&t);
            }
        }
        tokens.insert(token.clone(), Instant::now());
        Ok(format!("{base}/login?token={token}"))
    }

    /// Use up `token`: true once for each unexpired token minted here.
    pub fn redeem(&self, token: &str) -> bool {
        let minted = self.tokens.lock().expect("tokens lock").remove(token);
        minted.is_some_and(|at| at.elapsed() < TOKEN_TTL)
    }

    /// The session cookie's value.
    pub fn session_cookie(&self) -> String {
        hex(hmac::sign(&self.key, &self.session_id).as_ref())
    }

    /// Does the request's `Cookie` header carry a valid session?
    pub fn cookie_ok(&self, cookie_header: Option<&str>) -> bool {
        cookie_value(cookie_header, COOKIE)
            .and_then(unhex)
            .is_some_and(|tag| hmac::verify(&self.key, &self.session_id, &tag).is_ok())
    }

    /// The `Host` values the server answers to: the bound `IP:PORT` and
    /// `localhost:PORT` (anything else may be a DNS rebinding).
    pub fn host_ok(&self, host: Option<&str>) -> bool {
        let (Some(bound), Some(host)) = (self.bound(), host) else {
            return false;
        };
        host_allowed(bound, host)
    }

    /// `Origin` of a page this server served.
    pub fn origin_ok(&self, origin: Option<&str>) -> bool {
        let (Some(bound), Some(origin)) = (self.bound(), origin) else {
            return false;
        };
        origin
            .strip_prefix("http://")
            .is_some_and(|host| host_allowed(bound, host))
    }
}

fn host_allowed(bound: SocketAddr, host: &str) -> bool {
    host == bound.to_string() || host.eq_ignore_ascii_case(&format!("localhost:{}", bound.port()))
}

/// The value of cookie `name` in a `Cookie` header.
fn cookie_value<'a>(header: Option<&'a str>, name: &str) -> Option<&'a str> {
    header?.split(';').find_map(|pair| {
        let (k, v) = pair.trim().split_once('=')?;
        (k == name).then_some(v.trim())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access() -> (tempfile::TempDir, WebAccess) {
        let dir = tempfile::tempdir().unwrap();
        let a = WebAccess::open(dir.path()).unwrap();
        a.set_bound("127.0.0.1:7777".parse().unwrap());
        (dir, a)
    }

    #[test]
    fn host_is_the_bound_address_or_localhost_with_its_port() {
        let (_d, a) = access();
        for ok in ["127.0.0.1:7777", "localhost:7777", "LOCALHOST:7777"] {
            assert!(a.host_ok(Some(ok)), "{ok}");
        }
        for bad in [
            "127.0.0.1",
            "localhost",
            "localhost:7778",
            "evil.example:7777",
            "127.0.0.1:7777.evil.example",
            "[::1]:7777",
            "",
        ] {
            assert!(!a.host_ok(Some(bad)), "{bad}");
        }
        assert!(!a.host_ok(None));
        let v6 = WebAccess::open(_d.path()).unwrap();
        v6.set_bound("[::1]:80".parse().unwrap());
        assert!(v6.host_ok(Some("[::1]:80")) && v6.host_ok(Some("localhost:80")));
    }

    #[test]
    fn origin_is_http_of_an_allowed_host() {
        let (_d, a) = access();
        assert!(a.origin_ok(Some("http://127.0.0.1:7777")));
        assert!(a.origin_ok(Some("http://localhost:7777")));
        for bad in [
            "https://127.0.0.1:7777",
            "http://evil.example",
            "http://127.0.0.1:7777/",
            "null",
            "http://localhost:7777.evil.example",
        ] {
            assert!(!a.origin_ok(Some(bad)), "{bad}");
        }
        assert!(!a.origin_ok(None));
    }

    #[test]
    fn cookie_is_checked_against_the_secret_and_this_run() {
        let (dir, a) = access();
        let value = a.session_cookie();
        assert_eq!(value.len(), 64);
        assert!(a.cookie_ok(Some(&format!("banger_session={value}"))));
        assert!(a.cookie_ok(Some(&format!("x=1; banger_session={value}; y=2"))));
        assert!(!a.cookie_ok(Some(&format!("banger_sessionx={value}"))));
        assert!(!a.cookie_ok(Some("banger_session=00")));
        assert!(!a.cookie_ok(Some("banger_session=zz")));
        assert!(!a.cookie_ok(None));
        // The same secret in another daemon run: a new session id.
        let next = WebAccess::open(dir.path()).unwrap();
        assert!(!next.cookie_ok(Some(&format!("banger_session={value}"))));
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(dir.path().join(SECRET_FILE))
                .unwrap()
                .permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn login_tokens_are_single_use() {
        let (_d, a) = access();
        let url = a.login_url().unwrap();
        let token = url
            .strip_prefix("http://127.0.0.1:7777/login?token=")
            .unwrap();
        assert!(!a.redeem("nope"));
        assert!(a.redeem(token));
        assert!(!a.redeem(token), "used twice");
        let unbound = WebAccess::open(_d.path()).unwrap();
        unbound.set_failed("port 7777 is taken".into());
        assert!(unbound.login_url().unwrap_err().contains("7777 is taken"));
    }
}
