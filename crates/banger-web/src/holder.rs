//! Who holds a TCP port: for the log line and `doctor` when the web UI's
//! port is taken.

use std::net::SocketAddr;

/// `"pid N (comm)"` of a process with a socket listening on `addr`'s port
/// (in this network namespace), or the socket's inode when its owner is not
/// ours to see; `None` when nothing listed listens there.
pub fn port_holder(addr: SocketAddr) -> Option<String> {
    let inode = ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .find_map(|table| listening_inode(&table, addr.port()))?;
    let target = format!("socket:[{inode}]");
    for proc in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = proc
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(proc.path().join("fd")) else {
            continue;
        };
        let holds = fds.flatten().any(|fd| {
            std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == target.as_str())
        });
        if holds {
            let comm = std::fs::read_to_string(proc.path().join("comm")).unwrap_or_default();
            return Some(format!("pid {pid} ({})", comm.trim()));
        }
    }
    Some(format!(
        "a socket (inode {inode}) of another user's process"
    ))
}

/// The inode of a listening socket on `port` in a `/proc/net/tcp` table.
fn listening_inode(table: &str, port: u16) -> Option<u64> {
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let local_port = f.get(1)?.rsplit_once(':')?.1;
        // State 0A: LISTEN.
        (u16::from_str_radix(local_port, 16).ok()? == port && *f.get(3)? == "0A")
            .then(|| f.get(9)?.parse().ok())?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_listening_socket_and_its_process() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let held = port_holder(addr).unwrap();
        assert!(
            held.contains(&format!("pid {}", std::process::id())),
            "{held}"
        );
        drop(l);
        assert_eq!(port_holder(addr), None);
    }

    #[test]
    fn reads_proc_net_tcp() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0100007F:1E61 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1\n   1: 0100007F:1E62 0100007F:9999 01 00000000:00000000 00:00000000 00000000     0        0 4343 1\n";
        assert_eq!(listening_inode(table, 7777), Some(4242));
        assert_eq!(listening_inode(table, 7778), None, "not listening");
    }
}
