//! The per-job supervisor: a state machine (running, checkpointing, dead,
//! restoring) driven by four kinds of events: the checkpoint schedule, the
//! job's death (reported by the reaper or a pidfd, never polled), the end
//! of a lazy restore's page serving, control commands, and supervise's
//! own shutdown.
//!
//! Everything one job does happens on one task, one step at a time, so a job
//! never has two checkpoints at once, nor a checkpoint during a restore.
//!
//! The supervisor owns its state in named parts, each with its own
//! methods: [`Ctx`] (what does not change while it runs: the job file,
//! the store, the engine, the state directory, the Slurm lease),
//! `Report` (status and metrics), `Cadence` (ticks, interval, dump
//! slots), `Tree` (the running job, its lazy restore, an attached job's
//! processes) and `Recovery` (the restart policy's history, images that
//! failed a lazy restore). The procedures take the parts they need:
//! `checkpoint.rs` (a checkpoint), `restore.rs` (restoring, and the death
//! handling that leads there), `start.rs` (adopt, attach, launch or
//! resume). It reaches processes, CRIU and the job's files only through
//! its [`Engine`] (`engine.rs`; the real one is [`Criu`]).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tracing::{error, info, warn};

use crate::config::{JobConfig, ShutdownAction, Target};
use crate::control::{Command, JobPort, Response};
use crate::fence::{Fence, Handover, Owner};
use crate::job::InitFiles;
use crate::metrics::Metrics;
use crate::slurm::SlurmContext;
use crate::store::ImageStore;

mod cadence;
mod checkpoint;
mod criu_engine;
pub mod engine;
mod errors;
pub mod policy;
mod record;
mod report;
mod restore;
mod scrub;
mod start;
mod tree;

pub use criu_engine::Criu;
pub use engine::Engine;
pub use errors::CheckpointError;
pub use policy::{Decision, History, Verb};
pub use record::JobRecord;
pub use report::summary;

use cadence::Cadence;
use report::Report;
use tree::Tree;

pub use crate::control::protocol::JobState;
pub use crate::control::Shutdown;

/// How often a copy inside Slurm checks that it still holds the store.
const FENCE_CHECK: Duration = Duration::from_secs(1);

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

/// How supervision of a job ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The job exited in a way that needs no restore (e.g. exit 0).
    Completed(crate::reaper::ExitStatus),
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

/// What a supervisor works with and does not change while it runs.
pub(crate) struct Ctx<E> {
    /// The job file.
    pub(crate) cfg: JobConfig,
    /// The job's image store.
    pub(crate) store: ImageStore,
    /// Processes, CRIU, the job's files.
    pub(crate) engine: Arc<E>,
    /// Where the per-run files live (the state dir, or a per-Slurm-run
    /// subdirectory of it).
    pub(crate) run_dir: PathBuf,
    /// Inside Slurm: the job's context.
    pub(crate) slurm: Option<SlurmContext>,
    /// Inside Slurm: our lease on the image store (taken at start).
    pub(crate) fence: Option<Fence>,
    /// `<run_dir>/shadow`: the copied files' content as of the last
    /// checkpoint, so that a checkpoint rewrites only what changed while
    /// the job is frozen (`None` if it cannot be made: whole copies).
    pub(crate) shadow_dir: Option<PathBuf>,
    /// CRIU's version, recorded in each manifest.
    pub(crate) criu_version: String,
    /// The node service's limit on the images of the job's owner.
    pub(crate) quota: Option<Quota>,
    /// The watch of the job's directories (`[files] watch`).
    pub(crate) tracker: Option<Arc<crate::files::Tracker>>,
}

/// The watch of a launched job's directories, when `[files] rollback` and
/// `watch` ask for it: its working directory (and below), the directories
/// of the files listed in `[files] snapshot`; not the image store, the directory's own files, nor `[files] exclude`. Markers go in
/// `<run_dir>/watch`.
fn tracker_for(cfg: &JobConfig, run_dir: &Path) -> Option<Arc<crate::files::Tracker>> {
    let Target::Launch(spec) = &cfg.target else {
        return None;
    };
    if !cfg.files.rollback || !cfg.files.watch {
        return None;
    }
    let sync = run_dir.join("watch");
    if let Err(e) = crate::fsutil::ensure_trusted_dir("watch directory", &sync) {
        warn!(error = %e, "cannot watch the job's directories; only the files it has open at a checkpoint are rolled back");
        return None;
    }
    let extra: Vec<PathBuf> = cfg
        .files
        .snapshot
        .iter()
        .filter_map(|p| p.parent().map(Path::to_path_buf))
        .collect();
    // supervise's own directories (the job's private /tmp, in the state
    // directory, is watched like any other).
    let mut exclude = cfg.files.exclude.clone();
    exclude.push(cfg.checkpoint.dir.clone());
    for own in ["watch", "shadow", "restore"] {
        exclude.push(run_dir.join(own));
    }
    Some(Arc::new(crate::files::Tracker::new(
        sync,
        Some(spec.cwd.clone()),
        extra,
        exclude,
    )))
}

