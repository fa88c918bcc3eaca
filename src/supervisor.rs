//! The per-job supervisor: a state machine (running, checkpointing, dead,
//! restoring) driven by three kinds of events: the checkpoint schedule, the
//! job's death (reported by the reaper or a pidfd, never polled) and
//! supervise's own shutdown.
//!
//! Everything one job does happens on one task, one step at a time, so a job
//! never has two checkpoints at once, nor a checkpoint during a restore.
//! A tick that came due before the checkpoint for the previous one started
//! (or during a restore) is skipped, counted and logged; the newest tick
//! missed while a checkpoint ran is served at once
//! ([`crate::schedule::Ticker`], `tuning.rs`).

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

/// How a start that gave up after a resource shortage begins its reason.
const RESOURCE_PREFIX: &str = "a resource of supervise's ran short: ";

/// How often a copy inside Slurm checks that it still holds the store.
const FENCE_CHECK: Duration = Duration::from_secs(1);

use crate::config::{JobConfig, RestoreOn, ShutdownAction, Target};
use crate::criu::DumpMode;
use crate::files::{Action, CaptureSummary, FilesError};
use crate::job::{self, InitFiles, Running};
use crate::reaper::{ExitStatus, Reaper};
use crate::schedule::Ticker;
use crate::store::{CheckpointExtra, CheckpointMeta, ImageInfo, ImageStore, Materialised};

mod checkpoint;
pub mod engine;
pub mod policy;
mod record;
mod restore;
mod scrub;
mod tuning;

pub use checkpoint::summary;
pub use engine::{Criu, Engine};
pub use policy::{Decision, History, Verb};

/// Why a checkpoint was not published (the job keeps running either way).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckpointError {
    /// Another copy of this job (Slurm) took over the image store: this
    /// copy must publish nothing more and stop its job.
    #[error("superseded: {0}")]
    Superseded(String),
    /// The job had already ended.
    #[error("the job has already ended")]
    Ended,
    /// CRIU, the file recording or the store failed.
    #[error("{0}")]
    Failed(String),
}
pub use record::JobRecord;
use record::{read_record, AttachRecord, RECORD_MAX};

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

pub use crate::control::protocol::JobState;

pub use crate::control::Shutdown;

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

/// Supervises one job.
pub struct Supervisor {
    cfg: JobConfig,
    store: ImageStore,
    /// Launch, dump, restore: CRIU, or a test double.
    engine: std::sync::Arc<dyn Engine>,
    state: JobState,
    /// The restart policy's memory of earlier deaths.
    history: History,
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
    /// Whether lazy restores work here (asked of CRIU at the first restore).
    lazy_ok: Option<bool>,
    /// Images whose lazy restore could not serve a page.
    lazy_failures: crate::pages::LazyFailures,
    /// A lazy restore still pushing the job's memory.
    lazy: Option<PendingLazy>,
    /// Interval, skipped ticks, dump slots.
    tuning: tuning::Tuning,
    _lock: File,
}

