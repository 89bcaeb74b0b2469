//! `ForwardService`: host → guest TCP port forwards.
//!
//! A forward is durable intent (a `port_forwards` row: bind address, host
//! port, guest port); it carries traffic only while its VM runs. Then one
//! task per forward listens on `bind:host_port` and, per connection, dials
//! `guest_ip:guest_port` and copies both ways. A userspace proxy needs no
//! root and no nftables rule. `VmService` starts a VM's forwards when the
//! VM is running (create, start, adoption at daemon start) and stops them in
//! its teardown (stop, delete, a VMM that died).
//!
//! Locking: `live` is a std mutex held only to insert or take listeners,
//! never across a bind or any other I/O.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use banger_store::{PortForward, Proto, Store, Vm, VmState};
use banger_wire::methods::{PortForwardInfo, PortForwardSpec};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

/// How long dialing the guest may take before the client is dropped.
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections the proxies hold open (each costs two descriptors, which
/// the daemon shares with its RPC socket): a client over a bound is closed
/// at once.
#[derive(Debug, Clone, Copy)]
pub struct ForwardLimits {
    /// Through one forward at once.
    pub per_forward: usize,
    /// Through all forwards at once.
    pub total: usize,
}

impl Default for ForwardLimits {
    fn default() -> Self {
        ForwardLimits {
            per_forward: 256,
            total: 1024,
        }
    }
}

/// Identifies a forward on the host side.
type Key = (IpAddr, u16);

#[derive(Debug)]
pub struct ForwardService {
    store: Arc<Store>,
    limits: ForwardLimits,
    /// Connections through all forwards.
    total: Arc<tokio::sync::Semaphore>,
    /// VM id → its forwards that are (or tried to be) up.
    live: Mutex<HashMap<String, HashMap<Key, Live>>>,
}

#[derive(Debug)]
enum Live {
    /// Listening; aborting the task closes the listener and every connection.
    Up(tokio::task::AbortHandle),
    Failed(String),
}

impl Drop for Live {
    fn drop(&mut self) {
        if let Live::Up(task) = self {
            task.abort();
        }
    }
}

impl ForwardService {
    pub fn new(store: Arc<Store>) -> Self {
        Self::with_limits(store, ForwardLimits::default())
    }

    pub fn with_limits(store: Arc<Store>, limits: ForwardLimits) -> Self {
        ForwardService {
            store,
            limits,
            total: Arc::new(tokio::sync::Semaphore::new(limits.total)),
            live: Mutex::default(),
        }
    }

    /// Check `specs` and turn them into rows for `vm_id`.
    pub fn rows(vm_id: &str, specs: &[PortForwardSpec]) -> Result<Vec<PortForward>, ForwardError> {
        let mut rows: Vec<PortForward> = Vec::with_capacity(specs.len());
        for s in specs {
            let bind = parse_bind(s.bind.as_deref())?;
            if s.host_port == 0 || s.guest_port == 0 {
                return Err(ForwardError::Invalid(format!(
                    "port forward {}:{}: ports are 1-65535",
                    s.host_port, s.guest_port
                )));
            }
            if rows
                .iter()
                .any(|r| r.bind_addr == bind && r.host_port == s.host_port)
            {
                return Err(ForwardError::Invalid(format!(
                    "host port {bind}:{} is given twice",
                    s.host_port
                )));
            }
            rows.push(PortForward {
                vm_id: vm_id.to_string(),
                proto: Proto::Tcp,
                bind_addr: bind,
                host_port: s.host_port,
                guest_port: s.guest_port,
            });
        }
        Ok(rows)
    }

    /// Refuse host ports that another forward records or that something on
    /// this host already listens on, before anything is created.
    pub fn check_free(&self, rows: &[PortForward]) -> Result<(), ForwardError> {
        let recorded = self.store.list_port_forwards()?;
        for r in rows {
            if let Some(other) = recorded
                .iter()
                .find(|o| o.bind_addr == r.bind_addr && o.host_port == r.host_port)
            {
                let holder = self
                    .store
                    .find_vm(&other.vm_id)
                    .map_or_else(|_| other.vm_id.clone(), |v| v.name);
                return Err(ForwardError::Taken(format!(
                    "host port {}:{} is already forwarded to VM {holder:?} (banger vm port-forward remove {holder} {})",
                    r.bind_addr, r.host_port, r.host_port
                )));
            }
            // Bound and closed at once: only asks whether the port is free.
            std::net::TcpListener::bind(SocketAddr::new(r.bind_addr, r.host_port))
                .map_err(|e| bind_error(r, &e))?;
        }
        Ok(())
    }

    /// Record `rows` (already checked) for a VM; started at once if it runs.
    pub async fn add(&self, vm: &Vm, rows: Vec<PortForward>) -> Result<(), ForwardError> {
        self.check_free(&rows)?;
        let mut added = Vec::new();
        for r in &rows {
            if let Err(e) = self.store.add_port_forward(r) {
                for done in &added {
                    self.forget(done);
                }
                return Err(e.into());
            }
            added.push(r.clone());
        }
        if vm.state == VmState::Running {
            for r in rows {
                self.start_one(vm, r).await;
            }
        }
        Ok(())
    }

    /// Stop and delete one forward of `vm`.
    pub fn remove(&self, vm: &Vm, bind: Option<&str>, host_port: u16) -> Result<(), ForwardError> {
        let bind = parse_bind(bind)?;
        self.store
            .remove_port_forward(&vm.id, Proto::Tcp, bind, host_port)?;
        if let Some(m) = self.live.lock().expect("forwards").get_mut(&vm.id) {
            m.remove(&(bind, host_port));
        }
        info!(vm = %vm.id, %bind, host_port, "port forward removed");
        Ok(())
    }

    fn forget(&self, r: &PortForward) {
        let _ = self
            .store
            .remove_port_forward(&r.vm_id, r.proto, r.bind_addr, r.host_port);
    }

    /// Delete every recorded forward of a VM whose create failed (its row
    /// stays as a record and must not keep host ports reserved).
    pub fn forget_vm(&self, vm_id: &str) {
        self.stop_vm(vm_id);
        for r in self.store.port_forwards_for_vm(vm_id).unwrap_or_default() {
            self.forget(&r);
        }
    }

    /// Listen for every recorded forward of a running VM. A port that cannot
    /// be bound is logged and shown as `error` in the list; the VM runs on.
    pub async fn start_vm(&self, vm: &Vm) {
        let rows = match self.store.port_forwards_for_vm(&vm.id) {
            Ok(r) => r,
            Err(e) => {
                warn!(vm = %vm.id, error = %e, "cannot read the VM's port forwards");
                return;
            }
        };
        for r in rows {
            self.start_one(vm, r).await;
        }
    }

    async fn start_one(&self, vm: &Vm, r: PortForward) {
        let key = (r.bind_addr, r.host_port);
        let live = match (vm.guest_ip, r.proto) {
            (None, _) => Live::Failed("the VM has no guest address".into()),
            (_, Proto::Udp) => Live::Failed("only TCP forwards are supported".into()),
            (Some(ip), Proto::Tcp) => {
                match TcpListener::bind(SocketAddr::new(r.bind_addr, r.host_port)).await {
                    Ok(l) => {
                        let to = SocketAddr::new(IpAddr::V4(ip), r.guest_port);
                        info!(vm = %vm.id, from = %SocketAddr::new(r.bind_addr, r.host_port), %to, "port forward listening");
                        let slots = (
                            Arc::new(tokio::sync::Semaphore::new(self.limits.per_forward)),
                            self.total.clone(),
                        );
                        Live::Up(tokio::spawn(proxy(l, to, slots)).abort_handle())
                    }
                    Err(e) => {
                        let msg = bind_error(&r, &e).to_string();
                        warn!(vm = %vm.id, error = %msg, "port forward not started");
                        Live::Failed(msg)
                    }
                }
            }
        };
        self.live
            .lock()
            .expect("forwards")
            .entry(vm.id.clone())
            .or_default()
            .insert(key, live);
    }

    /// Close a VM's listeners and their connections.
    pub fn stop_vm(&self, vm_id: &str) {
        let gone = self.live.lock().expect("forwards").remove(vm_id);
        if gone.is_some_and(|m| !m.is_empty()) {
            info!(vm = %vm_id, "port forwards stopped");
        }
    }

    /// The recorded forwards of one VM (or all), with what is true now.
    pub fn list(&self, vm: Option<&Vm>) -> Result<Vec<PortForwardInfo>, ForwardError> {
        let rows = match vm {
            Some(vm) => self.store.port_forwards_for_vm(&vm.id),
            None => self.store.list_port_forwards(),
        }?;
        let mut names: HashMap<String, String> = HashMap::new();
        if let Some(vm) = vm {
            names.insert(vm.id.clone(), vm.name.clone());
        }
        let live = self.live.lock().expect("forwards");
        Ok(rows
            .into_iter()
            .map(|r| {
                let state = live
                    .get(&r.vm_id)
                    .and_then(|m| m.get(&(r.bind_addr, r.host_port)));
                let (status, error) = match state {
                    Some(Live::Up(_)) => ("active", None),
                    Some(Live::Failed(e)) => ("error", Some(e.clone())),
                    None => ("inactive", None),
                };
                let vm_name = names
                    .entry(r.vm_id.clone())
                    .or_insert_with(|| {
                        self.store
                            .find_vm(&r.vm_id)
                            .map_or_else(|_| r.vm_id.clone(), |v| v.name)
                    })
                    .clone();
                PortForwardInfo {
                    vm: vm_name,
                    proto: r.proto.to_string(),
                    bind: r.bind_addr.to_string(),
                    host_port: r.host_port,
                    guest_port: r.guest_port,
                    status: status.into(),
                    error,
                }
            })
            .collect())
    }
}

fn parse_bind(bind: Option<&str>) -> Result<IpAddr, ForwardError> {
    match bind {
        None => Ok(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        Some(b) => b.parse().map_err(|_| {
            ForwardError::Invalid(format!(
                "bind address {b:?} is not an IP address (e.g. 127.0.0.1 or 0.0.0.0)"
            ))
        }),
    }
}

/// What adding, removing or listing port forwards can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// A spec or bind address that can never work.
    #[error("{0}")]
    Invalid(String),
    /// The host port is forwarded already, or something listens on it.
    #[error("{0}")]
    Taken(String),
    #[error("{0}")]
    CannotListen(String),
    #[error(transparent)]
    Store(#[from] banger_store::StoreError),
}

/// `Taken` for a port in use (naming what holds it when this host says),
/// else why the bind failed.
fn bind_error(r: &PortForward, e: &std::io::Error) -> ForwardError {
    let addr = SocketAddr::new(r.bind_addr, r.host_port);
    match e.kind() {
        std::io::ErrorKind::AddrInUse => {
            let holder = port_holder(r.host_port)
                .map(|h| format!(" by {h}"))
                .unwrap_or_default();
            ForwardError::Taken(format!(
                "host port {addr} is already in use{holder}; pick another host port"
            ))
        }
        std::io::ErrorKind::PermissionDenied => ForwardError::Invalid(format!(
            "cannot listen on {addr}: {e} (ports below 1024 need CAP_NET_BIND_SERVICE; pick a port >= 1024)"
        )),
        std::io::ErrorKind::AddrNotAvailable => ForwardError::Invalid(format!(
            "cannot listen on {addr}: no interface of this host has that address"
        )),
        _ => ForwardError::CannotListen(format!("cannot listen on {addr}: {e}")),
    }
}

/// `name (pid N)` of a process listening on TCP `port`, found through
/// `/proc/net/tcp{,6}` and the socket inodes in `/proc/*/fd` (only the
/// processes this daemon may inspect).
fn port_holder(port: u16) -> Option<String> {
    let inodes: Vec<String> = ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .flat_map(|t| listening_inodes(&t, port))
        .collect();
    if inodes.is_empty() {
        return None;
    }
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(target) = std::fs::read_link(fd.path()) else {
                continue;
            };
            let target = target.to_string_lossy();
            if inodes.iter().any(|i| target == format!("socket:[{i}]")) {
                let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
                return Some(format!("{} (pid {pid})", comm.trim()));
            }
        }
    }
    None
}