/// A limit on the bytes of images one user may keep: every directory
/// under `root` counts (all of the user's stores).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quota {
    /// The user's area.
    pub root: PathBuf,
    /// Bytes allowed.
    pub max_bytes: u64,
}

impl<E> Ctx<E> {
    /// Where the init records the job's end, and whose the job is.
    pub(crate) fn init_files(&self) -> InitFiles {
        InitFiles {
            status_file: self.run_dir.join("exit-status"),
            owner: self.cfg.owner.clone(),
            private_tmp: self.private_tmp(),
            watch: None,
        }
    }

    /// The job's private /tmp (`<state_dir>/tmp`), made if need be: the
    /// owner's (0700) for a job that runs as its owner, else root's with
    /// /tmp's mode (1777). `None` when the job has none (`private_tmp =
    /// false`, an attached process) or it cannot be made (logged; the job
    /// then shares the host's /tmp).
    pub(crate) fn private_tmp(&self) -> Option<PathBuf> {
        if !self.has_private_tmp() {
            return None;
        }
        let dir = private_tmp_dir(&self.cfg.state_dir);
        match ensure_private_tmp(&dir, self.cfg.owner.as_ref()) {
            Ok(()) => Some(dir),
            Err(e) => {
                warn!(dir = %dir.display(), error = %e, "cannot make the job's private /tmp; it shares the host's /tmp");
                None
            }
        }
    }

    /// Whether the job gets a private /tmp: asked (`private_tmp`, the
    /// default) for a launched job none of whose own paths (working
    /// directory, output files, program) is under /tmp, which its private
    /// /tmp would hide.
    pub(crate) fn has_private_tmp(&self) -> bool {
        match &self.cfg.target {
            Target::Launch(s) => s.private_tmp && paths_under_tmp(s).is_empty(),
            Target::Attach { .. } => false,
        }
    }

    /// The `[files]` table, with the job's private /tmp as a view (the
    /// job's `/tmp/...` is `<state_dir>/tmp/...` outside its namespace)
    /// and the shadow directory.
    pub(crate) fn files_config(&self) -> crate::files::FilesConfig {
        let mut f = self.cfg.files.clone();
        f.shadow_dir = self.shadow_dir.clone();
        if self.has_private_tmp() {
            f.views
                .push((PathBuf::from("/tmp"), private_tmp_dir(&self.cfg.state_dir)));
        }
        f
    }

    /// Removes the job's private /tmp (the job has ended for good).
    pub(crate) fn remove_private_tmp(&self) {
        let dir = private_tmp_dir(&self.cfg.state_dir);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => info!(dir = %dir.display(), "removed the job's private /tmp"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                warn!(dir = %dir.display(), error = %e, "cannot remove the job's private /tmp")
            }
        }
    }
}

/// The job's own paths under /tmp (its private /tmp would hide them).
pub fn paths_under_tmp(spec: &crate::config::LaunchSpec) -> Vec<PathBuf> {
    let prog = spec
        .command
        .first()
        .map(PathBuf::from)
        .filter(|p| p.is_absolute());
    [
        Some(spec.cwd.clone()),
        Some(spec.stdout.clone()),
        Some(spec.stderr.clone()),
        prog,
    ]
    .into_iter()
    .flatten()
    .filter(|p| p.starts_with("/tmp"))
    .collect()
}

/// Where the private /tmp of the job whose state directory is `state_dir`
/// lives.
pub fn private_tmp_dir(state_dir: &std::path::Path) -> PathBuf {
    state_dir.join("tmp")
}