/// A lazy restore whose pages are still being served.
struct PendingLazy {
    image: String,
    /// When the restore began (materialising included).
    began: Instant,
    end: tokio::task::JoinHandle<crate::criu::lazy::LazyOutcome>,
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
        let store = ImageStore::open_with(&cfg.checkpoint.dir, &cfg.store).map_err(|source| {
            SupervisorError::Store {
                job: job.clone(),
                source,
            }
        })?;
        // Image files a crashed restore left behind (possibly GiBs of tmpfs).
        crate::store::remove_scratch(&run_dir.join("restore"));
        Ok(Supervisor {
            tuning: tuning::Tuning::new(&cfg),
            cfg,
            store,
            engine: std::sync::Arc::new(Criu::new(reaper)),
            state: JobState::Starting,
            history: History::default(),
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
            lazy_ok: None,
            lazy_failures: Default::default(),
            lazy: None,
            _lock: lock,
        })
    }

    /// Connects the job to the control socket and the metrics.
    pub fn connect(&mut self, port: JobPort, metrics: Metrics) {
        self.status = Some(port.status);
        self.commands = Some(port.commands);
        self.metrics = metrics;
        self.metrics.declare_job(&self.cfg.name);
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

    fn files(&self) -> InitFiles {
        InitFiles {
            status_file: self.run_dir.join("exit-status"),
        }
    }

    /// Runs the job until it completes, fails for good, or `shutdown` fires.
    pub async fn run(mut self, shutdown: watch::Receiver<Shutdown>) -> Outcome {
        info!(
            schedule = %self.cfg.checkpoint.schedule.describe(),
            images = %self.cfg.checkpoint.dir.display(),
            "supervising"
        );
        if let Err(reason) = self.take_lease().await {
            return self.fail(reason);
        }
        let scrub = self
            .cfg
            .store
            .scrub
            .map(|every| scrub::start(self.store.clone(), every));
        let outcome = self.run_inner(shutdown).await;
        if let Some(s) = scrub {
            s.abort();
        }
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

    async fn run_inner(&mut self, mut shutdown: watch::Receiver<Shutdown>) -> Outcome {
        let mut commands = self.commands.take();
        let mut job = match self.start(Some(&mut shutdown)).await {
            Ok(j) => Some(j),
            Err(reason) => return self.fail(reason),
        };
        self.job_running();
        let mut ticker = Ticker::with_phase(
            self.cfg.checkpoint.schedule.clone(),
            Utc::now(),
            crate::interval::phase(&self.cfg.name),
        );
        self.retune(&mut ticker);
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
                        self.tuning.due = due;
                        if let Err(CheckpointError::Superseded(reason)) = self.checkpoint(j).await {
                            return self.give_way(job, reason).await;
                        }
                    }
                    self.tick_served(&mut ticker, due);
                    self.retune(&mut ticker);
                }
                outcome = wait_lazy(&mut self.lazy) => {
                    self.lazy_done(outcome);
                }
                (status, since) = wait_job(&mut job) => {
                    self.job_down();
                    // A lazy restore that killed the job (a page it could
                    // not serve) says so before the job is restored again.
                    if self.lazy.is_some() {
                        let _ = tokio::time::timeout(Duration::from_secs(2), self.settle_lazy()).await;
                    }
                    match self.on_death(status, since, &mut shutdown).await {
                        Ok(j) => {
                            job = Some(j);
                            self.job_running();
                            let skipped = ticker.reset(Utc::now());
                            self.ticks_skipped(skipped, "fell during the restore");
                            self.retune(&mut ticker);
                        }
                        Err(outcome) => return outcome,
                    }
                }
                Some(cmd) = next_command(&mut commands) => {
                    self.command(cmd, &mut job, &mut ticker).await;
                    if job.is_some() && self.tuning.run_mark.is_none() {
                        self.job_running();
                    }
                }
                _ = shutdown.changed() => {
                    let how = *shutdown.borrow_and_update();
                    return match job {
                        Some(j) if how == Shutdown::DetachAll => {
                            // A lazily restored job must hold all its
                            // memory before supervise may go away.
                            self.settle_lazy().await;
                            self.detach(j)
                        }
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
        let verb = match &cmd {
            Command::Checkpoint(_) => Verb::Checkpoint,
            Command::Stop(..) => Verb::Stop,
            Command::Start(_) => Verb::Start,
            Command::Restore(..) => Verb::Restore,
        };
        if let Err(why) = policy::admit(verb, job.is_some()) {
            let tx = match cmd {
                Command::Checkpoint(tx) | Command::Stop(_, tx) | Command::Start(tx) => tx,
                Command::Restore(_, tx) => tx,
            };
            let _ = tx.send(err(why.into()));
            return;
        }
        match cmd {
            Command::Checkpoint(tx) => {
                let Some(j) = job.as_ref() else { return };
                let resp = match self.checkpoint(j).await {
                    Ok(info) => Response::Checkpoint {
                        checkpoint: summary(&info),
                    },
                    Err(e @ CheckpointError::Superseded(_)) => err(e.to_string()),
                    Err(e) => err(format!("checkpoint failed (the job keeps running): {e}")),
                };
                let _ = tx.send(resp);
            }
            Command::Stop(with_checkpoint, tx) => {
                let Some(j) = job.take() else { return };
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
                self.history.reset();
                let resp = match self.start(None).await {
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
        self.job_not_running();
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
    /// launch (or attach). With `shutdown`, a step that fails for want of
    /// a resource of supervise's (descriptors, memory) is tried again
    /// until it works or supervise shuts down; without (a control
    /// command), that failure is the answer.
    async fn start(
        &mut self,
        mut shutdown: Option<&mut watch::Receiver<Shutdown>>,
    ) -> Result<Running, String> {
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
            self.remember(&r).await;
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
                            self.remember(&r).await;
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
                match self.restore_newest_retrying(shutdown).await {
                    Ok(r) => Ok(r),
                    Err(e) => Err(format!("process {pid} does not exist and {e}")),
                }
            }
            Target::Launch(_) => {
                let mut pause = restore::RESOURCE_PAUSE_MIN;
                let any = loop {
                    match self.try_list_images().await {
                        Ok(v) => break !v.is_empty(),
                        Err(e) if e.is_resource() => {
                            let e = format!("cannot list the images: {e}");
                            if !self
                                .resource_wait(
                                    "start the job",
                                    &e,
                                    &mut pause,
                                    shutdown.as_deref_mut(),
                                )
                                .await
                            {
                                return Err(e);
                            }
                        }
                        Err(e) => {
                            warn!(error = %e, "cannot list images");
                            break false;
                        }
                    }
                };
                if any {
                    info!("images found; resuming from the newest instead of starting afresh");
                    match self.restore_newest_retrying(shutdown.as_deref_mut()).await {
                        Ok(r) => return Ok(r),
                        Err(e) if e.starts_with(RESOURCE_PREFIX) => return Err(e),
                        Err(_) => warn!("no image could be restored; starting the command afresh"),
                    }
                }
                self.launch_retrying(shutdown).await
            }
        }
    }

    /// [`restore_newest`](Self::restore_newest), tried again after each
    /// resource shortage while `shutdown` allows.
    async fn restore_newest_retrying(
        &mut self,
        mut shutdown: Option<&mut watch::Receiver<Shutdown>>,
    ) -> Result<Running, String> {
        let mut pause = restore::RESOURCE_PAUSE_MIN;
        loop {
            match self.restore_newest().await {
                Ok(r) => return Ok(r),
                Err(restore::Failed::Resource(e)) => {
                    if !self
                        .resource_wait("restore the job", &e, &mut pause, shutdown.as_deref_mut())
                        .await
                    {
                        return Err(format!("{RESOURCE_PREFIX}{e}"));
                    }
                }
                Err(_) => return Err("no image could be restored".into()),
            }
        }
    }

    /// Launches the job's command, tried again after each resource
    /// shortage while `shutdown` allows.
    async fn launch_retrying(
        &mut self,
        mut shutdown: Option<&mut watch::Receiver<Shutdown>>,
    ) -> Result<Running, String> {
        let mut pause = restore::RESOURCE_PAUSE_MIN;
        loop {
            match self.launch_once().await {
                Ok(r) => return Ok(r),
                Err(restore::Failed::Resource(e)) => {
                    if !self
                        .resource_wait("start the command", &e, &mut pause, shutdown.as_deref_mut())
                        .await
                    {
                        return Err(e);
                    }
                }
                Err(e) => return Err(e.into_message()),
            }
        }
    }

    async fn launch(&mut self) -> Result<Running, String> {
        self.launch_once()
            .await
            .map_err(restore::Failed::into_message)
    }

    async fn launch_once(&mut self) -> Result<Running, restore::Failed> {
        use restore::Failed;
        let Target::Launch(spec) = self.cfg.target.clone() else {
            return Err(Failed::Other("attached jobs cannot be launched".into()));
        };
        let engine = self.engine.clone();
        let files = self.files();
        let r = tokio::task::spawn_blocking(move || engine.launch(&spec, &files))
            .await
            .map_err(|e| Failed::Other(e.to_string()))?
            .map_err(|e| {
                let msg = format!("cannot start the command: {e}");
                if e.is_resource() {
                    Failed::Resource(msg)
                } else {
                    Failed::Other(msg)
                }
            })?;
        self.remember(&r).await;
        info!(pid = r.host_pid, ns_pid = r.ns_pid, "started");
        Ok(r)
    }

    /// The published images, newest first (read on a blocking thread);
    /// empty when they cannot be listed (logged).
    async fn list_images(&self) -> Vec<ImageInfo> {
        self.try_list_images().await.unwrap_or_else(|e| {
            warn!(error = %e, "cannot list images");
            Vec::new()
        })
    }

    /// The published images, newest first, or why they cannot be listed.
    async fn try_list_images(&self) -> Result<Vec<ImageInfo>, crate::store::StoreError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.list())
            .await
            .unwrap_or_else(|e| {
                Err(crate::store::StoreError::Io {
                    path: PathBuf::from("list"),
                    source: std::io::Error::other(e.to_string()),
                })
            })
    }

    /// `supervise detach-all`: no checkpoint, the job keeps running and
    /// its `job.json` stays, so the next `supervise run` re-adopts it.
    fn detach(&mut self, job: Running) -> Outcome {
        info!(
            pid = job.host_pid,
            "leaving the job running (detach-all); a new supervise re-adopts it"
        );
        self.set_state(JobState::Stopped);
        Outcome::Detached
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

/// The end of a lazy restore's serving; never resolves without one.
async fn wait_lazy(
    lazy: &mut Option<PendingLazy>,
) -> (PendingLazy, crate::criu::lazy::LazyOutcome) {
    match lazy.as_mut() {
        Some(p) => {
            let o = (&mut p.end)
                .await
                .unwrap_or_else(|e| crate::criu::lazy::LazyOutcome {
                    result: Err(format!("the lazy restore task failed: {e}")),
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

#[cfg(test)]
mod tests;
