//! The job's checkpoint cadence, one owner for all of it: the schedule's
//! ticks ([`Ticker`]), the interval `every = "auto"` picks
//! ([`crate::interval`]) from the measured frozen times and observed
//! failures, skipped ticks, and the daemon-wide bound on concurrent dumps.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::{info, warn};

use super::report::Report;
use crate::config::JobConfig;
use crate::control::AutoStatus;
use crate::interval::{changed_much, AutoInterval};
use crate::schedule::Ticker;

/// The job's ticks, interval and dump slots.
pub(super) struct Cadence {
    ticker: Ticker,
    /// `every = "auto"`: learned C and M.
    auto: Option<AutoInterval>,
    /// Since when the job's run time has not been counted towards M.
    run_mark: Option<Instant>,
    /// The interval last logged (the log says when it moves by > 20 %).
    logged: Option<Duration>,
    /// The tick the next checkpoint serves (for its lateness).
    due: Option<DateTime<Utc>>,
    /// When the last checkpoint started (got its dump slot).
    started: Option<DateTime<Utc>>,
    /// Ticks skipped so far.
    skipped: u64,
    /// Bounds concurrent dumps across all jobs of this supervise (FIFO).
    slots: Arc<Semaphore>,
}

/// A dump slot, held for the dump, the commit and retention.
pub(super) struct Slot {
    _permit: Option<OwnedSemaphorePermit>,
    /// Time spent waiting for it.
    pub(super) waited: Duration,
    /// How late the checkpoint starts against the tick it serves.
    pub(super) late_ms: Option<i64>,
}

impl Cadence {
    pub(super) fn new(cfg: &JobConfig) -> Cadence {
        Cadence {
            ticker: Ticker::with_phase(
                cfg.checkpoint.schedule.clone(),
                Utc::now(),
                crate::interval::phase(&cfg.name),
            ),
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

    /// Shares the daemon's dump slots (`--max-concurrent-dumps`).
    pub(super) fn set_slots(&mut self, slots: Arc<Semaphore>) {
        self.slots = slots;
    }

    /// When the next scheduled checkpoint is due.
    pub(super) fn due(&self) -> Option<DateTime<Utc>> {
        self.ticker.due()
    }

    /// The next checkpoint serves the tick due at `due`.
    pub(super) fn serving(&mut self, due: Option<DateTime<Utc>>) {
        self.due = due;
    }

    /// Waits for a dump slot (FIFO among the jobs). Records when the
    /// checkpoint started and how late it is against the tick it serves.
    pub(super) async fn slot(&mut self) -> Slot {
        let t0 = Instant::now();
        let permit = self.slots.clone().acquire_owned().await.ok();
        let waited = t0.elapsed();
        let started = Utc::now();
        self.started = Some(started);
        let late_ms = self
            .due
            .take()
            .map(|d| (started - d).num_milliseconds().max(0));
        Slot {
            _permit: permit,
            waited,
            late_ms,
        }
    }

    /// Counts the job's run time since the last mark towards M; with
    /// `running` false the job is down (until it runs again).
    fn account(&mut self, running: bool) {
        let now = Instant::now();
        if let (Some(a), Some(mark)) = (self.auto.as_mut(), self.run_mark) {
            a.ran(now - mark);
        }
        self.run_mark = running.then_some(now);
    }

    /// The job runs (started, restored, re-adopted): its run time counts
    /// towards M from now.
    pub(super) fn job_running(&mut self) {
        self.account(true);
    }

    /// True while the job's run time counts.
    pub(super) fn counting(&self) -> bool {
        self.run_mark.is_some()
    }

    /// The job's process is gone (died, stopped).
    pub(super) fn job_not_running(&mut self) {
        self.account(false);
    }

    /// The job died and will be restored: one more failure for M.
    pub(super) fn job_failed(&mut self) {
        if let Some(a) = self.auto.as_mut() {
            a.failure();
        }
    }

    /// A checkpoint froze the job for `frozen`: one more sample of C.
    pub(super) fn checkpoint_cost(&mut self, frozen: Duration) {
        if let Some(a) = self.auto.as_mut() {
            a.checkpoint(frozen);
        }
    }

    /// Counts `n` skipped ticks (logged, in status and metrics).
    fn skip(&mut self, n: u64, why: &str, report: &Report) {
        if n == 0 {
            return;
        }
        warn!(skipped = n, "checkpoint ticks {why} and were skipped");
        self.skipped += n;
        report.metrics().skipped(report.name(), n);
        let total = self.skipped;
        report.publish(|s| s.skipped_ticks = total);
    }

    /// After a scheduled checkpoint: ticks that came due before it started
    /// are skipped (the wait for a dump slot counts only if it outlasted a
    /// whole interval); the next tick is the first after its start.
    pub(super) fn served(&mut self, due: Option<DateTime<Utc>>, report: &Report) {
        self.due = None;
        let started = self.started.take().unwrap_or_else(Utc::now);
        let at = match due {
            Some(d) if d > started => d,
            _ => started,
        };
        let n = self.ticker.advance(at);
        self.skip(
            n,
            "came due before the checkpoint for an earlier one started",
            report,
        );
    }

    /// The job (re)starts now: the first tick is at least one interval
    /// away; ticks that fell meanwhile (`why`) are counted as skipped
    /// (none for a start or a manual restore).
    pub(super) fn restart(&mut self, why: Option<&str>, report: &Report) {
        let n = self.ticker.reset(Utc::now());
        if let Some(why) = why {
            self.skip(n, why, report);
        }
    }

    /// Recomputes the interval (for `every = "auto"`) after a checkpoint or
    /// a failure and publishes it; logs a change of more than 20 %.
    pub(super) fn retune(&mut self, report: &Report) {
        if self.run_mark.is_some() {
            self.account(true);
        }
        if let Some(a) = &self.auto {
            let new = a.interval();
            self.ticker.set_interval(new, Utc::now());
            let (cost, mtbf, failures) = (a.cost(), a.mtbf(), a.failures());
            match self.logged {
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
                    self.logged = Some(new);
                }
            }
            report.publish(|s| {
                s.auto = Some(AutoStatus {
                    cost_s: cost,
                    mtbf_s: mtbf,
                    failures,
                })
            });
        }
        if let Some(i) = self.ticker.interval() {
            report.metrics().interval(report.name(), i);
            report.publish(|s| s.interval_s = Some(i.as_secs_f64()));
        }
    }
}
