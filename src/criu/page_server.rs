//! CRIU's page-server protocol, spoken by supervise itself (CRIU's
//! `criu/page-xfer.c`). Two conversations, each over a connected stream
//! socket handed to CRIU as an inherited descriptor (`ps.fd` of a dump
//! request, `--ps-socket` of `criu lazy-pages`), so no TCP port is ever
//! opened (another user could connect to one and read the job's memory):
//!
//! * **dump** ([`serve_dump`]): CRIU sends each process's (and each shared
//!   memory segment's) page map and page contents while the job is frozen;
//!   supervise writes the `pagemap-*.img` itself and streams the pages into
//!   the store through a [`DumpSink`] instead of `pages-*.img` on disk.
//! * **lazy restore** ([`serve_lazy`]): CRIU's lazy-pages daemon asks for
//!   pages (`PS_IOV_GET`: process, address, count) as the restored job
//!   faults on them, then for all the rest in the background; supervise
//!   answers from the store through a [`PageSource`].
//!
//! Every message starts with a `struct page_server_iov` (32 bytes on
//! x86-64: `u32 cmd` — command in the low 16 bits, `PE_*` flags above —,
//! 4 bytes of padding, `u64 nr_pages`, `u64 vaddr`, `u64 dst_id`).

use std::io::{self, Read, Write};

use super::pagemap::{PAGE_SIZE, PE_PARENT, PE_PRESENT};

/// Obsolete add (always present pages).
pub const PS_IOV_ADD: u32 = 1;
/// Obsolete hole (pages in the parent).
pub const PS_IOV_HOLE: u32 = 2;
/// Open a page map without an answer (obsolete).
pub const PS_IOV_OPEN: u32 = 3;
/// Open a page map; the server answers one byte: "has a parent".
pub const PS_IOV_OPEN2: u32 = 4;
/// Does the parent image hold this map? (answer: an `int`).
pub const PS_IOV_PARENT: u32 = 5;
/// Add a page map entry with flags; present pages follow.
pub const PS_IOV_ADD_F: u32 = 6;
/// Lazy restore: send me these pages.
pub const PS_IOV_GET: u32 = 7;
/// End of the conversation (answer: an `int` status).
pub const PS_IOV_CLOSE: u32 = 0x1023;
/// End of the conversation on an inherited socket (answer: an `int`).
pub const PS_IOV_FORCE_CLOSE: u32 = 0x1024;

const PS_CMD_BITS: u32 = 16;
const PS_TYPE_BITS: u32 = 8;
/// Size of one `page_server_iov` on the wire.
pub const IOV_LEN: usize = 32;

/// What a page map belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapKind {
    /// A process (`pagemap-<pid>.img`).
    Pid,
    /// A shared memory segment (`pagemap-shmem-<id>.img`).
    Shmem,
}

impl MapKind {
    /// The image name of a page map of this kind.
    pub fn pagemap_name(self, id: u64) -> String {
        match self {
            MapKind::Pid => format!("pagemap-{id}.img"),
            MapKind::Shmem => format!("pagemap-shmem-{id}.img"),
        }
    }
}

/// Decodes a `dst_id` (`id << 8 | type`, with the type numbers older CRIUs
/// used, as `decode_pm` accepts them).
pub fn decode_dst(dst_id: u64) -> Option<(MapKind, u64)> {
    let id = dst_id >> PS_TYPE_BITS;
    match dst_id & 0xff {
        1 | 10 | 11 | 16 | 17 => Some((MapKind::Pid, id)),
        2 | 27 | 28 | 29 | 32 | 33 | 34 => Some((MapKind::Shmem, id)),
        _ => None,
    }
}

/// Encodes a `dst_id`.
pub fn encode_dst(kind: MapKind, id: u64) -> u64 {
    id << PS_TYPE_BITS
        | match kind {
            MapKind::Pid => 1,
            MapKind::Shmem => 2,
        }
}

/// One `struct page_server_iov`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Iov {
    /// Command (low 16 bits of `cmd`).
    pub cmd: u32,
    /// `PE_*` flags (high 16 bits of `cmd`).
    pub flags: u32,
    /// Page count.
    pub nr_pages: u64,
    /// First address.
    pub vaddr: u64,
    /// Destination: an encoded page map (dump) or a pid (lazy restore).
    pub dst_id: u64,
}

