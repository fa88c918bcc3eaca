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
use tokio::sync::{mpsc, watch};
use tracing::{error, info, warn};

use crate::control::{CheckpointSummary, Command, JobPort, JobStatus, Response};
use crate::fence::{Fence, Handover, Owner};
use crate::metrics::Metrics;
use crate::proc::ProcId;
use crate::slurm::SlurmContext;

/// How often a copy inside Slurm checks that it still holds the store.
const FENCE_CHECK: Duration = Duration::from_secs(1);
/// Prefix of the error of a checkpoint refused because another copy took
/// over the store.
const SUPERSEDED: &str = "superseded";

use crate::config::{JobConfig, RestoreOn, ShutdownAction, Target};
use crate::criu::DumpMode;
use crate::files::{Action, CaptureSummary, FilesError};
use crate::job::{self, InitFiles, Running};
use crate::reaper::{ExitStatus, Reaper};
use crate::schedule::Ticker;
use crate::store::{CheckpointMeta, ImageInfo, ImageStore, Materialised};

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
    /// The state or image directory is not a trusted location.
    #[error(transparent)]
    Untrusted(#[from] crate::fsutil::TrustError),
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
    /// Another copy of this job (Slurm) took over the image store.
    Superseded(String),
}

impl JobState {
    /// One line for humans: "running", "failed: <reason>".
    pub fn describe(&self) -> String {
        match self {
            JobState::Starting => "starting".into(),
            JobState::Running => "running".into(),
            JobState::Checkpointing => "checkpointing".into(),
            JobState::Dead => "dead".into(),
            JobState::Restoring => "restoring".into(),
            JobState::Stopped => "stopped".into(),
            JobState::Completed => "completed".into(),
            JobState::Failed(r) => format!("failed: {r}"),
            JobState::Superseded(r) => format!("superseded: {r}"),
        }
    }
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
    /// A newer copy of the job (Slurm) took over; this one stopped its job.
    Superseded(String),
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
    /// A live job left by an earlier supervise, to take over at start.
    adopt: Option<JobRecord>,
    status: Option<watch::Sender<JobStatus>>,
    commands: Option<mpsc::Receiver<Command>>,
    metrics: Metrics,
    /// Where the per-run files live (the state dir, or a per-Slurm-run
    /// subdirectory of it).
    run_dir: PathBuf,
    slurm: Option<SlurmContext>,
    /// Our lease on the image store (Slurm only).
    fence: Option<Fence>,
    /// Full dumps, or pre-dump + dump where CRIU tracks dirty memory;
    /// asked of CRIU at the first checkpoint.
    dump_mode: Option<DumpMode>,
    /// An attached job that was never restored has no namespace init to
    /// take its whole tree down: its processes at the last checkpoint, so
    /// that survivors of its root's death are killed before a restore.
    last_tree: Vec<ProcId>,
    _lock: File,
}

/// The process an `attach = PID` job was first attached to, in
/// `<state_dir>/attached.json`: a later supervise attaches to `pid` again
/// only if it is still that process (same start time).
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct AttachRecord {
    pid: i32,
    start_time: u64,
}

/// Restore-rate bookkeeping, kept apart so it can be unit-tested.
pub fn restore_delay(consecutive: u32, backoff: Duration, backoff_max: Duration) -> Duration {
    let exp = consecutive.saturating_sub(1).min(30);
    backoff.saturating_mul(1u32 << exp).min(backoff_max)
}

