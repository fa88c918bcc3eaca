//! The job's schedule between steps: the interval `every = "auto"` picks
//! ([`crate::interval`]) from the measured frozen times and observed
//! failures, skipped ticks, and the daemon-wide bound on concurrent dumps.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::*;
use crate::control::AutoStatus;
use crate::interval::{changed_much, AutoInterval};

/// The job's share of the schedule state (kept on the [`Supervisor`]).
pub(super) struct Tuning {
    /// `every = "auto"`: learned C and M.
    pub(super) auto: Option<AutoInterval>,
    /// Since when the job's run time has not been counted towards M.
    pub(super) run_mark: Option<Instant>,
    /// The interval last logged (the log says when it moves by > 20 %).
    pub(super) logged: Option<Duration>,
    /// The tick the next checkpoint serves (for its lateness).
    pub(super) due: Option<DateTime<Utc>>,
    /// When the last checkpoint started (got its dump slot).
    pub(super) started: Option<DateTime<Utc>>,
    /// Ticks skipped so far.
    pub(super) skipped: u64,
    /// Bounds concurrent dumps across all jobs of this supervise (FIFO).
    pub(super) slots: Arc<Semaphore>,
}

impl Tuning {
    pub(super) fn new(cfg: &JobConfig) -> Tuning {
        Tuning {
            auto: match &cfg.checkpoint.schedule {
                crate::schedule::ScheduleSpec::Auto(p) => Some(AutoInterval::new(*p)),
                _ => None,
            },
            run_mark: None,
            logged: None,
            due: None,
            started: None,
            skipped: 0,
            // Unbounded unless the daemon shares its slots.
            slots: Arc::new(Semaphore::new(Semaphore::MAX_PERMITS)),
        }
    }

    /// Counts the job's run time since the last mark towards M; with
    /// `running` false the job is down (until [`Tuning::running`]).
    fn account(&mut self, running: bool) {
        let now = Instant::now();
        if let (Some(a), Some(mark)) = (self.auto.as_mut(), self.run_mark) {
            a.ran(now - mark);
        }
        self.run_mark = running.then_some(now);
    }
}

impl Supervisor {
    /// Shares the daemon's dump slots (`supervise run --max-concurrent-dumps`).
    pub fn set_dump_slots(&mut self, slots: Arc<Semaphore>) {
        self.tuning.slots = slots;
    }

    /// Waits for a dump slot (FIFO among the jobs); returns it and the
    /// time waited. Records when the checkpoint started and how late it is
    /// against the tick it serves.
    pub(super) async fn dump_slot(
        &mut self,
    ) -> (Option<OwnedSemaphorePermit>, Duration, Option<i64>) {
        let t0 = Instant::now();
        let permit = self.tuning.slots.clone().acquire_owned().await.ok();
        let waited = t0.elapsed();
        let started = Utc::now();
        self.tuning.started = Some(started);
        let late_ms = self
            .tuning
            .due
            .take()
            .map(|d| (started - d).num_milliseconds().max(0));
        (permit, waited, late_ms)
    }

    /// The job runs (started, restored, re-adopted): its run time counts
    /// towards M from now.
    pub(super) fn job_running(&mut self) {
        self.tuning.account(true);
    }

    /// The job's process is gone (died, stopped): its run time stops
    /// counting.
    pub(super) fn job_not_running(&mut self) {
        self.tuning.account(false);
    }

    /// The job died and will be restored: one more failure for M.
    pub(super) fn job_failed(&mut self) {
        if let Some(a) = self.tuning.auto.as_mut() {
            a.failure();
        }
    }

    /// A checkpoint froze the job for `frozen`: one more sample of C.
    pub(super) fn checkpoint_cost(&mut self, frozen: Duration) {
        if let Some(a) = self.tuning.auto.as_mut() {
            a.checkpoint(frozen);
        }
    }

    /// Counts `n` skipped ticks (logged, in status and metrics).
    pub(super) fn ticks_skipped(&mut self, n: u64, why: &str) {
        if n == 0 {
            return;
        }
        warn!(skipped = n, "checkpoint ticks {why} and were skipped");
        self.tuning.skipped += n;
        self.metrics.skipped(&self.cfg.name, n);
        let total = self.tuning.skipped;
        self.publish(|s| s.skipped_ticks = total);
    }

    /// After a scheduled checkpoint: ticks that came due before it started
    /// are skipped (the wait for a dump slot counts only if it outlasted a
    /// whole interval); the next tick is the first after its start.
    pub(super) fn tick_served(&mut self, ticker: &mut Ticker, due: Option<DateTime<Utc>>) {
        self.tuning.due = None;
        let started = self.tuning.started.take().unwrap_or_else(Utc::now);
        let at = match due {
            Some(d) if d > started => d,
            _ => started,
        };
        let n = ticker.advance(at);
        self.ticks_skipped(
            n,
            "came due before the checkpoint for an earlier one started",
        );
    }

    /// Recomputes the interval (for `every = "auto"`) after a checkpoint or
    /// a failure and publishes it; logs a change of more than 20 %.
    pub(super) fn retune(&mut self, ticker: &mut Ticker) {
        if self.tuning.run_mark.is_some() {
            self.tuning.account(true);
        }
        if let Some(a) = &self.tuning.auto {
            let new = a.interval();
            ticker.set_interval(new, Utc::now());
            let (cost, mtbf, failures) = (a.cost(), a.mtbf(), a.failures());
            match self.tuning.logged {
                Some(old) if !changed_much(old, new) => {}
                old => {
                    info!(
                        interval_s = new.as_secs_f64(),
                        previous_s = old.map(|o| o.as_secs_f64()),
                        cost_ms = cost.map(|c| c * 1000.0),
                        mtbf_h = mtbf / 3600.0,
                        failures,
                        "checkpoint interval set (every = \"auto\")"
                    );
                    self.tuning.logged = Some(new);
                }
            }
            self.publish(|s| {
                s.auto = Some(AutoStatus {
                    cost_s: cost,
                    mtbf_s: mtbf,
                    failures,
                })
            });
        }
        if let Some(i) = ticker.interval() {
            self.metrics.interval(&self.cfg.name, i);
            self.publish(|s| s.interval_s = Some(i.as_secs_f64()));
        }
    }
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
