//! The per-job supervisor: a state machine (running, checkpointing, dead,
//! restoring) driven by three kinds of events: the checkpoint schedule, the
//! job's death (reported by the reaper or a pidfd, never polled) and
//! supervise's own shutdown.
//!
//! Everything one job does happens on one task, one step at a time, so a job
//! never has two checkpoints at once, nor a checkpoint during a restore; a
//! schedule tick that falls while a step runs is skipped and logged
//! ([`crate::schedule::Ticker`]).

use std::collections::VecDeque;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use chrono::Utc;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::config::{JobConfig, RestoreOn, ShutdownAction, Target};
use crate::criu::DumpMode;
use crate::job::{self, InitFiles, Running};
use crate::reaper::{ExitStatus, Reaper};
use crate::schedule::Ticker;
use crate::store::{CheckpointMeta, ImageInfo, ImageStore};

/// Errors that stop a job's supervision before it starts.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    /// The image store could not be opened.
    #[error("job {job}: image store: {source}")]
    Store {
        /// Job name.
        job: String,
        /// Cause.
        source: crate::store::StoreError,
    },
    /// Another supervise holds this job, or the job still runs.
    #[error("job {job}: {message}")]
    Busy {
        /// Job name.
        job: String,
        /// Why.
        message: String,
    },
    /// The state directory is unusable.
    #[error("job {job}: state directory {path}: {source}")]
    StateDir {
        /// Job name.
        job: String,
        /// The directory.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
}

/// Where a job stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "state", content = "reason")]
pub enum JobState {
    /// Starting or resuming.
    Starting,
    /// Running, between checkpoints.
    Running,
    /// A checkpoint is being taken.
    Checkpointing,
    /// The job died; a restore is pending.
    Dead,
    /// A restore is running.
    Restoring,
    /// Stopped by supervise's shutdown.
    Stopped,
    /// Supervision ended because the job exited cleanly.
    Completed,
    /// Given up.
    Failed(String),
}

/// How supervision of a job ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The job exited in a way that needs no restore (e.g. exit 0).
    Completed(ExitStatus),
    /// supervise was asked to stop; the job was stopped.
    Stopped,
    /// supervise was asked to stop; the job was left running.
    Detached,
    /// supervise gave up on the job.
    Failed(String),
}

impl Outcome {
    /// True when `supervise run` should exit non-zero for this job.
    pub fn is_failure(&self) -> bool {
        matches!(self, Outcome::Failed(_))
    }
}

/// What supervise remembers about the live job, in `<state_dir>/job.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobRecord {
    /// Root PID in supervise's namespace.
    pub host_pid: i32,
    /// Root PID in its own namespace.
    pub ns_pid: i32,
    /// The namespace init, if any.
    pub init_pid: Option<i32>,
    /// Root start time (clock ticks since boot).
    pub start_time: u64,
}

/// Supervises one job.
pub struct Supervisor {
    cfg: JobConfig,
    store: ImageStore,
    reaper: Reaper,
    state: JobState,
    restores: VecDeque<Instant>,
    consecutive: u32,
    criu_version: String,
    /// Full dumps, or pre-dump + dump where CRIU tracks dirty memory;
    /// asked of CRIU at the first checkpoint.
    dump_mode: Option<DumpMode>,
    _lock: File,
}

/// Restore-rate bookkeeping, kept apart so it can be unit-tested.
pub fn restore_delay(consecutive: u32, backoff: Duration, backoff_max: Duration) -> Duration {
    let exp = consecutive.saturating_sub(1).min(30);
    backoff.saturating_mul(1u32 << exp).min(backoff_max)
}

