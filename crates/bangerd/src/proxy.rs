//! The secrets proxy: where a secret-bearing guest's HTTPS (TCP 443) goes.
//!
//! The VM's nftables rules (`banger-net` `nat.rs`: `secrets-policy`, then
//! `secrets-dnat`) first run the connection through the VM's own policy
//! chain (so the proxy reaches nothing the policy would not let the guest
//! reach), then DNAT it to this listener on the bridge's address
//! ([`SECRETS_PROXY_PORT`]). The guest is known by the connection's source
//! address (the tap's guard stops spoofing); where it was going, by
//! `SO_ORIGINAL_DST`.
//!
//! The proxy reads the TLS ClientHello (rustls' `Acceptor`) without
//! answering it. An SNI name matching one of the VM's secret hosts is
//! intercepted: TLS ends here with a leaf certificate for that name signed
//! by the install's CA (which the guest trusts, `ca.rs`), each HTTP/1.1
//! request (hyper) has the VM's placeholders in its **headers** replaced by
//! the values of the secrets given for that host (and in its body, up to
//! [`MAX_BODY`], for a secret given `--secret-in-body`), and goes on over
//! TLS to the original destination, verified against the SNI name (webpki
//! roots and `[secrets] upstream_ca`). Any other connection is spliced to
//! the original destination byte for byte: its TLS is not touched, and a
//! placeholder in it goes out as it is.

use std::collections::HashMap;
use std::io::Cursor;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use banger_net::SECRETS_PROXY_PORT;
use banger_store::VmSecret;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::{Bytes, Incoming};
use hyper::header::HeaderValue;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

use crate::ca::Ca;
use crate::errors::chain;
use crate::secrets::{SecretService, host_matches};

/// Connections through the proxy at once, per VM and in all: a guest
/// cannot take the descriptors the daemon's other work needs.
pub const MAX_CONNS_PER_VM: usize = 64;
pub const MAX_CONNS: usize = 512;
/// How long a guest may take to send its ClientHello, and its largest size.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
const HELLO_MAX: usize = 16 * 1024;
/// Largest request body read whole to replace placeholders in (a secret
/// given `--secret-in-body`); a larger one is refused with 413.
pub const MAX_BODY: usize = 1 << 20;
/// How long connecting to the original destination may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug)]
struct Guest {
    vm: String,
    secrets: Vec<VmSecret>,
    conns: Arc<Semaphore>,
}

#[derive(Debug, Default)]
struct Listening {
    addr: Option<SocketAddrV4>,
    task: Option<tokio::task::JoinHandle<()>>,
}

#[derive(Debug)]
pub struct SecretsProxy {
    ca_dir: PathBuf,
    install_id: String,
    ca: Mutex<Option<Arc<Ca>>>,
    secrets: Arc<SecretService>,
    upstream: Arc<rustls::ClientConfig>,
    guests: Mutex<HashMap<Ipv4Addr, Guest>>,
    listening: Mutex<Listening>,
    total: Arc<Semaphore>,
}