impl Supervisor {
    /// Prepares a job: state dir, lock, image store. Inside a Slurm job
    /// (`slurm`), the per-run files (lock, job.json, exit status, restore
    /// work dir) live in `<state_dir>/slurm-<job id>.<restart count>/`, so an
    /// old and a new copy of the job never share them; the image store's
    /// lease decides between them ([`crate::fence`]).
    pub fn new(
        cfg: JobConfig,
        reaper: Reaper,
        slurm: Option<SlurmContext>,
    ) -> Result<Supervisor, SupervisorError> {
        let job = cfg.name.clone();
        let run_dir = match &slurm {
            Some(s) => cfg
                .state_dir
                .join(format!("slurm-{}.{}", s.job_id, s.restart_count)),
            None => cfg.state_dir.clone(),
        };
        let sd = run_dir.clone();
        let state_err = |source| SupervisorError::StateDir {
            job: job.clone(),
            path: sd.clone(),
            source,
        };
        // supervise's own files: only in a directory nobody else controls.
        crate::fsutil::ensure_trusted_dir("state directory", &cfg.state_dir)?;
        crate::fsutil::ensure_trusted_dir("state directory", &run_dir)?;
        let lock =
            crate::fsutil::open_rw_nofollow(&run_dir.join("lock"), 0o600).map_err(state_err)?;
        if crate::fsutil::flock(&lock, true, true).is_err() {
            return Err(SupervisorError::Busy {
                job,
                message: format!(
                    "already supervised by another supervise (lock {} is held)",
                    run_dir.join("lock").display()
                ),
            });
        }
        // A job.json whose process still runs (same PID *and* start time)
        // is a job an earlier supervise left behind: take it over instead
        // of starting or restoring a second copy.
        let adopt = read_record(&run_dir).filter(|rec| {
            crate::proc::alive(rec.host_pid)
                && crate::proc::start_time(rec.host_pid).ok() == Some(rec.start_time)
        });
        let store =
            ImageStore::open(&cfg.checkpoint.dir).map_err(|source| SupervisorError::Store {
                job: job.clone(),
                source,
            })?;
        // Image files a crashed restore left behind (possibly GiBs of tmpfs).
        crate::store::remove_scratch(&run_dir.join("restore"));
        Ok(Supervisor {
            cfg,
            store,
            reaper,
            state: JobState::Starting,
            restores: VecDeque::new(),
            consecutive: 0,
            criu_version: String::new(),
            adopt,
            status: None,
            commands: None,
            metrics: Metrics::new(),
            run_dir,
            slurm,
            fence: None,
            dump_mode: None,
            last_tree: Vec::new(),
            _lock: lock,
        })
    }

    /// Connects the job to the control socket and the metrics.
    pub fn connect(&mut self, port: JobPort, metrics: Metrics) {
        self.status = Some(port.status);
        self.commands = Some(port.commands);
        self.metrics = metrics;
        self.metrics.up(&self.cfg.name, false);
        if let Some(ctx) = &self.slurm {
            let facts = ctx.facts();
            self.publish(|s| s.extra = facts);
        }
    }

    fn publish(&self, f: impl FnOnce(&mut JobStatus)) {
        if let Some(tx) = &self.status {
            tx.send_modify(f);
        }
    }

