//! The engine's test double: launch, attach, adopt and restore hand out
//! channel-backed jobs the test ends at will; a dump writes one small
//! "core" file and a page map with four pages (streamed through the page
//! sink when asked, as CRIU's page-server dump does). Every call is
//! recorded; failures are injected by count.

use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::oneshot;

use crate::config::LaunchSpec;
use crate::criu::page_server::{DumpSink, MapKind};
use crate::criu::pagemap::{Pagemap, PagemapEntry, PE_LAZY, PE_PRESENT};
use crate::criu::{DumpMode, DumpOutcome};
use crate::files::CaptureSummary;
use crate::job::{InitFiles, JobError, Restored, Running};
use crate::proc::ProcId;
use crate::reaper::ExitStatus;
use crate::supervisor::engine::{DumpRequest, Dumped, Engine, RestoreRequest, RestoredJob};
use crate::supervisor::errors::{CheckpointError, CheckpointStep, RestoreError, RestoreStep};
use crate::supervisor::record::JobRecord;

type Slot = std::sync::Arc<Mutex<Option<oneshot::Sender<ExitStatus>>>>;

/// One call the supervisor made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Call {
    Launch,
    Attach(i32),
    Adopt(i32),
    /// Dump number `n`.
    Dump {
        n: u32,
        streamed: bool,
        rollback: bool,
    },
    /// A restore of dump `from`.
    Restore {
        from: u32,
        lazy: bool,
        rollback: bool,
    },
    /// Survivors killed (their PIDs).
    Kill(Vec<i32>),
}

/// Failures to inject, each the next N times.
#[derive(Default)]
pub(super) struct Faults {
    /// Restores fail for want of a descriptor (EMFILE at the init).
    pub(super) restore_emfile: u32,
    /// CRIU refuses the image.
    pub(super) restore_refused: u32,
    /// A lazy restore's own part fails (before the job runs).
    pub(super) lazy_part: u32,
    /// The files' rollback refuses the image.
    pub(super) rollback: u32,
    /// Recording the job's files at post-dump fails.
    pub(super) capture: u32,
    /// CRIU's dump fails.
    pub(super) dump: u32,
}

fn take(n: &mut u32) -> bool {
    if *n > 0 {
        *n -= 1;
        true
    } else {
        false
    }
}

/// The fake job's memory in dump `n`: three lazy pages and one eager page
/// at fixed addresses, each filled with a byte of its own.
pub(super) const FAKE_MAP: [(u64, u32); 4] = [
    (0x10000, PE_PRESENT | PE_LAZY),
    (0x11000, PE_PRESENT | PE_LAZY),
    (0x12000, PE_PRESENT),
    (0x20000, PE_PRESENT | PE_LAZY),
];

pub(super) fn fake_page(n: u32, i: usize) -> Vec<u8> {
    vec![(n as u8).wrapping_mul(16) + i as u8; 4096]
}

#[derive(Default)]
pub(super) struct Fake {
    pub(super) current: Mutex<Option<Slot>>,
    pub(super) next_pid: Mutex<i32>,
    pub(super) dumps: Mutex<u32>,
    /// Restores lazily (the fake checks every lazy page through the source).
    pub(super) lazy: bool,
    /// The page addresses lazy restores read from the source.
    pub(super) lazy_reads: Mutex<Vec<u64>>,
    /// Every call, in order.
    pub(super) calls: Mutex<Vec<Call>>,
    /// Failures to inject.
    pub(super) faults: Mutex<Faults>,
    /// A process that exists outside supervise: (pid, start time), for
    /// attach and adopt.
    pub(super) outside: Mutex<Option<(i32, u64)>>,
    /// Successful restores.
    pub(super) restores_ok: Mutex<usize>,
}

impl Fake {
    fn job(&self, pid: Option<i32>) -> Running {
        let (tx, rx) = oneshot::channel();
        let slot: Slot = std::sync::Arc::new(Mutex::new(Some(tx)));
        *self.current.lock().unwrap() = Some(slot.clone());
        let pid = pid.unwrap_or_else(|| {
            let mut p = self.next_pid.lock().unwrap();
            *p += 1;
            *p
        });
        Running::from_channel(
            pid,
            1000,
            rx,
            Box::new(move || {
                if let Some(tx) = slot.lock().unwrap().take() {
                    let _ = tx.send(ExitStatus::Signal(libc::SIGKILL));
                }
            }),
        )
    }

