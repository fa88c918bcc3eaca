//! The TCP connections of a job's process tree, read from `/proc` before
//! a dump: CRIU dumps a connected TCP socket only with `tcp_established`
//! (TCP repair mode), which a job whose connections all run *inside* its
//! own tree (an MPI program and its helper over loopback) should not have
//! to know about. When every connection has both ends in the tree, the
//! dump takes them as established without the key (nothing outside the
//! job can be hurt: both ends stop and come back together); a connection
//! to a peer outside the tree still needs the key, and the checkpoint's
//! error names that connection and the key.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::process::{Command, Stdio};

/// Written into a checkpoint's image: the job's connections at the dump,
/// so that a restore can clear what is left of them in the kernel.
pub const IMAGE_FILE: &str = "supervise-tcp.json";

/// `/proc/net/tcp` state of a listening socket.
const LISTEN: u8 = 0x0A;
/// `/proc/net/tcp` state of a closed socket (no peer).
const CLOSE: u8 = 0x07;

/// One line of `/proc/<pid>/net/tcp` or `tcp6`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Local address and port.
    pub local: SocketAddr,
    /// Peer address and port.
    pub peer: SocketAddr,
    /// The kernel's TCP state (`01` established, `0A` listening, ...).
    pub state: u8,
    /// The socket's inode (0 for sockets no process holds, e.g. TIME_WAIT).
    pub inode: u64,
}

/// A connection of the job to a peer outside its tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outside {
    /// The job's end.
    pub local: SocketAddr,
    /// The peer's.
    pub peer: SocketAddr,
    /// A process of the job that holds it.
    pub pid: i32,
}

impl std::fmt::Display for Outside {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} -> {} (process {})", self.local, self.peer, self.pid)
    }
}

/// What the tree's TCP sockets need of a dump.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// No connected TCP socket (listeners at most).
    None,
    /// Connected sockets (local, peer), every one with its peer in the
    /// tree.
    Inside(Vec<(SocketAddr, SocketAddr)>),
    /// Connections to peers outside the tree.
    Outside(Vec<Outside>),
}

fn parse_v4(hex: &str) -> Option<Ipv4Addr> {
    // One 32-bit word in host (little-endian) order.
    let w = u32::from_str_radix(hex, 16).ok()?;
    Some(Ipv4Addr::from(w.to_le_bytes()))
}

fn parse_v6(hex: &str) -> Option<Ipv6Addr> {
    if hex.len() != 32 {
        return None;
    }
    let mut bytes = [0u8; 16];
    for i in 0..4 {
        let w = u32::from_str_radix(&hex[i * 8..i * 8 + 8], 16).ok()?;
        bytes[i * 4..i * 4 + 4].copy_from_slice(&w.to_le_bytes());
    }
    Some(Ipv6Addr::from(bytes))
}

fn parse_addr(s: &str) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let ip = match ip.len() {
        8 => IpAddr::V4(parse_v4(ip)?),
        _ => {
            let v6 = parse_v6(ip)?;
            // An IPv4 peer of a dual-stack socket: compare as IPv4.
            match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6(v6),
            }
        }
    };
    Some(SocketAddr::new(ip, port))
}

/// Parses the text of `/proc/<pid>/net/tcp` or `tcp6` (the header line
/// and malformed lines skipped).
pub fn parse(text: &str) -> Vec<Entry> {
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some(Entry {
                local: parse_addr(f.get(1)?)?,
                peer: parse_addr(f.get(2)?)?,
                state: u8::from_str_radix(f.get(3)?, 16).ok()?,
                inode: f.get(9)?.parse().ok()?,
            })
        })
        .collect()
}

/// Classifies the connected sockets among `entries` that the tree holds
/// (`held`: socket inode -> a pid holding it).
pub fn classify(entries: &[Entry], held: &HashMap<u64, i32>) -> Verdict {
    let ours: Vec<(&Entry, i32)> = entries
        .iter()
        .filter(|e| e.inode != 0 && e.state != LISTEN && e.state != CLOSE)
        .filter_map(|e| held.get(&e.inode).map(|p| (e, *p)))
        .collect();
    if ours.is_empty() {
        return Verdict::None;
    }
    let ends: HashSet<(SocketAddr, SocketAddr)> =
        ours.iter().map(|(e, _)| (e.local, e.peer)).collect();
    let outside: Vec<Outside> = ours
        .iter()
        .filter(|(e, _)| !ends.contains(&(e.peer, e.local)))
        .map(|(e, pid)| Outside {
            local: e.local,
            peer: e.peer,
            pid: *pid,
        })
        .collect();
    if outside.is_empty() {
        Verdict::Inside(ours.iter().map(|(e, _)| (e.local, e.peer)).collect())
    } else {
        Verdict::Outside(outside)
    }
}