    fn set_state(&mut self, state: JobState) {
        self.publish(|s| s.state = state.clone());
        self.state = state;
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
            status_file: self.run_dir.join("exit-status"),
        }
    }

    /// Runs the job until it completes, fails for good, or `shutdown` fires.
    pub async fn run(mut self, shutdown: watch::Receiver<bool>) -> Outcome {
        info!(
            schedule = %self.cfg.checkpoint.schedule.describe(),
            images = %self.cfg.checkpoint.dir.display(),
            "supervising"
        );
        if let Err(reason) = self.take_lease().await {
            return self.fail(reason);
        }
        let outcome = self.run_inner(shutdown).await;
        // Whatever the end, this copy no longer runs the job.
        if let Some(f) = &self.fence {
            if let Err(e) = f.release() {
                warn!(error = %e, "cannot record the release of the image store lease");
            }
        }
        outcome
    }

    /// Inside Slurm: take over the image store from any earlier copy of
    /// this job, and give that copy a bounded time to stop its job.
    async fn take_lease(&mut self) -> Result<(), String> {
        let Some(ctx) = self.slurm.clone() else {
            return Ok(());
        };
        let owner = Owner {
            slurm_job_id: ctx.job_id.clone(),
            node: ctx.node.clone(),
            restart_count: ctx.restart_count,
            host: nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_default(),
            pid: std::process::id(),
        };
        let dir = self.cfg.checkpoint.dir.clone();
        let wait = self.cfg.slurm.fence_wait;
        let (fence, handover) = tokio::task::spawn_blocking(move || {
            let f = Fence::acquire(&dir, owner)?;
            let h = f.await_release(wait);
            Ok::<_, crate::fence::FenceError>((f, h))
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("cannot take the image store lease: {e}"))?;
        match (&fence.previous, handover) {
            (None, _) | (_, Handover::Fresh) => {
                info!(epoch = fence.epoch, "took the image store lease")
            }
            (Some(p), Handover::Released) => info!(
                epoch = fence.epoch,
                previous = %p.owner,
                "took over the image store; the previous copy had stopped"
            ),
            (Some(p), Handover::TimedOut) => warn!(
                epoch = fence.epoch,
                previous = %p.owner,
                wait_s = wait.as_secs_f64(),
                "took over the image store; the previous copy did not confirm it stopped \
                 (its node may be dead); it can no longer publish checkpoints"
            ),
        }
        self.fence = Some(fence);
        Ok(())
    }

    /// The fence's verdict: `Some(reason)` once another copy took over.
    async fn superseded(&self) -> Option<String> {
        let f = self.fence.clone()?;
        match tokio::task::spawn_blocking(move || f.check()).await {
            Ok(Err(e @ crate::fence::FenceError::Superseded { .. })) => Some(e.to_string()),
            Ok(Err(e)) => {
                warn!(error = %e, "cannot check the image store lease");
                None
            }
            _ => None,
        }
    }

    /// Another copy owns the store now: stop the job, publish nothing more.
    async fn give_way(&mut self, job: Option<Running>, reason: String) -> Outcome {
        error!(reason = %reason, "another copy of this job took over; stopping this copy's job and its checkpoints");
        if let Some(j) = job {
            self.stop_job(j).await;
        }
        self.set_state(JobState::Superseded(reason.clone()));
        Outcome::Superseded(reason)
    }

    async fn run_inner(&mut self, mut shutdown: watch::Receiver<bool>) -> Outcome {
        let mut commands = self.commands.take();
        let mut job = match self.start().await {
            Ok(j) => Some(j),
            Err(reason) => return self.fail(reason),
        };
        let mut ticker = Ticker::new(self.cfg.checkpoint.schedule.clone(), Utc::now());
        loop {
            let due = job.as_ref().and_then(|_| ticker.due());
            self.set_state(if job.is_some() {
                JobState::Running
            } else {
                JobState::Stopped
            });
            self.publish(|s| s.next_checkpoint = due);
            let sleep = match due {
                Some(due) => {
                    let d = (due - Utc::now()).to_std().unwrap_or(Duration::ZERO);
                    tokio::time::sleep(d)
                }
                None => tokio::time::sleep(Duration::from_secs(86400 * 365)),
            };
            let fence_tick = tokio::time::sleep(FENCE_CHECK);
            tokio::select! {
                _ = fence_tick, if self.fence.is_some() => {
                    if let Some(reason) = self.superseded().await {
                        return self.give_way(job, reason).await;
                    }
                }
                _ = sleep, if job.is_some() => {
                    if let Some(j) = &job {
                        if let Err(e) = self.checkpoint(j).await {
                            if e.starts_with(SUPERSEDED) {
                                return self.give_way(job, e).await;
                            }
                        }
                    }
                    let skipped = ticker.advance(Utc::now());
                    if skipped > 0 {
                        warn!(skipped, "checkpoint ticks fell during a running step and were skipped");
                    }
                }
                (status, since) = wait_job(&mut job) => {
                    self.job_down();
                    match self.on_death(status, since, &mut shutdown).await {
                        Ok(j) => {
                            job = Some(j);
                            let skipped = ticker.reset(Utc::now());
                            if skipped > 0 {
                                warn!(skipped, "checkpoint ticks fell during the restore and were skipped");
                            }
                        }
                        Err(outcome) => return outcome,
                    }
                }
                Some(cmd) = next_command(&mut commands) => {
                    self.command(cmd, &mut job, &mut ticker).await;
                }
                _ = shutdown.changed() => {
                    return match job {
                        Some(j) => self.shut_down(j).await,
                        None => {
                            info!("shutdown requested; the job is stopped");
                            self.set_state(JobState::Stopped);
                            Outcome::Stopped
                        }
                    };
                }
            }
        }
    }

    /// Carries out one control command between steps, and answers it.
    async fn command(&mut self, cmd: Command, job: &mut Option<Running>, ticker: &mut Ticker) {
        let err = |m: String| Response::Error { message: m };
        match cmd {
            Command::Checkpoint(tx) => {
                let resp = match job.as_ref() {
                    None => err("the job is stopped; start it first".into()),
                    Some(j) => match self.checkpoint(j).await {
                        Ok(info) => Response::Checkpoint {
                            checkpoint: summary(&info),
                        },
                        Err(e) if e.starts_with(SUPERSEDED) => err(e),
                        Err(e) => err(format!("checkpoint failed (the job keeps running): {e}")),
                    },
                };
                let _ = tx.send(resp);
            }
            Command::Stop(with_checkpoint, tx) => {
                let Some(j) = job.take() else {
                    let _ = tx.send(err("the job is already stopped".into()));
                    return;
                };
                let mut note = String::new();
                if with_checkpoint {
                    match self.checkpoint(&j).await {
                        Ok(info) => note = format!(" after checkpoint {}", info.id),
                        Err(e) => {
                            *job = Some(j);
                            let _ = tx.send(err(format!(
                                "checkpoint failed, so the job was not stopped: {e}"
                            )));
                            return;
                        }
                    }
                }
                self.stop_job(j).await;
                info!("job stopped on request");
                self.set_state(JobState::Stopped);
                let _ = tx.send(Response::Done {
                    message: format!("job {} stopped{note}", self.cfg.name),
                });
            }
            Command::Start(tx) => {
                if job.is_some() {
                    let _ = tx.send(err("the job is already running".into()));
                    return;
                }
                self.restores.clear();
                self.consecutive = 0;
                let resp = match self.start().await {
                    Ok(j) => {
                        let m = format!("job {} running as pid {}", self.cfg.name, j.host_pid);
                        *job = Some(j);
                        ticker.reset(Utc::now());
                        Response::Done { message: m }
                    }
                    Err(e) => {
                        self.publish(|s| s.last_error = Some(e.clone()));
                        err(format!("cannot start the job: {e}"))
                    }
                };
                let _ = tx.send(resp);
            }
            Command::Restore(image, tx) => {
                let resp = self.manual_restore(image, job, ticker).await;
                let _ = tx.send(resp);
            }
        }
    }

    /// `supervise restore`: the chosen image is materialised (and so
    /// verified) first, and only then is the running job replaced by it. If CRIU then fails,
    /// the job is recovered as after a death (newest image, or afresh).
    async fn manual_restore(
        &mut self,
        image: Option<String>,
        job: &mut Option<Running>,
        ticker: &mut Ticker,
    ) -> Response {
        let err = |m: String| Response::Error { message: m };
        let img = match &image {
            Some(id) => match self.store.get(id) {
                Ok(i) => i,
                Err(e) => return err(format!("{e}; the job was left as it is")),
            },
            None => match self.list_images().into_iter().next() {
                Some(i) => i,
                None => return err("there are no images to restore from".into()),
            },
        };
        // Written out and verified before the running job is touched: a
        // damaged image is refused with the job left as it is.
        let m = match self.materialise_image(&img).await {
            Ok(m) => m,
            Err(e) => return err(format!("{e}; the job was left as it is")),
        };
        if let Some(j) = job.take() {
            info!(checkpoint = %img.id, "replacing the running job by an image on request");
            self.stop_job(j).await;
        }
        self.set_state(JobState::Restoring);
        let resp = match self.restore_materialised(&img, m).await {
            Ok(r) => {
                let m = format!(
                    "job {} restored from {} as pid {}",
                    self.cfg.name, img.id, r.host_pid
                );
                *job = Some(r);
                Response::Done { message: m }
            }
            Err(e) => {
                warn!(checkpoint = %img.id, error = %e, "requested restore failed; recovering the job");
                let recovered = match self.restore_newest().await {
                    Some(r) => Some(r),
                    None => match self.cfg.target {
                        Target::Launch(_) => self.launch().await.ok(),
                        Target::Attach { .. } => None,
                    },
                };
                let what = match &recovered {
                    Some(r) => format!("the job runs again as pid {}", r.host_pid),
                    None => "the job could not be recovered and is stopped".into(),
                };
                *job = recovered;
                err(format!("restore of {} failed: {e}; {what}", img.id))
            }
        };
        ticker.reset(Utc::now());
        resp
    }

    /// Kills the job and waits for it (bounded); it is then down.
    async fn stop_job(&mut self, mut job: Running) {
        job.kill();
        if job.is_waitable() {
            let _ = tokio::time::timeout(Duration::from_secs(10), job.wait()).await;
        }
        self.job_down();
    }

    /// The job's process is gone: forget it.
    fn job_down(&mut self) {
        self.forget_record();
        self.metrics.up(&self.cfg.name, false);
        self.publish(|s| {
            s.pid = None;
            s.ns_pid = None;
        });
    }

    fn fail(&mut self, reason: String) -> Outcome {
        error!(reason = %reason, "job failed; supervision ends");
        self.set_state(JobState::Failed(reason.clone()));
        Outcome::Failed(reason)
    }

    /// First start: resume from the newest image if there is one, else
    /// launch (or attach).
    async fn start(&mut self) -> Result<Running, String> {
        self.set_state(JobState::Starting);
        if let Some(rec) = self.adopt.take() {
            let r = job::adopt(
                rec.host_pid,
                rec.ns_pid,
                rec.init_pid,
                rec.start_time,
                self.files().status_file,
            )
            .map_err(|e| e.to_string())?;
            info!(
                pid = rec.host_pid,
                ns_pid = rec.ns_pid,
                "re-adopted the job an earlier supervise left running (same pid and start time)"
            );
            self.remember(&r);
            return Ok(r);
        }
        match self.cfg.target.clone() {
            Target::Attach { pid } => {
                let path = self.run_dir.join("attached.json");
                let recorded = crate::fsutil::read_limited(&path, RECORD_MAX)
                    .ok()
                    .and_then(|b| serde_json::from_slice::<AttachRecord>(&b).ok())
                    .filter(|r| r.pid == pid);
                if crate::proc::alive(pid) {
                    match job::attach(pid, recorded.map(|r| r.start_time)) {
                        Ok(r) => {
                            info!(pid, start_time = r.start_time, "attached");
                            let rec = AttachRecord {
                                pid,
                                start_time: r.start_time,
                            };
                            if let Err(e) = serde_json::to_vec(&rec)
                                .map_err(std::io::Error::other)
                                .and_then(|b| crate::fsutil::write_atomic(&path, &b, 0o600))
                            {
                                warn!(error = %e, "cannot record the attached process");
                            }
                            self.remember(&r);
                            return Ok(r);
                        }
                        Err(e) => warn!(
                            pid,
                            error = %e,
                            "not attaching; resuming from the newest image"
                        ),
                    }
                } else {
                    info!(
                        pid,
                        "process to attach to is gone; resuming from the newest image"
                    );
                }
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
        self.remember(&r);
        info!(pid = r.host_pid, ns_pid = r.ns_pid, "started");
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
        self.set_state(JobState::Checkpointing);
        let r = self.checkpoint_inner(job).await;
        match &r {
            Ok(info) => {
                let m = &info.manifest.meta;
                self.metrics.checkpoint_ok(
                    &self.cfg.name,
                    Duration::from_millis(m.duration_ms),
                    m.frozen_us.map(Duration::from_micros),
                    info.size_bytes,
                    info.new_bytes,
                );
                let sum = summary(info);
                self.publish(|s| {
                    s.checkpoints += 1;
                    s.last_checkpoint = Some(sum);
                });
            }
            Err(e) => {
                self.metrics.checkpoint_failed(&self.cfg.name);
                self.publish(|s| s.last_error = Some(format!("checkpoint: {e}")));
            }
        }
        self.set_state(JobState::Running);
        r
    }

    async fn checkpoint_inner(&mut self, job: &Running) -> Result<ImageInfo, String> {
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
        let files_cfg = self.cfg.files.clone();
        let attached = job.init_pid.is_none();
        let ignore = vec![
            self.cfg.checkpoint.dir.clone(),
            self.run_dir.join("restore"),
        ];
        let res = tokio::task::spawn_blocking(move || {
            let dir = staging.path().to_path_buf();
            let mut files: Option<Result<CaptureSummary, FilesError>> = None;
            let mut tree: Vec<ProcId> = Vec::new();
            // CRIU's post-dump notification comes while the tree is still
            // frozen: the job's files (and an attached job's processes) are
            // recorded at the instant of the dump.
            let mut on_notify = |script: &str| {
                if script != "post-dump" {
                    return true;
                }
                let pids = crate::proc::tree(host_pid);
                if attached {
                    tree = pids.iter().filter_map(|p| ProcId::of(*p)).collect();
                }
                if !files_cfg.rollback {
                    return true;
                }
                let r = crate::files::capture(&pids, &files_cfg, &ignore, &dir);
                let ok = r.is_ok();
                files = Some(r);
                ok
            };
            let r = crate::criu::dump_with(
                &reaper,
                host_pid,
                &dir,
                &opts,
                timeout,
                mode,
                &mut on_notify,
            );
            (staging, r, files, tree)
        })
        .await;
        let (staging, outcome, files, tree) = match res {
            Ok(x) => x,
            Err(e) => return Err(format!("checkpoint task failed: {e}")),
        };
        let files = match (outcome.is_ok(), files, self.cfg.files.rollback) {
            (_, Some(Err(e)), _) => Err(format!("cannot record the job's files: {e}")),
            (true, None, true) => Err("CRIU sent no post-dump notification, so the job's files \
                 could not be recorded at the instant of the dump"
                .to_string()),
            (_, f, _) => Ok(f.and_then(Result::ok)),
        };
        let (outcome, files) = match (outcome, files) {
            (Ok(o), Ok(f)) => (o, f),
            (o, f) => {
                let e = match (o, f) {
                    (_, Err(e)) => e,
                    (Err(e), _) => e.to_string(),
                    _ => unreachable!(),
                };
                staging.abort();
                error!(checkpoint = %id, error = %e, "checkpoint failed; the job keeps running, older images are intact");
                // A dump that died half-way (CRIU killed, timeout) must not
                // leave the job stopped.
                let _ = tokio::task::spawn_blocking(move || resume_stopped(host_pid)).await;
                return Err(e);
            }
        };
        let mut extra = serde_json::Map::new();
        if let Some(f) = &files {
            extra.insert("files".into(), f.files.into());
            extra.insert("files_copied".into(), f.snapshots.into());
            extra.insert("files_copied_bytes".into(), f.bytes_copied.into());
            extra.insert("files_us".into(), (f.elapsed.as_micros() as u64).into());
        }
        if !tree.is_empty() {
            if let Ok(v) = serde_json::to_value(&tree) {
                extra.insert("tree".into(), v);
            }
        }
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
            extra,
        };
        // Inside Slurm, publish only while holding our lease on the store.
        let guard = match &self.fence {
            Some(f) => match f.guard() {
                Ok(g) => Some(g),
                Err(e) => {
                    staging.abort();
                    return Err(format!("{SUPERSEDED}: {e}"));
                }
            },
            None => None,
        };
        let store = self.store.clone();
        let info = match tokio::task::spawn_blocking(move || {
            let r = staging.commit(meta);
            drop(guard);
            r
        })
        .await
        {
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
            files = files.as_ref().map_or(0, |f| f.files),
            files_copied_bytes = files.as_ref().map_or(0, |f| f.bytes_copied),
            files_ms = files.as_ref().map_or(0.0, |f| f.elapsed.as_micros() as f64 / 1000.0),
            "checkpoint published"
        );
        if attached && !tree.is_empty() {
            self.last_tree = tree;
        }
        let keep = self.cfg.checkpoint.keep;
        let fence = self.fence.clone();
        let span = tracing::Span::current();
        let _ = tokio::task::spawn_blocking(move || {
            let _g = span.enter();
            // A copy that lost the store must not delete anything in it.
            let _guard = match &fence {
                Some(f) => match f.guard() {
                    Ok(g) => Some(g),
                    Err(e) => {
                        warn!(error = %e, "retention and gc skipped");
                        return;
                    }
                },
                None => None,
            };
            retain_and_gc(&store, keep)
        })
        .await;
        Ok(info)
    }

    /// Tries images newest first: verify, then CRIU restore.
    async fn restore_newest(&mut self) -> Option<Running> {
        self.set_state(JobState::Restoring);
        let images = self.list_images();
        self.kill_survivors(images.first()).await;
        if images.is_empty() {
            info!("no images to restore from");
        }
        for img in images {
            match self.restore_image(&img).await {
                Ok(r) => return Some(r),
                Err(e) => {
                    warn!(checkpoint = %img.id, error = %e, "cannot restore this image; trying the next older one")
                }
            }
        }
        None
    }

    /// Before an attached job is restored: every process of its tree at the
    /// last checkpoint (known from this run, or recorded in the newest
    /// image) that still lives, by PID *and* start time, is killed, so that
    /// exactly one copy of the job runs. A launched or once-restored job
    /// needs none of this: killing its namespace init kills everything.
    async fn kill_survivors(&mut self, newest: Option<&ImageInfo>) {
        if !matches!(self.cfg.target, Target::Attach { .. }) {
            return;
        }
        let mut ids = std::mem::take(&mut self.last_tree);
        if ids.is_empty() {
            if let Some(v) = newest.and_then(|i| i.manifest.meta.extra.get("tree")) {
                ids = serde_json::from_value(v.clone()).unwrap_or_default();
            }
        }
        if ids.is_empty() {
            return;
        }
        let killed = tokio::task::spawn_blocking(move || {
            ids.into_iter()
                .filter(|id| crate::proc::kill_exact(*id, Duration::from_secs(5)))
                .map(|id| id.pid)
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        if !killed.is_empty() {
            warn!(
                pids = ?killed,
                "processes of the attached job outlived its root; killed them so that only the restored copy runs"
            );
        }
    }

    /// Restores one image: materialise it, then roll files back and let
    /// CRIU restore it.
    async fn restore_image(&mut self, img: &ImageInfo) -> Result<Running, String> {
        match self.materialise_image(img).await {
            Ok(m) => self.restore_materialised(img, m).await,
            Err(e) => {
                self.restore_failed(img, &e);
                Err(e)
            }
        }
    }

    /// Writes the image out for CRIU, every piece verified as it is read.
    /// Touches neither the job nor its files.
    async fn materialise_image(&self, img: &ImageInfo) -> Result<Materialised, String> {
        let store = self.store.clone();
        let fallback = self.run_dir.join("restore");
        let need = img.size_bytes;
        let img2 = img.clone();
        tokio::task::spawn_blocking(move || {
            let work = crate::store::scratch_dir(&fallback, need)
                .map_err(|e| format!("cannot create a directory to restore into: {e}"))?;
            store.materialise(&img2, &work).map_err(|e| match e {
                crate::store::StoreError::Corrupt { .. } => {
                    format!("image failed verification: {e}")
                }
                e => format!("cannot prepare {} for CRIU: {e}", work.display()),
            })
        })
        .await
        .map_err(|e| format!("restore task failed: {e}"))
        .and_then(|r| r)
    }

    fn restore_failed(&self, img: &ImageInfo, e: &str) {
        self.metrics.restore(&self.cfg.name, false, None);
        self.publish(|s| s.last_error = Some(format!("restore from {}: {e}", img.id)));
    }

    /// Rolls the job's files back to the materialised image, then CRIU
    /// restores it; the materialised copy is removed either way.
    async fn restore_materialised(
        &mut self,
        img: &ImageInfo,
        m: Materialised,
    ) -> Result<Running, String> {
        let reaper = self.reaper.clone();
        let opts = self.cfg.checkpoint.criu;
        let files = self.files();
        let files_cfg = self.cfg.files.clone();
        let materialise = m.duration;
        let res =
            tokio::task::spawn_blocking(move || -> Result<(job::Restored, Vec<Action>), String> {
                // The job's files go back to the checkpoint's instant
                // before CRIU reopens them.
                let r = crate::files::rollback_checked(&m.path, &files_cfg)
                    .map_err(|e| e.to_string())
                    .and_then(|(actions, expect)| {
                        pause_point("after-rollback");
                        // CRIU reopens the job's files by path: before the
                        // restored tree runs, each descriptor that held a
                        // rolled-back file must hold that very file.
                        let mut refusal = None;
                        let mut on_notify = |script: &str, init: i32| {
                            if script != "post-restore" || expect.is_empty() {
                                return true;
                            }
                            let map = crate::proc::ns_pid_map(init);
                            match crate::files::verify_restored(&expect, &|p| map.get(&p).copied())
                            {
                                Ok(()) => true,
                                Err(e) => {
                                    refusal = Some(e.to_string());
                                    false
                                }
                            }
                        };
                        let res = job::restore(&reaper, &m.path, &opts, &files, &mut on_notify);
                        match (res, refusal) {
                            (Ok(r), _) => Ok((r, actions)),
                            (Err(_), Some(why)) => Err(why),
                            (Err(e), None) => Err(e.to_string()),
                        }
                    });
                // The restored job does not use the image files: free the
                // (tmpfs) space.
                let _ = std::fs::remove_dir_all(&m.path);
                r
            })
            .await
            .map_err(|e| format!("restore task failed: {e}"))
            .and_then(|r| r);
        let (r, actions) = match res {
            Ok(x) => x,
            Err(e) => {
                self.restore_failed(img, &e);
                return Err(e);
            }
        };
        if !actions.is_empty() {
            let changed = actions
                .iter()
                .filter(|a| !matches!(a, Action::Keep(_)))
                .count();
            info!(checkpoint = %img.id, files = actions.len(), changed, "job files rolled back to the checkpoint");
        }
        // job.json first: whoever reads the log line finds the new pid.
        self.remember(&r.running);
        info!(
            checkpoint = %img.id,
            duration_ms = (r.duration + materialise).as_millis() as u64,
            materialise_ms = materialise.as_millis() as u64,
            criu_restore_ms = r.criu_restore_us.map(|u| u as f64 / 1000.0).unwrap_or(f64::NAN),
            pid = r.running.host_pid,
            ns_pid = r.running.ns_pid,
            "restored"
        );
        self.metrics
            .restore(&self.cfg.name, true, Some(r.duration + materialise));
        self.publish(|s| s.restores += 1);
        Ok(r.running)
    }

    /// The job died: decide, back off, restore (or relaunch), or give up.
    async fn on_death(
        &mut self,
        status: ExitStatus,
        since: Instant,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<Running, Outcome> {
        self.set_state(JobState::Dead);
        let ran = since.elapsed();
        let wanted = match self.cfg.restore.on {
            RestoreOn::Never => false,
            RestoreOn::Failure => !status.success(),
            RestoreOn::Always => true,
        };
        if !wanted {
            if status.success() {
                info!(%status, "job exited; supervision ends");
                self.set_state(JobState::Completed);
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
                    self.set_state(JobState::Stopped);
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

    async fn shut_down(&mut self, job: Running) -> Outcome {
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
                self.set_state(JobState::Stopped);
                Outcome::Detached
            }
            ShutdownAction::Stop => {
                self.stop_job(job).await;
                info!("job stopped");
                self.set_state(JobState::Stopped);
                Outcome::Stopped
            }
        }
    }

    fn remember(&self, r: &Running) {
        self.metrics.up(&self.cfg.name, true);
        let (pid, ns_pid) = (r.host_pid, r.ns_pid);
        self.publish(|s| {
            s.pid = Some(pid).filter(|p| *p > 0);
            s.ns_pid = Some(ns_pid);
            s.since = Some(Utc::now());
        });
        let rec = JobRecord {
            host_pid: r.host_pid,
            ns_pid: r.ns_pid,
            init_pid: r.init_pid,
            start_time: r.start_time,
        };
        let path = self.run_dir.join("job.json");
        if let Ok(s) = serde_json::to_vec(&rec) {
            if let Err(e) = crate::fsutil::write_atomic(&path, &s, 0o600) {
                warn!(error = %e, "cannot record the job's pid");
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
        let _ = std::fs::remove_file(self.run_dir.join("job.json"));
    }
}

/// Testing aid: with `SUPERVISE_PAUSE=<name>` and `SUPERVISE_PAUSE_FILE=F`
/// set, the step named `name` creates `F.reached` and waits (at most 60 s)
/// while `F` exists, so that a test can act in a precise window (e.g. an
/// attacker swapping a file between the rollback and CRIU's reopen).
fn pause_point(name: &str) {
    if !matches!(std::env::var("SUPERVISE_PAUSE").as_deref(), Ok(n) if n == name) {
        return;
    }
    let Some(file) = std::env::var_os("SUPERVISE_PAUSE_FILE").map(PathBuf::from) else {
        return;
    };
    if !file.exists() {
        return;
    }
    let mut reached = file.clone().into_os_string();
    reached.push(".reached");
    let _ = std::fs::write(&reached, name);
    warn!(
        pause = name,
        "SUPERVISE_PAUSE reached: waiting for the test"
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while file.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// After a failed dump: any process of the job left stopped is resumed.
/// CRIU seizes the tree with ptrace; if CRIU dies, the kernel detaches it
/// and the tasks run on, which is waited for briefly; a task in a job-control
/// stop gets SIGCONT. Returns how many tasks were resumed.
pub fn resume_stopped(root: i32) -> usize {
    let mut resumed = 0;
    let deadline = Instant::now() + Duration::from_secs(2);
    for pid in crate::proc::tree(root) {
        loop {
            match crate::proc::state(pid) {
                Some('t') if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Some('T') => {
                    warn!(pid, "a failed dump left this process stopped; resuming it");
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGCONT,
                    );
                    resumed += 1;
                    break;
                }
                Some('t') => {
                    warn!(
                        pid,
                        "a process of the job is still held in a trace stop after a failed dump"
                    );
                    break;
                }
                _ => break,
            }
        }
    }
    resumed
}

/// Waits for the job's end; never resolves while there is no job.
async fn wait_job(job: &mut Option<Running>) -> (ExitStatus, Instant) {
    match job {
        Some(j) => {
            let status = j.wait().await;
            (status, j.since)
        }
        None => std::future::pending().await,
    }
}

/// The next control command; never resolves without a control socket.
async fn next_command(commands: &mut Option<mpsc::Receiver<Command>>) -> Option<Command> {
    match commands {
        Some(rx) => match rx.recv().await {
            Some(c) => Some(c),
            None => std::future::pending().await,
        },
        None => std::future::pending().await,
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

/// Largest `job.json` read back (it holds four numbers).
const RECORD_MAX: u64 = 64 << 10;

fn read_record(state_dir: &Path) -> Option<JobRecord> {
    let bytes = crate::fsutil::read_limited(&state_dir.join("job.json"), RECORD_MAX).ok()?;
    serde_json::from_slice(&bytes).ok()
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
    fn stopped_job_is_resumed() {
        let mut c = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = c.id() as i32;
        let p = nix::unistd::Pid::from_raw(pid);
        nix::sys::signal::kill(p, nix::sys::signal::Signal::SIGSTOP).unwrap();
        let t0 = Instant::now();
        while crate::proc::state(pid) != Some('T') {
            assert!(t0.elapsed() < Duration::from_secs(5));
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(resume_stopped(pid), 1);
        let t0 = Instant::now();
        while crate::proc::state(pid) == Some('T') {
            assert!(t0.elapsed() < Duration::from_secs(5), "still stopped");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(resume_stopped(pid), 0);
        let _ = c.kill();
        let _ = c.wait();
    }

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