/// Makes `dir` (in the job's trusted state directory) a directory, never
/// through a symlink, owned and moded as [`Ctx::private_tmp`] says.
fn ensure_private_tmp(
    dir: &std::path::Path,
    owner: Option<&crate::userns::Owner>,
) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    match std::fs::create_dir(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(e),
        _ => {}
    }
    let md = std::fs::symlink_metadata(dir)?;
    if !md.is_dir() {
        return Err(std::io::Error::other(format!(
            "{} is not a directory",
            dir.display()
        )));
    }
    let (uid, gid, mode) = match owner {
        Some(o) => (o.uid, o.gid, 0o700),
        None => (0, 0, 0o1777),
    };
    nix::unistd::fchownat(
        None,
        dir,
        Some(nix::unistd::Uid::from_raw(uid)),
        Some(nix::unistd::Gid::from_raw(gid)),
        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .map_err(std::io::Error::from)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
}

/// What the restart policy remembers, and what restores learnt.
#[derive(Default)]
pub(crate) struct Recovery {
    /// Deaths and restores, for `max_restores` and the backoff.
    pub(crate) history: History,
    /// Images whose lazy restore could not serve a page.
    pub(crate) lazy_failures: crate::pages::LazyFailures,
}

/// Supervises one job.
pub struct Supervisor<E: Engine = Criu> {
    ctx: Ctx<E>,
    report: Report,
    cadence: Cadence,
    tree: Tree,
    recovery: Recovery,
    /// A live job left by an earlier supervise, to take over at start.
    adopt: Option<JobRecord>,
    commands: Option<mpsc::Receiver<Command>>,
    _lock: File,
}

impl<E: Engine> Supervisor<E> {
    /// Prepares a job: state dir, lock, image store. Inside a Slurm job
    /// (`slurm`), the per-run files (lock, job.json, exit status, restore
    /// work dir) live in `<state_dir>/slurm-<job id>.<restart count>/`, so an
    /// old and a new copy of the job never share them; the image store's
    /// lease decides between them ([`crate::fence`]).
    pub fn new(
        cfg: JobConfig,
        slurm: Option<SlurmContext>,
        engine: Arc<E>,
    ) -> Result<Supervisor<E>, SupervisorError> {
        let job = cfg.name.clone();
        let run_dir = match &slurm {
            Some(s) => cfg
                .state_dir
                .join(format!("slurm-{}.{}", s.job_id, s.restart_count)),
            None => cfg.state_dir.clone(),
        };
        // supervise's own files: only in a directory nobody else controls.
        crate::fsutil::ensure_trusted_dir("state directory", &cfg.state_dir)?;
        crate::fsutil::ensure_trusted_dir("state directory", &run_dir)?;
        let lock =
            crate::fsutil::open_rw_nofollow(&run_dir.join("lock"), 0o600).map_err(|source| {
                SupervisorError::StateDir {
                    job: job.clone(),
                    path: run_dir.clone(),
                    source,
                }
            })?;
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
        let adopt = record::read_record(&run_dir).filter(|rec| engine.still_running(rec));
        let store = ImageStore::open_with(&cfg.checkpoint.dir, &cfg.store).map_err(|source| {
            SupervisorError::Store {
                job: job.clone(),
                source,
            }
        })?;
        let shadow = run_dir.join("shadow");
        let shadow_dir = match crate::fsutil::ensure_trusted_dir("shadow directory", &shadow) {
            Ok(_) => Some(shadow),
            Err(e) => {
                warn!(error = %e, "cannot keep shadow copies of the job's files; each checkpoint copies them whole while the job is frozen");
                None
            }
        };
        let tracker = tracker_for(&cfg, &run_dir);
        // Image files a crashed restore left behind (possibly GiBs of tmpfs).
        crate::store::remove_scratch(&run_dir.join("restore"));
        Ok(Supervisor {
            report: Report::new(&cfg.name),
            cadence: Cadence::new(&cfg),
            tree: Tree::default(),
            recovery: Recovery::default(),
            ctx: Ctx {
                cfg,
                store,
                engine,
                run_dir,
                slurm,
                fence: None,
                shadow_dir,
                criu_version: String::new(),
                quota: None,
                tracker,
            },
            adopt,
            commands: None,
            _lock: lock,
        })
    }

