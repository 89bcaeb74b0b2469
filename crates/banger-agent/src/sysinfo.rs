//! `ports` and `stats`: what the guest's /proc says.

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use banger_agent_proto::{
    CpuTimes, DiskStats, ListeningSocket, LoadAverage, MemoryStats, PortsResult, SocketProcess,
    SocketProtocol, Stats,
};

/// A listening socket as /proc/net shows it, before owner lookup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetEntry {
    pub address: IpAddr,
    pub port: u16,
    pub uid: u32,
    pub inode: u64,
}

const TCP_LISTEN: u8 = 0x0A;
const TCP_CLOSE: u8 = 0x07;

fn parse_endpoint(s: &str, v6: bool) -> Option<(IpAddr, u16)> {
    let (addr, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    // The kernel prints each 32-bit word of the address as a native-endian
    // integer: its native bytes are the address bytes in network order.
    let word = |i: usize| -> Option<[u8; 4]> {
        let hex = addr.get(i * 8..i * 8 + 8)?;
        Some(u32::from_str_radix(hex, 16).ok()?.to_ne_bytes())
    };
    let ip = if v6 {
        if addr.len() != 32 {
            return None;
        }
        let mut bytes = [0u8; 16];
        for i in 0..4 {
            bytes[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
        }
        IpAddr::V6(Ipv6Addr::from(bytes))
    } else {
        if addr.len() != 8 {
            return None;
        }
        IpAddr::V4(Ipv4Addr::from(word(0)?))
    };
    Some((ip, port))
}

/// Listening sockets in one `/proc/net/{tcp,tcp6,udp,udp6}` table: TCP in
/// LISTEN state, UDP bound and unconnected.
pub fn parse_proc_net(text: &str, protocol: SocketProtocol, v6: bool) -> Vec<NetEntry> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 {
                return None;
            }
            let (address, port) = parse_endpoint(f[1], v6)?;
            let (_, remote_port) = parse_endpoint(f[2], v6)?;
            let state = u8::from_str_radix(f[3], 16).ok()?;
            let listening = match protocol {
                SocketProtocol::Tcp => state == TCP_LISTEN,
                SocketProtocol::Udp => state == TCP_CLOSE && remote_port == 0,
            };
            listening.then_some(NetEntry {
                address,
                port,
                uid: f[7].parse().ok()?,
                inode: f[9].parse().ok()?,
            })
        })
        .collect()
}

/// The inode in a `/proc/<pid>/fd/<n>` link target `socket:[<inode>]`.
pub fn socket_inode(link: &str) -> Option<u64> {
    link.strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// Which process (lowest pid) holds each of `wanted`.
fn socket_owners(wanted: &HashSet<u64>) -> HashMap<u64, SocketProcess> {
    let mut owners = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return owners;
    };
    let mut pids: Vec<u32> = dir
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    pids.sort_unstable();
    for pid in pids {
        // Processes come and go while we look: skip the ones that vanish.
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.filter_map(Result::ok) {
            let Some(inode) = std::fs::read_link(fd.path())
                .ok()
                .and_then(|l| socket_inode(l.to_str()?))
            else {
                continue;
            };
            if wanted.contains(&inode) && !owners.contains_key(&inode) {
                let name = std::fs::read_to_string(format!("/proc/{pid}/comm"))
                    .map(|s| s.trim_end().to_owned())
                    .unwrap_or_default();
                owners.insert(inode, SocketProcess { pid, name });
            }
        }
        if owners.len() == wanted.len() {
            break;
        }
    }
    owners
}

/// `ports`.
pub fn ports() -> io::Result<PortsResult> {
    let tables = [
        ("/proc/net/tcp", SocketProtocol::Tcp, false),
        ("/proc/net/tcp6", SocketProtocol::Tcp, true),
        ("/proc/net/udp", SocketProtocol::Udp, false),
        ("/proc/net/udp6", SocketProtocol::Udp, true),
    ];
    let mut entries = Vec::new();
    for (path, protocol, v6) in tables {
        match std::fs::read_to_string(path) {
            Ok(text) => entries.extend(
                parse_proc_net(&text, protocol, v6)
                    .into_iter()
                    .map(|e| (protocol, e)),
            ),
            // No IPv6 in this kernel.
            Err(e) if e.kind() == io::ErrorKind::NotFound && v6 => {}
            Err(e) => return Err(e),
        }
    }
    let wanted = entries
        .iter()
        .map(|(_, e)| e.inode)
        .filter(|&i| i != 0)
        .collect();
    let owners = socket_owners(&wanted);
    let sockets = entries
        .into_iter()
        .map(|(protocol, e)| ListeningSocket {
            protocol,
            address: e.address,
            port: e.port,
            uid: e.uid,
            inode: e.inode,
            process: owners.get(&e.inode).cloned(),
        })
        .collect();
    Ok(PortsResult { sockets })
}

