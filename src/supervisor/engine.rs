//! The supervisor's only window on the world (as youki's `Syscall`):
//! everything that touches processes, CRIU or the job's files goes
//! through an [`Engine`]. [`Criu`] (`criu_engine.rs`) is the real thing;
//! the supervisor's own tests drive the loop through a test double that
//! records calls and injects failures, so that attach, adopt, rollback,
//! the Slurm fence, crash loops and resource shortages are tested without
//! root or CRIU.
//!
//! The engine is async-facing: each method does its own blocking (on
//! tokio's blocking pool) and returns when it is done. The image store and
//! the fence are local files the tests use for real; publishing and
//! retention still go through the engine ([`Engine::publish`],
//! [`Engine::retain`], with default implementations), so that a double
//! can fail them.

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use tracing::{info, warn};

use super::errors::{CheckpointError, RestoreError};
use super::record::JobRecord;
use crate::config::{CriuOptions, FilesConfig, LaunchSpec};
use crate::criu::page_server::PageSource;
use crate::criu::{DumpMode, DumpOutcome};
use crate::fence::Fence;
use crate::files::{Action, CaptureSummary};
use crate::job::{InitFiles, JobError, Restored, Running};
use crate::pages::StreamSink;
use crate::proc::ProcId;
use crate::store::{CheckpointMeta, ImageInfo, ImageStore, Staging};

/// What [`Engine::dump`] is asked to do.
pub struct DumpRequest {
    /// The job's root, in supervise's PID namespace.
    pub host_pid: i32,
    /// Where CRIU writes the images.
    pub dir: PathBuf,
    /// CRIU's options.
    pub opts: CriuOptions,
    /// Bound on the dump.
    pub timeout: Option<Duration>,
    /// Full dump, or pre-dump + dump.
    pub mode: DumpMode,
    /// The job's files: with `rollback`, recorded at `post-dump` (the tree
    /// still frozen) into `dir`.
    pub files: FilesConfig,
    /// Directories never recorded (the image and scratch directories).
    pub ignore: Vec<PathBuf>,
    /// An attached job: record its process tree (PIDs and start times).
    pub attached: bool,
    /// Streamed: the page maps and pages go here instead of `dir`.
    pub pages: Option<StreamSink>,
    /// The job's owner: CRIU runs as the owner in the job's user
    /// namespace (`crate::userns`); `None`: root's job.
    pub owner: Option<crate::userns::Owner>,
    /// The watch of the job's directories: the names the job changed are
    /// recorded with the checkpoint too.
    pub tracker: Option<std::sync::Arc<crate::files::Tracker>>,
}

/// What [`Engine::dump`] did.
pub struct Dumped {
    /// CRIU's outcome, or the step that failed ([`CheckpointStep::Dump`]
    /// or [`CheckpointStep::Capture`]); after a failure no task of the job
    /// is left stopped.
    ///
    /// [`CheckpointStep::Dump`]: super::errors::CheckpointStep::Dump
    /// [`CheckpointStep::Capture`]: super::errors::CheckpointStep::Capture
    pub result: Result<DumpOutcome, CheckpointError>,
    /// The job's files as recorded (rollback on).
    pub files: Option<CaptureSummary>,
    /// An attached job's processes at the dump.
    pub tree: Vec<ProcId>,
    /// The page sink, handed back for the commit.
    pub pages: Option<StreamSink>,
}

/// What [`Engine::restore`] is asked to do.
pub struct RestoreRequest {
    /// The materialised image.
    pub images: PathBuf,
    /// CRIU's options.
    pub opts: CriuOptions,
    /// Where the init records the job's end, and whose the job is (an
    /// owned job's images are handed to its owner, its files rolled back
    /// with the owner's rights).
    pub init: InitFiles,
    /// The job's files: rolled back to the image before CRIU reopens them,
    /// and checked after, before the restored tree runs.
    pub files: FilesConfig,
    /// A lazy restore: the pages missing from `images` are served from
    /// here while the job runs.
    pub lazy: Option<Box<dyn PageSource + Send>>,
    /// The watch of the job's directories: what the dead job changed
    /// since the image is rolled back too, and the restored job is watched.
    pub tracker: Option<std::sync::Arc<crate::files::Tracker>>,
}

/// A restored job and what its files' rollback did.
pub struct RestoredJob {
    /// The job, running.
    pub restored: Restored,
    /// The rollback, file by file.
    pub actions: Vec<Action>,
}

