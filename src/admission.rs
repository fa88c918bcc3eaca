//! Who gets a connection, and for how long: every listener of supervise
//! (the control socket, the metrics endpoint) admits connections through an
//! [`Admission`], so that no local user can exhaust supervise's file
//! descriptors or tasks by opening connections and keeping them open.
//!
//! * **Caps.** At most `max_total` connections at once per listener and at
//!   most `max_per_uid` per peer uid (known from `SO_PEERCRED` for Unix
//!   sockets, from the kernel's socket table through `sock_diag` for
//!   loopback TCP; a peer whose uid cannot be learnt counts as one unknown
//!   user).
//! * **Slow clients are dropped first.** A connection is *pending* until
//!   its request has been read; only pending connections are ever evicted.
//!   When a newcomer finds its uid at its cap, that uid's oldest pending
//!   connection is closed for it; when the listener is full, the oldest
//!   pending connection of the uid holding the most is closed. A newcomer
//!   is refused (closed at once) only when nothing pending can make room.
//! * **Deadlines.** Reading a whole request has one deadline (not one per
//!   read), writing the whole answer another ([`Limits`]); a client that
//!   sends a byte a second is cut off when the request deadline passes.
//!
//! The caps are sized from the descriptor budget ([`crate::fdlimit`]), so
//! that the listeners together never hold more than a fraction of it and
//! checkpoints and restores always find descriptors.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::task::AbortHandle;

/// A peer whose uid is unknown (counted as one user).
pub const UNKNOWN_UID: u32 = u32::MAX;

/// The bounds of one listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections open at once.
    pub max_total: usize,
    /// Connections open at once per peer uid.
    pub max_per_uid: usize,
    /// Time to read a whole request.
    pub request: Duration,
    /// Time to write a whole answer.
    pub reply: Duration,
}

impl Limits {
    /// The control socket: many short requests from a few users.
    pub fn control(fd_budget: u64) -> Limits {
        let total = cap(fd_budget / 16, 16, 256);
        Limits {
            max_total: total,
            max_per_uid: (total / 4).max(4),
            request: Duration::from_secs(5),
            reply: Duration::from_secs(10),
        }
    }

    /// The metrics endpoint: one scraper, now and then.
    pub fn metrics(fd_budget: u64) -> Limits {
        let total = cap(fd_budget / 32, 8, 64);
        Limits {
            max_total: total,
            max_per_uid: (total / 4).max(2),
            request: Duration::from_secs(5),
            reply: Duration::from_secs(10),
        }
    }
}

fn cap(v: u64, lo: usize, hi: usize) -> usize {
    (v as usize).clamp(lo, hi)
}

struct Conn {
    uid: u32,
    since: Instant,
    pending: bool,
    /// Evicted: its task was told to stop, but until that task has been
    /// dropped (its ticket with it) the descriptor is still open.
    evicting: bool,
    abort: Option<AbortHandle>,
}

#[derive(Default)]
struct Table {
    next: u64,
    conns: HashMap<u64, Conn>,
    evicted: u64,
    refused: u64,
}

impl Table {
    /// Connections not being evicted.
    fn live(&self) -> impl Iterator<Item = (&u64, &Conn)> {
        self.conns.iter().filter(|(_, c)| !c.evicting)
    }

    fn count(&self, uid: u32) -> usize {
        self.live().filter(|(_, c)| c.uid == uid).count()
    }

    /// The oldest pending connection of `uid`.
    fn oldest_pending(&self, uid: u32) -> Option<u64> {
        self.live()
            .filter(|(_, c)| c.uid == uid && c.pending)
            .min_by_key(|(id, c)| (c.since, **id))
            .map(|(id, _)| *id)
    }