impl Supervisor {
    /// Prepares a job: state dir, lock, image store.
    pub fn new(cfg: JobConfig, reaper: Reaper) -> Result<Supervisor, SupervisorError> {
        let job = cfg.name.clone();
        let sd = cfg.state_dir.clone();
        let state_err = |source| SupervisorError::StateDir {
            job: job.clone(),
            path: sd.clone(),
            source,
        };
        create_private_dir(&cfg.state_dir).map_err(state_err)?;
        let lock = File::create(cfg.state_dir.join("lock")).map_err(state_err)?;
        // SAFETY: flock on an fd we own; the lock lives as long as `lock`.
        let rc = unsafe {
            libc::flock(
                std::os::fd::AsRawFd::as_raw_fd(&lock),
                libc::LOCK_EX | libc::LOCK_NB,
            )
        };
        if rc != 0 {
            return Err(SupervisorError::Busy {
                job,
                message: format!(
                    "already supervised by another supervise (lock {} is held)",
                    cfg.state_dir.join("lock").display()
                ),
            });
        }
        if let Some(rec) = read_record(&cfg.state_dir) {
            if crate::proc::alive(rec.host_pid)
                && crate::proc::start_time(rec.host_pid).ok() == Some(rec.start_time)
            {
                return Err(SupervisorError::Busy {
                    job,
                    message: format!(
                        "the job is still running as pid {} from an earlier supervise; \
                         refusing to start or restore a second copy (stop it first)",
                        rec.host_pid
                    ),
                });
            }
        }
        let store =
            ImageStore::open(&cfg.checkpoint.dir).map_err(|source| SupervisorError::Store {
                job: job.clone(),
                source,
            })?;
        // Image files a crashed restore left behind (possibly GiBs of tmpfs).
        crate::store::remove_scratch(&cfg.state_dir.join("restore"));
        Ok(Supervisor {
            cfg,
            store,
            reaper,
            state: JobState::Starting,
            restores: VecDeque::new(),
            consecutive: 0,
            criu_version: String::new(),
            dump_mode: None,
            _lock: lock,
        })
    }

    /// Records the CRIU version in each checkpoint's manifest.
    pub fn set_criu_version(&mut self, v: String) {
        self.criu_version = v;
    }

    /// The job's name.
    pub fn name(&self) -> &str {
        &self.cfg.name
    }

    /// The job's current state.
    pub fn state(&self) -> &JobState {
        &self.state
    }

    fn files(&self) -> InitFiles {
        InitFiles {
            status_file: self.cfg.state_dir.join("exit-status"),
        }
    }

