//! The supervisor loop and its restart policy, driven through a test
//! double of the [`Engine`]: no root, no CRIU, no real process. The image
//! store is real (a temp dir); "dumps" are small files, "processes" are
//! channels the test ends at will.

use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use super::*;
use crate::config::{CriuOptions, LaunchSpec};
use crate::control::{job_channel, JobHandle, Response};
use crate::criu::page_server::{DumpSink, MapKind, PageSource};
use crate::criu::pagemap::{Pagemap, PagemapEntry, PE_LAZY, PE_PRESENT};
use crate::criu::{CriuError, DumpMode, DumpOutcome};
use crate::job::{JobError, Restored};

type Slot = Arc<Mutex<Option<oneshot::Sender<ExitStatus>>>>;

#[derive(Default)]
struct Counts {
    launches: u32,
    dumps: u32,
    restores: u32,
}

/// Launch and restore hand out channel-backed jobs; dump writes one file.
#[derive(Default)]
struct Fake {
    current: Mutex<Option<Slot>>,
    counts: Mutex<Counts>,
    next_pid: Mutex<i32>,
    /// Restores lazily (the fake checks every lazy page through the source).
    lazy: bool,
    /// Restores that were lazy, and the page bytes they read from the source.
    lazy_reads: Mutex<Vec<u64>>,
    /// Whether each dump was streamed.
    streamed: Mutex<Vec<bool>>,
    /// This many restores fail first, as when supervise is out of file
    /// descriptors (EMFILE creating the namespace init).
    restore_emfile: Mutex<u32>,
    /// The dump each restore (attempted) was of.
    restored_from: Mutex<Vec<u32>>,
}

/// The fake job's memory in dump `n`: three lazy pages and one eager page
/// at fixed addresses, each filled with a byte of its own.
const FAKE_MAP: [(u64, u32); 4] = [
    (0x10000, PE_PRESENT | PE_LAZY),
    (0x11000, PE_PRESENT | PE_LAZY),
    (0x12000, PE_PRESENT),
    (0x20000, PE_PRESENT | PE_LAZY),
];

fn fake_page(n: u32, i: usize) -> Vec<u8> {
    vec![(n as u8).wrapping_mul(16) + i as u8; 4096]
}