/// The socket inodes the processes `pids` hold, each with a pid holding
/// it. Processes that vanish meanwhile are skipped.
fn held_sockets(pids: &[i32]) -> HashMap<u64, i32> {
    let mut out = HashMap::new();
    for &pid in pids {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(target) = std::fs::read_link(fd.path()) else {
                continue;
            };
            let t = target.to_string_lossy();
            if let Some(ino) = t
                .strip_prefix("socket:[")
                .and_then(|r| r.strip_suffix(']'))
                .and_then(|n| n.parse::<u64>().ok())
            {
                out.entry(ino).or_insert(pid);
            }
        }
    }
    out
}

/// Inspects the TCP sockets of the processes `pids` (the job's tree), in
/// every network namespace they are in.
pub fn inspect(pids: &[i32]) -> std::io::Result<Verdict> {
    let held = held_sockets(pids);
    if held.is_empty() {
        return Ok(Verdict::None);
    }
    let mut seen = HashSet::new();
    let mut entries = Vec::new();
    for &pid in pids {
        let Ok(ns) = std::fs::read_link(format!("/proc/{pid}/ns/net")) else {
            continue;
        };
        if !seen.insert(ns) {
            continue;
        }
        for f in ["tcp", "tcp6"] {
            match std::fs::read_to_string(format!("/proc/{pid}/net/{f}")) {
                Ok(t) => entries.extend(parse(&t)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(classify(&entries, &held))
}

/// Records the job's connections in the image directory `dir`.
pub fn record(dir: &Path, connections: &[(SocketAddr, SocketAddr)]) -> std::io::Result<()> {
    let text = serde_json::to_vec(connections).map_err(std::io::Error::other)?;
    crate::fsutil::write_atomic(&dir.join(IMAGE_FILE), &text, 0o600)
}

/// The connections recorded in the image directory `dir` (none if it has
/// no record).
pub fn recorded(dir: &Path) -> Vec<(SocketAddr, SocketAddr)> {
    crate::fsutil::read_limited(&dir.join(IMAGE_FILE), 4 << 20)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// The `ss` filter of the sockets left of a connection of a dead job: the
/// connection's own 4-tuple, from either end, in a state no process holds
/// (TIME_WAIT and the closing states).
fn leftover_filter(local: &SocketAddr, peer: &SocketAddr) -> Vec<String> {
    let mut args: Vec<String> = ["-K", "-tn"].iter().map(|s| s.to_string()).collect();
    for st in [
        "time-wait",
        "fin-wait-1",
        "fin-wait-2",
        "closing",
        "last-ack",
    ] {
        args.push("state".into());
        args.push(st.into());
    }
    args.push(format!("( src {local} and dst {peer} )"));
    args
}

/// The recorded connections that left an orphan socket behind (held by no
/// process: inode 0) in this network namespace's TCP table `entries`.
pub fn orphans(
    recorded: &[(SocketAddr, SocketAddr)],
    entries: &[Entry],
) -> Vec<(SocketAddr, SocketAddr)> {
    recorded
        .iter()
        .filter(|(l, p)| {
            entries
                .iter()
                .any(|e| e.inode == 0 && e.state != LISTEN && e.local == *l && e.peer == *p)
        })
        .copied()
        .collect()
}

/// Before a restore: removes from the kernel what is left of the
/// connections the image recorded (a job killed with a loopback
/// connection leaves its sockets in TIME_WAIT on its own ports, and a
/// listener that did not set `SO_REUSEADDR` cannot be bound again until
/// they expire, a minute later). Only orphans are destroyed (`ss -K`,
/// `SOCK_DESTROY`): a socket with a recorded 4-tuple that no process holds
/// (a 4-tuple names one connection at a time), in a closing state. Returns
/// how many `ss` calls failed (not fatal: the restore says why if it
/// cannot bind).
pub fn clear_leftovers(dir: &Path) -> usize {
    let recorded = recorded(dir);
    if recorded.is_empty() {
        return 0;
    }
    let mut entries = Vec::new();
    for f in ["/proc/net/tcp", "/proc/net/tcp6"] {
        if let Ok(t) = std::fs::read_to_string(f) {
            entries.extend(parse(&t));
        }
    }
    let mut failed = 0;
    for (local, peer) in orphans(&recorded, &entries) {
        let ok = Command::new("ss")
            .args(leftover_filter(&local, &peer))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            failed += 1;
        }
    }
    failed
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:A000 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 100 1 0000000000000000 100 0 0 10 0
   1: 0100007F:A000 0100007F:B000 01 00000000:00000000 00:00000000 00000000     0        0 101 1 0000000000000000 20 4 30 10 -1
   2: 0100007F:B000 0100007F:A000 01 00000000:00000000 00:00000000 00000000     0        0 102 1 0000000000000000 20 4 30 10 -1
   3: 0A00000A:C000 08080808:0050 01 00000000:00000000 00:00000000 00000000     0        0 103 1 0000000000000000 20 4 30 10 -1
   4: 0100007F:A000 0100007F:D000 06 00000000:00000000 03:000016DC 00000000     0        0 0 3 0000000000000000
";

    #[test]
    fn parses_addresses_states_and_inodes() {
        let e = parse(TCP);
        assert_eq!(e.len(), 5);
        assert_eq!(e[0].local, "127.0.0.1:40960".parse().unwrap());
        assert_eq!(e[0].state, LISTEN);
        assert_eq!(e[1].peer, "127.0.0.1:45056".parse().unwrap());
        assert_eq!(e[3].local, "10.0.0.10:49152".parse().unwrap());
        assert_eq!(e[3].peer, "8.8.8.8:80".parse().unwrap());
        assert_eq!(e[4].inode, 0);
        let v6 = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:1F90 0000000000000000FFFF00000100007F:A000 01 00000000:00000000 00:00000000 00000000     0        0 7 1 0000000000000000 20 4 30 10 -1
";
        let e = parse(v6);
        assert_eq!(e[0].local, "[::1]:8080".parse().unwrap());
        assert_eq!(
            e[0].peer,
            "127.0.0.1:40960".parse().unwrap(),
            "IPv4-mapped peers compare as IPv4"
        );
    }

    #[test]
    fn both_ends_in_the_tree_or_a_peer_outside_it() {
        let e = parse(TCP);
        // Nothing held: nothing to do.
        assert_eq!(classify(&e, &HashMap::new()), Verdict::None);
        // A listener only.
        assert_eq!(classify(&e, &HashMap::from([(100, 1)])), Verdict::None);
        // The listener and both ends of the loopback connection.
        let pair = HashMap::from([(100, 1), (101, 1), (102, 2)]);
        let Verdict::Inside(c) = classify(&e, &pair) else {
            panic!()
        };
        assert_eq!(c.len(), 2);
        assert_eq!(c[0], (e[1].local, e[1].peer));
        // One end only: its peer is outside the tree.
        assert_eq!(
            classify(&e, &HashMap::from([(101, 1)])),
            Verdict::Outside(vec![Outside {
                local: "127.0.0.1:40960".parse().unwrap(),
                peer: "127.0.0.1:45056".parse().unwrap(),
                pid: 1,
            }])
        );
        // A connection to another host, besides the pair.
        let mut all = pair.clone();
        all.insert(103, 3);
        let Verdict::Outside(o) = classify(&e, &all) else {
            panic!()
        };
        assert_eq!(o.len(), 1);
        assert_eq!(
            o[0].to_string(),
            "10.0.0.10:49152 -> 8.8.8.8:80 (process 3)"
        );
    }

    #[test]
    fn only_orphans_of_recorded_connections_are_leftovers() {
        let e = parse(TCP);
        let a: SocketAddr = "127.0.0.1:40960".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:53248".parse().unwrap();
        let c: SocketAddr = "127.0.0.1:45056".parse().unwrap();
        // (a, b) is in TIME_WAIT with no owner; (a, c) is held (inode 101).
        assert_eq!(orphans(&[(a, b), (a, c)], &e), vec![(a, b)]);
        assert!(orphans(&[(b, a)], &e).is_empty(), "direction matters");
    }

    #[test]
    fn leftovers_of_a_recorded_connection_are_destroyed() {
        let t = tempfile::tempdir().unwrap();
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        let pair = (s.local_addr().unwrap(), s.peer_addr().unwrap());
        record(t.path(), &[pair]).unwrap();
        assert_eq!(recorded(t.path()), vec![pair]);
        // The accepting side closes first: its end stays in TIME_WAIT on
        // the listener's port, which cannot be bound again without
        // SO_REUSEADDR.
        drop((s, l));
        std::thread::sleep(std::time::Duration::from_millis(50));
        drop(c);
        std::thread::sleep(std::time::Duration::from_millis(50));
        let rebind = || std::net::TcpListener::bind(pair.0);
        if rebind().is_ok() {
            return; // no TIME_WAIT left on this kernel: nothing to show
        }
        assert_eq!(clear_leftovers(t.path()), 0, "ss -K failed");
        rebind().expect("the port is free once the leftovers are gone");
        assert_eq!(
            leftover_filter(&pair.0, &pair.1).last().unwrap(),
            &format!("( src {} and dst {} )", pair.0, pair.1)
        );
    }

    #[test]
    fn this_process_holds_a_loopback_pair() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        let me = std::process::id() as i32;
        // Other tests of this process may hold connections too; ours must
        // be seen, and seen as inside.
        let ours = [c.local_addr().unwrap(), s.local_addr().unwrap()];
        match inspect(&[me]).unwrap() {
            Verdict::Inside(c) => assert!(c.len() >= 2, "{c:?}"),
            Verdict::Outside(o) => assert!(o.iter().all(|x| !ours.contains(&x.local)), "{o:?}"),
            Verdict::None => panic!("the pair was not seen"),
        }
        drop((c, s));
    }
}
