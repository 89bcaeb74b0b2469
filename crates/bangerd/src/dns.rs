//! `DnsService`: the daemon's DNS server for guests. It answers
//! `<vm>.<suffix>` (default `vm`) with the VM's guest address from an
//! in-memory table that `VmService` updates on create and delete (and that
//! is rebuilt from the store at daemon start), and forwards every other name
//! to the resolvers of the daemon's own `/etc/resolv.conf`.
//!
//! It listens on the bridge's gateway address, port 53, UDP and TCP, from
//! the moment the bridge exists; guests get that address as their only
//! nameserver (`banger.dns=` on the kernel command line). A daemon that
//! cannot bind port 53 (no CAP_NET_BIND_SERVICE) logs how to fix it, keeps
//! creating VMs (their nameservers are then the upstream ones), and `banger
//! doctor` reports it.
//!
//! A guest may be hostile, and the daemon's file descriptors are shared with
//! the RPC socket: TCP clients and forwarded queries are bounded in total
//! and per guest address ([`DnsLimits`]); a TCP connection lives at most
//! `tcp_lifetime` however busy; a query over the bounds is answered
//! REFUSED (UDP) or its connection closed (TCP), at no cost in sockets.
//!
//! Locking: `names`, `status` and the slot counters are std mutexes held
//! for one map or field access, never across I/O.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use banger_net::Policy;
use banger_store::{Vm, VmState};
use banger_wire::OpId;
use banger_wire::helper::{AllowResolvedParams, NetAllowResolved, ResolvedAddr};
use banger_wire::methods::DnsStatus;
use hickory_proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tracing::{debug, info, warn};

/// How long one upstream resolver gets to answer a forwarded query.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a TCP client may stay idle between queries.
const TCP_IDLE: Duration = Duration::from_secs(10);
/// The daemon's resolvers (in a network namespace entered with `ip netns
/// exec`, the namespace's own `/etc/netns/<ns>/resolv.conf`).
const RESOLV_CONF: &str = "/etc/resolv.conf";
/// Largest UDP message handled (EDNS payloads included).
const MAX_UDP: usize = 4096;

/// Bounds on what guests can make the server hold open.
#[derive(Debug, Clone, Copy)]
pub struct DnsLimits {
    /// TCP connections at once, in all.
    pub tcp_total: usize,
    /// TCP connections at once from one address.
    pub tcp_per_peer: usize,
    /// A TCP connection's whole life, queries or not.
    pub tcp_lifetime: Duration,
    /// Queries being forwarded upstream (each holds a socket), in all.
    pub forwards_total: usize,
    /// Queries being forwarded for one address.
    pub forwards_per_peer: usize,
}

impl Default for DnsLimits {
    /// A busy guest resolves a few dozen names at once; a bound far above
    /// that costs the daemon a few hundred descriptors at most.
    fn default() -> Self {
        DnsLimits {
            tcp_total: 64,
            tcp_per_peer: 8,
            tcp_lifetime: Duration::from_secs(30),
            forwards_total: 256,
            forwards_per_peer: 32,
        }
    }
}

/// Counted slots, in total and per peer address.
#[derive(Debug)]
struct Slots {
    total: usize,
    per_peer: usize,
    used: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

/// A taken slot, given back on drop.
struct Slot {
    slots: Arc<Slots>,
    peer: IpAddr,
}

impl Slots {
    fn new(total: usize, per_peer: usize) -> Self {
        Slots {
            total,
            per_peer,
            used: Mutex::default(),
        }
    }

    fn take(self: &Arc<Self>, peer: IpAddr) -> Option<Slot> {
        let mut used = self.used.lock().expect("dns slots");
        let mine = used.1.get(&peer).copied().unwrap_or(0);
        if used.0 >= self.total || mine >= self.per_peer {
            return None;
        }
        used.0 += 1;
        used.1.insert(peer, mine + 1);
        Some(Slot {
            slots: self.clone(),
            peer,
        })
    }

    fn in_use(&self) -> usize {
        self.used.lock().expect("dns slots").0
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut used = self.slots.used.lock().expect("dns slots");
        used.0 -= 1;
        if let Some(n) = used.1.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                used.1.remove(&self.peer);
            }
        }
    }
}

/// What to do with one query.
#[derive(Debug, PartialEq)]
pub enum Reply {
    /// Answered here (a VM name, or an error): the encoded response.
    Local(Vec<u8>),
    /// Not ours: pass the query bytes to an upstream resolver.
    Forward,
}

/// VM name → guest address, the only data this server is authoritative for.
#[derive(Debug)]
pub struct NameTable {
    /// Lowercase, no dots: `vm`.
    suffix: String,
    names: Mutex<HashMap<String, Ipv4Addr>>,
}

impl NameTable {
    pub fn new(suffix: &str) -> Self {
        NameTable {
            suffix: suffix.trim_matches('.').to_ascii_lowercase(),
            names: Mutex::default(),
        }
    }

    pub fn suffix(&self) -> &str {
        &self.suffix
    }

    /// `<name>.<suffix>`.
    pub fn fqdn(&self, name: &str) -> String {
        format!("{name}.{}", self.suffix)
    }

    pub fn insert(&self, name: &str, ip: Ipv4Addr) {
        self.names
            .lock()
            .expect("dns names")
            .insert(name.to_ascii_lowercase(), ip);
    }