impl Fake {
    fn job(&self) -> Running {
        let (tx, rx) = oneshot::channel();
        let slot: Slot = Arc::new(Mutex::new(Some(tx)));
        *self.current.lock().unwrap() = Some(slot.clone());
        let mut pid = self.next_pid.lock().unwrap();
        *pid += 1;
        Running::from_channel(
            *pid,
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
    fn die(&self, status: ExitStatus) {
        let slot = self.current.lock().unwrap().clone().expect("a job runs");
        let tx = slot.lock().unwrap().take().expect("still running");
        tx.send(status).unwrap();
    }

    fn counts(&self) -> (u32, u32, u32) {
        let c = self.counts.lock().unwrap();
        (c.launches, c.dumps, c.restores)
    }
}

impl Engine for Fake {
    fn launch(&self, _: &LaunchSpec, _: &InitFiles) -> Result<Running, JobError> {
        self.counts.lock().unwrap().launches += 1;
        Ok(self.job())
    }

    fn dump(
        &self,
        _: i32,
        dir: &Path,
        _: &CriuOptions,
        _: Option<Duration>,
        _: DumpMode,
        on_notify: &mut dyn FnMut(&str) -> bool,
        pages: Option<&mut (dyn DumpSink + Send)>,
    ) -> Result<DumpOutcome, CriuError> {
        let streamed = pages.is_some();
        let n = {
            let mut c = self.counts.lock().unwrap();
            c.dumps += 1;
            c.dumps
        };
        std::fs::write(dir.join("core-1000.img"), format!("dump {n}")).unwrap();
        match pages {
            // As CRIU's page-server dump does: one map, its entries, the pages.
            Some(sink) => {
                sink.open(MapKind::Pid, 1000).unwrap();
                for (i, (vaddr, flags)) in FAKE_MAP.iter().enumerate() {
                    sink.entry(*vaddr, 1, *flags).unwrap();
                    sink.pages(&mut &fake_page(n, i)[..], 4096).unwrap();
                }
                sink.finish().unwrap();
            }
            // As CRIU's dump to disk does (the store's first checkpoint).
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
        self.streamed.lock().unwrap().push(streamed);
        assert!(on_notify("post-dump"));
        Ok(DumpOutcome {
            duration: Duration::from_millis(1),
            stats: None,
            log: String::new(),
        })
    }

    fn restore(
        &self,
        images: &Path,
        _: &CriuOptions,
        _: &InitFiles,
        on_notify: &mut dyn FnMut(&str, i32) -> bool,
        lazy: Option<Box<dyn PageSource + Send>>,
    ) -> Result<Restored, JobError> {
        assert!(images.join("core-1000.img").exists(), "materialised first");
        let core = std::fs::read_to_string(images.join("core-1000.img")).unwrap();
        let n: u32 = core.trim_start_matches("dump ").parse().unwrap();
        self.restored_from.lock().unwrap().push(n);
        {
            let mut e = self.restore_emfile.lock().unwrap();
            if *e > 0 {
                *e -= 1;
                return Err(JobError::Init(std::io::Error::from_raw_os_error(
                    libc::EMFILE,
                )));
            }
        }
        let map = Pagemap::parse(&std::fs::read(images.join("pagemap-1000.img")).unwrap()).unwrap();
        let file = std::fs::read(images.join(format!("pages-{}.img", map.pages_id))).unwrap();
        assert_eq!(file.len(), 4 * 4096);
        // Streamed: the two contiguous lazy runs were written as one entry.
        assert_eq!(map.entries.len(), if n > 1 { 3 } else { 4 }, "{map:?}");
        let mut src = lazy;
        for (i, (vaddr, flags)) in FAKE_MAP.iter().enumerate() {
            let in_file = &file[i * 4096..(i + 1) * 4096];
            match src.as_mut().filter(|_| flags & PE_LAZY != 0) {
                Some(src) => {
                    // Lazy: a hole in the file, the contents from the store.
                    assert!(in_file.iter().all(|&b| b == 0), "lazy page written out");
                    let mut out = Vec::new();
                    assert_eq!(src.read(1000, *vaddr, 1, &mut out), Ok(1));
                    assert_eq!(out, fake_page(n, i));
                    self.lazy_reads.lock().unwrap().push(*vaddr);
                }
                None => assert_eq!(in_file, &fake_page(n, i)[..]),
            }
        }
        assert!(on_notify("post-restore", 0));
        self.counts.lock().unwrap().restores += 1;
        Ok(Restored {
            running: self.job(),
            duration: Duration::from_millis(1),
            criu_restore_us: None,
            lazy: None,
        })
    }

    fn feature_check(&self) -> Result<DumpMode, CriuError> {
        Ok(DumpMode::Full)
    }

    fn lazy_pages(&self) -> Result<bool, CriuError> {
        Ok(self.lazy)
    }
}

struct Harness {
    _dir: tempfile::TempDir,
    fake: Arc<Fake>,
    handle: JobHandle,
    shutdown: watch::Sender<Shutdown>,
    task: tokio::task::JoinHandle<Outcome>,
}

fn reaper() -> Reaper {
    static R: std::sync::OnceLock<Reaper> = std::sync::OnceLock::new();
    R.get_or_init(|| Reaper::install().expect("reaper")).clone()
}

async fn start(restore: &str) -> Harness {
    start_with(restore, Fake::default()).await
}

async fn start_with(restore: &str, fake: Fake) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "command = [\"/bin/true\"]\n[checkpoint]\nevery = \"1h\"\n[files]\nrollback = false\n[restore]\n{restore}\n"
    );
    let cfg = JobConfig::from_str_at(&text, &dir.path().join("job.toml")).unwrap();
    let fake = Arc::new(fake);
    let (handle, port) = job_channel(&cfg.name, cfg.checkpoint.dir.clone());
    let mut sup = Supervisor::new(cfg, reaper(), None).unwrap();
    sup.engine = fake.clone();
    sup.connect(port, Metrics::new());
    let (shutdown, rx) = watch::channel(Shutdown::No);
    let task = tokio::spawn(sup.run(rx));
    let h = Harness {
        _dir: dir,
        fake,
        handle,
        shutdown,
        task,
    };
    h.wait(|s| s.state == JobState::Running).await;
    h
}

impl Harness {
    async fn wait(&self, f: impl Fn(&JobStatus) -> bool) -> JobStatus {
        let mut rx = self.handle.status.clone();
        let s = tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|s| f(s)))
            .await
            .expect("status reached in time")
            .expect("supervisor alive");
        s.clone()
    }

    async fn ask(&self, make: impl FnOnce(oneshot::Sender<Response>) -> Command) -> Response {
        let (tx, rx) = oneshot::channel();
        self.handle.commands.send(make(tx)).await.unwrap();
        rx.await.unwrap()
    }

    async fn checkpoint(&self) {
        let r = self.ask(Command::Checkpoint).await;
        assert!(matches!(r, Response::Checkpoint { .. }), "{r:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_loop_restores_with_backoff_then_gives_up() {
    let h = start("max_restores = 2\nbackoff = \"10ms\"\nbackoff_max = \"1s\"\n").await;
    h.checkpoint().await;
    for n in 1..=2 {
        h.fake.die(ExitStatus::Signal(libc::SIGKILL));
        h.wait(|s| s.restores == n && s.state == JobState::Running)
            .await;
    }
    h.fake.die(ExitStatus::Signal(libc::SIGKILL));
    let outcome = h.task.await.unwrap();
    match outcome {
        Outcome::Failed(r) => assert!(r.contains("job died 3 times"), "{r}"),
        o => panic!("{o:?}"),
    }
    assert_eq!(h.fake.counts(), (1, 1, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_restores_are_not_counted_and_start_resets() {
    let h = start("max_restores = 1\nbackoff = \"0s\"\n").await;
    h.checkpoint().await;
    // Manual restores do not count against max_restores.
    for _ in 0..3 {
        let r = h.ask(|tx| Command::Restore(None, tx)).await;
        assert!(matches!(r, Response::Done { .. }), "{r:?}");
    }
    // One automatic restore is allowed...
    h.fake.die(ExitStatus::Code(3));
    h.wait(|s| s.restores == 4 && s.state == JobState::Running)
        .await;
    // ...stop and start reset the count...
    let r = h.ask(|tx| Command::Stop(false, tx)).await;
    assert!(matches!(r, Response::Done { .. }), "{r:?}");
    h.wait(|s| s.state == JobState::Stopped).await;
    let r = h.ask(Command::Checkpoint).await;
    assert!(matches!(r, Response::Error { ref message } if message.contains("stopped")));
    let r = h.ask(Command::Start).await;
    assert!(matches!(r, Response::Done { .. }), "{r:?}");
    h.wait(|s| s.state == JobState::Running).await;
    h.fake.die(ExitStatus::Code(3));
    h.wait(|s| s.restores == 6 && s.state == JobState::Running)
        .await;
    // ...so only the second death after the start gives up.
    h.fake.die(ExitStatus::Code(3));
    assert!(matches!(h.task.await.unwrap(), Outcome::Failed(_)));
    // One launch; restores: 3 manual, 1 automatic, 1 by start, 1 automatic.
    assert_eq!(h.fake.counts(), (1, 1, 6));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_exit_completes_and_shutdown_checkpoints_then_stops() {
    let h = start("").await;
    h.fake.die(ExitStatus::Code(0));
    assert!(matches!(h.task.await.unwrap(), Outcome::Completed(_)));
    let h = start("").await;
    h.shutdown.send(Shutdown::Configured).unwrap();
    assert_eq!(h.task.await.unwrap(), Outcome::Stopped);
    // The final checkpoint was taken, and the job killed.
    assert_eq!(h.fake.counts(), (1, 1, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detach_all_leaves_the_job_running_without_a_checkpoint() {
    let h = start("").await;
    h.shutdown.send(Shutdown::DetachAll).unwrap();
    assert_eq!(h.task.await.unwrap(), Outcome::Detached);
    // No checkpoint, no kill: one launch and nothing else.
    assert_eq!(h.fake.counts(), (1, 0, 0));
}

/// Streamed checkpoints and lazy restores through the real store: each
/// dump's pages reach the store through the page sink; a lazy restore
/// writes out only the eager page and reads every lazy page, verified,
/// from the store, of the newest checkpoint; `lazy = false` restores
/// eagerly (every page written out).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_checkpoints_restore_lazily_from_the_store() {
    let fake = Fake {
        lazy: true,
        ..Default::default()
    };
    let h = start_with("backoff = \"0s\"\n", fake).await;
    h.checkpoint().await;
    h.checkpoint().await;
    h.fake.die(ExitStatus::Signal(libc::SIGKILL));
    let s = h
        .wait(|s| s.restores == 1 && s.state == JobState::Running)
        .await;
    let r = s.last_restore.expect("restore shown");
    assert_eq!(r.mode, "lazy");
    // The store's first checkpoint is written out by CRIU, later ones are
    // streamed.
    assert_eq!(*h.fake.streamed.lock().unwrap(), vec![false, true]);
    assert_eq!(
        *h.fake.lazy_reads.lock().unwrap(),
        vec![0x10000, 0x11000, 0x20000]
    );
    h.shutdown.send(Shutdown::Configured).unwrap();
    assert_eq!(h.task.await.unwrap(), Outcome::Stopped);

    let h = start_with(
        "lazy = false\nbackoff = \"0s\"\n",
        Fake {
            lazy: true,
            ..Default::default()
        },
    )
    .await;
    h.checkpoint().await;
    h.fake.die(ExitStatus::Signal(libc::SIGKILL));
    let s = h
        .wait(|s| s.restores == 1 && s.state == JobState::Running)
        .await;
    assert_eq!(s.last_restore.unwrap().mode, "eager");
    assert!(h.fake.lazy_reads.lock().unwrap().is_empty());
    h.shutdown.send(Shutdown::Configured).unwrap();
    assert_eq!(h.task.await.unwrap(), Outcome::Stopped);
}

/// A restore that fails for want of a descriptor of supervise's (EMFILE)
/// says nothing about the image: the same, newest image is tried again
/// after a pause; no older image is tried and the command is not started
/// afresh (either would lose the job's work).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_short_of_descriptors_retries_the_newest_image() {
    let fake = Fake {
        restore_emfile: Mutex::new(2),
        ..Default::default()
    };
    let h = start_with("lazy = false\nbackoff = \"0s\"\n", fake).await;
    h.checkpoint().await;
    h.checkpoint().await;
    h.fake.die(ExitStatus::Signal(libc::SIGKILL));
    h.wait(|s| {
        s.last_error
            .as_deref()
            .is_some_and(|e| e.contains("retrying") && e.contains("Too many open files"))
    })
    .await;
    let s = h
        .wait(|s| s.restores == 1 && s.state == JobState::Running)
        .await;
    assert_eq!(
        s.last_restore.unwrap().checkpoint,
        s.last_checkpoint.unwrap().id
    );
    // Three tries, all of the newest dump; one launch (the first start).
    assert_eq!(*h.fake.restored_from.lock().unwrap(), vec![2, 2, 2]);
    assert_eq!(h.fake.counts(), (1, 2, 1));
    h.shutdown.send(Shutdown::Configured).unwrap();
    assert_eq!(h.task.await.unwrap(), Outcome::Stopped);
}