/// `/proc/stat`'s aggregate `cpu` line and the number of `cpuN` lines.
pub fn parse_cpu(stat: &str, ticks_per_sec: u64) -> Option<CpuTimes> {
    let mut cpus = 0;
    let mut total = None;
    for line in stat.lines() {
        let mut f = line.split_whitespace();
        match f.next() {
            Some("cpu") => {
                let v: Vec<u64> = f.map_while(|x| x.parse().ok()).collect();
                let get = |i: usize| v.get(i).copied().unwrap_or(0);
                if v.len() < 4 {
                    return None;
                }
                total = Some(CpuTimes {
                    cpus: 0,
                    ticks_per_sec,
                    user: get(0),
                    nice: get(1),
                    system: get(2),
                    idle: get(3),
                    iowait: get(4),
                    irq: get(5),
                    softirq: get(6),
                    steal: get(7),
                });
            }
            Some(name) if name.starts_with("cpu") => cpus += 1,
            _ => {}
        }
    }
    total.map(|t| CpuTimes { cpus, ..t })
}

/// `/proc/meminfo` (values in kB) in bytes.
pub fn parse_meminfo(text: &str) -> Option<MemoryStats> {
    let fields: HashMap<&str, u64> = text
        .lines()
        .filter_map(|line| {
            let (key, rest) = line.split_once(':')?;
            let kb: u64 = rest.split_whitespace().next()?.parse().ok()?;
            Some((key, kb * 1024))
        })
        .collect();
    let get = |k: &str| fields.get(k).copied();
    Some(MemoryStats {
        total_bytes: get("MemTotal")?,
        free_bytes: get("MemFree")?,
        // Kernels before 3.14 lack MemAvailable.
        available_bytes: get("MemAvailable").or(get("MemFree"))?,
        buffers_bytes: get("Buffers").unwrap_or(0),
        cached_bytes: get("Cached").unwrap_or(0),
        swap_total_bytes: get("SwapTotal").unwrap_or(0),
        swap_free_bytes: get("SwapFree").unwrap_or(0),
    })
}

/// `/proc/loadavg`: `0.52 0.58 0.59 2/467 12345`.
pub fn parse_loadavg(text: &str) -> Option<LoadAverage> {
    let f: Vec<&str> = text.split_whitespace().collect();
    let (runnable, processes) = f.get(3)?.split_once('/')?;
    Some(LoadAverage {
        one: f.first()?.parse().ok()?,
        five: f.get(1)?.parse().ok()?,
        fifteen: f.get(2)?.parse().ok()?,
        runnable: runnable.parse().ok()?,
        processes: processes.parse().ok()?,
    })
}

fn malformed(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("cannot parse {what}"))
}

/// Seconds since boot from `/proc/uptime`.
pub fn uptime() -> io::Result<f64> {
    std::fs::read_to_string("/proc/uptime")?
        .split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| malformed("/proc/uptime"))
}

pub fn disk(path: &str) -> io::Result<DiskStats> {
    let st = rustix::fs::statvfs(path)?;
    Ok(DiskStats {
        path: path.to_owned(),
        total_bytes: st.f_blocks * st.f_frsize,
        free_bytes: st.f_bfree * st.f_frsize,
        available_bytes: st.f_bavail * st.f_frsize,
        total_inodes: st.f_files,
        free_inodes: st.f_ffree,
    })
}