/// The crypto rustls uses here: ring, already linked (ureq, rustls-webpki).
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The roots upstream servers are verified against: webpki's, plus the
/// certificates in `extra` (PEM; `[secrets] upstream_ca`).
pub fn upstream_config(extra: Option<&std::path::Path>) -> anyhow::Result<rustls::ClientConfig> {
    use anyhow::Context;
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = extra {
        let certs = CertificateDer::pem_file_iter(path)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .with_context(|| format!("[secrets] upstream_ca {}", path.display()))?;
        anyhow::ensure!(
            !certs.is_empty(),
            "[secrets] upstream_ca {}: no certificate in it",
            path.display()
        );
        for cert in certs {
            roots
                .add(cert)
                .with_context(|| format!("[secrets] upstream_ca {}", path.display()))?;
        }
    }
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

impl SecretsProxy {
    pub fn new(
        state_dir: &std::path::Path,
        install_id: &str,
        secrets: Arc<SecretService>,
        upstream: rustls::ClientConfig,
    ) -> SecretsProxy {
        SecretsProxy {
            ca_dir: state_dir.join("ca"),
            install_id: install_id.to_owned(),
            ca: Mutex::default(),
            secrets,
            upstream: Arc::new(upstream),
            guests: Mutex::default(),
            listening: Mutex::default(),
            total: Arc::new(Semaphore::new(MAX_CONNS)),
        }
    }

    /// The install's CA, made at first use.
    pub fn ca(&self) -> anyhow::Result<Arc<Ca>> {
        let mut ca = self.ca.lock().expect("proxy ca");
        if let Some(ca) = &*ca {
            return Ok(ca.clone());
        }
        let made = Arc::new(Ca::load_or_create(&self.ca_dir, &self.install_id)?);
        *ca = Some(made.clone());
        Ok(made)
    }

    /// The secret values the proxy puts in.
    pub fn secrets(&self) -> &Arc<SecretService> {
        &self.secrets
    }

    /// The name the CA's certificate has in a guest's trust store.
    pub fn ca_file_name(&self) -> String {
        format!("banger-{}.crt", self.install_id)
    }

    /// Whether the guest at `ip` has secrets (its HTTPS comes here).
    pub fn is_proxied(&self, ip: Ipv4Addr) -> bool {
        self.guests.lock().expect("proxy guests").contains_key(&ip)
    }

    /// The guest at `ip` (VM `vm`) has `secrets`: serve it, listening on
    /// `gateway` if not yet.
    pub async fn register(
        self: &Arc<Self>,
        ip: Ipv4Addr,
        vm: &str,
        secrets: Vec<VmSecret>,
        gateway: Ipv4Addr,
    ) -> std::io::Result<()> {
        self.guests.lock().expect("proxy guests").insert(
            ip,
            Guest {
                vm: vm.to_owned(),
                secrets,
                conns: Arc::new(Semaphore::new(MAX_CONNS_PER_VM)),
            },
        );
        let addr = SocketAddrV4::new(gateway, SECRETS_PROXY_PORT);
        if self.listening.lock().expect("proxy listener").addr == Some(addr) {
            return Ok(());
        }
        // Bound outside the lock; a racing register binding too loses with
        // EADDRINUSE, which is then fine (the other listens).
        let listener = match TcpListener::bind(addr).await {
            Ok(l) => l,
            Err(e)
                if e.kind() == std::io::ErrorKind::AddrInUse
                    && self.listening.lock().expect("proxy listener").addr == Some(addr) =>
            {
                return Ok(());
            }
            Err(e) => {
                self.unregister(ip);
                return Err(e);
            }
        };
        info!(%addr, "secrets proxy listening");
        let this = self.clone();
        let task = tokio::spawn(async move { this.serve(listener).await });
        let mut l = self.listening.lock().expect("proxy listener");
        if let Some(old) = l.task.replace(task) {
            old.abort();
        }
        l.addr = Some(addr);
        Ok(())
    }

    /// The guest at `ip` is gone: forget it; with no guest left, stop
    /// listening.
    pub fn unregister(&self, ip: Ipv4Addr) {
        let mut guests = self.guests.lock().expect("proxy guests");
        if guests.remove(&ip).is_none() || !guests.is_empty() {
            return;
        }
        let mut l = self.listening.lock().expect("proxy listener");
        if let Some(task) = l.task.take() {
            task.abort();
            info!(addr = ?l.addr, "secrets proxy stopped (no guest has secrets)");
        }
        l.addr = None;
    }

    /// Where the proxy listens, while it does.
    pub fn listening(&self) -> Option<SocketAddrV4> {
        self.listening.lock().expect("proxy listener").addr
    }

    async fn serve(self: Arc<Self>, listener: TcpListener) {
        loop {
            let (sock, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %e, "secrets proxy accept");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let this = self.clone();
            tokio::spawn(async move {
                if let Err(e) = this.connection(sock, peer).await {
                    debug!(%peer, error = %e, "secrets proxy connection ended");
                }
            });
        }
    }

    async fn connection(&self, mut sock: TcpStream, peer: SocketAddr) -> Result<(), String> {
        let IpAddr::V4(src) = peer.ip() else {
            return Err("not IPv4".into());
        };
        let (vm, secrets, per_vm) = {
            let guests = self.guests.lock().expect("proxy guests");
            let g = guests.get(&src).ok_or("not a guest with secrets")?;
            (g.vm.clone(), g.secrets.clone(), g.conns.clone())
        };
        let (Ok(_vm_permit), Ok(_permit)) = (
            per_vm.try_acquire_owned(),
            self.total.clone().try_acquire_owned(),
        ) else {
            return Err(format!("VM {vm:?}: too many proxied connections"));
        };
        let dst = rustix::net::sockopt::ip_original_dst(&sock)
            .map_err(|e| format!("no original destination: {e}"))?;
        if dst.ip().is_loopback() || dst.ip().is_unspecified() || dst.port() != 443 {
            return Err(format!("refused destination {dst}"));
        }
        let (hello, sni) = tokio::time::timeout(HELLO_TIMEOUT, read_hello(&mut sock))
            .await
            .map_err(|_| "no ClientHello in time".to_owned())??;
        let grants: Vec<VmSecret> = match &sni {
            Some(host) => secrets
                .into_iter()
                .filter(|s| host_matches(&s.hosts, host))
                .collect(),
            None => Vec::new(),
        };
        let upstream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(dst))
            .await
            .map_err(|_| format!("{dst}: connect timed out"))?
            .map_err(|e| format!("{dst}: {e}"))?;
        match sni {
            Some(host) if !grants.is_empty() => {
                debug!(vm = %vm, %host, %dst, "secrets proxy: intercepting");
                self.intercept(sock, hello, host, upstream, grants).await
            }
            _ => {
                // Not a secret's host: the bytes go on as they are.
                let mut upstream = upstream;
                upstream
                    .write_all(&hello)
                    .await
                    .map_err(|e| e.to_string())?;
                tokio::io::copy_bidirectional(&mut sock, &mut upstream)
                    .await
                    .map(drop)
                    .map_err(|e| e.to_string())
            }
        }
    }

    async fn intercept(
        &self,
        sock: TcpStream,
        hello: Vec<u8>,
        host: String,
        upstream: TcpStream,
        grants: Vec<VmSecret>,
    ) -> Result<(), String> {
        // Values read once per connection (before any TLS: a value that
        // cannot be read closes the connection unanswered), matched against
        // this VM's placeholders only.
        let mut swaps = Vec::new();
        for g in &grants {
            let value = self.secrets.value(&g.name).await.map_err(|e| {
                // The user's to fix (a locked keyring, say): said where they look.
                let e = chain(&e);
                warn!(%host, error = %e, "secrets proxy: no value, connection closed");
                e
            })?;
            let value = HeaderValue::from_str(&value).map_err(|_| {
                format!("secret {}: its value cannot go into an HTTP header", g.name)
            })?;
            swaps.push((g.placeholder.clone(), value, g.in_body));
        }
        let ca = self.ca().map_err(|e| chain(e.as_ref()))?;
        let server = ca.server_config(&host).map_err(|e| chain(e.as_ref()))?;
        // The ClientHello already read comes first, then the rest.
        let (rd, wr) = sock.into_split();
        let io = tokio::io::join(Cursor::new(hello).chain(rd), wr);
        let tls = tokio_rustls::TlsAcceptor::from(server)
            .accept(io)
            .await
            .map_err(|e| format!("TLS with the guest: {e}"))?;
        let name = ServerName::try_from(host.clone()).map_err(|e| e.to_string())?;
        let up_tls = tokio_rustls::TlsConnector::from(self.upstream.clone())
            .connect(name, upstream)
            .await
            .map_err(|e| format!("TLS with {host}: {e}"))?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(up_tls))
            .await
            .map_err(|e| format!("HTTP with {host}: {e}"))?;
        tokio::spawn(conn);
        let sender = Arc::new(tokio::sync::Mutex::new(sender));
        let swaps = Arc::new(swaps);
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let sender = sender.clone();
            let swaps = swaps.clone();
            async move {
                let (mut parts, body) = req.into_parts();
                let heads: Vec<(&[u8], &[u8])> = swaps
                    .iter()
                    .map(|(p, v, _)| (p.as_bytes(), v.as_bytes()))
                    .collect();
                for value in parts.headers.values_mut() {
                    if let Some(mut v) = replace_all(value.as_bytes(), &heads)
                        .and_then(|b| HeaderValue::from_bytes(&b).ok())
                    {
                        v.set_sensitive(true);
                        *value = v;
                    }
                }
                let bodies: Vec<(&[u8], &[u8])> = swaps
                    .iter()
                    .filter(|(_, _, in_body)| *in_body)
                    .map(|(p, v, _)| (p.as_bytes(), v.as_bytes()))
                    .collect();
                let body = if bodies.is_empty() {
                    body.boxed()
                } else {
                    let Ok(whole) = http_body_util::Limited::new(body, MAX_BODY).collect().await
                    else {
                        return Ok(refusal(
                            StatusCode::PAYLOAD_TOO_LARGE,
                            "a request body the proxy rewrites is at most 1 MiB",
                        ));
                    };
                    let whole = whole.to_bytes();
                    let whole = match replace_all(&whole, &bodies) {
                        Some(changed) => {
                            parts.headers.remove(hyper::header::TRANSFER_ENCODING);
                            parts
                                .headers
                                .insert(hyper::header::CONTENT_LENGTH, changed.len().into());
                            Bytes::from(changed)
                        }
                        None => whole,
                    };
                    Full::new(whole).map_err(|never| match never {}).boxed()
                };
                let req = Request::from_parts(parts, body);
                let sent = sender.lock().await.send_request(req).await;
                Ok::<_, std::convert::Infallible>(match sent {
                    Ok(resp) => resp.map(|b| b.boxed()),
                    Err(e) => refusal(StatusCode::BAD_GATEWAY, &e.to_string()),
                })
            }
        });
        hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(tls), service)
            .await
            .map_err(|e| format!("HTTP with the guest: {e}"))
    }
}