impl Iov {
    /// Wire form.
    pub fn encode(&self) -> [u8; IOV_LEN] {
        let mut b = [0u8; IOV_LEN];
        let cmd = self.flags << PS_CMD_BITS | self.cmd;
        b[0..4].copy_from_slice(&cmd.to_le_bytes());
        b[8..16].copy_from_slice(&self.nr_pages.to_le_bytes());
        b[16..24].copy_from_slice(&self.vaddr.to_le_bytes());
        b[24..32].copy_from_slice(&self.dst_id.to_le_bytes());
        b
    }

    /// From the wire form.
    pub fn decode(b: &[u8; IOV_LEN]) -> Iov {
        let word = |r: std::ops::Range<usize>| u64::from_le_bytes(b[r].try_into().unwrap());
        let cmd = u32::from_le_bytes(b[0..4].try_into().unwrap());
        Iov {
            cmd: cmd & ((1 << PS_CMD_BITS) - 1),
            flags: cmd >> PS_CMD_BITS,
            nr_pages: word(8..16),
            vaddr: word(16..24),
            dst_id: word(24..32),
        }
    }
}

/// Why a page-server conversation failed.
#[derive(Debug, thiserror::Error)]
pub enum PageServerError {
    /// The socket failed or CRIU hung up mid-conversation.
    #[error("page server socket: {0}")]
    Io(#[from] io::Error),
    /// CRIU sent something this server does not speak.
    #[error("page server: {0}")]
    Protocol(String),
    /// Storing received pages failed.
    #[error("storing the dumped pages failed: {0}")]
    Sink(io::Error),
    /// Pages asked for could not be read (missing or damaged).
    #[error("cannot serve pages: {0}")]
    Source(String),
}

/// Receives a dump's page maps and pages (see [`serve_dump`]).
pub trait DumpSink {
    /// A new page map begins (the previous one, if any, is complete).
    fn open(&mut self, kind: MapKind, id: u64) -> io::Result<()>;
    /// One entry of the current page map.
    fn entry(&mut self, vaddr: u64, nr_pages: u64, flags: u32) -> io::Result<()>;
    /// `len` bytes of page contents for the last entry, to be read from
    /// `from` (exactly `len` bytes).
    fn pages(&mut self, from: &mut dyn Read, len: u64) -> io::Result<()>;
    /// The dump sent everything: complete the current page map.
    fn finish(&mut self) -> io::Result<()>;
}

/// What a dump conversation carried.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DumpServed {
    /// Page maps opened.
    pub maps: u64,
    /// Bytes of page contents received.
    pub page_bytes: u64,
}

