//! userfaultfd(2), the kernel interface through which supervise is to
//! answer a lazily restored job's page faults itself (issue 26: today
//! CRIU's `lazy-pages` daemon does, one request at a time). This module is
//! the OS layer only: the descriptor, the ioctls (`UFFDIO_API`,
//! `UFFDIO_REGISTER`, `UFFDIO_COPY`, `UFFDIO_ZEROPAGE`, `UFFDIO_WAKE`) and
//! the event records (`struct uffd_msg`: page faults, and the
//! non-cooperative FORK, REMAP, REMOVE and UNMAP events CRIU registers
//! for). The server on top of it is not written yet.
//!
//! libc does not define these; the numbers and layouts are those of
//! `linux/userfaultfd.h` (x86-64 and arm64 alike).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

const UFFDIO: u64 = 0xAA;

const fn iowr(nr: u64, size: u64) -> u64 {
    (3 << 30) | (size << 16) | (UFFDIO << 8) | nr
}
const fn ior(nr: u64, size: u64) -> u64 {
    (2 << 30) | (size << 16) | (UFFDIO << 8) | nr
}

/// `UFFDIO_API`.
pub const UFFDIO_API: u64 = iowr(0x3F, 24);
/// `UFFDIO_REGISTER`.
pub const UFFDIO_REGISTER: u64 = iowr(0x00, 32);
/// `UFFDIO_WAKE`.
pub const UFFDIO_WAKE: u64 = ior(0x02, 16);
/// `UFFDIO_COPY`.
pub const UFFDIO_COPY: u64 = iowr(0x03, 40);
/// `UFFDIO_ZEROPAGE`.
pub const UFFDIO_ZEROPAGE: u64 = iowr(0x04, 32);

/// `UFFD_API`.
const API: u64 = 0xAA;
/// `UFFDIO_REGISTER_MODE_MISSING`.
const MODE_MISSING: u64 = 1;
/// `UFFDIO_COPY_MODE_DONTWAKE` / `UFFDIO_ZEROPAGE_MODE_DONTWAKE`.
const DONTWAKE: u64 = 1;

/// The non-cooperative events CRIU asks for on a restored task's
/// userfaultfd (`UFFD_FEATURE_EVENT_FORK | REMAP | REMOVE | UNMAP`).
pub const NONCOOP_FEATURES: u64 = (1 << 1) | (1 << 2) | (1 << 3) | (1 << 6);

const EVENT_PAGEFAULT: u8 = 0x12;
const EVENT_FORK: u8 = 0x13;
const EVENT_REMAP: u8 = 0x14;
const EVENT_REMOVE: u8 = 0x15;
const EVENT_UNMAP: u8 = 0x16;
/// `UFFD_PAGEFAULT_FLAG_WRITE`.
const FLAG_WRITE: u64 = 1;

/// Size of one `struct uffd_msg`.
pub const MSG_LEN: usize = 32;

/// One event read from a userfaultfd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A thread touched a missing page at `addr` (page-aligned by the
    /// caller if need be) and waits.
    Fault {
        /// The faulting address.
        addr: u64,
        /// A write fault.
        write: bool,
    },
    /// The task forked: the child's userfaultfd, as a descriptor number
    /// now open in the reader.
    Fork {
        /// The new descriptor.
        fd: RawFd,
    },
    /// `mremap` moved `len` bytes from `from` to `to`.
    Remap {
        /// Old start.
        from: u64,
        /// New start.
        to: u64,
        /// Length.
        len: u64,
    },
    /// `madvise(MADV_DONTNEED/REMOVE)` dropped `start..end`.
    Remove {
        /// Start.
        start: u64,
        /// End.
        end: u64,
    },
    /// `munmap` of `start..end`.
    Unmap {
        /// Start.
        start: u64,
        /// End.
        end: u64,
    },
    /// An event this module does not know.
    Other(u8),
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_ne_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Decodes one `struct uffd_msg` (event at byte 0, the argument union
/// from byte 8).
pub fn parse(msg: &[u8; MSG_LEN]) -> Event {
    let a = |i: usize| u64_at(msg, 8 + 8 * i);
    match msg[0] {
        EVENT_PAGEFAULT => Event::Fault {
            addr: a(1),
            write: a(0) & FLAG_WRITE != 0,
        },
        EVENT_FORK => Event::Fork {
            fd: u32::from_ne_bytes(msg[8..12].try_into().expect("4 bytes")) as RawFd,
        },
        EVENT_REMAP => Event::Remap {
            from: a(0),
            to: a(1),
            len: a(2),
        },
        EVENT_REMOVE => Event::Remove {
            start: a(0),
            end: a(1),
        },
        EVENT_UNMAP => Event::Unmap {
            start: a(0),
            end: a(1),
        },
        e => Event::Other(e),
    }
}

/// A userfaultfd.
#[derive(Debug)]
pub struct Uffd(OwnedFd);

/// What a copy or zero-fill did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filled {
    /// The bytes were placed.
    Done,
    /// Something was there already (another copy, or the page was
    /// populated meanwhile): nothing to do.
    Exists,
    /// The mapping changed under the copy (a REMAP/UNMAP/REMOVE event is
    /// pending): read the events, then decide again.
    Changed,
    /// The task is gone (`ESRCH`): nothing to serve.
    Gone,
}

