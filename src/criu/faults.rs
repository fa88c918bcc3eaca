//! supervise's own answer to a lazily restored job's page faults (issue
//! 26, part 1: the core, not yet wired into the restore, which still runs
//! CRIU's `lazy-pages` daemon).
//!
//! Given each restored task's userfaultfd and the ranges of its memory the
//! image holds lazily (from `pagemap-<pid>.img`: present, `PE_LAZY`), and a
//! [`PageSource`] reading pages from the store, [`serve`]:
//! * answers faults first: the faulting page and up to [`FAULT_AROUND`]
//!   pages after it that are still missing, by `UFFDIO_COPY`, waking the
//!   waiting thread; an address outside every lazy range gets a zero page;
//! * pushes everything else in the background, [`Config::chunk_pages`] at a
//!   time (≥ 1 MiB per copy), faults jumping the queue between chunks;
//! * follows the job: `UNMAP` and `REMOVE` (munmap, madvise DONTNEED) drop
//!   those ranges from what is still to push (never copying stale pages
//!   into memory the job dropped); `REMAP` moves them; `FORK` adds the
//!   child, which still misses what its parent missed at the fork;
//! * records the pages that faulted (the working set), in order, so that
//!   a later restore can push them first.
//!
//! A page that cannot be read ends the serving with an error (the caller
//! kills the job before it runs on with missing memory).

use std::collections::BTreeMap;
use std::os::fd::{FromRawFd, OwnedFd};

use super::page_server::PageSource;
use crate::uffd::{Event, Filled, Uffd};

/// Page size.
pub const PAGE: u64 = 4096;
/// Pages copied at a fault, the faulting one first.
pub const FAULT_AROUND: u64 = 16;

/// Byte ranges `[start, end)`, page-aligned, disjoint.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ranges(BTreeMap<u64, u64>);

impl Ranges {
    /// From (start, end) pairs (merged where they touch).
    pub fn from_pairs(pairs: impl IntoIterator<Item = (u64, u64)>) -> Ranges {
        let mut r = Ranges::default();
        for (a, b) in pairs {
            r.add(a, b);
        }
        r
    }

    /// Adds `[a, b)`.
    pub fn add(&mut self, a: u64, b: u64) {
        if a >= b {
            return;
        }
        let (mut a, mut b) = (a, b);
        let over: Vec<(u64, u64)> = self
            .0
            .range(..=b)
            .filter(|(_, &e)| e >= a)
            .map(|(&s, &e)| (s, e))
            .collect();
        for (s, e) in over {
            self.0.remove(&s);
            a = a.min(s);
            b = b.max(e);
        }
        self.0.insert(a, b);
    }

    /// Removes `[a, b)`.
    pub fn remove(&mut self, a: u64, b: u64) {
        if a >= b {
            return;
        }
        let over: Vec<(u64, u64)> = self
            .0
            .range(..b)
            .filter(|(_, &e)| e > a)
            .map(|(&s, &e)| (s, e))
            .collect();
        for (s, e) in over {
            self.0.remove(&s);
            if s < a {
                self.0.insert(s, a);
            }
            if e > b {
                self.0.insert(b, e);
            }
        }
    }

    /// The range holding `x`, if any.
    pub fn find(&self, x: u64) -> Option<(u64, u64)> {
        let (&s, &e) = self.0.range(..=x).next_back()?;
        (x < e).then_some((s, e))
    }

    /// The first `[a, min(b, a + max))`, if any.
    pub fn first(&self, max: u64) -> Option<(u64, u64)> {
        let (&s, &e) = self.0.iter().next()?;
        Some((s, e.min(s + max)))
    }

    /// Moves what lies in `[from, from + len)` to start at `to`.
    pub fn shift(&mut self, from: u64, to: u64, len: u64) {
        let end = from + len;
        let moved: Vec<(u64, u64)> = self
            .0
            .range(..end)
            .filter(|(_, &e)| e > from)
            .map(|(&s, &e)| (s.max(from), e.min(end)))
            .collect();
        self.remove(from, end);
        for (s, e) in moved {
            self.add(s - from + to, e - from + to);
        }
    }

    /// Total bytes.
    pub fn bytes(&self) -> u64 {
        self.0.iter().map(|(s, e)| e - s).sum()
    }