    pub fn remove(&self, name: &str) {
        self.names
            .lock()
            .expect("dns names")
            .remove(&name.to_ascii_lowercase());
    }

    /// Replace the table with the VMs that hold an address (all but failed ones).
    pub fn rebuild(&self, vms: &[Vm]) {
        let table: HashMap<String, Ipv4Addr> = vms
            .iter()
            .filter(|vm| vm.state != VmState::Failed)
            .filter_map(|vm| Some((vm.name.to_ascii_lowercase(), vm.guest_ip?)))
            .collect();
        *self.names.lock().expect("dns names") = table;
    }

    pub fn len(&self) -> usize {
        self.names.lock().expect("dns names").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn lookup(&self, name: &str) -> Option<Ipv4Addr> {
        self.names
            .lock()
            .expect("dns names")
            .get(&name.to_ascii_lowercase())
            .copied()
    }

    /// The answer to one DNS message, or `Forward` for names outside the suffix.
    pub fn reply(&self, query: &[u8]) -> Reply {
        let req = match Message::from_vec(query) {
            Ok(m) => m,
            Err(e) => {
                debug!(error = %e, "malformed DNS query");
                // Without a parseable header there is no id to answer to.
                return match query.get(..2) {
                    Some(id) => {
                        let id = u16::from_be_bytes([id[0], id[1]]);
                        Reply::Local(encode(&Message::error_msg(
                            id,
                            OpCode::Query,
                            ResponseCode::FormErr,
                        )))
                    }
                    None => Reply::Local(Vec::new()),
                };
            }
        };
        if req.metadata.message_type != MessageType::Query
            || req.metadata.op_code != OpCode::Query
            || req.queries.len() != 1
        {
            return Reply::Local(encode(&self.response(&req, ResponseCode::NotImp)));
        }
        let q = &req.queries[0];
        let qname = q.name().to_lowercase().to_ascii();
        let qname = qname.trim_end_matches('.');
        let Some(label) = qname
            .strip_suffix(&self.suffix)
            .and_then(|rest| rest.strip_suffix('.'))
            .or_else(|| (qname == self.suffix).then_some(""))
        else {
            return Reply::Forward;
        };
        let mut resp = self.response(&req, ResponseCode::NoError);
        resp.metadata.authoritative = true;
        match (label, self.lookup(label)) {
            // The suffix itself exists, with no records of its own.
            ("", _) => {}
            (_, Some(ip)) if !label.contains('.') => {
                if matches!(q.query_type(), RecordType::A | RecordType::ANY) {
                    // TTL 0: a rename or delete must be seen at once.
                    resp.add_answer(Record::from_rdata(q.name().clone(), 0, RData::A(A(ip))));
                }
            }
            _ => resp.metadata.response_code = ResponseCode::NXDomain,
        }
        Reply::Local(encode(&resp))
    }

    fn response(&self, req: &Message, code: ResponseCode) -> Message {
        let mut resp = Message::response(req.metadata.id, req.metadata.op_code);
        resp.metadata.recursion_desired = req.metadata.recursion_desired;
        resp.metadata.recursion_available = true;
        resp.metadata.response_code = code;
        resp.add_queries(req.queries.iter().cloned());
        if req.edns.is_some() {
            let mut edns = Edns::new();
            edns.set_max_payload(MAX_UDP as u16);
            resp.set_edns(edns);
        }
        resp
    }
}

fn encode(m: &Message) -> Vec<u8> {
    m.to_vec().unwrap_or_else(|e| {
        warn!(error = %e, "cannot encode a DNS response");
        Vec::new()
    })
}

/// Nameservers in resolv.conf text, in order; `skip` (the bridge address,
/// where this server itself listens) is left out so queries cannot loop.
pub fn parse_resolv_conf(text: &str, skip: Option<IpAddr>) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            (words.next() == Some("nameserver")).then(|| words.next())?
        })
        // A scoped IPv6 address (fe80::1%eth0) cannot be used from here.
        .filter_map(|a| a.parse::<IpAddr>().ok())
        .filter(|ip| Some(*ip) != skip)
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

#[derive(Debug, Clone)]
enum State {
    NotStarted,
    Serving(SocketAddr),
    Failed(String),
}

/// What a guest under an `allow=` policy may resolve: its tap and policy.
#[derive(Debug, Clone)]
struct Restricted {
    tap: String,
    policy: Policy,
}

/// A forwarded answer for a restricted guest: its addresses are let
/// through that guest's policy (on these ports) before the guest gets it.
#[derive(Debug)]
struct Grant {
    guest: Ipv4Addr,
    tap: String,
    ports: Vec<Option<u16>>,
    /// A `learn` guest: nothing to let through, the answer is recorded
    /// under `name`.
    learn: Option<String>,
}

/// The server: the name table, its listeners and its upstreams.
#[derive(Debug)]
pub struct DnsService {
    table: NameTable,
    /// Guests under an `allow=` policy, by address: only the names it
    /// allows resolve for them.
    restricted: Mutex<HashMap<Ipv4Addr, Restricted>>,
    /// Guests under `learn`, by address: each answered address and the
    /// names it was the answer for.
    learning: Mutex<HashMap<Ipv4Addr, BTreeMap<Ipv4Addr, BTreeSet<String>>>>,
    /// Where the addresses answered for allowed names go (the helper's
    /// `net.allow_resolved`); unset in tests that never restrict.
    /// And the nftables table they are in.
    helper: Option<(Arc<crate::helper::HelperLink>, String)>,
    state: Mutex<State>,
    upstreams: Mutex<Vec<SocketAddr>>,
    limits: DnsLimits,
    tcp: Arc<Slots>,
    forwards: Arc<Slots>,
}