    /// The uid holding the most connections that has a pending one.
    fn heaviest_with_pending(&self) -> Option<u32> {
        let mut per: HashMap<u32, (usize, bool)> = HashMap::new();
        for (_, c) in self.live() {
            let e = per.entry(c.uid).or_default();
            e.0 += 1;
            e.1 |= c.pending;
        }
        per.into_iter()
            .filter(|(_, (_, p))| *p)
            .max_by_key(|(uid, (n, _))| (*n, *uid))
            .map(|(uid, _)| uid)
    }

    fn evict(&mut self, id: u64) {
        if let Some(c) = self.conns.get_mut(&id) {
            c.evicting = true;
            if let Some(a) = c.abort.take() {
                a.abort();
            }
            self.evicted += 1;
        }
    }
}

/// A listener's table and the signal that a connection has gone.
#[derive(Default)]
struct Shared {
    table: Mutex<Table>,
    gone: tokio::sync::Notify,
}

/// Connection admission for one listener; cheap to clone.
#[derive(Clone)]
pub struct Admission {
    limits: Limits,
    shared: Arc<Shared>,
    what: &'static str,
}

/// A connection's place in its listener; dropping it frees the place.
pub struct Ticket {
    id: u64,
    shared: Arc<Shared>,
}

impl Ticket {
    /// The request has been read: from now on the connection is not
    /// evicted to make room for others.
    pub fn request_read(&self) {
        if let Some(c) = lock(&self.shared.table).conns.get_mut(&self.id) {
            c.pending = false;
        }
    }

    /// This connection's number, for [`Admission::attach`].
    pub fn id(&self) -> u64 {
        self.id
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        lock(&self.shared.table).conns.remove(&self.id);
        self.shared.gone.notify_waiters();
    }
}

fn lock(t: &Mutex<Table>) -> std::sync::MutexGuard<'_, Table> {
    t.lock().unwrap_or_else(|e| e.into_inner())
}

/// Counts of one listener (for tests).
#[cfg(test)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    /// Connections open now.
    pub open: usize,
    /// Pending connections closed to make room, since the start.
    pub evicted: u64,
    /// Newcomers refused, since the start.
    pub refused: u64,
}

impl Admission {
    /// Admission with `limits`; `what` names the listener in logs.
    pub fn new(what: &'static str, limits: Limits) -> Admission {
        Admission {
            limits,
            shared: Arc::default(),
            what,
        }
    }

    /// The listener's limits.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Admits a connection from `uid`, closing slow (pending) connections
    /// to make room where needed; `None`: refused (close it at once).
    pub fn admit(&self, uid: u32) -> Option<Ticket> {
        let mut t = lock(&self.shared.table);
        if t.count(uid) >= self.limits.max_per_uid {
            match t.oldest_pending(uid) {
                Some(id) => t.evict(id),
                None => {
                    t.refused += 1;
                    self.note_refusal(&t, uid);
                    return None;
                }
            }
        }
        if t.live().count() >= self.limits.max_total {
            match t.heaviest_with_pending().and_then(|u| t.oldest_pending(u)) {
                Some(id) => t.evict(id),
                None => {
                    t.refused += 1;
                    self.note_refusal(&t, uid);
                    return None;
                }
            }
        }
        let id = t.next;
        t.next += 1;
        t.conns.insert(
            id,
            Conn {
                uid,
                since: Instant::now(),
                pending: true,
                evicting: false,
                abort: None,
            },
        );
        Some(Ticket {
            id,
            shared: self.shared.clone(),
        })
    }

    /// Waits until the listener holds fewer than twice its cap of
    /// descriptors, counting connections being evicted (until their tasks
    /// are dropped): call before each `accept`, so that a burst of
    /// newcomers evicting each other never holds more than that.
    pub async fn room(&self) {
        loop {
            let gone = self.shared.gone.notified();
            tokio::pin!(gone);
            gone.as_mut().enable();
            if lock(&self.shared.table).conns.len() < 2 * self.limits.max_total {
                return;
            }
            gone.await;
        }
    }