    /// True if empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// One restored task.
pub struct Task {
    /// The task's PID as the image names it (for the page source).
    pub pid: u64,
    /// Its userfaultfd.
    pub uffd: Uffd,
    /// What the image holds lazily for it.
    pub lazy: Ranges,
}

/// How [`serve`] works.
#[derive(Debug, Clone, Copy)]
pub struct Config {
    /// Pages per background copy.
    pub chunk_pages: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config { chunk_pages: 256 }
    }
}

/// What [`serve`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Faults answered with pages from the image.
    pub faults: u64,
    /// Faults answered with a zero page.
    pub zero_faults: u64,
    /// Bytes copied in.
    pub copied: u64,
    /// Copies made (faults and pushes).
    pub copies: u64,
    /// Children that came by FORK.
    pub forks: u64,
    /// The faulting pages, in order, as (pid, address): the working set.
    pub working_set: Vec<(u64, u64)>,
}

struct Serving {
    pid: u64,
    uffd: Uffd,
    /// Lazy ranges of the image (a fault there gets the image's pages).
    lazy: Ranges,
    /// Still to copy.
    pending: Ranges,
    gone: bool,
}

/// Serves `tasks` until every lazy page is in place (or its task is
/// gone). See the module docs.
pub fn serve(tasks: Vec<Task>, source: &mut dyn PageSource, cfg: Config) -> Result<Stats, String> {
    let mut stats = Stats::default();
    let mut live: Vec<Serving> = tasks
        .into_iter()
        .map(|t| Serving {
            pid: t.pid,
            pending: t.lazy.clone(),
            lazy: t.lazy,
            uffd: t.uffd,
            gone: false,
        })
        .collect();
    let mut buf = Vec::new();
    let mut turn = 0usize;
    loop {
        // Faults (and the job's changes) first, from every task.
        let mut i = 0;
        while i < live.len() {
            let mut born = Vec::new();
            handle_events(&mut live[i], source, &mut stats, &mut buf, &mut born)?;
            live.extend(born);
            i += 1;
        }
        live.retain(|t| !t.gone && !t.pending.is_empty());
        if live.is_empty() {
            return Ok(stats);
        }
        // Then one chunk of one task, in turn.
        turn = (turn + 1) % live.len();
        let t = &mut live[turn];
        if let Some((a, b)) = t.pending.first(cfg.chunk_pages * PAGE) {
            place(t, a, b, source, &mut stats, &mut buf)?;
        }
    }
}

/// Reads and handles the pending events of `t`.
fn handle_events(
    t: &mut Serving,
    source: &mut dyn PageSource,
    stats: &mut Stats,
    buf: &mut Vec<u8>,
    born: &mut Vec<Serving>,
) -> Result<(), String> {
    loop {
        let events = t
            .uffd
            .read_events()
            .map_err(|e| format!("reading the faults of task {}: {e}", t.pid))?;
        if events.is_empty() {
            return Ok(());
        }
        for e in events {
            match e {
                Event::Fault { addr, .. } => {
                    let page = addr & !(PAGE - 1);
                    stats.working_set.push((t.pid, page));
                    match t.pending.find(page) {
                        Some((_, end)) => {
                            let b = end.min(page + FAULT_AROUND * PAGE);
                            stats.faults += 1;
                            place(t, page, b, source, stats, buf)?;
                        }
                        None if t.lazy.find(page).is_some() => {
                            // Copied already (by a push racing the fault):
                            // the thread only needs waking.
                            let _ = t.uffd.wake(page, PAGE);
                        }
                        None => {
                            stats.zero_faults += 1;
                            if let Ok((Filled::Gone, _)) = t.uffd.zero(page, PAGE, true) {
                                t.gone = true;
                            }
                        }
                    }
                }
                Event::Remove { start, end } | Event::Unmap { start, end } => {
                    t.pending.remove(start, end);
                    t.lazy.remove(start, end);
                }
                Event::Remap { from, to, len } => {
                    t.pending.shift(from, to, len);
                    t.lazy.shift(from, to, len);
                }
                Event::Fork { fd } => {
                    stats.forks += 1;
                    // SAFETY: the kernel installed this descriptor for us
                    // with the event.
                    let uffd = Uffd::from_fd(unsafe { OwnedFd::from_raw_fd(fd) });
                    born.push(Serving {
                        pid: t.pid,
                        uffd,
                        lazy: t.lazy.clone(),
                        pending: t.pending.clone(),
                        gone: false,
                    });
                }
                Event::Other(_) => {}
            }
        }
    }
}