    /// The current job dies with `status`.
    pub(super) fn die(&self, status: ExitStatus) {
        let slot = self.current.lock().unwrap().clone().expect("a job runs");
        let tx = slot.lock().unwrap().take().expect("still running");
        tx.send(status).unwrap();
    }

    /// True while the current job has not ended.
    pub(super) fn job_alive(&self) -> bool {
        self.current
            .lock()
            .unwrap()
            .as_ref()
            .is_some_and(|s| s.lock().unwrap().is_some())
    }

    fn record(&self, c: Call) {
        self.calls.lock().unwrap().push(c);
    }

    /// The calls so far.
    pub(super) fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }

    /// (launches, dumps, successful restores).
    pub(super) fn counts(&self) -> (usize, usize, usize) {
        let calls = self.calls();
        let launches = calls.iter().filter(|c| **c == Call::Launch).count();
        let dumps = calls
            .iter()
            .filter(|c| matches!(c, Call::Dump { .. }))
            .count();
        (launches, dumps, *self.restores_ok.lock().unwrap())
    }

    /// The dumps restores were tried from, in order.
    pub(super) fn restored_from(&self) -> Vec<(u32, bool)> {
        self.calls()
            .into_iter()
            .filter_map(|c| match c {
                Call::Restore { from, lazy, .. } => Some((from, lazy)),
                _ => None,
            })
            .collect()
    }
}

impl Engine for Fake {
    async fn launch(&self, _: LaunchSpec, _: InitFiles) -> Result<Running, JobError> {
        self.record(Call::Launch);
        Ok(self.job(None))
    }

    async fn attach(&self, pid: i32, start_time: Option<u64>) -> Result<Running, JobError> {
        self.record(Call::Attach(pid));
        match *self.outside.lock().unwrap() {
            Some((p, t)) if p == pid && start_time.is_none_or(|s| s == t) => {
                Ok(self.job(Some(pid)).with_start_time(t))
            }
            _ => Err(JobError::Start(format!("process {pid} does not exist"))),
        }
    }

    fn still_running(&self, rec: &JobRecord) -> bool {
        *self.outside.lock().unwrap() == Some((rec.host_pid, rec.start_time))
    }

    async fn adopt(&self, rec: JobRecord, _: InitFiles) -> Result<Running, JobError> {
        self.record(Call::Adopt(rec.host_pid));
        Ok(self.job(Some(rec.host_pid)).with_start_time(rec.start_time))
    }

    fn job_memory(&self, _: i32) -> u64 {
        4 * 4096
    }

    async fn dump(&self, mut req: DumpRequest) -> Dumped {
        let n = {
            let mut d = self.dumps.lock().unwrap();
            *d += 1;
            *d
        };
        let streamed = req.pages.is_some();
        let rollback = req.files.rollback;
        self.record(Call::Dump {
            n,
            streamed,
            rollback,
        });
        let failed = |step, m: &str| Dumped {
            result: Err(CheckpointError::failed(step, m)),
            files: None,
            tree: Vec::new(),
            pages: None,
        };
        if take(&mut self.faults.lock().unwrap().dump) {
            return failed(CheckpointStep::Dump, "criu dump failed: injected");
        }
        write_dump(
            &req.dir,
            n,
            req.pages.as_mut().map(|s| s as &mut dyn DumpSink),
        );
        if rollback && take(&mut self.faults.lock().unwrap().capture) {
            return failed(
                CheckpointStep::Capture,
                "cannot record the job's files: injected",
            );
        }
        let outside = *self.outside.lock().unwrap();
        let tree = match outside {
            Some((pid, t)) if req.attached && pid == req.host_pid => {
                vec![ProcId { pid, start_time: t }]
            }
            _ => Vec::new(),
        };
        Dumped {
            result: Ok(DumpOutcome {
                duration: Duration::from_millis(1),
                stats: None,
                log: String::new(),
            }),
            files: rollback.then_some(CaptureSummary {
                files: 1,
                snapshots: 0,
                bytes_copied: 0,
                elapsed: Duration::ZERO,
                ..Default::default()
            }),
            tree,
            pages: req.pages,
        }
    }