    fn note_refusal(&self, t: &Table, uid: u32) {
        // One line per power of two refusals: a flood is visible in the
        // log without flooding it.
        if t.refused.is_power_of_two() {
            tracing::warn!(
                listener = self.what,
                uid,
                refused = t.refused,
                open = t.live().count(),
                max_total = self.limits.max_total,
                max_per_uid = self.limits.max_per_uid,
                "connection refused: the listener is full of requests being served"
            );
        }
    }

    /// Registers the task serving connection `id`, so that an eviction
    /// can stop it (a connection already gone is left alone).
    pub fn attach(&self, id: u64, abort: AbortHandle) {
        let mut t = lock(&self.shared.table);
        match t.conns.get_mut(&id) {
            Some(c) if c.evicting => abort.abort(),
            Some(c) => c.abort = Some(abort),
            None => {}
        }
    }

    /// Serves one accepted connection from `uid` on a task of its own
    /// with `serve`, if admitted; a refused connection is dropped (closed)
    /// at once.
    pub fn spawn<C, F, Fut>(&self, conn: C, uid: u32, serve: F)
    where
        C: Send + 'static,
        F: FnOnce(C, Ticket) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let Some(ticket) = self.admit(uid) else {
            return;
        };
        let id = ticket.id();
        let task = tokio::spawn(serve(conn, ticket));
        self.attach(id, task.abort_handle());
    }

    /// Open, evicted and refused connections.
    #[cfg(test)]
    pub fn counts(&self) -> Counts {
        let t = lock(&self.shared.table);
        Counts {
            open: t.live().count(),
            evicted: t.evicted,
            refused: t.refused,
        }
    }
}

/// Failed `accept`s of one listener (out of descriptors, most likely):
/// logged once per power of two so a shortage does not flood the log, and
/// each followed by a short pause (the connection waits in the backlog)
/// rather than a spin.
#[derive(Debug, Default)]
pub struct AcceptErrors {
    count: u64,
}