    /// Runs the job until it completes, fails for good, or `shutdown` fires.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) -> Outcome {
        info!(
            schedule = %self.cfg.checkpoint.schedule.describe(),
            images = %self.cfg.checkpoint.dir.display(),
            "supervising"
        );
        let mut job = match self.start().await {
            Ok(j) => j,
            Err(reason) => return self.fail(reason),
        };
        let mut ticker = Ticker::new(self.cfg.checkpoint.schedule.clone(), Utc::now());
        loop {
            self.state = JobState::Running;
            let sleep = match ticker.due() {
                Some(due) => {
                    let d = (due - Utc::now()).to_std().unwrap_or(Duration::ZERO);
                    tokio::time::sleep(d)
                }
                None => tokio::time::sleep(Duration::from_secs(86400 * 365)),
            };
            tokio::select! {
                _ = sleep => {
                    let _ = self.checkpoint(&job).await;
                    let skipped = ticker.advance(Utc::now());
                    if skipped > 0 {
                        warn!(skipped, "checkpoint ticks fell during a running step and were skipped");
                    }
                }
                status = job.wait() => {
                    self.forget_record();
                    match self.on_death(status, job.since, &mut shutdown).await {
                        Ok(j) => {
                            job = j;
                            let skipped = ticker.reset(Utc::now());
                            if skipped > 0 {
                                warn!(skipped, "checkpoint ticks fell during the restore and were skipped");
                            }
                        }
                        Err(outcome) => return outcome,
                    }
                }
                _ = shutdown.changed() => {
                    return self.shut_down(job).await;
                }
            }
        }
    }

    fn fail(&mut self, reason: String) -> Outcome {
        error!(reason = %reason, "job failed; supervision ends");
        self.state = JobState::Failed(reason.clone());
        Outcome::Failed(reason)
    }

    /// First start: resume from the newest image if there is one, else
    /// launch (or attach).
    async fn start(&mut self) -> Result<Running, String> {
        match self.cfg.target.clone() {
            Target::Attach { pid } => {
                if crate::proc::alive(pid) {
                    let r = job::attach(pid).map_err(|e| e.to_string())?;
                    info!(pid, "attached");
                    self.remember(&r);
                    return Ok(r);
                }
                info!(
                    pid,
                    "process to attach to is gone; resuming from the newest image"
                );
                match self.restore_newest().await {
                    Some(r) => Ok(r),
                    None => Err(format!(
                        "process {pid} does not exist and no image could be restored"
                    )),
                }
            }
            Target::Launch(_) => {
                if !self.list_images().is_empty() {
                    info!("images found; resuming from the newest instead of starting afresh");
                    if let Some(r) = self.restore_newest().await {
                        return Ok(r);
                    }
                    warn!("no image could be restored; starting the command afresh");
                }
                self.launch().await
            }
        }
    }

    async fn launch(&mut self) -> Result<Running, String> {
        let Target::Launch(spec) = self.cfg.target.clone() else {
            return Err("attached jobs cannot be launched".into());
        };
        let reaper = self.reaper.clone();
        let files = self.files();
        let r = tokio::task::spawn_blocking(move || job::launch(&reaper, &spec, &files))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("cannot start the command: {e}"))?;
        info!(pid = r.host_pid, ns_pid = r.ns_pid, "started");
        self.remember(&r);
        Ok(r)
    }

    fn list_images(&self) -> Vec<ImageInfo> {
        match self.store.list() {
            Ok(v) => v,
            Err(e) => {
                warn!(error = %e, "cannot list images");
                Vec::new()
            }
        }
    }

    /// Takes one checkpoint of the running job and publishes it atomically.
    pub async fn checkpoint(&mut self, job: &Running) -> Result<ImageInfo, String> {
        if job.host_pid <= 0 {
            return Err("the job has already ended".into());
        }
        self.state = JobState::Checkpointing;
        let staging = match self.store.begin() {
            Ok(s) => s,
            Err(e) => {
                error!(error = %e, "cannot stage a checkpoint");
                return Err(e.to_string());
            }
        };
        let id = staging.id().to_string();
        let mode = self.dump_mode().await;
        let reaper = self.reaper.clone();
        let host_pid = job.host_pid;
        let opts = self.cfg.checkpoint.criu;
        let timeout = self.cfg.checkpoint.timeout;
        let res = tokio::task::spawn_blocking(move || {
            let r = crate::criu::dump_with(
                &reaper,
                host_pid,
                staging.path(),
                &opts,
                timeout,
                mode,
                &mut |_| true,
            );
            (staging, r)
        })
        .await;
        let (staging, outcome) = match res {
            Ok(x) => x,
            Err(e) => return Err(format!("checkpoint task failed: {e}")),
        };
        let outcome = match outcome {
            Ok(o) => o,
            Err(e) => {
                staging.abort();
                error!(checkpoint = %id, error = %e, "checkpoint failed; the job keeps running, older images are intact");
                return Err(e.to_string());
            }
        };
        let meta = CheckpointMeta {
            job: self.cfg.name.clone(),
            criu_version: self.criu_version.clone(),
            duration_ms: outcome.duration.as_millis() as u64,
            frozen_us: outcome
                .stats
                .as_ref()
                .and_then(|s| s.frozen_time)
                .map(u64::from),
            pages_written: outcome.stats.as_ref().and_then(|s| s.pages_written),
            root_pid: job.ns_pid,
            extra: Default::default(),
        };
        let store = self.store.clone();
        let info = match tokio::task::spawn_blocking(move || staging.commit(meta)).await {
            Ok(Ok(info)) => info,
            Ok(Err(e)) => {
                error!(checkpoint = %id, error = %e, "cannot publish the checkpoint; older images are intact");
                return Err(e.to_string());
            }
            Err(e) => return Err(e.to_string()),
        };
        info!(
            checkpoint = %id,
            duration_ms = outcome.duration.as_millis() as u64,
            frozen_ms = outcome.stats.as_ref().and_then(|s| s.frozen_time).map(|t| t as f64 / 1000.0).unwrap_or(f64::NAN),
            bytes = info.size_bytes,
            new_bytes = info.new_bytes,
            pages = outcome.stats.as_ref().and_then(|s| s.pages_written).unwrap_or(0),
            "checkpoint published"
        );
        let keep = self.cfg.checkpoint.keep;
        let span = tracing::Span::current();
        let _ = tokio::task::spawn_blocking(move || {
            let _g = span.enter();
            retain_and_gc(&store, keep)
        })
        .await;
        Ok(info)
    }

    /// Tries images newest first: verify, then CRIU restore.
    async fn restore_newest(&mut self) -> Option<Running> {
        self.state = JobState::Restoring;
        let images = self.list_images();
        if images.is_empty() {
            info!("no images to restore from");
        }
        for img in images {
            let store = self.store.clone();
            let reaper = self.reaper.clone();
            let opts = self.cfg.checkpoint.criu;
            let files = self.files();
            let work =
                crate::store::scratch_dir(&self.cfg.state_dir.join("restore"), img.size_bytes);
            let img2 = img.clone();
            let res = tokio::task::spawn_blocking(
                move || -> Result<(job::Restored, Duration), String> {
                    let m = store.materialise(&img2, &work).map_err(|e| match e {
                        crate::store::StoreError::Corrupt { .. } => {
                            format!("image failed verification: {e}")
                        }
                        e => format!("cannot prepare {} for CRIU: {e}", work.display()),
                    })?;
                    let r = job::restore(&reaper, &m.path, &opts, &files, &mut |_| true)
                        .map_err(|e| e.to_string());
                    // The restored job does not use the image files: free the (tmpfs) space.
                    let _ = std::fs::remove_dir_all(&m.path);
                    Ok((r?, m.duration))
                },
            )
            .await;
            match res {
                Ok(Ok((r, materialise))) => {
                    info!(
                        checkpoint = %img.id,
                        duration_ms = (r.duration + materialise).as_millis() as u64,
                        materialise_ms = materialise.as_millis() as u64,
                        criu_restore_ms = r.criu_restore_us.map(|u| u as f64 / 1000.0).unwrap_or(f64::NAN),
                        pid = r.running.host_pid,
                        ns_pid = r.running.ns_pid,
                        "restored"
                    );
                    self.remember(&r.running);
                    return Some(r.running);
                }
                Ok(Err(e)) => {
                    warn!(checkpoint = %img.id, error = %e, "cannot restore this image; trying the next older one")
                }
                Err(e) => warn!(error = %e, "restore task failed"),
            }
        }
        None
    }

    /// The job died: decide, back off, restore (or relaunch), or give up.
    async fn on_death(
        &mut self,
        status: ExitStatus,
        since: Instant,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<Running, Outcome> {
        self.state = JobState::Dead;
        let ran = since.elapsed();
        let wanted = match self.cfg.restore.on {
            RestoreOn::Never => false,
            RestoreOn::Failure => !status.success(),
            RestoreOn::Always => true,
        };
        if !wanted {
            if status.success() {
                info!(%status, "job exited; supervision ends");
                self.state = JobState::Completed;
                return Err(Outcome::Completed(status));
            }
            return Err(self.fail(format!("job ended ({status}) and restore.on = never")));
        }
        warn!(%status, ran_s = ran.as_secs_f64(), "job died");
        let now = Instant::now();
        let window = self.cfg.restore.window;
        while self
            .restores
            .front()
            .is_some_and(|t| now.duration_since(*t) > window)
        {
            self.restores.pop_front();
        }
        if self.restores.len() as u32 >= self.cfg.restore.max_restores {
            return Err(self.fail(format!(
                "job died {} times within {}; giving up (restore.max_restores)",
                self.restores.len() + 1,
                humantime::format_duration(window)
            )));
        }
        if ran > self.cfg.restore.backoff_max {
            self.consecutive = 0;
        }
        self.consecutive += 1;
        let delay = restore_delay(
            self.consecutive,
            self.cfg.restore.backoff,
            self.cfg.restore.backoff_max,
        );
        if !delay.is_zero() {
            info!(
                delay_ms = delay.as_millis() as u64,
                "backing off before restoring"
            );
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.changed() => {
                    self.state = JobState::Stopped;
                    return Err(Outcome::Stopped);
                }
            }
        }
        self.restores.push_back(Instant::now());
        if let Some(r) = self.restore_newest().await {
            return Ok(r);
        }
        match self.cfg.target {
            Target::Launch(_) => {
                warn!("no image could be restored; starting the command afresh");
                self.launch().await.map_err(|e| self.fail(e))
            }
            Target::Attach { .. } => Err(self.fail("no image could be restored".into())),
        }
    }

    async fn shut_down(&mut self, mut job: Running) -> Outcome {
        info!("shutdown requested");
        if self.cfg.shutdown.checkpoint {
            if let Err(e) = self.checkpoint(&job).await {
                warn!(error = %e, "final checkpoint failed");
            }
        }
        match self.cfg.shutdown.action {
            ShutdownAction::Detach => {
                info!(
                    pid = job.host_pid,
                    "leaving the job running (shutdown.action = detach)"
                );
                self.state = JobState::Stopped;
                Outcome::Detached
            }
            ShutdownAction::Stop => {
                job.kill();
                if job.is_waitable() {
                    let _ = tokio::time::timeout(Duration::from_secs(10), job.wait()).await;
                }
                self.forget_record();
                info!("job stopped");
                self.state = JobState::Stopped;
                Outcome::Stopped
            }
        }
    }

    fn remember(&self, r: &Running) {
        let rec = JobRecord {
            host_pid: r.host_pid,
            ns_pid: r.ns_pid,
            init_pid: r.init_pid,
            start_time: r.start_time,
        };
        let path = self.cfg.state_dir.join("job.json");
        let tmp = path.with_extension("json.tmp");
        if let Ok(s) = serde_json::to_vec(&rec) {
            if std::fs::write(&tmp, s)
                .and_then(|_| std::fs::rename(&tmp, &path))
                .is_err()
            {
                warn!(path = %path.display(), "cannot record the job's pid");
            }
        }
    }

    /// The dump mode, asked of CRIU once (FEATURE_CHECK `mem_track`).
    async fn dump_mode(&mut self) -> DumpMode {
        if let Some(m) = self.dump_mode {
            return m;
        }
        let reaper = self.reaper.clone();
        let mode =
            match tokio::task::spawn_blocking(move || crate::criu::feature_check(&reaper)).await {
                Ok(Ok(m)) => m,
                Ok(Err(e)) => {
                    warn!(error = %e, "CRIU feature check failed; taking full dumps");
                    DumpMode::Full
                }
                Err(_) => DumpMode::Full,
            };
        match mode {
            DumpMode::PreDump => info!(
                dump_mode = "pre-dump",
                "CRIU tracks dirty memory here: each checkpoint pre-dumps, then dumps only what changed"
            ),
            DumpMode::Full => info!(
                dump_mode = "full",
                "no dirty-memory tracking on this kernel: the job stays frozen for a full dump; the store still keeps only changed pages"
            ),
        }
        self.dump_mode = Some(mode);
        mode
    }

    fn forget_record(&self) {
        let _ = std::fs::remove_file(self.cfg.state_dir.join("job.json"));
    }
}

fn read_record(state_dir: &Path) -> Option<JobRecord> {
    serde_json::from_slice(&std::fs::read(state_dir.join("job.json")).ok()?).ok()
}

/// Creates `dir` (and parents) with mode 0700 for the leaf.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// Retention, then garbage collection of what it freed (blocking).
fn retain_and_gc(store: &ImageStore, keep: usize) {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let b = Duration::from_secs(1);
        let m = Duration::from_secs(10);
        assert_eq!(restore_delay(1, b, m), Duration::from_secs(1));
        assert_eq!(restore_delay(2, b, m), Duration::from_secs(2));
        assert_eq!(restore_delay(4, b, m), Duration::from_secs(8));
        assert_eq!(restore_delay(5, b, m), m);
        assert_eq!(restore_delay(500, b, m), m);
        assert_eq!(restore_delay(0, b, m), b);
    }
}
