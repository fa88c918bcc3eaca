//! What the outside sees of one job: its state and status on the control
//! socket's watch channel, and its metrics. The one owner of both: every
//! change of state, every checkpoint and restore outcome is reported here.

use chrono::Utc;
use tokio::sync::watch;

use super::errors::{CheckpointError, RestoreError};
use crate::control::{CheckpointSummary, FailureSummary, JobState, JobStatus, RestoreSummary};
use crate::job::Running;
use crate::metrics::Metrics;
use crate::store::ImageInfo;

/// The job's status and metrics.
pub(super) struct Report {
    name: String,
    status: Option<watch::Sender<JobStatus>>,
    metrics: Metrics,
    state: JobState,
}

impl Report {
    /// A report for job `name` that nobody watches yet.
    pub(super) fn new(name: &str) -> Report {
        Report {
            name: name.to_string(),
            status: None,
            metrics: Metrics::new(),
            state: JobState::Starting,
        }
    }

    /// Publishes to `status` and `metrics` from now on; every series of
    /// the job exists (at zero) from now.
    pub(super) fn connect(&mut self, status: watch::Sender<JobStatus>, metrics: Metrics) {
        self.status = Some(status);
        self.metrics = metrics;
        self.metrics.declare_job(&self.name);
    }

    /// The metrics (for the few values only the caller knows).
    pub(super) fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The job's name.
    pub(super) fn name(&self) -> &str {
        &self.name
    }

    /// Changes the status.
    pub(super) fn publish(&self, f: impl FnOnce(&mut JobStatus)) {
        if let Some(tx) = &self.status {
            tx.send_modify(f);
        }
    }

    /// Sets (and publishes) the job's state.
    pub(super) fn set_state(&mut self, state: JobState) {
        self.publish(|s| s.state = state.clone());
        self.state = state;
    }

    /// The job runs as `r`.
    pub(super) fn running(&self, r: &Running) {
        self.metrics.up(&self.name, true);
        let (pid, ns_pid) = (r.host_pid, r.ns_pid);
        self.publish(|s| {
            s.pid = Some(pid).filter(|p| *p > 0);
            s.ns_pid = Some(ns_pid);
            s.since = Some(Utc::now());
        });
    }

    /// The job's process is gone.
    pub(super) fn down(&self) {
        self.metrics.up(&self.name, false);
        self.publish(|s| {
            s.pid = None;
            s.ns_pid = None;
        });
    }

    /// A checkpoint was published.
    pub(super) fn checkpoint_ok(&self, info: &ImageInfo) {
        let m = &info.manifest.meta;
        self.metrics.checkpoint_ok(
            &self.name,
            std::time::Duration::from_millis(m.duration_ms),
            m.frozen_us.map(std::time::Duration::from_micros),
            info.size_bytes,
            info.new_bytes,
        );
        let sum = summary(info);
        self.publish(|s| {
            s.checkpoints += 1;
            s.last_checkpoint = Some(sum);
        });
    }

    /// A checkpoint (`id`, if it got one) failed at `e`'s step.
    pub(super) fn checkpoint_failed(&self, id: Option<&str>, e: &CheckpointError) {
        self.metrics.checkpoint_failed(&self.name);
        let failure = FailureSummary {
            operation: "checkpoint".into(),
            step: e.step().into(),
            checkpoint: id.map(str::to_string),
            error: e.to_string(),
            resource: e.is_resource(),
            time: Utc::now(),
        };
        self.publish(|s| {
            s.failed_checkpoints += 1;
            s.last_error = Some(format!("checkpoint: {e}"));
            s.last_failure = Some(failure);
        });
    }

    /// A restore succeeded.
    pub(super) fn restore_ok(&self, summary: RestoreSummary, running_after: std::time::Duration) {
        self.metrics.restore(&self.name, true, Some(running_after));
        self.metrics.restore_mode(&self.name, &summary.mode);
        if let Some(ms) = summary.resident_ms {
            self.metrics.restore_resident(
                &self.name,
                &summary.mode,
                std::time::Duration::from_secs_f64(ms / 1e3),
            );
        }
        self.publish(|s| {
            s.restores += 1;
            s.last_restore = Some(summary);
        });
    }

    /// A restore attempt (of image `id`, if it got that far) failed.
    pub(super) fn restore_failed(&self, id: Option<&str>, e: &RestoreError) {
        self.metrics.restore(&self.name, false, None);
        let failure = FailureSummary {
            operation: "restore".into(),
            step: e.step.name().into(),
            checkpoint: id.map(str::to_string),
            error: e.message.clone(),
            resource: e.is_resource(),
            time: Utc::now(),
        };
        let text = match id {
            Some(id) => format!("restore from {id}: {e}"),
            None => format!("restore: {e}"),
        };
        self.publish(|s| {
            s.failed_restores += 1;
            s.last_error = Some(text);
            s.last_failure = Some(failure);
        });
    }

    /// Any other error worth showing.
    pub(super) fn error(&self, message: String) {
        self.publish(|s| s.last_error = Some(message));
    }
}

/// What status shows of a published checkpoint.
pub fn summary(info: &ImageInfo) -> CheckpointSummary {
    CheckpointSummary {
        id: info.id.clone(),
        time: info.created,
        duration_ms: info.manifest.meta.duration_ms,
        frozen_ms: info.manifest.meta.frozen_us.map(|u| u as f64 / 1000.0),
        bytes: info.size_bytes,
    }
}