impl DnsService {
    pub fn new(suffix: &str) -> Self {
        Self::with_limits(suffix, DnsLimits::default())
    }

    pub fn with_limits(suffix: &str, limits: DnsLimits) -> Self {
        DnsService {
            table: NameTable::new(suffix),
            restricted: Mutex::default(),
            learning: Mutex::default(),
            helper: None,
            state: Mutex::new(State::NotStarted),
            upstreams: Mutex::default(),
            limits,
            tcp: Arc::new(Slots::new(limits.tcp_total, limits.tcp_per_peer)),
            forwards: Arc::new(Slots::new(limits.forwards_total, limits.forwards_per_peer)),
        }
    }

    /// Let the answers for allowed names through guests' policies (in
    /// nftables `table`) via `helper`.
    pub fn with_helper(mut self, helper: Arc<crate::helper::HelperLink>, table: String) -> Self {
        self.helper = Some((helper, table));
        self
    }

    /// The guest at `ip` (behind `tap`) is now under `policy`: with
    /// `allow=`, only its domains resolve for it.
    pub fn set_policy(&self, ip: Ipv4Addr, tap: &str, policy: Policy) {
        {
            // Made again, the guest's record starts anew (as its nft set does).
            let mut l = self.learning.lock().expect("dns learning");
            if policy == Policy::Learn {
                l.insert(ip, BTreeMap::new());
            } else {
                l.remove(&ip);
            }
        }
        let mut r = self.restricted.lock().expect("dns policies");
        match policy {
            Policy::Allow(_) => {
                r.insert(
                    ip,
                    Restricted {
                        tap: tap.to_owned(),
                        policy,
                    },
                );
            }
            Policy::Nat | Policy::None | Policy::Learn => {
                r.remove(&ip);
            }
        }
    }

    pub fn clear_policy(&self, ip: Ipv4Addr) {
        self.restricted.lock().expect("dns policies").remove(&ip);
        self.learning.lock().expect("dns learning").remove(&ip);
    }

    /// For a guest under `learn`: each address it was answered, with the
    /// names it was the answer for.
    pub fn learned_names(&self, ip: Ipv4Addr) -> BTreeMap<Ipv4Addr, BTreeSet<String>> {
        self.learning
            .lock()
            .expect("dns learning")
            .get(&ip)
            .cloned()
            .unwrap_or_default()
    }

    /// Ours to answer (an answer, or a refusal for a restricted guest), or
    /// to forward, with the grant a restricted guest's answer needs.
    fn decide(&self, peer: IpAddr, query: &[u8]) -> Result<Reply, Option<Grant>> {
        let IpAddr::V4(guest) = peer else {
            return self.unrestricted(query);
        };
        if self
            .learning
            .lock()
            .expect("dns learning")
            .contains_key(&guest)
        {
            return match self.unrestricted(query) {
                Err(None) => Err(Message::from_vec(query)
                    .ok()
                    .and_then(|m| {
                        m.queries
                            .first()
                            .map(|q| q.name().to_lowercase().to_ascii())
                    })
                    .map(|name| Grant {
                        guest,
                        tap: String::new(),
                        ports: Vec::new(),
                        learn: Some(name.trim_end_matches('.').to_owned()),
                    })),
                other => other,
            };
        }
        let Some(r) = self
            .restricted
            .lock()
            .expect("dns policies")
            .get(&guest)
            .cloned()
        else {
            return self.unrestricted(query);
        };
        let Some(qname) = Message::from_vec(query)
            .ok()
            .filter(|m| m.queries.len() == 1)
            .map(|m| m.queries[0].name().to_lowercase().to_ascii())
        else {
            // Malformed or odd: the name table answers those.
            return self.unrestricted(query);
        };
        match r.policy.ports_for(qname.trim_end_matches('.')) {
            Some(ports) => Err(Some(Grant {
                guest,
                tap: r.tap,
                ports,
                learn: None,
            })),
            None => {
                debug!(%guest, name = %qname, "DNS: a name the guest's policy does not allow; refused");
                Ok(Reply::Local(
                    failure(query, ResponseCode::Refused).unwrap_or_default(),
                ))
            }
        }
    }

    fn unrestricted(&self, query: &[u8]) -> Result<Reply, Option<Grant>> {
        match self.table.reply(query) {
            Reply::Forward => Err(None),
            local => Ok(local),
        }
    }