/// What the supervisor asks of the outside world.
pub trait Engine: Send + Sync + 'static {
    /// Starts the job's command (under a fresh namespace init).
    fn launch(
        &self,
        spec: LaunchSpec,
        init: InitFiles,
    ) -> impl Future<Output = Result<Running, JobError>> + Send;

    /// Attaches to process `pid`, which must still have `start_time`
    /// when one was recorded (a reused PID is refused).
    fn attach(
        &self,
        pid: i32,
        start_time: Option<u64>,
    ) -> impl Future<Output = Result<Running, JobError>> + Send;

    /// True if the job an earlier supervise recorded still runs (same
    /// PID and start time): it is to be adopted, not restored.
    fn still_running(&self, rec: &JobRecord) -> bool;

    /// Takes over the job an earlier supervise left running.
    fn adopt(
        &self,
        rec: JobRecord,
        init: InitFiles,
    ) -> impl Future<Output = Result<Running, JobError>> + Send;

    /// Bytes of memory the tree rooted at `pid` holds (resident and
    /// swapped), to size a dump kept in memory.
    fn job_memory(&self, pid: i32) -> u64;

    /// Dumps the tree (which keeps running), recording the job's files at
    /// `post-dump`; after a failure, resumes any task left stopped.
    fn dump(&self, req: DumpRequest) -> impl Future<Output = Dumped> + Send;

    /// Rolls the job's files back, restores the image under a fresh
    /// namespace init and checks the restored descriptors before the tree
    /// runs.
    fn restore(
        &self,
        req: RestoreRequest,
    ) -> impl Future<Output = Result<RestoredJob, RestoreError>> + Send;

    /// Kills every process of `ids` still alive as recorded (PID and start
    /// time); returns the PIDs killed.
    fn kill_survivors(&self, ids: Vec<ProcId>) -> impl Future<Output = Vec<i32>> + Send;

    /// Full dumps, or pre-dump + dump where CRIU tracks dirty memory
    /// (asked once, then remembered).
    fn dump_mode(&self) -> impl Future<Output = DumpMode> + Send;

    /// Whether lazy restores work here (asked once, then remembered).
    fn lazy_pages(&self) -> impl Future<Output = bool> + Send;

    /// Publishes the staged checkpoint; inside Slurm only while holding
    /// the store's lease (`fence`).
    fn publish(
        &self,
        staging: Staging,
        meta: CheckpointMeta,
        pages: Option<StreamSink>,
        fence: Option<Fence>,
    ) -> impl Future<Output = Result<ImageInfo, CheckpointError>> + Send {
        async move {
            blocking(move || publish_fenced(staging, meta, pages, fence.as_ref()))
                .await
                .unwrap_or_else(|e| {
                    Err(CheckpointError::failed(
                        super::errors::CheckpointStep::Publish,
                        e,
                    ))
                })
        }
    }

    /// Retention (keep the newest `keep` images) and garbage collection,
    /// inside Slurm only while holding the store's lease.
    fn retain(
        &self,
        store: ImageStore,
        keep: usize,
        fence: Option<Fence>,
    ) -> impl Future<Output = ()> + Send {
        async move {
            let span = tracing::Span::current();
            let _ = blocking(move || {
                let _g = span.enter();
                retain_fenced(&store, keep, fence.as_ref())
            })
            .await;
        }
    }
}

/// Runs `f` on tokio's blocking pool; `Err` if it panicked.
pub(super) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| format!("task failed: {e}"))
}

/// Commits `staging` while holding the lease, if any.
fn publish_fenced(
    staging: Staging,
    meta: CheckpointMeta,
    pages: Option<StreamSink>,
    fence: Option<&Fence>,
) -> Result<ImageInfo, CheckpointError> {
    use super::errors::CheckpointStep;
    let _guard = match fence {
        Some(f) => match f.guard() {
            Ok(g) => Some(g),
            Err(e) => {
                staging.abort();
                return Err(CheckpointError::Superseded(e.to_string()));
            }
        },
        None => None,
    };
    staging
        .commit_with(meta, pages.map(StreamSink::into_stream))
        .map_err(|e| CheckpointError::Failed {
            step: CheckpointStep::Ingest,
            resource: e.is_resource(),
            message: e.to_string(),
        })
}

/// Retention, then garbage collection of what it freed; nothing at all
/// by a copy that lost the store's lease.
fn retain_fenced(store: &ImageStore, keep: usize, fence: Option<&Fence>) {
    let _guard = match fence {
        Some(f) => match f.guard() {
            Ok(g) => Some(g),
            Err(e) => {
                warn!(error = %e, "retention and gc skipped");
                return;
            }
        },
        None => None,
    };
    match store.retain(keep) {
        Ok(removed) if !removed.is_empty() => {
            info!(?removed, keep, "retention removed old images")
        }
        Ok(_) => {}
        Err(e) => warn!(error = %e, "retention failed"),
    }
    match store.gc() {
        Ok(r) if r.removed_packs + r.rewritten_packs > 0 => info!(
            removed_packs = r.removed_packs,
            rewritten_packs = r.rewritten_packs,
            freed_bytes = r.freed_bytes,
            pack_bytes = r.pack_bytes,
            "gc reclaimed unreferenced data"
        ),
        Ok(_) => {}
        Err(e) => warn!(error = %e, "gc failed; unreferenced data stays until the next one"),
    }
    // What the ingest freed goes back to the system now, not when the
    // arena happens to shrink: RSS stays flat across jobs.
    release_free_memory();
}

/// Returns the allocator's free memory to the system (glibc
/// `malloc_trim`); a no-op elsewhere.
pub(super) fn release_free_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free heap memory.
    unsafe {
        libc::malloc_trim(0);
    }
}