impl AcceptErrors {
    /// Notes one failed accept on `listener`, then pauses briefly.
    pub async fn note(&mut self, listener: &'static str, e: &std::io::Error) {
        self.count += 1;
        if self.count.is_power_of_two() {
            tracing::warn!(listener, error = %e, failures = self.count, "accept failed; retrying");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The uid owning the loopback TCP socket at `peer` connected to `local`
/// (the client's end of one of our connections), asked of the kernel with
/// an exact `sock_diag` lookup. `None` if it cannot be learnt.
pub fn tcp_peer_uid(local: std::net::SocketAddr, peer: std::net::SocketAddr) -> Option<u32> {
    sock_diag::uid_of(peer, local)
}

mod sock_diag {
    //! One exact `SOCK_DIAG_BY_FAMILY` request over netlink
    //! (linux/inet_diag.h): the socket whose source is `src` and
    //! destination `dst`; the answer's `idiag_uid` is its owner.
    use std::net::{IpAddr, SocketAddr};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    const NLMSG_HDR: usize = 16;
    const REQ_LEN: usize = 56;
    /// Offset of `idiag_uid` in `struct inet_diag_msg`: 4 bytes of
    /// family/state/timer/retrans, the 48-byte sockid, expires, rqueue,
    /// wqueue.
    const UID_AT: usize = 4 + 48 + 12;

    fn put_addr(buf: &mut [u8], ip: IpAddr) {
        match ip {
            IpAddr::V4(v4) => buf[..4].copy_from_slice(&v4.octets()),
            IpAddr::V6(v6) => buf[..16].copy_from_slice(&v6.octets()),
        }
    }

    /// The request bytes (netlink header + `inet_diag_req_v2`).
    pub(super) fn request(src: SocketAddr, dst: SocketAddr) -> Option<Vec<u8>> {
        let family = match (src.ip(), dst.ip()) {
            (IpAddr::V4(_), IpAddr::V4(_)) => libc::AF_INET,
            (IpAddr::V6(_), IpAddr::V6(_)) => libc::AF_INET6,
            _ => return None,
        } as u8;
        let len = NLMSG_HDR + REQ_LEN;
        let mut m = vec![0u8; len];
        m[0..4].copy_from_slice(&(len as u32).to_ne_bytes());
        m[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        m[6..8].copy_from_slice(&(libc::NLM_F_REQUEST as u16).to_ne_bytes());
        m[8..12].copy_from_slice(&1u32.to_ne_bytes());
        let r = &mut m[NLMSG_HDR..];
        r[0] = family;
        r[1] = libc::IPPROTO_TCP as u8;
        // idiag_states: every state.
        r[4..8].copy_from_slice(&u32::MAX.to_ne_bytes());
        // inet_diag_sockid at 8: sport, dport (big-endian), src[16], dst[16],
        // if, cookie[2] (no cookie: ~0).
        r[8..10].copy_from_slice(&src.port().to_be_bytes());
        r[10..12].copy_from_slice(&dst.port().to_be_bytes());
        put_addr(&mut r[12..28], src.ip());
        put_addr(&mut r[28..44], dst.ip());
        r[48..52].copy_from_slice(&u32::MAX.to_ne_bytes());
        r[52..56].copy_from_slice(&u32::MAX.to_ne_bytes());
        Some(m)
    }

    /// The uid in a reply to [`request`], if it is an `inet_diag_msg`.
    pub(super) fn parse(reply: &[u8]) -> Option<u32> {
        if reply.len() < NLMSG_HDR + UID_AT + 4 {
            return None;
        }
        let ty = u16::from_ne_bytes([reply[4], reply[5]]);
        if ty != SOCK_DIAG_BY_FAMILY {
            return None;
        }
        let p = &reply[NLMSG_HDR + UID_AT..NLMSG_HDR + UID_AT + 4];
        Some(u32::from_ne_bytes(p.try_into().ok()?))
    }

    pub(super) fn uid_of(src: SocketAddr, dst: SocketAddr) -> Option<u32> {
        let req = request(src, dst)?;
        // SAFETY: plain socket(2); the result is checked and owned at once.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                libc::NETLINK_SOCK_DIAG,
            )
        };
        if fd < 0 {
            return None;
        }
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let tv = libc::timeval {
            tv_sec: 1,
            tv_usec: 0,
        };
        // SAFETY: a valid timeval of the right size for SO_RCVTIMEO.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const libc::timeval as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        // SAFETY: sending from a buffer we own, of its length.
        let sent = unsafe {
            libc::send(
                fd.as_raw_fd(),
                req.as_ptr() as *const libc::c_void,
                req.len(),
                0,
            )
        };
        if sent != req.len() as isize {
            return None;
        }
        let mut buf = [0u8; 1024];
        // SAFETY: receiving into a buffer we own, of its length.
        let n = unsafe {
            libc::recv(
                fd.as_raw_fd(),
                buf.as_mut_ptr() as *mut libc::c_void,
                buf.len(),
                0,
            )
        };
        if n <= 0 {
            return None;
        }
        parse(&buf[..n as usize])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(total: usize, per_uid: usize) -> Limits {
        Limits {
            max_total: total,
            max_per_uid: per_uid,
            request: Duration::from_secs(1),
            reply: Duration::from_secs(1),
        }
    }

    #[test]
    fn caps_per_uid_evict_that_uids_oldest_pending() {
        let a = Admission::new("test", limits(10, 2));
        let t1 = a.admit(1).unwrap();
        let t2 = a.admit(1).unwrap();
        // uid 1 is at its cap: its oldest pending connection makes room.
        let t3 = a.admit(1).unwrap();
        assert_eq!(a.counts().open, 2);
        assert_eq!(a.counts().evicted, 1);
        assert!(lock(&a.shared.table).conns[&t1.id].evicting);
        // Requests being served are never evicted: with both read, a
        // newcomer of uid 1 is refused.
        t2.request_read();
        t3.request_read();
        assert!(a.admit(1).is_none());
        assert_eq!(a.counts().refused, 1);
        // Another uid is not affected.
        let _t4 = a.admit(2).unwrap();
        drop(t2);
        assert_eq!(a.counts().open, 2);
        drop(t1);
        assert_eq!(a.counts().open, 2, "an evicted ticket frees nothing twice");
    }

    #[test]
    fn a_full_listener_evicts_the_heaviest_uids_oldest_pending() {
        let a = Admission::new("test", limits(4, 3));
        let flood: Vec<Ticket> = (0..3).map(|_| a.admit(65534).unwrap()).collect();
        let root = a.admit(0).unwrap();
        assert_eq!(a.counts().open, 4);
        // Full: root's next request evicts the flooder's oldest, not root's.
        let root2 = a.admit(0).unwrap();
        assert!(lock(&a.shared.table).conns[&flood[0].id].evicting);
        assert!(lock(&a.shared.table).conns.contains_key(&root.id));
        assert!(lock(&a.shared.table).conns.contains_key(&root2.id));
        assert_eq!(a.counts().open, 4);
    }

    #[tokio::test]
    async fn eviction_aborts_the_serving_task() {
        let a = Admission::new("test", limits(1, 1));
        let t = a.admit(7).unwrap();
        let id = t.id();
        let task = tokio::spawn(async move {
            let _t = t;
            std::future::pending::<()>().await
        });
        a.attach(id, task.abort_handle());
        let _t2 = a.admit(7).unwrap();
        let r = task.await;
        assert!(r.unwrap_err().is_cancelled());
        assert_eq!(a.counts().open, 1);
    }

    #[tokio::test]
    async fn no_accept_while_evicted_connections_still_hold_descriptors() {
        let a = Admission::new("test", limits(1, 1));
        let t1 = a.admit(7).unwrap();
        a.room().await;
        let t2 = a.admit(7).unwrap();
        // t1 is evicted but not yet gone: two descriptors for a cap of one.
        assert_eq!(a.counts().open, 1);
        let waiting = tokio::spawn({
            let a = a.clone();
            async move { a.room().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        drop(t1);
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("room once the evicted connection is gone")
            .unwrap();
        drop(t2);
    }

    #[test]
    fn limits_follow_the_descriptor_budget() {
        assert_eq!(Limits::control(1024).max_total, 64);
        assert_eq!(Limits::control(1 << 20).max_total, 256);
        assert_eq!(Limits::control(64).max_total, 16);
        assert_eq!(Limits::metrics(1024).max_total, 32);
        assert_eq!(Limits::metrics(100).max_total, 8);
        assert!(Limits::metrics(100).max_per_uid >= 2);
    }

    #[test]
    fn sock_diag_request_layout() {
        let src: std::net::SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let dst: std::net::SocketAddr = "127.0.0.1:9464".parse().unwrap();
        let r = sock_diag::request(src, dst).unwrap();
        assert_eq!(r.len(), 72);
        assert_eq!(u32::from_ne_bytes(r[0..4].try_into().unwrap()), 72);
        assert_eq!(r[16], libc::AF_INET as u8);
        assert_eq!(&r[24..26], &40000u16.to_be_bytes());
        assert_eq!(&r[26..28], &9464u16.to_be_bytes());
        assert_eq!(&r[28..32], &[127, 0, 0, 1]);
        assert_eq!(&r[44..48], &[127, 0, 0, 1]);
        let mixed: std::net::SocketAddr = "[::1]:1".parse().unwrap();
        assert!(sock_diag::request(src, mixed).is_none());
    }

    #[test]
    fn the_kernel_names_the_owner_of_a_loopback_connection() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, peer) = l.accept().unwrap();
        let uid = tcp_peer_uid(s.local_addr().unwrap(), peer);
        assert_eq!(uid, Some(nix::unistd::geteuid().as_raw()));
        drop(c);
    }
}