    /// Let the A records of `resp` through the guest's policy for their
    /// TTL; `false` when that failed (the guest then gets SERVFAIL: an
    /// address it could not reach is no answer).
    async fn grant(&self, grant: &Grant, resp: &[u8]) -> bool {
        let Ok(msg) = Message::from_vec(resp) else {
            return true;
        };
        let records: Vec<(Ipv4Addr, u32)> = msg
            .answers
            .iter()
            .filter_map(|r| match r.data {
                RData::A(A(ip)) => Some((ip, r.ttl)),
                _ => None,
            })
            .collect();
        if let Some(name) = &grant.learn {
            if let Some(seen) = self
                .learning
                .lock()
                .expect("dns learning")
                .get_mut(&grant.guest)
            {
                for (ip, _) in &records {
                    seen.entry(*ip).or_default().insert(name.clone());
                }
            }
            return true;
        }
        let Some(ttl) = records.iter().map(|(_, t)| *t).min() else {
            return true;
        };
        let Some((helper, table)) = &self.helper else {
            return false;
        };
        let addrs = records
            .iter()
            .flat_map(|(ip, _)| {
                grant.ports.iter().map(|port| ResolvedAddr {
                    addr: ip.to_string(),
                    port: *port,
                })
            })
            .collect();
        let params = AllowResolvedParams {
            table: table.clone(),
            tap: grant.tap.clone(),
            ip: grant.guest.to_string(),
            addrs,
            // A TTL of 0 still has to outlast the guest's connect.
            ttl_secs: ttl.max(5),
        };
        match helper
            .call::<NetAllowResolved>(&OpId::mint(), &params)
            .await
        {
            Ok(_) => true,
            Err(e) => {
                warn!(guest = %grant.guest, error = %e, "DNS: cannot let the answer's addresses through the guest's policy");
                false
            }
        }
    }

    /// Forward `query` and, for a restricted guest, grant its answer first.
    async fn forward_for(&self, query: &[u8], tcp: bool, grant: Option<Grant>) -> Option<Vec<u8>> {
        let resp = self.forward(query, tcp).await?;
        match grant {
            Some(g) if !self.grant(&g, &resp).await => failure(query, ResponseCode::ServFail),
            _ => Some(resp),
        }
    }

    /// Queries being forwarded upstream right now.
    pub fn forwards_in_flight(&self) -> usize {
        self.forwards.in_use()
    }

    pub fn names(&self) -> &NameTable {
        &self.table
    }

    /// Serve on `gateway:53` (UDP and TCP) until the daemon exits. Called
    /// once the bridge has its address; a second call is a no-op while
    /// serving. Failing to bind is logged and reported, not an error: VMs
    /// work without it, minus their names.
    pub async fn serve(self: &Arc<Self>, gateway: Ipv4Addr) {
        if matches!(*self.state.lock().expect("dns state"), State::Serving(_)) {
            return;
        }
        let upstreams = match std::fs::read_to_string(RESOLV_CONF) {
            Ok(text) => parse_resolv_conf(&text, Some(IpAddr::V4(gateway))),
            Err(e) => {
                warn!(path = RESOLV_CONF, error = %e, "cannot read the host's resolvers; only VM names will resolve");
                Vec::new()
            }
        };
        *self.upstreams.lock().expect("dns upstreams") = upstreams.clone();
        let addr = SocketAddr::new(IpAddr::V4(gateway), 53);
        let bound = async {
            let udp = UdpSocket::bind(addr).await?;
            let tcp = TcpListener::bind(addr).await?;
            Ok::<_, std::io::Error>((udp, tcp))
        }
        .await;
        match bound {
            Ok((udp, tcp)) => {
                info!(%addr, suffix = %self.table.suffix(), ?upstreams, "DNS for VM names serving");
                *self.state.lock().expect("dns state") = State::Serving(addr);
                tokio::spawn(self.clone().serve_udp(Arc::new(udp)));
                tokio::spawn(self.clone().serve_tcp(tcp));
            }
            Err(e) => {
                let fix = if e.kind() == std::io::ErrorKind::PermissionDenied {
                    "; port 53 needs CAP_NET_BIND_SERVICE: sudo setcap cap_net_bind_service=+ep $(command -v bangerd), then banger daemon stop"
                } else {
                    "; is another DNS server (dnsmasq?) bound to that address?"
                };
                let msg = format!("cannot listen on {addr}: {e}{fix}");
                warn!("{msg}; guests will use the host's resolvers and VM names will not resolve");
                *self.state.lock().expect("dns state") = State::Failed(msg);
            }
        }
    }

    /// What guests should put in resolv.conf: this server when it runs, else
    /// the host's resolvers that a guest can reach (not loopback ones).
    pub fn guest_nameservers(&self) -> Vec<IpAddr> {
        match &*self.state.lock().expect("dns state") {
            State::Serving(a) => vec![a.ip()],
            _ => self
                .upstreams
                .lock()
                .expect("dns upstreams")
                .iter()
                .map(|a| a.ip())
                .filter(|ip| !ip.is_loopback())
                .collect(),
        }
    }

    pub fn status(&self) -> DnsStatus {
        let (state, address, error) = match &*self.state.lock().expect("dns state") {
            State::NotStarted => ("not_started", None, None),
            State::Serving(a) => ("serving", Some(a.to_string()), None),
            State::Failed(e) => ("failed", None, Some(e.clone())),
        };
        DnsStatus {
            suffix: self.table.suffix().to_string(),
            state: state.to_string(),
            address,
            error,
            upstreams: self
                .upstreams
                .lock()
                .expect("dns upstreams")
                .iter()
                .map(|a| a.ip().to_string())
                .collect(),
            names: self.table.len(),
        }
    }

