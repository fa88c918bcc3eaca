//! The job's running process tree, one owner for all of it: the job
//! itself (if it runs), the lazy restore still pushing its memory, and
//! for an attached job the processes of its tree at the last checkpoint
//! (so that survivors of its root's death can be killed before a
//! restore).

use std::time::{Duration, Instant};

use tracing::{error, info};

use super::report::Report;
use crate::criu::lazy::{LazyFailure, LazyOutcome, LazySession};
use crate::job::Running;
use crate::proc::ProcId;
use crate::reaper::ExitStatus;

/// A lazy restore whose pages are still being served.
pub(super) struct PendingLazy {
    image: String,
    /// When the restore began (materialising included).
    began: Instant,
    end: tokio::task::JoinHandle<LazyOutcome>,
}

/// The running job and what belongs to it.
#[derive(Default)]
pub(super) struct Tree {
    /// The job, while it runs.
    pub(super) job: Option<Running>,
    lazy: Option<PendingLazy>,
    /// An attached job's processes at its last checkpoint.
    last_tree: Vec<ProcId>,
}

impl Tree {
    /// True while the job runs.
    pub(super) fn runs(&self) -> bool {
        self.job.is_some()
    }

    /// The two events of the tree, to wait for together: the job's end
    /// (never while there is no job) and the end of a lazy restore's
    /// serving (never without one).
    pub(super) fn events(
        &mut self,
    ) -> (
        impl std::future::Future<Output = (ExitStatus, Instant)> + '_,
        impl std::future::Future<Output = (PendingLazy, LazyOutcome)> + '_,
    ) {
        (wait_job(&mut self.job), wait_lazy(&mut self.lazy))
    }

    /// True while a lazy restore still serves the job's memory.
    pub(super) fn lazy_pending(&self) -> bool {
        self.lazy.is_some()
    }

    /// The job was restored lazily from `image`, `running_after` ago: its
    /// memory is served by `session` until every page is resident.
    pub(super) fn serve_lazily(
        &mut self,
        image: &str,
        running_after: Duration,
        session: LazySession,
    ) {
        self.lazy = Some(PendingLazy {
            image: image.to_string(),
            began: Instant::now() - running_after,
            end: tokio::task::spawn_blocking(move || session.wait()),
        });
    }

    /// Waits until a lazy restore's serving has ended (before a
    /// checkpoint, or before supervise leaves the job) and reports it.
    pub(super) async fn settle_lazy(&mut self, report: &Report) {
        if self.lazy.is_some() {
            let o = wait_lazy(&mut self.lazy).await;
            lazy_done(o, report);
        }
    }

    /// An attached job's processes at its last checkpoint.
    pub(super) fn remember_tree(&mut self, tree: Vec<ProcId>) {
        if !tree.is_empty() {
            self.last_tree = tree;
        }
    }

    /// The processes remembered by [`remember_tree`](Self::remember_tree)
    /// (forgotten here).
    pub(super) fn take_tree(&mut self) -> Vec<ProcId> {
        std::mem::take(&mut self.last_tree)
    }
}

/// Waits for the job's end; never resolves while there is no job.
async fn wait_job(job: &mut Option<Running>) -> (ExitStatus, Instant) {
    match job.as_mut() {
        Some(j) => {
            let status = j.wait().await;
            (status, j.since)
        }
        None => std::future::pending().await,
    }
}

/// The end of a lazy restore's serving; never resolves without one.
async fn wait_lazy(lazy: &mut Option<PendingLazy>) -> (PendingLazy, LazyOutcome) {
    match lazy.as_mut() {
        Some(p) => {
            let o = (&mut p.end).await.unwrap_or_else(|e| LazyOutcome {
                result: Err(LazyFailure {
                    message: format!("the lazy restore task failed: {e}"),
                    unservable: false,
                }),
                bytes: 0,
                stats: Default::default(),
                elapsed: Duration::ZERO,
                ended: Instant::now(),
            });
            (lazy.take().expect("pending"), o)
        }
        None => std::future::pending().await,
    }
}

/// The lazy restore's serving ended: every page resident, or the job was
/// killed because one could not be served (its death follows).
pub(super) fn lazy_done((p, o): (PendingLazy, LazyOutcome), report: &Report) {
    match &o.result {
        Ok(()) => {
            let resident = o.ended.saturating_duration_since(p.began);
            info!(
                checkpoint = %p.image,
                resident_ms = resident.as_millis() as u64,
                served_bytes = o.bytes,
                requests = o.stats.requests,
                store_read_ms = o.stats.source.as_millis() as u64,
                send_ms = o.stats.send.as_millis() as u64,
                "all of the job's memory is resident; it no longer depends on supervise"
            );
            report
                .metrics()
                .restore_resident(report.name(), "lazy", resident);
            report.publish(|s| {
                if let Some(r) = s.last_restore.as_mut() {
                    r.resident_ms = Some(resident.as_secs_f64() * 1e3);
                }
            });
        }
        Err(e) => {
            error!(
                checkpoint = %p.image,
                error = %e,
                "lazy restore could not give the job all its memory; the job was killed before it could run on with missing memory"
            );
            report.error(format!("lazy restore from {}: {e}", p.image));
        }
    }
}