impl Uffd {
    /// A new userfaultfd (close-on-exec, non-blocking) with the API
    /// handshake done, asking for `features`.
    pub fn new(features: u64) -> io::Result<Uffd> {
        // SAFETY: plain syscall; the descriptor is owned on success.
        let fd =
            unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor.
        let u = Uffd(unsafe { OwnedFd::from_raw_fd(fd as RawFd) });
        let mut api = [API, features, 0u64];
        u.ioctl(UFFDIO_API, api.as_mut_ptr().cast())?;
        Ok(u)
    }

    /// A userfaultfd set up elsewhere (CRIU's restorer sends each task's).
    pub fn from_fd(fd: OwnedFd) -> Uffd {
        Uffd(fd)
    }

    fn ioctl(&self, req: u64, arg: *mut libc::c_void) -> io::Result<()> {
        // SAFETY: `arg` points to the struct `req` expects, alive for the
        // call.
        let r = unsafe { libc::ioctl(self.0.as_raw_fd(), req as _, arg) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Registers `start..start+len` of the calling process's memory for
    /// missing-page faults.
    pub fn register_missing(&self, start: u64, len: u64) -> io::Result<()> {
        let mut reg = [start, len, MODE_MISSING, 0u64];
        self.ioctl(UFFDIO_REGISTER, reg.as_mut_ptr().cast())
    }

    /// Runs a fill ioctl; returns the outcome and the bytes placed before
    /// it stopped (all of them when [`Filled::Done`]).
    fn fill(
        &self,
        req: u64,
        args: &mut [u64],
        len: u64,
        result_at: usize,
    ) -> io::Result<(Filled, u64)> {
        let done = |a: &[u64]| (a[result_at] as i64).max(0) as u64;
        match self.ioctl(req, args.as_mut_ptr().cast()) {
            Ok(()) => Ok((Filled::Done, len)),
            Err(e) => match e.raw_os_error() {
                Some(libc::EEXIST) => Ok((Filled::Exists, done(args))),
                Some(libc::EAGAIN) => Ok((Filled::Changed, done(args))),
                Some(libc::ESRCH) => Ok((Filled::Gone, 0)),
                _ => Err(e),
            },
        }
    }

    /// `UFFDIO_COPY`: places `src` (whole pages) at `dst` in the
    /// registered task, waking its waiting threads unless `wake` is false.
    /// Returns the outcome and the bytes placed (a copy stops at the first
    /// page that exists already: [`Filled::Exists`] with the bytes before
    /// it).
    pub fn copy(&self, dst: u64, src: &[u8], wake: bool) -> io::Result<(Filled, u64)> {
        let mode = if wake { 0 } else { DONTWAKE };
        let len = src.len() as u64;
        let mut args = [dst, src.as_ptr() as u64, len, mode, 0u64];
        self.fill(UFFDIO_COPY, &mut args, len, 4)
    }

    /// `UFFDIO_ZEROPAGE`: maps zero pages over `dst..dst+len`.
    pub fn zero(&self, dst: u64, len: u64, wake: bool) -> io::Result<(Filled, u64)> {
        let mode = if wake { 0 } else { DONTWAKE };
        let mut args = [dst, len, mode, 0u64];
        self.fill(UFFDIO_ZEROPAGE, &mut args, len, 3)
    }

    /// `UFFDIO_WAKE`: wakes the threads waiting on `start..start+len`.
    pub fn wake(&self, start: u64, len: u64) -> io::Result<()> {
        let mut r = [start, len];
        self.ioctl(UFFDIO_WAKE, r.as_mut_ptr().cast())
    }

    /// Reads the pending events (none: empty; the descriptor is
    /// non-blocking: poll it for readability first).
    pub fn read_events(&self) -> io::Result<Vec<Event>> {
        let mut buf = [0u8; MSG_LEN * 64];
        // SAFETY: reading into our buffer.
        let n = unsafe { libc::read(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EAGAIN) => Ok(Vec::new()),
                _ => Err(e),
            };
        }
        Ok(buf[..n as usize]
            .chunks_exact(MSG_LEN)
            .map(|m| parse(m.try_into().expect("32 bytes")))
            .collect())
    }

    /// Waits up to `timeout_ms` for events (poll).
    pub fn wait(&self, timeout_ms: i32) -> io::Result<bool> {
        let mut p = libc::pollfd {
            fd: self.0.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut p, 1, timeout_ms) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(r > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(event: u8, args: [u64; 3]) -> [u8; MSG_LEN] {
        let mut m = [0u8; MSG_LEN];
        m[0] = event;
        for (i, a) in args.iter().enumerate() {
            m[8 + 8 * i..16 + 8 * i].copy_from_slice(&a.to_ne_bytes());
        }
        m
    }

    #[test]
    fn ioctl_numbers_are_the_kernels() {
        // From linux/userfaultfd.h on x86-64.
        assert_eq!(UFFDIO_API, 0xC018_AA3F);
        assert_eq!(UFFDIO_REGISTER, 0xC020_AA00);
        assert_eq!(UFFDIO_WAKE, 0x8010_AA02);
        assert_eq!(UFFDIO_COPY, 0xC028_AA03);
        assert_eq!(UFFDIO_ZEROPAGE, 0xC020_AA04);
    }

    #[test]
    fn events_decode() {
        assert_eq!(
            parse(&msg(EVENT_PAGEFAULT, [FLAG_WRITE, 0x7f00_1000, 0])),
            Event::Fault {
                addr: 0x7f00_1000,
                write: true
            }
        );
        assert_eq!(parse(&msg(EVENT_FORK, [9, 0, 0])), Event::Fork { fd: 9 });
        assert_eq!(
            parse(&msg(EVENT_REMAP, [0x1000, 0x9000, 0x2000])),
            Event::Remap {
                from: 0x1000,
                to: 0x9000,
                len: 0x2000
            }
        );
        assert_eq!(
            parse(&msg(EVENT_REMOVE, [0x1000, 0x3000, 0])),
            Event::Remove {
                start: 0x1000,
                end: 0x3000
            }
        );
        assert_eq!(
            parse(&msg(EVENT_UNMAP, [0x1000, 0x3000, 0])),
            Event::Unmap {
                start: 0x1000,
                end: 0x3000
            }
        );
        assert_eq!(parse(&msg(0x77, [0; 3])), Event::Other(0x77));
    }

    /// A thread reads 64 pages nobody has filled; this test answers each
    /// fault with UFFDIO_COPY of a page holding its index (even pages) or
    /// UFFDIO_ZEROPAGE (odd pages), and the thread sees exactly that.
    #[test]
    #[cfg_attr(not(criu), ignore = "needs root (userfaultfd)")]
    fn faults_are_answered_with_copies_and_zero_pages() {
        const PAGES: usize = 64;
        let page = 4096usize;
        let u = Uffd::new(0).expect("userfaultfd (root)");
        // SAFETY: a fresh anonymous private mapping, unmapped at the end.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                PAGES * page,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(base, libc::MAP_FAILED);
        let start = base as u64;
        u.register_missing(start, (PAGES * page) as u64).unwrap();
        let reader = std::thread::spawn(move || {
            (0..PAGES)
                .map(|i| {
                    // SAFETY: inside the mapping; the fault blocks until served.
                    unsafe { std::ptr::read_volatile((start as usize + i * page + 8) as *const u8) }
                })
                .collect::<Vec<u8>>()
        });
        let mut served = 0;
        while served < PAGES {
            assert!(u.wait(5000).unwrap(), "no fault within 5 s");
            for e in u.read_events().unwrap() {
                let Event::Fault { addr, write } = e else {
                    panic!("{e:?}");
                };
                assert!(!write);
                let at = addr & !(page as u64 - 1);
                let i = ((at - start) / page as u64) as usize;
                let r = if i % 2 == 0 {
                    u.copy(at, &vec![i as u8; page], true).unwrap()
                } else {
                    u.zero(at, page as u64, true).unwrap()
                };
                assert!(matches!(r.0, Filled::Done | Filled::Exists), "{r:?}");
                served += 1;
            }
        }
        let seen = reader.join().unwrap();
        for (i, b) in seen.iter().enumerate() {
            assert_eq!(*b, if i % 2 == 0 { i as u8 } else { 0 }, "page {i}");
        }
        // A page already there: EEXIST, reported as such.
        assert_eq!(
            u.copy(start, &vec![1u8; page], true).unwrap(),
            (Filled::Exists, 0)
        );
        // SAFETY: the mapping made above.
        unsafe { libc::munmap(base, PAGES * page) };
    }
}