    async fn serve_udp(self: Arc<Self>, sock: Arc<UdpSocket>) {
        let mut buf = vec![0u8; MAX_UDP];
        loop {
            let (n, peer) = match sock.recv_from(&mut buf).await {
                Ok(r) => r,
                Err(e) => {
                    warn!(error = %e, "DNS UDP receive failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let query = buf[..n].to_vec();
            // Local answers and refusals cost no task and no socket.
            let grant = match self.decide(peer.ip(), &query) {
                Ok(Reply::Local(resp)) => {
                    if !resp.is_empty() {
                        let _ = sock.send_to(&resp, peer).await;
                    }
                    continue;
                }
                Ok(Reply::Forward) => None,
                Err(grant) => grant,
            };
            let Some(slot) = self.forwards.take(peer.ip()) else {
                debug!(%peer, "DNS: too many queries in flight; refused");
                if let Some(resp) = failure(&query, ResponseCode::Refused) {
                    let _ = sock.send_to(&resp, peer).await;
                }
                continue;
            };
            let (this, sock) = (self.clone(), sock.clone());
            tokio::spawn(async move {
                // Held until the upstream answered or gave up.
                let _slot = slot;
                if let Some(resp) = this.forward_for(&query, false, grant).await {
                    let _ = sock.send_to(&resp, peer).await;
                }
            });
        }
    }

    async fn serve_tcp(self: Arc<Self>, listener: TcpListener) {
        loop {
            match listener.accept().await {
                Ok((stream, peer)) => match self.tcp.take(peer.ip()) {
                    Some(slot) => {
                        let (this, lifetime) = (self.clone(), self.limits.tcp_lifetime);
                        tokio::spawn(async move {
                            let _slot = slot;
                            let _ = tokio::time::timeout(
                                lifetime,
                                this.serve_tcp_client(stream, peer.ip()),
                            )
                            .await;
                        });
                    }
                    // Closed at once: the client sees EOF.
                    None => debug!(%peer, "DNS: too many TCP connections; closed"),
                },
                Err(e) => {
                    warn!(error = %e, "DNS TCP accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    async fn serve_tcp_client(self: Arc<Self>, mut stream: TcpStream, peer: IpAddr) {
        loop {
            let Ok(Some(query)) = tokio::time::timeout(TCP_IDLE, read_framed(&mut stream))
                .await
                .unwrap_or(Ok(None))
            else {
                return;
            };
            let Some(resp) = self.answer(peer, &query, true).await else {
                return;
            };
            if write_framed(&mut stream, &resp).await.is_err() {
                return;
            }
        }
    }

    /// The response to `query`: ours, or the first upstream's (over the
    /// client's transport). `None` when nobody answered.
    async fn answer(&self, peer: IpAddr, query: &[u8], tcp: bool) -> Option<Vec<u8>> {
        match self.decide(peer, query) {
            Ok(Reply::Local(resp)) => Some(resp).filter(|r| !r.is_empty()),
            Ok(Reply::Forward) => self.forward(query, tcp).await,
            Err(grant) => self.forward_for(query, tcp, grant).await,
        }
    }

    /// The first upstream's answer to `query`, or SERVFAIL.
    async fn forward(&self, query: &[u8], tcp: bool) -> Option<Vec<u8>> {
        let upstreams = self.upstreams.lock().expect("dns upstreams").clone();
        for up in &upstreams {
            let asked = if tcp {
                forward_tcp(*up, query).await
            } else {
                forward_udp(*up, query).await
            };
            match asked {
                Ok(resp) => return Some(resp),
                Err(e) => debug!(upstream = %up, error = %e, "upstream DNS failed"),
            }
        }
        // Nobody to ask, or nobody answered.
        failure(query, ResponseCode::ServFail)
    }
}

/// An error response to `query` (same id and question), `None` when the
/// query has no id to answer to.
fn failure(query: &[u8], code: ResponseCode) -> Option<Vec<u8>> {
    let id = u16::from_be_bytes([*query.first()?, *query.get(1)?]);
    let mut fail = Message::error_msg(id, OpCode::Query, code);
    if let Ok(req) = Message::from_vec(query) {
        fail.add_queries(req.queries);
        fail.metadata.recursion_desired = req.metadata.recursion_desired;
    }
    fail.metadata.recursion_available = true;
    Some(encode(&fail))
}

async fn forward_udp(upstream: SocketAddr, query: &[u8]) -> std::io::Result<Vec<u8>> {
    let local: SocketAddr = match upstream {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let sock = UdpSocket::bind(local).await?;
    sock.connect(upstream).await?;
    sock.send(query).await?;
    let mut buf = vec![0u8; MAX_UDP];
    let read = async {
        loop {
            let n = sock.recv(&mut buf).await?;
            // Only the answer to this query (same id) counts.
            if n >= 2 && buf[..2] == query[..2] {
                return Ok::<_, std::io::Error>(buf[..n].to_vec());
            }
        }
    };
    tokio::time::timeout(UPSTREAM_TIMEOUT, read)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer"))?
}

async fn forward_tcp(upstream: SocketAddr, query: &[u8]) -> std::io::Result<Vec<u8>> {
    let ask = async {
        let mut s = TcpStream::connect(upstream).await?;
        write_framed(&mut s, query).await?;
        read_framed(&mut s)
            .await?
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "closed"))
    };
    tokio::time::timeout(UPSTREAM_TIMEOUT, ask)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer"))?
}

/// One length-prefixed DNS message (RFC 1035 4.2.2); `None` at a clean EOF.
async fn read_framed(s: &mut TcpStream) -> std::io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 2];
    match s.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
    s.read_exact(&mut msg).await?;
    Ok(Some(msg))
}

async fn write_framed(s: &mut TcpStream, msg: &[u8]) -> std::io::Result<()> {
    let len = u16::try_from(msg.len())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "message too long"))?;
    let mut out = Vec::with_capacity(msg.len() + 2);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(msg);
    s.write_all(&out).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query;
    use hickory_proto::rr::Name;

    const LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

    fn query(name: &str, rtype: RecordType) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.id = 4242;
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
        m.to_vec().unwrap()
    }

    fn local(r: Reply) -> Message {
        match r {
            Reply::Local(bytes) => Message::from_vec(&bytes).unwrap(),
            Reply::Forward => panic!("forwarded"),
        }
    }

    fn a_records(m: &Message) -> Vec<Ipv4Addr> {
        m.answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(a.0),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn answers_vm_names_case_insensitively() {
        let t = NameTable::new("vm");
        t.insert("web", Ipv4Addr::new(172, 30, 0, 2));
        for name in ["web.vm.", "web.vm", "WEB.Vm."] {
            let m = local(t.reply(&query(name, RecordType::A)));
            assert_eq!(m.metadata.id, 4242);
            assert_eq!(m.metadata.message_type, MessageType::Response);
            assert!(m.metadata.authoritative && m.metadata.recursion_desired);
            assert_eq!(m.metadata.response_code, ResponseCode::NoError);
            assert_eq!(a_records(&m), [Ipv4Addr::new(172, 30, 0, 2)], "{name}");
            assert_eq!(m.answers[0].ttl, 0);
            assert_eq!(m.queries.len(), 1);
        }
        assert_eq!(t.fqdn("web"), "web.vm");
    }

    #[test]
    fn other_types_unknown_names_and_deeper_names() {
        let t = NameTable::new(".vm.");
        t.insert("db", Ipv4Addr::new(10, 0, 0, 3));
        // A name with no AAAA record: NOERROR, no answers (NODATA).
        let m = local(t.reply(&query("db.vm.", RecordType::AAAA)));
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.answers.is_empty());
        let m = local(t.reply(&query("nosuch.vm.", RecordType::A)));
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
        let m = local(t.reply(&query("x.db.vm.", RecordType::A)));
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
        // The suffix itself exists but has no address.
        let m = local(t.reply(&query("vm.", RecordType::A)));
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.answers.is_empty());
        // Names merely ending in the suffix's letters are not ours.
        assert_eq!(t.reply(&query("dbvm.", RecordType::A)), Reply::Forward);
        assert_eq!(
            t.reply(&query("example.org.", RecordType::A)),
            Reply::Forward
        );
    }