/// `stats`.
pub fn stats() -> io::Result<Stats> {
    let read = std::fs::read_to_string;
    let ticks = rustix::param::clock_ticks_per_second();
    Ok(Stats {
        uptime_secs: uptime()?,
        load: parse_loadavg(&read("/proc/loadavg")?).ok_or_else(|| malformed("/proc/loadavg"))?,
        cpu: parse_cpu(&read("/proc/stat")?, ticks).ok_or_else(|| malformed("/proc/stat"))?,
        memory: parse_meminfo(&read("/proc/meminfo")?).ok_or_else(|| malformed("/proc/meminfo"))?,
        disk: disk("/")?,
        work: std::fs::read_to_string("/proc/self/mounts")
            .ok()
            .and_then(|m| crate::work::mount_source(&m, crate::work::HOME))
            .and_then(|_| disk(crate::work::HOME).ok()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:0CEA 00000000:0000 0A 00000000:00000000 00:00000000 00000000   101        0 20189 1 0000000000000000 100 0 0 10 0
   1: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1234 1 0000000000000000 100 0 0 10 0
   2: 0100007F:0CEA 0100007F:A1B2 01 00000000:00000000 00:00000000 00000000     0        0 0 1 0000000000000000 100 0 0 10 0
";

    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 555 1 0000000000000000 100 0 0 10 0
   1: 0000000000000000FFFF00000100A8C0:0050 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 556 1 0000000000000000 100 0 0 10 0
";

    const UDP: &str = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  221: 3500007F:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000   101        0 19000 2 0000000000000000 0
  222: 0100007F:D431 0100007F:0035 01 00000000:00000000 00:00000000 00000000     0        0 19001 2 0000000000000000 0
";

    #[test]
    fn proc_net_tcp() {
        let v = parse_proc_net(TCP, SocketProtocol::Tcp, false);
        assert_eq!(
            v,
            vec![
                NetEntry {
                    address: "127.0.0.1".parse().unwrap(),
                    port: 3306,
                    uid: 101,
                    inode: 20189
                },
                NetEntry {
                    address: "0.0.0.0".parse().unwrap(),
                    port: 22,
                    uid: 0,
                    inode: 1234
                },
            ]
        );
    }

    #[test]
    fn proc_net_tcp6() {
        let v = parse_proc_net(TCP6, SocketProtocol::Tcp, true);
        assert_eq!(v.len(), 2);
        assert_eq!(v[0].address, "::1".parse::<IpAddr>().unwrap());
        assert_eq!((v[0].port, v[0].uid, v[0].inode), (8080, 1000, 555));
        assert_eq!(
            v[1].address,
            "::ffff:192.168.0.1".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn proc_net_udp_only_unconnected() {
        let v = parse_proc_net(UDP, SocketProtocol::Udp, false);
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].address, "127.0.0.53".parse::<IpAddr>().unwrap());
        assert_eq!(v[0].port, 53);
    }

    #[test]
    fn proc_net_garbage_is_skipped() {
        let text = "header\n0: zz:0016 00000000:0000 0A x x x 0 0 1\nshort line\n";
        assert!(parse_proc_net(text, SocketProtocol::Tcp, false).is_empty());
        assert_eq!(socket_inode("socket:[12345]"), Some(12345));
        assert_eq!(socket_inode("pipe:[1]"), None);
        assert_eq!(socket_inode("/dev/null"), None);
    }

    #[test]
    fn cpu_mem_load() {
        let stat = "cpu  10 1 5 100 2 0 3 0 0 0\ncpu0 5 0 2 50 1 0 1 0 0 0\ncpu1 5 1 3 50 1 0 2 0 0 0\nintr 1 2\n";
        let cpu = parse_cpu(stat, 100).unwrap();
        assert_eq!((cpu.cpus, cpu.user, cpu.idle, cpu.softirq), (2, 10, 100, 3));
        assert_eq!(cpu.total(), 121);
        assert_eq!(cpu.busy(), 19);
        assert!(parse_cpu("intr 1\n", 100).is_none());

        let mem = parse_meminfo(
            "MemTotal:        2048 kB\nMemFree:  1024 kB\nMemAvailable: 1536 kB\nCached: 10 kB\nHugePages_Total: 0\n",
        )
        .unwrap();
        assert_eq!(mem.total_bytes, 2048 * 1024);
        assert_eq!(mem.available_bytes, 1536 * 1024);
        assert_eq!(mem.cached_bytes, 10240);
        assert_eq!(mem.swap_total_bytes, 0);
        assert!(parse_meminfo("MemFree: 1 kB\n").is_none());

        let load = parse_loadavg("0.52 0.58 0.59 2/467 12345\n").unwrap();
        assert_eq!(load.one, 0.52);
        assert_eq!((load.runnable, load.processes), (2, 467));
        assert!(parse_loadavg("0.5 0.5").is_none());
    }

    #[test]
    fn live_proc_parses() {
        let s = stats().unwrap();
        assert!(s.cpu.cpus >= 1 && s.memory.total_bytes > 0 && s.disk.total_bytes > 0);
    }
}