/// Copies `[a, b)` of `t` from the source, page runs that exist already
/// skipped; removes it from what is pending.
fn place(
    t: &mut Serving,
    a: u64,
    b: u64,
    source: &mut dyn PageSource,
    stats: &mut Stats,
    buf: &mut Vec<u8>,
) -> Result<(), String> {
    let mut at = a;
    while at < b {
        buf.clear();
        let want = (b - at) / PAGE;
        let got = source
            .read(t.pid, at, want, buf)
            .map_err(|e| format!("page {at:#x} of task {}: {e}", t.pid))?;
        let len = (got * PAGE).min(b - at).min(buf.len() as u64);
        if len == 0 {
            return Err(format!("page {at:#x} of task {}: nothing read", t.pid));
        }
        let mut off = 0u64;
        while off < len {
            let (r, n) = t
                .uffd
                .copy(at + off, &buf[off as usize..len as usize], true)
                .map_err(|e| format!("placing page {:#x} of task {}: {e}", at + off, t.pid))?;
            stats.copies += 1;
            stats.copied += n;
            match r {
                Filled::Done => off = len,
                // The page after the `n` bytes placed is there already.
                Filled::Exists => off += n + PAGE,
                // The mapping is changing: the events say how; what is left
                // of this range is decided again from `pending`.
                Filled::Changed => {
                    t.pending.remove(at, at + off + n);
                    return Ok(());
                }
                Filled::Gone => {
                    t.gone = true;
                    return Ok(());
                }
            }
        }
        t.pending.remove(at, at + len);
        at += len;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_add_remove_shift() {
        let mut r = Ranges::from_pairs([(0, 8192), (8192, 12288), (20480, 24576)]);
        assert_eq!(r.bytes(), 16384);
        assert_eq!(r.find(4096), Some((0, 12288)));
        assert_eq!(r.find(12288), None);
        r.remove(4096, 8192);
        assert_eq!(r.find(0), Some((0, 4096)));
        assert_eq!(r.find(8192), Some((8192, 12288)));
        r.shift(8192, 40960, 16384);
        assert_eq!(r.find(40960), Some((40960, 45056)));
        assert_eq!(r.find(53248), Some((53248, 57344)));
        assert_eq!(r.find(20480), None);
        assert_eq!(r.first(4096), Some((0, 4096)));
        assert_eq!(r.bytes(), 12288);
    }

    /// Pages whose every byte is a function of (pid, page address).
    struct Pattern {
        reads: u64,
        fail_at: Option<u64>,
    }

    fn byte(addr: u64) -> u8 {
        ((addr / PAGE) % 251) as u8 + 1
    }

    impl PageSource for Pattern {
        fn read(
            &mut self,
            _pid: u64,
            vaddr: u64,
            nr: u64,
            out: &mut Vec<u8>,
        ) -> Result<u64, String> {
            self.reads += 1;
            let nr = nr.min(64);
            for i in 0..nr {
                if Some(vaddr + i * PAGE) == self.fail_at {
                    return Err("damaged".into());
                }
                out.extend(std::iter::repeat_n(byte(vaddr + i * PAGE), PAGE as usize));
            }
            Ok(nr)
        }
    }

    /// An anonymous mapping of `pages` pages registered for missing faults
    /// on a new userfaultfd (this process plays the restored task).
    fn registered(pages: u64) -> (Uffd, u64) {
        let u = Uffd::new(crate::uffd::NONCOOP_FEATURES & !(1 << 1)).expect("userfaultfd (root)");
        // SAFETY: a fresh anonymous mapping, unmapped by the test.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                (pages * PAGE) as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(base, libc::MAP_FAILED);
        u.register_missing(base as u64, pages * PAGE).unwrap();
        (u, base as u64)
    }

    /// 4 threads touch pages of four regions while the serving pushes the
    /// rest; meanwhile the job munmaps one region and madvise(DONTNEED)s
    /// another after touching it (both block until the serving has read
    /// the event); a hole in the lazy ranges reads as zeros. Every byte
    /// read is the image's, the dropped region reads as zeros afterwards
    /// (no stale page pushed into it), and nothing fails.
    #[test]
    #[cfg_attr(not(criu), ignore = "needs root (userfaultfd)")]
    fn faults_first_then_the_push_following_unmap_and_dontneed() {
        const PAGES: u64 = 2048; // 8 MiB
        let (u, base) = registered(PAGES);
        let hole = (base + 100 * PAGE, base + 110 * PAGE);
        let unmapped = (base + 1024 * PAGE, base + 1280 * PAGE);
        let dropped = (base + 1280 * PAGE, base + 1536 * PAGE);
        let lazy = Ranges::from_pairs([(base, hole.0), (hole.1, base + PAGES * PAGE)]);
        let skip = move |a: u64| a >= unmapped.0 && a < dropped.1;
        let touchers: Vec<_> = (0..4u64)
            .map(|k| {
                std::thread::spawn(move || {
                    let mut bad = Vec::new();
                    for i in 0..PAGES / 4 {
                        let addr = base + (k * PAGES / 4 + i) * PAGE;
                        if skip(addr) {
                            continue;
                        }
                        // SAFETY: mapped (not in the regions the job drops).
                        let v = unsafe { std::ptr::read_volatile((addr + 17) as *const u8) };
                        let want = if addr >= hole.0 && addr < hole.1 {
                            0
                        } else {
                            byte(addr)
                        };
                        if v != want {
                            bad.push((addr, v, want));
                        }
                    }
                    bad
                })
            })
            .collect();
        let job = std::thread::spawn(move || {
            // SAFETY: our mapping's regions; reads after DONTNEED.
            unsafe {
                assert_eq!(
                    libc::munmap(unmapped.0 as *mut _, (unmapped.1 - unmapped.0) as usize),
                    0
                );
                let first = std::ptr::read_volatile((dropped.0 + 5) as *const u8);
                assert_eq!(first, byte(dropped.0));
                let len = (dropped.1 - dropped.0) as usize;
                assert_eq!(
                    libc::madvise(dropped.0 as *mut _, len, libc::MADV_DONTNEED),
                    0
                );
                (0..len as u64 / PAGE)
                    .map(|i| std::ptr::read_volatile((dropped.0 + i * PAGE) as *const u8))
                    .filter(|&v| v != 0)
                    .count()
            }
        });
        let mut src = Pattern {
            reads: 0,
            fail_at: None,
        };
        let stats = serve(
            vec![Task {
                pid: 1,
                uffd: u,
                lazy,
            }],
            &mut src,
            Config { chunk_pages: 256 },
        )
        .unwrap();
        for t in touchers {
            assert_eq!(t.join().unwrap(), Vec::new());
        }
        assert_eq!(job.join().unwrap(), 0, "stale pages after DONTNEED");
        assert!(stats.copied <= (PAGES - 10) * PAGE, "{stats:?}");
        assert!(stats.copied >= (PAGES - 10 - 512) * PAGE, "{stats:?}");
        assert!(stats.faults >= 1 && !stats.working_set.is_empty());
        // SAFETY: what is left of our mapping.
        unsafe {
            libc::munmap(base as *mut _, (unmapped.0 - base) as usize);
            libc::munmap(
                dropped.0 as *mut _,
                (base + PAGES * PAGE - dropped.0) as usize,
            );
        }
    }

    /// A page the source cannot give ends the serving with an error naming
    /// it.
    #[test]
    #[cfg_attr(not(criu), ignore = "needs root (userfaultfd)")]
    fn an_unreadable_page_is_an_error() {
        let (u, base) = registered(64);
        let mut src = Pattern {
            reads: 0,
            fail_at: Some(base + 40 * PAGE),
        };
        let lazy = Ranges::from_pairs([(base, base + 64 * PAGE)]);
        let err = serve(
            vec![Task {
                pid: 7,
                uffd: u,
                lazy,
            }],
            &mut src,
            Config { chunk_pages: 16 },
        )
        .unwrap_err();
        assert!(err.contains("of task 7: damaged"), "{err}");
        // SAFETY: our mapping.
        unsafe { libc::munmap(base as *mut _, (64 * PAGE) as usize) };
    }
}