    #[test]
    fn delete_and_rebuild_update_answers_at_once() {
        let t = NameTable::new("test");
        t.insert("a", Ipv4Addr::new(10, 0, 0, 2));
        assert_eq!(
            a_records(&local(t.reply(&query("a.test.", RecordType::A)))).len(),
            1
        );
        t.remove("a");
        let m = local(t.reply(&query("a.test.", RecordType::A)));
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
        assert!(t.is_empty());

        let vm = |name: &str, state: VmState, ip: Option<Ipv4Addr>| Vm {
            id: format!("id-{name}"),
            name: name.into(),
            image_id: "img".into(),
            vmm: banger_store::Vmm::Qemu,
            init_mode: banger_store::InitMode::Fast,
            vcpus: 1,
            memory_mib: 128,
            disk_mib: 64,
            state,
            guest_ip: ip,
            mac: None,
            vsock_cid: None,
            dns_name: None,
            vm_dir: "/nonexistent".into(),
            api_socket: None,
            console_log: None,
            last_error: None,
            created_at: 0,
            last_used_at: None,
            labels: Default::default(),
            net_policy: "nat".into(),
        };
        t.rebuild(&[
            vm("up", VmState::Running, Some(Ipv4Addr::new(10, 0, 0, 5))),
            vm("down", VmState::Stopped, Some(Ipv4Addr::new(10, 0, 0, 6))),
            vm("broken", VmState::Failed, Some(Ipv4Addr::new(10, 0, 0, 7))),
            vm("noip", VmState::Running, None),
        ]);
        assert_eq!(t.len(), 2);
        assert_eq!(t.lookup("up"), Some(Ipv4Addr::new(10, 0, 0, 5)));
        assert_eq!(t.lookup("down"), Some(Ipv4Addr::new(10, 0, 0, 6)));
        assert_eq!(t.lookup("broken"), None);
    }