/// Serves one dump: runs until CRIU closes the conversation
/// (`PS_IOV_CLOSE`/`PS_IOV_FORCE_CLOSE`, answered after the sink has
/// finished, so CRIU's dump succeeds only once every page is stored).
pub fn serve_dump<S: Read + Write>(
    sock: &mut S,
    sink: &mut dyn DumpSink,
) -> Result<DumpServed, PageServerError> {
    let mut served = DumpServed::default();
    let mut open = false;
    loop {
        let mut b = [0u8; IOV_LEN];
        sock.read_exact(&mut b)?;
        let iov = Iov::decode(&b);
        match iov.cmd {
            PS_IOV_OPEN | PS_IOV_OPEN2 => {
                let (kind, id) = decode_dst(iov.dst_id).ok_or_else(|| {
                    PageServerError::Protocol(format!("unknown page map type {:#x}", iov.dst_id))
                })?;
                sink.open(kind, id).map_err(PageServerError::Sink)?;
                open = true;
                served.maps += 1;
                if iov.cmd == PS_IOV_OPEN2 {
                    // No parent: supervise's dumps are always complete.
                    sock.write_all(&[0u8])?;
                }
            }
            PS_IOV_PARENT => sock.write_all(&0i32.to_le_bytes())?,
            PS_IOV_ADD_F | PS_IOV_ADD | PS_IOV_HOLE => {
                if !open {
                    return Err(PageServerError::Protocol(
                        "pages sent before a page map was opened".into(),
                    ));
                }
                let flags = match iov.cmd {
                    PS_IOV_ADD_F => iov.flags,
                    PS_IOV_ADD => PE_PRESENT,
                    _ => PE_PARENT,
                };
                if flags & PE_PARENT != 0 {
                    return Err(PageServerError::Protocol(
                        "CRIU sent pages of a parent image, which supervise never gives it".into(),
                    ));
                }
                sink.entry(iov.vaddr, iov.nr_pages, flags)
                    .map_err(PageServerError::Sink)?;
                if flags & PE_PRESENT != 0 {
                    let len = iov
                        .nr_pages
                        .checked_mul(PAGE_SIZE)
                        .ok_or_else(|| PageServerError::Protocol("page count overflows".into()))?;
                    let mut limited = (&mut *sock).take(len);
                    sink.pages(&mut limited, len).map_err(|e| {
                        if limited.limit() > 0 && e.kind() == io::ErrorKind::UnexpectedEof {
                            PageServerError::Io(e)
                        } else {
                            PageServerError::Sink(e)
                        }
                    })?;
                    served.page_bytes += len;
                }
            }
            PS_IOV_CLOSE | PS_IOV_FORCE_CLOSE => {
                let status: i32 = match sink.finish() {
                    Ok(()) => 0,
                    Err(e) => {
                        // Tell CRIU the dump failed, then report why.
                        let _ = sock.write_all(&(-1i32).to_le_bytes());
                        return Err(PageServerError::Sink(e));
                    }
                };
                sock.write_all(&status.to_le_bytes())?;
                return Ok(served);
            }
            other => {
                return Err(PageServerError::Protocol(format!(
                    "unexpected command {other:#x} during a dump"
                )))
            }
        }
    }
}

/// Gives page contents to a lazy restore (see [`serve_lazy`]).
pub trait PageSource {
    /// Appends to `out` the contents of up to `nr` pages of process `pid`
    /// (as the image names it) from `vaddr` on; returns how many (>= 1).
    /// An error means the pages cannot be given (missing or damaged).
    fn read(&mut self, pid: u64, vaddr: u64, nr: u64, out: &mut Vec<u8>) -> Result<u64, String>;
}

/// How a lazy-restore conversation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LazyEnd {
    /// The daemon transferred everything and said goodbye.
    Done,
    /// The daemon hung up without saying goodbye (it failed or was killed).
    HungUp,
}

/// What a lazy-restore conversation did, and where its time went.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ServeStats {
    /// Requests answered.
    pub requests: u64,
    /// Page bytes sent.
    pub bytes: u64,
    /// Time spent reading pages from the source.
    pub source: std::time::Duration,
    /// Time spent sending answers.
    pub send: std::time::Duration,
}