    /// Connects the job to the control socket and the metrics.
    pub fn connect(&mut self, port: JobPort, metrics: Metrics) {
        self.commands = Some(port.commands);
        self.report.connect(port.status, metrics);
        let owner = self.ctx.cfg.owner.as_ref().map(|o| o.name.clone());
        self.report.publish(|s| s.owner = owner);
        if let Some(ctx) = &self.ctx.slurm {
            let facts = ctx.facts();
            self.report.publish(|s| s.extra = facts);
        }
    }

    /// Records the CRIU version in each checkpoint's manifest.
    pub fn set_criu_version(&mut self, v: String) {
        self.ctx.criu_version = v;
    }

    /// Limits the bytes of images the job's owner may keep (the node
    /// service): a checkpoint beyond it is refused, older images kept.
    pub fn set_quota(&mut self, quota: Quota) {
        self.ctx.quota = Some(quota);
    }

    /// Shares the daemon's dump slots (`supervise run --max-concurrent-dumps`).
    pub fn set_dump_slots(&mut self, slots: Arc<tokio::sync::Semaphore>) {
        self.cadence.set_slots(slots);
    }

    /// The job's name.
    pub fn name(&self) -> &str {
        &self.ctx.cfg.name
    }

    /// Runs the job until it completes, fails for good, or `shutdown` fires.
    pub async fn run(mut self, shutdown: watch::Receiver<Shutdown>) -> Outcome {
        info!(
            schedule = %self.ctx.cfg.checkpoint.schedule.describe(),
            images = %self.ctx.cfg.checkpoint.dir.display(),
            "supervising"
        );
        if let Target::Launch(s) = &self.ctx.cfg.target {
            let under = paths_under_tmp(s);
            if s.private_tmp && !under.is_empty() {
                info!(
                    paths = ?under,
                    "the job's own paths are under /tmp: it shares the host's /tmp (a private \
                     /tmp would hide them; `private_tmp = false` says so and silences this)"
                );
            }
        }
        if let Err(reason) = self.take_lease().await {
            return self.fail(reason);
        }
        let scrub = self
            .ctx
            .cfg
            .store
            .scrub
            .map(|every| scrub::start(self.ctx.store.clone(), every));
        let outcome = self.run_inner(shutdown).await;
        if let Some(s) = scrub {
            s.abort();
        }
        // A job that has ended needs its private /tmp no more (one that
        // stopped, failed or gave way keeps it for its next restore).
        if matches!(outcome, Outcome::Completed(_)) {
            self.ctx.remove_private_tmp();
        }
        // Whatever the end, this copy no longer runs the job.
        if let Some(f) = &self.ctx.fence {
            if let Err(e) = f.release() {
                warn!(error = %e, "cannot record the release of the image store lease");
            }
        }
        outcome
    }