    /// A guest under `allow=` resolves only its names; others (VM names
    /// too) are refused at once; other guests are not affected.
    #[test]
    fn restricted_guests_resolve_only_their_names() {
        let dns = DnsService::new("vm");
        dns.names().insert("box", Ipv4Addr::new(172, 30, 0, 3));
        let guest = Ipv4Addr::new(172, 30, 0, 9);
        let policy: Policy = "allow=api.example.com:443,*.example.org".parse().unwrap();
        dns.set_policy(guest, "bg-t1", policy);
        let peer = IpAddr::V4(guest);
        for refused in ["box.vm.", "other.example.com.", "example.org."] {
            let Ok(Reply::Local(resp)) = dns.decide(peer, &query(refused, RecordType::A)) else {
                panic!("{refused} was not refused");
            };
            let m = Message::from_vec(&resp).unwrap();
            assert_eq!(m.metadata.response_code, ResponseCode::Refused, "{refused}");
        }
        let Err(Some(g)) = dns.decide(peer, &query("API.example.com.", RecordType::A)) else {
            panic!("api.example.com is allowed");
        };
        assert_eq!((g.tap.as_str(), g.ports), ("bg-t1", vec![Some(443)]));
        let Err(Some(g)) = dns.decide(peer, &query("a.example.org.", RecordType::A)) else {
            panic!("a.example.org is allowed");
        };
        assert_eq!(g.ports, vec![None]);
        // Another guest, and this one once its policy is nat again.
        assert!(matches!(
            dns.decide(LOCAL, &query("box.vm.", RecordType::A)),
            Ok(Reply::Local(_))
        ));
        dns.set_policy(guest, "bg-t1", Policy::Nat);
        assert!(matches!(
            dns.decide(peer, &query("other.example.com.", RecordType::A)),
            Err(None)
        ));
    }

    #[test]
    fn edns_and_bad_queries() {
        let t = NameTable::new("vm");
        t.insert("e", Ipv4Addr::new(10, 0, 0, 9));
        let mut m = Message::query();
        m.add_query(Query::query(
            Name::from_ascii("e.vm.").unwrap(),
            RecordType::A,
        ));
        m.set_edns(Edns::new());
        let r = local(t.reply(&m.to_vec().unwrap()));
        assert!(r.edns.is_some(), "an EDNS query gets an EDNS answer");
        assert_eq!(a_records(&r).len(), 1);
        // Garbage with an id: FORMERR for that id.
        let r = local(t.reply(&[0x12, 0x34, 0xff]));
        assert_eq!(r.metadata.id, 0x1234);
        assert_eq!(r.metadata.response_code, ResponseCode::FormErr);
        assert_eq!(t.reply(&[1]), Reply::Local(Vec::new()));
        // Not a plain query: not implemented.
        let mut m = Message::query();
        m.metadata.op_code = OpCode::Status;
        let r = local(t.reply(&m.to_vec().unwrap()));
        assert_eq!(r.metadata.response_code, ResponseCode::NotImp);
    }

    /// An address it cannot listen on (here: one no interface has; for an
    /// unprivileged daemon, port 53 itself) is reported, not fatal, and
    /// guests then get the host's reachable resolvers instead.
    #[tokio::test]
    async fn cannot_listen_is_reported() {
        let dns = Arc::new(DnsService::new("vm"));
        dns.serve(Ipv4Addr::new(192, 0, 2, 77)).await;
        let st = dns.status();
        assert_eq!(st.state, "failed");
        assert!(
            st.error
                .as_deref()
                .unwrap()
                .contains("cannot listen on 192.0.2.77:53"),
            "{st:?}"
        );
        let upstreams: Vec<IpAddr> = st.upstreams.iter().map(|u| u.parse().unwrap()).collect();
        let guests = dns.guest_nameservers();
        assert!(
            guests
                .iter()
                .all(|ip| !ip.is_loopback() && upstreams.contains(ip))
        );
    }

    #[test]
    fn resolv_conf_parsing_skips_the_bridge() {
        let text = "# comment\nsearch example\nnameserver 10.0.0.1\nnameserver 172.30.0.1\n\
                    nameserver fe80::1%eth0\nnameserver ::1\noptions ndots:2\nnameserver\n";
        let got = parse_resolv_conf(text, Some("172.30.0.1".parse().unwrap()));
        assert_eq!(
            got,
            [
                "10.0.0.1:53".parse::<SocketAddr>().unwrap(),
                "[::1]:53".parse().unwrap()
            ]
        );
    }