/// Serves a lazy restore until the daemon closes the conversation,
/// counting into `stats`. On `Err` the socket is
/// left open: the caller must make sure the restored job cannot run on
/// with missing memory (kill it) *before* closing it — once the daemon
/// sees the socket close it exits, and the kernel then fills the job's
/// untransferred pages with zeros.
pub fn serve_lazy<S: Read + Write>(
    sock: &mut S,
    src: &mut dyn PageSource,
    stats: &mut ServeStats,
) -> Result<LazyEnd, PageServerError> {
    let mut buf = Vec::new();
    loop {
        let mut b = [0u8; IOV_LEN];
        match sock.read_exact(&mut b) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(LazyEnd::HungUp),
            Err(e) => return Err(e.into()),
        }
        let iov = Iov::decode(&b);
        match iov.cmd {
            PS_IOV_GET => {
                if iov.nr_pages == 0 {
                    return Err(PageServerError::Protocol("request for 0 pages".into()));
                }
                buf.clear();
                let t = std::time::Instant::now();
                let n = src
                    .read(iov.dst_id, iov.vaddr, iov.nr_pages, &mut buf)
                    .map_err(PageServerError::Source)?;
                stats.source += t.elapsed();
                if n == 0 || n > iov.nr_pages || buf.len() as u64 != n * PAGE_SIZE {
                    return Err(PageServerError::Source(format!(
                        "pages at {:#x} of process {}: the source gave {} bytes for {n} pages",
                        iov.vaddr,
                        iov.dst_id,
                        buf.len()
                    )));
                }
                let reply = Iov {
                    cmd: PS_IOV_ADD_F,
                    flags: PE_PRESENT,
                    nr_pages: n,
                    vaddr: iov.vaddr,
                    dst_id: iov.dst_id,
                };
                let t = std::time::Instant::now();
                sock.write_all(&reply.encode())?;
                sock.write_all(&buf)?;
                stats.send += t.elapsed();
                stats.requests += 1;
                stats.bytes += buf.len() as u64;
            }
            PS_IOV_CLOSE | PS_IOV_FORCE_CLOSE => {
                sock.write_all(&0i32.to_le_bytes())?;
                return Ok(LazyEnd::Done);
            }
            other => {
                return Err(PageServerError::Protocol(format!(
                    "unexpected command {other:#x} during a lazy restore"
                )))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::criu::pagemap::PE_LAZY;
    use std::os::unix::net::UnixStream;

    #[derive(Default)]
    struct Rec {
        log: Vec<String>,
        data: Vec<u8>,
    }

    impl DumpSink for Rec {
        fn open(&mut self, kind: MapKind, id: u64) -> io::Result<()> {
            self.log.push(kind.pagemap_name(id));
            Ok(())
        }
        fn entry(&mut self, vaddr: u64, nr: u64, flags: u32) -> io::Result<()> {
            self.log.push(format!("{vaddr:#x}+{nr}/{flags}"));
            Ok(())
        }
        fn pages(&mut self, from: &mut dyn Read, len: u64) -> io::Result<()> {
            let mut v = vec![0u8; len as usize];
            from.read_exact(&mut v)?;
            self.data.extend(v);
            Ok(())
        }
        fn finish(&mut self) -> io::Result<()> {
            self.log.push("finish".into());
            Ok(())
        }
    }

    fn send(s: &mut UnixStream, cmd: u32, flags: u32, nr: u64, vaddr: u64, dst: u64) {
        let iov = Iov {
            cmd,
            flags,
            nr_pages: nr,
            vaddr,
            dst_id: dst,
        };
        s.write_all(&iov.encode()).unwrap();
    }

    #[test]
    fn iov_wire_form_matches_criu_layout() {
        let iov = Iov {
            cmd: PS_IOV_ADD_F,
            flags: PE_PRESENT | PE_LAZY,
            nr_pages: 3,
            vaddr: 0x7f00_0000_1000,
            dst_id: encode_dst(MapKind::Pid, 42),
        };
        let b = iov.encode();
        assert_eq!(u32::from_le_bytes(b[0..4].try_into().unwrap()), 6 << 16 | 6);
        assert_eq!(&b[4..8], &[0, 0, 0, 0], "padding");
        assert_eq!(Iov::decode(&b), iov);
        assert_eq!(decode_dst(42 << 8 | 1), Some((MapKind::Pid, 42)));
        assert_eq!(decode_dst(5 << 8 | 2), Some((MapKind::Shmem, 5)));
        assert_eq!(decode_dst(5 << 8 | 99), None);
    }

    /// A fake CRIU dump side: open a map, add lazy and eager pages and a
    /// zero-length entry, close; the sink sees it all, CRIU gets status 0.
    #[test]
    fn dump_conversation() {
        let (mut ours, mut criu) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || {
            send(
                &mut criu,
                PS_IOV_OPEN2,
                0,
                0,
                0,
                encode_dst(MapKind::Pid, 7),
            );
            let mut parent = [9u8];
            criu.read_exact(&mut parent).unwrap();
            assert_eq!(parent[0], 0);
            send(&mut criu, PS_IOV_ADD_F, PE_PRESENT | PE_LAZY, 2, 0x1000, 0);
            criu.write_all(&[1u8; 8192]).unwrap();
            send(&mut criu, PS_IOV_ADD_F, PE_LAZY, 5, 0x9000, 0);
            send(
                &mut criu,
                PS_IOV_OPEN2,
                0,
                0,
                0,
                encode_dst(MapKind::Shmem, 3),
            );
            criu.read_exact(&mut parent).unwrap();
            send(&mut criu, PS_IOV_ADD_F, PE_PRESENT, 1, 0, 0);
            criu.write_all(&[2u8; 4096]).unwrap();
            send(&mut criu, PS_IOV_FORCE_CLOSE, 0, 0, 0, 0);
            let mut st = [1u8; 4];
            criu.read_exact(&mut st).unwrap();
            i32::from_le_bytes(st)
        });
        let mut sink = Rec::default();
        let served = serve_dump(&mut ours, &mut sink).unwrap();
        assert_eq!(t.join().unwrap(), 0);
        assert_eq!(
            served,
            DumpServed {
                maps: 2,
                page_bytes: 12288
            }
        );
        assert_eq!(
            sink.log,
            vec![
                "pagemap-7.img",
                "0x1000+2/6",
                "0x9000+5/2",
                "pagemap-shmem-3.img",
                "0x0+1/4",
                "finish"
            ]
        );
        assert_eq!(sink.data.len(), 12288);
        assert!(sink.data[..8192].iter().all(|&b| b == 1));
    }

    #[test]
    fn dump_cut_short_is_an_error() {
        let (mut ours, mut criu) = UnixStream::pair().unwrap();
        send(&mut criu, PS_IOV_OPEN, 0, 0, 0, encode_dst(MapKind::Pid, 1));
        send(&mut criu, PS_IOV_ADD_F, PE_PRESENT, 4, 0x1000, 0);
        criu.write_all(&[0u8; 100]).unwrap();
        drop(criu);
        let err = serve_dump(&mut ours, &mut Rec::default()).unwrap_err();
        assert!(matches!(err, PageServerError::Io(_)), "{err}");
    }

    struct Pattern {
        fail_at: Option<u64>,
    }

    impl PageSource for Pattern {
        fn read(
            &mut self,
            pid: u64,
            vaddr: u64,
            nr: u64,
            out: &mut Vec<u8>,
        ) -> Result<u64, String> {
            if self.fail_at == Some(vaddr) {
                return Err("damaged".into());
            }
            let n = nr.min(2);
            for p in 0..n {
                out.extend(std::iter::repeat_n((pid + (vaddr >> 12) + p) as u8, 4096));
            }
            Ok(n)
        }
    }

    #[test]
    fn lazy_conversation_answers_short_and_says_goodbye() {
        let (mut ours, mut daemon) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || {
            send(&mut daemon, PS_IOV_GET, 0, 5, 0x3000, 9);
            let mut h = [0u8; IOV_LEN];
            daemon.read_exact(&mut h).unwrap();
            let r = Iov::decode(&h);
            assert_eq!(
                (r.cmd, r.flags, r.nr_pages, r.vaddr, r.dst_id),
                (PS_IOV_ADD_F, PE_PRESENT, 2, 0x3000, 9)
            );
            let mut pages = vec![0u8; 8192];
            daemon.read_exact(&mut pages).unwrap();
            assert_eq!(pages[0], 12);
            assert_eq!(pages[4096], 13);
            send(&mut daemon, PS_IOV_FORCE_CLOSE, 0, 0, 0, 0);
            let mut st = [1u8; 4];
            daemon.read_exact(&mut st).unwrap();
            assert_eq!(st, [0; 4]);
        });
        let mut stats = ServeStats::default();
        let end = serve_lazy(&mut ours, &mut Pattern { fail_at: None }, &mut stats).unwrap();
        t.join().unwrap();
        assert_eq!(end, LazyEnd::Done);
        assert_eq!((stats.requests, stats.bytes), (1, 8192));
    }

    #[test]
    fn lazy_source_failure_keeps_the_socket_for_the_caller() {
        let (mut ours, mut daemon) = UnixStream::pair().unwrap();
        send(&mut daemon, PS_IOV_GET, 0, 1, 0x5000, 1);
        let err = serve_lazy(
            &mut ours,
            &mut Pattern {
                fail_at: Some(0x5000),
            },
            &mut ServeStats::default(),
        )
        .unwrap_err();
        assert!(matches!(err, PageServerError::Source(_)), "{err}");
        // Nothing was answered and the socket is still open: the daemon
        // would still be waiting.
        daemon.set_nonblocking(true).unwrap();
        let mut b = [0u8; 1];
        assert_eq!(
            daemon.read(&mut b).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        // A daemon that hangs up is reported as such.
        drop(daemon);
        let end = serve_lazy(
            &mut ours,
            &mut Pattern { fail_at: None },
            &mut ServeStats::default(),
        )
        .unwrap();
        assert_eq!(end, LazyEnd::HungUp);
    }
}