    async fn restore(&self, req: RestoreRequest) -> Result<RestoredJob, RestoreError> {
        let images = &req.images;
        assert!(images.join("core-1000.img").exists(), "materialised first");
        let core = std::fs::read_to_string(images.join("core-1000.img")).unwrap();
        let n: u32 = core.trim_start_matches("dump ").parse().unwrap();
        let lazy = req.lazy.is_some();
        self.record(Call::Restore {
            from: n,
            lazy,
            rollback: req.files.rollback,
        });
        {
            let mut f = self.faults.lock().unwrap();
            if req.files.rollback && take(&mut f.rollback) {
                return Err(RestoreError::image(
                    RestoreStep::Rollback,
                    "cannot roll back: injected",
                ));
            }
            if take(&mut f.restore_emfile) {
                let e = JobError::Init(std::io::Error::from_raw_os_error(libc::EMFILE));
                return Err(RestoreError::resource(
                    RestoreStep::CriuRestore,
                    e.to_string(),
                ));
            }
            if take(&mut f.restore_refused) {
                return Err(RestoreError::image(
                    RestoreStep::CriuRestore,
                    "criu restore failed: injected",
                ));
            }
            if lazy && take(&mut f.lazy_part) {
                return Err(RestoreError::image(
                    RestoreStep::Lazy,
                    "lazy restore failed: injected",
                ));
            }
        }
        check_pages(images, n, req.lazy, &self.lazy_reads);
        *self.restores_ok.lock().unwrap() += 1;
        Ok(RestoredJob {
            restored: Restored {
                running: self.job(None),
                duration: Duration::from_millis(1),
                criu_restore_us: None,
                lazy: None,
            },
            actions: Vec::new(),
        })
    }

    async fn kill_survivors(&self, ids: Vec<ProcId>) -> Vec<i32> {
        let pids: Vec<i32> = ids.iter().map(|i| i.pid).collect();
        self.record(Call::Kill(pids.clone()));
        let mut outside = self.outside.lock().unwrap();
        if outside.is_some_and(|(p, _)| pids.contains(&p)) {
            *outside = None;
        }
        pids
    }

    async fn dump_mode(&self) -> DumpMode {
        DumpMode::Full
    }

    async fn lazy_pages(&self) -> bool {
        self.lazy
    }
}

/// Dump `n` into `dir`: a core file, and the pages through `sink` (one
/// map, its entries, the pages, as CRIU's page-server dump does) or, like
/// CRIU's dump to disk, as a page map and a pages file.
fn write_dump(dir: &Path, n: u32, sink: Option<&mut dyn DumpSink>) {
    std::fs::write(dir.join("core-1000.img"), format!("dump {n}")).unwrap();
    match sink {
        Some(sink) => {
            sink.open(MapKind::Pid, 1000).unwrap();
            for (i, (vaddr, flags)) in FAKE_MAP.iter().enumerate() {
                sink.entry(*vaddr, 1, *flags).unwrap();
                sink.pages(&mut &fake_page(n, i)[..], 4096).unwrap();
            }
            sink.finish().unwrap();
        }
        None => {
            let map = Pagemap {
                pages_id: 1,
                entries: FAKE_MAP
                    .iter()
                    .map(|(v, f)| PagemapEntry::new(*v, 1, *f))
                    .collect(),
            };
            std::fs::write(dir.join("pagemap-1000.img"), map.encode()).unwrap();
            let pages: Vec<u8> = (0..FAKE_MAP.len()).flat_map(|i| fake_page(n, i)).collect();
            std::fs::write(dir.join("pages-1.img"), pages).unwrap();
        }
    }
}

/// The materialised pages of dump `n`: eager pages in the file, lazy
/// ones (with a source) a hole there and served, verified, by the store.
fn check_pages(
    images: &Path,
    n: u32,
    mut src: Option<Box<dyn crate::criu::page_server::PageSource + Send>>,
    reads: &Mutex<Vec<u64>>,
) {
    let map = Pagemap::parse(&std::fs::read(images.join("pagemap-1000.img")).unwrap()).unwrap();
    let file = std::fs::read(images.join(format!("pages-{}.img", map.pages_id))).unwrap();
    assert_eq!(file.len(), 4 * 4096);
    for (i, (vaddr, flags)) in FAKE_MAP.iter().enumerate() {
        let in_file = &file[i * 4096..(i + 1) * 4096];
        match src.as_mut().filter(|_| flags & PE_LAZY != 0) {
            Some(src) => {
                assert!(in_file.iter().all(|&b| b == 0), "lazy page written out");
                let mut out = Vec::new();
                assert_eq!(src.read(1000, *vaddr, 1, &mut out), Ok(1));
                assert_eq!(out, fake_page(n, i));
                reads.lock().unwrap().push(*vaddr);
            }
            None => assert_eq!(in_file, &fake_page(n, i)[..]),
        }
    }
}