    /// The whole server on loopback: a VM name answered locally over UDP and
    /// TCP, another name forwarded to a fake upstream, and SERVFAIL when
    /// the upstream is gone. Port 53 needs privileges, so this binds an
    /// unprivileged loopback port through the same code paths.
    #[tokio::test]
    async fn serves_udp_and_tcp_and_forwards() {
        // A fake upstream answering every query with 192.0.2.1.
        let up = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let up_addr = up.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 512];
            while let Ok((n, peer)) = up.recv_from(&mut buf).await {
                let req = Message::from_vec(&buf[..n]).unwrap();
                let mut resp = Message::response(req.metadata.id, OpCode::Query);
                let name = req.queries[0].name().clone();
                resp.add_queries(req.queries);
                resp.add_answer(Record::from_rdata(
                    name,
                    60,
                    RData::A(A(Ipv4Addr::new(192, 0, 2, 1))),
                ));
                up.send_to(&resp.to_vec().unwrap(), peer).await.unwrap();
            }
        });
        let dns = Arc::new(DnsService::new("vm"));
        // Point the upstream at the fake one's port (resolv.conf has no ports).
        *dns.upstreams.lock().unwrap() = vec![up_addr];
        dns.names().insert("box", Ipv4Addr::new(172, 30, 0, 2));

        let answered = dns
            .answer(LOCAL, &query("box.vm.", RecordType::A), false)
            .await
            .unwrap();
        assert_eq!(
            a_records(&Message::from_vec(&answered).unwrap()),
            [Ipv4Addr::new(172, 30, 0, 2)]
        );
        let forwarded = dns
            .answer(LOCAL, &query("example.org.", RecordType::A), false)
            .await
            .unwrap();
        assert_eq!(
            a_records(&Message::from_vec(&forwarded).unwrap()),
            [Ipv4Addr::new(192, 0, 2, 1)]
        );

        // TCP framing end to end through a real listener.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(dns.clone().serve_tcp(listener));
        let mut s = TcpStream::connect(addr).await.unwrap();
        for _ in 0..2 {
            write_framed(&mut s, &query("box.vm.", RecordType::A))
                .await
                .unwrap();
            let resp = read_framed(&mut s).await.unwrap().unwrap();
            assert_eq!(a_records(&Message::from_vec(&resp).unwrap()).len(), 1);
        }

        // No upstream left: SERVFAIL, not silence.
        *dns.upstreams.lock().unwrap() = vec![];
        let failed = dns
            .answer(LOCAL, &query("example.org.", RecordType::A), false)
            .await
            .unwrap();
        let failed = Message::from_vec(&failed).unwrap();
        assert_eq!(failed.metadata.response_code, ResponseCode::ServFail);
        assert_eq!(failed.metadata.id, 4242);
        assert_eq!(dns.status().state, "not_started");
        assert_eq!(dns.status().names, 1);
    }

    /// A hostile guest's flood over TCP: connections beyond its share are
    /// closed at once, the rest keep working, a busy connection still ends
    /// at its lifetime, and a closed one frees its slot.
    #[tokio::test]
    async fn tcp_connections_are_bounded_per_peer_and_in_time() {
        let dns = Arc::new(DnsService::with_limits(
            "vm",
            DnsLimits {
                tcp_total: 64,
                tcp_per_peer: 2,
                tcp_lifetime: Duration::from_millis(500),
                ..DnsLimits::default()
            },
        ));
        dns.names().insert("box", Ipv4Addr::new(172, 30, 0, 2));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(dns.clone().serve_tcp(listener));
        let ask = |mut s: TcpStream| async move {
            write_framed(&mut s, &query("box.vm.", RecordType::A)).await?;
            let r = read_framed(&mut s).await?;
            Ok::<_, std::io::Error>((s, r))
        };
        let (a, ra) = ask(TcpStream::connect(addr).await.unwrap()).await.unwrap();
        let (_b, rb) = ask(TcpStream::connect(addr).await.unwrap()).await.unwrap();
        assert!(ra.is_some() && rb.is_some());
        // The third from the same address: closed without an answer.
        let third = ask(TcpStream::connect(addr).await.unwrap()).await;
        assert!(matches!(third, Ok((_, None)) | Err(_)), "{third:?}");
        // A connection that never stops asking still ends.
        let mut a = a;
        let ended = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if write_framed(&mut a, &query("box.vm.", RecordType::A))
                    .await
                    .is_err()
                {
                    return;
                }
                match read_framed(&mut a).await {
                    Ok(Some(_)) => tokio::time::sleep(Duration::from_millis(20)).await,
                    _ => return,
                }
            }
        })
        .await;
        assert!(ended.is_ok(), "a busy connection outlived its lifetime");
        // Its slot is free again: a new connection is served.
        let served = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let Ok((_s, Some(_))) = ask(TcpStream::connect(addr).await.unwrap()).await {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        assert!(served.is_ok(), "the slot was never given back");
    }

    /// A flood of UDP queries for names an upstream never answers: at
    /// most the peer's share is forwarded (each holds a socket); the rest
    /// are refused at once. VM names are still answered meanwhile.
    #[tokio::test]
    async fn forwarded_udp_queries_are_bounded() {
        let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let dns = Arc::new(DnsService::with_limits(
            "vm",
            DnsLimits {
                forwards_per_peer: 4,
                ..DnsLimits::default()
            },
        ));
        *dns.upstreams.lock().unwrap() = vec![silent.local_addr().unwrap()];
        dns.names().insert("box", Ipv4Addr::new(172, 30, 0, 2));
        let server = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let addr = server.local_addr().unwrap();
        tokio::spawn(dns.clone().serve_udp(server));
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        client.connect(addr).await.unwrap();
        for i in 0..20u16 {
            let mut q = query(&format!("n{i}.example.org."), RecordType::A);
            q[..2].copy_from_slice(&i.to_be_bytes());
            client.send(&q).await.unwrap();
        }
        let mut refused = 0;
        let mut buf = vec![0u8; 4096];
        while refused < 16 {
            let n = tokio::time::timeout(Duration::from_secs(2), client.recv(&mut buf))
                .await
                .expect("the refusals come at once")
                .unwrap();
            let m = Message::from_vec(&buf[..n]).unwrap();
            assert_eq!(m.metadata.response_code, ResponseCode::Refused);
            refused += 1;
        }
        assert_eq!(dns.forwards_in_flight(), 4);
        client.send(&query("box.vm.", RecordType::A)).await.unwrap();
        let n = client.recv(&mut buf).await.unwrap();
        assert_eq!(
            a_records(&Message::from_vec(&buf[..n]).unwrap()),
            [Ipv4Addr::new(172, 30, 0, 2)]
        );
    }
}