/// Socket inodes listening (state 0A) on `port` in /proc/net/tcp text.
fn listening_inodes(text: &str, port: u16) -> Vec<String> {
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let local_port = f.get(1)?.rsplit_once(':')?.1;
            (u16::from_str_radix(local_port, 16).ok()? == port && *f.get(3)? == "0A")
                .then(|| f.get(9).map(|s| s.to_string()))?
        })
        .collect()
}

/// Accept on `listener` forever, proxying each connection to `to`, within
/// the forward's and the service's bounds (`slots`). The connections live
/// in a JoinSet owned by this task: aborting the task closes them all.
async fn proxy(
    listener: TcpListener,
    to: SocketAddr,
    slots: (Arc<tokio::sync::Semaphore>, Arc<tokio::sync::Semaphore>),
) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((client, peer)) => {
                    let (Ok(mine), Ok(all)) = (slots.0.clone().try_acquire_owned(), slots.1.clone().try_acquire_owned()) else {
                        debug!(%peer, %to, "port forward: too many connections; closed");
                        continue;
                    };
                    conns.spawn(async move {
                        let _held = (mine, all);
                        let dialed = tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect(to)).await;
                        let mut guest = match dialed {
                            Ok(Ok(s)) => s,
                            Ok(Err(e)) => {
                                debug!(%peer, %to, error = %e, "port forward: guest refused");
                                return;
                            }
                            Err(_) => {
                                debug!(%peer, %to, "port forward: guest did not answer");
                                return;
                            }
                        };
                        let mut client = client;
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut guest).await;
                    });
                }
                Err(e) => {
                    warn!(error = %e, "port forward accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            // Reap finished connections so the set does not grow.
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use banger_rpc::RpcError;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn spec(bind: Option<&str>, host: u16, guest: u16) -> PortForwardSpec {
        PortForwardSpec {
            bind: bind.map(str::to_string),
            host_port: host,
            guest_port: guest,
        }
    }

    #[test]
    fn rows_from_specs() {
        let rows = ForwardService::rows(
            "vm1",
            &[spec(None, 8080, 80), spec(Some("0.0.0.0"), 8080, 81)],
        )
        .unwrap();
        assert_eq!(rows[0].bind_addr, IpAddr::V4(Ipv4Addr::LOCALHOST));
        assert_eq!(rows[1].bind_addr, IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        assert_eq!((rows[1].host_port, rows[1].guest_port), (8080, 81));
        let dup = ForwardService::rows("vm1", &[spec(None, 1, 2), spec(Some("127.0.0.1"), 1, 3)]);
        assert!(dup.unwrap_err().to_string().contains("twice"));
        let bad = ForwardService::rows("vm1", &[spec(Some("localhost"), 1, 2)]).unwrap_err();
        assert!(bad.to_string().contains("not an IP address"), "{bad}");
        assert!(ForwardService::rows("vm1", &[spec(None, 0, 2)]).is_err());
    }

    #[test]
    fn proc_net_tcp_listeners() {
        let text = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 12345 1 0000000000000000 100 0 0 10 0\n\
   1: 0100007F:1F90 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 999 1 0000000000000000 100 0 0 10 0\n";
        assert_eq!(listening_inodes(text, 8080), ["12345"]);
        assert!(listening_inodes(text, 80).is_empty());
    }

    /// A forward end to end on loopback: a fake guest service, the proxy,
    /// a conflict on a port that is taken, and stop closing the listener.
    #[tokio::test]
    async fn forwards_conflicts_and_stops() {
        let guest_port = fake_guest(|mut s| async move {
            let mut buf = [0u8; 5];
            s.read_exact(&mut buf).await.unwrap();
            s.write_all(b"hello ").await.unwrap();
            s.write_all(&buf).await.unwrap();
        })
        .await;
        let store = Arc::new(Store::open_in_memory().unwrap());
        let fwd = ForwardService::new(store.clone());
        let vm = test_vm(&store);
        let host_port = free_port();
        let rows = ForwardService::rows(&vm.id, &[spec(None, host_port, guest_port)]).unwrap();
        fwd.add(&vm, rows.clone()).await.unwrap();
        let listed = fwd.list(Some(&vm)).unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].status, "active");
        assert_eq!(listed[0].vm, "web");

        let mut c = TcpStream::connect(("127.0.0.1", host_port)).await.unwrap();
        c.write_all(b"world").await.unwrap();
        let mut got = String::new();
        c.read_to_string(&mut got).await.unwrap();
        assert_eq!(got, "hello world");

        // The same host port again: a conflict naming the VM that has it.
        let err = RpcError::from(fwd.add(&vm, rows).await.unwrap_err());
        assert_eq!(err.code, banger_wire::ErrorCode::Conflict);
        assert!(
            err.message.contains(&host_port.to_string()) && err.message.contains("web"),
            "{}",
            err.message
        );
        // A port some other socket holds: a conflict too.
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let taken_port = taken.local_addr().unwrap().port();
        let rows = ForwardService::rows(&vm.id, &[spec(None, taken_port, 1)]).unwrap();
        let err = RpcError::from(fwd.add(&vm, rows).await.unwrap_err());
        assert_eq!(err.code, banger_wire::ErrorCode::Conflict);
        assert!(err.message.contains("already in use"), "{}", err.message);
        assert_eq!(store.port_forwards_for_vm(&vm.id).unwrap().len(), 1);

        fwd.stop_vm(&vm.id);
        assert_eq!(fwd.list(None).unwrap()[0].status, "inactive");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            TcpStream::connect(("127.0.0.1", host_port)).await.is_err(),
            "listener closed"
        );
        fwd.remove(&vm, None, host_port).unwrap();
        assert!(fwd.list(None).unwrap().is_empty());
        assert!(fwd.remove(&vm, None, host_port).is_err());
    }

    /// Clients beyond a forward's bound are closed at once; the others are
    /// served, and a slot comes back when its client goes.
    #[tokio::test]
    async fn connections_are_bounded_per_forward() {
        // A guest that echoes and holds every connection open.
        let guest_port = fake_guest(|mut s| async move {
            let mut buf = [0u8; 1];
            while s.read_exact(&mut buf).await.is_ok() {
                let _ = s.write_all(&buf).await;
            }
        })
        .await;
        let store = Arc::new(Store::open_in_memory().unwrap());
        let fwd = ForwardService::with_limits(
            store.clone(),
            ForwardLimits {
                per_forward: 3,
                total: 100,
            },
        );
        let vm = test_vm(&store);
        let host_port = free_port();
        let rows = ForwardService::rows(&vm.id, &[spec(None, host_port, guest_port)]).unwrap();
        fwd.add(&vm, rows).await.unwrap();
        let echo = |mut c: TcpStream| async move {
            c.write_all(b"x").await?;
            let mut b = [0u8; 1];
            c.read_exact(&mut b).await?;
            Ok::<_, std::io::Error>(c)
        };
        let mut held = Vec::new();
        for _ in 0..3 {
            held.push(
                echo(TcpStream::connect(("127.0.0.1", host_port)).await.unwrap())
                    .await
                    .unwrap(),
            );
        }
        let over = echo(TcpStream::connect(("127.0.0.1", host_port)).await.unwrap()).await;
        assert!(over.is_err(), "a fourth connection was proxied");
        held.pop();
        let served = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let c = TcpStream::connect(("127.0.0.1", host_port)).await.unwrap();
                if echo(c).await.is_ok() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        assert!(served.is_ok(), "the slot was never given back");
        fwd.stop_vm(&vm.id);
    }

    /// A guest service on loopback serving each connection with `serve`;
    /// its port.
    async fn fake_guest<F, Fut>(serve: F) -> u16
    where
        F: Fn(TcpStream) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let guest = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = guest.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((s, _)) = guest.accept().await {
                tokio::spawn(serve(s));
            }
        });
        port
    }

    /// A free host port: bind one and give it back.
    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    fn test_vm(store: &Store) -> Vm {
        let img = banger_store::Image {
            id: "img1".into(),
            name: "img".into(),
            state: banger_store::ImageState::Ready,
            source_kind: banger_store::SourceKind::Recipe,
            source_ref: "debian-12".into(),
            source_digest: None,
            dir: "/nonexistent".into(),
            kernel_path: "/nonexistent/k".into(),
            vmlinux_path: None,
            initrd_path: None,
            rootfs_path: "/nonexistent/r".into(),
            work_seed_path: None,
            manifest: Default::default(),
            size_bytes: 0,
            default_init: banger_store::InitMode::Fast,
            is_default: true,
            created_at: 0,
            last_error: None,
        };
        store.insert_image(&img).unwrap();
        let vm = Vm {
            id: "vm1".into(),
            name: "web".into(),
            image_id: "img1".into(),
            vmm: banger_store::Vmm::Qemu,
            init_mode: banger_store::InitMode::Fast,
            vcpus: 1,
            memory_mib: 128,
            disk_mib: 64,
            state: VmState::Running,
            // The "guest" is this host's loopback.
            guest_ip: Some(Ipv4Addr::LOCALHOST),
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
        store.insert_vm(&vm).unwrap();
        vm
    }
}