/// `bytes` with each placeholder replaced by its secret's value, if it
/// held one.
fn replace_all(bytes: &[u8], swaps: &[(&[u8], &[u8])]) -> Option<Vec<u8>> {
    let holds = |p: &[u8]| bytes.windows(p.len()).any(|w| w == p);
    if !swaps.iter().any(|(p, _)| holds(p)) {
        return None;
    }
    let mut out = bytes.to_vec();
    for (placeholder, secret) in swaps {
        let mut next = Vec::with_capacity(out.len());
        let mut i = 0;
        while i < out.len() {
            if out[i..].starts_with(placeholder) {
                next.extend_from_slice(secret);
                i += placeholder.len();
            } else {
                next.push(out[i]);
                i += 1;
            }
        }
        out = next;
    }
    Some(out)
}

fn refusal(status: StatusCode, why: &str) -> Response<BoxBody<Bytes, hyper::Error>> {
    let mut resp = Response::new(
        Full::new(Bytes::from(format!("banger secrets proxy: {why}\n")))
            .map_err(|never| match never {})
            .boxed(),
    );
    *resp.status_mut() = status;
    resp
}

/// Reads the guest's first TLS records until they hold a whole ClientHello:
/// the bytes read, and its SNI name. Bytes that are not TLS end the read
/// with no name (they are then spliced as they are).
async fn read_hello(sock: &mut TcpStream) -> Result<(Vec<u8>, Option<String>), String> {
    let mut acceptor = rustls::server::Acceptor::default();
    let mut hello = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = sock.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("the guest closed before its ClientHello".into());
        }
        hello.extend_from_slice(&chunk[..n]);
        let mut fed = &chunk[..n];
        while !fed.is_empty() {
            // An error (or no progress: rustls' buffer is full) is not a
            // ClientHello we can read.
            if !matches!(acceptor.read_tls(&mut fed), Ok(n) if n > 0) {
                return Ok((hello, None));
            }
        }
        match acceptor.accept() {
            Ok(Some(accepted)) => {
                let sni = accepted
                    .client_hello()
                    .server_name()
                    .map(|s| s.to_ascii_lowercase());
                return Ok((hello, sni));
            }
            Ok(None) if hello.len() < HELLO_MAX => continue,
            Ok(None) | Err(_) => return Ok((hello, None)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_replaced_wherever_they_are() {
        let swaps: [(&[u8], &[u8]); 1] = [(b"BANGER_PLACEHOLDER_T_00", b"s3cret")];
        let out = replace_all(
            b"Bearer BANGER_PLACEHOLDER_T_00, BANGER_PLACEHOLDER_T_00",
            &swaps,
        );
        assert_eq!(out.as_deref(), Some(&b"Bearer s3cret, s3cret"[..]));
        assert_eq!(replace_all(b"Bearer x", &swaps), None);
        assert_eq!(replace_all(b"BANGER_PLACEHOLDER_T_0", &swaps), None);
    }
}