    /// Inside Slurm: take over the image store from any earlier copy of
    /// this job, and give that copy a bounded time to stop its job.
    async fn take_lease(&mut self) -> Result<(), String> {
        let Some(ctx) = self.ctx.slurm.clone() else {
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
        let dir = self.ctx.cfg.checkpoint.dir.clone();
        let wait = self.ctx.cfg.slurm.fence_wait;
        let (fence, handover) = engine::blocking(move || {
            let f = Fence::acquire(&dir, owner)?;
            let h = f.await_release(wait);
            Ok::<_, crate::fence::FenceError>((f, h))
        })
        .await?
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
        self.ctx.fence = Some(fence);
        Ok(())
    }

    /// The fence's verdict: `Some(reason)` once another copy took over.
    async fn superseded(&self) -> Option<String> {
        let f = self.ctx.fence.clone()?;
        match engine::blocking(move || f.check()).await {
            Ok(Err(e @ crate::fence::FenceError::Superseded { .. })) => Some(e.to_string()),
            Ok(Err(e)) => {
                warn!(error = %e, "cannot check the image store lease");
                None
            }
            _ => None,
        }
    }

    /// Another copy owns the store now: stop the job, publish nothing more.
    async fn give_way(&mut self, reason: String) -> Outcome {
        error!(reason = %reason, "another copy of this job took over; stopping this copy's job and its checkpoints");
        self.stop_job().await;
        self.report.set_state(JobState::Superseded(reason.clone()));
        Outcome::Superseded(reason)
    }

    async fn run_inner(&mut self, mut shutdown: watch::Receiver<Shutdown>) -> Outcome {
        let mut commands = self.commands.take();
        match self.start(Some(&mut shutdown)).await {
            Ok(j) => self.tree.job = Some(j),
            Err(reason) => return self.fail(reason),
        }
        self.cadence.job_running();
        self.cadence.restart(None, &self.report);
        self.cadence.retune(&self.report);
        loop {
            let runs = self.tree.runs();
            let due = self.cadence.due().filter(|_| runs);
            self.report.set_state(if runs {
                JobState::Running
            } else {
                JobState::Stopped
            });
            self.report.publish(|s| s.next_checkpoint = due);
            let sleep = match due {
                Some(due) => {
                    let d = (due - chrono::Utc::now())
                        .to_std()
                        .unwrap_or(Duration::ZERO);
                    tokio::time::sleep(d)
                }
                None => tokio::time::sleep(Duration::from_secs(86400 * 365)),
            };
            let fence_tick = tokio::time::sleep(FENCE_CHECK);
            let (job_ended, lazy_ended) = self.tree.events();
            tokio::select! {
                _ = fence_tick, if self.ctx.fence.is_some() => {
                    if let Some(reason) = self.superseded().await {
                        return self.give_way(reason).await;
                    }
                }
                _ = sleep, if runs => {
                    self.cadence.serving(due);
                    if let Err(CheckpointError::Superseded(reason)) = self.checkpoint().await {
                        return self.give_way(reason).await;
                    }
                    self.cadence.served(due, &self.report);
                    self.cadence.retune(&self.report);
                }
                outcome = lazy_ended => {
                    tree::lazy_done(outcome, &self.report);
                }
                (status, since) = job_ended => {
                    self.job_down();
                    // A lazy restore that killed the job (a page it could
                    // not serve) says so before the job is restored again.
                    if self.tree.lazy_pending() {
                        let _ = tokio::time::timeout(
                            Duration::from_secs(2),
                            self.tree.settle_lazy(&self.report),
                        )
                        .await;
                    }
                    match self.on_death(status, since, &mut shutdown).await {
                        Ok(j) => {
                            self.tree.job = Some(j);
                            self.cadence.job_running();
                            self.cadence.restart(Some("fell during the restore"), &self.report);
                            self.cadence.retune(&self.report);
                        }
                        Err(outcome) => return outcome,
                    }
                }
                Some(cmd) = next_command(&mut commands) => {
                    if let Some(outcome) = self.command(cmd).await {
                        return outcome;
                    }
                    if self.tree.runs() && !self.cadence.counting() {
                        self.cadence.job_running();
                    }
                }
                _ = shutdown.changed() => {
                    let how = *shutdown.borrow_and_update();
                    return match how {
                        _ if !self.tree.runs() => {
                            info!("shutdown requested; the job is stopped");
                            self.report.set_state(JobState::Stopped);
                            Outcome::Stopped
                        }
                        Shutdown::DetachAll => {
                            // A lazily restored job must hold all its
                            // memory before supervise may go away.
                            self.tree.settle_lazy(&self.report).await;
                            self.detach()
                        }
                        _ => self.shut_down().await,
                    };
                }
            }
        }
    }

    /// Takes a checkpoint of the running job (after its lazy restore, if
    /// any, has made all its memory resident).
    async fn checkpoint(&mut self) -> Result<crate::store::ImageInfo, CheckpointError> {
        self.tree.settle_lazy(&self.report).await;
        let Some(job) = self.tree.job.as_ref() else {
            return Err(CheckpointError::Ended);
        };
        let (info, tree) =
            checkpoint::take(&self.ctx, job, &mut self.cadence, &mut self.report).await?;
        if job.init_pid.is_none() {
            self.tree.remember_tree(tree);
        }
        Ok(info)
    }

    /// Carries out one control command between steps, and answers it;
    /// `Some` when it ends the job's supervision (`cancel`).
    async fn command(&mut self, cmd: Command) -> Option<Outcome> {
        let err = |m: String| Response::Error { message: m };
        let verb = match &cmd {
            Command::Checkpoint(_) => Verb::Checkpoint,
            Command::Stop(..) => Verb::Stop,
            Command::Start(_) => Verb::Start,
            Command::Restore(..) => Verb::Restore,
            Command::Cancel(_) => Verb::Cancel,
        };
        if let Err(why) = policy::admit(verb, self.tree.runs()) {
            let tx = match cmd {
                Command::Checkpoint(tx)
                | Command::Stop(_, tx)
                | Command::Start(tx)
                | Command::Cancel(tx) => tx,
                Command::Restore(_, tx) => tx,
            };
            let _ = tx.send(err(why.into()));
            return None;
        }
        match cmd {
            Command::Checkpoint(tx) => {
                let resp = match self.checkpoint().await {
                    Ok(info) => Response::Checkpoint {
                        checkpoint: summary(&info),
                    },
                    Err(e @ CheckpointError::Superseded(_)) => err(e.to_string()),
                    Err(e) => err(format!("checkpoint failed (the job keeps running): {e}")),
                };
                let _ = tx.send(resp);
            }
            Command::Stop(with_checkpoint, tx) => {
                let mut note = String::new();
                if with_checkpoint {
                    match self.checkpoint().await {
                        Ok(info) => note = format!(" after checkpoint {}", info.id),
                        Err(e) => {
                            let _ = tx.send(err(format!(
                                "checkpoint failed, so the job was not stopped: {e}"
                            )));
                            return None;
                        }
                    }
                }
                self.stop_job().await;
                info!("job stopped on request");
                self.report.set_state(JobState::Stopped);
                let _ = tx.send(Response::Done {
                    message: format!("job {} stopped{note}", self.name()),
                });
            }
            Command::Start(tx) => {
                self.recovery.history.reset();
                let resp = match self.start(None).await {
                    Ok(j) => {
                        let m = format!("job {} running as pid {}", self.name(), j.host_pid);
                        self.tree.job = Some(j);
                        self.cadence.restart(None, &self.report);
                        Response::Done { message: m }
                    }
                    Err(e) => {
                        self.report.error(e.clone());
                        err(format!("cannot start the job: {e}"))
                    }
                };
                let _ = tx.send(resp);
            }
            Command::Restore(image, tx) => {
                let resp = self.manual_restore(image).await;
                self.cadence.restart(None, &self.report);
                let _ = tx.send(resp);
            }
            Command::Cancel(tx) => {
                self.tree.settle_lazy(&self.report).await;
                self.stop_job().await;
                info!("job cancelled: stopped, and no longer supervised");
                self.report.set_state(JobState::Stopped);
                let _ = tx.send(Response::Done {
                    message: format!("job {} cancelled", self.name()),
                });
                return Some(Outcome::Stopped);
            }
        }
        None
    }

    /// Kills the job (if it runs) and waits for it (bounded); it is then
    /// down.
    async fn stop_job(&mut self) {
        if let Some(mut job) = self.tree.job.take() {
            job.kill();
            if job.is_waitable() {
                let _ = tokio::time::timeout(Duration::from_secs(10), job.wait()).await;
            }
        }
        self.job_down();
    }

    /// The job's process is gone: forget it.
    fn job_down(&mut self) {
        self.tree.job = None;
        self.cadence.job_not_running();
        record::forget(&self.ctx.run_dir);
        self.report.down();
    }

    fn fail(&mut self, reason: String) -> Outcome {
        error!(reason = %reason, "job failed; supervision ends");
        self.report.set_state(JobState::Failed(reason.clone()));
        Outcome::Failed(reason)
    }

    /// `supervise detach-all`: no checkpoint, the job keeps running and
    /// its `job.json` stays, so the next `supervise run` re-adopts it.
    fn detach(&mut self) -> Outcome {
        if let Some(job) = &self.tree.job {
            info!(
                pid = job.host_pid,
                "leaving the job running (detach-all); a new supervise re-adopts it"
            );
        }
        self.report.set_state(JobState::Stopped);
        Outcome::Detached
    }

    async fn shut_down(&mut self) -> Outcome {
        info!("shutdown requested");
        if self.ctx.cfg.shutdown.checkpoint {
            if let Err(e) = self.checkpoint().await {
                warn!(error = %e, "final checkpoint failed");
            }
        }
        match self.ctx.cfg.shutdown.action {
            ShutdownAction::Detach => {
                if let Some(job) = &self.tree.job {
                    info!(
                        pid = job.host_pid,
                        "leaving the job running (shutdown.action = detach)"
                    );
                }
                self.report.set_state(JobState::Stopped);
                Outcome::Detached
            }
            ShutdownAction::Stop => {
                self.stop_job().await;
                info!("job stopped");
                self.report.set_state(JobState::Stopped);
                Outcome::Stopped
            }
        }
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
